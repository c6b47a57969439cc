"""Exact boundary values of the simulator (helper fix33 "edgesim", session 50): valid inputs at an edge, each checked
against a hand computation (/work/notes/fix33_edgesim_report.md)."""

from __future__ import annotations

from dualpath_jax import compiled
from dualpath_jax.sim import load_sim_config, run
from dualpath_jax.sim.runner import build_simulator
from dualpath_jax.workloads.types import Trajectory, Turn

TINY = "configs/sim_tiny.py"
B = 240.0  # KV bytes per token where N x B / 1e9 GB x 1e9 / B floors to N - 1 for N = 1,024 (and 2,048)


def _gb(tokens: int) -> float:
    """The GB of exactly `tokens` tokens' KV at B per token, as a config gives a room (bench_runtime's de_hbm_kv_gb)."""
    return tokens * B / 1e9


def _run(over: dict, trajs: list) -> tuple:
    cfg = load_sim_config(f"{TINY}:dualpath", {"cluster.kv_bytes_per_token": B, **over})
    sim = build_simulator(cfg, trajs)
    records, _, stats = sim.run()
    assert stats["unfinished_turns"] == 0
    return sim, list(records), stats


def _agents(n: int, *turns) -> list:
    return [Trajectory(i, [Turn(a, g) for a, g in turns]) for i in range(n)]


def test_a_room_of_whole_tokens_given_in_gb_holds_them_all():
    """N tokens' bytes in GB were N - 1 tokens of room (the quotient 1023.9999999999999 floored): now N, and a room
    between whole tokens still floors."""
    _room_tokens = compiled.load("dualpath_jax.sim.simulator")._room_tokens  # (the runner's: compiled, or the source)
    assert (1024 * B / 1e9) * 1e9 / B < 1024  # (the rounding this is about)
    for n in (1, 43, 1024, 2048, 12_345, 10**9):
        assert _room_tokens(_gb(n), B, "de_hbm_kv_gb") == n
    assert _room_tokens(_gb(1024) + 0.5 * B / 1e9, B, "de_hbm_kv_gb") == 1024  # half a token more: still 1,024
    assert _room_tokens(_gb(1024) - 0.5 * B / 1e9, B, "de_hbm_kv_gb") == 1023


def test_a_turn_of_exactly_a_des_room_runs():
    """A turn whose prompt + generation is exactly the DE's KV room was refused as larger than it."""
    _, records, _ = _run({"cluster.de_hbm_kv_gb": _gb(1024)}, _agents(1, (1000, 24)))
    assert [r.prompt_tokens + r.gen_tokens for r in records] == [1024]


def test_two_turns_of_half_a_des_room_each_decode_together():
    """One DE of 2,048 tokens' room takes two turns of 1,024 at once: the second waited for the first's decode."""
    sim, records, _ = _run({"cluster.de_hbm_kv_gb": _gb(2048), "cluster.gpus_per_node": 1}, _agents(2, (1000, 24)))
    assert len(sim.des) == 1
    assert [r.read_start for r in records] == [r.scheduled for r in records] == [0.0, 0.0]  # no allocation wait
    assert records[1].first_token < records[0].finished  # decoding beside the first


def test_a_store_of_exactly_a_trajectorys_blocks_keeps_them():
    """A store of exactly the 1,024 tokens turn 0 writes kept none of them (a room of 1,023): turn 1 lost its hit.
    (1,001 + 24 tokens: 1,024 of KV stored, all but the last generated token's)"""
    _, records, stats = _run({"cluster.store_capacity_gb": _gb(1024)}, _agents(1, (1001, 24), (10, 5)))
    assert [r.hit_tokens for r in records] == [0, 1024]
    assert stats["store_lost_lookups"] == 0 and stats["store_evicted_trajectories"] == 0


def test_a_de_buffer_of_exactly_two_prompts_holds_both():
    """A DE node's host buffer of exactly two prompts' KV took one at a time (the second waited for the first's H2D)."""
    sim, records, _ = _run({"cluster.de_host_buffer_gb": _gb(2048)}, _agents(2, (1024, 8)))
    assert len({sim.des[r.decode_engine].node.nid for r in records}) == 1  # (one DE node: its one buffer)
    assert [r.read_start for r in records] == [0.0, 0.0]  # both took their room at placement


def test_basic_prefill_admits_two_prompts_to_pe_hbm_of_exactly_both():
    """Basic prefill's PE HBM of exactly two prompts' KV admitted one at a time (a room a hair short of the second)."""
    cfg = load_sim_config(
        f"{TINY}:basic",
        {"cluster.kv_bytes_per_token": B, "cluster.pe_hbm_kv_gb": _gb(2048), "cluster.gpus_per_node": 1},
    )
    sim = build_simulator(cfg, _agents(2, (1024, 8)))
    records, _, _ = sim.run()
    assert len(sim.pes) == 1
    assert [r.read_start for r in records] == [0.0, 0.0]  # both admitted at placement


def test_a_run_ending_on_a_bucket_boundary_has_no_link_sample_past_its_end():
    """A run whose end falls on a bucket boundary (bucket_s = its end): a flow's last rounding dust, accounted at the
    end instant, made a sample [end, end + bucket_s) past the run's end in links.csv; its bytes now go to the bucket
    ending at the end, and every link's samples still add up to its total."""
    cfg = load_sim_config(f"{TINY}:dualpath,agents=4,turns=3")
    end = run(cfg).stats["sim_end_s"]
    res = run(load_sim_config(f"{TINY}:dualpath,agents=4,turns=3", {"cluster.bucket_s": end}))
    assert res.stats["sim_end_s"] == end
    assert {(x.t0, x.t1) for x in res.links} == {(0.0, end)}  # one bucket, ending at the end
    per_link: dict = {}
    for x in res.links:
        per_link[x.link] = per_link.get(x.link, 0) + x.nbytes
    totals = res.stats["link_totals"]
    assert set(per_link) <= set(totals)
    assert all(per_link.get(k, 0) == round(v) for k, v in totals.items())
