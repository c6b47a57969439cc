"""The decoder-only skeleton both families share: embed -> layers -> final norm + LM head.

Layers implement the one layer contract of STYLE.md:
``layer.prefill(kv_cached, x, meta) -> (kv_new, x)`` and ``layer.decode(cache, x, meta) -> (cache, x)``.
Modules hold no layer index (it would make every layer's graph distinct and defeat executable sharing).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.layers import invariant
from models.layers.rmsnorm import RMSNorm


class PreNormDecoderLayer(nnx.Module):
    """The pre-norm residual block both families share: x + attn(norm(x)), then + mlp(norm(x)).

    Subclasses set `input_layernorm`, `self_attn` (with `prefill`/`decode` over their KV), the
    `post_attention_layernorm` and `mlp` (dense SwiGLU or MoE). This is the layer contract of DESIGN.md:
    `(kv, hidden, meta) -> (kv, hidden)`.
    """

    batch_invariant = False  # set by CausalLM from ModelConfig.batch_invariant (models/layers/invariant.py)

    def prefill(self, kv_cached: jax.Array, x: jax.Array, meta):
        if self.batch_invariant:
            return self._prefill_invariant(kv_cached, x, meta)
        kv_new, a = self.self_attn.prefill(kv_cached, self.input_layernorm(x), meta)
        x = x + a
        return kv_new, x + self.mlp(self.post_attention_layernorm(x))

    def decode(self, cache, x: jax.Array, meta):
        if self.batch_invariant:
            return self._decode_invariant(cache, x, meta)
        cache, a = self.self_attn.decode(cache, self.input_layernorm(x), meta)
        x = x + a
        return cache, x + self.mlp(self.post_attention_layernorm(x))

    # ---- batch-invariant: token-local work in fixed row blocks, attention in fixed query/key tiles ----
    def _pre(self, x: jax.Array, pos: jax.Array):
        return self.self_attn.project(self.input_layernorm(x), pos)

    def _post(self, x: jax.Array, a: jax.Array) -> jax.Array:
        x = x + self.self_attn.output(a)
        return x + self.mlp(self.post_attention_layernorm(x))

    def _prefill_invariant(self, kv_cached: jax.Array, x: jax.Array, meta):
        b, t, h = x.shape
        pos = meta.positions(t)
        rows = x.reshape(b * t, h)
        q, rec = invariant.row_blocked(self._pre, rows, pos.reshape(b * t))
        kv_new = meta.zero_padding(rec.reshape(b, t, *rec.shape[1:]).astype(kv_cached.dtype))
        q = jax.tree.map(lambda a: a.reshape(b, t, *a.shape[1:]), q)
        a = self.self_attn.attend_prefill(q, self.self_attn.prefill_keys(kv_cached, kv_new, meta), pos)
        out = invariant.row_blocked(self._post, rows, a.reshape(b * t, *a.shape[2:]))
        return kv_new, out.reshape(b, t, h)

    def _decode_invariant(self, cache, x: jax.Array, meta):
        n, _, h = x.shape
        rows = x.reshape(n, h)
        q, rec = invariant.row_blocked(self._pre, rows, meta.lengths)
        cache = self.self_attn.write_cache(cache, rec, meta)
        a = self.self_attn.attend_decode(q, cache, meta.lengths)
        return cache, invariant.row_blocked(self._post, rows, a).reshape(n, 1, h)


class LMHead(nnx.Module):
    """Final RMSNorm + vocabulary projection (tied to the embedding when the config says so)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else nnx.Linear(
                cfg.hidden_size,
                cfg.vocab_size,
                use_bias=False,
                dtype=dtype,
                param_dtype=dtype,
                rngs=rngs,
            )
        )

    batch_invariant = False  # set by CausalLM (models/layers/invariant.py)

    def __call__(self, x: jax.Array, embedding: jax.Array) -> jax.Array:
        """x [..., H], embedding [V, H] -> float32 logits [..., V]."""
        if self.batch_invariant:
            rows = x.reshape(-1, x.shape[-1])
            return invariant.row_blocked(lambda r: self._logits(r, embedding), rows).reshape(*x.shape[:-1], -1)
        return self._logits(x, embedding)

    def _logits(self, x: jax.Array, embedding: jax.Array) -> jax.Array:
        x = self.norm(x)
        if self.lm_head is None:
            return jnp.einsum("...h,vh->...v", x, embedding, preferred_element_type=jnp.float32)
        return self.lm_head(x).astype(jnp.float32)


class CausalLM(nnx.Module):
    """embed_tokens [V, H] (nnx.Embed), layers (nnx.List of decoder layers), final (LMHead)."""

    def __init__(
        self,
        cfg: ModelConfig,
        make_layer: Callable[[ModelConfig, int, nnx.Rngs], nnx.Module],
        rngs: nnx.Rngs,
    ):
        dtype = jnp.dtype(cfg.dtype)
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.layers = nnx.List([make_layer(cfg, i, rngs) for i in range(cfg.num_layers)])
        self.final = LMHead(cfg, rngs)
        if cfg.batch_invariant:
            for module in (*self.layers, self.final):
                module.batch_invariant = True
