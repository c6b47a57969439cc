"""Dense GQA family: Qwen2 / Qwen2.5 (qkv bias) and Llama-3 style (no bias, llama3 RoPE scaling).

HF architectures: ``Qwen2ForCausalLM``, ``LlamaForCausalLM``. KV record per token per layer:
``(2, num_key_value_heads, head_dim)`` (see models/kv.py).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from models.causal_lm import CausalLM, PreNormDecoderLayer
from models.config import ModelConfig, check_hf_unsupported, hf_bool, hf_field, hf_float, hf_int, hf_rope
from models.layers.attention import GQAAttention
from models.layers.mlp import SwiGLUMLP
from models.layers.rmsnorm import RMSNorm
from models.layers.rope import RopeConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwen2Config(ModelConfig):
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    qkv_bias: bool  # Qwen2: True; Llama: False
    rope: RopeConfig

    _SIZES = (*ModelConfig._SIZES, "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")

    def _kv_record(self):
        return "gqa", (2, self.num_key_value_heads, self.head_dim)

    @property
    def o_proj_bias(self) -> bool:
        # HF Llama's attention_bias covers o_proj too (Qwen2's o_proj has none): it was dropped as "not used"
        return self.qkv_bias and self.architecture == "LlamaForCausalLM"

    @classmethod
    def from_hf(cls, d: dict, dtype: str = "float32") -> Qwen2Config:
        """From an HF config.json dict (Qwen2ForCausalLM or LlamaForCausalLM)."""
        arch = (d.get("architectures") or [None])[0]
        if arch not in ("Qwen2ForCausalLM", "LlamaForCausalLM"):
            raise ValueError(f"config.json: architectures={d.get('architectures')!r} is not a Qwen2/Llama model")
        if hf_bool(d, "mlp_bias"):
            raise ValueError("config.json: mlp_bias=true is not supported")
        check_hf_unsupported(d)
        hidden = hf_field(d, "hidden_size")
        heads = hf_field(d, "num_attention_heads")
        # null: derived (HF LlamaConfig); 0 was read as absent too, where HF builds heads of dim 0
        head_dim = hf_int(d, "head_dim", None, low=1) or hidden // heads
        if head_dim == 0:  # a ZeroDivisionError deep in the param init
            raise ValueError(
                f"config.json: num_attention_heads={heads} > hidden_size={hidden} and no head_dim: "
                f"head_dim = hidden_size // num_attention_heads = 0"
            )
        qwen = arch == "Qwen2ForCausalLM"
        # HF's Qwen2Config: an absent num_key_value_heads is its __init__ default, 32, and only null falls back to
        # num_attention_heads (LlamaConfig: both). Absent was the heads here for Qwen2 too: HF builds 32 KV heads.
        kv_heads = 32 if qwen and "num_key_value_heads" not in d else hf_int(d, "num_key_value_heads", heads, low=1)
        if heads % kv_heads and "num_key_value_heads" not in d:  # (a model HF cannot build either: say why)
            raise ValueError(
                f"config.json: no num_key_value_heads: HF's Qwen2Config then has 32 KV heads, which do not divide "
                f"num_attention_heads={heads}; give num_key_value_heads (null: one per attention head)"
            )
        theta, scaling = hf_rope(d)
        rope = RopeConfig.from_hf(head_dim, theta, scaling)
        if rope.kind == "yarn" and not (scaling.get("mscale") and scaling.get("mscale_all_dim")):
            # HF's yarn (Qwen2/Llama) scales cos/sin by get_mscale(factor) unless both mscale and mscale_all_dim are
            # set; DeepSeek's ratio mscale(factor, mscale) / mscale(factor, mscale_all_dim) of one alone differed
            rope = dataclasses.replace(rope, mscale=1.0, mscale_all_dim=0.0)
        return cls(
            architecture=arch,
            vocab_size=hf_field(d, "vocab_size"),
            hidden_size=hidden,
            num_layers=hf_field(d, "num_hidden_layers"),
            rms_norm_eps=hf_float(d, "rms_norm_eps", 1e-6, above=0),
            tie_word_embeddings=hf_bool(d, "tie_word_embeddings"),
            dtype=dtype,
            # absent: HF's default of the architecture's config class (Qwen2Config 32768, LlamaConfig 2048); 4096
            # here made the runtime's "past max_position_embeddings" warning fire late (Llama) or early (Qwen2)
            max_position_embeddings=hf_int(d, "max_position_embeddings", 32768 if qwen else 2048, low=1),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=hf_field(d, "intermediate_size"),
            qkv_bias=True if qwen else hf_bool(d, "attention_bias"),
            rope=rope,
        )


class Qwen2DecoderLayer(PreNormDecoderLayer):
    """Pre-norm block: x += attn(norm(x)); x += mlp(norm(x)). HF prefix ``model.layers.{i}.``."""

    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = GQAAttention(
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.qkv_bias,
            cfg.rope,
            dtype,
            rngs,
            o_bias=cfg.o_proj_bias,
        )
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size, dtype, rngs)


class Qwen2ForCausalLM(CausalLM):
    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
        super().__init__(cfg, lambda c, i, r: Qwen2DecoderLayer(c, r), rngs)


LlamaForCausalLM = Qwen2ForCausalLM  # same graph; Llama differs only in config (no bias, llama3 RoPE)


def hf_tensor_map(cfg: Qwen2Config) -> dict[tuple, tuple[str, str]]:
    """NNX param path -> (HF tensor name, transform). Transform "T": HF Linear [out, in] -> kernel [in, out]."""
    m: dict[tuple, tuple[str, str]] = {("embed_tokens", "embedding"): ("model.embed_tokens.weight", "")}
    for i in range(cfg.num_layers):
        p, h = ("layers", i), f"model.layers.{i}."
        m[p + ("input_layernorm", "weight")] = (h + "input_layernorm.weight", "")
        m[p + ("post_attention_layernorm", "weight")] = (
            h + "post_attention_layernorm.weight",
            "",
        )
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            m[p + ("self_attn", proj, "kernel")] = (h + f"self_attn.{proj}.weight", "T")
            if cfg.o_proj_bias if proj == "o_proj" else cfg.qkv_bias:
                m[p + ("self_attn", proj, "bias")] = (h + f"self_attn.{proj}.bias", "")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            m[p + ("mlp", proj, "kernel")] = (h + f"mlp.{proj}.weight", "T")
    m[("final", "norm", "weight")] = ("model.norm.weight", "")
    if not cfg.tie_word_embeddings:
        m[("final", "lm_head", "kernel")] = ("lm_head.weight", "T")
    return m


def tiny_qwen2(**overrides) -> Qwen2Config:
    """A tiny Qwen2 (qkv bias, GQA 4q/2kv) for CPU tests; float32."""
    kw = {
        "architecture": "Qwen2ForCausalLM",
        "vocab_size": 128,
        "hidden_size": 64,
        "num_layers": 4,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 128,
        "qkv_bias": True,
        "rope": RopeConfig(dim=16, theta=10000.0),
    }
    kw.update(overrides)
    return Qwen2Config(**kw)


def tiny_llama(**overrides) -> Qwen2Config:
    """A tiny Llama-3 style model (no bias, llama3 RoPE scaling, tied embeddings) for CPU tests."""
    kw = {
        "architecture": "LlamaForCausalLM",
        "vocab_size": 128,
        "hidden_size": 64,
        "num_layers": 3,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "intermediate_size": 96,
        "qkv_bias": False,
        "rope": RopeConfig(
            dim=16,
            theta=500000.0,
            kind="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    }
    kw.update(overrides)
    return Qwen2Config(**kw)
