"""PAPER.md's bottleneck-free P/D range."""

from __future__ import annotations

import pathlib
import subprocess
import sys
from fractions import Fraction

import pytest

from schedulers.pd_bounds import as_fraction, binding_constraints, pd_ratio_bounds, pd_ratio_range

REPO = pathlib.Path(__file__).resolve().parents[1]  # run the CLIs from the repo root


def test_paper_example_1_7_to_7_2():
    lo, hi = pd_ratio_bounds(8, 1, 50e9, 500e9)
    assert as_fraction(lo) == Fraction(1, 7) and as_fraction(hi) == Fraction(7, 2)
    low, up = binding_constraints(8, 1, 50e9, 500e9)
    assert low == ["pe_cnic_in"] and set(up) == {"de_cnic_in", "de_host_mem"}


def test_pd_ratio_range_by_memory_ratio():
    assert pd_ratio_range(8, 1, 10.0) == pytest.approx(pd_ratio_bounds(8, 1, 50e9, 500e9))
    assert pd_ratio_range(8, 2, 5.0) == pytest.approx(pd_ratio_bounds(8, 2, 50e9, 500e9))


def test_host_memory_binds_when_scarce():
    lo, hi = pd_ratio_bounds(8, 2, 50e9, 500e9)  # M/(B s) = 5 -> (5 - 3)/2 = 1
    assert lo == pytest.approx(2 / 6) and hi == pytest.approx(1.0)
    assert binding_constraints(8, 2, 50e9, 500e9)[1] == ["de_host_mem"]
    # with plenty of host bandwidth the CNIC constraints bind
    assert pd_ratio_bounds(8, 1, 50e9, 5e12)[1] == pytest.approx(3.5)


def test_infeasible_and_bad_input():
    lo, hi = pd_ratio_bounds(8, 1, 50e9, 160e9)  # M/(B s) = 3.2 -> hi = 0.1 < 1/7
    assert lo > hi
    with pytest.raises(ValueError, match="s <= g/2"):
        pd_ratio_bounds(8, 5, 50e9, 500e9)
    with pytest.raises(ValueError, match="must be > 0"):
        pd_ratio_bounds(8, 1, 0, 500e9)
    nan = float("nan")  # passed the `<= 0` checks and gave (nan, nan)
    with pytest.raises(ValueError, match="must be > 0"):
        pd_ratio_bounds(8, nan, 50e9, 500e9)
    with pytest.raises(ValueError, match="must be > 0"):
        pd_ratio_bounds(8, 1, 50e9, nan)
    with pytest.raises(ValueError, match="g \\(GPUs per node\\) must be >= 1"):
        pd_ratio_bounds(nan, 1, 50e9, 500e9)
    with pytest.raises(ValueError, match="mem_over_bs"):
        pd_ratio_range(8, 1, nan)


def test_cli_prints_range():
    out = subprocess.run(
        [sys.executable, "-m", "experiments.pd_bounds"], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert "1/7 (0.1429) ... 7/2 (3.5000)" in out.stdout and "binding: lower pe_cnic_in" in out.stdout


@pytest.mark.parametrize(
    "args,match",
    [
        ((float("inf"), 1, 50e9, 500e9), "g \\(GPUs per node\\) must be >= 1 and a whole number, got inf"),
        ((8.5, 1, 50e9, 500e9), "g \\(GPUs per node\\) must be >= 1 and a whole number, got 8.5"),
        ((True, 0.5, 50e9, 500e9), "g \\(GPUs per node\\) must be >= 1 and a whole number, got True"),
        (("8", 1, 50e9, 500e9), "g \\(GPUs per node\\) must be >= 1 and a whole number, got '8'"),
        ((8, float("inf"), 50e9, 500e9), "s \\(SNIC bandwidth / CNIC bandwidth\\) must be > 0 and finite, got inf"),
        ((8, 1, float("inf"), 500e9), "B \\(CNIC bandwidth\\) must be > 0 and finite, got inf"),
        ((8, 1, 50e9, float("inf")), "M \\(host memory bandwidth\\) must be > 0 and finite, got inf"),
        ((8, "1", 50e9, 500e9), "s \\(SNIC bandwidth / CNIC bandwidth\\) must be > 0 and finite, got '1'"),
    ],
)
def test_infinite_fractional_and_non_numeric_inputs_are_refused(args, match):
    """An infinite or fractional GPU count, an infinite bandwidth or a string was taken: g=inf gave the range
    [0, inf], g=8.5 a range for half a GPU, B=inf an upper bound of -1.5 (no range, no word why), M=inf an upper
    bound of inf (and `as_fraction` then an OverflowError), a string a TypeError from a comparison."""
    with pytest.raises(ValueError, match=match):
        pd_ratio_bounds(*args)
    with pytest.raises(ValueError, match=match):
        binding_constraints(*args)


def test_integral_float_gpu_count_is_taken():
    assert pd_ratio_bounds(8.0, 1, 50e9, 500e9) == pd_ratio_bounds(8, 1, 50e9, 500e9)


def test_pd_ratio_range_refuses_infinite_inputs():
    with pytest.raises(ValueError, match="mem_over_bs = M/\\(B\\*s\\) must be > 0 and finite, got inf"):
        pd_ratio_range(8, 1, float("inf"))
    with pytest.raises(ValueError, match="g \\(GPUs per node\\) must be >= 1 and a whole number, got 2.5"):
        pd_ratio_range(2.5, 1, 10.0)


@pytest.mark.parametrize("rel_tol", [float("nan"), -1e-9, float("inf")])
def test_binding_constraints_refuses_a_tolerance_that_matches_nothing_or_everything(rel_tol):
    """A NaN or negative tolerance matched no constraint (empty lists, no reason); inf matched them all."""
    with pytest.raises(ValueError, match="rel_tol must be a finite number >= 0"):
        binding_constraints(8, 1.0, 50.0, 500.0, rel_tol=rel_tol)
