"""DS 27B (in-house downscale of DeepSeek-V3.2: hidden 2560, 30 layers, 72 experts top-6) on 1P1D.

Launch:
  python -m experiments.simulate --config=configs/paper_ds27b.py --config.scheduler.name=dualpath
  python -m experiments.simulate --config=configs/paper_ds27b.py:basic,pd=2P1D
  python -m experiments.simulate --config=configs/paper_ds27b.py:dualpath,aps=0.5   # online

Same hardware as configs/paper_ds660b.py and the same calibrated parameters (configs/sim_base.py
CALIBRATED, fitted on the DS 660B table only); nothing here is fitted to DS 27B results. With the DS 660B
DE reserve (de_hbm_reserve_gb = 18.5 GB) a DS 27B DE keeps 0.9 * 80 - 5.5 (weights, EP 8) - 18.5 = 48 GB
for KV, so its DEs rarely bind.
"""

from configs.sim_base import apply_variant, base_config


def get_config(arg: str | None = None):
    cfg = base_config()
    cfg.name = "paper_ds27b"
    cfg.description = "DS 27B 1P1D, H800"
    cfg.output_dir = "results/sim/paper_ds27b"
    cfg.cluster.model = "ds27b"
    cfg.cluster.prefill_nodes = 1
    cfg.cluster.decode_nodes = 1
    cfg.workload.dataset = "64K"
    cfg.workload.n_agents = 1024
    return apply_variant(cfg, arg)
