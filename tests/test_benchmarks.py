"""Every benchmark in bench/ runs from this install at a tiny size, so none can rot (issue 19: one failed on a
missing import, two on config fields that had moved). Only that they finish and print their verdict is checked:
the figures at these sizes mean nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from codistill.config import load_experiment

from conftest import REPO

pytestmark = pytest.mark.timeout(300)

# bench script -> (tiny arguments, a line its report ends with); {work} is a fresh directory.
TINY = {
    "criteo_preprocess": (["--rows", "2000", "--workdir", "{work}"], "byte-identical shards:        9/9"),
    "criteo_scaleout": (["--rows", "2000", "--files", "2", "--split-mb", "1", "--workdir", "{work}"],
                        "shards identical on all three runs"),
    "commoncrawl_preprocess": (["--docs", "60", "--files", "2", "--vocab-size", "400", "--workdir", "{work}"],
                               "byte-identical shards (plain vs Beam): 5/5"),
    "commoncrawl_read_clean": (["--docs", "40", "--repeat", "1", "--workdir", "{work}"], "Cleaner, default config"),
    "imagenet_preprocess": (["--images", "40", "--classes", "4", "--workdir", "{work}"],
                            "byte-identical shards:           5/5"),
    "imagenet_loader": (["--repeat", "1", "--rounds", "1", "--steps", "1", "--batch", "4"], "is the bottleneck"),
    # README's precision comparison: what `auto` chose against fp32.
    "train_step": (["--steps", "6", "--warmup", "1", "--block", "3", "--exchange-every", "3", "--workdir", "{work}",
                    "--set", "data.synth.rows=3000", "--set", "deepspeed.precision=auto", "--compare-precision",
                    "fp32"], "fp32 / "),
    "exchange": (["--params", "1M", "--s3-max", "1M", "--repeat", "1", "--steps", "40", "--warmup", "5",
                  "--block", "20", "--exchange-every", "10", "--train-params", "100k", "--workdir", "{work}"],
                 "p99 with bf16 exchange / without"),
    "lm_state_restart": (["--data", "{work}/lm", "--train-steps", "3", "--windows", "2", "--restarts", "1",
                          "--set", "model.window=8", "--set", "deepspeed.micro_batch_size=4"], "warm-up forward"),
}


def test_every_benchmark_has_a_tiny_run():
    scripts = {p.stem for p in (REPO / "bench").glob("*.py")} - {"harness"}  # harness: what they share
    assert scripts == set(TINY)


@pytest.mark.parametrize("name", sorted(TINY))
def test_benchmark_runs_at_a_tiny_size(name, tmp_path):
    args, verdict = TINY[name]
    if name == "lm_state_restart":  # it measures a trained LM on an existing commoncrawl dataset
        from lm_data import write_lm_dataset

        config = load_experiment("commoncrawl-tiny", [f"data.output={tmp_path}/lm"])
        write_lm_dataset(f"{tmp_path}/lm", parameters=json.loads(json.dumps(config.data.recorded())))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, f"bench/{name}.py", *(a.format(work=tmp_path) for a in args)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert verdict in proc.stdout, proc.stdout[-3000:]


def test_make_bench_runs_every_benchmark_that_needs_no_dataset():
    """`make bench` (dry run: the real one takes minutes per benchmark) installs the bench extra and runs them all."""
    proc = subprocess.run(["make", "-n", "-B", "bench"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    extras = re.search(r"-e '\.\[([^]]+)\]'", proc.stdout).group(1).split(",")
    assert "bench" in extras, proc.stdout
    loop = next(line for line in proc.stdout.splitlines() if line.startswith("for name in"))
    assert loop.split(" in ", 1)[1].split(";")[0].split() == sorted(set(TINY) - {"lm_state_restart"})
