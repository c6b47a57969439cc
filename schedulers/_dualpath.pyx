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
- `phase1(gids, nodes, node_sums, group_states, lens, try_fast)`: a fetch's whole DE phase 1 (the group sums of
  `_Scratch`, the heap, both loops of `_phase1_ints`), the compiled fetch's (`DualPathPolicy._schedule_c`);
- `choose_pe(node_min, read_q, alpha)`: Algorithm 1 over per-node minima (`DualPathPolicy._choose_pe`);
- `node_min(tok, engines, beta)`: a node's least-loaded PE under beta (`DualPathPolicy._node_min`);
- `choose_de(free, tok, seq, group, need, z)`: DE phase 2's choice in a group (`DualPathPolicy._choose_de`);
- `has_duplicates(ids)`: every policy's check that a QueueWindow's request ids are unique (`_check_unique`);
- `Placement`: a whole fetch's placement loop after phase 1 (the PE, the DE, the read side and the loads of
  each request in turn), on C arrays (`DualPathPolicy.schedule`).
"""

from cpython cimport array
from cpython.mem cimport PyMem_Free, PyMem_Malloc

import array as _array_mod

cdef array.array _KEYS = _array_mod.array("q")  # the type of the key arrays the phase-1 loops return

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
    """k + s, refusing what leaves int64 (phase-1 keys, loads)."""
    if (s > 0 and k > _I64_MAX - s) or (s < 0 and k < -_I64_MAX - 1 - s):
        raise OverflowError("a key or load outside int64")
    return k + s


# ---- the policy's rules, each written once (the dict-based functions below and `Placement` both use them) ----
cdef long long _EXACT = 1LL << 53  # ints below this convert to double exactly


cdef inline bint _lower(long long a, long long b, bint have, long long ba, long long bb) noexcept nogil:
    """(a, b) < (ba, bb) as a pair, or True when nothing is held yet."""
    return not have or a < ba or (a == ba and b < bb)


cdef struct _PeBest:  # Algorithm 1 so far: the lowest (tok, id) on a node with read_q <= alpha, else on any node
    long long t, e, j
    bint have, short


cdef inline void _pe_offer(_PeBest *b, long long t, long long e, long long j, bint short) noexcept nogil:
    """Offer a node's least-loaded PE (tok t, id e; j: the caller's node index); `short`: read_q <= alpha."""
    if short:
        if not b.short or _lower(t, e, True, b.t, b.e):
            b.t, b.e, b.j, b.short, b.have = t, e, j, True, True
    elif not b.short and _lower(t, e, b.have, b.t, b.e):
        b.t, b.e, b.j, b.have = t, e, j, True


cdef struct _DeBest:  # DE phase 2 so far: the fewest (seq, tok) within Z, else the lowest tok
    long long in_q, in_t, in_k, out_t, out_k
    bint have_in, have_out


cdef inline bint _in_z(long long t, long long need, double z) except -1:
    """tok + need <= Z, compared as doubles (exact below 2**53; refused from there)."""
    cdef long long x = _add(t, need)
    if x >= _EXACT or x <= -_EXACT:
        raise OverflowError("load beyond 2**53: compared with Z as a float")
    return <double> x <= z


cdef inline void _de_offer_in(_DeBest *b, long long k, long long q, long long t) noexcept nogil:
    """Offer a DE with room within Z (seq q, tok t; k: the caller's key for it)."""
    if _lower(q, t, b.have_in, b.in_q, b.in_t):
        b.in_k, b.in_q, b.in_t, b.have_in = k, q, t, True


cdef inline void _de_offer_out(_DeBest *b, long long k, long long t) noexcept nogil:
    """Offer a DE with room beyond Z (tok t)."""
    if not b.have_out or t < b.out_t:
        b.out_k, b.out_t, b.have_out = k, t, True


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
    """Returns the keys replaced (one per request, an array('q'): no int object each); updates `heap` in place.
    See the module docstring."""
    cdef Py_ssize_t n = len(heap), i, m
    cdef long long k
    cdef long long *h = _load_heap(heap)
    cdef const long long[::1] ln_view
    cdef list ln_list
    cdef array.array keys
    try:
        m = len(lens)
        keys = array.clone(_KEYS, m, zero=False)
        if isinstance(lens, list):
            ln_list = lens
            for i in range(m):
                k = h[0]
                h[0] = _add(k, _step(_int(ln_list[i]), shift))
                _siftup(h, n, 0)
                keys.data.as_longlongs[i] = k
        else:
            try:  # array('q') (a QueueWindow's lengths): read in place
                ln_view = lens
            except (TypeError, ValueError):  # no int64 buffer (array('i'), a tuple): item by item below
                ln_view = None
            if ln_view is not None:
                for i in range(m):
                    k = h[0]
                    h[0] = _add(k, _step(ln_view[i], shift))
                    _siftup(h, n, 0)
                    keys.data.as_longlongs[i] = k
            else:  # (a ValueError "Buffer dtype mismatch" here made the policy fail where its Python loop ran)
                for i in range(m):
                    k = h[0]
                    h[0] = _add(k, _step(_int(lens[i]), shift))
                    _siftup(h, n, 0)
                    keys.data.as_longlongs[i] = k
        for i in range(n):
            heap[i] = h[i]
    finally:
        PyMem_Free(h)
    return keys


cdef long long _read_lens(object lens, long long *out, Py_ssize_t m) except? -1:
    """The requests' len_r into out[:m] (an array('q') read in place, else item by item, refusing non-ints);
    returns the smallest (0 when none is negative)."""
    cdef const long long[::1] view
    cdef Py_ssize_t i
    cdef long long ln, low = 0
    try:
        view = lens
    except (TypeError, ValueError):
        view = None
    for i in range(m):
        ln = view[i] if view is not None else _int(lens[i])
        out[i] = ln
        if ln < low:
            low = ln
    return low


cdef Py_ssize_t _closing_loop(long long *h, Py_ssize_t g, int shift, const long long *ln_c, Py_ssize_t m,
                              const long long *fr, long long *rl, long long *is_open, long long *keys,
                              Py_ssize_t *n_open) except -1:
    """DE phase 1's closing loop (`phase1_closing`, `phase1`) on the heap h of g packed keys: for each len_r in
    ln_c[:m] take the least-loaded group, add len_r to its load; while the group's R is open, add len_r to it if it
    still fits the group's free HBM fr, else close the group; stop once every group's R closed. Writes rl (Σ len_r
    of R per rank), is_open, the key each request was given into keys; returns how many, n_open[0] the groups
    still open."""
    cdef Py_ssize_t i, n_keys = 0
    cdef long long k, ln, x, mask = (1LL << shift) - 1
    for i in range(g):
        rl[i] = 0
        is_open[i] = 1
    n_open[0] = g
    for i in range(m):
        ln = ln_c[i]
        k = h[0]
        h[0] = _add(k, _step(ln, shift))
        _siftup(h, g, 0)
        keys[n_keys] = k
        n_keys += 1
        k &= mask
        if is_open[k]:
            x = _add(rl[k], ln)
            if x <= fr[k]:
                rl[k] = x
            else:
                is_open[k] = 0
                n_open[0] -= 1
                if not n_open[0]:
                    break
    return n_keys


def phase1_closing(list heap, lens, int shift, list free):
    """DE phase 1 until every group's R closed (or the requests run out): returns (rl, keys, n_open), rl[i] =
    Σ len_r of R of the group of rank i, keys the packed key each request was given (an array('q')); updates
    `heap` in place.

    As the Python loop: for each request take the least-loaded group (heap top), add len_r to its load; while
    the group's R is open, add len_r to it if it still fits the group's free HBM, else close the group."""
    cdef Py_ssize_t g = len(free), i, m = len(lens), n_keys, n_open
    if g != len(heap):
        raise ValueError("phase1_closing needs one free-HBM value per group")
    cdef long long *h = _load_heap(heap)
    cdef long long *fr
    try:
        fr = <long long *> _alloc(3 * g + m, sizeof(long long))
    except MemoryError:
        PyMem_Free(h)
        raise
    cdef long long *rl = fr + g
    cdef long long *is_open = fr + 2 * g
    cdef long long *ln_c = fr + 3 * g
    cdef array.array keys
    try:
        for i in range(g):
            fr[i] = _int(free[i])
        _read_lens(lens, ln_c, m)
        keys = array.clone(_KEYS, m, zero=False)
        n_keys = _closing_loop(h, g, shift, ln_c, m, fr, rl, is_open, keys.data.as_longlongs, &n_open)
        array.resize(keys, n_keys)
        for i in range(g):
            heap[i] = h[i]
        out = [rl[i] for i in range(g)]
    finally:
        PyMem_Free(h)
        PyMem_Free(fr)
    return out, keys, n_open


cdef inline long long _sum_field(list states, int field) except? -1:
    """Σ tok_e (field 0) or Σ free_hbm_tokens (field 1) of a group's EngineStates, refusing what leaves int64."""
    cdef long long x = 0
    for st in states:
        x = _add(x, _int(st.tok if field == 0 else st.free_hbm_tokens))
    return x


def phase1(list gids, dict nodes, bint node_sums, list group_states, lens, bint try_fast):
    """A fetch's DE phase 1 in C: `_Scratch.group_sums` and `DualPathPolicy._phase1_ints` in one call (the heap
    built and heapified here, the len_r read once). Returns (r_len, group_tok, keys, heap, shift, closed) as
    `_phase1_ints` returns (r_len, keys, heap, gids, shift, closed), with group_tok, the groups' Σ tok_e (dicts
    keyed by gid); `keys` an array('q').

    gids: the DE groups in sorted order (rank i = gids[i]); group_states[i]: group i's EngineStates. The sums are
    the nodes' `engine_tok` / `engine_free_hbm_tokens` when `node_sums` (a runner's live snapshot) and every group
    has both on its NodeState, else the sums of its engines' loads (`_Scratch.__init__`). `try_fast`: first the
    assign-only loop when no len_r is negative, kept when every group's R fits its free HBM (`_fast_r_len`), else
    the closing loop. Loads or lengths that are not ints or leave int64 raise TypeError / OverflowError (the
    caller runs the Python loops). The keys are unique (rank in the low bits), so each heapreplace takes the
    same key whatever the heap's array order: the keys and R do not depend on how the heap was built."""
    cdef Py_ssize_t g = len(gids), i, m = len(lens), n_keys = 0, n_open = g
    if g == 0 or len(group_states) != g:
        raise ValueError("phase1 needs one list of EngineStates per DE group, and at least one group")
    cdef int shift = 0
    while (<Py_ssize_t> 1 << shift) <= g:  # len(gids).bit_length()
        shift += 1
    cdef long long mask = (1LL << shift) - 1, k, min_ln = 0
    cdef long long *buf = <long long *> _alloc(6 * g + m, sizeof(long long))
    cdef long long *tok = buf
    cdef long long *fr = buf + g
    cdef long long *start = buf + 2 * g
    cdef long long *h = buf + 3 * g
    cdef long long *rl = buf + 4 * g
    cdef long long *is_open = buf + 5 * g
    cdef long long *ln_c = buf + 6 * g
    cdef array.array keys
    cdef bint sums_read = False, fast = False
    cdef dict r_len, group_tok
    try:
        if node_sums:  # `_Scratch.__init__`: the NodeStates' sums, unless a group lacks one
            try:
                t_objs = [nodes[gid].engine_tok for gid in gids]
                f_objs = [nodes[gid].engine_free_hbm_tokens for gid in gids]
            except (KeyError, AttributeError):
                t_objs = None
            if t_objs is not None and None not in t_objs and None not in f_objs:
                for i in range(g):
                    tok[i] = _int(t_objs[i])
                    fr[i] = _int(f_objs[i])
                sums_read = True
        if not sums_read:
            for i in range(g):
                tok[i] = _sum_field(<list?> group_states[i], 0)
                fr[i] = _sum_field(<list?> group_states[i], 1)
        for i in range(g):  # (load << S) | rank, heapified as heapq.heapify (bottom-up sift from the last parent)
            start[i] = _step(tok[i], shift) | i
        for i in range(g // 2 - 1, -1, -1):
            _siftup(start, g, i)
        min_ln = _read_lens(lens, ln_c, m)  # the lengths once
        for i in range(m):
            _step(ln_c[i], shift)  # every step fits int64 (the Python loops shift every length first)
        keys = array.clone(_KEYS, m, zero=False)
        if try_fast and min_ln >= 0:  # the assign-only loop, kept when every group's R fits (`_fast_r_len`)
            for i in range(g):
                h[i] = start[i]
            for i in range(m):
                k = h[0]
                h[0] = _add(k, ln_c[i] << shift)
                _siftup(h, g, 0)
                keys.data.as_longlongs[i] = k
            fast = True
            for i in range(g):
                k = h[i]
                if (k >> shift) - tok[k & mask] > fr[k & mask]:
                    fast = False
                    break
            if fast:
                n_keys = m
                for i in range(g):
                    rl[h[i] & mask] = (h[i] >> shift) - tok[h[i] & mask]
        if not fast:  # the closing loop (`phase1_closing`'s), from the heap as built
            for i in range(g):
                h[i] = start[i]
            n_keys = _closing_loop(h, g, shift, ln_c, m, fr, rl, is_open, keys.data.as_longlongs, &n_open)
            array.resize(keys, n_keys)
        r_len = {}
        group_tok = {}
        for i in range(g):
            gid = gids[i]
            r_len[gid] = rl[i]
            group_tok[gid] = tok[i]
        heap = [h[i] for i in range(g)]
        closed = not fast and n_open < g
    finally:
        PyMem_Free(buf)
    return r_len, group_tok, keys, heap, shift, closed


def choose_pe(dict node_min, read_q, alpha_tokens):
    """The PE of the lowest (tok, id) among nodes with read_q <= alpha, else among the other nodes; None when
    no node has a candidate (node_min: node -> (tok, id) or None)."""
    cdef _PeBest best = _PeBest(0, 0, 0, False, False)
    cdef tuple mt
    cdef long long t, e, alpha = _int(alpha_tokens)
    for node, m in node_min.items():
        if m is None:
            continue
        mt = <tuple?> m
        if len(mt) != 2:
            raise TypeError(f"node_min values are (tok, id) pairs, got {m!r}")
        t = _int(mt[0])
        e = _int(mt[1])
        _pe_offer(&best, t, e, 0, _int(read_q[node]) <= alpha)
    return best.e if best.have else None


def node_min(tok, engines, beta_tokens):
    """(tok, id) of the lowest (tok, id) among `engines` with tok <= beta, or None (`DualPathPolicy._node_min`)."""
    cdef long long t, e, bt = 0, be = 0, beta = _int(beta_tokens)
    cdef bint found = False
    for eo in engines:
        e = _int(eo)
        t = _int(tok[eo])
        if t <= beta and _lower(t, e, found, bt, be):
            bt, be, found = t, e, True
    return (bt, be) if found else None


def choose_de(free, tok, seq, group, need_tokens, double z):
    """DE phase 2's choice in a group (`DualPathPolicy._choose_de`): among DEs with free >= need, the fewest
    (seq, tok) with tok + need <= z, else the lowest tok; None when no DE has room."""
    cdef long long need = _int(need_tokens), t, e
    cdef _DeBest best = _DeBest(0, 0, 0, 0, 0, False, False)
    for eo in group:
        e = _int(eo)
        if _int(free[eo]) < need:
            continue
        t = _int(tok[eo])
        if _in_z(t, need, z):
            _de_offer_in(&best, e, _int(seq[eo]), t)
        else:
            _de_offer_out(&best, e, t)
    if best.have_in:
        return best.in_k
    if best.have_out:
        return best.out_k
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


cdef object _heapreplace = __import__("heapq").heapreplace


cdef void *_alloc(Py_ssize_t n, size_t size) except NULL:
    cdef void *p = PyMem_Malloc((n if n > 0 else 1) * size)
    if p == NULL:
        raise MemoryError()
    return p


cdef class Placement:
    """One DualPath fetch's placement loop in C (`DualPathPolicy.schedule` after phase 1), on C arrays.

    `Placement(pe_nodes, pe_states, beta)` reads the candidate PEs' tok_e (node by node: `pe_nodes` maps a
    node to its PE ids, `pe_states` to their EngineStates, same order) and each node's least-loaded PE under
    beta; `any_pe()` says whether some PE may take work (the fetch's early stop, before phase 1); `place(...)`
    runs the loop and returns the Assignments, the same as the Python loop. Values C cannot hold exactly
    raise OverflowError/TypeError; nothing the caller sees changes except `group_of`/`pheap` (extended
    exactly as the Python loop's `assign_group` would)."""

    cdef Py_ssize_t n_pn, n_pe
    cdef long long beta
    cdef list pe_node_ids
    cdef long long *pe_id
    cdef long long *pe_tok
    cdef Py_ssize_t *pe_off  # node j's PEs: pe_off[j] .. pe_off[j + 1]
    cdef long long *nm_t  # node j's least-loaded PE under beta: (tok, id, index), nm_ok[j]
    cdef long long *nm_e
    cdef Py_ssize_t *nm_i
    cdef char *nm_ok
    cdef long long *rq  # read_q per dense node index (PE nodes first), rq_ok[i]: read
    cdef char *rq_ok
    cdef Py_ssize_t *de_off  # group i's DEs: de_off[i] .. de_off[i + 1]
    cdef long long *de_id
    cdef long long *de_tok
    cdef long long *de_seq
    cdef long long *de_free
    cdef Py_ssize_t *de_node  # dense node index of each DE
    cdef char *g_ok  # the group's DEs are loaded and its Z computed
    cdef double *z

    def __cinit__(self, dict pe_nodes, dict pe_states, beta_tokens):
        cdef Py_ssize_t j, x = 0
        self.beta = _int(beta_tokens)
        self.pe_node_ids = list(pe_nodes)
        self.n_pn = len(self.pe_node_ids)
        self.n_pe = 0
        for nid in self.pe_node_ids:
            self.n_pe += len(pe_nodes[nid])
        self.pe_id = <long long *> _alloc(self.n_pe, sizeof(long long))
        self.pe_tok = <long long *> _alloc(self.n_pe, sizeof(long long))
        self.pe_off = <Py_ssize_t *> _alloc(self.n_pn + 1, sizeof(Py_ssize_t))
        self.nm_t = <long long *> _alloc(self.n_pn, sizeof(long long))
        self.nm_e = <long long *> _alloc(self.n_pn, sizeof(long long))
        self.nm_i = <Py_ssize_t *> _alloc(self.n_pn, sizeof(Py_ssize_t))
        self.nm_ok = <char *> _alloc(self.n_pn, 1)
        for j in range(self.n_pn):
            nid = self.pe_node_ids[j]
            ids = pe_nodes[nid]
            states = pe_states[nid]
            if len(ids) != len(states):
                raise ValueError("one EngineState per PE id")
            self.pe_off[j] = x
            for i in range(len(ids)):
                self.pe_id[x] = _int(ids[i])
                self.pe_tok[x] = _int(states[i].tok)
                x += 1
            self.pe_off[j + 1] = x
            self._node_min(j)

    def __dealloc__(self):
        PyMem_Free(self.pe_id)
        PyMem_Free(self.pe_tok)
        PyMem_Free(self.pe_off)
        PyMem_Free(self.nm_t)
        PyMem_Free(self.nm_e)
        PyMem_Free(self.nm_i)
        PyMem_Free(self.nm_ok)
        PyMem_Free(self.rq)
        PyMem_Free(self.rq_ok)
        PyMem_Free(self.de_off)
        PyMem_Free(self.de_id)
        PyMem_Free(self.de_tok)
        PyMem_Free(self.de_seq)
        PyMem_Free(self.de_free)
        PyMem_Free(self.de_node)
        PyMem_Free(self.g_ok)
        PyMem_Free(self.z)

    cdef void _node_min(self, Py_ssize_t j) noexcept:
        cdef Py_ssize_t i
        cdef long long t, e
        self.nm_ok[j] = 0
        for i in range(self.pe_off[j], self.pe_off[j + 1]):
            t = self.pe_tok[i]
            e = self.pe_id[i]
            if t <= self.beta and _lower(t, e, self.nm_ok[j], self.nm_t[j], self.nm_e[j]):
                self.nm_t[j], self.nm_e[j], self.nm_i[j], self.nm_ok[j] = t, e, i, 1

    def any_pe(self):
        """Whether some candidate PE has tok_e <= beta (else Algorithm 1 places nothing)."""
        cdef Py_ssize_t j
        for j in range(self.n_pn):
            if self.nm_ok[j]:
                return True
        return False

    def place(self, queue, lens, group_of, list pheap, int shift, list gids, dict r_len, dict group_tok,
              dict de_groups, dict state_of, dict node_of, dict nodes, alpha_tokens, double slack,
              int side_mode, assignment):
        """Per request in FIFO order: the PE by Algorithm 1 over the nodes' least-loaded PEs under beta (stop
        when none); its DE group from phase 1 (`group_of` packed keys, extended lazily from `pheap`), Z of
        the group at its first placement (slack * (R + Σ tok_e) / |E|, the group's DE loads read then from
        `state_of`); the DE as `choose_de` (stop when none has room); the read side by `side_mode` (0: the
        node with the shorter read queue, ties PE; 1: DE; 2: PE); then the loads as `_Scratch.commit`
        updates them. Read queues come from `nodes` (NodeState.read_queue_tokens) on first use. Call once."""
        if self.de_off != NULL:
            raise RuntimeError("Placement.place runs once")
        cdef Py_ssize_t n_pn = self.n_pn, n_g = len(gids), n_de = 0, i, j, k, gi, a, x
        cdef long long alpha = _int(alpha_tokens)
        cdef long long mask = (1 << shift) - 1, t, prompt, hit, need, de_hit
        cdef Py_ssize_t best_j, de_i, n_nodes = n_pn
        cdef _PeBest pe
        cdef _DeBest de
        cdef dict dense = {}  # node id -> dense index (PE node j is j)
        cdef list out = []
        cdef list pe_node_ids = self.pe_node_ids
        for g in gids:
            n_de += len(de_groups[g])
        self.rq = <long long *> _alloc(n_pn + n_de, sizeof(long long))
        self.rq_ok = <char *> _alloc(n_pn + n_de, 1)
        self.de_off = <Py_ssize_t *> _alloc(n_g + 1, sizeof(Py_ssize_t))
        self.de_id = <long long *> _alloc(n_de, sizeof(long long))
        self.de_tok = <long long *> _alloc(n_de, sizeof(long long))
        self.de_seq = <long long *> _alloc(n_de, sizeof(long long))
        self.de_free = <long long *> _alloc(n_de, sizeof(long long))
        self.de_node = <Py_ssize_t *> _alloc(n_de, sizeof(Py_ssize_t))
        self.g_ok = <char *> _alloc(n_g, 1)
        self.z = <double *> _alloc(n_g, sizeof(double))
        for i in range(n_pn + n_de):
            self.rq_ok[i] = 0
        for j in range(n_pn):
            dense[pe_node_ids[j]] = j
        x = 0
        for i in range(n_g):
            self.g_ok[i] = 0
            self.de_off[i] = x
            x += len(de_groups[gids[i]])
            self.de_off[i + 1] = x

        cdef Py_ssize_t n_keys = len(group_of)
        k = -1
        for r in queue:
            k += 1
            if k >= n_keys:  # every group's R closed in phase 1: this request's group, lazily (`assign_group`)
                k0 = pheap[0]
                _heapreplace(pheap, k0 + (lens[k] << shift))
                group_of.append(k0)
                n_keys += 1
            # the PE: Algorithm 1 over the nodes' minima (read_q <= alpha first)
            pe = _PeBest(0, 0, 0, False, False)
            for j in range(n_pn):
                if not self.nm_ok[j]:
                    continue
                if not self.rq_ok[j]:
                    self.rq[j] = _int(nodes[pe_node_ids[j]].read_queue_tokens)
                    self.rq_ok[j] = 1
                _pe_offer(&pe, self.nm_t[j], self.nm_e[j], j, self.rq[j] <= alpha)
            if not pe.have:
                break
            best_j = pe.j
            gi = _int(group_of[k]) & mask
            if gi >= n_g:
                raise IndexError(f"phase-1 key {group_of[k]} names group rank {gi} of {n_g}")
            if not self.g_ok[gi]:  # the fetch's first placement in this group: its DEs as the snapshot has them
                g = gids[gi]
                a = self.de_off[gi]
                group = de_groups[g]
                if len(group) != self.de_off[gi + 1] - a:
                    raise RuntimeError(f"DE group {g} changed size during the fetch")
                for eo in group:
                    st = state_of[eo]
                    self.de_id[a] = _int(eo)
                    self.de_tok[a] = _int(st.tok)
                    self.de_seq[a] = _int(st.seq)
                    self.de_free[a] = _int(st.free_hbm_tokens)
                    nid = node_of[eo]
                    x = dense.get(nid, -1)
                    if x < 0:
                        x = dense[nid] = n_nodes
                        n_nodes += 1
                    self.de_node[a] = x
                    a += 1
                t = _add(_int(r_len[g]), _int(group_tok[g]))
                if t >= _EXACT or t <= -_EXACT:
                    raise OverflowError("a group load beyond 2**53: Z is computed as a float")
                self.z[gi] = slack * <double> t / <double> (self.de_off[gi + 1] - self.de_off[gi])
                self.g_ok[gi] = 1
            # the DE in the group (`choose_de`)
            prompt = _int(r.prompt_tokens)
            hit = _int(r.hit_tokens)
            need = _int(r.total_tokens)
            de = _DeBest(0, 0, 0, 0, 0, False, False)
            for de_i in range(self.de_off[gi], self.de_off[gi + 1]):
                if self.de_free[de_i] < need:
                    continue
                t = self.de_tok[de_i]
                if _in_z(t, need, self.z[gi]):
                    _de_offer_in(&de, de_i, self.de_seq[de_i], t)
                else:
                    _de_offer_out(&de, de_i, t)
            if de.have_in:
                de_i = de.in_k
            elif de.have_out:
                de_i = de.out_k
            else:
                break
            # the read side, then the loads (`_Scratch.commit`)
            x = self.de_node[de_i]
            if not self.rq_ok[x]:
                self.rq[x] = _int(nodes[node_of[self.de_id[de_i]]].read_queue_tokens)
                self.rq_ok[x] = 1
            if side_mode == 1 or (side_mode == 0 and self.rq[x] < self.rq[best_j]):
                side, frac = "de", 1.0
                if hit >= _EXACT or hit <= -_EXACT:
                    raise OverflowError("hit tokens beyond 2**53: round(hit * 1.0) is not exact")
                de_hit = hit
            else:
                side, frac = "pe", 0.0
                de_hit = 0
            a = self.nm_i[best_j]
            self.pe_tok[a] = _add(self.pe_tok[a], prompt)
            self.de_tok[de_i] = _add(self.de_tok[de_i], need)
            self.de_seq[de_i] = _add(self.de_seq[de_i], 1)
            self.de_free[de_i] = _add(self.de_free[de_i], -need)
            self.rq[best_j] = _add(self.rq[best_j], hit - de_hit)
            self.rq[x] = _add(self.rq[x], de_hit)
            out.append(assignment(r.request_id, pe.e, self.de_id[de_i], side, frac))
            self._node_min(best_j)
        return out
