"""Finished runs as models and conditions, with every figure a report gives as bootstrap replicates.

Each group of a run saved its eval predictions at every eval step. The eval
split is halved by a fixed keyed hash (`training.metrics.validation_half`):
each model's reported step is the one best on the validation half, and every
figure is measured on the test half at that step. A figure is an array
[point, replicate 1, ...] (`codistill.stats`): replicate b draws the test rows
with replacement (the same draw for every figure, so comparisons are paired)
and, per condition, its seeds (or seed pairs, for churn) with replacement.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.metrics import validation_half
from training.report import eval_records, read_eval_rows, read_eval_steps
from training.workloads import Rows, Workload

Terms = dict[str, tuple[np.ndarray, np.ndarray]]


@dataclass(eq=False)
class Model:
    """One trained model's eval predictions at every eval step (a group of a run, or an ensemble of models).

    Rows are read when needed and not kept, except at the selected step: a plan has dozens of models with
    dozens of eval steps each."""

    name: str
    steps: np.ndarray
    load: Callable[[int], Rows]  # eval-step index -> rows, sorted by key
    floor: float | None  # the data's constant floor (eval records), when the rows give none per row
    note: str = ""  # how it was made, for the report (e.g. a calibration temperature)
    _curves: dict = field(default_factory=dict, repr=False)
    _selected: dict = field(default_factory=dict, repr=False)

    def terms(self, i: int, context: "EvalSplit") -> Terms:
        rows = self.load(i)
        if context.truth is not None:
            rows = rows | {"truth": context.truth}
        return context.workload.row_terms(rows)

    def curve(self, context: "EvalSplit", half: str) -> np.ndarray:
        """The loss at every eval step on one half of the eval split."""
        if half not in self._curves:
            masks = {h: context.half(h) for h in ("validation", "test")}
            curves = {h: [] for h in masks}
            for i in range(len(self.steps)):
                loss = self.terms(i, context)["loss"]
                for h, mask in masks.items():
                    curves[h].append(ratio(loss, mask))
            self._curves.update({h: np.array(c) for h, c in curves.items()})
        return self._curves[half]

    def selected(self, context: "EvalSplit") -> int:
        """The eval-step index best on validation (lowest loss; the earliest of equals)."""
        return int(np.argmin(self.curve(context, "validation")))

    def selected_rows(self, context: "EvalSplit") -> Rows:
        if "rows" not in self._selected:
            self._selected["rows"] = self.load(self.selected(context))
        return self._selected["rows"]

    def selected_terms(self, context: "EvalSplit") -> Terms:
        if "terms" not in self._selected:
            rows = self.selected_rows(context)
            self._selected["terms"] = context.workload.row_terms(
                rows | {"truth": context.truth} if context.truth is not None else rows)
        return self._selected["terms"]


def ratio(terms: tuple[np.ndarray, np.ndarray], index) -> float:
    numerator, denominator = terms
    den = denominator[index].sum()
    return float(numerator[index].sum() / den) if den else math.nan


@dataclass(eq=False)
class EvalSplit:
    """What every model of a plan shares: the workload, the eval keys, their halves and the generator's truth."""

    workload: Workload
    keys: np.ndarray
    validation: np.ndarray  # bool per row
    truth: np.ndarray | None

    @classmethod
    def of(cls, workload: Workload, keys: np.ndarray, truth: np.ndarray | None) -> "EvalSplit":
        return cls(workload, keys, validation_half(workload.eval_unit(keys)), truth)

    def half(self, name: str) -> np.ndarray:
        return self.validation if name == "validation" else ~self.validation


def group_model(run_dir: Path, group: int) -> Model:
    steps = read_eval_steps(run_dir, group)
    records = {r["step"]: r for r in eval_records(run_dir, group)}
    floor = records[int(steps[-1])].get("floor") if records else None
    return Model(f"{run_dir.name}/group-{group}", steps, lambda i: read_eval_rows(run_dir, group, int(steps[i])), floor)


def ensemble_model(name: str, members: list[Model], workload: Workload) -> Model:
    """The average of the members' predicted distributions at every eval step they share."""
    steps = functools.reduce(np.intersect1d, [m.steps for m in members])
    index = [{int(s): i for i, s in enumerate(m.steps)} for m in members]
    return Model(name, steps, lambda i: workload.ensemble([m.load(ix[int(steps[i])]) for m, ix in zip(members, index)]),
                 members[0].floor, note=f"average of {', '.join(m.name for m in members)}")


def calibrated_model(model: Model, context: EvalSplit) -> Model:
    """The model at its selected step with one temperature fitted on the validation half (log loss), applied to
    every row: a post-hoc control that trains nothing."""
    rows, calibrate = model.selected_rows(context), context.workload.calibrate
    if calibrate is None:
        raise ValueError(f"the {context.workload.name} workload's eval rows cannot be recalibrated")
    mask = context.validation

    def validation_loss(log_t: float) -> float:
        return ratio(context.workload.row_terms(calibrate(rows, math.exp(log_t)))["loss"], mask)

    grid = np.linspace(-2.0, 2.0, 81)  # temperatures 0.14 .. 7.4, then a golden-section refinement
    best = grid[int(np.argmin([validation_loss(t) for t in grid]))]
    lo, hi = best - 0.05, best + 0.05
    for _ in range(30):
        a, b = hi - 0.618 * (hi - lo), lo + 0.618 * (hi - lo)
        lo, hi = (lo, b) if validation_loss(a) < validation_loss(b) else (a, hi)
    temperature = math.exp((lo + hi) / 2)
    step = model.steps[model.selected(context)]
    return Model(f"{model.name}, calibrated", np.array([step]), lambda i: calibrate(rows, temperature), model.floor,
                 note=f"temperature {temperature:.3f} fitted on validation")


@dataclass
class Unit:
    """One seed of a condition: its models (the run's groups, or one ensemble), measured run facts."""

    seed: int
    models: list[Model]
    facts: dict = field(default_factory=dict)  # staleness, peer coverage, passes, ms/step, examples


@dataclass
class Condition:
    name: str
    units: list[Unit]
    chosen: str | None = None  # a condition picked from others (best on validation): which one

    @property
    def churn_models(self) -> list[Model]:
        """The model of each seed that churn compares across retrains: group 0 (never two coupled groups)."""
        return [u.models[0] for u in self.units]


class Bootstrap:
    """Replicate b: the test rows and each condition's seeds (or seed pairs) drawn with replacement."""

    def __init__(self, context: EvalSplit, replicates: int, seed: int = 0):
        self.context, self.replicates, self.seed = context, replicates, seed
        self.test = np.flatnonzero(~context.validation)

    def rows(self, b: int) -> np.ndarray:
        if b == 0:
            return self.test
        return self.test[np.random.default_rng([self.seed, b, 0]).integers(0, len(self.test), len(self.test))]

    def units(self, b: int, name: str, n: int) -> np.ndarray:
        if b == 0:
            return np.arange(n)
        return np.random.default_rng([self.seed, b, 1, zlib.crc32(name.encode())]).integers(0, n, n)

    def figure(self, condition: Condition, figure: str) -> np.ndarray:
        """[point, replicates...] of a figure at each model's selected step; "excess" is loss - floor, "churn" the
        workload's primary churn measure over every pair of seeds."""
        if figure == "churn":
            return self._churn(condition)
        per_unit = [[self._model_terms(m, figure) for m in u.models] for u in condition.units]
        out = np.empty(self.replicates + 1)
        for b in range(self.replicates + 1):
            rows, units = self.rows(b), self.units(b, condition.name, len(per_unit))
            out[b] = np.mean([np.mean([f(rows) for f in per_unit[u]]) for u in units])
        return out

    def _model_terms(self, model: Model, figure: str) -> Callable[[np.ndarray], float]:
        terms = model.selected_terms(self.context)
        if figure != "excess":
            return lambda rows: ratio(terms[figure], rows)
        if "floor" in terms:
            return lambda rows: ratio(terms["loss"], rows) - ratio(terms["floor"], rows)
        return lambda rows: ratio(terms["loss"], rows) - (model.floor or 0.0)

    def _churn(self, condition: Condition) -> np.ndarray:
        models = condition.churn_models
        pairs = [self.context.workload.churn_terms(a.selected_rows(self.context), b.selected_rows(self.context))
                 for i, a in enumerate(models) for b in models[i + 1:]]
        if not pairs:
            raise ValueError(f"{condition.name}: churn needs at least two seeds")
        out = np.empty(self.replicates + 1)
        for b in range(self.replicates + 1):
            rows, chosen = self.rows(b), self.units(b, condition.name + "/pairs", len(pairs))
            out[b] = np.mean([ratio(pairs[p], rows) for p in chosen])
        return out

    def curve_replicates(self, model: Model, half: str = "validation") -> np.ndarray:
        """[replicate, eval step] of a model's loss curve on a half, rows of that half drawn with replacement."""
        rows = np.flatnonzero(self.context.half(half))
        terms = [model.terms(i, self.context)["loss"] for i in range(len(model.steps))]  # (one model at a time)
        out = np.empty((self.replicates + 1, len(terms)))
        for b in range(self.replicates + 1):
            draw = rows if b == 0 else rows[np.random.default_rng([self.seed, b, 2]).integers(0, len(rows), len(rows))]
            out[b] = [ratio(t, draw) for t in terms]
        return out


def steps_to(steps: np.ndarray, curve: np.ndarray, target: float) -> float:
    """The first step at which a loss curve reaches `target`, interpolated between eval points; the first eval
    step itself when the curve starts below it (reported as "before the first eval", never as a step count
    it did not measure), NaN when it never does."""
    below = np.flatnonzero(curve <= target)
    if not len(below):
        return math.nan
    i = int(below[0])
    if i == 0:
        return float(steps[0])
    (s0, s1), (e0, e1) = steps[i - 1:i + 1], curve[i - 1:i + 1]
    return float(s0 + (s1 - s0) * (e0 - target) / (e0 - e1))
