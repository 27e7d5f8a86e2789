import copy
import hashlib
import json
import logging
import os
import pickle
import threading
import time
import uuid
from collections.abc import Iterator

import fsspec
import pytest
import safetensors.torch
import torch

from codistill import storage
from training.exchange import (LATEST, SNAPSHOT_DTYPES, PeerWatcher, SnapshotPublisher, check_store_run,
                               model_signature, serialize_state_dict, snapshot_bytes, snapshot_name)

pytestmark = pytest.mark.timeout(30)

RUN = "run"
POLL = 0.02


def make_state(value: float = 0.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(int(value))
    return {
        "layer.weight": torch.randn(4, 3, generator=g) + value,
        "layer.bias": torch.full((3,), float(value)),
        "steps": torch.tensor([int(value)], dtype=torch.int64),
    }


SIGNATURE = model_signature(make_state())
PAYLOAD_BYTES = snapshot_bytes(make_state())


@pytest.fixture(params=["memory", "local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    if request.param == "local":
        yield str(tmp_path / "store")
        return
    if request.param == "s3":  # moto's S3 server on 127.0.0.1 (conftest), through s3fs
        url = request.getfixturevalue("s3_storage").url()
        yield url
        fs, root = storage.url_to_fs(url)
        if fs.exists(root):
            fs.rm(root, recursive=True)
        return
    # fsspec's memory filesystem is process-global: give each test its own root.
    url = f"memory://codistill-test-{uuid.uuid4().hex}"
    yield url
    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)


def group_path(store: str, group: int, name: str = "") -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = storage.url_to_fs(store)
    return fs, f"{root.rstrip('/')}/{RUN}/group-{group}/{name}".rstrip("/")


def watcher(store: str, **kwargs) -> PeerWatcher:
    kwargs = {"peer_groups": [1], "model_signature": SIGNATURE, "payload_bytes": PAYLOAD_BYTES,
              "poll_interval": POLL} | kwargs
    return PeerWatcher(store, RUN, group=0, **kwargs)


def wait_for_update(w: PeerWatcher, timeout: float = 15.0) -> dict[int, tuple[int, dict[str, torch.Tensor]]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        updates = w.take_updates()
        if updates:
            return updates
        time.sleep(POLL / 2)
    raise AssertionError(f"no snapshot arrived within {timeout}s")


def assert_no_update(w: PeerWatcher, duration: float = 10 * POLL) -> None:
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        assert w.take_updates() == {}
        time.sleep(POLL / 2)


def assert_refused(w: PeerWatcher, caplog, warning: str, timeout: float = 10.0) -> None:
    """The watcher warns `warning` at its first poll of the bad snapshot, however slow the store (S3 under load,
    a busy machine), and adopts nothing then or in the polls after."""
    deadline = time.monotonic() + timeout
    while not any(warning in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, f"no warning {warning!r} within {timeout}s: {caplog.text}"
        assert w.take_updates() == {}
        time.sleep(POLL / 2)
    assert_no_update(w)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_round_trip(store):
    state = make_state(7)
    publisher = SnapshotPublisher(store, RUN, group=1)
    assert publisher.publish(10, state, vocab_hash="v1")

    fs, latest = group_path(store, 1, LATEST)
    assert fs.cat_file(latest).decode() == "step-00000010.json"
    meta = json.loads(fs.cat_file(group_path(store, 1, "step-00000010.json")[1]))
    payload = fs.cat_file(group_path(store, 1, "step-00000010.safetensors")[1])
    assert meta["group"] == 1 and meta["step"] == 10 and meta["vocab_hash"] == "v1"
    assert meta["sha256"] == hashlib.sha256(payload).hexdigest()
    assert meta["model_signature"] == SIGNATURE and meta["created"]
    assert meta["bytes"] == len(payload) == PAYLOAD_BYTES  # snapshot_bytes predicts the file's size
    assert meta["attempt"] == 0 and meta["run_nonce"] is None

    with watcher(store, vocab_hash="v1") as w:
        updates = wait_for_update(w)
        assert list(updates) == [1]
        step, received = updates[1]
        assert step == 10
        assert_same(received, state)
        assert all(t.device.type == "cpu" for t in received.values())
        assert_no_update(w, duration=5 * POLL)  # only new snapshots are handed out


def test_file_url_and_several_peers(tmp_path):
    url = f"file://{tmp_path}/store"
    for group in (1, 2):
        assert SnapshotPublisher(url, RUN, group).publish(group * 100, make_state(group))
    with PeerWatcher(url, RUN, 0, [1, 2], SIGNATURE, PAYLOAD_BYTES, poll_interval=POLL) as w:
        seen: dict[int, int] = {}
        while len(seen) < 2:
            seen |= {peer: step for peer, (step, _) in wait_for_update(w).items()}
        assert seen == {1: 100, 2: 200}


def test_tied_weights_publish():
    shared = torch.randn(5, 2)
    state = {"embed.weight": shared, "head.weight": shared}  # same storage, as in a tied LM
    url = f"memory://codistill-test-{uuid.uuid4().hex}"
    assert SnapshotPublisher(url, RUN, 1).publish(1, state)
    with watcher(url, model_signature=model_signature(state), payload_bytes=snapshot_bytes(state)) as w:
        assert_same(wait_for_update(w)[1][1], state)


def snapshot_steps(store: str, group: int = 1) -> list[int]:
    fs, path = group_path(store, group)
    fs.invalidate_cache(path)
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    steps = sorted({int(n[5:13]) for n in names if n.startswith("step-")})
    for step in steps:
        assert {snapshot_name(step, "json"), snapshot_name(step, "safetensors")} <= set(names)
    return steps


def test_prune_keeps_last_k_and_never_latest(store):
    publisher = SnapshotPublisher(store, RUN, group=1, keep=3)
    for step in range(1, 7):
        assert publisher.publish(step * 10, make_state(step))
    assert snapshot_steps(store) == [40, 50, 60]
    # A restart from an older checkpoint: LATEST names a lower step than the files left behind.
    assert publisher.publish(5, make_state(1))
    assert snapshot_steps(store) == [5, 50, 60]


class RecordingFS:
    """Wraps a filesystem to record writes, optionally slowly or failing."""

    def __init__(self, fs: fsspec.AbstractFileSystem, delay: float = 0.0, fail: bool = False) -> None:
        self._fs, self.delay, self.fail = fs, delay, fail
        self.writes: list[str] = []

    def __getattr__(self, name: str):
        return getattr(self._fs, name)

    def pipe_file(self, path: str, data: bytes, **kwargs) -> None:
        if self.fail:
            raise OSError("store unavailable")
        time.sleep(self.delay)
        self._fs.pipe_file(path, data, **kwargs)
        self.writes.append(path.rsplit("/", 1)[-1])

    def mv(self, src: str, dst: str, **kwargs) -> None:
        self._fs.mv(src, dst, **kwargs)
        self.writes.append(dst.rsplit("/", 1)[-1])


def test_latest_is_written_last(store):
    publisher = SnapshotPublisher(store, RUN, group=1)
    publisher.fs = recorder = RecordingFS(publisher.fs)
    assert publisher.publish(3, make_state(3))
    assert recorder.writes[:2] == ["step-00000003.safetensors", "step-00000003.json"]
    assert recorder.writes[-1] == LATEST
    if store.startswith(("s3://", "memory://")):  # no rename: LATEST is one PUT, visible all at once, after the rest
        assert recorder.writes == ["step-00000003.safetensors", "step-00000003.json", LATEST]
    else:  # local: a temp file, then a rename
        temp, = recorder.writes[2:-1]
        assert storage.is_temp(temp) and temp.endswith(f"-{LATEST}")


def test_reader_following_latest_always_finds_complete_files(store):
    publisher = SnapshotPublisher(store, RUN, group=1, keep=1000)
    fs, latest = group_path(store, 1, LATEST)
    done = threading.Event()
    checked: list[str] = []

    def publish_many() -> None:
        for step in range(1, 40):
            publisher.publish(step, make_state(step))
        done.set()

    thread = threading.Thread(target=publish_many)
    thread.start()
    while True:
        finished = done.is_set()  # read once more after the last publish: on a fast machine that is the only read
        try:
            name = fs.cat_file(latest).decode()
        except FileNotFoundError:
            assert not finished, "LATEST is missing after every publish returned"
            continue
        meta = json.loads(fs.cat_file(group_path(store, 1, name)[1]))
        payload = fs.cat_file(group_path(store, 1, snapshot_name(meta["step"], "safetensors"))[1])
        assert hashlib.sha256(payload).hexdigest() == meta["sha256"]
        checked.append(name)
        if finished:
            break
    thread.join()
    # Read once more after the last publish: on a fast store the loop may never have run.
    name = fs.cat_file(latest).decode()
    meta = json.loads(fs.cat_file(group_path(store, 1, name)[1]))
    payload = fs.cat_file(group_path(store, 1, snapshot_name(meta["step"], "safetensors"))[1])
    assert meta["step"] == 39 and hashlib.sha256(payload).hexdigest() == meta["sha256"]


def test_publish_async_skips_while_in_flight_and_never_raises(store, caplog):
    publisher = SnapshotPublisher(store, RUN, group=1)
    publisher.fs = RecordingFS(publisher.fs, delay=0.1)
    assert publisher.publish_async(1, make_state(1))
    assert not publisher.publish_async(2, make_state(2))  # previous upload still in flight
    assert publisher.wait(timeout=5)
    assert publisher.last_published_step == 1
    assert snapshot_steps(store) == [1]

    publisher.fs.fail = True
    with caplog.at_level(logging.WARNING, logger="training.exchange"):
        assert not publisher.publish(3, make_state(3))
        assert publisher.publish_async(4, make_state(4))
        assert publisher.wait(timeout=5)
        assert not publisher.publish(5, make_state(5))
    assert publisher.last_published_step == 1
    # A store that keeps failing (read-only, unreachable) warns once with a traceback, not on every publish.
    failures = [r for r in caplog.records if "publishing step" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None, [r.getMessage() for r in failures]
    publisher.fs.fail = False
    with caplog.at_level(logging.WARNING, logger="training.exchange"):
        assert publisher.publish(6, make_state(6))
    assert any("publishing works again" in r.getMessage() for r in caplog.records)


def publish_then_start_watcher(store: str, step: int = 1) -> SnapshotPublisher:
    publisher = SnapshotPublisher(store, RUN, group=1)
    assert publisher.publish(step, make_state(step))
    return publisher


def recovers(store: str, publisher: SnapshotPublisher, w: PeerWatcher, step: int = 2) -> None:
    """After a bad snapshot, the next good one is still picked up."""
    assert publisher.publish(step, make_state(step))
    updates = wait_for_update(w)
    assert updates[1][0] == step
    assert_same(updates[1][1], make_state(step))


def test_truncated_safetensors_is_rejected(store, caplog):
    publisher = publish_then_start_watcher(store)
    fs, path = group_path(store, 1, snapshot_name(1, "safetensors"))
    fs.pipe_file(path, fs.cat_file(path)[:-10])
    with caplog.at_level(logging.WARNING, logger="training.exchange"), watcher(store) as w:
        assert_refused(w, caplog, "sha256 mismatch")
        assert sum("sha256 mismatch" in r.getMessage() for r in caplog.records) == 1  # warned once, not every poll
        recovers(store, publisher, w)


def test_wrong_sha256_in_json_is_rejected(store):
    publisher = publish_then_start_watcher(store)
    fs, path = group_path(store, 1, snapshot_name(1, "json"))
    meta = json.loads(fs.cat_file(path))
    fs.pipe_file(path, json.dumps(meta | {"sha256": "0" * 64}).encode())
    with watcher(store) as w:
        assert_no_update(w)
        recovers(store, publisher, w)


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"group": 1}', b"\xff\xfe"])
def test_garbage_json_is_rejected(store, content):
    publisher = publish_then_start_watcher(store)
    fs, path = group_path(store, 1, snapshot_name(1, "json"))
    fs.pipe_file(path, content)
    with watcher(store) as w:
        assert_no_update(w)
        recovers(store, publisher, w)


def test_missing_latest_gives_nothing(store):
    publisher = publish_then_start_watcher(store)
    fs, latest = group_path(store, 1, LATEST)
    fs.rm(latest)
    with watcher(store) as w:
        assert_no_update(w)
        recovers(store, publisher, w)


@pytest.mark.parametrize("content", [b"step-00000099.json", b"../../elsewhere.json", b""])
def test_latest_pointing_at_nothing_valid(store, content):
    publisher = publish_then_start_watcher(store)
    fs, latest = group_path(store, 1, LATEST)
    fs.pipe_file(latest, content)
    with watcher(store) as w:
        assert_no_update(w)
        recovers(store, publisher, w, step=100)


def test_mismatched_model_or_vocab_is_rejected(store):
    publisher = SnapshotPublisher(store, RUN, group=1)
    other_architecture = make_state(1) | {"layer.weight": torch.zeros(5, 3)}
    assert publisher.publish(1, other_architecture)
    with watcher(store) as w:
        assert_no_update(w)
        assert publisher.publish(2, make_state(2), vocab_hash="other-vocab")
    with watcher(store, vocab_hash="our-vocab") as w:
        assert_no_update(w)
        recovers(store, publisher, w, step=3)  # no vocab hash published: nothing to compare


def test_lying_metadata_signature_is_caught_on_the_tensors(store):
    publisher = SnapshotPublisher(store, RUN, group=1)
    renamed = {name.replace("weight", "wEight"): t for name, t in make_state(1).items()}  # same size, other names
    assert publisher.publish(1, renamed)
    fs, path = group_path(store, 1, snapshot_name(1, "json"))
    fs.pipe_file(path, json.dumps(json.loads(fs.cat_file(path)) | {"model_signature": SIGNATURE}).encode())
    with watcher(store) as w:
        assert_no_update(w)


class Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file if ever unpickled


@pytest.mark.parametrize("fix_hash", [False, True])
def test_pickle_is_never_unpickled(store, tmp_path, fix_hash):
    publisher = publish_then_start_watcher(store)
    marker = tmp_path / "unpickled"
    payload = pickle.dumps({"layer.weight": Exploit(str(marker))})
    fs, path = group_path(store, 1, snapshot_name(1, "safetensors"))
    fs.pipe_file(path, payload)
    if fix_hash:  # an attacker who controls the bucket can rewrite the JSON too
        meta_path = group_path(store, 1, snapshot_name(1, "json"))[1]
        meta = json.loads(fs.cat_file(meta_path)) | {"sha256": hashlib.sha256(payload).hexdigest()}
        fs.pipe_file(meta_path, json.dumps(meta).encode())
    with watcher(store) as w:
        assert_no_update(w)
        recovers(store, publisher, w)
    assert not marker.exists()


def test_peer_that_never_appears_and_close_is_fast(store):
    w = watcher(store, peer_groups=[1, 2, 3], poll_interval=0.5)
    assert_no_update(w, duration=0.1)
    start = time.monotonic()
    w.close()
    assert time.monotonic() - start < 1.0
    assert not w._thread.is_alive()


def test_older_step_is_ignored(store):
    publisher = publish_then_start_watcher(store, step=20)
    with watcher(store) as w:
        assert wait_for_update(w)[1][0] == 20
        assert publisher.publish(10, make_state(10))  # a peer restarted from an older checkpoint
        assert_no_update(w)
        recovers(store, publisher, w, step=30)


@pytest.mark.parametrize("store", ["memory", "local"], indirect=True)  # on S3: the test above, cheaper
def test_concurrent_publisher_and_watcher(store):
    publisher = SnapshotPublisher(store, RUN, group=1, keep=2)  # pruning races the reader
    last_step = 60

    def publish_many() -> None:
        for step in range(1, last_step + 1):
            publisher.publish(step, make_state(step))

    thread = threading.Thread(target=publish_many)
    with watcher(store, poll_interval=0.002) as w:
        thread.start()
        seen: list[int] = []
        deadline = time.monotonic() + 20
        while (not seen or seen[-1] != last_step) and time.monotonic() < deadline:
            for step, state in w.take_updates().values():
                assert_same(state, make_state(step))
                seen.append(step)
            time.sleep(0.001)
        thread.join()
    assert seen[-1] == last_step
    assert seen == sorted(set(seen))
    assert len(seen) > 1


def test_group_cannot_watch_itself():
    with pytest.raises(ValueError, match="own peer"):
        PeerWatcher("memory://unused", RUN, 1, [1, 2], SIGNATURE, PAYLOAD_BYTES)


# --- hostile or diverged stores: NaN weights, special files, huge files, another run ---------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(store, bad):
    """A peer that diverged must not spread NaN/Inf to us through distillation."""
    publisher = SnapshotPublisher(store, RUN, group=1)
    state = make_state(1)
    state["layer.bias"][1] = bad
    assert publisher.publish(1, state)
    with watcher(store) as w:
        assert_no_update(w)
        recovers(store, publisher, w)


def replace_with(path: str, kind: str, tmp_path) -> None:
    """Turn a local store file into something a reader must refuse without reading it."""
    os.unlink(path)
    if kind == "symlink-to-dev-zero":
        os.symlink("/dev/zero", path)
    elif kind == "fifo":
        os.mkfifo(path)  # nobody ever writes: a blocking open or read would hang for ever
    elif kind == "symlink-to-a-good-copy":  # even a symlink to a valid file is refused (no-follow)
        os.symlink(tmp_path / "copy", path)
    elif kind == "directory":
        os.mkdir(path)


@pytest.mark.parametrize("kind", ["symlink-to-dev-zero", "fifo", "directory"])
@pytest.mark.parametrize("which", [LATEST, snapshot_name(1, "json"), snapshot_name(1, "safetensors")])
def test_special_files_in_a_local_store_are_refused_without_hanging(tmp_path, which, kind, caplog):
    store = str(tmp_path / "store")
    publisher = publish_then_start_watcher(store)
    path = group_path(store, 1, which)[1]
    replace_with(path, kind, tmp_path)
    with caplog.at_level(logging.WARNING, logger="training.exchange"), watcher(store) as w:
        assert_refused(w, caplog, "snapshot rejected")
        if which != LATEST:
            start = time.monotonic()
            assert w.fetch(1, 1) is None  # --resume reads on the main thread: must not hang either
            assert time.monotonic() - start < 5
        if kind == "directory":
            os.rmdir(path)  # the publisher cannot rename LATEST over a directory; the reader was not stuck
        recovers(store, publisher, w)


def test_symlink_to_a_valid_snapshot_is_refused_too(tmp_path):
    store = str(tmp_path / "store")
    publisher = publish_then_start_watcher(store)
    path = group_path(store, 1, snapshot_name(1, "safetensors"))[1]
    (tmp_path / "copy").write_bytes(open(path, "rb").read())
    replace_with(path, "symlink-to-a-good-copy", tmp_path)
    with watcher(store) as w:
        assert_no_update(w)
        recovers(store, publisher, w)


@pytest.mark.parametrize("which", [LATEST, snapshot_name(1, "json"), snapshot_name(1, "safetensors")])
def test_oversized_files_are_refused_before_reading(store, which, caplog):
    """Sizes are checked (fs.info / fstat) before a read, and reads are bounded: a huge file costs nothing."""
    publisher = publish_then_start_watcher(store)
    fs, path = group_path(store, 1, which)
    original = fs.cat_file(path)
    fs.pipe_file(path, original + b" " * (1 << 20))  # still valid JSON / same name for LATEST, just longer
    with caplog.at_level(logging.WARNING, logger="training.exchange"), watcher(store) as w:
        assert_refused(w, caplog, "more than")
        recovers(store, publisher, w)


def test_recorded_size_must_be_our_models(store):
    """The JSON's `bytes` is checked against what our model serialises to before the weights are read."""
    bigger = make_state(1) | {"extra": torch.zeros(10**5)}  # 400 KB more than our model
    assert SnapshotPublisher(store, RUN, group=1).publish(1, bigger)
    fs, path = group_path(store, 1, snapshot_name(1, "json"))
    assert json.loads(fs.cat_file(path))["bytes"] == snapshot_bytes(bigger)
    with watcher(store, model_signature=model_signature(bigger)) as w:
        assert_no_update(w)  # the signature the watcher expects, but not the size of our model: refused


def test_fetch_gives_up_on_a_store_that_stops_answering(store):
    class Hanging:
        def __init__(self, fs):
            self._fs, self.release = fs, threading.Event()

        def __getattr__(self, name):
            return getattr(self._fs, name)

        def info(self, path, **kwargs):
            self.release.wait()
            return self._fs.info(path, **kwargs)

    publish_then_start_watcher(store)
    w = watcher(store, poll_interval=10)
    try:
        w.fs = hanging = Hanging(w.fs)  # not a LocalFileSystem: goes through fs.info
        start = time.monotonic()
        assert w.fetch(1, 1, timeout=0.3) is None
        assert time.monotonic() - start < 3
    finally:
        hanging.release.set()
        w.close()


def test_snapshots_of_another_run_are_refused_and_cannot_pin_the_peer(store, caplog):
    """An earlier run under the same name left step 400: the new run must not adopt it, and the real
    peer's lower steps must still be taken."""
    assert SnapshotPublisher(store, RUN, group=1, run_nonce="old-run").publish(400, make_state(4))
    publisher = SnapshotPublisher(store, RUN, group=1, run_nonce="this-run")
    with caplog.at_level(logging.WARNING, logger="training.exchange"), watcher(store, run_nonce="this-run") as w:
        assert_refused(w, caplog, "another run")
        recovers(store, publisher, w, step=10)
        recovers(store, publisher, w, step=20)


def test_step_past_the_end_of_the_schedule_is_refused_and_cannot_pin_the_peer(store):
    publisher = SnapshotPublisher(store, RUN, group=1, run_nonce="n")
    assert publisher.publish(10**6, make_state(9))
    with watcher(store, run_nonce="n", max_step=1000) as w:
        assert_no_update(w)
        recovers(store, publisher, w, step=10)


def test_newer_attempt_may_go_back_in_steps(store):
    """A peer that resumed from an older checkpoint publishes lower steps under a new attempt: taken at once."""
    assert SnapshotPublisher(store, RUN, group=1, run_nonce="n", attempt=0).publish(40, make_state(4))
    with watcher(store, run_nonce="n") as w:
        assert wait_for_update(w)[1][0] == 40
        resumed = SnapshotPublisher(store, RUN, group=1, run_nonce="n", attempt=1)
        recovers(store, resumed, w, step=20)
        assert_no_update(w)  # and nothing older from the previous attempt comes back
        assert SnapshotPublisher(store, RUN, group=1, run_nonce="n", attempt=0).publish(50, make_state(5))
        assert_no_update(w)


def test_check_store_run_refuses_another_runs_snapshots(store):
    check_store_run(store, RUN, [0, 1], "this-run")  # nothing there yet
    assert SnapshotPublisher(store, RUN, group=1, run_nonce="this-run").publish(1, make_state(1))
    check_store_run(store, RUN, [0, 1], "this-run")
    assert SnapshotPublisher(store, RUN, group=0, run_nonce="old-run").publish(1, make_state(1))
    with pytest.raises(ValueError, match="another run.*old-run"):
        check_store_run(store, RUN, [0, 1], "this-run")


# --- codistill.snapshot_dtype: floats published in bf16 or fp16 ------------------------------------------------

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def big_state() -> dict[str, torch.Tensor]:
    """Mostly floats, with an integer buffer that must travel untouched."""
    g = torch.Generator().manual_seed(3)
    return {"embed.weight": torch.randn(500, 16, generator=g), "head.bias": torch.randn(16, generator=g) * 100,
            "bn.num_batches_tracked": torch.tensor(123456789012, dtype=torch.int64)}


@pytest.mark.parametrize("name", sorted(HALF))
def test_half_precision_snapshots_halve_the_bytes_and_round_trip(store, name):
    dtype, state = HALF[name], big_state()
    assert SnapshotPublisher(store, RUN, group=1, snapshot_dtype=name).publish(1, state)
    fs, path = group_path(store, 1, snapshot_name(1, "safetensors"))
    meta = json.loads(fs.cat_file(group_path(store, 1, snapshot_name(1, "json"))[1]))
    payload = fs.cat_file(path)
    assert meta["dtype"] == name and meta["bytes"] == len(payload) == snapshot_bytes(state, dtype)

    def tensor_bytes(file: bytes) -> int:  # after the 8-byte header length and the header
        return len(file) - 8 - int.from_bytes(file[:8], "little")

    floats = sum(t.numel() for t in state.values() if t.is_floating_point())
    assert tensor_bytes(bytes(serialize_state_dict(state))) == 4 * floats + 8  # fp32, the int64 buffer's 8
    assert tensor_bytes(payload) == 2 * floats + 8  # half the floats' bytes, the integer buffer untouched
    with watcher(store, model_signature=model_signature(state, dtype), payload_bytes=snapshot_bytes(state, dtype),
                 snapshot_dtype=name) as w:
        (step, received), = wait_for_update(w).values()
    assert step == 1 and received.keys() == state.keys()
    assert received["bn.num_batches_tracked"].dtype == torch.int64
    assert received["bn.num_batches_tracked"].item() == 123456789012
    for n in ("embed.weight", "head.bias"):
        assert received[n].dtype == dtype and torch.equal(received[n], state[n].to(dtype))  # rounded to nearest
        # Within half a unit in the last place: 2^-8 relative for bf16 (7 stored mantissa bits), 2^-11 for fp16.
        torch.testing.assert_close(received[n].float(), state[n], rtol=torch.finfo(dtype).eps / 2, atol=0)


@pytest.mark.parametrize(("published", "read"), [("fp32", "bf16"), ("bf16", "fp32"), ("bf16", "fp16")])
def test_a_snapshot_in_another_dtype_is_refused_saying_why(store, published, read, caplog):
    """Each group derives the size and signature it expects from its own config: a group configured otherwise
    refuses the peer's snapshots with one clear reason (not "another architecture" or a size mismatch)."""
    state, dtype = make_state(1), SNAPSHOT_DTYPES[read]
    assert SnapshotPublisher(store, RUN, group=1, snapshot_dtype=published).publish(1, state)
    with caplog.at_level(logging.WARNING, logger="training.exchange"), \
            watcher(store, model_signature=model_signature(state, dtype), payload_bytes=snapshot_bytes(state, dtype),
                    snapshot_dtype=read) as w:
        reason = (f"peer group 1: snapshot rejected: step 1: published in {published}, this group reads {read} "
                  "snapshots: codistill.snapshot_dtype differs between the groups")
        deadline = time.monotonic() + 10
        while reason not in [r.getMessage() for r in caplog.records]:
            assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
            assert w.take_updates() == {}
            time.sleep(POLL / 2)
        assert_no_update(w)


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_weights_in_the_training_precision_are_published_in_the_snapshot_dtype(name):
    """The trainer hands the publisher its module's state as it is (bf16 parameters, fp32 BatchNorm statistics in
    bf16 training): every float is cast to the snapshot dtype as it is copied, exactly as `.to(dtype)` would."""
    state = big_state()
    training = {"embed.weight": state["embed.weight"].bfloat16(), "head.bias": state["head.bias"],
                "bn.num_batches_tracked": state["bn.num_batches_tracked"]}
    dtype = SNAPSHOT_DTYPES[name]
    url = f"memory://codistill-test-{uuid.uuid4().hex}"
    assert SnapshotPublisher(url, RUN, group=1, snapshot_dtype=name).publish(1, training)
    with watcher(url, model_signature=model_signature(state, dtype), payload_bytes=snapshot_bytes(state, dtype),
                 snapshot_dtype=name) as w:  # what the fp32 model expects: the same as the bf16 one publishes
        (_, received), = wait_for_update(w).values()
    for n, t in training.items():
        assert torch.equal(received[n], t.to(dtype) if t.is_floating_point() else t), n


def test_the_publisher_writes_each_snapshot_over_the_last_ones_buffer_only_once_it_is_uploaded(tmp_path):
    """One serialised copy, reused (no page faults in the step that publishes): every file is still exactly its
    own state's, and a state of another size gets a buffer of its own."""
    publisher = SnapshotPublisher(str(tmp_path / "store"), RUN, group=1, keep=10, snapshot_dtype="bf16")
    states = [big_state(), {k: v + 1 if v.is_floating_point() else v for k, v in big_state().items()},
              make_state(3)]
    for step, state in enumerate(states, 1):
        assert publisher.publish_async(step, state) and publisher.wait()

    def address(buffer: memoryview) -> int:
        return torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()

    last = address(publisher._buffer)
    assert publisher.publish(4, states[2]) and address(publisher._buffer) == last  # the same memory, written over
    fs, _ = group_path(str(tmp_path / "store"), 1)
    for step, state in enumerate(states + states[2:], 1):
        written = fs.cat_file(group_path(str(tmp_path / "store"), 1, snapshot_name(step, "safetensors"))[1])
        assert written == bytes(serialize_state_dict(state, torch.bfloat16)), step


def test_the_publisher_refuses_an_unknown_dtype():
    with pytest.raises(ValueError, match="snapshot_dtype must be one of"):
        SnapshotPublisher("memory://x", RUN, group=1, snapshot_dtype="int8")


@pytest.mark.parametrize("name", sorted(HALF))
def test_a_peer_model_upcasts_a_half_precision_snapshot_as_it_loads_it(name):
    """FlatPeer in fp32 (and in the snapshot's own dtype) takes the stored tensors, cast on the way."""
    from training.train import FlatPeer

    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.BatchNorm1d(8))
    source = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.BatchNorm1d(8))
    source[1].running_mean.fill_(0.25)
    state = source.state_dict()
    stored = safetensors.torch.load(bytes(serialize_state_dict(state, HALF[name])))
    for runs_in in (torch.float32, HALF[name]):
        peer = FlatPeer(copy.deepcopy(model).eval(), runs_in)
        peer.load(stored)
        loaded = peer.module.state_dict()
        for n, t in state.items():
            want = t.to(HALF[name]).to(runs_in if n in dict(model.named_parameters()) else t.dtype) \
                if t.is_floating_point() else t
            assert loaded[n].dtype == want.dtype and torch.equal(loaded[n], want), n
