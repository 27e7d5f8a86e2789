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
    records = [json.loads(line) for line in (run_dir / f"group-{group}" / "metrics.jsonl").read_text().splitlines()]
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
                assert (run_dir / f"group-{g}" / "eval_predictions.npz").exists()
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
        with np.load(out / f"{condition}-seed0" / "group-0" / "eval_predictions.npz") as a, \
                np.load(out / f"{condition}-seed1" / "group-0" / "eval_predictions.npz") as b:
            assert np.array_equal(a["key"], b["key"])
            assert row[4] == f"{np.mean(np.abs(a['prob'] - b['prob'])):.4f}", row
    assert (out / "excess_vs_step.png").stat().st_size > 10_000
    assert "## Claims" in report and re.search(r"\| churn \| .* \| (yes|NO) \|", report)


def test_the_ensemble_averages_the_baselines_probabilities(smoke):
    work, _ = smoke
    out = work / "runs" / "criteo-smoke"
    with np.load(out / "baseline-seed0" / "group-0" / "eval_predictions.npz") as g0, \
            np.load(out / "baseline-seed0" / "group-1" / "eval_predictions.npz") as g1, \
            np.load(out / "ensemble-baseline-seed0" / "group-0" / "eval_predictions.npz") as ens:
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
