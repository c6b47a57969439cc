"""Hunt 5 of the launchers, workloads, schedulers and configs (notes: /work/notes/hunt_launch5.md)."""

from __future__ import annotations

import pytest

from dualpath_jax.workloads import Trajectory, Turn

pytest.importorskip("ml_collections")


def _runtime_cfg(**overrides):
    from configs.tiny_runtime import get_config
    from dualpath_jax.runtime.config import RuntimeConfig

    return RuntimeConfig.from_config_dict(get_config().runtime).replace(**overrides)


@pytest.mark.parametrize("batcher", ["fifo", "compute_quota"])
def test_bench_runtime_simulator_copy_forms_batches_as_the_runtime(batcher):
    """bench_runtime's simulator copy gave fifo only the token budget (no `prefill_max_batch` cap: the runtime's PEs
    batch at most 8 requests) and compute_quota nothing: no token budget, and its default cost model, DS 27B on an
    H800, where the runtime's PEs price the runtime's own model on the CPU profile."""
    import schedulers
    from experiments import bench_runtime
    from schedulers.cost_model import MODEL_SHAPES

    cfg = _runtime_cfg(**{"scheduler.batcher": batcher})
    shape = MODEL_SHAPES.get("qwen2.5-32b")  # a registered stand-in for the runtime's model (no jax here)
    sc = bench_runtime.sim_config(cfg, shape, {})
    b = schedulers.make_batcher(sc.batcher, **sc.batcher_kwargs)
    assert b.config.token_budget == cfg.cluster.prefill_token_budget == 512
    if batcher == "fifo":
        assert b.config.max_requests == cfg.cluster.prefill_max_batch == 8
    else:
        assert b.cost_model.model is shape and b.cost_model.hw.name == "cpu"


def test_bench_runtime_simulator_copy_keeps_the_runtimes_arrivals():
    """With `workload.arrival=online` the runtime starts its agents as a Poisson process, but the simulator copy got
    the trajectories as made (every arrival_time 0): it predicted an offline run. Two one-turn agents at 0.0005 agents/s
    arrive ~2,000 s apart: the predicted JCT (last finish - first arrival) must span that gap."""
    from dualpath_jax.workloads.arrivals import make_arrivals
    from experiments import bench_runtime
    from schedulers.cost_model import MODEL_SHAPES, CostModel

    cost = CostModel(MODEL_SHAPES.get("ds27b"), "cpu")
    trajs = [Trajectory(i, [Turn(300, 4)]) for i in range(2)]
    kw = {"block_size": 16}
    offline = bench_runtime.simulate(_runtime_cfg(), trajs, cost, kw)["jct_s"]
    cfg = _runtime_cfg(**{"workload.arrival": "online", "workload.aps": 0.0005})
    first, last = make_arrivals("online", aps=0.0005, seed=cfg.workload.seed).agent_arrivals(trajs)
    assert last - first > 10 * offline  # (the case is one where arrivals dominate)
    online = bench_runtime.simulate(cfg, trajs, cost, kw)["jct_s"]
    assert last - first < online < last - first + 2 * offline
