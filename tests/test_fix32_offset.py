"""Clock offset between hosts (session 49, helper "offset"; session 48's clock audit F3): each node stamps with its own
host's clock and the driver subtracted its own start from every stamp, so a node whose clock was off shifted its turns'
stamps (negative TTFT parts for a clock behind) and, for a DE ahead, held every next turn back by that much real time.
Contract: the node estimates the offset from its fetches (`clock.Offset`, smallest round trip of a recent window), the
driver puts its stamps in its own timebase, and a node of the driver's boot uses the exact difference (0.0)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from _fix32_other_host import BATCHER, ENV

from dualpath_jax import clock
from dualpath_jax.runtime import driver
from dualpath_jax.runtime.scheduler_service import RunFailed


# ------------------------------------------------------------------------------------------------ the estimator
def _exchange(off: clock.Offset, at: float, true_offset: float, out_s: float, back_s: float, handler_s: float = 0.0):
    """One fetch at `at` (this process's clock) to a process whose clock is `true_offset` ahead: the report takes
    `out_s` to arrive, the handler `handler_s`, the reply `back_s`."""
    tr = at + out_s + true_offset
    ts = tr + handler_s
    off.add(at, tr, ts, at + out_s + handler_s + back_s)


def test_the_estimate_is_the_exchange_with_the_smallest_round_trip():
    """Lopsided exchanges are off by up to half their round trip; the fastest one wins, and the handler's own time
    (a policy call under the scheduler's lock) counts in neither the round trip nor the error."""
    off = clock.Offset(window_s=10.0)
    _exchange(off, 100.0, 0.5, out_s=0.030, back_s=0.001, handler_s=0.2)  # slow one way: 14.5 ms off
    assert off.rtt_s == pytest.approx(0.031) and off.seconds == pytest.approx(0.5 + 0.0145)
    _exchange(off, 100.1, 0.5, out_s=0.0002, back_s=0.0003, handler_s=0.5)
    _exchange(off, 100.2, 0.5, out_s=0.010, back_s=0.002)  # (slower: not taken)
    assert off.rtt_s == pytest.approx(0.0005) and off.seconds == pytest.approx(0.5 - 0.00005)
    assert abs(off.seconds - 0.5) <= off.rtt_s / 2
    assert off.exchanges == 3 and not off.exact


def test_the_estimate_follows_drift_past_its_window():
    """The best exchange of long ago is let go after `window_s`: the hosts' clocks drift (here 1 ms/s), and an old
    fast exchange would hold the estimate at that time's offset for the whole run."""
    off = clock.Offset(window_s=2.0)
    _exchange(off, 0.0, 0.100, out_s=0.0001, back_s=0.0001)  # fastest of all
    for i in range(1, 50):  # slower exchanges every 0.1 s; the other clock gains 1 ms a second
        _exchange(off, i * 0.1, 0.100 + i * 0.1 * 1e-3, out_s=0.001, back_s=0.001)
    assert off.rtt_s == pytest.approx(0.002)
    assert off.seconds == pytest.approx(0.100 + 4.9e-3, abs=0.0011)  # not 0.100: the fast one is 4.9 s old


def test_a_node_of_the_drivers_boot_takes_the_exact_difference():
    """Same boot: one monotonic clock, so the `EPOCH`s' difference is the offset, exactly, whatever an exchange says."""
    off = clock.Offset()
    off.same_boot(0.0)
    _exchange(off, 1.0, 0.3, out_s=0.01, back_s=0.0)
    assert (off.seconds, off.rtt_s, off.exact) == (0.0, None, True)
    with pytest.raises(ValueError, match="window_s"):
        clock.Offset(window_s=0)
    with pytest.raises(ValueError, match="finite"):
        clock.Offset().add(0.0, math.nan, 0.0, 0.0)


def test_a_socket_client_on_the_drivers_boot_uses_offset_zero():
    """A node process on the driver's host (every local run) has the driver's boot id and `EPOCH`: offset 0.0, with
    no estimate (no round-trip noise in any single-host result); its reports say so."""
    import os

    from dualpath_jax.runtime.control import ControlServer, GroupReply, GroupReport, SocketControlClient

    seen = []

    def handler(report):
        seen.append((report.clock_offset_s, report.clock_rtt_s))
        return GroupReply()

    key = os.urandom(16)
    server = ControlServer(handler, key)
    try:
        client = SocketControlClient(server.address, key)
        try:
            for _ in range(3):
                client.fetch(GroupReport(node_id=0, role="prefill", engine_ids=[0]))
        finally:
            client.close()
    finally:
        server.close()
    assert client.offset.exact and client.offset.seconds == 0.0 and client.offset.rtt_s is None
    assert seen == [(None, None), (0.0, None), (0.0, None)]


# ------------------------------------------------------------------------------------------------ the scheduler
OFFSETS = {0: 0.25, 1: -0.5, 2: 0.0}  # seconds to add to each node's stamps (its clock 0.25 s behind, 0.5 s ahead)


def test_the_scheduler_takes_each_stamp_by_the_offset_of_the_node_that_made_it(tmp_path, caplog):
    """Events and link bins by their node's offset; the PE's stamps that a DE hands on with its turn_done (its
    hand-over, the only ones where the PE's events come late or never) by the PE's offset, not the DE's. Each
    node's offset in its stats; a warning once per node beyond OFFSET_WARN_S."""
    from test_runtime_scheduler import BS, GROUPS, Clock, make_service

    from dualpath_jax.kv_layout import BlockLayout
    from dualpath_jax.kv_store import LocalDirStore
    from dualpath_jax.metrics import LinkBytes
    from dualpath_jax.runtime.control import Event, GroupReport
    from dualpath_jax.workloads.types import Trajectory, Turn

    store = LocalDirStore(tmp_path / "kv", BlockLayout(2, BS, 8, "test-model"))
    clk = Clock()
    clk.t = 2e9  # (event-clock stamps: seconds since the epoch)
    svc = make_service(store, [Trajectory(0, [Turn(10, 2)])], clk)

    def report(node, events=(), links=(), offset=None):
        g = GROUPS[node]
        return svc.fetch(
            GroupReport(
                node, g.role, g.engine_ids, address={e: f"a{e}" for e in g.engine_ids}, events=list(events),
                link_bytes=list(links), clock_offset_s=OFFSETS[node] if offset is None else offset, clock_rtt_s=1e-3,
            )
        )  # fmt: skip

    try:
        with caplog.at_level(logging.WARNING, logger="dualpath_jax.runtime.scheduler_service"):
            report(1), report(2)
            (task,) = report(0).tasks
            de, t0 = GROUPS[task.decode_engine].node_id, svc.t0

            def on(node, t):  # the driver's time t after the run's start, as `node`'s clock reads it
                return t0 + t - OFFSETS[node]

            pe = {"prefill_start": on(0, 0.1), "prefill_end": on(0, 0.2), "read": [on(0, 0.05), on(0, 0.08), 64]}
            clk.t = t0 + 0.5
            rid, att = task.request_id, task.attempt
            report(de, [
                Event("first_token", rid, att, on(de, 0.3)),
                Event("turn_done", rid, att, on(de, 0.4), {"tokens": np.arange(2, dtype=np.int32), "pe": pe}),
            ])  # fmt: skip
            report(0, links=[LinkBytes("snic/node0", on(0, 1.0), on(0, 1.1), 100)])
            report(0), report(1), report(2)
        rec = svc.records[rid]
        got = [rec.read_start, rec.read_end, rec.prefill_start, rec.prefill_end, rec.first_token, rec.finished]
        assert got == pytest.approx([0.05, 0.08, 0.1, 0.2, 0.3, 0.4], abs=1e-6)
        (bin_,) = [s for s in svc.links if s.nbytes]
        assert (bin_.t0, bin_.t1) == pytest.approx((1.0, 1.1), abs=1e-6)
        assert {n: svc.stats[n]["clock_offset_s"] for n in OFFSETS} == OFFSETS
        warned = sorted(r.getMessage().split("'")[0] for r in caplog.records if "clock is" in r.getMessage())
        assert warned == ["node 0", "node 1"], warned
        with pytest.raises(RunFailed, match=r"node 2 reported clock_offset_s='0\.1': not a number of seconds"):
            report(2, offset="0.1")
    finally:
        store.close()


# ------------------------------------------------------------------------------------------------ a run
AHEAD = {0: -0.5, 1: 0.5}  # the PE's clock 0.5 s behind the driver's, DE node 1's 0.5 s ahead; DE node 2's the same


def test_nodes_on_other_hosts_clocks_report_stamps_in_the_drivers_timebase(
    base, ops, reference_for, monkeypatch, caplog
):
    """Session 48 (/tmp/h48.jiEI/offset.py, a DE 0.5 s behind): allocation and prefill parts down to -0.50 s and
    ttft_queue_mean_s 0.19 s against 0.005 s; a DE 0.5 s ahead: wall_s 16.8 s against 11.7 s, every next turn held
    back. Here real node processes (local launcher), two of them with another host's clock (`_fix32_other_host`):
    each turn's stamps in order within the estimate's round trip, the run ends after its last turn, node_stats give
    each node's offset (the emulated ones' within half their round trip of the truth, node 2's exactly 0.0), the
    driver warns once per off node, and the greedy tokens are the reference's."""
    monkeypatch.setenv(ENV, ",".join(f"{n}:{s}" for n, s in AHEAD.items()))
    cfg = base.replace(
        **{
            "launcher": "local",
            "transport": "tcp",
            "workload.agents": 4,
            "workload.turns": 3,
            "scheduler.batcher": BATCHER,
            "scheduler.batcher_kwargs": {
                "token_budget": base.cluster.prefill_token_budget,
                "max_requests": base.cluster.prefill_max_batch,
            },
            "run_timeout_s": 120.0,
        }
    )
    trajs = driver.make_trajectories(cfg)
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.runtime.scheduler_service"):
        res = driver.run(cfg, trajs)
    ref = reference_for(cfg, ops, trajs)
    assert not res.dead_nodes and len(res.records) == sum(len(t.turns) for t in trajs) == 12
    assert all((res.tokens[k] == ref[k]).all() for k in ref)

    # (each stamp's error is at most half its node's round trip; HEAD: no estimate, 10 ms for the comparisons)
    stats = res.node_stats
    slack = max((stats[n].get("clock_rtt_s") or 0.0 for n in AHEAD), default=0.0) or 0.010

    def ordered(*stamps):
        return all(not math.isnan(a) and a <= b + slack for a, b in zip(stamps, stamps[1:], strict=False))

    for r in res.records:
        assert 0 <= r.arrival <= r.scheduled, r
        assert ordered(r.scheduled, r.read_start, r.read_end, r.first_token, r.finished, res.wall_s), r
        assert ordered(r.scheduled, r.prefill_start, r.prefill_end, r.first_token), r
    for k in ("ttft_queue_mean_s", "ttft_allocation_mean_s", "ttft_read_mean_s", "ttft_prefill_mean_s"):
        assert res.summary[k] >= -slack, (k, res.summary[k])
    for s in res.links:  # (each node's bins in the run's time: none 0.5 s before its start or after its end)
        assert -0.2 <= s.t0 <= s.t1 <= res.wall_s + 1.0, s

    for node, ahead in AHEAD.items():
        off, rtt = stats[node]["clock_offset_s"], stats[node]["clock_rtt_s"]
        assert rtt is not None and 0 <= rtt < 0.1, (node, off, rtt)
        assert abs(off - (-ahead)) <= rtt / 2 + 1e-6, (node, off, rtt)
    assert (stats[2]["clock_offset_s"], stats[2]["clock_rtt_s"]) == (0.0, None)
    warned = [r.getMessage() for r in caplog.records if "clock is" in r.getMessage()]
    assert sorted(w.split("'")[0] for w in warned) == ["node 0", "node 1"], warned
