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
- Attention runs in blocks of ROW_BLOCK queries as an online softmax over key tiles of KEY_TILE keys at
  absolute positions, in position order, each query row against its own copy of the tile: a prefill block is
  16 queries of one request (`prefill_attention`), a decode block 16 slots (`decode_attention`), and both run
  the same dots on the same shapes. A tile at or past a query's
  position adds exactly nothing (weights exp(-1e30 - m) = 0, rescale exp(0) = 1), so a query's result depends
  only on its own context, not on how many keys the batch padded to.
Prefill and decode use the same functions, so decoding a token gives the bits of prefilling it: the runtime's
tokens equal a full recompute's whatever the policy, chunking, batching or read path.
That holds on XLA:CPU, where it is tested. On XLA:GPU (an H200, jax 0.11.2) prefill bits did not depend on
chunking or batching, but decoded KV differed from prefill KV in its last bits at some positions (tokens equal):
XLA:GPU compiles the two programs' per-token work differently (README, "On a GPU", second lease).

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


def _attend_block(q, qpos: jax.Array, tile_of: Callable, score_fn: Callable, value_fn: Callable) -> jax.Array:
    """One block of ROW_BLOCK queries: online softmax over key tiles 0 .. the block's last query position.

    `tile_of(k0)` gives each query row its keys [k0, k0 + KEY_TILE) (a pytree of ``[ROW_BLOCK, ...]`` arrays);
    `score_fn(q, tile)` the scores ``[ROW_BLOCK, *heads, KEY_TILE]`` (float32), `value_fn(p, tile)` the weighted
    values ``[ROW_BLOCK, *heads, Dv]`` (float32). Returns ``[ROW_BLOCK, *heads, Dv]``."""
    offsets = jnp.arange(KEY_TILE, dtype=jnp.int32)
    shapes = jax.eval_shape(lambda: (score_fn(q, tile_of(0)), value_fn(score_fn(q, tile_of(0)), tile_of(0))))
    heads = len(shapes[0].shape) - 2

    def tile(i, carry):
        m, denom, acc = carry
        k0 = i * KEY_TILE
        kv = tile_of(k0)
        valid = (k0 + offsets)[None, :] <= qpos[:, None]  # [ROW_BLOCK, KEY_TILE]
        valid = valid.reshape(valid.shape[0], *(1,) * heads, KEY_TILE)
        s = jnp.where(valid, score_fn(q, kv), _NEG)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        alpha = jnp.exp(m - m_new)
        return m_new, denom * alpha + p.sum(-1), acc * alpha[..., None] + value_fn(p, kv)

    init = (
        jnp.full(shapes[0].shape[:-1], _NEG, jnp.float32),
        jnp.zeros(shapes[0].shape[:-1], jnp.float32),
        jnp.zeros(shapes[1].shape, jnp.float32),
    )
    # Only the tiles up to the block's last query: the others change nothing (exactly).
    _, denom, acc = jax.lax.fori_loop(0, qpos.max() // KEY_TILE + 1, tile, init)
    return acc / denom[..., None]


def _rows(tile):
    """A key tile materialized as its own array: the attention's dots then see the same operands in prefill
    (one request's tile, repeated per query row) and decode (each slot's own tile), never a folded broadcast."""
    return jax.lax.optimization_barrier(tile)


def prefill_attention(queries, keys, query_pos: jax.Array, slice_tile: Callable, score_fn, value_fn) -> jax.Array:
    """Causal attention of prefill queries over their request's keys, per request and block of ROW_BLOCK queries.

    `queries`: pytree of ``[B, T, ...]``; `keys`: pytree of per-request key arrays ``[B, ...]`` (absolute
    positions); `query_pos` ``[B, T]``; `slice_tile(keys_b, k0)` one request's keys [k0, k0 + KEY_TILE).
    Returns ``[B, T, *heads, Dv]`` (float32)."""
    b, t = query_pos.shape
    nq = -(-t // ROW_BLOCK)
    pad = nq * ROW_BLOCK - t

    def split(a):  # [B, T, ...] -> [B, nq, ROW_BLOCK, ...]
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return a.reshape(b, nq, ROW_BLOCK, *a.shape[2:])

    def per_request(args):
        q_all, pos_all, kv = args

        def tile_of(k0):
            one = slice_tile(kv, k0)
            return _rows(jax.tree.map(lambda a: jnp.broadcast_to(a[None], (ROW_BLOCK, *a.shape)), one))

        return jax.lax.map(lambda a: _attend_block(a[0], a[1], tile_of, score_fn, value_fn), (q_all, pos_all))

    # padding queries at position 0: key 0 only (finite, never used)
    out = jax.lax.map(per_request, (jax.tree.map(split, queries), split(query_pos), keys))
    return out.reshape(b, nq * ROW_BLOCK, *out.shape[3:])[:, :t]


def decode_attention(queries, cache, query_pos: jax.Array, slice_tile: Callable, score_fn, value_fn) -> jax.Array:
    """Attention of one query per slot over its own cache row, ROW_BLOCK slots per block (the block prefill
    uses, so a slot's token gets the bits it gets in prefill).

    `queries`: pytree of ``[N, ...]``; `cache`: the decode cache (slots first); `query_pos` ``[N]``;
    `slice_tile(cache, k0)` every slot's keys [k0, k0 + KEY_TILE) (slots first). Returns ``[N, *heads, Dv]``."""
    n = query_pos.shape[0]
    nb = -(-n // ROW_BLOCK)
    slots = jnp.minimum(jnp.arange(nb * ROW_BLOCK, dtype=jnp.int32), n - 1).reshape(nb, ROW_BLOCK)
    q = jax.tree.map(lambda a: a[slots], queries)  # [nb, ROW_BLOCK, ...] (extra rows repeat the last slot)
    pos = query_pos[slots]

    def per_block(args):
        q_b, pos_b, rows = args

        def tile_of(k0):
            return _rows(jax.tree.map(lambda a: a[rows], slice_tile(cache, k0)))

        return _attend_block(q_b, pos_b, tile_of, score_fn, value_fn)

    out = jax.lax.map(per_block, (q, pos, slots))  # [nb, ROW_BLOCK, *heads, Dv]
    return out.reshape(nb * ROW_BLOCK, *out.shape[2:])[:n]


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
