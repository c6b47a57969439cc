"""JAX dispatches device work asynchronously (session 50, the async audit F2): a DE's prompt load must be on the device when `DecodeBatch.load` returns,
since the decode engine stamps first_token and counts busy_s right after it (engines.DecodeEngine._loaded)."""

import jax
import jax.numpy as jnp
import numpy as np


def test_a_prompt_load_is_in_the_slot_when_load_returns():
    from dualpath_jax.runtime.model_ops import ModelOps

    ops = ModelOps("tiny_qwen2")
    batch = ops.new_decode_batch(2, 256)
    L, bpt = ops.config.num_layers, ops.kv_layout.bytes_per_token_per_layer
    area = np.zeros((L, 100, bpt), np.uint8)
    batch.load(0, area, 100)  # (compiles this bucket)
    batch.free(0)
    slow = jax.jit(lambda x: (jnp.tanh(x @ x) @ x).sum() * 0)  # a zero, ready only after a long computation
    late = jax.jit(lambda c, z: c + z.astype(c.dtype))
    x = jnp.ones((1024, 1024), jnp.float32)
    caches = batch.runner.decode_caches  # (a pytree per layer)
    jax.block_until_ready(jax.tree.map(lambda c: late(c, slow(x)), caches))  # (compiled)
    z = slow(x)
    batch.runner.decode_caches = jax.tree.map(lambda c: late(c, z), caches)  # the same cache, once z is done
    batch.load(0, area, 100)
    assert all(c.is_ready() for c in jax.tree.leaves(batch.runner.decode_caches))
