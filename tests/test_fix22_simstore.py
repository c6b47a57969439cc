"""A bounded KV store in the cluster simulator (`cluster.store_capacity_gb`; None: unbounded, as before).

The simulator modelled no bounded store: every earlier turn's KV could hit, so it could not say how large a store
DualPath's gain needs, and `experiments.bench_runtime`'s copy of a bounded-store run predicted an unbounded store's
hits. Each test here fails on the code before the knob (no such field).
"""

import dataclasses
import importlib.util
import math
import os

import numpy as np
import pytest

from dualpath_jax import compiled
from dualpath_jax.sim import load_sim_config, run
from dualpath_jax.sim.config import GB, sim_config_from_dict, validate_sim_config
from dualpath_jax.workloads.types import Trajectory, Turn, stored_kv_tokens
from schedulers.cost_model import MODEL_SHAPES

TINY = "configs/sim_tiny.py"


def _with(cfg, **cluster):
    return dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, **cluster))


def _rows(res):
    return [dataclasses.astuple(r) for r in res.records], list(res.links)


def _hits(res) -> dict:
    return {(r.trajectory_id, r.turn_index): r.hit_tokens for r in res.records}


@pytest.fixture(scope="module")
def tiny():
    cfg = load_sim_config(TINY)
    return cfg, run(cfg)


def test_none_is_the_unbounded_store_and_adds_no_keys(tiny):
    cfg, unbounded = tiny
    assert cfg.cluster.store_capacity_gb is None
    d = dataclasses.asdict(cfg)
    d["scheduler"] = {"name": d.pop("policy"), "kwargs": d.pop("policy_kwargs")}
    d["batcher"] = {"name": d.pop("batcher"), "kwargs": d.pop("batcher_kwargs")}
    d["cluster"].pop("store_capacity_gb")  # a recorded config from before the field
    old = sim_config_from_dict(d)
    assert old.cluster.store_capacity_gb is None
    assert _rows(run(old)) == _rows(unbounded)
    assert not [k for k in (*unbounded.stats, *unbounded.summary) if k.startswith("store_")]


def test_a_small_store_loses_hits_and_a_store_larger_than_everything_changes_nothing(tiny):
    cfg, unbounded = tiny
    big = run(_with(cfg, store_capacity_gb=1000.0))
    assert _rows(big) == _rows(unbounded)
    s = big.summary
    assert s["store_evicted_bytes"] == s["store_evicted_blocks"] == s["store_lost_lookups"] == 0
    # it holds every trajectory's whole blocks of its last turn's stored KV (prompt + generation but the last token)
    bs, b = cfg.cluster.block_size, MODEL_SHAPES.get(cfg.cluster.model).kv_bytes_per_token
    last = {}
    for r in big.records:
        kv = stored_kv_tokens(r.prompt_tokens, r.gen_tokens)
        last[r.trajectory_id] = max(last.get(r.trajectory_id, 0), kv // bs * bs)
    assert s["store_held_bytes"] == sum(last.values()) * b
    assert s["store_capacity_bytes"] == 1000.0 * GB

    small = run(_with(cfg, store_capacity_gb=1.0))
    s = small.summary
    assert s["hit_rate"] < unbounded.summary["hit_rate"] - 0.3
    assert s["store_evicted_bytes"] > 0 and s["store_lost_lookups"] > 0 and s["store_lost_hit_tokens"] > 0
    assert s["store_held_bytes"] <= 1.0 * GB
    full, cut = _hits(unbounded), _hits(small)
    assert all(cut[k] <= full[k] for k in full)  # never more than its own trajectory's context
    assert sum(full.values()) - sum(cut.values()) == s["store_lost_hit_tokens"]
    assert sum(1 for k in full if cut[k] < full[k]) == s["store_lost_lookups"]
    # what left the store plus what it holds is at most what the turns wrote (new whole blocks of each)
    written = sum(
        max(0, stored_kv_tokens(r.prompt_tokens, r.gen_tokens) // bs * bs - r.hit_tokens) for r in small.records
    )
    assert (s["store_evicted_bytes"] + s["store_held_bytes"]) / b <= written
    # the lost hits were computed instead: the SNIC read less
    assert (
        s["pe_read_bytes"] + s["de_read_bytes"]
        < unbounded.summary["pe_read_bytes"] + unbounded.summary["de_read_bytes"]
    )


def test_more_capacity_never_fewer_hit_tokens(tiny):
    cfg, unbounded = tiny
    hits = [sum(_hits(run(_with(cfg, store_capacity_gb=gb))).values()) for gb in (0.05, 0.3, 1.0, 2.0, 3.0, 6.0)]
    assert hits == sorted(hits) and hits[0] < hits[-1], hits
    assert hits[-1] <= sum(_hits(unbounded).values())


def _lru_run(a_gap: float):
    """A, B, C arrive at 0, 10, 20 s, each writing 704 tokens (11 blocks of 64 of its 704 tokens of stored KV: 641 + 64
    but the last generated token) at its first turn's decode; the store
    holds two of them (1.5 MB at 1,000 B/token). A's second turn (10 appended tokens, 1 generated: no new whole
    block, a lookup only) arrives `a_gap` s after its first; B's second turn at ~60 s; A's third 100 s after its
    second. (Each turn takes ~0.5 s.)"""
    cfg = _with(load_sim_config(TINY), kv_bytes_per_token=1000.0, store_capacity_gb=1.5e-3)
    first = Turn(append_tokens=641, gen_tokens=64, gap_s=a_gap)
    trajs = [
        Trajectory(0, [first, Turn(10, 1, gap_s=100.0), Turn(10, 1)], arrival_time=0.0),
        Trajectory(1, [Turn(641, 64, gap_s=50.0), Turn(10, 1)], arrival_time=10.0),
        Trajectory(2, [Turn(641, 64)], arrival_time=20.0),
    ]
    res = run(cfg, trajs)
    return res, {(r.trajectory_id, r.turn_index): r for r in res.records}


def test_the_least_recently_used_trajectory_loses_its_hits():
    # A's second turn comes after C wrote: A was the least recently used (B wrote after it), so A lost its blocks
    res, rec = _lru_run(a_gap=40.0)
    assert rec[0, 1].arrival > rec[2, 0].first_token
    assert rec[0, 1].hit_tokens == 0  # (its shape's hit: 704)
    # A's recomputed turn wrote its blocks again: B was the oldest and went; B's then C (older than A)
    assert rec[0, 1].finished < rec[1, 1].arrival
    assert rec[1, 1].hit_tokens == 0
    assert rec[0, 2].hit_tokens == 704
    assert res.summary["store_lost_lookups"] == 2 and res.summary["store_lost_hit_tokens"] == 2 * 704
    assert res.summary["store_evicted_blocks"] == 3 * 11 and res.summary["store_held_bytes"] == 2 * 704 * 1000

    # A's second turn looks its blocks up between B's write and C's: A is refreshed, B is the oldest and goes
    res, rec = _lru_run(a_gap=12.0)
    assert rec[1, 0].first_token < rec[0, 1].arrival < rec[2, 0].arrival
    assert rec[0, 1].hit_tokens == 704
    assert rec[1, 1].hit_tokens == 0
    # B's recomputed turn wrote its blocks again: A (refreshed at 12 s) was older than C and went; A's rewrite, C
    assert rec[0, 2].hit_tokens == 0
    assert res.summary["store_lost_lookups"] == 2 and res.summary["store_evicted_blocks"] == 3 * 11


def _hashed_agents(n: int = 12, turns: int = 4) -> list:
    """Agents whose every turn carries its prompt's hash blocks (as a trace's), the first 4 shared by a third of them."""
    rng = np.random.default_rng(3)
    out = []
    for a in range(n):
        own = [*(1000 * (a % 3) + j for j in range(4)), *(10**6 * (a + 1) + j for j in range(200))]
        ts, ctx = [], 0
        for _ in range(turns):
            append, gen = int(rng.integers(100, 700)), int(rng.integers(2, 80))
            prompt = ctx + append
            ts.append(Turn(append, gen, gap_s=float(rng.uniform(0, 3)), block_hashes=np.array(own[: prompt // 64]),
                           hash_block_size=64))  # fmt: skip
            ctx = prompt + gen
        out.append(Trajectory(a, ts, arrival_time=float(rng.uniform(0, 5))))
    return out


def test_compiled_and_python_simulators_agree_with_a_bounded_store(monkeypatch, tiny):
    from dualpath_jax.sim import simulator as sim_mod

    cfg = _with(tiny[0], store_capacity_gb=1.0)
    shared = _with(tiny[0], kv_bytes_per_token=1000.0, store_capacity_gb=4e-3)
    here = [run(cfg), run(shared, _hashed_agents())]
    # simulator.py loaded from its source as a module of its own (tests/test_compiled.py's twin)
    path = os.path.join(os.path.dirname(sim_mod.__file__), "simulator.py")
    spec = importlib.util.spec_from_file_location("_simstore_twin", path)
    twin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(twin)
    load = compiled.load
    monkeypatch.setattr(compiled, "load", lambda name: twin if name == "dualpath_jax.sim.simulator" else load(name))
    there = [run(cfg), run(shared, _hashed_agents())]
    assert type(twin.Simulator).__name__ == "type"  # the Python class, not the extension type
    for a, b in zip(here, there, strict=True):
        assert _rows(b) == _rows(a)
        assert {k: v for k, v in b.summary.items() if k.startswith("store_")} == {
            k: v for k, v in a.summary.items() if k.startswith("store_")
        }
        assert a.summary["store_evicted_bytes"] > 0 and a.summary["store_lost_lookups"] > 0


@pytest.mark.parametrize("bad", [0, 0.0, -1, math.nan, math.inf, "1GB", True])
def test_a_bad_capacity_is_refused_by_name(tiny, bad):
    with pytest.raises(ValueError, match=r"config\.cluster\.store_capacity_gb"):
        validate_sim_config(_with(tiny[0], store_capacity_gb=bad))
    with pytest.raises(ValueError, match=r"config\.cluster\.store_capacity_gb"):
        sim_config_from_dict({"cluster": {"store_capacity_gb": bad}})


def _shared_run(capacity_gb):
    """X, Z, Y, V arrive at 0, 10, 15, 25 s with hashed first turns (10 blocks written each: 640 + 64 tokens store 703
    tokens of KV; 1,000 B/token; 1.5 MB
    holds two): Y's prompt starts with X's first 3 hash blocks, V's with X's first 5."""
    cfg = _with(load_sim_config(TINY), kv_bytes_per_token=1000.0, store_capacity_gb=capacity_gb)
    ids = {
        0: [*range(1, 11)],
        1: [*range(201, 211)],
        2: [1, 2, 3, *range(301, 308)],
        3: [*range(1, 6), *range(401, 406)],
    }
    at = {0: 0.0, 1: 10.0, 2: 15.0, 3: 25.0}
    trajs = [
        Trajectory(k, [Turn(640, 64, block_hashes=np.array(v), hash_block_size=64)], arrival_time=at[k])
        for k, v in ids.items()
    ]
    return run(cfg, trajs)


def test_shared_prefix_hits_go_with_the_trajectories_that_hold_them():
    """A trace's block hashes (`workload.shared_prefix_hits`) hit across trajectories: bounded, a hash block stays
    while some trajectory in the store holds it."""
    unbounded = _shared_run(None)
    assert [r.hit_tokens for r in unbounded.records] == [0, 0, 192, 320]
    assert _rows(_shared_run(1000.0)) == _rows(unbounded)
    bounded = _shared_run(1.5e-3)
    # Y's write evicted X (the least recently used); Y holds X's first 3 blocks, so V hits those 3 and not 5
    assert [r.hit_tokens for r in bounded.records] == [0, 0, 192, 192]
    assert bounded.summary["store_evicted_blocks"] == 2 * 10  # (then V's evicted Z)
    # turns that hit other trajectories' blocks past their own context's, every turn hashed (a trace's): a store
    # larger than everything evicts nothing and gives the unbounded records
    cfg = _with(load_sim_config(TINY), kv_bytes_per_token=1000.0)
    unbounded = run(cfg, _hashed_agents())
    big = run(_with(cfg, store_capacity_gb=1.0), _hashed_agents())
    assert _rows(big) == _rows(unbounded)
    assert big.summary["store_evicted_bytes"] == 0 and big.summary["store_lost_lookups"] == 0
