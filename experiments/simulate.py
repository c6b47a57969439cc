"""Simulate one cluster setup: prints a table, writes summary.json / turns.csv / links.csv / plot.png / run.json.

  python -m experiments.simulate --config=configs/paper_ds660b.py --config.scheduler.name=dualpath
  python -m experiments.simulate --config=configs/paper_ds660b.py:basic,dataset=48K,agents=1024
  python -m experiments.simulate --config=configs/sim_tiny.py --noplot

Results go to the config's `output_dir` (under results/, which git ignores) unless --output_dir is given.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import platform
import time
from collections.abc import Sequence

from absl import app, flags, logging

from dualpath_jax import clock
from experiments import (
    config_or_exit,
    define_config_file,
    define_rerun_of,
    dirs_made_for,
    drop_empty_dirs,
    hold_dir_or_exit,
    parse_flags_or_exit,
    policy_mistake,  # (defined here before: tests import it from this module)
    run_file_launcher,
    writable_dir_or_exit,
)

_CONFIG = define_config_file("config", None, "A simulator config file (configs/paper_*.py).")
# --output_dir, --plot: sweep and reproduce_paper define them too (allow_override: the launchers can be imported into
# one process, where the last one imported defines them; each launcher's command line is its own)
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Where to write results (default: config.output_dir).", allow_override=True
)
_PLOT = flags.DEFINE_bool("plot", True, "Write plot.png (matplotlib).", allow_override=True)
_MAX_TIME = flags.DEFINE_float("max_time", math.inf, "Stop the simulated clock here (seconds).")
flags.register_validator("max_time", lambda v: v > 0, message="--max_time must be > 0")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar of finished turns (stderr).")
define_rerun_of()


def log_versions() -> None:
    import numpy

    import dualpath_jax

    logging.info(
        "python %s, numpy %s, dualpath_jax %s, platform %s",
        platform.python_version(),
        numpy.__version__,
        getattr(dualpath_jax, "__version__", "?"),
        platform.platform(),
    )


def _workload_text(w) -> str:
    """The workload of the table's setup row (the config's description keeps its file's agent count when a variant
    item changes it: `agents=256` read '2048 agents')."""
    if w.kind == "offline":
        return f"offline agents={w.n_agents} dataset={w.dataset}"
    if w.kind == "online":
        return f"online aps={w.aps:g} duration_s={w.duration_s:g} dataset={w.dataset}"
    return f"trace={w.trace_path}"


def format_table(rows: list[tuple[str, object]]) -> str:
    width = max(len(k) for k, _ in rows)
    out = []
    for k, v in rows:
        if k.endswith("_bytes") and isinstance(v, int | float) and not isinstance(v, bool):
            v = f"{v / 1e9:,.1f} GB"  # (13197473171200 was a raw byte count)
        elif isinstance(v, float):
            v = f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        out.append(f"{k:<{width}}  {v}")
    return "\n".join(out)


SUMMARY_KEYS = [
    "turns",
    "unfinished_turns",
    "jct_s",
    "gen_tokens_per_s",
    "prompt_tokens_per_s",
    "ttft_p50_s",
    "ttft_p99_s",
    "tpot_p50_s",
    "tpot_p99_s",
    "ttft_queue_mean_s",
    "ttft_allocation_mean_s",
    "ttft_read_mean_s",
    "ttft_prefill_mean_s",
    "snic_max_over_avg",
    "hit_rate",
    "store_evicted_bytes",  # (these two only with a bounded store: cluster.store_capacity_gb)
    "store_lost_lookups",
    "pe_read_bytes",
    "de_read_bytes",
    "slo_attainment",
    "slo_met",
    "ttft_p90_s",
    "tpot_p90_s",
    "ttst_p50_s",
]


def _summary_keys(slo_percentile: float, summary: dict) -> list[str]:
    """SUMMARY_KEYS with the SLO percentiles the run judged, over the SLO's window (config.slo_percentile: at 95 the
    table had no SLO percentile at all, only summary.json). At 50 or 99 they are summary.json's `slo_ttft_p{q}_s` /
    `slo_tpot_p{q}_s` (`metrics.judged_keys`; `ttft_p{q}_s` there is every turn's): the table showed the all-turn
    p99 beside a verdict resting on the window's."""
    from dualpath_jax.metrics import judged_keys

    judged = {}  # (an offline run's: none; its summary has no p90, the rows skip them)
    if "slo_met" in summary:
        judged = dict(zip(("ttft_p90_s", "tpot_p90_s"), judged_keys(summary, slo_percentile), strict=True))
    return [judged.get(k, k) for k in SUMMARY_KEYS]


STAT_KEYS = [
    "events",
    "wall_s",
    "events_per_s",
    "turns_per_s",
    "fetches",
    "flow_solves",
    "mean_component_flows",
    "compiled",
]


def ran_config(cfg_dict: dict, sc, output_dir: str) -> dict:
    """The config file's dict with the fields that ran (a SimConfig: a mode's policy, layerwise, fetch scope and
    I/O, the derived DE HBM) and the results' directory in place of the given ones: a `:basic` run said
    `scheduler.name: dualpath`. With the model shape and the hardware profile that ran (`model_shape`,
    `hardware_profile`): the record of a model or GPU of one's own loads without the file that registered it."""
    from dualpath_jax.sim.config import recorded_parts

    ran = dataclasses.asdict(sc)
    out = dict(cfg_dict, output_dir=output_dir)
    out["scheduler"] = {"name": ran.pop("policy"), "kwargs": ran.pop("policy_kwargs")}
    out["batcher"] = {"name": ran.pop("batcher"), "kwargs": ran.pop("batcher_kwargs")}
    out.update(ran)  # cluster, workload, seed, SLO, warm-up
    out.update(recorded_parts(sc))
    return out


def policy_label(policy: str, fields: dict) -> str:
    """The policy with the fields the config gave it, as the runtime's table labels a run: `dualpath[alpha_tokens=5]`
    (the table said `policy=dualpath` whatever its fields: two runs of one policy at two settings looked alike)."""
    given = ",".join(f"{k}={v}" for k, v in sorted(fields.items()))
    return f"{policy}[{given}]" if given else policy


def _warn_of_earlier_run(out: str) -> None:
    """A warning naming the earlier run whose results this one replaces in `out` (two runs of one config with other
    `--config.*` overrides share its output_dir: the first's results went without a word)."""
    import json

    try:
        with open(os.path.join(out, "run.json")) as f:
            command = json.load(f).get("command")
    except (OSError, ValueError, AttributeError):  # none there, or not a run.json
        return
    logging.warning(
        "%s holds an earlier run's results (%s): this run replaces them; give --output_dir to keep both", out, command
    )


def main(argv: Sequence[str]) -> None:
    gc_was_enabled = gc.isenabled()  # (`_main` turns the collector off for its run: back on for a caller in-process)
    try:
        _main(argv)
    finally:
        if gc_was_enabled:
            gc.enable()


def _main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unknown arguments: {argv[1:]}")
    started = clock.now()  # (run.json: the start and the wall time)
    from dualpath_jax import compiled, metrics
    from dualpath_jax.sim import config as sim_config
    from dualpath_jax.sim import outputs, runner
    from dualpath_jax.sim.configs_io import variant_fields
    from dualpath_jax.workloads.traces import TraceFormatError
    from schedulers.registry import PolicyClassError

    log_versions()
    config = config_or_exit(_CONFIG)
    cfg_dict = config.to_dict()
    out = _OUTPUT_DIR.value or cfg_dict["output_dir"]
    shown = config.copy_and_resolve_references()
    with shown.unlocked():  # the directory it writes (the block said the config's, not --output_dir's)
        shown.output_dir = out
    logging.info("resolved config:\n%s", shown)
    logging.info("output directory: %s", os.path.abspath(out))
    try:
        sc = sim_config.sim_config_from_dict(
            cfg_dict,
            explicit=flags.FLAGS["config"].override_values,
            variant=variant_fields(flags.FLAGS["config"].config_filename),  # `:dualpath,duration=600` offline: refused
        )
    except ValueError as e:  # a bad config: its message names the field; no traceback, no flag listing
        raise SystemExit(f"bad config: {e}") from None
    logging.info("sim config: %s", sc)
    made = dirs_made_for(out)  # (dropped again if the run writes nothing)
    writable_dir_or_exit(out, "--output_dir")  # before the run
    hold_dir_or_exit(out, "--output_dir")
    other = run_file_launcher(out)
    if other not in (None, "experiments.simulate"):  # (a sweep's, capacity search's or report's run.json: kept)
        raise SystemExit(
            f"bad --output_dir {out!r}: its run.json is another launcher's ({other}): this run's run.json would "
            "replace it, and that launcher's results there would have no record of what made them; give another "
            "--output_dir"
        )
    _warn_of_earlier_run(out)
    agents = f"{sc.workload.n_agents} agents" if sc.workload.kind == "offline" else "agents from the workload"
    logging.info("simulating %s (%s, %s) ...", sc.policy, sc.workload.kind, agents)  # (online / trace: not n_agents)
    logging.info("compiled hot paths (False: Python twin; DUALPATH_PURE_PYTHON=1 turns all off): %s", compiled.status())
    stale = compiled.stale_modules()  # (what runs: the modules are loaded now; an edit during the run is not)
    # One run, then exit: the cyclic collector stays off until `main` returns. The simulator makes no
    # reference cycles (tests/test_sim_e2e.py) and turns it off for its event loop anyway; left on, it re-scans
    # the run's millions of live objects while the records are summarised and written (~14 CPU-s at 48P96D).
    gc.disable()
    cpu0 = time.process_time()
    try:  # (a run that stops here wrote nothing: the results directory it made goes again)
        try:
            result = runner.run(sc, max_time=_MAX_TIME.value, progress=_PROGRESS.value)
        except (FileNotFoundError, TraceFormatError) as e:  # workload.kind='trace': a missing or malformed trace file
            raise SystemExit(f"bad workload: {e}") from None
        except sim_config.SimConfigError as e:  # e.g. a turn no DE has room for: one line, before anything ran
            raise SystemExit(f"bad config: {e}") from None
        except PolicyClassError as e:  # a policy / batcher class that cannot run as registered: before anything ran
            raise SystemExit(f"bad config: {e}") from None
        except (runner.PolicyError, RuntimeError, TypeError) as e:
            why = policy_mistake(e, sc.policy, sc.batcher)
            if why is None:  # not the policy's: the traceback
                raise
            raise SystemExit(f"simulate: {why}; nothing written to {out}") from None
        except KeyboardInterrupt:  # Ctrl-C: one line, not the event loop's traceback (nothing written before the end)
            raise SystemExit(
                f"simulate: interrupted (Ctrl-C) before the simulation finished; nothing written to {out}"
            ) from None
        except MemoryError as e:  # e.g. online aps=1e9 for 60 s: 6e10 agents (it was numpy's traceback, "447. GiB")
            w = sc.workload
            what = f"its agents (online: aps {w.aps:g} x duration_s {w.duration_s:g} = {w.aps * w.duration_s:.3g})"
            what = what if w.kind == "online" else "the run"
            why = ", ".join(x for x in (str(e), outputs.address_space_note()) if x) or "MemoryError"
            raise SystemExit(f"simulate: out of memory for {what}: {why}; nothing written to {out}") from None
    except SystemExit:
        drop_empty_dirs(out, made)
        raise
    cpu1 = time.process_time()
    logging.info(
        "simulated in %.1f CPU-s (event loop %.1f s wall, %d events)",
        cpu1 - cpu0,
        result.stats["wall_s"],
        result.stats["events"],
    )
    unfinished = result.stats["unfinished_turns"]
    if unfinished and sc.workload.kind == "offline":
        # (it said "13 of 152 turns" where 30 of the workload's 182 were not done: the later turns never arrived)
        logging.warning(
            "%d of the workload's %d turns did not finish by the end of the run (--max_time=%g): %d of the %d that "
            "arrived were still running, the rest never arrived; jct_s and the throughputs count the finished turns "
            "only (a lower bound of the JCT)",
            result.stats["workload_turns"] - (len(result.records) - unfinished),
            result.stats["workload_turns"],
            _MAX_TIME.value,
            unfinished,
            len(result.records),
        )
    rows = [
        (
            "setup",
            f"{cfg_dict.get('name')} policy={policy_label(sc.policy, sc.policy_kwargs)} "
            f"layerwise={sc.cluster.layerwise} io_free={sc.cluster.io_free} {_workload_text(sc.workload)}",
        )
    ]
    rows += [
        (k, result.summary[k])
        for k in _summary_keys(result.config.slo_percentile, result.summary)
        if k in result.summary
    ]
    rows += [(k, result.stats[k]) for k in STAT_KEYS]
    print(format_table(rows))
    if result.summary.get("slo_turns") == 0:  # (slo_met False read as a miss: nothing was judged)
        print(
            f"note: no turn arrived in the SLO's window (config.warmup_s={result.config.warmup_s:g}"
            + (
                f", workload.duration_s={result.config.workload.duration_s:g}"
                if result.config.workload.kind == "online"
                else ""
            )
            + "): nothing was judged; slo_met False is no verdict"
        )
    try:
        ran = ran_config(cfg_dict, result.config, out)
        paths = outputs.write_results(result, out, ran, plot=_PLOT.value)
        # what ran, and the line that runs it again into a directory of its own (README "What ran")
        w = result.config.workload
        info = metrics.run_info(
            "experiments.simulate",
            started,
            output_dir=out,
            traces=[w.trace_path] if w.kind == "trace" else [],
            seed=result.config.seed,
            compiled=result.stats.get("compiled"),
            config=ran,
        )
        paths["run"] = metrics.write_run_info(out, info)
    except KeyboardInterrupt:  # the files are written one after the other: say that they are not one run's results
        raise SystemExit(
            f"simulate: interrupted (Ctrl-C) while writing the results; the files in {out} are incomplete "
            "(summary.json, turns.csv, links.csv, plot.png may mix this run's and an earlier run's)"
        ) from None
    logging.info(
        "results written in %.1f CPU-s; process CPU so far %.1f s", time.process_time() - cpu1, time.process_time()
    )
    print("wrote", ", ".join(paths.values()))
    for module, why in stale.items():  # (the log's warning scrolls away in a long run's log)
        print(f"note: {module} ran as its Python twin, slower ({why}); rebuild with `pip install -e .`")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags_or_exit)
