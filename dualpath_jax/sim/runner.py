"""Build a simulator from a SimConfig (registered policy, batcher, cost model, shared workloads) and run it."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import numpy as np

from dualpath_jax import compiled, metrics
from dualpath_jax.checks import is_real
from dualpath_jax.sim.config import (
    GB,
    SimConfig,
    SimConfigError,
    check_batcher_cost_fields,
    checks_were_said,
    validate_sim_config,
)
from dualpath_jax.sim.simulator import Simulator
from dualpath_jax.workloads.types import Trajectory

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SimResult:
    """What `run` returns; times in simulated seconds from the simulated clock's 0 (offline agents arrive there).
    `records`: one `metrics.TurnRecord` per turn, as a `metrics.TurnTable` (columns: a TurnRecord made on reading).
    `links`: `metrics.LinkBytes` per link ("snic/node3", "cnic/engine12/low", ...) per bucket, t0 < t1 (the last bucket
    ends at the run's end). `stats`: the run itself (events, wall_s, events_per_s, turns_per_s, fetches,
    unfinished_turns (of the arrived turns), workload_turns (all the agents' turns, arrived or not), sim_end_s,
    link_totals: link -> bytes, compiled, ...). `summary`: `metrics.summarize` (jct_s,
    ttft / tpot percentiles, ...) + the TTFT breakdown + the storage-NIC balance (snic_max_over_avg, snic_total_bytes)
    + the SLO figures (online / trace). `config`: the SimConfig that ran; `policy_config`: every field of the policy's
    Config."""

    records: Sequence  # [turns] metrics.TurnRecord: the simulator's metrics.TurnTable
    links: list  # metrics.LinkBytes samples (bucketed per link)
    stats: dict  # events, wall time, events/s, turns/s, ...
    summary: dict  # metrics.summarize + TTFT breakdown + SLO + storage-NIC balance
    config: SimConfig | None = None  # the config that ran (mode applied, derived DE HBM filled in)
    # every field of the policy's Config it ran with (alpha / beta / block size filled from the cluster, a policy's
    # defaults), as the runtime's results.json policy_config; None for a policy without a dataclass Config
    policy_config: dict | None = None


def ep_engines(cfg: SimConfig, role: str) -> int:
    """Engines per EP group of `role` ("prefill"/"decode"): MoE engines of one role form EP groups of
    `{role}_ep_nodes` nodes (0: all the role's nodes; PAPER.md "Models": DS uses EP + DP); dense: 1 (DP only)."""
    from schedulers import cost_model as cm

    c = cfg.cluster
    nodes, group = (c.prefill_nodes, c.prefill_ep_nodes) if role == "prefill" else (c.decode_nodes, c.decode_ep_nodes)
    if group < 0:
        raise SimConfigError(f"config.cluster.{role}_ep_nodes must be >= 0 (0: one EP group of all nodes), got {group}")
    if group:
        nodes = min(nodes, group)
    return nodes * c.gpus_per_node if cm.MODEL_SHAPES.get(c.model).is_moe else 1


def make_cost_model(cfg: SimConfig, role: str):
    """The shared cost model (schedulers.cost_model) for one engine of `role` ("prefill"/"decode")."""
    from schedulers import cost_model as cm

    return cm.CostModel(cm.MODEL_SHAPES.get(cfg.cluster.model), cfg.cluster.hardware, ep=ep_engines(cfg, role))


def de_hbm_kv_bytes(cfg: SimConfig, decode_cost) -> float:
    """DE HBM left for KV: configured, else HBM * `hbm_usable_fraction` - the engine's weights - the non-KV reserve
    (`de_hbm_reserve_gb`: activations, EP buffers, graphs; calibrated)."""
    c = cfg.cluster
    if c.de_hbm_kv_gb > 0:
        return c.de_hbm_kv_gb * GB
    if c.de_hbm_reserve_gb < 0:
        raise SimConfigError(f"config.cluster.de_hbm_reserve_gb must be >= 0, got {c.de_hbm_reserve_gb}")
    free = decode_cost.hw.hbm_bytes * c.hbm_usable_fraction - decode_cost.weight_bytes_per_engine()
    if decode_cost.weight_bytes_per_engine() >= decode_cost.hw.hbm_bytes:  # (no KV room makes it fit: no hint of one)
        moe = " or more GPUs per decode EP group (config.cluster.decode_nodes, decode_ep_nodes, gpus_per_node)"
        moe = moe if decode_cost.model.is_moe else ""
        raise SimConfigError(
            f"config.cluster: {c.model} weights ({decode_cost.weight_bytes_per_engine() / GB:.1f} GB per DE) do not "
            f"fit one {c.hardware} GPU ({decode_cost.hw.hbm_bytes / GB:.1f} GB of HBM): the simulator runs one engine "
            f"per GPU (dense models DP only, no tensor parallelism; MoE EP over the role's GPUs); give "
            f"config.cluster.hardware a GPU with more HBM{moe}"
        )
    if free <= 0:
        raise SimConfigError(
            f"config.cluster: {c.model} weights ({decode_cost.weight_bytes_per_engine() / GB:.1f} GB per DE) "
            f"leave no HBM for KV on {c.hardware}; set config.cluster.de_hbm_kv_gb"
        )
    kv = free - c.de_hbm_reserve_gb * GB
    if kv <= 0:
        raise SimConfigError(
            f"config.cluster.de_hbm_reserve_gb = {c.de_hbm_reserve_gb} GB leaves no DE HBM for KV on {c.model} "
            f"({free / GB:.1f} GB after weights); lower it or set config.cluster.de_hbm_kv_gb"
        )
    return kv


class _SplitCost:
    """Prefill times from the PE-side cost model, decode steps from the DE-side one (different EP groups)."""

    def __init__(self, prefill, decode):
        self.prefill = prefill
        self.decode = decode
        # the two models' own bound methods (no extra call layer per event)
        self.batch_prefill_time = prefill.batch_prefill_time
        self.decode_step_time = decode.decode_step_time


_CUTS_SAID: set = set()  # the workloads whose max_turns cut this process logged


def make_trajectories(cfg: SimConfig):
    """Agents and their arrival model from the shared workload module (dualpath_jax.workloads):
    offline (all at t = 0), online (Poisson at APS, aps * duration_s agents), trace (a trace file's times)."""
    from dualpath_jax.workloads import arrivals, synthetic

    w = cfg.workload
    if w.kind == "offline":
        model = arrivals.make_arrivals("offline")
        trajs = synthetic.make_agents(w.dataset, w.n_agents, seed=cfg.seed, append_scale=w.append_scale)
    elif w.kind == "online":
        if not w.aps > 0 or not w.duration_s > 0:
            raise SimConfigError(
                f"config.workload: online needs aps > 0 and duration_s > 0, got {w.aps}, {w.duration_s}"
            )
        # aps * duration_s agents, arriving in [0, duration_s) (WorkloadConfig.duration_s)
        model = arrivals.make_arrivals("online", aps=w.aps, seed=cfg.seed, duration_s=w.duration_s)
        n = max(1, int(round(w.aps * w.duration_s)))
        trajs = synthetic.make_agents(w.dataset, n, seed=cfg.seed, append_scale=w.append_scale)
    elif w.kind == "trace":
        from dualpath_jax.workloads import traces

        if not w.trace_path:
            raise SimConfigError("config.workload.trace_path is required for kind='trace'")
        model = arrivals.make_arrivals("trace")
        trajs = traces.load_trace(w.trace_path, max_agents=w.max_agents or None, warn_fewer=False)
        if w.max_agents > len(trajs):  # (it replayed the fewer the trace holds, silently: a different run)
            raise SimConfigError(
                f"config.workload.max_agents = {w.max_agents:,}, but the trace {w.trace_path} holds "
                f"{len(trajs):,} trajectories (sessions): give max_agents <= {len(trajs):,}, or 0 for all of them"
            )
    else:
        raise SimConfigError(f"config.workload.kind must be offline | online | trace, got {w.kind!r}")
    if w.max_turns > 0:
        # (a config file's cap, sim_tiny's 12, cut a trace's sessions without a word: max_agents says "each whole")
        capped = sum(max(0, len(t.turns) - w.max_turns) for t in trajs)
        said = (repr(w), cfg.seed, capped)  # (a sweep's check and its run build one cell's workload twice: said once)
        if capped and said not in _CUTS_SAID:
            _CUTS_SAID.add(said)
            log.info(
                "workload.max_turns=%d: %d of %d turns dropped (%d trajectories cut; max_turns=0 keeps every turn)",
                w.max_turns,
                capped,
                sum(len(t.turns) for t in trajs),
                sum(len(t.turns) > w.max_turns for t in trajs),
            )
        trajs = [dataclasses.replace(t, turns=list(t.turns)[: w.max_turns]) for t in trajs]
    if w.max_context_tokens > 0:
        cut = [t.cut_at_tokens(w.max_context_tokens) for t in trajs]
        dropped = sum(len(a.turns) - len(b.turns) for a, b in zip(trajs, cut, strict=True))
        if dropped:
            log.info(
                "workload.max_context_tokens=%d: %d of %d turns dropped (%d trajectories cut, %d left without turns)",
                w.max_context_tokens,
                dropped,
                sum(len(t.turns) for t in trajs),
                sum(len(a.turns) != len(b.turns) for a, b in zip(trajs, cut, strict=True)),
                sum(not b.turns for b in cut),
            )
        kept = [t for t in cut if t.turns]
        if not kept and any(t.turns for t in trajs):  # an empty run (no records, a NaN JCT) that looked like a result
            first = min(p + g for p, _, g in (t.turn_shapes(1)[0] for t in trajs if t.turns))
            raise SimConfigError(
                f"config.workload.max_context_tokens = {w.max_context_tokens:,} leaves no turn to run: every "
                f"trajectory's first turn is longer ({len(trajs)} trajectories; the shortest first turn holds "
                f"{first:,} tokens of prompt + generation)"
            )
        trajs = kept
    return model.with_arrivals(trajs), model


def build_simulator(cfg: SimConfig, trajectories: Sequence[Trajectory] | None = None) -> Simulator:
    from schedulers import make_batcher, make_policy

    validate_sim_config(cfg)  # a SimConfig built or changed in code gets a config file's checks
    pre = make_cost_model(cfg, "prefill")
    dec = make_cost_model(cfg, "decode")
    c = cfg.cluster
    b = c.kv_bytes_per_token or pre.model.kv_bytes_per_token
    if c.de_hbm_kv_gb <= 0:
        c = dataclasses.replace(c, de_hbm_kv_gb=de_hbm_kv_bytes(cfg, dec) / GB)
        cfg = dataclasses.replace(cfg, cluster=c)
    arrival_model = None
    if trajectories is None:
        trajectories, arrival_model = make_trajectories(cfg)
    elif cfg.workload.kind == "trace":  # given trace turns keep their trace times (they came right after the last)
        from dualpath_jax.workloads import arrivals

        arrival_model = arrivals.make_arrivals("trace")
    # (the workload first: a dataset of one's own profiles β on its own turns)
    policy = make_policy(cfg.policy, **_policy_kwargs(cfg, pre, b, profile_shape(cfg, trajectories)))
    if not type(policy).__module__.startswith("schedulers."):
        policy = CheckedPolicy(policy, cfg.policy)
    batcher = make_batcher(cfg.batcher, **_batcher_kwargs(cfg, pre))
    # simulator.py, compiled when built (dualpath_jax/compiled.py; DUALPATH_PURE_PYTHON=1: its Python source)
    simulator = compiled.load("dualpath_jax.sim.simulator").Simulator
    de_group = ep_engines(cfg, "decode") if c.decode_lockstep else 1
    return simulator(
        cfg,
        trajectories,
        policy,
        batcher,
        _SplitCost(pre, dec),
        b,
        pre.model.layers,
        arrival_model=arrival_model,
        de_group_engines=de_group,
    )


class PolicyError(RuntimeError):
    """A policy's schedule() raised, or changed the snapshot the simulator gave it."""


def _loads(snapshot) -> tuple:
    """What a policy may not change in the simulator's snapshot (its live state): every field of every engine and
    node record, which records, and the clock."""
    return (
        snapshot.now,
        snapshot.engine_set_key,
        [(k, id(v), type(v), dataclasses.astuple(v)) for k, v in snapshot.engines.items()],
        [(k, id(v), type(v), dataclasses.astuple(v)) for k, v in snapshot.nodes.items()],
    )


class CheckedPolicy:
    """A policy from outside `schedulers` (a user's own), checked at each fetch. The simulator hands policies its live
    state (the built-in ones work on copies; copying it for them each fetch would cost time), so a schedule() that
    changed it instead of `snapshot.copy()` skewed every later fetch without a word (a DE's free HBM lowered for good);
    and an exception it raised did not name it. Other attributes are the policy's own."""

    def __init__(self, policy, name: str):
        self.policy, self.name = policy, name

    def __getattr__(self, attr):
        return getattr(self.policy, attr)

    def schedule(self, snapshot, queue, fetching_node=None):
        before = _loads(snapshot)
        try:
            out = self.policy.schedule(snapshot, queue, fetching_node=fetching_node)
        except Exception as e:
            raise PolicyError(f"policy {self.name!r} raised {e!r} in schedule() at t={snapshot.now:.6g} s") from e
        after = _loads(snapshot)
        if after != before:
            what = _first_change(before, after)
            raise PolicyError(
                f"policy {self.name!r} changed the snapshot it was given ({what}) at t={before[0]:.6g} s: schedule() "
                "must work on snapshot.copy() (the simulator's snapshot is its live state)"
            )
        return out


def _first_change(before: tuple, after: tuple) -> str:
    if before[:2] != after[:2]:
        return "its clock or engine set key"
    for kind, old, new in (("engine", before[2], after[2]), ("node", before[3], after[3])):
        if [(k, i) for k, i, _, _ in old] != [(k, i) for k, i, _, _ in new]:
            return f"which {kind} records it holds"
        for (k, _, cls, a), (_, _, _, b) in zip(old, new, strict=True):
            names = [f.name for f in dataclasses.fields(cls)]
            diff = [f"{n} {x!r} -> {y!r}" for n, x, y in zip(names, a, b, strict=True) if x != y]
            if diff:
                return f"{kind} {k}: {', '.join(diff)}"
    return "?"


# Mean context and append per turn of the paper's datasets (PAPER.md Table 2): the turn shape at which
# the policies' thresholds are "profiled".
DATASET_SHAPE = {"32K": (17_183, 608), "48K": (25_120, 474), "64K": (32_721, 429)}
READ_WINDOW_S = 3.0  # α: tokens one node reads in 3 s
COMPUTE_WINDOW_S = 5.0  # β: tokens one GPU processes in 5 s


def _window_tokens(tokens: float, name: str, field: str) -> int:
    """α / β in tokens; infinite (a ~0 B/token KV or a ~0 prefill time scale) is refused by name (it was an
    OverflowError converting infinity)."""
    if tokens == math.inf:
        raise SimConfigError(
            f"the policy's {name} window is more tokens than a double holds: config.cluster.{field} is too close to 0"
        )
    return max(1, int(tokens))


def profile_shape(cfg: SimConfig, trajectories: Sequence[Trajectory] = ()) -> tuple[float, float]:
    """(context, append) tokens of the turn at which β is profiled: Table 2's for the paper's datasets
    (`DATASET_SHAPE`); for a synthetic dataset of one's own its targets (`SyntheticSpec.target_context` /
    `target_append`) or, without them, the mean turn of `trajectories` (it was the 64K dataset's shape, silently); for
    a trace the mean turn of its trajectories (it was the config's `dataset`'s shape, which a trace does not use)."""
    w = cfg.workload
    if w.kind != "trace":
        if w.dataset in DATASET_SHAPE:
            return DATASET_SHAPE[w.dataset]
        from dualpath_jax.workloads.synthetic import DATASETS

        spec = DATASETS.get(w.dataset)
        if spec.target_context > 0 and spec.target_append > 0:
            return spec.target_context, spec.target_append
    turns = [s for t in trajectories for s in t.turn_shapes(1)]  # (prompt, context, gen)
    if not turns:
        return DATASET_SHAPE["64K"]
    return sum(c for _, c, _ in turns) / len(turns), sum(p - c for p, c, _ in turns) / len(turns)


def _policy_kwargs(cfg: SimConfig, pre, kv_bytes_per_token: float, shape: tuple[float, float] | None = None) -> dict:
    """Fill α/β (when the policy takes them and the config leaves them unset) from the simulated hardware; β at the
    turn shape `shape` (`profile_shape`; None: the config's dataset's). A default of the policy's own Config that
    this replaces is named in a warning (`schedulers.registry.warn_replaced_defaults`)."""
    import dataclasses as dc

    from schedulers import POLICIES
    from schedulers.registry import warn_replaced_defaults

    kw = dict(cfg.policy_kwargs)
    fields = {f.name for f in dc.fields(POLICIES.get(cfg.policy).Config)}
    c = cfg.cluster
    context, append = shape or profile_shape(cfg)
    if "alpha_tokens" in fields and not kw.get("alpha_tokens"):
        # PAPER.md: α = tokens one node can read in 3 s (profiled): the SNIC's rate, or less where the calibrated
        # read streams cap it (read_stream_gbps x max_reads_per_node: 18 GB/s of the paper configs' 50 GB/s SNIC).
        read_bps = c.snic_gbps * GB * c.storage_efficiency
        if c.read_stream_gbps > 0:
            read_bps = min(read_bps, c.read_stream_gbps * GB * c.max_reads_per_node)
        kw["alpha_tokens"] = _window_tokens(READ_WINDOW_S * read_bps / kv_bytes_per_token, "α", "kv_bytes_per_token")
    if "beta_tokens" in fields and not kw.get("beta_tokens"):
        per_s = (context + append) / (pre.prefill_time(context, append) * c.pe_time_scale)
        kw["beta_tokens"] = _window_tokens(COMPUTE_WINDOW_S * per_s, "β", "pe_time_scale")
    if "block_size" in fields and "block_size" not in kw:
        kw["block_size"] = c.block_size
    if "seed" in fields and "seed" not in kw:
        kw["seed"] = cfg.seed
    if not checks_were_said():  # (a sweep's cell, built to check it and again to run it: said once)
        warn_replaced_defaults(POLICIES.get(cfg.policy), cfg.policy, cfg.policy_kwargs, kw)
    return kw


def _batcher_kwargs(cfg: SimConfig, pre) -> dict:
    import dataclasses as dc

    from schedulers import BATCHERS

    check_batcher_cost_fields(cfg)  # its own model= / hardware= are not used beside the PE cost model given here
    kw = dict(cfg.batcher_kwargs)
    fields = {f.name for f in dc.fields(BATCHERS.get(cfg.batcher).Config)}
    if "cost_model" in fields and "cost_model" not in kw:
        kw["cost_model"] = pre
    return kw


ttft_breakdown = metrics.ttft_breakdown  # (the runtime's turns_<policy>.json has it too)


def slo_summary(cfg: SimConfig, records: Sequence[metrics.TurnRecord], clock_end_s: float | None = None) -> dict:
    """The SLO judged on turns arriving in [warmup, duration) of an online run (as `capacity.probe` does), from the
    warm-up on for a trace: `metrics.slo_summary` (the runtime's `experiments.run` judges its runs with it too). The
    turns of the drain after arrivals stop see a lighter load (they used to count in `simulate` / `sweep`).
    `clock_end_s`: where the run stopped (its stats' `sim_end_s`), so a turn still decoding then whose TPOT is
    already certain to miss counts as a miss (None: not known, judged on its TTFT)."""
    end = cfg.workload.duration_s if cfg.workload.kind == "online" else math.inf
    return metrics.slo_summary(
        records, cfg.slo_ttft_s, cfg.slo_tpot_s, cfg.slo_percentile, cfg.warmup_s, end, clock_end_s=clock_end_s
    )


# What a bounded store (cluster.store_capacity_gb) counts (Simulator.run's stats; absent when unbounded): its capacity,
# what it held at the end, what it evicted (bytes, blocks, whole trajectories), and the turns whose hit it cut and the
# hit tokens they lost (they recomputed that KV)
STORE_KEYS = (
    "store_capacity_bytes",
    "store_held_bytes",
    "store_evicted_bytes",
    "store_evicted_blocks",
    "store_evicted_trajectories",
    "store_lost_lookups",
    "store_lost_hit_tokens",
)


def summarize(cfg: SimConfig, records, links, stats) -> dict:
    cache = {}  # each field of the records read once for both
    s = metrics.summarize(records, links, cache)
    s.update(ttft_breakdown(records, cache))
    totals = stats["link_totals"]
    snic = np.array([v for k, v in totals.items() if k.startswith("snic/")])
    s["snic_max_over_avg"] = float(snic.max() / snic.mean()) if snic.size and snic.mean() > 0 else math.nan
    s["snic_total_bytes"] = float(snic.sum()) if snic.size else 0.0  # (the runtime's name; was snic_bytes_total)
    s["unfinished_turns"] = stats["unfinished_turns"]
    for k in STORE_KEYS:  # a bounded store's (cluster.store_capacity_gb) counters
        if k in stats:
            s[k] = stats[k]
    if cfg.workload.kind != "offline":
        # The SLO's percentiles (turns in [warmup, duration), no first token: a miss) beside the all-turn ones
        s = metrics.with_slo(s, slo_summary(cfg, records, stats.get("sim_end_s")))
    return s


def run(
    cfg: SimConfig,
    trajectories: Sequence[Trajectory] | None = None,
    max_time: float = math.inf,
    progress: bool = False,
) -> SimResult:
    """Simulate `cfg` once; deterministic for a given cfg (seed included). `progress`: a tqdm bar of finished
    turns (of all the agents' turns, known before the run whatever the arrivals) with the simulated clock, on
    stderr. `max_time`: simulated seconds to stop at (> 0; inf: until every turn finished)."""
    # (-1 gave a result of 0 turns, silently; "5" a TypeError from the simulator naming no argument)
    if not is_real(max_time) or not max_time > 0:
        raise ValueError(f"max_time must be a number of simulated seconds > 0 (inf: no limit), got {max_time!r}")
    sim = build_simulator(cfg, trajectories)
    # the workload's turns, arrived or not (a run cut by max_time records only the turns that arrived): the bar's
    # total and stats["workload_turns"]
    total = sum(len(t.turns) for t in sim.trajectories)
    if not progress:
        records, links, stats = sim.run(max_time=max_time)
    else:
        from dualpath_jax import progress as bars

        # (online and trace runs too: their bar had no total, so no percentage and no time left)
        with bars.bar(total=total, unit="turn", desc=f"simulating {cfg.policy}", mininterval=2.0) as bar:

            def report(now: float, turns_done: int, events: int) -> None:
                bar.update(turns_done - bar.n)
                evs = f"{events / 1e6:.1f} M events" if events >= 1e6 else f"{events:,} events"  # (not "0.0 M")
                bar.set_postfix_str(f"sim {now:,.0f} s, {evs}", refresh=False)

            records, links, stats = sim.run(max_time=max_time, progress=report)
    links = metrics.links_ended_at(links, stats["sim_end_s"])
    stats["workload_turns"] = total
    return SimResult(records, links, stats, summarize(cfg, records, links, stats), sim.cfg, policy_config(sim.policy))


def policy_config(policy) -> dict | None:
    """The fields of a built policy's Config (`CheckedPolicy` forwards `.config`), or None without a dataclass one."""
    conf = getattr(policy, "config", None)
    if conf is None or not dataclasses.is_dataclass(conf) or isinstance(conf, type):
        return None
    return dataclasses.asdict(conf)
