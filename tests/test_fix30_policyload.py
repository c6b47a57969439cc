"""The DualPath policy's fetch in C without a per-fetch `_Scratch` (schedulers/_dualpath.pyx `phase1`, policies.py
`DualPathPolicy._schedule_c`): DE phase 1 in C equals the Python group sums and loops, and over random sequences of
fetches, placements and engine changes (a runner keeping one engine set, its EngineStates changed in place) the
compiled fetch places exactly as the Python loops, while the topology's cached group ranks stay equal to a
recomputation from scratch."""

from __future__ import annotations

import array
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schedulers import ClusterSnapshot, EngineState, NodeState, PendingRequest, make_policy, policies


def _c():
    if policies._dualpath_c is None:
        pytest.skip("schedulers._dualpath is not built in this install (DUALPATH_PURE_PYTHON=1 or no build)")
    return policies._dualpath_c


def _cluster(rng, n_pe_nodes, n_de_nodes, per_node, key=0, node_sums=True):
    """A runner's snapshot: PE nodes first, then DE nodes (engine ids in node order, shuffled dict order), with the
    nodes' engine sums kept when `node_sums` (the simulator's), and an engine-set key (None: a runtime's)."""
    engines, nodes = {}, {}
    eid = 0
    for nid in range(n_pe_nodes + n_de_nodes):
        role = "prefill" if nid < n_pe_nodes else "decode"
        nodes[nid] = NodeState(nid, role, read_queue_tokens=rng.choice([0, rng.randrange(0, 400_000)]))
        for _ in range(per_node):
            engines[eid] = EngineState(
                eid,
                role,
                nid,
                seq=rng.randrange(0, 5),
                tok=rng.choice([0, rng.randrange(0, 300_000)]),
                free_hbm_tokens=0 if role == "prefill" else rng.choice([rng.randrange(0, 50_000), 10**6]),
            )
            eid += 1
    items = list(engines.items())
    rng.shuffle(items)
    engines = dict(items)
    if node_sums:
        for n in nodes.values():
            mine = [e for e in engines.values() if e.node_id == n.node_id]
            n.engine_tok = sum(e.tok for e in mine)
            n.engine_free_hbm_tokens = sum(e.free_hbm_tokens for e in mine)
    return ClusterSnapshot(0.0, engines, nodes, engine_set_key=key)


def _queue(rng, first, n):
    out = []
    for i in range(first, first + n):
        p = rng.randrange(1, 40_000)
        out.append(PendingRequest(i, i, 0, p, rng.randrange(0, p + 1) // 64 * 64, rng.randrange(0, 2000)))
    return out


def _python_phase1(snapshot, lens, try_fast):
    """The reference: `_Scratch.group_sums` and `_phase1_ints` with the C loops off."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(policies, "_dualpath_c", None)
        s = policies._Scratch(snapshot, None, group_sums=True)
        group_tok, group_free = s.group_sums()
        got = policies.DualPathPolicy._phase1_ints(s.de_groups, group_tok, group_free, lens, try_fast)
    r_len, keys, heap, gids, shift, closed = got
    return r_len, dict(group_tok), list(keys), sorted(heap), shift, closed


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_groups=st.integers(1, 40),
    n_lens=st.sampled_from([0, 1, 7, 300, 1024]),
    node_sums=st.sampled_from(["kept", "none", "missing_one", "no_key"]),
    negative=st.booleans(),
    try_fast=st.booleans(),
)
def test_phase1_in_c_equals_the_python_group_sums_and_loops(seed, n_groups, n_lens, node_sums, negative, try_fast):
    """Every way the group sums are taken (the nodes' kept sums; None on a node, a group without a NodeState or no
    engine-set key: the engines' sums), free HBM small enough that groups close or large enough that none does,
    negative lengths (the assign-only loop is not tried), both loops: the same R, group loads, keys and heap."""
    c = _c()
    rng = random.Random(seed)
    snap = _cluster(rng, 1, n_groups, rng.choice([1, 2, 8]), key=None if node_sums == "no_key" else 5)
    for n in snap.nodes.values():  # kept sums that are not their engines' (which the policy takes matters)
        n.engine_tok += rng.randrange(0, 1000)
        n.engine_free_hbm_tokens -= rng.randrange(0, 40_000)
    if node_sums == "none":
        snap.nodes[1 + rng.randrange(n_groups)].engine_tok = None
    gids_all = [n for n, v in snap.nodes.items() if v.role == "decode"]
    if node_sums == "missing_one":  # after the engine set was checked and cached (its engines' sums are read)
        policies._topology(snap)
        del snap.nodes[gids_all[-1]]
    lens = [rng.randrange(-50 if negative else 0, 60_000) for _ in range(n_lens)]
    want = _python_phase1(snap, lens, try_fast)
    topo = policies._Topology(tuple(snap.engines.values()))
    for form in (list, lambda x: array.array("q", x)):  # a list, or a QueueWindow's array('q')
        r_len, group_tok, keys, heap, shift, closed = c.phase1(
            topo.gids, snap.nodes, snap.engine_set_key is not None, topo.group_states, form(lens), try_fast
        )
        assert (r_len, group_tok, list(keys), sorted(heap), shift, closed) == want


def test_phase1_in_c_refuses_what_the_python_loops_must_place():
    """Loads that are not ints (the tuple loop's), or keys and lengths beyond int64: refused before anything is
    returned, so the policy runs its Python loops on them."""
    c = _c()
    rng = random.Random(3)
    snap = _cluster(rng, 1, 3, 2)
    topo = policies._Topology(tuple(snap.engines.values()))
    args = (topo.gids, snap.nodes, True, topo.group_states)
    assert c.phase1(*args, [5, 6], True)[4] == 2  # three groups: two rank bits
    snap.nodes[2].engine_tok = 1.5
    with pytest.raises(TypeError):
        c.phase1(*args, [5, 6], True)
    snap.nodes[2].engine_tok = 2**62
    with pytest.raises(OverflowError):
        c.phase1(*args, [5], True)
    snap.nodes[2].engine_tok = 0
    for lens in ([5, 2**62], [2.5]):
        with pytest.raises((OverflowError, TypeError)):
            c.phase1(*args, lens, False)
    snap.nodes[2].engine_tok = None  # the engines' sums: one engine's free HBM beyond int64 in the sum
    topo.group_states[1][0].free_hbm_tokens = 2**63 - 1
    with pytest.raises(OverflowError):
        c.phase1(*args, [5], True)


def _commit(snap, out, queue):
    """A runner's placement of `out` (the simulator's `_assign`): engine loads and the kept node sums."""
    by_id = {r.request_id: r for r in queue}
    for a in out:
        r = by_id[a.request_id]
        pe, de = snap.engines[a.prefill_engine], snap.engines[a.decode_engine]
        pe.tok += r.prompt_tokens
        pe.seq += 1
        de.tok += r.total_tokens
        de.seq += 1
        de.free_hbm_tokens -= r.total_tokens
        for e, dt, df in ((pe, r.prompt_tokens, 0), (de, r.total_tokens, -r.total_tokens)):
            n = snap.nodes[e.node_id]
            if n.engine_tok is not None:
                n.engine_tok += dt
                n.engine_free_hbm_tokens += df
        side = snap.nodes[(de if a.read_side == "de" else pe).node_id]
        side.read_queue_tokens += r.hit_tokens


def _change(rng, snap):
    """Engines finishing work and read queues draining between fetches (in place, as the simulator does)."""
    for e in rng.sample(list(snap.engines.values()), min(6, len(snap.engines))):
        d = rng.randrange(0, e.tok + 1)
        e.tok -= d
        e.seq = max(0, e.seq - 1)
        n = snap.nodes[e.node_id]
        if n.engine_tok is not None:
            n.engine_tok -= d
        if e.role == "decode":
            f = rng.randrange(0, 30_000)
            e.free_hbm_tokens += f
            if n.engine_free_hbm_tokens is not None:
                n.engine_free_hbm_tokens += f
    for n in rng.sample(list(snap.nodes.values()), min(3, len(snap.nodes))):
        n.read_queue_tokens = rng.choice([0, rng.randrange(0, n.read_queue_tokens + 1)])


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=st.sampled_from([(1, 1, 1), (2, 3, 2), (3, 6, 4), (6, 12, 8)]),
    name=st.sampled_from(["dualpath", "de_only", "pe_only"]),
    node_sums=st.booleans(),
)
def test_fetch_sequences_place_as_the_python_loops(seed, shape, name, node_sums):
    """A runner's sequence of fetches (each node in turn and global ones, windows of the queue head), its
    placements committed into the same EngineStates and NodeStates, engines finishing work in between: the
    compiled policy (C fetch) and the Python one (no C) place the same requests on the same engines every fetch,
    and the cached topology (group ranks, their EngineStates) stays what a new one built from the engines says."""
    rng = random.Random(seed)
    pe_n, de_n, per = shape
    snaps = [_cluster(random.Random(seed), pe_n, de_n, per, key=1 if node_sums else None, node_sums=node_sums)]
    snaps.append(_cluster(random.Random(seed), pe_n, de_n, per, key=1 if node_sums else None, node_sums=node_sums))
    kw = {"alpha_tokens": rng.choice([1, 200_000]), "beta_tokens": rng.choice([300_000, 10**7])}
    mods = (policies._dualpath_c, None)
    pols = [make_policy(name, **kw) for _ in mods]
    queue = _queue(rng, 0, rng.choice([5, 80, 600]))
    n_nodes = pe_n + de_n
    for step in range(12):
        node = rng.choice([None, *range(n_nodes)])
        window = queue[: rng.choice([1, 64, 1024])]
        outs = []
        for mod, pol, snap in zip(mods, pols, snaps, strict=True):
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(policies, "_dualpath_c", mod)
                outs.append(pol.schedule(snap, window, fetching_node=node))
            topo = policies._TOPOLOGY_CACHE[0]
            fresh = policies._Topology(tuple(snap.engines.values()))
            assert topo.gids == fresh.gids == sorted(fresh.de_groups)
            assert all(map(list.__eq__, topo.group_states, fresh.group_states))  # the very same EngineStates
        assert outs[0] == outs[1], f"fetch {step} (node {node})"
        assert pols[0]._closed_last == pols[1]._closed_last
        placed = {a.request_id for a in outs[0]}
        change_seed = rng.random()
        for snap in snaps:  # the same placements and changes on both runners' states
            _commit(snap, outs[0], window)
            _change(random.Random(change_seed), snap)
        queue = [r for r in queue if r.request_id not in placed] + _queue(
            rng, 10_000 * (step + 1), rng.randrange(0, 40)
        )


def test_a_compiled_fetch_builds_no_scratch(monkeypatch):
    """The compiled fetch reads the loads in C: no `_Scratch` (two dicts of 96 group sums and four load dicts
    per fetch at 48P96D) is built; the Python loops, which need one, place the same."""
    _c()
    rng = random.Random(11)
    snap = _cluster(rng, 2, 4, 2, key=9)
    queue = _queue(rng, 0, 50)
    want = []
    for mod in (None, policies._dualpath_c):
        monkeypatch.setattr(policies, "_dualpath_c", mod)
        want.append(make_policy("dualpath", alpha_tokens=1, beta_tokens=10**7).schedule(snap, queue))

    class _NoScratch:
        def __init__(self, *a, **k):
            raise AssertionError("a _Scratch was built")

    monkeypatch.setattr(policies, "_Scratch", _NoScratch)
    got = [
        make_policy("dualpath", alpha_tokens=1, beta_tokens=10**7).schedule(snap, queue, fetching_node=n)
        for n in (None, 0, 3)
    ]
    assert got[0] == want[0] == want[1] and len(got[0]) >= 5
