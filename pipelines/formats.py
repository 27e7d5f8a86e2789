"""Shard formats: TFRecord of `tf.train.Example` and WebDataset tar, both ways.

A shard holds *records*; each record is a block of rows (`codistill.shards.Block`:
a dict of numpy arrays with the same leading length, one column `key` holding
every row's key). Block records keep Beam and the readers at numpy speed
instead of paying per-row costs. The schema types and how a shard file is
opened (a regular file only, of the indexed size) are the shard contract in
`codistill/shards.py`; this module is the codecs.

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

One row per record: a schema whose features name where they are stored
(`Feature.tfrecord`, `Feature.webdataset`) is written the way existing readers
of such data expect (e.g. the TensorFlow ImageNet converters' `image/encoded`,
`image/class/label`): each row is one Example with standard feature types
(bytes -> `bytes_list`, integers -> `int64_list`, float32 -> `float_list`), or
one WebDataset sample whose members are named by extension (`<sample>.jpg`,
`<sample>.cls`) with the remaining columns as fields of `<sample>.json`.
Columns of dtype `object` hold variable-length bytes (numpy object arrays).
Readers still yield blocks (of up to `READ_BLOCK_ROWS` rows).

Readers cap the size of every record and tar member (`max_record_bytes`), so a
hostile shard claiming a huge length fails with a clear error instead of
allocating it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import struct
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO

import google_crc32c
import numpy as np
import webdataset as wds

from codistill import storage
from codistill.shards import Block, Schema, ShardFormatError, open_regular_file

EXTENSIONS = {"tfrecord": "tfrecord", "webdataset": "tar"}
# Default cap on one stored record (TFRecord payload, tar member): records are ~100 kB (a block of rows, or
# one image); a length field or tar header claiming more is hostile or corrupt.
MAX_RECORD_BYTES = 256 << 20

READ_BLOCK_ROWS = 64  # rows per block yielded when reading one-row-per-record shards


def one_row_per_record(schema: Schema) -> bool:
    """Whether the schema stores each row as its own record (its features say where), else blocks of rows."""
    stored = [f.tfrecord is not None for f in schema.values()]
    if not any(stored):
        return False
    problems = [f"{name}: needs both `tfrecord` and `webdataset` and shape ()" for name, f in schema.items()
                if f.tfrecord is None or f.webdataset is None or f.shape != ()]
    members = [f.webdataset for f in schema.values() if f.webdataset != "json"]
    if len(set(members)) != len(members) or len({f.tfrecord for f in schema.values()}) != len(schema):
        problems.append("two columns stored in the same place")
    if problems:
        raise ValueError("not a valid one-row-per-record schema: " + "; ".join(problems))
    return True


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


_ONE_BYTE = [bytes((v,)) for v in range(0x80)]  # varints below 128: the tags and most lengths


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _ONE_BYTE[value]
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


def _decoded(decode, payload: bytes, schema: Schema, what: str):
    """`decode(payload, schema)`; whatever a malformed payload raises becomes a ShardFormatError naming `what`."""
    try:
        return decode(payload, schema)
    except (KeyError, ValueError, UnicodeDecodeError, struct.error) as e:  # ShardFormatError is a ValueError too
        if isinstance(e, ShardFormatError):
            raise
        raise ShardFormatError(f"malformed {what}: {type(e).__name__}: {e}") from None


def decode_example(payload: bytes, schema: Schema) -> Block:
    return _decoded(_decode_example, payload, schema, "block Example")


def _example_features(payload: bytes) -> dict[str, tuple[int, memoryview]]:
    """An Example's features by name: (the kind of list, its encoded values)."""
    raw: dict[str, tuple[int, memoryview]] = {}
    for _, features in _fields(memoryview(payload)):
        for _, entry in _fields(features):
            parts = dict(_fields(entry))
            (kind, values), = _fields(parts[2])
            raw[bytes(parts[1]).decode()] = (kind, values)
    return raw


def _decode_example(payload: bytes, schema: Schema) -> Block:
    raw = _example_features(payload)
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


# --- one row per record ---------------------------------------------------------------------------

_SIGN = 1 << 64


def _row_values(block: Block, schema: Schema) -> Iterator[dict]:
    """Each row of a block as {column: Python value} (bytes, int or float)."""
    columns = {name: block[name].tolist() for name in schema}
    for i in range(block_rows(block)):
        yield {name: values[i] for name, values in columns.items()}


@functools.lru_cache(maxsize=1024)
def _feature_key(name: str) -> bytes:
    return _field(1, name.encode())


def encode_row_example(row: dict, schema: Schema) -> bytes:
    features = []
    for name, feature in schema.items():
        value = row[name]
        if feature.dtype in ("bytes", "object"):
            stored = _field(1, _field(1, value))  # bytes_list with one entry
        elif feature.dtype == "float32":
            stored = _field(2, _field(1, struct.pack("<f", value)))  # float_list
        else:
            stored = _field(3, _field(1, _varint(value % _SIGN)))  # int64_list (two's complement varint)
        features.append(_field(1, _feature_key(feature.tfrecord) + _field(2, stored)))
    return _field(1, b"".join(features))


def _decode_row_example(payload: bytes, schema: Schema) -> dict:
    raw = _example_features(payload)
    row = {}
    for name, feature in schema.items():
        if feature.tfrecord not in raw:
            raise ShardFormatError(f"record has no feature {feature.tfrecord!r}")
        kind, values = raw[feature.tfrecord]
        expected = {"bytes": 1, "object": 1, "float32": 2}.get(feature.dtype, 3)
        if kind != expected:
            raise ShardFormatError(f"feature {feature.tfrecord!r} is stored as {_KINDS.get(kind, kind)}, "
                                   f"the schema's {feature.dtype} needs {_KINDS[expected]}")
        entries = [v for _, v in _fields(values)]
        if kind == 1:
            items = _bytes_values(values)
        elif kind == 2:
            items = list(struct.unpack(f"<{len(entries[0]) // 4}f", entries[0])) if entries else []
        else:
            items, pos, packed = [], 0, entries[0] if entries else memoryview(b"")
            while pos < len(packed):
                value, pos = _read_varint(packed, pos)
                items.append(value - _SIGN if value >= 1 << 63 else value)
        if len(items) != 1:
            raise ShardFormatError(f"feature {feature.tfrecord!r} holds {len(items)} values, expected 1")
        row[name] = items[0]
    return row


def _sample_of_row(row: dict, schema: Schema, key: str) -> dict:
    sample, meta = {"__key__": key}, {}
    for name, feature in schema.items():
        value = row[name]
        if feature.webdataset == "json":
            meta[name] = value.decode() if isinstance(value, bytes) else value
        else:
            sample[feature.webdataset] = value if isinstance(value, bytes) else str(value).encode()
    if meta:
        sample["json"] = json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return sample


def _row_of_sample(key: str, sample: dict[str, bytes], schema: Schema) -> dict:
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
        row = {}
        for name, feature in schema.items():
            value = meta[name] if feature.webdataset == "json" else sample[feature.webdataset]
            if feature.dtype in ("bytes", "object"):
                row[name] = value.encode() if isinstance(value, str) else value
            elif feature.dtype == "float32":
                row[name] = float(value)
            else:
                row[name] = int(value)
        return row
    except KeyError as e:
        raise ShardFormatError(f"sample {key!r} has no {e} (truncated shard?)") from None
    except (ValueError, TypeError, AttributeError) as e:
        raise ShardFormatError(f"sample {key!r}: malformed value: {type(e).__name__}: {e}") from None


def _rows_to_block(rows: list[dict], schema: Schema) -> Block:
    block = {}
    for name, feature in schema.items():
        values = [row[name] for row in rows]
        if feature.dtype == "object":
            column = np.empty(len(values), object)
            column[:] = values
        elif feature.dtype == "bytes":
            column = np.array(values, dtype=np.bytes_)
        else:
            column = np.array(values, dtype=feature.dtype)
        block[name] = column
    return block


def _blocks_of_rows(rows: Iterator[dict], schema: Schema) -> Iterator[Block]:
    pending = []
    for row in rows:
        pending.append(row)
        if len(pending) == READ_BLOCK_ROWS:
            yield _rows_to_block(pending, schema)
            pending = []
    if pending:
        yield _rows_to_block(pending, schema)


# --- TFRecord framing ---------------------------------------------------------------------------


def _masked_crc(data: bytes) -> bytes:
    crc = google_crc32c.value(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def frame_record(payload: bytes) -> bytes:
    header = struct.pack("<Q", len(payload))
    return header + _masked_crc(header) + payload + _masked_crc(payload)


def iter_tfrecord(stream: IO[bytes], max_record_bytes: int = MAX_RECORD_BYTES,
                  offsets: list[int] | None = None) -> Iterator[bytes]:
    """The payloads of a TFRecord stream; with `offsets`, where each record starts is appended to it."""
    index, pos = 0, 0
    while header := stream.read(12):
        if offsets is not None:
            offsets.append(pos)
        if len(header) < 12:
            raise ShardFormatError(f"record {index}: truncated length header")
        if _masked_crc(header[:8]) != header[8:]:
            raise ShardFormatError(f"record {index}: length CRC mismatch (corrupt shard)")
        (size,) = struct.unpack("<Q", header[:8])
        if size > max_record_bytes:  # read(size) would allocate it before finding the shard shorter
            raise ShardFormatError(f"record {index}: length {size} is over the {max_record_bytes}-byte record limit")
        body = stream.read(size + 4)
        if len(body) < size + 4:
            raise ShardFormatError(f"record {index}: truncated payload")
        if _masked_crc(body[:size]) != body[size:]:
            raise ShardFormatError(f"record {index}: payload CRC mismatch (corrupt shard)")
        yield body[:size]
        index, pos = index + 1, pos + 16 + size


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


def _iter_tar_samples(stream: IO[bytes], max_member_bytes: int) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) of a WebDataset tar: adjacent members sharing the key before the first dot."""
    sample_key, sample = None, {}
    try:
        with tarfile.open(fileobj=stream, mode="r|", tarinfo=_StrictTarInfo) as tar:
            for member in tar:
                if member.isdir():
                    continue
                if not member.isfile() or member.issparse():  # a sparse member of 10 KB can expand to terabytes
                    raise ShardFormatError(f"bad tar shard: member {member.name[:80]!r} is not a plain file")
                if member.size > max_member_bytes:
                    raise ShardFormatError(f"bad tar shard: member {member.name[:80]!r} has {member.size} bytes, "
                                           f"over the {max_member_bytes}-byte record limit")
                key, _, suffix = member.name.partition(".")
                if key != sample_key and sample:
                    yield sample_key, sample
                    sample = {}
                sample_key = key
                sample[suffix] = tar.extractfile(member).read()
    except tarfile.TarError as e:
        raise ShardFormatError(f"bad tar shard: {e}") from None
    if sample:
        yield sample_key, sample


def _npy_block(key: str, sample: dict[str, bytes], schema: Schema) -> Block:
    block = {}
    for name in schema:
        data = sample.get(f"{name}.npy")
        if data is None:
            raise ShardFormatError(f"sample {key!r} has no member {name}.npy (truncated shard?)")
        try:
            block[name] = _npy_array(data)
        except ValueError as e:
            raise ShardFormatError(f"sample {key!r}: bad {name}.npy: {e}") from None
    return _checked(block, schema)


def _npy_array(data: bytes) -> np.ndarray:
    """A `.npy` member, read only if its header's shape and dtype account for exactly the bytes present
    (`np.lib.format.read_array` allocates whatever the header claims before reading)."""
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise ValueError(f"npy format version {version} is not supported")
    shape, fortran_order, dtype = readers[version](stream)
    if dtype.hasobject:
        raise ValueError("object arrays (pickles) are refused")
    count = int(np.prod(shape, dtype=object))
    if count * dtype.itemsize != len(data) - stream.tell():
        raise ValueError(f"the header says shape {shape} of {dtype}, but {len(data) - stream.tell()} bytes follow")
    array = np.frombuffer(data, dtype, count=count, offset=stream.tell())
    return array.reshape(shape[::-1]).T if fortran_order else array.reshape(shape)


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
    offsets: tuple[int, ...] = ()  # TFRecord: where each record starts (for seekable indexes)


def dali_index(offsets: tuple[int, ...], total_bytes: int) -> str:
    """DALI's TFRecord index (`tfrecord2idx`): one `<offset> <framed size>` line per record."""
    ends = (*offsets[1:], total_bytes)
    return "".join(f"{start} {end - start}\n" for start, end in zip(offsets, ends))


def dali_index_path(relative: str) -> str:
    """Where a TFRecord shard's DALI index goes in the dataset: `idx/<shard path without extension>.idx`."""
    return f"idx/{relative.rsplit('.', 1)[0]}.idx"


def write_shard(url: str, blocks: list[Block], schema: Schema, fmt: str, sample_prefix: str) -> WrittenShard:
    """Write records to `url` atomically (`storage.atomic_writer`), so readers never see half a shard."""
    rows, offsets = 0, []
    by_row = one_row_per_record(schema)
    with storage.atomic_writer(url) as raw:
        out = _HashingWriter(raw)
        if fmt == "tfrecord":
            for block in blocks:
                payloads = ((encode_row_example(row, schema) for row in _row_values(block, schema)) if by_row
                            else [encode_example(block, schema)])
                for payload in payloads:
                    offsets.append(out.bytes)
                    out.write(frame_record(payload))
                rows += block_rows(block)
        else:
            # A fixed mtime and owner make the tar byte-reproducible.
            writer = wds.TarWriter(out, user="codistill", group="codistill", mtime=0)
            for index, block in enumerate(blocks):
                if by_row:
                    for row in _row_values(block, schema):
                        writer.write(_sample_of_row(row, schema, f"{sample_prefix}-{rows:06d}"))
                        rows += 1
                else:
                    sample = {f"{col}.npy": np.ascontiguousarray(block[col]) for col in schema}
                    writer.write({"__key__": f"{sample_prefix}-{index:06d}", **sample})
                    rows += block_rows(block)
            writer.close()
    return WrittenShard(url, rows, out.bytes, out.sha256.hexdigest(), tuple(offsets))


def read_shard(url: str, schema: Schema, fmt: str, expect_sha256: str | None = None,
               expect_bytes: int | None = None, max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[Block]:
    """Blocks of a shard, streamed; with `expect_sha256`, the whole shard is read and checked first,
    so not one row of a shard that is not the one indexed ever reaches the caller."""
    with open_regular_file(url, expect_bytes) as raw:
        stream: IO[bytes] = raw
        if expect_sha256 is not None:
            data = raw.read()
            if hashlib.sha256(data).hexdigest() != expect_sha256:
                raise ShardFormatError(f"{url}: sha256 {hashlib.sha256(data).hexdigest()} does not match the manifest")
            stream = io.BytesIO(data)
        yield from iter_blocks(stream, schema, fmt, max_record_bytes)


def iter_blocks(stream: IO[bytes], schema: Schema, fmt: str, max_record_bytes: int = MAX_RECORD_BYTES,
                tfrecord_offsets: list[int] | None = None) -> Iterator[Block]:
    by_row = one_row_per_record(schema)
    if fmt == "tfrecord":
        payloads = iter_tfrecord(stream, max_record_bytes, tfrecord_offsets)
        if by_row:
            yield from _blocks_of_rows((_decoded(_decode_row_example, p, schema, "Example") for p in payloads), schema)
        else:
            for payload in payloads:
                yield decode_example(payload, schema)
    else:
        samples = _iter_tar_samples(stream, max_record_bytes)
        if by_row:
            yield from _blocks_of_rows((_row_of_sample(key, sample, schema) for key, sample in samples), schema)
        else:
            for key, sample in samples:
                yield _npy_block(key, sample, schema)
