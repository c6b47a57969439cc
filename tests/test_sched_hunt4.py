"""Defects found by the fourth schedulers hunt (see /work/notes/hunt_sched4.md)."""

from __future__ import annotations

import array

import numpy as np
import pytest

from schedulers import ClusterSnapshot, EngineState, NodeState, PendingRequest, PrefillWork, make_policy
from schedulers import policies as P
from schedulers.api import QueueWindow
from schedulers.calibrate import time_decode, time_prefill
from schedulers.cost_model import CostModel, ModelShape
from schedulers.policies import DualPathConfig


def _cluster() -> ClusterSnapshot:
    engines = {
        0: EngineState(0, "prefill", 0, tok=10),
        1: EngineState(1, "prefill", 0, tok=5),
        2: EngineState(2, "decode", 1, free_hbm_tokens=10_000),
        3: EngineState(3, "decode", 1, free_hbm_tokens=10_000),
    }
    return ClusterSnapshot(0.0, engines, {0: NodeState(0, "prefill"), 1: NodeState(1, "decode")})


_REQS = [PendingRequest(i, i, 0, 100 + i, 64, 10) for i in range(5)]


@pytest.mark.parametrize("typecode", ["i", "l", "q"])
def test_queue_window_of_other_int_arrays_places_like_a_list(typecode):
    # The compiled phase-1 loop read a QueueWindow's non-list lengths through an int64 buffer: array('i') (or a numpy
    # int32 array) was a ValueError "Buffer dtype mismatch" out of schedule(), where the Python loop placed them.
    ids = array.array(typecode, [r.request_id for r in _REQS])
    lens = array.array(typecode, [r.total_tokens for r in _REQS])
    want = make_policy("dualpath", alpha_tokens=1000, beta_tokens=100_000).schedule(_cluster(), _REQS)
    got = make_policy("dualpath", alpha_tokens=1000, beta_tokens=100_000).schedule(
        _cluster(), QueueWindow(_REQS, ids, lens)
    )
    assert got == want and len(want) == len(_REQS)


def test_topology_cache_checks_a_new_snapshot_of_the_same_engines():
    # The topology cache is keyed on the EngineState objects: a second snapshot holding the same objects under other
    # keys, or with nodes that lack one or give it the other role, was taken unchecked because an earlier snapshot
    # of those engines had passed (the same snapshot as a first call was refused).
    good = _cluster()
    e, nodes = good.engines, good.nodes
    rekeyed = ClusterSnapshot(0.0, {10 + k: v for k, v in e.items()}, nodes)
    wrong_role = ClusterSnapshot(0.0, e, {0: NodeState(0, "prefill"), 1: NodeState(1, "prefill")})
    missing = ClusterSnapshot(0.0, e, {0: NodeState(0, "prefill")})
    for name in ("dualpath", "basic", "round_robin", "random"):
        policy = make_policy(name)
        for bad, err, match in (
            (rekeyed, ValueError, "keys must be the ids"),
            (wrong_role, ValueError, "a node's engines all have its role"),
            (missing, KeyError, "not in snapshot.nodes"),
        ):
            assert policy.schedule(good, _REQS[:1])  # fills the cache with these engines
            with pytest.raises(err, match=match):
                policy.schedule(bad, _REQS[:1])
        assert policy.schedule(good, _REQS[:1])  # and the good one is still taken afterwards


def test_engine_set_key_still_skips_the_check_for_the_runners_own_snapshot():
    snap = _cluster()
    snap.engine_set_key = 1
    policy = make_policy("dualpath")
    policy.schedule(snap, _REQS[:1])
    topo = P._TOPOLOGY_CACHE[0]
    assert policy.schedule(snap, _REQS[:1]) and P._TOPOLOGY_CACHE[0] is topo


@pytest.mark.parametrize("flag", [True, False, np.True_])
def test_bool_loads_and_token_counts_are_refused_by_name(flag):
    # True compared and added as 1: a flag given where a load or token count belongs was silently one token
    with pytest.raises(ValueError, match="not bools"):
        ClusterSnapshot(0.0, {0: EngineState(0, "prefill", 0, tok=flag)}, {0: NodeState(0, "prefill")})
    with pytest.raises(ValueError, match="not bools"):
        ClusterSnapshot(0.0, {0: EngineState(0, "decode", 0, free_hbm_tokens=flag)}, {0: NodeState(0, "decode")})
    with pytest.raises(ValueError, match="not bools"):
        ClusterSnapshot(0.0, {}, {0: NodeState(0, "prefill", read_queue_tokens=flag)})
    with pytest.raises(ValueError, match="not bools"):
        ClusterSnapshot(0.0, {}, {0: NodeState(0, "decode", engine_tok=flag)})
    with pytest.raises(ValueError, match="request 7: token counts must be numbers, not bools"):
        PendingRequest(7, 0, 0, 100, 0, flag)
    with pytest.raises(ValueError, match="prefill work 3: token counts must be numbers, not bools"):
        PrefillWork(3, flag, 100)
    # numbers still pass (ints and whole floats)
    ClusterSnapshot(0.0, {0: EngineState(0, "prefill", 0, tok=3, seq=1)}, {0: NodeState(0, "prefill")})
    PendingRequest(7, 0, 0, 100.0, 0, 1)
    PrefillWork(3, 0, 1)


def test_calibration_timers_refuse_fractional_grids_and_no_repeats():
    # time_decode timed step(2.5, ...) but recorded batch_size int(2.5) = 2; time_prefill truncated 2.5 tokens to 2
    # and timed that; repeats=0 (or negative) was taken as 1
    calls = []

    def step(*args):
        calls.append(args)

    with pytest.raises(ValueError, match=r"time_decode grid pair \(2.5, 100\)"):
        time_decode(step, [(1, 100), (2.5, 100)])
    with pytest.raises(ValueError, match=r"time_decode grid pair \(0, 100\)"):
        time_decode(step, [(0, 100)])
    with pytest.raises(ValueError, match="time_decode grid pair"):
        time_decode(step, [(1, float("nan"))])
    with pytest.raises(ValueError, match="time_prefill grid batch"):
        time_prefill(step, [((0, 16),), ((0, 2.5),)])
    with pytest.raises(ValueError, match="time_prefill grid batch"):
        time_prefill(step, [((-1, 16),)])
    for kw, match in (({"repeats": 0}, "repeats"), ({"repeats": 2.0}, "repeats"), ({"warmup": -1}, "warmup")):
        with pytest.raises(ValueError, match=match):
            time_decode(step, [(1, 100)], **kw)
        with pytest.raises(ValueError, match=match):
            time_prefill(step, [((0, 16),)], **kw)
    assert calls == []  # nothing was timed before the refusal
    meas = time_decode(step, [(2.0, np.int64(100))], repeats=1, warmup=0)
    assert calls == [(2, 100)] and type(calls[0][0]) is int
    assert (meas[0].batch_size, meas[0].total_context_tokens) == (2, 100)


@pytest.mark.parametrize("window", [True, "3"])
def test_profile_windows_must_be_numbers(window):
    # read_window_s=True was a 1 s window (α of one second's reads); a string a bare TypeError from `<`
    cm = CostModel("ds660b", "h800")
    for kw in ({"read_window_s": window}, {"compute_window_s": window}):
        with pytest.raises(ValueError, match="read_window_s and compute_window_s must be > 0 and finite"):
            DualPathConfig.from_cost_model(cm, **kw)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"layers": True}, "layers must be an int"),
        ({"hidden": 7.5}, "hidden must be an int"),
        ({"vocab": float("inf")}, "vocab must be an int"),
        ({"heads": "2"}, "heads must be an int"),
        ({"qkv_bias": "no"}, "qkv_bias must be a bool"),
        ({"tied_embeddings": 1}, "tied_embeddings must be a bool"),
    ],
)
def test_model_shape_counts_must_be_ints_and_flags_bools(kw, match):
    # a bool layer count was 1 layer, 7.5 a fractional parameter count, inf infinite FLOPs; a truthy string flag
    # counted a QKV bias; a string count was a bare TypeError from a comparison
    base = dict(layers=2, hidden=8, heads=2, kv_heads=2, head_dim=4, intermediate=16, vocab=10)
    with pytest.raises(ValueError, match=f"ModelShape 'bad': {match}"):
        ModelShape("bad", **{**base, **kw})
    ModelShape("ok", **base, qkv_bias=True, weight_bytes=np.int64(1))  # ints (numpy's too) and bools still pass


@pytest.mark.parametrize("name", ["dualpath", "basic", "round_robin", "random", "split"])
@pytest.mark.parametrize("node", [True, 0.0, "0"])
def test_fetching_node_must_be_a_node_id(name, node):
    # fetching_node=True was taken as node 1 (a bool hashes as 1): a DE group's fetch, silently; 0.0 as node 0
    with pytest.raises(TypeError, match="fetching_node must be a node id"):
        make_policy(name).schedule(_cluster(), _REQS, fetching_node=node)
    assert make_policy(name).schedule(_cluster(), _REQS, fetching_node=np.int64(0))  # numpy ints are ids
