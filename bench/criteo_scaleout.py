"""Criteo pipeline scale-out: in-process runner with 1 and 2 workers, Dask with 2 workers; same run, same data.

    .venv/bin/python bench/criteo_scaleout.py [--rows 2000000] [--files 4] [--split-mb 32] [--workdir DIR]

Generates the rows once (`pipelines.synth_criteo`), then runs `codistill`'s
preprocessing of them three times, each in a child process:

* `fnapi-1`: FnApiRunner, one worker (the baseline);
* `fnapi-2`: FnApiRunner, 2 worker processes (`--direct_running_mode=multi_processing`);
* `dask-2`:  DaskRunner on a `dask.distributed.LocalCluster` of 2 worker processes
  (started before the clock starts; its start-up time is reported apart).

For each: rows/s of the pipeline (wall time of `preprocess`), peak memory
(the summed RSS of the child and all its descendants, sampled every 0.1 s),
both also as ratios to the baseline. The shards of all three are checked to
be identical (the manifests' sha256 per shard). Each run's progress lines go
to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

RUNS = {"fnapi-1": ["--runner=FnApiRunner"],
        "fnapi-2": ["--runner=FnApiRunner", "--direct_num_workers=2", "--direct_running_mode=multi_processing"],
        "dask-2": ["--runner=DaskRunner"]}


def child(name: str, input_glob: str, output: str, split_bytes: int) -> None:
    """One measured run (in its own process, so its memory is its own); prints a JSON line."""
    from codistill.config import parse_experiment
    from pipelines.run import preprocess

    config = parse_experiment({"name": "bench", "data": {"input": input_glob, "output": output,
                                                         "split_bytes": split_bytes}})
    args, startup = list(RUNS[name]), 0.0
    cluster = None
    if name.startswith("dask"):
        from dask.distributed import LocalCluster

        start = time.perf_counter()
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
        startup = time.perf_counter() - start
        args += ["--dask_client_address", cluster.scheduler_address]
    start = time.perf_counter()
    manifest = preprocess(config, args, overwrite=True,
                          show_progress=lambda line: print(f"[{name}] {line}", file=sys.stderr, flush=True))
    seconds = time.perf_counter() - start
    if cluster is not None:
        cluster.close()
    print(json.dumps({"rows": manifest.input_rows, "seconds": seconds, "startup": startup,
                      "shards": {s.path: s.sha256 for s in manifest.shards}}), flush=True)


def tree_rss(process: psutil.Process) -> int:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def measure(name: str, input_glob: str, output: str, split_bytes: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, __file__, "--child", name, "--input", input_glob, "--output", output,
                             "--split-bytes", str(split_bytes)], stdout=subprocess.PIPE, text=True, env=env)
    process, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, tree_rss(process))
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed with exit code {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1]) | {"peak_rss": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--split-mb", type=int, default=32, help="data.split_bytes in MB (ranges read in parallel)")
    parser.add_argument("--workdir")
    parser.add_argument("--child", choices=RUNS, help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--split-bytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.input, args.output, args.split_bytes)
        return

    from pipelines.synth_criteo import generate_criteo

    work = Path(args.workdir or tempfile.mkdtemp(prefix="criteo-scaleout-"))
    raw = work / "raw"
    if not (raw / "synth.json").exists() or json.loads((raw / "synth.json").read_text())["rows"] != args.rows:
        generate_criteo(str(raw), args.rows, files=args.files, seed=0)
    size = sum(p.stat().st_size for p in raw.glob("train-*"))
    print(f"{args.rows} rows in {args.files} files ({size / 1e6:.0f} MB), split into ranges of {args.split_mb} MB; "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start")
    results = {}
    for name in RUNS:
        results[name] = measure(name, str(raw / "train-*"), str(work / name), args.split_mb << 20)
    base = results["fnapi-1"]
    print(f"{'run':<8} {'seconds':>8} {'rows/s':>10} {'vs fnapi-1':>10} {'peak RSS':>9} {'vs fnapi-1':>10}")
    for name, r in results.items():
        rate, base_rate = r["rows"] / r["seconds"], base["rows"] / base["seconds"]
        print(f"{name:<8} {r['seconds']:>8.1f} {rate:>10,.0f} {rate / base_rate:>9.2f}x "
              f"{r['peak_rss'] / 2**20:>6.0f} MB {r['peak_rss'] / base['peak_rss']:>9.2f}x")
    print(f"dask LocalCluster start-up (not in its time): {results['dask-2']['startup']:.1f} s; "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    same = all(r["shards"] == base["shards"] for r in results.values())
    print("shards identical on all three runs" if same else "SHARDS DIFFER between runs")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
