"""Tests that kill hand mutations of the runtime's pure-logic modules the rest of the suite let pass (a second audit
of the suite, after test_mutation_audit.py: scheduler service, control plane, config, storage NIC, lifecycle and the
driver's summary code). Each test names the mutation of the code it guards against, e.g. "the hit's usable blocks
(prompt - 1) // block_size changed to prompt // block_size". All unit-level: no engine is launched."""

from __future__ import annotations

import logging
import math
import os
import re
import threading

import numpy as np
import pytest
from test_runtime_scheduler import BS, HBM, Clock, fetch, make_service  # the scheduler service test set-up

from dualpath_jax.block_keys import block_keys
from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.kv_store import LocalDirStore
from dualpath_jax.metrics import LinkBytes
from dualpath_jax.runtime.control import Event
from dualpath_jax.runtime.lifecycle import ConversationBook, append_token_ids
from dualpath_jax.runtime.scheduler_service import RunFailed
from dualpath_jax.workloads.types import Trajectory, Turn
from schedulers.api import Assignment, InterEnginePolicy


@pytest.fixture
def store(tmp_path):
    s = LocalDirStore(tmp_path / "kv", BlockLayout(2, BS, 8, "test-model"))
    yield s
    s.close()


def start(svc):
    """Register both DE groups, then the PE group (the run starts); returns the PE fetch's tasks."""
    fetch(svc, 1), fetch(svc, 2)
    return fetch(svc, 0).tasks


def store_prompt_blocks(store, turn, tid=0, turn_index=0):
    for k in block_keys(append_token_ids(turn, 0, tid, turn_index, 50), BS):
        store.write(k, np.zeros(store.layout.full_block_shape, np.uint8))


class FirstFreeDE(InterEnginePolicy):
    """Puts every queued request on PE 0 and the lowest-numbered DE the snapshot shows with room (its tokens only:
    one call may give a DE more requests than its free slots)."""

    name = "first_free_de"

    def schedule(self, snapshot, queue, fetching_node=None):
        des = [e for e in sorted(snapshot.engines) if snapshot.engines[e].role == "decode"]
        free = [e for e in des if snapshot.engines[e].free_hbm_tokens > 0]
        if not free:
            return []
        return [Assignment(p.request_id, 0, free[0], "pe") for p in queue]


class Scripted(InterEnginePolicy):
    """Returns the assignments a function of the queue gives."""

    name = "scripted"

    def __init__(self, fn):
        self.fn = fn

    def schedule(self, snapshot, queue, fetching_node=None):
        return self.fn(queue)


# ---- scheduler service: the hit prefix ----------------------------------------------------------------------


def test_a_prompt_of_whole_blocks_all_stored_still_computes_its_last_block(store):
    """`_requeue_lookup`: usable blocks (prompt - 1) // block_size changed to prompt // block_size. A prompt of
    exactly two blocks, both stored, may load only the first: the last token must be computed for its logits."""
    turn = Turn(2 * BS, 2)
    store_prompt_blocks(store, turn)
    svc = make_service(store, [Trajectory(0, [turn])])
    (task,) = start(svc)
    assert task.prompt_tokens == 2 * BS
    assert task.hit_blocks == 1 and svc.records[task.request_id].hit_tokens == BS


# ---- scheduler service: the policy's view (snapshot) ------------------------------------------------------------


@pytest.mark.parametrize("side", ["pe", "de"])
def test_the_snapshot_counts_a_placed_requests_tokens_room_and_read_queue(store, side):
    """`snapshot`: PEs' free HBM (1 << 40) and DEs' (hbm_tokens) swapped; a DE's free HBM not reduced by its requests'
    total tokens; the PE-side / DE-side queued read tokens charged to the other side's node (in `snapshot` or in
    `_place`); a PE's prefill_end not clearing its node's queued read tokens."""
    turn = Turn(10, 2)
    store_prompt_blocks(store, turn)
    fraction = {"pe": 0.0, "de": 1.0}[side]
    policy = Scripted(lambda q: [Assignment(p.request_id, 0, 1, side, fraction) for p in q])
    svc = make_service(store, [Trajectory(0, [turn])], policy=policy)
    (task,) = start(svc)
    assert task.hit_blocks == 2  # (10 - 1) // 4 blocks
    snap = svc.snapshot()
    assert snap.engines[0].free_hbm_tokens == 1 << 40
    assert snap.engines[2].free_hbm_tokens == HBM
    assert snap.engines[1].free_hbm_tokens == HBM - 12 and snap.engines[1].tok == 12 and snap.engines[1].seq == 1
    assert snap.engines[0].tok == 10 and snap.engines[0].seq == 1
    reads = {n: snap.nodes[n].read_queue_tokens for n in (0, 1, 2)}
    assert reads == ({0: 8, 1: 0, 2: 0} if side == "pe" else {0: 0, 1: 8, 2: 0})
    fetch(svc, 0, [Event("prefill_end", task.request_id, 0, svc.t0 + 0.1, {"hit_tokens": 8})])
    snap = svc.snapshot()
    assert snap.nodes[0].read_queue_tokens == 0 and snap.engines[0].seq == 0
    assert snap.nodes[1].read_queue_tokens == (0 if side == "pe" else 8)  # a DE-side read is done at its read_done
    fetch(
        svc, 1, [Event("read_done", task.request_id, 0, svc.t0 + 0.2, {"side": "de", "nbytes": 1, "t_start": svc.t0})]
    )
    assert svc.snapshot().nodes[1].read_queue_tokens == 0


# ---- scheduler service: placement -------------------------------------------------------------------------------


def test_one_fetch_asks_the_policy_again_once_a_decode_engine_is_full(store):
    """`_schedule`: rounds = 1 + the number of DEs changed to 1. A policy that gives one DE more requests than its
    free slots has the excess held back; within the same fetch it is asked again with that DE shown full, so the
    next DE is filled too (with one round, half the cluster's slots stayed idle until the next PE fetch)."""
    trajs = [Trajectory(i, [Turn(6, 2)]) for i in range(6)]
    svc = make_service(store, trajs, policy=FirstFreeDE(), decode_slots=2)
    tasks = start(svc)
    assert sorted(t.decode_engine for t in tasks) == [1, 1, 2, 2]
    assert [t.trajectory_id for t in tasks] == [0, 1, 2, 3]  # FIFO: the held ones went first in the next round
    assert len(svc._queue) == 2


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda q: [Assignment(q[0].request_id, 0, 1, "pe")] * 2, r"placed request \d+ twice in one call"),
        (
            lambda q: [Assignment(99, 0, 1, "pe")],
            r"placed request 99 which is not in the queue \(unknown or finished\)",
        ),
        (lambda q: [Assignment(q[0].request_id, 1, 0, "pe")], "swapped the engines' roles"),
        (lambda q: [Assignment(q[0].request_id, 0, 7, "pe")], "assigned a dead or unknown engine"),
    ],
    ids=["twice", "unknown-request", "roles-swapped", "unknown-engine"],
)
def test_a_policy_placing_a_request_twice_or_on_swapped_roles_fails_the_run(store, bad, match):
    """`_schedule_once`'s checks: the `a.request_id in seen` test dropped (a request assigned twice in one call was
    sent to its engines twice); the PE/DE role check dropped (a DE given a prefill); the dead-or-unknown engine check."""
    svc = make_service(store, [Trajectory(0, [Turn(6, 2)])], policy=Scripted(bad))
    fetch(svc, 1), fetch(svc, 2)
    with pytest.raises(RunFailed, match=match):
        fetch(svc, 0)
    assert re.search(match, svc.failure)


# ---- scheduler service: events ----------------------------------------------------------------------------------


def test_a_turns_read_spans_the_earliest_start_and_the_latest_end_of_its_sides(store):
    """`_apply_read`: read_start = min(...) changed to max(...), read_end = max(...) changed to min(...). A split
    read's record spans both sides' SNIC reads, whichever reports first."""
    svc = make_service(store, [Trajectory(0, [Turn(6, 2)])])
    (task,) = start(svc)
    rid, t0 = task.request_id, svc.t0
    fetch(svc, 0, [Event("read_done", rid, 0, t0 + 0.3, {"side": "pe", "nbytes": 5, "t_start": t0 + 0.1})])
    fetch(svc, 1, [Event("read_done", rid, 0, t0 + 0.5, {"side": "de", "nbytes": 7, "t_start": t0 + 0.2})])
    rec = svc.records[rid]
    assert (rec.read_start, rec.read_end) == pytest.approx((0.1, 0.5))
    assert (rec.pe_read_bytes, rec.de_read_bytes) == (5, 7)
    fetch(svc, 1, [Event("read_done", rid, 0, t0 + 0.6, {"side": "de", "nbytes": 3, "t_start": t0 + 0.0})])
    assert (rec.read_start, rec.read_end, rec.de_read_bytes) == pytest.approx((0.1, 0.5, 7))  # once per side


# ---- scheduler service: heartbeats ------------------------------------------------------------------------------


def test_a_group_that_never_fetched_is_not_declared_dead_by_heartbeat(store):
    """`check_heartbeats`: `self._last_seen.get(n)` changed to `.get(n, self.t0)`. A group that has not fetched yet
    is still starting (building its model): only the launcher's liveness check may declare it dead."""
    clock = Clock()
    svc = make_service(store, [Trajectory(0, [Turn(6, 2)])], clock)
    fetch(svc, 1), fetch(svc, 2)
    for _ in range(4):
        clock.t += 0.6
        fetch(svc, 1), fetch(svc, 2)
    assert svc.check_heartbeats() == [] and not svc.dead_nodes and svc.failure is None


def test_a_group_silent_for_exactly_the_timeout_is_still_alive(store):
    """`check_heartbeats`: `now - seen > heartbeat_timeout_s` changed to `>=` (the failure's own words: "no fetch for
    X s > heartbeat_timeout_s")."""
    clock = Clock()
    svc = make_service(store, [Trajectory(0, [Turn(6, 2)])], clock, timeout=1.0)
    start(svc)
    clock.t += 1.0
    assert svc.check_heartbeats() == []
    clock.t += 0.25
    assert svc.check_heartbeats() == [0, 1, 2]


class HeadOnly(InterEnginePolicy):
    """Places only the queue's head, on PE 0 and the highest-numbered live DE."""

    name = "head_only"

    def schedule(self, snapshot, queue, fetching_node=None):
        de = max(e for e in snapshot.engines if snapshot.engines[e].role == "decode")
        return [Assignment(queue[0].request_id, 0, de, "pe")] if queue else []


def test_a_dead_decode_nodes_requests_rerun_first_with_their_records_reset(store):
    """`_declare_dead`: re-run requests appended behind the queue instead of put in front (they were admitted before
    anything still queued); the record's read bytes of the dead attempt not reset (its re-run's read added to them)."""
    trajs = [Trajectory(i, [Turn(6, 2)]) for i in range(3)]
    svc = make_service(store, trajs, policy=HeadOnly())
    (task,) = start(svc)
    assert task.trajectory_id == 0 and task.decode_engine == 2
    rid, t0 = task.request_id, svc.t0
    fetch(svc, 0, [Event("read_done", rid, 0, t0 + 0.2, {"side": "pe", "nbytes": 5, "t_start": t0 + 0.1})])
    assert svc.records[rid].pe_read_bytes == 5
    svc.declare_dead(2)
    assert [svc._inflight[r].turn.trajectory_id for r in svc._queue] == [0, 1, 2]
    rec = svc.records[rid]
    assert rec.pe_read_bytes == 0 and rec.de_read_bytes == 0
    assert math.isnan(rec.read_start) and math.isnan(rec.read_end) and rec.arrival == 0.0
    assert math.isnan(rec.scheduled)  # (reset too: a run ending before the re-run is placed showed the dead time)
    (again,) = fetch(svc, 0).tasks
    assert (again.request_id, again.attempt, again.decode_engine) == (rid, 1, 1)
    fetch(svc, 0, [Event("read_done", rid, 1, t0 + 0.5, {"side": "pe", "nbytes": 3, "t_start": t0 + 0.4})])
    assert rec.pe_read_bytes == 3 and (rec.read_start, rec.read_end) == pytest.approx((0.4, 0.5))


# ---- scheduler service: link bytes ------------------------------------------------------------------------------


def test_link_bins_are_run_relative_summed_and_an_idle_snics_marker_kept(store):
    """`links`: wall-clock bins (t0 > 1e9) not converted to run-relative times; the filter `n or t0 == t1` changed
    to `n` (an idle SNIC's zero-length marker bin dropped). Parts of one bin reported in several fetches are summed,
    and a bin taken back to 0 is left out."""
    clock = Clock()
    clock.t = 1.7e9
    svc = make_service(store, [Trajectory(0, [Turn(6, 2)])], clock)
    start(svc)
    t0 = svc.t0
    fetch(svc, 1, link_bytes=[LinkBytes("snic/node1", t0 + 1.0, t0 + 2.0, 100)])
    fetch(svc, 1, link_bytes=[LinkBytes("snic/node1", t0 + 1.0, t0 + 2.0, 50)])
    fetch(svc, 2, link_bytes=[LinkBytes("snic/node2", t0 + 3.0, t0 + 3.0, 0)])  # idle: a marker
    fetch(svc, 2, link_bytes=[LinkBytes("cnic/engine2/low", t0 + 1.0, t0 + 2.0, 9)])
    fetch(svc, 2, link_bytes=[LinkBytes("cnic/engine2/low", t0 + 1.0, t0 + 2.0, -9)])  # taken back
    links = sorted(svc.links, key=lambda s: s.link)
    assert links == [
        LinkBytes("snic/node1", pytest.approx(1.0), pytest.approx(2.0), 150),
        LinkBytes("snic/node2", pytest.approx(3.0), pytest.approx(3.0), 0),
    ]


def test_a_dead_node_leaves_the_directory_and_the_snapshot_and_its_reruns_are_looked_up_again(store):
    """`_fetch`: the directory's dead-node filter dropped (peers kept dialling a dead group's endpoints);
    `snapshot`: dead nodes kept in its `nodes`; `_declare_dead`: the re-run not looked up again (the dead DE may have
    written blocks already: the re-run's hit is what the store holds now)."""
    turn = Turn(10, 2)
    svc = make_service(store, [Trajectory(0, [turn])], policy=HeadOnly())
    (task,) = start(svc)
    assert task.decode_engine == 2 and task.hit_blocks == 0
    assert set(fetch(svc, 1).directory) == {0, 1, 2}
    store_prompt_blocks(store, turn)  # the DE wrote the prompt's blocks before it died
    svc.declare_dead(2)
    assert fetch(svc, 1).directory == {0: (0, "addr0"), 1: (1, "addr1")}
    snap = svc.snapshot()
    assert set(snap.nodes) == {0, 1} and set(snap.engines) == {0, 1}
    (again,) = fetch(svc, 0).tasks
    assert again.attempt == 1 and again.hit_blocks == 2 and svc.records[again.request_id].hit_tokens == 2 * BS


def test_the_run_clock_starts_when_every_group_has_registered(store):
    """`_fetch`: `self.t0 = self.clock()` at the start dropped (the run's times counted from the service's creation,
    model builds and connects included)."""
    clock = Clock()
    svc = make_service(store, [Trajectory(0, [Turn(6, 2)])], clock)
    clock.t += 5.0
    fetch(svc, 1), fetch(svc, 2)
    clock.t += 2.0
    (task,) = fetch(svc, 0).tasks
    assert svc.t0 == 1007.0 and svc.now() == 0.0
    rec = svc.records[task.request_id]
    assert rec.arrival == 0.0 and rec.scheduled == 0.0


# ---- storage NIC ------------------------------------------------------------------------------------------------

SNIC_LAYOUT = BlockLayout(num_layers=2, block_tokens=4, bytes_per_token_per_layer=8, fingerprint="audit2/snic")


def _snic_keys(n, seed=0):
    from dualpath_jax.block_keys import root_key

    ids = np.random.default_rng(seed).integers(0, 1000, n * SNIC_LAYOUT.block_tokens)
    return block_keys(ids, SNIC_LAYOUT.block_tokens, parent=root_key(SNIC_LAYOUT.fingerprint))


def _block(key):
    rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
    return rng.integers(0, 256, SNIC_LAYOUT.full_block_shape, dtype=np.uint8)


def test_the_snic_read_queue_counts_queued_tokens_paces_each_read_block_and_skips_a_cancelled_job(tmp_path):
    """`StorageNIC`: queued read tokens counted as len(keys) instead of len(keys) * block_size, or never taken off
    when a job ends (read_q of the paper); the SNIC not paced per block read; a cancelled job's blocks still read;
    `bytes_read` not counted; a read block not counted in the job's `ok`."""
    from dualpath_jax.runtime.storage_nic import ReadJob, StorageNIC

    store = LocalDirStore(tmp_path / "kv", SNIC_LAYOUT)
    keys = _snic_keys(5)
    for k in keys:
        assert store.write(k, _block(k))
    gate, paced = threading.Event(), []

    def pace(n):
        gate.wait(10)
        paced.append(n)

    snic = StorageNIC(0, store, SNIC_LAYOUT.block_tokens, pace=pace)
    bs, L, bpt = SNIC_LAYOUT.block_tokens, SNIC_LAYOUT.num_layers, SNIC_LAYOUT.bytes_per_token_per_layer
    results, done = {}, threading.Semaphore(0)

    def on_done(job, ok, nbytes, t0, t1):
        results[job.request_id] = (ok, nbytes)
        done.release()

    area1 = np.zeros((L, 2 * bs, bpt), np.uint8)
    area2 = np.zeros((L, 3 * bs, bpt), np.uint8)
    area3 = np.zeros((L, 5 * bs, bpt), np.uint8)
    snic.submit_read(ReadJob(1, 0, keys[:2], 0, area1, on_done))
    cancelled = ReadJob(2, 0, keys[2:5], 2, area3, on_done)
    snic.submit_read(cancelled)
    snic.submit_read(ReadJob(3, 0, keys[2:5], 0, area2, on_done))
    try:
        assert snic.read_queue_tokens == (2 + 3 + 3) * bs
        cancelled.cancelled = True  # (before its turn: job 1 waits in its first block's pacing)
        gate.set()
        for _ in range(3):
            assert done.acquire(timeout=10)
        nb = SNIC_LAYOUT.full_block_nbytes
        assert results == {1: (2, 2 * nb), 2: (0, 0), 3: (3, 3 * nb)}
        assert snic.read_queue_tokens == 0 and paced == [nb] * 5 and snic.bytes_read == 5 * nb
        assert not area3.any()
        np.testing.assert_array_equal(area2[:, bs : 2 * bs], _block(keys[3]))  # job 3's second block
    finally:
        gate.set()
        snic.close()
        store.close()


def test_a_write_back_of_stored_blocks_counts_them_written_without_moving_bytes(tmp_path):
    """`_write_loop`: a block already stored (and whole) not counted in the job's written blocks; `bytes_written` not
    counted for a block it does write."""
    from dualpath_jax.runtime.storage_nic import StorageNIC, WriteJob

    store = LocalDirStore(tmp_path / "kv", SNIC_LAYOUT)
    keys = _snic_keys(3, seed=1)
    assert store.write(keys[0], _block(keys[0]))
    paced = []
    snic = StorageNIC(0, store, SNIC_LAYOUT.block_tokens, pace=paced.append)
    got, done = [], threading.Event()
    try:
        snic.submit_write(WriteJob(keys, [_block(k) for k in keys], lambda n: (got.append(n), done.set())))
        assert done.wait(10)
        nb = SNIC_LAYOUT.full_block_nbytes
        assert got == [3] and paced == [nb, nb] and snic.bytes_written == 2 * nb and snic.pending_writes == 0
        assert all(store.contains(k) for k in keys)
    finally:
        snic.close()
        store.close()


# ---- lifecycle: the conversation book ---------------------------------------------------------------------------


def test_append_ids_are_seeded_by_seed_trajectory_and_turn_and_checked_against_the_vocabulary():
    """`append_token_ids`: the RNG seed [seed, trajectory_id, turn_index] reordered (another run of the same config
    would see other conversations than a run before the change); the vocabulary bound `>= vocab_size` changed to
    `> vocab_size` (an id equal to the vocabulary size passed)."""
    turn = Turn(6, 2)
    want = np.random.default_rng([3, 1, 2]).integers(0, 50, size=6, dtype=np.int32)
    np.testing.assert_array_equal(append_token_ids(turn, 3, 1, 2, 50), want)
    own = Turn(3, 2, append_token_ids=[0, 49, 50])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        append_token_ids(own, 0, 0, 0, 50)
    np.testing.assert_array_equal(append_token_ids(Turn(2, 2, append_token_ids=[0, 49]), 0, 0, 0, 50), [0, 49])


def test_the_book_refuses_out_of_order_repeated_or_wrong_length_completions():
    """`ConversationBook.complete`: the "completed twice", "turn i completed but turn j is current" and generated-length
    checks dropped (each corrupts the next prompt); duplicate trajectory ids accepted."""
    trajs = [Trajectory(0, [Turn(4, 2), Turn(3, 2)]), Trajectory(1, [Turn(5, 1)])]
    book = ConversationBook(trajs, vocab_size=50)
    with pytest.raises(ValueError, match="unique"):
        ConversationBook([Trajectory(0, [Turn(4, 2)]), Trajectory(0, [Turn(4, 2)])], vocab_size=50)
    reqs = {r.trajectory_id: r for r in book.pop_due(0.0)}
    turn1_id = book._request_ids[(0, 1)]
    with pytest.raises(RuntimeError, match="turn 1 completed but turn 0 is current"):
        book.complete(turn1_id, np.zeros(2, np.int32), 1.0)
    with pytest.raises(RuntimeError, match="got 3 tokens, expected 2"):
        book.complete(reqs[0].request_id, np.zeros(3, np.int32), 1.0)
    book.complete(reqs[0].request_id, np.array([7, 8], np.int32), 1.0)
    with pytest.raises(RuntimeError, match="completed twice"):
        book.complete(reqs[0].request_id, np.array([7, 8], np.int32), 1.0)
    assert book.completed_turns == 1 and not book.done


def test_a_next_turn_is_due_its_gap_after_the_previous_one_finished_and_empty_agents_are_skipped():
    """`complete`: the next turn's readiness computed from 0 instead of the previous turn's finish; `__init__`: an
    agent without turns pushed on the due heap (its first pop was an IndexError); `pop_due`: `<= now` changed to
    `< now` (a turn due exactly now waited for the next fetch)."""
    trajs = [Trajectory(0, [Turn(4, 1, gap_s=0.5), Turn(2, 1, gap_s=0.5)]), Trajectory(1, [])]
    book = ConversationBook(trajs, vocab_size=50)
    (r0,) = book.pop_due(0.0)
    assert book.next_arrival() == math.inf and book.total_turns == 2
    book.complete(r0.request_id, np.array([9], np.int32), 2.0)
    assert book.next_arrival() == pytest.approx(2.5)
    assert book.pop_due(2.4) == []
    (r1,) = book.pop_due(2.5)
    assert r1.turn_index == 1 and r1.arrival == pytest.approx(2.5) and r1.prompt_ids.shape == (4 + 1 + 2,)
    np.testing.assert_array_equal(r1.prompt_ids[:5], np.concatenate([r0.prompt_ids, [9]]))


def test_tiny_agents_open_with_the_long_first_append_and_vary_within_half_their_mean():
    """`tiny_trajectories`: the first append's mean used for turn 1 instead of turn 0; the +-50% spread of the
    generated lengths narrowed (uniform(0.5, 1.0): never longer than the mean)."""
    from dualpath_jax.runtime.lifecycle import tiny_trajectories

    trajs = tiny_trajectories(agents=40, turns=3, append_tokens=10, gen_tokens=20, first_append_tokens=400, seed=0)
    firsts = [t.turns[0].append_tokens for t in trajs]
    laters = [x.append_tokens for t in trajs for x in t.turns[1:]]
    gens = [x.gen_tokens for t in trajs for x in t.turns]
    assert min(firsts) >= 200 and max(firsts) <= 600 and max(laters) <= 15
    assert min(gens) >= 10 and max(gens) <= 30 and max(gens) > 25 and min(gens) < 15


# ---- driver: summary, policy config, layout and pre-run checks -------------------------------------------------


def test_the_link_summary_counts_snic_bytes_and_only_the_low_class_as_cnic_kv():
    """`_link_summary`: CNIC KV bytes counted over both classes (model traffic, class high, counted as KV);
    snic_max_bytes the sum of the SNICs instead of the busiest one."""
    from dualpath_jax.runtime.driver import _link_summary

    links = [
        LinkBytes("snic/node0", 0.0, 1.0, 100),
        LinkBytes("snic/node0", 1.0, 2.0, 50),
        LinkBytes("snic/node1", 0.0, 1.0, 30),
        LinkBytes("cnic/engine0/low", 0.0, 1.0, 7),
        LinkBytes("cnic/engine1/low", 0.0, 1.0, 5),
        LinkBytes("cnic/engine1/high", 0.0, 1.0, 1000),
    ]
    out = _link_summary(links)
    assert out["snic_total_bytes"] == 180 and out["snic_max_bytes"] == 150
    assert out["cnic_kv_bytes"] == 12
    assert out["link_bytes"]["snic/node0"] == 150 and out["link_bytes"]["cnic/engine1/high"] == 1000


@pytest.mark.parametrize("name", ["dualpath", "de_only", "pe_only", "split"])
def test_dualpath_alpha_is_3_s_of_snic_reads_and_beta_5_s_of_prefill(name):
    """`policy_kwargs` (PAPER.md "PE (Algorithm 1)": α = tokens one node can read in 3 s, β = tokens one GPU processes
    in 5 s): the 3 s or 5 s changed; a DualPath-family policy left unfilled (its α/β defaulted to the
    policy's own); the runtime's block size not passed."""
    from dualpath_jax.runtime.config import RuntimeConfig
    from dualpath_jax.runtime.driver import policy_kwargs

    cfg = RuntimeConfig().replace(**{"scheduler.name": name, "nics.snic_bytes_per_s": 4e6, "block_size": 8})
    kw = policy_kwargs(cfg, kv_bytes_per_token=1000, prefill_tokens_per_s=300.0)
    assert kw == {"alpha_tokens": 12000, "beta_tokens": 1500, "block_size": 8}
    given = cfg.replace(**{"scheduler.policy_kwargs": {"alpha_tokens": 5}})
    assert policy_kwargs(given, 1000, 300.0)["alpha_tokens"] == 5
    assert policy_kwargs(cfg.replace(**{"scheduler.name": "round_robin"}), 1000) == {}


def test_layout_groups_numbers_prefill_nodes_first_and_engines_node_by_node():
    """`layout_groups`: `n < prefill_nodes` changed to `<=` (one decode node made a prefill node)."""
    from dualpath_jax.runtime.config import RuntimeConfig
    from dualpath_jax.runtime.driver import layout_groups

    cfg = RuntimeConfig().replace(
        **{"cluster.prefill_nodes": 2, "cluster.decode_nodes": 1, "cluster.engines_per_node": 2}
    )
    groups = [(g.node_id, g.role, g.engine_ids) for g in layout_groups(cfg)]
    assert groups == [(0, "prefill", [0, 1]), (1, "prefill", [2, 3]), (2, "decode", [4, 5])]
    assert cfg.num_prefill_engines == 4 and cfg.num_decode_engines == 2


def test_the_shortest_tiny_last_turn_is_what_just_fits_max_seq_len():
    """`_check_tiny_fits`: the shortest last turn counted with `turns` appends after the first instead of
    `turns - 1`, or with lengths at 40% of their means instead of 50% (a workload that fits was refused, or one
    that cannot was let through)."""
    from dualpath_jax.runtime.config import ConfigError, RuntimeConfig
    from dualpath_jax.runtime.driver import _check_tiny_fits

    # least lengths: first append 50, gen 5 x 3 turns, append 10 x 2: 50 + 15 + 20 = 85
    w = {"workload.turns": 3, "workload.first_append_tokens": 100, "workload.gen_tokens": 10}
    w["workload.append_tokens"] = 20
    # (a slot holds prompt + generation - 1 tokens: 85 fits max_seq_len 84; tests/test_fix15_small.py)
    _check_tiny_fits(RuntimeConfig().replace(**w, **{"cluster.max_seq_len": 84}))
    with pytest.raises(ConfigError, match="reach 85 tokens or more"):
        _check_tiny_fits(RuntimeConfig().replace(**w, **{"cluster.max_seq_len": 83}))


def test_the_pre_run_workload_checks_accept_their_edge_values():
    """`_check_trajectory_ids` (`tid < 0` changed to `<= 0`: id 0 refused), `_check_turn_lengths` (`gen_tokens < 1`
    changed to `< 0`: a turn generating nothing let through), `_check_token_ids` (`>= vocab_size` changed to `>`)."""
    from dualpath_jax.runtime.config import ConfigError
    from dualpath_jax.runtime.driver import _check_token_ids, _check_trajectory_ids, _check_turn_lengths

    _check_trajectory_ids([Trajectory(0, [Turn(3, 1)]), Trajectory(1, [Turn(3, 1)])])
    _check_turn_lengths([Trajectory(0, [Turn(3, 1)])])
    with pytest.raises(ConfigError, match="turn 1 generates 0 tokens"):
        _check_turn_lengths([Trajectory(0, [Turn(3, 1), Turn(2, 0)])])
    _check_token_ids([Trajectory(0, [Turn(2, 1, append_token_ids=np.array([0, 49]))])], 50)
    with pytest.raises(ConfigError, match=r"token ids in \[0, 50\]"):
        _check_token_ids([Trajectory(0, [Turn(2, 1, append_token_ids=np.array([0, 50]))])], 50)


def test_cleanup_store_removes_only_a_runs_own_temporary_store(tmp_path):
    """`cleanup_store`: the `dualpath_store_` name check dropped (a kept store directory, or any directory passed,
    deleted with everything in it)."""
    from dualpath_jax.runtime.driver import cleanup_store

    kept = tmp_path / "my_store"
    kept.mkdir()
    (kept / "block").write_bytes(b"x")
    cleanup_store(str(kept))
    assert (kept / "block").exists()
    own = tmp_path / "dualpath_store_abc"
    own.mkdir()
    (own / "block").write_bytes(b"x")
    cleanup_store(str(own))
    assert not own.exists()


# ---- config: defaults and validation ----------------------------------------------------------------------------


def _cfg(**kw):
    from dualpath_jax.runtime.config import RuntimeConfig

    return RuntimeConfig().replace(**kw)


def test_the_default_cnic_share_of_model_traffic_is_the_papers_99_percent():
    """NicConfig.high_priority_share (PAPER.md "QoS": ~99% to model traffic under contention) changed from 0.99."""
    from dualpath_jax.runtime.config import NicConfig, RuntimeConfig

    assert NicConfig().high_priority_share == 0.99 and RuntimeConfig().nics.high_priority_share == 0.99


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"nics.high_priority_share": 1 - 1e-9}, "leaves a class 1e-09 of a CNIC"),
        ({"scheduler.heartbeat_timeout_s": 0.005}, "must exceed fetch_interval_s"),
        ({"workload.gap_s": math.inf}, "config.workload.gap_s must be >= 0 and finite"),
        ({"workload.agents": 0}, "config.workload.agents must be >= 1"),
        ({"workload.seed": -1}, "config.workload.seed must be >= 0"),
        ({"workload.max_context_tokens": -1}, "config.workload.max_context_tokens must be >= 0"),
    ],
    ids=["share-near-1", "heartbeat-eq-fetch", "gap-inf", "tiny-agents-0", "seed-neg", "max-context-neg"],
)
def test_edge_values_just_outside_the_valid_ranges_are_config_errors(fields, match):
    """`validate` / `validate_workload`: the upper bound of high_priority_share (1 - MIN_CLASS_SHARE) dropped;
    heartbeat_timeout_s > fetch_interval_s made >=; gap_s's finiteness check dropped; workload.agents allowed 0 for
    every kind (it means "all" for traces only); seed >= 0 made >= -1; max_context_tokens >= 0 made >= -1."""
    from dualpath_jax.runtime.config import ConfigError, validate, validate_workload

    cfg = _cfg(**fields)
    with pytest.raises(ConfigError, match=re.escape(match)):
        validate_workload(cfg)
        validate(cfg)
    assert validate_workload(_cfg(**{"workload.kind": "trace", "workload.agents": 0})) is None


def test_a_node_buffer_is_shared_by_its_engines_and_a_prompt_of_max_seq_len_fits():
    """`validate`: a node's buffer checked whole instead of per engine (`have // g`); a longest prompt of exactly
    max_seq_len tokens refused (`>` made `>=`)."""
    from dualpath_jax.runtime.config import ConfigError, validate

    # 100 B/token over 1 layer, 16-token blocks: a Layer Block is 1600 B; a 16-token prompt needs one per engine
    two = {"cluster.engines_per_node": 2, "cluster.max_seq_len": 16}
    validate(_cfg(**two, **{"buffers.pe_buffer_bytes": 3200, "buffers.de_buffer_bytes": 3200}), 100, 16, 1)
    with pytest.raises(ConfigError, match="config.buffers.pe_buffer_bytes=3199 B cannot hold one request"):
        validate(_cfg(**two, **{"buffers.pe_buffer_bytes": 3199, "buffers.de_buffer_bytes": 3200}), 100, 16, 1)
    with pytest.raises(ConfigError, match="shorter than the longest prompt"):
        validate(_cfg(**two, **{"buffers.pe_buffer_bytes": 6400, "buffers.de_buffer_bytes": 6400}), 100, 17, 1)


def test_host_memory_checks_count_every_node_and_every_decode_slot(monkeypatch):
    """`_all_buffer_bytes`: PE and DE node counts swapped; `_validate_decode_cache_memory`: the decode cache counted
    for one slot instead of decode_slots; `_buffer_bytes_per_process` (RDMA memlock): max of the two buffers made
    min; `host_memory_bytes`: a cgroup limit above physical memory taken as the limit."""
    from dualpath_jax.runtime import config as rc

    monkeypatch.setattr(rc, "host_memory_bytes", lambda: (600, "a test limit"))
    nodes = {"cluster.prefill_nodes": 1, "cluster.decode_nodes": 2, "buffers.pe_buffer_bytes": 100}
    with pytest.raises(rc.ConfigError, match="need 700 B"):  # 1 x 100 + 2 x 300
        rc.validate(_cfg(**nodes, **{"buffers.de_buffer_bytes": 300}))
    assert rc._buffer_bytes_per_process(_cfg(**nodes, **{"buffers.de_buffer_bytes": 300})) == 300
    assert rc._buffer_bytes_per_process(_cfg(**nodes, launcher="inprocess", **{"buffers.de_buffer_bytes": 300})) == 700
    # (1-B buffers: the decode caches' bounds below; buffers + caches together: tests/test_fix15_small.py)
    small = _cfg(**{**nodes, "buffers.pe_buffer_bytes": 1, "buffers.de_buffer_bytes": 1})
    small = small.replace(**{"cluster.decode_slots": 4, "cluster.max_seq_len": 16})
    rc.validate(small.replace(**{"cluster.decode_nodes": 1}), kv_bytes_per_token=9)  # 4 x 16 x 9 = 576 B <= 600
    with pytest.raises(rc.ConfigError, match=r"= 640 B"):  # 4 x 16 x 10
        rc.validate(small, kv_bytes_per_token=10)
    # every decode engine's cache is on this host (2026-12-05: one engine's was all that was checked)
    rc.validate(small, kv_bytes_per_token=4)  # 2 engines x 4 x 16 x 4 = 512 B <= 600
    with pytest.raises(
        rc.ConfigError, match=r"the 2 decode engines of launcher 'local' all run on this host and need 640"
    ):
        rc.validate(small, kv_bytes_per_token=5)  # 2 x 320 B
    rc._validate_decode_cache_memory(small.replace(launcher="ray"), 5)  # (other hosts: not checked here)


def test_a_cgroup_limit_above_physical_memory_is_not_the_limit(monkeypatch):
    """`host_memory_bytes`: `0 < limit < physical` made `0 < limit` (a cgroup's "max"-like huge limit raised the
    host's memory above what it has)."""
    import builtins
    import io

    from dualpath_jax.runtime import config as rc

    phys = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    real_open = builtins.open

    def fake_open(path, *a, **k):
        if str(path) in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
            return io.StringIO(str(10 * 2**60))
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)
    assert rc.host_memory_bytes() == (phys, "this host's physical memory")


def test_an_empty_rdma_device_means_the_first_device():
    """`rdma_endpoint_kwargs`: config.rdma.device "" passed as "" instead of None (the first device)."""
    from dualpath_jax.runtime.config import RuntimeConfig, rdma_endpoint_kwargs

    assert rdma_endpoint_kwargs(RuntimeConfig()) == {
        "device": None,
        "ib_port": 1,
        "gid_index": 0,
        "sl_high": 0,
        "sl_low": 0,
    }
    assert rdma_endpoint_kwargs(_cfg(**{"rdma.device": "mlx5_1"}))["device"] == "mlx5_1"


def test_the_pd_range_is_checked_only_when_both_nics_are_paced(caplog, monkeypatch):
    """`_warn_pd_range`: links "unpaced" when either cap is >= 1e11 (a ratio against an unpaced link means nothing: a
    netns warm-up, unpaced SNIC against the kernel-kept CNIC, warned s=31250; session 41 made `min` `max`, which this
    test pinned the other way before); both paced: judged."""
    from dualpath_jax.runtime import config as rc
    from dualpath_jax.runtime.config import _warn_pd_range

    monkeypatch.setattr(rc, "_WARNED", set())  # (each setting warns once per process)
    cfg = _cfg(**{"nics.snic_bytes_per_s": 1e12, "nics.cnic_bytes_per_s": 3.7e6, "cluster.prefill_nodes": 3})
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.runtime.config"):
        _warn_pd_range(cfg)
    assert "bottleneck-free" not in caplog.text
    cfg = _cfg(**{"nics.snic_bytes_per_s": 3.7e6, "nics.cnic_bytes_per_s": 3.7e6, "cluster.prefill_nodes": 3})
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.runtime.config"):
        _warn_pd_range(cfg)
    assert "there is none when s > g/2" in caplog.text


def test_scaled_workloads_keep_at_most_turns_turns():
    """`_scaled`: the cut to `workload.turns` turns dropped (synthetic and trace agents ran every turn)."""
    from dualpath_jax.runtime.driver import _scaled

    w = _cfg(**{"workload.turns": 2, "workload.scale": 0.5, "workload.time_scale": 2.0}).workload
    t = Trajectory(3, [Turn(10, 4, gap_s=1.0), Turn(6, 3, gap_s=1.5), Turn(8, 2)], arrival_time=4.0)
    (out,) = _scaled([t], w)
    assert [(x.append_tokens, x.gen_tokens, x.gap_s) for x in out.turns] == [(5, 2, 2.0), (3, 2, 3.0)]
    assert out.trajectory_id == 3 and out.arrival_time == 8.0


def test_arrivals_and_last_turns_past_the_run_timeout_are_refused_before_start():
    """`_check_arrivals_within_timeout`: trace timestamps left out of the first-arrival check (only online checked);
    `_check_last_turns_within_timeout`: `len(turns) > 1` made `> 2` (a two-turn agent whose second turn can never
    arrive in time let through)."""
    from dualpath_jax.runtime.config import ConfigError
    from dualpath_jax.runtime.driver import _check_arrivals_within_timeout

    cfg = _cfg(run_timeout_s=10.0, **{"workload.arrival": "trace"})
    _check_arrivals_within_timeout(cfg, [Trajectory(0, [Turn(4, 1)], arrival_time=9.0)])
    with pytest.raises(ConfigError, match="last of 1 agents arrives at 20 s"):
        _check_arrivals_within_timeout(cfg, [Trajectory(0, [Turn(4, 1)], arrival_time=20.0)])
    offline = _cfg(run_timeout_s=10.0)
    _check_arrivals_within_timeout(offline, [Trajectory(0, [Turn(4, 1, gap_s=9.0), Turn(2, 1)])])
    with pytest.raises(ConfigError, match="turn 1 arrives at 11 s"):
        _check_arrivals_within_timeout(offline, [Trajectory(0, [Turn(4, 1, gap_s=11.0), Turn(2, 1)])])


def test_a_turn_of_exactly_max_seq_len_tokens_is_accepted():
    """`prepare`: the longest turn's check `prompt + generation > max_seq_len + 1` loosened by one token (a slot holds
    prompt + generation - 1 tokens of KV: the last generated token is never fed back; tests/test_fix15_small.py)."""
    import types

    from dualpath_jax.runtime.config import ConfigError
    from dualpath_jax.runtime.driver import prepare

    ops = types.SimpleNamespace(config=types.SimpleNamespace(batch_invariant=False))
    cfg = _cfg(**{"cluster.max_seq_len": 16})
    trajs, got = prepare(cfg, [Trajectory(0, [Turn(10, 7)])], model_ops=ops)
    assert got is ops and len(trajs) == 1
    with pytest.raises(ConfigError, match=r"longest turn \(prompt \+ generation = 18 tokens\)"):
        prepare(cfg, [Trajectory(0, [Turn(10, 8)])], model_ops=ops)


def test_a_config_dict_integer_field_takes_whole_floats_only():
    """`_coerce`: the `int(value) != value` test dropped (decode_slots=2.5 from a config file silently became 2)."""
    from dualpath_jax.runtime.config import ConfigError, RuntimeConfig

    cfg = RuntimeConfig.from_config_dict({"cluster": {"decode_slots": 3.0}})
    assert cfg.cluster.decode_slots == 3 and type(cfg.cluster.decode_slots) is int
    with pytest.raises(ConfigError, match=re.escape("config.cluster.decode_slots must be an integer, got 2.5")):
        RuntimeConfig.from_config_dict({"cluster": {"decode_slots": 2.5}})
