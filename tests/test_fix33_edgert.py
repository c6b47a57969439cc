"""Fix wave 33 (edgert): the runtime's data plane at exact boundary values (valid input), checked for the right result,
not only for no crash: greedy tokens equal the single-process reference, hits are the whole blocks stored before,
the bytes read are the hit KV, and the store holds each stored block once. No fix came of it (session 50: every
boundary tried was right, /work/notes/fix33_edgert_report.md); these keep the cases that sit on an edge."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest

from dualpath_jax.block_keys import block_keys
from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.kv_store import LocalDirStore
from dualpath_jax.runtime import driver
from dualpath_jax.store import block_file
from dualpath_jax.traffic import Link, rate_of
from dualpath_jax.workloads.types import Trajectory, Turn

MAX_SEQ_LEN = 64  # with block_size 16 (the :test config's)


def _agent(tid: int, *turns, context: dict | None = None) -> Trajectory:
    context = context or {}
    return Trajectory(tid, [Turn(a, g, context_tokens=context.get(i)) for i, (a, g) in enumerate(turns)])


# (append, gen) per turn; with block_size 16. The KV a turn leaves stored is its prompt + generation less the last
# generated token (never fed back), in whole blocks.
EDGE_AGENTS = [
    _agent(0, (16, 1), (0, 1), (15, 1), (0, 2)),  # a prompt of exactly one block; then a turn whose prompt is all
    # stored but its last token (append 0): the hit leaves 1 token to prefill
    _agent(1, (15, 2), (0, 1)),  # the decode step fills the first block (15 + 2 - 1 = 16): stored by write-back
    _agent(2, (1, 1), (0, 1), (0, 14), (0, 1)),  # 1-token prompts; then 16 KV tokens: one block filled by decode
    _agent(3, (31, 2), (5, 1), (0, 1), context={2: 32}),  # the agent drops its history down to exactly 2 blocks
    _agent(4, (32, 17), (0, 1)),  # the last decode step fills block 2 (32 + 17 - 1 = 48); the next turn (49) hits it
    _agent(5, (40, 25)),  # prompt + generation = MAX_SEQ_LEN + 1: the decode slot full to the last token
]


def _expected_hits(trajs, block_size: int) -> dict:
    """(trajectory, turn) -> hit tokens: the whole blocks the agent's earlier turns stored (of its prompt's prefix),
    leaving at least one prompt token to compute."""
    out = {}
    for t in trajs:
        stored = 0  # tokens of the agent's prefix stored, whole blocks
        for i, turn in enumerate(t.turns):
            prompt = t.prompt_tokens(i)
            if turn.context_tokens is not None and i:  # (the prefix kept: its blocks' keys are the same)
                stored = min(stored, turn.context_tokens // block_size * block_size)
            out[(t.trajectory_id, i)] = min(stored, (prompt - 1) // block_size * block_size)
            stored = max(stored, (prompt + turn.gen_tokens - 1) // block_size * block_size)
    return out


def _stored_blocks(trajs, block_size: int) -> int:
    """Distinct blocks the run stores: each agent's longest stored prefix (its prompts share their prefixes)."""
    total = 0
    for t in trajs:
        longest = max(t.prompt_tokens(i) + turn.gen_tokens - 1 for i, turn in enumerate(t.turns))
        total += longest // block_size
    return total


@pytest.mark.parametrize("policy", ["split", "basic"])
def test_boundary_turns_equal_the_reference_with_exact_hits_and_bytes(base, ops, reference_for, policy):
    """Prompts of exactly one block, of 1 token, all stored but the last token, cut to a block boundary; blocks filled
    by the last decode step; a turn filling its decode slot: the tokens are the reference's on both read paths (split
    reads one request's blocks on both sides), each hit is what was stored, the bytes read are the hit KV."""
    cfg = base.replace(**{"scheduler.name": policy, "cluster.max_seq_len": MAX_SEQ_LEN})
    bs = cfg.block_size
    assert bs == 16, "the agents are drawn for 16-token blocks"
    reference = reference_for(cfg, ops, EDGE_AGENTS)
    res = driver.run(cfg, EDGE_AGENTS, model_ops=ops)
    bad = [k for k in reference if not np.array_equal(reference[k], res.tokens.get(k))]
    assert not bad, f"turns whose tokens differ from the reference: {bad}"
    hits = {(r.trajectory_id, r.turn_index): r.hit_tokens for r in res.records}
    expected = _expected_hits(EDGE_AGENTS, bs)
    assert hits == expected
    # the edges are there: a turn whose prompt is all hit but its last token, and a hit on a decode-filled last block
    assert hits[(0, 1)] == 16 and EDGE_AGENTS[0].prompt_tokens(1) == 17
    assert hits[(4, 1)] == 48 and EDGE_AGENTS[4].prompt_tokens(1) == 49
    kv = ops.config.kv_bytes_per_token
    assert res.summary["pe_read_bytes"] + res.summary["de_read_bytes"] == sum(hits.values()) * kv
    if policy == "split":
        assert res.summary["pe_read_bytes"] > 0 and res.summary["de_read_bytes"] > 0
    st = res.store_stats
    assert st["writes"] == _stored_blocks(EDGE_AGENTS, bs)
    assert st["read_hits"] == sum(hits.values()) // bs and st["read_absent"] == st["read_corrupt"] == 0


@pytest.mark.parametrize("read_method", ["mmap", "preadv"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7)])  # (layers, block tokens, bytes per token per layer)
def test_store_boundaries_of_small_and_odd_layouts(read_method, shape):
    """A 1-token, 1-byte block and a non-power-of-two one: a capacity of exactly N blocks, and one byte short of N + 1,
    keeps the last N written; Layer-Block reads of the first, the last, all and all reversed layers give those bytes;
    read_many into adjacent rows of an area whose length is not a whole number of blocks fills those rows only."""
    layers, tokens, bpt = shape
    layout = BlockLayout(layers, tokens, bpt, "edge")
    file_nbytes = block_file.file_nbytes(layout)
    rng = np.random.default_rng(0)
    keys = block_keys(np.arange(5 * tokens), tokens)
    assert len(keys) == 5
    data = {k: rng.integers(0, 256, layout.full_block_nbytes, dtype=np.uint8) for k in keys}
    options = {"read_method": read_method, "mmap_min_bytes": 0}
    for capacity, kept in ((2 * file_nbytes, 2), (3 * file_nbytes - 1, 2), (3 * file_nbytes, 3)):
        with tempfile.TemporaryDirectory() as root, LocalDirStore(root, layout, capacity, **options) as store:
            assert store.lookup([]) == 0
            for k in keys:
                assert store.write(k, data[k])
            assert [store.contains(k) for k in keys] == [i >= 5 - kept for i in range(5)], capacity
            assert store.used_bytes == kept * file_nbytes
            last = keys[-1]
            full = layout.full_block_view(data[last])
            for ask in ([0], [layers - 1], list(range(layers)), list(range(layers))[::-1]):
                out = np.zeros((len(ask), layout.layer_block_nbytes), np.uint8)
                assert store.read(last, out, layers=ask), ask
                np.testing.assert_array_equal(out, full[ask].reshape(len(ask), -1))
            area = np.zeros((layers, kept * tokens + 1, bpt), np.uint8)  # one token past the last whole block
            held = keys[5 - kept :]
            assert all(store.read_many(held, [area[:, i * tokens : (i + 1) * tokens] for i in range(kept)]))
            for i, k in enumerate(held):
                np.testing.assert_array_equal(area[:, i * tokens : (i + 1) * tokens], layout.full_block_view(data[k]))
            assert not area[:, kept * tokens :].any()


def test_a_zero_byte_grant_or_record_leaves_no_sample():
    """`Link.reserve(0)` and `Link.record(0)` left a bin of 0 bytes in the link's samples (a 0-byte `paced` left none):
    `rate_of` counts a link's time from its first bin to its last, so such a bin after the bytes (or before them)
    stretched the span and lowered the rate, and a link that moved nothing showed as sampled."""
    link = Link("snic/node0", 1e9, {"low": 1.0}, quantum=4096)
    assert link.reserve(0, "low") > 0
    link.record(0, "low")
    assert list(link.paced(0, "low")) == []
    assert link.samples() == [] and link.total_bytes == 0
    link.record(4096, "low")
    link.reserve(0, "low")
    ((sample,),) = [link.samples()]
    assert sample.nbytes == 4096
    assert rate_of(link.samples(), "snic/node0") == 4096 / (sample.t1 - sample.t0)
