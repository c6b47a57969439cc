"""Defects found by the fourth traffic-manager hunt (2026-12-03): each test failed before its fix."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from dualpath_jax.traffic import Link, Pacer
from transport.feeder import LayerFeeder, LayerForwarder, LayerLoadError
from transport.inproc import InProcFabric, InProcTransport


def test_a_link_fills_the_gap_before_a_held_slot():
    # A multi-link Pacer's chunk is held on its fast link at the slow link's (later) slot; a chunk of another flow too
    # long for the gap before it went after it, leaving the gap idle (F at 8 MB/s beside a 1 MB/s path's flow carried
    # 6.3 MB/s with both backlogged: not work-conserving). Now it is cut to fill the gap; the rest goes as one more.
    origin = time.monotonic()
    fast = Link("fast", 1e6, {"low": 1.0}, quantum=1_000_000, burst_s=0, clock_origin=origin)
    slow = Link("slow", 20e3, {"low": 1.0}, burst_s=0, clock_origin=origin)  # 16 KiB chunks: 0.8 s each
    slow.reserve(slow.quantum, "low")  # the slow link is booked for 0.8 s
    joint = threading.Thread(target=Pacer([fast, slow]).pace, args=(1000,))
    joint.start()  # its chunk is held on the fast link from ~0.8 s (booked once the slow link gives it its turn)
    deadline = time.monotonic() + 10
    while slow.total_bytes < slow.quantum + 1000 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert slow.total_bytes == slow.quantum + 1000
    chunks = fast.paced(1_000_000)
    first = next(chunks)  # the gap before the held slot is ~0.4 s: 0.4 MB at 1 MB/s
    chunks.close()
    joint.join()
    assert 0 < first < 1_000_000
    assert fast.total_bytes == first + 1000  # (the rest, queued again, was taken back with the transfer)


def test_waiting_for_a_float_layer_is_refused_before_it_releases_layers():
    # wait_for_layer(1.0) released layer 0 (the consumer "moved past" it), then failed on the list index with an
    # unclear TypeError: layer 0 was gone although the call did nothing.
    feeder = LayerFeeder(3, lambda layer, out: out, 8, to_device=lambda host: host.copy())
    try:
        feeder.wait_for_layer(0)
        with pytest.raises(TypeError):
            feeder.wait_for_layer(1.0)
        assert feeder.wait_for_layer(0).nbytes == 8  # still held (it raised LayerLoadError: released)
    finally:
        feeder.close()


def test_a_saved_bytearray_is_the_bytes_it_held_at_save_layer():
    # save_layer copied a numpy array at once, but a bytearray or memoryview went to the saver as is: the caller reusing
    # its buffer before the background save ran saved whatever it held by then (the next layer's KV).
    gate, got = threading.Event(), {}

    def saver(layer, host):
        gate.wait(5)
        got[layer] = bytes(np.asarray(host).reshape(-1).view(np.uint8))

    feeder = LayerFeeder(3, lambda layer, out: out, 4, saver=saver, to_device=lambda host: host.copy())
    try:
        feeder.save_layer(0, np.zeros(4, np.uint8))  # the saver waits: the next saves stay queued
        buf = bytearray(b"\x01" * 4)
        feeder.save_layer(1, buf)
        view_of = bytearray(b"\x02" * 4)
        feeder.save_layer(2, memoryview(view_of))
        buf[:] = view_of[:] = b"\x09" * 4  # the caller reuses its buffers
        gate.set()
        feeder.wait_for_save()
    finally:
        feeder.close()
    assert got == {0: b"\x00" * 4, 1: b"\x01" * 4, 2: b"\x02" * 4}


def test_a_forwarder_refuses_a_layer_of_the_wrong_size():
    # A source giving 1 byte for a 4-byte layer: `out[:] = host` broadcast it over the whole layer, and the PE got
    # [7, 7, 7, 7] as that layer's KV (the forwarder "never forwards a failed read as bytes").
    fabric = InProcFabric()
    de, pe = InProcTransport("de-size", fabric=fabric), InProcTransport("pe-size", fabric=fabric)
    try:
        de.register("ring", np.zeros(8, np.uint8))
        pe.register("kv", np.zeros(8, np.uint8))
        de.connect(pe.name, pe.address)
        forwarder = LayerForwarder(
            de, "pe-size", lambda layer, out: np.array([7], np.uint8), 2, 4, "ring", 0, "kv", lambda layer: 4 * layer,
            lambda layer: layer,
        )  # fmt: skip
        with pytest.raises(LayerLoadError, match="source gave 1 bytes for layer 0, expected 4"):
            forwarder.start().result(10)
        assert not pe.region("kv").obj.any(), "no bytes of a wrong-size layer were forwarded"
    finally:
        de.close()
        pe.close()
