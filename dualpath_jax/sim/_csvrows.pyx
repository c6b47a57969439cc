# cython: language_level=3, boundscheck=False, wraparound=False
"""CSV rows written in C, byte for byte what `csv.writer` (excel dialect, QUOTE_MINIMAL, "\\r\\n") writes.

The simulator's turns.csv has about 3.3 M rows of 19 fields at paper scale; `csv.writer` spends most of its
time making a `str` of every number and scanning it for characters to quote. Here an exact float is formatted
with `PyOS_double_to_string(v, 'r', 0, Py_DTSF_ADD_DOT_0)` (what `repr`/`str` of a float call, so the same
digits), an exact int in C, and the row goes into one growing byte buffer; everything else (str, bool, numpy
scalars, None) takes the path `csv.writer` takes: `str(x)` ('' for None), quoted when it holds a delimiter,
quote or line break. `outputs.write_csv` is the fallback with `csv.writer` where this module is not built.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_CheckExact
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_CheckExact
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.string cimport memcmp, memcpy, strlen

cdef extern from "Python.h":
    char *PyOS_double_to_string(double val, char format_code, int precision, int flags, int *ptype) except NULL
    int Py_DTSF_ADD_DOT_0
    int PyUnicode_CheckExact(object o)
    const char *PyUnicode_AsUTF8AndSize(object o, Py_ssize_t *size) except NULL


cdef class _Buffer:
    """A byte buffer flushed to a binary file's `write` when it passes `flush_at` bytes."""

    cdef char *data
    cdef Py_ssize_t n, cap, flush_at
    cdef object write

    def __cinit__(self, write, Py_ssize_t flush_at=1 << 20):
        self.write = write
        self.flush_at = flush_at
        self.cap = 2 * flush_at
        self.n = 0
        self.data = <char *>PyMem_Malloc(self.cap)
        if self.data is NULL:
            raise MemoryError()

    def __dealloc__(self):
        PyMem_Free(self.data)

    cdef int reserve(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t cap = self.cap
        cdef char *p
        if self.n + extra <= cap:
            return 0
        while self.n + extra > cap:
            cap *= 2
        p = <char *>PyMem_Realloc(self.data, cap)
        if p is NULL:
            raise MemoryError()
        self.data = p
        self.cap = cap
        return 0

    cdef int put(self, const char *s, Py_ssize_t k) except -1:
        self.reserve(k)
        memcpy(self.data + self.n, s, k)
        self.n += k
        return 0

    cdef int put_char(self, char c) except -1:
        if self.n + 1 > self.cap:
            self.reserve(1)
        self.data[self.n] = c
        self.n += 1
        return 0

    cdef int flush(self) except -1:
        if self.n:
            self.write(PyBytes_FromStringAndSize(self.data, self.n))
            self.n = 0
        return 0


cdef int _put_int(_Buffer buf, long long v) except -1:
    cdef char tmp[24]
    cdef int i = 24
    cdef unsigned long long u = <unsigned long long>(-(v + 1)) + 1 if v < 0 else <unsigned long long>v
    while True:
        i -= 1
        tmp[i] = <char>(48 + u % 10)
        u //= 10
        if u == 0:
            break
    if v < 0:
        i -= 1
        tmp[i] = b'-'
    return buf.put(tmp + i, 24 - i)


cdef int _put_text(_Buffer buf, str s, bint only_field) except -1:
    """A field that `csv.writer` turns into text: quoted (inner quotes doubled) when it holds ',', '"', CR or
    LF; an empty field alone on its row is written as "" (what csv.writer does, so a reader sees one field)."""
    cdef Py_ssize_t k, i
    cdef const char *p = PyUnicode_AsUTF8AndSize(s, &k)
    cdef bint quote = k == 0 and only_field
    cdef char c
    for i in range(k):
        c = p[i]
        if c == b',' or c == b'"' or c == b'\r' or c == b'\n':
            quote = True
            break
    if not quote:
        return buf.put(p, k)
    buf.put_char(b'"')
    for i in range(k):
        c = p[i]
        if c == b'"':
            buf.put_char(b'"')
        buf.put_char(c)
    buf.put_char(b'"')
    return 0


cdef int _put_row(_Buffer buf, row) except -1:
    cdef tuple fields = row if type(row) is tuple else tuple(row)
    cdef Py_ssize_t i, nf = len(fields)
    cdef object x
    cdef double d, last_d = 0.0
    cdef char *s
    cdef char *last_s = NULL  # the previous float's text in this row (timestamps often repeat)
    cdef Py_ssize_t last_k = 0
    cdef int overflow
    cdef long long v
    try:
        for i in range(nf):
            if i:
                buf.put_char(b',')
            x = fields[i]
            if PyFloat_CheckExact(x):
                d = PyFloat_AS_DOUBLE(x)
                if last_s is not NULL and memcmp(&d, &last_d, sizeof(double)) == 0:  # the same bits: same text
                    buf.put(last_s, last_k)
                    continue
                s = PyOS_double_to_string(d, b'r', 0, Py_DTSF_ADD_DOT_0, NULL)
                PyMem_Free(last_s)
                last_s = s
                last_k = strlen(s)
                last_d = d
                buf.put(s, last_k)
            elif PyLong_CheckExact(x):
                v = PyLong_AsLongLongAndOverflow(x, &overflow)
                if overflow:
                    _put_text(buf, str(x), nf == 1)
                else:
                    _put_int(buf, v)
            elif x is None:
                _put_text(buf, "", nf == 1)
            elif PyUnicode_CheckExact(x):
                _put_text(buf, <str>x, nf == 1)
            else:
                _put_text(buf, str(x), nf == 1)
    finally:
        PyMem_Free(last_s)
    buf.put(b"\r\n", 2)
    return 0


def write_rows(f, rows) -> int:
    """Write each row (a sequence of fields) of `rows` to the binary file `f` as CSV; returns the row count."""
    cdef _Buffer buf = _Buffer(f.write)
    cdef Py_ssize_t count = 0
    for row in rows:
        _put_row(buf, row)
        count += 1
        if buf.n >= buf.flush_at:
            buf.flush()
    buf.flush()
    return count
