"""LocalDirStore: races between its threads (each window forced deterministically), the index and capacity
accounting against odd directory contents, durability of new directories, and fork with the store in use."""

import collections
import errno
import json
import os
import shutil
import signal
import threading

import numpy as np
import pytest

from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.store import LocalDirStore, block_file

LAYOUT = BlockLayout(num_layers=4, block_tokens=16, bytes_per_token_per_layer=40, fingerprint="test-model/bf16")
FB = LAYOUT.full_block_nbytes
FNB = block_file.file_nbytes(LAYOUT)


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def block(fill: int) -> np.ndarray:
    return np.full(FB, fill, np.uint8)


def files_on_disk(root) -> set[str]:
    return {f for _, _, fs in os.walk(root) for f in fs if f.endswith(".kvb")}


def assert_accounting(s: LocalDirStore) -> None:
    """The index, used_bytes and the block files on disk agree, within capacity."""
    keys = s.keys()
    assert s.used_bytes == len(keys) * FNB
    assert files_on_disk(s.root) == {os.path.basename(s.path_of(k)) for k in keys}
    if s.capacity_bytes is not None:
        assert s.used_bytes <= s.capacity_bytes


def _hook_os(monkeypatch, name: str, path: str, action, when: str):
    """Wrap os.<name> so that `action()` runs once, at the first call on `path`: "before_raise" when that call
    raises FileNotFoundError (after the check, before the caller sees it), "after" when it succeeds."""
    real = getattr(os, name)
    state = {"done": False, "busy": False}

    def wrapper(p, *args, **kwargs):
        if state["done"] or state["busy"] or os.fspath(p) != path:
            return real(p, *args, **kwargs)
        try:
            r = real(p, *args, **kwargs)
        except FileNotFoundError:
            if when == "before_raise":
                state["done"] = state["busy"] = True
                action()
                state["busy"] = False
            raise
        if when == "after":
            state["done"] = state["busy"] = True
            action()
            state["busy"] = False
        return r

    monkeypatch.setattr(os, name, wrapper)
    return state


def _gate_reads(s: LocalDirStore) -> tuple[threading.Event, threading.Event]:
    """Make `s`'s reads stop once they opened their file: `entered` is set then, and they go on once `go` is."""
    entered, go = threading.Event(), threading.Event()
    real = s._read_fd

    def gated(*args, **kwargs):
        entered.set()
        assert go.wait(10)
        return real(*args, **kwargs)

    s._read_fd = gated
    return entered, go


# ---- #11: a miss racing a write of the same key ----------------------------------------------------------------
def test_a_lookup_miss_racing_a_write_keeps_the_written_block_indexed(tmp_path, monkeypatch):
    """lookup stats k (absent), a write of k lands and is indexed, then the lookup handles its miss: k must stay
    in the index (else its file is untracked: never evicted, outside the capacity)."""
    s = LocalDirStore(tmp_path / "kv", LAYOUT, 3 * FNB)
    k = key(1)
    st = _hook_os(monkeypatch, "stat", s.path_of(k), lambda: s.write(k, block(1)), "before_raise")
    assert s.lookup([k]) == 0  # (absent when it looked)
    assert st["done"]
    monkeypatch.undo()
    assert k in s.keys()
    assert_accounting(s)
    for i in range(2, 8):  # k is evicted in turn like any block: the directory stays within capacity
        s.write(key(i), block(i))
        assert_accounting(s)
    assert not os.path.exists(s.path_of(k))
    s.close()


def test_a_read_miss_racing_a_write_keeps_the_written_block_indexed(tmp_path, monkeypatch, rm):
    s = LocalDirStore(tmp_path / "kv", LAYOUT, 3 * FNB, **rm)
    k = key(1)
    st = _hook_os(monkeypatch, "open", s.path_of(k), lambda: s.write(k, block(1)), "before_raise")
    assert not s.read(k, np.zeros(FB, np.uint8))
    assert st["done"]
    monkeypatch.undo()
    assert k in s.keys()
    assert_accounting(s)
    out = np.zeros(FB, np.uint8)
    assert s.read(k, out) and (out == 1).all()
    s.close()


def test_a_dedup_write_racing_the_eviction_of_its_block_stores_it_again(tmp_path, monkeypatch):
    """write(k) finds k's file (dedup), then another write evicts k, then the dedup would re-index k: an index
    entry without a file. The write must store k again instead."""
    s = LocalDirStore(tmp_path / "kv", LAYOUT, FNB)
    a, b = key(1), key(2)
    s.write(a, block(1))
    real = os.stat
    state = {"done": False}

    def stat(p, *args, **kwargs):
        r = real(p, *args, **kwargs)
        if not state["done"] and os.fspath(p) == s.path_of(a):
            state["done"] = True
            s.write(b, block(2))  # evicts a (capacity: one block)
        return r

    monkeypatch.setattr(os, "stat", stat)
    assert s.write(a, block(1))
    monkeypatch.undo()
    assert state["done"]
    assert s.keys() == [a]
    assert_accounting(s)
    out = np.zeros(FB, np.uint8)
    assert s.read(a, out) and (out == 1).all()
    s.close()


# ---- #2: an fd opened before a removal must not be cached after it ---------------------------------------------
def test_an_fd_opened_before_a_remove_and_rewrite_is_not_cached(tmp_path, monkeypatch, rm):
    """A read opens k's file; before it caches the fd, remove(k) and write(k, new) run (they forget k's cached
    fd). The fd of the removed file must not enter the cache: every later read gives the new block."""
    s = LocalDirStore(tmp_path / "kv", LAYOUT, **rm)
    k = key(1)
    s.write(k, block(1))

    def replace():
        s.remove(k)
        assert s.write(k, block(2))

    st = _hook_os(monkeypatch, "open", s.path_of(k), replace, "after")
    out = np.zeros(FB, np.uint8)
    s.read(k, out)  # (in flight at the removal: may give either block)
    assert st["done"]
    monkeypatch.undo()
    for _ in range(3):
        out[:] = 0
        assert s.read(k, out)
        assert (out == 2).all()
        out1 = np.zeros(LAYOUT.layer_block_nbytes, np.uint8)
        assert s.read(k, out1, layers=[1]) and (out1 == 2).all()
    s.close()


# ---- #12: a write with room to spare does not walk the index -----------------------------------------------------
class _CountingIndex(collections.OrderedDict):
    """An OrderedDict that counts the keys iterated over (list(), for loops)."""

    walked = 0

    def __iter__(self):
        for k in super().__iter__():
            _CountingIndex.walked += 1
            yield k


def test_eviction_checks_first_and_walks_only_the_lru_end(tmp_path):
    n = 20_000
    s = LocalDirStore(tmp_path / "kv", LAYOUT, (n + 10) * FNB)
    idx = _CountingIndex()
    with s._lock:
        for i in range(n):  # as a store opened on a directory of n blocks has it (no files needed here)
            idx[key(10**6 + i)] = 1
        s._index = idx  # (the store's used bytes follow from its index)
    _CountingIndex.walked = 0
    for i in range(5):  # room to spare: no walk at all
        assert s.write(key(i), block(i))
    assert _CountingIndex.walked == 0
    s.pin([key(10**6)])  # the LRU block is pinned: skipped
    for i in range(5, 15):  # the last 5 each evict one block, found at the LRU end
        assert s.write(key(i), block(i))
    assert _CountingIndex.walked <= 10 * 3
    assert key(10**6) in s._index and key(10**6 + 1) not in s._index and key(10**6 + 6) in s._index
    assert s.used_bytes <= s.capacity_bytes
    s.close()


# ---- #5: lookup never evicts its own hits ---------------------------------------------------------------------
def test_lookup_does_not_evict_the_blocks_it_reports(tmp_path):
    """s1 (capacity 3 blocks) looks up 5 blocks another store wrote: it must not unlink its own leading hits to
    fit them; it reports (and indexes) only what fits, and the blocks stay on disk."""
    d = tmp_path / "kv"
    s1 = LocalDirStore(d, LAYOUT, 3 * FNB)
    s2 = LocalDirStore(d, LAYOUT)
    keys = [key(i) for i in range(1, 6)]
    for i, k in enumerate(keys):
        s2.write(k, block(i))
    n = s1.lookup(keys)
    assert all(os.path.exists(s1.path_of(k)) for k in keys)
    assert n == 3 and s1.lookup(keys) == 3
    assert s1.used_bytes == len(s1.keys()) * FNB <= s1.capacity_bytes
    # with older blocks of its own it evicts those first
    s3 = LocalDirStore(tmp_path / "kv3", LAYOUT, 3 * FNB)
    old = [key(100 + i) for i in range(3)]
    for k in old:
        s3.write(k, block(9))
    s4 = LocalDirStore(tmp_path / "kv3", LAYOUT)
    for k in keys[:2]:
        s4.write(k, block(8))
    assert s3.lookup(keys[:2]) == 2
    assert all(os.path.exists(s3.path_of(k)) for k in keys[:2])
    assert [os.path.exists(s3.path_of(k)) for k in old] == [False, False, True]
    for s in (s1, s2, s3, s4):
        s.close()


# ---- #7: stray block files ------------------------------------------------------------------------------------
def test_stray_copies_of_a_block_are_removed_and_never_counted(tmp_path):
    d = tmp_path / "kv"
    s = LocalDirStore(d, LAYOUT)
    k = bytes(range(16))
    s.write(k, block(5))
    s.close()
    p = s.path_of(k)
    upper = os.path.join(os.path.dirname(p), k.hex().upper() + ".kvb")
    shutil.copy(p, upper)  # the same key spelled in upper case
    os.makedirs(os.path.join(d, "blocks", "ff"))
    wrong_dir = os.path.join(d, "blocks", "ff", k.hex() + ".kvb")
    shutil.copy(p, wrong_dir)  # a copy in the wrong fan-out directory
    s = LocalDirStore(d, LAYOUT, 3 * FNB)
    assert s.keys() == [k] and s.used_bytes == FNB
    assert not os.path.exists(upper) and not os.path.exists(wrong_dir)
    for i in range(3):
        s.write(key(i + 1), block(i))
    assert_accounting(s)
    assert not os.path.exists(p)  # evicted like any block: nothing of it stays
    s.close()


# ---- #6: internal read pins are not the callers' pins ------------------------------------------------------------
def test_unpin_of_an_unpinned_key_fails_while_a_read_of_it_is_in_flight(tmp_path):
    s = LocalDirStore(tmp_path / "kv", LAYOUT, 2 * FNB, read_method="preadv")
    k = key(1)
    s.write(k, block(1))
    entered, go = _gate_reads(s)
    t = threading.Thread(target=s.read, args=(k, np.zeros(FB, np.uint8)))
    t.start()
    assert entered.wait(10)
    try:
        with pytest.raises(ValueError, match="not pinned"):
            s.unpin([k])
        s.write(key(2), block(2))
        s.write(key(3), block(3))  # k is LRU but being read: key(2) goes instead
        assert os.path.exists(s.path_of(k)) and not os.path.exists(s.path_of(key(2)))
    finally:
        go.set()
        t.join(10)
    del s._read_fd
    assert not s._pins.get(k)
    s.write(key(4), block(4))
    s.write(key(5), block(5))  # k (read last, before key(4)) is now LRU, and nobody pins or reads it: evicted
    assert not os.path.exists(s.path_of(k))
    s.close()


# ---- #4: stat errors other than "absent" ------------------------------------------------------------------------
def test_a_block_path_that_cannot_be_stated_is_a_miss_and_the_store_opens(tmp_path, caplog):
    d = tmp_path / "kv"
    s = LocalDirStore(d, LAYOUT)
    good = key(7)
    s.write(good, block(7))
    k = bytes(range(16))
    p = s.path_of(k)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    os.symlink(p, p)  # a symlink loop: ELOOP
    assert not s.read(k, np.zeros(FB, np.uint8))
    assert s.lookup([k]) == 0 and not s.contains(k)
    assert s.lookup([good, k]) == 1
    s2 = LocalDirStore(d, LAYOUT)  # opens; the good block is indexed
    assert s2.keys() == [good]
    assert s.write(k, block(3))  # the write replaces the link with the block
    out = np.zeros(FB, np.uint8)
    assert s2.read(k, out) and (out == 3).all()
    for st in (s, s2):
        st.close()


def test_a_write_whose_stat_fails_is_a_counted_write_error(tmp_path, monkeypatch):
    s = LocalDirStore(tmp_path / "kv", LAYOUT)
    k = key(1)
    real_stat, real_open = os.stat, os.open

    def stat(p, *args, **kwargs):
        if os.fspath(p) == s.path_of(k):
            raise OSError(errno.EACCES, "Permission denied")
        return real_stat(p, *args, **kwargs)

    def open_(p, *args, **kwargs):
        if ".tmp." in os.fspath(p):
            raise OSError(errno.EACCES, "Permission denied")
        return real_open(p, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "open", open_)
    assert not s.write(k, block(1))
    assert s.stats().write_errors == 1
    s.close()


# ---- #1: a FIFO or a directory where a block file should be ------------------------------------------------------
@pytest.mark.parametrize("kind", ["fifo", "dir"])
def test_a_fifo_or_directory_at_a_block_path_is_a_prompt_miss_and_does_not_block_the_key(tmp_path, rm, kind):
    s = LocalDirStore(tmp_path / "kv", LAYOUT, **rm)
    k = key(1)
    p = s.path_of(k)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    os.mkfifo(p) if kind == "fifo" else os.mkdir(p)
    res = {}
    t = threading.Thread(target=lambda: res.setdefault("r", s.read(k, np.zeros(FB, np.uint8))), daemon=True)
    t.start()
    t.join(3)
    assert not t.is_alive(), "read() blocked"
    assert res["r"] is False
    assert s.lookup([k]) == 0
    assert s.write(k, block(4))  # the key is usable again
    out = np.zeros(FB, np.uint8)
    assert s.read(k, out) and (out == 4).all()
    s.close()


def test_a_directory_at_a_block_path_does_not_fail_writes_forever(tmp_path):
    s = LocalDirStore(tmp_path / "kv", LAYOUT)
    k = key(1)
    p = s.path_of(k)
    os.makedirs(p)
    assert s.write(k, block(4))
    out = np.zeros(FB, np.uint8)
    assert s.read(k, out) and (out == 4).all()
    s.close()


# ---- #8: numpy-int layouts; no temp file left when STORE.json cannot be written -------------------------------------
def test_a_layout_with_numpy_ints_opens_a_new_store(tmp_path):
    d = tmp_path / "kv"
    lay = BlockLayout(np.int64(4), np.int32(16), np.int64(40), "test-model/bf16")
    s = LocalDirStore(d, lay)
    s.write(key(1), block(1))
    s.close()
    assert not [f for f in os.listdir(d) if f.endswith(".tmp")]
    s = LocalDirStore(d, LAYOUT)  # the same layout in plain ints: the same store
    assert s.keys() == [key(1)]
    s.close()


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
def test_a_failed_metadata_write_leaves_no_temp_file(tmp_path, monkeypatch, code):
    """An I/O error is raised at open; a full disk opens the new store with its metadata pending (a cache: it costs
    hits, not the run). Neither leaves a temp file."""
    d = tmp_path / "kv"

    def dump(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(json, "dump", dump)
    if code == errno.EIO:
        with pytest.raises(OSError, match=os.strerror(code)):
            LocalDirStore(d, LAYOUT)
    else:
        s = LocalDirStore(d, LAYOUT)
        assert s.meta_pending
        s.close()
    assert not [f for f in os.listdir(d) if f.endswith(".tmp")]


# ---- #10: durable writes and creation fsync the parents of new entries ----------------------------------------
def test_durable_creation_and_first_block_of_a_fan_out_directory_fsync_their_parents(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    root = os.path.realpath(tmp_path) + "/kv"
    s = LocalDirStore(root, LAYOUT, durable=True)
    assert root in synced and os.path.dirname(root) in synced  # the root's entries, and the root's own entry
    assert any(p.startswith(root + "/STORE.json") for p in synced)
    synced.clear()
    k = bytes([0xAB]) * 16
    assert s.write(k, block(1))
    assert root + "/blocks/ab" in synced and root + "/blocks" in synced
    synced.clear()
    assert s.write(bytes([0xAB]) + bytes(15), block(2))  # the directory exists: only it is fsync'ed
    assert root + "/blocks/ab" in synced and root + "/blocks" not in synced
    s.close()


# ---- #3: fork with the store in use by other threads ---------------------------------------------------------------
def _in_child(fn) -> int:
    """Run fn() in a forked child (killed after 5 s); its exit status (0: fn returned True)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(5)
            code = 0 if fn() else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def test_a_child_forked_while_threads_use_the_store_can_use_it(tmp_path):
    s = LocalDirStore(tmp_path / "kv", LAYOUT, 2 * FNB, read_method="preadv")
    k = key(1)
    s.write(k, block(1))
    held, release = threading.Event(), threading.Event()

    def hold_lock():
        with s._lock:
            held.set()
            release.wait(10)

    entered, go = _gate_reads(s)
    reader = threading.Thread(target=s.read, args=(k, np.zeros(FB, np.uint8)))
    reader.start()
    assert entered.wait(10)
    del s._read_fd  # (the child's reads are not gated)
    locker = threading.Thread(target=hold_lock)
    locker.start()
    assert held.wait(10)

    def child() -> bool:
        ok = s.lookup([k]) == 1 and s.contains(k)
        out = np.zeros(FB, np.uint8)
        ok &= s.read(k, out) and bool((out == 1).all())
        ok &= s.write(key(2), block(2)) and s.write(key(3), block(3))
        ok &= not os.path.exists(s.path_of(k))  # the parent's read of k is not in flight here: k was evicted
        ok &= s.submit_read(key(3), out).result(5)
        return bool(ok)

    try:
        status = _in_child(child)
    finally:
        release.set()
        go.set()
        locker.join(10)
        reader.join(10)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    s.close()


def test_a_block_being_rewritten_is_not_evicted_before_it_is_indexed_again(tmp_path, monkeypatch):
    """An overwrite of k renames its new file into place; before it indexes k again, another write needs room.
    k must not be evicted in between (its new file unlinked, then indexed again: an entry without a file)."""
    s = LocalDirStore(tmp_path / "kv", LAYOUT, FNB)
    k, b = key(1), key(2)
    s.write(k, block(1))
    real = os.replace
    state = {"done": False}

    def replace(src, dst, *args, **kwargs):
        r = real(src, dst, *args, **kwargs)
        if not state["done"] and os.fspath(dst) == s.path_of(k):
            state["done"] = True
            s.write(b, block(2))  # no room: k is being written (rejected, or another block goes)
        return r

    monkeypatch.setattr(os, "replace", replace)
    assert s.write(k, block(3), overwrite=True)
    monkeypatch.undo()
    assert state["done"]
    assert_accounting(s)
    out = np.zeros(FB, np.uint8)
    assert s.read(k, out) and (out == 3).all()
    s.close()


def test_a_stat_on_hit_lookup_racing_an_eviction_does_not_index_the_evicted_block(tmp_path, monkeypatch):
    """lookup (stat_on_hit) stats k (present), then a write evicts k, then the lookup indexes k: an entry without
    a file, reported as a hit. It must re-check and report the miss."""
    s = LocalDirStore(tmp_path / "kv", LAYOUT, FNB, stat_on_hit=True)
    k, b = key(1), key(2)
    s.write(k, block(1))
    real = os.stat
    state = {"done": False}

    def stat(p, *args, **kwargs):
        r = real(p, *args, **kwargs)
        if not state["done"] and os.fspath(p) == s.path_of(k):
            state["done"] = True
            s.write(b, block(2))  # evicts k
        return r

    monkeypatch.setattr(os, "stat", stat)
    assert s.lookup([k]) == 0
    monkeypatch.undo()
    assert state["done"]
    assert s.keys() == [b]
    assert_accounting(s)
    s.close()
