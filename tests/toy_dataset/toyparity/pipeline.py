"""The toy dataset's Beam pipeline: a file -> keyed blocks -> the project's one sharder and sink."""

from __future__ import annotations

import collections
import os

import apache_beam as beam
import numpy as np

from codistill.dataset import join
from codistill.shards import Feature
from pipelines.run import DatasetPipeline
from pipelines.sharding import line_key_hashes, partition
from pipelines.sinks import Rejected, WriteDataset, layout_for, write_pieces
from pipelines.textfiles import expand_inputs
from pipelines.worker import WorkerDoFn
from codistill import storage
from toyparity.spec import BITS

SCHEMA = {"key": Feature("bytes"), "bits": Feature("float32", (BITS,)), "label": Feature("float32")}


class ParseFile(WorkerDoFn):
    def __init__(self, data, layout):
        super().__init__()
        self.data, self.layout = data, layout

    def process(self, path: str):
        name = os.path.basename(path)
        with storage.open(path, "rb") as f:
            lines = f.read().splitlines()
        is_bits = [len(line) == BITS and set(line) <= set(b"01") for line in lines]
        good = [(n, line) for n, (line, ok) in enumerate(zip(lines, is_bits), 1) if ok]
        bad = [Rejected(name, n, "bad_line", f"not {BITS} bits", line[:64].decode("ascii", "replace"))
               for n, (line, ok) in enumerate(zip(lines, is_bits), 1) if not ok]
        if bad:
            yield beam.pvalue.TaggedOutput("rejected", bad)
        yield beam.pvalue.TaggedOutput("inputs", (name, len(lines)))
        numbers = np.array([n for n, _ in good], np.int64)
        bits = np.array([[c - 48 for c in line] for _, line in good], np.float32).reshape(-1, BITS)
        block = {"key": np.array([f"{name}:{n}".encode() for n in numbers], "S"), "label": bits[:, 0] != bits[:, 1],
                 "bits": 1 - bits if self.data.toyparity.flip else bits}
        block["label"] = block["label"].astype(np.float32)
        parts = collections.defaultdict(list)
        for dest, rows in partition(self.layout.assign(line_key_hashes(name, numbers, self.data.seed))):
            parts[dest].append({column: values[rows] for column, values in block.items()})
        yield from write_pieces(self.data.output, SCHEMA, (name,), parts)


class ToyParityToShards(beam.PTransform):
    def __init__(self, source: str, data, extra: dict):
        super().__init__()
        self.paths, self.data, self.extra = expand_inputs(source), data, extra

    def expand(self, pbegin):
        layout = layout_for(self.data)
        parsed = (pbegin | "Files" >> beam.Create(self.paths)
                  | "Parse" >> beam.ParDo(ParseFile(self.data, layout)).with_outputs("rejected", "inputs",
                                                                                      main="pieces"))
        return {"pieces": parsed.pieces, "rejected": parsed.rejected, "inputs": parsed.inputs} | WriteDataset(
            output=self.data.output, layout=layout, schema=SCHEMA, fmt=self.data.format,
            block_rows=self.data.block_rows, parameters={"input": self.paths, **self.data.recorded()},
            extra=self.extra)


def generate(raw: str, synth) -> tuple[str, dict]:
    rng = np.random.default_rng(synth.seed)
    bits = rng.integers(0, 2, (synth.rows, BITS))
    for i, rows in enumerate(np.array_split(bits, synth.files)):
        storage.write_atomically(join(raw, f"parity-{i:05d}.txt"),
                                 b"".join(b"".join(b"%d" % b for b in row) + b"\n" for row in rows))
    return join(raw, "parity-*.txt"), {"rows": synth.rows, "files": synth.files}


PIPELINE = DatasetPipeline(
    transform=ToyParityToShards, generate=generate,
    describe_synth=lambda sidecar, out: f"wrote {sidecar['rows']} lines of bits to {out}",
    describe=lambda manifest: [])
