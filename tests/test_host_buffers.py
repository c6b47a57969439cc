"""Host buffer pools (PE/DE buffers): budget, waiting, timeouts, views into one arena."""

import threading
import time

import numpy as np
import pytest

from dualpath_jax.host_buffers import PAGE_NBYTES, BufferBudgetExceeded, HostBufferPool


def test_slots_are_disjoint_writable_views_of_one_aligned_arena():
    pool = HostBufferPool(slot_nbytes=1000, num_slots=6, name="pe0")
    assert pool.address % PAGE_NBYTES == 0
    a = pool.acquire(nslots=2)
    b = pool.acquire(nbytes=2500)  # rounds up to 3 slots
    assert len(b) == 3 and b.nbytes == 2500
    assert not set(a.slots) & set(b.slots)
    for i, v in enumerate(a.views + b.views):
        v[:] = i + 1
    for off, v in zip(a.offsets + b.offsets, a.views + b.views, strict=True):
        np.testing.assert_array_equal(pool.arena[off : off + 1000], v)  # offsets address the arena
        assert np.shares_memory(v, pool.arena)
    assert pool.stats().bytes_in_use == 5000 and pool.free_slots == 1
    a.release()
    b.release()
    st = pool.stats()
    assert st.bytes_in_use == 0 and st.peak_bytes_in_use == 5000 and st.acquires == st.releases == 2


def test_slots_are_reused_without_allocation():
    pool = HostBufferPool(slot_nbytes=4096, num_slots=2)
    seen = set()
    for _ in range(10):
        with pool.acquire(nslots=2) as buf:
            seen.update(buf.offsets)
    assert seen <= {0, 4096}


def test_request_that_can_never_fit_fails_at_once():
    pool = HostBufferPool(slot_nbytes=100, budget_bytes=1000, name="de1")
    t0 = time.monotonic()
    with pytest.raises(BufferBudgetExceeded, match="de1.*can never fit"):  # (a bounded wait first: a regression
        pool.acquire(nslots=11, timeout=5.0)  # fails here in 5 s instead of hanging the suite below)
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(BufferBudgetExceeded, match="de1.*can never fit"):
        pool.acquire(nslots=11, timeout=None)


def test_over_budget_times_out_clearly_and_zero_timeout_does_not_wait():
    pool = HostBufferPool(slot_nbytes=100, num_slots=4)
    held = pool.acquire(nslots=3)
    with pytest.raises(BufferBudgetExceeded, match="within 0.05 s"):
        pool.acquire(nslots=2, timeout=0.05)
    with pytest.raises(BufferBudgetExceeded):
        pool.acquire(nslots=2, timeout=0)
    assert pool.stats().timeouts == 2
    held.release()
    pool.acquire(nslots=4, timeout=0).release()


def test_waiting_request_is_served_on_release_in_fifo_order():
    pool = HostBufferPool(slot_nbytes=64, num_slots=4)
    held = pool.acquire(nslots=4)
    order = []

    def worker(name, n):
        with pool.acquire(nslots=n, timeout=10):
            order.append(name)
            time.sleep(0.01)

    big = threading.Thread(target=worker, args=("big", 4))
    big.start()
    while not pool._queue:  # the big request is queued first
        time.sleep(0.001)
    small = threading.Thread(target=worker, args=("small", 1))
    small.start()
    time.sleep(0.05)
    assert order == []  # both wait; the small one does not overtake the big one
    held.release()
    big.join(5)
    small.join(5)
    assert order == ["big", "small"]
    assert pool.stats().waits == 2


def test_many_threads_never_share_a_slot():
    pool = HostBufferPool(slot_nbytes=256, num_slots=8)
    errors = []

    def worker(tid):
        for i in range(200):
            with pool.acquire(nslots=1 + (tid + i) % 3, timeout=10) as buf:
                for v in buf.views:
                    v[:] = tid
                time.sleep(0)
                if any((v != tid).any() for v in buf.views):
                    errors.append(tid)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert not errors
    st = pool.stats()
    assert st.slots_in_use == 0 and st.acquires == 1200 and pool.free_slots == 8


def test_contiguous_acquire_gives_one_view():
    pool = HostBufferPool(slot_nbytes=10, num_slots=6)
    a = pool.acquire(nslots=1)  # slot 0
    b = pool.acquire(nslots=1)  # slot 1
    a.release()  # free: 0, 2..5
    c = pool.acquire(nslots=3, contiguous=True)
    assert c.slots == [2, 3, 4]
    view = c.contiguous_view()
    assert view.shape == (30,) and np.shares_memory(view, pool.arena)
    with pytest.raises(BufferBudgetExceeded):
        pool.acquire(nslots=2, contiguous=True, timeout=0)  # 2 free slots (0, 5) but not adjacent
    b.release()
    c.release()


def test_use_after_release_and_double_release_are_errors():
    pool = HostBufferPool(slot_nbytes=10, num_slots=2)
    with pool.acquire(nslots=1) as buf:
        pass
    with pytest.raises(RuntimeError, match="after release"):
        _ = buf.views
    with pytest.raises(RuntimeError, match="twice"):
        buf.release()
    other = HostBufferPool(slot_nbytes=10, num_slots=2, name="other")
    h = pool.acquire(nslots=1)
    with pytest.raises(ValueError, match="released to pool 'other'"):
        other.release(h)


def test_bad_constructor_and_request_arguments():
    with pytest.raises(ValueError, match="slot_nbytes"):
        HostBufferPool(slot_nbytes=0, num_slots=1)
    with pytest.raises(ValueError, match="exactly one of budget_bytes and num_slots"):
        HostBufferPool(slot_nbytes=10)
    with pytest.raises(ValueError, match="smaller than one slot"):
        HostBufferPool(slot_nbytes=10, budget_bytes=5)
    pool = HostBufferPool(slot_nbytes=10, num_slots=1)
    with pytest.raises(ValueError, match="exactly one of nbytes and nslots"):
        pool.acquire()
    with pytest.raises(ValueError, match="nslots"):
        pool.acquire(nslots=0)
    with pytest.raises(ValueError, match="timeout"):
        pool.acquire(nslots=1, timeout=-1)


def test_nan_timeout_and_out_of_range_slots_are_errors():
    """A NaN timeout would wait forever (as None does) instead of being refused; a slot index past the arena gave
    an empty view instead of an error."""
    pool = HostBufferPool(slot_nbytes=10, num_slots=2, name="p")
    with pytest.raises(ValueError, match="timeout must be >= 0 s or None, got nan"):
        pool.acquire(nslots=1, timeout=float("nan"))
    assert pool.free_slots == 2 and not pool._queue
    for slot in (-1, 2):
        with pytest.raises(IndexError, match=f"slot {slot} out of range for pool 'p' of 2 slots"):
            pool.slot_view(slot)
    assert pool.slot_view(1).shape == (10,)
