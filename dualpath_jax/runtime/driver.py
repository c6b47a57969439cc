"""Drivers: run a workload (offline rollout or online serving) through the runtime and collect the metrics.

    result = run(cfg)                                   # cfg: RuntimeConfig
    result.summary["jct_s"], result.tokens[(traj, turn)], result.records, result.links

Offline: every agent starts at t=0, each next turn right after the previous one's last token (+ gap); JCT
is when the last agent finishes. Online: agents arrive as a Poisson process (`workload.aps`), or at their
trace timestamps; TTFT/TPOT percentiles are the figures of merit. The driver owns the global scheduler
service; the launcher decides where the engine groups run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import math
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np

from dualpath_jax import flocks
from dualpath_jax.checks import file_in_the_way, is_int
from dualpath_jax.metrics import (
    LinkBytes,
    TurnRecord,
    links_ended_at,
    slo_summary,
    summarize,
    ttft_breakdown,
    with_slo,
)
from dualpath_jax.runtime.config import (
    ConfigError,
    RuntimeConfig,
    check_tiny_workload,
    shorten_turns_hint,
    validate,
    validate_dtype,
    validate_workload,
)
from dualpath_jax.runtime.lifecycle import ConversationBook, tiny_trajectories
from dualpath_jax.runtime.scheduler_service import GlobalScheduler, GroupSpec, RunFailed, StoreKeeper
from dualpath_jax.workloads.types import Trajectory

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunResult:
    """What `run` returns. Times are seconds; the records' (`metrics.TurnRecord`) count from the run's clock start,
    when every engine group had registered (after `startup_s`). `tokens`: (trajectory_id, turn_index) -> the turn's
    generated token ids, int32 [gen]. `node_stats`: node_id -> its group's last report (`GroupReport.stats`), with
    its clock's offset from the driver's, `clock_offset_s` (added to its stamps: 0.0 on the driver's boot, else
    estimated from its fetches, `clock.Offset`), and `clock_rtt_s`, the round trip of that estimate (None: exact).
    Every stamp is in the driver's timebase.
    `summary`: `metrics.summarize` (jct_s, ttft/tpot percentiles, ...) + `ttft_breakdown` + "link_bytes" (link ->
    bytes) and the storage-NIC balance, + the SLO figures where judged. `links`: `metrics.LinkBytes` in time order,
    bins of 0.1 s on each node's clock's grid (so the first may start before 0, e.g. t0=-0.07; the last ends at the
    run's end, `wall_s`), plus one zero-byte marker with t0 = t1 = 0 per SNIC (`run_links`; the SNIC balance counts
    an idle one by it): a rate nbytes / (t1 - t0) must skip samples with t1 == t0."""

    policy: str
    records: list[TurnRecord]
    links: list[LinkBytes]
    summary: dict
    tokens: dict  # (trajectory_id, turn_index) -> generated token ids, int32 [gen]
    node_stats: dict  # node_id -> the group's last reported stats
    requeued: int  # requests re-run after an engine died
    schedule_time_s: float  # wall time inside the policy
    schedule_calls: int
    wall_s: float
    startup_s: float  # launch until every group registered (model build, compile cache, connects)
    # node -> why it was declared dead during the run (its requests re-ran on the other engines)
    dead_nodes: dict = dataclasses.field(default_factory=dict)
    # online / trace arrivals: the SLO judgement of its turns (`judge_slo` under cfg.slo, on `slo_window`'s turns),
    # also in `summary` (`metrics.with_slo`: slo_attainment, slo_met, ...); None offline (judged on its JCT)
    slo: dict | None = None
    slo_window: tuple[float, float] | None = None
    # the KV store's counters over the run's store objects (`store_totals`: hits, evictions, write_rejected...); a
    # store smaller than the working set shows here (evictions) and in the hits, not in the tokens. Not counted: what
    # `prepare`'s open of a kept store_dir did (evicted to fit, temp files removed): its log line says it
    # (`_open_store_once`)
    store_stats: dict = dataclasses.field(default_factory=dict)


def store_totals(objects: Sequence[dict]) -> dict:
    """The run's KV store counters: the `StoreStats` fields summed over its store objects (each counted once: the
    driver's, which answers the scheduler's lookups, and the ones the nodes' final reports name, `node.store_stats`;
    in-process nodes share one), `objects` how many. Each object counts what it did itself; of a bounded `local_dir`
    store only the driver's evicts (`StoreKeeper`, whose `unkept_blocks` / `adopted_blocks` are here too). (Blocks
    that opening a kept `config.store_dir` over `capacity_bytes` evicted are not here: `prepare`'s check logs them.)"""
    seen: dict[str, dict] = {}
    for st in objects:
        if st:
            seen.setdefault(str(st.get("object", id(st))), st)
    out: dict = {}
    for st in seen.values():
        for k, v in st.items():
            if k != "object" and isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
    out["objects"] = len(seen)
    return out


def make_trajectories(cfg: RuntimeConfig, vocab_size: int | None = None) -> list[Trajectory]:
    """The configured workload: "tiny" (seeded short agents), "synthetic" (the shared Table-2 generator) or
    "trace" (a real trace via the shared loaders); synthetic and trace lengths are scaled by `workload.scale`
    and cut to `workload.turns` turns so the tiny model can run them.

    A trace's appends get token ids from its block hashes (`traces.hashed_token_ids`, over `vocab_size`: the
    model's when not given), so prompts that share hash blocks share those ids and the KV store hits them."""
    w = cfg.workload
    if w.arrival == "trace" and w.kind != "trace":  # (given trajectories may carry timestamps: not made here)
        raise ConfigError(
            f"config.workload.arrival='trace' replays a trace's timestamps, and config.workload.kind={w.kind!r} makes "
            "agents without any: every agent would start at 0 and each turn follow the last (an offline rollout, "
            "judged on an SLO as if online); give arrival='offline' or 'online', or kind='trace'"
        )
    if w.kind == "tiny":
        check_tiny_workload(cfg)  # (scale, time_scale, max_context_tokens: they were ignored here)
        _check_tiny_fits(cfg)
        return tiny_trajectories(
            w.agents, w.turns, w.append_tokens, w.gen_tokens, w.first_append_tokens, w.gap_s, w.seed
        )
    if w.kind == "synthetic":
        from dualpath_jax.workloads import synthetic

        return _scaled(synthetic.make_agents(w.dataset, w.agents, seed=w.seed), w)
    if w.kind == "trace":
        from dualpath_jax.workloads import traces

        if not w.trace:
            raise ConfigError("config.workload.trace must name a trace file or directory for kind='trace'")
        if vocab_size is None:
            from dualpath_jax.runtime.model_ops import model_config

            try:
                vocab_size = model_config(cfg.model).vocab_size
            except KeyError as e:
                raise ConfigError(f"config.model: {e.args[0]}") from None
        return _scaled(traces.load_trace(w.trace, max_agents=w.agents or None), w, vocab_size)
    raise ConfigError(f"config.workload.kind {w.kind!r} unknown; known: tiny, synthetic, trace")


def slot_tokens(turn_tokens: int) -> int:
    """KV tokens a turn of `turn_tokens` (prompt + generation) holds in its decode slot at most: all but the last
    token's. The PE makes the first token from the prompt (a 1-token turn needs no decode step), each decode step writes
    the KV of the token before the one it makes, and the last token's KV is never written (the next turn's prefill
    computes it). A slot of max_seq_len tokens holds turns of max_seq_len + 1."""
    return turn_tokens - 1


def _check_tiny_fits(cfg: RuntimeConfig) -> None:
    """The shortest last turn `tiny_trajectories` can draw (every length >= half its mean, rounded, >= 1) must fit
    max_seq_len (`slot_tokens`): checked before the agents are built (workload.turns=10**9 built them for minutes, then
    failed)."""
    w = cfg.workload

    def least(mean: int) -> int:
        return max(1, round(mean * 0.5))

    shortest = least(w.first_append_tokens) + w.turns * least(w.gen_tokens) + (w.turns - 1) * least(w.append_tokens)
    if slot_tokens(shortest) > cfg.cluster.max_seq_len:
        raise ConfigError(
            f"config.cluster.max_seq_len={cfg.cluster.max_seq_len} is shorter than the workload's last turn: "
            f"config.workload.turns={w.turns} tiny turns of append_tokens={w.append_tokens} (the first: "
            f"first_append_tokens={w.first_append_tokens}) and gen_tokens={w.gen_tokens}, each at least half its "
            f"mean, reach {shortest} tokens or more (a decode slot holds all but the last); lower "
            "config.workload.turns or raise config.cluster.max_seq_len"
        )


def _scaled(trajs: Sequence[Trajectory], w, vocab_size: int | None = None) -> list[Trajectory]:
    """Token lengths x `scale`, gaps and timestamps x `time_scale`, at most `turns` turns. The runtime builds every
    prompt from the real tokens (the history: earlier appends + generations); a trace's stated re-read context is
    kept (scaled) where it is shorter than that history, i.e. where the agent dropped text: that turn's prompt re-reads
    the history's first `context_tokens` tokens (`ConversationBook`), as the simulator's does. With `vocab_size`, a turn
    with block hashes (a trace's) gets its append's token ids from them."""
    from dualpath_jax.workloads.traces import hashed_token_ids
    from dualpath_jax.workloads.types import Turn

    def ids(t: Trajectory, i: int, x: Turn, n: int) -> np.ndarray | None:
        if vocab_size is None or x.block_hashes is None:
            return None
        # the append is the trace prompt's positions [context, prompt), scaled
        start = round((x.context_tokens or 0) * w.scale)
        key = (t.trajectory_id, i)
        return hashed_token_ids(x.block_hashes, x.hash_block_size, w.scale, start, n, vocab_size, w.seed, key)

    out, first = [], None  # first: the shortest first turn (prompt + generation) before the cut
    shorter = 0  # turns re-reading less than their history (the agent dropped text)
    for t in trajs:
        turns, history = [], 0  # history: the runtime's tokens so far (the last prompt + its generation)
        for i, x in enumerate(list(t.turns)[: w.turns]):
            n, g = max(1, round(x.append_tokens * w.scale)), max(1, round(x.gen_tokens * w.scale))
            context = None if x.context_tokens is None or i == 0 else round(x.context_tokens * w.scale)
            if context is not None and context >= history:  # the whole history re-read: the usual turn
                context = None
            shorter += context is not None
            turns.append(
                Turn(
                    n,
                    g,
                    x.gap_s * w.time_scale,
                    context_tokens=context,
                    append_token_ids=ids(t, i, x, n),
                    arrival_offset_s=None if x.arrival_offset_s is None else x.arrival_offset_s * w.time_scale,
                )
            )
            history = (history if context is None else context) + n + g
        traj = Trajectory(t.trajectory_id, turns, t.arrival_time * w.time_scale, f"{t.source}*{w.scale}")
        if w.max_context_tokens > 0:
            if turns:
                first = min(first or math.inf, turns[0].append_tokens + turns[0].gen_tokens)
            traj = traj.cut_at_tokens(w.max_context_tokens)
        if traj.turns:
            out.append(traj)
    cut = [len(t.turns) - w.turns for t in trajs if len(t.turns) > w.turns]
    if cut:  # (the simulator logs its max_turns cut; this one was silent)
        log.info(
            "workload.turns=%d: %d of %d turns dropped (%d agents cut)",
            w.turns,
            sum(cut),
            sum(len(t.turns) for t in trajs),
            len(cut),
        )
    if shorter:
        log.info(
            "workload: %d of %d trace turns re-read less than their history (the agent dropped or rewrote text): "
            "their prompts re-read its first context_tokens tokens, as the trace states",
            shorter,
            sum(min(len(t.turns), w.turns) for t in trajs),
        )
    dropped = sum(min(len(t.turns), w.turns) for t in trajs) - sum(len(t.turns) for t in out)
    if dropped:
        log.info(
            "workload.max_context_tokens=%d: %d turns dropped (%d agents left)", w.max_context_tokens, dropped, len(out)
        )
    if not out and first is not None:  # (it was "the workload has no trajectories", as the simulator's did not say)
        raise ConfigError(
            f"config.workload.max_context_tokens = {w.max_context_tokens:,} leaves no turn to run: every agent's first "
            f"turn is longer ({len(trajs)} agents; the shortest first turn holds {first:,} tokens of prompt + "
            "generation)"
        )
    return out


def make_arrival_model(cfg: RuntimeConfig):
    """Offline (all agents at 0), online (Poisson at `workload.aps`) or trace timestamps (shared models)."""
    from dualpath_jax.workloads.arrivals import make_arrivals

    w = cfg.workload
    if w.arrival == "offline":
        return make_arrivals("offline")
    if w.arrival == "online":
        return make_arrivals("online", aps=w.aps, seed=w.seed)
    if w.arrival == "trace":
        return make_arrivals("trace")
    raise ConfigError(f"config.workload.arrival {w.arrival!r} unknown; known: offline, online, trace")


# A PE's prefill rate taken for β when none was measured (`prefill_tokens_per_s` None: calibrate=False)
_ASSUMED_PREFILL_TOKENS_PER_S = 20_000.0
_BETA_ASSUMED_SAID: set[int] = set()  # the assumed β values said (policy_kwargs runs twice a run in experiments.run)


def policy_kwargs(cfg: RuntimeConfig, kv_bytes_per_token: int, prefill_tokens_per_s: float | None = None) -> dict:
    """The policy's config, with DualPath's α/β profiled for this emulated cluster and its seed the workload's
    (`config.workload.seed`) when not given.

    α = tokens one node reads in 3 s through its SNIC; β = prompt tokens one PE processes in 5 s (without a measured
    `prefill_tokens_per_s`, 20,000 tokens/s assumed: said once at INFO).
    """
    from schedulers.registry import POLICIES, config_fields

    kw = dict(cfg.scheduler.policy_kwargs)
    # by the policy's Config fields, as the simulator does: a user's DualPath variant got the paper's DS 660B α/β and
    # 64-token blocks where `dualpath` got this cluster's (only the DUALPATH_FAMILY names were filled)
    fields = config_fields(POLICIES.get(cfg.scheduler.name)) or set()
    if "alpha_tokens" in fields:
        snic_tokens_per_s = cfg.nics.snic_bytes_per_s / kv_bytes_per_token
        if not kw.get("alpha_tokens"):  # (0 too, as the simulator: the Config took 0 for the paper's DS 660B value)
            kw["alpha_tokens"] = max(1, int(3.0 * snic_tokens_per_s))
    if "beta_tokens" in fields:
        if not kw.get("beta_tokens"):
            kw["beta_tokens"] = max(1, int(5.0 * (prefill_tokens_per_s or _ASSUMED_PREFILL_TOKENS_PER_S)))
            if not prefill_tokens_per_s and kw["beta_tokens"] not in _BETA_ASSUMED_SAID:  # (a value: once a process)
                _BETA_ASSUMED_SAID.add(kw["beta_tokens"])
                log.info(
                    "β not profiled (calibrate=False): %s tokens, %s tokens/s assumed (5 s of prefill; "
                    "config.scheduler.policy_kwargs.beta_tokens sets it)",
                    f"{kw['beta_tokens']:,}",
                    f"{_ASSUMED_PREFILL_TOKENS_PER_S:,.0f}",
                )
    if "block_size" in fields:
        kw.setdefault("block_size", cfg.block_size)
    if "seed" in fields:  # (`random`'s choices: the workload's seed, as the simulator gives its `config.seed`)
        kw.setdefault("seed", cfg.workload.seed)
    return kw


def layout_groups(cfg: RuntimeConfig) -> list[GroupSpec]:
    """Nodes 0..P-1 prefill, P..P+D-1 decode; engines numbered node by node."""
    c = cfg.cluster
    groups, e = [], 0
    for n in range(c.prefill_nodes + c.decode_nodes):
        role = "prefill" if n < c.prefill_nodes else "decode"
        groups.append(GroupSpec(n, role, list(range(e, e + c.engines_per_node))))
        e += c.engines_per_node
    return groups


def make_launcher(cfg: RuntimeConfig, model_ops=None):
    if cfg.launcher == "inprocess":
        from dualpath_jax.runtime.launcher import InProcessLauncher

        return InProcessLauncher(cfg, model_ops)
    if cfg.launcher == "local":
        from dualpath_jax.runtime.launcher import LocalProcessLauncher

        return LocalProcessLauncher(cfg)
    if cfg.launcher == "ray":
        from dualpath_jax.runtime.ray_launcher import RayLauncher

        return RayLauncher(cfg)
    raise ConfigError(f"config.launcher {cfg.launcher!r} unknown")


def check_runtime_config(cfg) -> None:
    """ConfigError unless `cfg` is a `RuntimeConfig` (a ConfigDict gave a dataclasses TypeError six calls deep, a dict
    an AttributeError). Not converted here: a whole config file's ConfigDict holds more than its `runtime` section,
    and `from_config_dict` is the one place that checks and coerces the fields' types."""
    if not isinstance(cfg, RuntimeConfig):
        raise ConfigError(
            f"expected a RuntimeConfig, got {type(cfg).__name__}: pass RuntimeConfig.from_config_dict(c.runtime), c a "
            "config file's ConfigDict (e.g. configs/tiny_runtime.py's get_config()); it takes a dict of the fields too"
        )


# The ModelOps the last `prepare` built (model_ops not given): the next run of the same model, seed and numerics
# reuses it, as a LocalCluster node process keeps its own (a loop of `driver.run(cfg)` rebuilt the model and
# recompiled 16-21 programs every run: 5-7 s a run instead of 0.3 s, and the process grew 8-30 MB a run).
# A checkpoint directory's files are part of the key: ops of a checkpoint since rewritten are not reused.
_LAST_OPS: tuple | None = None  # (key, ModelOps)


def release_model() -> None:
    """Drop the model ops `prepare` keeps for the next run of the same model (its weights and compiled steps)."""
    global _LAST_OPS
    _LAST_OPS = None


def _ops_key(cfg: RuntimeConfig) -> tuple:
    """What makes `ModelOps.of_config(cfg)` what it is: the model, its seed, numerics and dtype and, for a checkpoint
    directory, its files' names, sizes, modification and change times and inodes."""
    from dualpath_jax.runtime.model_ops import is_checkpoint

    files = ()
    if is_checkpoint(cfg.model):
        with os.scandir(cfg.model) as it:  # (ctime and inode too: a copy tool keeps mtimes, never those)
            stats = [(e.name, e.stat()) for e in it if e.is_file()]
        files = tuple(sorted((n, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) for n, st in stats))
    return cfg.model, cfg.model_seed, cfg.batch_invariant, cfg.dtype, files


def prepare(cfg: RuntimeConfig, trajectories: Sequence[Trajectory] | None = None, model_ops=None):
    """Everything checked before any engine starts: the model, the workload, the config against both. Returns
    `(trajectories, model_ops)`: the workload's list of `Trajectory` (`trajectories` if given) and the `ModelOps` the
    run uses (`model_ops` if given; else the last ones `prepare` built if they serve `cfg`, else new ones, kept for
    the next run until `release_model()`). `cfg` must be a `RuntimeConfig`: a config file's ConfigDict (or a dict)
    is a ConfigError saying to convert it with `RuntimeConfig.from_config_dict`."""
    global _LAST_OPS
    check_runtime_config(cfg)  # (first: before the model's imports)
    validate_dtype(cfg)  # (before the model's config is made in it)
    from dualpath_jax.runtime.model_ops import ModelOps, model_config

    try:
        mcfg = model_config(cfg.model, cfg.dtype)
    except KeyError as e:
        raise ConfigError(f"config.model: {e.args[0]}") from None
    if cfg.scheduler.batcher == "compute_quota":  # priced by the model's cost-model shape in every PE (a traceback
        # from the nodes once the run had started, for a model the cost model cannot express)
        from dualpath_jax.runtime.model_ops import model_cost_shape

        try:
            model_cost_shape(cfg.model, mcfg)
        except NotImplementedError as e:
            raise ConfigError(
                f"config.scheduler.batcher='compute_quota' cannot price this model: {e}; the fifo batcher "
                "(config.scheduler.batcher='fifo') runs it"
            ) from None
    validate_workload(cfg)
    make_arrival_model(cfg)  # an unknown arrival model is a config error before anything starts
    from dualpath_jax.workloads.traces import TraceFormatError

    try:
        trajs = list(trajectories) if trajectories is not None else make_trajectories(cfg, mcfg.vocab_size)
    except (FileNotFoundError, TraceFormatError) as e:  # kind='trace': a missing or malformed trace file
        raise ConfigError(f"config.workload.trace: {e}") from None
    # The runtime builds every prompt from the real tokens (`ConversationBook`): the history, or its first
    # `context_tokens` where a turn states fewer (text the agent dropped); `turn_shapes` below counts the same prompts
    # (a stated context past the history is the whole history there, so the checks only ever over-count).
    if not trajs:
        raise ConfigError("the workload has no trajectories")
    _check_trajectory_ids(trajs)
    _check_arrivals_within_timeout(cfg, trajs)
    if cfg.workload.arrival == "trace":  # (a trace of µs read as ms waited 1000x longer, no line giving the span)
        firsts = make_arrival_model(cfg).agent_arrivals(trajs)
        # (and the last recorded turn time: a run whose first turns were all done waited for later turns' times with
        # no sign why, its bar standing at 9/11; turns without one follow their previous turn's end + gap)
        recorded = [t.arrival_time + u.arrival_offset_s for t in trajs for u in t.turns if u.arrival_offset_s]
        log.info(
            "arrival=trace: %d agents arrive over %.4g s (the first at %.4g s)%s; trace times x "
            "config.workload.time_scale=%g",
            len(trajs),
            float(np.max(firsts)),
            float(np.min(firsts)),
            f", their turns' recorded times reach {max(recorded):.4g} s" if recorded else "",
            cfg.workload.time_scale,
        )
    _check_turn_lengths(trajs)
    shapes = [s for t in trajs for s in t.turn_shapes(1)]  # (one pass per trajectory: prompt_tokens(i) is O(i))
    max_prompt = max(prompt for prompt, _, _ in shapes)
    max_total = max(prompt + gen for prompt, _, gen in shapes)
    from models.registry import weight_bytes

    # (the weights' bytes from their shapes, ~0.1 s on this CPU: only where an accelerator's memory is checked)
    validate(cfg, mcfg.kv_bytes_per_token, max_prompt, mcfg.num_layers, lambda: weight_bytes(mcfg))
    from dualpath_jax.runtime.launcher import check_batcher_reaches_nodes

    check_batcher_reaches_nodes(cfg)  # a batcher of __main__, which the node processes cannot import
    _check_tcp_endpoint_options(cfg)
    _check_token_ids(trajs, mcfg.vocab_size)
    if slot_tokens(max_total) > cfg.cluster.max_seq_len:
        raise ConfigError(
            f"config.cluster.max_seq_len={cfg.cluster.max_seq_len} is shorter than the longest turn "
            f"(prompt + generation = {max_total} tokens) less its last token, whose KV a decode slot never holds; "
            f"raise it or {shorten_turns_hint(cfg)}"
        )
    warn_past_positions(mcfg, max_total, cfg)
    try:
        if model_ops is not None:
            ops = model_ops
        else:
            key = _ops_key(cfg)  # (before the load: a checkpoint rewritten during it is another key next time)
            if _LAST_OPS is not None and _LAST_OPS[0] == key:
                ops = _LAST_OPS[1]
            else:
                _LAST_OPS = None  # (another model: the last one's weights go before the new ones are built)
                ops = ModelOps.of_config(cfg)
                _LAST_OPS = (key, ops)
    except ValueError as e:  # a checkpoint whose tensors do not load (missing, wrong shape): named
        raise ConfigError(f"config.model: {e}") from None
    if ops.config.batch_invariant != cfg.batch_invariant:  # the caller's model_ops runs the other numerics
        raise ConfigError(
            f"config.batch_invariant={cfg.batch_invariant} but the given model_ops has "
            f"batch_invariant={ops.config.batch_invariant}: build it with ModelOps.of_config(config)"
        )
    # (its KV layout, fingerprint and bytes are another dtype's; a stand-in model's config may name none)
    if getattr(ops.config, "dtype", cfg.dtype) != cfg.dtype:
        raise ConfigError(
            f"config.dtype={cfg.dtype!r} but the given model_ops has dtype {ops.config.dtype!r}: build it with "
            "ModelOps.of_config(config)"
        )
    if model_ops is not None:  # (another model's ops: a bad config here, before anything is built)
        from dualpath_jax.runtime.node import check_model_ops

        check_model_ops(cfg, ops)
    if cfg.store_dir:  # the KV store, opened once below: an unusable path or a kept store of another model or
        # block size fails here, not in every node process at start
        try:
            os.makedirs(cfg.store_dir, exist_ok=True)
        except OSError as e:  # (a file there, or above it: named, where the OS said only "File exists")
            why = file_in_the_way(cfg.store_dir)
            # a full disk (no space or no inodes) is no bad config: the store, a cache, opens there with its metadata
            # pending (its warning) and makes itself once there is room
            if why or e.errno not in (errno.ENOSPC, errno.EDQUOT):
                why = why or e.strerror
                raise ConfigError(f"config.store_dir {cfg.store_dir!r} cannot be created: {why}") from None
        if os.path.isdir(cfg.store_dir) and not os.access(cfg.store_dir, os.W_OK | os.X_OK):
            _read_only_store_or_refuse(cfg.store_dir)
    if cfg.store_dir or cfg.store_options:
        _open_store_once(cfg, ops)
    return trajs, ops


def _check_tcp_endpoint_options(cfg: RuntimeConfig) -> None:
    """`config.transport_options`' values, on one tcp endpoint of the run's spec built here and closed: `validate`
    checks their names only, so a value the endpoint refuses (timeout_s=0, max_message_bytes=0, a host of no
    interface here) failed every node once its model was built, and experiments.run ended with a traceback. It gets a
    secret where the nodes' endpoints get the run's (`config.endpoints_get_run_secret`: every tcp endpoint of the
    `local` and `inprocess` launchers), so a non-loopback `host` is taken, as they take it (a peer must prove the
    secret: issue 3, "binding elsewhere requires a shared secret"); it was refused while this check alone went without
    one. (The launcher's own endpoints: Ray's hosts and secrets, netns' veths, are built where they run.)"""
    if cfg.transport != "tcp" or not cfg.transport_options or cfg.netns or cfg.launcher == "ray":
        return
    from dualpath_jax.runtime.config import endpoints_get_run_secret
    from dualpath_jax.runtime.launcher import endpoint_spec
    from transport import make_transport

    extra = {"secret": secrets.token_hex(16)} if endpoints_get_run_secret(cfg) else {}  # (as the run's: random)
    try:
        make_transport(endpoint_spec(cfg, "config-check", **extra), pacer=None).close()
    except (TypeError, ValueError, OSError) as e:
        # (in the config's terms: it named this check's own endpoint, 'config-check', and a keyword, secret=...)
        why = (
            str(e)
            .replace("tcp transport 'config-check': ", "")
            .replace("(pass secret=...)", "(give 'secret' in config.transport_options, the same for every node)")
        )
        raise ConfigError(f"config.transport_options {dict(cfg.transport_options)!r}: {why}") from None


_READ_ONLY_WARNED: set = set()  # the read-only store directories this process warned of


def _read_only_store_or_refuse(store_dir: str) -> None:
    """`store_dir` this process cannot write: a KV store there (its STORE.json; another user's, a read-only mount)
    is used with a warning, hits only: every write-back fails and is counted (`write_errors`, the nodes'
    `unstored_blocks`), as the README says of a read-only mount. A pre-filled store shared read-only could not serve
    a run at all, though the store reads it. Anything else: ConfigError (nothing could be stored there)."""
    meta = os.path.join(store_dir, "STORE.json")
    if not (os.path.isfile(meta) and os.access(meta, os.R_OK) and os.access(store_dir, os.R_OK | os.X_OK)):
        raise ConfigError(f"config.store_dir {store_dir!r} is not writable")
    if store_dir in _READ_ONLY_WARNED:  # (prepare runs again in `run`: said once)
        return
    _READ_ONLY_WARNED.add(store_dir)
    log.warning(
        "config.store_dir %r is not writable by this process: its KV store is used read-only (hits only; every "
        "write-back fails and is counted: store_stats' write_errors, the nodes' unstored_blocks)", store_dir,
    )  # fmt: skip


_STORE_SAID: dict = {}  # kept store directory (real path) -> the block count this process last logged of it


def _open_store_once(cfg: RuntimeConfig, ops) -> None:
    """The store opened once before anything starts (on a scratch directory when each run gets a fresh one, where
    `store_options` may hold a value the store refuses): a bad value was a bare ValueError from the run's first open
    (store_dir "") or a ConfigError blaming config.store_dir.

    A kept `config.store_dir`: logs how many blocks it holds (a re-used store's only trace was its hit rate; not
    again while the count is the one this process said last of it) and the dead writers' temp files the open removed.
    Those (and the blocks it evicted to fit `capacity_bytes`) are not in a run's `store_stats`: `prepare` is called
    apart from `run` (experiments.run, the API's users, and `run` itself again), so the open that cleaned up is often
    not the run's; this log line counts them."""
    from dualpath_jax.runtime.launcher import open_store
    from dualpath_jax.runtime.node import block_layout, store_stats

    with contextlib.ExitStack() as stack:
        root = cfg.store_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="dpj-store-check-"))
        try:
            # (the keeper's object: the one opened with a bounded store's capacity, so it trims a kept store_dir)
            store = open_store(cfg.replace(store_dir=root), block_layout(cfg, ops), keeper=True)
            opened = (store_stats(store) or {}) if cfg.store_dir else {}
            evicted = opened.get("evictions", 0)
            found = _block_count(store) if cfg.store_dir else None
            store.close()
        except (ValueError, TypeError) as e:
            if cfg.store_options:
                where = f"config.store {cfg.store!r} with config.store_options {dict(cfg.store_options)!r}"
                where += f" on config.store_dir {cfg.store_dir!r}" if cfg.store_dir else ""
            else:
                where = "config.store_dir" if cfg.store_dir else f"config.store {cfg.store!r}"
            raise ConfigError(f"{where}: {e}") from None
    temps = opened.get("temp_files_removed", 0)
    # (`run` opens it again after a user's own `prepare`: the same count is said once; a count that changed, after a
    # run wrote blocks, again)
    kept = os.path.realpath(cfg.store_dir) if cfg.store_dir else None
    said = kept in _STORE_SAID and _STORE_SAID[kept] == found and not temps
    if kept is not None:
        _STORE_SAID[kept] = found
    if (found or temps) and not said:  # (a new or fresh directory, experiments.run's: nothing to say)
        log.info(
            "config.store_dir %r: %s%s", cfg.store_dir,
            f"holds {found} blocks of this model (kept: a run hits them)" if found else "holds no blocks",
            f"; removed {temps} temp files of dead writers" if temps else "",
        )  # fmt: skip
    if evicted:  # (the run's own store objects open it trimmed: their stats count none of these)
        log.warning(
            "config.store_dir %r held more than config.store_options' capacity_bytes: opening it evicted %d blocks "
            "(least recently used first)", cfg.store_dir, evicted,
        )  # fmt: skip


def _block_count(store) -> int | None:
    """The blocks a store object indexed (`keys()`; None for a store without it)."""
    keys = getattr(store, "keys", None)
    try:
        return len(keys()) if callable(keys) else None
    except Exception:  # (a store of another kind: only the log line's count is lost)
        return None


def _check_arrivals_within_timeout(cfg: RuntimeConfig, trajs: Sequence[Trajectory]) -> None:
    """The last agent's first turn must arrive within `run_timeout_s` of the run's start, or the run can never
    finish: it waited out the whole timeout and then failed (e.g. arrival='online' at aps=1e-300). The arrival
    times are drawn (seeded) before the run, so this is known now."""
    w = cfg.workload
    model = make_arrival_model(cfg)
    firsts = model.agent_arrivals(trajs)
    last = float(np.max(firsts))
    if w.arrival in ("online", "trace") and not last <= cfg.run_timeout_s:  # (NaN too)
        why = (
            f"arrival='online' at config.workload.aps={w.aps:g} agents/s"
            if w.arrival == "online"
            else f"arrival='trace' with config.workload.time_scale={w.time_scale:g}"
        )
        if w.arrival == "online":
            fix = "raise the arrival rate or config.run_timeout_s"
        else:  # (it said "raise the arrival rate", which a trace has not; a trace of Unix times starts ~1.7e9 s in)
            first = float(np.min(firsts))
            fix = "lower config.workload.time_scale or raise config.run_timeout_s" + (
                f"; the first agent arrives at {first:.4g} s: the trace's timestamps are replayed as they are, from "
                "time 0 (a trace of absolute times, e.g. Unix ms, needs them made relative to its start)"
                if first > cfg.run_timeout_s
                else ""
            )
        raise ConfigError(
            f"config.run_timeout_s={cfg.run_timeout_s:g} s ends before the workload's last agent arrives "
            f"({why}: the last of {len(trajs)} agents arrives at {last:.4g} s), so the run can never finish; {fix}"
        )
    _check_last_turns_within_timeout(cfg, trajs, model, firsts)


def _check_last_turns_within_timeout(cfg: RuntimeConfig, trajs: Sequence[Trajectory], model, firsts) -> None:
    """Each agent's last turn must be able to arrive within `run_timeout_s`: at the earliest, every turn is ready as
    soon as the previous one arrived (served in no time) -- its gap later, or at its trace timestamp. Gaps summing
    past the timeout (e.g. workload.gap_s=300 over 5 turns, run_timeout_s=900) waited out the whole timeout and then
    failed ("run did not finish")."""
    for t, first in zip(trajs, firsts, strict=True):
        at = float(first)
        for i in range(1, len(t.turns)):
            at = model.turn_ready(t, i, at)
        if len(t.turns) > 1 and not at <= cfg.run_timeout_s:  # (the first turn's arrival: checked by the caller)
            w = cfg.workload
            why = (
                f"its turns' gaps (Turn.gap_s; config.workload.gap_s={w.gap_s:g} for generated tiny ones) and trace "
                f"times x config.workload.time_scale={w.time_scale:g}"
            )
            raise ConfigError(
                f"config.run_timeout_s={cfg.run_timeout_s:g} s ends before the workload's trajectory {t.trajectory_id} "
                f"can reach its last turn: even served in no time, turn {len(t.turns) - 1} arrives at {at:.4g} s "
                f"({why}), so the run can never finish; raise config.run_timeout_s or shorten the gaps"
            )


def _check_trajectory_ids(trajs: Sequence[Trajectory]) -> None:
    """Unique integer ids >= 0: a turn's append tokens are drawn from an RNG seeded by (seed, trajectory id, turn), so
    a negative id failed the run after start ("fetch from node 1 failed: ValueError('expected non-negative
    integer')"), and a repeated one was a ValueError of the conversation book."""
    seen = set()
    for t in trajs:
        tid = t.trajectory_id
        if not is_int(tid) or tid < 0:
            raise ConfigError(f"the workload's trajectory id {tid!r} must be an integer >= 0")
        if tid in seen:
            raise ConfigError(f"the workload has two trajectories with id {tid}: ids must be unique")
        seen.add(tid)


def _check_turn_lengths(trajs: Sequence[Trajectory]) -> None:
    """Turns the runtime can serve: a PE computes at least one prompt token and always hands the DE the first
    generated token, so an empty first prompt (engines crashed allocating a 0-byte area) or a turn generating 0
    tokens (the DE reported 1 and the scheduler failed on it) is refused before any engine starts, naming it."""
    if not any(t.turns for t in trajs):  # (was `max() arg is an empty sequence`)
        raise ConfigError("the workload's trajectories have no turns")
    for t in trajs:
        if t.turns and t.prompt_tokens(0) < 1:
            raise ConfigError(
                f"the workload's trajectory {t.trajectory_id} turn 0 has an empty prompt (append_tokens=0): "
                "the prefill needs at least one prompt token"
            )
        for i, turn in enumerate(t.turns):
            if turn.gen_tokens < 1:
                raise ConfigError(
                    f"the workload's trajectory {t.trajectory_id} turn {i} generates {turn.gen_tokens} tokens: the "
                    "runtime generates at least the first token of every turn (gen_tokens must be >= 1)"
                )


def run_info(module: str, started: float, cfg: RuntimeConfig, config: dict, run_file: str | None = None) -> dict:
    """`metrics.run_info` of a runtime launcher (`experiments.run`, `bench_runtime`): the trace its workload reads,
    the JAX devices, and `config` (the launcher's resolved config); `run_file`: where its run.json goes (its `rerun`
    line's --rerun_of)."""
    import jax

    from dualpath_jax import metrics

    w = cfg.workload
    traces = [w.trace] if w.kind == "trace" else []
    devices = [str(d) for d in jax.devices()]
    return metrics.run_info(module, started, run_file=run_file, traces=traces, devices=devices, config=config)


def unpaced_nics(cfg: RuntimeConfig) -> dict:
    """`RuntimeConfig.replace` overrides for a run at unpaced NIC speed (warm-ups, overhead runs): every emulated NIC
    cap lifted, except the CNICs with `config.netns` (the kernel shapes them at the config's rate: kept, so the run
    still passes the namespaces' rate check)."""
    return {"nics.snic_bytes_per_s": 1e12, **({} if cfg.netns else {"nics.cnic_bytes_per_s": 1e12})}


def warn_past_positions(mcfg, longest_turn: int, cfg: RuntimeConfig) -> bool:
    """Warn (and say so) when the longest turn (prompt + generation, tokens) runs positions past the model's
    `max_position_embeddings`: a real checkpoint then computes them with rotary frequencies it was not trained for,
    silently (the runtime's tokens stay deterministic, so nothing else would tell). The last generated token is never
    fed back: a turn of n tokens runs positions 0..n-2 (`slot_tokens`; it warned one token early). The advice is
    `shorten_turns_hint`'s for `cfg`'s workload kind (it advised scale and max_context_tokens, which a tiny workload
    refuses)."""
    positions = getattr(mcfg, "max_position_embeddings", None)
    if positions is None or slot_tokens(longest_turn) <= positions:
        return False
    log.warning(
        "the longest turn holds %d tokens (prompt + generation), past the model's max_position_embeddings=%d: its "
        "later positions run with rotary frequencies the model was not trained for; to stay within it, %s",
        longest_turn,
        positions,
        shorten_turns_hint(cfg),
    )
    return True


def _check_token_ids(trajs: Sequence[Trajectory], vocab_size: int) -> None:
    """A workload's own token ids (traces that carry them) must be ids of the model's vocabulary: checked before
    any engine starts, not when an engine first embeds them."""
    for t in trajs:
        for i, turn in enumerate(t.turns):
            ids = turn.append_token_ids
            if ids is not None and len(ids) and (int(np.min(ids)) < 0 or int(np.max(ids)) >= vocab_size):
                raise ConfigError(
                    f"the workload's trajectory {t.trajectory_id} turn {i} has token ids in "
                    f"[{int(np.min(ids))}, {int(np.max(ids))}], outside the model's vocabulary [0, {vocab_size})"
                )


def run(
    cfg: RuntimeConfig,
    trajectories: Sequence[Trajectory] | None = None,
    *,
    model_ops=None,
    on_progress: Callable[[int, int], None] | None = None,
    fault: Callable[[GlobalScheduler, object], None] | None = None,
    prefill_tokens_per_s: float | None = None,
    launcher=None,
) -> RunResult:
    """Run the workload on a fresh cluster (launcher per `cfg.launcher`) and return its metrics.

    `fault(service, launcher)` is called every poll (failure tests kill nodes from it). `launcher`: e.g. a
    `LocalCluster(...).launcher(cfg)` to reuse node processes across runs.
    """
    trajs, ops = prepare(cfg, trajectories, model_ops)  # a bad config fails here, before anything exists
    if cfg.store_dir:
        return _run(cfg, trajs, ops, on_progress, fault, prefill_tokens_per_s, launcher)
    remove_stores_of_killed_runs()
    tmp, held = held_temp_dir(f"dualpath_store_{os.getpid()}_")
    try:
        return _run(cfg.replace(store_dir=tmp), trajs, ops, on_progress, fault, prefill_tokens_per_s, launcher)
    finally:
        try:
            cleanup_store(tmp)
        finally:  # (a Ctrl-C during the removal, seconds for a real model's store, kept the lock for the process's life)
            os.close(held)


def _run(cfg, trajs, ops, on_progress, fault, prefill_tokens_per_s, launcher) -> RunResult:
    import schedulers
    from dualpath_jax.block_keys import block_keys
    from dualpath_jax.runtime.launcher import open_store, store_is_kept
    from dualpath_jax.runtime.node import block_layout, store_stats
    from schedulers.registry import warn_replaced_defaults

    kw = policy_kwargs(cfg, ops.config.kv_bytes_per_token, prefill_tokens_per_s)
    # (here, not in policy_kwargs: experiments.run's policy_config calls that too, so it would say it twice a run)
    warn_replaced_defaults(
        schedulers.POLICIES.get(cfg.scheduler.name), cfg.scheduler.name, cfg.scheduler.policy_kwargs, kw
    )
    policy = schedulers.make_policy(cfg.scheduler.name, **kw)
    book = ConversationBook(trajs, ops.vocab_size, seed=cfg.workload.seed, arrivals=make_arrival_model(cfg))
    # The scheduler's lookups; of a bounded local_dir store, the keeper of its capacity (`StoreKeeper`: the nodes'
    # objects have none)
    store = open_store(cfg, block_layout(cfg, ops), keeper=True)
    keeper = StoreKeeper(store) if store_is_kept(cfg) else None
    groups = layout_groups(cfg)
    service = GlobalScheduler(
        groups,
        policy,
        book,
        lookup_hit_blocks=store.lookup,
        block_keys_of=lambda ids: block_keys(ids, cfg.block_size),
        block_size=cfg.block_size,
        # the policies admit a request on its len_r = prompt + generation: a slot holds len_r up to max_seq_len + 1
        # (`slot_tokens`; offered max_seq_len, such a turn passed the checks and was never placed)
        hbm_tokens_per_decode_engine=cfg.cluster.decode_slots * (cfg.cluster.max_seq_len + 1),
        heartbeat_timeout_s=cfg.scheduler.heartbeat_timeout_s,
        decode_slots=cfg.cluster.decode_slots,
        store_keeper=keeper,
    )
    launcher = launcher or make_launcher(cfg, ops)
    launcher.cfg = cfg  # the run's own config (store directory included)
    t_launch = time.monotonic()
    startup_s = math.nan
    finished = False
    try:
        # (inside the try: a launch that fails part way, e.g. a node whose engines cannot be built, is shut down --
        # the nodes already built kept their storage-NIC threads, endpoints and the store open)
        launcher.start(groups, service)
        # The run's clock starts when every group has registered (model built, endpoints up). Their start is judged
        # from here: the in-process launcher builds the groups in `start` (models, compiles), one after the other, and
        # none could register before it returned (a build longer than run_timeout_s failed a run whose groups were up).
        t_started = time.monotonic()
        while not service.started:
            _check_launcher(service, launcher, groups)
            if service.failure:  # e.g. every PE (or DE) exited before registering
                raise RunFailed(service.failure)
            if time.monotonic() - t_started > cfg.run_timeout_s:
                late = service.unregistered()
                raise RunFailed(
                    f"engine group(s) of node(s) {late} did not start within {cfg.run_timeout_s} s "
                    "(config.run_timeout_s): still building their model, compiling or connecting"
                )
            time.sleep(0.02)
        startup_s = time.monotonic() - t_launch
        deadline = time.monotonic() + cfg.run_timeout_s
        last = -1
        while True:
            done, total = service.progress()
            if on_progress is not None and done != last:
                on_progress(done, total)
                last = done
            if done == total:
                break
            if service.failure:
                raise RunFailed(service.failure)
            if fault is not None:
                fault(service, launcher)
            service.check_heartbeats()
            _check_launcher(service, launcher, groups)
            if time.monotonic() > deadline:
                raise RunFailed(
                    f"run did not finish within {cfg.run_timeout_s} s ({done}/{total} turns; config.run_timeout_s)"
                )
            time.sleep(0.02)
        wall = service.now()
        # A node declared dead and silent since never hears the end: killed, not waited for (15 s, then 15 s more in
        # a LocalCluster session's end, for a node its heartbeat declared dead while stopped or deadlocked).
        _kill_silent_dead(service, launcher)
        # Let every live group see the shutdown and send its final report (link bytes).
        launcher.join(timeout=15.0)
        finished = True
    finally:
        service.stop()  # (a run given up on: its groups stop at their next fetch, as at the end of a finished run)
        try:
            if not finished:  # (a failed or interrupted run's silent dead nodes are not waited for either)
                _kill_silent_dead(service, launcher)
            launcher.shutdown()
        except Exception as e:
            if finished:
                raise
            # A run stopped early (Ctrl-C, its failure): that stays the error raised. A node still starting (e.g.
            # compiling) cannot hear the stop in time; "node(s) [0] did not finish their run" replaced the Ctrl-C.
            log.warning("stopping the run's nodes: %s", e)
        finally:
            if keeper is not None:  # (the nodes are stopped: no pins held any more, the directory trimmed to fit)
                keeper.finish()
            lookup_store = store_stats(store)  # (the scheduler's lookups; before close: a store may drop them then)
            if keeper is not None:
                lookup_store = keeper.report(lookup_store)
            store.close()
    records = service.finished_records()
    links = run_links(service.links, end=wall)
    summary = summarize(records, links)
    # TTFT parts (queue / allocation / read / prefill) under the simulator's key names: the records carry every stamp.
    summary.update(ttft_breakdown(records))
    summary.update(_link_summary(links))
    window, slo = _judged_slo(cfg, trajs, records)
    if slo is not None:  # (every consumer of a RunResult gets the SLO's figures, not experiments.run's table alone)
        summary = with_slo(summary, slo)
    return RunResult(
        policy=cfg.scheduler.name,
        records=records,
        links=links,
        summary=summary,
        tokens={k: v for k, v in book.generated.items()},
        node_stats=dict(service.stats),
        requeued=service.requeued,
        schedule_time_s=service.schedule_time_s,
        schedule_calls=service.schedule_calls,
        wall_s=wall,
        startup_s=startup_s,
        dead_nodes=dict(service.death_reasons),
        slo=slo,
        slo_window=window,
        store_stats=store_totals([lookup_store, *(st.get("store") for st in service.stats.values())]),
    )


def _judged_slo(cfg: RuntimeConfig, trajs, records) -> tuple[tuple[float, float] | None, dict | None]:
    """(window, judgement) of an online / trace-arrival run's turns under `cfg.slo` (`slo_window`, `judge_slo`);
    (None, None) offline. A run whose agents all arrive before `slo.warmup_s` (a warm-up on a few of them:
    `slo_window`'s ConfigError) judges no turn: `slo_summary`'s keys with slo_turns 0."""
    s = cfg.slo
    try:
        window = slo_window(cfg, trajs)
    except ConfigError:
        return (s.warmup_s, s.warmup_s), slo_summary([], s.ttft_s, s.tpot_s, s.percentile, s.warmup_s)
    if window is None:
        return None, None
    return window, judge_slo(cfg, window, records)


def _kill_silent_dead(service: GlobalScheduler, launcher) -> None:
    """Kill the nodes declared dead that are still running but have not fetched since (`silent_dead_nodes`: stopped,
    deadlocked, stuck in a step): no fetch told them the run ended, so waiting for them only ran out the launcher's
    timeouts. Their requests already re-ran on the others; a `LocalCluster` session's later runs go without them, as
    without a node that died (`LocalCluster.begin`)."""
    for n in service.silent_dead_nodes():
        try:
            if launcher.alive(n):
                log.warning(
                    "node %d was declared dead (%s) and has not fetched since: killed, not waited for",
                    n,
                    service.death_reasons.get(n, "dead"),
                )
                launcher.kill(n)
        except Exception as e:  # noqa: BLE001 -- (gone meanwhile): the launcher's shutdown still ends it
            log.warning("killing node %d, declared dead: %r", n, e)


def _check_launcher(service: GlobalScheduler, launcher, groups) -> None:
    """A node whose process/thread ended before the run finished is dead now (no need to wait for the timeout)."""
    errors = getattr(launcher, "errors", {})
    if errors:
        node, err = next(iter(errors.items()))
        raise RunFailed(f"node {node} failed: {err!r}")
    for g in groups:
        if g.node_id not in service.dead_nodes and not launcher.alive(g.node_id) and not service.book.done:
            err = getattr(launcher, "errors", {}).get(g.node_id)
            if err is not None:  # (its run raised, and it exited since the check above: its error, not a dead node)
                raise RunFailed(f"node {g.node_id} failed: {err!r}")
            service.declare_dead(g.node_id)


def run_links(links: Sequence[LinkBytes], end: float = math.inf) -> list[LinkBytes]:
    """The service's link records in time order, an idle SNIC's zero-byte marker (t0 = t1, no bytes: each node's,
    at its own clock origin) at t0 = t1 = 0, as the simulator writes its idle links: at the node's start, before the
    run's, it sat at a negative time (snic/node2 at -0.0641 s). The bin holding the run's `end` (its last turn done,
    write-back stored) ends there, as the simulator's last bucket does (`metrics.links_ended_at`): a 0.1 s bin ran
    past it (t1 14.23 s against the last token at 14.18 s), so its bytes / (t1 - t0) understated the rate."""
    out = [dataclasses.replace(s, t0=0.0, t1=0.0) if s.t0 == s.t1 and not s.nbytes else s for s in links]
    return sorted(links_ended_at(out, end), key=lambda s: (s.t0, s.link))  # (end inf: every bin as reported)


def _link_summary(links: Sequence[LinkBytes]) -> dict:
    """Bytes per link kind: storage reads+writes per SNIC, KV over CNICs."""
    per: dict[str, int] = {}
    for s in links:
        per[s.link] = per.get(s.link, 0) + s.nbytes
    snic = {k: v for k, v in per.items() if k.startswith("snic/")}
    out = {"link_bytes": per}
    if snic:
        vals = np.array(list(snic.values()), np.float64)
        out["snic_total_bytes"] = int(vals.sum())
        out["snic_max_bytes"] = int(vals.max())
    out["cnic_kv_bytes"] = int(sum(v for k, v in per.items() if k.startswith("cnic/") and k.endswith("/low")))
    return out


def sim_link_name(name: str) -> str:
    """The simulator's name (its links.csv, `sim/simulator.py` with full-duplex CNICs) of a runtime link record, for the
    result files a user compares with the simulator's. The runtime's traffic manager names an engine's CNIC egress
    per class "cnic/engine<E>/low" / ".../high" and its ingress "cnic/engine<E>/in/low" / ".../in/high"; the simulator
    names them "cnic/engine<E>/out" / "cnic/engine<E>/out/high" and "cnic/engine<E>/in" / "cnic/engine<E>/in/high"
    (low class: the plain name). SNICs ("snic/node<N>") and anything else keep their names."""
    m = re.fullmatch(r"(cnic/engine\d+)(/in)?/(low|high)", name)
    if m is None:
        return name
    return f"{m[1]}{m[2] or '/out'}{'/high' if m[3] == 'high' else ''}"


def with_sim_link_names(links: Sequence[LinkBytes]) -> list[LinkBytes]:
    """`links` under the simulator's link names (`sim_link_name`): what the result files hold."""
    return [dataclasses.replace(s, link=sim_link_name(s.link)) for s in links]


def summary_with_sim_link_names(summary: dict) -> dict:
    """A run's summary with its `link_bytes` keyed by the simulator's link names (`sim_link_name`)."""
    if "link_bytes" not in summary:
        return summary
    return {**summary, "link_bytes": {sim_link_name(k): v for k, v in summary["link_bytes"].items()}}


def held_temp_dir(prefix: str, tmp_dir: str | None = None) -> tuple[str, int]:
    """A new temporary directory (`tempfile.mkdtemp`) and the descriptor of its flock (exclusive), held until the
    descriptor is closed or the process ends, however it ends: `remove_stores_of_killed_runs` of another run removes
    no directory whose lock is held. The pid in the name is not enough: a run in another PID namespace sharing /tmp (a
    container with -v /tmp:/tmp) had a pid that is gone here, and its live store was removed under it. (A file system
    without flock: the pid in the name alone, as before.)"""
    path = tempfile.mkdtemp(prefix=prefix, dir=tmp_dir)
    fd = flocks.open_dir(path)
    flocks.take(fd)
    return path, fd


def remove_stores_of_killed_runs(tmp_dir: str | None = None) -> list[str]:
    """Remove the temporary KV stores (`dualpath_store_<pid>_*` in the temp directory) of runs whose process is gone:
    a run removes its own at its end, but a job killed hard (kill -9, the OOM killer) left it, gigabytes for a real
    model, in /tmp; likewise a netns run's control-socket directory (`dpj-control-<pid>-*`). A live process's
    (another job's) is kept, and so is one whose flock a live run holds (`held_temp_dir`: a run in another PID
    namespace, whose pid is gone here); so is any other name. Returns those removed."""
    import re
    import shutil

    tmp_dir = tmp_dir or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(tmp_dir)
    except OSError:
        return removed
    for name in names:
        # (and a netns run's control-socket directory, `dpj-control-<pid>-*`: a SIGKILLed driver left it too)
        m = re.fullmatch(r"dualpath_store_(\d+)_\w+|dpj-control-(\d+)-\w+", name)
        if m is None:
            continue
        pid = int(m.group(1) or m.group(2))
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # (alive, or a pid reused since: kept)
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):  # (another user's live process; a pid past the range)
            continue
        path = os.path.join(tmp_dir, name)
        if os.path.isdir(path) and not os.path.islink(path) and not flocks.held_elsewhere(path):
            shutil.rmtree(path, ignore_errors=True)
            what = "control-socket directory" if name.startswith("dpj-control") else "KV store"
            if os.path.lexists(path):  # (another user's, in a sticky /tmp: it said "removed" at every run)
                log.debug("could not remove %s, the temporary %s of a run whose process is gone", path, what)
                continue
            log.info("removed %s, the temporary %s of a run whose process is gone (killed)", path, what)
            removed.append(path)
    return removed


def cleanup_store(path: str) -> None:
    import shutil

    if path and os.path.isdir(path) and os.path.basename(path).startswith("dualpath_store_"):
        shutil.rmtree(path, ignore_errors=True)


def measure_prefill_tokens_per_s(ops, cfg: RuntimeConfig, repeats: int = 3) -> float:
    """Prefill throughput of this machine on a turn shaped like the workload's (for DualPath's β)."""
    w = cfg.workload
    cached = min(cfg.cluster.max_seq_len // 2, w.first_append_tokens + 2 * (w.append_tokens + w.gen_tokens))
    cached = max(cfg.block_size, (cached // cfg.block_size) * cfg.block_size)
    miss = max(1, w.append_tokens)
    rng = np.random.default_rng(0)
    batch = 4
    bpt = ops.kv_layout.bytes_per_token_per_layer
    kv = rng.standard_normal((cached, bpt // 4)).astype(np.float32).view(np.uint8)  # [cached, bpt] bytes
    ids = [rng.integers(0, ops.vocab_size, miss, dtype=np.int32) for _ in range(batch)]

    def once():
        ops.prefill(ids, [cached] * batch, lambda layer: [kv] * batch, lambda layer, new: None)

    once()  # compile
    t0 = time.perf_counter()
    for _ in range(repeats):
        once()
    dt = (time.perf_counter() - t0) / repeats
    return batch * (cached + miss) / dt


def reference_tokens(cfg: RuntimeConfig, trajs: Sequence[Trajectory], ops) -> dict:
    """The single-process reference of `cfg`'s conversations: every turn generated by
    `model_ops.reference_conversations` (no store, no transport, no scheduler), its prompts made from the run's
    workload seed and its decode batch shaped as the DEs' (`cluster.decode_slots`). {(trajectory, turn): tokens}:
    what `driver.run` must give (`experiments.run --config.reference`, the tests)."""
    from dualpath_jax.runtime.lifecycle import ConversationBook
    from dualpath_jax.runtime.model_ops import reference_conversations

    return reference_conversations(
        ops,
        lambda: ConversationBook(trajs, ops.vocab_size, seed=cfg.workload.seed),
        cfg.cluster.max_seq_len,
        cfg.cluster.decode_slots,
    )


def slo_window(cfg, trajs) -> tuple[float, float] | None:
    """The turns an online / trace-arrival run `cfg` is judged on against `cfg.slo`, as the simulator judges its own
    (`sim.runner.slo_summary`): those arriving in [slo.warmup_s, end]. Online: end the last agent's arrival (its
    first turn judged), as the simulator's window ends with its arrivals (duration_s): the drain after them sees a
    lighter load. Trace: no end (inf), as the simulator's. Offline: None, no SLO (judged on its JCT; the
    simulator's offline summary has none either). A ConfigError where no online turn would be judged."""
    w, warmup = cfg.workload, cfg.slo.warmup_s
    if w.arrival == "offline":
        return None
    if w.arrival != "online":
        return warmup, math.inf
    last = max(float(t) for t in make_arrival_model(cfg).agent_arrivals(trajs))
    if not warmup <= last:  # (the simulator refuses warmup_s >= duration_s alike)
        raise ConfigError(
            f"config.slo.warmup_s ({warmup:g}) must not be after the last agent's arrival ({last:.3g} s: "
            f"config.workload.agents={w.agents} at aps={w.aps:g}, seed {w.seed}) for arrival='online' (the SLO is "
            "judged on the turns arriving in between)"
        )
    return warmup, last


def judge_slo(cfg, window: tuple[float, float], records) -> dict:
    """`metrics.slo_summary` of a run's turn records under `cfg.slo`, on those arriving in `window` (`slo_window`;
    its end included): the runtime's (`experiments.run`) and its simulator copy's (`experiments.bench_runtime`)."""
    s = cfg.slo
    end = math.nextafter(window[1], math.inf)  # (the last agent's own first turn is judged)
    return slo_summary(records, s.ttft_s, s.tpot_s, s.percentile, window[0], end)
