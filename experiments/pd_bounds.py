"""Print the bottleneck-free P/D range of PAPER.md for a node shape (and the constraint that binds).

python -m experiments.pd_bounds                       # g=8, s=1, B=50 GB/s, M=500 GB/s: 1/7 ... 7/2
python -m experiments.pd_bounds --g=8 --s=2 --M_GBps=400
"""

from __future__ import annotations

import math

from absl import app, flags

from schedulers.pd_bounds import as_fraction, binding_constraints, pd_ratio_bounds, pd_ratio_constraints

FLAGS = flags.DEFINE_integer("g", 8, "GPUs (engines) per node", lower_bound=1)
flags.DEFINE_float("s", 1.0, "SNIC bandwidth per node as a multiple of one CNIC's bandwidth B")
flags.DEFINE_float("B_GBps", 50.0, "CNIC bandwidth per GPU, GB/s (400 Gbps = 50)")
flags.DEFINE_float("M_GBps", 500.0, "host memory bandwidth per node, GB/s")
for _name in ("s", "B_GBps", "M_GBps"):  # (inf passed `> 0` and ended in an OverflowError traceback; NaN failed it)
    # in bytes/s too: --M_GBps=1e300 is inf bytes/s (a ValueError traceback)
    flags.register_validator(_name, lambda v: 0 < v * 1e9 < math.inf, message=f"--{_name} must be > 0 and finite")
flags.register_multi_flags_validator(
    ["g", "s"], lambda f: 2 * f["s"] <= f["g"], message="--s must be <= g/2 (the PE-CNIC read constraint 2s/g <= 1)"
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unknown arguments: {argv[1:]}")
    f = flags.FLAGS
    g, s, B, M = f.g, f.s, f.B_GBps * 1e9, f.M_GBps * 1e9
    print(f"g={g}  s={s:g}  B={f.B_GBps:g} GB/s  M={f.M_GBps:g} GB/s  M/(B*s)={M / (B * s):g}")
    print(f"{'constraint':<14}{'bound':<7}{'P/D':>10}  why")
    for c in pd_ratio_constraints(g, s, B, M):
        op = ">=" if c.kind == "lower" else "<="
        print(f"{c.name:<14}{op:<7}{as_fraction(c.value)!s:>10}  {c.why}")
    lo, hi = pd_ratio_bounds(g, s, B, M)
    low, up = binding_constraints(g, s, B, M)
    verdict = "feasible" if lo <= hi else "EMPTY: no P/D ratio is bottleneck-free"
    print(f"P/D range: {as_fraction(lo)} ({lo:.4f}) ... {as_fraction(hi)} ({hi:.4f})  [{verdict}]")
    print(f"binding: lower {', '.join(low)}; upper {', '.join(up)}")


if __name__ == "__main__":
    app.run(main)
