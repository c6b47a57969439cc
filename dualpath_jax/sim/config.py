"""Typed simulator configuration, built from the ml_collections config files (configs/paper_*.py, configs/sim_tiny.py,
one's own; `configs_io.load_sim_config`)."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
import numbers
from collections.abc import Collection, Iterator, Mapping
from typing import Any

GB = 1e9


class SimConfigError(ValueError):
    """A configuration (or its workload against it) the simulator cannot run; the message names the field."""


@dataclasses.dataclass
class ClusterConfig:
    """Hardware and system knobs. Bandwidths in GB/s (1e9 bytes/s; `*_gbps` too: a 400 Gbps NIC is 50), capacities in
    GB. Compute and HBM come from the `hardware` profile; links and nodes from these fields (`warn_hardware_figures`).
    A field marked [calibrated] was fitted on PAPER.md's DS 660B table: the fitted values are `configs/sim_base.py`'s
    CALIBRATED, which every config file applies; a ClusterConfig built in code keeps the defaults below (e.g.
    max_reads_per_node 8, fitted 9)."""

    model: str = "ds660b"  # key of schedulers.cost_model.MODEL_SHAPES
    hardware: str = "h800"  # key of schedulers.cost_model.HARDWARE
    prefill_nodes: int = 2  # P
    decode_nodes: int = 4  # D
    gpus_per_node: int = 8  # g: engines per node
    # Nodes per expert-parallel (EP) group of MoE engines, per role; 0: all the role's nodes form one group.
    # A large cluster runs several EP groups (EP cannot exceed the experts to place): it sets the weights per
    # engine, and so the DE HBM left for KV.
    prefill_ep_nodes: int = 0
    decode_ep_nodes: int = 0
    # MoE DEs of one EP group decode in lockstep: each step runs the group's all-to-all, so it takes the
    # slowest member's time (sim.simulator.DecodeGroup). Dense models (DP only) never lock.
    decode_lockstep: bool = False
    snic_gbps: float = 50.0  # s*B: one 400 Gbps storage NIC per node
    cnic_gbps: float = 50.0  # B: one 400 Gbps compute NIC per GPU
    cnic_duplex: bool = True  # full-duplex CNICs: separate inbound/outbound links of cnic_gbps each
    dram_gbps: float = 500.0  # M: host memory bandwidth per node
    storage_gbps: float = 0.0  # aggregate storage-cluster cap; 0 = none
    # fraction of the SNIC line rate storage I/O reaches (the SNIC link's capacity: reads and write-backs) [calibrated]
    storage_efficiency: float = 1.0
    host_buffer_gb: float = 80.0  # DRAM buffer per node for Full Blocks
    # DRAM buffer of each DE node where it differs from the PE nodes' (the runtime sizes them apart:
    # buffers.de_buffer_bytes / pe_buffer_bytes); None: every node host_buffer_gb
    de_host_buffer_gb: float | None = None
    pe_hbm_kv_gb: float = 20.0  # PE HBM for whole-prompt KV when not layerwise (basic) [calibrated]
    de_hbm_kv_gb: float = 40.0  # DE HBM for decode KV (prompt + generated); <= 0: derived (sim.runner.de_hbm_kv_bytes)
    # HBM per DE held by what is neither weights nor KV (activations, EP communication buffers, graphs);
    # subtracted when de_hbm_kv_gb is derived [calibrated]
    de_hbm_reserve_gb: float = 0.0
    # Sequences a DE holds at most, whatever their lengths (the runtime's fixed-slot decode batch,
    # runtime cluster.decode_slots); None: only its HBM room limits them. A request placed on a DE with every
    # slot taken waits there for a slot (its allocation wait, as for HBM), and the policy sees no room there.
    de_max_seqs: int | None = None
    # The KV store's capacity (GB of KV, all layers), shared by every node: one LRU over trajectories whose least
    # recently used ones lose their blocks (sim.simulator `_store_write`); None: unbounded (every earlier turn's KV
    # can hit). A runtime store of capacity_bytes: (capacity_bytes // its block file bytes) x block_size x KV B/token.
    store_capacity_gb: float | None = None
    # fraction of a GPU's HBM the serving engine may use (weights + KV + the rest) when de_hbm_kv_gb is
    # derived; 0.9 as vLLM's default gpu_memory_utilization
    hbm_usable_fraction: float = 0.9
    block_size: int = 64
    kv_bytes_per_token: float = 0.0  # 0: from the cost model's ModelShape
    collective_bytes_per_token: float = 0.0  # high-priority CNIC bytes per prefilled token (EP all-to-all)
    high_share: float = 0.99  # the high class's share of a CNIC under contention (InfiniBand VL arbitration)
    pe_time_scale: float = 1.0  # multiplies the cost model's prefill times [calibrated]
    de_time_scale: float = 1.0  # multiplies the cost model's decode step times [calibrated]
    max_reads_per_node: int = 8  # concurrent storage reads per node (requests in flight on one SNIC) [calibrated]
    read_stream_gbps: float = 0.0  # cap on one request's read stream from storage; 0 = none [calibrated]
    fetch_interval_s: float = 0.1  # each group fetches from the global scheduler this often
    # "node": a group's fetch is passed to the policy as fetching_node (paper: a PE group's fetch places on its own PEs
    # under basic / dualpath; a DE group's restricts nothing); "global": fetching_node=None (every PE a candidate)
    fetch_scope: str = "node"
    fetch_window: int = 1024  # a fetch shows the policy at most this many queued requests (FIFO head)
    layerwise: bool = True  # layerwise prefill (False: the whole prompt KV must be in PE HBM first)
    io_free: bool = False  # oracle: storage reads, H2D/D2H and P->D transfers cost nothing
    writeback: bool = True  # DE persists filled blocks during decode (bytes on the DE SNIC)
    bucket_s: float = 10.0  # width of the per-link bytes-over-time buckets
    # in a busy network (>= network.COALESCE_MIN_FLOWS active flows) flows finishing within this of one another finish
    # together (one solve)
    flow_coalesce_s: float = 1e-3


@dataclasses.dataclass
class WorkloadConfig:
    """The simulated agents: offline (all at t = 0), online (Poisson at `aps` agents per simulated second) or a
    trace's times; synthetic lengths from a Table 2 dataset (tokens)."""

    kind: str = "offline"  # offline | online | trace
    dataset: str = "64K"  # synthetic dataset (workloads.synthetic.DATASETS): 32K | 48K | 64K (Table 2), one's own
    n_agents: int = 2048
    aps: float = 0.2  # online: Poisson agent arrivals per second
    duration_s: float = 3600.0  # online: arrivals in [0, duration_s)
    trace_path: str = ""  # trace mode: a trace file for the shared loaders
    max_agents: int = 0  # trace mode, >0: replay only the trace's first that many trajectories (sessions), each whole
    max_turns: int = 0  # >0: truncate every trajectory (fast tests)
    # >0: cut every trajectory before its first turn whose prompt + generation exceeds this many tokens (a
    # model's context window; real traces hold sessions longer than any DE's HBM)
    max_context_tokens: int = 0
    # synthetic workloads: every append x this (PAPER.md's append x1..x3 experiment; trajectories end at the
    # dataset's max length, so longer appends mean fewer turns)
    append_scale: float = 1.0
    # a turn also hits the blocks other trajectories' prompts stored before it arrived (a trace's block hashes,
    # e.g. Mooncake's shared system prompts; synthetic workloads have none): False counts its own trajectory's only
    shared_prefix_hits: bool = True


@dataclasses.dataclass
class SimConfig:
    """One simulation's configuration: the `cluster` (bandwidths in GB/s, capacities in GB), the `workload`, the
    inter-engine `policy` (`schedulers.POLICIES`) and intra-engine `batcher` (`schedulers.BATCHERS`) by name with
    their Config fields (field -> value), the seed, and the SLO (seconds; percentile in (0, 100]; turns arriving
    before `warmup_s` of simulated time not judged). Load one with `sim.load_sim_config` (a config file, its
    ConfigDict layout: scheduler.name / batcher.name / mode) or `sim_config_from_dict`; `validate_sim_config` checks
    one built in code."""

    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)
    workload: WorkloadConfig = dataclasses.field(default_factory=WorkloadConfig)
    policy: str = "dualpath"
    policy_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    batcher: str = "compute_quota"
    batcher_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0
    slo_ttft_s: float = 4.0
    slo_tpot_s: float = 0.050
    slo_percentile: float = 90.0  # the SLO is met when this percentile of TTFT and of TPOT is within bounds
    warmup_s: float = 0.0  # online and trace: turns that arrive before this are left out of the SLO metrics


# What each number of the config may be (field: (lowest, lowest allowed itself?, highest or None)); checked by
# check_sim_config before a simulator is built, so a bad value is an error naming its field instead of a
# division by zero, a link of no capacity or a run that quietly does nothing.
_CLUSTER_BOUNDS: dict[str, tuple[float, bool, float | None]] = {
    "prefill_nodes": (1, True, None),
    "decode_nodes": (1, True, None),
    "gpus_per_node": (1, True, None),
    "prefill_ep_nodes": (0, True, None),
    "decode_ep_nodes": (0, True, None),
    "snic_gbps": (0, False, None),
    "cnic_gbps": (0, False, None),
    "dram_gbps": (0, False, None),
    "storage_gbps": (0, True, None),  # 0: no cap
    "storage_efficiency": (0, False, 1.0),
    "host_buffer_gb": (0, False, None),
    "pe_hbm_kv_gb": (0, False, None),
    "de_hbm_reserve_gb": (0, True, None),
    "hbm_usable_fraction": (0, False, 1.0),
    "block_size": (1, True, None),
    "kv_bytes_per_token": (0, True, None),  # 0: from the model
    "collective_bytes_per_token": (0, True, None),
    "high_share": (0, False, None),  # below 1 too: the low class must keep a share (checked below)
    "pe_time_scale": (0, False, None),
    "de_time_scale": (0, False, None),
    "max_reads_per_node": (1, True, None),
    "read_stream_gbps": (0, True, None),  # 0: no cap
    "fetch_interval_s": (0, False, None),
    "fetch_window": (1, True, None),
    "bucket_s": (0, False, None),
    "flow_coalesce_s": (0, True, None),
}
_TOP_BOUNDS: dict[str, tuple[float, bool, float | None]] = {
    "slo_ttft_s": (0, False, None),
    "slo_tpot_s": (0, False, None),
    "slo_percentile": (0, False, 100.0),
    "warmup_s": (0, True, None),
}


# Fields that count things (nodes, GPUs, tokens, reads): a fraction is a mistake (range(1.5), a window of 2.5)
_INT_FIELDS = frozenset(
    {"prefill_nodes", "decode_nodes", "gpus_per_node", "prefill_ep_nodes", "decode_ep_nodes", "block_size",
     "max_reads_per_node", "fetch_window"}
)  # fmt: skip
# Infinite values that mean something: no TTFT / TPOT bound in the SLO. Any other infinite number is refused (an
# infinite bandwidth or HBM was an OverflowError inside the run, an infinite fetch interval or time scale an
# offline run that never finished its turns, an infinite warm-up an SLO judged on no turn).
_INF_OK = frozenset({"config.slo_ttft_s", "config.slo_tpot_s"})


def _check_number(where: str, value: Any, low: float, low_ok: bool, high: float | None, integer: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:  # numpy scalars too
        raise ValueError(f"{where} must be a number, got {value!r}")
    if integer and not isinstance(value, numbers.Integral):
        raise ValueError(f"{where} must be an integer, got {value!r}")
    if value in (math.inf, -math.inf) and where not in _INF_OK:
        raise ValueError(f"{where} must be finite, got {value!r}")
    if value < low or (value == low and not low_ok) or (high is not None and value > high):
        bound = f"{'>=' if low_ok else '>'} {low:g}" + ("" if high is None else f" and <= {high:g}")
        raise ValueError(f"{where} must be {bound}, got {value!r}")


def check_sim_config(sc: SimConfig) -> None:
    """Raise ValueError naming the first field of `sc` whose value is out of range (see _CLUSTER_BOUNDS)."""
    for name, (low, low_ok, high) in _CLUSTER_BOUNDS.items():
        _check_number(f"config.cluster.{name}", getattr(sc.cluster, name), low, low_ok, high, name in _INT_FIELDS)
    # Switches: a SimConfig built in code with the string "false" ran with the switch on (a non-empty string is true)
    for name in ("cnic_duplex", "decode_lockstep", "layerwise", "io_free", "writeback"):
        value = getattr(sc.cluster, name)
        if isinstance(value, str) or value not in (True, False):
            raise ValueError(f"config.cluster.{name} must be true or false, got {value!r}")
    if isinstance(sc.workload.shared_prefix_hits, str) or sc.workload.shared_prefix_hits not in (True, False):
        raise ValueError(
            f"config.workload.shared_prefix_hits must be true or false, got {sc.workload.shared_prefix_hits!r}"
        )
    if sc.cluster.de_host_buffer_gb is not None:  # (None: host_buffer_gb, as the PE nodes)
        _check_number("config.cluster.de_host_buffer_gb", sc.cluster.de_host_buffer_gb, 0, False, None)
    if sc.cluster.store_capacity_gb is not None:  # (None: an unbounded store)
        _check_number("config.cluster.store_capacity_gb", sc.cluster.store_capacity_gb, 0, False, None)
    if sc.cluster.de_max_seqs is not None:  # (None: no cap)
        _check_number("config.cluster.de_max_seqs", sc.cluster.de_max_seqs, 1, True, None, integer=True)
    # <= 0: derived from the HBM (resolve_de_hbm); NaN used to pass as "derived", infinity failed inside the run
    _check_number("config.cluster.de_hbm_kv_gb", sc.cluster.de_hbm_kv_gb, -math.inf, False, None)
    if not sc.cluster.high_share < 1:
        raise ValueError(
            f"config.cluster.high_share must be below 1 (the low class keeps a share), got {sc.cluster.high_share}"
        )
    for name, (low, low_ok, high) in _TOP_BOUNDS.items():
        _check_number(f"config.{name}", getattr(sc, name), low, low_ok, high)
    # the workload generators', arrivals' and policies' seeds (a negative one failed when the run was built)
    _check_number("config.seed", sc.seed, 0, True, None, integer=True)
    from schedulers.cost_model import HARDWARE, MODEL_SHAPES  # no jax

    for name, registry in (("model", MODEL_SHAPES), ("hardware", HARDWARE)):
        if getattr(sc.cluster, name) not in registry:
            raise ValueError(
                f"config.cluster.{name} {getattr(sc.cluster, name)!r} unknown; known: {', '.join(registry.names())}"
            )
    if sc.cluster.fetch_scope not in ("node", "global"):
        raise ValueError(f"config.cluster.fetch_scope must be 'node' or 'global', got {sc.cluster.fetch_scope!r}")
    if MODEL_SHAPES.get(sc.cluster.model).is_moe:  # (dense engines are DP only: no EP groups)
        for role in ("prefill", "decode"):
            nodes, group = getattr(sc.cluster, f"{role}_nodes"), getattr(sc.cluster, f"{role}_ep_nodes")
            # One cost model per role holds every engine's weights: a smaller last group would hold more weights per
            # engine (less KV room, maybe more than the HBM) than modelled (paper_scale.py's groups of 2 PE / 4 DE
            # nodes on 3P6D ran their 1-node PE and 2-node DE groups with EP 16 / 32 weights, silently)
            if 0 < group < nodes and nodes % group:
                raise ValueError(
                    f"config.cluster.{role}_ep_nodes = {group} does not split the {nodes} {role} nodes into equal EP "
                    f"groups (the last would have {nodes % group}); give a divisor of {nodes} or 0 (one group of all)"
                )
    w = sc.workload
    if w.kind not in ("offline", "online", "trace"):
        raise ValueError(f"config.workload.kind must be offline | online | trace, got {w.kind!r}")
    _check_number("config.workload.max_turns", w.max_turns, 0, True, None, integer=True)
    _check_number("config.workload.max_agents", w.max_agents, 0, True, None, integer=True)
    if w.kind != "trace" and w.max_agents:
        raise ValueError(
            f"config.workload.max_agents applies to kind='trace' only (kind {w.kind!r}: n_agents, or aps x duration_s)"
        )
    _check_number("config.workload.max_context_tokens", w.max_context_tokens, 0, True, None, integer=True)
    _check_number("config.workload.append_scale", w.append_scale, 0, False, None)
    if w.kind == "trace" and w.append_scale != 1.0:
        raise ValueError("config.workload.append_scale applies to synthetic workloads only, not kind='trace'")
    if w.kind != "trace":
        from dualpath_jax.workloads.synthetic import DATASETS  # no jax

        if w.dataset not in DATASETS:
            raise ValueError(f"config.workload.dataset {w.dataset!r} unknown; known: {', '.join(DATASETS.names())}")
    if w.kind == "offline":
        _check_number("config.workload.n_agents", w.n_agents, 1, True, None, integer=True)
    elif w.kind == "online":  # (were checked only when the run was built; an infinite duration overflowed there)
        _check_number("config.workload.aps", w.aps, 0, False, None)
        _check_number("config.workload.duration_s", w.duration_s, 0, False, None)
        # The SLO is judged on the turns arriving in [warmup_s, duration_s): with none, slo_met=False from no turn
        if not sc.warmup_s < w.duration_s:
            raise ValueError(
                f"config.warmup_s ({sc.warmup_s:g}) must be below config.workload.duration_s ({w.duration_s:g}) for "
                "an online workload (the SLO is judged on the turns arriving in between)"
            )


# Modes: named bundles over (layerwise, policy, io_free); any registered policy name is also a mode.
MODES: dict[str, dict[str, Any]] = {
    "basic": dict(layerwise=False, policy="basic"),
    "layerwise": dict(layerwise=True, policy="basic"),  # ablation step 1: + layerwise prefill
    # Step 2: + dual path with round-robin assignment. round_robin rotates over all engines whichever node fetched,
    # so fetch_scope="global" changes nothing (kept from when it placed on the fetching group's PEs). It uses no
    # load information: a request goes to the DE in turn and waits there for HBM (full_de="queue").
    "dualpath_rr": dict(layerwise=True, policy="round_robin", fetch_scope="global", policy_kwargs={"full_de": "queue"}),
    "dualpath": dict(layerwise=True, policy="dualpath"),  # step 3: + scheduler
    "oracle": dict(layerwise=True, policy="dualpath", io_free=True),
}


def _fill(dc_type, d: dict, where: str):
    names = {f.name for f in dataclasses.fields(dc_type)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
    return dc_type(**d)


def _check_kwargs(registry, name: str, kwargs: dict, where: str) -> None:
    """ValueError naming `where` when `kwargs` are not fields of `name`'s Config or its checks refuse them."""
    from schedulers.registry import build_config

    try:
        build_config(registry.get(name), name, **kwargs)
    except (TypeError, ValueError) as e:  # an unknown field, or a value of the wrong type or range
        raise ValueError(f"{where} {kwargs}: {e}") from None


def _warn_mode_overrides(mode: str, bundle: dict, cluster: dict, policy: str, explicit) -> None:
    """A mode sets its bundle whatever the config says: say so for each setting the user gave (`explicit`: dotted
    keys such as the launcher's `--config.*` overrides) that it replaces (`:basic` with
    `--config.cluster.layerwise=true` ran without layerwise, silently). Nothing within `checks_said`."""
    if checks_were_said():
        return
    for key, value in bundle.items():
        if key not in ("policy", "policy_kwargs") and f"cluster.{key}" in explicit and cluster.get(key) != value:
            logging.getLogger(__name__).warning(
                "config.mode %r sets config.cluster.%s=%r: the given %r is not used", mode, key, value, cluster[key]
            )
    if "scheduler.name" in explicit and policy != bundle["policy"]:
        logging.getLogger(__name__).warning(
            "config.mode %r runs policy %r: the given config.scheduler.name %r is not used",
            mode,
            bundle["policy"],
            policy,
        )


def sim_config_from_dict(cfg: dict, explicit: Collection[str] = (), variant: dict[str, str] | None = None) -> SimConfig:
    """Build a SimConfig from a (ConfigDict.to_dict()) mapping; `mode` picks a bundle from MODES. `explicit`: the
    dotted keys the user set (a launcher's `--config.*` overrides): a mode replacing one of them logs a warning.
    `variant`: the dotted keys the config file's variant items set, each to its item (`configs.sim_base`'s
    `{"workload.duration_s": "duration=100"}`, `sim.configs_io.variant_fields`). A given one (either way) that
    does nothing for the workload's kind is refused by name (`check_given_fields`). A recorded config's
    `model_shape` / `hardware_profile` (`recorded_parts`) are registered where their names are not. A SimConfig's
    own fields (`dataclasses.asdict`: `policy`, `batcher` as a name) are not this layout: ValueError saying so."""
    cfg = dict(cfg)
    own = sorted(k for k in ("policy", "policy_kwargs", "batcher_kwargs") if k in cfg)
    if own or isinstance(cfg.get("batcher"), str):  # (was "dictionary update sequence element #0 ...")
        said = own or ["batcher (a name)"]
        raise ValueError(
            f"config: {', '.join(said)} are a SimConfig's fields (dataclasses.asdict), not a config file's layout "
            "(scheduler.name / scheduler.kwargs, batcher.name / batcher.kwargs, mode): pass a config file's "
            "ConfigDict.to_dict() or a run.json's 'config' (or use the SimConfig itself)"
        )
    cluster = dict(cfg.pop("cluster", {}))
    register_recorded_parts(cfg, cluster)
    workload = dict(cfg.pop("workload", {}))
    sched = dict(cfg.pop("scheduler", {}))
    batcher = dict(cfg.pop("batcher", {}))
    mode = cfg.pop("mode", "")
    for k in ("name", "output_dir", "description"):
        cfg.pop(k, None)
    policy = sched.pop("name", "dualpath")
    policy_kwargs = dict(sched.pop("kwargs", {}))
    if sched:
        raise ValueError(f"config.scheduler: unknown field(s) {sorted(sched)}; known: name, kwargs")
    if mode:
        if mode in MODES:
            bundle = dict(MODES[mode])
            _warn_mode_overrides(mode, bundle, cluster, policy, {*explicit, *(variant or {})})
            policy = bundle.pop("policy")
            policy_kwargs = {**bundle.pop("policy_kwargs", {}), **policy_kwargs}  # the config's own win
            cluster.update(bundle)
        else:  # any registered policy, layerwise, I/O as configured
            if "scheduler.name" in explicit and policy != mode and not checks_were_said():  # (said as the bundles)
                logging.getLogger(__name__).warning(
                    "config.mode %r runs policy %r: the given config.scheduler.name %r is not used", mode, mode, policy
                )
            policy = mode
    sc = _fill(SimConfig, {k: v for k, v in cfg.items()}, "config")
    sc.cluster = _fill(ClusterConfig, cluster, "config.cluster")
    sc.workload = _fill(WorkloadConfig, workload, "config.workload")
    sc.policy = policy
    sc.policy_kwargs = policy_kwargs
    sc.batcher = batcher.pop("name", "compute_quota")
    sc.batcher_kwargs = dict(batcher.pop("kwargs", {}))
    if batcher:
        raise ValueError(f"config.batcher: unknown field(s) {sorted(batcher)}; known: name, kwargs")
    from schedulers import POLICIES  # no jax

    if policy not in POLICIES:
        where = f"config.mode {mode!r}" if mode else f"config.scheduler.name {policy!r}"
        raise ValueError(
            f"{where} is neither a mode ({', '.join(MODES)}) nor a registered policy ({', '.join(POLICIES.names())}) "
            f"({POLICIES.own})"
        )
    validate_sim_config(sc)
    check_batcher_cost_fields(sc)
    check_given_fields(sc, explicit, variant or {})
    warn_hardware_figures(sc, {*explicit, *(variant or {})})
    return resolve_de_hbm(sc)


def recorded_parts(sc: SimConfig) -> dict[str, dict]:
    """The model shape and the hardware profile `sc` names, as fields (`model_shape`, `hardware_profile`): a resolved
    config records them beside `cluster.model` / `cluster.hardware` (experiments.simulate's summary.json / run.json),
    so it runs where the config file that registered a model or GPU of one's own is not (README "What ran")."""
    from schedulers.cost_model import HARDWARE, MODEL_SHAPES  # no jax

    return {
        "model_shape": dataclasses.asdict(MODEL_SHAPES.get(sc.cluster.model)),
        "hardware_profile": dataclasses.asdict(HARDWARE.get(sc.cluster.hardware)),
    }


def register_recorded_parts(cfg: dict, cluster: dict) -> None:
    """Pop `model_shape` / `hardware_profile` (`recorded_parts`) from the config mapping `cfg` and register each under
    the name `cluster` gives where none is; ValueError naming the field when one does not build, is not the one the
    cluster names, or differs from the one registered under its name (another model under the same name)."""
    from schedulers.cost_model import HARDWARE, MODEL_SHAPES, ModelShape  # no jax
    from schedulers.hardware import HardwareProfile

    parts = (
        ("model_shape", "model", MODEL_SHAPES, ModelShape),
        ("hardware_profile", "hardware", HARDWARE, HardwareProfile),
    )
    for key, field, registry, cls in parts:
        fields = cfg.pop(key, None)
        if fields is None:  # (a config file's dict: names only)
            continue
        name = cluster.get(field)
        if not isinstance(fields, dict) or fields.get("name") != name:
            got = fields.get("name") if isinstance(fields, dict) else fields
            raise ValueError(f"config.{key} is {got!r}, not config.cluster.{field} {name!r} (the one it records)")
        try:
            part = cls(**fields)
        except (TypeError, ValueError) as e:  # a field unknown or out of range
            raise ValueError(f"config.{key} of {name!r}: {e}") from None
        if name not in registry:
            registry.add(name, part)
        elif registry.get(name) != part:
            have = registry.get(name)
            diff = [
                f"{f.name} {getattr(part, f.name)!r} (registered: {getattr(have, f.name)!r})"
                for f in dataclasses.fields(cls)
                if getattr(part, f.name) != getattr(have, f.name)
            ]
            raise ValueError(
                f"config.{key} of {name!r} differs from the {registry.kind} registered under that name: "
                f"{', '.join(diff)} (the record ran another {field} than this checkout's)"
            )


# What a hardware profile also gives (in its units: bytes/s, bytes, GPUs) beside the cluster fields the simulator's
# links and nodes take: (field, profile attribute, profile units per field unit, unit, a rate)
_PROFILE_FIGURES = (
    ("snic_gbps", "snic_bandwidth", GB, "GB/s", True),
    ("cnic_gbps", "cnic_bandwidth", GB, "GB/s", True),
    ("dram_gbps", "host_mem_bandwidth", GB, "GB/s", True),
    ("gpus_per_node", "gpus_per_node", 1, "", False),
    ("host_buffer_gb", "host_buffer_bytes", GB, "GB", False),
)


# Set while a config whose check said its warnings already is built again (`checks_said`)
_CHECKS_SAID = contextvars.ContextVar("dualpath_sim_checks_said", default=False)


@contextlib.contextmanager
def checks_said() -> Iterator[None]:
    """Within it, the warnings of a config's check that a check of the same config said before are not said again:
    `warn_hardware_figures` and a policy's Config defaults the run replaces (`runner._policy_kwargs`).
    experiments.sweep builds every cell once to check it, then again to run it: each warning came twice per cell."""
    token = _CHECKS_SAID.set(True)
    try:
        yield
    finally:
        _CHECKS_SAID.reset(token)


def checks_were_said() -> bool:
    """Whether this runs inside `checks_said`."""
    return _CHECKS_SAID.get()


def warn_hardware_figures(sc: SimConfig, given: Collection[str] = ()) -> None:
    """Log a warning for each cluster field that the hardware profile (`config.cluster.hardware`) contradicts in a way
    that looks like a slip: a rate exactly 8x the profile's, given in Gbps where the field takes GB/s (`snic_gbps=400`
    for the paper's 400 Gbps NIC ran it 8x too fast, silently); a field left at its default where the profile gives
    another figure (a profile of one's own with 200 Gbps NICs and 4 GPUs a node ran on the defaults' 400 Gbps and 8
    GPUs: the simulator takes compute and HBM from the profile, its links and nodes from `config.cluster`). `given`: the
    dotted keys this run set (`--config.*` overrides, variant items): such a field is not "left at its default" even
    where it equals it (`sweep --loads=cluster.snic_gbps=50` was told "is its default 50 GB/s"). Nothing within
    `checks_said`."""
    from schedulers.hardware import HARDWARE  # no jax

    if checks_were_said():
        return
    hw = HARDWARE.get(sc.cluster.hardware)
    defaults = ClusterConfig()
    for field, attr, scale, unit, rate in _PROFILE_FIGURES:
        value, have = getattr(sc.cluster, field), getattr(hw, attr) / scale
        default = getattr(defaults, field)
        if rate and math.isclose(value, 8 * have, rel_tol=1e-9):
            logging.getLogger(__name__).warning(
                "config.cluster.%s = %g GB/s is 8x the %g GB/s (%g Gbps) of hardware profile %r: the field is in "
                "GB/s (1e9 bytes/s), not Gbps; a %g Gbps link is %s=%g",
                field, value, have, 8 * have, hw.name, value, field, value / 8,
            )  # fmt: skip
        elif value == default and f"cluster.{field}" not in given and not math.isclose(have, default, rel_tol=1e-9):
            logging.getLogger(__name__).warning(
                "config.cluster.%s is its default %g%s, but hardware profile %r gives %g%s: the simulator takes it "
                "from config.cluster.%s, not from the profile (set it to run the profile's)",
                field, value, unit and f" {unit}", hw.name, have, unit and f" {unit}", field,
            )  # fmt: skip


# Fields that one workload kind uses and the others do not: (dotted key, the kinds that use it, where it applies).
# The config files set every one of them for every run, so only a given one (a launcher's `--config.*` override, a
# variant item) can be told from the file's own value.
_ONLINE_HINT = "config.workload.kind=online, or the variant item aps="
_KIND_FIELDS = (
    ("workload.aps", ("online",), "online workloads only", _ONLINE_HINT),
    ("workload.duration_s", ("online",), "online workloads only", _ONLINE_HINT),
    ("warmup_s", ("online", "trace"), "online and trace workloads only (their SLO)", _ONLINE_HINT),
    # (an offline run is judged on no SLO; a trace_path beside kind offline / online ran synthetic agents, a dataset
    # beside kind trace ran the trace: each silently)
    ("slo_ttft_s", ("online", "trace"), "online and trace workloads only (their SLO)", _ONLINE_HINT),
    ("slo_tpot_s", ("online", "trace"), "online and trace workloads only (their SLO)", _ONLINE_HINT),
    ("slo_percentile", ("online", "trace"), "online and trace workloads only (their SLO)", _ONLINE_HINT),
    (
        "workload.trace_path",
        ("trace",),
        "trace workloads only",
        "config.workload.kind=trace, or the variant item trace=",
    ),
    (
        "workload.dataset",
        ("offline", "online"),
        "synthetic workloads only (offline and online; a trace has its own turns)",
        "config.workload.kind=offline or online, or leave it out",
    ),
    # online: aps * duration_s agents; trace: its first max_agents (0: all; sim.runner.make_trajectories)
    (
        "workload.n_agents",
        ("offline",),
        "offline workloads only (an online one runs aps * duration_s agents, a trace its first max_agents sessions)",
        "config.workload.max_agents=N (variant item max_agents=N) for a trace's first N sessions, "
        "config.workload.kind=offline, or leave the agent count out",
    ),
    (
        "workload.shared_prefix_hits",
        ("trace",),
        "trace workloads only (their block hashes; synthetic agents share no prefix)",
        "config.workload.kind=trace with a trace_path, or leave it out",
    ),
)


def check_given_fields(sc: SimConfig, explicit: Collection[str] = (), variant: dict[str, str] | None = None) -> None:
    """ValueError naming a field given for this run (`explicit`: `--config.*` overrides; `variant`: dotted key ->
    the config variant item that set it) that its workload kind does not use: an online workload's arrival rate or
    window (`--config.workload.duration_s=...`, `duration=`) on an offline or trace run, an SLO warm-up
    (`warmup=`) or bound (`--config.slo_ttft_s=...`) on an offline one (judged on no SLO), an agent count
    (`agents=`) on an online or trace run, a trace path on a synthetic run, a dataset on a trace run. Each ran as if
    it were not there."""
    kind = sc.workload.kind
    variant = variant or {}
    for key, kinds, where, hint in _KIND_FIELDS:
        if kind in kinds:
            continue
        if key in explicit:
            given = f"config.{key}"
        elif key in variant:
            given = f"config variant item {variant[key]!r} (config.{key})"
        else:
            continue
        raise ValueError(f"{given} applies to {where}, and this one is config.workload.kind={kind!r} (give {hint})")


def check_batcher_cost_fields(sc: SimConfig) -> None:
    """The simulator's batcher times its batches with the prefill engines' cost model (config.cluster.model on
    config.cluster.hardware: `sim.runner._batcher_kwargs` passes it as `cost_model`), so a batcher Config's own
    `model` / `hardware` (which it reads only without a cost model) other than those is not used: ValueError
    naming the field (`batcher.model=ds660b` on a DS 27B cluster ran with DS 27B's costs, silently)."""
    from schedulers import BATCHERS  # no jax

    if sc.batcher not in BATCHERS:  # (refused by name in validate_sim_config)
        return
    fields = {f.name for f in dataclasses.fields(BATCHERS.get(sc.batcher).Config)}
    kw = sc.batcher_kwargs
    if "cost_model" not in fields or kw.get("cost_model") is not None:
        return
    for name in ("model", "hardware"):
        if name in fields and name in kw and kw[name] != getattr(sc.cluster, name):
            raise ValueError(
                f"config.batcher.kwargs.{name}={kw[name]!r} is not used: the simulator's batcher times batches with "
                f"the prefill engines' cost model, config.cluster.{name}={getattr(sc.cluster, name)!r} (set "
                f"config.cluster.{name}, or leave batcher.{name} out)"
            )


def validate_sim_config(sc: SimConfig) -> None:
    """Every check a config file gets when it loads (`sim_config_from_dict`), for a SimConfig built in code (e.g.
    experiments.bench_runtime's copy of a runtime setup): the policy and batcher registered and their kwargs
    accepted by their own Config checks, and every number in range (`check_sim_config`). Raises ValueError naming
    the field."""
    from schedulers import BATCHERS, POLICIES  # no jax

    if not isinstance(sc, SimConfig):  # (a dict was an AttributeError: no attribute 'policy')
        raise TypeError(
            f"expected a SimConfig, got {type(sc).__name__}: load one with sim.load_sim_config(spec) or build it from "
            "a config mapping with sim.config.sim_config_from_dict"
        )
    if sc.policy not in POLICIES:
        raise ValueError(
            f"config.scheduler.name {sc.policy!r} is neither a mode ({', '.join(MODES)}) nor a registered policy "
            f"({', '.join(POLICIES.names())}) ({POLICIES.own})"
        )
    if sc.batcher not in BATCHERS:
        raise ValueError(
            f"config.batcher.name {sc.batcher!r} unknown; known: {', '.join(BATCHERS.names())} ({BATCHERS.own})"
        )
    # The policy's and batcher's own Config checks, now rather than when the run builds them
    _check_kwargs(POLICIES, sc.policy, sc.policy_kwargs, "config.scheduler.kwargs")
    _check_kwargs(BATCHERS, sc.batcher, sc.batcher_kwargs, "config.batcher.kwargs")
    check_sim_config(sc)
    check_layerwise_reads(sc)


def policy_reads_pe_only(name: str, policy_kwargs: Mapping[str, Any]) -> bool:
    """Whether the registered policy `name` with `policy_kwargs` reads every hit on the PE side: basic, pe_only (and
    their subclasses), or one whose Config has read_side='pe' (round_robin). The runtime's
    `runtime.config.check_layerwise_reads` uses it too."""
    from schedulers.policies import BasicPolicy, PeOnlyPolicy  # no jax
    from schedulers.registry import POLICIES

    cls = POLICIES.get(name) if name in POLICIES.names() else None
    return (isinstance(cls, type) and issubclass(cls, BasicPolicy | PeOnlyPolicy)) or (
        policy_kwargs.get("read_side") == "pe"
    )


def check_layerwise_reads(sc: SimConfig) -> None:
    """Basic prefill (`cluster.layerwise` False, the paper's Basic: "no layerwise prefill, no dual path") reads every
    hit on the PE side: SimConfigError for a policy that may read on the DE side (the simulator read such a policy's
    DE-side hits on the PE side, silently: its records and read queues were not the policy's; the runtime refuses
    the same setup). The modes set layerwise themselves (`basic`: off, with the basic policy)."""
    if sc.cluster.layerwise or policy_reads_pe_only(sc.policy, sc.policy_kwargs):
        return
    raise SimConfigError(
        f"config.cluster.layerwise=False (basic prefill, the paper's Basic) reads the hit on the PE side only, but "
        f"policy {sc.policy!r} may read on the DE side: run it with layerwise prefill, or use basic, pe_only or "
        "round_robin with read_side='pe' (e.g. the mode basic, or pe_only,cluster.layerwise=false)"
    )


def resolve_de_hbm(sc: SimConfig) -> SimConfig:
    """Fill in the derived DE KV HBM (`de_hbm_kv_gb` <= 0 with a non-KV reserve set) so the config shows what
    the runner will use: sim.runner.de_hbm_kv_bytes = `hbm_usable_fraction` * HBM - weights per DE -
    `de_hbm_reserve_gb`.
    Without a reserve it is left to the runner, as before."""
    c = sc.cluster  # (a negative reserve was refused by check_sim_config before this)
    from dualpath_jax.sim.runner import de_hbm_kv_bytes, make_cost_model  # runner imports this module

    if c.de_hbm_kv_gb > 0:  # given: said when no GPU of the profile could hold it beside the weights (a what-if runs)
        dec = make_cost_model(sc, "decode")
        room = dec.hw.hbm_bytes - dec.weight_bytes_per_engine()
        if c.de_hbm_kv_gb * GB > room and not checks_were_said():
            logging.getLogger(__name__).warning(
                "config.cluster.de_hbm_kv_gb = %g GB is more than the %.1f GB a %s GPU (%.1f GB of HBM) has beside %s's "
                "weights (%.1f GB per DE): each DE gets KV room no such GPU has (0: derive it from the profile)",
                c.de_hbm_kv_gb, room / GB, c.hardware, dec.hw.hbm_bytes / GB, c.model,
                dec.weight_bytes_per_engine() / GB,
            )  # fmt: skip
        return sc
    if c.de_hbm_reserve_gb == 0:
        return sc

    sc.cluster = dataclasses.replace(c, de_hbm_kv_gb=de_hbm_kv_bytes(sc, make_cost_model(sc, "decode")) / GB)
    return sc
