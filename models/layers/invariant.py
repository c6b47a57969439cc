"""Batch-invariant execution (`ModelConfig.batch_invariant`): a token's numbers do not depend on its batch.

Why: on XLA:CPU the bits of a token's result depend on the shapes it is computed in. Measured: `x @ W` gives a
row other bits for another number of rows (Qwen2's `k_proj`, [M, 64] x [64, 32]); a row sum over 64 values
rounds differently in an array of <= 8 rows; a softmax over S keys rounds differently for each padded S. So
the same prompt chunked differently, padded to another bucket, batched beside other requests, or decoded
instead of prefilled, gets KV and logits that differ in the last bits, and at a near-tie (an MoE expert
choice, or two logits) that flips a greedy token: the tokens then depend on the policy (README, "Known limits").

How: every computation runs at one fixed shape whatever the batch.
- Token-local work (norms, projections, MLP / MoE, the LM head) runs on blocks of ROW_BLOCK rows
  (`row_blocked`, a loop over blocks; a block of fixed shape gives each row the same bits wherever the row
  sits in it and whatever the other rows hold, checked for the models' shapes in tests/test_invariant.py).
- Attention (`blocked_attention`) runs per request and per block of ROW_BLOCK queries as an online softmax
  over key tiles of KEY_TILE keys at absolute positions, in position order. A tile at or past a query's
  position adds exactly nothing (weights exp(-1e30 - m) = 0, rescale exp(0) = 1), so a query's result depends
  only on its own context, not on how many keys the batch padded to.
Prefill and decode use the same functions, so decoding a token gives the bits of prefilling it: the runtime's
tokens equal a full recompute's whatever the policy, chunking, batching or read path.

Cost: loops of small fixed-shape steps instead of one large step per layer (`experiments.bench_invariant`).
Off by default.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

ROW_BLOCK = 16  # rows (tokens, decode slots, queries) per fixed-shape step
KEY_TILE = 64  # keys per step of the online softmax; a tile's keys sit at absolute positions [i*64, i*64 + 64)
_NEG = -1e30


def padded_keys(n: int) -> int:
    """Keys rounded up to whole tiles."""
    return -(-n // KEY_TILE) * KEY_TILE


def row_blocked(fn: Callable, *rows):
    """`fn` over fixed blocks of ROW_BLOCK rows of `rows` (arrays with the same leading dimension M; zero rows
    pad the last block); returns `fn`'s outputs (a pytree of arrays with a leading block-row axis) with M rows."""
    m = rows[0].shape[0]
    nb = max(-(-m // ROW_BLOCK), 1)
    pad = nb * ROW_BLOCK - m

    def blocks(a):
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape(nb, ROW_BLOCK, *a.shape[1:])

    out = jax.lax.map(lambda b: fn(*b), tuple(blocks(r) for r in rows))
    return jax.tree.map(lambda o: o.reshape(nb * ROW_BLOCK, *o.shape[2:])[:m], out)


def blocked_attention(
    queries,
    keys,
    query_pos: jax.Array,
    score_fn: Callable,
    value_fn: Callable,
) -> jax.Array:
    """Causal softmax attention per request, per block of ROW_BLOCK queries, over key tiles in order.

    `queries`: pytree of ``[B, T, ...]`` (per-query rows); `keys`: pytree of per-request key arrays, each
    ``[B, ...]`` with the key axis given by `score_fn`'s slicing (see `tile_of`); `query_pos` ``[B, T]`` the
    absolute position of each query (key j attended iff j <= it). `score_fn(q_block, k0, keys_b)` returns the
    scores of keys [k0, k0 + KEY_TILE) ``[*heads, ROW_BLOCK, KEY_TILE]`` (float32), `value_fn(p, k0, keys_b)``
    their weighted values ``[*heads, ROW_BLOCK, Dv]`` (float32). Returns ``[B, T, *heads, Dv]`` (float32).
    """
    b, t = query_pos.shape
    nq = -(-t // ROW_BLOCK)
    pad = nq * ROW_BLOCK - t

    def split(a):  # [B, T, ...] -> [B, nq, ROW_BLOCK, ...]
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return a.reshape(b, nq, ROW_BLOCK, *a.shape[2:])

    q_blocks = jax.tree.map(split, queries)
    pos_blocks = split(query_pos)  # padding queries at position 0: key 0 only (finite, never used)
    offsets = jnp.arange(KEY_TILE, dtype=jnp.int32)

    def per_block(q, qpos, kv):
        def tile(i, carry):
            m, denom, acc = carry
            k0 = i * KEY_TILE
            valid = (k0 + offsets)[None, :] <= qpos[:, None]  # [ROW_BLOCK, KEY_TILE]
            s = jnp.where(valid, score_fn(q, k0, kv), _NEG)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            alpha = jnp.exp(m - m_new)
            return m_new, denom * alpha + p.sum(-1), acc * alpha[..., None] + value_fn(p, k0, kv)

        shapes = jax.eval_shape(lambda: (score_fn(q, 0, kv), value_fn(score_fn(q, 0, kv), 0, kv)))
        init = (
            jnp.full(shapes[0].shape[:-1], _NEG, jnp.float32),
            jnp.zeros(shapes[0].shape[:-1], jnp.float32),
            jnp.zeros(shapes[1].shape, jnp.float32),
        )
        # Only the tiles up to the block's last query: the others change nothing (exactly).
        _, denom, acc = jax.lax.fori_loop(0, qpos.max() // KEY_TILE + 1, tile, init)
        return acc / denom[..., None]  # [*heads, ROW_BLOCK, Dv]

    def per_request(args):
        q_all, pos_all, kv = args
        return jax.lax.map(lambda a: per_block(a[0], a[1], kv), (q_all, pos_all))  # [nq, *heads, RB, Dv]

    out = jax.lax.map(per_request, (q_blocks, pos_blocks, keys))  # [B, nq, *heads, ROW_BLOCK, Dv]
    out = jnp.moveaxis(out, -2, 2)  # [B, nq, ROW_BLOCK, *heads, Dv]
    return out.reshape(b, nq * ROW_BLOCK, *out.shape[3:])[:, :t]


def key_tile(a: jax.Array, k0, axis: int) -> jax.Array:
    """Keys [k0, k0 + KEY_TILE) of one request's key array along `axis`."""
    return jax.lax.dynamic_slice_in_dim(a, k0, KEY_TILE, axis=axis)


def absolute_keys(kv_cached: jax.Array, kv_new: jax.Array, cached_lens: jax.Array) -> jax.Array:
    """[B, C, ...] cached + [B, T, ...] new -> [B, S, ...] with each request's key j at index j (its cached
    prefix, then its new tokens from cached_lens[b]); S = C + T rounded up to whole tiles. Beyond a request's
    keys: copies of other keys (never attended)."""
    c, t = kv_cached.shape[1], kv_new.shape[1]
    kv_all = jnp.concatenate([kv_cached, kv_new], axis=1)
    j = jnp.arange(padded_keys(c + t), dtype=jnp.int32)[None, :]
    cl = cached_lens[:, None]
    src = jnp.clip(jnp.where(j < cl, j, c + j - cl), 0, c + t - 1)  # [B, S]
    src = src.reshape(*src.shape, *(1,) * (kv_all.ndim - 2))
    return jnp.take_along_axis(kv_all, src, axis=1)
