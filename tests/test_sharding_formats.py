"""Keyed-hash sharding, and the two shard formats read back by their upstream readers."""

from __future__ import annotations

import hashlib
import io
import struct
import tarfile

import numpy as np
import pytest
import webdataset as wds
from tfrecord import example_pb2
from tfrecord.writer import TFRecordWriter

from codistill.shards import Feature, ShardFormatError
from pipelines.formats import decode_example, encode_example, frame_record, read_shard, write_shard
from pipelines.sharding import ShardLayout, line_key_hashes, partition, string_hash
from pipelines.sinks import WriteManifestFn

from conftest import assert_tfrecord_package_agrees, list_files, read_bytes, write_bytes

LAYOUT = ShardLayout("criteo", "tfrecord", groups=3, shards_per_group=4, eval_shards=2, eval_fraction=0.1)


# --- keyed-hash assignment -----------------------------------------------------------------------------------


def test_string_hash_is_deterministic_and_keyed():
    assert string_hash("train.txt", 7) == string_hash(b"train.txt", 7)
    assert string_hash("train.txt", 7) != string_hash("train.txt", 8)
    assert string_hash("train.txt", 7) != string_hash("train.txt2", 7)
    assert 0 <= string_hash("x", -1) < 2**64


def test_same_key_and_seed_give_the_same_destination():
    lines = np.arange(1, 5001)
    first = LAYOUT.assign(line_key_hashes("day_0.gz", lines, seed=11))
    again = LAYOUT.assign(line_key_hashes("day_0.gz", lines, seed=11))
    np.testing.assert_array_equal(first, again)
    # one key at a time gives the same answer as the whole block: no dependence on block size
    singles = [LAYOUT.assign(line_key_hashes("day_0.gz", lines[i:i + 1], seed=11))[0] for i in range(0, 5000, 97)]
    np.testing.assert_array_equal(singles, first[::97])


def test_different_seed_gives_a_different_assignment():
    lines = np.arange(1, 20001)
    a = LAYOUT.assign(line_key_hashes("day_0.gz", lines, seed=1))
    b = LAYOUT.assign(line_key_hashes("day_0.gz", lines, seed=2))
    # independent assignments agree with probability sum(p_d^2) ~ 0.1^2/2 + 0.9^2/12 ~ 0.07
    assert (a != b).mean() > 0.8


def test_different_source_gives_a_different_assignment():
    lines = np.arange(1, 20001)
    a = LAYOUT.assign(line_key_hashes("day_0.gz", lines, seed=1))
    b = LAYOUT.assign(line_key_hashes("day_1.gz", lines, seed=1))
    assert (a != b).mean() > 0.8


def test_destinations_are_in_range_and_eval_fraction_is_respected():
    dest = LAYOUT.assign(line_key_hashes("train.txt", np.arange(1, 200_001), seed=3))
    assert dest.min() >= 0 and dest.max() < LAYOUT.destinations == 2 + 3 * 4
    eval_share = (dest < LAYOUT.eval_shards).mean()
    assert eval_share == pytest.approx(0.1, abs=0.005)


def test_groups_and_shards_are_balanced():
    n = 200_000
    dest = LAYOUT.assign(line_key_hashes("train.txt", np.arange(1, n + 1), seed=3))
    counts = np.bincount(dest, minlength=LAYOUT.destinations)
    train = n * 0.9
    groups = counts[2:].reshape(3, 4).sum(axis=1)
    np.testing.assert_allclose(groups, train / 3, rtol=0.02)
    np.testing.assert_allclose(counts[2:], train / 12, rtol=0.05)
    np.testing.assert_allclose(counts[:2], n * 0.1 / 2, rtol=0.05)


def test_eval_split_does_not_depend_on_the_number_of_groups():
    hashes = line_key_hashes("train.txt", np.arange(1, 50_001), seed=9)
    two = ShardLayout("criteo", "tfrecord", 2, 2, 1, 0.2).assign(hashes) < 1
    five = ShardLayout("criteo", "tfrecord", 5, 3, 1, 0.2).assign(hashes) < 1
    np.testing.assert_array_equal(two, five)


def test_one_group_one_shard_layout():
    layout = ShardLayout("criteo", "tar", 1, 1, 1, 0.5)
    dest = layout.assign(line_key_hashes("x", np.arange(1, 1001), seed=0))
    assert set(dest.tolist()) == {0, 1}


def test_destination_paths_follow_the_contract():
    layout = ShardLayout("criteo", "tfrecord", groups=2, shards_per_group=3, eval_shards=2, eval_fraction=0.1)
    paths = [layout.relative_path(d) for d in range(layout.destinations)]
    assert paths == ["eval/criteo-00000-of-00002.tfrecord", "eval/criteo-00001-of-00002.tfrecord",
                     "train/0/criteo-00000-of-00003.tfrecord", "train/0/criteo-00001-of-00003.tfrecord",
                     "train/0/criteo-00002-of-00003.tfrecord", "train/1/criteo-00000-of-00003.tfrecord",
                     "train/1/criteo-00001-of-00003.tfrecord", "train/1/criteo-00002-of-00003.tfrecord"]
    assert layout.describe(0) == ("eval", None, 0)
    assert layout.describe(6) == ("train", 1, 1)


def test_partition_keeps_input_order_within_each_destination():
    dest = np.array([3, 0, 3, 1, 0, 3])
    parts = partition(dest)
    assert [d for d, _ in parts] == [0, 1, 3]
    assert [rows.tolist() for _, rows in parts] == [[1, 4], [3], [0, 2, 5]]
    assert partition(np.array([], np.int64)) == []


# --- shard formats: round trip and reproducibility -----------------------------------------------------------

SCHEMA = {"key": Feature("bytes"), "label": Feature("float32"), "dense": Feature("float32", (13,)),
          "cat": Feature("int32", (26,)), "raw": Feature("int64", (2,))}


def make_blocks(sizes=(5, 3, 7), key_prefix="part-0.txt") -> list[dict]:
    rng = np.random.default_rng(0)
    blocks, line = [], 1
    for size in sizes:
        keys = np.array([f"{key_prefix}:{line + i}".encode() for i in range(size)], dtype=np.bytes_)
        line += size
        blocks.append({"key": keys,
                       "label": rng.integers(0, 2, size).astype(np.float32),
                       "dense": rng.normal(size=(size, 13)).astype(np.float32),
                       "cat": rng.integers(0, 2**31 - 1, (size, 26)).astype(np.int32),
                       "raw": rng.integers(-2**63, 2**63 - 1, (size, 2), dtype=np.int64)})
    return blocks


def assert_blocks_equal(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert set(g) == set(w)
        for name in w:
            assert g[name].dtype.kind == w[name].dtype.kind, name
            np.testing.assert_array_equal(g[name], w[name], err_msg=name)


@pytest.mark.parametrize("fmt", ["tfrecord", "webdataset"])
@pytest.mark.parametrize("where", ["local", "memory"])
def test_shard_round_trips_and_reports_size_and_hash(fmt, where, tmp_path, memory_root):
    root = str(tmp_path) if where == "local" else memory_root
    url = f"{root}/train/0/criteo-00000-of-00001.{'tar' if fmt == 'webdataset' else 'tfrecord'}"
    blocks = make_blocks()
    written = write_shard(url, blocks, SCHEMA, fmt, "train-g0-s00000")
    data = read_bytes(url)
    assert written.records == 15
    assert written.bytes == len(data)
    assert written.sha256 == hashlib.sha256(data).hexdigest()
    assert_blocks_equal(list(read_shard(url, SCHEMA, fmt, expect_sha256=written.sha256)), blocks)
    assert list_files(root) == [url[len(root) + 1:]], "temp files left behind"


@pytest.mark.parametrize("fmt", ["tfrecord", "webdataset"])
def test_same_blocks_give_identical_bytes(fmt, tmp_path):
    a = write_shard(str(tmp_path / "a"), make_blocks(), SCHEMA, fmt, "train-g0-s00000")
    b = write_shard(str(tmp_path / "b"), make_blocks(), SCHEMA, fmt, "train-g0-s00000")
    assert a.sha256 == b.sha256
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


@pytest.mark.parametrize("fmt", ["tfrecord", "webdataset"])
def test_long_and_empty_keys_round_trip(fmt, tmp_path):
    keys = np.array([b"k" * 300, b"x", b"y" * 127, b"z" * 128], dtype=np.bytes_)
    schema = {"key": Feature("bytes"), "v": Feature("float32")}
    blocks = [{"key": keys, "v": np.arange(4, dtype=np.float32)}]
    url = str(tmp_path / "s")
    write_shard(url, blocks, schema, fmt, "p")
    assert_blocks_equal(list(read_shard(url, schema, fmt)), blocks)


@pytest.mark.parametrize("fmt", ["tfrecord", "webdataset"])
def test_shard_with_no_records_reads_back_empty(fmt, tmp_path):
    url = str(tmp_path / "empty")
    written = write_shard(url, [], SCHEMA, fmt, "p")
    assert written.records == 0
    assert list(read_shard(url, SCHEMA, fmt, expect_sha256=written.sha256)) == []


# --- TFRecord: framing and payloads checked with the `tfrecord` package ---------------------------------------


def split_tfrecord(data: bytes) -> list[bytes]:
    """Records of a TFRecord file, checking both masked CRC32Cs with the tfrecord package's own code."""
    payloads, pos = [], 0
    while pos < len(data):
        header = data[pos:pos + 8]
        assert TFRecordWriter.masked_crc(header) == data[pos + 8:pos + 12], f"length CRC at {pos}"
        (size,) = struct.unpack("<Q", header)
        payload = data[pos + 12:pos + 12 + size]
        assert TFRecordWriter.masked_crc(payload) == data[pos + 12 + size:pos + 16 + size], f"payload CRC at {pos}"
        payloads.append(payload)
        pos += 16 + size
    assert pos == len(data)
    return payloads


def example_to_block(payload: bytes) -> dict:
    """Decode one of our Examples with the protobuf classes (not our decoder)."""
    example = example_pb2.Example()
    example.ParseFromString(payload)
    feature = example.features.feature
    rows = len(feature["key"].bytes_list.value)
    return {"key": np.array(list(feature["key"].bytes_list.value), dtype=np.bytes_),
            "label": np.array(feature["label"].float_list.value, np.float32),
            "dense": np.array(feature["dense"].float_list.value, np.float32).reshape(rows, 13),
            "cat": np.frombuffer(feature["cat"].bytes_list.value[0], "<i4").reshape(rows, 26),
            "raw": np.frombuffer(feature["raw"].bytes_list.value[0], "<i8").reshape(rows, 2)}


def test_tfrecord_framing_and_examples_are_valid(tmp_path):
    url = str(tmp_path / "s.tfrecord")
    blocks = make_blocks()
    write_shard(url, blocks, SCHEMA, "tfrecord", "p")
    payloads = split_tfrecord(read_bytes(url))
    assert len(payloads) == len(blocks)
    assert_blocks_equal([example_to_block(p) for p in payloads], blocks)


def test_tfrecord_package_loader_reads_what_read_shard_reads(tmp_path):
    url = str(tmp_path / "s.tfrecord")
    write_shard(url, make_blocks(), SCHEMA, "tfrecord", "p")
    assert_tfrecord_package_agrees(url, SCHEMA)


def test_decoder_reads_examples_built_by_protobuf():
    """Our decoder is not only the inverse of our encoder: it reads Examples the protobuf library wrote."""
    example = example_pb2.Example()
    feature = example.features.feature
    feature["key"].bytes_list.value.extend([b"a:1", b"a:2"])
    feature["label"].float_list.value.extend([0.0, 1.0])
    feature["cat"].bytes_list.value.append(np.array([[1, 2], [3, 4]], "<i4").tobytes())
    schema = {"key": Feature("bytes"), "label": Feature("float32"), "cat": Feature("int32", (2,))}
    block = decode_example(example.SerializeToString(), schema)
    assert block["key"].tolist() == [b"a:1", b"a:2"]
    np.testing.assert_array_equal(block["label"], [0.0, 1.0])
    np.testing.assert_array_equal(block["cat"], [[1, 2], [3, 4]])


# --- WebDataset: upstream conventions and readers -------------------------------------------------------------


def test_webdataset_tar_follows_upstream_conventions(tmp_path):
    url = str(tmp_path / "s.tar")
    write_shard(url, make_blocks(), SCHEMA, "webdataset", "train-g1-s00003")
    with tarfile.open(url) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    keys = [name.split(".", 1)[0] for name in names]
    assert all(m.isfile() for m in members)
    assert all("." not in key and "/" not in key for key in keys)
    # members of a sample are adjacent, samples in order, members sorted within a sample
    runs = [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]
    assert runs == sorted(set(keys)) == [f"train-g1-s00003-{i:06d}" for i in range(3)]
    for key in runs:
        sample = [n for n in names if n.startswith(key + ".")]
        assert sample == sorted(sample) == [f"{key}.{col}.npy" for col in sorted(SCHEMA)]
    assert {m.mtime for m in members} == {0}
    assert {(m.uname, m.gname) for m in members} == {("codistill", "codistill")}


def test_webdataset_library_reads_what_read_shard_reads(tmp_path):
    url = str(tmp_path / "s.tar")
    blocks = make_blocks()
    write_shard(url, blocks, SCHEMA, "webdataset", "train-g0-s00000")
    samples = list(wds.WebDataset(url, shardshuffle=False).decode())
    ours = list(read_shard(url, SCHEMA, "webdataset"))
    assert [s["__key__"] for s in samples] == [f"train-g0-s00000-{i:06d}" for i in range(3)]
    assert_blocks_equal([{name: s[f"{name}.npy"] for name in SCHEMA} for s in samples], ours)
    assert_blocks_equal(ours, blocks)


# --- bad shards: a clear ShardFormatError, never a wrong answer -----------------------------------------------


@pytest.fixture
def tfrecord_shard(tmp_path):
    url = str(tmp_path / "s.tfrecord")
    written = write_shard(url, make_blocks(), SCHEMA, "tfrecord", "p")
    return url, written, read_bytes(url)


@pytest.fixture
def tar_shard(tmp_path):
    url = str(tmp_path / "s.tar")
    written = write_shard(url, make_blocks(), SCHEMA, "webdataset", "train-g0-s00000")
    return url, written, read_bytes(url)


def read_all(url, fmt, schema=SCHEMA, **kwargs):
    return list(read_shard(url, schema, fmt, **kwargs))


@pytest.mark.parametrize("cut, match", [(5, "truncated length header"), (12, "truncated payload"),
                                        (40, "truncated payload"), (-1, "truncated payload"),
                                        (-4, "truncated payload")])
def test_truncated_tfrecord_is_an_error(tfrecord_shard, cut, match):
    url, _, data = tfrecord_shard
    first_record = 16 + struct.unpack("<Q", data[:8])[0]
    cut = cut if cut > 0 else len(data) + cut
    assert cut != first_record
    write_bytes(url, data[:cut])
    with pytest.raises(ShardFormatError, match=match):
        read_all(url, "tfrecord")


@pytest.mark.parametrize("offset, match", [(3, "length CRC mismatch"), (9, "length CRC mismatch"),
                                           (30, "payload CRC mismatch"), (-2, "CRC mismatch")])
def test_flipped_byte_in_tfrecord_is_a_crc_error(tfrecord_shard, offset, match):
    url, _, data = tfrecord_shard
    corrupt = bytearray(data)
    corrupt[offset] ^= 0x01
    write_bytes(url, bytes(corrupt))
    with pytest.raises(ShardFormatError, match=match):
        read_all(url, "tfrecord")


def test_tfrecord_holding_a_tar_is_an_error(tar_shard):
    url, _, _ = tar_shard
    with pytest.raises(ShardFormatError, match="CRC mismatch"):
        read_all(url, "tfrecord")


def test_tfrecord_with_garbage_payload_is_an_error(tmp_path):
    url = str(tmp_path / "g.tfrecord")
    write_bytes(url, frame_record(b"\x08\x96\x01 not an example"))
    with pytest.raises(ShardFormatError, match="wire type"):
        read_all(url, "tfrecord")


def test_tfrecord_missing_a_feature_is_an_error(tfrecord_shard):
    url, _, _ = tfrecord_shard
    with pytest.raises(ShardFormatError, match="no feature 'extra'"):
        read_all(url, "tfrecord", schema=SCHEMA | {"extra": Feature("float32")})


def test_tfrecord_feature_of_the_wrong_type_is_an_error(tfrecord_shard):
    url, _, _ = tfrecord_shard
    with pytest.raises(ShardFormatError, match="'dense' is stored as float_list"):
        read_all(url, "tfrecord", schema=SCHEMA | {"dense": Feature("int32", (13,))})


def test_tfrecord_feature_of_the_wrong_shape_is_an_error(tfrecord_shard):
    url, _, _ = tfrecord_shard
    with pytest.raises(ShardFormatError, match="'cat' has shape"):
        read_all(url, "tfrecord", schema=SCHEMA | {"cat": Feature("int32", (27,))})


@pytest.mark.parametrize("fmt", ["tfrecord", "webdataset"])
def test_sha256_mismatch_is_an_error(fmt, tfrecord_shard, tar_shard):
    url, written, _ = tfrecord_shard if fmt == "tfrecord" else tar_shard
    assert len(read_all(url, fmt, expect_sha256=written.sha256)) == 3
    with pytest.raises(ShardFormatError, match="sha256 .* does not match the manifest"):
        read_all(url, fmt, expect_sha256="0" * 64)


def test_appended_bytes_are_hashed_too(tfrecord_shard):
    url, written, data = tfrecord_shard
    write_bytes(url, data + frame_record(b""))  # a valid, empty extra record
    with pytest.raises(ShardFormatError):
        read_all(url, "tfrecord", expect_sha256=written.sha256)


@pytest.mark.parametrize("payload_name, payload", [
    ("map entry without a value", b"\x0a\x02\x0a\x00"),
    ("feature name not utf-8", encode_example({"key": np.array([b"a"])}, {"key": Feature("bytes")})
     .replace(b"key", b"k\xffy")),
], ids=["map_entry_without_value", "feature_name_not_utf8"])
def test_malformed_but_crc_valid_example_is_a_shard_format_error(tmp_path, payload_name, payload):
    """A record whose CRCs are right but whose protobuf is odd must still be a ShardFormatError
    (verify relies on it)."""
    url = str(tmp_path / "odd.tfrecord")
    write_bytes(url, frame_record(payload))
    with pytest.raises(ShardFormatError):
        read_all(url, "tfrecord", schema={"key": Feature("bytes")})


def test_feature_with_no_value_list_is_a_shard_format_error(tmp_path):
    """A protobuf-written Example whose feature has no kind set (valid proto) must not crash the decoder."""
    example = example_pb2.Example()
    example.features.feature["key"].SetInParent()
    url = str(tmp_path / "nokind.tfrecord")
    write_bytes(url, frame_record(example.SerializeToString()))
    with pytest.raises(ShardFormatError):
        read_all(url, "tfrecord", schema={"key": Feature("bytes")})


def tar_member_offsets(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getmembers()


def test_truncated_tar_inside_a_member_is_an_error(tar_shard):
    url, _, data = tar_shard
    members = tar_member_offsets(data)
    for cut in (100, members[4].offset_data + 10, members[-1].offset_data + 100):
        write_bytes(url, data[:cut])
        with pytest.raises(ShardFormatError, match="bad tar shard"):
            read_all(url, "webdataset")


def test_truncated_tar_between_members_of_a_sample_is_an_error(tar_shard):
    url, _, data = tar_shard
    members = tar_member_offsets(data)
    write_bytes(url, data[:members[2].offset])  # sample 0 lost its third member
    with pytest.raises(ShardFormatError, match="truncated|has no member"):
        read_all(url, "webdataset")


@pytest.mark.parametrize("extra", [0, 200], ids=["at_the_boundary", "inside_the_next_header"])
def test_tar_truncated_at_a_sample_boundary_is_an_error(tar_shard, extra):
    """Cutting a tar right after a whole sample loses rows; the end-of-archive blocks are missing, so it is detectable.

    (Python's tarfile treats EOF at, or inside, a header as the end of the archive; read_shard then silently
    returns fewer rows.)
    """
    url, _, data = tar_shard
    members = tar_member_offsets(data)
    write_bytes(url, data[:members[len(SCHEMA)].offset + extra])  # the first sample (+ part of the next header)
    with pytest.raises(ShardFormatError):
        read_all(url, "webdataset")


def test_tar_missing_a_member_is_an_error(tar_shard, tmp_path):
    url, _, data = tar_shard
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(data)) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for member in src.getmembers():
            if member.name != "train-g0-s00000-000001.dense.npy":
                dst.addfile(member, src.extractfile(member))
    write_bytes(url, out.getvalue())
    with pytest.raises(ShardFormatError, match="'train-g0-s00000-000001' has no member dense.npy"):
        read_all(url, "webdataset")


def test_tar_with_a_corrupt_npy_member_is_an_error(tar_shard):
    url, _, data = tar_shard
    members = tar_member_offsets(data)
    member = next(m for m in members if m.name.endswith(".label.npy"))
    corrupt = bytearray(data)
    corrupt[member.offset_data:member.offset_data + 6] = b"NOTNPY"
    write_bytes(url, bytes(corrupt))
    with pytest.raises(ShardFormatError, match="bad label.npy"):
        read_all(url, "webdataset")


def test_tar_with_a_pickled_npy_is_refused(tmp_path):
    """Shards come from shared buckets: an object array (pickle) must never be loaded."""
    url = str(tmp_path / "pickle.tar")
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo("s-000000.key.npy")
        info.size = len(buf.getvalue())
        tar.addfile(info, io.BytesIO(buf.getvalue()))
    write_bytes(url, out.getvalue())
    with pytest.raises(ShardFormatError, match="bad key.npy"):
        read_all(url, "webdataset", schema={"key": Feature("bytes")})


def test_tar_holding_a_tfrecord_is_an_error(tfrecord_shard):
    url, _, _ = tfrecord_shard
    with pytest.raises(ShardFormatError, match="bad tar shard"):
        read_all(url, "webdataset")


def test_empty_tar_file_is_an_error(tmp_path):
    url = str(tmp_path / "zero.tar")
    write_bytes(url, b"")
    with pytest.raises(ShardFormatError, match="bad tar shard"):
        read_all(url, "webdataset")


def test_garbage_tfrecord_is_an_error(tmp_path):
    url = str(tmp_path / "garbage.tfrecord")
    write_bytes(url, bytes(range(256)) * 4)
    with pytest.raises(ShardFormatError):
        read_all(url, "tfrecord")


# --- the manifest sink -----------------------------------------------------------------------------------------


def test_rerun_manifest_writer_does_not_double_nested_counts(tmp_path):
    # A retried work item reuses the DoFn instance: counts summed into nested `extra` dicts must start afresh.
    layout = ShardLayout("imagenet", "tfrecord", 1, 1, 1, 0.1)
    writer = WriteManifestFn(str(tmp_path), layout, SCHEMA, "tfrecord", parameters={}, extra={"repairs": {}},
                             files={}, indexes=False, tokenizer_sha256=None)
    stats = [{"repairs": {"cmyk_to_rgb": 2}}, {"repairs": {"cmyk_to_rgb": 1}}]
    for _ in range(2):
        (manifest,) = writer.process(None, [], [], [], [], stats, [], [])
        assert manifest.extra["repairs"] == {"cmyk_to_rgb": 3}
    assert writer.extra == {"repairs": {}}
