"""Models hunt 4 (2026-12-03): float16 overflows that reached other tokens through a weight of exactly 0 (dense
MoE dispatch, prefill padding rows), config checks (NumPy scalars in the fingerprint, rope_scaling without a type,
sizes of configs built in Python)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.checkpoint import abstract_params
from models.layers.moe import DeepseekMoE
from models.registry import tiny_config
from models.runner import ModelRunner, PrefillRequest, random_params


def test_dense_moe_an_unchosen_expert_that_overflows_adds_nothing():
    """The dense dispatch runs every expert on every token and weights the unchosen ones by 0. In float16 an
    unchosen expert whose output overflows gave 0 x inf = NaN: the token's hidden state (and every later layer,
    logit and KV record) was NaN, where HF and the ragged dispatch never run that expert."""

    def moe(dispatch):
        m = DeepseekMoE(
            16, 32, 4, 2, 0, "softmax", "greedy", 1, 1, False, 1.0, False, jnp.float16, nnx.Rngs(0), dispatch=dispatch
        )
        # expert 3 overflows float16 on these tokens, and its gate row makes it the last choice of every token
        m.w_up[...] = m.w_up[...].at[3].multiply(3000.0)
        m.w_down[...] = m.w_down[...].at[3].multiply(3000.0)
        m.gate_weight[...] = m.gate_weight[...].at[3].set(jnp.full((16,), -10.0, jnp.float16))
        return m

    x = jnp.asarray(np.abs(np.random.default_rng(0).standard_normal((8, 16))), jnp.float16)
    # jitted like the runner (eager op-by-op dispatch compiled every primitive: ~9 s, jitted ~3 s)
    dense, ragged = nnx.jit(lambda: (moe("dense"), moe("ragged")))()
    chosen, want, got = nnx.jit(lambda d, r, x: (d.route(x)[0], r(x), d(x)))(dense, ragged, x)
    assert not bool((chosen == 3).any())  # never chosen
    want = np.asarray(want, np.float32)
    got = np.asarray(got, np.float32)
    assert np.isfinite(want).all()
    assert np.isfinite(got).all(), "an unchosen expert's float16 overflow made the token NaN"
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)


def test_equal_configs_with_numpy_scalars_have_equal_fingerprints():
    """A sweep script's `tiny_qwen2(num_layers=np.int64(4))` equals `tiny_qwen2(num_layers=4)` (==), but json.dumps
    wrote the NumPy scalar as the string "4": another fingerprint, so the KV blocks one stored (keyed by the
    fingerprint) were misses for the other. The same for np.float32 / np.bool_ fields and RopeConfig's."""
    from models.layers.rope import RopeConfig
    from models.registry import tiny_config

    base = tiny_config("tiny_deepseek")
    numpy_made = tiny_config(
        "tiny_deepseek",
        num_layers=np.int64(base.num_layers),
        routed_scaling_factor=np.float32(base.routed_scaling_factor),
        norm_topk_prob=np.bool_(base.norm_topk_prob),
        rope=RopeConfig(**{**base.rope.__dict__, "dim": np.int64(base.rope.dim), "theta": np.float64(base.rope.theta)}),
    )
    assert numpy_made == base
    assert numpy_made.fingerprint() == base.fingerprint()
    assert type(numpy_made.num_layers) is int and type(numpy_made.routed_scaling_factor) is float


def test_rope_scaling_without_a_type_is_refused_not_ignored():
    """A config.json `rope_scaling` that gives the scaling's fields but no `rope_type` / `type` (a hand-edited
    config, or one written for another loader): HF fails on it (ROPE_INIT_FUNCTIONS[None]); here it became
    unscaled RoPE with the factor ignored, and every position's angles differed from the intended scaling."""
    import pytest
    from test_models_checkpoint import LLAMA_HF

    from models.checkpoint import config_from_hf

    d = dict(LLAMA_HF, rope_scaling={k: v for k, v in LLAMA_HF["rope_scaling"].items() if k != "rope_type"})
    with pytest.raises(ValueError, match="rope_scaling .* has no 'rope_type'"):
        config_from_hf(d)
    assert config_from_hf(LLAMA_HF).rope.kind == "llama3"  # with its type, as before


def test_configs_built_in_python_check_sizes_and_eps_like_from_hf():
    """`tiny_config(name, **overrides)` (or a dataclass built by hand) skipped the checks from_hf makes of
    config.json: num_layers=0 built a runner whose first prefill failed with numpy's "Need at least one array to
    stack", num_key_value_heads=0 / kv_lora_rank=0 / moe_layer_freq=0 were bare ZeroDivisionErrors at model build,
    and rms_norm_eps=-1 ran with NaN logits and no error. Each is now a ValueError naming the field."""
    import re

    import pytest

    from models.registry import build_model, tiny_config

    for name, kw, says in (
        ("tiny_qwen2", {"num_layers": 0}, "num_layers=0 must be an integer >= 1"),
        ("tiny_qwen2", {"num_key_value_heads": 0}, "num_key_value_heads=0 must be an integer >= 1"),
        ("tiny_qwen2", {"rms_norm_eps": -1.0}, "rms_norm_eps=-1.0 must be a finite number > 0"),
        ("tiny_llama", {"vocab_size": 0}, "vocab_size=0 must be an integer >= 1"),
        ("tiny_deepseek", {"kv_lora_rank": 0}, "kv_lora_rank=0 must be an integer >= 1"),
        ("tiny_deepseek", {"moe_layer_freq": 0}, "moe_layer_freq=0 must be an integer >= 1"),
        ("tiny_deepseek", {"first_k_dense_replace": -1}, "first_k_dense_replace=-1 must be an integer >= 0"),
        ("tiny_deepseek_v2", {"q_lora_rank": 0}, "q_lora_rank=0 must be None or an integer >= 1"),
    ):
        with pytest.raises(ValueError, match=re.escape(says)):
            build_model(tiny_config(name, **kw))
    # zero counts stay valid: a DeepSeek without shared experts or without dense layers, and one without MoE
    for kw in ({"n_shared_experts": 0}, {"first_k_dense_replace": 0}, {"n_routed_experts": 0}):
        tiny_config("tiny_deepseek_v2", **kw)


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_padding_rows_never_poison_the_real_tokens_of_their_request(batch_invariant):
    """Prefill pads each request's miss tokens to the bucket with token id 0. Those rows are keys no real query
    attends to (weight exactly 0), but 0 x inf = NaN: when token 0's float16 activations overflow (here its MLP),
    a 10-token prompt that never contains token 0 came out with NaN logits (greedy token 0) and NaN KV, while the
    same prompt padded with another token gave finite logits. Both numerics modes."""
    cfg = tiny_config("tiny_llama", dtype="float16", batch_invariant=batch_invariant, num_layers=2)
    p = jax.tree.map(lambda a: np.array(a, np.float32), random_params(abstract_params(cfg), 0))
    k = 5  # a hidden coordinate only token 0 uses
    emb = p["embed_tokens"]["embedding"]
    emb[:, k], emb[0] = 0.0, 0.0
    emb[0, k] = 1.0
    for lp in p["layers"].values():
        lp["self_attn"]["o_proj"]["kernel"][:, k] = 0.0  # nothing else writes along k
        lp["mlp"]["down_proj"]["kernel"][:, k] = 0.0
        lp["mlp"]["gate_proj"]["kernel"][k, :4] = 400.0  # token 0's MLP overflows float16
        lp["mlp"]["up_proj"]["kernel"][k, :4] = 400.0
    runner = ModelRunner(cfg, jax.tree.map(lambda a: a.astype(np.float16), p), num_slots=1, capacity=16)
    seq = np.random.default_rng(0).integers(1, cfg.vocab_size, 10)  # no token 0; padded to 16 rows
    got = runner.prefill_layerwise([PrefillRequest(seq, 0)], return_kv=True)
    # reference: the same rows computed with padding of token 1 (rows < 10 do not depend on later ones)
    _, want, _ = runner.prefill_whole([PrefillRequest(np.concatenate([seq, np.ones(6, int)]), 0)], all_logits=True)
    want = np.asarray(want)[0, 9]
    assert np.isfinite(want).all()
    assert np.isfinite(got.last_logits).all(), "the padding rows' NaN reached the request's real tokens"
    assert np.isfinite(got.miss_kv[0].astype(np.float32)).all()
    assert got.next_tokens[0] == want.argmax()
    np.testing.assert_allclose(got.last_logits[0], want, atol=0.05, rtol=0.01)
