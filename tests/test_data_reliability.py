"""The data side under failure and attack: transient read errors, destructive overwrites, hostile inputs.

Failures are real: an fsspec file system registered here whose files raise EIO part-way through (a real
implementation of the fsspec interface, as a flaky disk or a reset connection behaves), real FIFOs,
symlinks and sparse files, real Beam runs.
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import struct
import tarfile
import threading
import tracemalloc
from pathlib import Path

import click
import fsspec
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

from codistill.config import ConfigError, load_experiment, parse_experiment, set_field
from codistill.cli import main as cli_main
from codistill.dataset import MANIFEST_NAME, DatasetError, DatasetManifest, load_manifest
from codistill.shards import Feature, ShardFormatError
from codistill.storage import write_atomically
from codistill.verify import verify_dataset
from conftest import make_criteo_file, read_rows, run_criteo
from pipelines.formats import read_shard, write_shard
from pipelines.run import OutputExistsError
from pipelines import textfiles
from pipelines.textfiles import (InputReadError, OverlongLine, count_lines, first_lines, plan_ranges, read_head,
                                 read_line_blocks)

# --- an fsspec file system whose reads fail part-way ---------------------------------------------------------


class _FailingFile(io.BytesIO):
    """Reads succeed up to `fail_after` bytes, then raise EIO, as a failing disk or connection does."""

    def __init__(self, data: bytes, fail_after: int):
        super().__init__(data)
        self.fail_after = fail_after

    def read(self, size: int = -1) -> bytes:
        if self.tell() >= self.fail_after:
            raise OSError(errno.EIO, "Input/output error")
        room = self.fail_after - self.tell()
        return super().read(room if size is None or size < 0 else min(size, room))

    def read1(self, size: int = -1) -> bytes:
        return self.read(size)


class FailingReadFileSystem(MemoryFileSystem):
    """`eio://`: an in-memory file system whose files raise EIO after `fail_after` bytes read."""

    protocol = "eio"
    store: dict = {}
    pseudo_dirs = [""]
    fail_after = 0

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        if "r" in mode:
            return _FailingFile(f.getvalue(), self.fail_after)
        return f


fsspec.register_implementation("eio", FailingReadFileSystem, clobber=True)


@pytest.fixture
def failing_fs():
    FailingReadFileSystem.store.clear()
    yield FailingReadFileSystem
    FailingReadFileSystem.store.clear()
    FailingReadFileSystem.fail_after = 0


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "plain"])
def test_a_read_error_mid_file_fails_the_pipeline_instead_of_losing_rows(tmp_path, criteo_file, failing_fs,
                                                                         compress):
    raw = criteo_file(f"eio://in/rows.txt{'.gz' if compress else ''}", 3000, compress=compress)
    failing_fs.fail_after = fsspec.filesystem("eio").size(raw.url) * 2 // 3  # past the header check's read
    out = tmp_path / "ds"
    with pytest.raises(Exception, match="Input/output error"):
        run_criteo(raw.url, str(out))
    assert not (out / MANIFEST_NAME).exists(), "a dataset missing a third of its rows was published"


def test_a_read_error_in_the_header_check_is_not_taken_for_a_damaged_file(tmp_path, criteo_file, failing_fs):
    raw = criteo_file("eio://in/rows.txt.gz", 100, compress=True)
    failing_fs.fail_after = 5  # inside the gzip header
    with pytest.raises(InputReadError, match="Input/output error"):
        read_head(raw.url, 1 << 16)
    with pytest.raises(Exception, match="Input/output error"):
        run_criteo(raw.url, str(tmp_path / "ds"))
    assert not (tmp_path / "ds" / MANIFEST_NAME).exists()


def test_a_damaged_gzip_is_still_quarantined(tmp_path, criteo_file):
    """The other side of the line: real decoder errors stay `corrupt_file` rejects, not failures."""
    whole = criteo_file(str(tmp_path / "whole.txt.gz"), 400, compress=True)
    data = bytearray(Path(whole.url).read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged = tmp_path / "in" / "damaged.txt.gz"
    damaged.parent.mkdir()
    damaged.write_bytes(bytes(data))
    out = tmp_path / "ds"
    manifest = run_criteo(str(damaged), str(out))
    assert manifest.rejected.get("corrupt_file") == 1  # (the garbage decoded before the CRC check: bad rows)
    assert len(read_rows(str(out))) + sum(manifest.rejected.values()) == manifest.input_rows
    last = json.loads((out / "rejected" / "damaged.txt.gz.jsonl").read_text().splitlines()[-1])
    assert last["reason"] == "corrupt_file" and "BadGzipFile" in last["detail"] or "Error" in last["detail"]


# --- --overwrite deletes only what is ours --------------------------------------------------------------------


@pytest.fixture
def raw_folder(tmp_path, criteo_file) -> Path:
    criteo_file(str(tmp_path / "raw" / "day-0.tsv"), 20)
    criteo_file(str(tmp_path / "raw" / "day-1.tsv"), 20, seed=1)
    return tmp_path / "raw"


def folder_state(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("output", ["same", "parent", "symlink"])
def test_overwrite_refuses_an_output_that_holds_the_input(raw_folder, output):
    before = folder_state(raw_folder.parent)
    if output == "symlink":
        (raw_folder.parent / "link").symlink_to(raw_folder)
        before = folder_state(raw_folder.parent)
    out = {"same": raw_folder, "parent": raw_folder.parent, "symlink": raw_folder.parent / "link"}[output]
    with pytest.raises(OutputExistsError, match="is inside the output directory"):
        run_criteo(f"{raw_folder}/*.tsv", str(out), overwrite=True)
    assert folder_state(raw_folder.parent) == before


def test_overwrite_refuses_a_folder_that_is_not_a_dataset(raw_folder, tmp_path):
    out = tmp_path / "home"
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "todo.txt").write_text("mine")
    (out / "train").mkdir()
    with pytest.raises(OutputExistsError, match=r"not a codistill dataset \(it holds notes\)"):
        run_criteo(f"{raw_folder}/*.tsv", str(out), overwrite=True)
    assert (out / "notes" / "todo.txt").read_text() == "mine"


def test_overwrite_refuses_a_file_as_output(raw_folder, tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(OutputExistsError, match="is not a directory"):
        run_criteo(f"{raw_folder}/*.tsv", str(tmp_path / "file"), overwrite=True)
    assert (tmp_path / "file").read_text() == "mine"


def test_overwrite_lists_the_inputs_before_deleting_anything(tmp_path, raw_folder):
    out = tmp_path / "ds"
    run_criteo(f"{raw_folder}/*.tsv", str(out))
    with pytest.raises(FileNotFoundError, match="no input files match"):
        run_criteo(f"{raw_folder}/*.csv", str(out), overwrite=True)
    assert (out / MANIFEST_NAME).exists()


def test_overwrite_replaces_a_dataset_and_the_leftovers_of_an_interrupted_run(tmp_path, raw_folder):
    out = tmp_path / "ds"
    first = run_criteo(f"{raw_folder}/day-0.tsv", str(out))
    (out / ".pieces" / "00001").mkdir(parents=True)
    (out / ".pieces" / "00001" / "x.npys").write_bytes(b"old")
    second = run_criteo(f"{raw_folder}/*.tsv", str(out), overwrite=True)
    assert second.input_rows == 40 and first.input_rows == 20
    assert not (out / ".pieces").exists()
    (out / MANIFEST_NAME).unlink()  # killed before the manifest: still ours
    assert run_criteo(f"{raw_folder}/*.tsv", str(out), overwrite=True).input_rows == 40


@pytest.mark.parametrize("name", [".", "..", "a/b", "..\\\\x", ""])
def test_manifest_name_must_be_a_plain_name(name):
    with pytest.raises(ConfigError, match="^name: must be a plain name"):
        parse_experiment({"name": name})


@pytest.mark.parametrize("run_dir", [".", "..", "runs/.."])
def test_run_dir_must_end_in_a_name(run_dir):
    with pytest.raises(ConfigError, match="^train.run_dir: must end in a directory name"):
        parse_experiment({"name": "x", "train": {"run_dir": run_dir}})


def run_config(run_dir: Path, store: str | None = None):
    return parse_experiment({"name": "x", "data": {"synth": {}},
                             "train": {"run_dir": str(run_dir), **({"store": store} if store else {})}})


def test_train_overwrite_deletes_only_a_run_directory(tmp_path):
    from codistill.run import RunError, start_afresh

    work = tmp_path / "work"
    (work / "group-0").mkdir(parents=True)
    (work / "src").mkdir()
    (work / "src" / "main.py").write_text("mine")
    with pytest.raises(RunError, match=r"not a codistill run directory \(it holds src\)"):
        start_afresh(run_config(work), overwrite=True)
    assert (work / "src" / "main.py").read_text() == "mine"

    run = tmp_path / "runs" / "old"
    (run / "group-1" / "checkpoints").mkdir(parents=True)
    (run / "store" / "old" / "group-1").mkdir(parents=True)
    (run / ".tmp-0123abcd-run.json").write_text("")  # a write cut short
    start_afresh(run_config(run), overwrite=True)
    assert list(run.iterdir()) == []  # emptied; the directory stays (it holds the run lock while a run lives)


def test_train_overwrite_leaves_a_foreign_store_folder_alone(tmp_path):
    from codistill.run import RunError, start_afresh

    store = tmp_path / "bucket"
    (store / "x" / "important").mkdir(parents=True)
    with pytest.raises(RunError, match=r"is not this run's snapshots \(it holds important\)"):
        start_afresh(run_config(tmp_path / "runs" / "x", str(store)), overwrite=True)
    assert (store / "x" / "important").is_dir()


# --- hostile manifests ------------------------------------------------------------------------------------------


def alias_bomb(levels: int = 9) -> str:
    """The 'billion laughs' document: each level holds 9 aliases of the one before (9^9 leaves, ~600 bytes)."""
    items = ["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    items += [f"&l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


@pytest.mark.parametrize("field", ["name", "model.hidden", "data.criteo.cat_buckets", "train.unknown"])
def test_an_alias_bomb_in_a_manifest_is_refused(tmp_path, field):
    raw = {"name": "x"}
    set_field(raw, field, "BOMB")
    path = tmp_path / "bomb.yaml"
    path.write_text(yaml.safe_dump(raw).replace("BOMB", alias_bomb()))
    assert len(path.read_bytes()) < 700
    with pytest.raises(ConfigError, match="alias bomb"):
        load_experiment(str(path))


def test_an_alias_bomb_in_a_set_value_is_refused():
    with pytest.raises(ConfigError, match="model.hidden: the value is too large.*alias bomb"):
        parse_experiment({"name": "x"}, [f"model.hidden={alias_bomb()}"])


def test_a_recursive_alias_is_refused(tmp_path):
    (tmp_path / "loop.yaml").write_text("name: &a [*a]\n")
    with pytest.raises(ConfigError, match="recursive alias"):
        load_experiment(str(tmp_path / "loop.yaml"))


def test_error_messages_about_a_big_value_stay_short():
    with pytest.raises(ConfigError) as info:
        parse_experiment({"name": list(range(50_000))})
    assert len(str(info.value)) < 300 and str(info.value).startswith("name: expected str, got list [0, 1,")
    with pytest.raises(ConfigError) as info:
        parse_experiment({"name": "x", "model": {"kind": "k" * 100_000}})
    assert len(str(info.value)) < 300


def test_a_huge_or_special_manifest_file_is_refused(tmp_path):
    (tmp_path / "big.yaml").write_text("name: x\n" + "#" * (2 << 20) + "\n")
    with pytest.raises(ConfigError, match="larger than"):
        load_experiment(str(tmp_path / "big.yaml"))
    with pytest.raises(ConfigError, match="larger than"):
        load_experiment("/dev/zero")


@pytest.mark.parametrize("dotted, value, message", [
    ("optimizer.lr", ".inf", "must be a finite number, got inf"),
    ("codistill.weight", ".inf", "must be a finite number, got inf"),
    ("codistill.temperature", ".nan", "must be a finite number, got nan"),
    ("codistill.poll_seconds", "1e999", "must be a finite number, got inf"),
    ("codistill.poll_seconds", str(10**400), "expected float, got int 1000"),
    ("data.groups", "1000000000", "must be <= 1024"),
    ("data.shards_per_group", "100000", "must be <= 99999"),
    ("data.eval_shards", "100000", "must be <= 99999"),
    ("data.criteo.cat_buckets", "[100000000]", "each must be in [2, 2^24]"),
])
def test_sizes_are_bounded_and_floats_finite(dotted, value, message):
    with pytest.raises(ConfigError, match=f"^{dotted}: {re.escape(message)}"):
        parse_experiment({"name": "x", "data": {"synth": {}}}, [f"{dotted}={value}"])


# --- gzip bombs and overlong lines -----------------------------------------------------------------------------


def read_all_lines(path: str, max_line_bytes: int, split_bytes: int | None = None) -> list:
    """(kind, line number, bytes or length) of everything read_line_blocks yields for every range of a file."""
    ranges = plan_ranges(path, split_bytes or 1 << 30)
    firsts = first_lines([(r.index, count_lines(r)) for r in ranges if not r.last])
    out = []
    for rng in ranges:
        for block in read_line_blocks(rng, firsts[rng.index], max_line_bytes):
            if isinstance(block, OverlongLine):
                out.append(("overlong", block.line, block.length, block.head))
            else:
                out += [("line", block.first_line + i, text, None) for i, text in
                        enumerate(block.data.split(b"\n")[:-1])]
    return out


def expected_lines(lines: list[bytes], limit: int) -> list:
    head = textfiles.OVERLONG_HEAD_BYTES
    return [("overlong", n, len(t), t[:head]) if len(t) > limit else ("line", n, t, None)
            for n, t in enumerate(lines, 1)]


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_overlong_lines_are_taken_out_wherever_chunks_fall(tmp_path, monkeypatch, compress):
    monkeypatch.setattr(textfiles, "READ_CHUNK_BYTES", 1000)  # lines straddle many chunks
    lines = [bytes([65 + i % 26]) * n for i, n in enumerate([5, 3000, 0, 99, 100, 101, 250, 7, 12000, 1, 100])]
    data = b"\n".join(lines)
    path = tmp_path / ("lines.txt.gz" if compress else "lines.txt")
    for limit, ending in [(100, b"\n"), (99, b"")]:  # then the last line, over the limit, has no newline
        path.write_bytes(gzip.compress(data + ending, mtime=0) if compress else data + ending)
        for split_bytes in [None] if compress else [None, 2000, 5000]:
            assert read_all_lines(str(path), limit, split_bytes) == expected_lines(lines, limit)


def test_a_gzip_bomb_line_is_streamed_past_in_bounded_memory(tmp_path):
    bomb = tmp_path / "bomb.txt.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as f:
        f.write(b"first\n")
        for _ in range(64):
            f.write(b"x" * (1 << 20))  # one 64 MB line, ~64 KB compressed
        f.write(b"\nlast\n")
    assert bomb.stat().st_size < 200_000
    tracemalloc.start()
    try:
        got = [(kind, line, value if kind == "line" else value) for kind, line, value, _ in
               read_all_lines(str(bomb), textfiles.MAX_LINE_BYTES)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == [("line", 1, b"first"), ("overlong", 2, 64 << 20), ("line", 3, b"last")]
    assert peak < 48 << 20, f"reading one long line took {peak >> 20} MB"


def test_an_overlong_row_is_quarantined_with_a_bounded_prefix(tmp_path, criteo_file):
    raw = criteo_file(str(tmp_path / "src.tsv"), 30)
    lines = Path(raw.url).read_bytes().split(b"\n")
    lines[9] = lines[9] + b"\t" * (3 << 20)  # row 10: 3 MB of empty fields
    path = tmp_path / "in" / "bomb.txt.gz"
    path.parent.mkdir()
    path.write_bytes(gzip.compress(b"\n".join(lines), mtime=0))
    out = tmp_path / "ds"
    manifest = run_criteo(str(path), str(out))
    assert manifest.rejected == {"line_too_long": 1} and manifest.written_rows == 29
    (record,) = [json.loads(x) for x in (out / "rejected" / "bomb.txt.gz.jsonl").read_text().splitlines()]
    assert record["line"] == 10 and record["detail"].startswith(f"{len(lines[9])} bytes, more than 1048576")
    assert len(record["raw"]) == textfiles.OVERLONG_HEAD_BYTES
    assert set(read_rows(str(out))) == {f"bomb.txt.gz:{n}" for n in range(1, 31) if n != 10}


# --- verify proves the split, not only the manifest's self-consistency ------------------------------------------


@pytest.fixture(scope="module")
def built_dataset(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("raw")
    make_criteo_file(str(raw / "a.tsv"), 150, {7: "bad_label", 20: "empty_line"}, seed=1)
    make_criteo_file(str(raw / "b.tsv"), 90, {3: "bad_hex"}, seed=2)
    out = tmp_path_factory.mktemp("built") / "ds"
    run_criteo(f"{raw}/*", str(out))
    return out


@pytest.fixture
def ds(built_dataset, tmp_path) -> Path:
    shutil.copytree(built_dataset, tmp_path / "ds")
    return tmp_path / "ds"


def edit_manifest(root: Path, **changes) -> DatasetManifest:
    manifest = dataclasses.replace(load_manifest(str(root)), **changes)
    write_atomically(str(root / MANIFEST_NAME), manifest.to_json())
    return manifest


def rewrite(root: Path, path: str, change) -> None:
    """Replace a shard's blocks by `change(blocks)` and index the new bytes, so the manifest is consistent."""
    manifest = load_manifest(str(root))
    blocks = change(list(read_shard(str(root / path), manifest.features, manifest.format)))
    written = write_shard(str(root / path), blocks, manifest.features, manifest.format, "x")
    edit_manifest(root, shards=tuple(dataclasses.replace(s, records=written.records, bytes=written.bytes,
                                                         sha256=written.sha256) if s.path == path else s
                                     for s in manifest.shards))


def problems(root: Path) -> list[str]:
    report = verify_dataset(str(root))
    assert not report.ok
    return report.problems


EVAL, G0S0, G0S1, G1S1 = ("eval/criteo-00000-of-00001.tfrecord", "train/0/criteo-00000-of-00002.tfrecord",
                          "train/0/criteo-00001-of-00002.tfrecord", "train/1/criteo-00001-of-00002.tfrecord")


def set_column(column: str, value, row: int = 0):
    def change(blocks):
        if column == "key":  # (a wider key needs a wider fixed-width array)
            keys = blocks[0]["key"].tolist()
            keys[row] = value
            blocks[0]["key"] = np.array(keys, dtype=np.bytes_)
        else:
            blocks[0][column] = blocks[0][column].copy()
            blocks[0][column].reshape(len(blocks[0][column]), -1)[row, -1] = value
        return blocks
    return change


@pytest.mark.parametrize("column, value, rule", [
    ("label", np.nan, "labels in {0, 1}"),
    ("label", 0.5, "labels in {0, 1}"),
    ("dense", np.inf, "finite dense features"),
    ("dense", np.nan, "finite dense features"),
    ("cat", 1000, "categorical ids in [0, cat_buckets)"),
    ("cat", -1, "categorical ids in [0, cat_buckets)"),
])
def test_verify_checks_the_values(ds, column, value, rule):
    rewrite(ds, G0S1, set_column(column, value, row=3))
    key = next(read_shard(str(ds / G0S1), load_manifest(str(ds)).features, "tfrecord"))["key"][3].decode()
    assert problems(ds) == [f"{G0S1}: 1 row(s) fail the check: {rule} (first: key {key!r})"]


def swap_files(root: Path, a: str, b: str) -> None:
    """Swap two shard files and their manifest entries' bytes, so everything the manifest says still holds."""
    manifest = load_manifest(str(root))
    (root / a).rename(root / "tmp")
    (root / b).rename(root / a)
    (root / "tmp").rename(root / b)
    entry = {s.path: s for s in manifest.shards}
    fields = lambda s: {"records": s.records, "bytes": s.bytes, "sha256": s.sha256}  # noqa: E731
    swapped = {a: dataclasses.replace(entry[a], **fields(entry[b])),
               b: dataclasses.replace(entry[b], **fields(entry[a]))}
    edit_manifest(root, shards=tuple(swapped.get(s.path, s) for s in manifest.shards))


@pytest.mark.parametrize("a, b", [(EVAL, G0S0), (G0S0, G0S1)], ids=["eval_and_train", "two_train_shards"])
def test_verify_finds_consistently_swapped_shards(ds, a, b):
    swap_files(ds, a, b)
    found = problems(ds)
    assert len(found) == 2 and all("belong to another shard by the manifest's seed" in p for p in found)
    assert {p.split(":")[0] for p in found} == {a, b}


def test_verify_finds_a_dropped_shard_with_counts_lowered_to_match(ds):
    manifest = load_manifest(str(ds))
    dropped = next(s for s in manifest.shards if s.path == G1S1)
    (ds / G1S1).unlink()
    lowered = ({"source": "a.tsv", "rows": manifest.inputs[0]["rows"] - dropped.records}, manifest.inputs[1])
    edit_manifest(ds, shards=tuple(s for s in manifest.shards if s.path != G1S1), inputs=lowered)
    found = problems(ds)
    assert f"1 shard(s) of the layout are not in the manifest: {G1S1}" in found
    assert any("have a key that names no record of the inputs" in p for p in found)


def test_verify_finds_a_whole_missing_group_even_with_the_layout_edited(ds):
    manifest = load_manifest(str(ds))
    group1 = [s for s in manifest.shards if s.group == 1]
    for shard in group1:
        (ds / shard.path).unlink()
    (ds / "train" / "1").rmdir()
    lost = sum(s.records for s in group1)
    edit_manifest(ds, groups=1, parameters={**manifest.parameters, "groups": 1},
                  shards=tuple(s for s in manifest.shards if s.group != 1),
                  inputs=({"source": "a.tsv", "rows": manifest.inputs[0]["rows"] - lost}, manifest.inputs[1]))
    assert any("have a key that names no record of the inputs" in p for p in problems(ds))


@pytest.mark.parametrize("key, rule", [
    (b"other.tsv:5", "have a key that names no record of the inputs"),
    (b"a.tsv:151", "have a key that names no record of the inputs"),
    (b"a.tsv:0", "have a key that names no record of the inputs"),
    (b"a.tsv", "have a key that names no record of the inputs"),
    (b"a.tsv:1e3", "have a key that names no record of the inputs"),
])
def test_verify_parses_keys_and_refuses_foreign_ones(ds, key, rule):
    rewrite(ds, EVAL, set_column("key", key))
    assert f"{EVAL}: 1 row(s) {rule} (first: key {key.decode()!r})" in problems(ds)


def test_verify_counts_the_quarantined_records(ds):
    manifest = load_manifest(str(ds))
    assert manifest.rejected == {"bad_label": 1, "field_count": 1, "bad_categorical": 1}
    edit_manifest(ds, rejected={**manifest.rejected, "bad_label": 2},
                  inputs=({"source": "a.tsv", "rows": manifest.inputs[0]["rows"] + 1}, manifest.inputs[1]))
    assert problems(ds) == ["rejected/ holds {'bad_categorical': 1, 'bad_label': 1, 'field_count': 1} records, "
                            "the manifest counts {'bad_categorical': 1, 'bad_label': 2, 'field_count': 1}"]


def test_verify_refuses_a_quarantine_file_of_no_input_or_not_json(ds):
    (ds / "rejected" / "c.tsv.jsonl").write_text("{}\n")
    with open(ds / "rejected" / "a.tsv.jsonl", "a") as f:
        f.write("not json\n")
    found = problems(ds)
    assert "rejected/c.tsv.jsonl: not the quarantine of an input of this dataset" in found
    assert "rejected/a.tsv.jsonl: line 3 is not a rejected record of a.tsv" in found


def test_verify_requires_the_whole_layout(ds):
    manifest = load_manifest(str(ds))
    edit_manifest(ds, shards=tuple(dataclasses.replace(s, split="eval", group=None) if s.path == G0S0 else s
                                   for s in manifest.shards))
    assert f"{G0S0}: indexed as eval group None, its path says train group 0" in problems(ds)


# --- crafted shards: bounded, regular files under the root, one clear error ---------------------------------------


def index_as(root: Path, path: str, data: bytes | None = None) -> None:
    """Index `path` in the manifest with the size and sha256 of `data` (as a forger with write access would)."""
    manifest = load_manifest(str(root))
    sha = hashlib.sha256(data or b"").hexdigest()
    edit_manifest(root, shards=tuple(dataclasses.replace(s, bytes=len(data or b""), sha256=sha)
                                     if s.path == path else s for s in manifest.shards))


def read_in_training(root: Path, path: str):
    manifest = load_manifest(str(root))
    shard = next(s for s in manifest.shards if s.path == path)
    return list(read_shard(str(root / path), manifest.features, manifest.format, expect_sha256=shard.sha256,
                           expect_bytes=shard.bytes))


def verify_in_a_thread(root: Path) -> list[str]:
    """verify, failing (not hanging the suite) if it does not come back: a FIFO used to block it for ever."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(report=verify_dataset(str(root))), daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "verify hangs"
    return result["report"].problems


@pytest.mark.parametrize("kind", ["symlink_to_dev_zero", "fifo", "symlink_to_a_good_copy", "directory"])
def test_a_shard_that_is_not_a_regular_file_is_refused(ds, kind):
    shard = ds / G0S1
    good = shard.read_bytes()
    shard.unlink()
    if kind == "symlink_to_dev_zero":
        shard.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(shard)
    elif kind == "directory":
        shard.mkdir()
    else:
        (ds / "copy").write_bytes(good)
        shard.symlink_to(ds / "copy")
    found = verify_in_a_thread(ds)
    message = "a symbolic link" if kind.startswith("symlink") else "not a regular file"
    assert any(p.startswith(f"{G0S1}: {message}") for p in found), found
    with pytest.raises(ShardFormatError, match=message):
        read_in_training(ds, G0S1)


@pytest.mark.parametrize("path", ["../../../dev/zero", "/dev/zero", "train/../../x", "train//0/x", "s3://b/x",
                                  "train\\\\0\\\\x"])
def test_a_manifest_path_outside_the_dataset_is_refused(ds, path):
    manifest = load_manifest(str(ds))
    edit_manifest(ds, shards=(dataclasses.replace(manifest.shards[0], path=path), *manifest.shards[1:]))
    with pytest.raises(DatasetError, match="is not a relative path inside the dataset"):
        load_manifest(str(ds))
    result = CliRunner().invoke(cli_main, ["verify", str(ds)])
    assert result.exit_code == 1 and "Traceback" not in result.output and "inside the dataset" in result.output


@pytest.mark.parametrize("field, value", [("records", "10"), ("bytes", -1), ("sha256", 5), ("group", "0"),
                                          ("split", "test")])
def test_a_mistyped_manifest_field_is_one_clear_error(ds, field, value):
    text = json.loads((ds / MANIFEST_NAME).read_text())
    text["shards"][0][field] = value
    (ds / MANIFEST_NAME).write_text(json.dumps(text))
    with pytest.raises(DatasetError, match="not a valid dataset manifest"):
        load_manifest(str(ds))


def test_a_shard_whose_size_differs_from_the_manifest_is_refused_before_reading(ds):
    with open(ds / G0S1, "ab") as f:
        f.write(b"\0" * 10)
    with pytest.raises(ShardFormatError, match=r"has \d+ bytes, manifest says \d+"):
        read_in_training(ds, G0S1)


def test_a_tfrecord_length_of_2_64_minus_1_is_a_format_error(ds):
    header = struct.pack("<Q", 2**64 - 1)
    data = header + textfiles_masked_crc(header) + b"\0" * 100
    (ds / G0S1).write_bytes(data)
    index_as(ds, G0S1, data)
    assert any("over the 268435456-byte record limit" in p for p in problems(ds))
    with pytest.raises(ShardFormatError, match="record limit"):
        read_in_training(ds, G0S1)


def textfiles_masked_crc(data: bytes) -> bytes:
    from pipelines.formats import _masked_crc

    return _masked_crc(data)


def tar_with(member: tarfile.TarInfo, payload: bytes, header_patch=None) -> bytes:
    header = bytearray(member.tobuf(format=tarfile.GNU_FORMAT))
    if header_patch:
        header_patch(header)
        header[148:156] = b" " * 8
        header[148:156] = b"%06o\0 " % sum(header[:512])
    return bytes(header) + payload + b"\0" * (-len(payload) % 512) + b"\0" * 1024


def test_a_sparse_tar_member_is_refused_not_expanded(tmp_path):
    """10 kB on disk, 4.4 GB once read: a GNU sparse member whose map holds no data at all."""
    member = tarfile.TarInfo("s-000000.key.npy")
    member.size = 0

    def make_sparse(header: bytearray) -> None:
        header[156:157] = tarfile.GNUTYPE_SPARSE
        header[483:495] = b"%011o\0" % (4_400_000_000)  # realsize
    data = tar_with(member, b"", make_sparse)
    assert tarfile.open(fileobj=io.BytesIO(data)).next().issparse()
    path = tmp_path / "s.tar"
    path.write_bytes(data)
    with pytest.raises(ShardFormatError, match="not a plain file|record limit"):
        list(read_shard(str(path), {"key": Feature("bytes")}, "webdataset"))


def test_an_npy_header_with_a_huge_shape_is_refused(tmp_path):
    npy = _npy_with_shape((10**13,), np.int32, np.arange(4, dtype=np.int32).tobytes())
    info = tarfile.TarInfo("s-000000.key.npy")
    info.size = len(npy)
    path = tmp_path / "s.tar"
    path.write_bytes(tar_with(info, npy))
    with pytest.raises(ShardFormatError, match=r"the header says shape \(10000000000000,\)"):
        list(read_shard(str(path), {"key": Feature("int32")}, "webdataset"))


def _npy_with_shape(shape: tuple, dtype, payload: bytes) -> bytes:
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": shape})
    return stream.getvalue() + payload


# --- one line where a traceback was ------------------------------------------------------------------------------


def preprocess_cli(*args) -> "click.testing.Result":
    return CliRunner().invoke(cli_main, ["preprocess", "criteo", "--runner", "FnApiRunner", *map(str, args)])


def assert_one_line_error(result, fragment: str) -> None:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), f"escaped: {result.exception!r}"
    assert fragment in result.output and "Traceback" not in result.output, result.output


def test_a_fifo_input_is_refused_instead_of_hanging(tmp_path, raw_folder):
    os.mkfifo(raw_folder / "day-2.tsv")
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=preprocess_cli(
        "--input", f"{raw_folder}/*.tsv", "--output", tmp_path / "ds")), daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "preprocess hangs on a FIFO"
    assert_one_line_error(result["r"], "is not a regular file")


def test_a_directory_matched_by_the_glob_is_one_line(tmp_path, raw_folder):
    (raw_folder / "sub.tsv").mkdir()
    assert_one_line_error(preprocess_cli("--input", f"{raw_folder}/*.tsv", "--output", tmp_path / "ds"),
                          "is a directory")


def test_preprocess_exits_non_zero_when_every_row_is_rejected(tmp_path, criteo_file):
    raw = criteo_file(str(tmp_path / "bad.tsv"), 3, {1: "bad_label", 2: "bad_hex", 3: "empty_line"})
    result = preprocess_cli("--input", raw.url, "--output", tmp_path / "ds")
    assert_one_line_error(result, "every one of the 3 rows read was rejected")
    assert (tmp_path / "ds" / MANIFEST_NAME).exists()  # still a valid (empty) dataset, for inspection


class _QuotaFile(io.BytesIO):
    def __init__(self, fs, path):
        super().__init__()
        self.fs, self.path = fs, path

    def write(self, data) -> int:
        type(self.fs).written += len(data)
        if type(self.fs).quota is not None and type(self.fs).written > type(self.fs).quota:
            raise OSError(errno.ENOSPC, "No space left on device", self.path)
        return super().write(data)

    def close(self) -> None:
        if not self.closed:
            MemoryFile(self.fs, self.path, self.getvalue()).commit()
        super().close()


class FullDiskFileSystem(MemoryFileSystem):
    """`full://`: an in-memory file system that raises ENOSPC once `quota` bytes have been written."""

    protocol = "full"
    store: dict = {}
    pseudo_dirs = [""]
    quota: int | None = None
    written = 0

    def _open(self, path, mode="rb", **kwargs):
        if "w" in mode:
            f = _QuotaFile(self, self._strip_protocol(path))
            if kwargs.get("data") is not None:  # pipe_file: the whole file at once
                f.write(kwargs["data"])
                f.close()
            return f
        return super()._open(path, mode, **kwargs)


fsspec.register_implementation("full", FullDiskFileSystem, clobber=True)


def test_a_full_disk_is_one_line_and_leaves_no_pieces(raw_folder):
    fs = FullDiskFileSystem
    fs.store.clear()
    fs.written = 0
    assert_ok_cli = preprocess_cli("--input", f"{raw_folder}/*.tsv", "--output", "full://ok")
    assert assert_ok_cli.exit_code == 0, assert_ok_cli.output
    fs.quota, fs.written = fs.written * 6 // 10, 0
    try:
        result = preprocess_cli("--input", f"{raw_folder}/*.tsv", "--output", "full://ds")
        assert_one_line_error(result, "No space left on device")
        assert not fsspec.filesystem("full").exists("/ds/.pieces")
    finally:
        fs.quota = None
        fs.store.clear()


@pytest.mark.parametrize("kind", ["fifo", "symlink_to_dev_zero"])
def test_a_special_manifest_or_quarantine_file_is_refused(ds, kind):
    def make(path: Path) -> None:
        path.unlink()
        os.mkfifo(path) if kind == "fifo" else path.symlink_to("/dev/zero")

    make(ds / "rejected" / "a.tsv.jsonl")
    found = verify_in_a_thread(ds)
    assert any(p.startswith("rejected/a.tsv.jsonl: ") for p in found), found
    make(ds / MANIFEST_NAME)
    with pytest.raises(DatasetError, match="symbolic link" if kind != "fifo" else "not a regular file"):
        load_manifest(str(ds))
