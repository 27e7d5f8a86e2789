"""The report of a plan: results per condition with intervals, each claim's verdict, the batch sweep, plots.

Everything is computed from the runs' saved eval predictions and metrics
(`codistill.analysis`): each model at the step best on the validation half,
every figure on the test half, 95% bootstrap intervals (rows and seeds drawn
with replacement; seed pairs for churn), and a verdict per claim: `holds`,
`fails` or `inconclusive` (`codistill.stats.Goal`).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from codistill.analysis import (Bootstrap, Condition, EvalSplit, Model, Unit, calibrated_model, ensemble_model,
                                group_model, steps_to)
from codistill.dataset import load_manifest
from codistill.rundir import RunDir
from codistill.plans import (TARGETS, Claim, Plan, examples_per_step, passes, read_targets,
                             write_targets)
from codistill.stats import Estimate, Goal
from training.report import metric_records, peer_coverage, read_eval_keys
from training.workloads import workload_for


# --- the conditions, as models ---------------------------------------------------------------------------


@dataclass
class Results:
    plan: Plan
    context: EvalSplit
    conditions: dict[str, Condition]
    bootstrap: Bootstrap

    def figure(self, name: str, figure: str) -> np.ndarray:
        return self.bootstrap.figure(self.conditions[name], figure)


def load_results(plan: Plan, names: list[str] | None = None) -> Results:
    """The plan's finished conditions (or `names` of them) and every derived condition they allow."""
    trained = [c for c in plan.conditions if names is None or c.name in names]
    trained = [c for c in trained if all(plan.run_dir(c.name, s).complete.exists() for s in plan.seeds)]
    if not trained:
        raise FileNotFoundError(f"{plan.out}: no condition has finished every seed yet")
    first = plan.config(trained[0], plan.seeds[0])
    dataset = load_manifest(first.data.output)
    workload = workload_for(dataset.dataset)
    keys = read_eval_keys(plan.run_dir(trained[0].name, plan.seeds[0]).path, first.trained_groups[0])
    truth = workload.truth(dataset, keys) if workload.truth is not None else None
    context = EvalSplit.of(workload, keys, truth)
    conditions = {c.name: _trained(plan, c, dataset, keys) for c in trained}
    tuned = set((read_targets(plan, "tuning") or {}).get("then_train", []))
    for derived in plan.derived:
        if derived.kind == "tuned":  # the condition of `of` that the tuning trained after its winner
            chosen = next((n for n in derived.of if n in tuned and n in conditions), None)
            if chosen is not None:
                conditions[derived.name] = Condition(derived.name, conditions[chosen].units, chosen=chosen)
        elif all(of in conditions for of in derived.of):
            conditions[derived.name] = _derived(derived, conditions, context)
    return Results(plan, context, conditions, Bootstrap(context, plan.replicates))


def _trained(plan: Plan, condition, dataset, keys: np.ndarray) -> Condition:
    units = []
    for seed in plan.seeds:
        config, run_dir = plan.config(condition, seed), plan.run_dir(condition.name, seed)
        for group in config.trained_groups:
            if not np.array_equal(read_eval_keys(run_dir.path, group), keys):
                raise ValueError(f"{run_dir.group(group).path} was evaluated on another eval split than the plan's "
                                 "other runs: rebuild it (the data changed under it?)")
        units.append(Unit(seed, [group_model(run_dir.path, g) for g in config.trained_groups],
                          run_facts(config, run_dir, dataset)))
    return Condition(condition.name, units)


def _derived(derived, conditions: dict[str, Condition], context: EvalSplit) -> Condition:
    if derived.kind == "best_on_validation":
        best = min(derived.of, key=lambda name: _mean_selected_validation(conditions[name], context))
        return Condition(derived.name, conditions[best].units, chosen=best)

    source = conditions[derived.of[0]]
    if derived.kind == "calibrated":
        return Condition(derived.name, [Unit(u.seed, [calibrated_model(m, context) for m in u.models])
                                        for u in source.units])
    if derived.members == "groups":
        units = [Unit(u.seed, [ensemble_model(f"ensemble of {derived.of[0]} seed {u.seed}", u.models,
                                              context.workload)]) for u in source.units]
    else:  # pairs of seeds: each an ensemble of two independently trained models
        pairs = list(zip(source.units[::2], source.units[1::2]))
        units = [Unit(a.seed, [ensemble_model(f"ensemble of {derived.of[0]} seeds {a.seed}+{b.seed}",
                                              [a.models[0], b.models[0]], context.workload)]) for a, b in pairs]
    return Condition(derived.name, units)


def run_facts(config, run_dir: RunDir, dataset) -> dict:
    """Measured, not configured: peer staleness after burn-in (mean, max), the share of those steps with every
    peer (coverage: the lowest of the groups', `training.report.peer_coverage`, what each group's summary
    records and its run is refused by), passes over the split read, step time, examples."""
    groups = config.trained_groups
    ages, ms, coverages = [], [], []
    peers = len(groups) - 1 if config.codistill.enabled else 0
    for group in groups:
        records = metric_records(run_dir.group(group).metrics)
        for record in records:
            if record["kind"] != "train":
                continue
            ms.append(record["ms"])
            if peers and record["weight"] > 0:
                ages += list(record["peers"].values())
        coverage = peer_coverage(records, peers)
        if coverage is not None:
            coverages.append(coverage)
    examples = config.schedule.steps * examples_per_step(config)
    return {"staleness_mean": float(np.mean(ages)) if ages else math.nan,
            "staleness_max": int(max(ages)) if ages else None,
            "coverage": min(coverages) if coverages else None,
            "passes": passes(config, dataset),
            "examples": examples * len(groups), "ms_per_step": float(np.median(ms)) if ms else math.nan,
            "ranks": config.deepspeed.ranks_per_group}


# --- claims ------------------------------------------------------------------------------------------------


@dataclass
class ClaimRow:
    claim: str
    setup: str
    goal: str
    estimate: Estimate | None
    verdict: str  # holds | fails | inconclusive | untestable | n/a (a condition has not run)
    note: str = ""


def claim_rows(results: Results) -> list[ClaimRow]:
    rows = []
    for claim in results.plan.claims:
        names = list(dict.fromkeys(claim.of + claim.over))
        missing = [n for n in names if n not in results.conditions]
        setup = "; ".join(describe_setup(results, n) for n in names if n not in missing)
        if missing:
            rows.append(ClaimRow(claim.name, setup, claim.goal.describe(), None, "n/a",
                                 f"not run yet: {', '.join(missing)}"))
            continue
        estimate = Estimate.of(_statistic(results, claim))
        rows.append(ClaimRow(claim.name, setup, claim.goal.describe(), estimate, claim.goal.verdict(estimate)))
    return rows


def _statistic(results: Results, claim: Claim) -> np.ndarray:
    def side(names: tuple[str, ...]) -> np.ndarray:
        values = [results.figure(n, claim.figure) for n in names]
        return values[0] if len(values) == 1 else values[0] - values[1]

    numerator = side(claim.of)
    if not claim.over:
        return numerator
    with np.errstate(divide="ignore", invalid="ignore"):
        return numerator / side(claim.over)


def describe_setup(results: Results, name: str) -> str:
    """A condition as the report's claim rows show it: measured staleness and coverage for codistillation."""
    condition = results.conditions[name]
    facts = [u.facts for u in condition.units if u.facts]
    text = name + (f" (= {condition.chosen})" if condition.chosen else "")
    stale = [f for f in facts if f.get("staleness_max") is not None]
    covered = [f["coverage"] for f in facts if f.get("coverage") is not None]
    if covered:  # shown even when no step had a peer (then there is no staleness to show)
        staleness = (f"staleness {np.mean([f['staleness_mean'] for f in stale]):.1f} mean, "
                     f"{max(f['staleness_max'] for f in stale)} max; " if stale else "")
        text += f" [{staleness}peers on {100 * min(covered):.0f}% of steps]"
    return text


# --- what the first phase fixes ---------------------------------------------------------------------------


def fix_tuning(plan: Plan, echo=print) -> dict:
    """The tuning candidate best on validation, fixed once before what follows it trains (targets.json)."""
    fixed = read_targets(plan, "tuning")
    if fixed is None:
        results = load_results(plan, list(plan.tuning.candidates))
        losses = {n: _mean_selected_validation(results.conditions[n], results.context) for n in plan.tuning.candidates}
        best = min(losses, key=losses.get)
        fixed = {"written": time.strftime("%Y-%m-%d %H:%M:%S"), "validation_loss": losses, "best": best,
                 "then_train": list(plan.tuning.then[best])}
        write_targets(plan, "tuning", fixed)
    echo(f"== tuning ({fixed['written']}): best on validation {fixed['best']}; then {', '.join(fixed['then_train'])}")
    return fixed


def _mean_selected_validation(condition: Condition, context: EvalSplit) -> float:
    return float(np.mean([m.curve(context, "validation")[m.selected(context)]
                          for u in condition.units for m in u.models]))


# --- claim 1: the batch sweep ------------------------------------------------------------------------------


def _validation_curve(models: list[Model], context: EvalSplit) -> tuple[np.ndarray, np.ndarray]:
    curves = [m.curve(context, "validation") for m in models]
    return models[0].steps, np.mean(curves, axis=0)


def _unit_curve(unit: Unit, context: EvalSplit) -> tuple[np.ndarray, np.ndarray]:
    return _validation_curve(unit.models, context)


def fix_sweep_targets(plan: Plan, echo=print) -> dict:
    """Fix B* and T* from the sync conditions alone, once, before any codistillation run (targets.json)."""
    fixed = read_targets(plan, "sweep")
    if fixed is not None:
        echo(f"== sweep targets fixed earlier ({fixed['written']}): B* = {fixed['b_star']}, T* = {fixed['t_star']:.4f}")
        return fixed
    sweep = plan.sweep
    results = load_results(plan, [p.sync for p in sweep.points])
    context = results.context
    means = [_validation_curve([u.models[0] for u in results.conditions[p.sync].units], context)
             for p in sweep.points]
    sweep_target, steps, stop = find_b_star(means, sweep.stop_ratio)
    batches = [examples_per_step(plan.config(plan.condition(p.sync), plan.seeds[0])) for p in sweep.points]
    targets = {"written": time.strftime("%Y-%m-%d %H:%M:%S"), "sweep_target": sweep_target,
               "steps_to_sweep_target": steps, "b_star_index": stop, "b_star": None, "t_star": math.nan,
               "t_star_rule": None, "then_train": []}
    if stop is not None:
        t_star = sweep.target if sweep.target is not None else float(means[stop][1][-1])
        around = [sweep.points[i] for i in (stop - 1, stop, stop + 1) if 0 <= i < len(sweep.points)]
        then = [p.codistill for p in around if p.codistill] + [p.sync_lr2 for p in sweep.points[stop:stop + 2]
                                                                if p.sync_lr2]
        targets |= {"b_star": batches[stop], "t_star": t_star, "then_train": then,
                    "t_star_rule": "pre-registered in the plan" if sweep.target is not None
                    else f"final validation loss of {sweep.points[stop].sync} (mean over seeds)"}
    write_targets(plan, "sweep", targets)
    echo(f"== sweep: steps to {sweep_target:.4f} per batch {dict(zip(batches, np.round(steps, 1).tolist()))}; "
         + (f"B* = {targets['b_star']}, T* = {targets['t_star']:.4f} ({targets['t_star_rule']}); next: "
            f"{', '.join(targets['then_train']) or 'nothing'}" if stop is not None
            else "2B pays at every batch: B* is past the sweep (extend it)"))
    return targets


def find_b_star(curves: list[tuple[np.ndarray, np.ndarray]], stop_ratio: float
                ) -> tuple[float, list[float], int | None]:
    """From the sync sweep's (steps, mean validation curve) per batch, smallest first: the sweep target (the
    smallest batch's final loss, which every larger batch can reach), each batch's steps to it, and the index
    of B*, the first batch whose doubling needs >= stop_ratio of its steps (None: 2B pays everywhere)."""
    sweep_target = float(curves[0][1][-1])
    steps = [steps_to(s, c, sweep_target) for s, c in curves]
    stop = next((i for i in range(len(steps) - 1) if math.isfinite(steps[i]) and math.isfinite(steps[i + 1])
                 and steps[i + 1] / steps[i] >= stop_ratio), None)
    return sweep_target, steps, stop


def _steps_text(values: list[float], first_eval: float) -> str:
    reached = [v for v in values if math.isfinite(v)]
    if not reached:
        return f"never (0/{len(values)})"
    text = f"{np.mean(reached):.0f}" if all(v > first_eval for v in reached) else \
        f"<= {first_eval:.0f} (before the first eval)"
    return f"{text} ({len(reached)}/{len(values)})"


def sweep_section(results: Results) -> tuple[list[str], ClaimRow | None]:
    plan, sweep, context = results.plan, results.plan.sweep, results.context
    targets = read_targets(plan, "sweep")
    if targets is None:
        return ["", "## Batch sweep (claim 1)", "", "The sync sweep has not finished: no targets yet."], None
    t_star, stop = targets["t_star"], targets["b_star_index"]
    lines = ["", "## Batch sweep (claim 1)", "",
             f"Targets fixed from the sync runs alone on {targets['written']}, before any codistillation run "
             f"(`{TARGETS}`): sweep target {targets['sweep_target']:.4f} (the smallest batch's final validation "
             + (f"loss); B* = {targets['b_star']} (the first batch whose doubling needs >= {sweep.stop_ratio}x its "
                f"steps to the sweep target); T* = {t_star:.4f} ({targets['t_star_rule']})" if stop is not None else
                f"loss); no B*: doubling the batch needed < {sweep.stop_ratio}x the steps at every batch of the "
                "sweep, so no T* and no codistillation run") + ". Curves: validation "
             "loss, mean over a run's groups; steps interpolated between evals; (k/n): seeds that reached it.", "",
             "| batch | sync: steps to sweep target | vs half the batch | sync: steps to T* | sync at 2x LR: steps "
             "to T* | codistillation: steps to T* | examples per run | ms/step x ranks |", "|---" * 8 + "|"]
    previous = None
    for point in sweep.points:
        condition = results.conditions.get(point.sync)
        if condition is None:
            continue
        unit_curves = [_unit_curve(u, context) for u in condition.units]
        first = float(unit_curves[0][0][0])
        to_sweep = [steps_to(s, c, targets["sweep_target"]) for s, c in unit_curves]
        mean_sweep = np.nanmean(to_sweep) if any(map(math.isfinite, to_sweep)) else math.nan
        ratio = f"{mean_sweep / previous:.2f}x" if previous and math.isfinite(mean_sweep) else ""
        previous = mean_sweep
        # No B*, no T*: nothing was to reach it (a blank, not "never").
        cells = [_steps_text(to_sweep, first), ratio, _steps_text([steps_to(s, c, t_star) for s, c in unit_curves],
                                                                   first) if math.isfinite(t_star) else ""]
        for other in (point.sync_lr2, point.codistill):
            c = results.conditions.get(other) if other else None
            cells.append(_steps_text([steps_to(*_unit_curve(u, context), t_star) for u in c.units], first)
                         if c else "")
        facts = condition.units[0].facts
        batch = examples_per_step(plan.config(plan.condition(point.sync), plan.seeds[0]))
        lines.append(f"| {batch} | " + " | ".join(cells)
                     + f" | {facts['examples']:,} | {facts['ms_per_step']:.0f} x {facts['ranks']} |")
    if stop is None:
        return lines, ClaimRow("claim 1: steps to T* at B*", "", "", None, "inconclusive",
                               "2B still pays at every batch of the sweep: extend it to larger batches")
    return lines, _claim1_row(results, targets)


def _claim1_row(results: Results, targets: dict) -> ClaimRow:
    sweep, context = results.plan.sweep, results.context
    stop, t_star = targets["b_star_index"], targets["t_star"]
    point = sweep.points[stop]
    double = sweep.points[stop + 1] if stop + 1 < len(sweep.points) else None
    goal = (f"codistill@B* reaches T* in <= {sweep.at_most}N steps (every seed < {sweep.each_below}N) and in "
            f"<= {sweep.versus_double}x sync@2B*'s steps; precondition: the ensemble of two sync@B* runs reaches "
            f"T* by {sweep.ensemble_by}N")
    needed = [point.sync, point.codistill] + ([double.sync] if double else [])
    if any(n is None or n not in results.conditions for n in needed):
        return ClaimRow("claim 1: steps to T* at B*", "", goal, None, "n/a", "codistillation at B* has not run yet")
    sync_units = results.conditions[point.sync].units
    n_steps = float(sync_units[0].models[0].steps[-1])
    ensemble = ensemble_model("ensemble of two sync@B* runs", [sync_units[0].models[0], sync_units[1].models[0]],
                              context.workload)
    ensemble_steps = steps_to(*_validation_curve([ensemble], context), t_star)
    setup = f"B* = {targets['b_star']}, N = {n_steps:.0f}; {describe_setup(results, point.codistill)}"
    if not (math.isfinite(ensemble_steps) and ensemble_steps <= sweep.ensemble_by * n_steps):
        return ClaimRow("claim 1: steps to T* at B*", setup, goal, None, "untestable at this scale",
                        f"the ensemble of two sync@B* runs reaches T* at "
                        f"{'never' if not math.isfinite(ensemble_steps) else f'{ensemble_steps:.0f}'} steps, not by "
                        f"{sweep.ensemble_by}N = {sweep.ensemble_by * n_steps:.0f}: even an ensemble cannot show "
                        "the speed-up here")
    cod_units = results.conditions[point.codistill].units
    replicates = _steps_replicates(results, cod_units, t_star)  # [replicate, seed]
    share = np.nanmean(replicates, axis=1) / n_steps if np.isfinite(replicates).all() else np.full(len(replicates),
                                                                                                  math.nan)
    estimate = Estimate.of(share)
    each = replicates[0] / n_steps
    verdict = Goal(at_most=sweep.at_most).verdict(estimate)
    note = f"per seed {', '.join(f'{v:.2f}N' for v in each)}; ensemble of two sync@B* runs: {ensemble_steps:.0f}"
    if verdict == "holds" and not (each < sweep.each_below).all():
        verdict, note = "fails", note + f"; a seed needs >= {sweep.each_below}N"
    if double is not None and verdict != "fails":
        double_steps = np.nanmean(_steps_replicates(results, results.conditions[double.sync].units, t_star), axis=1)
        versus = Estimate.of(np.nanmean(replicates, axis=1) / double_steps)
        note += f"; vs sync@2B*: {versus.format(2, 'x')}"
        second = Goal(at_most=sweep.versus_double).verdict(versus)
        verdict = second if second != "holds" else verdict
    return ClaimRow("claim 1: steps to T* at B*", setup, goal, estimate, verdict, note)


def _steps_replicates(results: Results, units: list[Unit], target: float) -> np.ndarray:
    """Steps to `target` per bootstrap replicate of the validation rows (paired across units), per unit."""
    per_unit = []
    for unit in units:
        curves = np.mean([results.bootstrap.curve_replicates(m) for m in unit.models], axis=0)
        per_unit.append([steps_to(unit.models[0].steps, c, target) for c in curves])
    return np.array(per_unit).T


# --- the report --------------------------------------------------------------------------------------------


FIGURES = ("loss", "excess", "churn", "truth_gap", "top1")


def results_table(results: Results) -> tuple[list[str], list[list[str]]]:
    """(header, rows): each condition's figures at its models' validation-selected steps, on the test half."""
    sample = next(iter(results.conditions.values())).units[0].models[0]
    available = set(sample.selected_terms(results.context)) | {"loss", "excess", "churn"}
    figures = [f for f in FIGURES if f in available]
    header = ["condition", "selected step"] + [f"test {f}" for f in figures] + ["staleness mean / max",
                                                                                "peer coverage", "passes"]
    rows = []
    for name, condition in results.conditions.items():
        steps = [m.steps[m.selected(results.context)] for u in condition.units for m in u.models]
        cells = [name + (f" (= {condition.chosen})" if condition.chosen else ""), f"{np.mean(steps):.0f}"]
        for figure in figures:
            try:
                cells.append(Estimate.of(results.figure(name, figure)).format())
            except (ValueError, KeyError):
                cells.append("n/a")
        facts = [u.facts for u in condition.units if u.facts]
        stale = [f for f in facts if f.get("staleness_max") is not None]
        cells.append(f"{np.mean([f['staleness_mean'] for f in stale]):.1f} / "
                     f"{max(f['staleness_max'] for f in stale)}" if stale else "")
        covered = [f["coverage"] for f in facts if f.get("coverage") is not None]
        cells.append(f"{100 * min(covered):.0f}%" if covered else "")
        cells.append(f"{np.mean([f['passes'] for f in facts]):.2f}" if facts else "")
        rows.append(cells)
    return header, rows


def console_table(results: Results) -> list[str]:
    """The results and claims as the terminal shows them (the report's tables, plain)."""
    header, rows = results_table(results)
    keep = [i for i, h in enumerate(header) if h in ("condition", "selected step", "test loss", "test excess",
                                                    "test churn", "staleness mean / max")]
    table = [[header[i] for i in keep]] + [[r[i] for i in keep] for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(keep))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in table]
    lines.append("(95% bootstrap intervals over test rows and seeds; churn over seed pairs)")
    for row in claim_rows(results):
        lines.append(f"claim {row.claim}: {row.estimate.format() if row.estimate else 'n/a'} (goal {row.goal}): "
                     f"{row.verdict}" + (f"; {row.note}" if row.note else ""))
    return lines


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"] + ["| " + " | ".join(r) + " |"
                                                                            for r in rows]


def write_report(plan: Plan, results: Results | None = None) -> Path:
    results = results or load_results(plan)
    header, rows = results_table(results)
    claim_list = claim_rows(results)
    lines = [f"# Experiment `{plan.name}`", "", plan.description.strip(), "",
             f"Base manifest `{plan.base}`; seeds {list(plan.seeds)}; learning-rate rule {plan.lr_rule}. Every "
             f"figure is computed from the runs' saved eval predictions under `{plan.out}`: each model at the eval "
             "step with the lowest loss on the validation half of the eval split, every figure measured on the "
             "test half at that step (the halves: a fixed keyed hash of each row's key). Intervals: 95% "
             f"bootstrap ({plan.replicates} replicates; test rows and seeds drawn with replacement, seed pairs for "
             "churn). Churn compares group 0 of independent retrains, never the coupled groups of one run; "
             "staleness and peer coverage are measured from every post-burn-in step.", "",
             "## Conditions", "", "| condition | overrides |", "|---|---|"]
    for condition in plan.conditions:
        lr = f" (lr x{condition.lr_factor:g})" if condition.lr_factor != 1 else ""
        lines.append(f"| {condition.name} | `{' '.join(condition.sets) or '(base)'}`{lr} |")
    for derived in plan.derived:
        lines.append(f"| {derived.name} | {derived.kind} of {', '.join(derived.of)}"
                     + (f" ({derived.members})" if derived.kind == "ensemble" else "") + " |")
    lines += ["", "## Results (test half, at each model's validation-selected step)", ""] + _markdown(header, rows)
    if plan.sweep is not None:
        sweep_lines, row = sweep_section(results)
        lines += sweep_lines
        if row is not None:
            claim_list.append(row)
    lines += ["", "## Claims", ""] + _markdown(
        ["claim", "set-up (measured)", "goal", "measured [95% interval]", "verdict", "note"],
        [[c.claim, c.setup, c.goal, c.estimate.format() if c.estimate else "", c.verdict.upper()
          if c.verdict in ("fails", "untestable at this scale") else c.verdict, c.note] for c in claim_list])
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plot_curves(results)]
    report = plan.out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def plot_curves(results: Results) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    context, out = results.context, results.plan.out
    fig, (ax_val, ax_test) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for name, condition in results.conditions.items():
        models = [m for u in condition.units for m in u.models]
        if len(models[0].steps) < 2:  # one point (a calibrated model): its test loss as a level
            level = np.mean([m.curve(context, "test")[0] for m in models])
            ax_test.axhline(level, linestyle="--", color="gray", label=f"{name} ({level:.4f})")
            continue
        for ax, half in ((ax_val, "validation"), (ax_test, "test")):
            curves = np.array([m.curve(context, half) for m in models])
            ax.plot(models[0].steps, curves.mean(axis=0), label=name)
            ax.fill_between(models[0].steps, curves.min(axis=0), curves.max(axis=0), alpha=0.15)
    for ax, half in ((ax_val, "validation (selects the step)"), (ax_test, "test (reported)")):
        ax.set_xlabel("step")
        ax.set_title(half)
        ax.grid(alpha=0.3)
    ax_val.set_ylabel("eval loss")
    ax_test.legend(fontsize=7)
    fig.tight_layout()
    names = [_save(fig, out / "loss_vs_step.png")]
    fig, ax = plt.subplots(figsize=(6, 4.5))  # churn against loss along the trajectory
    for name, condition in results.conditions.items():
        models = condition.churn_models
        if len(models) < 2 or len(models[0].steps) < 2:
            continue
        steps = functools.reduce(np.intersect1d, [m.steps for m in models])
        churn, loss = [], []
        for step in steps:
            rows = [m.load(int(np.flatnonzero(m.steps == step)[0])) for m in models]
            test = ~context.validation
            pairs = [context.workload.churn_terms(a, b) for i, a in enumerate(rows) for b in rows[i + 1:]]
            churn.append(np.mean([p[0][test].sum() / p[1][test].sum() for p in pairs]))
            loss.append(np.mean([m.curve(context, "test")[int(np.flatnonzero(m.steps == step)[0])] for m in models]))
        ax.plot(loss, churn, marker="o", markersize=3, label=name)
    ax.set_xlabel("test loss")
    ax.set_ylabel("churn between retrains (primary measure)")
    ax.set_title("churn against loss along training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    names.append(_save(fig, out / "churn_vs_loss.png"))
    return names


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
