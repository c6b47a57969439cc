"""Transport defects and additions of the eighth transport hunt; each test failed on the commit before.

- every backend: `disconnect(peer)` (new, in `Transport`'s interface): the peer is dropped now, its pending transfers
  fail with `PeerLostError`, and once the call returned no one-sided write or read of that peer lands in this side's
  regions (tcp: the sets closed, their readers joined, and fenced so a frame already in the receive buffer behind a
  hook does not land; inproc: the link fenced, running copies waited for; rdma: the QPs moved to the error state);
  a later `connect` makes a fresh set. The runtime frees a cancelled request's buffer area with it.
- base: `TransferFuture.result(timeout=inf)` (or 1e10) raised OverflowError from the lock's wait; it waits forever,
  as `transport.base.deadline` takes such timeouts (so does `remote_region(timeout=inf)`, tcp and rdma).
- tcp: `connect` right after the peer dropped our set (its `disconnect` or watchdog; our reader had not seen the
  reset) returned without connecting: the probe now says whether the peer holds a set of ours.
- rdma: a peer lost by its control channel (stalled, then going on) landed the writes its NIC still held in our MRs
  after it left `peers()`: a lost peer's QPs go to the error state. A reply to a peer lost meanwhile was logged as a
  bad control message with a traceback.
"""

from __future__ import annotations

import ctypes
import json
import socket
import threading
import time

import numpy as np
import pytest
from _fake_verbs import install

from transport.base import PeerLostError, TransportError, make_transport

_names = iter(range(10**6))


@pytest.fixture
def fake_verbs(monkeypatch):
    """tests/_fake_verbs.py's pyverbs stand-in, whose QPs know their connected QP: a work request whose responder QP is
    in the error state fails (and breaks the requester's QP), and `QP.modify` moves a QP to the error state, both under
    the stand-in's lock, so no memmove into a responder runs once its `modify` returned (as a NIC)."""
    return install(monkeypatch)


def _pair(backend: str, **kw):
    n = next(_names)
    a = make_transport({"backend": backend, "name": f"h8a{n}", **kw})
    b = make_transport({"backend": backend, "name": f"h8b{n}", **kw})
    b.connect(a.name, a.address)
    a.wait_for_peer(b.name, timeout=10)
    return a, b


# ---- disconnect ----------------------------------------------------------------------------------------------------


def _disconnect_under_traffic(a, b, size: int) -> None:
    """b keeps writing (both classes, and write_many) into a's region, and a keeps reading b's bytes into it; a
    disconnects b: nothing lands in the region afterwards, both sides' pending transfers fail with PeerLostError, and
    a `connect` again works."""
    dst = np.zeros(size, np.uint8)
    a.register("dst", dst)
    b.register("src", np.full(size, 7, np.uint8))
    stop, errors, rounds = threading.Event(), [], [0]

    def writer():
        while not stop.is_set():
            try:
                futs = [b.write(a.name, "src", 0, "dst", 0, size, priority=p) for p in ("low", "high")]
                futs.append(b.write_many(a.name, [("src", 0, 100, "dst", 0), ("src", 0, 100, "dst", size - 100)]))
                for f in futs:
                    f.result(10)
                rounds[0] += 1
            except TransportError as e:
                errors.append(e)
                return

    def reader():
        while not stop.is_set():
            try:
                a.read(b.name, "dst", 0, "src", 0, size).result(10)
            except TransportError as e:
                errors.append(e)
                return

    threads = [threading.Thread(target=writer, daemon=True), threading.Thread(target=reader, daemon=True)]
    for t in threads:
        t.start()
    try:
        end = time.monotonic() + 10
        while rounds[0] < 2 and time.monotonic() < end:
            time.sleep(0.001)
        assert rounds[0] >= 2 and not errors, errors
        a.disconnect(b.name)
        dst[:] = 0
        for t in threads:
            t.join(10)
        time.sleep(0.1)
        assert not dst.any(), "bytes of the peer landed after disconnect returned"
        assert len(errors) == 2 and all(isinstance(e, PeerLostError) for e in errors), errors
        assert a.name not in b.peers()
        assert b.name not in a.peers()
        a.disconnect(b.name)  # nothing to do now
    finally:
        stop.set()
    end = time.monotonic() + 5
    while a.name in b.peers() and time.monotonic() < end:  # (the peer notices the closed set)
        time.sleep(0.01)
    b.connect(a.name, a.address)
    a.wait_for_peer(b.name, timeout=10)
    assert b.write(a.name, "src", 0, "dst", 0, 64).result(10) == 64 and dst[:64].tolist() == [7] * 64
    assert a.read(b.name, "dst", 64, "src", 0, 8).result(10) == 8 and dst[64:72].tolist() == [7] * 8


@pytest.mark.parametrize("backend", ["inproc", "tcp"])
def test_disconnect_under_a_writer_that_keeps_writing(backend):
    a, b = _pair(backend)
    try:
        _disconnect_under_traffic(a, b, 1 << 20)
    finally:
        a.close()
        b.close()


def test_rdma_disconnect_under_a_writer_that_keeps_writing(fake_verbs):
    a, b = _pair("rdma")
    try:
        _disconnect_under_traffic(a, b, 1 << 20)
    finally:
        a.close()
        b.close()


class _GatedPacer:
    """Lets the first chunk go at once and holds every later one until `gate` is set."""

    def __init__(self):
        self.gate, self.held = threading.Event(), threading.Event()
        self.chunks = 0

    def pace(self, nbytes, priority):
        self.chunks += 1
        if self.chunks > 1:
            self.held.set()
            assert self.gate.wait(10)


def test_inproc_disconnect_stops_a_paced_copy_in_flight():
    """b's paced 3 MiB write has landed its first MiB and waits for the pacer; a disconnects b: the rest of it never
    lands (the copy stops at its next chunk) and the write fails with PeerLostError."""
    from transport.inproc import InProcFabric, InProcTransport

    fabric, pacer = InProcFabric(), _GatedPacer()
    a, b = InProcTransport("pa8", fabric=fabric), InProcTransport("pb8", fabric=fabric, pacer=pacer)
    try:
        b.connect("pa8")
        n = 3 << 20
        dst = np.zeros(n, np.uint8)
        a.register("dst", dst)
        b.register("src", np.full(n, 5, np.uint8))
        f = b.write("pa8", "src", 0, "dst", 0, n)
        assert pacer.held.wait(10)
        assert dst[0] == 5 and dst[-1] == 0  # the first chunk landed, the copy waits for the next
        a.disconnect("pb8")
        dst[:] = 0
        pacer.gate.set()
        assert isinstance(f.exception(10), PeerLostError)
        assert not dst.any()
        assert a.peers() == [] and b.peers() == []
        with pytest.raises(PeerLostError, match="not connected"):
            b.write("pa8", "src", 0, "dst", 0, 8)
    finally:
        pacer.gate.set()
        a.close()
        b.close()


def test_rdma_disconnect_moves_the_queue_pairs_to_the_error_state(fake_verbs):
    """A work request of b still on its way when a disconnects (posted on b's QP afterwards, as one already on the wire
    would arrive) is not executed by a's QP: a's QPs are in the error state, so nothing lands and b's request fails."""
    a, b = _pair("rdma")
    try:
        dst = np.zeros(64, np.uint8)
        a.register("dst", dst)
        b.register("src", np.full(64, 9, np.uint8))
        assert b.write(a.name, "src", 0, "dst", 0, 64).result(10) == 64
        raddr, rkey, _ = b.remote_region(a.name, "dst")
        qp = b._peers[a.name].qps["low"]  # (b's QP, still connected to a's as far as b knows)
        dst[:] = 0
        a.disconnect(b.name)
        assert all(q.error for p in a._peers.values() for q in [*p.qps.values(), *p.spare_qps])
        from pyverbs.wr import SGE, SendWR

        wr = SendWR(wr_id=1 << 40, opcode=fake_verbs.modules["pyverbs.enums"].IBV_WR_RDMA_WRITE, sg=[SGE(0, 64, 0)])
        wr.sg[0].addr = ctypes.addressof(ctypes.c_char.from_buffer(b.region("src").view))
        wr.set_wr_rdma(rkey, raddr)
        qp.post_send(wr)
        assert not dst.any()
        assert a.peers() == []
    finally:
        a.close()
        b.close()


class _SlowRegions(dict):
    """A region table whose first lookup by a reader thread after `armed` waits 0.5 s: the frame's header is in,
    its payload about to land."""

    def __init__(self):
        super().__init__()
        self.armed, self.entered = False, threading.Event()

    def get(self, key, default=None):
        if self.armed and threading.current_thread().name.endswith("-rx"):
            self.armed = False
            self.entered.set()
            time.sleep(0.5)
        return super().get(key, default)


@pytest.mark.parametrize("lost_before", [False, True])
def test_tcp_disconnect_waits_for_a_frame_being_received(lost_before):
    """a's reader has b's write frame in hand (header parsed, payload about to land) when a disconnects b: the payload
    lands before `disconnect` returns, never after it (the region is reused at once). `lost_before`: a had dropped
    the set already (its watchdog), so b is not in `a.peers()`; `disconnect` still waits for that reader."""
    from transport.tcp import TcpTransport

    a = TcpTransport("ja8")
    a._regions_by_id = slow = _SlowRegions()  # (before any reader thread picks the table up)
    b = TcpTransport("jb8")
    try:
        b.connect("ja8", a.address)
        a.wait_for_peer("jb8", timeout=10)
        dst = np.zeros(64, np.uint8)
        a.register("dst", dst)
        b.register("src", np.full(64, 3, np.uint8))
        b.remote_region("ja8", "dst")
        slow.armed = True
        f = b.write("ja8", "src", 0, "dst", 0, 64)
        assert slow.entered.wait(10)
        if lost_before:
            for p in list(a._peers["jb8"]):
                a._fail_peer(p, PeerLostError("no progress"))
            assert a.peers() == []
        a.disconnect("jb8")
        dst[:] = 0
        time.sleep(0.7)
        assert not dst.any(), "the frame landed after disconnect returned"
        assert isinstance(f.exception(10), PeerLostError)
    finally:
        a.close()
        b.close()


def _raw_client(a, name: str) -> dict:
    """A hand-driven tcp peer `name` connected to `a` (both connections' handshakes, no secret)."""
    from transport.tcp import HEADER, OP_HELLO, pack_header, unpack_header

    session, socks = f"raw-{name}", {}
    for stream in ("high", "low"):
        s = socket.create_connection(a.address, timeout=10)
        hello = json.dumps({"name": name, "peer": a.name, "session": session, "stream": stream, "nonce": "00"})
        s.sendall(pack_header(OP_HELLO, length=len(hello)) + hello.encode())
        s.recv(unpack_header(s.recv(HEADER.size, socket.MSG_WAITALL))[4], socket.MSG_WAITALL)
        socks[stream] = s
    return socks


def test_tcp_disconnect_fences_a_frame_already_in_the_receive_buffer():
    """A message and a write frame arrive in one segment; a's `on_message` hook holds the reader (past `disconnect`'s
    wait for it) with the write frame in its receive buffer. After `disconnect` returned and the hook let go, the
    write does not land (the reader stops at the fence instead of taking the next frame from its buffer)."""
    from transport.tcp import OP_MSG, OP_WRITE, TcpTransport, pack_header

    a = TcpTransport("fa8")
    entered, release = threading.Event(), threading.Event()

    def hook(peer, payload):
        entered.set()
        release.wait(10)
        return True

    a.on_message = hook
    socks = _raw_client(a, "fb8")
    try:
        a.wait_for_peer("fb8", timeout=10)
        dst = np.zeros(64, np.uint8)
        rid = a.register("dst", dst).region_id
        frames = pack_header(OP_MSG, length=2) + b"hi" + pack_header(OP_WRITE, 0, rid, 0, 64, 0, 1) + b"\x07" * 64
        socks["high"].sendall(frames)
        assert entered.wait(10)
        a.disconnect("fb8")  # (waits CLOSE_GRACE_S for the reader busy in the hook, then returns: it is fenced)
        assert a.peers() == []
        release.set()
        time.sleep(0.3)
        assert not dst.any(), "a frame of the dropped peer landed after disconnect returned"
    finally:
        release.set()
        a.close()
        for s in socks.values():
            s.close()


# ---- waits of inf or 1e10 s -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [float("inf"), 1e10, 1e300])
@pytest.mark.parametrize("callback", [False, True])
def test_a_transfer_futures_wait_of_inf_or_a_huge_timeout_waits_for_the_result(timeout, callback):
    """`result` / `exception` with inf or 1e10 raised OverflowError (the lock's wait); they wait as with None, as
    `transport.base.deadline` takes such timeouts (also once a callback made the Future's Condition)."""
    from transport.base import TransferFuture

    for fail in (False, True):
        f = TransferFuture()
        if callback:
            f.add_done_callback(lambda _: None)
        done = (f.set_exception, PeerLostError("gone")) if fail else (f.set_result, 7)
        timer = threading.Timer(0.05, done[0], (done[1],))
        timer.start()
        try:
            if fail:
                assert isinstance(f.exception(timeout), PeerLostError)
            else:
                assert f.result(timeout) == 7
        finally:
            timer.join(5)
    f = TransferFuture()
    with pytest.raises(ValueError, match="nan"):
        f.result(float("nan"))
    with pytest.raises(TypeError, match="number of seconds"):
        f.result("5")
    with pytest.raises(TimeoutError):
        f.result(0.01)


def _outcome(out: list, fn, *args) -> None:
    try:
        out.append(fn(*args))
    except Exception as e:  # noqa: BLE001 - kept for the assertion
        out.append((e,))


@pytest.mark.parametrize("backend", ["tcp", "rdma"])
def test_remote_region_takes_an_infinite_timeout(backend, request):
    if backend == "rdma":
        request.getfixturevalue("fake_verbs")
    a, b = _pair(backend)
    try:
        b.register("r", np.zeros(32, np.uint8))
        b.register("s", np.zeros(16, np.uint8))
        for name, timeout, size in (("r", float("inf"), 32), ("s", 1e10, 16)):
            out = []
            with b._lock:  # (b answers once it is released: the call waits for the reply)
                t = threading.Thread(target=_outcome, args=(out, a.remote_region, b.name, name, timeout))
                t.start()
                time.sleep(0.1)
            t.join(10)
            assert out and out[0][-1] == size, out
    finally:
        a.close()
        b.close()


# ---- rdma: a question of a peer that is gone --------------------------------------------------------------------


def test_rdma_a_question_of_a_peer_lost_meanwhile_is_not_logged_as_a_bad_message(fake_verbs, caplog):
    """b handles a's region question after a's control set is gone (a closed, or disconnected: the runtime does that
    on every cancel): the reply cannot go out, which is no error of the message (it was logged as "bad rdma control
    message" with a traceback at ERROR)."""
    import logging

    from transport.rdma import _INTERNAL

    a, b = _pair("rdma")
    try:
        b.register("d", np.zeros(8, np.uint8))
        a.close()
        end = time.monotonic() + 5
        while b.peers() and time.monotonic() < end:
            time.sleep(0.01)
        assert b.peers() == []
        with caplog.at_level(logging.INFO, logger="transport.rdma"):
            b._on_control(a.name, _INTERNAL + json.dumps({"op": "region", "name": "d", "req": 1}).encode())
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    finally:
        a.close()
        b.close()


def test_tcp_connect_right_after_the_peer_disconnected_us_makes_a_new_set(monkeypatch):
    """a drops b's set (its watchdog, or `disconnect`); before b's readers have seen the reset (held here), b connects
    to a again: its old set still looked live and a's instance answered the probe, so `connect` returned without
    connecting (2 in 50 tries of disconnect + connect without the hold) and b's transfers failed. The probe now says
    whether a holds a set of b's: it does not, so b drops its dead set and connects a new one."""
    from transport.tcp import TcpTransport

    gate = threading.Event()
    fail_peer = TcpTransport._fail_peer
    a, b = TcpTransport("ca8"), TcpTransport("cb8")

    def held(self, peer, err, graceful=False):
        if self is b and threading.current_thread().name.endswith("-rx"):
            gate.wait(10)  # (b's readers have not noticed the reset yet)
        return fail_peer(self, peer, err, graceful)

    monkeypatch.setattr(TcpTransport, "_fail_peer", held)
    try:
        b.connect("ca8", a.address)
        a.wait_for_peer("cb8", timeout=10)
        dst = np.zeros(8, np.uint8)
        a.register("dst", dst)
        b.register("src", np.arange(8, dtype=np.uint8))
        for p in list(a._peers["cb8"]):  # (as a's watchdog does; `a.disconnect("cb8")` too)
            a._fail_peer(p, PeerLostError("dropped by a"))
        assert b.peers() == ["ca8"]  # (b's old set still looks live)
        b.connect("ca8", a.address)
        assert a.peers() == ["cb8"]
        assert b.write("ca8", "src", 0, "dst", 0, 8).result(10) == 8 and dst.tolist() == list(range(8))
        gate.set()
        assert b.write("ca8", "src", 0, "dst", 0, 8).result(10) == 8
        assert [q.dead for q in b._peers["ca8"]] == [None]
    finally:
        gate.set()
        a.close()
        b.close()


def test_rdma_a_peer_lost_by_its_control_channel_lands_no_write_afterwards(fake_verbs):
    """a's control set to b is dropped (its watchdog: b stalled, not dead), so a no longer lists b; b goes on and a
    work request its NIC still holds arrives (posted on b's QP here): it landed in a's region, whose owner took the
    peer for gone (the runtime frees a cancelled request's area when its peer is not in `peers()`). a's QPs to b now
    go to the error state whenever b is lost."""
    from pyverbs.wr import SGE, SendWR

    a, b = _pair("rdma")
    try:
        dst = np.zeros(64, np.uint8)
        a.register("dst", dst)
        b.register("src", np.full(64, 4, np.uint8))
        assert b.write(a.name, "src", 0, "dst", 0, 64).result(10) == 64
        raddr, rkey, _ = b.remote_region(a.name, "dst")
        qp = b._peers[a.name].qps["low"]
        dst[:] = 0
        for s in list(a.control._peers[b.name]):  # (as a's watchdog drops a silent peer)
            a.control._fail_peer(s, PeerLostError("no progress"))
        assert a.peers() == []
        wr = SendWR(wr_id=1 << 40, opcode=fake_verbs.modules["pyverbs.enums"].IBV_WR_RDMA_WRITE, sg=[SGE(0, 64, 0)])
        wr.sg[0].addr = ctypes.addressof(ctypes.c_char.from_buffer(b.region("src").view))
        wr.set_wr_rdma(rkey, raddr)
        qp.post_send(wr)
        assert not dst.any(), "a write of a peer already lost landed"
    finally:
        a.close()
        b.close()
