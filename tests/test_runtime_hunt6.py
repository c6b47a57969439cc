"""Runtime hunt, sixth round: engines, storage NIC, driver (tests fail on the commit before their fix)."""

from __future__ import annotations

import math
import threading
import time
import types

import numpy as np
import pytest

import schedulers
from dualpath_jax.block_keys import block_keys, root_key
from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.metrics import TIMESTAMPS
from dualpath_jax.runtime import engines
from dualpath_jax.runtime.control import GroupReport, TurnTask
from dualpath_jax.runtime.lifecycle import ConversationBook
from dualpath_jax.runtime.scheduler_service import GlobalScheduler, GroupSpec
from dualpath_jax.runtime.storage_nic import ReadJob, StorageNIC, WriteJob
from dualpath_jax.store import LocalDirStore
from dualpath_jax.workloads.types import Trajectory, Turn

LAYOUT = BlockLayout(num_layers=2, block_tokens=4, bytes_per_token_per_layer=8, fingerprint="hunt6/bf16")


def _write_back(snic, keys, blocks) -> list:
    done, got = threading.Event(), []
    snic.submit_write(WriteJob(keys, blocks, lambda n: (got.append(n), done.set())))
    assert done.wait(30)
    return got


def test_a_write_back_of_stored_blocks_is_not_counted_as_store_reads(tmp_path):
    """The SNIC checked a write-back block already stored with a verified `store.read` into a scratch block: each
    counted in the store's read stats (hits, bytes read) although no KV was read for a turn, so a run's store
    reads exceeded the hit KV its turns read (one Full Block per dedup). It uses `store.verify` now (not counted);
    a damaged block is still found and replaced."""
    store = LocalDirStore(tmp_path / "kv", LAYOUT)
    keys = block_keys(np.arange(12), LAYOUT.block_tokens, parent=root_key(LAYOUT.fingerprint))
    blocks = [np.full(LAYOUT.full_block_shape, 3 + i, np.uint8) for i in range(len(keys))]
    for k, b in zip(keys, blocks, strict=True):
        assert store.write(k, b)
    before = store.stats()
    paced = []
    snic = StorageNIC(0, store, LAYOUT.block_tokens, pace=paced.append)
    assert _write_back(snic, keys, blocks) == [3]
    after = store.stats()
    assert (after.read_hits, after.bytes_read) == (before.read_hits, before.bytes_read), "a dedup is no read"
    assert paced == [] and snic.bytes_written == 0
    # A turn's read: the store's read bytes are the SNIC's.
    area = np.zeros((LAYOUT.num_layers, 12, LAYOUT.bytes_per_token_per_layer), np.uint8)
    done = threading.Event()
    snic.submit_read(ReadJob(1, 0, keys, 0, area, lambda *a: done.set()))
    assert done.wait(30)
    snic.close()
    assert store.stats().bytes_read - before.bytes_read == snic.bytes_read == 3 * LAYOUT.full_block_nbytes
    store.close()


# ------------------------------------------------------------------ a PE killed after its hand-over
class _Transport:
    def __init__(self):
        self.sent = []

    def register(self, name, arena):
        pass

    def peers(self):
        return ["engine0", "engine1"]

    def send(self, name, payload):
        self.sent.append(engines.decode_msg(payload))


def _fake_engine(cls, events: list, transport, **kw):
    """An engine built by its own __init__ over stand-ins (no transport, store or real model)."""
    cfg = types.SimpleNamespace(block_size=4, cluster=types.SimpleNamespace(decode_slots=2, max_seq_len=64))
    model = types.SimpleNamespace(
        kv_layout=types.SimpleNamespace(bytes_per_token_per_layer=8, num_layers=2),
        new_decode_batch=lambda slots, seq: None,
        prefill=lambda ids, cached, cached_layer, on_layer: [5] * len(ids),  # first tokens (no layer sends)
    )
    ctx = types.SimpleNamespace(cfg=cfg, model=model, emit=events.append)
    pool = types.SimpleNamespace(arena=None)
    return cls(
        engine_id=kw.pop("engine_id"), node_id=0, ctx=ctx, transport=transport, buffer_pool=pool, snic=None, **kw
    )


def test_a_turn_whose_pe_died_after_the_hand_over_has_its_prefill_start_and_pe_read(tmp_path):
    """A PE's events reach the service in its own group's fetches: a PE node killed after it handed a turn's first
    token to the DE took them with it. The DE finished the turn, but its record kept prefill_start = NaN (and the
    PE-side read: read_start / read_end NaN, pe_read_bytes 0 for a turn with a PE-read hit) -- seen in the
    runtime fuzz with a PE node killed (hunt_runtime5). The PE hands its own stamps to the DE with the first
    token, and the DE's turn_done carries them; the PE's events, if they come late, are not counted twice."""
    store = LocalDirStore(tmp_path / "kv", BlockLayout(2, 4, 8, "test-model"))
    trajs = [Trajectory(0, [Turn(10, 1), Turn(3, 1)])]
    groups = [GroupSpec(0, "prefill", [0]), GroupSpec(1, "decode", [1])]
    svc = GlobalScheduler(
        groups,
        schedulers.make_policy("basic"),
        ConversationBook(trajs, vocab_size=50, seed=0),
        lookup_hit_blocks=store.lookup,
        block_keys_of=lambda ids: block_keys(ids, 4),
        block_size=4,
        hbm_tokens_per_decode_engine=4096,
        heartbeat_timeout_s=60.0,
    )

    def fetch(node, events=()):
        g = groups[node]
        return svc.fetch(GroupReport(node, g.role, g.engine_ids, address={e: "a" for e in g.engine_ids}, events=events))

    fetch(1)
    (task0,) = fetch(0).tasks
    for k in block_keys(task0.prompt_ids, 4):  # turn 0's blocks are stored: turn 1 hits 2 of them on the PE side
        store.write(k, np.zeros(store.layout.full_block_shape, np.uint8))
    done0 = engines.Event("turn_done", task0.request_id, 0, time.time(), {"tokens": np.array([5], np.int32)})
    fetch(1, [done0])
    (task,) = fetch(0).tasks
    assert task.pe_read_blocks == 2
    pe_events, de_events, tr = [], [], _Transport()
    pe = _fake_engine(engines.PrefillEngine, pe_events, tr, engine_id=0, batcher=None)
    de = _fake_engine(engines.DecodeEngine, de_events, tr, engine_id=1)
    pe._handle("task", task)
    de._handle("task", task)
    r = pe.reqs[(task.request_id, 0)]
    t_read = time.time()
    nbytes = 2 * store.layout.full_block_nbytes
    pe._handle(
        "read_done", (ReadJob(task.request_id, 0, task.block_keys[:2], 0, None, None), 2, nbytes, t_read, t_read)
    )
    r.final_hit = r.cached = 8
    pe._run_batch([(r, 8, task.prompt_tokens - 8)])  # prefill_start; its KV writes to the DE
    pe._drain(5)  # "sent": prefill_end; prefill_done to the DE
    (msg,) = [m for m in tr.sent if m["kind"] == "prefill_done"]
    de._handle("msg", msg)
    d = de.reqs[(task.request_id, 0)]
    de.batch = types.SimpleNamespace(load=lambda *a: None, free=lambda slot: None)
    d.handle, d.slot, d.stage = types.SimpleNamespace(release=lambda: None, released=True), 0, "loading"
    de._loaded(d)  # first token out; a one-token turn is done
    de._report_finished()
    # The PE node dies now: none of its events reach the service; the DE's turn_done does.
    fetch(1, de_events)
    rec = next(x for x in svc.finished_records() if x.turn_index == 1)
    stamps = [getattr(rec, f) for f in TIMESTAMPS if f != "second_token"]  # (a one-token turn has no second)
    assert all(math.isfinite(v) for v in stamps), rec
    assert stamps == sorted(stamps), rec
    assert rec.pe_read_bytes == nbytes and rec.hit_tokens == 8
    assert rec.prefill_start == next(e.t for e in pe_events if e.kind == "prefill_start") - svc.t0
    # Had the PE lived, its events coming late say the same and are not counted again.
    fetch(0, pe_events)
    assert rec.pe_read_bytes == nbytes and rec.read_start == t_read - svc.t0
    store.close()


def test_a_turn_without_a_hit_has_a_zero_length_read_so_its_ttft_breakdown_is_finite():
    """A turn with no hit read nothing, and its record kept read_start / read_end NaN: the TTFT breakdown (queue,
    allocation, read, prefill: `sim.runner.ttft_breakdown`) of every no-hit turn -- every first turn -- was NaN, and
    its means over a run too (/tmp/hunt_runtime6/breakdown.py, `:test` config). The simulator records a zero-length
    read where the reads would start; the PE now does too, when it gets the request's area."""
    from dualpath_jax.host_buffers import HostBufferPool

    events: list = []
    pe = _fake_engine(engines.PrefillEngine, events, _Transport(), engine_id=0, batcher=None)
    pe.pool = HostBufferPool(slot_nbytes=64, budget_bytes=1 << 16, prefault=False)
    ids = np.arange(9, dtype=np.int32)
    task = TurnTask(7, 0, 0, 0, ids, 2, block_keys(ids, 4), 0, 0, 0, 1, "pe")
    pe._handle("task", task)
    t = time.time()
    pe._prepare()
    (ev,) = [e for e in events if e.kind == "read_done"]
    assert ev.t >= t and ev.data == {"side": "pe", "nbytes": 0, "t_start": ev.t}
    assert pe.reqs[(7, 0)].pe_read_done


def test_a_cancelled_requests_area_is_not_reused_while_its_dead_peer_may_still_write_into_it():
    """A cancel comes when the request's peer node was declared dead -- maybe only late (stopped past the heartbeat
    timeout, then continued): its queued one-sided writes still land in our buffer. The area was freed at once and
    taken by the next request, whose KV they then overwrote (/tmp/hunt_runtime6/stop_cont.py: a PE node SIGSTOPped
    mid-write for 13 s, then SIGCONTed: the other request's greedy tokens after the first went wrong). The peer is
    dropped now (`transport.disconnect`: none of its writes lands once it returns) before the area is freed; if that
    fails the area is never reused. With nothing of the peer's still to land (a DE's request once its PE sent
    prefill_done) it is freed without a drop. (Hunt 7: the area used to be held until the peer's connection went.)"""
    from dualpath_jax.host_buffers import HostBufferPool
    from dualpath_jax.runtime.control import Cancel

    for broken in (False, True):
        for role, cls, kw in [("de", engines.DecodeEngine, {}), ("pe", engines.PrefillEngine, {"batcher": None})]:
            tr = _Transport()
            dropped = []
            peer = "engine0" if role == "de" else "engine1"
            pool = HostBufferPool(slot_nbytes=64, budget_bytes=2 * 9 * 16, prefault=False)  # one area of 9 tokens
            free0 = pool.free_slots

            def disconnect(name, dropped=dropped, broken=broken, pool=pool, free0=free0):
                if broken:
                    raise OSError("cannot")
                dropped.append((name, pool.free_slots < free0))  # (the area still taken)

            tr.disconnect = disconnect
            eng = _fake_engine(cls, [], tr, engine_id=1 if role == "de" else 0, **kw)
            eng.pool = pool
            ids = np.arange(9, dtype=np.int32)
            hit = 0 if role == "de" else 2  # (a PE's peer writes into its area only on the DE read path)
            for rid in (7, 8):  # 7 takes the buffer; 8 waits for it
                eng._handle("task", TurnTask(rid, 0, rid, 0, ids, 2, block_keys(ids, 4), hit, 0, 0, 1, "de"))
            eng._prepare()
            assert eng.pool.free_slots < free0
            eng._handle("cancel", Cancel(7, 0))  # its peer was declared dead, but may still be connected
            eng._prepare()
            r8 = eng.reqs[(8, 0)]
            got = (r8.handle if role == "de" else r8.area) is not None
            if broken:
                assert not got, f"{role}: area reused under a live peer's writes"
                continue
            assert dropped == [(peer, True)], f"{role}: the area was freed before its peer was dropped"
            assert got, f"{role}: the area of a request whose peer was dropped was not reused"
    # A DE's request whose KV is all in (prefill_done: its PE waited for its writes) is freed at once.
    tr = _Transport()
    tr.disconnect = lambda name: pytest.fail("no write of the peer can still land")
    eng = _fake_engine(engines.DecodeEngine, [], tr, engine_id=1)
    eng.pool = HostBufferPool(slot_nbytes=64, budget_bytes=2 * 9 * 16, prefault=False)
    eng._handle("task", TurnTask(9, 0, 9, 0, ids, 2, block_keys(ids, 4), 0, 0, 0, 1, "de"))
    eng._prepare()
    eng._handle("msg", {"kind": "prefill_done", "request_id": 9, "attempt": 0, "hit_tokens": 0, "first_token": 3})
    eng._handle("cancel", Cancel(9, 0))
    assert eng.pool.free_slots == free0
