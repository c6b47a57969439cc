"""SwiGLU MLP (HF names: gate_proj, up_proj, down_proj; no biases)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class SwiGLUMLP(nnx.Module):
    def __init__(self, hidden: int, intermediate: int, dtype: jnp.dtype, rngs: nnx.Rngs):
        kw = {"use_bias": False, "dtype": dtype, "param_dtype": dtype, "rngs": rngs}
        # Kernels are [in, out] (HF Linear weights are [out, in]; the importer transposes).
        self.gate_proj = nnx.Linear(hidden, intermediate, **kw)
        self.up_proj = nnx.Linear(hidden, intermediate, **kw)
        self.down_proj = nnx.Linear(intermediate, hidden, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
