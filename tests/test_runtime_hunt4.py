"""Runtime defects found by the fourth hunt over dualpath_jax/runtime (config checks, driver, engines)."""

from __future__ import annotations

import threading
import types

import pytest


def _test_config():
    from configs.tiny_runtime import get_config
    from dualpath_jax.runtime.config import RuntimeConfig

    return RuntimeConfig.from_config_dict(get_config("test").runtime)


def test_a_cnic_share_too_small_for_the_fair_queuing_weights_is_a_config_error():
    """`nics.high_priority_share=1e-300` passed (> 0 and < 1): the CNIC's model class got weight 1e-300, its SFQ tags
    (bytes / weight) reached inf after ~200 MB of model traffic, and from then on its chunks tied the KV chunks' tags
    and went first -- KV got none of a contended CNIC instead of nearly all of it. A share either class cannot keep
    is refused, naming the field; the paper's 0.99 and the extremes of the range still pass."""
    from dualpath_jax.runtime.config import ConfigError, validate

    base = _test_config()
    for share in (1e-300, 5e-324, 1 - 1e-16, 1e-9):
        with pytest.raises(ConfigError, match=r"config.nics.high_priority_share=.* leaves a class"):
            validate(base.replace(**{"nics.high_priority_share": share}))
    for share in (0.99, 0.5, 0.01, 1e-6, 1 - 1e-6):  # (config.MIN_CLASS_SHARE = 1e-6)
        validate(base.replace(**{"nics.high_priority_share": share}))


def test_tiny_turns_that_can_never_fit_max_seq_len_are_refused_before_the_agents_are_built(monkeypatch):
    """`workload.turns=10**9` (or any count whose shortest last turn is past max_seq_len) built every agent's turns
    first -- minutes, or memory -- and only then failed on max_seq_len. Each tiny turn has at least half its mean
    append and generation, so the bound is known from the config: a ConfigError naming turns and max_seq_len, before
    `tiny_trajectories` runs. Counts that fit still build."""
    from dualpath_jax.runtime import driver
    from dualpath_jax.runtime.config import ConfigError

    base = _test_config()  # max_seq_len 256
    ops = types.SimpleNamespace(config=types.SimpleNamespace(batch_invariant=False))  # (checks before the model)
    built = []
    real = driver.tiny_trajectories
    monkeypatch.setattr(driver, "tiny_trajectories", lambda *a, **k: built.append(a) or real(*a, **k))
    for turns in (40, 10**5, 10**9):  # (40 first: on a build that builds them, 10**9 never ends)
        with pytest.raises(ConfigError, match=rf"max_seq_len=256 .* config.workload.turns={turns} "):
            driver.prepare(base.replace(**{"workload.turns": turns}), model_ops=ops)
    assert built == []
    driver.prepare(base.replace(**{"workload.turns": 6}), model_ops=ops)
    assert len(built) == 1


class _SilentLauncher:
    """Registers every group, then its nodes just keep fetching (a run that cannot finish); at shutdown it records what
    a node's next fetch is told."""

    def __init__(self):
        self.told = []

    def start(self, groups, service):
        from dualpath_jax.runtime.control import GroupReport

        self.service, self.groups = service, groups
        for g in groups:
            service.fetch(
                GroupReport(g.node_id, g.role, g.engine_ids, address={e: ("127.0.0.1", 1) for e in g.engine_ids})
            )

    def alive(self, node_id):
        return True

    def join(self, timeout=0.0):
        pass

    def shutdown(self):
        from dualpath_jax.runtime.control import GroupReport

        for g in self.groups:
            self.told.append(self.service.fetch(GroupReport(g.node_id, g.role, g.engine_ids)).shutdown)


def test_a_run_the_driver_gives_up_on_tells_its_groups_to_shut_down(tmp_path):
    """On its timeout (or a failed node, or Ctrl-C) the driver raised and shut the launcher down, but its groups' fetches
    were still answered as if the run went on: a `LocalCluster` session's nodes never ended the run, so `end()` waited
    15 s and raised "node(s) [0, 1, 2] did not finish their run" in place of the RunFailed saying why (and left the
    control server open); fresh node processes were SIGKILLed after 10 s, without their final reports. After the
    driver gives up, every fetch says shutdown, as after a finished run."""
    from dualpath_jax.runtime import driver
    from dualpath_jax.runtime.scheduler_service import RunFailed

    cfg = _test_config().replace(run_timeout_s=0.2, store_dir=str(tmp_path), **{"workload.agents": 1})
    ops = types.SimpleNamespace(
        config=types.SimpleNamespace(batch_invariant=False, kv_bytes_per_token=1024),
        kv_layout=types.SimpleNamespace(num_layers=4, bytes_per_token_per_layer=256),
        fingerprint="stand-in",
        vocab_size=1000,
    )
    launcher = _SilentLauncher()
    with pytest.raises(RunFailed, match=r"run did not finish within 0.2 s \(0/\d+ turns; config.run_timeout_s\)"):
        driver.run(cfg, model_ops=ops, launcher=launcher)
    assert launcher.told == [True] * len(driver.layout_groups(cfg))


def test_a_fetch_interval_no_run_can_finish_in_is_a_config_error():
    """A group gets its tasks only when it fetches, and an idle group fetches once per `fetch_interval_s`: with
    fetch_interval_s=30 (heartbeat 300) and run_timeout_s=20 the run waited out its timeout ("0/2 turns"); with 1e10 s
    every node crashed in its wait between fetches (OverflowError: timestamp out of range). Both are ConfigErrors."""
    import math

    from dualpath_jax.runtime.config import ConfigError, validate

    base = _test_config()
    for interval, timeout in ((30.0, 20.0), (20.0, 20.0), (1e10, math.inf), (1e10, 1e12)):
        cfg = base.replace(
            run_timeout_s=timeout,
            **{"scheduler.fetch_interval_s": interval, "scheduler.heartbeat_timeout_s": 10 * interval},
        )
        with pytest.raises(
            ConfigError, match=r"config.scheduler.fetch_interval_s .* must be below config.run_timeout_s"
        ):
            validate(cfg)
    validate(base.replace(run_timeout_s=20.0, **{"scheduler.fetch_interval_s": 1.0}))


def test_a_given_workloads_bad_trajectory_ids_are_a_config_error():
    """A turn's append tokens come from an RNG seeded by (seed, trajectory id, turn): trajectories given with a negative
    id passed `prepare` and the run failed after start ("fetch from node 1 failed: ValueError('expected non-negative
    integer')"); a repeated id failed in the conversation book with a bare ValueError. Both are ConfigErrors before
    anything starts; any other integer id >= 0 runs."""
    from dualpath_jax.runtime import driver
    from dualpath_jax.runtime.config import ConfigError
    from dualpath_jax.workloads.types import Trajectory, Turn

    base = _test_config()
    ops = types.SimpleNamespace(config=types.SimpleNamespace(batch_invariant=False))  # (checks before the model)
    with pytest.raises(ConfigError, match=r"trajectory id -1 must be an integer >= 0"):
        driver.prepare(base, [Trajectory(-1, [Turn(20, 3)])], model_ops=ops)
    with pytest.raises(ConfigError, match=r"two trajectories with id 4"):
        driver.prepare(base, [Trajectory(4, [Turn(20, 3)]), Trajectory(4, [Turn(9, 2)])], model_ops=ops)
    driver.prepare(base, [Trajectory(2**64, [Turn(20, 3)]), Trajectory(0, [Turn(9, 2)])], model_ops=ops)


def test_a_session_node_process_dead_before_a_run_is_left_out_of_it():
    """A `LocalCluster` session whose node process had died (killed, or crashed in an earlier run) failed the next run
    in `begin` with a bare `BrokenPipeError` (sending the run to the dead process), after the live nodes had been sent
    it. Now the dead node gets no run: the driver sees it is not alive and declares it dead, as one dying mid-run
    (`/tmp/hunt_runtime4/session_dead.py`: the run then finishes on the other DE)."""
    import multiprocessing as mp

    from dualpath_jax.runtime.launcher import LocalCluster
    from dualpath_jax.runtime.scheduler_service import GroupSpec

    groups = [GroupSpec(0, "prefill", [0]), GroupSpec(1, "decode", [1])]
    live_parent, live_child = mp.Pipe()
    dead_parent, dead_child = mp.Pipe()
    dead_child.close()  # (the process is gone, and its end of the pipe with it)
    cluster = LocalCluster.__new__(LocalCluster)  # (no processes spawned: stand-ins)
    cluster.groups, cluster._busy = groups, set()
    cluster.procs = {0: types.SimpleNamespace(is_alive=lambda: True), 1: types.SimpleNamespace(is_alive=lambda: False)}
    cluster.conns, cluster._recv_lock = {0: live_parent, 1: dead_parent}, threading.Lock()
    cluster.begin(groups, "run")
    assert live_child.recv() == "run" and cluster._busy == {0}
    assert cluster.finished(1) and not cluster.finished(0)
