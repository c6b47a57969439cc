"""The scale run: DS 660B on 48P96D (1,152 GPUs), 48K agents of the 48K dataset, offline.

Launch:
  python -m experiments.simulate --config=configs/paper_scale.py --config.scheduler.name=dualpath
  python -m experiments.simulate --config=configs/paper_scale.py:agents=4096   # a smaller slice

PAPER.md: 2P4D with 2K agents took 3,167 s and 48P96D with 48K agents 3,201 s (the 48K dataset).
Same calibrated parameters as configs/paper_ds660b.py, and the same EP groups (PE: 2 nodes = EP 16, DE:
4 nodes = EP 32), so an engine holds the same weights and DE KV space as in 2P4D. Each group fetches every 2.4 s, so the global
scheduler serves 60 fetches/s as in the 2P4D configs (6 groups x every 0.1 s); a request waits for the
next fetch of any group (~17 ms), not of one particular group.
"""

from configs.sim_base import apply_variant, base_config


def get_config(arg: str | None = None):
    cfg = base_config()
    cfg.name = "paper_scale"
    cfg.description = "DS 660B 48P96D, 48K agents, 48K dataset, offline"
    cfg.output_dir = "results/sim/paper_scale"
    cfg.cluster.model = "ds660b"
    cfg.cluster.prefill_nodes = 48
    cfg.cluster.decode_nodes = 96
    # EP groups as in 2P4D (PEs EP 16, DEs EP 32): one EP group of 768 GPUs cannot hold 256 routed experts
    # sensibly, and equal groups keep the weights and the DE KV space per engine of the 2P4D calibration.
    cfg.cluster.prefill_ep_nodes = 2
    cfg.cluster.decode_ep_nodes = 4
    cfg.cluster.bucket_s = 60.0
    cfg.cluster.fetch_interval_s = 2.4
    cfg.workload.dataset = "48K"
    cfg.workload.n_agents = 48 * 1024
    return apply_variant(cfg, arg)
