"""Experiment plans (`manifests/experiments/*.yaml`): what `codistill experiment PLAN` trains and claims.

A plan names a base manifest, conditions as `--set` overrides, seeds,
conditions derived from finished runs without training (ensembles, a
calibrated model, the baseline best on validation), and the claims with their
goals, all fixed before anything runs. Runs go to
`runs/<plan>/<condition>-seed<s>/`. What a plan's first phase fixes for its
second (B* and T* of a batch sweep, the winner of a tuning) is kept in
`targets.json`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from codistill.config import ConfigError, ExperimentConfig, load_experiment, read_manifest_yaml
from codistill.fields import build, plain_name, require
from codistill.rundir import RunDir
from codistill.stats import Goal

TARGETS = "targets.json"


@dataclass(frozen=True)
class Condition:
    name: str
    sets: tuple[str, ...] = ()
    lr_factor: float = 1.0  # times the learning rate the plan's rule gives (e.g. 2: a control at twice the LR)

    def validate(self, name: str) -> None:
        plain_name(self.name, f"{name}.name")
        require(self.lr_factor > 0, f"{name}.lr_factor", f"must be > 0, got {self.lr_factor}")


@dataclass(frozen=True)
class Derived:
    """A condition computed from finished runs' predictions, training nothing."""

    name: str
    # ensemble: the average of the predicted distributions of `of`'s models (each run's groups, or with
    # members: seeds the group 0 of consecutive pairs of seeds); calibrated: `of`'s models with one
    # temperature each fitted on validation; best_on_validation: the condition of `of` with the lowest mean
    # validation loss at the selected steps (a tuned baseline); tuned: the condition of `of` that the plan's
    # tuning trained after its winner (e.g. codistillation one regularisation step lower).
    kind: Literal["ensemble", "calibrated", "best_on_validation", "tuned"]
    of: tuple[str, ...]
    members: Literal["groups", "seeds"] = "groups"

    def validate(self, name: str) -> None:
        require(len(self.of) >= 1, f"{name}.of", "must name a condition")
        require(self.kind in ("best_on_validation", "tuned") or len(self.of) == 1, f"{name}.of",
                f"a{'n' if self.kind == 'ensemble' else ''} {self.kind} is made of one condition, got {list(self.of)}")


@dataclass(frozen=True)
class Claim:
    """figure(of) / figure(over) (or figure(of) alone) against a goal; `of` and `over` are a condition or
    [a, b], meaning figure(a) - figure(b)."""

    name: str
    of: tuple[str, ...]
    over: tuple[str, ...] = ()
    figure: str = "loss"  # loss | excess | churn | another of the workload's row terms (top1, truth_gap)
    at_most: float | None = None
    at_least: float | None = None
    bound: float | None = None  # how far the interval's far end may go (default: the goal)

    def validate(self, name: str) -> None:
        for key in ("of", "over"):
            require(len(getattr(self, key)) in ((1, 2) if key == "of" else (0, 1, 2)), f"{name}.{key}",
                    "must be a condition or [a, b] (a - b)")
        try:
            _ = self.goal
        except ValueError as e:
            raise ConfigError(f"{name}: {e}") from None

    @property
    def goal(self) -> Goal:
        return Goal(self.at_most, self.at_least, self.bound)


@dataclass(frozen=True)
class SweepPoint:
    sync: str  # one model at this batch
    codistill: str | None = None  # 2 groups each at this batch: trained only at B* and its neighbours
    sync_lr2: str | None = None  # the sync model at twice the rule's learning rate: trained only at B* and 2B*


@dataclass(frozen=True)
class Sweep:
    """Claim 1: past the batch where doubling it stops paying (B*), codistillation reaches the loss a sync
    model reaches in N steps (T*) in far fewer steps. Every number here is fixed before anything runs."""

    points: tuple[SweepPoint, ...]  # examples per step doubling from one point to the next
    stop_ratio: float = 0.85  # 2B stops paying once it needs >= this share of B's steps to the sweep target
    target: float | None = None  # T* (validation loss) if pre-registered; None: sync@B*'s final validation loss
    ensemble_by: float = 0.6  # precondition: the ensemble of two sync@B* runs reaches T* by this share of N
    at_most: float = 0.75  # codistill@B* reaches T* in at most this share of N steps (mean over seeds) ...
    each_below: float = 0.8  # ... every seed in less than this share ...
    versus_double: float = 0.85  # ... and in at most this share of sync@2B*'s steps

    def validate(self, name: str) -> None:
        require(len(self.points) >= 3, f"{name}.points", f"needs at least 3 batches, got {len(self.points)}")
        for key in ("stop_ratio", "ensemble_by", "at_most", "each_below", "versus_double"):
            value = getattr(self, key)
            require(0 < value <= 1, f"{name}.{key}", f"must be in (0, 1], got {value}")


@dataclass(frozen=True)
class Tuning:
    """Train `candidates` (e.g. baselines over a weight decay x dropout grid), take the one with the lowest mean
    validation loss at its selected steps, then train `then[best]` (e.g. codistillation one regularisation
    step lower, as Sodhani et al. 2021 advise). The choice is fixed in targets.json before `then` trains."""

    candidates: tuple[str, ...]
    then: dict[str, tuple[str, ...]]

    def validate(self, name: str, trained: list[str]) -> None:
        require(len(self.candidates) >= 2, f"{name}.candidates", "needs at least two conditions")
        require(set(self.then) == set(self.candidates), f"{name}.then",
                "must name what to train after each candidate wins")
        for of in [*self.candidates, *(n for names in self.then.values() for n in names)]:
            require(of in trained, name, f"names no trained condition: {of!r}")


@dataclass(frozen=True)
class Plan:
    name: str
    base: str  # manifest name or path
    seeds: tuple[int, ...]
    conditions: tuple[Condition, ...]
    claims: tuple[Claim, ...] = ()
    derived: tuple[Derived, ...] = ()
    sweep: Sweep | None = None
    tuning: Tuning | None = None
    sets: tuple[str, ...] = ()  # overrides for every run
    description: str = ""
    runs_dir: str = "runs"
    # The learning rate at each condition's examples per step: lr x (B / reference_batch)^p, p = 1/2 (sqrt),
    # 1 (linear) or 0 (none), times the condition's lr_factor. reference_batch: null = the base manifest's.
    lr_rule: Literal["none", "sqrt", "linear"] = "none"
    reference_batch: int | None = None
    # Most passes over its split any run may make (e.g. 1: no condition sees an example twice); null: any,
    # and the report says how many.
    max_passes: float | None = None
    replicates: int = 1000  # bootstrap replicates behind every interval

    def validate(self) -> None:
        plain_name(self.name, "name")  # runs/<name> is where its runs go (and --overwrite deletes)
        require(len(self.seeds) >= 2 and len(set(self.seeds)) == len(self.seeds), "seeds",
                f"need at least two distinct seeds (churn compares retrains), got {list(self.seeds)}")
        trained = [c.name for c in self.conditions]
        names = trained + [d.name for d in self.derived]
        require(len(names) == len(set(names)) and bool(trained), "conditions",
                f"need distinct names, got {names}")
        for i, condition in enumerate(self.conditions):
            condition.validate(f"conditions[{i}]")
        for i, derived in enumerate(self.derived):
            derived.validate(f"derived[{i}]")
            for of in derived.of:
                require(of in names[:names.index(derived.name)], f"derived[{i}].of",
                        f"names no condition defined before it: {of!r}")
        for i, claim in enumerate(self.claims):
            claim.validate(f"claims[{i}]")
            for of in claim.of + claim.over:
                require(of in names, f"claims[{i}]", f"names no condition: {of!r}")
        if self.sweep is not None:
            self.sweep.validate("sweep")
            for i, point in enumerate(self.sweep.points):
                for key in ("sync", "codistill", "sync_lr2"):
                    value = getattr(point, key)
                    require(value is None or value in trained, f"sweep.points[{i}].{key}",
                            f"names no trained condition: {value!r}")
        if self.tuning is not None:
            self.tuning.validate("tuning", trained)
        require(self.max_passes is None or self.max_passes > 0, "max_passes", f"must be > 0, got {self.max_passes}")
        require(self.replicates >= 100, "replicates", f"must be >= 100, got {self.replicates}")

    @property
    def out(self) -> Path:
        return Path(self.runs_dir) / self.name

    def run_dir(self, condition: str, seed: int) -> RunDir:
        return RunDir(self.out / f"{condition}-seed{seed}")

    def condition(self, name: str) -> Condition:
        return next(c for c in self.conditions if c.name == name)

    def overrides(self, condition: Condition, seed: int) -> list[str]:
        sets = [*self.sets, *condition.sets]
        if self.lr_rule != "none" or condition.lr_factor != 1:
            sets.append(f"optimizer.lr={self._lr(sets, condition)!r}")
        return [*sets, f"train.seed={seed}", f"train.run_dir={self.run_dir(condition.name, seed).path}"]

    def _lr(self, sets: list[str], condition: Condition) -> float:
        config = load_experiment(self.base, sets)
        reference = self.reference_batch or examples_per_step(load_experiment(self.base, list(self.sets)))
        power = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}[self.lr_rule]
        return config.optimizer.lr * (examples_per_step(config) / reference) ** power * condition.lr_factor

    def config(self, condition: Condition, seed: int) -> ExperimentConfig:
        return load_experiment(self.base, self.overrides(condition, seed))


def load_plan(path: str) -> Plan:
    raw = read_manifest_yaml(path)
    try:
        plan = build(Plan, raw, "")
        plan.validate()
        # Every condition must be a valid manifest before anything runs.
        configs = {c.name: plan.config(c, plan.seeds[0]) for c in plan.conditions}
        if plan.sweep is not None:
            batches = [examples_per_step(configs[p.sync]) for p in plan.sweep.points]
            require(all(b == 2 * a for a, b in zip(batches, batches[1:])), "sweep.points",
                    f"examples per step must double from one point to the next, got {batches}")
            for point, batch in zip(plan.sweep.points, batches):
                if point.codistill:
                    cod = configs[point.codistill]
                    require(examples_per_step(cod) == batch and len(cod.trained_groups) >= 2
                            and cod.codistill.enabled, "sweep.points",
                            f"{point.codistill} must codistill 2+ groups each at the batch of {point.sync}")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return plan


def examples_per_step(config: ExperimentConfig) -> int:
    """Examples one group's optimizer step consumes (rows, or token streams for the stateful LM)."""
    ds = config.deepspeed
    return ds.micro_batch_size * ds.grad_accum * ds.ranks_per_group


def passes(config: ExperimentConfig, dataset) -> float:
    """How many times one group of this run reads its train split (its own, group 0's, or all of them)."""
    from training.workloads import workload_for

    groups = range(dataset.groups) if config.train.reads == "union" else [config.trained_groups[0]]
    rows = sum(s.records for g in groups for s in dataset.shards_of("train", g))
    read = config.schedule.steps * examples_per_step(config) * workload_for(dataset.dataset).records_per_example(
        config, dataset)
    return read / rows if rows else math.inf


def read_targets(plan: Plan, part: str) -> dict | None:
    """What the first phase fixed (`sweep` or `tuning` in targets.json), or None before it has."""
    path = plan.out / TARGETS
    return json.loads(path.read_text()).get(part) if path.exists() else None


def write_targets(plan: Plan, part: str, fixed: dict) -> None:
    path = plan.out / TARGETS
    targets = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps(targets | {part: fixed}, indent=1) + "\n")
