"""A KV store smaller than the working set (`store_options`' `capacity_bytes`), as a researcher sizing it sees it.

Before: the store's evictions were counted by the store objects only (`StoreStats`), never in a run's results; a run
whose store evicted most of its blocks (hits 0.52 -> 0.0 on the `:test` config at two blocks) stored every write-back,
so `unstored_blocks` was 0 and the table had no note: it looked like a full-size store's run. A kept `store_dir`
opened with a smaller capacity was trimmed by the config check's open without a word.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from dualpath_jax.block_keys import block_keys, root_key
from dualpath_jax.runtime import driver
from dualpath_jax.runtime.node import block_layout
from dualpath_jax.store import LocalDirStore
from experiments.run import evicted_blocks, evicted_note


def test_a_small_store_says_it_evicted_and_keeps_the_tokens(base, ops, trajs, tmp_path, caplog):
    """A kept store_dir holding 6 blocks, reopened with room for 4: the config check's open evicts 2 (a warning), the
    run evicts more (its working set is ~12 blocks), all in `RunResult.store_stats`, and the table's note says so; a
    full-size store evicts nothing (no note). Greedy tokens are the full-size run's (the store moves KV, it never
    changes it)."""
    two = trajs[:2]  # (half the workload: the test's time)
    full = driver.run(base, two, model_ops=ops)
    st = full.store_stats
    assert st["evictions"] == 0 and st["write_rejected"] == 0, st
    assert st["read_hits"] > 0 and st["lookup_hit_blocks"] >= st["read_hits"]
    assert st["objects"] == 2  # the driver's (lookups) and the in-process nodes' one, each counted once
    assert evicted_blocks(full) == 0 and evicted_blocks(SimpleNamespace()) == 0  # (run.py notes only > 0)
    assert all("store" in s for s in full.node_stats.values())  # each node's final report names its store object

    layout = block_layout(base, ops)
    one = LocalDirStore(tmp_path / "probe", layout).file_nbytes
    kept = LocalDirStore(tmp_path / "kv", layout)
    for key in block_keys(np.arange(6 * base.block_size) + 7, base.block_size, parent=root_key(layout.fingerprint)):
        assert kept.write(key, np.zeros(layout.full_block_shape, np.uint8))
    kept.close()
    cfg = base.replace(store_dir=str(tmp_path / "kv"), store_options={"capacity_bytes": 4 * one})
    with caplog.at_level("WARNING", logger="dualpath_jax.runtime.driver"):
        small = driver.run(cfg, two, model_ops=ops)
    assert "capacity_bytes: opening it evicted 2 blocks (least recently used first)" in caplog.text
    assert small.tokens.keys() == full.tokens.keys()
    assert all(np.array_equal(small.tokens[k], full.tokens[k]) for k in full.tokens)
    st = small.store_stats
    assert st["evictions"] > 4, st
    assert st["objects"] == 2 and st["writes"] > 0 and st["lookups"] > 0
    assert small.summary["hit_rate"] < full.summary["hit_rate"]
    assert evicted_blocks(small) == st["evictions"]
    note = evicted_note("dualpath", small)
    assert note.startswith(f"note: dualpath's KV store evicted {st['evictions']} blocks to stay within")


def test_store_totals_counts_each_store_object_once():
    shared = {"object": "h/1/9", "evictions": 5, "read_hits": 3, "hits_ratio": 0.5}
    own = {"object": "h/1/8", "evictions": 1, "read_hits": 0, "lookups": 4}
    t = driver.store_totals([own, shared, dict(shared), dict(shared), None])
    assert t == {"evictions": 6, "read_hits": 3, "hits_ratio": 0.5, "lookups": 4, "objects": 2}


def test_no_room_is_said_once_per_spell_and_names_what_holds_the_room(tmp_path, caplog):
    """A store too small for the writes in flight refused one write-back block after another, each with a warning (159
    for 192 turns of the default workload at one block), all saying "X B of blocks, each pinned or being read or
    written" where its one block could be evicted and a write in flight held the room."""
    from test_kv_store import LAYOUT, content, make_keys

    from dualpath_jax.store import local_dir

    file_nbytes = local_dir.block_file.file_nbytes(LAYOUT)
    store = LocalDirStore(tmp_path, LAYOUT, capacity_bytes=file_nbytes)
    k1, k2, k3, k4, k5 = make_keys(5)
    assert store.write(k1, content(k1))
    real_write_file = store._write_file
    refused = []

    def write_file(path, key, *args):  # while k2's write is in flight (its room reserved), k3 and k4 find none
        if key == k2:
            refused.extend([store.write(k3, content(k3)), store.write(k4, content(k4))])
        return real_write_file(path, key, *args)

    store._write_file = write_file
    with caplog.at_level("WARNING", logger="dualpath_jax.store.local_dir"):
        assert store.write(k2, content(k2))  # (k1 evicted once k2 is stored)
        store._write_file = real_write_file
        no_room = [r.getMessage() for r in caplog.records if "no room for block" in r.getMessage()]
        assert refused == [False, False] and store.stats().write_rejected == 2 and len(no_room) == 1, no_room
        assert f"{file_nbytes} B of blocks, 0 B of them pinned or being read or written" in no_room[0]
        assert "the next refusals are counted" in no_room[0]
        with store.pinned([k2]):  # a write was stored since: a new spell is said again
            assert not store.write(k5, content(k5))
        no_room = [r.getMessage() for r in caplog.records if "no room for block" in r.getMessage()]
        assert len(no_room) == 2 and f"{file_nbytes} B of them pinned" in no_room[1], no_room
    store.close()


def test_a_float_capacity_is_refused_with_the_int_it_means(tmp_path):
    """`--config.runtime.store_options="{'capacity_bytes': 1e6}"` is a float: refused, and the error now says which int
    to write (it said only "got 1000000.0")."""
    import pytest
    from test_kv_store import LAYOUT

    with pytest.raises(TypeError, match=r"capacity_bytes must be an int or None, got 1000000\.0 \(write 1000000\)"):
        LocalDirStore(tmp_path, LAYOUT, capacity_bytes=1e6)
    with pytest.raises(TypeError, match=r"got 2\.5$"):
        LocalDirStore(tmp_path, LAYOUT, capacity_bytes=2.5)
