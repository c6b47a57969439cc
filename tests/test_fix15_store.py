"""Fix pass 15, "a KV store of one's own": a researcher's store (3FS, Lustre, an object store) plugged into the runtime
as README "A KV store of one's own" promises: a conformance suite run on it, built by `make_store`, selected by
`config.store` for a runtime run, imported by the node processes.

1. `MemStore` ("mem"): a store written here from the `KVStore` contract only (no code of LocalDirStore): blocks in
   this process's memory, shared by the store objects of one root (`crosses_processes = False`), a crc32 per Layer
   Block, LRU eviction under `capacity_bytes` that spares pinned blocks, and no row-strided `out` (the storage NIC
   stages its reads).
2. The conformance suite (DESIGN.md "Contracts: Store", `KVStore`'s docstrings). Every test of section 2 takes the
   store under test from the `opener` fixture, parametrized over "local_dir", "mem" and the stores named as
   `module:name` in DUALPATH_STORE_BACKENDS (comma-separated; the module, importable from the repo root or
   PYTHONPATH, registers the store in `dualpath_jax.store.STORES`):

       DUALPATH_STORE_BACKENDS=my_stores:s3 PYTHONPATH=. pytest -q tests/test_fix15_store.py -k s3

   The suite opens it as the runtime does, `make_store({"name": ..., "root": <a fresh directory>}, layout)` (other
   settings need defaults; `capacity_bytes`, where the class takes it, for the eviction test). A module-level
   `damage_block(store, key)` in the store's module (damage the stored bytes of `key` as a failing disk would) runs
   the damaged-block tests; without it they skip, naming it.
3. `make_store` names the store in a bad config.
4. `config.store` / `config.store_options`: checked before anything starts, opened by `launcher.open_store`, the
   registering module imported by the node processes; a runtime run on MemStore gives the reference tokens (which
   local_dir's runs give), one on a store of one's own with the `local` launcher too.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import logging
import os
import subprocess
import sys
import textwrap
import threading
import types
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from test_kv_store import LAYOUT, LBN, content, make_keys

from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.store import STORES, KVStore, LocalDirStore, StoreStats, make_store, store_options_fit

log = logging.getLogger(__name__)
TESTS = Path(__file__).resolve().parent
FB = LAYOUT.full_block_nbytes
L = LAYOUT.num_layers

# ---- 1. MemStore: a store of one's own, written from the contract ----------------------------------------------------


class _Shelf:
    """The blocks of one root, shared by every MemStore on it (as LocalDirStores share a directory)."""

    def __init__(self, layout: BlockLayout):
        self.layout = layout
        self.blocks: collections.OrderedDict[bytes, tuple[bytes, tuple[int, ...]]] = collections.OrderedDict()  # LRU
        self.pins: collections.Counter[bytes] = collections.Counter()
        self.lock = threading.Lock()


_SHELVES: dict[str, _Shelf] = {}  # root -> its blocks
_SHELVES_LOCK = threading.Lock()
OPENED: list[MemStore] = []  # every MemStore opened (the runtime test checks the run used them)


def _sums(payload: bytes | memoryview, layout: BlockLayout) -> tuple[int, ...]:
    n = layout.layer_block_nbytes
    return tuple(zlib.crc32(payload[i * n : (i + 1) * n]) for i in range(layout.num_layers))


class MemStore(KVStore):
    """Full Blocks in this process's memory under `root` (a name: the objects of one root share its blocks)."""

    strided_out = False  # `out` must be C-contiguous: the storage NIC reads into its staging buffer, then copies
    crosses_processes = False  # (objects of other processes see none of these blocks: launcher 'inprocess' only)

    def __init__(self, root: str, layout: BlockLayout, capacity_bytes: int | None = None, io_threads: int = 2):
        if not isinstance(layout, BlockLayout):
            raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
        if not isinstance(root, str | os.PathLike) or not os.fspath(root):
            raise TypeError(f"mem store root must be a non-empty path or name, got {root!r}")
        if capacity_bytes is not None and (not isinstance(capacity_bytes, int) or capacity_bytes < 0):
            raise ValueError(f"mem store capacity_bytes must be an int >= 0 or None, got {capacity_bytes!r}")
        self.root = os.fspath(root)
        self.layout = layout
        self.capacity_bytes = capacity_bytes
        with _SHELVES_LOCK:
            shelf = _SHELVES.setdefault(self.root, _Shelf(layout))
        if shelf.layout != layout:  # (as a LocalDirStore's STORE.json: a root holds one model's KV layout)
            raise ValueError(f"mem store {self.root!r} holds blocks of {shelf.layout}, not of {layout}")
        self._shelf = shelf
        self._stats = StoreStats()
        self._readers = ThreadPoolExecutor(io_threads, thread_name_prefix="mem-read")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="mem-write")
        OPENED.append(self)

    # ---- helpers ---------------------------------------------------------------------------------------------------
    def _count(self, **deltas: int) -> None:
        with self._shelf.lock:
            for name, d in deltas.items():
                setattr(self._stats, name, getattr(self._stats, name) + d)

    @staticmethod
    def _key(key) -> bytes:
        if not isinstance(key, bytes):
            raise TypeError(f"block key must be bytes, got {type(key).__name__}")
        return key

    def _layers(self, layers) -> list[int]:
        if layers is None:
            return list(range(self.layout.num_layers))
        got = [layers] if isinstance(layers, int | np.integer) else list(layers)
        bad = [x for x in got if not 0 <= x < self.layout.num_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range for {self.layout.num_layers} layers")
        return [int(x) for x in got]

    def _drop_damaged(self, key: bytes) -> None:
        """(shelf lock held) A block whose checksum failed: removed and counted, as LocalDirStore does."""
        self._shelf.blocks.pop(key, None)
        self._stats.corrupt_blocks += 1
        log.warning("mem store %s: block %s is damaged: removed", self.root, key.hex())

    # ---- the contract ----------------------------------------------------------------------------------------------
    def lookup(self, keys) -> int:
        keys = [self._key(k) for k in keys]
        hit = 0
        with self._shelf.lock:
            for k in keys:
                if k not in self._shelf.blocks:
                    break
                self._shelf.blocks.move_to_end(k)
                hit += 1
            self._stats.lookups += 1
            self._stats.lookup_blocks += len(keys)
            self._stats.lookup_hit_blocks += hit
        return hit

    def contains(self, key) -> bool:
        with self._shelf.lock:
            return self._key(key) in self._shelf.blocks

    def read(self, key, out, layers=None) -> bool:
        key = self._key(key)
        which = self._layers(layers)
        try:
            dst = np.frombuffer(memoryview(out).cast("B"), np.uint8)  # (a non-contiguous `out` cannot be cast)
        except TypeError as e:
            raise ValueError(f"mem store: out must be a writable C-contiguous buffer ({e})") from None
        n = self.layout.layer_block_nbytes
        L = self.layout.num_layers
        if (
            layers is not None
            and isinstance(out, np.ndarray)
            and out.shape == self.layout.full_block_shape
            and len(which) == L
            and list(which) != list(range(L))
        ):  # (KVStore.read: every layer out of order into a Full-Block-shaped array is ambiguous)
            raise ValueError(f"mem store: ambiguous read of layers {list(which)} into a Full-Block-shaped out")
        # packed wins where `out` holds exactly len(layers) Layer Blocks (KVStore.read)
        in_place = layers is not None and dst.nbytes == self.layout.full_block_nbytes and len(which) * n != dst.nbytes
        if dst.nbytes != (self.layout.full_block_nbytes if layers is None or in_place else len(which) * n):
            raise ValueError(
                f"mem store: out of {dst.nbytes} B fits neither the Full Block nor {len(which)} Layer Blocks"
            )
        with self._shelf.lock:
            got = self._shelf.blocks.get(key)
            if got is None:
                self._stats.read_absent += 1
                return False
            payload, sums = got
            if any(zlib.crc32(payload[i * n : (i + 1) * n]) != sums[i] for i in which):  # checked before any copy
                self._drop_damaged(key)
                self._stats.read_corrupt += 1
                return False
            self._shelf.blocks.move_to_end(key)
        src = np.frombuffer(payload, np.uint8)
        for j, i in enumerate(which):
            at = i if in_place or layers is None else j
            dst[at * n : (at + 1) * n] = src[i * n : (i + 1) * n]
        self._count(read_hits=1, bytes_read=len(which) * n)
        return True

    def verify(self, key) -> bool:
        key = self._key(key)
        with self._shelf.lock:
            got = self._shelf.blocks.get(key)
            if got is None:
                return False
            if _sums(got[0], self.layout) != got[1]:
                self._drop_damaged(key)
                return False
            self._shelf.blocks.move_to_end(key)
            return True

    def submit_read(self, key, out, layers=None):
        return self._readers.submit(self.read, key, out, layers)

    def write(self, key, full_block, durable=None) -> bool:
        key = self._key(key)
        data = np.ascontiguousarray(full_block, dtype=np.uint8).tobytes()
        if len(data) != self.layout.full_block_nbytes:
            raise ValueError(f"mem store: a Full Block is {self.layout.full_block_nbytes} B, got {len(data)} B")
        sums = _sums(data, self.layout)
        shelf = self._shelf
        with shelf.lock:
            old = shelf.blocks.get(key)
            if old is not None and _sums(old[0], self.layout) == old[1]:
                shelf.blocks.move_to_end(key)
                self._stats.write_dedup += 1
                return True
            shelf.blocks.pop(key, None)  # (a damaged one is replaced)
            cap = self.capacity_bytes
            while cap is not None and (len(shelf.blocks) + 1) * len(data) > cap:
                victim = next((k for k in shelf.blocks if not shelf.pins[k]), None)
                if victim is None:
                    self._stats.write_rejected += 1
                    log.warning("mem store %s: no room for block %s: every block is pinned", self.root, key.hex())
                    return False
                del shelf.blocks[victim]
                self._stats.evictions += 1
                self._stats.bytes_evicted += len(data)
            shelf.blocks[key] = (data, sums)  # (one assignment: a reader sees no block or the whole one)
            self._stats.writes += 1
            self._stats.bytes_written += len(data)
        return True

    def submit_write(self, key, full_block, durable=None):
        return self._writer.submit(self.write, key, full_block, durable)

    def remove(self, key) -> bool:
        with self._shelf.lock:
            return self._shelf.blocks.pop(self._key(key), None) is not None

    def pin(self, keys) -> None:
        if isinstance(keys, bytes):
            raise TypeError("pin takes an iterable of keys, got one key")
        keys = [self._key(k) for k in keys]
        with self._shelf.lock:
            self._shelf.pins.update(keys)

    def unpin(self, keys) -> None:
        keys = [self._key(k) for k in keys]
        with self._shelf.lock:
            need = collections.Counter(keys)
            short = [k for k, c in need.items() if self._shelf.pins[k] < c]
            if short:
                raise ValueError(f"unpin of block {short[0].hex()} that is not pinned")
            self._shelf.pins.subtract(need)

    def stats(self) -> StoreStats:
        with self._shelf.lock:
            return dataclasses.replace(self._stats)

    @property
    def used_bytes(self) -> int:
        with self._shelf.lock:
            return len(self._shelf.blocks) * self.layout.full_block_nbytes

    def close(self) -> None:
        self._readers.shutdown(wait=True)
        self._writer.shutdown(wait=True)


if "mem" not in STORES:  # (imported once per process; the guard is for `python -c` experiments)
    STORES.register("mem")(MemStore)


def damage_block(store: KVStore, key: bytes) -> None:
    """The suite's damage hook for MemStore: one bit of the stored payload's last Layer Block flipped."""
    with store._shelf.lock:
        payload, sums = store._shelf.blocks[key]
        raw = bytearray(payload)
        raw[-3] ^= 0x10
        store._shelf.blocks[key] = (bytes(raw), sums)


def _damage_local_dir(store: LocalDirStore, key: bytes) -> None:
    """One bit of the block file's last Layer Block flipped (a bad disk sector)."""
    with open(store.path_of(key), "r+b") as f:
        f.seek(-3, os.SEEK_END)
        b = f.read(1)[0]
        f.seek(-3, os.SEEK_END)
        f.write(bytes([b ^ 0x10]))


# ---- 2. the conformance suite ----------------------------------------------------------------------------------------

BACKENDS_ENV = "DUALPATH_STORE_BACKENDS"


def named_stores(spec: str) -> dict[str, types.ModuleType]:
    """The stores `spec` names ("module:name,..."), each module imported (it registers its stores): name -> module.
    Errors name the variable and the entry."""
    out = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        module, sep, name = item.partition(":")
        if not sep or not module or not name:
            raise ValueError(f"{BACKENDS_ENV}: {item!r} is not 'module:name' (e.g. my_stores:s3)")
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise ImportError(f"{BACKENDS_ENV}: cannot import module {module!r} (for store {name!r}): {e}") from e
        if name not in STORES:
            raise KeyError(
                f"{BACKENDS_ENV}: module {module!r} registers no store {name!r}; registered: {STORES.names()}"
            )
        out[name] = mod
    return out


OWN = {n: m for n, m in named_stores(os.environ.get(BACKENDS_ENV, "")).items() if n not in ("local_dir", "mem")}
UNDER_TEST = ["local_dir", "mem", *OWN]
DAMAGE = {"local_dir": _damage_local_dir, "mem": damage_block}
DAMAGE.update({n: getattr(m, "damage_block", None) for n, m in OWN.items()})
MODULES = {"local_dir": "dualpath_jax.store.local_dir", "mem": __name__, **{n: m.__name__ for n, m in OWN.items()}}


@pytest.fixture(params=UNDER_TEST)
def opener(request, tmp_path):
    """`open_(root="kv", layout=LAYOUT, **options)`: a store of the name under test on `tmp_path / root`, built as the
    runtime builds it (make_store with root and layout); closed after the test."""
    name = request.param
    opened = []

    def open_(root: str = "kv", layout: BlockLayout = LAYOUT, **options) -> KVStore:
        s = make_store({"name": name, "root": str(tmp_path / root), **options}, layout)
        opened.append(s)
        return s

    open_.name = name
    yield open_
    for s in opened:
        s.close()


@pytest.fixture
def store(opener):
    return opener()


def _damage(opener, store, key) -> None:
    fn = DAMAGE.get(opener.name)
    if fn is None:
        pytest.skip(f"store {opener.name!r}: its module defines no damage_block(store, key) to damage a stored block")
    fn(store, key)


def test_full_blocks_round_trip_and_are_counted(store):
    keys = make_keys(3)
    before = store.stats()
    for k in keys:
        assert store.write(k, content(k)) is True
        assert store.contains(k)
    flat = np.zeros(FB, np.uint8)
    assert store.read(keys[0], flat)
    np.testing.assert_array_equal(flat, content(keys[0]))
    shaped = np.zeros(LAYOUT.full_block_shape, np.uint8)  # a [layers, tokens, bytes] buffer, a bytearray too
    assert store.read(keys[1], shaped)
    np.testing.assert_array_equal(shaped.reshape(-1), content(keys[1]))
    ba = bytearray(FB)
    assert store.read(keys[2], ba)
    assert bytes(ba) == content(keys[2]).tobytes()
    st = store.stats()
    assert (st.writes, st.read_hits, st.bytes_read, st.misses) == (3, 3, 3 * FB, 0)
    assert before.writes == 0 and before.read_hits == 0  # (`stats` is a snapshot)
    assert store.used_bytes >= 3 * FB


def test_a_missing_block_is_a_counted_miss(store):
    (k,) = make_keys(1)
    out = np.zeros(FB, np.uint8)
    assert store.read(k, out) is False
    assert not store.contains(k) and not store.verify(k) and store.remove(k) is False
    st = store.stats()
    assert (st.read_absent, st.misses, st.read_hits, st.bytes_read) == (1, 1, 0, 0)


def test_lookup_gives_the_stored_prefix(store):
    keys = make_keys(6)
    assert store.lookup(keys) == 0
    for k in keys[:4]:
        store.write(k, content(k))
    assert store.lookup(keys) == 4 and store.lookup(keys[:2]) == 2 and store.lookup([]) == 0
    st = store.stats()
    assert (st.lookups, st.lookup_blocks, st.lookup_hit_blocks) == (4, 6 + 6 + 2, 4 + 2)
    assert store.remove(keys[1]) is True
    assert store.lookup(keys) == 1  # the chain is broken at block 1
    assert store.lookup(iter(keys[:1])) == 1  # (any iterable of keys)


def test_reads_of_some_layers(store):
    """test_kv_store's layer-read cases (packed in the order asked, one int, a range, in place in a Full Block)."""
    from test_kv_store import test_layer_block_reads

    test_layer_block_reads(store)


def test_read_many_and_its_misses(store):
    from test_kv_store import test_read_many_and_misses

    test_read_many_and_misses(store)


def test_a_second_write_is_a_no_op(store):
    (k,) = make_keys(1)
    assert store.write(k, content(k), durable=True)
    used = store.used_bytes
    assert store.write(k, content(k)) is True
    st = store.stats()
    assert (st.writes, st.write_dedup) == (1, 1) and store.used_bytes == used


def test_submitted_reads_and_writes(store):
    keys = make_keys(2)
    assert [store.submit_write(k, content(k)).result(10) for k in keys] == [True, True]
    outs = [np.zeros(FB, np.uint8) for _ in keys]
    assert [store.submit_read(k, o).result(10) for k, o in zip(keys, outs, strict=True)] == [True, True]
    for k, o in zip(keys, outs, strict=True):
        np.testing.assert_array_equal(o, content(k))
    one = np.zeros(LBN, np.uint8)
    assert store.submit_read(keys[0], one, layers=[1]).result(10)
    np.testing.assert_array_equal(one, content(keys[0])[LBN : 2 * LBN])


def test_verify_checks_a_block_without_counting_a_read(store, opener):
    keys = make_keys(2)
    for k in keys:
        store.write(k, content(k))
    assert store.verify(keys[0]) is True
    st = store.stats()
    assert (st.read_hits, st.bytes_read, st.misses) == (0, 0, 0)
    _damage(opener, store, keys[1])
    assert store.verify(keys[1]) is False
    out = np.zeros(FB, np.uint8)
    assert store.read(keys[1], out) is False  # (never wrong KV, whether verify removed it or not)
    assert store.read(keys[0], out) and (out == content(keys[0])).all()


@pytest.mark.parametrize("layers", [None, [L - 1]], ids=["full", "last-layer"])
def test_a_damaged_block_is_a_miss_never_wrong_kv(store, opener, layers):
    keys = make_keys(2)
    for k in keys:
        store.write(k, content(k))
    _damage(opener, store, keys[0])
    out = np.zeros(FB if layers is None else LBN, np.uint8)
    assert store.read(keys[0], out, layers=layers) is False
    assert store.read(keys[0], out, layers=layers) is False  # (and stays one)
    st = store.stats()
    assert st.read_hits == 0 and st.misses == 2
    assert store.read(keys[1], out, layers=layers)  # (the other block is untouched)
    assert store.write(keys[0], content(keys[0]))  # written again: a hit again
    full = np.zeros(FB, np.uint8)
    assert store.read(keys[0], full) and (full == content(keys[0])).all()


def test_a_write_over_a_damaged_block_replaces_it(store, opener):
    """`write`: "a second write is a no-op (unless the stored block is damaged: then it is replaced)"."""
    (k,) = make_keys(1)
    store.write(k, content(k))
    _damage(opener, store, k)
    assert store.write(k, content(k))
    out = np.zeros(FB, np.uint8)
    assert store.read(k, out) and (out == content(k)).all()


def test_store_objects_on_one_root_see_each_others_blocks(opener):
    """The runtime's driver looks blocks up in a store object of its own; the nodes read and write back through
    theirs, on the same root."""
    a, b = opener(), opener()
    keys = make_keys(3)
    for k in keys[:2]:
        assert a.write(k, content(k))
    assert b.lookup(keys) == 2
    out = np.zeros(FB, np.uint8)
    assert b.read(keys[1], out) and (out == content(keys[1])).all()
    assert b.write(keys[2], content(keys[2]))
    assert a.lookup(keys) == 3
    assert b.remove(keys[0])
    assert a.read(keys[0], out) is False  # (a lookup may still say 1: "a later read may still miss")


def test_blocks_stay_after_close(opener):
    a = opener()
    keys = make_keys(2)
    for k in keys:
        a.write(k, content(k))
    a.close()
    b = opener()
    out = np.zeros(FB, np.uint8)
    assert b.lookup(keys) == 2 and b.read(keys[1], out) and (out == content(keys[1])).all()


def test_a_root_of_another_layout_is_never_read_as_this_one(opener):
    """A kept store of another model or block size: refused at open (ValueError, as the runtime's driver expects:
    a ConfigError naming config.store_dir), or every block of it a miss."""
    (k,) = make_keys(1)
    opener().write(k, content(k))
    other = BlockLayout(L, LAYOUT.block_tokens, LAYOUT.bytes_per_token_per_layer, "another-model/bf16")
    try:
        s = opener(layout=other)
    except ValueError:
        return
    assert s.lookup([k]) == 0 or s.read(k, np.zeros(FB, np.uint8)) is False


def test_pinned_blocks_are_not_evicted(opener):
    fit = store_options_fit(STORES.get(opener.name), ["root"])
    if fit is not None and "capacity_bytes" not in fit[2]:
        pytest.skip(f"store {opener.name!r} takes no capacity_bytes: nothing to evict")
    probe = opener("probe")
    (k0,) = make_keys(1, seed=9)
    probe.write(k0, content(k0))
    per_block = probe.used_bytes  # (a block's bytes as this store counts them: LocalDirStore's files have a header)
    s = opener(capacity_bytes=2 * per_block)
    a, b, c, d, e = make_keys(5)
    assert s.write(a, content(a)) and s.write(b, content(b))
    with s.pinned([a]):
        assert s.write(c, content(c))  # a is the least recently used but pinned: b goes
        assert s.contains(a) and not s.contains(b)
        with s.pinned([c]):
            assert s.write(d, content(d)) is False  # everything pinned: refused, nothing lost
            assert s.stats().write_rejected == 1 and s.contains(a) and s.contains(c)
    s.pin([c])
    s.pin([c])
    s.unpin([c])  # (counted: still pinned once)
    assert s.write(d, content(d))  # a goes, c stays
    assert s.contains(c) and s.contains(d) and not s.contains(a)
    s.unpin([c])
    assert s.write(e, content(e)) and not s.contains(c)
    with pytest.raises(ValueError, match="not pinned"):
        s.unpin([c])
    assert s.used_bytes <= 2 * per_block and s.stats().evictions == 3


def test_reads_racing_writes_see_no_block_or_the_whole_block(store):
    """Atomic writes: a reader sees a miss or the whole block, never a part of it, while another thread writes,
    removes and writes the blocks again."""
    keys = make_keys(8)
    stop = threading.Event()
    wrong: list[bytes] = []

    def reader():
        out = np.zeros(FB, np.uint8)
        while not stop.is_set():
            for k in keys:
                out[:] = 0
                if store.read(k, out) and not (out == content(k)).all():
                    wrong.append(k)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for _ in range(5):
            for k in keys:
                assert store.write(k, content(k))
            for k in keys[::2]:
                store.remove(k)
    finally:
        stop.set()
        t.join(10)
    assert not wrong


def test_the_storage_nic_fills_a_layer_major_area_from_the_store(store):
    """What the runtime does with a store: the storage NIC reads Full Blocks into a request's layer-major area (in
    place where the store takes a row-strided `out`, else staged) and stops at the first missing block; write-backs
    store blocks once (`contains` + `verify` skip a stored one)."""
    from test_runtime_storage_nic import _run_job

    from dualpath_jax.runtime.storage_nic import StorageNIC, WriteJob

    keys = make_keys(5)
    bs, bpt = LAYOUT.block_tokens, LAYOUT.bytes_per_token_per_layer
    snic = StorageNIC(0, store, bs, pace=lambda n: None)
    try:
        done = threading.Event()
        blocks = [content(k).reshape(LAYOUT.full_block_shape) for k in keys[:4]]
        snic.submit_write(WriteJob(keys[:4], blocks, on_done=lambda n: done.set()))
        assert done.wait(10)
        done.clear()
        snic.submit_write(WriteJob(keys[:1], blocks[:1], on_done=lambda n: done.set()))  # stored already: skipped
        assert done.wait(10)
        assert store.stats().writes == 4 and snic.bytes_written == 4 * FB
        assert (snic._read_staging is None) == bool(store.strided_out)
        area = np.full((L, 7 * bs, bpt), 9, np.uint8)
        got = _run_job(snic, [keys[1], keys[2], keys[4], keys[3]], 2, area)  # keys[4] is not stored: the hit ends
        assert got == {"ok": 2, "nbytes": 2 * FB}
        want = np.concatenate(blocks[1:3], axis=1)
        np.testing.assert_array_equal(area[:, 2 * bs : 4 * bs], want)
        assert (area[:, : 2 * bs] == 9).all() and (area[:, 5 * bs :] == 9).all()
    finally:
        snic.close()


def test_row_strided_reads_fill_only_their_rows(store):
    """`strided_out = True` promises `read` into one block's rows of a layer-major area (`area[:, t0 : t0 + bs]`)."""
    if not store.strided_out:
        pytest.skip(f"{type(store).__name__}.strided_out is False: the storage NIC stages its reads")
    keys = make_keys(2)
    for k in keys:
        store.write(k, content(k))
    bs = LAYOUT.block_tokens
    area = np.full((L, 3 * bs, LAYOUT.bytes_per_token_per_layer), 7, np.uint8)
    assert store.read(keys[0], area[:, bs : 2 * bs])
    np.testing.assert_array_equal(area[:, bs : 2 * bs], content(keys[0]).reshape(LAYOUT.full_block_shape))
    assert (area[:, :bs] == 7).all() and (area[:, 2 * bs :] == 7).all()
    assert store.read(keys[1], area[:, :bs], layers=[2])  # some layers: their rows only
    np.testing.assert_array_equal(area[2, :bs], content(keys[1]).reshape(LAYOUT.full_block_shape)[2])
    assert (area[[0, 1, 3], :bs] == 7).all()


_CHILD = """
import importlib, sys
from test_kv_store import LAYOUT, content, make_keys
from dualpath_jax.store import make_store
importlib.import_module(sys.argv[3])
s = make_store({"name": sys.argv[1], "root": sys.argv[2]}, LAYOUT)
for k in make_keys(2, seed=5):
    assert s.write(k, content(k))
s.close()
"""


def test_store_objects_of_other_processes_see_the_blocks(opener, tmp_path):
    """`crosses_processes = True` (the `local` and `ray` launchers' nodes each open the store in their own process):
    blocks a child process writes are found and read here."""
    if not getattr(STORES.get(opener.name), "crosses_processes", True):
        pytest.skip(f"store {opener.name!r}: crosses_processes=False (launcher 'inprocess' only)")
    s = opener()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]),
    }
    r = subprocess.run(
        [sys.executable, "-c", _CHILD, opener.name, str(tmp_path / "kv"), MODULES[opener.name]],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    keys = make_keys(2, seed=5)
    out = np.zeros(FB, np.uint8)
    assert s.lookup(keys) == 2 and s.read(keys[1], out) and (out == content(keys[1])).all()


def test_a_bad_store_in_the_environment_is_named():
    with pytest.raises(ValueError, match=r"DUALPATH_STORE_BACKENDS: 'mem' is not 'module:name'"):
        named_stores("mem")
    with pytest.raises(ImportError, match=r"DUALPATH_STORE_BACKENDS: cannot import module 'no_such_module_x'"):
        named_stores("no_such_module_x:s3")
    with pytest.raises(KeyError, match=r"DUALPATH_STORE_BACKENDS: module 'test_fix15_store' registers no store 's3'"):
        named_stores("test_fix15_store:s3")
    assert list(named_stores(" test_fix15_store:mem , ")) == ["mem"] and named_stores("") == {}


@pytest.mark.slow  # (~5 s: a pytest child; `named_stores` is tested above, the suite runs on local_dir and mem)
def test_the_suite_runs_on_a_store_named_in_the_environment(tmp_path):
    """`DUALPATH_STORE_BACKENDS=module:name pytest tests/test_fix15_store.py -k name`, as README "A KV store of one's
    own" has a user run it: every test of the suite runs on the named store (its module's `damage_block` runs the
    damaged-block tests, none skips), and passes."""
    (tmp_path / "fix15s_env_stores.py").write_text(textwrap.dedent(MY_STORES.replace("fix15s_mydir", "fix15s_envdir")))
    env = {**os.environ, BACKENDS_ENV: "fix15s_env_stores:fix15s_envdir", "PYTHONPATH": str(tmp_path)}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "tests/test_fix15_store.py"]
        + ["-k", "fix15s_envdir"],
        cwd=TESTS.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ran = [line.split()[0] for line in r.stdout.splitlines() if "::" in line and "fix15s_envdir" in line]
    assert all("PASSED" in line for line in r.stdout.splitlines() if "::" in line and "fix15s_envdir" in line)
    suite = {n for n, fn in globals().items() if n.startswith("test_") and {"opener", "store"} & _params_of(fn)}
    assert {i.split("::")[1].partition("[")[0] for i in ran} == suite, r.stdout[-3000:]


def _params_of(fn) -> set[str]:
    import inspect

    return set(inspect.signature(fn).parameters)


# ---- 3. built by make_store ------------------------------------------------------------------------------------------


class _NoLayout(MemStore):
    def __init__(self, root):
        super().__init__(root, LAYOUT)


def test_make_store_names_the_store_in_a_bad_config(tmp_path, monkeypatch):
    """A typo'd or missing option was the class's own "__init__() got an unexpected keyword argument": it now names the
    store and what it takes."""
    s = make_store({"name": "mem", "root": str(tmp_path), "capacity_bytes": 4 * FB}, LAYOUT)
    assert isinstance(s, MemStore) and s.capacity_bytes == 4 * FB
    s.close()
    takes = r"\(MemStore takes: root, capacity_bytes, io_threads\)"
    with pytest.raises(TypeError, match=rf"store config of 'mem': unexpected option 'capacity' {takes}"):
        make_store({"name": "mem", "root": "x", "capacity": 5}, LAYOUT)
    with pytest.raises(TypeError, match=rf"store config of 'mem': missing option 'root' {takes}"):
        make_store({"name": "mem"}, LAYOUT)
    monkeypatch.setattr(STORES, "_entries", dict(STORES._entries))
    STORES.add("fix15-nolayout", _NoLayout)
    with pytest.raises(TypeError, match=r"'fix15-nolayout': _NoLayout takes no layout= keyword \(from_config passes"):
        make_store({"name": "fix15-nolayout", "root": "x"}, LAYOUT)
    with pytest.raises(ValueError, match=r"unknown local_dir store option\(s\) \['capacity'\]"):  # (its own check)
        make_store({"name": "local_dir", "root": str(tmp_path), "capacity": 5}, LAYOUT)
    assert store_options_fit(LocalDirStore, ["root", "capacity"])[:2] == (["capacity"], [])
    assert store_options_fit(MemStore, ["capacity_bytes"])[:2] == ([], ["root"])


# ---- 4. config.store for a runtime run -------------------------------------------------------------------------------


class _NoRoot(MemStore):
    """A store the launchers cannot open: it takes no root."""

    def __init__(self, layout, bucket="b"):
        super().__init__(bucket, layout)


class _NeedsBucket(MemStore):
    def __init__(self, root, layout, bucket):
        super().__init__(root, layout)


class _Shared(MemStore):
    crosses_processes = True  # (as a store on a shared mount would be; only the config check is exercised)


@pytest.fixture
def own_stores(monkeypatch):
    """Stores registered for one test only."""
    monkeypatch.setattr(STORES, "_entries", dict(STORES._entries))
    return STORES


def test_config_takes_a_registered_store_and_checks_its_options(base, own_stores):
    from dualpath_jax.runtime.config import ConfigError, validate

    validate(base.replace(store="mem", store_options={"capacity_bytes": 1 << 20}))
    validate(base.replace(store_options={"capacity_bytes": 1 << 30, "read_method": "preadv"}))  # (local_dir's)
    with pytest.raises(ConfigError, match=r"config.store 'mme' unknown \(did you mean 'mem'\?\); known: .*local_dir"):
        validate(base.replace(store="mme"))
    with pytest.raises(
        ConfigError,
        match=r"config.store_options: store 'local_dir' \(LocalDirStore\) takes no option\(s\) \['capacity'\] "
        r"\(did you mean 'capacity_bytes' for 'capacity'\?\); its options: capacity_bytes, checksum",
    ):
        validate(base.replace(store_options={"capacity": 5}))
    with pytest.raises(
        ConfigError, match=r"config.store_options \['root'\]: the runtime gives these itself .*store_dir"
    ):
        validate(base.replace(store="mem", store_options={"root": "/tmp/x"}))
    with pytest.raises(ConfigError, match=r"config.store_options must be a mapping, got 'capacity_bytes=5'"):
        validate(base.replace(store_options="capacity_bytes=5"))
    own_stores.add("fix15-noroot", _NoRoot)
    own_stores.add("fix15-bucket", _NeedsBucket)
    own_stores.add("fix15-notastore", dict)
    with pytest.raises(
        ConfigError,
        match=r"config.store 'fix15-noroot': the runtime opens every store with root=config.store_dir and the model's "
        r"layout, and _NoRoot takes no root= keyword \(it takes: bucket\)",
    ):
        validate(base.replace(store="fix15-noroot"))
    with pytest.raises(ConfigError, match=r"store 'fix15-bucket' \(_NeedsBucket\) needs option\(s\) \['bucket'\]"):
        validate(base.replace(store="fix15-bucket"))
    validate(base.replace(store="fix15-bucket", store_options={"bucket": "kv"}))
    with pytest.raises(ConfigError, match=r"'fix15-notastore' is registered as <class 'dict'>, not a dualpath_jax"):
        validate(base.replace(store="fix15-notastore"))


def test_config_refuses_what_the_node_processes_cannot_open(base, own_stores, monkeypatch):
    """An in-memory store (`crosses_processes = False`) with the `local` / `ray` launchers (the driver's lookups and
    each node's reads would never see the blocks of the other processes' objects); a class of a `__main__` the nodes
    cannot import."""
    from dualpath_jax.runtime.config import ConfigError, validate

    for kind in ("local", "ray"):
        with pytest.raises(
            ConfigError, match=r"config.store 'mem' \(MemStore, crosses_processes=False\) needs config.launcher='inpr"
        ):
            validate(base.replace(store="mem", launcher=kind, transport="tcp"))
    main_cls = type("MainStore", (_Shared,), {"__module__": "__main__"})
    own_stores.add("fix15-main", main_cls)
    main = types.ModuleType("__main__")  # an interactive __main__: no file, no spec
    monkeypatch.setitem(sys.modules, "__main__", main)
    validate(base.replace(store="fix15-main"))  # (inprocess: fine)
    with pytest.raises(ConfigError, match=r"'fix15-main' is registered in __main__ .*the 'local' launcher's node pro"):
        validate(base.replace(store="fix15-main", launcher="local", transport="tcp"))
    main.__file__ = "/somewhere/my_experiment.py"  # a script: re-run by the local launcher's spawned nodes
    validate(base.replace(store="fix15-main", launcher="local", transport="tcp"))
    from dualpath_jax.runtime import launcher

    assert launcher.store_modules(base.replace(store="fix15-main")) == ()  # (nothing to import by name)


MY_STORES = """
import os

from dualpath_jax.store import STORES, LocalDirStore


@STORES.register("fix15s_mydir")
class MyDirStore(LocalDirStore):
    '''A store of one's own on a shared mount: here LocalDirStore under a name of its own, which notes the
    process of each object opened (in $FIX15_STORE_LOG, where set).'''

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if os.environ.get("FIX15_STORE_LOG"):
            with open(os.environ["FIX15_STORE_LOG"], "a") as f:
                f.write(f"{os.getpid()}\\n")


def damage_block(store, key):
    '''The conformance suite's damaged-block hook: one bit of the block file's last byte flipped.'''
    with open(store.path_of(key), "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)[0]
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last ^ 1]))
"""


@pytest.fixture
def my_dir_store(tmp_path, monkeypatch, own_stores):
    """A cross-process store of one's own, registered by a module the test writes (the nodes import it by name)."""
    name = "fix15s_my_stores"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(MY_STORES))
    monkeypatch.syspath_prepend(str(tmp_path))  # (spawned nodes get the driver's sys.path)
    monkeypatch.delitem(sys.modules, name, raising=False)
    importlib.import_module(name)
    yield "fix15s_mydir"
    sys.modules.pop(name, None)


def test_a_node_imports_the_module_that_registered_the_store(base, my_dir_store):
    """`node_modules` (what every node process imports before it builds anything) holds the store's module; a node
    that cannot import it, or where it registers no such store, fails naming config.store."""
    from dualpath_jax.runtime import launcher

    cfg = base.replace(store=my_dir_store, launcher="local", transport="tcp")
    assert launcher.store_modules(cfg) == ("fix15s_my_stores",)
    assert launcher.node_modules(cfg) == (
        launcher.batcher_modules(cfg),
        launcher.transport_modules(cfg),
        ("fix15s_my_stores",),
    )
    STORES._entries.pop(my_dir_store)  # as in a fresh node process
    sys.modules.pop("fix15s_my_stores")
    launcher.import_node_modules(cfg, launcher.node_modules(base)[:2] + (("fix15s_my_stores",),))
    assert my_dir_store in STORES
    with pytest.raises(RuntimeError, match=r"config.store 'fix15s_mydir' was registered by module 'no_such_mod_fix15'"):
        launcher.import_store_modules(cfg, ("no_such_mod_fix15",))
    STORES._entries.pop(my_dir_store)
    with pytest.raises(RuntimeError, match=r"config.store 'fix15s_mydir' is not registered in this node process"):
        launcher.import_node_modules(cfg, ((), (), ()))  # (no store module: the store is still checked)


def test_open_store_opens_the_configured_store_on_the_runs_root(base, tmp_path, my_dir_store):
    """`open_store` (the driver's store and every node's) always opened LocalDirStore(config.store_dir) with its
    defaults: config.store and config.store_options were never looked at."""
    from dualpath_jax.runtime.launcher import open_store

    cfg = base.replace(store_dir=str(tmp_path / "run"), store_options={"capacity_bytes": 7 * FB})
    # (fix23: the driver's object keeps a bounded local_dir store's capacity, the nodes' objects have none)
    with open_store(cfg, LAYOUT, keeper=True) as s:
        assert type(s) is LocalDirStore and s.capacity_bytes == 7 * FB and s.root == str(tmp_path / "run")
    with open_store(cfg, LAYOUT) as s:
        assert type(s) is LocalDirStore and s.capacity_bytes is None and s.root == str(tmp_path / "run")
    with open_store(cfg.replace(store=my_dir_store, store_options={}), LAYOUT) as s:
        assert type(s).__name__ == "MyDirStore" and s.capacity_bytes is None
    with open_store(cfg.replace(store="mem", store_options={"io_threads": 1}), LAYOUT) as s:
        assert isinstance(s, MemStore) and s.root == str(tmp_path / "run") and s._readers._max_workers == 1


def test_a_runtime_run_on_a_store_of_ones_own_gives_local_dirs_tokens(base, ops, reference_for):
    """The in-process `:test` config on MemStore (2 agents x 3 turns): every turn once, the tokens of the
    single-process reference (which local_dir's runs give, tests/test_runtime.py), hit KV read from MemStore's blocks
    through the storage NICs' staging buffers (it takes no row-strided `out`)."""
    from test_runtime import assert_matches_reference

    from dualpath_jax.runtime import driver

    cfg = base.replace(**{"store": "mem", "workload.agents": 2})
    trajs = driver.make_trajectories(cfg)
    first = len(OPENED)
    res = driver.run(cfg, trajs, model_ops=ops)
    assert_matches_reference(res, reference_for(cfg, ops, trajs), trajs)
    assert res.summary["pe_read_bytes"] + res.summary["de_read_bytes"] > 0
    ours = OPENED[first:]  # the driver's (the scheduler's lookups) and the in-process nodes', on the run's root
    assert len(ours) >= 2 and len({s.root for s in ours}) == 1
    assert any(s.stats().lookup_hit_blocks > 0 for s in ours)
    assert any(s.stats().read_hits > 0 and s.stats().writes > 0 for s in ours)


@pytest.mark.slow  # (~10 s: 3 node processes import jax and compile; their import of the store's module is covered
# cheaply by test_a_node_imports_the_module_that_registered_the_store, its opening by test_open_store_...)
def test_a_store_of_ones_own_runs_in_the_local_launchers_node_processes(
    base, ops, reference_for, my_dir_store, tmp_path, monkeypatch
):
    """The runtime on `MyDirStore` (registered by the test's module) with the `local` launcher: every node process
    imports that module and opens the store on the run's root; the run gives the single-process reference tokens."""
    from test_runtime import assert_matches_reference

    from dualpath_jax.runtime import driver

    log_path = tmp_path / "opened"
    monkeypatch.setenv("FIX15_STORE_LOG", str(log_path))
    cfg = base.replace(
        **{"store": my_dir_store, "launcher": "local", "transport": "tcp", "workload.agents": 2, "workload.turns": 2}
    )
    small = driver.make_trajectories(cfg)
    res = driver.run(cfg, small)
    assert_matches_reference(res, reference_for(cfg, ops, small), small)
    assert res.summary["pe_read_bytes"] + res.summary["de_read_bytes"] > 0
    pids = set(log_path.read_text().split())
    assert str(os.getpid()) in pids and len(pids) == 1 + cfg.cluster.prefill_nodes + cfg.cluster.decode_nodes


def test_a_local_dir_subclass_takes_options_of_its_own(tmp_path, monkeypatch):
    """`LocalDirStore.from_config` checks options against the class's own `Config` (it checked LocalDirStoreConfig:
    a subclass could add no option without overriding `from_config`)."""

    @dataclasses.dataclass(frozen=True)
    class TaggedConfig(LocalDirStore.Config):
        tag: str = ""

    class Tagged(LocalDirStore):
        Config = TaggedConfig

        def __init__(self, root, layout, capacity_bytes=None, *, tag: str = "", **kw):
            super().__init__(root, layout, capacity_bytes, **kw)
            self.tag = tag

    monkeypatch.setattr(STORES, "_entries", dict(STORES._entries))
    STORES.add("fix15_tagged", Tagged)
    with make_store({"name": "fix15_tagged", "root": str(tmp_path), "tag": "t1"}, LAYOUT) as s:
        assert s.tag == "t1"
    with pytest.raises((TypeError, ValueError), match="tagg"):
        make_store({"name": "fix15_tagged", "root": str(tmp_path), "tagg": "t1"}, LAYOUT)


@pytest.mark.parametrize("store_dir", ["", "given"])
def test_a_bad_store_option_value_is_a_config_error_naming_the_options(base, ops, tmp_path, store_dir):
    """`driver.prepare` opens the store once before anything starts, also when each run gets a fresh directory
    (store_dir ""), and names the store's options for a value the store refuses. Before: a bare ValueError from the
    run's first open (store_dir "") or a ConfigError blaming config.store_dir."""
    from dualpath_jax.runtime import driver
    from dualpath_jax.runtime.config import ConfigError

    cfg = base.replace(store_options={"checksum": "nope"}, store_dir=str(tmp_path / "kv") if store_dir else "")
    with pytest.raises(
        ConfigError, match=r"^config.store 'local_dir' with config.store_options \{'checksum': 'nope'\}"
    ):
        driver.prepare(cfg, model_ops=ops)
