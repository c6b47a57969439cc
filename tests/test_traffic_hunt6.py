"""Defects found by the seventh traffic-manager hunt (2026-12-04, fourth pass): each test failed before its fix."""

from __future__ import annotations

import gc
import threading
import weakref

import numpy as np
import pytest

from dualpath_jax.traffic import Link
from transport.feeder import LayerFeeder


def test_a_dropped_transfer_refunds_its_class_share_with_another_flow_queued_behind_it():
    # A dropped transfer's queued chunks refunded their class's SFQ share only when one was the class's last chunk: with
    # another flow of the class queued behind them, the class kept the charge (99:1 classes ran ~99:0.67 under steady
    # drops). Here class low's flow B waited a whole turn behind high for transfer A's chunks that never crossed.
    link = Link("cnic/hunt6", 1e6, {"high": 1.0, "low": 1.0}, quantum=1_000_000, burst_s=0)
    link.reserve(1_000_000, "high")  # the link is booked 1 s (horizon 0.5 s): nothing below is granted before +0.5 s
    a1, a2 = link.enqueue(1_000_000, "low"), link.enqueue(1_000_000, "low")  # transfer A's chunks queued ahead
    b = link.enqueue(1_000_000, "low")  # flow B of the same class, queued behind them
    high = link.enqueue(1_000_000, "high")
    link.cancel(a2)  # A is dropped (newest first, as `Link.paced` does)
    link.cancel(a1)
    assert b.slot is None and high.slot is None, "premise: the cancels ran before any of these chunks was granted"
    slot_b = link.wait(b)  # low's B goes first: nothing of A was moved, so low owes no share
    assert high.slot is None or high.slot > slot_b, (slot_b, high.slot)
    assert link.bytes_by_class["low"] == 1_000_000
    link.cancel(high)


@pytest.mark.parametrize(
    "kw",
    [
        {"rate_bytes_per_s": True},  # a 1 B/s link: a 1 MB transfer took 11 days
        {"quantum": True},  # 1-byte chunks: a slot per byte
        {"quantum": 1.5},
        {"burst_s": True},
        {"weights": {"high": True, "low": 1.0}},
        {"rate_bytes_per_s": "1e6"},  # was "'>' not supported between instances of 'str' and 'int'"
        {"quantum": "4096"},
        {"sample_interval": "0.1"},
        {"weights": {"high": "99", "low": 1.0}},
    ],
)
def test_a_link_setting_that_is_no_number_is_refused_by_name(kw):
    kw = {"rate_bytes_per_s": 1e6, **kw}
    with pytest.raises(TypeError, match=r"link 'cnic/bad': (rate|quantum|burst_s|sample_interval|weight)"):
        Link("cnic/bad", **kw)
    Link("cnic/ok", np.float32(1e6), {"high": np.int64(99), "low": 1}, quantum=np.int64(4096), burst_s=0)


def test_a_feeder_dropped_part_way_without_close_goes_with_its_loader():
    # The loader thread held its feeder for ever, polling for a token the consumer would never give back: a request
    # dropped after its first layer (without close()) kept its thread, staging buffers and loaded layers alive.
    feeder = LayerFeeder(8, lambda layer, out: out, 1 << 16, prefetch=2, to_device=lambda host: host.copy(),
                         name="hunt6-dropped")  # fmt: skip
    feeder.wait_for_layer(0)
    ref, loader = weakref.ref(feeder), feeder._loader
    del feeder
    gc.collect()
    loader.join(timeout=2)
    assert not loader.is_alive() and ref() is None
    assert not any(t.name == "feeder-hunt6-dropped" for t in threading.enumerate())
