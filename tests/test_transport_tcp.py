"""TCP backend: separate processes, hostile input, authentication, dead and silent peers."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import zlib

import numpy as np
import pytest

from dualpath_jax.traffic import Link, Pacer
from transport import tcp as tcpmod
from transport.base import PeerLostError, RegionError, TransportError
from transport.peer import PeerProcess, pattern, spawn_peer
from transport.tcp import (
    HEADER,
    OP_HELLO,
    OP_HELLO_ACK,
    OP_WRITE,
    TcpTransport,
    pack_header,
    unpack_header,
)

MB = 1 << 20


@pytest.fixture
def server():
    ep = TcpTransport("srv")
    ep.register("dst", np.zeros(1 << 16, np.uint8))
    yield ep
    ep.close()


def _connect_client(server, name="cli"):
    c = TcpTransport(name)
    c.register("src", np.arange(1 << 16, dtype=np.uint64).astype(np.uint8))
    c.connect(server.name, server.address)
    return c


def _raw(server) -> socket.socket:
    return socket.create_connection(server.address, timeout=5)


def _assert_serving(server, name):
    """A fresh, well-behaved client can still transfer to the server."""
    c = _connect_client(server, name)
    try:
        assert c.write(server.name, "src", 0, "dst", 0, 4096).result(5) == 4096
        np.testing.assert_array_equal(server.region("dst").obj[:4096], c.region("src").obj[:4096])
    finally:
        c.close()


def _hello(server, body) -> socket.socket:
    """A raw connection that has sent a HELLO frame with JSON payload `body`."""
    s = _raw(server)
    payload = json.dumps(body).encode()
    s.sendall(pack_header(OP_HELLO, length=len(payload)) + payload)
    return s


def _acked(s: socket.socket) -> socket.socket:
    """`s` after reading the server's HELLO_ACK (asserted)."""
    op, _, _, _, length, _, _ = unpack_header(tcpmod._recv_exact(s, HEADER.size))
    assert op == OP_HELLO_ACK
    tcpmod._recv_exact(s, length)
    return s


def _raw_handshake(server, session="s1") -> list[socket.socket]:
    """Open a complete connection set by hand (loopback, no secret) to send crafted frames afterwards."""
    return [
        _acked(
            _hello(
                server,
                {"name": "evil", "peer": server.name, "session": session, "stream": st, "nonce": os.urandom(32).hex()},
            )
        )
        for st in ("high", "low")
    ]


def _closed_by_server(s: socket.socket, timeout=5.0) -> bool:
    s.settimeout(timeout)
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


# ---- separate processes ---------------------------------------------------------------------------------


def test_cross_process_transfers():
    me = TcpTransport("driver")
    peer = spawn_peer({"backend": "tcp", "name": "remote"}, {"buf": 8 * MB + 13})
    try:
        src = pattern(8 * MB + 13, seed=1)
        back = np.zeros(8 * MB + 13, np.uint8)
        me.register("src", src)
        me.register("back", back)
        me.connect("remote", peer.address)
        peer.start()
        # write (unaligned offset, odd size) and check the bytes on the other side by digest
        me.write("remote", "src", 0, "buf", 13, 8 * MB).result(30)
        import hashlib

        got = PeerProcess.call(
            me, "remote", {"op": "digest", "region": "buf", "offset": 13, "length": 8 * MB}, timeout=10
        )
        assert got["sha256"] == hashlib.sha256(src[: 8 * MB].tobytes()).hexdigest()
        # one-sided read of what the peer filled
        PeerProcess.call(me, "remote", {"op": "fill", "region": "buf", "seed": 7})
        me.read("remote", "back", 0, "buf", 0, 8 * MB + 13).result(30)
        np.testing.assert_array_equal(back, pattern(8 * MB + 13, seed=7))
        # the peer writes to us with notifications; we wait for a specific layer's tag
        PeerProcess.call(
            me,
            "remote",
            {
                "op": "write",
                "peer": "driver",
                "local": "buf",
                "offset": 0,
                "remote": "back",
                "remote_offset": 5,
                "length": MB,
                "notify": 42,
            },
        )
        n = me.wait_notification(tag=42, timeout=10)
        assert (n.peer, n.region, n.offset, n.length) == ("remote", "back", 5, MB)
        np.testing.assert_array_equal(back[5 : 5 + MB], pattern(8 * MB + 13, seed=7)[:MB])
        PeerProcess.call(me, "remote", {"op": "quit"})
        peer.join()
    finally:
        peer.kill()
        me.close()


def test_peer_killed_mid_transfer_fails_pending():
    """kill -9 of the peer process: every pending write/read fails with PeerLostError, nothing hangs."""
    link = Link("cnic/engine0", 20e6, {"high": 99, "low": 1})  # slow our sends so they are in flight
    me = TcpTransport("driver", pacer=Pacer([link]), timeout_s=5)
    peer = spawn_peer({"backend": "tcp", "name": "victim"}, {"buf": 16 * MB})
    try:
        me.register("src", np.ones(16 * MB, np.uint8))
        me.register("back", np.zeros(16 * MB, np.uint8))
        me.connect("victim", peer.address)
        peer.start()
        writes = [me.write("victim", "src", 0, "buf", 0, 4 * MB) for _ in range(4)]  # ~0.8 s at 20 MB/s
        reads = [me.read("victim", "back", 0, "buf", 0, 4 * MB) for _ in range(2)]
        time.sleep(0.1)
        peer.kill()
        t0 = time.monotonic()
        for f in writes + reads:
            with pytest.raises(TransportError):
                f.result(10)
        assert time.monotonic() - t0 < 6
        assert "victim" not in me.peers()
        with pytest.raises(PeerLostError):
            me.write("victim", "src", 0, "buf", 0, 1)
    finally:
        peer.kill()
        me.close()


# ---- hostile input --------------------------------------------------------------------------------------


def test_garbage_and_truncated_frames_are_rejected(server, caplog):
    caplog.set_level(logging.ERROR, logger="transport.tcp")
    rng = np.random.default_rng(0)
    bad = []
    s = _raw(server)  # random bytes
    s.sendall(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    bad.append(s)
    s = _raw(server)  # a truncated header, then silence: dropped after the handshake timeout
    s.sendall(pack_header(OP_HELLO, length=10)[:20])
    s.shutdown(socket.SHUT_WR)
    bad.append(s)
    s = _raw(server)  # valid header, corrupted checksum
    h = bytearray(pack_header(OP_HELLO, length=10))
    h[20] ^= 0xFF
    s.sendall(bytes(h))
    bad.append(s)
    s = _raw(server)  # an oversized handshake
    s.sendall(pack_header(OP_HELLO, length=1 << 30))
    bad.append(s)
    s = _raw(server)  # a data frame before any handshake
    s.sendall(pack_header(OP_WRITE, length=16) + b"x" * 16)
    bad.append(s)
    for s in bad:
        assert _closed_by_server(s), "server kept a malformed connection open"
        s.close()
    _assert_serving(server, "good1")
    assert "rejected connection" in caplog.text


@pytest.mark.parametrize(
    "body, logged",
    [
        (["not", "an", "object"], "HELLO payload is not a JSON object"),
        ({"name": "evil", "peer": "srv", "session": "s", "stream": "medium"}, "unknown stream 'medium'"),
        ({"peer": "srv", "session": "s", "stream": "low"}, "'name'"),  # a missing field
    ],
    ids=["not_an_object", "unknown_stream", "missing_field"],
)
def test_malformed_hello_is_rejected_and_the_server_keeps_serving(server, caplog, body, logged):
    caplog.set_level(logging.ERROR, logger="transport.tcp")
    s = _hello(server, body)
    assert _closed_by_server(s), "server kept a connection with a malformed HELLO open"
    s.close()
    assert "rejected connection" in caplog.text and logged in caplog.text
    _assert_serving(server, "good-after-hello")


def test_a_duplicate_stream_of_one_session_is_rejected(server, caplog):
    caplog.set_level(logging.ERROR, logger="transport.tcp")
    body = {"name": "evil", "peer": server.name, "session": "dup", "stream": "high", "nonce": os.urandom(32).hex()}
    first = _acked(_hello(server, body))
    second = _hello(server, body)  # the same stream of the same session again
    assert _closed_by_server(second)
    assert "duplicate stream 'high' for session dup" in caplog.text
    first.close()
    second.close()
    _assert_serving(server, "good-after-dup")


def test_a_half_open_connection_set_is_dropped_after_the_handshake_timeout(caplog):
    """A client that opens only one stream of its set holds a socket on the server until the handshake timeout;
    then the server drops it (logged) and keeps serving."""
    caplog.set_level(logging.ERROR, logger="transport.tcp")
    srv = TcpTransport("srv", timeout_s=0.4, handshake_timeout_s=0.3)
    srv.register("dst", np.zeros(1 << 16, np.uint8))
    try:
        body = {"name": "half", "peer": "srv", "session": "h", "stream": "high", "nonce": os.urandom(32).hex()}
        s = _acked(_hello(srv, body))
        assert _closed_by_server(s, timeout=10), "the half-open set was never dropped"
        s.close()
        assert "dropping half-open connection set" in caplog.text
        assert "half" not in srv.peers()
        _assert_serving(srv, "good-after-half")
    finally:
        srv.close()


@pytest.mark.parametrize(
    "frame",
    [
        "out_of_bounds",
        "unknown_region",
        "bad_magic",
        "old_version",
        "oversized_message",
        "truncated_payload",
        "unsolicited_ack",
        "write_inside_a_batch",
        "batch_inside_a_batch",
    ],
)
def test_malformed_frames_after_handshake_close_that_connection(server, caplog, frame):
    caplog.set_level(logging.ERROR, logger="transport.tcp")
    other = _connect_client(server, "bystander")  # an established peer that must keep working
    try:
        socks = _raw_handshake(server)
        server.wait_for_peer("evil")
        rid = server.region("dst").region_id
        s = socks[1]
        if frame == "out_of_bounds":
            s.sendall(pack_header(OP_WRITE, region=rid, offset=(1 << 16) - 8, length=16, req=1) + b"y" * 16)
        elif frame == "unknown_region":
            s.sendall(pack_header(OP_WRITE, region=999, offset=0, length=4, req=1) + b"zzzz")
        elif frame == "bad_magic":
            s.sendall(b"XXXX" + pack_header(OP_WRITE, region=rid, length=4)[4:] + b"abcd")
        elif frame == "oversized_message":
            s.sendall(pack_header(tcpmod.OP_MSG, length=1 << 40))
        elif frame == "truncated_payload":
            s.sendall(pack_header(OP_WRITE, region=rid, offset=0, length=1000, req=1) + b"q" * 10)
            s.shutdown(socket.SHUT_WR)
        elif frame == "unsolicited_ack":
            s.sendall(pack_header(tcpmod.OP_WRITE_ACK, length=0, req=12345))
        elif frame == "old_version":  # a well-formed protocol-3 frame (before FLAG_MORE)
            body = tcpmod._HEADER_BODY.pack(tcpmod.MAGIC, 3, OP_WRITE, 0, rid, 0, 4, 0, 1)
            s.sendall(body + tcpmod._CRC.pack(zlib.crc32(body)) + b"abcd")
        elif frame in ("write_inside_a_batch", "batch_inside_a_batch"):
            # the first frame of batch 1 (FLAG_CHAIN), then a frame of another request before batch 1 ended
            s.sendall(pack_header(OP_WRITE, tcpmod.FLAG_CHAIN, region=rid, offset=0, length=4, req=1) + b"abcd")
            flags = tcpmod.FLAG_CHAIN if frame == "batch_inside_a_batch" else 0
            s.sendall(pack_header(OP_WRITE, flags, region=rid, offset=4, length=4, req=2) + b"efgh")
        assert _closed_by_server(socks[0]) and _closed_by_server(socks[1])
        assert not server.region("dst").obj[-8:].any(), "out-of-bounds bytes must never land"
        deadline = time.monotonic() + 5
        while "evil" in server.peers() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "evil" not in server.peers()
        # the bystander's connection set is untouched
        assert other.write(server.name, "src", 0, "dst", 0, 100).result(5) == 100
        _assert_serving(server, "good2")
        if frame != "truncated_payload":
            assert "closing connection set" in caplog.text
    finally:
        other.close()


# ---- authentication -------------------------------------------------------------------------------------


def test_non_loopback_requires_secret():
    with pytest.raises(ValueError, match="requires a shared secret"):
        TcpTransport("exposed", host="0.0.0.0")


def test_shared_secret_handshake(caplog):
    caplog.set_level(logging.ERROR, logger="transport.tcp")
    srv = TcpTransport("secure", host="0.0.0.0", secret="s3cret")
    srv.register("dst", np.zeros(64, np.uint8))
    addr = ("127.0.0.1", srv.address[1])
    try:
        good = TcpTransport("good", secret="s3cret")
        good.register("src", np.full(64, 9, np.uint8))
        good.connect("secure", addr)
        good.write("secure", "src", 0, "dst", 0, 64).result(5)
        assert srv.region("dst").obj.sum() == 9 * 64
        good.close()
        wrong = TcpTransport("wrong", secret="guess")
        with pytest.raises(TransportError, match="prove the shared secret"):
            wrong.connect("secure", addr)
        wrong.close()
        anon = TcpTransport("anon")
        with pytest.raises(TransportError, match="requires a shared secret"):
            anon.connect("secure", addr)
        anon.close()
        assert "wrong" not in srv.peers() and "anon" not in srv.peers()
    finally:
        srv.close()
    # a client holding a secret refuses a server that does not authenticate
    open_srv = TcpTransport("open")
    cli = TcpTransport("careful", secret="s3cret")
    try:
        with pytest.raises(TransportError, match="does not authenticate"):
            cli.connect("open", open_srv.address)
    finally:
        cli.close()
        open_srv.close()


def test_wrong_peer_name_refused(server):
    c = TcpTransport("cli")
    try:
        with pytest.raises(TransportError, match="refused|expected"):
            c.connect("not-srv", server.address)
    finally:
        c.close()


def test_connect_needs_a_host_port_address(server):
    """Passing a peer's name (the inproc address) or nothing where (host, port) belongs is named as such, not a
    getaddrinfo error about host 's' and port 'r' or an unpacking TypeError."""
    c = TcpTransport("cli")
    try:
        for address in (server.name, None, ("127.0.0.1",)):
            with pytest.raises(TypeError, match=r"the address of 'srv' must be \(host, port\), got"):
                c.connect(server.name, address)
        c.connect(server.name, list(server.address))  # a list, as JSON hands it back, is fine
        assert c.peers() == [server.name]
    finally:
        c.close()


@pytest.mark.parametrize(
    "kwargs", [{"timeout_s": 0}, {"timeout_s": -1}, {"timeout_s": float("nan")}, {"handshake_timeout_s": 0}]
)
def test_timeouts_must_be_positive(kwargs):
    """timeout_s=0 would drop every peer with a transfer pending at the watchdog's first look; NaN would never
    drop a silent one."""
    ((what, value),) = kwargs.items()
    with pytest.raises(ValueError, match=f"tcp transport 'ep': {what} must be > 0 seconds, got {value}"):
        TcpTransport("ep", **kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"handshake_timeout_s": float("inf")}, "handshake_timeout_s must be finite, got inf"),
        ({"max_message_bytes": 0}, "max_message_bytes must be an int >= 1, got 0"),
        ({"max_message_bytes": -5}, "max_message_bytes must be an int >= 1, got -5"),
        ({"max_message_bytes": 1.5}, "max_message_bytes must be an int >= 1, got 1.5"),
    ],
)
def test_endless_handshake_timeout_and_bad_message_limits_are_refused(kwargs, match):
    """An infinite handshake timeout made every incoming connection fail (OverflowError from settimeout, logged as a
    rejected connection); a message limit of 0 or less refused every message (1.5 was silently 1)."""
    with pytest.raises(ValueError, match=re.escape(f"tcp transport 'ep': {match}")):
        TcpTransport("ep", **kwargs)


def test_an_endless_transfer_timeout_is_taken():
    """timeout_s=inf means: never declare a silent peer dead (the watchdog still runs, and close still joins it)."""
    ep = TcpTransport("endless", timeout_s=float("inf"))
    ep.close()
    assert _threads_of("endless") == []


# ---- silent peers ---------------------------------------------------------------------------------------


def test_silent_peer_times_out():
    """A peer that completes the handshake and then never answers: pending transfers fail after timeout_s."""
    lst = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def fake_server():
        for _ in range(2):
            s, _ = lst.accept()
            _, _, _, _, length, _, _ = unpack_header(tcpmod._recv_exact(s, HEADER.size))
            tcpmod._recv_exact(s, length)
            ack = json.dumps({"name": "mute", "auth": False}).encode()
            s.sendall(pack_header(OP_HELLO_ACK, length=len(ack)) + ack)
            held.append(s)  # keep it open, never read again

    t = threading.Thread(target=fake_server, daemon=True)
    t.start()
    c = TcpTransport("cli", timeout_s=1.0)
    try:
        c.register("src", np.zeros(64, np.uint8))
        c.connect("mute", lst.getsockname())
        t0 = time.monotonic()
        # a write first asks for the remote region's size; the answer never comes
        with pytest.raises(PeerLostError, match="no progress"):
            c.write("mute", "src", 0, "dst", 0, 64)
        assert time.monotonic() - t0 < 4
        assert "mute" not in c.peers(), "the watchdog should have dropped the silent peer"
    finally:
        c.close()
        for s in held:
            s.close()
        lst.close()


def test_handshake_flood_is_bounded(caplog):
    """Idle unauthenticated connections are capped and time out; the server then serves a real client."""
    caplog.set_level(logging.ERROR, logger="transport.tcp")
    srv = TcpTransport("flooded", handshake_timeout_s=0.5)
    srv.register("dst", np.zeros(1 << 16, np.uint8))
    idle = [_raw(srv) for _ in range(tcpmod.MAX_PENDING_HANDSHAKES + 6)]
    try:
        dropped = sum(_closed_by_server(s, timeout=0.3) for s in idle[-6:])
        assert dropped >= 1, "connections beyond the cap should be dropped at once"
        assert "too many pending handshakes" in caplog.text
        time.sleep(0.8)  # the idle ones hit the handshake timeout
        _assert_serving(srv, "after-flood")
    finally:
        for s in idle:
            s.close()
        srv.close()


# ---- batched acknowledgements and inline sends -----------------------------------------------------------


def _read_frame(s: socket.socket) -> tuple[tuple, bytes]:
    hdr = unpack_header(tcpmod._recv_exact(s, HEADER.size))
    op, length = hdr[0], hdr[4]
    body = tcpmod._recv_exact(s, length) if op in (OP_WRITE, tcpmod.OP_REGION_QUERY, tcpmod.OP_MSG) else b""
    return hdr, body


def _read_frame_with_payload(s: socket.socket) -> tuple[tuple, bytes]:
    """The next frame and its whole payload (any op)."""
    hdr = unpack_header(tcpmod._recv_exact(s, HEADER.size))
    return hdr, tcpmod._recv_exact(s, hdr[4]) if hdr[4] else b""


def _raw_peer_answering_region_query(server, size: int = 1 << 16) -> tuple[list[socket.socket], threading.Thread]:
    """A hand-driven peer "evil" connected to `server`, with a thread that answers the server's one query for
    region "evil_dst" (id 5, `size` bytes); the server's region "dst" is filled with a known pattern."""
    socks = _raw_handshake(server)
    server.wait_for_peer("evil")

    def answer_query():
        (op, *_rest, req), body = _read_frame(socks[0])
        assert op == tcpmod.OP_REGION_QUERY and body == b"evil_dst"
        socks[0].sendall(pack_header(tcpmod.OP_REGION_INFO, region=5, offset=size, req=req))

    t = threading.Thread(target=answer_query)
    t.start()
    dst = server.region("dst").obj
    dst[:] = np.arange(dst.size, dtype=np.uint64).astype(np.uint8)
    return socks, t


def _writes_to_raw_peer(server, n: int) -> tuple[list[socket.socket], list, list[tuple[int, int]]]:
    """The server writes n frames to a hand-driven peer "evil": returns its sockets, the futures and the
    (request id, length) of each WRITE frame it received (it answers the region query itself)."""
    socks, t = _raw_peer_answering_region_query(server)
    results: list = []
    src = server.region("dst")
    futs = [server.write("evil", "dst", 0, "evil_dst", 0, 100 + i) for i in range(n)]
    t.join(5)
    for _ in range(n):
        (op, _, rid, _, length, _, req), body = _read_frame(socks[1])
        assert op == OP_WRITE and rid == 5 and body == bytes(src.obj[:length])
        results.append((req, length))
    return socks, futs, results


def test_one_ack_batch_completes_many_writes(server):
    socks, futs, frames = _writes_to_raw_peer(server, 5)
    try:
        assert not any(f.done() for f in futs), "a write must not complete before its acknowledgement"
        payload = b"".join(tcpmod.ACK_ENTRY.pack(req, n) for req, n in reversed(frames))  # any order
        socks[1].sendall(pack_header(tcpmod.OP_WRITE_ACKS, length=len(payload)) + payload)
        assert [f.result(5) for f in futs] == [n for _, n in frames]
    finally:
        for s in socks:
            s.close()


def test_writes_behind_a_deep_pipeline_go_to_the_sender_thread(server, monkeypatch):
    """A write posted while more than QUEUE_AFTER_PENDING requests are pending to its peer is left to the sender
    thread even though the connection is idle (the thread sends what queued up meanwhile in one sendmsg); the
    ones before it go out from the posting thread. Every frame lands whole and in order either way, and one ack
    batch completes them all."""
    sent_by: dict[str, int] = {"poster": 0, "sender thread": 0}
    real_inline, real_frame, real_batch = (
        tcpmod._Conn._send_inline,
        tcpmod._Conn._send_frame,
        tcpmod._Conn._send_small_batch,
    )

    def writes(headers) -> int:
        return sum(1 for h in headers if not isinstance(h, list) and h[5] == OP_WRITE)

    def send_inline(self, views, total, fut, payload):
        sent_by["poster"] += writes(views[:1])
        return real_inline(self, views, total, fut, payload)

    def send_frame(self, header, payload, priority):
        sent_by["sender thread"] += writes([header])
        return real_frame(self, header, payload, priority)

    def send_small_batch(self, batch):
        sent_by["sender thread"] += writes([job[0] for job in batch])
        return real_batch(self, batch)

    monkeypatch.setattr(tcpmod._Conn, "_send_inline", send_inline)
    monkeypatch.setattr(tcpmod._Conn, "_send_frame", send_frame)
    monkeypatch.setattr(tcpmod._Conn, "_send_small_batch", send_small_batch)
    n = tcpmod.QUEUE_AFTER_PENDING + 48
    socks, futs, frames = _writes_to_raw_peer(server, n)  # the peer acknowledges nothing yet: all stay pending
    try:
        assert [length for _, length in frames] == [100 + i for i in range(n)]  # whole and in order
        assert sent_by == {"poster": tcpmod.QUEUE_AFTER_PENDING, "sender thread": 48}
        assert not any(f.done() for f in futs)
        payload = b"".join(tcpmod.ACK_ENTRY.pack(req, length) for req, length in frames)
        socks[1].sendall(pack_header(tcpmod.OP_WRITE_ACKS, length=len(payload)) + payload)
        assert [f.result(5) for f in futs] == [100 + i for i in range(n)]
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize("bad", ["wrong_length", "unknown_request", "duplicate", "ragged", "empty"])
def test_bad_ack_batch_fails_every_pending_write_and_closes_that_set(server, caplog, bad):
    caplog.set_level(logging.ERROR, logger="transport.tcp")
    other = _connect_client(server, "bystander")
    socks, futs, frames = _writes_to_raw_peer(server, 3)
    try:
        entries = list(frames)
        if bad == "wrong_length":
            entries[2] = (entries[2][0], entries[2][1] + 1)
        elif bad == "unknown_request":
            entries[2] = (987654321, entries[2][1])
        elif bad == "duplicate":
            entries[2] = entries[0]
        payload = b"".join(tcpmod.ACK_ENTRY.pack(*e) for e in entries)
        if bad == "ragged":
            payload = payload[:-3]
        elif bad == "empty":
            payload = b""
        socks[1].sendall(pack_header(tcpmod.OP_WRITE_ACKS, length=len(payload)) + payload)
        # a bad batch completes none of its writes: all fail, none hangs
        for f in futs:
            with pytest.raises(TransportError):
                f.result(5)
        assert _closed_by_server(socks[0]) and _closed_by_server(socks[1])
        assert "closing connection set" in caplog.text
        assert other.write(server.name, "src", 0, "dst", 0, 100).result(5) == 100
    finally:
        other.close()
        for s in socks:
            s.close()


def _no_data(s: socket.socket, wait: float = 0.2) -> bool:
    """Nothing arrives on `s` within `wait` s."""
    s.settimeout(wait)
    try:
        return not s.recv(1, socket.MSG_PEEK)
    except TimeoutError:
        return True
    finally:
        s.settimeout(None)


def test_flag_more_holds_acks_until_a_frame_without_it(server):
    """A writer's FLAG_MORE frames are not acknowledged when the receiver's socket drains (the writer said
    another frame follows); the next frame without the flag is, and one ack batch covers them all."""
    socks = _raw_handshake(server)
    server.wait_for_peer("evil")
    rid = server.region("dst").region_id
    s = socks[1]
    try:
        s.sendall(pack_header(OP_WRITE, region=rid, offset=0, length=4, req=10) + b"lone")
        (op, *_), body = _read_frame_with_payload(s)
        assert op == tcpmod.OP_WRITE_ACKS and list(tcpmod.ACK_ENTRY.iter_unpack(body)) == [(10, 4)]
        for i in range(3):
            s.sendall(pack_header(OP_WRITE, tcpmod.FLAG_MORE, rid, 100 + 4 * i, 4, 0, 20 + i) + b"m%03d" % i)
        assert _no_data(s), "frames flagged FLAG_MORE must not be acknowledged before their successor lands"
        assert bytes(server.region("dst").obj[100:112]) == b"m000m001m002"  # landed all the same
        s.sendall(pack_header(OP_WRITE, region=rid, offset=112, length=4, req=23) + b"last")
        (op, *_), body = _read_frame_with_payload(s)
        assert op == tcpmod.OP_WRITE_ACKS
        assert list(tcpmod.ACK_ENTRY.iter_unpack(body)) == [(20, 4), (21, 4), (22, 4), (23, 4)]
    finally:
        for x in socks:
            x.close()


@pytest.mark.parametrize("chunks", ["one_send", "ragged"])
def test_frames_back_to_back_land_whole(server, chunks):
    """Large frames (payloads received straight into the region, the next header in the same recvmsg) and small
    ones (through the buffer), back to back in one send or cut at random places: every frame lands whole, in
    order (the last write to a spot wins), and every write is acknowledged with its length."""
    region = server.register("big", np.zeros(1 << 20, np.uint8))
    socks = _raw_handshake(server)
    server.wait_for_peer("evil")
    rng = np.random.default_rng(3)
    frames, expect, sent = [], np.zeros(1 << 20, np.uint8), []
    big = (0, 600 * 1024)  # more than the receive buffer holds: most of it goes straight to the region
    for i, (offset, n) in enumerate([big, big, big, (5, 100), big, (1000, 40000), big, (7, 3), (9, 1 << 16), big]):
        data = rng.integers(0, 256, n, dtype=np.uint8)
        expect[offset : offset + n] = data
        frames.append(pack_header(OP_WRITE, 0, region.region_id, offset, n, 0, 100 + i) + data.tobytes())
        sent.append((100 + i, n))
    stream = b"".join(frames)
    try:
        socks[1].setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if chunks == "one_send":
            socks[1].sendall(stream)
        else:
            pos = 0
            while pos < len(stream):
                n = int(rng.integers(1, 100000))
                socks[1].sendall(stream[pos : pos + n])
                pos += n
                time.sleep(0.0005)
        acked = []
        while len(acked) < len(sent):
            (op, *_), body = _read_frame_with_payload(socks[1])
            assert op == tcpmod.OP_WRITE_ACKS
            acked += list(tcpmod.ACK_ENTRY.iter_unpack(body))
        assert acked == sent
        np.testing.assert_array_equal(region.obj, expect)
    finally:
        for x in socks:
            x.close()


@pytest.mark.parametrize("paced", [False, True])
def test_queued_write_frames_carry_flag_more(paced):
    """Write frames the sender thread sends with more queued behind them carry FLAG_MORE, never more than half
    the pending requests in a row, and the last of the burst goes without it; one ack batch completes them. A
    paced endpoint never sets it (its next frame may wait for the pacer)."""
    pacer = Pacer([Link("cnic/engine0", 400e6, {"high": 99, "low": 1})]) if paced else None
    srv = TcpTransport("srv", pacer=pacer)
    srv.register("dst", np.zeros(4 << 20, np.uint8))
    n, size = 12, 300 * 1024
    socks: list[socket.socket] = []
    try:
        socks, t = _raw_peer_answering_region_query(srv, size=4 << 20)
        srv.remote_region("evil", "evil_dst")
        t.join(5)
        for c in srv._live_peer("evil").conns.values():
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # frames queue behind the first
        futs = [srv.write("evil", "dst", 0, "evil_dst", size * i, size) for i in range(n)]
        frames = [_read_frame(socks[1]) for _ in range(n)]
        assert [hdr[4] for hdr, _ in frames] == [size] * n
        flags = [hdr[1] & tcpmod.FLAG_MORE for hdr, _ in frames]
        if paced:
            assert not any(flags), flags
        else:
            runs, run = [], 0
            for f in flags:
                run = run + 1 if f else 0
                runs.append(run)
            assert any(flags) and not flags[-1] and max(runs) <= n // 2, flags
        assert not any(f.done() for f in futs)
        acks = b"".join(tcpmod.ACK_ENTRY.pack(hdr[6], size) for hdr, _ in frames)
        socks[1].sendall(pack_header(tcpmod.OP_WRITE_ACKS, length=len(acks)) + acks)
        assert [f.result(5) for f in futs] == [size] * n
    finally:
        for x in socks:
            x.close()
        srv.close()


@pytest.mark.parametrize("size, count, sndbuf", [(60 * 1024 + 13, 400, 4096), (700 * 1024 + 13, 60, 64 * 1024)])
def test_small_writes_stay_in_order_when_the_socket_is_full(size, count, sndbuf):
    """With a tiny kernel send buffer, inline sends of small frames only partly go out; the rest is sent
    by the sender thread before anything queued later: the last write to a spot wins, notifications
    arrive in the order written, every write completes with its length."""
    a, b = TcpTransport("fill-a"), TcpTransport("fill-b")
    srcs = np.stack([pattern(size, seed=i) for i in range(4)])  # 4 contents, written in turn
    a.register("src", srcs)
    b.register("dst", np.zeros(size + 7, np.uint8))
    try:
        a.connect("fill-b", b.address)
        for c in a._live_peer("fill-b").conns.values():
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)  # smaller than a frame
        futs = [a.write("fill-b", "src", (i % 4) * size, "dst", 7, size, notify=i) for i in range(count)]
        assert [f.result(30) for f in futs] == [size] * count
        tags = [b.wait_notification(timeout=5).tag for _ in range(count)]
        assert tags == list(range(count))
        np.testing.assert_array_equal(b.region("dst").obj[7:], srcs[(count - 1) % 4])
        # control messages interleaved with writes on a full socket, too
        for i in range(50):
            a.send("fill-b", b"m%d" % i)
        assert [b.recv(timeout=5)[1] for _ in range(50)] == [b"m%d" % i for i in range(50)]
    finally:
        a.close()
        b.close()


def _batch_to_raw_peer(server, entries, notify=None):
    """The server posts one write_many to the hand-driven peer "evil": returns its sockets, the future and the
    frames it received ((op, flags, region, offset, length, tag, req), payload)."""
    socks, t = _raw_peer_answering_region_query(server)
    fut = server.write_many("evil", entries, notify=notify)
    t.join(5)
    return socks, fut, [_read_frame(socks[1]) for _ in entries]


def test_write_many_is_one_request_acknowledged_once(server):
    entries = [("dst", 10 * i, 100 + i, "evil_dst", 1000 * i) for i in range(5)]
    socks, fut, frames = _batch_to_raw_peer(server, entries, notify=77)
    try:
        src = server.region("dst").obj
        reqs = {hdr[6] for hdr, _ in frames}
        assert len(reqs) == 1, "one request id for the whole batch"
        for (hdr, body), (_, lo, n, _, ro) in zip(frames, entries, strict=True):
            op, flags, rid, offset, length, tag, _ = hdr
            assert (op, rid, offset, length, body) == (OP_WRITE, 5, ro, n, bytes(src[lo : lo + n]))
        assert [hdr[1] for hdr, _ in frames] == [tcpmod.FLAG_CHAIN] * 4 + [tcpmod.FLAG_NOTIFY]
        assert frames[-1][0][5] == 77  # the notification tag rides on the last frame
        time.sleep(0.05)
        assert not fut.done(), "a batch must not complete before its acknowledgement"
        total = sum(e[2] for e in entries)
        ack = tcpmod.ACK_ENTRY.pack(reqs.pop(), total)
        socks[1].sendall(pack_header(tcpmod.OP_WRITE_ACKS, length=len(ack)) + ack)
        assert fut.result(5) == total
    finally:
        for s in socks:
            s.close()


def test_write_many_acknowledged_per_frame_fails_and_closes_that_set(server, caplog):
    """A peer that acknowledges a batch's first frame alone (its length, not the batch's) breaks the protocol:
    the batch fails and only that connection set closes."""
    caplog.set_level(logging.ERROR, logger="transport.tcp")
    other = _connect_client(server, "bystander")
    socks, fut, frames = _batch_to_raw_peer(server, [("dst", 0, 100, "evil_dst", 0), ("dst", 0, 200, "evil_dst", 0)])
    try:
        ack = tcpmod.ACK_ENTRY.pack(frames[0][0][6], 100)
        socks[1].sendall(pack_header(tcpmod.OP_WRITE_ACKS, length=len(ack)) + ack)
        with pytest.raises(TransportError):
            fut.result(5)
        assert _closed_by_server(socks[0]) and _closed_by_server(socks[1])
        assert "closing connection set" in caplog.text
        assert other.write_many(server.name, [("src", 0, 100, "dst", 0)]).result(5) == 100
    finally:
        other.close()
        for s in socks:
            s.close()


def test_peer_killed_mid_batch_fails_it():
    """kill -9 of the peer while a write_many is in flight: the batch fails with a TransportError in time."""
    link = Link("cnic/engine0", 20e6, {"high": 99, "low": 1})
    me = TcpTransport("driver", pacer=Pacer([link]), timeout_s=5)
    peer = spawn_peer({"backend": "tcp", "name": "victim"}, {"buf": 16 * MB})
    try:
        me.register("src", np.ones(16 * MB, np.uint8))
        me.connect("victim", peer.address)
        peer.start()
        batch = me.write_many("victim", [("src", i * MB, 4 * MB, "buf", i * MB) for i in range(4)])  # ~0.8 s
        time.sleep(0.1)
        peer.kill()
        t0 = time.monotonic()
        with pytest.raises(TransportError):
            batch.result(10)
        assert time.monotonic() - t0 < 6
        with pytest.raises(PeerLostError):
            me.write_many("victim", [("src", 0, 1, "buf", 0)])
    finally:
        peer.kill()
        me.close()


@pytest.mark.parametrize("size, per, sndbuf", [(20 * 1024 + 5, 8, 4096), (300 * 1024 + 5, 3, 64 * 1024)])
def test_batches_stay_in_order_when_the_socket_is_full(size, per, sndbuf):
    """With a tiny kernel send buffer, a batch's vectored inline send only partly goes out; the rest goes
    before anything queued later, batches and single writes interleave in posting order (the last write to a
    spot wins), every batch is acknowledged with its total, notifications arrive in order."""
    a, b = TcpTransport("fill-a"), TcpTransport("fill-b")
    srcs = np.stack([pattern(size, seed=i) for i in range(4)])
    a.register("src", srcs)
    b.register("dst", np.zeros(per * size, np.uint8))
    try:
        a.connect("fill-b", b.address)
        for c in a._live_peer("fill-b").conns.values():
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        futs, expect = [], []
        for i in range(60):
            if i % 3 == 2:  # a single write between batches
                futs.append(a.write("fill-b", "src", (i % 4) * size, "dst", 0, size, notify=i))
                expect.append(size)
            else:
                entries = [("src", ((i + j) % 4) * size, size, "dst", j * size) for j in range(per)]
                futs.append(a.write_many("fill-b", entries, notify=i))
                expect.append(per * size)
        assert [f.result(30) for f in futs] == expect
        assert [b.wait_notification(timeout=5).tag for _ in range(60)] == list(range(60))
        dst = b.region("dst").obj
        np.testing.assert_array_equal(dst[:size], srcs[59 % 4])  # the last single write (i = 59) wins at 0
        for j in range(1, per):  # the last batch (i = 58) wins elsewhere
            np.testing.assert_array_equal(dst[j * size : (j + 1) * size], srcs[(58 + j) % 4])
    finally:
        a.close()
        b.close()


def test_bad_remote_offset_or_tag_raises_and_records_nothing(server):
    """A remote offset or notify tag that is not an integer is refused before anything is recorded or sent
    (numpy integers are fine, in `write` and in `write_many` entries); the connection keeps working."""
    c = _connect_client(server)
    try:
        with pytest.raises(RegionError, match="remote offset must be an int"):
            c.write(server.name, "src", 0, "dst", 1.5, 10)
        with pytest.raises(TypeError, match="notify tag must be an int"):
            c.write(server.name, "src", 0, "dst", 0, 10, notify="layer 3")
        with pytest.raises(TypeError, match="notify tag must be an int"):
            c.write_many(server.name, [("src", 0, 10, "dst", 0)], notify=2.5)
        with pytest.raises(RegionError, match="remote offset must be an int"):
            c.read(server.name, "src", 0, "dst", 2.5, 10)
        assert not c._live_peer(server.name).pending
        assert c.write(server.name, "src", 0, "dst", np.int64(100), 10, notify=np.int32(7)).result(5) == 10
        assert server.wait_notification(tag=7, timeout=5).offset == 100
        with pytest.raises(RegionError, match="remote offset must be an int"):
            c.write_many(server.name, [("src", 0, 10, "dst", 0), ("src", 0, 10, "dst", 2.5)])
        assert not c._live_peer(server.name).pending
        entries = [("src", 0, 10, "dst", np.int64(200)), ("src", 10, 10, "dst", np.uint32(300))]
        assert c.write_many(server.name, entries, notify=np.int64(8)).result(5) == 20
        assert server.wait_notification(tag=8, timeout=5).offset == 300
    finally:
        c.close()


def test_concurrent_posters_keep_frames_whole():
    """Several threads post writes, batches and messages at once (small send buffers) while the peer writes back
    (so acknowledgements are queued on the same connections by the reader threads): frames are never
    interleaved (a broken stream would close the set), everything completes, every byte lands."""
    a, b = TcpTransport("mt-a"), TcpTransport("mt-b")
    size, threads, rounds = 30 * 1024 + 3, 4, 40
    src = pattern(threads * size, seed=5)
    a.register("src", src)
    b.register("src", src.copy())
    a.register("dst", np.zeros(threads * size, np.uint8))
    b.register("dst", np.zeros(threads * size, np.uint8))
    try:
        a.connect("mt-b", b.address)
        b.wait_for_peer("mt-a")
        for ep, peer in ((a, "mt-b"), (b, "mt-a")):
            for c in ep._live_peer(peer).conns.values():
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        errors: list = []

        def post(ep, peer, t):
            try:
                o = t * size
                futs = []
                for i in range(rounds):
                    if i % 3 == 0:
                        futs.append(ep.write(peer, "src", o, "dst", o, size, priority="high"))
                    elif i % 3 == 1:
                        half = size // 2
                        futs.append(
                            ep.write_many(
                                peer, [("src", o, half, "dst", o), ("src", o + half, size - half, "dst", o + half)]
                            )
                        )
                    else:
                        futs.append(ep.send(peer, b"m%d" % i))
                for f in futs:
                    f.result(30)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        workers = [threading.Thread(target=post, args=(a, "mt-b", t)) for t in range(threads)]
        workers += [threading.Thread(target=post, args=(b, "mt-a", t)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        assert not errors, errors[:3]
        np.testing.assert_array_equal(b.region("dst").obj, src)
        np.testing.assert_array_equal(a.region("dst").obj, src)
        assert "mt-b" in a.peers() and "mt-a" in b.peers()
    finally:
        a.close()
        b.close()


# ---- close joins its threads -------------------------------------------------------------------------------


def _threads_of(name: str) -> list[str]:
    """Names of the live threads endpoint `name` started (every one is named tcp-<name>-...)."""
    return sorted(t.name for t in threading.enumerate() if t.name.startswith(f"tcp-{name}-"))


def test_close_joins_every_thread_it_started():
    """After `close` returns no thread of the endpoint is left: the watchdog (it slept up to 1 s before it saw the
    close), the accept loop, a server handshake in progress (it waited for the handshake timeout) and each
    connection's reader and sender."""
    a, b = TcpTransport("closer-a"), TcpTransport("closer-b")
    idle = None
    try:
        for ep in (a, b):
            ep.register("r", np.zeros(1 << 16, np.uint8))
        a.connect(b.name, b.address)
        b.connect(a.name, a.address)  # (a second connection set, the other way)
        assert a.write(b.name, "r", 0, "r", 0, 1 << 16).result(5) == 1 << 16
        assert b.write(a.name, "r", 0, "r", 0, 1000, notify=3).result(5) == 1000
        idle = _raw(a)  # a client that never says hello: a's handshake thread waits in recv
        for _ in range(200):
            if "tcp-closer-a-handshake" in _threads_of("closer-a"):
                break
            time.sleep(0.01)
        assert "tcp-closer-a-handshake" in _threads_of("closer-a")
        assert {"tcp-closer-a-watchdog", "tcp-closer-a-accept", "tcp-closer-a-closer-b-low-rx"} <= set(
            _threads_of("closer-a")
        )
        a.close()
        assert _threads_of("closer-a") == []
        assert _closed_by_server(idle)
    finally:
        a.close()
        b.close()
        if idle is not None:
            idle.close()
    assert _threads_of("closer-b") == []


def test_close_joins_the_threads_of_a_peer_that_never_closes(server):
    """A peer that never closes its end (it does not read either): `close` waits a grace period for it, then cuts
    the connections and joins their threads (the reader used to block in recv for as long as the peer lived)."""
    socks = _raw_handshake(server)
    try:
        server.wait_for_peer("evil")
        assert any(n.endswith("-rx") for n in _threads_of("srv"))
        server.close()
        assert _threads_of("srv") == []
        assert all(_closed_by_server(s) for s in socks)
    finally:
        for s in socks:
            s.close()


# ---- waits without a deadline, odd arguments -----------------------------------------------------------------


def test_waits_without_a_deadline(server):
    """`wait_for_peer(timeout=None)` was a TypeError (None compared with a time) and `recv(timeout=inf)` an
    OverflowError (the lock's timeout): both now wait until the peer comes / the message arrives."""
    c = TcpTransport("late")
    try:
        c.register("src", np.zeros(64, np.uint8))

        def later():
            time.sleep(0.1)
            c.connect(server.name, server.address)
            time.sleep(0.1)
            c.send(server.name, b"hello").result(5)

        t = threading.Thread(target=later)
        t.start()
        server.wait_for_peer("late", timeout=None)
        assert server.recv(timeout=float("inf")) == ("late", b"hello")
        t.join(10)
    finally:
        c.close()


@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), 0, -1])
def test_connect_refuses_an_endless_or_empty_timeout(server, timeout):
    """inf was an OverflowError from the socket (NaN a ValueError from it, 0 a BlockingIOError-like failure)."""
    c = TcpTransport("impatient")
    try:
        with pytest.raises(
            ValueError, match=f"connect timeout must be > 0 seconds and finite \\(or None\\), got {timeout}"
        ):
            c.connect(server.name, server.address, timeout=timeout)
        c.connect(server.name, server.address, timeout=None)
        assert server.name in c.peers()
    finally:
        c.close()


def test_a_timeout_that_is_not_a_number_and_a_bool_offset_are_refused(server):
    with pytest.raises(TypeError, match="timeout must be a number of seconds or None, got '1'"):
        server.recv(timeout="1")
    with pytest.raises(TypeError, match="timeout must be a number of seconds or None, got True"):
        server.wait_notification(timeout=True)
    c = _connect_client(server, "booly")
    try:  # (True was taken as offset 1)
        with pytest.raises(RegionError, match="offset and length must be ints, got True"):
            c.write(server.name, "src", True, "dst", 0, 10)
    finally:
        c.close()


# ---- found by the randomized hunt of 2026-12-03 ------------------------------------------------------------


def _raw_peer_of(server, region: str = "buf", size: int = 1 << 20) -> tuple[list[socket.socket], dict]:
    """A hand-driven peer "evil" of `server` whose region `region` (id 1, `size` bytes) the server may address:
    the first request the server posts is made by a thread in the returned dict's "post" (set it before
    calling "go"), and this answers its region query."""
    socks = _raw_handshake(server)
    server.wait_for_peer("evil")
    box: dict = {}

    def go():
        t = threading.Thread(target=lambda: box.__setitem__("fut", box["post"]()))
        t.start()
        (op, *_rest, req), body = _read_frame(socks[0])
        assert op == tcpmod.OP_REGION_QUERY and body == region.encode()
        socks[0].sendall(pack_header(tcpmod.OP_REGION_INFO, region=1, offset=size, req=req))
        t.join(5)
        return box["fut"]

    box["go"] = go
    return socks, box


def test_a_read_reply_cut_off_by_the_dying_peer_fails_the_read():
    """The read was taken out of the pending table before its payload was received, so a reply cut off
    mid-payload (the peer died) left the read pending forever: neither the set's failure, the watchdog nor `close`
    could fail it (seen with a killed peer during 16 MiB reads in 1 of 7 rounds, 2 of 3 paced)."""
    srv = TcpTransport("srv", timeout_s=1.0)
    srv.register("dst", np.zeros(1 << 20, np.uint8))
    socks, box = _raw_peer_of(srv)
    try:
        box["post"] = lambda: srv.read("evil", "dst", 0, "buf", 0, 100_000, priority="low")
        fut = box["go"]()
        (op, *_rest, req), _ = _read_frame(socks[1])
        assert op == tcpmod.OP_READ
        socks[1].sendall(pack_header(tcpmod.OP_READ_RESP, length=100_000, req=req) + b"z" * 1000)
        time.sleep(0.1)
        for s in socks:  # the peer dies in the middle of the reply
            s.close()
        with pytest.raises(PeerLostError):
            fut.result(5)
    finally:
        srv.close()


def test_posting_to_a_silent_peer_does_not_keep_it_alive():
    """Every new post reset the watchdog's clock, so a peer that stopped answering was never dropped while the
    application kept posting to it (a write every 0.3 s, timeout_s=1: the first write still pending after 6 s).
    Now the clock restarts only when a request is pending after none were, and small sends into a socket with
    room are no sign of the peer's life."""
    srv = TcpTransport("srv", timeout_s=1.0)
    srv.register("src", np.zeros(1 << 16, np.uint8))
    socks, box = _raw_peer_of(srv)
    try:
        box["post"] = lambda: srv.write("evil", "src", 0, "buf", 0, 100)
        first = box["go"]()
        t0 = time.monotonic()
        while not first.done() and time.monotonic() - t0 < 5:
            try:
                srv.write("evil", "src", 0, "buf", 0, 100)
            except PeerLostError:
                break
            time.sleep(0.3)
        with pytest.raises(PeerLostError, match="no progress"):
            first.result(0.1)
        assert time.monotonic() - t0 < 3
    finally:
        for s in socks:
            s.close()
        srv.close()


def test_a_write_to_a_peer_that_answers_keeps_its_set_alive():
    """The other side of the watchdog change: a peer that acknowledges, slowly but within timeout_s, is never
    dropped, whatever the request count (the clock restarts at each acknowledgement)."""
    srv = TcpTransport("srv", timeout_s=1.0)
    srv.register("src", np.zeros(1 << 16, np.uint8))
    socks, box = _raw_peer_of(srv)
    try:
        box["post"] = lambda: srv.write("evil", "src", 0, "buf", 0, 100)
        futs = [box["go"]()]
        for _ in range(6):  # 6 x 0.4 s > timeout_s, with writes always pending
            futs.append(srv.write("evil", "src", 0, "buf", 0, 100))
            time.sleep(0.4)
            (op, *_rest, req), _ = _read_frame(socks[1])
            assert op == OP_WRITE
            ack = tcpmod.ACK_ENTRY.pack(req, 100)
            socks[1].sendall(pack_header(tcpmod.OP_WRITE_ACKS, length=len(ack)) + ack)
        for f in futs[:-1]:
            assert f.result(5) == 100
        assert "evil" in srv.peers()
    finally:
        for s in socks:
            s.close()
        srv.close()


def test_a_message_offered_to_a_lost_connection_set_fails(monkeypatch):
    """`send` picks the live set, then queues its frame; when the set was lost in between, the frame went to a
    connection whose sender thread had already ended, and the message's future (it is in no pending table) stayed
    pending forever, `close` included. The window is widened here as a preemption there would."""
    a, b = TcpTransport("a", timeout_s=1.0), TcpTransport("b")
    a.connect("b", b.address)
    real = tcpmod.TcpTransport._get_peer

    def preempted(self, name):
        p = real(self, name)
        if threading.current_thread().name == "poster":
            time.sleep(0.5)  # meanwhile the peer goes away
        return p

    monkeypatch.setattr(tcpmod.TcpTransport, "_get_peer", preempted)
    monkeypatch.setattr(tcpmod.TcpTransport, "_peer_for", preempted)
    box: dict = {}
    t = threading.Thread(target=lambda: box.__setitem__("fut", a.send("b", b"hello")), name="poster")
    try:
        t.start()
        time.sleep(0.1)
        b.close()
        t.join(5)
        with pytest.raises(PeerLostError):
            box["fut"].result(5)
    finally:
        a.close()
        b.close()


def test_a_handshake_trickled_byte_by_byte_is_dropped_at_its_timeout():
    """The handshake timeout was per recv, not for the handshake: 64 connections sending a HELLO byte every 0.3 s
    (timeout 0.5 s) held every handshake slot for minutes and the endpoint refused all new peers."""
    srv = TcpTransport("srv", handshake_timeout_s=0.5)
    srv.register("dst", np.zeros(1 << 16, np.uint8))
    body = json.dumps({"name": "x", "peer": "srv", "session": "s", "stream": "high", "nonce": "00" * 32}).encode()
    hello = pack_header(OP_HELLO, length=len(body)) + body
    slow = [_raw(srv) for _ in range(tcpmod.MAX_PENDING_HANDSHAKES)]
    stop = threading.Event()

    def trickle():
        for i in range(len(hello) - 1):
            for s in slow:
                try:
                    s.send(hello[i : i + 1])
                except OSError:
                    pass
            if stop.wait(0.3):
                return

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        time.sleep(1.2)  # past the handshake timeout of every trickled connection
        _assert_serving(srv, "after-trickle")
    finally:
        stop.set()
        t.join(5)
        for s in slow:
            s.close()
        srv.close()


def test_a_failed_accept_does_not_end_the_accept_loop(caplog):
    """Any OSError from accept() ended the accept loop, silently: after one EMFILE (the process out of descriptors
    for a moment) the endpoint never accepted another peer. It is logged, and accepting goes on."""
    import resource

    caplog.set_level(logging.ERROR, logger="transport.tcp")
    srv = TcpTransport("srv")
    srv.register("dst", np.zeros(1 << 16, np.uint8))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    early = socket.socket()  # made before the descriptors run out (connect needs no new fd on this side)
    hog = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 10, hard))
        try:
            while True:
                hog.append(open(os.devnull))  # noqa: SIM115 -- held on purpose
        except OSError:
            pass
        early.connect(srv.address)  # the kernel completes it; the server's accept() fails with EMFILE
        deadline = time.monotonic() + 5
        while "accept failed" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        for f in hog:
            f.close()
        early.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        assert "accept failed" in caplog.text and "still accepting" in caplog.text
        _assert_serving(srv, "after-emfile")
    finally:
        srv.close()


@pytest.mark.parametrize("call", ["write", "read", "write_many"])
def test_a_bool_remote_offset_is_refused(server, call):
    """The remote offset took True as 1 (the local offset was fixed before: `RegionError`, as inproc does)."""
    c = _connect_client(server)
    try:
        with pytest.raises(RegionError, match="remote offset must be an int, got True"):
            if call == "write":
                c.write("srv", "src", 0, "dst", True, 4)
            elif call == "read":
                c.read("srv", "src", 0, "dst", True, 4)
            else:
                c.write_many("srv", [("src", 0, 4, "dst", True)])
    finally:
        c.close()
