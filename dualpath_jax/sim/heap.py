"""Min-heap of timed entries (t, k1, k2, a, b), ordered by (t, k1, k2): the simulator's event queue (k1: the
sequence number) and the network's projected flow completions (k1, k2: flow id and version).

`TimeHeap` is the compiled one (`_heap.pyx`: C structs, C comparisons) when the package was built with its
extensions, else `PyTimeHeap`, the same heap on `heapq` tuples. (k1, k2) is unique in both uses, so `a` and
`b` are never compared and both heaps pop in the same order.
"""

from __future__ import annotations

import heapq
import math

from dualpath_jax.compiled import use


class PyTimeHeap:
    """Min-heap of (t, k1, k2, a, b) on a list of tuples (heapq)."""

    __slots__ = ("_h",)

    def __init__(self) -> None:
        self._h: list = []

    def __len__(self) -> int:
        return len(self._h)

    def __bool__(self) -> bool:
        return bool(self._h)

    def push(self, t: float, k1: int, k2: int, a, b) -> None:
        heapq.heappush(self._h, (t, k1, k2, a, b))

    def top_t(self) -> float:
        return self._h[0][0] if self._h else math.inf

    def pop(self) -> tuple:
        return heapq.heappop(self._h)

    def entries(self) -> list:
        return list(self._h)


COMPILED = use("dualpath_jax.sim._heap")  # False: not built, DUALPATH_PURE_PYTHON, or older than _heap.pyx
if COMPILED:
    from dualpath_jax.sim._heap import TimeHeap
else:  # the same heap in Python
    TimeHeap = PyTimeHeap
