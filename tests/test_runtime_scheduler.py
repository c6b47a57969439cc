"""The global scheduler service on its own (no jax): hits from the store, placement on PE fetches, heartbeats,
re-queue with a new attempt, stale events ignored, every turn completed exactly once.

The test plays the engine groups: it calls `fetch` with `GroupReport`s exactly as a group leader does.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import schedulers
from dualpath_jax.block_keys import block_keys
from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.kv_store import LocalDirStore
from dualpath_jax.runtime.control import Event, GroupReport
from dualpath_jax.runtime.lifecycle import ConversationBook
from dualpath_jax.runtime.scheduler_service import GlobalScheduler, GroupSpec, RunFailed
from dualpath_jax.workloads.types import Trajectory, Turn
from schedulers.api import InterEnginePolicy

BS = 4
GROUPS = [GroupSpec(0, "prefill", [0]), GroupSpec(1, "decode", [1]), GroupSpec(2, "decode", [2])]
HBM = 4096  # KV tokens of HBM per decode engine


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def store(tmp_path):
    s = LocalDirStore(tmp_path / "kv", BlockLayout(2, BS, 8, "test-model"))
    yield s
    s.close()


def make_service(store, trajs, clock=None, policy="round_robin", timeout=1.0, decode_slots=None, **policy_kwargs):
    """A GlobalScheduler over GROUPS and `store`; `policy`: a registered name (with `policy_kwargs`) or a policy."""
    book = ConversationBook(trajs, vocab_size=50, seed=0)
    pol = policy if isinstance(policy, InterEnginePolicy) else schedulers.make_policy(policy, **policy_kwargs)
    return GlobalScheduler(
        GROUPS,
        pol,
        book,
        lookup_hit_blocks=store.lookup,
        block_keys_of=lambda ids: block_keys(ids, BS),
        block_size=BS,
        hbm_tokens_per_decode_engine=HBM,
        heartbeat_timeout_s=timeout,
        clock=clock or Clock(),
        decode_slots=decode_slots,
    )


def fetch(svc, node, events=(), link_bytes=()):
    g = GROUPS[node]
    return svc.fetch(
        GroupReport(
            node,
            g.role,
            g.engine_ids,
            address={e: f"addr{e}" for e in g.engine_ids},
            events=list(events),
            link_bytes=list(link_bytes),
        )
    )


def done_event(svc, task, t, tokens=None):
    toks = np.arange(task.gen_tokens, dtype=np.int32) if tokens is None else tokens
    return Event("turn_done", task.request_id, task.attempt, svc.t0 + min(t, svc.now()), {"tokens": toks})


def test_hit_is_the_stored_prefix_and_placement_happens_on_pe_fetch(store):
    trajs = [Trajectory(0, [Turn(10, 2), Turn(3, 2)]), Trajectory(1, [Turn(9, 1)])]
    clock = Clock()
    svc = make_service(store, trajs, clock)
    assert fetch(svc, 1).tasks == [] and not svc.started  # not every group registered yet
    fetch(svc, 2)
    assert fetch(svc, 1).tasks == []  # a DE fetch never places
    pe = fetch(svc, 0)
    assert svc.started and len(pe.tasks) == 2 and pe.directory[2] == (2, "addr2")
    for t in pe.tasks:
        assert t.hit_blocks == 0 and t.prefill_engine == 0 and t.decode_engine in (1, 2)
    de_tasks = fetch(svc, 1).tasks + fetch(svc, 2).tasks
    assert sorted(t.request_id for t in de_tasks) == sorted(t.request_id for t in pe.tasks)
    # Turn 0 of trajectory 0 finishes; its prompt + generation are persisted: turn 1's hit is the stored prefix.
    t0 = next(t for t in pe.tasks if t.trajectory_id == 0)
    gen = np.array([7, 8], np.int32)
    full = np.concatenate([t0.prompt_ids, gen[:-1]])  # the last generated token's KV is never computed
    for k in block_keys(full, BS):
        store.write(k, np.zeros(store.layout.full_block_shape, np.uint8))
    fetch(svc, t0.decode_engine, [done_event(svc, t0, 0.5, gen)])
    nxt = fetch(svc, 0).tasks
    assert len(nxt) == 1 and nxt[0].turn_index == 1
    assert nxt[0].prompt_tokens == 10 + 2 + 3
    assert nxt[0].hit_blocks == 11 // BS  # blocks of the 11 tokens with KV; the prompt's tail is computed
    np.testing.assert_array_equal(nxt[0].prompt_ids[10:12], gen)  # real generated tokens in the next prompt


def test_a_decode_engine_with_every_slot_taken_reports_no_room(store):
    """A runtime DE holds `decode_slots` requests whatever their lengths. Its room used to be counted in tokens
    only (slots x max_seq_len minus the placed tokens), so short requests were placed beyond its slots and waited
    there holding host buffers, invisible to the policy."""
    trajs = [Trajectory(i, [Turn(6, 2)]) for i in range(6)]
    svc = make_service(store, trajs, Clock(), policy="dualpath", decode_slots=2)
    fetch(svc, 1), fetch(svc, 2)
    placed = fetch(svc, 0).tasks
    placed += fetch(svc, 0).tasks  # a later fetch sees the DEs' slots taken
    per_de = {de: sum(t.decode_engine == de for t in placed) for de in (1, 2)}
    snap = svc.snapshot()
    for de, n in per_de.items():
        free = snap.engines[de].free_hbm_tokens
        assert free == max(0, 2 - n) * (4096 // 2), (de, n, free)
    # no later fetch adds to a full DE
    assert all(per_de[t.decode_engine] < 2 for t in fetch(svc, 0).tasks)


@pytest.mark.parametrize("policy", ["dualpath", "round_robin", "de_only", "random"])
def test_one_fetch_places_no_more_requests_on_a_decode_engine_than_its_free_slots(store, policy):
    """Within one fetch a policy counts a DE's room in tokens only: short requests fit a DE's slots x max_seq_len
    tokens many times over, so one fetch used to place all six of these requests on two DEs of two slots each (they
    then waited at the DEs, holding host buffers, invisible to the policy). The excess now stays queued, in order,
    and goes once slots are free again."""
    trajs = [Trajectory(i, [Turn(6, 2)]) for i in range(6)]
    svc = make_service(store, trajs, Clock(), policy=policy, decode_slots=2)
    fetch(svc, 1), fetch(svc, 2)
    first = fetch(svc, 0).tasks
    per_de = {de: sum(t.decode_engine == de for t in first) for de in (1, 2)}
    assert per_de == {1: 2, 2: 2}, per_de  # both DEs filled in the one fetch, none beyond its slots
    assert fetch(svc, 0).tasks == []  # every slot taken: the rest waits in the queue
    queued = [svc._inflight[r].turn.trajectory_id for r in svc._queue]
    placed = sorted(t.trajectory_id for t in first)
    assert queued == sorted(set(range(6)) - set(placed)), "held requests keep their queue order"
    done = first[0]
    fetch(svc, done.decode_engine, [done_event(svc, done, 0.1)])
    (nxt,) = fetch(svc, 0).tasks  # one slot freed: exactly one more request, the head of the queue
    assert nxt.decode_engine == done.decode_engine and nxt.trajectory_id == queued[0]


def test_a_policy_that_queues_at_full_decode_engines_is_left_alone(store):
    """round_robin full_de="queue" gives a DE its requests room or not (they wait at the DE, the simulator's DE
    allocation queue): the slot limit does not override that documented choice."""
    trajs = [Trajectory(i, [Turn(6, 2)]) for i in range(6)]
    svc = make_service(store, trajs, Clock(), decode_slots=2, full_de="queue")
    fetch(svc, 1), fetch(svc, 2)
    assert len(fetch(svc, 0).tasks) == 6


def test_dead_decode_node_requests_rerun_exactly_once(store):
    trajs = [Trajectory(i, [Turn(6, 2), Turn(2, 2)]) for i in range(4)]
    clock = Clock()
    svc = make_service(store, trajs, clock, timeout=1.0)
    fetch(svc, 1), fetch(svc, 2)
    tasks = fetch(svc, 0).tasks
    on2 = [t for t in tasks if t.decode_engine == 2]
    assert on2, "round robin must place something on DE 2"
    # Node 2 falls silent; the others keep fetching.
    clock.t += 0.6
    fetch(svc, 0), fetch(svc, 1)
    clock.t += 0.6
    fetch(svc, 0), fetch(svc, 1)
    assert svc.check_heartbeats() == [2]
    assert fetch(svc, 2).shutdown  # a dead group that comes back is told to stop
    rerun = fetch(svc, 0)
    assert {c.request_id for c in rerun.cancels} == {t.request_id for t in on2}
    again = {t.request_id: t for t in rerun.tasks}
    assert set(again) == {t.request_id for t in on2}
    assert all(t.attempt == 1 and t.decode_engine == 1 for t in again.values())
    # The dead DE's late completion (attempt 0) is ignored; the re-run's completes the turn once.
    stale = on2[0]
    fetch(svc, 1, [done_event(svc, stale, 1.5)])
    assert svc.progress()[0] == 0
    live = [t for t in tasks if t.decode_engine == 1] + list(again.values())
    fetch(svc, 1, [done_event(svc, t, 2.0) for t in live])
    assert svc.progress() == (4, 8)
    fetch(svc, 1, [done_event(svc, again[stale.request_id], 2.1)])  # a duplicate report changes nothing
    assert svc.progress() == (4, 8) and svc.requeued == len(on2)
    # Second turns: only DE 1 is left.
    for _ in range(3):
        for t in fetch(svc, 0).tasks:
            assert t.decode_engine == 1
            fetch(svc, 1, [done_event(svc, t, 3.0)])
    assert svc.book.done and len(svc.finished_records()) == 8


def test_unknown_event_and_bad_fetch_fail_clearly(store):
    trajs = [Trajectory(0, [Turn(6, 2)])]
    svc = make_service(store, trajs, Clock())
    fetch(svc, 1), fetch(svc, 2)
    task = fetch(svc, 0).tasks[0]
    with pytest.raises(RunFailed, match="unknown event kind 'teleported'"):
        fetch(svc, 1, [Event("teleported", task.request_id, 0, svc.t0)])
    with pytest.raises(RunFailed, match="fetch from unknown node 7"):
        svc.fetch(GroupReport(7, "decode", [9]))
    fetch(svc, 1, [Event("error", -1, 0, svc.t0, {"message": "boom"})])
    assert "boom" in svc.failure


def test_no_live_prefill_node_left_fails_the_run(store):
    """Placement runs on PE fetches, so with every PE node dead nobody would ever say the run cannot finish: the
    service fails it when the last PE (or DE) node dies, also before the run started (nodes that exited at start)."""
    clock = Clock()
    svc = make_service(store, [Trajectory(0, [Turn(6, 2), Turn(3, 2)])], clock)
    fetch(svc, 1), fetch(svc, 2)
    assert fetch(svc, 0).tasks
    svc.declare_dead(1)
    assert svc.failure is None  # DE 2 is left
    svc.declare_dead(0)
    assert svc.failure == (
        "no live prefill or decode engine left (dead: [0, 1]): node 0: its process or thread exited; "
        "node 1: its process or thread exited"
    )
    assert fetch(svc, 2).shutdown
    unstarted = make_service(store, [Trajectory(0, [Turn(6, 2)])], Clock())
    for node in (1, 2):
        unstarted.declare_dead(node)
    assert not unstarted.started and "no live prefill or decode engine left" in unstarted.failure


def test_a_bad_report_over_the_socket_fails_the_run_naming_it(store, caplog):
    """A report the service cannot apply (an unknown event kind, an event missing its data) sent through the control
    server: the group's connection is dropped and the run fails naming the problem (it used to die in the server
    thread, leaving the run to wait for heartbeats and fail, if at all, without the reason)."""
    import logging

    from dualpath_jax.runtime.control import ControlServer, SocketControlClient

    for bad, message in [
        (lambda t: Event("teleported", t.request_id, 0, 0.0), "unknown event kind 'teleported' from node 1"),
        (lambda t: Event("read_done", t.request_id, 0, 0.0), "fetch from node 1 failed: KeyError('side')"),
    ]:
        svc = make_service(store, [Trajectory(0, [Turn(6, 2)])], Clock())
        fetch(svc, 1), fetch(svc, 2)
        task = fetch(svc, 0).tasks[0]
        server = ControlServer(svc.fetch, b"k" * 16)
        client = SocketControlClient(server.address, b"k" * 16, timeout_s=10)
        try:
            with caplog.at_level(logging.ERROR), pytest.raises(EOFError):
                client.fetch(GroupReport(1, "decode", [1], events=[bad(task)]))
            assert svc.failure is not None and message in svc.failure
            assert "fetch from node 1 failed, dropping its connection" in caplog.text
        finally:
            client.close()
            server.close()


def test_prefill_events_reported_after_the_turn_finished_still_fill_its_record(store):
    """A PE's events reach the service in its group's fetches, the DE's turn_done in another group's: the DE's can
    come first (a one-token turn finishes as soon as it runs on its DE). Found by the runtime fuzz: the PE's
    read_done / prefill_start / prefill_end of the completing attempt were dropped as "finished", so the record
    kept no PE-side read bytes and its prefill end was set to the turn's end (after its first token)."""
    trajs = [Trajectory(0, [Turn(10, 1), Turn(3, 1)])]
    svc = make_service(store, trajs, Clock(), policy="basic")  # PE-side reads
    fetch(svc, 1), fetch(svc, 2)
    (task0,) = fetch(svc, 0).tasks  # turn 0: no hit
    for k in block_keys(task0.prompt_ids, BS):  # turn 0's blocks are stored: turn 1 hits 2 blocks
        store.write(k, np.zeros(store.layout.full_block_shape, np.uint8))
    fetch(svc, task0.decode_engine, [done_event(svc, task0, 0.0, np.array([5], np.int32))])
    (task,) = fetch(svc, 0).tasks
    assert task.hit_blocks == 2 and task.pe_read_blocks == 2
    t0, de, rid = svc.t0, task.decode_engine, task.request_id
    nbytes = 2 * store.layout.full_block_nbytes
    # The DE reports the first token and the turn's end before the PE's group reports anything of this attempt.
    done = Event("turn_done", rid, 0, t0 + 0.41, {"tokens": np.array([3], np.int32)})
    fetch(svc, de, [Event("first_token", rid, 0, t0 + 0.40), done])
    assert svc.progress() == (2, 2)
    fetch(
        svc,
        0,
        [
            Event("read_done", rid, 0, t0 + 0.2, {"side": "pe", "nbytes": nbytes, "t_start": t0 + 0.1}),
            Event("prefill_start", rid, 0, t0 + 0.3),
            Event("prefill_end", rid, 0, t0 + 0.35, {"hit_tokens": 2 * BS}),
            dataclasses.replace(done, t=t0 + 0.5),  # a duplicate completion still changes nothing
            Event("prefill_end", rid, 1, t0 + 0.9, {"hit_tokens": 0}),  # nor does a stale attempt's event
        ],
    )
    rec = next(r for r in svc.finished_records() if r.turn_index == 1)
    assert (rec.read_start, rec.prefill_start, rec.prefill_end) == pytest.approx((0.1, 0.3, 0.35))
    assert (rec.first_token, rec.finished) == pytest.approx((0.40, 0.41))
    assert rec.hit_tokens == 2 * BS and rec.pe_read_bytes == nbytes and rec.de_read_bytes == 0
    assert svc.progress() == (2, 2)


def test_a_turn_whose_prefill_end_never_arrives_keeps_its_records_order(store):
    """The PE's node died after handing the request over (its last events never reported): the turn completes on
    its DE. Its prefill end was set to the turn's end (after its first token) and its hit stayed the looked-up one;
    now the DE's first token bounds the prefill end and the DE's turn_done carries the final hit."""
    from dualpath_jax.runtime.lifecycle import append_token_ids

    trajs = [Trajectory(0, [Turn(10, 3)])]
    for k in block_keys(append_token_ids(trajs[0].turns[0], 0, 0, 0, 50), BS):  # the prompt's blocks are stored
        store.write(k, np.zeros(store.layout.full_block_shape, np.uint8))
    svc = make_service(store, trajs, Clock(), policy="basic")
    fetch(svc, 1), fetch(svc, 2)
    (task,) = fetch(svc, 0).tasks
    assert task.hit_blocks == 2
    t0, rid = svc.t0, task.request_id
    done = Event("turn_done", rid, 0, t0 + 0.5, {"tokens": np.array([1, 2, 3], np.int32), "hit_tokens": BS})
    fetch(svc, task.decode_engine, [Event("first_token", rid, 0, t0 + 0.4), done])  # (a block cut the hit)
    (rec,) = svc.finished_records()
    assert (rec.prefill_end, rec.first_token, rec.finished) == pytest.approx((0.4, 0.4, 0.5))
    assert rec.hit_tokens == BS


def test_nodes_declared_dead_by_heartbeat_say_so_in_the_failure(store):
    """Found by the runtime fuzz: a heartbeat timeout barely above the fetch interval (valid) declares live nodes dead
    when a fetch is a little late; the failure listed them as if they had crashed ("dead: [0, 1]"), not why."""
    clock = Clock()
    svc = make_service(store, [Trajectory(0, [Turn(6, 2)])], clock, timeout=0.006)
    fetch(svc, 0), fetch(svc, 1), fetch(svc, 2)
    clock.t += 0.02
    assert svc.check_heartbeats() == [0, 1, 2]
    assert svc.failure == (
        "no live prefill or decode engine left (dead: [0]): node 0: no fetch for 0.020 s > heartbeat_timeout_s=0.006"
    )
