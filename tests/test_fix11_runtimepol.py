"""Fix wave 11, "runtimepol": a researcher's own scheduling policy / batcher run in the runtime.

A policy that raises or returns a bad value fails the run naming it (R3); the PE checks each item of a batcher's batch
before it runs (R4: a wrong `cached` computed KV at the wrong positions); a policy that never places anything on an
idle cluster fails the run naming it, not after run_timeout_s (R5); a batcher registered in the user's own module is
known in the `local` launcher's node processes (R6). The runs are real runs of configs/tiny_runtime.py:test.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
import textwrap

import pytest

from dualpath_jax.runtime import driver, launcher, scheduler_service
from dualpath_jax.runtime.config import ConfigError
from dualpath_jax.runtime.model_ops import ModelOps
from dualpath_jax.runtime.scheduler_service import RunFailed
from schedulers import BATCHERS, POLICIES, Assignment, BatchItem, InterEnginePolicy, IntraEnginePolicy


# ------------------------------------------------------------------------------ test-local policies and batchers
class _Policy(InterEnginePolicy):
    @dataclasses.dataclass(frozen=True)
    class Config:
        pass

    def __init__(self, config):
        self.config = config

    def place(self, snapshot, queue):
        pe, de = snapshot.engines_of("prefill")[0].engine_id, snapshot.engines_of("decode")[0].engine_id
        return [(r.request_id, pe, de) for r in list(queue)[:1]]


class Raises(_Policy):
    def schedule(self, snapshot, queue, fetching_node=None):
        return 1 / 0


class ReturnsNone(_Policy):
    def schedule(self, snapshot, queue, fetching_node=None):
        return None


class ReturnsTuples(_Policy):
    def schedule(self, snapshot, queue, fetching_node=None):
        return [(rid, pe, de, "pe") for rid, pe, de in self.place(snapshot, queue)]


class BadReadSide(_Policy):
    def schedule(self, snapshot, queue, fetching_node=None):
        return [Assignment(rid, pe, de, "DE", 1.0) for rid, pe, de in self.place(snapshot, queue)]


class NeverPlaces(_Policy):
    def schedule(self, snapshot, queue, fetching_node=None):
        return []


class _Batcher(IntraEnginePolicy):
    @dataclasses.dataclass(frozen=True)
    class Config:
        pass

    def __init__(self, config):
        self.config = config


class UnknownId(_Batcher):
    def form_batch(self, queue):
        return [BatchItem(987654, queue[0].cached_tokens, queue[0].remaining_tokens)]


class WrongCached(_Batcher):
    def form_batch(self, queue):
        w = queue[0]
        return [BatchItem(w.request_id, w.cached_tokens + 1, w.remaining_tokens - 1)]


class ZeroBsz(_Batcher):
    def form_batch(self, queue):
        return [BatchItem(queue[0].request_id, queue[0].cached_tokens, 0)]


class TooLong(_Batcher):
    def form_batch(self, queue):
        return [BatchItem(queue[0].request_id, queue[0].cached_tokens, queue[0].remaining_tokens + 1)]


class Twice(_Batcher):
    def form_batch(self, queue):
        w = queue[0]
        return [BatchItem(w.request_id, w.cached_tokens, w.remaining_tokens)] * 2


class RaisingBatcher(_Batcher):
    def form_batch(self, queue):
        return {}["no such key"]


RP_POLICIES = {
    "fix11rp_raises": Raises,
    "fix11rp_none": ReturnsNone,
    "fix11rp_tuples": ReturnsTuples,
    "fix11rp_bad_side": BadReadSide,
    "fix11rp_never": NeverPlaces,
}
RP_BATCHERS = {
    "fix11rp_unknown_id": UnknownId,
    "fix11rp_wrong_cached": WrongCached,
    "fix11rp_zero_bsz": ZeroBsz,
    "fix11rp_too_long": TooLong,
    "fix11rp_twice": Twice,
    "fix11rp_raising": RaisingBatcher,
}


@pytest.fixture(scope="module")
def registered():
    """Registered as a user's module would, taken out afterwards (other modules enumerate the registries)."""
    for name, cls in RP_POLICIES.items():
        POLICIES.register(name)(cls)
    for name, cls in RP_BATCHERS.items():
        BATCHERS.register(name)(cls)
    yield
    for name in RP_POLICIES:
        POLICIES._entries.pop(name, None)
    for name in RP_BATCHERS:
        BATCHERS._entries.pop(name, None)


# ------------------------------------------------------------------------------------------------------------ R3
@pytest.mark.parametrize(
    "policy, match",
    [
        ("fix11rp_raises", r"policy 'fix11rp_raises' raised ZeroDivisionError\('division by zero'\)"),
        ("fix11rp_none", r"policy 'fix11rp_none' returned None \(NoneType\), not a list of schedulers.Assignment"),
        ("fix11rp_tuples", r"policy 'fix11rp_tuples' returned \(\d+, 0, 1, 'pe'\) \(tuple\), not a schedulers.Assig"),
        ("fix11rp_bad_side", r"policy 'fix11rp_bad_side' raised ValueError\(\"read_side must be 'pe', 'de' or 'split"),
    ],
)
def test_a_policy_that_raises_or_returns_a_bad_value_is_named(registered, base, ops, trajs, caplog, policy, match):
    """What was wrong: a policy that raised (a bad read side is its Assignment's ValueError) or returned None or
    tuples failed the run as "fetch from node 0 failed: ValueError(...)" / "TypeError('NoneType' object is not
    iterable)" / "AttributeError('tuple' object ...)", naming no policy, and the PE node logged a full traceback as
    if it had crashed. Contract: RunFailed naming the policy and what it raised or the bad item; no node logs a
    traceback (the policy's own is logged once, by the scheduler)."""
    cfg = base.replace(**{"scheduler.name": policy, "run_timeout_s": 60.0})
    with caplog.at_level(logging.ERROR), pytest.raises(RunFailed, match=match):
        driver.run(cfg, trajs, model_ops=ops)
    crashed = [r for r in caplog.records if r.getMessage().startswith("node") and r.exc_info]
    assert not crashed, f"a node logged a traceback: {[r.getMessage() for r in crashed]}"


# ------------------------------------------------------------------------------------------------------------ R4
@pytest.mark.parametrize(
    "batcher, why",
    [
        ("fix11rp_unknown_id", r"request id 987654 is none of the \d+ ready requests"),
        ("fix11rp_wrong_cached", r"cached=1, but request \d+ has 0 cached tokens"),
        ("fix11rp_zero_bsz", r"bsz=0 is not in \[1, \d+\]"),
        ("fix11rp_too_long", r"bsz=\d+ is not in \[1, \d+\]"),
        ("fix11rp_twice", r"request \d+ is listed twice"),
    ],
)
def test_a_batchers_bad_item_is_refused_before_the_batch_runs(registered, base, ops, trajs, batcher, why):
    """What was wrong: the PE ran a batcher's items unchecked. An unknown request id was a bare KeyError ("pe 0:
    KeyError(987654)"); a `cached` other than the request's computed its tokens at the wrong positions: wrong KV, and
    the run finished silently (cached + 1 on a first turn, as here: token 0's KV never computed) or stalled until
    run_timeout_s; bsz 0, bsz past the remaining tokens and a request listed twice failed as
    the model's misleading "no miss tokens". Contract: the run fails at once (well within its timeout) naming the
    batcher, the item and what is wrong with it."""
    cfg = base.replace(**{"scheduler.batcher": batcher, "run_timeout_s": 30.0})
    with pytest.raises(RunFailed, match=rf"batcher '{batcher}' returned a bad item BatchItem\(.*\): {why}"):
        driver.run(cfg, trajs, model_ops=ops)


def test_a_batcher_that_raises_is_named(registered, base, ops, trajs):
    """What was wrong: a batcher's exception failed the run as "pe 0: KeyError('no such key')", naming no batcher.
    Contract: the run's failure names the batcher and what it raised."""
    cfg = base.replace(**{"scheduler.batcher": "fix11rp_raising", "run_timeout_s": 30.0})
    with pytest.raises(RunFailed, match=r"batcher 'fix11rp_raising' raised KeyError\('no such key'\) forming a batch"):
        driver.run(cfg, trajs, model_ops=ops)


# ------------------------------------------------------------------------------------------------------------ R5
def test_a_policy_that_never_places_anything_fails_the_run_naming_it(registered, base, ops, trajs, monkeypatch):
    """What was wrong: a policy that places nothing (returns [] on an idle cluster) made the run wait out
    run_timeout_s (900 s in configs/tiny_runtime.py), then fail as "run did not finish within ... (0/12 turns)".
    Contract: once the policy has placed none of the same queued requests on an idle cluster (nothing placed, every
    engine free) for IDLE_POLICY_CALLS calls and IDLE_POLICY_S seconds (shortened here), the run fails naming it."""
    monkeypatch.setattr(scheduler_service, "IDLE_POLICY_S", 0.5, raising=False)
    cfg = base.replace(**{"scheduler.name": "fix11rp_never", "run_timeout_s": 30.0})
    with pytest.raises(RunFailed, match=r"policy 'fix11rp_never' placed none of the 4 queued requests on an idle clu"):
        driver.run(cfg, trajs, model_ops=ops)


def test_the_idle_policy_check_counts_only_an_idle_cluster_calls_and_time(tmp_path):
    """`GlobalScheduler._check_idle_policy` with a fake clock: a policy that places trajectory 0's turn and never
    trajectory 1's is not failed while turn 0 runs (a busy cluster: it may be waiting for room), however long and
    however many calls; once turn 0 is done the cluster is idle, and the run fails only after IDLE_POLICY_CALLS calls
    and IDLE_POLICY_S seconds of that, naming the policy."""
    from test_runtime_scheduler import Clock, done_event, fetch, make_service

    from dualpath_jax.kv_layout import BlockLayout
    from dualpath_jax.kv_store import LocalDirStore
    from dualpath_jax.workloads.types import Trajectory, Turn

    class OnlyTrajectory0(InterEnginePolicy):
        name = "only_trajectory_0"

        def schedule(self, snapshot, queue, fetching_node=None):
            return [Assignment(p.request_id, 0, 1, "pe") for p in queue if p.trajectory_id == 0]

    store = LocalDirStore(tmp_path / "kv", BlockLayout(2, 4, 8, "test-model"))
    clock = Clock()
    svc = make_service(store, [Trajectory(0, [Turn(6, 2)]), Trajectory(1, [Turn(6, 2)])], clock, OnlyTrajectory0())
    try:
        fetch(svc, 1), fetch(svc, 2)
        (task,) = fetch(svc, 0).tasks
        for _ in range(100):  # 100 s, 100 calls: turn 0 runs meanwhile
            clock.t += 1.0
            fetch(svc, 0)
        assert svc.failure is None
        fetch(svc, 1, [done_event(svc, task, svc.now())])  # turn 0 done: nothing placed anywhere now
        for _ in range(scheduler_service.IDLE_POLICY_CALLS + 5):  # many calls, little time
            clock.t += 0.01
            fetch(svc, 0)
        assert svc.failure is None
        clock.t += scheduler_service.IDLE_POLICY_S
        fetch(svc, 0)
        assert svc.failure is not None and re.search(
            r"policy 'only_trajectory_0' placed none of the 1 queued requests on an idle cluster", svc.failure
        )
    finally:
        store.close()


@pytest.mark.parametrize("decode_slots", [1, 4])
def test_the_idle_policy_check_does_not_fail_a_run_whose_policy_waits_for_room(
    base, ops, trajs, reference_for, monkeypatch, decode_slots
):
    """The R5 check at its most eager (any one call, no time): a built-in policy on a cluster whose DEs are full
    (decode_slots=1: requests wait for a slot) still finishes every turn with the reference tokens -- a full DE is not
    an idle cluster."""
    monkeypatch.setattr(scheduler_service, "IDLE_POLICY_S", 0.0)
    monkeypatch.setattr(scheduler_service, "IDLE_POLICY_CALLS", 1)
    cfg = base.replace(**{"cluster.decode_slots": decode_slots})
    res = driver.run(cfg, trajs, model_ops=ops)
    ref = reference_for(cfg, ops, trajs)
    assert len(res.records) == sum(len(t.turns) for t in trajs)
    assert all((res.tokens[k] == ref[k]).all() for k in ref)


# ------------------------------------------------------------------------------------------------------------ R6
USER_MODULE = """
import dataclasses

from schedulers import BATCHERS, BatchItem, IntraEnginePolicy


@BATCHERS.register("fix11rp_user_head_only")
class HeadOnly(IntraEnginePolicy):
    @dataclasses.dataclass(frozen=True)
    class Config:
        max_tokens: int = 16

    def __init__(self, config):
        self.config = config

    def form_batch(self, queue):
        w = queue[0]
        return [BatchItem(w.request_id, w.cached_tokens, min(w.remaining_tokens, self.config.max_tokens))]
"""


@pytest.fixture
def user_batcher(tmp_path, monkeypatch):
    """A batcher registered by the user's own module (a file on sys.path, imported by the driver's process)."""
    (tmp_path / "fix11rp_user_batchers.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    import fix11rp_user_batchers  # noqa: F401

    yield "fix11rp_user_head_only"
    BATCHERS._entries.pop("fix11rp_user_head_only", None)
    sys.modules.pop("fix11rp_user_batchers", None)


@pytest.mark.slow
def test_a_users_batcher_runs_in_the_local_launchers_node_processes(base, trajs, reference_for, user_batcher):
    """What was wrong: the `local` launcher's node processes are spawned and knew only the package's batchers: a
    batcher registered in the user's module failed every node with "KeyError: unknown intra-engine batching policy"
    on its stderr, the driver saying only "node 0 failed: process node0 exited with code 1", after its own config
    checks had passed. Contract: the nodes import the module that registered the batcher; the run gives the
    reference tokens."""
    cfg = base.replace(
        **{"launcher": "local", "transport": "tcp", "scheduler.batcher": user_batcher, "run_timeout_s": 300.0}
    )
    res = driver.run(cfg, trajs)
    ref = reference_for(cfg, ModelOps.of_config(cfg), trajs)
    assert len(res.records) == sum(len(t.turns) for t in trajs)
    assert all((res.tokens[k] == ref[k]).all() for k in ref)


@pytest.mark.slow
def test_a_users_batcher_runs_in_a_local_cluster_sessions_node_processes(base, trajs, reference_for, user_batcher):
    """R6 for a `LocalCluster` session (the main job's node processes, which serve several runs): each run's message
    names the modules to import, so a batcher of the user's module runs there too."""
    from dualpath_jax.runtime.launcher import LocalCluster

    cfg = base.replace(
        **{"launcher": "local", "transport": "tcp", "scheduler.batcher": user_batcher, "run_timeout_s": 300.0}
    )
    with LocalCluster(driver.layout_groups(cfg)) as cluster:
        res = driver.run(cfg, trajs, launcher=cluster.launcher(cfg))
    ref = reference_for(cfg, ModelOps.of_config(cfg), trajs)
    assert all((res.tokens[k] == ref[k]).all() for k in ref)


LATE_MODULE = """
import dataclasses

from schedulers import BATCHERS, BatchItem, IntraEnginePolicy


def register():  # called by the driver's script only: the node processes never call it
    @BATCHERS.register("fix11rp_late")
    class Late(IntraEnginePolicy):
        @dataclasses.dataclass(frozen=True)
        class Config:
            pass

        def __init__(self, config):
            self.config = config

        def form_batch(self, queue):
            return [BatchItem(queue[0].request_id, queue[0].cached_tokens, queue[0].remaining_tokens)]
"""


@pytest.mark.parametrize("session", [False, True], ids=["one-run", "session"])
def test_a_batcher_not_registered_in_the_node_processes_is_named_by_the_driver(
    base, trajs, tmp_path, monkeypatch, session
):
    """A batcher registered by a function call of the driver's (not at the top level of its module) is unknown in
    the spawned node processes even after they import that module. What was wrong: the driver said only "node 0
    failed: process node0 exited with code 1: its run raised (traceback on its stderr)". Contract: the run fails
    naming the node's error: the batcher, and to register it at the top level of an importable module (also for a
    `LocalCluster` session's node processes)."""
    from dualpath_jax.runtime.launcher import LocalCluster

    (tmp_path / "fix11rp_late_batchers.py").write_text(textwrap.dedent(LATE_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    import fix11rp_late_batchers

    fix11rp_late_batchers.register()
    try:
        cfg = base.replace(
            **{"launcher": "local", "transport": "tcp", "scheduler.batcher": "fix11rp_late", "run_timeout_s": 120.0}
        )
        with pytest.raises(
            RunFailed,
            match=r"exited with code 1: its run raised RuntimeError\(\"config.scheduler.batcher .*fix11rp_late.* is not "
            r"registered in this node process .*register it at the top level of an importable module",
        ):
            if session:
                with LocalCluster(driver.layout_groups(cfg)) as cluster:
                    driver.run(cfg, trajs, launcher=cluster.launcher(cfg))
            else:
                driver.run(cfg, trajs)
    finally:
        BATCHERS._entries.pop("fix11rp_late", None)
        sys.modules.pop("fix11rp_late_batchers", None)


@pytest.mark.parametrize("kind", ["local", "ray"])
def test_a_batcher_of_an_unimportable_main_is_refused_before_anything_starts(base, trajs, monkeypatch, kind):
    """A batcher registered in a `__main__` the node processes cannot re-run (python -c, a notebook; Ray's actors
    never run the driver's `__main__`) cannot reach them: a ConfigError naming it and what to do, before any node
    starts (it was a KeyError on each node's stderr). A `__main__` script file is re-run by the local launcher's
    spawned nodes (as `__mp_main__`): its top-level registrations reach them, so it is not refused there."""

    class MainBatcher(_Batcher):
        def form_batch(self, queue):
            return [BatchItem(queue[0].request_id, queue[0].cached_tokens, queue[0].remaining_tokens)]

    MainBatcher.__module__ = "__main__"
    monkeypatch.setitem(BATCHERS._entries, "fix11rp_main", MainBatcher)
    main = type(sys)("__main__")  # an interactive __main__: no file, no spec
    monkeypatch.setitem(sys.modules, "__main__", main)
    cfg = base.replace(**{"launcher": kind, "transport": "tcp", "scheduler.batcher": "fix11rp_main"})
    check = driver.prepare if kind == "local" else lambda cfg, trajs: launcher.check_batcher_reaches_nodes(cfg)
    with pytest.raises(
        ConfigError, match=r"batcher 'fix11rp_main' is registered in __main__ .*register it in an impor"
    ):
        check(cfg, trajs)  # (Ray is not needed to refuse it: `prepare` refuses launcher='ray' without ray first)
    main.__file__ = "/somewhere/my_experiment.py"  # a script: re-run by the local launcher's nodes
    if kind == "local":
        launcher.check_batcher_reaches_nodes(cfg)
    else:
        with pytest.raises(ConfigError, match="'ray' launcher's node processes cannot import"):
            launcher.check_batcher_reaches_nodes(cfg)
    assert launcher.batcher_modules(cfg) == ()  # (nothing to import by name)


def test_a_node_imports_the_module_that_registered_the_batcher(base, user_batcher, monkeypatch):
    """`import_batcher_modules`, what each node process (local, a LocalCluster session, a Ray actor) runs before it
    builds its batcher: the module is imported and registers it; a module the node cannot import, or one that does
    not register the batcher there, is an error naming the batcher (and the module)."""
    cfg = base.replace(**{"scheduler.batcher": user_batcher})
    assert launcher.batcher_modules(cfg) == ("fix11rp_user_batchers",)
    assert launcher.batcher_modules(base) == ("schedulers.batching",)  # fifo: importing it again is harmless
    BATCHERS._entries.pop(user_batcher)  # as in a fresh node process
    sys.modules.pop("fix11rp_user_batchers")
    launcher.import_batcher_modules(cfg, launcher.batcher_modules(base) + ("fix11rp_user_batchers",))
    assert user_batcher in BATCHERS
    with pytest.raises(RuntimeError, match=r"'fix11rp_user_head_only' was registered by module 'no_such_mod_fix11'"):
        launcher.import_batcher_modules(cfg, ("no_such_mod_fix11",))
    BATCHERS._entries.pop(user_batcher)
    with pytest.raises(RuntimeError, match=r"'fix11rp_user_head_only' is not registered in this node process"):
        launcher.import_batcher_modules(cfg, ("fix11rp_user_batchers",))  # (imported already: registers nothing)


@pytest.mark.slow
def test_a_users_batcher_runs_in_the_ray_launchers_actors(base, trajs, reference_for, user_batcher):
    """R6 for the Ray launcher: its actors import the module that registered the batcher (a local Ray instance shares
    this machine's path). Needs ray (`pip install -e '.[ray]'`)."""
    ray = pytest.importorskip("ray", reason="ray is not installed (optional extra: pip install -e '.[ray]')")
    ray.init(num_cpus=3, runtime_env={"env_vars": {"PYTHONPATH": ":".join(sys.path)}})
    try:
        cfg = base.replace(
            **{"launcher": "ray", "transport": "tcp", "scheduler.batcher": user_batcher, "run_timeout_s": 300.0}
        )
        res = driver.run(cfg, trajs)
    finally:
        ray.shutdown()
    ref = reference_for(cfg, ModelOps.of_config(cfg), trajs)
    assert all((res.tokens[k] == ref[k]).all() for k in ref)
