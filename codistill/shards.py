"""The shard contract: what a dataset's records are (`Block`, `Feature`, `Schema`) and how any file of a
dataset or a snapshot store is opened for reading (`open_regular_file`, `read_regular_file`).

A block is a dict of numpy arrays with the same leading length, one column `key` holding every row's key.
The codecs that store blocks as TFRecord or WebDataset shards are in `pipelines/formats.py`.

Files come from shared storage, so nothing about them is trusted: only a regular file is read (a FIFO
would hang the reader, a symlink to /dev/zero never end), opened locally without following a symlink and
without blocking, then checked with fstat (no race between the check and the read), and sized before one
byte is read. Other file systems are checked with `fs.info`.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from typing import IO

import numpy as np
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from codistill import storage

Block = dict[str, np.ndarray]


class ShardFormatError(ValueError):
    """A shard is truncated, corrupt or does not match its schema."""


@dataclass(frozen=True)
class Feature:
    dtype: str  # "bytes" (fixed-width), "object" (variable-length bytes; one-row records only) or a numpy dtype
    shape: tuple[int, ...] = ()  # per row
    # Set for one-row-per-record schemas (all features or none): where the column is stored.
    tfrecord: str | None = None  # the Example's feature key, e.g. "image/encoded"
    webdataset: str | None = None  # a member extension ("jpg", "cls"), or "json": a field of <sample>.json

    def to_json(self) -> dict:
        raw = {"dtype": self.dtype, "shape": list(self.shape)}
        return raw | {k: v for k, v in (("tfrecord", self.tfrecord), ("webdataset", self.webdataset)) if v}

    @classmethod
    def from_json(cls, raw: dict) -> "Feature":
        return cls(raw["dtype"], tuple(raw["shape"]), raw.get("tfrecord"), raw.get("webdataset"))


Schema = dict[str, Feature]


def open_regular_file(url: str, expect_bytes: int | None = None, *, max_bytes: int | None = None,
                      fs: AbstractFileSystem | None = None, error: type[Exception] = ShardFormatError) -> IO[bytes]:
    """`url` opened for reading if it is a regular file (of `expect_bytes`, or at most `max_bytes`, when given);
    `error` (a ShardFormatError by default) for anything else. FileNotFoundError passes through.
    With `fs`, `url` is a path on that file system."""
    fs, path = (fs, url) if fs is not None else storage.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        return _open_local(path, url, expect_bytes, max_bytes, error)
    _check_size(_remote_size(fs, path, url, error), url, expect_bytes, max_bytes, error)
    return fs.open(path, "rb")


def read_regular_file(url: str, max_bytes: int, *, fs: AbstractFileSystem | None = None,
                      error: type[Exception] = ShardFormatError) -> bytes:
    """The bytes of a regular file of at most `max_bytes`, checked as by `open_regular_file` (and read with one
    bounded range request on other file systems); checked again after the read, in case it grew."""
    fs, path = (fs, url) if fs is not None else storage.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        with _open_local(path, url, None, max_bytes, error) as f:
            data = f.read(max_bytes + 1)
    else:
        _check_size(_remote_size(fs, path, url, error), url, None, max_bytes, error)
        data = fs.cat_file(path, start=0, end=max_bytes + 1)
    if len(data) > max_bytes:
        raise error(f"{url}: more than the {max_bytes} bytes expected")
    return data


def _open_local(path: str, url: str, expect_bytes: int | None, max_bytes: int | None,
                error: type[Exception]) -> IO[bytes]:
    try:  # O_NONBLOCK: opening a FIFO must not wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise error(f"{url}: a symbolic link; only regular files are read") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{url}: not a regular file (a FIFO, device or directory?)")
        _check_size(info.st_size, url, expect_bytes, max_bytes, error)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _remote_size(fs: AbstractFileSystem, path: str, url: str, error: type[Exception]) -> int | None:
    info = fs.info(path)
    if info.get("type") != "file" or info.get("islink"):
        raise error(f"{url}: not a regular file ({info.get('type')})")
    return info.get("size")


def _check_size(size: int | None, url: str, expect_bytes: int | None, max_bytes: int | None,
                error: type[Exception]) -> None:
    if expect_bytes is not None and size != expect_bytes:
        raise error(f"{url} has {size} bytes, manifest says {expect_bytes}")
    if max_bytes is not None and not (isinstance(size, int) and size <= max_bytes):
        raise error(f"{url}: {size} bytes, more than the {max_bytes} expected")
