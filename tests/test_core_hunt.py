"""Defects found in the jax-free core leaf modules (metrics, block keys, KV layout, registry, host buffers)."""

import math
import threading

from dualpath_jax.host_buffers import HostBufferPool


def test_acquire_with_infinite_timeout_waits_for_a_release():
    # timeout=inf passed the ">= 0" check, then overflowed Condition.wait (OverflowError instead of a wait)
    pool = HostBufferPool(slot_nbytes=4096, num_slots=2, prefault=False)
    held = pool.acquire(nslots=2)
    got, err = [], []

    def waiter():
        try:
            got.append(pool.acquire(nslots=1, timeout=math.inf))
        except Exception as e:  # noqa: BLE001 - reported below
            err.append(e)

    t = threading.Thread(target=waiter)
    t.start()
    while not err and pool.stats().timeouts == 0 and len(pool._queue) == 0:  # the waiter is queued (or failed)
        t.join(0.001)
    held.release()
    t.join(10.0)
    assert not err, err
    assert len(got) == 1 and len(got[0].slots) == 1
    got[0].release()
    assert pool.free_slots == 2
