"""Summary statistics of a workload: a synthetic Table 2 dataset or a real trace.

    python -m experiments.workload_stats --workload=64K --n_agents=500
    python -m experiments.workload_stats --workload=mooncake_conversation_trace.jsonl.gz
    python -m experiments.workload_stats --workload=kvcache_tester --limit=20
    python -m experiments.workload_stats --workload=mooncake_conversation_trace.jsonl.gz --max_agents=8
Trace paths are looked up relative to ../shared/traces (or $DUALPATH_TRACES) when not found as given.
For a synthetic dataset the paper's Table 2 value is printed beside each measured figure. --n_agents and --seed
apply to synthetic datasets, --limit and --max_agents to traces (a flag the workload does not read is refused).
--max_agents=N: the trace's first N trajectories (sessions), each whole, as the runtime's `workload.agents=N` and the
simulator's `workload.max_agents=N` replay them (--limit counts Mooncake requests: it cuts sessions after their turns
in those lines).
"""

from __future__ import annotations

import os
import time

from absl import app, flags

from dualpath_jax.workloads import DATASETS, load_workload, summarize
from dualpath_jax.workloads.traces import TraceFormatError

flags.DEFINE_string("workload", "64K", "synthetic dataset (32K, 48K, 64K) or a trace path / name")
# (an empty one was read as the working directory: "bad --workload: .: no *.json / *.json.gz session file")
flags.register_validator("workload", lambda v: bool(v.strip()), message="--workload is empty")
# (1e20 was numpy's "Maximum allowed dimension exceeded" traceback, 1e9 ran out of memory after minutes; the agents
# sample 500 base trajectories, so a million tells nothing that 500 do not: ~15 KB each, 15 GB)
flags.DEFINE_integer(
    "n_agents",
    500,
    "synthetic: agents to generate (they sample 500 base trajectories)",
    lower_bound=1,
    upper_bound=10**6,
)
# --seed, --block_size: experiments.demo defines them too, with its own defaults and help; allow_override lets the
# launchers be imported into one process (the last one imported defines them there; absl raised DuplicateFlagError),
# and a launcher that is run defines its flags last: its command line is its own
flags.DEFINE_integer("seed", 0, "synthetic: sampling seed", lower_bound=0, allow_override=True)
flags.DEFINE_integer("limit", None, "traces: first N requests (Mooncake) or files (kv-cache-tester)", lower_bound=1)
flags.DEFINE_integer(
    "max_agents",
    None,
    "traces: the first N trajectories (sessions), each whole (the runtime's workload.agents, the simulator's "
    "workload.max_agents)",
    lower_bound=1,
)
flags.DEFINE_integer("block_size", 64, "block size (tokens) for the hit rate", lower_bound=1, allow_override=True)


def _refuse_unused_flags(f) -> None:
    """A flag the workload does not read is a usage error: `--workload=64K --limit=5` summarized all 500 agents,
    `--workload=<trace> --n_agents=5` the whole trace, without a word."""
    if f.workload in DATASETS:
        for name in ("limit", "max_agents"):
            if f[name].present:
                raise SystemExit(
                    f"bad --{name}: it applies to traces; {f.workload} is a synthetic dataset (give --n_agents)"
                )
        return
    for name in ("n_agents", "seed"):
        if f[name].present:
            _trace_or_exit(f.workload)  # (a mistyped dataset, 64k: "bad --n_agents ... not to the trace 64k")
            raise SystemExit(f"bad --{name}: it applies to synthetic datasets, not to the trace {f.workload}")


def _bad_workload(e: Exception, workload: str) -> SystemExit:
    """The one line for a --workload that is neither a dataset name nor a readable trace: the datasets are listed
    only for a path that does not exist (a mistyped name), not after a trace file's own format error."""
    if isinstance(e, TraceFormatError) or workload in DATASETS or os.path.exists(os.path.expanduser(workload)):
        return SystemExit(f"bad --workload: {e}")
    return SystemExit(f"bad --workload: {e} (synthetic datasets: {', '.join(DATASETS.names())})")


def _trace_or_exit(workload: str) -> None:
    """SystemExit naming --workload when it is no trace file / directory either."""
    from dualpath_jax.workloads.traces import resolve_trace_path

    try:
        resolve_trace_path(workload)
    except FileNotFoundError as e:
        raise _bad_workload(e, workload) from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unknown arguments: {argv[1:]}")
    f = flags.FLAGS
    _refuse_unused_flags(f)
    try:
        _summarize(f)
    except KeyboardInterrupt:  # (a traceback through the trace loader: kv-cache-tester takes seconds)
        raise SystemExit(f"workload_stats: interrupted (Ctrl-C) while loading or summarizing {f.workload}") from None


def _summarize(f) -> None:
    t0 = time.perf_counter()
    try:
        trajs = load_workload(f.workload, n_agents=f.n_agents, seed=f.seed, limit=f.limit, max_agents=f.max_agents)
    except (FileNotFoundError, TraceFormatError) as e:  # neither a dataset name nor a readable trace
        raise _bad_workload(e, f.workload) from None
    if f.max_agents is not None and f.max_agents > len(trajs):  # (as the simulator's max_agents: not a smaller set)
        within = f" (its first --limit={f.limit})" if f.limit is not None else ""
        raise SystemExit(
            f"bad --max_agents: {f.max_agents:,}, but {f.workload}{within} holds {len(trajs):,} trajectories (sessions)"
        )
    if not any(t.turns for t in trajs):  # e.g. a session file without requests
        raise SystemExit(f"bad --workload: {f.workload} holds no turn")
    st = summarize(trajs, block_size=f.block_size)
    print(f"workload {f.workload}: loaded in {time.perf_counter() - t0:.2f} s")
    paper = {}
    if f.workload in DATASETS:
        spec = DATASETS.get(f.workload)
        paper = {
            "turns / trajectory": spec.target_turns,
            "append (mean)": spec.target_append,
            "gen (mean)": spec.target_gen,
            "total tokens (mean)": spec.target_total,
            "context (mean)": spec.target_context,
        }
        if f.workload == "64K" and f.block_size == 64:  # the paper's hit rate is of 64-token blocks
            paper[f"hit rate (block {f.block_size})"] = "~98.7%"
    rows = st.rows()
    w = max(30, 2 + max(len(name) for name, _ in rows))  # (a longer name pushed its row's columns out)
    print(f"{'statistic':<{w}}{'measured':>24}{'paper Table 2':>16}")
    for name, value in rows:
        ref = paper.get(name, "")
        ref = f"{ref:,.0f}" if isinstance(ref, (int, float)) else ref
        print(f"{name:<{w}}{value:>24}{ref:>16}")


if __name__ == "__main__":
    app.run(main)
