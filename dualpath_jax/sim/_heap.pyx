# cython: language_level=3, boundscheck=False, wraparound=False
"""A min-heap of timed entries (t, k1, k2, a, b) in C, for the simulator's event queue and the network's
projected flow completions. Entries are ordered by (t, k1, k2) compared as C numbers; (k1, k2) must be
unique (event sequence numbers; flow id and version), so `a` and `b` are never compared. `heap.PyTimeHeap`
is the same heap on `heapq` tuples (the fallback when this module is not built); both pop in the same order.
"""

from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.ref cimport Py_DECREF, Py_INCREF, PyObject


cdef struct _Entry:
    double t
    long long k1
    long long k2
    PyObject *a  # strong references while the entry is in the heap
    PyObject *b


cdef inline bint _lt(_Entry *x, _Entry *y) noexcept nogil:
    if x.t != y.t:
        return x.t < y.t
    if x.k1 != y.k1:
        return x.k1 < y.k1
    return x.k2 < y.k2


cdef class TimeHeap:
    """Min-heap of (t, k1, k2, a, b): `push`, `pop` (the tuple), `top_t` (the earliest t; inf when empty)."""

    cdef _Entry *e
    cdef Py_ssize_t n
    cdef Py_ssize_t cap

    def __cinit__(self):
        self.cap = 256
        self.n = 0
        self.e = <_Entry *> PyMem_Malloc(self.cap * sizeof(_Entry))
        if self.e == NULL:
            raise MemoryError("TimeHeap: cannot allocate its array")

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.e != NULL:
            for i in range(self.n):
                Py_DECREF(<object> self.e[i].a)
                Py_DECREF(<object> self.e[i].b)
            PyMem_Free(self.e)

    def __len__(self):
        return self.n

    def __bool__(self):
        return self.n > 0

    cpdef push(self, double t, long long k1, long long k2, object a, object b):
        cdef _Entry *grown
        cdef _Entry x
        cdef Py_ssize_t i, parent
        if self.n == self.cap:
            grown = <_Entry *> PyMem_Realloc(self.e, 2 * self.cap * sizeof(_Entry))
            if grown == NULL:
                raise MemoryError("TimeHeap: cannot grow its array")
            self.e = grown
            self.cap *= 2
        Py_INCREF(a)
        Py_INCREF(b)
        x.t = t
        x.k1 = k1
        x.k2 = k2
        x.a = <PyObject *> a
        x.b = <PyObject *> b
        i = self.n
        self.n += 1
        while i > 0:  # sift up
            parent = (i - 1) >> 1
            if _lt(&x, &self.e[parent]):
                self.e[i] = self.e[parent]
                i = parent
            else:
                break
        self.e[i] = x

    cpdef double top_t(self):
        return self.e[0].t if self.n else float("inf")

    cpdef tuple pop(self):
        cdef _Entry top, last
        cdef Py_ssize_t i, child, n
        if self.n == 0:
            raise IndexError("pop from an empty TimeHeap")
        top = self.e[0]
        self.n -= 1
        n = self.n
        if n:
            last = self.e[n]
            i = 0
            while True:  # sift the last entry down from the root
                child = 2 * i + 1
                if child >= n:
                    break
                if child + 1 < n and _lt(&self.e[child + 1], &self.e[child]):
                    child += 1
                if _lt(&self.e[child], &last):
                    self.e[i] = self.e[child]
                    i = child
                else:
                    break
            self.e[i] = last
        a = <object> top.a
        b = <object> top.b
        Py_DECREF(a)  # the heap's references; `a` and `b` hold their own
        Py_DECREF(b)
        return (top.t, top.k1, top.k2, a, b)

    def entries(self):
        """The entries, in heap-array order (tests and debugging)."""
        cdef Py_ssize_t i
        return [(self.e[i].t, self.e[i].k1, self.e[i].k2, <object> self.e[i].a, <object> self.e[i].b)
                for i in range(self.n)]
