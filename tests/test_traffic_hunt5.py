"""Defects found by the sixth traffic-manager hunt (2026-12-04, third pass): each test failed before its fix."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import numpy as np
import pytest

from dualpath_jax.host_buffers import HostBufferPool
from dualpath_jax.traffic import Link, Pacer
from transport.feeder import LayerFeeder, LayerForwarder, LayerLoadError, TransportLayerSource, layer_tag
from transport.inproc import InProcFabric, InProcTransport


class _WriteFailsLater:
    """A DE transport whose data write of the layers in `bad` fails 0.1 s after the call returned (a lost write)."""

    def __init__(self, transport, bad):
        self.transport, self.bad = transport, bad

    def __getattr__(self, name):
        return getattr(self.transport, name)

    def write(self, peer, local_region, local_offset, remote_region, remote_offset, nbytes, **kw):
        if nbytes and kw.get("notify") in self.bad:
            fut: Future = Future()
            threading.Timer(0.1, lambda: fut.set_exception(ConnectionError("write lost"))).start()
            return fut
        return self.transport.write(peer, local_region, local_offset, remote_region, remote_offset, nbytes, **kw)


@pytest.mark.parametrize(("layers", "prefetch", "bad"), [(2, 1, 0), (4, 0, 1)])
def test_a_forwarder_write_that_fails_later_signals_its_layer_at_once(layers, prefetch, bad):
    # A write whose future failed after the call returned sent no failure signal for its layer (the signal went to the
    # layer being read when the failure was seen): the PE waited out its whole timeout instead of a prompt miss.
    fabric = InProcFabric()
    de, pe = InProcTransport("de-late", fabric=fabric), InProcTransport("pe-late", fabric=fabric)
    feeder = None
    try:
        de.register("ring", np.zeros(4 * layers, np.uint8))
        pe.register("kv", np.zeros(4 * layers, np.uint8))
        de.connect(pe.name, pe.address)
        forwarder = LayerForwarder(
            _WriteFailsLater(de, {bad}), pe.name, lambda layer, out: np.full(4, layer + 1, np.uint8), layers, 4,
            "ring", 0, "kv", lambda layer: 4 * layer, lambda layer: layer, prefetch=prefetch,
        )  # fmt: skip
        source = TransportLayerSource(pe, "kv", lambda layer: 4 * layer, 4, lambda layer: layer, timeout_s=2)
        feeder = LayerFeeder(layers, source, 4, to_device=lambda host: host.copy(), timeout_s=2)
        forwarder.start()
        for layer in range(bad):
            assert (feeder.wait_for_layer(layer) == layer + 1).all()
        with pytest.raises(LayerLoadError, match="KVMissError"):  # the sender's signal, not the PE's timeout
            feeder.wait_for_layer(bad)
        with pytest.raises(ConnectionError):
            forwarder.done.result(5)
    finally:
        if feeder is not None:
            feeder.close()
        de.close()
        pe.close()


def test_a_closed_feeder_returns_no_layer():
    # After close() a layer loaded before it was still returned by wait_for_layer (and its device array held), while
    # the layers not loaded yet failed "feeder closed": now every layer fails alike, naming the closed feeder.
    feeder = LayerFeeder(3, lambda layer, out: np.full(4, layer, np.uint8), 4, prefetch=2,
                         to_device=lambda host: host.copy(), name="pe-closed")  # fmt: skip
    assert (feeder.wait_for_layer(0) == 0).all()
    feeder._results[1].result(5)  # layer 1 is loaded too (prefetch)
    feeder.close()
    for layer in (0, 1, 2):
        with pytest.raises(LayerLoadError, match="pe-closed: feeder closed"):
            feeder.wait_for_layer(layer)
    assert all(f.exception() is not None for f in feeder._results), "no loaded layer is held after close"


def test_a_layer_tag_refuses_non_integers():
    # layer_tag(5, 1.7) truncated to layer 1's tag (a tag of another layer: its notification was taken for it).
    assert layer_tag(np.int64(5), np.int32(1)) == layer_tag(5, 1) == (5 << 12) | 1
    for bad in ((5, 1.7), (5, True), (2.5, 1), (5, "1")):
        with pytest.raises(TypeError, match="must be an int"):
            layer_tag(*bad)


def test_a_feeder_timeout_is_checked_as_the_transports_check_theirs():
    # timeout_s=True was taken as a 1 s timeout and "5" failed on `>=` without a name; the transports' `_deadline`
    # refuses both by name (the feeder now uses it for its waits too).
    for bad in (True, "5"):
        with pytest.raises(TypeError, match="timeout_s: timeout must be a number"):
            LayerFeeder(2, lambda layer, out: out, 4, timeout_s=bad)
    feeder = LayerFeeder(1, lambda layer, out: np.zeros(4, np.uint8), 4, to_device=lambda host: host.copy(),
                         saver=lambda layer, host: None)  # fmt: skip
    try:
        with pytest.raises(TypeError, match="timeout must be a number"):
            feeder.wait_for_save(timeout=True)
        feeder.save_layer(0, np.zeros(4, np.uint8))
        feeder.wait_for_save(timeout=1e300)
        assert (feeder.wait_for_layer(0) == 0).all()
    finally:
        feeder.close()


def test_pacing_a_non_integer_byte_count_is_refused():
    # link.acquire(2.5) paced and recorded 2 bytes, 0.9 none and "7" seven (int() of it), while `record` refuses them:
    # bytes moved and bytes recorded parted. A Pacer over two links did the same.
    link = Link("snic/hunt5", 1e9, {"low": 1.0})
    path = Pacer([link, Link("cnic/hunt5", 1e9)])
    for bad in (2.5, 0.9, True, "7"):
        with pytest.raises(ValueError, match="a whole number"):
            link.acquire(bad)
        with pytest.raises(ValueError, match="a whole number"):
            path.pace(bad)
    link.acquire(np.int64(3))
    path.pace(np.int32(2))
    assert link.total_bytes == 5


def test_a_host_buffer_timeout_that_is_no_number_is_refused():
    # acquire(timeout=True) waited 1 s and failed "within True s"; timeout="1" failed on `>=` naming nothing.
    pool = HostBufferPool(4096, num_slots=1, name="hb5")
    held = pool.acquire(nslots=1)
    for bad in (True, "1"):
        with pytest.raises(TypeError, match="'hb5': timeout must be a number"):
            pool.acquire(nslots=1, timeout=bad)
    assert pool.stats().timeouts == 0 and pool.stats().waits == 0
    held.release()
    pool.acquire(nslots=1, timeout=np.float64(0.5)).release()
