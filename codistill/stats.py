"""Bootstrap intervals and verdicts for the claims a report makes.

A figure is carried as an array of replicates: entry 0 is the point estimate
(every eval row, every seed), entries 1.. are bootstrap replicates (rows and
seeds drawn with replacement; see `codistill.analysis`). Arithmetic on such
arrays is arithmetic on every replicate at once, so a ratio of two figures
has its interval for free, with both figures' resampling paired.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

LEVEL = 0.95

Verdict = Literal["holds", "fails", "inconclusive"]


@dataclass(frozen=True)
class Estimate:
    value: float  # the point estimate
    low: float  # the 95% percentile interval of the bootstrap replicates
    high: float

    @classmethod
    def of(cls, replicates: np.ndarray, level: float = LEVEL) -> "Estimate":
        """From [point, replicate 1, ...]; an undefined replicate (0/0, a target never reached) makes the
        interval undefined (NaN): nothing certain can be said then."""
        replicates = np.asarray(replicates, np.float64)
        rest = replicates[1:]
        if not len(rest) or not np.isfinite(rest).all():
            return cls(float(replicates[0]), math.nan, math.nan)
        tail = 100 * (1 - level) / 2
        low, high = np.percentile(rest, [tail, 100 - tail])
        return cls(float(replicates[0]), float(low), float(high))

    def format(self, digits: int = 4, unit: str = "") -> str:
        if not math.isfinite(self.value):
            return "n/a"
        interval = (f" [{self.low:.{digits}f}, {self.high:.{digits}f}]" if math.isfinite(self.low)
                    else " [interval n/a]")
        return f"{self.value:.{digits}f}{unit}{interval}"


@dataclass(frozen=True)
class Goal:
    """`at_most` (or `at_least`) a value; the point estimate must meet it, and the interval's far end must stay
    within `bound` (default: the goal itself). A goal is failed when the whole interval is on its wrong side."""

    at_most: float | None = None
    at_least: float | None = None
    bound: float | None = None

    def __post_init__(self) -> None:
        if (self.at_most is None) == (self.at_least is None):
            raise ValueError("a goal is either at_most or at_least a value")
        if self.bound is not None:
            bad = self.bound < self.at_most if self.at_most is not None else self.bound > self.at_least
            if bad:
                raise ValueError(f"bound {self.bound} is stricter than the goal itself")

    @property
    def goal(self) -> float:
        return self.at_most if self.at_most is not None else self.at_least

    def verdict(self, estimate: Estimate) -> Verdict:
        goal, bound = self.goal, self.goal if self.bound is None else self.bound
        if not math.isfinite(estimate.value):
            return "inconclusive"
        if self.at_most is not None:
            value, near, far = estimate.value, estimate.low, estimate.high
            meets = value <= goal and far < bound if math.isfinite(far) else False
            fails = math.isfinite(near) and near > goal
        else:
            value, near, far = estimate.value, estimate.high, estimate.low
            meets = value >= goal and far > bound if math.isfinite(far) else False
            fails = math.isfinite(near) and near < goal
        return "holds" if meets else "fails" if fails else "inconclusive"

    def describe(self) -> str:
        sign, bound_side = ("<=", "upper") if self.at_most is not None else (">=", "lower")
        text = f"{sign} {self.goal:g}"
        if self.bound is not None and self.bound != self.goal:
            text += f" ({bound_side} end of the interval {'<' if self.at_most is not None else '>'} {self.bound:g})"
        return text
