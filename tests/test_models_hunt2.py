"""Models hunt 2 (2026-12-03): DeepSeek config semantics, HF import and fingerprints, against HF's definitions."""

from __future__ import annotations

import copy

import numpy as np

from models.registry import config_from_hf
from models.runner import ModelRunner

DEEPSEEK_V3_HF = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "vocab_size": 96,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "moe_intermediate_size": 16,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "n_group": 2,
    "topk_group": 1,
    "norm_topk_prob": True,
    "q_lora_rank": 24,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4,
    "v_head_dim": 8,
    "rope_theta": 10000.0,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale_all_dim": 1.0},
}


def test_deepseek_v3_rope_interleave_false_rotates_halves():
    """transformers' DeepseekV3 applies RoPE to the two halves of q_pe / k_pe when config.json says
    `rope_interleave: false` (pairs (x0, x1), (x2, x3).. when true, the default). The flag was ignored: such a
    model loaded with interleaved RoPE, the same config and fingerprint as the default, and other logits.

    Reference: interleaved RoPE first de-interleaves, so the half-layout model equals the interleaved one whose rope
    columns of q_b_proj and kv_a_proj_with_mqa are taken in de-interleaved order."""
    c_int = config_from_hf(DEEPSEEK_V3_HF)
    c_half = config_from_hf(dict(DEEPSEEK_V3_HF, rope_interleave=False))
    assert c_int.rope.interleaved and not c_half.rope.interleaved, "rope_interleave=false was ignored"
    assert c_int.fingerprint() != c_half.fingerprint()
    ref = ModelRunner(c_int, seed=3)
    p = ref.pure_params()
    half = copy.deepcopy(p)
    nope, dr, heads = c_int.qk_nope_head_dim, c_int.qk_rope_head_dim, c_int.num_attention_heads
    deint = np.r_[0:dr:2, 1:dr:2]  # HF's view(d/2, 2).transpose: [x0, x2, .., x1, x3, ..]
    for i in range(c_int.num_layers):
        a, h = p["layers"][i]["self_attn"], half["layers"][i]["self_attn"]
        q = np.asarray(a["q_b_proj"]["kernel"]).reshape(-1, heads, nope + dr)
        q = np.concatenate([q[..., :nope], q[..., nope:][..., deint]], -1)
        h["q_b_proj"]["kernel"] = q.reshape(q.shape[0], -1)
        kv = np.asarray(a["kv_a_proj_with_mqa"]["kernel"])
        r = c_int.kv_lora_rank
        h["kv_a_proj_with_mqa"]["kernel"] = np.concatenate([kv[:, :r], kv[:, r:][:, deint]], -1)
    ids = np.random.default_rng(0).integers(0, c_int.vocab_size, 24)
    want_logits, want_kv = ref.full_prefill([ids])
    got_logits, got_kv = ModelRunner(c_half, half).full_prefill([ids])
    np.testing.assert_allclose(got_logits[0], want_logits[0], atol=1e-4)
    np.testing.assert_allclose(got_kv[0], want_kv[0], atol=1e-5)  # k_pe cached in the half layout either way
    # V2 configs never read the flag (transformers' DeepseekV2 has none)
    v2 = dict(DEEPSEEK_V3_HF, architectures=["DeepseekV2ForCausalLM"], rope_interleave=False)
    assert config_from_hf(v2).rope.interleaved


def test_equal_configs_have_equal_fingerprints_whether_numbers_are_ints_or_floats():
    """DeepSeek-V3's config.json writes `"factor": 40, "beta_fast": 32`; a config built in Python says 40.0. The
    configs compared equal (==) but the fingerprints differed (json.dumps: 40 vs 40.0), and the fingerprint is the
    root of every KV block key: blocks stored under one were misses for the other."""
    from models.deepseek import tiny_deepseek
    from models.qwen2 import tiny_qwen2

    ints = dict(DEEPSEEK_V3_HF, rope_theta=10000, routed_scaling_factor=2)
    ints["rope_scaling"] = dict(DEEPSEEK_V3_HF["rope_scaling"], factor=4, mscale_all_dim=1, beta_fast=32)
    floats = dict(DEEPSEEK_V3_HF, routed_scaling_factor=2.0)
    floats["rope_scaling"] = dict(DEEPSEEK_V3_HF["rope_scaling"], beta_fast=32.0)
    a, b = config_from_hf(ints), config_from_hf(floats)
    assert a == b
    assert a.fingerprint() == b.fingerprint()
    assert (
        tiny_deepseek(routed_scaling_factor=2).fingerprint() == tiny_deepseek(routed_scaling_factor=2.0).fingerprint()
    )
    assert tiny_qwen2(rms_norm_eps=1).fingerprint() == tiny_qwen2(rms_norm_eps=1.0).fingerprint()
    # a value that does change the numbers still changes the fingerprint
    assert (
        tiny_deepseek(routed_scaling_factor=2).fingerprint() != tiny_deepseek(routed_scaling_factor=2.5).fingerprint()
    )


def test_mla_latent_norms_use_hf_default_eps_not_rms_norm_eps():
    """HF DeepSeek-V2/V3 build `q_a_layernorm` and `kv_a_layernorm` as `DeepseekV3RMSNorm(rank)`, with the
    class's default eps 1e-6; only the input, post-attention and final norms read `config.rms_norm_eps`. Both
    latent norms used rms_norm_eps, so a config with another eps got other KV records and logits (rms_norm_eps 0.5:
    logits off by 3.6 from HF's equations)."""
    from flax import nnx

    from models.deepseek import tiny_deepseek
    from models.registry import build_model

    cfg = tiny_deepseek(num_layers=1, rms_norm_eps=0.5)
    runner = ModelRunner(cfg, seed=1)
    p = runner.pure_params()
    ids = np.arange(12)
    _, kv = runner.full_prefill([ids])
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731

    def rms(x, w, eps):
        return f(w) * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)

    a = p["layers"][0]["self_attn"]
    x = rms(f(p["embed_tokens"]["embedding"])[ids], p["layers"][0]["input_layernorm"]["weight"], 0.5)
    c = x @ f(a["kv_a_proj_with_mqa"]["kernel"])[:, : cfg.kv_lora_rank]
    want = rms(c, a["kv_a_layernorm"]["weight"], 1e-6)
    np.testing.assert_allclose(kv[0][0, :, : cfg.kv_lora_rank], want, atol=1e-5)
    attn = nnx.eval_shape(lambda: build_model(cfg)).layers[0].self_attn  # (the eps are set in __init__: no weights)
    assert attn.q_a_layernorm.eps == attn.kv_a_layernorm.eps == 1e-6


def test_hf_expert_tensor_of_wrong_shape_is_named():
    """Per-expert weights are stacked into [E, in, out]: one expert tensor of another shape (a truncated or
    transposed expert) failed inside np.stack with "all input arrays must have the same shape", naming no tensor
    (the importer's contract: a wrong shape raises ValueError naming the tensor)."""
    import pytest

    from models.checkpoint import abstract_params, hf_tensors_to_params
    from models.registry import family

    cfg = config_from_hf(DEEPSEEK_V3_HF)
    expected = abstract_params(cfg)
    tensors = {}
    for path, (names, transform) in family(cfg).hf_tensor_map(cfg).items():
        want = expected
        for k in path:
            want = want[k]
        shape = {"T": want.shape[::-1], "stackT": want.shape[1:][::-1]}.get(transform, want.shape)
        for name in names if isinstance(names, list) else [names]:
            tensors[name] = np.zeros(shape, np.float32)
    hf_tensors_to_params(cfg, tensors)
    for expert, shape in ((2, (16, 31)), (2, (32, 16)), (0, (16, 31))):
        name = f"model.layers.1.mlp.experts.{expert}.up_proj.weight"
        bad = dict(tensors, **{name: np.zeros(shape, np.float32)})
        with pytest.raises(
            ValueError, match=rf"tensor '{name}' has shape \({shape[0]}, {shape[1]}\); expected \(16, 32\)"
        ):
            hf_tensors_to_params(cfg, bad)


def test_deepseek_v3_config_without_routing_fields_takes_hf_v3_defaults():
    """A config.json that leaves fields out gets the defaults of HF's config class. For DeepSeek-V3, DeepSeek's code
    and transformers' DeepseekV3Config agree: 256 routed experts, top-8 in 4 of 8 groups, renormalised and scaled by
    2.5, 1 shared expert, 3 dense layers. Only scoring_func / topk_method took V3 defaults here; the rest took V2's
    (1 group, no renormalisation, scale 1, ...), so such a V3 model routed differently from HF, silently."""
    routing = (
        "n_routed_experts",
        "num_experts_per_tok",
        "n_shared_experts",
        "first_k_dense_replace",
        "routed_scaling_factor",
        "n_group",
        "topk_group",
        "norm_topk_prob",
        "scoring_func",
        "topk_method",
        "moe_layer_freq",
    )
    bare = {k: v for k, v in DEEPSEEK_V3_HF.items() if k not in routing}
    got = {k: getattr(config_from_hf(bare), k) for k in routing}
    assert got == {
        "n_routed_experts": 256,
        "num_experts_per_tok": 8,
        "n_shared_experts": 1,
        "first_k_dense_replace": 3,
        "routed_scaling_factor": 2.5,
        "n_group": 8,
        "topk_group": 4,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "moe_layer_freq": 1,
    }
    # An explicit null is None in HF (no shared experts, no renormalisation), not the default; V2 keeps
    # DeepseekV2Config's defaults (no routed experts, softmax, greedy)
    nulls = config_from_hf(dict(DEEPSEEK_V3_HF, norm_topk_prob=None, n_shared_experts=None))
    assert (nulls.norm_topk_prob, nulls.n_shared_experts) == (False, 0)
    v2 = config_from_hf(dict(bare, architectures=["DeepseekV2ForCausalLM"]))
    assert (v2.n_routed_experts, v2.n_group, v2.norm_topk_prob, v2.routed_scaling_factor) == (0, 1, False, 1.0)
    assert (v2.scoring_func, v2.topk_method) == ("softmax", "greedy")


def test_compilation_cache_dir_from_env_is_expanded_and_absolute(tmp_path, monkeypatch):
    """$DUALPATH_JAX_CACHE="~/xla" (an env file or a Ray runtime_env: no shell expands it) created a directory
    literally named "~" in the working directory; a relative path gave each working directory its own cache."""
    import jax

    from models.jax_cache import enable_persistent_compilation_cache

    keys = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    before = {k: getattr(jax.config, k) for k in keys}
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    try:
        monkeypatch.setenv("DUALPATH_JAX_CACHE", "~/xla")
        assert enable_persistent_compilation_cache() == str(home / "xla")
        assert (home / "xla").is_dir() and not (work / "~").exists()
        assert jax.config.jax_compilation_cache_dir == str(home / "xla")
        monkeypatch.setenv("DUALPATH_JAX_CACHE", "rel/xla")
        assert enable_persistent_compilation_cache() == str(work / "rel" / "xla")
    finally:
        for k, v in before.items():
            jax.config.update(k, v)


def test_hf_sharded_checkpoint_reads_the_shards_its_index_names(tmp_path):
    """HF reads a sharded checkpoint through model.safetensors.index.json. The importer read every *.safetensors of
    the directory: a stale shard of another revision left there (`huggingface-cli download --local-dir` keeps old
    files) failed with "appears in more than one shard", and a shard missing from an interrupted download came out
    as "missing tensor ..." naming no file."""
    import json

    import pytest

    pytest.importorskip("safetensors")
    from safetensors.numpy import load_file, save_file
    from test_models_checkpoint import QWEN2_HF, hf_tensors, write_hf_checkpoint

    from models.checkpoint import load_hf_checkpoint

    tensors = hf_tensors(QWEN2_HF, ModelRunner(config_from_hf(QWEN2_HF), seed=0).pure_params())
    write_hf_checkpoint(tmp_path, QWEN2_HF, tensors)
    weight_map = {name: f.name for f in sorted(tmp_path.glob("*.safetensors")) for name in load_file(str(f))}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    stale = {"model.norm.weight": np.full_like(tensors["model.norm.weight"], 7.0)}
    save_file(stale, str(tmp_path / "model-00001-of-00003.safetensors"))  # an older revision's shard
    _, params = load_hf_checkpoint(tmp_path)
    np.testing.assert_array_equal(params["final"]["norm"]["weight"], tensors["model.norm.weight"])
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        ValueError, match=r"shard\(s\) \['model-00002-of-00002.safetensors'\] named in model.safetensors"
    ):
        load_hf_checkpoint(tmp_path)
