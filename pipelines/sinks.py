"""The dataset sink shared by every pipeline: shard pieces -> shards, rejected rows, then the manifest.

Workers write the rows of each input range for each destination straight to
a piece file (`<out>/.pieces/<dest>/...`); only small `Piece` records go
through Beam's shuffle, so rows never pay the runner's per-byte costs. One
finaliser per shard then concatenates its pieces in input order. The bytes
depend only on the input and the manifest, never on how the runner split or
scheduled the work, and a retried worker rewrites the same piece.

Optionally (`indexes=True`) every shard gets an index for readers that seek
without a scan: DALI's `.idx` (record offsets) for TFRecord shards, under
`idx/`, and a `wids` shard list (`<split>[-<group>].wids.json`, URLs relative
to the dataset root) for WebDataset shards.
"""

from __future__ import annotations

import collections
import copy
import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass

import apache_beam as beam
import numpy as np

from codistill import storage
from codistill.config import DataConfig
from codistill.dataset import DatasetManifest, ShardEntry, join, write_manifest
from codistill.shards import Block, Schema
from codistill.storage import write_atomically
from pipelines.formats import EXTENSIONS, concat_blocks, dali_index, dali_index_path, rebatch, write_shard
from pipelines.worker import WorkerDoFn
from pipelines.sharding import ShardLayout

PIECES = ".pieces"


def layout_for(data: DataConfig) -> ShardLayout:
    return ShardLayout(data.dataset, EXTENSIONS[data.format], data.groups, data.shards_per_group,
                       data.eval_shards, data.eval_fraction)


@dataclass(frozen=True)
class Rejected:
    """An input row kept out of the dataset, and why."""

    source: str
    line: int  # position in the source: line number, or record number for record formats
    reason: str
    detail: str
    raw: str
    offset: int | None = None  # byte offset in the source, for record formats (e.g. a WARC record's gzip member)

    def to_json(self) -> str:
        fields = {"source": self.source, "line": self.line, "reason": self.reason, "detail": self.detail,
                  "raw": self.raw}
        return json.dumps(fields | ({} if self.offset is None else {"offset": self.offset}), ensure_ascii=False)


@dataclass(frozen=True)
class Piece:
    order: tuple  # pieces of a shard are concatenated in this order (e.g. (file name, range index))
    url: str
    rows: int


def write_pieces(output: str, schema: Schema, order: tuple,
                 parts: dict[int, list[Block]]) -> Iterator[tuple[int, Piece]]:
    """One piece file per destination for the rows of one unit of input (`order` names it).

    A piece is the block's columns as consecutive `.npy` arrays, whatever the
    final format: it is temporary, read back once, and npy costs nothing to decode.
    Variable-length bytes (`object` columns) go as their lengths and their
    concatenation, never pickled.
    """
    name = "-".join(str(o) for o in order)
    for dest, blocks in sorted(parts.items()):
        url = join(output, f"{PIECES}/{dest:05d}/{name}.npys")
        block = concat_blocks(blocks)
        with storage.open(url, "wb", auto_mkdir=True) as f:
            for column, feature in schema.items():
                values = block[column]
                if feature.dtype == "object":
                    lengths = np.array([len(v) for v in values], np.int64)
                    np.lib.format.write_array(f, lengths, allow_pickle=False)
                    values = np.frombuffer(b"".join(values), np.uint8)
                np.lib.format.write_array(f, np.ascontiguousarray(values), allow_pickle=False)
        yield dest, Piece(order, url, len(block["key"]))


def read_piece(piece: Piece, schema: Schema) -> Block:
    block = {}
    with storage.open(piece.url, "rb") as f:
        for column, feature in schema.items():
            if feature.dtype == "object":
                ends = np.cumsum(np.lib.format.read_array(f, allow_pickle=False))
                data = np.lib.format.read_array(f, allow_pickle=False).tobytes()
                values = np.empty(len(ends), object)
                values[:] = [data[start:end] for start, end in zip(np.concatenate([[0], ends[:-1]]), ends)]
                block[column] = values
            else:
                block[column] = np.lib.format.read_array(f, allow_pickle=False)
    return block


def merge_counts(into: dict, more: dict) -> dict:
    """Add nested count dicts ({"repairs": {"cmyk_to_rgb": 2}, ...}) into `into`."""
    for name, value in more.items():
        if isinstance(value, dict):
            merge_counts(into.setdefault(name, {}), value)
        else:
            into[name] = into.get(name, 0) + value
    return into


class FinalizeShardFn(WorkerDoFn):
    """(destination, pieces) -> the shard file, written through a temp name; pieces are then deleted."""

    def __init__(self, output: str, layout: ShardLayout, schema: Schema, fmt: str, block_rows: int,
                 indexes: bool = False):
        super().__init__()
        self.output, self.layout, self.schema, self.fmt, self.block_rows = output, layout, schema, fmt, block_rows
        self.indexes = indexes

    def process(self, element):
        dest, pieces = element
        pieces = sorted((p for p in pieces if p is not None), key=lambda p: p.order)
        split, group, shard = self.layout.describe(dest)
        relative = self.layout.relative_path(dest)
        prefix = f"{split}-s{shard:05d}" if group is None else f"{split}-g{group}-s{shard:05d}"
        blocks = (read_piece(piece, self.schema) for piece in pieces)
        written = write_shard(join(self.output, relative), rebatch(blocks, self.block_rows), self.schema, self.fmt,
                              prefix)
        if written.records != sum(p.rows for p in pieces):
            raise RuntimeError(f"{relative}: pieces hold {written.records} rows, expected "
                               f"{sum(p.rows for p in pieces)}; were they changed while the pipeline ran?")
        if self.indexes and self.fmt == "tfrecord":
            write_atomically(join(self.output, dali_index_path(relative)), dali_index(written.offsets, written.bytes))
        for piece in pieces:
            fs, path = storage.url_to_fs(piece.url)
            fs.rm(path)
        yield ShardEntry(relative, split, group, written.records, written.bytes, written.sha256)


class WriteRejectedFn(WorkerDoFn):
    """One JSON-lines file per input source, in line order; yields counts by reason."""

    def __init__(self, output: str):
        super().__init__()
        self.output = output

    def process(self, element):
        source, batches = element
        rows = sorted((r for batch in batches for r in batch), key=lambda r: (r.line, r.offset or 0))
        write_atomically(join(self.output, f"rejected/{source}.jsonl"), "".join(r.to_json() + "\n" for r in rows))
        yield dict(collections.Counter(r.reason for r in rows))


class WriteManifestFn(WorkerDoFn):
    def __init__(self, output: str, layout: ShardLayout, schema: Schema, fmt: str, parameters: dict, extra: dict,
                 files: dict[str, str], indexes: bool, tokenizer_sha256: str | None):
        super().__init__()
        self.output, self.layout, self.schema, self.fmt = output, layout, schema, fmt
        self.parameters, self.extra, self.files, self.indexes = parameters, extra, files, indexes
        self.tokenizer_sha256 = tokenizer_sha256

    def process(self, _, shards, reject_counts, counted_only, inputs, stats, kept, facts):
        extra = copy.deepcopy(self.extra)  # merge_counts adds into nested dicts; keep self.extra for a retry
        for counts in stats:
            merge_counts(extra, counts)
        for more in facts:
            extra.update(more)
        for relative, text in sorted(self.files.items()):
            write_atomically(join(self.output, relative), text)
        if self.indexes:
            extra["indexes"] = self.write_indexes(sorted(shards, key=lambda s: s.path))
        rejected, unlisted = collections.Counter(), collections.Counter()
        for counts in reject_counts:
            rejected.update(counts)
        for counts in counted_only:
            unlisted.update(counts)
        if unlisted:  # verify checks every other rejection against its line in rejected/
            extra["rejected_without_records"] = dict(sorted(unlisted.items()))
        rejected.update(unlisted)
        rows_read = collections.Counter()
        for source, rows in inputs:
            rows_read[source] += rows
        manifest = DatasetManifest(
            dataset=self.layout.dataset, format=self.fmt, features=self.schema, groups=self.layout.groups,
            shards=tuple(sorted(shards, key=lambda s: s.path)),
            inputs=tuple({"source": s, "rows": n} for s, n in sorted(rows_read.items())),
            rejected=dict(sorted(rejected.items())), parameters=self.parameters,
            tokenizer_sha256=self.tokenizer_sha256, extra=extra, kept=sum(kept) if kept else None)
        fs, path = storage.url_to_fs(join(self.output, PIECES))
        if fs.exists(path):
            fs.rm(path, recursive=True)
        write_manifest(self.output, manifest)
        yield manifest

    def write_indexes(self, shards: list[ShardEntry]) -> dict[str, list[str]]:
        """wids shard lists for tar shards (DALI indexes were written with the shards); their paths."""
        if self.fmt == "tfrecord":
            return {"dali": [dali_index_path(s.path) for s in shards]}
        lists = collections.defaultdict(list)
        for shard in shards:
            name = shard.split if shard.group is None else f"{shard.split}-{shard.group}"
            lists[f"{name}.wids.json"].append({"url": shard.path, "nsamples": shard.records, "filesize": shard.bytes})
        for path, shardlist in lists.items():
            write_atomically(join(self.output, path), json.dumps(
                {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": path.split(".")[0],
                 "shardlist": shardlist}, indent=1) + "\n")
        return {"wids": sorted(lists)}


class WriteDataset(beam.PTransform):
    """{"pieces", "rejected", "inputs"} -> shards (every one, even if empty), `rejected/*.jsonl`, `manifest.json`.

    `pieces` holds `(destination, Piece)`; `rejected` lists of `Rejected` rows
    of one source each; `inputs` `(source, rows read)`, possibly several per
    source. The manifest is written only after everything else.

    Optional inputs: `stats` nested dicts of counts, summed into the manifest's
    `extra`; `extra` dicts of facts computed by the pipeline, merged into it; for
    pipelines whose rows are not their input records (documents packed into
    token sequences), `reject_counts` dicts reason -> records rejected without a
    row each in `rejected/`, and `kept` ints summing to the input records written
    (the balance then reads inputs = kept + rejected). `files` (relative path ->
    text, e.g. `classes.txt`) are written beside the shards; `indexes` adds
    DALI/wids indexes.
    """

    def __init__(self, output: str, layout: ShardLayout, schema: Schema, fmt: str, block_rows: int,
                 parameters: dict, extra: dict, files: dict[str, str] | None = None, indexes: bool = False,
                 tokenizer_sha256: str | None = None):
        super().__init__()
        self.output, self.layout, self.schema, self.fmt, self.block_rows = output, layout, schema, fmt, block_rows
        self.parameters, self.extra, self.files, self.indexes = parameters, extra, files or {}, indexes
        self.tokenizer_sha256 = tokenizer_sha256

    def expand(self, pcolls):
        pipeline = pcolls["pieces"].pipeline
        every_destination = pipeline | "Destinations" >> beam.Create(
            [(d, None) for d in range(self.layout.destinations)])
        shards = ((pcolls["pieces"], every_destination)
                  | "WithEveryDestination" >> beam.Flatten()
                  | "GroupByShard" >> beam.GroupByKey()
                  | "FinalizeShards" >> beam.ParDo(
                      FinalizeShardFn(self.output, self.layout, self.schema, self.fmt, self.block_rows,
                                      self.indexes)))
        reject_counts = (pcolls["rejected"]
                         | "RejectedBySource" >> beam.Map(lambda batch: (batch[0].source, batch))
                         | "GroupRejected" >> beam.GroupByKey()
                         | "WriteRejected" >> beam.ParDo(WriteRejectedFn(self.output)))
        optional = {name: pcolls[name] if name in pcolls else pipeline | f"No{name.capitalize()}" >> beam.Create([])
                    for name in ("stats", "kept", "extra", "reject_counts")}
        # One dict reaches the manifest writer, however many work items counted (merge_counts adds into a new {}).
        stats = optional["stats"] | "SumStats" >> beam.CombineGlobally(
            lambda counts: functools.reduce(merge_counts, counts, {}))
        return (pipeline
                | "Once" >> beam.Create([None])
                | "WriteManifest" >> beam.ParDo(
                    WriteManifestFn(self.output, self.layout, self.schema, self.fmt, self.parameters, self.extra,
                                    self.files, self.indexes, self.tokenizer_sha256),
                    beam.pvalue.AsList(shards), beam.pvalue.AsList(reject_counts),
                    beam.pvalue.AsList(optional["reject_counts"]), beam.pvalue.AsList(pcolls["inputs"]),
                    beam.pvalue.AsList(stats), beam.pvalue.AsList(optional["kept"]),
                    beam.pvalue.AsList(optional["extra"])))
