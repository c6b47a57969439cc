"""Runtime figures: DualPath vs Basic on the emulated 1P2D I/O-bound setup, the simulator's prediction for the
same setup, and the runtime's per-turn overhead against model compute alone.

    python -m experiments.bench_runtime                       # configs/tiny_runtime.py (local processes)
    python -m experiments.bench_runtime --config.runtime.workload.agents=48
    python -m experiments.bench_runtime --config=configs/tiny_runtime.py:test --skip_overhead   # quick look

1. Speedup: one session of node processes (every prefill bucket compiled first, `cluster.precompile` forced on,
   then a warm-up run at unpaced NIC speed), then
   `basic` and `dualpath` on the same conversations with the configured NIC caps. JCT speedup measured in
   this run.
2. Simulator: `dualpath_jax.sim.Simulator` on the same trajectories, the same 1P2D layout, NIC caps, block
   size, buffers, decode slots, fetch interval, PE batcher, arrivals and policies, with a cost model fitted
   (least squares, `schedulers.cost_model.CostModel.from_fit`) to the prefill batches and decode steps the
   runtime measured in step 1 on this machine. Its predicted speedup is printed beside the measured one.
3. Overhead: one agent at a time (no queueing), NICs unpaced: per-turn wall time of the runtime (scheduler
   fetches, store reads/writes, transfers, buffers) against the model compute of the same turns (prefill
   + decode steps measured inside the engines).
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import math
import os
import time

from absl import app, flags, logging

from dualpath_jax import clock
from experiments import (
    SigtermAsInterrupt,
    config_or_exit,
    define_config_file,
    define_rerun_of,
    flag_line,
    fresh_dir_or_exit,
    interrupted_by,
    log_start,
    parse_flags_or_exit,
    prefill_tokens_per_s_or_exit,
    pyplot_or_none,
    refuse_flags_of_parts_not_run,
    refuse_unused_workload_overrides,
    remove_if_empty,
    runtime_config_line,
    runtime_run,
    stopped_by,
    stopped_early,
    write_atomically,
)

_CONFIG = define_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "tiny_runtime.py"), "Runtime configuration."
)
_SKIP_SIM = flags.DEFINE_bool("skip_sim", False, "Do not run the simulator comparison.")
_SKIP_OVERHEAD = flags.DEFINE_bool("skip_overhead", False, "Do not measure the per-turn overhead.")
_OVERHEAD_TURNS = flags.DEFINE_integer(
    "overhead_turns", 8, "Turns of the single agent of the overhead figure.", lower_bound=1
)
define_rerun_of()


def step_measurements(results) -> list:
    """The prefill batches and decode steps the engines timed, as cost-model measurements."""
    from schedulers.cost_model import DecodeMeasurement, PrefillMeasurement

    out = []
    for res in results:
        for st in res.node_stats.values():
            for log in st.get("step_log", {}).values():
                for entry in log:
                    if len(entry) == 2:
                        items, s = entry
                        if s > 0:
                            out.append(PrefillMeasurement(tuple(tuple(x) for x in items), s))
                    else:
                        b, ctx, s = entry
                        if s > 0:
                            out.append(DecodeMeasurement(b, ctx, s))
    return out


class _FittedCost:
    """What the simulator asks of a cost model, from one model fitted to this machine's measured steps."""

    def __init__(self, cost):
        self.cost = cost

    def batch_prefill_time(self, items):
        return self.cost.batch_prefill_time(items)

    def decode_step_time(self, batch_size, total_context_tokens):
        return self.cost.decode_step_time(batch_size, total_context_tokens)


def sim_config(cfg, model, policy_kwargs: dict, n_agents: int = 1, store_capacity_gb: float | None = None):
    """The simulator's copy of the runtime's emulated cluster (`model`: the cost model's ModelShape), checked as
    `experiments.simulate` checks a config file when it loads (`sim.config.validate_sim_config`): every number in
    range, the policy's and batcher's kwargs accepted. A bad value is a ValueError naming the field.
    `store_capacity_gb`: the runtime's bounded store as the simulator's (`sim_store_capacity_gb`; None: unbounded)."""
    from dualpath_jax.runtime import launcher
    from dualpath_jax.sim import ClusterConfig, SimConfig, WorkloadConfig
    from dualpath_jax.sim.config import validate_sim_config

    c = cfg.cluster
    kvb = model.kv_bytes_per_token
    cluster = ClusterConfig(
        model=model.name,
        hardware="cpu",
        prefill_nodes=c.prefill_nodes,
        decode_nodes=c.decode_nodes,
        gpus_per_node=c.engines_per_node,
        snic_gbps=cfg.nics.snic_bytes_per_s / 1e9,
        cnic_gbps=cfg.nics.cnic_bytes_per_s / 1e9,
        dram_gbps=33.0,
        host_buffer_gb=cfg.buffers.pe_buffer_bytes / 1e9,  # the PE nodes' (the runtime sizes the DE nodes' apart)
        de_host_buffer_gb=cfg.buffers.de_buffer_bytes / 1e9,
        # (the runtime's basic prefill bound, cluster.pe_hbm_kv_bytes; 0 there: none, so a bound no request meets)
        pe_hbm_kv_gb=c.pe_hbm_kv_bytes / 1e9 if c.pe_hbm_kv_bytes else 1.0,
        de_hbm_kv_gb=c.decode_slots * c.max_seq_len * kvb / 1e9,
        de_max_seqs=c.decode_slots,  # a runtime DE decodes at most decode_slots sequences, however short
        block_size=cfg.block_size,
        kv_bytes_per_token=kvb,
        high_share=cfg.nics.high_priority_share,
        max_reads_per_node=1,  # the runtime's SNIC serves its read queue one request at a time (FIFO)
        fetch_interval_s=cfg.scheduler.fetch_interval_s,
        # the runtime's prefill: layer by layer (its basic policy too, reading and placing as basic) unless
        # cluster.layerwise is off (the paper's Basic)
        layerwise=c.layerwise,
        writeback=True,
        store_capacity_gb=store_capacity_gb,
    )
    sim_cfg = SimConfig(
        cluster=cluster,
        workload=WorkloadConfig(kind="offline", n_agents=n_agents),
        policy=cfg.scheduler.name,
        policy_kwargs=dict(policy_kwargs),
        batcher=cfg.scheduler.batcher,
        batcher_kwargs=launcher.batcher_kwargs(cfg, model),  # as the runtime's PEs batch
    )
    validate_sim_config(sim_cfg)
    return sim_cfg


def simulate(
    cfg,
    trajs,
    cost,
    policy_kwargs: dict,
    window: tuple[float, float] | None = None,
    store_capacity_gb: float | None = None,
) -> dict:
    """The simulator on the runtime's emulated cluster; returns its summary (JCT, SNIC balance, ...), with `slo`
    (`driver.judge_slo` of its turns under `cfg.slo`) where `window` (`driver.slo_window`) is given. A bad value
    of its config is a ValueError naming the field (`sim_config`); a workload it cannot run, a SimConfigError."""
    from dualpath_jax.runtime import driver
    from dualpath_jax.sim.runner import summarize

    sim = build_simulator(cfg, trajs, cost, policy_kwargs, store_capacity_gb)
    records, links, stats = sim.run()
    out = summarize(sim.cfg, records, links, stats)
    if window is not None:
        out["slo"] = driver.judge_slo(cfg, window, records)
    return out


def build_simulator(cfg, trajs, cost, policy_kwargs: dict, store_capacity_gb: float | None = None):
    """The simulator of `simulate`, not run yet: `sim_config`'s copy of the cluster (its DE nodes' host buffers
    `buffers.de_buffer_bytes` as the runtime's DE nodes map, `cluster.de_host_buffer_gb`; they had the PE size)."""
    import schedulers
    from dualpath_jax import compiled
    from dualpath_jax.runtime import driver

    sim_cfg = sim_config(cfg, cost.model, policy_kwargs, n_agents=len(trajs), store_capacity_gb=store_capacity_gb)
    trajs = with_first_prompt_hashes(trajs, cfg.block_size)
    policy = schedulers.make_policy(sim_cfg.policy, **sim_cfg.policy_kwargs)
    batcher = schedulers.make_batcher(sim_cfg.batcher, **sim_cfg.batcher_kwargs)
    arrivals = None  # the runtime's arrival model: online / trace agents do not all start at t = 0 (offline)
    if hasattr(cfg, "workload"):  # (a stand-in config without a workload: offline)
        arrivals = driver.make_arrival_model(cfg)
        trajs = arrivals.with_arrivals(trajs)
    simulator = compiled.load("dualpath_jax.sim.simulator").Simulator  # as sim.runner builds it
    sim = simulator(
        sim_cfg,
        trajs,
        policy,
        batcher,
        _FittedCost(cost),
        cost.model.kv_bytes_per_token,
        cost.model.layers,
        arrival_model=arrivals,
    )
    return sim


def sim_store_capacity_gb(cfg, ops) -> float | None:
    """The runtime's bounded store (`store_options` `capacity_bytes` of the `local_dir` store) as the simulator's
    `cluster.store_capacity_gb`: the whole block files it holds (a file is a header + the Full Block) x block_size x
    KV bytes per token. None: an unbounded store, or a store of one's own (its capacity's meaning is its own)."""
    from dualpath_jax.runtime.node import block_layout
    from dualpath_jax.store import block_file

    cap = cfg.store_options.get("capacity_bytes")
    if cap is None or cfg.store != "local_dir":
        return None
    blocks = int(cap) // block_file.file_nbytes(block_layout(cfg, ops))
    # (the bare product: the simulator reads a room within ROOM_SLACK of whole tokens as those tokens. Half a byte
    # added against its flooring, before that, made it a token more than the blocks, e.g. 509,350,992 at 1 B/token)
    return blocks * cfg.block_size * ops.config.kv_bytes_per_token / 1e9


def bounded_store_note(cfg, store_capacity_gb: float | None) -> str | None:
    """The line under the prediction of a run on a bounded store: how the simulator's copy models it (one store-wide
    LRU over trajectories, `sim_store_capacity_gb`), and where the runtime's differs."""
    cap = cfg.store_options.get("capacity_bytes")
    if cap is None:
        return None
    what = f"config.runtime.store_options' capacity_bytes={cap}"
    if store_capacity_gb is None:
        return (
            f"note: the runtime's KV store {cfg.store!r} is bounded ({what}); the simulator's copy models an "
            "unbounded store, so its hits are those of a store that evicts nothing"
        )
    note = (
        f"note: the runtime's KV store is bounded ({what}); the simulator's copy holds as many blocks "
        f"(cluster.store_capacity_gb={store_capacity_gb:.6g}) in one store-wide LRU over trajectories"
    )
    if cfg.store == "local_dir":  # (one keeper of the capacity, the driver's store object, whatever the launcher)
        note += (
            "; the runtime's is one LRU over blocks (the driver's store object keeps the capacity for every node), "
            "and its directory also holds the write-backs of turns in flight until that object indexes them"
        )
    return note


def with_first_prompt_hashes(trajs, block_size: int) -> list:
    """`trajs` with each first turn that has its token ids (a trace's, `driver.make_trajectories`) carrying the keys of
    its whole blocks (`block_keys`, as the runtime's store keys them) as `block_hashes`, so the simulator hits what
    one trajectory's first prompt shares with another's stored prompt, as the runtime's store does
    (`workload.shared_prefix_hits`; the copy hit only each trajectory's own context). Later turns need none: their
    prompts hold the model's generated tokens past the first append, so no other trajectory shares more of them
    than their own context gives."""
    import numpy as np

    from dualpath_jax.block_keys import block_keys
    from dualpath_jax.workloads.types import Trajectory

    out = []
    for t in trajs:
        first = t.turns[0] if t.turns else None
        if first is None or first.append_token_ids is None or first.block_hashes is not None:
            out.append(t)
            continue
        keys = block_keys(first.append_token_ids, block_size)  # (bytes; their first 8 as the simulator's int ids)
        hashes = np.asarray([int.from_bytes(k[:8], "little", signed=True) for k in keys], np.int64)
        turn0 = dataclasses.replace(first, block_hashes=hashes, hash_block_size=block_size)
        out.append(Trajectory(t.trajectory_id, [turn0, *t.turns[1:]], t.arrival_time, t.source))
    return out


def slo_lines(slo, window: tuple[float, float], measured: dict, predicted: dict | None = None) -> list[str]:
    """The printed SLO verdict of an online / trace run: per policy its attainment, the judged TTFT / TPOT at
    `slo.percentile` over the window (what the verdict rests on) and the verdict, runtime / simulator copy.
    `measured` / `predicted`: policy -> `driver.judge_slo`'s dict; `predicted` None: the runtime's alone (no copy:
    --skip_sim, or its prediction skipped)."""

    def cell(x: dict, key: str, fmt: str) -> str:
        v = x.get(key, math.nan)
        if key == "slo_met":  # (no turn judged: no verdict, as experiments.run's table)
            return "n/a" if x.get("slo_turns") == 0 else "met" if v is True else "missed"
        if isinstance(v, float) and math.isnan(v):  # (no turn in the window, or none with a TPOT)
            return "n/a"
        return f"{v * 1e3:.1f}" if fmt == "ms" else fmt.format(v)

    # (key in judge_slo's dict, label, format); the judged pair as experiments.run's `judged_columns` (not imported:
    # that module defines a --config flag of its own)
    q = f"{slo.percentile:g}"
    cols = [("slo_attainment", "attainment", "{:.1%}"), (f"ttft_p{q}_s", f"TTFT p{q} s", "{:.3f}")]
    cols += [(f"tpot_p{q}_s", f"TPOT p{q} ms", "ms"), ("slo_met", "verdict", "met")]
    sides = [measured] if predicted is None else [measured, predicted]
    rows = [[" / ".join(cell(x[p], k, f) for x in sides) for k, _, f in cols] for p in measured]
    widths = [max(len(label), *(len(r[i]) for r in rows)) for i, (_, label, _) in enumerate(cols)]
    lines = [
        f"{'':>9}  SLO (p{slo.percentile:g} TTFT <= {slo.ttft_s:g} s, TPOT <= {1e3 * slo.tpot_s:g} ms; turns "
        f"arriving in [{window[0]:g}, {window[1]:.3g}] s), {'runtime' if predicted is None else 'runtime / sim'}:",
        (f"{'':>9}  " + "  ".join(label.ljust(w) for (_, label, _), w in zip(cols, widths, strict=True))).rstrip(),
    ]
    for p, r in zip(measured, rows, strict=True):
        lines.append(f"{p:>9}  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return lines


def _plot(out: dict, path: str) -> None:
    """JCT measured vs simulated per policy, and the per-turn time split; skipped without matplotlib. The title
    names the setup (model, P/D, NIC caps, agents: from `out["config"]`) and both speedups."""
    plt = pyplot_or_none("bench_runtime.png")
    if plt is None:
        return
    o = out.get("overhead_per_turn")  # (none under --skip_overhead: one panel, not an empty second one)
    fig, axes = plt.subplots(1, 2 if o else 1, figsize=(11 if o else 6, 4.5), squeeze=False)
    axes = axes[0]
    pols = list(out.get("measured", {}))
    x = range(len(pols))
    axes[0].bar([i - 0.2 for i in x], [out["measured"][p]["jct_s"] for p in pols], 0.4, label="runtime (measured)")
    if "simulated" in out:
        sim = [out["simulated"].get(p, {}).get("jct_s", math.nan) for p in pols]
        axes[0].bar([i + 0.2 for i in x], sim, 0.4, label="simulator (fitted cost model)")
    axes[0].set_xticks(list(x), pols)
    axes[0].set_ylabel("JCT (s)")
    axes[0].set_ylim(top=axes[0].get_ylim()[1] * 1.25)  # (room for the legend above the bars)
    speedup = f"speedup basic -> dualpath: runtime {out.get('measured_speedup', math.nan):.2f}x"
    if "simulated_speedup" in out:
        speedup += f", simulator {out['simulated_speedup']:.2f}x"
    axes[0].set_title(speedup, fontsize=9)
    axes[0].legend(fontsize=8, loc="upper left")
    if o:
        # (colours of their own: blue / orange are runtime / simulator in the panel beside)
        axes[1].bar(["per turn"], [o["model_compute_ms"]], 0.5, label="model compute", color="tab:gray")
        axes[1].bar(["per turn"], [o["overhead_ms"]], 0.5, bottom=[o["model_compute_ms"]], label="runtime overhead",
                    color="tab:red")  # fmt: skip
        axes[1].set_ylabel("ms per turn")
        axes[1].set_ylim(top=axes[1].get_ylim()[1] * 1.25)
        axes[1].set_title("1 agent, unpaced NICs", fontsize=9)
        axes[1].legend(fontsize=8, loc="upper left")
    fig.suptitle(_plot_title(out.get("config")), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_title(config) -> str:
    """bench_runtime.png's title: `tiny_qwen2 1P2D, storage NIC 1 GB/s, compute NIC 1 GB/s, 4 agents offline` (it
    said "1P2D I/O-bound" whatever ran)."""
    try:
        rt = config["runtime"]
        c, n, w = rt["cluster"], rt["nics"], rt["workload"]
        return (
            f"{rt['model']} {c['prefill_nodes']}P{c['decode_nodes']}D, storage NIC {n['snic_bytes_per_s'] / 1e9:g} "
            f"GB/s, compute NIC {n['cnic_bytes_per_s'] / 1e9:g} GB/s, {w['agents']} agents {w['arrival']}"
        )
    except (KeyError, TypeError):  # (no config given: the runtime's setup, as the table heading says)
        return "DualPath vs Basic, emulated 1P2D I/O-bound setup"


def _write_json(out_dir: str, out: dict) -> None:
    """bench_runtime.json (NaN, e.g. TPOT of 1-token turns: null), written atomically (temp file + rename)."""
    from dualpath_jax import metrics

    def write(path):
        with open(path, "w") as f:
            json.dump(
                metrics.json_safe(out),
                f,
                indent=1,
                default=lambda x: float(x) if isinstance(x, (int, float)) else str(x),
            )

    write_atomically(os.path.join(out_dir, "bench_runtime.json"), write)


def main(argv):
    # SIGTERM (kill, `timeout`, a batch scheduler) stops the benchmark as Ctrl-C does: the measured runs are written
    # (its default action ended the process at once, nothing written)
    with SigtermAsInterrupt() as term:
        _main(argv, term)


def _main(argv, term):
    if len(argv) > 1:
        raise app.UsageError(f"unknown arguments: {argv[1:]}")
    refuse_flags_of_parts_not_run(  # (it was dropped without a word)
        [(("overhead_turns",), "the overhead figure", "--skip_overhead leaves out" if _SKIP_OVERHEAD.value else None)]
    )
    started = clock.now()  # (run.json: the start and the wall time)
    from dualpath_jax import metrics
    from dualpath_jax.runtime import driver
    from dualpath_jax.runtime.config import ConfigError, RuntimeConfig
    from dualpath_jax.runtime.launcher import LocalCluster, accelerator_sharing_env, enable_compilation_cache
    from dualpath_jax.runtime.model_ops import cost_model_shape
    from dualpath_jax.runtime.scheduler_service import RunFailed
    from schedulers.cost_model import CostModel

    config = config_or_exit(_CONFIG)
    log_start("experiments.bench_runtime", resolved_config=f"\n{config}")  # (it logged no versions, no config)
    refuse_unused_workload_overrides(_CONFIG)
    given = flags.FLAGS[_CONFIG.name].override_values or {}
    slo = sorted(k for k in given if k.split(".")[:2] == ["runtime", "slo"])
    if slo and config.runtime.workload.arrival == "offline":  # (read only for online / trace arrivals: ignored here)
        raise SystemExit(
            f"bad config: --config.{slo[0]} is not used by this run: config.runtime.workload.arrival='offline' is "
            "compared on its JCT, with no SLO (give arrival=online or trace)"
        )
    if config.runtime.launcher == "local":  # (before this process uses an accelerator: it calibrates on it too)
        os.environ.update(accelerator_sharing_env())
    enable_compilation_cache()
    try:  # everything checked before anything starts; a bad config is one line naming the field
        base = RuntimeConfig.from_config_dict(config.runtime)
        if not base.cluster.precompile:
            # A prefill bucket first met inside a measured run compiles there (~0.3-1 s on this CPU): on the small
            # :test config that made basic (run first) look 2.5x slower than DualPath where the simulator, like a
            # precompiled run, says 1.0x. The benchmark always compiles every bucket before the clock starts.
            logging.info("cluster.precompile forced on: no measured JCT may include compile time")
            base = base.replace(**{"cluster.precompile": True})
        trajs, ops = driver.prepare(base)
        window = driver.slo_window(base, trajs)  # online / trace arrivals: runtime and copy judged on one SLO
    except ConfigError as e:  # (its field paths as the flags name them: config.runtime.workload.aps)
        raise SystemExit(runtime_config_line(e)) from None
    store_gb = sim_store_capacity_gb(base, ops)  # (a bounded runtime store: the copy's, else None)
    if not _SKIP_SIM.value:  # the simulator's copy of this setup, checked before anything runs or is written
        for p in ("basic", "dualpath"):
            cfg = base.replace(**{"scheduler.name": p})
            try:  # (β from the measured prefill rate later; any positive rate gives a valid one)
                sim_config(
                    cfg,
                    cost_model_shape(ops),
                    driver.policy_kwargs(cfg, ops.config.kv_bytes_per_token),
                    store_capacity_gb=store_gb,
                )
            except (ValueError, NotImplementedError) as e:  # (NotImplementedError: no cost-model shape)
                raise SystemExit(
                    f"bad config (the simulator's copy of the {p} setup; or pass --skip_sim): {e}"
                ) from None
    # a new directory of its own, before the runs (not after); `stamp` also names the kept stores' subdirectories
    out_dir = fresh_dir_or_exit(
        config.results_dir,
        "bench_runtime-" + datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%SZ"),
        "--config.results_dir",
    )
    logging.info("results directory: %s", os.path.abspath(out_dir))  # (said at the end only)
    prefill_tps = prefill_tokens_per_s_or_exit(ops, base, out_dir)
    session = LocalCluster(driver.layout_groups(base), netns=base.netns) if base.launcher == "local" else None
    out = {"config": config.to_dict(), "prefill_tokens_per_s": prefill_tps}
    stamp, runs = os.path.basename(out_dir), itertools.count()
    failed = None
    try:

        def run(cfg, ts=trajs, label=None):
            if cfg.store_dir:  # a kept store: each run its own fresh subdirectory (no run hits another's blocks)
                cfg = cfg.replace(
                    store_dir=fresh_dir_or_exit(cfg.store_dir, f"{stamp}-{next(runs)}", "--config.runtime.store_dir")
                )
            # a bar per run, as experiments.run draws (the policies' runs took minutes without a sign of progress)
            return runtime_run(cfg, ts, label or cfg.scheduler.name, ops, prefill_tps, session)

        unpaced = driver.unpaced_nics(base)
        t0 = time.monotonic()
        run(base.replace(**{"scheduler.name": "basic", **unpaced}), trajs[: max(1, len(trajs) // 8)], "warm-up")
        logging.info("warm-up (unpaced NICs): %.1f s", time.monotonic() - t0)
        measured = {}
        for p in ("basic", "dualpath"):  # each kept as it finishes: a later run's failure keeps it
            measured[p] = run(base.replace(**{"scheduler.name": p}))
            out.setdefault("measured", {})[p] = driver.summary_with_sim_link_names(measured[p].summary)
            # (a re-run's tokens compare with these: README "What ran")
            out["measured"][p]["greedy_tokens_sha256"] = metrics.tokens_sha256(measured[p].tokens)
            if window is not None:  # (`driver.run`'s judgement of its turns under the SLO)
                out["measured"][p]["slo"] = measured[p].slo
            if base.store_options.get("capacity_bytes") is not None:  # (beside the copy's store_* counters)
                out["measured"][p]["store_stats"] = measured[p].store_stats
            if p == "basic":  # (a job killed hard, kill -9 or the OOM killer, during DualPath's run keeps basic's)
                _write_json(
                    out_dir,
                    {
                        **out,
                        "failed": "incomplete: written when basic had finished; the job ended "
                        "(killed) or was still running before dualpath finished",
                    },
                )
        jct = {p: r.summary["jct_s"] for p, r in measured.items()}
        speedup = jct["basic"] / jct["dualpath"]
        print("\n== DualPath vs Basic, emulated 1P2D I/O-bound setup (measured in one run) ==")
        for p, r in measured.items():
            s = r.summary
            print(
                f"{p:>9}: JCT {s['jct_s']:.2f} s   PE-read {s['pe_read_bytes'] / 1e6:.1f} MB   "
                f"DE-read {s['de_read_bytes'] / 1e6:.1f} MB   SNIC max/avg {s['snic_max_over_avg']:.2f}"
            )
        print(f"  speedup basic -> dualpath: {speedup:.2f}x")
        out["measured_speedup"] = speedup

        cost = None
        if not _SKIP_SIM.value:
            shape = cost_model_shape(ops)
            meas = step_measurements(measured.values())
            try:  # a run too small to vary its step shapes cannot determine the fit: no prediction, said so
                cost = CostModel.from_fit(shape, "cpu", meas)
                if cost.prefill_fit is None or cost.decode_fit is None:
                    raise ValueError("the runs measured no prefill step or no decode step")
            except ValueError as e:
                cost = None
                print(f"\n(simulator prediction skipped: {e}; run more agents or turns, or pass --skip_sim)")
        if cost is not None:
            logging.info(
                "fitted cost model on %d measured steps: %s / %s", len(meas), cost.prefill_fit, cost.decode_fit
            )
            predicted = {}
            try:
                for p in ("basic", "dualpath"):
                    cfg = base.replace(**{"scheduler.name": p})
                    kw = driver.policy_kwargs(cfg, ops.config.kv_bytes_per_token, prefill_tps)
                    t0 = time.monotonic()
                    predicted[p] = simulate(cfg, trajs, cost, kw, window, store_gb)
                    logging.info("simulated %s in %.2f s", p, time.monotonic() - t0)
            except ValueError as e:  # (SimConfigError too) a workload the copy cannot run: said; measured results kept
                print(f"\n(simulator prediction skipped: {e})")
                cost = None
        if cost is not None:
            sim_speedup = predicted["basic"]["jct_s"] / predicted["dualpath"]["jct_s"]
            print("\n== Simulator prediction for the same setup (cost model fitted to this machine's steps) ==")
            print(f"{'':>9}  {'runtime JCT':>12}  {'sim JCT':>8}  {'sim/runtime':>11}")
            for p in ("basic", "dualpath"):
                print(
                    f"{p:>9}  {jct[p]:>12.2f}  {predicted[p]['jct_s']:>8.2f}  {predicted[p]['jct_s'] / jct[p]:>11.2f}"
                )
            err = sim_speedup / speedup - 1.0
            print(f"  speedup: runtime {speedup:.2f}x, simulator {sim_speedup:.2f}x ({100 * err:+.1f}%)")
            hits = ", ".join(
                f"{p} {measured[p].summary['hit_rate']:.1%} / {predicted[p]['hit_rate']:.1%}"
                for p in ("basic", "dualpath")
            )
            print(f"  hit rate, runtime / sim: {hits}")
            note = bounded_store_note(base, store_gb)
            if note:
                print(f"  {note}")
                out["simulated_note"] = note
            # the turns' latencies too (an online run is judged on them, not on its JCT)
            print(f"{'':>9}  {'TTFT p50 s: runtime':>19}  {'sim':>6}  {'TTFT p99 s: runtime':>19}  {'sim':>6}")
            for p in ("basic", "dualpath"):
                m, q = measured[p].summary, predicted[p]
                print(
                    f"{p:>9}  {m['ttft_p50_s']:>19.3f}  {q['ttft_p50_s']:>6.3f}  {m['ttft_p99_s']:>19.3f}  "
                    f"{q['ttft_p99_s']:>6.3f}"
                )
            # where a turn's TTFT goes, means in ms (metrics.ttft_breakdown): which stage a difference sits in
            parts = ("queue", "allocation", "read", "prefill")
            print(f"{'':>9}  TTFT parts, mean ms, runtime / sim: " + " | ".join(parts))
            for p in ("basic", "dualpath"):
                m, q = measured[p].summary, predicted[p]
                cells = [f"{1e3 * m[f'ttft_{k}_mean_s']:.1f} / {1e3 * q[f'ttft_{k}_mean_s']:.1f}" for k in parts]
                print(f"{p:>9}  " + " | ".join(cells))
            if window is not None:  # the online verdict of both, one SLO and window (experiments.run's)
                mine = {p: out["measured"][p]["slo"] for p in ("basic", "dualpath")}
                print("\n".join(slo_lines(base.slo, window, mine, {p: predicted[p]["slo"] for p in mine})))
            out["simulated"] = predicted
            out["simulated_speedup"] = sim_speedup
            out["fit"] = {
                "prefill": dataclasses.asdict(cost.prefill_fit),
                "decode": dataclasses.asdict(cost.decode_fit),
            }
        if window is not None and cost is None:  # no copy (--skip_sim, or its prediction skipped): the runtime's
            print("\n" + "\n".join(slo_lines(base.slo, window, {p: out["measured"][p]["slo"] for p in measured})))

        if not _SKIP_OVERHEAD.value:
            one = base.replace(
                **{
                    "scheduler.name": "dualpath",
                    "workload.agents": 1,
                    "workload.turns": _OVERHEAD_TURNS.value,
                    **unpaced,
                }
            )
            one_trajs = driver.make_trajectories(one)
            run(one, one_trajs)  # compile this shape mix first
            res = run(one, one_trajs)
            turns = len(res.records)
            compute = sum(sum(st.get("busy_s", {}).values()) for st in res.node_stats.values())
            wall = res.summary["jct_s"]
            per_turn = {
                "wall_ms": 1e3 * wall / turns,
                "model_compute_ms": 1e3 * compute / turns,
                "overhead_ms": 1e3 * (wall - compute) / turns,
                "scheduler_ms_per_call": 1e3 * res.schedule_time_s / max(1, res.schedule_calls),
                "ttft_p50_ms": 1e3 * res.summary["ttft_p50_s"],
            }
            print("\n== Per-turn runtime overhead (1 agent, unpaced NICs, turns one after another) ==")
            print(
                f"  wall {per_turn['wall_ms']:.1f} ms/turn = model compute {per_turn['model_compute_ms']:.1f} ms "
                f"+ overhead {per_turn['overhead_ms']:.1f} ms ({100 * (wall - compute) / wall:.0f}%: scheduler fetch "
                f"interval, store reads/writes, transfers, buffers); policy {per_turn['scheduler_ms_per_call']:.3f} ms/call"
            )
            # Where a turn's wall time goes (means over turns, ms): the runtime's own steps between the model's.
            import numpy as np

            recs = sorted(res.records, key=lambda r: r.turn_index)
            parts = {
                "wait for a PE fetch (arrival->scheduled)": [r.scheduled - r.arrival for r in recs],
                "task pickup, buffer handshake, store reads (scheduled->prefill start)": [
                    r.prefill_start - r.scheduled for r in recs
                ],
                "prefill incl. KV sends to the DE": [r.prefill_end - r.prefill_start for r in recs],
                "hand-off to the DE (prefill end->first token)": [r.first_token - r.prefill_end for r in recs],
                "decode incl. write-back": [r.finished - r.first_token for r in recs],
                "turn-done report -> next turn due": [
                    b.arrival - a.finished for a, b in zip(recs, recs[1:], strict=False)
                ],
            }
            per_turn["breakdown_ms"] = {k: 1e3 * float(np.mean(v)) for k, v in parts.items() if v}
            for k, v in per_turn["breakdown_ms"].items():
                print(f"    {v:7.1f} ms  {k}")
            out["overhead_per_turn"] = per_turn
    except BaseException as e:  # a failed run or Ctrl-C (one line), another error (its traceback): measured ones kept
        term.hold()  # (another Ctrl-C or SIGTERM from here on: noted; what was measured is written first)
        if "measured" not in out:  # nothing measured: no empty results directory left behind (Ctrl-C in the warm-up)
            remove_if_empty(out_dir)
            if isinstance(e, KeyboardInterrupt):
                raise SystemExit(
                    f"interrupted ({interrupted_by(e)}) before any run was measured; nothing written"
                ) from None
        failed = out["failed"] = stopped_early(e, RunFailed, kept="measured" in out, prefix="failed", name=flag_line)
    finally:
        term.hold()
        if session is not None:
            session.close()
    _write_json(out_dir, out)  # (before the plot: a plotting failure kept no bench_runtime.json)
    _plot(out, os.path.join(out_dir, "bench_runtime.png"))
    # what ran, as the other launchers record it (a re-run of its `command` makes a results directory of its own)
    run_file = os.path.join(out_dir, metrics.RUN_FILE)  # (its `rerun` line's --rerun_of)
    metrics.write_run_info(
        out_dir, driver.run_info("experiments.bench_runtime", started, base, out["config"], run_file=run_file)
    )
    logging.info("results written to %s", out_dir)
    if failed:
        raise SystemExit(f"{failed} (the runs that finished are in {out_dir})")
    if stopped_by(term):  # (it came after the last run finished, noted while the results were written)
        raise SystemExit(f"interrupted ({stopped_by(term)}) after every run finished; the results are in {out_dir}")


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    app.run(main, flags_parser=parse_flags_or_exit)
