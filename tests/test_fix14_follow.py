"""Fix pass 14, follow-ups of the morning's two journeys (each test failed before its fix).

1. A transport backend of one's own with the `local` and `ray` launchers: their node processes never imported the
   module that registered it, so `config.validate` refused it ("needs config.launcher='inprocess'"). Now the nodes
   import it as they import a batcher's (`launcher.transport_modules`, passed with the batcher's: `node_modules`).
2. The runtime's `random` policy ignored the workload seed (`driver.policy_kwargs` gave no seed; the simulator gives
   `config.seed`).
3. `experiments/bench_runtime.py` wrote no run.json (the other launchers do: `metrics.run_info`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import types

import pytest
from test_launch_hunt2 import _STUB_BENCH_RUNTIME, REPO

from dualpath_jax.runtime import driver, launcher
from dualpath_jax.runtime.config import ConfigError, validate
from dualpath_jax.runtime.scheduler_service import GroupSpec, RunFailed
from transport import TRANSPORTS
from transport.inproc import InProcTransport
from transport.tcp import TcpTransport

# A cross-process backend of one's own: a thin tcp subclass under a name of its own, in a module the test writes
# (the nodes import it by name; test_fix14_backend's RingTransport is in-process only)
MY_TCP = """
from transport import TRANSPORTS
from transport.tcp import TcpTransport


@TRANSPORTS.register("fix14f_mytcp")
class MyTcp(TcpTransport):
    backend = "fix14f_mytcp"
"""

# Registered by a call of the driver's only: the node processes import the module and still do not know it
LATE = """
from transport import TRANSPORTS
from transport.tcp import TcpTransport


def register():
    @TRANSPORTS.register("fix14f_late")
    class Late(TcpTransport):
        backend = "fix14f_late"
"""


def _user_module(tmp_path, monkeypatch, name, text):
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))  # (spawned nodes get the driver's sys.path)
    monkeypatch.setattr(TRANSPORTS, "_entries", dict(TRANSPORTS._entries))  # (the registration is this test's only)
    monkeypatch.delitem(sys.modules, name, raising=False)
    __import__(name)
    return sys.modules[name]


@pytest.fixture
def my_tcp(tmp_path, monkeypatch):
    _user_module(tmp_path, monkeypatch, "fix14f_my_transports", MY_TCP)
    yield "fix14f_mytcp"
    sys.modules.pop("fix14f_my_transports", None)


# ---- 1. a backend of one's own with the local and ray launchers ---------------------------------------------------


def test_config_takes_a_backend_of_ones_own_with_the_local_and_ray_launchers(base, my_tcp):
    """Refused before: "config.transport 'fix14f_mytcp' (...) needs config.launcher='inprocess'". With the `ray`
    launcher (not installed here) the transport passes and the next check names ray."""
    validate(base.replace(transport=my_tcp, launcher="local"))
    try:
        import ray  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"config.launcher='ray' needs ray, which is not installed"):
            validate(base.replace(transport=my_tcp, launcher="ray"))
    else:
        validate(base.replace(transport=my_tcp, launcher="ray"))


class _InProcOfMine(InProcTransport):
    backend = "fix14f_inproc"


class _NoHost(TcpTransport):
    backend = "fix14f_nohost"

    def __init__(self, name, pacer=None):
        super().__init__(name, pacer=pacer)


def test_config_refuses_what_the_launchers_node_processes_cannot_run(base, monkeypatch):
    """What still cannot run there is a ConfigError before anything starts: an InProcTransport of one's own (its
    endpoints reach their own process only, as 'inproc'); with `ray`, a class that takes no host= / secret= (the
    actors bind each endpoint to their host's address with the run's secret); a class of a `__main__` the nodes do not
    re-run (python -c, a notebook; never on Ray's actors)."""
    monkeypatch.setattr(TRANSPORTS, "_entries", dict(TRANSPORTS._entries))
    TRANSPORTS.add("fix14f_inproc", _InProcOfMine)
    TRANSPORTS.add("fix14f_nohost", _NoHost)
    validate(base.replace(transport="fix14f_inproc"))  # (inprocess: fine)
    with pytest.raises(
        ConfigError, match=r"'fix14f_inproc' \(_InProcOfMine, crosses_processes=False\) needs config.launc"
    ):
        validate(base.replace(transport="fix14f_inproc", launcher="local"))
    validate(base.replace(transport="fix14f_nohost", launcher="local"))
    with pytest.raises(
        ConfigError,
        match=r"'fix14f_nohost': the 'ray' launcher builds each endpoint from its name, pacer, host and secret \(and "
        r"config.transport_options\) only, and _NoHost takes no host= argument; takes no secret= argument$",
    ):
        validate(base.replace(transport="fix14f_nohost", launcher="ray"))

    main_cls = type("MainTcp", (TcpTransport,), {"backend": "fix14f_main", "__module__": "__main__"})
    TRANSPORTS.add("fix14f_main", main_cls)
    main = types.ModuleType("__main__")  # an interactive __main__: no file, no spec
    monkeypatch.setitem(sys.modules, "__main__", main)
    for kind in ("local", "ray"):
        with pytest.raises(
            ConfigError, match=rf"'fix14f_main' is registered in __main__ .*the '{kind}' launcher's node processes ca"
        ):
            validate(base.replace(transport="fix14f_main", launcher=kind))
    main.__file__ = "/somewhere/my_experiment.py"  # a script: re-run by the local launcher's spawned nodes
    validate(base.replace(transport="fix14f_main", launcher="local"))
    with pytest.raises(ConfigError, match="'ray' launcher's node processes cannot import"):
        validate(base.replace(transport="fix14f_main", launcher="ray"))
    assert launcher.transport_modules(base.replace(transport="fix14f_main")) == ()  # (nothing to import by name)


def test_a_node_imports_the_module_that_registered_the_transport(base, my_tcp, tmp_path, monkeypatch):
    """`node_modules`: what every node process (local, a LocalCluster session, a Ray actor) imports before it builds
    anything: the batcher's module and the transport's. A module the node cannot import, or one that does not
    register the backend there, is an error naming the backend (and the module)."""
    cfg = base.replace(transport=my_tcp, launcher="local")
    assert launcher.transport_modules(cfg) == ("fix14f_my_transports",)
    assert launcher.transport_modules(base.replace(transport="tcp")) == ("transport.tcp",)  # (imported already)
    assert launcher.node_modules(cfg) == (
        launcher.batcher_modules(cfg),
        ("fix14f_my_transports",),
        launcher.store_modules(cfg),
    )
    TRANSPORTS._entries.pop(my_tcp)  # as in a fresh node process
    sys.modules.pop("fix14f_my_transports")
    launcher.import_node_modules(cfg, (launcher.batcher_modules(cfg), ("fix14f_my_transports",), ()))
    assert my_tcp in TRANSPORTS
    with pytest.raises(RuntimeError, match=r"'fix14f_mytcp' was registered by module 'no_such_mod_fix14f' in the dri"):
        launcher.import_transport_modules(cfg, ("no_such_mod_fix14f",))
    TRANSPORTS._entries.pop(my_tcp)
    with pytest.raises(RuntimeError, match=r"config.transport 'fix14f_mytcp' is not registered in this node process"):
        launcher.import_transport_modules(cfg, ("fix14f_my_transports",))  # (imported already: registers nothing)


def _fake_ray(calls: list):
    """What `RayLauncher.start` and `_RayNode.run` use of ray, recording each actor's `run.remote` arguments."""

    class Actor:
        def __init__(self):
            self.run = types.SimpleNamespace(remote=lambda *args: calls.append(args) or object())

    class ActorClass:
        def options(self, **kw):
            return types.SimpleNamespace(remote=Actor)

    ray = types.ModuleType("ray")
    ray.is_initialized = lambda: True
    ray.nodes = lambda: [{"NodeManagerAddress": "10.0.0.1", "Alive": True}]
    ray.util = types.SimpleNamespace(get_node_ip_address=lambda: "127.0.0.1")
    ray.remote = lambda cls: ActorClass()
    return ray


def test_the_ray_launchers_actors_import_the_transports_module(base, my_tcp, monkeypatch):
    """The Ray launcher passes each actor `node_modules` (it passed the batcher's only), and an actor imports them
    before it builds anything: a module it cannot import fails its run naming the backend. (Ray is not installed here:
    a stand-in records what the launcher hands its actors.)"""
    from dualpath_jax.runtime.ray_launcher import RayLauncher, _RayNode

    calls: list = []
    monkeypatch.setitem(sys.modules, "ray", _fake_ray(calls))
    cfg = base.replace(transport=my_tcp, launcher="ray")
    ray_launcher = RayLauncher(cfg)
    ray_launcher.start([GroupSpec(0, "prefill", [0]), GroupSpec(1, "decode", [1])], types.SimpleNamespace(fetch=None))
    try:
        assert [args[-1] for args in calls] == [launcher.node_modules(cfg)] * 2
        assert launcher.node_modules(cfg)[1] == ("fix14f_my_transports",)
    finally:
        ray_launcher.server.close()
    spec, _, address, authkey, secret, _ = calls[0]
    with pytest.raises(RuntimeError, match=r"'fix14f_mytcp' was registered by module 'no_such_mod_fix14f'"):
        _RayNode().run(spec, cfg, address, authkey, secret, ((), ("no_such_mod_fix14f",), ()))


@pytest.mark.slow  # (~10 s: 3 node processes import jax and compile; their import of the backend's module is
# covered cheaply by the next test, its endpoints are built as tcp's, `test_runtime`)
def test_a_backend_of_ones_own_runs_in_the_local_launchers_node_processes(base, trajs, ops, reference_for, my_tcp):
    """The runtime over `MyTcp` (a tcp subclass registered by the test's module) with the `local` launcher: every
    node process imports that module and builds its endpoints; the run gives the single-process reference tokens.
    Before: a ConfigError (and with that check bypassed, every node failed with "unknown transport")."""
    from test_runtime import assert_matches_reference

    cfg = base.replace(**{"transport": my_tcp, "launcher": "local", "workload.agents": 2, "workload.turns": 2})
    small = driver.make_trajectories(cfg)
    res = driver.run(cfg, small)
    assert_matches_reference(res, reference_for(cfg, ops, small), small)


def test_a_backend_not_registered_in_the_node_processes_is_named_by_the_driver(base, trajs, tmp_path, monkeypatch):
    """A backend registered by a call of the driver's (not at the top level of its module) is unknown in the spawned
    node processes even after they import its module: the run fails naming the backend and what to do."""
    late = _user_module(tmp_path, monkeypatch, "fix14f_late_transports", LATE)
    late.register()
    cfg = base.replace(**{"transport": "fix14f_late", "launcher": "local", "run_timeout_s": 120.0})
    with pytest.raises(
        RunFailed,
        match=r"node \d failed: .*its run raised RuntimeError\(\"config.transport .*fix14f_late.* is not registered in "
        r"this node process .*register it at the top level of an importable module",
    ):
        driver.run(cfg, trajs)


# ---- 2. the runtime's random policy and the workload seed ---------------------------------------------------------


def test_the_runtime_gives_a_policy_with_a_seed_the_workload_seed(base, monkeypatch):
    """`driver.policy_kwargs`: a policy whose Config has `seed` (`random`, or one's own) gets `workload.seed` unless
    its `policy.seed` is given, as the simulator gives `config.seed`; a policy without one gets none. Before: always
    the Config's default 0."""
    import dataclasses

    from schedulers import POLICIES, InterEnginePolicy

    cfg = base.replace(**{"scheduler.name": "random", "workload.seed": 7})
    assert driver.policy_kwargs(cfg, 1000)["seed"] == 7
    given = cfg.replace(**{"scheduler.policy_kwargs": {"seed": 3}})
    assert driver.policy_kwargs(given, 1000)["seed"] == 3
    assert driver.policy_kwargs(cfg.replace(**{"scheduler.policy_kwargs": {"seed": 0}}), 1000)["seed"] == 0
    assert "seed" not in driver.policy_kwargs(cfg.replace(**{"scheduler.name": "round_robin"}), 1000)

    class Seeded(InterEnginePolicy):
        @dataclasses.dataclass(frozen=True)
        class Config:
            seed: int = 0

        def __init__(self, config):
            self.config = config

        def schedule(self, snapshot, queue, fetching_node=None):
            return []

    monkeypatch.setattr(POLICIES, "_entries", dict(POLICIES._entries))
    POLICIES.add("fix14f_seeded", Seeded)
    assert driver.policy_kwargs(cfg.replace(**{"scheduler.name": "fix14f_seeded"}), 1000) == {"seed": 7}


# ---- 3. bench_runtime records what ran -----------------------------------------------------------------------------


def test_bench_runtime_records_what_ran(tmp_path):
    """run.json beside bench_runtime.json (`metrics.run_info`, as experiments.run / simulate / sweep write it): the
    command, its --config file and overrides, the resolved config, the devices. Before: no run.json."""
    done = subprocess.run(
        [sys.executable, "-c", _STUB_BENCH_RUNTIME, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (run_dir,) = list(tmp_path.glob("bench_runtime-*"))
    info = json.loads((run_dir / "run.json").read_text())
    assert info["command"].startswith("python -m experiments.bench_runtime ")
    assert info["flags"]["config"]["file"] == "configs/tiny_runtime.py:test"
    assert info["flags"]["config"]["overrides"] == {"results_dir": str(tmp_path)}
    assert info["flags"]["skip_sim"] is True
    assert info["config"] == json.loads((run_dir / "bench_runtime.json").read_text())["config"]
    assert info["config"]["runtime"]["workload"]["seed"] == 0 and info["devices"] and info["wall_s"] > 0
