"""The KV store's LRU order across reopen, an ambiguous layer read, and dead writers' temp files (fix19, second wave);
each test fails on local_dir.py before its fix.

- After a reopen (or a `refresh`) the LRU order is the block files' mtimes, and reads never touched a file: the order
  was write order, so a capacity-limited long-lived store evicted its hottest blocks (a shared system prompt, written
  first and read all the time) first. Now the blocks used (read hits, `verify`, dedup writes) get their files' mtimes
  set in their order of use, in batches every `lru_touch_s`, at `close()` and before a refresh's scan.
- `read(key, out, layers=<all L layers, not in ascending order>)` into a contiguous array of the Full Block's shape
  [L, block_tokens, bpt] was taken as packed (its layers permuted, silently) where a row-strided array of the same
  shape is filled in place. Now a ValueError names the ambiguity (a flat buffer stays packed, as documented).
- Temp files of a writer killed while the other processes ran on stayed until the next open or `refresh()` (the
  runtime calls neither): now a write sweeps its fan-out directory once every TEMP_SWEEP_S.
File mtimes are set explicitly (as tests/test_mutation_audit3_store.py does): writes a few ms apart can share one.
"""

from __future__ import annotations

import errno
import logging
import os

import numpy as np
import pytest
from test_kv_store import LAYOUT, content, make_keys

from dualpath_jax.store import LocalDirStore, local_dir

FILE_NBYTES = local_dir.block_file.file_nbytes(LAYOUT)
T0 = 1_700_000_000 * 10**9  # (2023: long ago, as blocks written by an earlier run)


def _age(store: LocalDirStore, keys: list[bytes]) -> None:
    """Give `keys`' files old mtimes in the order given (the first the oldest), 10 s apart."""
    for i, k in enumerate(keys):
        os.utime(store.path_of(k), ns=(T0 + i * 10**10, T0 + i * 10**10))


def _mtime(store: LocalDirStore, key: bytes) -> int:
    return os.stat(store.path_of(key)).st_mtime_ns


def _read(store: LocalDirStore, key: bytes) -> None:
    out = np.empty(LAYOUT.full_block_nbytes, np.uint8)
    assert store.read(key, out)
    np.testing.assert_array_equal(out, content(key))


def test_a_block_read_before_close_is_not_the_first_evicted_after_reopen(tmp_path):
    a, b, c, d = make_keys(4)
    s = LocalDirStore(tmp_path, LAYOUT)
    for k in (a, b, c):
        assert s.write(k, content(k))
    _age(s, [a, b, c])  # written in that order (a: the shared system prompt)
    _read(s, c)
    _read(s, a)  # (within lru_touch_s: noted, written to the mtimes at close in this order)
    s.close()
    assert _mtime(s, b) < _mtime(s, c) < _mtime(s, a)
    s2 = LocalDirStore(tmp_path, LAYOUT, capacity_bytes=3 * FILE_NBYTES)
    assert s2.keys() == [b, c, a]  # was [a, b, c]: write order
    assert s2.write(d, content(d))
    assert [os.path.exists(s2.path_of(k)) for k in (a, b, c, d)] == [True, False, True, True]  # b went, not a
    s2.close()


def test_reads_touch_their_files_in_batches_every_lru_touch_s(tmp_path):
    a, b = make_keys(2)
    s = LocalDirStore(tmp_path, LAYOUT)
    for k in (a, b):
        assert s.write(k, content(k))
    s.close()
    _age(s, [a, b])
    s2 = LocalDirStore(tmp_path, LAYOUT)  # default lru_touch_s=60: no batch due yet, no utime on the read path
    for _ in range(2 * getattr(local_dir, "_TOUCH_CHECK_HITS", 16)):
        _read(s2, a)
    assert _mtime(s2, a) == T0
    s2.close()  # the uses are written at close
    assert _mtime(s2, a) > T0 + 10**12 and _mtime(s2, b) == T0 + 10**10
    _age(s2, [a, b])
    s3 = LocalDirStore(tmp_path, LAYOUT, lru_touch_s=0)  # (a node process, killed without close: batches count)
    for _ in range(2 * getattr(local_dir, "_TOUCH_CHECK_HITS", 16)):
        _read(s3, a)
    s3._write_pool.submit(int).result()  # (the batch runs on the writer's thread: wait for it)
    assert _mtime(s3, a) > T0 + 10**12 and _mtime(s3, b) == T0 + 10**10
    s3.close()
    off = LocalDirStore(tmp_path, LAYOUT, lru_touch_s=None)  # never touch
    _age(off, [a, b])
    _read(off, a)
    off.close()
    assert (_mtime(off, a), _mtime(off, b)) == (T0, T0 + 10**10)
    with pytest.raises(ValueError, match="lru_touch_s"):
        LocalDirStore(tmp_path, LAYOUT, lru_touch_s=float("nan"))


def test_verify_and_a_dedup_write_count_as_uses_and_refresh_keeps_them(tmp_path):
    a, b, c = make_keys(3)
    s = LocalDirStore(tmp_path, LAYOUT)
    for k in (a, b, c):
        assert s.write(k, content(k))
    _age(s, [a, b, c])
    assert s.verify(a) and s.write(b, content(b))  # (a dedup: nothing written)
    assert s.stats().write_dedup == 1 and s.keys() == [c, a, b]
    s.refresh()  # rebuilds the order from the mtimes: was [a, b, c], this process's uses lost
    assert s.keys() == [c, a, b]
    s.close()


def test_touches_refused_by_the_file_system_leave_reads_alone(tmp_path, monkeypatch, caplog):
    (a,) = make_keys(1)
    s = LocalDirStore(tmp_path, LAYOUT)
    assert s.write(a, content(a))
    _read(s, a)
    err = [errno.EPERM]

    def refused(path, *args, **kwargs):
        raise OSError(err[0], os.strerror(err[0]), path)

    monkeypatch.setattr(os, "utime", refused)
    with caplog.at_level(logging.INFO, logger="dualpath_jax.store.local_dir"):
        s.refresh()  # EPERM (another user's file): logged once, its mtime stays
        _read(s, a)
        err[0] = errno.EROFS
        s.close()  # a read-only mount: touching turned off
    assert "cannot set the mtime" in caplog.text and "read-only" in caplog.text
    _read(s, a)
    assert s._touch_s is None and not s._used_keys  # (no more uses noted)


def test_reading_every_layer_out_of_order_into_a_full_block_shaped_array_is_refused(tmp_path):
    s = LocalDirStore(tmp_path, LAYOUT)
    (k,) = make_keys(1)
    assert s.write(k, content(k))
    L = LAYOUT.num_layers
    blocks = content(k).reshape(L, -1)
    shaped = np.zeros(LAYOUT.full_block_shape, np.uint8)
    for layers in (list(range(L))[::-1], [0] * L):
        with pytest.raises(ValueError, match="ambiguous"):  # was packed, silently: layer L-1 in shaped[0]
            s.read(k, shaped, layers=layers)
        flat = np.zeros(LAYOUT.full_block_nbytes, np.uint8)  # a flat buffer: packed in the order given (documented)
        assert s.read(k, flat, layers=layers)
        np.testing.assert_array_equal(flat.reshape(L, -1), blocks[layers])
    assert s.read(k, shaped, layers=range(L))  # in order: packed and in place are the same bytes
    np.testing.assert_array_equal(shaped.reshape(L, -1), blocks)
    area = np.zeros((L, 3 * LAYOUT.block_tokens, LAYOUT.bytes_per_token_per_layer), np.uint8)
    rows = area[:, LAYOUT.block_tokens : 2 * LAYOUT.block_tokens]  # the same shape, row-strided: in place
    assert s.read(k, rows, layers=list(range(L))[::-1])
    np.testing.assert_array_equal(rows.reshape(L, -1), blocks)
    part = np.zeros(LAYOUT.full_block_shape, np.uint8)  # fewer layers into a Full Block: in place, any order
    assert s.read(k, part, layers=[1, 0])
    np.testing.assert_array_equal(part.reshape(L, -1)[:2], blocks[:2])
    s.close()


def _dead_pid() -> int:
    """A pid no process has (past the kernel's pid_max)."""
    with open("/proc/sys/kernel/pid_max") as f:
        return int(f.read()) + 1


def test_a_write_sweeps_its_directory_of_dead_writers_temp_files(tmp_path, monkeypatch):
    (k,) = make_keys(1)
    s = LocalDirStore(tmp_path, LAYOUT)
    d = os.path.dirname(s.path_of(k))
    os.makedirs(d, exist_ok=True)
    dead = os.path.join(d, f".tmp.{s._host}.{_dead_pid()}.abcd1234.{k.hex()}")  # a writer killed since the open
    live = os.path.join(d, f".tmp.{s._host}.{os.getppid()}.abcd1234.{k.hex()}")  # a live writer's
    own = os.path.join(d, f".tmp.{s._host}.{os.getpid()}.abcd1234.{k.hex()}")  # this process's: in flight
    for p in (dead, live, own):
        with open(p, "wb") as f:
            f.write(b"partial")
    os.utime(own, (1e9, 1e9))  # (older than stale_temp_s: only the skip of this process's own keeps it)
    assert s.write(k, content(k))  # within TEMP_SWEEP_S of the open (which swept every directory): no listing
    assert os.path.exists(dead) and s.stats().temp_files_removed == 0
    monkeypatch.setattr(local_dir, "TEMP_SWEEP_S", 0.0, raising=False)
    assert s.write(k, content(k), overwrite=True)
    assert not os.path.exists(dead)  # was: left until the next open or refresh()
    assert os.path.exists(live) and os.path.exists(own)
    assert s.stats().temp_files_removed == 1
    s.close()
