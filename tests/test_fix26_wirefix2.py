"""TCP transport: the wire audit's findings (session 43, /work/notes/fix26_wire_report.md, findings 2, 3, 4, 7, 8).

- A peer that never acknowledges its KV ("low") writes but chats on "high" kept them pending forever (the watchdog's
  progress was per peer): progress is per connection now.
- 64 trickling or idle connections held every handshake slot, so no peer could connect: handshake steps have a short
  deadline, a full endpoint queues new connections (in the listener's backlog) instead of dropping them, another host
  holds at most half the slots, the flood's log lines are rate limited, and a client retries a dropped handshake.
- A connected peer made the endpoint allocate without bound: read replies it never reads (copied), message headers
  claiming 16 MiB (allocated up front), silent connection sets (4 threads each).
- A secret-protected endpoint told its instance id, and a probe whether it holds a set, before the client's proof, and
  a wrong peer name got the endpoint's real name.
- A non-ASCII proof was logged as a TypeError; a killed peer was blamed on a refused frame.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import tracemalloc

import numpy as np
import pytest

from transport import tcp as tcpmod
from transport.base import PeerLostError, TransportError
from transport.tcp import HEADER, OP_HELLO, OP_HELLO_ACK, OP_MSG, OP_READ, TcpTransport, pack_header, unpack_header


def _frame(s: socket.socket) -> tuple[tuple, bytes]:
    hdr = unpack_header(tcpmod._recv_exact(s, HEADER.size, deadline=time.monotonic() + 5))
    return hdr, tcpmod._recv_exact(s, hdr[4], deadline=time.monotonic() + 5) if hdr[4] else b""


def _hello(address, body: dict, source: str | None = None) -> socket.socket:
    s = socket.create_connection(address, timeout=5, source_address=(source, 0) if source else None)
    payload = json.dumps(body).encode()
    s.sendall(pack_header(OP_HELLO, length=len(payload)) + payload)
    return s


def _raw_set(server: TcpTransport, name: str = "raw") -> list[socket.socket]:
    """A connection set opened by hand (no secret), both HELLO_ACKs read."""
    socks = []
    for stream in ("high", "low"):
        body = {"name": name, "peer": server.name, "session": "s-" + name, "stream": stream, "nonce": "00" * 32}
        s = _hello(server.address, body)
        assert _frame(s)[0][0] == OP_HELLO_ACK
        socks.append(s)
    server.wait_for_peer(name, timeout=5)
    return socks


def _lines(caplog, text: str) -> int:
    return sum(text in r.getMessage() for r in caplog.records)


# ---- finding 3: progress per connection ------------------------------------------------------------------------


def test_a_wedged_kv_stream_fails_while_the_peer_chats_on_the_other():
    """The audit's e7: the raw peer drains "low" but never acknowledges, and sends a message on "high" every 0.1 s.
    The low write stayed pending forever (the chatter kept the peer's one clock fresh); now it fails within
    timeout_s and two watchdog periods, naming the connection."""
    me = TcpTransport("me", timeout_s=0.5)
    me.register("src", np.ones(1 << 16, np.uint8))
    lst = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        socks = []
        for _ in range(2):
            s, _ = lst.accept()
            _frame(s)  # HELLO
            ack = json.dumps({"name": "chatty", "auth": False}).encode()
            s.sendall(pack_header(OP_HELLO_ACK, length=len(ack)) + ack)
            socks.append(s)
        threading.Thread(target=lambda: [None for _ in iter(lambda: socks[1].recv(1 << 20), b"")], daemon=True).start()
        while not stop.wait(0.1):
            socks[0].sendall(pack_header(OP_MSG, length=2) + b"hi")
        for s in socks:
            s.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        me.connect("chatty", lst.getsockname())
        me._live["chatty"].remote_regions["buf"] = (1, 1 << 30)  # (no region query: the peer answers none)
        t0 = time.monotonic()
        err = me.write("chatty", "src", 0, "buf", 0, 1 << 16).exception(timeout=4)
        took = time.monotonic() - t0
        assert isinstance(err, PeerLostError) and "no progress on its 'low' connection" in str(err), err
        assert took < 0.5 + 2 * 0.125 + 0.5, took
        assert me.recv(timeout=1)[1] == b"hi"  # (the chatter did arrive meanwhile)
    finally:
        stop.set()
        me.close()
        t.join(5)
        lst.close()


def test_a_killed_peer_is_not_blamed_on_a_refused_frame():
    """A peer reset with a write pending: the error said the peer closes the set when it refuses a frame."""
    srv = TcpTransport("srv")
    socks = _raw_set(srv)
    srv._live["raw"].remote_regions["buf"] = (1, 1 << 20)
    srv.register("src", np.ones(1 << 10, np.uint8))
    try:
        fut = srv.write("raw", "src", 0, "buf", 0, 1 << 10)
        for s in socks:  # (what kill -9 does to a socket with unread data: a reset)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()
        err = fut.exception(timeout=5)
        assert isinstance(err, PeerLostError) and "the peer died, or it refused a frame" in str(err), err
    finally:
        srv.close()


# ---- finding 2: handshake slots --------------------------------------------------------------------------------


def _flood(address, n: int, stop: threading.Event, source: str | None = None, trickle: bool = True, pause=0.0) -> list:
    """`n` threads that each keep a connection that sends a HELLO header a byte every 0.1 s (or nothing), and
    reconnect when the server drops it (after `pause`)."""

    def hog():
        while not stop.is_set():
            try:
                s = socket.create_connection(address, timeout=5, source_address=(source, 0) if source else None)
            except OSError:
                stop.wait(0.05)
                continue
            s.settimeout(0.1)
            header = pack_header(OP_HELLO, length=100)
            try:
                for i in range(1 << 30):  # until the server drops it (seen at once)
                    try:
                        if not s.recv(1):
                            break
                    except TimeoutError:
                        pass
                    if stop.is_set():
                        break
                    if trickle and i < len(header):
                        s.send(header[i : i + 1])
            except OSError:
                pass
            s.close()
            stop.wait(pause)

    threads = [threading.Thread(target=hog, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def _connects(srv: TcpTransport, name: str, timeout: float) -> float:
    c = TcpTransport(name)
    c.register("src", np.ones(64, np.uint8))
    t0 = time.monotonic()
    try:
        c.connect(srv.name, srv.address, timeout=timeout)
        took = time.monotonic() - t0
        assert c.write(srv.name, "src", 0, "dst", 0, 64).result(5) == 64
        return took
    finally:
        c.close()


def test_a_trickling_flood_from_this_host_does_not_lock_a_peer_out():
    """80 connections from 127.0.0.1 trickling a HELLO header (reconnecting when dropped) held every slot: a real
    connect from the same address got "Connection reset by peer". Each step of a handshake has a short deadline
    now, and a full endpoint lets new connections wait their turn in arrival order: the peer gets in."""
    srv = TcpTransport("srv", handshake_timeout_s=0.5)
    srv.register("dst", np.zeros(64, np.uint8))
    stop = threading.Event()
    threads = _flood(srv.address, tcpmod.MAX_PENDING_HANDSHAKES + 16, stop)  # (more than the slots)
    try:
        time.sleep(0.6)
        assert _connects(srv, "cli", timeout=5) < 4.5
    finally:
        stop.set()
        for t in threads:
            t.join(5)
        srv.close()


def test_a_flood_from_another_address_leaves_slots_to_the_others(caplog):
    """64 idle connections from another address (127.0.0.2 here) take at most half the slots; the rest are dropped
    at once, in one log line a second with a count (it was one ERROR line per connection), and a peer connects at
    once."""
    caplog.set_level(logging.ERROR, logger="transport.tcp")
    # The flood's idle connections hold their slots for a handshake step (3 s here): a peer that found no slot left
    # connects only when one times out (2.4-2.7 s with the per-address cap lifted); a free slot lets it in at once
    # (~0.05 s; the 0.5 s timeout this test had made "at once" a 0.4 s limit that a loaded host missed).
    srv = TcpTransport("srv", handshake_timeout_s=3.0, handshake_step_s=3.0)
    srv.register("dst", np.zeros(64, np.uint8))
    stop = threading.Event()
    t0 = time.monotonic()
    threads = _flood(srv.address, tcpmod.MAX_PENDING_HANDSHAKES, stop, "127.0.0.2", trickle=False, pause=0.02)
    try:
        time.sleep(0.3)
        assert _connects(srv, "cli", timeout=5) < 2.0
        time.sleep(0.3)
        # The limiter's own rule: each second begun since the flood logs one line plus, at most, the count of the
        # second before it (a loaded host stretches the 0.6 s window past a second; 64 connections must not give 64).
        seconds = int(time.monotonic() - t0) + 1
        assert _lines(caplog, "too many pending handshakes") <= 2 * seconds, caplog.text
        assert "too many pending handshakes from 127.0.0.2" in caplog.text
    finally:
        stop.set()
        for t in threads:
            t.join(5)
        srv.close()


def test_a_connect_dropped_before_its_handshake_is_retried_and_explained():
    """A server that drops every connection unanswered (what a full endpoint did; it answers "busy" now): the client
    tries again SILENT_DROP_TRIES times, then names the likely causes (it said only "connection closed by peer")."""
    lst = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def drop():
        while True:
            try:
                s, _ = lst.accept()
            except OSError:
                return
            accepted.append(1)
            s.close()

    threading.Thread(target=drop, daemon=True).start()
    c = TcpTransport("cli")
    try:
        with pytest.raises(PeerLostError, match="closed the connection without answering the handshake"):
            c.connect("srv", lst.getsockname(), timeout=0.5)
        assert len(accepted) == tcpmod.SILENT_DROP_TRIES
    finally:
        c.close()
        lst.close()


# ---- finding 4: bounded memory ---------------------------------------------------------------------------------


def test_read_replies_a_peer_never_reads_are_not_copied_without_bound(monkeypatch):
    """48 READs of 1 MiB whose replies the peer never reads: every reply the socket did not take was copied into
    the queue (the audit: 24 READs of 16 MiB took 384 MiB). The reader stops reading from such a peer once the
    copies queued pass REPLY_COPY_MAX (4 MiB here): one reply more at most."""
    monkeypatch.setattr(tcpmod, "REPLY_COPY_MAX", 4 << 20, raising=False)
    srv = TcpTransport("srv")
    srv.register("dst", np.ones(1 << 20, np.uint8))
    socks = _raw_set(srv)
    rid = srv.region("dst").region_id
    try:
        socks[1].sendall(b"".join(pack_header(OP_READ, region=rid, length=1 << 20, req=i + 1) for i in range(48)))
        conn = srv._live["raw"].conns["low"]
        time.sleep(0.5)
        queued = sum(j[1].nbytes for j in list(conn.jobs) if j[1] is not None)
        assert queued <= (4 << 20) + (1 << 20), queued
    finally:
        for s in socks:
            s.close()
        srv.close()


def test_a_message_header_does_not_allocate_the_size_it_claims():
    """An OP_MSG header of 16 MiB (the limit) followed by one byte: `bytearray(16 MiB)` was allocated at once, per
    connection (the audit: 40 of them took 650 MiB). The buffer grows with the bytes that arrive now."""
    srv = TcpTransport("srv")
    socks = _raw_set(srv) + _raw_set(srv, "raw2")
    tracemalloc.start()
    try:
        for s in socks:
            s.sendall(pack_header(OP_MSG, length=16 << 20) + b"x")
        time.sleep(0.5)
        peak = tracemalloc.get_traced_memory()[1]
        assert peak < 16 << 20, peak  # (4 x 16 MiB before)
    finally:
        tracemalloc.stop()
        for s in socks:
            s.close()
        srv.close()


def test_connection_sets_are_capped(monkeypatch):
    """Silent sets were never dropped and had no cap (4 threads each: the audit's 100 sets made 400 threads). Past
    MAX_SETS (2 here) a new set is refused at the handshake, by name; a set dropped makes room again."""
    monkeypatch.setattr(tcpmod, "MAX_SETS", 2, raising=False)
    srv = TcpTransport("srv")
    clients = [TcpTransport(f"c{i}") for i in range(3)]
    try:
        for c in clients[:2]:
            c.connect("srv", srv.address)
        with pytest.raises(TransportError, match="refused the connection: 'srv' holds 2 connection sets"):
            clients[2].connect("srv", srv.address)
        srv.disconnect("c0")
        clients[2].connect("srv", srv.address)
    finally:
        for c in clients:
            c.close()
        srv.close()


# ---- finding 7: nothing told before the proof; finding 8: non-ASCII proof -------------------------------------


def test_nothing_is_told_before_the_clients_proof(caplog):
    """With a secret, the HELLO_ACK carried the instance id (and, to a probe, whether a set is held) before the
    client proved anything, and a wrong peer name got the real one back. Both come after the proof now (with
    AUTH_OK), which real clients still get: a connect learns the instance, and a probe its answer. A non-ASCII proof
    is an authentication failure in the log (it was "comparing strings with non-ASCII characters...")."""
    caplog.set_level(logging.ERROR, logger="transport.tcp")
    srv = TcpTransport("secret-srv", secret="k")
    cli = TcpTransport("cli", secret="k")
    try:
        hello = {"name": "x", "peer": "secret-srv", "session": "s", "nonce": "00" * 32, "auth": True}
        with _hello(srv.address, {**hello, "stream": "probe", "instance": "i"}) as s:
            (op, *_), body = _frame(s)
            told = json.loads(body)
            assert op == OP_HELLO_ACK and "instance" not in told and "sets" not in told, told
            proof = "é" * 64
            s.sendall(pack_header(tcpmod.OP_AUTH, length=len(proof.encode())) + proof.encode())
            assert s.recv(100) == b""
        with _hello(srv.address, {**hello, "stream": "high", "peer": "guess"}) as s:
            told = json.loads(_frame(s)[1])
            assert "secret-srv" not in json.dumps(told) and "wrong endpoint" in told["error"], told
        deadline = time.monotonic() + 5
        while "guess" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "'x' at" in caplog.text and "failed to prove the shared secret" in caplog.text, caplog.text
        assert "non-ASCII" not in caplog.text

        cli.connect("secret-srv", srv.address)
        assert cli._live["secret-srv"].instance == srv.instance
        assert cli._probe_instance("secret-srv", srv.address, 5) == (srv.instance, True)
    finally:
        cli.close()
        srv.close()
