"""The runtime on this machine: a tiny model, 1 PE node + 2 DE nodes as local processes, storage-bound NICs.

    python -m experiments.run                                        # basic and dualpath side by side
    python -m experiments.run --config.policies=dualpath,round_robin  # any registered policies
    python -m experiments.run --config.policies=basic,dualpath,policy.alpha_tokens=500000  # a policy's own fields
    python -m experiments.run --config=configs/tiny_runtime.py:test   # the small in-process variant
    python -m experiments.run --config.runtime.workload.agents=48 --config.runtime.nics.snic_bytes_per_s=2e6

`config.runtime` is a `dualpath_jax.runtime.config.RuntimeConfig` as nested dicts (every field may be
overridden with --config.runtime.<path>=value); `config.policies` lists the inter-engine policies to run,
one after the other on fresh clusters with the same conversations. An item `policy.NAME=value` of that list sets
a field of the Config of the policy named before it, for that policy only (as the simulator's config variant
items: `configs/sim_tiny.py:dualpath_rr,policy.full_de=wait`); `runtime.scheduler.policy_kwargs` holds fields
given to every policy of the list, and `runtime.scheduler.name` is not used by experiments.run (the list is).

Why these numbers: tiny_qwen2 has 4 layers x 256 B/token/layer = 1 KiB of KV per token. Agents start with a
long task (~384 tokens) and then append ~32 and generate ~6 tokens per turn (long context, short append, as
the paper's agentic traces), so each turn re-reads 0.4-0.7 MB of hit KV. A 4 MB/s SNIC per node makes those
reads take ~0.1-0.2 s per turn, far above the tiny model's prefill/decode time per turn, so storage
bandwidth is the bottleneck as in the paper's agentic runs;
CNICs at 8x the SNIC (g = 8 GPUs per node in the paper, each with its own CNIC) keep the compute network
out of the way. Basic reads only through the PE node's SNIC; DualPath also uses the two DE nodes' SNICs.
"""

from __future__ import annotations

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.policies = "basic,dualpath"
    c.results_dir = "results"
    c.plot = True
    c.calibrate = True  # measure prefill throughput first (for DualPath's beta) -- a few seconds
    c.warmup = True  # one unpaced run first, so the measured runs do not include compile time
    # True: also generate every turn with the single-process reference (this process: no store, no transport, no
    # scheduler) and compare each policy's greedy tokens with it (the table's last lines, results.json)
    c.reference = False
    r = ml_collections.ConfigDict()
    r.model = "tiny_qwen2"
    r.model_seed = 0
    r.batch_invariant = False  # True: greedy tokens bit-identical whatever the policy (models/layers/invariant.py)
    r.dtype = "float32"  # the model's weights, activations and KV: float32, bfloat16 (half the KV bytes) or float16
    r.block_size = 16
    r.transport = "tcp"
    r.transport_options = {}  # the backend's own endpoint fields, e.g. "{'timeout_s': 10.0}" (tcp)
    r.launcher = "local"
    r.store = "local_dir"  # a registered KV store (dualpath_jax.store.STORES; README "A KV store of one's own")
    r.store_options = {}  # its options besides root (= store_dir), e.g. "{'capacity_bytes': 1073741824}" for local_dir
    r.store_dir = ""
    r.run_timeout_s = 900.0
    # true: node processes in the kernel-shaped namespaces of experiments/netns_cluster.sh (root; README "Kernel-shaped
    # NICs for the runtime"), e.g. after `experiments/netns_cluster.sh up 3 1 32 256`
    r.netns = False
    r.cluster = dict(
        prefill_nodes=1,
        decode_nodes=2,
        engines_per_node=1,
        decode_slots=16,
        max_seq_len=1024,
        prefill_token_budget=512,
        prefill_max_batch=8,
        precompile=True,
        layerwise=True,  # false: the paper's Basic prefill (or per run: --config.policies=basic,layerwise=false,...)
        pe_hbm_kv_bytes=0,  # Basic prefill only: a PE's HBM for whole-prompt KV (0: no bound; the simulator's pe_hbm_kv_gb)
    )
    r.nics = dict(snic_bytes_per_s=4e6, cnic_bytes_per_s=32e6, high_priority_share=0.99)
    r.buffers = dict(pe_buffer_bytes=64 << 20, de_buffer_bytes=64 << 20)
    # transport='rdma' only: device "" = the first one; port = the device's port (not TCP); RoCE v2 fabrics usually
    # need gid_index of an IP-based GID (`show_gids`); a service level (0-15) per priority class
    r.rdma = dict(device="", port=1, gid_index=0, sl_high=0, sl_low=0)
    r.scheduler = dict(
        name="dualpath",
        batcher="fifo",
        policy_kwargs={},  # fields for every policy of c.policies (a policy's own: `policy.NAME=value` items there)
        batcher_kwargs={},
        fetch_interval_s=0.005,
        heartbeat_timeout_s=3.0,
        # a group whose engine or store call made no progress this long is dead (its requests re-run); None: 120 s
        # where heartbeat_timeout_s < 120 < run_timeout_s, else off
        stall_timeout_s=ml_collections.config_dict.placeholder(float),
    )
    r.workload = dict(
        kind="tiny",
        trace="",
        agents=32,
        turns=6,
        append_tokens=32,
        gen_tokens=6,
        first_append_tokens=384,
        gap_s=0.0,
        arrival="offline",
        aps=1.0,
        seed=0,
        dataset="32K",
        scale=0.02,
        time_scale=1.0,
        max_context_tokens=0,
    )
    # arrival=online / trace: the SLO each policy is judged on (the paper's TTFT 4 s, TPOT 50 ms at p90, as the
    # simulator's), on the turns arriving from warmup_s to the last agent's arrival (trace: on); offline has none
    r.slo = dict(ttft_s=4.0, tpot_s=0.050, percentile=90.0, warmup_s=0.0)
    c.runtime = r
    if arg == "test":  # small and in-process: what the tests use
        r.launcher = "inprocess"
        r.transport = "inproc"
        r.workload.agents = 4
        r.workload.turns = 3
        r.workload.first_append_tokens = 48
        r.workload.append_tokens = 16
        r.workload.gen_tokens = 6
        r.cluster.decode_slots = 4
        r.cluster.max_seq_len = 256
        r.cluster.precompile = False
        r.nics.snic_bytes_per_s = 1e9
        r.nics.cnic_bytes_per_s = 1e9
        c.calibrate = False
        c.warmup = False
        c.plot = False
    elif arg not in (None, ""):
        raise ValueError(f"configs/tiny_runtime.py: unknown variant {arg!r}; known: test")
    return c
