"""Calibrate the cost model on real step times (no jax here: the caller passes the step to time).

    measurements = time_prefill(step, grid)              # step(items) runs one forward (see below)
    cm = CostModel.from_fit(shape, "cpu", measurements)  # least-squares coefficients (see CostModel.fit)
    report = fit_report(cm, held_out)                    # relative errors of the fitted and analytic models

A step may return its result before it is computed (a jitted JAX step: JAX dispatches asynchronously): the timers
wait for it, calling `block_until_ready` on the result, or on its items when it is a tuple, list or dict (a step
timed as returned measured its dispatch: 0.01 ms against 116 ms). `NumpyPrefill` is a plain NumPy
forward of a dense GQA `ModelShape` (projections, causal attention over a cached prefix, SwiGLU MLP, LM
head of the last position) used to calibrate and check the fit on this CPU without jax:

    OPENBLAS_NUM_THREADS=1 python -m schedulers.calibrate   # fit on a grid, held-out errors vs the analytic model

(One BLAS thread: on this shared 2-core machine a 2-thread OpenBLAS GEMM measured 7x slower than one thread
under load, 4.8 vs 34.8 GFLOP/s.)
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from schedulers.cost_model import CostModel, DecodeMeasurement, ModelShape, PrefillMeasurement, prefill_items_ok
from schedulers.registry import describe, is_int

Items = Sequence[tuple[int, int]]


def _computed(result) -> None:
    """Wait until a step's result is computed: `block_until_ready` on it or on its items (tuples, lists, dicts, nested),
    where they have one (JAX arrays; anything else is done when returned)."""
    if hasattr(result, "block_until_ready"):
        result.block_until_ready()
    elif isinstance(result, (tuple, list)):
        for item in result:
            _computed(item)
    elif isinstance(result, dict):
        for item in result.values():
            _computed(item)


def _check_repeats(repeats, warmup) -> None:
    """Timed repeats an int >= 1 and warmup calls an int >= 0 (0 or a negative count of repeats was taken as 1)."""
    if not (is_int(repeats) and repeats >= 1):
        raise ValueError(f"repeats must be an int >= 1, got {describe(repeats)}")
    if not (is_int(warmup) and warmup >= 0):
        raise ValueError(f"warmup must be an int >= 0, got {describe(warmup)}")


def time_prefill(
    step: Callable[[Items], object], grid: Sequence[Items], repeats: int = 3, warmup: int = 1
) -> list[PrefillMeasurement]:
    """Best (min) wall time of `step(items)`, its result computed (`_computed`), over `repeats` for each batch in
    `grid`, after `warmup` untimed calls: on a shared machine the least-disturbed run is the closest to the step's
    own cost."""
    _check_repeats(repeats, warmup)
    grid = [tuple(items) for items in grid]
    for items in grid:  # all checked before any timing
        if not items or not prefill_items_ok(items):  # int() truncated 2.5 tokens to 2 (NaN: a bare int() error)
            raise ValueError(f"time_prefill grid batch {items!r}: needs (cached, bsz) items, finite whole numbers >= 0")
    out = []
    for items in grid:
        items = tuple((int(c), int(b)) for c, b in items)
        for _ in range(warmup):
            _computed(step(items))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            _computed(step(items))
            times.append(time.perf_counter() - t0)
        out.append(PrefillMeasurement(items, min(times)))
    return out


def time_decode(
    step: Callable[[int, int], object], grid: Sequence[tuple[int, int]], repeats: int = 3, warmup: int = 1
) -> list[DecodeMeasurement]:
    """Best (min) wall time of `step(batch_size, total_context_tokens)`, its result computed (`_computed`), for each
    pair in `grid`."""
    _check_repeats(repeats, warmup)
    grid = [(b, ctx) for b, ctx in grid]
    for b, ctx in grid:  # all checked before any timing
        # a fraction was timed as given but recorded truncated (2.5 sequences as 2); NaN a bare int() error late
        if not (1 <= b < math.inf and 0 <= ctx < math.inf and not b % 1 and not ctx % 1):
            raise ValueError(
                f"time_decode grid pair ({b!r}, {ctx!r}): needs batch_size >= 1 and total_context_tokens >= 0, finite "
                "whole numbers"
            )
    out = []
    for b, ctx in grid:
        b, ctx = int(b), int(ctx)  # the step is timed on the very values recorded
        for _ in range(warmup):
            _computed(step(b, ctx))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            _computed(step(b, ctx))
            times.append(time.perf_counter() - t0)
        out.append(DecodeMeasurement(b, ctx, min(times)))
    return out


@dataclasses.dataclass(frozen=True)
class FitReport:
    """Relative errors |predicted − measured| / measured over held-out prefill measurements."""

    median_rel_error: float
    max_rel_error: float
    n: int


def fit_report(cost_model: CostModel, measurements: Sequence[PrefillMeasurement]) -> FitReport:
    if not measurements:
        raise ValueError("fit_report needs at least one measurement")
    bad = [m for m in measurements if not 0 < m.seconds < math.inf]  # relative errors divide by the measured time
    if bad:  # (an inf made every error NaN)
        raise ValueError(f"fit_report needs finite measured seconds > 0, got {bad[0]}")
    # a NaN cached made every error NaN; a NaN, negative or fractional bsz was dropped or predicted as no forward
    bad = [m for m in measurements if not (prefill_items_ok(m.items) and any(b > 0 for _, b in m.items))]
    if bad:
        raise ValueError(
            f"fit_report needs items with cached >= 0 and bsz >= 0 (some > 0), finite whole numbers, got {bad[0]}"
        )
    errs = [abs(cost_model.batch_prefill_time(m.items) - m.seconds) / m.seconds for m in measurements]
    return FitReport(float(np.median(errs)), float(np.max(errs)), len(errs))


class NumpyPrefill:
    """A real NumPy prefill forward of a dense GQA `ModelShape` with random weights and cached KV.

    `__call__(items)` computes, for each (cached, bsz) item and every layer: Q/K/V projections of the bsz
    new tokens, causal attention over cached + new keys (GQA, [kv_heads, tokens, head_dim] cache), the
    output projection and a SwiGLU MLP; then the LM head of the item's last position. FLOPs match
    `CostModel.prefill_flops` (float32), except that attention scores the whole bsz x (cached + bsz) rectangle
    before the causal mask: about bsz²/2 more pairs than the causal count (small where cached >> bsz).
    """

    def __init__(self, shape: ModelShape, max_context: int, seed: int = 0):
        if shape.is_mla or shape.is_moe:
            raise ValueError(f"NumpyPrefill models dense GQA only, got {shape.name} (MLA/MoE)")
        if shape.heads % shape.kv_heads:
            raise ValueError(f"{shape.name}: heads {shape.heads} not a multiple of kv_heads {shape.kv_heads}")
        self.shape = shape
        rng = np.random.default_rng(seed)
        h, d, hq, hk = shape.hidden, shape.head_dim, shape.heads, shape.kv_heads

        def w(*dims):
            return (rng.standard_normal(dims, dtype=np.float32) / np.sqrt(dims[0])).astype(np.float32)

        self.layers = [
            {
                "wq": w(h, hq * d),
                "wk": w(h, hk * d),
                "wv": w(h, hk * d),
                "wo": w(hq * d, h),
                "wg": w(h, shape.intermediate),
                "wu": w(h, shape.intermediate),
                "wd": w(shape.intermediate, h),
            }
            for _ in range(shape.layers)
        ]
        self.lm_head = w(h, shape.vocab)
        # cached KV of one layer, shared by all layers and items (values do not matter, the work does)
        self.k_cache = rng.standard_normal((hk, max_context, d), dtype=np.float32)  # [Hkv, S, Dh]
        self.v_cache = rng.standard_normal((hk, max_context, d), dtype=np.float32)
        self.max_context = max_context
        self.rng = rng

    def _layer(self, p: dict, x: np.ndarray, cached: int) -> np.ndarray:
        s = self.shape
        n, d, hq, hk = x.shape[0], s.head_dim, s.heads, s.kv_heads
        q = (x @ p["wq"]).reshape(n, hq, d).transpose(1, 0, 2)  # [Hq, n, Dh]
        k_new = (x @ p["wk"]).reshape(n, hk, d).transpose(1, 0, 2)  # [Hkv, n, Dh]
        v_new = (x @ p["wv"]).reshape(n, hk, d).transpose(1, 0, 2)
        k = np.concatenate([self.k_cache[:, :cached], k_new], axis=1)  # [Hkv, cached + n, Dh]
        v = np.concatenate([self.v_cache[:, :cached], v_new], axis=1)
        group = hq // hk
        q = q.reshape(hk, group * n, d)  # queries of one KV head together: [Hkv, G*n, Dh]
        scores = (q @ k.transpose(0, 2, 1)) * np.float32(1 / np.sqrt(d))  # [Hkv, G*n, cached + n], float32
        pos = np.tile(np.arange(n), group)[:, None] + cached  # query positions
        scores = np.where(np.arange(cached + n)[None, :] <= pos, scores, np.float32(-np.inf))
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        attn = (scores @ v).reshape(hk, group, n, d).transpose(2, 0, 1, 3).reshape(n, hq * d)  # [n, Hq*Dh]
        x = x + attn @ p["wo"]
        g = x @ p["wg"]
        return x + ((g / (np.float32(1) + np.exp(-g))) * (x @ p["wu"])) @ p["wd"]

    def __call__(self, items: Items) -> np.ndarray:
        for cached, bsz in items:  # all checked before any work
            if cached > self.max_context:
                raise ValueError(f"cached {cached} exceeds the calibration cache ({self.max_context} tokens)")
            if not (cached >= 0 and bsz >= 1):  # were numpy shape errors (a negative cached sliced from the end)
                raise ValueError(f"NumpyPrefill item (cached={cached}, bsz={bsz}): needs cached >= 0 and bsz >= 1")
        logits = []
        for cached, bsz in items:
            x = self.rng.standard_normal((bsz, self.shape.hidden), dtype=np.float32)
            for p in self.layers:
                x = self._layer(p, x, cached)
            logits.append(x[-1] @ self.lm_head)
        return np.stack(logits)


# A small dense GQA model that runs in milliseconds per forward on this CPU.
TINY_DENSE = ModelShape(
    name="tiny-dense",
    layers=2,
    hidden=512,
    heads=8,
    kv_heads=2,
    head_dim=64,
    intermediate=1536,
    vocab=4096,
    kv_dtype_bytes=4,
    weight_bytes=4,
)


def default_grid(
    max_context: int = 4096,
) -> tuple[list[tuple[tuple[int, int], ...]], list[tuple[tuple[int, int], ...]]]:
    """(fit grid, held-out grid) of single- and multi-item batches spanning linear- and attention-heavy, with
    cached contexts up to `max_context` (NumpyPrefill's cache: the grid's contexts are those of 4096, scaled)."""

    def c(x: int) -> int:  # (fixed contexts up to 3072 went past a smaller cache: NumpyPrefill refused them)
        return x * max_context // 4096

    fit = [((cached, b),) for cached in (0, c(512), c(2048), max_context) for b in (16, 64, 256)]
    fit += [((0, 128), (c(1024), 64)), ((c(2048), 32), (c(2048), 32), (0, 256))]
    held = [((cached, b),) for cached, b in ((c(256), 128), (c(1536), 32), (c(3072), 96), (c(768), 512))]
    held += [((c(1024), 64), (c(3000), 16))]
    return fit, held


def main() -> None:
    from absl import app, flags

    flags.DEFINE_integer("repeats", 5, "timed repeats per batch (min)")
    flags.DEFINE_string("hardware", "cpu", "hardware profile of the analytic baseline")
    from schedulers.hardware import HARDWARE

    flags.register_validator(
        "hardware",
        lambda v: v in HARDWARE.names(),
        message=f"--hardware takes a registered profile: {', '.join(sorted(HARDWARE.names()))}",
    )

    def run(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unknown arguments: {argv[1:]}")
        f = flags.FLAGS
        step = NumpyPrefill(TINY_DENSE, max_context=4096)
        fit_grid, held_grid = default_grid(4096)
        t0 = time.perf_counter()
        fit_m = time_prefill(step, fit_grid, repeats=f.repeats)
        held_m = time_prefill(step, held_grid, repeats=f.repeats)
        fitted = CostModel.from_fit(TINY_DENSE, f.hardware, fit_m)
        analytic = CostModel(TINY_DENSE, f.hardware)
        c = fitted.prefill_fit
        print(
            f"measured {len(fit_m)} + {len(held_m)} NumPy forwards of {TINY_DENSE.name} in {time.perf_counter() - t0:.1f} s"
        )
        print(
            f"fit: overhead {c.overhead_s * 1e3:.3f} ms, linear {1 / max(c.s_per_linear_flop, 1e-30) / 1e9:.1f} "
            f"GFLOP/s, attention {1 / max(c.s_per_attention_flop, 1e-30) / 1e9:.1f} GFLOP/s, "
            f"KV read {c.s_per_byte * 1e9:.3f} s/GB"
        )
        print(f"{'held-out batch':<32}{'measured ms':>12}{'fitted ms':>11}{'analytic ms':>13}")
        for m in held_m:
            print(
                f"{list(m.items)!s:<32}{m.seconds * 1e3:>12.2f}{fitted.batch_prefill_time(m.items) * 1e3:>11.2f}"
                f"{analytic.batch_prefill_time(m.items) * 1e3:>13.2f}"
            )
        rf, ra = fit_report(fitted, held_m), fit_report(analytic, held_m)
        print(
            f"median / max relative error: fitted {rf.median_rel_error:.1%} / {rf.max_rel_error:.1%}   "
            f"analytic ({f.hardware} profile) {ra.median_rel_error:.1%} / {ra.max_rel_error:.1%}"
        )

    app.run(run)


if __name__ == "__main__":
    main()
