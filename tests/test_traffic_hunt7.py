"""Defects found by the seventh traffic-manager / layer-feeder hunt (2026-12-04): each test failed before its fix."""

from __future__ import annotations

import math
import threading
import time
import tracemalloc

import pytest

from dualpath_jax.traffic import Link, Pacer
from transport.feeder import LayerFeeder, LayerLoadError


def test_a_dropped_joint_chunk_whose_turn_came_refunds_its_class_share():
    # A multi-link path's chunk gets its turn on each link (`ready`), then waits for the others before its slot is
    # booked. Dropped in between (its transfer timed out on a busier link), it kept its class charged on the links that
    # had given it its turn: the class then waited a whole chunk behind the other for bytes that never moved.
    link = Link("cnic/hunt7", 1e6, {"high": 1.0, "low": 1.0}, quantum=1_000_000, burst_s=0)  # horizon 0.5 s
    j = link.enqueue(1_000_000, "low", joint=True)
    assert j.ready and j.slot is None, "premise: its turn came, no slot booked"
    link.reserve(1_000_000, "high")  # the link is booked 1 s: nothing below is granted before +0.5 s
    link.cancel(j)
    link.cancel(j)  # (twice: refunded once)
    high = link.enqueue(1_000_000, "high")
    low = link.enqueue(1_000_000, "low")
    try:
        assert high.slot is None and low.slot is None, "premise: both queued behind the booked second"
        slot_low = link.wait(low)  # low moved nothing: it owes no share, and goes first
        assert high.slot is None or high.slot > slot_low, (slot_low, high.slot)
        assert link.bytes_by_class == {"high": 1_000_000, "low": 1_000_000}
    finally:
        link.cancel(high)
        link.cancel(low)


def test_an_unpaced_link_records_each_chunk_when_it_goes():
    # An unpaced (inf-rate) link granted and recorded every chunk when it was queued, and `paced` queues LOOKAHEAD
    # chunks ahead: a transfer's bytes were recorded up to four chunks before they moved (a slow consumer's land in
    # earlier bins; the link's bytes over time ran ahead of the bytes moved).
    link = Link("cnic/unpaced", math.inf, {"high": 99.0, "low": 1.0}, quantum=100, per_class_names=True)
    g = link.paced(450, "low")
    moved = 0
    for n in g:
        moved += n
        assert link.bytes_by_class["low"] == moved  # (was 400 after the first chunk)
        assert sum(s.nbytes for s in link.samples()) == moved
        if moved == 200:
            break
    g.close()  # dropped part way: what was recorded is what moved
    assert link.bytes_by_class == {"high": 0, "low": 200}
    assert sum(link.paced(450, "high")) == 450  # a whole transfer still goes at once, recorded in full
    assert link.bytes_by_class == {"high": 450, "low": 200}
    assert link.reserve(50, "low") is not None and link.bytes_by_class["low"] == 250


def test_an_unpaced_link_in_a_path_still_paces_and_records_at_the_slot():
    # (Not a defect: an unpaced link on a multi-link path takes its turn at once and records when the path's slot is
    # booked; the paced link sets the rate.)
    free = Link("snic/free", math.inf, {"low": 1.0}, quantum=100)
    capped = Link("cnic/capped", 1e9, {"high": 99.0, "low": 1.0}, quantum=100)
    assert sum(Pacer([free, capped]).paced(1000, "low")) == 1000
    assert free.total_bytes == capped.total_bytes == 1000


def _until(cond, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


def gated_feeder(name: str, gate_s: float):
    """A 3-layer feeder (4-byte layers, prefetch 1) whose source blocks until `gate` is set (at most `gate_s`):
    (feeder, gate, entered: set once a source runs, sunk: the layers copied to the "device", in order)."""
    gate, entered = threading.Event(), threading.Event()
    sunk: list[int] = []

    def source(layer, out):
        entered.set()
        gate.wait(gate_s)
        out[:] = layer
        return out

    def to_device(host):
        sunk.append(int(host[0]))
        return host.copy()

    return LayerFeeder(3, source, 4, prefetch=1, to_device=to_device, name=name), gate, entered, sunk


def test_a_layer_whose_source_returns_after_close_is_not_copied_to_the_device():
    # close() while a layer's source was running (a store read, a wait for a peer's notification): once the source
    # returned, the loader still copied the layer to the device (then found the layer failed by close() and dropped
    # it): device memory taken by a feed already torn down.
    feeder, gate, entered, sunk = gated_feeder("hunt7-close", 5)
    feeder.start_load()
    assert entered.wait(5)
    closer = threading.Thread(target=feeder.close)
    closer.start()
    try:
        assert _until(feeder._stop.is_set)
        with pytest.raises(LayerLoadError, match="closed"):
            feeder.wait_for_layer(0)
    finally:
        gate.set()
        closer.join(10)
        feeder._loader.join(10)  # (close no longer joins a loader: it stops once its source returns)
    assert not closer.is_alive() and not feeder._loader.is_alive()
    assert sunk == []  # (was [0])


@pytest.mark.parametrize("two_links", [False, True])
def test_a_huge_transfer_of_tiny_chunks_holds_no_list_of_them(two_links):
    # `paced` built the list of every chunk size before its first chunk: with 1-byte chunks a 1 GB transfer held 8 GB
    # of list (and took seconds) before anything moved. Here 2 MB of 1-byte chunks: ~16 MB of list (more for two links) was 0.
    a = Link("snic/tiny", 1e12, {"low": 1.0}, quantum=1)
    links = [a, Link("cnic/tiny", 1e12, {"high": 99.0, "low": 1.0}, quantum=1)] if two_links else [a]
    tracemalloc.start()
    try:
        g = Pacer(links).paced(2_000_000, "low")
        assert next(g) == 1
        g.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak
    assert a.total_bytes == 1
    assert list(a.chunks(10)) == [1] * 10 and len(a.chunks(4_000_000)) == 4_000_000
    assert list(Link("x", 1e6, quantum=4).chunks(10)) == [4, 4, 2] and list(a.chunks(0)) == []
    assert a.chunks(10)[-1] == 1 and Link("x", 1e6, quantum=4).chunks(10)[1:] == [4, 2]
