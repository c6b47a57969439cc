"""Defects found by a second hunt of the runtime area (global scheduler service, request lifecycle, storage NIC,
metrics), each with the input that showed it."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from dualpath_jax.block_keys import block_keys, root_key
from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.runtime.control import GroupReport
from dualpath_jax.runtime.lifecycle import ConversationBook
from dualpath_jax.runtime.scheduler_service import GlobalScheduler, GroupSpec
from dualpath_jax.runtime.storage_nic import ReadJob, StorageNIC
from dualpath_jax.store import LocalDirStore
from dualpath_jax.traffic import Link
from dualpath_jax.workloads.types import Trajectory, Turn
from schedulers import make_policy
from schedulers.api import Assignment, InterEnginePolicy

LAYOUT = BlockLayout(num_layers=2, block_tokens=4, bytes_per_token_per_layer=8, fingerprint="hunt2/bf16")


def test_a_block_gone_since_the_lookup_is_not_charged_on_the_storage_nic(tmp_path):
    """The SNIC paced each block before reading it: a block removed after the lookup (another process's eviction)
    was charged a whole Full Block of link time and record though no byte moved (192 B recorded for 128 B read),
    delaying the request and every read queued behind it. The SNIC's record now equals the bytes read."""
    store = LocalDirStore(tmp_path / "kv", LAYOUT)
    keys = block_keys(np.arange(16), LAYOUT.block_tokens, parent=root_key(LAYOUT.fingerprint))
    for k in keys:
        assert store.write(k, np.full(LAYOUT.full_block_shape, 7, np.uint8))
    os.remove(store.path_of(keys[2]))  # gone after the lookup
    link = Link("snic/node0", 1e9, quantum=4096, burst_s=0.0)
    snic = StorageNIC(0, store, LAYOUT.block_tokens, pace=lambda n: link.acquire(n, "low"))
    area = np.zeros((LAYOUT.num_layers, 16, LAYOUT.bytes_per_token_per_layer), np.uint8)
    done, got = threading.Event(), {}

    def on_done(job, ok, nbytes, t0, t1):
        got.update(ok=ok, nbytes=nbytes)
        done.set()

    snic.submit_read(ReadJob(0, 0, keys, 0, area, on_done))
    assert done.wait(30)
    snic.close()
    store.close()
    assert got == {"ok": 2, "nbytes": 2 * LAYOUT.full_block_nbytes}
    assert link.total_bytes == got["nbytes"]
    assert sum(s.nbytes for s in link.samples()) == got["nbytes"]
    assert (area[:, :8] == 7).all()


def _service(policy, trajs, **kw):
    """A scheduler service over one PE node (engine 0) and one DE node (engine 1); the DE node has registered."""
    book = ConversationBook(trajs, 100)
    svc = GlobalScheduler(
        [GroupSpec(0, "prefill", [0]), GroupSpec(1, "decode", [1])],
        policy,
        book,
        lambda keys: 0,
        lambda ids: [],
        4,
        64,
        10.0,
        **kw,
    )
    svc.fetch(GroupReport(1, "decode", [1], address={1: "de"}))
    return svc, book


def test_a_policy_yielding_its_assignments_places_them():
    """The service walked the policy's answer twice (checks, then placements): a policy written as a generator (the
    simulator takes one) had it spent by the checks, so nothing was ever placed and the run hung until its
    timeout."""

    class Yielding(InterEnginePolicy):
        name = "yielding"

        def schedule(self, snapshot, queue, fetching_node=None):
            for p in queue:
                yield Assignment(p.request_id, 0, 1, "pe")

    svc, _ = _service(Yielding(), [Trajectory(0, [Turn(8, 2)])])
    reply = svc.fetch(GroupReport(0, "prefill", [0], address={0: "pe"}))
    assert [(t.request_id, t.prefill_engine, t.decode_engine) for t in reply.tasks] == [(0, 0, 1)]
    assert not svc._queue


def _decode_group(node_id: int, engine_ids: list, traffic):
    """An EngineGroup's reporting state alone (no model, no engines): enough to build its reports."""
    import time
    import types

    from dualpath_jax.runtime.node import EngineGroup, NodeContext

    g = object.__new__(EngineGroup)
    g.node_id, g.role, g.engine_ids, g.traffic = node_id, "decode", engine_ids, traffic
    g.wall_origin = time.time() - (time.monotonic() - traffic.clock_origin)
    g.snic = types.SimpleNamespace(
        read_queue_tokens=0, pending_writes=0, bytes_read=0, bytes_written=0, failed_reads=0, unstored_blocks=0
    )
    g.engines, g.ctx, g.address = {}, NodeContext(None, None, None), {e: f"engine{e}" for e in engine_ids}
    g._links_sent, g._links_due = {}, 0.0
    return g


def test_a_group_that_dies_before_the_end_has_its_link_bytes_recorded():
    """A group sent its link bytes only in its final report, which a killed group (SIGKILL, a thread stopped) never
    sends: its SNIC and CNICs vanished from the run's links, `link_bytes` and `snic_total_bytes`, and the storage-NIC
    balance became the max over the surviving SNICs' mean (a killed DE node's write-backs: 1.25 instead of 1.98 in
    a tiny dualpath run). Groups now send their links' new bytes with their reports, each bin's change once."""
    from dualpath_jax.traffic import TrafficManager

    tm = TrafficManager()
    tm.add_snic(1, 1e9)
    tm.add_cnic(1, 1e9)
    group = _decode_group(1, [1], tm)
    tm.link("snic/node1").acquire(4096, "low")  # a write-back
    tm.link("cnic/engine1").acquire(1000, "low")
    svc, _ = _service(make_policy("basic"), [Trajectory(0, [Turn(8, 2)])])
    svc.fetch(group._report())
    tm.link("snic/node1").acquire(4096, "low")
    svc.fetch(group._report())  # (a report within LINK_REPORT_S of the last carries none)
    group._links_due = 0.0
    svc.fetch(group._report())
    svc.declare_dead(1)  # then killed: no final report
    got = {}
    for x in svc.links:
        got[x.link] = got.get(x.link, 0) + x.nbytes
    assert got == {"snic/node1": 8192, "cnic/engine1/low": 1000}


def test_a_group_declared_dead_still_has_its_final_link_bytes_recorded():
    """A group declared dead (a late heartbeat) that comes back is told to stop, but the bytes its links moved did
    move: its final report's link bytes were dropped with the rest of the report."""
    from dualpath_jax.metrics import LinkBytes

    svc, _ = _service(make_policy("basic"), [Trajectory(0, [Turn(8, 2)])])
    svc.fetch(GroupReport(0, "prefill", [0], address={0: "pe"}))
    svc.declare_dead(1)
    reply = svc.fetch(GroupReport(1, "decode", [1], link_bytes=[LinkBytes("snic/node1", 0.0, 0.1, 4096)]))
    assert reply.shutdown
    assert [(x.link, x.nbytes) for x in svc.links] == [("snic/node1", 4096)]


def test_a_given_workloads_stated_contexts_are_what_the_check_and_the_runtime_both_use(base):
    """`driver.run` given trajectories whose turns state a shorter re-read context (`Turn.context_tokens`, as
    `load_trace` gives): the check once used those lengths while the runtime rebuilt every prompt from the whole
    history (266 tokens passed as 60; the DE failed the run mid-way); then the contexts were dropped. Since 2026-12-05
    the runtime's prompts follow them (`ConversationBook`), so the check and the run see the same lengths."""
    from dualpath_jax.runtime import driver
    from dualpath_jax.runtime.config import ConfigError
    from dualpath_jax.runtime.lifecycle import ConversationBook

    kept = [Trajectory(0, [Turn(200, 6), Turn(60, 6, context_tokens=200)])]  # 200 re-read + 60: past 256
    with pytest.raises(ConfigError, match=r"max_seq_len=256 is shorter than the longest prompt \(260 tokens\)"):
        driver.prepare(base, kept)
    dropped = [Trajectory(0, [Turn(200, 6), Turn(60, 6, context_tokens=0)])]  # the history dropped: 60 tokens
    assert [p for p, _, _ in dropped[0].turn_shapes(1)] == [200, 60]
    book = ConversationBook(dropped, 128)
    (first,) = book.pop_due(0.0)
    book.complete(first.request_id, np.zeros(6, np.int32), 1.0)
    (second,) = book.pop_due(1e9)
    assert second.prompt_ids.size == 60


def test_a_write_back_the_store_refuses_is_not_charged_on_the_storage_nic(tmp_path):
    """Likewise each write-back block was paced before the store took it: a block the store refused (no room, its
    capacity pinned) was charged a Full Block of SNIC time and record though nothing was written."""
    from dualpath_jax.runtime.storage_nic import WriteJob

    one_block = LocalDirStore(tmp_path / "probe", LAYOUT).file_nbytes
    store = LocalDirStore(tmp_path / "kv", LAYOUT, capacity_bytes=one_block)  # room for one block
    pinned = block_keys(np.arange(100, 104), LAYOUT.block_tokens, parent=root_key(LAYOUT.fingerprint))
    assert store.write(pinned[0], np.zeros(LAYOUT.full_block_shape, np.uint8))
    store.pin(pinned)
    keys = block_keys(np.arange(12), LAYOUT.block_tokens, parent=root_key(LAYOUT.fingerprint))
    link = Link("snic/node0", 1e9, quantum=4096, burst_s=0.0)
    snic = StorageNIC(0, store, LAYOUT.block_tokens, pace=lambda n: link.acquire(n, "low"))
    done, got = threading.Event(), []
    blocks = [np.full(LAYOUT.full_block_shape, 7, np.uint8)] * len(keys)
    snic.submit_write(WriteJob(keys, blocks, lambda n: (got.append(n), done.set())))
    assert done.wait(30)
    snic.close()
    store.close()
    assert got == [0] and snic.bytes_written == 0
    assert link.total_bytes == 0
