"""The Criteo Beam pipeline end to end: features, keys, quarantined bad rows, determinism, real samples."""

from __future__ import annotations

import collections
import gzip
import math
import tempfile
import os
import zlib
from pathlib import Path

import apache_beam as beam
import fsspec
import numpy as np
import pytest
import webdataset as wds
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from codistill.datasets.criteo import CriteoConfig
from codistill.dataset import MANIFEST_NAME, DatasetManifest, join, load_manifest
from codistill.verify import verify_dataset
from pipelines.criteo import CriteoToShards, HeaderError, ParseRange, parse_block, schema
from pipelines.sinks import layout_for
from pipelines.formats import read_shard
from pipelines.run import OutputExistsError
from pipelines.synth_criteo import generate_criteo
from pipelines.textfiles import LineBlock, plan_ranges

from conftest import (FAULTS, RUNNER, RawCriteo, assert_row_matches, assert_tfrecord_package_agrees, criteo_config,
                      expected_row, list_files, make_criteo_file, read_bytes, read_rejected, read_rows, run_criteo,
                      shard_bytes, write_bytes)

BUCKETS = 1000  # conftest's default data.criteo.cat_buckets


def rejected_triples(root: str) -> set[tuple[str, int, str]]:
    return {(r["source"], r["line"], r["reason"]) for r in read_rejected(root)}


def expected_rejections(*files: RawCriteo) -> set[tuple[str, int, str]]:
    return {(f.name, line, reason) for f in files for line, reason in f.rejected.items()}


def assert_accounted(manifest, *files: RawCriteo) -> None:
    """Rows in = rows written + rows rejected, per source and in total."""
    assert {i["source"]: i["rows"] for i in manifest.inputs} == {f.name: f.rows for f in files}
    assert manifest.input_rows == manifest.written_rows + sum(manifest.rejected.values())
    assert manifest.written_rows == sum(len(f.good_lines) for f in files)


# --- a dataset built from inputs with every kind of fault ---------------------------------------------------

CUT_MID_ROW = "cut_mid_row"  # only meaningful as a file's last line, without a newline


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """Three inputs (plain, gzip, and a plain file whose last row is cut), every fault injected, keep_raw on."""
    raw = tmp_path_factory.mktemp("raw")
    every_fault = {3 + 17 * i: name for i, name in enumerate(sorted(set(FAULTS) - {CUT_MID_ROW}))}
    files = [
        make_criteo_file(str(raw / "part-a.tsv"), 300, {1: "bad_label", **every_fault, 300: "empty_line"}, seed=1),
        make_criteo_file(str(raw / "part-b.txt.gz"), 200, {10: "bad_hex", 11: "carriage_return", 200: "non_ascii"},
                         seed=2, compress=True),
        make_criteo_file(str(raw / "part-c.tsv"), 50, {50: CUT_MID_ROW}, seed=3, final_newline=False),
    ]
    out = str(tmp_path_factory.mktemp("faulty") / "ds")
    manifest = run_criteo(f"{raw}/part-*", out, criteo={"keep_raw": True})
    return files, manifest, out, read_rows(out)


def test_every_row_is_written_or_rejected(faulty):
    files, manifest, _, rows = faulty
    assert_accounted(manifest, *files)
    assert len(rows) == manifest.written_rows


def test_every_good_row_is_written_under_its_key(faulty):
    files, _, _, rows = faulty
    assert set(rows) == set().union(*(f.good_keys for f in files))
    assert "part-a.tsv:2" in rows and "part-b.txt.gz:1" in rows and "part-c.tsv:49" in rows  # 1-based lines
    assert "part-a.tsv:1" not in rows and "part-c.tsv:50" not in rows  # rejected ones


def test_every_bad_row_is_quarantined_with_its_reason(faulty):
    files, manifest, out, _ = faulty
    assert rejected_triples(out) == expected_rejections(*files)
    counts = collections.Counter(reason for f in files for reason in f.rejected.values())
    assert manifest.rejected == dict(counts)
    fs, base = fsspec.core.url_to_fs(out)
    assert sorted(os.path.basename(p) for p in fs.ls(f"{base}/rejected")) == [
        "part-a.tsv.jsonl", "part-b.txt.gz.jsonl", "part-c.tsv.jsonl"]


def test_rejected_records_carry_the_raw_line_and_a_detail(faulty):
    files, _, out, _ = faulty
    by_name = {f.name: f for f in files}
    records = read_rejected(out)
    for record in records:
        assert set(record) == {"source", "line", "reason", "detail", "raw"}
        assert record["detail"], record
        line = by_name[record["source"]].lines[record["line"] - 1]
        assert record["raw"] == line.decode("utf-8", "backslashreplace"), record
    lines = [r["line"] for r in records if r["source"] == "part-a.tsv"]
    assert lines == sorted(lines), "rejected rows of a source are in line order"


def test_features_match_a_hand_computation_for_every_good_row(faulty):
    files, _, _, rows = faulty
    for f in files:
        for line in f.good_lines:
            key = f.key(line)
            assert_row_matches(rows[key], expected_row(f.text(line)), BUCKETS, key)


def test_equal_categorical_values_get_equal_ids_per_column(faulty):
    _, _, _, rows = faulty
    seen = {}
    for key, row in rows.items():
        for column, (raw, cat) in enumerate(zip(row["cat_raw"].tolist(), row["cat"].tolist())):
            assert seen.setdefault((column, raw), cat) == cat, f"{key} C{column + 1}={raw:08x}"
    # the same value in different columns is hashed with a different key
    ids = {seen[(c, 0xDEADBEEF)] for c in range(26) if (c, 0xDEADBEEF) in seen}
    assert len(ids) > 10


def test_keys_are_in_exactly_one_split_and_group(faulty):
    _, manifest, _, rows = faulty
    places = collections.Counter((row["split"], row["group"]) for row in rows.values())
    assert set(places) == {("eval", None), ("train", 0), ("train", 1)}
    assert places[("eval", None)] == pytest.approx(0.2 * len(rows), abs=0.08 * len(rows))
    assert sum(places.values()) == manifest.written_rows


def test_manifest_describes_the_dataset(faulty):
    files, manifest, out, _ = faulty
    assert manifest.dataset == "criteo" and manifest.format == "tfrecord" and manifest.groups == 2
    assert set(manifest.features) == {"key", "label", "dense", "cat", "int_raw", "cat_raw"}
    assert manifest.features["dense"].shape == (13,) and manifest.features["cat"].dtype == "int32"
    assert [s.path for s in manifest.shards] == [
        "eval/criteo-00000-of-00001.tfrecord",
        "train/0/criteo-00000-of-00002.tfrecord", "train/0/criteo-00001-of-00002.tfrecord",
        "train/1/criteo-00000-of-00002.tfrecord", "train/1/criteo-00001-of-00002.tfrecord"]
    assert manifest.parameters["groups"] == 2 and manifest.parameters["seed"] == 5
    assert manifest.parameters["criteo"]["keep_raw"] is True
    assert [os.path.basename(p) for p in manifest.parameters["input"]] == [f.name for f in files]
    for shard in manifest.shards:
        assert os.path.getsize(join(out, shard.path)) == shard.bytes


def test_manifest_is_written_last_and_nothing_temporary_remains(faulty):
    _, manifest, out, _ = faulty
    files = list_files(out)
    assert not [f for f in files if "/." in f or f.startswith(".")], f"temporary files remain: {files}"
    assert set(files) == {MANIFEST_NAME} | {s.path for s in manifest.shards} | {
        f"rejected/{name}.jsonl" for name in ("part-a.tsv", "part-b.txt.gz", "part-c.tsv")}
    manifest_time = os.stat(join(out, MANIFEST_NAME)).st_mtime_ns
    assert all(os.stat(join(out, f)).st_mtime_ns <= manifest_time for f in files)


def test_pipeline_manifest_round_trips(faulty):
    _, manifest, out, _ = faulty
    text = (Path(out) / MANIFEST_NAME).read_text()
    assert DatasetManifest.from_json(text, "m").to_json() == text
    assert DatasetManifest.from_json(text, "m") == manifest == load_manifest(out)


def test_faulty_dataset_verifies(faulty):
    _, manifest, out, _ = faulty
    report = verify_dataset(out)
    assert report.ok, report.problems
    assert report.rows == manifest.written_rows


def test_pipeline_shards_read_back_with_the_tfrecord_package(faulty):
    _, manifest, out, _ = faulty
    for shard in manifest.shards:
        assert_tfrecord_package_agrees(join(out, shard.path), manifest.features)


def test_pipeline_webdataset_shards_read_back_with_webdataset(tmp_path, criteo_file):
    raw = criteo_file(str(tmp_path / "in.tsv"), 120, {5: "bad_label"})
    out = str(tmp_path / "ds")
    manifest = run_criteo(raw.url, out, format="webdataset")
    assert [s.path.rsplit(".", 1)[1] for s in manifest.shards] == ["tar"] * 5
    assert set(manifest.features) == {"key", "label", "dense", "cat"}  # no raw features without keep_raw
    keys = set()
    for shard in manifest.shards:
        url = join(out, shard.path)
        ours = list(read_shard(url, manifest.features, "webdataset", expect_sha256=shard.sha256))
        samples = list(wds.WebDataset(url, shardshuffle=False).decode())
        assert len(samples) == len(ours)
        for sample, block in zip(samples, ours):
            assert "." not in sample["__key__"]
            for name in manifest.features:
                np.testing.assert_array_equal(sample[f"{name}.npy"], block[name])
            keys |= set(sample["key.npy"].tolist())
    assert keys == {k.encode() for k in raw.good_keys}
    assert verify_dataset(out).ok


# --- features by hand ---------------------------------------------------------------------------------------

HAND_ROWS = [
    # label, I1..I13, C1..C26
    ["1", "0", "-1", "260", "", "5", "-2", "1000000", "", "", "", "", "", "1"]
    + ["00000000"] + [""] * 24 + ["ffffffff"],
    ["0"] + [""] * 13 + [""] * 26,
]


def test_hand_computed_features(tmp_path):
    path = tmp_path / "hand.txt"
    path.write_bytes(b"".join("\t".join(r).encode() + b"\n" for r in HAND_ROWS))
    out = str(tmp_path / "ds")
    run_criteo(str(path), out, criteo={"keep_raw": True, "cat_buckets": [50]})
    rows = read_rows(out)
    assert set(rows) == {"hand.txt:1", "hand.txt:2"}
    first, second = rows["hand.txt:1"], rows["hand.txt:2"]
    assert first["label"] == np.float32(1.0) and second["label"] == np.float32(0.0)
    np.testing.assert_allclose(first["dense"], [0.0, -math.log(2), math.log(261), 0.0, math.log(6), -math.log(3),
                                                math.log(1000001), 0, 0, 0, 0, 0, math.log(2)], rtol=1e-6)
    assert first["int_raw"].tolist() == [0, -1, 260, -2**63, 5, -2, 1000000] + [-2**63] * 5 + [1]
    assert first["cat_raw"].tolist() == [0] + [-1] * 24 + [0xFFFFFFFF]
    assert 1 <= first["cat"][0] <= 49 and 1 <= first["cat"][25] <= 49
    assert first["cat"][1:25].tolist() == [0] * 24
    np.testing.assert_array_equal(second["dense"], np.zeros(13, np.float32))
    assert second["cat"].tolist() == [0] * 26
    assert second["int_raw"].tolist() == [-2**63] * 13 and second["cat_raw"].tolist() == [-1] * 26


def parse_file(raw: RawCriteo, seed: int = 0, **criteo):
    """Parse a whole raw file as one block, without Beam (the feature transform alone)."""
    return parse_block(LineBlock(raw.name, 1, b"\n".join(raw.lines) + b"\n"), CriteoConfig(**criteo), seed)


def test_two_buckets_put_every_present_value_in_bucket_one(tmp_path, criteo_file):
    raw = criteo_file(str(tmp_path / "in.tsv"), 60)
    parsed = parse_file(raw, cat_buckets=(2,))
    assert parsed.lines.tolist() == list(range(1, 61))
    for line, cat in zip(parsed.lines.tolist(), parsed.block["cat"]):
        assert cat.tolist() == [0 if m else 1 for m in expected_row(raw.text(line)).cat_missing]


def test_per_column_buckets_bound_each_column(tmp_path, criteo_file):
    raw = criteo_file(str(tmp_path / "in.tsv"), 200)
    buckets = tuple(2 + 3 * j for j in range(26))
    cats = parse_file(raw, cat_buckets=buckets).block["cat"]
    assert cats.dtype == np.int32 and cats.shape == (200, 26)
    assert (cats >= 0).all() and (cats < np.array(buckets)).all()
    assert (cats.max(axis=0) > 0).all()


def test_categorical_ids_are_keyed_by_the_data_seed(tmp_path, criteo_file):
    raw = criteo_file(str(tmp_path / "in.tsv"), 100)
    a, b = parse_file(raw, seed=1).block["cat"], parse_file(raw, seed=2).block["cat"]
    np.testing.assert_array_equal(a, parse_file(raw, seed=1).block["cat"])
    np.testing.assert_array_equal(a == 0, b == 0)
    assert (a != b).sum() > 0.9 * (a > 0).sum()


def test_plus_signed_integer_does_not_stop_the_pipeline():
    """`+5` passes the integer regex but Arrow cannot cast it: the row must be kept (as 5) or rejected, not crash."""
    good = "\t".join(["1", "5"] + ["1"] * 12 + ["0123abcd"] * 26)
    plus = "\t".join(["1", "+5"] + ["1"] * 12 + ["0123abcd"] * 26)
    parsed = parse_block(LineBlock("f.txt", 1, f"{good}\n{plus}\n".encode()), CriteoConfig(), 0)
    kept = parsed.lines.tolist()
    assert kept == [1, 2] or (kept == [1] and [(r.line, r.reason) for r in parsed.rejected] == [(2, "bad_integer")])
    if kept == [1, 2]:
        np.testing.assert_array_equal(parsed.block["dense"][1], parsed.block["dense"][0])


def test_csv_dialect_integers_may_carry_a_zero_fraction():
    row = ",".join(["1", "260.0", "-1.0", "7.", "", "3.5"] + ["0"] * 8 + ["0123abcd"] * 26)
    parsed = parse_block(LineBlock("f.csv", 2, f"{row}\n".encode()),
                         CriteoConfig(dialect="csv", keep_raw=True), 0)
    assert [(r.line, r.reason) for r in parsed.rejected] == [(2, "bad_integer")]  # 3.5 is not an integer
    row = row.replace("3.5", "3.0")
    parsed = parse_block(LineBlock("f.csv", 2, f"{row}\n".encode()), CriteoConfig(dialect="csv", keep_raw=True), 0)
    assert parsed.rejected == []
    assert parsed.block["int_raw"][0, :5].tolist() == [260, -1, 7, -2**63, 3]


# --- inputs: gzip, many files, memory:// --------------------------------------------------------------------


def test_many_plain_and_gzip_files_in_memory_match_local_files(tmp_path, memory_root):
    spec = [("d0.txt", 80, False), ("d1.txt.gz", 70, True), ("d2.txt", 1, False), ("d3.txt.gz", 45, True)]
    made = {}
    for root in (str(tmp_path / "raw"), f"{memory_root}/raw"):
        made[root] = [make_criteo_file(f"{root}/{name}", rows, {rows: "bad_hex"} if rows > 1 else {}, seed=rows,
                                       compress=gz) for name, rows, gz in spec]
    local = run_criteo(f"{tmp_path}/raw/d*", str(tmp_path / "ds"))
    memory = run_criteo(f"{memory_root}/raw/d*", f"{memory_root}/ds")
    files = made[f"{memory_root}/raw"]
    assert_accounted(memory, *files)
    assert set(read_rows(f"{memory_root}/ds")) == set().union(*(f.good_keys for f in files))
    assert rejected_triples(f"{memory_root}/ds") == expected_rejections(*files)
    assert verify_dataset(f"{memory_root}/ds").ok
    assert local.shards == memory.shards  # same sha256: the protocol is not part of any key
    assert shard_bytes(str(tmp_path / "ds")) == shard_bytes(f"{memory_root}/ds")


def test_comma_separated_inputs(tmp_path, criteo_file):
    a = criteo_file(str(tmp_path / "a.tsv"), 30, seed=1)
    b = criteo_file(str(tmp_path / "b.tsv"), 20, seed=2)
    manifest = run_criteo(f"{a.url},{b.url}", str(tmp_path / "ds"))
    assert_accounted(manifest, a, b)


def test_truncated_gzip_keeps_the_rows_before_the_cut(tmp_path, criteo_file):
    whole = criteo_file(str(tmp_path / "whole.txt.gz"), 400, compress=True)
    data = read_bytes(whole.url)
    cut = data[:len(data) * 6 // 10]
    recoverable = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(cut)
    complete = recoverable.count(b"\n")
    assert 100 < complete < 390
    path = tmp_path / "in" / "cut.txt.gz"
    write_bytes(str(path), cut)
    out = str(tmp_path / "ds")
    manifest = run_criteo(str(path), out)
    records = read_rejected(out)
    assert [(r["reason"], r["line"]) for r in records] == [("truncated_file", complete + 1)]
    assert "EOFError" in records[0]["detail"] or "ended" in records[0]["detail"]
    assert manifest.rejected == {"truncated_file": 1}
    assert set(read_rows(out)) == {f"cut.txt.gz:{n}" for n in range(1, complete + 1)}
    assert manifest.input_rows == complete + 1 == manifest.written_rows + 1


def test_plain_file_cut_mid_row_rejects_only_the_last_row(tmp_path, criteo_file):
    raw = criteo_file(str(tmp_path / "cut.tsv"), 40, {40: CUT_MID_ROW}, final_newline=False)
    out = str(tmp_path / "ds")
    manifest = run_criteo(raw.url, out)
    assert rejected_triples(out) == {("cut.tsv", 40, "field_count")}
    assert set(read_rows(out)) == raw.good_keys and len(raw.good_keys) == 39
    assert_accounted(manifest, raw)


def test_last_row_without_newline_is_kept(tmp_path, criteo_file):
    raw = criteo_file(str(tmp_path / "nonl.tsv"), 10, final_newline=False)
    run_criteo(raw.url, str(tmp_path / "ds"))
    assert raw.key(10) in read_rows(str(tmp_path / "ds"))


@pytest.mark.parametrize("fmt", ["tfrecord", "webdataset"])
@pytest.mark.parametrize("content", [b"", gzip.compress(b"", mtime=0)], ids=["empty_plain", "empty_gzip"])
def test_empty_input_gives_a_valid_empty_dataset(tmp_path, fmt, content):
    path = tmp_path / ("empty.txt.gz" if content else "empty.txt")
    path.write_bytes(content)
    out = str(tmp_path / "ds")
    manifest = run_criteo(str(path), out, format=fmt)
    assert manifest.input_rows == 0 and manifest.written_rows == 0 and manifest.rejected == {}
    assert manifest.inputs == ({"source": path.name, "rows": 0},)
    assert len(manifest.shards) == 5 and all(s.records == 0 for s in manifest.shards)
    report = verify_dataset(out)
    assert report.ok, report.problems


def test_only_bad_rows_gives_an_empty_dataset_and_all_rejections(tmp_path, criteo_file):
    raw = criteo_file(str(tmp_path / "bad.tsv"), 4, {1: "empty_line", 2: "bad_label", 3: "non_ascii", 4: "bad_hex"})
    out = str(tmp_path / "ds")
    manifest = run_criteo(raw.url, out)
    assert manifest.written_rows == 0
    assert manifest.rejected == {"field_count": 1, "bad_label": 1, "undecodable": 1, "bad_categorical": 1}
    assert verify_dataset(out).ok


def test_gzip_that_is_not_gzip_is_quarantined_not_lost(tmp_path, criteo_file):
    criteo_file(str(tmp_path / "src.tsv"), 5)
    fake = tmp_path / "in" / "fake.txt.gz"
    fake.parent.mkdir()
    fake.write_bytes((tmp_path / "src.tsv").read_bytes())
    out = str(tmp_path / "ds")
    manifest = run_criteo(str(fake), out)
    assert manifest.written_rows == 0
    assert manifest.input_rows == sum(manifest.rejected.values()) >= 1
    assert all(r["source"] == "fake.txt.gz" for r in read_rejected(out))


def test_binary_file_as_input_is_quarantined_line_by_line(tmp_path, criteo_file):
    """A compressed file without a .gz name is garbage to the TSV parser: every line rejected, nothing lost."""
    criteo_file(str(tmp_path / "src.txt.gz"), 200, compress=True)
    garbage = tmp_path / "in" / "looks-plain.tsv"
    garbage.parent.mkdir()
    garbage.write_bytes((tmp_path / "src.txt.gz").read_bytes())
    out = str(tmp_path / "ds")
    manifest = run_criteo(str(garbage), out)
    lines = garbage.read_bytes().count(b"\n") + (not garbage.read_bytes().endswith(b"\n"))
    assert manifest.written_rows == 0
    assert manifest.input_rows == sum(manifest.rejected.values()) == lines
    assert {r["line"] for r in read_rejected(out)} == set(range(1, lines + 1))
    assert set(manifest.rejected) <= {"undecodable", "field_count"}


# --- whole files as the eval split ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def days(tmp_path_factory):
    """Three day files in the 1TB logs' naming (day_23 gzip), each with a bad row."""
    raw = tmp_path_factory.mktemp("days")
    return raw, [make_criteo_file(str(raw / "day_0"), 120, {7: "bad_label"}, seed=1),
                 make_criteo_file(str(raw / "day_1"), 90, {8: "bad_hex"}, seed=2),
                 make_criteo_file(str(raw / "day_23.gz"), 60, {9: "empty_line"}, seed=3, compress=True)]


def test_eval_files_are_the_whole_eval_split(days, tmp_path):
    """Every row of day_23* is in the eval split and no other row is; the rest split over both groups; verify
    recomputes that placement."""
    raw, files = days
    out = str(tmp_path / "ds")
    manifest = run_criteo(f"{raw}/day_*", out, criteo={"eval_files": ["day_23*"]})
    assert_accounted(manifest, *files)
    rows = read_rows(out)
    assert {k for k, r in rows.items() if r["split"] == "eval"} == files[2].good_keys
    train = [r for k, r in rows.items() if not k.startswith("day_23")]
    assert all(r["split"] == "train" for r in train) and {r["group"] for r in train} == {0, 1}
    assert manifest.settings.criteo.eval_files == ("day_23*",)
    assert verify_dataset(out).ok


def test_without_eval_files_the_same_inputs_split_by_hash(days, tmp_path):
    raw, files = days
    out = str(tmp_path / "ds")
    run_criteo(f"{raw}/day_*", out)
    split_of = {k: r["split"] for k, r in read_rows(out).items()}
    assert {split_of[k] for k in files[2].good_keys} == {"eval", "train"}
    assert "eval" in {split_of[k] for k in files[0].good_keys}


def test_eval_files_flag_on_the_command_line(days, tmp_path):
    from click.testing import CliRunner

    from codistill.cli import main

    raw, files = days
    out = tmp_path / "ds"
    result = CliRunner().invoke(main, ["preprocess", "criteo", "--input", f"{raw}/day_*", "--output", str(out),
                                       "--cat-buckets", "1000", "--eval-files", "day_23*"])
    assert result.exit_code == 0, result.output
    assert "every row of the input files matching day_23*" in result.output
    manifest = load_manifest(str(out))
    assert sum(s.records for s in manifest.shards if s.split == "eval") == len(files[2].good_lines)


@pytest.mark.parametrize(("patterns", "error"), [
    (["day_99*"], "matches none of the 3 input file"), (["day_*"], "matches every input file"),
    (["raw/day_23"], "no folder")])
def test_eval_files_that_leave_a_split_empty_are_refused(days, tmp_path, patterns, error):
    raw, _ = days
    with pytest.raises(ValueError, match=error):
        run_criteo(f"{raw}/day_*", str(tmp_path / "ds"), criteo={"eval_files": patterns})
    assert not (tmp_path / "ds" / MANIFEST_NAME).exists()


# --- user errors before any work -------------------------------------------------------------------------------


def test_no_matching_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no input files match"):
        run_criteo(str(tmp_path / "nothing-*.tsv"), str(tmp_path / "ds"))
    with pytest.raises(FileNotFoundError, match="no input files match"):
        run_criteo(str(tmp_path / "missing.tsv"), str(tmp_path / "ds"))


def test_duplicate_input_basenames_are_a_clear_error(tmp_path, criteo_file):
    criteo_file(str(tmp_path / "a" / "day.tsv"), 3)
    criteo_file(str(tmp_path / "b" / "day.tsv"), 3)
    with pytest.raises(ValueError, match=r"must be unique.*day\.tsv"):
        run_criteo(f"{tmp_path}/*/day.tsv", str(tmp_path / "ds"))


def test_directory_as_input_is_a_clear_error(tmp_path, criteo_file):
    """A directory is not a Criteo file: say so, instead of quarantining it as a `truncated_file` row."""
    criteo_file(str(tmp_path / "raw" / "day.tsv"), 3)
    with pytest.raises((ValueError, OSError)):
        run_criteo(str(tmp_path / "raw"), str(tmp_path / "ds"))


def test_non_empty_output_needs_overwrite(tmp_path, criteo_file):
    raw = criteo_file(str(tmp_path / "in.tsv"), 10)
    out = tmp_path / "ds"
    (out / "train").mkdir(parents=True)  # what an interrupted earlier run left
    (out / "train" / "stale.txt").write_text("old")
    with pytest.raises(OutputExistsError, match="exists and is not empty.*--overwrite"):
        run_criteo(raw.url, str(out))
    assert (out / "train" / "stale.txt").exists()
    run_criteo(raw.url, str(out), overwrite=True)
    assert not (out / "train" / "stale.txt").exists() and (out / MANIFEST_NAME).exists()


def test_empty_output_directory_is_fine(tmp_path, criteo_file):
    raw = criteo_file(str(tmp_path / "in.tsv"), 10)
    (tmp_path / "ds").mkdir()
    assert run_criteo(raw.url, str(tmp_path / "ds")).written_rows == 10


# --- determinism ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_input(tmp_path_factory):
    """A ~360 KB plain file (several split ranges at 64 KB) with bad rows on both sides of range boundaries,
    and a gzip."""
    root = tmp_path_factory.mktemp("big")
    generate_criteo(str(root / "gen"), 1500, files=1, seed=4)
    lines = (root / "gen" / "train-00000-of-00001.txt").read_bytes().split(b"\n")[:-1]
    bad = {2: b"x", 400: b"", 401: lines[400] + b"\r", 777: lines[777].replace(b"\t", b"\t\t", 1), 1500: b"1\t2"}
    for line, text in bad.items():
        lines[line - 1] = text
    (root / "in").mkdir()
    (root / "in" / "big.tsv").write_bytes(b"\n".join(lines) + b"\n")
    small = make_criteo_file(str(root / "in" / "small.txt.gz"), 100, {50: "bad_hex"}, compress=True)
    return root / "in", len(lines), set(bad), small


def test_split_input_is_read_in_several_ranges(big_input):
    in_dir, _, _, _ = big_input
    ranges = plan_ranges(str(in_dir / "big.tsv"), 1 << 16)
    assert len(ranges) >= 4
    data = (in_dir / "big.tsv").read_bytes()
    assert all(data[r.start - 1:r.start] == b"\n" for r in ranges[1:]), "ranges start at line starts"
    assert [r.end for r in ranges[:-1]] == [r.start for r in ranges[1:]] and ranges[-1].end is None


@pytest.mark.parametrize("fmt", ["tfrecord", "webdataset"])
def test_split_bytes_does_not_change_the_shards(big_input, tmp_path, fmt):
    in_dir, n_lines, bad, small = big_input
    whole = run_criteo(f"{in_dir}/*", str(tmp_path / "whole"), format=fmt)
    split = run_criteo(f"{in_dir}/*", str(tmp_path / "split"), format=fmt, split_bytes=1 << 16)
    assert split.parameters["split_bytes"] == 1 << 16
    assert whole.shards == split.shards
    assert shard_bytes(str(tmp_path / "whole")) == shard_bytes(str(tmp_path / "split"))
    keys = set(read_rows(str(tmp_path / "split")))
    assert keys == {f"big.tsv:{n}" for n in range(1, n_lines + 1) if n not in bad} | small.good_keys
    assert {(r["source"], r["line"]) for r in read_rejected(str(tmp_path / "split"))} == (
        {("big.tsv", n) for n in bad} | {("small.txt.gz", 50)})


def test_same_bytes_with_one_worker_and_with_two_processes(big_input, tmp_path):
    in_dir, _, _, _ = big_input
    one = run_criteo(f"{in_dir}/*", str(tmp_path / "one"), split_bytes=1 << 16)
    two = run_criteo(f"{in_dir}/*", str(tmp_path / "two"), split_bytes=1 << 16,
                     beam_args=[RUNNER, "--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    assert [(s.path, s.sha256, s.bytes, s.records) for s in one.shards] == \
           [(s.path, s.sha256, s.bytes, s.records) for s in two.shards]
    assert one.rejected == two.rejected and one.inputs == two.inputs
    assert shard_bytes(str(tmp_path / "one")) == shard_bytes(str(tmp_path / "two"))
    assert verify_dataset(str(tmp_path / "two")).ok


def test_block_rows_changes_records_not_rows(big_input, tmp_path):
    in_dir, _, _, _ = big_input
    a = run_criteo(f"{in_dir}/small.txt.gz", str(tmp_path / "a"), block_rows=7)
    b = run_criteo(f"{in_dir}/small.txt.gz", str(tmp_path / "b"), block_rows=1000)
    assert [s.records for s in a.shards] == [s.records for s in b.shards]
    ra, rb = read_rows(str(tmp_path / "a")), read_rows(str(tmp_path / "b"))
    assert ra.keys() == rb.keys()
    for key in ra:
        np.testing.assert_array_equal(ra[key]["dense"], rb[key]["dense"])


# --- the real samples in ../shared/data ------------------------------------------------------------------------


def test_header_csv_export_reads_with_the_csv_dialect(criteo_samples, tmp_path):
    path = criteo_samples["csv"]
    out = str(tmp_path / "ds")
    manifest = run_criteo(str(path), out, criteo={"dialect": "csv", "keep_raw": True})
    assert manifest.written_rows == 200 and manifest.rejected == {} and manifest.input_rows == 200
    rows = read_rows(out)
    assert set(rows) == {f"{path.name}:{n}" for n in range(2, 202)}  # line 1 is the header
    text = path.read_text().splitlines()
    first = rows[f"{path.name}:2"]
    assert_row_matches(first, expected_row(text[1], ","), BUCKETS)
    # line 2: 0,,3,260.0,,17668.0,,,33.0,,,,0.0,,05db9164,...
    assert first["label"] == 0.0
    np.testing.assert_allclose(first["dense"][:5], [0, math.log(4), math.log(261), 0, math.log(17669)], rtol=1e-6)
    assert first["int_raw"][11] == 0 and first["cat_raw"][0] == 0x05DB9164
    for n in (50, 201):
        assert_row_matches(rows[f"{path.name}:{n}"], expected_row(text[n - 1], ","), BUCKETS)


def test_header_csv_split_into_ranges_keeps_physical_line_numbers(criteo_samples, tmp_path):
    """A header CSV big enough to be read in several ranges: same keys (from line 2) and bytes as one range."""
    text = criteo_samples["csv"].read_bytes()
    header, body = text.split(b"\n", 1)
    path = tmp_path / "in" / "big.csv"
    path.parent.mkdir()
    path.write_bytes(header + b"\n" + body * 3)
    assert len(plan_ranges(str(path), 1 << 16)) >= 2
    whole = run_criteo(str(path), str(tmp_path / "whole"), criteo={"dialect": "csv"})
    split = run_criteo(str(path), str(tmp_path / "split"), criteo={"dialect": "csv"}, split_bytes=1 << 16)
    assert split.written_rows == 600 and split.rejected == {}
    assert set(read_rows(str(tmp_path / "split"))) == {f"big.csv:{n}" for n in range(2, 602)}
    assert whole.shards == split.shards


def test_header_csv_read_as_tsv_tells_the_user_to_use_dialect_csv(criteo_samples, tmp_path):
    out = tmp_path / "ds"
    with pytest.raises(HeaderError, match="dialect csv"):
        run_criteo(str(criteo_samples["csv"]), str(out))
    assert not (out / MANIFEST_NAME).exists()


@pytest.mark.parametrize("name", ["test.txt", "test.txt.gz"])
def test_kaggle_test_txt_is_refused_from_its_first_line(tmp_path, name, monkeypatch):
    """test.txt is train.txt without the label column (39 fields): refused on the driver with a hint, before any
    row is read into rejected/, and without leaving Beam's temp directory behind (the pipeline never ran)."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    generate_criteo(str(tmp_path / "gen"), 2000, files=1, seed=6)
    lines = (tmp_path / "gen" / "train-00000-of-00001.txt").read_bytes().splitlines()
    unlabelled = b"".join(line.split(b"\t", 1)[1] + b"\n" for line in lines)
    path = tmp_path / "in" / name
    path.parent.mkdir()
    path.write_bytes(gzip.compress(unlabelled, mtime=0) if name.endswith(".gz") else unlabelled)
    out = tmp_path / "ds"
    with pytest.raises(HeaderError, match=r"39 fields, not 40: this looks like the Kaggle test\.txt.*give train\.txt"):
        run_criteo(str(path), str(out))
    assert not (out / "rejected").exists() and not (out / MANIFEST_NAME).exists()
    assert list((tmp_path / "tmp").iterdir()) == []


def test_tsv_read_with_the_csv_dialect_is_a_clear_error(criteo_samples, tmp_path):
    with pytest.raises(HeaderError, match="dialect csv expects the header line"):
        run_criteo(str(criteo_samples["tsv"]), str(tmp_path / "ds"), criteo={"dialect": "csv"})


def test_real_kaggle_sample_conforms(criteo_samples, tmp_path):
    path = criteo_samples["tsv"]
    assert not path.read_bytes().endswith(b"\n")
    out = str(tmp_path / "ds")
    manifest = run_criteo(str(path), out, criteo={"keep_raw": True})
    assert manifest.written_rows == 100 and manifest.rejected == {} and manifest.input_rows == 100
    rows = read_rows(out)
    assert set(rows) == {f"{path.name}:{n}" for n in range(1, 101)}
    assert sum(float(r["label"]) for r in rows.values()) == 29
    # line 1: 0 <empty> 0 5 4 13275 14 35 4 41 <empty> 4 0 4 | 05db9164 ... C22 empty ... 731c3655
    first = rows[f"{path.name}:1"]
    assert first["label"] == 0.0
    np.testing.assert_allclose(first["dense"], [0, 0, math.log(6), math.log(5), math.log(13276), math.log(15),
                                                math.log(36), math.log(5), math.log(42), 0, math.log(5), 0,
                                                math.log(5)], rtol=1e-6)
    assert first["cat_raw"][0] == 0x05DB9164 and first["cat_raw"][25] == 0x731C3655
    assert first["cat_raw"][21] == -1 and first["cat"][21] == 0
    lines = path.read_text().split("\n")
    for n in (1, 2, 100):
        assert_row_matches(rows[f"{path.name}:{n}"], expected_row(lines[n - 1]), BUCKETS)
    assert verify_dataset(out).ok


# --- Beam transforms tested as transforms -------------------------------------------------------------------------


def test_parse_range_dofn_outputs(tmp_path, criteo_file):
    raw = criteo_file(str(tmp_path / "in.tsv"), 30, {4: "bad_label", 9: "empty_line", 30: "bad_hex"})
    config = criteo_config(raw.url, str(tmp_path / "ds"))
    data = config.data
    ranges = plan_ranges(raw.url, data.split_bytes)
    with BeamTestPipeline(runner="FnApiRunner") as p:
        out = (p | beam.Create(ranges)
               | beam.ParDo(ParseRange(data, layout_for(data), schema(False)), first_lines={})
               .with_outputs("rejected", "inputs", main="pieces"))
        assert_that(out.rejected | beam.FlatMap(lambda batch: [(r.source, r.line, r.reason) for r in batch]),
                    equal_to(sorted(expected_rejections(raw))), label="rejected")
        assert_that(out.inputs, equal_to([("in.tsv", 30)]), label="inputs")
        assert_that(out.pieces | beam.Map(lambda dp: dp[1].rows) | beam.CombineGlobally(sum),
                    equal_to([27]), label="rows")
        assert_that(out.pieces | beam.Map(lambda dp: 0 <= dp[0] < 5) | beam.Distinct(), equal_to([True]),
                    label="destinations")


def test_criteo_to_shards_transform_yields_the_manifest(tmp_path, criteo_file):
    a = criteo_file(str(tmp_path / "a.tsv"), 25, {3: "non_integer"}, seed=1)
    b = criteo_file(str(tmp_path / "b.txt.gz"), 15, {15: "empty_line"}, seed=2, compress=True)
    out = str(tmp_path / "ds")
    data = criteo_config("unused", out).data
    with BeamTestPipeline(runner="FnApiRunner") as p:
        manifests = p | CriteoToShards([a.url, b.url], data)
        assert_that(manifests | beam.Map(lambda m: (m.input_rows, m.written_rows, m.rejected)),
                    equal_to([(40, 38, {"bad_integer": 1, "field_count": 1})]))
    assert load_manifest(out).written_rows == 38
    assert set(read_rows(out)) == a.good_keys | b.good_keys
