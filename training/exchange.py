"""Snapshot exchange between codistillation groups through any fsspec store.

Layout, one directory per group:

    <store>/<run>/group-<g>/step-<s:08d>.safetensors   the weights (never pickle)
    <store>/<run>/group-<g>/step-<s:08d>.json          group, step, sha256, signatures, time
    <store>/<run>/group-<g>/LATEST                     the name of the newest JSON file

A publisher writes the safetensors file, then the JSON, and only then moves
LATEST, so a reader that follows LATEST always finds complete files. A reader
still verifies everything (sha256, model signature, vocab hash, safetensors
parse) because a file may be pruned, overwritten or corrupted under it; a
snapshot that fails is skipped with a warning and never loaded.

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
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

import safetensors.torch
from fsspec.implementations.local import LocalFileSystem
import torch
from torch import Tensor

from codistill import storage

logger = logging.getLogger(__name__)

LATEST = "LATEST"
_SNAPSHOT_FILE = re.compile(r"^step-(\d{8,})\.(safetensors|json)$")
_LATEST_CONTENT = re.compile(r"^step-(\d{8,})\.json$")


def model_signature(state_dict: Mapping[str, Tensor]) -> str:
    """sha256 over parameter names, shapes and dtypes: equal means loadable into the same model."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        h.update(f"{name}\t{tuple(tensor.shape)}\t{tensor.dtype}\n".encode())
    return h.hexdigest()


def snapshot_name(step: int, suffix: str) -> str:
    return f"step-{step:08d}.{suffix}"


def group_dir(root: str, run: str, group: int) -> str:
    return f"{root.rstrip('/')}/{run}/group-{group}"


# safetensors' names of the dtypes a model state holds.
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def serialize_state_dict(state_dict: Mapping[str, Tensor]) -> memoryview:
    """A consistent copy of the weights as a safetensors file, taken in the caller's thread.

    The format is an 8-byte header length, a JSON header (dtype, shape and byte
    offsets of each tensor; padded to 8 bytes), then the raw little-endian
    tensors back to back. Writing it as one `torch.cat` of byte views into a
    buffer that already holds the header costs one copy, done by torch without
    the GIL; `safetensors.torch.save` would hold the GIL for ~1 ms/MB, which
    stalls the training thread while a background upload runs. The upload then
    hashes and writes this buffer as it is (both release the GIL too).
    `safetensors.torch.load` reads the result (tested); the copy also unties
    shared storage (tied weights).
    """
    header, offset, pieces = {}, 0, []
    for name, tensor in state_dict.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        pieces.append(tensor)
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    prefix = len(text).to_bytes(8, "little") + text
    out = torch.empty(len(prefix) + offset, dtype=torch.uint8)
    out[:len(prefix)] = torch.frombuffer(bytearray(prefix), dtype=torch.uint8)
    if pieces:
        with torch.no_grad():
            torch.cat([t.detach().cpu().reshape(-1).view(torch.uint8) for t in pieces], out=out[len(prefix):])
    return memoryview(out.numpy())


class SnapshotPublisher:
    """Publishes one group's weights; used by rank 0 of each group.

    Store errors never reach training: they are logged and the publish returns
    False. Peers tolerate stale weights, so a missed snapshot only costs freshness.
    """

    def __init__(self, store_url: str, run: str, group: int, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.fs, root = storage.url_to_fs(store_url)
        self.dir = group_dir(root, run, group)
        self.group = group
        self.keep = keep
        # A rename within one local directory is atomic; writing in place is not.
        # Object stores make a single put visible all at once.
        self._latest_via_rename = isinstance(self.fs, LocalFileSystem)
        self.last_published_step: int | None = None
        self._upload: threading.Thread | None = None

    def publish(self, step: int, state_dict: Mapping[str, Tensor], vocab_hash: str | None = None) -> bool:
        """Serialise and upload in the caller's thread (e.g. the final snapshot of a run).

        Waits for an in-flight async upload first. True when LATEST now names `step`.
        """
        self.wait()  # never race an async upload on the same files
        return self._upload_snapshot(step, serialize_state_dict(state_dict), model_signature(state_dict), vocab_hash)

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
            args=(step, serialize_state_dict(state_dict), model_signature(state_dict), vocab_hash),
            name=f"snapshot-publish-group-{self.group}",
            daemon=True,  # an unfinished upload never moved LATEST, so dropping it at exit is safe
        )
        self._upload.start()
        return True

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
            "sha256": hashlib.sha256(payload).hexdigest(),
            "model_signature": signature,
            "vocab_hash": vocab_hash,
            "created": datetime.now(timezone.utc).isoformat(),
        }
        json_name = snapshot_name(step, "json")
        try:
            self.fs.makedirs(self.dir, exist_ok=True)
            # Local files take the buffer as it is; other stores get plain bytes.
            data = payload if isinstance(self.fs, LocalFileSystem) else bytes(payload)
            self.fs.pipe_file(f"{self.dir}/{snapshot_name(step, 'safetensors')}", data)
            self.fs.pipe_file(f"{self.dir}/{json_name}", json.dumps(meta, indent=1).encode())
            self._write_latest(json_name)
        except Exception:
            logger.warning("group %d: publishing step %d to %s failed", self.group, step, self.dir, exc_info=True)
            return False
        self.last_published_step = step
        logger.info("group %d: published step %d to %s", self.group, step, self.dir)
        try:
            self._prune(latest_step=step)
        except Exception:
            logger.warning("group %d: pruning old snapshots in %s failed", self.group, self.dir, exc_info=True)
        return True

    def _write_latest(self, json_name: str) -> None:
        latest = f"{self.dir}/{LATEST}"
        if self._latest_via_rename:
            tmp = f"{self.dir}/.{LATEST}.{uuid.uuid4().hex}.tmp"
            self.fs.pipe_file(tmp, json_name.encode())
            self.fs.mv(tmp, latest)
        else:
            self.fs.pipe_file(latest, json_name.encode())

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
    """A snapshot that must not be loaded (corrupt, mismatched or malformed)."""


class PeerWatcher:
    """Polls the peers' LATEST pointers in a daemon thread and verifies new snapshots.

    The trainer calls `take_updates()` between steps to receive verified state
    dicts (CPU tensors) and `usable_peers(step)` to learn which peers are fresh
    enough to distill from. Neither ever waits on the store.

    Steps only move forward: a snapshot whose step is not above the peer's last
    verified one is ignored (e.g. a peer restarted from an older checkpoint is
    picked up again once it passes its old step).
    """

    def __init__(
        self,
        store_url: str,
        run: str,
        group: int,
        peer_groups: Iterable[int],
        model_signature: str,
        vocab_hash: str | None = None,
        poll_interval: float = 1.0,
        max_staleness: int | None = None,
        warn_missing_after: float = 600.0,
    ) -> None:
        self.peer_groups = sorted(set(peer_groups))
        if group in self.peer_groups:
            raise ValueError(f"group {group} cannot be its own peer")
        if max_staleness is not None and max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0 or None, got {max_staleness}")
        self.fs, root = storage.url_to_fs(store_url)
        self.peer_dirs = {peer: group_dir(root, run, peer) for peer in self.peer_groups}
        self.expected_signature = model_signature
        self.vocab_hash = vocab_hash
        self.poll_interval = poll_interval
        self.max_staleness = max_staleness
        self.warn_missing_after = warn_missing_after

        self._lock = threading.Lock()
        self._pending: dict[int, tuple[int, dict[str, Tensor]]] = {}  # guarded by _lock
        # Poller-thread state.
        self._verified_step: dict[int, int] = {}
        self._rejected_meta: dict[int, bytes] = {}  # JSON of a snapshot that failed verification
        self._last_problem: dict[int, str] = {}  # to warn once per distinct problem
        self._started_at = time.monotonic()
        self._warned_missing: set[int] = set()
        # Caller-thread state.
        self._taken_step: dict[int, int] = {}
        self._stale: set[int] = set()

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"peer-watcher-group-{group}", daemon=True)
        self._thread.start()

    def take_updates(self) -> dict[int, tuple[int, dict[str, Tensor]]]:
        """Snapshots verified since the last call: {peer_group: (step, state_dict)}."""
        with self._lock:
            updates, self._pending = self._pending, {}
        for peer, (step, _) in updates.items():
            self._taken_step[peer] = step
        return updates

    def usable_peers(self, current_step: int) -> dict[int, int]:
        """{peer_group: step} of taken snapshots no older than `max_staleness` steps.

        Call after `take_updates`. A peer dropping out (or coming back) is logged
        once per transition, not every step.
        """
        usable = {}
        for peer, step in self._taken_step.items():
            stale = self.max_staleness is not None and current_step - step > self.max_staleness
            if stale and peer not in self._stale:
                logger.warning(
                    "peer group %d left out: its snapshot (step %d) is %d steps old, max_staleness is %d",
                    peer, step, current_step - step, self.max_staleness,
                )
                self._stale.add(peer)
            elif not stale and peer in self._stale:
                logger.info("peer group %d fresh again (snapshot step %d)", peer, step)
                self._stale.discard(peer)
            if not stale:
                usable[peer] = step
        return usable

    def fetch(self, peer: int, step: int) -> dict[str, Tensor] | None:
        """Read and verify one named snapshot now (on resume, to restore the peer weights in use).

        Blocking, unlike everything else here; None (with a warning) if it is gone or bad.
        """
        try:
            meta_bytes = self.fs.cat_file(f"{self.peer_dirs[peer]}/{snapshot_name(step, 'json')}")
            return self._verify(peer, step, meta_bytes)
        except Exception as err:
            logger.warning("peer group %d: snapshot of step %d cannot be restored (%s); waiting for a newer one",
                           peer, step, err)
            return None

    def close(self, timeout: float = 5.0) -> None:
        """Stop polling. Returns within `timeout` even if a download is stuck (the thread is a daemon)."""
        self._stop.set()
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
            pointer = self.fs.cat_file(f"{peer_dir}/{LATEST}")
        except FileNotFoundError:
            self._missing(peer)
            return
        match = _LATEST_CONTENT.match(pointer.decode(errors="replace").strip())
        if match is None:
            raise SnapshotError(f"{peer_dir}/{LATEST} holds {pointer[:80]!r}, not a snapshot JSON name")
        step = int(match.group(1))
        if step <= self._verified_step.get(peer, -1):
            return

        meta_bytes = self.fs.cat_file(f"{peer_dir}/{snapshot_name(step, 'json')}")
        if meta_bytes == self._rejected_meta.get(peer):
            return  # already failed verification; wait for the peer to publish again
        try:
            state_dict = self._verify(peer, step, meta_bytes)
        except SnapshotError:
            self._rejected_meta[peer] = meta_bytes
            raise
        self._verified_step[peer] = step
        self._last_problem.pop(peer, None)
        with self._lock:
            self._pending[peer] = (step, state_dict)
        logger.info("peer group %d: loaded snapshot of step %d", peer, step)

    def _verify(self, peer: int, step: int, meta_bytes: bytes) -> dict[str, Tensor]:
        """Check metadata, download, and check the bytes before parsing them as safetensors."""
        meta = _parse_meta(meta_bytes)
        if meta["group"] != peer or meta["step"] != step:
            raise SnapshotError(f"metadata names group {meta['group']} step {meta['step']}, expected {peer}/{step}")
        if meta["model_signature"] != self.expected_signature:
            raise SnapshotError(f"step {step}: model signature differs from ours (another architecture)")
        peer_vocab = meta.get("vocab_hash")
        if self.vocab_hash is not None and peer_vocab is not None and peer_vocab != self.vocab_hash:
            raise SnapshotError(f"step {step}: vocab hash {peer_vocab} differs from ours {self.vocab_hash}")

        payload = self.fs.cat_file(f"{self.peer_dirs[peer]}/{snapshot_name(step, 'safetensors')}")
        if hashlib.sha256(payload).hexdigest() != meta["sha256"]:
            raise SnapshotError(f"step {step}: sha256 mismatch (truncated, corrupt or being replaced)")
        try:
            state_dict = safetensors.torch.load(payload)
        except Exception as err:
            raise SnapshotError(f"step {step}: not a valid safetensors file: {err}") from err
        if model_signature(state_dict) != self.expected_signature:
            raise SnapshotError(f"step {step}: tensors do not match our model signature")
        return state_dict

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


def _parse_meta(meta_bytes: bytes) -> dict[str, Any]:
    try:
        meta = json.loads(meta_bytes)
    except ValueError as err:
        raise SnapshotError(f"metadata is not JSON: {err}") from err
    expected_types = {"group": int, "step": int, "sha256": str, "model_signature": str, "vocab_hash": (str, type(None))}
    if not isinstance(meta, dict) or any(not isinstance(meta.get(k), t) for k, t in expected_types.items()):
        raise SnapshotError(f"metadata lacks or mistypes one of {sorted(expected_types)}")
    return meta
