"""Defects found by a hunt over schedulers/ and dualpath_jax/workloads/ (each test failed before its fix)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from dualpath_jax.workloads import summarize
from dualpath_jax.workloads.synthetic import SyntheticSpec, generate_trajectories
from dualpath_jax.workloads.types import Trajectory, Turn
from schedulers.calibrate import TINY_DENSE, NumpyPrefill, default_grid
from schedulers.cost_model import CostModel, PrefillMeasurement
from schedulers.policies import DualPathConfig


def test_prompt_tokens_follow_an_earlier_turns_stated_context_like_turn_shapes():
    """A turn without a stated context re-reads the previous prompt + generation, also when an earlier turn
    stated a shorter one (text it dropped does not come back): prompt_tokens / hit_tokens / total_tokens gave
    195 / 128 / 198 for turn 2 below (every append + gen summed) while turn_shapes, the simulator and
    summarize gave 105 / 64 / 108."""
    t = Trajectory(0, [Turn(100, 10), Turn(50, 5, context_tokens=20), Turn(30, 3)])
    assert t.turn_shapes(64) == [(100, 0, 10), (70, 0, 5), (105, 64, 3)]
    assert [(t.prompt_tokens(i), t.hit_tokens(i, 64), t.turns[i].gen_tokens) for i in range(3)] == t.turn_shapes(64)
    assert t.miss_tokens(2, 64) == 41
    assert t.total_tokens == 108 == summarize([t]).mean_total
    # without stated contexts: the paper's model, every append + gen
    plain = Trajectory(1, [Turn(100, 10), Turn(50, 5), Turn(30, 3)])
    assert [plain.context_before(i) for i in range(4)] == [0, 110, 165, 198]


def test_synthetic_custom_spec_whose_gen_tail_passes_max_len_still_fits_the_first_turn():
    """A custom SyntheticSpec (a small model's context) whose lognormal gen sometimes draws past max_len: the
    first turn's append was clamped to max_len - gen, negative, and generate_trajectories died with "turn
    lengths must be >= 0, got append=-73 gen=329". Now the first turn fits with >= 1 prompt token."""
    spec = SyntheticSpec(
        "small",
        max_len=256,
        first_append_mean=100,
        first_append_sigma=0.4,
        append_mean=30,
        append_sigma=1.0,
        gen_mean=60,
        gen_sigma=0.8,
        length_median=200,
        length_sigma=0.5,
    )
    trajs = generate_trajectories(spec, 2000, seed=0)
    assert all(t.turns[0].append_tokens >= 1 and t.total_tokens <= spec.max_len for t in trajs)
    with pytest.raises(ValueError, match="max_len must be >= 2"):
        generate_trajectories(dataclasses.replace(spec, max_len=1), 1)


def test_default_calibration_grid_stays_within_its_max_context():
    """default_grid(max_context) is meant for NumpyPrefill(shape, max_context): its fixed contexts (up to 3,072)
    went past a smaller cache, so NumpyPrefill refused the grid ("cached 2048 exceeds the calibration cache")."""
    fit, held = default_grid(1024)
    assert max(cached for batch in fit + held for cached, _ in batch) == 1024
    step = NumpyPrefill(
        dataclasses.replace(
            TINY_DENSE, layers=1, hidden=16, heads=2, kv_heads=1, head_dim=8, intermediate=16, vocab=16
        ),
        1024,
    )
    for batch in fit + held:
        step(batch)  # every batch runs on the 1,024-token cache
    analytic = CostModel(TINY_DENSE, "cpu")  # and the grid still determines every prefill term of a fit
    CostModel.from_fit(TINY_DENSE, "cpu", [PrefillMeasurement(b, analytic.batch_prefill_time(b)) for b in fit])
    assert default_grid(4096)[1][-1] == ((1024, 64), (3000, 16))  # the default grid is unchanged


def test_infinite_profile_windows_and_turn_shapes_are_refused_by_name():
    """from_cost_model with an infinite window, context or append died with a bare "cannot convert float
    infinity to integer" / "cannot convert float NaN to integer" (the NaN/<=0 checks let inf through)."""
    cm = CostModel("ds660b", "h800")
    for kw, what in (
        ({"read_window_s": math.inf}, "read_window_s and compute_window_s must be > 0"),
        ({"compute_window_s": math.inf}, "read_window_s and compute_window_s must be > 0"),
        ({"context": math.inf}, "context must be >= 0 for a prefill rate"),
        ({"append": math.inf}, "append must be > 0 for a prefill rate"),
    ):
        with pytest.raises(ValueError, match=what):
            DualPathConfig.from_cost_model(cm, **kw)
    for args, what in (((math.inf, 429), "context must be >= 0"), ((1000, math.inf), "append must be > 0")):
        with pytest.raises(ValueError, match=what):
            cm.gb_per_pflop(*args)
