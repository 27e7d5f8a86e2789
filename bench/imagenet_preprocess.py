"""ImageNet preprocessing: the Beam pipeline vs a plain single-process loop, same run, same data.

    .venv/bin/python bench/imagenet_preprocess.py [--images 2000] [--min-size 200 --max-size 500]
                                                  [--resize-shorter N] [--format tfrecord] [--layout folders]
                                                  [--workdir DIR]

Both do the same work on the same generated ImageNet (ImageNet-like sizes by
default, bad inputs included; `--layout archives` packs it as downloaded:
`ILSVRC2012_img_train.tar` of class tars and `ILSVRC2012_img_val.tar`): list
the class folders or tars, hash each key to its shard, read every image, check
it (libjpeg's strict decode at 1/8 scale), repair what needs it, find exact
duplicates over the whole set by content hash, and write the same shards in
key-hash order. The loop calls the same per-image and per-duplicate functions
as the pipeline (so the figures compare Beam's overhead, not two
implementations); the pipeline runs on the in-process FnApiRunner with one
worker. Shards are compared byte for byte.

Beam's start-up (building the pipeline, starting the runner, ~1 CPU-second)
is a fixed cost that a real data set amortises: it is measured in the same run
on a one-image input and reported apart, with the per-image rates at scale.
"""

from __future__ import annotations

import argparse
import collections
import io
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import apache_beam as beam
import numpy as np

from codistill.config import DataConfig
from codistill.datasets.imagenet import ImageNetConfig
from codistill.dataset import join, load_manifest
from pipelines.formats import write_shard
from pipelines.imagenet import SCHEMA, ImageChecker, ImageNetToShards, configure_pillow, file_destinations, \
    image_facts, rows_to_block
from pipelines.imagenet_dedup import duplicate_losers
from pipelines.imagenet_input import ListInput, plan_input
from pipelines.run import pipeline_options
from pipelines.sharding import string_hash
from pipelines.sinks import Rejected, layout_for
from pipelines.synth_imagenet import generate_imagenet


def plain_loop(source: str, data: DataConfig) -> dict[str, str]:
    """List, assign, then per shard: read, check, repair; drop duplicates; write. Returns shard path -> sha256."""
    configure_pillow(data.imagenet)
    plan = plan_input(source, data.imagenet)
    layout = layout_for(data)
    lister = ListInput(plan.root, plan.val_labels)
    lister.setup()
    by_dest = collections.defaultdict(list)
    for listing in plan.listings:
        for files in lister.process(listing):
            if isinstance(files, beam.pvalue.TaggedOutput):
                continue  # the input counts
            hashes = np.array([string_hash(f.key, data.seed) for f in files], np.uint64)
            dest = file_destinations(layout, hashes, files[0].split == "val", plan.val_is_eval)
            for d, h, file in zip(dest.tolist(), hashes.tolist(), files):
                by_dest[d].append((h, file))
    check = ImageChecker(plan.root, data.imagenet, plan.classes)
    rows = {}
    for dest in range(layout.destinations):
        outcomes = (check(file) for _, file in sorted(by_dest[dest], key=lambda item: (item[0], item[1].key)))
        rows[dest] = [row for row in outcomes if not isinstance(row, Rejected)]
    facts = [image_facts(rows[dest], data.seed, plan.val_is_eval) for dest in rows]
    every = {name: np.concatenate([f[name] for f in facts]) for name in facts[0]}
    dropped = {every["key"][row].decode() for row, _, _ in duplicate_losers(every)}
    hashes = {}
    for dest in range(layout.destinations):
        kept = [row for row in rows[dest] if row.key not in dropped]
        relative = layout.relative_path(dest)
        split, group, shard = layout.describe(dest)
        prefix = f"{split}-s{shard:05d}" if group is None else f"{split}-g{group}-s{shard:05d}"
        blocks = [rows_to_block(kept)] if kept else []
        hashes[relative] = write_shard(join(data.output, relative), blocks, SCHEMA, data.format, prefix).sha256
    return hashes


def pack_as_downloaded(raw: str) -> None:
    """The generated folders as the archives image-net.org serves: train/ as a tar of class tars, val/ as a
    flat tar (its labels stay in LOC_val_solution.csv); the folders go."""
    root = Path(raw)

    def tar_of(paths, arcname) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for path in sorted(paths):
                tar.add(path, arcname(path), recursive=False)
        return out.getvalue()

    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w", format=tarfile.GNU_FORMAT) as outer:
        for folder in sorted((root / "train").iterdir()):
            inner = tar_of(folder.iterdir(), lambda p: p.name)
            info = tarfile.TarInfo(f"{folder.name}.tar")
            info.size = len(inner)
            outer.addfile(info, io.BytesIO(inner))
    (root / "ILSVRC2012_img_val.tar").write_bytes(tar_of((root / "val").iterdir(), lambda p: p.name))
    for split in ("train", "val"):
        shutil.rmtree(root / split)


def beam_pipeline(source: str, data: DataConfig) -> dict[str, str]:
    options = pipeline_options(["--runner=FnApiRunner", "--direct_num_workers=1"])
    with beam.Pipeline(options=options) as pipeline:
        _ = pipeline | ImageNetToShards(source, data)
    return {s.path: s.sha256 for s in load_manifest(data.output).shards}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="train images (plus 10%% val)")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--min-size", type=int, default=200)
    parser.add_argument("--max-size", type=int, default=500)
    parser.add_argument("--resize-shorter", type=int, default=None)
    parser.add_argument("--format", default="tfrecord", choices=["tfrecord", "webdataset"])
    parser.add_argument("--layout", default="folders", choices=["folders", "archives"])
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="codistill-bench-")
    per_class = args.images // args.classes
    raw = f"{workdir}/raw"
    sidecar = generate_imagenet(raw, args.classes, per_class, val_per_class=max(1, per_class // 10), seed=7,
                                min_size=args.min_size, max_size=args.max_size, faults=1)
    images = sidecar["files"]["train"] + sidecar["files"]["val"]
    if args.layout == "archives":
        pack_as_downloaded(raw)
    generate_imagenet(f"{workdir}/one", 1, 1, val_per_class=0, faults=0, min_size=args.min_size,
                      max_size=args.max_size)
    options = ImageNetConfig(resize_shorter=args.resize_shorter)
    config = dict(dataset="imagenet", input=raw, groups=2, shards_per_group=2, eval_shards=1, format=args.format,
                  seed=17, options=options)

    # CPU seconds of this process (all threads) as well as wall time: on a shared machine the wall time
    # also counts other people's work; CPU time is what the work costs one core.
    start, cpu = time.perf_counter(), time.process_time()
    plain = plain_loop(raw, DataConfig(output=f"{workdir}/plain", **config))
    plain_s, plain_cpu = time.perf_counter() - start, time.process_time() - cpu

    start, cpu = time.perf_counter(), time.process_time()
    piped = beam_pipeline(raw, DataConfig(output=f"{workdir}/beam", **config))
    beam_s, beam_cpu = time.perf_counter() - start, time.process_time() - cpu

    start, cpu = time.perf_counter(), time.process_time()
    beam_pipeline(f"{workdir}/one", DataConfig(output=f"{workdir}/beam-one", **{**config, "input": f"{workdir}/one"}))
    fixed_s, fixed_cpu = time.perf_counter() - start, time.process_time() - cpu

    stats = load_manifest(f"{workdir}/beam").extra["image_bytes"]
    same = sum(plain[p] == piped[p] for p in piped)
    mode = f"resize shorter side to {args.resize_shorter}" if args.resize_shorter else "keep bytes"
    print(f"images: {images} ({args.min_size}-{args.max_size} px, {stats['source'] / images / 1e3:.0f} kB "
          f"average), {mode}, {args.format}, {args.layout}")
    print(f"{'':32} {'wall s':>7} {'images/s':>9} {'CPU s':>7} {'images/CPU-s':>12}")
    for name, wall, cpu in (("plain Python loop (1 process)", plain_s, plain_cpu),
                            ("Beam pipeline (FnApiRunner, 1)", beam_s, beam_cpu),
                            ("  of which Beam start-up", fixed_s, fixed_cpu),
                            ("  Beam at scale (minus start-up)", beam_s - fixed_s, beam_cpu - fixed_cpu)):
        print(f"{name:32} {wall:7.2f} {images / wall:9,.0f} {cpu:7.2f} {images / cpu:12,.0f}")
    print(f"Beam / plain, whole run:         {plain_s / beam_s:6.2f}x wall, {plain_cpu / beam_cpu:.2f}x per CPU-second")
    print(f"Beam / plain, at scale:          {plain_s / (beam_s - fixed_s):6.2f}x wall, "
          f"{plain_cpu / (beam_cpu - fixed_cpu):.2f}x per CPU-second")
    print(f"byte-identical shards:           {same}/{len(piped)}")


if __name__ == "__main__":
    main()
