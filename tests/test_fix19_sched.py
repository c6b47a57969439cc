"""Defects found by the fix19 schedulers / workloads / metrics hunt (see /work/notes/fix19_sched.md).

Each test failed before its fix. Policies run unchanged in the simulator and the runtime, so the first ones check that
a policy decides the same on a snapshot as the simulator keeps it (per-node engine sums, an engine-set key) and on one
as the runtime builds it (neither), also after a custom policy changed the loads of its `snapshot.copy()`.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schedulers import ClusterSnapshot, EngineState, NodeState, PendingRequest, make_policy
from schedulers.policies import DualPathPolicy

DUALPATH_FAMILY = ("dualpath", "de_only", "pe_only", "split")
KW = {"alpha_tokens": 20_000, "beta_tokens": 80_000}


def _cluster(rng: random.Random, kept: bool) -> ClusterSnapshot:
    """A random cluster; `kept`: as the simulator keeps it (DE node sums of its engines, an engine-set key)."""
    engines, nodes = {}, {}
    n_pe, n_de = rng.randint(1, 2), rng.randint(2, 4)
    for nid in range(n_pe + n_de):
        role = "prefill" if nid < n_pe else "decode"
        nodes[nid] = NodeState(nid, role, read_queue_tokens=rng.randrange(0, 40_000))
        for _ in range(rng.randint(1, 3)):
            eid = len(engines)
            free = rng.randrange(0, 60_000) if role == "decode" else 0
            engines[eid] = EngineState(eid, role, nid, rng.randrange(0, 5), rng.randrange(0, 60_000), free)
    if kept:
        for n in nodes.values():
            es = [e for e in engines.values() if e.node_id == n.node_id]
            n.engine_tok, n.engine_free_hbm_tokens = sum(e.tok for e in es), sum(e.free_hbm_tokens for e in es)
    return ClusterSnapshot(0.0, engines, nodes, engine_set_key=0 if kept else None)


def _queue(rng: random.Random) -> list[PendingRequest]:
    out = []
    for i in range(rng.randint(1, 30)):
        prompt = rng.randint(1, 12_000)
        out.append(PendingRequest(i, i, 0, prompt, rng.randint(0, prompt), rng.randint(0, 1_000)))
    return out


class _Shifted(DualPathPolicy):
    """The README's recipe for a policy of one's own: work on `snapshot.copy()`, here DualPath on loads shifted by a
    research idea (a DE group made to look busier, another's HBM reserved)."""

    shift: dict = {}

    def schedule(self, snapshot, queue, fetching_node=None):
        s = snapshot.copy()
        for e in s.engines.values():
            tok, free = self.shift.get(e.engine_id, (0, 0))
            e.tok += tok
            e.free_hbm_tokens -= free
        return super().schedule(s, queue, fetching_node)


def _decisions(out):
    return [(a.request_id, a.prefill_engine, a.decode_engine, a.read_side, a.de_read_fraction) for a in out]


def test_a_policy_on_its_changed_copy_decides_the_same_in_the_simulator_and_the_runtime():
    """`ClusterSnapshot.copy()` kept the simulator's per-node engine sums but not its engine-set key; DE phase 1 took
    the sums as they were, so DualPath on a copy whose DE loads a custom policy had changed chose by the loads before
    the change in the simulator (which keeps the sums) and by the changed ones in the runtime (which keeps none):
    here DE 100 in the simulator, 101 in the runtime, for one request."""
    policy = _Shifted(make_policy("dualpath", **KW).config)
    policy.shift = {100: (1_000_000, 0)}  # DE group 10 made to look busier

    def cluster(kept):
        engines = {
            0: EngineState(0, "prefill", 0),
            100: EngineState(100, "decode", 10, tok=10, free_hbm_tokens=10**6),
            101: EngineState(101, "decode", 11, tok=20, free_hbm_tokens=10**6),
        }
        nodes = {0: NodeState(0, "prefill"), 10: NodeState(10, "decode"), 11: NodeState(11, "decode")}
        if kept:
            for n, e in ((10, engines[100]), (11, engines[101])):
                nodes[n].engine_tok, nodes[n].engine_free_hbm_tokens = e.tok, e.free_hbm_tokens
        return ClusterSnapshot(0.0, engines, nodes, engine_set_key=0 if kept else None)

    q = [PendingRequest(0, 0, 0, 1000, 960, 10)]
    assert [a.decode_engine for a in policy.schedule(cluster(False), q)] == [101]
    assert [a.decode_engine for a in policy.schedule(cluster(True), q)] == [101]


@pytest.mark.parametrize("name", DUALPATH_FAMILY)
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_property_copy_shifted_loads_decide_as_a_runtime_snapshot_of_those_loads(name, seed):
    """Property: DualPath (each variant) on a simulator-kept snapshot's copy whose engine loads were changed places
    exactly as on a runtime-built snapshot holding the changed loads (no sums, no key), and the simulator's live
    snapshot itself still gives what the runtime's gives (its sums are used, and equal)."""
    rng = random.Random(seed)
    kept = _cluster(random.Random(seed), kept=True)
    plain = _cluster(random.Random(seed), kept=False)
    queue = _queue(rng)
    fetch = rng.choice([None, *kept.nodes])
    cls = type(make_policy(name, **KW))
    assert _decisions(make_policy(name, **KW).schedule(kept, queue, fetch)) == _decisions(
        make_policy(name, **KW).schedule(plain, queue, fetch)
    )
    shift = {
        e.engine_id: (rng.randrange(0, 200_000), rng.randrange(0, 30_000))
        for e in kept.engines.values()
        if e.role == "decode" and rng.random() < 0.5
    }
    shifted = type("Shifted", (_Shifted, cls), {"shift": shift})(make_policy(name, **KW).config)
    for e in plain.engines.values():
        tok, free = shift.get(e.engine_id, (0, 0))
        e.tok += tok
        e.free_hbm_tokens -= free
    want = make_policy(name, **KW).schedule(ClusterSnapshot(0.0, plain.engines, plain.nodes), queue, fetch)
    assert _decisions(shifted.schedule(kept, queue, fetch)) == _decisions(want)


# ---- a trace of one's own: block hashes given as a list ----------------------------------------------------------
def _trace_trajs(as_list: bool):
    import numpy as np

    from dualpath_jax.workloads.types import Trajectory, Turn

    def turn(n_blocks, hashes, offset=None):
        h = list(hashes) if as_list else np.asarray(hashes, np.int64)
        return Turn(n_blocks * 512, 8, block_hashes=h, hash_block_size=512, arrival_offset_s=offset)

    return [
        Trajectory(0, [turn(6, range(1, 7))]),
        Trajectory(1, [turn(5, [1, 2, 3, 71, 72])], arrival_time=500.0),
        Trajectory(2, [turn(4, [1, 2, 81, 82]), turn(9, [1, 2, 81, 82, 83, 84, 85, 86, 87], 30.0)], arrival_time=700.0),
    ]


def test_block_hashes_given_as_a_list_count_shared_hits_as_an_array():
    """`Turn.block_hashes` from a list of ints (a trace converted by hand) was kept as the list: `stats.shared_hit_rate`
    (and the simulator's shared-prefix hits, mid-run) failed with "'list' object has no attribute 'tolist'". It is
    now the int64 array the loaders give, with the same hits."""
    from dualpath_jax.workloads.stats import shared_hit_rate, summarize

    want = shared_hit_rate(_trace_trajs(as_list=False))
    assert 0 < want < 1
    assert shared_hit_rate(_trace_trajs(as_list=True)) == want
    assert summarize(_trace_trajs(as_list=True)) == summarize(_trace_trajs(as_list=False))
    assert _trace_trajs(as_list=True)[1].turns[0].block_hashes.dtype.name == "int64"


def test_the_simulator_counts_shared_hits_of_list_block_hashes():
    """The simulator with `workload.shared_prefix_hits` on the same trajectories, hashes as lists or arrays."""
    import dataclasses

    from dualpath_jax.sim import load_sim_config
    from dualpath_jax.sim.runner import build_simulator

    cfg = load_sim_config("configs/sim_tiny.py:dualpath")
    cfg.workload = dataclasses.replace(cfg.workload, shared_prefix_hits=True)
    hits = []
    for as_list in (False, True):
        records, _, stats = build_simulator(cfg, _trace_trajs(as_list)).run()
        assert stats["unfinished_turns"] == 0
        hits.append(sorted((r.trajectory_id, r.turn_index, r.hit_tokens) for r in records))
    assert hits[0] == hits[1] and (1, 0, 3 * 512) in hits[0]


@pytest.mark.parametrize(
    "hashes",
    [[1.5, 2.0], [[1, 2]], ["a", "b"], [True, False], [2**64], [[1], [2, 3]]],
    ids=["float", "2-D", "str", "bool", "past-int64", "ragged"],
)
def test_block_hashes_that_are_no_integer_ids_are_refused(hashes):
    """Float, bool, string or 2-D block hashes were kept (1.5 and 1.0 as block ids; a 2-D array's rows went into the
    store's set as lists, a TypeError later); ids past int64 too. Each is a ValueError naming block_hashes."""
    from dualpath_jax.workloads.types import Turn

    with pytest.raises(ValueError, match="block_hashes"):
        Turn(1024, 8, block_hashes=hashes, hash_block_size=512)
