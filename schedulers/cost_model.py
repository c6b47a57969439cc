"""Analytic cost model of prefill and decode, shared by the simulator, the runtime and the policies (no jax).

Formulas (per engine = one accelerator; L layers, d_model = hidden):

Linear FLOPs. Every token multiplies once by every active weight: 2 FLOPs per active parameter per
token, `linear_flops(n, requests) = (2 * active_params_per_token * n + 2 * lm_head_params * requests) / tp`
(embeddings excluded: a gather; the LM head counts once per request chunk, as prefill only needs the last
position's logits).

Attention FLOPs. A chunk of `bsz` new tokens on top of `cached` tokens (causal) forms
`pairs(cached, bsz) = bsz*cached + bsz*(bsz+1)/2` (query, key) pairs per layer. Per pair and layer:
  - dense GQA: QK^T and PV, 2 FLOPs per multiply-add, `4 * heads * head_dim`;
  - MLA, absorbed (DeepSeek-V2/V3 decode/prefill over a latent cache): QK over the latent+rope dims
    (kv_lora_rank + qk_rope_head_dim) and PV over the latent (kv_lora_rank):
    `2 * heads * (2 * kv_lora_rank + qk_rope_head_dim)`;
  - sparse attention (DeepSeek-V3.2 DSA, `index_topk` > 0): each query attends to at most `index_topk`
    keys, and the lightning indexer scores every (query, key) pair with
    `2 * index_heads * index_head_dim` FLOPs.

KV bytes. `kv_bytes_per_token_per_layer`: an explicit override (e.g. DeepSeek's FP8 cache format:
512 FP8 latent + 16 B scales + 64 bf16 rope = 656 B, plus 132 B indexer key in V3.2), else
`2 * kv_heads * head_dim * kv_dtype_bytes` (dense) or `(kv_lora_rank + qk_rope_head_dim) * kv_dtype_bytes`
(MLA).

Time. prefill_time = overhead + linear_flops / (linear_peak * mfu) + attention_flops / (peak *
attention_efficiency). decode_step_time = overhead + max(compute, bytes / (hbm_bw * hbm_efficiency))
with compute = linear_flops / (linear_peak * mfu) + attention_flops / (peak * attention_efficiency) (the
rates of prefill) and bytes = the weights the engine streams per step (dense part + the routed experts of
its 1/ep share that the batch touches, see `weight_bytes_per_engine`) + the KV the step reads
(`decode_kv_bytes`: every context token's KV; with sparse attention every token's indexer key plus the main
KV of at most index_topk tokens per sequence). `linear_peak` is the FP8 peak for 1-byte weights.
`fit` replaces the efficiency factors by least-squares coefficients of measured step times (prefill and
decode both additive: overhead + linear + attention + bytes terms, see `fit`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable, Sequence

import numpy as np

from dualpath_jax.checks import is_bool, is_int
from dualpath_jax.registry import Registry
from schedulers.hardware import HARDWARE, HardwareProfile

_SHAPE_FLAGS = ("qkv_bias", "tied_embeddings")  # ModelShape's bool fields (every other field but the name is a count)


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The shape of a decoder-only transformer, enough to count its FLOPs and bytes.

    Dense GQA models set heads/kv_heads/head_dim; MLA models set kv_lora_rank > 0 (then kv_heads and
    head_dim are unused for attention). MoE models set n_routed_experts > 0: layers >= first_k_dense use
    top_k routed + n_shared shared experts of width moe_intermediate; the first first_k_dense layers are
    dense MLPs of width intermediate.
    """

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    # MoE
    n_routed_experts: int = 0
    top_k: int = 0
    n_shared: int = 0
    moe_intermediate: int = 0
    first_k_dense: int = 0
    # MLA
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    q_lora_rank: int = 0
    # Sparse attention (DeepSeek-V3.2 lightning indexer); 0 = dense attention
    index_topk: int = 0
    index_heads: int = 0
    index_head_dim: int = 0
    # bytes/token/layer of the indexer keys inside kv_bytes_per_token_per_layer (decode reads them for every
    # token but the main KV only for the top-k selected ones)
    index_kv_bytes_per_token_per_layer: int = 0
    # Bytes
    weight_bytes: int = 2  # bytes per weight (2 = bf16, 1 = FP8)
    kv_dtype_bytes: int = 2  # bytes per KV element (when no override)
    kv_bytes_per_token_per_layer_override: int = 0  # exact cache format bytes, 0 = derive
    qkv_bias: bool = False
    tied_embeddings: bool = False

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in _SHAPE_FLAGS:  # ('no' was truthy: a QKV bias counted)
                if not is_bool(v):
                    raise ValueError(f"ModelShape {self.name!r}: {f.name} must be a bool, got {v!r}")
            elif f.name != "name":
                if isinstance(v, (int, float)) and not isinstance(v, bool) and not v >= 0:  # NaN too
                    raise ValueError(f"ModelShape {self.name!r}: {f.name} must be >= 0, got {v}")
                # a count: True was 1 layer, 7.5 a fractional parameter count, inf infinite FLOPs and bytes, a string
                # a bare TypeError from a comparison below
                if not is_int(v):
                    raise ValueError(f"ModelShape {self.name!r}: {f.name} must be an int (a count), got {v!r}")
        if self.layers <= 0 or self.hidden <= 0 or self.heads <= 0:
            raise ValueError(f"ModelShape {self.name!r}: layers, hidden and heads must be > 0")
        if self.n_routed_experts and not (0 < self.top_k <= self.n_routed_experts and self.moe_intermediate):
            raise ValueError(f"ModelShape {self.name!r}: MoE needs 0 < top_k <= n_routed_experts and moe_intermediate")
        if self.kv_bytes_per_token_per_layer <= 0:  # α divides by it (a ZeroDivisionError far from here)
            raise ValueError(
                f"ModelShape {self.name!r}: KV bytes per token per layer must be > 0 (kv_heads, head_dim, "
                "kv_dtype_bytes or the override)"
            )
        # GQA: each KV head serves heads / kv_heads query heads (heads=5, kv_heads=2 was priced without a word)
        if not self.is_mla and not (
            self.head_dim > 0 and 0 < self.kv_heads <= self.heads and self.heads % self.kv_heads == 0
        ):
            raise ValueError(
                f"ModelShape {self.name!r}: heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim} "
                "is not a GQA shape (head_dim > 0, 0 < kv_heads <= heads, heads a multiple of kv_heads)"
            )
        if self.index_kv_bytes_per_token_per_layer > self.kv_bytes_per_token_per_layer:
            raise ValueError(f"ModelShape {self.name!r}: indexer bytes exceed the KV bytes per token per layer")
        if self.first_k_dense > self.layers:
            raise ValueError(f"ModelShape {self.name!r}: first_k_dense {self.first_k_dense} > layers {self.layers}")

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    # ---- bytes ----
    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        if self.kv_bytes_per_token_per_layer_override:
            return self.kv_bytes_per_token_per_layer_override
        if self.is_mla:
            return (self.kv_lora_rank + self.qk_rope_head_dim) * self.kv_dtype_bytes
        return 2 * self.kv_heads * self.head_dim * self.kv_dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return self.layers * self.kv_bytes_per_token_per_layer

    # ---- parameters ----
    @property
    def attention_params(self) -> int:
        """Weights of one attention block (projections; norms ignored)."""
        h = self.hidden
        if self.is_mla:
            qk_head = self.qk_nope_head_dim + self.qk_rope_head_dim
            q = (
                (h * self.q_lora_rank + self.q_lora_rank * self.heads * qk_head)
                if self.q_lora_rank
                else h * self.heads * qk_head
            )
            kv_a = h * (self.kv_lora_rank + self.qk_rope_head_dim)
            kv_b = self.kv_lora_rank * self.heads * (self.qk_nope_head_dim + self.v_head_dim)
            o = self.heads * self.v_head_dim * h
            p = q + kv_a + kv_b + o
        else:
            q = h * self.heads * self.head_dim
            kv = 2 * h * self.kv_heads * self.head_dim
            o = self.heads * self.head_dim * h
            bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
            p = q + kv + o + bias
        if self.index_topk:
            # indexer: q from the q latent (or hidden), one shared key head, per-head weights
            q_in = self.q_lora_rank or h
            p += q_in * self.index_heads * self.index_head_dim + h * self.index_head_dim + h * self.index_heads
        return p

    @property
    def dense_mlp_params(self) -> int:
        return 3 * self.hidden * self.intermediate  # gate, up, down (SwiGLU)

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden * self.moe_intermediate

    @property
    def moe_layers(self) -> int:
        return self.layers - self.first_k_dense if self.is_moe else 0

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def routed_expert_params(self) -> int:
        """All routed experts of all MoE layers (the part EP shards)."""
        return self.moe_layers * self.n_routed_experts * self.expert_params

    @property
    def total_params(self) -> int:
        mlp = (self.layers - self.moe_layers) * self.dense_mlp_params
        if self.is_moe:
            per = (self.n_routed_experts + self.n_shared) * self.expert_params + self.hidden * self.n_routed_experts
            mlp += self.moe_layers * per
        return self.layers * self.attention_params + mlp + self.embedding_params

    @property
    def active_params(self) -> int:
        """Parameters one token multiplies with (embeddings and LM head included once each)."""
        return self.active_params_per_token + self.embedding_params

    @property
    def active_params_per_token(self) -> int:
        """Weights every token passes through in the layers (no embedding, no LM head)."""
        mlp = (self.layers - self.moe_layers) * self.dense_mlp_params
        if self.is_moe:
            per = (self.top_k + self.n_shared) * self.expert_params + self.hidden * self.n_routed_experts
            mlp += self.moe_layers * per
        return self.layers * self.attention_params + mlp

    @property
    def lm_head_params(self) -> int:
        return self.vocab * self.hidden

    # ---- attention ----
    @property
    def attention_flops_per_pair(self) -> int:
        """FLOPs per (query, key) pair per layer of the main attention (see module docstring)."""
        if self.is_mla:
            return 2 * self.heads * (2 * self.kv_lora_rank + self.qk_rope_head_dim)
        return 4 * self.heads * self.head_dim

    @property
    def indexer_flops_per_pair(self) -> int:
        return 2 * self.index_heads * self.index_head_dim if self.index_topk else 0


MODEL_SHAPES: Registry[ModelShape] = Registry("model shape")

# DeepSeek-V3.2 (HF config of DeepSeek-V3.2-Exp): 61 layers, hidden 7168, 128 heads, MLA (q_lora 1536,
# kv_lora 512, rope 64, nope 128, v 128), 256 routed experts top-8 + 1 shared (inter 2048), first 3 layers
# dense (inter 18432), vocab 129280, FP8 weights; DSA indexer 64 heads x 128, top-k 2048.
# KV: 656 B/token/layer FP8 cache + 132 B indexer key (PAPER.md) = 788 B -> 48,068 B/token.
DS660B = ModelShape(
    name="ds660b",
    layers=61,
    hidden=7168,
    heads=128,
    kv_heads=128,
    head_dim=128,
    intermediate=18432,
    vocab=129280,
    n_routed_experts=256,
    top_k=8,
    n_shared=1,
    moe_intermediate=2048,
    first_k_dense=3,
    kv_lora_rank=512,
    qk_rope_head_dim=64,
    qk_nope_head_dim=128,
    v_head_dim=128,
    q_lora_rank=1536,
    index_topk=2048,
    index_heads=64,
    index_head_dim=128,
    weight_bytes=1,
    kv_dtype_bytes=1,
    kv_bytes_per_token_per_layer_override=656 + 132,
    index_kv_bytes_per_token_per_layer=132,
)
MODEL_SHAPES.add("ds660b", DS660B)
# DS 27B (PAPER.md "Models"): hidden 2560, 30 layers, 32 heads, 72 routed experts (inter 1536) top-6,
# 2 shared, 1 dense layer (inter 12288), indexer top-k 1024. [inferred] everything else (MLA dims, vocab,
# indexer width, q_lora_rank, FP8 weights and cache format) as V3.2: the paper calls it a downscale of it.
MODEL_SHAPES.add(
    "ds27b",
    dataclasses.replace(
        DS660B,
        name="ds27b",
        layers=30,
        hidden=2560,
        heads=32,
        kv_heads=32,
        intermediate=12288,
        n_routed_experts=72,
        top_k=6,
        n_shared=2,
        moe_intermediate=1536,
        first_k_dense=1,
        index_topk=1024,
    ),
)
# Qwen2.5-32B (HF config): 64 layers, hidden 5120, 40 heads, 8 KV heads x 128, inter 27648, vocab 152064,
# qkv bias, untied embeddings, bf16. KV = 64 x 8 x 128 x 2 x 2 B = 256 KiB/token (PAPER.md).
MODEL_SHAPES.add(
    "qwen2.5-32b",
    ModelShape(
        name="qwen2.5-32b",
        layers=64,
        hidden=5120,
        heads=40,
        kv_heads=8,
        head_dim=128,
        intermediate=27648,
        vocab=152064,
        qkv_bias=True,
    ),
)


def get_model_shape(name: str) -> ModelShape:
    return MODEL_SHAPES.get(name)


def attention_pairs(cached: int, bsz: int) -> int:
    """(query, key) pairs of a causal chunk of `bsz` new tokens after `cached` tokens."""
    return bsz * cached + bsz * (bsz + 1) // 2


def _sparse_pairs(cached: int, bsz: int, topk: int) -> int:
    """Pairs when each query attends to at most `topk` keys: sum over i of min(cached + i + 1, topk)."""
    # queries 1..bsz see cached+1 .. cached+bsz keys; those below topk are dense, the rest capped.
    n_dense = max(0, min(bsz, topk - cached))  # queries with cached + i + 1 <= topk (i < n_dense)
    dense = n_dense * cached + n_dense * (n_dense + 1) // 2
    return dense + (bsz - n_dense) * topk


@dataclasses.dataclass(frozen=True)
class FitCoefficients:
    """Step time = overhead_s + s_per_linear_flop * linear FLOPs + s_per_attention_flop * attention FLOPs
    + s_per_byte * bytes (prefill: KV bytes the chunks' attention reads, cached + new; decode: weights +
    KV bytes streamed). Produced by `CostModel.fit` from measured step times."""

    overhead_s: float
    s_per_linear_flop: float
    s_per_attention_flop: float
    s_per_byte: float = 0.0

    def __post_init__(self):
        for f in dataclasses.fields(self):  # a NaN coefficient made every time NaN, a negative one times < 0
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v < math.inf:
                raise ValueError(f"FitCoefficients {f.name} must be a finite number >= 0, got {v!r}")


@dataclasses.dataclass(frozen=True)
class PrefillMeasurement:
    """One measured prefill forward: the batch's (cached, bsz) items and its wall time."""

    items: tuple[tuple[int, int], ...]
    seconds: float


@dataclasses.dataclass(frozen=True)
class DecodeMeasurement:
    """One measured decode step: batch size, total context tokens of the batch, wall time."""

    batch_size: int
    total_context_tokens: int
    seconds: float


class CostModel:
    """FLOPs, bytes and times of prefill and decode for one model on one engine.

    `ep` is the expert-parallel degree of the engine's group (an engine then holds 1/ep of the routed
    experts; with DP attention its compute per token is unchanged); `tp` the tensor-parallel degree
    (divides both FLOPs and weight bytes per engine). Per PAPER.md one engine = one GPU.

    The model, hardware, degrees and fits are fixed at construction (read-only attributes): the per-model
    constants of the formulas are computed once there, and decode steps are memoized per (batch size,
    context) and per batch size (bounded memos), so the simulator's per-event calls stay cheap. For the same reason
    the methods' inputs are not checked: token counts and batch sizes must be whole numbers >= 0 (a negative or
    fractional one gives a number, not an error).
    """

    MEMO_MAX = 1 << 15  # entries a memo holds before it is cleared

    def __init__(
        self,
        model: ModelShape | str,
        hw: HardwareProfile | str,
        tp: int = 1,
        ep: int = 1,
        prefill_fit: FitCoefficients | None = None,
        decode_fit: FitCoefficients | None = None,
    ):
        m = MODEL_SHAPES.get(model) if isinstance(model, str) else model
        hw = HARDWARE.get(hw) if isinstance(hw, str) else hw
        for what, v in (("tp", tp), ("ep", ep)):  # whole degrees: inf made the weights 0, 1.5 split them silently
            if (
                isinstance(v, bool)
                or not isinstance(v, numbers.Real)
                or not (v >= 1 and math.isfinite(v) and v == int(v))
            ):
                raise ValueError(f"tp and ep must be >= 1, got tp={tp!r} ep={ep!r}: {what} must be a whole number >= 1")
        tp, ep = int(tp), int(ep)
        if not isinstance(hw, HardwareProfile):  # (an AttributeError deep in the constants)
            raise TypeError(f"hw must be a HardwareProfile or a registered name, got {type(hw).__name__}")
        if not isinstance(m, ModelShape):
            raise TypeError(f"model must be a ModelShape or a registered name, got {type(m).__name__}")
        for kind, fit in (("prefill_fit", prefill_fit), ("decode_fit", decode_fit)):
            if fit is not None and not isinstance(fit, FitCoefficients):  # was an AttributeError at the first step
                raise TypeError(f"{kind} must be FitCoefficients or None, got {type(fit).__name__}")
        self._model, self._hw, self._tp, self._ep = m, hw, tp, ep
        self._prefill_fit, self._decode_fit = prefill_fit, decode_fit
        # Constants of the formulas (same expressions as the ModelShape properties, evaluated once).
        self._flops_per_token = 2.0 * m.active_params_per_token  # linear FLOPs of one token, before / tp
        self._flops_per_request = 2.0 * m.lm_head_params  # LM head of one position
        self._layers = m.layers
        self._topk = m.index_topk
        self._pair_flops = m.attention_flops_per_pair
        self._index_pair_flops = m.indexer_flops_per_pair
        self._kv_per_token = m.kv_bytes_per_token
        self._sparse_kv = bool(m.index_topk and m.index_kv_bytes_per_token_per_layer)
        self._index_kv = m.index_kv_bytes_per_token_per_layer
        self._main_kv = m.kv_bytes_per_token_per_layer - m.index_kv_bytes_per_token_per_layer
        routed = m.routed_expert_params
        # the input embedding is a gather, not streamed (a tied one is streamed as the LM head)
        dense = m.total_params - routed - (0 if m.tied_embeddings else m.vocab * m.hidden)
        self._dense_weights = dense / tp
        self._routed_weights = routed
        self._ep_tp = ep * tp
        self._is_moe = m.is_moe
        self._expert_skip = 1.0 - m.top_k / m.n_routed_experts if m.is_moe else 1.0  # one token skips an expert
        self._linear_rate = hw.linear_peak(m.weight_bytes) * hw.mfu  # FLOP/s of the GEMMs
        self._attention_rate = hw.peak_flops * hw.attention_efficiency  # FLOP/s of prefill attention
        self._hbm_rate = hw.hbm_bandwidth * hw.hbm_efficiency  # B/s of decode streaming
        self._decode_by_batch: dict[int, tuple[float, float]] = {}  # batch size -> (linear FLOPs, weight B)
        self._decode_memo: dict[tuple[int, int], float] = {}  # (batch size, context) -> step seconds

    # read-only: the constants above are derived from these
    model = property(lambda self: self._model, doc="The ModelShape.")
    hw = property(lambda self: self._hw, doc="The HardwareProfile.")
    tp = property(lambda self: self._tp, doc="Tensor-parallel degree.")
    ep = property(lambda self: self._ep, doc="Expert-parallel degree of the engine's group.")
    prefill_fit = property(lambda self: self._prefill_fit, doc="Fitted prefill coefficients, or None.")
    decode_fit = property(lambda self: self._decode_fit, doc="Fitted decode coefficients, or None.")

    def __repr__(self) -> str:
        fit = " fitted" if self.prefill_fit or self.decode_fit else ""
        return f"CostModel({self.model.name}, {self.hw.name}, tp={self.tp}, ep={self.ep}{fit})"

    # ---- bytes ----
    def kv_bytes(self, tokens: int) -> int:
        """Bytes of the KV cache of `tokens` tokens over all layers."""
        return tokens * self._kv_per_token

    def weight_bytes_per_engine(self, batch_size: int | None = None) -> float:
        """Weights one engine streams from HBM per decode step: dense part + its share of routed experts.

        With `batch_size`, only the routed experts some token picks are read: under EP with DP attention
        the engine's experts serve `batch_size * ep` tokens (every rank holding a batch like this one),
        each picking top_k of n_routed experts uniformly, so an expert is touched with probability
        1 - (1 - top_k/n_routed)^(batch_size * ep). None: every local expert is read.
        """
        touched = 1.0
        if batch_size is not None and self._is_moe:
            touched = 1.0 - self._expert_skip ** (max(batch_size, 0) * self._ep)
        return (self._dense_weights + touched * self._routed_weights / self._ep_tp) * self._model.weight_bytes

    # ---- FLOPs ----
    def linear_flops(self, tokens: int, requests: int = 1) -> float:
        """GEMM FLOPs of `tokens` tokens through the layers, plus the LM head for `requests` positions."""
        return (self._flops_per_token * tokens + self._flops_per_request * requests) / self._tp

    def attention_flops(self, cached: int, bsz: int) -> float:
        """Attention FLOPs (all layers) of a chunk of `bsz` tokens after `cached` (main + indexer)."""
        if bsz <= 0:
            return 0.0
        topk = self._topk
        # attention_pairs and _sparse_pairs, inlined (integer arithmetic: exact)
        pairs = bsz * cached + bsz * (bsz + 1) // 2
        if topk:
            n_dense = max(0, min(bsz, topk - cached))
            main = n_dense * cached + n_dense * (n_dense + 1) // 2 + (bsz - n_dense) * topk
            return self._layers * (main * self._pair_flops + pairs * self._index_pair_flops) / self._tp
        return self._layers * (pairs * self._pair_flops) / self._tp

    def prefill_flops(self, cached: int, bsz: int) -> float:
        """All FLOPs of prefilling `bsz` tokens on top of `cached` tokens (one request chunk)."""
        if bsz <= 0:
            return 0.0
        return self.linear_flops(bsz) + self.attention_flops(cached, bsz)

    # ---- times ----
    def _linear_time(self, flops: float) -> float:
        if self._prefill_fit:
            return flops * self._prefill_fit.s_per_linear_flop
        return flops / self._linear_rate

    def attention_time(self, cached: int, bsz: int) -> float:
        """Predicted attention time (s) of one chunk: what the compute quota of intra-engine batching bounds."""
        flops = self.attention_flops(cached, bsz)
        f = self._prefill_fit
        if f:
            return flops * f.s_per_attention_flop + (cached + bsz) * self._kv_per_token * f.s_per_byte
        return flops / self._attention_rate

    def _overhead(self, fit: FitCoefficients | None) -> float:
        return fit.overhead_s if fit else self._hw.step_overhead_s

    def prefill_time(self, cached: int, bsz: int) -> float:
        """Seconds for one forward of one request chunk (bsz new tokens after cached) on one engine."""
        return self.batch_prefill_time([(cached, bsz)])

    def batch_prefill_time(self, items: Sequence[tuple[int, int]]) -> float:
        """Seconds for one forward over a batch of (cached, bsz) chunks: one overhead, summed work."""
        items = [(c, b) for c, b in items if b > 0]
        if not items:
            return 0.0
        attention_time = self.attention_time
        if len(items) == 1:  # the common case in the simulator
            tokens = items[0][1]
            attn = 0.0 + attention_time(*items[0])  # what sum() of one float returns
        else:
            tokens = sum(b for _, b in items)
            attn = sum([attention_time(c, b) for c, b in items])
        lin = self._linear_time(self.linear_flops(tokens, requests=len(items)))
        return self._overhead(self._prefill_fit) + lin + attn

    def decode_kv_bytes(self, batch_size: int, total_context_tokens: int) -> float:
        """KV bytes one decode step reads from HBM: every token's KV, or with sparse attention (DSA) every
        token's indexer key plus the main KV of at most index_topk tokens per sequence (batch average)."""
        if not self._sparse_kv or batch_size <= 0:
            return total_context_tokens * self._kv_per_token / self._tp
        selected = batch_size * min(total_context_tokens / batch_size, self._topk)
        return self._layers * (total_context_tokens * self._index_kv + selected * self._main_kv) / self._tp

    def _decode_batch_terms(self, batch_size: int) -> tuple[float, float]:
        """(linear FLOPs, weight bytes) of a decode step of `batch_size` sequences (memoized for ints)."""
        if type(batch_size) is not int:
            return self.linear_flops(batch_size, requests=batch_size), self.weight_bytes_per_engine(batch_size)
        terms = self._decode_by_batch.get(batch_size)
        if terms is None:
            if len(self._decode_by_batch) >= self.MEMO_MAX:
                self._decode_by_batch.clear()
            terms = self.linear_flops(batch_size, requests=batch_size), self.weight_bytes_per_engine(batch_size)
            self._decode_by_batch[batch_size] = terms
        return terms

    def decode_terms(self, batch_size: int, total_context_tokens: int) -> tuple[float, float, float]:
        """(linear FLOPs, attention FLOPs, HBM bytes) of one decode step: one new token per sequence."""
        lin, weights = self._decode_batch_terms(batch_size)
        if self._topk:
            # each sequence's one query attends to <= topk keys; the indexer scans all keys
            main_pairs = batch_size * min(total_context_tokens / batch_size, self._topk)
            attn = self._layers * (main_pairs * self._pair_flops + total_context_tokens * self._index_pair_flops)
        else:
            attn = self._layers * total_context_tokens * self._pair_flops
        nbytes = weights + self.decode_kv_bytes(batch_size, total_context_tokens)
        return lin, attn / self._tp, nbytes

    def decode_step_time(self, batch_size: int, total_context_tokens: int) -> float:
        """Seconds of one decode step of `batch_size` sequences holding `total_context_tokens` KV tokens.

        max(compute, (weights + KV bytes) / HBM bandwidth) + overhead (KV bytes: `decode_kv_bytes`).
        """
        if batch_size <= 0:
            return 0.0
        key = None
        if type(batch_size) is int and type(total_context_tokens) is int:
            key = (batch_size, total_context_tokens)
            t = self._decode_memo.get(key)
            if t is not None:
                return t
        lin, attn, nbytes = self.decode_terms(batch_size, total_context_tokens)
        f = self._decode_fit
        if f:
            # the fitted surrogate is additive (see `fit`): predict with the form that was fitted
            t = f.overhead_s + lin * f.s_per_linear_flop + attn * f.s_per_attention_flop + nbytes * f.s_per_byte
        else:
            compute = lin / self._linear_rate + attn / self._attention_rate
            memory = nbytes / self._hbm_rate
            t = self._hw.step_overhead_s + max(compute, memory)
        if key is not None:
            if len(self._decode_memo) >= self.MEMO_MAX:
                self._decode_memo.clear()
            self._decode_memo[key] = t
        return t

    # ---- ratios ----
    def gb_per_pflop(self, context: int, append: int) -> float:
        """The paper's Table 1 I/O-to-compute ratio of one turn (not in PAPER.md; README "Cost model", "Table 1
        check"): GB of KV loaded per PFLOP of prefill.

        The turn loads the KV of its `context` earlier tokens (all layers) and prefills `append` new
        tokens on top of them: kv_bytes(context) / 1e9 over prefill_flops(context, append) / 1e15, with
        prefill FLOPs = linear (2 x non-embedding params x append + LM head once) + causal attention over
        the cached context. For Qwen2.5-32B, append 429, this gives 116.9 at context 16,000 and 266.8 at
        64,000 (paper: 117-267). Variants checked against the paper's numbers (16,000 / 64,000): KV in GiB
        108.8 / 248.5 (-7%), KV of the whole prompt 120.0 / 268.6, attention without the causal half
        116.5 / 266.3, linear FLOPs only 156.6 / 626.6 (far off: the paper counts attention); binary-K
        contexts (16,384 / 65,536) 118.9 / 269.5. So the paper's figures are decimal GB over all FLOPs
        of the append, at decimal-K contexts.
        """
        if not 0 < append < math.inf:  # (inf: "cannot convert float NaN to integer" deep in the FLOPs)
            raise ValueError(f"append must be > 0 for a GB/PFLOP ratio (a finite number), got {append}")
        if not 0 <= context < math.inf:  # NaN too (a negative context gave a negative ratio)
            raise ValueError(f"context must be >= 0 for a GB/PFLOP ratio (a finite number), got {context}")
        return (self.kv_bytes(context) / 1e9) / (self.prefill_flops(context, append) / 1e15)

    # ---- fitting ----
    def fit(
        self, measurements: Iterable[PrefillMeasurement | DecodeMeasurement]
    ) -> tuple[FitCoefficients | None, FitCoefficients | None]:
        """Least-squares coefficients from measured step times; returns (prefill_fit, decode_fit).

        Prefill: t = c0 + c1 * linear_flops + c2 * attention_flops + c3 * KV bytes the attention reads
        (cached + new tokens of each chunk: memory-bound attention of small chunks). Decode: t = c0 + c1 * linear_flops +
        c2 * attention_flops + c3 * bytes, an additive surrogate of the analytic max() (in a regime where one
        side dominates the other coefficients fit to ~0; on a CPU compute and memory time add), and
        `decode_step_time` predicts with that same additive form.
        Coefficients are non-negative (a negative cost per FLOP is noise): solved by an active-set NNLS.
        Measurements that do not determine every independent term of a kind (fewer distinct shapes than terms:
        4 for prefill, 4 for decode or 3 for a dense model's, whose bytes = weights + KV add no term of their own;
        or shapes that never vary one of them, e.g. decode steps of one batch size) are refused with a ValueError:
        the fit would put their time on whichever term NNLS met first. No measurements of a kind: None for it.
        """
        pre_rows, pre_t, dec_rows, dec_t = [], [], [], []
        for meas in measurements:
            if isinstance(meas, PrefillMeasurement):
                items = [(c, b) for c, b in meas.items if b != 0]  # (bsz 0: nothing prefilled, no term)
                # `not 0 < x < inf` refuses NaN and inf too (else NNLS or the rank's SVD fails deep inside numpy);
                # a negative bsz is refused, not dropped like a 0 (the fit put the batch's time on the rest)
                if not items or not 0 < meas.seconds < math.inf or not prefill_items_ok(meas.items):
                    raise ValueError(
                        f"bad prefill measurement {meas}: needs items with bsz >= 0 (some > 0) and cached >= 0, all "
                        "finite whole numbers, and finite seconds > 0"
                    )
                pre_rows.append(self._prefill_terms(items))
                pre_t.append(meas.seconds)
            elif isinstance(meas, DecodeMeasurement):
                if (
                    not (
                        0 < meas.batch_size < math.inf and 0 <= meas.total_context_tokens < math.inf  # NaN too
                    )
                    or meas.batch_size % 1  # half a sequence
                    or meas.total_context_tokens % 1
                    or not 0 < meas.seconds < math.inf
                ):
                    raise ValueError(
                        f"bad decode measurement {meas}: needs batch_size > 0, total_context_tokens >= 0 (whole "
                        "numbers) and finite seconds > 0"
                    )
                dec_rows.append([1.0, *self.decode_terms(meas.batch_size, meas.total_context_tokens)])
                dec_t.append(meas.seconds)
            else:
                raise TypeError(f"unknown measurement type {type(meas).__name__}")
        pre = dec = None
        if pre_rows:
            probes = [self._prefill_terms(items) for items in _PREFILL_PROBES]
            self._check_determined("prefill", pre_rows, probes, "bsz, cached and the number of items per batch")
            c = _nnls(np.array(pre_rows), np.array(pre_t))
            pre = FitCoefficients(overhead_s=c[0], s_per_linear_flop=c[1], s_per_attention_flop=c[2], s_per_byte=c[3])
        if dec_rows:
            probes = [[1.0, *self.decode_terms(b, ctx)] for b, ctx in _DECODE_PROBES]
            self._check_determined("decode", dec_rows, probes, "both the batch size and the context")
            c = _nnls(np.array(dec_rows), np.array(dec_t))
            dec = FitCoefficients(overhead_s=c[0], s_per_linear_flop=c[1], s_per_attention_flop=c[2], s_per_byte=c[3])
        return pre, dec

    def _prefill_terms(self, items: Sequence[tuple[int, int]]) -> list[float]:
        """The prefill fit's terms of one batch: [1, linear FLOPs, attention FLOPs, KV bytes read]."""
        tokens = sum(b for _, b in items)
        return [
            1.0,
            self.linear_flops(tokens, requests=len(items)),
            sum(self.attention_flops(c, b) for c, b in items),
            sum(self.kv_bytes(c + b) for c, b in items),
        ]

    def _check_determined(self, kind: str, rows: list[list[float]], probes: list[list[float]], vary: str) -> None:
        """Refuse measurements whose terms span fewer independent directions than the model's terms do over every
        shape (`probes`): NNLS would put the unexplained part on whichever term it meets first (e.g. a constant),
        and predictions away from the measured shapes would be arbitrary."""
        need, got = _rank(probes), _rank(rows)
        if got < need:
            n, distinct = len(rows), len(set(map(tuple, rows)))
            raise ValueError(
                f"{kind} fit is underdetermined: {n} measurement{'s' * (n != 1)} of {distinct} distinct "
                f"shape{'s' * (distinct != 1)} determine {got} of the {need} independent terms of "
                f"{self.model.name}'s {kind} time; it needs at least {need} measurements of distinct shapes that vary "
                f"{vary}"
            )

    @classmethod
    def from_fit(
        cls,
        model: ModelShape | str,
        hw: HardwareProfile | str,
        measurements: Iterable[PrefillMeasurement | DecodeMeasurement],
        tp: int = 1,
        ep: int = 1,
    ) -> CostModel:
        """A cost model whose times come from coefficients fitted to `measurements` (see `fit`)."""
        base = cls(model, hw, tp=tp, ep=ep)
        pre, dec = base.fit(measurements)
        return cls(base.model, base.hw, tp=tp, ep=ep, prefill_fit=pre, decode_fit=dec)

    # ---- throughput summaries used to derive policy thresholds ----
    def prefill_tokens_per_s(self, context: int, append: int) -> float:
        """Prompt tokens (hit + miss) per second one PE sustains on turns of this shape."""
        if not 0 < append < math.inf:  # a turn with nothing to prefill takes no time (inf: a bare NaN error)
            raise ValueError(f"append must be > 0 for a prefill rate (a finite number), got {append}")
        if not 0 <= context < math.inf:  # NaN too (a negative context gave a wrong β, NaN a bare NaN error)
            raise ValueError(f"context must be >= 0 for a prefill rate (a finite number), got {context}")
        return (context + append) / self.prefill_time(context, append)

    def read_tokens_per_s(self) -> float:
        """Hit tokens per second one node's SNIC reads from storage."""
        return self.hw.snic_bandwidth / self.model.kv_bytes_per_token


# Shapes spanning every regime of the fitted terms (single- and multi-item batches, contexts below and above a
# sparse-attention top-k, small and large decode batches): their rank is the number of independent terms a fit of
# this model has (4 for prefill; 3 for a dense model's decode, whose bytes = weights + KV add no independent term).
_PREFILL_PROBES = (
    ((0, 1),),
    ((0, 8),),
    ((0, 512),),
    ((100, 3),),
    ((4096, 64),),
    ((65_536, 1000),),
    ((200_000, 7),),
    ((3, 2), (900, 50)),
    ((1, 1), (2, 2), (3, 3)),
    ((10, 300), (50_000, 4000)),
)
_DECODE_PROBES = ((1, 1), (1, 100_000), (2, 50), (3, 30), (5, 200_000), (7, 35_000), (16, 24_000), (64, 6400))
_RANK_RTOL = 1e-9  # singular values below this fraction of the largest (columns scaled to norm 1) count as 0


def prefill_items_ok(items: Sequence[tuple[int, int]]) -> bool:
    """Measured (cached, bsz) items: whole numbers >= 0, finite (`not 0 <= x < inf` refuses NaN too). A fraction
    of a token has no forward; a negative bsz was dropped like a 0 (its batch's time put on the rest)."""
    return all(0 <= c < math.inf and 0 <= b < math.inf and not c % 1 and not b % 1 for c, b in items)


def _rank(rows: list[list[float]]) -> int:
    """Numerical rank of a fit's design matrix, each column scaled to unit norm (the terms differ by 1e15)."""
    a = np.array(rows, dtype=float)
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    s = np.linalg.svd(a / scale, compute_uv=False)
    return int((s > s[0] * _RANK_RTOL).sum()) if s.size and s[0] > 0 else 0


def _nnls(a: np.ndarray, b: np.ndarray, iters: int = 100) -> np.ndarray:
    """Non-negative least squares min ||a x - b||, x >= 0 (Lawson-Hanson active set), columns scaled."""
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    a = a / scale
    n = a.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    for _ in range(iters):
        w = a.T @ (b - a @ x)
        if passive.all() or (w[~passive] <= 1e-12).all():
            break
        j = int(np.argmax(np.where(passive, -np.inf, w)))
        passive[j] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = np.min(x[neg] / (x[neg] - z[neg]))
            x = x + alpha * (z - x)
            passive &= x > 1e-15
    return x / scale


__all__ = [
    "MODEL_SHAPES",
    "CostModel",
    "DecodeMeasurement",
    "FitCoefficients",
    "ModelShape",
    "PrefillMeasurement",
    "attention_pairs",
    "get_model_shape",
]
