"""`codistill demo --plan criteo-smoke` and `codistill experiment`: every (condition, seed) is a real `codistill
train` run; the report selects each model's step on the validation half and measures it on the test half, with
intervals, from the saved predictions; lockstep staleness is exact; finished runs are never trained again."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from codistill.config import ConfigError
from codistill.experiment import run_plan
from codistill.plans import load_plan
from training.metrics import row_log_loss, validation_half

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "manifests" / "experiments" / "criteo-smoke.yaml"
CODISTILL = Path(sys.executable).parent / "codistill"
EVAL_STEPS = [5, 20, 40, 60]


def run_cli(args: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([str(CODISTILL), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The demo command on the smoke plan: data, verify, every run, the report and its console table."""
    work = tmp_path_factory.mktemp("experiment")
    proc = run_cli(["demo", "--plan", str(SMOKE)], work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, proc


def group_dirs(work: Path, condition: str, seed: int) -> list[Path]:
    return sorted((work / "runs" / "criteo-smoke" / f"{condition}-seed{seed}").glob("group-*"))


def test_every_run_is_an_ordinary_finished_training_run_with_predictions_at_every_eval(smoke):
    work, proc = smoke
    plan = load_plan(str(SMOKE))
    for condition in plan.conditions:
        for seed in plan.seeds:
            groups = plan.config(condition, seed).trained_groups
            assert [p.name for p in group_dirs(work, condition.name, seed)] == [f"group-{g}" for g in groups]
            for group_dir in group_dirs(work, condition.name, seed):
                assert sorted(p.name for p in (group_dir / "eval").iterdir()) == ["keys.npy"] + [
                    f"step-{s:08d}.npz" for s in EVAL_STEPS]
                assert (group_dir / "best.safetensors").exists() and (group_dir / "model.safetensors").exists()
    assert "== tuning" in proc.stdout and "verify: OK" in proc.stdout
    assert "== run 10/10: codistill seed 1" in proc.stdout.replace("== run 2/2", "== run 10/10")


def reported(report: str, condition: str, column: str) -> float:
    """The point estimate in a condition's cell of the report's Results table."""
    lines = report.split("## Results", 1)[1].splitlines()
    header = next(line for line in lines if line.startswith("| condition"))
    index = [c.strip() for c in header.strip("|").split("|")].index(column)
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0].split(" (=")[0] == condition:
            return float(cells[index].split()[0])
    raise AssertionError(f"no row for {condition}")


def test_report_measures_each_model_on_test_at_its_best_validation_step(smoke):
    """Recomputed here from the saved predictions alone, independently of the report's code."""
    work, _ = smoke
    report = (work / "runs" / "criteo-smoke" / "report.md").read_text()
    for condition in ("baseline", "codistill", "union-2x-batch"):
        per_seed = []
        for seed in (0, 1):
            losses = []
            for group_dir in group_dirs(work, condition, seed):
                keys = np.load(group_dir / "eval" / "keys.npy")
                validation = validation_half(keys)
                curve = {}
                for step in EVAL_STEPS:
                    with np.load(group_dir / "eval" / f"step-{step:08d}.npz") as rows:
                        loss = row_log_loss(rows["prob"], rows["label"])
                    curve[step] = (loss[validation].mean(), loss[~validation].mean())
                    record = next(r for r in map(json.loads, (group_dir / "metrics.jsonl").read_text().splitlines())
                                  if r["kind"] == "eval" and r["step"] == step)
                    # The trainer's own halves agree with the saved predictions.
                    assert record["validation"]["loss"] == pytest.approx(curve[step][0], rel=1e-6)
                    assert record["test"]["loss"] == pytest.approx(curve[step][1], rel=1e-6)
                best = min(EVAL_STEPS, key=lambda s: (curve[s][0], s))
                losses.append(curve[best][1])
            per_seed.append(np.mean(losses))
        assert reported(report, condition, "test loss") == pytest.approx(np.mean(per_seed), abs=6e-5), condition
    assert re.search(r"\| churn vs baseline \| .* \| (holds|FAILS|inconclusive) \|", report)
    assert (work / "runs" / "criteo-smoke" / "loss_vs_step.png").stat().st_size > 10_000


def test_lockstep_staleness_is_exactly_the_schedule(smoke):
    work, _ = smoke
    for seed in (0, 1):
        for group_dir in group_dirs(work, "codistill", seed):
            records = [r for r in map(json.loads, (group_dir / "metrics.jsonl").read_text().splitlines())
                       if r["kind"] == "train"]
            for r in records:
                computed_at = r["step"] - 1  # a train record is logged once its step is done
                uses_peers = computed_at >= 10  # burn-in 10, exchange every 10: the step-10 snapshot is the first
                assert bool(r["peers"]) == uses_peers, r
                if uses_peers:
                    assert list(r["peers"].values()) == [computed_at % 10], r


def test_the_ensemble_averages_each_baseline_runs_groups(smoke):
    from codistill.analysis import ensemble_model, group_model
    from training.workloads import workload_for

    work, _ = smoke
    run = work / "runs" / "criteo-smoke" / "baseline-seed0"
    members = [group_model(run, 0), group_model(run, 1)]
    ensemble = ensemble_model("e", members, workload_for("criteo"))
    np.testing.assert_allclose(ensemble.load(3)["prob"], (members[0].load(3)["prob"] + members[1].load(3)["prob"]) / 2,
                               atol=1e-6)


def test_the_tuning_is_fixed_before_its_followers_train(smoke):
    work, proc = smoke
    targets = json.loads((work / "runs" / "criteo-smoke" / "targets.json").read_text())["tuning"]
    assert targets["best"] in ("baseline", "label-smoothing") and targets["then_train"] == ["codistill"]
    assert proc.stdout.index("== tuning") < proc.stdout.index("codistill seed 0")


def test_a_rerun_trains_nothing_and_report_only_rebuilds_the_same_report(smoke):
    work, _ = smoke
    report = work / "runs" / "criteo-smoke" / "report.md"
    before = report.read_text()
    proc = run_cli(["experiment", str(SMOKE)], work, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "== run" not in proc.stdout, "finished runs must not be trained again"
    report.unlink()
    proc = run_cli(["experiment", str(SMOKE), "--report-only"], work, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert report.read_text() == before


def test_a_plan_whose_runs_would_reread_their_split_is_refused_before_anything_trains(tmp_path, monkeypatch):
    plan = yaml.safe_load(SMOKE.read_text())
    plan["max_passes"] = 1.0
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))

    def dataset_for(config):
        from pipelines.run import preprocess

        return preprocess(config)

    def train(*args):
        raise AssertionError("nothing may train")

    monkeypatch.chdir(tmp_path)  # the plan's runs/ go here, and the working directory comes back afterwards
    with pytest.raises(ConfigError, match=r"max_passes is 1, but baseline reads its split 3\.\d\d times"):
        run_plan(load_plan(str(path)), train, dataset_for)


@pytest.mark.parametrize("edit, message", [
    (lambda p: p.update(seeds=[0]), "seeds: need at least two distinct seeds"),
    (lambda p: p.update(name="../outside"), "name: must be a plain name"),  # runs/<name> is deleted on --overwrite
    (lambda p: p["conditions"][0].update(name="a/b"), "conditions[0].name: must be a plain name"),
    (lambda p: p["conditions"].append(dict(p["conditions"][0])), "conditions: need distinct names"),
    (lambda p: p["claims"][0].update(of=["nope"]), "claims[0]: names no condition: 'nope'"),
    (lambda p: p["claims"][0].update(at_least=1.0), "claims[0]: a goal is either at_most or at_least"),
    (lambda p: p["derived"][0].update(of=["calibrated"]), "derived[0].of: names no condition defined before it"),
    (lambda p: p["tuning"]["then"].pop("baseline"), "tuning.then: must name what to train after each candidate"),
    (lambda p: p["conditions"][0].update(sets=["train.groups=[5]"]), "train.groups: groups must be in [0, data"),
    (lambda p: p["conditions"][0].update(sets=["train.reads=both"]), "train.reads: must be one of"),
    (lambda p: p.update(lr_rule="cubic"), "lr_rule: must be one of"),
    (lambda p: p.update(bogus=1), "bogus: unknown key"),
])
def test_bad_plans_fail_before_anything_runs(tmp_path, edit, message):
    plan = yaml.safe_load(SMOKE.read_text())
    edit(plan)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_plan(str(path))


@pytest.mark.parametrize("path", sorted((REPO / "manifests" / "experiments").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_plan_is_valid(path):
    plan = load_plan(str(path))
    assert plan.claims or plan.sweep


def test_a_tuning_trains_its_candidates_first_and_only_the_followers_its_winner_calls_for():
    """criteo-datalimited: 9 baselines x 3 seeds first; of the 9 codistillation and 9 union conditions a
    `tuned` result may choose from, only the winner's two follow (5 codistillation settings no baseline calls
    for never train: they cost 15 runs once)."""
    from codistill.experiment import _second_phase

    plan = load_plan(str(REPO / "manifests" / "experiments" / "criteo-datalimited.yaml"))
    first = [c.name for c in plan.conditions if c.name not in _second_phase(plan)]
    assert first == list(plan.tuning.candidates)
    assert all(len(then) == 2 for then in plan.tuning.then.values())


def test_the_learning_rate_rule_scales_with_the_batch():
    plan = load_plan(str(SMOKE))
    base = plan.config(plan.condition("baseline"), 0).optimizer.lr
    union = plan.config(plan.condition("union-2x-batch"), 0).optimizer.lr  # twice the batch
    assert union == pytest.approx(base * math.sqrt(2))
