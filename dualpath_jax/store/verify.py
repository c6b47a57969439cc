"""Checksum checks of a read's chunks on persistent helper threads (no jax).

A verified read copies a chunk from the page cache (`preadv`) and then hashes it. python-xxhash releases the GIL
while hashing, as `preadv` does while copying, so a helper thread can check chunk k on another core while the
reading thread copies chunk k+1: the read then costs about its copies plus the check of its last chunk, which the
reader does itself. `ChunkVerifier` holds the helper threads (started once per process, on first use) and their
queue. A read asks for a helper with `begin` (each helper serves one read at a time; without a free one the reader
checks every chunk itself), hands chunks over with `submit`, and calls `wait` before it returns: chunks no
helper has started are taken back and checked by the reader, then it waits for those being checked. So no block
is returned before all its bytes are verified, and no helper touches the caller's buffer after the read returns
(on a hit, a miss or an error).

A helper only pays when it gets a core of its own: on a machine whose cores are all busy it competes with the
reader for CPU and for the GIL (a helper descheduled while it holds the GIL stalls the reader). So `begin` picks
the faster way as measured: readers `record` the time per byte of their reads, pipelined or not (a running
average of each), most reads go the faster way (pipelined only when >= 5% faster: PIPELINE_MARGIN), and every
PROBE_EVERY-th read goes the other way to keep both averages current.

State is preallocated: one `ReadChecks` per reading thread (reused by its reads) and the helper threads; a
handed-over chunk is a tuple in a deque.
"""

from __future__ import annotations

import collections
import os
import threading
import weakref

import numpy as np

from dualpath_jax.store import block_file

PROBE_EVERY = 16  # one read in this many goes the way that measured slower (so it is re-measured)
EWMA_WEIGHT = 1 / 8  # weight of a new sample in the running averages of seconds per byte
# Pipelined reads must measure this much faster to be chosen: they cost more CPU (handovers, the helper's
# wake-ups), which a shared machine's other work pays for, and timings on a busy machine are noisy.
PIPELINE_MARGIN = 0.95


class ReadChecks:
    """The checks of one read in flight on one reading thread (reused by that thread's reads)."""

    __slots__ = ("bad", "done", "error", "pending", "waiting")

    def __init__(self):
        self.pending = 0  # chunks handed to helpers and not yet checked
        self.waiting = False  # the reader sleeps on `done` until pending is 0
        self.done = threading.Lock()  # held while nobody waits; a helper releases it to wake the reader
        self.done.acquire()
        self.bad: list[int] = []  # Layer Blocks whose checksum did not match
        self.error: BaseException | None = None  # a helper's unexpected failure (re-raised by the reader)

    def reset(self) -> None:
        self.bad.clear()
        self.error = None


def check_chunk(checks: ReadChecks, piece: np.ndarray, lbn: int, algo: str, first: int, want: list[int]) -> None:
    """Checksum the Layer Blocks in `piece` (layers first, first+1, ...) against `want`; record mismatches."""
    try:
        got = block_file.layer_checksum_list(piece, lbn, algo)
        if got != want:
            checks.bad.extend(first + j for j, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
    except BaseException as e:  # never lose a failure: the reader re-raises it
        checks.error = e


class ChunkVerifier:
    """`num_threads` persistent threads that check chunks for reading threads; see the module docstring."""

    always_hand_over = False  # True: use a free helper on every read, measured faster or not (tests)

    def __init__(self, num_threads: int, name: str = "kvstore-verify"):
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 0:
            raise ValueError(f"verify_threads must be an int >= 0, got {num_threads!r}")
        self.num_threads = num_threads
        self.name = name
        self._lock = threading.Lock()
        self._jobs: collections.deque = collections.deque()  # (checks, piece, lbn, algo, first, want)
        self._sleeping: list[threading.Lock] = []  # wake locks of idle helpers (held: a helper sleeps on it)
        self._readers = 0  # reads holding a helper (begin .. wait)
        self._threads: list[threading.Thread] = []
        self._pid = -1  # helpers belong to one process (a forked child starts its own)
        self._closed = False
        self._cost = [0.0, 0.0]  # running average seconds per byte of reads: [checked inline, pipelined]
        self.decisions = 0  # begin() calls that chose a way (reads that could be pipelined)
        self.offloaded = 0  # chunks checked by helpers
        self.taken_back = 0  # chunks handed over but checked by their reader (no helper had started them)
        self.reads = 0  # reads that had a helper
        self.waits = 0  # of those, reads whose reader had to wait for a helper at the end
        _VERIFIERS.add(self)

    def begin(self) -> bool:
        """Reserve a helper for one read; False (check every chunk inline) if none is free or inline reads
        measured faster (see the module docstring). A True must be followed by `wait` (in a `finally`), which
        ends the reservation.
        """
        if not self.num_threads:
            return False
        if not self.always_hand_over:
            inline, pipelined = self._cost  # (unlocked: a stale read only changes one decision)
            # measure both ways, then go the faster (pipelined only if clearly faster)
            want = bool(inline) and (not pipelined or pipelined <= PIPELINE_MARGIN * inline)
            self.decisions += 1
            if self.decisions % PROBE_EVERY == 0:
                want = not want
            if not want:
                return False
        with self._lock:
            if self._closed:
                return False
            if self._pid != os.getpid():
                self._start_locked()
            if self._readers >= self.num_threads:
                return False
            self._readers += 1
            self.reads += 1
        return True

    def record(self, pipelined: bool, seconds: float, nbytes: int) -> None:
        """A verified read that could have been pipelined took `seconds` for `nbytes` (pipelined or not)."""
        x = seconds / nbytes
        c = self._cost[pipelined]
        self._cost[pipelined] = x if not c else c + (min(x, 4 * c) - c) * EWMA_WEIGHT  # (outliers clipped)

    def submit(self, checks: ReadChecks, piece: np.ndarray, lbn: int, algo: str, first: int, want) -> None:
        """Hand a chunk of the reserving read to the helpers."""
        with self._lock:
            checks.pending += 1
            self._jobs.append((checks, piece, lbn, algo, first, want))
            if self._sleeping:
                self._sleeping.pop().release()

    def wait(self, checks: ReadChecks) -> None:
        """Return once every chunk handed over for `checks` is checked (queued ones are checked here); ends the
        read's reservation."""
        mine = []
        with self._lock:
            self._readers -= 1
            if checks.pending and self._jobs:
                mine = [job for job in self._jobs if job[0] is checks]
                for job in mine:
                    self._jobs.remove(job)
                checks.pending -= len(mine)
                self.taken_back += len(mine)
            sleep = checks.waiting = checks.pending > 0
            self.waits += sleep
        for job in mine:
            check_chunk(*job)
        if sleep:
            checks.done.acquire()  # released by the helper that finishes the last chunk

    def _after_fork_in_child(self) -> None:
        """A forked child has none of the parent's threads: fresh lock and queue; helpers start on first use."""
        self._lock = threading.Lock()  # (the parent's may have been held by a helper at the fork)
        self._jobs = collections.deque()
        self._sleeping = []
        self._readers = 0
        self._threads = []
        self._pid = -1

    def _start_locked(self) -> None:
        self._threads = []
        self._pid = os.getpid()
        for i in range(self.num_threads):
            wake = threading.Lock()
            wake.acquire()
            t = threading.Thread(target=self._run, args=(wake,), name=f"{self.name}-{i}", daemon=True)
            self._threads.append(t)
            t.start()

    def _run(self, wake: threading.Lock) -> None:
        while True:
            with self._lock:
                if self._jobs:
                    job = self._jobs.popleft()
                elif self._closed:
                    return
                else:
                    self._sleeping.append(wake)
                    job = None
            if job is None:
                wake.acquire()  # until submit or close releases it
                continue
            check_chunk(*job)
            checks = job[0]
            with self._lock:
                self.offloaded += 1
                checks.pending -= 1
                if not checks.pending and checks.waiting:
                    checks.waiting = False
                    checks.done.release()

    def close(self, join: bool = True) -> None:
        """Stop the helpers (after the queued chunks); later reads check every chunk themselves."""
        with self._lock:
            self._closed = True
            while self._sleeping:
                self._sleeping.pop().release()
            threads = self._threads if join and self._pid == os.getpid() else []
        for t in threads:
            if t is not threading.current_thread():
                t.join()


_VERIFIERS: weakref.WeakSet[ChunkVerifier] = weakref.WeakSet()


def _reset_verifiers_in_child() -> None:
    for v in list(_VERIFIERS):
        v._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_verifiers_in_child)
