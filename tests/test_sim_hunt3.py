"""Defects found by the third simulator hunt of 2026-12-03 (each test failed before its fix):
- trace trajectories given in code to a `kind="trace"` config lost their turns' trace times (each turn came right
  after the previous one);
- a P/D layout whose nodes do not split into equal EP groups ran every engine with the full group's weights;
- a turn's read bytes were set when it was placed: in a run cut by max_time, turns whose reads had not ended (or begun)
  counted bytes never read (the runtime counts them when each read is over)."""

import pytest

from dualpath_jax.sim import load_sim_config
from dualpath_jax.sim.runner import build_simulator, make_cost_model
from dualpath_jax.workloads.types import Trajectory, Turn

TINY = "configs/sim_tiny.py"


# ---- 1. trace trajectories given in code keep their trace times ---------------------------------------------------
def test_trace_trajectories_given_in_code_arrive_at_their_trace_times():
    """The config has no cap on a trace's size, so a short replay passes `traces.load_trace(path, limit=N)` to `run`.
    Its later turns came right after the previous turn's end (turn 1 of this agent at ~1.1 s instead of 6 s): the
    trace arrival model was only used for trajectories the runner loaded itself."""
    cfg = load_sim_config(f"{TINY}:dualpath", {"workload.kind": "trace", "workload.trace_path": "unused.jsonl"})
    trajs = [
        Trajectory(0, [Turn(640, 10, arrival_offset_s=0.0), Turn(100, 5, arrival_offset_s=5.0)], arrival_time=1.0),
        Trajectory(1, [Turn(320, 4, arrival_offset_s=0.0), Turn(64, 4, arrival_offset_s=0.01)], arrival_time=2.0),
    ]
    records, _, stats = build_simulator(cfg, trajs).run()
    assert stats["unfinished_turns"] == 0
    arrival = {(r.trajectory_id, r.turn_index): r for r in records}
    assert arrival[(0, 0)].arrival == 1.0 and arrival[(1, 0)].arrival == 2.0
    assert arrival[(0, 1)].arrival == 6.0  # its trace time (the first turn was over long before)
    # closed loop: a trace time earlier than the previous turn's end waits for it
    assert arrival[(1, 1)].arrival >= arrival[(1, 0)].finished > 2.01
    # the same trajectories in an offline config still come one after another, as before
    offline = load_sim_config(f"{TINY}:dualpath")
    records, _, _ = build_simulator(offline, trajs).run()
    assert {(r.trajectory_id, r.turn_index): r for r in records}[(0, 1)].arrival < 2.0


# ---- 2. EP groups must split a role's nodes evenly ----------------------------------------------------------------
@pytest.mark.parametrize(
    "pd, role", [("3P8D", "prefill"), ("2P6D", "decode"), ("4P10D", "decode")], ids=["pe", "de", "de10"]
)
def test_a_layout_not_split_into_equal_ep_groups_is_refused(pd, role):
    """paper_scale.py keeps 2P4D's EP groups (2 PE / 4 DE nodes). On 2P6D the DEs formed groups of 4 and 2 nodes, yet
    every DE was modelled with EP 32 weights (37.5 GB); a 2-node group's DEs hold EP 16 weights (57.9 GB), which with
    the reserve leave no KV room at all. It ran, silently."""
    with pytest.raises(ValueError, match=f"config.cluster.{role}_ep_nodes = . does not split"):
        load_sim_config(f"configs/paper_scale.py:dualpath,pd={pd}")


def test_layouts_that_split_into_equal_ep_groups_still_load():
    """Divisors, a group larger than the role (one group of all), 0, and dense models (DP only) are fine."""
    assert make_cost_model(load_sim_config("configs/paper_scale.py:pd=4P8D"), "decode").ep == 32
    assert make_cost_model(load_sim_config("configs/paper_scale.py:pd=1P8D"), "prefill").ep == 8
    cfg = load_sim_config("configs/paper_ds660b.py:pd=3P5D")
    assert make_cost_model(cfg, "prefill").ep == 24 and make_cost_model(cfg, "decode").ep == 40
    qwen = load_sim_config("configs/paper_qwen32b.py:pd=3P5D", {"cluster.decode_ep_nodes": 2})
    assert make_cost_model(qwen, "decode").ep == 1


# ---- 3. read bytes count when the read is over --------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["pe_only", "de_only", "basic"])
def test_a_cut_run_counts_the_read_bytes_of_reads_that_ended_only(mode):
    """Two agents, one read at a time per node on a 0.1 GB/s SNIC, the run cut halfway through the first read of a
    turn's hit: that turn had read nothing yet and the other had not begun; both said 69.6 MB / 46.9 MB read. Uncut,
    every turn counts its whole hit, on the side that read it."""
    cfg = load_sim_config(
        f"{TINY}:{mode}",
        {
            "cluster.gpus_per_node": 1,
            "cluster.writeback": False,
            "cluster.snic_gbps": 0.1,
            "cluster.max_reads_per_node": 1,
        },
    )
    trajs = [Trajectory(0, [Turn(3000, 2), Turn(100, 2)]), Trajectory(1, [Turn(2000, 2), Turn(100, 2)])]
    full, _, _ = build_simulator(cfg, trajs).run()
    b = cfg.cluster.kv_bytes_per_token or make_cost_model(cfg, "prefill").model.kv_bytes_per_token
    for r in full:
        assert r.pe_read_bytes + r.de_read_bytes == int(r.hit_tokens * b)
        assert (r.de_read_bytes > 0) == (mode == "de_only" and r.hit_tokens > 0)
    first = min((r for r in full if r.turn_index == 1), key=lambda r: r.read_start)
    cut = first.read_start + 0.5 * (first.read_end - first.read_start)
    records, _, stats = build_simulator(cfg, trajs).run(max_time=cut)
    seconds = [r for r in records if r.turn_index == 1]
    assert len(seconds) == 2 and all(r.read_end != r.read_end for r in seconds)  # (NaN: no read over by the cut)
    assert all(r.pe_read_bytes == r.de_read_bytes == 0 for r in seconds)
    moved = sum(v for k, v in stats["link_totals"].items() if k.startswith("snic/"))
    assert sum(r.pe_read_bytes + r.de_read_bytes for r in records) <= moved  # (no write-back: SNICs carry reads only)


# ---- 4. online probes' agents arrive within their window ----------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 2])
def test_online_agents_arrive_within_the_probes_window(seed):
    """A probe makes aps * duration_s agents; the n-th arrived after n exponential gaps, a time that strays around the
    window's end: at 0.2 APS over 4800 s seed 0's last 32 agents came after 4800 s (past the clock's stop at 4920 s),
    seed 2's last came at 4449 s (the judged window's last 351 s without a new agent). Now a Poisson process on the
    window given its count; the count, and so the agents, are as before."""
    import numpy as np

    from dualpath_jax.sim.runner import make_trajectories

    cfg = load_sim_config(
        f"{TINY}:dualpath",
        {"workload.kind": "online", "workload.aps": 0.2, "workload.duration_s": 4800.0, "seed": seed},
    )
    trajs, model = make_trajectories(cfg)
    times = model.agent_arrivals(trajs)
    assert len(trajs) == 960
    assert 0.0 <= times.min() and times.max() < 4800.0 and np.all(np.diff(times) >= 0)
    # spread over the whole window: the last tenth holds about a tenth of the agents (96 +- ~3 sigma)
    assert 66 <= np.sum(times >= 4320.0) <= 126


# ---- 5. an idle scheduler keeps its periodic fetches ---------------------------------------------------------------
def test_a_turn_arriving_at_an_idle_scheduler_waits_for_the_next_periodic_fetch():
    """Groups fetch periodically (the runtime on a timer): a turn waits for the next group's fetch. With the queue
    empty the fetch chain stopped, and the next arrival restarted it at its own time: that turn waited 0 s (about half
    a tick of queueing missing at light load). Now the chain keeps its phase: 1P1D, a fetch every 10 s (5 s apart for
    the 2 nodes): ticks at 0, 5, 10, ...; the chain stops at the tick after the queue emptied."""
    cfg = load_sim_config(
        f"{TINY}:dualpath",
        {"workload.kind": "trace", "workload.trace_path": "unused.jsonl", "cluster.fetch_interval_s": 10.0},
    )
    trajs = [
        Trajectory(0, [Turn(640, 4, arrival_offset_s=0.0)], arrival_time=1.0),
        Trajectory(1, [Turn(640, 4, arrival_offset_s=0.0)], arrival_time=23.0),
        Trajectory(2, [Turn(640, 4, arrival_offset_s=0.0)], arrival_time=40.0),  # on a tick: no wait
    ]
    records, _, stats = build_simulator(cfg, trajs).run()
    assert stats["unfinished_turns"] == 0
    sched = {r.trajectory_id: r.scheduled for r in records}
    assert sched == {0: 5.0, 1: 25.0, 2: 40.0}
