"""A node's storage NIC (SNIC): its read queue (hit KV loads) and its write-back queue, paced by the node's link.

Reads are served FIFO by one thread: a read job loads consecutive Full Blocks from the store into a request's
host-buffer area (layer-major `[L, prompt_tokens, bpt]`; straight into the block's rows where the store takes a
row-strided `out`, else through a staging buffer), each block's bytes paced through the SNIC, and stops at the
first missing or corrupt block (the hit shrinks; the rest is recomputed, never wrong KV; the failed block's
rows may hold bytes, but they lie past the hit and are never used as cached KV).
`read_queue_tokens` is a gauge of the node's read queue for its stats (the policy's read_q is the
scheduler's own count, `GlobalScheduler.snapshot`). Write-backs (a DE persisting filled blocks) go
through the same SNIC link from a second thread, so reads and writes share the emulated bandwidth.

What it uses of the store (any `KVStore`, `config.store`): `layout`, `read(key, out)` of whole Full Blocks, and for
write-backs `contains`, `verify` and `write`. `out` is a C-contiguous uint8 [L, block_size, bpt] staging buffer, or,
where the store's `strided_out` is True, the block's rows of the area, `area[:, t0 : t0 + block_size]`: the same
shape, each layer's row contiguous but rows `prompt_tokens * bpt` bytes apart. Such a read writes each Layer Block
into its row and no other byte of the area, from any thread (the read thread here), and a miss may leave its rows
partly filled (they lie past the hit).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable

import numpy as np

from dualpath_jax import clock

log = logging.getLogger(__name__)
LOGGED_FAILED_READS = 5  # unreadable blocks a storage NIC logs one by one (the rest: counted in failed_reads)


@dataclasses.dataclass
class ReadJob:
    request_id: int
    attempt: int
    keys: list  # block keys to read, in order
    first_block: int  # index of keys[0] in the prompt (its tokens start at first_block * block_size)
    area: np.ndarray  # uint8 [L, prompt_tokens, bpt]: the request's host-buffer area
    on_done: Callable[[ReadJob, int, int, float, float], None]  # (job, ok_blocks, nbytes, t_start, t_end)
    cancelled: bool = False


@dataclasses.dataclass
class WriteJob:
    keys: list
    blocks: list  # uint8 [L, block_size, bpt] each (owned copies)
    on_done: Callable[[int], None] | None = None  # (blocks written)


class StorageNIC:
    """One node's SNIC: FIFO read queue and write-back queue over a shared paced link."""

    def __init__(self, node_id: int, store, block_size: int, pace: Callable[[int], None], name: str = ""):
        self.node_id = node_id
        self.store = store
        self.block_size = block_size
        self._pace = pace
        self._reads: queue.Queue = queue.Queue()
        self._writes: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._queued_read_tokens = 0
        self._pending_writes = 0
        self._stop = threading.Event()
        # A store that reads into a row-strided Full Block fills the request's area in place; any other reads
        # each block into one staging buffer, copied into the area.
        self._direct = bool(getattr(store, "strided_out", False))
        full = store.layout.full_block_shape
        self._read_staging = None if self._direct else np.zeros(full, np.uint8)  # [L, block_size, bpt]
        self.bytes_read = 0
        self.bytes_written = 0
        self.failed_reads = 0
        # write-back blocks not stored: the store refused them (no room: its capacity held by pinned / busy blocks) or
        # writing them failed (a full disk); a later turn recomputes their KV
        self.unstored_blocks = 0
        # Monotonic start of the store call each thread is in ("read" / "write"; None: none): a store call that never
        # returns (a hung mount) stalls every job behind it, and the node reports it (`stalled`).
        self.busy_since: dict[str, float | None] = {"read": None, "write": None}
        self._threads = [
            threading.Thread(target=self._read_loop, name=f"snic{node_id}-read{name}", daemon=True),
            threading.Thread(target=self._write_loop, name=f"snic{node_id}-write{name}", daemon=True),
        ]
        for t in self._threads:
            t.start()

    @property
    def read_queue_tokens(self) -> int:
        with self._lock:
            return self._queued_read_tokens

    @property
    def pending_writes(self) -> int:
        with self._lock:
            return self._pending_writes

    def submit_read(self, job: ReadJob) -> None:
        with self._lock:
            self._queued_read_tokens += len(job.keys) * self.block_size
        self._reads.put(job)

    def submit_write(self, job: WriteJob) -> None:
        if len(job.keys) != len(job.blocks):  # the write thread would die on it, stalling every later write-back
            raise ValueError(f"write-back job has {len(job.keys)} keys but {len(job.blocks)} blocks")
        with self._lock:
            self._pending_writes += len(job.keys)
        self._writes.put(job)

    def stalled(self, now: float, timeout: float) -> dict[str, float]:
        """{"storage NIC's store.read" / "...store.write": seconds} for each of its threads in one store call for over
        `timeout` s at `now` (monotonic)."""
        out = {}
        for kind, since in list(self.busy_since.items()):
            if since is not None and now - since > timeout:
                out[f"storage NIC's store.{kind}"] = now - since
        return out

    def close(self, timeout: float = 2.0) -> None:
        """Stop serving: a job in progress ends after its current block (the rest is not read or written), and the
        threads are joined, so nothing crosses the SNIC after this (a node's final report counts every byte; the
        rest of a long job used to cross it unrecorded, and read from a store being closed)."""
        self._stop.set()
        self._reads.put(None)
        self._writes.put(None)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)

    def _log_failed_read(self, block: int, request_id: int) -> None:
        """One line per unreadable block up to LOGGED_FAILED_READS, then one saying the rest are only counted (a store
        far smaller than the working set evicts blocks between lookups and reads all the time: a line each buried the
        log)."""
        n = self.failed_reads
        if n <= LOGGED_FAILED_READS:
            log.warning(
                # (a bounded store may have evicted it since the lookup; the store logs a damaged one)
                "node %d: block %d of request %d could not be read (evicted since the lookup, or damaged): "
                "recomputed from there as a miss%s",
                self.node_id,
                block,
                request_id,
                "; further ones are counted, not logged (node_stats failed_reads)" if n == LOGGED_FAILED_READS else "",
            )

    def _read_loop(self) -> None:
        bs = self.block_size
        nbytes_block = self.store.layout.full_block_nbytes
        while not self._stop.is_set():
            job = self._reads.get()
            if job is None:
                return
            t_start = clock.now()
            ok = 0
            nbytes = 0
            try:
                for j, key in enumerate(job.keys):
                    if job.cancelled or self._stop.is_set():
                        break
                    t0 = (job.first_block + j) * bs
                    rows = job.area[:, t0 : t0 + bs]  # this block's rows of the layer-major area
                    self.busy_since["read"] = time.monotonic()
                    try:
                        found = self.store.read(key, rows if self._direct else self._read_staging)
                    finally:
                        self.busy_since["read"] = None
                    if not found:
                        self.failed_reads += 1
                        self._log_failed_read(job.first_block + j, job.request_id)
                        break
                    # Paced once read: a block gone since the lookup moved no bytes (it was charged a whole Full Block
                    # of SNIC time and record, delaying this request and every read queued behind it).
                    self._pace(nbytes_block)
                    if not self._direct:
                        rows[...] = self._read_staging  # Full Block -> layer-major area
                    ok += 1
                    nbytes += nbytes_block
            except Exception:  # noqa: BLE001 -- an I/O error is a miss for the rest of the job
                self.failed_reads += 1
                log.exception("node %d: read of request %d failed", self.node_id, job.request_id)
            finally:
                with self._lock:
                    self._queued_read_tokens -= len(job.keys) * bs
                self.bytes_read += nbytes
            self._report(job.on_done, job, ok, nbytes, t_start, clock.now())

    def _write_loop(self) -> None:
        nbytes_block = self.store.layout.full_block_nbytes
        while not self._stop.is_set():
            job = self._writes.get()
            if job is None:
                return
            written = 0
            for key, block in zip(job.keys, job.blocks, strict=True):
                if self._stop.is_set():
                    break
                self.busy_since["write"] = time.monotonic()
                try:
                    # Stored already, and whole (not paced: a dedup moves no KV). `contains` looks only at the file:
                    # a damaged block of the right size was never replaced -- a recomputed block behind the read's
                    # first failure missed again at the next turn's read. `verify`, not a verified `read`: the check
                    # counted in the store's read stats (hits, bytes read) as hit KV no turn read.
                    if self.store.contains(key) and self.store.verify(key):
                        written += 1
                        continue
                    stored = self.store.write(key, block)
                    self.busy_since["write"] = None  # (pacing is no store call: a slow SNIC cap is no stall)
                    if stored:
                        self._pace(nbytes_block)  # (once written: a write the store refused moved no bytes)
                        written += 1
                        self.bytes_written += nbytes_block
                    else:  # (the store logged why)
                        self.unstored_blocks += 1
                except Exception:  # noqa: BLE001 -- a failed write-back only costs a future miss
                    log.exception("node %d: write-back failed", self.node_id)
                    self.unstored_blocks += 1
                finally:
                    self.busy_since["write"] = None
            with self._lock:
                self._pending_writes -= len(job.keys)
            if job.on_done is not None:
                self._report(job.on_done, written)

    def _report(self, on_done, *args) -> None:
        """Call a job's completion callback; one that raises is logged and the queue keeps being served (the
        thread used to die with it, leaving every later read or write-back of the node waiting forever)."""
        try:
            on_done(*args)
        except Exception:  # noqa: BLE001
            log.exception("node %d: a storage-NIC completion callback raised", self.node_id)
