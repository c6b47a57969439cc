"""Run a grid of simulations (setups x policies/modes x loads) in parallel processes, with a progress bar.

  python -m experiments.sweep --setups=configs/paper_ds660b.py,configs/paper_ds27b.py \\
      --modes=basic,dualpath_rr,dualpath,oracle --loads=agents=512,agents=1024 --workers=2
  python -m experiments.sweep --setups=configs/sim_tiny.py --modes=basic,dualpath --loads=aps=0.2,aps=0.5
  python -m experiments.sweep --setups=configs/paper_ds660b.py --modes=dualpath_rr,dualpath --seeds=0,1,2,3

Each cell is `<setup>:<mode>,<load>` (configs/sim_base.py variant syntax). Writes sweep.csv, sweep.json (each row
with its cell's `spec`), run.json (what ran: dualpath_jax.metrics.run_info) and sweep.png (per setup: JCT, TTFT,
storage-NIC max/avg and, online, SLO attainment over the loads, a line per mode) under --output_dir (default
results/sweep) and prints the table. A directory that holds an earlier sweep's
sweep.csv / sweep.json is refused unless --overwrite (its results are not replaced).
"""

from __future__ import annotations

import csv
import json
import os
import platform
import time
from collections.abc import Sequence

from absl import app, flags, logging

from experiments import (
    SigtermAsInterrupt,
    Terminated,
    error_line,
    no_earlier_results_or_exit,
    pyplot_or_none,
    register_distinct,
    run_jobs,
    writable_dir_or_exit,
)

# the default in this repository, so that it runs from any directory (relative setups are the working directory's)
_SETUPS = flags.DEFINE_list(
    "setups",
    [os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "sim_tiny.py"))],
    "Config files (configs/paper_*.py).",
)
_MODES = flags.DEFINE_list("modes", ["basic", "dualpath"], "Modes or registered policy names.")
_LOADS = flags.DEFINE_list(
    "loads",
    [""],
    "Load variants: agents=N (offline) or aps=X (online); '' = default. Any variant item works (one column of the "
    "grid), e.g. policy.alpha_tokens=1000000 for a parameter sweep of the modes that take it.",
)
_EXTRA = flags.DEFINE_string("extra", "", "Extra variant items appended to every cell (e.g. dataset=48K).")
# --workers, --output_dir, --seeds, --plot, --overwrite: reproduce_paper (and simulate) define them too, with their own
# defaults and help; allow_override lets the launchers be imported into one process (the last one imported defines
# them there; absl raised DuplicateFlagError), and each launcher's command line is its own
_WORKERS = flags.DEFINE_integer("workers", 1, "Parallel worker processes.", lower_bound=1, allow_override=True)
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", "results/sweep", "Where sweep.csv / sweep.json / sweep.png go.", allow_override=True
)
_SEEDS = flags.DEFINE_list(
    "seeds",
    [],
    "Run every cell once per seed (seed=N added to its variant); empty: each config's own seed.",
    allow_override=True,
)
flags.register_validator(
    "seeds",
    lambda v: all(x.strip().lstrip("-").isdigit() for x in v) and len({int(x) for x in v}) == len(v),  # 0 = 00
    message="--seeds takes distinct integers, e.g. 0,1,2",
)
for _name in ("setups", "modes", "loads"):  # an empty list made an empty grid (a traceback from the progress bar)
    flags.register_validator(_name, bool, message=f"--{_name} needs at least one item")
# (an item given twice ran its cells twice: duplicate rows, drawn as two seeds of one cell)
register_distinct("setups", key=os.path.realpath)
register_distinct("modes")
register_distinct("loads")
_PLOT = flags.DEFINE_bool(
    "plot", True, "Write sweep.png (matplotlib): each setup's JCT and metrics over the loads.", allow_override=True
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite",
    False,
    "Replace an earlier sweep's sweep.csv / sweep.json in --output_dir (else: refused).",
    allow_override=True,
)

COLUMNS = [
    "setup",
    "mode",
    "load",
    "seed",
    "turns",
    "unfinished_turns",
    "jct_s",
    "ttft_p50_s",
    "ttft_p99_s",
    "tpot_p50_s",
    "snic_max_over_avg",
    "slo_attainment",
    "slo_met",
    "wall_s",
    "events_per_s",
    "turns_per_s",
]


def cell_spec(setup: str, mode: str, load: str, extra: str, seed: str = "") -> str:
    items = [x for x in (mode, load, extra, f"seed={seed}" if seed else "") if x]
    return f"{setup}:{','.join(items)}"


def run_cell(args: tuple[str, str, str, str, str]) -> dict:
    """One simulation (in a worker process); returns one row."""
    setup, mode, load, extra, seed = args
    from dualpath_jax.sim import load_sim_config, run

    cfg = load_sim_config(cell_spec(setup, mode, load, extra, seed), as_run=True)
    t0 = time.perf_counter()
    res = run(cfg)
    row = {"setup": os.path.basename(setup), "mode": mode, "load": load, "seed": cfg.seed}
    row.update({k: res.summary.get(k) for k in COLUMNS if k in res.summary})
    row.update({k: res.stats[k] for k in ("events_per_s", "turns_per_s")})
    row["wall_s"] = time.perf_counter() - t0
    return row


def run_grid(cells: Sequence[tuple[str, str, str, str, str]], workers: int) -> list[dict]:
    """Every cell's row, in the order of `cells`. A cell that failed (its run raised, its worker process was
    killed) is a row with its `error` and no figures; the other cells still run and report."""
    # a setup is named by its file name, or by its path where two setups share one (a/x.py, b/x.py: their rows
    # and plot lines were one setup's)
    names = {s: os.path.basename(s) for s in dict.fromkeys(c[0] for c in cells)}
    if len(set(names.values())) < len(names):
        names = {s: s for s in names}
    rows = []
    for c, (row, error) in zip(cells, run_jobs(run_cell, list(cells), workers, "sweep"), strict=True):
        setup, mode, load, _, seed = c
        if error is not None:
            # the seed as the finished rows have it, a number (it was --seeds' text: "1" beside 1 in sweep.json)
            row = {"setup": setup, "mode": mode, "load": load, "seed": int(seed) if seed else None, "error": error}
        row["setup"] = names[setup]
        row["spec"] = cell_spec(*c)  # what the cell ran, as one `file:variant` (sweep.json; not a sweep.csv column)
        rows.append(row)
    return rows


# What sweep.png shows per setup: (column, axis label); online cells (slo_attainment set) plot their SLO row
_PLOT_METRICS = [
    ("jct_s", "JCT (s)"),
    ("ttft_p50_s", "TTFT p50 (s)"),
    ("snic_max_over_avg", "storage-NIC max / avg"),
    ("slo_attainment", "SLO attainment"),
]


def plot_sweep(rows: Sequence[dict], path: str) -> bool:
    """One row of panels per setup: each metric of `_PLOT_METRICS` the cells have, over the loads (in the order
    given), one line per mode; with several seeds, the line is their mean and the bars their [min, max]. Skipped
    (logged) without matplotlib."""
    plt = pyplot_or_none("sweep.png")
    if plt is None:
        return False
    setups = list(dict.fromkeys(r["setup"] for r in rows))
    metrics = [(k, label) for k, label in _PLOT_METRICS if any(r.get(k) is not None for r in rows)]
    fig, axes = plt.subplots(len(setups), len(metrics), figsize=(4 * len(metrics), 3 * len(setups)), squeeze=False)
    for i, setup in enumerate(setups):
        mine = [r for r in rows if r["setup"] == setup]
        loads = list(dict.fromkeys(r["load"] for r in mine))
        for j, (key, label) in enumerate(metrics):
            ax = axes[i][j]
            for mode in dict.fromkeys(r["mode"] for r in mine):
                by_load: dict[str, list[float]] = {}
                for r in mine:
                    if r["mode"] == mode and r.get(key) is not None:
                        by_load.setdefault(r["load"], []).append(float(r[key]))
                vals = [by_load.get(ld, [float("nan")]) for ld in loads]
                mean = [sum(v) / len(v) for v in vals]
                err = [[m - min(v) for m, v in zip(mean, vals, strict=True)],
                       [max(v) - m for m, v in zip(mean, vals, strict=True)]]  # fmt: skip
                ax.errorbar(range(len(loads)), mean, yerr=err, marker="o", capsize=3, label=mode)
            ax.set_xticks(range(len(loads)), [ld or "default" for ld in loads], rotation=20, fontsize=7)
            ax.set_ylabel(label)
            ax.set_title(setup, fontsize=8)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unknown arguments: {argv[1:]}")
    started = time.time()  # (run.json: the start and the wall time)
    import numpy

    logging.info("python %s, numpy %s", platform.python_version(), numpy.__version__)
    logging.info(
        "setups=%s modes=%s loads=%s extra=%r seeds=%s workers=%d",
        _SETUPS.value,
        _MODES.value,
        _LOADS.value,
        _EXTRA.value,
        _SEEDS.value,
        _WORKERS.value,
    )
    for s in _SETUPS.value:  # one line naming the setup (a UsageError printed the whole --help above it)
        if not os.path.isfile(s):
            why = "is a directory, not a config file" if os.path.isdir(s) else "does not exist"
            hint = " (a setup is a file; variant items go in --modes, --loads or --extra)" if ":" in s else ""
            raise SystemExit(f"bad --setups: config file {s!r} {why}{hint}")
    seeds = [str(int(x)) for x in _SEEDS.value] or [""]
    if _SEEDS.value and any(item.strip().startswith("seed=") for item in _EXTRA.value.split(",")):
        raise SystemExit("bad --extra: --seeds and a seed= item in --extra both set the seed; use one")
    cells = [
        (s, m, ld, _EXTRA.value, sd) for s in _SETUPS.value for m in _MODES.value for ld in _LOADS.value for sd in seeds
    ]
    with SigtermAsInterrupt() as term:
        try:
            traces = _check_cells(cells)
        except Terminated:
            raise SystemExit("sweep: stopped by SIGTERM before any cell ran (nothing written)") from None
        writable_dir_or_exit(_OUTPUT_DIR.value, "--output_dir")  # before the grid runs, not after
        # an earlier sweep's results are kept (a failed sweep wrote its partial rows over them)
        no_earlier_results_or_exit(_OUTPUT_DIR.value, ("sweep.csv", "sweep.json"), "--output_dir", _OVERWRITE.value)
        rows = run_grid(cells, _WORKERS.value)
        term.raising = False  # SIGTERM from here on: noted, and the exit comes after the results are written
        _write_results(rows, cells, term, started, traces)


def _check_cells(cells) -> list[str]:
    """Every cell's simulator is built first (config, workload, and the check that every turn fits a DE): a bad cell
    stops the sweep before anything runs. Returns the trace paths the cells read (run.json)."""
    from dualpath_jax.sim import load_sim_config
    from dualpath_jax.sim.configs_io import ConfigFileError
    from dualpath_jax.sim.runner import build_simulator

    traces = []
    for c in cells:
        try:
            cfg = load_sim_config(cell_spec(*c), as_run=True)
            build_simulator(cfg)
        except ConfigFileError as e:  # the --setups file itself does not load (not Python, no get_config, ...)
            raise SystemExit(f"bad config: {e}") from None
        except (ValueError, KeyError) as e:
            raise SystemExit(f"bad sweep cell {cell_spec(*c)!r}: {e.args[0] if e.args else e}") from None
        except SystemExit as e:  # the setup's own sys.exit (0 ended the sweep "successfully", with nothing run)
            raise SystemExit(f"bad sweep cell {cell_spec(*c)!r}: {error_line(e)}") from None
        if cfg.workload.kind == "trace":
            traces.append(cfg.workload.trace_path)
    return traces


def _write_results(rows: list[dict], cells, term: SigtermAsInterrupt, started: float, traces: list[str]) -> None:
    """sweep.csv / sweep.json / sweep.png / run.json of `rows` (the failed cells' rows say why), the table; then a
    failing exit naming the failed cells, or saying that SIGTERM stopped the sweep (`term.got`)."""
    from dualpath_jax.metrics import json_safe, run_info, write_run_info

    for r in rows:  # (run_jobs stopped the cells as for Ctrl-C)
        if "error" in r:
            r["error"] = term.error_line(r["error"])
    failed = [(c, r["error"]) for c, r in zip(cells, rows, strict=True) if "error" in r]
    with open(os.path.join(_OUTPUT_DIR.value, "sweep.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS + (["error"] if failed else []), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(_OUTPUT_DIR.value, "sweep.json"), "w") as f:
        json.dump(json_safe(rows), f, indent=1, default=str)  # NaN (e.g. oracle's storage-NIC max/avg): null
    print("  ".join(COLUMNS))
    for r in rows:
        print("  ".join(_fmt(r.get(k)) for k in COLUMNS))
    png = os.path.join(_OUTPUT_DIR.value, "sweep.png")
    ran = [r for r in rows if "error" not in r]
    if _PLOT.value and ran and plot_sweep(ran, png):
        print("wrote", png)
    elif os.path.exists(png):  # an earlier sweep's plot would pass for this one's
        os.remove(png)
        logging.info("removed %s: an earlier sweep's plot (none was drawn for this one)", png)
    print("wrote", os.path.join(_OUTPUT_DIR.value, "sweep.csv"))
    # what ran, and the line that runs it again into a directory of its own (README "What ran")
    cells_run = [cell_spec(*c) for c in cells]
    info = run_info("experiments.sweep", started, output_dir=_OUTPUT_DIR.value, traces=traces, cells=cells_run)
    print("wrote", write_run_info(_OUTPUT_DIR.value, info))
    stopped = (
        f"sweep: stopped by SIGTERM; the {len(rows) - len(failed)} finished cells of {len(rows)} are in "
        f"{os.path.join(_OUTPUT_DIR.value, 'sweep.csv')}\n"
        if term.got
        else ""
    )
    if failed:  # after the others' results are written: one line per failed cell, and a failing exit code
        raise SystemExit(
            f"{stopped}sweep: {len(failed)} of {len(rows)} cells failed (their rows say so):\n"
            + "\n".join(f"  {cell_spec(*c)}: {err}" for c, err in failed)
        )
    if term.got:  # (it came after the last cell finished: every result is written)
        raise SystemExit(stopped.rstrip())


if __name__ == "__main__":
    app.run(main)
