"""Training: DeepSpeed data parallelism, the `codistill train` CLI end to end, kill and resume,
the group launcher, churn and the evaluation metrics.

Everything runs the real parts on CPU (gloo, fp32, `DS_ACCELERATOR=cpu`) with tiny
settings. DeepSpeed launches are the expensive part (a few seconds each), so each
one is shared by several tests through module-scoped fixtures.
"""

from __future__ import annotations

import hashlib
import io
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

from codistill.cli import main as cli
from codistill.config import load_experiment
from codistill.dataset import join, load_manifest
from codistill.rundir import RunDir
from pipelines.formats import read_shard
from training import metrics
from training.launch import GroupCommand, GroupFailed, free_port, group_commands, run_groups
from training.report import eval_records, peer_coverage
from training.train import stale_checkpoints, usable_peers

from conftest import REPO, RUNNER

sys.path.insert(0, str(Path(__file__).parent))
import ds_worker  # noqa: E402

pytestmark = pytest.mark.timeout(300)

BIN = Path(sys.executable).parent
# Tiny settings shared by every DeepSpeed run here (data.output is added per dataset).
TINY = ["data.synth.rows=4000", "schedule.warmup_steps=0", "model.hidden=[16]", "deepspeed.micro_batch_size=64",
        "eval.batch_size=128"]


def env() -> dict[str, str]:
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run(argv: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)


def tail(text: str, lines: int = 40) -> str:
    """The last lines of a run's output, after the lines that name the error (deep in a multi-rank log)."""
    all_lines = [line for line in text.splitlines() if "FutureWarning" not in line and "return func(" not in line]
    causes = [line for line in all_lines if any(w in line for w in ("Error", "error:", "mismatch", "what():"))]
    return "\n".join(causes[:15] + ["..."] + all_lines[-lines:])


def records(run_dir: Path, group: int, kind: str) -> list[dict]:
    path = RunDir(run_dir).group(group).metrics
    return [r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip())
            if r["kind"] == kind]


def sets_args(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (read from /proc; nothing is signalled)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and alive(int(entry.name)):
                found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    """criteo-tiny at 4000 rows: an eval split of one stored record, two groups of two shards."""
    from pipelines.run import preprocess

    out = str(tmp_path_factory.mktemp("training-data") / "criteo")
    preprocess(load_experiment("criteo-tiny", TINY + [f"data.output={out}"]), [RUNNER])
    return out


# --- 1. gradients are averaged across ranks ---------------------------------------------------------


def reference_step(init: dict, batches: dict, ranks: list[int]) -> dict[str, torch.Tensor]:
    """One plain single-process SGD step (lr 1) on the given ranks' batches concatenated."""
    model = ds_worker.make_model()
    model.load_state_dict(init)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.0)
    cat = {k: torch.from_numpy(np.concatenate([batches[f"{k}_{r}"] for r in ranks])) for k in ("dense", "cat", "label")}
    ds_worker.loss_of(model, cat["dense"], cat["cat"], cat["label"]).backward()
    optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


CASES = ["0:1", "0:2", "1:1", "2:1", "2:2", "3:1", "3:2"]  # ZeRO stage : gradient accumulation steps


@pytest.fixture(scope="module")
def data_parallel_step(tmp_path_factory):
    work = tmp_path_factory.mktemp("ds-step")
    torch.manual_seed(0)
    init = {k: v.detach().clone().contiguous() for k, v in ds_worker.make_model().state_dict().items()}
    safetensors.torch.save_file(init, str(work / "init.safetensors"))
    rng = np.random.default_rng(0)
    batches = {}
    for r in range(2):  # a different batch per rank, equal sizes
        batches[f"dense_{r}"] = rng.normal(size=(16, 13)).astype(np.float32)
        batches[f"cat_{r}"] = rng.integers(0, ds_worker.BUCKETS[0], size=(16, 26)).astype(np.int64)
        batches[f"label_{r}"] = rng.integers(0, 2, size=16).astype(np.float32)
    np.savez(work / "batches.npz", **batches)
    proc = run([str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()),
                str(REPO / "tests" / "ds_worker.py"), str(work), *CASES], timeout=180)
    assert proc.returncode == 0, tail(proc.stdout + proc.stderr, 60)
    return work, init, batches


@pytest.mark.parametrize("case", CASES)
def test_data_parallel_step_averages_gradients_over_both_ranks(data_parallel_step, case):
    work, init, batches = data_parallel_step
    stage, accum = case.split(":")
    name = f"stage{stage}-accum{accum}"
    both = reference_step(init, batches, [0, 1])
    alone = [reference_step(init, batches, [r]) for r in range(2)]
    gap = max((both[k] - alone[0][k]).abs().max().item() for k in both)
    assert gap > 1e-3, "the two ranks' batches must lead to visibly different steps for this test to mean anything"
    for r in range(2):
        info = json.loads((work / f"{name}-rank{r}.json").read_text())
        assert info["world"] == 2
    holders = ["full"] + ([f"rank{r}" for r in range(2)] if stage != "3" else [])
    for holder in holders:
        got = safetensors.torch.load_file(str(work / f"{name}-{holder}.safetensors"))
        assert set(got) == set(both)
        for k in both:
            assert got[k].dtype == torch.float32 and got[k].shape == both[k].shape, (holder, k, got[k].shape)
        for r in range(2):
            assert any(not torch.allclose(got[k], alone[r][k], atol=1e-6) for k in both), \
                f"{name} {holder}: equals the step on rank {r}'s batch alone: gradients were not all-reduced"
        for k in both:
            torch.testing.assert_close(got[k], both[k], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, where=f"{name} {holder} {k}":
                                       f"{where}: not the step on both batches: {m}")


def test_zero3_full_state_dict_is_full_size_fp32_on_rank_zero(data_parallel_step):
    work, init, _ = data_parallel_step
    full = safetensors.torch.load_file(str(work / "stage3-accum1-full.safetensors"))
    assert {k: tuple(v.shape) for k, v in full.items()} == {k: tuple(v.shape) for k, v in init.items()}
    assert all(v.dtype == torch.float32 for v in full.values())
    for r in range(2):  # the gathering had something to gather
        partitioned = json.loads((work / f"stage3-accum1-rank{r}.json").read_text())["partitioned"]
        assert "mlp.0.weight" in partitioned, f"rank {r}: ZeRO-3 did not partition the big layer: {partitioned}"
    # (ds_worker.py also asserts that gathered_state gives None on rank 1.)


# --- 2. `codistill train` end to end -----------------------------------------------------------------

STEPS, EVAL_EVERY, BURN_IN, EXCHANGE, KEEP = 40, 20, 10, 5, 2


@pytest.fixture(scope="module")
def codistill_run(data_dir, tmp_path_factory):
    """`codistill train criteo-tiny`: 2 groups x 2 ranks, codistillation on."""
    run_dir = tmp_path_factory.mktemp("cli") / "cod-run"
    sets = TINY + [f"data.output={data_dir}", f"schedule.steps={STEPS}", f"eval.every={EVAL_EVERY}",
                   "train.checkpoint_every=20", "train.log_every=5", "deepspeed.ranks_per_group=2",
                   f"codistill.burn_in_steps={BURN_IN}", f"codistill.exchange_every={EXCHANGE}",
                   f"codistill.keep_snapshots={KEEP}", "codistill.poll_seconds=0.05", "codistill.max_staleness=1000",
                   "codistill.min_peer_coverage=0"]  # 30 steps after burn-in: a start-up skew may be most of them
    proc = run([str(BIN / "codistill"), "train", "criteo-tiny", "--run-dir", str(run_dir), *sets_args(sets)])
    assert proc.returncode == 0, tail(proc.stdout + proc.stderr, 60)
    return run_dir, proc, load_experiment("criteo-tiny", sets + [f"train.run_dir={run_dir}"])


@pytest.fixture(scope="module")
def baseline_run(data_dir, tmp_path_factory):
    """The same through the CLI with codistillation off, 1 rank per group."""
    run_dir = tmp_path_factory.mktemp("cli") / "base-run"
    sets = TINY + [f"data.output={data_dir}", "schedule.steps=20", "eval.every=20", "train.checkpoint_every=20",
                   "deepspeed.ranks_per_group=1", "codistill.enabled=false", f"codistill.burn_in_steps={BURN_IN}",
                   f"codistill.exchange_every={EXCHANGE}"]
    proc = run([str(BIN / "codistill"), "train", "criteo-tiny", "--run-dir", str(run_dir), *sets_args(sets)])
    assert proc.returncode == 0, tail(proc.stdout + proc.stderr, 60)
    return run_dir, proc


def eval_split(data_dir: str) -> dict[bytes, float]:
    manifest = load_manifest(data_dir)
    labels = {}
    for shard in manifest.shards_of("eval"):
        for block in read_shard(join(data_dir, shard.path), manifest.features, manifest.format):
            labels.update(zip(block["key"].tolist(), block["label"].tolist()))
    return labels


def test_cli_train_finishes_both_groups_with_eval_metrics(codistill_run, data_dir):
    run_dir, proc, _ = codistill_run
    eval_rows = len(eval_split(data_dir))
    for g in (0, 1):
        assert f"[group {g}] " in proc.stdout, "group output must be prefixed"
        assert f"group {g}: step {STEPS} eval log loss" in proc.stdout
        evals = records(run_dir, g, "eval")
        assert [r["step"] for r in evals] == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
        for r in evals:
            assert r["group"] == g and r["rows"] == eval_rows
            assert 0 < r["log_loss"] < math.log(2) + 0.2, r
            assert 0 <= r["auc"] <= 1 and 0 < r["calibration"] < 5 and 0 < r["positive_rate"] < 1, r
        train = records(run_dir, g, "train")
        assert train and train[-1]["step"] == STEPS
        assert all(math.isfinite(r["loss"]) for r in train)
        assert (RunDir(run_dir).group(g).checkpoints / "latest").read_text().strip() == f"step-{STEPS:08d}"


def test_cli_train_says_what_the_snapshots_ask_of_the_store(codistill_run, data_dir):
    """Beside the placement, where the run starts: the snapshot size and the store traffic, counted on the model."""
    _, proc, config = codistill_run
    from codistill.config import SnapshotTraffic
    from training.workloads.criteo import WORKLOAD as criteo

    model = criteo.build_model(config.model, load_manifest(data_dir))
    traffic = SnapshotTraffic(sum(p.numel() for p in model.parameters()), "fp32", EXCHANGE, 1)
    lines = proc.stdout.splitlines()
    placement = next(i for i, line in enumerate(lines) if line.startswith("placement: "))
    assert lines[placement + 1] == f"snapshots: {traffic.describe()}"


def test_cli_train_eval_predictions_cover_the_eval_split(codistill_run, data_dir):
    run_dir, _, _ = codistill_run
    labels = eval_split(data_dir)
    for g in (0, 1):
        with np.load(RunDir(run_dir).group(g).predictions, allow_pickle=False) as p:
            keys, probs, got_labels = p["key"], p["prob"], p["label"]
        assert keys.tolist() == sorted(labels), "predictions must cover every eval row once, sorted by key"
        assert got_labels.tolist() == [labels[k] for k in keys.tolist()]
        assert ((probs > 0) & (probs < 1)).all()
        final = records(run_dir, g, "eval")[-1]
        assert metrics.log_loss(probs, got_labels) == pytest.approx(final["log_loss"], abs=1e-6)


def test_cli_train_publishes_pruned_verifiable_snapshots(codistill_run, data_dir):
    run_dir, _, config = codistill_run
    from training.workloads.criteo import WORKLOAD as criteo

    model = criteo.build_model(config.model, load_manifest(data_dir))
    for g in (0, 1):
        store = run_dir / "store" / run_dir.name / f"group-{g}"
        assert (store / "LATEST").read_text().strip() == f"step-{STEPS:08d}.json"
        names = sorted(p.name for p in store.iterdir() if not p.name.startswith("."))
        steps = sorted({n.split(".")[0] for n in names if n.startswith("step-")})
        assert len(steps) == KEEP, f"keep_snapshots={KEEP} but the store holds {names}"
        assert steps[-1] == f"step-{STEPS:08d}"
        for step in steps:
            meta = json.loads((store / f"{step}.json").read_text())
            payload = (store / f"{step}.safetensors").read_bytes()
            assert meta["group"] == g and f"step-{meta['step']:08d}" == step
            assert meta["sha256"] == hashlib.sha256(payload).hexdigest()
        # The final snapshot is the final model: it reproduces the saved eval predictions.
        model.load_state_dict(safetensors.torch.load_file(str(store / f"step-{STEPS:08d}.safetensors")))
        model.eval()
        with np.load(RunDir(run_dir).group(g).predictions, allow_pickle=False) as p:
            keys, probs = p["key"].tolist(), p["prob"]
        manifest = load_manifest(data_dir)
        mine = {}
        with torch.no_grad():
            for shard in manifest.shards_of("eval"):
                for block in read_shard(join(data_dir, shard.path), manifest.features, manifest.format):
                    logits, _ = criteo.forward(model, {k: torch.from_numpy(np.array(v)) for k, v in block.items()
                                                       if k != "key"}, None)
                    mine.update(zip(block["key"].tolist(), torch.sigmoid(logits).numpy().tolist()))
        np.testing.assert_allclose([mine[k] for k in keys], probs, atol=1e-5)


def test_cli_train_distills_from_stale_peers_only_after_burn_in(codistill_run):
    run_dir, _, _ = codistill_run
    used = 0
    for g in (0, 1):
        train = records(run_dir, g, "train")
        assert [r["step"] for r in train] == list(range(1, STEPS + 1)), "one train record per step"
        for r in train:
            # The record of step s is the loss of the step that took the model from s-1 to s, at w(s-1).
            if r["step"] <= BURN_IN:
                assert r["distill_loss"] == 0 and r["weight"] == 0, f"group {g}: distillation during burn-in: {r}"
                assert r["loss"] == pytest.approx(r["label_loss"])
            else:
                assert r["weight"] == pytest.approx(1.0), r
            if r["peers"]:
                assert set(r["peers"]) == {str(1 - g)}
                snapshot_step = r["step"] - 1 - r["peers"][str(1 - g)]
                assert snapshot_step % EXCHANGE == 0 and 0 < snapshot_step <= STEPS, \
                    f"group {g}: staleness {r['peers']} at step {r['step']} names no published step"
                if r["step"] > BURN_IN:
                    used += 1
                    assert r["distill_loss"] > 0, f"group {g}: peer used after burn-in but no distillation: {r}"
                    assert r["loss"] == pytest.approx(r["label_loss"] + r["weight"] * r["distill_loss"], rel=1e-5)
            elif r["step"] > BURN_IN:
                assert r["distill_loss"] == 0, r
    assert used > 0, "no group ever distilled from a peer after burn-in"


def test_cli_train_records_each_groups_peer_coverage(codistill_run):
    run_dir, proc, _ = codistill_run
    for g in (0, 1):
        summary = records(run_dir, g, "summary")
        assert len(summary) == 1 and summary[0]["step"] == STEPS and summary[0]["min_peer_coverage"] == 0
        after = [r for r in records(run_dir, g, "train") if r["step"] > BURN_IN]
        assert summary[0]["peer_coverage"] == pytest.approx(sum(bool(r["peers"]) for r in after) / len(after))
        assert f"group {g}: distilled from its peers on {100 * summary[0]['peer_coverage']:.0f}% of the steps" \
            in proc.stdout


def test_cli_train_codistills_through_bf16_snapshots(data_dir, tmp_path):
    """`codistill.snapshot_dtype=bf16`: both groups publish half-size snapshots and adopt each other's (lockstep:
    every exchange is waited for, so the peers are surely used after burn-in)."""
    run_dir = tmp_path / "run"
    sets = TINY + [f"data.output={data_dir}", "schedule.steps=12", "eval.every=12", "train.checkpoint_every=12",
                   "deepspeed.ranks_per_group=1", "codistill.burn_in_steps=5", "codistill.exchange_every=5",
                   "codistill.lockstep=true", "codistill.lockstep_timeout=60", "codistill.poll_seconds=0.05",
                   "codistill.snapshot_dtype=bf16"]
    proc = run([str(BIN / "codistill"), "train", "criteo-tiny", "--run-dir", str(run_dir), *sets_args(sets)])
    assert proc.returncode == 0, tail(proc.stdout + proc.stderr, 60)
    from training.exchange import snapshot_bytes
    from training.workloads.criteo import WORKLOAD as criteo

    config = load_experiment("criteo-tiny", sets)
    state = criteo.build_model(config.model, load_manifest(data_dir)).state_dict()
    for g in (0, 1):
        store = run_dir / "store" / run_dir.name / f"group-{g}"
        meta = json.loads((store / "step-00000012.json").read_text())
        assert meta["dtype"] == "bf16" and meta["bytes"] == snapshot_bytes(state, torch.bfloat16)
        assert meta["bytes"] < 0.51 * snapshot_bytes(state)
        assert "x 2 bytes, bf16), one every 5 steps" in proc.stdout
        train = records(run_dir, g, "train")
        assert [r["step"] for r in train] == list(range(1, 13))
        assert all(r["peers"] == {str(1 - g): r["step"] - 1 - 5 * ((r["step"] - 1) // 5)} and r["distill_loss"] > 0
                   for r in train if r["step"] > 5), train


def train_record(step: int, weight: float, peers: dict) -> dict:
    return {"kind": "train", "step": step, "weight": weight, "peers": peers}


def test_peer_coverage_counts_steps_after_burn_in_with_every_peer():
    records = [train_record(1, 0.0, {}), train_record(2, 0.0, {"1": 0}),  # burn-in: not counted
               train_record(3, 1.0, {"1": 2, "2": 1}), train_record(4, 1.0, {"1": 3}), train_record(5, 0.5, {}),
               {"kind": "eval", "step": 5, "loss": 1.0}]
    assert peer_coverage(records, 2) == pytest.approx(1 / 3)
    assert peer_coverage(records + [train_record(5, 1.0, {"1": 0, "2": 0})], 2) == pytest.approx(2 / 3), \
        "a step written twice (a resume) counts once, the later record"
    assert peer_coverage(records[:2], 2) is None and peer_coverage(records, 0) is None


def test_codistillation_that_never_had_a_usable_peer_fails(data_dir, tmp_path):
    """max_staleness 0 leaves every peer snapshot out once the peer has moved on a step: the group ahead (or both)
    trains on its labels alone. Exit 0 would report it as codistilled."""
    run_dir = tmp_path / "run"
    sets = TINY + [f"data.output={data_dir}", "schedule.steps=30", "eval.every=30", "train.checkpoint_every=30",
                   "deepspeed.ranks_per_group=1", "codistill.burn_in_steps=5", "codistill.exchange_every=5",
                   "codistill.poll_seconds=0.05", "codistill.max_staleness=0"]
    proc = run([str(BIN / "codistill"), "train", "criteo-tiny", "--run-dir", str(run_dir), *sets_args(sets)])
    assert proc.returncode != 0, "a run without peers ended as a success"
    output = proc.stdout + proc.stderr
    failing = [line for line in output.splitlines() if "this run did not codistill" in line]
    assert failing, tail(output)
    assert re.search(r"\] error: group \d: distilled from its peers on only \d+% of the steps after burn-in "
                     r"\(codistill.min_peer_coverage 0.5\)", failing[0]), failing[0]
    assert "Traceback" not in output
    coverages = [records(run_dir, g, "summary")[0]["peer_coverage"] for g in (0, 1)]
    assert min(coverages) < 0.5, coverages


def test_a_store_that_cannot_be_written_fails_at_start(data_dir, tmp_path):
    """A file where the store's directory must be: every write fails (as for a read-only or full store)."""
    (tmp_path / "blocked").write_text("not a directory")
    store = tmp_path / "blocked" / "store"
    sets = TINY + [f"data.output={data_dir}", "schedule.steps=30", "deepspeed.ranks_per_group=1",
                   f"train.store={store}"]
    proc = run([str(BIN / "codistill"), "train", "criteo-tiny", "--run-dir", str(tmp_path / "run"), *sets_args(sets)])
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert f"{store}: a file stands where a directory must be" in output, tail(output)  # the run's record
    assert "Traceback" not in output
    for g in (0, 1):
        path = RunDir(tmp_path / "run").group(g).metrics
        assert not path.exists() or not records(tmp_path / "run", g, "train"), "it trained without a store"


def test_a_store_without_its_client_ends_every_rank_with_one_line(data_dir, tmp_path):
    """A group of 2 ranks started by hand (`deepspeed --num_gpus 2`, as docs/training.md shows) on a gs:// store
    without gcsfs: rank 0's ImportError reaches rank 1 as the same one-line error (on gloo rank 1 otherwise dies
    with "Connection closed by peer" beside rank 0's traceback; on NCCL it waits in the broadcast)."""
    assert importlib.util.find_spec("gcsfs") is None, "the test environment (make's EXTRAS) has no [gcs] extra"
    sets = TINY + [f"data.output={data_dir}", "deepspeed.ranks_per_group=2", "train.store=gs://bucket/store",
                   f"train.run_dir={tmp_path / 'run'}"]
    proc = run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
                "training.train", "--manifest", "criteo-tiny", "--group", "0", *sets_args(sets)], timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    # Rank 0 says it for the group; rank 1 ends on the same error (not a gloo traceback or a timeout).
    assert output.count("install the [gcs] extra") == 1 and "Traceback" not in output, tail(output)


def test_stale_peers_are_left_out_with_one_warning_per_transition(caplog):
    stale: set[int] = set()
    peer_steps = {1: 10, 2: None}  # group 2: no snapshot adopted yet, left out without a warning
    with caplog.at_level(logging.WARNING, logger="codistill.train"):
        assert usable_peers(peer_steps, 15, 5, stale) == [1]
        assert usable_peers(peer_steps, 16, 5, stale) == usable_peers(peer_steps, 17, 5, stale) == []
        assert [r.getMessage() for r in caplog.records] == [
            "peer group 1 left out: its snapshot (step 10) is 6 steps old, max_staleness 5"]
        peer_steps[1] = 20  # a newer snapshot adopted: usable again, and warned about again when it ages
        assert usable_peers(peer_steps, 21, 5, stale) == [1]
        assert usable_peers(peer_steps, 26, 5, stale, warn=False) == []  # the other ranks stay silent
        assert usable_peers(peer_steps, 27, 5, stale) == []
        assert len(caplog.records) == 1
        peer_steps[1] = 30
        assert usable_peers(peer_steps, 31, 5, stale) == [1] and usable_peers(peer_steps, 36, 5, stale) == []
        assert len(caplog.records) == 2
    assert usable_peers({1: 0, 2: None}, 10**6, None, set()) == [1]  # max_staleness None: any age


def test_cli_train_without_codistillation_neither_distills_nor_publishes(baseline_run):
    run_dir, proc = baseline_run
    for g in (0, 1):
        train = records(run_dir, g, "train")
        assert train and all(r["distill_loss"] == 0 and r["weight"] == 0 and not r["peers"] for r in train)
        assert records(run_dir, g, "eval")[-1]["step"] == 20
        assert RunDir(run_dir).group(g).predictions.exists()
    store = run_dir / "store"
    assert not store.exists() or not any(store.rglob("*.safetensors")), "published snapshots with codistill off"


# --- 3. kill and resume ----------------------------------------------------------------------------

KILL_STEPS, KILL_CKPT, KILL_EVAL, KILL_AFTER = 150, 20, 30, 32


def group_argv(data_dir: str, run_dir: Path, resume: bool = False) -> list[str]:
    """Group 0's command exactly as `codistill train` builds it (the deepspeed launcher, 2 ranks).

    (Not torchrun: torchrun starts every rank in a session of its own, so killing its process
    group would leave the ranks running; the deepspeed launcher keeps them in its group.)
    """
    sets = TINY + [f"data.output={data_dir}", f"schedule.steps={KILL_STEPS}", f"eval.every={KILL_EVAL}",
                   f"train.checkpoint_every={KILL_CKPT}", "codistill.enabled=false", "deepspeed.ranks_per_group=2",
                   f"train.run_dir={run_dir}"]
    return group_commands("criteo-tiny", [0], 2, sets, resume)[0].argv


@pytest.fixture(scope="module")
def kill_and_resume(data_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    straight, killed = base / "straight", base / "killed"
    proc = run(group_argv(data_dir, straight))
    assert proc.returncode == 0, tail(proc.stdout + proc.stderr, 60)

    log = open(base / "killed.log", "w")
    victim = subprocess.Popen(group_argv(data_dir, killed), cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    latest = RunDir(killed).group(0).checkpoints / "latest"
    metrics_file = RunDir(killed).group(0).metrics

    def progress() -> int:  # the last step with a train record (after an eval, between two checkpoints)
        steps = [json.loads(line)["step"] for line in metrics_file.read_text().splitlines()[-3:]
                 if line.endswith("}")] if metrics_file.exists() else []
        return max(steps, default=0)

    deadline = time.monotonic() + 120
    try:
        while not (latest.exists() and progress() >= KILL_AFTER) and victim.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.005)
        assert latest.exists(), f"no checkpoint appeared: {tail((base / 'killed.log').read_text())}"
    finally:
        try:
            os.killpg(victim.pid, signal.SIGKILL)  # the launchers and both ranks: one process group
        except ProcessLookupError:
            pass
        victim.wait(30)
        log.close()
    deadline = time.monotonic() + 10
    while processes_mentioning(str(killed)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_mentioning(str(killed)) == [], "a rank survived the kill"
    before = RunDir(killed).group(0).metrics.read_text()
    killed_at = latest.read_text().strip()

    proc = run(group_argv(data_dir, killed, resume=True))
    assert proc.returncode == 0, tail(proc.stdout + proc.stderr, 60)
    return straight, killed, before, killed_at, proc


def test_killed_run_was_really_interrupted(kill_and_resume):
    _, _, before, killed_at, proc = kill_and_resume
    steps = [json.loads(line)["step"] for line in before.splitlines() if line.strip()]
    assert max(steps) < KILL_STEPS, "the run finished before it was killed: the test proved nothing"
    resumed_from = int(killed_at.split("-")[1])
    assert resumed_from >= KILL_CKPT
    assert f"resumed at step {resumed_from}" in proc.stdout
    print(f"killed after step {max(steps)}, resumed from the checkpoint of step {resumed_from}")


def test_resumed_run_ends_like_an_uninterrupted_one(kill_and_resume):
    straight, killed, _, _, _ = kill_and_resume
    a, b = eval_records(straight, 0), eval_records(killed, 0)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(KILL_EVAL, KILL_STEPS + 1, KILL_EVAL))
    for run_dir in (straight, killed):
        assert (RunDir(run_dir).group(0).checkpoints / "latest").read_text().strip() == f"step-{KILL_STEPS:08d}"
    diff = abs(a[-1]["log_loss"] - b[-1]["log_loss"])
    print(f"final eval log loss: uninterrupted {a[-1]['log_loss']:.6f}, killed+resumed {b[-1]['log_loss']:.6f}, "
          f"|diff| {diff:.2e}")
    assert diff < 0.01
    with np.load(RunDir(straight).group(0).predictions) as p, \
            np.load(RunDir(killed).group(0).predictions) as q:
        assert p["key"].tolist() == q["key"].tolist()
        print(f"max |p - p'| over eval predictions: {np.abs(p['prob'] - q['prob']).max():.2e}")
        np.testing.assert_allclose(p["prob"], q["prob"], atol=0.05)


def test_resume_keeps_the_earlier_metrics_up_to_its_checkpoint(kill_and_resume):
    _, killed, before, killed_at, _ = kill_and_resume
    resumed_from = int(killed_at.split("-")[1])
    after = RunDir(killed).group(0).metrics.read_text()
    kept = "".join(line + "\n" for line in before.splitlines() if line.endswith("}")
                   and json.loads(line)["step"] <= resumed_from)
    assert kept and after.startswith(kept), "the resumed run rewrote or lost the records up to its checkpoint"
    train = [json.loads(line)["step"] for line in after.splitlines() if json.loads(line)["kind"] == "train"]
    assert sorted(train) == list(range(1, KILL_STEPS + 1)), "each step's train record once, none missing"


def test_resume_logs_the_steps_it_trains_again_once(lagging_resume):
    """Steps 31-40 ran before the resume and again after it: curves and reports must not count them twice."""
    run_dir, before, _ = lagging_resume
    assert [r["step"] for r in records(run_dir, 0, "train") if r["step"] > 30] == list(range(31, 41))
    assert [r["step"] for r in records(run_dir, 0, "eval")] == [20, 40]
    assert len(records(run_dir, 0, "summary")) == 1
    assert RunDir(run_dir).group(0).metrics.read_text().startswith(
        "".join(line + "\n" for line in before.splitlines() if json.loads(line)["step"] <= 30
                and json.loads(line)["kind"] != "summary"))


@pytest.fixture(scope="module")
def lagging_resume(data_dir, tmp_path_factory):
    """A finished 2-group codistillation run made into a crashed one whose group 1 lags a checkpoint interval
    behind (its newest checkpoint, step 40, gone: it died between its checkpoints of steps 30 and 40), then
    group 0 resumed (alone: group 1 resumed too could reach step 40 again before group 0 looks)."""
    run_dir = tmp_path_factory.mktemp("lagging") / "run"
    sets = TINY + [f"data.output={data_dir}", "schedule.steps=40", "eval.every=20", "train.checkpoint_every=10",
                   "deepspeed.ranks_per_group=1", "codistill.burn_in_steps=5", "codistill.exchange_every=5",
                   "codistill.poll_seconds=0.05", "codistill.max_staleness=5", "codistill.min_peer_coverage=0"]
    proc = run([str(BIN / "codistill"), "train", "criteo-tiny", "--run-dir", str(run_dir), *sets_args(sets)])
    assert proc.returncode == 0, tail(proc.stdout + proc.stderr, 60)
    behind = RunDir(run_dir).group(1).checkpoints
    shutil.rmtree(behind / "step-00000040")
    (behind / "latest").write_text("step-00000030")
    before = RunDir(run_dir).group(0).metrics.read_text()
    proc = run(group_commands("criteo-tiny", [0], 1, sets + [f"train.run_dir={run_dir}"], True)[0].argv)
    assert proc.returncode == 0, tail(proc.stdout + proc.stderr, 60)
    return run_dir, before, proc


def test_resume_restarts_every_group_from_the_newest_checkpoint_they_all_have(lagging_resume):
    """Group 0 resuming from its own newest (step 40, the end) would leave group 1 to train steps 31-40 against
    a peer 10 steps old, over max_staleness: without a peer."""
    run_dir, _, proc = lagging_resume
    assert "--resume: from step 30, the newest checkpoint every group has (step-00000040 is this group's newest)" \
        in proc.stdout, tail(proc.stdout)
    assert "resumed at step 30" in proc.stdout, tail(proc.stdout)
    assert (RunDir(run_dir).group(0).checkpoints / "latest").read_text().strip() == "step-00000040"
    assert [r["step"] for r in records(run_dir, 0, "eval")][-1] == 40


def test_a_group_keeps_the_newest_checkpoint_every_group_has(tmp_path):
    for step in (10, 20, 30, 40):
        (tmp_path / f"step-{step:08d}").mkdir()
    (tmp_path / "latest").write_text("step-00000040")
    assert [p.name for p in stale_checkpoints(tmp_path, None)] == ["step-00000010", "step-00000020"]
    assert [p.name for p in stale_checkpoints(tmp_path, 10)] == ["step-00000020"], \
        "the peers' newest checkpoint (10) is where a resume starts: it must stay"
    assert [p.name for p in stale_checkpoints(tmp_path, 30)] == ["step-00000010", "step-00000020"]


# --- 4. the launcher -----------------------------------------------------------------------------------

PY = sys.executable


@pytest.mark.timeout(60)
def test_run_groups_stops_everything_when_one_group_fails(tmp_path):
    pids = tmp_path / "pids"
    sleeper = (f"import os, subprocess, sys, time\n"
               f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
               f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
               f"print('sleeping', flush=True)\n"
               f"time.sleep(60)\n")
    failing = "import sys, time; print('about to fail', flush=True); time.sleep(1.0); sys.exit(3)"
    out = io.StringIO()
    start = time.monotonic()
    with pytest.raises(GroupFailed, match=r"group 1 exited with code 3"):
        run_groups([GroupCommand(0, [PY, "-c", sleeper]), GroupCommand(1, [PY, "-c", failing])], {}, out=out,
                   poll_seconds=0.05)
    assert time.monotonic() - start < 10
    parent, child = (int(p) for p in pids.read_text().split())
    deadline = time.monotonic() + 5
    while (alive(parent) or alive(child)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(parent), "group 0 was left running"
    assert not alive(child), "a process started by group 0 was left running"
    lines = out.getvalue().splitlines()
    assert "[group 0] sleeping" in lines and "[group 1] about to fail" in lines
    assert all(line.startswith(("[group 0] ", "[group 1] ")) for line in lines), lines


@pytest.mark.timeout(60)
def test_run_groups_returns_when_all_groups_succeed():
    out = io.StringIO()
    commands = [GroupCommand(g, [PY, "-c", f"print('line one of {g}'); print('line two of {g}')"]) for g in range(3)]
    run_groups(commands, {}, out=out, poll_seconds=0.05)
    lines = sorted(out.getvalue().splitlines())
    assert lines == sorted(f"[group {g}] line {n} of {g}" for g in range(3) for n in ("one", "two"))


@pytest.mark.timeout(180)
def test_cli_train_reports_a_failing_group_and_stops_the_others(data_dir, tmp_path):
    broken = tmp_path / "broken-data"
    shutil.copytree(data_dir, broken)
    manifest = load_manifest(str(broken))
    shard = broken / manifest.shards_of("train", 1)[0].path
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: passes the launch checks, fails when group 1 reads it
    shard.write_bytes(bytes(data))
    run_dir = tmp_path / "fail-run"
    sets = TINY + [f"data.output={broken}", "schedule.steps=100000", "eval.every=100000",
                   "train.checkpoint_every=100000", "deepspeed.ranks_per_group=1", "codistill.enabled=false"]
    start = time.monotonic()
    proc = run([str(BIN / "codistill"), "train", "criteo-tiny", "--run-dir", str(run_dir), *sets_args(sets)],
               timeout=150)
    took = time.monotonic() - start
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("Error: group 1 exited with code"), tail(proc.stderr)
    assert "ShardFormatError" in proc.stdout, "the failing group's own error should be shown, prefixed"
    assert "Traceback" not in proc.stderr, "the CLI itself must not print a traceback"
    assert took < 120
    time.sleep(0.5)
    assert processes_mentioning(str(run_dir)) == [], "group processes were left running"
    logged = RunDir(run_dir).group(0).metrics.exists()
    steps = [r["step"] for r in records(run_dir, 0, "train")] if logged else []
    assert not steps or max(steps) < 100000


# --- lockstep exchange ------------------------------------------------------------------------------------


def test_lockstep_with_a_dead_peer_ends_with_a_clear_error_not_a_hang(data_dir, tmp_path):
    """Group 0 of a 2-group lockstep run started alone: at its first exchange after burn-in it waits for group
    1's snapshot, which never comes, and stops after lockstep_timeout with an error naming the peer."""
    sets = TINY + [f"data.output={data_dir}", "schedule.steps=100", "eval.every=100", "train.checkpoint_every=100",
                   "codistill.burn_in_steps=10", "codistill.exchange_every=10", "codistill.lockstep=true",
                   "codistill.lockstep_timeout=5", "codistill.poll_seconds=0.2", f"train.run_dir={tmp_path / 'run'}"]
    proc = run(group_commands("criteo-tiny", [0], 1, sets, False)[0].argv, timeout=280)  # a hang would time out
    assert proc.returncode != 0
    assert "lockstep: group 1's snapshot of step 10 was not published after 5s" in proc.stdout + proc.stderr, \
        tail(proc.stdout + proc.stderr)
    steps = [r["step"] for r in records(tmp_path / "run", 0, "train")]
    assert max(steps) == 10, "it must stop at the exchange it waits for, not train on without its peer"


# --- ZeRO-3 evaluation when a rank has no eval rows ------------------------------------------------------


@pytest.mark.timeout(120)
def test_zero3_evaluation_when_a_rank_holds_no_eval_rows(data_dir, tmp_path):
    """The eval split here is one stored record, so rank 1 of 2 gets no eval rows. Under ZeRO-3 every forward
    is a collective (for parameters above DeepSpeed's persistence threshold, hence hidden=[512]): the rank
    without rows must still take part, or the ranks deadlock / gloo aborts."""
    assert len(load_manifest(data_dir).shards_of("eval")) == 1
    run_dir = tmp_path / "z3"
    sets = TINY + [f"data.output={data_dir}", "model.hidden=[512]", "deepspeed.zero_stage=3", "schedule.steps=2",
                   "eval.every=2", "train.checkpoint_every=2", "codistill.enabled=false"]
    proc = run([str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m",
                "training.train", "--manifest", "criteo-tiny", "--group", "0", "--run-dir", str(run_dir),
                *sets_args(sets)], timeout=100)
    assert proc.returncode == 0, tail(proc.stdout + proc.stderr, 30)
    assert records(run_dir, 0, "eval")[-1]["rows"] == len(eval_split(data_dir))


@pytest.mark.parametrize("change", ["data.groups=3", "data.criteo.cat_buckets=[77]", "data.synth.rows=4001"])
def test_cli_train_refuses_a_dataset_built_with_other_settings(data_dir, tmp_path, change):
    sets = TINY + [f"data.output={data_dir}", change]
    result = CliRunner().invoke(cli, ["train", "criteo-tiny", "--run-dir", str(tmp_path / "run"),
                                      *sets_args(sets)])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    assert "was built with other data settings" in result.output and "--overwrite" in result.output
    assert not (tmp_path / "run").exists(), "nothing may be launched"


def test_cli_train_will_not_mix_a_new_run_with_an_earlier_one(data_dir, tmp_path):
    """Old snapshots in the store would be adopted by the new run's groups as if their peers had published them."""
    run_dir = tmp_path / "run"
    old = run_dir / "store" / "run" / "group-1"
    old.mkdir(parents=True)
    (old / "LATEST").write_text("step-00000400.json")
    argv = ["train", "criteo-tiny", "--run-dir", str(run_dir), *sets_args(TINY + [f"data.output={data_dir}"])]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    assert "holds an earlier run" in result.output and "--resume" in result.output and "--overwrite" in result.output
    assert (old / "LATEST").exists(), "nothing may be deleted without --overwrite"


# --- 5. churn ------------------------------------------------------------------------------------------


def write_predictions(run_dir: Path, keys, probs, group: int = 0) -> None:
    path = RunDir(run_dir).group(group).predictions
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, workload=np.array("criteo"), key=np.array(keys, dtype="S"),
             prob=np.array(probs, np.float32), label=np.zeros(len(keys), np.float32))


def test_churn_by_hand(tmp_path):
    keys = [b"f:1", b"f:2", b"f:3", b"f:4", b"f:5"]
    a = [0.10, 0.60, 0.40, 0.90, 0.50]
    b = [0.20, 0.40, 0.45, 0.95, 0.51]
    write_predictions(tmp_path / "a", keys, a)
    write_predictions(tmp_path / "b", keys, b)
    # |diff| = .1 .2 .05 .05 .01 -> mean .082; > 0.5 flips on rows 2 (0.6 vs 0.4) and 5 (0.5 vs 0.51): 2 of 5
    result = CliRunner().invoke(cli, ["churn", str(tmp_path / "a"), str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert "over 5 eval examples" in result.output
    assert "mean |p_a - p_b| = 0.0820" in result.output
    assert "40.00% differ" in result.output
    c = metrics.churn(np.array(a), np.array(b))
    assert c["mean_abs_diff"] == pytest.approx(0.082) and c["disagreement"] == pytest.approx(0.4) and c["rows"] == 5
    # At 0.3 every row but the first is above the threshold in both runs: nothing flips.
    result = CliRunner().invoke(cli, ["churn", str(tmp_path / "a"), str(tmp_path / "b"), "--threshold", "0.3"])
    assert result.exit_code == 0 and "0.00% differ" in result.output, result.output
    result = CliRunner().invoke(cli, ["churn", str(tmp_path / "a"), str(tmp_path / "a")])
    assert "mean |p_a - p_b| = 0.0000" in result.output and "0.00% differ" in result.output


def test_churn_of_another_group(tmp_path):
    write_predictions(tmp_path / "a", [b"k"], [0.9], group=1)
    write_predictions(tmp_path / "b", [b"k"], [0.1], group=1)
    result = CliRunner().invoke(cli, ["churn", str(tmp_path / "a"), str(tmp_path / "b"), "--group", "1"])
    assert result.exit_code == 0 and "100.00% differ" in result.output, result.output


@pytest.mark.parametrize("other_keys", [[b"f:1", b"f:2", b"f:9"], [b"f:1", b"f:2"]])
def test_churn_refuses_different_eval_splits(tmp_path, other_keys):
    write_predictions(tmp_path / "a", [b"f:1", b"f:2", b"f:3"], [0.1, 0.2, 0.3])
    write_predictions(tmp_path / "b", other_keys, [0.1] * len(other_keys))
    result = CliRunner().invoke(cli, ["churn", str(tmp_path / "a"), str(tmp_path / "b")])
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception
    assert "different eval splits" in result.output and "Traceback" not in result.output


def test_churn_of_predictions_that_name_no_workload_is_a_clear_error(tmp_path):
    write_predictions(tmp_path / "a", [b"f:1"], [0.1])
    path = RunDir(tmp_path / "a").group(0).predictions
    with np.load(path) as data:
        np.savez(path, **{k: data[k] for k in data.files if k != "workload"})
    result = CliRunner().invoke(cli, ["churn", str(tmp_path / "a"), str(tmp_path / "a")])
    assert result.exit_code != 0 and "names no workload" in result.output and "Traceback" not in result.output


def test_churn_missing_run_is_a_clear_error(tmp_path):
    write_predictions(tmp_path / "a", [b"f:1"], [0.1])
    for argv in ([str(tmp_path / "a"), str(tmp_path / "nope")], [str(tmp_path / "nope"), str(tmp_path / "a")]):
        result = CliRunner().invoke(cli, ["churn", *argv])
        assert result.exit_code != 0
        assert isinstance(result.exception, SystemExit), result.exception
        assert "nope" in result.output and "eval predictions" in result.output, result.output
        assert "Traceback" not in result.output
    # A run without that group is just as clear.
    result = CliRunner().invoke(cli, ["churn", str(tmp_path / "a"), str(tmp_path / "a"), "--group", "3"])
    assert result.exit_code != 0 and "group-3" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("damage", ["truncated", "empty", "not_npz", "wrong_type", "missing_array"])
def test_churn_bad_prediction_files_are_a_clear_error(tmp_path, damage):
    write_predictions(tmp_path / "a", [b"f:1", b"f:2"], [0.1, 0.2])
    path = RunDir(tmp_path / "b").group(0).predictions
    write_predictions(tmp_path / "b", [b"f:1", b"f:2"], [0.1, 0.2])
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "not_npz":
        path.write_text("key,prob\nf:1,0.1\n")
    elif damage == "wrong_type":
        np.savez(path, key=np.array([1, 2]), prob=np.array(["a", "b"]))
    else:
        np.savez(path, key=np.array([b"f:1", b"f:2"]))
    result = CliRunner().invoke(cli, ["churn", str(tmp_path / "a"), str(tmp_path / "b")])
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception
    assert "eval_predictions.npz" in result.output and "Traceback" not in result.output, result.output


# --- 6. metrics ----------------------------------------------------------------------------------------


def brute_force_auc(scores, labels) -> float:
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auc_matches_pairwise_counting_with_ties():
    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(2, 60))
        scores = rng.integers(0, 6, size=n).astype(np.float32) / 5  # few distinct values: many ties
        labels = rng.integers(0, 2, size=n).astype(np.float32)
        if labels.min() == labels.max():
            labels[0] = 1 - labels[0]
        assert metrics.auc(scores, labels) == pytest.approx(brute_force_auc(scores, labels), abs=1e-12), trial
    assert metrics.auc(np.array([0.1, 0.9]), np.array([0.0, 1.0])) == 1.0
    assert metrics.auc(np.array([0.9, 0.1]), np.array([0.0, 1.0])) == 0.0
    assert metrics.auc(np.array([0.5, 0.5, 0.5]), np.array([0.0, 1.0, 1.0])) == 0.5


def test_auc_of_one_class_is_nan():
    assert math.isnan(metrics.auc(np.array([0.1, 0.7]), np.array([1.0, 1.0])))
    assert math.isnan(metrics.auc(np.array([0.1, 0.7]), np.array([0.0, 0.0])))
    m = metrics.binary_metrics(np.array([0.2, 0.4], np.float32), np.array([0.0, 0.0], np.float32))
    assert math.isnan(m["auc"]) and math.isnan(m["calibration"]) and m["positive_rate"] == 0


def test_log_loss_by_hand():
    probs = np.array([0.9, 0.2, 0.6, 0.5], np.float32)
    labels = np.array([1, 0, 0, 1], np.float32)
    expected = -(math.log(0.9) + math.log(0.8) + math.log(0.4) + math.log(0.5)) / 4
    assert metrics.log_loss(probs, labels) == pytest.approx(expected, rel=1e-6)
    # Saturated predictions are clipped, not infinite.
    assert math.isfinite(metrics.log_loss(np.array([0.0, 1.0]), np.array([1.0, 0.0])))
    assert metrics.log_loss(np.array([1.0, 0.0]), np.array([1.0, 0.0])) < 1e-6


def test_calibration_and_rows():
    probs = np.array([0.1, 0.3, 0.2, 0.4], np.float32)
    labels = np.array([0, 1, 0, 0], np.float32)
    m = metrics.binary_metrics(probs, labels)
    assert m["calibration"] == pytest.approx(0.25 / 0.25)
    assert m["positive_rate"] == 0.25 and m["rows"] == 4
    m = metrics.binary_metrics(probs * 2, labels)
    assert m["calibration"] == pytest.approx(2.0)
    assert m["log_loss"] == pytest.approx(metrics.log_loss(probs * 2, labels))
