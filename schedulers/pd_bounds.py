"""The bottleneck-free P/D range of PAPER.md ("Bottleneck-free P/D range"), no jax.

Setting: P prefill nodes, D decode nodes, each with g GPUs, one CNIC of bandwidth B per GPU, one SNIC of
bandwidth s·B per node and host memory bandwidth M. With both SNICs saturated, a PE–DE pair carries
T_p = B·s/(D·g²) over the PE path and T_c = B·s/(P·g²) over the DE path. Per-link constraints:

  pe_cnic_in   P/D >= s/(g−s)        a PE's CNIC takes its node's PE-path reads (H2D goes through the
                                     CNIC) plus the DE-path layer blocks of all D nodes:
                                     s·B/g + D·s·B/(P·g) <= B
  de_cnic      P/D <= (g−2s)/s       the paper's DE-CNIC constraint (as stated in PAPER.md)
  de_cnic_in   P/D <= (g−s)/(2s)     a DE's CNIC takes the PE-path KV sent by the PEs plus the H2D copy
                                     of every prompt: (P·s·B + (P+D)·s·B)/(D·g) <= B
  de_host_mem  P/D <= (M/(B·s)−3)/2  a DE node's DRAM sees SNIC writes (s·B), CNIC reads of DE-path
                                     reads (s·B), PE-path KV writes (P/D·s·B) and the H2D reads of every
                                     prompt ((P+D)/D·s·B): s·B·(3 + 2P/D) <= M
The PE-CNIC read constraint 2s/g ≤ 1 needs s ≤ g/2 (checked).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from fractions import Fraction

from dualpath_jax.checks import is_int, is_real


@dataclasses.dataclass(frozen=True)
class PDConstraint:
    name: str
    kind: str  # "lower" or "upper" bound on P/D
    value: float
    why: str


def check_gpus(g, what: str = "g (GPUs per node)") -> int:
    """`g` as an int >= 1: a whole, finite GPU count (an integral float such as 8.0 is taken; bools, strings, NaN,
    inf and fractions are a `ValueError` naming `what`)."""
    if not is_real(g):
        raise ValueError(f"{what} must be >= 1 and a whole number, got {g!r}")
    if not (math.isfinite(g) and g >= 1 and g == int(g)):  # (NaN fails every comparison)
        raise ValueError(f"{what} must be >= 1 and a whole number, got {g!r}")
    return int(g)


def _check_positive(name: str, value) -> float:
    if not is_real(value) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be > 0 and finite, got {value!r}")
    return float(value)


def pd_ratio_constraints(g: int, s: float, B: float, M: float) -> list[PDConstraint]:
    """Every link constraint on P/D for node size g, SNIC multiple s, CNIC bandwidth B, host bandwidth M.

    g must be a whole number >= 1, s, B and M finite numbers > 0 (`ValueError` naming the argument: an infinite
    or fractional g, an infinite B or M gave bounds of 0, inf or a negative upper bound without a word).
    """
    g = check_gpus(g)
    s = _check_positive("s (SNIC bandwidth / CNIC bandwidth)", s)
    B = _check_positive("B (CNIC bandwidth)", B)
    M = _check_positive("M (host memory bandwidth)", M)
    if 2 * s > g:
        raise ValueError(f"the PE-CNIC read constraint 2s/g <= 1 needs s <= g/2, got s={s} g={g}")
    m = M / (B * s)
    return [
        PDConstraint("pe_cnic_in", "lower", s / (g - s), "PE CNIC inbound: own PE-path reads + DE-path layer blocks"),
        PDConstraint("de_cnic", "upper", (g - 2 * s) / s, "DE CNIC (PAPER.md's (g-2s)/s)"),
        PDConstraint("de_cnic_in", "upper", (g - s) / (2 * s), "DE CNIC inbound: PE-path KV + H2D of every prompt"),
        PDConstraint("de_host_mem", "upper", (m - 3) / 2, "DE host memory: s*B*(3 + 2P/D) <= M"),
    ]


def pd_ratio_bounds(g: int, s: float, B: float, M: float) -> tuple[float, float]:
    """(lo, hi) of the bottleneck-free P/D ratio; lo > hi means no ratio is bottleneck-free."""
    cs = pd_ratio_constraints(g, s, B, M)
    lo = max(c.value for c in cs if c.kind == "lower")
    hi = min(c.value for c in cs if c.kind == "upper")
    return lo, hi


def pd_ratio_range(g: int, s: float, mem_over_bs: float) -> tuple[float, float]:
    """(lo, hi) as `pd_ratio_bounds` with M given as a multiple of the SNIC bandwidth: M/(B·s)."""
    mem_over_bs = _check_positive("mem_over_bs = M/(B*s)", mem_over_bs)
    s = _check_positive("s (SNIC bandwidth / CNIC bandwidth)", s)
    return pd_ratio_bounds(g, s, 1.0, mem_over_bs * s)


def binding_constraints(g: int, s: float, B: float, M: float, rel_tol: float = 1e-9) -> tuple[list[str], list[str]]:
    """Names of the constraints that set the lower and the upper bound (ties: all of them)."""
    # (NaN or a negative tolerance matched nothing: empty lists, no reason; True was a tolerance of 1, a str a
    # TypeError from the comparison)
    if not is_real(rel_tol) or not 0 <= rel_tol < math.inf:
        raise ValueError(f"rel_tol must be a finite number >= 0, got {rel_tol!r}")
    cs = pd_ratio_constraints(g, s, B, M)
    lo, hi = pd_ratio_bounds(g, s, B, M)
    low = [c.name for c in cs if c.kind == "lower" and abs(c.value - lo) <= rel_tol * max(1.0, abs(lo))]
    up = [c.name for c in cs if c.kind == "upper" and abs(c.value - hi) <= rel_tol * max(1.0, abs(hi))]
    return low, up


def as_fraction(x: float, max_den: int = 1000) -> Fraction:
    """`x` as the nearest fraction of denominator <= `max_den` (a bound printed as P/D = 1/7)."""
    # NaN / inf were a bare ValueError / OverflowError of Fraction, True the fraction 1 (or denominator 1)
    if not is_real(x) or not math.isfinite(x):
        raise ValueError(f"as_fraction x must be a finite number, got {x!r}")
    if not is_int(max_den) or max_den < 1:
        raise ValueError(f"as_fraction max_den must be an int >= 1, got {max_den!r}")
    # as Python numbers: Fraction refused np.float32, and np.int64 arithmetic overflowed in limit_denominator
    return Fraction(x if isinstance(x, numbers.Rational) else float(x)).limit_denominator(int(max_den))
