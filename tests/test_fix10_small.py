"""Fix wave 10, checkpoint and workloads: restore_params refuses non-finite weights itself, naming the param and the
checkpoint; a Trajectory's arrival_time stays checked when it is assigned after construction."""

from __future__ import annotations

import copy
import dataclasses
import math
import pickle

import jax
import numpy as np
import pytest

from dualpath_jax.workloads.types import Trajectory, Turn
from models.checkpoint import _saveable, abstract_params, restore_params, save_params
from models.registry import tiny_config

# ---------------------------------------------------------------- 1. restore_params: non-finite weights

_BAD = ("layers", 0, "self_attn", "q_proj", "kernel")


def _params(cfg, bad=None) -> dict:
    """Finite params of `cfg`'s shapes and dtypes (no model built), with `bad` at [0, 0] of the q_proj kernel."""
    rng = np.random.default_rng(0)
    pure = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), abstract_params(cfg))
    if bad is not None:
        leaf = pure
        for k in _BAD:
            leaf = leaf[k]
        leaf[0, 0] = bad
    return pure


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_restore_params_refuses_non_finite_weights(tmp_path, bad, dtype):
    """restore_params returned NaN / inf weights as they were saved (their checksums match): only ModelRunner's own
    scan refused them later, and any other user of the restored params got them silently, while the HF import
    refuses such a tensor by name. Contract: restore_params raises ValueError naming the checkpoint and the param;
    finite weights restore bit for bit as before."""
    cfg = tiny_config("tiny_qwen2", num_layers=1, dtype=dtype)
    ckpt = tmp_path / "ckpt"
    save_params(ckpt, _params(cfg, bad))
    with pytest.raises(
        ValueError, match=r"ckpt: layers/0/self_attn/q_proj/kernel has non-finite values \(NaN or inf\)"
    ):
        restore_params(ckpt, cfg)
    good = _params(cfg)
    save_params(tmp_path / "good", good)
    restored = restore_params(tmp_path / "good", cfg)
    for (p, want), (q, got) in zip(
        jax.tree_util.tree_flatten_with_path(good)[0], jax.tree_util.tree_flatten_with_path(restored)[0], strict=True
    ):
        assert p == q and got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_restore_params_refuses_non_finite_weights_of_a_checkpoint_without_checksums(tmp_path):
    """A checkpoint saved before the checksums were stored (a plain orbax save) restores unverified: its NaN weights
    came back without an error too. They are refused the same way."""
    import orbax.checkpoint as ocp

    cfg = tiny_config("tiny_qwen2", num_layers=1)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save((tmp_path / "old").absolute(), _saveable(_params(cfg, np.nan)))
    ckptr.wait_until_finished()
    ckptr.close()
    with pytest.raises(ValueError, match=r"old: layers/0/self_attn/q_proj/kernel has non-finite values"):
        restore_params(tmp_path / "old", cfg)


# ---------------------------------------------------------------- 2. Trajectory.arrival_time assigned later


@pytest.mark.parametrize("bad", [math.nan, math.inf, -5.0, True, "0.5", None], ids=repr)
def test_trajectory_arrival_time_is_checked_when_assigned(bad):
    """Trajectory checked arrival_time only in __post_init__: `t.arrival_time = float("nan")` afterwards was kept
    (only the simulator checks it again; the runtime driver does not). Contract: an assignment is checked as
    construction is, with the same error, and leaves the stored value as it was; a valid one is stored."""
    t = Trajectory(7, [Turn(100, 5)], arrival_time=2.5)
    with pytest.raises(ValueError, match=r"trajectory 7 arrival_time must be a finite number of seconds >= 0"):
        t.arrival_time = bad
    assert t.arrival_time == 2.5
    with pytest.raises(ValueError, match=r"trajectory 7 arrival_time must be a finite number of seconds >= 0"):
        Trajectory(7, [Turn(100, 5)], arrival_time=bad)
    t.arrival_time = 4
    assert t.arrival_time == 4
    t.arrival_time = np.float64(0.0)
    assert t.arrival_time == 0.0
    # the other fields (not checked) stay assignable; copies, replace and pickle keep working
    t.source = "edited"
    t.turns = [Turn(10, 1), Turn(20, 2)]
    assert t.num_turns == 2 and t.source == "edited"
    assert dataclasses.replace(t, arrival_time=9.0).arrival_time == 9.0
    with pytest.raises(ValueError, match=r"trajectory 7 arrival_time must be"):
        dataclasses.replace(t, arrival_time=-1.0)
    assert copy.deepcopy(t) == t and pickle.loads(pickle.dumps(t)) == t
