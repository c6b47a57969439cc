"""Qwen2.5-32B (dense GQA, bf16 KV: 256 KiB/token) on 1P2D, DP only, 320 GB host buffer per node.

Launch:
  python -m experiments.simulate --config=configs/paper_qwen32b.py --config.scheduler.name=dualpath
  python -m experiments.simulate --config=configs/paper_qwen32b.py:basic,agents=256

Same hardware and calibrated parameters as configs/paper_ds660b.py (configs/sim_base.py CALIBRATED);
the buffer is 320 GB per node (PAPER.md).

DE HBM (an assumption; PAPER.md gives no memory settings for Qwen): a DP engine holds all 64.0 GB of bf16
weights, so at the default 0.9 usable fraction its KV room is 8.0 GB (30.6K tokens), less than the 32K
dataset's longest turns (32.8K tokens of prompt + generation): those could never be placed, and the
simulator refuses such a run. The config uses 0.95 of the HBM (12.0 GB, 45.9K tokens), a common serving
setting for a model that nearly fills its GPU. The 48K and 64K datasets (turns up to 49K / 66K tokens,
12.9 / 17.2 GB) do not fit one 80 GB GPU next to these weights at all; the simulator says so.
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
    # Dense DP engines (no EP buffers) whose bf16 weights (64 GB) leave 8-12 GB of HBM: the DS 660B reserve
    # (CALIBRATED de_hbm_reserve_gb) would leave nothing, and there is no Qwen data to fit one.
    cfg.cluster.de_hbm_reserve_gb = 0.0
    cfg.cluster.hbm_usable_fraction = 0.95  # room for the 32K dataset's longest turn (docstring)
    cfg.workload.dataset = "32K"
    cfg.workload.n_agents = 512
    return apply_variant(cfg, arg)
