"""ImageNet loader throughput per worker vs the trainer's consumption, in one run: which one is the bottleneck?

    .venv/bin/python bench/imagenet_loader.py [--repeat 16] [--rounds 3] [--steps 6] [--batch 32]

Data: the real ILSVRC-2012 training JPEGs in `../shared/data/imagenet/train`
(original bytes, 168x168 to 500x375, two grayscale), each stored `--repeat`
times in TFRecord shards written with `pipelines.formats.write_shard` and the
pipeline's own schema (`pipelines.imagenet.SCHEMA`: key, image, label), plus
a dataset manifest. One process, one torch thread: that is one loader worker.

Loader variants (images/s, one worker):

  full-decode   `Image.open(...).convert("RGB")` of every stored JPEG: the plain full decode, the baseline
  load-64/224   `training.workloads.imagenet.ImageBatches` exactly as a DataLoader worker runs it in
                training: the shard stream (sha256 check, record parsing, shuffle buffer), then the
                draft decode + random-resized crop + flip of `training.image_transforms`, at 64 / 224 px
  eval-224      the same with the eval transform (shorter side to 256, center crop 224)

Trainer variants (images/s of one training step, ResNet-18 at 64 px, `--batch` images, the trainer's own
`build_engine` + `forward_backward` on DeepSpeed, one rank):

  fp32 / bf16 x channels_last on/off, student only; and the manifest's choice with one peer (codistillation:
  the frozen fp32 peer also runs forward on every batch).

Loader and trainer variants alternate round by round, so load changes hit them alike. The machine is
shared: absolute figures are noisy; the ratios (loader images/s over trainer images/s, bf16 over fp32,
channels_last over not) are what to read. A loader/trainer ratio above 1 means one worker per rank feeds
the trainer; below 1, `loader.workers` must be at least 1/ratio.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from codistill.config import CodistillConfig, load_experiment  # noqa: E402
from codistill.dataset import DatasetManifest, ShardEntry, write_manifest  # noqa: E402
from pipelines.formats import write_shard  # noqa: E402
from pipelines.imagenet import SCHEMA  # noqa: E402
from training.data import StreamSpec, to_torch  # noqa: E402
from training.train import FlatPeer, build_engine, forward_backward  # noqa: E402
from training.workloads.imagenet import WORKLOAD, ImageBatches  # noqa: E402

from harness import Clock, init_single_process  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "imagenet" / "train"
COLUMNS = ("key", "image", "label")


def write_dataset(root: str, repeat: int) -> tuple[DatasetManifest, int]:
    files = sorted(REAL.glob("*/*.JPEG"))
    assert files, f"no JPEGs under {REAL}"
    classes = sorted({f.parent.name for f in files})
    keys, images, labels = [], [], []
    for copy in range(repeat):
        for f in files:
            keys.append(f"train/{f.parent.name}/{copy}-{f.name}".encode())
            images.append(f.read_bytes())
            labels.append(classes.index(f.parent.name))
    image = np.empty(len(images), object)
    image[:] = images
    schema = {name: SCHEMA[name] for name in COLUMNS}
    block = {"key": np.array(keys, np.bytes_), "image": image, "label": np.array(labels, np.int64)}
    written = write_shard(f"{root}/train/0/shard-0.tfrecord", [block], schema, "tfrecord", "s0")
    entry = ShardEntry("train/0/shard-0.tfrecord", "train", 0, written.records, written.bytes, written.sha256)
    manifest = DatasetManifest(dataset="imagenet", format="tfrecord", features=schema, groups=1, shards=(entry,),
                               inputs=({"source": str(REAL), "rows": len(keys)},), rejected={}, parameters={},
                               extra={"classes": classes, "label_offset": 0})
    write_manifest(root, manifest)
    return manifest, len(files)


def loader_rate(root: str, manifest: DatasetManifest, size: int, train: bool, batch: int) -> tuple[float, float]:
    spec = StreamSpec(root, manifest, manifest.shards, batch, shuffle_buffer=batch * 2 if train else 0,
                      repeat=False, seed=1)
    count = 0
    with Clock() as clock:
        for block in ImageBatches(spec, size, train, max_failures=0):
            count += len(block["key"])
    return count / clock.wall, count / clock.cpu


def full_decode_rate(images: list[bytes]) -> tuple[float, float]:
    with Clock() as clock:
        for data in images:
            with Image.open(io.BytesIO(data)) as image:
                image.convert("RGB")
    return len(images) / clock.wall, len(images) / clock.cpu


class TrainerVariant:
    def __init__(self, name: str, manifest: DatasetManifest, sets: list[str], peers: int, batch: int):
        self.name = name
        config = load_experiment("imagenet-tiny", ["model.depth=18", "model.image_size=64",
                                                   f"deepspeed.micro_batch_size={batch}", *sets])
        torch.manual_seed(0)
        self.engine = build_engine(WORKLOAD.build_model(config.model, manifest), config, 1)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[config.deepspeed.precision]
        self.peers = {g: FlatPeer(WORKLOAD.build_model(config.model, manifest).eval().requires_grad_(False),
                                  dtype).module for g in range(1, 1 + peers)}  # in the training precision
        self.distill = CodistillConfig(weight=1.0)
        self.times: list[tuple[float, float]] = []  # (wall, cpu) seconds per step

    def run(self, batches: list[dict], steps: int, timed: bool = True) -> None:
        for batch in itertools.islice(itertools.cycle(batches), steps):
            with Clock() as clock:
                forward_backward(self.engine, WORKLOAD, self.peers, batch, 10**6, self.distill)
            if timed:
                self.times.append((clock.wall, clock.cpu))

    def rate(self, batch: int) -> tuple[float, float]:
        return tuple(batch / statistics.median(t[i] for t in self.times) for i in (0, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=16, help="copies of each real JPEG in the shard")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="timed trainer steps per variant per round")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    init_single_process()

    with tempfile.TemporaryDirectory() as root:
        manifest, originals = write_dataset(root, args.repeat)
        rows = manifest.shards[0].records
        print(f"{originals} real JPEGs x {args.repeat} = {rows} records in one TFRecord shard; "
              f"{torch.get_num_threads()} torch thread, {os.cpu_count()} cores, load average "
              f"{os.getloadavg()[0]:.1f} at start")
        spec = StreamSpec(root, manifest, manifest.shards, args.batch)
        jpegs = [data for block in ImageBatches(spec, 64, False, 0).stream for data in block["image"]]
        batches = [to_torch(b) for b in itertools.islice(ImageBatches(spec, 64, True, 0), 4)]

        variants = [TrainerVariant("fp32", manifest, ["model.channels_last=false", "deepspeed.precision=fp32"], 0,
                                   args.batch),
                    TrainerVariant("fp32+cl", manifest, ["model.channels_last=true", "deepspeed.precision=fp32"], 0,
                                   args.batch),
                    TrainerVariant("bf16", manifest, ["model.channels_last=false", "deepspeed.precision=bf16"], 0,
                                   args.batch),
                    TrainerVariant("bf16+cl", manifest, ["model.channels_last=true", "deepspeed.precision=bf16"], 0,
                                   args.batch)]
        for v in variants:
            v.run(batches, 2, timed=False)  # warm-up (oneDNN primitive creation)
        loaders = {"full-decode": lambda: full_decode_rate(jpegs),
                   "load-64": lambda: loader_rate(root, manifest, 64, True, args.batch),
                   "load-224": lambda: loader_rate(root, manifest, 224, True, args.batch),
                   "eval-224": lambda: loader_rate(root, manifest, 224, False, args.batch)}
        rates: dict[str, list[tuple[float, float]]] = {name: [] for name in loaders}
        for _ in range(args.rounds):
            for name, measure in loaders.items():
                rates[name].append(measure())
            for v in variants:
                v.run(batches, args.steps)

        trainer = {v.name: v.rate(args.batch) for v in variants}
        best = max(trainer, key=lambda name: trainer[name][1])
        (chosen,) = [v for v in variants if v.name == best]
        codist = TrainerVariant(f"{best}, 1 peer", manifest,
                                [f"model.channels_last={'true' if 'cl' in best else 'false'}",
                                 f"deepspeed.precision={best.split('+')[0]}"], 1, args.batch)
        codist.run(batches, 2, timed=False)
        for _ in range(args.rounds):  # interleaved with the chosen student-only variant
            codist.run(batches, args.steps)
            chosen.run(batches, args.steps)
        trainer[codist.name] = codist.rate(args.batch)
        trainer[best] = chosen.rate(args.batch)

    loader = {name: tuple(statistics.median(r[i] for r in runs) for i in (0, 1)) for name, runs in rates.items()}
    print("\nloader, one worker (one process, one thread), images/s (median of rounds): wall, per CPU-second")
    for name, (wall, cpu) in loader.items():
        print(f"  {name:12s} {wall:8.0f} {cpu:8.0f}   {cpu / loader['full-decode'][1]:.2f}x full decode")
    print(f"\ntrainer, ResNet-18 at 64 px, batch {args.batch}, one rank, images/s (median step): wall, per CPU-second")
    for name, (wall, cpu) in trainer.items():
        print(f"  {name:16s} {wall:8.1f} {cpu:8.1f}   {cpu / trainer['fp32'][1]:.2f}x fp32")
    cpu = {name: rate[1] for name, rate in trainer.items()}
    print(f"\nper CPU-second: channels_last fp32 {cpu['fp32+cl'] / cpu['fp32']:.2f}x, "
          f"bf16 {cpu['bf16+cl'] / cpu['bf16']:.2f}x; "
          f"bf16 over fp32 {cpu['bf16'] / cpu['fp32']:.2f}x (no cl), {cpu['bf16+cl'] / cpu['fp32+cl']:.2f}x (cl); "
          f"fastest: {best}")
    consumer = cpu[codist.name]
    ratio = loader["load-64"][1] / consumer
    verdict = ("the trainer is the bottleneck: one loader worker feeds more than one rank consumes"
               if ratio >= 1 else f"the loader is the bottleneck: give each rank >= {1 / ratio:.1f} loader workers")
    print(f"\n64 px, per CPU-second: one loader worker {loader['load-64'][1]:.0f} images/s vs a codistilling rank "
          f"({codist.name}) {consumer:.0f} images/s: ratio {ratio:.1f} -> {verdict}")
    print(f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: shared-machine figures, "
          "read the ratios")


if __name__ == "__main__":
    main()
