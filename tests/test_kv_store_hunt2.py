"""LocalDirStore, second hunt: capacity of blocks indexed by reads and dedup writes, numpy-int layouts, caller
buffers of ndarray subclasses."""

import logging
import os
import warnings

import numpy as np
import pytest

from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.store import LocalDirStore, block_file

LAYOUT = BlockLayout(num_layers=4, block_tokens=8, bytes_per_token_per_layer=24, fingerprint="test-model/hunt2")
FB = LAYOUT.full_block_nbytes
LBN = LAYOUT.layer_block_nbytes
FNB = block_file.file_nbytes(LAYOUT)


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def content(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, FB, dtype=np.uint8)


@pytest.mark.parametrize("how", ["read", "layer_read", "dedup_write"])
def test_blocks_of_another_store_indexed_by_reads_or_dedup_writes_stay_within_capacity(tmp_path, how):
    """A store with a capacity of 3 blocks that reads (or writes again) 5 blocks another store object wrote: it
    indexed all 5 (used_bytes 5 blocks) without evicting any; lookup already evicted to fit such blocks."""
    small = LocalDirStore(tmp_path / "kv", LAYOUT, capacity_bytes=3 * FNB)
    other = LocalDirStore(tmp_path / "kv", LAYOUT)
    keys = [key(i) for i in range(5)]
    for i, k in enumerate(keys):
        assert other.write(k, content(i))
    for i, k in enumerate(keys):
        if how == "read":
            out = np.zeros(FB, np.uint8)
            assert small.read(k, out)
            np.testing.assert_array_equal(out, content(i))
        elif how == "layer_read":
            out = np.zeros(LBN, np.uint8)
            assert small.read(k, out, layers=[2])
            np.testing.assert_array_equal(out, content(i)[2 * LBN : 3 * LBN])
        else:
            assert small.write(k, content(i))
        assert small.used_bytes <= 3 * FNB, i
    assert small.keys() == keys[2:]  # the LRU ones were evicted, the latest kept
    assert small.stats().evictions == 2
    files = {f for _, _, fs in os.walk(tmp_path / "kv") for f in fs if f.endswith(".kvb")}
    assert files == {os.path.basename(small.path_of(k)) for k in keys[2:]}
    small.close()
    other.close()


def test_a_read_of_another_stores_block_with_every_block_pinned_leaves_it_unindexed(tmp_path):
    small = LocalDirStore(tmp_path / "kv", LAYOUT, capacity_bytes=2 * FNB)
    other = LocalDirStore(tmp_path / "kv", LAYOUT)
    for i in range(2):
        assert small.write(key(i), content(i))
    assert other.write(key(9), content(9))
    out = np.zeros(FB, np.uint8)
    with small.pinned([key(0), key(1)]):
        assert small.read(key(9), out)  # a hit all the same (its bytes are right)
        np.testing.assert_array_equal(out, content(9))
        assert small.keys() == [key(0), key(1)] and small.used_bytes == 2 * FNB
    assert os.path.exists(small.path_of(key(9)))  # its file stays, as before the read
    small.close()
    other.close()


def test_a_layout_of_numpy_int32_sizes_does_not_wrap(tmp_path):
    """DeepSeek-V3's numbers as np.int32 (BlockLayout takes numpy ints): sizes were computed in int32, so a store
    with a 2 GiB capacity could not open (OverflowError) and used_bytes of 900 blocks (2.3 GB) was negative."""
    lay = BlockLayout(np.int32(61), np.int32(64), np.int32(656), "deepseek-v3/fp8")
    assert 1000 * lay.full_block_nbytes == 1000 * 61 * 64 * 656
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (numpy's overflow warnings)
        LocalDirStore(tmp_path / "cap", lay, capacity_bytes=2 << 30).close()
        s = LocalDirStore(tmp_path / "kv", lay)
        keys = [key(i) for i in range(900)]
        for k in keys:  # sparse block files of the right size: lookup indexes them by their size (no disk used)
            p = s.path_of(k)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as f:
                f.truncate(s.file_nbytes)
        assert s.lookup(keys) == 900
        assert s.used_bytes == 900 * (4096 + 61 * 64 * 656)
    s.close()


def test_a_numpy_int8_layout_is_a_valid_layout():
    lay = BlockLayout(np.int8(4), np.int8(64), np.int8(100), "m")  # (was: "Python integer 4096 out of bounds")
    assert lay.full_block_nbytes == 4 * 64 * 100 and block_file.file_nbytes(lay) == 4096 + 4 * 64 * 100


@pytest.mark.parametrize("cfg", [{}, {"native_verify": False}, {"read_method": "preadv", "native_verify": False}])
@pytest.mark.parametrize("layers", [None, [2, 0]])
def test_a_read_into_an_ndarray_subclass_reads_right_and_keeps_the_block(tmp_path, caplog, cfg, layers):
    """np.matrix `out` (an ndarray whose slices stay 2-D): the Python loops found a checksum mismatch and removed
    the valid block as corrupt (the compiled ones raised a Cython dimension error)."""
    s = LocalDirStore(tmp_path / "kv", LAYOUT, **cfg)
    src = content(1)
    assert s.write(key(1), src)
    want = src if layers is None else np.concatenate([src[i * LBN : (i + 1) * LBN] for i in layers])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        out = np.asmatrix(np.zeros((1, want.size), np.uint8))
    with caplog.at_level(logging.WARNING):
        assert s.read(key(1), out, layers=layers)
    np.testing.assert_array_equal(np.asarray(out).ravel(), want)
    assert os.path.exists(s.path_of(key(1))) and s.stats().corrupt_blocks == 0
    s.close()


@pytest.mark.parametrize(
    "rm", [{"read_method": "preadv"}, {"read_method": "mmap", "mmap_min_bytes": 0, "mmap_after_reads": 0}]
)  # (mapped from the first read: without the compiled _verify, mmap_after_reads defaults to 1)
@pytest.mark.parametrize("how", ["remove", "corrupt"])
def test_a_read_that_ends_after_its_block_was_removed_does_not_index_it_again(tmp_path, caplog, rm, how):
    """A read in flight while its block is removed (remove(), or another read of it found a damaged Layer Block
    and removed it) returned True and indexed the block again: contains / lookup then reported a block whose file
    was gone, and it took a capacity slot."""
    s = LocalDirStore(tmp_path / "kv", LAYOUT, capacity_bytes=4 * FNB, **rm)
    k = key(7)
    assert s.write(k, content(7))
    method = "_read_fd" if rm["read_method"] == "preadv" else "_read_mapped"
    real = getattr(s, method)
    state = {"inner": False}

    def during_read(*args, **kwargs):
        r = real(*args, **kwargs)
        if not state["inner"]:  # (once, from the outer read, after it read its bytes)
            state["inner"] = True
            if how == "remove":
                assert s.remove(k)
            else:
                with open(s.path_of(k), "r+b") as f:  # damage Layer Block 3 in place
                    f.seek(block_file.header_nbytes(LAYOUT) + 3 * LBN)
                    f.write(b"\xff" * 8)
                with caplog.at_level(logging.CRITICAL):
                    assert not s.read(k, np.zeros(LBN, np.uint8), layers=[3])
        return r

    setattr(s, method, during_read)
    out = np.zeros(LBN, np.uint8)
    assert s.read(k, out, layers=[0])  # layer 0 was read before the removal: a hit with the right bytes
    np.testing.assert_array_equal(out, content(7)[:LBN])
    setattr(s, method, real)
    assert not os.path.exists(s.path_of(k))
    assert k not in s.keys() and s.used_bytes == 0
    assert not s.contains(k) and s.lookup([k]) == 0
    s.close()


def test_a_durable_write_of_a_block_stored_without_fsync_makes_it_durable(tmp_path, monkeypatch):
    """write(durable=True) "returns only once the block survives a power loss"; a block already stored by a
    non-durable write (this process's or another's) was a dedup that returned at once, with nothing fsync'ed."""
    s = LocalDirStore(tmp_path / "kv", LAYOUT)
    assert s.write(key(1), content(1))  # durable=False: in the page cache only
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert s.write(key(1), content(1), durable=True)
    path = s.path_of(key(1))
    assert path in synced and os.path.dirname(path) in synced
    assert os.path.dirname(os.path.dirname(path)) in synced  # blocks/: the fan-out directory's entry
    assert s.stats().writes == 1 and s.stats().write_dedup == 1  # (still a dedup: nothing rewritten)
    s.close()


@pytest.mark.parametrize("layers", [slice(1, 3), np.int64(2)])
def test_read_many_takes_the_layers_read_takes(tmp_path, layers):
    """read() takes a slice or a numpy int as `layers` (BlockLayout.normalize_layers); read_many raised
    "'slice' object is not iterable" for them."""
    s = LocalDirStore(tmp_path / "kv", LAYOUT)
    ks = [key(1), key(2)]
    for i, k in enumerate(ks, 1):
        assert s.write(k, content(i))
    idx = LAYOUT.normalize_layers(layers)
    outs = [np.zeros(len(idx) * LBN, np.uint8) for _ in ks]
    assert s.read_many(ks, outs, layers=layers) == [True, True]
    for i, o in enumerate(outs, 1):
        np.testing.assert_array_equal(o.reshape(-1, LBN), content(i).reshape(-1, LBN)[idx])
    s.close()


def test_refresh_forgets_blocks_removed_by_another_store_even_with_their_files_open(tmp_path):
    """refresh() "forgets removed ones", but an open (cached) file of a block another store removed kept serving
    reads, and each such read indexed the block again: lookup / contains / used_bytes counted a file that was gone
    (whose disk space the open file also kept)."""
    s = LocalDirStore(tmp_path / "kv", LAYOUT)
    other = LocalDirStore(tmp_path / "kv", LAYOUT)
    assert s.write(key(1), content(1)) and s.write(key(2), content(2))
    out = np.zeros(FB, np.uint8)
    assert s.read(key(1), out)  # its file is now open in s's fd cache
    assert other.remove(key(1))
    s.refresh()
    assert s.keys() == [key(2)]
    assert not s.read(key(1), out)  # a miss now: the block is gone
    assert s.keys() == [key(2)] and s.used_bytes == FNB
    assert s.lookup([key(1)]) == 0 and not s.contains(key(1))
    assert s.read(key(2), out)
    np.testing.assert_array_equal(out, content(2))
    s.close()
    other.close()


def test_a_write_that_cannot_make_room_evicts_nothing(tmp_path):
    """Capacity 3: A pinned, B, and C being overwritten (its new file in progress counts too). A write of D cannot
    fit even by evicting B (D would make 4 files with C's new one): it returned False, but evicted B first, for
    nothing."""
    import threading

    s = LocalDirStore(tmp_path / "kv", LAYOUT, capacity_bytes=3 * FNB)
    a, b, c, d = (key(i) for i in range(4))
    for i, k in enumerate((a, b, c)):
        assert s.write(k, content(i))
    s.pin([a])
    entered, go = threading.Event(), threading.Event()
    real = s._write_file

    def gated(path, k, *args):
        if k == c:
            entered.set()
            assert go.wait(10)
        return real(path, k, *args)

    s._write_file = gated
    t = threading.Thread(target=lambda: s.write(c, content(2), overwrite=True))
    t.start()
    assert entered.wait(10)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(logging.getLogger("dualpath_jax.store.local_dir"), "disabled", True)
        assert not s.write(d, content(3))
    go.set()
    t.join()
    assert s.keys() == [a, b, c] and os.path.exists(s.path_of(b))
    assert s.stats().evictions == 0 and s.stats().write_rejected == 1
    s.close()


def test_a_remove_whose_unlink_fails_raises_and_leaves_no_stale_index_entry(tmp_path):
    """Something else (a directory) at a block's path: `remove` raises the OS error, but its key no longer counts as
    stored (it stayed indexed, with its bytes in used_bytes)."""
    s = LocalDirStore(tmp_path / "kv", LAYOUT)
    k = key(1)
    assert s.write(k, content(1))
    os.unlink(s.path_of(k))
    os.mkdir(s.path_of(k))
    with pytest.raises(IsADirectoryError):
        s.remove(k)
    assert k not in s.keys() and s.used_bytes == 0
    s.close()
