"""Fix wave 27, the Ray launcher names how a node's actor ended in its death reason.

The `local` and `inprocess` launchers tell the scheduler how a node ended (`watch_exits`: "its process node2 (pid 7)
was killed by SIGKILL (exit code -9)"); a Ray node actor killed mid-run was still "its process or thread exited" (or a
peer's "could not reach it"). `RayLauncher.exit_reason(node)` says what Ray knows of the actor: killed by
`launcher.kill` (`ray.kill`), its worker process died, its run raised or returned; None while it runs.

Real Ray only (a private local instance, `ray.init(address="local")`: a `ray start --head` cluster may be up;
`pip install -e '.[ray]'`); slow (a Ray start and a run).
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
from test_runtime import kill_decode_node_when_busy

from dualpath_jax.runtime import driver

pytestmark = pytest.mark.slow


def _ray():
    return pytest.importorskip("ray", reason="ray is not installed (optional extra: pip install -e '.[ray]')")


def _exit_of(launcher, node: int, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while (why := launcher.exit_reason(node)) is None:
        assert time.monotonic() < deadline, f"node {node}'s actor task did not end within {timeout} s"
        time.sleep(0.02)
    return why


def test_a_killed_node_actors_death_reason_says_what_ray_knows(base, ops):
    """A DE node actor killed mid-run (`kill(2)`): its death reason names the actor, its pid and host and the kill,
    not "its process or thread exited". Then `exit_reason` on small actors: None (at once) while one runs, an
    outside SIGKILL of its worker (Ray's words, no kill of ours), a run that raised, a run that returned."""
    ray = _ray()
    from dualpath_jax.runtime.ray_launcher import RayLauncher

    cfg = base.replace(
        **{
            "scheduler.name": "round_robin",
            "launcher": "ray",
            "transport": "tcp",
            "workload.agents": 6,
            "scheduler.heartbeat_timeout_s": 1.0,
            "run_timeout_s": 120.0,
        }
    )
    trajs6 = driver.make_trajectories(cfg)
    fault, killed = kill_decode_node_when_busy(2)

    ray.init(address="local", num_cpus=3)
    try:
        launcher = RayLauncher(cfg)
        res = driver.run(cfg, trajs6, model_ops=ops, launcher=launcher, fault=fault)
        assert killed and res.requeued > 0 and launcher.errors == {}
        why = res.dead_nodes[2]
        assert re.match(
            r"its actor node2 \(pid \d+ on [\d.]+\) died \(ray\.kill sent by launcher\.kill\): "
            r"The actor is dead because it was killed by `ray\.kill`\.",
            why,
        ), why
        assert re.fullmatch(r"its actor node0's run returned \(node0 done on [\d.]+\)", launcher.exit_reason(0))

        @ray.remote(num_cpus=0)
        class Node:  # (a stand-in for `_RayNode`: its run sleeps, raises or returns)
            def pid(self):
                return os.getpid()

            def run(self, how):
                if how == "raise":
                    raise ValueError("a defect")
                if how == "sleep":
                    time.sleep(60)
                return "done"

        small = RayLauncher(cfg)
        small.actors = {n: Node.remote() for n in (5, 6, 7)}
        pid = ray.get(small.actors[5].pid.remote())  # (before its run: an actor runs one task at a time)
        small.refs = {n: small.actors[n].run.remote(how) for n, how in [(5, "sleep"), (6, "raise"), (7, "return")]}
        t = time.monotonic()
        assert small.exit_reason(5) is None and small.exit_reason(99) is None
        assert time.monotonic() - t < 1.0  # (never waits for a running task)
        os.kill(pid, signal.SIGKILL)  # (its worker lost: not our kill)
        why = _exit_of(small, 5)
        assert re.match(
            rf"its actor node5 \(pid {pid} on [\d.]+\) died: The actor is dead because its worker process has died\.",
            why,
        ), why
        assert "launcher.kill" not in why and "common causes" not in why and "\n" not in why
        assert _exit_of(small, 6) == "its actor node6's run raised ValueError: a defect"
        assert _exit_of(small, 7) == "its actor node7's run returned (done)"
        assert list(small.errors) == [6]
    finally:
        ray.shutdown()
