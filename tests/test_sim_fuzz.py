"""What a randomized robustness hunt of the simulator found (2026-12-03), as deterministic regressions, and a small
seeded sweep of random configs that keeps checking the invariants the hunt checked (every turn of an offline run
finishes, timestamps ordered, read / SNIC / CNIC bytes conserved, buckets sum to the link totals, everything given
back at the end, the same seed gives the same run)."""

import dataclasses
import math
import random
import re
import time

import pytest

from dualpath_jax.metrics import TIMESTAMPS
from dualpath_jax.sim import load_sim_config
from dualpath_jax.sim.config import GB, SimConfigError
from dualpath_jax.sim.runner import build_simulator
from dualpath_jax.workloads.types import Trajectory, Turn, stored_kv_tokens

TINY = "configs/sim_tiny.py"


def _replace(cfg, **cluster):
    return dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, **cluster))


@pytest.mark.parametrize("mode", ["oracle", "dualpath"])
def test_a_turn_never_finishes_before_its_second_token(mode):
    """The second token is timed when a turn joins its DE's batch (one step of that batch). A 2-token turn that
    joined behind a long one that then left decoded its last token sooner, at the smaller batch's step: its
    record said it finished before its second token (second_token > finished)."""
    cfg = load_sim_config(f"{TINY}:{mode},batcher.max_requests=1", {"batcher.name": "fifo", "cluster.gpus_per_node": 1})
    # one PE and one DE; the fifo batcher prefills one request a forward, so the short turn joins the DE while the
    # long one decodes its only step, and the long one leaves before the short one's step is over
    trajs = [Trajectory(0, [Turn(20000, 2)]), Trajectory(1, [Turn(64, 2)])]
    records, _, stats = build_simulator(cfg, trajs).run()
    assert stats["unfinished_turns"] == 0 and len(records) == 2
    for r in records:
        chain = [getattr(r, name) for name in TIMESTAMPS]
        assert all(a <= b for a, b in zip(chain, chain[1:], strict=False)), r


def _late_agents(arrival):
    return [Trajectory(i, [Turn(500 + 37 * i, 50 + 13 * i) for _ in range(3)], arrival + 0.001 * i) for i in range(4)]


@pytest.mark.parametrize("arrival, de_time_scale", [(1e6, 1e-3), (1e8, 1.0), (1.7e9, 2.2)])
def test_decode_finishes_late_in_a_long_clock(arrival, de_time_scale):
    """Late on the clock (a trace of Unix timestamps: 1.7e9 s) a double cannot step by a small fraction of a decode
    step. A decode finish that the rounded clock left a few millionths of a token short of its target was
    rescheduled at that same instant, forever (the run spun at one time: tens of millions of events). It is due
    when its finish would not move the clock."""
    cfg = load_sim_config(f"{TINY}:oracle", {"cluster.de_time_scale": de_time_scale})
    sim = build_simulator(cfg, _late_agents(arrival))
    t0 = time.perf_counter()

    def guard(now, done, events):
        assert time.perf_counter() - t0 < 30, f"spinning at {now!r}: {done} turns done, {events} events"

    records, _, stats = sim.run(progress=guard)
    assert stats["unfinished_turns"] == 0 and len(records) == 12 and stats["events"] < 1000
    assert all(r.arrival <= r.first_token <= r.second_token <= r.finished for r in records)


@pytest.mark.parametrize("seed", [7, 20, 24])
def test_basic_admits_a_prompt_larger_than_the_pe_hbm_when_the_hbm_is_free(seed):
    """basic (not layerwise) reserves PE HBM for a whole prompt; one larger than all of it runs alone once no
    request holds any. That was `free bytes < all of it`: with a bytes-per-token that is not an integer
    (cluster.kv_bytes_per_token = 3.3) the freed bytes summed to a rounding below the total (12705.0 of
    12705.000000000002), and the large prompt waited forever: an offline run ended with turns never run."""
    rng = random.Random(seed)
    cfg = load_sim_config(
        f"{TINY}:basic",
        {
            "cluster.gpus_per_node": 1,
            "cluster.kv_bytes_per_token": 3.3,
            "cluster.pe_hbm_kv_gb": 5000 * 3.3 / 1e9 * rng.choice([1.0, 0.77, 1.3]),
        },
    )
    trajs = [
        Trajectory(
            i, [Turn(rng.choice([100, 333, 1234, 4999, 7000]), rng.choice([1, 5])) for _ in range(rng.randint(1, 4))]
        )
        for i in range(rng.randint(2, 10))
    ]
    sim = build_simulator(cfg, trajs)
    records, _, stats = sim.run(max_time=1e6)
    assert stats["unfinished_turns"] == 0 and len(records) == sum(len(t.turns) for t in trajs)
    (pe,) = sim.pes.values()
    assert pe.hbm_held == 0 and pe.hbm_free == cfg.cluster.pe_hbm_kv_gb * GB and not pe.admit_queue


def test_an_infinite_slo_bound_still_means_no_bound():
    cfg = load_sim_config(f"{TINY}:dualpath,aps=0.5,duration=4,turns=2", {"slo_ttft_s": math.inf})
    assert build_simulator(cfg).run()[2]["unfinished_turns"] == 0


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("gpus_per_node", 1.5, "config.cluster.gpus_per_node must be an integer, got 1.5"),  # range(1.5)
        ("fetch_window", 2.5, "config.cluster.fetch_window must be an integer, got 2.5"),  # a slice of 2.5
        ("block_size", 64.0, "config.cluster.block_size must be an integer, got 64.0"),  # float token counts
    ],
)
def test_counts_set_in_code_must_be_integers(field, value, message):
    """The config files' overrides are typed (ml_collections refuses 1.5 for an int); a SimConfig changed in code
    was not: a fraction failed deep in the run (a TypeError) or ran on float token counts."""
    cfg = load_sim_config(f"{TINY}:agents=2,turns=2")
    with pytest.raises(ValueError, match=re.escape(message)):
        build_simulator(_replace(cfg, **{field: value}))


@pytest.mark.parametrize(
    "variant, message",
    [
        ("aps=0.5,duration=inf", "config.workload.duration_s must be finite, got inf"),  # was an OverflowError
        ("aps=nan,duration=5", "config.workload.aps must be a number, got nan"),  # was refused only when built
    ],
)
def test_online_rate_and_duration_are_checked_when_the_config_loads(variant, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_sim_config(f"{TINY}:dualpath,{variant}")


def test_a_workload_kind_is_checked_when_the_config_loads():
    with pytest.raises(ValueError, match=re.escape("config.workload.kind must be offline | online | trace, got 'x'")):
        load_sim_config(TINY, {"workload.kind": "x"})


def test_max_context_tokens_that_leaves_no_turn_is_refused(tmp_path):
    """A context limit below every trajectory's first turn cut the whole workload away, and the run "completed"
    with no records (turns 0, NaN figures written as results)."""
    import json

    trace = tmp_path / "session.json"
    requests = [{"type": "n", "t": 0.0, "in": 9000, "out": 100, "hash_ids": list(range(140))}]
    trace.write_text(json.dumps({"id": "s", "block_size": 64, "requests": requests}))
    spec = f"{TINY}:dualpath,kind=trace"
    cfg = load_sim_config(spec, {"workload.trace_path": str(trace), "workload.max_context_tokens": 5000})
    with pytest.raises(SimConfigError, match=r"max_context_tokens = 5,000 leaves no turn to run.*9,100 tokens"):
        build_simulator(cfg)
    cfg = load_sim_config(spec, {"workload.trace_path": str(trace), "workload.max_context_tokens": 9100})
    assert len(build_simulator(cfg).run()[0]) == 1


# ---- a small seeded sweep of random configs -------------------------------------------------------------
def _random_config(seed: int):
    rng = random.Random(seed)
    mode = rng.choice(["basic", "layerwise", "dualpath_rr", "dualpath", "oracle", "split", "de_only", "random"])
    items = [mode, f"pd={rng.randint(1, 2)}P{rng.randint(1, 2)}D", f"agents={rng.choice([1, 3, 8])}"]
    items += [f"turns={rng.choice([1, 3])}", f"seed={rng.randint(0, 9)}"]
    over = {"cluster.gpus_per_node": rng.choice([1, 2, 3]), "cluster.bucket_s": rng.choice([0.5, 1.0])}
    if rng.random() < 0.5:
        over["batcher.name"] = "fifo"
        items.append(f"batcher.token_budget={rng.choice([64, 513, 8192])}")
    for key, values in (
        ("cluster.snic_gbps", [0.5, 5.0]),
        ("cluster.cnic_duplex", [False]),
        ("cluster.dram_gbps", [1.0]),
        ("cluster.storage_gbps", [2.0]),
        ("cluster.host_buffer_gb", [0.01, 0.1]),
        ("cluster.pe_hbm_kv_gb", [0.01, 0.1]),
        ("cluster.de_hbm_kv_gb", [1.0, 3.0]),
        ("cluster.block_size", [16, 256]),
        ("cluster.collective_bytes_per_token", [1e5]),
        ("cluster.max_reads_per_node", [1, 2]),
        ("cluster.read_stream_gbps", [0.0, 0.5]),
        ("cluster.fetch_scope", ["global"]),
        ("cluster.fetch_window", [1, 2]),
        ("cluster.writeback", [False]),
        ("cluster.decode_lockstep", [True]),
    ):
        if rng.random() < 0.25:
            over[key] = rng.choice(values)
    return load_sim_config(f"{TINY}:{','.join(items)}", over)


def _check_invariants(cfg, sim, records, links, stats):
    c = cfg.cluster
    b = sim.b
    assert stats["unfinished_turns"] == 0 and len(records) == sum(len(t.turns) for t in sim.trajectories)
    for r in records:
        # a 1-token turn has no second token (NaN, as in the runtime's records; tests/test_sim_fidelity.py)
        chain = [getattr(r, name) for name in TIMESTAMPS if name != "second_token" or r.gen_tokens > 1]
        assert all(math.isfinite(x) for x in chain), r
        assert r.gen_tokens > 1 or math.isnan(r.second_token), r
        assert all(x <= y for x, y in zip(chain, chain[1:], strict=False)), r
        if not c.io_free:
            assert abs(r.pe_read_bytes + r.de_read_bytes - r.hit_tokens * b) <= 2, r
        else:  # oracle reads nothing from storage (tests/test_sim_fidelity.py)
            assert r.pe_read_bytes == r.de_read_bytes == 0, r
    totals = stats["link_totals"]
    if c.io_free:
        assert not any(totals.values())
    else:
        writes = 0.0
        if c.writeback:
            bs = c.block_size
            kv = [stored_kv_tokens(r.prompt_tokens, r.gen_tokens) for r in records]  # (all but the last token)
            writes = sum(max((k // bs) * bs - r.hit_tokens, 0) * b for k, r in zip(kv, records, strict=True))
        snic = sum(v for k, v in totals.items() if k.startswith("snic/"))
        assert snic == pytest.approx(sum(r.hit_tokens for r in records) * b + writes, rel=1e-6, abs=len(records))
        if c.cnic_duplex:  # PE outputs: new KV (+ the PE-side hit, layerwise); all of the prompt's KV in basic
            pe_out = sum(totals[f"cnic/engine{e}/out"] for e in sim.pes)
            de_in = sum(totals[f"cnic/engine{e}/in"] for e in sim.des)
            if c.layerwise:
                out = sum((r.prompt_tokens - r.hit_tokens) * b + r.pe_read_bytes for r in records)
            else:
                out = sum(r.prompt_tokens * b for r in records)
            assert pe_out == pytest.approx(out, rel=1e-6, abs=2 * len(records))
            assert de_in == pytest.approx(
                out + sum(r.prompt_tokens * b for r in records), rel=1e-6, abs=2 * len(records)
            )
    bucketed = {}
    for s in links:
        if not s.link.endswith("/high"):
            bucketed[s.link] = bucketed.get(s.link, 0) + s.nbytes
    for name, total in totals.items():
        assert bucketed.get(name, 0) == pytest.approx(total, rel=1e-6, abs=len(links) + 1), name
    # everything given back
    assert not sim.requests and not sim.queue and not sim.net.flows
    for e in sim.snapshot.engines.values():
        assert e.seq == 0 and e.tok == 0
    for pe in sim.pes.values():
        assert not pe.queue and not pe.admit_queue and not pe.busy and pe.hbm_held == 0
    for de in sim.des.values():
        assert not de.active and not de.alloc_queue and de.hbm_free == de.state.free_hbm_tokens
    for node in sim.nodes:
        assert node.reads_active == 0 and not node.read_queue and node.buf_held == 0 and not node.buf_queue
        assert node.buffer_free == pytest.approx(c.host_buffer_gb * GB, abs=1.0)


@pytest.mark.parametrize("seed", range(12))
def test_random_small_configs_keep_the_invariants(seed):
    cfg = _random_config(seed)
    try:
        sim = build_simulator(cfg)
    except SimConfigError as e:  # a turn no DE can hold: refused before the run, naming it
        assert "more than a decode engine's HBM holds" in str(e)
        return
    records, links, stats = sim.run()
    _check_invariants(cfg, sim, records, links, stats)
    again = build_simulator(cfg).run()
    assert [dataclasses.astuple(r) for r in again[0]] == [dataclasses.astuple(r) for r in records]
    assert again[1] == links


def test_a_basic_prefill_reads_on_the_pe_side():
    """Not layerwise, every hit is read on the PE side: a policy that may read on the DE side is refused (de_only ran
    with its hits read on the PE node, silently; fix26), and pe_only's records say "pe" with every byte read there."""
    with pytest.raises(SimConfigError, match=r"policy 'de_only' may read on the DE side"):
        load_sim_config(f"{TINY}:de_only,agents=4,turns=3", {"cluster.layerwise": False})
    cfg = load_sim_config(f"{TINY}:pe_only,agents=4,turns=3", {"cluster.layerwise": False})
    records, _, _ = build_simulator(cfg).run()
    assert any(r.pe_read_bytes for r in records)
    assert all(r.read_side == "pe" and r.de_read_bytes == 0 for r in records)
