"""Defects found by the simulator hunt of 2026-12-03 (each test failed before its fix):
- the PE host buffer held more than its size: a PE-side read waited for room only while other reads were in flight,
  not while hits already read waited for their prefill;
- a run cut by max_time stopped its links' byte counts and its decode clocks at the last event before the cut (the
  bytes its flows moved and the second tokens that came out in between were missing)."""

import random

import pytest

from dualpath_jax.sim import load_sim_config
from dualpath_jax.sim.config import GB
from dualpath_jax.sim.runner import build_simulator
from dualpath_jax.workloads.types import Trajectory, Turn

TINY = "configs/sim_tiny.py"
B27 = 23640  # ds27b KV bytes per token


def _pe_buffer_overlaps(sim, records):
    """Per PE node, the most PE-side hit bytes held at once by more than one request, each holding from its read start
    to its prefill end (layerwise, every hit read on the PE side: pe_only); half-open intervals."""
    node_of = {eid: pe.node.nid for eid, pe in sim.pes.items()}
    worst = {}
    for nid in set(node_of.values()):
        recs = [r for r in records if node_of[r.prefill_engine] == nid and r.pe_read_bytes > 0]
        for r in recs:
            live = [q for q in recs if q.read_start <= r.read_start < q.prefill_end]
            if len(live) > 1:
                worst[nid] = max(worst.get(nid, 0), sum(q.pe_read_bytes for q in live))
    return worst


# ---- 1. the PE buffer holds at most its size --------------------------------------------------------------------
def test_a_pe_side_read_waits_for_room_held_by_hits_waiting_for_their_prefill():
    """1P2D, one GPU a node, room for one and a half PE-side hits. The second request's read must wait until the first
    one's hit leaves the PE buffer (its prefill, slowed down here, is done). It used to start once the first read
    was over (no read in flight), and the buffer held 1.33x its size."""
    hit = 3008  # turn 1 of each agent: 47 cached blocks of 64 (3,001 + 8 tokens: 3,008 of KV stored)
    buf = 1.5 * hit * B27
    cfg = load_sim_config(
        f"{TINY}:pe_only,batcher.max_requests=1,pd=1P2D",
        {
            "batcher.name": "fifo",
            "cluster.gpus_per_node": 1,
            "cluster.writeback": False,
            "cluster.host_buffer_gb": buf / GB,
            "cluster.pe_time_scale": 50.0,
        },
    )
    trajs = [Trajectory(i, [Turn(3001, 8), Turn(500, 8)]) for i in range(2)]
    sim = build_simulator(cfg, trajs)
    records, _, stats = sim.run()
    assert stats["unfinished_turns"] == 0
    first, second = sorted([r for r in records if r.turn_index == 1], key=lambda r: r.read_start)
    assert first.pe_read_bytes == second.pe_read_bytes == hit * B27
    assert first.decode_engine != second.decode_engine  # (two DE nodes: their DE buffers do not order them)
    assert second.read_start >= first.prefill_end
    assert not _pe_buffer_overlaps(sim, records)
    node = sim.pes[first.prefill_engine].node
    assert node.buffer_free == buf and node.buf_held == 0 and not node.read_queue


def test_pe_buffers_hold_at_most_their_size_in_random_runs():
    """pe_only runs with PE buffers of one to a few hits: whenever two requests hold PE room, it is at most the
    buffer; every turn finishes and the room is all given back."""
    for seed in range(6):
        rng = random.Random(seed)
        items = ["pe_only", f"pd=1P{rng.randint(1, 3)}D", f"agents={rng.choice([4, 8])}", "turns=3", f"seed={seed}"]
        buf_gb = rng.choice([0.1, 0.2, 0.4])
        cfg = load_sim_config(
            f"{TINY}:{','.join(items)}",
            {"cluster.host_buffer_gb": buf_gb, "cluster.de_hbm_kv_gb": 10.0, "cluster.pe_time_scale": 20.0},
        )
        sim = build_simulator(cfg)
        records, _, stats = sim.run()
        assert stats["unfinished_turns"] == 0
        assert any(r.pe_read_bytes for r in records)
        assert all(v <= buf_gb * GB for v in _pe_buffer_overlaps(sim, records).values()), seed
        for node in sim.nodes:
            assert node.buffer_free == pytest.approx(buf_gb * GB, abs=1.0) and node.buf_held == 0


# ---- 2. a run cut by max_time holds up to max_time ---------------------------------------------------------------
def test_a_cut_run_counts_the_bytes_its_flows_moved_up_to_max_time():
    """One long storage read (0.1 GB/s SNIC), the run cut halfway through it: the SNIC moved half the read by then. The
    links were accounted up to the last event before the cut (a fetch soon after the read started): 5 MB of 34.8 MB."""
    cfg = load_sim_config(
        f"{TINY}:pe_only",
        {"cluster.gpus_per_node": 1, "cluster.snic_gbps": 0.1, "cluster.writeback": False},
    )
    trajs = [Trajectory(0, [Turn(3000, 2), Turn(100, 2)])]
    read = build_simulator(cfg, trajs).run()[0][1]
    assert read.read_end - read.read_start > 0.5  # the read alone, at the SNIC's rate
    cut = read.read_start + 0.5 * (read.read_end - read.read_start)
    records, links, stats = build_simulator(cfg, trajs).run(max_time=cut)
    assert stats["sim_end_s"] == cut and stats["unfinished_turns"] == 1
    snic = stats["link_totals"]["snic/node0"]  # (node ids: the prefill nodes first)
    assert snic == pytest.approx(0.5 * read.pe_read_bytes, rel=1e-6)
    assert sum(s.nbytes for s in links if s.link.startswith("snic/")) == pytest.approx(snic, abs=len(links))


@pytest.mark.parametrize("lockstep", [False, True])
def test_a_cut_run_records_the_second_tokens_that_came_out_before_it(lockstep):
    """A 1000-token turn alone on its DE, the run cut halfway through its decode: its second token came out one step
    after the first, long before the cut; the record said NaN (stamped only when the batch changes)."""
    cfg = load_sim_config(f"{TINY}:oracle", {"cluster.gpus_per_node": 1, "cluster.decode_lockstep": lockstep})
    trajs = [Trajectory(0, [Turn(640, 1000)])]
    full = build_simulator(cfg, trajs).run()[0][0]
    cut = full.first_token + 0.5 * (full.finished - full.first_token)
    (rec,), _, stats = build_simulator(cfg, trajs).run(max_time=cut)
    assert stats["unfinished_turns"] == 1 and rec.first_token == full.first_token
    assert rec.second_token == pytest.approx(full.second_token, rel=1e-12)
