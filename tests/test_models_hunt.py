"""Models hunt (2026-12-03): numerical correctness and contracts of models/ found by randomized checks."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from models.kv import layer_block, layer_blocks_to_records, request_kv_to_full_blocks
from models.qwen2 import tiny_qwen2
from models.runner import ModelRunner, PrefillRequest


def test_llama_attention_bias_covers_o_proj(tmp_path):
    """HF Llama's `attention_bias` puts a bias on o_proj as well as on q/k/v. The import mapped only the q/k/v
    biases: `o_proj.bias` was left over as "not used by the model" (a log line), so two checkpoints that differ in
    it loaded as the same weights (same fingerprint, same logits)."""
    pytest.importorskip("safetensors")
    from test_models_checkpoint import LLAMA_HF, hf_tensors, write_hf_checkpoint

    from models.checkpoint import load_hf_checkpoint
    from models.registry import config_from_hf

    hf = dict(LLAMA_HF, attention_bias=True)
    base = hf_tensors(hf, ModelRunner(config_from_hf(hf), seed=1).pure_params())
    h = hf["hidden_size"]
    runs = []
    for value in (0.0, 0.5):
        tensors = dict(base)
        for i in range(hf["num_hidden_layers"]):
            tensors[f"model.layers.{i}.self_attn.o_proj.bias"] = np.full(h, value, np.float32)
        path = tmp_path / f"bias{value}"
        write_hf_checkpoint(path, hf, tensors)
        config, params = load_hf_checkpoint(path)
        bias = params["layers"][0]["self_attn"]["o_proj"].get("bias")
        assert bias is not None, "o_proj.bias of an attention_bias Llama was dropped"
        np.testing.assert_array_equal(bias, np.full(h, value, np.float32))
        runner = ModelRunner(config, params)
        runs.append((runner.fingerprint(), runner.prefill_layerwise([PrefillRequest(np.arange(12), 0)]).last_logits))
    assert runs[0][0] != runs[1][0]
    assert np.abs(runs[0][1] - runs[1][1]).max() > 1e-3
    # Qwen2 keeps q/k/v biases only (its o_proj has none), and so does a Llama without attention_bias.
    assert "bias" not in ModelRunner(tiny_qwen2(num_layers=1)).pure_params()["layers"][0]["self_attn"]["o_proj"]


def test_layer_blocks_of_another_layout_are_refused():
    """A bfloat16 Layer Block [1, 16, 128] handed to a float32 layout (bpt 256) was reshaped to [8, 256] and read as
    8 float32 tokens, silently; every block must be uint8 [1, tokens, bpt] of this layout."""
    f32, b16 = tiny_qwen2().kv_layout, tiny_qwen2(dtype="bfloat16").kv_layout
    kv = np.ones((b16.num_layers, 16, *b16.record_shape), ml_dtypes.bfloat16)
    (full,) = request_kv_to_full_blocks(b16, kv, 16)
    for block in (layer_block(full, 0), layer_block(full, 0)[0]):
        with pytest.raises(ValueError, match="Layer Block 0 has shape"):
            layer_blocks_to_records(f32, [block])
    np.testing.assert_array_equal(layer_blocks_to_records(b16, [layer_block(full, 1)]), kv[1])


def test_prefill_whole_refuses_a_list_of_full_blocks_as_one_requests_kv():
    """`load_prompt_kv` takes a list of Full Blocks; `prefill_whole` takes [L, c, *record] (or bytes [L, c, bpt]).
    A list of exactly L Full Blocks stacks to [L, L, tokens, bpt], which passed the layer-count check: layer l was
    fed Full Block l (all layers of 16 tokens, read as L x 16 tokens of layer l): logits off by ~3 (4 layers)."""
    runner = ModelRunner(tiny_qwen2(num_layers=2), seed=3, num_slots=1, capacity=16)
    seq = np.random.default_rng(0).integers(0, runner.config.vocab_size, 40)
    logits, kv = runner.full_prefill([seq])
    blocks = request_kv_to_full_blocks(runner.layout, kv[0][:, :32], 16)
    assert len(blocks) == runner.num_layers
    request = [PrefillRequest(seq[32:], 32)]
    with pytest.raises(ValueError, match=r"request 0: cached_kv has shape \(2, 2, 16, 256\), expected \[2, tokens"):
        runner.prefill_whole(request, [blocks])
    # The same blocks concatenated on the token axis (bytes [L, c, bpt]) and as records give the reference.
    for cached in (np.concatenate(blocks, axis=1), kv[0][:, :32]):
        _, got, _ = runner.prefill_whole(request, [cached])
        assert np.abs(np.asarray(got)[0] - logits[0][-1]).max() <= 1e-4


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_a_slots_previous_sequence_does_not_leak_into_the_next(batch_invariant):
    """Keys beyond a slot's length are masked (weight exactly 0), but `load_prompt_kv` rewrote only the new prompt's
    bucket of rows: a non-finite record the previous sequence left further in (a float16 overflow, damaged bytes)
    stayed, and 0 x inf = NaN made every decode step of the next sequence NaN (greedy token 0, NaN KV written)."""
    config = tiny_qwen2(num_layers=2, batch_invariant=batch_invariant)
    runner = ModelRunner(config, seed=3, num_slots=2, capacity=64)
    rng = np.random.default_rng(0)
    before, prompt = rng.integers(0, config.vocab_size, 40), rng.integers(0, config.vocab_size, 20)
    _, (kv_before, kv) = runner.full_prefill([before, prompt])
    kv_before = kv_before.copy()
    kv_before[:, 35] = np.inf  # beyond the next prompt's 32-row bucket
    runner.load_prompt_kv(0, kv_before)
    runner.free_slot(0)
    runner.load_prompt_kv(0, kv)
    runner.load_prompt_kv(1, kv)  # a slot that never held anything: the reference
    tokens = runner.decode_step([0, 1], [int(prompt[-1])] * 2)
    got = runner.read_kv(0, 0, 21)
    assert np.isfinite(got).all(), "NaN KV written by the next sequence"
    assert tokens[0] == tokens[1]
    np.testing.assert_allclose(got, runner.read_kv(1, 0, 21), atol=1e-5)
