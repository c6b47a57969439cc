"""Typed configuration of a runtime run (what the code consumes; `configs/tiny_runtime.py` builds it).

`RuntimeConfig.from_config_dict(cfg)` turns an `ml_collections.ConfigDict` into these frozen dataclasses and
`validate()` rejects bad settings with an error naming the field *before* any engine starts: unknown policy,
batcher, transport, launcher or model; transport 'rdma' where pyverbs or an RDMA device is missing (on the
driver's host; with Ray, each actor's host is checked when its endpoints start); a host buffer that cannot hold
one request's prompt KV; a decode slot too short for the longest trajectory; host buffers that this host's
memory can never hold (local/inprocess launchers: every node's buffer on this host), and a decode engine's batch
cache (decode_slots x max_seq_len tokens of KV) that it (XLA:CPU) or its default accelerator can never hold; RDMA
settings (`config.rdma.*`: types and ranges always; device, port and GID where transport is 'rdma' and a device exists).
A P/D ratio outside the paper's bottleneck-free range only warns.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import numbers
import os
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

from dualpath_jax.registry import MAIN_MODULES  # (where a class of the driver's script lives)

log = logging.getLogger(__name__)

LAUNCHERS = ("inprocess", "local", "ray")
# The built-in transports (rdma: pyverbs and an RDMA device, checked by `validate`). `config.transport` may also name a
# backend of one's own registered in `transport.TRANSPORTS` by a module the config file imports (launcher 'inprocess').
TRANSPORT_NAMES = ("inproc", "tcp", "rdma")
# Least share of a CNIC either priority class may be given: the SFQ tags (bytes / share) of a smaller one overflow or
# swallow the other class's increments within a run.
MIN_CLASS_SHARE = 1e-6
# The stall timeout of a config.scheduler.stall_timeout_s left None (`stall_timeout_s`): generous, as a step's first
# compile (precompile off) runs in the engine's thread.
DEFAULT_STALL_TIMEOUT_S = 120.0
# Largest config.block_size: a block file's header stores its tokens per block as a uint32 (store/block_file.py)
MAX_BLOCK_SIZE = 2**32 - 1


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field."""


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """The emulated cluster (`config.cluster`): P prefill and D decode nodes of `engines_per_node` engines each, a
    decode engine's batch cache (`decode_slots` slots of `max_seq_len` tokens of KV), the fifo batcher's limits (in
    tokens / requests), layerwise or Basic prefill; `pe_hbm_kv_bytes` in bytes (0: no bound)."""

    prefill_nodes: int = 1  # P: all-prefill nodes
    decode_nodes: int = 2  # D: all-decode nodes
    engines_per_node: int = 1  # g: engines (GPUs) per node; each engine has its own CNIC
    decode_slots: int = 8  # requests one DE decodes together (fixed-capacity batch cache)
    max_seq_len: int = 1024  # KV capacity of one decode slot, in tokens
    prefill_token_budget: int = 512  # most new tokens one prefill batch computes (fifo batcher; longer prompts chunk)
    prefill_max_batch: int = 8  # most requests in one prefill batch (fifo batcher)
    precompile: bool = False  # compile every prefill/decode bucket at engine start (before the run's clock)
    # Layerwise prefill (the simulator's cluster.layerwise). False: the paper's Basic -- a PE loads a request's whole
    # hit KV (every layer) into HBM through its CNIC before its first layer computes, and sends the prompt KV to the
    # DE after its last; PE-side reads only (`check_layerwise_reads`)
    layerwise: bool = True
    # Basic prefill only: HBM of one PE for whole-prompt KV (the simulator's pe_hbm_kv_gb), taken FIFO before a
    # request's reads start and held until its KV left for the DE; 0: no bound (the PE's host buffer bounds them)
    pe_hbm_kv_bytes: int = 0


@dataclasses.dataclass(frozen=True)
class NicConfig:
    """Bandwidth caps that let one machine emulate a cluster's NIC ratios (PAPER.md "Hardware")."""

    snic_bytes_per_s: float = 4e6  # one storage NIC per node (s*B), shared by reads and write-backs
    cnic_bytes_per_s: float = 32e6  # one compute NIC per engine (B); KV is low priority
    high_priority_share: float = 0.99  # share of a CNIC model traffic gets under contention


@dataclasses.dataclass(frozen=True)
class BufferConfig:
    """Host DRAM buffers (`config.buffers`), in bytes, per node: a PE node's holds hit KV read on its own SNIC (and the
    layers of DE-path reads in transit), a DE node's the prompt KV until it is loaded to its device."""

    pe_buffer_bytes: int = 64 << 20  # host DRAM buffer of one PE node (hit KV read on the PE path, DE-path layers)
    de_buffer_bytes: int = 64 << 20  # host DRAM buffer of one DE node (prompt KV until it is loaded to device)


@dataclasses.dataclass(frozen=True)
class RdmaConfig:
    """The RDMA endpoints' NIC settings (`config.transport='rdma'`; `transport.rdma.RdmaTransport`'s arguments).
    The defaults are what the endpoint used before these fields existed."""

    device: str = ""  # RDMA device name (e.g. "mlx5_0"); "" = the first device (`ibv_devices` lists them)
    port: int = 1  # the device's port (`ib_port`; not a TCP port); it must be ACTIVE
    gid_index: int = 0  # GID table index (`show_gids`); RoCE v2 usually needs an IP-based GID, not index 0
    sl_high: int = 0  # service level (0-15) of the high-priority (model traffic) queue pairs
    sl_low: int = 0  # service level (0-15) of the low-priority (KV) queue pairs


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The policies (`config.scheduler`): `name` of the inter-engine policy (`schedulers.POLICIES`) with its Config's
    fields in `policy_kwargs` (field -> value), `batcher` of the intra-engine one (`schedulers.BATCHERS`) with
    `batcher_kwargs`; how often (s) each engine group fetches work and reports, and how long (s) a silent one lives."""

    name: str = "dualpath"  # inter-engine policy (schedulers.make_policy)
    batcher: str = "fifo"  # intra-engine policy (schedulers.make_batcher)
    policy_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    batcher_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    fetch_interval_s: float = 0.005  # how often an engine group fetches work / reports (its heartbeat)
    heartbeat_timeout_s: float = 3.0  # a group silent this long is dead; its requests are re-queued
    # A group whose engine's main thread or storage-NIC store call made no progress this long (a hung step, store read
    # or mount) is dead as a silent one is. It must exceed the longest compile of one step (precompile off: mid-run)
    # and heartbeat_timeout_s, and stay below run_timeout_s. None: DEFAULT_STALL_TIMEOUT_S where those allow it, else
    # off (`stall_timeout_s`).
    stall_timeout_s: float | None = None


@dataclasses.dataclass(frozen=True)
class WorkloadConfig:
    """The agents (`config.workload`): `kind` tiny (seeded, of the mean token lengths given here), synthetic (a Table 2
    row) or trace (a file); their arrivals (offline at 0, online Poisson at `aps` agents/s, or the trace's times, in
    seconds); synthetic and trace token lengths x `scale`, their gaps and timestamps x `time_scale`."""

    kind: str = "tiny"  # "tiny" (seeded short agents), "synthetic" (paper Table 2, scaled) or "trace"
    trace: str = ""  # kind="trace": a trace file/directory for dualpath_jax.workloads.traces.load_trace
    agents: int = 24  # tiny/synthetic: agents; trace: the first this many, each whole (0 = all)
    turns: int = 5  # turns per agent (tiny: exact; synthetic and trace: capped)
    append_tokens: int = 48  # mean append per turn (tiny)
    gen_tokens: int = 8  # mean generated tokens per turn (tiny)
    first_append_tokens: int = 160  # mean append of the first turn (tiny; the system prompt / task)
    gap_s: float = 0.0  # think/tool time between turns (tiny; synthetic and trace: their own gaps x time_scale)
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
class SloConfig:
    """The SLO an online or trace-arrival run is judged on (`experiments.run`; `metrics.slo_summary`, as the
    simulator's slo_ttft_s / slo_tpot_s / slo_percentile / warmup_s); an offline run has none (its JCT)."""

    ttft_s: float = 4.0  # TTFT bound (the paper's 4 s; inf: no bound)
    tpot_s: float = 0.050  # TPOT bound (50 ms; inf: no bound)
    percentile: float = 90.0  # met when this percentile of TTFT and of TPOT is within the bounds
    warmup_s: float = 0.0  # turns arriving before this are not judged


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """A runtime run's whole configuration (frozen): the model, KV block size (tokens), transport, launcher and KV
    store, and the sections `cluster`, `nics` (bytes/s), `buffers` (bytes), `rdma`, `scheduler`, `workload`, `slo`
    (seconds); times in seconds. Build it from a config file's `config.runtime` with `from_config_dict` (fields
    checked and coerced), change it with `replace(**{"scheduler.name": "basic"})`; `validate` / `driver.prepare`
    check it against the model and workload."""

    model: str = "tiny_qwen2"  # a tiny config name (random weights from model_seed) or a local HF checkpoint dir
    model_seed: int = 0
    # Batch-invariant model execution (models/layers/invariant.py): greedy tokens bit-identical whatever the
    # policy, chunking, batching or read path, also at float32 near-ties; slower steps.
    batch_invariant: bool = False
    # The model's dtype: its weights, activations and KV records (one of RUNTIME_DTYPES; a checkpoint is cast to it).
    # "bfloat16" halves the KV bytes per token, as the paper's bf16 KV.
    dtype: str = "float32"
    block_size: int = 16  # tokens per stored block (paper: 64; small for tiny runs)
    transport: str = "tcp"
    # Fields of the transport backend's endpoints besides those the launchers set (name, pacer; host, secret with
    # ray / netns; config.rdma's for rdma), e.g. tcp's {"timeout_s": 10.0} or its caps ({"max_sets": 64, ...}): every
    # endpoint of the run gets them. (tcp / rdma endpoints, and one's own whose class takes `secret`, get the run's
    # secret with the other launchers too, unless a 'secret' here overrides it.)
    transport_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    launcher: str = "local"
    store_dir: str = ""  # "" -> a fresh temporary directory per run
    # The KV store: a name in dualpath_jax.store.STORES ("local_dir", or one of one's own), opened on store_dir (its
    # `root`) with store_options (launcher.open_store); its module is imported by the node processes
    store: str = "local_dir"
    store_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    cluster: ClusterConfig = ClusterConfig()
    nics: NicConfig = NicConfig()
    buffers: BufferConfig = BufferConfig()
    rdma: RdmaConfig = RdmaConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    workload: WorkloadConfig = WorkloadConfig()
    slo: SloConfig = SloConfig()  # online / trace arrivals: the SLO experiments.run judges them on
    run_timeout_s: float = 600.0  # the driver gives up (error) after this long
    # Local launcher: node n's process runs in network namespace dpj-n<n> of experiments/netns_cluster.sh, its TCP
    # endpoints on the kernel-shaped compute veths (runtime/netns.py); Linux, root.
    netns: bool = False

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


RUNTIME_DTYPES = ("float32", "bfloat16", "float16")  # `config.dtype`'s values (models.config's, less float64)


def validate_dtype(cfg: RuntimeConfig) -> None:
    """`config.dtype` one of RUNTIME_DTYPES (checked before the model's config is made with it)."""
    if cfg.dtype not in RUNTIME_DTYPES:
        raise ConfigError(f"config.dtype {cfg.dtype!r} unknown; known: {', '.join(RUNTIME_DTYPES)}")


def stall_timeout_s(cfg: RuntimeConfig) -> float | None:
    """The stall timeout in force: config.scheduler.stall_timeout_s, or where None DEFAULT_STALL_TIMEOUT_S if it lies
    between heartbeat_timeout_s and run_timeout_s (else None: no stall detection; the run's own timeout comes
    first)."""
    s = cfg.scheduler
    if s.stall_timeout_s is not None:
        return float(s.stall_timeout_s)
    if s.heartbeat_timeout_s < DEFAULT_STALL_TIMEOUT_S < cfg.run_timeout_s:
        return DEFAULT_STALL_TIMEOUT_S
    return None


def fetch_timeout_s(cfg: RuntimeConfig) -> float:
    """How long a node process waits for the driver's reply to one fetch: the stall timeout in force, else the run's
    timeout, at least 30 s. A PE's fetch includes the policy's `schedule()` call."""
    return max(30.0, stall_timeout_s(cfg) or cfg.run_timeout_s)


def _replace_path(obj, parts, value, where="config"):
    # (a mistyped field was the dataclasses TypeError, naming neither the dotted path nor the known fields)
    fields = [f.name for f in dataclasses.fields(obj)]
    if parts[0] not in fields:
        raise ConfigError(f"{where}: unknown field(s) {[parts[0]]}; known: {sorted(fields)}")
    if len(parts) > 1 and not dataclasses.is_dataclass(getattr(obj, parts[0])):
        raise ConfigError(f"{where}.{parts[0]} has no fields: {'.'.join(parts[1:])!r} cannot be set in it")
    if len(parts) == 1:
        return dataclasses.replace(obj, **{parts[0]: value})
    sub = _replace_path(getattr(obj, parts[0]), parts[1:], value, f"{where}.{parts[0]}")
    return dataclasses.replace(obj, **{parts[0]: sub})


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
            if not isinstance(value, Mapping):  # (a string or a list was a ValueError / TypeError from dict())
                raise ConfigError(f"{where}.{name} must be a mapping, got {value!r}")
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
        # (math.isfinite first: int() of inf / NaN was an OverflowError / ValueError, not this line)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or int(value) != value
        ):
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


def _validate_stall_timeout(cfg: RuntimeConfig) -> None:
    t = cfg.scheduler.stall_timeout_s
    if t is None:
        return
    where = "config.scheduler.stall_timeout_s"
    if isinstance(t, bool) or not isinstance(t, numbers.Real):
        raise ConfigError(f"{where} must be a number of seconds or None (the default), got {t!r}")
    hb = cfg.scheduler.heartbeat_timeout_s
    if not t > hb:  # (NaN too)
        raise ConfigError(
            f"{where} ({t}) must exceed scheduler.heartbeat_timeout_s ({hb}): a group reports its stalls when it "
            "fetches; it must also exceed the longest compile of one step (precompile off: compiled mid-run)"
        )
    if not t < cfg.run_timeout_s:
        raise ConfigError(
            f"{where} ({t}) must be below config.run_timeout_s ({cfg.run_timeout_s}): a hung engine or store call "
            "would fail the run on its timeout before it was noticed (None: the default, "
            f"{DEFAULT_STALL_TIMEOUT_S:g} s where run_timeout_s is longer, else off)"
        )


def validate_slo(cfg: RuntimeConfig) -> None:
    """The SLO's numbers (`config.slo`; the simulator's bounds): the TTFT / TPOT bounds > 0 (inf: no bound), the
    percentile in (0, 100], the warm-up >= 0 and finite (NaN anywhere refused)."""
    s = cfg.slo
    for name in ("ttft_s", "tpot_s"):
        if not getattr(s, name) > 0:
            raise ConfigError(f"config.slo.{name} must be > 0 (inf: no bound), got {getattr(s, name)}")
    if not 0 < s.percentile <= 100:
        raise ConfigError(f"config.slo.percentile must be > 0 and <= 100, got {s.percentile}")
    if not 0 <= s.warmup_s < math.inf:  # (inf: no turn judged, the SLO missed by no turn)
        raise ConfigError(f"config.slo.warmup_s must be >= 0 and finite, got {s.warmup_s}")


def validate_workload(cfg: RuntimeConfig) -> None:
    """The workload's numbers, checked before the trajectories are made from them (errors name the field)."""
    _check_types(cfg, RuntimeConfig(), "config")
    validate_slo(cfg)  # (judged on the run's turns: checked before anything runs too)
    if cfg.cluster.max_seq_len < 1:  # (before the trajectories: it was "shorter than the workload's last turn")
        raise ConfigError(f"config.cluster.max_seq_len must be >= 1, got {cfg.cluster.max_seq_len}")
    w = cfg.workload
    least = {"agents": 0 if w.kind == "trace" else 1, "turns": 1}  # a trace's agents=0 means all of them
    for name, low in least.items():
        if getattr(w, name) < low:
            raise ConfigError(f"config.workload.{name} must be >= {low}, got {getattr(w, name)}")
    for name in ("scale", "time_scale"):  # (inf: an OverflowError rounding lengths, NaN gaps from 0 x inf)
        if not 0 < getattr(w, name) < math.inf:
            raise ConfigError(f"config.workload.{name} must be > 0 and finite, got {getattr(w, name)}")
    if w.seed < 0:  # (numpy's "expected non-negative integer" traceback when the trajectories were drawn)
        raise ConfigError(f"config.workload.seed must be >= 0, got {w.seed}")
    if cfg.model_seed < 0:  # (was reported against config.model when the model was built)
        raise ConfigError(f"config.model_seed must be >= 0, got {cfg.model_seed}")
    if not 0 <= w.gap_s < math.inf:  # (a NaN or infinite gap never makes the next turn due: the run would hang)
        raise ConfigError(f"config.workload.gap_s must be >= 0 and finite, got {w.gap_s}")
    if w.kind in ("synthetic", "trace") and w.gap_s != WorkloadConfig.gap_s:
        # (it shapes tiny agents only: a synthetic or trace run with gap_s=2 ran the workload's own gaps, silently)
        raise ConfigError(
            f"config.workload.gap_s={w.gap_s:g} sets the time between turns of tiny agents only, and this workload is "
            f"kind={w.kind!r} (its turns keep their own gaps): set it to {WorkloadConfig.gap_s:g} (its default), or "
            "stretch the workload's gaps and timestamps with config.workload.time_scale"
        )
    if w.kind == "tiny":  # (tiny_trajectories would silently make 0 or less into 1 token)
        for name in ("append_tokens", "gen_tokens", "first_append_tokens"):
            if getattr(w, name) < 1:
                raise ConfigError(f"config.workload.{name} must be >= 1, got {getattr(w, name)}")
    if w.arrival == "online" and not 0 < w.aps < math.inf:
        raise ConfigError(f"config.workload.aps must be > 0 and finite for arrival='online', got {w.aps}")
    if w.max_context_tokens < 0:
        raise ConfigError(f"config.workload.max_context_tokens must be >= 0 (0: no cut), got {w.max_context_tokens}")
    if w.kind == "tiny":
        check_tiny_workload(cfg)
    if w.kind == "synthetic":  # (as the simulator's check_sim_config does)
        from dualpath_jax.workloads.synthetic import DATASETS

        if w.dataset not in DATASETS:
            raise ConfigError(f"config.workload.dataset {w.dataset!r} unknown; known: {', '.join(DATASETS.names())}")


def check_batcher_cost_fields(cfg: RuntimeConfig) -> None:
    """A batcher priced by a cost model (`compute_quota`) gets the runtime's own model on this CPU
    (`launcher.batcher_kwargs`) unless `cost_model` is given, so its `model` / `hardware` kwargs are not used:
    ConfigError naming them (`model=qwen2.5-32b` was taken by name and then ignored; the simulator refuses the same,
    `sim.config.check_batcher_cost_fields`)."""
    from schedulers import BATCHERS

    kw = cfg.scheduler.batcher_kwargs
    if cfg.scheduler.batcher not in BATCHERS.names() or kw.get("cost_model") is not None:
        return
    fields = {f.name for f in dataclasses.fields(BATCHERS.get(cfg.scheduler.batcher).Config)}
    if "cost_model" not in fields:
        return
    for name in ("model", "hardware"):
        if name in fields and name in kw:
            raise ConfigError(
                f"config.scheduler.batcher_kwargs.{name}={kw[name]!r} is not used: the runtime's "
                f"{cfg.scheduler.batcher!r} batcher prices batches with the run's own model on this CPU (leave "
                f"{name} out)"
            )


def validate(
    cfg: RuntimeConfig,
    kv_bytes_per_token: int | None = None,
    max_prompt_tokens: int | None = None,
    num_layers: int = 1,
    weight_bytes: int | Callable[[], int] = 0,
) -> None:
    """Reject a configuration that cannot run, before anything starts (errors name the field).

    kv_bytes_per_token: all layers' KV bytes of one token (from the model config), over num_layers layers.
    max_prompt_tokens: the workload's longest prompt, to check the host buffers and `cluster.max_seq_len` (the longest
    turn, prompt + generation, is checked against the decode slots by `driver.prepare`).
    weight_bytes: one copy of the model's weights (`models.registry.weight_bytes`; or a function giving it, called only
    where an accelerator's memory is checked), for that memory.
    """
    import schedulers  # the registries (no jax)

    _check_types(cfg, RuntimeConfig(), "config")
    validate_dtype(cfg)
    c = cfg.cluster
    for name in ("prefill_nodes", "decode_nodes", "engines_per_node", "decode_slots", "max_seq_len"):
        if getattr(c, name) < 1:
            raise ConfigError(f"config.cluster.{name} must be >= 1, got {getattr(c, name)}")
    if not 1 <= cfg.block_size <= MAX_BLOCK_SIZE:
        raise ConfigError(
            f"config.block_size must be >= 1 and <= {MAX_BLOCK_SIZE} (a block file's header field), "
            f"got {cfg.block_size}"
        )
    if cfg.launcher not in LAUNCHERS:
        raise ConfigError(f"config.launcher {cfg.launcher!r} unknown; known: {', '.join(LAUNCHERS)}")
    if cfg.netns:
        _validate_netns(cfg)
    _validate_transport(cfg)
    _validate_store(cfg)
    if cfg.launcher != "inprocess" and cfg.transport == "inproc":
        # (the fix is the transport: the line named only the launcher, so `launcher=ray` on the :test config
        # pointed back to the launcher one had just chosen)
        where = "one Ray actor per node" if cfg.launcher == "ray" else "one process per node"
        raise ConfigError(
            f"config.launcher {cfg.launcher!r} runs the engines in separate processes ({where}), which "
            "config.transport 'inproc' cannot cross (config.transport 'inproc' needs config.launcher='inprocess'): "
            "set --config.runtime.transport=tcp (or rdma)"
        )
    _validate_rdma_fields(cfg)
    _validate_buffer_memory(cfg)
    if cfg.transport == "rdma":  # (every launcher: rdma endpoints of one process talk through the NIC's loopback)
        from transport.rdma import rdma_unavailable_reason  # imports pyverbs only here, and only if installed

        reason = rdma_unavailable_reason()
        if reason is not None:
            raise ConfigError(f"config.transport='rdma' cannot run on this host: {reason}")
        _validate_rdma_device(cfg)
    if cfg.launcher == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError("config.launcher='ray' needs ray, which is not installed: pip install -e '.[ray]'")
    from schedulers.registry import BATCHERS, POLICIES, build_config

    # (a KeyError of a registered name comes from its kwargs, e.g. compute_quota's model='nope': that field is named)
    try:
        config = build_config(POLICIES.get(cfg.scheduler.name), cfg.scheduler.name, **dict(cfg.scheduler.policy_kwargs))
    except KeyError as e:
        where = "policy_kwargs" if cfg.scheduler.name in POLICIES.names() else "name"
        raise ConfigError(f"config.scheduler.{where}: {e.args[0]}") from None
    except (TypeError, ValueError) as e:  # a field the policy's Config does not have, or a value it refuses
        raise ConfigError(f"config.scheduler.policy_kwargs: {e}") from None
    try:  # (the class itself: one that cannot be built, or is no policy; not its kwargs)
        schedulers.make_policy(cfg.scheduler.name, config)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.scheduler.name: {e}") from None
    pbs = cfg.scheduler.policy_kwargs.get("block_size", cfg.block_size)
    if pbs != cfg.block_size:  # (the runtime's blocks are config.block_size: a split in others was silently off)
        raise ConfigError(
            f"config.scheduler.policy_kwargs.block_size={pbs!r} differs from config.block_size={cfg.block_size}, the "
            "size of the blocks the runtime stores and reads: leave it out (it defaults to config.block_size)"
        )
    check_layerwise_reads(cfg)
    try:
        schedulers.make_batcher(cfg.scheduler.batcher, **dict(cfg.scheduler.batcher_kwargs))
    except KeyError as e:
        where = "batcher_kwargs" if cfg.scheduler.batcher in BATCHERS.names() else "batcher"
        raise ConfigError(f"config.scheduler.{where}: {e.args[0]}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.scheduler.batcher_kwargs: {e}") from None
    check_batcher_cost_fields(cfg)
    for name in ("snic_bytes_per_s", "cnic_bytes_per_s"):
        if not 0 < getattr(cfg.nics, name) < math.inf:  # (NaN too)
            raise ConfigError(
                f"config.nics.{name} must be > 0 and finite (1e12: unpaced), got {getattr(cfg.nics, name)}"
            )
    if not 0 < cfg.nics.high_priority_share < 1:  # the low class (KV) must keep a share of a contended CNIC
        raise ConfigError(f"config.nics.high_priority_share must be > 0 and < 1, got {cfg.nics.high_priority_share}")
    share = cfg.nics.high_priority_share
    if not MIN_CLASS_SHARE <= share <= 1 - MIN_CLASS_SHARE:  # (1e-300: the model class's SFQ tags, bytes / share,
        # reached inf within ~200 MB; its chunks then tied the KV chunks' and went first: KV got none of the CNIC)
        raise ConfigError(
            f"config.nics.high_priority_share={share!r} leaves a class {min(share, 1 - share):.3g} of a "
            f"CNIC, below {MIN_CLASS_SHARE:g}: the links' fair-queuing weights cannot keep such a ratio; use a "
            f"share in [{MIN_CLASS_SHARE:g}, 1 - {MIN_CLASS_SHARE:g}] (the paper's: 0.99)"
        )
    for name in ("prefill_token_budget", "prefill_max_batch"):
        if getattr(c, name) < 1:
            raise ConfigError(f"config.cluster.{name} must be >= 1, got {getattr(c, name)}")
    s = cfg.scheduler
    if not s.fetch_interval_s > 0:
        raise ConfigError(f"config.scheduler.fetch_interval_s must be > 0, got {s.fetch_interval_s}")
    if s.heartbeat_timeout_s == math.inf:  # (a stopped or deadlocked node then held the run until its timeout)
        raise ConfigError(
            "config.scheduler.heartbeat_timeout_s must be finite, got inf: a node that stops fetching (stopped, "
            "deadlocked) would never be declared dead, and the run would wait for it until config.run_timeout_s "
            "(a long one: e.g. 60)"
        )
    if not s.heartbeat_timeout_s > s.fetch_interval_s:  # a group reports once per fetch (NaN too)
        raise ConfigError(
            f"config.scheduler.heartbeat_timeout_s ({s.heartbeat_timeout_s}) must exceed fetch_interval_s "
            f"({s.fetch_interval_s}): a group reports once per fetch"
        )
    if not cfg.run_timeout_s > 0:
        raise ConfigError(f"config.run_timeout_s must be > 0, got {cfg.run_timeout_s}")
    # A group gets its tasks only when it fetches, and an idle one fetches once per interval: with an interval of the
    # run's timeout no turn got through in time (fetch_interval_s=30, run_timeout_s=20: "0/2 turns"); one past
    # threading.TIMEOUT_MAX (~292 years) crashed every node (OverflowError in the wait between fetches).
    if not s.fetch_interval_s < min(cfg.run_timeout_s, threading.TIMEOUT_MAX):
        raise ConfigError(
            f"config.scheduler.fetch_interval_s ({s.fetch_interval_s}) must be below config.run_timeout_s "
            f"({cfg.run_timeout_s}) and {threading.TIMEOUT_MAX:.0f} s: a group gets its tasks only when it fetches"
        )
    _validate_stall_timeout(cfg)
    _warn_pd_range(cfg)
    if kv_bytes_per_token is not None:
        _validate_decode_cache_memory(cfg, kv_bytes_per_token, weight_bytes)
    if kv_bytes_per_token is not None and max_prompt_tokens is not None:
        # A request's area is carved from the buffer in whole Layer Blocks (block_size tokens of one layer).
        layer_block = cfg.block_size * (kv_bytes_per_token // num_layers)
        need = -(-kv_bytes_per_token * max_prompt_tokens // layer_block) * layer_block
        g = cfg.cluster.engines_per_node
        for name in ("pe_buffer_bytes", "de_buffer_bytes"):
            have = getattr(cfg.buffers, name)
            # The prompt's KV fits an engine's share but not one Layer Block does: block_size is the field to change
            # (block_size=1e9 was reported against the buffer alone, as a need of 5e11 B for a 100-token prompt).
            if kv_bytes_per_token * max_prompt_tokens <= have // g < layer_block:
                raise ConfigError(
                    f"config.block_size={cfg.block_size} is too large for config.buffers.{name}={have} B: one Layer "
                    f"Block ({cfg.block_size} tokens x {kv_bytes_per_token // num_layers} B/token/layer = "
                    f"{layer_block} B) is more than each of the node's {g} engine(s) gets ({have // g} B); lower "
                    "config.block_size (the paper's: 64)"
                )
            if have // g // layer_block * layer_block < need:  # each engine gets an equal share of the node's
                raise ConfigError(
                    f"config.buffers.{name}={have} B cannot hold one request's prompt KV: the longest prompt has "
                    f"{max_prompt_tokens} tokens x {kv_bytes_per_token} B/token = {need} B per engine in whole "
                    f"{layer_block} B Layer Blocks ({g} engine(s) per node share the node's buffer)"
                )
    if max_prompt_tokens is not None and max_prompt_tokens > c.max_seq_len:
        raise ConfigError(
            f"config.cluster.max_seq_len={c.max_seq_len} is shorter than the longest prompt ({max_prompt_tokens} tokens); "
            f"raise it or {shorten_turns_hint(cfg)}"
        )
    # (last: a block too large for the buffers is named there first, with the model's numbers)
    if cfg.block_size > c.max_seq_len + 1:  # (a run of these read 0.00 MB on either path, said nowhere)
        raise ConfigError(
            f"config.block_size={cfg.block_size} is more than the {c.max_seq_len + 1} tokens a decode slot holds "
            f"(config.cluster.max_seq_len={c.max_seq_len} + 1): no block ever fills, so nothing is stored or read and "
            "every turn recomputes its whole prompt; lower config.block_size or raise config.cluster.max_seq_len"
        )


# The tiny agents' own lengths (`lifecycle.tiny_trajectories`): what shortens them, where `workload.scale` and
# `max_context_tokens` shorten synthetic and trace agents
TINY_LENGTHS = (
    "config.workload.first_append_tokens, append_tokens, gen_tokens (means; each turn draws 0.5-1.5x of them) or turns"
)


def shorten_turns_hint(cfg: RuntimeConfig) -> str:
    """How to shorten the workload's turns, by its kind (the end of a "max_seq_len is shorter than ...; raise it or"
    line, and of `driver.warn_past_positions`' warning). `workload.scale` and `max_context_tokens` shape synthetic and
    trace agents only: a tiny workload was told to change them too, which changed nothing (the same error again)."""
    if cfg.workload.kind == "tiny":
        return (
            f"shorten the tiny agents: {TINY_LENGTHS} (workload.scale and max_context_tokens shape synthetic and trace "
            "agents only)"
        )
    return "lower config.workload.scale, or cut the agents there with config.workload.max_context_tokens"


def check_tiny_workload(cfg: RuntimeConfig) -> None:
    """`workload.scale`, `time_scale` and `max_context_tokens` shape synthetic and trace agents only (`driver._scaled`):
    a tiny workload's must keep their defaults (each was ignored there: set, it changed nothing, and nothing said so).
    Called by `validate_workload` and by `driver.make_trajectories`, which would ignore them."""
    w, default = cfg.workload, WorkloadConfig()
    instead = {
        "scale": f"size the tiny agents with {TINY_LENGTHS}",
        "time_scale": "set the tiny agents' time between turns with config.workload.gap_s",
        "max_context_tokens": f"shorten the tiny agents: {TINY_LENGTHS}",
    }
    for name, way in instead.items():
        value, want = getattr(w, name), getattr(default, name)
        if value != want:
            raise ConfigError(
                f"config.workload.{name}={value:g} shapes synthetic and trace agents only, and this workload is "
                f"kind='tiny': set it to {want:g} (its default), or {way}"
            )


def check_layerwise_reads(cfg: RuntimeConfig, where: str = "config.cluster.layerwise=False") -> None:
    """Basic prefill (`cluster.layerwise` False, the paper's Basic: "no layerwise prefill, no dual path") reads every
    hit on the PE side: refuse a policy that may place reads on the DE side (the simulator refuses it too, by the same
    rule: `sim.config.policy_reads_pe_only`). The policies that read on the PE side only: basic, pe_only (and
    subclasses), and any whose Config has read_side='pe' (round_robin). `where`: what set layerwise (a `--config.policies` item, for experiments.run). Also
    `cluster.pe_hbm_kv_bytes` >= 0."""
    if cfg.cluster.pe_hbm_kv_bytes < 0:
        raise ConfigError(
            f"config.cluster.pe_hbm_kv_bytes must be >= 0 (0: no bound), got {cfg.cluster.pe_hbm_kv_bytes}"
        )
    if cfg.cluster.layerwise:
        return
    from dualpath_jax.sim.config import policy_reads_pe_only  # (stdlib imports only: no simulator is loaded)

    name = cfg.scheduler.name
    if policy_reads_pe_only(name, cfg.scheduler.policy_kwargs):
        return
    raise ConfigError(
        f"{where} (basic prefill, the paper's Basic) reads the hit on the PE side only, but policy {name!r} may read "
        "on the DE side: run it with layerwise prefill, or use basic, pe_only or round_robin with read_side='pe' "
        "(e.g. --config.policies=basic,layerwise=false,dualpath)"
    )


# ------------------------------------------------------------------ experiments.run's list of policies to compare

POLICY_FIELD = "policy."  # a list item `policy.NAME=value`: a field of the policy named before it
# A list item `layerwise=false`: the run of the policy named before it prefills as the paper's Basic (its
# `cluster.layerwise`, as the simulator's MODES set it: `configs/sim_base.py` variant item `basic` = layerwise off)
LAYERWISE_ITEM = "layerwise"
_FIELD_EXAMPLE = "e.g. basic,mine,policy.side=pe"


@dataclasses.dataclass(frozen=True)
class PolicyRun:
    """One policy of a list to compare: its name and the Config fields its own `policy.NAME=value` items give."""

    name: str
    fields: Mapping[str, Any]
    items: tuple[str, ...] = ()  # those items as given (for messages)
    # What the run is called in the table, results.json and its files: the name, or where the list runs this policy more
    # than once, the name with its own fields, `dualpath[alpha_tokens=500000]` (`file_label`: in file names)
    label: str = ""
    layerwise: bool | None = None  # its `layerwise=` item (None: none, config.runtime.cluster.layerwise); in the label

    @property
    def file_label(self) -> str:
        return file_label(self.label or self.name)


def file_label(label: str) -> str:
    """A run's label as a file-name part: `dualpath[alpha_tokens=500000]` -> `dualpath.alpha_tokens=500000`."""
    text = label.replace("[", ".").replace("]", "").replace(",", ".")
    return "".join(c if c.isalnum() or c in "._=+-" else "_" for c in text)


def parse_policy_list(text: str, where: str = "--config.policies") -> list[PolicyRun]:
    """A comma-separated list of items, as the simulator's config variants (`configs/sim_base.py`): a registered policy
    name, or `policy.NAME=value`, a field of the Config of the policy named before it (values read as the
    simulator's: ints, floats, true/false, None/null, else strings). `basic,dualpath,policy.alpha_tokens=500000,
    mine,policy.side=pe` runs basic with its defaults, dualpath with its α, mine with its side. A policy may run more
    than once with fields of its own each time (`dualpath,dualpath,policy.alpha_tokens=500000`: labelled `dualpath` and
    `dualpath[alpha_tokens=500000]`); twice with the same fields is refused. An item `layerwise=false` runs the policy
    named before it with the paper's Basic prefill (`cluster.layerwise`; labelled `basic[layerwise=false]`, whether or
    not the policy runs twice): `basic,layerwise=false,basic,round_robin,policy.full_de=queue,dualpath` is the paper's
    ablation. The names are checked by `check_policy_run`."""
    from dualpath_jax.checks import variant_value  # (the simulator's variant values: one text, one value in both)

    runs: list[tuple[str, dict[str, Any], list[str], dict[str, str]]] = []
    layerwise: dict[int, tuple[bool, str]] = {}  # run index -> its `layerwise=` item's value, the item
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            if item.startswith(POLICY_FIELD):
                raise ConfigError(f"{where} item {item!r} has no value: a field is given as {POLICY_FIELD}NAME=value")
            runs.append((item, {}, [], {}))
            continue
        key, value = (s.strip() for s in item.split("=", 1))
        if key == LAYERWISE_ITEM:
            _layerwise_item(runs, layerwise, item, value, where)
            continue
        if key.startswith("batcher.") and len(key) > len("batcher."):
            field = key[len("batcher.") :]
            raise ConfigError(
                f"{where} item {item!r}: every policy of the run has the one batcher of "
                "config.runtime.scheduler.batcher; its fields are config.runtime.scheduler.batcher_kwargs (e.g. "
                f'--config.runtime.scheduler.batcher_kwargs="{ {field: variant_value(value)} }")'
            )
        if not (key.startswith(POLICY_FIELD) and len(key) > len(POLICY_FIELD)):
            raise ConfigError(
                f"{where} item {item!r}: an item is a registered policy name, {POLICY_FIELD}NAME=value (a field of "
                f"the policy named before it, {_FIELD_EXAMPLE}) or {LAYERWISE_ITEM}=false (its run's prefill)"
            )
        if not runs:
            raise ConfigError(
                f"{where} item {item!r} comes before any policy name: a policy's field follows its name "
                f"({_FIELD_EXAMPLE})"
            )
        name, fields, items, given = runs[-1]
        field = key[len(POLICY_FIELD) :]
        if given.setdefault(field, value) != value:  # (as the simulator's variants: the last one is not taken)
            raise ConfigError(
                f"{where}: two values for {name}'s {POLICY_FIELD}{field}, {given[field]!r} and {value!r}; give one"
            )
        fields[field] = variant_value(value)
        items.append(item)
    names = [r[0] for r in runs]
    if not names:
        raise ConfigError(f"{where} is empty")
    out = []
    for k, (name, fields, items, _) in enumerate(runs):
        own = [i[len(POLICY_FIELD) :] for i in items] if names.count(name) > 1 else []
        lw = layerwise.get(k, (None, ""))[0]
        if lw is not None:  # (always in the label: a Basic-prefill run is never labelled as the policy's own)
            own.append(f"{LAYERWISE_ITEM}={str(lw).lower()}")
        label = f"{name}[{','.join(own)}]" if own else name
        out.append(PolicyRun(name, fields, tuple(items), label, lw))
    labels = [r.label for r in out]
    for r in out:  # (their result files and store directories would be one another's)
        if labels.count(r.label) > 1:
            same = f"with the same fields ({', '.join(r.items)})" if r.items else "with its defaults"
            raise ConfigError(
                f"{where} runs {r.name!r} twice {same}: {','.join(labels)}; give each run of a policy its own "
                f"{POLICY_FIELD}NAME=value items"
            )
    files = [r.file_label for r in out]
    for r in out:
        if files.count(r.file_label) > 1:  # (two labels that differ only in characters a file name cannot hold)
            raise ConfigError(
                f"{where}: runs {', '.join(labels)} would share the result file turns_{r.file_label}.json"
            )
    return out


def _layerwise_item(runs: list, layerwise: dict, item: str, value: str, where: str) -> None:
    """A `layerwise=true|false` item of `parse_policy_list`: the prefill of the run named before it."""
    from dualpath_jax.checks import variant_value

    if not runs:
        raise ConfigError(
            f"{where} item {item!r} comes before any policy name: it sets the prefill of the policy named before it "
            f"(e.g. basic,{LAYERWISE_ITEM}=false,dualpath)"
        )
    v = variant_value(value)
    if not isinstance(v, bool):
        raise ConfigError(
            f"{where} item {item!r}: {LAYERWISE_ITEM} is true or false (false: the paper's Basic prefill, the whole "
            f"hit KV in the PE before its first layer), got {value!r}"
        )
    k = len(runs) - 1
    if layerwise.setdefault(k, (v, item))[0] != v:
        raise ConfigError(f"{where}: two values for {runs[k][0]}'s {LAYERWISE_ITEM}, {layerwise[k][1]!r} and {item!r}")


def check_policy_run(
    run: PolicyRun,
    shared: Mapping[str, Any],
    block_size: int,
    where: str = "--config.policies",
    shared_where: str = "config.runtime.scheduler.policy_kwargs",
    block_where: str = "config.runtime.block_size",
):
    """The Config of `run`'s policy with `shared` (the fields given to every policy of the list) and its own fields
    over them; a ConfigError naming the policy, and the item or `shared_where` that gave what it refuses."""
    import schedulers
    from schedulers.registry import POLICIES, build_config, config_fields

    try:
        cls = POLICIES.get(run.name)
    except KeyError as e:
        raise ConfigError(f"{where}: {e.args[0]}") from None
    own = f"{where} item{'s' if len(run.items) > 1 else ''} {', '.join(run.items)} of {run.name!r}"
    fields = config_fields(cls)
    if fields is not None:  # (none: build_config below names the missing Config)
        for given, what, hint in (
            (shared, f"{shared_where} {dict(shared)} goes to every policy of {where}", True),
            (run.fields, own, False),
        ):
            unknown = sorted(set(given) - fields)
            if unknown:
                raise ConfigError(
                    f"{what}: {run.name!r} does not take {unknown}; its config fields are: {sorted(fields)}"
                    + (f" (give a policy's own fields as items after its name: {where}=...,NAME,policy.FIELD=value)"
                       if hint else "")
                )  # fmt: skip
    try:
        config = build_config(cls, run.name, **{**shared, **run.fields})
    except (KeyError, TypeError, ValueError) as e:  # (no Config: the class; a value refused: the fields given)
        text = e.args[0] if isinstance(e, KeyError) else str(e)
        if not (shared or run.fields):
            raise ConfigError(f"{where}: {text}") from None
        blame = own if run.fields else shared_where
        rest = {k: v for k, v in shared.items() if k not in run.fields}
        if run.fields and rest:  # a value of the shared mapping the policy refuses without its own items: that one's
            try:
                build_config(cls, run.name, **rest)
            except (KeyError, TypeError, ValueError):
                blame = shared_where
        raise ConfigError(f"{blame}: {text}") from None
    try:  # (the class itself: one that cannot be built, or is no policy)
        schedulers.make_policy(run.name, config)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
    if run.fields.get("block_size", block_size) != block_size:  # (as `validate` does for the shared fields)
        raise ConfigError(
            f"{own}: block_size {run.fields['block_size']!r} differs from {block_where}={block_size}, the size of "
            f"the blocks the runtime stores and reads: leave it out (it defaults to {block_where})"
        )
    return config


def unreachable_main(cfg: RuntimeConfig, cls: Any) -> bool:
    """Whether `cls` (a batcher or transport class registered by the driver) is defined in its `__main__` where the
    node processes of `config.launcher` cannot import it: never with `ray` (actors); with `local` unless `__main__` is a
    file or module its spawned nodes re-run (as `__mp_main__`; not `python -c`'s, not a notebook's). The nodes import
    the registering module otherwise (`launcher.batcher_modules` / `transport_modules`)."""
    if cfg.launcher == "inprocess" or getattr(cls, "__module__", None) not in MAIN_MODULES:
        return False
    main = sys.modules.get("__main__")
    rerun = getattr(main, "__file__", None) or getattr(getattr(main, "__spec__", None), "name", None)
    return cfg.launcher != "local" or not rerun


def _validate_netns(cfg: RuntimeConfig) -> None:
    """`config.netns`: node processes of the local launcher in the namespaces of experiments/netns_cluster.sh, their
    TCP endpoints bound to the namespaces' compute veths (runtime/netns.py), which must be up and shaped at
    `config.nics.cnic_bytes_per_s`. Every miss in one error (they came one failed run at a time)."""
    from dualpath_jax.runtime import netns

    misses = []
    if cfg.launcher != "local":
        misses.append(f"config.netns needs config.launcher='local' (node processes on this host), got {cfg.launcher!r}")
    if cfg.transport != "tcp":
        misses.append(
            f"config.netns needs config.transport='tcp' (its sockets cross the namespaces' veths), got {cfg.transport!r}"
        )
    reason = netns.unavailable_reason(cfg)  # (root, the namespaces, their CNIC rate: not the launcher's or transport's)
    if reason is not None:
        misses.append(f"config.netns cannot run here: {reason}")
    if misses:
        raise ConfigError("; ".join(misses))


def endpoints_get_run_secret(cfg: RuntimeConfig) -> bool:
    """Whether the launcher gives `cfg`'s endpoints the run's secret (peers prove it at connect): always with `ray` and
    `config.netns` (non-loopback binds; `transport_options` may not set it), and with the other launchers for 'tcp',
    'rdma' and a backend of one's own whose class takes a `secret` keyword (by name: a `**kwargs` class may not know
    it), unless `transport_options` gives a 'secret' of its own (`launcher._transport_factory`). Their endpoints
    listen on 127.0.0.1, which every local user reaches: without a secret any local process could write into an
    engine's host buffer and send it messages."""
    if cfg.launcher == "ray" or cfg.netns:
        return True
    return "secret" not in cfg.transport_options and _takes_secret(cfg.transport)


def _takes_secret(backend: str) -> bool:
    """The transport `backend` proves a secret at connect: tcp, rdma, or a registered class of one's own that names a
    `secret` parameter (False: inproc, unknown, or no signature)."""
    from dualpath_jax.checks import keyword_fit
    from transport import TRANSPORTS

    if backend in ("tcp", "rdma"):
        return True
    if backend == "inproc":
        return False
    try:
        cls = TRANSPORTS.get(backend)
    except KeyError:
        return False
    fit = keyword_fit(cls, ["secret"])
    return fit is not None and "secret" in fit[2]


def launcher_endpoint_fields(cfg: RuntimeConfig) -> tuple[str, ...]:
    """The fields of `cfg`'s endpoints that its launcher sets (`launcher.endpoint_spec`), not `transport_options`.
    (The run's secret that tcp / rdma endpoints (and one's own that take `secret`) of the `local` and `inprocess`
    launchers get is not one of them:
    `transport_options` may override it, `endpoints_get_run_secret`.)"""
    given = ["backend", "name", "pacer"]
    if cfg.transport == "inproc":
        given.append("fabric")
    if cfg.launcher == "ray" or cfg.netns:
        given += ["host", "secret"]
    if cfg.transport == "rdma":
        given += list(_RDMA_FIELDS)
    return tuple(given)


def _validate_transport_options(cfg: RuntimeConfig, cls) -> None:
    """`config.transport_options`: string keys, none that the launcher sets, each a field of the backend's class."""
    from dualpath_jax.checks import keyword_fit

    opts = cfg.transport_options
    bad = [k for k in opts if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"config.transport_options: keys must be field names (str), got {bad!r}")
    given = launcher_endpoint_fields(cfg)
    clash = [k for k in opts if k in given]
    if clash:
        where = "config.rdma" if cfg.transport == "rdma" and set(clash) & set(_RDMA_FIELDS) else "the launcher"
        raise ConfigError(
            f"config.transport_options sets {', '.join(clash)}, which {where} sets for every endpoint "
            f"({', '.join(given)})"
        )
    secret = opts.get("secret")
    if _takes_secret(cfg.transport) and "secret" in opts and not (isinstance(secret, (str, bytes)) and secret):
        raise ConfigError(
            f"config.transport_options secret={secret!r}: a secret must be a non-empty string; leave it out and the "
            "launcher gives every endpoint the run's own"
        )
    run_secret = ["secret"] if endpoints_get_run_secret(cfg) and "secret" not in given else []
    fit = keyword_fit(cls, [*given[1:], *run_secret, *opts])  # (backend: make_transport's, not the class's)
    if fit is None or not opts:
        return
    takes_not, _, takes = fit
    unknown = [k for k in opts if k in takes_not]
    if unknown:
        own = sorted(set(takes) - set(given))
        raise ConfigError(
            f"config.transport_options: {getattr(cls, '__name__', cls)} ({cfg.transport!r}) takes no "
            f"{', '.join(unknown)}; its other fields: {', '.join(own) or 'none'}"
        )
    _check_fixed_tcp_port(cfg)


def _check_fixed_tcp_port(cfg: RuntimeConfig) -> None:
    """A fixed TCP `port` (`transport_options`) is bound by every engine's endpoint: where two of them share a host
    (every launcher but `ray` without netns; with netns, a node's engines) the second one's bind fails, whether the port
    was free or not (each node process died with "Address already in use" tracebacks, the run failed ~20 s later)."""
    port = cfg.transport_options.get("port", 0)
    if cfg.transport != "tcp" or not port or cfg.launcher == "ray":  # (ray: which hosts is not known here)
        return
    c = cfg.cluster
    if cfg.netns and cfg.launcher == "local":
        share, where = c.engines_per_node, "of a node (its network namespace)"
    else:
        share, where = (c.prefill_nodes + c.decode_nodes) * c.engines_per_node, f"of the {cfg.launcher!r} launcher"
    if share > 1:
        raise ConfigError(
            f"config.transport_options port={port!r}: the {share} TCP endpoints {where} all bind on one host, so "
            "each would take that port and all but one fail; leave port out (0: each endpoint its own)"
        )


def _validate_transport(cfg: RuntimeConfig) -> None:
    """`config.transport` is a registered backend (the built-ins, or one of one's own) that the launchers can build:
    `make_transport({"backend": ..., "name": ...}, pacer=...)` (`launcher.endpoint_spec`; rdma adds `config.rdma`, the
    `ray` launcher `host` and `secret`), in node processes that know it: the `local` and `ray` launchers' nodes import
    the module that registered it (`launcher.transport_modules`, as `launcher.batcher_modules` for a batcher), which
    a class of the driver's `__main__` is not (the `local` launcher's spawned nodes re-run a script's `__main__`)."""
    from dualpath_jax.checks import keyword_fit
    from transport import TRANSPORTS  # (registers the built-ins; no pyverbs, no jax)

    try:
        cls = TRANSPORTS.get(cfg.transport)
    except KeyError as e:  # (was checked against TRANSPORT_NAMES: no backend of one's own could be named)
        hint = e.args[0].partition(repr(cfg.transport))[2]  # " (did you mean 'tcp'?); known: ..."
        raise ConfigError(f"config.transport {cfg.transport!r} unknown{hint}") from None
    _validate_transport_options(cfg, cls)
    if cfg.transport in TRANSPORT_NAMES:
        return
    cls_name = getattr(cls, "__name__", repr(cls))
    if cfg.launcher != "inprocess" and not getattr(cls, "crosses_processes", True):
        raise ConfigError(
            f"config.transport {cfg.transport!r} ({cls_name}, crosses_processes=False) needs "
            "config.launcher='inprocess': as 'inproc', its endpoints reach only the endpoints of their own process"
        )
    if unreachable_main(cfg, cls):
        raise ConfigError(
            f"config.transport {cfg.transport!r} is registered in __main__ ({cls!r}), which the "
            f"{cfg.launcher!r} launcher's node processes cannot import: register it in an importable module "
            "(e.g. my_transports.py on the path, imported by your script or config file)"
        )
    given = ("name", "pacer", "host", "secret") if cfg.launcher == "ray" else ("name", "pacer")
    fit = keyword_fit(cls, [*given, *cfg.transport_options])  # (a required field may come from transport_options)
    if fit is None:  # (no signature: nothing to check before the launchers build it)
        return
    takes_not, needs, _ = fit
    lacks = [f"also needs: {', '.join(needs)}"] if needs else []
    lacks += [f"takes no {arg}= argument" for arg in takes_not]
    if lacks:
        builders = "the 'ray' launcher builds" if cfg.launcher == "ray" else "the launchers build"
        raise ConfigError(
            f"config.transport {cfg.transport!r}: {builders} each endpoint from its {', '.join(given[:-1])} and "
            f"{given[-1]} (and config.transport_options) only, and {cls_name} {'; '.join(lacks)}"
            + (" (config.transport_options gives other fields)" if needs else "")
        )


def _validate_store(cfg: RuntimeConfig) -> None:
    """`config.store` is a registered KV store ("local_dir", or one of one's own) that the launchers can open:
    `make_store({"name": store, "root": store_dir, **store_options}, layout)` (`launcher.open_store`), in the driver
    and in node processes that know it: the `local` and `ray` launchers' nodes import the module that registered it
    (`launcher.store_modules`), which a class of the driver's `__main__` is not (as for `config.transport`); a store
    whose objects share blocks only within one process (`crosses_processes = False`) needs launcher 'inprocess'."""
    import difflib

    from dualpath_jax.store import STORES, KVStore, store_options_fit  # (registers local_dir; no jax)

    try:
        cls = STORES.get(cfg.store)
    except KeyError as e:
        hint = e.args[0].partition(repr(cfg.store))[2]  # " (did you mean 'local_dir'?); known: ..."
        raise ConfigError(f"config.store {cfg.store!r} unknown{hint}") from None
    cls_name = getattr(cls, "__name__", repr(cls))
    if not (isinstance(cls, type) and issubclass(cls, KVStore)):
        raise ConfigError(f"config.store {cfg.store!r} is registered as {cls!r}, not a dualpath_jax.store.KVStore")
    options = cfg.store_options
    if any(not isinstance(k, str) for k in options):
        raise ConfigError(f"config.store_options: option names must be strings, got {sorted(map(repr, options))}")
    ours = [k for k in ("name", "root", "layout") if k in options]
    if ours:
        raise ConfigError(
            f"config.store_options {ours}: the runtime gives these itself (name: config.store; root: config.store_dir, "
            "a fresh temporary directory per run when ''; layout: the model's KV layout)"
        )
    if cfg.launcher != "inprocess" and not getattr(cls, "crosses_processes", True):
        raise ConfigError(
            f"config.store {cfg.store!r} ({cls_name}, crosses_processes=False) needs config.launcher='inprocess': its "
            "store objects share blocks only within one process, and the driver's lookups and each node's reads and "
            "write-backs use objects of their own"
        )
    if unreachable_main(cfg, cls):
        raise ConfigError(
            f"config.store {cfg.store!r} is registered in __main__ ({cls!r}), which the {cfg.launcher!r} launcher's "
            "node processes cannot import: register it in an importable module (e.g. my_stores.py on the path, "
            "imported by your script or config file)"
        )
    fit = store_options_fit(cls, ["root", *options])
    if fit is None:  # (a from_config of its own: it says what it refuses when the run opens the store)
        return
    unknown, missing, takes = fit
    if "root" in unknown or "layout" in unknown:
        lacks = [f"takes no {a}= keyword" for a in ("root", "layout") if a in unknown]
        raise ConfigError(
            f"config.store {cfg.store!r}: the runtime opens every store with root=config.store_dir and the model's "
            f"layout, and {cls_name} {' and '.join(lacks)} (it takes: {', '.join(takes)})"
        )
    if unknown:
        close = [difflib.get_close_matches(k, takes, n=1) for k in unknown]
        hints = "".join(f" (did you mean {c[0]!r} for {k!r}?)" for k, c in zip(unknown, close, strict=True) if c)
        raise ConfigError(
            f"config.store_options: store {cfg.store!r} ({cls_name}) takes no option(s) {unknown}{hints}; its options: "
            f"{', '.join(t for t in takes if t != 'root')}"
        )
    if missing:
        raise ConfigError(f"config.store_options: store {cfg.store!r} ({cls_name}) needs option(s) {missing}")


# `transport.rdma.RdmaTransport` argument -> its field of `config.rdma`
_RDMA_FIELDS = {
    "device": "device",
    "ib_port": "port",
    "gid_index": "gid_index",
    "sl_high": "sl_high",
    "sl_low": "sl_low",
}


def rdma_endpoint_kwargs(cfg: RuntimeConfig) -> dict[str, Any]:
    """`config.rdma` as `RdmaTransport` arguments (what the launchers pass to every rdma endpoint)."""
    kw = {arg: getattr(cfg.rdma, field) for arg, field in _RDMA_FIELDS.items()}
    kw["device"] = kw["device"] or None  # "" = the first device
    return kw


def _validate_rdma_fields(cfg: RuntimeConfig) -> None:
    """Types and ranges of `config.rdma` (on every host and transport: no pyverbs needed)."""
    from transport.rdma import RdmaConfigError, check_rdma_args  # (no pyverbs import)

    try:
        check_rdma_args(**rdma_endpoint_kwargs(cfg))
    except RdmaConfigError as e:
        raise ConfigError(_rdma_config_message(cfg, e)) from None


def _validate_rdma_device(cfg: RuntimeConfig) -> None:
    """Device, port and GID of `config.rdma` on this host (transport 'rdma', pyverbs and a device present), and
    the locked-memory limit the registered host buffers need."""
    from transport.rdma import RdmaConfigError, check_rdma_device

    kw = rdma_endpoint_kwargs(cfg)
    try:
        check_rdma_device(kw["device"], kw["ib_port"], kw["gid_index"])
    except RdmaConfigError as e:
        raise ConfigError(_rdma_config_message(cfg, e)) from None
    except Exception as e:  # noqa: BLE001 - a verbs error (e.g. no permission on /dev/infiniband): one line too
        raise ConfigError(f"config.rdma: cannot query RDMA device {kw['device'] or '(the first)'}: {e}") from None
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    # (root: CAP_IPC_LOCK, no limit applies; Ray: the nodes run on other hosts, under their own limits)
    if soft == resource.RLIM_INFINITY or os.geteuid() == 0 or cfg.launcher not in ("local", "inprocess"):
        return
    per_process = _buffer_bytes_per_process(cfg)
    if per_process > soft:
        raise ConfigError(
            f"config.buffers: the RDMA endpoints register (pin) {per_process} B of host buffers per process "
            f"({_buffer_sum_text(cfg, in_one_process=True)}) but the locked-memory limit is {soft} B: raise "
            "`ulimit -l` (memlock in /etc/security/limits.conf) or lower config.buffers.*_bytes"
        )


def _rdma_config_message(cfg: RuntimeConfig, e) -> str:
    """An `RdmaConfigError` of the transport's argument `e.arg`, told as the `config.rdma` field it came from."""
    field = _RDMA_FIELDS.get(e.arg, e.arg)
    msg = str(e).removeprefix("rdma: ")
    if msg.startswith(f"{e.arg} "):  # "ib_port must be ..." -> "config.rdma.port must be ..."
        return f"config.rdma.{field} {msg[len(e.arg) + 1 :]}"
    return f"config.rdma.{field}={getattr(cfg.rdma, field, None)!r}: {msg}"


def _cgroup_memory_limit_files() -> list[str]:
    """The memory limit files of this process's own cgroup and of its ancestors (v2 `memory.max`, v1
    `memory.limit_in_bytes`, from /proc/self/cgroup), then the mount's root ones: a nested limit is the smallest.
    (Only the root's were read: a limit set on a v1 cgroup below the root was missed.)"""
    roots = [("/sys/fs/cgroup", "memory.max"), ("/sys/fs/cgroup/memory", "memory.limit_in_bytes")]
    paths = []
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, cgroup = (line.split(":", 2) + ["", ""])[:3]
        base, name = roots[0] if controllers == "" else roots[1] if "memory" in controllers.split(",") else ("", "")
        parts = [p for p in cgroup.split("/") if p and p not in (".", "..")]
        if base:
            paths += [os.path.join(base, *parts[:i], name) for i in range(len(parts), 0, -1)]
    paths += [os.path.join(base, name) for base, name in roots]
    return list(dict.fromkeys(paths))


def host_memory_bytes() -> tuple[int, str] | None:
    """(bytes, what) of the memory this host can hold: physical memory, or a smaller cgroup memory limit
    (a container's: the smallest of this process's cgroup and its ancestors'); None where neither can be read."""
    try:
        limit, what = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "this host's physical memory"
    except (ValueError, OSError):
        return None
    for path in _cgroup_memory_limit_files():
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < limit:
            limit, what = int(text), f"the cgroup memory limit ({path})"
    return (limit, what) if limit > 0 else None


def _address_space_check(cfg: RuntimeConfig) -> None:
    """The host buffers one node process maps against its address-space limit (RLIMIT_AS, `ulimit -v`; the
    inprocess launcher's process maps them on top of what it maps already): over it, the run loaded the model and
    then failed mapping a buffer ("cannot map ... Cannot allocate memory"), without naming the limit."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY or cfg.launcher not in ("local", "inprocess"):
        return
    need, mapped = _buffer_bytes_per_process(cfg), 0
    if cfg.launcher == "inprocess":
        try:
            with open("/proc/self/statm") as f:
                mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            mapped = 0
    if need + mapped > soft:
        also = f", on top of the {mapped} B this process maps already" if mapped else ""
        raise ConfigError(
            f"config.buffers: a node process maps {need} B ({need / 2**30:.1f} GiB) of host buffers "
            f"({_buffer_sum_text(cfg, in_one_process=True)}){also}, more than its address-space limit RLIMIT_AS "
            f"{soft} B ({soft / 2**30:.1f} GiB): raise `ulimit -v` or lower config.buffers.pe_buffer_bytes / "
            "de_buffer_bytes"
        )


def _buffer_bytes_per_process(cfg: RuntimeConfig) -> int:
    """Host buffer bytes one process allocates: every node's with the inprocess launcher, the largest node's else."""
    b = cfg.buffers
    return _all_buffer_bytes(cfg) if cfg.launcher == "inprocess" else max(b.pe_buffer_bytes, b.de_buffer_bytes)


def _all_buffer_bytes(cfg: RuntimeConfig) -> int:
    """Host buffer bytes of every node together."""
    c, b = cfg.cluster, cfg.buffers
    return c.prefill_nodes * b.pe_buffer_bytes + c.decode_nodes * b.de_buffer_bytes


def _buffer_sum_text(cfg: RuntimeConfig, in_one_process: bool = False) -> str:
    c, b = cfg.cluster, cfg.buffers
    if in_one_process and cfg.launcher != "inprocess":
        return f"one node's buffer (launcher {cfg.launcher!r}: one process per node)"
    return (
        f"{c.prefill_nodes} PE node(s) x pe_buffer_bytes={b.pe_buffer_bytes} + {c.decode_nodes} DE node(s) x "
        f"de_buffer_bytes={b.de_buffer_bytes}"
    )


def _validate_buffer_memory(cfg: RuntimeConfig) -> None:
    """Host buffers: at least 1 B, and (local/inprocess launchers: every node runs on this host) no more than this
    host's memory holds, one node's and all nodes' together. Each node maps its buffer at start, so one that can
    never fit stopped the node with ENOMEM (a traceback in the node process) instead of this line. (With Ray the
    nodes run on other hosts, whose memory is not known here: not checked.)"""
    b = cfg.buffers
    for name in ("pe_buffer_bytes", "de_buffer_bytes"):
        if getattr(b, name) < 1:
            raise ConfigError(f"config.buffers.{name} must be >= 1 B, got {getattr(b, name)}")
    _address_space_check(cfg)
    mem = _this_host_memory(cfg)
    if mem is None:
        return
    limit, what = mem
    for name in ("pe_buffer_bytes", "de_buffer_bytes"):
        have = getattr(b, name)
        if have > limit:
            raise ConfigError(
                f"config.buffers.{name}={have} B ({have / 2**30:.1f} GiB) is more than {what}: "
                f"{limit} B ({limit / 2**30:.1f} GiB); one node's buffer can never be allocated"
            )
    c = cfg.cluster
    total = _all_buffer_bytes(cfg)
    if total > limit:
        raise ConfigError(
            f"config.buffers: the {c.prefill_nodes + c.decode_nodes} nodes of launcher {cfg.launcher!r} all run on "
            f"this host and need {total} B ({total / 2**30:.1f} GiB) of host buffers together "
            f"({_buffer_sum_text(cfg)}), more than {what}: {limit} B ({limit / 2**30:.1f} GiB); lower "
            "config.buffers.pe_buffer_bytes / de_buffer_bytes or use launcher 'ray' over several hosts"
        )


def _this_host_memory(cfg: RuntimeConfig) -> tuple[int, str] | None:
    """(bytes, what limits them) of this host's memory where the launcher runs every node here (local, inprocess);
    None otherwise (Ray: other hosts, whose memory is not known here) or where it cannot be told."""
    if cfg.launcher not in ("local", "inprocess"):
        return None
    return host_memory_bytes()


def _validate_decode_cache_memory(cfg: RuntimeConfig, kv_bytes_per_token: int, weight_bytes=0) -> None:
    """`check_decode_cache_memory` (and, given the model's `weight_bytes`, `check_device_memory`) with this host's
    numbers, where the launcher runs every node here (local, inprocess). (With Ray the nodes run on other hosts: not
    checked.)"""
    if cfg.launcher not in ("local", "inprocess"):
        return
    backend, device_bytes = _decode_cache_device()
    devices = 1 if backend == "cpu" else _local_device_count()
    check_decode_cache_memory(cfg, kv_bytes_per_token, backend, device_bytes, host_memory_bytes(), devices)
    if weight_bytes and backend != "cpu" and device_bytes is not None:  # (a callable: computed only here)
        w = weight_bytes() if callable(weight_bytes) else weight_bytes
        check_device_memory(cfg, kv_bytes_per_token, w, backend, device_bytes, devices)


def weight_copies_per_device(cfg: RuntimeConfig, devices: int) -> list[int]:
    """Copies of the model's weights on each of this host's `devices` accelerators, every node here: each node
    process of the local launcher holds one on each device its own engines use (`node.node_model_ops`,
    `engine_models`: engine e on device e % devices), the inprocess launcher's one process one on each device any
    engine uses."""
    c = cfg.cluster
    n, g = c.prefill_nodes + c.decode_nodes, c.engines_per_node
    groups = [range(0, n * g)] if cfg.launcher == "inprocess" else [range(i * g, (i + 1) * g) for i in range(n)]
    copies = [0] * devices
    for ids in groups:
        for d in {e % devices for e in ids}:
            copies[d] += 1
    return copies


def check_device_memory(
    cfg: RuntimeConfig, kv_bytes_per_token: int, weight_bytes: int, backend: str, device_bytes: int, devices: int = 1
) -> None:
    """On an accelerator: the weights' copies (`weight_copies_per_device`) and the decode caches of the decode
    engines (`decode_slots` x `max_seq_len` tokens each) that share one device, together, no more than its memory
    for JAX (`device_bytes`, the default device's `bytes_limit`; the devices alike). Each node process of the local
    launcher makes its own copy of the weights, so three nodes of a 28 GB model on one 80 GB GPU stopped in a node
    with RESOURCE_EXHAUSTED ("no live engine left") instead of this line, which names the inprocess launcher (one
    copy for every engine). A lower bound: prefill activations and compiled code come on top."""
    c = cfg.cluster
    copies = weight_copies_per_device(cfg, devices)
    caches = decode_engines_on_devices(cfg, devices)
    cache = c.decode_slots * c.max_seq_len * kv_bytes_per_token
    need = [w * weight_bytes + k * cache for w, k in zip(copies, caches, strict=True)]
    d = max(range(devices), key=need.__getitem__)
    if need[d] <= device_bytes:
        return
    where = f"this host's {backend} device" if devices == 1 else f"{backend} device {d} of this host's {devices}"
    hint = (
        "use launcher 'inprocess' (one copy of the weights for every engine), "
        if cfg.launcher == "local" and copies[d] > 1
        else ""
    )
    raise ConfigError(
        f"config.cluster: {where} would hold {copies[d]} copies of the model's weights ({weight_bytes} B each; "
        f"launcher {cfg.launcher!r}: {'one per node process with an engine there' if cfg.launcher == 'local' else 'one'}"
        f") and {caches[d]} decode cache(s) (decode_slots={c.decode_slots} x max_seq_len={c.max_seq_len} tokens x "
        f"{kv_bytes_per_token} B/token = {cache} B each): {need[d]} B ({need[d] / 2**30:.1f} GiB), more than its "
        f"memory for JAX: {device_bytes} B ({device_bytes / 2**30:.1f} GiB; memory_stats bytes_limit); {hint}fewer "
        "nodes on this host, or lower config.cluster.decode_slots or max_seq_len"
    )


def _local_device_count() -> int:
    import jax

    return jax.local_device_count()


def decode_engines_on_devices(cfg: RuntimeConfig, devices: int) -> list[int]:
    """The decode engines on each of `devices` local accelerators, every node on this host (engine e on device
    e % devices, `node.engine_device`; decode engines are numbered after the prefill ones)."""
    c = cfg.cluster
    first = c.prefill_nodes * c.engines_per_node
    out = [0] * devices
    for e in range(first, first + c.decode_nodes * c.engines_per_node):
        out[e % devices] += 1
    return out


def decode_engines_per_device(cfg: RuntimeConfig, devices: int) -> int:
    """The most decode engines that share one of `devices` local accelerators (`decode_engines_on_devices`)."""
    return max(decode_engines_on_devices(cfg, devices))


def check_decode_cache_memory(
    cfg: RuntimeConfig,
    kv_bytes_per_token: int,
    backend: str,
    device_bytes: int | None,
    host: tuple[int, str] | None,
    devices: int = 1,
) -> None:
    """One decode engine's batch cache (decode_slots x max_seq_len tokens of every layer's KV, allocated when its
    node starts), and every decode engine's together (all on this host), no more than the memory that holds them. On
    XLA:CPU (`backend` "cpu") that is this host's (`host`: (bytes, what), None where unknown), beside every node's host
    buffers; on an accelerator the default device's, where every engine of this host allocates (`device_bytes`: its
    allocator's limit; None: not checked, a debug line; with `devices` accelerators, alike, the engines are spread over
    them, `decode_engines_per_device`, and the most that share one must fit in it). They were compared with this host's memory on an accelerator
    too. One that can never fit stopped the node with RESOURCE_EXHAUSTED (a traceback in the node process, then "no
    live engine left") instead of this line. No I/O: `_validate_decode_cache_memory` passes this host's numbers."""
    if backend == "cpu":
        mem, where = host, "this host"
    elif device_bytes is None:
        log.debug("decode caches not checked against memory: the %s device reports no memory limit", backend)
        return
    else:
        mem = device_bytes, f"the default {backend} device's memory for JAX (memory_stats bytes_limit)"
        where = f"this host's default {backend} device"
    if mem is None:
        return
    limit, what = mem
    c = cfg.cluster
    need = c.decode_slots * c.max_seq_len * kv_bytes_per_token
    if need > limit:
        raise ConfigError(
            f"config.cluster.decode_slots={c.decode_slots} x config.cluster.max_seq_len={c.max_seq_len} tokens x "
            f"{kv_bytes_per_token} B/token (the model's KV, all layers) = {need} B ({need / 2**30:.1f} GiB) of decode "
            f"cache per decode engine is more than {what}: {limit} B ({limit / 2**30:.1f} GiB); lower "
            "config.cluster.decode_slots or max_seq_len"
        )
    engines = c.decode_nodes * c.engines_per_node  # (all on this host: each allocates its cache at its start)
    if backend != "cpu" and devices > 1:  # (they were all counted against one device)
        engines = decode_engines_per_device(cfg, devices)
        where = f"one of this host's {devices} {backend} devices (engine e on device e % {devices})"
    if engines > 1 and engines * need > limit:  # (one engine's fitting was all that was checked)
        raise ConfigError(
            f"config.cluster: the {engines} decode engines of launcher {cfg.launcher!r} all run on {where} and need "
            f"{engines * need} B ({engines * need / 2**30:.1f} GiB) of decode cache together ({engines} x decode_slots="
            f"{c.decode_slots} x max_seq_len={c.max_seq_len} tokens x {kv_bytes_per_token} B/token), more than {what}: "
            f"{limit} B ({limit / 2**30:.1f} GiB); lower config.cluster.decode_slots or max_seq_len, or use launcher "
            "'ray' over several hosts"
        )
    buffers = _all_buffer_bytes(cfg)  # (each half was checked alone: their sum passed where it could never fit)
    if backend == "cpu" and buffers + engines * need > limit:
        total = buffers + engines * need
        raise ConfigError(
            f"config.buffers and config.cluster: the {c.prefill_nodes + c.decode_nodes} nodes of launcher "
            f"{cfg.launcher!r} all run on this host and need {buffers} B of host buffers ({_buffer_sum_text(cfg)}) and "
            f"{engines * need} B of decode caches ({engines} decode engine(s) x decode_slots={c.decode_slots} x "
            f"max_seq_len={c.max_seq_len} tokens x {kv_bytes_per_token} B/token, host memory on XLA:CPU), {total} B "
            f"({total / 2**30:.1f} GiB) together, more than {what}: {limit} B ({limit / 2**30:.1f} GiB); lower "
            "config.buffers.pe_buffer_bytes / de_buffer_bytes or config.cluster.decode_slots / max_seq_len, or use "
            "launcher 'ray' over several hosts"
        )


def _decode_cache_device() -> tuple[str, int | None]:
    """(backend, bytes) of the device the decode caches are allocated on, JAX's default: "cpu" (XLA:CPU: this host's
    memory, no limit of its own) or an accelerator's backend ("gpu", "tpu") with the memory its allocator may hand
    out (`memory_stats()["bytes_limit"]`; a GPU's: 75% of it under XLA's default preallocation), None where the
    device reports none. (Called from `validate` with the model's KV size: `driver.prepare`, which builds the model
    next.)"""
    import jax

    backend = jax.default_backend()
    if backend == "cpu":
        return backend, None
    limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    return backend, int(limit) if limit else None


_WARNED: set = set()
UNPACED_BYTES_PER_S = 1e11  # NIC caps at or above this are "unpaced" (no emulated ratio)


def _warn_pd_range(cfg: RuntimeConfig) -> None:
    """PAPER.md "Bottleneck-free P/D range": outside it one link saturates first (a warning, not an error)."""
    if max(cfg.nics.snic_bytes_per_s, cfg.nics.cnic_bytes_per_s) >= UNPACED_BYTES_PER_S:
        # links not emulated (warm-up runs, real NICs): no ratio to check. Either one: a ratio against an unpaced
        # link means nothing (a netns run's warm-up, unpaced SNIC against the kernel-kept CNIC, warned s=31250)
        return
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
            "P/D = %d/%d = %.3f is outside %s for g=%d, s=%.3f (PAPER.md): a NIC saturates before the GPUs once "
            "the workload is storage-bound (judged on the NIC rates' ratio alone)",
            cfg.cluster.prefill_nodes,
            cfg.cluster.decode_nodes,
            ratio,
            where,
            g,
            s,
        )
