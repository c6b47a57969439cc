"""Defects found by the sixth simulator hunt of 2026-12-04 (each test failed before its fix):
- a paced write-back reservation took its rate beside flows that already filled the link (they were not re-solved),
  so a storage NIC carried up to ~1% more than its capacity in a time bucket;
- a run cut by `max_time` whose turns were all done (only stale checks or empty fetches left) reported
  `sim_end_s = max_time` instead of its last event that did something, as the uncut run does."""

import math

from dualpath_jax import compiled
from dualpath_jax.sim import load_sim_config
from dualpath_jax.sim.runner import build_simulator

TINY = "configs/sim_tiny.py:dualpath,agents=2,turns=2"


# ---- 1. no link carries more than its capacity ----------------------------------------------------------------------
def _network():
    net = compiled.load("dualpath_jax.sim.network").FlowNetwork(bucket_s=1.0)
    net.scheduler = lambda t, f, version: None
    return net


def test_a_reservation_squeezes_the_flows_that_fill_its_link_and_gives_back_on_release():
    net = _network()
    link = net.add_link("snic/node0", 100.0)
    f = net.start_flow([link], 1e6, 0.0, None)
    assert f.rate == 100.0
    net.reserve([link], 10.0, 1.0, 0.0)  # 1 B/s for 10 s beside a flow at 100 B/s
    assert f.rate == 99.0  # was 100: the link carried 101 B/s
    net.release([link], 1.0, 10.0)
    assert f.rate == 100.0
    net.flush(20.0)
    assert all(nb <= 100.0 * (1 + 1e-12) for nb in net.buckets[link].values()), net.buckets[link]
    assert math.isclose(sum(net.buckets[link].values()), 2000.0)  # 20 s at 100 B/s: flow + reservation


def test_a_reservation_beside_a_flow_on_one_of_its_links_only_squeezes_where_needed():
    net = _network()
    a = net.add_link("a", 100.0)
    b = net.add_link("b", 1000.0)
    f = net.start_flow([b], 1e6, 0.0, None)  # 1000 B/s on b
    g = net.start_flow([a], 1e6, 0.0, None)  # 100 B/s on a
    net.reserve([a, b], 10.0, 5.0, 0.0)
    assert (f.rate, g.rate) == (995.0, 95.0)


def test_no_storage_nic_carries_more_than_its_capacity_in_a_bucket():
    """Write-backs paced far below the SNIC's capacity beside reads that fill it (64 agents x 3 turns, 0.5 GB/s
    SNICs): a bucket of snic/node1 carried 1.0033x its capacity."""
    for mode in ("de_only", "dualpath"):
        cfg = load_sim_config(f"configs/sim_tiny.py:{mode},agents=64,turns=3", {"cluster.snic_gbps": 0.5})
        sim = build_simulator(cfg)
        records, links, stats = sim.run()
        assert stats["unfinished_turns"] == 0
        cap = dict(zip(sim.net.names, sim.net.capacity, strict=True))
        for s in links:
            assert s.nbytes <= cap[s.link] * (s.t1 - s.t0) * (1 + 1e-9) + 1, (mode, s)


# ---- 2. a cut run whose turns are all done ends at its last event ---------------------------------------------------
def test_a_cut_run_whose_turns_are_all_done_ends_at_its_last_event():
    """Only a stale network check (a flow slowed by the collectives, then sped up) was left after the last turn."""
    over = {"cluster.high_share": 0.999999999, "cluster.collective_bytes_per_token": 1e12}
    _, full_links, full = build_simulator(load_sim_config(TINY, over)).run()
    records, links, stats = build_simulator(load_sim_config(TINY, over)).run(max_time=10.0)
    end = max(r.finished for r in records)
    assert stats["unfinished_turns"] == 0 and end < 10.0
    assert stats["sim_end_s"] == end == full["sim_end_s"]  # was 10.0
    assert links == full_links


def test_a_cut_run_with_only_an_empty_fetch_left_ends_at_its_last_turn():
    spec = "configs/sim_tiny.py:dualpath,agents=2,turns=1"
    records, _, stats = build_simulator(load_sim_config(spec, {"cluster.fetch_interval_s": 5.0})).run(max_time=1.0)
    assert stats["sim_end_s"] == max(r.finished for r in records) < 0.1  # was 1.0


def test_a_run_cut_before_its_turns_are_done_still_holds_up_to_the_cut():
    records, _, stats = build_simulator(load_sim_config(TINY)).run(max_time=0.5)
    assert stats["unfinished_turns"] > 0 and stats["sim_end_s"] == 0.5


def test_a_run_cut_before_its_next_turn_arrives_still_holds_up_to_the_cut():
    """Every turn that came is done by 0.46 s, but the next agent comes at 2.7 s: the run is not over at 1 s."""
    spec = "configs/sim_tiny.py:dualpath,aps=0.3,duration=10,turns=1"
    records, _, stats = build_simulator(load_sim_config(spec)).run(max_time=1.0)
    assert len(records) == 1 and stats["unfinished_turns"] == 0
    assert stats["sim_end_s"] == 1.0
