"""Transport defects found by the seventh transport hunt; each test failed on the commit before.

- tcp: `connect` called again to a peer started again at the same address (a new process under the same name, after
  a crash that left this side's old connections silently open) returned at once (the old set still looked live), so
  every later transfer went to the dead process until the watchdog (`timeout_s`) dropped the set. It now asks who is
  at the address (one short PROBE connection): a new instance is connected, which drops the old set and fails its
  pending transfers with `PeerLostError`. The same for rdma, whose `connect` returned before its control endpoint.
- tcp: `send(peer, payload, priority=)` is the public way to put a message on the low connection (the RDMA backend
  asked its questions there through the private `_send_on`).
- tcp, rdma: `cancel()` on a posted transfer returned True (the future then said "cancelled") while its bytes landed
  and its notification came all the same; `Future.cancel` returns False for a call being executed, and callers take
  True as "never runs". Transfer futures are now running from the start (`transport.base.PostedFuture`), and so is
  `combine_futures`' future (it cannot cancel its parts).
- base: a second completion of a `TransferFuture` no one had waited on raised InvalidStateError with the future's
  repr while holding the module lock that repr takes: the thread hung holding it, and with it every transfer of the
  process (a peer failure racing an acknowledgement; the second failed part of a `write_many` combined future).
- tcp: a pair of 350-character CJK endpoint names (JSON-escaped in the HELLO, 4 KiB at most) made every connect fail
  with "Connection reset by peer", a PeerLostError blaming the peer. HELLOs may now hold 64 KiB and names are at
  most 4,096 UTF-8 bytes (every name that fitted before), refused when the endpoint is built.
"""

from __future__ import annotations

import socket
import sys
import threading
import time

import numpy as np
import pytest
from test_transport_hunt5 import _FakeVerbs
from test_transport_hunt6 import _silent_instance

from transport.base import PeerLostError, make_transport


@pytest.fixture
def fake_verbs(monkeypatch):
    fake = _FakeVerbs()
    for name, mod in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return fake


# ---- connect again to a peer started again at the same address --------------------------------------------------


def test_tcp_connect_again_to_a_peer_restarted_at_its_address_drops_the_dead_set():
    """a is connected to the old instance of "rs7" at (host, port); it "crashes" (its listener goes, its connections
    stay open and silent) and a new endpoint "rs7" listens at the same port. a's `connect` again returned at once: the
    pending write stayed pending and new writes went to the dead set. Now the pending write fails with PeerLostError
    and a's writes land in the new endpoint; a `connect` again to the same instance adds no set."""
    from transport.tcp import TcpTransport

    a = TcpTransport("ra7", timeout_s=30.0)
    srv, socks = _silent_instance("rs7", "old-instance")
    address = srv.getsockname()[:2]
    b = None
    try:
        a.register("src", np.arange(8, dtype=np.uint8))
        a.connect("rs7", address)
        pending = a.write("rs7", "src", 0, "dst", 0, 8)
        for _ in range(500):  # (the old instance's handshakes done)
            if len(socks) == 2:
                break
            time.sleep(0.01)
        srv.close()  # the old host's listener is gone; its connections stay open
        b = TcpTransport("rs7", port=address[1])
        dst = np.zeros(8, np.uint8)
        b.register("dst", dst)
        a.connect("rs7", address)
        err = pending.exception(5)
        assert isinstance(err, PeerLostError) and "restarted" in str(err), err
        assert a.write("rs7", "src", 0, "dst", 0, 8).result(5) == 8
        assert dst.tolist() == list(range(8))
        a.connect("rs7", address)  # the same instance: nothing to do
        assert len(a._peers["rs7"]) == 1 and len(b._peers["ra7"]) == 1
        assert a.write("rs7", "src", 0, "dst", 0, 8).result(5) == 8
    finally:
        a.close()
        if b is not None:
            b.close()
        for s in [srv, *socks]:
            s.close()


def test_rdma_connect_again_to_a_peer_restarted_at_its_address_takes_the_transfers(fake_verbs):
    """The same on rdma (pyverbs stand-in): its `connect` returned while the old peer looked ready, so a's writes kept
    going to the old endpoint; now they go to the new one at the address."""
    a = make_transport({"backend": "rdma", "name": "ra7"})
    old = make_transport({"backend": "rdma", "name": "rb7"})
    new = None
    try:
        address = old.address
        a.connect("rb7", address)
        a.register("src", np.arange(8, dtype=np.uint8))
        old_dst = np.zeros(8, np.uint8)
        old.register("dst", old_dst)
        assert a.write("rb7", "src", 0, "dst", 0, 8).result(10) == 8
        old_dst[:] = 0
        old.control._stopping.set()  # its listener goes (a blocked accept holds the port until it is shut down) ...
        old.control._listener.shutdown(socket.SHUT_RDWR)
        old.control._listener.close()  # ... its connections stay open
        new = make_transport({"backend": "rdma", "name": "rb7", "port": address[1]})
        new_dst = np.zeros(8, np.uint8)
        new.register("dst", new_dst)
        a.connect("rb7", address)
        assert a.write("rb7", "src", 0, "dst", 0, 8, notify=3).result(10) == 8
        assert new_dst.tolist() == list(range(8)) and old_dst.tolist() == [0] * 8
        assert new.wait_notification(tag=3, timeout=5).length == 8
    finally:
        a.close()
        old.close()
        if new is not None:
            new.close()


# ---- tcp: messages on the low connection -------------------------------------------------------------------------


def test_tcp_send_takes_a_priority_class():
    """`send(..., priority="low")` goes on the low connection (what the RDMA backend's questions use); messages of one
    class keep their order; a bad class is a ValueError."""
    from test_transport_conformance import make_pair

    a, b = make_pair("tcp")
    try:
        frames = []
        low = a._live[b.name].conns["low"]
        enqueue = low.enqueue
        low.enqueue = lambda header, *args, **kw: frames.append(header) or enqueue(header, *args, **kw)
        for f in [a.send(b.name, b"m%d" % i, priority="low") for i in range(3)]:
            f.result(5)
        assert [b.recv(timeout=5) for _ in range(3)] == [(a.name, b"m0"), (a.name, b"m1"), (a.name, b"m2")]
        assert len(frames) == 3
        with pytest.raises(ValueError, match="priority"):
            a.send(b.name, b"x", priority="medium")
    finally:
        a.close()
        b.close()


# ---- a posted transfer cannot be cancelled -------------------------------------------------------------------------


def test_tcp_a_posted_transfers_cancel_returns_false_as_its_bytes_land(monkeypatch):
    """`cancel()` on a write in flight returned True (its future then said "cancelled") while the bytes landed and the
    notification came all the same: `Future.cancel` returns False for a call being executed, and callers (this repo's
    `wait([f for f in futs if not f.cancel()])`) take True as "never runs". a's acknowledgements are held here."""
    from test_transport_conformance import make_pair

    from transport import tcp

    gate = threading.Event()
    pop_acks = tcp._Peer.pop_acks
    monkeypatch.setattr(tcp._Peer, "pop_acks", lambda self, payload: (gate.wait(10), pop_acks(self, payload))[1])
    a, b = make_pair("tcp")
    try:
        a.register("src", np.arange(16, dtype=np.uint8))
        dst = np.zeros(16, np.uint8)
        b.register("dst", dst)
        w = a.write(b.name, "src", 0, "dst", 0, 8, notify=1)
        m = a.write_many(b.name, [("src", 8, 8, "dst", 8)], notify=2)
        assert [b.wait_notification(timeout=5).tag for _ in range(2)] == [1, 2]  # landed, not acknowledged yet
        assert not w.done() and not m.done()
        assert not w.cancel() and not m.cancel()
        gate.set()
        assert (w.result(5), m.result(5)) == (8, 8) and dst.tolist() == list(range(16))
    finally:
        gate.set()
        a.close()
        b.close()


def test_rdma_a_posted_transfers_cancel_returns_false(fake_verbs):
    """The same on rdma (stand-in: the work requests ran, their completions held): write, notifying write, write_many
    (the base's combined future) and read said cancelled while the bytes moved."""
    a = make_transport({"backend": "rdma", "name": "ra7c"})
    b = make_transport({"backend": "rdma", "name": "rb7c"})
    try:
        a.connect("rb7c", b.address)
        a.register("src", np.arange(32, dtype=np.uint8))
        a.register("back", back := np.zeros(8, np.uint8))
        dst = np.zeros(32, np.uint8)
        b.register("dst", dst)
        a.remote_region("rb7c", "dst")
        fake_verbs.hold = True
        futs = [
            a.write("rb7c", "src", 0, "dst", 0, 8),
            a.write("rb7c", "src", 8, "dst", 8, 8, notify=3),
            a.write_many("rb7c", [("src", 16, 8, "dst", 16), ("src", 24, 8, "dst", 24)]),
            a.read("rb7c", "back", 0, "dst", 0, 8),
        ]
        assert dst.tolist() == list(range(32)) and not any(f.done() for f in futs)
        assert [f.cancel() for f in futs] == [False] * 4
        fake_verbs.hold = False
        assert [f.result(10) for f in futs] == [8, 8, 16, 8] and back.tolist() == list(range(8))
    finally:
        fake_verbs.hold = False
        a.close()
        b.close()


# ---- tcp: endpoint names and the handshake's size ---------------------------------------------------------------


def test_tcp_long_endpoint_names_connect_and_one_past_the_limit_is_refused():
    """A HELLO carries both endpoint names, JSON-escaped (a CJK character: 6 bytes), in at most 4 KiB: a pair of
    700-character CJK names made every connect fail with "Connection reset by peer" (a PeerLostError blaming the
    peer). Names of up to ENDPOINT_NAME_MAX (4,096) UTF-8 bytes connect now; a longer one is refused when built."""
    from transport.tcp import TcpTransport

    name = "\u4e2d" * 700
    a, b = TcpTransport(name + "a"), TcpTransport(name + "b")
    try:
        a.connect(b.name, b.address, timeout=5)
        b.wait_for_peer(a.name, timeout=5)
        a.send(b.name, b"hi").result(5)
        assert b.recv(timeout=5) == (a.name, b"hi")
    finally:
        a.close()
        b.close()
    for bad in ("x" * 4097, "\u4e2d" * 1366, "kv\ud800"):
        with pytest.raises(ValueError, match="valid UTF-8 of at most 4096 bytes"):
            TcpTransport(bad)


# ---- TransferFuture: a second completion (last here: on the commit before it hung every later future) -----------


def test_a_transfer_future_completed_twice_raises_invalid_state_and_does_not_hang():
    """A second completion of a `TransferFuture` no one waited on (a peer failure racing an acknowledgement; the
    second failure of a `write_many` part into its combined future) raised InvalidStateError with the future's repr
    while it held the module lock that repr takes: that thread, and then every transfer of the process, hung."""
    from concurrent.futures import InvalidStateError

    from transport.base import TransferFuture, combine_futures

    out: list = []

    def twice() -> None:
        f = TransferFuture()
        f.set_exception(PeerLostError("first"))
        for complete in (lambda: f.set_result(1), lambda: f.set_exception(PeerLostError("second"))):
            try:
                complete()
            except InvalidStateError as e:
                out.append(e)
        parts = [TransferFuture(), TransferFuture()]
        both = combine_futures(parts, 2)
        parts[0].set_exception(PeerLostError("a"))
        parts[1].set_exception(PeerLostError("b"))
        out.append(both.exception(1))

    t = threading.Thread(target=twice, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "a second completion of a TransferFuture hung"
    assert [type(e).__name__ for e in out] == ["InvalidStateError", "InvalidStateError", "PeerLostError"], out
    assert "a" == str(out[2])
    g = TransferFuture()
    g.set_result(3)
    assert g.result(1) == 3
