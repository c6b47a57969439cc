"""Arrival models of the drivers (simulator and runtime): when each agent starts and each turn is ready.

  - offline (DESIGN.md "Vocabulary": offline rollout): every agent starts at t = 0; turn i+1 is ready right after
    turn i finished plus turn i's gap (`Turn.gap_s`; 0 for the paper's synthetic data). "Finished" is what
    the driver passes as `prev_finish`, and neither makes turn i+1 due before turn i's blocks are written back, so
    its lookup sees every block of turn i (turn i's `finished` timestamp stays its last token). The simulator passes
    the later of the last token and the write-back's end, so turn i+1 arrives then; the runtime passes the last
    token but hears of the turn's end only once its write-back is stored, so the wait between is in turn i+1's TTFT
    (its queue part). The two differ by at most the write-back's tail (<= 1 ms in the simulator at DS 660B 2P4D).
  - online: agents arrive as a Poisson process at `aps` agents/s (seeded); turns as in offline (the
    paper's online runs have no gap between turns; `use_gaps=False` forces that for trace workloads).
  - trace: agents start at their `Trajectory.arrival_time`; turn i is ready at its trace time
    (arrival_time + `Turn.arrival_offset_s`) or, closed loop (default), not before turn i−1 finished
    plus its gap when the trace time comes too early for this system.

A driver asks `agent_arrivals(trajectories)` once, then `turn_ready(trajectory, i, prev_finish)` for
every later turn as turns finish.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import numbers
from collections.abc import Sequence

import numpy as np

from dualpath_jax.checks import is_bool
from dualpath_jax.registry import Registry
from dualpath_jax.workloads.types import Trajectory

ARRIVALS: Registry[type[ArrivalModel]] = Registry("arrival model")


def _check_flag(name: str, v) -> None:
    """A flag of an arrival model is a bool: closed_loop="false" (a truthy string, e.g. from a config variant) kept the
    closed loop, and use_gaps="no" kept the gaps."""
    if not is_bool(v):
        raise ValueError(f"{name} must be a bool, got {v!r} ({type(v).__name__})")


class ArrivalModel(abc.ABC):
    name: str = "?"

    @abc.abstractmethod
    def agent_arrivals(self, trajectories: Sequence[Trajectory]) -> np.ndarray:
        """[n_agents] float64 seconds: when each agent's first turn is ready."""

    def turn_ready(self, trajectory: Trajectory, i: int, prev_finish: float) -> float:
        """When turn i >= 1 is ready, given that turn i−1 finished at `prev_finish` (the drivers pass the later of its
        last token and its write-back's end, see the module docstring)."""
        if i < 1:
            raise ValueError(f"turn_ready is for turns >= 1, got {i}")
        return prev_finish + trajectory.turns[i - 1].gap_s

    def with_arrivals(self, trajectories: Sequence[Trajectory]) -> list[Trajectory]:
        """Copies of `trajectories` whose arrival_time is this model's agent arrival."""
        times = self.agent_arrivals(trajectories)
        return [dataclasses.replace(t, arrival_time=float(a)) for t, a in zip(trajectories, times, strict=True)]


@ARRIVALS.register("offline")
class OfflineArrivals(ArrivalModel):
    """All agents at t = 0 (offline rollout; JCT = time until all finish)."""

    name = "offline"

    def agent_arrivals(self, trajectories: Sequence[Trajectory]) -> np.ndarray:
        return np.zeros(len(trajectories), dtype=np.float64)


@ARRIVALS.register("online")
class OnlineArrivals(ArrivalModel):
    """Poisson agent arrivals at `aps` agents/s, seeded.

    With `duration_s` (the simulator's probes: `aps * duration_s` agents) the agents arrive as a Poisson process on
    the window [0, duration_s) given its count: that many uniform times, sorted. Without it the n-th agent arrives
    after n exponential gaps (the first after one gap), a time that strays around the window's end: a probe's last
    agents came after its clock stopped, or its judged window ended early with no new agent for minutes."""

    name = "online"

    def __init__(self, aps: float, seed: int = 0, use_gaps: bool = True, duration_s: float | None = None):
        # (a str aps or a None seed failed in a comparison naming neither; aps=inf started every agent at t=0)
        if isinstance(aps, bool) or not isinstance(aps, numbers.Real) or not 0 < aps < math.inf:
            raise ValueError(f"online arrivals need a finite aps > 0 agents/s, got {aps!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:  # numpy's error names none
            raise ValueError(f"online arrivals need an int seed >= 0, got {seed!r}")
        if duration_s is not None and (
            isinstance(duration_s, bool) or not isinstance(duration_s, numbers.Real) or not 0 < duration_s < math.inf
        ):
            raise ValueError(f"online arrivals need a finite duration_s > 0 s (or None), got {duration_s!r}")
        _check_flag("use_gaps", use_gaps)
        self.aps = float(aps)
        self.seed = seed
        self.use_gaps = use_gaps
        self.duration_s = None if duration_s is None else float(duration_s)

    def agent_arrivals(self, trajectories: Sequence[Trajectory]) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        if self.duration_s is not None:
            return np.sort(rng.uniform(0.0, self.duration_s, len(trajectories)))
        # (a finite aps can still be too small: 1e-320 gives t = inf; the runtime's driver refuses that naming aps and
        # run_timeout_s, with_arrivals below naming aps)
        return np.cumsum(rng.exponential(1.0 / self.aps, len(trajectories)))

    def with_arrivals(self, trajectories: Sequence[Trajectory]) -> list[Trajectory]:
        times = self.agent_arrivals(trajectories)
        if len(times) and not np.isfinite(times[-1]):  # (it said "trajectory 0 arrival_time must be ... got inf")
            raise ValueError(
                f"online arrivals at aps={self.aps!r} agents/s put agent {int(np.argmax(~np.isfinite(times)))} of "
                f"{len(times)} past the float range (t = inf): give a larger aps"
            )
        return [dataclasses.replace(t, arrival_time=float(a)) for t, a in zip(trajectories, times, strict=True)]

    def turn_ready(self, trajectory: Trajectory, i: int, prev_finish: float) -> float:
        if not self.use_gaps:
            if i < 1:
                raise ValueError(f"turn_ready is for turns >= 1, got {i}")
            return prev_finish
        return super().turn_ready(trajectory, i, prev_finish)


@ARRIVALS.register("trace")
class TraceArrivals(ArrivalModel):
    """Trace timestamps: agents at `arrival_time`, turns at their recorded offsets (closed loop: never
    before the previous turn finished plus its gap)."""

    name = "trace"

    def __init__(self, closed_loop: bool = True):
        _check_flag("closed_loop", closed_loop)
        self.closed_loop = closed_loop

    def agent_arrivals(self, trajectories: Sequence[Trajectory]) -> np.ndarray:
        return np.array([t.arrival_time for t in trajectories], dtype=np.float64)

    def turn_ready(self, trajectory: Trajectory, i: int, prev_finish: float) -> float:
        after_prev = super().turn_ready(trajectory, i, prev_finish)
        off = trajectory.turns[i].arrival_offset_s
        if off is None:
            return after_prev
        stamp = trajectory.arrival_time + off
        return max(stamp, after_prev) if self.closed_loop else stamp


def make_arrivals(name: str, **kwargs) -> ArrivalModel:
    """`make_arrivals("online", aps=0.4, seed=1)`; unknown names list the known ones."""
    return ARRIVALS.get(name)(**kwargs)
