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
from models.layers.rmsnorm import RMSNorm


class PreNormDecoderLayer(nnx.Module):
    """The pre-norm residual block both families share: x + attn(norm(x)), then + mlp(norm(x)).

    Subclasses set `input_layernorm`, `self_attn` (with `prefill`/`decode` over their KV), the
    `post_attention_layernorm` and `mlp` (dense SwiGLU or MoE). This is the layer contract of DESIGN.md:
    `(kv, hidden, meta) -> (kv, hidden)`.
    """

    def prefill(self, kv_cached: jax.Array, x: jax.Array, meta):
        kv_new, a = self.self_attn.prefill(kv_cached, self.input_layernorm(x), meta)
        x = x + a
        return kv_new, x + self.mlp(self.post_attention_layernorm(x))

    def decode(self, cache, x: jax.Array, meta):
        cache, a = self.self_attn.decode(cache, self.input_layernorm(x), meta)
        x = x + a
        return cache, x + self.mlp(self.post_attention_layernorm(x))


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

    def __call__(self, x: jax.Array, embedding: jax.Array) -> jax.Array:
        """x [..., H], embedding [V, H] -> float32 logits [..., V]."""
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
