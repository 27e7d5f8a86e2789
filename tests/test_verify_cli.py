"""`codistill verify`, `codistill synth criteo` and `codistill preprocess criteo`: happy paths and user errors."""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from codistill.cli import main
from codistill.dataset import MANIFEST_NAME, join, load_manifest
from codistill.storage import write_atomically
from codistill.verify import verify_dataset
from pipelines.formats import read_shard, write_shard

from conftest import REPO, make_criteo_file, read_rows, run_criteo


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_ok(result) -> str:
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    return result.output


def assert_user_error(result, *fragments: str) -> str:
    """Non-zero exit, a clean `Error:` line (click's, not an escaped exception), each fragment in it."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), f"escaped exception: {result.exception!r}"
    assert "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in result.output, f"{fragment!r} not in {result.output!r}"
    return result.output


# --- verify ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One small tfrecord dataset (with a few rejected rows) built once; tests tamper with copies."""
    raw = tmp_path_factory.mktemp("raw")
    make_criteo_file(str(raw / "a.tsv"), 150, {7: "bad_label", 20: "empty_line"}, seed=1)
    make_criteo_file(str(raw / "b.txt.gz"), 90, {3: "bad_hex"}, seed=2, compress=True)
    out = tmp_path_factory.mktemp("built") / "ds"
    run_criteo(f"{raw}/*", str(out))
    return out


@pytest.fixture
def dataset(built, tmp_path) -> Path:
    copy = tmp_path / "ds"
    shutil.copytree(built, copy)
    return copy


def rewrite_shard(root: Path, path: str, change) -> None:
    """Replace the blocks of one shard by `change(blocks)` and index the new bytes in the manifest."""
    manifest = load_manifest(str(root))
    blocks = change(list(read_shard(join(str(root), path), manifest.features, manifest.format)))
    written = write_shard(join(str(root), path), blocks, manifest.features, manifest.format, "x")
    shards = tuple(dataclasses.replace(s, records=written.records, bytes=written.bytes, sha256=written.sha256)
                   if s.path == path else s for s in manifest.shards)
    write_atomically(join(str(root), MANIFEST_NAME), dataclasses.replace(manifest, shards=shards).to_json())


def with_first_key(blocks, key: bytes):
    keys = blocks[0]["key"].tolist()
    keys[0] = key
    blocks[0]["key"] = np.array(keys, dtype=np.bytes_)
    return blocks


def fail_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("FAIL ")]


def test_verify_passes_on_a_good_dataset(dataset):
    output = assert_ok(invoke("verify", dataset))
    manifest = load_manifest(str(dataset))
    assert f"OK {dataset}: 5 shards, {manifest.written_rows} rows" in output
    assert re.search(r"^verify: 5/5 shards, 237 of 237 rows, [\d.]+ KB of [\d.]+ KB read, [\d,]+ rows/s, in \d+s$",
                     output, re.MULTILINE), output  # its last progress line
    assert manifest.written_rows == 237 and sum(manifest.rejected.values()) == 3


def test_verify_passes_on_a_webdataset_dataset_in_memory(memory_root):
    make_criteo_file(f"{memory_root}/raw/a.tsv", 60, {5: "bad_label"})
    run_criteo(f"{memory_root}/raw/a.tsv", f"{memory_root}/ds", format="webdataset")
    assert "59 rows" in assert_ok(invoke("verify", f"{memory_root}/ds"))


def test_verify_shows_its_progress_while_it_reads(dataset):
    lines: list[str] = []
    assert verify_dataset(str(dataset), progress=lines.append, every=0).ok  # every=0: a line per block read
    *reading, last = lines
    counts = [re.fullmatch(r"verify: (\d)/5 shards, (\d+) of 237 rows, [\d.]+ KB of ([\d.]+) KB read, [\d,]+ rows/s, "
                           r"(~\d+s left|time left unknown) \(\d+s so far\)", line) for line in reading]
    assert len(reading) >= 5 and all(counts), reading
    assert [int(c[1]) for c in counts] == sorted(int(c[1]) for c in counts)
    assert [int(c[2]) for c in counts] == sorted(int(c[2]) for c in counts) and counts[-1][2] == "237"
    assert last.startswith(f"verify: 5/5 shards, 237 of 237 rows, {counts[0][3]} KB of {counts[0][3]} KB read, ")


def test_verify_finds_a_flipped_byte(dataset):
    shard = dataset / "train" / "1" / "criteo-00000-of-00002.tfrecord"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    output = assert_user_error(invoke("verify", dataset), "problem(s) found")
    fails = fail_lines(output)
    assert fails and all("train/1/criteo-00000-of-00002.tfrecord" in line for line in fails)
    assert any("CRC mismatch" in line for line in fails)


def test_verify_finds_changed_bytes_with_valid_framing(dataset):
    """A shard rewritten with other (well-formed) content is caught by its sha256."""
    path = "train/0/criteo-00001-of-00002.tfrecord"
    manifest = load_manifest(str(dataset))
    blocks = list(read_shard(join(str(dataset), path), manifest.features, manifest.format))
    blocks[0]["label"] = 1.0 - blocks[0]["label"]
    write_shard(join(str(dataset), path), blocks, manifest.features, manifest.format, "x")
    output = assert_user_error(invoke("verify", dataset), "1 problem(s) found")
    (line,) = fail_lines(output)
    assert line.startswith(f"FAIL {path}: ") and line.endswith("does not match the manifest")


def test_verify_finds_a_missing_shard(dataset):
    (dataset / "eval" / "criteo-00000-of-00001.tfrecord").unlink()
    output = assert_user_error(invoke("verify", dataset), "problem(s) found")
    assert "FAIL eval/criteo-00000-of-00001.tfrecord: missing" in fail_lines(output)


def test_verify_finds_a_key_in_two_groups(dataset):
    manifest = load_manifest(str(dataset))
    other = next(read_shard(join(str(dataset), "train/1/criteo-00000-of-00002.tfrecord"), manifest.features,
                            manifest.format))["key"][0]
    rewrite_shard(dataset, "train/0/criteo-00000-of-00002.tfrecord", lambda blocks: with_first_key(blocks, other))
    output = assert_user_error(invoke("verify", dataset), "2 problem(s) found")
    assert fail_lines(output) == [
        f"FAIL train/0/criteo-00000-of-00002.tfrecord: 1 row(s) belong to another shard by the manifest's seed "
        f"(first: key {other.decode()!r})",
        f"FAIL key {other.decode()!r} is in more than one place: train/0/criteo-00000-of-00002.tfrecord, "
        "train/1/criteo-00000-of-00002.tfrecord"]


def test_verify_finds_a_key_twice_in_one_shard(dataset):
    path = "eval/criteo-00000-of-00001.tfrecord"
    manifest = load_manifest(str(dataset))
    second = next(read_shard(join(str(dataset), path), manifest.features, manifest.format))["key"][1]
    rewrite_shard(dataset, path, lambda blocks: with_first_key(blocks, second))
    output = assert_user_error(invoke("verify", dataset))
    assert fail_lines(output) == [f"FAIL key {second.decode()!r} is in more than one place: {path} (twice)"]


def test_verify_finds_an_unindexed_shard_file(dataset):
    extra = dataset / "train" / "0" / "criteo-00002-of-00002.tfrecord"
    shutil.copy(dataset / "train" / "0" / "criteo-00000-of-00002.tfrecord", extra)
    output = assert_user_error(invoke("verify", dataset))
    assert "FAIL train/0/criteo-00002-of-00002.tfrecord: shard file not in the manifest" in fail_lines(output)


def test_verify_passes_over_the_temp_file_of_an_interrupted_write(dataset):
    (dataset / "train" / "0" / ".tmp-0123abcd-criteo-00000-of-00002.tfrecord").write_bytes(b"half a shard")
    (dataset / "rejected" / ".tmp-0123abcd-a.tsv.jsonl").write_bytes(b"{")
    assert_ok(invoke("verify", dataset))


def test_verify_finds_a_wrong_record_count(dataset):
    manifest = load_manifest(str(dataset))
    shards = tuple(dataclasses.replace(s, records=s.records + 1) if s.split == "eval" else s for s in manifest.shards)
    write_atomically(str(dataset / MANIFEST_NAME), dataclasses.replace(manifest, shards=shards).to_json())
    output = assert_user_error(invoke("verify", dataset))
    assert any("eval/criteo-00000-of-00001.tfrecord:" in line and "manifest says" in line
               for line in fail_lines(output))


def test_verify_without_a_manifest_is_a_clear_error(dataset):
    (dataset / MANIFEST_NAME).unlink()
    assert_user_error(invoke("verify", dataset), "no manifest.json")


def test_verify_api_reports_every_problem(dataset):
    (dataset / "eval" / "criteo-00000-of-00001.tfrecord").unlink()
    (dataset / "train" / "1" / "junk.tfrecord").write_bytes(b"junk")
    report = verify_dataset(str(dataset))
    assert not report.ok and len(report.problems) == 2


# --- synth ------------------------------------------------------------------------------------------------------


def test_synth_writes_files_and_a_sidecar(tmp_path):
    out = tmp_path / "raw"
    output = assert_ok(invoke("synth", "criteo", "--rows", 300, "--out", out, "--files", 2, "--seed", 3))
    assert "wrote 300 rows in 2 file(s)" in output and "Bayes-optimal log loss" in output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["synth.json", "train-00000-of-00002.txt", "train-00001-of-00002.txt"]
    lines = [line for name in names[1:] for line in (out / name).read_text().splitlines()]
    assert len(lines) == 300 and all(len(line.split("\t")) == 40 for line in lines)
    assert json.loads((out / "synth.json").read_text())["rows"] == 300
    again = tmp_path / "again"
    assert_ok(invoke("synth", "criteo", "--rows", 300, "--out", again, "--files", 2, "--seed", 3))
    assert (again / names[1]).read_bytes() == (out / names[1]).read_bytes()


def test_synth_gzip(tmp_path):
    out = tmp_path / "raw"
    assert_ok(invoke("synth", "criteo", "--rows", 50, "--out", out, "--files", 1, "--gzip"))
    data = gzip.decompress((out / "train-00000-of-00001.txt.gz").read_bytes())
    assert data.count(b"\n") == 50


@pytest.mark.parametrize("args", [["--rows", "0", "--out", "x"], ["--rows", "10"], ["--rows", "ten", "--out", "x"],
                                  ["--rows", "10", "--out", "x", "--files", "0"]])
def test_synth_usage_errors(args):
    result = invoke("synth", "criteo", *args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "Error:" in result.output


# --- preprocess ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    raw = tmp_path_factory.mktemp("cli-raw")
    make_criteo_file(str(raw / "day-0.tsv"), 120, {5: "bad_hex"}, seed=1)
    make_criteo_file(str(raw / "day-1.tsv.gz"), 80, seed=2, compress=True)
    return raw


def test_preprocess_with_flags_then_verify(raw_dir, tmp_path):
    out = tmp_path / "ds"
    output = assert_ok(invoke("preprocess", "criteo", "--input", f"{raw_dir}/day-*", "--output", out,
                              "--groups", 3, "--eval-fraction", 0.25, "--format", "webdataset",
                              "--runner", "FnApiRunner", "--set", "data.shards_per_group=1"))
    assert "criteo (webdataset)" in output and "200 rows read, 199 written, 1 rejected (bad_categorical: 1)" in output
    manifest = load_manifest(str(out))
    assert manifest.groups == 3 and manifest.format == "webdataset"
    assert [s.path for s in manifest.shards] == ["eval/criteo-00000-of-00001.tar"] + [
        f"train/{g}/criteo-00000-of-00001.tar" for g in range(3)]
    assert manifest.parameters["eval_fraction"] == 0.25
    assert_ok(invoke("verify", out))


def test_preprocess_with_extra_beam_options(raw_dir, tmp_path):
    out = tmp_path / "ds"
    assert_ok(invoke("preprocess", "criteo", "--input", f"{raw_dir}/day-0.tsv", "--output", out,
                     "--runner", "FnApiRunner", "--direct_num_workers=1"))
    assert load_manifest(str(out)).written_rows == 119


def test_preprocess_from_the_tiny_manifest(tmp_path):
    out = tmp_path / "ds"
    output = assert_ok(invoke("preprocess", "criteo", "-m", REPO / "manifests" / "criteo-tiny.yaml",
                              "--output", out, "--runner", "FnApiRunner", "--set", "data.synth.rows=800"))
    assert "800 rows read, 800 written, 0 rejected" in output and "Bayes-optimal log loss" in output
    manifest = load_manifest(str(out))
    assert manifest.extra["synth"]["rows"] == 800 and manifest.parameters["seed"] == 17
    assert_ok(invoke("verify", out))


def test_preprocess_input_flag_replaces_the_manifest_synth(raw_dir, tmp_path):
    out = tmp_path / "ds"
    assert_ok(invoke("preprocess", "criteo", "-m", "criteo-tiny", "--input", f"{raw_dir}/day-1.tsv.gz",
                     "--output", out, "--runner", "FnApiRunner"))
    manifest = load_manifest(str(out))
    assert manifest.written_rows == 80 and "synth" not in manifest.extra


def test_preprocess_csv_dialect_flag(criteo_samples, tmp_path):
    out = tmp_path / "ds"
    output = assert_ok(invoke("preprocess", "criteo", "--input", criteo_samples["csv"], "--output", out,
                              "--dialect", "csv", "--runner", "FnApiRunner"))
    assert "200 rows read, 200 written, 0 rejected" in output
    assert min(int(k.rsplit(":", 1)[1]) for k in read_rows(str(out))) == 2


def test_preprocess_header_csv_as_tsv_says_use_dialect_csv(criteo_samples, tmp_path):
    result = invoke("preprocess", "criteo", "--input", criteo_samples["csv"], "--output", tmp_path / "ds",
                    "--runner", "FnApiRunner")
    assert_user_error(result, "deepctr_criteo_sample.csv", "header", "--dialect csv")


def test_header_error_seen_from_a_shell_has_no_traceback(criteo_samples, tmp_path):
    """What a user of the installed script sees: one clear line, exit 1, no Beam traceback.

    (Beam logs the DoFn's exception with a traceback at ERROR level before the CLI prints its message.)
    """
    script = Path(sys.executable).parent / "codistill"
    result = subprocess.run([str(script), "preprocess", "criteo", "--input", str(criteo_samples["csv"]),
                             "--output", str(tmp_path / "ds"), "--runner", "FnApiRunner"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: deepctr_criteo_sample.csv:") and "--dialect csv" in last
    assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("args, fragments", [
    (["--groups", "0"], ["data.groups: must be >= 1, got 0"]),
    (["--eval-fraction", "1.5"], ["data.eval_fraction: must be in (0, 1), got 1.5"]),
    (["--set", "data.nope=1"], ["data.nope: unknown key"]),
    (["--set", "data.groups"], ["override must look like section.field=value"]),
    (["--set", "data.criteo.cat_buckets=[1]"], ["data.criteo.cat_buckets: "]),
])
def test_preprocess_bad_settings_are_clear_errors(raw_dir, tmp_path, args, fragments):
    result = invoke("preprocess", "criteo", "--input", f"{raw_dir}/day-0.tsv", "--output", tmp_path / "ds",
                    "--runner", "FnApiRunner", *args)
    assert_user_error(result, *fragments)
    assert not (tmp_path / "ds").exists()


def test_preprocess_without_input_or_manifest(tmp_path):
    assert_user_error(invoke("preprocess", "criteo", "--output", tmp_path / "ds"), "give exactly one of `input`")


def test_preprocess_with_another_datasets_manifest_names_both(tmp_path):
    result = invoke("preprocess", "imagenet", "-m", "criteo-tiny", "--output", tmp_path / "ds")
    assert_user_error(result, "criteo-tiny.yaml is a 'criteo' manifest", "`preprocess imagenet` needs an imagenet")
    assert not (tmp_path / "ds").exists()


def test_preprocess_with_a_missing_manifest(tmp_path):
    assert_user_error(invoke("preprocess", "criteo", "-m", tmp_path / "nope.yaml"), "manifest not found")


def test_preprocess_no_matching_files(tmp_path):
    assert_user_error(invoke("preprocess", "criteo", "--input", tmp_path / "none-*.tsv", "--output", tmp_path / "ds",
                             "--runner", "FnApiRunner"), "no input files match")


def test_preprocess_duplicate_basenames(tmp_path):
    make_criteo_file(str(tmp_path / "a" / "day.tsv"), 3)
    make_criteo_file(str(tmp_path / "b" / "day.tsv"), 3)
    assert_user_error(invoke("preprocess", "criteo", "--input", f"{tmp_path}/*/day.tsv", "--output",
                             tmp_path / "ds", "--runner", "FnApiRunner"), "input file names must be unique", "day.tsv")


def test_preprocess_refuses_a_non_empty_output_unless_overwrite(raw_dir, tmp_path):
    out = tmp_path / "ds"
    args = ["preprocess", "criteo", "--input", f"{raw_dir}/day-0.tsv", "--output", out, "--runner", "FnApiRunner"]
    (out / "rejected").mkdir(parents=True)  # what an earlier, interrupted run left
    (out / "rejected" / "old.jsonl").write_text("{}\n")
    assert_user_error(invoke(*args), "exists and is not empty", "--overwrite")
    assert (out / "rejected" / "old.jsonl").exists()
    assert_ok(invoke(*args, "--overwrite"))
    assert not (out / "rejected" / "old.jsonl").exists() and (out / MANIFEST_NAME).exists()


def test_preprocess_unknown_format_is_a_usage_error(raw_dir, tmp_path):
    result = invoke("preprocess", "criteo", "--input", f"{raw_dir}/day-0.tsv", "--output", tmp_path / "ds",
                    "--format", "parquet")
    assert result.exit_code == 2 and "'parquet' is not one of" in result.output


def test_cli_help_lists_the_commands():
    output = assert_ok(invoke("--help"))
    for command in ("synth", "preprocess", "verify"):
        assert command in output
    assert "--dialect" in assert_ok(invoke("preprocess", "criteo", "--help"))
