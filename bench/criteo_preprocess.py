"""Criteo preprocessing: the Beam pipeline vs a plain single-process Python loop, same run, same data.

    .venv/bin/python bench/criteo_preprocess.py [--rows 1000000] [--workdir DIR]

Both do the same work on the same generated file: parse and validate each row,
transform (signed log1p, hashed categoricals), assign eval/group/shard by the
keyed hash, and write the same TFRecord shards. The plain loop handles one row
at a time, as a straightforward script would; the pipeline carries blocks of
rows through Beam's in-process runner with one worker. The shards of both are
compared byte for byte.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections import defaultdict

import apache_beam as beam
import numpy as np

from codistill.config import DataConfig
from codistill.datasets.criteo import CriteoConfig
from codistill.dataset import join, load_manifest
from pipelines.criteo import CAT_COLUMNS, CriteoToShards, schema
from pipelines.sinks import layout_for
from pipelines.formats import rebatch, write_shard
from pipelines.run import pipeline_options
from pipelines.sharding import string_hash
from pipelines.synth_criteo import generate_criteo

M64 = (1 << 64) - 1


def mix64(x: int) -> int:
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def plain_loop(path: str, source: str, data: DataConfig) -> dict[str, str]:
    layout = layout_for(data)
    buckets = data.criteo.buckets_per_column()
    salts = [string_hash(f"criteo/{name}", data.seed) for name in CAT_COLUMNS]
    file_hash = string_hash(source, data.seed)
    salt_split, salt_group, salt_shard = 0x5851F42D4C957F2D, 0x14057B7EF767814F, 0x9E3779B97F4A7C15
    rows = defaultdict(lambda: ([], [], [], []))  # destination -> keys, labels, dense, cat
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            fields = raw.rstrip(b"\n").split(b"\t")
            if len(fields) != 40 or fields[0] not in (b"0", b"1"):
                continue
            try:
                ints = [int(v) if v else None for v in fields[1:14]]
                cats = [int(v, 16) if v else None for v in fields[14:]]
            except ValueError:
                continue
            dense = [0.0 if x is None else math.copysign(math.log1p(abs(x)), x) for x in ints]
            cat = [0 if v is None else 1 + ((mix64((v + s) & M64) >> 32) * (b - 1) >> 32)
                   for v, s, b in zip(cats, salts, buckets)]
            h = mix64((file_hash + number) & M64)
            if (mix64(h ^ salt_split) >> 11) * 2.0**-53 < data.eval_fraction:
                dest = mix64(h ^ salt_shard) % data.eval_shards
            else:
                group = mix64(h ^ salt_group) % data.groups
                dest = data.eval_shards + group * data.shards_per_group + mix64(h ^ salt_shard) % data.shards_per_group
            keys, labels, denses, cats_out = rows[dest]
            keys.append(b"%s:%d" % (source.encode(), number))
            labels.append(float(fields[0]))
            denses.append(dense)
            cats_out.append(cat)
    hashes = {}
    for dest in range(layout.destinations):
        keys, labels, denses, cats_out = rows[dest]
        block = {"key": np.array(keys, np.bytes_), "label": np.array(labels, np.float32),
                 "dense": np.array(denses, np.float32).reshape(-1, 13),
                 "cat": np.array(cats_out, np.int32).reshape(-1, 26)}
        relative = layout.relative_path(dest)
        written = write_shard(join(data.output, relative), rebatch([block], data.block_rows), schema(False),
                              "tfrecord", "")
        hashes[relative] = written.sha256
    return hashes


def beam_pipeline(path: str, data: DataConfig) -> dict[str, str]:
    options = pipeline_options(["--runner=FnApiRunner", "--direct_num_workers=1"])
    with beam.Pipeline(options=options) as pipeline:
        _ = pipeline | CriteoToShards([path], data)
    return {s.path: s.sha256 for s in load_manifest(data.output).shards}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="codistill-bench-")
    generate_criteo(f"{workdir}/raw", args.rows, files=1, seed=7)
    path, source = f"{workdir}/raw/train-00000-of-00001.txt", "train-00000-of-00001.txt"
    config = dict(groups=2, eval_fraction=0.1, shards_per_group=4, eval_shards=1, format="tfrecord", seed=17,
                  block_rows=1024, input=path, options=CriteoConfig(cat_buckets=(100_000,)))

    start = time.perf_counter()
    plain = plain_loop(path, source, DataConfig(output=f"{workdir}/plain", **config))
    plain_s = time.perf_counter() - start

    start = time.perf_counter()
    piped = beam_pipeline(path, DataConfig(output=f"{workdir}/beam", **config))
    beam_s = time.perf_counter() - start

    same = sum(plain[p] == piped[p] for p in piped)
    print(f"rows: {args.rows}")
    print(f"plain Python loop:            {plain_s:6.2f} s  {args.rows / plain_s:>10,.0f} rows/s")
    print(f"Beam pipeline (FnApiRunner):  {beam_s:6.2f} s  {args.rows / beam_s:>10,.0f} rows/s")
    print(f"speed-up (Beam / plain):      {plain_s / beam_s:6.2f}x")
    print(f"byte-identical shards:        {same}/{len(piped)}")


if __name__ == "__main__":
    main()
