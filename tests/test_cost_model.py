"""Cost model: bytes, parameter counts, FLOPs against brute force, Table 1 check, fits, hardware."""

from __future__ import annotations

import math

import numpy as np
import pytest

from schedulers.cost_model import (
    MODEL_SHAPES,
    CostModel,
    DecodeMeasurement,
    FitCoefficients,
    ModelShape,
    PrefillMeasurement,
    _sparse_pairs,
    attention_pairs,
)
from schedulers.hardware import HARDWARE, HardwareProfile


def test_kv_bytes_match_paper():
    assert MODEL_SHAPES.get("qwen2.5-32b").kv_bytes_per_token == 256 * 1024  # PAPER.md: 256 KiB
    ds = MODEL_SHAPES.get("ds660b")
    assert ds.kv_bytes_per_token_per_layer == 656 + 132 and ds.layers == 61
    assert abs(ds.kv_bytes_per_token - 48_000) / 48_000 < 0.01  # ≈ 48 KB/token
    # bf16 MLA without the FP8 format: (512 + 64) * 2 B * 61 layers = 70,272 B (PAPER.md)
    import dataclasses

    bf16 = dataclasses.replace(ds, kv_bytes_per_token_per_layer_override=0, kv_dtype_bytes=2)
    assert bf16.kv_bytes_per_token == 70_272
    assert CostModel("qwen2.5-32b", "h800").kv_bytes(10) == 10 * 262_144


def test_parameter_counts_match_published():
    q = MODEL_SHAPES.get("qwen2.5-32b")
    assert abs(q.total_params - 32.76e9) / 32.76e9 < 0.02  # HF: 32.5B (+ untied head)
    assert abs(q.active_params_per_token - 31.0e9) / 31.0e9 < 0.02  # HF: 31.0B non-embedding
    ds = MODEL_SHAPES.get("ds660b")
    assert abs(ds.total_params - 671e9) / 671e9 < 0.02  # DeepSeek-V3: 671B total
    assert abs(ds.active_params - 37e9) / 37e9 < 0.06  # 37B activated
    small = MODEL_SHAPES.get("ds27b")
    assert abs(small.total_params - 27e9) / 27e9 < 0.05  # "DS 27B"


def test_attention_pairs_brute_force():
    for cached in (0, 1, 7, 100, 5000):
        for bsz in (0, 1, 2, 33, 400):
            assert attention_pairs(cached, bsz) == sum(cached + i + 1 for i in range(bsz))
            for topk in (1, 64, 1024, 6000):
                assert _sparse_pairs(cached, bsz, topk) == sum(min(cached + i + 1, topk) for i in range(bsz))


def test_prefill_flops_formula_dense_and_mla():
    cm = CostModel("qwen2.5-32b", "h800")
    m = cm.model
    got = cm.prefill_flops(1000, 200)
    want = (
        2 * m.active_params_per_token * 200
        + 2 * m.vocab * m.hidden
        + m.layers * 4 * 40 * 128 * attention_pairs(1000, 200)
    )
    assert got == pytest.approx(want)
    ds = CostModel("ds660b", "h800")
    # MLA absorbed: 2 * heads * (2 * 512 + 64) per pair; DSA caps keys at 2048 and the indexer scans all
    per_pair = 2 * 128 * (2 * 512 + 64)
    idx = 2 * 64 * 128
    attn = 61 * (_sparse_pairs(50_000, 100, 2048) * per_pair + attention_pairs(50_000, 100) * idx)
    assert ds.attention_flops(50_000, 100) == pytest.approx(attn)
    assert ds.prefill_flops(0, 0) == 0.0


def test_table1_gb_per_pflop_qwen():
    """The paper's Table 1 (quoted in issue 2; not in PAPER.md): Qwen2.5-32B at 16K-64K context, append 429 -> 117-267 GB/PFLOP (within 10%)."""
    cm = CostModel("qwen2.5-32b", "h800")
    lo, hi = cm.gb_per_pflop(16_000, 429), cm.gb_per_pflop(64_000, 429)
    assert abs(lo - 117) / 117 < 0.10 and abs(hi - 267) / 267 < 0.10
    # the plain variant lands within 1% (decimal K context, decimal GB, FLOPs of the append only)
    assert abs(lo - 117) / 117 < 0.01 and abs(hi - 267) / 267 < 0.01
    # binary K contexts stay within 10% too
    assert abs(cm.gb_per_pflop(16_384, 429) - 117) / 117 < 0.10
    assert abs(cm.gb_per_pflop(65_536, 429) - 267) / 267 < 0.10
    with pytest.raises(ValueError):
        cm.gb_per_pflop(1000, 0)


def test_decode_step_time_is_max_of_compute_and_memory():
    cm = CostModel("qwen2.5-32b", "h800")
    hw = cm.hw
    # batch 1, short context: weight streaming dominates
    t = cm.decode_step_time(1, 1000)
    mem = (cm.weight_bytes_per_engine() + cm.kv_bytes(1000)) / (hw.hbm_bandwidth * hw.hbm_efficiency)
    assert t == pytest.approx(hw.step_overhead_s + mem, rel=1e-9)
    assert 0.015 < t < 0.035  # 64 GB of bf16 weights at ~2.7 TB/s
    # more context -> more KV bytes -> slower
    assert cm.decode_step_time(64, 64 * 32_000) > cm.decode_step_time(64, 64 * 1000)
    # a huge batch of short sequences becomes compute-bound
    big = cm.decode_step_time(8192, 8192)
    comp = cm.linear_flops(8192, 8192) / (hw.peak_flops * hw.mfu)
    assert big >= comp and big == pytest.approx(
        hw.step_overhead_s
        + max(
            comp
            + cm.model.layers * 8192 * cm.model.attention_flops_per_pair / (hw.peak_flops * hw.attention_efficiency),
            (cm.weight_bytes_per_engine() + cm.kv_bytes(8192)) / (hw.hbm_bandwidth * hw.hbm_efficiency),
        )
    )
    assert cm.decode_step_time(0, 0) == 0.0


def test_sparse_attention_decode_reads_topk_kv():
    cm = CostModel("ds660b", "h800")
    # 4 sequences of 32K: indexer keys of every token + main KV (656 B) of 2048 tokens each, 61 layers
    assert cm.decode_kv_bytes(4, 4 * 32_000) == pytest.approx(61 * (4 * 32_000 * 132 + 4 * 2048 * 656))
    # short sequences read everything
    assert cm.decode_kv_bytes(4, 4 * 1000) == pytest.approx(cm.kv_bytes(4000))
    dense = CostModel("qwen2.5-32b", "h800")
    assert dense.decode_kv_bytes(4, 128_000) == dense.kv_bytes(128_000)


def test_ep_shards_routed_experts_in_decode():
    one = CostModel("ds660b", "h800", ep=1)
    many = CostModel("ds660b", "h800", ep=32)
    routed = one.model.routed_expert_params * one.model.weight_bytes
    assert one.weight_bytes_per_engine() - many.weight_bytes_per_engine() == pytest.approx(routed * (1 - 1 / 32))
    with pytest.raises(ValueError):
        CostModel("ds660b", "h800", ep=0)
    # a batch of 1 on EP32 touches 1 - (1 - 8/256)^32 of the local experts; a large batch all of them
    dense = many.weight_bytes_per_engine() - routed / 32
    frac = 1 - (1 - 8 / 256) ** 32
    assert many.weight_bytes_per_engine(1) == pytest.approx(dense + frac * routed / 32)
    assert many.weight_bytes_per_engine(256) == pytest.approx(many.weight_bytes_per_engine(), rel=1e-6)
    assert many.decode_step_time(1, 1000) < many.decode_step_time(64, 64_000)
    dense_model = CostModel("qwen2.5-32b", "h800")
    assert dense_model.weight_bytes_per_engine(1) == dense_model.weight_bytes_per_engine()


def test_batch_prefill_time_one_overhead():
    cm = CostModel("ds27b", "h800")
    items = [(10_000, 500), (30_000, 200), (0, 1000)]
    single = sum(cm.prefill_time(c, b) for c, b in items)
    batch = cm.batch_prefill_time(items)
    # one overhead and one LM head pass per request, attention summed
    assert batch < single
    assert batch == pytest.approx(single - 2 * cm.hw.step_overhead_s, rel=1e-6)
    assert cm.batch_prefill_time([]) == 0.0
    assert cm.attention_time(10_000, 500) < cm.prefill_time(10_000, 500)


def test_fit_recovers_known_coefficients():
    cm = CostModel("qwen2.5-32b", "cpu")
    true = FitCoefficients(overhead_s=0.004, s_per_linear_flop=2e-12, s_per_attention_flop=5e-12)
    rng = np.random.default_rng(0)
    meas = []
    for _ in range(40):
        items = tuple((int(rng.integers(0, 20_000)), int(rng.integers(1, 800))) for _ in range(int(rng.integers(1, 4))))
        tokens = sum(b for _, b in items)
        t = (
            true.overhead_s
            + true.s_per_linear_flop * cm.linear_flops(tokens, len(items))
            + true.s_per_attention_flop * sum(cm.attention_flops(c, b) for c, b in items)
        )
        meas.append(PrefillMeasurement(items, t + 1e-4 * rng.standard_normal()))  # 0.1 ms timer noise
    for _ in range(20):
        b, ctx = int(rng.integers(1, 64)), int(rng.integers(1, 200_000))
        meas.append(DecodeMeasurement(b, ctx, 0.002 + 1e-10 * (cm.weight_bytes_per_engine() + cm.kv_bytes(ctx))))
    pre, dec = cm.fit(meas)
    assert pre.s_per_linear_flop == pytest.approx(true.s_per_linear_flop, rel=0.05)
    assert pre.s_per_attention_flop == pytest.approx(true.s_per_attention_flop, rel=0.05)
    assert pre.overhead_s == pytest.approx(true.overhead_s, abs=2e-3)
    assert dec.s_per_byte == pytest.approx(1e-10, rel=0.05)
    fitted = CostModel.from_fit("qwen2.5-32b", "cpu", meas)
    t_true = (
        true.overhead_s
        + true.s_per_linear_flop * cm.linear_flops(300)
        + true.s_per_attention_flop * cm.attention_flops(9000, 300)
    )
    assert fitted.prefill_time(9000, 300) == pytest.approx(t_true, rel=0.05)
    assert "fitted" in repr(fitted)
    want_dec = 0.002 + 1e-10 * (cm.weight_bytes_per_engine() + cm.kv_bytes(50_000))
    assert fitted.decode_step_time(8, 50_000) == pytest.approx(want_dec, rel=0.05)
    with pytest.raises(ValueError, match="bad prefill measurement"):
        cm.fit([PrefillMeasurement(((0, 0),), 1.0)])


def test_fit_rejects_nan_inf_and_negative_measurements():
    """NaN or inf seconds failed deep inside numpy ("zero-size array to reduction operation minimum"); a negative
    cached or context length was fitted silently."""
    cm = CostModel("ds27b", "cpu")
    for seconds in (float("nan"), float("inf"), 0.0):
        with pytest.raises(ValueError, match="bad prefill measurement"):
            cm.fit([PrefillMeasurement(((0, 10),), seconds)])
        with pytest.raises(ValueError, match="bad decode measurement"):
            cm.fit([DecodeMeasurement(4, 1000, seconds)])
    with pytest.raises(ValueError, match="cached >= 0"):
        cm.fit([PrefillMeasurement(((-10, 10),), 0.01)])
    with pytest.raises(ValueError, match="total_context_tokens >= 0"):
        cm.fit([DecodeMeasurement(4, -1000, 0.01)])


def test_fit_refuses_measurements_that_do_not_determine_the_coefficients():
    """Fewer distinct measurements than independent terms (4 for prefill) were fitted silently: NNLS put the time on
    whichever term it met first (e.g. a constant), so predictions away from the measured shapes were arbitrary.
    The same for many measurements of one shape, or decode steps that never vary the batch size."""
    cm = CostModel("ds27b", "cpu")
    three = [PrefillMeasurement(((c, b),), 0.01 + 1e-5 * b) for c, b in ((0, 64), (1000, 128), (4000, 256))]
    with pytest.raises(
        ValueError, match=r"prefill fit is underdetermined: 3 measurements of 3 distinct shapes .* at least 4"
    ):
        cm.fit(three)
    same = [PrefillMeasurement(((512, 64),), 0.01 * (1 + k / 100)) for k in range(20)]  # one shape, 20 times
    with pytest.raises(ValueError, match="20 measurements of 1 distinct shape determine 1 of the 4"):
        cm.fit(same)
    ok = three + [PrefillMeasurement(((0, 64), (2000, 32)), 0.02)]  # a 4th shape that varies independently
    assert cm.fit(ok)[0] is not None
    batch_one = [DecodeMeasurement(1, ctx, 0.01 + 1e-8 * ctx) for ctx in (100, 1000, 5000, 20_000, 80_000)]
    with pytest.raises(ValueError, match="decode fit is underdetermined.*vary both the batch size and the context"):
        cm.fit(batch_one)  # the batch size never varies: the linear-FLOP term is one more constant
    # a dense model's decode bytes (weights + KV) add no independent term: 3 distinct shapes determine it
    dense = CostModel("qwen2.5-32b", "cpu")
    dec = [DecodeMeasurement(b, ctx, 0.01 + 1e-3 * b + 1e-8 * ctx) for b, ctx in ((1, 1000), (8, 1000), (8, 50_000))]
    assert dense.fit(dec)[1] is not None
    with pytest.raises(ValueError, match="2 measurements of 2 distinct shapes determine 2 of the 3 .* at least 3"):
        dense.fit(dec[:2])
    assert cm.fit([]) == (None, None)  # nothing measured: nothing fitted (the analytic model stays)


def test_prefill_rate_needs_an_append():
    """prefill_tokens_per_s (and so DualPathConfig.from_cost_model) divided by a zero prefill time."""
    cm = CostModel("ds660b", "h800")
    with pytest.raises(ValueError, match="append must be > 0"):
        cm.prefill_tokens_per_s(32_000, 0)
    assert cm.prefill_tokens_per_s(32_000, 429) > 0


def test_fit_coefficients_must_be_finite_and_non_negative():
    """Coefficients given by hand or read back from a JSON: NaN made every predicted time NaN, a negative one
    negative times, and a dict was an AttributeError at the first step."""
    for bad in (float("nan"), -1.0, float("inf"), "0.1", True):
        with pytest.raises(ValueError, match="FitCoefficients overhead_s must be a finite number >= 0"):
            FitCoefficients(overhead_s=bad, s_per_linear_flop=1e-12, s_per_attention_flop=1e-12)
    with pytest.raises(ValueError, match="s_per_byte must be"):
        FitCoefficients(0.001, 1e-12, 1e-12, s_per_byte=float("nan"))
    assert FitCoefficients(np.float32(0.001), 0, np.float64(1e-12)).s_per_linear_flop == 0
    for kw in ({"prefill_fit": {"overhead_s": 0.001}}, {"decode_fit": (0.001, 1e-12, 1e-12, 0.0)}):
        with pytest.raises(TypeError, match="_fit must be FitCoefficients or None, got"):
            CostModel("ds27b", "cpu", **kw)


def test_prefill_rate_and_gb_per_pflop_need_a_context_of_zero_or_more():
    """A negative context gave a β from a negative prompt (DualPathConfig.from_cost_model(context=-30000) was
    accepted) and a negative GB/PFLOP; a NaN context failed as "cannot convert float NaN to integer" in β."""
    cm = CostModel("ds660b", "h800")
    for context in (-5000, float("nan")):
        with pytest.raises(ValueError, match="context must be >= 0 for a prefill rate"):
            cm.prefill_tokens_per_s(context, 429)
        with pytest.raises(ValueError, match="context must be >= 0 for a GB/PFLOP ratio"):
            cm.gb_per_pflop(context, 429)
    assert cm.prefill_tokens_per_s(0, 429) > 0 and cm.gb_per_pflop(0, 429) == 0


def test_fit_is_nonnegative():
    cm = CostModel("ds27b", "cpu")
    # times that do not grow with attention: its coefficient must come out 0, not negative
    meas = [PrefillMeasurement(((c, 100),), 0.01) for c in (0, 10_000, 50_000, 100_000)]
    meas += [PrefillMeasurement(((0, b),), 0.01 + 1e-5 * b) for b in (50, 400, 1600)]
    pre, _ = cm.fit(meas)
    assert pre.s_per_attention_flop >= 0 and pre.s_per_linear_flop >= 0 and pre.overhead_s >= 0


def test_hardware_registry_and_validation():
    assert {"h800", "h100", "h200", "cpu"} <= set(HARDWARE.names())
    h = HARDWARE.get("h800")
    assert h.snic_bandwidth == pytest.approx(50e9) and h.cnic_bandwidth == pytest.approx(50e9) and h.gpus_per_node == 8
    assert HARDWARE.get("h200").hbm_bytes > HARDWARE.get("h100").hbm_bytes
    with pytest.raises(ValueError, match="must be >= 0"):
        HardwareProfile("bad", -1, 1, 1, 1, 1, 1, 1, 1)
    with pytest.raises(KeyError, match="known: cpu"):
        HARDWARE.get("tpu")


def test_model_shape_validation():
    with pytest.raises(ValueError, match="top_k"):
        ModelShape(
            "bad",
            layers=2,
            hidden=8,
            heads=2,
            kv_heads=2,
            head_dim=4,
            intermediate=16,
            vocab=10,
            n_routed_experts=4,
            top_k=5,
            moe_intermediate=8,
        )
    with pytest.raises(ValueError, match=">= 0"):
        ModelShape("bad", layers=2, hidden=8, heads=2, kv_heads=-1, head_dim=4, intermediate=16, vocab=10)


def test_hardware_shape_and_degrees_reject_nan_and_zero_rates():
    """NaN passed the `v < 0` checks (a float ModelShape field skipped its check); a zero rate or zero KV bytes
    was a ZeroDivisionError deep in the cost model or α (or an α of 1 token, silently)."""
    with pytest.raises(ValueError, match="peak_flops must be >= 0, got nan"):
        HardwareProfile("bad", float("nan"), 1, 1, 1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="peak_flops must be > 0"):
        HardwareProfile("bad", 0, 1, 1, 1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="snic_bandwidth must be > 0"):
        HardwareProfile("bad", 1, 1, 1, 1, 0, 1, 1, 1)
    with pytest.raises(ValueError, match="tp and ep must be >= 1"):
        CostModel("ds27b", "h800", tp=float("nan"))
    with pytest.raises(ValueError, match="hidden must be >= 0, got nan"):
        ModelShape("bad", layers=2, hidden=float("nan"), heads=2, kv_heads=2, head_dim=4, intermediate=16, vocab=10)
    with pytest.raises(ValueError, match="KV bytes per token per layer must be > 0"):
        ModelShape("bad", layers=2, hidden=8, heads=2, kv_heads=0, head_dim=4, intermediate=16, vocab=10)


class _ReferenceCost:
    """The cost model's formulas as they were before the constants were precomputed and the decode steps
    memoized, evaluated from the ModelShape properties on every call: the new code must match it bit for bit."""

    def __init__(self, model, hw, tp=1, ep=1, prefill_fit=None, decode_fit=None):
        self.model, self.hw, self.tp, self.ep = model, hw, tp, ep
        self.prefill_fit, self.decode_fit = prefill_fit, decode_fit

    def kv_bytes(self, tokens):
        return tokens * self.model.kv_bytes_per_token

    def weight_bytes_per_engine(self, batch_size=None):
        m = self.model
        routed = m.routed_expert_params
        dense = m.total_params - routed - (0 if m.tied_embeddings else m.vocab * m.hidden)
        touched = 1.0
        if batch_size is not None and m.is_moe:
            touched = 1.0 - (1.0 - m.top_k / m.n_routed_experts) ** (max(batch_size, 0) * self.ep)
        return (dense / self.tp + touched * routed / (self.ep * self.tp)) * m.weight_bytes

    def linear_flops(self, tokens, requests=1):
        m = self.model
        return (2.0 * m.active_params_per_token * tokens + 2.0 * m.lm_head_params * requests) / self.tp

    def attention_flops(self, cached, bsz):
        m = self.model
        if bsz <= 0:
            return 0.0
        if m.index_topk:
            main = _sparse_pairs(cached, bsz, m.index_topk)
            idx = attention_pairs(cached, bsz)
        else:
            main, idx = attention_pairs(cached, bsz), 0
        return m.layers * (main * m.attention_flops_per_pair + idx * m.indexer_flops_per_pair) / self.tp

    def attention_time(self, cached, bsz):
        flops = self.attention_flops(cached, bsz)
        if self.prefill_fit:
            f = self.prefill_fit
            return flops * f.s_per_attention_flop + self.kv_bytes(cached + bsz) * f.s_per_byte
        return flops / (self.hw.peak_flops * self.hw.attention_efficiency)

    def batch_prefill_time(self, items):
        items = [(c, b) for c, b in items if b > 0]
        if not items:
            return 0.0
        tokens = sum(b for _, b in items)
        flops = self.linear_flops(tokens, requests=len(items))
        if self.prefill_fit:
            lin = flops * self.prefill_fit.s_per_linear_flop
        else:
            lin = flops / (self.hw.linear_peak(self.model.weight_bytes) * self.hw.mfu)
        attn = sum(self.attention_time(c, b) for c, b in items)
        overhead = self.prefill_fit.overhead_s if self.prefill_fit else self.hw.step_overhead_s
        return overhead + lin + attn

    def decode_kv_bytes(self, batch_size, total_context_tokens):
        m = self.model
        if not (m.index_topk and m.index_kv_bytes_per_token_per_layer) or batch_size <= 0:
            return self.kv_bytes(total_context_tokens) / self.tp
        main = m.kv_bytes_per_token_per_layer - m.index_kv_bytes_per_token_per_layer
        selected = batch_size * min(total_context_tokens / batch_size, m.index_topk)
        return m.layers * (total_context_tokens * m.index_kv_bytes_per_token_per_layer + selected * main) / self.tp

    def decode_terms(self, batch_size, total_context_tokens):
        m = self.model
        lin = self.linear_flops(batch_size, requests=batch_size)
        if m.index_topk:
            main_pairs = batch_size * min(total_context_tokens / batch_size, m.index_topk)
            attn = m.layers * (
                main_pairs * m.attention_flops_per_pair + total_context_tokens * m.indexer_flops_per_pair
            )
        else:
            attn = m.layers * total_context_tokens * m.attention_flops_per_pair
        nbytes = self.weight_bytes_per_engine(batch_size) + self.decode_kv_bytes(batch_size, total_context_tokens)
        return lin, attn / self.tp, nbytes

    def decode_step_time(self, batch_size, total_context_tokens):
        if batch_size <= 0:
            return 0.0
        m = self.model
        lin, attn, nbytes = self.decode_terms(batch_size, total_context_tokens)
        if self.decode_fit:
            f = self.decode_fit
            return f.overhead_s + lin * f.s_per_linear_flop + attn * f.s_per_attention_flop + nbytes * f.s_per_byte
        compute = lin / (self.hw.linear_peak(m.weight_bytes) * self.hw.mfu) + attn / (
            self.hw.peak_flops * self.hw.attention_efficiency
        )
        memory = nbytes / (self.hw.hbm_bandwidth * self.hw.hbm_efficiency)
        return self.hw.step_overhead_s + max(compute, memory)


_FIT = FitCoefficients(overhead_s=0.003, s_per_linear_flop=1.3e-15, s_per_attention_flop=2.7e-15, s_per_byte=1.1e-12)


@pytest.mark.parametrize("name", ["ds660b", "ds27b", "qwen2.5-32b"])
@pytest.mark.parametrize("hw", ["h800", "cpu"])
@pytest.mark.parametrize("tp,ep,fit", [(1, 1, None), (1, 16, None), (2, 32, _FIT), (3, 768, None), (1, 7, _FIT)])
def test_times_bit_identical_to_reference_formulas(name, hw, tp, ep, fit):
    """Precomputed constants and memos change no returned value: exact float equality on random inputs."""
    cm = CostModel(name, hw, tp=tp, ep=ep, prefill_fit=fit, decode_fit=fit)
    ref = _ReferenceCost(MODEL_SHAPES.get(name), HARDWARE.get(hw), tp, ep, fit, fit)
    cm.MEMO_MAX = 64  # small memos: the clearing path runs too
    rng = np.random.default_rng(hash((name, hw, tp, ep)) % 2**32)
    for _ in range(150):
        cached = int(rng.choice([0, 1, rng.integers(0, 3000), rng.integers(0, 200_000)]))
        bsz = int(rng.choice([0, 1, 2, rng.integers(-2, 5000)]))
        assert cm.attention_flops(cached, bsz) == ref.attention_flops(cached, bsz)
        assert cm.attention_time(cached, bsz) == ref.attention_time(cached, bsz)
        assert cm.prefill_time(cached, bsz) == ref.batch_prefill_time([(cached, bsz)])
        assert cm.linear_flops(bsz, cached) == ref.linear_flops(bsz, cached)
        items = [(int(rng.integers(0, 100_000)), int(rng.integers(-1, 3000))) for _ in range(rng.integers(0, 6))]
        assert cm.batch_prefill_time(items) == ref.batch_prefill_time(items)
        # decode: few batch sizes and repeated contexts, so the memos hit as in the simulator
        n = int(rng.choice([0, 1, rng.integers(1, 10), rng.integers(1, 600)]))
        ctx = int(rng.choice([0, 12_345, rng.integers(0, 10**6), rng.integers(0, 10**8)]))
        want = ref.decode_step_time(n, ctx)
        assert cm.decode_step_time(n, ctx) == want and cm.decode_step_time(n, ctx) == want
        assert cm.decode_kv_bytes(n, ctx) == ref.decode_kv_bytes(n, ctx)
        assert cm.weight_bytes_per_engine(n) == ref.weight_bytes_per_engine(n)
        if n > 0:
            assert cm.decode_terms(n, ctx) == ref.decode_terms(n, ctx)
        # non-int inputs skip the memos and give the formulas' own values
        assert cm.decode_step_time(n, ctx + 0.5) == ref.decode_step_time(n, ctx + 0.5)
        assert cm.decode_step_time(np.int64(n), ctx) == ref.decode_step_time(np.int64(n), ctx)
    assert cm.weight_bytes_per_engine() == ref.weight_bytes_per_engine()
    assert cm.gb_per_pflop(16_000, 429) == (ref.kv_bytes(16_000) / 1e9) / (
        (ref.linear_flops(429) + ref.attention_flops(16_000, 429)) / 1e15
    )
    assert len(cm._decode_memo) <= 64 and len(cm._decode_by_batch) <= 64


def test_cost_model_parameters_are_read_only():
    """The precomputed constants derive from model/hw/tp/ep/fits: changing one afterwards must fail loudly."""
    cm = CostModel("ds27b", "h800", ep=8)
    for attr, value in [("tp", 2), ("ep", 1), ("model", MODEL_SHAPES.get("ds660b")), ("hw", HARDWARE.get("cpu"))]:
        with pytest.raises(AttributeError):
            setattr(cm, attr, value)
    with pytest.raises(AttributeError):
        cm.decode_fit = _FIT
    assert cm.ep == 8 and cm.model.name == "ds27b" and cm.hw.name == "h800" and cm.prefill_fit is None


def test_measure_cpu_profile_reports_this_hosts_gemm_and_copy_rates():
    """`python -m schedulers.hardware` measures the host (numpy GEMM FLOP/s, copy bandwidth) beside the registered
    cpu profile; the measurement itself returns positive rates of a sane magnitude."""
    import subprocess
    import sys

    from schedulers.hardware import measure_cpu_profile

    m = measure_cpu_profile(repeats=1)
    assert 1e8 < m["peak_flops"] < 1e15 and 1e8 < m["mem_bandwidth"] < 1e13
    out = subprocess.run([sys.executable, "-m", "schedulers.hardware"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cpu GEMM:" in out.stdout and "registered cpu profile:" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "schedulers.hardware", "--gpu=h100"], capture_output=True, text=True)
    assert bad.returncode != 0 and "takes no arguments" in bad.stderr  # refused, not ignored


_GOOD_HW = dict(
    name="ok",
    peak_flops=1e12,
    hbm_bandwidth=1e12,
    hbm_bytes=1e9,
    cnic_bandwidth=1e9,
    snic_bandwidth=1e9,
    gpus_per_node=8,
    host_mem_bandwidth=1e11,
    host_buffer_bytes=1e9,
)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("gpus_per_node", math.inf, "gpus_per_node must be finite, got inf"),
        ("gpus_per_node", 2.5, "gpus_per_node must be a whole number >= 1, got 2.5"),
        ("gpus_per_node", float("nan"), "gpus_per_node must be >= 0, got nan"),
        ("gpus_per_node", True, "gpus_per_node must be a number, got True"),
        ("peak_flops", math.inf, "peak_flops must be finite, got inf"),
        ("host_buffer_bytes", math.inf, "host_buffer_bytes must be finite, got inf"),
        ("snic_bandwidth", "50e9", "snic_bandwidth must be a number, got '50e9'"),
        ("step_overhead_s", None, "step_overhead_s must be a number, got None"),
        ("name", "", "name must be a non-empty string"),
    ],
)
def test_hardware_profile_refuses_infinite_fractional_and_non_numeric_fields(field, value, match):
    """inf passed the `>= 0` checks (an infinite GPU count or peak made times 0), a fractional GPU count was taken,
    and a string or None skipped the checks altogether (a TypeError later, in the middle of a simulation)."""
    with pytest.raises(ValueError, match=match):
        HardwareProfile(**{**_GOOD_HW, field: value})


def test_hardware_profile_takes_an_integral_float_gpu_count_as_an_int():
    hw = HardwareProfile(**{**_GOOD_HW, "gpus_per_node": 8.0})
    assert hw.gpus_per_node == 8 and isinstance(hw.gpus_per_node, int)


@pytest.mark.parametrize("kw", [{"tp": math.inf}, {"ep": math.inf}, {"tp": 1.5}, {"ep": 2.5}, {"tp": True}])
def test_cost_model_refuses_infinite_and_fractional_degrees(kw):
    """tp=inf made every engine's weights 0 bytes, tp=1.5 split them into 1.5 shares, silently."""
    with pytest.raises(ValueError, match="tp and ep must be >= 1"):
        CostModel("ds27b", "h800", **kw)


def test_cost_model_refuses_a_hardware_or_model_of_another_type():
    with pytest.raises(TypeError, match="hw must be a HardwareProfile"):
        CostModel("ds27b", 3)
    with pytest.raises(TypeError, match="model must be a ModelShape"):
        CostModel(3, "h800")
