"""The simulator's records say what the modelled system does (2026-12-03, each test failed before its fix):
- the DE host buffer holds the whole prompt KV (the DE-side hit it read and the PE -> DE KV) until the H2D into DE
  HBM, with the buffer's FIFO admission and no deadlock (DESIGN.md "Data paths");
- oracle (all I/O free) records read no bytes from storage (metrics.TurnRecord: bytes read from storage);
- `second_token` is when the turn's first decode step after joining ends (the runtime stamps tokens when they come
  out), none for a 1-token turn;
- experiments.bench_runtime's simulator config gets the checks a config file gets when it loads."""

import dataclasses
import math
import random
import types

import pytest

from dualpath_jax.sim import load_sim_config
from dualpath_jax.sim.config import GB
from dualpath_jax.sim.runner import build_simulator
from dualpath_jax.workloads.types import Trajectory, Turn

TINY = "configs/sim_tiny.py"


def _one_engine(variant: str, **over):
    """1P1D with one GPU a node: one PE, one DE, one node each; fifo batcher, one request a forward."""
    return load_sim_config(
        f"{TINY}:{variant},batcher.max_requests=1",
        {"batcher.name": "fifo", "cluster.gpus_per_node": 1, **over},
    )


def _de_buffer_overlaps(sim, records):
    """Per DE node, the most prompt KV bytes of requests between their read start (the DE room is taken at or before
    it) and their first token (the H2D into DE HBM is done just before it), over instants where more than one
    request holds room. Records of one DE node only; half-open intervals [read_start, first_token)."""
    b = sim.b
    node_of = {eid: de.node.nid for eid, de in sim.des.items()}
    worst = {}
    for nid in set(node_of.values()):
        recs = [r for r in records if node_of[r.decode_engine] == nid]
        for r in recs:
            t = r.read_start
            live = [q for q in recs if q.read_start <= t < q.first_token]
            if len(live) > 1:
                worst[nid] = max(worst.get(nid, 0.0), sum(q.prompt_tokens for q in live) * b)
    return worst


# ---- 1. the DE buffer holds the PE -> DE KV ----------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["layerwise", "basic", "pe_only"])
def test_the_de_buffer_holds_the_kv_the_pe_sends(mode):
    """PE path, first turns (nothing to read): all the prompt KV lands in the DE buffer from the PE. Room for one
    prompt and a half: the second request may not start until the first's KV left the buffer for DE HBM. The DE
    buffer used to change for DE-side storage reads only, so both went ahead together."""
    b = 23640  # ds27b KV bytes per token
    buf = 1.5 * 4000 * b
    cfg = _one_engine(mode, **{"cluster.host_buffer_gb": buf / GB, "cluster.pe_hbm_kv_gb": 1.0})
    trajs = [Trajectory(0, [Turn(4000, 40)]), Trajectory(1, [Turn(4000, 40)])]
    sim = build_simulator(cfg, trajs)
    records, _, stats = sim.run()
    assert stats["unfinished_turns"] == 0
    first, second = sorted(records, key=lambda r: r.read_start)
    assert second.read_start >= first.first_token  # its room was taken once the first one's KV was in HBM
    assert second.prefill_start >= first.first_token
    assert not _de_buffer_overlaps(sim, records)
    node = sim.des[first.decode_engine].node
    assert node.buffer_free == buf and node.buf_held == 0 and not node.buf_queue


def test_the_de_buffer_counts_the_de_side_read_and_the_miss_from_the_pe():
    """DE path, second turns: the DE-side hit (read into the DE buffer) + the miss the PE sends back is the whole
    prompt. Room for 1.5 prompts holds both hits (1.2 prompts) but not both prompts: the second request's read waits
    for the first one's H2D. It used to start at once (the buffer counted the hits only)."""
    b = 23640
    cfg = _one_engine("de_only", **{"cluster.writeback": False})
    # turn 1 of each: 3,008 cached tokens (47 blocks of 64) + a 2,000-token append = 5,008 tokens of prompt
    trajs = [Trajectory(i, [Turn(3000, 8), Turn(2000, 8)]) for i in range(2)]
    prompt = 3008 + 2000
    cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, host_buffer_gb=1.5 * prompt * b / GB))
    sim = build_simulator(cfg, trajs)
    records, _, stats = sim.run()
    assert stats["unfinished_turns"] == 0
    late = sorted([r for r in records if r.turn_index == 1], key=lambda r: r.read_start)
    assert [r.prompt_tokens for r in late] == [prompt, prompt] and all(r.de_read_bytes > 0 for r in late)
    assert late[1].read_start >= late[0].first_token
    assert all(v <= 1.5 * prompt * b for v in _de_buffer_overlaps(sim, records).values())  # the first turns fit


def test_a_prompt_larger_than_the_whole_de_buffer_runs_alone():
    """Room is FIFO; a request needing more than all of it is let in once no request holds any (never waits
    forever), and the next one waits for it."""
    cfg = _one_engine("dualpath", **{"cluster.host_buffer_gb": 2000 * 23640 / GB})
    trajs = [Trajectory(0, [Turn(500, 4)]), Trajectory(1, [Turn(6000, 4)]), Trajectory(2, [Turn(500, 4)])]
    sim = build_simulator(cfg, trajs)
    records, _, stats = sim.run()
    assert stats["unfinished_turns"] == 0
    by = {r.trajectory_id: r for r in records}
    assert by[1].read_start >= by[0].first_token and by[2].read_start >= by[1].first_token


def _random_buffer_config(seed: int):
    rng = random.Random(seed)
    mode = rng.choice(["basic", "layerwise", "dualpath_rr", "dualpath", "split", "de_only", "pe_only"])
    items = [mode, f"pd={rng.randint(1, 2)}P{rng.randint(1, 2)}D", f"agents={rng.choice([3, 8])}", "turns=3"]
    items.append(f"seed={rng.randint(0, 9)}")
    over = {
        "cluster.gpus_per_node": rng.choice([1, 2]),
        # from less than one prompt to a few: every admission case (alone, FIFO wait, no wait)
        "cluster.host_buffer_gb": rng.choice([0.005, 0.05, 0.3, 1.0]),
        "cluster.pe_hbm_kv_gb": rng.choice([0.05, 1.0]),
        "cluster.max_reads_per_node": rng.choice([1, 3]),
    }
    if rng.random() < 0.5:  # chunked prefill: earlier chunks are reloaded from the DE buffer
        over["batcher.name"] = "fifo"
        items.append(f"batcher.token_budget={rng.choice([256, 2048])}")
    return load_sim_config(f"{TINY}:{','.join(items)}", over)


@pytest.mark.parametrize("seed", range(10))
def test_small_buffers_never_deadlock_and_are_given_back(seed):
    """Reads, PE -> DE transfers and H2D with buffers from below one prompt to a few: every turn finishes, the DE
    buffer holds at most its size whenever two requests share it, and all of it is free at the end."""
    cfg = _random_buffer_config(seed)
    sim = build_simulator(cfg)
    records, _, stats = sim.run()
    assert stats["unfinished_turns"] == 0 and len(records) == sum(len(t.turns) for t in sim.trajectories)
    cap = cfg.cluster.host_buffer_gb * GB
    assert all(v <= cap * (1 + 1e-12) for v in _de_buffer_overlaps(sim, records).values())
    for node in sim.nodes:
        assert node.buffer_free == pytest.approx(cap, abs=1.0) and node.buf_held == 0 and not node.buf_queue


# ---- 2. oracle reads nothing --------------------------------------------------------------------------------------
def test_oracle_records_read_no_bytes_from_storage():
    """Oracle makes every storage read free: nothing crosses a storage NIC, and the records (bytes read from storage
    on each node, metrics.TurnRecord) say so. They used to carry the bytes the policy's read side would have read."""
    from dualpath_jax.sim.runner import run

    res = run(load_sim_config(f"{TINY}:oracle,agents=6,turns=4"))
    assert any(r.hit_tokens for r in res.records)
    assert all(r.pe_read_bytes == 0 and r.de_read_bytes == 0 for r in res.records)
    assert res.summary["pe_read_bytes"] == res.summary["de_read_bytes"] == 0
    assert all(r.read_side in ("pe", "de", "split") for r in res.records)  # the path the policy assigned
    dual = run(load_sim_config(f"{TINY}:dualpath,agents=6,turns=4"))  # the others still count their reads
    b = 23640
    assert all(abs(r.pe_read_bytes + r.de_read_bytes - r.hit_tokens * b) <= 2 for r in dual.records)


# ---- 3. the second token -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lockstep", [False, True])
def test_the_second_token_is_the_end_of_the_first_decode_step(lockstep):
    """A 2-token turn joins its DE alone; a long turn joins during its only decode step and slows the batch. Its
    second token is its last: out when that step ends, at `finished`. It was timed at the join as one step of the
    batch then, before the slow-down (second_token < finished). Slow decode steps (de_time_scale) so the long turn
    joins within the short one's step."""
    cfg = _one_engine("oracle", **{"cluster.de_time_scale": 1000.0, "cluster.decode_lockstep": lockstep})
    trajs = [Trajectory(0, [Turn(64, 2)]), Trajectory(1, [Turn(8000, 5)])]
    records, _, _ = build_simulator(cfg, trajs).run()
    short, long_ = sorted(records, key=lambda r: r.trajectory_id)
    assert short.first_token < long_.first_token < short.finished  # joined during the short one's step
    assert short.second_token == short.finished
    assert short.first_token < long_.second_token < long_.finished


def test_the_second_token_of_a_longer_turn_and_none_for_one_token():
    """Alone on its DE (its batch never changes) the second token is one step after the first, and the remaining
    gen - 2 tokens take as long each; a 1-token turn has no second token (NaN, as in the runtime's records; it
    used to be its first token's time)."""
    cfg = _one_engine("oracle")
    trajs = [Trajectory(0, [Turn(700, 1), Turn(300, 9)])]
    records, _, _ = build_simulator(cfg, trajs).run()
    one, nine = records
    assert math.isnan(one.second_token) and math.isnan(one.ttst)
    step = nine.second_token - nine.first_token
    assert step > 0 and nine.finished - nine.first_token == pytest.approx(8 * step, rel=1e-9)


def test_the_second_token_over_random_runs_is_ordered():
    """Every turn of a few runs: first <= second <= finished, second exactly NaN for 1-token turns."""
    for spec in ("dualpath,agents=8,turns=5", "basic,agents=8,turns=5,pd=1P2D"):
        for lockstep in (False, True):
            cfg = load_sim_config(f"{TINY}:{spec}", {"cluster.decode_lockstep": lockstep})
            records, _, stats = build_simulator(cfg).run()
            assert stats["unfinished_turns"] == 0
            for r in records:
                if r.gen_tokens <= 1:
                    assert math.isnan(r.second_token), r
                else:
                    assert r.first_token < r.second_token <= r.finished, r


# ---- 4. bench_runtime's simulator config is checked ---------------------------------------------------------------
def _runtime_like(**buffers):
    """What experiments.bench_runtime reads of a runtime config (configs/tiny_runtime.py's values)."""
    ns = types.SimpleNamespace
    return ns(
        cluster=ns(prefill_nodes=1, decode_nodes=2, engines_per_node=1, decode_slots=8, max_seq_len=4096,
                   prefill_token_budget=512, prefill_max_batch=8, layerwise=True, pe_hbm_kv_bytes=0),
        nics=ns(snic_bytes_per_s=4e6, cnic_bytes_per_s=16e6, high_priority_share=0.99),
        buffers=ns(pe_buffer_bytes=buffers.get("pe", 64 << 20), de_buffer_bytes=64 << 20),
        block_size=64,
        scheduler=ns(name="dualpath", batcher="fifo", batcher_kwargs={}, fetch_interval_s=0.005),
    )  # fmt: skip


def test_bench_runtime_simulator_config_is_checked():
    """bench_runtime built its SimConfig in code and handed it to the Simulator unchecked: a host buffer of 0 bytes
    ran (reads and transfers with no buffer at all). It is checked now as a config file is when it loads: a
    ValueError naming the field (bench_runtime prints it as one line, before the runtime's runs)."""
    pytest.importorskip("ml_collections")
    from experiments import bench_runtime
    from schedulers.cost_model import MODEL_SHAPES, CostModel

    cost = CostModel(MODEL_SHAPES.get("ds27b"), "cpu")
    trajs = [Trajectory(0, [Turn(300, 4), Turn(50, 4)])]
    kw = {"block_size": 64}
    ok = bench_runtime.simulate(_runtime_like(), trajs, cost, kw)
    assert ok["unfinished_turns"] == 0
    with pytest.raises(ValueError, match=r"config\.cluster\.host_buffer_gb must be > 0, got 0\.0"):
        bench_runtime.simulate(_runtime_like(pe=0), trajs, cost, kw)
    with pytest.raises(ValueError, match=r"config\.scheduler\.kwargs .*alpha_tokens"):
        bench_runtime.simulate(_runtime_like(), trajs, cost, {"alpha_tokens": -5})
