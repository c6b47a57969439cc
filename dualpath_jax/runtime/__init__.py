"""The DualPath runtime: real engines on real KV bytes (DESIGN.md "Data paths").

- `config`: typed `RuntimeConfig` (built from configs/tiny_runtime.py) and `validate`.
- `lifecycle`: trajectories -> turns -> requests with real token ids.
- `scheduler_service`: the global scheduler (queue, cluster snapshot, registered policy, heartbeats).
- `control`: messages and the fetch channel between engine groups and the scheduler.
- `engines`: prefill engine (layerwise prefill, PE/DE read paths) and decode engine (continuous batching,
  write-back, DE-path reads); `storage_nic`: a node's read queue and write-backs; `node`: one engine group.
- `model_ops`: the engines' view of `models.runner.ModelRunner`, and the single-process reference run.
- `launcher` (in-process, local processes, `LocalCluster` sessions), `ray_launcher` (multi-host).
- `netns`: node processes in the kernel-shaped network namespaces of experiments/netns_cluster.sh (`config.netns`).
- `driver`: `run(cfg)` for offline / online workloads -> `RunResult` (metrics in the shared schema).

Importing this package imports no jax; `model_ops`, `engines` and the launchers do.
"""
