"""Shared pieces of the simulator configs (configs/paper_*.py, configs/sim_*.py).

A variant string after the config file (`configs/paper_ds660b.py:VARIANT`) is a comma-separated list of
items: one mode name (basic | layerwise | dualpath_rr | dualpath | oracle, or any registered policy), or
`key=value` with key one of dataset, agents, aps, duration, pd (e.g. 1P2D), turns, seed, kind, warmup, append
(every synthetic append x this: PAPER.md's append x1..x3 experiment), trace (a trace file or name: the workload
replays it, kind=trace; not with aps= or dataset=), max_agents (a trace's first N sessions, each whole,
`workload.max_agents`), shared_hits (true / false: a trace's prefix hits across trajectories,
`workload.shared_prefix_hits`), or
`policy.NAME=value` / `batcher.NAME=value`: a field of the policy's / the batcher's Config
(`config.scheduler.kwargs` / `config.batcher.kwargs`; ints, floats, true/false, None/null and strings are told
apart), or `cluster.NAME=value`: a field of `config.cluster` (hardware and system: `cluster.snic_gbps=25`, a sweep's
load over NIC rates, GPUs per node, HBM, ...; rates in GB/s, a 200 Gbps NIC is 25).
`aps=X` makes the workload online (beside a `kind=` other than online it is an error). A run's launcher refuses an
item its workload kind does not use, by name (dualpath_jax.sim.configs_io.variant_fields): `duration=` (online
only), `warmup=` (online and trace: their SLO), `agents=` (offline only: an online run has aps x duration agents, a
trace its first `max_agents=` sessions), `max_agents=` (trace only).
Examples: `configs/paper_ds660b.py:basic,dataset=48K,agents=1024`,
`configs/paper_ds660b.py:dualpath_rr,policy.full_de=wait`, `configs/paper_ds660b.py:batcher.quota_s=0.2`.
"""

from __future__ import annotations

import difflib
import re

import ml_collections

from dualpath_jax.checks import variant_value

# Calibrated on the DS 660B 2P4D offline JCT table of PAPER.md only (see README notes and each paper
# config's docstring). The same values are used for every model and setup (Qwen: no DE reserve, see its
# config). Fitted by least squares on ln(sim/paper JCT) (experiments/reproduce_paper.py --table prints it).
CALIBRATED = dict(
    # 3FS saturates a 400 Gbps SNIC (PAPER.md): no derating of the line rate.
    storage_efficiency=1.0,
    # One request's read stream (3FS client reading its blocks) reaches this rate, and a node keeps this
    # many reads in flight: the SNIC is busy only when enough requests read at once. Basic is storage-bound
    # at ~15 GB/s per PE SNIC in the table (64K, 4096 agents: ~580 TB read in 19,280 s over two SNICs).
    read_stream_gbps=2.0,
    max_reads_per_node=9,
    # Multiplies the analytic prefill time of the shared cost model (which assumes 55% MFU). With the DE
    # bound below, the oracle column is prefill-bound only on the 32K dataset (2048/4096 agents: ~52-55
    # turns/s, ~0.29 s of PE time per turn); 48K and 64K are bound by DE HBM.
    pe_time_scale=2.9,
    # HBM per DE that holds neither weights nor KV (activations, EP buffers, graphs): DE KV space =
    # 0.9 * 80 GB - weights per DE (37.5 GB for DS 660B on 2P4D, EP 32) - 18.5 = 16 GB (~333K tokens).
    # Requests hold DE HBM from placement to the end of decode, so it caps the turns in flight and binds
    # the oracle column on 48K/64K (2048 agents: 2,957 / 4,844 s): throughput falls with context length
    # there (49.5 -> 40 turns/s at 4096 agents) while the analytic prefill cost per turn does not.
    de_hbm_reserve_gb=18.5,
    # Decode step multiplier: TPOT ~37 ms (the paper's DS 660B TPOT is 36-39 ms).
    de_time_scale=2.2,
    # HBM per PE for whole-prompt KV in basic (non-layerwise) prefill; it gates basic's reads in flight.
    # Fitted on the basic column (64K, 2048 agents: 5.0 -> 9,447 s, 4.0 -> 10,429 s, 3.5 -> 10,933 s; paper
    # 10,000); it also sets the layerwise ablation step (-18% at 4.0; paper -17%).
    pe_hbm_kv_gb=4.0,
)


def base_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.name = "sim"
    cfg.description = ""
    cfg.output_dir = "results/sim"
    cfg.mode = ""  # "" = scheduler.name with the cluster flags as set; else a bundle of sim.config.MODES
    cfg.seed = 0
    cfg.slo_ttft_s = 4.0
    cfg.slo_tpot_s = 0.050
    cfg.slo_percentile = 90.0
    cfg.warmup_s = 0.0
    cfg.scheduler = ml_collections.ConfigDict({"name": "dualpath", "kwargs": {}})
    cfg.batcher = ml_collections.ConfigDict({"name": "compute_quota", "kwargs": {}})
    c = ml_collections.ConfigDict()
    c.model = "ds660b"
    c.hardware = "h800"
    c.prefill_nodes = 2
    c.decode_nodes = 4
    c.gpus_per_node = 8  # g
    c.prefill_ep_nodes = 0  # nodes per EP group of the PEs / DEs (0: all the role's nodes form one group)
    c.decode_ep_nodes = 0
    c.decode_lockstep = False  # MoE DEs of one EP group step together (the slowest member's step time)
    c.snic_gbps = 50.0  # s*B in GB/s (1e9 bytes/s, not Gbps): a 400 Gbps NIC
    c.cnic_gbps = 50.0  # B in GB/s: a 400 Gbps NIC per GPU
    c.cnic_duplex = True  # separate inbound / outbound CNIC links of cnic_gbps each (False: one shared link)
    c.dram_gbps = 500.0  # M
    c.storage_gbps = 0.0  # no aggregate storage cap (3FS saturates every SNIC)
    c.host_buffer_gb = 80.0
    c.de_host_buffer_gb = ml_collections.config_dict.placeholder(float)  # DE nodes' buffer (None: host_buffer_gb)
    c.de_hbm_kv_gb = 0.0  # 0: derived (hbm_usable_fraction * HBM - weights per DE - de_hbm_reserve_gb)
    c.de_max_seqs = ml_collections.config_dict.placeholder(int)  # sequences a DE decodes at once (None: HBM only)
    c.store_capacity_gb = ml_collections.config_dict.placeholder(float)  # KV store GB, LRU (None: unbounded)
    c.hbm_usable_fraction = 0.9  # the serving engine's share of each GPU's HBM (vLLM's default 0.9)
    c.block_size = 64
    c.kv_bytes_per_token = 0.0  # 0: from the model shape
    c.collective_bytes_per_token = 0.0
    c.high_share = 0.99
    c.fetch_interval_s = 0.1
    c.fetch_window = 1024
    c.fetch_scope = "node"
    c.layerwise = True
    c.io_free = False
    c.writeback = True
    c.bucket_s = 10.0
    c.flow_coalesce_s = 1e-3  # flows finishing within this of one another finish together (one solve)
    for k, v in CALIBRATED.items():
        c[k] = v
    cfg.cluster = c
    w = ml_collections.ConfigDict()
    w.kind = "offline"
    w.dataset = "64K"
    w.n_agents = 2048
    w.aps = 0.2
    w.duration_s = 3600.0
    w.trace_path = ""
    w.max_agents = 0  # trace: >0 replays only its first that many trajectories (sessions)
    w.max_turns = 0
    w.max_context_tokens = 0  # >0: cut each trajectory before its first turn longer than this (e.g. 131072)
    w.append_scale = 1.0  # every synthetic append x this (PAPER.md's append x1..x3; variant item append=2)
    w.shared_prefix_hits = True  # trace: a turn also hits blocks other trajectories' prompts stored (their hashes)
    cfg.workload = w
    return cfg


_KEYS = {
    "dataset",
    "agents",
    "aps",
    "duration",
    "pd",
    "turns",
    "seed",
    "kind",
    "warmup",
    "append",
    "trace",
    "shared_hits",
    "max_agents",
}
_NUMBER_KEYS = {
    "agents": int,
    "max_agents": int,
    "aps": float,
    "duration": float,
    "turns": int,
    "seed": int,
    "warmup": float,
    "append": float,
}
_KIND_NAME = {int: "an integer", float: "a number"}


_TYPE_NAME = {bool: "true or false", str: "a string", **_KIND_NAME}  # (an int field given 2.5 said "a number")


def _set_cluster_field(cluster: ml_collections.ConfigDict, name: str, value: str, item: str) -> None:
    """`cluster.NAME=value`: set the existing field NAME of `cluster` (ValueError naming the item otherwise)."""
    if name not in cluster:  # (a ConfigDict takes a new key silently)
        close = difflib.get_close_matches(name, list(cluster.keys()), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(sorted(cluster.keys()))}"
        raise ValueError(f"config variant item {item!r}: config.cluster has no field {name!r}{hint}")
    new = variant_value(value)

    def wrong_type() -> ValueError:
        kind = cluster.get_ref(name).get_type()  # (a placeholder's too: de_host_buffer_gb holds None)
        what = _TYPE_NAME.get(kind, f"of type {kind.__name__}")
        return ValueError(f"config variant item {item!r}: config.cluster.{name} must be {what}, got {new!r}")

    # true / false for a number: ml_collections casts a bool to a float field (bool is an int), so
    # `cluster.de_host_buffer_gb=true` ran with a 1 GB buffer, silently (the --config.* flag refuses it)
    if isinstance(new, bool) and not isinstance(cluster[name], bool):
        if cluster[name] is not None or cluster.get_ref(name).get_type() is not bool:  # (a placeholder: its type)
            raise wrong_type()
    try:
        cluster[name] = new
    except TypeError:  # a value of another type than the field's (ml_collections casts int to float only)
        raise wrong_type() from None


def apply_variant(cfg: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Apply a variant string (see module docstring); unknown items are an error naming them."""
    if not arg:
        return cfg
    mode = ""
    # kind= and aps= as given: aps= with kind=offline ran offline or online by the order of the items
    kind_given = aps = trace_given = None
    file_trace = cfg.workload.kind == "trace"  # (a setup file that replays a trace: kind=trace before any item)
    given: dict[str, str] = {}  # key -> value as given
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            if mode and item != mode:  # the last one used to win silently
                raise ValueError(f"config variant {arg!r}: two modes, {mode!r} and {item!r}; give one")
            cfg.mode = mode = item
            continue
        key, value = item.split("=", 1)
        if given.setdefault(key, value) != value:  # the last one won silently (a sweep's loads all ran --extra's)
            raise ValueError(f"config variant {arg!r}: two values for {key}, {given[key]!r} and {value!r}; give one")
        if key.startswith("policy.") and len(key) > len("policy."):
            cfg.scheduler.kwargs[key[len("policy.") :]] = variant_value(value)
            continue
        if key.startswith("batcher.") and len(key) > len("batcher."):
            cfg.batcher.kwargs[key[len("batcher.") :]] = variant_value(value)
            continue
        if key.startswith("cluster.") and len(key) > len("cluster."):  # hardware and system fields: a sweep's load
            _set_cluster_field(cfg.cluster, key[len("cluster.") :], value, item)
            continue
        if key not in _KEYS:
            raise ValueError(
                f"config variant item {item!r}: unknown key {key!r}; known: {sorted(_KEYS)}, policy.NAME, batcher.NAME, "
                "cluster.NAME"
            )
        if key in _NUMBER_KEYS:
            kind = _NUMBER_KEYS[key]
            try:
                number = kind(value)
            except ValueError:
                raise ValueError(f"config variant item {item!r}: {key} must be {_KIND_NAME[kind]}") from None
        if key == "dataset":
            cfg.workload.dataset = value
        elif key == "agents":
            cfg.workload.n_agents = number
        elif key == "max_agents":  # (a trace's first N sessions; agents= is the synthetic agent count)
            cfg.workload.max_agents = number
        elif key == "aps":
            cfg.workload.aps = aps = number
        elif key == "duration":
            cfg.workload.duration_s = number
        elif key == "turns":
            cfg.workload.max_turns = number
        elif key == "seed":
            cfg.seed = number
        elif key == "kind":
            cfg.workload.kind = kind_given = value
        elif key == "warmup":
            cfg.warmup_s = number
        elif key == "append":
            cfg.workload.append_scale = number
        elif key == "trace":
            cfg.workload.trace_path = trace_given = value
        elif key == "shared_hits":
            if not isinstance(variant_value(value), bool):
                raise ValueError(f"config variant item {item!r}: shared_hits must be true or false")
            cfg.workload.shared_prefix_hits = variant_value(value)
        elif key == "pd":
            m = re.fullmatch(r"(\d+)P(\d+)D", value)
            if not m:
                raise ValueError(f"config variant item {item!r}: pd must look like 1P2D")
            cfg.cluster.prefill_nodes, cfg.cluster.decode_nodes = int(m.group(1)), int(m.group(2))
    for key in ("cluster.prefill_nodes", "cluster.decode_nodes"):  # (the later item won, silently)
        if "pd" in given and key in given:
            raise ValueError(
                f"config variant {arg!r}: pd={given['pd']} and {key}={given[key]} both set the P/D layout; give one"
            )
    if aps is not None and kind_given not in (None, "online"):
        raise ValueError(f"config variant {arg!r}: aps= makes the workload online; it cannot go with kind={kind_given}")
    if aps is not None:
        cfg.workload.kind = "online"
    if trace_given is not None:  # trace=NAME makes the workload that trace's
        if kind_given not in (None, "trace") or aps is not None:
            other = f"kind={kind_given}" if kind_given not in (None, "trace") else "aps="
            raise ValueError(f"config variant {arg!r}: trace= replays a trace; it cannot go with {other}")
        if "dataset" in given:  # (its synthetic agents: a sweep's dataset= loads ran one trace alike, silently)
            raise ValueError(
                f"config variant {arg!r}: trace= replays a trace; it cannot go with dataset={given['dataset']} (a "
                "synthetic dataset; a trace has its own turns)"
            )
        cfg.workload.kind = "trace"
    elif file_trace and kind_given is None:  # items of synthetic agents on a setup file that replays a trace
        for key in ("aps", "dataset"):
            if key in given:  # (aps= ran the dataset's synthetic agents online, dataset= was ignored: silently)
                raise ValueError(
                    f"config variant {arg!r}: {key}={given[key]} is for synthetic agents, and this setup replays a "
                    f"trace (config.workload.kind='trace', trace_path={cfg.workload.trace_path!r}); give kind=online "
                    f"or kind=offline with it to run synthetic agents instead"
                )
    # (a trace path's '/' made directories of the variant; '..' climbed out of the config's output_dir)
    name = arg.replace(",", "_").replace("=", "-").replace("/", "_")
    cfg.output_dir = f"{cfg.output_dir}/{name}"
    if cfg.description and any("=" in item for item in arg.split(",")):  # (it kept the file's "2048 agents")
        cfg.description = f"{cfg.description}; changed by the variant {arg}"
    return cfg
