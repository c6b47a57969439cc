"""Simulator: a researcher's own policy that returns something wrong is named, and one that places nothing ends.

What was wrong (found walking the "register your own policy" journey, /work/notes/fix11_extend.md R1 / R2):
- `schedule()` returning None was taken for "nothing placed": the group fetched again every fetch step, forever;
- a policy that never places anything (returns []) on an idle cluster looped forever too (an offline run has no
  other event left: the fetch re-armed itself endlessly);
- an item that is not an `Assignment` failed as a bare AttributeError ('tuple' object has no attribute
  'request_id'), an unknown request id as a bare KeyError, and a request placed in an earlier fetch was placed again.

Contract: a TypeError / RuntimeError naming the policy and the bad value; a policy that places none of the queued
requests in IDLE_FETCHES fetches in a row while nothing else is pending fails the run naming it. Both the compiled
simulator and its Python twin (`DUALPATH_PURE_PYTHON=1` runs this file on the twin).
"""

from __future__ import annotations

import dataclasses

import pytest
from test_fix11_runtimepol import NeverPlaces, ReturnsNone, Twice, WrongCached, _Policy  # (as the runtime's tests)

from dualpath_jax.sim import load_config, run, sim_config_from_dict
from dualpath_jax.sim import simulator as sim_mod
from dualpath_jax.workloads.types import Trajectory, Turn
from schedulers import BATCHERS, POLICIES, Assignment


class ReturnsTuples(_Policy):
    def schedule(self, snapshot, queue, fetching_node=None):
        r = next(iter(queue))
        return [(r.request_id, 0, 0, "pe")]


def _place_first(snapshot, queue, rid=None):
    r = next(iter(queue))
    pe = snapshot.engines_of("prefill")[0].engine_id
    de = snapshot.engines_of("decode")[0].engine_id
    return [Assignment(r.request_id if rid is None else rid, pe, de, "pe")]


class UnknownRequest(_Policy):
    def schedule(self, snapshot, queue, fetching_node=None):
        return _place_first(snapshot, queue, rid=10**9)


class PlacesTheFirstAgain(_Policy):
    """Places the first queued request, then that same request again in every later fetch."""

    first = None

    def schedule(self, snapshot, queue, fetching_node=None):
        out = _place_first(snapshot, queue, rid=PlacesTheFirstAgain.first)
        PlacesTheFirstAgain.first = out[0].request_id
        return out


_POLICIES = {
    "fix11s_none": ReturnsNone,
    "fix11s_nothing": NeverPlaces,
    "fix11s_tuples": ReturnsTuples,
    "fix11s_unknown": UnknownRequest,
    "fix11s_again": PlacesTheFirstAgain,
}


@pytest.fixture(scope="module")
def registered():
    for name, cls in _POLICIES.items():
        POLICIES.register(name)(cls)
    yield
    for name in _POLICIES:
        POLICIES._entries.pop(name, None)


def _run(policy: str, **kw):
    cfg = sim_config_from_dict(load_config(f"configs/sim_tiny.py:{policy}").to_dict())
    return run(dataclasses.replace(cfg, **kw))


@pytest.mark.parametrize(
    "policy, error, match",
    [
        ("fix11s_none", TypeError, r"policy 'fix11s_none' returned None from schedule\(\), not a list of Assignments"),
        ("fix11s_tuples", TypeError, r"policy 'fix11s_tuples' returned \(\d+, 0, 0, 'pe'\) in its list, not an Assign"),
        (
            "fix11s_unknown",
            RuntimeError,
            r"policy 'fix11s_unknown' placed request 1000000000, which is not in the "
            r"queue \(unknown or finished\)",
        ),  # fmt: skip
        (
            "fix11s_again",
            RuntimeError,
            r"policy 'fix11s_again' placed request \d+, which is not in the queue "
            r"\((placed before|unknown or finished)\)",
        ),  # fmt: skip
        (
            "fix11s_nothing",
            RuntimeError,
            r"policy 'fix11s_nothing' placed none of the \d+ queued requests in 1000 "
            r"fetches on an idle cluster",
        ),  # fmt: skip
    ],
)
def test_a_bad_policy_result_is_named_and_the_run_ends(registered, policy, error, match):
    PlacesTheFirstAgain.first = None
    with pytest.raises(error, match=match):
        _run(policy)


def test_idle_fetches_count_only_fetches_in_a_row_with_nothing_pending(registered):
    """A policy that places nothing for a while on an idle cluster, fewer than IDLE_FETCHES fetches in a row, and
    then places its requests, is not failed: the run finishes."""
    assert sim_mod.IDLE_FETCHES == 1000

    class Late(_Policy):
        calls = 0

        def schedule(self, snapshot, queue, fetching_node=None):
            self.calls += 1
            if self.calls < sim_mod.IDLE_FETCHES - 1:  # (just under the limit at the start, then places)
                return []
            return _place_first(snapshot, queue)

    POLICIES.register("fix11s_late")(Late)
    try:
        res = _run("fix11s_late")
    finally:
        POLICIES._entries.pop("fix11s_late", None)
    assert res.summary["unfinished_turns"] == 0 and res.summary["turns"] == len(res.records) > 0


@pytest.mark.parametrize(
    "batcher, match",
    [
        (WrongCached, r"batcher 'fix11s_b' returned a bad item .*: cached=\d+, but request \d+ has \d+ cached tokens"),
        (Twice, r"batcher 'fix11s_b' returned a bad item .*: request listed twice"),
    ],
    ids=["wrong-cached", "twice"],
)
def test_a_bad_batch_item_is_named(batcher, match):
    """What was wrong: a batcher's item with a `cached` other than the request's was priced at that length and ran
    (all turns finished, the figures wrong), and a request listed twice in one batch ran twice. Contract: a
    RuntimeError naming the batcher and the item, as for an unknown request or a bad bsz (the runtime refuses both
    too)."""
    BATCHERS.register("fix11s_b")(batcher)
    try:
        with pytest.raises(RuntimeError, match=match):
            _run("basic", batcher="fix11s_b")
    finally:
        BATCHERS._entries.pop("fix11s_b", None)


@pytest.mark.parametrize(
    "trajs",
    [
        [Trajectory(0, [Turn(100, 5)], arrival_time=1e300)],
        [Trajectory(0, [Turn(100, 5, gap_s=1.7e308), Turn(10, 5, gap_s=1.7e308), Turn(10, 5)])],
        [Trajectory(0, [Turn(100, 5), Turn(10, 5, arrival_offset_s=1e308)], source="my.json")],
    ],
    ids=["arrival", "gaps", "offset"],
)
def test_times_past_the_clocks_range_are_refused_when_built(trajs):
    """Finite but huge trace times (a trace's t = 1e308, think times summing past the float range) failed inside the
    run with an OverflowError, or (1e300) ran with a JCT of 0 and NaN throughputs: the clock could not step a fetch
    interval there. Refused when the simulator is built, naming the trajectory (and its source)."""
    from dualpath_jax.sim.config import SimConfigError
    from dualpath_jax.sim.runner import build_simulator

    cfg = sim_config_from_dict(load_config("configs/sim_tiny.py:dualpath").to_dict())
    with pytest.raises(SimConfigError, match=r"trajectory 0 \(.*\) reaches t = .* past the .* s the simulator's clock"):
        build_simulator(cfg, trajs)
    ok = [Trajectory(0, [Turn(100, 5, gap_s=3600.0), Turn(10, 5)], arrival_time=86400.0 * 365)]  # a year in: runs
    records, _, stats = build_simulator(cfg, ok).run()
    assert len(records) == 2 and stats["unfinished_turns"] == 0
