"""The simulator's hits and store writes are the runtime's: the KV a turn leaves stored is its prompt + generation but
the last generated token (never fed back: `driver.slot_tokens`), and a hit leaves at least one prompt token to prefill
(`scheduler_service`). The simulator hit (and stored) `(prompt + gen) // block_size` blocks, one block more than the
runtime where prompt + gen is a multiple of the block size, and refused a turn appending nothing after such a context
("has nothing to prefill") which the runtime serves (lasttoken audit)."""

from __future__ import annotations

import pytest
from test_fix22_simstore import TINY, _with
from test_runtime import expected_hit

from configs.tiny_runtime import get_config
from dualpath_jax.runtime import driver
from dualpath_jax.runtime.config import RuntimeConfig
from dualpath_jax.sim import load_sim_config, run
from dualpath_jax.workloads import summarize
from dualpath_jax.workloads.types import Trajectory, Turn

# (trajectory, block size, hits): turn 0's prompt + generation ends on a block boundary, or one token past it
EDGES = [
    (Trajectory(0, [Turn(15, 1), Turn(1, 1)]), 16, [0, 0]),  # 15 KV tokens stored: no whole block
    (Trajectory(1, [Turn(15, 1), Turn(0, 1)]), 16, [0, 0]),  # appends nothing: its last prompt token is computed
    (Trajectory(2, [Turn(15, 2), Turn(1, 1)]), 16, [0, 16]),  # 16 stored: the block is whole
    (Trajectory(3, [Turn(16, 1), Turn(0, 1)]), 16, [0, 16]),  # 16 stored, prompt 17
    (Trajectory(4, [Turn(640, 64), Turn(10, 1), Turn(0, 3)]), 64, [0, 640, 704]),
    (Trajectory(5, [Turn(100, 0), Turn(28, 1)]), 64, [0, 64]),  # generating nothing, the whole prompt is stored
]


@pytest.mark.parametrize("traj, bs, hits", EDGES, ids=[f"traj{t.trajectory_id}" for t, _, _ in EDGES])
def test_hits_are_whole_blocks_of_the_stored_kv(traj, bs, hits):
    assert [h for _, h, _ in traj.turn_shapes(bs)] == hits
    assert [traj.hit_tokens(i, bs) for i in range(len(traj.turns))] == hits
    if all(t.gen_tokens for t in traj.turns):  # (the runtime generates >= 1 token a turn)
        assert hits == [expected_hit(traj, i, bs) for i in range(len(traj.turns))]


def test_a_tiny_runtime_workload_has_the_runtimes_hits():
    """The repro: `:test` x 32 agents x 6 turns, 16-token blocks: 11 of 192 turns hit one block more."""
    base = RuntimeConfig.from_config_dict(get_config("test").runtime)
    trajs = driver.make_trajectories(base.replace(**{"workload.agents": 32, "workload.turns": 6}))
    aligned = 0
    for t in trajs:
        shapes = t.turn_shapes(16)
        assert [h for _, h, _ in shapes] == [expected_hit(t, i, 16) for i in range(len(shapes))]
        aligned += sum((p + g) % 16 == 0 for p, _, g in shapes[:-1])
    assert aligned >= 5  # (the case the old rule got wrong is there)
    hits = sum(h for t in trajs for _, h, _ in t.turn_shapes(16))
    prompts = sum(p for t in trajs for p, _, _ in t.turn_shapes(16))
    assert summarize(trajs, block_size=16).hit_rate == pytest.approx(hits / prompts, rel=1e-12)


def test_a_turn_appending_nothing_after_an_aligned_context_runs():
    """54 + 10 tokens: one block of 64, of which 63 are stored; the next turn appends nothing: it prefills its 64
    prompt tokens (the runtime's turn), where the simulator refused it."""
    res = run(load_sim_config(TINY), [Trajectory(3, [Turn(54, 10), Turn(0, 5)])])
    assert [(r.prompt_tokens, r.hit_tokens) for r in res.records] == [(54, 0), (64, 0)]
    assert res.stats["unfinished_turns"] == 0
    res = run(load_sim_config(TINY), [Trajectory(3, [Turn(640, 64), Turn(0, 5)])])
    assert [(r.prompt_tokens, r.hit_tokens) for r in res.records] == [(640, 0), (704, 640)]


def test_the_store_writes_the_blocks_of_the_stored_kv():
    """A turn of 640 + 64 tokens stores 703 tokens of KV: 10 whole blocks of 64 (written back, held by a bounded
    store), not 11."""
    cfg = _with(load_sim_config(TINY), kv_bytes_per_token=1000.0)
    one = [Trajectory(0, [Turn(640, 64)])]
    res = run(cfg, one)
    assert cfg.cluster.writeback and res.summary["snic_total_bytes"] == pytest.approx(640 * 1000, rel=1e-9)
    res = run(_with(cfg, store_capacity_gb=1.5e-3), one)
    assert res.summary["store_held_bytes"] == 640 * 1000
    # its next turn hits what was stored, bounded or not
    two = [Trajectory(0, [Turn(640, 64, gap_s=1.0), Turn(10, 1)])]
    for c in (cfg, _with(cfg, store_capacity_gb=1.5e-3)):
        assert [r.hit_tokens for r in run(c, two).records] == [0, 640]
