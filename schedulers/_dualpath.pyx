# cython: language_level=3, boundscheck=False, wraparound=False
"""The DualPath policy's inner loops in C (`DualPathPolicy`, schedulers/policies.py; built by setup.py, optional).

Each function equals a Python loop of policies.py on int64 values; a value outside int64 (or not an int)
raises OverflowError / TypeError and leaves its arguments as they were, and the caller then runs the Python
loop. The heaps use CPython's own heapreplace algorithm (bottom-up sift), so a heap ends in the same array
order as the Python loop leaves it.

- `heapreplace_run(heap, lens, shift)`: DE phase 1 while no group's R closes,

      for ln in lens:
          keys.append(heapq.heapreplace(heap, heap[0] + (ln << shift)))

- `phase1_closing(heap, lens, shift, free)`: DE phase 1 with each group's R closing at its free HBM (the
  loop at the end of `DualPathPolicy._phase1_ints`);
- `choose_pe(node_min, read_q, alpha)`: Algorithm 1 over per-node minima (`DualPathPolicy._choose_pe`);
- `node_min(tok, engines, beta)`: a node's least-loaded PE under beta (`DualPathPolicy._node_min`);
- `choose_de(free, tok, seq, group, need, z)`: DE phase 2's choice in a group (`DualPathPolicy._choose_de`);
- `has_duplicates(ids)`: every policy's check that a QueueWindow's request ids are unique (`_check_unique`).
"""

from cpython.mem cimport PyMem_Free, PyMem_Malloc

cdef long long _I64_MAX = 0x7FFFFFFFFFFFFFFF


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


cdef inline long long _int(object x) except? -1:
    """An int as int64; anything else (a float would be truncated by C's conversion) is refused."""
    if not isinstance(x, int):
        raise TypeError(f"not an int: {x!r}")
    return x


cdef long long _step(long long ln, int shift) except? -1:
    """ln << shift, refusing what leaves int64."""
    if ln > (_I64_MAX >> shift) or ln < -((_I64_MAX >> shift) + 1):
        raise OverflowError("phase-1 step outside int64")
    return ln << shift


cdef inline long long _add(long long k, long long s) except? -1:
    if (s > 0 and k > _I64_MAX - s) or (s < 0 and k < -_I64_MAX - 1 - s):
        raise OverflowError("phase-1 key outside int64")
    return k + s


cdef long long *_load_heap(list heap) except NULL:
    cdef Py_ssize_t n = len(heap), i
    if n == 0:
        raise IndexError("phase 1 on an empty heap")
    cdef long long *h = <long long *> PyMem_Malloc(n * sizeof(long long))
    if h == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            h[i] = _int(heap[i])
    except BaseException:
        PyMem_Free(h)
        raise
    return h


def heapreplace_run(list heap, lens, int shift):
    """Returns the list of keys replaced (one per request); updates `heap` in place. See the module docstring."""
    cdef Py_ssize_t n = len(heap), i, m
    cdef long long k
    cdef long long *h = _load_heap(heap)
    cdef const long long[::1] ln_view
    cdef list ln_list
    try:
        m = len(lens)
        keys = [None] * m
        if isinstance(lens, list):
            ln_list = lens
            for i in range(m):
                k = h[0]
                h[0] = _add(k, _step(_int(ln_list[i]), shift))
                _siftup(h, n, 0)
                keys[i] = k
        else:  # array('q') (a QueueWindow's lengths): read in place
            ln_view = lens
            for i in range(m):
                k = h[0]
                h[0] = _add(k, _step(ln_view[i], shift))
                _siftup(h, n, 0)
                keys[i] = k
        for i in range(n):
            heap[i] = h[i]
    finally:
        PyMem_Free(h)
    return keys


def phase1_closing(list heap, lens, int shift, list free):
    """DE phase 1 until every group's R closed (or the requests run out): returns (rl, keys, n_open), rl[i] =
    Σ len_r of R of the group of rank i, keys the packed key each request was given; updates `heap` in place.

    As the Python loop: for each request take the least-loaded group (heap top), add len_r to its load; while
    the group's R is open, add len_r to it if it still fits the group's free HBM, else close the group."""
    cdef Py_ssize_t n = len(heap), g = len(free), i, m, gi
    cdef long long k, ln, x, mask = (1 << shift) - 1
    cdef Py_ssize_t n_open = g
    if g != n:
        raise ValueError("phase1_closing needs one free-HBM value per group")
    cdef long long *h = _load_heap(heap)
    cdef long long *fr = <long long *> PyMem_Malloc(3 * g * sizeof(long long))
    if fr == NULL:
        PyMem_Free(h)
        raise MemoryError()
    cdef long long *rl = fr + g
    cdef long long *is_open = fr + 2 * g
    cdef list keys = []
    try:
        for i in range(g):
            fr[i] = _int(free[i])
            rl[i] = 0
            is_open[i] = 1
        m = len(lens)
        for i in range(m):
            ln = _int(lens[i])
            k = h[0]
            h[0] = _add(k, _step(ln, shift))
            _siftup(h, n, 0)
            keys.append(k)
            gi = k & mask
            if is_open[gi]:
                x = rl[gi] + ln
                if x <= fr[gi]:
                    rl[gi] = x
                else:
                    is_open[gi] = 0
                    n_open -= 1
                    if not n_open:
                        break
        for i in range(n):
            heap[i] = h[i]
        out = [rl[i] for i in range(g)]
    finally:
        PyMem_Free(h)
        PyMem_Free(fr)
    return out, keys, n_open


def choose_pe(dict node_min, read_q, alpha_tokens):
    """The PE of the lowest (tok, id) among nodes with read_q <= alpha, else among the other nodes; None when
    no node has a candidate (node_min: node -> (tok, id) or None)."""
    cdef long long t, e, bs_t = 0, bs_e = 0, bl_t = 0, bl_e = 0
    cdef bint short = False, long_ = False
    cdef tuple mt
    cdef long long rq, alpha = _int(alpha_tokens)
    for node, m in node_min.items():
        if m is None:
            continue
        mt = <tuple?> m
        if len(mt) != 2:
            raise TypeError(f"node_min values are (tok, id) pairs, got {m!r}")
        t = _int(mt[0])
        e = _int(mt[1])
        rq = _int(read_q[node])
        if rq <= alpha:
            if not short or t < bs_t or (t == bs_t and e < bs_e):
                bs_t, bs_e, short = t, e, True
        elif not long_ or t < bl_t or (t == bl_t and e < bl_e):
            bl_t, bl_e, long_ = t, e, True
    if short:
        return bs_e
    if long_:
        return bl_e
    return None


def node_min(tok, engines, beta_tokens):
    """(tok, id) of the lowest (tok, id) among `engines` with tok <= beta, or None (`DualPathPolicy._node_min`)."""
    cdef long long t, e, bt = 0, be = 0, beta = _int(beta_tokens)
    cdef bint found = False
    for eo in engines:
        e = _int(eo)
        t = _int(tok[eo])
        if t <= beta and (not found or t < bt or (t == bt and e < be)):
            bt, be, found = t, e, True
    return (bt, be) if found else None


cdef long long _EXACT = 1LL << 53  # ints below this convert to double exactly


def choose_de(free, tok, seq, group, need_tokens, double z):
    """DE phase 2's choice in a group (`DualPathPolicy._choose_de`): among DEs with free >= need, the fewest
    (seq, tok) with tok + need <= z, else the lowest tok; None when no DE has room."""
    cdef long long need = _int(need_tokens), t, f, q, e
    cdef long long in_e = 0, in_q = 0, in_t = 0, out_e = 0, out_t = 0
    cdef bint have_in = False, have_out = False
    for eo in group:
        e = _int(eo)
        f = _int(free[eo])
        if f < need:
            continue
        t = _int(tok[eo])
        if t + need >= _EXACT or t + need <= -_EXACT:
            raise OverflowError("load beyond 2**53: compared with Z as a float")
        if <double> (t + need) <= z:
            q = _int(seq[eo])
            if not have_in or q < in_q or (q == in_q and t < in_t):
                in_e, in_q, in_t, have_in = e, q, t, True
        elif not have_out or t < out_t:
            out_e, out_t, have_out = e, t, True
    if have_in:
        return in_e
    if have_out:
        return out_e
    return None


def has_duplicates(const long long[::1] ids):
    """Whether an int64 buffer (a QueueWindow's array('q') of request ids) holds a value twice (`_check_unique`):
    an open-addressing hash set in C instead of a Python set of 1,024 int objects per fetch."""
    cdef Py_ssize_t n = ids.shape[0], i
    cdef int bits = 1
    while (1 << bits) < 2 * n:
        bits += 1
    cdef size_t cap = 1 << bits, mask = cap - 1, h
    cdef unsigned long long x
    cdef unsigned long long *keys = <unsigned long long *> PyMem_Malloc(cap * sizeof(unsigned long long))
    cdef unsigned char *used = <unsigned char *> PyMem_Malloc(cap)
    if keys == NULL or used == NULL:
        PyMem_Free(keys)
        PyMem_Free(used)
        raise MemoryError()
    try:
        for i in range(<Py_ssize_t> cap):
            used[i] = 0
        for i in range(n):
            x = <unsigned long long> ids[i]
            h = <size_t> ((x * 0x9E3779B97F4A7C15ULL) >> (64 - bits)) if bits < 64 else <size_t> x
            while used[h]:
                if keys[h] == x:
                    return True
                h = (h + 1) & mask
            used[h] = 1
            keys[h] = x
        return False
    finally:
        PyMem_Free(keys)
        PyMem_Free(used)
