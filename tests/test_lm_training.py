"""The language model through the real trainer: `codistill train` with 2 groups x 2 DeepSpeed ranks on CPU
codistilling in the stateful stream layout; snapshots carry the tokenizer's hash (the exchanger refuses a
peer whose hash differs from ours: tests/test_exchange.py).

The data set is tiny (`tests/lm_data.py`: shards written with the real shard writer and a real
dataset manifest), so the expensive part is the DeepSpeed launches; each is shared by several tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from codistill.config import parse_experiment
from codistill.dataset import load_manifest
from codistill.rundir import RunDir
from training.report import predictions
from training.workloads import lm

from conftest import REPO
from lm_data import VOCAB, write_lm_dataset

pytestmark = pytest.mark.timeout(300)

BIN = Path(sys.executable).parent
STEPS, BURN_IN, EXCHANGE = 40, 10, 5


def experiment(work: Path, **sections) -> dict:
    raw = {
        "name": "lm-test",
        "data": {"dataset": "commoncrawl", "input": "tests/lm_data.py", "output": str(work / "data"), "groups": 2},
        "model": {"kind": "lstm", "embedding_dim": 16, "hidden": 32, "layout": "stateful", "window": 8,
                  "restart": "warmup"},
        "optimizer": {"name": "adam", "lr": 0.01},
        "schedule": {"steps": STEPS, "warmup_steps": 0},
        "deepspeed": {"ranks_per_group": 2, "micro_batch_size": 8},
        "codistill": {"burn_in_steps": BURN_IN, "exchange_every": EXCHANGE, "poll_seconds": 0.05,
                      "max_staleness": 1000,
                      "min_peer_coverage": 0},  # 30 steps after burn-in: a start-up skew may be most of them
        "eval": {"every": 20, "batch_size": 32},
        "train": {"run_dir": str(work / "run"), "log_every": 4, "checkpoint_every": STEPS},
    }
    for name, values in sections.items():
        raw[name] = {**raw[name], **values}
    return raw


def run(argv: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)


def records(run_dir: Path, group: int, kind: str) -> list[dict]:
    lines = RunDir(run_dir).group(group).metrics.read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("lm-train")
    raw = experiment(work)
    config = parse_experiment(raw)
    write_lm_dataset(str(work / "data"), parameters=json.loads(json.dumps(config.data.recorded())))
    (work / "lm.yaml").write_text(yaml.safe_dump(raw))
    proc = run([str(BIN / "codistill"), "train", str(work / "lm.yaml")])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return work, proc


def test_both_groups_train_and_report_bits_per_byte_next_to_the_floor(lm_run):
    work, proc = lm_run
    dataset = load_manifest(str(work / "data"))
    eval_tokens = dataset.extra["tokens"]["eval"]
    for g in (0, 1):
        evals = records(work / "run", g, "eval")
        assert [e["step"] for e in evals] == [20, 40]
        last = evals[-1]
        assert last["loss"] == last["bits_per_byte"] and last["floor"] == 0.25
        assert last["tokens"] == eval_tokens
        assert last["perplexity"] == pytest.approx(np.exp(last["cross_entropy"]))
        # Better than knowing nothing (uniform over the vocabulary), and improving.
        uniform = last["tokens"] * np.log2(VOCAB) / last["text_bytes"]
        assert last["loss"] < min(evals[0]["loss"], uniform)
        assert f"group {g}: step {STEPS} eval" in proc.stdout and "bits/byte (floor 0.2500)" in proc.stdout


def test_groups_distill_from_their_peer_only_after_burn_in(lm_run):
    work, _ = lm_run
    used = 0
    for g in (0, 1):
        train = records(work / "run", g, "train")
        assert [r["step"] for r in train] == list(range(1, STEPS + 1))
        for r in train:
            if r["step"] <= BURN_IN:
                assert r["distill_loss"] == 0 and r["weight"] == 0, r
            if r["peers"] and r["step"] > BURN_IN:
                assert set(r["peers"]) == {str(1 - g)}
                assert r["distill_loss"] > 0
                assert r["loss"] == pytest.approx(r["label_loss"] + r["weight"] * r["distill_loss"], rel=1e-5)
                used += 1
            elif r["step"] > BURN_IN:
                assert r["distill_loss"] == 0, r
    # Whichever group runs behind sees the other's snapshots (the last one is published at the end).
    assert used > 0, "no group ever distilled from its peer after burn-in"


def test_snapshots_carry_the_tokenizer_hash_as_vocab_hash(lm_run):
    work, _ = lm_run
    dataset = load_manifest(str(work / "data"))
    metas = sorted((work / "run" / "store" / "run").glob("group-*/step-*.json"))
    assert metas
    assert {json.loads(p.read_text())["vocab_hash"] for p in metas} == {dataset.tokenizer_sha256}


def test_eval_predictions_give_argmax_churn_between_the_groups(lm_run):
    work, _ = lm_run
    workload, rows0 = predictions(work / "run", 0)
    _, rows1 = predictions(work / "run", 1)
    assert workload.name == "commoncrawl"
    assert rows0["argmax"].shape == rows1["argmax"].shape and rows0["argmax"].ndim == 2
    churn = lm.churn(rows0, rows1)
    assert churn["positions"] == load_manifest(str(work / "data")).extra["tokens"]["eval"]
    assert 0.0 <= churn["disagreement"] <= 1.0
    assert lm.churn(rows0, rows0)["disagreement"] == 0.0
