"""Typed configuration of a runtime run (what the code consumes; `configs/tiny_runtime.py` builds it).

`RuntimeConfig.from_config_dict(cfg)` turns an `ml_collections.ConfigDict` into these frozen dataclasses and
`validate()` rejects bad settings with an error naming the field *before* any engine starts: unknown policy,
batcher, transport, launcher or model; transport 'rdma' where pyverbs or an RDMA device is missing (on the
driver's host; with Ray, each actor's host is checked when its endpoints start); a host buffer that cannot hold
one request's prompt KV; a decode slot too short for the longest trajectory. A P/D ratio outside the paper's
bottleneck-free range only warns.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import numbers
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

LAUNCHERS = ("inprocess", "local", "ray")
TRANSPORT_NAMES = ("inproc", "tcp", "rdma")  # rdma: pyverbs and an RDMA device (checked by `validate`)


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field."""


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    prefill_nodes: int = 1  # P: all-prefill nodes
    decode_nodes: int = 2  # D: all-decode nodes
    engines_per_node: int = 1  # g: engines (GPUs) per node; each engine has its own CNIC
    decode_slots: int = 8  # requests one DE decodes together (fixed-capacity batch cache)
    max_seq_len: int = 1024  # KV capacity of one decode slot, in tokens
    prefill_token_budget: int = 512  # most new tokens one prefill batch computes (fifo batcher; longer prompts chunk)
    prefill_max_batch: int = 8  # most requests in one prefill batch (fifo batcher)
    precompile: bool = False  # compile every prefill/decode bucket at engine start (before the run's clock)


@dataclasses.dataclass(frozen=True)
class NicConfig:
    """Bandwidth caps that let one machine emulate a cluster's NIC ratios (PAPER.md "Hardware")."""

    snic_bytes_per_s: float = 4e6  # one storage NIC per node (s*B), shared by reads and write-backs
    cnic_bytes_per_s: float = 32e6  # one compute NIC per engine (B); KV is low priority
    high_priority_share: float = 0.99  # share of a CNIC model traffic gets under contention


@dataclasses.dataclass(frozen=True)
class BufferConfig:
    pe_buffer_bytes: int = 64 << 20  # host DRAM buffer of one PE node (hit KV read on the PE path, DE-path layers)
    de_buffer_bytes: int = 64 << 20  # host DRAM buffer of one DE node (prompt KV until it is loaded to device)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    name: str = "dualpath"  # inter-engine policy (schedulers.make_policy)
    batcher: str = "fifo"  # intra-engine policy (schedulers.make_batcher)
    policy_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    batcher_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    fetch_interval_s: float = 0.005  # how often an engine group fetches work / reports (its heartbeat)
    heartbeat_timeout_s: float = 3.0  # a group silent this long is dead; its requests are re-queued


@dataclasses.dataclass(frozen=True)
class WorkloadConfig:
    kind: str = "tiny"  # "tiny" (seeded short agents), "synthetic" (paper Table 2, scaled) or "trace"
    trace: str = ""  # kind="trace": a trace file/directory for dualpath_jax.workloads.traces.load_trace
    agents: int = 24  # tiny/synthetic: agents; trace: at most this many (0 = all)
    turns: int = 5  # turns per agent (tiny: exact; synthetic: capped)
    append_tokens: int = 48  # mean append per turn (tiny)
    gen_tokens: int = 8  # mean generated tokens per turn (tiny)
    first_append_tokens: int = 160  # the first turn's append (the system prompt / task)
    gap_s: float = 0.0  # think/tool time between turns
    arrival: str = "offline"  # offline (all at t=0), online (Poisson at aps) or trace (its timestamps)
    aps: float = 1.0  # agents per second (online)
    seed: int = 0
    dataset: str = "32K"  # synthetic: which Table 2 row
    scale: float = 0.02  # synthetic/trace: token lengths are multiplied by this to fit a tiny model
    time_scale: float = 1.0  # synthetic/trace: gaps and timestamps are multiplied by this
    # synthetic/trace: > 0 cuts each agent before its first turn whose prompt + generation (after `scale`) exceeds
    # this many tokens, e.g. the cluster's max_seq_len (real traces hold sessions far longer than the rest)
    max_context_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    model: str = "tiny_qwen2"  # a tiny config name (random weights from model_seed) or a local HF checkpoint dir
    model_seed: int = 0
    block_size: int = 16  # tokens per stored block (paper: 64; small for tiny runs)
    transport: str = "tcp"
    launcher: str = "local"
    store_dir: str = ""  # "" -> a fresh temporary directory per run
    cluster: ClusterConfig = ClusterConfig()
    nics: NicConfig = NicConfig()
    buffers: BufferConfig = BufferConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    workload: WorkloadConfig = WorkloadConfig()
    run_timeout_s: float = 600.0  # the driver gives up (error) after this long

    @staticmethod
    def from_config_dict(cfg: Any) -> RuntimeConfig:
        """Build from an ml_collections ConfigDict (or nested dicts); unknown keys are an error."""
        d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        return _build(RuntimeConfig, d, "config")

    def replace(self, **kw) -> RuntimeConfig:
        """dataclasses.replace with dotted sub-fields: replace(**{"scheduler.name": "basic"})."""
        out = self
        for key, value in kw.items():
            parts = key.split(".")
            out = _replace_path(out, parts, value)
        return out

    @property
    def num_prefill_engines(self) -> int:
        return self.cluster.prefill_nodes * self.cluster.engines_per_node

    @property
    def num_decode_engines(self) -> int:
        return self.cluster.decode_nodes * self.cluster.engines_per_node


def _replace_path(obj, parts, value):
    if len(parts) == 1:
        return dataclasses.replace(obj, **{parts[0]: value})
    return dataclasses.replace(obj, **{parts[0]: _replace_path(getattr(obj, parts[0]), parts[1:], value)})


def _build(cls, d: Mapping[str, Any], where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(fields)}")
    kw = {}
    for name, value in d.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}.{name} must be a mapping, got {type(value).__name__}")
            kw[name] = _build(type(default), value, f"{where}.{name}")
        elif isinstance(default, Mapping):
            kw[name] = dict(value)
        else:
            kw[name] = _coerce(value, default, f"{where}.{name}")
    return cls(**kw)


def _coerce(value, default, where):
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be a bool, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return value


def _check_types(obj, default, where: str) -> None:
    """Every scalar field of the type its default has (`from_config_dict` coerces; `replace` and the constructors
    do not: a float token budget, e.g., passed every check and failed in each node as it built its batcher)."""
    for f in dataclasses.fields(obj):
        value, want = getattr(obj, f.name), getattr(default, f.name)
        name = f"{where}.{f.name}"
        if dataclasses.is_dataclass(want):
            if type(value) is not type(want):
                raise ConfigError(f"{name} must be a {type(want).__name__}, got {type(value).__name__}")
            _check_types(value, want, name)
        elif isinstance(want, Mapping):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{name} must be a mapping, got {value!r}")
        elif isinstance(want, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be a bool, got {value!r}")
        elif isinstance(want, int):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        elif isinstance(want, float):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ConfigError(f"{name} must be a number, got {value!r}")
        elif isinstance(want, str) and not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")


def validate_workload(cfg: RuntimeConfig) -> None:
    """The workload's numbers, checked before the trajectories are made from them (errors name the field)."""
    _check_types(cfg, RuntimeConfig(), "config")
    w = cfg.workload
    least = {"agents": 0 if w.kind == "trace" else 1, "turns": 1}  # a trace's agents=0 means all of them
    for name, low in least.items():
        if getattr(w, name) < low:
            raise ConfigError(f"config.workload.{name} must be >= {low}, got {getattr(w, name)}")
    for name in ("scale", "time_scale"):
        if not getattr(w, name) > 0:
            raise ConfigError(f"config.workload.{name} must be > 0, got {getattr(w, name)}")
    if not 0 <= w.gap_s < math.inf:  # (a NaN or infinite gap never makes the next turn due: the run would hang)
        raise ConfigError(f"config.workload.gap_s must be >= 0 and finite, got {w.gap_s}")
    if w.kind == "tiny":  # (tiny_trajectories would silently make 0 or less into 1 token)
        for name in ("append_tokens", "gen_tokens", "first_append_tokens"):
            if getattr(w, name) < 1:
                raise ConfigError(f"config.workload.{name} must be >= 1, got {getattr(w, name)}")
    if w.arrival == "online" and not 0 < w.aps < math.inf:
        raise ConfigError(f"config.workload.aps must be > 0 and finite for arrival='online', got {w.aps}")
    if w.max_context_tokens < 0:
        raise ConfigError(f"config.workload.max_context_tokens must be >= 0 (0: no cut), got {w.max_context_tokens}")
    if w.kind == "synthetic":  # (as the simulator's check_sim_config does)
        from dualpath_jax.workloads.synthetic import DATASETS

        if w.dataset not in DATASETS:
            raise ConfigError(f"config.workload.dataset {w.dataset!r} unknown; known: {', '.join(DATASETS.names())}")


def validate(
    cfg: RuntimeConfig, kv_bytes_per_token: int | None = None, max_prompt_tokens: int | None = None, num_layers: int = 1
) -> None:
    """Reject a configuration that cannot run, before anything starts (errors name the field).

    kv_bytes_per_token: all layers' KV bytes of one token (from the model config), over num_layers layers.
    max_prompt_tokens / longest total: from the workload, to check buffers and decode slots.
    """
    import schedulers  # the registries (no jax)

    _check_types(cfg, RuntimeConfig(), "config")
    c = cfg.cluster
    for name in ("prefill_nodes", "decode_nodes", "engines_per_node", "decode_slots", "max_seq_len"):
        if getattr(c, name) < 1:
            raise ConfigError(f"config.cluster.{name} must be >= 1, got {getattr(c, name)}")
    if cfg.block_size < 1:
        raise ConfigError(f"config.block_size must be >= 1, got {cfg.block_size}")
    if cfg.launcher not in LAUNCHERS:
        raise ConfigError(f"config.launcher {cfg.launcher!r} unknown; known: {', '.join(LAUNCHERS)}")
    if cfg.transport not in TRANSPORT_NAMES:
        raise ConfigError(f"config.transport {cfg.transport!r} unknown; known: {', '.join(TRANSPORT_NAMES)}")
    if cfg.launcher != "inprocess" and cfg.transport == "inproc":
        raise ConfigError("config.transport 'inproc' needs config.launcher='inprocess' (engines in one process)")
    if cfg.transport == "rdma":  # (every launcher: rdma endpoints of one process talk through the NIC's loopback)
        from transport.rdma import rdma_unavailable_reason  # imports pyverbs only here, and only if installed

        reason = rdma_unavailable_reason()
        if reason is not None:
            raise ConfigError(f"config.transport='rdma' cannot run on this host: {reason}")
    if cfg.launcher == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError("config.launcher='ray' needs ray, which is not installed: pip install -e '.[ray]'")
    from schedulers.registry import BATCHERS, POLICIES

    # (a KeyError of a registered name comes from its kwargs, e.g. compute_quota's model='nope': that field is named)
    try:
        schedulers.make_policy(cfg.scheduler.name, **dict(cfg.scheduler.policy_kwargs))
    except KeyError as e:
        where = "policy_kwargs" if cfg.scheduler.name in POLICIES.names() else "name"
        raise ConfigError(f"config.scheduler.{where}: {e.args[0]}") from None
    except (TypeError, ValueError) as e:  # a field the policy's Config does not have, or a value it refuses
        raise ConfigError(f"config.scheduler.policy_kwargs: {e}") from None
    try:
        schedulers.make_batcher(cfg.scheduler.batcher, **dict(cfg.scheduler.batcher_kwargs))
    except KeyError as e:
        where = "batcher_kwargs" if cfg.scheduler.batcher in BATCHERS.names() else "batcher"
        raise ConfigError(f"config.scheduler.{where}: {e.args[0]}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.scheduler.batcher_kwargs: {e}") from None
    for name in ("snic_bytes_per_s", "cnic_bytes_per_s"):
        if not 0 < getattr(cfg.nics, name) < math.inf:  # (NaN too)
            raise ConfigError(
                f"config.nics.{name} must be > 0 and finite (1e12: unpaced), got {getattr(cfg.nics, name)}"
            )
    if not 0 < cfg.nics.high_priority_share < 1:  # the low class (KV) must keep a share of a contended CNIC
        raise ConfigError(f"config.nics.high_priority_share must be > 0 and < 1, got {cfg.nics.high_priority_share}")
    for name in ("prefill_token_budget", "prefill_max_batch"):
        if getattr(c, name) < 1:
            raise ConfigError(f"config.cluster.{name} must be >= 1, got {getattr(c, name)}")
    s = cfg.scheduler
    if not s.fetch_interval_s > 0:
        raise ConfigError(f"config.scheduler.fetch_interval_s must be > 0, got {s.fetch_interval_s}")
    if not s.heartbeat_timeout_s > s.fetch_interval_s:  # a group reports once per fetch
        raise ConfigError(
            f"config.scheduler.heartbeat_timeout_s ({s.heartbeat_timeout_s}) must exceed fetch_interval_s "
            f"({s.fetch_interval_s}): a group reports once per fetch"
        )
    if not cfg.run_timeout_s > 0:
        raise ConfigError(f"config.run_timeout_s must be > 0, got {cfg.run_timeout_s}")
    _warn_pd_range(cfg)
    if kv_bytes_per_token is not None and max_prompt_tokens is not None:
        # A request's area is carved from the buffer in whole Layer Blocks (block_size tokens of one layer).
        layer_block = cfg.block_size * (kv_bytes_per_token // num_layers)
        need = -(-kv_bytes_per_token * max_prompt_tokens // layer_block) * layer_block
        g = cfg.cluster.engines_per_node
        for name in ("pe_buffer_bytes", "de_buffer_bytes"):
            have = getattr(cfg.buffers, name)
            if have // g // layer_block * layer_block < need:  # each engine gets an equal share of the node's
                raise ConfigError(
                    f"config.buffers.{name}={have} B cannot hold one request's prompt KV: the longest prompt has "
                    f"{max_prompt_tokens} tokens x {kv_bytes_per_token} B/token = {need} B per engine in whole "
                    f"{layer_block} B Layer Blocks ({g} engine(s) per node share the node's buffer)"
                )
    if max_prompt_tokens is not None and max_prompt_tokens > c.max_seq_len:
        raise ConfigError(
            f"config.cluster.max_seq_len={c.max_seq_len} is shorter than the longest prompt ({max_prompt_tokens} tokens); "
            "raise it, lower config.workload.scale, or cut the agents there with config.workload.max_context_tokens"
        )


_WARNED: set = set()
UNPACED_BYTES_PER_S = 1e11  # NIC caps at or above this are "unpaced" (no emulated ratio)


def _warn_pd_range(cfg: RuntimeConfig) -> None:
    """PAPER.md "Bottleneck-free P/D range": outside it one link saturates first (a warning, not an error)."""
    if min(cfg.nics.snic_bytes_per_s, cfg.nics.cnic_bytes_per_s) >= UNPACED_BYTES_PER_S:
        return  # links not emulated (warm-up runs, real NICs): no ratio to check
    from schedulers import pd_bounds

    g = cfg.cluster.engines_per_node
    s = cfg.nics.snic_bytes_per_s / cfg.nics.cnic_bytes_per_s
    ratio = cfg.cluster.prefill_nodes / cfg.cluster.decode_nodes
    # (the PE-CNIC read constraint 2s/g <= 1 leaves no range at all when s > g/2)
    lo, hi = pd_bounds.pd_ratio_range(g=g, s=s, mem_over_bs=10.0) if 2 * s <= g else (math.inf, -math.inf)
    key = (cfg.cluster.prefill_nodes, cfg.cluster.decode_nodes, g, s)
    if not lo <= ratio <= hi and key not in _WARNED:
        _WARNED.add(key)
        if lo <= hi:
            where = f"the bottleneck-free range [{lo:.3f}, {hi:.3f}]"
        elif 2 * s > g:
            where = "any bottleneck-free range: there is none when s > g/2"
        else:
            where = "any bottleneck-free range: there is none for this g and s"
        log.warning(
            "P/D = %d/%d = %.3f is outside %s for g=%d, s=%.3f (PAPER.md): a NIC saturates before the GPUs",
            cfg.cluster.prefill_nodes,
            cfg.cluster.decode_nodes,
            ratio,
            where,
            g,
            s,
        )
