"""Fix wave 32, helper "slowfix" (report: /work/notes/fix32_slowfix_report.md).

- A wait for this endpoint's own pacer counts as progress only while the peer's host takes what was sent: a peer whose
  host stopped taking data is failed within timeout_s even while a slow pacer spaces the chunks (the slowpeer audit's
  F1 fix restarted the peer's clock on every pacer check, which kept such a peer alive until the socket buffers,
  megabytes, filled at the paced rate).
- A refused connect is tried again only as long as the caller asks (`wait_for_listener_s`); the runtime's engines and
  a spawned test peer connect to addresses published once their peer listened, so a refusal there fails at once.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import types

import numpy as np
import pytest
from test_fix26_wirefix2 import _frame
from test_fix32_leftovers import _free_port

from dualpath_jax.runtime.engines import EngineBase, engine_endpoint
from dualpath_jax.traffic import Link, Pacer
from transport import tcp
from transport.base import PeerLostError, connect_published
from transport.inproc import InProcFabric, InProcTransport
from transport.tcp import OP_HELLO_ACK, TcpTransport, pack_header

CHUNK = 16 << 10  # a slow link's quantum (`Link`: at least 16 KiB)


@pytest.mark.parametrize("spacing", [2.5, 0.5])
def test_a_paced_write_to_a_peer_whose_host_takes_no_more_data_fails_within_timeout_s(spacing):
    """The raw peer answers the handshake, then never reads, with a 4 KiB receive buffer: its window shuts after the
    first chunk. Our pacer spaces 16 KiB chunks `spacing` x timeout_s apart, and our send buffer (megabytes on
    loopback) takes every chunk at once. The write must fail for want of progress, not stay pending while our pacer
    waits (2.5) or while chunks go into our own send buffer (0.5)."""
    timeout_s = 0.5
    me = TcpTransport("me", pacer=Pacer([Link("cnic", CHUNK / (spacing * timeout_s))]), timeout_s=timeout_s)
    me.register("src", np.ones(64 * CHUNK, np.uint8))
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (inherited by the accepted sockets)
    lst.bind(("127.0.0.1", 0))
    lst.listen()
    socks: list[socket.socket] = []

    def serve() -> None:
        for _ in range(2):
            s, _ = lst.accept()
            _frame(s)  # HELLO
            ack = json.dumps({"name": "stuck", "auth": False}).encode()
            s.sendall(pack_header(OP_HELLO_ACK, length=len(ack)) + ack)
            socks.append(s)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        me.connect("stuck", lst.getsockname())
        me._live["stuck"].remote_regions["buf"] = (1, 1 << 30)  # (no region query: the peer answers none)
        # 64 chunks take 80 s (16 s) at this pace: pending past 8 s means our own sending kept the peer alive
        err = me.write("stuck", "src", 0, "buf", 0, 64 * CHUNK).exception(timeout=8)
        assert isinstance(err, PeerLostError) and "no progress" in str(err), err
    finally:
        me.close()
        t.join(5)
        for s in socks:
            s.close()
        lst.close()


def test_a_refused_connect_is_tried_again_for_wait_for_listener_s_only():
    held, port = _free_port()
    tries: list = []
    real = socket.create_connection
    cli = TcpTransport("cli")
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(tcp.socket, "create_connection", lambda *a, **k: tries.append(a) or real(*a, **k))
            with pytest.raises(PeerLostError, match="refused .*not tried again, wait_for_listener_s=0"):
                cli.connect("srv", ("127.0.0.1", port), timeout=10, wait_for_listener_s=0)
            assert len(tries) == 1, tries
            tries.clear()
            with pytest.raises(PeerLostError, match="refused .*tries in .*nothing listening there") as got:
                cli.connect("srv", ("127.0.0.1", port), timeout=10, wait_for_listener_s=0.3)
        # (50, 100, 150 ms backoff, the last wait cut at 0.3 s: 4 tries, not the 10 s timeout's ~13)
        assert 2 <= len(tries) <= 5, (len(tries), got.value)
    finally:
        cli.close()
        held.close()


@pytest.mark.parametrize("bad", [-1, -0.5, math.nan, math.inf, "1", True, [1]])
@pytest.mark.parametrize("backend", ["tcp", "inproc"])
def test_a_wait_for_listener_s_that_is_no_number_of_seconds_is_refused(backend, bad):
    ep = TcpTransport("cli") if backend == "tcp" else InProcTransport("cli", InProcFabric())
    try:
        with pytest.raises(ValueError, match="wait_for_listener_s must be None or a finite number of seconds >= 0"):
            ep.connect("srv", ("127.0.0.1", 9) if backend == "tcp" else "srv", 1, wait_for_listener_s=bad)
    finally:
        ep.close()


def test_an_engine_connecting_to_a_peer_that_is_gone_fails_at_the_first_try(monkeypatch):
    """`EngineBase._peer` connects to an address from the directory, published once that peer listened: a refusal means
    it died, so it fails at once (a refused connect was tried for the whole 10 s connect timeout, holding the engine
    thread before `peer_lost`)."""
    held, port = _free_port()
    tries: list = []
    real = socket.create_connection
    monkeypatch.setattr(tcp.socket, "create_connection", lambda *a, **k: tries.append(a) or real(*a, **k))
    ep = TcpTransport(engine_endpoint(0))
    engine = types.SimpleNamespace(
        _connected=set(), _heard=set(), transport=ep, directory={1: (1, ("127.0.0.1", port))}
    )
    try:
        with pytest.raises(PeerLostError, match="refused"):
            EngineBase._peer(engine, 1)
        assert len(tries) == 1, tries
        assert engine._connected == set()
    finally:
        ep.close()
        held.close()


def test_connect_published_calls_a_backend_whose_connect_predates_the_keyword():
    """A backend of one's own written to the older interface (`connect(peer, address, timeout)`) keeps working in the
    runtime: `connect_published` calls it without the keyword."""

    class Older(InProcTransport):
        def connect(self, peer, address=None, timeout=10.0):
            calls.append(timeout)
            super().connect(peer, address, timeout)

    calls: list = []
    fabric = InProcFabric()
    a, b = Older("a", fabric), InProcTransport("b", fabric)
    try:
        connect_published(a, "b", b.address)
        connect_published(b, "a", a.address)  # (one that takes it: checked, nothing to wait for)
        assert calls == [10.0] and a.peers() == ["b"] and b.peers() == ["a"]
    finally:
        a.close()
        b.close()


def test_a_connect_that_is_waited_for_still_ends_at_its_timeout(monkeypatch):
    """wait_for_listener_s past the connect timeout: the timeout still bounds the tries (backoff 50 ms doubling to 1 s:
    about 5 tries in 0.6 s; 100 s would be about 100)."""
    held, port = _free_port()
    tries: list = []
    real = socket.create_connection
    monkeypatch.setattr(tcp.socket, "create_connection", lambda *a, **k: tries.append(a) or real(*a, **k))
    cli = TcpTransport("cli")
    try:
        with pytest.raises(PeerLostError, match="tries in .* s: nothing listening there"):
            cli.connect("srv", ("127.0.0.1", port), timeout=0.6, wait_for_listener_s=100)
    finally:
        cli.close()
        held.close()
    assert 2 <= len(tries) <= 8, len(tries)
