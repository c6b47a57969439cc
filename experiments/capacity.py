"""Search the online capacity of one's own setups: the highest agent arrival rate (APS) whose turns meet the SLO.

  python -m experiments.capacity                                   # configs/sim_tiny.py, basic and dualpath
  python -m experiments.capacity --setups=configs/my_setup.py --modes=basic,dualpath --lo=0.05 --hi=1 --iters=5 \\
      --extra=duration=4800,warmup=2400 --workers=2
  python -m experiments.capacity --setups=configs/paper_ds27b.py --modes=basic,dualpath_rr+policy.full_de=wait \\
      --extra=dataset=48K,cluster.snic_gbps=25 --slo_ttft_s=2 --seeds=0,1

Each search is `dualpath_jax.sim.capacity.capacity_search` (bisection on APS in [--lo, --hi], --iters steps) of one
`<setup>:<mode>,kind=online,<extra>[,seed=N]` (configs/sim_base.py variant syntax: its dataset's synthetic agents;
a setup that replays a trace is refused); a --modes item is a mode or
registered policy, or any variant items joined by '+' (`dualpath_rr+policy.full_de=wait`). The SLO is the config's
(`slo_ttft_s`, `slo_tpot_s`, `slo_percentile`; turns arriving in [`warmup_s`, `workload.duration_s`) are judged):
`warmup=` / `duration=` items in --extra set the window, --slo_ttft_s / --slo_tpot_s / --slo_percentile the bounds
(no variant item sets those). Searches run in parallel processes (--workers), each one's probes in turn.

Writes under --output_dir (default results/capacity): capacity.json (every search with every probe: aps, slo_met,
attainment, TTFT / TPOT at the percentile), capacity.csv (one row per search), capacity.png (per setup: the SLO
attainment of every probe over APS, a line per mode, each capacity marked) and run.json (what ran:
dualpath_jax.metrics.run_info), and prints the table with each mode's gain over the first mode of its setup (the
ratio of the met APS, and the range the two brackets allow; "n/a" where either is not measured or is the whole
[--lo, --hi): --iters=0). A --lo under half an agent per probe (lo x duration_s < 0.5) is refused: the simulator
runs at least one agent, a higher APS than the probe's. A
capacity is a bracket [highest APS met, lowest missed); a search whose --lo already misses is "< lo", one whose
--hi meets is ">= hi" (no measured number: widen the bracket), one with a probe that judged no turn (none arrived
in the window) "n/a", with a line saying so. A directory that holds an earlier search's
capacity.csv / capacity.json is refused unless --overwrite.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Sequence

from absl import app, flags, logging

from dualpath_jax import clock, compiled
from experiments import (
    SigtermAsInterrupt,
    check_cell_or_exit,
    define_rerun_of,
    exit_if_stopped_or_failed,
    hold_dir_or_exit,
    interrupted_by,
    job_step,
    log_start,
    mode_items,
    mode_styles,
    no_earlier_results_or_exit,
    parse_flags_checking_rerun,
    pyplot_or_none,
    register_distinct,
    register_seeds,
    run_jobs,
    setup_files_or_exit,
    setup_names,
    stopped_by,
    table_cell,
    variant_item_key,
    writable_dir_or_exit,
    write_atomically,
)

LAUNCHER = "experiments.capacity"  # (run.json's module; a directory another launcher's run.json is in: refused)

# (allow_override on every flag: sweep and reproduce_paper define some of these names too, with their own defaults
# and help; the launchers import into one process, and the one run defines its flags last)
_SETUPS = flags.DEFINE_list(
    "setups",
    [os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "sim_tiny.py"))],
    "Config files (configs/paper_*.py, one's own configs/my_setup.py).",
    allow_override=True,
)
_MODES = flags.DEFINE_list(
    "modes",
    ["basic", "dualpath"],
    "Modes or registered policy names, each searched; a mode's own variant items follow it joined by '+' "
    "(dualpath_rr+policy.full_de=wait). Each gain is over the first mode.",
    allow_override=True,
)
_EXTRA = flags.DEFINE_string(
    "extra",
    "",
    "Variant items for every search, e.g. dataset=48K, duration=1200,warmup=600 (the SLO window), "
    "cluster.snic_gbps=25.",
    allow_override=True,
)
_LO = flags.DEFINE_float(
    "lo", 0.5, "Lowest APS of the bisection (probed first: a miss there is '< lo'); at least 0.5 / duration_s."
)
_HI = flags.DEFINE_float("hi", 16.0, "Highest APS of the bisection (a met SLO there is '>= hi').")
_ITERS = flags.DEFINE_integer("iters", 5, "Bisection steps of each search after --lo and --hi.", lower_bound=0)
_SLO_TTFT = flags.DEFINE_float("slo_ttft_s", None, "The SLO's TTFT bound in s (default: each config's slo_ttft_s).")
_SLO_TPOT = flags.DEFINE_float("slo_tpot_s", None, "The SLO's TPOT bound in s (default: each config's slo_tpot_s).")
_SLO_PCT = flags.DEFINE_float(
    "slo_percentile", None, "The SLO's percentile of TTFT and TPOT (default: each config's slo_percentile)."
)
_SEEDS = flags.DEFINE_list(
    "seeds",
    [],
    "Run every search once per seed (seed=N added to its variant); empty: each config's own seed.",
    allow_override=True,
)
_WORKERS = flags.DEFINE_integer(
    "workers", 1, "Parallel worker processes (one search each).", lower_bound=1, allow_override=True
)
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", "results/capacity", "Where capacity.csv / capacity.json / capacity.png go.", allow_override=True
)
_PLOT = flags.DEFINE_bool(
    "plot", True, "Write capacity.png (matplotlib): each probe's SLO attainment over APS.", allow_override=True
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite",
    False,
    "Replace an earlier search's capacity.csv / capacity.json in --output_dir (else: refused).",
    allow_override=True,
)
flags.register_multi_flags_validator(
    ["lo", "hi"],
    lambda f: 0 < f["lo"] < f["hi"] < math.inf,  # (NaN too)
    message="--lo and --hi bracket the capacity: they need 0 < lo < hi, both finite",
)
register_seeds()
define_rerun_of()
for _name in ("setups", "modes"):
    flags.register_validator(_name, bool, message=f"--{_name} needs at least one item")
register_distinct("setups", key=os.path.realpath)
# (dualpath+policy.x=1 and dualpath+policy.x=01: one search run twice)
register_distinct("modes", key=lambda mode: tuple(variant_item_key(i) for i in mode_items(mode)))

RESULTS = ("capacity.csv", "capacity.json")  # an earlier search's, refused unless --overwrite

COLUMNS = [
    "setup",
    "mode",
    "seed",
    "capacity",
    "capacity_aps",
    "met_aps",
    "missed_aps",
    "probes",
    "gain",
    "slo_ttft_s",
    "slo_tpot_s",
    "slo_percentile",
    "warmup_s",
    "duration_s",
    "wall_s",
    "gain_low",  # (the gain's range from the two brackets: `add_gains`)
    "gain_high",
]

Search = tuple[str, str, str, str]  # (setup, mode, extra, seed)


def search_spec(setup: str, mode: str, extra: str, seed: str = "") -> str:
    """The `file:variant` a search loads: its probes make the workload online at each APS (`kind=online`)."""
    items = [*mode_items(mode), "kind=online", extra, f"seed={seed}" if seed else ""]
    return f"{setup}:{','.join(x for x in items if x)}"


def slo_overrides() -> dict:
    """The --slo_* flags given, as config overrides."""
    given = {"slo_ttft_s": _SLO_TTFT.value, "slo_tpot_s": _SLO_TPOT.value, "slo_percentile": _SLO_PCT.value}
    return {k: float(v) for k, v in given.items() if v is not None}


def load_search_config(s: Search, overrides: dict):
    from dualpath_jax.sim import load_sim_config

    return load_sim_config(search_spec(*s), overrides, as_run=True)


def _probe_line(name: str, p: dict, pct: str) -> str:
    if not p["slo_turns"]:  # no verdict, as the table's "n/a" (it said "SLO missed, attainment nan%")
        return f"capacity {name}: {p['aps']:.4g} APS: no turn judged (none arrived in the SLO window): no verdict"
    met = "met" if p["slo_met"] else "missed"
    att = p["slo_attainment"]
    ttft, tpot = p.get(f"ttft_p{pct}_s", math.nan), p.get(f"tpot_p{pct}_s", math.nan)
    return (
        f"capacity {name}: {p['aps']:.4g} APS: SLO {met}, attainment {att:.1%}, TTFT p{pct} {ttft:.3g} s, "
        f"TPOT p{pct} {tpot * 1e3:.3g} ms ({p['slo_turns']} turns judged)"
    )


def run_search(args: tuple[Search, dict, float, float, int, str]) -> dict:
    """One capacity search (in a worker process), with a line and a bar step per probe; returns its result."""
    s, overrides, lo, hi, iters, name = args
    from dualpath_jax.sim.capacity import capacity_search

    cfg = load_search_config(s, overrides)
    pct = f"{cfg.slo_percentile:g}"
    t0 = time.perf_counter()
    # (job_step: the line above run_jobs' bar, from a worker process too, and the bar one probe on)
    out = capacity_search(cfg, lo, hi, iters=iters, on_probe=lambda p: job_step(_probe_line(name, p, pct)))
    out["wall_s"] = time.perf_counter() - t0
    out["seed"] = cfg.seed
    out["slo"] = {
        "ttft_s": cfg.slo_ttft_s,
        "tpot_s": cfg.slo_tpot_s,
        "percentile": cfg.slo_percentile,
        "warmup_s": cfg.warmup_s,
        "duration_s": cfg.workload.duration_s,
    }
    return out


def _num(v: float) -> str:
    return f"{v:.4g}"


def search_row(s: Search, result: dict | None, error: str | None, name: str, lo: float, hi: float) -> dict:
    """One search's row (capacity.json; capacity.csv its columns): the bracket it found, `capacity` as text, and
    `capacity_aps` only where it is measured ("< lo": lo missed; ">= hi": hi met; "n/a": a probe judged no turn, its
    `unjudged_aps`; all three: None)."""
    setup, mode, _, seed = s
    row = {
        "setup": name,
        "mode": mode,
        "seed": int(seed) if seed else None,
        "spec": search_spec(*s),
        "lo": lo,
        "hi": hi,
    }
    if error is not None:
        return {**row, "error": error}
    probes = result["probes"]
    met = [p["aps"] for p in probes if p["slo_met"]]
    # a probe that judged no turn (none arrived in the window) is no verdict; slo_summary's miss made "< lo" of it
    unjudged = [p["aps"] for p in probes if not p["slo_turns"]]
    missed = [p["aps"] for p in probes if not p["slo_met"] and p["slo_turns"]]
    row["seed"] = result["seed"]
    if unjudged:  # (the bisection took it for a miss: its bracket is not measured either)
        row.update(bound="no_turn_judged", capacity="n/a", capacity_aps=None, unjudged_aps=unjudged)
    elif not met:
        row.update(bound="below_lo", capacity=f"< {_num(lo)}", capacity_aps=None)
    elif not missed:
        row.update(bound="at_hi", capacity=f">= {_num(hi)}", capacity_aps=None)
    else:
        row.update(bound="measured", capacity=_num(result["capacity_aps"]), capacity_aps=result["capacity_aps"])
    row["met_aps"] = max(met) if met else None  # the bracket: the highest APS met, the lowest missed
    row["missed_aps"] = min(missed) if missed else None
    row["probes"] = len(probes)
    row.update({f"slo_{k}" if k in ("ttft_s", "tpot_s", "percentile") else k: v for k, v in result["slo"].items()})
    row["wall_s"] = result["wall_s"]
    row["probe_results"] = probes
    return row


def _whole_range(r: dict) -> bool:
    """Whether a measured search's bracket is its whole [lo, hi): no bisection step narrowed it (--iters=0)."""
    return (r["met_aps"], r["missed_aps"]) == (r["lo"], r["hi"])


def add_gains(rows: list[dict], searches: Sequence[Search]) -> None:
    """Each row's `gain`: its capacity over that of the first mode of its setup (and seed), where both are
    measured, with the range the two brackets allow (`gain_low` = its met / the first's missed APS, `gain_high` =
    its missed / the first's met APS: each capacity lies in [met, missed)); else None and `gain_note` says why: a
    capacity not measured ('< lo', '>= hi', 'n/a', a failed search), or a bracket that is the whole search range
    (--iters=0: the gain of two `lo`s was 1x whatever the capacities). The first mode's own row has none."""
    first: dict = {}
    keys = [(s[0], s[3]) for s in searches]  # (as given: a failed search's row has no seed of its config)
    for r, k in zip(rows, keys, strict=True):
        first.setdefault(k, r)
    for r, k in zip(rows, keys, strict=True):
        base = first[k]
        if r is base:
            continue
        r["gain_over"] = base["mode"]
        r["gain"] = r["gain_low"] = r["gain_high"] = None
        who = next((x for x in (r, base) if x.get("capacity_aps") is None), None)
        wide = next((x for x in (r, base) if who is None and _whole_range(x)), None)
        if who is not None:
            r["gain_note"] = f"{who['mode']} " + ("failed" if "error" in who else f"capacity {who['capacity']}")
        elif wide is not None:
            r["gain_note"] = (
                f"{wide['mode']} bracket [{_num(wide['lo'])}, {_num(wide['hi'])}) is the whole search range: no "
                "bisection step (--iters)"
            )
        elif base["capacity_aps"] > 0:
            r["gain"] = r["capacity_aps"] / base["capacity_aps"]
            r["gain_low"] = r["met_aps"] / base["missed_aps"]
            r["gain_high"] = r["missed_aps"] / base["met_aps"]


def gain_text(r: dict) -> str:
    if "gain_over" not in r:
        return "-"
    if r["gain"] is None:
        return f"{r['mode']} / {r['gain_over']}: n/a ({r.get('gain_note', 'no capacity')})"
    span = f" ({r['gain_low']:.3g}x..{r['gain_high']:.3g}x)" if r.get("gain_low") is not None else ""
    return f"{r['mode']} / {r['gain_over']}: {r['gain']:.3g}x{span}"


def plot_capacity(rows: Sequence[dict], path: str) -> bool:
    """One panel per setup: the SLO attainment of every probe over APS, a line per search (a colour per mode, the
    same in every panel; a line style per seed), its capacity marked by a dashed line (measured ones only), the SLO
    and its window in the panel's title. Skipped (logged) without matplotlib."""
    plt = pyplot_or_none("capacity.png")
    if plt is None:
        return False
    from dualpath_jax.sim.outputs import plain_log_ticks

    setups = list(dict.fromkeys(r["setup"] for r in rows)) or ["no search ran"]
    fig, axes = plt.subplots(1, len(setups), figsize=(5.5 * len(setups), 4), squeeze=False)
    seeds = list(dict.fromkeys(r["seed"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    style = mode_styles(modes, largest=8)
    styles = ("-", "--", ":", "-.")
    for ax, setup in zip(axes[0], setups, strict=True):
        mine = [r for r in rows if r["setup"] == setup]
        for r in mine:
            probes = sorted(r["probe_results"], key=lambda p: p["aps"])
            label = f"{r['mode']} (seed {r['seed']})" if len(seeds) > 1 else r["mode"]
            label += f": {r['capacity']} APS"
            att = [math.nan if p["slo_attainment"] is None else p["slo_attainment"] for p in probes]
            ls = styles[seeds.index(r["seed"]) % len(styles)]
            st = style[r["mode"]]
            ax.plot([p["aps"] for p in probes], att, ls=ls, label=label, **st)
            missed = [(p["aps"], a) for p, a in zip(probes, att, strict=True) if not p["slo_met"]]
            if missed:  # a missed probe hollow
                ax.plot(*zip(*missed, strict=True), ls="none", marker=st["marker"], color="white", ms=st["ms"] / 2)
            if r["capacity_aps"] is not None:
                ax.axvline(r["capacity_aps"], color=st["color"], linestyle="--", linewidth=1)
        if not any(r["probe_results"] for r in mine):
            ax.text(0.5, 0.5, "no probe ran", transform=ax.transAxes, ha="center", va="center", color="gray")
        else:
            ax.set_xscale("log")
            plain_log_ticks(ax)  # (its minor ticks were labelled 2x10^0, 3x10^0, ... over one another)
            ax.legend(fontsize=7, loc="best")
        ax.set_ylim(top=1.02)
        ax.set_xlabel("APS (agents / s)")
        ax.set_ylabel("SLO attainment (share of turns)")
        title = [setup, _slo_text(mine), "(hollow: SLO missed; dashed: capacity)"]
        ax.set_title("\n".join(t for t in title if t), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _slo_text(rows: Sequence[dict]) -> str:
    """`SLO: TTFT p90 <= 4 s, TPOT p90 <= 0.05 s, turns arriving in [2400, 4800) s`: the SLO of a panel's searches
    (empty when they differ or none ran)."""
    slos = {(r.get("slo_percentile"), r.get("slo_ttft_s"), r.get("slo_tpot_s"), r.get("warmup_s"), r.get("duration_s"))
            for r in rows}  # fmt: skip
    if len(slos) != 1 or None in next(iter(slos)):
        return ""
    pct, ttft, tpot, warmup, duration = next(iter(slos))
    return (
        f"SLO: TTFT p{pct:g} <= {ttft:g} s, TPOT p{pct:g} <= {tpot:g} s, turns arriving in [{warmup:g}, {duration:g}) s"
    )


def _check_searches(searches: Sequence[Search], overrides: dict, lo: float) -> None:
    """Every search's config loads and its simulator builds (at --lo) before any search runs: a bad setup, mode or
    item is one line, not a failed search minutes in."""
    import dataclasses

    from dualpath_jax.sim.runner import build_simulator

    def check(s: Search):
        cfg = load_search_config(s, overrides)
        build_simulator(dataclasses.replace(cfg, workload=dataclasses.replace(cfg.workload, aps=lo)))
        return cfg

    for s in searches:
        cfg = check_cell_or_exit(f"capacity search {search_spec(*s)!r}", check, s)
        one_agent_or_exit(cfg, lo, search_spec(*s))
        if cfg.workload.trace_path:  # (kind=online: its probes ran the dataset's synthetic agents, not the trace)
            raise SystemExit(
                f"bad --setups: {s[0]!r} replays a trace (config.workload.trace_path={cfg.workload.trace_path!r}): a "
                "capacity search runs the synthetic online agents of its dataset at each APS, not a trace; give a "
                "setup of synthetic agents"
            )


def one_agent_or_exit(cfg, lo: float, spec: str) -> None:
    """Refuse a --lo whose probe would have under half an agent (lo x duration_s < 0.5): the simulator runs at least
    one (`sim.runner`: round(aps x duration_s), at least 1), so that probe and every one up to 1.5 / duration_s
    ran the same single agent, each reported at its own APS ("0.001 APS: SLO met" and "0.01 APS: SLO met" were one
    run twice). Every probe is at or above --lo, so this one check covers the search."""
    duration = cfg.workload.duration_s
    if lo * duration < 0.5:
        raise SystemExit(
            f"bad --lo={lo:g}: a probe there has {lo * duration:.3g} agents ({lo:g} APS x duration_s {duration:g} of "
            f"{spec!r}) and the simulator runs at least one, a higher APS than probed; give --lo >= "
            f"{0.5 / duration:.3g} or a longer --extra=duration=..."
        )


def _check_items() -> None:
    """Items the search sets itself, or that two flags would both set: one line each."""
    for flag, text in (("--extra", _EXTRA.value), *(("--modes", m) for m in _MODES.value)):
        for item in mode_items(text.replace(",", "+")):
            key = item.partition("=")[0]
            if key in ("aps", "kind", "trace", "agents"):
                why = {
                    "aps": "the search varies the APS: give --lo / --hi",
                    "agents": "an online run has aps x duration agents",
                }.get(key, "the search runs an online workload")
                raise SystemExit(f"bad {flag}: {item!r} has no place in a capacity search ({why})")
            if key == "seed" and _SEEDS.value:
                raise SystemExit(f"bad {flag}: --seeds and a seed= item both set the seed; use one")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unknown arguments: {argv[1:]}")
    started = clock.now()
    lo, hi, iters = _LO.value, _HI.value, _ITERS.value
    log_start("experiments.capacity")
    setups = setup_files_or_exit(_SETUPS.value, "--modes or --extra")
    _check_items()
    seeds = [str(int(x)) for x in _SEEDS.value] or [""]
    searches = [(s, m, _EXTRA.value, sd) for s in setups for sd in seeds for m in _MODES.value]
    overrides = slo_overrides()
    out_dir = _OUTPUT_DIR.value
    # an occupied --output_dir: said before every search's simulator is built (minutes at paper scale); again after
    no_earlier_results_or_exit(out_dir, RESULTS, "--output_dir", _OVERWRITE.value, LAUNCHER)
    with SigtermAsInterrupt() as term:
        try:
            _check_searches(searches, overrides, lo)
        except KeyboardInterrupt as e:  # (Terminated too: SIGTERM; Ctrl-C was a traceback)
            raise SystemExit(
                f"capacity: stopped by {interrupted_by(e)} before any search ran (nothing written)"
            ) from None
        writable_dir_or_exit(out_dir, "--output_dir")
        hold_dir_or_exit(out_dir, "--output_dir")
        no_earlier_results_or_exit(out_dir, RESULTS, "--output_dir", _OVERWRITE.value, LAUNCHER)
        names = setup_names(c[0] for c in searches)
        jobs = [
            (s, overrides, lo, hi, iters, f"{names[s[0]]}:{s[1]}" + (f",seed={s[3]}" if s[3] else "")) for s in searches
        ]
        # (the bar counts probes, up to 2 + iters a search: counting searches, it stood still for a whole search)
        out = run_jobs(run_search, jobs, _WORKERS.value, "capacity", unit="probe", steps=2 + iters)
        term.hold()  # SIGTERM and Ctrl-C from here on: noted, and the exit comes after the results are written
        rows = [
            search_row(s, result, term.error_line(error), names[s[0]], lo, hi)
            for s, (result, error) in zip(searches, out, strict=True)
        ]
        _write_results(rows, searches, term, started)


def _write_results(rows: list[dict], searches: Sequence[Search], term: SigtermAsInterrupt, started: float) -> None:
    from dualpath_jax.metrics import json_safe, run_info, write_run_info

    out_dir = _OUTPUT_DIR.value
    add_gains(rows, searches)
    failed = [r for r in rows if "error" in r]

    def write_json(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(json_safe(rows), f, indent=1, default=str)

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS + (["error"] if failed else []), extrasaction="ignore")
            w.writeheader()
            w.writerows([{k: v for k, v in json_safe(r).items() if k != "probe_results"} for r in rows])

    # (written in place, a kill mid-write tore them; beside then renamed, the earlier file stays whole or none is there)
    write_atomically(os.path.join(out_dir, "capacity.json"), write_json)
    write_atomically(os.path.join(out_dir, "capacity.csv"), write_csv)
    slos = {
        (r["slo_ttft_s"], r["slo_tpot_s"], r["slo_percentile"], r["warmup_s"], r["duration_s"])
        for r in rows
        if "error" not in r
    }
    for ttft, tpot, pct, warmup, duration in sorted(slos):
        print(
            f"SLO: p{pct:g} TTFT <= {ttft:g} s and p{pct:g} TPOT <= {tpot * 1e3:g} ms, judged on the turns arriving "
            f"in [{warmup:g} s, {duration:g} s)"
        )
    header = ["setup", "mode", "seed", "capacity (APS)", "met / missed (APS)", "probes", "gain"]
    table = [header]
    for r in rows:
        if "error" in r:
            what = "stopped" if r["error"].startswith("interrupted") else "failed"  # (Ctrl-C / SIGTERM: not run)
            table.append([r["setup"], r["mode"], table_cell(r["seed"]), what, "-", "-", "-"])
            continue
        bracket = f"{table_cell(r['met_aps'])} / {table_cell(r['missed_aps'])}"
        table.append(
            [r["setup"], r["mode"], table_cell(r["seed"]), r["capacity"], bracket, str(r["probes"]), gain_text(r)]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(c.ljust(wd) for c, wd in zip(row, widths, strict=True)).rstrip())
    for r in rows:
        if r.get("unjudged_aps"):
            print(
                f"capacity: {r['setup']}:{r['mode']}, seed {r['seed']}: no turn arrived in the SLO window "
                f"[{r['warmup_s']:g} s, {r['duration_s']:g} s) at {', '.join(map(_num, r['unjudged_aps']))} APS: no "
                "verdict there (widen the window, --extra=warmup=...,duration=..., or raise --lo)"
            )
    png = os.path.join(out_dir, "capacity.png")
    ran = [r for r in rows if "error" not in r]
    if _PLOT.value and ran and plot_capacity(ran, png):
        print("wrote", png)
    elif os.path.exists(png):  # an earlier search's plot would pass for this one's
        os.remove(png)
        logging.info("removed %s: an earlier search's plot (none was drawn for this one)", png)
    print("wrote", os.path.join(out_dir, "capacity.csv"), "and capacity.json")
    info = run_info(
        LAUNCHER,
        started,
        output_dir=out_dir,
        searches=[search_spec(*s) for s in searches],
        bracket={"lo": _LO.value, "hi": _HI.value, "iters": _ITERS.value},
        slo_overrides=slo_overrides(),
        compiled=compiled.status(),  # (the simulator's compiled hot paths, or the Python twins: same figures, not times)
    )
    print("wrote", write_run_info(out_dir, info))
    exit_if_stopped_or_failed(
        "capacity",
        "searches",
        len(rows),
        [f"{r['spec']}: {r['error']}" for r in failed],
        os.path.join(out_dir, "capacity.csv"),
        stopped_by(term),
    )


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags_checking_rerun)
