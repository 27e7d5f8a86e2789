"""The snapshot exchange at real model sizes: publish and adopt time per store and dtype, and what publishing
costs a training step.

    .venv/bin/python bench/exchange.py [--params 10M,100M,1B] [--s3-max 100M] [--repeat 3]
                                       [--steps 600 --exchange-every 50 --train-params 10M --block 100]

Part 1, publish and adopt. For each size (`--params`: 10M, 100M and 1B parameters by default), each snapshot
dtype (fp32, bf16: `codistill.snapshot_dtype`) and each store, a state dict of that many fp32 parameters (4M
per tensor, as in a large model's layers, plus an int64 buffer) goes through the real exchange:

  serialise ms  `SnapshotPublisher.publish_async` in the caller's thread: the copy (and cast) of the weights
                into a safetensors buffer, the model signature and the thread start -- the stall a training
                step pays when it publishes;
  upload s      from then until `publish_async`'s background thread ends (`wait`): sha256, the weights file,
                the JSON, LATEST, pruning; MB/s is the file's size over it;
  adopt s       `PeerWatcher.fetch` of that step, as a reader: JSON, weights, sha256, safetensors parse,
                signature and finite checks (in the watcher's thread in a run);
  load ms       `FlatPeer.load` of the verified state dict into an fp32 peer model: the copy (and cast) a
                training step pays when it adopts a peer.

Stores: `local`, a temp directory (`--workdir` to put it elsewhere: its disk decides), and `s3`, moto's S3
server started here on 127.0.0.1 through s3fs, as the tests use it. moto holds every object in memory, so
sizes above `--s3-max` (default 100M parameters) skip S3. Each figure is the median of `--repeat` publishes
after an untimed first one (which also allocates the publisher's buffer, written over from then on, as in a
run). Memory at N parameters: 4N bytes each for the state and the peer model, and the snapshot's size three
times (the publisher's copy, the reader's bytes and its tensors): ~20 GB at 1B in fp32, ~14 GB in bf16
(`--dtypes bf16` measures only that).

Part 2, step time. A plain MLP of `--train-params` parameters (4 square layers, Adam, batch 32, one torch
thread, as `codistill train` gives a rank on a 2-core machine) trains `--steps` timed steps per variant:
`none` (no exchange), `fp32` and `bf16` (`publish_async` of the model's state dict every `--exchange-every`
steps to a local store, as `GroupTrainer.fit` does), interleaved in blocks of `--block` steps so drift in
machine load hits all of them alike. Publishes fall mid-block, so uploads overlap timed steps; at a block's end
the upload still running is waited for, untimed, so none leaks into another variant's steps. The goal
(issue 19): publishing never blocks a step, p99 step time with exchange <= 1.05x without.

Name the CPU with the figures (`lscpu | grep 'Model name'`); absolute times depend on the machine and its
load, the ratios in one run are what to compare.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from codistill import storage
from codistill.config import StorageConfig
from training.exchange import SNAPSHOT_DTYPES, PeerWatcher, SnapshotPublisher, model_signature, snapshot_bytes
from training.train import FlatPeer

GOAL_P99 = 1.05
RUN = "bench"
TENSOR = 4 * 2**20  # parameters per tensor of the synthetic state
S3_BUCKET = "codistill-bench"
S3_ENV = {"CODISTILL_BENCH_S3_KEY": "bench", "CODISTILL_BENCH_S3_SECRET": "bench"}


def count(text: str) -> int:
    """`10M`, `1B`, `250k` or a plain number -> parameters."""
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(text[-1].lower(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def label(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size:
            return f"{n / size:g}{unit}"
    return str(n)


class Layers(torch.nn.Module):
    """`parameters` fp32 values in tensors of at most TENSOR, plus one int64 buffer (integers stay as they are)."""

    def __init__(self, parameters: int):
        super().__init__()
        sizes = [min(TENSOR, parameters - start) for start in range(0, parameters, TENSOR)]
        self.layers = torch.nn.ParameterList(torch.empty(size) for size in sizes)
        self.register_buffer("steps", torch.tensor([parameters], dtype=torch.int64))


def synthetic_state(parameters: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(parameters)
    state = Layers(parameters).state_dict()
    for tensor in state.values():
        if tensor.is_floating_point():
            tensor.normal_(generator=g)
    return state


# --- moto's S3 server on 127.0.0.1 ---------------------------------------------------------------------


class MotoS3:
    """moto_server on a free local port with one bucket, installed as the storage rule for s3://S3_BUCKET."""

    def __init__(self, workdir: str):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.log = Path(workdir) / "moto.log"  # a file: a full pipe would stall the server
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p",
                                          str(self.port)], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("moto_server did not listen within 60 s") from None
                time.sleep(0.05)  # polling for the port, not a synchronisation delay
        os.environ.update(S3_ENV, AWS_EC2_METADATA_DISABLED="true")  # never ask a cloud metadata service
        storage.configure([StorageConfig(f"s3://{S3_BUCKET}", {"endpoint_url": f"http://127.0.0.1:{self.port}"},
                                         {"key": "CODISTILL_BENCH_S3_KEY", "secret": "CODISTILL_BENCH_S3_SECRET"})])
        storage.url_to_fs(f"s3://{S3_BUCKET}")[0].mkdir(S3_BUCKET)

    def close(self) -> None:
        storage.configure(())
        self.proc.terminate()
        self.proc.wait(timeout=30)


# --- part 1: publish and adopt ---------------------------------------------------------------------------


def publish_and_adopt(store: str, state: dict[str, torch.Tensor], peer: FlatPeer, dtype: str,
                      repeat: int) -> dict[str, float]:
    """Median serialise, upload, adopt and load seconds of `repeat` publishes of `state`, and the file's bytes."""
    torch_dtype = SNAPSHOT_DTYPES[dtype]
    size = snapshot_bytes(state, torch_dtype)
    publisher = SnapshotPublisher(store, RUN, group=1, keep=2, snapshot_dtype=dtype)
    watcher = PeerWatcher(store, RUN, group=0, peer_groups=[1], model_signature=model_signature(state, torch_dtype),
                          payload_bytes=size, snapshot_dtype=dtype, poll=False)
    times: dict[str, list[float]] = {"serialise": [], "upload": [], "adopt": [], "load": []}
    for step in range(repeat + 1):  # publish 0 warms up (directories, connections, page cache)
        start = time.perf_counter()
        publisher.publish_async(step, state)
        serialised = time.perf_counter()
        publisher.wait()
        uploaded = time.perf_counter()
        if publisher.last_published_step != step:
            raise RuntimeError(f"publishing {label(len(state))} to {store} failed (see the warning above)")
        adopted = watcher.fetch(1, step, timeout=3600)
        if adopted is None:
            raise RuntimeError(f"adopting the snapshot from {store} failed (see the warning above)")
        fetched = time.perf_counter()
        peer.load(adopted)
        del adopted
        if step:
            times["serialise"].append(serialised - start)
            times["upload"].append(uploaded - serialised)
            times["adopt"].append(fetched - uploaded)
            times["load"].append(time.perf_counter() - fetched)
    watcher.close()
    return {k: statistics.median(v) for k, v in times.items()} | {"bytes": size}


def part1(args, workdir: str) -> None:
    sizes = [count(s) for s in args.params.split(",")]
    s3 = MotoS3(workdir) if any(n <= count(args.s3_max) for n in sizes) else None
    print(f"{'size':>6} {'dtype':>5} {'store':>5} {'bytes':>10} {'serialise ms':>13} {'upload s':>9} "
          f"{'MB/s':>8} {'adopt s':>8} {'load ms':>8}")
    try:
        for n in sizes:
            state = synthetic_state(n)
            peer = FlatPeer(Layers(n).eval().requires_grad_(False))
            stores = [("local", f"{workdir}/store-{label(n)}")]
            if s3 is not None and n <= count(args.s3_max):
                stores.append(("s3", f"s3://{S3_BUCKET}/{label(n)}"))
            for dtype in args.dtypes.split(","):
                for name, store in stores:
                    r = publish_and_adopt(store, state, peer, dtype, args.repeat)
                    print(f"{label(n):>6} {dtype:>5} {name:>5} {r['bytes'] / 1e6:>8.1f}MB "
                          f"{r['serialise'] * 1e3:>13.1f} {r['upload']:>9.3f} {r['bytes'] / 1e6 / r['upload']:>8.0f} "
                          f"{r['adopt']:>8.3f} {r['load'] * 1e3:>8.1f}", flush=True)
                    fs, root = storage.url_to_fs(store)
                    fs.rm(root, recursive=True)
            del state, peer
    finally:
        if s3 is not None:
            s3.close()
    if s3 is None:
        print(f"(no size at or below --s3-max {args.s3_max}: S3 not measured)")


# --- part 2: step time with and without publishing ---------------------------------------------------------


def mlp(parameters: int) -> torch.nn.Module:
    """4 square linear layers (with biases) of about `parameters` in all."""
    width = max(1, int((parameters / 4) ** 0.5))
    layers: list[torch.nn.Module] = []
    for _ in range(4):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def part2(args, workdir: str) -> None:
    torch.manual_seed(0)
    model = mlp(count(args.train_params))
    parameters = sum(p.numel() for p in model.parameters())
    width = model[0].in_features
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    inputs, targets = torch.randn(32, width), torch.randn(32, width)

    def step() -> None:
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    publishers = {dtype: SnapshotPublisher(f"{workdir}/train-store-{dtype}", RUN, group=0, keep=2,
                                           snapshot_dtype=dtype) for dtype in ("fp32", "bf16")}
    variants = ["none", *publishers]
    times: dict[str, list[float]] = {v: [] for v in variants}
    kinds: dict[str, list[bool]] = {v: [] for v in variants}  # whether the step published
    for _ in range(args.warmup):
        step()
    for publisher in publishers.values():  # the first publish creates the store's directories: untimed
        publisher.publish(0, model.state_dict())
    taken = 0
    while min(len(t) for t in times.values()) < args.steps:
        for variant in variants:
            publisher = publishers.get(variant)
            for i in range(min(args.block, args.steps - len(times[variant]))):
                publishes = publisher is not None and i % args.exchange_every == args.exchange_every // 2
                start = time.perf_counter()
                step()
                if publishes:  # GroupTrainer.fit: after the step, inside it as far as the step time goes
                    publisher.publish_async(taken, model.state_dict())
                times[variant].append(time.perf_counter() - start)
                kinds[variant].append(publishes)
                taken += 1
            if publisher is not None:
                publisher.wait()  # untimed: no upload runs into the next variant's steps
    print(f"MLP of {parameters / 1e6:.2f}M parameters (4 x {width}x{width}), batch 32, Adam, "
          f"{torch.get_num_threads()} torch thread; {args.steps} timed steps per variant after {args.warmup} "
          f"warm-up steps, in blocks of {args.block}; publish every {args.exchange_every} steps (local store)")
    print(f"{'variant':<8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'publishing steps (median ms)':>30}")
    for v in variants:
        t, k = np.asarray(times[v]) * 1e3, np.asarray(kinds[v])
        published = f"{np.median(t[k]):.2f} ({k.sum()} steps)" if k.any() else ""
        print(f"{v:<8} {np.percentile(t, 50):>8.2f} {np.percentile(t, 99):>8.2f} {t.max():>8.2f} {published:>30}")
    base = np.percentile(times["none"], 99)
    for v in publishers:
        ratio = np.percentile(times[v], 99) / base
        print(f"p99 with {v} exchange / without: {ratio:.3f} (goal <= {GOAL_P99}x: "
              f"{'PASS' if ratio <= GOAL_P99 else 'FAIL'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="10M,100M,1B", help="snapshot sizes in parameters, comma-separated")
    parser.add_argument("--s3-max", default="100M", help="the largest size also sent to S3 (moto keeps it in memory)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="snapshot dtypes of part 1, comma-separated")
    parser.add_argument("--repeat", type=int, default=3, help="timed publishes per size, dtype and store")
    parser.add_argument("--steps", type=int, default=600, help="timed training steps per variant (0: skip part 2)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed training steps first")
    parser.add_argument("--block", type=int, default=100, help="steps per variant before switching to the next")
    parser.add_argument("--exchange-every", type=int, default=50)
    parser.add_argument("--train-params", default="10M", help="parameters of the MLP trained in part 2")
    parser.add_argument("--workdir", help="where the local stores go (default: a temp dir)")
    args = parser.parse_args()
    if not set(args.dtypes.split(",")) <= set(SNAPSHOT_DTYPES):
        parser.error(f"--dtypes: each one of {', '.join(SNAPSHOT_DTYPES)}, got {args.dtypes}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    workdir = tempfile.mkdtemp(prefix="codistill-bench-exchange-", dir=args.workdir)
    wall = time.perf_counter()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, "
          f"stores under {workdir}\n")
    try:
        part1(args, workdir)
        if args.steps:
            print()
            part2(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"wall time {time.perf_counter() - wall:.1f} s")


if __name__ == "__main__":
    main()
