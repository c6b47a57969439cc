"""Run the simulator on the paper's headline experiments and write a report beside the paper's numbers.

  python -m experiments.reproduce_paper --workers=2                       # offline headline + ablation
  python -m experiments.reproduce_paper --online --workers=2              # + online capacity (slow)
  python -m experiments.reproduce_paper --table=512,1024 --workers=2      # + rows of the DS 660B table
  python -m experiments.reproduce_paper --online --online_dataset=48K     # online probes on another dataset
  python -m experiments.reproduce_paper --extra=cluster.store_capacity_gb=500 --output_dir=results/reproduce_store500

With --table the report ends with the calibration's loss: the root mean square of ln(sim/paper) per
column and over all cells run (configs/sim_base.py CALIBRATED was fitted on it).

Writes <output_dir>/report.md and report.json: each metric with the paper's value (PAPER.md), the
simulator's, and sim/paper; and run.json: what ran (dualpath_jax.metrics.run_info). An --output_dir that holds an
earlier report.md / report.json is refused unless --overwrite. So is a flag of a part that does not run
(--online_iters / --online_dataset / --online_duration_s / --online_warmup_s without --online, --pd_agents without
--pd_ratios).

--extra appends variant items (configs/sim_base.py syntax) to every run: a bounded KV store, another NIC. The report
then says at its top (report.md, report.json, the plot's title) that its runs are not the paper's setup. Items the
report sets per run (seed=, agents=, dataset=, append=, pd=, aps=, duration=, warmup=, kind=, a mode) are refused,
naming the flag that sets them; every run's config is loaded and its simulator built before any runs.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import platform
import re
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from absl import app, flags, logging

from dualpath_jax import clock, compiled
from experiments import (
    SigtermAsInterrupt,
    check_cell_or_exit,
    define_rerun_of,
    hold_dir_or_exit,
    interrupted_by,
    mean_within,
    no_earlier_results_or_exit,
    parse_flags_checking_rerun,
    pyplot_or_none,
    refuse_flags_of_parts_not_run,
    run_jobs,
    stopped_by,
    writable_dir_or_exit,
    write_atomically,
)

# --output_dir, --workers, --plot, --overwrite, --seeds, --extra: sweep (and simulate, capacity) define them too, --agents
# experiments.demo, with their own defaults and help; allow_override lets the launchers be imported into one process (the
# last one imported defines them there; absl raised DuplicateFlagError), and each launcher's command line is its own
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", "results/reproduce", "Where report.md / report.json / report.png / run.json go.", allow_override=True
)
_WORKERS = flags.DEFINE_integer("workers", 1, "Parallel worker processes.", lower_bound=1, allow_override=True)
_AGENTS = flags.DEFINE_integer(
    "agents", 2048, "Agents of the headline offline run (paper: 2048).", lower_bound=1, allow_override=True
)
_DATASET = flags.DEFINE_string("dataset", "64K", "Dataset of the headline offline run (paper: 64K).")
_ONLINE = flags.DEFINE_bool("online", False, "Also search the online capacity (DS 660B, DS 27B).")
_ONLINE_DURATION = flags.DEFINE_float(
    "online_duration_s", 4800.0, "Arrival window of each online probe (2400 s is not steady state for DS 660B)."
)
_ONLINE_WARMUP = flags.DEFINE_float("online_warmup_s", 2400.0, "Turns arriving before this are not judged.")
_ONLINE_ITERS = flags.DEFINE_integer("online_iters", 3, "Bisection steps of each capacity search.", lower_bound=0)
_TABLE = flags.DEFINE_list("table", [], "Agent counts of the DS 660B calibration table to run (all datasets).")
_PLOT = flags.DEFINE_bool(
    "plot", True, "Write report.png (matplotlib): the headline figures beside the paper's.", allow_override=True
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite",
    False,
    "Replace an earlier report.md / report.json in --output_dir (else: refused).",
    allow_override=True,
)
_SEEDS = flags.DEFINE_list(
    "seeds",
    ["0"],
    "Seeds of the headline offline runs and the --table cells; with several, each figure is their mean with "
    "[min, max] beside it.",
    allow_override=True,
)
_ONLINE_DATASET = flags.DEFINE_string(
    "online_dataset", "", "Dataset of the online probes ('' = the configs' 64K; PAPER.md does not name it)."
)
_APPENDS = flags.DEFINE_list(
    "appends",
    [],
    "Append scales of PAPER.md's append x1..x3 experiment to run (basic and DualPath, the headline setup and first "
    "seed; x1 is the headline run itself), e.g. --appends=2,3.",
)
_ONLINE_SCALE = flags.DEFINE_bool(
    "online_scale",
    False,
    "Also run PAPER.md's online scale check: DualPath 2P4D at 0.4 APS and 44P88D at 8.8 APS, 4800 s (~5 minutes and "
    "~3 GB for 44P88D on one core).",
)
_PD_RATIOS = flags.DEFINE_list(
    "pd_ratios",
    [],
    "P/D layouts of PAPER.md's DS 27B P/D sweep to run (basic and DualPath, the config's workload, first seed), "
    "e.g. --pd_ratios=1P1D,1P2D,2P1D.",
)
_PD_AGENTS = flags.DEFINE_integer(
    "pd_agents", 0, "Agents of the DS 27B P/D sweep (0: its config's 1024; fewer for a quick look).", lower_bound=0
)
_EXTRA = flags.DEFINE_string(
    "extra",
    "",
    "Variant items appended to every run, e.g. cluster.store_capacity_gb=500 (a bounded KV store); the report then "
    "says at its top that its runs are not the paper's setup. Items the report sets per run (seed=, agents=, "
    "dataset=, ...) are refused: their own flags set them.",
    allow_override=True,
)
define_rerun_of()
flags.register_validator(
    "pd_ratios",
    lambda v: all(re.fullmatch(r"[1-9]\d*P[1-9]\d*D", x) for x in v),
    message="--pd_ratios takes layouts like 1P2D, e.g. --pd_ratios=1P1D,1P2D,2P1D",
)
flags.register_validator(
    "appends",
    lambda v: all(_positive_number(x) for x in v),
    message="--appends takes numbers > 0, e.g. --appends=2,3",
)
flags.register_validator(
    "seeds",
    lambda v: bool(v) and all(x.isdigit() for x in v),
    message="--seeds takes integers >= 0, e.g. --seeds=0,1,2",
)
flags.register_validator(
    "table",
    lambda v: all(a.isdigit() and (int(a), "64K") in TABLE for a in v),  # (TABLE: below; checked at parse time)
    message="--table takes agent counts of the paper's DS 660B table (512, 1024, 2048, 4096), e.g. --table=512,1024",
)


def _positive_number(text: str) -> bool:
    try:
        return 0 < float(text) < float("inf")
    except ValueError:
        return False


def _known_dataset(name: str) -> bool:
    from dualpath_jax.workloads import synthetic

    return name in synthetic.DATASETS.names()


flags.register_validator("dataset", _known_dataset, message="--dataset must be one of 32K, 48K, 64K")
flags.register_validator(
    "online_dataset",
    lambda v: v == "" or _known_dataset(v),
    message="--online_dataset must be '' (the configs' 64K) or one of 32K, 48K, 64K",
)
flags.register_multi_flags_validator(
    ["online_duration_s", "online_warmup_s"],
    # (inf passed, and every capacity probe failed on the simulator's "must be finite" after all the offline runs)
    lambda f: 0 < f["online_duration_s"] < math.inf and 0 <= f["online_warmup_s"] < f["online_duration_s"],
    message="--online_duration_s must be > 0 and finite and --online_warmup_s in [0, online_duration_s)",
)

DS660B = "configs/paper_ds660b.py"
DS27B = "configs/paper_ds27b.py"
SCALE = "configs/paper_scale.py"
# The repository these labels are relative to: the runs load their config files from there, whatever the working
# directory (from any other one, every run failed with "config file 'configs/paper_ds660b.py' does not exist").
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _in_repo(spec: str) -> str:
    """`spec` (a label above, `configs/...:variant`) with its config file's path made absolute in the repository."""
    return os.path.join(_REPO, spec)


# PAPER.md's online scale run: 2P4D at 0.4 APS and 44P88D at 8.8 APS (22x the nodes, 22x the load), DualPath,
# the 64K dataset of the online probes; 44P88D keeps the scale config's EP groups and fetch rate per group.
ONLINE_SCALE = {
    "2P4D": f"{DS660B}:dualpath,aps=0.4,duration=4800,warmup=2400",
    "44P88D": f"{SCALE}:dualpath,pd=44P88D,aps=8.8,duration=4800,warmup=2400,dataset=64K",
}

# PAPER.md headline results.
PAPER = {
    "speedup_basic_to_dualpath": 1.87,
    "ablation_layerwise_pct": -17.21,
    "ablation_dual_path_pct": -38.19,
    "ablation_scheduler_pct": -45.62,
    "snic_max_over_avg_round_robin": 1.53,
    "snic_max_over_avg_dualpath": 1.18,
    "online_capacity_gain_ds660b": 2.25,
    "online_capacity_gain_ds27b": 1.67,
    "online_capacity_ds660b_basic_aps": 0.2,
    "online_capacity_ds660b_dualpath_aps": 0.45,
    "online_capacity_ds27b_basic_aps": 0.3,
    "online_capacity_ds27b_dualpath_aps": 0.5,
    "append_speedup_range": (1.82, 1.99),
    "pd_sweep_ds27b_mean_speedup": 1.64,  # "Across P/D ratios on DS 27B: 1.64x on average, up to 2.46x"
    "pd_sweep_ds27b_max_speedup": 2.46,
    "online_scale_2p4d": (
        1.74,
        0.039,
    ),  # TTFT s, TPOT s at 0.4 APS (PAPER.md: "TTFT 1.74 s -> 1.85 s, TPOT 39 -> 36 ms")
    "online_scale_44p88d": (
        1.85,
        0.036,
    ),  # at 8.8 APS  # "Append x1...x3: 1.82-1.99x" (which scale gives which is not said)
}
# PAPER.md calibration table: (agents, dataset) -> (oracle, dualpath, basic) JCT seconds.
TABLE = {
    (512, "32K"): (848, 848, 949),
    (512, "48K"): (1348, 1348, 1739),
    (512, "64K"): (1875, 1979, 2813),
    (1024, "32K"): (1071, 1071, 1495),
    (1024, "48K"): (1696, 1783, 3000),
    (1024, "64K"): (2604, 2865, 5313),
    (2048, "32K"): (1657, 1616, 2525),
    (2048, "48K"): (2957, 3087, 5435),
    (2048, "64K"): (4844, 5313, 10000),
    (4096, "32K"): (2990, 2869, 4687),
    (4096, "48K"): (5565, 5870, 10348),
    (4096, "64K"): (9271, 10260, 19280),
}


def _offline(spec: str) -> dict:
    from dualpath_jax.sim import load_sim_config, run

    t0 = time.perf_counter()
    res = run(load_sim_config(_in_repo(spec), as_run=True))
    s = res.summary
    out = {
        "spec": spec,
        "jct_s": s["jct_s"],
        "snic_max_over_avg": s["snic_max_over_avg"],
        "unfinished": s["unfinished_turns"],
        "wall_s": time.perf_counter() - t0,
    }
    for k in ("ttft_p50_s", "tpot_p50_s", "slo_met", "slo_attainment", "turns"):  # online runs (the scale check)
        if k in s:
            out[k] = s[k]
    return out


def _capacity_spec(args: tuple) -> str:
    """The `file:variant` a capacity search of `args` (`_capacity`) loads, at its lowest APS; --extra's items last."""
    setup, mode, lo, _hi, duration, warmup, _iters, dataset, *extra = args
    ds = f",dataset={dataset}" if dataset else ""
    return f"{setup}:{mode},duration={duration},warmup={warmup},aps={lo}{ds}" + "".join(f",{x}" for x in extra)


def _capacity(args: tuple) -> dict:
    """A capacity search: `args` = (setup, mode, lo, hi, duration, warmup, iters, dataset), and --extra's items as a
    ninth element when given."""
    from dualpath_jax.sim import load_sim_config
    from dualpath_jax.sim.capacity import capacity_search

    setup, mode, lo, hi, _duration, _warmup, iters = args[:7]
    cfg = load_sim_config(_in_repo(_capacity_spec(args)))
    out = capacity_search(cfg, lo, hi, iters=iters)
    out["setup"], out["mode"] = setup, mode
    return out


def _sim_key(spec: str) -> str:
    """The resolved simulation of an offline spec: two labels of one simulation (`--table=2048`'s
    `...,dataset=64K,agents=2048` and the headline's `...,seed=0`) are one run. A spec that does not load keys by
    itself (its run fails with the reason)."""
    from dualpath_jax.sim import load_sim_config

    try:
        return repr(load_sim_config(_in_repo(spec)))
    except Exception:  # noqa: BLE001 - reported by the run itself
        return spec


def _table_spec(mode: str, dataset: str, agents: int, seed: int) -> str:
    """The offline run of one seed of a DS 660B calibration table cell."""
    return f"{DS660B}:{mode},dataset={dataset},agents={agents},seed={seed}"


def _job(job):
    kind, arg = job
    return (kind, arg, _offline(arg) if kind == "offline" else _capacity(arg))


# The variant items the report sets per run (its labels: headline, appends, P/D, table, online scale and probes), with
# the flag that sets them: in --extra they clashed with a run's own (`config variant ...: two values for seed`), or
# changed what a row is said to be (`kind=online` ran the offline rows online)
_PD = "--pd_ratios (the DS 27B P/D sweep; the other runs are the paper's layouts)"
_SET_PER_RUN = {
    "seed": "--seeds",
    "agents": "--agents (the headline runs), --pd_agents (the P/D sweep) or --table (the calibration table's rows)",
    "dataset": "--dataset (the headline runs) or --online_dataset (the online probes)",
    "append": "--appends",
    "pd": _PD,
    "cluster.prefill_nodes": _PD,
    "cluster.decode_nodes": _PD,
    "aps": "--online (its capacity searches vary the APS)",
    "duration": "--online_duration_s",
    "warmup": "--online_warmup_s",
    "kind": "--online (the report's other runs are offline)",
}


def extra_items(text: str) -> str:
    """--extra as the items appended to every run: comma-separated, blanks dropped ('' when none)."""
    return ",".join(x.strip() for x in text.split(",") if x.strip())


def refuse_extra_items(extra: str) -> None:
    """SystemExit with one "bad --extra" line for an item that is no variant item (a mode: the rows set it) or one that
    the report sets per run (`_SET_PER_RUN`), naming the flag to use instead."""
    for item in extra.split(",") if extra else ():
        key = item.partition("=")[0].strip()
        if "=" not in item:
            raise SystemExit(
                f"bad --extra: {item!r} is a mode, and the report's rows set each run's mode; --extra takes variant "
                "items KEY=VALUE (cluster.NAME=, policy.NAME=, batcher.NAME=, turns=)"
            )
        if key in _SET_PER_RUN:
            raise SystemExit(f"bad --extra: {item!r}: the report sets {key}= for each run; use {_SET_PER_RUN[key]}")
        if key == "trace":
            raise SystemExit(
                f"bad --extra: {item!r}: the report runs the paper's synthetic datasets, not a trace (replay one with "
                "experiments.simulate or experiments.sweep)"
            )


def _with_extra(job: tuple, extra: str) -> tuple:
    """The run of `job` (a label: (kind, spec) or (kind, capacity args)) with --extra's items appended."""
    kind, arg = job
    if not extra:
        return job
    return (kind, f"{arg},{extra}") if kind == "offline" else (kind, (*arg, extra))


def _check_runs(jobs: list, extra: str) -> None:
    """With --extra: every run's config loads and its simulator builds (each distinct simulation once) before any
    runs, so that a bad item is one line naming it and the run, not a failed report after the others ran."""
    from dualpath_jax.sim import load_sim_config
    from dualpath_jax.sim.runner import build_simulator

    built: set[str] = set()

    def check(kind: str, spec: str) -> None:
        cfg = load_sim_config(_in_repo(spec), as_run=kind == "offline")
        if repr(cfg) not in built:
            built.add(repr(cfg))
            build_simulator(cfg)

    for kind, arg in (_with_extra(job, extra) for job in jobs):
        spec = arg if kind == "offline" else _capacity_spec(arg)
        check_cell_or_exit(f"--extra (run {spec!r})", check, kind, spec)


def rms_log(ratios: Sequence[float]) -> float:
    """Root mean square of ln(sim/paper) over table cells: the loss the calibration minimises."""
    if not ratios or any(not r > 0 for r in ratios):
        raise ValueError(f"rms_log needs positive sim/paper ratios, got {list(ratios)}")
    return math.sqrt(sum(math.log(r) ** 2 for r in ratios) / len(ratios))


def table_fit(fit: dict[str, list[float]]) -> str:
    """'oracle 0.05, dualpath 0.07, basic 0.09, all 0.07 (36 cells)' from sim/paper ratios per column."""
    cols = {m: v for m, v in fit.items() if v}
    every = [r for v in cols.values() for r in v]
    parts = [f"{m} {rms_log(v):.3f}" for m, v in cols.items()]
    return ", ".join(parts + [f"all {rms_log(every):.3f} ({len(every)} cells)"])


def _spread(values: Sequence[float], fmt: str) -> tuple[float, str]:
    """(mean of `values`, " [min, max]" in `fmt` when there are several, else ""). A NaN value (oracle's storage-NIC
    max/avg) makes the mean NaN and the range [nan, nan], whichever seed it is (min/max over a list with a NaN depended
    on where the NaN was)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, ""
    lo, hi = (math.nan, math.nan) if any(math.isnan(v) for v in values) else (min(values), max(values))
    return mean, f" [{lo:{fmt}}, {hi:{fmt}}]"


def _row(name: str, paper: float, sim: float | Sequence[float], unit: str = "") -> str:
    """A report row; `sim` may be one value per seed: then their mean, with [min, max] beside it. One value may be a
    numpy scalar too (a numpy int was taken for a sequence: TypeError)."""
    mean, spread = _spread([sim] if isinstance(sim, numbers.Real) else list(sim), ".4g")
    ratio = mean / paper if paper else float("nan")
    return f"| {name} | {paper:g}{unit} | {mean:.4g}{unit}{spread} | {ratio:.3f} |"


def _search_bound(v: dict) -> str | None:
    """A capacity search's result (`sim.capacity.bisect_capacity`) as text where it is a search bound, not a measured
    capacity: "< lo" (even its lowest probe missed the SLO: capacity_aps 0) or ">= hi" (its highest met it)."""
    if not v["capacity_aps"]:  # (no probe met it: the search's lowest, `lo`, is its upper_aps)
        return f"< {v['upper_aps']:.4g}"
    if v.get("upper_aps") is None:
        return f">= {v['capacity_aps']:.4g}"
    return None


def _capacity_row(name: str, paper: float, v: dict) -> str:
    """A capacity's report row: a search bound as `experiments.capacity` prints it (a lowest probe that missed read
    as a measured capacity of 0, a highest that met as `hi`)."""
    bound = _search_bound(v)
    return f"| {name} | {paper:g} | {bound} (a search bound) | n/a |" if bound else _row(name, paper, v["capacity_aps"])


def _mean_range(values: Sequence[float], fmt: str) -> str:
    mean, spread = _spread(values, fmt)
    return format(mean, fmt) + spread


# each part of the report that a flag turns on: (that flag, its own flags, what it is)
_PARTS = (
    (
        "online",
        ("online_dataset", "online_duration_s", "online_warmup_s", "online_iters"),
        "the online capacity search",
    ),
    ("pd_ratios", ("pd_agents",), "the DS 27B P/D sweep"),
)


def _refuse_unused_flags(f) -> None:
    """A flag of a part of the report that does not run is a usage error: `--pd_agents=16` without --pd_ratios, or
    `--online_iters=6` / `--online_dataset=48K` without --online, ran the offline report alone without a word (the
    online scale check has its own fixed probes: PAPER.md's)."""
    refuse_flags_of_parts_not_run(
        (names, f"{what} (--{part})", None if f[part].value else "this run does not do") for part, names, what in _PARTS
    )


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unknown arguments: {argv[1:]}")
    _refuse_unused_flags(flags.FLAGS)
    extra = extra_items(_EXTRA.value)
    refuse_extra_items(extra)
    started = clock.now()  # (run.json: the start and the wall time)
    import numpy

    logging.info("python %s, numpy %s", platform.python_version(), numpy.__version__)
    logging.info(
        "flags: %s",
        {
            f: flags.FLAGS[f].value
            for f in (
                "agents",
                "dataset",
                "seeds",
                "online",
                "online_scale",
                "table",
                "appends",
                "pd_ratios",
                "pd_agents",
                "extra",
                "workers",
            )
        },
    )
    # an earlier report is kept (a failed run wrote its partial report.json over it)
    no_earlier_results_or_exit(
        _OUTPUT_DIR.value, ("report.md", "report.json"), "--output_dir", _OVERWRITE.value, "experiments.reproduce_paper"
    )
    seeds = list(dict.fromkeys(int(x) for x in _SEEDS.value))  # --seeds=0,00: one seed
    bases = {sd: f"dataset={_DATASET.value},agents={_AGENTS.value},seed={sd}" for sd in seeds}
    modes = ["basic", "layerwise", "dualpath_rr", "dualpath", "oracle"]
    jobs = [("offline", f"{DS660B}:{m},{bases[sd]}") for sd in seeds for m in modes]
    # --appends=2,2.0: one; 2,2.0000001 too (a spec and a row carry the scale as %g: both were `append=2`, two x2 rows)
    appends = [k for k in dict.fromkeys(float(f"{float(x):g}") for x in _APPENDS.value) if k != 1.0]
    jobs += [
        ("offline", f"{DS660B}:{m},{bases[seeds[0]]},append={k:g}") for k in appends for m in ("basic", "dualpath")
    ]
    if _ONLINE_SCALE.value:
        jobs += [("offline", spec) for spec in ONLINE_SCALE.values()]
    pds = list(dict.fromkeys(_PD_RATIOS.value))
    jobs += [("offline", _pd_spec(m, pd, seeds[0])) for pd in pds for m in ("basic", "dualpath")]
    # --table=512,0512: one row of the report (and its cells once in the fit); each cell on every --seeds seed, as
    # the headline (it ran the config's seed 0 whatever --seeds said)
    table = list(dict.fromkeys(int(a) for a in _TABLE.value))
    for a in table:
        for ds in ("32K", "48K", "64K"):
            for m in ("oracle", "dualpath", "basic"):
                jobs += [("offline", _table_spec(m, ds, a, sd)) for sd in seeds]
    if _ONLINE.value:
        d, w, it, ods = _ONLINE_DURATION.value, _ONLINE_WARMUP.value, _ONLINE_ITERS.value, _ONLINE_DATASET.value
        jobs += [
            ("capacity", (DS660B, "basic", 0.05, 0.8, d, w, it, ods)),
            ("capacity", (DS660B, "dualpath", 0.05, 0.8, d, w, it, ods)),
            ("capacity", (DS27B, "basic", 0.05, 1.0, d, w, it, ods)),
            ("capacity", (DS27B, "dualpath", 0.05, 1.0, d, w, it, ods)),
        ]
    jobs = list(dict.fromkeys(jobs))
    with SigtermAsInterrupt() as term:
        try:
            if extra:  # (each simulator built: Ctrl-C or SIGTERM here was a traceback)
                _check_runs(jobs, extra)
            writable_dir_or_exit(_OUTPUT_DIR.value, "--output_dir")  # before the runs, not after
            hold_dir_or_exit(_OUTPUT_DIR.value, "--output_dir")
            results = _run_all(jobs, term, started, extra)
        except KeyboardInterrupt as e:  # (Terminated too: SIGTERM)
            raise SystemExit(
                f"reproduce_paper: stopped by {interrupted_by(e)} before any run started (nothing written)"
            ) from None
        _report(results, seeds, bases, modes, appends, pds, table, extra)
        _write_run_info(started, jobs, extra)
    if stopped_by(term):  # (it came after the last run finished: the report is whole)
        raise SystemExit(
            f"reproduce_paper: stopped by {stopped_by(term)} after every run finished (the report is written)"
        )


def _write_run_info(started: float, jobs: list, extra: str) -> None:
    """run.json: what ran (every run's label, with --extra's items), and the line that runs it again into a directory
    of its own."""
    from dualpath_jax.metrics import run_info, write_run_info

    runs = [f"{kind} {arg}" for kind, arg in (_with_extra(job, extra) for job in jobs)]
    info = run_info(
        "experiments.reproduce_paper", started, output_dir=_OUTPUT_DIR.value, runs=runs, compiled=compiled.status()
    )  # (compiled: the simulator's hot paths in C, or the Python twins: the same figures, not the same times)
    print("wrote", write_run_info(_OUTPUT_DIR.value, info))


def _write_report_json(results: dict, extra: str) -> None:
    """report.json, beside then renamed (written in place, a kill mid-write tore it). NaN (oracle's storage-NIC
    max/avg): null."""
    from dualpath_jax.metrics import json_safe

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(json_safe(_report_json(results, extra)), f, indent=1, default=str)

    write_atomically(os.path.join(_OUTPUT_DIR.value, "report.json"), write)


def _run_all(jobs: list, term: SigtermAsInterrupt, started: float, extra: str) -> dict:
    """Each distinct simulation of `jobs` once, with --extra's items (`extra`) appended: {(kind, label): result}. A
    run that failed (or was stopped: Ctrl-C, SIGTERM) writes the finished runs' raw results to report.json and exits
    failing, naming it."""
    # each distinct simulation runs once; every label of it (a table cell that is a headline run) gets its result
    sim = {job: _sim_key(_with_extra(job, extra)[1]) if job[0] == "offline" else job for job in jobs}
    first: dict = {}
    for job in jobs:
        first.setdefault(sim[job], job)
    runs = list(first.values())  # the first label of each simulation

    results, failed, done_by_key = {}, [], {}
    ran = [_with_extra(job, extra) for job in runs]
    for job, run, (done, error) in zip(
        runs, ran, run_jobs(_job, ran, _WORKERS.value, "reproduce", unit="run"), strict=True
    ):
        if error is not None:
            failed.append(f"  {run[0]} {run[1]}: {term.error_line(error)}")
            continue
        done_by_key[sim[job]] = done[2]
    term.hold()  # SIGTERM and Ctrl-C from here on: noted, and the exit comes after what finished is written
    for kind, arg in jobs:
        if sim[(kind, arg)] in done_by_key:
            results[(kind, arg if isinstance(arg, str) else arg[:2])] = done_by_key[sim[(kind, arg)]]
    if failed:  # the report needs every run: keep the finished ones' raw results, say which failed
        _write_report_json(results, extra)
        for name in ("report.md", "report.png"):  # an earlier (--overwrite) report's would pass for this run's
            stale = os.path.join(_OUTPUT_DIR.value, name)
            if os.path.exists(stale):
                os.remove(stale)
                logging.info("removed %s: an earlier report's (this run wrote none)", stale)
        _write_run_info(started, jobs, extra)
        stopped = f"stopped by {stopped_by(term)}; " if stopped_by(term) else ""
        raise SystemExit(
            f"reproduce_paper: {stopped}{len(failed)} of {len(runs)} runs failed, so no report (the "
            f"{len(done_by_key)} finished runs are in {os.path.join(_OUTPUT_DIR.value, 'report.json')}):\n"
            + "\n".join(failed)
        )
    return results


def _pd_spec(mode: str, pd: str, seed: int) -> str:
    """The DS 27B P/D sweep's run of `mode` at layout `pd` (the config's 1024 agents unless --pd_agents)."""
    agents = f",agents={_PD_AGENTS.value}" if _PD_AGENTS.value else ""
    return f"{DS27B}:{mode},pd={pd}{agents},seed={seed}"


def _pd_agents_note() -> str:
    return f" at {_PD_AGENTS.value} agents" if _PD_AGENTS.value else ""


def _extra_note(extra: str) -> str:
    """What a report whose runs had --extra's items says at its top."""
    return f"Not the paper's setup: every run had the variant items {extra} appended (--extra)."


def _report_json(results: dict, extra: str) -> dict:
    """report.json: each run's raw result by its label; with --extra, first the items and the note saying so."""
    top = {"extra": extra, "note": _extra_note(extra)} if extra else {}
    return {**top, **{f"{kind} {key}": v for (kind, key), v in results.items()}}


def _report(results: dict, seeds, bases, modes, appends, pds, table, extra: str = "") -> None:
    """report.md / report.json / report.png of every run's `results` (`extra`: --extra's items, said at the top)."""

    # per seed: {mode: value}
    jct = [{m: results[("offline", f"{DS660B}:{m},{bases[sd]}")]["jct_s"] for m in modes} for sd in seeds]
    snic = [{m: results[("offline", f"{DS660B}:{m},{bases[sd]}")]["snic_max_over_avg"] for m in modes} for sd in seeds]
    several = len(seeds) > 1
    # (with --extra: said first, so that nobody takes its figures for the paper's setup's)
    note = f"**Not the paper's setup**: every run below had the variant items `{extra}` appended (`--extra`)."
    lines = [
        "# Simulator vs paper (DualPath, arXiv 2602.21548)",
        "",
        *([note, ""] if extra else []),
        f"Offline DS 660B 2P4D, {_DATASET.value} dataset, {_AGENTS.value} agents, seed"
        + (f"s {', '.join(map(str, seeds))} (mean [min, max] over them)" if several else f" {seeds[0]}")
        + ". Generated by `"
        + shlex.join(["python", "-m", "experiments.reproduce_paper", *sys.argv[1:]])
        + "` on "
        + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        + " (what ran: run.json).",
        "",
        "| mode | JCT (s) | storage-NIC max/avg |",
        "| --- | --- | --- |",
    ]
    lines += [
        f"| {m} | {_mean_range([j[m] for j in jct], '.0f')} | {_mean_range([n[m] for n in snic], '.3f')} |"
        for m in modes
    ]
    pct = lambda m: [100.0 * (j[m] / j["basic"] - 1.0) for j in jct]  # noqa: E731
    lines += [
        "",
        "| metric | paper | simulator | sim/paper |",
        "| --- | --- | --- | --- |",
        _row(
            "offline speedup Basic -> DualPath",
            PAPER["speedup_basic_to_dualpath"],
            [j["basic"] / j["dualpath"] for j in jct],
            "x",
        ),
        _row("ablation: + layerwise (JCT %)", PAPER["ablation_layerwise_pct"], pct("layerwise")),
        _row("ablation: + dual path, round-robin (JCT %)", PAPER["ablation_dual_path_pct"], pct("dualpath_rr")),
        _row("ablation: + scheduler (JCT %)", PAPER["ablation_scheduler_pct"], pct("dualpath")),
        _row(
            "storage-NIC max/avg, round-robin", PAPER["snic_max_over_avg_round_robin"], [n["dualpath_rr"] for n in snic]
        ),
        _row("storage-NIC max/avg, scheduler", PAPER["snic_max_over_avg_dualpath"], [n["dualpath"] for n in snic]),
    ]
    if _APPENDS.value:  # (--appends=1, the headline run itself: its row, not no table)
        lo, hi = PAPER["append_speedup_range"]
        lines += [
            "",
            f"Append x1...x3 (every synthetic append scaled; trajectories still end at the dataset's max length, so "
            f"they have fewer turns; seed {seeds[0]}). Paper: {lo}-{hi}x over x1...x3, which scale gives which not said.",
            "",
            "| append | basic JCT (s) | DualPath JCT (s) | speedup | in the paper's range |",
            "| --- | --- | --- | --- | --- |",
        ]
        for k in [1.0, *appends]:
            tail = "" if k == 1.0 else f",append={k:g}"
            b, d = (
                results[("offline", f"{DS660B}:{m},{bases[seeds[0]]}{tail}")]["jct_s"] for m in ("basic", "dualpath")
            )
            sp = b / d
            lines.append(f"| x{k:g} | {b:.0f} | {d:.0f} | {sp:.2f}x | {'yes' if lo <= sp <= hi else 'no'} |")
    if pds:
        lines += [
            "",
            f"DS 27B across P/D layouts (its config's workload{_pd_agents_note()}, seed {seeds[0]}); the paper does not "
            "list its layouts.",
            "",
            "| P/D | basic JCT (s) | DualPath JCT (s) | speedup |",
            "| --- | --- | --- | --- |",
        ]
        sps = []
        for pd in pds:
            b, d = (results[("offline", _pd_spec(m, pd, seeds[0]))]["jct_s"] for m in ("basic", "dualpath"))
            sps.append(b / d)
            lines.append(f"| {pd} | {b:.0f} | {d:.0f} | {b / d:.2f}x |")
        lines += [
            "",
            "| metric | paper | simulator | sim/paper |",
            "| --- | --- | --- | --- |",
            _row("DS 27B P/D sweep: mean speedup", PAPER["pd_sweep_ds27b_mean_speedup"], sum(sps) / len(sps), "x"),
            _row("DS 27B P/D sweep: max speedup", PAPER["pd_sweep_ds27b_max_speedup"], max(sps), "x"),
        ]
    if _ONLINE_SCALE.value:
        lines += [
            "",
            "Online scale (DualPath, 64K dataset, Poisson arrivals over 4800 s, turns arriving after 2400 s judged; PAPER.md "
            "does not say which TTFT / TPOT statistic it reports: p50 here):",
            "",
            "| layout | APS | TTFT p50 (s), paper / sim | TPOT p50 (ms), paper / sim | SLO met | turns |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for layout, aps in (("2P4D", 0.4), ("44P88D", 8.8)):
            r = results[("offline", ONLINE_SCALE[layout])]
            pt, pp = PAPER[f"online_scale_{layout.lower()}"]
            lines.append(
                f"| {layout} | {aps} | {pt} / {r.get('ttft_p50_s', math.nan):.2f} | {1e3 * pp:.0f} / "
                f"{1e3 * r.get('tpot_p50_s', math.nan):.1f} | {r.get('slo_met')} | {r.get('turns', 0):,} |"
            )
    online_note = []
    if _ONLINE.value:
        if _APPENDS.value or pds or _ONLINE_SCALE.value:  # a table of its own (its rows ran on under the last one's)
            lines += ["", "| metric | paper | simulator | sim/paper |", "| --- | --- | --- | --- |"]
        cap, brackets, gains = {}, [], {}
        for (kind, key), v in results.items():
            if kind == "capacity":
                cap[(os.path.basename(key[0]), key[1])] = v
                upper = v.get("upper_aps")
                brackets.append(
                    f"{os.path.basename(key[0])} {key[1]} "
                    + (
                        f"[{v['capacity_aps']:.4g}, {upper:.4g})"
                        if upper
                        else f"{v['capacity_aps']:.4g} (a search bound)"
                    )
                )
        dataset = _ONLINE_DATASET.value or "the configs' 64K"
        online_note = [
            "",
            f"Online probes: {dataset} dataset, Poisson arrivals over "
            f"{_ONLINE_DURATION.value:g} s, turns arriving before {_ONLINE_WARMUP.value:g} s not judged, "
            f"{_ONLINE_ITERS.value} bisection steps. Capacity = the highest passing APS, [it, the lowest failing "
            "one above): " + "; ".join(sorted(brackets)) + ".",
        ]
        for setup, name in (("paper_ds660b.py", "DS 660B"), ("paper_ds27b.py", "DS 27B")):
            key = name.replace(" ", "").lower()
            b, d = cap[(setup, "basic")], cap[(setup, "dualpath")]
            lines += [
                _capacity_row(f"online capacity {name} basic (APS)", PAPER[f"online_capacity_{key}_basic_aps"], b),
                _capacity_row(
                    f"online capacity {name} DualPath (APS)", PAPER[f"online_capacity_{key}_dualpath_aps"], d
                ),
            ]
            what, paper = f"online capacity gain {name}", PAPER[f"online_capacity_gain_{key}"]
            if _search_bound(b) or _search_bound(d):  # (a bound's ratio is no measured gain: it read 0.000 or nan)
                gains[name] = float("nan")
                lines.append(f"| {what} | {paper:g}x | n/a (a search bound) | n/a |")
            else:
                gains[name] = d["capacity_aps"] / b["capacity_aps"]
                lines.append(_row(what, paper, gains[name], "x"))
    lines += online_note
    table_cells: list[tuple[str, float, float]] = []  # (mode, paper JCT, simulator JCT) of the calibration table
    if table:
        lines += [
            "",
            "DS 660B 2P4D offline JCT (s), paper / simulator (sim/paper), seed"
            + (
                f"s {', '.join(map(str, seeds))} (mean [min, max] over them; sim/paper of the mean)"
                if several
                else f" {seeds[0]}"
            )
            + ":",
            "",
            "| agents | dataset | oracle | dualpath | basic |",
            "| --- | --- | --- | --- | --- |",
        ]
        fit: dict[str, list[float]] = {"oracle": [], "dualpath": [], "basic": []}
        for a in table:
            for ds in ("32K", "48K", "64K"):
                cells = []
                for m, p in zip(("oracle", "dualpath", "basic"), TABLE[(a, ds)], strict=False):
                    s, spread = _spread(
                        [results[("offline", _table_spec(m, ds, a, sd))]["jct_s"] for sd in seeds], ".0f"
                    )
                    cells.append(f"{p} / {s:.0f}{spread} ({s / p:.2f})")
                    fit[m].append(s / p)
                    table_cells.append((m, p, s))
                lines.append(f"| {a} | {ds} | " + " | ".join(cells) + " |")
        lines += ["", "Fit (root mean square of ln(sim/paper), the calibration's loss): " + table_fit(fit)]
    path = os.path.join(_OUTPUT_DIR.value, "report.md")
    write_atomically(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    _write_report_json(results, extra)
    print("\n".join(lines))
    print("wrote", path, "and report.json")
    png, drawn = os.path.join(_OUTPUT_DIR.value, "report.png"), False
    if _PLOT.value:
        headline = {
            f"JCT change vs basic, DS 660B {_DATASET.value}, {_AGENTS.value} agents (%)": [
                ("+ layerwise", PAPER["ablation_layerwise_pct"], pct("layerwise")),
                ("+ dual path (round-robin)", PAPER["ablation_dual_path_pct"], pct("dualpath_rr")),
                ("+ scheduler", PAPER["ablation_scheduler_pct"], pct("dualpath")),
            ],
            "speedup and storage-NIC max/avg": [
                (
                    "speedup basic->DualPath",
                    PAPER["speedup_basic_to_dualpath"],
                    [j["basic"] / j["dualpath"] for j in jct],
                ),
                ("SNIC max/avg round-robin", PAPER["snic_max_over_avg_round_robin"], [n["dualpath_rr"] for n in snic]),
                ("SNIC max/avg scheduler", PAPER["snic_max_over_avg_dualpath"], [n["dualpath"] for n in snic]),
            ],
        }
        if _ONLINE.value:
            headline["online capacity gain under the SLO"] = [
                ("DS 660B", PAPER["online_capacity_gain_ds660b"], [gains["DS 660B"]]),
                ("DS 27B", PAPER["online_capacity_gain_ds27b"], [gains["DS 27B"]]),
            ]
        drawn = plot_report(headline, table_cells, png, _extra_note(extra) if extra else "")
    if drawn:
        print("wrote", png)
    elif os.path.exists(png):  # an earlier report's plot would pass for this one's
        os.remove(png)
        logging.info("removed %s: an earlier report's plot (none was drawn for this one)", png)


def _headline_ylabel(title: str) -> str:
    """The y label of a headline panel of report.png, from its title (the axes had none)."""
    if title.startswith("JCT change"):
        return "JCT change vs basic (%)"
    if title.startswith("speedup"):
        return "ratio (speedup; storage-NIC max / avg)"
    if "capacity gain" in title:
        return "capacity gain (x)"
    return ""


def plot_report(headline: dict, table_cells: list, path: str, note: str = "") -> bool:
    """report.png: `headline` = {panel title: [(label, paper, [simulator values over seeds])]}, one bar pair per
    label (the simulator's bar at its mean, its [min, max] as an error bar; no finite value: "n/a" in its place),
    and, with `table_cells` = [(mode, paper JCT, simulator JCT)], the calibration table as simulator vs paper JCT
    (log axes, y = x and +-15%); `note` (--extra's), when given, as the figure's title. Skipped (logged) without
    matplotlib."""
    plt = pyplot_or_none("report.png")
    if plt is None:
        return False
    from dualpath_jax.sim.outputs import plain_log_ticks

    n = len(headline) + bool(table_cells)
    fig, axes = plt.subplots(1, max(n, 1), figsize=(4.5 * max(n, 1), 4.2), squeeze=False)
    for ax, (title, rows) in zip(axes[0], headline.items(), strict=False):
        xs = range(len(rows))
        vals = [[x for x in v if x is not None and math.isfinite(x)] for _, _, v in rows]  # (a search bound: NaN)
        sims = [mean_within(v) if v else math.nan for v in vals]  # (within [min, max]: no negative error bar)
        err = [[m - min(v) if v else 0.0 for m, v in zip(sims, vals, strict=True)],
               [max(v) - m if v else 0.0 for m, v in zip(sims, vals, strict=True)]]  # fmt: skip
        seeds = max((len(v) for _, _, v in rows), default=1)
        sim_label = f"simulator (mean of {seeds} seeds, bar [min, max])" if seeds > 1 else "simulator"
        ax.bar([x - 0.2 for x in xs], [p for _, p, _ in rows], 0.4, label="paper", color="tab:gray")
        ax.bar([x + 0.2 for x in xs], sims, 0.4, yerr=err, label=sim_label, color="tab:blue")
        for x, m in zip(xs, sims, strict=True):
            if not math.isfinite(m):  # (the bar was just missing: read as 0 or as a drawing fault)
                ax.text(x + 0.2, 0.5, "n/a", transform=ax.get_xaxis_transform(), ha="center", va="center",
                        fontsize=8, color="tab:blue", rotation=90)  # fmt: skip
        ax.set_xlim(-0.6, len(rows) - 0.4)  # (a last bar of NaN was out of the frame, and its "n/a" with it)
        ax.set_xticks(list(xs), [label for label, _, _ in rows], rotation=20, ha="right", rotation_mode="anchor",
                      fontsize=7)  # fmt: skip
        ax.axhline(0, color="black", lw=0.5)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(_headline_ylabel(title), fontsize=8)
        lo, hi = ax.get_ylim()  # room for the legend where the bars end (it covered the longest bar)
        down = abs(lo) > abs(hi)
        ax.set_ylim(lo * 1.3, hi) if down else ax.set_ylim(lo, hi * 1.3)
        ax.legend(fontsize=7, loc="lower right" if down else "upper right")
    if table_cells:
        ax = axes[0][-1]
        for mode, marker in (("oracle", "^"), ("dualpath", "o"), ("basic", "s")):
            pts = [(p, s) for m, p, s in table_cells if m == mode]
            ax.scatter([p for p, _ in pts], [s for _, s in pts], marker=marker, label=mode, s=18)
        finite = [x for _, p, s in table_cells for x in (p, s) if x > 0 and math.isfinite(x)]
        if finite:
            lo, hi = min(finite) * 0.8, max(finite) * 1.25
            ax.plot([lo, hi], [lo, hi], color="black", lw=0.6)
            ax.fill_between([lo, hi], [lo * 0.85, hi * 0.85], [lo * 1.15, hi * 1.15], color="gray", alpha=0.2)
            ax.set_xscale("log")
            ax.set_yscale("log")
            plain_log_ticks(ax, "x")  # (a decade or less: its minor ticks' labels overlapped)
            plain_log_ticks(ax, "y")
        ax.set_xlabel("paper JCT (s)")
        ax.set_ylabel("simulator JCT (s)")
        ax.set_title("DS 660B calibration table (band: +-15%)", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    if note:
        fig.suptitle(note, fontsize=9, color="tab:red")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags_checking_rerun)
