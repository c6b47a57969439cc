"""Bad input to the model loaders: a clear ValueError naming the file / field / tensor / param, never a silent
wrong result (NaN logits, wrong weights) or a deep traceback. HF config.json values, safetensors weights, orbax
checkpoints (damaged array bytes, saved dtypes)."""

from __future__ import annotations

import json
import logging
import re

import jax
import numpy as np
import pytest

pytest.importorskip("safetensors", reason="HF import needs the 'hf' extra (safetensors)")
from safetensors.numpy import save_file
from test_models_checkpoint import DEEPSEEK_V3_HF, LLAMA_HF, QWEN2_HF, hf_tensors, write_hf_checkpoint

from models import checkpoint
from models.checkpoint import load_hf_checkpoint, load_hf_config, restore_params, save_params
from models.registry import config_from_hf, tiny_config
from models.runner import ModelRunner

# ---- config.json values -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hf_config, setting, says",
    [
        # rope_theta <= 0: 0**x and 1/0 in the inverse frequencies, every logit NaN
        (QWEN2_HF, {"rope_theta": 0.0}, "config.json: field 'rope_theta' must be > 0, got 0.0"),
        (QWEN2_HF, {"rope_theta": -10000.0}, "config.json: field 'rope_theta' must be > 0, got -10000.0"),
        (DEEPSEEK_V3_HF, {"rope_theta": 0}, "config.json: field 'rope_theta' must be > 0, got 0"),
        # rsqrt(mean(x^2) + eps) of a negative number: every logit NaN
        (QWEN2_HF, {"rms_norm_eps": -1.0}, "config.json: field 'rms_norm_eps' must be > 0, got -1.0"),
        (LLAMA_HF, {"rms_norm_eps": 0}, "config.json: field 'rms_norm_eps' must be > 0, got 0"),
        (DEEPSEEK_V3_HF, {"rms_norm_eps": -1e-6}, "config.json: field 'rms_norm_eps' must be > 0, got -1e-06"),
        # these were a ZeroDivisionError deep in the model code: the param init (head_dim 0), the first prefill
        (
            QWEN2_HF,
            {"hidden_size": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
            "config.json: num_attention_heads=4 > hidden_size=2 and no head_dim",
        ),
        (DEEPSEEK_V3_HF, {"rope_theta": 1.0}, "field 'rope_theta' must be > 1 with rope_scaling type 'yarn'"),
        (
            DEEPSEEK_V3_HF,
            {"rope_scaling": dict(DEEPSEEK_V3_HF["rope_scaling"], beta_fast=0)},
            "rope_scaling field 'beta_fast' must be > 0, got 0",
        ),
        (
            LLAMA_HF,
            {"rope_scaling": dict(LLAMA_HF["rope_scaling"], low_freq_factor=0.0)},
            "rope_scaling field 'low_freq_factor' must be > 0, got 0.0",
        ),
    ],
)
def test_hf_config_values_that_give_nan_or_zero_division_are_refused(tmp_path, hf_config, setting, says):
    (tmp_path / "config.json").write_text(json.dumps(dict(hf_config, **setting)))
    with pytest.raises(ValueError, match=re.escape(says)):
        load_hf_config(tmp_path)


def test_hf_config_values_in_range_still_load():
    assert config_from_hf(dict(QWEN2_HF, rope_theta=1.0, rms_norm_eps=1e-12)).rms_norm_eps == 1e-12
    assert config_from_hf(dict(DEEPSEEK_V3_HF, rope_theta=1.5)).rope.theta == 1.5
    assert config_from_hf(dict(QWEN2_HF, hidden_size=2, num_attention_heads=4, head_dim=8)).head_dim == 8


def test_hf_config_nested_too_deeply_is_named(tmp_path):
    """100,000 nested '[' escaped as a RecursionError from the json module."""
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"config.json: invalid JSON \(nested too deeply\)"):
        load_hf_checkpoint(tmp_path)


# ---- safetensors weights ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_tensors():
    runner = ModelRunner(config_from_hf(QWEN2_HF), seed=3, num_slots=1, capacity=16)
    return hf_tensors(QWEN2_HF, runner.pure_params())


@pytest.mark.parametrize(
    "name, value, says",
    [
        ("model.layers.0.mlp.up_proj.weight", lambda a: np.full_like(a, np.nan), "has non-finite values"),
        ("model.layers.1.self_attn.q_proj.bias", lambda a: np.where(a > 0, np.inf, a), "has non-finite values"),
        (
            "model.norm.weight",  # finite as float64, inf once cast to the float32 config dtype
            lambda a: np.full(a.shape, 1e300, np.float64),
            "has values beyond float32's range (inf once cast from float64)",
        ),
    ],
)
def test_hf_non_finite_weights_are_named(tmp_path, qwen_tensors, name, value, says):
    """NaN / inf weights loaded silently and every logit was NaN."""
    tensors = dict(qwen_tensors)
    tensors[name] = value(tensors[name])
    write_hf_checkpoint(tmp_path, QWEN2_HF, tensors)
    with pytest.raises(ValueError, match=re.escape(f"tensor {name!r} {says}")):
        load_hf_checkpoint(tmp_path)


def test_hf_missing_tensors_are_named_before_the_model_is_built(tmp_path, monkeypatch):
    """The loader built the whole abstract model (superlinear in the layer count: 100 layers took ~50 s) before it
    compared tensor names, so a config.json with an absurd num_hidden_layers hung before "missing tensor"."""
    (tmp_path / "config.json").write_text(json.dumps(dict(QWEN2_HF, num_hidden_layers=10_000)))
    save_file({"model.norm.weight": np.ones(32, np.float32)}, str(tmp_path / "model.safetensors"))

    def built(config):
        raise AssertionError("the abstract model was built before the tensor names were compared")

    monkeypatch.setattr(checkpoint, "abstract_params", built)
    with pytest.raises(
        ValueError,
        match=r"missing tensor 'model.embed_tokens.weight' \(for embed_tokens/embedding\); 120001 more of the "
        r"10000-layer model's tensors missing",
    ):
        load_hf_checkpoint(tmp_path)


# ---- orbax checkpoints --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_params():
    return ModelRunner(config_from_hf(QWEN2_HF), seed=4, num_slots=1, capacity=16).pure_params()


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_orbax_restore_refuses_damaged_array_bytes(tmp_path, qwen_params):
    """Flipped bytes in an array data file (ocdbt.process_0/d/*) restored without error, as wrong weights:
    nothing checked the array bytes. save_params now stores a checksum per param; restore_params verifies it."""
    cfg = config_from_hf(QWEN2_HF)
    ckpt = tmp_path / "ckpt"
    save_params(ckpt, qwen_params)
    assert _same(qwen_params, restore_params(ckpt, cfg))
    data = max((p for p in ckpt.rglob("*") if p.is_file() and "/d/" in str(p)), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + 64] = bytes(b ^ 0xFF for b in raw[mid : mid + 64])
    data.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"ckpt: cannot read the checkpoint \(damaged or incomplete\?\)"):
        restore_params(ckpt, cfg)


def test_orbax_restore_names_the_param_whose_checksum_differs(tmp_path, qwen_params):
    cfg = config_from_hf(QWEN2_HF)
    ckpt = tmp_path / "ckpt"
    save_params(ckpt, qwen_params)
    meta_file = ckpt / "_CHECKPOINT_METADATA"
    meta = json.loads(meta_file.read_text())
    rec = meta["custom_metadata"]["dualpath_checksums"]["params"]["layers/1/mlp/up_proj/kernel"]
    rec["xxh3_64"] = "0" * 16
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(
        ValueError, match=r"layers/1/mlp/up_proj/kernel does not match the checksum stored when it was saved"
    ):
        restore_params(ckpt, cfg)
    meta_file.write_text("{not json")
    with pytest.raises(ValueError, match=r"ckpt: cannot read the checkpoint \(damaged\?\): unreadable _CHECKPOINT_"):
        restore_params(ckpt, cfg)


def test_orbax_checkpoint_saved_without_checksums_restores_with_a_note(tmp_path, qwen_params, caplog):
    """A checkpoint written before the checksums were stored (plain orbax save) still restores."""
    import orbax.checkpoint as ocp

    cfg = config_from_hf(QWEN2_HF)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save((tmp_path / "old").absolute(), checkpoint._saveable(qwen_params))
    ckptr.wait_until_finished()
    ckptr.close()
    with caplog.at_level(logging.WARNING, logger="models.checkpoint"):
        restored = restore_params(tmp_path / "old", cfg)
    assert _same(qwen_params, restored)
    assert "old: the checkpoint has no checksums" in caplog.text


def test_orbax_restore_refuses_another_dtype(tmp_path, qwen_params):
    """orbax casts to the target's dtype: int32 params came back as float32 silently (the docstring promised
    dtypes checked against the config); a float32 checkpoint for a bfloat16 config is refused too."""
    cfg = config_from_hf(QWEN2_HF)
    ints = jax.tree.map(lambda x: (np.asarray(x) * 100).astype(np.int32), qwen_params)
    save_params(tmp_path / "ints", ints)
    with pytest.raises(
        ValueError,
        match=r"ints: checkpoint does not match .*: embed_tokens/embedding has dtype int32; expected float32",
    ):
        restore_params(tmp_path / "ints", cfg)
    save_params(tmp_path / "f32", qwen_params)
    with pytest.raises(ValueError, match=r"has dtype float32; expected bfloat16"):
        restore_params(tmp_path / "f32", config_from_hf(QWEN2_HF, dtype="bfloat16"))


def test_orbax_bfloat16_round_trip_is_verified(tmp_path):
    cfg = tiny_config("tiny_qwen2", dtype="bfloat16", num_layers=1)
    params = ModelRunner(cfg, seed=2, num_slots=1, capacity=16).pure_params()
    save_params(tmp_path / "ckpt", params)
    restored = restore_params(tmp_path / "ckpt", cfg)
    assert _same(params, restored)
    assert {str(x.dtype) for x in jax.tree.leaves(restored)} == {"bfloat16"}
