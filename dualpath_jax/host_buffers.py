"""Preallocated host buffer pools per engine: the PE buffer and the DE buffer (DESIGN.md "Data paths").

One big page-aligned uint8 arena, allocated once, is carved into fixed-size slots (typically one Full Block
each). `acquire` hands out slots under a byte budget, without allocating: requests beyond the budget wait
(FIFO, so a large request is not starved by small ones) until slots are released, or fail with
`BufferBudgetExceeded` after `timeout`; a request that could never fit fails at once. The arena is one
contiguous buffer, so a transport registers it once as a memory region and addresses a handle's slots by
their byte offsets (`handle.offsets`). `close()` fails the waiting requests and refuses new ones (`BufferPoolClosed`);
slots held then can still be released.

    pool = HostBufferPool(slot_nbytes=layout.full_block_nbytes, budget_bytes=8 << 30, name="de0")
    with pool.acquire(nslots=hit_blocks, timeout=5.0) as buf:
        store.read_many(keys, buf.views)             # one Full Block per slot
        transport.write(region, buf.offsets[i], ...)  # same bytes, addressed in the registered arena
"""

from __future__ import annotations

import collections
import dataclasses
import mmap
import os
import threading
import time
import weakref
from typing import Self

import numpy as np

from dualpath_jax.checks import is_bool, is_real

PAGE_NBYTES = mmap.PAGESIZE


class BufferBudgetExceeded(RuntimeError):
    """A host buffer request that does not fit the pool's budget (never, or not within the timeout)."""


class BufferPoolClosed(RuntimeError):
    """A host buffer request to a closed pool (or one waiting when it was closed)."""


@dataclasses.dataclass
class HostBufferStats:
    slots_in_use: int = 0
    bytes_in_use: int = 0
    peak_bytes_in_use: int = 0
    acquires: int = 0
    releases: int = 0
    waits: int = 0  # acquires that had to wait for releases (served or timed out)
    wait_s: float = 0.0  # total time spent waiting (by those too)
    timeouts: int = 0  # acquires that gave up (BufferBudgetExceeded)


class HostBuffer:
    """Slots handed out by one `acquire`: writable numpy views into the pool's arena. A context manager."""

    def __init__(self, pool: HostBufferPool, slots: list[int], nbytes: int):
        self.pool = pool
        self.slots = slots  # slot indices in the arena (ascending; contiguous if asked for)
        self.nbytes = nbytes  # bytes asked for (<= len(slots) * slot_nbytes)
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def _check(self) -> None:
        if self._released:
            raise RuntimeError(f"host buffer of pool {self.pool.name!r} (slots {self.slots}) used after release")

    @property
    def offsets(self) -> list[int]:
        """Byte offset of each slot in the pool's arena (for a transport's registered memory region)."""
        self._check()
        return [s * self.pool.slot_nbytes for s in self.slots]

    @property
    def views(self) -> list[np.ndarray]:
        """One writable uint8 `[slot_nbytes]` view per slot."""
        self._check()
        return [self.pool.slot_view(s) for s in self.slots]

    def view(self, i: int) -> np.ndarray:
        """The i-th slot of this buffer as a writable uint8 `[slot_nbytes]` view."""
        self._check()
        return self.pool.slot_view(self.slots[i])

    def contiguous_view(self) -> np.ndarray:
        """All slots as one uint8 `[len(slots) * slot_nbytes]` view; only if they are adjacent in the arena."""
        self._check()
        first, n = self.slots[0], len(self.slots)
        if self.slots != list(range(first, first + n)):
            raise ValueError(f"slots {self.slots} are not contiguous; acquire(..., contiguous=True) for one view")
        size = self.pool.slot_nbytes
        return self.pool.arena[first * size : (first + n) * size]

    def release(self) -> None:
        self.pool.release(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        if not self._released:
            self.pool.release(self)

    def __len__(self) -> int:
        return len(self.slots)

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"HostBuffer(pool={self.pool.name!r}, slots={self.slots}, {state})"


class HostBufferPool:
    """A fixed budget of host memory in equal slots, reused across requests; thread-safe."""

    def __init__(
        self,
        slot_nbytes: int,
        budget_bytes: int | None = None,
        num_slots: int | None = None,
        name: str = "host",
        prefault: bool = True,
    ):
        """`slot_nbytes` per slot (e.g. a Full Block); the pool has `num_slots` slots, or as many as fit in
        `budget_bytes` (give one of the two). `prefault` touches every page now so first use is not slow."""
        if isinstance(slot_nbytes, bool) or not isinstance(slot_nbytes, (int, np.integer)) or slot_nbytes <= 0:
            raise ValueError(f"slot_nbytes must be a positive int, got {slot_nbytes!r}")
        if not isinstance(name, str):
            raise TypeError(f"host buffer pool name must be a str, got {name!r}")
        if not is_bool(prefault):  # (a truthy "no" touched every page of a large pool)
            raise TypeError(f"host buffer pool {name!r}: prefault must be True or False, got {prefault!r}")
        if (budget_bytes is None) == (num_slots is None):
            raise ValueError(f"give exactly one of budget_bytes and num_slots (got {budget_bytes!r}, {num_slots!r})")
        if num_slots is None:
            if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, np.integer)):
                raise TypeError(f"budget_bytes must be an int, got {budget_bytes!r}")
            num_slots = int(budget_bytes) // int(slot_nbytes)
            if num_slots < 1:
                raise ValueError(
                    f"budget_bytes={budget_bytes} is smaller than one slot of {slot_nbytes} B (pool {name!r})"
                )
        elif isinstance(num_slots, bool) or not isinstance(num_slots, (int, np.integer)) or num_slots < 1:
            raise ValueError(f"num_slots must be a positive int, got {num_slots!r}")
        self.name = name
        self.slot_nbytes = int(slot_nbytes)
        self.num_slots = int(num_slots)
        self.budget_bytes = self.num_slots * self.slot_nbytes
        # Anonymous mmap: page-aligned (what RDMA registration and O_DIRECT want), one allocation for life. Private:
        # a forked child gets its own copy (shared, the child's writes to its buffers landed in the parent's).
        try:  # (a budget no host can map was a bare "[Errno 12] Cannot allocate memory", or an OverflowError)
            self._mmap = mmap.mmap(-1, self.budget_bytes, flags=mmap.MAP_PRIVATE)
        except OverflowError:
            raise ValueError(
                f"host buffer pool {name!r}: {self.budget_bytes} B ({self.num_slots} slots x {self.slot_nbytes} B) is "
                "larger than any mapping"
            ) from None
        except OSError as e:
            raise OSError(
                e.errno,
                f"host buffer pool {name!r}: cannot map {self.budget_bytes} B ({self.num_slots} slots x "
                f"{self.slot_nbytes} B) of host memory: {e.strerror}",
            ) from e
        self.arena = np.frombuffer(self._mmap, dtype=np.uint8)  # [budget_bytes], writable
        if prefault:
            self.arena[::PAGE_NBYTES] = 0
        self._free = np.ones((self.num_slots,), dtype=bool)  # free map (first-fit for contiguous requests)
        self._free_list = collections.deque(range(self.num_slots))  # O(1) pops for scattered requests
        self._nfree = self.num_slots
        self._cond = threading.Condition()
        self._queue: collections.deque[object] = collections.deque()  # waiting requests, FIFO
        # The handles out now and the slots each was given: `release` frees these, never a handle's own `slots`
        # (a copy of a handle, or one built by hand, freed slots another request held: two owners of one slot).
        self._held: dict[HostBuffer, tuple[int, ...]] = {}
        self._stats = HostBufferStats()
        self._closed = False
        _POOLS.add(self)

    def _after_fork(self) -> None:
        """In a forked child only the forking thread exists: the lock (maybe held by another thread at the fork) is
        renewed and the requests other threads were waiting with are dropped (the child's waited behind them for
        ever). Slots held at the fork stay held (their handles were copied too)."""
        self._cond = threading.Condition()
        self._queue.clear()

    @property
    def buffer(self) -> memoryview:
        """The whole arena as a writable memoryview (to register with a transport)."""
        return memoryview(self._mmap)

    @property
    def address(self) -> int:
        """Virtual address of the arena's first byte (page-aligned)."""
        return self.arena.ctypes.data

    def slot_view(self, slot: int) -> np.ndarray:
        if not 0 <= slot < self.num_slots:  # (a slice past the arena would be an empty view, not an error)
            raise IndexError(f"slot {slot} out of range for pool {self.name!r} of {self.num_slots} slots")
        return self.arena[slot * self.slot_nbytes : (slot + 1) * self.slot_nbytes]

    def slots_for(self, nbytes: int) -> int:
        return -(-int(nbytes) // self.slot_nbytes)

    def acquire(
        self,
        nbytes: int | None = None,
        *,
        nslots: int | None = None,
        timeout: float | None = None,
        contiguous: bool = False,
    ) -> HostBuffer:
        """Take slots for `nbytes` (rounded up to whole slots) or `nslots`; wait up to `timeout` s (None =
        forever, 0 = do not wait). `contiguous=True` asks for adjacent slots (one view over all of them).

        Raises BufferBudgetExceeded if the request exceeds the whole pool, or is not served in time;
        BufferPoolClosed if the pool is closed (or gets closed while the request waits).
        """
        if (nbytes is None) == (nslots is None):
            raise ValueError(f"give exactly one of nbytes and nslots (got {nbytes!r}, {nslots!r})")
        if nslots is None:
            if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)) or nbytes <= 0:
                raise ValueError(f"nbytes must be a positive int, got {nbytes!r}")
            nslots = self.slots_for(nbytes)
        elif isinstance(nslots, bool) or not isinstance(nslots, (int, np.integer)) or nslots <= 0:
            raise ValueError(f"nslots must be a positive int, got {nslots!r}")
        nslots = int(nslots)
        want_bytes = nslots * self.slot_nbytes if nbytes is None else int(nbytes)
        if nslots > self.num_slots:
            raise BufferBudgetExceeded(
                f"host buffer pool {self.name!r}: request of {nslots} slots ({nslots * self.slot_nbytes} B) can never "
                f"fit its budget of {self.num_slots} slots x {self.slot_nbytes} B = {self.budget_bytes} B"
            )
        if timeout is not None and not is_real(timeout):  # (True waited 1 s, "5" failed on `>=` without a name)
            raise TypeError(
                f"host buffer pool {self.name!r}: timeout must be a number of seconds or None, got {timeout!r}"
            )
        if timeout is not None and not timeout >= 0:  # (NaN too: it would wait forever)
            raise ValueError(f"timeout must be >= 0 s or None, got {timeout}")
        if not is_bool(contiguous):  # (a truthy "no" asked for adjacent slots)
            raise TypeError(f"host buffer pool {self.name!r}: contiguous must be True or False, got {contiguous!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        ticket = object()
        with self._cond:
            waited = False
            t0 = time.monotonic()
            self._queue.append(ticket)
            try:
                while True:
                    if self._closed:  # (a waiter on a pool shut down waited for ever)
                        raise BufferPoolClosed(
                            f"host buffer pool {self.name!r} is closed (request of {nslots} slots"
                            f"{' that waited' if waited else ''})"
                        )
                    if self._queue[0] is ticket:
                        slots = self._take_locked(nslots, contiguous)
                        if slots is not None:
                            break
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        self._stats.timeouts += 1
                        if waited:  # (it waited too: its time was left out of wait_s)
                            self._stats.waits += 1
                            self._stats.wait_s += time.monotonic() - t0
                        raise BufferBudgetExceeded(
                            f"host buffer pool {self.name!r}: no {nslots} free{' contiguous' if contiguous else ''} "
                            f"slots within {timeout} s ({self._nfree} of {self.num_slots} free, "
                            f"{len(self._queue) - 1} other request(s) waiting)"
                        )
                    waited = True
                    # capped: timeout=inf (or 1e300) overflowed the lock's wait (OverflowError, not a wait)
                    self._cond.wait(None if remaining is None else min(remaining, threading.TIMEOUT_MAX))
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()  # the next in line may fit now
            st = self._stats
            st.acquires += 1
            if waited:
                st.waits += 1
                st.wait_s += time.monotonic() - t0
            st.slots_in_use += nslots
            st.bytes_in_use += nslots * self.slot_nbytes
            st.peak_bytes_in_use = max(st.peak_bytes_in_use, st.bytes_in_use)
            handle = HostBuffer(self, slots, want_bytes)
            self._held[handle] = tuple(slots)
        return handle

    def _take_locked(self, nslots: int, contiguous: bool) -> list[int] | None:
        if nslots > self._nfree:
            return None
        if contiguous:
            # First fit over the free map: starts of runs of `nslots` free slots.
            c = np.concatenate([[0], np.cumsum(self._free, dtype=np.int64)])
            starts = np.nonzero(c[nslots:] - c[:-nslots] == nslots)[0]  # windows of nslots free slots
            if not starts.size:
                return None
            slots = list(range(int(starts[0]), int(starts[0]) + nslots))
            taken = set(slots)
            self._free_list = collections.deque(s for s in self._free_list if s not in taken)
        else:
            slots = sorted(self._free_list.popleft() for _ in range(nslots))
        self._free[slots] = False
        self._nfree -= nslots
        return slots

    def release(self, handle: HostBuffer) -> None:
        """Give a handle's slots back (waking waiting requests)."""
        if not isinstance(handle, HostBuffer):
            raise TypeError(f"host buffer pool {self.name!r}: release takes a HostBuffer, got {handle!r}")
        if handle.pool is not self:
            raise ValueError(f"host buffer of pool {handle.pool.name!r} released to pool {self.name!r}")
        with self._cond:
            slots = self._held.pop(handle, None)
            if slots is None:
                if handle._released:
                    raise RuntimeError(f"host buffer {handle!r} released twice")
                raise ValueError(
                    f"host buffer {handle!r} was not handed out by pool {self.name!r} (a copy of a handle, or one "
                    f"built by hand): its slots belong to another request"
                )
            handle._released = True
            self._free[list(slots)] = True
            self._free_list.extend(slots)
            self._nfree += len(slots)
            st = self._stats
            st.releases += 1
            st.slots_in_use -= len(slots)
            st.bytes_in_use -= len(slots) * self.slot_nbytes
            self._cond.notify_all()

    def close(self) -> None:
        """Refuse new requests and fail the waiting ones with `BufferPoolClosed` (idempotent). Slots held now stay
        valid and can still be released (the arena stays mapped while any view of it lives)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def free_slots(self) -> int:
        with self._cond:
            return self._nfree

    def stats(self) -> HostBufferStats:
        with self._cond:
            return dataclasses.replace(self._stats)

    def __repr__(self) -> str:
        return f"HostBufferPool({self.name!r}, {self.num_slots} x {self.slot_nbytes} B)"


# Pools of this process, renewed in a forked child (`HostBufferPool._after_fork`).
_POOLS: weakref.WeakSet[HostBufferPool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pool in list(_POOLS):
        pool._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
