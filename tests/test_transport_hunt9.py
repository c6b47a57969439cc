"""Transport defects found by the ninth transport hunt (tcp.py, peer.py); each test failed on the commit before.

- tcp: an empty `secret` ("" or b"") is no secret to the constructor's non-loopback check, but the handshake took it
  as one: the endpoint demanded an HMAC proof (empty key) from every peer and refused peers without a secret ("'b'
  does not authenticate but this endpoint requires a shared secret"), so a config passing secret="" (an unset
  variable) on loopback could not connect to anyone. A secret that is not str/bytes (an int) was taken, and every
  handshake then failed with hmac's TypeError; it is refused at construction now.
- tcp: a HELLO without a nonce (server with a secret) was logged as "rejected connection from ...: 'nonce'" (a bare
  KeyError), one with a nonce that is not hex as fromhex's message; a HELLO_ACK that is not a JSON object made
  `connect` raise "... 'list' object has no attribute 'get'", one without a nonce "...: 'nonce'". They are now
  ProtocolErrors naming the field (or saying it is not a JSON object).
- peer.py: `PeerProcess.call` took the next message of the peer as its reply: after a call that timed out (the peer
  slow, not gone) its late reply was taken by the next call, and every later call got the reply of the one before
  (a digest answered with the previous op's reply). Requests now carry a `call_id` the reply echoes.
- peer.py: a "digest" of a range outside the region (a negative offset, past the end) answered the digest of the
  slice numpy gave (fewer bytes, or the region's tail): two such digests compared equal. It is an error now.
- peer.py: `PeerProcess.start` on a peer process that had exited (killed, crashed after reporting its address) raised
  a bare `BrokenPipeError` from the pipe; it is a RuntimeError naming the exit code, as `_answer`'s are.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import socket
import threading

import numpy as np
import pytest

from transport.base import TransportError
from transport.peer import PeerProcess, _serve, spawn_peer
from transport.tcp import HEADER, OP_HELLO, OP_HELLO_ACK, TcpTransport, _recv_exact, pack_header, unpack_header


@pytest.fixture
def closing():
    eps: list = []
    yield eps
    for ep in eps:
        ep.close()


@pytest.mark.parametrize("secret", ["", b""], ids=["str", "bytes"])
def test_tcp_an_empty_secret_is_no_secret(closing, secret):
    """Either side with an empty secret connects to a loopback peer without one, both ways."""
    plain = TcpTransport("plain9")
    empty = TcpTransport("empty9", secret=secret)
    other = TcpTransport("other9", secret=secret)
    closing += [plain, empty, other]
    empty.connect("plain9", plain.address, timeout=5)  # was: "'plain9' does not authenticate but ..."
    plain.connect("other9", other.address, timeout=5)  # was: "'other9' requires a shared secret; ... has none"
    assert sorted(plain.peers()) == ["empty9", "other9"]
    assert plain.send("empty9", b"hi").result(5) == 2
    assert empty.recv(peer="plain9", timeout=5) == ("plain9", b"hi")
    assert empty.secret is None and other.secret is None


def test_tcp_a_secret_that_is_not_str_or_bytes_is_refused():
    with pytest.raises(TypeError, match="secret must be str or bytes, got int"):
        TcpTransport("int9", secret=1234)


@pytest.fixture
def served(closing):
    """`peer._serve` (a spawned peer's loop) on a thread over tcp, as "pb9" with regions src (16 MiB) and dst (16
    bytes), connected from endpoint "pa9" (returned); told to quit at the end."""
    here, there = mp.Pipe()
    config = {"backend": "tcp", "name": "pb9", "timeout_s": 10}
    server = threading.Thread(target=_serve, args=(config, {"src": 16 << 20, "dst": 16}, there), daemon=True)
    server.start()
    a = TcpTransport("pa9", timeout_s=10)
    closing.append(a)
    try:
        assert here.poll(10)
        address = here.recv()
        here.send(None)  # (we connect to it)
        a.connect("pb9", address, timeout=5)
        assert here.poll(10) and here.recv() == "ready"
        yield a
        PeerProcess.call(a, "pb9", {"op": "quit"}, timeout=10)
    finally:
        server.join(10)


def test_a_served_peers_late_reply_is_not_taken_by_the_next_call(served):
    """8 writes of 16 MiB back to the driver: the call times out at 1 ms, its reply comes later. The next calls (a
    digest) get their own replies, with the sha256, not the write's {"ok": true}."""
    a = served
    a.register("sink", np.zeros(16 << 20, np.uint8))
    slow = {
        "op": "write",
        "peer": "pa9",
        "local": "src",
        "offset": 0,
        "remote": "sink",
        "remote_offset": 0,
        "length": 16 << 20,
        "count": 8,
    }
    with pytest.raises(TimeoutError):
        PeerProcess.call(a, "pb9", slow, timeout=0.001)
    for _ in range(3):
        digest = PeerProcess.call(a, "pb9", {"op": "digest", "region": "dst", "offset": 0, "length": 16}, 10)
        assert len(digest.get("sha256", "")) == 64, digest  # was: {"ok": true}, the write's late reply
    # a reply to a message sent without a call_id (another driver) is still taken as the answer
    a.send("pb9", json.dumps({"op": "digest", "region": "dst", "offset": 0, "length": 4}).encode()).result(5)
    assert "call_id" not in json.loads(a.recv(peer="pb9", timeout=10)[1])


@pytest.mark.parametrize("offset, length", [(-4, 4), (12, 8), (17, 0), (0, -1), (0.0, 4)])
def test_a_served_peer_refuses_a_digest_outside_the_region(served, offset, length):
    """A digest of [offset, offset + length) outside the 16-byte region was the digest of the slice numpy gave (fewer
    bytes, the region's tail for a negative offset): two such digests compared equal."""
    msg = {"op": "digest", "region": "dst", "offset": offset, "length": length}
    with pytest.raises(RuntimeError, match="outside region of 16 bytes"):
        PeerProcess.call(served, "pb9", msg, timeout=10)
    assert len(PeerProcess.call(served, "pb9", {**msg, "offset": 0, "length": 16}, timeout=10)["sha256"]) == 64


def test_starting_a_peer_process_that_exited_says_so():
    peer = spawn_peer({"backend": "tcp", "name": "pk9"}, {"r": 16})
    peer.kill()
    with pytest.raises(RuntimeError, match=r"peer pk9 not ready: the peer process exited \(code -9\)"):
        peer.start(None, timeout=5)  # was: BrokenPipeError


@pytest.mark.parametrize(
    "nonce, logged",
    [
        (None, "the HELLO of 'evil9' lacks the field 'nonce'"),
        ("zz", "the HELLO of 'evil9' has a nonce that is not hex"),
    ],
    ids=["missing", "not_hex"],
)
def test_tcp_a_hello_without_a_usable_nonce_is_logged_naming_it(closing, caplog, nonce, logged):
    caplog.set_level(logging.ERROR, logger="transport.tcp")
    server = TcpTransport("srv9", host="0.0.0.0", secret="k")
    closing.append(server)
    hello = {"name": "evil9", "peer": "srv9", "session": "s", "stream": "high"}
    if nonce is not None:
        hello["nonce"] = nonce
    body = json.dumps(hello).encode()
    with socket.create_connection(("127.0.0.1", server.address[1]), timeout=5) as s:
        s.sendall(pack_header(OP_HELLO, length=len(body)) + body)
        assert s.recv(100) == b""  # closed by the server
    assert logged in caplog.text  # was: "...: 'nonce'" / "non-hexadecimal number found in fromhex() arg ..."
    good = TcpTransport("good9", secret="k")
    closing.append(good)
    good.connect("srv9", ("127.0.0.1", server.address[1]), timeout=5)


@pytest.mark.parametrize(
    "ack, match",
    [
        (["not", "an", "object"], "HELLO_ACK that is not a JSON object"),
        ({"name": "fake9", "auth": True, "proof": "00"}, "HELLO_ACK of 'fake9' lacks the field 'nonce'"),
    ],
    ids=["not_an_object", "no_nonce"],
)
def test_tcp_connect_to_a_server_with_a_malformed_hello_ack_names_it(closing, ack, match):
    """A hand-driven server answers the HELLO with `ack`."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            _, _, _, _, length, _, _ = unpack_header(_recv_exact(conn, HEADER.size))
            _recv_exact(conn, length)
            body = json.dumps(ack).encode()
            conn.sendall(pack_header(OP_HELLO_ACK, length=len(body)) + body)
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                conn.recv(1)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    client = TcpTransport("cli9", secret="k")
    closing.append(client)
    try:
        with pytest.raises(TransportError, match=match):
            client.connect("fake9", listener.getsockname(), timeout=5)
    finally:
        t.join(5)
        listener.close()
