"""LocalDirStore in one process: round trips, lookup, eviction and pinning, corruption, bad arguments."""

import errno
import logging
import mmap
import os
import shutil
import threading
import zlib

import numpy as np
import pytest

from dualpath_jax.block_keys import block_keys, root_key
from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.store import STORES, LocalDirStore, block_file, local_dir, make_store

LAYOUT = BlockLayout(num_layers=4, block_tokens=16, bytes_per_token_per_layer=40, fingerprint="test-model/bf16")
LBN = LAYOUT.layer_block_nbytes


def content(key: bytes, layout: BlockLayout = LAYOUT) -> np.ndarray:
    """The Full Block a test stores under `key`: [full_block_nbytes] uint8, a function of the key."""
    rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
    return rng.integers(0, 256, size=layout.full_block_nbytes, dtype=np.uint8)


def make_keys(n: int, seed: int = 0) -> list[bytes]:
    ids = np.random.default_rng(seed).integers(0, 50_000, size=n * LAYOUT.block_tokens)
    return block_keys(ids, LAYOUT.block_tokens, parent=root_key(LAYOUT.fingerprint))


# Both read methods; with mmap every verified read is mapped, from the first read of a file on (by default only
# reads of >= 256 KiB are, from the second read of an open file on). Each with the compiled verified-read loops
# (store/_verify.pyx, where built) and with the Python loops ("-py").
MMAP_ALL = {"read_method": "mmap", "mmap_min_bytes": 0, "mmap_after_reads": 0}
# (The `rm` fixture, in tests/conftest.py, gives the store options of each of the four.)


@pytest.fixture
def store(tmp_path, rm):
    s = LocalDirStore(tmp_path / "kv", LAYOUT, **rm)
    yield s
    s.close()


def test_full_block_round_trip_and_stats(store):
    keys = make_keys(5)
    for k in keys:
        assert store.write(k, content(k))
    for k in keys:
        out = np.zeros(LAYOUT.full_block_nbytes, np.uint8)
        assert store.read(k, out)
        np.testing.assert_array_equal(out, content(k))
    st = store.stats()
    assert st.writes == 5 and st.read_hits == 5 and st.bytes_read == 5 * LAYOUT.full_block_nbytes
    assert st.bytes_written == 5 * block_file.file_nbytes(LAYOUT)
    assert store.used_bytes == 5 * block_file.file_nbytes(LAYOUT)
    # Shaped [layers, tokens, bytes] buffers and bytearrays work too.
    shaped = np.zeros(LAYOUT.full_block_shape, np.uint8)
    assert store.read(keys[0], shaped)
    np.testing.assert_array_equal(shaped.reshape(-1), content(keys[0]))
    ba = bytearray(LAYOUT.full_block_nbytes)
    assert store.read(keys[1], ba)
    assert bytes(ba) == content(keys[1]).tobytes()


def test_layer_block_reads(store):
    (k,) = make_keys(1)
    full = content(k).reshape(LAYOUT.num_layers, LBN)
    store.write(k, full)
    one = np.zeros(LBN, np.uint8)
    assert store.read(k, one, layers=[2])
    np.testing.assert_array_equal(one, full[2])
    assert store.read(k, one, layers=1)  # one int is one layer
    np.testing.assert_array_equal(one, full[1])
    packed = np.zeros((3, LBN), np.uint8)  # packed in the order asked
    assert store.read(k, packed, layers=[3, 0, 1])
    np.testing.assert_array_equal(packed, full[[3, 0, 1]])
    run = np.zeros((2, LBN), np.uint8)
    assert store.read(k, run, layers=range(1, 3))
    np.testing.assert_array_equal(run, full[1:3])
    in_place = np.full((LAYOUT.num_layers, LBN), 7, np.uint8)  # Full Block buffer: only named slots filled
    assert store.read(k, in_place, layers=[1, 3])
    np.testing.assert_array_equal(in_place[[1, 3]], full[[1, 3]])
    assert (in_place[[0, 2]] == 7).all()
    assert store.stats().bytes_read == LBN * (1 + 1 + 3 + 2 + 2)


def test_lookup_counts_the_leading_stored_blocks(tmp_path, store):
    keys = make_keys(6)
    assert store.lookup(keys) == 0
    for k in keys[:4]:
        store.write(k, content(k))
    assert store.lookup(keys) == 4
    assert store.lookup(keys[:2]) == 2
    assert store.lookup([]) == 0
    st = store.stats()
    assert (st.lookups, st.lookup_blocks, st.lookup_hit_blocks) == (4, 6 + 6 + 2, 4 + 2)
    store.remove(keys[1])
    assert store.lookup(keys) == 1  # the chain is broken at block 1
    # A second store object on the same directory rebuilds the index at open...
    other = LocalDirStore(tmp_path / "kv", LAYOUT)
    assert sorted(other.keys()) == sorted([keys[0], keys[2], keys[3]])
    # ...and blocks written later by another writer are found by the stat fallback on an index miss.
    other.write(keys[1], content(keys[1]))
    assert store.lookup(keys) == 4
    other.close()


def test_lru_eviction_order(tmp_path, rm):
    fnb = block_file.file_nbytes(LAYOUT)
    s = LocalDirStore(tmp_path / "kv", LAYOUT, capacity_bytes=3 * fnb, **rm)
    a, b, c, d, e = make_keys(5)
    for k in (a, b, c):
        s.write(k, content(k))
    assert s.read(a, np.empty(LAYOUT.full_block_nbytes, np.uint8))  # a is now the most recent
    s.write(d, content(d))  # evicts b, the least recently used
    assert not os.path.exists(s.path_of(b))
    assert s.keys() == [c, a, d]
    assert s.lookup([a]) == 1
    s.write(e, content(e))  # evicts c (the lookup touched a)
    assert s.keys() == [d, a, e]
    st = s.stats()
    assert st.evictions == 2 and st.bytes_evicted == 2 * fnb and s.used_bytes == 3 * fnb
    s.close()


def test_pinned_blocks_are_not_evicted(tmp_path, rm):
    fnb = block_file.file_nbytes(LAYOUT)
    s = LocalDirStore(tmp_path / "kv", LAYOUT, capacity_bytes=2 * fnb, **rm)
    a, b, c, d = make_keys(4)
    s.write(a, content(a))
    s.write(b, content(b))
    with s.pinned([a]):
        s.write(c, content(c))  # a is LRU but pinned: b goes
        assert s.keys() == [a, c]
        with s.pinned([c]):
            assert not s.write(d, content(d))  # everything pinned: refused, nothing lost
            assert s.stats().write_rejected == 1
        assert s.contains(a) and s.contains(c)
    s.write(d, content(d))  # unpinned now: a (LRU) goes
    assert s.keys() == [c, d]
    with pytest.raises(ValueError, match="not pinned"):
        s.unpin([a])
    s.close()


class _GatedStore(LocalDirStore):
    """The real store, with a gate inside its read (after open) to hold a read in flight."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.in_read = threading.Event()
        self.gate = threading.Event()

    def _read_fd(self, *args, **kwargs):
        self.in_read.set()
        assert self.gate.wait(10)
        return super()._read_fd(*args, **kwargs)


def test_block_being_read_is_pinned(tmp_path):
    fnb = block_file.file_nbytes(LAYOUT)
    s = _GatedStore(tmp_path / "kv", LAYOUT, capacity_bytes=2 * fnb)
    a, b, c = make_keys(3)
    s.write(a, content(a))
    s.write(b, content(b))
    out = np.zeros(LAYOUT.full_block_nbytes, np.uint8)
    fut = s.submit_read(a, out)
    assert s.in_read.wait(10)
    s.write(c, content(c))  # a is LRU but being read: b is evicted instead
    assert s.contains(a) and not s.contains(b)
    s.gate.set()
    assert fut.result(10)
    np.testing.assert_array_equal(out, content(a))
    s.close()


def test_read_many_and_misses(store):
    keys = make_keys(4)
    for k in keys[:3]:
        store.write(k, content(k))
    outs = [np.zeros(LAYOUT.full_block_nbytes, np.uint8) for _ in keys]
    assert store.read_many(keys, outs) == [True, True, True, False]
    for k, o in zip(keys[:3], outs[:3], strict=True):
        np.testing.assert_array_equal(o, content(k))
    layer_outs = [np.zeros(LBN, np.uint8) for _ in keys]
    assert store.read_many(keys, layer_outs, layers=[3]) == [True, True, True, False]
    np.testing.assert_array_equal(layer_outs[1], content(keys[1]).reshape(4, LBN)[3])
    st = store.stats()
    assert st.read_absent == 2 and st.misses == 2 and st.read_corrupt == 0
    with pytest.raises(ValueError, match="2 keys but 1 output"):
        store.read_many(keys[:2], outs[:1])


def test_write_twice_is_idempotent_and_durable_writes_work(store):
    (k,) = make_keys(1)
    assert store.write(k, content(k), durable=True)
    mtime = os.stat(store.path_of(k)).st_mtime_ns
    assert store.write(k, content(k))
    assert os.stat(store.path_of(k)).st_mtime_ns == mtime
    st = store.stats()
    assert st.writes == 1 and st.write_dedup == 1
    assert store.write(k, content(k), overwrite=True)
    out = np.zeros(LAYOUT.full_block_nbytes, np.uint8)
    assert store.read(k, out)
    np.testing.assert_array_equal(out, content(k))
    assert store.used_bytes == block_file.file_nbytes(LAYOUT)


def test_crc32_blocks_are_readable_by_any_store(tmp_path):
    keys = make_keys(2)
    w = LocalDirStore(tmp_path / "kv", LAYOUT, checksum="crc32")
    for k in keys:
        w.write(k, content(k))
    r = LocalDirStore(tmp_path / "kv", LAYOUT)  # writes xxh3, reads whatever the header says
    out = np.zeros(LAYOUT.full_block_nbytes, np.uint8)
    assert r.read(keys[0], out)
    np.testing.assert_array_equal(out, content(keys[0]))
    with open(w.path_of(keys[1]), "r+b") as f:  # corruption is caught with crc32 too
        f.seek(block_file.header_nbytes(LAYOUT) + 5)
        f.write(bytes([f.read(1)[0] ^ 0x10]))
    assert not r.read(keys[1], out)
    assert r.stats().read_corrupt == 1
    w.close()
    r.close()


# ---- corruption -------------------------------------------------------------------------------------------
def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x01]))


def _corrupt_payload(s, k):
    _flip(s.path_of(k), s.header_nbytes + 2 * LBN + 17)  # a byte in Layer Block 2


def _truncate(s, k):
    os.truncate(s.path_of(k), s.header_nbytes + LAYOUT.full_block_nbytes - 100)


def _header_garbage(s, k):
    with open(s.path_of(k), "r+b") as f:
        f.seek(40)
        f.write(b"\xde\xad\xbe\xef" * 4)


def _bad_magic(s, k):
    with open(s.path_of(k), "r+b") as f:
        f.write(b"NOTABLOK")


def _write_with(s, k, layout):
    """Put a valid block of another layout/model where block k of `s` should be."""
    tmp = os.path.join(os.path.dirname(s.root), "other-" + layout.fingerprint.replace("/", "_"))
    other = LocalDirStore(tmp, layout)
    other.write(k, content(k, layout))
    shutil.copyfile(other.path_of(k), s.path_of(k))
    other.close()


def _other_fingerprint(s, k):
    _write_with(s, k, BlockLayout(4, 16, 40, "another-model/bf16"))


def _other_layout(s, k):
    _write_with(s, k, BlockLayout(4, 16, 48, LAYOUT.fingerprint))


def _other_num_layers(s, k):
    _write_with(s, k, BlockLayout(5, 16, 32, LAYOUT.fingerprint))


def _wrong_name(s, k):
    (other,) = make_keys(1, seed=99)
    s.write(other, content(other))
    shutil.copyfile(s.path_of(other), s.path_of(k))


CORRUPTIONS = {
    "payload byte flipped": (_corrupt_payload, "checksum mismatch in Layer Block\\(s\\) \\[2\\]"),
    "truncated": (_truncate, "truncated"),
    "header garbage": (_header_garbage, "header checksum mismatch"),
    "bad magic": (_bad_magic, "bad magic"),
    "another model's fingerprint": (_other_fingerprint, "fingerprint mismatch"),
    "another bytes/token/layer": (_other_layout, "layout mismatch"),
    "another number of layers": (_other_num_layers, "layout mismatch"),
    "block stored under another key": (_wrong_name, "key mismatch"),
}


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
@pytest.mark.parametrize("layers", [None, [2]], ids=["full", "layer2"])
def test_corrupt_block_is_a_logged_counted_removed_miss(store, caplog, how, layers):
    damage, reason = CORRUPTIONS[how]
    keys = make_keys(3)
    for k in keys:
        store.write(k, content(k))
    victim = keys[1]
    damage(store, victim)
    n = LAYOUT.full_block_nbytes if layers is None else LBN
    out = np.zeros(n, np.uint8)
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.store.local_dir"):
        assert not store.read(victim, out, layers=layers)
    assert any("corrupt block" in r.getMessage() for r in caplog.records)
    assert any(__import__("re").search(reason, r.getMessage()) for r in caplog.records), caplog.text
    st = store.stats()
    assert st.read_corrupt == 1 and st.corrupt_blocks == 1 and st.read_absent == 0 and st.read_hits == 0
    assert not os.path.exists(store.path_of(victim))
    assert store.lookup(keys) == 1
    assert not store.read(victim, out, layers=layers)  # now simply absent
    assert store.stats().read_absent == 1
    for k in (keys[0], keys[2]):  # the others survive intact
        full = np.zeros(LAYOUT.full_block_nbytes, np.uint8)
        assert store.read(k, full)
        np.testing.assert_array_equal(full, content(k))


def test_layer_reads_verify_only_what_they_read(store):
    (k,) = make_keys(1)
    store.write(k, content(k))
    _corrupt_payload(store, k)  # Layer Block 2 is damaged
    out = np.zeros((2, LBN), np.uint8)
    assert store.read(k, out, layers=[0, 3])  # undamaged layers are still good KV
    np.testing.assert_array_equal(out, content(k).reshape(4, LBN)[[0, 3]])
    assert not store.read(k, out, layers=[1, 2])
    assert not store.contains(k)


def test_verify_false_skips_payload_checksums_but_not_header_checks(store):
    keys = make_keys(2)
    for k in keys:
        store.write(k, content(k))
    _corrupt_payload(store, keys[0])
    out = np.zeros(LAYOUT.full_block_nbytes, np.uint8)
    assert store.read(keys[0], out, verify=False)  # documented: verify=False trusts the payload
    _other_fingerprint(store, keys[1])
    assert not store.read(keys[1], out, verify=False)


def test_truncated_and_temp_files_are_cleaned_at_open(tmp_path):
    s = LocalDirStore(tmp_path / "kv", LAYOUT)
    keys = make_keys(3)
    for k in keys:
        s.write(k, content(k))
    os.truncate(s.path_of(keys[0]), 100)
    d = os.path.dirname(s.path_of(keys[1]))
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead_pid = int(dead.stdout)
    host = s._host
    dead_tmp = os.path.join(d, f".tmp.{host}.{dead_pid}.abcd1234.{keys[1].hex()}")
    live_tmp = os.path.join(d, f".tmp.{host}.{os.getppid()}.abcd1234.{keys[2].hex()}")  # a live writer's
    for p in (dead_tmp, live_tmp):
        with open(p, "wb") as f:
            f.write(b"partial")
    s.close()
    s2 = LocalDirStore(tmp_path / "kv", LAYOUT)
    st = s2.stats()
    assert st.temp_files_removed == 1 and st.corrupt_blocks == 1
    assert not os.path.exists(dead_tmp) and os.path.exists(live_tmp)
    assert sorted(s2.keys()) == sorted(keys[1:])
    s2.close()


def test_wsum64_detects_every_single_byte_flip_and_word_swap():
    rng = np.random.default_rng(3)
    for lbn in (64, 61):  # whole words, and a tail of 5 bytes
        block = rng.integers(0, 256, size=(1, lbn), dtype=np.uint8)
        ref = block_file.layer_checksums(block, "wsum64")
        for i in range(lbn):
            for bit in (0x01, 0x80):
                damaged = block.copy()
                damaged[0, i] ^= bit
                assert block_file.layer_checksums(damaged, "wsum64") != ref, (lbn, i, bit)
        if lbn % 8 == 0:
            swapped = block.copy().view("<u8")
            swapped[0, [1, 5]] = swapped[0, [5, 1]]
            assert block_file.layer_checksums(swapped.view(np.uint8), "wsum64") != ref


def test_odd_layer_block_size_round_trip(tmp_path):
    odd = BlockLayout(num_layers=3, block_tokens=5, bytes_per_token_per_layer=7, fingerprint="odd")  # 35 B/layer
    s = LocalDirStore(tmp_path / "odd", odd)
    (k,) = make_keys(1)
    s.write(k, content(k, odd))
    out = np.zeros(odd.layer_block_nbytes, np.uint8)
    assert s.read(k, out, layers=[1])
    np.testing.assert_array_equal(out, content(k, odd)[35:70])
    s.close()


# ---- xxh3 (the default checksum) and chunked verified reads -------------------------------------------------
def _algo_id(path) -> int:
    with open(path, "rb") as f:
        return int.from_bytes(f.read(20)[16:20], "little")  # after magic, version, header size


def test_xxh3_is_the_default_and_matches_the_xxhash_reference(store):
    import xxhash

    assert store.checksum == "xxh3"
    (k,) = make_keys(1)
    assert store.write(k, content(k))
    assert _algo_id(store.path_of(k)) == block_file.CHECKSUM_ALGOS["xxh3"] == 3
    blocks = content(k).reshape(LAYOUT.num_layers, LBN)
    want = [xxhash.xxh3_64_intdigest(blocks[i].tobytes()) for i in range(LAYOUT.num_layers)]
    assert block_file.layer_checksums(blocks, "xxh3").tolist() == want
    with open(store.path_of(k), "rb") as f:  # the header holds exactly these sums
        _, stored = block_file.parse_header(
            f.read(store.header_nbytes), LAYOUT, k, block_file.fingerprint_digest(LAYOUT.fingerprint)
        )
    assert stored.tolist() == want
    for algo in block_file.CHECKSUM_ALGOS:  # the read path's list form agrees with the array form
        assert (
            block_file.layer_checksum_list(blocks.reshape(-1), LBN, algo)
            == block_file.layer_checksums(blocks, algo).tolist()
        )
    out = np.zeros(LAYOUT.full_block_nbytes, np.uint8)
    assert store.read(k, out)
    np.testing.assert_array_equal(out, content(k))


# read_chunk_bytes: 0 = read all then check; 1 and LBN-1 round up to one Layer Block; 2*LBN+7 is not a multiple of
# a Layer Block (2 per chunk, the last chunk shorter); 3*LBN leaves a 1-layer tail; 1 MiB covers the block.
CHUNKS = [0, 1, LBN - 1, LBN, 2 * LBN + 7, 3 * LBN, 1 << 20]


@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunked_reads_round_trip(tmp_path, chunk, rm):
    s = LocalDirStore(tmp_path / "kv", LAYOUT, read_chunk_bytes=chunk, **rm)
    keys = make_keys(3)
    for k in keys:
        assert s.write(k, content(k))
    for k in keys:
        full = np.zeros(LAYOUT.full_block_nbytes, np.uint8)
        assert s.read(k, full)
        np.testing.assert_array_equal(full, content(k))
        ref = content(k).reshape(LAYOUT.num_layers, LBN)
        for layers in ([0, 1, 2, 3], [3, 0, 1], [1, 2], [2]):
            packed = np.zeros((len(layers), LBN), np.uint8)
            assert s.read(k, packed, layers=layers)
            np.testing.assert_array_equal(packed, ref[layers])
            inplace = np.zeros((LAYOUT.num_layers, LBN), np.uint8)
            assert s.read(k, inplace, layers=layers)
            np.testing.assert_array_equal(inplace[layers], ref[layers])
    assert s.stats().read_hits == 3 * 9 and s.stats().read_corrupt == 0
    s.close()


def _area(n_blocks: int, fill: int = 7) -> np.ndarray:
    """A request's layer-major host area [L, n_blocks * block_tokens, bpt] (what the storage NIC fills)."""
    return np.full(
        (LAYOUT.num_layers, n_blocks * LAYOUT.block_tokens, LAYOUT.bytes_per_token_per_layer), fill, np.uint8
    )


def _rows_of(area: np.ndarray, j: int) -> np.ndarray:
    bs = LAYOUT.block_tokens
    return area[:, j * bs : (j + 1) * bs]


@pytest.mark.parametrize("chunk", CHUNKS)
def test_row_strided_reads_fill_a_layer_major_area_in_place(tmp_path, chunk, rm):
    """`out` may be one block's rows of a layer-major area (`area[:, t0 : t0 + bs]`): each Layer Block lands in
    its row, nothing outside the block's rows is written, with every read method, loop and chunk size."""
    s = LocalDirStore(tmp_path / "kv", LAYOUT, read_chunk_bytes=chunk, **rm)
    assert s.strided_out
    keys = make_keys(5)
    for k in keys:
        assert s.write(k, content(k))
    area = _area(5)
    for j in (0, 2, 4, 1, 3):
        assert s.read(keys[j], _rows_of(area, j))
    want = np.concatenate([content(k).reshape(LAYOUT.full_block_shape) for k in keys], axis=1)
    np.testing.assert_array_equal(area, want)
    # some layers of one block, in place in its rows; the other rows and blocks untouched
    area = _area(5)
    assert s.read(keys[3], _rows_of(area, 3), layers=[3, 1])
    ref = content(keys[3]).reshape(LAYOUT.full_block_shape)
    np.testing.assert_array_equal(_rows_of(area, 3)[[1, 3]], ref[[1, 3]])
    assert (_rows_of(area, 3)[[0, 2]] == 7).all()
    mask = np.ones(area.shape, bool)
    mask[[1, 3], 3 * LAYOUT.block_tokens : 4 * LAYOUT.block_tokens] = False
    assert (area[mask] == 7).all()
    # the same through the thread pool and read_many
    area = _area(5)
    assert s.submit_read(keys[2], _rows_of(area, 2)).result()
    assert s.read_many(keys[:2], [_rows_of(area, 0), _rows_of(area, 1)]) == [True, True]
    np.testing.assert_array_equal(area[:, : 3 * LAYOUT.block_tokens], want[:, : 3 * LAYOUT.block_tokens])
    assert s.stats().bytes_read == LAYOUT.full_block_nbytes * (5 + 3) + 2 * LBN
    s.close()


@pytest.mark.parametrize("damaged_layer", [0, 2, 3])
def test_row_strided_read_of_a_damaged_block_is_a_miss_that_stays_in_its_rows(tmp_path, rm, damaged_layer):
    s = LocalDirStore(tmp_path / "kv", LAYOUT, read_chunk_bytes=LBN, **rm)
    keys = make_keys(3)
    for k in keys:
        s.write(k, content(k))
    path = s.path_of(keys[1])
    raw = bytearray(open(path, "rb").read())
    raw[s.header_nbytes + damaged_layer * LBN + 5] ^= 0x40
    with open(path, "wb") as f:
        f.write(raw)
    area = _area(3)
    assert s.read(keys[0], _rows_of(area, 0))
    assert not s.read(keys[1], _rows_of(area, 1))  # a miss: counted, removed
    assert s.stats().read_corrupt == 1 and not s.contains(keys[1])
    assert (_rows_of(area, 2) == 7).all()  # the next block's rows are untouched
    np.testing.assert_array_equal(_rows_of(area, 0), content(keys[0]).reshape(LAYOUT.full_block_shape))
    if rm.get("read_method") == "mmap":  # mapped reads copy only checked Layer Blocks
        ref = content(keys[1]).reshape(LAYOUT.full_block_shape)
        np.testing.assert_array_equal(_rows_of(area, 1)[:damaged_layer], ref[:damaged_layer])
        assert (_rows_of(area, 1)[damaged_layer:] == 7).all()
    s.close()


def test_row_strided_out_argument_errors(store):
    (k,) = make_keys(1)
    store.write(k, content(k))
    area = _area(3)
    with pytest.raises(ValueError, match="writable"):
        ro = area.copy()
        ro.flags.writeable = False
        store.read(k, _rows_of(ro, 1))
    wide = np.zeros((LAYOUT.num_layers, LAYOUT.block_tokens, 2 * LAYOUT.bytes_per_token_per_layer), np.uint8)
    with pytest.raises(ValueError, match="C-contiguous"):  # rows with gaps inside them: not one Layer Block each
        store.read(k, wide[:, :, : LAYOUT.bytes_per_token_per_layer])
    with pytest.raises(ValueError, match="C-contiguous"):  # float rows are not a uint8 Full Block
        store.read(k, np.zeros((LAYOUT.num_layers, 3 * LAYOUT.block_tokens, 10), np.float32)[:, : LAYOUT.block_tokens])
    # a one-block area is contiguous: the plain path
    one = _area(1)
    assert store.read(k, _rows_of(one, 0))
    np.testing.assert_array_equal(one.reshape(-1), content(k))


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("algo", ["xxh3", "wsum64", "crc32"])
def test_damage_in_any_single_layer_block_is_caught_by_chunked_reads(tmp_path, chunk, algo, rm):
    """Flip the first, a middle and the last byte of each Layer Block in turn: full reads and every layer read
    that includes the damaged layer miss (naming it); layer reads that exclude it return good KV."""
    s = LocalDirStore(tmp_path / "kv", LAYOUT, checksum=algo, read_chunk_bytes=chunk, **rm)
    (k,) = make_keys(1)
    ref = content(k).reshape(LAYOUT.num_layers, LBN)
    misses = 0
    for layer in range(LAYOUT.num_layers):
        for pos in (0, LBN // 2, LBN - 1):
            for layers in (None, [layer], [0, 1, 2, 3], [3, 2, 1, 0], [x for x in range(4) if x != layer]):
                assert s.write(k, content(k), overwrite=True)
                _flip(s.path_of(k), s.header_nbytes + layer * LBN + pos)
                n = LAYOUT.num_layers if layers is None else len(layers)
                out = np.zeros((n, LBN), np.uint8)
                if layers is not None and layer not in layers:
                    assert s.read(k, out, layers=layers), (layer, pos, layers)
                    np.testing.assert_array_equal(out, ref[layers])
                    continue
                assert not s.read(k, out, layers=layers), (layer, pos, layers)
                assert not os.path.exists(s.path_of(k))
                misses += 1
    st = s.stats()
    assert st.read_corrupt == misses == st.corrupt_blocks and misses == LAYOUT.num_layers * 3 * 4
    s.close()


def test_chunked_read_names_the_damaged_layer(tmp_path, caplog, rm):
    s = LocalDirStore(tmp_path / "kv", LAYOUT, read_chunk_bytes=LBN, **rm)
    (k,) = make_keys(1)
    s.write(k, content(k))
    _flip(s.path_of(k), s.header_nbytes + 3 * LBN + 5)  # the last chunk
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.store.local_dir"):
        assert not s.read(k, np.zeros(LAYOUT.full_block_nbytes, np.uint8))
    assert "checksum mismatch in Layer Block(s) [3]" in caplog.text
    s.close()


@pytest.mark.parametrize("chunk", [LBN, 2 * LBN + 7, 0])
def test_truncation_past_the_first_chunk_is_a_miss(tmp_path, caplog, chunk, rm):
    s = LocalDirStore(tmp_path / "kv", LAYOUT, read_chunk_bytes=chunk, **rm)
    keys = make_keys(2)
    for k in keys:
        s.write(k, content(k))
    os.truncate(s.path_of(keys[0]), s.header_nbytes + 3 * LBN + 10)  # in the last Layer Block
    out = np.zeros(LAYOUT.full_block_nbytes, np.uint8)
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.store.local_dir"):
        assert not s.read(keys[0], out)
    assert "truncated" in caplog.text
    for verify in (True, False):
        assert s.read(keys[1], out, verify=verify)
        np.testing.assert_array_equal(out, content(keys[1]))
    assert s.stats().read_corrupt == 1 and not os.path.exists(s.path_of(keys[0]))
    s.close()


@pytest.mark.parametrize("old", ["wsum64", "crc32"])
def test_blocks_of_older_algos_are_read_and_verified_by_the_default_store(tmp_path, old, rm):
    keys = make_keys(3)
    w = LocalDirStore(tmp_path / "kv", LAYOUT, checksum=old)
    for k in keys:
        w.write(k, content(k))
    w.close()
    r = LocalDirStore(tmp_path / "kv", LAYOUT, read_chunk_bytes=LBN, **rm)  # writes xxh3, reads what each header says
    assert r.checksum == "xxh3" and _algo_id(r.path_of(keys[0])) == block_file.CHECKSUM_ALGOS[old]
    out = np.zeros(LAYOUT.full_block_nbytes, np.uint8)
    assert r.read(keys[0], out)
    np.testing.assert_array_equal(out, content(keys[0]))
    lb = np.zeros(LBN, np.uint8)
    assert r.read(keys[0], lb, layers=[2])
    np.testing.assert_array_equal(lb, content(keys[0]).reshape(4, LBN)[2])
    _flip(r.path_of(keys[1]), r.header_nbytes + LBN + 3)
    assert not r.read(keys[1], out)
    _flip(r.path_of(keys[2]), r.header_nbytes + 2 * LBN + 3)
    assert r.read(keys[2], lb, layers=[1]) and not r.read(keys[2], lb, layers=[2])
    assert r.stats().read_corrupt == 2
    new = make_keys(1, seed=5)[0]
    r.write(new, content(new))
    assert _algo_id(r.path_of(new)) == block_file.CHECKSUM_ALGOS["xxh3"]
    r.close()


def test_unknown_checksum_algo_in_a_header_is_rejected(store, caplog):
    (k,) = make_keys(1)
    store.write(k, content(k))
    path = store.path_of(k)
    with open(path, "rb") as f:
        hdr = bytearray(f.read(store.header_nbytes))
    hdr[16:20] = (99).to_bytes(4, "little")  # an algo id this code does not know, with a valid header crc
    table_end = block_file._FIXED.size + 8 * LAYOUT.num_layers
    hdr[table_end : table_end + 4] = zlib.crc32(bytes(hdr[:table_end])).to_bytes(4, "little")
    with pytest.raises(block_file.BlockFormatError, match="unknown checksum algo id 99"):
        block_file.parse_header(hdr, LAYOUT, k, block_file.fingerprint_digest(LAYOUT.fingerprint))
    for layers, verify in ((None, True), ([1], True), (None, False)):
        assert store.write(k, content(k), overwrite=True)
        with open(path, "r+b") as f:
            f.write(hdr)
        out = np.zeros(LAYOUT.full_block_nbytes if layers is None else LBN, np.uint8)
        with caplog.at_level(logging.WARNING, logger="dualpath_jax.store.local_dir"):
            assert not store.read(k, out, layers=layers, verify=verify)  # never trusted, even with verify=False
        assert "unknown checksum algo id 99" in caplog.text
        assert os.path.exists(path)  # a newer dualpath-jax's block: a miss, left (fix29, test_fix29_compatstore.py)
    assert (store.stats().read_newer_format, store.stats().read_corrupt) == (3, 0)


# ---- configuration and bad arguments ------------------------------------------------------------------
def test_factory_builds_registered_store(tmp_path):
    assert "local_dir" in STORES
    s = make_store({"name": "local_dir", "root": str(tmp_path / "kv"), "capacity_bytes": 10**6}, LAYOUT)
    assert isinstance(s, LocalDirStore) and s.capacity_bytes == 10**6
    s.close()
    import ml_collections

    cfg = ml_collections.ConfigDict({"name": "local_dir", "root": str(tmp_path / "kv2"), "checksum": "crc32"})
    s = make_store(cfg, LAYOUT)
    assert s.checksum == "crc32"
    s.close()
    with pytest.raises(KeyError, match="unknown kv store 'nfs'; known: local_dir"):
        make_store({"name": "nfs"}, LAYOUT)
    with pytest.raises(ValueError, match=r"unknown local_dir store option\(s\) \['capacity'\]"):
        make_store({"name": "local_dir", "root": "/tmp/x", "capacity": 5}, LAYOUT)
    with pytest.raises(ValueError, match="needs a 'name'"):
        make_store({"root": "/tmp/x"}, LAYOUT)
    with pytest.raises(ValueError, match="needs 'root'"):
        make_store({"name": "local_dir"}, LAYOUT)


def test_pin_and_unpin_check_their_keys(tmp_path):
    """`pinned(key)` / `pin(key)` with one key (not a list of keys) pinned its bytes as int "keys" and left the block
    unprotected, evicted by the next write; an unpin that fails part-way changed the pins before it raised."""
    s = LocalDirStore(tmp_path / "kv", LAYOUT, capacity_bytes=2 * block_file.file_nbytes(LAYOUT))
    keys = make_keys(3)
    for k in keys[:2]:
        assert s.write(k, content(k))
    with pytest.raises(TypeError, match="got one key"):
        s.pin(keys[0])
    with pytest.raises(TypeError, match="got one key"):  # (as pin's; it was "block key must be bytes ... 164")
        with s.pinned(keys[0]):
            pass
    with pytest.raises(TypeError, match="got one key"):
        s.lookup(keys[0])
    with pytest.raises(TypeError, match="block key must be bytes"):
        s.pin(["abc"])
    assert not s._pins
    with s.pinned([keys[0]]):
        assert s.write(keys[2], content(keys[2]))  # evicts keys[1], not the pinned keys[0]
        assert s.contains(keys[0]) and not s.contains(keys[1])
        with pytest.raises(ValueError, match=f"unpin of block {keys[1].hex()} that is not pinned"):
            s.unpin([keys[0], keys[1]])
        with pytest.raises(ValueError, match="not pinned"):
            s.unpin([keys[0], keys[0]])
        assert s._pins == {keys[0]: 1}  # nothing changed
    assert not s._pins
    assert s.lookup(iter(keys)) == 1  # (any iterable of keys)
    s.close()


def test_store_metadata_that_is_not_a_json_object_and_bad_factory_configs(tmp_path):
    """A STORE.json holding valid JSON other than an object raised AttributeError; make_store of a config that is
    neither a mapping nor an object with attributes raised from vars()."""
    for text in ("[]", "null", "3"):
        (tmp_path / "kv").mkdir(exist_ok=True)
        (tmp_path / "kv" / "STORE.json").write_text(text)
        with pytest.raises(ValueError, match="STORE.json is unreadable .*not an object"):
            LocalDirStore(tmp_path / "kv", LAYOUT)
    for bad in (None, "local_dir"):
        with pytest.raises(TypeError, match="store config must be a mapping or an object with attributes"):
            make_store(bad, LAYOUT)


def test_a_store_directory_it_cannot_delete_in_still_opens(tmp_path, monkeypatch, caplog):
    """On a read-only mount a damaged block or a dead writer's temp file cannot be removed: that failed the open
    (an OSError from the scan); now it is logged, the store opens and the damaged block is a miss."""
    s = LocalDirStore(tmp_path / "kv", LAYOUT)
    keys = make_keys(2)
    for k in keys:
        assert s.write(k, content(k))
    s.close()
    with open(s.path_of(keys[0]), "r+b") as f:
        f.truncate(100)
    tmp = os.path.join(os.path.dirname(s.path_of(keys[1])), ".tmp.otherhost.1.abcd." + keys[1].hex())
    open(tmp, "w").close()
    os.utime(tmp, (0, 0))  # old: stale

    def read_only_unlink(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", path)

    monkeypatch.setattr(os, "unlink", read_only_unlink)
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.store.local_dir"):
        s = LocalDirStore(tmp_path / "kv", LAYOUT)
    assert "could not remove temp file" in caplog.text and "could not remove corrupt block" in caplog.text
    assert s.keys() == [keys[1]] and os.path.exists(tmp)
    out = np.zeros(LAYOUT.full_block_nbytes, np.uint8)
    assert not s.read(keys[0], out) and s.read(keys[1], out)
    np.testing.assert_array_equal(out, content(keys[1]))
    s.close()


def test_bad_constructor_arguments(tmp_path):
    with pytest.raises(ValueError, match="cannot hold one block"):
        LocalDirStore(tmp_path / "a", LAYOUT, capacity_bytes=100)
    with pytest.raises(ValueError, match="checksum must be one of"):
        LocalDirStore(tmp_path / "a", LAYOUT, checksum="md5")
    with pytest.raises(TypeError, match="layout must be a BlockLayout"):
        LocalDirStore(tmp_path / "a", {"num_layers": 4})
    with pytest.raises(ValueError, match="io_threads"):
        LocalDirStore(tmp_path / "a", LAYOUT, io_threads=0)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="read_chunk_bytes must be an int >= 0"):
            LocalDirStore(tmp_path / "a", LAYOUT, read_chunk_bytes=bad)
    with pytest.raises(ValueError, match="read_method must be one of"):
        LocalDirStore(tmp_path / "a", LAYOUT, read_method="pread")
    for bad in (-1, 0.5, None):
        with pytest.raises(ValueError, match="mmap_min_bytes must be an int >= 0"):
            LocalDirStore(tmp_path / "a", LAYOUT, mmap_min_bytes=bad)
    for bad in (-1, 0.5, True):  # (None: the default for the loops in use)
        with pytest.raises(ValueError, match="mmap_after_reads must be an int >= 0"):
            LocalDirStore(tmp_path / "a", LAYOUT, mmap_after_reads=bad)
        with pytest.raises(ValueError, match="nontemporal_min_bytes must be an int >= 0 or None"):
            LocalDirStore(tmp_path / "a", LAYOUT, nontemporal_min_bytes=bad)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        LocalDirStore(tmp_path / "file", LAYOUT)
    with pytest.raises(FileNotFoundError, match="create=False"):
        LocalDirStore(tmp_path / "missing", LAYOUT, create=False)
    LocalDirStore(tmp_path / "b", LAYOUT).close()
    with pytest.raises(ValueError, match="one directory per model"):
        LocalDirStore(tmp_path / "b", BlockLayout(4, 16, 40, "other-model"))


def test_bad_read_and_write_arguments(store):
    (k,) = make_keys(1)
    store.write(k, content(k))
    with pytest.raises(ValueError, match="a Full Block of .* is 2560 B"):
        store.read(k, np.zeros(100, np.uint8))
    with pytest.raises(ValueError, match="reading 2 Layer Blocks needs 1280 B"):
        store.read(k, np.zeros(100, np.uint8), layers=[0, 1])
    with pytest.raises(IndexError, match="layer 4 out of range"):
        store.read(k, np.zeros(LBN, np.uint8), layers=[4])
    ro = np.zeros(LAYOUT.full_block_nbytes, np.uint8)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writable"):
        store.read(k, ro)
    with pytest.raises(ValueError, match="C-contiguous"):
        store.read(k, np.zeros((LAYOUT.full_block_nbytes, 2), np.uint8)[:, 0])
    with pytest.raises(ValueError, match="read-only bytes"):
        store.read(k, b"\0" * LAYOUT.full_block_nbytes)
    with pytest.raises(TypeError, match="block key must be bytes"):
        store.read("abc", np.zeros(LAYOUT.full_block_nbytes, np.uint8))
    with pytest.raises(ValueError, match="full_block holds 10 B"):
        store.write(k, np.zeros(10, np.uint8))
    with pytest.raises(TypeError, match="block key must be bytes"):
        store.lookup([k, 5])


def test_layer_reads_of_open_blocks_still_check_changed_files(store):
    """Open block files are cached with their checked header; bytes changed under them still fail the checks."""
    keys = make_keys(3)
    for k in keys:
        store.write(k, content(k))
    out = np.zeros(LBN, np.uint8)
    for k in keys:
        assert store.read(k, out, layers=[0])  # files open, headers cached
    _corrupt_payload(store, keys[0])  # in place
    assert not store.read(keys[0], out, layers=[2])
    with open(store.path_of(keys[2]), "rb") as f:  # keys[2]'s block written in place over keys[1]'s file
        other = f.read()
    with open(store.path_of(keys[1]), "r+b") as f:
        f.write(other)
    assert not store.read(keys[1], out, layers=[1])
    os.truncate(store.path_of(keys[2]), store.header_nbytes + LBN)  # truncated in place
    assert not store.read(keys[2], out, layers=[3])
    assert store.stats().read_corrupt == 3
    # A block replaced by a write (a new file) is read from the new file.
    store.write(keys[0], content(keys[0]))
    assert store.read(keys[0], out, layers=[2])
    np.testing.assert_array_equal(out, content(keys[0]).reshape(4, LBN)[2])


def test_full_reads_of_open_blocks_recheck_a_changed_header(store, caplog):
    """A full read compares the header it read with the one its open file was checked with; a changed header
    (another block's file written in place) is parsed and rejected, changed payload still fails its checksum."""
    keys = make_keys(2)
    for k in keys:
        store.write(k, content(k))
    full = np.zeros(LAYOUT.full_block_nbytes, np.uint8)
    for k in keys:
        assert store.read(k, full) and store.read(k, full)  # files open, headers checked once
    assert all(store._fds[k].header is not None for k in keys)
    with open(store.path_of(keys[1]), "rb") as f:
        other = f.read()
    with open(store.path_of(keys[0]), "r+b") as f:
        f.write(other)
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.store.local_dir"):
        assert not store.read(keys[0], full)
    assert "key mismatch" in caplog.text
    _flip(store.path_of(keys[1]), store.header_nbytes + 2 * LBN + 9)
    assert not store.read(keys[1], full)
    assert store.stats().read_corrupt == 2


def _mapped_blocks(root) -> int:
    """Block-file mappings of this process (lines of /proc/self/maps naming a file under `root`)."""
    with open("/proc/self/maps") as f:
        return sum(f"{root}/blocks/" in line for line in f)


def test_fd_cache_is_bounded_and_closed(tmp_path, rm):
    """At most fd_cache files stay open (and, with mmap, mapped); a removed or evicted entry, close_files() and
    close() unmap and close them; without the cache nothing stays open or mapped after a read."""
    keys = make_keys(6)
    s = LocalDirStore(tmp_path / "kv", LAYOUT, fd_cache=2, **rm)
    mapped = rm["read_method"] == "mmap"
    for k in keys:
        s.write(k, content(k))
    out = np.zeros(LBN, np.uint8)
    full = np.zeros(LAYOUT.full_block_nbytes, np.uint8)
    for k in keys:
        assert s.read(k, out, layers=[1]) and s.read(k, full)
    assert list(s._fds) == keys[-2:]
    assert _mapped_blocks(s.root) == (2 if mapped else 0)
    s.remove(keys[-1])
    assert list(s._fds) == keys[-2:-1]
    assert _mapped_blocks(s.root) == (1 if mapped else 0)
    s.close_files()  # closed and unmapped now; the store reads on, opening (and mapping) anew
    assert not s._fds and _mapped_blocks(s.root) == 0
    assert s.read(keys[0], full) and list(s._fds) == keys[:1] and _mapped_blocks(s.root) == (1 if mapped else 0)
    np.testing.assert_array_equal(full, content(keys[0]))
    s.close()
    assert not s._fds and _mapped_blocks(s.root) == 0
    nocache = LocalDirStore(tmp_path / "kv", LAYOUT, fd_cache=0, **rm)
    assert nocache.read(keys[0], out, layers=[1]) and nocache.read(keys[0], full) and not nocache._fds
    assert _mapped_blocks(s.root) == 0
    with pytest.raises(ValueError, match="fd_cache"):
        LocalDirStore(tmp_path / "kv", LAYOUT, fd_cache=-1)


def test_reads_into_host_buffer_pool_slots(store):
    from dualpath_jax.host_buffers import HostBufferPool

    keys = make_keys(5)
    for k in keys:
        store.write(k, content(k))
    pool = HostBufferPool(slot_nbytes=LAYOUT.full_block_nbytes, num_slots=8, name="pe0")
    with pool.acquire(nslots=len(keys)) as buf:
        assert store.read_many(keys, buf.views) == [True] * 5
        for k, off in zip(keys, buf.offsets, strict=True):  # the bytes sit where a transport would address them
            np.testing.assert_array_equal(pool.arena[off : off + LAYOUT.full_block_nbytes], content(k))


def test_freshness_across_store_objects_on_one_directory(tmp_path):
    keys = make_keys(3)
    writer = LocalDirStore(tmp_path / "kv", LAYOUT)
    for k in keys:
        writer.write(k, content(k))
    lazy = LocalDirStore(tmp_path / "kv", LAYOUT)  # index from the scan at open
    fresh = LocalDirStore(tmp_path / "kv", LAYOUT, stat_on_hit=True)
    writer.remove(keys[1])  # another process evicts a block
    assert fresh.lookup(keys) == 1  # stats every hit: sees the removal at once
    assert lazy.lookup(keys) == 3  # index answer (documented): the read then misses and fixes the index
    out = np.zeros(LAYOUT.full_block_nbytes, np.uint8)
    assert not lazy.read(keys[1], out)
    assert lazy.stats().read_absent == 1 and lazy.stats().read_corrupt == 0
    assert lazy.lookup(keys) == 1
    for s in (writer, lazy, fresh):
        s.close()


def test_random_operations_match_an_lru_model(tmp_path, rm):
    """Writes, reads, lookups and removes in random order against a plain OrderedDict model of LRU."""
    import collections

    fnb = block_file.file_nbytes(LAYOUT)
    cap = 5
    s = LocalDirStore(tmp_path / "kv", LAYOUT, capacity_bytes=cap * fnb, **rm)
    keys = make_keys(12)
    model: collections.OrderedDict[bytes, None] = collections.OrderedDict()
    rng = np.random.default_rng(7)
    out = np.zeros(LAYOUT.full_block_nbytes, np.uint8)
    for step in range(400):
        op = rng.choice(["write", "read", "lookup", "remove"], p=[0.4, 0.35, 0.15, 0.1])
        k = keys[rng.integers(len(keys))]
        if op == "write":
            assert s.write(k, content(k))
            if k not in model and len(model) == cap:
                model.popitem(last=False)
            model[k] = None
            model.move_to_end(k)
        elif op == "read":
            assert s.read(k, out) == (k in model), step
            if k in model:
                np.testing.assert_array_equal(out, content(k))
                model.move_to_end(k)
        elif op == "lookup":
            start = int(rng.integers(len(keys)))
            chain = keys[start : start + 4]
            want = next((i for i, c in enumerate(chain) if c not in model), len(chain))
            assert s.lookup(chain) == want, step
            for c in chain[:want]:
                model.move_to_end(c)
        else:
            assert s.remove(k) == (k in model)
            model.pop(k, None)
        assert s.keys() == list(model), (step, op)
    assert s.used_bytes == len(model) * fnb
    s.close()


def test_store_benchmark_runs_small(tmp_path):
    """Smoke test of experiments/bench_store.py (no timing assertions: benchmarks report, tests check)."""
    from experiments.bench_store import format_rows, run_store_bench

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = run_store_bench(
        layouts=["deepseek_v3_fp8"], root=str(tmp_path), total_mb=8, repeats=1, threads=2, compare_tree=repo
    )
    ops = {r["op"] for r in rows}
    assert {"write", "full read 1 thread", "full read 2 threads", "layer-block reads 1 thread", "checksum"} <= ops
    assert all(r["gbps"] > 0 for r in rows)
    assert "raw preadv" in format_rows(rows) and "raw preadv x2 threads" in format_rows(rows)
    # Both read methods in every read group (and every Layer-Block read mapped, to show the threshold); the full
    # reads also with the Python loops (the same-run baseline of the compiled ones), and a ratio of means.
    reads = ["full read 1 thread", "full read 1 thread, streaming", "full read 2 threads", "layer-block reads 1 thread"]
    for op in [*reads, "full read 1 thread, cold cache"][: 5 if "full read 1 thread, cold cache" in ops else 4]:
        # (C and Python loops; the cold reads: with and without populate_cold)
        n_pre = 2 if op in reads[:3] or op == "full read 1 thread, cold cache" else 1
        assert sum("read_method=preadv" in r["variant"] and r["op"] == op for r in rows) == n_pre, op
        assert sum("default: mmap" in r["variant"] and r["op"] == op for r in rows) == 1, op
    for op in reads[:3]:
        assert sum("Python loops (native_verify=False" in r["variant"] and r["op"] == op for r in rows) == 1, op
        assert all(r["mean_ratio"] > 0 for r in rows if r["op"] == op)
    assert any("mmap_min_bytes=0" in r["variant"] for r in rows)
    # the runtime storage NIC's reads into a layer-major area: in place (4 ways) against the staging copy
    area = [r for r in rows if r["op"] == "storage NIC into a layer-major area"]
    assert len(area) == 4 and all(r["baseline"].startswith("staging buffer + copy") for r in area)
    assert any(r["variant"].startswith("in place: out = the block's rows (default") for r in area)
    # re-reads after a cold read: each case reads the pages back its own way, then re-reads them with fresh opens
    cold = "full read 1 thread, cold cache" in ops
    again = [r for r in rows if r["op"] == "full read 1 thread, re-read after a cold read"]
    assert len(again) == (7 if cold else 0)
    assert all(r["cold_gbps"] > 0 and r["baseline"] == "raw preadv of the same cached pages" for r in again)
    assert sum("pages read back by a raw preadv" in r["variant"] for r in again) == (1 if cold else 0)
    assert sum("populate_cold=False" in r["variant"] for r in again) == (2 if cold else 0)
    assert "its cold pass" in format_rows(again)
    # --compare_tree: the other tree's store (here this one, loaded under another name) runs beside this one
    # the first read of a freshly opened file, each store beside raw preadv alone (default, preadv, verify=False, other)
    pairs = [r for r in rows if r["op"] == "full read 1 thread, fresh open per read, in pairs"]
    assert len(pairs) == 4 and all(r["variant"].endswith("fd_cache=0") and r["mean_ratio"] > 0 for r in pairs)
    # (1 thread, streaming, pool, in pairs; with a cold cache also the cold read and the re-read)
    assert sum("tree (before)" in r["variant"] for r in rows) == 4 + 2 * cold
    with pytest.raises(FileNotFoundError, match="no dualpath_jax/store"):
        run_store_bench(layouts=["deepseek_v3_fp8"], root=str(tmp_path), total_mb=8, compare_tree=str(tmp_path))
    with pytest.raises(ValueError, match="unknown layout"):
        run_store_bench(layouts=["llama"])
    import subprocess
    import sys

    cli = subprocess.run(
        [sys.executable, "-m", "experiments.bench_store", "--layouts=llama"], capture_output=True, text=True, timeout=60
    )
    assert cli.returncode != 0 and "--layouts takes names of" in cli.stderr and "Traceback" not in cli.stderr


def test_write_errors_are_logged_counted_misses_not_crashes(store, caplog):
    keys = make_keys(2)
    d0 = os.path.dirname(store.path_of(keys[0]))
    assert store.write(keys[0], content(keys[0]))
    shutil.rmtree(d0)  # a vanished fan-out directory is recreated
    assert store.write(keys[0], content(keys[0]))
    assert os.path.exists(store.path_of(keys[0]))
    d1 = os.path.dirname(store.path_of(keys[1]))
    if d1 == d0:
        pytest.skip("both test keys share a fan-out directory")
    with open(d1, "w") as f:  # a file where the directory should be: the write cannot succeed
        f.write("x")
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.store.local_dir"):
        assert not store.write(keys[1], content(keys[1]))
    assert "writing block" in caplog.text and keys[1].hex() in caplog.text
    st = store.stats()
    assert st.write_errors == 1 and st.writes == 2
    assert store.lookup(keys) == 1 and store.used_bytes == block_file.file_nbytes(LAYOUT)


def test_a_write_failing_mid_file_leaves_no_temp_file_and_keeps_the_old_block(store, monkeypatch, caplog):
    """A full disk (ENOSPC) while the block's bytes are written: the write is a logged, counted failure, its temp
    file is removed, and an earlier copy of the block (an overwrite) is still there, whole."""
    (k,) = make_keys(1)
    assert store.write(k, content(k))
    old = open(store.path_of(k), "rb").read()

    def full_disk(fd, bufs):
        os.write(fd, bytes(bufs[0])[:100])  # part of it lands, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(local_dir, "_write_all", full_disk)
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.store.local_dir"):
        assert not store.write(k, content(k)[::-1].copy(), overwrite=True)
    assert "No space left on device" in caplog.text
    d = os.path.dirname(store.path_of(k))
    assert not [n for n in os.listdir(d) if n.startswith(".tmp.")]
    assert open(store.path_of(k), "rb").read() == old and store.stats().write_errors == 1
    out = np.zeros(LAYOUT.full_block_nbytes, np.uint8)
    assert store.read(k, out)
    np.testing.assert_array_equal(out, content(k))


@pytest.mark.parametrize("read_method", ["mmap", "preadv"])
def test_a_read_io_error_is_a_counted_miss_and_the_block_stays(tmp_path, monkeypatch, caplog, read_method):
    """An I/O error reading a block (EIO from the disk) is a miss, logged and counted as a read error; the block is
    not removed (it may read fine later), and it does."""
    s = LocalDirStore(tmp_path / "kv", LAYOUT, read_method=read_method, mmap_min_bytes=0, fd_cache=0)
    (k,) = make_keys(1)
    assert s.write(k, content(k))
    real = os.preadv
    failing = [True]

    def preadv(fd, bufs, offset, *flags):
        if failing[0]:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, bufs, offset, *flags)

    def fstat_eio(fd):  # (a mapped read checks the file's size first)
        if failing[0]:
            raise OSError(errno.EIO, "Input/output error")
        return real_fstat(fd)

    real_fstat = os.fstat
    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(os, "fstat", fstat_eio)
    out = np.zeros(LAYOUT.full_block_nbytes, np.uint8)
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.store.local_dir"):
        assert not s.read(k, out)
    assert "I/O error reading block" in caplog.text
    st = s.stats()
    assert st.read_errors == 1 and st.read_corrupt == 0 and os.path.exists(s.path_of(k))
    failing[0] = False
    assert s.read(k, out)
    np.testing.assert_array_equal(out, content(k))
    s.close()


@pytest.mark.parametrize("err", [errno.EACCES, errno.EMFILE])
def test_an_error_opening_a_block_is_a_counted_miss_not_an_exception(store, monkeypatch, caplog, err):
    """An open(2) error other than "absent" (a permission, too many open files, a stale NFS handle) is a read error
    like any other: a logged, counted miss, the block left in place; it escaped read() and read_many() before."""
    keys = make_keys(2)
    for k in keys:
        assert store.write(k, content(k))
    real_open = os.open

    def failing_open(path, flags, *args, **kwargs):
        if str(path).endswith(".kvb"):
            raise OSError(err, os.strerror(err), path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing_open)
    outs = [np.zeros(LAYOUT.full_block_nbytes, np.uint8) for _ in keys]
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.store.local_dir"):
        assert not store.read(keys[0], outs[0])
        assert store.read_many(keys, outs) == [False, False]
    assert "I/O error opening block" in caplog.text
    st = store.stats()
    assert st.read_errors == 3 and st.read_absent == 0 and st.read_corrupt == 0 and not store._pins
    monkeypatch.setattr(os, "open", real_open)
    assert store.lookup(keys) == 2 and store.read_many(keys, outs) == [True, True]
    for k, o in zip(keys, outs, strict=True):
        np.testing.assert_array_equal(o, content(k))


def test_read_many_that_raises_leaves_no_read_filling_a_buffer(tmp_path):
    """A bad buffer (or key) further on raised from read_many while the reads submitted before it still ran: they
    filled the caller's earlier buffers after the exception (a host buffer already handed back or reused)."""
    s = LocalDirStore(tmp_path / "kv", LAYOUT, io_threads=1)
    keys = make_keys(2)
    for k in keys:
        assert s.write(k, content(k))
    go = threading.Event()
    s._pool.submit(go.wait)  # the one I/O thread is busy: the reads read_many submits wait in its queue
    submitted = []
    real_submit = s.submit_read

    def submit_read(*args, **kwargs):
        submitted.append(real_submit(*args, **kwargs))
        return submitted[-1]

    s.submit_read = submit_read
    good = np.zeros(LAYOUT.full_block_nbytes, np.uint8)
    try:
        with pytest.raises(ValueError, match="out holds 3 B"):
            s.read_many(keys, [good, np.zeros(3, np.uint8)])
        assert len(submitted) == 1 and submitted[0].done()
    finally:
        go.set()
        s.close()  # (waits for the I/O thread)
    assert not good.any()


def test_read_many_with_one_layer_index(store):
    keys = make_keys(2)
    for k in keys:
        store.write(k, content(k))
    outs = [np.zeros(LBN, np.uint8) for _ in keys]
    assert store.read_many(keys, outs, layers=3) == [True, True]
    for k, o in zip(keys, outs, strict=True):
        np.testing.assert_array_equal(o, content(k).reshape(4, LBN)[3])


def test_threads_reading_while_others_evict_and_rewrite(tmp_path, rm):
    """Concurrent reads (full and layer, through the open-file cache: with mmap, through mappings of files that
    other threads unlink or replace meanwhile) while blocks are evicted, removed and rewritten: every successful
    read returns the block's bytes, no read raises."""
    fnb = block_file.file_nbytes(LAYOUT)
    s = LocalDirStore(tmp_path / "kv", LAYOUT, capacity_bytes=6 * fnb, fd_cache=3, io_threads=3, **rm)
    keys = make_keys(12)
    stop = threading.Event()
    errors, ok = [], [0]

    def reader(seed):
        rng = np.random.default_rng(seed)
        full = np.zeros(LAYOUT.full_block_nbytes, np.uint8)
        one = np.zeros(LBN, np.uint8)
        try:
            while not stop.is_set():
                k = keys[rng.integers(len(keys))]
                if rng.random() < 0.5:
                    if s.read(k, full):
                        ok[0] += 1
                        if not (full == content(k)).all():
                            errors.append(("full", k))
                else:
                    layer = int(rng.integers(LAYOUT.num_layers))
                    if s.submit_read(k, one, layers=[layer]).result(10):
                        ok[0] += 1
                        if not (one == content(k).reshape(4, LBN)[layer]).all():
                            errors.append(("layer", k))
        except Exception as e:  # noqa: BLE001 - any exception is a failure of this test
            errors.append(repr(e))

    def churn():
        rng = np.random.default_rng(99)
        try:
            for _ in range(300):
                k = keys[rng.integers(len(keys))]
                if rng.random() < 0.8:
                    s.write(k, content(k), overwrite=bool(rng.random() < 0.3))
                else:
                    s.remove(k)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
        finally:
            stop.set()

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(3)] + [threading.Thread(target=churn)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert not errors, errors[:5]
    assert ok[0] > 0 and s.stats().evictions > 0 and s.stats().read_corrupt == 0
    assert len(s._fds) <= 3
    s.close()


def test_corrupt_open_file_replaced_by_a_good_block_is_not_deleted(store, rm):
    (k,) = make_keys(1)
    store.write(k, content(k))
    out = np.zeros(LBN, np.uint8)
    assert store.read(k, out, layers=[0])  # the file is open (cached)
    _corrupt_payload(store, k)  # the open file goes bad...
    other = LocalDirStore(store.root, LAYOUT, **rm)
    assert other.write(k, content(k), overwrite=True)  # ...and another writer replaces it with a good block
    assert not store.read(k, out, layers=[2])  # the bad bytes in the open file are still caught
    assert os.path.exists(store.path_of(k))  # but the new, good file is kept
    assert store.read(k, out, layers=[2])  # and read from now on
    np.testing.assert_array_equal(out, content(k).reshape(4, LBN)[2])
    other.close()


def test_submit_write_in_the_background(store):
    keys = make_keys(4)
    blocks = [content(k) for k in keys]
    futures = [store.submit_write(k, b) for k, b in zip(keys, blocks, strict=True)]
    assert [f.result(10) for f in futures] == [True] * 4
    assert store.lookup(keys) == 4
    outs = [np.zeros(LAYOUT.full_block_nbytes, np.uint8) for _ in keys]
    assert store.read_many(keys, outs) == [True] * 4
    for o, b in zip(outs, blocks, strict=True):
        np.testing.assert_array_equal(o, b)
    with pytest.raises(ValueError, match="full_block holds 3 B"):
        store.submit_write(keys[0], np.zeros(3, np.uint8))
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.submit_write(keys[0], blocks[0])


# ---- read methods: mmap (hash in the page cache, then copy) and preadv ------------------------------------
@pytest.mark.parametrize("size", ["empty", "header only", "mid layer 1", "last byte short", "one byte long"])
def test_file_truncated_in_place_after_reads_is_a_miss_not_sigbus(store, size):
    """A block file truncated (or extended) in place under an open, cached file: no read crashes (touching a
    mapping past the end of its file would kill this process with SIGBUS) or returns wrong KV. Mapped reads check
    the file's size first, so each is a miss; a preadv read misses when it reaches past the new end (or the
    header, read with a Full Block, is gone) and otherwise returns bytes that passed their checksums."""
    keys = make_keys(2)
    for k in keys:
        store.write(k, content(k))
    k = keys[0]
    ref = content(k).reshape(LAYOUT.num_layers, LBN)
    full = np.zeros(LAYOUT.full_block_nbytes, np.uint8)
    one = np.zeros(LBN, np.uint8)
    hdr, fnb = store.header_nbytes, block_file.file_nbytes(LAYOUT)
    new = {"empty": 0, "header only": hdr, "mid layer 1": hdr + LBN + 7, "last byte short": fnb - 1}.get(size)
    misses = 0
    for layers in (None, [3], [0], [0, 1, 2, 3], [1, 0]):
        assert store.write(k, content(k), overwrite=True)  # a new file: open it, then break it
        assert store.read(k, full) and store.read(k, one, layers=[3])  # open (cached), its header checked
        if new is None:
            with open(store.path_of(k), "ab") as f:
                f.write(b"\0")
        else:
            os.truncate(store.path_of(k), new)
        n = LAYOUT.num_layers if layers is None else len(layers)
        out = np.zeros((n, LBN), np.uint8)
        ok = store.read(k, out, layers=layers)
        end = hdr + LBN * (1 + max(layers if layers else [LAYOUT.num_layers - 1]))
        if store.read_method == "mmap" or (new is not None and end > new) or (layers is None and new is not None):
            assert not ok, (size, layers)
            misses += 1
        if ok:
            np.testing.assert_array_equal(out, ref[layers if layers else slice(None)])
    assert store.stats().read_corrupt == misses  # (a preadv store reads a file one byte long right)
    assert store.read(keys[1], full)  # the other block is untouched
    np.testing.assert_array_equal(full, content(keys[1]))


def test_blocks_unlinked_or_replaced_under_an_open_file_read_right(store):
    """A cached open file keeps serving its inode through new mappings after another store object removes or
    replaces the block (eviction elsewhere), and a store without the file open misses or reads the new one."""
    keys = make_keys(2)
    for k in keys:
        store.write(k, content(k))
    full = np.zeros(LAYOUT.full_block_nbytes, np.uint8)
    assert store.read(keys[0], full) and store.read(keys[1], full)
    other = LocalDirStore(store.root, LAYOUT)
    assert other.remove(keys[0]) and not os.path.exists(store.path_of(keys[0]))
    assert other.write(keys[1], content(keys[1]), overwrite=True)  # a new inode under the same name
    for k in keys:
        for layers in (None, [2], [3, 1], [0, 1, 2, 3]):
            n = LAYOUT.num_layers if layers is None else len(layers)
            out = np.zeros((n, LBN), np.uint8)
            assert store.read(k, out, layers=layers), (k, layers)
            np.testing.assert_array_equal(out, content(k).reshape(-1, LBN)[layers if layers else slice(None)])
    assert not other.read(keys[0], full)  # not open there: the block is gone
    other.close()


def test_mmap_reads_only_ever_copy_checked_bytes(tmp_path):
    """A read through the mapping fills `out` chunk by chunk, each chunk only after its check: damage in Layer
    Block 2 leaves Layer Blocks 0-1 copied and 2-3 untouched (never the bad bytes)."""
    s = LocalDirStore(tmp_path / "kv", LAYOUT, read_chunk_bytes=LBN, **MMAP_ALL)
    (k,) = make_keys(1)
    s.write(k, content(k))
    _corrupt_payload(s, k)
    out = np.full((LAYOUT.num_layers, LBN), 7, np.uint8)
    assert not s.read(k, out)
    np.testing.assert_array_equal(out[:2], content(k).reshape(-1, LBN)[:2])
    assert (out[2:] == 7).all()
    s.close()


@pytest.mark.parametrize("native", [True, False])
def test_default_store_maps_big_reads_and_preadvs_small_ones(tmp_path, native):
    """The defaults: read_method="mmap" for verified reads of >= 256 KiB (a 1 MiB Full Block here), preadv for
    Layer Blocks; both round-trip and catch a flipped byte in the first, a middle and the last Layer Block.
    With the compiled loops a big read maps from the first read of an open file on, with the Python ones
    from the second."""
    big = BlockLayout(num_layers=8, block_tokens=64, bytes_per_token_per_layer=2048, fingerprint="test-model/big")
    lbn = big.layer_block_nbytes
    s = LocalDirStore(tmp_path / "kv", big, native_verify=native)
    assert s.read_method == "mmap" and s.mmap_min_bytes == local_dir.MMAP_MIN_BYTES == 256 << 10 > lbn
    first_mapped = native and local_dir.native_verify_available()
    assert s.mmap_after_reads == (0 if first_mapped else 1)
    (k,) = make_keys(1)
    s.write(k, content(k, big))
    full = np.zeros(big.full_block_nbytes, np.uint8)
    one = np.zeros(lbn, np.uint8)
    assert s.read(k, one, layers=[1]) and s.read(k, one, layers=[2]) and _mapped_blocks(s.root) == 0  # small: preadv
    # the first big read of the open file: mapped with the compiled loops, else preadv
    assert s.read(k, full) and _mapped_blocks(s.root) == int(first_mapped)
    assert s.read(k, full) and _mapped_blocks(s.root) == 1  # (mapped by now), and the mapping kept
    np.testing.assert_array_equal(full, content(k, big))
    assert s.read(k, full, layers=range(8)) and _mapped_blocks(s.root) == 1
    np.testing.assert_array_equal(full, content(k, big))
    ref = content(k, big).reshape(big.num_layers, lbn)
    misses = 0
    for layer in (0, 3, 7):
        for pos in (0, lbn // 2, lbn - 1):
            assert s.write(k, content(k, big), overwrite=True)
            assert s.read(k, full) and s.read(k, full) and s.read(k, one, layers=[layer])  # (now mapped)
            np.testing.assert_array_equal(full, ref.reshape(-1))
            np.testing.assert_array_equal(one, ref[layer])
            _flip(s.path_of(k), s.header_nbytes + layer * lbn + pos)
            assert not s.read(k, full)
            assert s.write(k, content(k, big), overwrite=True)
            _flip(s.path_of(k), s.header_nbytes + layer * lbn + pos)
            assert not s.read(k, one, layers=[layer])
            misses += 2
    assert s.stats().read_corrupt == misses
    s.close()


def _smaps_of(fragment: str) -> list[dict[str, str]]:
    """The /proc/self/smaps entries of mappings whose file path contains `fragment`: {field: value} each, with
    "VmFlags" the flags' two-letter names."""
    entries, cur = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            head, _, rest = line.partition(":")
            if " " not in head and rest and cur is not None:  # a "Field: value" line of the current entry
                cur[head] = rest.strip()
            elif "-" in line.split(" ", 1)[0]:  # an entry's first line: range, perms, offset, dev, inode, path
                cur = {} if fragment in line else None
                if cur is not None:
                    entries.append(cur)
    return entries


needs_thp = pytest.mark.skipif(
    getattr(mmap, "MADV_HUGEPAGE", None) is None
    or not os.path.exists("/sys/kernel/mm/transparent_hugepage")
    or not os.path.exists("/proc/self/smaps"),
    reason="no transparent huge pages (MADV_HUGEPAGE) on this platform",
)


@needs_thp
@pytest.mark.parametrize("native", [True, False])
def test_block_mappings_are_advised_huge_pages(tmp_path, native):
    """Every block mapping is advised MADV_HUGEPAGE ("hg" in its VmFlags), the compiled and the Python loops.
    Skips where the kernel does not record the advice on a plain file mapping either."""
    probe = tmp_path / "probe.bin"
    probe.write_bytes(b"\1" * 4096)
    with open(probe, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except OSError as e:
            pytest.skip(f"madvise(MADV_HUGEPAGE) refused here: {e}")
        if "hg" not in _smaps_of(str(probe))[0]["VmFlags"].split():
            pytest.skip("this kernel does not record MADV_HUGEPAGE on file mappings")
    s = LocalDirStore(tmp_path / "kv", LAYOUT, native_verify=native, **MMAP_ALL)
    (k,) = make_keys(1)
    s.write(k, content(k))
    full = np.zeros(LAYOUT.full_block_nbytes, np.uint8)
    assert s.read(k, full)
    np.testing.assert_array_equal(full, content(k))
    (entry,) = _smaps_of(f"{s.root}/blocks/")
    assert "hg" in entry["VmFlags"].split()
    s.close()


def _drop_pages(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _pmd_mapped_kib(fragment: str) -> int:
    return sum(int(e.get("FilePmdMapped", "0 kB").split()[0]) for e in _smaps_of(fragment))


def _skip_without_large_folios(tmp_path) -> None:
    """Skip where the file system or kernel keeps no 2 MiB folios in the page cache (a plain 4 MiB file, dropped
    and read back through a huge-page-advised mapping, is then not PMD-mapped)."""
    probe = tmp_path / "probe.bin"
    with open(probe, "wb") as f:
        f.write(b"\1" * (4 << 20))
    _drop_pages(str(probe))
    with open(probe, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        m.madvise(mmap.MADV_HUGEPAGE)
        assert sum(m[i] for i in range(0, 4 << 20, 4096)) == 1024
        probe_kib = _pmd_mapped_kib(str(probe))
        m.close()
    if probe_kib == 0:
        pytest.skip(f"the file system under {tmp_path} (or this kernel) keeps no 2 MiB folios in the page cache")


BIG = BlockLayout(num_layers=8, block_tokens=64, bytes_per_token_per_layer=8192, fingerprint="test-model/4mib")


@needs_thp
def test_a_cold_mapped_read_brings_the_block_back_in_large_folios(tmp_path):
    """A Full Block read back from the disk through the store's mapping comes into the page cache in 2 MiB folios
    (mapped by PMD), as the advice asks, not in 4 KiB pages that every later fresh mapping would fault in one by
    one (a re-read at ~0.5x of raw preadv, see the README). Skips where the file system or kernel keeps no 2 MiB
    folios in the page cache (checked first on a plain file, read back the same way)."""
    _skip_without_large_folios(tmp_path)
    big = BIG
    writer = LocalDirStore(tmp_path / "kv", big)
    (k,) = make_keys(1)
    assert writer.write(k, content(k, big))
    _drop_pages(writer.path_of(k))
    writer.close()
    s = LocalDirStore(tmp_path / "kv", big, mmap_after_reads=0)  # mapped from the first read (pure Python too)
    full = np.zeros(big.full_block_nbytes, np.uint8)
    assert s.read(k, full)
    np.testing.assert_array_equal(full, content(k, big))
    assert _pmd_mapped_kib(f"{s.root}/blocks/") >= 2048
    s.close()


PREADV_READS = {  # store options and a read, each done by preadv
    "preadv, verified": ({"read_method": "preadv"}, None),
    "preadv, verify=False": ({"read_method": "preadv", "verify": False}, None),
}


@needs_thp
@pytest.mark.parametrize("case", list(PREADV_READS))
def test_a_cold_preadv_read_brings_the_block_back_in_large_folios(tmp_path, case):
    """A Full-Block preadv read of a block that is not in the page cache brings the whole block in through a
    huge-page-advised mapping first (2 MiB folios, so a later mapped read maps it by PMD), where readahead would
    bring 4 KiB pages; the bytes read are the block's. A warm block is read without it, and so is a cold block's
    Layer Block (readahead streams the layers as they are read)."""
    _skip_without_large_folios(tmp_path)
    options, layers = PREADV_READS[case]
    writer = LocalDirStore(tmp_path / "kv", BIG)
    k, warm = make_keys(2)
    assert writer.write(k, content(k, BIG)) and writer.write(warm, content(warm, BIG))
    _drop_pages(writer.path_of(k))
    writer.close()
    s = LocalDirStore(tmp_path / "kv", BIG, **options)
    lbn = BIG.layer_block_nbytes
    want = (
        content(k, BIG)
        if layers is None
        else np.concatenate([content(k, BIG)[i * lbn : (i + 1) * lbn] for i in layers])
    )
    out = np.zeros(want.nbytes, np.uint8)
    assert s.read(k, out, layers=layers)
    np.testing.assert_array_equal(out, want)
    assert s.stats().cold_populated == 1
    assert s.read(warm, np.zeros(BIG.full_block_nbytes, np.uint8))  # in the page cache since its write
    _drop_pages(s.path_of(warm))
    layer = np.zeros(lbn, np.uint8)
    for read_method in ("preadv", "mmap"):  # (mmap: a Layer Block below mmap_min_bytes is a preadv read too)
        r = LocalDirStore(tmp_path / "kv", BIG, read_method=read_method, fd_cache=0)
        assert r.read(warm, layer, layers=[3])
        np.testing.assert_array_equal(layer, content(warm, BIG)[3 * lbn : 4 * lbn])
        assert r.stats().cold_populated == 0
        r.close()
    assert s.stats().cold_populated == 1
    s.close()
    m = LocalDirStore(tmp_path / "kv", BIG, mmap_after_reads=0)  # a mapped read of the block now maps 2 MiB folios
    full = np.zeros(BIG.full_block_nbytes, np.uint8)
    assert m.read(k, full)
    np.testing.assert_array_equal(full, content(k, BIG))
    assert _pmd_mapped_kib(os.path.basename(m.path_of(k))) >= 2048
    m.close()


def test_a_cold_block_truncated_in_place_is_a_miss(tmp_path, caplog):
    """A cold block that was truncated in place: populating it stops at the file's end (an error, not SIGBUS) and
    the read is a truncated miss; the block is removed."""
    writer = LocalDirStore(tmp_path / "kv", BIG)
    (k,) = make_keys(1)
    assert writer.write(k, content(k, BIG))
    path = writer.path_of(k)
    writer.close()
    s = LocalDirStore(tmp_path / "kv", BIG, read_method="preadv")  # (opened first: its scan would catch the size)
    os.truncate(path, writer.header_nbytes + 3 * BIG.layer_block_nbytes + 10)
    _drop_pages(path)
    with caplog.at_level(logging.WARNING):
        assert not s.read(k, np.zeros(BIG.full_block_nbytes, np.uint8))
    assert "truncated" in caplog.text
    assert s.stats().read_corrupt == 1 and s.stats().cold_populated == 1 and not os.path.exists(path)
    s.close()


@pytest.mark.parametrize(
    "missing, patch, log_line",
    [
        ("cachestat", ("_cached_pages", lambda fd: None), "no cachestat here"),
        ("mmap", ("_populate_huge", lambda fd, size: errno.ENODEV), "cannot populate block files"),
        ("MADV_POPULATE_READ", ("_populate_huge", lambda fd, size: errno.EINVAL), "cannot populate block files"),
    ],
)
def test_without_cachestat_or_populate_cold_reads_fall_back_to_readahead(
    tmp_path, monkeypatch, caplog, missing, patch, log_line
):
    """A kernel without cachestat(2) or MADV_POPULATE_READ, a sandbox refusing them, or a file system that cannot
    map block files turns the populating off for the store, once, with a log line; cold reads go on as plain
    preadv reads."""
    writer = LocalDirStore(tmp_path / "kv", BIG)
    keys = make_keys(2)
    for k in keys:
        assert writer.write(k, content(k, BIG))
        _drop_pages(writer.path_of(k))
    writer.close()
    name, fake = patch
    calls = []
    monkeypatch.setattr(local_dir, name, lambda *a: calls.append(a) or fake(*a))
    s = LocalDirStore(tmp_path / "kv", BIG, read_method="preadv")
    with caplog.at_level(logging.INFO, logger="dualpath_jax.store.local_dir"):
        for k in keys:
            out = np.zeros(BIG.full_block_nbytes, np.uint8)
            assert s.read(k, out)
            np.testing.assert_array_equal(out, content(k, BIG))
    assert len(calls) == 1 and s.stats().cold_populated == 0, missing
    assert caplog.text.count(log_line) == 1
    s.close()


def test_populate_cold_false_reads_cold_blocks_without_it(tmp_path):
    writer = LocalDirStore(tmp_path / "kv", BIG)
    (k,) = make_keys(1)
    assert writer.write(k, content(k, BIG))
    _drop_pages(writer.path_of(k))
    writer.close()
    s = LocalDirStore(tmp_path / "kv", BIG, read_method="preadv", populate_cold=False)
    out = np.zeros(BIG.full_block_nbytes, np.uint8)
    assert s.read(k, out)
    np.testing.assert_array_equal(out, content(k, BIG))
    assert s.stats().cold_populated == 0
    s.close()


# ---- the compiled verified-read loops (store/_verify.pyx) against python-xxhash --------------------------
needs_native = pytest.mark.skipif(
    not local_dir.native_verify_available(), reason="dualpath_jax/store/_verify.pyx is not built (no C compiler)"
)


def _layer_blocks(n=8, lbn=4160, seed=0):
    import xxhash

    blocks = np.random.default_rng(seed).integers(0, 256, (n, lbn), dtype=np.uint8)
    sums = np.array([xxhash.xxh3_64_intdigest(b) for b in blocks], np.uint64)
    return blocks.reshape(-1), sums, lbn


@needs_native
def test_native_xxh3_equals_python_xxhash_at_every_size_class():
    import xxhash

    from dualpath_jax.store import _verify

    buf = np.random.default_rng(1).integers(0, 256, 70_000, dtype=np.uint8)
    # XXH3 has separate code for 0, 1-3, 4-8, 9-16, 17-128, 129-240 and longer inputs (stripes, blocks)
    for n in (0, 1, 3, 4, 8, 9, 16, 17, 128, 129, 240, 241, 1024, 1025, 4160, 65_536, 70_000):
        assert _verify.xxh3_64(buf[:n]) == xxhash.xxh3_64_intdigest(buf[:n].tobytes()), n


@needs_native
def test_native_bad_layers_and_copy_verified():
    from dualpath_jax.store import _verify

    flat, sums, lbn = _layer_blocks()
    assert _verify.bad_layers(flat, lbn, sums, 0) == []
    assert _verify.bad_layers(flat[2 * lbn : 5 * lbn], lbn, sums, 2) == []
    assert _verify.bad_layers(flat[2 * lbn : 5 * lbn], lbn, sums, 3) == [3, 4, 5]  # the wrong layers' sums
    bad = flat.copy()
    bad[2 * lbn + 17] ^= 1
    bad[6 * lbn - 1] ^= 0x80
    assert _verify.bad_layers(bad, lbn, sums, 0) == [2, 5]
    for nontemporal in (True, False):  # (non-temporal stores or memcpy)
        dst = np.zeros_like(flat)
        assert _verify.copy_verified(flat, dst, lbn, sums, 0, nontemporal) == []
        np.testing.assert_array_equal(dst, flat)
        dst[:] = 7
        assert _verify.copy_verified(bad, dst, lbn, sums, 0, nontemporal) == [2]  # stops at the first bad one
        np.testing.assert_array_equal(dst[: 2 * lbn], flat[: 2 * lbn])
        assert (dst[2 * lbn :] == 7).all()  # it and the rest never reach dst
        odd = np.zeros(flat.nbytes + 3, np.uint8)[3:]  # an unaligned destination
        assert _verify.copy_verified(flat, odd, lbn, sums, 0, nontemporal) == []
        np.testing.assert_array_equal(odd, flat)
    ro = np.frombuffer(flat.tobytes(), np.uint8)  # a read-only source (a mapping is one)
    assert _verify.copy_verified(ro[lbn : 3 * lbn], dst[lbn : 3 * lbn], lbn, sums, 1) == []
    with pytest.raises(ValueError, match="whole Layer Blocks"):
        _verify.bad_layers(flat[:-1], lbn, sums, 0)
    with pytest.raises(ValueError, match="beyond the 8 checksums"):
        _verify.bad_layers(flat[: 2 * lbn], lbn, sums, 7)
    with pytest.raises(ValueError, match="differ in size"):
        _verify.copy_verified(flat, dst[:lbn], lbn, sums, 0)
    with pytest.raises(ValueError):  # dst must be writable
        _verify.copy_verified(flat, ro, lbn, sums, 0)


@needs_native
@pytest.mark.parametrize("chunk_blocks", [0, 1, 3, 8, 100])
def test_native_pread_verified(tmp_path, chunk_blocks):
    from dualpath_jax.store import _verify

    flat, sums, lbn = _layer_blocks()
    path = tmp_path / "blk"
    path.write_bytes(b"H" * 100 + flat.tobytes())
    chunk = chunk_blocks * lbn
    fd = os.open(path, os.O_RDONLY)
    try:
        dst = np.zeros_like(flat)
        assert _verify.pread_verified(fd, dst, 100, lbn, sums, 0, chunk) == (flat.nbytes, [])
        np.testing.assert_array_equal(dst, flat)
        part = np.zeros(3 * lbn, np.uint8)  # layers 4..6 only
        assert _verify.pread_verified(fd, part, 100 + 4 * lbn, lbn, sums, 4, chunk) == (3 * lbn, [])
        np.testing.assert_array_equal(part, flat[4 * lbn : 7 * lbn])
    finally:
        os.close(fd)
    per = max(1, chunk_blocks)
    # damage in layers 5 and 6: the read stops at the chunk that holds layer 5 and names its bad layers
    bad = flat.copy()
    bad[5 * lbn] ^= 1
    bad[6 * lbn + 3] ^= 1
    path.write_bytes(b"H" * 100 + bad.tobytes())
    fd = os.open(path, os.O_RDONLY)
    try:
        start = (5 // per) * per
        want = [x for x in (5, 6) if x < start + per]
        assert _verify.pread_verified(fd, dst, 100, lbn, sums, 0, chunk) == (start * lbn, want)
    finally:
        os.close(fd)
    # a truncated file: the bytes read before its end, no bad layer
    path.write_bytes(b"H" * 100 + flat.tobytes()[: 4 * lbn + 10])
    fd = os.open(path, os.O_RDONLY)
    try:
        assert _verify.pread_verified(fd, dst, 100, lbn, sums, 0, chunk) == (4 * lbn + 10, [])
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        _verify.pread_verified(fd, dst, 100, lbn, sums, 0, chunk)  # closed fd: EBADF


@needs_native
@pytest.mark.parametrize("chunk_blocks", [0, 1, 3, 8, 100])
def test_native_loops_into_row_strided_destinations(tmp_path, chunk_blocks):
    """`dst_stride`: Layer Block j goes to dst[j * stride:][:lbn]; the gaps between rows are never written."""
    from dualpath_jax.store import _verify

    flat, sums, lbn = _layer_blocks()
    blocks = flat.reshape(8, lbn)
    stride = 3 * lbn + 5
    span = 7 * stride + lbn

    def fresh():
        return np.full(span, 7, np.uint8)

    def rows(dst, k=8):
        return np.stack([dst[j * stride : j * stride + lbn] for j in range(k)])

    gaps = np.ones(span, bool)
    for j in range(8):
        gaps[j * stride : j * stride + lbn] = False
    for nontemporal in (True, False):
        dst = fresh()
        assert _verify.copy_verified(flat, dst, lbn, sums, 0, nontemporal, stride) == []
        np.testing.assert_array_equal(rows(dst), blocks)
        assert (dst[gaps] == 7).all()
        bad = flat.copy()
        bad[3 * lbn + 1] ^= 1
        dst = fresh()
        assert _verify.copy_verified(bad, dst, lbn, sums, 0, nontemporal, stride) == [3]
        np.testing.assert_array_equal(rows(dst, 3), blocks[:3])
        assert (dst[3 * stride :] == 7).all()
    assert _verify.bad_layers(dst[: 2 * stride + lbn], lbn, sums, 0, 3, stride) == []
    dst2 = fresh()
    _verify.copy_verified(flat, dst2, lbn, sums, 0, False, stride)
    dst2[stride + 9] ^= 1
    assert _verify.bad_layers(dst2, lbn, sums, 0, 8, stride) == [1]
    path = tmp_path / "blk"
    path.write_bytes(b"H" * 100 + flat.tobytes())
    chunk = chunk_blocks * lbn
    fd = os.open(path, os.O_RDONLY)
    try:
        dst = fresh()
        assert _verify.pread_verified(fd, dst, 100, lbn, sums, 0, chunk, 8, stride) == (flat.nbytes, [])
        np.testing.assert_array_equal(rows(dst), blocks)
        assert (dst[gaps] == 7).all()
        part = np.full(2 * stride + lbn, 7, np.uint8)  # layers 4..6 into 3 rows
        assert _verify.pread_verified(fd, part, 100 + 4 * lbn, lbn, sums, 4, chunk, 3, stride) == (3 * lbn, [])
        np.testing.assert_array_equal(rows(part, 3), blocks[4:7])
    finally:
        os.close(fd)
    per = max(1, chunk_blocks)
    bad = flat.copy()
    bad[5 * lbn] ^= 1
    path.write_bytes(b"H" * 100 + bad.tobytes())
    fd = os.open(path, os.O_RDONLY)
    try:
        start = (5 // per) * per
        assert _verify.pread_verified(fd, fresh(), 100, lbn, sums, 0, chunk, 8, stride) == (start * lbn, [5])
    finally:
        os.close(fd)
    path.write_bytes(b"H" * 100 + flat.tobytes()[: 4 * lbn + 10])  # truncated inside row 4
    fd = os.open(path, os.O_RDONLY)
    try:
        dst = fresh()
        assert _verify.pread_verified(fd, dst, 100, lbn, sums, 0, chunk, 8, stride) == (4 * lbn + 10, [])
        np.testing.assert_array_equal(dst[4 * stride : 4 * stride + 10], flat[4 * lbn : 4 * lbn + 10])
        assert (dst[gaps] == 7).all()
    finally:
        os.close(fd)
    with pytest.raises(ValueError, match="at least a Layer Block"):
        _verify.copy_verified(flat, fresh(), lbn, sums, 0, True, lbn - 1)
    with pytest.raises(ValueError, match="must span 8 Layer Blocks"):
        _verify.copy_verified(flat, fresh()[:-1], lbn, sums, 0, True, stride)
    with pytest.raises(ValueError, match="needs n_blocks"):
        _verify.pread_verified(0, fresh(), 100, lbn, sums, 0, chunk, -1, stride)
    with pytest.raises(ValueError, match="needs n_blocks"):
        _verify.bad_layers(fresh(), lbn, sums, 0, -1, stride)


@pytest.mark.parametrize("nt_min", [None, 0, 1 << 40])
def test_mapped_reads_with_and_without_nontemporal_copies(tmp_path, nt_min):
    # every mapped read non-temporal (0), none (None, or a bound above every read): the same bytes, the same misses
    s = LocalDirStore(tmp_path / "kv", LAYOUT, nontemporal_min_bytes=nt_min, **MMAP_ALL)
    keys = make_keys(3)
    for k in keys:
        assert s.write(k, content(k))
    full = np.zeros(LAYOUT.full_block_nbytes, np.uint8)
    one = np.zeros(LBN, np.uint8)
    for k in keys:
        assert s.read(k, full) and s.read(k, one, layers=[2])
        np.testing.assert_array_equal(full, content(k))
        np.testing.assert_array_equal(one, content(k).reshape(LAYOUT.num_layers, LBN)[2])
    _flip(s.path_of(keys[1]), s.header_nbytes + 3 * LBN + 5)
    assert not s.read(keys[1], full) and s.stats().read_corrupt == 1
    s.close()


def test_native_verify_option_and_status(tmp_path):
    from dualpath_jax import compiled

    assert compiled.status()["store_verify"] == local_dir.native_verify_available()
    native = LocalDirStore(tmp_path / "a", LAYOUT, read_method="preadv")
    python = LocalDirStore(tmp_path / "b", LAYOUT, read_method="preadv", native_verify=False)
    try:
        assert (native._native is not None) == local_dir.native_verify_available() and python._native is None
        # verified preadv reads pread 256 KiB at a time in C, 1 MiB in Python (whole Layer Blocks)
        want = local_dir.NATIVE_PREAD_CHUNK_BYTES if native._native else local_dir.DEFAULT_READ_CHUNK_BYTES
        assert native.read_chunk_bytes == want and python.read_chunk_bytes == local_dir.DEFAULT_READ_CHUNK_BYTES
    finally:
        native.close()
        python.close()


def test_a_full_disk_is_said_once_per_spell_and_every_failed_write_counted(store, monkeypatch, caplog):
    """Every write that failed for a full disk logged its warning: a 64-turn run on a full tmpfs logged 859 of them.
    Now the first of a spell says it (with the hint), the others are counted (write_errors) at debug level; once a
    write succeeds, a full disk again is said again. Other errors are still logged each time."""
    keys = make_keys(6)
    real = local_dir._write_all
    full = [True]

    def write_all(fd, bufs):
        if full[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, bufs)

    monkeypatch.setattr(local_dir, "_write_all", write_all)
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.store.local_dir"):
        assert not any(store.write(k, content(k)) for k in keys[:3])
        assert caplog.text.count("No space left on device") == 1 and "counted (stats write_errors)" in caplog.text
        full[0] = False
        assert store.write(keys[3], content(keys[3]))
        full[0] = True
        assert not store.write(keys[4], content(keys[4]))
        assert caplog.text.count("No space left on device") == 2
    assert store.stats().write_errors == 4
