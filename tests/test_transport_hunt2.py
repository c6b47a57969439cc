"""Transport and layer-feeder defects found by the second transport hunt; each test failed on the commit before.

- tcp: a peer that registered a region name again (deregister, then register a new buffer under the same name)
  got a new region id, while its peers cached the old one: their next write by name was a "WRITE frame for
  unknown region id" that closed the whole connection set. A name now keeps its id, and a range outside the
  cached size asks the peer again (the new buffer may be larger).
- tcp: a transfer posted from the high connection's reader thread (a done callback of a high-class transfer, an
  `on_message` hook) to a region not asked about yet sent the region query on that connection and waited for the
  reply, which only that blocked thread could read: the watchdog then dropped the peer (every transfer failed). It
  now asks on a connection that thread does not read, and of two reader threads asking at once one gets an error
  (they would wait for each other).
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
    region not asked about yet, at the same moment: neither waits for the other (one may get a TransportError
    that says to ask `remote_region` first), what was posted lands, and the peer stays."""
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
            if isinstance(f, BaseException):
                assert "remote_region" in str(f), f
            else:
                assert f.result(5) == 64
                np.testing.assert_array_equal(bufs[region], np.arange(64, dtype=np.uint8))
                landed += 1
        assert landed >= 1 and a.peers() == ["b"]
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
