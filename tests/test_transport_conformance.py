"""Conformance suite every transport backend runs (DESIGN.md "Contracts: Transport").

Parametrized over the built-in backends; "rdma" skips with the reason when pyverbs or an RDMA device is
missing. "rdma-fake" is `RdmaTransport` over tests/_fake_verbs.py's pyverbs stand-in (installed for the test, on any
host): the backend's own logic, not a NIC (`-k "rdma and not fake"` picks the real one). Cross-process TCP cases live in
test_transport_tcp.py.

A backend of one's own runs every test "inproc" runs, named as `module:backend` in DUALPATH_TRANSPORT_BACKENDS
(comma-separated; the module, importable from the repo root or PYTHONPATH, registers it in `transport.TRANSPORTS`):

    DUALPATH_TRANSPORT_BACKENDS=my_transports:shm pytest -q tests/test_transport_conformance.py -k shm

Its class must take `name` and `pacer` keywords (what `make_pair` passes `make_transport`, as the runtime's launchers
do), and fail the transfers to a peer that closed within a few seconds (tcp's watchdog is given `timeout_s=5` here).
"""

from __future__ import annotations

import concurrent.futures
import importlib
import itertools
import os
import re
import sys
import threading
import time

import numpy as np
import pytest
from _fake_verbs import install, installed

from dualpath_jax.traffic import Link, Pacer
from transport import TRANSPORTS, make_transport
from transport.base import (
    PeerLostError,
    RegionError,
    TransferFuture,
    Transport,
    TransportClosedError,
    TransportError,
    combine_futures,
    complete_quietly,
)

BACKENDS_ENV = "DUALPATH_TRANSPORT_BACKENDS"


def named_backends(spec: str) -> list[str]:
    """The backends `spec` names ("module:backend,..."), each module imported (it registers its backends); errors
    name the variable and the entry."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        module, sep, name = item.partition(":")
        if not sep or not module or not name:
            raise ValueError(f"{BACKENDS_ENV}: {item!r} is not 'module:backend' (e.g. my_transports:shm)")
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ImportError(f"{BACKENDS_ENV}: cannot import module {module!r} (for backend {name!r}): {e}") from e
        if name not in TRANSPORTS:
            raise KeyError(
                f"{BACKENDS_ENV}: module {module!r} registers no transport {name!r}; registered: "
                f"{', '.join(TRANSPORTS.names())}"
            )
        out.append(name)
    return out


# The backends of one's own (DUALPATH_TRANSPORT_BACKENDS) run where "inproc" does: every backend test, and the ones
# parametrized over the backends that run on any host (LOCAL).
OWN_BACKENDS = [b for b in named_backends(os.environ.get(BACKENDS_ENV, "")) if b not in ("inproc", "tcp", "rdma")]
RDMA_FAKE = "rdma-fake"  # rdma over the pyverbs stand-in (tests/_fake_verbs.py), installed by `_rdma_fake_installed`
BACKENDS = ["inproc", "tcp", "rdma", RDMA_FAKE, *OWN_BACKENDS]
LOCAL = ["inproc", "tcp", RDMA_FAKE, *OWN_BACKENDS]
_names = itertools.count()


def _rdma_skip_reason() -> str | None:
    from transport.rdma import rdma_unavailable_reason

    return rdma_unavailable_reason()


def make_endpoint(backend: str, name: str, pacer=None, **kw) -> Transport:
    """One endpoint of `backend`; "rdma-fake" is an `RdmaTransport` over the stand-in, which must be installed."""
    if backend != RDMA_FAKE:
        return make_transport({"backend": backend, "name": name, **kw}, pacer=pacer)
    from transport.rdma import RdmaTransport

    if installed() is None:  # (it would open a real device, or fail for want of pyverbs)
        raise RuntimeError(f"{RDMA_FAKE!r} needs the pyverbs stand-in: `_fake_verbs.install(monkeypatch)` first")
    ep = make_transport({"backend": "rdma", "name": name, **kw}, pacer=pacer)
    assert type(ep) is RdmaTransport, type(ep)
    return ep


def make_pair(backend: str, pacer=None, **kw):
    """Two connected endpoints a, b of `backend` (a's sends paced by `pacer`)."""
    if backend == "rdma":
        reason = _rdma_skip_reason()
        if reason:
            pytest.skip(f"rdma backend: {reason}")
    n = next(_names)
    a = make_endpoint(backend, f"a{n}", pacer=pacer, **kw)
    b = make_endpoint(backend, f"b{n}", **kw)
    a.connect(b.name, b.address)
    b.wait_for_peer(a.name, timeout=10)
    return a, b


def uses_rdma_fake(request: pytest.FixtureRequest, *argnames: str) -> bool:
    """Whether this test's parameters (fixture or direct) put "rdma-fake" in one of `argnames`."""
    params = getattr(request.node, "callspec", None)
    return params is not None and any(params.params.get(n) == RDMA_FAKE for n in argnames)


@pytest.fixture(autouse=True)
def _rdma_fake_installed(request):
    """The pyverbs stand-in for the "rdma-fake" cases, from before their endpoints are made to after they closed."""
    if uses_rdma_fake(request, "backend"):
        install(request.getfixturevalue("monkeypatch"))


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def pair(backend):
    a, b = make_pair(backend)
    yield a, b
    a.close()
    b.close()


def test_backends_registered():
    assert {"inproc", "tcp", "rdma"} <= set(TRANSPORTS.names())
    with pytest.raises(KeyError, match=re.escape(f"known: {', '.join(TRANSPORTS.names())}")):  # (with one's own)
        make_transport({"backend": "carrier-pigeon", "name": "x"})
    with pytest.raises(KeyError, match="'backend' field"):
        make_transport({"name": "x"})
    # config-keyed factory, from an ml_collections ConfigDict as the launchers pass it
    import ml_collections

    cfg = ml_collections.ConfigDict({"backend": "tcp", "name": "from-config", "timeout_s": 5.0})
    ep = make_transport(cfg)
    try:
        assert ep.backend == "tcp" and ep.name == "from-config" and ep.timeout_s == 5.0
        assert ep.address[0] == "127.0.0.1"  # loopback by default
    finally:
        ep.close()


def test_rdma_fake_is_rdma_transport_over_the_stand_in_only_while_installed():
    """The "rdma-fake" endpoints are `RdmaTransport`s whose MRs, QPs and completions are the stand-in's (a write waits
    for its completion queue), the stand-in is gone after the test, and without it "rdma-fake" refuses to start."""
    from transport.rdma import RdmaTransport

    before = sys.modules.get("pyverbs")
    with pytest.MonkeyPatch.context() as mp:
        fake = install(mp)
        a, b = make_pair(RDMA_FAKE)
        try:
            assert type(a) is RdmaTransport and type(b) is RdmaTransport and a.backend == "rdma"
            a.register("src", np.arange(64, dtype=np.uint8))
            dst = np.zeros(64, np.uint8)
            b.register("dst", dst)
            assert len(fake.mrs) == 2
            fake.hold = True  # (its completion queues report nothing)
            fut = a.write(b.name, "src", 0, "dst", 0, 64)
            time.sleep(0.1)
            assert not fut.done() and dst.tolist() == list(range(64))  # placed by the stand-in's QP, not completed
            assert all(type(q) is fake.modules["pyverbs.qp"].QP for q in a._peers[b.name].qps.values())
            fake.hold = False
            assert fut.result(10) == 64
        finally:
            fake.hold = False
            a.close()
            b.close()
    assert sys.modules.get("pyverbs") is before and installed() is None
    with pytest.raises(RuntimeError, match="'rdma-fake' needs the pyverbs stand-in"):
        make_pair(RDMA_FAKE)


@pytest.mark.parametrize("backend", LOCAL)
def test_endpoint_names_and_waiting_for_a_peer(backend):
    """An endpoint needs a non-empty name; waiting for a peer that never connects times out naming it."""
    with pytest.raises(ValueError, match="transport endpoint name must be a non-empty string"):
        make_endpoint(backend, "")
    ep = make_endpoint(backend, f"lonely-{backend}")
    try:
        with pytest.raises(TimeoutError, match="peer 'nobody' did not connect within 0.05 s"):
            ep.wait_for_peer("nobody", timeout=0.05)
    finally:
        ep.close()


def test_registration(pair):
    a, _ = pair
    buf = np.zeros(100, np.uint8)
    r = a.register("r", buf)
    assert r.size == 100 and "r" in a.regions()
    with pytest.raises(RegionError, match="already registered"):
        a.register("r", np.zeros(4, np.uint8))
    with pytest.raises(RegionError, match="read-only"):
        a.register("ro", b"immutable")
    with pytest.raises(RegionError, match="contiguous"):
        a.register("strided", np.zeros((10, 10), np.uint8)[:, ::2])
    with pytest.raises(RegionError, match="region 'obj': object does not expose a buffer"):
        a.register("obj", object())
    # any writable contiguous buffer works, viewed as bytes
    assert a.register("f32", np.zeros((4, 8), np.float32)).size == 128
    assert a.register("ba", bytearray(33)).size == 33
    a.deregister("ba")
    assert "ba" not in a.regions()
    with pytest.raises(RegionError, match="no region 'ba'"):
        a.region("ba")


@pytest.mark.parametrize(
    "length,src_off,dst_off", [(0, 0, 0), (1, 3, 5), (7, 1, 0), (4096, 0, 4096), ((1 << 20) + 3, 5, 3)]
)
def test_write_and_read_sizes(pair, length, src_off, dst_off):
    a, b = pair
    size = (1 << 20) + 16
    src = np.random.default_rng(length).integers(0, 256, size, dtype=np.uint8)
    dst = np.zeros(size, np.uint8)
    a.register("src", src)
    b.register("dst", dst)
    assert a.write(b.name, "src", src_off, "dst", dst_off, length).result(10) == length
    np.testing.assert_array_equal(dst[dst_off : dst_off + length], src[src_off : src_off + length])
    assert not dst[:dst_off].any() and not dst[dst_off + length :].any()  # nothing outside the range
    # read it back into a fresh local region
    back = np.zeros(size, np.uint8)
    a.register("back", back)
    assert a.read(b.name, "back", 1, "dst", dst_off, length).result(10) == length
    np.testing.assert_array_equal(back[1 : 1 + length], src[src_off : src_off + length])


def test_large_64mb(pair):
    a, b = pair
    n = 64 << 20
    src = np.empty(n, np.uint8)
    src[::4096] = np.arange(n // 4096, dtype=np.uint64).astype(np.uint8)  # a sparse pattern, cheap to make
    src[1::4096] = 0x5A
    dst = np.zeros(n, np.uint8)
    a.register("src", src)
    b.register("dst", dst)
    a.write(b.name, "src", 0, "dst", 0, n).result(60)
    assert np.array_equal(dst[::4096], src[::4096]) and np.array_equal(dst[1::4096], src[1::4096])
    assert np.array_equal(dst[-4096:], src[-4096:])
    back = np.zeros(n, np.uint8)
    a.register("back", back)
    a.read(b.name, "back", 0, "dst", 0, n).result(60)
    assert np.array_equal(back[::4096], src[::4096]) and np.array_equal(back[-4096:], src[-4096:])


def test_bounds_errors(pair):
    a, b = pair
    a.register("src", np.zeros(100, np.uint8))
    b.register("dst", np.zeros(50, np.uint8))
    with pytest.raises(RegionError, match="outside region 'src'"):
        a.write(b.name, "src", 90, "dst", 0, 11)
    with pytest.raises(RegionError, match="outside"):
        a.write(b.name, "src", 0, "dst", 40, 11)
    with pytest.raises(RegionError, match="outside"):
        a.write(b.name, "src", -1, "dst", 0, 1)
    with pytest.raises(RegionError, match="outside"):
        a.read(b.name, "src", 0, "dst", 49, 2)
    with pytest.raises(RegionError, match="'nope'"):
        a.write(b.name, "src", 0, "nope", 0, 1)
    with pytest.raises(RegionError, match="'nope'"):
        a.write(b.name, "nope", 0, "dst", 0, 1)
    with pytest.raises(ValueError, match="priority"):
        a.write(b.name, "src", 0, "dst", 0, 1, priority="urgent")
    # the endpoints still work after the refused requests
    assert a.write(b.name, "src", 0, "dst", 0, 50).result(10) == 50


def test_many_concurrent_transfers(pair):
    a, b = pair
    n, k = 4096, 256
    src = np.random.default_rng(0).integers(0, 256, n * k, dtype=np.uint8)
    dst = np.zeros(n * k, np.uint8)
    back = np.zeros(n * k, np.uint8)
    a.register("src", src)
    a.register("back", back)
    b.register("dst", dst)
    futs = [a.write(b.name, "src", i * n, "dst", (k - 1 - i) * n, n, priority=("high", "low")[i % 2]) for i in range(k)]
    assert all(f.result(30) == n for f in futs)
    np.testing.assert_array_equal(dst.reshape(k, n), src.reshape(k, n)[::-1])
    # concurrent reads from several threads at once
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        subs = list(pool.map(lambda i: a.read(b.name, "back", i * n, "dst", i * n, n), range(k)))
    assert all(f.result(30) == n for f in subs)
    np.testing.assert_array_equal(back, dst)


def test_notifications(pair):
    a, b = pair
    src = np.arange(256, dtype=np.uint8)
    dst = np.zeros(256, np.uint8)
    a.register("src", src)
    b.register("dst", dst)
    futs = [a.write(b.name, "src", 16 * t, "dst", 16 * t, 16, notify=100 + t) for t in range(16)]
    for f in futs:
        f.result(10)
    # a specific tag can be waited for out of order; the bytes are there when it is delivered
    n = b.wait_notification(tag=107, timeout=5)
    assert (n.peer, n.tag, n.region, n.offset, n.length) == (a.name, 107, "dst", 112, 16)
    np.testing.assert_array_equal(dst[112:128], src[112:128])
    got = {b.wait_notification(peer=a.name, timeout=5).tag for _ in range(15)}
    assert got == {100 + t for t in range(16)} - {107}
    with pytest.raises(TimeoutError):
        b.wait_notification(tag=107, timeout=0.05)
    # a write without notify produces none
    a.write(b.name, "src", 0, "dst", 0, 1).result(10)
    with pytest.raises(TimeoutError):
        b.wait_notification(timeout=0.05)


def test_control_messages(pair):
    a, b = pair
    for i in range(20):
        a.send(b.name, f"m{i}".encode()).result(10)
    b.send(a.name, b"").result(10)
    assert [b.recv(timeout=5) for _ in range(20)] == [(a.name, f"m{i}".encode()) for i in range(20)]
    assert a.recv(peer=b.name, timeout=5) == (b.name, b"")
    with pytest.raises(TimeoutError):
        a.recv(timeout=0.05)
    with pytest.raises(TypeError):
        a.send(b.name, "not bytes")


def test_region_names_must_be_strings(pair):
    """A region name is a non-empty string: anything else is refused at `register`, and a transfer naming a
    peer's region by a non-string is a `RegionError` (it once was an AttributeError on tcp, and an int name
    made every later "no region" error a TypeError)."""
    a, b = pair
    a.register("src", np.zeros(8, np.uint8))
    b.register("dst", np.zeros(8, np.uint8))
    for name in (5, None, ""):
        with pytest.raises(RegionError, match="region name must be a non-empty string"):
            a.register(name, np.zeros(4, np.uint8))
    for name in (5, None, b"dst"):
        with pytest.raises(RegionError, match=f"no region {name!r}"):
            a.write(b.name, "src", 0, name, 0, 1)
        with pytest.raises(RegionError, match=f"no region {name!r}"):
            a.read(b.name, "src", 0, name, 0, 1)
    with pytest.raises(RegionError, match="no region 'nope'; registered: src"):
        a.region("nope")
    assert a.write(b.name, "src", 0, "dst", 0, 8).result(10) == 8


def test_bad_notify_tag_raises_before_anything_is_written(pair):
    """A notify tag is an integer of the wire's signed 64 bits (numpy integers are fine); anything else raises
    at once and writes nothing (inproc used to copy the bytes and then fail the future, or truncate 1.5 to 1;
    tcp raised a struct.error for 2**63)."""
    a, b = pair
    a.register("src", np.arange(1, 9, dtype=np.uint8))
    dst = np.zeros(8, np.uint8)
    b.register("dst", dst)
    for tag, err in [("7", TypeError), (1.5, TypeError), (1 << 63, ValueError), (-(1 << 63) - 1, ValueError)]:
        with pytest.raises(err, match="notify tag"):
            a.write(b.name, "src", 0, "dst", 0, 8, notify=tag)
        with pytest.raises(err, match="notify tag"):
            a.write_many(b.name, [("src", 0, 4, "dst", 0), ("src", 4, 4, "dst", 4)], notify=tag)
    assert not dst.any(), "a write with a bad notify tag wrote bytes"
    with pytest.raises(TimeoutError):
        b.wait_notification(timeout=0.05)
    for tag in (np.int64((1 << 63) - 1), -(1 << 63)):
        assert a.write(b.name, "src", 0, "dst", 0, 8, notify=tag).result(10) == 8
        n = b.wait_notification(timeout=5)
        assert n.tag == int(tag) and type(n.tag) is int
    np.testing.assert_array_equal(dst, np.arange(1, 9, dtype=np.uint8))


def _raises_within(fn, seconds: float = 5.0) -> BaseException | None:
    """Run fn in a thread; the exception it raised, or None if it returned; fails if it is still running."""
    got: list = []

    def run() -> None:
        try:
            fn()
            got.append(None)
        except BaseException as e:  # noqa: BLE001 - returned to the test
            got.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still waiting after {seconds} s"
    return got[0]


@pytest.mark.parametrize("backend", LOCAL)
def test_a_nan_timeout_is_refused_not_a_wait_forever(backend):
    """A NaN timeout never expires (every comparison with it is false): waits refuse it instead of spinning."""
    ep = make_endpoint(backend, f"nan-{backend}")
    try:
        for fn in (
            lambda: ep.wait_notification(timeout=float("nan")),
            lambda: ep.recv(timeout=float("nan")),
            lambda: ep.wait_for_peer("nobody", timeout=float("nan")),
        ):
            err = _raises_within(fn)
            assert isinstance(err, ValueError) and "timeout must be a number of seconds or None, got nan" in str(err)
        assert isinstance(_raises_within(lambda: ep.wait_notification(timeout=0)), TimeoutError)
        assert isinstance(_raises_within(lambda: ep.recv(timeout=-1)), TimeoutError)
    finally:
        ep.close()  # also ends a wait that ignored the NaN


@pytest.mark.parametrize("backend", LOCAL)
def test_priorities_high_overtakes_low(backend):
    """With the sender's CNIC paced (99:1), a small high-priority write finishes while a big low-priority
    write is still in flight: the backend keeps the classes in separate queues."""
    link = Link("cnic/engine0", 40e6, {"high": 99, "low": 1}, per_class_names=True)
    a, b = make_pair(backend, pacer=Pacer([link]))
    try:
        big, small = 8 << 20, 256 << 10  # 0.2 s and ~6 ms at 40 MB/s
        a.register("src", np.ones(big, np.uint8))
        b.register("dst", np.zeros(big, np.uint8))
        b.register("dst2", np.zeros(small, np.uint8))
        low = a.write(b.name, "src", 0, "dst", 0, big, priority="low")
        time.sleep(0.03)
        t0 = time.monotonic()
        high = a.write(b.name, "src", 0, "dst2", 0, small, priority="high")
        high.result(10)
        t_high = time.monotonic() - t0
        assert not low.done(), "the low-priority write should still be in flight"
        assert t_high < 0.1, f"high-priority write took {t_high:.3f} s behind a low one"
        low.result(30)
        assert link.bytes_by_class["high"] == small and link.bytes_by_class["low"] == big
    finally:
        a.close()
        b.close()


def _fails(fn, timeout=10.0) -> BaseException:
    """Run fn (which may raise at once or return a future that fails); return the error; never hang."""
    t0 = time.monotonic()
    try:
        r = fn()
        if isinstance(r, concurrent.futures.Future):
            r.result(timeout)
    except BaseException as e:  # noqa: BLE001
        assert time.monotonic() - t0 < timeout
        return e
    raise AssertionError("expected a failure")


def test_close_semantics(backend):
    a, b = make_pair(backend)
    a.register("src", np.zeros(64, np.uint8))
    b.register("dst", np.zeros(64, np.uint8))
    a.write(b.name, "src", 0, "dst", 0, 64).result(10)
    b.close()
    b.close()  # idempotent
    assert b.closed
    with pytest.raises(TransportClosedError):
        b.write(a.name, "dst", 0, "src", 0, 1)
    with pytest.raises(TransportClosedError):
        b.register("x", np.zeros(1, np.uint8))
    with pytest.raises(TransportClosedError):
        b.wait_notification(timeout=1)
    with pytest.raises(TransportClosedError):
        b.recv(timeout=1)
    # the survivor's transfers to the closed peer fail (PeerLostError) instead of hanging
    err = _fails(lambda: a.write(b.name, "src", 0, "dst", 0, 64))
    assert isinstance(err, (PeerLostError, TransportError)), err
    err = _fails(lambda: a.send(b.name, b"hello?"))
    assert isinstance(err, TransportError), err
    a.close()


def test_close_fails_pending_transfers(backend):
    """Closing an endpoint with paced transfers still queued fails them instead of leaving them hanging."""
    link = Link("cnic/engine0", 20e6, {"high": 99, "low": 1})
    a, b = make_pair(backend, pacer=Pacer([link]))
    a.register("src", np.zeros(4 << 20, np.uint8))
    b.register("dst", np.zeros(4 << 20, np.uint8))
    futs = [a.write(b.name, "src", 0, "dst", 0, 4 << 20) for _ in range(8)]  # ~1.6 s of paced traffic
    time.sleep(0.05)
    a.close()
    _, not_done = concurrent.futures.wait(futs, timeout=10)
    assert not not_done, "transfers still pending 10 s after close"
    assert any(f.exception() is not None for f in futs)
    for f in futs:
        if f.exception() is not None:
            assert isinstance(f.exception(), TransportError)
    b.close()


@pytest.mark.parametrize("backend", LOCAL)
@pytest.mark.parametrize("closing", ["sender", "receiver"])
def test_close_stops_a_paced_transfer_in_flight(backend, closing):
    """Closing either endpoint in the middle of a paced write fails the write and stops it: no more bytes are
    paced on the link or land in the peer's region. (inproc's copy used to run to its end: every byte landed
    after its future had failed, or the write reported success to a peer closed half-way through it.)"""
    link = Link("cnic/engine0", 10e6, {"high": 99, "low": 1})
    a, b = make_pair(backend, pacer=Pacer([link]))
    n = 8 << 20  # ~0.8 s at 10 MB/s
    try:
        a.register("src", np.ones(n, np.uint8))
        dst = np.zeros(n, np.uint8)
        b.register("dst", dst)
        fut = a.write(b.name, "src", 0, "dst", 0, n)
        time.sleep(0.1)
        (a if closing == "sender" else b).close()
        with pytest.raises(TransportError):
            fut.result(10)
        time.sleep(1.0)  # past the time the whole write would have taken
        assert link.total_bytes < n // 2 and dst.sum() < n // 2, (link.total_bytes, dst.sum())
    finally:
        a.close()
        b.close()


def test_write_completes_only_after_its_bytes_landed(pair):
    """Each write's future completes only once its bytes are in the peer's region, also when many small
    writes are in flight and acknowledged together (checked in each future's completion callback)."""
    a, b = pair
    size, count = 3000, 300
    src = np.stack([np.full(size, i % 251 + 1, np.uint8) for i in range(count)])
    a.register("src", src)
    dst = np.zeros(count * size, np.uint8)
    b.register("dst", dst)
    landed_early: list[int] = []

    def check(i):
        def cb(f):
            if f.exception() is None and not (dst[i * size : (i + 1) * size] == i % 251 + 1).all():
                landed_early.append(i)

        return cb

    futs = []
    for i in range(count):
        f = a.write(b.name, "src", i * size, "dst", i * size, size)
        f.add_done_callback(check(i))
        futs.append(f)
    assert [f.result(30) for f in futs] == [size] * count
    assert not landed_early, f"writes {landed_early[:5]} completed before their bytes landed"


# ---- write_many: a batch of one-sided writes with one completion --------------------------------------------


def checks_remote_up_front(ep: Transport) -> bool:
    """Whether `ep`'s backend checks every `write_many` entry's remote range before posting any: it overrides
    `Transport._check_remote_range` (inproc, tcp, rdma); the base default checks the local ranges up front and the
    remote ones as it posts each write."""
    return type(ep)._check_remote_range is not Transport._check_remote_range


def test_write_many_lands_every_entry(pair):
    a, b = pair
    rng = np.random.default_rng(3)
    src = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    src2 = rng.integers(0, 256, 5000, dtype=np.uint8)
    dst, dst2 = np.zeros(1 << 20, np.uint8), np.zeros(70000, np.uint8)
    a.register("src", src)
    a.register("src2", src2)
    b.register("dst", dst)
    b.register("dst2", dst2)
    # (local region, local offset, length, remote region, remote offset): sizes 0 B .. 256 KiB, unaligned
    entries = [
        ("src", 3, 41984, "dst", 5),
        ("src2", 1, 4999, "dst2", 0),
        ("src", 100000, 0, "dst", 7),
        ("src", 200001, 65536, "dst2", 4000),
        ("src", 500000, 262144, "dst", 700001),
        ("src2", 0, 1, "dst", (1 << 20) - 1),
    ]
    assert a.write_many(b.name, entries).result(10) == sum(e[2] for e in entries)
    expect, expect2 = np.zeros_like(dst), np.zeros_like(dst2)
    local = {"src": src, "src2": src2}
    for lr, lo, n, rr, ro in entries:
        (expect if rr == "dst" else expect2)[ro : ro + n] = local[lr][lo : lo + n]
    np.testing.assert_array_equal(dst, expect)  # every entry landed, nothing outside them
    np.testing.assert_array_equal(dst2, expect2)
    # a one-entry batch, a high-priority batch, a generator of entries, an empty batch
    assert a.write_many(b.name, [("src", 0, 10, "dst", 0)]).result(10) == 10
    assert a.write_many(b.name, (("src", 10, 20, "dst", 30) for _ in range(3)), priority="high").result(10) == 60
    np.testing.assert_array_equal(dst[:10], src[:10])
    np.testing.assert_array_equal(dst[30:50], src[10:30])
    assert a.write_many(b.name, []).result(10) == 0


def test_write_many_notifies_once_after_every_entry_landed(pair):
    a, b = pair
    n, k = 3000, 12
    src = np.stack([np.full(n, i + 1, np.uint8) for i in range(k)])
    dst = np.zeros(n * k, np.uint8)
    a.register("src", src)
    b.register("dst", dst)
    entries = [("src", i * n, n, "dst", i * n) for i in range(k)]
    fut = a.write_many(b.name, entries, notify=42)
    note = b.wait_notification(tag=42, timeout=10)
    # when the notification arrives, every entry's bytes are already there
    np.testing.assert_array_equal(dst, src.reshape(-1))
    assert (note.peer, note.tag, note.region, note.offset, note.length) == (a.name, 42, "dst", (k - 1) * n, n)
    assert fut.result(10) == n * k
    with pytest.raises(TimeoutError):  # one notification per batch
        b.wait_notification(timeout=0.05)
    with pytest.raises(ValueError, match="notify"):
        a.write_many(b.name, [], notify=1)


def test_write_many_completes_only_after_its_bytes_landed(pair):
    """Many batches in flight: each batch's future completes only once all its entries are in the peer's
    region (checked in the completion callback)."""
    a, b = pair
    size, per, batches = 2000, 16, 40
    count = per * batches
    src = np.stack([np.full(size, i % 251 + 1, np.uint8) for i in range(count)])
    a.register("src", src)
    dst = np.zeros(count * size, np.uint8)
    b.register("dst", dst)
    early: list[int] = []

    def check(j):
        def cb(f):
            lo, hi = j * per * size, (j + 1) * per * size
            if f.exception() is None and not np.array_equal(dst[lo:hi], src.reshape(-1)[lo:hi]):
                early.append(j)

        return cb

    futs = []
    for j in range(batches):
        entries = [("src", i * size, size, "dst", i * size) for i in range(j * per, (j + 1) * per)]
        f = a.write_many(b.name, entries, priority=("high", "low")[j % 2])
        f.add_done_callback(check(j))
        futs.append(f)
    assert [f.result(30) for f in futs] == [per * size] * batches
    assert not early, f"batches {early[:5]} completed before their bytes landed"
    np.testing.assert_array_equal(dst, src.reshape(-1))


def test_write_many_bad_entries_name_the_entry(pair):
    a, b = pair
    a.register("src", np.arange(100, dtype=np.uint8))
    dst = np.zeros(50, np.uint8)
    b.register("dst", dst)
    ok = ("src", 0, 10, "dst", 0)
    local_cases = [
        ([ok, ("nope", 0, 1, "dst", 0)], RegionError, r"entry 1: .*'nope'"),
        ([ok, ok, ("src", 95, 6, "dst", 0)], RegionError, r"entry 2: .*\[95, 101\) is outside region 'src'"),
        ([ok, ("src", -1, 1, "dst", 0)], RegionError, r"entry 1: .*outside"),
        ([ok, ("src", 0.5, 1, "dst", 0)], RegionError, r"entry 1: .*must be ints"),
        ([("src", 0, 1, "dst")], TypeError, r"entry 0: expected \(local_region"),
        ([ok, "src"], TypeError, "entry 1"),
    ]
    remote_cases = [
        ([ok, ("src", 0, 1, "nope", 0)], RegionError, r"entry 1: .*'nope'"),
        ([ok, ok, ok, ("src", 0, 11, "dst", 40)], RegionError, r"entry 3: .*outside"),
    ]
    for entries, err, match in local_cases + remote_cases:
        with pytest.raises(err, match=match):
            a.write_many(b.name, entries).result(10)
        if (entries, err, match) in local_cases or checks_remote_up_front(a):
            assert not dst.any(), f"{entries}: an entry was written although the batch was refused"
    with pytest.raises(TypeError, match="sequence of 5-tuples"):
        a.write_many(b.name, "src")
    with pytest.raises(ValueError, match="priority"):
        a.write_many(b.name, [ok], priority="urgent")
    # the endpoints still work after the refused batches
    assert a.write_many(b.name, [ok, ("src", 10, 40, "dst", 10)]).result(10) == 50
    np.testing.assert_array_equal(dst, np.arange(50, dtype=np.uint8))


def test_write_many_to_a_lost_peer_fails(backend):
    """A batch to a closed peer fails at once; a batch in flight when the peer goes fails within the timeout;
    a batch on a closed endpoint raises."""
    link = Link("cnic/engine0", 20e6, {"high": 99, "low": 1})
    a, b = make_pair(backend, pacer=Pacer([link]), **({"timeout_s": 5.0} if backend == "tcp" else {}))
    try:
        a.register("src", np.ones(4 << 20, np.uint8))
        b.register("dst", np.zeros(4 << 20, np.uint8))
        assert a.write_many(b.name, [("src", 0, 64, "dst", 0)] * 2).result(10) == 128
        pending = a.write_many(b.name, [("src", 0, 4 << 20, "dst", 0)] * 8)  # ~1.6 s of paced traffic
        time.sleep(0.05)
        b.close()
        t0 = time.monotonic()
        with pytest.raises(TransportError):
            pending.result(10)
        assert time.monotonic() - t0 < 8
        err = _fails(lambda: a.write_many(b.name, [("src", 0, 64, "dst", 0)]))
        assert isinstance(err, TransportError), err
    finally:
        a.close()
        b.close()
    with pytest.raises(TransportClosedError):
        a.write_many(b.name, [("src", 0, 64, "dst", 0)])


class _HeldPacer:
    """Holds every chunk of a paced transfer until `gate` is set; `held` is set once one waits."""

    def __init__(self):
        self.gate, self.held = threading.Event(), threading.Event()

    def pace(self, nbytes, priority):
        self.held.set()
        assert self.gate.wait(10)


@pytest.mark.parametrize("again", [False, True], ids=["deregistered", "registered_again"])
def test_a_write_posted_before_the_peer_deregistered_its_region_never_lands_in_the_old_buffer(backend, again):
    """a's write to b's region is posted (held by a's pacer, its bytes not sent yet), then b deregisters the region
    (and maybe registers a new buffer under its name): the old buffer is never written (inproc copied into it, having
    taken the region when the write was posted). A region gone is a failed write and no notification; every backend
    (tcp, rdma: a remote access error; inproc: RegionError)."""
    pacer = _HeldPacer()
    a, b = make_pair(backend, pacer=pacer)
    try:
        a.register("src", np.full(64, 7, np.uint8))
        old = np.zeros(64, np.uint8)
        b.register("kv", old)
        f = a.write(b.name, "src", 0, "kv", 0, 64, notify=5)
        assert pacer.held.wait(10)
        b.deregister("kv")
        if again:
            b.register("kv", np.zeros(64, np.uint8))
        pacer.gate.set()
        err = f.exception(10)
        assert not old.any(), "the write landed in the deregistered buffer"
        if not again:
            assert isinstance(err, TransportError), err
            with pytest.raises(TimeoutError):
                b.wait_notification(tag=5, timeout=0.2)
    finally:
        pacer.gate.set()
        a.close()
        b.close()


# ---- TransferFuture: the cheaper Future the TCP backend completes transfers with ------------------------------


def test_transfer_future_behaves_like_a_future():
    f = TransferFuture()
    assert isinstance(f, concurrent.futures.Future) and not f.done()
    with pytest.raises(concurrent.futures.TimeoutError):
        f.result(timeout=0.01)
    f.set_result(7)
    assert f.done() and f.result() == 7 and f.exception() is None and not f.cancelled()
    with pytest.raises(concurrent.futures.InvalidStateError):
        f.set_result(8)
    with pytest.raises(concurrent.futures.InvalidStateError):
        f.set_exception(PeerLostError("late"))
    seen = []
    f.add_done_callback(lambda g: seen.append(g.result()))  # after completion: runs at once
    assert seen == [7]
    g = TransferFuture()
    g.add_done_callback(lambda h: seen.append(type(h.exception()).__name__))  # before completion
    g.set_exception(PeerLostError("gone"))
    assert seen == [7, "PeerLostError"]
    with pytest.raises(PeerLostError, match="gone"):
        g.result()
    c = TransferFuture()
    assert c.cancel() and c.cancelled() and c.done()
    with pytest.raises(concurrent.futures.InvalidStateError):
        c.set_result(1)
    assert "finished" in repr(f) or "FINISHED" in repr(f)


def test_transfer_future_wakes_waiters_and_wait():
    futs = [TransferFuture() for _ in range(6)]
    futs[0].set_result(0)  # completed before anyone waits
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(futs[1].result(10)))
    waiter.start()
    time.sleep(0.02)

    def complete():
        time.sleep(0.05)
        for i, f in enumerate(futs[1:], 1):
            f.set_result(i)

    threading.Thread(target=complete).start()
    done, not_done = concurrent.futures.wait(futs, timeout=10)
    assert not not_done and len(done) == 6
    waiter.join(10)
    assert got == [1]
    assert sorted(f.result() for f in concurrent.futures.as_completed(futs, timeout=10)) == list(range(6))


def test_transfer_future_completion_races_with_callbacks_and_waits():
    """Completing thread vs. threads adding callbacks / blocking in result(): every callback runs exactly once,
    no waiter misses its wake-up."""
    n = 3000
    futs = [TransferFuture() for _ in range(n)]
    calls = [0] * n
    results: list = []

    def add_callbacks():
        for i, f in enumerate(futs):
            f.add_done_callback(lambda _f, i=i: calls.__setitem__(i, calls[i] + 1))

    def wait_all():
        results.append(sum(f.result(10) for f in futs[::7]))

    threads = [threading.Thread(target=add_callbacks), threading.Thread(target=wait_all)]
    for t in threads:
        t.start()
    for i, f in enumerate(futs):
        f.set_result(i)
    for t in threads:
        t.join(30)
    assert calls == [1] * n
    assert results == [sum(range(0, n, 7))]


def _blocked_result(f: TransferFuture) -> tuple[threading.Thread, list]:
    """A thread blocked in f.result(10); its list gets the result or the exception's type name."""
    got: list = []

    def wait() -> None:
        try:
            got.append(f.result(10))
        except BaseException as e:  # noqa: BLE001 - recorded for the test
            got.append(type(e).__name__)

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.05)
    assert t.is_alive() and not got, "result() must block until the future completes"
    return t, got


@pytest.mark.parametrize("how", ["result", "exception", "cancel", "batch", "callback_after_wait"])
def test_transfer_future_releases_a_blocked_result(how):
    """`result` waits on a lock of its own (no Condition): every way of completing releases it."""
    f, other = TransferFuture(), TransferFuture()
    t, got = _blocked_result(f)
    seen: list = []
    if how == "callback_after_wait":  # a Condition made after the waiter blocked: the normal path releases it
        f.add_done_callback(lambda g: seen.append(g.result()))
    if how in ("result", "callback_after_wait"):
        f.set_result(5)
    elif how == "exception":
        f.set_exception(PeerLostError("gone"))
    elif how == "cancel":
        assert f.cancel()
    else:
        complete_quietly([other, f], [1, 5])
        assert other.result(0) == 1
    t.join(5)
    assert not t.is_alive()
    assert got == [{"exception": "PeerLostError", "cancel": "CancelledError"}.get(how, 5)]
    assert seen == ([5] if how == "callback_after_wait" else [])


def test_transfer_future_result_timeout_then_completion():
    f = TransferFuture()
    t0 = time.monotonic()
    with pytest.raises(concurrent.futures.TimeoutError):
        f.result(0.05)
    assert time.monotonic() - t0 >= 0.04
    f.set_result(3)  # the timed-out waiter left nothing behind that breaks completion
    assert f.result(0) == 3 and f.__dict__.get("_light") is None


def test_transfer_future_batch_completion_races_with_blocked_waiters():
    """Batches completed by one thread while others block in result() on them: nobody misses a wake-up."""
    n, batch = 4000, 16
    futs = [TransferFuture() for _ in range(n)]
    totals: list = []

    def wait(k: int) -> None:
        totals.append(sum(f.result(20) for f in futs[k::4]))

    threads = [threading.Thread(target=wait, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for i in range(0, n, batch):
        complete_quietly(futs[i : i + batch], list(range(i, i + batch)))
    for t in threads:
        t.join(30)
    assert sorted(totals) == sorted(sum(range(k, n, 4)) for k in range(4))


def test_combine_futures_completes_after_all_and_fails_on_the_first_failure():
    parts = [TransferFuture() for _ in range(3)]
    both = combine_futures(parts, 42)
    parts[0].set_result(1)
    parts[2].set_result(1)
    assert not both.done()
    parts[1].set_result(1)
    assert both.result(1) == 42
    parts = [TransferFuture() for _ in range(3)]
    failed = combine_futures(parts, 42)
    parts[1].set_exception(PeerLostError("peer died"))
    with pytest.raises(PeerLostError, match="peer died"):  # at once, without waiting for the others
        failed.result(1)
    parts[0].set_result(1)  # later completions change nothing
    parts[2].set_exception(PeerLostError("second"))
    with pytest.raises(PeerLostError, match="peer died"):
        failed.result(1)
    parts = [TransferFuture() for _ in range(2)]
    cancelled = combine_futures(parts, 42)
    assert parts[0].cancel()
    with pytest.raises(concurrent.futures.CancelledError):
        cancelled.result(1)
    assert combine_futures([], 7).result(1) == 7
