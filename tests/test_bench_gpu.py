"""experiments/bench_gpu.py: the ~1B dense model's shape, the shape flag, and the compute-only timing (on a tiny
model here; the GPU figures are in the README)."""

import math

import numpy as np
import pytest
from absl import app

from experiments import bench_gpu
from models.flops import prefill_flops
from models.qwen2 import tiny_llama


def test_the_model_has_llama_3_2_1b_shape():
    c = bench_gpu.llama_1b()
    h, f, v = c.hidden_size, c.intermediate_size, c.vocab_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * f + 2 * h
    params = c.num_layers * per_layer + v * h + h  # tied embeddings
    assert c.tie_word_embeddings and c.dtype == "bfloat16"
    assert 1.23e9 < params < 1.25e9  # Llama-3.2-1B: 1.24 B
    assert c.kv_bytes_per_token_per_layer == 2 * 8 * 64 * 2  # K and V, 8 heads of 64, bf16
    assert bench_gpu.llama_1b(2, "float32").num_layers == 2


@pytest.mark.parametrize("text", ["8:1024", "a:1:0", "0:1:0", "1:0:0", "1:1:-64", "1:1:100"])
def test_a_bad_shape_is_named(text):
    with pytest.raises(app.UsageError, match=text):
        bench_gpu._shape(text)


def test_compute_only_timing_counts_the_model_flops():
    config = tiny_llama()
    r = bench_gpu.whole_on_device(config, 2, 16, 64, 2)
    assert r["step_s"] > 0 and r["min_step_s"] <= r["step_s"]
    assert math.isclose(r["model_gflops_per_s"], 2 * prefill_flops(config, 16, 64) / r["step_s"] / 1e9)
    assert np.isfinite(r["compile_s"])


def test_the_tables_print_apart_and_the_device_once(capsys, monkeypatch):
    """Two Markdown tables need a blank line between them (the layerwise table's header came right after the compute
    table's last row: one table with mismatched columns), and a CPU was "device cpu cpu"."""
    import types

    for name, value in (("_LAYERS", 2), ("_DTYPE", "float32"), ("_DEVICE_ONLY", False)):  # (flags not parsed here)
        monkeypatch.setattr(bench_gpu, name, types.SimpleNamespace(value=value))
    side = {"step_s": 0.01, "model_gflops_per_s": 100.0, "tokens_per_s": 10.0, "compile_s": 0.1}
    row = {"batch": 1, "miss_tokens": 64, "cached_tokens": 0, "on_device": side, "layerwise": side, "whole": side}
    row.update(ratio=1.0, ratio_min=1.0, max_abs_logit_diff=0.0)
    bench_gpu._print_tables(types.SimpleNamespace(platform="cpu", device_kind="cpu"), [row], None)
    out = capsys.readouterr().out
    assert "device cpu\n" in out and "\n\n| batch x miss (+cached) | layerwise ms" in out
    assert bench_gpu.device_name(types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H200")) == "gpu NVIDIA H200"
