"""DS 660B (DeepSeek-V3.2, MoE + MLA + sparse attention) on 2P4D H800 nodes: the paper's main setup.

Launch:
  python -m experiments.simulate --config=configs/paper_ds660b.py --config.scheduler.name=dualpath
  python -m experiments.simulate --config=configs/paper_ds660b.py:basic,dataset=64K,agents=2048
  python -m experiments.simulate --config=configs/paper_ds660b.py:dualpath,aps=0.4   # online

Hardware (PAPER.md): g = 8 GPUs a node, one 400 Gbps CNIC per GPU (B = 50 GB/s), one 400 Gbps SNIC per
node (s = 1), M = 500 GB/s host memory bandwidth, 80 GB DRAM buffer per node. EP over each role's GPUs.

Calibrated parameters (fitted to the DS 660B 2P4D offline JCT table of PAPER.md, nothing else; the same
values are used by every paper config, see configs/sim_base.py CALIBRATED):
  pe_time_scale = 2.9: multiplies the analytic prefill time of schedulers.cost_model (~0.29 s of PE time
      per 32K-dataset turn); the oracle column is prefill-bound on the 32K dataset only.
  de_hbm_reserve_gb = 18.5: DE HBM that holds neither weights nor KV, so the DE KV space is 0.9 * 80 -
      37.5 (weights per DE at EP 32) - 18.5 = 16 GB (~333K tokens). DE HBM is held from placement to the
      end of decode: it binds the oracle column on 48K/64K (where the per-turn prefill cost barely grows
      but the throughput falls from ~50 to ~40 turns/s) and, offline, part of it is held by requests
      waiting in the PE queues.
  de_time_scale = 2.2: decode steps -> TPOT ~37 ms (the paper's DS 660B TPOT is 36-39 ms).
  storage_efficiency = 1.0: 3FS saturates a 400 Gbps SNIC (PAPER.md).
  read_stream_gbps = 2.0 and max_reads_per_node = 9: one request's read stream rate and the reads a node
      keeps in flight; basic is storage-bound at ~15 GB/s per PE SNIC in the table (64K, 4096 agents:
      ~580 TB read in 19,280 s over two SNICs), i.e. far below line rate.
  pe_hbm_kv_gb = 4.0: PE HBM for whole-prompt KV in basic (non-layerwise) prefill; it gates basic's reads
      in flight (fitted on the basic column) and so sets the size of the layerwise ablation step.
Variants: see configs/sim_base.py (mode, dataset=, agents=, aps=, pd=, turns=, seed=).
"""

from configs.sim_base import apply_variant, base_config


def get_config(arg: str | None = None):
    cfg = base_config()
    cfg.name = "paper_ds660b"
    cfg.description = "DS 660B 2P4D, H800, 64K dataset, 2048 agents offline"
    cfg.output_dir = "results/sim/paper_ds660b"
    cfg.cluster.model = "ds660b"
    cfg.cluster.prefill_nodes = 2
    cfg.cluster.decode_nodes = 4
    cfg.workload.dataset = "64K"
    cfg.workload.n_agents = 2048
    cfg.warmup_s = 0.0
    return apply_variant(cfg, arg)
