"""Criteo Display Advertising Challenge: raw `train.txt` rows -> disjoint per-group shards.

Rows travel through Beam in blocks (raw bytes of ~8 MB of lines, then numpy
columns), never one element per row: the in-process runners cost ~250 us per
element, which would cap the pipeline at ~4k rows/s.

Features (per row):
* `label`  float32, 0 or 1.
* `dense`  float32[13]: the integer features I1..I13 as sign(x) * log1p(|x|)
  (keeps the -1/-2 values apart from 0 and tames the heavy tails); missing -> 0.
* `cat`    int32[26]: each C1..C26 value (8 hex digits = 32 bits) hashed,
  keyed by the data seed and the column, into 1..buckets-1; missing -> 0.
* with `keep_raw`: `int_raw` int64[13] (missing -> -2**63) and `cat_raw`
  int64[26] (the 32-bit value, missing -> -1).
* `key`    bytes: `<file name>:<line number>` (1-based physical line).

Bad rows never stop the pipeline: each is rejected with a reason
(undecodable, field_count, bad_label, bad_integer, bad_categorical,
line_too_long, truncated_file, corrupt_file) and written to `rejected/`.
"""

from __future__ import annotations

import binascii
import collections
import io
import posixpath
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from codistill.config import DataConfig
from codistill.datasets.criteo import CriteoConfig
from codistill.dataset import DatasetManifest, join
from pipelines import progress
from codistill.shards import Block, Feature, Schema
from pipelines.run import DatasetChecks, DatasetPipeline, ValueCheck
from pipelines.worker import WorkerDoFn
from pipelines.sharding import ShardLayout, line_key_hashes, mix64, partition, string_hash
from pipelines.sinks import Rejected, WriteDataset, layout_for, write_pieces
from pipelines.textfiles import (MAX_LINE_BYTES, CountLines, InputRange, LineBlock, OverlongLine, TruncatedInput,
                                 expand_inputs, first_lines, plan_ranges, read_head, read_line_blocks)

INT_COLUMNS = [f"I{i}" for i in range(1, 14)]
CAT_COLUMNS = [f"C{i}" for i in range(1, 27)]
COLUMNS = ["label", *INT_COLUMNS, *CAT_COLUMNS]
CSV_HEADER = ",".join(COLUMNS).encode()
DELIMITERS = {"tsv": b"\t", "csv": b","}

# Why a row was rejected: code -> (reason, detail). Code 0 means the row is good.
REASONS = [("", ""), ("undecodable", "bytes outside ASCII"), ("carriage_return", "a CR byte (Windows line ends?)"),
           ("field_count", f"expected {len(COLUMNS)} fields"), ("bad_label", "label must be 0 or 1"),
           ("bad_integer", "an I column is not an integer"), ("bad_categorical", "a C column is not 8 hex digits")]
GOOD, UNDECODABLE, CARRIAGE_RETURN, FIELD_COUNT, BAD_LABEL, BAD_INTEGER, BAD_CATEGORICAL = range(len(REASONS))
INT_MISSING = np.iinfo(np.int64).min



def schema(keep_raw: bool) -> Schema:
    features = {"key": Feature("bytes"), "label": Feature("float32"), "dense": Feature("float32", (13,)),
                "cat": Feature("int32", (26,))}
    if keep_raw:
        features |= {"int_raw": Feature("int64", (13,)), "cat_raw": Feature("int64", (26,))}
    return features


class HeaderError(ValueError):
    """A file's first line does not match the dialect (a header CSV read as TSV), or is no training data (the
    Kaggle test.txt, which has no label column)."""


def strip_header(block: LineBlock, dialect: str) -> LineBlock:
    """Check a file's first block against the dialect; the csv dialect's header line is dropped."""
    first = block.data.split(b"\n", 1)[0].rstrip(b"\r")
    if dialect == "csv":
        if first != CSV_HEADER:
            raise HeaderError(f"{block.source}: dialect csv expects the header line "
                              f"{CSV_HEADER[:40].decode()}..., found {_text(first[:60])!r}")
        return LineBlock(block.source, block.first_line + 1, block.data.split(b"\n", 1)[1])
    if first.startswith((b"label,", b"label\t")):
        raise HeaderError(f"{block.source}: the first line is a header ({_text(first[:40])}...): this looks like the "
                          "header CSV export, not Kaggle train.txt; read it with dialect csv "
                          "(--dialect csv or data.criteo.dialect: csv)")
    if first.count(b"\t") == len(COLUMNS) - 2:
        # Refused here, from the first line, rather than after a pass that rejects every row for its field count.
        raise HeaderError(f"{block.source}: the first line has {len(COLUMNS) - 1} fields, not {len(COLUMNS)}: this "
                          "looks like the Kaggle test.txt, which has no label column and cannot be trained on; "
                          "give train.txt (for an eval split of whole files, data.criteo.eval_files)")
    return block


def check_headers(paths: list[str], dialect: str) -> None:
    """Fail on the driver, before any work starts, if a file's first line does not fit the dialect."""
    for path in paths:
        head = read_head(path, 1 << 16)
        if head is None:
            continue  # a damaged file is quarantined by the pipeline itself
        strip_header(LineBlock(posixpath.basename(path), 1, head.split(b"\n", 1)[0] + b"\n"), dialect)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class ParsedBlock:
    source: str
    first_line: int
    lines: np.ndarray  # int64 line number of each good row
    block: Block  # features of the good rows, without `key`
    rejected: list[Rejected]


def parse_block(lines: LineBlock, options: CriteoConfig, seed: int) -> ParsedBlock:
    """Parse, validate and transform a block of raw rows; bad rows come back as rejections."""
    data = np.frombuffer(lines.data, np.uint8)
    ends = np.flatnonzero(data == 10)
    starts = np.concatenate([[0], ends[:-1] + 1])
    numbers = lines.first_line + np.arange(len(ends))
    reasons = np.zeros(len(ends), np.uint8)
    reasons[ends == starts] = FIELD_COUNT  # Arrow would read an empty line as a row of nulls
    # The CSV reader treats '\r' as a line end, and the hex check assumes ASCII:
    # lines with either are rejected before parsing (a cheap check, rarely true).
    if b"\r" in lines.data:
        reasons[np.searchsorted(ends, np.flatnonzero(data == 13))] = CARRIAGE_RETURN
    if data.max(initial=0) >= 0x80:
        reasons[np.searchsorted(ends, np.flatnonzero(data >= 0x80))] = UNDECODABLE
    to_parse = np.flatnonzero(reasons == GOOD)
    text = lines.data if len(to_parse) == len(ends) else b"".join(
        lines.data[starts[i]:ends[i] + 1] for i in to_parse)
    table, wrong_field_count = _read_table(text, DELIMITERS[options.dialect]) if len(to_parse) else (None, [])
    reasons[to_parse[wrong_field_count]] = FIELD_COUNT
    table_lines = np.delete(to_parse, wrong_field_count)  # line index of each table row
    block, row_reasons = _features(table, options, seed) if table is not None else ({}, [])
    reasons[table_lines] = row_reasons
    rejected = [Rejected(lines.source, int(numbers[i]), *REASONS[reasons[i]], _text(lines.data[starts[i]:ends[i]]))
                for i in np.flatnonzero(reasons != GOOD)]
    keep = reasons[table_lines] == GOOD
    return ParsedBlock(lines.source, lines.first_line, numbers[table_lines[keep]],
                       {name: column[keep] for name, column in block.items()}, rejected)


def _read_table(text: bytes, delimiter: bytes) -> tuple[pa.Table, list[int]]:
    """All columns as strings, and the 0-based lines skipped for a wrong field count."""
    wrong_field_count = []

    def skip(row) -> str:
        wrong_field_count.append(row.number - 1)
        return "skip"

    table = pa_csv.read_csv(
        io.BytesIO(text),
        read_options=pa_csv.ReadOptions(column_names=COLUMNS, use_threads=False, block_size=len(text) + 1),
        parse_options=pa_csv.ParseOptions(delimiter=delimiter.decode(), quote_char=False, double_quote=False,
                                          escape_char=False, ignore_empty_lines=False,
                                          invalid_row_handler=skip),
        convert_options=pa_csv.ConvertOptions(column_types={c: pa.string() for c in COLUMNS},
                                              strings_can_be_null=True, check_utf8=False),
    )
    return table, wrong_field_count


def _features(table: pa.Table, options: CriteoConfig, seed: int) -> tuple[Block, np.ndarray]:
    rows = table.num_rows
    label_ok = _mask(pc.is_in(table["label"], pa.array(["0", "1"])), missing=False)
    label = _mask(pc.equal(table["label"], "1"), missing=False)
    # Column-major while parsing (each column is contiguous), row-major in the block.
    ints = np.empty((13, rows), np.int64)
    cats = np.empty((26, rows), np.int64)
    int_ok, cat_ok = np.ones(rows, bool), np.ones(rows, bool)
    for j, name in enumerate(INT_COLUMNS):
        ints[j], ok = _parse_ints(table[name], options.dialect)
        int_ok &= ok
    for j, name in enumerate(CAT_COLUMNS):
        cats[j], ok = _parse_hex(table[name])
        cat_ok &= ok

    # Assigned from least to most basic, so a row gets its most basic problem.
    reasons = np.zeros(rows, np.uint8)
    reasons[~cat_ok] = BAD_CATEGORICAL
    reasons[~int_ok] = BAD_INTEGER
    reasons[~label_ok] = BAD_LABEL

    signed = np.where(ints == INT_MISSING, 0, ints).astype(np.float64)
    dense = np.copysign(np.log1p(np.abs(signed)), signed).astype(np.float32)
    block = {"label": label.astype(np.float32), "dense": dense.T.copy(), "cat": _bucket(cats, options, seed).T.copy()}
    if options.keep_raw:
        block |= {"int_raw": ints.T.copy(), "cat_raw": cats.T.copy()}
    return block, reasons


# The same integers Arrow's cast accepts (no '+', no spaces), so both paths agree on every value.
_INT_PATTERN = {"tsv": r"^-?[0-9]{1,18}$", "csv": r"^-?[0-9]{1,15}(\.0*)?$"}


def _parse_ints(column: pa.ChunkedArray, dialect: str) -> tuple[np.ndarray, np.ndarray]:
    """int64 values (missing -> INT_MISSING) and a mask of parseable entries.

    The header-CSV export writes integers as `260.0`; only that dialect accepts
    a zero fraction. A whole clean TSV column casts directly (the usual case);
    the regex, which says which rows are bad, runs only when that fails.
    """
    if dialect == "tsv":
        try:
            values = pc.fill_null(pc.cast(column, pa.int64()), INT_MISSING).to_numpy()
            ok = (values == INT_MISSING) | (np.abs(values) < 10**18)  # the regex's 18-digit limit
            if ok.all():
                return values, ok
        except pa.ArrowInvalid:
            pass
    ok = pc.fill_null(pc.match_substring_regex(column, _INT_PATTERN[dialect]), True)
    clean = pc.if_else(ok, column, pa.scalar(None, pa.string()))
    if dialect == "csv":
        clean = pc.cast(clean, pa.float64())
    values = pc.fill_null(pc.cast(clean, pa.int64()), INT_MISSING)
    return values.to_numpy(), _mask(ok, missing=True)


def _mask(array: pa.ChunkedArray, missing: bool) -> np.ndarray:
    return pc.fill_null(array, missing).to_numpy(zero_copy_only=False)


def _parse_hex(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """32-bit values of 8-hex-digit strings (missing -> -1) and a mask of valid entries.

    In a clean column every value is empty or 8 digits, so the column's data
    buffer is one long hex string that `binascii.unhexlify` decodes at C speed;
    only a column with a bad value is decoded value by value.
    """
    array = column.combine_chunks()
    _, offsets_buf, data_buf = array.buffers()
    offsets = np.frombuffer(offsets_buf, np.int32, count=len(array) + 1, offset=array.offset * 4)
    lengths = np.diff(offsets)
    data = memoryview(data_buf)[offsets[0]:offsets[-1]] if data_buf is not None else b""
    values = np.full(len(array), -1, np.int64)
    present = lengths > 0
    if np.all(lengths[present] == 8):
        try:
            values[present] = np.frombuffer(binascii.unhexlify(data), ">u4")
            return values, np.ones(len(array), bool)
        except binascii.Error:
            pass
    ok = ~present
    for i in np.flatnonzero(lengths == 8):
        start = offsets[i] - offsets[0]
        try:
            values[i] = int.from_bytes(binascii.unhexlify(data[start:start + 8]), "big")
            ok[i] = True
        except binascii.Error:
            pass
    return values, ok


def _bucket(cats: np.ndarray, options: CriteoConfig, seed: int) -> np.ndarray:
    """Bucket ids 1..buckets-1 (0 = missing): keyed mix, then the top 32 bits scaled to the range."""
    buckets = np.array(options.buckets_per_column(), np.uint64)[:, None]
    salts = np.array([string_hash(f"criteo/{name}", seed) for name in CAT_COLUMNS], np.uint64)[:, None]
    with np.errstate(over="ignore"):
        ids = mix64(cats.view(np.uint64) + salts)
    ids >>= np.uint64(32)
    ids *= buckets - np.uint64(1)  # Lemire's multiply-shift: maps 32 bits onto [0, buckets-1)
    ids >>= np.uint64(32)
    ids += np.uint64(1)
    ids[cats < 0] = 0
    return ids.astype(np.int32)


def keyed_block(parsed: ParsedBlock, rows: np.ndarray) -> Block:
    keys = np.strings.add(np.bytes_(f"{parsed.source}:".encode()), parsed.lines[rows].astype("S"))
    return {"key": keys, **{name: column[rows] for name, column in parsed.block.items()}}


def destinations(layout: ShardLayout, options: CriteoConfig, source: str, hashes: np.ndarray) -> np.ndarray:
    """Where the rows of one file go: with `eval_files`, a matching file's rows all to eval shards and the other
    files' rows all to train groups; otherwise the keyed hash picks eval or train too."""
    if not options.eval_files:
        return layout.assign(hashes)
    return layout.eval_destination(hashes) if options.is_eval_file(source) else layout.train_destination(hashes)


def check_eval_files(paths: list[str], options: CriteoConfig) -> None:
    """Fail on the driver if `eval_files` would leave the eval split or the train groups empty."""
    if not options.eval_files:
        return
    names = [posixpath.basename(p) for p in paths]
    chosen = [n for n in names if options.is_eval_file(n)]
    if not chosen:
        raise ValueError(f"data.criteo.eval_files {list(options.eval_files)} matches none of the {len(names)} input "
                         f"file(s) ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): the eval split "
                         "would be empty")
    if len(chosen) == len(names):
        raise ValueError(f"data.criteo.eval_files {list(options.eval_files)} matches every input file: no rows "
                         "would be left to train on")


# --- Beam ----------------------------------------------------------------------------------------


class ParseRange(WorkerDoFn):
    """An input range -> shard pieces `(destination, Piece)`; rejected rows and row counts aside.

    Rows stay in numpy blocks from the read to the piece files; only small
    metadata goes through Beam.
    """

    def __init__(self, data: DataConfig, layout: ShardLayout, schema: Schema):
        super().__init__()
        self.data, self.layout, self.schema = data, layout, schema

    def process(self, rng: InputRange, first_lines: dict):
        options = self.data.criteo
        first = first_lines[rng.source][rng.index] if rng.index else 1
        parts, rows_read = collections.defaultdict(list), 0
        for block in read_line_blocks(rng, first):
            if isinstance(block, OverlongLine):
                rows_read += 1
                yield beam.pvalue.TaggedOutput("rejected", [Rejected(
                    block.source, block.line, "line_too_long", f"{block.length} bytes, more than {MAX_LINE_BYTES}; "
                    f"raw holds the first {len(block.head)}", _text(block.head))])
                continue
            if isinstance(block, TruncatedInput):
                rows_read += 1  # the rest of the file counts as one rejected record
                reason = "truncated_file" if block.error.startswith("EOFError") else "corrupt_file"
                yield beam.pvalue.TaggedOutput("rejected", [Rejected(
                    block.source, block.line, reason, block.error, _text(block.tail))])
                continue
            if block.first_line == 1:
                block = strip_header(block, options.dialect)
            rows_read += block.data.count(b"\n")
            parsed = parse_block(block, options, self.data.seed)
            if parsed.rejected:
                yield beam.pvalue.TaggedOutput("rejected", parsed.rejected)
            dest = destinations(self.layout, options, parsed.source,
                                line_key_hashes(parsed.source, parsed.lines, self.data.seed))
            for d, rows in partition(dest):
                parts[d].append(keyed_block(parsed, rows))
        yield beam.pvalue.TaggedOutput("inputs", (rng.source, rows_read))
        yield from write_pieces(self.data.output, self.schema, (rng.source, rng.index), parts)


class CriteoToShards(beam.PTransform):
    """Raw Criteo files -> `<output>` with shards, `rejected/` and `manifest.json`."""

    def __init__(self, paths: list[str], data: DataConfig, extra: dict | None = None):
        super().__init__()
        self.paths, self.data, self.extra = paths, data, extra or {}

    def expand(self, pbegin):
        data = self.data
        layout, features = layout_for(data), schema(data.criteo.keep_raw)
        check_headers(self.paths, data.criteo.dialect)
        check_eval_files(self.paths, data.criteo)
        ranges = [r for path in self.paths for r in plan_ranges(path, data.split_bytes)]
        progress.expect(parts=len(ranges), bytes=sum(r.length for r in ranges))
        ranges = (pbegin
                  | "Ranges" >> beam.Create(ranges)
                  | "Spread" >> beam.Reshuffle())
        counts = (ranges
                  | "NotLast" >> beam.Filter(lambda r: not r.last)
                  | "CountLines" >> beam.ParDo(CountLines())
                  | "BySource" >> beam.GroupByKey()
                  | "FirstLines" >> beam.MapTuple(lambda source, counts: (source, first_lines(list(counts)))))
        parsed = ranges | "Parse" >> beam.ParDo(ParseRange(data, layout, features),
                                                first_lines=beam.pvalue.AsDict(counts)
                                                ).with_outputs("rejected", "inputs", main="pieces")
        parameters = {"input": self.paths, **data.recorded()}
        return {"pieces": parsed.pieces, "rejected": parsed.rejected, "inputs": parsed.inputs} | WriteDataset(
            output=data.output, layout=layout, schema=features, fmt=data.format, block_rows=data.block_rows,
            parameters=parameters, extra=self.extra)


def _generate(raw: str, synth) -> tuple[str, dict]:
    from pipelines.synth_criteo import generate_criteo

    sidecar = generate_criteo(raw, synth.rows, files=synth.files, seed=synth.seed, gzip=synth.gzip)
    return join(raw, "train-*"), sidecar


def dataset_checks(manifest: DatasetManifest) -> DatasetChecks:
    """Labels in {0, 1}, finite dense features, ids in range; keys `<file>:<line>` of a line the file had."""
    options, seed = manifest.settings.criteo, manifest.settings.seed
    buckets = np.array(options.buckets_per_column())
    last_line = {i["source"]: i["rows"] + (options.dialect == "csv") for i in manifest.inputs}  # + the header

    def key_hashes(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sources, _, numbers = np.strings.rpartition(keys, b":")
        valid = np.strings.isdigit(numbers) & (np.strings.str_len(numbers) <= 18)
        lines = np.zeros(len(keys), np.int64)
        lines[valid] = numbers[valid].astype(np.int64)
        hashes = np.zeros(len(keys), np.uint64)
        for source in np.unique(sources[valid]).tolist():
            rows = sources == source
            name = source.decode("utf-8", "replace")
            valid[rows] &= (lines[rows] >= 1) & (lines[rows] <= last_line.get(name, 0))
            hashes[rows] = line_key_hashes(name, lines[rows], seed)
        return hashes, valid

    def key_destinations(keys: np.ndarray, hashes: np.ndarray, layout: ShardLayout) -> np.ndarray:
        sources = np.strings.rpartition(keys, b":")[0]
        wanted = np.empty(len(keys), np.int64)
        for source in np.unique(sources).tolist():
            rows = sources == source
            wanted[rows] = destinations(layout, options, source.decode("utf-8", "replace"), hashes[rows])
        return wanted

    return DatasetChecks(values=(
        ValueCheck("label", lambda v: (v == 0) | (v == 1), "labels in {0, 1}"),
        ValueCheck("dense", lambda v: np.isfinite(v).all(axis=1), "finite dense features"),
        ValueCheck("cat", lambda v: ((v >= 0) & (v < buckets)).all(axis=1), "categorical ids in [0, cat_buckets)"),
    ), key_hashes=key_hashes, destinations=key_destinations if options.eval_files else None)


def describe_synth(sidecar: dict, out: str) -> str:
    files = len(sidecar["files"])
    return (f"wrote {sidecar['rows']} rows in {files} file(s) to {out}: positive rate {sidecar['positive_rate']:.3f}, "
            f"Bayes-optimal log loss {sidecar['bayes_log_loss']:.4f} (base rate {sidecar['base_rate_log_loss']:.4f})")


def describe(manifest: DatasetManifest) -> list[str]:
    lines = []
    eval_files = manifest.settings.criteo.eval_files
    if eval_files:
        lines.append(f"eval split: every row of the input files matching {', '.join(eval_files)}")
    synth = manifest.extra.get("synth")
    if synth:
        lines.append(f"generated data: Bayes-optimal log loss {synth['bayes_log_loss']:.4f}, "
                     f"base-rate log loss {synth['base_rate_log_loss']:.4f}")
    return lines


PIPELINE = DatasetPipeline(
    transform=lambda source, data, extra: CriteoToShards(expand_inputs(source), data, extra),
    generate=_generate, describe_synth=describe_synth, describe=describe, checks=dataset_checks)
