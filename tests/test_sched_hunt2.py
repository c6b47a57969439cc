"""Second hunt over schedulers/ and dualpath_jax/workloads/: reproducers of defects found there."""

from __future__ import annotations

import pytest

from dualpath_jax.workloads.stats import summarize
from dualpath_jax.workloads.types import Trajectory, Turn


def test_mean_gap_counts_only_gaps_between_consecutive_turns():
    # two 2-turn agents with a 10 s think time between their turns; the last turn's gap precedes no turn
    trajs = [Trajectory(a, [Turn(100, 10, gap_s=10.0), Turn(50, 5)]) for a in range(2)]
    assert summarize(trajs).mean_gap_s == pytest.approx(10.0)
    # single-turn agents have no gap between turns
    assert summarize([Trajectory(0, [Turn(100, 10)])]).mean_gap_s == 0.0
