"""The control channel between engine groups and the global scheduler (dualpath_jax/runtime/control.py), over real
sockets: authentication, bad messages and an unanswered fetch fail clearly, and the server keeps serving the others."""

import logging
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client

import pytest

from dualpath_jax.runtime.control import ControlServer, GroupReply, GroupReport, SocketControlClient

KEY = b"control-test-key"


def _report(node: int) -> GroupReport:
    return GroupReport(node_id=node, role="prefill", engine_ids=[node])


@pytest.fixture
def server():
    seen = []

    def handler(report: GroupReport) -> GroupReply:
        seen.append(report.node_id)
        return GroupReply(directory={report.node_id: (report.node_id, None)})

    srv = ControlServer(handler, KEY)
    srv.seen = seen
    yield srv
    srv.close()


def test_groups_fetch_over_the_socket(server):
    clients = [SocketControlClient(server.address, KEY) for _ in range(3)]
    try:
        for node, c in enumerate(clients):
            for _ in range(2):
                assert c.fetch(_report(node)).directory == {node: (node, None)}
    finally:
        for c in clients:
            c.close()
    assert sorted(server.seen) == [0, 0, 1, 1, 2, 2]


def test_a_wrong_key_is_rejected_and_the_server_keeps_serving(server, caplog):
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.runtime.control"):
        with pytest.raises(AuthenticationError):
            Client(server.address, authkey=b"not-the-key")
        deadline = time.monotonic() + 5
        while "rejected a connection" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
    assert "rejected a connection" in caplog.text
    good = SocketControlClient(server.address, KEY)
    try:
        assert good.fetch(_report(7)).directory == {7: (7, None)}
    finally:
        good.close()


def test_a_message_that_is_not_a_report_drops_only_that_connection(server, caplog):
    bad = Client(server.address, authkey=KEY)
    good = SocketControlClient(server.address, KEY)
    try:
        with caplog.at_level(logging.ERROR, logger="dualpath_jax.runtime.control"):
            bad.send({"node_id": 1})  # a dict, not a GroupReport
            with pytest.raises(EOFError):
                bad.recv()  # the server closed this connection
        assert "dropping a connection that sent dict" in caplog.text
        assert good.fetch(_report(2)).directory == {2: (2, None)}
    finally:
        bad.close()
        good.close()


def test_an_unanswered_fetch_times_out_naming_the_scheduler():
    release = threading.Event()

    def slow(report: GroupReport) -> GroupReply:
        release.wait(10)
        return GroupReply()

    srv = ControlServer(slow, KEY)
    client = SocketControlClient(srv.address, KEY, timeout_s=0.2)
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="global scheduler did not answer within 0.2 s"):
            client.fetch(_report(0))
        assert time.monotonic() - t0 < 5
    finally:
        release.set()
        client.close()
        srv.close()


def test_a_truncated_message_drops_only_that_connection(server, caplog):
    bad = Client(server.address, authkey=KEY)
    good = SocketControlClient(server.address, KEY)
    try:
        with caplog.at_level(logging.ERROR, logger="dualpath_jax.runtime.control"):
            bad.send_bytes(b"\x80\x05\x95")  # the start of a pickle, cut off
            with pytest.raises(EOFError):
                bad.recv()
        assert "dropping a connection that sent an unreadable message" in caplog.text
        assert good.fetch(_report(2)).directory == {2: (2, None)}
    finally:
        bad.close()
        good.close()


def test_a_failing_handler_drops_only_that_connection(caplog):
    """The handler (the scheduler's fetch) raising on one group's report: that connection is dropped, logged with
    the node and the error, and the server keeps serving the other groups."""

    def handler(report: GroupReport) -> GroupReply:
        if report.node_id == 1:
            raise ValueError("bad event data")
        return GroupReply()

    srv = ControlServer(handler, KEY)
    bad, good = SocketControlClient(srv.address, KEY), SocketControlClient(srv.address, KEY)
    try:
        with caplog.at_level(logging.ERROR, logger="dualpath_jax.runtime.control"), pytest.raises(EOFError):
            bad.fetch(_report(1))
        assert "fetch from node 1 failed, dropping its connection: ValueError('bad event data')" in caplog.text
        assert good.fetch(_report(2)).shutdown is False
    finally:
        bad.close()
        good.close()
        srv.close()


def test_close_ends_the_accept_thread_and_stops_listening():
    """Found by the runtime fuzz: closing the listener does not wake a thread blocked in accept() (Linux), so every
    run of the local launcher left a "control-accept" thread and its listening socket behind in the driver."""
    import os
    import socket

    def fds():
        out = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                out.add(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:  # (the listing's own descriptor, gone)
                pass
        return out

    # Only what this test starts counts: a thread or socket of an earlier test that ends meanwhile (a "control-conn"
    # thread finishing its client's EOF) made the whole-process comparison fail (seen once in CI, 2026-12-04).
    threads0, fds0 = set(threading.enumerate()), fds()

    def leftovers():
        return sorted(t.name for t in set(threading.enumerate()) - threads0), sorted(fds() - fds0)

    srv = ControlServer(lambda report: GroupReply(), KEY)
    client = SocketControlClient(srv.address, KEY)
    assert client.fetch(_report(0)) == GroupReply()
    client.close()
    srv.close()
    deadline = time.monotonic() + 5
    while leftovers() != ([], []) and time.monotonic() < deadline:  # (the connection's thread ends on the EOF)
        time.sleep(0.02)
    assert leftovers() == ([], [])
    with pytest.raises(OSError):
        socket.create_connection(srv.address, timeout=1.0)
    srv.close()  # idempotent


_NODE_EXIT = """
import sys, threading, time
from dualpath_jax.runtime.launcher import _node_process

def busy():
    # a daemon thread still inside XLA when the node's work is done (e.g. an engine's last step)
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: x @ x @ x)
    x = jnp.ones((1024, 1024), jnp.float32) / 1024
    f(x).block_until_ready()
    def loop():
        while True:
            f(x).block_until_ready()
    threading.Thread(target=loop, daemon=True).start()
    time.sleep(0.2)
    print("served", flush=True)

def fails():
    raise RuntimeError("no device for engine 2")

_node_process(busy if sys.argv[1] == "busy" else fails)
"""


@pytest.mark.parametrize("case", ["busy", "fails"])
def test_a_node_process_ends_with_its_own_exit_code(case):
    """Node processes ended through interpreter finalization, which tore JAX down under a daemon thread still in XLA:
    the process aborted ("terminate called after throwing an instance of ''", "FATAL: exception not rethrown", exit
    code -6) on about one DE node in ten runs. A node now exits 0 when its work returned, 1 with the traceback when it
    raised, and never aborts (the same `busy` body under a plain interpreter exit aborts every time here)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _NODE_EXIT, case], capture_output=True, text=True, timeout=300)
    assert "terminate called" not in out.stderr and "FATAL" not in out.stderr, out.stderr[-2000:]
    if case == "busy":
        assert out.returncode == 0 and "served" in out.stdout, (out.returncode, out.stderr[-2000:])
    else:
        assert out.returncode == 1, (out.returncode, out.stderr[-2000:])
        assert "RuntimeError: no device for engine 2" in out.stderr


def test_a_fetch_after_a_timed_out_one_never_gets_its_stale_reply():
    """The late reply to a fetch that timed out stayed on the connection and answered the next fetch: a group got
    the reply meant for its previous report. The connection is given up at the timeout; later fetches say so."""
    first = threading.Event()
    release = threading.Event()

    def slow_first(report: GroupReport) -> GroupReply:
        if not first.is_set():
            first.set()
            release.wait(10)
            return GroupReply(directory={"stale": (0, None)})
        return GroupReply(directory={"fresh": (report.node_id, None)})

    srv = ControlServer(slow_first, KEY)
    client = SocketControlClient(srv.address, KEY, timeout_s=0.2)
    try:
        with pytest.raises(TimeoutError):
            client.fetch(_report(0))
        release.set()
        time.sleep(0.2)  # the stale reply is on its way
        with pytest.raises(ConnectionError, match="no answer within 0.2 s"):
            client.fetch(_report(1))
    finally:
        release.set()
        client.close()
        srv.close()
