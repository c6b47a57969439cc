"""Step metadata: pytree dataclasses passed to the jitted layer steps.

Every field is a traced array (per-request values change every call and must not recompile); only the
array shapes (bucket sizes) are static, so one executable serves every batch of the same bucket.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PrefillMeta:
    # [B] int32, traced: cached (hit) prefix tokens of each request; keys j >= cached_lens[b] of the
    # padded cached KV [B, C, ...] are ignored. Also the position of the first miss token.
    cached_lens: jax.Array
    # [B] int32, traced: valid miss tokens of each request; rows t >= miss_lens[b] of the padded
    # hidden [B, T, H] are padding (computed, never attended to, never returned).
    miss_lens: jax.Array

    def positions(self, num_tokens: int) -> jax.Array:
        """[B, T] int32 absolute positions of the miss tokens."""
        return self.cached_lens[:, None] + jnp.arange(num_tokens, dtype=jnp.int32)[None, :]

    def zero_padding(self, kv_new: jax.Array) -> jax.Array:
        """New KV records [B, T, *record] with the padding rows (t >= miss_lens[b]) set to 0. No valid query
        attends to them (weight exactly 0), but 0 x inf = NaN: a padding token (id 0) whose float16 activations
        overflowed made every real token of its request NaN."""
        t = kv_new.shape[1]
        valid = jnp.arange(t, dtype=jnp.int32)[None, :] < self.miss_lens[:, None]  # [B, T]
        return jnp.where(valid.reshape(*valid.shape, *(1,) * (kv_new.ndim - 2)), kv_new, jnp.zeros((), kv_new.dtype))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeMeta:
    # [N] int32, traced: tokens already in each slot's cache = the position of the token decoded now
    # (its KV is written at this index).
    lengths: jax.Array
    # [N] bool, traced: slot takes part in this step; inactive slots write no KV (continuous batching
    # keeps the slot count N fixed so the step never recompiles when requests join or leave).
    active: jax.Array

    def positions(self) -> jax.Array:
        """[N, 1] int32 position of the decoded token."""
        return self.lengths[:, None]


def prefill_meta(cached_lens, miss_lens) -> PrefillMeta:
    return PrefillMeta(jnp.asarray(cached_lens, jnp.int32), jnp.asarray(miss_lens, jnp.int32))


def decode_meta(lengths, active) -> DecodeMeta:
    return DecodeMeta(jnp.asarray(lengths, jnp.int32), jnp.asarray(active, jnp.bool_))
