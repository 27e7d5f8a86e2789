"""`deepspeed.precision: auto`: bf16 only on hardware that runs it natively; the choice printed and recorded."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from codistill.config import DeepSpeedConfig, load_experiment
from codistill.rundir import RunDir
from training.precision import choose_precision, cpu_flags, local_precision

from conftest import REPO, RUNNER

AVX2_EPYC = {"fpu", "sse4_2", "avx", "avx2", "fma"}  # issue 19's machine: no AVX-512
SAPPHIRE_RAPIDS = AVX2_EPYC | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}


@pytest.mark.parametrize(("requested", "cuda", "flags", "chosen"), [
    ("auto", None, AVX2_EPYC, "fp32"),
    ("auto", None, AVX2_EPYC | {"avx512f", "avx512bw"}, "fp32"),  # AVX-512 without its bf16 extension
    ("auto", None, AVX2_EPYC | {"avx512f", "avx512_bf16"}, "bf16"),
    ("auto", None, AVX2_EPYC | {"amx_bf16"}, "bf16"),
    ("auto", None, SAPPHIRE_RAPIDS, "bf16"),
    ("auto", None, set(), "fp32"),  # not Linux: no flags known
    ("auto", True, AVX2_EPYC, "bf16"),  # the GPU decides, not the host CPU
    ("auto", False, SAPPHIRE_RAPIDS, "fp32"),
    ("fp32", None, SAPPHIRE_RAPIDS, "fp32"),  # a precision set in the manifest is taken as given
    ("bf16", None, AVX2_EPYC, "bf16"),
    ("fp16", True, set(), "fp16"),
])
def test_auto_takes_bf16_only_where_it_runs_natively(requested, cuda, flags, chosen):
    precision, why = choose_precision(requested, cuda, flags)
    assert precision == chosen and why


def test_the_reason_names_what_decided():
    assert "avx512_bf16" in choose_precision("auto", None, AVX2_EPYC | {"avx512_bf16"})[1]
    assert "emulated" in choose_precision("auto", None, AVX2_EPYC)[1]
    assert "GPU" in choose_precision("auto", False, set())[1]


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512_bf16\n\n"
                       "processor\t: 1\nflags\t\t: fpu avx2 avx512_bf16\n")
    assert cpu_flags(str(cpuinfo)) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


# The 224k-parameter Criteo DNN at batch 128 is 1.8x faster in fp32 even where bf16 is native (DeepSpeed's bf16
# optimizer costs more than its small matrices save): those CPU recipes say fp32.
SMALL_CPU_RECIPES = {"criteo-tiny", "criteo-datalimited", "criteo-onepass"}


def test_auto_is_the_default_and_the_shipped_manifests_use_it():
    assert DeepSpeedConfig().precision == "auto"
    for path in sorted((REPO / "manifests").glob("*.yaml")):
        expected = "fp32" if path.stem in SMALL_CPU_RECIPES else "auto"
        assert load_experiment(str(path)).deepspeed.precision == expected, path.name


@pytest.mark.timeout(300)
def test_a_training_run_prints_and_records_its_precision(tmp_path):
    """`codistill train criteo-tiny` (2 groups, peers adopted every 5 steps): each group says what `auto` chose
    here and records it in metrics.jsonl; the peers (lockstep from step 5) run in it too."""
    from pipelines.run import preprocess

    data = tmp_path / "data"
    sets = ["data.synth.rows=2000", f"data.output={data}", "model.hidden=[16]", "deepspeed.micro_batch_size=64",
            "deepspeed.ranks_per_group=1", "schedule.steps=12", "schedule.warmup_steps=0", "eval.every=12",
            "eval.batch_size=256", "train.checkpoint_every=12", "codistill.exchange_every=5",
            "codistill.poll_seconds=0.05", "codistill.lockstep=true", "codistill.burn_in_steps=5",
            "deepspeed.precision=auto"]
    preprocess(load_experiment("criteo-tiny", sets), [RUNNER])
    run_dir = tmp_path / "run"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    argv = [str(Path(sys.executable).parent / "codistill"), "train", "criteo-tiny", "--run-dir", str(run_dir)]
    proc = subprocess.run(argv + [a for s in sets for a in ("--set", s)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=280)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    chosen, why = local_precision("auto")
    for group in (0, 1):
        assert f"group {group}: training in {chosen} ({why})" in proc.stdout
        records = [json.loads(line) for line in RunDir(run_dir).group(group).metrics.read_text().splitlines()]
        setup = [r for r in records if r["kind"] == "setup"]
        assert setup == [{"kind": "setup", "step": 0, "group": group, "precision": chosen, "why": why}]
        train = [r for r in records if r["kind"] == "train"]
        assert len(train) == 12 and all(math.isfinite(r["loss"]) for r in train)
        assert any(r["peers"] and r["distill_loss"] > 0 for r in train), "a peer was distilled from"


@pytest.mark.timeout(400)
def test_a_resume_trains_on_in_the_precision_of_its_checkpoints(tmp_path):
    """A requeue onto other hardware: the checkpoints were trained in the precision `auto` does not pick here
    (set in the manifest, as `auto` elsewhere would have picked it). `--resume` with `auto` trains on in theirs;
    a conflicting explicit setting is refused in one line naming the one to set."""
    import shutil

    from pipelines.run import preprocess
    from training.launch import group_commands

    here = local_precision("auto")[0]
    theirs = "fp32" if here == "bf16" else "bf16"
    data, run_dir = tmp_path / "data", tmp_path / "run"
    sets = ["data.synth.rows=2000", f"data.output={data}", "model.hidden=[16]", "deepspeed.micro_batch_size=64",
            "deepspeed.ranks_per_group=1", "schedule.steps=8", "schedule.warmup_steps=0", "eval.every=8",
            "eval.batch_size=256", "train.checkpoint_every=4", "codistill.enabled=false", f"train.run_dir={run_dir}"]
    preprocess(load_experiment("criteo-tiny", sets), [RUNNER])
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    def train(precision: str, resume: bool) -> subprocess.CompletedProcess:
        argv = group_commands("criteo-tiny", [0], 1, sets + [f"deepspeed.precision={precision}"], resume)[0].argv
        return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)

    first = train(theirs, resume=False)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    checkpoints = RunDir(run_dir).group(0).checkpoints
    shutil.rmtree(checkpoints / "step-00000008")  # it died after step 4's checkpoint: steps 5-8 train again
    (checkpoints / "latest").write_text("step-00000004")
    resumed = train("auto", resume=True)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert f"group 0: training in {theirs} (as its checkpoints were trained (--resume))" in resumed.stdout
    assert "resumed at step 4" in resumed.stdout

    refused = train(here, resume=True)
    errors = [line for line in (refused.stdout + refused.stderr).splitlines() if "error: group 0: " in line]
    assert refused.returncode != 0 and len(errors) == 1, (refused.stdout + refused.stderr)[-4000:]
    assert errors[0].endswith(f"were trained in {theirs}, this configuration sets {here}: resume with "
                              f"--set deepspeed.precision={theirs}")
