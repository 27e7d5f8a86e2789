"""The data side under failure and attack: transient read errors, destructive overwrites, hostile inputs.

Failures are real: an fsspec file system registered here whose files raise EIO part-way through (a real
implementation of the fsspec interface, as a flaky disk or a reset connection behaves), real FIFOs,
symlinks and sparse files, real Beam runs.
"""

from __future__ import annotations

import errno
import io
import json
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from codistill.dataset import MANIFEST_NAME
from conftest import read_rows, run_criteo
from pipelines.textfiles import InputReadError, read_head

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
