"""MoE + MLA family: DeepSeek-V2 / V3 style.

HF architectures: ``DeepseekV2ForCausalLM``, ``DeepseekV3ForCausalLM``. Layers ``< first_k_dense_replace``
(and those off ``moe_layer_freq``) use a dense SwiGLU MLP, the rest ``DeepseekV3MoE`` (routed top-k +
shared experts). Attention is MLA with the compressed latent cache: KV record per token per layer
``(kv_lora_rank + qk_rope_head_dim,)`` (see models/kv.py). RoPE is YaRN-scaled when ``rope_scaling`` says
so, interleaved like HF DeepSeek (halves instead for a V3 config.json with ``rope_interleave: false``).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from models.causal_lm import CausalLM, PreNormDecoderLayer
from models.config import ModelConfig, check_hf_unsupported, hf_bool, hf_field, hf_float, hf_int, hf_rope
from models.layers.attention import MLAAttention
from models.layers.mlp import SwiGLUMLP
from models.layers.moe import DeepseekMoE
from models.layers.rmsnorm import RMSNorm
from models.layers.rope import RopeConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeepseekConfig(ModelConfig):
    num_attention_heads: int
    intermediate_size: int  # dense layers
    moe_intermediate_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    first_k_dense_replace: int
    moe_layer_freq: int = 1
    routed_scaling_factor: float = 1.0
    scoring_func: str = "softmax"  # V2 softmax, V3 sigmoid
    topk_method: str = "greedy"  # greedy | group_limited_greedy | noaux_tc
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    q_lora_rank: int | None = None  # None: a plain q_proj (V2-Lite)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    attention_bias: bool = False
    rope: RopeConfig
    moe_dispatch: str = "dense"  # "dense" | "ragged" (models/layers/moe.py); not part of the KV format
    mla_prefill: str = "auto"  # "auto" | "expanded" | "absorbed" (models/layers/attention.py); idem

    _SIZES = (
        *ModelConfig._SIZES,
        *("num_attention_heads", "intermediate_size", "moe_intermediate_size", "moe_layer_freq"),
        *("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"),
    )
    _COUNTS = ("n_routed_experts", "n_shared_experts", "first_k_dense_replace")

    def __post_init__(self):
        super().__post_init__()
        if self.q_lora_rank is not None and (
            isinstance(self.q_lora_rank, bool) or not isinstance(self.q_lora_rank, int) or self.q_lora_rank < 1
        ):
            raise ValueError(f"DeepseekConfig: q_lora_rank={self.q_lora_rank!r} must be None or an integer >= 1")
        # Batch-invariant execution prefills with decode's absorbed form and needs per-token expert sums
        # whose order does not depend on the other tokens (the ragged dispatch's scatter-add does).
        if self.batch_invariant and (self.moe_dispatch != "dense" or self.mla_prefill == "expanded"):
            raise ValueError(
                f"batch_invariant=True needs moe_dispatch='dense' and mla_prefill 'auto' or 'absorbed', got "
                f"moe_dispatch={self.moe_dispatch!r}, mla_prefill={self.mla_prefill!r}"
            )

    def _kv_record(self):
        return "mla", (self.kv_lora_rank + self.qk_rope_head_dim,)

    @property
    def is_v3(self) -> bool:
        return self.architecture == "DeepseekV3ForCausalLM"

    def is_moe_layer(self, i: int) -> bool:
        return self.n_routed_experts > 0 and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    @classmethod
    def from_hf(cls, d: dict, dtype: str = "float32") -> DeepseekConfig:
        arch = (d.get("architectures") or [None])[0]
        if arch not in ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"):
            raise ValueError(f"config.json: architectures={d.get('architectures')!r} is not a DeepSeek-V2/V3 model")
        check_hf_unsupported(d)
        v3 = arch == "DeepseekV3ForCausalLM"
        # Fields a config.json leaves out take the defaults of HF's config class for the architecture: V3's
        # (DeepSeek's remote code and transformers' DeepseekV3Config agree) route 8 of 256 experts in 4 of 8
        # groups, renormalised and scaled by 2.5, after 3 dense layers; V2's route nothing by default. An explicit
        # null is None in HF (no routed / shared experts, no renormalisation), as before.

        def dv3(key, v3_default, v2_default):
            return v3_default if v3 and key not in d else v2_default

        rope_dim = hf_field(d, "qk_rope_head_dim")
        topk_method = d.get("topk_method", dv3("topk_method", "noaux_tc", "greedy"))
        n_group = hf_int(d, "n_group", dv3("n_group", 8, 0))
        topk_group = hf_int(d, "topk_group", dv3("topk_group", 4, 0))
        n_routed = hf_int(d, "n_routed_experts", dv3("n_routed_experts", 256, 0))
        if n_routed and topk_method in ("group_limited_greedy", "noaux_tc"):
            # grouped routing needs both counts: HF's model views the scores as [tokens, n_group, -1] and keeps
            # topk_group groups, so an absent / null / 0 count fails there (it was read here as 1 group kept)
            for key, value in (("n_group", n_group), ("topk_group", topk_group)):
                if not value:
                    raise ValueError(
                        f"config.json: topk_method={topk_method!r} routes within expert groups but {key}={value!r}"
                        f"{' (absent)' if key not in d else ''}: give the number of groups"
                    )
        top_k = hf_int(d, "num_experts_per_tok", dv3("num_experts_per_tok", 8, 0))
        if n_routed and not top_k:
            # HF's DeepseekV2Config defaults it to None, which its router cannot use: top-1 was taken here, silently
            raise ValueError(
                f"config.json: n_routed_experts={n_routed} but num_experts_per_tok={d.get('num_experts_per_tok')!r}"
                f"{' (absent)' if 'num_experts_per_tok' not in d else ''}: give how many experts each token is routed to"
            )
        return cls(
            architecture=arch,
            vocab_size=hf_field(d, "vocab_size"),
            hidden_size=hf_field(d, "hidden_size"),
            num_layers=hf_field(d, "num_hidden_layers"),
            rms_norm_eps=hf_float(d, "rms_norm_eps", 1e-6, above=0),
            tie_word_embeddings=hf_bool(d, "tie_word_embeddings"),
            dtype=dtype,
            # absent: HF's default (DeepseekV3Config 4096, DeepseekV2Config 2048), as for the routing fields
            max_position_embeddings=hf_int(d, "max_position_embeddings", 4096 if v3 else 2048, low=1),
            num_attention_heads=hf_field(d, "num_attention_heads"),
            intermediate_size=hf_field(d, "intermediate_size"),
            moe_intermediate_size=hf_field(d, "moe_intermediate_size"),
            n_routed_experts=n_routed,
            num_experts_per_tok=top_k or 1,  # (not read without routed experts)
            n_shared_experts=hf_int(d, "n_shared_experts", dv3("n_shared_experts", 1, 0)),
            first_k_dense_replace=hf_int(d, "first_k_dense_replace", dv3("first_k_dense_replace", 3, 0)),
            moe_layer_freq=hf_int(d, "moe_layer_freq", 1, low=1),
            routed_scaling_factor=hf_float(d, "routed_scaling_factor", dv3("routed_scaling_factor", 2.5, 1.0)),
            scoring_func=d.get("scoring_func", dv3("scoring_func", "sigmoid", "softmax")),
            topk_method=topk_method,
            n_group=n_group or 1,
            topk_group=topk_group or 1,
            norm_topk_prob=hf_bool(d, "norm_topk_prob", dv3("norm_topk_prob", True, False)),
            # absent: HF's default for both V2 and V3, 1536 (it was None: a plain q_proj, then "missing tensor
            # q_proj" for a checkpoint with q_a_proj / q_b_proj); null: a plain q_proj (V2-Lite), as in HF
            q_lora_rank=1536 if "q_lora_rank" not in d else hf_int(d, "q_lora_rank", None, low=1),
            kv_lora_rank=hf_field(d, "kv_lora_rank"),
            qk_nope_head_dim=hf_field(d, "qk_nope_head_dim"),
            qk_rope_head_dim=rope_dim,
            v_head_dim=hf_field(d, "v_head_dim"),
            attention_bias=hf_bool(d, "attention_bias"),
            rope=RopeConfig.from_hf(
                rope_dim,
                *hf_rope(d),
                # transformers' DeepseekV3 rotates the two halves when rope_interleave is false (it was ignored)
                interleaved=hf_bool(d, "rope_interleave", True) if v3 else True,
            ),
        )


class DeepseekV3MoE(DeepseekMoE):
    def __init__(self, cfg: DeepseekConfig, rngs: nnx.Rngs):
        super().__init__(
            cfg.hidden_size,
            cfg.moe_intermediate_size,
            cfg.n_routed_experts,
            cfg.num_experts_per_tok,
            cfg.n_shared_experts,
            cfg.scoring_func,
            cfg.topk_method,
            cfg.n_group,
            cfg.topk_group,
            cfg.norm_topk_prob,
            cfg.routed_scaling_factor,
            cfg.is_v3,
            jnp.dtype(cfg.dtype),
            rngs,
            dispatch=cfg.moe_dispatch,
        )


class DeepseekV3DecoderLayer(PreNormDecoderLayer):
    """MLA + (dense MLP | MoE). Two layer kinds -> two step executables, each shared by its layers."""

    def __init__(self, cfg: DeepseekConfig, moe: bool, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = MLAAttention(
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.q_lora_rank,
            cfg.kv_lora_rank,
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
            # HF builds q_a_layernorm / kv_a_layernorm as DeepseekV3RMSNorm(rank): its default eps 1e-6, not
            # config.rms_norm_eps (only the input, post-attention and final norms read that)
            1e-6,
            cfg.attention_bias,
            cfg.rope,
            dtype,
            rngs,
            prefill_mode=cfg.mla_prefill,
        )
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = DeepseekV3MoE(cfg, rngs) if moe else SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size, dtype, rngs)


class DeepseekV3ForCausalLM(CausalLM):
    def __init__(self, cfg: DeepseekConfig, rngs: nnx.Rngs):
        super().__init__(cfg, lambda c, i, r: DeepseekV3DecoderLayer(c, c.is_moe_layer(i), r), rngs)


DeepseekV2ForCausalLM = DeepseekV3ForCausalLM  # one graph; V2/V3 differ in config (routing, scaling)


def hf_tensor_map(cfg: DeepseekConfig) -> dict[tuple, tuple]:
    """NNX param path -> (HF tensor name(s), transform); "T" transposes a Linear weight, "stackT" stacks
    per-expert Linear weights [out, in] into [E, in, out]."""
    m: dict[tuple, tuple] = {("embed_tokens", "embedding"): ("model.embed_tokens.weight", "")}
    for i in range(cfg.num_layers):
        p, h = ("layers", i), f"model.layers.{i}."
        m[p + ("input_layernorm", "weight")] = (h + "input_layernorm.weight", "")
        m[p + ("post_attention_layernorm", "weight")] = (
            h + "post_attention_layernorm.weight",
            "",
        )
        a, ha = p + ("self_attn",), h + "self_attn."
        projs = ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
        projs += ["q_proj"] if cfg.q_lora_rank is None else ["q_a_proj", "q_b_proj"]
        for proj in projs:
            m[a + (proj, "kernel")] = (ha + f"{proj}.weight", "T")
            if cfg.attention_bias and proj in (
                "q_a_proj",
                "kv_a_proj_with_mqa",
                "o_proj",
            ):
                m[a + (proj, "bias")] = (ha + f"{proj}.bias", "")
        m[a + ("kv_a_layernorm", "weight")] = (ha + "kv_a_layernorm.weight", "")
        if cfg.q_lora_rank is not None:
            m[a + ("q_a_layernorm", "weight")] = (ha + "q_a_layernorm.weight", "")
        mp, hm = p + ("mlp",), h + "mlp."
        if cfg.is_moe_layer(i):
            m[mp + ("gate_weight",)] = (hm + "gate.weight", "")
            if cfg.topk_method == "noaux_tc":
                m[mp + ("e_score_correction_bias",)] = (
                    hm + "gate.e_score_correction_bias",
                    "",
                )
            for ours, proj in (
                ("w_gate", "gate_proj"),
                ("w_up", "up_proj"),
                ("w_down", "down_proj"),
            ):
                names = [hm + f"experts.{e}.{proj}.weight" for e in range(cfg.n_routed_experts)]
                m[mp + (ours,)] = (names, "stackT")
            if cfg.n_shared_experts:
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    m[mp + ("shared_experts", proj, "kernel")] = (
                        hm + f"shared_experts.{proj}.weight",
                        "T",
                    )
        else:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                m[mp + (proj, "kernel")] = (hm + f"{proj}.weight", "T")
    m[("final", "norm", "weight")] = ("model.norm.weight", "")
    if not cfg.tie_word_embeddings:
        m[("final", "lm_head", "kernel")] = ("lm_head.weight", "T")
    return m


def tiny_deepseek(**overrides) -> DeepseekConfig:
    """A tiny DeepSeek-V3 (MLA with q_lora, sigmoid noaux_tc group routing, YaRN, 1 dense + 2 MoE layers)."""
    kw = {
        "architecture": "DeepseekV3ForCausalLM",
        "vocab_size": 128,
        "hidden_size": 64,
        "num_layers": 3,
        "rms_norm_eps": 1e-6,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "n_group": 4,
        "topk_group": 2,
        "norm_topk_prob": True,
        "q_lora_rank": 32,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "rope": RopeConfig(
            dim=8,
            theta=10000.0,
            kind="yarn",
            factor=4.0,
            original_max_position_embeddings=64,
            beta_fast=32.0,
            beta_slow=1.0,
            mscale=1.0,
            mscale_all_dim=1.0,
            interleaved=True,
        ),
    }
    kw.update(overrides)
    return DeepseekConfig(**kw)


def tiny_deepseek_v2(**overrides) -> DeepseekConfig:
    """A tiny DeepSeek-V2-Lite style model (plain q_proj, softmax greedy routing, default RoPE)."""
    kw = {
        "architecture": "DeepseekV2ForCausalLM",
        "vocab_size": 128,
        "hidden_size": 64,
        "num_layers": 3,
        "rms_norm_eps": 1e-6,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "n_shared_experts": 2,
        "first_k_dense_replace": 1,
        "routed_scaling_factor": 1.0,
        "scoring_func": "softmax",
        "topk_method": "greedy",
        "norm_topk_prob": False,
        "q_lora_rank": None,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "rope": RopeConfig(dim=8, theta=10000.0, interleaved=True),
    }
    kw.update(overrides)
    return DeepseekConfig(**kw)
