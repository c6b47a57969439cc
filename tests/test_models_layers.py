"""Shared layers against plain NumPy references: GQA attention with a cached prefix, MoE routing, RoPE."""

from __future__ import annotations

import math
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.layers.attention import GQAAttention
from models.layers.moe import DeepseekMoE
from models.layers.rope import RopeConfig, apply_rope, inv_freq, softmax_scale_factor
from models.meta import PrefillMeta


def np_rope(x: np.ndarray, pos: np.ndarray, theta: float) -> np.ndarray:
    """x [T, H, D] at positions [T]: HF rotate_half RoPE, float64."""
    d = x.shape[-1]
    freq = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = pos[:, None, None] * freq  # [T, 1, D/2]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def test_gqa_prefill_matches_numpy_attention():
    hidden, hq, hkv, d = 32, 4, 2, 8
    rope = RopeConfig(dim=d, theta=10000.0)
    attn = GQAAttention(hidden, hq, hkv, d, True, rope, jnp.float32, nnx.Rngs(0))
    rng = np.random.default_rng(0)
    cached_lens, miss_lens = np.array([5, 0, 3]), np.array([4, 6, 1])
    b, c, t = 3, 8, 8
    kv_cached = rng.standard_normal((b, c, 2, hkv, d)).astype(np.float32)
    x = rng.standard_normal((b, t, hidden)).astype(np.float32)
    kv_new, out = nnx.jit(lambda a, *args: a.prefill(*args))(
        attn, jnp.asarray(kv_cached), jnp.asarray(x), PrefillMeta(jnp.asarray(cached_lens), jnp.asarray(miss_lens))
    )
    kv_new, out = np.asarray(kv_new), np.asarray(out)

    w = {n: np.asarray(getattr(attn, n).kernel[...], np.float64) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    bias = {n: np.asarray(getattr(attn, n).bias[...], np.float64) for n in ("q_proj", "k_proj", "v_proj")}
    for i in range(b):
        m, cl = miss_lens[i], cached_lens[i]
        xi = x[i, :m].astype(np.float64)
        pos = cl + np.arange(m)
        q = np_rope((xi @ w["q_proj"] + bias["q_proj"]).reshape(m, hq, d), pos, 10000.0)
        k = np_rope((xi @ w["k_proj"] + bias["k_proj"]).reshape(m, hkv, d), pos, 10000.0)
        v = (xi @ w["v_proj"] + bias["v_proj"]).reshape(m, hkv, d)
        np.testing.assert_allclose(kv_new[i, :m, 0], k, atol=1e-5)
        np.testing.assert_allclose(kv_new[i, :m, 1], v, atol=1e-5)
        keys = np.concatenate([kv_cached[i, :cl, 0], k])  # [S, Hkv, D]
        vals = np.concatenate([kv_cached[i, :cl, 1], v])
        o = np.zeros((m, hq, d))
        for h in range(hq):
            kh = h // (hq // hkv)
            s = q[:, h] @ keys[:, kh].T / math.sqrt(d)  # [m, S]
            s = np.where(np.arange(cl + m)[None] <= (cl + np.arange(m))[:, None], s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            o[:, h] = (p / p.sum(-1, keepdims=True)) @ vals[:, kh]
        np.testing.assert_allclose(out[i, :m], o.reshape(m, hq * d) @ w["o_proj"], atol=1e-5)
    assert np.isfinite(out).all()  # padding rows (fully masked) stay finite


def np_moe(moe: DeepseekMoE, x: np.ndarray) -> np.ndarray:
    """Token-by-token HF DeepSeek routing and expert sum, float64."""
    gate = np.asarray(moe.gate_weight[...], np.float64)
    wg, wu, wd = (np.asarray(getattr(moe, n)[...], np.float64) for n in ("w_gate", "w_up", "w_down"))

    def silu(z):
        return z / (1 + np.exp(-z))

    out = np.zeros_like(x, dtype=np.float64)
    for n, xn in enumerate(x.astype(np.float64)):
        logits = gate @ xn
        scores = (
            np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            if moe.scoring_func == "softmax"
            else 1 / (1 + np.exp(-logits))
        )
        choice = scores.copy()
        if moe.topk_method == "noaux_tc":
            choice = choice + np.asarray(moe.e_score_correction_bias[...], np.float64)
        if moe.topk_method != "greedy":
            groups = choice.reshape(moe.n_group, -1)
            gs = np.sort(groups, -1)[:, -2:].sum(-1) if moe.topk_method == "noaux_tc" else groups.max(-1)
            keep = np.argsort(-gs)[: moe.topk_group]
            mask = np.zeros(moe.n_group, bool)
            mask[keep] = True
            choice = np.where(np.repeat(mask, moe.num_experts // moe.n_group), choice, 0.0)
        idx = np.argsort(-choice)[: moe.top_k]
        wts = scores[idx]
        if moe.top_k > 1 and moe.norm_topk_prob:
            wts = wts / (wts.sum() + 1e-20) * (moe.routed_scaling_factor if moe.always_scale else 1.0)
        else:
            wts = wts * moe.routed_scaling_factor
        for e, we in zip(idx, wts, strict=False):
            out[n] += we * ((silu(xn @ wg[e]) * (xn @ wu[e])) @ wd[e])
    if moe.shared_experts is not None:
        out += np.asarray(nnx.jit(lambda m, z: m(z))(moe.shared_experts, jnp.asarray(x)), np.float64)
    return out


@pytest.mark.parametrize(
    "scoring,method,groups,norm,v3",
    [
        ("softmax", "greedy", 1, False, False),
        ("softmax", "group_limited_greedy", 2, True, False),
        ("sigmoid", "noaux_tc", 4, True, True),
    ],
)
def test_moe_matches_token_loop_reference(scoring, method, groups, norm, v3):
    """Both dispatches (dense, ragged grouped GEMM) against the token-by-token reference."""
    moe = DeepseekMoE(
        16, 12, 8, 3, 1, scoring, method, groups, max(groups // 2, 1), norm, 2.5, v3, jnp.float32, nnx.Rngs(1)
    )
    if method == "noaux_tc":
        moe.e_score_correction_bias[...] = jnp.asarray(np.random.default_rng(2).standard_normal(8) * 0.1, jnp.float32)
    x = np.random.default_rng(3).standard_normal((2, 7, 16)).astype(np.float32)
    ref = np_moe(moe, x.reshape(14, 16))
    for dispatch in ("dense", "ragged"):
        moe.dispatch = dispatch
        got = np.asarray(nnx.jit(lambda m, z: m(z))(moe, jnp.asarray(x))).reshape(14, 16)
        np.testing.assert_allclose(got, ref, atol=1e-4, err_msg=dispatch)


def test_rope_scaling_variants():
    base = RopeConfig(dim=64, theta=500000.0)
    llama3 = RopeConfig(dim=64, theta=500000.0, kind="llama3", factor=8.0, original_max_position_embeddings=8192)
    f0, f3 = inv_freq(base), inv_freq(llama3)
    assert f3[0] == f0[0]  # short wavelengths untouched
    assert np.isclose(f3[-1], f0[-1] / 8.0)  # long wavelengths divided by the factor
    assert np.all(f3 <= f0 + 1e-12) and np.all(np.diff(f3) <= 0)
    yarn = RopeConfig(
        dim=64,
        theta=10000.0,
        kind="yarn",
        factor=40.0,
        original_max_position_embeddings=4096,
        mscale=1.0,
        mscale_all_dim=1.0,
    )
    fy, fd = inv_freq(yarn), inv_freq(RopeConfig(dim=64, theta=10000.0))
    assert np.isclose(fy[0], fd[0]) and np.isclose(fy[-1], fd[-1] / 40.0)
    assert math.isclose(softmax_scale_factor(yarn), (0.1 * math.log(40.0) + 1) ** 2)
    # Rotation keeps norms; interleaved = de-interleave then rotate_half (HF DeepSeek).
    x = np.random.default_rng(0).standard_normal((1, 5, 2, 8)).astype(np.float32)
    pos = jnp.arange(5)[None]
    r = np.asarray(apply_rope(jnp.asarray(x), pos, RopeConfig(dim=8)))
    np.testing.assert_allclose(np.linalg.norm(r, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(r[0], np_rope(x[0], np.arange(5), 10000.0), atol=1e-5)
    ri = np.asarray(apply_rope(jnp.asarray(x), pos, RopeConfig(dim=8, interleaved=True)))
    deint = np.concatenate([x[..., 0::2], x[..., 1::2]], -1)
    np.testing.assert_allclose(ri[0], np_rope(deint[0], np.arange(5), 10000.0), atol=1e-5)
    with pytest.raises(ValueError, match="rope_scaling type 'dynamic'"):
        RopeConfig.from_hf(8, 10000.0, {"type": "dynamic", "factor": 2.0})
    # a key no variant here reads was dropped silently (HF's yarn attention_factor replaces the mscale)
    with pytest.raises(ValueError, match=r"rope_scaling field\(s\) \['attention_factor'\] are not supported"):
        RopeConfig.from_hf(8, 10000.0, {"rope_type": "yarn", "factor": 4.0, "attention_factor": 1.2})
    with pytest.raises(ValueError, match="rope_scaling must be an object"):
        RopeConfig.from_hf(8, 10000.0, ["yarn"])


def test_prefill_flops_match_param_count():
    """One token, no cache: FLOPs = 2 x (matmul weights used) + attention over itself + the LM head."""
    from models.checkpoint import abstract_params
    from models.deepseek import tiny_deepseek
    from models.flops import prefill_flops
    from models.qwen2 import tiny_qwen2

    cfg = tiny_qwen2()
    p = abstract_params(cfg)
    kernels = sum(
        math.prod(leaf.shape) for layer in p["layers"].values() for leaf in _leaves(layer) if len(leaf.shape) == 2
    )
    attn = cfg.num_layers * 2 * 2 * cfg.num_attention_heads * cfg.head_dim
    assert prefill_flops(cfg, 1, 0) == 2 * kernels + attn + 2 * cfg.hidden_size * cfg.vocab_size
    # Attention grows linearly with the cached prefix; weights do not.
    assert prefill_flops(cfg, 1, 100) - prefill_flops(cfg, 1, 0) == 100 * attn

    ds = tiny_deepseek()
    p = abstract_params(ds)
    used = 0
    for layer in p["layers"].values():
        for path, leaf in _items(layer):
            n = math.prod(leaf.shape)
            if path[-1] in ("w_gate", "w_up", "w_down"):  # only k routed experts of E are used per token
                used += n * ds.num_experts_per_tok // ds.n_routed_experts
            elif path[-1] == "gate_weight" or (len(leaf.shape) == 2 and path[-1] == "kernel"):
                used += n
    h, hq = ds.hidden_size, ds.num_attention_heads
    attn = ds.num_layers * 2 * hq * (ds.qk_nope_head_dim + ds.qk_rope_head_dim + ds.v_head_dim)
    assert prefill_flops(ds, 1, 0) == 2 * used + attn + 2 * h * ds.vocab_size


def _items(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _items(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _leaves(tree):
    return [leaf for _, leaf in _items(tree)]


def test_mla_prefill_absorbed_equals_expanded():
    """Both MLA prefill forms give the same KV and outputs over a cached prefix (and the auto choice flips)."""
    from models.layers.attention import MLAAttention

    rope = RopeConfig(dim=8, theta=10000.0, interleaved=True)
    attn = MLAAttention(32, 4, 16, 32, 16, 8, 16, 1e-6, False, rope, jnp.float32, nnx.Rngs(0))
    rng = np.random.default_rng(0)
    kv_cached = jnp.asarray(rng.standard_normal((2, 48, 40)).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((2, 8, 32)).astype(np.float32))
    meta = PrefillMeta(jnp.asarray([48, 0], jnp.int32), jnp.asarray([8, 5], jnp.int32))
    run = nnx.jit(lambda a, *args: a.prefill(*args))
    outs = {}
    for mode in ("expanded", "absorbed"):
        attn.prefill_mode = mode
        outs[mode] = [np.asarray(o) for o in run(attn, kv_cached, x, meta)]
    np.testing.assert_array_equal(outs["expanded"][0], outs["absorbed"][0])  # KV does not depend on the form
    np.testing.assert_allclose(outs["expanded"][1], outs["absorbed"][1], atol=1e-5)
    attn.prefill_mode = "auto"
    assert attn.absorb_pays(8, 8 + 4096) and not attn.absorb_pays(512, 512)


def test_config_values_that_failed_deep_in_jax_are_named():
    """Config values these models cannot run used to fail at the first trace inside JAX (lax.top_k's "k argument
    ... must be no larger", a broadcast in apply_rope) or, for dtype="float64", to run in float32 under a KV
    layout of 8-byte records. They are errors naming the field when the config or model is built."""
    from models.deepseek import tiny_deepseek
    from models.qwen2 import tiny_qwen2
    from models.registry import build_model

    for dtype, says in (
        ("float64", "dtype='float64' needs jax_enable_x64"),
        ("int8", "dtype='int8' is not supported"),
        ("bf16", "dtype='bf16' is not supported (float32, bfloat16, float16)"),
    ):
        with pytest.raises(ValueError, match=re.escape(says)):
            tiny_qwen2(dtype=dtype)
    assert tiny_qwen2(dtype="float16").kv_layout.np_dtype == np.float16
    # (abstract builds: the checks run in __init__; eagerly, every weight init compiled op by op: ~4 s)
    for cfg, says in (
        (tiny_qwen2(head_dim=32), "rope dim 16 != head_dim 32"),
        (tiny_deepseek(qk_rope_head_dim=16), "rope dim 8 != qk_rope_head_dim 16"),
        (tiny_deepseek(num_experts_per_tok=9), "num_experts_per_tok=9 must be in [1, n_routed_experts=8]"),
        (tiny_deepseek(num_experts_per_tok=0), "num_experts_per_tok=0 must be in [1, n_routed_experts=8]"),
        (tiny_deepseek(topk_group=5), "topk_group=5 must be in [1, n_group=4] for topk_method='noaux_tc'"),
        (tiny_deepseek(n_group=8, topk_group=2), "n_routed_experts=8 / n_group=8 leaves fewer than 2 per group"),
    ):
        with pytest.raises(ValueError, match=re.escape(says)):
            nnx.eval_shape(lambda cfg=cfg: build_model(cfg))
    # Greedy routing ignores the groups (topk_group > n_group is harmless there), and group-limited routing with
    # one expert per group is fine (group score = max).
    nnx.eval_shape(
        lambda: build_model(tiny_deepseek(topk_method="greedy", scoring_func="softmax", n_group=1, topk_group=3))
    )
    nnx.eval_shape(
        lambda: build_model(
            tiny_deepseek(topk_method="group_limited_greedy", scoring_func="softmax", n_group=8, topk_group=2)
        )
    )
