"""The data side under failure and attack: transient read errors, destructive overwrites, hostile inputs.

Failures are real: an fsspec file system registered here whose files raise EIO part-way through (a real
implementation of the fsspec interface, as a flaky disk or a reset connection behaves), real FIFOs,
symlinks and sparse files, real Beam runs.
"""

from __future__ import annotations

import errno
import gzip
import io
import json
import re
import tracemalloc
from pathlib import Path

import click
import fsspec
import pytest
import yaml
from fsspec.implementations.memory import MemoryFileSystem

from codistill.config import ConfigError, load_experiment, parse_experiment, set_field
from codistill.dataset import MANIFEST_NAME
from conftest import read_rows, run_criteo
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
    from codistill.cli import _start_afresh

    work = tmp_path / "work"
    (work / "group-0").mkdir(parents=True)
    (work / "src").mkdir()
    (work / "src" / "main.py").write_text("mine")
    with pytest.raises(click.ClickException, match=r"not a codistill run directory \(it holds src\)"):
        _start_afresh(run_config(work), overwrite=True)
    assert (work / "src" / "main.py").read_text() == "mine"

    run = tmp_path / "runs" / "old"
    (run / "group-1" / "checkpoints").mkdir(parents=True)
    (run / "store" / "old" / "group-1").mkdir(parents=True)
    _start_afresh(run_config(run), overwrite=True)
    assert not run.exists()


def test_train_overwrite_leaves_a_foreign_store_folder_alone(tmp_path):
    from codistill.cli import _start_afresh

    store = tmp_path / "bucket"
    (store / "x" / "important").mkdir(parents=True)
    with pytest.raises(click.ClickException, match=r"is not this run's snapshots \(it holds important\)"):
        _start_afresh(run_config(tmp_path / "runs" / "x", str(store)), overwrite=True)
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
