"""training/data.py: splitting a split over ranks x loader workers, shuffling by seed, and refusing bad shards.

Runs the real parts on a small generated dataset (in-process Beam, real TFRecord
shards, real DataLoader worker processes). No DeepSpeed here.
"""

from __future__ import annotations

import collections
import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest

from codistill.config import load_experiment
from codistill.dataset import DatasetManifest, join, load_manifest
from codistill.shards import ShardFormatError
from pipelines.formats import decode_example, encode_example, frame_record, iter_tfrecord, read_shard
from training.data import ShardStream, StreamSpec, loader, to_torch

from conftest import RUNNER

pytestmark = pytest.mark.timeout(120)

BLOCK_ROWS = 64  # rows per stored record: every shard holds many records, so record-level splits matter


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[str, DatasetManifest]:
    from pipelines.run import preprocess

    out = str(tmp_path_factory.mktemp("data") / "criteo")
    config = load_experiment("criteo-tiny", ["data.synth.rows=3000", f"data.output={out}",
                                             f"data.block_rows={BLOCK_ROWS}", "data.eval_fraction=0.2"])
    manifest = preprocess(config, [RUNNER])
    return out, manifest


def records_of(root: str, manifest: DatasetManifest, shards) -> list[list[bytes]]:
    """The keys of every stored record (block) of `shards`, in storage order."""
    out = []
    for shard in shards:
        for block in read_shard(join(root, shard.path), manifest.features, manifest.format, expect_sha256=shard.sha256):
            out.append(block["key"].tolist())
    return out


def where_is(root: str, manifest: DatasetManifest, shards) -> dict[bytes, tuple[str, int]]:
    """key -> (shard path, record index within the shard)."""
    out = {}
    for shard in shards:
        for i, block in enumerate(read_shard(join(root, shard.path), manifest.features, manifest.format)):
            for key in block["key"].tolist():
                out[key] = (shard.path, i)
    return out


def stop_workers(it) -> None:
    """End a DataLoader iterator's worker processes now.

    After a worker raised, torch's own shutdown waits 5 s per worker before it
    gives up on them (any IterableDataset, not specific to this project), which
    would dominate these tests' runtime.
    """
    for worker in getattr(it, "_workers", []):
        worker.terminate()
        worker.join(5)
    del it


def spec_for(root, manifest, shards, batch_size, rank=0, world=1, **kw) -> StreamSpec:
    return StreamSpec(root, manifest, tuple(shards), batch_size, rank, world, **kw)


def test_fixture_has_the_shapes_these_tests_need(dataset):
    root, manifest = dataset
    assert len(manifest.shards_of("train", 0)) == 2
    assert len(manifest.shards_of("eval")) == 1
    for shard in manifest.shards:
        assert shard.records > 3 * BLOCK_ROWS, f"{shard.path}: too few rows ({shard.records}) to split by record"


# --- one epoch: every row exactly once across all consumers --------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("split", ["eval", "train"])
def test_one_epoch_reads_every_row_exactly_once(dataset, split, world, workers):
    root, manifest = dataset
    shards = manifest.shards_of(split, None if split == "eval" else 0)
    expected = [k for record in records_of(root, manifest, shards) for k in record]
    assert len(expected) == sum(s.records for s in shards)
    batch_size = 50
    seen = []
    per_rank = []
    for rank in range(world):
        spec = spec_for(root, manifest, shards, batch_size, rank, world)
        keys = []
        for batch in loader(spec, workers):
            n = len(batch["key"])
            assert 1 <= n <= batch_size
            assert all(len(column) == n for column in batch.values()), "columns of one batch differ in length"
            assert set(to_torch(batch)) == set(batch) - {"key"}
            keys += batch["key"].tolist()
        per_rank.append(len(keys))
        seen += keys
    duplicates = [k for k, c in collections.Counter(seen).items() if c > 1]
    assert not duplicates, f"{len(duplicates)} rows read twice, e.g. {duplicates[:3]}"
    assert sorted(seen) == sorted(expected), (
        f"world {world} x workers {workers}: {len(set(expected) - set(seen))} rows never read, "
        f"{len(set(seen) - set(expected))} rows that are not in the split")
    if world > 1:
        assert all(n > 0 for n in per_rank), f"a rank got no rows at all: {per_rank}"


def test_one_epoch_rows_carry_their_own_features(dataset):
    """Rows are not reassembled wrongly: each key still has its stored label and features."""
    root, manifest = dataset
    shards = manifest.shards_of("train", 0)
    stored = {}
    for shard in shards:
        for block in read_shard(join(root, shard.path), manifest.features, manifest.format):
            for i, key in enumerate(block["key"].tolist()):
                stored[key] = (block["label"][i], block["dense"][i].copy(), block["cat"][i].copy())
    spec = spec_for(root, manifest, shards, 37, rank=1, world=3, shuffle_buffer=100, seed=4)
    checked = 0
    for batch in ShardStream(spec):
        for i, key in enumerate(batch["key"].tolist()):
            label, dense, cat = stored[key]
            assert batch["label"][i] == label
            np.testing.assert_array_equal(batch["dense"][i], dense)
            np.testing.assert_array_equal(batch["cat"][i], cat)
            checked += 1
    assert checked > 100


# --- training streams: repeat + shuffle ----------------------------------------------------------------


def first_batches(spec: StreamSpec, n: int, workers: int = 0) -> list[list[bytes]]:
    it = iter(loader(spec, workers))
    return [next(it)["key"].tolist() for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_repeating_shuffled_stream_gives_full_batches_deterministically(dataset, workers):
    root, manifest = dataset
    shards = manifest.shards_of("train", 0)
    rows = sum(s.records for s in shards)
    batch_size, world = 48, 2
    # Two and a half epochs of this rank's share: crosses epoch boundaries (where a partial batch is dropped).
    n = int(2.5 * rows / world / batch_size)

    def run(seed):
        spec = spec_for(root, manifest, shards, batch_size, rank=1, world=world, shuffle_buffer=200,
                        repeat=True, seed=seed)
        return first_batches(spec, n, workers)

    a, again, other = run(7), run(7), run(8)
    assert all(len(b) == batch_size for b in a), sorted({len(b) for b in a})
    assert a == again, "same seed gave different batches"
    assert a != other and a[0] != other[0], "a different seed gave the same batches"


def test_repeating_stream_epoch_has_no_row_twice_and_next_epoch_reorders(dataset):
    root, manifest = dataset
    shards = manifest.shards_of("train", 1)
    batch_size = 40
    spec = spec_for(root, manifest, shards, batch_size, shuffle_buffer=150, repeat=True, seed=3)
    rows = sum(s.records for s in shards)
    per_epoch = rows // batch_size
    batches = first_batches(spec, 2 * per_epoch)
    epoch0 = list(itertools.chain(*batches[:per_epoch]))
    epoch1 = list(itertools.chain(*batches[per_epoch:]))
    assert len(set(epoch0)) == len(epoch0) == per_epoch * batch_size, "a row came twice within one epoch"
    assert len(set(epoch1)) == len(epoch1)
    assert rows - len(set(epoch0)) < batch_size, "an epoch dropped more than its last partial batch"
    assert epoch0 != epoch1, "the second epoch repeats the first one's order"


def test_shuffle_mixes_rows_across_records_and_shards(dataset):
    root, manifest = dataset
    shards = manifest.shards_of("train", 0)
    location = where_is(root, manifest, shards)
    rows = sum(s.records for s in shards)
    storage_order = [k for record in records_of(root, manifest, shards) for k in record]
    position = {k: i for i, k in enumerate(storage_order)}

    # A buffer bigger than a shard: the first batch already holds rows of both shards.
    spec = spec_for(root, manifest, shards, 64, shuffle_buffer=rows, repeat=True, seed=11)
    first = first_batches(spec, 1)[0]
    assert len({location[k][0] for k in first}) == 2, "a shuffled batch holds rows of one shard only"

    # A small buffer still mixes many stored records into one batch and breaks the storage order.
    spec = spec_for(root, manifest, shards, 64, shuffle_buffer=3 * BLOCK_ROWS, repeat=True, seed=11)
    for batch in first_batches(spec, 3):
        records = {location[k] for k in batch}
        assert len(records) >= 3, f"one batch mixes only {len(records)} stored records"
        steps = np.diff([position[k] for k in batch])
        assert (steps == 1).mean() < 0.2, "the batch is mostly in storage order: not shuffled"

    # Without a shuffle buffer (evaluation) the order is the storage order.
    spec = spec_for(root, manifest, shards, 64)
    keys = [k for b in ShardStream(spec) for k in b["key"].tolist()]
    assert keys == storage_order


# --- a rank with less than one batch -------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 2])
def test_share_smaller_than_one_batch_raises_instead_of_hanging(dataset, workers):
    root, manifest = dataset
    shards = manifest.shards_of("eval")
    rows = shards[0].records
    world = 3
    batch_size = rows // world + BLOCK_ROWS  # more than any rank's share
    spec = spec_for(root, manifest, shards, batch_size, rank=2, world=world, shuffle_buffer=50, repeat=True)
    it = iter(loader(spec, workers))
    try:
        with pytest.raises(ValueError, match="less than one batch"):
            next(it)
    finally:
        stop_workers(it)


@pytest.mark.timeout(60)
def test_rank_with_no_records_at_all_raises(dataset):
    """More consumers than stored records: some consumer owns nothing and must say so."""
    root, manifest = dataset
    shards = manifest.shards_of("eval")
    n_records = len(records_of(root, manifest, shards))
    world = n_records + 1
    spec = spec_for(root, manifest, shards, 8, rank=world - 1, world=world, shuffle_buffer=16, repeat=True)
    with pytest.raises(ValueError, match="less than one batch"):
        next(iter(ShardStream(spec)))


# --- tampered shards -----------------------------------------------------------------------------------


@pytest.fixture
def tampered_copy(dataset, tmp_path) -> tuple[str, DatasetManifest]:
    root, _ = dataset
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    return str(copy), load_manifest(str(copy))


def test_flipped_byte_raises_shard_format_error(tampered_copy):
    root, manifest = tampered_copy
    shard = manifest.shards_of("train", 0)[0]
    path = Path(root) / shard.path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    spec = spec_for(root, manifest, manifest.shards_of("train", 0), 32, shuffle_buffer=64, repeat=True)
    it = iter(ShardStream(spec))
    with pytest.raises(ShardFormatError):
        for _ in range(1000):  # far more than one epoch
            next(it)


def rewrite_first_record(path: Path, schema) -> None:
    """Change one label in the first record and re-frame it with valid CRCs: only the sha256 can tell."""
    with open(path, "rb") as f:
        payloads = list(iter_tfrecord(f))
    block = decode_example(payloads[0], schema)
    block["label"] = block["label"].copy()
    block["label"][0] = 1.0 - block["label"][0]
    payloads[0] = encode_example(block, schema)
    path.write_bytes(b"".join(frame_record(p) for p in payloads))


@pytest.mark.parametrize("workers", [0, 2])
def test_tampered_shard_with_valid_framing_fails_its_sha256(tampered_copy, workers):
    root, manifest = tampered_copy
    shard = manifest.shards_of("eval")[0]
    path = Path(root) / shard.path
    before = path.stat().st_size
    rewrite_first_record(path, manifest.features)
    assert path.stat().st_size == before == shard.bytes, "the tamper must keep the size (so only the hash differs)"
    with open(path, "rb") as f:  # the framing is still valid: only the hash can catch it
        assert len(list(iter_tfrecord(f))) > 1
    for spec in (spec_for(root, manifest, manifest.shards_of("eval"), 32),  # evaluation: one pass, in order
                 spec_for(root, manifest, manifest.shards_of("eval"), 32, shuffle_buffer=64, repeat=True)):
        it = iter(loader(spec, workers))
        try:
            with pytest.raises(ShardFormatError, match="sha256"):
                for _ in range(1000):  # more than one epoch
                    next(it)
        finally:
            stop_workers(it)
