"""`codistill experiment PLAN`: every (condition, seed) of a plan as an ordinary training run, then a report.

A finished run is never redone, so a killed experiment resumes. A plan with a
batch sweep (claim 1) or a tuning trains in two phases: the first phase's
conditions, then (`codistill.claims` fixes it in targets.json) what B* or the
tuning winner calls for. The report (`codistill.claims`) is computed from the
runs' saved eval predictions only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from codistill.claims import fix_sweep_targets, fix_tuning
from codistill.config import ConfigError, ExperimentConfig
from codistill.plans import Condition, Plan, passes
from codistill.units import duration

Train = Callable[[str, list[str], bool, bool], object]  # (manifest, sets, resume, overwrite): one run


def run_plan(plan: Plan, train: Train, dataset_for: Callable[[ExperimentConfig], object], echo=print) -> None:
    """Train every (condition, seed) the plan calls for that is not complete yet. A run left unfinished by a
    kill continues from its checkpoints. `dataset_for(config)` gives the runs' dataset (building it if need
    be): with `max_passes`, a plan whose runs would read their split more often is refused before any runs."""
    check_passes(plan, dataset_for)
    start = time.monotonic()
    _train_all(plan, _todo(plan, [c for c in plan.conditions if c.name not in _second_phase(plan)]), train, echo,
               start)
    then = []
    if plan.sweep is not None:
        then += fix_sweep_targets(plan, echo)["then_train"]
    if plan.tuning is not None:
        then += fix_tuning(plan, echo)["then_train"]
    _train_all(plan, _todo(plan, [plan.condition(n) for n in then]), train, echo, start)
    echo(f"== all runs complete ({duration(time.monotonic() - start)} this time)")


def check_passes(plan: Plan, dataset_for: Callable[[ExperimentConfig], object]) -> None:
    if plan.max_passes is None:
        return
    configs = {c.name: plan.config(c, plan.seeds[0]) for c in plan.conditions}
    dataset = dataset_for(next(iter(configs.values())))
    over = {name: p for name, config in configs.items() if (p := passes(config, dataset)) > plan.max_passes}
    if over:
        raise ConfigError(f"{plan.name}: max_passes is {plan.max_passes:g}, but "
                          + ", ".join(f"{n} reads its split {p:.2f} times" for n, p in over.items())
                          + ": more data (data.synth), fewer steps or smaller batches, or allow it in the plan")


def _second_phase(plan: Plan) -> set[str]:
    """Conditions trained only once the first phase has fixed what they are for (B*; the tuned baseline): the
    tuning's followers, and every condition a `tuned` result chooses from (one no winner calls for never trains)."""
    names = set()
    if plan.sweep is not None:
        names |= {n for p in plan.sweep.points for n in (p.codistill, p.sync_lr2) if n}
    if plan.tuning is not None:
        names |= {n for group in plan.tuning.then.values() for n in group}
        names |= {n for derived in plan.derived if derived.kind == "tuned" for n in derived.of}
    return names


def _todo(plan: Plan, conditions) -> list[tuple[Condition, int]]:
    return [(c, s) for c in conditions for s in plan.seeds]


def _train_all(plan: Plan, todo: list[tuple[Condition, int]], train: Train, echo, start: float) -> None:
    left = [(c, s) for c, s in todo if not plan.run_dir(c.name, s).complete.exists()]
    for i, (condition, seed) in enumerate(left):
        elapsed = time.monotonic() - start
        remaining = elapsed / i * (len(left) - i) if i else math.nan
        echo(f"== run {len(todo) - len(left) + i + 1}/{len(todo)}: {condition.name} seed {seed} "
             f"(elapsed {duration(elapsed)}, ~{duration(remaining) if math.isfinite(remaining) else '?'} left)")
        run_dir = plan.run_dir(condition.name, seed)
        resume = any((group.checkpoints / "latest").exists() for group in run_dir.groups())
        train(plan.base, plan.overrides(condition, seed), resume, not resume)
        run_dir.complete.write_text("")
