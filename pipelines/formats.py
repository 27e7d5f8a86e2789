"""Shard formats: TFRecord of `tf.train.Example` and WebDataset tar, both ways.

A shard holds *records*; each record is a block of rows (a dict of numpy
arrays with the same leading length, one column `key` holding every row's
key). Block records keep Beam and the readers at numpy speed instead of
paying per-row costs.

TFRecord: each record is one `tf.train.Example` (framing: length, masked
CRC32C of the length, payload, masked CRC32C of the payload). Columns map to
features by dtype:

* `bytes` columns (e.g. `key`)  -> `bytes_list`, one entry per row;
* `float32` columns             -> `float_list`, row-major, rows x prod(shape);
* integer columns               -> `bytes_list` with ONE entry: the raw
  little-endian array (decode with `tf.io.decode_raw(x, tf.int32)` or
  `np.frombuffer(x, "<i4")`), because varint-packing millions of ids per
  second is where a Python writer would spend its time.

The Example is encoded by hand (a few lines of protobuf wire format) for the
same reason: protobuf's Python API costs ~2 us per row here. The tests parse
our bytes with the `tfrecord` package's protobuf classes to prove they are
real Examples.

WebDataset: each record is one sample `<prefix>-<index:06d>` with one member
per column, `<sample>.<column>.npy` (standard `.npy`; keys as a fixed-width
bytes array), members sorted, fixed mtime and owner, so shards are
byte-reproducible and `webdataset.WebDataset(...).decode()` reads them.
"""

from __future__ import annotations

import hashlib
import io
import struct
import tarfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO

import google_crc32c
import numpy as np
import webdataset as wds

from codistill import storage

EXTENSIONS = {"tfrecord": "tfrecord", "webdataset": "tar"}

Block = dict[str, np.ndarray]


class ShardFormatError(ValueError):
    """A shard is truncated, corrupt or does not match its schema."""


@dataclass(frozen=True)
class Feature:
    dtype: str  # "bytes" or a numpy dtype name
    shape: tuple[int, ...] = ()  # per row

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, raw: dict) -> "Feature":
        return cls(raw["dtype"], tuple(raw["shape"]))


Schema = dict[str, Feature]


def block_rows(block: Block) -> int:
    return len(block["key"])


def concat_blocks(blocks: list[Block]) -> Block:
    return {name: np.concatenate([b[name] for b in blocks]) for name in blocks[0]}


def rebatch(blocks: Iterable[Block], rows_per_record: int) -> Iterator[Block]:
    """The same rows in the same order, cut into records of exactly `rows_per_record` (the last may be short).

    Records then depend only on the rows, not on how the input was split into pieces.
    """
    pending, count = [], 0
    for block in blocks:
        size, start = len(block["key"]), 0
        while start < size:
            take = min(rows_per_record - count, size - start)
            pending.append({name: column[start:start + take] for name, column in block.items()})
            count, start = count + take, start + take
            if count == rows_per_record:
                yield concat_blocks(pending)
                pending, count = [], 0
    if count:
        yield concat_blocks(pending)


# --- protobuf wire format for tf.train.Example ----------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _bytes_entries(column: np.ndarray) -> bytes:
    """Repeated `bytes` field 1 for every value of a fixed-width bytes array, built with numpy."""
    lengths = np.strings.str_len(column)
    if len(column) == 0 or lengths.max() >= 0x80:  # long values need multi-byte length varints
        return b"".join(b"\x0a" + _varint(len(v)) + v for v in column.tolist())
    width = column.dtype.itemsize
    table = np.empty((len(column), width + 2), np.uint8)
    table[:, 0] = 0x0A
    table[:, 1] = lengths
    table[:, 2:] = np.ascontiguousarray(column).view(np.uint8).reshape(len(column), width)
    return table[np.arange(width + 2) < lengths[:, None] + 2].tobytes()


def encode_example(block: Block, schema: Schema) -> bytes:
    features = []
    for name, feature in schema.items():
        column = block[name]
        if feature.dtype == "bytes":
            value = _field(1, _bytes_entries(column))  # Feature.bytes_list
        elif feature.dtype == "float32":
            value = _field(2, _field(1, column.astype("<f4", copy=False).tobytes()))  # float_list, packed
        else:
            raw = column.astype(np.dtype(feature.dtype).newbyteorder("<"), copy=False).tobytes()
            value = _field(1, _field(1, raw))  # bytes_list holding the raw array
        features.append(_field(1, _field(1, name.encode()) + _field(2, value)))  # map<string, Feature> entry
    return _field(1, b"".join(features))  # Example.features


_KINDS = {1: "bytes_list", 2: "float_list", 3: "int64_list"}


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ShardFormatError("truncated protobuf varint")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, memoryview]]:
    """(field number, payload) of each length-delimited field in a message."""
    pos = 0
    while pos < len(buf):
        tag, pos = _read_varint(buf, pos)
        if tag & 7 != 2:
            raise ShardFormatError(f"unexpected protobuf wire type {tag & 7} in a block Example")
        size, pos = _read_varint(buf, pos)
        if pos + size > len(buf):
            raise ShardFormatError("truncated protobuf field")
        yield tag >> 3, buf[pos:pos + size]
        pos += size


def _bytes_values(buf: memoryview) -> list[bytes]:
    """The entries of a bytes_list (a tight loop: one-byte lengths are the common case)."""
    values, pos, end = [], 0, len(buf)
    while pos < end:
        if buf[pos] != 0x0A:
            raise ShardFormatError("malformed bytes_list in a block Example")
        size, pos = (buf[pos + 1], pos + 2) if pos + 1 < end and buf[pos + 1] < 0x80 else _read_varint(buf, pos + 1)
        if pos + size > end:
            raise ShardFormatError("truncated protobuf field")
        values.append(bytes(buf[pos:pos + size]))
        pos += size
    return values


def decode_example(payload: bytes, schema: Schema) -> Block:
    try:
        return _decode_example(payload, schema)
    except (KeyError, ValueError, UnicodeDecodeError) as e:  # ShardFormatError is a ValueError too
        if isinstance(e, ShardFormatError):
            raise
        raise ShardFormatError(f"malformed block Example: {type(e).__name__}: {e}") from None


def _decode_example(payload: bytes, schema: Schema) -> Block:
    raw: dict[str, tuple[int, memoryview]] = {}
    for _, features in _fields(memoryview(payload)):
        for _, entry in _fields(features):
            parts = dict(_fields(entry))
            (kind, values), = _fields(parts[2])
            raw[bytes(parts[1]).decode()] = (kind, values)
    block = {}
    for name, feature in schema.items():
        if name not in raw:
            raise ShardFormatError(f"record has no feature {name!r}")
        kind, values = raw[name]
        expected = 2 if feature.dtype == "float32" else 1
        if kind != expected:
            raise ShardFormatError(f"feature {name!r} is stored as {_KINDS.get(kind, kind)}, "
                                   f"the schema's {feature.dtype} needs {_KINDS[expected]}")
        if feature.dtype == "bytes":
            block[name] = np.array(_bytes_values(values), dtype=np.bytes_)
        else:
            values = [v for _, v in _fields(values)]
            dtype = np.dtype("<f4" if feature.dtype == "float32" else np.dtype(feature.dtype).newbyteorder("<"))
            flat = np.frombuffer(values[0], dtype=dtype) if values else np.empty(0, dtype)
            if flat.size % max(1, int(np.prod(feature.shape))):
                raise ShardFormatError(f"feature {name!r} has shape ({flat.size},), not a whole number of "
                                       f"rows of shape {feature.shape}")
            block[name] = flat.reshape((-1, *feature.shape)).astype(dtype.newbyteorder("="), copy=False)
    return _checked(block, schema)


# --- TFRecord framing ---------------------------------------------------------------------------


def _masked_crc(data: bytes) -> bytes:
    crc = google_crc32c.value(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def frame_record(payload: bytes) -> bytes:
    header = struct.pack("<Q", len(payload))
    return header + _masked_crc(header) + payload + _masked_crc(payload)


def iter_tfrecord(stream: IO[bytes]) -> Iterator[bytes]:
    index = 0
    while header := stream.read(12):
        if len(header) < 12:
            raise ShardFormatError(f"record {index}: truncated length header")
        if _masked_crc(header[:8]) != header[8:]:
            raise ShardFormatError(f"record {index}: length CRC mismatch (corrupt shard)")
        (size,) = struct.unpack("<Q", header[:8])
        body = stream.read(size + 4)
        if len(body) < size + 4:
            raise ShardFormatError(f"record {index}: truncated payload")
        if _masked_crc(body[:size]) != body[size:]:
            raise ShardFormatError(f"record {index}: payload CRC mismatch (corrupt shard)")
        yield body[:size]
        index += 1


# --- WebDataset ---------------------------------------------------------------------------------


class _StrictTarInfo(tarfile.TarInfo):
    """tarfile takes end of file where a header should be as the end of the archive; a shard cut
    between two samples would then read back short without a word. Demand the end-of-archive blocks."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):
            raise ShardFormatError("bad tar shard: truncated (it ends without the end-of-archive blocks)") from None


def _iter_tar_samples(stream: IO[bytes], schema: Schema) -> Iterator[Block]:
    """Samples of a WebDataset tar: adjacent members sharing the key before the first dot."""
    sample_key, sample = None, {}
    try:
        with tarfile.open(fileobj=stream, mode="r|", tarinfo=_StrictTarInfo) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, suffix = member.name.partition(".")
                if key != sample_key and sample:
                    yield _npy_block(sample_key, sample, schema)
                    sample = {}
                sample_key = key
                sample[suffix] = tar.extractfile(member).read()
    except tarfile.TarError as e:
        raise ShardFormatError(f"bad tar shard: {e}") from None
    if sample:
        yield _npy_block(sample_key, sample, schema)


def _npy_block(key: str, sample: dict[str, bytes], schema: Schema) -> Block:
    block = {}
    for name in schema:
        data = sample.get(f"{name}.npy")
        if data is None:
            raise ShardFormatError(f"sample {key!r} has no member {name}.npy (truncated shard?)")
        try:
            block[name] = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
        except ValueError as e:
            raise ShardFormatError(f"sample {key!r}: bad {name}.npy: {e}") from None
    return _checked(block, schema)


def _checked(block: Block, schema: Schema) -> Block:
    rows = len(block["key"])
    for name, feature in schema.items():
        if block[name].shape[1:] != feature.shape or len(block[name]) != rows:
            raise ShardFormatError(
                f"feature {name!r} has shape {block[name].shape}, expected ({rows}, *{feature.shape})")
    return block


# --- shard files --------------------------------------------------------------------------------


class _HashingWriter:
    """File wrapper that counts and hashes the bytes on their way out."""

    def __init__(self, raw: IO[bytes]):
        self.raw, self.sha256, self.bytes = raw, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.raw.write(data)


@dataclass(frozen=True)
class WrittenShard:
    path: str
    records: int  # rows
    bytes: int
    sha256: str


def write_shard(url: str, blocks: list[Block], schema: Schema, fmt: str, sample_prefix: str) -> WrittenShard:
    """Write records to `url` through a temp file and a rename, so readers never see half a shard."""
    fs, path = storage.url_to_fs(url)
    parent, name = path.rsplit("/", 1)
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{name}"
    rows = 0
    with fs.open(tmp, "wb") as raw:
        out = _HashingWriter(raw)
        if fmt == "tfrecord":
            for block in blocks:
                out.write(frame_record(encode_example(block, schema)))
                rows += block_rows(block)
        else:
            # A fixed mtime and owner make the tar byte-reproducible.
            writer = wds.TarWriter(out, user="codistill", group="codistill", mtime=0)
            for index, block in enumerate(blocks):
                sample = {f"{col}.npy": np.ascontiguousarray(block[col]) for col in schema}
                writer.write({"__key__": f"{sample_prefix}-{index:06d}", **sample})
                rows += block_rows(block)
            writer.close()
    fs.mv(tmp, path)
    return WrittenShard(url, rows, out.bytes, out.sha256.hexdigest())


def read_shard(url: str, schema: Schema, fmt: str, expect_sha256: str | None = None) -> Iterator[Block]:
    """Blocks of a shard, streamed; with `expect_sha256`, the whole shard is read and checked first,
    so not one row of a shard that is not the one indexed ever reaches the caller."""
    with storage.open(url, "rb") as raw:
        stream: IO[bytes] = raw
        if expect_sha256 is not None:
            data = raw.read()
            if hashlib.sha256(data).hexdigest() != expect_sha256:
                raise ShardFormatError(f"{url}: sha256 {hashlib.sha256(data).hexdigest()} does not match the manifest")
            stream = io.BytesIO(data)
        yield from iter_blocks(stream, schema, fmt)


def iter_blocks(stream: IO[bytes], schema: Schema, fmt: str) -> Iterator[Block]:
    if fmt == "tfrecord":
        for payload in iter_tfrecord(stream):
            yield decode_example(payload, schema)
    else:
        yield from _iter_tar_samples(stream, schema)
