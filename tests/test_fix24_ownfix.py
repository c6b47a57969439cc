"""Fix wave 24, "ownfix": the own-model audit's findings on the models side (/work/notes/fix24_ownmodel_report.md).

A model the compute-quota batcher cannot price is a config error of `driver.prepare`; an unsupported RoPE type is
named before its fields; a restore into a config the checkpoint never recorded is a logged warning; a checkpoint
path that is missing or a file is named as such; impossible GQA cost-model shapes and quantized config.json files
are refused by name. Everything here is config.json files, tiny tensors and one tiny orbax checkpoint (no runs).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re

import numpy as np
import pytest
from test_models_checkpoint import DEEPSEEK_V3_HF, QWEN2_HF

from dualpath_jax.runtime import driver, model_ops
from dualpath_jax.runtime.config import ConfigError
from dualpath_jax.runtime.model_ops import model_config
from models.checkpoint import abstract_params, load_hf_checkpoint, load_hf_config, restore_params, save_params
from models.layers.rope import RopeConfig
from models.registry import TINY_CONFIGS, config_from_hf, tiny_config
from models.runner import random_params
from schedulers.calibrate import TINY_DENSE
from schedulers.cost_model import MODEL_SHAPES, ModelShape


def _config_only(path, hf: dict):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf))
    return path


def test_compute_quota_on_a_model_it_cannot_price_is_a_config_error_of_prepare(base, tmp_path):
    """A DeepSeek checkpoint with moe_layer_freq 2 under the compute-quota batcher failed with a NotImplementedError
    traceback from the nodes once the run had started; prepare now refuses it first, naming the batcher."""
    ckpt = _config_only(tmp_path / "freq2", dict(DEEPSEEK_V3_HF, num_hidden_layers=3, moe_layer_freq=2))
    cfg = base.replace(model=str(ckpt), **{"scheduler.batcher": "compute_quota"})
    with pytest.raises(ConfigError) as e:
        driver.prepare(cfg)
    msg = str(e.value)
    assert msg.startswith("config.scheduler.batcher='compute_quota' cannot price this model"), msg
    assert "moe_layer_freq=2" in msg and "fifo" in msg and "2th" not in msg, msg
    # the fifo batcher is not priced: prepare goes on (and fails only later, at the weights this directory lacks)
    with pytest.raises(ConfigError, match=r"^config.model: .*no \*.safetensors files"):
        driver.prepare(base.replace(model=str(ckpt)))
    # without routed experts every layer is dense, whatever moe_layer_freq says: priced
    dense = config_from_hf(dict(DEEPSEEK_V3_HF, num_hidden_layers=3, moe_layer_freq=2, n_routed_experts=None))
    assert not model_ops.model_cost_shape("dense", dense).is_moe


def test_an_unsupported_rope_type_is_named_before_its_fields():
    scaling = {"type": "longrope", "factor": 2.0, "short_factor": [1.0], "long_factor": [1.0]}
    with pytest.raises(ValueError, match=r"rope_scaling type 'longrope' is not supported \(default, llama3, yarn\)"):
        RopeConfig.from_hf(16, 1e4, scaling)
    # a supported type's unknown field is still named as one
    with pytest.raises(ValueError, match=r"rope_scaling field\(s\) \['truncate'\] are not supported"):
        RopeConfig.from_hf(
            16, 1e4, {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "truncate": 1}
        )


def test_restore_without_a_recorded_config_logs_a_warning(tmp_path, caplog):
    """A checkpoint saved as save_params(dir, params) restored into another config (another rope theta) without a
    word; it still restores, with one warning saying how to record the config."""
    cfg = tiny_config("tiny_qwen2")
    params = random_params(abstract_params(cfg), 0)
    save_params(tmp_path / "without", params)
    save_params(tmp_path / "with", params, cfg)
    with caplog.at_level(logging.WARNING, logger="models.checkpoint"):
        restore_params(tmp_path / "with", cfg)
    assert "recorded no config" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="models.checkpoint"):
        restored = restore_params(tmp_path / "without", cfg)  # restored all the same
    warned = [r.getMessage() for r in caplog.records if "recorded no config" in r.getMessage()]
    assert len(warned) == 1 and "save_params(dir, params, config)" in warned[0], caplog.text
    assert np.array_equal(restored["embed_tokens"]["embedding"], params["embed_tokens"]["embedding"])


def test_a_checkpoint_path_that_is_missing_or_a_file_is_named_as_such(tmp_path):
    from safetensors.numpy import save_file

    ckpt = _config_only(tmp_path / "ckpt", QWEN2_HF)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'nope'} does not exist")):
        load_hf_config(tmp_path / "nope")
    with pytest.raises(ValueError, match=re.escape(f"{ckpt / 'config.json'} is not a directory")):
        load_hf_checkpoint(ckpt / "config.json")
    # the runtime's model name: a path is not taken for an unknown tiny config's name
    with pytest.raises(KeyError, match=re.escape(f"model '{tmp_path / 'nope'}': no such directory")):
        model_config(str(tmp_path / "nope"))
    with pytest.raises(KeyError, match=r"'\./nope': no such directory"):
        model_config("./nope")
    with pytest.raises(KeyError, match=r"no such directory \(a leading ~ is not expanded"):
        model_config("~/surely-not-here/ckpt")
    with pytest.raises(KeyError, match=re.escape(f"model '{ckpt / 'config.json'}': is not a directory")):
        model_config(str(ckpt / "config.json"))
    with pytest.raises(KeyError, match=r"unknown model 'tiny_qwen3'; known: "):  # a name stays a name
        model_config("tiny_qwen3")
    # a directory without config.json: its path once
    (tmp_path / "empty").mkdir()
    with pytest.raises(KeyError) as e:
        model_config(str(tmp_path / "empty"))
    assert e.value.args[0] == f"HF checkpoint directory {str(tmp_path / 'empty')!r}: no config.json"
    # a missing tensor names the directory
    save_file({"model.norm.weight": np.ones(32, np.float32)}, str(ckpt / "model.safetensors"))
    with pytest.raises(ValueError, match=re.escape(f"HF checkpoint {str(ckpt)!r}: missing tensor 'model.embed")):
        load_hf_checkpoint(ckpt)


def test_cost_model_refuses_impossible_gqa_shapes():
    good = dict(name="own", layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=256)
    ModelShape(**good)
    ModelShape(**dict(good, kv_heads=4))  # MHA
    for bad in ({"heads": 5}, {"kv_heads": 8}, {"kv_heads": 0, "kv_bytes_per_token_per_layer_override": 64}):
        with pytest.raises(ValueError, match=r"ModelShape 'own': heads=\d+, kv_heads=\d+, head_dim=16 is not a GQA"):
            ModelShape(**dict(good, **bad))
    with pytest.raises(ValueError, match=r"head_dim=0 is not a GQA"):
        ModelShape(**dict(good, head_dim=0, kv_bytes_per_token_per_layer_override=64))
    # MLA shapes do not use kv_heads / head_dim for attention
    assert MODEL_SHAPES.get("ds660b").is_mla
    ModelShape(**dict(good, heads=5, kv_heads=0, head_dim=0, kv_lora_rank=16, qk_rope_head_dim=4))
    # every registered shape, the calibration's and the tiny runtime models' still build
    for name in MODEL_SHAPES.names():
        dataclasses.replace(MODEL_SHAPES.get(name))
    dataclasses.replace(TINY_DENSE)
    for name in TINY_CONFIGS.names():
        model_ops.model_cost_shape(name, tiny_config(name))


@pytest.mark.parametrize("hf", [QWEN2_HF, DEEPSEEK_V3_HF], ids=["qwen2", "deepseek_v3"])
def test_a_quantized_config_is_refused_by_name(hf):
    with pytest.raises(ValueError, match=r"config.json: quantization_config \(quant_method='fp8'\) is not supported"):
        config_from_hf(dict(hf, quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]}))
    config_from_hf(dict(hf, quantization_config=None))  # (null: none)
