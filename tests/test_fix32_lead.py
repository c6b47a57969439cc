"""Fix wave 32, the lead: a policy whose one `schedule()` call is slow (session 49's slowpeer audit F4).

A node process (local or Ray launcher) waited a fixed 30 s for the driver's reply to a fetch; a PE's fetch runs the
policy, so a policy call over 30 s failed every node of the run, blaming node 0 ("global scheduler did not answer
within 30.0 s"), where the in-process launcher waited. The node now waits the run's own no-progress bound
(`config.fetch_timeout_s`: the stall timeout in force, else run_timeout_s, at least 30 s), and a call over
heartbeat_timeout_s is logged once, naming the policy. And the driver's control server, out of file descriptors,
said so once a spell (it was a warning a second), as the tcp transport now does.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
import types

import pytest
from test_fix26_wirefix1 import KEY, _fetch_in_thread

from configs.tiny_runtime import get_config
from dualpath_jax.runtime import launcher
from dualpath_jax.runtime.config import RuntimeConfig, fetch_timeout_s, stall_timeout_s
from dualpath_jax.runtime.control import ControlServer, GroupReply
from dualpath_jax.runtime.scheduler_service import GlobalScheduler, GroupSpec


class _Built(Exception):
    pass


def test_a_node_waits_for_a_fetchs_reply_as_long_as_the_stall_timeout(monkeypatch):
    cfg = RuntimeConfig.from_config_dict(get_config("test").runtime)
    seen = {}

    def client(address, authkey, **kw):
        seen.update(kw)
        raise _Built

    monkeypatch.setattr(launcher, "SocketControlClient", client)
    with pytest.raises(_Built):
        launcher.run_engine_group(GroupSpec(0, "prefill", [0]), cfg, None, None, ("127.0.0.1", 1), b"k", None)
    assert seen["timeout_s"] == fetch_timeout_s(cfg) == max(30.0, stall_timeout_s(cfg) or cfg.run_timeout_s)
    assert seen["timeout_s"] > 30.0  # (the tiny config's stall timeout: 120 s; before: the client's fixed 30 s)


def test_a_policy_call_longer_than_heartbeat_timeout_s_is_logged_once_naming_it(caplog):
    class Slow:
        name = "slow_one"

        def schedule(self, snap, queue, fetching_node):
            time.sleep(0.06)
            return iter([])

    service = types.SimpleNamespace(policy=Slow(), heartbeat_timeout_s=0.05, _said_slow_policy=False)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            assert GlobalScheduler._call_policy(service, None, [1, 2], 0) == []
    said = [r.getMessage() for r in caplog.records if "schedule() call" in r.getMessage()]
    assert len(said) == 1 and "policy 'slow_one' took 0.1 s" in said[0] and "heartbeat_timeout_s=0.05" in said[0]
    service.heartbeat_timeout_s, service._said_slow_policy = 5.0, False
    caplog.clear()
    GlobalScheduler._call_policy(service, None, [], 0)
    assert not [r for r in caplog.records if "schedule() call" in r.getMessage()]


def test_the_control_servers_failing_accept_is_said_once_a_spell_and_its_end_too(monkeypatch, caplog):
    """Out of descriptors, the driver's control server logged a warning for every failed accept (about one a second
    for as long as it lasted); now once a spell, naming the limit, and one line when it accepts again (as tcp's)."""
    srv = ControlServer(lambda report: GroupReply(), KEY)
    try:
        real, calls = srv._listener.accept, []

        def failing():
            calls.append(1)
            raise OSError(errno.EMFILE, "Too many open files")

        with caplog.at_level(logging.WARNING, logger="dualpath_jax.runtime.control"):
            monkeypatch.setattr(srv._listener, "accept", failing)
            socket.create_connection(srv.address).close()  # (taken by the accept running now: the next ones fail)
            time.sleep(0.5)
            monkeypatch.setattr(srv._listener, "accept", real)
            got, _ = _fetch_in_thread(srv.address)
        assert got == GroupReply() and len(calls) >= 3
        said = [r.getMessage() for r in caplog.records]
        failed = [m for m in said if "accept failed" in m]
        assert len(failed) == 1 and "RLIMIT_NOFILE" in failed[0], said
        again = [m for m in said if "accepting connections again" in m]
        assert len(again) == 1 and f"({len(calls)} accepts failed over " in again[0], said
    finally:
        srv.close()


def test_no_test_imports_its_siblings_as_a_tests_package():
    """The CI runs `pytest` (README), which puts tests/ on sys.path but not the repository root: a test importing
    `tests.test_x` was found only with `python -m pytest` from the root, and the CI failed to collect it (session
    49). Siblings are imported as `from test_x import ...`."""
    import glob
    import os
    import re

    here = os.path.dirname(os.path.abspath(__file__))
    bad = [
        f"{os.path.basename(p)}:{i}"
        for p in sorted(glob.glob(os.path.join(here, "*.py")))
        for i, line in enumerate(open(p, encoding="utf-8"), 1)
        if re.match(r"\s*(from|import)\s+tests(\.|\s|$)", line)
    ]
    assert not bad, f"imports of the tests package (use `from test_x import ...`): {bad}"
