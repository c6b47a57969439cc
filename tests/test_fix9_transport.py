"""Fix wave 9, transport area: defects noticed by earlier audits; each test failed on the code before its fix.

- traffic: an exception raised while `Link.paced` / `Pacer.paced` waited for a chunk's slot (a KeyboardInterrupt, a
  `check` that raises) left that chunk's ticket queued on the link (it was out of the transfer's `pending`, so the
  cleanup did not cancel it): it was granted later for bytes that never moved (recorded), and the class's next
  transfer waited behind it. The chunk being waited for is now cancelled too.
- inproc: `close` (of either side) waited for a copy stuck in a pacer until the pacer granted its next chunk, at most
  CLOSE_WAIT_S (5 s), and the transfer's future stayed pending until then. A paced copy now passes the pacer a `check`
  that raises once either side closed or the link dropped, so the wait ends within ~CHECK_INTERVAL_S and the future
  fails with TransportClosedError / PeerLostError.
- tcp: a write past the end of a region the peer registered again smaller (or deregistered) closes the connection set
  (the documented contract); the writer saw only "peer ... closed the connection", and for a deregistered region the
  receiver logged only "unknown region id N". The protocol has no frame for a reason: the receiver's log now names
  the region, offset and length in both cases, and the writer's error says the peer may have refused a frame.
- tcp (no test here): the read loop's ACK_BATCH check was dead (ACK_FRAMES <= ACK_BATCH, asserted now); the rule it
  keeps, acknowledgements every 32 frames, is pinned by test_mutation_audit3_transport's
  test_a_stream_of_more_flagged_writes_is_acknowledged_every_32_frames.
- feeder: min(prefetch + 1, L) staging buffers were allocated, but one loader stages one layer at a time: one now.
- feeder: close() joined a loader blocked in its source for up to 5 s; it waits only for a device copy running now.
"""

from __future__ import annotations

import threading
import time
import types

import numpy as np
import pytest

from dualpath_jax import traffic
from dualpath_jax.traffic import Link, Pacer, TrafficManager
from transport import inproc
from transport.base import PeerLostError, TransportClosedError
from transport.inproc import InProcFabric, InProcTransport


# ---- traffic: an exception while waiting for a slot -------------------------------------------------------
class _Clock:
    """A fake monotonic clock: sleeps and condition waits advance it (no wall-clock time in the test)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += max(0.0, s)


@pytest.fixture
def clock(monkeypatch):
    c = _Clock()
    monkeypatch.setattr(traffic, "time", types.SimpleNamespace(monotonic=c.monotonic, sleep=c.sleep))
    return c


def _fake_wait(clock: _Clock, link: Link, fail: list) -> None:
    """`link`'s condition wait advances the clock, or raises `fail[0]` while it is set."""

    def wait(timeout=None):
        if fail:
            raise fail[0]
        clock.sleep(timeout)
        return False

    link._cond.wait = wait


def _slow_link(name: str = "l") -> Link:
    return Link(name, 1000.0, {"low": 1.0}, quantum=1000, burst_s=0.0)  # 1 s per chunk, slot granted 0.5 s ahead


def _interrupted(gen, fail: list) -> None:
    """Take the first chunk of `gen`, then raise KeyboardInterrupt inside its wait for the second."""
    assert next(gen) == 1000
    fail.append(KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        next(gen)
    fail.clear()


def test_link_an_exception_while_waiting_for_a_slot_takes_the_chunk_back(clock):
    """The chunk whose slot the interrupted transfer waited for leaves the queue, its share is refunded, and the next
    transfer of the class gets the slot right after the chunk that moved (it was granted a slot behind a chunk nobody
    would move, and that chunk's bytes were recorded)."""
    link = _slow_link()
    fail: list = []
    _fake_wait(clock, link, fail)
    t0 = clock.now
    _interrupted(link.paced(5000, "low"), fail)
    assert not link._queues["low"]  # (was: the second chunk, still queued)
    starts = []
    for n in link.paced(1000, "low"):
        starts.append(clock.now)
        assert n == 1000
    assert starts == [pytest.approx(t0 + 1.0)]  # (was t0 + 2: behind the abandoned chunk)
    assert link.bytes_by_class["low"] == 2000  # the two chunks that moved (was 3000)


def test_pacer_an_exception_while_waiting_for_a_slot_takes_the_chunk_back(clock):
    """The same over a two-link path (joint tickets): no ticket of the interrupted chunk stays on either link."""
    links = [_slow_link("a"), _slow_link("b")]
    fail: list = []
    for link in links:
        _fake_wait(clock, link, fail)
    pacer = Pacer(links)
    _interrupted(pacer.paced(5000, "low"), fail)
    for link in links:
        assert not link._queues["low"], link.name
    assert sum(1 for _ in pacer.paced(1000, "low")) == 1
    for link in links:
        assert link.bytes_by_class["low"] == 2000, link.name


def test_link_check_raising_ends_the_wait_and_takes_the_chunks_back(clock):
    """`check` (what a transport passes to stop a paced transfer) ends a wait at once with its exception; the
    transfer's chunks are all taken back."""
    link = _slow_link()
    _fake_wait(clock, link, [])
    stop = []

    def check():
        if stop:
            raise RuntimeError("closed")

    gen = link.paced(5000, "low", check=check)
    assert next(gen) == 1000
    stop.append(1)
    with pytest.raises(RuntimeError, match="closed"):
        next(gen)
    assert not link._queues["low"] and link.bytes_by_class["low"] == 1000


def test_link_reserve_interrupted_leaves_no_ticket(clock):
    link = _slow_link()
    fail: list = []
    _fake_wait(clock, link, fail)
    link.reserve(1000, "low")
    fail.append(KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        link.reserve(1000, "low")
    assert not link._queues["low"] and link.bytes_by_class["low"] == 1000


# ---- inproc: close while a copy waits for its pacer ----------------------------------------------------------
N = 300_000  # three 100 kB chunks at 1 kB/s: after the first, the next slot is ~100 s away


@pytest.fixture
def paced_pair(monkeypatch):
    monkeypatch.setattr(inproc, "CLOSE_WAIT_S", 60.0)  # (so the old wait shows as "close does not return")
    tm = TrafficManager()
    link = tm.add_link("fix9/slow", 1000.0, {"high": 1.0, "low": 1.0}, quantum=100_000, burst_s=0.0)
    fabric = InProcFabric()
    a = InProcTransport("fix9-a", fabric=fabric, pacer=tm.pacer("fix9/slow"))
    b = InProcTransport("fix9-b", fabric=fabric)
    src = np.ones(N, np.uint8)
    dst = np.zeros(N, np.uint8)
    a.register("src", src)
    b.register("dst", dst)
    a.connect("fix9-b")
    yield a, b, link, dst
    a.close()
    b.close()


def _stuck_write(a, dst):
    fut = a.write("fix9-b", "src", 0, "dst", 0, N)
    deadline = time.monotonic() + 30
    while not dst[100_000 - 1] and time.monotonic() < deadline:  # the first chunk landed: now waiting for the pacer
        time.sleep(0.01)
    assert dst[100_000 - 1] == 1 and not fut.done()
    return fut


def _close_returns(ep, bound: float = 10.0) -> None:
    t = threading.Thread(target=ep.close, daemon=True)
    t.start()
    t.join(bound)  # (generous: it takes milliseconds; it took until the pacer's grant, ~50 s here)
    assert not t.is_alive(), "close waited for a blocked copy or source"


@pytest.mark.parametrize("closing", ["receiver", "writer"])
def test_inproc_close_ends_a_paced_wait(paced_pair, closing):
    a, b, link, dst = paced_pair
    fut = _stuck_write(a, dst)
    _close_returns(b if closing == "receiver" else a)
    err = fut.exception(timeout=10)
    assert isinstance(err, PeerLostError if closing == "receiver" else TransportClosedError), err
    assert not dst[100_000:].any()  # nothing moved after the close
    assert not link._queues["low"] and link.bytes_by_class["low"] == 100_000  # the unmoved chunks taken back


def test_inproc_disconnect_ends_a_paced_wait(paced_pair):
    a, b, link, dst = paced_pair
    fut = _stuck_write(a, dst)
    t = threading.Thread(target=b.disconnect, args=("fix9-a",), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive()
    assert isinstance(fut.exception(timeout=10), PeerLostError)


# ---- tcp: a write the receiver refuses (its region registered again smaller, or deregistered) ------------------
@pytest.fixture
def tcp_pair():
    from transport.tcp import TcpTransport

    a, b = TcpTransport("fix9-wa"), TcpTransport("fix9-wb")
    a.register("src", np.ones(1000, np.uint8))
    b.register("dst", np.zeros(1000, np.uint8))
    a.connect("fix9-wb", b.address)
    assert a.write("fix9-wb", "src", 0, "dst", 0, 10).result(10) == 10  # (the writer caches the region's size)
    yield a, b
    a.close()
    b.close()


@pytest.mark.parametrize("change", ["smaller", "deregistered"])
def test_tcp_a_refused_write_is_explained(tcp_pair, caplog, change):
    """The receiver closes the set (the documented contract, as rdma's). The protocol has no frame to send the reason
    in, so: the receiver's log names the region, offset and length (for a deregistered region it said only "unknown
    region id 1"), and the writer's PeerLostError says the peer may have refused a frame and where to look (it said
    only "peer ... closed the connection")."""
    a, b = tcp_pair
    b.deregister("dst")
    if change == "smaller":
        b.register("dst", np.zeros(100, np.uint8))
    with caplog.at_level("ERROR", logger="transport.tcp"):
        err = a.write("fix9-wb", "src", 0, "dst", 500, 10).exception(10)
        deadline = time.monotonic() + 10
        while "closing connection set" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
    assert isinstance(err, PeerLostError) and "refuses a frame" in str(err), err
    assert "[500, 510)" in caplog.text and "region 'dst'" in caplog.text, caplog.text


# ---- feeder: staging buffers, close while the source is blocked ------------------------------------------------
def test_feeder_allocates_one_staging_buffer(monkeypatch):
    """The loader stages one layer at a time (one thread; the sink copies it out before the next source runs), but
    min(prefetch + 1, L) buffers were allocated: prefetch of them never used. One is allocated now, whatever the
    prefetch, and every layer still arrives intact with the loader running ahead."""
    from transport import feeder as feeder_mod

    made = []
    real = feeder_mod.aligned_empty

    def counting(nbytes, *a, **kw):
        made.append(nbytes)
        return real(nbytes, *a, **kw)

    monkeypatch.setattr(feeder_mod, "aligned_empty", counting)

    def source(layer, out):
        out[:] = layer
        return out

    with feeder_mod.LayerFeeder(8, source, 64, prefetch=3, to_device=lambda h: np.array(h, copy=True)) as feed:
        feed.start_load()
        got = [feed.wait_for_layer(layer) for layer in range(2)]  # (the loader ran up to 3 layers ahead meanwhile)
        got += [feed.wait_for_layer(layer) for layer in range(2, 8)]
        assert [int(x[0]) for x in got] == list(range(8)) and all((x == i).all() for i, x in enumerate(got))
    assert made == [64]  # (was [64, 64, 64, 64])


def test_feeder_close_does_not_wait_for_a_blocked_source():
    """close() joined a loader blocked in its source for up to 5 s. It returns at once now; the layer the source
    returns later is dropped (no device copy after close) and the loader then ends."""
    from test_traffic_hunt7 import gated_feeder

    from transport.feeder import LayerLoadError

    feed, gate, entered, sunk = gated_feeder("fix9-close", 30)
    feed.start_load()
    assert entered.wait(10)
    try:
        _close_returns(feed, 3.0)  # (milliseconds; was 5 s, the loader join's timeout)
        with pytest.raises(LayerLoadError, match="closed"):
            feed.wait_for_layer(0)
    finally:
        gate.set()
    feed._loader.join(10)
    assert not feed._loader.is_alive() and sunk == []


def test_feeder_close_waits_for_a_running_device_copy():
    """A device copy that started before close() is waited for: no device copy of this feed runs once close returned
    (only a copy not started yet is skipped)."""
    from transport.feeder import LayerFeeder

    gate, entered, finished = threading.Event(), threading.Event(), threading.Event()

    def to_device(host):
        entered.set()
        gate.wait(30)
        finished.set()
        return host.copy()

    feed = LayerFeeder(2, lambda layer, out: out, 4, to_device=to_device, name="fix9-sink")
    feed.start_load()
    assert entered.wait(10)
    closer = threading.Thread(target=feed.close, daemon=True)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()  # waiting for the copy
    gate.set()
    closer.join(10)
    assert not closer.is_alive() and finished.is_set()
