"""Print the bottleneck-free P/D range of PAPER.md for a node shape (and the constraint that binds).

python -m experiments.pd_bounds                       # g=8, s=1, B=50 GB/s, M=500 GB/s: 1/7 ... 7/2
python -m experiments.pd_bounds --g=8 --s=2 --M_GBps=400
python -m experiments.pd_bounds --config=configs/paper_ds27b.py:pd=1P2D   # g, s, B, M of a simulator config; its P/D
"""

from __future__ import annotations

import math

from absl import app, flags

from schedulers.pd_bounds import as_fraction, binding_constraints, pd_ratio_bounds, pd_ratio_constraints

FLAGS = flags.DEFINE_integer("g", 8, "GPUs (engines) per node", lower_bound=1)
flags.DEFINE_float("s", 1.0, "SNIC bandwidth per node as a multiple of one CNIC's bandwidth B")
flags.DEFINE_float("B_GBps", 50.0, "CNIC bandwidth per GPU, GB/s (400 Gbps = 50)")
flags.DEFINE_float("M_GBps", 500.0, "host memory bandwidth per node, GB/s")
_CONFIG = flags.DEFINE_string(
    "config",
    None,
    "A simulator config file[:variant] (configs/*.py, variant items as configs/sim_base.py's): g, s, B and M from its "
    "cluster (gpus_per_node, snic_gbps / cnic_gbps, cnic_gbps, dram_gbps), and where its own P/D falls.",
)
_NODE_FLAGS = ("g", "s", "B_GBps", "M_GBps")
for _name in ("s", "B_GBps", "M_GBps"):  # (inf passed `> 0` and ended in an OverflowError traceback; NaN failed it)
    # in bytes/s too: --M_GBps=1e300 is inf bytes/s (a ValueError traceback)
    flags.register_validator(_name, lambda v: 0 < v * 1e9 < math.inf, message=f"--{_name} must be > 0 and finite")
flags.register_multi_flags_validator(
    ["g", "s"], lambda f: 2 * f["s"] <= f["g"], message="--s must be <= g/2 (the PE-CNIC read constraint 2s/g <= 1)"
)


def _bounds_finite(f) -> bool:
    """g/s and M/(B*s) (the bounds scale with them) within the float range: each flag passed its own check, but
    --s=1e-310 made g/s inf (an as_fraction ValueError traceback) and --B_GBps=1e-300 --s=1e-300 a B*s of 0 (a
    ZeroDivisionError)."""
    bs = f["B_GBps"] * 1e9 * f["s"]
    try:
        return bs > 0 and math.isfinite(f["g"] / f["s"]) and math.isfinite(f["M_GBps"] * 1e9 / bs)
    except OverflowError:  # a g of 400 digits is no float (an OverflowError traceback)
        return False


flags.register_multi_flags_validator(
    ["g", "s", "B_GBps", "M_GBps"],
    _bounds_finite,
    message="--g, --s, --B_GBps and --M_GBps give bounds beyond the float range (g/s or M/(B*s) is infinite)",
)


def _ratio(x: float) -> str:
    """A bound as the fraction it is (1/7, 7/2), else to 4 significant digits: a bound of 1e10 was printed as a
    300-digit integer (as_fraction of --M_GBps=1e299), one of 1e-5 as 0."""
    f = as_fraction(x)
    return str(f) if abs(x) < 1e6 and abs(float(f) - x) <= 1e-9 * abs(x) else f"{x:.4g}"


def _of_config(spec: str):
    """(g, s, B GB/s, M GB/s, P, D) of the simulator config `spec`'s cluster; SystemExit with one line for a bad one."""
    from dualpath_jax.sim import load_sim_config

    try:
        c = load_sim_config(spec).cluster
    except (OSError, ValueError, KeyError) as e:  # a missing file, a bad variant or field: one line naming it
        raise SystemExit(f"bad --config: {e.args[0] if e.args else e}") from None
    return c.gpus_per_node, c.snic_gbps / c.cnic_gbps, c.cnic_gbps, c.dram_gbps, c.prefill_nodes, c.decode_nodes


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unknown arguments: {argv[1:]}")
    f = flags.FLAGS
    g, s, B_GBps, M_GBps, pd = f.g, f.s, f.B_GBps, f.M_GBps, None
    if f["config"].present and not (_CONFIG.value or "").strip():
        # (`--config=$CFG` with CFG unset printed the default node's range as if it were the config's)
        raise SystemExit("bad --config: it is empty (give a config file[:variant], or leave --config out)")
    if _CONFIG.value:
        given = [f"--{name}" for name in _NODE_FLAGS if f[name].present]
        if given:  # two sources of one figure (one line: a UsageError printed the whole --help above it)
            raise SystemExit(f"bad flags: --config takes g, s, B and M from the config: leave out {', '.join(given)}")
        g, s, B_GBps, M_GBps, P, D = _of_config(_CONFIG.value)
        pd = (P, D)
        print(f"config {_CONFIG.value}: {P}P{D}D")
    B, M = B_GBps * 1e9, M_GBps * 1e9
    print(f"g={g}  s={s:g}  B={B_GBps:g} GB/s  M={M_GBps:g} GB/s  M/(B*s)={M / (B * s):g}")
    try:
        cs = pd_ratio_constraints(g, s, B, M)
    except ValueError as e:  # a config's s > g/2 (the flags' validators refuse it for --g / --s)
        raise SystemExit(f"bad --config: {e}") from None
    print(f"{'constraint':<14}{'bound':<7}{'P/D':>10}  why")
    for c in cs:
        op = ">=" if c.kind == "lower" else "<="
        print(f"{c.name:<14}{op:<7}{_ratio(c.value):>10}  {c.why}")
    lo, hi = pd_ratio_bounds(g, s, B, M)
    low, up = binding_constraints(g, s, B, M)
    verdict = "feasible" if lo <= hi else "EMPTY: no P/D ratio is bottleneck-free"
    print(f"P/D range: {_ratio(lo)} ({lo:.4f}) ... {_ratio(hi)} ({hi:.4f})  [{verdict}]")
    print(f"binding: lower {', '.join(low)}; upper {', '.join(up)}")
    if pd is not None:
        P, D = pd
        r = P / D
        if r < lo:
            where = f"below the range ({', '.join(low)} binds)"
        elif r > hi:
            where = f"above the range ({', '.join(up)} bind{'s' if len(up) == 1 else ''})"
        else:
            where = "inside the range"
        print(f"config P/D: {P}P{D}D = {_ratio(r)} ({r:.4f}): {where}")


def _parse_flags(argv):
    """absl's flag parser (`app.parse_flags_with_usage`), with a `--config.NAME=value` override (simulate's style) as
    one line saying how to give it here, where --config is a file[:variant] string: absl said only "Unknown command
    line flag 'config.cluster.x'"."""
    for arg in argv[1:]:
        if arg == "--":
            break
        if arg.startswith("--config."):
            name = arg[2:].split("=", 1)[0]
            raise SystemExit(
                f"bad --{name}: pd_bounds takes no --config.* overrides (it reads the config's cluster); give a "
                "cluster field as a variant item, e.g. --config=configs/paper_ds27b.py:cluster.gpus_per_node=4"
            )
    return app.parse_flags_with_usage(argv)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
