"""Defects found by the fix19 hunt of the transports, the traffic manager and the layer feeder (2026-12-05 night).

Each test failed before its fix: a `RecordingPacer` (`config.netns`: the kernel shapes the link, the traffic manager
only records) recorded a whole transfer when it started; a `LayerForwarder` whose staging region was gone when it
started never settled its `done` future; `Link.reserve` took a whole transfer (or negative bytes) as one chunk;
`rate_of` said 0 B/s for a CNIC asked by its link name; `Link` took an infinite sample interval (NaN bin starts); TCP
and inproc settings of the wrong kind were taken or failed unnamed; `layer_tag` made tags past 64 bits; an inproc done
callback waiting for a later transfer of its lane hung it.
"""

from __future__ import annotations

import math
import threading
import time
import types

import numpy as np
import pytest

from dualpath_jax import traffic
from dualpath_jax.traffic import Link, Pacer, RecordingPacer
from transport.base import RegionError
from transport.feeder import LayerForwarder, layer_tag
from transport.inproc import InProcFabric, InProcTransport


class _Clock:
    """A monotonic clock the test moves by hand (so bins are deterministic and the test sleeps not at all)."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_a_recording_pacer_records_each_chunk_when_it_moves(monkeypatch):
    # The kernel moves a kernel-shaped transfer at the link's rate; the recording pacer yields its chunks as the
    # transport sends them. It recorded the whole transfer at its start: 4 quanta at 1 quantum/s all in the first
    # 0.1 s bin (40x the link's cap there), and a transfer cut off after its first chunk counted in full.
    clock = _Clock()
    monkeypatch.setattr(traffic, "time", types.SimpleNamespace(monotonic=clock, sleep=time.sleep))
    link = Link("cnic/engine0", 10_000, {"high": 99.0, "low": 1.0}, quantum=10_000, clock_origin=clock.t)
    rec = RecordingPacer(Pacer([link]))
    sizes = []
    for n in rec.paced(40_000, "low"):
        sizes.append(n)
        clock.t += n / link.rate  # the kernel takes the chunk's time
    assert sum(sizes) == 40_000
    bins = [(s.t0, s.nbytes) for s in link.samples()]
    assert max(n for _, n in bins) <= 10_000, bins  # never more in a bin than the link moves in a chunk's time
    assert sum(n for _, n in bins) == 40_000 and len(bins) == 4, bins

    # cut off after its first chunk (the peer went): only what moved is recorded
    it = rec.paced(40_000, "high")
    first = next(it)
    it.close()
    assert link.bytes_by_class["high"] == first < 40_000

    # a transport that closed meanwhile (`check` raises) records nothing more
    def closed() -> None:
        raise RuntimeError("closed")

    with pytest.raises(RuntimeError, match="closed"):
        list(rec.paced(10_000, "high", check=closed))
    assert link.bytes_by_class["high"] == first


def test_a_forwarder_whose_staging_region_went_before_start_settles_done():
    # The forwarder looked its staging region up before its try: gone by `start` (deregistered after the forwarder was
    # built), the thread died with the RegionError and `done` never settled: its caller waited for ever.
    fabric = InProcFabric()
    de, pe = InProcTransport("de", fabric=fabric), InProcTransport("pe", fabric=fabric)
    try:
        de.register("ring", np.zeros(32, np.uint8))
        pe.register("buf", np.zeros(64, np.uint8))
        de.connect("pe", "pe")

        def source(layer: int, out: np.ndarray) -> np.ndarray:
            out[:] = layer
            return out

        fw = LayerForwarder(
            de, "pe", source, 4, 16, "ring", 0, "buf", lambda layer: 16 * layer, lambda layer: layer_tag(7, layer)
        )
        de.deregister("ring")
        with pytest.raises(RegionError, match="ring"):
            fw.start().result(timeout=5)
    finally:
        de.close()
        pe.close()


@pytest.mark.parametrize("nbytes", [-1000, 2.5, 1001, True])
def test_a_link_reserves_one_chunk_of_whole_bytes_only(nbytes):
    # `reserve` is "one chunk (<= quantum)" but took anything: more than a quantum was one slot as long as the whole
    # transfer (the other class, 99:1 high, waited behind all of it), a negative size was recorded as negative bytes
    # and pulled its class's finish tag back (ahead of the other class), 2.5 bytes were 2.
    link = Link("cnic/fix19", 1e6, {"high": 99.0, "low": 1.0}, quantum=1000, burst_s=0)
    with pytest.raises(ValueError, match=r"reserve takes one chunk"):
        link.reserve(nbytes, "low")
    assert link.bytes_by_class == {"high": 0, "low": 0} and not link.samples()
    assert link._finish == {"high": 0.0, "low": 0.0} and not any(link._queues.values())
    assert link.reserve(1000, "low") is not None and link.bytes_by_class["low"] == 1000  # a whole quantum goes


def test_the_rate_of_a_link_recorded_per_class_is_asked_by_class():
    # A CNIC records per class ("cnic/engine0/high", "/low"); `rate_of(samples, "cnic/engine0")` matched no sample and
    # said 0.0 B/s, as for an idle link, however busy the CNIC was.
    link = Link("cnic/engine0", math.inf, {"high": 99.0, "low": 1.0}, per_class_names=True, sample_interval=0.1)
    link.record(5000, "low")
    samples = link.samples()
    with pytest.raises(ValueError, match=r"records per class.*'cnic/engine0/low'"):
        traffic.rate_of(samples, "cnic/engine0")
    assert traffic.rate_of(iter(samples), "cnic/engine0/low") == pytest.approx(5000 / 0.1)
    assert traffic.rate_of(samples, "cnic/engine0/high") == 0.0  # an idle class: 0
    assert traffic.rate_of(samples, "cnic/engine1") == 0.0  # a link with no samples at all: 0, as before


def test_a_link_refuses_an_infinite_sample_interval():
    # `TrafficManager` takes an infinite interval as bad (it does not grid its origin on it) and says every link made
    # refuses it; `Link` took it: every byte went into one bin whose start was 0 * inf, NaN.
    with pytest.raises(ValueError, match=r"sample_interval must be > 0 s, got inf"):
        Link("snic/node0", 1e6, sample_interval=math.inf)
    tm = traffic.TrafficManager(sample_interval=math.inf)
    with pytest.raises(ValueError, match=r"sample_interval must be > 0 s, got inf"):
        tm.add_snic(0, 1e6)


def test_a_layer_tag_fits_the_wire():
    # `request_id << 12 | layer` past the signed 64 bits of a notify tag: the DE's write (and the failure signal it
    # sends instead) was refused, and the PE waited for that tag until its timeout. Refused when the tag is made now.
    assert layer_tag((1 << 51) - 1, 4095) == (1 << 63) - 1
    assert layer_tag(-(1 << 51), 0) == -(1 << 63)
    for request_id in (1 << 51, -(1 << 51) - 1):
        with pytest.raises(ValueError, match="request id .* out of range for a layer tag"):
            layer_tag(request_id, 0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"timeout_s": True}, TypeError, "timeout_s must be a number of seconds, got True"),  # was a 1 s timeout
        ({"timeout_s": "30"}, TypeError, "timeout_s must be a number of seconds, got '30'"),  # was '>' not supported
        ({"handshake_timeout_s": None}, TypeError, "handshake_timeout_s must be a number of seconds, got None"),
        ({"port": "8000"}, ValueError, r"port must be an int in 0..65535 \(0: any free port\), got '8000'"),
        ({"port": -1}, ValueError, r"port must be an int in 0..65535 \(0: any free port\), got -1"),  # OverflowError
        ({"port": 70000}, ValueError, r"port must be an int in 0..65535"),
        ({"port": True}, ValueError, r"port must be an int in 0..65535"),  # was port 1 (privileged)
    ],
)
def test_tcp_settings_of_the_wrong_kind_are_named(kwargs, error, match):
    # `config.transport_options` reaches the endpoint as written: a string, None or a bool in a setting was a bare
    # TypeError naming no setting, or taken as a number (True: a 1 s timeout, after which a busy peer was dropped).
    from transport.tcp import TcpTransport

    with pytest.raises(error, match=rf"^tcp transport 'ep': {match}"):
        TcpTransport("ep", **kwargs)


@pytest.mark.parametrize("workers", [0, -2, 1.5, True])
def test_inproc_worker_counts_are_named(workers):
    # 0 was concurrent.futures' "max_workers must be greater than 0", naming neither the endpoint nor the setting; 1.5
    # and True were taken (a pool of "1.5" workers, one worker).
    with pytest.raises(
        ValueError, match=rf"^inproc transport 'ep': workers_per_class must be an int >= 1, got {workers}"
    ):
        InProcTransport("ep", fabric=InProcFabric(), workers_per_class=workers)
    ep = InProcTransport("ep", fabric=InProcFabric(), workers_per_class=np.int64(2))  # numpy ints are fine
    ep.close()


class _Gate:
    """A pacer that holds every chunk until `open` is set (so a callback is added before the transfer completes)."""

    def __init__(self) -> None:
        self.open = threading.Event()

    def pace(self, nbytes: int, priority: str) -> None:
        self.open.wait(5)


def test_an_inproc_done_callback_may_wait_for_a_later_transfer_of_its_lane():
    # inproc runs a (peer, class)'s transfers one at a time on one drain of its lane, and completed each future there:
    # a done callback that posted to the same peer and class and waited for it waited for ever (the lane's next task
    # could only run after the callback returned), and every later transfer on that lane with it. (tcp: until the
    # watchdog dropped the peer.) The lane is now handed on before such a future completes.
    gate = _Gate()
    fabric = InProcFabric()
    a, b = InProcTransport("a", fabric=fabric, pacer=gate), InProcTransport("b", fabric=fabric)
    try:
        a.register("src", np.arange(16, dtype=np.uint8))
        b.register("dst", np.zeros(16, np.uint8))
        a.connect("b", "b")
        got: list = []

        def chain(_):
            try:
                got.append(a.write("b", "src", 8, "dst", 8, 8).result(timeout=2))
            except Exception as e:  # noqa: BLE001 - recorded for the assertion
                got.append(e)

        first = a.write("b", "src", 0, "dst", 0, 8)
        first.add_done_callback(chain)  # (before it completes: the gate holds its chunk)
        gate.open.set()
        assert first.result(timeout=5) == 8
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got == [8]
        assert bytes(b.region("dst").view) == bytes(range(16))
        assert a.write("b", "src", 0, "dst", 0, 16).result(timeout=2) == 16  # the lane still runs
    finally:
        a.close()
        b.close()
