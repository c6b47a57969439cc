"""A tiny cluster for tests and smoke runs: DS 27B on 1P1D with 2 GPUs a node, few agents, few turns.

Launch:
  python -m experiments.simulate --config=configs/sim_tiny.py --config.scheduler.name=dualpath
  python -m experiments.simulate --config=configs/sim_tiny.py:basic
"""

from configs.sim_base import apply_variant, base_config


def get_config(arg: str | None = None):
    cfg = base_config()
    cfg.name = "sim_tiny"
    cfg.description = "DS 27B 1P1D, 2 GPUs a node, 16 agents x up to 12 turns of the 32K dataset"
    cfg.output_dir = "results/sim/sim_tiny"
    cfg.cluster.model = "ds27b"
    cfg.cluster.prefill_nodes = 1
    cfg.cluster.decode_nodes = 1
    cfg.cluster.gpus_per_node = 2
    cfg.cluster.bucket_s = 1.0
    cfg.workload.dataset = "32K"
    cfg.workload.n_agents = 16
    cfg.workload.max_turns = 12
    cfg.workload.duration_s = 60.0
    cfg.workload.aps = 0.5
    return apply_variant(cfg, arg)
