"""Models, fix19 (each test failed before its fix): the HF import refuses weights that config.json does not
describe (they were dropped with a log line, logits silently off) and gives absent config fields HF's defaults of the
architecture; an orbax checkpoint saved with its config refuses to restore into another (same param tree, other
numbers: it restored without an error)."""

from __future__ import annotations

import numpy as np
import pytest

from models.registry import config_from_hf
from models.runner import ModelRunner


def test_hf_weights_the_config_does_not_read_are_refused(tmp_path):
    # A Llama config.json without attention_bias over weights with q/k/v biases (a "llamafied" Qwen2) loaded with
    # the biases left out (a log line) and ran with other logits; now an error naming the tensor
    pytest.importorskip("safetensors")
    from test_models_checkpoint import QWEN2_HF, hf_tensors, write_hf_checkpoint

    from models.checkpoint import load_hf_checkpoint

    tensors = hf_tensors(QWEN2_HF, ModelRunner(config_from_hf(QWEN2_HF), seed=1).pure_params())
    llama = {**QWEN2_HF, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    write_hf_checkpoint(tmp_path / "biased", llama, tensors)
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.self_attn.k_proj.bias' is a weight .* not read"):
        load_hf_checkpoint(tmp_path / "biased")
    # A RoPE buffer (write_hf_checkpoint adds one) is not a weight of the model: still loaded, with a warning. A layer
    # past num_hidden_layers is refused on a Qwen2, which has no MTP layers (DeepSeek-V3's: tests/test_fix25_input.py)
    write_hf_checkpoint(tmp_path / "buffer", QWEN2_HF, tensors)
    config, params = load_hf_checkpoint(tmp_path / "buffer")
    assert config.num_layers == QWEN2_HF["num_hidden_layers"] and "bias" in params["layers"][0]["self_attn"]["q_proj"]
    extra = {f"model.layers.{QWEN2_HF['num_hidden_layers']}.eh_proj.weight": np.ones((2, 2), np.float32)}
    write_hf_checkpoint(tmp_path / "deeper", QWEN2_HF, {**tensors, **extra})
    with pytest.raises(ValueError, match=r"'model.layers.2.eh_proj.weight' is a weight .* \(num_hidden_layers=2\?\)"):
        load_hf_checkpoint(tmp_path / "deeper")


def test_orbax_checkpoint_saved_with_its_config_refuses_another(tmp_path):
    # Weights restored into a config with the same param tree but another rope_theta (or eps, RoPE scaling, MoE
    # routing) ran with other logits and no error; save_params(..., config=) records the config and restore_params
    # names the fields that differ. Round trips stay bit-exact, and a checkpoint saved without a config is unchecked.
    import dataclasses

    from models.checkpoint import restore_params, save_params
    from models.registry import tiny_config

    config = tiny_config("tiny_deepseek", num_layers=2)
    params = ModelRunner(config, seed=3).pure_params()
    save_params(tmp_path / "with", params, config)
    save_params(tmp_path / "without", params)
    other = dataclasses.replace(config, routed_scaling_factor=1.0, rope=dataclasses.replace(config.rope, theta=1e6))
    with pytest.raises(ValueError, match=r"saved for another config: .*rope.theta: saved 10000.0, given 1000000.0"):
        restore_params(tmp_path / "with", other)
    assert restore_params(tmp_path / "without", other)  # (nothing recorded: nothing to compare)
    # execution choices (not in the fingerprint) restore; the arrays come back bit for bit
    got = restore_params(tmp_path / "with", dataclasses.replace(config, moe_dispatch="ragged"))
    np.testing.assert_array_equal(got["layers"][1]["mlp"]["w_up"], params["layers"][1]["mlp"]["w_up"])
    with pytest.raises(
        ValueError, match=r"params: layers/0/mlp/down_proj/kernel has shape \(128, 64\), expected \(64, 64\)"
    ):
        save_params(tmp_path / "wrong", params, tiny_config("tiny_deepseek", num_layers=2, intermediate_size=64))
    with pytest.raises(ValueError, match=r"params: embed_tokens/embedding has dtype float32; the bfloat16 config's"):
        save_params(tmp_path / "wrong", params, tiny_config("tiny_deepseek", num_layers=2, dtype="bfloat16"))
    assert not (tmp_path / "wrong").exists()


def test_hf_config_fields_left_out_take_the_architectures_hf_defaults():
    # max_position_embeddings was 4096 for every family (HF: Qwen2 32768, Llama 2048, DeepSeek-V2 2048, V3 4096;
    # the runtime warns past it), and DeepSeek's q_lora_rank None (HF: 1536, so a checkpoint with q_a_proj failed
    # as "missing tensor q_proj"); an explicit null q_lora_rank is still a plain q_proj (V2-Lite)
    from test_models_checkpoint import DEEPSEEK_V3_HF, LLAMA_HF, QWEN2_HF

    def without(d: dict, *keys: str, **changes) -> dict:
        return {**{k: v for k, v in d.items() if k not in keys}, **changes}

    v2 = without(DEEPSEEK_V3_HF, "max_position_embeddings", architectures=["DeepseekV2ForCausalLM"])
    expected = [(QWEN2_HF, 32768), (LLAMA_HF, 2048), (v2, 2048), (DEEPSEEK_V3_HF, 4096)]
    for d, positions in expected:
        assert config_from_hf(without(d, "max_position_embeddings")).max_position_embeddings == positions
    assert config_from_hf(QWEN2_HF).max_position_embeddings == 512  # (given: read)
    assert config_from_hf(without(DEEPSEEK_V3_HF, "q_lora_rank")).q_lora_rank == 1536
    assert config_from_hf({**DEEPSEEK_V3_HF, "q_lora_rank": None}).q_lora_rank is None
