# cython: language_level=3, boundscheck=False, wraparound=False
"""DualPath DE phase 1's assignment loop in C (`DualPathPolicy._phase1_ints`; built by setup.py, optional).

`heapreplace_run(heap, steps)` is, on int64 keys,

    keys = []
    for step in steps:
        keys.append(heapq.heapreplace(heap, heap[0] + step))

with CPython's own heapreplace algorithm (bottom-up sift), so `heap` ends in the same array order as the
Python loop leaves it. A key outside int64 raises OverflowError and leaves `heap` as it was (the caller
then runs the Python loop).
"""

from cpython.mem cimport PyMem_Free, PyMem_Malloc


cdef inline void _siftup(long long *h, Py_ssize_t n, Py_ssize_t pos) noexcept nogil:
    # heapq._siftup: move the smaller child up until a leaf, then sift the new item down (heapq._siftdown)
    cdef Py_ssize_t start = pos, child = 2 * pos + 1, parent
    cdef long long item = h[pos]
    while child < n:
        if child + 1 < n and not h[child] < h[child + 1]:
            child += 1
        h[pos] = h[child]
        pos = child
        child = 2 * pos + 1
    while pos > start:
        parent = (pos - 1) >> 1
        if item < h[parent]:
            h[pos] = h[parent]
            pos = parent
            continue
        break
    h[pos] = item


def heapreplace_run(list heap, steps):
    """Returns the list of keys replaced (one per step); updates `heap` in place. See the module docstring."""
    cdef Py_ssize_t n = len(heap), i, m
    cdef long long k, s
    cdef long long *h
    if n == 0:
        raise IndexError("heapreplace_run on an empty heap")
    cdef list st = list(steps)
    m = len(st)
    h = <long long *> PyMem_Malloc(n * sizeof(long long))
    if h == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            h[i] = heap[i]
        keys = [None] * m
        for i in range(m):
            s = st[i]
            k = h[0]
            if (s > 0 and k > 0x7FFFFFFFFFFFFFFF - s) or (s < 0 and k < -0x7FFFFFFFFFFFFFFF - 1 - s):
                raise OverflowError("phase-1 key outside int64")
            h[0] = k + s
            _siftup(h, n, 0)
            keys[i] = k
        for i in range(n):
            heap[i] = h[i]
    finally:
        PyMem_Free(h)
    return keys
