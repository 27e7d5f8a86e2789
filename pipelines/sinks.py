"""The dataset sink shared by every pipeline: shard pieces -> shards, rejected rows, then the manifest.

Workers write the rows of each input range for each destination straight to
a piece file (`<out>/.pieces/<dest>/...`); only small `Piece` records go
through Beam's shuffle, so rows never pay the runner's per-byte costs. One
finaliser per shard then concatenates its pieces in input order. The bytes
depend only on the input and the manifest, never on how the runner split or
scheduled the work, and a retried worker rewrites the same piece.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator
from dataclasses import dataclass

import apache_beam as beam
import numpy as np

from codistill import storage
from codistill.config import DataConfig
from codistill.dataset import DatasetManifest, ShardEntry, join, write_atomically, write_manifest
from pipelines.formats import EXTENSIONS, Block, Schema, concat_blocks, rebatch, write_shard
from pipelines.run import WorkerDoFn
from pipelines.sharding import ShardLayout

PIECES = ".pieces"


def layout_for(data: DataConfig) -> ShardLayout:
    return ShardLayout(data.dataset, EXTENSIONS[data.format], data.groups, data.shards_per_group,
                       data.eval_shards, data.eval_fraction)


@dataclass(frozen=True)
class Rejected:
    """An input row kept out of the dataset, and why."""

    source: str
    line: int
    reason: str
    detail: str
    raw: str

    def to_json(self) -> str:
        return json.dumps({"source": self.source, "line": self.line, "reason": self.reason,
                           "detail": self.detail, "raw": self.raw}, ensure_ascii=False)


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
    """
    name = "-".join(str(o) for o in order)
    for dest, blocks in sorted(parts.items()):
        url = join(output, f"{PIECES}/{dest:05d}/{name}.npys")
        block = concat_blocks(blocks)
        with storage.open(url, "wb", auto_mkdir=True) as f:
            for column in schema:
                np.lib.format.write_array(f, np.ascontiguousarray(block[column]), allow_pickle=False)
        yield dest, Piece(order, url, len(block["key"]))


def read_piece(piece: Piece, schema: Schema) -> Block:
    with storage.open(piece.url, "rb") as f:
        return {column: np.lib.format.read_array(f, allow_pickle=False) for column in schema}


class FinalizeShardFn(WorkerDoFn):
    """(destination, pieces) -> the shard file, written through a temp name; pieces are then deleted."""

    def __init__(self, output: str, layout: ShardLayout, schema: Schema, fmt: str, block_rows: int):
        super().__init__()
        self.output, self.layout, self.schema, self.fmt, self.block_rows = output, layout, schema, fmt, block_rows

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
        rows = sorted((r for batch in batches for r in batch), key=lambda r: r.line)
        write_atomically(join(self.output, f"rejected/{source}.jsonl"), "".join(r.to_json() + "\n" for r in rows))
        yield dict(collections.Counter(r.reason for r in rows))


class WriteManifestFn(WorkerDoFn):
    def __init__(self, output: str, layout: ShardLayout, schema: Schema, fmt: str, parameters: dict, extra: dict):
        super().__init__()
        self.output, self.layout, self.schema, self.fmt = output, layout, schema, fmt
        self.parameters, self.extra = parameters, extra

    def process(self, _, shards, reject_counts, inputs):
        rejected = collections.Counter()
        for counts in reject_counts:
            rejected.update(counts)
        rows_read = collections.Counter()
        for source, rows in inputs:
            rows_read[source] += rows
        manifest = DatasetManifest(
            dataset=self.layout.dataset, format=self.fmt, features=self.schema, groups=self.layout.groups,
            shards=tuple(sorted(shards, key=lambda s: s.path)),
            inputs=tuple({"source": s, "rows": n} for s, n in sorted(rows_read.items())),
            rejected=dict(sorted(rejected.items())), parameters=self.parameters, extra=self.extra)
        fs, path = storage.url_to_fs(join(self.output, PIECES))
        if fs.exists(path):
            fs.rm(path, recursive=True)
        write_manifest(self.output, manifest)
        yield manifest


class WriteDataset(beam.PTransform):
    """{"pieces", "rejected", "inputs"} -> shards (every one, even if empty), `rejected/*.jsonl`, `manifest.json`.

    `pieces` holds `(destination, Piece)`; `rejected` lists of `Rejected` rows
    of one source each; `inputs` `(source, rows read)`, possibly several per
    source. The manifest is written only after everything else.
    """

    def __init__(self, output: str, layout: ShardLayout, schema: Schema, fmt: str, block_rows: int,
                 parameters: dict, extra: dict):
        super().__init__()
        self.output, self.layout, self.schema, self.fmt, self.block_rows = output, layout, schema, fmt, block_rows
        self.parameters, self.extra = parameters, extra

    def expand(self, pcolls):
        pipeline = pcolls["pieces"].pipeline
        every_destination = pipeline | "Destinations" >> beam.Create(
            [(d, None) for d in range(self.layout.destinations)])
        shards = ((pcolls["pieces"], every_destination)
                  | "WithEveryDestination" >> beam.Flatten()
                  | "GroupByShard" >> beam.GroupByKey()
                  | "FinalizeShards" >> beam.ParDo(
                      FinalizeShardFn(self.output, self.layout, self.schema, self.fmt, self.block_rows)))
        reject_counts = (pcolls["rejected"]
                         | "RejectedBySource" >> beam.Map(lambda batch: (batch[0].source, batch))
                         | "GroupRejected" >> beam.GroupByKey()
                         | "WriteRejected" >> beam.ParDo(WriteRejectedFn(self.output)))
        return (pipeline
                | "Once" >> beam.Create([None])
                | "WriteManifest" >> beam.ParDo(
                    WriteManifestFn(self.output, self.layout, self.schema, self.fmt, self.parameters, self.extra),
                    beam.pvalue.AsList(shards), beam.pvalue.AsList(reject_counts),
                    beam.pvalue.AsList(pcolls["inputs"])))
