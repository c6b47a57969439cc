"""Fix wave 10, tcp: a paced send waiting for its pacer is ended by `close` / `disconnect` / the set's loss.

A paced frame (a write or a read reply on an endpoint with a pacer) is sent by the connection's sender thread chunk by
chunk, each chunk waiting for its slot in `Transport._paced_chunks`. The tcp backend passed the pacer no `check` (the
inproc backend does, `dualpath_jax.traffic` calls it at least every CHECK_INTERVAL_S while a chunk waits), so the
sender thread sat in the wait until the pacer granted the next chunk, however long that was (a slow or contended
link), whatever happened to the set meanwhile:

- `close()` waited for it CLOSE_GRACE_S (the graceful wait), cut the sockets, waited CLOSE_GRACE_S more, then logged
  "thread ... did not stop after close" and returned with the thread still running;
- `disconnect(peer)`, the peer closing or the set's loss failed the transfer's future at once but left the thread
  waiting, its chunks queued on the link (granted later for bytes that never moved, other flows waiting behind them).

The contract now: the paced wait calls a check that raises the set's error (TransportClosedError after our `close`,
PeerLostError otherwise) once the set is dead, so the sender thread ends within ~CHECK_INTERVAL_S, the chunks not
moved are taken back from the link, and `close` returns without waiting for the pacer.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from dualpath_jax.traffic import TrafficManager
from transport import tcp
from transport.base import PeerLostError, TransportClosedError
from transport.tcp import TcpTransport

N = 300_000  # three 100 kB chunks at 1 kB/s: after the first, the next slot is ~100 s away
CHUNK = 100_000


@pytest.fixture
def paced_tcp(monkeypatch):
    # (so the old waits show as "does not return": close waited 2 x CLOSE_GRACE_S for the sender thread)
    monkeypatch.setattr(tcp, "CLOSE_GRACE_S", 30.0)
    tm = TrafficManager()
    link = tm.add_link("fix10/slow", 1000.0, {"high": 1.0, "low": 1.0}, quantum=CHUNK, burst_s=0.0)
    a = TcpTransport("fix10-a", pacer=tm.pacer("fix10/slow"))
    b = TcpTransport("fix10-b")
    dst = np.zeros(N, np.uint8)
    a.register("src", np.ones(N, np.uint8))
    b.register("dst", dst)
    a.connect("fix10-b", b.address)
    yield a, b, link, dst
    for ep in (a, b):
        t = threading.Thread(target=ep.close, daemon=True)
        t.start()
        t.join(10)


def _stuck_write(a, dst):
    """A paced write whose first chunk landed: its sender thread now waits ~100 s for the next chunk's slot."""
    sender = a._live["fix10-b"].conns["low"].sender
    fut = a.write("fix10-b", "src", 0, "dst", 0, N)
    deadline = time.monotonic() + 30
    while not dst[CHUNK - 1] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dst[CHUNK - 1] == 1 and not fut.done()
    return fut, sender


def _returns(call, *args, bound: float = 10.0) -> None:
    t = threading.Thread(target=call, args=args, daemon=True)
    t.start()
    t.join(bound)  # (generous: it takes milliseconds; it took 2 x CLOSE_GRACE_S = 60 s here)
    assert not t.is_alive(), f"{call.__qualname__} waited for a sender thread in a paced wait"


@pytest.mark.parametrize(
    "how",
    ["writer close", "writer disconnect", "receiver close", "receiver disconnect"],
    ids=lambda s: s.replace(" ", "-"),
)
def test_tcp_a_paced_wait_ends_when_the_set_goes(paced_tcp, how):
    a, b, link, dst = paced_tcp
    fut, sender = _stuck_write(a, dst)
    side, what = how.split()
    ep = a if side == "writer" else b
    if what == "close":
        _returns(ep.close)
    else:
        _returns(ep.disconnect, "fix10-b" if ep is a else "fix10-a")
    err = fut.exception(timeout=10)
    assert isinstance(err, TransportClosedError if how == "writer close" else PeerLostError), err
    sender.join(10)
    assert not sender.is_alive(), "the sender thread still waits for its pacer"
    assert not dst[CHUNK:].any()  # nothing moved after the set went
    # the chunks not moved are taken back from the link (left queued, they were granted later for nothing)
    assert not link._queues["low"] and link.bytes_by_class["low"] == CHUNK


def test_tcp_close_ends_a_paced_read_reply(paced_tcp):
    """A read reply is paced by the serving endpoint (its sender thread): closing that endpoint ends its wait too."""
    a, b, link, _ = paced_tcp
    dst = np.zeros(N, np.uint8)
    b.register("back", dst)
    fut = b.read("fix10-a", "back", 0, "src", 0, N)
    deadline = time.monotonic() + 30
    while not dst[CHUNK - 1] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dst[CHUNK - 1] == 1 and not fut.done()
    sender = a._live["fix10-b"].conns["low"].sender  # (a's sender thread on the set serves b's read)
    _returns(a.close)
    assert isinstance(fut.exception(timeout=10), PeerLostError)
    sender.join(10)
    assert not sender.is_alive(), "the sender thread still waits for its pacer"
    assert not link._queues["low"] and link.bytes_by_class["low"] == CHUNK


def test_close_waits_one_grace_period_for_all_stuck_threads_not_one_each(monkeypatch):
    """Reader threads stuck in an application's `on_message` hook (it blocks) do not stop when `close` cuts their
    sockets. `close` gave each of them its own CLOSE_GRACE_S after the cut (three stuck readers: 3 x), so its time
    grew with their number; now they share one: `close` returns within about 2 x CLOSE_GRACE_S (the graceful wait,
    then one for the stuck threads), logs them and leaves them."""
    grace = 3.0
    monkeypatch.setattr(tcp, "CLOSE_GRACE_S", grace)
    a = TcpTransport("fix10-hooked")
    release, entered = threading.Event(), []

    def hook(peer, payload):  # an application bug: blocks its reader thread
        entered.append(peer)
        release.wait(60)
        return True

    a.on_message = hook
    peers = [TcpTransport(f"fix10-sender{i}") for i in range(3)]
    try:
        for p in peers:
            p.connect("fix10-hooked", a.address)
            p.send("fix10-hooked", b"hello").result(10)
        deadline = time.monotonic() + 10
        while len(entered) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(entered) == 3
        t0 = time.monotonic()
        a.close()
        took = time.monotonic() - t0
        # before: ~grace (graceful wait) + 3 x grace (one each after the cut) = 4 x grace; now ~2 x grace
        assert took < 3.2 * grace, took
    finally:
        release.set()
        for p in peers:
            p.close()
        a.close()
