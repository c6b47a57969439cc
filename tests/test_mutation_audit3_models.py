"""Tests that kill hand mutations of models/ (the ModelRunner, the KV byte layout, the decode cache, configs, RoPE,
attention, MoE and checkpoints) that the rest of the suite let pass: the third mutation audit
(/work/notes/mutation3_models.md). Each test names the mutation of the code it guards against. Contracts (DESIGN.md,
"KV layout" / "Layer contract"; PAPER.md section 4): layerwise prefill equals full prefill; KV written to blocks and
read back is the same KV; decode after a prefix loaded from blocks equals a full recompute; configs are validated.
Tiny models only, one or two layers, so the file stays fast on CPU."""

from __future__ import annotations

import numpy as np
import pytest
from test_models_checkpoint import QWEN2_HF

from models.kv import layer_blocks_to_records
from models.qwen2 import tiny_qwen2
from models.registry import config_from_hf
from models.runner import ModelRunner, PrefillRequest, bucket


@pytest.fixture(scope="module")
def qwen():
    """Two-layer tiny Qwen2 with a decode capacity (20) that is not a power of two."""
    return ModelRunner(tiny_qwen2(num_layers=2), seed=3, num_slots=2, capacity=20)


def test_buckets_are_the_smallest_power_of_two_at_least_n_and_the_minimum():
    """Mutation: bucket's `1 << (n - 1).bit_length()` changed to `1 << n.bit_length()` (every batch and token
    count padded to twice its size: the same numbers, twice the compute). Contract (runner docstring): batch and
    miss-token counts are padded to the smallest power of two >= max(n, minimum)."""
    assert [bucket(n) for n in (0, 1, 2, 3, 4, 5, 8, 9, 16, 17)] == [1, 1, 2, 4, 4, 8, 8, 16, 16, 32]
    assert bucket(3, 16) == 16 and bucket(16, 16) == 16 and bucket(17, 16) == 32


def test_h2d_is_told_the_requests_cached_bytes_per_layer_not_the_padded_bucket(qwen):
    """Mutation: h2d_nbytes `sum(cached_len) * bpt` changed to `len(requests) * C_bucket * bpt` (the emulated CNIC
    paced the bucket padding too). Contract (runner docstring): h2d(layer, nbytes) gets the sum of the cached lengths
    x bytes per token per layer, no padding, once per layer."""
    rng = np.random.default_rng(0)
    rec = qwen.layout.record_shape
    cached = [16, 5]
    kv = [rng.standard_normal((qwen.num_layers, c, *rec)).astype(np.float32) for c in cached]
    calls = []
    qwen.prefill_layerwise(
        [PrefillRequest(rng.integers(0, 128, 3), c) for c in cached],
        lambda layer: [k[layer] for k in kv],
        h2d=lambda layer, n: calls.append((layer, n)),
    )
    bpt = qwen.layout.bytes_per_token_per_layer
    assert calls == [(layer, 21 * bpt) for layer in range(qwen.num_layers)]


def test_a_prompt_whose_bucket_exceeds_the_capacity_loads_and_reads_back_bit_exact(qwen):
    """Mutation: load_prompt_kv's padded length `min(bucket(p), capacity)` changed to `bucket(p)` (18 tokens pad to
    32 rows, more than the slot's 20). Contract: KV written to a slot and read back is the same KV; a prompt of up to
    `capacity` tokens fits, whatever the capacity."""
    rec = qwen.layout.record_shape
    kv = np.random.default_rng(1).standard_normal((qwen.num_layers, 18, *rec)).astype(np.float32)
    qwen.free_slot(0)
    qwen.load_prompt_kv(0, kv)
    np.testing.assert_array_equal(qwen.read_kv(0, 0, 18), kv)
    np.testing.assert_array_equal(qwen.read_kv(0, 5, 7), kv[:, 5:12])
    qwen.free_slot(0)


def test_read_kv_refuses_a_range_that_ends_past_the_slots_tokens(qwen):
    """Mutation: read_kv's bound `start + num_tokens > length` changed to `start > length` (tokens past the
    sequence, stale or zero rows, returned as its KV). Contract (runner docstring): read_kv reads tokens
    [start, start + n) of the slot's sequence, and refuses anything outside it."""
    rec = qwen.layout.record_shape
    qwen.free_slot(1)
    qwen.load_prompt_kv(1, np.ones((qwen.num_layers, 5, *rec), np.float32))
    assert qwen.read_kv(1, 3, 2).shape == (qwen.num_layers, 2, *rec)
    with pytest.raises(ValueError, match=r"slot 1: tokens \[3, 6\) outside its 5 tokens"):
        qwen.read_kv(1, 3, 3)
    with pytest.raises(ValueError, match="outside its 5 tokens"):
        qwen.read_full_block(1, 1, 4)  # tokens [4, 8)
    qwen.free_slot(1)


def test_a_negative_cached_len_is_refused_even_beside_a_request_without_cache(qwen):
    """Mutation: _batch's `cached_len < 0` check removed (with another request of cached_len 0 the batch ran, the
    request's tokens at positions -1, 0, 1 and no cached KV asked for). Contract: a request's cached_len is its
    number of hit tokens, an integer >= 0."""
    with pytest.raises(ValueError, match="request 1: cached_len=-1 < 0"):
        qwen.prefill_layerwise([PrefillRequest(np.ones(3, np.int32), 0), PrefillRequest(np.ones(3, np.int32), -1)])


def test_layer_blocks_that_are_not_bytes_are_refused_not_viewed_as_records():
    """Mutation: KVLayout.from_bytes's `data.dtype != np.uint8` check removed (an int8 or float Layer Block of the
    right width was viewed as records of another meaning). Contract (models/kv.py): Layer Blocks are uint8
    [1, tokens, bpt]; every map is a view or a copy of those bytes, never a reinterpretation of other data."""
    layout = tiny_qwen2().kv_layout
    bpt = layout.bytes_per_token_per_layer
    for dtype in (np.int8, np.float32):
        with pytest.raises(ValueError, match="KV bytes must be uint8"):
            layer_blocks_to_records(layout, [np.zeros((1, 4, bpt), dtype)])
        with pytest.raises(ValueError, match="KV bytes must be uint8"):
            layout.from_bytes(np.zeros((4, bpt), dtype))


def test_a_zero_head_count_in_config_json_is_named_not_a_zero_division():
    """Mutation: hf_field's `v < 1` changed to `v < 0` (num_attention_heads 0 passed, then hidden // 0 raised a bare
    ZeroDivisionError). Contract: a required HF size field is an integer >= 1, else a ValueError naming it."""
    with pytest.raises(ValueError, match="config.json: field 'num_attention_heads' must be an integer >= 1, got 0"):
        config_from_hf(dict(QWEN2_HF, num_attention_heads=0))


def test_a_token_id_equal_to_the_vocabulary_size_is_refused_by_prefill(qwen):
    """Mutation: _batch's `m.max() >= vocab_size` changed to `>` (id == vocab_size, one past the embedding table,
    was gathered on device: clamped or NaN, silently). Contract: prompt token ids lie in [0, vocab_size)."""
    vocab = qwen.config.vocab_size
    with pytest.raises(ValueError, match=rf"request 0: token id out of range \[0, {vocab}\)"):
        qwen.prefill_layerwise([PrefillRequest(np.array([1, vocab]), 0)])
    qwen.prefill_layerwise([PrefillRequest(np.array([0, vocab - 1]), 0)])  # the edges of the range are ids


def test_an_mla_prefill_mode_other_than_auto_is_the_form_used_for_every_bucket():
    """Mutation: MLAAttention.absorb_pays's `if prefill_mode != "auto": return prefill_mode == "absorbed"` dropped
    (mla_prefill="expanded" / "absorbed" ignored: the auto choice ran; batch-invariant configs need the absorbed
    form, and the benchmark compares the two). Contract (attention.py): "auto" picks per bucket, the others force."""
    from flax import nnx

    from models.layers.attention import MLAAttention
    from models.layers.rope import RopeConfig

    rope = RopeConfig(dim=8, theta=10000.0, interleaved=True)
    for mode in ("auto", "expanded", "absorbed"):
        attn = nnx.eval_shape(  # no weights needed: the choice is static Python
            lambda m=mode: MLAAttention(16, 2, None, 32, 16, 8, 16, 1e-6, False, rope, np.float32, nnx.Rngs(0), m)
        )
        short_append, long_prompt = attn.absorb_pays(8, 8 + 4096), attn.absorb_pays(512, 512)
        assert (short_append, long_prompt) == {
            "auto": (True, False),
            "expanded": (False, False),
            "absorbed": (True, True),
        }[mode]


def test_one_routed_expert_per_token_is_weighted_by_its_score_not_renormalised_to_one():
    """Mutation: DeepseekMoE.route's `if top_k > 1 and norm_topk_prob` changed to `if norm_topk_prob` (with one
    expert per token its weight became 1.0, not its score x routed_scaling_factor). Contract (moe.py, HF DeepSeek's
    routing): weights are renormalised only when more than one expert is chosen."""
    import jax.numpy as jnp
    from flax import nnx

    from models.layers.moe import DeepseekMoE

    moe = DeepseekMoE(8, 4, 4, 1, 0, "softmax", "greedy", 1, 1, True, 2.5, False, jnp.float32, nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(4).standard_normal((5, 8)), jnp.float32)
    for scoring, v3 in (("softmax", False), ("sigmoid", True)):
        moe.scoring_func, moe.always_scale = scoring, v3
        idx, weight = moe.route(x)
        logits = np.asarray(x) @ np.asarray(moe.gate_weight[...]).T
        if scoring == "softmax":
            scores = np.exp(logits - logits.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
        else:
            scores = 1 / (1 + np.exp(-logits))
        np.testing.assert_array_equal(np.asarray(idx)[:, 0], scores.argmax(-1))
        np.testing.assert_allclose(np.asarray(weight)[:, 0], scores.max(-1) * 2.5, rtol=1e-5)


def test_decode_cache_records_written_at_an_offset_read_back_there_and_nowhere_else():
    """Mutation: decode_cache.write_records's MLA offset `(slot, start, 0)` changed to `(slot, 0, 0)` (records written
    at token 0 whatever `start`; the runner only writes from 0 today, so no runner test could see it). Contract
    (decode_cache.py): write_records puts records [n, *record] at tokens [start, start + n) of the slot, read_records
    gets them back bit-exact, other rows untouched; for both record kinds."""
    import jax.numpy as jnp

    from models import decode_cache
    from models.deepseek import tiny_deepseek

    rng = np.random.default_rng(6)
    for layout in (tiny_qwen2().kv_layout, tiny_deepseek().kv_layout):
        cache = decode_cache.init_layer_cache(layout, 3, 12)
        recs = jnp.asarray(rng.standard_normal((4, *layout.record_shape)), jnp.float32)
        cache = decode_cache.write_records(layout, cache, jnp.int32(1), jnp.int32(5), recs)
        np.testing.assert_array_equal(decode_cache.read_records(layout, cache, jnp.int32(1), jnp.int32(5), 4), recs)
        whole = np.asarray(decode_cache.read_records(layout, cache, jnp.int32(1), jnp.int32(0), 12))
        assert not whole[:5].any() and not whole[9:].any()
        for other in (0, 2):
            assert not np.asarray(decode_cache.read_records(layout, cache, jnp.int32(other), jnp.int32(0), 12)).any()


def test_a_config_built_in_python_with_a_zero_norm_epsilon_is_refused():
    """Mutation: ModelConfig.__post_init__'s `rms_norm_eps > 0` changed to `>= 0` (eps 0: an all-zero hidden row,
    such as a padding token's, normalises to 0 / 0 = NaN). Contract: a config's rms_norm_eps is a finite number
    > 0, whether it comes from config.json or is built in Python (tiny_config(name, **overrides))."""
    with pytest.raises(ValueError, match=r"Qwen2Config: rms_norm_eps=0\.0 must be a finite number > 0"):
        tiny_qwen2(rms_norm_eps=0.0)
    assert tiny_qwen2(rms_norm_eps=1e-12).rms_norm_eps == 1e-12


def test_save_params_refuses_a_dangling_symlink_before_writing_anything(tmp_path):
    """Mutation: save_params's first check `path.exists() or path.is_symlink()` changed to `path.exists()` (a dangling
    symlink at the target passed: orbax wrote the whole checkpoint into a staging directory, only the final rename
    check refused it). Contract (checkpoint.py): save_params refuses an existing `dir` before writing anything."""
    from models.checkpoint import save_params

    target = tmp_path / "ckpt"
    target.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="already exists"):
        save_params(target, {"w": np.zeros((2, 2), np.float32)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_moe_layer_freq_makes_only_every_kth_layer_past_the_dense_ones_moe():
    """Mutation: DeepseekConfig.is_moe_layer's `i % moe_layer_freq == 0` dropped (every layer from
    first_k_dense_replace on became MoE). Contract (deepseek.py, HF DeepSeek): layers < first_k_dense_replace and
    those off moe_layer_freq use the dense MLP; the HF tensor map follows the same rule."""
    from models.deepseek import hf_tensor_map, tiny_deepseek

    cfg = tiny_deepseek(num_layers=5, first_k_dense_replace=1, moe_layer_freq=2)
    assert [cfg.is_moe_layer(i) for i in range(5)] == [False, False, True, False, True]
    tmap = hf_tensor_map(cfg)
    assert ("layers", 3, "mlp", "gate_proj", "kernel") in tmap and ("layers", 4, "mlp", "gate_weight") in tmap
    assert not tiny_deepseek(n_routed_experts=0, n_shared_experts=1, first_k_dense_replace=0).is_moe_layer(0)


def test_restore_refuses_arrays_whose_dtype_differs_from_the_checksum_record(tmp_path, monkeypatch):
    """Mutation: restore_params's check `rec["dtype"] != str(got.dtype) or digest differs` reduced to the digest (an
    array read back with another dtype of the same bytes, e.g. a damaged zarr dtype, float32 read as int32, passed the
    byte checksum and came back as int32 weights). Contract (checkpoint.py): restore_params returns the params saved,
    verified against the checksums (dtype and bytes) stored when they were saved."""
    from models import checkpoint
    from models.runner import random_params

    cfg = tiny_qwen2(num_layers=1)
    params = random_params(checkpoint.abstract_params(cfg), 0)
    checkpoint.save_params(tmp_path / "ckpt", params)
    read = checkpoint._read_arrays

    def read_as_int32(*args):
        out = read(*args)
        out["final"]["norm"]["weight"] = out["final"]["norm"]["weight"].view(np.int32)
        return out

    monkeypatch.setattr(checkpoint, "_read_arrays", read_as_int32)
    with pytest.raises(ValueError, match="final/norm/weight does not match the checksum"):
        checkpoint.restore_params(tmp_path / "ckpt", cfg)


def test_a_config_json_without_kv_heads_has_one_kv_head_per_attention_head():
    """Mutation: Qwen2Config.from_hf's default for num_key_value_heads `heads` changed to 1 (an MHA config.json,
    which leaves the field out or null, became MQA: a KV layout of 1 head). Contract (HF LlamaConfig): absent or
    null num_key_value_heads means num_attention_heads (multi-head attention); HF's Qwen2Config: null only (absent
    is its default 32: tests/test_fix9_runtime.py)."""
    hf = {k: v for k, v in QWEN2_HF.items() if k != "num_key_value_heads"}
    llama = dict(hf, architectures=["LlamaForCausalLM"])
    for d in (llama, dict(llama, num_key_value_heads=None), dict(hf, num_key_value_heads=None)):
        cfg = config_from_hf(d)
        assert cfg.num_key_value_heads == cfg.num_attention_heads == 4
        assert cfg.kv_layout.record_shape == (2, 4, cfg.head_dim)


def test_full_blocks_cut_from_a_requests_kv_are_contiguous_layer_major_bytes():
    """Mutation: request_kv_to_full_blocks's `np.ascontiguousarray(data[:, start:end])` changed to the strided view
    (a block's tokens of every layer, strided in [L, T, bpt]: not one contiguous byte range; flattening it copies,
    and a store or transport reading its buffer would see other tokens). Contract (models/kv.py): a Full Block is
    uint8 [L, tokens, bpt], layer-major and contiguous, layer l the byte range [l * tokens * bpt, (l + 1) * ...)."""
    from models.kv import layer_block, request_kv_to_full_blocks

    layout = tiny_qwen2(num_layers=3).kv_layout
    kv = np.random.default_rng(7).standard_normal((3, 40, *layout.record_shape)).astype(np.float32)
    blocks = request_kv_to_full_blocks(layout, kv, 16, include_partial=True)
    assert [b.shape[1] for b in blocks] == [16, 16, 8]
    for i, b in enumerate(blocks):
        assert b.flags.c_contiguous and np.shares_memory(b.reshape(-1), b)
        flat = memoryview(b).cast("B")  # the buffer itself, as a store writes it
        n = b.shape[1] * layout.bytes_per_token_per_layer
        for layer in range(3):
            assert layer_block(b, layer).flags.c_contiguous
            assert bytes(flat[layer * n : (layer + 1) * n]) == kv[layer, 16 * i : 16 * i + b.shape[1]].tobytes()


def test_the_persistent_compilation_cache_keeps_every_executable(tmp_path):
    """Mutation: enable_persistent_compilation_cache's `jax_persistent_cache_min_compile_time_secs` 0.0 changed to
    1.0 (JAX's default: tiny-model steps, compiled in well under 1 s, were never cached, so every run compiled them
    again). Contract (jax_cache.py): the on-disk cache keeps every executable, whatever its compile time or size."""
    import jax

    from models.jax_cache import enable_persistent_compilation_cache

    keys = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    before = {k: getattr(jax.config, k) for k in keys}
    try:
        assert enable_persistent_compilation_cache(str(tmp_path / "xla")) == str(tmp_path / "xla")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla") and (tmp_path / "xla").is_dir()
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
        assert jax.config.jax_persistent_cache_min_entry_size_bytes == 0
    finally:
        for k, v in before.items():
            jax.config.update(k, v)


def test_a_yarn_rope_built_in_python_refuses_a_theta_of_one_or_less():
    """Mutation: RopeConfig.__post_init__'s `kind == "yarn" and theta <= 1` check dropped (YaRN's correction range
    divides by log(theta): theta 1 was a ZeroDivisionError at the first trace, theta < 1 a range upside down).
    Contract: a RopeConfig built in Python is checked like one from config.json (from_hf names the same bound)."""
    from models.layers.rope import RopeConfig

    for theta in (1.0, 0.5):
        with pytest.raises(ValueError, match="must be > 1 for yarn scaling"):
            RopeConfig(dim=8, theta=theta, kind="yarn", factor=4.0, original_max_position_embeddings=64)
    assert RopeConfig(dim=8, theta=1.5, kind="yarn", factor=4.0).theta == 1.5
    assert RopeConfig(dim=8, theta=1.0).theta == 1.0  # unscaled RoPE takes any theta > 0


def test_absolute_keys_put_each_requests_new_tokens_right_after_its_own_cached_prefix():
    """Mutation: invariant.absolute_keys's `j < cached_len` changed to `j <= cached_len` (key cached_len, the first
    miss token's own key, was taken from the cached buffer's padding row instead). Contract (invariant.py): key j of
    a request sits at index j: its cached prefix, then its new tokens from cached_lens[b]; S rounds up to tiles."""
    import jax.numpy as jnp

    from models.layers import invariant

    rng = np.random.default_rng(8)
    cached = rng.standard_normal((2, 4, 3)).astype(np.float32)
    new = rng.standard_normal((2, 5, 3)).astype(np.float32)
    cached_lens = np.array([2, 4], np.int32)
    out = np.asarray(invariant.absolute_keys(jnp.asarray(cached), jnp.asarray(new), jnp.asarray(cached_lens)))
    assert out.shape == (2, invariant.KEY_TILE, 3)
    for b, cl in enumerate(cached_lens):
        np.testing.assert_array_equal(out[b, :cl], cached[b, :cl])
        np.testing.assert_array_equal(out[b, cl : cl + 5], new[b])


def test_a_rope_built_in_python_refuses_an_infinite_theta():
    """Mutation: RopeConfig.__post_init__'s `math.isfinite(theta) and theta > 0` reduced to `theta > 0` (theta inf:
    every inverse frequency 0 but the first, RoPE silently almost off). Contract: rope theta is a finite number > 0
    (config.json's rope_theta is checked the same way by hf_float)."""
    from models.layers.rope import RopeConfig

    # (since 2026-12-05 the RopeConfig's field check names it first, in its own words)
    with pytest.raises(ValueError, match="RopeConfig: theta=inf must be a finite number|rope theta must be a finite"):
        RopeConfig(dim=8, theta=float("inf"))


def test_a_v2_config_json_without_expert_groups_is_the_config_with_one_group():
    """Mutation: DeepseekConfig.from_hf's `topk_group ... or 1` changed to `or 2` (an absent or null topk_group of a
    V2 config.json became 2 groups kept: another config, another fingerprint, so KV stored under the explicit
    spelling missed). Contract: absent / null group fields mean no grouping (n_group = topk_group = 1); equal
    models have equal fingerprints (the KV store's key)."""
    from test_models_checkpoint import DEEPSEEK_V3_HF

    v2 = dict(DEEPSEEK_V3_HF, architectures=["DeepseekV2ForCausalLM"], scoring_func="softmax", topk_method="greedy")
    bare = {k: v for k, v in v2.items() if k not in ("n_group", "topk_group")}
    explicit = config_from_hf(dict(bare, n_group=1, topk_group=1))
    for d in (bare, dict(bare, n_group=None, topk_group=None)):
        cfg = config_from_hf(d)
        assert (cfg.n_group, cfg.topk_group) == (1, 1)
        assert cfg.fingerprint() == explicit.fingerprint()


def test_an_odd_rotary_dim_is_refused_when_the_rope_is_built():
    """Mutation: RopeConfig.__post_init__'s `if dim % 2` check dropped (RoPE rotates dim/2 pairs: an odd dim failed
    at the first trace as a broadcast error inside apply_rope, or for MLA's k_pe not at all until then). Contract:
    a rotary dim is even, named when the config is built."""
    from models.layers.rope import RopeConfig

    with pytest.raises(ValueError, match="rotary dim must be even, got 7"):
        RopeConfig(dim=7)
    assert RopeConfig(dim=8).dim == 8


@pytest.mark.parametrize("method", ["group_limited_greedy", "noaux_tc"])
@pytest.mark.parametrize("missing", ["n_group", "topk_group"])
@pytest.mark.parametrize("value", ["absent", None, 0])
def test_grouped_routing_without_a_group_count_is_refused_by_name(method, missing, value):
    """A DeepSeek config.json whose routing works within expert groups (`topk_method` group_limited_greedy or
    noaux_tc) but gives no `n_group` / `topk_group` (absent on V2, whose HF defaults are None, or null or 0) was read
    as one group kept; HF's model fails on it (it views the scores as [tokens, n_group, -1]). Refused, naming the
    field. Without routed experts nothing is routed, so nothing is refused."""
    from test_models_checkpoint import DEEPSEEK_V3_HF

    v2 = dict(DEEPSEEK_V3_HF, architectures=["DeepseekV2ForCausalLM"], topk_method=method, n_group=2, topk_group=1)
    if method == "group_limited_greedy":
        v2["scoring_func"] = "softmax"
    assert config_from_hf(v2).n_group == 2
    bad = {k: v for k, v in v2.items() if k != missing} if value == "absent" else dict(v2, **{missing: value})
    with pytest.raises(ValueError, match=f"topk_method='{method}' routes within expert groups but {missing}="):
        config_from_hf(bad)
    assert config_from_hf(dict(bad, n_routed_experts=0)).n_routed_experts == 0


def test_a_tensor_in_two_shards_of_a_checkpoint_without_index_is_refused(tmp_path):
    """Mutation: _read_safetensors' `if name in tensors` check dropped (a stale shard of another revision left in a
    directory without model.safetensors.index.json: the shard read last replaced the tensor silently, so the weights
    depended on the shards' file names). Contract (checkpoint.py): a tensor found in more than one shard is refused,
    naming it; never one copy picked."""
    pytest.importorskip("safetensors")
    from safetensors.numpy import save_file
    from test_models_checkpoint import hf_tensors, write_hf_checkpoint

    from models.checkpoint import load_hf_checkpoint

    tensors = hf_tensors(QWEN2_HF, ModelRunner(config_from_hf(QWEN2_HF), seed=0).pure_params())
    write_hf_checkpoint(tmp_path, QWEN2_HF, tensors)
    stale = {"model.norm.weight": np.full_like(tensors["model.norm.weight"], 7.0)}
    save_file(stale, str(tmp_path / "model-00001-of-00003.safetensors"))  # an older revision's shard
    with pytest.raises(ValueError, match=r"tensor 'model.norm.weight' appears in more than one shard"):
        load_hf_checkpoint(tmp_path)


def test_save_params_refuses_empty_params_before_writing_anything(tmp_path):
    """Mutation: _saveable's `if not params` check dropped (empty params then reached orbax; orbax 0.12.8 happens to
    refuse an empty tree, "Found empty item", after save_params made its staging directory, so the refusal rested
    on a third-party library's behaviour and came with orbax's wording). Contract (checkpoint.py): save_params
    refuses empty params itself, naming them, before writing anything."""
    from models.checkpoint import save_params

    with pytest.raises(ValueError, match="params: empty, nothing to save"):
        save_params(tmp_path / "ckpt", {})
    assert list(tmp_path.iterdir()) == []


def test_a_prompts_last_logits_are_the_same_bits_alone_or_batched_beside_others():
    """Mutation: CausalLM sets `batch_invariant` on its layers but not on the LM head (`for module in self.layers`
    instead of `(*self.layers, self.final)`): the head's vocabulary projection then ran on the whole batch at once,
    and on XLA:CPU `x @ W` gives a row other bits for another row count (measured for V >= 512; the tiny configs'
    V=128 hides it, so test_invariant does not see it). Contract (models/layers/invariant.py, README "Known limits"):
    with batch_invariant, a token's logits are the same bits however its prompt is batched; a near-tie between two
    logits must not flip a greedy token with the batch."""
    cfg = tiny_qwen2(num_layers=1, vocab_size=1024, batch_invariant=True)
    runner = ModelRunner(cfg, seed=5, num_slots=1, capacity=32)
    rng = np.random.default_rng(7)
    seq = rng.integers(0, cfg.vocab_size, 9).astype(np.int32)
    others = [rng.integers(0, cfg.vocab_size, n).astype(np.int32) for n in (3, 12, 6)]
    alone = np.asarray(runner.prefill_layerwise([PrefillRequest(seq, 0)]).last_logits[0])
    batch = [PrefillRequest(others[0], 0), PrefillRequest(seq, 0), PrefillRequest(others[1], 0)]
    batched = np.asarray(runner.prefill_layerwise([*batch, PrefillRequest(others[2], 0)]).last_logits[1])
    np.testing.assert_array_equal(batched, alone)
