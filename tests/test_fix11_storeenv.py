"""Fix wave 11, storeenv: the KV store (LocalDirStore) in real hostile environments, not monkeypatched ones: a full
tmpfs (ENOSPC), a read-only remount under an open store, a low RLIMIT_NOFILE, two processes on one capacity-limited
directory, and the store's directory removed or replaced under an open store.

The mounts need root and mount(8): where a mount is refused, the test skips, naming why. Every mount is unmounted by
the fixture (lazily if a file is still open), also when a test fails."""

import logging
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.store import LocalDirStore, block_file

# 256 KiB blocks (+ a 4 KiB header): a 4 MiB tmpfs holds 15 of them; verified Full-Block reads are mapped.
LAY = BlockLayout(num_layers=4, block_tokens=16, bytes_per_token_per_layer=4096, fingerprint="fix11-storeenv")
FNB = block_file.file_nbytes(LAY)
SMALL = BlockLayout(num_layers=2, block_tokens=4, bytes_per_token_per_layer=8, fingerprint="fix11-storeenv-small")
LOGGER = "dualpath_jax.store.local_dir"


def _key(i: int) -> bytes:
    return i.to_bytes(2, "little") + bytes(14)


def _block(i: int, lay: BlockLayout = LAY) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, lay.full_block_nbytes, dtype=np.uint8)


def _files(root) -> list[str]:
    """Every file under `root` (blocks, temp files, STORE.json), relative."""
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names)


def _blocks_on_disk(root) -> dict[str, int]:
    """Block file name -> size."""
    return {
        n: os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(root) for n in names if n.endswith(".kvb")
    }


def _ids(s: LocalDirStore) -> set[int]:
    return {int.from_bytes(k[:2], "little") for k in s.keys()}


def _reads_back(s: LocalDirStore, i: int, lay: BlockLayout = LAY) -> bool:
    """Block i reads and is bit-exact (a read that returns True with other bytes fails the test)."""
    out = np.zeros(lay.full_block_nbytes, np.uint8)
    if not s.read(_key(i), out):
        return False
    np.testing.assert_array_equal(out, _block(i, lay))
    return True


@pytest.fixture
def tmpfs(tmp_path):
    """`tmpfs(size)`: a new directory with a tmpfs of `size` mounted on it (skips where mounting is refused)."""
    mounts = []

    def mount(size: str = "4m"):
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root and mount(8)")
        d = tmp_path / f"mnt{len(mounts)}"
        d.mkdir()
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True, text=True
        )
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
        mounts.append(d)
        return d

    yield mount
    for d in reversed(mounts):  # (lazily if a store of a failed test still holds a file open there)
        if subprocess.run(["umount", str(d)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(d)], check=True)


def _remount(d, mode: str) -> None:
    r = subprocess.run(["mount", "-o", f"remount,{mode}", str(d)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot remount {d} {mode}: {r.stderr.strip()}")


# ---- 1. a size-limited tmpfs as the store root: a real ENOSPC ------------------------------------------------------


def test_a_full_disk_fails_later_writes_cleanly_and_keeps_every_stored_block(tmpfs, caplog):
    """Journey (no defect found): writes until a 4 MiB tmpfs is full (capacity_bytes=None). The writes that find no
    space fail (False, counted in write_errors, the first logged with the OS error), leave no temp file, and cost no block;
    the blocks stored before read back bit-exact; used_bytes counts exactly the block files on disk; removing blocks
    frees space so writes work again; a reopen finds exactly the stored blocks."""
    root = tmpfs("4m")
    s = LocalDirStore(root, LAY)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ok = [s.write(_key(i), _block(i)) for i in range(20)]
    n = ok.index(False)
    assert 10 <= n < 20 and ok == [True] * n + [False] * (20 - n)
    assert s.stats().write_errors == 20 - n and s.stats().writes == n
    assert caplog.text.count("No space left on device") == 1  # (once per full-disk spell; each one counted)
    assert not [f for f in _files(root) if ".tmp." in f]
    assert s.used_bytes == n * FNB == sum(_blocks_on_disk(root).values()) and _ids(s) == set(range(n))
    assert all(_reads_back(s, i) for i in range(n)) and not any(_reads_back(s, i) for i in range(n, 20))
    assert s.lookup([_key(i) for i in range(20)]) == n
    assert [s.remove(_key(i)) for i in range(2)] == [True, True]
    assert s.write(_key(100), _block(100)) and _reads_back(s, 100)
    s.close()
    again = LocalDirStore(root, LAY)
    assert _ids(again) == set(range(2, n)) | {100} and again.used_bytes == sum(_blocks_on_disk(root).values())
    assert all(_reads_back(again, i) for i in _ids(again))
    again.close()


def test_a_capacity_below_the_disk_size_evicts_before_the_disk_fills(tmpfs):
    """Journey (no defect found): capacity_bytes one block below what the tmpfs holds: the LRU blocks go, every write
    succeeds, the disk never fills, and a reopen finds exactly the indexed blocks."""
    root = tmpfs("4m")
    s = LocalDirStore(root, LAY, capacity_bytes=13 * FNB)
    assert all(s.write(_key(i), _block(i)) for i in range(30))
    st = s.stats()
    assert st.write_errors == 0 and st.evictions == 17 and _ids(s) == set(range(17, 30))
    assert s.used_bytes == 13 * FNB == sum(_blocks_on_disk(root).values())
    assert all(_reads_back(s, i) for i in range(17, 30))
    s.close()
    again = LocalDirStore(root, LAY, capacity_bytes=13 * FNB)
    assert _ids(again) == set(range(17, 30))
    again.close()


def test_a_full_disk_below_capacity_says_that_capacity_must_leave_room(tmpfs, caplog):
    """With capacity_bytes at the disk's size, the disk fills before the capacity is reached: a write evicts only once
    its block is stored (documented: the disk must hold the writes in flight beyond capacity_bytes), so every later
    write fails with ENOSPC and the store takes no new block until blocks are removed. The log only said "No space
    left on device (not stored)", with the store under its capacity. It now says that the disk is full with so many
    bytes stored, that nothing is evicted for a full disk, and that capacity_bytes must leave room."""
    root = tmpfs("4m")
    s = LocalDirStore(root, LAY, capacity_bytes=4 << 20)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ok = [s.write(_key(i), _block(i)) for i in range(17)]
    n = ok.index(False)
    assert ok == [True] * n + [False] * (17 - n) and s.stats().evictions == 0
    assert "No space left on device" in caplog.text
    assert f"capacity_bytes={4 << 20}" in caplog.text and "must leave room" in caplog.text
    assert f"full with {n * FNB} B" in caplog.text
    assert all(_reads_back(s, i) for i in range(n))
    s.close()


# ---- 2. a read-only remount under an open store --------------------------------------------------------------------


def test_a_read_only_remount_keeps_reads_and_fails_writes_and_removes_clearly(tmpfs, caplog):
    """Reads (Full Block, Layer Blocks, verify, dedup writes) work on a read-only remount; writes fail (False, counted,
    logged with EROFS) and cost no block; `remove` raises the OS error. The remove used to drop the key from the index
    although its file stayed (and read back): used_bytes undercounted the disk by a block per failed remove. A block
    file still there now stays indexed and counted, as a failed eviction's. Remounted rw, writes and removes work
    again and a reopen finds exactly the blocks on disk."""
    root = tmpfs("4m")
    s = LocalDirStore(root, LAY, capacity_bytes=5 * FNB)
    assert all(s.write(_key(i), _block(i)) for i in range(5))
    _remount(root, "ro")
    try:
        assert all(_reads_back(s, i) for i in range(5))
        layer = np.zeros(LAY.layer_block_nbytes, np.uint8)
        assert s.read(_key(1), layer, layers=[2])
        np.testing.assert_array_equal(layer, _block(1).reshape(LAY.num_layers, -1)[2])
        assert s.verify(_key(3)) and s.write(_key(1), _block(1))  # (a dedup write: the stored block is good)
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assert not s.write(_key(10), _block(10))  # (needs an eviction too: none happens)
            assert not s.write(_key(2), _block(2), overwrite=True)
        # (one warning per spell of failures of one cause, the rest counted: 2026-12-06, it was one per write)
        assert caplog.text.count("Read-only file system") == 1 and s.stats().write_errors == 2
        with pytest.raises(OSError, match="Read-only file system"):
            s.remove(_key(2))
        assert _ids(s) == set(range(5)) and s.used_bytes == 5 * FNB == sum(_blocks_on_disk(root).values())
        assert s.stats().evictions == 0 and all(_reads_back(s, i) for i in range(5))
        s.refresh()
        assert _ids(s) == set(range(5))
        with caplog.at_level(logging.WARNING, logger=LOGGER):  # a smaller store opened there cannot evict: it opens
            small = LocalDirStore(root, LAY, capacity_bytes=3 * FNB)
        assert small.stats().evict_failures == 5 and _ids(small) == set(range(5))
        # (one warning for the five blocks: it was one per block, 2026-12-06)
        assert caplog.text.count("could not evict") == 1 and "logged at debug level" in caplog.text
        assert all(_reads_back(small, i) for i in range(5))
        small.close()
    finally:
        _remount(root, "rw")
    assert s.remove(_key(2)) and s.write(_key(10), _block(10))
    assert _ids(s) == {0, 1, 3, 4, 10} and s.stats().evictions == 0
    on_disk = _blocks_on_disk(root)
    assert s.used_bytes == sum(on_disk.values()) == len(_ids(s)) * FNB
    s.close()
    again = LocalDirStore(root, LAY, capacity_bytes=5 * FNB)
    assert _ids(again) == _ids(s) and all(_reads_back(again, i) for i in _ids(again))
    again.close()


# ---- 3. a low open-file limit (RLIMIT_NOFILE) ----------------------------------------------------------------------

_FD_SCRIPT = textwrap.dedent(
    """
    import logging, os, resource, sys
    import numpy as np
    from dualpath_jax.kv_layout import BlockLayout
    from dualpath_jax.store import LocalDirStore
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    root, tpl, limit, before = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "before"
    lay = BlockLayout(num_layers=2, block_tokens=4, bytes_per_token_per_layer=tpl, fingerprint="fix11-fd")
    def key(i): return i.to_bytes(2, "little") + bytes(14)
    def block(i): return np.random.default_rng(i).integers(0, 256, lay.full_block_nbytes, dtype=np.uint8)
    s = LocalDirStore(root, lay)
    assert all(s.write(key(i), block(i)) for i in range(100))
    s.close()
    base = len(os.listdir("/proc/self/fd"))
    if before:  # the limit set before the store opens
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    s = LocalDirStore(root, lay)  # fd_cache=64 (the default), larger than the limit allows
    if not before:  # the limit lowered under the open store
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    out = np.zeros(lay.full_block_nbytes, np.uint8)
    good = 0
    for rnd in range(2):
        for i in range(100):
            out[:] = 0
            if s.read(key(i), out):
                assert (out == block(i)).all(), i  # never wrong KV
                good += 1
    outs = [np.zeros(lay.full_block_nbytes, np.uint8) for _ in range(100)]
    good += sum(s.read_many([key(i) for i in range(100)], outs))
    assert all((o == block(i)).all() for i, o in enumerate(outs) if o.any())
    with open(os.devnull) as f:  # the process can still open files
        pass
    s.close()
    print("RESULT", good, s.stats().read_errors, len(os.listdir("/proc/self/fd")) - base)
    """
)


@pytest.mark.parametrize(
    "tpl, limit, when",
    [(8, 40, "before"), (8, 40, "after"), (65536, 40, "after"), (65536, 41, "after")],
    ids=["small-limit-at-open", "small-limit-lowered", "mapped-limit-lowered", "mapped-limit-lowered-odd"],
)
def test_an_fd_cache_larger_than_the_open_file_limit_does_not_starve_reads(tmp_path, tpl, limit, when):
    """fd_cache=64 in a process whose RLIMIT_NOFILE is 40: the cache kept files open until the process had no fd
    left, then every read of a block not cached failed with EMFILE ("treated as a miss", for good: the cache only
    shrinks past fd_cache) and nothing else in the process could open a file. A mapped block holds 2 fds (mmap keeps a
    dup), so with 0.5 MiB blocks the mapping failed first (read_errors). Now fd_cache is capped at a quarter of the
    limit at open (logged), and an open or mapping that fails with EMFILE/ENFILE halves the cache (logged, naming
    RLIMIT_NOFILE) and tries once more. Every read succeeds bit-exact, and no fd is left open after close()."""
    r = subprocess.run(
        [sys.executable, "-c", _FD_SCRIPT, str(tmp_path / "kv"), str(tpl), str(limit), when],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    good, read_errors, leaked = map(int, r.stdout.split("RESULT")[1].split())
    assert (good, read_errors, leaked) == (300, 0, 0), r.stderr[-3000:]
    assert "RLIMIT_NOFILE" in r.stderr and "Too many open files" not in r.stderr.replace("(Too many open files;", "")


# ---- 4. two processes on one capacity-limited directory ------------------------------------------------------------

_MIX_SCRIPT = textwrap.dedent(
    """
    import logging, random, sys
    import numpy as np
    from dualpath_jax.kv_layout import BlockLayout
    from dualpath_jax.store import LocalDirStore, block_file
    logging.basicConfig(level=logging.ERROR)
    root, seed, fd_cache, method = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    lay = BlockLayout(num_layers=4, block_tokens=16, bytes_per_token_per_layer=1024, fingerprint="fix11-mix")
    def key(i): return i.to_bytes(2, "little") + bytes(14)
    def block(i): return np.random.default_rng(i).integers(0, 256, lay.full_block_nbytes, dtype=np.uint8)
    s = LocalDirStore(root, lay, capacity_bytes=8 * block_file.file_nbytes(lay), fd_cache=fd_cache, read_method=method)
    rng = random.Random(seed)
    out = np.zeros(lay.full_block_nbytes, np.uint8)
    two = np.zeros(2 * lay.layer_block_nbytes, np.uint8)
    hits = 0
    for _ in range(1500):
        i, op = rng.randrange(24), rng.random()
        if op < 0.4:
            s.write(key(i), block(i))
        elif op < 0.7:
            out[:] = 0
            if s.read(key(i), out):
                assert (out == block(i)).all(), ("wrong or torn KV", i)
                hits += 1
        elif op < 0.8:
            if s.read(key(i), two, layers=[1, 3]):
                assert (two.reshape(2, -1) == block(i).reshape(4, -1)[[1, 3]]).all(), ("wrong layers", i)
                hits += 1
        elif op < 0.9:
            s.lookup([key(i), key(i + 1)])
        elif op < 0.95:
            s.remove(key(i))
        else:
            s.refresh()
    st = s.stats()
    s.close()
    print("RESULT", hits, st.read_corrupt, st.corrupt_blocks, st.write_errors)
    """
)


@pytest.mark.parametrize("fd_cache, method", [(64, "mmap"), (0, "preadv")])
def test_two_processes_writing_reading_and_evicting_in_one_directory(tmp_path, fd_cache, method):
    """Journey (no defect found): two processes write, read (Full Block and Layer Blocks), look up, remove, refresh
    and evict (capacity 8 blocks) in one directory at once: never wrong or torn KV, no crash, no block taken for
    corrupt, no write error; afterwards no temp file is left and a reopen indexes at most the capacity, every block
    reading back bit-exact."""
    root = str(tmp_path / "kv")
    lay = BlockLayout(num_layers=4, block_tokens=16, bytes_per_token_per_layer=1024, fingerprint="fix11-mix")
    LocalDirStore(root, lay).close()  # (STORE.json first)
    cmd = [sys.executable, "-c", _MIX_SCRIPT, root]
    procs = [subprocess.Popen([*cmd, str(seed), str(fd_cache), method], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for seed in (1, 2)]  # fmt: skip
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        hits, read_corrupt, corrupt, write_errors = map(int, out.split("RESULT")[1].split())
        assert hits > 50 and (read_corrupt, corrupt, write_errors) == (0, 0, 0)
    assert not [f for f in _files(root) if ".tmp." in f]
    cap = 8 * block_file.file_nbytes(lay)
    again = LocalDirStore(root, lay, capacity_bytes=cap)
    assert 0 < again.used_bytes <= cap and again.used_bytes == sum(_blocks_on_disk(root).values())
    for k in again.keys():
        out = np.zeros(lay.full_block_nbytes, np.uint8)
        i = int.from_bytes(k[:2], "little")
        assert again.read(k, out)
        np.testing.assert_array_equal(out, np.random.default_rng(i).integers(0, 256, lay.full_block_nbytes, np.uint8))
    again.close()


# ---- 5. the store's directory removed or replaced under an open store ----------------------------------------------


@pytest.mark.parametrize("how", ["rm -rf", "mv away"])
def test_a_store_directory_removed_under_an_open_store(tmp_path, caplog, how):
    """`rm -rf` of the store root (or moving it away) under an open store: reads and lookups are misses (a file the
    fd cache still holds reads its own block: right KV), never wrong KV or a traceback. A write made the missing
    directories again (os.makedirs) without STORE.json and said nothing: the store went on filling a directory that
    no longer was a store. Now a write fails (False, counted, logged naming the gone directory), nothing is made, and
    refresh() raises a RuntimeError saying so (it raised FileNotFoundError from its listing only when no write had
    remade blocks/)."""
    root = tmp_path / "kv"
    s = LocalDirStore(root, SMALL, fd_cache=0)
    assert all(s.write(_key(i), _block(i, SMALL)) for i in range(4))
    if how == "rm -rf":
        shutil.rmtree(root)
    else:
        os.rename(root, tmp_path / "old")
    assert not any(_reads_back(s, i, SMALL) for i in range(4)) and s.stats().read_absent == 4
    assert s.lookup([_key(i) for i in range(4)]) == 0 and not s.contains(_key(1))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert not s.write(_key(9), _block(9, SMALL))
    assert "is gone" in caplog.text and str(root) in caplog.text and s.stats().write_errors == 1
    assert not root.exists()
    with pytest.raises(RuntimeError, match="is gone .*reopen the store"):
        s.refresh()
    s.close()
    again = LocalDirStore(root, SMALL)  # (a reopen makes a new, empty store)
    assert again.keys() == [] and again.write(_key(9), _block(9, SMALL)) and _reads_back(again, 9, SMALL)
    again.close()


def test_another_models_store_moved_in_place_is_left_alone(tmp_path, caplog):
    """Another model's store moved to the root of an open store (`mv other kv`): its blocks are of another size,
    which this store took for damage: the first lookup reaching one removed it, a refresh removed them all, and
    writes put this model's blocks into the other model's store (whose own reads then removed them). Now nothing in
    a directory that is not the one the store opened is removed or written: lookups and reads are misses (logged
    "not a block of this store ... not removed"), writes fail naming the replaced directory, refresh() raises; the
    other store reopens with every block."""
    root, other_root = tmp_path / "kv", tmp_path / "other"
    other_lay = BlockLayout(num_layers=3, block_tokens=4, bytes_per_token_per_layer=8, fingerprint="fix11-other")
    s = LocalDirStore(root, SMALL, capacity_bytes=3 * block_file.file_nbytes(SMALL))
    assert all(s.write(_key(i), _block(i, SMALL)) for i in range(3))
    o = LocalDirStore(other_root, other_lay)
    assert all(o.write(_key(i), _block(i, other_lay)) for i in range(10, 16))
    o.close()
    shutil.rmtree(root)
    os.rename(other_root, root)
    before = _files(root)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert s.lookup([_key(10)]) == 0
        out = np.zeros(SMALL.full_block_nbytes, np.uint8)
        assert not s.read(_key(11), out) and not s.read(_key(0), out)  # (0: indexed, so a lookup hit until read)
        assert s.lookup([_key(0)]) == 0
        assert not s.write(_key(20), _block(20, SMALL)) and not s.write(_key(12), _block(12, SMALL))
        with pytest.raises(RuntimeError, match="is another directory now"):
            s.refresh()
    assert "not removed" in caplog.text and "not a store of this layout (replaced)" in caplog.text
    assert _files(root) == before and s.stats().write_errors == 2
    s.close()
    reopened = LocalDirStore(root, other_lay)
    assert _ids(reopened) == set(range(10, 16)) and all(_reads_back(reopened, i, other_lay) for i in range(10, 16))
    reopened.close()


def test_a_store_of_the_same_layout_moved_in_place_is_used(tmp_path):
    """Journey (behaviour kept): a store of the same model and layout moved to the root of an open store is a store
    of this model (a key names the same KV in both): reads give its blocks, writes go into it, refresh indexes it.
    (The check of the directory's identity accepts another directory whose STORE.json is of this layout, so a file
    system whose inode numbers are not stable, FUSE, does not fail writes either.)"""
    root, other_root = tmp_path / "kv", tmp_path / "other"
    s = LocalDirStore(root, SMALL, fd_cache=0)
    assert all(s.write(_key(i), _block(i, SMALL)) for i in range(3))
    o = LocalDirStore(other_root, SMALL)
    assert all(o.write(_key(i), _block(i, SMALL)) for i in range(2, 6))
    o.close()
    shutil.rmtree(root)
    os.rename(other_root, root)
    assert not _reads_back(s, 0, SMALL) and _reads_back(s, 4, SMALL)
    assert s.write(_key(9), _block(9, SMALL)) and os.path.exists(s.path_of(_key(9)))
    s.refresh()
    assert _ids(s) == {2, 3, 4, 5, 9}
    s.close()
