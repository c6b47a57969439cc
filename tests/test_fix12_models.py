"""A researcher's own model shape (fix12, models journey): odd tiny shapes keep the runner's contracts, and a
config built in Python with a field of the wrong type is refused at construction, naming the field (it used to
fail deep in JAX, or worse, run with other numbers)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from models.deepseek import DeepseekConfig
from models.kv import layer_block, request_kv_to_full_blocks
from models.layers.rope import RopeConfig
from models.qwen2 import Qwen2Config
from models.registry import config_from_hf, tiny_config
from models.runner import ModelRunner, PrefillRequest

# Odd shapes: 1 and 3 layers, head_dim 6 / 10 / 7 (not powers of two), 1 KV head, vocab 7, tied and untied, MoE
# with top-k = number of experts, grouped routing, moe_layer_freq 2, a single MLA head.
ODD = {
    "qwen2_1L_kv1_tied": (
        "tiny_qwen2",
        dict(
            vocab_size=7,
            hidden_size=18,
            num_layers=1,
            num_attention_heads=3,
            num_key_value_heads=1,
            head_dim=6,
            intermediate_size=10,
            tie_word_embeddings=True,
            rope=RopeConfig(dim=6),
        ),
    ),
    "llama_3L_untied": (
        "tiny_llama",
        dict(
            vocab_size=7,
            hidden_size=30,
            num_layers=3,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=10,
            intermediate_size=14,
            tie_word_embeddings=False,
            rope=RopeConfig(
                dim=10,
                theta=500000.0,
                kind="llama3",
                factor=8.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    "deepseek_v3_1L_topk_all": (
        "tiny_deepseek",
        dict(
            vocab_size=7,
            hidden_size=22,
            num_layers=1,
            num_attention_heads=3,
            first_k_dense_replace=0,
            n_routed_experts=3,
            num_experts_per_tok=3,
            n_group=1,
            topk_group=1,
            n_shared_experts=0,
            q_lora_rank=11,
            kv_lora_rank=9,
            qk_nope_head_dim=5,
            qk_rope_head_dim=6,
            v_head_dim=7,
            moe_intermediate_size=5,
            tie_word_embeddings=True,
            rope=RopeConfig(
                dim=6,
                kind="yarn",
                factor=4.0,
                original_max_position_embeddings=16,
                mscale=1.0,
                mscale_all_dim=1.0,
                interleaved=True,
            ),
        ),
    ),
    "deepseek_v2_3L_grouped": (
        "tiny_deepseek_v2",
        dict(
            vocab_size=7,
            hidden_size=20,
            num_layers=3,
            num_attention_heads=1,
            first_k_dense_replace=0,
            moe_layer_freq=2,
            n_routed_experts=4,
            num_experts_per_tok=4,
            n_group=2,
            topk_group=2,
            topk_method="group_limited_greedy",
            n_shared_experts=1,
            kv_lora_rank=3,
            qk_nope_head_dim=3,
            qk_rope_head_dim=2,
            v_head_dim=5,
            moe_intermediate_size=3,
            intermediate_size=9,
            rope=RopeConfig(dim=2, interleaved=True),
        ),
    ),
}


def _odd(name: str, **kw):
    base, overrides = ODD[name]
    return tiny_config(base, **overrides, **kw)


def _contracts(r: ModelRunner, seq: np.ndarray, exact: bool):
    """Layerwise == full prefill (KV bytes), cached prefix (records and Layer Blocks) + append == whole, decode
    after prefill == prefill of one more token. `exact`: bit-identical (batch-invariant) instead of within 1e-5."""
    check = np.testing.assert_array_equal if exact else lambda a, b, **k: np.testing.assert_allclose(a, b, atol=1e-5)
    logits, kv = r.full_prefill([seq])
    logits, kv = logits[0], kv[0]
    res = r.prefill_layerwise([PrefillRequest(seq)], return_kv=True)
    assert res.miss_kv[0].tobytes() == kv.tobytes()
    check(res.last_logits[0], logits[-1])
    _, whole_logits, _ = r.prefill_whole([PrefillRequest(seq)])
    check(np.asarray(whole_logits)[0], logits[-1])
    c = 21
    prefix = r.prefill_layerwise([PrefillRequest(seq[:c])], return_kv=True).miss_kv[0]
    res = r.prefill_layerwise([PrefillRequest(seq[c:], c)], lambda layer: [prefix[layer]], return_kv=True)
    check(res.last_logits[0], logits[-1])
    check(res.miss_kv[0], kv[:, c:])
    blocks = request_kv_to_full_blocks(r.layout, prefix[:, :16], 16)
    res = r.prefill_layerwise([PrefillRequest(seq[16:], 16)], lambda layer: [[layer_block(b, layer) for b in blocks]])
    check(res.last_logits[0], logits[-1])
    r.load_prompt_kv(0, kv[:, :30])
    tokens = [int(r.decode_step([0], [int(t)])[0]) for t in seq[30:]]
    assert tokens == logits[30:].argmax(-1).tolist()
    check(r.read_kv(0, 0, seq.size), kv)
    r.free_slot(0)


# (one shape in the default run, the others with -m slow: the contracts are the existing model tests' too, and these
# four cost ~30 s of CI)
@pytest.mark.parametrize(
    "name", [n if n == "qwen2_1L_kv1_tied" else pytest.param(n, marks=pytest.mark.slow) for n in sorted(ODD)]
)
def test_odd_shapes_keep_the_runner_contracts(name):
    cfg = _odd(name)
    itemsize = np.dtype(cfg.dtype).itemsize
    if cfg.kv_layout.kind == "gqa":  # PAPER.md: layers x kv heads x head_dim x 2 (K, V) x bytes
        want = 2 * cfg.num_key_value_heads * cfg.head_dim * itemsize
    else:  # MLA: (kv_lora_rank + qk_rope_head_dim) x bytes
        want = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * itemsize
    assert cfg.kv_bytes_per_token_per_layer == want
    assert cfg.kv_bytes_per_token == want * cfg.num_layers
    seq = np.random.default_rng(0).integers(0, cfg.vocab_size, 37).astype(np.int32)
    _contracts(ModelRunner(cfg, seed=1, num_slots=1, capacity=64), seq, exact=False)


@pytest.mark.parametrize("name", ["qwen2_1L_kv1_tied", pytest.param("deepseek_v3_1L_topk_all", marks=pytest.mark.slow)])
def test_odd_shapes_batch_invariant_bits(name):
    """batch_invariant=True: the same bits whatever the chunking, the batch (packed beside another request) or
    prefill vs decode."""
    r = ModelRunner(_odd(name, batch_invariant=True), seed=1, num_slots=1, capacity=64)
    seq = np.random.default_rng(0).integers(0, 7, 37).astype(np.int32)
    _contracts(r, seq, exact=True)
    alone = r.prefill_layerwise([PrefillRequest(seq)], return_kv=True)
    packed = r.prefill_layerwise(
        [PrefillRequest(seq[:5]), PrefillRequest(seq), PrefillRequest(seq[3:9])], return_kv=True
    )
    np.testing.assert_array_equal(packed.last_logits[1], alone.last_logits[0])
    np.testing.assert_array_equal(packed.miss_kv[1], alone.miss_kv[0])


# ---- a config built in Python with a field of the wrong type ----


@pytest.mark.parametrize("name", ["tiny_qwen2", "tiny_deepseek"])
@pytest.mark.parametrize("rope", [{"dim": 16, "theta": 10000.0}, None, 10000.0])
def test_rope_of_the_wrong_type_is_named(name, rope):
    """rope={...} (the HF rope_scaling spelling), None or a theta: an AttributeError 'dict' object has no
    attribute 'dim' at the model build."""
    with pytest.raises(ValueError, match=r"rope=.* must be a RopeConfig"):
        tiny_config(name, rope=rope)


@pytest.mark.parametrize(
    "name, field",
    [
        ("tiny_qwen2", "qkv_bias"),  # an AssertionError without a message at the first prefill
        ("tiny_qwen2", "tie_word_embeddings"),  # "false" is truthy: a tied head, silently
        ("tiny_llama", "batch_invariant"),
        ("tiny_deepseek", "norm_topk_prob"),  # "false" renormalised the routing weights, silently
        ("tiny_deepseek", "attention_bias"),
    ],
)
@pytest.mark.parametrize("value", ["false", 0, None])
def test_boolean_fields_must_be_bools(name, field, value):
    with pytest.raises(ValueError, match=rf"{field}={value!r} must be True or False"):
        tiny_config(name, **{field: value})


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_experts_per_tok", 2.0),  # a TypeError inside jax.lax.top_k's shape at the first prefill
        ("n_group", 4.0),
        ("topk_group", "2"),
        ("routed_scaling_factor", "2.5"),  # a TypeError inside the jitted MoE
        ("routed_scaling_factor", float("nan")),  # every logit NaN, no error
        ("routed_scaling_factor", float("inf")),
        ("scoring_func", 1),
    ],
)
def test_typed_fields_are_checked_at_construction(field, value):
    with pytest.raises(ValueError, match=rf"DeepseekConfig: {field}="):
        tiny_config("tiny_deepseek", **{field: value})


def test_architecture_must_be_one_of_the_config_family():
    """Qwen2Config(architecture="DeepseekV3ForCausalLM") failed at the build with an AttributeError
    ('Qwen2Config' object has no attribute 'is_moe_layer'); an unknown name only at the build, as a KeyError."""
    for name, arch in [("tiny_qwen2", "DeepseekV3ForCausalLM"), ("tiny_deepseek", "LlamaForCausalLM")]:
        with pytest.raises(ValueError, match=rf"architecture='{arch}' is not one of"):
            tiny_config(name, architecture=arch)
    with pytest.raises(ValueError, match=r"Qwen2Config: architecture='Qwen3ForCausalLM' is not one of"):
        tiny_config("tiny_qwen2", architecture="Qwen3ForCausalLM")
    assert isinstance(tiny_config("tiny_qwen2", architecture="LlamaForCausalLM"), Qwen2Config)
    assert isinstance(tiny_config("tiny_deepseek", architecture="DeepseekV2ForCausalLM"), DeepseekConfig)


def test_hf_routed_experts_without_a_top_k_are_refused():
    """A V2 config.json with routed experts and no (or a null / 0) num_experts_per_tok: HF's DeepseekV2Config
    default is None, which its router cannot use; here it became top-1 routing, silently."""
    from test_models_checkpoint import DEEPSEEK_V3_HF

    v2 = dict(DEEPSEEK_V3_HF, architectures=["DeepseekV2ForCausalLM"])
    for d in ({k: v for k, v in v2.items() if k != "num_experts_per_tok"}, dict(v2, num_experts_per_tok=None)):
        with pytest.raises(ValueError, match="num_experts_per_tok"):
            config_from_hf(d)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        config_from_hf(dict(DEEPSEEK_V3_HF, num_experts_per_tok=0))
    # no routed experts: nothing to route, the top-k is not read
    dense = config_from_hf(dict(v2, n_routed_experts=None, num_experts_per_tok=None))
    assert dense.n_routed_experts == 0


def test_prefill_request_ids_must_be_one_dimensional():
    """PrefillRequest(ids [2, m]) (a batch of two prompts given as one request) ran as ONE prompt of both
    concatenated in prefill_layerwise / prefill_whole (full_prefill already refused non-1-D ids)."""
    r = ModelRunner(_odd("qwen2_1L_kv1_tied"), seed=1, num_slots=1, capacity=16)
    two = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
    with pytest.raises(ValueError, match=r"request 0: token ids of shape \(2, 3\)"):
        r.prefill_layerwise([PrefillRequest(two)])
    with pytest.raises(ValueError, match=r"request 1: token ids of shape \(2, 3\)"):
        r.prefill_whole([PrefillRequest(two[0]), PrefillRequest(two, 3)])
    with pytest.raises(ValueError, match=r"request 0: token ids of shape \(\)"):
        r.prefill_layerwise([PrefillRequest(np.int32(4))])


@pytest.mark.parametrize(
    "field, value",
    [
        ("dim", 16.0),  # an equal config (==) with another fingerprint (json.dumps writes 16.0)
        ("interleaved", "no"),  # a truthy string: the DeepSeek pair layout, silently
        ("factor", float("nan")),  # NaN inverse frequencies: every logit NaN
        ("beta_fast", float("inf")),
    ],
)
def test_rope_fields_of_a_python_config_are_type_checked(field, value):
    """(Refused by the RopeConfig itself since the rope's own check; the model config checks its rope's fields too.)"""
    with pytest.raises(ValueError, match=rf"RopeConfig: {field}={re.escape(repr(value))} must be"):
        RopeConfig(**{"dim": 16, "kind": "llama3", "original_max_position_embeddings": 64, field: value})


@pytest.mark.parametrize(
    "kw, says",
    [
        ({"dim": "16"}, "RopeConfig: dim='16' must be an integer"),
        ({"dim": 16, "theta": "1e4"}, "RopeConfig: theta='1e4' must be a finite number"),
        ({"dim": 16, "kind": "llama3", "factor": -1.0}, "RopeConfig: factor=-1.0 must be > 0 with llama3 scaling"),
        ({"dim": 16, "kind": "yarn", "beta_fast": 0.0}, "RopeConfig: beta_fast=0.0 must be > 0 with yarn scaling"),
        ({"dim": 16, "interleaved": "no"}, "RopeConfig: interleaved='no' must be True or False"),
    ],
    ids=["dim_str", "theta_str", "llama3_negative_factor", "yarn_zero_beta", "interleaved_str"],
)
def test_a_rope_config_built_in_python_is_checked_like_one_from_config_json(kw, says):
    """RopeConfig(dim="16") was a TypeError about string formatting, theta="1e4" about real numbers, and llama3 /
    yarn with factor=-1 or beta_fast=0 built and ran (negative or NaN frequencies); from_hf checked only its own."""
    with pytest.raises(ValueError, match=re.escape(says)):
        RopeConfig(**kw)
    assert RopeConfig(dim=16, kind="llama3", factor=8.0).factor == 8.0  # (a sound one still builds)
