"""LocalDirStore: Full Blocks as files in a directory (a local disk, or a shared mount: 3FS, Lustre, NFS).

Layout of the directory:
    STORE.json                      layout + format of the blocks (one model per directory)
    blocks/ab/<32 hex key>.kvb      one Full Block per file (block_file.py format), fanned out by 1st key byte
                                    (keys are block_keys' 16 bytes; the format holds 1..32, the API takes 16)
    blocks/ab/.tmp.<host>.<pid>.<rand>.<hex key>   a write in progress (never read)

Writes are atomic: the block is written to a temp file in its final directory, fsync'ed if durable, then os.replace'd
onto its name (and the directory fsync'ed if durable; the first durable block of a fan-out directory in a store
object also fsyncs blocks/, which holds that directory's entry, made by a non-durable write maybe), so a reader sees
either no block or a whole one, even if the writer is killed mid-write. A durable write whose directory fsync fails
removes its block (a failed write stores nothing). A store created with `durable=True` fsyncs STORE.json and the
parents of the directories it made. Temp files of dead writers are removed at open and by `refresh` (never one a
writer holds flock'ed while it writes; else same host: the pid is gone; any: older than `stale_temp_s`, so a pid
reused since its writer was killed does not keep one), and, for
a writer killed while the other processes run on (the runtime never refreshes), by writes: a write sweeps its fan-out
directory of such temp files (this process's own are left: its writes in flight) once every `TEMP_SWEEP_S` (600 s)
per directory and store object, one listing of that directory, on the writer's thread.

Only a block's own path counts (`path_of`: lower-case hex in its fan-out directory). Another `.kvb` file that
names a key (upper-case hex, a wrong fan-out directory) is a stray copy, removed at open and never counted. A
block path that is not a regular file (a FIFO, a directory) is a corrupt miss when read (opened non-blocking,
so a FIFO cannot hang the read), removed (a directory only if empty); a write replaces an empty directory there.

Freshness across processes sharing the directory: each process keeps an in-memory index (its blocks in LRU order)
built by scanning the directory at open. A lookup that reaches a key not in the index stats its file once; a block
written by another process is thus seen by the first lookup that needs it (a file of another size found by a stat is
damage, removed and counted, as at open). A block removed by another process (its eviction, a corrupt block) is
noticed when read: the read misses and the key leaves the index (`stat_on_hit=True` makes lookups stat every hit
instead, so their answers are fresh at the cost of one stat per hit block). A check that finds a block absent (a
lookup's stat, a read's open) runs outside the store's lock, so it drops the key only if nothing indexed the key
since the check began (each indexing stamps the key with a new generation): a miss racing the write-back of the same
block never untracks the new file. A stat that fails otherwise (EACCES, ELOOP, EIO, ESTALE) is logged and is a miss
for lookup and contains (the key stays indexed); write then writes the block (its own errors are logged, counted
failures); an entry that cannot be stat'ed at open is logged and skipped. Readers that opened a file keep reading it
even if another process unlinks or replaces it (POSIX semantics; NFS does the same with silly-renames, but only for
the processes of one client: a file that another *host* unlinks can be gone for this one too, its reads failing with
ESTALE, a miss with preadv, but SIGBUS for a mapped read of a page not in this host's cache: use read_method="preadv"
on NFS shared by several hosts), so a block being read is never torn. A process keeps up to `fd_cache` block files
open (layerwise loading reads each block once per layer; at most a quarter of RLIMIT_NOFILE, since a mapped file
holds 2 fds, and halved when an open or a mapping fails with EMFILE/ENFILE): such a file still holds this key's KV
even if another process has evicted it since, and it still goes through every check; its disk space is freed when the
entry leaves the cache (or `refresh` finds the block gone). A read, lookup, verify or dedup write of a block that a
remove() in another thread unlinks meanwhile does not index it afterwards, and a remove() racing a write of the same
key leaves the key indexed exactly when its file is there (a stat under the lock, in such races only). This process's
own remove, overwrite, eviction or removal of a corrupt block drops the key's cached file, and a file that was being
opened meanwhile is read once by its reader but never cached: once they returned, reads open the new file.

A store whose directory (`blocks/`) was removed, moved away or replaced by one that is not a store of its layout
since it opened writes and removes nothing there: writes fail (logged, `write_errors`), blocks that look damaged
there are misses left in place, `remove` is False and eviction evicts nothing (logged: a file there of this store's
key is another store's block), `refresh` raises; reopen the store.

Capacity and LRU order are per process: each process evicts from its own view, which is approximate when several
processes write to one directory (documented limitation; the runtime gives one process the capacity for a run:
`runtime.scheduler_service.StoreKeeper`). The order at open (and after `refresh`) is the files' mtimes,
so the store keeps recency there: the blocks used (read hits, `verify`, dedup writes) since the last batch get their
files' mtimes set to now, in their order of use (one ns apart; `os.utime`), in batches every `lru_touch_s` (60 s;
on the writer's thread, so reads never wait for it), at `close()` and before a `refresh`'s scan. So after a reopen
the blocks in use (a shared system prompt, written first and read all the time) are the most recently used, not the
first evicted (the order is exact within a batch, and to within `lru_touch_s` across batches and writes). No batch
stamps below the newest stamp a process sharing the directory set (recorded as the mtime of LRU_CLOCK beside
STORE.json): where the wall clock is not past it (stepped back by NTP or `date -s`; this host's clock behind another's)
a batch stamps from just past it, the blocks written since the last batch with the ones used (the kernel stamped
those with its clock), so blocks used after a step back are not the first evicted after a reopen. Costs: on
the read path a set add (and a clock read every 16 hits); at most one `utime` per block used per `lru_touch_s`, and
per batch a stat and a `utime` of LRU_CLOCK (while the clock is behind it, one `utime` per block written too). A
process killed without `close()` loses the uses of its last `lru_touch_s`. Lookup hits reorder this process's view
only (a lookup is followed by the reads that count). `lru_touch_s=None` never touches a file (the order at open is
then write order); a read-only mount turns it off (logged once), and a block file this process may not touch
(another user's: EPERM) keeps its mtime. Eviction costs O(1) while the blocks fit, else one walk
from the LRU end to the last victim; a victim whose file cannot be removed (EACCES, EPERM, EBUSY: logged once) stays
indexed and counted (moved to the MRU end) and the next LRU block goes instead. Blocks being read or written are not
evicted (apart from the callers' pins: `unpin` only undoes a `pin`). A lookup that indexes blocks written by other
processes evicts other blocks to fit them, never its own hits; where its hits alone exceed the capacity, the ones
past it are neither indexed nor reported, and where it can keep none of them (a store already over capacity: pins a
refresh indexed, writes in flight) it evicts nothing. A read hit or a dedup write that indexes such a block evicts
others to fit it the same way (else it is left unindexed). A write checks for room before it writes but evicts only
once its block is stored, so a write that fails (a full disk, EIO) costs no stored block (the disk holds the writes
in flight beyond `capacity_bytes`: leave room for them; a write whose room was pinned away meanwhile removes its new
block: rejected). A write's reserved room ends when its block is renamed into place: from then on its file counts
(once, if a lookup, read or refresh indexes it before the write does).

fork(): the child gets the store's lock, thread pools and in-flight state anew (`_after_fork_in_child`): reads
and writes in flight in the parent's other threads do not exist in the child, so their protection from eviction,
reserved bytes and holds on open files are dropped there (the parent's are unchanged).

Reads verify by default: new blocks carry one xxh3 checksum per Layer Block (block_file.py; blocks written
with wsum64 or crc32 still read and verify, the algo is in each header). A verified read checks whole Layer Blocks
against the header's sums of exactly those layers, and the first bad one ends the read (a miss).
Where the package was built with its C extension (`_verify.pyx`, setup.py; `native_verify=True`, the default),
verified reads of xxh3 blocks run in C with the GIL released and hash each Layer Block while it is in cache:
- `read_method="mmap"` (the default) maps the open block file read-only and, Layer Block by Layer Block, hashes it
  in the page cache through the mapping (the one pass over DRAM), then copies it into the caller's buffer (from
  cache) with non-temporal stores for reads of >= 1 MiB (no read of the destination's lines first; memcpy below
  that), so `out` only receives bytes that were just checked in the page cache (see the residual risk below for
  files changed in place). The mapping lives as long as the open file (the fd cache, LRU of `fd_cache`); files are
  mapped from their first read (`mmap_after_reads=0`). Mappings are advised MADV_HUGEPAGE, so pages a mapped read
  brings back from the disk come in large folios (where the file system has them): a later fresh mapping of a block
  in 4 KiB pages costs more than reading it (see `_MADV_HUGEPAGE`). The store's own Full-Block preadv reads (below)
  of a block not in the page cache bring it in the same way first (`populate_cold`, see `_MADV_POPULATE_READ`).
  Pages that another reader brought in with `read`/`preadv` stay in 4 KiB folios; for a store whose blocks are
  mostly read that way first, `read_method="preadv"` is faster.
- `read_method="preadv"` (for file systems where mmap is unsuitable) `pread`s 256 KiB chunks of whole Layer
  Blocks into `out` and hashes each right after its copy (in the reader's L2).
Without the extension (or `native_verify=False`) the same checks run in Python over python-xxhash, in chunks of
whole Layer Blocks (`read_chunk_bytes`, rounded down; default 4 MiB with mmap, hashed in the page cache, then
copied; 1 MiB with preadv), and a file is mapped from its second read (`mmap_after_reads=1`: there a fresh
mapping's page faults cost about what hashing in the page cache saves). Reads of less than `mmap_min_bytes`
(default 256 KiB: small Layer Blocks of layerwise loading) and unverified reads use `preadv` under both methods
(measured: HISTORY.md, 'KV store "Benchmark": the Python loops'). A Full-Block read gets the header with the
payload; a Layer-Block read checks exactly the layers it read. A mismatch, a short read, a file of another size
(short, or with bytes appended) or a bad header makes the read a miss: logged, counted (`read_corrupt`) and the
block removed, never wrong KV (`out` may then hold part of the block: the read returned False). `verify=False`
(store option or per read) keeps every header check and skips the payload checksums.

A block a newer dualpath-jax wrote (a newer per-block format version, or a checksum algo id this code does not
know: block_file.BlockOfNewerFormat; a file of another size whose header names a newer format version) is not damage:
a read or verify of it is a miss that leaves the file (counted: `newer_format_blocks`, and `read_newer_format` for
reads; the first one logged, the rest at debug level), the open and lookups leave such a file of another size on disk
unindexed, and a write of its key replaces it (old and new writers then converge on bytes both read). Removing it
as "corrupt", as before, made an older host on a shared mount delete a newer host's cache block by block.

STORE.json records the block format, the layout and the code that made the store (`written_by`: the package version
and the git commit where it runs from a checkout; a STORE.json without it still opens). A store of another layout or
format is refused at open, naming what differs (a fingerprint's `n<KV_NUMERICS>` part: KV another dualpath-jax
version computed) and, where the writer differs from this code, both; a newer block format or a layout field this
code does not know is named as written by a newer dualpath-jax.

mmap and its residual risk: before every mapped read, the open file must be exactly `file_nbytes` (`fstat`),
else the read is a "truncated" miss, because touching a mapping past the end of its file kills the process with
SIGBUS. The store never truncates a block in place (blocks are written to temp files and renamed, eviction
unlinks), and a mapping of an unlinked or replaced file keeps reading the inode it mapped. What remains: a file
truncated in place by something other than the store *during* a read, or a disk I/O error on a page that was not
cached, is SIGBUS with mmap where `preadv` would return a short read or EIO (a miss). And a file modified in place
(not replaced) by something other than the store *during* a read can put unchecked bytes into `out` with mmap: a
Layer Block is hashed in the page cache and then copied from it, so a change between the two reaches `out` and
the read returns True (seen under a writer toggling a byte in a loop: 1-2% of mapped reads). `preadv` hashes the
bytes in `out` after their copy and never does this (hashing the copy instead would read a non-temporal copy
back from DRAM: the second pass over DRAM that mapped reads avoid). Where either can happen (a shared mount with
foreign in-place writers, flaky disks), use `read_method="preadv"`.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import errno
import functools
import json
import logging
import mmap
import os
import platform
import secrets
import socket
import stat
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import numpy as np

from dualpath_jax import checks, compiled, flocks
from dualpath_jax.block_keys import KEY_NBYTES
from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.store import block_file
from dualpath_jax.store.api import STORES, KVStore, StoreStats

log = logging.getLogger(__name__)

_SUFFIX = ".kvb"
_TMP_PREFIX = ".tmp."
# A write-failure warning's tail: the spell's next failures of the same cause are only counted.
_COUNTED_FROM_HERE = "; the next writes that fail so are counted (stats write_errors), not logged, until one is stored"
_META = "STORE.json"
# Its mtime: the newest LRU stamp a process sharing the store set on a block file (`_touch_files`), so that no process
# stamps below another's after the wall clock stepped back or on a host whose clock is behind.
_LRU_CLOCK = "LRU_CLOCK"
META_RETRY_S = 1.0  # a store opened on a full disk tries to make itself again at most this often (`_meta_ready`)
_PENDING_SAID: set[str] = set()  # the store roots this process said it opened with their metadata pending
# The Python loops' chunks (rounded down to whole Layer Blocks; the compiled loops: NATIVE_PREAD_CHUNK_BYTES below,
# mapped reads Layer Block by Layer Block); chosen with experiments/bench_store.py (HISTORY.md, 'KV store "Benchmark":
# the Python loops').
DEFAULT_READ_CHUNK_BYTES = 1 << 20  # read_method="preadv": the chunk is hashed in the reader's L2 after its copy
# read_method="mmap": the chunk is hashed from the page cache, then copied (from L3). Measured (bench_store.py,
# streaming, kept mappings): DeepSeek-V3 0.79-0.82x of raw preadv with 4 MiB chunks (its whole 2.4 MiB block) vs
# 0.69-0.71x with 1 MiB; Qwen2.5-32B 0.95-0.99x with 1 or 4 MiB, 0.82-0.86x with its whole 16 MiB block.
MMAP_READ_CHUNK_BYTES = 4 << 20
READ_METHODS = ("mmap", "preadv")
# Verified reads of at least this many bytes go through the mapping with read_method="mmap"; smaller ones preadv.
# Measured (experiments/bench_store.py, Layer-Block reads of open, mapped files): 256 KiB Layer Blocks (Qwen2.5-32B)
# +15-30% mapped, 41 KiB ones (DeepSeek-V3) equal within noise, and a mapping's pages must be faulted in once.
MMAP_MIN_BYTES = 256 << 10
# A write sweeps its fan-out directory of dead writers' temp files at most this often (per directory and store object;
# the open sweeps them all): a writer killed while the others run on left its temp files until the next open.
TEMP_SWEEP_S = 600.0


# Verified reads of xxh3 blocks in C (_verify.pyx, built by setup.py): each Layer Block hashed while it is in
# cache, with the GIL released; the Python loops below are the fallback (no build, DUALPATH_PURE_PYTHON=1, or
# native_verify=False). With them a verified preadv read preads this many bytes (whole Layer Blocks) at a time,
# so the hash reads the chunk from the reader's L2 right after the copy (measured: HISTORY.md, 'KV store "Benchmark":
# the Python loops').
_VERIFY_C = None
if compiled.use("dualpath_jax.store._verify"):
    from dualpath_jax.store import _verify as _VERIFY_C
NATIVE_PREAD_CHUNK_BYTES = 256 << 10
# Mapped reads of at least this many bytes copy with non-temporal stores (no read-for-ownership of the destination,
# which is left out of the cache); smaller ones memcpy: their destination may be reused while in cache (Layer-Block
# reads into one buffer: 256 KiB reads ran at 0.75x of raw preadv with non-temporal stores, measured). Right for a
# buffer that a device or NIC transfer reads next (the runtime's storage NIC, which reads Full Blocks in place into
# the rows of a layer-major area, keeps this default); a caller that copies the buffer on with the CPU at once sets
# `nontemporal_min_bytes=None`.
NONTEMPORAL_MIN_BYTES = 1 << 20
# Block mappings are advised MADV_HUGEPAGE before their first touch. Where the file system keeps large folios in
# the page cache (ext4 from Linux 6.16, XFS), the pages a mapped read brings back from the disk then come in 2 MiB
# folios, as a block written in one writev already is, and a later fresh mapping of the block maps them with a
# few PMD/PTE runs. Without it the faults read in 4 KiB pages, and every later fresh mapping of that block faults
# hundreds of pages (experiments/bench_store.py, "re-read after a cold read", vs raw preadv of the same pages:
# DeepSeek-V3 0.41-0.49x -> 0.65-0.67x, Qwen2.5-32B 0.48x -> 0.82-0.86x; the cold reads themselves 1.6x faster).
# None where the platform has no such advice (the mapping then works as before).
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)
# A preadv read brings pages back from the disk in 4 KiB folios (readahead allocates small ones), and every later
# read of them pays for it: a fresh mapping faults them one by one (0.46-0.49x of raw preadv) and even a raw preadv
# of them is slower. So a Full-Block preadv read first asks cachestat(2) (Linux 6.5; ~1 us)
# how much of the file is in the page cache (Full-Block reads; Layer-Block reads are left to readahead, see
# `_bring_in_if_cold`); if not all of it, the store brings the block in through a mapping
# advised MADV_HUGEPAGE and populated with MADV_POPULATE_READ (Linux 5.14; an error instead of SIGBUS if the file
# is short or unreadable), so its pages come in 2 MiB folios as a mapped read's do, then reads it as usual
# (`populate_cold`; experiments/bench_store.py, "cold reads"). (A preadv with RWF_NOWAIT cannot ask instead: on a
# cold file it starts readahead of 4 KiB pages before it returns EAGAIN.)
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform.startswith("linux") else None)


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")
    ]


_NR_CACHESTAT = 451  # the same on every Linux architecture but alpha (new system calls share one table)
_WHOLE_FILE = ctypes.byref(_CachestatRange(0, 0))  # len 0: to the end of the file
_cachestat_out = threading.local()  # per thread: the kernel writes it
# libc through ctypes, which releases the GIL around each call (a populate waits for the disk; Python's
# mmap.madvise would hold the GIL meanwhile)
_libc = None
if sys.platform.startswith("linux") and platform.machine().lower() != "alpha":
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
        _libc.mmap.restype = ctypes.c_void_p
        _libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    except (OSError, AttributeError):
        _libc = None
_MAP_FAILED = ctypes.c_void_p(-1).value
# A read hit checks the clock for a due batch of LRU touches (`lru_touch_s`) once every this many hits.
_TOUCH_CHECK_HITS = 16


def _cached_pages(fd: int) -> int | None:
    """Pages of file `fd` in the page cache (cachestat(2)), or None where the system call is missing or refused."""
    ref = getattr(_cachestat_out, "ref", None)
    if ref is None:
        out = _cachestat_out.out = _Cachestat()
        ref = _cachestat_out.ref = ctypes.byref(out)
    if _libc.syscall(_NR_CACHESTAT, fd, _WHOLE_FILE, ref, 0) != 0:
        return None
    return _cachestat_out.out.nr_cache


def _populate_huge(fd: int, size: int) -> int:
    """Map `size` bytes of file `fd`, advise MADV_HUGEPAGE (where there is such advice), MADV_POPULATE_READ them
    and unmap; 0, or the errno of the step that failed (the mmap's, or the populate's: a short or unreadable file is
    an error there, not SIGBUS)."""
    addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        return ctypes.get_errno() or errno.EINVAL
    try:
        if _MADV_HUGEPAGE is not None:
            _libc.madvise(addr, size, _MADV_HUGEPAGE)  # (refused without transparent huge pages: populate anyway)
        if _libc.madvise(addr, size, _MADV_POPULATE_READ) != 0:
            return ctypes.get_errno() or errno.EIO
        return 0
    finally:
        _libc.munmap(addr, size)


def _mismatch(bad_layers: list[int]) -> str:
    """Why a verified read missed: the Layer Blocks whose checksum did not match (both loops say it alike)."""
    return f"checksum mismatch in Layer Block(s) {bad_layers}"


def native_verify_available() -> bool:
    """Whether verified reads of xxh3 blocks can run the compiled loops (see `LocalDirStore(native_verify=)`)."""
    return _VERIFY_C is not None


def _as_u8(buf: Any, name: str, writable: bool) -> np.ndarray:
    """A flat uint8 view of a buffer without copying; a clear error if it cannot be one."""
    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous (got strides {buf.strides} for shape {buf.shape})")
        if writable and not buf.flags.writeable:
            raise ValueError(f"{name} must be writable")
        if buf.dtype.hasobject:  # (numpy's own error named neither the argument nor the dtype)
            raise TypeError(f"{name} must hold plain bytes, got an array of dtype {buf.dtype} (Python objects)")
        # (a plain ndarray: a subclass's slices may not be 1-D, e.g. np.matrix's rows, and a read's checks fail)
        return buf.view(np.ndarray).reshape(-1).view(np.uint8)
    try:
        mv = memoryview(buf)
    except TypeError:
        raise TypeError(f"{name} must be a numpy array or a buffer, got {type(buf).__name__}") from None
    if not mv.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous buffer")
    if writable and mv.readonly:
        raise ValueError(f"{name} must be writable (got a read-only {type(buf).__name__})")
    return np.frombuffer(mv.cast("B"), dtype=np.uint8) if mv.nbytes else np.zeros((0,), np.uint8)


def _row_strided(out: Any, layout) -> tuple[np.ndarray, int] | None:
    """(flat uint8 view from out's first byte to its last, row stride) when `out` is a row-strided Full Block:
    a writable uint8 array of the Full Block's shape [L, block_size, bpt] whose layer rows are each contiguous
    but lie `stride` > Layer-Block bytes apart, inside one array (e.g. `area[:, t0 : t0 + block_size]` of a
    layer-major [L, tokens, bpt] buffer); None for anything else."""
    if type(out) is not np.ndarray or out.dtype != np.uint8 or out.ndim != 3:
        return None
    L, bs, bpt = layout.full_block_shape
    lbn = bs * bpt
    if out.shape != (L, bs, bpt) or out.strides[2] != 1 or out.strides[1] != bpt or out.strides[0] <= lbn:
        return None
    if not out.flags.writeable:
        raise ValueError("out must be writable")
    stride = out.strides[0]
    span = (L - 1) * stride + lbn
    root = out
    while isinstance(root.base, np.ndarray):  # the outermost array over the same memory: the span must lie in it
        root = root.base
    lo, hi = np.lib.array_utils.byte_bounds(root)
    start = out.__array_interface__["data"][0]
    if not (lo <= start and start + span <= hi):
        raise ValueError(f"out's rows (stride {stride}) are not inside one array")
    return np.lib.stride_tricks.as_strided(out, shape=(span,), strides=(1,)), stride


def _rows(dst: np.ndarray, out_off: int, nbytes: int, stride: int, lbn: int) -> list[np.ndarray]:
    """The destination pieces of `nbytes` of whole Layer Blocks at `out_off`: one slice when packed (stride ==
    lbn), else one row per Layer Block."""
    if stride == lbn:
        return [dst[out_off : out_off + nbytes]]
    return [dst[out_off + i * stride : out_off + i * stride + lbn] for i in range(nbytes // lbn)]


def _span(dst: np.ndarray, out_off: int, nbytes: int, stride: int, lbn: int) -> np.ndarray:
    """dst from the first of the Layer Blocks at `out_off` (every `stride` bytes) to the end of the last."""
    k = nbytes // lbn
    return dst[out_off : out_off + (k - 1) * stride + lbn] if k else dst[out_off:out_off]


class _OpenBlock:
    """A block file open for reading: shared by concurrent reads (refs), cached or not, with its checked header
    and (read_method="mmap") its read-only mapping, which lives as long as the fd."""

    __slots__ = ("cached", "fd", "header", "mapping", "preadv_reads", "refs")

    def __init__(self, fd: int):
        self.fd = fd
        self.refs = 1
        self.cached = False
        # (checksum algo, per-layer sums, the header bytes they were parsed from, the sums as uint64 for the
        # compiled loops (xxh3 blocks; else None)) once a read checked the header
        self.header: tuple[str, list[int], bytes, np.ndarray | None] | None = None
        self.mapping: mmap.mmap | None = None
        self.preadv_reads = 0  # reads that could have been mapped, done by preadv (mmap_after_reads of them)

    def close(self) -> None:
        """Unmap and close (no read uses it: refs is 0, so no read holds a view of the mapping)."""
        if self.mapping is not None:
            try:
                self.mapping.close()
            except BufferError:  # a view still referenced (by an exception's traceback): unmapped when collected
                pass
            self.mapping = None
        os.close(self.fd)


class _NewerBlock(str):
    """Why a block is not readable here when a newer dualpath-jax wrote it (block_file.BlockOfNewerFormat): a miss
    that leaves the file, unlike every other reason, which is damage."""


@functools.cache
def writer_code() -> dict:
    """This code as STORE.json's `written_by` records it: {"dualpath_jax": version, "commit": sha where it runs from
    a git checkout (`metrics.git_commit`, as the results' run.json has it)}. Once per process (a commit made while
    it runs is not this process's code anyway)."""
    import dualpath_jax
    from dualpath_jax.metrics import git_commit

    code = {"dualpath_jax": getattr(dualpath_jax, "__version__", None)}
    commit = git_commit()
    if commit:
        code["commit"] = commit
    return code


def _code_name(code) -> str:
    """`dualpath-jax 0.1.0 (commit 27f884b1a2c3)` of a `written_by` record."""
    if not isinstance(code, dict):
        return "a dualpath-jax that did not record its version (before STORE.json's written_by)"
    commit = code.get("commit")
    tail = f" (commit {str(commit)[:12]})" if commit else ""
    return f"dualpath-jax {code.get('dualpath_jax')}{tail}"


def _newer_meta(have: dict, want: dict) -> str | None:
    """What of a store's STORE.json (`have`) says a newer dualpath-jax wrote it (a newer block format, layout fields
    this code does not know), or None."""
    parts = []
    fmt = have.get("block_format_version")
    if isinstance(fmt, int) and fmt > want["block_format_version"]:
        parts.append(f"block format {fmt}; this one reads {want['block_format_version']}")
    hl = have.get("layout") if isinstance(have.get("layout"), dict) else {}
    extra = sorted(k for k in hl if k not in want["layout"])
    if extra:
        parts.append(f"layout field(s) {', '.join(map(repr, extra))} this one does not know")
    return "; ".join(parts) or None


def _is_numerics_part(part: str) -> bool:
    """Whether a fingerprint's `/`-separated part is its `n<KV_NUMERICS>` (models.config.ModelConfig.fingerprint)."""
    return part[:1] == "n" and part[1:].isdigit()


def _numerics_only(have: dict, want: dict) -> bool:
    """True where STORE.json `have` and the layout `want` differ only in the fingerprint's KV numerics part."""

    def without_numerics(meta: dict) -> tuple:
        layout = dict(meta.get("layout") or {})
        fp = layout.get("fingerprint")
        if isinstance(fp, str):
            layout["fingerprint"] = "/".join(p for p in fp.split("/") if not _is_numerics_part(p))
        return json.dumps(layout, sort_keys=True, default=str), meta.get("block_format_version")

    return have.get("layout") != want.get("layout") and without_numerics(have) == without_numerics(want)


def _fingerprint_diff(h: str, w: str) -> list[str]:
    """What differs between fingerprints `h` (the store's) and `w` (asked), part by part (ModelRunner.fingerprint:
    arch/L<layers>/<kv layout>/<dtype>/n<KV_NUMERICS>/<config digest>/w<weights digest>; before KV_NUMERICS, no `n`
    part)."""

    def split(f: str) -> tuple[list[str], str | None]:
        parts = f.split("/")
        n = [p for p in parts if _is_numerics_part(p)]
        return [p for p in parts if p not in n], (n[0] if len(n) == 1 else None)

    (hs, hn), (ws, wn) = split(h), split(w)
    out = []
    if hn != wn:
        here = hn or "not recorded (a fingerprint from before KV_NUMERICS)"
        out.append(
            f"KV numerics {here} here, {wn or 'none'} asked: written by another dualpath-jax version; its KV would not "
            "be this version's bits"
        )
    if len(hs) != len(ws):
        return [*out, f"fingerprint: {h!r} here, {w!r} asked"]
    for i, (hp, wp) in enumerate(zip(hs, ws, strict=True)):
        if hp != wp:
            what = ""
            if i == len(ws) - 1 and wp.startswith("w"):
                what = " (the weights' digest: another checkpoint or model_seed)"
            out.append(f"fingerprint part {hp!r} here, {wp!r} asked{what}")
    return out


class _EmptyMeta(ValueError):
    """STORE.json is an empty file (a copy or a disk that failed part way): said so, not as a JSON parser error."""


def _meta_diff(have: dict, want: dict) -> str:
    """What differs between a store's STORE.json (`have`) and the layout it was opened for (`want`), as "differs in
    field: here vs asked": the whole metadata was printed twice and the reader had to find the difference (for
    another `model_seed`, 16 hex digits at the end of the fingerprint). Layout fields this code does not know are
    `_newer_meta`'s, whose refusal comes first."""
    hl = have.get("layout") if isinstance(have.get("layout"), dict) else {}
    parts = []
    if have.get("block_format_version") != want["block_format_version"]:
        parts.append(f"block format: {have.get('block_format_version')} here, {want['block_format_version']} asked")
    for k, w in want["layout"].items():
        h = hl.get(k)
        if h == w:
            continue
        if k == "fingerprint" and isinstance(h, str) and isinstance(w, str):
            parts += _fingerprint_diff(h, w)
        else:
            parts.append(f"{k}: {h!r} here, {w!r} asked")
    return "differs in " + "; ".join(parts) if parts else "differs in the layout's other fields"


@dataclasses.dataclass(frozen=True)
class LocalDirStoreConfig:
    root: str  # the store directory (created if missing and create=True)
    capacity_bytes: int | None = None  # file bytes kept before LRU eviction; None = unlimited
    checksum: str = "xxh3"  # per-Layer-Block checksum of new blocks: "xxh3" (fastest), "wsum64" or "crc32"
    verify: bool = True  # verify checksums of what is read (header checks always happen)
    read_chunk_bytes: int | None = None  # verified reads check this much at a time (0: the whole read at once;
    # None: MMAP_READ_CHUNK_BYTES with mmap; with preadv NATIVE_PREAD_CHUNK_BYTES (compiled loops) or
    # DEFAULT_READ_CHUNK_BYTES (Python loops))
    read_method: str = "mmap"  # "mmap": hash in the page cache, then copy; "preadv": copy, then hash
    mmap_min_bytes: int = MMAP_MIN_BYTES  # read_method="mmap": smaller (verified) reads preadv
    # read_method="mmap": reads of an open file done by preadv before it is mapped (None: 0 with the compiled
    # loops, 1 without)
    mmap_after_reads: int | None = None
    durable: bool = False  # default of write(durable=None): fsync block and directory
    io_threads: int = 4  # threads of submit_read / read_many
    write_threads: int = 1  # threads of submit_write (apart from the readers, so write-back never delays loads)
    stat_on_hit: bool = False  # lookups stat each hit block (fresh answers on a shared mount)
    stale_temp_s: float = 3600.0  # temp files older than this are removed at open (any host, any pid)
    # the blocks used (read hits, verify, dedup writes) get their files' mtimes (the LRU order at open) set in order
    # of use every this many seconds, at close and before a refresh; None: never (the order at open: write order)
    lru_touch_s: float | None = 60.0
    create: bool = True  # create the store if missing (False: the root must hold one: STORE.json)
    fd_cache: int = 64  # block files kept open for repeated (layerwise) reads; 0: open per read (mmap reads: two
    # descriptors per cached block, as Python's mmap dups the file's)
    native_verify: bool = True  # verified reads of xxh3 blocks run the compiled loops when built (False: Python)
    # compiled mapped reads of at least this many bytes copy with non-temporal stores (None: never; for callers
    # that read into a reused buffer and copy it on at once, which then comes from DRAM instead of cache)
    nontemporal_min_bytes: int | None = NONTEMPORAL_MIN_BYTES
    # a Full-Block preadv read of a block not in the page cache first brings it in through a huge-page-advised,
    # populated mapping (2 MiB folios; see _MADV_POPULATE_READ); False: the kernel's readahead (4 KiB folios)
    populate_cold: bool = True


@STORES.register("local_dir")
class LocalDirStore(KVStore):
    """Full Blocks as checksummed files in one directory; see the module docstring."""

    Config = LocalDirStoreConfig
    strided_out = True  # `read` fills a row-strided Full Block in place (both read methods, C and Python)

    @classmethod
    def from_config(cls, options: Mapping[str, Any], layout: BlockLayout) -> LocalDirStore:
        # (a subclass's own Config, with options of its own: LocalDirStoreConfig refused them)
        fields = {f.name for f in dataclasses.fields(cls.Config)}
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
        read_chunk_bytes: int | None = None,
        read_method: str = "mmap",
        mmap_min_bytes: int = MMAP_MIN_BYTES,
        mmap_after_reads: int | None = None,
        durable: bool = False,
        io_threads: int = 4,
        write_threads: int = 1,
        stat_on_hit: bool = False,
        stale_temp_s: float = 3600.0,
        lru_touch_s: float | None = 60.0,
        create: bool = True,
        fd_cache: int = 64,
        native_verify: bool = True,
        nontemporal_min_bytes: int | None = NONTEMPORAL_MIN_BYTES,
        populate_cold: bool = True,
    ):
        if not isinstance(layout, BlockLayout):
            raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
        try:
            root_path = os.fspath(root) if isinstance(root, (str, os.PathLike)) else None
        except TypeError:  # (an __fspath__ that returns neither str nor bytes)
            root_path = None
        if not isinstance(root_path, str) or not root_path:  # (bytes from __fspath__ failed in os.path.join)
            raise TypeError(f"root must be a directory path (a str, or a PathLike giving a str), got {root!r}")
        if checksum not in block_file.CHECKSUM_ALGOS:
            raise ValueError(f"checksum must be one of {sorted(block_file.CHECKSUM_ALGOS)}, got {checksum!r}")
        if not checks.is_int(io_threads) or io_threads < 1:
            raise ValueError(f"io_threads must be an int >= 1, got {io_threads!r}")
        if not checks.is_int(write_threads) or write_threads < 1:
            raise ValueError(f"write_threads must be an int >= 1, got {write_threads!r}")
        flags = dict(verify=verify, durable=durable, stat_on_hit=stat_on_hit, create=create)
        flags.update(native_verify=native_verify, populate_cold=populate_cold)
        for name, value in flags.items():  # (a config's "false" is truthy: create="false" made a missing store)
            if not checks.is_bool(value):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        self.layout = layout
        self.file_nbytes = block_file.file_nbytes(layout)
        self.header_nbytes = block_file.header_nbytes(layout)
        if capacity_bytes is not None:
            if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, (int, np.integer)):
                # (a command line's 1e9 is a float: say which int it means)
                hint = (
                    f" (write {int(capacity_bytes)})"
                    if isinstance(capacity_bytes, float) and capacity_bytes.is_integer()
                    else ""
                )
                raise TypeError(f"capacity_bytes must be an int or None, got {capacity_bytes!r}{hint}")
            if capacity_bytes < self.file_nbytes:
                raise ValueError(
                    f"capacity_bytes={capacity_bytes} cannot hold one block ({self.file_nbytes} B with its header "
                    f"for layout {layout})"
                )
        self.native_verify = bool(native_verify)
        if nontemporal_min_bytes is not None and (
            not checks.is_int(nontemporal_min_bytes) or nontemporal_min_bytes < 0
        ):
            raise ValueError(
                f"nontemporal_min_bytes must be an int >= 0 or None (never), got {nontemporal_min_bytes!r}"
            )
        # (numpy ints, e.g. from a sweep's np.arange, are ints too: kept as Python ints)
        self.nontemporal_min_bytes = None if nontemporal_min_bytes is None else int(nontemporal_min_bytes)
        self.populate_cold = bool(populate_cold)
        # (turned off for good if this file system or kernel refuses cachestat, mmap or MADV_POPULATE_READ)
        self._populate = self.populate_cold and _libc is not None and _MADV_POPULATE_READ is not None
        self._file_pages = -(-self.file_nbytes // mmap.PAGESIZE)
        self._native = _VERIFY_C if native_verify else None
        if read_chunk_bytes is None:
            if read_method == "mmap":
                read_chunk_bytes = MMAP_READ_CHUNK_BYTES
            else:
                read_chunk_bytes = DEFAULT_READ_CHUNK_BYTES if self._native is None else NATIVE_PREAD_CHUNK_BYTES
        if not checks.is_int(read_chunk_bytes) or read_chunk_bytes < 0:
            raise ValueError(f"read_chunk_bytes must be an int >= 0 (0: no chunking), got {read_chunk_bytes!r}")
        if read_method not in READ_METHODS:
            raise ValueError(f"read_method must be one of {list(READ_METHODS)}, got {read_method!r}")
        if not checks.is_int(mmap_min_bytes) or mmap_min_bytes < 0:
            raise ValueError(f"mmap_min_bytes must be an int >= 0, got {mmap_min_bytes!r}")
        if mmap_after_reads is None:
            # The compiled loops' non-temporal copy makes even a first mapped read of an open file (600 page faults
            # for a 2.4 MiB block) faster than preadv; with the Python loops the faults cost about what hashing in
            # the page cache saves, so they map from the second read.
            mmap_after_reads = 0 if self._native is not None else 1
        if not checks.is_int(mmap_after_reads) or mmap_after_reads < 0:
            raise ValueError(f"mmap_after_reads must be an int >= 0, got {mmap_after_reads!r}")
        if not checks.is_int(fd_cache) or fd_cache < 0:
            raise ValueError(f"fd_cache must be an int >= 0, got {fd_cache!r}")
        if not checks.is_real(stale_temp_s) or not stale_temp_s >= 0:  # (NaN: no temp file was ever old enough)
            raise ValueError(f"stale_temp_s must be a number >= 0, got {stale_temp_s!r}")
        self.root = os.path.abspath(root_path)
        self.capacity_bytes = None if capacity_bytes is None else int(capacity_bytes)
        self.checksum = checksum
        self.verify_reads = bool(verify)  # the `verify` option (`verify` is the method: stored and whole?)
        self.read_chunk_bytes = read_chunk_bytes = int(read_chunk_bytes)
        # Layer Blocks per verified preadv (at least one; 0: the whole read, then the checks).
        self._chunk_layers = max(1, read_chunk_bytes // layout.layer_block_nbytes) if read_chunk_bytes else 0
        self._lbn = lbn = layout.layer_block_nbytes  # (BlockLayout computes these on every access)
        self._fb = fb = layout.full_block_nbytes
        self._hdr_used = block_file.header_used_nbytes(layout)  # header bytes that parse_header reads
        self._step = min(self._chunk_layers * lbn or fb, fb)  # bytes per verified chunk
        self.read_method = read_method
        self.mmap_min_bytes = mmap_min_bytes = int(mmap_min_bytes)
        self.mmap_after_reads = int(mmap_after_reads)
        self._mmap_min = mmap_min_bytes if read_method == "mmap" else None  # reads of this many bytes are mapped
        self.durable = bool(durable)
        self.stat_on_hit = bool(stat_on_hit)
        self.stale_temp_s = float(stale_temp_s)
        if lru_touch_s is not None and (not checks.is_real(lru_touch_s) or not lru_touch_s >= 0):
            raise ValueError(f"lru_touch_s must be a number >= 0 or None (never), got {lru_touch_s!r}")
        self.lru_touch_s = None if lru_touch_s is None else float(lru_touch_s)
        self._touch_s = self.lru_touch_s  # (None: never touch a file, or no more: a read-only mount)
        self._fp_digest = block_file.fingerprint_digest(layout.fingerprint)
        self._blocks_dir = os.path.join(self.root, "blocks")

        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise NotADirectoryError(f"store root {self.root} exists and is not a directory")
        # A new store on a full disk (no room for its directories or STORE.json) opens with its metadata pending:
        # lookups and reads miss, and writes first make them (`_meta_ready`). It ended the run: experiments.run's
        # next policy's fresh store directory, on a disk the last policy's blocks filled.
        self._meta_pending = False
        self._meta_lock = threading.Lock()
        self._meta_due = 0.0  # (monotonic) when a pending store next tries to write its metadata
        self._meta_failing: str | None = None  # why that last failed (said once)
        # The directory this store opened (None while its metadata is pending): removed, moved away or replaced by
        # another that is not a store of this layout (another model's store moved in place) under the open store, it
        # is no longer this store's, so writes fail and nothing there is removed (its blocks of another size looked
        # damaged: a lookup, read or refresh deleted them; writes filled it, or made a removed root again without
        # STORE.json).
        self._blocks_id: tuple[int, int] | None = None
        # Directories made for the store (the root, its missing parents, blocks/) whose entries a durable store has
        # not fsync'ed yet: kept across a make that a full disk stopped, until one succeeds (`_make_store_dir`).
        self._made_dirs: dict[str, None] = {}  # (an ordered set: a retry that fails again adds none twice)
        try:
            self._make_store_dir(create)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT) or self._holds_files():
                raise
            self._meta_pending = True
            self._meta_due = time.monotonic() + META_RETRY_S
            said = self.root in _PENDING_SAID  # (once per directory and process: a run's driver and nodes open 3)
            _PENDING_SAID.add(self.root)
            (log.debug if said else log.warning)(
                "kv store %s: cannot make a new store there: %s (the disk is full: no space or no inodes left); "
                "opened without blocks, its metadata pending: lookups and reads miss, and writes first try to make "
                "the store again (at most once every %g s; the writes are counted, stats write_errors, until it is "
                "made)", self.root, e, META_RETRY_S,
            )  # fmt: skip

        self._lock = threading.Lock()
        # key -> adopt generation (`_seq` when it was last adopted: written, found or read here), LRU first. Every
        # indexed block is `file_nbytes` on disk. A check that found a block absent drops it only if no adopt came
        # after the check began (a write of the block may land between the check and the drop).
        self._index: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self._seq = 0
        self._pins: collections.Counter[bytes] = collections.Counter()  # pin()/unpin() of the callers
        self._evict_failed: set[bytes] = set()  # indexed keys whose eviction failed to remove the file (logged)
        self._corrupt_left: dict[bytes, tuple[int, int]] = {}  # key -> (inode, device) of a corrupt file not removed
        self._evict_failing: int | None = None  # errno of the spell of failed evictions logged (None: none now)
        self._busy: collections.Counter[bytes] = collections.Counter()  # reads and writes in flight: not evicted
        self._scans: list[set[bytes]] = []  # per `_scan` in progress: the keys dropped meanwhile
        self._drops = 0  # keys dropped so far, indexed or not (a check outside the lock that saw a block present and
        # finds it unindexed under the lock re-checks if this changed meanwhile: it may have been evicted or removed)
        # Keys dropped (removed, found corrupt...) while a read, verify or dedup check of them was in flight (`_busy`):
        # the `_drop_seq` of their last drop, kept while they are busy. Such a check that began before the drop must
        # not index the key afterwards (its file is gone): a read of a block this process had not indexed (another
        # process wrote it) used to index it after a concurrent remove(), a phantom hit counted against capacity.
        self._drop_seq = 0
        self._dropped_busy: dict[bytes, int] = {}
        self._reserved = 0  # bytes of writes in progress, until their block is renamed into place (then indexed)
        # opens in progress per key (outside the lock): `_forget_fd_locked` marks them stale, so that an fd of a
        # file removed or replaced while it was being opened is read once and never cached
        self._opening: dict[bytes, list[_PendingOpen]] = {}
        self._stats = StoreStats()
        self._synced_dirs: set[str] = set()  # fan-out directories whose entry in blocks/ a durable write synced
        # LRU order across reopen (module docstring): the indexed keys used (read hits, verify, dedup writes) since
        # the last batch of touches, and when the next batch is due (monotonic). A set add is the read path's cost.
        self._used_keys: set[bytes] = set()
        self._written_keys: set[bytes] = set()  # written since the last batch (their mtime: the kernel's clock's now)
        self._lru_high = 0  # the newest LRU stamp (ns) seen: in the listing at open or refresh, or set here
        self._touch_due = time.monotonic() + (self._touch_s or 0.0)
        self._touch_failed = False  # a touch failed (EPERM...): logged once
        self._map_failed = False  # a block file could not be mapped (ENOMEM): logged once
        self._swept: dict[str, float] = {}  # fan-out directory -> when a write last swept it (monotonic)
        self._opened = time.monotonic()  # (the open swept every directory)
        self._disk_full = False  # the last write failed for a full disk (its warning said so once; the rest counted)
        self._read_failing: int | None = None  # errno of the spell of failed reads logged (None: none now)
        self._newer_said = False  # a block a newer dualpath-jax wrote was met (its warning said so once)
        self._write_failing = None  # why the last write failed otherwise (its warning said so once; the rest counted)
        self._no_room = False  # the last write was refused for room (its warning said so once; the rest counted)
        self._tls = threading.local()  # per-thread header buffer: no allocation per read
        self._fds: collections.OrderedDict[bytes, _OpenBlock] = collections.OrderedDict()  # LRU of open files
        self._fd_cache = int(fd_cache)
        # A cached file holds one fd, two once mapped (mmap keeps a dup of it). A cache that can take the process's
        # whole open-file limit (RLIMIT_NOFILE) left every later open failing with EMFILE: each read of a block not
        # cached a miss for good, and the rest of the process (sockets, files) without fds. Capped at a quarter of
        # it (cached files take at most half of the fds), and shrunk when an open fails with EMFILE/ENFILE anyway.
        nofile = _nofile_limit()
        if nofile is not None and self._fd_cache > nofile // 4:
            log.warning(
                "kv store %s: fd_cache=%d lowered to %d: the open-file limit (RLIMIT_NOFILE) is %d and a cached block "
                "file may hold 2 fds", self.root, self._fd_cache, nofile // 4, nofile,
            )  # fmt: skip
            self._fd_cache = nofile // 4
        self._host = _host_id()
        if not self._meta_pending:
            self._scan()
        self._threads = (int(io_threads), int(write_threads))
        self._closed = False
        self._new_pools()
        _STORES_OPEN.add(self)  # (a forked child gets pools of its own: see _after_fork_in_child)

    def _new_pools(self) -> None:
        io_threads, write_threads = self._threads
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="kvstore-io")
        self._write_pool = ThreadPoolExecutor(max_workers=write_threads, thread_name_prefix="kvstore-write")

    # ---- directory ------------------------------------------------------------------------------------
    def _make_store_dir(self, create: bool) -> None:
        """Make (create) or check the store's directories and STORE.json; then note `blocks/` (`_blocks_id`). A
        durable store fsyncs the parents of the directories it made (`_made_dirs`): those of an earlier make that a
        full disk stopped too (a store opened with its metadata pending made its root then, and its retry fsync'ed
        STORE.json and the root, but not the root's entry in its parent: a power loss could lose the whole store)."""
        if not os.path.isdir(self.root):
            if not create:
                raise FileNotFoundError(f"store root {self.root} does not exist (create=False)")
            # (the root and its missing parents, outermost first)
            self._made_dirs.update(dict.fromkeys(_missing_dirs(self.root)))
            os.makedirs(self.root, exist_ok=True)
        elif not create and not os.path.lexists(os.path.join(self.root, _META)):
            # (an empty mount point of a shared file system that is not mounted: it made a new, empty store there,
            # on the local disk, where create=False is meant to open the existing one)
            raise FileNotFoundError(f"store root {self.root} holds no KV store (no {_META}) and create=False")
        if not os.path.isdir(self._blocks_dir):
            self._made_dirs[self._blocks_dir] = None
            os.makedirs(self._blocks_dir, exist_ok=True)
        self._check_or_write_meta()
        st = os.stat(self._blocks_dir)
        if self.durable:
            for d in self._made_dirs:  # (each one's parent holds its entry)
                _fsync_dir(os.path.dirname(d))
        self._made_dirs.clear()
        self._blocks_id = (st.st_dev, st.st_ino)

    def _holds_files(self) -> bool:
        """Whether `blocks/` holds anything (then the directory is no new store: a full disk there is not pending)."""
        try:
            with os.scandir(self._blocks_dir) as it:
                return any(True for _ in it)
        except (FileNotFoundError, NotADirectoryError):
            return False

    @property
    def meta_pending(self) -> bool:
        """Opened on a full disk before its STORE.json could be written: no blocks, lookups and reads miss, until a
        write makes the store (`_meta_ready`)."""
        return self._meta_pending

    def _meta_ready(self) -> bool:
        """A store whose metadata is pending: tries to make its directories and STORE.json again (another process may
        have made them), at most once every META_RETRY_S; True once made (from then on the store is as any other)."""
        now = time.monotonic()
        with self._meta_lock:
            if not self._meta_pending:
                return True
            if now < self._meta_due:
                return False
            self._meta_due = now + META_RETRY_S
            try:
                self._make_store_dir(True)
            except (OSError, ValueError) as e:  # (still full; another model's STORE.json put there meanwhile...)
                why = f"{type(e).__name__}: {e}"
                quiet, self._meta_failing = self._meta_failing == why or isinstance(e, OSError), why
                (log.debug if quiet else log.warning)("kv store %s: still cannot make the store: %s", self.root, e)
                return False
            self._meta_pending = False
        log.warning("kv store %s: the store is made now (its STORE.json written): writes are stored again", self.root)
        return True

    def _meta(self) -> dict:
        lay = self.layout
        return {
            "format": "dualpath-jax kv store",
            "block_format_version": block_file.FORMAT_VERSION,
            "layout": {  # (int(): a BlockLayout takes numpy integers, which JSON does not)
                "num_layers": int(lay.num_layers),
                "block_tokens": int(lay.block_tokens),
                "bytes_per_token_per_layer": int(lay.bytes_per_token_per_layer),
                "fingerprint": str(lay.fingerprint),
            },
            "written_by": writer_code(),  # (not compared: a hint in the refusal of another layout)
        }

    def _check_or_write_meta(self) -> None:
        path = os.path.join(self.root, _META)
        want = self._meta()
        try:
            with open(path) as f:
                if os.fstat(f.fileno()).st_size == 0:  # (it said: unreadable (Expecting value: line 1 column 1 ...))
                    raise _EmptyMeta(
                        f"store metadata {path} is empty (0 B): restore it from a copy, or use a new directory (the "
                        f"blocks in {self.root} cannot be checked against a model without it)"
                    )
                have = json.load(f)
            if not isinstance(have, dict):
                raise ValueError(f"a JSON {type(have).__name__}, not an object")
        except FileNotFoundError:
            tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            try:
                with open(tmp, "w") as f:
                    json.dump(want, f, indent=1)
                    if self.durable:
                        f.flush()
                        os.fsync(f.fileno())
                try:  # a link, not a replace: a racing creator of another layout must not be overwritten
                    os.link(tmp, path)
                    lost = False
                except FileExistsError:
                    lost = True
                except OSError:  # (a file system without hard links)
                    os.replace(tmp, path)
                    lost = False
            except OSError as e:  # (a full disk, a read-only mount: it was a bare "[Errno 28] No space left on device")
                raise OSError(e.errno, f"cannot write the store metadata {path} ({e.strerror or e})") from e
            finally:  # (a full disk, say): no temp file left behind
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            if lost:  # another process made STORE.json first: check against it
                return self._check_or_write_meta()
            if self.durable:
                _fsync_dir(self.root)
            return
        except _EmptyMeta:
            raise
        except (OSError, ValueError) as e:
            raise ValueError(f"store metadata {path} is unreadable ({e}); is {self.root} a KV store?") from e
        if have.get("layout") != want["layout"] or have.get("block_format_version") != want["block_format_version"]:
            writer, me = have.get("written_by"), want["written_by"]
            who = "" if writer == me else f"; written by {_code_name(writer)}, this is {_code_name(me)}"
            newer = _newer_meta(have, want)
            if newer is not None:  # (not "one directory per model": this code cannot read it)
                raise ValueError(
                    f"store {self.root} was written by a newer dualpath-jax ({newer}{who}): open it with that version, "
                    "or use another directory"
                )
            # (the same model, KV of other numerics: no other model's directory to pick, the KV is computed again)
            tail = (
                "its KV must be computed again: use another directory, or remove this one"
                if _numerics_only(have, want)
                else "use one directory per model and KV layout"
            )
            raise ValueError(
                f"store {self.root} holds blocks of {have.get('layout')} (format {have.get('block_format_version')}), "
                f"but was opened for {want['layout']} (format {want['block_format_version']}) ({_meta_diff(have, want)}"
                f"{who}); {tail}"
            )

    def _read_failed(self, doing: str, path: str, e: OSError) -> None:
        """A read failed `doing` block `path` with `e`: a miss, counted (`read_errors`); logged once per spell of one
        errno until a read succeeds (out of file descriptors, a run logged one line per block read)."""
        with self._lock:
            self._stats.read_errors += 1
            quiet, self._read_failing = self._read_failing == e.errno, e.errno
        (log.debug if quiet else log.warning)(
            "kv store %s: I/O error %s block %s: %s (treated as a miss%s)", self.root, doing, path, e,
            "" if quiet else "; the next reads that fail so are counted (stats read_errors), not logged, until one "
            "succeeds",
        )  # fmt: skip

    def _failing_again(self, why: str) -> bool:
        """A write failed for `why` (not a full disk): True when the last one failed for it too (the spell's first
        failure was logged; this one is counted, `write_errors`, and logged at debug level), until a write is stored."""
        with self._lock:
            again, self._write_failing = self._write_failing == why, why
        return again

    def _root_changed(self) -> str | None:
        """Why `blocks/` is no longer the directory this store opened (see `_blocks_id`), or None."""
        if self._blocks_id is None:  # (its metadata pending: no directory opened yet)
            return None
        try:
            st = os.stat(self._blocks_dir)
        except FileNotFoundError:
            return "is gone (removed or moved away)"
        except OSError as e:
            return f"cannot be checked ({e})"
        if (st.st_dev, st.st_ino) != self._blocks_id:
            # (or a file system whose inode numbers are not stable, FUSE: still this store if STORE.json says so; a
            # store of this layout moved in place is one too: its blocks are this model's)
            try:
                with open(os.path.join(self.root, _META)) as f:
                    have = json.load(f)
                want = self._meta()  # (as the check at open)
                ours = isinstance(have, dict) and all(
                    have.get(k) == want[k] for k in ("layout", "block_format_version")
                )
            except (OSError, ValueError):
                ours = False
            if not ours:
                return "is another directory now, not a store of this layout (replaced)"
            self._blocks_id = (st.st_dev, st.st_ino)
        return None

    def path_of(self, key: bytes) -> str:
        """The file of block `key`."""
        h = key.hex()
        return f"{self._blocks_dir}/{h[:2]}/{h}{_SUFFIX}"

    def _scan(self) -> None:
        """Rebuild the index from the directory (LRU order = file mtime); clean up dead writers' temp files.

        Only a block's own file counts: `path_of(key)` (lower-case hex, in its fan-out directory). Another file that
        names a key (upper-case hex, the wrong fan-out directory) is a stray copy: removed, never counted (else the
        key's bytes would count twice and evicting the key would leave the copy on disk for good). An entry that
        cannot be stat'ed (EACCES, ELOOP, EIO...) is logged and skipped: the store still opens."""
        with self._lock:
            seen = self._seq  # blocks adopted while this scan runs are kept
            dropped: set[bytes] = set()  # keys this process drops while the scan runs (removed, evicted): their
            self._scans.append(dropped)  # files may have been listed before they went, so they are not re-indexed
        try:
            found: dict[bytes, int] = {}  # key -> mtime
            now = time.time()
            for sub in sorted(os.listdir(self._blocks_dir)):
                d = os.path.join(self._blocks_dir, sub)
                if not os.path.isdir(d):
                    continue
                try:
                    entries = list(os.scandir(d))
                except OSError as e:
                    log.warning("kv store %s: cannot list %s: %s (its blocks are not indexed)", self.root, d, e)
                    continue
                for entry in entries:
                    name = entry.name
                    if name.startswith(_TMP_PREFIX):
                        self._maybe_remove_temp(entry, now)
                        continue
                    if not name.endswith(_SUFFIX):
                        continue
                    stem = name[: -len(_SUFFIX)]
                    try:
                        key = bytes.fromhex(stem)
                    except ValueError:
                        continue
                    if not 0 < len(key) <= block_file.MAX_KEY_NBYTES:
                        continue
                    try:
                        st = entry.stat()
                        if (stem != key.hex() or sub != stem[:2]) and not self._is_own_file(key, st, entry.path):
                            continue
                    except FileNotFoundError:
                        continue
                    except OSError as e:
                        log.warning("kv store %s: cannot stat %s: %s (skipped)", self.root, entry.path, e)
                        continue
                    if st.st_size != self.file_nbytes:  # a rename is atomic, so a wrong size is damage, not a write
                        newer = self._newer_file(entry.path, st)  # (or a block of a newer format: left, unindexed)
                        if newer is not None:
                            self._leave_newer(entry.path, newer)
                        else:
                            why = f"file size {st.st_size} B, expected {self.file_nbytes}"
                            self._remove_corrupt(key, entry.path, why)
                        continue
                    found[key] = max(found.get(key, st.st_mtime_ns), st.st_mtime_ns)
        except BaseException:  # (blocks/ cannot be listed, say)
            with self._lock:
                self._end_scan_locked(dropped)
            raise
        with self._lock:
            self._end_scan_locked(dropped)
            self._lru_high = max(self._lru_high, max(found.values(), default=0))
            order = sorted((k for k in found if k not in dropped), key=found.__getitem__)
            recent = [k for k, g in self._index.items() if g > seen] if self._index else []
            for key in [k for k in self._index if k not in found and self._index[k] <= seen]:
                self._drop_locked(key)  # removed by another process: its open file must not serve reads either
            self._seq += 1
            gen = self._seq
            self._index.clear()
            for key in order:
                self._index[key] = gen
            for key in recent:  # written or found here while the directory was listed
                self._index[key] = gen
                self._index.move_to_end(key)
            self._evict_to_fit_locked(0)

    def _end_scan_locked(self, dropped: set[bytes]) -> None:
        """Stop recording drops for the scan that owns `dropped`: found by identity, since another scan's set may be
        equal to it (both empty), and list.remove would end that scan's record instead."""
        self._scans[:] = [d for d in self._scans if d is not dropped]

    def _is_own_file(self, key: bytes, st: os.stat_result, path: str) -> bool:
        """Whether a file whose name is not `path_of(key)`'s spelling is that very file (a case-insensitive file
        system lists the name it was created with); if not, it is a stray copy, removed (logged)."""
        try:
            own = os.stat(self.path_of(key))
            if (own.st_ino, own.st_dev) == (st.st_ino, st.st_dev):
                return True
        except OSError:
            pass
        log.warning("kv store %s: stray block file %s (not the name of key %s): removed", self.root, path, key.hex())
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("kv store %s: could not remove stray file %s: %s", self.root, path, e)
        return False

    def _maybe_remove_temp(self, entry: os.DirEntry, now: float) -> None:
        if _written_now(entry.path):  # (a live writer's, whatever its pid or age says)
            return
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
        if not stale:  # (also a live pid's: a pid reused since its writer was killed would keep it forever)
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
            except OSError as e:  # (a read-only mount, say: the store still opens)
                log.warning("kv store %s: could not remove temp file %s: %s", self.root, entry.path, e)

    def _sweep_temps(self, d: str) -> None:
        """Remove dead writers' temp files from fan-out directory `d` as the open does (this process's own are its
        writes in flight: left), once every `TEMP_SWEEP_S` per directory: a writer killed while the other processes
        run on left its temp files there until the next open or `refresh`, which the runtime never calls."""
        now = time.monotonic()
        with self._lock:
            if now - self._swept.get(d, self._opened) < TEMP_SWEEP_S:
                return
            self._swept[d] = now
        own = f"{_TMP_PREFIX}{self._host}.{os.getpid()}."
        try:
            with os.scandir(d) as it:
                temps = [e for e in it if e.name.startswith(_TMP_PREFIX) and not e.name.startswith(own)]
        except OSError:  # (not made yet: this write makes it)
            return
        wall = time.time()
        for entry in temps:
            self._maybe_remove_temp(entry, wall)

    # ---- index, pins, eviction ------------------------------------------------------------------------
    @property
    def _used(self) -> int:
        """Bytes of the indexed blocks (every block file is `file_nbytes`)."""
        return len(self._index) * self.file_nbytes

    def _adopt_locked(self, key: bytes) -> None:
        """Index `key` (its file was just written, found or read) as the most recently used, with a new generation."""
        self._seq += 1
        self._index[key] = self._seq
        self._index.move_to_end(key)

    def _adopt_fitting_locked(self, key: bytes) -> None:
        """`_adopt_locked` for a block found stored (a read hit, a dedup write): one new to the index (another
        process wrote it) counts against capacity, so others are evicted to fit it, or, where none can be, it is
        left out of the index (its file stays), as lookup does."""
        new = key not in self._index
        self._adopt_locked(key)
        if new and not self._evict_to_fit_locked(0, protect=(key,), partial=False):
            self._drop_locked(key)

    def _drop_locked(self, key: bytes, absent: bool = False) -> None:
        """Forget `key` (its file was removed, or is not this store's to keep); `absent`: a check found no file."""
        self._forget_fd_locked(key)
        self._evict_failed.discard(key)
        self._used_keys.discard(key)
        self._written_keys.discard(key)
        for dropped in self._scans:  # (a refresh in progress must not index it again from its listing)
            dropped.add(key)
        # (a key not indexed too, unless it was found absent: a lookup's stat of it may have raced its removal)
        if self._index.pop(key, None) is not None or not absent:
            self._drops += 1
        if self._busy[key]:  # (a Counter: no entry made)
            self._drop_seq += 1
            self._dropped_busy[key] = self._drop_seq

    def _unbusy_locked(self, key: bytes) -> None:
        n = self._busy[key] - 1
        if n > 0:
            self._busy[key] = n
        else:
            self._busy.pop(key, None)
            self._dropped_busy.pop(key, None)

    def _dropped_since_locked(self, key: bytes, drop_seq: int) -> bool:
        """Whether busy `key` was dropped after `_drop_seq` was `drop_seq` (see `_dropped_busy`)."""
        return self._dropped_busy.get(key, 0) > drop_seq

    def _drop_unlinked_locked(self, key: bytes, seen: int) -> None:
        """Drop `key` after this process unlinked its file (or found none) outside the lock, in an unlink that began
        at generation `seen`; unless a write indexed it since and its file is there: that write renamed its block into
        place after the unlink (a remove() racing a write of the same key dropped the new block from the index, which
        then sat on disk untracked, never evicted). A stat under the lock, only when such a write came meanwhile."""
        if self._index.get(key, 0) > seen and self._stat_block(key, False):
            return
        self._drop_locked(key)

    def _drop_absent_locked(self, key: bytes, seen: int) -> None:
        """Drop `key`, found absent by a check that began at generation `seen`, unless it was adopted since (a
        write that landed between the check and now: its block is on disk)."""
        if self._index.get(key, 0) <= seen:
            self._drop_locked(key, absent=True)

    def _note_use_locked(self, key: bytes) -> list[tuple[int, bytes, bool]] | None:
        """Note a use of indexed `key` (a verify, a dedup write) for the next batch of LRU touches; that batch when one
        is due (`_touch_used` it outside the lock). The read path does the same inline, checking the clock less often."""
        if self._touch_s is not None and key in self._index:
            self._used_keys.add(key)
            if time.monotonic() >= self._touch_due:
                return self._take_used_locked()
        return None

    def _take_used_locked(self) -> list[tuple[int, bytes, bool]]:
        """The keys used or written since the last batch, still indexed, as (adopt generation, key, written only): their
        order of use (a later use made a key MRU with a higher generation); the next batch is due `lru_touch_s` from
        now."""
        used, self._used_keys = self._used_keys, set()
        written, self._written_keys = self._written_keys - used, set()
        self._touch_due = time.monotonic() + (self._touch_s or 0.0)
        index = self._index
        return [(index[k], k, False) for k in used if k in index] + [(index[k], k, True) for k in written if k in index]

    def _touch_used(self, batch: list[tuple[int, bytes, bool]] | None = None, background: bool = False) -> None:
        """Set the mtimes of the blocks used since the last batch (or of `batch`) to now, in their order of use (one
        ns apart), on the writer's thread with `background` (reads never wait for it; inline once closed)."""
        if batch is None:
            with self._lock:
                if self._touch_s is None:
                    self._used_keys.clear()
                    self._written_keys.clear()
                    return
                batch = self._take_used_locked()
        if not batch:
            return
        if background:
            try:
                self._write_pool.submit(self._touch_files, batch)
                return
            except RuntimeError:  # (closed meanwhile)
                pass
        self._touch_files(batch)

    def _touch_files(self, batch: list[tuple[int, bytes, bool]]) -> None:
        """Stamp the batch's files in order of use: from now, or, where the wall clock is not past the newest stamp
        any process sharing the store set (`_LRU_CLOCK`; the clock stepped back, or this host's is behind another's),
        from just past it, blocks written since the last batch included (the kernel stamped them with its clock)."""
        batch.sort()  # (here, not in the reader's thread)
        changed = self._root_changed()
        if changed is not None:  # (its files are another store's: not ours to touch either)
            log.info("kv store %s: LRU touches skipped: the store directory %s", self.root, changed)
            return
        high = max(self._lru_high, self._shared_lru_high())
        now = time.time_ns()
        if now - len(batch) > high:
            keys = [key for _, key, written in batch if not written]  # (a written block's mtime is now already)
            base = now - len(keys)
        else:
            keys = [key for _, key, _ in batch]
            base = high + 1
        for i, key in enumerate(keys):
            if self._touch_s is None:  # (a read-only mount)
                return
            self._touch_file(key, base + i)
        if keys:
            self._lru_high = max(self._lru_high, base + len(keys) - 1)
            self._set_shared_lru_high(base + len(keys) - 1)

    def _shared_lru_high(self) -> int:
        """The newest LRU stamp a process sharing the store set (`_LRU_CLOCK`'s mtime); 0 if none."""
        try:
            return os.stat(os.path.join(self.root, _LRU_CLOCK)).st_mtime_ns
        except OSError:
            return 0

    def _set_shared_lru_high(self, ns: int) -> None:
        """Record `ns` as the newest LRU stamp (`_LRU_CLOCK`), unless a newer one is there already (another process
        stamped meanwhile; two batches at the same moment can still leave the lower of the two). Best effort: a
        store this process may not change (read-only, another user's) keeps its record."""
        path = os.path.join(self.root, _LRU_CLOCK)
        try:
            if self._shared_lru_high() < ns:
                try:
                    os.utime(path, ns=(ns, ns))
                except FileNotFoundError:  # (the store's first stamp)
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o666))
                    os.utime(path, ns=(ns, ns))
        except OSError as e:
            log.debug("kv store %s: cannot record the newest LRU stamp in %s: %s", self.root, path, e)

    def _touch_file(self, key: bytes, ns: int) -> None:
        """Set block `key`'s file's mtime (and atime) to `ns`: the LRU order a reopen reads. Best effort: a block
        removed meanwhile is skipped, a read-only mount turns touching off, other errors (EPERM: another user's
        file) leave its mtime (logged once)."""
        try:
            os.utime(self.path_of(key), ns=(ns, ns))
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError as e:
            if e.errno == errno.EROFS:
                self._touch_s = None
                log.info("kv store %s: read-only: block files' mtimes (the LRU order at open) not kept", self.root)
            elif not self._touch_failed:
                self._touch_failed = True
                log.warning(
                    "kv store %s: cannot set the mtime of block %s (the LRU order at open): %s (its write order "
                    "stays; not logged again)", self.root, key.hex(), e,
                )  # fmt: skip

    def _evict_to_fit_locked(
        self, incoming: int, protect: Sequence[bytes] = (), partial: bool = True, evict: bool = True
    ) -> bool:
        """Evict LRU blocks (neither pinned nor being read, nor in `protect`) until `incoming` more bytes fit;
        False if they do not even then (with `partial=False` nothing is evicted then: a write that fails anyway must
        not cost other blocks; lookup's partial eviction makes room for some of its hits). `evict=False` only says
        whether they would fit (a write checks before it writes, and evicts once its block is stored). Victims whose
        file cannot be removed are replaced by further LRU blocks; where none is left, False after all (some may
        have been evicted). Costs O(1) when they fit, else one walk from the LRU end to the last victim (the index
        is never copied: it is held under the lock)."""
        if self.capacity_bytes is None:
            return True
        need = self._excess_blocks_locked(incoming)
        if need <= 0:
            return True
        victims = self._victims_locked(need, protect)
        fits = len(victims) == need
        if evict and (fits or partial):
            fits = not self._evict_or_replace_locked(victims, protect) and fits
        return fits

    def _excess_blocks_locked(self, incoming: int = 0) -> int:
        """Blocks to evict before `incoming` more bytes fit (<= 0: none)."""
        return -(-(self._used + self._reserved + incoming - self.capacity_bytes) // self.file_nbytes)

    def _victims_locked(self, need: int, protect: Sequence[bytes] = ()) -> list[bytes]:
        """Up to `need` LRU blocks that may be evicted (neither pinned nor being read or written, nor in `protect`)."""
        pins, busy = self._pins, self._busy
        keep = set(protect) if protect else ()
        victims = []
        for key in self._index:  # LRU first
            if pins[key] or busy[key] or key in keep:
                continue
            victims.append(key)
            if len(victims) == need:
                break
        return victims

    def _evict_or_replace_locked(self, victims: list[bytes], protect: Sequence[bytes] = ()) -> int:
        """Evict `victims` (from `_victims_locked`), each one whose file could not be removed replaced by the next
        LRU block that may be evicted (not in `protect`); how many could not be replaced (0: as many evicted).
        The ones kept move to the MRU end, so that the next evictions do not try them first again. Nothing is evicted
        from a directory that is not this store's any more (`_root_changed`): a file there of a victim's name is
        another store's block (a lookup that took that store's blocks of the same size for hits evicted them)."""
        if not victims:
            return 0
        changed = self._root_changed()
        if changed is not None:
            log.warning(
                "kv store %s: evicting %d blocks refused: the store directory %s %s since the store was opened (its "
                "files are not this store's to remove; reopen the store)", self.root, len(victims), self._blocks_dir,
                changed,
            )  # fmt: skip
            return len(victims)
        tried = set(protect)
        kept: list[bytes] = []
        short = 0
        while victims:
            tried.update(victims)
            failed = self._evict_locked(victims)
            kept += failed
            victims = self._victims_locked(len(failed), tried) if failed else []
            short += len(failed) - len(victims)
        for key in kept:
            self._index.move_to_end(key)
        return short

    def _evict_locked(self, victims: list[bytes]) -> list[bytes]:
        """Evict `victims`; the ones whose file could not be removed (EACCES, EPERM, EBUSY...: logged once per key)
        stay indexed, their bytes counted: their files are still on disk (dropping them counted the bytes as freed,
        and a refresh or lookup indexed them again), and they hold the block, so reads of it stay right."""
        failed = []
        for key in victims:
            try:
                os.unlink(self.path_of(key))
            except (FileNotFoundError, NotADirectoryError):
                # already gone (another process evicted or removed it): dropped here, not counted as this store's
                # eviction (each process's store object counted it again: a run's evictions exceeded its writes)
                self._drop_locked(key)
                continue
            except OSError as e:
                failed.append(key)
                self._stats.evict_failures += 1
                if key not in self._evict_failed:
                    self._evict_failed.add(key)
                    # (one warning per cause until an eviction succeeds: a read-only store opened with a capacity
                    # below its size logged one per block)
                    quiet, self._evict_failing = self._evict_failing == e.errno, e.errno
                    (log.debug if quiet else log.warning)(
                        "kv store %s: could not evict block %s: %s (kept%s)", self.root, key.hex(), e,
                        "" if quiet else "; other blocks that cannot be evicted for this cause are counted, stats "
                        "evict_failures, and logged at debug level",
                    )  # fmt: skip
                continue
            self._evict_failing = None
            self._drop_locked(key)
            self._stats.evictions += 1
            self._stats.bytes_evicted += self.file_nbytes
        return failed

    def pin(self, keys: Iterable[bytes]) -> None:
        keys = _key_list(keys)
        with self._lock:
            for key in keys:
                self._pins[key] += 1

    def unpin(self, keys: Iterable[bytes]) -> None:
        keys = _key_list(keys)
        with self._lock:
            for key, n in collections.Counter(keys).items():  # all checked first: a bad unpin changes nothing
                if self._pins[key] < n:
                    raise ValueError(f"unpin of block {key.hex()} that is not pinned")
            for key in keys:
                self._pins[key] -= 1
                if not self._pins[key]:
                    del self._pins[key]

    # ---- lookup -------------------------------------------------------------------------------------------
    def _stat_block(self, key: bytes, remove_damaged: bool = True) -> bool | None:
        """Whether block `key`'s file is there (and of its size); None if the file system would not say (EACCES,
        ELOOP, EIO, ESTALE...: logged; the caller takes it as a miss but does not conclude the block is gone).
        A regular file of another size is damage (a rename is atomic), removed and counted as at open (with
        `remove_damaged`; not under the lock): else no read ever reached it, and it stayed on disk uncounted."""
        if self._meta_pending and not self._meta_ready():
            return False
        path = self.path_of(key)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as e:
            log.warning("kv store %s: cannot stat block %s: %s (treated as a miss)", self.root, path, e)
            return None
        if st.st_size == self.file_nbytes:
            return True
        if remove_damaged and stat.S_ISREG(st.st_mode):
            newer = self._newer_file(path, st)
            if newer is not None:  # (a block of a newer format: a miss, left)
                self._leave_newer(path, newer)
            else:
                self._remove_corrupt(key, path, f"file size {st.st_size} B, expected {self.file_nbytes}", st=st)
        return False

    def lookup(self, keys: Sequence[bytes]) -> int:
        if isinstance(keys, str):  # (its characters were checked as keys: "got 'a'")
            raise TypeError(f"keys must be a sequence of block keys (bytes of length {KEY_NBYTES}), got a str {keys!r}")
        keys = _key_list(keys)
        hit = 0
        if not self.stat_on_hit:  # the indexed leading keys, under one lock
            with self._lock:
                while hit < len(keys) and keys[hit] in self._index:
                    self._index.move_to_end(keys[hit])
                    hit += 1
        adopted = []  # (position in keys, key) of the blocks this lookup added to the index
        # Past the index (or for every key with stat_on_hit): ask the file system, until the first absent block.
        while hit < len(keys):
            key = keys[hit]
            seen, drops = self._seq, self._drops  # (read without the lock: older values only check more)
            present = self._stat_block(key)
            with self._lock:
                if present and key not in self._index and self._drops != drops:
                    present = self._stat_block(key, False)  # (rare) it may have been indexed and evicted meanwhile
                if present:
                    if key not in self._index:
                        adopted.append((hit, key))
                    self._adopt_locked(key)
                elif present is False:
                    self._drop_absent_locked(key, seen)  # never there, or removed by another process
            if not present:
                break
            hit += 1
        with self._lock:
            # Blocks adopted from other processes count against capacity: evict others to fit them, never this
            # lookup's own hits; where even that is not enough, the adopted hits at the end are left out of the
            # index (their files stay, as before this lookup) and out of the answer.
            need = self._excess_blocks_locked() if adopted and self.capacity_bytes is not None else 0
            if need > 0:
                victims = self._victims_locked(need, protect=keys[:hit])
                # Adopted hits left out, from the end (each one less needs one victim less). Only a store already
                # over capacity (pins indexed by a refresh, writes in flight) can leave them all out: it then evicts
                # nothing (as a lookup that adopts nothing, or a read of such a block): else it lost blocks for none.
                cut = min(need - len(victims), len(adopted))
                if cut < len(adopted):  # (victims whose file could not be removed, unreplaced: as many more left out)
                    cut = min(cut + self._evict_or_replace_locked(victims[: need - cut], keys[:hit]), len(adopted))
                if cut:  # (the lookup's own hits past a left-out block leave the answer, not the index)
                    hit = adopted[-cut][0]
                    for _, key in adopted[-cut:]:
                        self._drop_locked(key)
            self._stats.lookups += 1
            self._stats.lookup_blocks += len(keys)
            self._stats.lookup_hit_blocks += hit
        return hit

    def contains(self, key: bytes) -> bool:
        _check_key(key)
        with self._lock:
            if key in self._index:
                return True
        return bool(self._stat_block(key))

    # ---- read ---------------------------------------------------------------------------------------------
    def _header_buf(self) -> np.ndarray:
        buf = getattr(self._tls, "hdr", None)
        if buf is None:
            buf = self._tls.hdr = np.zeros((self.header_nbytes,), dtype=np.uint8)
        return buf

    def _plan(self, out: Any, layers) -> tuple[np.ndarray, list[int] | None, list[tuple[int, int, int]], int]:
        """Validate `out`/`layers`; runs of (file offset, out offset, nbytes) to read, merged when adjacent, and
        the stride of the Layer Blocks in `dst` (Layer-Block bytes when packed; larger for a row-strided `out`:
        the run's Layer Blocks lie that many bytes apart in `dst`)."""
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
            return out.reshape(-1), [layer], [(self.header_nbytes + layer * lbn, 0, lbn)], lbn
        strided = _row_strided(out, lay)
        if strided is not None:  # a Full Block's rows inside a larger buffer: read in place, no staging copy
            dst, stride = strided
            if layers is None:
                return dst, None, [(self.header_nbytes, 0, fb)], stride
            layer_list = lay.normalize_layers(layers)
            out_offsets = [layer * stride for layer in layer_list]
        else:
            stride = lbn
            dst = _as_u8(out, "out", writable=True)
            if layers is None:
                if dst.nbytes != fb:
                    raise ValueError(f"out holds {dst.nbytes} B; a Full Block of {lay} is {fb} B")
                return dst, None, [(self.header_nbytes, 0, fb)], lbn
            layer_list = lay.normalize_layers(layers)
            if (
                len(layer_list) == lay.num_layers
                and isinstance(out, np.ndarray)
                and out.shape == lay.full_block_shape
                and layer_list != list(range(lay.num_layers))
            ):
                # (packed won: a contiguous [L, block_tokens, bpt] array got its layers permuted, silently, where a
                # row-strided one of the same shape is filled in place; see KVStore.read)
                raise ValueError(
                    f"ambiguous read: out has the Full Block's shape {lay.full_block_shape} and layers {layer_list} "
                    f"name all {lay.num_layers} Layer Blocks but not in ascending order: packed in the order given "
                    "or in place? Pass the layers in ascending order (in place), or for packed an out of shape "
                    f"({len(layer_list)}, {lbn}) or a flat one"
                )
            out_offsets = self._packed_offsets(dst, layer_list)
        runs: list[list[int]] = []
        for layer, o in zip(layer_list, out_offsets, strict=True):
            f = self.header_nbytes + layer * lbn
            if runs and runs[-1][0] + runs[-1][2] == f and runs[-1][1] + runs[-1][2] // lbn * stride == o:
                runs[-1][2] += lbn
            else:
                runs.append([f, o, lbn])
        return dst, layer_list, [tuple(r) for r in runs], stride

    def _packed_offsets(self, dst: np.ndarray, layer_list: list[int]) -> list[int]:
        """Where each layer goes in a contiguous `out`: packed in the order given, or in place in a Full Block."""
        lbn, fb = self._lbn, self._fb
        if dst.nbytes == len(layer_list) * lbn:
            out_offsets = [i * lbn for i in range(len(layer_list))]  # packed in the order given
        elif dst.nbytes == fb:
            out_offsets = [layer * lbn for layer in layer_list]  # in place
        else:
            raise ValueError(
                f"out holds {dst.nbytes} B; reading {len(layer_list)} Layer Blocks needs {len(layer_list) * lbn} B "
                f"(packed) or a Full Block of {fb} B"
            )
        return out_offsets

    def read(self, key: bytes, out: Any, layers: Iterable[int] | int | None = None, verify: bool | None = None) -> bool:
        _check_key(key)
        verify = _flag("verify", verify, self.verify_reads)
        dst, layer_list, runs, stride = self._plan(out, layers)
        return self._read_planned(key, dst, layer_list, runs, verify, stride)

    def submit_read(
        self, key: bytes, out: Any, layers: Iterable[int] | int | None = None, verify: bool | None = None
    ) -> Future:
        _check_key(key)
        if self._closed:
            raise RuntimeError(f"kv store {self.root} is closed")
        verify = _flag("verify", verify, self.verify_reads)  # bad arguments raise here, in the caller's thread
        dst, layer_list, runs, stride = self._plan(out, layers)
        return self._pool.submit(self._read_planned, key, dst, layer_list, runs, verify, stride)

    def read_many(
        self, keys: Sequence[bytes], outs: Sequence[Any], layers: Iterable[int] | int | None = None
    ) -> list[bool]:
        """`KVStore.read_many`; the reads must not write to the same bytes (a ValueError before any read runs).

        Reads of several blocks into overlapping buffers (one buffer passed twice, rows of two blocks that overlap)
        raced: a preadv read hashes `out` after its copy, so another read's bytes landing there meanwhile failed the
        check and the valid block was removed as corrupt (or the read returned True with the other block's bytes).
        Only reads of the same key's bytes to the same place may overlap (they write equal bytes). The check covers
        this call's buffers only: reads in flight in other calls (other threads) must not write to the same bytes
        either, which is the caller's contract, not checked (see `KVStore.read`)."""
        if len(keys) != len(outs) or getattr(self.submit_read, "__func__", None) is not LocalDirStore.submit_read:
            return super().read_many(keys, outs, layers)  # (a subclass's own submit_read: each read goes through it)
        layers = list(layers) if isinstance(layers, Iterable) else layers
        keys = list(keys)
        try:
            for k in keys:
                _check_key(k)
            verify = self.verify_reads
            plans = [self._plan(o, layers) for o in outs]
        except (TypeError, ValueError, IndexError):
            # A bad key or buffer: raised from the reads as before (those before it run, then it raises).
            return super().read_many(keys, outs, layers)
        if len(plans) > 1:
            _check_disjoint(keys, plans, self._lbn)
        if self._closed:
            raise RuntimeError(f"kv store {self.root} is closed")
        futures = []
        try:
            for k, (dst, layer_list, runs, stride) in zip(keys, plans, strict=True):
                futures.append(self._pool.submit(self._read_planned, k, dst, layer_list, runs, verify, stride))
        except BaseException:  # (the pool shut down by a close() meanwhile): no read left filling a buffer
            wait([f for f in futures if not f.cancel()])
            raise
        wait(futures)  # (all done before any result is raised: no read fills a buffer after read_many returns)
        return [f.result() for f in futures]

    # Open block files are cached (`fd_cache` of them, LRU): layerwise loading reads each block L times, and an
    # entry also keeps the block's checked header. Safe by construction: an fd reads the inode it opened, whose
    # bytes are this key's KV or fail the checks (another process replacing or unlinking the path leaves it
    # intact); a cached file deleted elsewhere keeps its disk space until its entry is dropped.
    def _acquire_fd(self, key: bytes, path: str) -> _OpenBlock:
        pending = None
        with self._lock:
            ent = self._fds.get(key)
            if ent is not None:
                ent.refs += 1
                self._fds.move_to_end(key)
                return ent
            if self._fd_cache:
                pending = _PendingOpen()
                self._opening.setdefault(key, []).append(pending)
        try:
            try:
                fd = _open_block(path)  # FileNotFoundError: absent
            except OSError as e:
                if e.errno not in (errno.EMFILE, errno.ENFILE) or not self._shrink_fd_cache(e):
                    raise
                fd = _open_block(path)  # (once more, with cached files closed)
        except BaseException:
            if pending is not None:
                with self._lock:
                    self._unmark_locked(key, pending)
            raise
        ent = _OpenBlock(fd)
        if pending is None:
            return ent
        evicted = []
        with self._lock:
            self._unmark_locked(key, pending)
            other = self._fds.get(key)
            if pending.stale:  # removed or replaced while we opened it: this read reads what it opened, uncached
                other = None
            elif other is not None:  # another thread opened it meanwhile: use theirs
                other.refs += 1
                self._fds.move_to_end(key)
            else:
                self._fds[key] = ent
                ent.cached = True
                while len(self._fds) > self._fd_cache:
                    _, old = self._fds.popitem(last=False)
                    old.cached = False
                    if not old.refs:
                        evicted.append(old)
        for old in evicted:  # unmapped and closed outside the lock: no read can reach them any more
            old.close()
        if other is not None:
            os.close(fd)
            return other
        return ent

    def _shrink_fd_cache(self, err: OSError) -> bool:
        """An open failed with EMFILE/ENFILE: halve the fd cache for good (its LRU files closed once no read uses
        them), logged; whether it held any file to close."""
        closed = []
        with self._lock:
            if not self._fds:
                return False
            old, self._fd_cache = self._fd_cache, len(self._fds) // 2
            while len(self._fds) > self._fd_cache:
                _, ent = self._fds.popitem(last=False)
                ent.cached = False
                if not ent.refs:
                    closed.append(ent)
        for ent in closed:
            ent.close()
        log.warning(
            "kv store %s: out of file descriptors opening or mapping a block file (%s; RLIMIT_NOFILE %s): fd_cache "
            "lowered from %d to %d",
            self.root, err.strerror, _nofile_limit(), old, self._fd_cache,
        )  # fmt: skip
        return True

    def _release_fd(self, ent: _OpenBlock) -> None:
        with self._lock:
            ent.refs -= 1
            if ent.refs or ent.cached:
                return
        ent.close()

    def _unmark_locked(self, key: bytes, pending: _PendingOpen) -> None:
        opening = self._opening.get(key)
        if opening is not None:
            opening[:] = [p for p in opening if p is not pending]
            if not opening:
                del self._opening[key]

    def _forget_fd_locked(self, key: bytes) -> None:
        """Drop a cached fd (its block was removed, replaced, evicted or found corrupt); closed once no read uses
        it. Opens of the key in progress are marked stale: their fds are not cached."""
        opening = self._opening.get(key)
        if opening is not None:
            for pending in opening:
                pending.stale = True
        ent = self._fds.pop(key, None)
        if ent is not None:
            ent.cached = False
            if not ent.refs:
                ent.close()

    def _read_planned(self, key: bytes, dst: np.ndarray, layer_list, runs, verify: bool, stride: int = 0) -> bool:
        if self._meta_pending and not self._meta_ready():
            with self._lock:
                self._stats.read_absent += 1
            return False
        stride = stride or self._lbn
        path = self.path_of(key)
        with self._lock:
            self._busy[key] += 1  # (not evicted meanwhile; apart from the callers' pins)
            seen, drop_seq = self._seq, self._drop_seq
            indexed = key in self._index
        try:
            try:
                ent = self._acquire_fd(key, path)
            except (FileNotFoundError, NotADirectoryError):
                log.debug("kv store %s: block %s absent (a miss)", self.root, key.hex())
                with self._lock:
                    self._drop_absent_locked(key, seen)  # (unless a write landed meanwhile)
                    self._stats.read_absent += 1
                return False
            except _NotABlockFile as e:  # a FIFO, a directory...: removed where possible, never read
                if not _is_regular_file(path):  # (not if a writer has put a block there since)
                    self._remove_corrupt(key, path, str(e))
                with self._lock:
                    self._stats.read_corrupt += 1
                return False
            except OSError as e:  # EACCES, EMFILE, ESTALE, EIO...: a miss like any other I/O error, block left
                self._read_failed("opening", path, e)
                return False
            try:
                if verify and self._mmap_min is not None and self._read_size(dst, runs, stride) >= self._mmap_min:
                    # The first such read(s) of an open file preadv, later ones map it (and keep the mapping):
                    # faulting in a fresh mapping's pages costs about what hashing in the page cache saves.
                    if ent.mapping is not None or ent.preadv_reads >= self.mmap_after_reads:
                        reason = self._read_mapped(ent, key, dst, layer_list, runs, stride)
                    else:
                        ent.preadv_reads += 1
                        reason = self._read_fd(ent, key, dst, layer_list, runs, verify, stride)
                else:
                    reason = self._read_fd(ent, key, dst, layer_list, runs, verify, stride)
                if isinstance(reason, _NewerBlock):
                    self._leave_newer(path, reason, read=True)
                    return False
                if reason is not None:
                    self._remove_corrupt(key, path, reason, fd=ent.fd)
                    with self._lock:
                        self._stats.read_corrupt += 1
                    return False
            except OSError as e:
                with self._lock:
                    self._forget_fd_locked(key)
                self._read_failed("reading", path, e)
                return False
            finally:
                self._release_fd(ent)
            nbytes = sum(r[2] for r in runs)
            touch = None
            with self._lock:
                # (not if removed meanwhile: its file is gone; read through the fd opened before)
                if key in self._index or not (indexed or self._dropped_since_locked(key, drop_seq)):
                    self._adopt_fitting_locked(key)
                    if self._touch_s is not None and key in self._index:
                        self._used_keys.add(key)  # (its file's mtime: set by the next batch of touches)
                        if not self._stats.read_hits % _TOUCH_CHECK_HITS and time.monotonic() >= self._touch_due:
                            touch = self._take_used_locked()
                self._stats.read_hits += 1
                self._stats.bytes_read += nbytes
                self._read_failing = None  # (a read failing again is said again)
            if touch:
                self._touch_used(touch, background=True)
            return True
        finally:
            with self._lock:
                self._unbusy_locked(key)

    def _read_size(self, dst: np.ndarray, runs, stride: int) -> int:
        """The bytes the mmap and non-temporal thresholds judge a read by: the destination's for a contiguous
        `out` (as before row-strided reads), the bytes read for a row-strided one (its span holds other rows)."""
        return dst.nbytes if stride == self._lbn else sum(r[2] for r in runs)

    def _check_header(self, ent: _OpenBlock, key: bytes, hdr) -> tuple[str, list[int], np.ndarray | None] | str:
        """(algo, per-layer sums, the sums as uint64 for the compiled loops (xxh3 only)) of header bytes `hdr`
        (header_nbytes of them), or why they are not this block's.

        Bytes equal to those an earlier read of this open file checked are not parsed again (a file changed in
        place is still caught: its bytes differ)."""
        raw = bytes(hdr[: self._hdr_used])
        h = ent.header  # (read once: another reader of this file may replace it)
        if h is not None and h[2] == raw:
            return h[0], h[1], h[3]
        try:
            algo, stored = block_file.parse_header(hdr, self.layout, key, self._fp_digest)
        except block_file.BlockOfNewerFormat as e:
            return _NewerBlock(e)
        except block_file.BlockFormatError as e:
            return str(e)
        sums = np.array(stored, dtype=np.uint64) if algo == "xxh3" else None  # a copy, as below
        stored = stored.tolist()  # ints, not a view of `hdr` (a scratch buffer or a mapping)
        ent.header = (algo, stored, raw, sums)  # one tuple: a reader never pairs one header's sums with another's
        return algo, stored, sums

    def _layer_header(self, ent: _OpenBlock, key: bytes) -> tuple[str, list[int], np.ndarray | None] | str:
        """The checked header of a Layer-Block read: cached with the open file, else preadv'ed and checked."""
        h = ent.header
        if h is not None:  # checked when this fd first read the block
            return h[0], h[1], h[3]
        hdr = self._header_buf()
        got = os.preadv(ent.fd, [hdr], 0)
        if got != self.header_nbytes:
            return f"truncated: header is {got} of {self.header_nbytes} B"
        checked = self._check_header(ent, key, hdr)
        if isinstance(checked, str):
            return checked
        size = os.fstat(ent.fd).st_size  # a layer read must not pass on a block truncated elsewhere
        if size != self.file_nbytes:
            return f"truncated: file is {size} B, expected {self.file_nbytes}"
        return checked

    def _bring_in_if_cold(self, fd: int) -> None:
        """With `populate_cold`: if the block file is not all in the page cache, bring it in through a
        huge-page-advised mapping (`_populate_block`). Called by Full-Block preadv reads only: a Layer-Block read
        of a cold block would wait for the whole block (a 16 MiB Qwen2.5-32B block: its first layer 6 ms instead of
        0.5 ms, and all its layers read one by one no sooner), where readahead streams the layers as they are read."""
        if not self._populate:
            return
        cached = _cached_pages(fd)
        if cached is None:
            self._populate = False
            err = ctypes.get_errno()
            log.info("kv store %s: no cachestat here (%s): cold blocks use readahead", self.root, os.strerror(err))
        elif cached < self._file_pages:
            self._populate_block(fd)

    def _populate_block(self, fd: int) -> None:
        """Bring a block file's pages into the page cache through a mapping advised MADV_HUGEPAGE (2 MiB folios where
        the file system has them) and populated (`_populate_huge`). A short or unreadable file is left to the
        preadv that follows, which reports it."""
        size = min(os.fstat(fd).st_size, self.file_nbytes)
        if size <= 0:
            return
        err = _populate_huge(fd, size)
        if not err:
            with self._lock:
                self._stats.cold_populated += 1
        elif err in (errno.ENODEV, errno.EACCES, errno.EINVAL, errno.ENOSYS, errno.EPERM):
            # a file system that cannot map block files, or a kernel before 5.14 (no MADV_POPULATE_READ)
            self._populate = False
            log.info(
                "kv store %s: cannot populate block files (%s): cold blocks use readahead", self.root, os.strerror(err)
            )

    def _segments(self, layer_list, runs) -> list[tuple[int, int, int, int]]:
        """(file offset, out offset, nbytes, first layer) of each run of consecutive layers."""
        if layer_list is None:
            return [(self.header_nbytes, 0, self._fb, 0)]
        if len(runs) == 1:
            return [(*runs[0], layer_list[0])]
        segments = []
        i = 0
        for file_off, out_off, n in runs:
            segments.append((file_off, out_off, n, layer_list[i]))
            i += n // self._lbn
        return segments

    def _read_fd(self, ent: _OpenBlock, key: bytes, dst, layer_list, runs, verify: bool, stride: int = 0) -> str | None:
        """Read with preadv; None if `dst` now holds the verified bytes, else why the block is corrupt.

        Verified reads are chunked: each `preadv` fills a chunk of whole Layer Blocks (`read_chunk_bytes`, rounded
        down, at least one) and that chunk is checked right after the copy (while the bytes are in cache) against
        the header's sums of exactly its layers; the first bad chunk ends the read (a miss). A Full-Block read
        gets the header with its first chunk (unverified: with the whole block, in one syscall). A row-strided
        `dst` (`stride` > Layer-Block bytes) gets one iovec per Layer Block of a chunk.
        """
        fd = ent.fd
        lbn = self._lbn
        stride = stride or lbn
        hdr_n = self.header_nbytes
        step = self._step
        if layer_list is None:
            n0 = step if verify else self._fb
            fresh = ent.header is None  # (this open file's size is checked with its header, as a layer read does)
            hdr = self._header_buf()
            want = hdr_n + n0
            self._bring_in_if_cold(fd)
            got = os.preadv(fd, [hdr, *_rows(dst, 0, n0, stride, lbn)], 0)  # header + first chunk, one syscall
            if got != want:
                if got >= hdr_n:  # name the real problem if the header already tells it
                    checked = self._check_header(ent, key, hdr)
                    if isinstance(checked, str):
                        return checked
                return f"truncated: read {got} of {want} B"
            checked = self._check_header(ent, key, hdr)
            if fresh and not isinstance(checked, str):  # a longer file (bytes appended) is not a block either
                size = os.fstat(fd).st_size
                if size != self.file_nbytes:
                    why = "truncated" if size < self.file_nbytes else "bytes appended"
                    return f"{why}: file is {size} B, expected {self.file_nbytes}"
        else:
            checked = self._layer_header(ent, key)
        if isinstance(checked, str):
            return checked
        if not verify and layer_list is None:
            return None
        algo, stored, sums = checked
        native = self._native if verify and algo == "xxh3" else None
        for file_off, out_off, n, layer0 in self._segments(layer_list, runs):
            if native is not None:  # the same chunks, read and hashed in C
                start = step if layer_list is None else 0  # (a Full Block's first chunk came with the header)
                if start:
                    bad = native.bad_layers(
                        _span(dst, out_off, start, stride, lbn), lbn, sums, layer0, start // lbn, stride
                    )
                    if bad:
                        return _mismatch(bad)
                if start < n:
                    piece = _span(dst, out_off + start // lbn * stride, n - start, stride, lbn)
                    got, bad = native.pread_verified(
                        fd, piece, file_off + start, lbn, sums, layer0 + start // lbn, step, (n - start) // lbn, stride
                    )  # fmt: skip
                    if bad:
                        return _mismatch(bad)
                    if got != n - start:
                        return f"truncated: read {got} of {n - start} B at offset {file_off + start}"
                continue
            for off in range(0, n, step if verify else n):
                m = min(step, n - off) if verify else n
                pieces = _rows(dst, out_off + off // lbn * stride, m, stride, lbn)
                if layer_list is not None or off:  # (a Full Block's first chunk came with the header)
                    got = os.preadv(fd, pieces, file_off + off)
                    if got != m:
                        return f"truncated: read {got} of {m} B at offset {file_off + off}"
                if verify:
                    reason = self._check_chunk(pieces, layer0 + off // lbn, algo, stored)
                    if reason is not None:
                        return reason
        return None

    def _check_chunk(self, pieces: list[np.ndarray], first: int, algo: str, stored: list[int]) -> str | None:
        """None if the Layer Blocks in `pieces` (each of whole Layer Blocks; layers first, first+1, ... in order)
        match their header sums."""
        got_sums = []
        for piece in pieces:
            got_sums += block_file.layer_checksum_list(piece, self._lbn, algo)
        want_sums = stored[first : first + len(got_sums)]
        if got_sums == want_sums:
            return None
        bad = [first + j for j, (a, b) in enumerate(zip(got_sums, want_sums, strict=True)) if a != b]
        return _mismatch(bad)

    def _read_mapped(self, ent: _OpenBlock, key: bytes, dst, layer_list, runs, stride: int = 0) -> str | None:
        """A verified read through a read-only mapping of the block file (read_method="mmap"); as _read_fd.

        Each chunk is hashed in the page cache through the mapping, compared, and only then copied into `dst`
        (from cache), so `dst` only receives checked bytes (unless the file is modified in place between the hash
        and the copy: see the module docstring). The open file is mapped once (with its fd, so that
        re-reads fault in no pages: a fresh mapping of a 2.4 MiB block costs ~40 us of page faults here when its
        pages are in large folios, ~250-370 us in 4 KiB ones; the MADV_HUGEPAGE advice keeps the pages that this
        read brings back from the disk in large folios), and only while it is exactly `file_nbytes` (checked on
        every read): touching a mapping past the end of its file is SIGBUS (see the module docstring).
        """
        size = os.fstat(ent.fd).st_size
        if size != self.file_nbytes:
            hdr = self._header_buf()
            if size >= self.header_nbytes and os.preadv(ent.fd, [hdr], 0) == self.header_nbytes:
                checked = self._check_header(ent, key, hdr)  # name the real problem if the header tells it
                if isinstance(checked, str):
                    return checked
            return f"truncated: file is {size} B, expected {self.file_nbytes}"
        mapping = ent.mapping
        if mapping is None:  # first mapped read of this open file: map it for as long as the fd lives
            try:
                try:
                    mapping = mmap.mmap(ent.fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
                except OSError as e:  # (the mapping keeps a dup of the fd: EMFILE as an open, see _acquire_fd)
                    if e.errno not in (errno.EMFILE, errno.ENFILE) or not self._shrink_fd_cache(e):
                        raise
                    mapping = mmap.mmap(ent.fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
            except ValueError as e:  # (mmap checks the size again: the file shrank since the fstat above)
                return f"truncated: {e}"
            except OSError as e:
                if e.errno != errno.ENOMEM:
                    raise
                # No room for another mapping (vm.max_map_count, RLIMIT_AS): the open file reads with preadv instead
                # (it was a miss, and every block not mapped yet missed for good while the others stayed mapped)
                if not self._map_failed:
                    self._map_failed = True
                    log.warning(
                        "kv store %s: cannot map a block file (%s: the process is at vm.max_map_count or its address "
                        "space limit, RLIMIT_AS / ulimit -v; fd_cache=%d keeps up to that many mappings): such reads "
                        "use preadv", self.root, e.strerror, self._fd_cache,
                    )  # fmt: skip
                return self._read_fd(ent, key, dst, layer_list, runs, True, stride)
            if _MADV_HUGEPAGE is not None:  # before any page is touched (see _MADV_HUGEPAGE)
                try:
                    mapping.madvise(_MADV_HUGEPAGE)
                except OSError:  # a kernel without transparent huge pages: map as usual
                    pass
            with self._lock:
                mine, mapping = mapping, ent.mapping or mapping  # another reader may have mapped it meanwhile
                ent.mapping = mapping
            if mine is not mapping:
                mine.close()
        src = memoryview(mapping)
        out = memoryview(dst)
        try:
            if layer_list is None:
                checked = self._check_header(ent, key, src[: self.header_nbytes])
            else:
                checked = self._layer_header(ent, key)
            if isinstance(checked, str):
                return checked
            algo, stored, sums = checked
            lbn, step = self._lbn, self._step
            stride = stride or lbn
            native = self._native if algo == "xxh3" else None
            nt = (
                self.nontemporal_min_bytes is not None
                and self._read_size(dst, runs, stride) >= self.nontemporal_min_bytes
            )
            for file_off, out_off, n, layer0 in self._segments(layer_list, runs):
                if native is not None:  # each Layer Block hashed in the page cache, then copied, in C
                    span = out[out_off : out_off + (n // lbn - 1) * stride + lbn]
                    bad = native.copy_verified(src[file_off : file_off + n], span, lbn, sums, layer0, nt, stride)
                    if bad:
                        return _mismatch(bad)
                    continue
                for off in range(0, n, step):
                    m = min(step, n - off)
                    a = file_off + off
                    reason = self._check_chunk(
                        [np.frombuffer(src[a : a + m], np.uint8)], layer0 + off // lbn, algo, stored
                    )
                    if reason is not None:
                        return reason
                    if stride == lbn:
                        out[out_off + off : out_off + off + m] = src[a : a + m]
                    else:
                        o = out_off + off // lbn * stride
                        for i in range(m // lbn):
                            out[o + i * stride : o + i * stride + lbn] = src[a + i * lbn : a + (i + 1) * lbn]
            return None
        finally:
            out.release()
            src.release()

    def _newer_file(self, path: str, st: os.stat_result) -> _NewerBlock | None:
        """Why a block file of another size than this store's is a newer dualpath-jax's block (its header names a
        newer format version), or None (damage). One small read, of such files only."""
        try:
            with open(path, "rb") as f:
                now = os.fstat(f.fileno())
                if (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev):
                    return None  # (replaced meanwhile: the caller judges the file it stat'ed)
                version = block_file.newer_format_version(f.read(12))
        except OSError:
            return None
        if version is None:
            return None
        return _NewerBlock(
            f"format version {version}, this code reads {block_file.FORMAT_VERSION}; file size {st.st_size} B"
        )

    def _leave_newer(self, path: str, reason: str, read: bool = False) -> None:
        """A block a newer dualpath-jax wrote (`reason`): a miss that leaves the file, counted (`newer_format_blocks`,
        and `read_newer_format` for a read), the first logged as a warning and the rest at debug level (a mixed-
        version deployment meets one per block)."""
        with self._lock:
            self._stats.newer_format_blocks += 1
            if read:
                self._stats.read_newer_format += 1
            quiet, self._newer_said = self._newer_said, True
        (log.debug if quiet else log.warning)(
            "kv store %s: block %s was written by a newer dualpath-jax (%s): a miss, left in place (a write of its key "
            "replaces it)%s", self.root, path, reason,
            "" if quiet else "; the next such blocks are counted (stats newer_format_blocks), logged at debug level",
        )  # fmt: skip

    def _remove_corrupt(
        self, key: bytes, path: str, reason: str, fd: int | None = None, st: os.stat_result | None = None
    ) -> None:
        """Log, count and delete a corrupt block (only if `path` is still the file we judged: open as `fd`, or
        stat'ed as `st`)."""
        changed = self._root_changed()
        if changed is not None:  # not this store's directory any more: its files are not ours to remove
            log.warning(
                "kv store %s: block %s is not a block of this store (%s): a miss, not removed: %s %s since the store "
                "was opened", self.root, path, reason, self._blocks_dir, changed,
            )  # fmt: skip
            with self._lock:
                self._drop_locked(key)
            return
        seen = self._seq  # (see remove)
        file_id = None
        try:
            st_now = os.stat(path)
            file_id = (st_now.st_ino, st_now.st_dev)
            if fd is not None or st is not None:
                st_read = os.fstat(fd) if st is None else st
                if (st_read.st_ino, st_read.st_dev) != file_id:
                    with self._lock:  # a writer replaced it meanwhile: keep the new file, drop the old one's fd
                        self._forget_fd_locked(key)
                    return
            if self._corrupt_left.get(key) == file_id:  # the file that could not be removed: logged, counted once
                with self._lock:
                    self._drop_unlinked_locked(key, seen)
                return
            try:
                os.unlink(path)
            except IsADirectoryError:  # (a directory where the block should be: removed if empty)
                os.rmdir(path)
        except FileNotFoundError:
            log.warning(
                "kv store %s: corrupt block %s (%s): removed already, treated as a miss", self.root, path, reason
            )
        except OSError as e:  # (a read-only mount, say: still a counted miss, out of the index; the store opens)
            if file_id is not None:
                self._corrupt_left[key] = file_id  # (every later access of it was logged and counted again)
            log.warning(
                "kv store %s: could not remove corrupt block %s (%s): %s; left on disk, treated as a miss (later "
                "accesses of this file miss without a line or a count)", self.root, path, reason, e,
            )  # fmt: skip
        else:
            self._corrupt_left.pop(key, None)
            log.warning("kv store %s: corrupt block %s (%s): removed, treated as a miss", self.root, path, reason)
        with self._lock:
            self._drop_unlinked_locked(key, seen)
            self._stats.corrupt_blocks += 1

    # ---- write --------------------------------------------------------------------------------------------
    def write(self, key: bytes, full_block: Any, durable: bool | None = None, overwrite: bool = False) -> bool:
        _check_key(key)
        src = _as_u8(full_block, "full_block", writable=False)
        lay = self.layout
        if src.nbytes != lay.full_block_nbytes:
            raise ValueError(f"full_block holds {src.nbytes} B; a Full Block of {lay} is {lay.full_block_nbytes} B")
        durable = _flag("durable", durable, self.durable)
        overwrite = _flag("overwrite", overwrite, False)
        path = self.path_of(key)
        if self._meta_pending and not self._meta_ready():  # (never a block without STORE.json: its warning said so)
            log.debug("kv store %s: block %s not stored: the store is not made yet (a full disk)", self.root, key.hex())
            with self._lock:
                self._stats.write_errors += 1
            return False
        changed = self._root_changed()
        if changed is not None:  # (not into another directory put in its place, nor a new one made by the write)
            quiet = self._failing_again(f"the store directory {changed}")
            (log.debug if quiet else log.warning)(
                "kv store %s: writing block %s failed: the store directory %s %s since the store was opened (not "
                "stored; reopen the store%s)", self.root, key.hex(), self._blocks_dir, changed,
                "" if quiet else _COUNTED_FROM_HERE,
            )  # fmt: skip
            with self._lock:
                self._stats.write_errors += 1
            return False
        if not overwrite:
            with self._lock:
                self._busy[key] += 1  # (not evicted while it is checked)
                drop_seq = self._drop_seq
            try:
                # (the file, not the index: it may be stale; checked whole: a damaged file is written over; durable:
                # a non-durable write may have stored it, so fsync it)
                if self._stat_block(key) and self._stored_block_ok(key, path) and (not durable or _fsync_block(path)):
                    dedup, touch = False, None
                    with self._lock:
                        # (unless this store removed it since the stat, e.g. a remove() in another thread: then it is
                        # gone, so write it again; before, the write returned True with no block stored)
                        if not self._dropped_since_locked(key, drop_seq):
                            self._adopt_fitting_locked(key)
                            self._stats.write_dedup += 1
                            dedup = True
                            touch = self._note_use_locked(key)
                    if touch:
                        self._touch_used(touch, background=True)
                    if dedup:
                        return True
            finally:
                with self._lock:
                    self._unbusy_locked(key)
        self._sweep_temps(os.path.dirname(path))
        with self._lock:
            # Room is only checked here; blocks are evicted for this one once it is stored (below), so a write that
            # fails (a full disk, EIO) costs no stored block.
            if not self._evict_to_fit_locked(0 if key in self._index else self.file_nbytes, partial=False, evict=False):
                self._stats.write_rejected += 1
                # One warning per spell of refusals (a store of one block logged 159 for 192 turns): the rest are
                # counted (write_rejected) at debug level until a write is stored. It said "X B of blocks, each
                # pinned..." where the blocks could be evicted but writes in flight held the rest of the room.
                quiet, self._no_room = self._no_room, True
                held = 0  # (a walk of the index: only for a line that is logged)
                if not quiet or log.isEnabledFor(logging.DEBUG):
                    held = sum(1 for k in self._index if self._pins[k] or self._busy[k]) * self.file_nbytes
                (log.debug if quiet else log.warning)(
                    "kv store %s: no room for block %s (capacity %s B: %d B of blocks, %d B of them pinned or being "
                    "read or written, and %d B reserved by writes in flight): not stored%s",
                    self.root, key.hex(), self.capacity_bytes, self._used, held, self._reserved,
                    "" if quiet else "; the next refusals are counted (stats write_rejected), not logged, until a "
                    "write is stored",
                )  # fmt: skip
                return False
            self._reserved += self.file_nbytes
            self._busy[key] += 1  # (an indexed key being rewritten is not evicted until it is indexed anew)
            drop_seq = self._drop_seq
        done = False
        landed = []  # once the block is renamed into place, its file counts, not its reserved room: a lookup, read or
        # refresh may index it before this write does (it counted twice: one more block evicted than needed)

        def renamed() -> None:
            with self._lock:
                self._reserved -= self.file_nbytes
                landed.append(True)

        try:
            sums = block_file.layer_checksums(src.reshape(lay.num_layers, lay.layer_block_nbytes), self.checksum)
            header = block_file.pack_header(lay, key, sums, self.checksum)
            self._write_file(path, key, header, src, durable, renamed)
            done = True
            self._disk_full = False  # (a full disk again is said again)
            self._no_room = False  # (and so is no room)
            self._write_failing = None  # (and so is any other failure)
        except OSError as e:
            # Persisting KV is best effort (the block can be recomputed): a full disk, a vanished directory or a
            # temp file removed by another host's cleanup must not take the engine down. Logged and counted.
            hint, quiet = "", False
            if e.errno in (errno.ENOSPC, errno.EDQUOT):  # (it stays full: blocks are evicted for capacity_bytes only)
                hint = (
                    f"; the disk is full with {self.used_bytes} B of blocks indexed here (no space or no inodes "
                    f"left), capacity_bytes={self.capacity_bytes}: nothing is evicted for a full disk, so "
                    "capacity_bytes must leave room on it for the writes in flight; the next writes that fail for a "
                    "full disk are counted (stats write_errors), not logged, until one succeeds"
                )
                with self._lock:  # (one warning per full-disk spell: a 64-turn run logged 859 of them)
                    quiet, self._disk_full = self._disk_full, True
            else:  # (one per spell of a failure of the same errno too: a read-only remount logged one per write)
                quiet = self._failing_again(f"errno {e.errno}")
                hint = "" if quiet else _COUNTED_FROM_HERE
            (log.debug if quiet else log.warning)(
                "kv store %s: writing block %s failed: %s (not stored%s)", self.root, key.hex(), e, hint
            )
            with self._lock:
                self._stats.write_errors += 1
            return False
        finally:
            touch = None
            with self._lock:
                if not landed:
                    self._reserved -= self.file_nbytes
                # Stored: now evict others to fit it (a key still indexed was replaced in place: no bytes added).
                incoming = 0 if key in self._index else self.file_nbytes
                if done and not self._evict_to_fit_locked(incoming, partial=False) and incoming:
                    done = False  # every other block was pinned meanwhile: the new one goes instead
                    self._stats.write_rejected += 1
                    log.warning("kv store %s: no room left for block %s once written: removed", self.root, key.hex())
                    try:
                        os.unlink(path)
                    except OSError:
                        pass
                    self._drop_locked(key)  # (a refresh in progress must not index it from its listing)
                # (a remove() or a corrupt block's removal in another thread may have unlinked the block once it
                # landed: then it is not indexed; a stat under the lock, only if the key was dropped meanwhile)
                gone = done and self._dropped_since_locked(key, drop_seq) and not self._stat_block(key, False)
                self._unbusy_locked(key)
                if done:
                    self._forget_fd_locked(key)  # an overwrite replaced the file: read the new one from now on
                    if not gone:
                        self._adopt_locked(key)
                        self._used_keys.discard(key)  # (its file's mtime: now, unless the clock is behind the
                        if self._touch_s is not None:  # newest LRU stamp: then the next batch stamps it too)
                            self._written_keys.add(key)
                            if time.monotonic() >= self._touch_due:
                                touch = self._take_used_locked()
                    self._stats.writes += 1
                    self._stats.bytes_written += self.file_nbytes
        if touch:
            self._touch_used(touch, background=True)
        return done

    def verify(self, key: bytes) -> bool:
        """Whether `key` is stored and whole (see `KVStore.verify`): the check of a dedup write (`_stored_block_ok`:
        the file at `path_of(key)`, opened uncached, read whole into a per-thread scratch block and verified), not
        counted as a read. A damaged block is removed (`corrupt_blocks`), an absent one leaves the index; a good one
        is used as a read hit is (LRU; indexed, evicting others to fit it, if another process wrote it)."""
        _check_key(key)
        if self._meta_pending and not self._meta_ready():
            return False
        path = self.path_of(key)
        with self._lock:
            self._busy[key] += 1  # (not evicted meanwhile, as a read)
            seen, drop_seq = self._seq, self._drop_seq
            indexed = key in self._index
        try:
            ok = self._stored_block_ok(key, path, seen)
            if ok:
                touch = None
                with self._lock:
                    # (not if removed meanwhile: its file is gone)
                    if key in self._index or not (indexed or self._dropped_since_locked(key, drop_seq)):
                        self._adopt_fitting_locked(key)
                        touch = self._note_use_locked(key)
                if touch:
                    self._touch_used(touch, background=True)
            return ok
        finally:
            with self._lock:
                self._unbusy_locked(key)

    def _stored_block_ok(self, key: bytes, path: str, seen: int | None = None) -> bool:
        """Whether the file at `path` is a good block of `key` (header, size and every Layer Block's checksum, as
        a verified read checks them); a damaged one is removed (counted), so a dedup write stores the good bytes
        instead of trusting a file of the right size. With `seen` (the generation when the check began), an
        absent block leaves the index (unless adopted since), as a read's miss does."""
        try:
            ent = _OpenBlock(_open_block(path))
        except (FileNotFoundError, NotADirectoryError):  # (gone meanwhile: a write goes ahead)
            if seen is not None:
                with self._lock:
                    self._drop_absent_locked(key, seen)
            return False
        except _NotABlockFile as e:  # a FIFO, a directory...: removed where possible, as a read does
            if not _is_regular_file(path):  # (not if a writer has put a block there since)
                self._remove_corrupt(key, path, str(e))
            return False
        except OSError as e:  # (EACCES, EIO: the block is left; a write goes ahead)
            log.warning("kv store %s: cannot open block %s to check it: %s", self.root, path, e)
            return False
        try:
            dst = getattr(self._tls, "scratch", None)
            if dst is None:
                dst = self._tls.scratch = np.empty((self._fb,), np.uint8)
            reason = self._read_fd(ent, key, dst, None, [(self.header_nbytes, 0, self._fb)], True)
            if isinstance(reason, _NewerBlock):  # (left: a write goes ahead and replaces it)
                self._leave_newer(path, reason)
            elif reason is not None:
                self._remove_corrupt(key, path, reason, fd=ent.fd)
            return reason is None
        except OSError as e:
            log.warning("kv store %s: cannot check stored block %s: %s (written again)", self.root, path, e)
            return False
        finally:
            ent.close()

    def submit_write(self, key: bytes, full_block: Any, durable: bool | None = None) -> Future:
        _check_key(key)
        if self._closed:
            raise RuntimeError(f"kv store {self.root} is closed")
        src = _as_u8(full_block, "full_block", writable=False)  # bad arguments raise here, in the caller's thread
        durable = _flag("durable", durable, self.durable)
        if src.nbytes != self.layout.full_block_nbytes:
            raise ValueError(
                f"full_block holds {src.nbytes} B; a Full Block of {self.layout} is {self.layout.full_block_nbytes} B"
            )
        return self._write_pool.submit(self.write, key, src, durable)

    def _write_file(
        self,
        path: str,
        key: bytes,
        header: bytearray,
        src: np.ndarray,
        durable: bool,
        renamed: Callable[[], None] | None = None,
    ) -> None:
        """Temp file in the block's directory -> fsync (durable) -> rename (then `renamed()`) -> fsync of the
        directory (durable)."""
        d = os.path.dirname(path)
        tmp = os.path.join(d, f"{_TMP_PREFIX}{self._host}.{os.getpid()}.{secrets.token_hex(4)}.{key.hex()}")
        new_dir = False
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileNotFoundError:  # the first block of its fan-out directory (or the directory was removed)
            os.makedirs(d, exist_ok=True)
            new_dir = True
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        held = None
        try:
            try:
                try:
                    held = _hold_while_written(fd)  # (until renamed: `_written_now`)
                    _write_all(fd, [memoryview(header), memoryview(src)])
                    if durable:
                        os.fsync(fd)
                finally:
                    os.close(fd)  # (before the rename: a network file system reports a failed write here)
                try:
                    os.replace(tmp, path)
                except IsADirectoryError:  # a directory where the block should be: replaced if it is empty
                    os.rmdir(path)
                    os.replace(tmp, path)
            finally:
                if held is not None:
                    os.close(held)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        if renamed is not None:
            renamed()
        if durable:
            try:
                _fsync_dir(d)
                # blocks/ holds the fan-out directory's entry: a non-durable write may have made that directory, and
                # a durable write into it then lost its block with the directory in a power loss. Synced once per
                # fan-out directory and store object.
                if new_dir or d not in self._synced_dirs:
                    _fsync_dir(self._blocks_dir)
                    self._synced_dirs.add(d)
            except OSError:  # (EIO) not durable, so not stored: a failed write leaves no unindexed block behind
                try:
                    os.unlink(path)
                except OSError:
                    pass
                with self._lock:
                    self._drop_locked(key)  # (an overwrite: the old block was replaced, then removed)
                raise

    def remove(self, key: bytes) -> bool:
        _check_key(key)
        path = self.path_of(key)
        changed = self._root_changed()
        if changed is not None:  # (a file there of this name is another store's block: False, as for no block)
            log.warning(
                "kv store %s: block %s not removed: the store directory %s %s since the store was opened (reopen the "
                "store)", self.root, key.hex(), self._blocks_dir, changed,
            )  # fmt: skip
            with self._lock:
                self._drop_locked(key)
            return False
        existed = kept = False
        seen = self._seq  # (read without the lock: an older value only stats more)
        try:
            os.unlink(path)
            existed = True
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError:  # raised; a block file still there (EROFS, EACCES) stays indexed and counted, as a failed
            kept = _is_regular_file(path)  # eviction's: it reads (dropped, its bytes on disk went uncounted)
            raise
        finally:  # an unlink that fails otherwise (a directory there) leaves no stale index entry
            if not kept:
                with self._lock:
                    self._drop_unlinked_locked(key, seen)
        return existed

    # ---- misc ---------------------------------------------------------------------------------------------
    def keys(self) -> list[bytes]:
        """Keys in this process's index, least recently used first."""
        with self._lock:
            return list(self._index)

    def refresh(self) -> None:
        """Rescan the directory (adopt blocks written by others, forget removed ones); LRU order resets to the files'
        mtimes (this process's uses not yet written there are written first, see `lru_touch_s`). A block this
        process removes or evicts while the scan runs is not indexed again (its file may have been listed first).
        A RuntimeError, touching nothing, if the store's directory was removed or replaced since it was opened."""
        if self._meta_pending and not self._meta_ready():  # (no store made yet: nothing to scan)
            return
        changed = self._root_changed()
        if changed is not None:  # (another store's blocks there would be removed as damage, or indexed and evicted)
            raise RuntimeError(
                f"kv store {self.root}: its directory {self._blocks_dir} {changed} since the store was opened; "
                "reopen the store"
            )
        self._touch_used()  # (the order it rebuilds is the files' mtimes: this process's recent uses go there first)
        self._scan()

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used

    def stats(self) -> StoreStats:
        with self._lock:
            return dataclasses.replace(self._stats)

    def close_files(self) -> None:
        """Close the cached open block files and unmap them now (files in use by a read close when it ends); later
        reads open them again. Frees the disk space of evicted blocks still open here, and lets the page cache drop
        the blocks' pages (`posix_fadvise(DONTNEED)` leaves mapped pages alone)."""
        with self._lock:
            for key in list(self._fds):
                self._forget_fd_locked(key)

    def close(self) -> None:
        """Stop the I/O threads, set the mtimes of the blocks used since the last batch of touches (`lru_touch_s`, the
        LRU order a reopen reads) and close cached files (the store object stays usable for direct calls)."""
        if not self._closed:
            self._closed = True
            self._pool.shutdown(wait=True)
            self._write_pool.shutdown(wait=True)  # pending write-backs finish first
        self._touch_used()  # (the LRU order a reopen reads)
        self.close_files()

    def __del__(self, _close=os.close, _error=Exception):
        # A store dropped without close(): free its files. At interpreter exit this may run once module globals (os)
        # are None, even builtins (`except OSError` then raised a TypeError: "Exception ignored in ... __del__"). So
        # only names bound here, and nothing raised.
        try:
            fds = self.__dict__.get("_fds")  # (unset: __init__ failed before it)
            for key, ent in [*fds.items()] if fds else ():  # (no other thread reaches a store being collected)
                if ent.refs:
                    continue
                del fds[key]  # (closed once: a second call must not close an fd number reused since)
                mapping, ent.mapping = ent.mapping, None
                try:
                    if mapping is not None:
                        mapping.close()
                except _error:  # (a view still exported: unmapped when collected)
                    pass
                try:
                    _close(ent.fd)
                except _error:  # (an OSError, or whatever a torn-down interpreter gives)
                    pass
        except _error:  # never an error message at exit
            pass

    def __repr__(self) -> str:
        return f"LocalDirStore({self.root!r}, {self.layout}, capacity_bytes={self.capacity_bytes})"

    def _after_fork(self) -> None:
        """In a forked child: only the forking thread exists, so the lock (maybe held by another thread at the
        fork), the reads and writes in flight (their protection from eviction, their reserved bytes, their holds on
        open files) and the thread pools are the parent's: renew them."""
        self._lock = threading.Lock()
        self._busy.clear()
        self._dropped_busy.clear()
        self._reserved = 0
        self._scans.clear()  # (scans in the parent's other threads)
        self._opening.clear()
        for ent in self._fds.values():
            ent.refs = 0
        if not self._closed:
            self._new_pools()


# A forked child inherits the stores' executors but not their threads: an executor whose threads were started in
# the parent would queue the child's submit_read/read_many forever. The child gets fresh pools right after fork.
_STORES_OPEN: weakref.WeakSet[LocalDirStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_STORES_OPEN):
        store._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _PendingOpen:
    """An open of a block file in progress (outside the lock); `stale` once the block was removed or replaced."""

    __slots__ = ("stale",)

    def __init__(self):
        self.stale = False


class _NotABlockFile(OSError):
    """The path of a block is something other than a regular file (a FIFO, a directory, a device)."""


def _open_block(path: str) -> int:
    """Open a block file to read: O_NONBLOCK, so that a FIFO at its path cannot block the open, then checked to
    be a regular file (`_NotABlockFile` if not) and made blocking again."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        try:
            mode = os.fstat(fd).st_mode
        except OSError:  # (EIO, say: left to the read, which reports it as an I/O error)
            mode = stat.S_IFREG
        if not stat.S_ISREG(mode):
            raise _NotABlockFile(errno.EINVAL, f"not a regular file (mode {stat.filemode(mode)})", path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _nofile_limit() -> int | None:
    """The process's soft limit of open files (RLIMIT_NOFILE), or None (unlimited, or no such limit here)."""
    try:
        import resource
    except ImportError:
        return None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def _is_regular_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _fsync_block(path: str) -> bool:
    """fsync a stored block file, its directory entry and its fan-out directory's entry in blocks/ (a non-durable
    write may have made that directory: as a durable write of a block does); False if it could not be (gone, say)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # (non-blocking: a FIFO there cannot hang the open)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fan_out = os.path.dirname(path)
        _fsync_dir(fan_out)
        _fsync_dir(os.path.dirname(fan_out))
    except OSError:
        return False
    return True


def _missing_dirs(path: str) -> list[str]:
    """`path` and its parents that do not exist yet, outermost first (what `os.makedirs(path)` makes)."""
    missing = []
    while not os.path.exists(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    return missing[::-1]


def _fsync_dir(path: str) -> None:
    """fsync a directory (its entries: a new file or directory in it survives a power loss)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _host_id() -> str:
    """Who may judge a temp file's writer dead by its pid: this host *and* pid namespace (containers on one
    host can share a hostname and a mount, but not pids)."""
    host = socket.gethostname().replace(".", "_") or "host"
    try:
        host += f"-{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        pass
    return host


def _flag(name: str, value: Any, default: bool) -> bool:
    """A per-call flag (`read(verify=)`, `write(durable=)`...): None takes the store's option, else True or False
    (numpy bools too); anything else is refused, as the store's options are (`verify="no"` verified)."""
    if value is None:
        return default
    if not checks.is_bool(value):
        raise TypeError(f"{name} must be True, False or None (the store's default), got {value!r}")
    return bool(value)


# `_check_disjoint` sweeps up to this many destination pieces in Python, more with numpy (both give one answer).
_SWEEP_MAX_ROWS = 256


def _check_disjoint(keys: list[bytes], plans: list, lbn: int) -> None:
    """Raise if two planned reads write to the same bytes, unless both put the same key's same bytes there.

    O(r log r) in the r destination pieces (one per run of a packed `out`, one per Layer Block of a row-strided
    one): a few microseconds for a batch of Full Blocks, vectorised where there are many pieces."""
    # (every dst is a writable 1-D contiguous uint8 array: from_buffer is the cheapest way to its address)
    bases = [ctypes.addressof(ctypes.c_char.from_buffer(dst)) for dst, _, _, _ in plans]
    if all(p[3] == lbn for p in plans):  # (the common case: packed buffers, each written only inside its own span)
        spans = sorted((b, b + p[0].nbytes) for b, p in zip(bases, plans, strict=True))
        if all(spans[i][1] <= spans[i + 1][0] for i in range(len(spans) - 1)):
            return
    n_rows = sum(len(runs) if stride == lbn else sum(r[2] for r in runs) // lbn for _, _, runs, stride in plans)
    if n_rows <= _SWEEP_MAX_ROWS:
        rows = []  # (address, end, file offset, read index): the destination pieces of every read
        for i, (_, _, runs, stride) in enumerate(plans):
            base = bases[i]
            for f, o, n in runs:
                if stride == lbn:
                    rows.append((base + o, base + o + n, f, i))
                else:
                    rows.extend(
                        (base + o + j * stride, base + o + j * stride + lbn, f + j * lbn, i) for j in range(n // lbn)
                    )
        rows.sort()
        reach = rows[0]  # the piece reaching furthest so far
        for row in rows[1:]:
            if row[0] < reach[1]:
                if row[:3] != reach[:3] or keys[row[3]] != keys[reach[3]]:
                    _overlap(keys, reach[3], row[3])
            if row[1] > reach[1]:
                reach = row
        return
    # Many pieces (the Layer Blocks of many row-strided blocks): built and swept with numpy. Plans of one stride and
    # runs (read_many reads the same layers into each) differ only in their base address.
    groups: dict[tuple, list[int]] = {}
    for i, (_, _, runs, stride) in enumerate(plans):
        groups.setdefault((stride, tuple(runs)), []).append(i)
    parts = []
    for (stride, runs), idx in groups.items():
        rel = []
        for f, o, n in runs:
            rel.extend([(o, n, f)] if stride == lbn else [(o + j * stride, lbn, f + j * lbn) for j in range(n // lbn)])
        rel_a = np.array(rel, np.int64)
        b = np.array([bases[i] for i in idx], np.int64)[:, None]
        g = np.empty((len(idx), len(rel), 4), np.int64)
        g[:, :, 0] = b + rel_a[None, :, 0]
        g[:, :, 1] = g[:, :, 0] + rel_a[None, :, 1]
        g[:, :, 2] = rel_a[None, :, 2]
        g[:, :, 3] = np.array(idx, np.int64)[:, None]
        parts.append(g.reshape(-1, 4))
    a = np.concatenate(parts)
    a = a[np.lexsort((a[:, 3], a[:, 2], a[:, 1], a[:, 0]))]
    reach = np.maximum.accumulate(a[:, 1])
    for r in np.flatnonzero(a[1:, 0] < reach[:-1]) + 1:  # (only the same block read twice to one place, or an error)
        for p in np.flatnonzero(a[:r, 1] > a[r, 0]):  # the earlier pieces it overlaps
            if tuple(a[p, :3]) != tuple(a[r, :3]) or keys[a[p, 3]] != keys[a[r, 3]]:
                _overlap(keys, int(a[p, 3]), int(a[r, 3]))


def _overlap(keys: list[bytes], i: int, j: int) -> None:
    i, j = sorted((i, j))
    raise ValueError(
        f"read_many: out buffers {i} and {j} overlap (blocks {keys[i].hex()} and {keys[j].hex()} would write to the "
        "same bytes); give each read its own buffer"
    )


def _check_key(key: Any) -> None:
    # A block key is a `block_keys` key: exactly KEY_NBYTES bytes (the store's file names are its 32 hex digits).
    # Any length the format holds (1..32) was taken: a key that lost its trailing zero byte through a numpy bytes
    # array (dtype S16 strips trailing NULs) was then another key, a silent miss (and a second copy when written).
    if type(key) is bytes and len(key) == KEY_NBYTES:  # (the common case first: one type check, one len)
        return
    if not isinstance(key, bytes):
        raise TypeError(f"block key must be bytes of length {KEY_NBYTES}, got {key!r}")
    if len(key) == KEY_NBYTES:  # (a bytes subclass: a numpy bytes value that kept all 16 bytes)
        return
    hint = (
        " (a numpy bytes value drops trailing zero bytes: keep keys as Python bytes, e.g. in a list or an object array)"
        if isinstance(key, np.bytes_) and len(key) < KEY_NBYTES
        else ""
    )
    raise ValueError(f"block key must be {KEY_NBYTES} bytes (dualpath_jax.block_keys), got {len(key)}: {key!r}{hint}")


def _key_list(keys: Any) -> list[bytes]:
    """`keys` (an iterable of block keys) as a checked list; one key by itself is an error, not its bytes as keys."""
    if isinstance(keys, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected an iterable of block keys, got one key {bytes(keys)!r}: pass [key]")
    keys = list(keys)
    for key in keys:
        _check_key(key)
    return keys


def _hold_while_written(fd: int) -> int | None:
    """A writer's exclusive flock on its temp file, held by a duplicate of `fd` (returned; the caller closes it once
    the file is renamed onto its block's name): another process's sweep keeps a temp file a live writer holds
    (`_written_now`). It went by the writer's pid and the file's age alone: a wall-clock step forward past
    `stale_temp_s` (an NTP step, a VM resumed) had a live writer's file removed mid-write, and so did a write on
    another host (or PID namespace: `_host_id`, judged by age alone) taking longer than `stale_temp_s`. Without flock
    (some network file systems): None, nothing held, the pid and age rules as before."""
    if not flocks.take(fd):
        return None
    try:
        return os.dup(fd)  # (the same open file description: its lock outlives `fd`'s close)
    except OSError:
        return None


def _written_now(path: str) -> bool:
    """Whether a writer holds temp file `path` (`_hold_while_written`): a shared flock on it is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        return flocks.take(fd, shared=True) is False  # (None, no flock here: the pid and age rules decide)
    finally:
        os.close(fd)


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
