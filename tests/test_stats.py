"""Bootstrap intervals and verdicts (codistill.stats) on constructed data with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from codistill.stats import Estimate, Goal


def test_the_interval_is_the_replicates_central_95_percent_and_the_point_is_entry_zero():
    replicates = np.concatenate([[7.0], np.arange(1, 1001, dtype=float)])  # point 7; replicates 1..1000
    e = Estimate.of(replicates)
    assert e.value == 7.0
    assert e.low == pytest.approx(np.percentile(np.arange(1, 1001), 2.5))
    assert e.high == pytest.approx(np.percentile(np.arange(1, 1001), 97.5))


def test_an_undefined_replicate_leaves_the_interval_undefined():
    e = Estimate.of(np.array([1.0, 0.9, math.nan, 1.1]))
    assert e.value == 1.0 and math.isnan(e.low) and math.isnan(e.high)
    assert Goal(at_most=2.0).verdict(e) == "inconclusive"
    assert e.format(2) == "1.00 [interval n/a]"


@pytest.mark.parametrize("low, value, high, verdict", [
    (0.60, 0.70, 0.80, "holds"),  # all of it below the goal
    (0.70, 0.74, 0.84, "holds"),  # the point meets 0.75 and the upper end stays under the bound 0.85
    (0.70, 0.74, 0.86, "inconclusive"),  # the upper end passes the bound
    (0.70, 0.78, 0.84, "inconclusive"),  # the point misses the goal, the interval does not exclude it
    (0.76, 0.80, 0.90, "fails"),  # all of it above the goal
])
def test_at_most_goal_with_a_bound(low, value, high, verdict):
    assert Goal(at_most=0.75, bound=0.85).verdict(Estimate(value, low, high)) == verdict


@pytest.mark.parametrize("low, value, high, verdict", [
    (1.4, 2.2, 3.0, "holds"),
    (1.2, 2.2, 3.0, "inconclusive"),  # the lower end falls under the bound 1.3
    (0.5, 1.0, 1.9, "fails"),  # all of it under the goal 2
    (-1.0, 0.5, 2.5, "inconclusive"),
])
def test_at_least_goal_with_a_bound(low, value, high, verdict):
    assert Goal(at_least=2.0, bound=1.3).verdict(Estimate(value, low, high)) == verdict


def test_without_a_bound_the_whole_interval_must_meet_the_goal():
    goal = Goal(at_most=0.0)
    assert goal.verdict(Estimate(-0.02, -0.03, -0.01)) == "holds"
    assert goal.verdict(Estimate(-0.02, -0.03, 0.01)) == "inconclusive"
    assert goal.verdict(Estimate(0.02, 0.01, 0.03)) == "fails"
    assert goal.describe() == "<= 0"


@pytest.mark.parametrize("kwargs", [{}, {"at_most": 1.0, "at_least": 0.0}, {"at_most": 0.75, "bound": 0.7},
                                    {"at_least": 2.0, "bound": 2.5}])
def test_impossible_goals_are_refused(kwargs):
    with pytest.raises(ValueError):
        Goal(**kwargs)
