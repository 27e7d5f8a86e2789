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

import lzma
import posixpath
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from fsspec.compression import compr
from fsspec.utils import infer_compression

from codistill import storage
from pipelines import progress
from pipelines.run import WorkerDoFn

READ_CHUNK_BYTES = 4 << 20


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
class TruncatedInput:
    """A compressed file ended early or is corrupt; `tail` is the partial line it stopped in."""

    source: str
    line: int
    error: str
    tail: bytes


def expand_inputs(pattern: str) -> list[str]:
    """Every file matching a glob (or a comma-separated list of globs), with its protocol."""
    paths = []
    for part in pattern.split(","):
        fs, _ = storage.url_to_fs(part)
        found = sorted(fs.glob(part)) if any(c in part for c in "*?[") else ([part] if fs.exists(part) else [])
        if not found:
            raise FileNotFoundError(f"no input files match {part!r}")
        directories = [p for p in found if fs.isdir(p)]
        if directories:
            raise IsADirectoryError(f"input {directories[0]!r} is a directory; give files or a glob such as "
                                    f"{directories[0].rstrip('/')}/*")
        paths += [fs.unstrip_protocol(p) if "://" in part else p for p in found]
    names = [posixpath.basename(p) for p in paths]
    duplicates = sorted({n for n in names if names.count(n) > 1})
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


# What a damaged compressed stream raises (BadGzipFile is an OSError; bz2 raises OSError too).
DECOMPRESSION_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError)


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
    with storage.open(path, "rb") as raw, compr[infer_compression(path)](raw, mode="rb") as f:
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


def read_line_blocks(rng: InputRange, first_line: int) -> Iterator[LineBlock | TruncatedInput]:
    """Blocks of whole lines of one range (a last line without a newline gets one).

    A compressed file that ends early or is corrupt yields every whole line it
    held, then a TruncatedInput with the partial line it stopped in.
    """
    line, carry, raw_total = first_line, b"", 0
    chunks = _read_range(rng)
    while True:
        failure = None
        try:
            chunk, raw_bytes = next(chunks, (b"", 0))
        except _DecompressionFailed as e:
            failure, chunk, raw_bytes = e, e.data, 0
        raw_total += raw_bytes
        data = carry + chunk
        cut = data.rfind(b"\n") + 1
        carry = data[cut:]
        lines = data.count(b"\n", 0, cut)
        progress.report(bytes=raw_bytes, rows=lines)
        if cut:
            yield LineBlock(rng.source, line, data[:cut])
            line += lines
        if failure is not None:
            progress.report(parts=1, bytes=rng.length - raw_total, part_bytes=rng.length)
            yield TruncatedInput(rng.source, line, f"{type(failure.error).__name__}: {failure.error}", carry)
            return
        if not chunk:
            progress.report(parts=1, rows=int(bool(carry)), part_bytes=raw_total)
            if carry:
                yield LineBlock(rng.source, line, carry + b"\n")
            return


def first_lines(counts: list[tuple[int, int]]) -> dict[int, int]:
    """Range index -> its first line number, from (index, newline count) of the earlier ranges."""
    line, firsts = 1, {0: 1}
    for index, count in sorted(counts):
        line += count
        firsts[index + 1] = line
    return firsts
