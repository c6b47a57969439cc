"""Greedy tokens identical whatever the policy, read path or block size, where the existing runtime tests do not look
(session 35, helper "tokens"; the whole cross-product is in /work/notes/fix18_tokens.md):

- prompts that are a whole number of blocks (block sizes 1, 7 and 64): every prompt block is stored, and a hit must
  still leave the last prompt token to compute;
- a second run over a store kept from a first run (`config.store_dir` re-used): it hits every stored block, from the
  first turn on, and generates the first run's tokens;
- agents sharing a prefix (a system prompt) hit each other's blocks at their first turn, a turn that dropped text
  re-reads only the prefix it states, and an agent with another agent's whole prompt generates its tokens;
- decode slots 1 and 8 and the single-side policies of no other test (`pe_only`, `round_robin` with `read_side='de'`).

Each run's tokens are compared with the single-process reference (full prefill of every prompt + greedy decode in
the DEs' batch shape, no store, no transport)."""

from __future__ import annotations

import numpy as np
import pytest
from test_runtime import assert_matches_reference, expected_hit

from dualpath_jax.runtime import driver
from dualpath_jax.workloads.types import Trajectory, Turn


def whole_block_trajectories(block_size: int, agents: int = 2, turns: int = 3) -> list[Trajectory]:
    """Agents whose every prompt is a multiple of `block_size` tokens: 2 blocks first, then each append fills the
    last generation's block (gens 3, 5, 1 by agent: one turn with no decode step)."""
    out = []
    for a in range(agents):
        gen = (3, 5, 1)[a % 3]
        ts = [Turn(2 * block_size, gen)]
        for i in range(1, turns):
            ts.append(Turn((gen // block_size + 1 + (a + i) % 2) * block_size - gen, gen))
        out.append(Trajectory(a, ts, source="whole_blocks"))
    return out


def stored_whole_prompt_hit(traj: Trajectory, i: int, block_size: int) -> int:
    """The hit of turn i over a store holding its whole prompt: every block but the one of its last token."""
    return (traj.prompt_tokens(i) - 1) // block_size * block_size


@pytest.mark.parametrize(
    "block_size, policy",
    [(1, "split"), (7, "de_only"), (64, "split")],
)
def test_prompts_of_whole_blocks_give_the_reference_tokens(base, ops, reference_for, block_size, policy):
    # (64: prompts of 128 and 256 tokens; 1: one agent, a block file per token)
    trajs = whole_block_trajectories(block_size, agents=1 if block_size == 1 else 2, turns=2 if block_size == 64 else 3)
    assert all(t.prompt_tokens(i) % block_size == 0 for t in trajs for i in range(len(t.turns)))
    cfg = base.replace(**{"scheduler.name": policy, "block_size": block_size, "cluster.max_seq_len": 320})
    res = driver.run(cfg, trajs, model_ops=ops)
    assert_matches_reference(res, reference_for(cfg, ops, trajs), trajs)
    by_traj = {t.trajectory_id: t for t in trajs}
    hits = {(r.trajectory_id, r.turn_index): r.hit_tokens for r in res.records}
    assert hits == {k: expected_hit(by_traj[k[0]], k[1], block_size) for k in hits}
    assert max(hits.values()) > 0


@pytest.mark.parametrize("block_size, second", [(16, "de_only"), (7, "split")])
def test_a_second_run_over_a_kept_store_hits_every_stored_block(base, ops, reference_for, tmp_path, block_size, second):
    """`config.store_dir` re-used: the second run (another policy, another read path) finds every prompt block the
    first one stored, from the first turn on, and generates the same tokens."""
    trajs = whole_block_trajectories(block_size, agents=3)
    first = base.replace(**{"scheduler.name": "basic", "block_size": block_size, "store_dir": str(tmp_path / "kv")})
    ref = reference_for(first, ops, trajs)
    assert_matches_reference(driver.run(first, trajs, model_ops=ops), ref, trajs)
    res = driver.run(first.replace(**{"scheduler.name": second}), trajs, model_ops=ops)
    assert_matches_reference(res, ref, trajs)
    by_traj = {t.trajectory_id: t for t in trajs}
    hits = {(r.trajectory_id, r.turn_index): r.hit_tokens for r in res.records}
    assert hits == {k: stored_whole_prompt_hit(by_traj[k[0]], k[1], block_size) for k in hits}
    if second == "de_only":
        assert res.summary["pe_read_bytes"] == 0 and res.summary["de_read_bytes"] > 0


def test_agents_sharing_a_prefix_hit_each_others_blocks(base, ops, reference_for, tmp_path):
    """A first run stores agent 0 (a 45-token system prompt + its own 5 tokens); a second run over that store holds
    agent 1 with agent 0's whole first prompt and agents 2 and 3 with the system prompt + their own text. Their first
    turns hit 32 tokens (2 blocks of the system prompt; 48 for agent 1), agent 1's first tokens are agent 0's, and
    agent 3's third turn, which re-reads only its history's first 30 tokens (the agent dropped text), hits 16."""
    rng = np.random.default_rng(11)
    system = rng.integers(0, ops.vocab_size, 45).astype(np.int32)
    own = {a: rng.integers(0, ops.vocab_size, 5 + 3 * a).astype(np.int32) for a in range(4)}
    own[1] = own[0]

    def agent(a: int) -> Trajectory:
        first = np.concatenate([system, own[a]])
        return Trajectory(
            a,
            [
                Turn(first.size, 4, append_token_ids=first),
                Turn(9, 5),
                Turn(11, 3, context_tokens=30 if a == 3 else None),
            ],
            source="shared_prefix",
        )

    cfg = base.replace(**{"scheduler.name": "split", "store_dir": str(tmp_path / "kv")})
    before = driver.run(cfg, [agent(0)], model_ops=ops)
    trajs = [agent(a) for a in (1, 2, 3)]
    ref = reference_for(cfg, ops, trajs)
    res = driver.run(cfg, trajs, model_ops=ops)
    assert_matches_reference(res, ref, trajs)
    np.testing.assert_array_equal(res.tokens[(1, 0)], before.tokens[(0, 0)])
    hits = {(r.trajectory_id, r.turn_index): r.hit_tokens for r in res.records}
    assert [hits[(a, 0)] for a in (1, 2, 3)] == [48, 32, 32]
    assert hits[(3, 2)] == 16 and trajs[2].prompt_tokens(2) == 30 + 11


@pytest.mark.parametrize(
    "policy, kwargs, slots",
    [("pe_only", {}, 1), ("round_robin", {"read_side": "de"}, 8)],
)
def test_single_side_policies_and_decode_slots(base, ops, trajs, reference_for, policy, kwargs, slots):
    cfg = base.replace(**{"scheduler.name": policy, "scheduler.policy_kwargs": kwargs, "cluster.decode_slots": slots})
    res = driver.run(cfg, trajs, model_ops=ops)
    assert_matches_reference(res, reference_for(cfg, ops, trajs), trajs)
    side = "de" if kwargs.get("read_side") == "de" else "pe"
    assert {r.read_side for r in res.records if r.hit_tokens} == {side}
    assert res.summary[f"{'pe' if side == 'de' else 'de'}_read_bytes"] == 0
