"""Inter-engine policies: hand-built snapshots with known right decisions, and property tests."""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import schedulers
from schedulers import (
    POLICIES,
    ClusterSnapshot,
    DualPathConfig,
    EngineState,
    NodeState,
    PendingRequest,
    make_policy,
)
from schedulers.cost_model import CostModel

ALPHA, BETA = 10_000, 50_000

REPO = pathlib.Path(__file__).resolve().parents[1]  # run the CLIs from the repo root


def snapshot(pe_nodes, de_nodes):
    """pe_nodes / de_nodes: {node_id: (read_q, [engine dicts])}; engine dict: id, tok, seq, free."""
    engines, nodes = {}, {}
    for role, spec in (("prefill", pe_nodes), ("decode", de_nodes)):
        for nid, (rq, engs) in spec.items():
            nodes[nid] = NodeState(nid, role, read_queue_tokens=rq)
            for e in engs:
                engines[e["id"]] = EngineState(
                    e["id"],
                    role,
                    nid,
                    seq=e.get("seq", 0),
                    tok=e.get("tok", 0),
                    free_hbm_tokens=e.get("free", 10**9),
                )
    return ClusterSnapshot(now=0.0, engines=engines, nodes=nodes)


def req(i, prompt=1000, hit=900, gen=100):
    return PendingRequest(
        request_id=i, trajectory_id=i, turn_index=0, prompt_tokens=prompt, hit_tokens=hit, gen_tokens=gen
    )


def dualpath(**kw):
    kw.setdefault("alpha_tokens", ALPHA)
    kw.setdefault("beta_tokens", BETA)
    return make_policy("dualpath", **kw)


ONE_DE = {10: (0, [{"id": 100}])}


# ----------------------------------------------------------------------------------------- registry
def test_registry_names_and_unknown():
    assert {"basic", "round_robin", "dualpath", "de_only", "random", "split"} <= set(POLICIES.names())
    with pytest.raises(KeyError, match="known: basic"):
        make_policy("dualpth")
    with pytest.raises(TypeError, match="config fields"):
        make_policy("dualpath", alpha=3)
    assert {"fifo", "compute_quota"} <= set(schedulers.BATCHERS.names())


def test_schedulers_do_not_import_jax():
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", "import sys, schedulers, schedulers.pd_bounds; print('jax' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    assert out.stdout.strip() == "False"


def test_dualpath_config_from_cost_model():
    cm = CostModel("ds660b", "h800")
    cfg = DualPathConfig.from_cost_model(cm)
    # α: 3 s of one 400 Gbps SNIC over 48,068 B/token
    assert cfg.alpha_tokens == int(3.0 * 50e9 / 48_068)
    # β: 5 s of prompt tokens at the profiled turn shape
    t = cm.prefill_time(32_721, 429)
    assert cfg.beta_tokens == int(5.0 * (32_721 + 429) / t)
    assert DualPathConfig().alpha_tokens == cfg.alpha_tokens  # the default is the paper's setup
    p = make_policy("dualpath", config=cfg)
    assert p.config is cfg


# ----------------------------------------------------------------------------------- Algorithm 1 (PE)
def test_pe_overloaded_engines_skipped():
    # e0 sits on a short-queue node with the lowest tok but tok > β: it gets nothing.
    snap = snapshot(
        {0: (0, [{"id": 0, "tok": BETA + 1}]), 1: (ALPHA + 1, [{"id": 1, "tok": BETA}])},
        ONE_DE,
    )
    out = dualpath().schedule(snap, [req(0)])
    assert [a.prefill_engine for a in out] == [1]


def test_pe_all_overloaded_stops():
    snap = snapshot({0: (0, [{"id": 0, "tok": BETA + 1}, {"id": 1, "tok": BETA + 5}])}, ONE_DE)
    assert dualpath().schedule(snap, [req(0), req(1)]) == []


def test_pe_short_read_queue_preferred():
    # e0 is idle but its node's read queue is > α; e1 is busier on a node with read_q <= α.
    snap = snapshot({0: (ALPHA + 1, [{"id": 0, "tok": 0}]), 1: (ALPHA, [{"id": 1, "tok": 30_000}])}, ONE_DE)
    out = dualpath().schedule(snap, [req(0)])
    assert out[0].prefill_engine == 1


def test_pe_lowest_tok_within_class_and_updates():
    snap = snapshot({0: (0, [{"id": 0, "tok": 500}, {"id": 1, "tok": 300}])}, ONE_DE)
    out = dualpath().schedule(
        snap, [req(0, prompt=1000, hit=0), req(1, prompt=1000, hit=0), req(2, prompt=1000, hit=0)]
    )
    # 300 -> e1 (1300), then e0 (500 -> 1500), then e1 (1300 -> 2300)
    assert [a.prefill_engine for a in out] == [1, 0, 1]


def test_pe_falls_back_to_long_queue_nodes():
    snap = snapshot({0: (ALPHA + 1, [{"id": 0, "tok": 200}, {"id": 1, "tok": 100}])}, ONE_DE)
    out = dualpath().schedule(snap, [req(0)])
    assert out[0].prefill_engine == 1


def test_pe_tok_above_beta_after_assignment_stops_engine():
    snap = snapshot({0: (0, [{"id": 0, "tok": BETA - 10}])}, ONE_DE)
    out = dualpath().schedule(snap, [req(0, prompt=100, hit=0), req(1, prompt=100, hit=0)])
    assert len(out) == 1  # after the first, tok = β + 90 > β: the fetch stops


# --------------------------------------------------------------------------------------- DE phases
PE_IDLE = {0: (0, [{"id": 0}])}


def test_de_phase1_least_loaded_group():
    snap = snapshot(
        PE_IDLE,
        {10: (0, [{"id": 100, "tok": 1000}]), 11: (0, [{"id": 110, "tok": 0}, {"id": 111, "tok": 0}])},
    )
    out = dualpath().schedule(snap, [req(0)])
    assert out[0].decode_engine in (110, 111)


def test_de_phase2_prefers_fewest_seq_under_z():
    # Z = 1.05 * (300 + 5200) / 3 = 1925: d0 (300) and d1 (500) are under Z; d1 has the fewest seq.
    des = {
        10: (
            0,
            [
                {"id": 100, "tok": 0, "seq": 3},
                {"id": 101, "tok": 200, "seq": 1},
                {"id": 102, "tok": 5000, "seq": 0},
            ],
        )
    }
    out = dualpath().schedule(snapshot(PE_IDLE, des), [req(0, prompt=200, hit=0, gen=100)])
    assert out[0].decode_engine == 101


def test_de_z_slack_105():
    # len 100, tok [950, 0, 2000]: Z(1.0) = 1016.7 < 950 + 100 = 1050 <= Z(1.05) = 1067.5.
    des = {
        10: (
            0,
            [
                {"id": 100, "tok": 950, "seq": 0},
                {"id": 101, "tok": 0, "seq": 7},
                {"id": 102, "tok": 2000, "seq": 0},
            ],
        )
    }
    snap = snapshot(PE_IDLE, des)
    r = [req(0, prompt=60, hit=0, gen=40)]
    assert dualpath().schedule(snap, r)[0].decode_engine == 100  # with the slack d0 is under Z: fewest seq
    assert dualpath(z_slack=1.0).schedule(snap, r)[0].decode_engine == 101  # without it only d1 is


def test_de_no_z_candidate_falls_back_to_lowest_tok():
    des = {10: (0, [{"id": 100, "tok": 900, "seq": 0}, {"id": 101, "tok": 800, "seq": 5}])}
    out = dualpath().schedule(snapshot(PE_IDLE, des), [req(0, prompt=5000, hit=0, gen=0)])
    assert out[0].decode_engine == 101


def test_de_hbm_limits_respected_and_stop():
    des = {10: (0, [{"id": 100, "tok": 0, "free": 500}, {"id": 101, "tok": 9000, "free": 2000}])}
    snap = snapshot(PE_IDLE, des)
    out = dualpath().schedule(
        snap,
        [
            req(0, prompt=1000, hit=0, gen=100),
            req(1, prompt=1000, hit=0, gen=100),
            req(2, prompt=10, hit=0, gen=1),
        ],
    )
    # r0 only fits on d1; r1 fits nowhere -> stop (r2 is not placed out of order)
    assert [(a.request_id, a.decode_engine) for a in out] == [(0, 101)]


def test_read_side_shorter_queue():
    def side(pe_q, de_q):
        snap = snapshot({0: (pe_q, [{"id": 0}])}, {10: (de_q, [{"id": 100}])})
        a = dualpath(alpha_tokens=10**9).schedule(snap, [req(0)])[0]
        return a.read_side, a.de_read_fraction

    assert side(100, 50) == ("de", 1.0)
    assert side(50, 100) == ("pe", 0.0)
    assert side(70, 70) == ("pe", 0.0)


def test_read_queue_updates_within_a_fetch():
    # Equal queues: r0 reads on the PE side (tie); its 900 hit tokens lengthen the PE queue -> r1 reads DE-side.
    snap = snapshot({0: (0, [{"id": 0}, {"id": 1}])}, {10: (0, [{"id": 100}, {"id": 101}])})
    out = dualpath().schedule(snap, [req(0), req(1)])
    assert [a.read_side for a in out] == ["pe", "de"]


def test_snapshot_not_mutated():
    snap = snapshot({0: (0, [{"id": 0}])}, {10: (0, [{"id": 100, "free": 5000}])})
    before = dataclasses.asdict(snap)
    for name in POLICIES.names():
        make_policy(name).schedule(snap, [req(i) for i in range(3)])
    assert dataclasses.asdict(snap) == before


def test_pe_group_fetch_restricts_pes_only():
    snap = snapshot(
        {0: (0, [{"id": 0, "tok": 0}]), 1: (0, [{"id": 1, "tok": 10}])},
        {10: (0, [{"id": 100, "tok": 0}]), 11: (0, [{"id": 110, "tok": 50}])},
    )
    # PE group 1 fetches: Algorithm 1 over its own PEs (e1, though e0 is idler); DE phase 1 still picks the
    # least-loaded DE group (10), which is not tied to the fetching node.
    a = dualpath().schedule(snap, [req(0)], fetching_node=1)[0]
    assert (a.prefill_engine, a.decode_engine) == (1, 100)
    for name in ("basic", "de_only", "pe_only", "split"):
        kw = {"alpha_tokens": ALPHA, "beta_tokens": BETA} if name != "basic" else {}
        assert make_policy(name, **kw).schedule(snap, [req(0)], fetching_node=1)[0].prefill_engine == 1
    with pytest.raises(KeyError, match="fetching_node 7"):
        dualpath().schedule(snap, [req(0)], fetching_node=7)
    for name in POLICIES.names():  # every policy rejects an unknown fetching node
        with pytest.raises(KeyError, match="fetching_node 7"):
            make_policy(name).schedule(snap, [req(0)], fetching_node=7)


def test_de_group_fetch_places_on_the_less_loaded_other_group():
    """PAPER.md: on a DE group's fetch phase 1 drains the queue over ALL DE groups by Σ tok_e. Group 11
    fetches, but group 10 is less loaded: the requests go to group 10 until it is no longer the smaller."""
    snap = snapshot(
        {0: (0, [{"id": 0, "tok": 0}]), 1: (0, [{"id": 1, "tok": 10}])},
        {
            10: (0, [{"id": 100, "tok": 0}, {"id": 101, "tok": 0}]),
            11: (0, [{"id": 110, "tok": 1500}, {"id": 111, "tok": 1500}]),
        },
    )
    queue = [req(i, prompt=1000, hit=0, gen=0) for i in range(5)]  # len_r = 1000 each
    for fetch in (11, None):  # a DE group's fetch means the same as "consider all"
        out = dualpath().schedule(snap, queue, fetching_node=fetch)
        # Σ tok of g10: 0, 1000, 2000, then 3000 ties g11's 3000 (lower group id wins), then g10 = 4000 > 3000
        assert [snap.engines[a.decode_engine].node_id for a in out] == [10, 10, 10, 10, 11]
        # phase 2 inside group 10 alternates its two DEs (fewest seq under Z = 1.05·4000/2); the PE is chosen
        # among all PEs (the idler e0 first)
        assert [a.decode_engine for a in out] == [100, 101, 100, 101, 110]
        assert out[0].prefill_engine == 0
    # basic on a DE group's fetch: least-loaded DE over every group too
    out = make_policy("basic").schedule(snap, queue[:1], fetching_node=11)
    assert out[0].decode_engine == 100


def test_de_group_fetch_spreads_like_a_global_fetch():
    """Successive DE-group fetches, each placing one request and applying it, end up balanced over the DE
    groups, whichever group fetches (the old per-group scope piled each fetch onto the fetching group)."""
    pe = {0: (0, [{"id": 0}, {"id": 1}])}
    de = {10: (0, [{"id": 100}, {"id": 101}]), 11: (0, [{"id": 110}, {"id": 111}])}
    snap = snapshot(pe, de)
    policy = dualpath(beta_tokens=10**9)
    for i in range(8):  # group 11 fetches every time
        (a,) = policy.schedule(snap, [req(i, prompt=1000, hit=0, gen=0)], fetching_node=11)
        snap.engines[a.prefill_engine].tok += 1000
        snap.engines[a.decode_engine].tok += 1000
        snap.engines[a.decode_engine].seq += 1
    assert {e: snap.engines[e].tok for e in (100, 101, 110, 111)} == dict.fromkeys((100, 101, 110, 111), 2000)


def test_duplicate_request_ids_rejected():
    snap = snapshot(PE_IDLE, ONE_DE)
    with pytest.raises(ValueError, match="twice"):
        dualpath().schedule(snap, [req(0), req(0)])


def test_configs_reject_nan_and_out_of_range_values():
    """NaN passed the `x < 0` checks: a NaN β placed nothing, a NaN Z ignored seq_e, all silently."""
    nan = float("nan")
    for kw in ({"alpha_tokens": nan}, {"beta_tokens": nan}, {"beta_tokens": -1}):
        with pytest.raises(ValueError, match="alpha/beta must be >= 0"):
            DualPathConfig(**kw)
    for z in (nan, float("inf"), 0.9):
        with pytest.raises(ValueError, match="z_slack must be >= 1 and finite"):
            DualPathConfig(alpha_tokens=ALPHA, beta_tokens=BETA, z_slack=z)
    with pytest.raises(ValueError, match="block_size"):
        DualPathConfig(alpha_tokens=ALPHA, beta_tokens=BETA, block_size=nan)
    for cap in (nan, -1):  # NaN: no cap at all; negative: nothing is ever placed
        with pytest.raises(ValueError, match="max_pe_tokens"):
            make_policy("basic", max_pe_tokens=cap)
    for w in ({"read_window_s": 0}, {"compute_window_s": nan}):  # else α or β of 1 token
        with pytest.raises(ValueError, match="must be > 0"):
            DualPathConfig.from_cost_model(CostModel("ds660b", "h800"), **w)


def test_pending_request_rejects_impossible_token_counts():
    """A negative or hit > prompt request was placed and put a negative load on its PE or DE."""
    inf = float("inf")  # an infinite request never fits a DE: it held the head of the queue forever, silently
    for prompt, hit, gen in (
        (-5, 0, 0),
        (100, 200, 0),
        (100, -64, 0),
        (100, 64, -1),
        (100, float("nan"), 0),
        (inf, 0, 0),
        (100, 0, inf),
    ):
        with pytest.raises(ValueError, match="request 7: needs 0 <= hit_tokens <= prompt_tokens"):
            req(7, prompt=prompt, hit=hit, gen=gen)
    assert req(7, prompt=0, hit=0, gen=0).total_tokens == 0  # an empty turn is allowed
    assert req(7, prompt=128, hit=128, gen=0).miss_tokens == 0


def test_engine_and_node_roles_are_checked():
    """A misspelt role made a PE a decode engine (anything but "prefill" was grouped as a DE)."""
    with pytest.raises(ValueError, match="engine 3: role must be 'prefill' or 'decode', got 'Prefill'"):
        EngineState(3, "Prefill", 0)
    with pytest.raises(ValueError, match="node 0: role must be"):
        NodeState(0, "prefil")


def test_snapshot_loads_must_be_finite_and_non_negative():
    """NaN loads compare false both ways, inf swamps every sum and a negative tok_e / read_q looks idle: every policy
    placed on them silently (dualpath gave a DE with NaN free HBM a request, basic a PE with tok -1e6 both)."""
    nan, inf = float("nan"), float("inf")
    for bad in ({"tok": nan}, {"tok": -1_000_000}, {"tok": inf}, {"seq": -1}, {"free": nan}, {"free": -inf}):
        with pytest.raises(ValueError, match=r"engine 0: loads must be numbers, tok and seq >= 0 .*got"):
            snapshot({0: (0, [{"id": 0, **bad}])}, ONE_DE)
    with pytest.raises(ValueError, match="engine 0: loads must be numbers"):
        snapshot({0: (0, [{"id": 0, "tok": "5"}])}, ONE_DE)  # was "'<=' not supported" deep in a policy
    for rq in (nan, -1, inf):
        with pytest.raises(ValueError, match=r"node 0: read_queue_tokens and engine_tok must be >= 0"):
            snapshot({0: (rq, [{"id": 0}])}, ONE_DE)
    engines = {100: EngineState(100, "decode", 10)}
    for kw in ({"engine_tok": nan}, {"engine_tok": -5}, {"engine_free_hbm_tokens": inf}):
        with pytest.raises(ValueError, match="node 10: read_queue_tokens and engine_tok"):
            ClusterSnapshot(0.0, engines, {10: NodeState(10, "decode", **kw)})
    with pytest.raises(ValueError, match="engine 0: loads"):  # a runner that changes loads, then builds the snapshot
        engines = {0: EngineState(0, "prefill", 0)}
        engines[0].tok -= 10
        ClusterSnapshot(0.0, engines, {0: NodeState(0, "prefill")})
    # an over-committed DE (a request waiting at it for HBM: round_robin full_de="queue") has negative free HBM
    snap = snapshot(PE_IDLE, {10: (0, [{"id": 100, "free": -500}, {"id": 101}])})
    assert [a.decode_engine for a in dualpath().schedule(snap, [req(0)])] == [101]
    assert snap.copy().engines[100].free_hbm_tokens == -500


def test_assignment_read_side_is_checked():
    """A custom policy's misspelt read side ("PE", "both") was accepted and recorded as the turn's read side."""
    for side in ("PE", "both", ""):
        with pytest.raises(ValueError, match="read_side must be 'pe', 'de' or 'split', got"):
            schedulers.Assignment(1, 0, 100, side, 0.0)
    assert schedulers.Assignment(1, 0, 100, "split", 0.25).de_read_fraction == 0.25


@pytest.mark.parametrize("name", ["basic", "round_robin", "random", "dualpath", "split"])
def test_snapshot_engine_keys_and_nodes_are_checked(name):
    kw = {"alpha_tokens": ALPHA, "beta_tokens": BETA} if name in ("dualpath", "split") else {}
    snap = snapshot(PE_IDLE, ONE_DE)
    snap.engines[99] = snap.engines.pop(0)  # engine 0 under key 99: Assignments would name engine 0
    with pytest.raises(ValueError, match=r"snapshot.engines\[99\] holds engine_id 0"):
        make_policy(name, **kw).schedule(snap, [req(0)])
    snap = snapshot(PE_IDLE, ONE_DE)
    del snap.nodes[10]  # was a bare KeyError(10) from deep inside the placement loop
    with pytest.raises(KeyError, match=r"engines on nodes \[10\] that are not in snapshot.nodes"):
        make_policy(name, **kw).schedule(snap, [req(0)])
    # a DE on a PE node: it shared the PE node's read queue (dualpath read every hit on the PE side), silently
    snap = snapshot({0: (0, [{"id": 0}, {"id": 1}])}, {10: (50_000, [{"id": 100}])})
    snap.engines[1] = EngineState(1, "decode", 0, free_hbm_tokens=10**9)
    with pytest.raises(ValueError, match=r"engine 1 \(decode\) is on node 0 whose role is prefill"):
        make_policy(name, **kw).schedule(snap, [req(0)])


# ------------------------------------------------------------------------------------ other policies
def test_basic_reads_pe_side_least_loaded():
    snap = snapshot(
        {0: (0, [{"id": 0, "tok": 500}, {"id": 1, "tok": 100}])},
        {10: (0, [{"id": 100, "tok": 0, "free": 10}, {"id": 101, "tok": 70}])},
    )
    out = make_policy("basic").schedule(snap, [req(0)])
    assert (out[0].prefill_engine, out[0].decode_engine, out[0].read_side) == (1, 101, "pe")


def test_de_only_and_pe_only_sides():
    snap = snapshot({0: (0, [{"id": 0}])}, {10: (10**6, [{"id": 100}])})
    assert make_policy("de_only").schedule(snap, [req(0)])[0].read_side == "de"
    snap = snapshot({0: (10**6, [{"id": 0}])}, {10: (0, [{"id": 100}])})
    assert make_policy("pe_only").schedule(snap, [req(0)])[0].read_side == "pe"


def test_round_robin_cycles_and_alternates():
    snap = snapshot({0: (0, [{"id": 0}, {"id": 1}])}, {10: (0, [{"id": 100}, {"id": 101, "free": 0}, {"id": 102}])})
    out = make_policy("round_robin").schedule(snap, [req(i) for i in range(4)])
    assert [a.prefill_engine for a in out] == [0, 1, 0, 1]
    assert [a.decode_engine for a in out] == [100, 102, 100, 102]  # 101 has no room
    assert [a.read_side for a in out] == ["pe", "de", "pe", "de"]


def test_round_robin_full_de_wait_stops_at_the_de_in_turn():
    de = {10: (0, [{"id": 100}, {"id": 101, "free": 1500}, {"id": 102}])}
    snap = snapshot({0: (0, [{"id": 0}, {"id": 1}])}, de)
    rr = make_policy("round_robin", full_de="wait")
    out = rr.schedule(snap, [req(i) for i in range(4)])  # 1100 tokens each: 101 takes one, then is full
    assert [a.decode_engine for a in out] == [100, 101, 102, 100]
    out = rr.schedule(snap, [req(4, prompt=2000)])  # 101's turn, too small (the snapshot is unchanged): stop
    assert out == []
    out = rr.schedule(snap, [req(4, prompt=1000), req(5)])  # the rotation did not move: 101 again, then 102
    assert [a.decode_engine for a in out] == [101, 102]
    skip = make_policy("round_robin").schedule(snap, [req(i, prompt=2000) for i in range(3)])
    assert [a.decode_engine for a in skip] == [100, 102, 100]  # "skip" (default) passes over 101
    with pytest.raises(ValueError, match="full_de must be skip/wait"):
        make_policy("round_robin", full_de="block")


def test_round_robin_rotates_globally_over_fetches_of_different_nodes():
    snap = snapshot(
        {0: (0, [{"id": 0}, {"id": 1}]), 1: (0, [{"id": 2}, {"id": 3}])},
        {10: (0, [{"id": 100}, {"id": 101}]), 11: (0, [{"id": 110}, {"id": 111}, {"id": 112}])},
    )
    rr = make_policy("round_robin")
    got, rid = [], 0
    for fetch in [0, 1, 10, 11, 1, 0, 11]:  # one request per fetch, nodes of both roles fetching in turn
        (a,) = rr.schedule(snap, [req(rid)], fetching_node=fetch)
        got.append((a.prefill_engine, a.decode_engine))
        rid += 1
    assert [p for p, _ in got] == [0, 1, 2, 3, 0, 1, 2]
    assert [d for _, d in got] == [100, 101, 110, 111, 112, 100, 101]
    # one PE group's fetch of 5 requests still spreads over every PE (not just its own 2)
    out = make_policy("round_robin").schedule(snap, [req(i) for i in range(5)], fetching_node=1)
    assert [a.prefill_engine for a in out] == [0, 1, 2, 3, 0]
    assert [a.decode_engine for a in out] == [100, 101, 110, 111, 112]


def test_round_robin_rotation_survives_a_dead_node():
    pe = {0: (0, [{"id": 0}, {"id": 1}]), 1: (0, [{"id": 2}, {"id": 3}]), 2: (0, [{"id": 4}, {"id": 5}])}
    rr = make_policy("round_robin")
    out = rr.schedule(snapshot(pe, ONE_DE), [req(0), req(1), req(2)], fetching_node=0)
    assert [a.prefill_engine for a in out] == [0, 1, 2]
    del pe[0]  # node 0 died: the rotation goes on after engine 2 (a position index would jump to engine 5)
    out = rr.schedule(snapshot(pe, ONE_DE), [req(3), req(4), req(5), req(6)], fetching_node=2)
    assert [a.prefill_engine for a in out] == [3, 4, 5, 2]


def test_random_ignores_the_fetching_node():
    snap = snapshot({0: (0, [{"id": 0}, {"id": 1}]), 1: (0, [{"id": 2}, {"id": 3}])}, ONE_DE)
    a = make_policy("random", seed=1).schedule(snap, [req(i) for i in range(40)], fetching_node=0)
    b = make_policy("random", seed=1).schedule(snap, [req(i) for i in range(40)], fetching_node=None)
    assert a == b and {x.prefill_engine for x in a} == {0, 1, 2, 3}


def test_random_is_seeded_and_respects_room():
    snap = snapshot(
        {0: (0, [{"id": i} for i in range(4)])}, {10: (0, [{"id": 100, "free": 0}, {"id": 101}, {"id": 102}])}
    )
    a = make_policy("random", seed=3).schedule(snap, [req(i) for i in range(20)])
    b = make_policy("random", seed=3).schedule(snap, [req(i) for i in range(20)])
    assert a == b and len(a) == 20
    assert all(x.decode_engine != 100 for x in a)
    assert len({x.prefill_engine for x in a}) > 1


def test_split_balances_read_queues():
    snap = snapshot({0: (0, [{"id": 0}])}, {10: (0, [{"id": 100}])})
    a = make_policy("split", block_size=1).schedule(snap, [req(0, prompt=1100, hit=1000)])[0]
    assert a.read_side == "split" and a.de_read_fraction == pytest.approx(0.5)
    # PE queue already 600 longer: x = (600 + 1000 - 0) / 2 = 800 blocks of 64 rounded -> DE reads ~800
    snap = snapshot({0: (600, [{"id": 0}])}, {10: (0, [{"id": 100}])})
    a = make_policy("split").schedule(snap, [req(0, prompt=1100, hit=1024)])[0]
    de_tokens = a.de_read_fraction * 1024
    assert de_tokens % 64 == 0 and abs((600 + 1024 - de_tokens) - de_tokens) <= 64
    # PE queue far longer: everything DE-side
    snap = snapshot({0: (10**6, [{"id": 0}])}, {10: (0, [{"id": 100}])})
    assert make_policy("split").schedule(snap, [req(0)])[0].read_side == "de"


# ------------------------------------------------------------------------------------ property tests
@st.composite
def cluster_and_queue(draw):
    n_pe_nodes = draw(st.integers(1, 3))
    n_de_nodes = draw(st.integers(1, 3))
    eid = 0
    pe, de = {}, {}
    for n in range(n_pe_nodes):
        engs = []
        for _ in range(draw(st.integers(1, 3))):
            engs.append({"id": eid, "tok": draw(st.integers(0, 2 * BETA)), "seq": draw(st.integers(0, 5))})
            eid += 1
        pe[n] = (draw(st.integers(0, 3 * ALPHA)), engs)
    for n in range(n_pe_nodes, n_pe_nodes + n_de_nodes):
        engs = []
        for _ in range(draw(st.integers(1, 3))):
            engs.append(
                {
                    "id": eid,
                    "tok": draw(st.integers(0, 50_000)),
                    "seq": draw(st.integers(0, 5)),
                    "free": draw(st.integers(0, 40_000)),
                }
            )
            eid += 1
        de[n] = (draw(st.integers(0, 3 * ALPHA)), engs)
    queue = []
    for i in range(draw(st.integers(0, 25))):
        prompt = draw(st.integers(1, 20_000))
        hit = draw(st.integers(0, prompt))
        queue.append(req(1000 + i, prompt=prompt, hit=hit, gen=draw(st.integers(0, 2000))))
    fetch = draw(st.sampled_from([None] + list(pe) + list(de)))
    return snapshot(pe, de), queue, fetch


@pytest.mark.parametrize("name", ["basic", "round_robin", "dualpath", "de_only", "pe_only", "random", "split"])
@settings(max_examples=60, deadline=None)
@given(data=cluster_and_queue())
def test_policy_invariants(name, data):
    snap, queue, fetch = data
    kw = {"alpha_tokens": ALPHA, "beta_tokens": BETA} if name in ("dualpath", "de_only", "pe_only", "split") else {}
    before = dataclasses.asdict(snap)
    out = make_policy(name, **kw).schedule(snap, queue, fetching_node=fetch)
    assert dataclasses.asdict(snap) == before
    ids = [a.request_id for a in out]
    # FIFO prefix, no request lost from the prefix, none assigned twice
    assert ids == [r.request_id for r in queue[: len(out)]]
    by_id = {r.request_id: r for r in queue}
    used = {}
    for a in out:
        pe, de = snap.engines[a.prefill_engine], snap.engines[a.decode_engine]
        assert pe.role == "prefill" and de.role == "decode"
        # only a PE group's fetch restricts anything: its PEs, for the policies that run Algorithm 1 / basic
        if fetch is not None and snap.nodes[fetch].role == "prefill" and name not in ("round_robin", "random"):
            assert pe.node_id == fetch
        used[de.engine_id] = used.get(de.engine_id, 0) + by_id[a.request_id].total_tokens
        assert used[de.engine_id] <= de.free_hbm_tokens  # DE HBM respected
    if name in ("dualpath", "de_only", "pe_only", "split"):
        tok = {e.engine_id: e.tok for e in snap.engines.values()}
        for a in out:  # Algorithm 1: no PE above β at the moment it gets a request
            assert tok[a.prefill_engine] <= BETA
            tok[a.prefill_engine] += by_id[a.request_id].prompt_tokens


def test_paper_scale_group_fetch():
    """A 1,152-GPU cluster (48 PE + 96 DE nodes of 8), 5,000 waiting: one PE group's fetch fills each of its
    PEs up to β and nothing else (the fetch cost is measured by `python -m schedulers.bench`)."""
    pe = {n: (n * 1000, [{"id": n * 8 + k, "tok": (n * 8 + k) * 37 % 20_000} for k in range(8)]) for n in range(48)}
    de = {n: (0, [{"id": n * 8 + k, "tok": 0, "free": 400_000} for k in range(8)]) for n in range(48, 144)}
    snap = snapshot(pe, de)
    queue = [req(i, prompt=33_000, hit=32_500, gen=176) for i in range(5000)]
    beta = 1_700_000
    out = dualpath(alpha_tokens=3_000_000, beta_tokens=beta).schedule(snap, queue, fetching_node=3)
    # a PE keeps taking requests while its tok <= β: floor((β - tok0) / 33,000) + 1 each
    want = {e: (beta - snap.engines[e].tok) // 33_000 + 1 for e in range(24, 32)}
    got = {}
    for a in out:
        got[a.prefill_engine] = got.get(a.prefill_engine, 0) + 1
    assert got == want
    assert len({a.decode_engine for a in out}) > 96  # spread over the DE groups


def reference_dualpath(snap, queue, alpha, beta, slack, fetch):
    """A direct, slow transcription of PAPER.md "Scheduler" to check the optimised policy against."""
    pe_node = fetch if fetch is not None and snap.nodes[fetch].role == "prefill" else None
    # a PE group's fetch: that group's PEs; every DE group always (phase 1 over all groups)
    engines = [
        e for e in snap.engines.values() if not (e.role == "prefill" and pe_node is not None and e.node_id != pe_node)
    ]
    tok = {e.engine_id: e.tok for e in engines}
    seq = {e.engine_id: e.seq for e in engines}
    free = {e.engine_id: e.free_hbm_tokens for e in engines}
    node = {e.engine_id: e.node_id for e in engines}
    rq = {n.node_id: n.read_queue_tokens for n in snap.nodes.values()}
    pes = sorted(e.engine_id for e in engines if e.role == "prefill")
    groups = {}
    for e in sorted(engines, key=lambda e: e.engine_id):
        if e.role == "decode":
            groups.setdefault(e.node_id, []).append(e.engine_id)
    if not pes or not groups:
        return []
    # DE phase 1 over the whole queue
    load = {g: sum(tok[e] for e in es) for g, es in groups.items()}
    group_of, group_queue = [], {g: [] for g in groups}
    for r in queue:
        g = min(groups, key=lambda g: (load[g], g))
        group_of.append(g)
        group_queue[g].append(r)
        load[g] += r.total_tokens
    z = {}
    for g, es in groups.items():
        cap, used = sum(free[e] for e in es), 0
        for r in group_queue[g]:
            if used + r.total_tokens > cap:
                break
            used += r.total_tokens
        z[g] = slack * (used + sum(tok[e] for e in es)) / len(es)
    out = []
    for r, g in zip(queue, group_of, strict=True):
        ok = [e for e in pes if tok[e] <= beta]
        short = [e for e in ok if rq[node[e]] <= alpha]
        pool = short or ok
        if not pool:
            break
        pe = min(pool, key=lambda e: (tok[e], e))
        fits = [e for e in groups[g] if free[e] >= r.total_tokens]
        if not fits:
            break
        under = [e for e in fits if tok[e] + r.total_tokens <= z[g]]
        de = min(under, key=lambda e: (seq[e], tok[e], e)) if under else min(fits, key=lambda e: (tok[e], e))
        side = "de" if rq[node[de]] < rq[node[pe]] else "pe"
        tok[pe] += r.prompt_tokens
        seq[pe] += 1
        tok[de] += r.total_tokens
        seq[de] += 1
        free[de] -= r.total_tokens
        rq[node[pe if side == "pe" else de]] += r.hit_tokens
        out.append((r.request_id, pe, de, side))
    return out


@settings(max_examples=150, deadline=None)
@given(data=cluster_and_queue(), slack=st.sampled_from([1.0, 1.05, 1.5]))
def test_dualpath_matches_reference_transcription(data, slack):
    snap, queue, fetch = data
    got = dualpath(z_slack=slack).schedule(snap, queue, fetching_node=fetch)
    want = reference_dualpath(snap, queue, ALPHA, BETA, slack, fetch)
    assert [(a.request_id, a.prefill_engine, a.decode_engine, a.read_side) for a in got] == want


# ------------------------------------------------------------------------- fast paths, same decisions
def _random_cluster(seed, pe_nodes=6, de_nodes=12, g=4, free_hi=2_000_000, as_float=False):
    import random

    rng = random.Random(seed)
    num = float if as_float else int
    pes = {
        n: (rng.randrange(0, 3 * ALPHA), [{"id": n * g + i, "tok": num(rng.randrange(0, 2 * BETA))} for i in range(g)])
        for n in range(pe_nodes)
    }
    des = {}
    for n in range(pe_nodes, pe_nodes + de_nodes):
        engs = [
            {
                "id": n * g + i,
                "tok": num(rng.randrange(0, 900_000)),
                "seq": rng.randrange(0, 40),
                "free": num(rng.randrange(0, free_hi)),
            }
            for i in range(g)
        ]
        des[n] = (rng.randrange(0, 3 * ALPHA), engs)
    queue = [
        req(i, prompt=(p := rng.randrange(1, 40_000)), hit=p // 2, gen=rng.randrange(0, 2_000)) for i in range(300)
    ]
    return snapshot(pes, des), queue


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("free_hi", [60_000, 2_000_000])  # small: groups' R close inside the window
def test_dualpath_phase1_int_fast_path_equals_tuple_path(seed, free_hi):
    """Integer loads take the packed-int phase 1 (when no group's R closes); the same loads as floats take
    the (load, gid) tuple loop. Both must place the same requests on the same engines."""
    snap_i, queue = _random_cluster(seed, free_hi=free_hi)
    snap_f, _ = _random_cluster(seed, free_hi=free_hi, as_float=True)
    for name in ("dualpath", "split", "de_only"):
        pol = make_policy(name, alpha_tokens=ALPHA, beta_tokens=BETA)
        for fetching in (None, 0, 3, 7, 15):
            a_i = pol.schedule(snap_i, queue, fetching_node=fetching)
            a_f = pol.schedule(snap_f, queue, fetching_node=fetching)
            assert a_i == a_f
            if fetching is None and free_hi > 10**6:
                assert a_i  # the case places something


def test_dualpath_phase1_on_packed_ints_closes_groups_like_the_tuple_loop():
    from schedulers.policies import DualPathPolicy

    groups = {10: [100], 11: [101]}
    tok = {10: 0, 11: 5}
    lens = [4, 4, 4]
    phase1 = DualPathPolicy._phase1_ints

    def gids_of(res):
        r_len, keys, _, gids, shift, closed = res
        return r_len, [gids[k & ((1 << shift) - 1)] for k in keys], closed

    for fast in (True, False):  # the assign-only loop and the closing loop agree when nothing closes
        assert gids_of(phase1(groups, tok, {10: 100, 11: 100}, lens, fast)) == ({10: 8, 11: 4}, [10, 10, 11], False)
        # equal loads: the lower gid first
        assert gids_of(phase1(groups, {10: 0, 11: 0}, {10: 100, 11: 100}, lens, fast))[1] == [10, 11, 10]
        # group 10's R closes at its second request (4 + 4 > 7): R = the first one; then 11 closes too
        # (4 + 4 > 6) and phase 1 stops there: later requests get their group lazily from the heap
        r_len, got, closed = gids_of(phase1(groups, tok, {10: 7, 11: 6}, lens + [4, 4], fast))
        assert (r_len, got, closed) == ({10: 4, 11: 4}, [10, 10, 11, 10, 11], True)
    assert phase1(groups, {10: 0.0, 11: 5}, {10: 100, 11: 100}, lens, True) is None  # float loads: tuple loop


def test_topology_cache_follows_a_changed_engine_set():
    pol = dualpath()
    snap = snapshot({0: (0, [{"id": 0}])}, {10: (0, [{"id": 100, "tok": 10}])})
    assert [a.decode_engine for a in pol.schedule(snap, [req(0)])] == [100]
    # same snapshot object, a new idle DE group: the cached topology must not hide it
    snap.nodes[11] = NodeState(11, "decode")
    snap.engines[101] = EngineState(101, "decode", 11, free_hbm_tokens=10**9)
    assert [a.decode_engine for a in pol.schedule(snap, [req(1)])] == [101]
    # an engine moved to another node (a new EngineState object for the same id)
    snap.engines[101] = EngineState(101, "decode", 10, tok=10**6, free_hbm_tokens=10**9)
    snap.nodes.pop(11)
    out = pol.schedule(snap, [req(2)])
    assert [a.decode_engine for a in out] == [100]


# ------------------------------------------------- optional runner-kept fields: same decisions, fewer reads
def _with_runner_fields(snap):
    """The snapshot as the simulator keeps it: per-node engine sums and an engine-set key."""
    for n in snap.nodes.values():
        engs = [e for e in snap.engines.values() if e.node_id == n.node_id]
        n.engine_tok = sum(e.tok for e in engs)
        n.engine_free_hbm_tokens = sum(e.free_hbm_tokens for e in engs)
    snap.engine_set_key = 7
    return snap


def _window(queue):
    from schedulers.api import QueueWindow

    return QueueWindow(queue, [r.request_id for r in queue], [r.total_tokens for r in queue])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("free_hi", [60_000, 2_000_000])
def test_runner_kept_sums_and_queue_window_give_the_same_decisions(seed, free_hi):
    snap, queue = _random_cluster(seed, free_hi=free_hi)
    kept, _ = _random_cluster(seed, free_hi=free_hi)
    kept = _with_runner_fields(kept)
    for name in ("dualpath", "split", "de_only", "pe_only", "basic", "round_robin", "random"):
        kw = {"alpha_tokens": ALPHA, "beta_tokens": BETA} if name not in ("basic", "round_robin", "random") else {}
        plain, fast = make_policy(name, **kw), make_policy(name, **kw)
        for fetching in (None, 0, 3, 7, 15, 0):
            assert plain.schedule(snap, queue, fetching_node=fetching) == fast.schedule(
                kept, _window(queue), fetching_node=fetching
            )


def test_runner_kept_sums_are_what_phase1_uses():
    """With sums on the nodes, DE phase 1 takes them as they are (a runner that lets them drift from its
    engines' loads gets other decisions: the test that the simulator keeps them exact lives in test_sim_e2e)."""
    snap = snapshot({0: (0, [{"id": 0}])}, {10: (0, [{"id": 100, "tok": 10}]), 11: (0, [{"id": 101, "tok": 20}])})
    assert [a.decode_engine for a in dualpath().schedule(snap, [req(0)])] == [100]
    _with_runner_fields(snap)
    snap.nodes[10].engine_tok = 30  # says group 10 is the busier one
    assert [a.decode_engine for a in dualpath().schedule(snap, [req(0)])] == [101]
    snap.nodes[10].engine_tok = None  # one node without sums: every group is summed from its engines
    assert [a.decode_engine for a in dualpath().schedule(snap, [req(0)])] == [100]


def test_queue_window_checks_lengths_and_duplicates():
    from schedulers.api import QueueWindow

    q = [req(0), req(1)]
    with pytest.raises(ValueError, match="one request_id and one total_tokens"):
        QueueWindow(q, [0], [1100, 1100])
    with pytest.raises(ValueError, match="same request_id twice"):
        dualpath().schedule(snapshot({0: (0, [{"id": 0}])}, ONE_DE), QueueWindow(q, [0, 0], [1100, 1100]))


def test_queue_window_over_a_longer_live_queue():
    """A runner passes its live deque (longer than the window) and int arrays: the window shows only its first
    len(request_ids) requests, and every policy places the same as with a plain list of them."""
    from array import array
    from collections import deque

    from schedulers.api import QueueWindow

    queue = [req(i) for i in range(6)]
    w = QueueWindow(deque(queue), array("q", [r.request_id for r in queue[:4]]), array("q", [1100] * 4))
    assert len(w) == 4 and list(w) == queue[:4] and w[-1] is queue[3] and w[1:3] == queue[1:3]
    with pytest.raises(IndexError, match="out of range"):
        w[4]
    with pytest.raises(ValueError, match="one request_id and one total_tokens"):
        QueueWindow(deque(queue[:2]), [0, 1, 2], [1, 1, 1])  # a window longer than the queue
    snap = snapshot({0: (0, [{"id": 0}, {"id": 1}])}, {10: (0, [{"id": 100}, {"id": 101}])})
    for name in ("basic", "round_robin", "dualpath"):
        expected = make_policy(name).schedule(snap, queue[:4])
        assert make_policy(name).schedule(snap, w) == expected


def test_engine_set_key_reuses_the_topology_and_copy_drops_it():
    from schedulers import policies

    pol = dualpath()
    snap = _with_runner_fields(snapshot({0: (0, [{"id": 0}])}, {10: (0, [{"id": 100}])}))
    pol.schedule(snap, [req(0)])
    topo = policies._TOPOLOGY_CACHE[0]
    pol.schedule(snap, [req(1)])
    assert policies._TOPOLOGY_CACHE[0] is topo and topo.key == 7
    cp = snap.copy()
    assert cp.engine_set_key is None and cp.nodes[10].engine_tok == snap.nodes[10].engine_tok
    # the copy holds new EngineState objects: its loads are read, not the cached objects'
    cp.engines[100].free_hbm_tokens = 0
    cp.nodes[10].engine_free_hbm_tokens = 0
    assert pol.schedule(cp, [req(2)]) == []
    # a new key on the same dict: re-checked (same objects: the same topology is kept)
    snap.engine_set_key = 8
    pol.schedule(snap, [req(3)])
    assert policies._TOPOLOGY_CACHE[0] is not topo or topo.key == 8


def test_policy_bench_launcher_runs_small():
    """schedulers.bench end to end on a small synthetic cluster: every policy fetches, and the storage-NIC balance it
    leaves (a seeded, static proxy: hit tokens queued per node) orders as the paper's: DualPath's scheduler evens
    the read queues more than round-robin, round-robin more than basic's PE-only reads."""
    import re
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "schedulers.bench", "--pe_nodes=2", "--de_nodes=4", "--queue=300", "--repeats=1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {m.group(1): m.group(2).split() for m in re.finditer(r"^(\w+)\s+([\d. ]+)$", out.stdout, re.M)}
    assert set(rows) == {"basic", "round_robin", "random", "dualpath", "de_only", "split"}
    balance = {name: float(cols[-1]) for name, cols in rows.items()}
    assert balance["dualpath"] < balance["round_robin"] < balance["basic"]
    assert all(int(cols[1]) > 0 for cols in rows.values())  # requests placed by a group fetch


def test_policy_bench_launcher_refuses_empty_runs():
    """--repeats=0 failed with a StatisticsError after building the cluster; 0 nodes printed a table of zeros."""
    import subprocess
    import sys

    for flag in ("--repeats=0", "--pe_nodes=0", "--g=0"):
        cmd = [sys.executable, "-m", "schedulers.bench", "--pe_nodes=1", "--de_nodes=1", "--queue=5", flag]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
        assert out.returncode != 0 and "is not a positive integer" in out.stderr, (flag, out.stderr[-2000:])
