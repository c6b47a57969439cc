"""The compiled hot paths (setup.py, Cython) give exactly what their Python twins give.

- `heap.TimeHeap` (C) pops in the same order as `heap.PyTimeHeap` (heapq) and releases what it held;
- network.py compiled gives bit-identical completion times, link buckets and totals to network.py run as
  Python source, on random mixes of flows, caps, high-priority loads and reservations;
- `schedulers._dualpath`: DE phase 1's two loops equal their heapq loops (keys, R per group and the heap's array
  order), and the PE choice, a node's PE minimum, the DE choice and the duplicate-id check equal the Python ones; whole DualPath fetches (`place`: the placement loop in C, its lazy groups and its hand-over to
  Python) are the same with and without it;
- `_csvrows.write_rows` writes the bytes `csv.writer` writes, on awkward fields and on a simulation's results;
- a whole simulation with DUALPATH_PURE_PYTHON=1 (every Python twin) gives the same records and link bytes.
"""

import array
import dataclasses
import hashlib
import heapq
import importlib.util
import math
import os
import random
import shutil
import subprocess
import sys
import weakref

import pytest

from dualpath_jax import compiled
from dualpath_jax.sim import heap as heap_mod
from dualpath_jax.sim import network as network_mod

_HAVE_CC = shutil.which("cc") is not None or shutil.which("gcc") is not None


def test_compiled_paths_are_built_where_a_compiler_exists():
    """`pip install -e .` builds them (setup.py); a silent fallback to Python would only make runs slower."""
    if compiled.PURE_PYTHON:
        pytest.skip("DUALPATH_PURE_PYTHON is set: the Python twins run on purpose")
    if not _HAVE_CC:
        pytest.skip("no C compiler here: the package installs as pure Python (same results, slower)")
    assert compiled.status() == {
        "simulator": True,
        "network": True,
        "heap": True,
        "policy": True,
        "csv": True,
        "store_verify": True,
    }, "the compiled extensions are missing: reinstall with `pip install -e .` (setup.py builds them)"


def _python_network():
    """network.py loaded from its source as a separate module, with the heapq-based completion heap."""
    path = os.path.join(os.path.dirname(network_mod.__file__), "network.py")
    spec = importlib.util.spec_from_file_location("_network_source_for_tests", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.TimeHeap = heap_mod.PyTimeHeap
    return mod


# ---- the heap -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(20))
def test_time_heap_pops_in_the_same_order_as_heapq(seed):
    rng = random.Random(seed)
    fast, ref = heap_mod.TimeHeap(), heap_mod.PyTimeHeap()
    seq = 0
    times = [rng.uniform(0, 10) for _ in range(8)] + [0.0, math.inf]  # repeated times: ties on (k1, k2)
    for _ in range(rng.randint(50, 3000)):
        if rng.random() < 0.55 or not ref:
            seq += 1
            t = rng.choice(times) if rng.random() < 0.5 else rng.uniform(-5, 20)
            k1 = rng.randint(0, 50)
            entry = (t, k1, seq, object(), ("payload", seq))
            fast.push(*entry)
            ref.push(*entry)
        else:
            assert fast.top_t() == ref.top_t()
            assert fast.pop() == ref.pop()
        assert len(fast) == len(ref) and bool(fast) == bool(ref)
    while ref:
        assert fast.pop() == ref.pop()
    assert fast.top_t() == math.inf and not fast
    with pytest.raises(IndexError):
        fast.pop()


def test_time_heap_releases_its_references():
    class Payload:
        pass

    h = heap_mod.TimeHeap()
    objs = [Payload() for _ in range(600)]  # more than the first allocation: the array grows
    refs = [weakref.ref(o) for o in objs]
    for i in range(len(objs)):
        h.push(float(i % 7), i, 0, objs[i], objs[i])
    sorted_entries = sorted(h.entries(), key=lambda e: (e[0], e[1], e[2]))
    del objs
    assert all(r() is not None for r in refs)  # the heap keeps them alive
    for i in range(300):
        assert h.pop()[:3] == sorted_entries[i][:3]
    del sorted_entries
    assert sum(r() is None for r in refs) == 300  # popped and dropped: freed
    del h
    assert all(r() is None for r in refs)  # the heap's own references go with it


# ---- the network ----------------------------------------------------------------------------------------
def _drive(mod, seed, n_flows, defer, coalesce):
    """Random flows (some capped), high-priority loads and reservations on a small topology, run by the
    simulator's loop (wake + check_due, settle per instant). Returns the exact outcome."""
    rng = random.Random(seed)
    net = mod.FlowNetwork(bucket_s=0.7)
    net.defer = defer
    net.coalesce_s = coalesce
    events = []
    seq = [0]

    def push(t, kind, arg):
        seq[0] += 1
        heapq.heappush(events, (t, seq[0], kind, arg))

    net.wake = lambda t: push(t, "check", None)
    links = [net.add_link(f"l{k}", rng.uniform(1, 10), high_share=rng.choice((0.99, 0.5))) for k in range(6)]
    for i in range(n_flows):
        path = tuple(rng.sample(links, rng.randint(1, 3)))
        cap = rng.choice((math.inf, math.inf, rng.uniform(0.2, 3)))
        t0 = rng.uniform(0, 6)
        push(t0, "start", (i, path, rng.uniform(1, 30), cap))
        if cap < math.inf and rng.random() < 0.5:  # (a paced write-back whose decode ended: `set_max_rate`)
            push(t0 + rng.uniform(0, 4), "uncap", i)
    for _ in range(6):
        push(rng.uniform(0, 8), "high", (rng.choice(links), rng.choice((0.0, rng.uniform(0, 12)))))
    for _ in range(4):
        # paced write-backs hold little (the simulator reserves <= 1% of a link), so no flow stalls for good
        cut = rng.choice((None, rng.uniform(0.1, 0.9)))  # cut short at that share of its span: `cut_reservation`
        push(
            rng.uniform(0, 8),
            "reserve",
            (tuple(rng.sample(links, 2)), rng.uniform(0.005, 0.02), rng.uniform(0.001, 0.005), cut),
        )
    done = {}
    flows = {}  # i -> its Flow
    live = set()  # reservations not released or cut yet
    clock = [0.0]  # the time now, read by the completion callbacks
    while events:
        t, _, kind, arg = heapq.heappop(events)
        clock[0] = t
        if kind == "start":
            i, path, size, cap = arg
            flows[i] = net.start_flow(path, size, t, lambda i=i: done.__setitem__(i, clock[0]), cap)
        elif kind == "high":
            net.set_high_load(arg[0], arg[1], t)
        elif kind == "reserve":
            path, nbytes, rate, cut = arg
            end = net.reserve(path, nbytes, rate, t)
            live.add(net._resv_seq)
            push(end, "release", (net._resv_seq, path, rate))
            if cut is not None:
                push(t + cut * (end - t), "cut", (net._resv_seq, path, rate, end))
        elif kind == "release":
            if arg[0] in live:
                live.discard(arg[0])
                net.release(*arg[1:])
        elif kind == "cut":  # its bytes after now go as a flow
            if arg[0] in live:
                live.discard(arg[0])
                left = net.cut_reservation(*arg, t)
                if left > 1e-3:
                    net.start_flow(arg[1], left, t, lambda: None)
        elif kind == "uncap":
            net.set_max_rate(flows[arg], math.inf, t)
        else:
            fl = net.check_due(t)
            net.finish_flows(fl, t)
            for f in fl:
                f.on_done()
        if not events or events[0][0] > t:
            net.settle(t)
    net.flush(clock[0])
    return done, [dict(b) for b in net.buckets], [dict(b) for b in net.high_bytes], list(net.link_total), net.solves


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("defer,coalesce,n_flows", [(True, 0.0, 40), (False, 0.0, 25), (True, 0.05, 300)])
def test_compiled_network_is_bit_identical_to_its_source(seed, defer, coalesce, n_flows):
    if not compiled.status()["network"]:
        pytest.skip("network.py is not compiled in this install (pure-Python package or DUALPATH_PURE_PYTHON)")
    fast = _drive(network_mod, seed, n_flows, defer, coalesce)
    ref = _drive(_python_network(), seed, n_flows, defer, coalesce)
    assert len(fast[0]) == n_flows
    assert fast == ref  # exact: same completion times, buckets, totals and solve count


def test_compiled_network_keeps_the_python_api():
    net = network_mod.FlowNetwork(bucket_s=1.0)
    a = net.add_link("a", 10.0)
    net.scheduler = lambda t, f, v: None
    f = net.start_flow((a,), 5.0, 0.0, None)
    assert (f.fid, f.path, f.size, f.rate) == (0, (a,), 5.0, 10.0)
    with pytest.raises(ValueError, match="positive size"):
        net.start_flow((a,), 0.0, 0.0, None)
    if compiled.status()["network"]:
        with pytest.raises(AttributeError):
            net.no_such_attribute = 1  # compiled: a fixed set of attributes, like __slots__


# ---- the DualPath policy's loops -------------------------------------------------------------------------
def _dualpath_c():
    from schedulers import policies

    if policies._dualpath_c is None:
        pytest.skip("schedulers._dualpath is not built in this install")
    return policies._dualpath_c


def _phase1_case(rng):
    n = rng.randint(1, 120)
    shift = n.bit_length()
    heap = [(rng.randint(0, 10**12) << shift) | i for i in range(n)]
    heapq.heapify(heap)
    lens = [rng.randint(0, 70000) for _ in range(rng.choice([0, 1, rng.randint(2, 3000)]))]
    return heap, lens, shift


@pytest.mark.parametrize("seed", range(30))
def test_phase1_assign_loop_in_c_equals_heapq(seed):
    c = _dualpath_c()
    heap, lens, shift = _phase1_case(random.Random(seed))
    ref_heap, ref_keys = heap[:], []
    for ln in lens:
        ref_keys.append(heapq.heapreplace(ref_heap, ref_heap[0] + (ln << shift)))
    for form in (list, lambda x: array.array("q", x)):  # a list, or a QueueWindow's array('q')
        got_heap = heap[:]
        assert list(c.heapreplace_run(got_heap, form(lens), shift)) == ref_keys
        assert got_heap == ref_heap  # same array order, not only the same multiset


@pytest.mark.parametrize("seed", range(30))
def test_phase1_closing_loop_in_c_equals_python(seed):
    c = _dualpath_c()
    rng = random.Random(1000 + seed)
    heap, lens, shift = _phase1_case(rng)
    free = [rng.choice([0, rng.randint(0, 200_000), rng.randint(0, 10**7)]) for _ in heap]
    # the reference: the Python loop of DualPathPolicy._phase1_ints
    mask = (1 << shift) - 1
    ref_heap, ref_keys = heap[:], []
    rl, is_open, n_open = [0] * len(heap), [True] * len(heap), len(heap)
    for ln in lens:
        k = ref_heap[0]
        heapq.heapreplace(ref_heap, k + (ln << shift))
        ref_keys.append(k)
        i = k & mask
        if is_open[i]:
            if rl[i] + ln <= free[i]:
                rl[i] += ln
            else:
                is_open[i] = False
                n_open -= 1
                if not n_open:
                    break
    for form in (list, lambda x: array.array("q", x)):
        got_heap = heap[:]
        got_rl, got_keys, got_open = c.phase1_closing(got_heap, form(lens), shift, free)
        assert (got_rl, list(got_keys), got_open) == (rl, ref_keys, n_open)
        assert got_heap == ref_heap


def test_phase1_loops_in_c_refuse_what_leaves_int64():
    c = _dualpath_c()
    for run in (lambda h, ln: c.heapreplace_run(h, ln, 1), lambda h, ln: c.phase1_closing(h, ln, 1, [10**6] * 2)):
        heap = [5, 2**62]
        with pytest.raises(OverflowError):
            run(heap, [1, 2**61 - 1, 2**61])  # the third key leaves int64
        assert heap == [5, 2**62]  # left as it was: the caller runs the Python loop on it
        with pytest.raises(OverflowError):
            run(heap, [2**62])  # the step itself
        with pytest.raises(TypeError):
            run(heap, [1.5])  # float lengths: the caller's tuple path
        assert heap == [5, 2**62]
    with pytest.raises(OverflowError):
        c.heapreplace_run([2**64], [1], 1)


@pytest.mark.parametrize("seed", range(40))
def test_pe_choice_in_c_equals_python(seed, monkeypatch):
    from schedulers import policies

    c = _dualpath_c()
    rng = random.Random(seed)
    nodes = rng.sample(range(200), rng.randint(0, 50))
    pool = [rng.randint(0, 10**6) for _ in range(8)]  # repeated loads: ties broken by engine id
    node_min = {n: rng.choice([None, (rng.choice(pool), rng.randint(0, 2000))]) for n in nodes}
    read_q = {n: rng.choice([0, rng.randint(0, 5 * 10**6)]) for n in nodes}
    alpha = rng.choice([0, 3_000_000, 10**9])
    pol = policies.DualPathPolicy(policies.DualPathConfig(alpha_tokens=alpha, beta_tokens=1))
    s = policies._Scratch.__new__(policies._Scratch)
    s.read_q = read_q
    got = pol._choose_pe(s, node_min)
    assert got == c.choose_pe(node_min, read_q, pol.config.alpha_tokens)  # 0 means "derive"
    monkeypatch.setattr(policies, "_dualpath_c", None)
    assert pol._choose_pe(s, node_min) == got


def test_pe_choice_in_c_refuses_floats_and_huge_ints():
    c = _dualpath_c()
    with pytest.raises(TypeError):
        c.choose_pe({0: (1.5, 3)}, {0: 0}, 10)
    with pytest.raises(TypeError):
        c.choose_pe({0: (1, 3)}, {0: 0.5}, 10)
    with pytest.raises(OverflowError):
        c.choose_pe({0: (2**70, 3)}, {0: 0}, 10)


@pytest.mark.parametrize("seed", range(40))
def test_node_min_and_de_choice_in_c_equal_python(seed, monkeypatch):
    from schedulers import PendingRequest, policies

    c = _dualpath_c()
    rng = random.Random(seed)
    engines = rng.sample(range(500), rng.randint(0, 12))
    pool = [rng.randint(0, 10**6) for _ in range(4)]  # repeated loads: ties broken by seq, then engine order
    tok = {e: rng.choice(pool) for e in engines}
    seq = {e: rng.randint(0, 3) for e in engines}
    free = {e: rng.choice([0, rng.randint(0, 2 * 10**6)]) for e in engines}
    beta = rng.choice([0, 500_000, 10**7])
    need = rng.randint(1, 200_000)
    z = rng.choice([0.0, rng.uniform(0, 2 * 10**6), float(max(pool) + need), math.inf])
    pol = policies.DualPathPolicy(policies.DualPathConfig(alpha_tokens=1, beta_tokens=beta))
    s = policies._Scratch.__new__(policies._Scratch)
    s.tok, s.seq, s.free = tok, seq, free
    r = PendingRequest(0, 0, 0, need, 0, 0)
    got = (pol._node_min(s, engines), pol._choose_de(s, r, engines, z))
    beta = pol.config.beta_tokens  # 0 means "derive": the config holds the value used
    assert got == (c.node_min(tok, engines, beta), c.choose_de(free, tok, seq, engines, need, z))
    monkeypatch.setattr(policies, "_dualpath_c", None)
    assert (pol._node_min(s, engines), pol._choose_de(s, r, engines, z)) == got


def test_node_min_and_de_choice_in_c_refuse_what_c_cannot_compare():
    c = _dualpath_c()
    with pytest.raises(TypeError):
        c.node_min({1: 2.5}, [1], 10)
    with pytest.raises(TypeError):
        c.choose_de({1: 10}, {1: 0.5}, {1: 0}, [1], 1, 5.0)
    with pytest.raises(OverflowError):  # compared with Z as a double: exact only below 2**53
        c.choose_de({1: 2**60}, {1: 2**53}, {1: 0}, [1], 1, 5.0)


@pytest.mark.parametrize("seed", range(20))
def test_duplicate_ids_check_in_c_equals_a_set(seed, monkeypatch):
    from schedulers import PendingRequest, policies
    from schedulers.api import QueueWindow

    c = _dualpath_c()
    rng = random.Random(seed)
    n = rng.choice([0, 1, 2, 7, 1024, 5000])
    ids = [rng.randrange(-(2**62), 2**62) for _ in range(n)]
    if n > 1 and seed % 2:
        ids[rng.randrange(n)] = ids[rng.randrange(n)]
    dup = len(set(ids)) != n
    assert c.has_duplicates(array.array("q", ids)) == dup
    reqs = [PendingRequest(i, 0, 0, 1, 0, 0) for i in ids]
    window = QueueWindow(reqs, array.array("q", ids), array.array("q", [1] * n))
    for mod in (c, None):  # _check_unique with and without the C set
        monkeypatch.setattr(policies, "_dualpath_c", mod)
        if dup:
            with pytest.raises(ValueError, match="same request_id twice"):
                policies._check_unique(window)
        else:
            policies._check_unique(window)


def _random_snapshot(rng):
    from schedulers import ClusterSnapshot, EngineState, NodeState, PendingRequest

    pn, dn, g = rng.choice([(1, 1, 1), (2, 4, 8), (3, 5, 2), (12, 24, 8)])
    engines, nodes, eid = {}, {}, 0
    for nid in range(pn + dn):
        role = "prefill" if nid < pn else "decode"
        nodes[nid] = NodeState(nid, role, read_queue_tokens=rng.choice([0, rng.randrange(0, 6_000_000)]))
        for _ in range(g):
            engines[eid] = EngineState(
                eid,
                role,
                nid,
                seq=rng.randrange(0, 60),
                tok=rng.choice([0, rng.randrange(0, 800_000)]),
                free_hbm_tokens=rng.choice([rng.randrange(0, 100_000), rng.randrange(0, 2_000_000)]),
            )
            eid += 1
    queue = [
        PendingRequest(
            i, i, 0, (p := rng.randrange(1, 60_000)), rng.randrange(0, p + 1) // 64 * 64, rng.randrange(0, 3000)
        )
        for i in range(rng.choice([0, 1, 5, 300, 1024]))
    ]
    return ClusterSnapshot(0.0, engines, nodes), queue, pn + dn


@pytest.mark.parametrize("seed", range(25))
@pytest.mark.parametrize("name", ["dualpath", "de_only", "pe_only"])
def test_dualpath_fetches_are_the_same_without_the_c_loops(seed, name, monkeypatch):
    """Whole fetches (phase 1 closing or not, every PE choice) place the same requests the same way."""
    from schedulers import make_policy, policies

    _dualpath_c()
    rng = random.Random(seed)
    snapshot, queue, n_nodes = _random_snapshot(rng)
    kw = {"alpha_tokens": rng.choice([1, 3_000_000]), "beta_tokens": rng.choice([1, 300_000, 10_000_000])}
    runs = []
    for c in (policies._dualpath_c, None):
        monkeypatch.setattr(policies, "_dualpath_c", c)
        pol = make_policy(name, **kw)
        out = []
        for node in (None, 0, n_nodes - 1, 0, None):  # consecutive fetches: the fast loop is tried again
            out.append(pol.schedule(snapshot, queue, fetching_node=node))
        runs.append(out)
    assert runs[0] == runs[1]


def _place_calls(monkeypatch, c):
    """Wrap `_dualpath.Placement` to record each `place` call's outcome ('ok' or the exception's name)."""
    from schedulers import policies

    calls = []

    class _Placement:
        def __init__(self, *args):
            self._p = c.Placement(*args)

        def any_pe(self):
            return self._p.any_pe()

        def place(self, *args):
            try:
                out = self._p.place(*args)
            except Exception as e:
                calls.append(type(e).__name__)
                raise
            calls.append("ok")
            return out

    class _Wrapped:
        Placement = _Placement

        def __getattr__(self, name):
            return getattr(c, name)

    monkeypatch.setattr(policies, "_dualpath_c", _Wrapped())
    return calls


@pytest.mark.parametrize("name", ["dualpath", "de_only", "pe_only"])
def test_place_in_c_continues_groups_lazily_like_python(name, monkeypatch):
    """Node sums below their engines' free HBM (a runner's kept sums, with its engine-set key: policies take the
    sums only from such a live snapshot): phase 1 closes every group early, and the placement loop extends the
    groups lazily (`assign_group`) past phase 1's keys, in C as in Python."""
    from schedulers import ClusterSnapshot, EngineState, NodeState, PendingRequest, make_policy, policies

    c = _dualpath_c()
    engines = {0: EngineState(0, "prefill", 0), 1: EngineState(1, "prefill", 0)}
    nodes = {0: NodeState(0, "prefill", read_queue_tokens=5)}
    for nid in (1, 2):
        nodes[nid] = NodeState(nid, "decode", engine_tok=0, engine_free_hbm_tokens=150, read_queue_tokens=nid)
        for _ in range(2):
            eid = len(engines)
            engines[eid] = EngineState(eid, "decode", nid, tok=eid, free_hbm_tokens=10**6)
        nodes[nid].engine_tok = sum(e.tok for e in engines.values() if e.node_id == nid)
    snapshot = ClusterSnapshot(0.0, engines, nodes, engine_set_key=3)
    queue = [PendingRequest(i, i, 0, 100 + i, 64 * (i % 2), 5) for i in range(40)]
    calls = _place_calls(monkeypatch, c)
    policy = make_policy(name, alpha_tokens=10, beta_tokens=10**9)
    runs = [policy.schedule(snapshot, queue)]
    assert policy._closed_last  # phase 1 closed a group's R at the node sums (150 tokens), not at 2 * 10**6
    monkeypatch.setattr(policies, "_dualpath_c", None)
    policy = make_policy(name, alpha_tokens=10, beta_tokens=10**9)
    runs.append(policy.schedule(snapshot, queue))
    assert policy._closed_last
    assert calls == ["ok"]
    assert len(runs[0]) == 40  # far beyond phase 1's few keys
    assert runs[0] == runs[1]


@pytest.mark.parametrize("name", ["dualpath", "de_only", "pe_only"])
def test_place_in_c_hands_over_to_python_on_loads_beyond_int64(name, monkeypatch):
    """A request whose tokens C cannot hold exactly, in the middle of the window: `place` refuses it and the
    Python loop places the whole window again, giving the same Assignments as without C."""
    from schedulers import ClusterSnapshot, EngineState, NodeState, PendingRequest, make_policy, policies

    c = _dualpath_c()
    engines, nodes = {}, {}
    for nid, role in enumerate(("prefill", "decode", "decode")):
        nodes[nid] = NodeState(nid, role, engine_tok=0, engine_free_hbm_tokens=2 * 2**62, read_queue_tokens=nid)
        for _ in range(2):
            eid = len(engines)
            engines[eid] = EngineState(eid, role, nid, free_hbm_tokens=2**62 if role == "decode" else 0)
    snapshot = ClusterSnapshot(0.0, engines, nodes)
    queue = [PendingRequest(i, i, 0, 1000, 512, 10) for i in range(10)]
    queue.append(PendingRequest(10, 10, 0, 2**61, 2**61, 0))  # placed by Python only
    queue += [PendingRequest(i, i, 0, 700, 64, 3) for i in range(11, 20)]
    calls = _place_calls(monkeypatch, c)
    runs = [make_policy(name, alpha_tokens=10, beta_tokens=2**62).schedule(snapshot, queue)]
    monkeypatch.setattr(policies, "_dualpath_c", None)
    runs.append(make_policy(name, alpha_tokens=10, beta_tokens=2**62).schedule(snapshot, queue))
    assert calls == ["OverflowError"]
    assert len(runs[0]) > 11
    assert runs[0] == runs[1]


def test_placement_in_c_refuses_pe_loads_beyond_int64(monkeypatch):
    """A PE load beyond int64: `Placement` refuses it before anything is placed, the Python loop places the
    window, the same as without C; a Placement places once."""
    from schedulers import ClusterSnapshot, EngineState, NodeState, PendingRequest, make_policy, policies

    c = _dualpath_c()
    engines = {0: EngineState(0, "prefill", 0, tok=2**70), 1: EngineState(1, "prefill", 0, tok=5)}
    nodes = {0: NodeState(0, "prefill"), 1: NodeState(1, "decode", engine_tok=0, engine_free_hbm_tokens=10**6)}
    engines[2] = EngineState(2, "decode", 1, free_hbm_tokens=10**6)
    snapshot = ClusterSnapshot(0.0, engines, nodes)
    queue = [PendingRequest(i, i, 0, 100, 64, 5) for i in range(5)]
    with pytest.raises(OverflowError):
        c.Placement({0: [0, 1]}, {0: [engines[0], engines[1]]}, 10**9)
    runs = []
    for mod in (c, None):
        monkeypatch.setattr(policies, "_dualpath_c", mod)
        runs.append(make_policy("dualpath", alpha_tokens=10, beta_tokens=10**9).schedule(snapshot, queue))
    assert len(runs[0]) == 5 and runs[0] == runs[1]
    p = c.Placement({0: [1]}, {0: [engines[1]]}, 10**9)
    assert p.any_pe()
    args = (queue, [105] * 5, [1] * 5, [1], 0, [1], {1: 0}, {1: 0}, {1: [2]}, {2: engines[2]}, {2: 1}, nodes, 10)
    assert len(p.place(*args, 1.0, 0, policies.Assignment)) == 5
    with pytest.raises(RuntimeError, match="once"):
        p.place(*args, 1.0, 0, policies.Assignment)
    assert not c.Placement({0: [1]}, {0: [engines[1]]}, 4).any_pe()
    bad_key = (queue, [105] * 5, [3] * 5, [3], 2, [1], {1: 0}, {1: 0}, {1: [2]}, {2: engines[2]}, {2: 1}, nodes, 10)
    with pytest.raises(IndexError, match="group rank"):  # a key naming a group that does not exist
        c.Placement({0: [1]}, {0: [engines[1]]}, 10**9).place(*bad_key, 1.0, 0, policies.Assignment)


def test_place_in_c_is_not_used_by_a_subclass_that_changes_a_step(monkeypatch):
    """A policy overriding a step of the loop (here the DE choice) runs its own Python step, not the C loop."""
    from schedulers import make_policy, policies

    c = _dualpath_c()

    class _FirstDe(policies.DualPathPolicy):
        @staticmethod
        def _choose_de(s, r, group, z):
            return next((e for e in group if s.free[e] >= r.total_tokens), None)

    assert _FirstDe()._c_side_mode() is None
    assert policies.SplitPolicy()._c_side_mode() is None
    assert [make_policy(n)._c_side_mode() for n in ("dualpath", "de_only", "pe_only")] == [0, 1, 2]
    rng = random.Random(3)
    snapshot, queue, _ = _random_snapshot(rng)
    calls = _place_calls(monkeypatch, c)
    _FirstDe(policies.DualPathConfig(alpha_tokens=3_000_000, beta_tokens=10_000_000)).schedule(snapshot, queue)
    assert calls == []


# ---- a whole run ----------------------------------------------------------------------------------------
_DIGEST = """
import dataclasses, hashlib
from dualpath_jax import compiled
from dualpath_jax.sim import load_sim_config, run
res = run(load_sim_config("configs/sim_tiny.py:dualpath,agents=60,turns=8,seed=5"))
rows = repr([dataclasses.astuple(r) for r in res.records]) + repr(list(res.links))
print(compiled.status()["network"], hashlib.sha256(rows.encode()).hexdigest())
"""


def test_whole_run_is_identical_with_the_python_twins():
    from dualpath_jax.sim import load_sim_config, run

    res = run(load_sim_config("configs/sim_tiny.py:dualpath,agents=60,turns=8,seed=5"))
    here = hashlib.sha256((repr([dataclasses.astuple(r) for r in res.records]) + repr(list(res.links))).encode())
    env = {**os.environ, "DUALPATH_PURE_PYTHON": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _DIGEST], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    twin_compiled, twin_digest = out.stdout.strip().splitlines()[-1].split()
    assert twin_compiled == "False"  # the subprocess really ran network.py as Python
    assert res.stats["compiled"] == compiled.status()
    assert twin_digest == here.hexdigest()


def test_a_stale_build_runs_the_python_source(monkeypatch):
    """network.py edited after the build: the simulator runs the edited source, not the old compiled code."""
    if not compiled.status()["network"]:
        pytest.skip("network.py is not compiled in this install")
    real_mtime, real_sha256 = os.path.getmtime, compiled.file_sha256

    def mtime(path):  # the sources look edited after the build: newer ...
        return real_mtime(path) + (1e6 if path.endswith((".py", ".pxd")) else 0.0)

    def sha256(path):  # ... and other bytes than the build's record says (setup.py's _compiled_sources.json)
        return "edited" if path.endswith((".py", ".pxd")) else real_sha256(path)

    monkeypatch.setattr(os.path, "getmtime", mtime)
    monkeypatch.setattr(compiled, "file_sha256", sha256)
    assert compiled.stale("dualpath_jax.sim.network")
    assert not compiled.use("dualpath_jax.sim.network")
    mod = compiled.load("dualpath_jax.sim.network")
    assert mod.__file__.endswith("network.py") and mod.__name__ == "dualpath_jax.sim.network_py"
    monkeypatch.setattr(compiled, "file_sha256", real_sha256)
    assert compiled.use("dualpath_jax.sim.network") == os.path.exists(  # only newer, same bytes: compiled
        os.path.join(os.path.dirname(compiled._built_file("dualpath_jax.sim.network")), compiled.SOURCES_RECORD)
    )
    monkeypatch.setattr(os.path, "getmtime", real_mtime)
    assert compiled.use("dualpath_jax.sim.network")  # rebuilt (here: real times again): compiled again


# ---- the CSV writer -------------------------------------------------------------------------------------
def _csv_writer_bytes(rows) -> bytes:
    import csv
    import io

    buf = io.StringIO(newline="")
    csv.writer(buf).writerows(rows)
    return buf.getvalue().encode("utf-8")


def _c_writer_bytes(rows) -> bytes:
    import io

    from dualpath_jax.sim._csvrows import write_rows

    buf = io.BytesIO()
    assert write_rows(buf, rows) == len(rows)
    return buf.getvalue()


class _FloatKind(float):
    def __str__(self):
        return "custom"


@pytest.mark.skipif(not compiled.use("dualpath_jax.sim._csvrows"), reason="_csvrows is not built here")
def test_csv_rows_in_c_equal_csv_writer_on_awkward_fields():
    import numpy as np

    rows = [
        (),
        ("",),
        (None,),
        ("", ""),
        (None, None, 1),
        (0.0, -0.0, 0.0, -0.0, math.nan, -math.nan, math.inf, -math.inf, math.nan),
        (1e16, 1e15, 1e-4, 1e-5, 1e22, 5e-324, 1.7976931348623157e308, 0.1 + 0.2, 0.30000000000000004, 2.5),
        (0, -1, 2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 10**40, -(10**40)),
        (True, False, np.float64(0.1), np.float32(0.1), np.int64(-7), _FloatKind(1.0)),
        ("a,b", 'say "hi"', "line\nbreak", "cr\rhere", "plain", "ünïcödé €", " lead", "trail "),
        ("pe", "de", "", "x"),
        (b"bytes", [1, 2], {"k": 1}),
    ]
    rows += [tuple(random.Random(s).uniform(-1e6, 1e6) for _ in range(7)) for s in range(200)]
    rows.append(["a", "list", "row", 1.5])
    assert _c_writer_bytes(rows) == _csv_writer_bytes(rows)


@pytest.mark.skipif(not compiled.use("dualpath_jax.sim._csvrows"), reason="_csvrows is not built here")
def test_simulation_outputs_are_the_same_with_the_c_csv_writer(tmp_path, monkeypatch):
    from dualpath_jax.sim import load_sim_config, outputs, run

    res = run(load_sim_config("configs/sim_tiny.py:dualpath,agents=40,turns=6,seed=3"))
    c_paths = outputs.write_results(res, str(tmp_path / "c"), {}, plot=False)
    monkeypatch.setattr(outputs, "_write_rows_c", None)
    py_paths = outputs.write_results(res, str(tmp_path / "py"), {}, plot=False)
    for kind in ("turns", "links"):
        with open(c_paths[kind], "rb") as a, open(py_paths[kind], "rb") as b:
            assert a.read() == b.read(), kind
    assert sum(1 for _ in open(c_paths["turns"])) == len(res.records) + 1


def _python_simulator():
    """simulator.py loaded from its source as a separate module (the Python twin of the compiled one)."""
    from dualpath_jax.sim import simulator as sim_mod

    path = os.path.join(os.path.dirname(sim_mod.__file__), "simulator.py")
    spec = importlib.util.spec_from_file_location("_simulator_source_for_tests", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("which", ["loaded", "source"])
def test_decode_time_mirror_equals_the_cost_model_bit_for_bit(which):
    """`simulator._DecodeTime` computes `decode_step_time * de_time_scale` in doubles (compiled) or Python floats
    (twin): the same bits as the cost model for every paper model, EP degree, fitted or not, on batch sizes and
    contexts across the dense/sparse (index_topk) switch; what it cannot do exactly it asks the model."""
    from schedulers.cost_model import MODEL_SHAPES, CostModel, FitCoefficients

    mod = compiled.load("dualpath_jax.sim.simulator") if which == "loaded" else _python_simulator()
    rng = random.Random(7)
    fit = FitCoefficients(overhead_s=0.004, s_per_linear_flop=3.1e-15, s_per_attention_flop=7.7e-15, s_per_byte=2.9e-13)
    checked = 0
    for name in MODEL_SHAPES.names():
        for ep, decode_fit in ((1, None), (32, None), (8, fit)):
            cm = CostModel(name, "h800", ep=ep, decode_fit=decode_fit)
            dt = mod._DecodeTime(cm, 2.2)
            assert dt.native, (name, ep)
            topk = cm.model.index_topk or 2048
            for _ in range(1500):
                n = rng.randint(1, 700)
                ctx = rng.choice([rng.randint(0, n * topk), rng.randint(n * topk, n * 70_000), rng.randint(0, 10**8)])
                assert dt.time(n, ctx) == cm.decode_step_time(n, ctx) * 2.2, (name, ep, n, ctx)
                checked += 1
            assert dt.time(0, 5) == 0.0
            # beyond the exact range: the model itself is asked (same value)
            big = int(dt.ctx_max) + 12345
            assert dt.time(3, big) == cm.decode_step_time(3, big) * 2.2
    assert checked == 1500 * 3 * len(MODEL_SHAPES.names())

    class Tweaked(CostModel):  # a subclass may change the formula: never mirrored
        def decode_step_time(self, batch_size, total_context_tokens):
            return 1.0

    dt = mod._DecodeTime(Tweaked("ds660b", "h800"), 3.0)
    assert not dt.native and dt.time(4, 1000) == 3.0

    class Split:  # the runner's split cost object: the decode model's own bound method
        def __init__(self, decode):
            self.decode_step_time = decode.decode_step_time

    cm = CostModel("ds660b", "h800", ep=32)
    dt = mod._DecodeTime(Split(cm), 2.2)
    assert dt.native and dt.time(64, 2_000_000) == cm.decode_step_time(64, 2_000_000) * 2.2


# ---- DUALPATH_PURE_PYTHON -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value, pure",
    [
        ("1", True),
        ("true", True),
        (" YES ", True),
        ("on", True),
        ("", False),
        ("0", False),
        ("false", False),
        ("No", False),
        ("off", False),
    ],
)
def test_pure_python_switch_reads_the_usual_spellings(value, pure):
    assert compiled._pure_python(value) is pure  # "false" / "no" / "off" turned the compiled modules off


@pytest.mark.parametrize("value", ["2", "maybe", "-1", "0.0"])
def test_pure_python_switch_refuses_other_values_naming_the_variable(value):
    with pytest.raises(ValueError, match=rf"DUALPATH_PURE_PYTHON={value!r}: use 1 .* or 0"):
        compiled._pure_python(value)


def test_pure_python_false_runs_the_compiled_modules_in_a_process():
    if compiled.PURE_PYTHON or not compiled.status()["network"]:
        pytest.skip("network.py is not compiled in this install, or DUALPATH_PURE_PYTHON is set")
    code = "from dualpath_jax import compiled; print(compiled.PURE_PYTHON, compiled.status()['network'])"
    env = {**os.environ, "DUALPATH_PURE_PYTHON": "false"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["False", "True"]


@pytest.mark.parametrize("which", ["built", "source"])
def test_a_cut_reservation_keeps_only_the_bytes_it_moved(which):
    """`cut_reservation` (a paced write-back whose decode ended): the bytes booked after the cut are taken back from
    the link's buckets and total, and returned for the caller to move; its rate is free again. A run that ends later
    (`flush`) does not take them back a second time."""
    mod = network_mod if which == "built" else _python_network()
    net = mod.FlowNetwork(bucket_s=1.0)
    a = net.add_link("a", 100.0)
    net.scheduler = lambda t, f, v: None
    end = net.reserve((a,), 10.0, 1.0, 0.0)
    assert end == 10.0 and net.low_cap[a] == 99.0
    left = net.cut_reservation(net._resv_seq, (a,), 1.0, end, 4.5)
    assert left == pytest.approx(5.5)
    assert net.link_total[a] == pytest.approx(4.5) and net.reserved[a] == 0.0 and net.low_cap[a] == 100.0
    assert sorted(net.buckets[a]) == [0, 1, 2, 3, 4] and net.buckets[a][4] == pytest.approx(0.5)
    net.flush(6.0)
    assert net.link_total[a] == pytest.approx(4.5) and sorted(net.buckets[a]) == [0, 1, 2, 3, 4]
