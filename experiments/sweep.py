"""Run a grid of simulations (setups x policies/modes x loads) in parallel processes, with a progress bar.

  python -m experiments.sweep --setups=configs/paper_ds660b.py,configs/paper_ds27b.py \\
      --modes=basic,dualpath_rr,dualpath,oracle --loads=agents=512,agents=1024 --workers=2
  python -m experiments.sweep --setups=configs/sim_tiny.py --modes=basic,dualpath --loads=aps=0.2,aps=0.5
  python -m experiments.sweep --setups=configs/paper_ds660b.py --modes=dualpath_rr,dualpath --seeds=0,1,2,3
  python -m experiments.sweep --modes=round_robin,dualpath,dualpath+policy.alpha_tokens=500000   # a policy's own fields

Each cell is `<setup>:<mode>,<load>` (configs/sim_base.py variant syntax; a mode's own items joined to it by '+'). Writes sweep.csv, sweep.json (each row
with its cell's `spec`), run.json (what ran: dualpath_jax.metrics.run_info) and sweep.png (per setup: JCT, TTFT,
storage-NIC max/avg and, online, SLO attainment over the loads, a line per mode) under --output_dir (default
results/sweep) and prints the table. A directory that holds an earlier sweep's
sweep.csv / sweep.json / sweep.rows.jsonl is refused unless --overwrite (its results are removed as the sweep
starts) or --resume.

Each cell's row (the one sweep.json gets, a failed cell's with its `error`) is also appended, as the cell finishes,
to sweep.rows.jsonl, one JSON line, flushed and fsynced: a driver killed hard (kill -9, the OOM killer, a reboot)
loses no finished cell. Once sweep.json holds every row (it is written beside and renamed over, so one of the two
always has them) the log is removed: a finished directory holds what it did before, and a second file with the
same rows could not go stale beside it. `--resume` (same command, plus --resume) keeps each cell an earlier sweep
in --output_dir finished (its rows in sweep.json and sweep.rows.jsonl) and runs only the others; the results are
written as one run would write them, and run.json names the kept cells (`resumed_cells`; its `rerun` line ends with
--noresume: a re-run runs every cell). A kept row whose setup
file or trace changed since (its `setup_sha256`, `trace_sha256`) is refused, and so is one an older sweep wrote without
such a digest (it cannot be checked); one of other code (its `code`, the git commit) is kept, logged and named in
run.json (`resumed_code`), and where either side knows no commit (outside a git checkout) a warning says the code cannot
be compared. An older sweep's sweep.json (rows without a `spec`) cannot be resumed. With nothing earlier there it runs
every cell.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import platform
import re
import time
from collections.abc import Sequence

from absl import app, flags, logging

from dualpath_jax import clock, compiled
from dualpath_jax.metrics import file_sha256
from experiments import (
    SigtermAsInterrupt,
    check_cell_or_exit,
    define_rerun_of,
    exit_if_stopped_or_failed,
    hold_dir_or_exit,
    interrupted_by,
    mean_within,
    mode_items,
    mode_styles,
    no_earlier_results_or_exit,
    own_flags,
    parse_flags_or_exit,
    policy_mistake,
    pyplot_or_none,
    reclaim_flags,
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


def _check_modes(modes: list[str]) -> bool:
    """A --modes item that starts with a variant item (`--modes=dualpath,policy.alpha_tokens=5`, as
    `experiments.run --config.policies` reads it) ran as a mode of its own: the setup's default policy with that field,
    labelled `policy.alpha_tokens=5`, whichever mode it was meant for (or refused, when that policy does not take it)."""
    for mode in modes:
        items = mode_items(mode)
        if items and "=" in items[0]:
            raise flags.ValidationError(
                f"--modes item {mode!r} is a variant item, not a mode or policy name: join a policy's own fields to its "
                f"name with '+' (dualpath+{items[0]}), or give them to every mode with --extra, or as the grid's columns "
                "with --loads"
            )
    return True


# the default in this repository, so that it runs from any directory (relative setups are the working directory's)
_SETUPS = flags.DEFINE_list(
    "setups",
    [os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "sim_tiny.py"))],
    "Config files (configs/paper_*.py).",
)
_MODES = flags.DEFINE_list(
    "modes",
    ["basic", "dualpath"],
    "Modes or registered policy names, each with variant items of its own joined by '+' (a policy's own fields: "
    "dualpath+policy.alpha_tokens=500000, mine+policy.side=pe), as experiments.capacity's --modes.",
)
_LOADS = flags.DEFINE_list(
    "loads",
    [""],
    "Load variants: agents=N (offline) or aps=X (online); unset: one column, each setup's own load. Any variant item "
    "works (one column of the grid), e.g. policy.alpha_tokens=1000000 for a parameter sweep of the modes that take it.",
)
# (its default, [""], showed in --helpfull as '""', a value no one types: no default line, the help says it)
flags.FLAGS["loads"].default_as_str = None
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
register_seeds()
flags.register_validator("modes", _check_modes)


def _no_empty_item(name: str):
    def check(items: list[str]) -> bool:
        # (a doubled comma, agents=8,,agents=16, ran an extra cell at the config's default, labelled '')
        empty = [n for n, item in enumerate(items, 1) if not item.strip()]
        if empty and len(items) > 1:
            default = (
                "; to run the config's own load beside others, name its value (e.g. agents=16)"
                if name == "loads"
                else ""
            )
            raise flags.ValidationError(
                f"--{name} item {empty[0]} of {len(items)} is empty (a doubled or trailing comma?){default}"
            )
        return True

    return check


# (--setups=a.py, said "config file '' does not exist"; --extra=a=1,,b=2 passed without a word)
for _name in ("setups", "modes", "loads"):
    flags.register_validator(_name, _no_empty_item(_name))
flags.register_validator("extra", lambda extra: _no_empty_item("extra")(extra.split(",")))
for _name in ("setups", "modes", "loads"):  # an empty list made an empty grid (a traceback from the progress bar)
    flags.register_validator(_name, bool, message=f"--{_name} needs at least one item")
# (an item given twice ran its cells twice: duplicate rows, drawn as two seeds of one cell)
register_distinct("setups", key=os.path.realpath)
register_distinct("modes", key=lambda mode: tuple(variant_item_key(i) for i in mode_items(mode)))
register_distinct("loads", key=variant_item_key)  # (agents=2 and agents=02: one load)
_PLOT = flags.DEFINE_bool(
    "plot", True, "Write sweep.png (matplotlib): each setup's JCT and metrics over the loads.", allow_override=True
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite",
    False,
    "Replace an earlier sweep's sweep.csv / sweep.json / sweep.rows.jsonl in --output_dir (else: refused).",
    allow_override=True,
)
_RESUME = flags.DEFINE_bool(
    "resume",
    False,
    "Go on with an earlier (stopped or killed) sweep in --output_dir: keep each cell it finished (its sweep.json / "
    "sweep.rows.jsonl rows) and run only the others. Give the same --setups/--modes/--loads/--extra/--seeds.",
)

# (put back by parse_flags where a launcher imported later into this process replaced some: `reclaim_flags`)
define_rerun_of()
_OWN_FLAGS = own_flags(_SETUPS, _MODES, _LOADS, _EXTRA, _WORKERS, _OUTPUT_DIR, _SEEDS, _PLOT, _OVERWRITE, _RESUME)

RESULTS = ("sweep.csv", "sweep.json", "sweep.rows.jsonl")  # an earlier sweep's, refused unless --overwrite/--resume
ROWS_LOG = "sweep.rows.jsonl"  # each cell's row, appended as it finishes (--resume reads it)

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
    "hit_rate",
    "store_evicted_bytes",  # (these two: a bounded store's, cluster.store_capacity_gb; "-" / empty when unbounded)
    "store_lost_lookups",
    "slo_attainment",
    "slo_met",
    "wall_s",
    "events_per_s",
    "turns_per_s",
]


def judged_keys(summary: dict, percentile: float) -> list[str]:
    """The summary keys of an SLO-judged cell's TTFT / TPOT at the SLO's percentile over its window, the figures its
    `slo_met` rests on: `ttft_p{q}_s` / `tpot_p{q}_s`, or at 50 / 99 `slo_ttft_p{q}_s` / `slo_tpot_p{q}_s`
    (`metrics.with_slo`: `ttft_p99_s` there is every turn's); none for a cell with no SLO (offline)."""
    from dualpath_jax import metrics

    return metrics.judged_keys(summary, percentile) if "slo_met" in summary else []


_JUDGED = re.compile(r"(slo_)?(ttft|tpot)_p[0-9.e+-]+_s")  # (`judged_keys`' names)


def columns(rows: Sequence[dict]) -> list[str]:
    """sweep.csv's columns and the table's: COLUMNS, then the judged percentiles' keys the rows have (`judged_keys`:
    a TTFT / TPOT pair per SLO percentile of the grid, in the rows' order; an offline grid has none)."""
    extra = [k for r in rows for k in r if k not in COLUMNS and _JUDGED.fullmatch(k)]
    return COLUMNS + list(dict.fromkeys(extra))


def cell_spec(setup: str, mode: str, load: str, extra: str, seed: str = "") -> str:
    items = [x for x in (*mode_items(mode), load, extra, f"seed={seed}" if seed else "") if x]
    return f"{setup}:{','.join(items)}"


def run_cell(args: tuple[str, str, str, str, str]) -> dict:
    """One simulation (in a worker process); returns one row."""
    setup, mode, load, extra, seed = args
    from dualpath_jax.sim import load_sim_config, run
    from dualpath_jax.sim.runner import PolicyError

    cfg = load_sim_config(cell_spec(setup, mode, load, extra, seed), as_run=True)
    t0 = time.perf_counter()
    try:
        res = run(cfg)
    except (PolicyError, RuntimeError, TypeError) as e:  # the policy's own mistake: its file:line, as simulate says
        why = policy_mistake(e, cfg.policy, cfg.batcher, log=logging.warning)  # (a worker logs no info lines)
        if why is None:
            raise
        raise PolicyError(why) from None
    row = {"setup": os.path.basename(setup), "mode": mode, "load": load, "seed": cfg.seed}
    row.update({k: res.summary.get(k) for k in COLUMNS if k in res.summary})
    judged = judged_keys(res.summary, cfg.slo_percentile)  # (online / trace cells: the SLO's percentiles)
    row.update({k: res.summary[k] for k in judged})
    row.update({k: res.stats[k] for k in ("events_per_s", "turns_per_s")})
    row["wall_s"] = time.perf_counter() - t0
    return row


_CELL_INFO: dict[tuple, dict] = {}  # each checked cell's `cell_info` (`_check_cells`), for its row (`_grid_row`)


def cell_info(cfg) -> dict:
    """What a cell's row records of its config beside its figures: the source file of its policy of one's own and
    the file's sha256 (`policy_source`: --resume refuses the rows of one edited since), and for an online or trace
    cell the SLO its slo_attainment / slo_met judge (`slo`)."""
    info = dict(zip(("policy_file", "policy_sha256"), policy_source(cfg.policy), strict=True))
    if cfg.workload.kind != "offline":
        s = f"ttft<={cfg.slo_ttft_s:g}s;tpot<={cfg.slo_tpot_s:g}s;p{cfg.slo_percentile:g};warmup={cfg.warmup_s:g}s"
        info["slo"] = s
    return info


def policy_source(name: str) -> tuple[str | None, str | None]:
    """The source file of registered policy `name` and its bytes' sha256, for a policy of one's own (defined outside
    the `schedulers` package: the rows' `code` covers that); (None, None) for the package's or where unreadable."""
    import inspect

    from schedulers import POLICIES

    try:
        cls = POLICIES.get(name)
        if cls.__module__.split(".")[0] == "schedulers":
            return None, None
        path = inspect.getsourcefile(cls)
    except Exception:  # noqa: BLE001 - no such policy here, a class with no file (built in a REPL)
        return None, None
    return (path, setup_digest(path)) if path else (None, None)


def _run_checked_cell(args: tuple[str, str, str, str, str]) -> dict:
    """`run_cell` of a cell `_check_cells` built: the warnings its check said (a hardware figure, a policy's Config
    default the run replaces) are not said again (`sim.config.checks_said`): each came twice per cell."""
    from dualpath_jax.sim.config import checks_said

    with checks_said():
        return run_cell(args)


@functools.cache
def trace_sha256(path: str) -> str | None:
    """sha256 of the trace a cell replays (`metrics.trace_digest`: a directory's over its files), as first read in
    this process; None where it cannot be read."""
    from dualpath_jax.metrics import trace_digest

    return trace_digest(path).get("sha256")


@functools.cache
def module_digests() -> dict[str, str]:
    """sha256 of each module of one's own that the setups import, and of the setup files and configs/*.py
    (`metrics.own_sources`: every module loaded from outside the installed packages and the project's own), as the
    sweep read them once every setup was loaded: its rows' `module_sha256`. --resume refuses a kept row whose module
    changed since (a setup taking its cluster from a module of its own, edited between the runs, gave one table of two
    clusters). The launchers' own code (experiments/) is the rows' `code`."""
    from dualpath_jax.metrics import own_sources

    launchers = os.path.dirname(os.path.realpath(__file__)) + os.sep
    return {p: h for p, h in own_sources({}).items() if not p.startswith(launchers)}


@functools.cache
def setup_digest(setup: str) -> str | None:
    """sha256 of a setup file's bytes, as the sweep read it first (cached: a later edit of the file does not change
    the rows of this sweep); None where it cannot be read."""
    return file_sha256(setup)


def _grid_row(
    c: tuple[str, str, str, str, str], result: dict | None, error: str | None, names: dict, trace: str | None = None
) -> dict:
    """The row of cell `c` (sweep.json, sweep.rows.jsonl): its run's `result`, or its `error` and no figures;
    `trace`: the trace the cell replays (None: a synthetic workload)."""
    setup, mode, load, _, seed = c
    if error is not None:
        # the seed as the finished rows have it, a number (it was --seeds' text: "1" beside 1 in sweep.json)
        row = {"setup": setup, "mode": mode, "load": load, "seed": int(seed) if seed else None, "error": error}
    else:
        row = dict(result)
    row["setup"] = names[setup]
    row.update(_CELL_INFO.get(c, {}))  # (its policy file's sha256 as the sweep started, its SLO)
    row["spec"] = cell_spec(*c)  # what the cell ran, as one `file:variant` (sweep.json; not a sweep.csv column)
    row["setup_sha256"] = setup_digest(setup)  # (--resume: a kept row of a setup file edited since is refused)
    row["trace_sha256"] = trace_sha256(trace) if trace else None  # (and one of a trace changed since)
    row["module_sha256"] = module_digests()  # (and one of a module its setups import, edited since)
    row["code"] = code_version()  # (--resume: kept rows of other code are named in run.json, `resumed_code`)
    return row


@functools.cache
def code_version() -> str | None:
    """The git commit this sweep runs (`+dirty` with changed files), as each of its rows records it; None outside a
    checkout."""
    from dualpath_jax.metrics import git_state

    g = git_state()
    if not g or not g.get("commit"):
        return None
    return g["commit"] + ("+dirty" if g.get("dirty") else "")


def run_grid(
    cells: Sequence[tuple[str, str, str, str, str]],
    workers: int,
    names: dict | None = None,
    log: str | None = None,
    traces: dict[tuple, str] | None = None,
) -> list[dict]:
    """Every cell's row, in the order of `cells`. A cell that failed (its run raised, its worker process was
    killed) is a row with its `error` and no figures; the other cells still run and report. With `log`, each row
    is appended to that file (sweep.rows.jsonl) as its cell finishes, before the progress bar moves on. `traces`:
    the trace each trace cell replays (`_check_cells`; its rows' `trace_sha256`)."""
    traces = traces or {}
    names = names or setup_names(c[0] for c in cells)
    broken: list[str] = []  # why the log took no more rows (a full disk): the rows stay in memory, for sweep.json

    def keep(i: int, result, error) -> None:
        if log is None or broken:
            return
        try:
            append_row(log, _grid_row(cells[i], result, error, names, traces.get(cells[i])))
        except OSError as e:
            broken.append(str(e))
            logging.warning(
                "cannot append to %s (%s): the sweep's rows are kept only in memory, for sweep.json", log, e
            )

    out = run_jobs(_run_checked_cell, list(cells), workers, "sweep", on_done=keep, unit="cell")
    return [_grid_row(c, row, error, names, traces.get(c)) for c, (row, error) in zip(cells, out, strict=True)]


def _fsync_dir(directory: str) -> None:
    """A file made, renamed or removed in `directory` is on disk (its entry), not only the file's bytes."""
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # (a file system that cannot fsync a directory)
        pass
    finally:
        os.close(fd)


def append_row(path: str, row: dict) -> None:
    """`row` as one JSON line at the end of `path`, flushed and fsynced: a cell is minutes of work, and the driver
    may be killed hard right after (kill -9, the OOM killer, a reboot)."""
    from dualpath_jax.metrics import json_safe

    made = not os.path.exists(path)
    line = json.dumps(json_safe(row), default=str) + "\n"  # (NaN as null, as sweep.json)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    if made:
        _fsync_dir(os.path.dirname(path))


def _needs_spec(row, where: str) -> dict:
    if isinstance(row, dict) and "spec" not in row and {"setup", "mode"} <= row.keys():
        # (rows before each named its cell's spec, 12-05: nothing to match them by, and no digests to check them by)
        raise SystemExit(
            f"--resume: {where} is an older sweep's row (it names no cell `spec`, `file:variant`): that sweep cannot "
            "be resumed; --overwrite to run every cell again, or give another --output_dir"
        )
    if not isinstance(row, dict) or not isinstance(row.get("spec"), str):
        raise SystemExit(
            f"--resume: {where} is not a sweep row with its cell's `spec` (`file:variant`); mend or remove it, "
            "or --overwrite to replace the earlier results"
        )
    return row


def earlier_rows(directory: str) -> tuple[list[dict], int | None]:
    """The rows an earlier sweep left in `directory`, oldest first: sweep.json's, then sweep.rows.jsonl's lines.
    Also, when the log's last line is torn (the driver was killed mid-write), the byte offset where it begins (None
    when the log is whole). Any other malformed line, or a row without its `spec`, is a SystemExit naming the file
    and the line."""
    rows: list[dict] = []
    path = os.path.join(directory, "sweep.json")
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                held = json.load(f)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--resume: cannot read {path}: {e}; or --overwrite to replace it") from None
        if not isinstance(held, list):
            raise SystemExit(f"--resume: {path} is not a sweep's rows (a JSON list); or --overwrite to replace it")
        rows += [_needs_spec(r, f"{path} row {n}") for n, r in enumerate(held, 1)]
    path = os.path.join(directory, ROWS_LOG)
    torn = None
    if os.path.exists(path):
        try:
            with open(path, "rb") as f:
                lines = f.read().split(b"\n")
        except OSError as e:
            raise SystemExit(f"--resume: cannot read {path}: {e}") from None
        if lines[-1] == b"":  # (what follows the last newline)
            lines.pop()
        offset = 0
        for n, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except ValueError as e:  # (a UnicodeDecodeError too)
                if n < len(lines):
                    raise SystemExit(
                        f"--resume: {path} line {n} is not a JSON row ({e}); only a torn last line is ignored. "
                        "Mend or remove that line, or --overwrite to replace the earlier results"
                    ) from None
                logging.warning("--resume: %s line %d is torn (the sweep was killed mid-write): ignored", path, n)
                torn = offset
                break
            rows.append(_needs_spec(row, f"{path} line {n}"))
            offset += len(line) + 1
    return rows, torn


def _cell_key(spec: str) -> tuple[str, str]:
    """A cell as --resume matches it: its setup file (configs/x.py and ./configs/x.py are one), its variant."""
    setup, _, variant = spec.partition(":")
    return os.path.realpath(setup), variant


def resumable(cells, directory: str) -> tuple[dict[int, dict], int | None]:
    """For --resume: the earlier sweep's finished row of each cell it has (by the cell's index in `cells`; the
    latest of a cell's rows that finished), and `earlier_rows`' torn-line offset. Refused (SystemExit) when an
    earlier row is of a cell this sweep does not have (its results would be dropped)."""
    rows, torn = earlier_rows(directory)
    if not rows and torn is None:
        if os.path.exists(os.path.join(directory, "sweep.csv")) and not os.path.exists(
            os.path.join(directory, "sweep.json")
        ):  # (its rows name no spec to match)
            raise SystemExit(
                f"--resume: {directory} holds an earlier sweep.csv but no rows to resume from (sweep.json, "
                f"{ROWS_LOG}); give another --output_dir, or --overwrite to replace it"
            )
        logging.info("--resume: %s holds no earlier sweep's rows: every cell runs", directory)
    index = {_cell_key(cell_spec(*c)): i for i, c in enumerate(cells)}
    foreign = list(dict.fromkeys(r["spec"] for r in rows if _cell_key(r["spec"]) not in index))
    if foreign:
        # (separated by ';': a spec has commas)
        named = "; ".join(foreign[:3]) + (f"; and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise SystemExit(
            f"--resume: {directory} holds {len(foreign)} cells this sweep does not have ({named}); pass the same "
            "--setups/--modes/--loads/--extra/--seeds, or --overwrite to replace them"
        )
    kept = {index[_cell_key(r["spec"])]: r for r in rows if r.get("error") is None}
    # a kept row of a setup file edited since would pass for the file as it is now
    changed = _changed_since(kept, "setup_sha256", {i: cells[i][0] for i in kept}, setup_digest)
    if changed:
        raise SystemExit(
            f"--resume: {', '.join(changed)} changed since the earlier sweep ran its cells there (sha256 of the file "
            f"differs from its rows' setup_sha256): their figures are of the file as it was; restore it, or "
            "--overwrite to run every cell again"
        )
    # and one of a policy of one's own (its module outside the setup file) edited since
    files = {i: r["policy_file"] for i, r in kept.items() if r.get("policy_file")}
    changed = _changed_since(kept, "policy_sha256", files, file_sha256)
    if changed:
        policies = sorted({kept[i]["mode"].split("+")[0] for i in files if files[i] in changed})
        raise SystemExit(
            f"--resume: policy {', '.join(policies)}: {', '.join(changed)} changed since the earlier sweep ran its "
            "cells (sha256 of the file differs from its rows' policy_sha256): their figures are of the policy as it "
            "was; restore it, or --overwrite to run every cell again"
        )
    return kept, torn


def resume_rows(cells, directory: str) -> tuple[dict[int, dict], int | None, dict[tuple, str]]:
    """For --resume: `resumable`'s kept rows and torn-line offset, and the trace each kept trace cell replays (by
    cell), once every kept row is checked against its inputs as they are now: one lacking a digest this sweep records
    (an older sweep's) or one of a trace changed since is refused (SystemExit), nothing touched."""
    kept, torn = resumable(cells, directory)
    kept_traces = _check_cells([cells[i] for i in sorted(kept)], build=False)
    _kept_modules_unchanged_or_exit(kept)
    traces = {i: kept_traces[cells[i]] for i in sorted(kept) if cells[i] in kept_traces}
    _kept_rows_checkable_or_exit(kept, cells, traces)
    _kept_traces_unchanged_or_exit(kept, traces)
    return kept, torn, kept_traces


def _kept_rows_checkable_or_exit(kept: dict[int, dict], cells, kept_traces: dict[int, str]) -> None:
    """--resume: a kept row without a digest this sweep records (setup_sha256 always; trace_sha256 for a trace cell;
    policy_sha256 for a policy with a file of its own) was run by an older sweep, and whether that input changed since
    cannot be checked: its figures could be of another file. Refused naming the cells and the digest they lack (one
    line); `_CELL_INFO` must hold the kept cells (`_check_cells`). Such rows were kept unchecked (sweep 12-05/06)."""
    checks = {
        "setup_sha256": ("their setup file's sha256", lambda i: True),
        "trace_sha256": ("their trace's sha256", lambda i: i in kept_traces),
        "policy_sha256": (
            "their policy file's sha256",
            lambda i: bool(kept[i].get("policy_file") or _CELL_INFO.get(cells[i], {}).get("policy_file")),
        ),
    }
    lacking = []
    for key, (what, applies) in checks.items():
        specs = [cell_spec(*cells[i]) for i in sorted(kept) if applies(i) and not kept[i].get(key)]
        if specs:  # (separated by ';': a spec has commas)
            named = "; ".join(specs[:3]) + (f"; and {len(specs) - 3} more" if len(specs) > 3 else "")
            lacking.append(f"cells {named} lack {what} (`{key}`)")
    if lacking:
        raise SystemExit(
            f"--resume: {', and '.join(lacking)}: an older sweep ran them without recording it, so whether that input "
            "changed since cannot be checked; --overwrite to run them again"
        )


# What sweep.png shows per setup: (column, axis label); online cells (slo_attainment set) plot their SLO row
_PLOT_METRICS = [
    ("jct_s", "JCT (s)"),
    ("ttft_p50_s", "TTFT p50 (s)"),
    ("snic_max_over_avg", "storage-NIC max / avg"),
    ("slo_attainment", "SLO attainment"),
    ("hit_rate", "hit rate"),  # (plotted where a cell has a bounded store: its hits are what the sweep varies)
]


def plot_metrics(rows: Sequence[dict]) -> list[tuple[str, str]]:
    """The panels of `plot_sweep`: each metric of `_PLOT_METRICS` the rows have; the hit rate where a row has a
    bounded store (`cluster.store_capacity_gb`), else it is the workload's, the same in every cell."""
    bounded = any(r.get("store_evicted_bytes") is not None for r in rows)
    return [
        (k, label)
        for k, label in _PLOT_METRICS
        if any(r.get(k) is not None for r in rows) and (k != "hit_rate" or bounded)
    ]


def print_table(table: list[list[str]]) -> None:
    """`table` (a header, then rows) with each column padded to its widest cell, an empty cell as "-" (the columns
    were joined unpadded: an empty load moved every later value away from its header)."""
    table = [[c or "-" for c in row] for row in table]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def plot_sweep(rows: Sequence[dict], path: str, extra: str = "") -> bool:
    """One row of panels per setup: each metric of `_PLOT_METRICS` the cells have, over the loads (in the order
    given), one line per mode (its colour and marker the same in every panel); with several seeds, the line is their
    mean and the bars their [min, max]. A mode with no value in a panel (oracle's storage-NIC max/avg) is named in
    its title. Skipped (logged) without matplotlib."""
    import math

    plt = pyplot_or_none("sweep.png")
    if plt is None:
        return False
    setups = list(dict.fromkeys(r["setup"] for r in rows))
    metrics = plot_metrics(rows)
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    style = mode_styles(modes, largest=7)
    fig, axes = plt.subplots(len(setups), len(metrics), figsize=(4 * len(metrics), 3 * len(setups)), squeeze=False)
    for i, setup in enumerate(setups):
        mine = [r for r in rows if r["setup"] == setup]
        loads = list(dict.fromkeys(r["load"] for r in mine))
        for j, (key, label) in enumerate(metrics):
            ax = axes[i][j]
            missing, top = [], 0.0
            for mode in dict.fromkeys(r["mode"] for r in mine):
                by_load: dict[str, list[float]] = {}
                for r in mine:
                    if r["mode"] == mode and r.get(key) is not None:
                        by_load.setdefault(r["load"], []).append(float(r[key]))
                vals = [by_load.get(ld, [float("nan")]) for ld in loads]
                mean = [mean_within(v) for v in vals]  # (kept within [min, max]: no negative error bar)
                err = [[m - min(v) for m, v in zip(mean, vals, strict=True)],
                       [max(v) - m for m, v in zip(mean, vals, strict=True)]]  # fmt: skip
                ax.errorbar(range(len(loads)), mean, yerr=err, capsize=3, label=mode, **style[mode])
                if not any(map(math.isfinite, mean)):
                    missing.append(mode)
                top = max([top, *(x for v in vals for x in v if math.isfinite(x))])
            ax.set_xticks(range(len(loads)), [ld or "default" for ld in loads], rotation=20, ha="right", fontsize=7)
            ax.set_xlabel("load")
            ax.set_ylabel(label)
            if key in ("jct_s", "ttft_p50_s"):  # (scaled to the data, a 0.5% difference filled the panel)
                ax.set_ylim(0, top * 1.08 if top > 0 else None)  # (room above: the highest marker was cut in half)
            elif key == "snic_max_over_avg" and len(missing) < len(dict.fromkeys(r["mode"] for r in mine)):
                ax.set_ylim(bottom=1)  # (1: every storage NIC equally busy; it is never below)
            elif key in ("slo_attainment", "hit_rate"):  # (shares: 1.0 sat mid-panel with 1.04 above it)
                ax.set_ylim(top=1.02)
            title = setup + (f" ({extra})" if extra else "")
            ax.set_title(title + (f"\nno value: {', '.join(missing)}" if missing else ""), fontsize=8)
            if i == 0 and j == 0:
                ax.legend(fontsize=7, loc="best")
    seeds = sorted({r.get("seed") for r in rows}, key=str)
    title = f"modes {', '.join(modes)}; "
    title += f"mean of {len(seeds)} seeds ({', '.join(map(str, seeds))}), bars [min, max]" if len(seeds) > 1 else ""
    title += f"seed {seeds[0]}" if len(seeds) == 1 else ""
    slos = {r["slo"] for r in rows if r.get("slo")}
    if len(slos) == 1:  # (online / trace cells: the SLO the attainment is judged on)
        title += f"; SLO {next(iter(slos))}"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


_RATIOS = ("jct_s",)  # each row's figure over the first mode's (same setup, load, seed): `jct_s_vs_<mode>`
_MEANS = ["jct_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "snic_max_over_avg", "hit_rate", "slo_attainment"]


def with_ratios(rows: list[dict], modes: list[str]) -> list[dict]:
    """`rows` with `<metric>_vs_<first mode>` (`_RATIOS`): the row's figure over that of the first mode's row of the
    same setup, load and seed (None where either is missing: a failed cell, oracle's). With one mode: as they are."""
    if len(modes) < 2:
        return rows
    base = {(r["setup"], r["load"], r.get("seed")): r for r in rows if r["mode"] == modes[0]}
    out = []
    for r in rows:
        b = base.get((r["setup"], r["load"], r.get("seed")), {})
        ratio = {}
        for k in _RATIOS:
            num, den = r.get(k), b.get(k)
            ratio[f"{k}_vs_{modes[0]}"] = num / den if num is not None and den else None
        out.append({**r, **ratio})
    return out


def table_columns(rows: Sequence[dict]) -> list[str]:
    """`columns`, with the ratio columns (`with_ratios`) after their metric, `extra` after `seed` and `slo` after
    `slo_met` where a row has them."""
    out = []
    for k in columns(rows):
        out.append(k)
        out += [x for x in dict.fromkeys(x for r in rows for x in r) if x.startswith(f"{k}_vs_")]
        if k in ("seed", "slo_met"):
            out += [x for x in ({"seed": "extra", "slo_met": "slo"}[k],) if any(x in r for r in rows)]
    return out


def _write_means(rows: list[dict], path: str, seeds: int) -> None:
    """With several seeds: the mean [min, max] over the seeds of each (setup, mode, load)'s main figures, printed as a
    table and written to `path` (sweep_mean.csv: `<metric>_mean`, `_min`, `_max`, and `seeds`: how many finished)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["setup"], r["mode"], r["load"]), []).append(r)
    metrics = [
        k for k in _MEANS + [x for x in table_columns(rows) if "_vs_" in x] if any(r.get(k) is not None for r in rows)
    ]
    out = []
    for (setup, mode, load), mine in groups.items():
        row = {
            "setup": setup,
            "mode": mode,
            "load": load,
            "seeds": sum(not r.get("error") for r in mine),
        }
        for k in metrics:
            v = [float(r[k]) for r in mine if r.get(k) is not None]
            row[f"{k}_mean"] = mean_within(v) if v else None
            row[f"{k}_min"] = min(v) if v else None
            row[f"{k}_max"] = max(v) if v else None
        out.append(row)
    cols = ["setup", "mode", "load", "seeds"] + [f"{k}_{s}" for k in metrics for s in ("mean", "min", "max")]
    write_csv(path, cols, out)
    print(f"mean [min, max] over {seeds} seeds:")
    table = [["setup", "mode", "load", "seeds", *metrics]]
    for r in out:
        cells = [r["setup"], r["mode"], r["load"] or "default", str(r["seeds"])]
        for k in metrics:
            m = r[f"{k}_mean"]
            cells.append(
                "-" if m is None else f"{table_cell(m)} [{table_cell(r[f'{k}_min'])}, {table_cell(r[f'{k}_max'])}]"
            )
        table.append(cells)
    print_table(table)
    print("wrote", path)


def write_csv(path: str, cols: list[str], rows: Sequence[dict]) -> None:
    """`rows` as CSV at `path` (columns `cols`; other keys ignored), beside it then renamed over it: a crash or a full
    disk mid-write left a torn CSV (the first rows only) that a user or --resume then read as the sweep's."""

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    write_atomically(path, write)


_ONCE = ("setups", "modes", "loads", "extra", "seeds")  # (given twice, absl kept the last one, without a word)


def parse_flags(argv: list[str]):
    """`parse_flags_or_exit` (an unknown flag: absl's line, a hint for --results_dir), after two checks of sweep's
    own: another launcher's --config / --config.* (a hint naming --setups, --loads, --extra), and a flag of the
    grid given twice (absl kept the last)."""
    reclaim_flags(_OWN_FLAGS)
    for arg in argv[1:]:
        if arg == "--":
            break
        if re.match(r"--config($|[=.])", arg):
            raise SystemExit(
                f"FATAL Flags parsing error: Unknown command line flag {arg[2:].partition('=')[0]!r}\n"
                "Hint: sweep takes its config files with --setups=FILE[,FILE...], and a variant's items (as "
                "--config.cluster.snic_gbps=5, or file.py:basic,agents=8) as cell items: a column of the grid in "
                "--loads=cluster.snic_gbps=5,cluster.snic_gbps=25, every cell's in --extra=agents=8, the policy in "
                "--modes"
            )
    parsed = parse_flags_or_exit(argv)
    twice = [f"--{n}" for n in _ONCE if flags.FLAGS[n].present > 1]
    if twice:
        raise SystemExit(
            f"bad flags: {', '.join(twice)} given more than once (only the last one would count); give each once, "
            "with its items joined by commas"
        )
    return parsed


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unknown arguments: {argv[1:]}")
    started = clock.now()  # (run.json: the start and the wall time)
    import numpy

    stale = compiled.stale_modules()  # (as the cells import them now: an edit during the sweep is not what ran)

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
    setups = setup_files_or_exit(_SETUPS.value, "--modes, --loads or --extra")
    seeds = [str(int(x)) for x in _SEEDS.value] or [""]
    if _SEEDS.value and any(item.strip().startswith("seed=") for item in _EXTRA.value.split(",")):
        raise SystemExit("bad --extra: --seeds and a seed= item in --extra both set the seed; use one")
    if _RESUME.value and _OVERWRITE.value:
        raise SystemExit(
            "bad flags: --resume keeps an earlier sweep's finished cells and --overwrite replaces them; give one"
        )
    cells = [(s, m, ld, _EXTRA.value, sd) for s in setups for m in _MODES.value for ld in _LOADS.value for sd in seeds]
    out_dir, log = _OUTPUT_DIR.value, os.path.join(_OUTPUT_DIR.value, ROWS_LOG)
    if not _RESUME.value:  # an occupied --output_dir: said before every cell's simulator is built (minutes at scale)
        _no_earlier_sweep_or_exit(out_dir)
    for s in setups:  # (each setup file's digest as the sweep starts: its rows' setup_sha256)
        setup_digest(s)
    with SigtermAsInterrupt() as term:
        try:
            # --resume: the earlier sweep's finished cells (by index in `cells`), matched first (cheap, and a
            # different grid is refused before any simulator is built)
            kept, torn, kept_traces = resume_rows(cells, out_dir) if _RESUME.value else ({}, None, {})
            to_run = [c for i, c in enumerate(cells) if i not in kept]
            run_traces = _check_cells(to_run)
            module_digests()  # (the modules every setup loads, as the sweep starts: its rows' module_sha256)
            for t in run_traces.values():  # (each trace's digest as the sweep starts: its rows' trace_sha256)
                trace_sha256(t)
            traces = [*run_traces.values(), *kept_traces.values()]
        except KeyboardInterrupt as e:  # (Terminated too: SIGTERM. Ctrl-C was a traceback, the build takes minutes)
            raise SystemExit(f"sweep: stopped by {interrupted_by(e)} before any cell ran (nothing written)") from None
        writable_dir_or_exit(out_dir, "--output_dir")  # before the grid runs, not after
        hold_dir_or_exit(out_dir, "--output_dir")
        if _RESUME.value:
            if torn is not None:  # (appended to, it would be a malformed line in the middle)
                os.truncate(log, torn)
                logging.info("--resume: cut the torn last line off %s", log)
            logging.info(
                "--resume: kept %d finished cells of %d from %s; running the other %d",
                len(kept), len(cells), out_dir, len(to_run),
            )  # fmt: skip
        else:
            _no_earlier_sweep_or_exit(out_dir)  # (again: one may have come while the cells were checked)
            # --overwrite: the earlier sweep's rows go now, its log too (this sweep's starts empty). Its sweep.json
            # kept until the end passed, after a hard kill, for this sweep's unfinished cells on --resume
            for name in RESULTS:
                if os.path.exists(path := os.path.join(out_dir, name)):
                    os.remove(path)
        names = setup_names(c[0] for c in cells)
        _say_kept_code(kept, code_version())
        ran = iter(run_grid(to_run, _WORKERS.value, names, log, run_traces))
        rows = [_resumed_row(kept[i], c, names) if i in kept else next(ran) for i, c in enumerate(cells)]
        term.hold()  # SIGTERM and Ctrl-C from here on: noted, and the exit comes after the results are written
        _write_results(rows, cells, term, started, traces, [cell_spec(*cells[i]) for i in sorted(kept)], stale)


def _say_kept_code(kept: dict[int, dict], here: str | None) -> None:
    """--resume: a warning when kept cells ran at other code than this sweep's (`here`, the git commit; not refused: a
    commit of other code often gives the same figures; run.json names it, `resumed_code`), compared only where both
    sides know it. Where either does not (a sweep outside a git checkout, whose rows say None), a warning once that
    the code cannot be compared: 'None' == 'None' passed for the same code."""
    codes = {r.get("code") for r in kept.values()}
    other = sorted(c for c in codes - {None, here}) if here is not None else []
    if other:
        logging.warning(
            "--resume: kept cells ran at code %s, this sweep runs at %s: their figures are that code's",
            ", ".join(other), here,
        )  # fmt: skip
    unknown = sum(r.get("code") is None for r in kept.values())
    if kept and (here is None or unknown):
        why = (
            "this sweep runs outside a git checkout (no commit to compare)"
            if here is None
            else f"{unknown} of the {len(kept)} kept rows record no commit (run outside a git checkout)"
        )
        logging.warning(
            "--resume: the code the kept cells ran cannot be compared with this sweep's: %s; their figures may be "
            "another version's",
            why,
        )


def _no_earlier_sweep_or_exit(out_dir: str) -> None:
    """An earlier sweep's results are kept (a failed sweep wrote its partial rows over them) unless --overwrite."""
    try:
        no_earlier_results_or_exit(out_dir, RESULTS, "--output_dir", _OVERWRITE.value, "experiments.sweep")
    except SystemExit as e:
        if "earlier run's results" not in str(e):  # (another launcher's run.json: --resume does not apply)
            raise
        raise SystemExit(f"{e}, or --resume to keep its finished cells and run only the others") from None


def _resumed_row(row: dict, c, names: dict) -> dict:
    """An earlier sweep's row of cell `c`, named as this sweep names it (the same cell, spelled alike)."""
    return {**{k: v for k, v in row.items() if k != "error"}, "setup": names[c[0]], "spec": cell_spec(*c)}


def _check_cells(cells, build: bool = True) -> dict[tuple, str]:
    """Every cell's simulator is built first (config, workload, and the check that every turn fits a DE): a bad cell
    stops the sweep before anything runs. Returns the trace path each trace cell reads, by cell (run.json). Without
    `build` only the configs load (the cells --resume keeps, for their traces: a paper-scale simulator takes a
    while)."""
    from dualpath_jax.sim import load_sim_config
    from dualpath_jax.sim.runner import build_simulator

    def check(spec: str):
        cfg = load_sim_config(spec, as_run=True)
        if build:
            build_simulator(cfg)
        return cfg

    traces = {}
    for c in cells:
        spec = cell_spec(*c)
        try:
            cfg = check_cell_or_exit(f"sweep cell {spec!r}", check, spec)
        except SystemExit as e:  # (the policy registry's hint names the other launchers' flag)
            raise SystemExit(str(e.code).replace("your --config file imports", "your --setups file imports")) from None
        _CELL_INFO[c] = cell_info(cfg)
        if cfg.workload.kind == "trace":
            traces[c] = cfg.workload.trace_path
    return traces


def _changed_since(kept: dict[int, dict], key: str, sources: dict[int, str], digest) -> list[str]:
    """--resume: the files (`sources`: a kept cell's setup file or trace, by its index) whose `digest` differs from
    what their kept rows recorded under `key`, once each; rows from before that digest are kept."""
    return list(
        dict.fromkeys(src for i, src in sources.items() if kept[i].get(key) is not None and kept[i][key] != digest(src))
    )


def _kept_modules_unchanged_or_exit(kept: dict[int, dict]) -> None:
    """--resume: a kept row whose setups imported a module of one's own (`module_sha256`) that changed since (or is
    gone) would pass for the module as it is now: refused naming the files, nothing touched. Rows from before that
    digest (an older sweep's) are kept."""
    recorded = {p: h for r in kept.values() for p, h in (r.get("module_sha256") or {}).items()}
    changed = sorted(p for p, h in recorded.items() if file_sha256(p) != h)
    if changed:
        raise SystemExit(
            f"--resume: {', '.join(changed)} changed since the earlier sweep ran its cells (a module its setups load: "
            "sha256 of the file differs from its rows' module_sha256): their figures are of the module as it was; "
            "restore it, or --overwrite to run every cell again"
        )


def _kept_traces_unchanged_or_exit(kept: dict[int, dict], kept_traces: dict[int, str]) -> None:
    """--resume: a kept row of a trace whose bytes changed since (its `trace_sha256`) would pass for the trace as it is
    now: refused, nothing touched. `kept_traces`: each kept trace cell's trace path, by its index in the sweep's
    cells."""
    changed = _changed_since(kept, "trace_sha256", kept_traces, trace_sha256)
    if changed:
        raise SystemExit(
            f"--resume: trace {', '.join(changed)} changed since the earlier sweep ran its cells on it (sha256 differs "
            "from its rows' trace_sha256): their figures are of the trace as it was; restore it, or --overwrite to run "
            "every cell again"
        )


def _write_results(
    rows: list[dict],
    cells,
    term: SigtermAsInterrupt,
    started: float,
    traces: list[str],
    resumed: list[str],
    stale: dict[str, str] | None = None,
) -> None:
    """sweep.csv / sweep.json / sweep.png / run.json of `rows` (the failed cells' rows say why; `resumed`: the
    cells kept from an earlier sweep), the table; the rows' log goes once sweep.json holds them. Then a failing
    exit naming the failed cells, or saying that SIGTERM stopped the sweep (`term.got`). `stale`: the compiled modules
    that ran as their Python twins (`compiled.stale_modules()` at the start), a note each under the table."""
    from dualpath_jax.metrics import json_safe, run_info, write_run_info

    for r in rows:  # (run_jobs stopped the cells as for Ctrl-C)
        if "error" in r:
            r["error"] = term.error_line(r["error"])
    failed = [(c, r["error"]) for c, r in zip(cells, rows, strict=True) if "error" in r]
    # NaN (e.g. oracle's storage-NIC max/avg) as None in sweep.json, sweep.csv and the table alike: a --resume's kept
    # rows come back from JSON so, and its sweep.csv / table had "" / None where one run's had nan
    rows = with_ratios(rows, [m for m in dict.fromkeys(c[1] for c in cells)])
    if any(c[3] for c in cells):  # (--extra: in every cell, and the CSVs of two --extra told apart)
        rows = [{**r, "extra": c[3]} for r, c in zip(rows, cells, strict=True)]
    safe = json_safe(rows)
    cols = table_columns(safe) + (["error"] if failed else [])
    # sweep.json's rows in the CSV's column order, every column (None where the CSV is empty), then the rest
    safe = [{**{k: r.get(k) for k in cols if k != "error"}, **r} for r in safe]
    write_csv(os.path.join(_OUTPUT_DIR.value, "sweep.csv"), cols, safe)

    # beside it, then renamed over it: an earlier sweep.json (a --resume's kept rows) is whole until this one is
    # (a temp name of this process's: a fixed sweep.json.tmp was shared by two sweeps writing one --output_dir, and
    # left behind by a failed dump)
    def dump(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(safe, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())

    path = os.path.join(_OUTPUT_DIR.value, "sweep.json")
    write_atomically(path, dump)
    _fsync_dir(_OUTPUT_DIR.value)
    print_table([cols, *([table_cell(r.get(k)) for k in cols] for r in safe)])
    for slo in dict.fromkeys(r["slo"] for r in safe if r.get("slo")):  # (which SLO; its window starts at warm-up)
        print(f"note: slo_attainment / slo_met judge the SLO {slo} (each row's `slo` column)")
    for module, why in (stale or {}).items():
        print(f"note: {module} ran as its Python twin, slower ({why}); rebuild with `pip install -e .`")
    seeds = len({c[4] for c in cells})  # (--seeds; a failed cell's row has no seed of the config's own)
    mean_path = os.path.join(_OUTPUT_DIR.value, "sweep_mean.csv")
    if seeds > 1:
        print()
        _write_means(safe, mean_path, seeds)
    elif os.path.exists(mean_path):  # (an earlier sweep's, of other seeds)
        os.remove(mean_path)
    png = os.path.join(_OUTPUT_DIR.value, "sweep.png")
    ran = [r for r in rows if "error" not in r]
    if _PLOT.value and ran and plot_sweep(ran, png, _EXTRA.value):
        print("wrote", png)
    elif os.path.exists(png):  # an earlier sweep's plot would pass for this one's
        os.remove(png)
        logging.info("removed %s: an earlier sweep's plot (none was drawn for this one)", png)
    print("wrote", os.path.join(_OUTPUT_DIR.value, "sweep.csv"))
    print("wrote", path)
    # what ran, and the line that runs it again into a directory of its own (README "What ran")
    cells_run = [cell_spec(*c) for c in cells]
    info = run_info(
        "experiments.sweep",
        started,
        output_dir=_OUTPUT_DIR.value,
        traces=traces,
        cells=cells_run,
        resumed_cells=resumed,
        compiled=compiled.status(),  # (the simulator's compiled hot paths, or the Python twins: same figures, not times)
    )
    if _RESUME.value:  # (its re-run runs every cell; pasted twice, --resume kept the first paste's and ran none)
        info["rerun"] += " --noresume"
        # the code each kept cell ran (a killed sweep wrote no run.json of its own): rows from before this was
        # recorded say None
        kept = set(resumed)
        info["resumed_code"] = sorted({str(r.get("code")) for r in rows if r["spec"] in kept})
    print("wrote", write_run_info(_OUTPUT_DIR.value, info))
    log = os.path.join(_OUTPUT_DIR.value, ROWS_LOG)
    if os.path.exists(log):  # sweep.json holds every row now
        os.remove(log)
    exit_if_stopped_or_failed(
        "sweep",
        "cells",
        len(rows),
        [f"{cell_spec(*c)}: {err}" for c, err in failed],
        os.path.join(_OUTPUT_DIR.value, "sweep.csv"),
        stopped_by(term),
        then="\nsweep: go on with the same command and --resume: the finished cells are kept, only the others run",
    )


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
