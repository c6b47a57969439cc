"""Cost-model calibration on real (NumPy) prefill forwards of this CPU."""

from __future__ import annotations

import numpy as np
import pytest

from schedulers.calibrate import TINY_DENSE, NumpyPrefill, default_grid, fit_report, time_decode, time_prefill
from schedulers.cost_model import CostModel, ModelShape, PrefillMeasurement

SMALL = ModelShape("small", layers=1, hidden=128, heads=4, kv_heads=2, head_dim=32, intermediate=256, vocab=512)


def test_numpy_prefill_runs_real_forward_and_fit_is_usable():
    step = NumpyPrefill(SMALL, max_context=1024)
    out = step(((0, 8), (512, 4)))
    assert out.shape == (2, SMALL.vocab) and np.isfinite(out).all()
    grid = [((c, b),) for c in (0, 256, 1024) for b in (8, 64)] + [((128, 16), (512, 32))]
    meas = time_prefill(step, grid, repeats=2)
    assert [m.items for m in meas] == [tuple(g) for g in grid] and all(m.seconds > 0 for m in meas)
    cm = CostModel.from_fit(SMALL, "cpu", meas)
    c = cm.prefill_fit
    assert min(c.overhead_s, c.s_per_linear_flop, c.s_per_attention_flop, c.s_per_byte) >= 0
    assert cm.prefill_time(1024, 64) > 0 and cm.attention_time(1024, 64) >= cm.attention_time(0, 64)
    rep = fit_report(cm, meas)
    assert rep.n == len(meas) and rep.max_rel_error >= rep.median_rel_error >= 0
    with pytest.raises(ValueError, match="exceeds the calibration cache"):
        step(((2048, 1),))
    with pytest.raises(ValueError, match="dense GQA only"):
        NumpyPrefill(CostModel("ds27b", "cpu").model, 16)


def test_numpy_prefill_refuses_negative_cached_and_empty_items():
    """A negative cached sliced the cache from its end and a bsz of 0 or less had no last position: numpy errors
    about broadcasting, zero-size reductions or negative dimensions."""
    step = NumpyPrefill(SMALL, max_context=64)
    for item in ((-5, 8), (0, 0), (0, -3)):
        with pytest.raises(ValueError, match=r"NumpyPrefill item \(cached=-?\d+, bsz=-?\d+\): needs cached >= 0"):
            step(((0, 4), item))
    assert step(((64, 1),)).shape == (1, SMALL.vocab)


def test_time_decode_measures_each_pair():
    calls = []

    def step(b, ctx):
        calls.append((b, ctx))
        return np.ones((b, 64)) @ np.ones((64, 64))

    meas = time_decode(step, [(1, 100), (4, 400)], repeats=2, warmup=1)
    assert [(m.batch_size, m.total_context_tokens) for m in meas] == [(1, 100), (4, 400)]
    assert len(calls) == 6 and all(m.seconds > 0 for m in meas)


@pytest.mark.slow
def test_fit_predicts_held_out_forwards():
    """Fitted on this CPU, held-out forwards are predicted within 50% (median); run with
    OPENBLAS_NUM_THREADS=1 on a shared machine (multi-threaded BLAS under contention is erratic)."""
    step = NumpyPrefill(TINY_DENSE, max_context=4096)
    fit_grid, held = default_grid(4096)
    fitted = CostModel.from_fit(TINY_DENSE, "cpu", time_prefill(step, fit_grid, repeats=5))
    held_m = time_prefill(step, held, repeats=5)
    assert fit_report(fitted, held_m).median_rel_error < 0.5


# The launcher's main() as `python -m schedulers.calibrate` runs it (a fresh process, its flags and app.run), with its
# TINY_DENSE made SMALL's size: the same grid of forwards in ~1/10 of the time (the launcher has no flag for a shape).
_SMALL_LAUNCHER = """
import dataclasses, sys
import schedulers.calibrate as calibrate
sizes = {k: int(v) for k, v in (a.split("=") for a in sys.argv[1:])}
calibrate.TINY_DENSE = dataclasses.replace(calibrate.TINY_DENSE, **sizes)
sys.argv = ["calibrate", "--repeats=1"]
calibrate.main()
"""


def test_calibrate_launcher_runs():
    """The calibrate launcher end to end (its main() in a fresh process): NumPy forwards timed, a fit printed with the
    held-out batches (measured, fitted and analytic times) and the error summary."""
    import subprocess
    import sys

    sizes = ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab")
    small = [f"{k}={getattr(SMALL, k)}" for k in sizes]
    out = subprocess.run([sys.executable, "-c", _SMALL_LAUNCHER, *small], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "NumPy forwards of tiny-dense" in out.stdout and "fit: overhead" in out.stdout
    held = [line for line in out.stdout.splitlines() if line.startswith("[(")]
    assert len(held) == 5 and all(len(line.split()) >= 3 for line in held)
    assert "median / max relative error: fitted" in out.stdout


def test_fit_report_rejects_a_zero_measured_time():
    """The relative error divides by the measured seconds: 0 was a bare ZeroDivisionError."""
    cm = CostModel(SMALL, "cpu")
    good = PrefillMeasurement(((0, 8),), 0.01)
    assert fit_report(cm, [good]).n == 1
    with pytest.raises(ValueError, match="seconds > 0"):
        fit_report(cm, [good, PrefillMeasurement(((0, 8),), 0.0)])
    for seconds in (float("inf"), float("nan")):  # inf made every relative error NaN, silently
        with pytest.raises(ValueError, match="finite measured seconds > 0"):
            fit_report(cm, [good, PrefillMeasurement(((0, 8),), seconds)])
