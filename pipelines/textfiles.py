"""Line-oriented input files, split into line-aligned byte ranges that workers read in parallel.

Records are keyed by (file name, line number), so a worker reading the middle
of a file must know how many lines came before: a cheap first pass counts the
newlines of every range but the last of each file, and the prefix sums give
each range its first line number. Compressed files cannot be split: each is
one range, read from the start, so no counting is needed for them.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
from fsspec.utils import infer_compression

READ_CHUNK_BYTES = 4 << 20


@dataclass(frozen=True)
class InputRange:
    path: str
    source: str  # the file name: the first half of every record key
    index: int  # position among the file's ranges
    start: int  # byte offset of a line start
    end: int | None  # byte offset just after a newline; None = to the end of the file
    last: bool


@dataclass(frozen=True)
class LineBlock:
    """Complete lines of one input file, starting at 1-based line `first_line`, always ending in a newline."""

    source: str
    first_line: int
    data: bytes


@dataclass(frozen=True)
class TruncatedInput:
    """A compressed file ended early; `tail` is the partial line it stopped in."""

    source: str
    line: int
    error: str
    tail: bytes


def expand_inputs(pattern: str) -> list[str]:
    """Every file matching a glob (or a comma-separated list of globs), with its protocol."""
    paths = []
    for part in pattern.split(","):
        fs, _ = fsspec.core.url_to_fs(part)
        found = sorted(fs.glob(part)) if any(c in part for c in "*?[") else ([part] if fs.exists(part) else [])
        if not found:
            raise FileNotFoundError(f"no input files match {part!r}")
        paths += [fs.unstrip_protocol(p) if "://" in part else p for p in found]
    names = [posixpath.basename(p) for p in paths]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"input file names must be unique (they are the record keys); repeated: {duplicates}")
    return paths


def plan_ranges(path: str, split_bytes: int) -> list[InputRange]:
    """Line-aligned ranges of about `split_bytes` (a few small reads at the boundaries)."""
    source = posixpath.basename(path)
    fs, fs_path = fsspec.core.url_to_fs(path)
    size = fs.size(fs_path)
    if infer_compression(path) is not None or size <= split_bytes:
        return [InputRange(path, source, 0, 0, None, True)]
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
    return [InputRange(path, source, i, s, e, e is None) for i, (s, e) in enumerate(zip(starts, ends))]


def count_lines(rng: InputRange) -> int:
    """Newlines in a range that is not its file's last (so every line in it ends in one)."""
    count = 0
    for chunk in _read_range(rng):
        count += chunk.count(b"\n")
    return count


def _read_range(rng: InputRange) -> Iterator[bytes]:
    with fsspec.open(rng.path, "rb", compression="infer") as f:
        f.seek(rng.start)
        remaining = None if rng.end is None else rng.end - rng.start
        while remaining is None or remaining > 0:
            chunk = f.read(READ_CHUNK_BYTES if remaining is None else min(READ_CHUNK_BYTES, remaining))
            if not chunk:
                return
            if remaining is not None:
                remaining -= len(chunk)
            yield chunk


def read_line_blocks(rng: InputRange, first_line: int) -> Iterator[LineBlock | TruncatedInput]:
    """Blocks of whole lines of one range (a last line without a newline gets one).

    A compressed file that ends early yields what it held, then a TruncatedInput
    with the partial line it stopped in.
    """
    line, carry = first_line, b""
    chunks = _read_range(rng)
    while True:
        try:
            chunk = next(chunks, b"")
        except (EOFError, OSError) as e:  # gzip/zlib: truncated or corrupt stream
            yield TruncatedInput(rng.source, line, f"{type(e).__name__}: {e}", carry)
            return
        if not chunk:
            if carry:
                yield LineBlock(rng.source, line, carry + b"\n")
            return
        data = carry + chunk
        cut = data.rfind(b"\n") + 1
        carry = data[cut:]
        if cut:
            yield LineBlock(rng.source, line, data[:cut])
            line += data.count(b"\n", 0, cut)


def first_lines(counts: list[tuple[int, int]]) -> dict[int, int]:
    """Range index -> its first line number, from (index, newline count) of the earlier ranges."""
    line, firsts = 1, {0: 1}
    for index, count in sorted(counts):
        line += count
        firsts[index + 1] = line
    return firsts
