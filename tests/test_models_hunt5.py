"""Models hunt 5 (2026-12-03): an array name damaged in _METADATA (it failed inside orbax's gathered reads: "not an
orbax checkpoint" and stray "Event loop is closed" tracebacks) and HF yarn's cos/sin scale for Qwen2 / Llama."""

from __future__ import annotations

import gc
import math
import sys
import time

import pytest
from test_models_checkpoint import QWEN2_HF

from models.checkpoint import abstract_params, restore_params, save_params
from models.layers.rope import cos_sin_scale
from models.registry import config_from_hf, tiny_config
from models.runner import random_params


def _hf_yarn_attention_factor(rope_scaling: dict) -> float:
    """transformers' _compute_yarn_parameters (Qwen2 / Llama), without attention_factor."""
    factor = rope_scaling["factor"]

    def get_mscale(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    mscale, mscale_all_dim = rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
    return get_mscale(factor)


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "LlamaForCausalLM"])
@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"mscale": 0.707},
        {"mscale_all_dim": 0.5},
        {"mscale": 0.707, "mscale_all_dim": 0.0},
        {"mscale": 0.8, "mscale_all_dim": 0.5},
    ],
)
def test_qwen2_llama_yarn_scales_cos_sin_as_hf_does(arch, extra):
    """HF's yarn for Qwen2 / Llama multiplies cos/sin by get_mscale(factor) unless both mscale and mscale_all_dim
    are set (then by their ratio). The importer applied DeepSeek's ratio mscale(f, mscale) / mscale(f, mscale_all_dim)
    whenever either was given: a rope_scaling with only `mscale` (or only `mscale_all_dim`) rotated q and k by
    another magnitude than HF, silently (every attention logit scaled by the square of the ratio)."""
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, **extra}
    hf = dict(QWEN2_HF, architectures=[arch], rope_scaling=scaling)
    cfg = config_from_hf(hf)
    assert cos_sin_scale(cfg.rope) == pytest.approx(_hf_yarn_attention_factor(scaling), rel=1e-12)


def test_an_array_name_damaged_in_metadata_is_named_with_no_stray_reads(tmp_path, monkeypatch):
    """A flipped byte in _METADATA that renames an array (hunt 3's remaining fuzz case) was reported as "not an
    orbax checkpoint, or an incomplete one (no readable metadata)", and orbax's gathered metadata reads failed on
    the array that is not stored with the others in flight (now and then dozens of "Event loop is closed").
    Now the damaged checkpoint is named as such, with the array, before orbax reads anything."""
    cfg = tiny_config("tiny_qwen2")
    ckpt = tmp_path / "ckpt"
    save_params(ckpt, random_params(abstract_params(cfg), 0))
    meta = ckpt / "_METADATA"
    text = meta.read_text()
    assert '"key": "down_proj"' in text
    meta.write_text(text.replace('"key": "down_proj"', '"key": "down_proz"', 1))  # a flipped byte
    stray = []
    monkeypatch.setattr(sys, "unraisablehook", stray.append)
    with pytest.raises(
        ValueError,
        match=r"ckpt: cannot read the checkpoint \(damaged or incomplete\?\): _METADATA names the array "
        r"'layers\.0\.mlp\.down_proz\.kernel', which is not stored",
    ):
        restore_params(ckpt, cfg)
    time.sleep(0.5)  # reads left in flight complete within milliseconds
    gc.collect()
    assert not stray, [repr(u.exc_value) for u in stray[:3]]
