"""The control channel between node processes and the driver (dualpath_jax/runtime/control.py) as the local launcher
wires it to the global scheduler, over real sockets, with the test playing the nodes (no process is spawned), and the
scheduler's heartbeats around a long policy call:

- a connection that never answers the auth-key challenge (a port scanner, a process stopped mid-connect) kept every
  node from connecting: the challenge ran in the accept thread, without a timeout;
- a node that breaks the protocol (an unreadable frame, another node's report, a second connection of a node) fails
  the run naming the node: only its connection was dropped, with a log line naming no node, and the run failed as
  "node 1 failed: ... DriverLost(the driver closed the control connection)"; a frame cut off by the connection's end
  (a node killed mid-send) is named in a warning and the node taken for gone (it was dropped without a word);
- a policy call longer than `heartbeat_timeout_s` declared the nodes it kept from fetching dead.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from multiprocessing.connection import Client

import pytest
from test_runtime_scheduler import GROUPS, Clock, make_service, store  # noqa: F401 -- (store: a fixture)

from dualpath_jax.runtime import control
from dualpath_jax.runtime.control import ControlServer, GroupReply, GroupReport, SocketControlClient
from dualpath_jax.runtime.launcher import LocalProcessLauncher
from dualpath_jax.workloads.types import Trajectory, Turn
from schedulers.api import InterEnginePolicy


def _report(node: int) -> GroupReport:
    g = GROUPS[node]
    return GroupReport(node, g.role, g.engine_ids, address={e: f"addr{e}" for e in g.engine_ids})


def _wait_for(cond, timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


def test_a_connection_silent_at_the_auth_challenge_keeps_no_node_out(monkeypatch):
    monkeypatch.setattr(control, "AUTH_TIMEOUT_S", 0.3, raising=False)
    srv = ControlServer(lambda report: GroupReply(directory={}), b"k" * 16)
    stray = socket.create_connection(srv.address)  # connects, never answers the challenge
    got = {}

    def node():
        client = SocketControlClient(srv.address, b"k" * 16, timeout_s=5)
        try:
            got["reply"] = client.fetch(_report(0))
        finally:
            client.close()

    t = threading.Thread(target=node, daemon=True)
    try:
        time.sleep(0.05)  # (the stray is first in line)
        t.start()
        t.join(3.0)
        assert got.get("reply") == GroupReply(directory={}), "a node could not connect past a silent connection"
        # The stray itself is dropped once its challenge times out: the challenge, then the end of the stream.
        stray.settimeout(3.0)
        data = b""
        while chunk := stray.recv(4096):
            data += chunk
        assert data  # (it was challenged)
    finally:
        stray.close()
        t.join(3.0)
        srv.close()


class _Session:
    """A `LocalCluster` stand-in: its node processes are the test's own connections."""

    netns = False

    def __init__(self):
        self.procs = {g.node_id: threading.current_thread() for g in GROUPS}  # (alive)
        self.msg = None

    def begin(self, groups, msg):
        self.msg = msg  # (cfg, control address, authkey, modules)

    def end(self):
        pass


def _bad_frame(conn):
    conn.send_bytes(b"not a pickle")


def _truncated_frame(conn):
    with socket.socket(fileno=conn.fileno()) as s:  # a 100-byte frame cut off after 3 bytes, then the node is gone
        s.sendall(struct.pack("!i", 100) + b"\x80\x05\x95")
        conn._handle = None  # (the socket object closes the descriptor)


@pytest.mark.parametrize(
    "case, expected",
    [
        (_bad_frame, "an unreadable message: UnpicklingError: invalid load key, 'n'. (the connection of node 1)"),
        (lambda conn: conn.send(_report(2)), "a report of node 2 (the connection of node 1)"),
        ("second", "a report of node 1, which is connected already (two processes serve it) (its first message)"),
    ],
    ids=["not-a-pickle", "another-nodes-report", "connected-twice"],
)
def test_a_node_breaking_the_control_protocol_fails_the_run_naming_it(store, base, case, expected):  # noqa: F811
    svc = make_service(store, [Trajectory(0, [Turn(6, 2)])], Clock())
    session = _Session()
    launcher = LocalProcessLauncher(base, session=session)
    launcher.start(GROUPS, svc)
    _, address, authkey, _ = session.msg
    conns = [Client(address, authkey=authkey)]
    try:
        conns[0].send(_report(1))  # node 1 registers
        assert conns[0].recv().shutdown is False
        if case == "second":
            conns.append(Client(address, authkey=authkey))
            conns[1].send(_report(1))
        else:
            case(conns[0])
        assert _wait_for(lambda: svc.failure is not None, 3.0), "the run did not fail"
        assert svc.failure == f"control server: dropping a connection that sent {expected}"
        if case == "second":  # (the first connection still serves node 1)
            conns[0].send(_report(1))
            assert conns[0].recv().shutdown  # (the run failed)
    finally:
        for c in conns:
            try:
                c.close()
            except OSError:
                pass
        launcher.shutdown()


class _SlowPolicy(InterEnginePolicy):
    """Round robin whose call takes 2 s of the test's clock (a researcher's solver-based policy, a long queue): it
    waits for `go` inside the call, with the scheduler's lock held."""

    name = "slow"

    def __init__(self, clock):
        import schedulers

        super().__init__()
        self._inner = schedulers.make_policy("round_robin")
        self.clock, self.entered, self.go = clock, threading.Event(), threading.Event()

    def schedule(self, snap, queue, fetching_node=None):
        self.entered.set()
        self.go.wait(10)
        self.clock.t += 2.0
        return self._inner.schedule(snap, queue, fetching_node=fetching_node)


def test_a_policy_call_longer_than_the_heartbeat_timeout_declares_no_node_dead(store):  # noqa: F811
    """Heartbeats counted a node's silence from the start of its last fetch, and nodes cannot fetch while the policy
    runs (one lock): a policy call longer than `heartbeat_timeout_s` declared the PE node that ran it dead as soon as
    its fetch returned, and the nodes whose fetches waited behind it too (the run failed "no live prefill or decode
    engine left", or re-ran their requests). A node is silent from the end of its last fetch, and not while one of
    its fetches waits."""
    clock = Clock()
    policy = _SlowPolicy(clock)
    svc = make_service(store, [Trajectory(0, [Turn(6, 2)])], clock, policy=policy, timeout=1.0)
    svc.fetch(_report(1)), svc.fetch(_report(2))
    threads = [threading.Thread(target=svc.fetch, args=(_report(0),), daemon=True)]  # runs the policy
    threads[0].start()
    assert policy.entered.wait(5)
    for node in (1, 2):  # the DE groups' next fetches wait for the lock
        threads.append(threading.Thread(target=svc.fetch, args=(_report(node),), daemon=True))
        threads[-1].start()
    _wait_for(lambda: {1, 2} <= getattr(svc, "_in_fetch", set()), 2.0)
    dead = []
    threads.append(threading.Thread(target=lambda: dead.extend(svc.check_heartbeats()), daemon=True))
    threads[-1].start()
    policy.go.set()
    for t in threads:
        t.join(5)
    assert dead == [] and not svc.dead_nodes and svc.failure is None
    dead = []  # (still counted: silent for longer than the timeout since the last fetch)
    for _ in range(75):  # the watcher checks every 20 ms (a jump of the clock between checks is a pause of the job)
        clock.t += 0.02
        dead += svc.check_heartbeats()
    assert dead == [0, 1, 2]


def test_a_node_gone_inside_a_message_is_named_and_taken_for_gone(store, base, caplog):  # noqa: F811
    """A frame cut off by the end of the connection is a node process that died while sending (killed with a large
    report on its way): the run goes on without it (its heartbeat or process exit declares it dead), as before, but
    the server says which node it was (it said nothing at all)."""
    import logging

    svc = make_service(store, [Trajectory(0, [Turn(6, 2)])], Clock())
    session = _Session()
    launcher = LocalProcessLauncher(base, session=session)
    launcher.start(GROUPS, svc)
    _, address, authkey, _ = session.msg
    conn = Client(address, authkey=authkey)
    try:
        conn.send(_report(1))
        conn.recv()
        with caplog.at_level(logging.WARNING, logger="dualpath_jax.runtime.control"):
            _truncated_frame(conn)
            line = "the connection of node 1 ended inside a message (got end of file during message)"
            assert _wait_for(lambda: line in caplog.text, 3.0), caplog.text
        assert svc.failure is None and not svc.dead_nodes
    finally:
        launcher.shutdown()
