"""KV byte layout: records <-> Layer/Full Block bytes, bit-exact, views where the layout promises them."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.deepseek import tiny_deepseek
from models.kv import (
    KVLayout,
    full_blocks_to_request_kv,
    layer_block,
    layer_blocks_to_records,
    request_kv_to_full_blocks,
)
from models.qwen2 import tiny_qwen2


def _random_kv(layout: KVLayout, tokens: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((layout.num_layers, tokens, *layout.record_shape)).astype(layout.np_dtype)


def test_bytes_per_token_match_configs():
    q = tiny_qwen2()
    assert q.kv_bytes_per_token_per_layer == 2 * q.num_key_value_heads * q.head_dim * 4
    d = tiny_deepseek()
    assert d.kv_bytes_per_token_per_layer == (d.kv_lora_rank + d.qk_rope_head_dim) * 4
    # PAPER.md: DeepSeek-V3 MLA in bf16 = 61 layers x (512 + 64) x 2 B = 70,272 B per token.
    v3 = tiny_deepseek(num_layers=61, kv_lora_rank=512, qk_rope_head_dim=64, dtype="bfloat16")
    assert v3.kv_bytes_per_token == 70_272
    assert q.fingerprint() != tiny_qwen2(num_layers=5).fingerprint() != d.fingerprint()
    assert q.fingerprint() == tiny_qwen2().fingerprint()  # stable
    assert d.fingerprint() == tiny_deepseek(moe_dispatch="ragged").fingerprint()  # execution choice, same KV


@settings(max_examples=25, deadline=None)
@given(
    tokens=st.integers(0, 70),
    block=st.sampled_from([1, 4, 16]),
    family=st.sampled_from(["gqa", "mla"]),
    bf16=st.booleans(),
)
def test_full_block_round_trip_exact(tokens, block, family, bf16):
    cfg = (tiny_qwen2 if family == "gqa" else tiny_deepseek)(dtype="bfloat16" if bf16 else "float32")
    layout = cfg.kv_layout
    kv = _random_kv(layout, tokens, seed=tokens)
    blocks = request_kv_to_full_blocks(layout, kv, block, include_partial=True)
    assert len(blocks) == -(-tokens // block)
    for b in blocks:
        assert b.dtype == np.uint8 and b.flags.c_contiguous
        assert b.shape[0] == layout.num_layers and b.shape[2] == cfg.kv_bytes_per_token_per_layer
    back = full_blocks_to_request_kv(layout, blocks)
    assert back.dtype == kv.dtype and back.shape == kv.shape
    assert back.tobytes() == kv.tobytes()  # bit-exact
    whole = request_kv_to_full_blocks(layout, kv, block)
    assert len(whole) == tokens // block


def test_layer_block_is_a_contiguous_slice_of_the_full_block():
    layout = tiny_qwen2().kv_layout
    kv = _random_kv(layout, 16, seed=1)
    (full,) = request_kv_to_full_blocks(layout, kv, 16)
    bpt = layout.bytes_per_token_per_layer
    flat = full.reshape(-1)
    for layer in range(layout.num_layers):
        lb = layer_block(full, layer)
        assert lb.shape == (1, 16, bpt) and np.shares_memory(lb, full)
        # Layer-major: layer l is the byte range [l*16*bpt, (l+1)*16*bpt).
        assert lb.tobytes() == flat[layer * 16 * bpt : (layer + 1) * 16 * bpt].tobytes()
        recs = layout.from_bytes(lb)[0]  # a view, no copy
        assert np.shares_memory(recs, full)
        np.testing.assert_array_equal(recs, kv[layer])
        # GQA record = (K, V) x heads x head_dim: K of head h of token t is at byte (t*bpt + h*Dh*4).
        _, _hkv, dh = layout.record_shape
        k_h1 = np.frombuffer(lb.tobytes(), np.float32)[dh : 2 * dh]
        np.testing.assert_array_equal(k_h1, kv[layer, 0, 0, 1])
    two = [layer_block(full, 2)[:, :8], layer_block(full, 2)[:, 8:]]
    np.testing.assert_array_equal(layer_blocks_to_records(layout, two), kv[2])


def test_layout_rejects_wrong_dtype_and_shape():
    layout = tiny_deepseek().kv_layout
    with pytest.raises(ValueError, match="no silent conversion"):
        layout.to_bytes(np.zeros((3, *layout.record_shape), ml_dtypes.bfloat16))
    with pytest.raises(ValueError, match="KV records have shape"):
        layout.to_bytes(np.zeros((3, 7), np.float32))
    with pytest.raises(ValueError, match=r"uint8 \[\.\.\., 160\]"):
        layout.from_bytes(np.zeros((3, 100), np.uint8))
    with pytest.raises(ValueError, match="Full Block 1 has shape"):
        full_blocks_to_request_kv(layout, [np.zeros((3, 4, 160), np.uint8), np.zeros((2, 4, 160), np.uint8)])
    with pytest.raises(ValueError, match="expected \\[3, tokens"):
        request_kv_to_full_blocks(layout, np.zeros((2, 4, 40), np.float32), 4)


def test_kv_helpers_reject_silent_misuse():
    """Misuse that returned wrong-sized KV silently (no blocks, an empty Layer Block, layers read as tokens,
    records of another shape reinterpreted) raises naming the argument."""
    layout = tiny_qwen2().kv_layout
    kv = _random_kv(layout, 32, seed=2)
    for bs in (0, -4):  # -4 gave no blocks at all
        with pytest.raises(ValueError, match=f"block_size must be >= 1, got {bs}"):
            request_kv_to_full_blocks(layout, kv, bs)
    full = request_kv_to_full_blocks(layout, kv, 16)
    for layer in (layout.num_layers, -1):  # an empty [0, 16, bpt] slice
        with pytest.raises(ValueError, match=f"layer {layer} out of range"):
            layer_block(full[0], layer)
    with pytest.raises(ValueError, match="Layer Block 0 has shape"):  # a Full Block read as L x 16 tokens
        layer_blocks_to_records(layout, [full[0]])
    flat = kv.reshape(layout.num_layers, 32, -1)  # records flattened: reinterpreted by a reshape before
    with pytest.raises(ValueError, match="KV records have shape"):
        layout.as_records(flat)
    np.testing.assert_array_equal(layout.as_records(kv), kv)
