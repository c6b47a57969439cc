"""The wire's leftovers of session 44 (session 45, /work/notes/fix28_wire_report.md):

- a client of protocol version 5 meeting a server that closes the connection without answering its HELLO (one of
  version 4, or no dualpath tcp transport) tried again for its whole connect timeout (10 s) before its error: it gives
  up after SILENT_DROP_TRIES quick tries now, while a server short of handshake slots says "busy" and is tried again
  until the timeout;
- `RdmaTransport` took none of the control channel's caps (`TcpTransport`'s reply_copy_max_bytes, max_sets, ...):
  `config.transport_options` refused them by name for rdma.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time

import pytest
from _fake_verbs import install
from test_fix26_wirefix2 import _frame, _hello
from test_fix27_wire import _OldServer

import transport.tcp as tcpmod
from dualpath_jax.runtime import launcher
from dualpath_jax.runtime.config import ConfigError, validate
from transport import make_transport
from transport.base import PeerLostError, TransportError
from transport.rdma import RdmaConfigError, RdmaTransport, rdma_unavailable_reason
from transport.tcp import OP_HELLO_ACK, TcpTransport

# ---- 1: a server that closes without a word is given up at once; a busy one is tried until the timeout -------------


class _Listener:
    """A listener whose every accepted connection goes to `handle` (on its accept thread); counts them."""

    def __init__(self, handle):
        self.lst = socket.create_server(("127.0.0.1", 0))
        self.accepted = 0
        self.handle = handle
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                s, _ = self.lst.accept()
            except OSError:
                return
            self.accepted += 1
            self.handle(s)

    @property
    def address(self) -> tuple[str, int]:
        return self.lst.getsockname()[:2]

    def close(self) -> None:
        self.lst.close()


def test_a_server_closing_without_a_word_is_given_up_after_a_few_tries():
    """A listener that accepts and closes at once (no dualpath tcp transport; what a full endpoint did before it said
    "busy"): the client tried again for its whole timeout (7 tries in 3 s here, 10 s by default); it stops after
    SILENT_DROP_TRIES and names the likely causes."""
    lst = _Listener(lambda s: s.close())
    c = TcpTransport("cli")
    try:
        with pytest.raises(
            PeerLostError, match=r"closed the connection without answering the handshake, 3 tries in "
        ) as e:
            c.connect("srv", lst.address, timeout=3)
        assert lst.accepted == tcpmod.SILENT_DROP_TRIES == 3
        assert "no dualpath tcp transport, or it speaks another protocol version: this endpoint speaks 5" in str(
            e.value
        )
    finally:
        c.close()
        lst.close()


def test_a_version_4_server_is_given_up_after_a_few_tries():
    """A server of protocol version 4 reads the HELLO of version 5 and closes without an answer: given up after
    SILENT_DROP_TRIES (it took the whole connect timeout), naming another protocol version."""
    old = _OldServer(answer=False)
    c = TcpTransport("cli")
    try:
        with pytest.raises(PeerLostError, match=r"or it speaks another protocol version: this endpoint speaks 5, and "):
            c.connect("old", old.lst.getsockname(), timeout=3)
        assert old.hellos == tcpmod.SILENT_DROP_TRIES
    finally:
        c.close()
        old.close()


def test_a_busy_server_is_tried_again_until_the_timeout():
    """A server that answers every connection "busy" (`_drop_busy`: no handshake slot for it) is tried again within
    the connect timeout, more than SILENT_DROP_TRIES times, and the error says why (the client raised the first
    answer as a refusal)."""
    lst = _Listener(lambda s: tcpmod._drop_busy(s, "too many pending handshakes (max_pending_handshakes)"))
    c = TcpTransport("cli")
    try:
        with pytest.raises(PeerLostError, match=r"refused the connection: busy: too many pending handshakes") as e:
            c.connect("srv", lst.address, timeout=1)
        assert lst.accepted > tcpmod.SILENT_DROP_TRIES
        assert "a flood of connections that never authenticate holds its handshake slots" in str(e.value)
    finally:
        c.close()
        lst.close()


def test_an_endpoint_without_a_slot_says_busy(caplog):
    """An endpoint short of handshake slots (here: another host's share, max_pending_handshakes // 2, held by an idle
    connection from 127.0.0.2) closed the next connection without a word; it answers "busy" first, which the
    client tries again."""
    caplog.set_level(logging.ERROR, logger="transport.tcp")
    srv = TcpTransport("srv", max_pending_handshakes=2, handshake_timeout_s=5, handshake_step_s=5)
    idle = socket.create_connection(srv.address, timeout=5, source_address=("127.0.0.2", 0))
    try:
        time.sleep(0.2)  # (the idle one holds 127.0.0.2's one slot)
        body = {"name": "raw", "peer": "srv", "session": "s-raw", "stream": "high", "nonce": "00" * 32}
        with _hello(srv.address, body, source="127.0.0.2") as s:
            (op, *_), payload = _frame(s)
            assert op == OP_HELLO_ACK
            assert json.loads(payload) == {
                "error": "busy: too many pending handshakes from 127.0.0.2 (max_pending_handshakes / 2)",
                "busy": True,
            }
            assert s.recv(1) == b""
        assert "too many pending handshakes from 127.0.0.2" in caplog.text
    finally:
        idle.close()
        srv.close()


# ---- 2: the rdma control channel takes the tcp caps -----------------------------------------------------------------

NO_RDMA = rdma_unavailable_reason()  # None on a host with pyverbs and an RDMA device


@pytest.mark.parametrize(
    "kwargs,arg,message",
    [
        ({"max_sets": 0}, "max_sets", "max_sets must be an int >= 1 (None: 256), got 0"),
        ({"max_sets_per_peer": 1.5}, "max_sets_per_peer", "max_sets_per_peer must be an int >= 1 (None: 8), got 1.5"),
        ({"max_pending_handshakes": True}, "max_pending_handshakes", "max_pending_handshakes must be an int >= 1"),
        ({"handshake_step_s": float("nan")}, "handshake_step_s", "handshake_step_s must be a number of seconds > 0"),
        ({"handshake_timeout_s": 0}, "handshake_timeout_s", "handshake_timeout_s must be > 0 seconds and finite"),
    ],
)
def test_a_bad_control_channel_cap_of_rdma_is_refused_naming_it(kwargs, arg, message):
    """`RdmaTransport` takes the control channel's caps (it took none: a TypeError) and checks them before it needs a
    device, as its other arguments: an `RdmaConfigError` naming the argument, on any host."""
    with pytest.raises(RdmaConfigError, match="^" + re.escape(f"rdma: {message}")) as e:
        RdmaTransport("x", **kwargs)
    assert e.value.arg == arg


@pytest.mark.skipif(NO_RDMA is None, reason="this host has pyverbs and an RDMA device")
def test_the_rdma_control_caps_go_through_transport_options(base):
    """`config.transport_options` with rdma: the control channel's caps are taken by name (they were refused: "takes
    no max_sets"), reach the endpoint a launcher builds (a bad value is refused there by name, a good one passes the
    checks to the device's absence), and reply_copy_max_bytes, which cannot apply, is refused naming it."""
    opts = {"max_sets": 4, "handshake_step_s": 0.5, "max_pending_handshakes": 8}
    cfg = base.replace(transport="rdma", launcher="inprocess", transport_options=opts)
    with pytest.raises(ConfigError, match="config.transport='rdma' cannot run on this host"):
        validate(cfg)  # (the names passed; then the host has no device)
    with pytest.raises(
        ConfigError, match=r"RdmaTransport \('rdma'\) takes no reply_copy_max_bytes; its other fields: "
    ):
        validate(cfg.replace(transport_options={**opts, "reply_copy_max_bytes": 1 << 20}))
    spec = launcher.endpoint_spec(cfg, "pe0")
    assert {k: spec[k] for k in opts} == opts
    with pytest.raises(TransportError, match="rdma transport 'pe0' unavailable"):  # (past the checks)
        make_transport(spec)
    with pytest.raises(RdmaConfigError, match=re.escape("rdma: max_sets must be an int >= 1 (None: 256), got 0")):
        make_transport(launcher.endpoint_spec(cfg.replace(transport_options={"max_sets": 0}), "pe0"))


def test_the_rdma_control_channel_enforces_the_caps(monkeypatch):
    """Over tests/_fake_verbs.py's pyverbs stand-in: an rdma endpoint's control channel is built with the caps, and
    max_sets=1 refuses a second peer's connection set, naming the setting (it served 256)."""
    install(monkeypatch)
    srv = RdmaTransport("r0", max_sets=1, max_sets_per_peer=1, max_pending_handshakes=6, handshake_step_s=0.25)
    peers = [RdmaTransport(name) for name in ("r1", "r2")]
    try:
        c = srv.control
        assert (c.max_sets, c.max_sets_per_peer, c.max_pending_handshakes, c._step_s) == (1, 1, 6, 0.25)
        peers[0].connect("r0", srv.address, timeout=5)
        with pytest.raises(TransportError, match=r"refused the connection: 'r0' holds 1 connection sets.*\(max_sets\)"):
            peers[1].connect("r0", srv.address, timeout=5)
    finally:
        for ep in (*peers, srv):
            ep.close()
