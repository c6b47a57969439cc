"""One store-wide capacity for the runtime's bounded KV store, kept by the driver's store object (`StoreKeeper`).

Before: `store_options`' `capacity_bytes` held per store object that writes, i.e. per decode node process: each
evicted LRU from its own view, so under `launcher=local` with two DE nodes the shared directory held about twice the
setting (`:test` at 8 blocks: 16 block files at the end), and a node could evict a block another one was about to
read. Now the nodes' objects have no capacity; the driver's, which answers every lookup and sees every turn finish,
pins the hits of the turns in flight, indexes each finished turn's write-back (evicting LRU to fit) and trims the
directory at the run's end.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from test_runtime import assert_matches_reference
from test_runtime_scheduler import BS, GROUPS, HBM, Clock, fetch

import schedulers
from dualpath_jax.block_keys import block_keys
from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.runtime import driver
from dualpath_jax.runtime.control import Event
from dualpath_jax.runtime.lifecycle import ConversationBook
from dualpath_jax.runtime.node import block_layout, store_stats
from dualpath_jax.runtime.scheduler_service import GlobalScheduler, StoreKeeper
from dualpath_jax.store import LocalDirStore, block_file
from dualpath_jax.workloads.types import Trajectory, Turn

LAYOUT = BlockLayout(2, BS, 8, "fix23/keeper")
FILE = block_file.file_nbytes(LAYOUT)


def block_files(root) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".kvb")]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, base, ops, trajs):
    """One `:test` run under launcher=local (a PE and two DE node processes) on a kept store of 4 block files; the
    block files counted at every poll of the driver."""
    root = tmp_path_factory.mktemp("fix23") / "kv"
    cap = 4 * block_file.file_nbytes(block_layout(base, ops))
    cfg = base.replace(
        **{"launcher": "local", "transport": "tcp", "run_timeout_s": 120.0},
        store_dir=str(root),
        store_options={"capacity_bytes": cap},
    )
    seen = {"max_files": 0, "keeper": None}

    def fault(service, launcher):
        seen["keeper"] = service.store_keeper
        seen["max_files"] = max(seen["max_files"], len(block_files(root)))

    res = driver.run(cfg, trajs, model_ops=ops, fault=fault)
    return res, root, cap, seen


def test_a_local_run_with_two_decode_nodes_keeps_one_capacity(local_run):
    res, root, cap, seen = local_run
    files = block_files(root)
    assert files and len(files) * os.path.getsize(files[0]) <= cap, len(files)  # (before: 2x, one per DE process)
    st = res.store_stats
    assert st["evictions"] > 0 and st["writes"] > st["evictions"]
    # every write-back is stored (the DEs evict nothing, refuse nothing for room); what the directory holds is what
    # was written less what the keeper evicted
    assert st["write_rejected"] == 0 and st["writes"] - st["evictions"] == len(files)  # (each eviction counted once)
    assert st["read_absent"] == 0  # a looked-up hit is pinned until its turn is done: never evicted under its read
    assert st["lookups"] == len(res.records) + res.requeued  # (the keeper's adoption lookups are not the scheduler's)
    # (the directory between turns: the capacity plus the write-backs of the turns in flight)
    print(f"block files: {len(files)} at the end, at most {seen['max_files']} during the run, capacity {cap} B")


def test_the_local_runs_tokens_are_the_unbounded_references(local_run, base, ops, trajs, reference_for):
    """The single-process reference tokens, which an unbounded run gives (tests/test_runtime.py): the store moves KV,
    it never changes it."""
    res, *_ = local_run
    assert_matches_reference(res, reference_for(base, ops, trajs), trajs)


def test_the_runs_end_leaves_no_pins(local_run):
    keeper = local_run[3]["keeper"]
    assert isinstance(keeper, StoreKeeper) and keeper.finished
    assert keeper.pinned_requests == [] and keeper.pinned_blocks == 0 and keeper.adopted_blocks > 0


# ---- the scheduler and its keeper, no processes ----------------------------------------------------------------


def keeper_service(tmp_path, trajs, blocks: int):
    """A GlobalScheduler whose lookups go through a keeper of `blocks` block files, and a node's store object (no
    capacity) on the same directory."""
    keeper = StoreKeeper(LocalDirStore(tmp_path, LAYOUT, capacity_bytes=blocks * FILE, stat_on_hit=True))
    node = LocalDirStore(tmp_path, LAYOUT)
    svc = GlobalScheduler(
        GROUPS,
        schedulers.make_policy("round_robin"),
        ConversationBook(trajs, vocab_size=50, seed=0),
        lookup_hit_blocks=keeper.store.lookup,
        block_keys_of=lambda ids: block_keys(ids, BS),
        block_size=BS,
        hbm_tokens_per_decode_engine=HBM,
        heartbeat_timeout_s=1.0,
        clock=Clock(),
        store_keeper=keeper,
    )
    return svc, keeper, node


def write(node, keys) -> None:
    for k in keys:
        assert node.write(k, np.full(LAYOUT.full_block_shape, 5, np.uint8))


def done(svc, task, tokens, hit_tokens: int) -> Event:
    return Event("turn_done", task.request_id, task.attempt, svc.t0, {"tokens": tokens, "hit_tokens": hit_tokens})


def test_a_pinned_in_flight_hit_is_never_evicted(tmp_path):
    """Turn A hits 2 stored blocks (the whole capacity) and is placed; turn B finishes first, its DE having written 2
    blocks. Indexing them must not evict A's hits (A's node reads them next): they are pinned from A's lookup to its
    end, so B's blocks are removed instead (no room beside the pinned ones). A node's death re-looks A up: its pins
    are taken again, not twice."""
    trajs = [Trajectory(0, [Turn(9, 1)]), Trajectory(1, [Turn(9, 2)])]
    prompts = {r.trajectory_id: r.prompt_ids for r in ConversationBook(trajs, vocab_size=50, seed=0).pop_due(0.0)}
    svc, keeper, node = keeper_service(tmp_path, trajs, blocks=2)
    a_keys = block_keys(prompts[0], BS)
    write(node, a_keys)  # A's prompt blocks, stored by an earlier run
    fetch(svc, 1), fetch(svc, 2)
    tasks = {t.trajectory_id: t for t in fetch(svc, 0).tasks}
    a, b = tasks[0], tasks[1]
    assert a.hit_blocks == 2 and b.hit_blocks == 0 and keeper.pinned_requests == [a.request_id]
    gen = np.array([3, 4], np.int32)
    b_keys = block_keys(np.concatenate([prompts[1], gen[:-1]]), BS)  # prompt + generated but the last: 2 blocks
    write(node, b_keys)  # B's DE writes back
    fetch(svc, b.decode_engine, [done(svc, b, gen, 0)])
    assert all(os.path.exists(node.path_of(k)) for k in a_keys)  # A's hits stay for its reads
    assert not any(os.path.exists(node.path_of(k)) for k in b_keys) and keeper.unkept_blocks == 2
    assert len(block_files(tmp_path)) == 2  # within the capacity
    svc.declare_dead(a.decode_engine)  # A re-runs elsewhere: looked up again, its hits pinned once
    assert keeper.pinned_requests == [a.request_id] and keeper.pinned_blocks == 2
    a2 = next(t for t in fetch(svc, 0).tasks if t.request_id == a.request_id)
    assert a2.attempt == 1 and a2.hit_blocks == 2
    fetch(svc, a2.decode_engine, [done(svc, a2, np.array([9], np.int32), 8)])
    assert keeper.pinned_requests == [] and keeper.pinned_blocks == 0
    st = keeper.report({"lookups": keeper.store.stats().lookups, "evictions": 0})
    assert st["lookups"] == 3 and st["evictions"] == 2 and st["unkept_blocks"] == 2  # A twice, B once
    node.close()
    keeper.store.close()


def test_a_finished_turns_write_back_is_indexed_lru_and_the_end_trims(tmp_path):
    """B's write-back is indexed once its first token is out (its prompt's blocks) and at its end, as the most
    recently used, evicting the least recently used blocks (A's, unpinned once A is done); a turn still in flight at the run's end (a failed run) is unpinned by `finish`,
    which also indexes what no turn's end did (a killed node's writes), evicting LRU to fit."""
    trajs = [Trajectory(0, [Turn(9, 1)]), Trajectory(1, [Turn(9, 2)]), Trajectory(2, [Turn(5, 1)])]
    prompts = {r.trajectory_id: r.prompt_ids for r in ConversationBook(trajs, vocab_size=50, seed=0).pop_due(0.0)}
    svc, keeper, node = keeper_service(tmp_path, trajs, blocks=3)
    a_keys, c_keys = block_keys(prompts[0], BS), block_keys(prompts[2], BS)
    write(node, a_keys + c_keys)  # 3 blocks: the capacity
    fetch(svc, 1), fetch(svc, 2)
    tasks = {t.trajectory_id: t for t in fetch(svc, 0).tasks}
    a, b, c = tasks[0], tasks[1], tasks[2]
    assert (a.hit_blocks, b.hit_blocks, c.hit_blocks) == (2, 0, 1)
    fetch(svc, a.decode_engine, [done(svc, a, np.array([1], np.int32), 8)])  # A done: its hits unpinned
    gen = np.array([3, 4], np.int32)
    b_keys = block_keys(np.concatenate([prompts[1], gen[:-1]]), BS)  # (its prompt's 2 whole blocks)
    write(node, b_keys)  # B's DE stores its prompt's blocks, then runs it: its first token is out
    fetch(svc, b.decode_engine, [Event("first_token", b.request_id, b.attempt, svc.t0, {})])
    # B's 2 blocks evict A's 2 (least recently used, unpinned); C's block is pinned (in flight)
    assert sorted(keeper.store.keys()) == sorted(c_keys + b_keys) and keeper.adopted_blocks == 2
    fetch(svc, b.decode_engine, [done(svc, b, gen, 0)])
    assert sorted(keeper.store.keys()) == sorted(c_keys + b_keys) and keeper.adopted_blocks == 2  # (once)
    assert [os.path.exists(node.path_of(k)) for k in a_keys] == [False, False]
    orphan = block_keys(np.arange(40, 44), BS)  # a killed node's write-back: no turn's end indexes it
    write(node, orphan)
    assert len(block_files(tmp_path)) == 4 and keeper.pinned_requests == [c.request_id]
    keeper.finish()  # (the run failed with C in flight): C unpinned, the orphan indexed as the most recently used
    assert keeper.pinned_blocks == 0 and len(block_files(tmp_path)) == 3
    assert sorted(keeper.store.keys()) == sorted(b_keys + orphan)  # C's hit, looked up first, was the LRU block
    assert keeper.lookup(99, b_keys) == 2 and keeper.pinned_blocks == 0  # (no pins once finished)
    node.close()
    keeper.store.close()


def test_eviction_takes_a_finished_trajectorys_tail_first(tmp_path):
    """A prefix-chained store loses every block after an evicted one for lookups, so the keeper orders a finished
    turn's blocks tail first in the LRU: room made for another trajectory costs this one its last blocks, not its
    first (head first, any eviction cost the whole hit: the main job at 1 MiB hit 3% of its blocks)."""
    keeper = StoreKeeper(LocalDirStore(tmp_path, LAYOUT, capacity_bytes=4 * FILE, stat_on_hit=True))
    node = LocalDirStore(tmp_path, LAYOUT)
    a = block_keys(np.arange(4 * BS, dtype=np.int32), BS)
    b = block_keys(np.arange(100, 100 + 2 * BS, dtype=np.int32), BS)
    write(node, a)
    assert keeper.lookup(1, a[:2]) == 2  # (a turn that hit a's first two blocks and wrote the other two)
    keeper.turn_done(1, a, 2)
    write(node, b)
    keeper.turn_done(2, b, 0)  # b's two blocks need two of a's
    assert keeper.store.lookup(a) == 2 and keeper.store.lookup(b) == 2
    stats = keeper.report(store_stats(keeper.store))
    assert stats["lookups"] == 3 and stats["evictions"] == 2  # (the keeper's own lookups are not the scheduler's)


def test_a_turns_new_blocks_do_not_push_out_its_own_hits(tmp_path):
    """The blocks a finished turn wrote are indexed while its own hits are still pinned: when they do not all fit,
    the last ones are not kept (a prefix stays usable), instead of the turn's first blocks making room for them."""
    keeper = StoreKeeper(LocalDirStore(tmp_path, LAYOUT, capacity_bytes=3 * FILE, stat_on_hit=True))
    node = LocalDirStore(tmp_path, LAYOUT)
    a = block_keys(np.arange(4 * BS, dtype=np.int32), BS)
    write(node, a[:2])
    assert keeper.lookup(1, a[:2]) == 2
    write(node, a[2:])
    keeper.turn_done(1, a, 2)
    assert keeper.store.lookup(a) == 3 and keeper.unkept_blocks == 1 and not os.path.exists(node.path_of(a[3]))
