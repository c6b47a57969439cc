"""RMSNorm as the HF Llama/Qwen2/DeepSeek families compute it (statistics in float32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
    """y = x / rms(x) * weight; the HF tensor is `<prefix>.weight` of shape [dim]."""

    def __init__(self, dim: int, eps: float, dtype: jnp.dtype):
        self.eps = float(eps)
        self.weight = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        # float32 statistics: bf16 variance loses too many bits on long hidden vectors.
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(dtype) * x32.astype(dtype)
