"""The main job: the DualPath runtime on embedded defaults, `basic` and `dualpath` side by side.

    python -m experiments.run
    python -m experiments.run --config.policies=basic,dualpath,round_robin --config.runtime.workload.agents=48
    python -m experiments.run --config=configs/tiny_runtime.py:test    # small, in-process
    python -m experiments.run --config.policies=basic,dualpath,policy.alpha_tokens=500000,round_robin,policy.read_side=de
    python -m experiments.run --config.policies=ablation    # the paper's ablation: Basic, +layerwise, +dual path, +sched.

A tiny model, 1 PE node and 2 DE nodes as local processes, a local directory store, NIC caps that make storage
the bottleneck, a few dozen multi-turn agents (configs/tiny_runtime.py). Each policy runs on a fresh cluster
and a fresh store with the same conversations, with its own Config fields (`policy.NAME=value` items after its
name in `config.policies`, as in the simulator's config variants) over `config.runtime.scheduler.policy_kwargs`
(fields for every policy); the job prints JCT, throughput, TTFT/TPOT percentiles, bytes
per read path and the storage-NIC max/avg, and writes JSON + a plot into results/<timestamp>/. An online or
trace-arrival run (`config.runtime.workload.arrival`) is also judged against the SLO of `config.runtime.slo` (TTFT /
TPOT at a percentile, as the simulator's; `slo_window`): the table gives each policy's SLO attainment and met /
missed, results.json and turns_<policy>.json the SLO's figures.

    python -m experiments.run --config.runtime.workload.arrival=online --config.runtime.workload.aps=2

An item `layerwise=false` after a policy's name runs it with the paper's Basic prefill (`cluster.layerwise`: the
whole hit KV in the PE before its first layer, the prompt KV to the DE after its last; as the simulator's `basic`
mode); the policy `ablation` is the paper's ablation, the simulator's modes basic, layerwise, dualpath_rr and
dualpath: `basic,layerwise=false,basic,round_robin,policy.full_de=queue,dualpath` (each step's JCT change vs the
first is the table's last column).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

from absl import app, flags, logging

from dualpath_jax import clock
from dualpath_jax.metrics import tokens_sha256  # results.json greedy_tokens.sha256 (bench_runtime's too)
from experiments import (
    SigtermAsInterrupt,
    Terminated,
    config_or_exit,
    define_config_file,
    define_rerun_of,
    dirs_made_for,
    drop_empty_dirs,
    flag_line,
    fresh_dir_or_exit,
    interrupted_by,
    parse_flags_or_exit,
    prefill_tokens_per_s_or_exit,
    pyplot_or_none,
    reference_agreement,
    refuse_unused_workload_overrides,
    remove_if_empty,
    runtime_config_line,
    runtime_run,
    stopped_early,
    token_agreement,
    writable_dir_or_exit,
    write_atomically,
)

_CONFIG = define_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "tiny_runtime.py"), "Run configuration."
)
define_rerun_of()

COLUMNS = [
    ("jct_s", "JCT s", "{:.2f}"),
    ("gen_tokens_per_s", "gen tok/s", "{:.1f}"),
    ("prompt_tokens_per_s", "prompt tok/s", "{:.0f}"),
    ("ttft_p50_s", "TTFT p50 s", "{:.3f}"),
    ("ttft_p99_s", "TTFT p99 s", "{:.3f}"),
    ("tpot_p50_s", "TPOT p50 ms", "ms"),  # (the headers named no unit; TPOT in ms, as the README's tables)
    ("tpot_p99_s", "TPOT p99 ms", "ms"),
    ("pe_read_bytes", "PE-read MB", "mb"),
    ("de_read_bytes", "DE-read MB", "mb"),
    ("hit_rate", "hit rate", "{:.1%}"),  # prompt tokens read from the store (a bounded store's runs differ here)
    ("snic_max_over_avg", "SNIC max/avg", "{:.2f}"),
]


# Named lists of `config.policies` (an item of the list, where no policy of that name is registered).
PRESETS = {
    # The paper's ablation (PAPER.md: Basic -> +layerwise -> +dual path (round robin) -> +scheduler), as the
    # simulator's MODES basic, layerwise, dualpath_rr (round-robin whose DE in turn takes the request, room or not:
    # full_de="queue"; the runtime's rotation is global, as that mode's fetch_scope) and dualpath.
    "ablation": "basic,layerwise=false,basic,round_robin,policy.full_de=queue,dualpath",
}


# An online / trace-arrival run's SLO columns (`driver.slo_window`: the window and the judgement are the driver's,
# bench_runtime judges its runs and their simulator copy with them too), before the speedups

SLO_COLUMNS = [("slo_attainment", "SLO att.", "{:.1%}"), ("slo_met", "SLO", "met")]


def expand_presets(text: str) -> str:
    """`config.policies` with each item that names a preset (`PRESETS`, not a registered policy) replaced by its list."""
    from schedulers.registry import POLICIES

    items = [i.strip() for i in str(text).split(",")]
    return ",".join(PRESETS[i] if i in PRESETS and i not in POLICIES.names() else i for i in items)


def judged_columns(percentile: float) -> list[tuple[str, str, str]]:
    """The columns of the TTFT / TPOT at the SLO's percentile over its window, the figures its verdict rests on
    (`RunResult.slo`, `driver.judge_slo`, under its keys after "slo."; the other percentile columns cover every turn)."""
    q = f"{percentile:g}"
    return [(f"slo.ttft_p{q}_s", f"SLO TTFT p{q} s", "{:.3f}"), (f"slo.tpot_p{q}_s", f"SLO TPOT p{q} ms", "ms")]


def format_table(results: dict, slo_percentile: float | None = None) -> str:
    """One row per policy plus the JCT speedup over the first policy (the baseline of the same run) and the JCT change
    against it (as the paper gives its ablation: -17.21% with layerwise prefill, ...). `slo_percentile` (an online /
    trace run's `slo.percentile`): the judged percentiles (`judged_columns`) beside the SLO's attainment."""
    names = list(results)
    # an SLO-judged run (online / trace arrivals) gets its attainment and verdict; an offline run has none
    judged = any("slo_met" in results[n].summary for n in names)
    columns = COLUMNS
    if judged:
        columns = columns + (judged_columns(slo_percentile) if slo_percentile is not None else []) + SLO_COLUMNS
    header = ["policy"] + [c[1] for c in columns] + [f"speedup vs {names[0]}", f"JCT vs {names[0]}"]
    rows = []
    base = results[names[0]].summary["jct_s"]
    for n in names:
        s = results[n].summary
        slo = getattr(results[n], "slo", None) or {}  # (the judgement's own keys: with_slo renames some in `s`)
        row = [n]
        for key, _, fmt in columns:
            v = slo.get(key[4:], math.nan) if key.startswith("slo.") else s.get(key, math.nan)
            if fmt == "met":  # (no turn judged: no verdict, as its attainment)
                row.append("n/a" if s.get("slo_turns") == 0 else "met" if v is True else "missed")
            elif isinstance(v, float) and math.isnan(v) and ("%" in fmt or key.startswith("slo.")):  # (no turn)
                row.append("n/a")
            else:
                row.append(f"{v / 1e6:.2f}" if fmt == "mb" else f"{v * 1e3:.1f}" if fmt == "ms" else fmt.format(v))
        row.append(f"{base / s['jct_s']:.2f}x")
        row.append(f"{(s['jct_s'] / base - 1) * 100:+.1f}%")
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(x).rjust(w) for x, w in zip(r, widths, strict=True)) for r in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def slo_settings(cfg, window: tuple[float, float]) -> dict:
    """The SLO a run was judged on, as results.json and turns_<policy>.json give it (`window_s`: its end included;
    null: no end)."""
    s = cfg.slo
    return {"ttft_s": s.ttft_s, "tpot_s": s.tpot_s, "percentile": s.percentile, "warmup_s": s.warmup_s,
            "window_s": list(window)}  # fmt: skip


def slo_line(cfg, window: tuple[float, float], agents: int | None = None) -> str:
    """The table's note naming the SLO the policies were judged on; online (`agents` of them), with the rate at which
    they came: the configured aps is the Poisson process's, and a short run's differs (32 agents at aps 8 came over
    4.62 s: 6.9 a second, and nothing said so)."""
    s = cfg.slo
    q = f"p{s.percentile:g}"
    bounds = f"TTFT {q} <= {s.ttft_s:g} s and TPOT {q} <= {s.tpot_s * 1e3:g} ms"
    if math.isinf(window[1]):
        turns = f"the turns arriving from {window[0]:g} s on"
    else:
        # (the n-th agent arrives after n exponential gaps from 0: n / the last arrival is the rate they came at)
        came = f": {agents} agents came at {agents / window[1]:.3g}/s, aps {cfg.workload.aps:g}" if agents else ""
        turns = (
            f"the turns arriving in [{window[0]:g}, {window[1]:.3f}] s (to the last agent's arrival{came}; the drain "
            "after it is not judged)"
        )
    return (
        f"SLO (config.runtime.slo): {bounds} on {turns}; SLO TTFT / TPOT {q}: those turns' {q}s (the verdict's); "
        "SLO att.: the share of those turns within both bounds"
    )


def warmup_note(first: str, judged: bool) -> str:
    """The table's note for a run without the warm-up (--config.warmup=False): what the first policy compiled is in its
    JCT and, online / trace (`judged`), in its TTFT / TPOT and so its SLO verdict (basic at aps 4 missed its SLO there
    and met it with the warm-up; the note spoke of the JCT only)."""
    note = f"note: --config.warmup=False, so {first}'s JCT includes what it compiled first"
    if judged:
        return note + (
            ", and so do its TTFT / TPOT, SLO attainment and SLO verdict: a cold run's, no fair comparison with warm "
            "ones (--config.warmup=True warms up before measuring)"
        )
    return note + "; the speedups are not a fair comparison (the default config warms up before measuring)"


def plot(results: dict, path: str, config=None) -> bool:
    """JCT per policy and bytes per storage NIC per policy; skipped (logged) without matplotlib. `config` (default:
    --config's) names the model, P/D, NIC caps and agents in the title, with the table's warm-up note when
    `config.warmup` is off (the plot alone showed basic's compile time as DualPath's speedup)."""
    plt = pyplot_or_none("run.png")
    if plt is None:
        return False
    import textwrap

    if config is None and flags.FLAGS.is_parsed():
        config = _CONFIG.value
    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    colors = {n: f"C{i % 10}" for i, n in enumerate(names)}  # a policy's colour, the same in every panel
    axes[0].bar(names, [results[n].summary["jct_s"] for n in names], color=[colors[n] for n in names])
    axes[0].set_ylabel("JCT (s)")
    judged = [n for n in names if "slo_attainment" in results[n].summary]  # (online / trace arrivals)
    if judged:  # (every turn's span there is not an offline rollout's JCT: the SLO attainment beside it)
        att = ", ".join(
            f"{n} {a:.0%}" if not math.isnan(a := results[n].summary["slo_attainment"]) else f"{n} n/a"  # (no turn)
            for n in judged
        )
        axes[0].set_title(f"JCT (arrivals spread); SLO attained: {att}", fontsize=8)
    else:
        axes[0].set_title("offline rollout JCT")
    links = sorted({k for n in names for k in results[n].summary.get("link_bytes", {}) if k.startswith("snic/")})
    width = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        lb = results[n].summary.get("link_bytes", {})
        mb = [lb.get(k, 0) / 1e6 for k in links]
        axes[1].bar([j + i * width for j in range(len(links))], mb, width, label=n, color=colors[n])
    axes[1].set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(links))], links, rotation=20, ha="right",
                       rotation_mode="anchor")  # fmt: skip
    if not links:  # (no storage-NIC bytes recorded: a blank panel)
        axes[1].text(0.5, 0.5, "no storage-NIC bytes", transform=axes[1].transAxes, ha="center", color="gray")
    axes[1].set_ylabel("MB (reads + write-backs)")
    axes[1].set_title("bytes per storage NIC")
    axes[1].legend()
    for n in names:
        recs = sorted(results[n].records, key=lambda r: r.finished)
        axes[2].plot([r.finished for r in recs], range(1, len(recs) + 1), label=n, color=colors[n])
    if not any(results[n].records for n in names):
        axes[2].text(0.5, 0.5, "no turn finished", transform=axes[2].transAxes, ha="center", color="gray")
    axes[2].set_xlabel("time (s)")
    axes[2].set_ylabel("turns finished")
    axes[2].set_title("progress")
    axes[2].legend()
    if config is not None:
        rt = config.runtime
        title = (
            f"{rt.model}, {rt.cluster.prefill_nodes}P{rt.cluster.decode_nodes}D, storage NIC "
            f"{rt.nics.snic_bytes_per_s / 1e9:g} GB/s, compute NIC {rt.nics.cnic_bytes_per_s / 1e9:g} GB/s, "
            f"{rt.workload.agents} agents {rt.workload.arrival}"
        )
        if not config.warmup and names:
            title += "\n" + "\n".join(textwrap.wrap(warmup_note(names[0], bool(judged)), 160))
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def policy_configs(config, overrides) -> dict:
    """Each policy of `config.policies` -> its run's `RuntimeConfig`: `scheduler.name` the policy, `policy_kwargs`
    its own `policy.NAME=value` items over `config.runtime.scheduler.policy_kwargs` (given to every policy). A
    ConfigError names the item, or the field, that a policy refuses. `overrides`: the `--config.*` overrides given
    (path -> value): a `runtime.scheduler.name` that no run uses is refused (the list names what runs), and so is a
    `runtime.slo.*` on an offline run (judged on its JCT, no SLO). A run's `layerwise=` item sets its
    `cluster.layerwise` (Basic prefill: PE-side reads only, `check_layerwise_reads`)."""
    from dualpath_jax.runtime.config import (
        ConfigError,
        RuntimeConfig,
        check_layerwise_reads,
        check_policy_run,
        parse_policy_list,
    )

    runs = parse_policy_list(expand_presets(config.policies))
    names = [r.name for r in runs]
    given = overrides.get("runtime.scheduler.name")
    if given is not None and given not in names:  # (it was ignored: each run's name is one of the list)
        raise ConfigError(
            f"--config.runtime.scheduler.name={given} is not run: experiments.run runs the policies of "
            f"--config.policies ({','.join(names)}); name it there"
        )
    base = RuntimeConfig.from_config_dict(config.runtime)
    slo_given = sorted(k for k in overrides if k == "runtime.slo" or k.startswith("runtime.slo."))
    if slo_given and base.workload.arrival == "offline":  # (as refuse_unused_workload_overrides: it ran without)
        raise ConfigError(
            f"--config.{slo_given[0]}={overrides[slo_given[0]]} is not used by this run: "
            "config.runtime.workload.arrival='offline' is judged on its JCT, with no SLO (give arrival=online or trace)"
        )
    shared = dict(base.scheduler.policy_kwargs)
    out = {}
    for r in runs:  # (keyed by the run's label: a policy may run twice, with fields of its own each time)
        check_policy_run(r, shared, base.block_size)
        kw = {"scheduler.name": r.name, "scheduler.policy_kwargs": {**shared, **r.fields}}
        if r.layerwise is not None:
            kw["cluster.layerwise"] = r.layerwise
        cfg = out[r.label] = base.replace(**kw)
        check_layerwise_reads(
            cfg,
            "config.runtime.cluster.layerwise=False"
            if r.layerwise is None
            else f"--config.policies item layerwise=false of {r.name!r}",
        )
    return out


def policy_config(cfg, kv_bytes_per_token: int, prefill_tokens_per_s: float | None) -> dict:
    """Every field of the Config `cfg`'s policy runs with (α / β / block size filled from this cluster where not
    given, as `driver.run` builds it), as JSON values (others by their repr)."""
    from dualpath_jax.runtime import driver
    from schedulers.registry import POLICIES, build_config

    name = cfg.scheduler.name
    config = build_config(
        POLICIES.get(name), name, **driver.policy_kwargs(cfg, kv_bytes_per_token, prefill_tokens_per_s)
    )
    out = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        out[f.name] = v if v is None or isinstance(v, bool | int | float | str) else repr(v)
    return out


def fields_line(kwargs: dict) -> str | None:
    """The table's line naming the fields given to each policy (None where none was given)."""
    given = [f"{p} " + " ".join(f"{k}={v!r}" for k, v in kw.items()) for p, kw in kwargs.items() if kw]
    if not given:
        return None
    return f"policy fields: {'; '.join(given)} (every field each ran with: results.json policy_config)"


def token_rows(tokens: dict) -> list:
    """A run's greedy tokens ((trajectory, turn) -> ids) as [trajectory, turn, [ids]] rows in (trajectory, turn)
    order: turns_<policy>.json's `tokens`."""
    return [[int(t), int(i), [int(x) for x in tokens[(t, i)]]] for t, i in sorted(tokens)]


def reference_tokens(base, trajs, ops) -> dict:
    """`--config.reference`: the single-process reference's tokens (`driver.reference_tokens`), made in this process
    after the runs, to compare the policies' greedy tokens with."""
    from dualpath_jax.runtime import driver

    t0 = time.monotonic()
    ref = driver.reference_tokens(base, trajs, ops)
    logging.info("single-process reference: %d turns in %.1f s", len(ref), time.monotonic() - t0)
    return ref


def write_results_json(out_dir: str, summary: dict) -> None:
    """results.json (NaN, e.g. TPOT of 1-token turns: null, as turns_*.json), written atomically."""

    from dualpath_jax import metrics

    def write(path):
        with open(path, "w") as f:
            json.dump(metrics.json_safe(summary), f, indent=1, default=float)

    write_atomically(os.path.join(out_dir, "results.json"), write)


def incomplete_line(done: list, policies: list) -> str:
    """results.json's `failed` while the job runs: written after each policy, the file says which are still missing
    (the final write replaces it; a job killed hard, kill -9 or the OOM killer, leaves this one)."""
    rest = [p for p in policies if p not in done]
    return (
        f"incomplete: written when {', '.join(done)} had finished; the job ended (killed) or was still running "
        f"before {', '.join(rest)} finished (results of {', '.join(done)} only)"
    )


def dead_nodes(result) -> dict:
    """The nodes declared dead in a policy's run, and why (`RunResult.dead_nodes`; {} for a result without them)."""
    return dict(getattr(result, "dead_nodes", None) or {})


def unstored_blocks(result) -> int:
    """Write-back blocks the KV store did not keep in a policy's run, over its nodes (each node's storage NIC counts
    the blocks the store refused for room or failed to write; `node_stats`' `unstored_blocks`)."""
    return sum(st.get("unstored_blocks", 0) for st in (getattr(result, "node_stats", None) or {}).values())


def unstored_note(policy: str, result) -> str:
    """The table's note on a run whose store did not keep some write-backs: its hits and JCT are a smaller store's."""
    return (
        f"note: {policy}'s run could not store {unstored_blocks(result)} write-back blocks (the KV store refused them "
        "for room, config.runtime.store_options' capacity_bytes, or failed to write them: its log says which); later "
        "turns recomputed their KV, so its hits and JCT are not those of a store that kept them"
    )


def evicted_blocks(result) -> int:
    """Blocks the KV store evicted for room in a policy's run (`RunResult.store_stats`' `evictions`: LRU evictions under
    `capacity_bytes`; 0 for a result without them)."""
    return int((getattr(result, "store_stats", None) or {}).get("evictions", 0))


def evicted_note(policy: str, result) -> str:
    """The table's note on a run whose store evicted blocks (smaller than the working set): the write-backs were all
    stored, so `unstored_note` said nothing, yet its later turns recomputed the evicted KV."""
    return (
        f"note: {policy}'s KV store evicted {evicted_blocks(result)} blocks to stay within config.runtime.store_options' "
        "capacity_bytes; turns that would have "
        "hit them recomputed their KV, so its hits and JCT are those of a store of that size (results.json: store_stats)"
    )


def warn_if_store(d: str) -> bool:
    """Warn (and say so) when --config.runtime.store_dir `d` is itself a KV store (its STORE.json): the obvious way
    to try re-using a run's `<stamp>-<policy>` store, which ran silently on fresh subdirectories of it instead.
    A warning, not a refusal: the nested stores are correct and leave its blocks alone; only the re-use is not."""
    if not os.path.isfile(os.path.join(d, "STORE.json")):
        return False
    logging.warning(
        "--config.runtime.store_dir %r is itself a KV store (it holds STORE.json): experiments.run runs each policy "
        "on a fresh subdirectory of it and reads none of its blocks (every run starts cold, for comparable hit "
        "rates); to re-use a store, run the driver API on it (`driver.run` with `RuntimeConfig.store_dir` set to "
        "it)", d,
    )  # fmt: skip
    return True


def shares_stderr() -> bool:
    """stdout goes where stderr goes (one terminal, or `2>&1`): the exit's line on stderr needs no copy under the
    table (it was printed twice); where stdout is piped apart, the table printed there keeps it."""
    try:
        return os.path.samestat(os.fstat(sys.stdout.fileno()), os.fstat(sys.stderr.fileno()))
    except (OSError, ValueError, AttributeError):  # (no file descriptor: a captured stream)
        return False


def write_failed_line(out_dir: str, e: OSError, written: list, failed: str | None) -> str:
    """The exit's line when the final files could not be written (a full disk): the directory, the error, what is
    there and what is not (the table printed above is the run's); `failed`, the run's own line, before it."""
    there = sorted(f for f in os.listdir(out_dir) if f.startswith("turns_")) if os.path.isdir(out_dir) else []
    missing = [n for n in ("results.json", "table.txt", "run.json") if n not in written]
    line = (
        f"cannot write the results in {out_dir} ({e.strerror or e}): written {', '.join(there + written) or 'nothing'}"
        f"; not written {', '.join(missing)}"
    )
    if "results.json" not in written and os.path.exists(os.path.join(out_dir, "results.json")):
        line += (
            " (its results.json is the one written while the policies ran: its `failed` says the job was killed or "
            "still running; it ended on this error instead)"
        )
    line += "; the table above is the run's"
    return f"{failed}; {line}" if failed else line


def main(argv):
    # SIGTERM (kill, `timeout`, a batch scheduler) stops the job as Ctrl-C does: the finished policies are written. Its
    # default action ended the process at once: no results.json, table.txt or run.json, an empty directory, no word.
    with SigtermAsInterrupt() as term:
        _main(argv, term)


def _main(argv, term: SigtermAsInterrupt):
    if len(argv) > 1:
        raise app.UsageError(f"unknown arguments: {argv[1:]}")
    started = clock.now()  # (run.json: the start and the wall time)
    import jax

    from dualpath_jax import metrics
    from dualpath_jax.runtime import driver
    from dualpath_jax.runtime.config import ConfigError, file_label
    from dualpath_jax.runtime.launcher import LocalCluster, accelerator_sharing_env, enable_compilation_cache
    from dualpath_jax.runtime.model_ops import model_config
    from dualpath_jax.runtime.scheduler_service import RunFailed

    config = config_or_exit(_CONFIG)
    refuse_unused_workload_overrides(_CONFIG)
    if config.runtime.launcher == "local":  # (before this process uses an accelerator: it calibrates on it too)
        os.environ.update(accelerator_sharing_env())
    enable_compilation_cache()
    import flax
    import numpy as np

    logging.info(
        "python %s, jax %s, flax %s, numpy %s, devices %s",
        platform.python_version(),
        jax.__version__,
        flax.__version__,
        np.__version__,
        jax.devices(),
    )
    logging.info("resolved config:\n%s", config)
    # Everything is checked before anything starts: the list of policies, each policy's config (its own fields over
    # the shared ones; not runtime.scheduler.name's, which no run uses), the model, the workload. A bad config is one
    # line naming the field (no traceback; a UsageError printed the whole --help above it).
    results_made = None  # (the results directory's parts this launcher made, `dirs_made_for`)
    try:
        configs = policy_configs(config, flags.FLAGS[_CONFIG.name].override_values or {})
        policies = list(configs)
        base = configs[policies[0]]
        # Each run's kept store is a fresh subdirectory of runtime.store_dir (`one` below), so the checks open a
        # scratch store (its options checked there), not that directory: it was opened as a store itself (STORE.json
        # and blocks/ made beside the runs' subdirectories, a store kept in it trimmed to capacity_bytes).
        # (before the model is built, not after; made now: dropped again if a check below refuses the config)
        results_made = dirs_made_for(config.results_dir)
        writable_dir_or_exit(config.results_dir, "--config.results_dir")
        for d in sorted({c.store_dir for c in configs.values() if c.store_dir}):
            writable_dir_or_exit(d, "--config.runtime.store_dir")
            warn_if_store(d)
        trajs, ops = driver.prepare(base.replace(store_dir=""))
        for p in policies[1:]:
            driver.prepare(configs[p].replace(store_dir=""), trajs, ops)
        window = driver.slo_window(base, trajs)  # (None offline: no SLO)
        m = model_config(base.model, base.dtype)  # (the log said only config.runtime.model, a name or a path)
        logging.info(
            "model %s: %s, %d layers, %d B of KV per token (%s), %d trajectories",
            base.model, m.architecture, m.num_layers, m.kv_bytes_per_token, m.kv_layout.np_dtype, len(trajs),
        )  # fmt: skip
    except BaseException as e:  # (a bad config; a crash or Ctrl-C while the model is built: its traceback, as before)
        if results_made is not None:  # (either way, no empty results directory left behind)
            drop_empty_dirs(config.results_dir, results_made)
        if isinstance(e, ConfigError):  # (its field paths as the flags name them: config.runtime.workload.aps)
            raise SystemExit(runtime_config_line(e)) from None
        raise
    # the fields each policy is given, and every one it runs with (α / β from this cluster included): in the results
    given_kwargs = {p: dict(c.scheduler.policy_kwargs) for p, c in configs.items()}
    # a new directory of its own, before the runs (not after); `stamp` also names the kept stores' subdirectories
    out_dir = fresh_dir_or_exit(
        config.results_dir, datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%SZ"), "--config.results_dir"
    )
    stamp = os.path.basename(out_dir)
    prefill_tps = None
    if config.calibrate:
        prefill_tps = prefill_tokens_per_s_or_exit(ops, base, out_dir)
        logging.info("measured prefill throughput on this machine: %.0f tokens/s (DualPath's beta)", prefill_tps)
    kv = m.kv_bytes_per_token  # (the model logged above)
    run_kwargs = {p: policy_config(c, kv, prefill_tps) for p, c in configs.items()}
    results, failed = {}, None
    reference = None  # --config.reference: the single-process reference's tokens, made after the runs
    store_dirs = {}  # run label -> the fresh store subdirectory it ran on (a kept runtime.store_dir; `one` below)

    def results_summary(failed_line: str | None, reference_skipped: str | None = None) -> dict:
        """results.json of the policies finished so far (`failed_line`: why the others are missing, or None;
        `reference_skipped`: why --config.reference's comparison is missing)."""
        info = token_agreement(results, base.batch_invariant)[1]
        info["sha256"] = {p: tokens_sha256(r.tokens) for p, r in results.items()}
        if reference is not None:  # (--config.reference: every policy against the single-process reference)
            info["reference"] = reference_agreement(results, reference, base.batch_invariant)[1]
            info["reference"]["sha256"] = tokens_sha256(reference)
        elif reference_skipped:
            info["reference"] = {"not_compared": reference_skipped}
        return {
            "failed": failed_line,
            "greedy_tokens": info,
            "config": config.to_dict(),
            "prefill_tokens_per_s": prefill_tps,
            "policy_kwargs": {p: given_kwargs[p] for p in results},  # as given: its own items over the shared ones
            "policy_config": {p: run_kwargs[p] for p in results},  # every field of its Config it ran with
            # False: Basic prefill (a `layerwise=` item)
            "layerwise": {p: configs[p].cluster.layerwise for p in results},
            # online / trace: the SLO every policy was judged on (its figures: in each policy's results)
            **({} if window is None else {"slo": slo_settings(base, window)}),
            "results": {p: driver.summary_with_sim_link_names(r.summary) for p, r in results.items()},
            "requeued": {p: r.requeued for p, r in results.items()},
            "dead_nodes": {p: dead_nodes(r) for p, r in results.items()},  # node -> why it died in that policy's run
            # write-back blocks the store did not keep (refused for room, or a failed write)
            "unstored_blocks": {p: unstored_blocks(r) for p, r in results.items()},
            # the KV store's counters over the run's store objects (hits, evictions, write_rejected...)
            "store_stats": {p: dict(getattr(r, "store_stats", None) or {}) for p, r in results.items()},
            # each run's own store subdirectory of runtime.store_dir (warm-up and unfinished policies too: on disk)
            **({"store_dirs": dict(store_dirs)} if store_dirs else {}),
            "schedule_time_s": {p: r.schedule_time_s for p, r in results.items()},
            "node_stats": {
                p: {n: {k: v for k, v in st.items() if k != "step_log"} for n, st in r.node_stats.items()}
                for p, r in results.items()
            },
            "speedup_vs_first": {
                p: results[policies[0]].summary["jct_s"] / r.summary["jct_s"] for p, r in results.items()
            },
        }

    session = LocalCluster(driver.layout_groups(base), netns=base.netns) if base.launcher == "local" else None
    try:

        def one(cfg, label, ts=trajs):
            if cfg.store_dir:  # a kept store: each run its own fresh subdirectory (no policy hits another's blocks)
                cfg = cfg.replace(
                    store_dir=fresh_dir_or_exit(
                        cfg.store_dir, f"{stamp}-{file_label(label)}", "--config.runtime.store_dir"
                    )
                )
                # (two runs started in the same second got `-basic` and `-basic-2`, and nothing said whose was whose)
                store_dirs[label] = cfg.store_dir
                logging.info("%s: KV store in %s (fresh)", label, cfg.store_dir)
            return runtime_run(cfg, ts, label, ops, prefill_tps, session)

        if config.warmup:
            # A few of the conversations at unpaced NIC speed: every code path runs once in the session's node
            # processes (connections, buffers, any step not precompiled) before the measured runs.
            fast = base.replace(**driver.unpaced_nics(base))
            t0 = time.monotonic()
            one(fast, "warm-up", trajs[: max(1, len(trajs) // 8)])
            nics = "unpaced SNICs; CNICs kernel-shaped" if base.netns else "unpaced NICs"
            logging.info("warm-up run (%s): %.1f s", nics, time.monotonic() - t0)
        for p in policies:
            t0 = time.monotonic()
            res = one(configs[p], p)
            logging.info(
                "%s: %d turns in %.1f s wall (startup %.1f s)",
                p,
                len(res.records),
                time.monotonic() - t0,
                res.startup_s,
            )
            slo = {}
            if window is not None:  # (the SLO's figures, `driver.run`'s judgement, are in its summary too: the table)
                slo = {"slo": {**slo_settings(base, window), **res.slo}}
            results[p] = res
            # (links under the simulator's names, as its links.csv: `driver.sim_link_name`)
            write_atomically(
                os.path.join(out_dir, f"turns_{file_label(p)}.json"),
                lambda path, p=p, res=res, slo=slo: metrics.write_json(
                    path,
                    res.records,
                    driver.with_sim_link_names(res.links),
                    policy=configs[p].scheduler.name,
                    label=p,
                    policy_kwargs=given_kwargs[p],
                    policy_config=run_kwargs[p],
                    tokens=token_rows(res.tokens),  # the greedy tokens, to compare a re-run's with (README "What ran")
                    # the nodes lost in its run (node -> why) and the requests re-run on the others (a re-run turn's
                    # hits include what its first attempt stored)
                    dead_nodes=dead_nodes(res),
                    requeued=res.requeued,
                    **slo,  # online / trace: the SLO and its figures, recomputed from "turns" by judge_slo
                ),
            )
            if len(results) < len(policies):  # (kill -9 of the job from here on keeps the finished policies' results)
                write_results_json(out_dir, results_summary(incomplete_line(list(results), policies)))
    except BaseException as e:  # a failed run or Ctrl-C (one line), another error (its traceback): finished ones kept
        term.hold()  # (another Ctrl-C or SIGTERM from here on: noted; what finished is written first)
        if not results:  # nothing finished: no empty results directory left behind (a Ctrl-C in the warm-up left one)
            remove_if_empty(out_dir)
            if isinstance(e, KeyboardInterrupt):
                # (a kept runtime.store_dir keeps the blocks the interrupted run stored: consistent, reusable; named)
                kept = sorted(set(store_dirs.values()))
                what = f"no results written; its KV store is kept in {', '.join(kept)}" if kept else "nothing written"
                raise SystemExit(f"interrupted ({interrupted_by(e)}) before any policy finished; {what}") from None
        # ("interrupted (SIGTERM)" for SIGTERM; a SystemExit's line, e.g. a store directory turned read-only)
        failed = stopped_early(e, RunFailed, kept=bool(results), name=flag_line)
    finally:
        term.hold()  # (from the end of the policies' loop on: a Ctrl-C lost run.json, with a traceback)
        if session is not None:
            session.close()
    reference_skipped = None
    if config.get("reference", False) and results:
        try:
            with term.interruptible():  # (the one step the results can do without)
                reference = reference_tokens(base, trajs, ops)
        except KeyboardInterrupt as e:  # (Terminated too): not compared, everything else written
            if not isinstance(e, Terminated):  # (SIGTERM: `term.got`)
                term.got_int = True
            reference_skipped = (
                f"greedy tokens vs the single-process reference: reference interrupted: not compared "
                f"({interrupted_by(e)} while --config.reference computed it)"
            )
    if failed:  # the policies that finished keep their table and results.json; the others are named
        failed += (
            f" (results of {', '.join(results)} only, not of {', '.join(p for p in policies if p not in results)})"
        )
    table = format_table(results, base.slo.percentile if window is not None else None)
    fields = fields_line({p: given_kwargs[p] for p in results})
    if fields:
        table += "\n" + fields
    if window is not None:
        table += "\n" + slo_line(base, window, len(trajs) if base.workload.arrival == "online" else None)
        unjudged = [p for p in results if results[p].summary.get("slo_turns") == 0]
        if unjudged:  # (trace arrivals: a warm-up after every turn is known only once they ran)
            table += (
                f"\nnote: no turn of {', '.join(unjudged)} arrived in the SLO's window: nothing was judged (SLO n/a; "
                f"config.runtime.slo.warmup_s={base.slo.warmup_s:g})"
            )
    if not config.warmup and policies[0] in results and (len(results) > 1 or window is not None):
        # Without the warm-up, whatever the first policy compiles (buckets not precompiled, first connections)
        # is in its JCT, and online in its latencies: a cold run beside warm ones (online: one policy alone too)
        table += "\n" + warmup_note(policies[0], window is not None)
    for p, r in results.items():  # (its JCT then compares fewer engines with the others' whole cluster)
        lost = dead_nodes(r)
        if lost:
            table += (
                f"\nnote: {p}'s run lost "
                + ", ".join(f"node {n} ({why})" for n, why in sorted(lost.items()))
                + f"; it ran on fewer engines than configured from then on ({r.requeued} requests re-ran on the others)"
            )
    for p, r in results.items():  # (the store's log said so per block; the table and results.json did not)
        if unstored_blocks(r):
            table += "\n" + unstored_note(p, r)
        if evicted_blocks(r):
            table += "\n" + evicted_note(p, r)
    agreement = token_agreement(results, base.batch_invariant)[0]
    if agreement:
        table += "\n" + agreement
    if reference is not None:
        table += "\n" + reference_agreement(results, reference, base.batch_invariant)[0]
    if reference_skipped:
        table += "\n" + reference_skipped
    # The run's failed / interrupted line ends the table (table.txt) and is the exit's line on stderr: printed under
    # the table only where stdout goes elsewhere (piped apart, its table says it), not twice on one terminal.
    shown = table
    if failed:
        table += "\n" + failed
        shown = table if not shares_stderr() else shown
    print(shown)
    written = []  # (a full disk: one line naming what is there, no traceback)
    try:
        write_results_json(out_dir, results_summary(failed, reference_skipped))
        written.append("results.json")
        write_atomically(os.path.join(out_dir, "table.txt"), lambda path: Path(path).write_text(table + "\n"))
        written.append("table.txt")
        if config.plot and plot(results, os.path.join(out_dir, "run.png")):
            logging.info("plot: %s", os.path.join(out_dir, "run.png"))
        # what ran (a re-run of its `command` makes a results directory of its own)
        info = driver.run_info(
            "experiments.run", started, base, config.to_dict(), run_file=os.path.join(out_dir, metrics.RUN_FILE)
        )
        if store_dirs:  # (as results.json's)
            info["store_dirs"] = dict(store_dirs)
        metrics.write_run_info(out_dir, info)
        written.append("run.json")
    except OSError as e:
        raise SystemExit(write_failed_line(out_dir, e, written, failed)) from None
    logging.info("results written to %s", out_dir)
    if failed:
        raise SystemExit(failed)
    if term.got:  # (it came after the last policy finished: every result is written)
        raise SystemExit(f"stopped by SIGTERM after every policy finished; the results are in {out_dir}")
    if term.got_int:  # (as SIGTERM: a Ctrl-C after the last policy finished, noted while the results were written)
        raise SystemExit(f"interrupted (Ctrl-C) after every policy finished; the results are in {out_dir}")


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    app.run(main, flags_parser=parse_flags_or_exit)
