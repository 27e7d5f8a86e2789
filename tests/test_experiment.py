"""`codistill experiment`: the smoke plan runs every (condition, seed) as a real `codistill train` run, skips
finished runs on a rerun, and its report's numbers are the ones the runs' metrics files give."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from codistill.config import ConfigError
from codistill.experiment import load_plan
from codistill.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "manifests" / "experiments" / "criteo-smoke.yaml"
CODISTILL = Path(sys.executable).parent / "codistill"


def run_cli(args: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([str(CODISTILL), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    work = tmp_path_factory.mktemp("experiment")
    proc = run_cli(["experiment", str(SMOKE)], work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, proc


def eval_losses(run_dir: Path, group: int) -> list[tuple[int, float, float | None]]:
    records = [json.loads(line) for line in RunDir(run_dir).group(group).metrics.read_text().splitlines()]
    return [(r["step"], r["log_loss"], r.get("bayes_log_loss")) for r in records if r["kind"] == "eval"]


def table_row(report: str, condition: str) -> list[str]:
    """The condition's row in the report's Results table."""
    for line in report.split("## Results", 1)[1].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == condition:
            return cells
    raise AssertionError(f"no row for {condition} in the report")


def test_every_run_is_an_ordinary_finished_training_run(smoke):
    work, proc = smoke
    plan = load_plan(str(SMOKE))
    for condition in plan.conditions:
        for seed in plan.seeds:
            run_dir = work / "runs" / plan.name / f"{condition.name}-seed{seed}"
            groups = plan.config(condition, seed).trained_groups
            assert sorted(p.name for p in run_dir.glob("group-*")) == [f"group-{g}" for g in groups]
            for g in groups:
                assert RunDir(run_dir).group(g).predictions.exists()
                assert eval_losses(run_dir, g)[-1][0] == 60
    assert "== run 1/8: baseline seed 0" in proc.stdout and "left)" in proc.stdout


def test_report_numbers_are_the_metrics_files_numbers(smoke):
    work, _ = smoke
    out = work / "runs" / "criteo-smoke"
    report = (out / "report.md").read_text()
    for condition, groups in (("baseline", (0, 1)), ("codistill", (0, 1)), ("sync-2x-batch", (0,))):
        best, final = [], []
        for seed in (0, 1):
            curves = [eval_losses(out / f"{condition}-seed{seed}", g) for g in groups]
            excess = np.mean([[loss - floor for _, loss, floor in c] for c in curves], axis=0)
            best.append(excess.min())
            final.append(excess[-1])
        row = table_row(report, condition)
        assert row[1] == f"{np.mean(best):.4f} ± {np.std(best, ddof=1):.4f}", row
        assert row[2] == f"{np.mean(final):.4f} ± {np.std(final, ddof=1):.4f}", row
        # Churn between the two seeds' group-0 models, from their saved predictions.
        with np.load(RunDir(out / f"{condition}-seed0").group(0).predictions) as a, \
                np.load(RunDir(out / f"{condition}-seed1").group(0).predictions) as b:
            assert np.array_equal(a["key"], b["key"])
            assert row[4] == f"{np.mean(np.abs(a['prob'] - b['prob'])):.4f}", row
    assert (out / "excess_vs_step.png").stat().st_size > 10_000
    assert "## Claims" in report and re.search(r"\| churn \| .* \| (yes|NO) \|", report)


def test_the_ensemble_averages_the_baselines_probabilities(smoke):
    work, _ = smoke
    out = work / "runs" / "criteo-smoke"
    with np.load(RunDir(out / "baseline-seed0").group(0).predictions) as g0, \
            np.load(RunDir(out / "baseline-seed0").group(1).predictions) as g1, \
            np.load(RunDir(out / "ensemble-baseline-seed0").group(0).predictions) as ens:
        assert np.array_equal(g0["key"], ens["key"]) and np.array_equal(g1["key"], ens["key"])
        np.testing.assert_allclose(ens["prob"], (g0["prob"] + g1["prob"]) / 2, atol=2e-6)
    assert table_row((out / "report.md").read_text(), "ensemble of baseline")


def test_a_rerun_trains_nothing_and_report_only_rebuilds_the_same_report(smoke):
    work, _ = smoke
    report = work / "runs" / "criteo-smoke" / "report.md"
    before = report.read_text()
    proc = run_cli(["experiment", str(SMOKE)], work, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "== run" not in proc.stdout.replace("== all", ""), "finished runs must not be trained again"
    report.unlink()
    proc = run_cli(["experiment", str(SMOKE), "--report-only"], work, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert report.read_text() == before


@pytest.mark.parametrize("edit, message", [
    (lambda p: p.update(seeds=[0]), "seeds: need at least two distinct seeds"),
    (lambda p: p["conditions"].append(dict(p["conditions"][0])), "conditions: need distinct names"),
    (lambda p: p["claims"].update(codistill="nope"), "claims.codistill: names no condition"),
    (lambda p: p["conditions"][0].update(sets=["train.groups=[5]"]), "train.groups: groups must be in [0, data"),
    (lambda p: p["conditions"][0].update(sets=["train.reads=both"]), "train.reads: must be one of"),
    (lambda p: p.update(bogus=1), "bogus: unknown key"),
])
def test_bad_plans_fail_before_anything_runs(tmp_path, edit, message):
    import yaml

    plan = yaml.safe_load(SMOKE.read_text())
    edit(plan)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_plan(str(path))


def test_steps_to_target_interpolates_on_the_eval_curve():
    from codistill.experiment import RunResult

    run = RunResult("c", 0, Path("."), (0,), np.array([10, 20, 30]), np.array([0.5, 0.3, 0.1]), None, None)
    assert run.steps_to(0.4) == pytest.approx(15.0)
    assert run.steps_to(0.6) == 10.0 and run.steps_to(0.05) is None


@pytest.mark.parametrize("path", sorted((REPO / "manifests" / "experiments").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_plan_is_valid(path):
    plan = load_plan(str(path))
    assert plan.claims.baseline and plan.claims.codistill and plan.claims.ensemble == plan.conditions[0].name


def test_a_batch_sweep_whose_batches_do_not_double_fails_before_anything_runs(tmp_path):
    import yaml

    plan = yaml.safe_load((REPO / "manifests" / "experiments" / "commoncrawl-claims.yaml").read_text())
    plan["conditions"][2]["sets"][-1] = "deepspeed.micro_batch_size=12"  # sync-b8 -> 12
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    with pytest.raises(ConfigError, match=re.escape("claims.batch_sweep: examples per step must double from one "
                                                    "condition to the next, got [4, 12, 16, 32, 64]")):
        load_plan(str(path))


def test_the_batch_sweep_finds_where_2b_stops_paying_and_times_codistillation_there():
    from codistill.experiment import ConditionSummary, RunResult, batch_sweep, claim_rows, sweep_lines

    def condition(name, batch, curve):
        runs = [RunResult(name, seed, Path("."), (0,), np.array([100, 200, 300, 400]),
                          np.array(curve) + 0.001 * seed, None, None, batch) for seed in (0, 1)]
        return ConditionSummary(name, runs, {"disagreement": 0.1})

    plan = load_plan(str(REPO / "manifests" / "experiments" / "commoncrawl-claims.yaml"))
    # Steps to excess 0.401 (the worst best excess, b4 seed 1's): b4 ~400, b8 ~300, b16 ~175, b32 ~171: 2B stops
    # paying at B = 16, where codistillation gets there at its first eval (100 steps, 0.57x).
    s = {"baseline": condition("baseline", 16, [0.8, 0.6, 0.5, 0.45]),
         "sync-b4": condition("sync-b4", 4, [0.9, 0.7, 0.5, 0.4]),
         "sync-b8": condition("sync-b8", 8, [0.9, 0.5, 0.4, 0.3]),
         "sync-b16": condition("sync-b16", 16, [0.7, 0.3, 0.3, 0.3]),
         "sync-b32": condition("sync-b32", 32, [0.65, 0.3, 0.3, 0.3]),
         "sync-b64": condition("sync-b64", 64, [0.5, 0.3, 0.3, 0.3])}
    for name, batch in (("codistill-b4", 4), ("codistill-b8", 8), ("codistill", 16), ("codistill-b32", 32),
                        ("codistill-b64", 64)):
        s[name] = condition(name, batch, [0.35, 0.2, 0.2, 0.2])
    sweep = batch_sweep(plan, s)
    assert sweep.target == pytest.approx(0.401)
    assert sweep.steps[0] == pytest.approx(399.5) and sweep.stop == 2
    row = next(r for r in claim_rows(plan, s) if r[0] == "batch sweep")
    assert row[2] == f"B = 16: 2B {sweep.steps[3] / sweep.steps[2]:.2f}x, codistillation " \
                     f"{sweep.codistill_steps[2] / sweep.steps[2]:.2f}x" and row[3] is True
    assert any(line.startswith("| sync-b16 | 16 | 175 (2/2 reached) | 0.58x | codistill: 100 (2/2 reached) | 0.57x")
               for line in sweep_lines(plan, s))


def test_the_claims_compare_the_workloads_primary_churn_measure_whatever_its_name():
    from codistill.experiment import ConditionSummary, RunResult, claim_rows

    def condition(name, excess, churn):
        runs = [RunResult(name, seed, Path("."), (0,), np.array([10, 20]), np.array(excess), 0.0, None, 64)
                for seed in (0, 1)]
        return ConditionSummary(name, runs, churn | {"pairs": 1})

    plan = load_plan(str(REPO / "manifests" / "experiments" / "imagenet-claims.yaml"))
    s = {"baseline": condition("baseline", [1.0, 0.8], {"top1_disagreement": 0.4}),
         "sync-2x-batch": condition("sync-2x-batch", [0.9, 0.7], {"top1_disagreement": 0.35}),
         "codistill": condition("codistill", [0.7, 0.4], {"top1_disagreement": 0.2}),
         "same-data": condition("same-data", [0.9, 0.6], {"top1_disagreement": 0.3}),
         "ensemble of baseline": condition("ensemble of baseline", [0.6], {"top1_disagreement": 0.25})}
    churn = next(r for r in claim_rows(plan, s) if r[0] == "churn")
    assert churn[2] == "top1_disagreement 0.2000 vs baseline 0.4000: 0.50x; ensemble 0.2500" and churn[3] is True
