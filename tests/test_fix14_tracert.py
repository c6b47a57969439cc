"""A real trace replayed on the runtime (fix14, tracert): the prompt token ids follow the trace's block hashes.

The traces give prefix-chained block hashes, the runtime needs token ids: two prompts that share their first n hash
blocks must share the token ids of those blocks exactly (and no more), so the runtime's KV store hits what the trace
shares. Before, every trajectory drew random ids of its own: a Mooncake session whose first prompt repeats another
session's blocks (the common system prompt, a shared document) hit nothing on the runtime.
"""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from configs.tiny_runtime import get_config
from dualpath_jax.block_keys import block_keys
from dualpath_jax.runtime import driver
from dualpath_jax.runtime.config import RuntimeConfig
from dualpath_jax.runtime.lifecycle import ConversationBook
from dualpath_jax.workloads.traces import MOONCAKE_BLOCK, hashed_token_ids

VOCAB = 128  # tiny_qwen2's


def _mooncake(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture
def two_sessions(tmp_path):
    """Session 0: one prompt of 4 blocks, then a turn extending it; session 1 (a new one: it does not extend session
    0's last full block) shares session 0's first 2 blocks."""
    return _mooncake(
        tmp_path / "two.jsonl",
        [
            {"timestamp": 0, "input_length": 2000, "output_length": 20, "hash_ids": [1, 2, 3, 4]},
            {"timestamp": 10, "input_length": 1300, "output_length": 10, "hash_ids": [1, 2, 7]},
            {"timestamp": 20, "input_length": 2600, "output_length": 10, "hash_ids": [1, 2, 3, 8, 9, 10]},
        ],
    )


def _cfg(trace: str, **kw) -> RuntimeConfig:
    base = RuntimeConfig.from_config_dict(get_config("test").runtime)
    return base.replace(**{"workload.kind": "trace", "workload.trace": trace, "workload.scale": 0.1, **kw})


def _shared(a, b) -> int:
    m = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:m]) != np.asarray(b[:m]))
    return int(diff[0]) if diff.size else m


def test_trace_prompts_sharing_hash_blocks_share_exactly_those_token_ids(two_sessions):
    """Session 1's first prompt shares 2 blocks of 512 tokens with session 0's: at scale 0.1 they are its first
    rint(2 * 512 * 0.1) = 102 token ids, the same as session 0's, and its next ids differ (block 7 vs block 3)."""
    trajs = driver.make_trajectories(_cfg(two_sessions))
    assert [len(t.turns) for t in trajs] == [2, 1]
    a, b = trajs[0].turns[0].append_token_ids, trajs[1].turns[0].append_token_ids
    assert a is not None and b is not None
    assert (len(a), len(b)) == (200, 130)
    e2 = round(2 * MOONCAKE_BLOCK * 0.1)
    assert _shared(a, b) == e2 == 102
    assert (a[e2 : e2 + 16] != b[e2 : e2 + 16]).any()
    assert int(min(a.min(), b.min())) >= 0 and int(max(a.max(), b.max())) < VOCAB


def test_the_runtime_store_hits_the_blocks_a_trace_shares_across_sessions(two_sessions):
    """Through the runtime's own prompt builder (ConversationBook) and block keys: session 1's first turn finds
    session 0's stored blocks up to the shared 102 tokens (96 in 16-token blocks); before, it found none."""
    cfg = _cfg(two_sessions)
    trajs = driver.make_trajectories(cfg)
    book = ConversationBook(trajs, VOCAB, seed=cfg.workload.seed)
    first = {r.trajectory_id: r for r in book.pop_due(0.0)}
    bs = cfg.block_size
    stored = set(block_keys(first[0].prompt_ids, bs))
    keys = block_keys(first[1].prompt_ids, bs)
    hit = next((k for k, key in enumerate(keys) if key not in stored), len(keys)) * bs
    assert hit == (102 // bs) * bs == 96


def test_hashed_token_ids_cover_positions_past_the_hashed_blocks_per_turn():
    """A kv-cache-tester prompt hashes full blocks only: its tail (and a scaled append past the last block) gets ids
    of its own turn, shared with no other turn."""
    h = np.array([5, 6], np.int64)
    one = hashed_token_ids(h, 64, 1.0, 0, 150, VOCAB, seed=0, tail_key=(0, 0))
    two = hashed_token_ids(h, 64, 1.0, 0, 150, VOCAB, seed=0, tail_key=(1, 0))
    assert len(one) == 150 and _shared(one, two) == 128
    assert (one[128:] != two[128:]).any()
    # a window of the same prompt is the same ids (an append starting at its turn's context)
    assert np.array_equal(hashed_token_ids(h, 64, 1.0, 40, 60, VOCAB, seed=0, tail_key=(0, 0)), one[40:100])
    # blocks of a fraction of a token (scale < 1 / block): shared ids still end at the shared blocks' end
    k = hashed_token_ids(np.arange(10, dtype=np.int64), 64, 0.01, 0, 7, VOCAB, seed=0, tail_key=(0, 0))
    m = hashed_token_ids(np.array([0, 1, 2, 3, 99, 98], np.int64), 64, 0.01, 0, 4, VOCAB, seed=0, tail_key=(1, 0))
    assert _shared(k, m) == round(4 * 64 * 0.01) == 3 and len(k) == 7


def test_a_gzipped_session_file_gets_ids_from_its_salted_hashes(tmp_path):
    """kv-cache-tester sessions: two sessions with the same (session-scoped) hash ids share no token ids."""
    req = [{"type": "n", "t": 0, "in": 300, "out": 5, "hash_ids": [1, 2, 3, 4]}]
    paths = []
    for sid in ("a", "b"):
        p = tmp_path / f"trace_{sid}.json.gz"
        with gzip.open(p, "wt") as f:
            json.dump({"id": sid, "block_size": 64, "requests": req}, f)
        paths.append(p)
    trajs = driver.make_trajectories(_cfg(str(tmp_path), **{"workload.scale": 1.0}))
    a, b = (t.turns[0].append_token_ids for t in trajs)
    assert len(a) == len(b) == 300 and _shared(a, b) < 16


def test_a_trace_turn_that_dropped_text_re_reads_only_what_the_trace_states(tmp_path):
    """A kv-cache-tester turn whose prompt drops text of the previous one (640 + 10 tokens, then 400 of which 384 are
    re-read): its prompt is the history's first 384 tokens and its 16-token append, as the trace (and the simulator)
    say. Before, the runtime re-read the whole history (666 tokens; the kv-cache-tester trace: 682 of 5,116 turns,
    +45% prompt tokens), then a warning named it; now the prompts follow the trace."""
    reqs = [
        {"type": "n", "t": 0, "in": 640, "out": 10, "hash_ids": list(range(1, 11))},
        {"type": "n", "t": 1, "in": 400, "out": 4, "hash_ids": list(range(1, 7))},
    ]
    p = tmp_path / "trace_x.json"
    p.write_text(json.dumps({"id": "x", "block_size": 64, "requests": reqs}))
    (t,) = driver.make_trajectories(_cfg(str(p), **{"workload.scale": 1.0}), VOCAB)
    assert [s[0] for s in t.turn_shapes(1)] == [640, 400] and t.turns[1].context_tokens == 384
    book = ConversationBook([t], VOCAB)
    (first,) = book.pop_due(0.0)
    book.complete(first.request_id, np.arange(10, dtype=np.int32), 1.0)
    (second,) = book.pop_due(1e9)
    assert second.prompt_ids.size == 400
    np.testing.assert_array_equal(second.prompt_ids[:384], first.prompt_ids[:384])  # the blocks it re-reads
    assert (second.prompt_ids[384:] != first.prompt_ids[384:400]).any()  # then its own append
    # a stated context at or past the history is the whole history (the usual turn): nothing kept
    reqs[1] = {"type": "n", "t": 1, "in": 700, "out": 4, "hash_ids": list(range(1, 11))}
    p.write_text(json.dumps({"id": "x", "block_size": 64, "requests": reqs}))
    (t,) = driver.make_trajectories(_cfg(str(p), **{"workload.scale": 1.0}), VOCAB)
    assert t.turns[1].context_tokens is None and [s[0] for s in t.turn_shapes(1)] == [640, 700]
