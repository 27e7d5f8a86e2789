"""Snapshot exchange between codistillation groups through any fsspec store.

Layout, one directory per group:

    <store>/<run>/group-<g>/step-<s:08d>.safetensors   the weights (never pickle)
    <store>/<run>/group-<g>/step-<s:08d>.json          group, step, run nonce, attempt, sha256, size,
                                                       dtype, signatures, time
    <store>/<run>/group-<g>/LATEST                     the name of the newest JSON file

A publisher writes the safetensors file, then the JSON, and only then moves
LATEST, so a reader that follows LATEST always finds complete files. A reader
still verifies everything (sha256, model signature, vocab hash, safetensors
parse, finite values) because a file may be pruned, overwritten or corrupted
under it; a snapshot that fails is skipped with a warning and never loaded.

The store is not trusted to be well-behaved either: every file is checked to be
a regular file of bounded size before it is read (LATEST and the JSON have small
caps, the weights must be exactly the size our model serialises to); local
opens do not follow symlinks and never block on a FIFO.

Snapshots name the run they belong to (`run_nonce`, drawn once per run) and the
attempt of the group that wrote them (one more on every (re)start): a reader
refuses another run's snapshots (an earlier run under the same name), refuses a
step past the end of the schedule, and follows a peer back to a lower step when
that step comes from a newer attempt (the peer resumed from an older checkpoint).

Training never waits on the store: `SnapshotPublisher.publish_async` uploads in
a background thread and `PeerWatcher` polls in one; the trainer only swaps in
the verified state dicts that `PeerWatcher.take_updates` hands it.
"""

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

import safetensors.torch
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem
import torch
from torch import Tensor

from codistill import storage
from codistill.shards import read_regular_file

logger = logging.getLogger(__name__)

LATEST = "LATEST"
_SNAPSHOT_FILE = re.compile(r"^step-(\d{8,})\.(safetensors|json)$")
_LATEST_CONTENT = re.compile(r"^step-(\d{8,})\.json$")
# Read caps: LATEST holds one file name, the JSON a few fields; a bigger file is not ours.
LATEST_MAX_BYTES = 256
META_MAX_BYTES = 64 * 1024


def model_signature(state_dict: Mapping[str, Tensor], dtype: torch.dtype | None = None) -> str:
    """sha256 over parameter names, shapes and dtypes: equal means loadable into the same model.

    `dtype`: the signature of the state as published in that floating-point dtype (the snapshot of an fp32
    model published in bf16); None: as the tensors are.
    """
    h = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        h.update(f"{name}\t{tuple(tensor.shape)}\t{_stored_dtype(tensor, dtype)}\n".encode())
    return h.hexdigest()


def snapshot_name(step: int, suffix: str) -> str:
    return f"step-{step:08d}.{suffix}"


def group_dir(root: str, run: str, group: int) -> str:
    return f"{root.rstrip('/')}/{run}/group-{group}"


# safetensors' names of the dtypes a model state holds.
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}

# `codistill.snapshot_dtype`: what floating-point tensors are published in (bf16/fp16 halve the bytes).
SNAPSHOT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _stored_dtype(tensor: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """What `tensor` is published as: floats in `dtype` (None: unchanged), integer and bool buffers as they are."""
    return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype


def serialize_state_dict(state_dict: Mapping[str, Tensor], dtype: torch.dtype | None = None,
                         into: memoryview | None = None) -> memoryview:
    """A consistent copy of the weights as a safetensors file, taken in the caller's thread; floating-point
    tensors cast to `dtype` on the way (None: as they are). `into`: an earlier result that nothing reads any
    more, written over when it has the right size (see SnapshotPublisher).

    The format is an 8-byte header length, a JSON header (dtype, shape and byte
    offsets of each tensor; padded to 8 bytes), then the raw little-endian
    tensors back to back. Each tensor is copied (and cast) by torch, without the
    GIL, straight into its place in a buffer that already holds the header: no
    temporary per tensor, which matters at a billion parameters. The data is
    laid out widest dtype first, so every tensor's place is aligned for a view
    in its dtype. `safetensors.torch.save` would hold the GIL for ~1 ms/MB,
    which stalls the training thread while a background upload runs. The
    upload then hashes and writes this buffer as it is (both release the GIL
    too). `safetensors.torch.load` reads the result (tested); the copy also
    unties shared storage (tied weights).
    """
    prefix, layout = _safetensors_layout(state_dict, dtype)
    total = len(prefix) + (layout[-1][2][1] if layout else 0)
    out = (torch.frombuffer(into, dtype=torch.uint8) if into is not None and len(into) == total > 0
           else torch.empty(total, dtype=torch.uint8))
    out[:len(prefix)] = torch.frombuffer(bytearray(prefix), dtype=torch.uint8)
    data = out[len(prefix):]  # starts at a multiple of 8
    with torch.no_grad():
        for name, stored, (begin, end) in layout:
            data[begin:end].view(stored).copy_(state_dict[name].detach().reshape(-1))
    return memoryview(out.numpy())


def snapshot_bytes(state_dict: Mapping[str, Tensor], dtype: torch.dtype | None = None) -> int:
    """The exact size of `serialize_state_dict(state_dict, dtype)`: what a reader expects a peer's file to be."""
    prefix, layout = _safetensors_layout(state_dict, dtype)
    return len(prefix) + (layout[-1][2][1] if layout else 0)


def _safetensors_layout(state_dict: Mapping[str, Tensor], dtype: torch.dtype | None,
                        ) -> tuple[bytes, list[tuple[str, torch.dtype, tuple[int, int]]]]:
    """The header length and JSON header of a safetensors file, and each tensor's stored dtype and byte range
    in the data after it, in the data's order: widest dtype first (then as given), so that each range starts
    at a multiple of its dtype's size."""
    stored = {name: _stored_dtype(tensor, dtype) for name, tensor in state_dict.items()}
    header, layout, offset = {}, [], 0
    for name in sorted(state_dict, key=lambda n: -stored[n].itemsize):
        size = state_dict[name].numel() * stored[name].itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[stored[name]], "shape": list(state_dict[name].shape),
                        "data_offsets": [offset, offset + size]}
        layout.append((name, stored[name], (offset, offset + size)))
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, layout


class SnapshotPublisher:
    """Publishes one group's weights; used by rank 0 of each group.

    Store errors never reach training: they are logged (with a traceback once per
    kind of error, not on every publish of a read-only or unreachable store) and
    the publish returns False. Peers tolerate stale weights, so a missed snapshot
    only costs freshness.

    `run_nonce` and `attempt` go into every JSON: readers of another run, and
    readers that have seen a newer attempt of this group, ignore the snapshot.
    Floating-point tensors are published in `snapshot_dtype` (a name of
    SNAPSHOT_DTYPES, recorded in the JSON), whatever the state dict holds.

    The serialised copy is kept between publishes and written over by the
    next one (there is never more than one: a publish waits for, or skips
    behind, the upload in flight). A fresh buffer of that size would cost the
    publishing step its page faults every time, several times the copy itself
    (measured: 85 ms against 10 ms for 80 MB), at the price of the snapshot's
    size staying allocated on rank 0 between publishes.
    """

    def __init__(self, store_url: str, run: str, group: int, keep: int = 3, run_nonce: str | None = None,
                 attempt: int = 0, snapshot_dtype: str = "fp32") -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if snapshot_dtype not in SNAPSHOT_DTYPES:
            raise ValueError(f"snapshot_dtype must be one of {sorted(SNAPSHOT_DTYPES)}, got {snapshot_dtype!r}")
        self.snapshot_dtype = snapshot_dtype
        self.fs, root = storage.url_to_fs(store_url)
        self.dir = group_dir(root, run, group)
        self.group = group
        self.keep = keep
        self.run_nonce = run_nonce
        self.attempt = attempt
        self._failing: str | None = None  # the kind of error the last publish failed with
        self.last_published_step: int | None = None
        self._upload: threading.Thread | None = None
        self._buffer: memoryview | None = None  # the last serialised snapshot; only read while its upload runs

    def publish(self, step: int, state_dict: Mapping[str, Tensor], vocab_hash: str | None = None) -> bool:
        """Serialise and upload in the caller's thread (e.g. the final snapshot of a run).

        Waits for an in-flight async upload first. True when LATEST now names `step`.
        """
        self.wait()  # never race an async upload on the same files
        return self._upload_snapshot(step, *self._serialize(state_dict), vocab_hash)

    def publish_async(self, step: int, state_dict: Mapping[str, Tensor], vocab_hash: str | None = None) -> bool:
        """Serialise now, upload in a background thread. False when skipped.

        If the previous upload is still in flight this snapshot is skipped (and
        not even serialised): at most one upload and one serialised copy exist at
        a time, and the next exchange interval publishes fresher weights anyway.
        A skip warns, since it means the store is slower than `exchange_every`.
        """
        if self._upload is not None and self._upload.is_alive():
            logger.warning(
                "group %d: snapshot of step %d skipped, previous upload still in flight", self.group, step
            )
            return False
        self._upload = threading.Thread(
            target=self._upload_snapshot,
            args=(step, *self._serialize(state_dict), vocab_hash),
            name=f"snapshot-publish-group-{self.group}",
            daemon=True,  # an unfinished upload never moved LATEST, so dropping it at exit is safe
        )
        self._upload.start()
        return True

    def _serialize(self, state_dict: Mapping[str, Tensor]) -> tuple[memoryview, str]:
        """The file to publish and its model signature, both in the snapshot dtype."""
        dtype = SNAPSHOT_DTYPES[self.snapshot_dtype]
        self._buffer = serialize_state_dict(state_dict, dtype, into=self._buffer)
        return self._buffer, model_signature(state_dict, dtype)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for an in-flight async upload; True when none is left running."""
        if self._upload is not None:
            self._upload.join(timeout)
            if self._upload.is_alive():
                return False
            self._upload = None
        return True

    def _upload_snapshot(self, step: int, payload: memoryview, signature: str, vocab_hash: str | None) -> bool:
        meta = {
            "group": self.group,
            "step": step,
            "run_nonce": self.run_nonce,
            "attempt": self.attempt,
            "bytes": len(payload),
            "dtype": self.snapshot_dtype,
            "sha256": hashlib.sha256(payload).hexdigest(),
            "model_signature": signature,
            "vocab_hash": vocab_hash,
            "created": datetime.now(timezone.utc).isoformat(),
        }
        json_name = snapshot_name(step, "json")
        try:
            storage.make_dirs(self.fs, self.dir)
            # Local files take the buffer as it is; other stores get plain bytes.
            data = payload if isinstance(self.fs, LocalFileSystem) else bytes(payload)
            self.fs.pipe_file(f"{self.dir}/{snapshot_name(step, 'safetensors')}", data)
            self.fs.pipe_file(f"{self.dir}/{json_name}", json.dumps(meta, indent=1).encode())
            storage.write_atomically(f"{self.dir}/{LATEST}", json_name, fs=self.fs)
        except Exception as err:
            kind, self._failing = self._failing, type(err).__name__
            if kind == self._failing:  # the same outage again: warned already
                logger.info("group %d: publishing step %d failed again (%s: %s)", self.group, step,
                               type(err).__name__, err)
            else:
                logger.warning("group %d: publishing step %d to %s failed", self.group, step, self.dir,
                               exc_info=True)
            return False
        if self._failing is not None:
            logger.warning("group %d: publishing works again (step %d)", self.group, step)
            self._failing = None
        self.last_published_step = step
        logger.info("group %d: published step %d to %s", self.group, step, self.dir)
        try:
            self._prune(latest_step=step)
        except Exception:
            logger.warning("group %d: pruning old snapshots in %s failed", self.group, self.dir, exc_info=True)
        return True

    def _prune(self, latest_step: int) -> None:
        """Keep `keep` steps: the one LATEST names and the newest others.

        After a restart from an older checkpoint LATEST may name a lower step
        than files left by the earlier attempt, so "newest" alone is not enough.
        """
        self.fs.invalidate_cache(self.dir)
        steps: dict[int, list[str]] = {}
        for path in self.fs.ls(self.dir, detail=False):
            match = _SNAPSHOT_FILE.match(path.rsplit("/", 1)[-1])
            if match:
                steps.setdefault(int(match.group(1)), []).append(path)
        older = sorted(step for step in steps if step != latest_step)
        for step in older[: max(0, len(older) - (self.keep - 1))]:
            self.fs.rm(steps[step])


class SnapshotError(Exception):
    """A snapshot that must not be loaded (corrupt, mismatched, malformed or not ours)."""


class LockstepTimeout(TimeoutError):
    """A lockstep peer's snapshot did not appear in time: the peer died or fell behind."""


def read_bounded(fs: AbstractFileSystem, path: str, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; SnapshotError for anything else (a symlink to
    /dev/zero, a FIFO or a huge file in the store must neither grow this process without bound nor hang it:
    `codistill.shards.read_regular_file`). FileNotFoundError passes through."""
    return read_regular_file(path, limit, fs=fs, error=SnapshotError)


class PeerWatcher:
    """Polls the peers' LATEST pointers in a daemon thread and verifies new snapshots.

    The trainer calls `take_updates()` between steps to receive verified state
    dicts (CPU tensors); it never waits on the store.

    A snapshot is adopted only if it is newer than the peer's last verified one:
    a higher step in the same attempt, or any step of a newer attempt (the peer
    restarted from an older checkpoint). A snapshot of another run (`run_nonce`
    differs), past `max_step`, of another size than `payload_bytes` (what our
    model serialises to) or holding NaN/Inf is refused and does not move that
    mark, so it cannot pin the peer: the next genuine snapshot is taken.

    `model_signature` and `payload_bytes` describe our model as published in
    `snapshot_dtype` (`model_signature(state, dtype)`, `snapshot_bytes(state,
    dtype)`); a snapshot published in another dtype is refused, saying so.
    Verified state dicts are handed out as stored: the peer model casts them
    to the dtype it runs in as it loads them.
    """

    def __init__(
        self,
        store_url: str,
        run: str,
        group: int,
        peer_groups: Iterable[int],
        model_signature: str,
        payload_bytes: int,
        vocab_hash: str | None = None,
        snapshot_dtype: str = "fp32",
        poll_interval: float = 1.0,
        warn_missing_after: float = 600.0,
        run_nonce: str | None = None,
        max_step: int | None = None,
        poll: bool = True,
    ) -> None:
        self.peer_groups = sorted(set(peer_groups))
        if group in self.peer_groups:
            raise ValueError(f"group {group} cannot be its own peer")
        self.fs, root = storage.url_to_fs(store_url)
        self.peer_dirs = {peer: group_dir(root, run, peer) for peer in self.peer_groups}
        self.expected_signature = model_signature
        self.payload_bytes = payload_bytes
        self.vocab_hash = vocab_hash
        self.snapshot_dtype = snapshot_dtype
        self.run_nonce = run_nonce
        self.max_step = max_step
        self.poll_interval = poll_interval
        self.warn_missing_after = warn_missing_after

        self._lock = threading.Lock()
        self._pending: dict[int, tuple[int, dict[str, Tensor]]] = {}  # guarded by _lock
        # Poller-thread state.
        self._verified: dict[int, tuple[int, int]] = {}  # peer -> (attempt, step) last verified
        self._seen_meta: dict[int, bytes] = {}  # JSON last verified or refused: not downloaded again
        self._last_problem: dict[int, str] = {}  # to warn once per distinct problem
        self._started_at = time.monotonic()
        self._warned_missing: set[int] = set()

        self._stop = threading.Event()
        # Without polling (lockstep), snapshots are only read when named: `wait_for`, `fetch`.
        self._thread = threading.Thread(target=self._run, name=f"peer-watcher-group-{group}", daemon=True)
        if poll:
            self._thread.start()

    def take_updates(self) -> dict[int, tuple[int, dict[str, Tensor]]]:
        """Snapshots verified since the last call: {peer_group: (step, state_dict)}."""
        with self._lock:
            updates, self._pending = self._pending, {}
        return updates

    def fetch(self, peer: int, step: int, timeout: float = 120.0) -> dict[str, Tensor] | None:
        """Read and verify one named snapshot now (on resume, to restore the peer weights in use).

        Blocking, unlike everything else here, but for at most `timeout` seconds (a
        store that stops answering is left to its daemon thread); None (with a
        warning) if it is gone, bad or too slow.
        """
        result: list[dict[str, Tensor] | Exception] = []

        def read() -> None:
            try:
                meta_bytes = read_bounded(self.fs, f"{self.peer_dirs[peer]}/{snapshot_name(step, 'json')}",
                                          META_MAX_BYTES)
                result.append(self._verify(peer, step, meta_bytes)[1])
            except Exception as err:
                result.append(err)

        reader = threading.Thread(target=read, name=f"peer-fetch-group-{peer}", daemon=True)
        reader.start()
        reader.join(timeout)
        outcome = result[0] if result else TimeoutError(f"no answer from the store within {timeout:.0f}s")
        if isinstance(outcome, Exception):
            logger.warning("peer group %d: snapshot of step %d cannot be restored (%s); waiting for a newer one",
                           peer, step, outcome)
            return None
        return outcome

    def wait_for(self, peer: int, step: int, timeout: float) -> dict[str, Tensor]:
        """Lockstep: the peer's snapshot of exactly `step`, verified, waiting until it is published.

        LockstepTimeout after `timeout` seconds (a peer that died or fell behind), naming the last problem
        seen (a snapshot being written is read again; one that stays bad is the problem)."""
        path = f"{self.peer_dirs[peer]}/{snapshot_name(step, 'json')}"
        deadline, problem = time.monotonic() + timeout, "not published"
        # A peer in step is usually milliseconds away: look again soon, then back off to poll_interval (at
        # exchange_every=1 a fixed 0.2 s wait made each step ~10x slower).
        pause = min(0.002, self.poll_interval)
        while True:
            self.fs.invalidate_cache(self.peer_dirs[peer])
            try:
                return self._verify(peer, step, read_bounded(self.fs, path, META_MAX_BYTES))[1]
            except FileNotFoundError:
                problem = "not published"
            except SnapshotError as err:
                problem = f"refused: {err}"
            if time.monotonic() >= deadline:
                raise LockstepTimeout(f"lockstep: group {peer}'s snapshot of step {step} was {problem} after "
                                      f"{timeout:.0f}s ({path}); is group {peer} running? "
                                      "(codistill.lockstep_timeout)")
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(2 * pause, self.poll_interval)

    def close(self, timeout: float = 5.0) -> None:
        """Stop polling. Returns within `timeout` even if a download is stuck (the thread is a daemon)."""
        self._stop.set()
        if not self._thread.is_alive():
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("peer watcher did not stop within %.1fs; leaving its daemon thread behind", timeout)

    def __enter__(self) -> "PeerWatcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            for peer in self.peer_groups:
                if self._stop.is_set():
                    return
                try:
                    self._poll(peer)
                except SnapshotError as err:
                    self._problem(peer, str(err), f"snapshot rejected: {err}")
                except Exception as err:  # I/O of any store backend: retry next poll
                    # Keyed by type: messages of one outage differ (request ids) but warn once.
                    self._problem(peer, type(err).__name__, f"store error, will retry: {type(err).__name__}: {err}")
            self._stop.wait(self.poll_interval)

    def _poll(self, peer: int) -> None:
        peer_dir = self.peer_dirs[peer]
        try:
            pointer = read_bounded(self.fs, f"{peer_dir}/{LATEST}", LATEST_MAX_BYTES)
        except FileNotFoundError:
            self._missing(peer)
            return
        match = _LATEST_CONTENT.match(pointer.decode(errors="replace").strip())
        if match is None:
            raise SnapshotError(f"{peer_dir}/{LATEST} holds {pointer[:80]!r}, not a snapshot JSON name")
        step = int(match.group(1))
        meta_bytes = read_bounded(self.fs, f"{peer_dir}/{snapshot_name(step, 'json')}", META_MAX_BYTES)
        if meta_bytes == self._seen_meta.get(peer):
            return  # verified or refused already; wait for the peer to publish again
        try:
            version, state_dict = self._verify(peer, step, meta_bytes, newer_than=self._verified.get(peer))
        except SnapshotError:
            self._seen_meta[peer] = meta_bytes
            raise
        self._seen_meta[peer] = meta_bytes
        if state_dict is None:
            return
        self._verified[peer] = version
        self._last_problem.pop(peer, None)
        with self._lock:
            self._pending[peer] = (step, state_dict)
        logger.info("peer group %d: loaded snapshot of step %d (attempt %d)", peer, step, version[0])

    def _verify(self, peer: int, step: int, meta_bytes: bytes, newer_than: tuple[int, int] | None = None,
                ) -> tuple[tuple[int, int], dict[str, Tensor] | None]:
        """Check metadata, download, and check the bytes before parsing them as safetensors.

        Returns ((attempt, step), state dict), with None instead of the state dict
        (nothing downloaded) when (attempt, step) is not above `newer_than`.
        """
        meta = _parse_meta(meta_bytes)
        if meta["group"] != peer or meta["step"] != step:
            raise SnapshotError(f"metadata names group {meta['group']} step {meta['step']}, expected {peer}/{step}")
        if self.run_nonce is not None and meta.get("run_nonce") != self.run_nonce:
            raise SnapshotError(f"step {step}: written by another run (run nonce {meta.get('run_nonce')!r}, "
                                f"ours {self.run_nonce!r}), e.g. an earlier run under the same name")
        if self.max_step is not None and step > self.max_step:
            raise SnapshotError(f"step {step}: past the end of the schedule ({self.max_step} steps)")
        version = (meta["attempt"], step)
        if newer_than is not None and version <= newer_than:
            return version, None  # e.g. a peer restarted from an older checkpoint, same attempt: not newer
        if meta["dtype"] != self.snapshot_dtype:  # before the signature and size, which differ with it
            raise SnapshotError(f"step {step}: published in {meta['dtype']}, this group reads {self.snapshot_dtype} "
                                "snapshots: codistill.snapshot_dtype differs between the groups")
        if meta["model_signature"] != self.expected_signature:
            raise SnapshotError(f"step {step}: model signature differs from ours (another architecture)")
        peer_vocab = meta.get("vocab_hash")
        if self.vocab_hash is not None and peer_vocab is not None and peer_vocab != self.vocab_hash:
            raise SnapshotError(f"step {step}: vocab hash {peer_vocab} differs from ours {self.vocab_hash}")
        if meta["bytes"] != self.payload_bytes:
            raise SnapshotError(f"step {step}: weights of {meta['bytes']} bytes, our model's are "
                                f"{self.payload_bytes}")

        payload = read_bounded(self.fs, f"{self.peer_dirs[peer]}/{snapshot_name(step, 'safetensors')}",
                               self.payload_bytes)
        if hashlib.sha256(payload).hexdigest() != meta["sha256"]:
            raise SnapshotError(f"step {step}: sha256 mismatch (truncated, corrupt or being replaced)")
        try:
            state_dict = safetensors.torch.load(payload)
        except Exception as err:
            raise SnapshotError(f"step {step}: not a valid safetensors file: {err}") from err
        if model_signature(state_dict) != self.expected_signature:
            raise SnapshotError(f"step {step}: tensors do not match our model signature")
        bad = [name for name, t in state_dict.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:  # a diverged peer: distilling from it would spread NaN to us
            raise SnapshotError(f"step {step}: non-finite values (NaN/Inf) in {', '.join(bad[:3])}")
        return version, state_dict

    def _missing(self, peer: int) -> None:
        waited = time.monotonic() - self._started_at
        if waited > self.warn_missing_after and peer not in self._warned_missing:
            logger.warning("peer group %d has published nothing after %.0fs", peer, waited)
            self._warned_missing.add(peer)
        else:
            logger.debug("peer group %d has no LATEST yet", peer)

    def _problem(self, peer: int, key: str, message: str) -> None:
        if self._last_problem.get(peer) != key:
            logger.warning("peer group %d: %s", peer, message)
            self._last_problem[peer] = key


def check_store_run(store_url: str, run: str, groups: Iterable[int], run_nonce: str) -> None:
    """Refuse a store whose snapshots for `run` were written by another run (another nonce, or none).

    A new run reusing a run name (and so the same `<store>/<run>/`) would
    otherwise see the old run's snapshots; readers refuse them one by one, but
    starting at all is a mistake the user should hear about. Unreadable or
    missing snapshots say nothing about ownership and are left to the watcher.
    """
    fs, root = storage.url_to_fs(store_url)
    for group in groups:
        directory = group_dir(root, run, group)
        try:
            pointer = read_bounded(fs, f"{directory}/{LATEST}", LATEST_MAX_BYTES).decode(errors="replace").strip()
            if not _LATEST_CONTENT.match(pointer):
                continue
            meta = json.loads(read_bounded(fs, f"{directory}/{pointer}", META_MAX_BYTES))
        except (OSError, SnapshotError, ValueError):
            continue
        nonce = meta.get("run_nonce") if isinstance(meta, dict) else None
        if nonce != run_nonce:
            raise ValueError(f"{directory} holds snapshots of another run (run nonce {nonce!r}, this run's is "
                             f"{run_nonce!r}): choose another run name (train.run_dir) or store, or delete them")


def _parse_meta(meta_bytes: bytes) -> dict[str, Any]:
    try:
        meta = json.loads(meta_bytes)
    except ValueError as err:
        raise SnapshotError(f"metadata is not JSON: {err}") from err
    expected_types = {"group": int, "step": int, "sha256": str, "model_signature": str, "vocab_hash": (str, type(None)),
                      "bytes": int, "dtype": str, "attempt": int, "run_nonce": (str, type(None))}
    if not isinstance(meta, dict) or any(not isinstance(meta.get(k), t) for k, t in expected_types.items()):
        raise SnapshotError(f"metadata lacks or mistypes one of {sorted(expected_types)}")
    return meta
