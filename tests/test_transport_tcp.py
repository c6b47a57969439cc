"""TCP backend: separate processes, hostile input, authentication, dead and silent peers."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

import numpy as np
import pytest

from dualpath_jax.traffic import Link, Pacer
from transport import tcp as tcpmod
from transport.base import PeerLostError, TransportError
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


def _raw_handshake(server, session="s1") -> list[socket.socket]:
    """Open a complete connection set by hand (loopback, no secret) to send crafted frames afterwards."""
    socks = []
    for stream in ("high", "low"):
        s = _raw(server)
        hello = json.dumps(
            {"name": "evil", "peer": server.name, "session": session, "stream": stream, "nonce": os.urandom(32).hex()}
        ).encode()
        s.sendall(pack_header(OP_HELLO, length=len(hello)) + hello)
        op, _, _, _, length, _, _ = unpack_header(tcpmod._recv_exact(s, HEADER.size))
        assert op == OP_HELLO_ACK
        tcpmod._recv_exact(s, length)
        socks.append(s)
    return socks


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
    "frame",
    ["out_of_bounds", "unknown_region", "bad_magic", "oversized_message", "truncated_payload", "unsolicited_ack"],
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


def _writes_to_raw_peer(server, n: int) -> tuple[list[socket.socket], list, list[tuple[int, int]]]:
    """The server writes n frames to a hand-driven peer "evil": returns its sockets, the futures and the
    (request id, length) of each WRITE frame it received (it answers the region query itself)."""
    socks = _raw_handshake(server)
    server.wait_for_peer("evil")
    results: list = []

    def answer_query():
        (op, *_rest, req), body = _read_frame(socks[0])
        assert op == tcpmod.OP_REGION_QUERY and body == b"evil_dst"
        socks[0].sendall(pack_header(tcpmod.OP_REGION_INFO, region=5, offset=1 << 16, req=req))

    t = threading.Thread(target=answer_query)
    t.start()
    src = server.region("dst")
    src.obj[:] = np.arange(1 << 16, dtype=np.uint64).astype(np.uint8)
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
