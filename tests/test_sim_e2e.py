"""End-to-end simulator checks on small clusters: every mode runs offline and online, timestamps are
ordered, bytes are conserved on the storage NICs, runs are deterministic per seed, closed forms hold."""

import dataclasses
import math
import os
import re

import pytest

from configs.sim_base import CALIBRATED
from dualpath_jax.sim import MODES, load_sim_config, run
from dualpath_jax.sim.config import GB
from dualpath_jax.workloads.types import Trajectory, Turn, stored_kv_tokens

TINY = "configs/sim_tiny.py"


def _cfg(variant="", **cluster):
    cfg = load_sim_config(f"{TINY}:{variant}" if variant else TINY)
    if cluster:
        cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, **cluster))
    return cfg


@pytest.fixture(scope="module")
def offline_results():
    return {m: run(_cfg(f"{m},agents=12,turns=8")) for m in MODES}


@pytest.mark.parametrize("mode", list(MODES))
def test_offline_mode_completes_with_ordered_timestamps(offline_results, mode):
    res = offline_results[mode]
    assert res.summary["unfinished_turns"] == 0
    assert res.summary["turns"] == len(res.records) > 0
    for r in res.records:
        chain = [
            r.arrival,
            r.scheduled,
            r.read_start,
            r.read_end,
            r.prefill_start,
            r.prefill_end,
            r.first_token,
            r.second_token,
            r.finished,
        ]
        if r.gen_tokens <= 1:  # no second token: NaN, as in the runtime's records (tests/test_sim_fidelity.py)
            assert math.isnan(chain.pop(-2)), r
        assert not any(math.isnan(x) for x in chain), r
        assert all(a <= b + 1e-9 for a, b in zip(chain, chain[1:], strict=False)), (mode, r)
        # bytes read from storage: the hit, or none in oracle (all I/O free)
        read = 0 if mode == "oracle" else r.hit_tokens * _kv_bytes()
        assert r.pe_read_bytes + r.de_read_bytes == pytest.approx(read, abs=_kv_bytes() * 64)


def _kv_bytes():
    from schedulers.cost_model import MODEL_SHAPES

    return MODEL_SHAPES.get("ds27b").kv_bytes_per_token


def test_read_sides_per_mode(offline_results):
    assert offline_results["basic"].summary["de_read_bytes"] == 0
    assert offline_results["layerwise"].summary["de_read_bytes"] == 0
    assert offline_results["dualpath_rr"].summary["de_read_bytes"] > 0
    assert offline_results["dualpath_rr"].summary["pe_read_bytes"] > 0
    oracle = offline_results["oracle"]
    assert sum(v for k, v in oracle.stats["link_totals"].items()) == 0  # no I/O at all


def test_oracle_is_an_upper_bound(offline_results):
    # (not of dualpath_rr: the oracle is dualpath's placement without I/O; round robin places otherwise and can end
    # sooner, e.g. at seed=2: 31.99 s against the oracle's 32.87 s)
    jct = {m: r.summary["jct_s"] for m, r in offline_results.items()}
    for m in ("basic", "layerwise", "dualpath"):
        assert jct["oracle"] <= jct[m] * 1.001, jct


def test_storage_nic_byte_conservation(offline_results):
    # SNIC bytes = storage reads on the node + the DE's write-back of newly filled blocks (of its stored KV: prompt +
    # generation but the last generated token, `stored_kv_tokens`)
    b = _kv_bytes()
    bs = 64
    for mode in ("basic", "dualpath"):
        res = offline_results[mode]
        reads = sum(r.pe_read_bytes + r.de_read_bytes for r in res.records)
        kv = [stored_kv_tokens(r.prompt_tokens, r.gen_tokens) for r in res.records]
        writes = sum(((k // bs) * bs - r.hit_tokens) * b for k, r in zip(kv, res.records, strict=True))
        snic = sum(v for k, v in res.stats["link_totals"].items() if k.startswith("snic/"))
        assert snic == pytest.approx(reads + writes, rel=1e-6)
        bucketed = sum(s.nbytes for s in res.links if s.link.startswith("snic/"))
        assert bucketed == pytest.approx(snic, rel=1e-6, abs=len(res.links))


def test_seed_determinism():
    a = run(_cfg("dualpath,agents=60,turns=8,seed=3"))
    b = run(_cfg("dualpath,agents=60,turns=8,seed=3"))
    c = run(_cfg("dualpath,agents=10,turns=6,seed=4"))
    key = lambda res: [dataclasses.astuple(r) for r in res.records]  # noqa: E731
    assert key(a) == key(b)
    assert [s for s in a.links] == [s for s in b.links]
    assert key(a) != key(c)


def test_progress_reports_do_not_change_the_run(capsys):
    """The progress bar sees every finished turn at the end, and the run is the same with and without it."""
    from dualpath_jax.sim.runner import build_simulator

    cfg = _cfg("dualpath,agents=60,turns=8,seed=3")
    calls = []
    sim = build_simulator(cfg)
    records, _, _ = sim.run(progress=lambda now, done, events: calls.append((now, done, events)))
    assert calls and calls[-1][1] == len(records) == sum(not math.isnan(r.finished) for r in records)
    assert calls[-1][2] == sim.n_events and all(a[2] <= b[2] for a, b in zip(calls[:-1], calls[1:], strict=True))
    with_bar = run(cfg, progress=True)
    assert "simulating dualpath" in capsys.readouterr().err
    assert [dataclasses.astuple(r) for r in with_bar.records] == [dataclasses.astuple(r) for r in records]


@pytest.mark.parametrize("mode", ["basic", "dualpath", "oracle"])
def test_event_loop_makes_no_reference_cycles(mode):
    """Simulator.run() turns the cyclic garbage collector off while its events run: that is only free of
    leaks while the events create no reference cycles (then everything is freed by reference counting)."""
    import gc

    from dualpath_jax.sim.runner import build_simulator

    # gc.freeze: the collections scan only the objects made from here on, the simulator's (in a full run each
    # scanned the suite's heap: ~0.7 s); a cycle its events make is among them.
    gc.freeze()
    try:
        sim = build_simulator(_cfg(f"{mode},agents=30,turns=6,seed=2"))
        gc.collect()
        assert gc.isenabled()
        sim.run()
        assert gc.isenabled()  # restored
        assert sim.n_events > 500 and gc.collect() == 0  # nothing unreachable was left behind
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("mode", ["basic", "dualpath"])
def test_fetches_see_exact_node_sums_and_queue_window(mode):
    """What the simulator keeps for the policies beside its state (NodeState.engine_tok / engine_free_hbm_tokens,
    the QueueWindow's ids and len_r) equals what they stand for at every fetch, and the run ends balanced."""
    from dualpath_jax.sim.runner import build_simulator
    from schedulers.api import QueueWindow

    sim = build_simulator(_cfg(f"{mode},agents=40,turns=6,seed=5"))
    schedule = sim.policy.schedule
    seen = {"fetches": 0, "placed": 0}

    def checked(snapshot, queue, fetching_node=None):
        assert isinstance(queue, QueueWindow) and snapshot.engine_set_key is not None
        assert list(queue.request_ids) == [r.request_id for r in queue]
        assert list(queue.total_tokens) == [r.total_tokens for r in queue]
        assert len(queue) == min(len(sim.queue), sim.c.fetch_window)
        for n in snapshot.nodes.values():
            engs = [e for e in snapshot.engines.values() if e.node_id == n.node_id]
            assert n.engine_tok == sum(e.tok for e in engs)
            assert n.engine_free_hbm_tokens == sum(e.free_hbm_tokens for e in engs)
        out = schedule(snapshot, queue, fetching_node)
        seen["fetches"] += 1
        seen["placed"] += len(out)
        return out

    sim.policy.schedule = checked
    records, _, _ = sim.run()
    assert seen["fetches"] > 10 and seen["placed"] == len(records) == 40 * 6
    full = {e.engine_id: e for e in sim.snapshot.engines.values()}
    for n in sim.snapshot.nodes.values():
        assert n.engine_tok == 0
        assert n.engine_free_hbm_tokens == sum(e.free_hbm_tokens for e in full.values() if e.node_id == n.node_id)


@pytest.mark.parametrize("mode", ["basic", "dualpath", "oracle"])
def test_online_mode_reports_slo(mode):
    res = run(_cfg(f"{mode},aps=0.5,duration=20,turns=4"))
    s = res.summary
    assert s["turns"] > 0 and s["unfinished_turns"] == 0
    assert 0.0 <= s["slo_attainment"] <= 1.0
    assert "ttft_p90_s" in s and "ttst_p50_s" in s
    assert len({r.arrival for r in res.records if r.turn_index == 0}) > 1  # Poisson, not all at t=0


def test_the_slo_is_judged_on_turns_arriving_in_the_arrival_window():
    """`simulate` / `sweep` judged the SLO on every turn after the warm-up, the drain after arrivals stop (a lighter
    load) included; the capacity probes judge turns arriving in [warmup, duration) only, and so does the summary."""
    from dualpath_jax.sim.runner import slo_summary

    cfg = _cfg("dualpath,aps=0.5,duration=20,turns=4,warmup=5")
    res = run(cfg)
    late = [r for r in res.records if r.arrival >= 20]
    assert late, "the drain must hold turns (later turns of agents that arrived in the window)"
    window = [r for r in res.records if 5 <= r.arrival < 20]
    assert res.summary["slo_turns"] == len(window) == slo_summary(cfg, res.records)["slo_turns"]


def test_alpha_is_what_one_node_can_read_in_three_seconds():
    """PAPER.md: α = tokens one node can read in 3 s. With the calibrated read streams (read_stream_gbps x
    max_reads_per_node) below the SNIC line rate, that is the streams' rate (α used the 50 GB/s line rate: 2.8x)."""
    from dualpath_jax.sim.runner import READ_WINDOW_S, _policy_kwargs
    from schedulers.cost_model import CostModel

    cfg = load_sim_config("configs/paper_ds660b.py:dualpath")
    c = cfg.cluster
    pre = CostModel(c.model, c.hardware)
    bpt = pre.model.kv_bytes_per_token
    alpha = _policy_kwargs(cfg, pre, bpt)["alpha_tokens"]
    assert alpha == int(READ_WINDOW_S * c.read_stream_gbps * GB * c.max_reads_per_node / bpt)
    fast = dataclasses.replace(cfg, cluster=dataclasses.replace(c, read_stream_gbps=0.0))  # no stream cap: the SNIC
    assert _policy_kwargs(fast, pre, bpt)["alpha_tokens"] == int(READ_WINDOW_S * c.snic_gbps * GB / bpt)


def test_append_scale_reaches_the_simulator_workload():
    """PAPER.md's append x1..x3 experiment: `append=K` (config.workload.append_scale) multiplies every synthetic
    append; trajectories still end at the dataset's max length, so they have fewer turns. It could not be set from a
    simulator config before (the README said it reproduced the experiment)."""
    from dualpath_jax.sim.runner import make_trajectories

    def shape(variant):
        cfg = load_sim_config(f"configs/paper_ds660b.py:dualpath,agents=32,{variant}")
        trajs = make_trajectories(cfg)[0]
        turns = [u for t in trajs for u in t.turns]
        return cfg, len(turns), sum(u.append_tokens for u in turns[1:]) / len(turns), max(t.total_tokens for t in trajs)

    cfg1, n1, a1, m1 = shape("append=1")
    cfg2, n2, a2, m2 = shape("append=2")
    assert cfg1.workload.append_scale == 1.0 and cfg2.workload.append_scale == 2.0
    assert n2 < n1 and a2 > 1.5 * a1 and max(m1, m2) <= 65_536
    with pytest.raises(ValueError, match=r"config.workload.append_scale must be > 0"):
        load_sim_config("configs/paper_ds660b.py:dualpath,append=0")
    with pytest.raises(ValueError, match="append_scale applies to synthetic workloads only"):
        load_sim_config("configs/paper_ds660b.py:dualpath,kind=trace,append=2", {"workload.trace_path": "x"})


def test_more_storage_bandwidth_is_faster_where_storage_binds():
    """Storage-bound (basic, 24 agents, 1 GB/s SNICs), 4x the SNIC bandwidth cuts the JCT (57.67 -> 46.95 s): a strict
    gain, which a simulator ignoring snic_gbps fails (the old `fast <= slow x 1.001` at 5 vs 20 GB/s passed equal
    JCTs). More bandwidth is not never-slower in general: end to end, JCT can rise ~1-4% (scheduling anomalies)."""
    slow = run(_cfg("basic,agents=24", snic_gbps=1.0))
    fast = run(_cfg("basic,agents=24", snic_gbps=4.0))
    assert fast.summary["jct_s"] < 0.9 * slow.summary["jct_s"]


def _one_agent(prompt_first=640, gen=5, turns=1):
    return [Trajectory(0, [Turn(prompt_first, gen) for _ in range(turns)])]


def test_single_request_closed_form_oracle():
    # Alone, oracle: JCT = one prefill forward (+ fetch wait 0) + (gen - 1) decode steps at join-time context.
    from dualpath_jax.sim.runner import build_simulator

    cfg = _cfg("oracle")
    sim = build_simulator(cfg, _one_agent())
    records, _, _ = sim.run()
    r = records[0]
    c = cfg.cluster
    prefill = sim.cost.batch_prefill_time([(0, 640)]) * c.pe_time_scale
    step = sim.cost.decode_step_time(1, 640) * c.de_time_scale
    assert r.first_token - r.scheduled == pytest.approx(prefill, rel=1e-9)
    assert r.finished - r.first_token == pytest.approx(4 * step, rel=1e-9)
    assert r.tpot == pytest.approx(step, rel=1e-9)


def test_single_read_closed_form():
    # Turn 2 of one agent reads its hit alone on the PE node's SNIC: hit bytes / min(SNIC, read stream cap).
    from dualpath_jax.sim.runner import build_simulator

    cfg = _cfg("basic")
    sim = build_simulator(cfg, _one_agent(prompt_first=3000, gen=100, turns=2))
    records, _, _ = sim.run()
    r = records[1]
    c = cfg.cluster
    rate = min(c.snic_gbps * c.storage_efficiency, c.read_stream_gbps or math.inf) * GB
    assert r.hit_tokens == (3100 // 64) * 64
    assert r.read_end - r.read_start == pytest.approx(r.hit_tokens * sim.b / rate, rel=1e-9)


def test_unknown_config_fields_are_named():
    from dualpath_jax.sim.config import sim_config_from_dict

    d = load_sim_config(TINY)
    with pytest.raises(ValueError, match="config.cluster: unknown field"):
        sim_config_from_dict({"cluster": {"snic_gbs": 1.0}})
    with pytest.raises(ValueError, match="unknown key 'agentz'"):
        load_sim_config(f"{TINY}:agentz=3")
    assert d.cluster.model == "ds27b"


def test_policy_fields_from_the_variant_string():
    cfg = load_sim_config(f"{TINY}:dualpath_rr,policy.full_de=wait,policy.read_side=de,agents=6,turns=4")
    assert cfg.policy == "round_robin" and cfg.policy_kwargs == {"full_de": "wait", "read_side": "de"}
    cfg = load_sim_config(f"{TINY}:dualpath,policy.alpha_tokens=5000,policy.z_slack=1.5,policy.block_size=32")
    assert cfg.policy_kwargs == {"alpha_tokens": 5000, "z_slack": 1.5, "block_size": 32}
    res = run(_cfg("dualpath_rr,policy.full_de=wait,agents=6,turns=4"))
    assert res.summary["unfinished_turns"] == 0
    assert {r.read_side for r in res.records} == {"pe", "de"}
    # fields the policy does not have, or values its Config refuses: refused when the config loads, not in the run
    with pytest.raises(ValueError, match=r"config.scheduler.kwargs .*'dualpath' does not take \['x', 'y'\]"):
        load_sim_config(f"{TINY}:dualpath,policy.x=1.5,policy.y=True")
    with pytest.raises(ValueError, match=r"config.scheduler.kwargs .*round_robin full_de must be skip/wait/queue"):
        load_sim_config(f"{TINY}:dualpath_rr,policy.full_de=never")
    # the batcher's fields the same way (batcher.NAME=value)
    cfg = load_sim_config(f"{TINY}:dualpath,batcher.quota_s=0.05,agents=4,turns=2")
    assert cfg.batcher_kwargs == {"quota_s": 0.05} and run(cfg).summary["unfinished_turns"] == 0
    with pytest.raises(ValueError, match=r"config.batcher.kwargs .*compute_quota quota_s must be > 0, got -1"):
        load_sim_config(f"{TINY}:batcher.quota_s=-1")


@pytest.mark.parametrize("mode", ["dualpath_rr", "round_robin,kind=online,aps=0.5,duration=40"])
def test_requests_placed_on_a_full_de_wait_there_for_hbm(mode):
    """round_robin full_de="queue" places on the DE in turn whatever its free HBM (dualpath_rr's setting): such a
    request waits in that DE's allocation queue (FIFO) and its reads start once it holds the HBM, so no DE ever
    holds more KV than it has, and everything is given back at the end."""
    from dualpath_jax.sim.runner import build_simulator

    hbm_gb = 0.5  # a few requests a DE: most placements must wait
    cfg = _cfg(f"{mode},agents=12,turns=6,policy.full_de=queue", de_hbm_kv_gb=hbm_gb)
    assert cfg.policy == "round_robin" and cfg.policy_kwargs == {"full_de": "queue"}
    sim = build_simulator(cfg)
    cap = {eid: de.hbm_free for eid, de in sim.des.items()}
    records, _, _ = sim.run()
    assert records and all(not math.isnan(r.finished) for r in records if r.arrival < 40.0)
    for eid, de in sim.des.items():  # all HBM given back, no one left waiting
        assert de.hbm_free == cap[eid] and not de.alloc_queue
        assert de.state.free_hbm_tokens == cap[eid]
    # HBM is held from allocation (<= read start) to the end of decode: a sweep of [read_start, finished) per DE
    # never exceeds the DE's capacity
    waited = 0
    for eid in sim.des:
        events = []
        for r in records:
            if r.decode_engine == eid and not math.isnan(r.finished):
                events += [
                    (r.read_start, 1, r.prompt_tokens + r.gen_tokens),
                    (r.finished, 0, r.prompt_tokens + r.gen_tokens),
                ]
                waited += r.read_start - r.scheduled > 1.0
        held = 0
        for _, start, n in sorted(events):
            held += n if start else -n
            assert held <= cap[eid]
    assert waited > 0  # some did wait at their DE
    skip = run(_cfg(f"{mode},agents=12,turns=6,policy.full_de=skip", de_hbm_kv_gb=hbm_gb))
    assert skip.summary["unfinished_turns"] == 0 or "online" in mode


def test_every_registered_policy_runs():
    from schedulers import POLICIES

    for name in POLICIES.names():
        res = run(_cfg(f"{name},agents=6,turns=4"))
        assert res.summary["unfinished_turns"] == 0, name


def test_capacity_search_brackets_the_slo():
    from dualpath_jax.sim.capacity import capacity_search

    cfg = _cfg("dualpath,duration=30,turns=3")
    out = capacity_search(cfg, 0.05, 50.0, iters=3, drain_s=30.0)
    assert out["probes"][0]["slo_met"]  # a trickle of agents meets the SLO
    assert not out["probes"][1]["slo_met"]  # 50 agents/s on 4 GPUs does not
    assert 0.05 <= out["capacity_aps"] < out["upper_aps"] <= 50.0


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("cluster.fetch_interval_s", 0.0, "config.cluster.fetch_interval_s must be > 0, got 0.0"),
        ("cluster.max_reads_per_node", 0, "config.cluster.max_reads_per_node must be >= 1, got 0"),
        ("cluster.gpus_per_node", 0, "config.cluster.gpus_per_node must be >= 1, got 0"),
        ("cluster.snic_gbps", -1.0, "config.cluster.snic_gbps must be > 0, got -1.0"),
        ("cluster.host_buffer_gb", -1.0, "config.cluster.host_buffer_gb must be > 0"),
        ("cluster.storage_efficiency", 1.5, "config.cluster.storage_efficiency must be > 0 and <= 1, got 1.5"),
        ("cluster.high_share", 1.0, "config.cluster.high_share must be below 1"),
        ("cluster.bucket_s", 0.0, "config.cluster.bucket_s must be > 0"),
        ("cluster.pe_time_scale", 0.0, "config.cluster.pe_time_scale must be > 0"),
        ("cluster.read_stream_gbps", -2.0, "config.cluster.read_stream_gbps must be >= 0"),
        ("cluster.fetch_window", 0, "config.cluster.fetch_window must be >= 1"),
        ("cluster.hbm_usable_fraction", 0.0, "config.cluster.hbm_usable_fraction must be > 0 and <= 1, got 0.0"),
        ("cluster.hbm_usable_fraction", 1.2, "config.cluster.hbm_usable_fraction must be > 0 and <= 1, got 1.2"),
        ("workload.n_agents", 0, "config.workload.n_agents must be >= 1, got 0"),
        ("slo_percentile", 150.0, "config.slo_percentile must be > 0 and <= 100, got 150.0"),
        ("warmup_s", -1.0, "config.warmup_s must be >= 0"),
        # since 2026-12-03 (the simulator robustness hunt):
        # an OverflowError inside the run (alpha from an infinite SNIC, the DE tokens of infinite HBM)
        ("cluster.snic_gbps", math.inf, "config.cluster.snic_gbps must be finite, got inf"),
        ("cluster.de_hbm_kv_gb", math.inf, "config.cluster.de_hbm_kv_gb must be finite, got inf"),
        # NaN passed as "derived" (<= 0 is), silently
        ("cluster.de_hbm_kv_gb", math.nan, "config.cluster.de_hbm_kv_gb must be a number, got nan"),
        # an offline run that ended with turns never run / a NaN JCT
        ("cluster.fetch_interval_s", math.inf, "config.cluster.fetch_interval_s must be finite, got inf"),
        ("cluster.pe_time_scale", math.inf, "config.cluster.pe_time_scale must be finite, got inf"),
        ("warmup_s", math.inf, "config.warmup_s must be finite, got inf"),
        # a ValueError from the workload generator when the run was built, naming no field
        ("seed", -1, "config.seed must be >= 0, got -1"),
    ],
)
def test_out_of_range_config_values_are_errors_naming_the_field(key, value, message):
    """Each of these used to run quietly (no reads, an empty workload, a percentile above 100) or fail deep
    inside (a division by zero, a link of no capacity): now the config is refused, naming the field."""
    from dualpath_jax.sim.runner import build_simulator

    with pytest.raises(ValueError, match=re.escape(message)):
        load_sim_config(f"{TINY}:agents=2,turns=2", {key: value})
    cfg = load_sim_config(f"{TINY}:agents=2,turns=2")  # a SimConfig changed in code is checked when built
    section, _, field = key.rpartition(".")
    if section:
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{field: value})})
    else:
        cfg = dataclasses.replace(cfg, **{field: value})
    with pytest.raises(ValueError, match=re.escape(message)):
        build_simulator(cfg)


def test_duplicate_trajectory_ids_are_refused():
    # turn records, turns.csv and the arrival model are keyed by trajectory id: two agents under one id ran and
    # wrote rows no one could tell apart
    from dualpath_jax.sim.config import SimConfigError
    from dualpath_jax.sim.runner import build_simulator

    with pytest.raises(SimConfigError, match=r"trajectory id 7 appears more than once among the 3 trajectories"):
        build_simulator(_cfg("dualpath"), [Trajectory(i, [Turn(100, 5)]) for i in (7, 3, 7)])


@pytest.mark.parametrize("mode", ["basic", "dualpath_rr", "dualpath"])
def test_a_turn_larger_than_a_decode_engine_is_refused_before_the_run(mode):
    """A turn holds its prompt + generation in one DE's HBM from placement to the end of its decode. One larger
    than a whole DE could never be placed, and the run used to spin on its periodic fetches forever (found on
    configs/paper_qwen32b.py, whose DEs held 30.6K tokens, with the 32K dataset). Now the simulator refuses the
    workload when it is built, naming the turn; a turn of exactly the DE's room still runs to the end."""
    from dualpath_jax.sim.config import SimConfigError
    from dualpath_jax.sim.runner import build_simulator

    cfg = _cfg(mode)
    probe = build_simulator(cfg, _one_agent())
    cap = int(probe.c.de_hbm_kv_gb * GB / probe.b)  # tokens one DE holds

    def agents(last_turn_tokens):  # agent 1's second turn holds `last_turn_tokens` (context 600 + append + 10)
        return [
            Trajectory(0, [Turn(500, 5), Turn(40, 5)]),
            Trajectory(1, [Turn(590, 10), Turn(last_turn_tokens - 610, 10)]),
        ]

    with pytest.raises(SimConfigError, match=re.escape(f"turn 1 of trajectory 1 holds {cap + 1:,} tokens of KV")) as e:
        build_simulator(cfg, agents(cap + 1))
    assert f"({cap:,} tokens: config.cluster.de_hbm_kv_gb" in str(e.value) and "1 of 2 trajectories" in str(e.value)
    assert "config.workload.max_context_tokens" in str(e.value)  # the way out for a real trace
    records, _, stats = build_simulator(cfg, agents(cap)).run(max_time=1e6)
    assert stats["unfinished_turns"] == 0 and len(records) == 4


def test_max_context_tokens_cuts_each_trajectory_before_its_first_longer_turn():
    """A real trace holds sessions longer than any DE (the kv-cache-tester trace: up to 869K tokens, where a DS 660B
    DE holds 333K): `workload.max_context_tokens` (a model's context window) cuts each trajectory before its first
    turn whose prompt + generation exceeds it, drops those left without turns, and the run completes."""
    from dualpath_jax.sim.runner import make_trajectories

    full, _ = make_trajectories(_cfg("dualpath,agents=6"))
    limit = sorted(t.peak_turn()[1] for t in full)[2]  # three trajectories stay whole, three are cut
    cfg = load_sim_config(f"{TINY}:dualpath,agents=6", {"workload.max_context_tokens": limit})
    cut, _ = make_trajectories(cfg)
    assert 0 < len(cut) <= len(full) and all(t.peak_turn()[1] <= limit for t in cut)
    by_id = {t.trajectory_id: t for t in full}
    for t in cut:  # a prefix of the original: every turn before the first that exceeds the limit
        whole = by_id[t.trajectory_id]
        assert list(t.turns) == list(whole.turns)[: len(t.turns)]
        if len(t.turns) < len(whole.turns):
            prompt, _, gen = whole.turn_shapes(1)[len(t.turns)]
            assert prompt + gen > limit
    assert sum(len(t.turns) == len(by_id[t.trajectory_id].turns) for t in cut) == 3  # peak <= limit: whole
    res = run(cfg)
    assert res.stats["unfinished_turns"] == 0 and len(res.records) == sum(len(t.turns) for t in cut)
    with pytest.raises(ValueError, match="config.workload.max_context_tokens must be >= 0"):
        load_sim_config(TINY, {"workload.max_context_tokens": -1})


def test_the_paper_configs_default_workloads_fit_their_decode_engines(tmp_path):
    """Every paper setup's own workload can be placed (the simulator would refuse it when built). Qwen2.5-32B
    needs 0.95 of the HBM for the 32K dataset (configs/paper_qwen32b.py), and its 48K dataset does not fit
    one GPU at all: a one-line config error from the launcher, not a run that never ends."""
    from dualpath_jax.sim.config import SimConfigError
    from dualpath_jax.sim.runner import build_simulator

    for spec in ("paper_ds660b.py", "paper_ds27b.py", "paper_qwen32b.py", "paper_scale.py"):
        build_simulator(load_sim_config(f"configs/{spec}"))
    for spec in ("paper_ds660b.py:agents=4096", "paper_ds27b.py:dataset=64K,agents=4096"):
        build_simulator(load_sim_config(f"configs/{spec}"))
    with pytest.raises(SimConfigError, match=r"more than a decode engine's HBM holds \(30,634 tokens"):
        build_simulator(load_sim_config("configs/paper_qwen32b.py", {"cluster.hbm_usable_fraction": 0.9}))
    spec = "configs/paper_qwen32b.py:dualpath,dataset=48K,agents=16"
    out = _launch("experiments.simulate", f"--config={spec}", "--noplot", f"--output_dir={tmp_path}/sim/run")
    assert out.returncode != 0 and "bad config: turn " in out.stderr, out.stderr[-800:]
    # the results directories it made for the run are gone again (an empty one was left behind, in results/ here)
    assert list(tmp_path.iterdir()) == []
    assert "Traceback" not in out.stderr
    assert "more than a decode engine's HBM holds (45,893 tokens" in out.stderr


def test_every_config_field_can_be_overridden_from_the_command_line():
    """ml_collections only overrides keys the config has: a ClusterConfig / WorkloadConfig field missing from
    configs/sim_base.py could not be set with --config.cluster.<field> (cnic_duplex and flow_coalesce_s could not),
    and its default there must be the dataclass default."""
    from configs.sim_base import base_config
    from dualpath_jax.sim.config import ClusterConfig, WorkloadConfig

    base = base_config()
    for cls, section in ((ClusterConfig, base.cluster), (WorkloadConfig, base.workload)):
        for f in dataclasses.fields(cls):
            assert f.name in section, f"{cls.__name__}.{f.name} is not in configs/sim_base.py"
            if f.name not in CALIBRATED and f.name not in ("de_hbm_kv_gb", "pe_hbm_kv_gb"):
                assert section[f.name] == f.default, (cls.__name__, f.name, section[f.name], f.default)
    shared = load_sim_config(TINY, {"cluster.cnic_duplex": False})
    assert shared.cluster.cnic_duplex is False and load_sim_config(TINY).cluster.cnic_duplex is True


def test_every_paper_config_passes_the_checks():
    from dualpath_jax.sim.config import check_sim_config

    for spec in ("paper_ds660b.py", "paper_ds27b.py", "paper_qwen32b.py", "paper_scale.py", "sim_tiny.py"):
        for variant in ("basic", "dualpath_rr", "dualpath", "oracle"):
            check_sim_config(load_sim_config(f"configs/{spec}:{variant}"))


def _launch(module: str, *args: str, timeout: float = 120):
    """`python -m module args...` in a child process, its output captured as text."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "module, spec, says",
    [
        ("experiments.simulate", "configs/sim_tiny.py:agents=abc", "agents must be an integer"),
        ("experiments.run", "configs/tiny_runtime.py:bogus", "unknown variant 'bogus'"),
    ],
)
def test_an_error_in_a_config_variant_is_one_line(module, spec, says):
    # ml_collections wraps a get_config error (an explicit --config=FILE:VARIANT) in its whole traceback
    out = _launch(module, f"--config={spec}")
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-800:]
    assert out.stderr.strip().splitlines()[-1].startswith("bad config: ValueError: ") and says in out.stderr


@pytest.mark.parametrize("module", ["experiments.run", "experiments.simulate", "experiments.bench_runtime"])
def test_helpshort_lists_the_config_flag(module):
    # --config is defined in experiments/__init__.py; absl's --helpshort lists only the launcher's own key flags
    out = _launch(module, "--helpshort")
    assert "  --config:" in out.stdout + out.stderr, (out.stdout + out.stderr)[-800:]  # (absl exits 1 after help)


def test_simulate_launcher_writes_results(tmp_path):
    args = [
        "--config=configs/sim_tiny.py:agents=4,turns=3",
        "--config.scheduler.name=dualpath",
        f"--output_dir={tmp_path}",
        "--noplot",
    ]
    out = _launch("experiments.simulate", *args)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "jct_s" in out.stdout
    for f in ("summary.json", "turns.csv", "links.csv"):
        assert (tmp_path / f).stat().st_size > 0
    bad = _launch("experiments.simulate", *args, "stray")
    assert bad.returncode != 0 and "unknown arguments" in bad.stderr


def test_online_scale_specs_are_the_papers_layouts_and_loads():
    """`reproduce_paper --online_scale` (PAPER.md: 0.4 APS on 2P4D -> 8.8 APS on 44P88D) runs these two configs;
    the run itself takes minutes (README), so here only what they set."""
    from experiments.reproduce_paper import ONLINE_SCALE, PAPER

    small, large = (load_sim_config(ONLINE_SCALE[k]) for k in ("2P4D", "44P88D"))
    for cfg, (p, d), aps in ((small, (2, 4), 0.4), (large, (44, 88), 8.8)):
        assert (cfg.cluster.prefill_nodes, cfg.cluster.decode_nodes) == (p, d) and cfg.policy == "dualpath"
        assert cfg.workload.kind == "online" and cfg.workload.aps == aps and cfg.workload.dataset == "64K"
        assert (cfg.workload.duration_s, cfg.warmup_s) == (4800.0, 2400.0) and cfg.cluster.model == "ds660b"
    assert PAPER["online_scale_2p4d"] == (1.74, 0.039) and PAPER["online_scale_44p88d"] == (1.85, 0.036)


def test_reproduce_paper_launcher_writes_the_report(tmp_path):
    """The paper report end to end on a small load: every headline row beside the paper's value, the online
    probes' dataset and capacity brackets named, the raw results in report.json."""
    import json

    args = [
        "--agents=16",
        "--seeds=0,1",
        "--online",
        "--online_dataset=32K",
        "--online_duration_s=300",
        "--online_warmup_s=100",
        "--online_iters=1",
        "--appends=2",
        "--pd_ratios=1P1D,2P1D",
        "--pd_agents=16",  # (the config's 1024 agents: ~4x this test's time, the same code)
        "--workers=2",  # (the README's command: its 24 simulator runs in two spawned processes, the report the same)
        f"--output_dir={tmp_path}",
    ]
    out = _launch("experiments.reproduce_paper", *args, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = (tmp_path / "report.md").read_text()
    for row, paper in [
        ("offline speedup Basic -> DualPath", "1.87x"),
        ("ablation: + dual path, round-robin (JCT %)", "-38.19"),
        ("storage-NIC max/avg, scheduler", "1.18"),
        ("online capacity gain DS 660B", "2.25x"),
        ("online capacity DS 27B basic (APS)", "0.3"),
    ]:
        assert f"| {row} | {paper} |" in report, row
    assert "Online probes: 32K dataset, Poisson arrivals over 300 s" in report
    assert "16 agents, seeds 0, 1 (mean [min, max] over them)" in report
    assert re.search(r"\| storage-NIC max/avg, round-robin \| 1.53 \| [0-9.]+ \[[0-9.]+, [0-9.]+\] \|", report)
    assert "paper_ds660b.py basic" in report and "paper_ds27b.py dualpath" in report
    assert (tmp_path / "report.png").stat().st_size > 0 and f"wrote {tmp_path / 'report.png'}" in out.stdout
    results = json.loads((tmp_path / "report.json").read_text())
    # 5 modes x 2 seeds + basic/dualpath at append x2 + basic/dualpath of DS 27B at two P/D layouts
    assert sum(k.startswith("offline ") for k in results) == 16
    assert (
        "| DS 27B P/D sweep: mean speedup | 1.64x |" in report and "| DS 27B P/D sweep: max speedup | 2.46x |" in report
    )
    assert re.search(r"\| 2P1D \| \d+ \| \d+ \| [0-9.]+x \|", report)
    assert "DS 27B across P/D layouts (its config's workload at 16 agents, seed 0)" in report
    assert any(k.endswith("paper_ds27b.py:dualpath,pd=2P1D,agents=16,seed=0") for k in results)
    assert "Paper: 1.82-1.99x over x1...x3" in report
    assert re.search(r"\| x1 \| \d+ \| \d+ \| [0-9.]+x \| (yes|no) \|", report)
    assert re.search(r"\| x2 \| \d+ \| \d+ \| [0-9.]+x \| (yes|no) \|", report)
    caps = [v for k, v in results.items() if k.startswith("capacity ")]
    assert len(caps) == 4 and all(0 <= c["capacity_aps"] <= 1.0 and c["probes"] for c in caps)
    bad = _launch("experiments.reproduce_paper", *args, "stray")
    assert bad.returncode != 0 and "unknown arguments" in bad.stderr
    for flag, says in [
        ("--agents=0", "0 is not a positive integer"),
        ("--online_iters=-1", "-1 is not a non-negative integer"),
        ("--table=512,abc", "--table takes agent counts of the paper's DS 660B table"),
        ("--online_warmup_s=5000", "--online_warmup_s in [0, online_duration_s)"),
        ("--seeds=0,x", "--seeds takes integers >= 0"),
        ("--appends=2,0", "--appends takes numbers > 0"),
        ("--pd_ratios=1P1D,2P", "--pd_ratios takes layouts like 1P2D"),
        ("--pd_agents=-1", "-1 is not a non-negative integer"),
        # a row the paper's table does not have, or an unknown dataset, fails here, not after every run
        ("--table=77", "--table takes agent counts of the paper's DS 660B table"),
        ("--online_dataset=99K", "--online_dataset must be '' (the configs' 64K) or one of 32K, 48K, 64K"),
        ("--dataset=12K", "--dataset must be one of 32K, 48K, 64K"),
    ]:
        bad = _launch("experiments.reproduce_paper", flag)
        assert bad.returncode != 0 and says in bad.stderr, (flag, bad.stderr[-500:])


@pytest.mark.parametrize(
    "argv, says",
    [
        (["experiments.sweep", "--setups=configs/sim_tiny.py", "--workers=0"], "0 is not a positive integer"),
        (["experiments.simulate", "--config=configs/sim_tiny.py", "--max_time=0"], "--max_time must be > 0"),
        (["experiments.bench_store", "--repeats=0"], "0 is not a positive integer"),
        (["experiments.pd_bounds", "--s=0"], "--s must be > 0"),
        (["experiments.pd_bounds", "--s=5"], "--s must be <= g/2"),
        (["experiments.pd_bounds", "--M_GBps=inf"], "--M_GBps must be > 0 and finite"),
        (["experiments.pd_bounds", "--B_GBps=nan"], "--B_GBps must be > 0 and finite"),
        (["experiments.bench_io", "--tcp_sizes=64K"], "--tcp_sizes takes positive integers"),
        (["experiments.bench_io", "--sections="], "--sections takes one or more of store, tcp"),
        (["experiments.bench_prefill", "--models="], "--models takes one or more of dense, moe"),
        (["experiments.sweep", "--modes="], "--modes needs at least one item"),
        (["experiments.sweep", "--setups="], "--setups needs at least one item"),
        (["experiments.bench_io", "--sections=tcp,bogus"], "--sections takes one or more of store, tcp"),
        (["experiments.bench_store", "--compare_tree=/no/tree"], "--compare_tree must be the root of a source tree"),
        (["schedulers.calibrate", "--hardware=h900"], "--hardware takes a registered profile: cpu, h100"),
    ],
)
def test_launchers_refuse_out_of_range_flags(argv, says):
    out = _launch(*argv)
    assert out.returncode != 0 and "Flags parsing error" in out.stderr and says in out.stderr, out.stderr[-500:]


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["experiments.simulate", f"--config={TINY}", "--noplot"], "--output_dir"),
        (["experiments.sweep", f"--setups={TINY}", "--modes=basic", "--workers=1"], "--output_dir"),
        (["experiments.reproduce_paper", "--workers=1"], "--output_dir"),
        (["experiments.bench_io", "--sections=overlap"], "--out"),
        (["experiments.bench_store", "--total_mb=1"], "--out"),
        (["experiments.bench_prefill"], "--out"),
    ],
    ids=["simulate", "sweep", "reproduce_paper", "bench_io", "bench_store", "bench_prefill"],
)
def test_launchers_refuse_an_unwritable_output_before_running(tmp_path, argv, flag):
    """Results are written at the end: a directory that cannot take them used to fail only then (a sweep after
    every cell ran). Now each launcher proves the place writable first and stops with one line."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    target = blocker / "sub" / ("out.json" if flag == "--out" else "")  # below a file: never writable, even as root
    out = _launch(*argv, f"{flag}={str(target).rstrip('/')}")
    assert out.returncode != 0 and f"bad {flag} " in out.stderr and "cannot write" in out.stderr, out.stderr[-800:]
    assert "Traceback" not in out.stderr and "sweep:" not in out.stderr  # nothing ran
    out = _launch(*argv[:1], f"{flag}={tmp_path}") if flag == "--out" else None
    if out is not None:
        assert out.returncode != 0 and f"bad --out '{tmp_path}': it is a directory, not a file" in out.stderr
    if argv[0] == "experiments.bench_store":  # its store directory too
        out = _launch(*argv, f"--root={blocker}/store")
        assert out.returncode != 0 and f"bad --root '{blocker}/store': cannot write there" in out.stderr


def test_simulate_says_when_max_time_left_turns_unfinished(tmp_path):
    """An offline run stopped by --max_time reports the JCT of the finished turns only: the launcher says so."""
    out = _launch(
        "experiments.simulate", f"--config={TINY}:dualpath", "--max_time=5", "--noplot", f"--output_dir={tmp_path}"
    )
    assert out.returncode == 0, out.stderr[-1500:]
    m = re.search(
        r"(\d+) of the workload's (\d+) turns did not finish by the end of the run \(--max_time=5\): (\d+) of the "
        r"(\d+) that arrived were still running",
        out.stderr,
    )
    assert m, out.stderr[-1500:]
    not_done, total, running, arrived = map(int, m.groups())
    # the count is of the whole workload's turns (it counted the arrived ones only: turns that never came were lost)
    from dualpath_jax.sim.runner import build_simulator

    sim = build_simulator(_cfg("dualpath"))
    assert total == sum(len(t.turns) for t in sim.trajectories) and arrived < total
    assert not_done == running + (total - arrived) and running > 0
    full = _launch("experiments.simulate", f"--config={TINY}:dualpath", "--noplot", f"--output_dir={tmp_path}")
    assert full.returncode == 0 and "did not finish" not in full.stderr


def test_unknown_mode_policy_or_batcher_is_a_config_error():
    with pytest.raises(
        ValueError, match=r"config.mode 'bogus' is neither a mode \(basic, .*\) nor a registered policy"
    ):
        load_sim_config(f"{TINY}:bogus")
    with pytest.raises(ValueError, match=r"config.scheduler.name 'dualpth' is neither a mode"):
        load_sim_config(TINY, {"scheduler.name": "dualpth"})
    with pytest.raises(ValueError, match=r"config.batcher.name 'nope' unknown; known: compute_quota, fifo"):
        load_sim_config(TINY, {"batcher.name": "nope"})
    with pytest.raises(ValueError, match=r"config.workload.dataset '99K' unknown; known: 32K, 48K, 64K"):
        load_sim_config(f"{TINY}:dataset=99K")
    # cost-model names and the fetch scope: refused when the config loads (they were KeyErrors / ValueErrors
    # with a traceback from inside the run)
    with pytest.raises(ValueError, match=r"config.cluster.model 'gpt5' unknown; known: ds27b, ds660b"):
        load_sim_config(TINY, {"cluster.model": "gpt5"})
    with pytest.raises(ValueError, match=r"config.cluster.hardware 'h900' unknown; known: cpu, h100"):
        load_sim_config(TINY, {"cluster.hardware": "h900"})
    with pytest.raises(ValueError, match=r"config.cluster.fetch_scope must be 'node' or 'global', got 'world'"):
        load_sim_config(TINY, {"cluster.fetch_scope": "world"})
    assert load_sim_config(f"{TINY}:round_robin").policy == "round_robin"  # a policy name is a mode too
    out = _launch("experiments.simulate", f"--config={TINY}:bogus", "--noplot")
    assert out.returncode != 0 and "bad config: config.mode 'bogus'" in out.stderr
    assert "Traceback" not in out.stderr


def test_variant_numbers_that_do_not_parse_name_the_item():
    with pytest.raises(ValueError, match=re.escape("config variant item 'agents=abc': agents must be an integer")):
        load_sim_config(f"{TINY}:agents=abc")
    with pytest.raises(ValueError, match=re.escape("config variant item 'aps=fast': aps must be a number")):
        load_sim_config(f"{TINY}:aps=fast")


def test_sweep_says_where_a_setups_variant_goes():
    out = _launch("experiments.sweep", f"--setups={TINY}:agents=4", "--modes=basic")
    assert out.returncode != 0 and "variant items go in --modes, --loads or --extra" in out.stderr, out.stderr[-500:]


def test_sweep_refuses_a_bad_cell_before_running_any():
    out = _launch("experiments.sweep", f"--setups={TINY}", "--modes=basic,bogus", "--workers=1")
    assert out.returncode != 0 and f"bad sweep cell '{TINY}:bogus': config.mode 'bogus'" in out.stderr
    assert "sweep:" not in out.stderr  # no progress bar: nothing ran
    # a cell whose workload no DE could hold (Qwen2.5-32B, 48K dataset) is refused before anything runs too
    qwen = "configs/paper_qwen32b.py"
    out = _launch("experiments.sweep", f"--setups={TINY},{qwen}", "--modes=dualpath", "--extra=dataset=48K,agents=8")
    assert out.returncode != 0 and f"bad sweep cell '{qwen}:dualpath,dataset=48K,agents=8': turn " in out.stderr
    assert "sweep:" not in out.stderr and "Traceback" not in out.stderr


def test_sweep_runs_every_cell_once_per_seed(tmp_path):
    """--seeds runs each cell once per seed (seed=N in its variant), one row each; the plot shows their mean and
    range. A seed set twice (--seeds and --extra=seed=N) or a seed that is not an integer is refused."""
    import csv

    out = _launch(
        "experiments.sweep", f"--setups={TINY}", "--modes=dualpath", "--loads=agents=4", "--extra=turns=3",
        "--seeds=0,1", "--workers=1", f"--output_dir={tmp_path}",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "sweep.csv")))
    assert [(r["mode"], r["seed"]) for r in rows] == [("dualpath", "0"), ("dualpath", "1")]
    assert rows[0]["jct_s"] != rows[1]["jct_s"]  # different workloads: the seed reached the config
    assert (tmp_path / "sweep.png").stat().st_size > 0
    both = _launch("experiments.sweep", f"--setups={TINY}", "--seeds=0,1", "--extra=seed=3")
    assert both.returncode != 0 and "--seeds and a seed= item in --extra both set the seed" in both.stderr
    bad = _launch("experiments.sweep", f"--setups={TINY}", "--seeds=0,x")
    assert bad.returncode != 0 and "--seeds takes distinct integers" in bad.stderr


def test_sweep_launcher_runs_a_grid(tmp_path):
    import csv

    out = _launch(
        "experiments.sweep",
        "--setups=configs/sim_tiny.py",
        "--modes=basic,dualpath",
        "--loads=agents=4",
        "--extra=turns=3",
        "--workers=1",
        f"--output_dir={tmp_path}",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "sweep.csv")))
    assert [r["mode"] for r in rows] == ["basic", "dualpath"]
    assert all(float(r["jct_s"]) > 0 for r in rows)
    assert (tmp_path / "sweep.png").stat().st_size > 0 and "wrote " + str(tmp_path / "sweep.png") in out.stdout


@pytest.mark.parametrize(
    "spec",
    [
        "configs/paper_ds660b.py",
        "configs/paper_ds660b.py:basic,dataset=48K,agents=1024",
        "configs/paper_ds27b.py:oracle,pd=2P1D",
        "configs/paper_qwen32b.py:dualpath_rr",
        "configs/paper_scale.py",
    ],
)
def test_paper_configs_build_and_run_one_agent(spec):
    from dualpath_jax.sim.runner import build_simulator

    cfg = load_sim_config(spec)
    sim = build_simulator(cfg, _one_agent(prompt_first=500, gen=20, turns=3))
    records, _, stats = sim.run()
    assert stats["unfinished_turns"] == 0 and len(records) == 3
    c = cfg.cluster
    assert len(sim.pes) == c.prefill_nodes * c.gpus_per_node and len(sim.des) == c.decode_nodes * c.gpus_per_node


@pytest.mark.slow
def test_ds660b_512_agents_dualpath_beats_basic_and_tracks_oracle():
    # Paper (64K, 512 agents): oracle 1875 s, DualPath 1979 s, basic 2813 s.
    jct = {
        m: run(load_sim_config(f"configs/paper_ds660b.py:{m},agents=512")).summary["jct_s"]
        for m in ("basic", "dualpath", "oracle")
    }
    assert jct["basic"] / jct["dualpath"] > 1.25
    # within the issue's +-15% of the paper's DualPath / oracle (1.055); the simulator gives 1.153 (1493 / 1296 s,
    # 2026-12-04): DualPath's distance from oracle at this light load is the widest of the table (README "Offline fit")
    assert jct["dualpath"] / jct["oracle"] < 1979 / 1875 * 1.15


_DIGEST_SCRIPT = """
import dataclasses, hashlib, sys
junk = [bytearray(int(n)) for n in sys.argv[1:]]  # shifts object addresses between the two processes
from dualpath_jax.sim import load_sim_config, run
res = run(load_sim_config("{tiny}:dualpath,agents=60,turns=8,seed=3"))
rows = repr([dataclasses.astuple(r) for r in res.records]) + repr(list(res.links))
print(hashlib.sha256(rows.encode()).hexdigest())
"""


def test_seed_determinism_across_processes():
    """Same seed, two processes with different memory layouts and hash seeds: identical records and links."""
    import os
    import subprocess
    import sys

    script = _DIGEST_SCRIPT.format(tiny=TINY)
    digests = []
    for hash_seed, junk in (("1", []), ("2", ["17", "4099", "123457"])):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", script, *junk], env=env, capture_output=True, text=True, timeout=120, check=True
        )
        digests.append(out.stdout.strip().splitlines()[-1])
    assert digests[0] == digests[1]


@pytest.mark.parametrize("seed", range(6))
def test_column_wise_summary_equals_the_per_record_loops(seed):
    """metrics.summarize and runner.ttft_breakdown read columns (numpy); the same numbers, bit for bit, as
    the per-record loops they replaced (NaN for unfinished turns, including a NaN first record); the JCT spans
    the finished turns, whatever the order of the records."""
    import random

    import numpy as np

    from dualpath_jax import metrics
    from dualpath_jax.sim import runner

    rng = random.Random(seed)
    nan = math.nan
    records = []
    for i in range(rng.choice([1, 2, 50, 3000])):
        t = [rng.uniform(0, 100) for _ in range(8)]
        t.sort()
        rec = metrics.TurnRecord(i, 0, rng.randint(1, 9000), 0, rng.choice([0, 1, 2, rng.randint(3, 900)]), t[0])
        rec.scheduled, rec.read_start, rec.read_end, rec.prefill_start, rec.prefill_end = t[1:6]
        rec.first_token, rec.second_token, rec.finished = t[5], t[6], t[7]
        if rng.random() < 0.2 or (i == 0 and seed % 2):
            rec.first_token = rec.second_token = rec.finished = nan  # unfinished
        records.append(rec)

    def old_percentile(values, q):
        vals = [v for v in values if not math.isnan(v)]
        return float(np.percentile(vals, q)) if vals else nan

    ttft = [r.ttft for r in records]
    tpot = [r.tpot for r in records]
    start = min(r.arrival for r in records)
    end = max((r.finished for r in records if not math.isnan(r.finished)), default=nan)
    want = {
        "jct_s": end - start,
        "ttft_p50_s": old_percentile(ttft, 50),
        "ttft_p99_s": old_percentile(ttft, 99),
        "tpot_p50_s": old_percentile(tpot, 50),
        "tpot_p99_s": old_percentile(tpot, 99),
    }
    parts = {"queue": [], "allocation": [], "read": [], "prefill": []}
    for r in records:
        if not math.isnan(r.first_token):
            parts["queue"].append(r.scheduled - r.arrival)
            parts["allocation"].append(r.read_start - r.scheduled)
            parts["read"].append(r.read_end - r.read_start)
            parts["prefill"].append(r.first_token - r.read_end)
    want.update({f"ttft_{k}_mean_s": float(np.mean(v)) if v else nan for k, v in parts.items()})
    got = metrics.summarize(records)
    got.update(runner.ttft_breakdown(records))
    for k, v in want.items():
        assert repr(got[k]) == repr(v), k  # repr: equal bits, and NaN equals NaN
    # the order of the records does not matter (a NaN first record used to make the JCT NaN)
    assert repr(metrics.summarize(records[::-1])) == repr(metrics.summarize(records))


def _three_agents_on_two_des(decode_lockstep: bool, model: str = "ds27b"):
    """Oracle, round-robin over sim_tiny's 2 PEs and 2 DEs (one decode node): agents 0 and 2 share a DE,
    agent 1 decodes alone on the other."""
    from dualpath_jax.sim.runner import build_simulator

    cfg = _cfg("oracle", decode_lockstep=decode_lockstep, model=model)
    cfg = dataclasses.replace(cfg, policy="round_robin")
    sim = build_simulator(cfg, [Trajectory(i, [Turn(640, 200)]) for i in range(3)])
    records, _, _ = sim.run()
    return sim, sorted(records, key=lambda r: r.trajectory_id)


def test_decode_lockstep_steps_at_the_slowest_member():
    # MoE DEs of one EP group step together: agent 1, alone on its DE, decodes at the step of the DE that
    # holds two requests once both have joined.
    sim_off, recs_off = _three_agents_on_two_des(False)
    sim_on, recs_on = _three_agents_on_two_des(True)
    assert [len(g.members) for g in sim_off.de_groups] == [1, 1]
    assert [len(g.members) for g in sim_on.de_groups] == [2]  # EP over the decode node's 2 GPUs
    a0, a1, a2 = recs_on
    assert a0.decode_engine == a2.decode_engine != a1.decode_engine
    # the two-request DE is the slower member throughout: its records are unchanged
    for i in (0, 2):
        assert dataclasses.astuple(recs_on[i]) == dataclasses.astuple(recs_off[i])
    scale = sim_on.c.de_time_scale
    s1 = sim_on.cost.decode_step_time(1, 640) * scale  # one request of 640 tokens, at its join
    t1, t0, t2 = a1.first_token, a0.first_token, a2.first_token
    assert t1 <= t0 < t2 < t1 + 199 * s1  # agent 2 (second on its PE) joins while agent 1 still decodes
    # until t2 both DEs run one 640-token request (step s1); from t2 agents 0 and 2 share a DE, whose step
    # uses the context then: 2 x 640 + the (t2 - t0) / s1 tokens agent 0 generated so far
    s2 = sim_on.cost.decode_step_time(2, int(1280 + (t2 - t0) / s1)) * scale
    assert s2 > s1
    assert recs_off[1].finished == pytest.approx(t1 + 199 * s1, rel=1e-12)
    assert a1.finished == pytest.approx(t2 + (199 - (t2 - t1) / s1) * s2, rel=1e-12)


def test_decode_lockstep_leaves_dense_models_alone():
    # A dense model is DP only: lockstep changes nothing (every DE is a group of one).
    sim_off, recs_off = _three_agents_on_two_des(False, model="qwen2.5-32b")
    sim_on, recs_on = _three_agents_on_two_des(True, model="qwen2.5-32b")
    assert [len(g.members) for g in sim_on.de_groups] == [1, 1]
    assert [dataclasses.astuple(r) for r in recs_on] == [dataclasses.astuple(r) for r in recs_off]


@pytest.mark.parametrize("policy", ["basic", "dualpath"])
def test_simulator_replays_a_real_trace_with_its_timestamps(policy):
    """workload.kind='trace' on the real Mooncake conversation trace (../shared/traces): every turn of every session
    finishes, each session's first turn arrives at its trace time, later turns hit the session's own earlier KV, first
    turns other sessions' (some of them), and the run is deterministic."""
    from dualpath_jax.sim.runner import make_trajectories
    from dualpath_jax.workloads.traces import traces_dir

    name = "mooncake_conversation_trace.jsonl.gz"
    if not (traces_dir() / name).exists():
        pytest.skip(f"real traces not found at {traces_dir()}")
    over = {"workload.kind": "trace", "workload.trace_path": name, "workload.max_turns": 4, "scheduler.name": policy}
    cfg = load_sim_config("configs/sim_tiny.py", {**over, "workload.max_agents": 1000})  # (of 8,099 sessions)
    res = run(cfg)
    trajs, _ = make_trajectories(cfg)
    assert len(trajs) == 1000
    assert len(res.records) == sum(len(t.turns) for t in trajs) and res.summary["unfinished_turns"] == 0
    start = {t.trajectory_id: t.arrival_time for t in trajs}
    firsts = [r for r in res.records if r.turn_index == 0]
    assert len(firsts) == len(trajs)
    assert all(math.isclose(r.arrival, start[r.trajectory_id], abs_tol=1e-9) for r in firsts)
    assert any(r.hit_tokens > 0 for r in res.records if r.turn_index > 0)
    # a first turn hits only what other sessions' prompts stored before it (workload.shared_prefix_hits)
    assert any(r.hit_tokens > 0 for r in firsts) and not all(r.hit_tokens > 0 for r in firsts)
    assert run(cfg).summary == res.summary


def test_max_agents_replays_a_traces_first_sessions_whole():
    """workload.max_agents: the trace's first N trajectories, each with all its turns, as the whole trace has them;
    refused for synthetic workloads (whose agents are n_agents, or aps x duration_s), and below 0."""
    from dualpath_jax.sim.runner import make_trajectories
    from dualpath_jax.workloads.traces import traces_dir

    name = "mooncake_conversation_trace.jsonl.gz"
    if not (traces_dir() / name).exists():
        pytest.skip(f"real traces not found at {traces_dir()}")
    over = {"workload.kind": "trace", "workload.trace_path": name}
    every, _ = make_trajectories(load_sim_config("configs/sim_tiny.py", over))
    first, _ = make_trajectories(load_sim_config("configs/sim_tiny.py", {**over, "workload.max_agents": 7}))
    assert len(every) > 7 and first == every[:7]
    with pytest.raises(ValueError, match=r"max_agents applies to kind='trace' only \(kind 'offline'"):
        load_sim_config("configs/sim_tiny.py", {"workload.max_agents": 7})
    with pytest.raises(ValueError, match="max_agents"):
        load_sim_config("configs/sim_tiny.py", {**over, "workload.max_agents": -1})


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config=configs/no_such_setup.py"], "bad config: OSError: Failed loading config file"),
        ([], "bad config: --config is required"),
        (
            ["--config=configs/sim_tiny.py", "--config.workload.kind=trace", "--config.workload.trace_path=/no/trace"],
            "bad workload: trace '/no/trace' not found",
        ),
        # an override of a field the config does not have: one line with ml_collections' did-you-mean
        (
            ["--config=configs/sim_tiny.py", "--config.cluster.snic_gbs=1"],
            "bad override --config.cluster.snic_gbs=1: the config has no field 'snic_gbs'. Did you mean \"snic_gbps\"",
        ),
        (["--config=configs/sim_tiny.py", "--config.workload.arrival=online"], "the config has no field 'arrival'."),
        (["--config=configs/no_such_setup.py", "--config.seed=1"], "bad config: OSError: Failed loading config file"),
    ],
    ids=[
        "missing_config_file",
        "no_config",
        "missing_trace",
        "unknown_field",
        "unknown_section_field",
        "override_on_missing_file",
    ],
)
def test_simulate_launcher_reports_a_bad_config_or_workload_in_one_line(tmp_path, args, message):
    out = _launch("experiments.simulate", *args, f"--output_dir={tmp_path}")
    assert out.returncode != 0 and message in out.stderr
    assert "Traceback" not in out.stderr


def _strict_json(path):
    """json.loads refusing NaN / Infinity (Python's reader takes them; JSON and strict readers do not)."""
    import json

    def refuse(token):
        raise AssertionError(f"{path} holds {token}, which is not JSON")

    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def test_a_simulator_runs_once():
    """A second run() started every trajectory again on the same records: each turn twice, silently (also after a
    run stopped by max_time)."""
    from dualpath_jax.sim.runner import build_simulator

    cfg = _cfg("dualpath,agents=3,turns=2")
    for first in ({}, {"max_time": 0.0}):
        sim = build_simulator(cfg)
        records, _, _ = sim.run(**first)
        n = len(records)
        with pytest.raises(RuntimeError, match=r"Simulator.run\(\) was already called on this simulator"):
            sim.run()
        assert len(sim.records) == n


def _arriving_at(t):
    """A trajectory whose arrival_time is forced past its own check (`Trajectory` refuses NaN, inf and negative ones
    when built and when assigned): the simulator still checks what it is given."""
    traj = Trajectory(0, [Turn(100, 5)])
    object.__setattr__(traj, "arrival_time", t)
    return traj


@pytest.mark.parametrize(
    "trajs, message",
    [
        ([Trajectory(0, [Turn(0, 5)])], "turn 0 of trajectory 0 has nothing to prefill: it appends no tokens"),
        # a later turn's empty prompt (a stated context of 0, nothing appended): the batcher's "empty batch", mid-run.
        # (A turn appending nothing after a context of whole blocks runs: the hit leaves its last prompt token.)
        (
            [Trajectory(3, [Turn(54, 10), Turn(0, 5, context_tokens=0)])],
            "turn 1 of trajectory 3 has nothing to prefill: it appends no tokens to an empty context",
        ),
        ([_arriving_at(math.nan)], "trajectory 0 arrives at nan s: it must be finite"),
        ([_arriving_at(math.inf)], "trajectory 0 arrives at inf s"),  # never arrived
        ([_arriving_at(-5.0)], r"trajectory 0 arrives at -5.0 s: .* >= 0"),
    ],
    ids=["empty_first_prompt", "empty_later_prompt", "nan_arrival", "inf_arrival", "negative_arrival"],
)
def test_trajectories_the_simulator_cannot_run_are_refused_when_built(trajs, message):
    from dualpath_jax.sim.config import SimConfigError
    from dualpath_jax.sim.runner import build_simulator

    with pytest.raises(SimConfigError, match=message):
        build_simulator(_cfg("dualpath"), trajs)
    # turns that generate nothing, or restate a longer context, still run
    odd = [Trajectory(0, [Turn(500, 0), Turn(0, 3), Turn(50, 10, context_tokens=2000)])]
    records, _, stats = build_simulator(_cfg("dualpath"), odd).run()
    assert len(records) == 3 and stats["unfinished_turns"] == 0


def test_capacity_search_refuses_a_warmup_that_judges_no_turn():
    """With warmup_s >= duration_s no probe judged a turn, so each "missed" the SLO: capacity 0, silently."""
    from dualpath_jax.sim.capacity import capacity_search

    cfg = _cfg("dualpath,duration=30,turns=3,warmup=30")
    with pytest.raises(ValueError, match=r"needs config.warmup_s < config.workload.duration_s .* got 30.0 and 30.0"):
        capacity_search(cfg, 0.05, 1.0, iters=1, drain_s=30.0)


def test_outputs_are_json_with_headers_and_no_earlier_plot(tmp_path, monkeypatch):
    """summary.json and metrics.write_json are strict JSON (NaN as null); turns.csv has its header with no turn;
    a run that draws no plot (--noplot, no matplotlib) removes an earlier run's plot.png instead of leaving it
    beside its own results; without matplotlib the plot is skipped, not a traceback after the run."""
    import csv
    import sys

    from dualpath_jax import metrics
    from dualpath_jax.sim import outputs

    res = run(_cfg("oracle,agents=2,turns=2"))
    assert math.isnan(res.summary["snic_max_over_avg"])  # oracle reads nothing from storage
    p = outputs.write_results(res, str(tmp_path), {}, plot=True)
    assert _strict_json(p["summary"])["summary"]["snic_max_over_avg"] is None
    assert os.path.exists(p["plot"])
    assert "plot" not in outputs.write_results(res, str(tmp_path), {}, plot=False)
    assert not (tmp_path / "plot.png").exists()
    metrics.write_json(str(tmp_path / "turns.json"), res.records, res.links)
    assert _strict_json(tmp_path / "turns.json")["summary"]["snic_max_over_avg"] is None
    unfinished = run(_cfg("dualpath,agents=2,turns=2"), max_time=1e-6)
    metrics.write_json(str(tmp_path / "cut.json"), unfinished.records)
    assert all(t["finished"] is None for t in _strict_json(tmp_path / "cut.json")["turns"])

    none = run(_cfg("dualpath,aps=0.5,duration=60,turns=2"), max_time=1e-3)  # no agent arrived yet
    assert not none.records
    outputs.write_results(res, str(tmp_path), {}, plot=True)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed (the optional `plot` extra)
    p = outputs.write_results(none, str(tmp_path), {}, plot=True)
    assert "plot" not in p and not (tmp_path / "plot.png").exists()
    assert next(csv.reader(open(p["turns"]))) == [f.name for f in dataclasses.fields(metrics.TurnRecord)]


def test_sweep_json_is_json_and_a_noplot_sweep_removes_an_earlier_plot(tmp_path):
    """sweep.json held NaN (oracle's storage-NIC max/avg), which strict JSON readers refuse; --noplot left an
    earlier sweep's sweep.png beside the new table; --seeds=0,00 ran every cell twice as seed 0."""
    (tmp_path / "sweep.png").write_bytes(b"an earlier sweep's plot")
    out = _launch(
        "experiments.sweep", f"--setups={TINY}", "--modes=oracle", "--loads=agents=2", "--extra=turns=2",
        "--workers=1", "--noplot", f"--output_dir={tmp_path}",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    (row,) = _strict_json(tmp_path / "sweep.json")
    assert row["mode"] == "oracle" and row["snic_max_over_avg"] is None
    assert not (tmp_path / "sweep.png").exists() and "removed " + str(tmp_path / "sweep.png") in out.stderr
    dup = _launch("experiments.sweep", f"--setups={TINY}", "--seeds=0,00")
    assert dup.returncode != 0 and "--seeds takes distinct integers" in dup.stderr


def test_reproduce_paper_report_json_is_json_and_noplot_removes_an_earlier_plot(tmp_path):
    """report.json held NaN (oracle's storage-NIC max/avg); --noplot left an earlier report.png; --seeds=0,00
    reported one seed as two ("seeds 0, 0")."""
    (tmp_path / "report.png").write_bytes(b"an earlier report's plot")
    out = _launch("experiments.reproduce_paper", "--agents=2", "--seeds=0,00", "--noplot", f"--output_dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    results = _strict_json(tmp_path / "report.json")
    assert sum(k.startswith("offline ") for k in results) == 5  # one seed
    assert any(k.endswith(":oracle,dataset=64K,agents=2,seed=0") and v["snic_max_over_avg"] is None
               for k, v in results.items())  # fmt: skip
    assert "2 agents, seed 0." in (tmp_path / "report.md").read_text()
    assert not (tmp_path / "report.png").exists() and "removed " + str(tmp_path / "report.png") in out.stderr


def test_throughputs_of_a_cut_run_count_the_finished_turns_only():
    """A run stopped by max_time: its JCT spans the finished turns, and so do the token throughputs (they counted
    the tokens of every arrived turn, ~3x the rate at which tokens were made here), as simulate's warning says."""
    res = run(_cfg("dualpath"), max_time=5.0)
    done = [r for r in res.records if not math.isnan(r.finished)]
    assert 0 < len(done) < len(res.records)
    s = res.summary
    assert s["gen_tokens_per_s"] == sum(r.gen_tokens for r in done) / s["jct_s"]
    assert s["prompt_tokens_per_s"] == sum(r.prompt_tokens for r in done) / s["jct_s"]
