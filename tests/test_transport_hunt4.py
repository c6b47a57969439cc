"""Transport defects found by the fourth transport hunt; each test failed on the commit before.

- tcp: a `send` larger than the *peer's* `max_message_bytes` resolved its future, then the peer closed the whole
  connection set (every pending transfer failed). The limits are now exchanged in the handshake and such a send
  raises `TransportError` at once, naming both sizes; the set stays up. A bad limit in a handshake is refused.
- tcp: an exception from the application's `on_message` hook was taken for a lost peer: the whole set closed and the
  message was lost. It is now logged with its traceback, the message goes to `recv`, and the set stays up.
- tcp: `connect(peer, address)` while a live set to `peer` (opened by this endpoint) was connected elsewhere returned
  without connecting and ignored the address. It now raises `TransportError` naming both addresses (the same
  endpoint spelled differently, or a set the peer opened, is still fine).
- tcp: an endpoint could not listen on an IPv6 address (`host="::1"`, or a secret and "fd00::5"): the listener was
  always AF_INET ("Address family for hostname not supported"), though `is_loopback` and the socket options handle
  IPv6.
- tcp: a transfer from an ordinary thread to a region not asked about yet waited at most a fixed 10 s for the
  peer's reply, then raised a bare `TimeoutError()` (no message, not a TransportError), though the peer was healthy
  and its reply only sat behind a long frame (a paced 130 MiB high-class write: 13 s). It now waits like the transfer
  itself: until the reply, or the watchdog drops a peer silent for `timeout_s`. `remote_region(timeout=)` names the
  region when it times out.
- tcp: messages still queued (or being sent) when their own endpoint closed failed with `PeerLostError`
  ("connection to 'a' closed"), while its transfers got the `TransportClosedError` the `close` contract names (and
  inproc gives both).
- inproc: a numpy integer remote offset was a `RegionError` ("offset and length must be ints"); tcp takes it (as
  `tests/test_transport_tcp.py` requires), so code that ran on tcp failed on inproc.
- inproc: a closed peer stayed in `peers()` for ever (tcp drops it once the set is lost), a closed endpoint still
  listed its peers, and a peer's writes went to an endpoint restarted under the closed one's name that had never
  connected (tcp: `PeerLostError` until `connect` again).
- inproc: `close` returned while a peer's copy into (or out of) its regions was still running: the bytes kept landing
  in the closed endpoint's buffer afterwards (a buffer reused after close was overwritten). `close` now waits for
  running copies (a paced one stops at its next chunk), as tcp's `close` joins its readers.
- peer.py: a spawned peer that failed to start (a bad config) or to connect back made `spawn_peer` / `start` wait out
  their whole timeout (60 s / 30 s) and raise "did not start" / "not ready", the cause only on the child's stderr.
  They now raise RuntimeError with the peer's error as soon as it fails.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time

import numpy as np
import pytest
from test_transport_conformance import make_pair

import transport.tcp as tcpmod
from transport.base import PeerLostError, TransportClosedError, TransportError, make_transport
from transport.peer import spawn_peer
from transport.tcp import HEADER, OP_HELLO, OP_HELLO_ACK, TcpTransport, pack_header, unpack_header


@pytest.fixture(params=["inproc", "tcp"])
def pair(request):
    a, b = make_pair(request.param)
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def closing():
    eps: list = []
    yield eps.append
    for ep in eps:
        ep.close()


@pytest.mark.parametrize("small", ["accepting", "connecting"])
def test_tcp_send_past_the_peers_message_limit_raises_and_keeps_the_set(closing, small):
    """b accepts messages of at most 1000 bytes (b accepted a's connection, or b connected to a): a's send of 2000
    bytes raises at once naming both sizes, and the set stays up for messages and writes."""
    a = TcpTransport("a")
    b = TcpTransport("b", max_message_bytes=1000)
    closing(a)
    closing(b)
    dst = np.zeros(64, np.uint8)
    a.register("src", np.arange(64, dtype=np.uint8))
    b.register("dst", dst)
    if small == "accepting":
        a.connect("b", b.address)
        b.wait_for_peer("a", timeout=5)
    else:
        b.connect("a", a.address)
        a.wait_for_peer("b", timeout=5)
    with pytest.raises(TransportError, match=r"message of 2000 bytes exceeds the max_message_bytes=1000 of peer 'b'"):
        a.send("b", b"x" * 2000).result(5)
    assert a.send("b", b"y" * 1000).result(5) == 1000  # at the limit: delivered
    assert b.recv(timeout=5) == ("a", b"y" * 1000)
    assert b.send("a", b"z" * 1000).result(5) == 1000
    assert a.recv(timeout=5) == ("b", b"z" * 1000)
    assert a.write("b", "src", 0, "dst", 0, 64).result(5) == 64
    np.testing.assert_array_equal(dst, np.arange(64, dtype=np.uint8))
    assert a.peers() == ["b"] and b.peers() == ["a"]


@pytest.mark.parametrize("limit", [0, -1, "16", 2.5, True])
def test_tcp_handshake_with_a_bad_message_limit_is_refused(closing, limit, caplog):
    """A HELLO whose max_message_bytes is not an int >= 1 is refused (logged, connection closed), and so is a
    HELLO_ACK: `connect` raises naming it."""
    server = TcpTransport("srv")
    closing(server)
    body = {"name": "raw", "peer": "srv", "session": "s", "stream": "high", "nonce": "00" * 32}
    payload = json.dumps({**body, "max_message_bytes": limit}).encode()
    with caplog.at_level(logging.ERROR, logger="transport.tcp"), socket.create_connection(server.address, 5) as s:
        s.sendall(pack_header(OP_HELLO, length=len(payload)) + payload)
        s.settimeout(5)
        assert s.recv(4096) == b""  # closed without an answer
    assert "max_message_bytes" in caplog.text

    lst = socket.create_server(("127.0.0.1", 0))

    def fake_server() -> None:  # (the client gives up after its first connection's HELLO_ACK)
        c, _ = lst.accept()
        with c:
            _, _, _, _, length, _, _ = unpack_header(tcpmod._recv_exact(c, HEADER.size))
            tcpmod._recv_exact(c, length)
            ack = json.dumps({"name": "fake", "auth": False, "max_message_bytes": limit}).encode()
            c.sendall(pack_header(OP_HELLO_ACK, length=len(ack)) + ack)
            with contextlib.suppress(OSError):
                c.recv(1)

    t = threading.Thread(target=fake_server, daemon=True)
    t.start()
    with pytest.raises(TransportError, match=r"'fake' sent max_message_bytes="):
        server.connect("fake", lst.getsockname())
    t.join(5)
    lst.close()


def test_tcp_on_message_hook_that_raises_keeps_the_set_and_queues_the_message(closing, caplog):
    """A hook that raises on one message: the error is logged with its traceback, the message reaches `recv`, the
    set stays up, and later messages go through the hook again."""
    a, b = TcpTransport("a"), TcpTransport("b")
    closing(a)
    closing(b)
    handled: list = []
    good = threading.Event()

    def hook(peer: str, payload: bytes) -> bool:
        if payload == b"bad":
            raise KeyError("the researcher's bug")
        handled.append(payload)
        good.set()
        return True

    b.on_message = hook
    a.register("src", np.arange(16, dtype=np.uint8))
    dst = np.zeros(16, np.uint8)
    b.register("dst", dst)
    a.connect("b", b.address)
    pending = a.write("b", "src", 0, "dst", 0, 16)
    with caplog.at_level(logging.ERROR, logger="transport.tcp"):
        a.send("b", b"bad").result(5)
        assert b.recv(timeout=5) == ("a", b"bad")
    assert "on_message hook failed" in caplog.text and "the researcher's bug" in caplog.text
    assert pending.result(5) == 16
    a.send("b", b"good").result(5)
    assert good.wait(5) and handled == [b"good"]  # the hook took it: not queued for recv
    assert len(b.messages._items) == 0
    assert a.peers() == ["b"] and b.peers() == ["a"]


def test_tcp_connect_under_a_live_name_to_another_address_raises(closing):
    """a is connected to "b"; another endpoint also named "b" listens elsewhere. `connect("b", other address)` raises
    naming both addresses instead of returning as if connected there; the same address (also as a list, or as
    "localhost") and a set the peer opened are still no-ops."""
    a, b, b2 = TcpTransport("a"), TcpTransport("b"), TcpTransport("b")
    for ep in (a, b, b2):
        closing(ep)
    a.connect("b", b.address)
    host, port = b.address
    with pytest.raises(TransportError, match=rf"'b' is connected at {host}:{port}, not {host}:{b2.address[1]}"):
        a.connect("b", b2.address)
    with pytest.raises(TypeError, match=r"must be \(host, port\)"):
        a.connect("b", "b")  # a bad address is named even while the name is connected
    a.connect("b", b.address)
    a.connect("b", list(b.address))
    a.connect("b", ("localhost", port))
    b.wait_for_peer("a", timeout=5)
    b.connect("a", a.address)  # the set a opened: b does not know a's address and keeps it
    assert b2.peers() == [] and a.peers() == ["b"] and b.peers() == ["a"]


def test_numpy_integer_remote_offsets_work_on_every_backend(pair):
    """Offsets computed with numpy (np.cumsum of sizes, say): a numpy integer remote offset works in write, read and
    write_many entries, and the notification's offset is a plain int."""
    a, b = pair
    src = np.arange(64, dtype=np.uint8)
    back = np.zeros(16, np.uint8)
    dst = np.zeros(64, np.uint8)
    a.register("src", src)
    a.register("back", back)
    b.register("dst", dst)
    offsets = np.cumsum([0, 16, 16, 16])  # numpy int64s
    assert a.write(b.name, "src", 0, "dst", offsets[1], 16, notify=1).result(5) == 16
    n = b.wait_notification(tag=1, timeout=5)
    assert n.offset == 16 and type(n.offset) is int
    entries = [("src", 16, 16, "dst", offsets[2]), ("src", 32, 16, "dst", np.uint32(48))]
    assert a.write_many(b.name, entries, notify=2).result(5) == 32
    assert b.wait_notification(tag=2, timeout=5).offset == 48
    np.testing.assert_array_equal(dst[16:], src[:48])
    assert a.read(b.name, "back", 0, "dst", offsets[3], 16).result(5) == 16
    np.testing.assert_array_equal(back, src[32:48])


def _until(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
    return cond()


def test_a_closed_peer_leaves_peers_and_its_successor_must_connect_again(pair):
    """b closes: a stops listing it; an endpoint started under b's name is not connected to a until a connects
    again (a write before that is a PeerLostError and lands nowhere); a closed endpoint lists no peers."""
    a, b = pair
    a.register("src", np.arange(16, dtype=np.uint8))
    b.register("dst", np.zeros(16, np.uint8))
    assert a.write(b.name, "src", 0, "dst", 0, 16).result(5) == 16
    b.close()
    assert _until(lambda: a.peers() == []), a.peers()
    assert b.peers() == []
    b2 = make_transport({"backend": a.backend, "name": b.name})
    try:
        dst = np.zeros(16, np.uint8)
        b2.register("dst", dst)
        with pytest.raises(PeerLostError):
            a.write(b.name, "src", 0, "dst", 0, 16).result(5)
        assert not dst.any() and b2.peers() == []
        a.connect(b2.name, b2.address)
        assert a.write(b2.name, "src", 0, "dst", 0, 16).result(5) == 16
        np.testing.assert_array_equal(dst, np.arange(16, dtype=np.uint8))
        assert _until(lambda: b2.peers() == [a.name])
        a.close()
        assert a.peers() == []
        assert _until(lambda: b2.peers() == []), b2.peers()
    finally:
        b2.close()


def test_a_spawned_peer_that_fails_says_why_at_once():
    """A peer process whose transport cannot be built, or that cannot connect back, fails `spawn_peer` / `start`
    with its error, not a TimeoutError after the whole timeout."""
    with pytest.raises(RuntimeError, match="did not start: ValueError: .*max_message_bytes must be an int >= 1"):
        spawn_peer({"backend": "tcp", "name": "bad", "max_message_bytes": 0}, {"buf": 8}, timeout=30)
    peer = spawn_peer({"backend": "tcp", "name": "lonely"}, {"buf": 8}, timeout=30)
    try:
        with pytest.raises(RuntimeError, match="not ready: .*'nobody'"):
            peer.start(("nobody", ("127.0.0.1", 1)), timeout=30)
    finally:
        peer.kill()


def test_no_bytes_land_in_a_closed_endpoints_region_after_close_returned(pair, monkeypatch):
    """b closes while a's write into it is being copied: once `close` returned, b's buffer no longer changes (the
    write either landed before close returned, or fails). inproc: the copy is held (np.copyto waits up to 0.5 s for
    `close` to return) so it is under way when b closes."""
    a, b = pair
    n = 4 << 20
    a.register("src", np.full(n, 7, np.uint8))
    dst = np.zeros(n, np.uint8)
    b.register("dst", dst)
    copying, closed = threading.Event(), threading.Event()
    copyto = np.copyto

    def held_copyto(d, s, *args, **kwargs):
        if d.size == n:
            copying.set()
            closed.wait(0.5)
        return copyto(d, s, *args, **kwargs)

    monkeypatch.setattr(np, "copyto", held_copyto)
    f = a.write(b.name, "src", 0, "dst", 0, n)
    if a.backend == "inproc":
        assert copying.wait(5)
    else:
        assert _until(lambda: dst[0] != 0 or f.done())
    b.close()
    closed.set()
    at_close = dst.copy()
    try:
        f.result(10)
    except TransportError:
        pass
    time.sleep(0.05)
    np.testing.assert_array_equal(dst, at_close)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this host")
def test_tcp_endpoints_listen_and_connect_on_ipv6(closing):
    a, b = TcpTransport("a6", host="::1"), TcpTransport("b6", host="::1")
    closing(a)
    closing(b)
    assert b.address[0] == "::1"
    a.register("src", np.arange(32, dtype=np.uint8))
    dst = np.zeros(32, np.uint8)
    b.register("dst", dst)
    a.connect("b6", b.address)
    assert a.write("b6", "src", 0, "dst", 0, 32, notify=3).result(5) == 32
    assert b.wait_notification(tag=3, timeout=5).length == 32
    np.testing.assert_array_equal(dst, np.arange(32, dtype=np.uint8))
    assert b.send("a6", b"over v6").result(5) == 7
    assert a.recv(timeout=5) == ("b6", b"over v6")
    a.connect("b6", list(b.address))  # the same address: nothing to do


def _hold_high_reader(a: TcpTransport, b: TcpTransport, seconds: float) -> threading.Event:
    """Block b's high reader thread (it reads a's region queries) in b's on_message hook for up to `seconds`, or
    until the returned event is set."""
    release, held = threading.Event(), threading.Event()

    def hook(peer: str, payload: bytes) -> bool:
        held.set()
        release.wait(seconds)
        return True

    b.on_message = hook
    a.send(b.name, b"hold").result(5)
    assert held.wait(5)
    return release


def test_tcp_region_query_timeout_names_the_region(closing):
    a, b = TcpTransport("a"), TcpTransport("b")
    closing(a)
    closing(b)
    b.register("kv", np.zeros(8, np.uint8))
    a.connect("b", b.address)
    release = _hold_high_reader(a, b, 5)
    try:
        with pytest.raises(TimeoutError, match="'b' did not answer the query for region 'kv' in 0.2 s"):
            a.remote_region("b", "kv", timeout=0.2)
    finally:
        release.set()
    assert a.remote_region("b", "kv") == (b.region("kv").region_id, 8)


@pytest.mark.slow
def test_tcp_write_to_a_new_region_waits_for_a_late_reply_from_a_healthy_peer(closing):
    """b answers a's region query only after 12 s (its high reader is busy): a's write from an ordinary thread waits
    for the reply and lands (it raised a bare TimeoutError after 10 s)."""
    a, b = TcpTransport("a", timeout_s=30), TcpTransport("b")
    closing(a)
    closing(b)
    a.register("src", np.arange(8, dtype=np.uint8))
    dst = np.zeros(8, np.uint8)
    b.register("kv", dst)
    a.connect("b", b.address)
    _hold_high_reader(a, b, 12)
    assert a.write("b", "src", 0, "kv", 0, 8).result(5) == 8
    np.testing.assert_array_equal(dst, np.arange(8, dtype=np.uint8))
    assert a.peers() == ["b"]


def test_tcp_messages_queued_at_close_fail_with_transport_closed(closing):
    """a's high reader is held, so b's 1 MiB messages pile up behind full socket buffers; b closes: every message
    that did not reach the link fails with TransportClosedError, like b's pending transfers."""
    a, b = TcpTransport("a"), TcpTransport("b")
    closing(a)
    closing(b)
    b.connect("a", a.address)
    release = _hold_high_reader(b, a, 10)
    try:
        futs = [b.send("a", bytes(1 << 20)) for _ in range(48)]
        b.close()
        errors = [f.exception(10) for f in futs]
    finally:
        release.set()
    failed = [e for e in errors if e is not None]
    assert failed, "expected messages still queued at close"
    assert all(isinstance(e, TransportClosedError) for e in failed), {type(e).__name__: str(e) for e in failed}
