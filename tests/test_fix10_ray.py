"""Fix wave 10, the Ray launcher: a node actor whose run raised is the run's error, not a dead node.

`RayLauncher` had no `errors`: a node actor whose `run` raised (a defect in a node's code, a bad checkpoint, a host
without RDMA) showed only as a dead node (its task's ref was ready, so `alive()` was False) and its requests re-ran on
the other nodes, or the run failed with the scheduler's "no live engine" reason instead of the node's error. Now
`RayLauncher.errors` is {node_id: exception} for this run's nodes whose actor task ended by raising (a RayTaskError, its
cause named), and the driver fails the run naming the node, as for the local launchers; an actor that died (killed:
`kill(node)`, its process or host lost: RayActorError) is still only dead and its requests re-run on the others.

Real Ray only (a private local instance, `ray.init(address="local")`: a `ray start --head` cluster may be up;
`pip install -e '.[ray]'`); slow (a Ray start and a run each).
"""

from __future__ import annotations

import pytest
from test_runtime import assert_matches_reference, kill_decode_node_when_busy

from dualpath_jax.runtime import driver
from dualpath_jax.runtime.scheduler_service import RunFailed

pytestmark = pytest.mark.slow


def _ray():
    return pytest.importorskip("ray", reason="ray is not installed (optional extra: pip install -e '.[ray]')")


def _ray_cfg(base, **extra):
    return base.replace(**{"scheduler.name": "round_robin", "launcher": "ray", "transport": "tcp", **extra})


def test_a_node_actor_whose_run_raises_fails_the_run_naming_it(base, ops, trajs):
    """A defect in one DE node's code (its `EngineGroup.run` raises in the actor, put there by a Ray worker setup
    hook): the run fails naming node 2 and the cause. Before, node 2 was only declared dead and the run finished on
    the other DE node."""
    ray = _ray()
    from dualpath_jax.runtime.ray_launcher import RayLauncher

    def defect_in_node2():  # (runs in every Ray worker process as it starts; pickled by value)
        from dualpath_jax.runtime import node

        run = node.EngineGroup.run

        def run_with_defect(self):
            if self.node_id == 2:
                raise ValueError("a defect in node 2's code")
            return run(self)

        node.EngineGroup.run = run_with_defect

    ray.init(address="local", num_cpus=3, runtime_env={"worker_process_setup_hook": defect_in_node2})
    try:
        cfg = _ray_cfg(base, run_timeout_s=120.0)
        launcher = RayLauncher(cfg)
        with pytest.raises(RunFailed, match=r"node 2 failed: .*run raised ValueError: a defect in node 2's code"):
            driver.run(cfg, trajs, model_ops=ops, launcher=launcher)
        assert list(launcher.errors) == [2]
    finally:
        ray.shutdown()


def test_a_bad_checkpoint_in_the_actors_fails_the_run_naming_a_node(tmp_path):
    """The driver loaded the checkpoint, then its weights were emptied before the node actors loaded them (a shared
    directory changed under a run): every actor's run raises. The run fails naming a node and the cause, not with
    the scheduler's reason for nodes that exited before registering."""
    ray = _ray()
    pytest.importorskip("safetensors", reason="HF import needs the 'hf' extra (safetensors)")
    from test_models_checkpoint import QWEN2_HF, hf_tensors, write_hf_checkpoint

    from configs.tiny_runtime import get_config
    from dualpath_jax.runtime.config import RuntimeConfig
    from models.registry import config_from_hf
    from models.runner import ModelRunner

    ckpt = tmp_path / "tiny-qwen2-hf"
    direct = ModelRunner(config_from_hf(QWEN2_HF), seed=7, num_slots=1, capacity=16)
    write_hf_checkpoint(ckpt, QWEN2_HF, hf_tensors(QWEN2_HF, direct.pure_params()))
    base = RuntimeConfig.from_config_dict(get_config("test").runtime)
    cfg = _ray_cfg(base, model=str(ckpt), run_timeout_s=120.0)
    trajs, ops = driver.prepare(cfg)
    for f in ckpt.glob("*.safetensors"):  # (the driver checks config.json again: the weights only the actors load)
        f.write_bytes(b"")
    ray.init(address="local", num_cpus=3)
    try:
        with pytest.raises(RunFailed, match=r"node \d+ failed: .*node\d+ actor's run raised \w+"):
            driver.run(cfg, trajs, model_ops=ops)
    finally:
        ray.shutdown()


def test_a_killed_node_actor_is_dead_not_an_error(base, ops, reference_for):
    """A healthy run has no errors; a DE node actor killed mid-run (`kill(2)`: RayActorError on its ref) is only
    dead: its requests re-run on the other DE, every token matches the reference, and `errors` stays empty."""
    ray = _ray()
    from dualpath_jax.runtime.ray_launcher import RayLauncher

    cfg = _ray_cfg(base, **{"workload.agents": 6, "scheduler.heartbeat_timeout_s": 1.0, "run_timeout_s": 120.0})
    trajs6 = driver.make_trajectories(cfg)
    ref6 = reference_for(cfg, ops, trajs6)
    fault, killed = kill_decode_node_when_busy(2)

    ray.init(address="local", num_cpus=3)
    try:
        healthy = RayLauncher(cfg)
        res = driver.run(cfg, trajs6, model_ops=ops, launcher=healthy)
        assert_matches_reference(res, ref6, trajs6)
        assert healthy.errors == {}
        launcher = RayLauncher(cfg)
        res = driver.run(cfg, trajs6, model_ops=ops, launcher=launcher, fault=fault)
        assert killed and res.requeued > 0
        assert_matches_reference(res, ref6, trajs6)
        assert launcher.errors == {} and not launcher.alive(2)
    finally:
        ray.shutdown()
