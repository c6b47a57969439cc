"""Prefix hits across trajectories in the simulator (`workload.shared_prefix_hits`, session 34). A turn hit only its
own trajectory's context, so a trace whose sessions share prefixes (Mooncake: shared system prompts and documents,
the block hashes say which) ran with far fewer hits than it has: on mooncake_synthetic 45.9% of prompt tokens where
the trace's README gives ~0.64 with an unbounded cache (TTFT p50 89.8 s vs 20.1 s on DS 660B 2P4D). The runtime hits
them since 2026-12-05 (token ids from the hashes, one store). Now the simulator keeps the hashes of every prompt
prefilled so far and a turn hits the longest run of its leading blocks found there, in whole blocks, leaving one
token to prefill, where that is more than its own context."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import re

import numpy as np
import pytest

from dualpath_jax.sim import load_sim_config, run
from dualpath_jax.sim.runner import build_simulator, make_trajectories
from dualpath_jax.workloads.stats import shared_hit_rate, summarize
from dualpath_jax.workloads.types import Trajectory, Turn

TINY = "configs/sim_tiny.py"
TRACES = os.environ.get("DUALPATH_TRACES") or os.path.join(os.path.dirname(__file__), "..", "..", "shared", "traces")
B = 512  # the trace's hash block (tokens)


def _turn(n_tokens: int, hashes) -> Turn:
    return Turn(n_tokens, 8, block_hashes=np.asarray(hashes, np.int64), hash_block_size=B)


def _hits(trajs, shared: bool = True) -> dict:
    cfg = load_sim_config(f"{TINY}:dualpath")
    cfg.workload = dataclasses.replace(cfg.workload, shared_prefix_hits=shared)
    records, _, stats = build_simulator(cfg, trajs).run()
    assert stats["unfinished_turns"] == 0
    return {(r.trajectory_id, r.turn_index): r.hit_tokens for r in records}


def test_a_turn_hits_the_blocks_another_trajectorys_prompt_stored_before_it_arrived():
    """A (t = 0) stores 8 hash blocks; B (t = 500 s, long after A's prefill) shares A's first 3: it hits 3 x 512
    tokens; C arrives with A (t = 0, before A's prefill ended): nothing; D is A's whole prompt again: all of it but
    the last block of 64 (a turn prefills at least one token). Without shared hits none of them hits."""
    a = list(range(1, 9))
    trajs = [
        Trajectory(0, [_turn(8 * B, a)]),
        Trajectory(1, [_turn(6 * B, a[:3] + [91, 92, 93])], arrival_time=500.0),
        Trajectory(2, [_turn(6 * B, a[:3] + [81, 82, 83])], arrival_time=0.0),
        Trajectory(3, [_turn(8 * B, a)], arrival_time=600.0),
        Trajectory(4, [_turn(4 * B, [1, 70, 3, 4])], arrival_time=700.0),  # a chain: block 1 differs, so do the rest
    ]
    hits = _hits(trajs)
    assert hits == {(0, 0): 0, (1, 0): 3 * B, (2, 0): 0, (3, 0): 8 * B - 64, (4, 0): B}, hits
    assert set(_hits(trajs, shared=False).values()) == {0}


def test_a_turn_keeps_its_own_context_where_that_is_more():
    """A two-turn trajectory whose second turn shares nothing in the store beyond its own first prompt: the hit is
    its context in whole blocks (as before), not the stored blocks' shorter run."""
    first = _turn(3 * B, [1, 2, 3])
    second = Turn(B, 8, context_tokens=3 * B + 8, block_hashes=np.asarray([1, 2, 3, 4], np.int64), hash_block_size=B)
    hits = _hits([Trajectory(0, [first, second])])
    assert hits == {(0, 0): 0, (0, 1): 3 * B}, hits  # ((3B + 8) // 64) * 64


def test_turns_without_hashes_are_not_changed():
    """Synthetic turns carry no hashes: the same records with and without shared hits."""
    cfg = load_sim_config(f"{TINY}:dualpath,agents=4,turns=3")
    on = run(cfg)
    cfg.workload = dataclasses.replace(cfg.workload, shared_prefix_hits=False)
    off = run(cfg)
    assert [(r.prompt_tokens, r.hit_tokens, r.first_token) for r in on.records] == [
        (r.prompt_tokens, r.hit_tokens, r.first_token) for r in off.records
    ]


def _ideal_hit_fraction(rows) -> float:
    """Every earlier request's whole blocks stored by the time the next arrives (an unbounded cache, no latency):
    the most any turn can hit, in 64-token blocks and leaving one token, as the simulator counts."""
    stored, hit, total = set(), 0, 0
    for r in sorted(rows, key=lambda r: r["timestamp"]):
        n = 0
        for h in r["hash_ids"]:
            if h not in stored:
                break
            n += 1
        hit += (min(n * B, r["input_length"] - 1) // 64) * 64
        total += r["input_length"]
        stored.update(r["hash_ids"][: r["input_length"] // B])
    return hit / total


def test_a_mooncake_trace_hits_what_its_sessions_share():
    """On a real trace (mooncake_synthetic, 3,993 requests) the hit fraction rises from the sessions' own contexts
    (0.46) to near the unbounded cache's bound (0.65; some turns arrive before the prefill that stores their prefix
    ends, as on a real cluster), never past it."""
    path = os.path.join(TRACES, "mooncake_synthetic_trace.jsonl.gz")
    if not os.path.exists(path):
        pytest.skip(f"no trace at {path} (set DUALPATH_TRACES)")
    with gzip.open(path, "rt") as f:
        rows = [json.loads(x) for x in f]
    cfg = load_sim_config("configs/paper_ds660b.py:dualpath,kind=trace", {"workload.trace_path": path})
    res = run(cfg)
    assert res.stats["unfinished_turns"] == 0 and len(res.records) == len(rows)
    prompts = sum(r.prompt_tokens for r in res.records)
    shared = sum(r.hit_tokens for r in res.records) / prompts
    trajs, _ = make_trajectories(cfg)
    own = sum(hit for t in trajs for _, hit, _ in t.turn_shapes(64)) / prompts  # (as before: own contexts only)
    ideal = _ideal_hit_fraction(rows)
    assert 0.44 < own < 0.48 and 0.6 < ideal < 0.7, (own, ideal)
    assert own + 0.1 < shared <= ideal + 1e-12 and shared > 0.95 * ideal, (own, shared, ideal)
    # workload_stats' figure (the loader's trajectories, turns arriving together not seeing each other's blocks)
    st = summarize(trajs, 64)
    # (above the hashes' bound by a little: a turn's own context also holds its trajectory's generated tokens)
    assert math.isclose(st.hit_rate, own) and shared <= st.shared_hit_rate, (st, shared, ideal)
    assert abs(st.shared_hit_rate - ideal) < 0.01, (st.shared_hit_rate, ideal)


def test_workload_stats_hit_rate_across_trajectories():
    """Stored at arrival (no latency), unbounded; turns arriving at the same time do not see each other's blocks;
    a trajectory's own context where longer; None for turns without hashes (synthetic)."""
    a = list(range(1, 9))
    trajs = [
        Trajectory(0, [_turn(8 * B, a)]),
        Trajectory(1, [_turn(6 * B, a[:3] + [91, 92, 93])], arrival_time=1.0),  # 3 blocks of A
        Trajectory(2, [_turn(6 * B, a[:3] + [81, 82, 83])], arrival_time=0.0),  # with A: nothing
        Trajectory(3, [_turn(4 * B, [77])], arrival_time=2.0),  # a first block nobody stored
    ]
    expected = 3 * B / (8 * B + 6 * B + 6 * B + 4 * B)
    assert math.isclose(shared_hit_rate(trajs, 64), expected)
    assert summarize(trajs, 64).shared_hit_rate == shared_hit_rate(trajs, 64)
    assert summarize(trajs, 64).hit_rate == 0.0
    assert shared_hit_rate([Trajectory(0, [Turn(100, 5), Turn(50, 5)])], 64) is None


def test_shared_prefix_hits_is_checked_and_refused_where_it_does_nothing():
    cfg = load_sim_config(f"{TINY}:dualpath")
    cfg.workload = dataclasses.replace(cfg.workload, shared_prefix_hits="false")
    with pytest.raises(ValueError, match=r"config.workload.shared_prefix_hits must be true or false, got 'false'"):
        run(cfg)
    with pytest.raises(ValueError, match=r"config.workload.shared_prefix_hits applies to trace workloads only"):
        load_sim_config(f"{TINY}:dualpath", {"workload.shared_prefix_hits": False}, as_run=True)


def test_bench_runtimes_simulator_copy_hits_what_first_prompts_share():
    """`experiments.bench_runtime`'s simulator copy of a runtime run: two agents whose first prompts (a trace's ids)
    share their first 3 blocks of 16 tokens; the second arrives later and hits them, as the runtime's store does (the
    copy counted each trajectory's own context only). Turns without ids (tiny agents) are left as they are."""
    pytest.importorskip("ml_collections")
    from configs.tiny_runtime import get_config
    from dualpath_jax.runtime.config import RuntimeConfig
    from experiments import bench_runtime
    from schedulers.cost_model import MODEL_SHAPES, CostModel

    cfg = RuntimeConfig.from_config_dict(get_config().runtime).replace(block_size=16, **{"workload.arrival": "trace"})
    cost = CostModel(MODEL_SHAPES.get("ds27b"), "cpu")
    rng = np.random.default_rng(0)
    common = rng.integers(0, 1000, 48)
    ids = [np.concatenate([common, rng.integers(0, 1000, 40)]) for _ in range(2)]
    trajs = [
        Trajectory(0, [Turn(88, 4, append_token_ids=ids[0]), Turn(20, 4)]),
        Trajectory(1, [Turn(88, 4, append_token_ids=ids[1])], arrival_time=50.0),
        Trajectory(2, [Turn(60, 4)], arrival_time=60.0),
    ]
    hashed = bench_runtime.with_first_prompt_hashes(trajs, 16)
    assert len(hashed[0].turns[0].block_hashes) == 5 and hashed[0].turns[1].block_hashes is None
    assert list(hashed[0].turns[0].block_hashes[:3]) == list(hashed[1].turns[0].block_hashes[:3])
    assert hashed[0].turns[0].block_hashes[3] != hashed[1].turns[0].block_hashes[3] and hashed[2] is trajs[2]
    sim = bench_runtime.build_simulator(cfg, trajs, cost, {"block_size": 16})
    records, _, stats = sim.run()
    assert stats["unfinished_turns"] == 0
    hits = {(r.trajectory_id, r.turn_index): r.hit_tokens for r in records}
    assert hits == {(0, 0): 0, (0, 1): 80, (1, 0): 48, (2, 0): 0}, hits


def test_variant_items_replay_a_trace_and_switch_shared_hits():
    """`trace=NAME` (the workload replays it) and `shared_hits=true|false` variant items, so a sweep can run a trace
    (`--extra=trace=...`) and compare the hits (`--loads=shared_hits=true,shared_hits=false`): a trace path could only
    come from a setup file of one's own before. A path's '/' does not make directories of the output dir's name."""
    trace = os.path.join(TRACES, "mooncake_conversation_trace.jsonl.gz")
    cfg = load_sim_config(f"{TINY}:dualpath,trace={trace},shared_hits=false", as_run=True)
    assert (
        cfg.workload.kind == "trace" and cfg.workload.trace_path == trace and cfg.workload.shared_prefix_hits is False
    )
    assert load_sim_config(f"{TINY}:trace=x.jsonl,kind=trace").workload.shared_prefix_hits is True
    from dualpath_jax.sim.configs_io import load_config

    out = load_config(f"{TINY}:trace=../a/b.jsonl").output_dir
    assert out == "results/sim/sim_tiny/trace-.._a_b.jsonl", out
    for variant, says in [
        ("trace=x.jsonl,kind=offline", "trace= replays a trace; it cannot go with kind=offline"),
        ("trace=x.jsonl,aps=0.5", "trace= replays a trace; it cannot go with aps="),
        ("shared_hits=maybe", "shared_hits must be true or false"),
    ]:
        with pytest.raises(ValueError, match=re.escape(says)):
            load_sim_config(f"{TINY}:{variant}")
    with pytest.raises(
        ValueError, match=r"config variant item 'shared_hits=false' \(config.workload.shared_prefix_hits\)"
    ):
        load_sim_config(f"{TINY}:dualpath,shared_hits=false", as_run=True)  # (synthetic agents share nothing)


def test_synthetic_items_on_a_setup_that_replays_a_trace_are_refused(tmp_path):
    """A setup file of kind trace: `aps=` ran the dataset's synthetic agents online and `dataset=` was ignored, both
    silently (a sweep's loads over them gave rows of another workload, or identical rows). Refused unless the variant
    also names the kind (then the synthetic agents are what is asked for)."""
    setup = tmp_path / "trace_setup.py"
    setup.write_text(
        "from configs.sim_base import apply_variant\nfrom configs.sim_tiny import get_config as _tiny\n\n"
        "def get_config(arg=None):\n    cfg = _tiny()\n    cfg.workload.kind = 'trace'\n"
        "    cfg.workload.trace_path = 'mooncake_conversation_trace.jsonl.gz'\n    return apply_variant(cfg, arg)\n"
    )
    for item in ("aps=0.5", "dataset=48K"):
        with pytest.raises(
            ValueError, match=re.escape(f"{item} is for synthetic agents, and this setup replays a trace")
        ):
            load_sim_config(f"{setup}:dualpath,{item}")
    assert load_sim_config(f"{setup}:dualpath,kind=online,aps=0.5").workload.kind == "online"
    assert load_sim_config(f"{setup}:dualpath,kind=offline,dataset=48K").workload.dataset == "48K"
    assert load_sim_config(f"{setup}:dualpath,turns=2").workload.kind == "trace"


def test_simulate_says_when_no_turn_was_judged(tmp_path):
    """A trace run whose SLO warm-up ends after every turn judged nothing, and the table's `slo_met False` read as a
    miss; `experiments.simulate` now says so under the table."""
    from test_launch_hunt import _launch

    trace = tmp_path / "t.jsonl"
    rows = [
        {"timestamp": 1000 * i, "input_length": 700, "output_length": 8, "hash_ids": [i, 100 + i]} for i in range(3)
    ]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = _launch(
        "-m",
        "experiments.simulate",
        f"--config={TINY}:dualpath,trace={trace},warmup=1e7",
        f"--config.output_dir={tmp_path / 'out'}",
        "--noplot",
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "note: no turn arrived in the SLO's window (config.warmup_s=1e+07): nothing was judged" in out.stdout
