"""`codistill experiment PLAN`: every (condition, seed) of a plan as an ordinary training run, then a report.

A plan (`manifests/experiments/*.yaml`) names a base manifest, conditions as
`--set` overrides and seeds. Runs go to `runs/<plan>/<condition>-seed<s>/`; a
run that finished is never redone, so a killed experiment resumes. The report
(`report.md` and PNGs) is computed from the runs' metrics and prediction files
only, and knows nothing of the workload beyond its `Workload` interface.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from codistill.config import ConfigError, ExperimentConfig, load_experiment, read_manifest_yaml
from codistill.fields import build, require
from codistill.rundir import RunDir
from codistill.units import duration


@dataclass(frozen=True)
class Condition:
    name: str
    sets: tuple[str, ...] = ()

    def validate(self, name: str) -> None:
        require(bool(self.name) and "/" not in self.name and self.name not in (".", ".."), f"{name}.name",
                f"must be a plain name, got {self.name!r}")


@dataclass(frozen=True)
class Claims:
    """Which conditions play which part in the paper's claims, and the goals (ratios)."""

    baseline: str
    codistill: str
    same_data: str | None = None
    ensemble: str | None = None  # the condition whose independently trained groups are averaged
    staleness: tuple[str, ...] = ()  # conditions that differ only in codistill.exchange_every, for the curve
    staleness_reference: str | None = None  # K = 1
    staleness_check: str | None = None  # K = 500
    # Batch sweep: single-model conditions whose examples per step double from one to the next, and
    # (optional, same length) codistillation conditions whose groups each take that sweep entry's batch.
    batch_sweep: tuple[str, ...] = ()
    sweep_codistill: tuple[str, ...] = ()
    churn_max_ratio: float = 0.75
    final_max_ratio: float = 0.6
    best_max_ratio: float = 0.9
    staleness_max_increase: float = 0.05
    disjoint_min_ratio: float = 2.0
    sweep_stop_ratio: float = 0.85  # 2B "stops paying" once it needs >= this share of B's steps
    sweep_codistill_max_ratio: float = 0.6  # the paper: ~0.5x the steps of B

    def validate(self, name: str) -> None:
        require(not self.batch_sweep or len(self.batch_sweep) >= 2, f"{name}.batch_sweep",
                f"needs at least two conditions, got {list(self.batch_sweep)}")
        require(not self.sweep_codistill or len(self.sweep_codistill) == len(self.batch_sweep),
                f"{name}.sweep_codistill", "needs one condition per batch_sweep entry")


@dataclass(frozen=True)
class Plan:
    name: str
    base: str  # manifest name or path
    seeds: tuple[int, ...]
    conditions: tuple[Condition, ...]
    claims: Claims
    sets: tuple[str, ...] = ()  # overrides for every run
    description: str = ""
    runs_dir: str = "runs"

    def validate(self, name: str = "plan") -> None:
        require(len(self.seeds) >= 2 and len(set(self.seeds)) == len(self.seeds), "seeds",
                f"need at least two distinct seeds (churn compares retrains), got {list(self.seeds)}")
        names = [c.name for c in self.conditions]
        require(len(names) == len(set(names)) and names, "conditions", f"need distinct names, got {names}")
        for i, condition in enumerate(self.conditions):
            condition.validate(f"conditions[{i}]")
        claims = self.claims
        for key in ("baseline", "codistill", "same_data", "ensemble", "staleness_reference", "staleness_check"):
            value = getattr(claims, key)
            require(value is None or value in names, f"claims.{key}", f"names no condition: {value!r}")
        claims.validate("claims")
        for key in ("staleness", "batch_sweep", "sweep_codistill"):
            for value in getattr(claims, key):
                require(value in names, f"claims.{key}", f"names no condition: {value!r}")

    @property
    def out(self) -> Path:
        return Path(self.runs_dir) / self.name

    def run_dir(self, condition: str, seed: int) -> Path:
        return self.out / f"{condition}-seed{seed}"

    def overrides(self, condition: Condition, seed: int) -> list[str]:
        return [*self.sets, *condition.sets, f"train.seed={seed}",
                f"train.run_dir={self.run_dir(condition.name, seed)}"]

    def config(self, condition: Condition, seed: int) -> ExperimentConfig:
        return load_experiment(self.base, self.overrides(condition, seed))


def load_plan(path: str) -> Plan:
    raw = read_manifest_yaml(path)
    try:
        plan = build(Plan, raw, "")
        plan.validate()
        # Every condition must be a valid manifest before anything runs.
        configs = {c.name: plan.config(c, plan.seeds[0]) for c in plan.conditions}
        batches = [examples_per_step(configs[n]) for n in plan.claims.batch_sweep]
        require(all(b == 2 * a for a, b in zip(batches, batches[1:])), "claims.batch_sweep",
                f"examples per step must double from one condition to the next, got {batches}")
        for sweep, cod in zip(plan.claims.batch_sweep, plan.claims.sweep_codistill):
            require(examples_per_step(configs[cod]) == examples_per_step(configs[sweep])
                    and len(configs[cod].trained_groups) >= 2 and configs[cod].codistill.enabled,
                    "claims.sweep_codistill", f"{cod} must codistill 2+ groups each at the batch of {sweep}")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return plan


def examples_per_step(config: ExperimentConfig) -> int:
    """Examples one group's optimizer step consumes (rows, or token streams for the stateful LM)."""
    ds = config.deepspeed
    return ds.micro_batch_size * ds.grad_accum * ds.ranks_per_group


# --- running ---------------------------------------------------------------------------------------------


def run_plan(plan: Plan, train: Callable[[str, list[str], bool, bool], object], echo=print) -> None:
    """Train every (condition, seed) not complete yet; `train(manifest, sets, resume, overwrite)` runs one.

    A run left unfinished by a kill continues from its checkpoints."""
    todo = [(c, s) for c in plan.conditions for s in plan.seeds]
    complete = sum(RunDir(plan.run_dir(c.name, s)).complete.exists() for c, s in todo)
    start, trained = time.monotonic(), 0
    ceiling_shown = False
    for condition, seed in todo:
        ceiling_shown = ceiling_shown or _echo_ensemble_ceiling(plan, echo)
        run = RunDir(plan.run_dir(condition.name, seed))
        if run.complete.exists():
            continue
        elapsed = time.monotonic() - start
        left = elapsed / trained * (len(todo) - complete) if trained else float("nan")
        echo(f"== run {complete + 1}/{len(todo)}: {condition.name} seed {seed} "
             f"(elapsed {_duration(elapsed)}, ~{_duration(left)} left)")
        resume = any((group.checkpoints / "latest").exists() for group in run.groups())
        train(plan.base, plan.overrides(condition, seed), resume, not resume)
        run.complete.write_text("")
        complete, trained = complete + 1, trained + 1
    if not ceiling_shown:
        _echo_ensemble_ceiling(plan, echo)
    echo(f"== all {len(todo)} runs complete ({_duration(time.monotonic() - start)} this time)")


def _echo_ensemble_ceiling(plan: Plan, echo) -> bool:
    """Evaluate and print the ensemble ceiling once its condition's runs are all complete (plans list
    that condition first, so the ceiling is known before the rest trains)."""
    name = plan.claims.ensemble
    if not name or not all(RunDir(plan.run_dir(name, s)).complete.exists() for s in plan.seeds):
        return False
    condition = next(c for c in plan.conditions if c.name == name)
    ensemble = ConditionSummary("", [ensemble_result(plan, condition, s) for s in plan.seeds])
    single = ConditionSummary("", [read_run(plan, condition, s) for s in plan.seeds])
    echo(f"== ensemble ceiling: the ensemble of {name}'s groups ends at excess {_fmt(*ensemble.stat('final'))}; "
         f"one {name} model: {_fmt(*single.stat('final'))}")
    return True


def _duration(seconds: float) -> str:
    return duration(seconds) if math.isfinite(seconds) else "?"


# --- reading the runs --------------------------------------------------------------------------------------


@dataclass
class RunResult:
    condition: str
    seed: int
    run_dir: Path
    groups: tuple[int, ...]
    steps: np.ndarray  # eval steps
    excess: np.ndarray  # eval loss - floor, mean over the run's trained groups, at each eval step
    floor: float | None
    exchange_every: int | None
    batch: int = 0  # examples per step of each group

    @property
    def best(self) -> float:
        return float(self.excess.min())

    @property
    def final(self) -> float:
        return float(self.excess[-1])

    def steps_to(self, target: float) -> float | None:
        """First step at which the eval curve reaches `target`, interpolated between eval points."""
        below = np.nonzero(self.excess <= target)[0]
        if not len(below):
            return None
        i = int(below[0])
        if i == 0:
            return float(self.steps[0])
        (s0, s1), (e0, e1) = self.steps[i - 1:i + 1], self.excess[i - 1:i + 1]
        return float(s0 + (s1 - s0) * (e0 - target) / (e0 - e1))


def read_run(plan: Plan, condition: Condition, seed: int) -> RunResult:
    from training.report import eval_records

    config = plan.config(condition, seed)
    run_dir = plan.run_dir(condition.name, seed)
    curves, floor = [], None
    for group in config.trained_groups:
        records = eval_records(run_dir, group)
        if not records:
            raise FileNotFoundError(f"{run_dir}: group {group} has no evaluation")
        floor = records[-1].get("floor")
        curves.append(([r["step"] for r in records], [r["loss"] for r in records]))
    steps = curves[0][0]
    if any(c[0] != steps for c in curves):
        raise ValueError(f"{run_dir}: the groups were evaluated at different steps")
    excess = np.mean([c[1] for c in curves], axis=0) - (floor or 0.0)
    return RunResult(condition.name, seed, run_dir, config.trained_groups, np.array(steps), excess, floor,
                     config.codistill.exchange_every if config.codistill.enabled else None,
                     examples_per_step(config))


def ensemble_result(plan: Plan, condition: Condition, seed: int) -> RunResult:
    """The ensemble of the condition's groups for one seed (evaluated once, then read back)."""
    from training.ensemble import evaluate_ensemble
    from training.report import eval_records

    source = read_run(plan, condition, seed)
    out = plan.out / f"ensemble-{condition.name}-seed{seed}"
    if not RunDir(out).group(0).predictions.exists():
        members = [RunDir(source.run_dir).group(g).path for g in source.groups]
        evaluate_ensemble(plan.config(condition, seed), members, out, int(source.steps[-1]))
    record = eval_records(out, 0)[-1]
    excess = np.array([record["loss"] - (record.get("floor") or 0.0)])
    return RunResult(f"ensemble of {condition.name}", seed, out, (0,), np.array([record["step"]]), excess,
                     record.get("floor"), None)


@dataclass
class ConditionSummary:
    name: str
    runs: list[RunResult]
    churn: dict[str, float] = field(default_factory=dict)  # mean over seed pairs

    def stat(self, attr: str) -> tuple[float, float]:
        values = [getattr(r, attr) for r in self.runs]
        return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

    def steps_to(self, target: float) -> tuple[float | None, int]:
        """Mean steps to `target` over the runs that reach it, and how many do."""
        got = [x for x in (r.steps_to(target) for r in self.runs) if x is not None]
        return (float(np.mean(got)) if got else None), len(got)


def churn_over_pairs(runs: list[RunResult]) -> dict[str, float]:
    """Churn between independent retrains: group 0 of every pair of seeds (never two coupled groups of one run)."""
    from training.report import run_churn

    pairs = [run_churn(a.run_dir, b.run_dir, group=a.groups[0])[1] for a, b in itertools.combinations(runs, 2)]
    measures = [k for k, v in pairs[0].items() if isinstance(v, float)]  # int entries are counts
    return {k: float(np.mean([p[k] for p in pairs])) for k in measures} | {"pairs": len(pairs)}


def summarize(plan: Plan) -> dict[str, ConditionSummary]:
    summaries = {}
    for condition in plan.conditions:
        runs = [read_run(plan, condition, s) for s in plan.seeds]
        summaries[condition.name] = ConditionSummary(condition.name, runs, churn_over_pairs(runs))
    if plan.claims.ensemble:
        condition = next(c for c in plan.conditions if c.name == plan.claims.ensemble)
        runs = [ensemble_result(plan, condition, s) for s in plan.seeds]
        name = f"ensemble of {condition.name}"
        summaries[name] = ConditionSummary(name, runs, churn_over_pairs(runs))
    return summaries


# --- the report ------------------------------------------------------------------------------------------


def _churn_measures(churn: dict[str, float]) -> list[str]:
    """The workload's churn measures, its primary one first (as `Workload.churn` orders them)."""
    return [k for k in churn if k != "pairs"]


def _fmt(mean: float, sd: float | None = None, digits: int = 4) -> str:
    if mean is None or not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def claim_rows(plan: Plan, s: dict[str, ConditionSummary]) -> list[tuple[str, str, str, bool | None]]:
    """(claim, goal, measured, holds) for every claim the plan names conditions for."""
    c, rows = plan.claims, []
    base, cod = s[c.baseline], s[c.codistill]
    key = _churn_measures(base.churn)[0]
    ratio = cod.churn[key] / base.churn[key]
    ensemble = s.get(f"ensemble of {c.ensemble}") if c.ensemble else None
    measured = f"{key} {cod.churn[key]:.4f} vs baseline {base.churn[key]:.4f}: {ratio:.2f}x"
    holds = ratio <= c.churn_max_ratio
    goal = f"codistilled retrains <= {c.churn_max_ratio}x the baseline's"
    if ensemble is not None:
        measured += f"; ensemble {ensemble.churn[key]:.4f}"
        holds = holds and cod.churn[key] <= ensemble.churn[key]
        goal += ", and <= the ensemble's"
    rows.append(("churn", goal, measured, holds))
    final_ratio, best_ratio = cod.stat("final")[0] / base.stat("final")[0], cod.stat("best")[0] / base.stat("best")[0]
    rows.append(("quality", f"final excess <= {c.final_max_ratio}x baseline's; best excess <= {c.best_max_ratio}x",
                 f"final {final_ratio:.2f}x, best {best_ratio:.2f}x",
                 final_ratio <= c.final_max_ratio and best_ratio <= c.best_max_ratio))
    if c.staleness_reference and c.staleness_check:
        ref, check = s[c.staleness_reference].stat("best")[0], s[c.staleness_check].stat("best")[0]
        increase = check / ref - 1
        rows.append(("staleness", f"{c.staleness_check} best excess within +{100 * c.staleness_max_increase:.0f}% "
                     f"of {c.staleness_reference}", f"{100 * increase:+.1f}%", increase <= c.staleness_max_increase))
    if c.same_data:
        same = s[c.same_data]
        disjoint_gain = base.stat("final")[0] - cod.stat("final")[0]
        same_gain = base.stat("final")[0] - same.stat("final")[0]
        # A same-data run that gains nothing leaves the ratio undefined: the claim then holds if disjoint gains.
        ratio = f"{disjoint_gain / same_gain:.2f}x" if same_gain > 0 else "same data gains nothing"
        holds = disjoint_gain > 0 and (same_gain <= 0 or disjoint_gain >= c.disjoint_min_ratio * same_gain)
        rows.append(("disjoint vs same data", f"disjoint's reduction of final excess >= {c.disjoint_min_ratio}x "
                     "same-data's", f"{disjoint_gain:.4f} vs {same_gain:.4f} ({ratio})", holds))
    if c.batch_sweep and c.sweep_codistill:
        sweep = batch_sweep(plan, s)
        goal = (f"where sync 2B needs >= {c.sweep_stop_ratio}x the steps of B, codistillation at B "
                f"needs <= {c.sweep_codistill_max_ratio}x (paper: ~0.5x)")
        if sweep.stop is None:
            rows.append(("batch sweep", goal, "2B still pays at every batch of the sweep: extend it", None))
        else:
            steps, cod = sweep.steps[sweep.stop], sweep.codistill_steps[sweep.stop]
            ratio = cod / steps if cod and steps else None
            batch, doubled = s[c.batch_sweep[sweep.stop]].runs[0].batch, sweep.steps[sweep.stop + 1] / steps
            measured = (f"B = {batch}: 2B {doubled:.2f}x, codistillation "
                        + (f"{ratio:.2f}x" if ratio else "never reached the target"))
            rows.append(("batch sweep", goal, measured, ratio is not None and ratio <= c.sweep_codistill_max_ratio))
    return rows


def _reached(summary: ConditionSummary, target: float) -> str:
    steps, got = summary.steps_to(target)
    return f"{steps:.0f} ({got}/{len(summary.runs)} reached)" if got else f"never (0/{len(summary.runs)})"


@dataclass
class Sweep:
    target: float  # the worst best excess of any run in the sweep: every one of them reaches it
    steps: list[float | None]  # per sweep condition, to the target
    stop: int | None  # index of B, the first batch whose doubling needs >= sweep_stop_ratio of its steps
    codistill_steps: list[float | None]


def batch_sweep(plan: Plan, s: dict[str, ConditionSummary]) -> Sweep:
    c = plan.claims
    target = max(r.best for n in c.batch_sweep for r in s[n].runs)
    steps = [s[n].steps_to(target)[0] for n in c.batch_sweep]
    stop = next((i for i in range(len(steps) - 1) if steps[i] and steps[i + 1]
                 and steps[i + 1] / steps[i] >= c.sweep_stop_ratio), None)
    return Sweep(target, steps, stop, [s[n].steps_to(target)[0] for n in c.sweep_codistill])


def sweep_lines(plan: Plan, s: dict[str, ConditionSummary]) -> list[str]:
    c, sweep = plan.claims, batch_sweep(plan, s)
    lines = ["", "## Batch sweep", "", f"Steps to excess {sweep.target:.4f} (the worst best excess of any run in "
             "the sweep, so each of them reaches it); codistillation runs 2+ groups each at that batch.",
             "", "| condition | examples per step | steps to target | vs half the batch | codistillation | "
             "codistillation vs sync at this batch |", "|---|---|---|---|---|---|"]
    for i, name in enumerate(c.batch_sweep):
        steps = sweep.steps[i]
        previous = sweep.steps[i - 1] if i else None
        ratio = f"{steps / previous:.2f}x" if steps and previous else ""
        cod, cod_ratio = "", ""
        if c.sweep_codistill:
            cod = f"{c.sweep_codistill[i]}: {_reached(s[c.sweep_codistill[i]], sweep.target)}"
            cod_steps = sweep.codistill_steps[i]
            cod_ratio = f"{cod_steps / steps:.2f}x" if cod_steps and steps else ""
        lines.append(f"| {name} | {s[name].runs[0].batch} | {_reached(s[name], sweep.target)} | {ratio} | {cod} | "
                     f"{cod_ratio} |")
    return lines


def write_report(plan: Plan, summaries: dict[str, ConditionSummary] | None = None) -> Path:
    s = summaries or summarize(plan)
    base = s[plan.claims.baseline]
    target = base.stat("best")[0]
    floor = base.runs[0].floor
    churn_keys = _churn_measures(base.churn)
    lines = [f"# Experiment `{plan.name}`", "", plan.description.strip(), "",
             f"Base manifest `{plan.base}`; seeds {list(plan.seeds)}; every figure below is computed from the runs' "
             f"`metrics.jsonl` and `eval_predictions.npz` under `{plan.out}`.",
             "", "Excess = eval loss − the data's floor" + (f" ({floor:.4f})." if floor is not None else
                                                            " (no floor known: the raw eval loss)."),
             "Per run, the eval curve is the mean over its trained groups; churn compares group 0 of independent "
             "retrains (every pair of seeds), never the coupled groups of one run.", "",
             "## Conditions", "", "| condition | overrides |", "|---|---|"]
    for condition in plan.conditions:
        lines.append(f"| {condition.name} | `{' '.join(condition.sets) or '(base)'}` |")
    if plan.claims.ensemble:
        lines.append(f"| ensemble of {plan.claims.ensemble} | average of the predicted probabilities of its "
                     "independently trained groups |")
    lines += ["", f"## Results (mean ± sd over {len(plan.seeds)} seeds)", "",
              f"| condition | best excess | final excess | steps to baseline's best ({target:.4f}) | "
              + " | ".join(f"churn {k}" for k in churn_keys) + " |", "|---" * (4 + len(churn_keys)) + "|"]
    for name, summary in s.items():
        lines.append(f"| {name} | {_fmt(*summary.stat('best'))} | {_fmt(*summary.stat('final'))} | "
                     f"{_reached(summary, target)} | "
                     + " | ".join(_fmt(summary.churn.get(k)) for k in churn_keys) + " |")
    if plan.claims.batch_sweep:
        lines += sweep_lines(plan, s)
    lines += ["", "## Claims", "", "| claim | goal | measured | holds |", "|---|---|---|---|"]
    for claim, goal, measured, holds in claim_rows(plan, s):
        verdict = "n/a" if holds is None else "yes" if holds else "NO"
        lines.append(f"| {claim} | {goal} | {measured} | {verdict} |")
    plots = plot_curves(plan, s)
    lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    report = plan.out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def plot_curves(plan: Plan, s: dict[str, ConditionSummary]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, summary in s.items():
        if len(summary.runs[0].steps) < 2:  # the ensemble is one point: a line at its level
            mean, sd = summary.stat("final")
            ax.axhline(mean, linestyle="--", color="gray", label=f"{name} ({mean:.4f} ± {sd:.4f})")
            continue
        steps = summary.runs[0].steps
        curves = np.array([r.excess for r in summary.runs])
        mean, sd = curves.mean(axis=0), curves.std(axis=0)
        ax.plot(steps, mean, label=name)
        ax.fill_between(steps, mean - sd, mean + sd, alpha=0.2)
    ax.set_yscale("log")
    names.append(_save(fig, ax, plan.out / "excess_vs_step.png", "step", "eval excess loss (loss - floor)",
                       f"{plan.name}: mean ± sd over seeds"))
    if plan.claims.staleness:
        points = sorted((s[n].runs[0].exchange_every, *s[n].stat("best")) for n in plan.claims.staleness)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                    capsize=3, label="codistillation")
        mean, sd = s[plan.claims.baseline].stat("best")
        ax.axhline(mean, linestyle="--", color="gray", label=f"{plan.claims.baseline} ({mean:.4f})")
        ax.set_xscale("log")
        names.append(_save(fig, ax, plan.out / "staleness.png", "exchange_every (steps between peer snapshots)",
                           "best eval excess loss", f"{plan.name}: staleness"))
    return names


def _save(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> str:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
