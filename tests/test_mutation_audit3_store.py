"""Mutation audit 3, the store area: tests that kill hand mutations the rest of the suite let pass.

Modules: dualpath_jax/store/{local_dir,block_file,api}.py, kv_store.py, block_keys.py, host_buffers.py, kv_layout.py.
Each test names the mutation of the code it guards against and the contract (DESIGN.md "Contracts: Store": a
missing, truncated or checksum-failing block is a miss, counted and removed, never wrong KV; atomic writes; LRU
eviction that spares pinned blocks and blocks being read; capacity accounting; prefix-chained 16-byte keys).
"""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pytest

from dualpath_jax.block_keys import block_keys
from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.store import block_file
from dualpath_jax.store.local_dir import LocalDirStore

LAY = BlockLayout(4, 16, 40, "audit3-model/bf16")
FB = LAY.full_block_nbytes
LBN = LAY.layer_block_nbytes
FILE = block_file.file_nbytes(LAY)
RM = {
    "preadv": {"read_method": "preadv"},
    "mmap": {"read_method": "mmap", "mmap_min_bytes": 0, "mmap_after_reads": 0},
    "preadv-py": {"read_method": "preadv", "native_verify": False},
    "mmap-py": {"read_method": "mmap", "mmap_min_bytes": 0, "mmap_after_reads": 0, "native_verify": False},
}


def _key(i: int) -> bytes:
    return block_keys([i], 1)[0]


def _block(i: int, layout: BlockLayout = LAY) -> np.ndarray:
    return np.random.default_rng(1000 + i).integers(0, 256, layout.full_block_nbytes, dtype=np.uint8)


def _files(s: LocalDirStore) -> list[str]:
    return sorted(f for _, _, fs in os.walk(os.path.join(s.root, "blocks")) for f in fs)


# ---- block_file: the on-disk format ---------------------------------------------------------------------------


def _rewrite_header_field(path: str, offset: int, fmt: str, value: int) -> None:
    """Set one header field and recompute the header's crc32, so that only that field's own check can object."""
    with open(path, "r+b") as f:
        hdr = bytearray(f.read(block_file.header_nbytes(LAY)))
        struct.pack_into(fmt, hdr, offset, value)
        table_end = struct.calcsize("<8sIIIIIIQI32s16s") + 8 * LAY.num_layers
        struct.pack_into("<I", hdr, table_end, zlib.crc32(bytes(hdr[:table_end])))
        f.seek(0)
        f.write(hdr)


@pytest.mark.parametrize("rm", sorted(RM))
def test_a_block_of_another_format_version_is_a_counted_removed_miss(tmp_path, rm):
    """Mutation: parse_header's `if version != FORMAT_VERSION` check dropped. A block file of another format version
    (with an otherwise valid, crc-consistent header) must be rejected: a miss, counted (block_file.py: a reader never
    trusts a format it does not know); removed when older (damage), left when newer (a newer dualpath-jax wrote it:
    fix29, tests/test_fix29_compatstore.py)."""
    s = LocalDirStore(tmp_path / "kv", LAY, **RM[rm])
    k = _key(1)
    assert s.write(k, _block(1))
    _rewrite_header_field(s.path_of(k), 8, "<I", block_file.FORMAT_VERSION + 1)
    with open(s.path_of(k), "rb") as f:
        hdr = f.read(s.header_nbytes)
    with pytest.raises(block_file.BlockFormatError, match="format version"):
        block_file.parse_header(hdr, LAY, k, block_file.fingerprint_digest(LAY.fingerprint))
    out = np.zeros(FB, np.uint8)
    assert not s.read(k, out)
    st = s.stats()
    assert (st.read_newer_format, st.corrupt_blocks, st.read_hits) == (1, 0, 0) and os.path.exists(s.path_of(k))
    _rewrite_header_field(s.path_of(k), 8, "<I", block_file.FORMAT_VERSION - 1)
    assert not s.read(k, out)
    st = s.stats()
    assert (st.read_corrupt, st.corrupt_blocks, st.read_hits) == (1, 1, 0)
    assert not os.path.exists(s.path_of(k)) and s.lookup([k]) == 0
    s.close()


def _splitmix_weights(n: int) -> list[int]:
    m = 2**64
    out = []
    for i in range(1, n + 1):
        z = (i * 0x9E3779B97F4A7C15) % m
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % m
        z ^= z >> 31
        out.append(z | 1)
    return out


def _wsum64_reference(data: bytes) -> int:
    """block_file's wsum64 from its definition: sum_i w_i * x_i mod 2**64 over little-endian u64 words, the tail
    zero-padded to one more word, w_i = splitmix64(i) | 1 (i from 1)."""
    padded = data + b"\0" * (-len(data) % 8)
    words = [int.from_bytes(padded[j : j + 8], "little") for j in range(0, len(padded), 8)]
    return sum(w * x for w, x in zip(_splitmix_weights(len(words)), words, strict=True)) % 2**64


@pytest.mark.parametrize("lbn", [64, 61, 8, 3])
def test_wsum64_matches_its_definition_so_old_blocks_stay_readable(lbn):
    """Mutations: the wsum64 weights made not odd (`z | 1` dropped), or the tail word weighted by the previous
    word's weight. Both stay self-consistent (a block written and read by the mutant passes), but blocks stored by
    earlier code (block_file.py: wsum64 was the default before xxh3; "fixed forever (they define stored
    checksums)") would all read as corrupt. Checked against the definition, with and without a tail."""
    rng = np.random.default_rng(lbn)
    blocks = rng.integers(0, 256, size=(3, lbn), dtype=np.uint8)
    got = block_file.layer_checksums(blocks, "wsum64").tolist()
    assert got == [_wsum64_reference(blocks[i].tobytes()) for i in range(3)]
    assert block_file.layer_checksum_list(blocks.reshape(-1), lbn, "wsum64") == got
    assert block_file.layer_checksums(blocks, "crc32").tolist() == [zlib.crc32(blocks[i].tobytes()) for i in range(3)]


def test_the_format_holds_keys_of_1_to_32_bytes():
    """Mutation: pack_header's key-length check `0 < len(key) <= MAX_KEY_NBYTES` made `<` (a 32-byte key refused).
    block_file.py: the header holds a key of 1..32 bytes (`key 32s`); a 32-byte key round-trips, 0 and 33 do not."""
    sums = block_file.layer_checksums(_block(0).reshape(LAY.num_layers, LBN), "xxh3")
    fp = block_file.fingerprint_digest(LAY.fingerprint)
    for n in (1, 16, 32):
        key = bytes(range(1, n + 1))
        hdr = block_file.pack_header(LAY, key, sums, "xxh3")
        algo, got = block_file.parse_header(hdr, LAY, key, fp)
        assert algo == "xxh3" and got.tolist() == sums.tolist()
        with pytest.raises(block_file.BlockFormatError, match="key mismatch"):
            block_file.parse_header(hdr, LAY, key[:-1] + b"\xff", fp)
    for n in (0, 33):
        with pytest.raises(ValueError, match="1..32 bytes"):
            block_file.pack_header(LAY, b"\x01" * n, sums, "xxh3")


# ---- local_dir: the index, LRU and capacity -------------------------------------------------------------------


def test_a_reopened_store_takes_its_lru_order_from_the_files_mtimes(tmp_path):
    """Mutation: `_scan` sorting the found blocks by key instead of by mtime. local_dir.py: the index is rebuilt
    at open in LRU order = file mtime, so a reopened store evicts its least recently written block first (not the
    one with the smallest key)."""
    root = tmp_path / "kv"
    s = LocalDirStore(root, LAY)
    keys = sorted(_key(i) for i in range(4))
    for i, k in enumerate(keys):
        assert s.write(k, _block(i))
    s.close()
    t0 = 1_700_000_000 * 10**9
    for i, k in enumerate(keys):  # mtimes the reverse of the key order: the largest key is the oldest
        os.utime(s.path_of(k), ns=(t0 - i * 10**9, t0 - i * 10**9))
    s2 = LocalDirStore(root, LAY, capacity_bytes=4 * FILE)
    assert s2.keys() == keys[::-1]
    new = _key(100)
    assert s2.write(new, _block(100))
    assert not os.path.exists(s2.path_of(keys[-1]))  # the oldest file went, not the smallest key
    assert s2.lookup([keys[0]]) == 1 and s2.keys()[-2:] == [new, keys[0]]
    assert s2.stats().evictions == 1
    s2.close()


def test_a_block_being_read_is_not_evicted_by_a_write_meanwhile(tmp_path):
    """Mutation: `_read_planned` not marking its key busy (`self._busy[key] += 1` dropped). local_dir.py: blocks
    being read are not evicted (apart from the callers' pins): a write that needs room while block k1 (the LRU one)
    is being read evicts the next LRU block instead."""
    s = LocalDirStore(tmp_path / "kv", LAY, capacity_bytes=2 * FILE)
    k1, k2, k3 = _key(1), _key(2), _key(3)
    assert s.write(k1, _block(1)) and s.write(k2, _block(2))
    orig = s._acquire_fd

    def during_the_read(key, path):
        ent = orig(key, path)
        if key == k1:
            assert s.write(k3, _block(3))
        return ent

    s._acquire_fd = during_the_read
    out = np.zeros(FB, np.uint8)
    assert s.read(k1, out)
    np.testing.assert_array_equal(out, _block(1))
    assert os.path.exists(s.path_of(k1)) and not os.path.exists(s.path_of(k2))
    assert sorted(s.keys()) == sorted([k1, k3]) and s.used_bytes == 2 * FILE
    s.close()


def test_a_read_of_a_block_removed_meanwhile_does_not_index_it_again(tmp_path):
    """Mutation: a read hit re-indexing its key unconditionally (`if key in self._index or not indexed` dropped).
    local_dir.py: a block removed while it was being read still reads right from its open file, but its file is
    gone, so it must not come back into the index (a later lookup would report a block that is not there)."""
    s = LocalDirStore(tmp_path / "kv", LAY)
    k = _key(1)
    assert s.write(k, _block(1))
    orig = s._acquire_fd

    def remove_after_open(key, path):
        ent = orig(key, path)
        assert s.remove(key)
        return ent

    s._acquire_fd = remove_after_open
    out = np.zeros(FB, np.uint8)
    assert s.read(k, out)
    np.testing.assert_array_equal(out, _block(1))
    assert s.keys() == [] and s.used_bytes == 0 and s.lookup([k]) == 0
    s.close()


def test_verify_indexes_a_block_another_store_wrote_and_marks_it_recently_used(tmp_path):
    """Mutation: `verify` not adopting a good block (`_adopt_fitting_locked` dropped). api.py: a good block found
    by verify "is used, as a read hit is (LRU)": a block written by another process joins this index (counted in
    used_bytes), and a verified block becomes the most recently used (the next eviction takes another)."""
    root = tmp_path / "kv"
    s = LocalDirStore(root, LAY, capacity_bytes=2 * FILE)
    other = LocalDirStore(root, LAY)
    k1, k2, k3 = _key(1), _key(2), _key(3)
    assert other.write(k1, _block(1))
    assert s.keys() == [] and s.verify(k1)
    assert s.keys() == [k1] and s.used_bytes == FILE
    assert s.write(k2, _block(2))
    assert s.verify(k1)  # k1 most recently used: the write of k3 evicts k2
    assert s.write(k3, _block(3))
    assert os.path.exists(s.path_of(k1)) and not os.path.exists(s.path_of(k2))
    s.close()
    other.close()


def test_a_read_of_a_foreign_block_into_a_full_pinned_store_leaves_it_unindexed(tmp_path):
    """Mutation: `_adopt_fitting_locked` keeping a newly found block in the index when nothing can be evicted for it.
    local_dir.py: a read hit that indexes a block written by another process evicts others to fit it, "else it is
    left unindexed": the capacity is never exceeded by the index, and the pinned block stays."""
    root = tmp_path / "kv"
    s = LocalDirStore(root, LAY, capacity_bytes=FILE)
    other = LocalDirStore(root, LAY)
    k1, k2 = _key(1), _key(2)
    assert s.write(k1, _block(1))
    s.pin([k1])
    assert other.write(k2, _block(2))
    out = np.zeros(FB, np.uint8)
    assert s.read(k2, out)  # served (its file is there)...
    np.testing.assert_array_equal(out, _block(2))
    assert s.keys() == [k1] and s.used_bytes == FILE  # ...but not indexed: no room
    assert os.path.exists(s.path_of(k1)) and os.path.exists(s.path_of(k2))
    s.unpin([k1])
    assert s.read(k2, out)  # now k1 may go to fit it
    assert s.keys() == [k2] and not os.path.exists(s.path_of(k1))
    s.close()
    other.close()


def test_the_fast_layer_path_refuses_a_layer_past_the_last(tmp_path):
    """Mutation: `_plan`'s one-Layer-Block fast path taking `0 <= layer <= num_layers`. Layer L does not exist: the
    read must raise IndexError (a caller bug), not read past the payload, call the good block truncated and remove
    it (DESIGN.md: never wrong KV, and a valid block is never dropped as corrupt)."""
    s = LocalDirStore(tmp_path / "kv", LAY, read_method="preadv")
    k = _key(1)
    assert s.write(k, _block(1))
    out = np.zeros(LBN, np.uint8)
    for layers in ([LAY.num_layers], [-1]):
        with pytest.raises(IndexError):
            s.read(k, out, layers=layers)
    assert s.read(k, out, layers=[LAY.num_layers - 1])
    np.testing.assert_array_equal(out, _block(1)[-LBN:])
    st = s.stats()
    assert (st.corrupt_blocks, st.read_corrupt, st.read_hits) == (0, 0, 1) and os.path.exists(s.path_of(k))
    s.close()


def test_a_store_reopened_with_a_smaller_capacity_evicts_its_oldest_blocks_at_once(tmp_path):
    """Mutation: `_scan` not evicting to fit (`self._evict_to_fit_locked(0)` dropped). The index built at open (or
    by refresh) holds at most `capacity_bytes` of blocks: a store reopened with a smaller capacity evicts its least
    recently written blocks (oldest mtime) right away, counted, so used_bytes never exceeds the capacity."""
    root = tmp_path / "kv"
    s = LocalDirStore(root, LAY)
    keys = [_key(i) for i in range(4)]
    t0 = 1_700_000_000 * 10**9
    for i, k in enumerate(keys):
        assert s.write(k, _block(i))
        os.utime(s.path_of(k), ns=(t0 + i * 10**9, t0 + i * 10**9))
    s.close()
    s2 = LocalDirStore(root, LAY, capacity_bytes=2 * FILE + FILE // 2)
    assert s2.used_bytes == 2 * FILE and s2.keys() == keys[2:]
    assert [os.path.exists(s2.path_of(k)) for k in keys] == [False, False, True, True]
    st = s2.stats()
    assert (st.evictions, st.bytes_evicted) == (2, 2 * FILE)
    other = LocalDirStore(root, LAY)  # another process adds two blocks; a refresh evicts down to the capacity again
    for i in (10, 11):
        assert other.write(_key(i), _block(i))
    s2.refresh()
    assert s2.used_bytes <= s2.capacity_bytes and len(_files(s2)) == 2
    s2.close()
    other.close()


# ---- local_dir: per-call options, writes ------------------------------------------------------------------------


@pytest.mark.parametrize("rm", ["preadv", "mmap"])
def test_the_stores_verify_false_is_the_default_of_every_read_call(tmp_path, rm):
    """Mutations: `_flag` answering True for None (the store's option ignored), and `read_many` verifying whatever
    the store's `verify` option says. LocalDirStoreConfig: `verify=False` skips the payload checksums (header checks
    stay) for read, submit_read and read_many alike; `read(verify=True)` still checks (a miss, removed)."""
    s = LocalDirStore(tmp_path / "kv", LAY, verify=False, **RM[rm])
    k = _key(1)
    assert s.write(k, _block(1))
    path = s.path_of(k)
    with open(path, "r+b") as f:  # one payload byte changed in place: only a checksum can tell
        f.seek(s.header_nbytes + LBN + 5)
        b = f.read(1)[0]
        f.seek(s.header_nbytes + LBN + 5)
        f.write(bytes([b ^ 0xFF]))
    want = _block(1).copy()
    want[LBN + 5] ^= 0xFF
    outs = [np.zeros(FB, np.uint8) for _ in range(3)]
    assert s.read(k, outs[0])
    assert s.submit_read(k, outs[1]).result()
    assert s.read_many([k], [outs[2]]) == [True]
    for out in outs:
        np.testing.assert_array_equal(out, want)
    assert s.stats().read_corrupt == 0
    assert not s.read(k, outs[0], verify=True)
    assert s.stats().read_corrupt == 1 and not os.path.exists(path)
    s.close()


def _fsynced_paths(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = os.fsync

    def recording_fsync(fd):
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return calls


def test_durable_writes_fsync_the_temp_file_its_directory_and_a_new_fan_out_directory(tmp_path, monkeypatch):
    """Mutations: the temp file's fsync skipped, the fsync of blocks/ after making a new fan-out directory skipped,
    and `_flag` turning write(durable=None) into durable. local_dir.py: a durable write fsyncs the temp file before
    the rename, then the block's directory, and blocks/ where the write made the fan-out directory (it holds that
    directory's entry); a non-durable store's write(durable=None) fsyncs nothing."""
    s = LocalDirStore(tmp_path / "kv", LAY)
    calls = _fsynced_paths(monkeypatch)
    a, b = _key(1), _key(2)
    b2 = next(k for i in range(3, 5000) if (k := _key(i))[0] == b[0])  # same fan-out directory as b
    assert s.write(a, _block(1))
    assert s.write(a, _block(1), durable=None) and calls == []  # (a dedup write)
    assert s.write(b, _block(2), durable=True)
    fan_out = os.path.dirname(s.path_of(b))
    assert len(calls) == 3
    assert os.path.dirname(calls[0]) == fan_out and os.path.basename(calls[0]).startswith(".tmp.")
    assert calls[1:] == [fan_out, os.path.join(s.root, "blocks")]
    calls.clear()
    assert s.write(b2, _block(3), durable=True)  # its directory exists: blocks/ is not fsync'ed again
    assert len(calls) == 2 and os.path.basename(calls[0]).startswith(".tmp.") and calls[1] == fan_out
    s.close()


def test_a_short_writev_is_continued_where_it_stopped(tmp_path, monkeypatch):
    """Mutation: `_write_all` not advancing past the bytes a short writev wrote (it wrote them again). writev may
    write less than asked; the block file must still be the header and the payload, once (a read hit)."""
    s = LocalDirStore(tmp_path / "kv", LAY, read_method="preadv")
    real = os.writev
    calls = []

    def short_writev(fd, bufs):
        calls.append(fd)
        if len(calls) > FILE // 1000 + 2:  # (the mutant writes the same bytes again and again)
            raise OSError(28, "test: too many writev calls for one block")
        return real(fd, [memoryview(bufs[0])[:1000]])

    monkeypatch.setattr(os, "writev", short_writev)
    k = _key(1)
    assert s.write(k, _block(1))
    monkeypatch.undo()
    assert os.path.getsize(s.path_of(k)) == FILE
    out = np.zeros(FB, np.uint8)
    assert s.read(k, out)
    np.testing.assert_array_equal(out, _block(1))
    s.close()


def test_pins_are_counted_and_a_failing_post_write_fit_evicts_nothing(tmp_path):
    """Mutations: `pin` setting the count to 1 instead of adding 1, and `_evict_to_fit_locked` evicting part of what
    it needs with partial=False. api.py: pins are counted (each pin needs one unpin: nested `pinned` blocks keep the
    block pinned until the outer one ends); local_dir.py: a fit with partial=False that cannot succeed evicts
    nothing ("a write that fails anyway must not cost other blocks")."""
    s = LocalDirStore(tmp_path / "kv", LAY, capacity_bytes=2 * FILE)
    k1, k2, k3 = _key(1), _key(2), _key(3)
    assert s.write(k1, _block(1)) and s.write(k2, _block(2))
    with s.pinned([k1]):
        with s.pinned([k1]):
            pass
        assert s.write(k3, _block(3))  # k1 still pinned by the outer block: k2 goes
    assert not os.path.exists(s.path_of(k2)) and os.path.exists(s.path_of(k1))
    with pytest.raises(ValueError, match="not pinned"):
        s.unpin([k1])
    s.pin([k1])
    with s._lock:
        assert not s._evict_to_fit_locked(2 * FILE, partial=False)  # needs k1 and k3; k1 is pinned
        assert not s._evict_to_fit_locked(2 * FILE, partial=False, evict=False)
    assert sorted(s.keys()) == sorted([k1, k3]) and len(_files(s)) == 2 and s.stats().evictions == 1
    with s._lock:
        assert not s._evict_to_fit_locked(2 * FILE)  # partial (lookup's): evicts what it can
    assert s.keys() == [k1] and s.stats().evictions == 2
    s.unpin([k1])
    s.close()


# ---- host_buffers --------------------------------------------------------------------------------------------


def test_a_byte_request_takes_just_enough_whole_slots():
    """Mutation: `slots_for` as `nbytes // slot + 1` (one slot too many for a whole number of slots). host_buffers:
    nbytes are rounded up to whole slots, so a request of exactly n slots' bytes takes n slots."""
    from dualpath_jax.host_buffers import HostBufferPool

    pool = HostBufferPool(slot_nbytes=100, num_slots=4, name="audit3", prefault=False)
    for nbytes, n in ((1, 1), (100, 1), (101, 2), (200, 2), (400, 4)):
        assert pool.slots_for(nbytes) == n
        with pool.acquire(nbytes, timeout=0) as buf:
            assert len(buf) == n and buf.nbytes == nbytes and pool.free_slots == 4 - n


def test_a_waiting_large_request_is_not_overtaken_by_a_small_one():
    """Mutation: `acquire` serving whoever fits (`if self._queue[0] is ticket` made always true). host_buffers:
    requests are served FIFO, "so a large request is not starved by small ones": while a 4-slot request waits, a
    1-slot request does not take the free slot, even though it would fit."""
    import threading

    from dualpath_jax.host_buffers import BufferBudgetExceeded, HostBufferPool

    pool = HostBufferPool(slot_nbytes=64, num_slots=4, name="audit3-fifo", prefault=False)
    held = pool.acquire(nslots=3)
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(nslots=4, timeout=30.0)), daemon=True)
    waiter.start()
    for _ in range(3000):  # until the large request is queued
        with pool._cond:
            if len(pool._queue) == 1:
                break
        threading.Event().wait(0.001)
    with pytest.raises(BufferBudgetExceeded):
        pool.acquire(nslots=1, timeout=0)
    assert pool.free_slots == 1
    held.release()
    waiter.join(30.0)
    assert len(got) == 1 and len(got[0]) == 4
    got[0].release()
    assert pool.free_slots == 4


# ---- block_keys ---------------------------------------------------------------------------------------------------


def test_token_ids_must_fit_in_32_bits_everywhere_they_enter_a_key():
    """Mutations: `_token_bytes` taking `ids.max() > 2**32` (2**32 accepted: cast to uint32 it is token 0, another
    prompt's key), and BlockKeyChain.extend's fast path of plain ints dropping its `< 2**32` check. block_keys.py:
    token ids are in [0, 2**32); an id out of range is a ValueError, and a refused token leaves the chain as it was."""
    from dualpath_jax.block_keys import BlockKeyChain

    with pytest.raises(ValueError, match="2\\*\\*32"):
        block_keys([2**32], 1)
    with pytest.raises(ValueError, match="2\\*\\*32"):
        block_keys(np.array([5, 2**32], dtype=np.int64), 2)
    assert block_keys([2**32 - 1], 1) != block_keys([0], 1)
    chain = BlockKeyChain(4)
    chain.extend([1, 2])
    for bad in ([2**32], [3, 2**32]):
        with pytest.raises(ValueError, match="2\\*\\*32"):
            chain.extend(bad)
        assert chain.num_tokens == 2
    assert chain.extend([3, 4]) == block_keys([1, 2, 3, 4], 4)


def test_root_and_hash_id_keys_match_their_definition():
    """Mutations: root_key's namespace separator byte dropped, and hash ids hashed big-endian. Keys name stored
    blocks across runs (a store directory outlives the process): they are defined bytes, checked here against the
    definition in block_keys.py: root = blake2b-128(b"dualpath-jax/block-key/v1\\0" + namespace), hash-id key_i =
    blake2b-128(key_{i-1} + b"H" + (id mod 2**64) as 8 little-endian bytes)."""
    import hashlib

    from dualpath_jax.block_keys import ROOT, keys_from_hash_ids, root_key

    def b2(data: bytes) -> bytes:
        return hashlib.blake2b(data, digest_size=16).digest()

    assert ROOT == b2(b"dualpath-jax/block-key/v1\x00")
    assert root_key("m/x") == b2(b"dualpath-jax/block-key/v1\x00m/x")
    ids = [1, 2**40 + 3, -1, 2**64 - 1]
    want, key = [], ROOT
    for hid in ids:
        key = b2(key + b"H" + (hid % 2**64).to_bytes(8, "little"))
        want.append(key)
    assert keys_from_hash_ids(ids) == want
    assert keys_from_hash_ids([-1]) == keys_from_hash_ids([2**64 - 1])


def test_resume_checks_the_parent_it_chains_from():
    """Mutation: BlockKeyChain.resume not checking `prev_keys[-1]` (the parent of the blocks after them). A key that
    is not 16 bytes (e.g. one that lost a trailing zero through a numpy bytes array) must be refused, as
    block_keys(parent=...) and extend_block_keys refuse it, not silently chained into other keys."""
    from dualpath_jax.block_keys import BlockKeyChain, extend_block_keys

    good = block_keys(list(range(8)), 4)
    chain = BlockKeyChain.resume(good, list(range(10)), 4)
    assert chain.keys == good and chain.num_tokens == 10
    for bad in (good[1][:15], b"x" * 17):
        with pytest.raises(ValueError, match="16-byte key"):
            BlockKeyChain.resume([good[0], bad], list(range(12)), 4)
        with pytest.raises(ValueError, match="16-byte key"):
            extend_block_keys([good[0], bad], list(range(12)), 4)


# ---- local_dir: writes and capacity ---------------------------------------------------------------------------


def test_an_overwrite_in_a_full_store_replaces_its_block_in_place(tmp_path):
    """Mutations: write's room check, and its eviction once stored, counting an overwrite of an indexed key as one
    more block. local_dir.py: "a key still indexed was replaced in place: no bytes added": an overwrite in a full
    store is neither rejected (every other block pinned) nor costs another block, and while it is written its key
    is busy (not evicted by a write meanwhile)."""
    s = LocalDirStore(tmp_path / "kv", LAY, capacity_bytes=2 * FILE)
    k1, k2, k3 = _key(1), _key(2), _key(3)
    assert s.write(k1, _block(1)) and s.write(k2, _block(2))
    out = np.zeros(FB, np.uint8)
    with s.pinned([k1, k2]):
        assert s.write(k1, _block(11), overwrite=True)
    assert s.read(k1, out)
    np.testing.assert_array_equal(out, _block(11))
    assert s.write(k2, _block(12), overwrite=True)  # nothing pinned: still no other block evicted
    assert sorted(s.keys()) == sorted([k1, k2]) and s.stats().evictions == 0 and s.stats().write_rejected == 0
    # k1 is now the LRU block; while it is being rewritten, a write of k3 needs room: never k1's
    s.close()
    s = LocalDirStore(tmp_path / "kv2", LAY, capacity_bytes=3 * FILE)
    k4 = _key(4)
    for k in (k1, k2, k4):
        assert s.write(k, _block(1))
    victims: list[bytes] = []
    orig_evict, orig_write = s._evict_locked, s._write_file
    s._evict_locked = lambda keys: (victims.extend(keys), orig_evict(keys))[1]

    def write_k3_meanwhile(path, key, *args, **kw):
        if key == k1:
            assert s.write(k3, _block(3))
        return orig_write(path, key, *args, **kw)

    s._write_file = write_k3_meanwhile
    assert s.write(k1, _block(21), overwrite=True)
    assert victims and k1 not in victims and s.keys().count(k3) == 1 and s.used_bytes <= s.capacity_bytes
    assert s.read(k1, out)
    np.testing.assert_array_equal(out, _block(21))
    s.close()


def test_a_write_with_no_room_is_rejected_before_it_writes_anything(tmp_path):
    """Mutation: `_evict_to_fit_locked(evict=False)` answering True (room assumed). local_dir.py: "a write checks for
    room before it writes": with every other block pinned, the write is rejected (False, counted) without writing a
    file (no temp file, no rename, no fsync) and without evicting anything."""
    s = LocalDirStore(tmp_path / "kv", LAY, capacity_bytes=FILE)
    k1, k2 = _key(1), _key(2)
    assert s.write(k1, _block(1))
    written = []
    orig = s._write_file
    s._write_file = lambda path, key, *a, **kw: (written.append(key), orig(path, key, *a, **kw))[1]
    with s.pinned([k1]):
        assert not s.write(k2, _block(2))
    assert written == [] and _files(s) == [os.path.basename(s.path_of(k1))]
    st = s.stats()
    assert (st.write_rejected, st.writes, st.evictions, st.bytes_written) == (1, 1, 0, FILE)
    s.close()


def test_a_dedup_write_whose_block_was_evicted_meanwhile_writes_it_again(tmp_path):
    """Mutation: a dedup write trusting its stat after this store dropped keys meanwhile (`key in self._index or
    self._drops == drops` made always true). A block found whole by the check but removed before the write takes
    the lock may be gone: the write stores it again (True means stored), never indexes a missing file."""
    s = LocalDirStore(tmp_path / "kv", LAY)
    k = _key(1)
    assert s.write(k, _block(1))
    orig = s._stored_block_ok

    def removed_right_after_the_check(key, path, seen=None):
        ok = orig(key, path, seen)
        assert s.remove(key)
        return ok

    s._stored_block_ok = removed_right_after_the_check
    assert s.write(k, _block(1))
    s._stored_block_ok = orig
    assert os.path.exists(s.path_of(k)) and s.keys() == [k]
    out = np.zeros(FB, np.uint8)
    assert s.read(k, out)
    np.testing.assert_array_equal(out, _block(1))
    st = s.stats()
    assert (st.writes, st.write_dedup) == (2, 0)
    s.close()


def test_a_store_directory_of_another_block_format_version_is_refused(tmp_path):
    """Mutation: STORE.json's `block_format_version` no longer compared. local_dir.py: one model and format per
    directory; a directory whose metadata names another block format version is refused at open."""
    import json

    root = tmp_path / "kv"
    LocalDirStore(root, LAY).close()
    meta = json.loads((root / "STORE.json").read_text())
    meta["block_format_version"] = block_file.FORMAT_VERSION + 1
    (root / "STORE.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format"):
        LocalDirStore(root, LAY)


@pytest.mark.parametrize("rm", ["preadv", "mmap-py"])
def test_unverified_layer_reads_still_read_their_layers(tmp_path, rm):
    """Mutation: `_read_fd` returning before reading for every unverified read (`if not verify and layer_list is
    None` made `if not verify`): a Layer-Block read with verify=False then returned True with `out` untouched.
    verify=False skips the payload checksums only: packed and in-place Layer-Block reads still fill `out`."""
    s = LocalDirStore(tmp_path / "kv", LAY, **RM[rm])
    k = _key(1)
    assert s.write(k, _block(1))
    blk = _block(1)
    out = np.zeros(2 * LBN, np.uint8)
    assert s.read(k, out, layers=[3, 1], verify=False)
    np.testing.assert_array_equal(out, np.concatenate([blk[3 * LBN :], blk[LBN : 2 * LBN]]))
    one = np.zeros(LBN, np.uint8)
    assert s.read(k, one, layers=[2], verify=False)
    np.testing.assert_array_equal(one, blk[2 * LBN : 3 * LBN])
    full = np.zeros(FB, np.uint8)
    assert s.read(k, full, layers=[0, 2], verify=False)
    np.testing.assert_array_equal(full[:LBN], blk[:LBN])
    np.testing.assert_array_equal(full[2 * LBN : 3 * LBN], blk[2 * LBN : 3 * LBN])
    assert not full[LBN : 2 * LBN].any() and not full[3 * LBN :].any()
    s.close()


def _pool(n: int, name: str):
    from dualpath_jax.host_buffers import HostBufferPool

    return HostBufferPool(slot_nbytes=64, num_slots=n, name=name, prefault=False)


def _until_queued(pool, n: int) -> None:
    import threading

    for _ in range(5000):
        with pool._cond:
            if len(pool._queue) == n:
                return
        threading.Event().wait(0.001)
    raise AssertionError(f"{n} requests never queued")


def test_pool_stats_keep_the_peak_and_count_a_timed_out_wait():
    """Mutations: `peak_bytes_in_use` set to the current bytes (not the max), and a request that waited and then
    timed out left out of `waits`. HostBufferStats: the peak is the most bytes ever in use; `waits` counts acquires
    that had to wait, "served or timed out"."""
    from dualpath_jax.host_buffers import BufferBudgetExceeded

    pool = _pool(4, "audit3-stats")
    big = pool.acquire(nslots=3)
    big.release()
    small = pool.acquire(nslots=1)
    st = pool.stats()
    assert (st.peak_bytes_in_use, st.bytes_in_use, st.slots_in_use) == (3 * 64, 64, 1)
    rest = pool.acquire(nslots=3)
    with pytest.raises(BufferBudgetExceeded):
        pool.acquire(nslots=1, timeout=0.05)  # waits, then gives up
    st = pool.stats()
    assert (st.timeouts, st.waits, st.acquires) == (1, 1, 3) and st.wait_s > 0 and st.peak_bytes_in_use == 4 * 64
    small.release()
    rest.release()


def test_contiguous_view_refuses_scattered_slots():
    """Mutation: `contiguous_view` not checking that the slots are adjacent (it returned a view over other requests'
    slots). Scattered slots have no single view: a ValueError naming acquire(contiguous=True)."""
    pool = _pool(3, "audit3-view")
    a, b, c = (pool.acquire(nslots=1) for _ in range(3))
    a.release()
    c.release()
    two = pool.acquire(nslots=2)
    assert two.slots == [0, 2]
    with pytest.raises(ValueError, match="not contiguous"):
        two.contiguous_view()
    two.release()
    b.release()
    with pool.acquire(nslots=3, contiguous=True, timeout=0) as whole:
        assert whole.contiguous_view().nbytes == 3 * 64


def test_a_request_that_times_out_at_the_head_wakes_the_one_behind_it():
    """Mutation: `acquire` not notifying the other waiters when it leaves the queue. A large request at the head
    that times out must let the request behind it, which fits, be served at once (FIFO: it waited only for its
    turn), not stay asleep until some release."""
    import threading

    from dualpath_jax.host_buffers import BufferBudgetExceeded

    pool = _pool(2, "audit3-wake")
    held = pool.acquire(nslots=1)
    errors, got = [], []

    def large():
        try:
            pool.acquire(nslots=2, timeout=1.0)
        except BufferBudgetExceeded as e:
            errors.append(e)

    t_large = threading.Thread(target=large, daemon=True)
    t_large.start()
    _until_queued(pool, 1)

    def small():  # no timeout: waits for its turn (behind the large one, which gives up after 1 s)
        got.append(pool.acquire(nslots=1))

    t_small = threading.Thread(target=small, daemon=True)
    t_small.start()
    t_large.join(30.0)
    t_small.join(30.0)  # (the mutant: asleep until the release below)
    alive = t_small.is_alive()
    held.release()
    t_small.join(30.0)
    assert len(errors) == 1 and not alive and len(got) == 1
    got[0].release()


def test_a_forked_child_does_not_wait_behind_its_parents_waiting_threads():
    """Mutation: the pool's fork handler not clearing the wait queue. host_buffers: in a forked child only the
    forking thread exists, so requests other threads of the parent were waiting with are dropped; else every
    acquire in the child waits behind a ticket that will never be served."""
    import threading
    import warnings

    pool = _pool(1, "audit3-fork")
    held = pool.acquire(nslots=1)
    served = []
    waiter = threading.Thread(target=lambda: served.append(pool.acquire(nslots=1, timeout=30.0)), daemon=True)
    waiter.start()
    _until_queued(pool, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (os.fork in a process with threads)
        pid = os.fork()
    if pid == 0:  # the child: its copy of `held` is its own slot to give back
        code = 1
        try:
            held.release()
            buf = pool.acquire(nslots=1, timeout=2.0)
            code = 0 if len(buf) == 1 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    held.release()
    waiter.join(30.0)
    assert len(served) == 1
    served[0].release()
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_lookup_whose_stat_fails_misses_but_keeps_the_block_indexed(tmp_path, monkeypatch):
    """Mutations: lookup dropping a key whose stat failed with an error other than "absent" (`elif present is False`
    made `else`), and contains taking such a stat (None) for a hit. local_dir.py: a stat that fails otherwise (EACCES, ELOOP, EIO, ESTALE) is logged and is a miss for
    lookup and contains, "the key stays indexed" (the file system would not say the block is gone)."""
    s = LocalDirStore(tmp_path / "kv", LAY, stat_on_hit=True)
    fresh = LocalDirStore(tmp_path / "kv", LAY)  # opened before k is written: k is not in its index
    k = _key(1)
    assert s.write(k, _block(1))
    path = s.path_of(k)
    real_stat = os.stat

    def failing_stat(p, *a, **kw):
        if os.fspath(p) == path:
            raise PermissionError(13, "test: permission denied", p)
        return real_stat(p, *a, **kw)

    monkeypatch.setattr(os, "stat", failing_stat)
    assert s.lookup([k]) == 0
    assert not fresh.contains(k)  # the file system would not say: a miss for contains too
    monkeypatch.undo()
    assert s.keys() == [k] and s.used_bytes == FILE and s.lookup([k]) == 1
    assert fresh.contains(k)
    s.close()
    fresh.close()


def test_released_slots_can_be_taken_again_as_one_contiguous_run():
    """Mutation: `release` not marking its slots free in the free map (the first-fit map of contiguous requests):
    slots handed out one by one and given back must serve a contiguous request of all of them."""
    pool = _pool(4, "audit3-free-map")
    singles = [pool.acquire(nslots=1) for _ in range(4)]
    for h in singles[::-1]:
        h.release()
    with pool.acquire(nslots=4, contiguous=True, timeout=0) as whole:
        assert whole.slots == [0, 1, 2, 3]
    with pool.acquire(nslots=2, timeout=0) as two, pool.acquire(nslots=2, contiguous=True, timeout=0) as run:
        assert sorted(two.slots + run.slots) == [0, 1, 2, 3] and run.slots[1] == run.slots[0] + 1


def test_a_copy_of_a_block_in_the_wrong_fan_out_directory_is_removed_at_open(tmp_path):
    """Mutation: `_scan` checking only the file name's hex, not its fan-out directory (`sub != stem[:2]` dropped).
    local_dir.py: "Only a block's own path counts": a copy of a block file in another fan-out directory is a stray,
    removed at open and never counted (else evicting the key would leave the copy on disk for good)."""
    root = tmp_path / "kv"
    s = LocalDirStore(root, LAY)
    k = _key(1)
    assert s.write(k, _block(1))
    s.close()
    other_sub = "00" if k.hex()[:2] != "00" else "01"
    stray = os.path.join(s.root, "blocks", other_sub, os.path.basename(s.path_of(k)))
    os.makedirs(os.path.dirname(stray), exist_ok=True)
    with open(s.path_of(k), "rb") as src, open(stray, "wb") as dst:
        dst.write(src.read())
    s2 = LocalDirStore(root, LAY)
    assert not os.path.exists(stray) and os.path.exists(s2.path_of(k))
    assert s2.keys() == [k] and s2.used_bytes == FILE
    s2.close()


def test_a_temp_file_of_another_host_is_kept_while_it_is_fresh(tmp_path):
    """Mutation: `_maybe_remove_temp` judging a temp file's writer dead by its pid whatever host wrote it (the host
    check dropped). local_dir.py: a pid only means something on its own host (and pid namespace): another host's
    fresh temp file is a write in progress there, kept; only one older than `stale_temp_s` is removed. This host's
    temp file of a dead pid is removed."""
    root = tmp_path / "kv"
    s = LocalDirStore(root, LAY)
    k = _key(1)
    assert s.write(k, _block(1))
    s.close()
    sub = os.path.dirname(s.path_of(k))
    dead_pid = 2**22 + 12345  # above the default pid_max of 4194304: never a live process
    theirs = os.path.join(sub, f".tmp.some-other-host.{dead_pid}.abcd1234.{k.hex()}")
    ours = os.path.join(sub, f".tmp.{s._host}.{dead_pid}.abcd1234.{k.hex()}")
    for p in (theirs, ours):
        with open(p, "wb") as f:
            f.write(b"\0" * 100)
    s2 = LocalDirStore(root, LAY)
    assert os.path.exists(theirs) and not os.path.exists(ours)
    assert s2.stats().temp_files_removed == 1
    s2.close()


def test_a_read_io_error_drops_the_cached_file_so_the_next_read_reopens_it(tmp_path, monkeypatch):
    """Mutation: a read's I/O error not dropping the key's cached open file (`_forget_fd_locked` dropped). A read
    that fails with an I/O error (EIO, ESTALE on a shared mount) is a counted miss and the block stays; the open file
    that failed is not kept: the next read opens the block again (and hits)."""
    import errno

    s = LocalDirStore(tmp_path / "kv", LAY, read_method="preadv")
    k = _key(1)
    assert s.write(k, _block(1))
    out = np.zeros(FB, np.uint8)
    assert s.read(k, out)
    bad = [s._fds[k].fd]  # the cached open file: stale until it is closed
    real_preadv, real_close = os.preadv, os.close

    def stale_fd(fd, *a, **kw):
        if fd in bad:
            raise OSError(errno.ESTALE, "test: stale file handle")
        return real_preadv(fd, *a, **kw)

    def closing(fd):
        if fd in bad:
            bad.remove(fd)
        return real_close(fd)

    monkeypatch.setattr(os, "preadv", stale_fd)
    monkeypatch.setattr(os, "close", closing)
    out[:] = 0
    assert not s.read(k, out)
    assert s.stats().read_errors == 1 and os.path.exists(s.path_of(k))
    assert s.read(k, out)
    np.testing.assert_array_equal(out, _block(1))
    monkeypatch.undo()
    s.close()


def test_pinned_unpins_when_its_block_raises(tmp_path):
    """Mutation: `KVStore.pinned` unpinning only when its block ends normally (no `finally`). A `with store.pinned(...)`
    block that raises must still unpin: else its blocks stay protected from eviction for good."""
    s = LocalDirStore(tmp_path / "kv", LAY, capacity_bytes=FILE)
    k1, k2 = _key(1), _key(2)
    assert s.write(k1, _block(1))
    with pytest.raises(RuntimeError, match="inside"), s.pinned([k1]):
        raise RuntimeError("inside")
    with pytest.raises(ValueError, match="not pinned"):
        s.unpin([k1])
    assert s.write(k2, _block(2)) and s.keys() == [k2]
    s.close()


def test_the_header_is_padded_to_4_kib_so_the_payload_is_page_aligned(tmp_path):
    """Mutation: HEADER_ALIGN changed (4096 -> 2048). block_file.py: the header is padded to a multiple of 4 KiB so
    the payload is page-aligned (direct I/O, distributed file systems); the padding is part of the format: a store
    with another alignment would read every stored block as a layout mismatch."""
    assert block_file.header_nbytes(LAY) == 4096
    big = BlockLayout(600, 16, 40, "audit3-model/bf16")  # a header of more than 4 KiB used bytes
    assert block_file.header_used_nbytes(big) > 4096 and block_file.header_nbytes(big) == 8192
    s = LocalDirStore(tmp_path / "kv", LAY)
    k = _key(1)
    assert s.write(k, _block(1))
    with open(s.path_of(k), "rb") as f:
        raw = f.read()
    assert len(raw) == 4096 + FB and struct.unpack_from("<I", raw, 12)[0] == 4096
    np.testing.assert_array_equal(np.frombuffer(raw[4096:], np.uint8), _block(1))
    s.close()


def test_store_misses_count_absent_corrupt_and_io_error_reads():
    """Mutation: `StoreStats.misses` leaving out `read_errors`. api.py: a read that fails with an I/O error is a miss
    like an absent or corrupt block (`read_errors`: "read() misses"), so misses = absent + corrupt + errors."""
    from dualpath_jax.store.api import StoreStats

    st = StoreStats(read_hits=3, read_absent=1, read_corrupt=2, read_errors=4)
    assert (st.hits, st.misses) == (3, 7)
    assert StoreStats(read_errors=1).misses == 1


def test_a_write_removed_for_lack_of_room_is_not_indexed_by_a_refresh_in_progress(tmp_path, monkeypatch):
    """Mutation: a write whose room was pinned away meanwhile removing its new block without `_drop_locked` (which
    records the drop for scans in progress). local_dir.py: a block this process removes while a refresh runs is not
    indexed again by it, though the refresh listed (and stat'ed) the file before it went."""
    import threading

    s = LocalDirStore(tmp_path / "kv", LAY, capacity_bytes=FILE)
    k1, k2 = _key(1), _key(2)
    assert s.write(k1, _block(1))
    s.pin([k2])  # (a pin of a key not stored yet: the refresh cannot evict k2 either)
    k2_name = os.path.basename(s.path_of(k2))
    listed, go_on = threading.Event(), threading.Event()
    real_scandir = os.scandir

    class _Entry:
        def __init__(self, entry):
            self._e, self.name, self.path = entry, entry.name, entry.path

        def stat(self, *a, **kw):
            st = self._e.stat(*a, **kw)
            if self.name == k2_name:
                listed.set()
                go_on.wait(30.0)
            return st

    def scandir(path):
        return [_Entry(e) for e in real_scandir(path)]

    orig_write = s._write_file
    refresh = threading.Thread(target=s.refresh, daemon=True)

    def write_then_pin_the_room_away(path, key, *a, **kw):
        orig_write(path, key, *a, **kw)  # k2 renamed into place
        monkeypatch.setattr(os, "scandir", scandir)
        refresh.start()
        assert listed.wait(30.0)  # the refresh has stat'ed k2's file
        monkeypatch.setattr(os, "scandir", real_scandir)
        s.pin([k1])  # the only room goes: k2 is removed once written

    s._write_file = write_then_pin_the_room_away
    assert not s.write(k2, _block(2))
    go_on.set()
    refresh.join(30.0)
    assert not refresh.is_alive() and not os.path.exists(s.path_of(k2))
    assert s.keys() == [k1] and s.used_bytes == FILE and s.stats().write_rejected == 1
    s.unpin([k1])
    s.unpin([k2])
    s.close()


def test_the_generic_read_many_hands_every_read_the_same_layers_of_a_one_shot_iterable(tmp_path):
    """Mutation: `KVStore.read_many` passing `layers` on as given (the `list(layers)` dropped): a generator of layers
    was used up by the first read, and the next ones read no layer (an error) instead of the same Layer Blocks.
    The generic read_many runs for a store whose `submit_read` is its own (here a LocalDirStore subclass)."""

    class Counting(LocalDirStore):
        def submit_read(self, key, out, layers=None, verify=None):
            return super().submit_read(key, out, layers, verify)

    s = Counting(tmp_path / "kv", LAY)
    keys = [_key(1), _key(2)]
    for i, k in enumerate(keys):
        assert s.write(k, _block(i + 1))
    outs = [np.zeros(2 * LBN, np.uint8) for _ in keys]
    assert s.read_many(keys, outs, layers=(layer for layer in (2, 0))) == [True, True]
    for i, out in enumerate(outs):
        blk = _block(i + 1)
        np.testing.assert_array_equal(out, np.concatenate([blk[2 * LBN : 3 * LBN], blk[:LBN]]))
    s.close()
