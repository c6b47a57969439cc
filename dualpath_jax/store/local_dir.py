"""LocalDirStore: Full Blocks as files in a directory (a local disk, or a shared mount: 3FS, Lustre, NFS).

Layout of the directory:
    STORE.json                      layout + format of the blocks (one model per directory)
    blocks/ab/<32 hex key>.kvb      one Full Block per file (block_file.py format), fanned out by 1st key byte
    blocks/ab/.tmp.<host>.<pid>.<rand>.<hex key>   a write in progress (never read)

Writes are atomic: the block is written to a temp file in its final directory, fsync'ed if durable, then
os.replace'd onto its name (and the directory fsync'ed if durable), so a reader sees either no block or a
whole one, even if the writer is killed mid-write. Temp files of dead writers are removed at open (same
host: the pid is gone; other hosts: older than `stale_temp_s`).

Freshness across processes sharing the directory: each process keeps an in-memory index (key -> file size,
in LRU order) built by scanning the directory at open. A lookup that reaches a key not in the index stats
its file once; a block written by another process is thus seen by the first lookup that needs it. A block
removed by another process (its eviction, a corrupt block) is noticed when read: the read misses and the
key leaves the index (`stat_on_hit=True` makes lookups stat every hit instead, so their answers are fresh
at the cost of one stat per hit block). Readers that opened a file keep reading it even if another process
unlinks or replaces it (POSIX semantics; NFS does the same with silly-renames), so a block being read is
never torn. A process keeps up to `fd_cache` block files open (layerwise loading reads each block once per
layer): such a file still holds this key's KV even if another process has evicted it since, and it still
goes through every check; its disk space is freed when the entry leaves the cache. Capacity and LRU order
are per process: each process evicts from its own view, which is approximate when several processes write
to one directory (documented limitation).

Reads verify by default: new blocks carry one xxh3 checksum per Layer Block (block_file.py; blocks written
with wsum64 or crc32 still read and verify, the algo is in each header). A verified read is chunked: each
`preadv` fills a chunk of whole Layer Blocks, and each chunk is checked against the header's sums of exactly its
layers. The reader checks a chunk right after copying it (chunks of `read_chunk_bytes`, rounded down to whole
Layer Blocks, so that the check finds the bytes in cache), or, with a helper thread (`verify_threads=1`, verify.py),
a Full Block is read in a few chunks of decreasing size and the helper checks chunk k on another core while the
reader copies chunk k+1 (python-xxhash and preadv both release the GIL); the reader checks the small last chunk
and waits for the helper, so no block is returned before all its bytes are checked. Reads time themselves and
use the helper only while that measures faster (on a machine with no core to spare it does not). A Full-Block
read gets the header with its first chunk; a Layer-Block read checks exactly the layers it read. A mismatch, a
short read or a bad header makes the read a miss: logged, counted (`read_corrupt`) and the block removed, never
wrong KV. `verify=False` (store option or per read) keeps every header check and skips the payload checksums.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.store import block_file
from dualpath_jax.store.api import STORES, KVStore, StoreStats
from dualpath_jax.store.verify import ChunkVerifier, ReadChecks

log = logging.getLogger(__name__)

_SUFFIX = ".kvb"
_TMP_PREFIX = ".tmp."
_META = "STORE.json"
# Verified reads preadv and check this many bytes (rounded down to whole Layer Blocks) at a time; chosen with
# experiments/bench_store.py (see the README's KV store section).
DEFAULT_READ_CHUNK_BYTES = 1 << 20


def _as_u8(buf: Any, name: str, writable: bool) -> np.ndarray:
    """A flat uint8 view of a buffer without copying; a clear error if it cannot be one."""
    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous (got strides {buf.strides} for shape {buf.shape})")
        if writable and not buf.flags.writeable:
            raise ValueError(f"{name} must be writable")
        return buf.reshape(-1).view(np.uint8)
    try:
        mv = memoryview(buf)
    except TypeError:
        raise TypeError(f"{name} must be a numpy array or a buffer, got {type(buf).__name__}") from None
    if not mv.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous buffer")
    if writable and mv.readonly:
        raise ValueError(f"{name} must be writable (got a read-only {type(buf).__name__})")
    return np.frombuffer(mv.cast("B"), dtype=np.uint8) if mv.nbytes else np.zeros((0,), np.uint8)


class _OpenBlock:
    """A block file open for reading: shared by concurrent reads (refs), cached or not, with its checked header."""

    __slots__ = ("cached", "fd", "header", "refs")

    def __init__(self, fd: int):
        self.fd = fd
        self.refs = 1
        self.cached = False
        # (checksum algo, per-layer sums, the header bytes they were parsed from) once a read checked the header
        self.header: tuple[str, list[int], bytes] | None = None


@dataclasses.dataclass(frozen=True)
class LocalDirStoreConfig:
    root: str  # the store directory (created if missing and create=True)
    capacity_bytes: int | None = None  # file bytes kept before LRU eviction; None = unlimited
    checksum: str = "xxh3"  # per-Layer-Block checksum of new blocks: "xxh3" (fastest), "wsum64" or "crc32"
    verify: bool = True  # verify checksums of what is read (header checks always happen)
    read_chunk_bytes: int = DEFAULT_READ_CHUNK_BYTES  # reader's own checks: preadv + check this much at a time
    # (0: read all, then check, no helper either)
    verify_threads: int = 0  # helper threads checking a read's chunk k while it copies chunk k+1 (0: none; see
    # verify.py: measured here, a helper did not pay: no spare core, and hashing bytes another core just wrote
    # runs at ~16 GB/s instead of ~41 GB/s)
    durable: bool = False  # default of write(durable=None): fsync block and directory
    io_threads: int = 4  # threads of submit_read / read_many
    write_threads: int = 1  # threads of submit_write (apart from the readers, so write-back never delays loads)
    stat_on_hit: bool = False  # lookups stat each hit block (fresh answers on a shared mount)
    stale_temp_s: float = 3600.0  # temp files of other hosts older than this are removed at open
    create: bool = True  # create the directory if missing
    fd_cache: int = 64  # block files kept open for repeated (layerwise) reads; 0: open per read


@STORES.register("local_dir")
class LocalDirStore(KVStore):
    """Full Blocks as checksummed files in one directory; see the module docstring."""

    Config = LocalDirStoreConfig

    @classmethod
    def from_config(cls, options: Mapping[str, Any], layout: BlockLayout) -> LocalDirStore:
        fields = {f.name for f in dataclasses.fields(LocalDirStoreConfig)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise ValueError(f"unknown local_dir store option(s) {unknown}; known: {sorted(fields)}")
        if "root" not in options:
            raise ValueError("local_dir store config needs 'root' (the store directory)")
        return cls(layout=layout, **options)

    def __init__(
        self,
        root: str | os.PathLike,
        layout: BlockLayout,
        capacity_bytes: int | None = None,
        *,
        checksum: str = "xxh3",
        verify: bool = True,
        read_chunk_bytes: int = DEFAULT_READ_CHUNK_BYTES,
        verify_threads: int = 0,
        durable: bool = False,
        io_threads: int = 4,
        write_threads: int = 1,
        stat_on_hit: bool = False,
        stale_temp_s: float = 3600.0,
        create: bool = True,
        fd_cache: int = 64,
    ):
        if not isinstance(layout, BlockLayout):
            raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
        if not isinstance(root, (str, os.PathLike)) or not os.fspath(root):
            raise TypeError(f"root must be a directory path, got {root!r}")
        if checksum not in block_file.CHECKSUM_ALGOS:
            raise ValueError(f"checksum must be one of {sorted(block_file.CHECKSUM_ALGOS)}, got {checksum!r}")
        if isinstance(io_threads, bool) or not isinstance(io_threads, int) or io_threads < 1:
            raise ValueError(f"io_threads must be an int >= 1, got {io_threads!r}")
        if isinstance(write_threads, bool) or not isinstance(write_threads, int) or write_threads < 1:
            raise ValueError(f"write_threads must be an int >= 1, got {write_threads!r}")
        self.layout = layout
        self.file_nbytes = block_file.file_nbytes(layout)
        self.header_nbytes = block_file.header_nbytes(layout)
        if capacity_bytes is not None:
            if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, (int, np.integer)):
                raise TypeError(f"capacity_bytes must be an int or None, got {capacity_bytes!r}")
            if capacity_bytes < self.file_nbytes:
                raise ValueError(
                    f"capacity_bytes={capacity_bytes} cannot hold one block ({self.file_nbytes} B with its header "
                    f"for layout {layout})"
                )
        if isinstance(read_chunk_bytes, bool) or not isinstance(read_chunk_bytes, int) or read_chunk_bytes < 0:
            raise ValueError(f"read_chunk_bytes must be an int >= 0 (0: no chunking), got {read_chunk_bytes!r}")
        if isinstance(verify_threads, bool) or not isinstance(verify_threads, int) or verify_threads < 0:
            raise ValueError(
                f"verify_threads must be an int >= 0 (0: the reader checks every chunk), got {verify_threads!r}"
            )
        if isinstance(fd_cache, bool) or not isinstance(fd_cache, int) or fd_cache < 0:
            raise ValueError(f"fd_cache must be an int >= 0, got {fd_cache!r}")
        if stale_temp_s < 0:
            raise ValueError(f"stale_temp_s must be >= 0, got {stale_temp_s}")
        self.root = os.path.abspath(os.fspath(root))
        self.capacity_bytes = None if capacity_bytes is None else int(capacity_bytes)
        self.checksum = checksum
        self.verify = bool(verify)
        self.read_chunk_bytes = read_chunk_bytes
        # Layer Blocks per verified preadv (at least one; 0: the whole read, then the checks).
        self._chunk_layers = max(1, read_chunk_bytes // layout.layer_block_nbytes) if read_chunk_bytes else 0
        # Chunk sizes (bytes) of a Full Block read: unverified (one preadv), checked by the reader, pipelined.
        self._lbn = lbn = layout.layer_block_nbytes  # (BlockLayout computes these on every access)
        self._fb = fb = layout.full_block_nbytes
        self._hdr_used = block_file.header_used_nbytes(layout)  # header bytes that parse_header reads
        self._whole_plan = [fb]
        self._step = step = self._chunk_layers * lbn or fb  # bytes per chunk checked by the reader
        self._fixed_plan = [step] * (fb // step) + ([fb % step] if fb % step else [])
        # (read_chunk_bytes=0: one preadv, then the checks, on the reader: no pipeline either)
        self._offload_plan = [n * lbn for n in _pipeline_plan(layout.num_layers, lbn)] if read_chunk_bytes else [fb]
        self.durable = bool(durable)
        self.stat_on_hit = bool(stat_on_hit)
        self.stale_temp_s = float(stale_temp_s)
        self._fp_digest = block_file.fingerprint_digest(layout.fingerprint)
        self._blocks_dir = os.path.join(self.root, "blocks")

        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise NotADirectoryError(f"store root {self.root} exists and is not a directory")
        if not os.path.isdir(self.root):
            if not create:
                raise FileNotFoundError(f"store root {self.root} does not exist (create=False)")
            os.makedirs(self.root, exist_ok=True)
        os.makedirs(self._blocks_dir, exist_ok=True)
        self._check_or_write_meta()

        self._lock = threading.Lock()
        self._index: collections.OrderedDict[bytes, int] = collections.OrderedDict()  # key -> file bytes, LRU first
        self._pins: collections.Counter[bytes] = collections.Counter()
        self._used = 0  # bytes of indexed blocks
        self._reserved = 0  # bytes of writes in progress
        self._stats = StoreStats()
        self._tls = threading.local()  # per-thread header buffer: no allocation per read
        self._fds: collections.OrderedDict[bytes, _OpenBlock] = collections.OrderedDict()  # LRU of open files
        self._fd_cache = int(fd_cache)
        self._host = _host_id()
        self._scan()
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="kvstore-io")
        self.verifier = ChunkVerifier(verify_threads)  # threads start on the first chunk handed over
        self._pipelines = verify_threads > 0 and len(self._offload_plan) > 1  # a helper may check Full-Block chunks
        self._write_pool = ThreadPoolExecutor(max_workers=write_threads, thread_name_prefix="kvstore-write")
        self._closed = False

    # ---- directory ------------------------------------------------------------------------------------
    def _meta(self) -> dict:
        lay = self.layout
        return {
            "format": "dualpath-jax kv store",
            "block_format_version": block_file.FORMAT_VERSION,
            "layout": {
                "num_layers": lay.num_layers,
                "block_tokens": lay.block_tokens,
                "bytes_per_token_per_layer": lay.bytes_per_token_per_layer,
                "fingerprint": lay.fingerprint,
            },
        }

    def _check_or_write_meta(self) -> None:
        path = os.path.join(self.root, _META)
        want = self._meta()
        try:
            with open(path) as f:
                have = json.load(f)
        except FileNotFoundError:
            tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            with open(tmp, "w") as f:
                json.dump(want, f, indent=1)
            os.replace(tmp, path)  # racing creators write the same content
            return
        except (OSError, ValueError) as e:
            raise ValueError(f"store metadata {path} is unreadable ({e}); is {self.root} a KV store?") from e
        if have.get("layout") != want["layout"] or have.get("block_format_version") != want["block_format_version"]:
            raise ValueError(
                f"store {self.root} holds blocks of {have.get('layout')} (format {have.get('block_format_version')}), "
                f"but was opened for {want['layout']} (format {want['block_format_version']}); use one directory "
                "per model and KV layout"
            )

    def path_of(self, key: bytes) -> str:
        """The file of block `key`."""
        h = key.hex()
        return f"{self._blocks_dir}/{h[:2]}/{h}{_SUFFIX}"

    def _scan(self) -> None:
        """Rebuild the index from the directory (LRU order = file mtime); clean up dead writers' temp files."""
        found = []
        now = time.time()
        for sub in sorted(os.listdir(self._blocks_dir)):
            d = os.path.join(self._blocks_dir, sub)
            if not os.path.isdir(d):
                continue
            for entry in os.scandir(d):
                name = entry.name
                if name.startswith(_TMP_PREFIX):
                    self._maybe_remove_temp(entry, now)
                    continue
                if not name.endswith(_SUFFIX):
                    continue
                try:
                    key = bytes.fromhex(name[: -len(_SUFFIX)])
                    st = entry.stat()
                except (ValueError, FileNotFoundError):
                    continue
                if st.st_size != self.file_nbytes:  # a rename is atomic, so a wrong size is damage, not a write
                    self._remove_corrupt(key, entry.path, f"file size {st.st_size} B, expected {self.file_nbytes}")
                    continue
                found.append((st.st_mtime_ns, key, st.st_size))
        found.sort()
        with self._lock:
            self._index.clear()
            self._used = 0
            for _, key, size in found:
                self._index[key] = size
                self._used += size
            self._evict_to_fit_locked(0)

    def _maybe_remove_temp(self, entry: os.DirEntry, now: float) -> None:
        parts = entry.name.split(".")  # ["", "tmp", host, pid, rand, hexkey]
        stale = False
        if len(parts) == 6 and parts[2] == self._host and parts[3].isdigit():
            pid = int(parts[3])
            if pid != os.getpid():
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    stale = True
                except PermissionError:
                    pass  # alive, someone else's
        else:
            try:
                stale = now - entry.stat().st_mtime > self.stale_temp_s
            except FileNotFoundError:
                return
        if stale:
            try:
                os.unlink(entry.path)
                with self._lock:
                    self._stats.temp_files_removed += 1
                log.info("kv store %s: removed temp file of a dead writer: %s", self.root, entry.path)
            except FileNotFoundError:
                pass

    # ---- index, pins, eviction ------------------------------------------------------------------------
    def _adopt_locked(self, key: bytes, size: int) -> None:
        if key not in self._index:
            self._index[key] = size
            self._used += size
        self._index.move_to_end(key)

    def _drop_locked(self, key: bytes) -> None:
        self._forget_fd_locked(key)
        size = self._index.pop(key, None)
        if size is not None:
            self._used -= size

    def _evict_to_fit_locked(self, incoming: int) -> bool:
        if self.capacity_bytes is None:
            return True
        victims = iter(list(self._index))  # LRU first
        while self._used + self._reserved + incoming > self.capacity_bytes:
            for key in victims:
                if not self._pins[key]:
                    break
            else:
                return False
            size = self._index[key]
            try:
                os.unlink(self.path_of(key))
            except (FileNotFoundError, NotADirectoryError):
                pass  # already gone (another process evicted it)
            except OSError as e:
                log.warning("kv store %s: could not evict block %s: %s", self.root, key.hex(), e)
            self._drop_locked(key)
            self._stats.evictions += 1
            self._stats.bytes_evicted += size
        return True

    def pin(self, keys: Iterable[bytes]) -> None:
        with self._lock:
            for key in keys:
                self._pins[key] += 1

    def unpin(self, keys: Iterable[bytes]) -> None:
        with self._lock:
            for key in keys:
                if self._pins[key] <= 0:
                    raise ValueError(f"unpin of block {key.hex()} that is not pinned")
                self._pins[key] -= 1
                if not self._pins[key]:
                    del self._pins[key]

    # ---- lookup -------------------------------------------------------------------------------------------
    def _stat_size(self, key: bytes) -> int | None:
        try:
            size = os.stat(self.path_of(key)).st_size
        except (FileNotFoundError, NotADirectoryError):
            return None
        return size if size == self.file_nbytes else None

    def lookup(self, keys: Sequence[bytes]) -> int:
        for key in keys:
            _check_key(key)
        hit = 0
        if not self.stat_on_hit:  # the indexed leading keys, under one lock
            with self._lock:
                while hit < len(keys) and keys[hit] in self._index:
                    self._index.move_to_end(keys[hit])
                    hit += 1
        adopted = False
        # Past the index (or for every key with stat_on_hit): ask the file system, until the first absent block.
        while hit < len(keys):
            key = keys[hit]
            present = self._stat_size(key) is not None
            with self._lock:
                if present:
                    adopted |= key not in self._index
                    self._adopt_locked(key, self.file_nbytes)
                else:
                    self._drop_locked(key)  # never there, or removed by another process
            if not present:
                break
            hit += 1
        with self._lock:
            self._stats.lookups += 1
            self._stats.lookup_blocks += len(keys)
            self._stats.lookup_hit_blocks += hit
            if adopted:
                self._evict_to_fit_locked(0)  # blocks adopted from other processes count against capacity
        return hit

    def contains(self, key: bytes) -> bool:
        _check_key(key)
        with self._lock:
            if key in self._index:
                return True
        return self._stat_size(key) is not None

    # ---- read ---------------------------------------------------------------------------------------------
    def _header_buf(self) -> np.ndarray:
        buf = getattr(self._tls, "hdr", None)
        if buf is None:
            buf = self._tls.hdr = np.zeros((self.header_nbytes,), dtype=np.uint8)
        return buf

    def _plan(self, out: Any, layers) -> tuple[np.ndarray, list[int] | None, list[tuple[int, int, int]]]:
        """Validate `out`/`layers`; runs of (file offset, out offset, nbytes) to read, merged when adjacent."""
        lay = self.layout
        lbn, fb = self._lbn, self._fb
        # Fast path of layerwise loading: one layer into a flat uint8 array of one Layer Block.
        if (
            type(out) is np.ndarray
            and out.dtype == np.uint8
            and out.size == lbn
            and out.flags.c_contiguous
            and out.flags.writeable
            and type(layers) in (list, tuple)
            and len(layers) == 1
            and type(layers[0]) is int
            and 0 <= layers[0] < lay.num_layers
        ):
            layer = layers[0]
            return out.reshape(-1), [layer], [(self.header_nbytes + layer * lbn, 0, lbn)]
        dst = _as_u8(out, "out", writable=True)
        if layers is None:
            if dst.nbytes != fb:
                raise ValueError(f"out holds {dst.nbytes} B; a Full Block of {lay} is {fb} B")
            return dst, None, [(self.header_nbytes, 0, fb)]
        layer_list = lay.normalize_layers(layers)
        if dst.nbytes == len(layer_list) * lbn:
            out_offsets = [i * lbn for i in range(len(layer_list))]  # packed in the order given
        elif dst.nbytes == fb:
            out_offsets = [layer * lbn for layer in layer_list]  # in place
        else:
            raise ValueError(
                f"out holds {dst.nbytes} B; reading {len(layer_list)} Layer Blocks needs {len(layer_list) * lbn} B "
                f"(packed) or a Full Block of {fb} B"
            )
        runs: list[list[int]] = []
        for layer, o in zip(layer_list, out_offsets, strict=True):
            f = self.header_nbytes + layer * lbn
            if runs and runs[-1][0] + runs[-1][2] == f and runs[-1][1] + runs[-1][2] == o:
                runs[-1][2] += lbn
            else:
                runs.append([f, o, lbn])
        return dst, layer_list, [tuple(r) for r in runs]

    def read(self, key: bytes, out: Any, layers: Iterable[int] | int | None = None, verify: bool | None = None) -> bool:
        _check_key(key)
        dst, layer_list, runs = self._plan(out, layers)
        return self._read_planned(key, dst, layer_list, runs, self.verify if verify is None else verify)

    def submit_read(
        self, key: bytes, out: Any, layers: Iterable[int] | int | None = None, verify: bool | None = None
    ) -> Future:
        _check_key(key)
        if self._closed:
            raise RuntimeError(f"kv store {self.root} is closed")
        dst, layer_list, runs = self._plan(out, layers)  # bad arguments raise here, in the caller's thread
        return self._pool.submit(
            self._read_planned, key, dst, layer_list, runs, self.verify if verify is None else verify
        )

    # Open block files are cached (`fd_cache` of them, LRU): layerwise loading reads each block L times, and an
    # entry also keeps the block's checked header. Safe by construction: an fd reads the inode it opened, whose
    # bytes are this key's KV or fail the checks (another process replacing or unlinking the path leaves it
    # intact); a cached file deleted elsewhere keeps its disk space until its entry is dropped.
    def _acquire_fd(self, key: bytes, path: str) -> _OpenBlock:
        with self._lock:
            ent = self._fds.get(key)
            if ent is not None:
                ent.refs += 1
                self._fds.move_to_end(key)
                return ent
        fd = os.open(path, os.O_RDONLY)  # FileNotFoundError: absent
        ent = _OpenBlock(fd)
        if not self._fd_cache:
            return ent
        with self._lock:
            other = self._fds.get(key)
            if other is not None:  # another thread opened it meanwhile: use theirs
                other.refs += 1
                self._fds.move_to_end(key)
            else:
                self._fds[key] = ent
                ent.cached = True
                while len(self._fds) > self._fd_cache:
                    _, old = self._fds.popitem(last=False)
                    old.cached = False
                    if not old.refs:
                        os.close(old.fd)
        if other is not None:
            os.close(fd)
            return other
        return ent

    def _release_fd(self, ent: _OpenBlock) -> None:
        with self._lock:
            ent.refs -= 1
            if ent.refs or ent.cached:
                return
        os.close(ent.fd)

    def _forget_fd_locked(self, key: bytes) -> None:
        """Drop a cached fd (its block was removed, evicted or found corrupt); closed once no read uses it."""
        ent = self._fds.pop(key, None)
        if ent is not None:
            ent.cached = False
            if not ent.refs:
                os.close(ent.fd)

    def _read_planned(self, key: bytes, dst: np.ndarray, layer_list, runs, verify: bool) -> bool:
        path = self.path_of(key)
        with self._lock:
            self._pins[key] += 1
        try:
            try:
                ent = self._acquire_fd(key, path)
            except (FileNotFoundError, NotADirectoryError):
                log.debug("kv store %s: block %s absent (a miss)", self.root, key.hex())
                with self._lock:
                    self._drop_locked(key)
                    self._stats.read_absent += 1
                return False
            try:
                # A verified read of several chunks may hand chunks to a helper thread (not one Layer Block).
                if verify and self._pipelines and (layer_list is None or len(runs) > 1 or runs[0][2] > self._step):
                    reason = self._read_fd_pipelined(ent, key, dst, layer_list, runs)
                else:
                    reason = self._read_fd(ent, key, dst, layer_list, runs, verify, None)
                if reason is not None:
                    self._remove_corrupt(key, path, reason, fd=ent.fd)
                    with self._lock:
                        self._stats.read_corrupt += 1
                    return False
            except OSError as e:
                log.warning("kv store %s: I/O error reading block %s: %s (treated as a miss)", self.root, path, e)
                with self._lock:
                    self._forget_fd_locked(key)
                    self._stats.read_errors += 1
                return False
            finally:
                self._release_fd(ent)
            nbytes = sum(r[2] for r in runs)
            with self._lock:
                self._adopt_locked(key, self.file_nbytes)
                self._stats.read_hits += 1
                self._stats.bytes_read += nbytes
            return True
        finally:
            with self._lock:
                self._pins[key] -= 1
                if not self._pins[key]:
                    del self._pins[key]

    def _read_fd_pipelined(self, ent: _OpenBlock, key: bytes, dst, layer_list, runs) -> str | None:
        """_read_fd for a verified read of several chunks: with a helper thread if one is free and handing over
        measures faster here (verify.py); the read is timed for that measure."""
        t0 = time.perf_counter()
        if not self.verifier.begin():
            reason = self._read_fd(ent, key, dst, layer_list, runs, True, None)
            if reason is None:
                self.verifier.record(False, time.perf_counter() - t0, sum(r[2] for r in runs))
            return reason
        checks = self._read_checks()
        try:
            reason = self._read_fd(ent, key, dst, layer_list, runs, True, checks)
        except BaseException:  # an I/O error: no helper may touch `dst` after the read returns, nor leave a result
            self.verifier.wait(checks)
            checks.reset()
            raise
        self.verifier.wait(checks)
        if checks.bad or checks.error is not None:
            bad, error = sorted(checks.bad), checks.error
            checks.reset()
            if error is not None:
                raise RuntimeError(f"checking block {key.hex()} failed on a helper thread") from error
            return f"checksum mismatch in Layer Block(s) {bad}"
        if reason is None:
            self.verifier.record(True, time.perf_counter() - t0, sum(r[2] for r in runs))
        return reason

    def _read_fd(self, ent: _OpenBlock, key: bytes, dst, layer_list, runs, verify: bool, checks) -> str | None:
        """Read and check; None if `dst` now holds the verified bytes, else why the block is corrupt.

        Verified reads are chunked: each `preadv` fills a chunk of whole Layer Blocks and that chunk is checked
        against the header's sums of exactly its layers; the first bad chunk ends the read (a miss). Without a
        helper (`checks` None) the reader checks each chunk (`read_chunk_bytes`, rounded down to Layer Blocks, at
        least one) right after copying it; with one, a Full Block is read in a few chunks of decreasing size
        (`_pipeline_plan`) and every chunk but the last is handed to the helper (recorded in `checks`), which
        checks it while the reader copies the next. A Full-Block read gets the header with its first chunk.
        """
        fd = ent.fd
        lbn = self._lbn
        hdr_n = self.header_nbytes
        step = self._step if verify else self._fb
        plan = None
        if layer_list is None:
            plan = self._fixed_plan if checks is None else self._offload_plan
            if not verify:
                plan = self._whole_plan
            hdr = self._header_buf()
            n0 = plan[0]
            want = hdr_n + n0
            got = os.preadv(fd, [hdr, dst[:n0]], 0)  # header + the first chunk in one syscall
            if got != want:
                if got >= hdr_n:  # name the real problem if the header already tells it
                    try:
                        block_file.parse_header(hdr, self.layout, key, self._fp_digest)
                    except block_file.BlockFormatError as e:
                        return str(e)
                return f"truncated: read {got} of {want} B"
            raw = hdr[: self._hdr_used].tobytes()
            if ent.header is not None and ent.header[2] == raw:  # the bytes an earlier read of this fd checked
                algo, stored, _ = ent.header
            else:
                try:
                    algo, stored = block_file.parse_header(hdr, self.layout, key, self._fp_digest)
                except block_file.BlockFormatError as e:
                    return str(e)
                stored = stored.tolist()
                ent.header = (algo, stored, raw)
            segments = [(hdr_n, 0, dst.nbytes, 0)]  # (file offset, out offset, nbytes, first layer)
        else:
            if ent.header is not None:  # checked when this fd first read the block
                algo, stored, _ = ent.header
            else:
                hdr = self._header_buf()
                got = os.preadv(fd, [hdr], 0)
                if got != hdr_n:
                    return f"truncated: header is {got} of {hdr_n} B"
                try:
                    algo, stored = block_file.parse_header(hdr, self.layout, key, self._fp_digest)
                except block_file.BlockFormatError as e:
                    return str(e)
                size = os.fstat(fd).st_size  # a layer read must not pass on a block truncated elsewhere
                if size != self.file_nbytes:
                    return f"truncated: file is {size} B, expected {self.file_nbytes}"
                stored = stored.tolist()  # ints: `hdr` is this thread's scratch buffer
                ent.header = (algo, stored, hdr[: self._hdr_used].tobytes())
            if len(runs) == 1:
                segments = [(*runs[0], layer_list[0])]
            else:
                segments = []
                i = 0
                for file_off, out_off, n in runs:  # a run is consecutive layers
                    segments.append((file_off, out_off, n, layer_list[i]))
                    i += n // lbn
        last_seg = len(segments) - 1
        for s, (file_off, out_off, n, layer0) in enumerate(segments):
            off = 0
            k = 0
            while off < n:
                if checks is not None and checks.bad:
                    return None  # a helper found a bad chunk: stop reading (the caller reports it)
                m = plan[k] if plan is not None else min(step, n - off)
                piece = dst[out_off + off : out_off + off + m]
                if k or plan is None:  # (a Full Block's first chunk came with the header)
                    got = os.preadv(fd, [piece], file_off + off)
                    if got != m:
                        return f"truncated: read {got} of {m} B at offset {file_off + off}"
                off += m
                k += 1
                if verify:
                    first = layer0 + (off - m) // lbn
                    want_sums = stored[first : first + m // lbn]
                    if checks is not None and (off < n or s < last_seg):  # the reader checks the last chunk
                        self.verifier.submit(checks, piece, lbn, algo, first, want_sums)
                        continue
                    got_sums = block_file.layer_checksum_list(piece, lbn, algo)
                    if got_sums != want_sums:
                        bad = [first + j for j, (a, b) in enumerate(zip(got_sums, want_sums, strict=True)) if a != b]
                        return f"checksum mismatch in Layer Block(s) {bad}"
        return None

    def _read_checks(self) -> ReadChecks:
        checks = getattr(self._tls, "checks", None)
        if checks is None:
            checks = self._tls.checks = ReadChecks()
        return checks

    def _remove_corrupt(self, key: bytes, path: str, reason: str, fd: int | None = None) -> None:
        """Log, count and delete a corrupt block (only if `path` is still the file we judged)."""
        log.warning("kv store %s: corrupt block %s (%s): removed, treated as a miss", self.root, path, reason)
        try:
            if fd is not None:
                st_read, st_now = os.fstat(fd), os.stat(path)
                if (st_read.st_ino, st_read.st_dev) != (st_now.st_ino, st_now.st_dev):
                    with self._lock:  # a writer replaced it meanwhile: keep the new file, drop the old one's fd
                        self._forget_fd_locked(key)
                    return
            os.unlink(path)
        except FileNotFoundError:
            pass
        with self._lock:
            self._drop_locked(key)
            self._stats.corrupt_blocks += 1

    # ---- write --------------------------------------------------------------------------------------------
    def write(self, key: bytes, full_block: Any, durable: bool | None = None, overwrite: bool = False) -> bool:
        _check_key(key)
        src = _as_u8(full_block, "full_block", writable=False)
        lay = self.layout
        if src.nbytes != lay.full_block_nbytes:
            raise ValueError(f"full_block holds {src.nbytes} B; a Full Block of {lay} is {lay.full_block_nbytes} B")
        durable = self.durable if durable is None else bool(durable)
        path = self.path_of(key)
        if not overwrite and self._stat_size(key) is not None:  # the file, not the index: it may be stale
            with self._lock:
                self._adopt_locked(key, self.file_nbytes)
                self._stats.write_dedup += 1
            return True
        with self._lock:
            if not self._evict_to_fit_locked(self.file_nbytes - self._index.get(key, 0)):
                self._stats.write_rejected += 1
                log.warning(
                    "kv store %s: no room for block %s (%d B used of %s, all of it pinned): not stored",
                    self.root, key.hex(), self._used, self.capacity_bytes,
                )  # fmt: skip
                return False
            self._reserved += self.file_nbytes
        try:
            sums = block_file.layer_checksums(src.reshape(lay.num_layers, lay.layer_block_nbytes), self.checksum)
            header = block_file.pack_header(lay, key, sums, self.checksum)
            self._write_file(path, key, header, src, durable)
        except OSError as e:
            # Persisting KV is best effort (the block can be recomputed): a full disk, a vanished directory or a
            # temp file removed by another host's cleanup must not take the engine down. Logged and counted.
            log.warning("kv store %s: writing block %s failed: %s (not stored)", self.root, key.hex(), e)
            with self._lock:
                self._stats.write_errors += 1
            return False
        finally:
            with self._lock:
                self._reserved -= self.file_nbytes
        with self._lock:
            self._forget_fd_locked(key)  # an overwrite replaced the file: read the new one from now on
            self._adopt_locked(key, self.file_nbytes)
            self._stats.writes += 1
            self._stats.bytes_written += self.file_nbytes
        return True

    def submit_write(self, key: bytes, full_block: Any, durable: bool | None = None) -> Future:
        _check_key(key)
        if self._closed:
            raise RuntimeError(f"kv store {self.root} is closed")
        src = _as_u8(full_block, "full_block", writable=False)  # bad arguments raise here, in the caller's thread
        if src.nbytes != self.layout.full_block_nbytes:
            raise ValueError(
                f"full_block holds {src.nbytes} B; a Full Block of {self.layout} is {self.layout.full_block_nbytes} B"
            )
        return self._write_pool.submit(self.write, key, src, durable)

    def _write_file(self, path: str, key: bytes, header: bytearray, src: np.ndarray, durable: bool) -> None:
        """Temp file in the block's directory -> fsync (durable) -> rename -> fsync of the directory (durable)."""
        d = os.path.dirname(path)
        tmp = os.path.join(d, f"{_TMP_PREFIX}{self._host}.{os.getpid()}.{secrets.token_hex(4)}.{key.hex()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileNotFoundError:  # the first block of its fan-out directory (or the directory was removed)
            os.makedirs(d, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                _write_all(fd, [memoryview(header), memoryview(src)])
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        if durable:
            dfd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def remove(self, key: bytes) -> bool:
        _check_key(key)
        try:
            os.unlink(self.path_of(key))
            existed = True
        except (FileNotFoundError, NotADirectoryError):
            existed = False
        with self._lock:
            self._drop_locked(key)
        return existed

    # ---- misc ---------------------------------------------------------------------------------------------
    def keys(self) -> list[bytes]:
        """Keys in this process's index, least recently used first."""
        with self._lock:
            return list(self._index)

    def refresh(self) -> None:
        """Rescan the directory (adopt blocks written by others, forget removed ones); LRU order resets."""
        self._scan()

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used

    def stats(self) -> StoreStats:
        with self._lock:
            return dataclasses.replace(self._stats)

    def close(self) -> None:
        """Stop the I/O threads and close cached files (the store object stays usable for direct calls)."""
        if not self._closed:
            self._closed = True
            self._pool.shutdown(wait=True)
            self._write_pool.shutdown(wait=True)  # pending write-backs finish first
            self.verifier.close()
        with self._lock:
            for key in list(self._fds):
                self._forget_fd_locked(key)

    def __del__(self):
        for ent in getattr(self, "_fds", {}).values():  # a store dropped without close(): free its files
            if not ent.refs:
                try:
                    os.close(ent.fd)
                except OSError:
                    pass
        verifier = getattr(self, "verifier", None)
        if verifier is not None:
            verifier.close(join=False)  # and let its helper threads end

    def __repr__(self) -> str:
        return f"LocalDirStore({self.root!r}, {self.layout}, capacity_bytes={self.capacity_bytes})"


# A pipelined read (a helper checks chunk k while the reader copies chunk k+1) ends with a chunk of about
# PIPELINE_TAIL_BYTES that the reader checks itself (its hash is what the read adds to the copies); going back
# from it, each chunk is up to PIPELINE_GROWTH times the next: a helper hashes ~2-5x faster than the reader copies,
# so it finishes a chunk while the next one is copied, with a margin for its wake-up. Each handover costs a lock
# and a futex wake on both threads (~15 us measured on the loaded 2-core box), hence few, large chunks: a 2.4 MiB
# DeepSeek-V3 block is read in 3 chunks, a 16 MiB Qwen2.5-32B block in 5.
PIPELINE_TAIL_BYTES = 512 << 10
PIPELINE_GROWTH = 2.0


def _pipeline_plan(num_layers: int, layer_block_nbytes: int) -> list[int]:
    """Layer Blocks per chunk of a pipelined Full-Block read, first chunk first (sums to num_layers)."""
    sizes = []  # from the last chunk back
    size = max(1, PIPELINE_TAIL_BYTES // layer_block_nbytes)
    rest = num_layers
    while rest:
        take = min(rest, size)
        sizes.append(take)
        rest -= take
        size = max(size + 1, int(size * PIPELINE_GROWTH))
    if len(sizes) > 2 and sizes[-1] * PIPELINE_GROWTH < sizes[-2]:  # a small first chunk: one syscall less
        first = sizes.pop()
        sizes[-1] += first
    return sizes[::-1]


def _host_id() -> str:
    """Who may judge a temp file's writer dead by its pid: this host *and* pid namespace (containers on one
    host can share a hostname and a mount, but not pids)."""
    host = socket.gethostname().replace(".", "_") or "host"
    try:
        host += f"-{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        pass
    return host


def _check_key(key: Any) -> None:
    if not isinstance(key, bytes) or not 0 < len(key) <= block_file.MAX_KEY_NBYTES:
        raise TypeError(f"block key must be bytes of length 1..{block_file.MAX_KEY_NBYTES}, got {key!r}")


def _write_all(fd: int, bufs: list[memoryview]) -> None:
    """os.writev until every byte is written (writev may write less than asked)."""
    bufs = [b.cast("B") for b in bufs if b.nbytes]
    while bufs:
        n = os.writev(fd, bufs)
        while bufs and n >= bufs[0].nbytes:
            n -= bufs[0].nbytes
            bufs.pop(0)
        if bufs and n:
            bufs[0] = bufs[0][n:]
