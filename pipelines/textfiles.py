"""Line-oriented input files, split into line-aligned byte ranges that workers read in parallel.

Records are keyed by (file name, line number), so a worker reading the middle
of a file must know how many lines came before: a cheap first pass counts the
newlines of every range but the last of each file, and the prefix sums give
each range its first line number. Compressed files cannot be split: each is
one range, read from the start, so no counting is needed for them.

Reading a range reports its progress (raw bytes, lines, the range when done;
`pipelines.progress`).
"""

from __future__ import annotations

import collections
import contextlib
import lzma
import posixpath
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import numpy as np
from fsspec.compression import compr
from fsspec.utils import infer_compression

from codistill import storage
from pipelines import progress
from pipelines.errors import InputReadError
from pipelines.worker import WorkerDoFn

READ_CHUNK_BYTES = 4 << 20
# Longer lines are rejected (no record format read here comes near it; Criteo rows are ~200 bytes), keeping
# this much of them for the quarantine record.
MAX_LINE_BYTES = 1 << 20
OVERLONG_HEAD_BYTES = 1 << 10


@dataclass(frozen=True)
class InputRange:
    path: str
    source: str  # the file name: the first half of every record key
    index: int  # position among the file's ranges
    start: int  # byte offset of a line start
    end: int | None  # byte offset just after a newline; None = to the end of the file
    last: bool
    compressed: bool = False
    length: int = 0  # bytes of the file this range covers (compressed bytes for a compressed file)


@dataclass(frozen=True)
class LineBlock:
    """Complete lines of one input file, starting at 1-based line `first_line`, always ending in a newline."""

    source: str
    first_line: int
    data: bytes


@dataclass(frozen=True)
class OverlongLine:
    """A line longer than the limit, skipped: `head` is its first bytes, `length` its length without the newline."""

    source: str
    line: int
    length: int
    head: bytes


@dataclass(frozen=True)
class TruncatedInput:
    """A compressed file ended early or is corrupt; `tail` is the partial line it stopped in."""

    source: str
    line: int
    error: str
    tail: bytes


def match_inputs(pattern: str) -> list[str]:
    """Every path (file or folder) a glob, or a comma-separated list of globs, matches, with its protocol."""
    paths = []
    for part in pattern.split(","):
        fs, _ = storage.url_to_fs(part)
        found = sorted(fs.glob(part)) if any(c in part for c in "*?[") else ([part] if fs.exists(part) else [])
        if not found:
            raise FileNotFoundError(f"no input files match {part!r}")
        paths += [fs.unstrip_protocol(p) if "://" in part else p for p in found]
    return paths


def expand_inputs(pattern: str) -> list[str]:
    """Every file matching a glob (or a comma-separated list of globs), with its protocol."""
    paths = match_inputs(pattern)
    for path in paths:
        kind = storage.url_to_fs(path)[0].info(path)["type"]
        if kind == "directory":
            raise IsADirectoryError(f"input {path!r} is a directory; give files or a glob such as "
                                    f"{path.rstrip('/')}/*")
        if kind != "file":  # a FIFO would hang the reader, a device never end
            raise ValueError(f"input {path!r} is not a regular file ({kind}: a FIFO, device or socket?)")
    names = [posixpath.basename(p) for p in paths]
    duplicates = sorted(n for n, count in collections.Counter(names).items() if count > 1)
    if duplicates:
        raise ValueError(f"input file names must be unique (they are the record keys); repeated: {duplicates}")
    return paths


def plan_ranges(path: str, split_bytes: int) -> list[InputRange]:
    """Line-aligned ranges of about `split_bytes` (a few small reads at the boundaries)."""
    source = posixpath.basename(path)
    fs, fs_path = storage.url_to_fs(path)
    size = fs.size(fs_path)
    if infer_compression(path) is not None or size <= split_bytes:
        return [InputRange(path, source, 0, 0, None, True, infer_compression(path) is not None, size)]
    starts = [0]
    with fs.open(fs_path, "rb") as f:
        for nominal in range(split_bytes, size, split_bytes):
            if nominal <= starts[-1]:
                continue  # a line longer than split_bytes swallowed this boundary
            f.seek(nominal - 1)
            while chunk := f.read(1 << 16):
                newline = chunk.find(b"\n")
                if newline >= 0:
                    break
            else:
                break
            boundary = f.tell() - len(chunk) + newline + 1
            if boundary < size:
                starts.append(boundary)
    ends = starts[1:] + [None]
    return [InputRange(path, source, i, s, e, e is None, length=(size if e is None else e) - s)
            for i, (s, e) in enumerate(zip(starts, ends))]


def count_lines(rng: InputRange) -> int:
    """Newlines in a range that is not its file's last (so every line in it ends in one)."""
    count = 0
    for chunk, _ in _read_range(rng):
        count += chunk.count(b"\n")
    return count


class CountLines(WorkerDoFn):
    """range -> (source, (range index, newlines)), for `first_lines`."""

    def process(self, rng: InputRange):
        yield rng.source, (rng.index, count_lines(rng))


# What a damaged compressed stream raises (BadGzipFile is an OSError; bz2 raises OSError too). An OSError
# of the file underneath (EIO, a reset connection, a permission) is not damage: see `InputReadError`.
DECOMPRESSION_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError)


class _RawInput:
    """The compressed bytes of an input, handed to the decompressor: an OSError raised while reading them
    comes out as InputReadError, which no decompressor catches or raises, so it cannot pass for damage."""

    def __init__(self, raw, path: str):
        self._raw, self._path = raw, path

    def read(self, size: int = -1) -> bytes:
        try:
            return self._raw.read(size)
        except OSError as e:
            raise InputReadError(f"{self._path}: read failed: {type(e).__name__}: {e}") from e

    def __getattr__(self, name):
        return getattr(self._raw, name)


@contextlib.contextmanager
def _open_counted(path: str) -> Iterator[tuple[_RawInput, IO[bytes]]]:
    """The compressed input (its `tell()` is the compressed bytes read, for progress) and its decompressed stream."""
    with storage.open(path, "rb") as raw:
        counted = _RawInput(raw, path)
        with compr[infer_compression(path)](counted, mode="rb") as f:
            yield counted, f


def read_head(path: str, size: int) -> bytes | None:
    """The first `size` bytes of an input, decompressed; None if the compressed stream is damaged
    (the pipeline quarantines it), InputReadError if reading fails."""
    if infer_compression(path) is None:
        with storage.open(path, "rb") as f:
            return f.read(size)
    try:
        with _open_counted(path) as (_, f):
            return f.read(size)
    except DECOMPRESSION_ERRORS:
        return None


class _DecompressionFailed(Exception):
    def __init__(self, error: Exception, data: bytes):
        super().__init__(str(error))
        self.error, self.data = error, data


def _read_range(rng: InputRange) -> Iterator[tuple[bytes, int]]:
    """Chunks of the range's (decompressed) bytes, each with the raw bytes read for it."""
    if rng.compressed:
        yield from _read_compressed(rng.path)
        return
    with storage.open(rng.path, "rb") as f:
        f.seek(rng.start)
        remaining = None if rng.end is None else rng.end - rng.start
        while remaining is None or remaining > 0:
            chunk = f.read(READ_CHUNK_BYTES if remaining is None else min(READ_CHUNK_BYTES, remaining))
            if not chunk:
                return
            if remaining is not None:
                remaining -= len(chunk)
            yield chunk, len(chunk)


def _read_compressed(path: str) -> Iterator[tuple[bytes, int]]:
    """Decompressed chunks (with the compressed bytes read for each); on a damaged stream, raises
    _DecompressionFailed with the bytes decoded so far.

    `read1` hands over each decompressed piece as it comes: a plain `read(n)`
    would throw away everything it decoded before hitting the damage.
    """
    with _open_counted(path) as (raw, f):
        buffer, position = bytearray(), 0
        while True:
            try:
                piece = f.read1(READ_CHUNK_BYTES)
            except DECOMPRESSION_ERRORS as e:
                raise _DecompressionFailed(e, bytes(buffer)) from e
            if piece:
                buffer += piece
            if buffer and (not piece or len(buffer) >= READ_CHUNK_BYTES):
                yield bytes(buffer), raw.tell() - position
                position = raw.tell()
                buffer.clear()
            if not piece:
                return


def read_line_blocks(rng: InputRange, first_line: int,
                     max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[LineBlock | OverlongLine | TruncatedInput]:
    """Blocks of whole lines of one range (a last line without a newline gets one).

    A line longer than `max_line_bytes` comes out as an OverlongLine, and only
    its head is kept while the reader streams past the rest, so one huge line
    (a gzip bomb holds 600 MB in 0.6 MB) costs no more memory than a short one.
    A compressed file that ends early or is corrupt yields every whole line it
    held, then a TruncatedInput with the partial line it stopped in.
    """
    line, carry, raw_total = first_line, b"", 0
    overlong: list | None = None  # [head, bytes so far] of the line being streamed past
    chunks = _read_range(rng)
    while True:
        failure = None
        try:
            chunk, raw_bytes = next(chunks, (b"", 0))
        except _DecompressionFailed as e:
            failure, chunk, raw_bytes = e, e.data, 0
        raw_total += raw_bytes
        if raw_bytes:
            progress.report(bytes=raw_bytes)
        at_end = failure is None and not chunk
        if overlong is not None:
            newline = chunk.find(b"\n")
            rest = chunk if newline < 0 else chunk[:newline]
            overlong[0] += rest[:OVERLONG_HEAD_BYTES - len(overlong[0])]
            overlong[1] += len(rest)
            if newline < 0 and failure is None and not at_end:
                continue
            if newline < 0 and failure is not None:
                progress.report(parts=1, bytes=rng.length - raw_total, part_bytes=rng.length)
                yield TruncatedInput(rng.source, line, _error_text(failure.error), overlong[0])
                return
            yield OverlongLine(rng.source, line, overlong[1], overlong[0])
            line, chunk, overlong = line + 1, chunk[newline + 1:] if newline >= 0 else b"", None
        data = carry + chunk
        cut = data.rfind(b"\n") + 1
        carry = data[cut:]
        lines = data.count(b"\n", 0, cut)
        if lines:
            progress.report(rows=lines)
        if cut:
            yield from _overlong_lines_apart(rng.source, line, data[:cut], max_line_bytes)
            line += lines
        if failure is not None:
            progress.report(parts=1, bytes=rng.length - raw_total, part_bytes=rng.length)
            yield TruncatedInput(rng.source, line, _error_text(failure.error), carry[:max_line_bytes])
            return
        if at_end:
            progress.report(parts=1, rows=int(bool(carry)), part_bytes=raw_total)
            if carry:
                yield from _overlong_lines_apart(rng.source, line, carry + b"\n", max_line_bytes)
            return
        if len(carry) > max_line_bytes:
            overlong, carry = [carry[:OVERLONG_HEAD_BYTES], len(carry)], b""


def _error_text(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def _overlong_lines_apart(source: str, first_line: int, data: bytes, max_line_bytes: int
                          ) -> Iterator[LineBlock | OverlongLine]:
    """Complete lines as LineBlocks, with every line over the limit taken out as an OverlongLine.

    Every line is measured (not only the one left over at a chunk's end), so what is rejected does not depend on
    where chunks or ranges happen to fall.
    """
    if len(data) <= max_line_bytes + 1:
        yield LineBlock(source, first_line, data)
        return
    ends = np.flatnonzero(np.frombuffer(data, np.uint8) == 10)
    starts = np.concatenate([[0], ends[:-1] + 1])
    pos, pos_line = 0, first_line
    for i in np.flatnonzero(ends - starts > max_line_bytes).tolist():
        if starts[i] > pos:
            yield LineBlock(source, pos_line, data[pos:starts[i]])
        yield OverlongLine(source, first_line + i, int(ends[i] - starts[i]),
                           data[starts[i]:min(ends[i], starts[i] + OVERLONG_HEAD_BYTES)])
        pos, pos_line = int(ends[i]) + 1, first_line + i + 1
    if pos < len(data):
        yield LineBlock(source, pos_line, data[pos:])


def first_lines(counts: list[tuple[int, int]]) -> dict[int, int]:
    """Range index -> its first line number, from (index, newline count) of the earlier ranges."""
    line, firsts = 1, {0: 1}
    for index, count in sorted(counts):
        line += count
        firsts[index + 1] = line
    return firsts
