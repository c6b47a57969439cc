"""The measurement behind experiments/bench_prefill.py (importable without absl flags, e.g. by tests).

`run_one` times `ModelRunner.prefill_layerwise` (per-layer steps, cached KV fed as Layer Blocks from host
Full Blocks, each layer's miss KV to host) against `ModelRunner.prefill_whole` (one jit of the whole model on
the same inputs, KV to host too), interleaving repeats so both see the same machine load.
"""

from __future__ import annotations

import dataclasses
import statistics
import time


def bench_configs(moe_dispatch: str = "dense"):
    from models.deepseek import tiny_deepseek
    from models.layers.rope import RopeConfig
    from models.qwen2 import tiny_qwen2

    dense = tiny_qwen2(
        vocab_size=2048,
        hidden_size=384,
        num_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=48,
        intermediate_size=1024,
        rope=RopeConfig(dim=48, theta=1e6),
    )
    moe = tiny_deepseek(
        vocab_size=2048,
        hidden_size=384,
        num_layers=6,
        num_attention_heads=8,
        intermediate_size=1024,
        moe_intermediate_size=256,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=4,
        topk_group=2,
        q_lora_rank=192,
        kv_lora_rank=128,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        rope=RopeConfig(
            dim=16,
            theta=10000.0,
            kind="yarn",
            factor=4.0,
            original_max_position_embeddings=512,
            mscale=1.0,
            mscale_all_dim=1.0,
            interleaved=True,
        ),
    )
    return {"dense": dense, "moe": dataclasses.replace(moe, moe_dispatch=moe_dispatch)}


def run_one(name: str, config, batch: int, miss: int, cached: int, repeats: int) -> dict:
    import jax
    import numpy as np

    from models.flops import prefill_flops
    from models.kv import layer_block, request_kv_to_full_blocks
    from models.runner import ModelRunner, PrefillRequest

    runner = ModelRunner(config, seed=0, num_slots=1, capacity=16)
    rng = np.random.default_rng(0)
    layout = runner.layout
    requests = [PrefillRequest(rng.integers(0, config.vocab_size, miss), cached) for _ in range(batch)]
    # Cached prefixes as Full Blocks in host memory (64-token blocks), fed back as Layer Blocks.
    block = 64 if cached % 64 == 0 else cached or 1
    stored = [
        request_kv_to_full_blocks(
            layout,
            (0.1 * rng.standard_normal((config.num_layers, cached, *layout.record_shape))).astype(layout.np_dtype),
            block,
        )
        for _ in range(batch)
    ]
    cached_records = [np.concatenate([b for b in s], axis=1) if s else None for s in stored]
    cached_records = [None if r is None else layout.from_bytes(r) for r in cached_records]

    def provider(layer):
        return [[layer_block(fb, layer) for fb in s] for s in stored]

    sink = []

    def layerwise():
        sink.clear()
        return runner.prefill_layerwise(
            requests,
            provider if cached else None,
            lambda layer, kv: sink.append(len(kv)),
        )

    def whole():
        kv, logits, _ = runner.prefill_whole(requests, cached_records if cached else None)
        return np.asarray(kv), np.asarray(jax.block_until_ready(logits))

    out = {
        "model": name,
        "arch": config.architecture,
        "layers": config.num_layers,
        "hidden": config.hidden_size,
        "batch": batch,
        "miss_tokens": miss,
        "cached_tokens": cached,
        "kv_bytes_per_token_per_layer": config.kv_bytes_per_token_per_layer,
        "layer_kinds": runner.num_layer_kinds,
    }
    fns = {"layerwise": layerwise, "whole": whole}
    for label, fn in fns.items():
        before = dict(runner.trace_counts)
        t0 = time.perf_counter()
        fn()  # trace + compile (or persistent-cache load) + run
        first = time.perf_counter() - t0
        fn()  # warm-up
        traces = {k: v - before.get(k, 0) for k, v in runner.trace_counts.items() if v - before.get(k, 0)}
        out[label] = {"first_call_s": first, "traces": traces, "times": []}
    warm_traces = dict(runner.trace_counts)
    # Interleaved repeats: both paths see the same machine load (the CPU is shared and noisy).
    for _ in range(repeats):
        for label, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[label]["times"].append(time.perf_counter() - t0)
    for label in fns:
        r = out[label]
        r["step_s"] = statistics.median(r["times"])
        r["min_step_s"] = min(r["times"])
        r["compile_s"] = max(r["first_call_s"] - r["step_s"], 0.0)
        r["tokens_per_s"] = batch * miss / r["step_s"]
        r["model_gflops_per_s"] = batch * prefill_flops(config, miss, cached) / r["step_s"] / 1e9
    if dict(runner.trace_counts) != warm_traces:
        raise RuntimeError(f"retraced while warm: {warm_traces} -> {dict(runner.trace_counts)}")
    # Both paths compute the same thing.
    lw = runner.prefill_layerwise(requests, provider if cached else None)
    _, logits, _ = runner.prefill_whole(requests, cached_records if cached else None)
    out["max_abs_logit_diff"] = float(np.abs(lw.last_logits - np.asarray(logits)[:batch]).max())
    out["ratio"] = out["layerwise"]["step_s"] / out["whole"]["step_s"]
    out["ratio_min"] = out["layerwise"]["min_step_s"] / out["whole"]["min_step_s"]
    return out
