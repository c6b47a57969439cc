"""The runtime side of the wire audit (session 43, findings 1, 5 and 9):

- the engines' tcp / rdma endpoints of the `local` and `inprocess` launchers took no secret (127.0.0.1, which every
  local user reaches), and engines unpickled every message: any local process ran code in every engine process;
- `ControlServer`: one connection thread that could not start ended its accept loop (nodes then waited for their
  challenge for good: `Client()` has no timeout); a failing accept was retried at once (a log flood); any authkey,
  b"" too, was taken.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import pickle
import socket
import threading
import time
import types

import numpy as np
import pytest

import transport as transport_pkg
from dualpath_jax.host_buffers import HostBufferPool
from dualpath_jax.runtime import engines, launcher, node
from dualpath_jax.runtime.config import ConfigError, validate
from dualpath_jax.runtime.control import ControlServer, DriverLost, GroupReply, GroupReport, SocketControlClient
from transport.base import TransportError
from transport.tcp import HEADER, OP_HELLO, OP_MSG, TcpTransport, pack_header, unpack_header

KEY = b"wirefix1-test-key"


# ------------------------------------------------------------------ 1A: the run's secret on loopback too
def _raw_message(address, server_name: str, payload: bytes) -> list[socket.socket]:
    """A local process that knows no secret: both streams' HELLO by hand (no proof), then one message on "high"."""
    socks = []
    for stream in ("high", "low"):
        s = socket.create_connection(address, timeout=5)
        socks.append(s)
        hello = json.dumps(
            {"name": "intruder", "peer": server_name, "session": "s1", "stream": stream, "nonce": os.urandom(32).hex()}
        ).encode()
        s.sendall(pack_header(OP_HELLO, length=len(hello)) + hello)
        *_, length, _, _ = unpack_header(s.recv(HEADER.size, socket.MSG_WAITALL))
        s.recv(length, socket.MSG_WAITALL)  # (its HELLO_ACK)
    try:
        socks[0].sendall(pack_header(OP_MSG, length=len(payload)) + payload)
    except OSError:  # (refused already)
        pass
    return socks


def _delivered(ep, timeout=1.0):
    try:
        return ep.recv(timeout=timeout)
    except TimeoutError:
        return None


def _closed_by_server(s: socket.socket) -> bool:
    s.settimeout(5.0)
    try:
        while s.recv(1 << 16):
            pass
        return True
    except ConnectionError:
        return True
    except TimeoutError:
        return False


def test_the_local_launchers_endpoints_refuse_a_process_without_the_runs_secret(base):
    cfg = base.replace(transport="tcp", launcher="local")
    validate(cfg)
    # what a node process of the local launcher builds (`_serve_one_run`: the run's authkey as the secret)
    ep = launcher._transport_factory(cfg, None, os.urandom(16).hex())("engine0", None)
    bare = launcher._transport_factory(cfg)("engine1", None)  # (no secret given: the raw client must get through)
    socks = []
    try:
        socks += _raw_message(bare.address, "engine1", b"hello")
        assert _delivered(bare) == ("intruder", b"hello"), "the raw client itself is broken"
        socks += _raw_message(ep.address, "engine0", b"hello")
        assert _delivered(ep) is None, "a local process without the run's secret got a message to an engine"
        assert _closed_by_server(socks[-2])
        # a real endpoint without the secret is refused too; one with it connects
        with TcpTransport("engine9") as intruder, pytest.raises(TransportError, match="shared secret"):
            intruder.connect("engine0", ep.address)
    finally:
        for s in socks:
            s.close()
        ep.close()
        bare.close()


def test_which_endpoints_get_the_runs_secret_and_the_users_override(base, monkeypatch):
    made = []
    monkeypatch.setattr(transport_pkg, "make_transport", lambda spec, **kw: made.append(spec) or "ep")
    for transport in ("tcp", "rdma"):
        launcher._transport_factory(base.replace(transport=transport, launcher="local"), None, "run")("e0", None)
        assert made.pop()["secret"] == "run", transport
    mine = base.replace(transport="tcp", launcher="local", transport_options={"secret": "mine"})
    validate(mine)  # (the user's own secret stays allowed with the local launcher)
    launcher._transport_factory(mine, None, "run")("e0", None)
    assert made.pop()["secret"] == "mine"
    inproc = base.replace(transport="inproc", launcher="inprocess")
    launcher._transport_factory(inproc, None, "run")("e0", None)
    assert "secret" not in made.pop()  # (inproc has no network: it takes no secret)
    for empty in ("", None, b""):
        with pytest.raises(ConfigError, match=r"secret=.*: a secret must be a non-empty string"):
            validate(base.replace(transport="tcp", launcher="local", transport_options={"secret": empty}))


def test_the_inprocess_launcher_gives_its_tcp_endpoints_a_secret(base, monkeypatch):
    """Its endpoints listen on 127.0.0.1 like the local launcher's (tests, and `launcher=inprocess` runs)."""
    seen = {}

    class Built(Exception):
        pass

    def factory(cfg, spec=None, secret=None):
        seen["secret"] = secret
        raise Built

    monkeypatch.setattr(launcher, "_transport_factory", factory)
    monkeypatch.setattr(launcher, "open_store", lambda *a, **k: None)
    monkeypatch.setattr(node, "block_layout", lambda *a, **k: None)
    with pytest.raises(Built):
        launcher.InProcessLauncher(base.replace(transport="tcp"), model_ops=object()).start([], None)
    assert isinstance(seen["secret"], str) and len(seen["secret"]) >= 32


# ------------------------------------------------------------------ 1B: engine messages are JSON, never pickle
def _engine(cls, engine_id: int, ep, **kw):
    """A real engine over a real endpoint; model, store and SNIC are stand-ins (only its message pump runs)."""
    cfg = types.SimpleNamespace(block_size=4, cluster=types.SimpleNamespace(decode_slots=2, max_seq_len=64))
    model = types.SimpleNamespace(
        kv_layout=types.SimpleNamespace(bytes_per_token_per_layer=8, num_layers=2), new_decode_batch=lambda *a: None
    )
    ctx = types.SimpleNamespace(cfg=cfg, model=model, emit=lambda ev: None)
    pool = HostBufferPool(slot_nbytes=64, budget_bytes=1024, prefault=False)
    return cls(engine_id, 0, ctx, ep, pool, None, **kw)


@pytest.fixture
def de_pump():
    """A DE's message pump on a loopback tcp endpoint without a secret, and a PE engine that sends to it."""
    de_ep, pe_ep = TcpTransport("engine1"), TcpTransport("engine0")
    de = _engine(engines.DecodeEngine, 1, de_ep)
    pe = _engine(engines.PrefillEngine, 0, pe_ep, batcher=None)
    pe.directory = {1: (1, de_ep.address)}
    pump = threading.Thread(target=de._pump_messages, daemon=True)
    pump.start()
    yield types.SimpleNamespace(de=de, pe=pe, de_ep=de_ep)
    de.stop()
    pump.join(5.0)
    de_ep.close()
    pe_ep.close()


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))  # (unpickling it creates the file)


def test_a_pickle_sent_to_an_engine_is_not_run_but_logged(de_pump, tmp_path, caplog):
    marker = tmp_path / "ran"
    with TcpTransport("intruder") as intruder, caplog.at_level(logging.ERROR, logger="dualpath_jax.runtime.engines"):
        intruder.connect("engine1", de_pump.de_ep.address)
        intruder.send("engine1", pickle.dumps(_Evil(str(marker))))
        time.sleep(0.3)
        # the pump goes on: a real message after it still arrives
        de_pump.pe.send_msg(1, {"kind": "pe_area", "request_id": 3, "attempt": 0, "offset": 64})
        assert de_pump.de.inbox.get(5.0) == ("msg", {"kind": "pe_area", "request_id": 3, "attempt": 0, "offset": 64})
    assert not marker.exists(), "a peer's pickle ran code in the engine"
    lines = [r.getMessage() for r in caplog.records if "dropped a message" in r.getMessage()]
    assert len(lines) == 1 and "de1: dropped a message from 'intruder'" in lines[0] and "not JSON" in lines[0]


@pytest.mark.parametrize(
    "payload, why",
    [
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "a JSON list, not an object"),
        (b'{"kind": "run", "request_id": 1, "attempt": 0}', "unknown kind 'run'"),
        (b'{"kind": "pe_area", "request_id": 1, "attempt": 0}', "pe_area message whose offset is 'None'"),
        (b'{"kind": "de_area", "request_id": 1.5, "attempt": 0, "offset": 0}', "request_id is '1.5', not an int"),
        (b'{"kind": "de_read_done", "request_id": 1, "attempt": true, "end_blocks": 0}', "attempt is 'True'"),
        (b"[" * 100_000, "not JSON (RecursionError"),
        (
            b'{"kind": "prefill_done", "request_id": 1, "attempt": 0, "hit_tokens": 0, "first_token": 5, '
            b'"pe_stamps": {"read": [1, 2]}}',
            "is not [start, end, bytes]",
        ),
        (
            b'{"kind": "prefill_done", "request_id": 1, "attempt": 0, "hit_tokens": 0, "first_token": 5, '
            b'"pe_stamps": {"prefill_start": "soon"}}',
            "hold a time that is not a number",
        ),
    ],
)
def test_a_message_that_is_no_engine_message_is_refused_saying_why(payload, why):
    with pytest.raises(engines.BadMessage, match=f"^.*{__import__('re').escape(why)}"):
        engines.decode_msg(payload)


def test_every_message_kind_arrives_as_it_was_sent(de_pump):
    """Over a real endpoint, from `send_msg` to the inbox: numpy ints (an area offset, a block count) and the PE's
    stamps (NaN where it has none; its read a tuple) come out as the engines made them."""
    sent = [
        {"kind": "pe_area", "request_id": 1, "attempt": 0, "offset": np.int64(4096)},
        {"kind": "de_area", "request_id": 1, "attempt": 2, "offset": 0},
        {"kind": "de_read_done", "request_id": 1, "attempt": 0, "end_blocks": np.int32(3)},
        {
            "kind": "prefill_done",
            "request_id": 2,
            "attempt": 1,
            "hit_tokens": 32,
            "first_token": 151643,
            "pe_stamps": {"prefill_start": 1765000000.123456, "prefill_end": 1765000000.5, "read": (1.25, 1.5, 8192)},
        },
        {
            "kind": "prefill_done",
            "request_id": 3,
            "attempt": 0,
            "hit_tokens": 0,
            "first_token": 0,
            "pe_stamps": {"prefill_start": math.nan, "prefill_end": 2.0, "read": None},
        },
    ]
    for msg in sent:
        de_pump.pe.send_msg(1, msg)
    got = [de_pump.de.inbox.get(5.0) for _ in sent]
    assert [k for k, _ in got] == ["msg"] * len(sent)
    got = [m for _, m in got]
    assert got[:4] == sent[:4]
    assert isinstance(got[3]["pe_stamps"]["read"], tuple)
    nan = got[4].pop("pe_stamps")
    assert math.isnan(nan.pop("prefill_start")) and nan == {"prefill_end": 2.0, "read": None}
    assert got[4] == {k: v for k, v in sent[4].items() if k != "pe_stamps"}


def test_every_message_the_engines_send_is_one_their_peers_take():
    """A kind `decode_msg` does not know is dropped by its receiver (a request would then wait for it): every
    `send_msg` call of engines.py sends a kind of `MESSAGE_FIELDS` with that kind's fields."""
    import ast
    import inspect

    sent = {}
    for call in ast.walk(ast.parse(inspect.getsource(engines))):
        if isinstance(call, ast.Call) and getattr(call.func, "attr", None) == "send_msg":
            msg = call.args[1]
            assert isinstance(msg, ast.Dict), ast.unparse(call)
            fields = {k.value: v for k, v in zip(msg.keys, msg.values, strict=True)}
            sent[fields["kind"].value] = set(fields) - {"kind", "request_id", "attempt", "pe_stamps"}
    assert sent == {k: set(v) for k, v in engines.MESSAGE_FIELDS.items()}


# ------------------------------------------------------------------ 5, 9: the control server
def _report(node_id: int) -> GroupReport:
    return GroupReport(node_id=node_id, role="prefill", engine_ids=[node_id])


def _fetch_in_thread(address, join_s=6.0, **kw):
    """A node's connect and first fetch, in a thread (the code before the fix hung in it): what it got or raised."""
    out = []

    def node_():
        try:
            c = SocketControlClient(address, KEY, timeout_s=3.0, **kw)
            try:
                out.append(c.fetch(_report(0)))
            finally:
                c.close()
        except BaseException as e:  # noqa: BLE001 -- what the test looks at
            out.append(e)

    t = threading.Thread(target=node_, daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(join_s)
    return (out[0] if out else "still waiting"), time.monotonic() - t0


def test_a_connection_thread_that_cannot_start_ends_no_accept_loop(monkeypatch, caplog):
    srv = ControlServer(lambda report: GroupReply(directory={}), KEY)
    real = threading.Thread.start
    failed = []

    def start(self):
        if self.name == "control-conn" and not failed:  # (a thread limit reached once)
            failed.append(self)
            raise RuntimeError("can't start new thread")
        return real(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    try:
        with caplog.at_level(logging.ERROR, logger="dualpath_jax.runtime.control"):
            stray = socket.create_connection(srv.address)
            deadline = time.monotonic() + 5
            while not failed and time.monotonic() < deadline:
                time.sleep(0.01)
            assert failed
            got, _ = _fetch_in_thread(srv.address)
        assert got == GroupReply(directory={}), f"a node after one failed thread start: {got!r}"
        assert srv._accept.is_alive()
        assert "control server: dropping a connection: can't start new thread" in caplog.text
        assert _closed_by_server(stray)  # (that connection is closed, not left in the air)
    finally:
        srv.close()


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_a_node_whose_driver_never_answers_gives_up_with_driver_lost(family, tmp_path):
    """A server that takes connections into its backlog but never runs the challenge (an accept thread gone, a
    driver stopped): `Client()` waited for good."""
    if family == "tcp":
        listener = socket.create_server(("127.0.0.1", 0), backlog=8)
        address = listener.getsockname()
    else:
        address = str(tmp_path / "control")
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(address)
        listener.listen(8)
    try:
        got, took = _fetch_in_thread(address, connect_timeout_s=0.3, join_s=5.0)
        assert isinstance(got, DriverLost), got
        assert "did not answer within 0.3 s" in str(got) and took < 3.0
    finally:
        listener.close()


def test_a_failing_accept_backs_off_and_the_server_goes_on(monkeypatch, caplog):
    """Out of descriptors (EMFILE), accept was retried at once: ~370 warning lines a second, one core busy."""
    srv = ControlServer(lambda report: GroupReply(), KEY)
    try:
        real = srv._listener.accept
        calls = []

        def failing():
            calls.append(time.monotonic())
            raise OSError(errno.EMFILE, "Too many open files")

        with caplog.at_level(logging.WARNING, logger="dualpath_jax.runtime.control"):
            monkeypatch.setattr(srv._listener, "accept", failing)
            socket.create_connection(srv.address).close()  # (taken by the accept running now: the next ones fail)
            time.sleep(0.5)
            n = len(calls)
            monkeypatch.setattr(srv._listener, "accept", real)
            assert 2 <= n <= 12, f"{n} accepts in 0.5 s"  # (10 ms doubling: ~6)
            got, _ = _fetch_in_thread(srv.address)
        assert got == GroupReply()
        assert "control server: accept failed (the driver is out of file descriptors (RLIMIT_NOFILE" in caplog.text
        assert "`ulimit -n`) ([Errno 24] Too many open files)); still accepting" in caplog.text  # (names the limit)
    finally:
        srv.close()


@pytest.mark.parametrize("key", [b"", b"k", b"k" * 15, "k" * 16])
def test_a_short_authkey_is_refused(key):
    with pytest.raises(ValueError, match=r"ControlServer: authkey must be at least 16 bytes, got (\d+ bytes|str)"):
        ControlServer(lambda report: GroupReply(), key)
