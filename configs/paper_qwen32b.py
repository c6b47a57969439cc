"""Qwen2.5-32B (dense GQA, bf16 KV: 256 KiB/token) on 1P2D, DP only, 320 GB host buffer per node.

Launch:
  python -m experiments.simulate --config=configs/paper_qwen32b.py --config.scheduler.name=dualpath
  python -m experiments.simulate --config=configs/paper_qwen32b.py:basic,dataset=32K,agents=512

Same hardware and calibrated parameters as configs/paper_ds660b.py (configs/sim_base.py CALIBRATED);
the buffer is 320 GB per node (PAPER.md).
"""

from configs.sim_base import apply_variant, base_config


def get_config(arg: str | None = None):
    cfg = base_config()
    cfg.name = "paper_qwen32b"
    cfg.description = "Qwen2.5-32B 1P2D, H800"
    cfg.output_dir = "results/sim/paper_qwen32b"
    cfg.cluster.model = "qwen2.5-32b"
    cfg.cluster.prefill_nodes = 1
    cfg.cluster.decode_nodes = 2
    cfg.cluster.host_buffer_gb = 320.0
    # Dense DP engines (no EP buffers) whose bf16 weights (65 GB) leave ~8 GB of HBM: the DS 660B reserve
    # (CALIBRATED de_hbm_reserve_gb) would leave nothing, and there is no Qwen data to fit one.
    cfg.cluster.de_hbm_reserve_gb = 0.0
    cfg.workload.dataset = "32K"
    cfg.workload.n_agents = 512
    return apply_variant(cfg, arg)
