"""Transport and layer-feeder defects found by the second transport hunt; each test failed on the commit before.

- tcp: a peer that registered a region name again (deregister, then register a new buffer under the same name)
  got a new region id, while its peers cached the old one: their next write by name was a "WRITE frame for
  unknown region id" that closed the whole connection set. A name now keeps its id, and a range outside the
  cached size asks the peer again (the new buffer may be larger).
- tcp: a transfer posted from the high connection's reader thread (a done callback of a high-class transfer, an
  `on_message` hook) to a region not asked about yet sent the region query on that connection and waited for the
  reply, which only that blocked thread could read: the watchdog then dropped the peer (every transfer failed). It
  now asks on a connection that thread does not read. Of two reader threads asking at once one got an error (they
  would wait for each other), until the third pass: a reader thread no longer waits for a region reply at all, the
  transfer is posted when the reply comes (and later posts of its class wait behind it).
- feeder: `load_times[l]` was recorded after layer l's future completed, so a consumer that had just got the
  layer could read NaN for it; `save_layer` of a host (numpy) array copied it only when the background save ran,
  so a caller reusing the array saved the later bytes (every layer saved as the last one); `LayerForwarder` asked
  for `prefetch + 1` layers of DE region even when the request had fewer layers (a RegionError for a region that
  holds every slot it uses).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time

import numpy as np
import pytest
from test_transport_conformance import make_pair

from transport.base import PeerLostError, RegionError
from transport.feeder import LayerFeeder, LayerForwarder, TransportLayerSource, layer_tag
from transport.inproc import InProcFabric, InProcTransport
from transport.tcp import TcpTransport


@pytest.fixture(params=["inproc", "tcp"])
def pair(request):
    a, b = make_pair(request.param)
    yield a, b
    a.close()
    b.close()


def test_a_region_registered_again_under_its_name_takes_writes_and_reads(pair):
    """Write, deregister and register a larger buffer under the same name on the peer: writes (inside and past the
    old size), write_many and reads by name reach the new buffer, and the connection set stays up."""
    a, b = pair
    src = np.arange(256, dtype=np.uint8)
    back = np.zeros(128, np.uint8)
    a.register("src", src)
    a.register("back", back)
    b.register("kv", np.zeros(64, np.uint8))
    assert a.write(b.name, "src", 0, "kv", 0, 64).result(5) == 64
    b.deregister("kv")
    b.register("other", np.zeros(8, np.uint8))  # takes the next fresh id
    new = np.zeros(128, np.uint8)
    b.register("kv", new)
    assert a.write(b.name, "src", 0, "kv", 0, 64).result(5) == 64
    assert a.write(b.name, "src", 100, "kv", 64, 64).result(5) == 64  # past the old 64 bytes
    np.testing.assert_array_equal(new, np.r_[src[:64], src[100:164]])
    assert a.write_many(b.name, [("src", 1, 128, "kv", 0)]).result(5) == 128
    np.testing.assert_array_equal(new, src[1:129])
    assert a.read(b.name, "back", 0, "kv", 0, 128).result(5) == 128
    np.testing.assert_array_equal(back, src[1:129])
    assert b.name in a.peers() and a.name in b.peers()


@pytest.mark.parametrize("hook", ["done_callback", "on_message"])
def test_tcp_transfer_posted_from_the_high_reader_thread_to_a_new_region(hook):
    """A write to a region of the peer not used before, posted from a high-class transfer's done callback or from
    the `on_message` hook (both run on the high connection's reader thread), lands and the peer stays."""
    a, b = TcpTransport("a", timeout_s=2), TcpTransport("b", timeout_s=2)
    try:
        a.register("src", np.arange(64, dtype=np.uint8))
        first, later = np.zeros(64, np.uint8), np.zeros(64, np.uint8)
        b.register("first", first)
        b.register("later", later)
        a.connect("b", b.address)
        posted: list = []

        def post(*_: object) -> bool:
            try:
                posted.append(a.write("b", "src", 0, "later", 0, 64, priority="high"))
            except Exception as e:  # noqa: BLE001 - asserted below
                posted.append(e)
            return True

        if hook == "done_callback":
            a.write("b", "src", 0, "first", 0, 64, priority="high").add_done_callback(post)
        else:
            a.on_message = post
            b.wait_for_peer("a")
            b.send("a", b"go").result(5)
        deadline = time.monotonic() + 10
        while not posted and time.monotonic() < deadline:
            time.sleep(0.01)
        assert posted and not isinstance(posted[0], BaseException), posted
        assert posted[0].result(5) == 64
        np.testing.assert_array_equal(later, np.arange(64, dtype=np.uint8))
        assert a.peers() == ["b"]
    finally:
        a.close()
        b.close()


def test_tcp_two_reader_threads_asking_for_new_regions_at_once_do_not_hang():
    """The high reader (an `on_message` hook) and the low reader (a low-class read's done callback) both post to a
    region not asked about yet, at the same moment: neither waits for the other, both writes land (no error: the
    second pass still let one of them fail with a TransportError), and the peer stays."""
    a, b = TcpTransport("a", timeout_s=2), TcpTransport("b", timeout_s=2)
    try:
        a.register("src", np.arange(64, dtype=np.uint8))
        a.register("dst", np.zeros(64, np.uint8))
        bufs = {r: np.zeros(64, np.uint8) for r in ("first", "hi", "lo")}
        for r, buf in bufs.items():
            b.register(r, buf)
        a.connect("b", b.address)
        a.remote_region("b", "first")
        barrier = threading.Barrier(2, timeout=5)
        posted: dict[str, object] = {}

        def post(region: str, priority: str) -> None:
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait()
            try:
                posted[region] = a.write("b", "src", 0, region, 0, 64, priority=priority)
            except Exception as e:  # noqa: BLE001 - asserted below
                posted[region] = e

        a.on_message = lambda *_: post("hi", "high") or True
        b.wait_for_peer("a")
        b.send("a", b"go").result(5)
        a.read("b", "dst", 0, "first", 0, 64).add_done_callback(lambda _: post("lo", "low"))
        deadline = time.monotonic() + 10
        while len(posted) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(posted) == ["hi", "lo"], posted
        landed = 0
        for region, f in posted.items():
            assert not isinstance(f, BaseException), posted
            assert f.result(5) == 64
            np.testing.assert_array_equal(bufs[region], np.arange(64, dtype=np.uint8))
            landed += 1
        assert landed == 2 and a.peers() == ["b"]
    finally:
        a.close()
        b.close()


def test_feeder_load_time_is_recorded_when_the_layer_is_ready():
    """What the consumer sees the moment a layer completes (a done callback) has that layer's load time."""
    n = 4
    f = LayerFeeder(n, lambda layer, out: out, 16, prefetch=1, to_device=lambda h: np.array(h, copy=True))
    seen = []
    for i, fut in enumerate(f._results):
        fut.add_done_callback(lambda _, i=i: seen.append(f.load_times[i]))
    try:
        for layer in range(n):
            f.wait_for_layer(layer)
    finally:
        f.close()
    assert len(seen) == n
    assert all(not math.isnan(t0) and not math.isnan(t1) and t1 >= t0 for t0, t1 in seen), seen


def test_feeder_saves_the_bytes_a_host_array_held_at_save_layer():
    """A host array given to `save_layer` and then overwritten by the caller (one buffer reused per layer) is
    saved as it was at the call, for every layer."""
    gate = threading.Event()
    saved: dict[int, np.ndarray] = {}

    def saver(layer: int, host: np.ndarray) -> None:
        gate.wait(5)  # the first save runs only after the caller moved on
        saved[layer] = host.copy()

    f = LayerFeeder(3, lambda layer, out: out, 8, saver=saver, to_device=lambda h: np.array(h, copy=True))
    buf = np.zeros(8, np.uint8)
    try:
        for layer in range(3):
            buf[:] = layer + 1
            f.save_layer(layer, buf)
        buf[:] = 99
        gate.set()
        f.wait_for_save(timeout=5)
    finally:
        f.close()
    assert {k: v.tolist() for k, v in saved.items()} == {k: [k + 1] * 8 for k in range(3)}


def test_forwarder_ring_for_fewer_layers_than_prefetch_slots():
    """A forwarder of 2 layers with prefetch 3 uses 2 ring slots: a DE region of 2 layers is enough (it asked for
    4 layers of region and refused), and the PE gets both layers."""
    fabric = InProcFabric()
    de, pe = InProcTransport("de", fabric=fabric), InProcTransport("pe", fabric=fabric)
    try:
        de.connect("pe")
        pe.connect("de")
        n, nb = 2, 64
        de.register("ring", np.zeros(n * nb, np.uint8))
        pe.register("kv", np.zeros(n * nb, np.uint8))
        fw = LayerForwarder(
            de,
            "pe",
            lambda layer, out: np.full(nb, layer + 1, np.uint8),
            n,
            nb,
            "ring",
            0,
            "kv",
            lambda layer: layer * nb,
            lambda layer: layer_tag(7, layer),
            prefetch=3,
        )
        assert fw.start().result(5) == n
        src = TransportLayerSource(
            pe, "kv", lambda layer: layer * nb, nb, lambda layer: layer_tag(7, layer), timeout_s=5
        )
        with LayerFeeder(n, src, nb, to_device=lambda h: np.array(h, copy=True)) as f:
            assert [int(f.wait_for_layer(layer)[0]) for layer in range(n)] == [1, 2]
    finally:
        de.close()
        pe.close()


# ---- third pass: a transfer posted from a reader thread to a region not known yet is deferred, never waited for


def _tcp_ab(timeout_s: float = 5.0, hold: threading.Event | None = None):
    """Connected tcp endpoints a, b; with `hold`, b's `on_message` hook keeps b's high reader thread busy on a
    b"hold" message until `hold` is set (so a region query on a's high connection is not answered meanwhile)."""
    a, b = TcpTransport("a", timeout_s=timeout_s), TcpTransport("b", timeout_s=timeout_s)
    if hold is not None:
        b.on_message = lambda _peer, payload: payload == b"hold" and (hold.wait(10) or True)
    a.connect("b", b.address)
    b.wait_for_peer("a")
    return a, b


def _from_low_reader(a: TcpTransport, post) -> None:
    """Run `post()` once, on a's low reader thread: the done callback of a low-class write to the known region "k"
    (a write already acknowledged when its callback is added runs it on this thread: then try again)."""
    once = threading.Lock()

    def run(_: object) -> None:
        if threading.current_thread().name.endswith("-low-rx") and once.acquire(blocking=False):
            post()

    for _ in range(200):
        a.write("b", "src", 0, "k", 0, 8).add_done_callback(run)
        time.sleep(0.01)
        if once.locked():
            return
    raise AssertionError("no done callback ran on the low reader thread")


def test_tcp_two_reader_threads_waiting_for_region_replies_at_once():
    """a's low reader posts to a new region while b's reply cannot come yet (b's high reader is busy), then a's
    high reader (its `on_message` hook) posts to another new region: neither call waits for a reply or fails
    (it got a TransportError "another reader thread is asking for a region"); both land once b answers."""
    hold = threading.Event()
    a, b = _tcp_ab(hold=hold)
    try:
        a.register("src", np.arange(64, dtype=np.uint8))
        bufs = {r: np.zeros(64, np.uint8) for r in ("k", "n1", "n2")}
        for r, buf in bufs.items():
            b.register(r, buf)
        a.remote_region("b", "k")
        a.send("b", b"hold").result(5)
        posted: dict[str, object] = {}
        entered = threading.Event()

        def post(region: str, priority: str) -> None:
            entered.set()
            try:
                posted[region] = a.write("b", "src", 0, region, 0, 64, priority=priority)
            except Exception as e:  # noqa: BLE001 - asserted below
                posted[region] = e

        _from_low_reader(a, lambda: post("n1", "low"))
        assert entered.wait(5)
        time.sleep(0.2)  # (on the old code the low reader is now waiting for its reply: the order of the posts)
        a.on_message = lambda *_: post("n2", "high") or True
        b.send("a", b"go").result(5)
        deadline = time.monotonic() + 5
        while len(posted) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        hold.set()
        assert sorted(posted) == ["n1", "n2"], posted
        assert all(not isinstance(f, BaseException) for f in posted.values()), posted
        assert [posted[r].result(5) for r in ("n1", "n2")] == [64, 64]
        for r in ("n1", "n2"):
            np.testing.assert_array_equal(bufs[r], np.arange(64, dtype=np.uint8))
        assert a.peers() == ["b"]
    finally:
        hold.set()
        a.close()
        b.close()


def test_tcp_reader_threads_post_chains_of_transfers_to_new_regions():
    """Four reader threads (the high and low connections to two peers) each post a chain of transfers from done
    callbacks, every step to a region of the peer not known yet (write, write_many, read; the chains of one
    peer share regions, so queries are in flight for several of them at once): every chain completes, with
    no error and the right bytes, and the peers stay connected."""
    n_regions = 12
    a = TcpTransport("a", timeout_s=5)
    peers = [TcpTransport(name, timeout_s=5) for name in ("b", "c")]
    try:
        src = np.arange(256, dtype=np.uint8)
        a.register("src", src)
        back = {(q.name, pr): np.zeros(64, np.uint8) for q in peers for pr in ("high", "low")}
        for (peer, pr), buf in back.items():
            a.register(f"back-{peer}-{pr}", buf)
        dst = {}
        for q in peers:
            q.register("first", np.zeros(8, np.uint8))
            for i in range(n_regions):
                dst[q.name, i] = np.zeros(128, np.uint8)
                q.register(f"r{i}", dst[q.name, i])
            a.connect(q.name, q.address)
            a.remote_region(q.name, "first")
        results: dict[tuple[str, str], list] = {key: [] for key in back}
        finished = threading.Semaphore(0)

        def step(peer: str, pr: str, k: int) -> None:
            region = f"r{k}"
            off = 0 if pr == "high" else 64  # the two chains of a peer write different halves
            try:
                if k % 3 == 0:
                    f = a.write(peer, "src", k, region, off, 64, priority=pr)
                elif k % 3 == 1:
                    f = a.write_many(peer, [("src", k, 32, region, off), ("src", k + 32, 32, region, off + 32)], pr)
                else:
                    f = a.write(peer, "src", k, region, off, 64, priority=pr)
                    f = a.read(peer, f"back-{peer}-{pr}", 0, region, off, 64, priority=pr)
            except Exception as e:  # noqa: BLE001 - asserted below
                results[peer, pr].append(e)
                finished.release()
                return

            def done(fut: object) -> None:
                results[peer, pr].append(fut.exception() or fut.result())
                if k + 1 < n_regions:
                    step(peer, pr, k + 1)
                else:
                    finished.release()

            f.add_done_callback(done)

        for peer, pr in back:
            a.write(peer, "src", 0, "first", 0, 8, priority=pr).add_done_callback(lambda _, p=peer, c=pr: step(p, c, 0))
        for _ in back:
            assert finished.acquire(timeout=20), results
        assert results == {key: [64] * n_regions for key in back}, results
        for (peer, i), buf in dst.items():
            np.testing.assert_array_equal(buf, np.r_[src[i : i + 64], src[i : i + 64]], err_msg=f"{peer} r{i}")
        assert a.peers() == ["b", "c"]
    finally:
        a.close()
        for q in peers:
            q.close()


def test_tcp_deferred_transfer_keeps_its_place_in_the_class_order():
    """From a reader thread: a write with notification to a region not known yet (deferred until b answers),
    then one to a known region and one to the same new bytes, same class: b gets the notifications in posting
    order and the new region holds the last write's bytes (a later post does not overtake a deferred one)."""
    hold = threading.Event()
    a, b = _tcp_ab(hold=hold)
    try:
        a.register("src", np.arange(128, dtype=np.uint8))
        new = np.zeros(64, np.uint8)
        b.register("k", np.zeros(64, np.uint8))
        b.register("new", new)
        a.remote_region("b", "k")
        a.send("b", b"hold").result(5)
        posted: list = []

        def post() -> None:
            posted.append(a.write("b", "src", 0, "new", 0, 64, notify=1))
            posted.append(a.write("b", "src", 0, "k", 0, 64, notify=2))
            posted.append(a.write("b", "src", 64, "new", 0, 64, notify=3))

        _from_low_reader(a, post)
        deadline = time.monotonic() + 5
        while len(posted) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        hold.set()
        assert len(posted) == 3 and [f.result(5) for f in posted] == [64] * 3
        assert [b.completions.get(timeout=5).tag for _ in range(3)] == [1, 2, 3]
        np.testing.assert_array_equal(new, np.arange(64, 128, dtype=np.uint8))
    finally:
        hold.set()
        a.close()
        b.close()


def test_tcp_deferred_write_to_a_region_the_peer_lacks_fails_its_future():
    """From a reader thread, a write and a write_many to a region b never registered: the calls return futures
    that fail with RegionError (the thread does not wait for b's answer); a write posted after them lands and the
    peer stays connected."""
    a, b = _tcp_ab()
    try:
        a.register("src", np.arange(64, dtype=np.uint8))
        b.register("k", np.zeros(64, np.uint8))
        later = np.zeros(64, np.uint8)
        b.register("later", later)
        a.remote_region("b", "k")
        posted: list = []

        def post() -> None:
            for call in (
                lambda: a.write("b", "src", 0, "nope", 0, 8),
                lambda: a.write_many("b", [("src", 0, 8, "k", 0), ("src", 0, 8, "nope", 0)]),
                lambda: a.write("b", "src", 0, "later", 0, 64),
            ):
                try:
                    posted.append(call())
                except Exception as e:  # noqa: BLE001 - asserted below
                    posted.append(e)

        _from_low_reader(a, post)
        deadline = time.monotonic() + 5
        while len(posted) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(posted) == 3 and all(not isinstance(f, BaseException) for f in posted), posted
        for f, entry in zip(posted[:2], ("", "write_many entry 1: "), strict=True):
            with pytest.raises(RegionError, match=f"^{entry}peer 'b' has no region 'nope'"):
                f.result(5)
        assert posted[2].result(5) == 64
        np.testing.assert_array_equal(later, np.arange(64, dtype=np.uint8))
        assert a.peers() == ["b"]
    finally:
        a.close()
        b.close()


def test_tcp_deferred_transfer_fails_when_the_peer_is_lost():
    """From a reader thread, a write and a read to regions of b not known yet while b cannot answer; b then goes
    away: both futures fail with PeerLostError (nothing waits forever), and so does a write queued behind them."""
    hold = threading.Event()
    a, b = _tcp_ab(hold=hold)
    closer = threading.Thread(target=b.close)
    try:
        a.register("src", np.arange(64, dtype=np.uint8))
        a.register("dst", np.zeros(64, np.uint8))
        for r in ("k", "n1", "n2"):
            b.register(r, np.zeros(64, np.uint8))
        a.remote_region("b", "k")
        a.send("b", b"hold").result(5)
        posted: list = []

        def post() -> None:
            try:
                posted.append(a.write("b", "src", 0, "n1", 0, 64))
                posted.append(a.read("b", "dst", 0, "n2", 0, 64))
                posted.append(a.write("b", "src", 0, "k", 0, 64))
            except Exception as e:  # noqa: BLE001 - asserted below
                posted.append(e)

        _from_low_reader(a, post)
        deadline = time.monotonic() + 5
        while len(posted) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(posted) == 3 and all(not isinstance(f, BaseException) for f in posted), posted
        closer.start()  # b's set goes down (its reader is still held: close cuts it after its grace time)
        for f in posted:
            with pytest.raises(PeerLostError):
                f.result(10)
    finally:
        hold.set()
        if closer.ident is not None:
            closer.join(10)
        else:
            b.close()
        a.close()


def test_tcp_deferred_write_past_the_cached_size_asks_again():
    """b registers "kv" again, larger, after a cached its size; from a reader thread, a write past the old size
    asks again without waiting and lands, and one past the new size fails its future with RegionError."""
    a, b = _tcp_ab()
    try:
        a.register("src", np.arange(256, dtype=np.uint8))
        b.register("k", np.zeros(64, np.uint8))
        b.register("kv", np.zeros(64, np.uint8))
        a.remote_region("b", "k")
        a.remote_region("b", "kv")
        b.deregister("kv")
        new = np.zeros(128, np.uint8)
        b.register("kv", new)
        posted: list = []

        def post() -> None:
            for lo, ro, n in ((0, 64, 64), (0, 100, 100)):
                try:
                    posted.append(a.write("b", "src", lo, "kv", ro, n))
                except Exception as e:  # noqa: BLE001 - asserted below
                    posted.append(e)

        _from_low_reader(a, post)
        deadline = time.monotonic() + 5
        while len(posted) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(posted) == 2 and all(not isinstance(f, BaseException) for f in posted), posted
        assert posted[0].result(5) == 64
        with pytest.raises(RegionError, match=r"\[100, 200\) is outside the region of 128 bytes"):
            posted[1].result(5)
        np.testing.assert_array_equal(new[64:], np.arange(64, dtype=np.uint8))
        assert a.peers() == ["b"]
    finally:
        a.close()
        b.close()
