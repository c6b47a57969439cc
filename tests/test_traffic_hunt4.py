"""Defects found by the fifth traffic-manager hunt (2026-12-03, second pass): each test failed before its fix."""

from __future__ import annotations

import math
import os
import signal
import threading
import time

import numpy as np
import pytest

from dualpath_jax.block_keys import block_keys
from dualpath_jax.host_buffers import BufferBudgetExceeded, HostBufferPool
from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.kv_store import LocalDirStore
from dualpath_jax.traffic import Link, Pacer, TrafficManager
from transport.feeder import KVMissError, LayerFeeder, StoreLayerSource


@pytest.mark.parametrize("parallel", [True, False])
def test_a_store_miss_is_not_recorded_on_the_snic(tmp_path, parallel):
    # StoreLayerSource paced (recorded) each block on the SNIC before reading it: a block that turned out a miss still
    # counted as bytes moved. Now each block is paced once read, as the runtime's SNIC does.
    layout = BlockLayout(num_layers=2, block_tokens=4, bytes_per_token_per_layer=8, fingerprint="hunt4")
    store = LocalDirStore(tmp_path / "kv", layout)
    try:
        hit, gone = block_keys(np.arange(8), 4)
        assert store.write(hit, np.ones(layout.full_block_shape, np.uint8))
        snic = Link("snic/node0", 1e9, {"low": 1.0})
        src = StoreLayerSource(store, [hit, gone], layout, pacer=Pacer([snic]), parallel=parallel)
        with pytest.raises(KVMissError, match="miss"):
            src(0, np.zeros(2 * layout.layer_block_nbytes, np.uint8))
        assert snic.total_bytes == layout.layer_block_nbytes  # the hit only
    finally:
        store.close()


def test_empty_link_weights_are_refused():
    # Link(weights={}) (and add_cnic(weights={})) silently got the default classes.
    with pytest.raises(ValueError, match="at least one class"):
        Link("x", 1e6, weights={})
    with pytest.raises(ValueError, match="at least one class"):
        TrafficManager().add_cnic(0, 1e6, weights={})


def test_a_float_save_layer_is_refused_at_the_call():
    # save_layer(1.0, kv) was taken and only failed later in the saver (reported by wait_for_save); the feeder's other
    # saves must be unaffected by the refused call.
    got = {}
    feeder = LayerFeeder(3, lambda layer, out: out, 4, saver=lambda layer, host: got.update({layer: bytes(host)}))
    try:
        feeder.save_layer(0, np.full(4, 1, np.uint8))
        with pytest.raises(TypeError, match="layer must be an int"):
            feeder.save_layer(1.0, np.full(4, 2, np.uint8))
        with pytest.raises(IndexError):
            feeder.save_layer(3, np.full(4, 3, np.uint8))
        feeder.save_layer(np.int64(1), np.full(4, 4, np.uint8))
        feeder.wait_for_save()
        assert got == {0: b"\x01" * 4, 1: b"\x04" * 4}
        assert all(type(k) is int for k in got)
    finally:
        feeder.close()


def _in_child(fn, alarm_s: int = 5) -> int:
    """Run fn() in a forked child (killed after `alarm_s`); its exit status (0: fn returned True)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(alarm_s)
            code = 0 if fn() else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def test_a_forked_child_writes_its_own_copy_of_the_host_buffers():
    # The arena was a shared anonymous mapping: a forked child writing into its copy of a buffer wrote the parent's.
    pool = HostBufferPool(4096, num_slots=2, name="fork1")
    buf = pool.acquire(nslots=1)
    buf.view(0)[:] = 1

    def child() -> bool:
        buf.view(0)[:] = 9
        return True

    assert _in_child(child) == 0
    assert (buf.view(0) == 1).all()
    buf.release()


def test_a_forked_child_does_not_wait_behind_the_parents_waiting_requests():
    # A request another thread was waiting with at the fork stayed first in the child's queue (that thread does not
    # exist there): the child's own requests waited behind it until they timed out, with every slot free.
    pool = HostBufferPool(4096, num_slots=2, name="fork2")
    held = pool.acquire(nslots=2)
    waiter = threading.Thread(target=lambda: pool.acquire(nslots=1, timeout=10).release())
    waiter.start()
    deadline = time.monotonic() + 5
    while not pool._queue and time.monotonic() < deadline:  # (the waiter is queued)
        time.sleep(0.001)

    def child() -> bool:
        held.release()
        with pool.acquire(nslots=2, timeout=1) as buf:
            return buf.slots == [0, 1]

    try:
        assert _in_child(child) == 0
    finally:
        held.release()
        waiter.join(10)


def test_a_child_forked_while_another_thread_held_the_pool_lock_can_use_the_pool():
    # (as the KV store's: the lock a thread held at the fork stays held for ever in the child)
    pool = HostBufferPool(4096, num_slots=2, name="fork3")
    locked, done = threading.Event(), threading.Event()

    def hold():
        with pool._cond:
            locked.set()
            done.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert locked.wait(5)

    def child() -> bool:
        with pool.acquire(nslots=1, timeout=0) as buf:
            return len(buf) == 1

    try:
        assert _in_child(child, alarm_s=2) == 0
    finally:
        done.set()
        holder.join(10)


def test_a_cut_chunk_taken_back_refunds_its_class_share():
    # A chunk cut to fill the gap before a held slot and taken back before its grant (its transfer dropped) kept its
    # class charged (cancel compared the tag against the cut size): the class then waited a chunk behind the other.
    fast = Link("fast", 1e6, {"high": 1.0, "low": 1.0}, quantum=1_000_000, burst_s=0)  # horizon 0.5 s
    fast.reserve(1_000_000, "high")  # booked for 1 s
    now = time.monotonic()
    with fast.lock:  # a multi-link path's chunk held from +1.2 s (as `Pacer` books one)
        slot = fast.free_slot(now + 1.2, 0.01, now)
        fast.book([], slot, 0.01, slot)
    cut = fast.enqueue(1_000_000, "low", split=True)
    assert cut.slot is None and 0 < cut.nbytes < 1_000_000  # cut to the ~0.2 s gap, not granted yet
    fast.cancel(cut)
    high, low = fast.enqueue(1_000_000, "high"), fast.enqueue(1_000_000, "low")
    try:
        first = fast.wait(low)  # low's chunk was taken back: low goes first (as for a chunk never cut)
        assert high.slot is None or high.slot > first
    finally:
        fast.cancel(high)
        fast.cancel(low)


def test_an_infinite_feeder_timeout_waits():
    # timeout_s=math.inf ("forever") failed wait_for_layer with OverflowError; wait_for_save(timeout=math.inf) reported
    # a save that succeeded as failed ("OverflowError: timestamp out of range") and dropped it from tracking. NaN and
    # negative timeouts (silently no wait) are refused.
    gate = threading.Event()
    saved = []

    def saver(layer, host):
        gate.wait(5)
        saved.append(layer)

    def source(layer, out):
        gate.wait(5)
        out[:] = layer
        return out

    feeder = LayerFeeder(2, source, 4, saver=saver, to_device=lambda host: host.copy(), timeout_s=math.inf)
    try:
        feeder.save_layer(0, np.zeros(4, np.uint8))
        threading.Timer(0.2, gate.set).start()
        assert (feeder.wait_for_layer(0) == 0).all()  # (waited for the gate)
        feeder.wait_for_save(timeout=math.inf)
        assert saved == [0]
        for bad in (math.nan, -1.0):
            with pytest.raises(ValueError, match="timeout"):
                feeder.wait_for_save(timeout=bad)
            with pytest.raises(ValueError, match="timeout_s"):
                LayerFeeder(2, source, 4, timeout_s=bad)
    finally:
        gate.set()
        feeder.close()


def test_a_record_of_an_unknown_class_or_a_non_byte_count_is_refused():
    # Link.record took a typo of a class as a class of its own (samples "cnic/engine0/hihg", beside "low"), and a
    # float, a bool or a negative count as bytes; pacing refuses an unknown class.
    tm = TrafficManager()
    cnic = tm.add_cnic(0, 1e6)
    for args in [(100, "hihg"), (2.5, "low"), (True, "low"), (-1, "low")]:
        with pytest.raises(ValueError):
            cnic.record(*args)
    cnic.record(np.int64(5), "low")
    assert cnic.bytes_by_class == {"high": 0, "low": 5}
    assert [s.link for s in tm.samples()] == ["cnic/engine0/low"]


def test_a_request_that_waited_then_timed_out_counts_its_wait():
    # HostBufferStats.wait_s ("total time spent waiting") left out requests that waited and then timed out: under
    # buffer pressure, where timeouts happen, the pool reported no waiting at all.
    pool = HostBufferPool(4096, num_slots=1, name="stats")
    held = pool.acquire(nslots=1)
    with pytest.raises(BufferBudgetExceeded):
        pool.acquire(nslots=1, timeout=0.05)
    with pytest.raises(BufferBudgetExceeded):
        pool.acquire(nslots=1, timeout=0)  # (did not wait)
    st = pool.stats()
    assert (st.timeouts, st.waits) == (2, 1)
    assert st.wait_s > 0
    held.release()
