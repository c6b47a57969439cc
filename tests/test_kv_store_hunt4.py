"""KV store hunt, fourth pass: writes that fail must not cost stored blocks; a dedup write over a damaged file."""

import errno
import os

import numpy as np
import pytest

from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.store import LocalDirStore, block_file, local_dir

LAY = BlockLayout(num_layers=4, block_tokens=16, bytes_per_token_per_layer=64, fingerprint="hunt4/a")
FB = LAY.full_block_nbytes
FN = block_file.file_nbytes(LAY)


def _block(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, FB, dtype=np.uint8)


def _key(i: int) -> bytes:
    return bytes([i]) * 16


def _files(store) -> int:
    return sum(len(files) for _, _, files in os.walk(os.path.join(store.root, "blocks")))


def _fail(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["write", "dir_fsync"])
def test_a_write_that_fails_evicts_no_stored_block(tmp_path, monkeypatch, where):
    # A full store: the third block needs room. If its write fails (a full disk, EIO), nothing already stored may be
    # lost for it: blocks are evicted only once the new one is stored.
    s = LocalDirStore(tmp_path / "kv", LAY, capacity_bytes=2 * FN)
    for i in (1, 2):
        assert s.write(_key(i), _block(i))
    if where == "write":
        monkeypatch.setattr(local_dir, "_write_all", _fail)
    else:
        monkeypatch.setattr(local_dir, "_fsync_dir", _fail)
    assert not s.write(_key(3), _block(3), durable=where == "dir_fsync")
    monkeypatch.undo()
    st = s.stats()
    assert (st.write_errors, st.evictions, st.writes) == (1, 0, 2)
    assert s.keys() == [_key(1), _key(2)] and s.used_bytes == 2 * FN and _files(s) == 2
    out = np.zeros(FB, np.uint8)
    for i in (1, 2):
        assert s.read(_key(i), out) and (out == _block(i)).all()
    assert s.write(_key(3), _block(3))  # once the disk has room: written, the LRU block evicted for it
    assert s.keys() == [_key(2), _key(3)] and _files(s) == 2 and s.stats().evictions == 1
    s.close()


def test_a_write_whose_room_is_pinned_away_while_it_writes_is_rejected_and_evicts_nothing(tmp_path, monkeypatch):
    # Room is checked before the write and taken after it: if every other block got pinned meanwhile, the new
    # block goes (rejected), not a pinned one, and the capacity holds.
    s = LocalDirStore(tmp_path / "kv", LAY, capacity_bytes=2 * FN)
    for i in (1, 2):
        s.write(_key(i), _block(i))
    real = local_dir._write_all

    def write_all(fd, bufs):
        s.pin([_key(1), _key(2)])
        real(fd, bufs)

    monkeypatch.setattr(local_dir, "_write_all", write_all)
    assert not s.write(_key(3), _block(3))
    monkeypatch.undo()
    st = s.stats()
    assert (st.write_rejected, st.evictions, st.writes) == (1, 0, 2)
    assert s.keys() == [_key(1), _key(2)] and _files(s) == 2
    assert not os.path.exists(s.path_of(_key(3))) and s.lookup([_key(3)]) == 0
    s.unpin([_key(1), _key(2)])
    s.close()


def _flip_payload(s, key):
    with open(s.path_of(key), "r+b") as f:
        f.seek(s.header_nbytes + 100)
        b = f.read(1)
        f.seek(s.header_nbytes + 100)
        f.write(bytes([b[0] ^ 0xFF]))


def _other_key_file(s, key):
    # another block's file (right size, wrong key in its header) at this key's path
    other = _key(99)
    s.write(other, _block(99))
    os.replace(s.path_of(other), s.path_of(key))
    s.remove(other)


def _zeros(s, key):
    with open(s.path_of(key), "r+b") as f:
        f.write(b"\0" * FN)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("damage", [_flip_payload, _other_key_file, _zeros])
def test_a_write_over_a_damaged_block_of_the_right_size_leaves_a_good_block(tmp_path, damage, native):
    s = LocalDirStore(tmp_path / "kv", LAY, native_verify=native)
    key = _key(1)
    assert s.write(key, _block(1))
    damage(s, key)
    assert os.path.getsize(s.path_of(key)) == FN
    assert s.write(key, _block(1))  # a write-back of the same block
    st = s.stats()
    assert st.write_dedup == 0 and st.corrupt_blocks == 1
    out = np.zeros(FB, np.uint8)
    assert s.read(key, out) and (out == _block(1)).all()
    assert s.keys() == [key] and s.used_bytes == FN
    assert s.write(key, _block(1)) and s.stats().write_dedup == 1  # a good block: a dedup as before
    s.close()


def test_overlapping_refreshes_each_keep_their_own_record_of_removed_blocks(tmp_path, monkeypatch):
    # Each scan in progress records the keys dropped meanwhile in a set of its own. Two scans' sets can be equal
    # (both empty): ending one must not end the other's record (by equality), else the other re-indexes a block
    # removed meanwhile, or raises ValueError when its own (now different) set is not found.
    s = LocalDirStore(tmp_path / "kv", LAY)
    for i in (1, 2):
        s.write(_key(i), _block(i))
    real = os.scandir
    fired = []

    def scandir(path):
        entries = list(real(path))
        if os.path.basename(path) == "01" and not fired:
            fired.append(1)
            s.refresh()  # another thread's refresh, begun and ended while this one lists the directory
            s.remove(_key(2))  # then a block goes while this scan still runs
        return iter(entries)

    monkeypatch.setattr(local_dir.os, "scandir", scandir)
    s.refresh()
    monkeypatch.undo()
    assert fired and s.keys() == [_key(1)] and s.used_bytes == FN
    assert s._scans == []  # (no record left behind, growing with every later drop)
    s.close()
