"""Defects of the KV store (local_dir.py) found by the fix19 hunt; each test fails on the code before its fix.

- A read, `verify` or dedup write of a block this store object had not indexed (another process wrote it: every
  node process's reads) that raced a `remove()` of it in another thread indexed it afterwards: a phantom hit for
  `lookup`, counted against the capacity; the dedup write returned True with no block stored. A lookup racing such
  a remove reported and indexed the block too.
- A `remove()` racing a write of the same key left the new block on disk unindexed (never evicted), or indexed a
  block it had just unlinked (found by a threaded random stress: ~1 run in 6).
- `LocalDirStore.__del__` at interpreter exit, with module globals already None, printed "Exception ignored in"
  (`except OSError` on None is a TypeError) and left the cached files open.
- A durable write into a fan-out directory that a non-durable write had made never synced that directory's entry in
  blocks/: a power loss could take the "durable" block with its directory.
- `create=False` made a new, empty store in an existing directory that held none (an unmounted mount point).
- The "no room" warning said "all of it pinned" where writes in flight held the room.
The races are made deterministic by hooking the store's steps (a remove() run where another thread's would land).
"""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
from test_kv_store import LAYOUT, content, make_keys

from dualpath_jax.store import LocalDirStore, local_dir

FILE_NBYTES = local_dir.block_file.file_nbytes(LAYOUT)


def _racing(store: LocalDirStore, name: str, key: bytes, before: bool = True):
    """Make `store.<name>` remove `key` (as another thread of this process would) before or after it runs."""
    orig = getattr(store, name)

    def racing(*args, **kwargs):
        if before:
            store.remove(key)
            return orig(*args, **kwargs)
        try:
            return orig(*args, **kwargs)
        finally:
            store.remove(key)

    setattr(store, name, racing)


@pytest.mark.parametrize("read_method", ["mmap", "preadv"])
def test_read_of_unindexed_block_removed_meanwhile_is_not_indexed(tmp_path, read_method):
    writer = LocalDirStore(tmp_path, LAYOUT)
    reader = LocalDirStore(  # (mmap_after_reads=0: mapped from the first read without the compiled _verify too)
        tmp_path, LAYOUT, read_method=read_method, mmap_min_bytes=0, mmap_after_reads=0, capacity_bytes=FILE_NBYTES
    )
    (k,) = make_keys(1)
    assert writer.write(k, content(k))
    _racing(reader, "_read_fd" if read_method == "preadv" else "_read_mapped", k)
    out = np.zeros(LAYOUT.full_block_nbytes, np.uint8)
    assert reader.read(k, out)  # (through the file it had opened: the right KV)
    np.testing.assert_array_equal(out, content(k))
    assert not os.path.exists(reader.path_of(k))
    assert reader.keys() == [] and reader.used_bytes == 0  # was: indexed, with no file behind it
    assert reader.lookup([k]) == 0
    # A block it then writes is not evicted for the phantom (a 1-block capacity).
    (k2,) = make_keys(1, seed=1)
    assert reader.write(k2, content(k2)) and reader.keys() == [k2]
    # A read that nothing races still indexes a block another process wrote.
    (k3,) = make_keys(1, seed=2)
    reader2 = LocalDirStore(tmp_path, LAYOUT, read_method=read_method)
    reader2.remove(k2)
    writer.write(k3, content(k3))
    assert reader2.read(k3, out) and k3 in reader2.keys()
    for s in (writer, reader, reader2):
        s.close()


def test_verify_of_block_removed_meanwhile_does_not_index_it(tmp_path):
    # (opened before the block is written: it is not in their index, as in a node process)
    writer, checker, dedup = (LocalDirStore(tmp_path, LAYOUT) for _ in range(3))
    (k,) = make_keys(1)
    writer.write(k, content(k))
    _racing(checker, "_read_fd", k)
    assert checker.verify(k)  # (it was whole when opened)
    assert k not in checker.keys()  # was: indexed, no file
    for st in (writer, checker, dedup):
        st.close()


def test_dedup_write_of_block_removed_meanwhile_writes_it(tmp_path):
    writer, dedup = (LocalDirStore(tmp_path, LAYOUT) for _ in range(2))
    (k,) = make_keys(1)
    writer.write(k, content(k))
    _racing(dedup, "_stored_block_ok", k, before=False)
    assert dedup.write(k, content(k))
    # was: True as a dedup (nothing written), the block gone
    assert os.path.exists(dedup.path_of(k)) and k in dedup.keys()
    assert dedup.stats().writes == 1 and dedup.stats().write_dedup == 0
    out = np.zeros(LAYOUT.full_block_nbytes, np.uint8)
    assert writer.read(k, out)
    np.testing.assert_array_equal(out, content(k))
    # A dedup write that nothing races stays a dedup.
    del dedup._stored_block_ok
    assert dedup.write(k, content(k)) and dedup.stats().write_dedup == 1
    for st in (writer, dedup):
        st.close()


def test_lookup_of_unindexed_block_removed_meanwhile_is_a_miss(tmp_path):
    writer, looker = (LocalDirStore(tmp_path, LAYOUT) for _ in range(2))
    k, k2 = make_keys(2)
    for key in (k, k2):
        writer.write(key, content(key))
    orig = looker._stat_block

    def racing(key, *args):  # the lookup's stat finds the block; then another thread removes it
        found = orig(key, *args)
        if not args and key == k2:
            looker.remove(key)
        return found

    looker._stat_block = racing
    assert looker.lookup([k, k2]) == 1  # was 2: a hit with no file behind it, and indexed
    assert looker.keys() == [k] and looker.used_bytes == FILE_NBYTES
    for st in (writer, looker):
        st.close()


def test_remove_racing_a_write_of_the_same_key_keeps_index_and_disk_in_step(tmp_path, monkeypatch):
    store = LocalDirStore(tmp_path, LAYOUT, capacity_bytes=2 * FILE_NBYTES)
    k, k2 = make_keys(2)
    path = store.path_of(k)
    # 1. remove() finds no file; a write of the key lands before remove() takes the lock.
    real_unlink = os.unlink
    raced = []

    def unlink(p, *args, **kwargs):
        try:
            return real_unlink(p, *args, **kwargs)
        finally:
            if p == path and not raced:
                raced.append(store.write(k, content(k)))

    monkeypatch.setattr(os, "unlink", unlink)
    assert store.remove(k) is False and raced == [True]
    monkeypatch.undo()
    assert os.path.exists(path) and store.keys() == [k]  # was: the block on disk, not indexed (never evicted)
    # 2. A write's block lands; remove() unlinks it before the write indexes it.
    store.remove(k)
    real_write_file = store._write_file

    def write_file(path, key, header, src, durable, renamed=None):
        def then_removed():
            renamed()
            store.remove(key)

        return real_write_file(path, key, header, src, durable, then_removed)

    store._write_file = write_file
    assert store.write(k, content(k))
    del store._write_file
    assert not os.path.exists(path) and store.keys() == []  # was: indexed, no file (a phantom hit)
    assert store.lookup([k]) == 0
    # Left in step: the capacity holds two real blocks.
    assert store.write(k, content(k)) and store.write(k2, content(k2)) and store.stats().evictions == 0
    store.close()


def test_write_rejected_names_the_room_writes_in_flight_hold(tmp_path, caplog):
    store = LocalDirStore(tmp_path, LAYOUT, capacity_bytes=2 * FILE_NBYTES)
    k1, k2, k3 = make_keys(3)
    store.write(k1, content(k1))
    real_write_file = store._write_file
    rejected = []

    def write_file(path, key, *args):  # while k2's write is in flight, k3's finds no room
        if key == k2:
            rejected.append(store.write(k3, content(k3)))
        return real_write_file(path, key, *args)

    store._write_file = write_file
    with caplog.at_level("WARNING", logger="dualpath_jax.store.local_dir"), store.pinned([k1]):
        assert store.write(k2, content(k2))
    assert rejected == [False] and store.stats().write_rejected == 1
    # was "(6656 B used of 13312, all of it pinned)": half the room was the write in flight's
    assert f"{FILE_NBYTES} B reserved by writes in flight" in caplog.text
    store.close()


def test_create_false_refuses_a_directory_that_holds_no_store(tmp_path):
    mount_point = tmp_path / "mnt"  # (a shared file system's mount point, not mounted)
    mount_point.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no KV store"):
        LocalDirStore(mount_point, LAYOUT, create=False)
    assert os.listdir(mount_point) == []  # was: a new, empty store made there (STORE.json, blocks/)
    LocalDirStore(mount_point, LAYOUT).close()  # made with create=True...
    LocalDirStore(mount_point, LAYOUT, create=False).close()  # ...then opened with create=False


def test_del_with_module_globals_gone_closes_files_quietly(tmp_path, monkeypatch):
    store = LocalDirStore(tmp_path, LAYOUT, mmap_min_bytes=0)
    keys = make_keys(3)
    out = np.zeros(LAYOUT.full_block_nbytes, np.uint8)
    for k in keys:
        store.write(k, content(k))
        assert store.read(k, out)  # cached open (and mapped) files
    fds = [ent.fd for ent in store._fds.values()]
    assert len(fds) == 3
    # As at interpreter exit: the module's globals are None (a global shadows the builtin OSError too).
    monkeypatch.setattr(local_dir, "os", None)
    monkeypatch.setattr(local_dir, "OSError", None, raising=False)
    store.__del__()  # was: TypeError (catching None), the files left open
    monkeypatch.undo()
    for fd in fds:
        with pytest.raises(OSError) as e:
            os.fstat(fd)
        assert e.value.errno == errno.EBADF
    assert not store._fds
    store.__del__()  # a second call closes nothing twice
    store.close()


def test_durable_write_syncs_fan_out_directory_made_by_a_non_durable_one(tmp_path, monkeypatch):
    synced = []
    real = local_dir._fsync_dir
    monkeypatch.setattr(local_dir, "_fsync_dir", lambda p: (synced.append(os.path.abspath(p)), real(p)))
    store = LocalDirStore(tmp_path, LAYOUT)
    keys = make_keys(300)  # (three of them share a fan-out directory)
    by_dir: dict[bytes, list[bytes]] = {}
    for k in keys:
        by_dir.setdefault(k[:1], []).append(k)
    a, b, c = next(ks for ks in by_dir.values() if len(ks) >= 3)[:3]
    assert store.write(a, content(a))  # not durable: makes blocks/ab/
    synced.clear()
    assert store.write(b, content(b), durable=True)
    fan_out = os.path.dirname(store.path_of(b))
    blocks = os.path.dirname(fan_out)
    assert synced == [fan_out, blocks]  # the block's entry and the fan-out directory's (was missing)
    synced.clear()
    assert store.write(c, content(c), durable=True)
    assert synced == [fan_out]  # once per directory
    store.close()
