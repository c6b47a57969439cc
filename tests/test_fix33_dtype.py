"""Fix wave 33 (dtype): `RuntimeConfig.dtype`, the model's weights, activations and KV (float32 by default,
bfloat16 or float16). It had none: the runtime always built float32 ops (a bf16 checkpoint upcast), and a node
process serving several runs, `driver.prepare`'s kept ops and the cost-model shape could not tell dtypes apart."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from configs.tiny_runtime import get_config
from dualpath_jax.runtime import driver
from dualpath_jax.runtime.config import ConfigError, RuntimeConfig, validate
from dualpath_jax.runtime.model_ops import ModelOps, cost_model_shape


def _config(**fields) -> RuntimeConfig:
    return RuntimeConfig.from_config_dict({**get_config("test").runtime.to_dict(), **fields})


def test_the_config_takes_a_dtype_and_refuses_others():
    """float32 by default (the config file's too); bfloat16 / float16 taken; another value a ConfigError naming the
    field and the values it takes, from `validate` and from `driver.prepare` before the model is made."""
    assert RuntimeConfig().dtype == "float32" and _config().dtype == "float32"
    for dtype in ("float32", "bfloat16", "float16"):
        validate(_config(dtype=dtype))
    for bad in ("bf16", "float64", "int8"):
        cfg = _config(dtype=bad)
        want = rf"config.dtype '{bad}' unknown; known: float32, bfloat16, float16"
        with pytest.raises(ConfigError, match=want):
            validate(cfg)
        with pytest.raises(ConfigError, match=want):
            driver.prepare(cfg)
    with pytest.raises(ConfigError, match="config.dtype must be a string"):
        _config(dtype=16)


def test_the_ops_of_a_bf16_config_are_bf16_and_known_apart():
    """`ModelOps.of_config` of a bfloat16 config: bfloat16 weights, a bfloat16 KV layout of half float32's bytes, its
    own fingerprint; `serves` tells it from the float32 ops (a node session rebuilds), `driver.prepare` keeps each
    apart and refuses float32 ops for a bfloat16 config; the compute-quota cost shape is its own (2-byte values)."""
    f32_cfg = _config()
    b16_cfg = f32_cfg.replace(dtype="bfloat16")
    _, f32 = driver.prepare(f32_cfg)
    _, b16 = driver.prepare(b16_cfg)
    try:
        assert {str(x.dtype) for x in jax.tree.leaves(b16.runner.params)} == {"bfloat16"}
        assert {str(x.dtype) for x in jax.tree.leaves(f32.runner.params)} == {"float32"}
        assert b16.kv_layout.kv_dtype == "bfloat16" and f32.kv_layout.kv_dtype == "float32"
        assert b16.config.kv_bytes_per_token * 2 == f32.config.kv_bytes_per_token
        assert "/bfloat16/" in b16.fingerprint and "/float32/" in f32.fingerprint
        assert b16.serves(b16_cfg) and not b16.serves(f32_cfg)
        assert f32.serves(f32_cfg) and not f32.serves(b16_cfg)
        assert driver.prepare(b16_cfg)[1] is b16  # kept for the next run of the same dtype
        with pytest.raises(ConfigError, match=r"config.dtype='bfloat16' but the given model_ops has dtype 'float32'"):
            driver.prepare(b16_cfg, model_ops=f32)
        f32_shape, b16_shape = cost_model_shape(f32), cost_model_shape(b16)
        assert b16_shape.name == "runtime:tiny_qwen2/bfloat16" and f32_shape.name == "runtime:tiny_qwen2"
        assert (b16_shape.weight_bytes, b16_shape.kv_dtype_bytes) == (2, 2)
        assert (f32_shape.weight_bytes, f32_shape.kv_dtype_bytes) == (4, 4)
        assert b16_shape.kv_bytes_per_token == b16.config.kv_bytes_per_token
    finally:
        driver.release_model()


def test_a_bf16_prefill_writes_bf16_kv_bytes():
    """The engines' view: a bfloat16 config's prefill hands back each layer's KV at 2 bytes a value."""
    ops = ModelOps.of_config(_config(dtype="bfloat16"))
    bpt = ops.kv_layout.bytes_per_token_per_layer
    got = []
    tokens = ops.prefill([np.arange(5, dtype=np.int32)], [0], lambda layer: [None], lambda layer, kv: got.append(kv))
    assert len(tokens) == 1 and len(got) == ops.config.num_layers
    assert all(kv[0].shape == (5, bpt) and kv[0].dtype == np.uint8 for kv in got)
    assert bpt == int(np.prod(ops.kv_layout.record_shape)) * 2


def test_a_checkpoint_is_loaded_in_the_configs_dtype(base, tmp_path):
    """A local HF checkpoint's weights are cast to config.dtype when loaded (`load_hf_checkpoint(dir, dtype)`): a
    bfloat16 config gets the float32 checkpoint's weights rounded to bfloat16, and bfloat16 KV."""
    pytest.importorskip("safetensors", reason="HF import needs the 'hf' extra (safetensors)")
    from test_models_checkpoint import QWEN2_HF, hf_tensors, write_hf_checkpoint

    from models.registry import config_from_hf
    from models.runner import ModelRunner

    direct = ModelRunner(config_from_hf(QWEN2_HF), seed=7, num_slots=1, capacity=16)
    write_hf_checkpoint(tmp_path / "ckpt", QWEN2_HF, hf_tensors(QWEN2_HF, direct.pure_params()))
    ops = ModelOps.of_config(base.replace(model=str(tmp_path / "ckpt"), dtype="bfloat16"))
    assert ops.config.dtype == "bfloat16" and ops.kv_layout.kv_dtype == "bfloat16"
    got, want = jax.tree.leaves(ops.runner.pure_params()), jax.tree.leaves(direct.pure_params())
    assert len(got) == len(want) and {str(x.dtype) for x in got} == {"bfloat16"}
    assert all(np.array_equal(np.asarray(g), np.asarray(w).astype(g.dtype)) for g, w in zip(got, want, strict=True))
