"""Device work timed as device work, not as its dispatch (JAX dispatches asynchronously).

The PE's compute (`busy_s`, the step log `bench_runtime` fits the cost model on) was the batch's wall time less its
waits inside the layer loop (the CNIC pacer, a DE's layers); those waits run while the layer dispatched before them
is still computing, so that compute was subtracted too (a "dense" model with 100 ms waits per layer: 19% of its
compute). The runner now reports when the device was busy during its callbacks (`PrefillResult.device_busy`) and the
PE counts the waits' overlap with it as compute. `schedulers.calibrate`'s timers timed a jitted step as its dispatch.
"""

from __future__ import annotations

import copy
import functools
import math
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from test_fix15_ablation import _Transport

# A zero that is ready only after `rounds` matmuls (traced: one compile), and its addition to an array.
_spin_rounds = jax.jit(lambda x, rounds: jax.lax.fori_loop(0, rounds, lambda i, y: jnp.tanh(y @ x), x).sum() * 0)
_late = jax.jit(lambda h, z: h + z.astype(h.dtype))
_X = jnp.ones((512, 512), jnp.float32) / 512


def _least_s(f) -> float:
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(f())
        times.append(time.perf_counter() - t0)
    return min(times)


@functools.cache
def _rounds() -> int:
    """Rounds that take 0.1 s or more here: a spin well above the tiny model's host work per layer, on any machine."""
    return max(1, math.ceil(0.1 / _least_s(lambda: _spin_rounds(_X, 1))))


def _spin():
    return _spin_rounds(_X, _rounds())


def _spin_s() -> float:
    """The least time one spin takes here (blocked on)."""
    return _least_s(_spin)


def _slowed(ops):
    """A copy of `ops` (the session's, untouched) whose every layer's output is ready only after a spin."""

    def slow(step):
        def layer(state, kv_cached, hidden, meta):
            kv_new, hidden = step(state, kv_cached, hidden, meta)
            return kv_new, _late(hidden, _spin())

        return layer

    slowed = copy.copy(ops)
    slowed.runner = copy.copy(ops.runner)
    slowed.runner.prefill_steps = [slow(s) for s in ops.runner.prefill_steps]
    return slowed


def test_a_pe_counts_the_compute_that_ran_while_it_waited_for_its_cnic(ops):
    """Layerwise PE, each layer's H2D paced on its CNIC for 5 spins' time while the layer dispatched before it computes
    (a spin): busy_s and the step log hold every layer's compute, not only the last one's (the others ran during the
    waits and were subtracted with them), and still not the waits' idle part."""
    from dualpath_jax.block_keys import block_keys
    from dualpath_jax.host_buffers import HostBufferPool
    from dualpath_jax.runtime.control import TurnTask
    from dualpath_jax.runtime.engines import PrefillEngine, _PrefillReq

    slowed = _slowed(ops)
    L, bpt, bs = ops.config.num_layers, ops.kv_layout.bytes_per_token_per_layer, 16
    assert L >= 4  # (L - 1.5 spins of compute: well above the one spin read before)
    spin_s, pace_s = _spin_s(), [0.0]
    pacer = types.SimpleNamespace(pace=lambda nbytes, priority="low": time.sleep(pace_s[0]))
    cluster = types.SimpleNamespace(decode_slots=1, max_seq_len=128, layerwise=True, pe_hbm_kv_bytes=0)
    ctx = types.SimpleNamespace(
        cfg=types.SimpleNamespace(block_size=bs, cluster=cluster), model=slowed, emit=lambda e: 0
    )
    pool = HostBufferPool(slot_nbytes=bs * bpt, budget_bytes=L * 128 * bpt, prefault=False)
    eng = PrefillEngine(0, 0, ctx, _Transport([], auto=True), pool, None, cnic_in=pacer, batcher=None)
    cached, new = 64, 16
    ids = np.arange(cached + new, dtype=np.int32) % ops.vocab_size
    task = TurnTask(1, 0, 1, 0, ids, 2, block_keys(ids, bs), cached // bs, cached // bs, 0, 1, "pe")
    area = np.zeros((L, cached + new, bpt), np.uint8)
    r = _PrefillReq(task=task, bs=bs, area=area, final_hit=cached, cached=cached, de_area_off=0)
    eng._run_batch([(r, cached, new)])  # (compiles this bucket)
    eng.busy_s, eng.wait_s, eng.step_log, r.cached, r.futures = 0.0, 0.0, [], cached, []
    # (each layer's H2D from now on; 5 spins: the last check holds while a spin under load takes < 3.75x its least)
    pace_s[0] = max(0.2, 5 * spin_s)

    t0 = time.perf_counter()
    eng._run_batch([(r, cached, new)])
    wall = time.perf_counter() - t0
    assert eng.step_log == [([(cached, new)], eng.busy_s)]
    assert eng.wait_s >= L * pace_s[0]
    # Every layer's spin is compute: L of them (the one after the last wait included). Before, the compute read about
    # one spin (and the host's work): the other L - 1 ran inside the waits and were subtracted with them. (A spin's
    # time varies with the host's load: the least of those timed before and after; L - 1.5 of them, not L.)
    spin_s = min(spin_s, _spin_s())
    assert eng.busy_s >= (L - 1.5) * spin_s, (eng.busy_s, spin_s, wall, eng.wait_s)
    # The waits' idle part (about 4 spins' time of each) is still not compute.
    assert eng.busy_s < wall - eng.wait_s / 4, (eng.busy_s, spin_s, wall, eng.wait_s)


def test_the_device_busy_spans_of_a_prefill_are_its_own(ops):
    """`device_busy` holds only this call's device time: a call that raised with a layer still computing (its watch
    still pending) leaves nothing in the next call's spans; a batch without a cached prefix (no callback to wait in)
    watches nothing."""
    from models.runner import PrefillRequest

    slowed = _slowed(ops)
    bpt = ops.kv_layout.bytes_per_token_per_layer
    kv = np.zeros((64, bpt), np.uint8)
    reqs = [PrefillRequest(np.arange(16, dtype=np.int32), 64)]
    _spin_s()  # (compiled)

    def h2d(layer, nbytes):
        if layer == 2:
            raise RuntimeError("stopped")

    try:
        slowed.runner.prefill_layerwise(reqs, lambda layer: [kv], h2d=h2d)
    except RuntimeError:
        pass
    t0 = time.perf_counter()
    res = ops.runner.prefill_layerwise(reqs, lambda layer: [kv], h2d=lambda layer, nbytes: time.sleep(0.05))
    t1 = time.perf_counter()
    # (The raised call's spins may still hold the device up: this call's steps wait behind them, busy time of its own.)
    assert res.device_busy and all(t0 <= s <= e <= t1 for s, e in res.device_busy), (t0, res.device_busy, t1)
    res = slowed.runner.prefill_layerwise([PrefillRequest(np.arange(16, dtype=np.int32), 0)])
    assert res.device_busy == []


def test_calibrate_times_a_jitted_step_until_its_result_is_computed():
    """`time_prefill` / `time_decode` wait for the step's result (its arrays' `block_until_ready`, in a tuple too): a
    jitted step returns before it has computed, and was timed as its dispatch (0.01 ms against ~100 ms)."""
    from schedulers.calibrate import time_decode, time_prefill

    spin_s = _spin_s()
    pre = time_prefill(lambda items: _spin(), [((0, 64),)], repeats=2)[0].seconds
    dec = time_decode(lambda b, ctx: (np.zeros(1), [_spin()]), [(1, 64)], repeats=1, warmup=0)[0].seconds
    assert pre >= spin_s / 2 and dec >= spin_s / 2, (pre, dec, spin_s)
