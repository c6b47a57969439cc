"""Models hunt 8 (2026-12-04): a top-level partial_rotary_factor that was ignored; params the runner cast silently
(int params, float32 weights beyond float16's range, NaN); a list of Full Blocks that does not fit named by block;
read_kv's bool offsets."""

from __future__ import annotations

import jax
import ml_dtypes
import numpy as np
import pytest
from test_models_checkpoint import DEEPSEEK_V3_HF, LLAMA_HF, QWEN2_HF

from models.registry import config_from_hf, tiny_config
from models.runner import ModelRunner


@pytest.mark.parametrize("hf", [QWEN2_HF, LLAMA_HF, DEEPSEEK_V3_HF], ids=lambda h: h["architectures"][0])
def test_top_level_partial_rotary_factor_is_refused_not_ignored(hf):
    """transformers' RoPE init reads `partial_rotary_factor` from the top level of config.json (rotary dims =
    head_dim x factor). It was ignored and every dim rotated, silently (only the transformers >= 5 spelling inside
    rope_parameters was refused). 1 (or 1.0) is the unscaled RoPE these models implement: same fingerprint."""
    with pytest.raises(ValueError, match=r"config\.json: partial_rotary_factor=0\.5 is not supported \(1\.0\)"):
        config_from_hf({**hf, "partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match=r"field 'partial_rotary_factor' must be a finite number, got '0\.5'"):
        config_from_hf({**hf, "partial_rotary_factor": "0.5"})
    plain = config_from_hf(hf).fingerprint()
    for ok in (1, 1.0, None):
        assert config_from_hf({**hf, "partial_rotary_factor": ok}).fingerprint() == plain


@pytest.fixture(scope="module")
def qwen_pure():
    cfg = tiny_config("tiny_qwen2", num_layers=1)
    return cfg, jax.tree.map(np.asarray, ModelRunner(cfg, num_slots=1, capacity=8).pure_params())


def _with(pure: dict, path: tuple, fn) -> dict:
    out = jax.tree.map(lambda a: a, pure)  # a new tree (leaves shared)
    node = out
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = fn(node[path[-1]])
    return out


def test_runner_refuses_params_that_are_not_floats(qwen_pure):
    """An int (a quantized tensor) or bool leaf was cast to the config dtype silently; the HF import and
    restore_params refuse such tensors, naming them."""
    cfg, pure = qwen_pure
    for dtype in (np.int8, np.int32, np.bool_):
        bad = _with(pure, ("layers", 0, "mlp", "up_proj", "kernel"), lambda a, d=dtype: a.astype(d))
        with pytest.raises(ValueError, match=rf"params: layers/0/mlp/up_proj/kernel has dtype {np.dtype(dtype)}"):
            ModelRunner(cfg, bad, num_slots=1, capacity=8)
    # every float dtype is still taken, and cast
    for dtype in (np.float16, ml_dtypes.bfloat16, np.float64):
        ok = _with(pure, ("final", "norm", "weight"), lambda a, d=dtype: a.astype(d))
        runner = ModelRunner(cfg, ok, num_slots=1, capacity=8)
        assert runner.pure_params()["final"]["norm"]["weight"].dtype == np.float32


def test_runner_names_params_that_are_not_finite_once_cast(qwen_pure):
    """float32 weights beyond float16's range became inf in a float16 runner without an error (every logit NaN
    once they reached the activations), and so did NaN weights cast to the config's dtype; load_hf_checkpoint
    refuses both. A cast that stays finite loads as before, bit for bit."""
    cfg, pure = qwen_pure
    cfg16 = tiny_config("tiny_qwen2", num_layers=1, dtype="float16")
    big = _with(pure, ("final", "norm", "weight"), lambda a: np.full_like(a, 1e6))
    with pytest.raises(
        ValueError, match=r"params: final/norm/weight has values beyond float16's range \(inf once cast from float32\)"
    ):
        ModelRunner(cfg16, big, num_slots=1, capacity=8)

    def nan(a):
        a = a.astype(np.float64)
        a[0, 0] = np.nan
        return a

    with pytest.raises(ValueError, match=r"params: layers/0/self_attn/q_proj/kernel has non-finite values"):
        ModelRunner(cfg, _with(pure, ("layers", 0, "self_attn", "q_proj", "kernel"), nan), num_slots=1, capacity=8)
    r16 = ModelRunner(cfg16, pure, num_slots=1, capacity=8)
    want = jax.tree.map(lambda a: a.astype(np.float16), pure)
    assert r16.fingerprint() == ModelRunner(cfg16, want, num_slots=1, capacity=8).fingerprint()


def test_load_prompt_kv_names_the_full_block_that_does_not_fit():
    """A list of Full Blocks with one of another layer count (another model's, or a Layer Block) failed in
    np.concatenate ("all the input array dimensions except for the concatenation axis must match exactly"), naming
    neither the slot nor the block. Blocks are checked one by one now; a list mixing Full Block bytes and records
    (each valid) loads as their concatenation."""
    cfg = tiny_config("tiny_qwen2", num_layers=2)
    runner = ModelRunner(cfg, num_slots=2, capacity=16)
    bpt, rec = runner.layout.bytes_per_token_per_layer, runner.layout.record_shape
    rng = np.random.default_rng(0)
    good = rng.standard_normal((2, 4, *rec)).astype(np.float32)
    with pytest.raises(ValueError, match=r"slot 1: Full Block 1 has shape \(1, 4, 256\), expected \[2, tokens, 256\]"):
        runner.load_prompt_kv(1, [runner.layout.to_bytes(good), np.zeros((1, 4, bpt), np.uint8)])
    with pytest.raises(ValueError, match=r"slot 1: Full Block 0: KV dtype float64 != layout kv_dtype float32"):
        runner.load_prompt_kv(1, [good.astype(np.float64)])
    assert not runner.slot_in_use(1)
    more = rng.standard_normal((2, 3, *rec)).astype(np.float32)
    runner.load_prompt_kv(1, [runner.layout.to_bytes(good), more])
    np.testing.assert_array_equal(runner.read_kv(1, 0, 7), np.concatenate([good, more], axis=1))
    runner.load_prompt_kv(0, [])
    assert runner.slot_in_use(0) and runner.slot_length(0) == 0


def test_read_kv_refuses_bool_offsets():
    """read_kv(slot, True, 1) read token 1 (a bool passes isinstance(int)); slot numbers already refuse a bool."""
    cfg = tiny_config("tiny_qwen2", num_layers=1)
    runner = ModelRunner(cfg, num_slots=1, capacity=8)
    runner.load_prompt_kv(0, np.zeros((1, 3, *runner.layout.record_shape), np.float32))
    for start, n in ((True, 1), (0, True)):
        with pytest.raises(ValueError, match=r"must be integers"):
            runner.read_kv(0, start, n)
    assert runner.read_kv(0, np.int64(1), 2).shape == (1, 2, *runner.layout.record_shape)
