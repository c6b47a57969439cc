"""Decode-side KV cache per layer (fixed capacity, one row per slot) and its record-layout copies.

- GQA: ``(K, V)``, each ``[N, Hkv, S, Dh]`` head-major (fast on XLA:CPU).
- MLA: ``[N, S, R + Dr]`` (the latent records themselves).

`write_records` / `read_records` move token-major records ``[n, *record]`` (the byte layout of
models/kv.py) in and out of one slot; they are pure jnp functions the runner jits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.kv import KVLayout


def init_layer_cache(layout: KVLayout, num_slots: int, capacity: int):
    dtype = jnp.dtype(layout.kv_dtype)
    if layout.kind == "gqa":
        _, hkv, dh = layout.record_shape
        return (
            jnp.zeros((num_slots, hkv, capacity, dh), dtype),
            jnp.zeros((num_slots, hkv, capacity, dh), dtype),
        )
    return jnp.zeros((num_slots, capacity, *layout.record_shape), dtype)


def write_records(layout: KVLayout, cache, slot: jax.Array, start: jax.Array, records: jax.Array):
    """Write records [n, *record] at token offsets [start, start + n) of `slot` (start + n <= capacity)."""
    if layout.kind == "gqa":
        k_cache, v_cache = cache
        k = jnp.transpose(records[:, 0], (1, 0, 2))[None]  # [1, Hkv, n, Dh]
        v = jnp.transpose(records[:, 1], (1, 0, 2))[None]
        zero = jnp.int32(0)
        return (
            jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (slot, zero, start, zero)),
            jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (slot, zero, start, zero)),
        )
    return jax.lax.dynamic_update_slice(cache, records[None].astype(cache.dtype), (slot, start, jnp.int32(0)))


def clear_slot(cache, slot: jax.Array):
    """Zero every row of `slot` (keys beyond a slot's length are masked, but must be finite: 0 x NaN = NaN)."""
    return jax.tree.map(lambda a: a.at[slot].set(0), cache)


def read_records(layout: KVLayout, cache, slot: jax.Array, start: jax.Array, num_tokens: int) -> jax.Array:
    """Records [num_tokens, *record] of `slot` from token `start` (caller keeps start + n <= capacity)."""
    if layout.kind == "gqa":
        k_cache, v_cache = cache
        hkv, dh = k_cache.shape[1], k_cache.shape[3]
        zero = jnp.int32(0)
        k = jax.lax.dynamic_slice(k_cache, (slot, zero, start, zero), (1, hkv, num_tokens, dh))[0]
        v = jax.lax.dynamic_slice(v_cache, (slot, zero, start, zero), (1, hkv, num_tokens, dh))[0]
        return jnp.stack([jnp.transpose(k, (1, 0, 2)), jnp.transpose(v, (1, 0, 2))], axis=1)  # [n, 2, Hkv, Dh]
    width = cache.shape[2]
    return jax.lax.dynamic_slice(cache, (slot, start, jnp.int32(0)), (1, num_tokens, width))[0]
