"""Defects found by the third schedulers/workloads hunt (see /work/notes/hunt_sched3.md)."""

from __future__ import annotations

import pytest

from dualpath_jax.workloads.types import Trajectory, Turn
from schedulers.cost_model import CostModel, DecodeMeasurement, PrefillMeasurement

_GRID = (((0, 64),), ((0, 512),), ((1024, 256),), ((4096, 64),), ((0, 8), (100, 50)), ((2048, 2048),))
_DECODE = ((1, 1000), (4, 8000), (16, 64000), (64, 6400), (2, 100_000), (8, 10))


def test_fit_refuses_nan_inf_or_negative_shapes_by_name():
    cm = CostModel("qwen2.5-32b", "h800")
    good = [PrefillMeasurement(it, cm.batch_prefill_time(it)) for it in _GRID]
    good += [DecodeMeasurement(b, c, cm.decode_step_time(b, c)) for b, c in _DECODE]
    # NaN / inf shapes: a bare "LinAlgError: SVD did not converge"; a negative bsz: silently dropped, so the
    # batch's whole time went on its other item
    for items in (((float("nan"), 100),), ((float("inf"), 100),), ((0, 100), (0, -5))):
        with pytest.raises(ValueError, match="bad prefill measurement"):
            cm.fit([*good, PrefillMeasurement(items, 0.1)])
    for b, ctx in ((float("nan"), 100), (4, float("nan")), (4, float("inf"))):
        with pytest.raises(ValueError, match="bad decode measurement"):
            cm.fit([*good, DecodeMeasurement(b, ctx, 0.1)])
    # bsz-0 items still carry no term (unchanged)
    pre, _ = cm.fit([*good, PrefillMeasurement(((0, 64), (5, 0)), cm.batch_prefill_time(((0, 64),)))])
    assert pre is not None


def test_turn_refuses_nan_or_infinite_lengths_by_name():
    nan, inf = float("nan"), float("inf")
    # a NaN gen (a table's missing value) was kept: peak_turn and cut_at_tokens skipped that turn
    # (peak (0, 110), nothing cut at 1000 tokens); NaN / inf appends gave bare int() conversion errors later
    for kw in ({"append_tokens": nan}, {"gen_tokens": nan}, {"append_tokens": inf}, {"gen_tokens": inf}):
        with pytest.raises(ValueError, match="turn lengths must be >= 0"):
            Turn(**{"append_tokens": 10, "gen_tokens": 5, **kw})
    for ctx in (nan, inf):
        with pytest.raises(ValueError, match="context_tokens must be >= 0"):
            Turn(10, 5, context_tokens=ctx)
    t = Trajectory(0, [Turn(100, 10), Turn(10, 5, context_tokens=110)])
    assert t.peak_turn() == (1, 125) and t.cut_at_tokens(120).num_turns == 1
