"""The KV store interface (DESIGN.md "Contracts: Store"), its stats, registry and config-keyed factory.

A store holds Full Blocks (`BlockLayout`) keyed by prefix-chained block keys (`dualpath_jax.block_keys`): Python
`bytes` of exactly `KEY_NBYTES` (16); LocalDirStore refuses other lengths (ValueError), e.g. a key that lost a
trailing zero byte through a numpy bytes array (dtype S16 strips trailing NULs), rather than miss on it.
`lookup(keys)` gives the hit prefix in blocks; `read(key, out, layers=...)` fills a caller-provided host
buffer (a PE/DE buffer slot) with the whole Full Block or some of its Layer Blocks; `write(key, full_block)`
stores a Full Block atomically. A missing or corrupt block is a miss (read returns False), never wrong KV.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, wait
from typing import Any

from dualpath_jax.checks import keyword_fit
from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.registry import Registry

STORES: Registry[type] = Registry("kv store")


@dataclasses.dataclass
class StoreStats:
    """Counters of one store object (this process's view)."""

    lookups: int = 0  # lookup() calls
    lookup_blocks: int = 0  # keys asked about
    lookup_hit_blocks: int = 0  # keys found (the hit prefixes)
    read_hits: int = 0  # read() calls that filled `out` with verified bytes
    read_absent: int = 0  # read() misses: no such block
    read_corrupt: int = 0  # read() misses: the block was truncated / of another model or layout / bad checksum
    read_errors: int = 0  # read() misses: an I/O error other than "absent" (block left in place)
    read_newer_format: int = 0  # read() misses: a block a newer dualpath-jax wrote (left in place, not corrupt)
    bytes_read: int = 0  # payload bytes returned by successful reads
    writes: int = 0  # blocks written to storage
    write_dedup: int = 0  # write() of a block already stored (nothing written)
    write_rejected: int = 0  # write() refused: no room even after evicting every unpinned block
    write_errors: int = 0  # write() failed with an OS error (logged; nothing stored)
    bytes_written: int = 0  # file bytes written (header + payload)
    evictions: int = 0  # blocks removed by LRU eviction
    bytes_evicted: int = 0
    evict_failures: int = 0  # evictions whose file could not be removed (EACCES, EPERM, EBUSY): the block kept
    corrupt_blocks: int = 0  # corrupt block files found and removed (read, verify, a write over one, open)
    temp_files_removed: int = 0  # leftovers of killed writers removed
    newer_format_blocks: int = 0  # blocks a newer dualpath-jax wrote, met by a read, verify, lookup or open: left
    cold_populated: int = 0  # blocks a Full-Block preadv read found out of the page cache, brought in by a mapping

    @property
    def hits(self) -> int:
        return self.read_hits

    @property
    def misses(self) -> int:
        return self.read_absent + self.read_corrupt + self.read_errors + self.read_newer_format


class KVStore(abc.ABC):
    """A store of Full Blocks keyed by prefix-chained block keys.

    Thread-safe: reads, writes and lookups may come from any thread. Implementations decide whether the
    store is shared by several processes (LocalDirStore on a shared mount is: `crosses_processes`).

    A store of one's own (README "A KV store of one's own"): subclass, register the class in `STORES` under a name
    at the top level of an importable module, and implement the abstract members. `make_store` builds it with
    `from_config(options, layout)`: by default `cls(layout=layout, **options)` (an option the class does not take, or
    a required one missing, is a TypeError naming the store and what it takes), so `__init__` takes `root` and
    `layout` as keywords and its settings with defaults. The runtime opens it as `make_store({"name": config.store,
    "root": config.store_dir, **config.store_options}, layout)` (`launcher.open_store`), several times on one root:
    the driver's object answers the scheduler's lookups, each node's reads and writes back, and each must see the
    blocks the others wrote. `root` names where a run's blocks live (a fresh temporary directory per run when
    config.store_dir is ""; an object store may take it as a key prefix). The storage NIC reads Full Blocks
    (`layers=None`) into a request's layer-major area, in place where `strided_out` is True (see `read`), and writes
    back after `contains` and `verify`. tests/test_fix15_store.py is the conformance suite (a store of one's own:
    DUALPATH_STORE_BACKENDS=module:name).
    """

    layout: BlockLayout
    # Whether `read` also takes a row-strided Full Block as `out` (see `read`); callers fall back to a staging
    # buffer and a copy where it is False.
    strided_out: bool = False
    # Whether store objects in different processes on one root see each other's blocks (False: only the objects of
    # one process do, e.g. an in-memory store; the runtime then needs config.launcher='inprocess').
    crosses_processes: bool = True

    @classmethod
    def from_config(cls, options: Mapping[str, Any], layout: BlockLayout) -> KVStore:
        """The store of a `make_store` config's options (all but `name`): `cls(layout=layout, **options)`, which
        `make_store` checks first (`store_options_fit`). A store whose options are not its constructor's keywords
        overrides this (and may describe them with a `Config` dataclass, as LocalDirStore does)."""
        return cls(layout=layout, **options)

    @abc.abstractmethod
    def lookup(self, keys: Sequence[bytes]) -> int:
        """Number of leading `keys` stored: the hit prefix in blocks (a later read may still miss)."""

    @abc.abstractmethod
    def contains(self, key: bytes) -> bool:
        """Whether `key` is stored (as far as this process can tell without reading it)."""

    @abc.abstractmethod
    def read(self, key: bytes, out: Any, layers: Iterable[int] | int | None = None) -> bool:
        """Fill `out` with the block's bytes, verified; False (and `out` unspecified) on a miss.

        `out` is a writable C-contiguous buffer (numpy array, memoryview): for `layers=None` exactly one
        Full Block; otherwise either `len(layers)` Layer Blocks packed in the order given, or a whole Full
        Block whose slots of the named layers are filled (others untouched). Where `strided_out` is True it
        may also be a row-strided Full Block: a uint8 array of shape `layout.full_block_shape` whose layer
        rows are each contiguous but further apart, inside one array, e.g. `area[:, t0 : t0 + block_size]` of
        a layer-major [L, tokens, bpt] host buffer (read in place, no staging copy).

        The ambiguous case: an `out` of exactly one Full Block's bytes with `layers` naming as many Layer Blocks as
        the layout has layers. Layers 0..L-1 in ascending order are the same bytes either way. Any other such list
        (a permutation, a layer twice) is read **packed in the order given**, except into an array of the Full
        Block's shape `layout.full_block_shape`, where LocalDirStore refuses it (ValueError): that shape says "in
        place" (a row-strided array of it is filled in place), so packing into it permuted the layers silently.
        For packed reads use a flat `out` or one of shape (len(layers), layer_block_nbytes); to fill a Full Block in
        place, pass its layers in ascending order. A store of one's own should do the same.

        Reads in flight at the same time (`read`, `submit_read`, `read_many` calls from several threads) must not
        write to the same bytes: the caller's contract, not checked (`read_many` checks only its own buffers against
        each other; checking across calls would cost every read a shared lookup). Reads of different blocks into
        one buffer race: a read that checks `out` after its copy may then miss and remove a valid block as corrupt,
        or return True while `out` holds the other block's bytes.
        """

    @abc.abstractmethod
    def verify(self, key: bytes) -> bool:
        """Whether `key` is stored and whole: its file checked as a verified Full-Block read checks it (header,
        size, every Layer Block's checksum), into no caller buffer and not counted as a read (hits, misses, bytes
        read). A damaged block is removed and counted (`corrupt_blocks`), as a read would; one a newer dualpath-jax
        wrote is False and left (`newer_format_blocks`); a good one is used, as a read hit is (LRU). E.g. a
        write-back that skips blocks already stored."""

    @abc.abstractmethod
    def submit_read(self, key: bytes, out: Any, layers: Iterable[int] | int | None = None) -> Future:
        """`read` on the store's I/O thread pool; the future's result is read's bool."""

    def read_many(
        self, keys: Sequence[bytes], outs: Sequence[Any], layers: Iterable[int] | int | None = None
    ) -> list[bool]:
        """Parallel `read` of several blocks into their own buffers (buffers must not overlap, apart from one key's
        same bytes read twice to one place; LocalDirStore refuses others); per-key success. Its buffers must not
        overlap those of reads in flight in other calls either (see `read`: the caller's contract, not checked)."""
        if len(keys) != len(outs):
            raise ValueError(f"read_many got {len(keys)} keys but {len(outs)} output buffers")
        # one pass per key; one layer (an int, a numpy int) and a slice are not iterables but taken as read takes them
        layers = list(layers) if isinstance(layers, Iterable) else layers
        futures = []
        try:
            for k, o in zip(keys, outs, strict=True):
                futures.append(self.submit_read(k, o, layers))
        except BaseException:
            # A bad key or buffer further on: no read may still fill the earlier buffers once we raise.
            wait([f for f in futures if not f.cancel()])  # (a cancelled read never runs)
            raise
        wait(futures)  # (all done before any result is raised, for the same reason)
        return [f.result() for f in futures]

    @abc.abstractmethod
    def write(self, key: bytes, full_block: Any, durable: bool | None = None) -> bool:
        """Store a Full Block (`layout.full_block_nbytes` bytes) atomically; a second write is a no-op (unless the
        stored block is damaged: then it is replaced).

        `durable=True` returns only once the block survives a power loss. Returns False (logged, counted) if
        it could not make room (every other block pinned) or the file system refused the write.
        """

    @abc.abstractmethod
    def submit_write(self, key: bytes, full_block: Any, durable: bool | None = None) -> Future:
        """`write` in the background (decode write-back must not stall decode); the future's result is write's
        bool. The caller keeps `full_block` unchanged until the future is done."""

    @abc.abstractmethod
    def remove(self, key: bytes) -> bool:
        """Delete a block; whether it was there."""

    @abc.abstractmethod
    def pin(self, keys: Iterable[bytes]) -> None:
        """Protect blocks from eviction (counted: each pin needs one unpin)."""

    @abc.abstractmethod
    def unpin(self, keys: Iterable[bytes]) -> None:
        """Undo one `pin` of each key (a key given twice: two). An unpin of a key that is not pinned (or more times
        than it is pinned) raises `ValueError` ("... not pinned") and changes nothing: no key of the call is unpinned
        (the conformance suite, tests/test_fix15_store.py, requires the error)."""

    @contextlib.contextmanager
    def pinned(self, keys: Iterable[bytes]) -> Iterator[None]:
        """Pin `keys` for the duration of a `with` block (e.g. between a lookup hit and its reads)."""
        if isinstance(keys, (bytes, bytearray, memoryview)):  # (list() made ints of one key's bytes: a vague error)
            raise TypeError(f"expected an iterable of block keys, got one key {bytes(keys)!r}: pass [key]")
        keys = list(keys)
        self.pin(keys)
        try:
            yield
        finally:
            self.unpin(keys)

    @abc.abstractmethod
    def stats(self) -> StoreStats:
        """A snapshot of the counters."""

    @property
    @abc.abstractmethod
    def used_bytes(self) -> int:
        """Bytes of the blocks this store knows of (file sizes)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop the I/O threads; the stored blocks stay."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def store_options_fit(cls: Any, names: Iterable[str]) -> tuple[list[str], list[str], list[str]] | None:
    """How the options `names` (a store config's keys but `name`; the layout is given apart) fit store class `cls`:
    (those it does not take, its required ones they lack, every option it takes), or None where it cannot tell. The
    options are the fields of its `Config` dataclass where it has one (LocalDirStore's), else, where `from_config` is
    `KVStore`'s, its constructor's keywords but `layout`. `make_store` checks a config with it, the runtime's config
    check what the launchers pass (`root` and config.store_options)."""
    names = [n for n in names if n != "layout"]
    config = getattr(cls, "Config", None)
    if isinstance(config, type) and dataclasses.is_dataclass(config):
        fields = dataclasses.fields(config)
        takes = [f.name for f in fields]
        missing = dataclasses.MISSING
        required = [f.name for f in fields if f.default is missing and f.default_factory is missing]
        return [n for n in names if n not in takes], [n for n in required if n not in names], takes
    if getattr(getattr(cls, "from_config", None), "__func__", None) is not KVStore.from_config.__func__:
        return None  # (a from_config of its own, no Config: it says itself what it refuses)
    # (`from_config` passes layout as a keyword: one the class does not take is refused as an option)
    fit = keyword_fit(cls, [*names, "layout"])
    if fit is None:  # (no signature to tell)
        return None
    unknown, missing, takes = fit
    return unknown, missing, [t for t in takes if t != "layout"]


def make_store(config: Mapping[str, Any] | Any, layout: BlockLayout) -> KVStore:
    """Build a store from a config with a `name` (registered in STORES) and that store's options.

    `config` is a dict, an ml_collections ConfigDict or any object with attributes, e.g.
    `{"name": "local_dir", "root": "/mnt/3fs/kv/qwen2", "capacity_bytes": 2**40}`.
    """
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    elif not isinstance(config, Mapping):
        if not hasattr(config, "__dict__"):
            raise TypeError(f"store config must be a mapping or an object with attributes, got {config!r}")
        config = dict(vars(config))
    options = dict(config)
    if "name" not in options:
        raise ValueError(f"store config needs a 'name' (one of {STORES.names()}), got keys {sorted(options)}")
    name = options.pop("name")
    cls = STORES.get(name)
    if getattr(getattr(cls, "from_config", None), "__func__", None) is KVStore.from_config.__func__:
        fit = store_options_fit(cls, options)  # (was the constructor's own TypeError, naming no store)
        unknown, missing, takes = fit or ([], [], [])
        problems = [f"missing option{'s' * (len(missing) > 1)} {', '.join(map(repr, missing))}"] if missing else []
        if "layout" in unknown:
            unknown.remove("layout")
            problems.append(f"{cls.__name__} takes no layout= keyword (from_config passes one)")
        if unknown:
            problems.insert(0, f"unexpected option{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}")
        if problems:
            raise TypeError(
                f"store config of {name!r}: {'; '.join(problems)} ({cls.__name__} takes: {', '.join(takes)})"
            )
    return cls.from_config(options, layout)
