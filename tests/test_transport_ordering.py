"""The transport ordering contract (`transport.base.Transport`): what an endpoint posts to one peer in one class
takes effect there in posting order (last write wins, reads see earlier writes, notifications and messages in
order), while other peers' lanes keep running; and `register` refusing unusable buffers with a `RegionError`.
Run on the backends of test_transport_conformance.py's BACKENDS but one's own ("rdma" skips without a device;
"rdma-fake" is rdma over the pyverbs stand-in).

inproc used to run every transfer and message as its own task on a 4-worker pool per class, so one thread's
writes to one range landed out of order (wrong bytes), and notifications and messages arrived out of order.
"""

from __future__ import annotations

import itertools
import struct
import threading
import time

import numpy as np
import pytest
from _fake_verbs import install
from test_transport_conformance import RDMA_FAKE, make_endpoint, make_pair, uses_rdma_fake

from transport.base import RegionError, Transport
from transport.inproc import InProcFabric, InProcTransport

BACKENDS = ["inproc", "tcp", "rdma", RDMA_FAKE]


@pytest.fixture(autouse=True)
def _rdma_fake_installed(request):
    """The pyverbs stand-in for the "rdma-fake" cases (tests/_fake_verbs.py), until their endpoints closed."""
    if uses_rdma_fake(request, "backend", "pair"):
        install(request.getfixturevalue("monkeypatch"))


@pytest.fixture(params=BACKENDS)
def pair(request):
    a, b = make_pair(request.param)
    yield a, b
    a.close()
    b.close()


def _slow_first(put, delay: float = 0.05):
    """Wrap a receiver queue's `put` so the first delivery takes `delay` s (a receiver slow to take it): a
    backend that delivers posts concurrently lets the later ones overtake it."""
    first = [True]

    def slow_put(*args):
        if first[0]:
            first[0] = False
            time.sleep(delay)
        put(*args)

    return slow_put


def _inversions(xs: list[int]) -> int:
    return sum(1 for x, y in itertools.pairwise(xs) if y < x)


def test_last_write_wins_for_writes_posted_in_order(pair):
    """Many writes of distinct patterns to one range, posted in order and awaited together: the range holds
    the last one's bytes, in either class."""
    a, b = pair
    k, n = 32, 32 << 10
    src = np.repeat(np.arange(1, k + 1, dtype=np.uint8), n)  # k patterns of n bytes
    dst = np.zeros(n, np.uint8)
    a.register("src", src)
    b.register("dst", dst)
    wrong = []
    for trial in range(30):
        priority = ("low", "high")[trial % 2]
        futs = [a.write(b.name, "src", i * n, "dst", 0, n, priority) for i in range(k)]
        assert [f.result(10) for f in futs] == [n] * k
        if not (dst == k).all():
            wrong.append((trial, np.unique(dst).tolist()))
    assert not wrong, f"the last posted write did not win in trials {wrong[:5]}"


def test_a_read_sees_the_writes_posted_before_it(pair):
    """A read posted right after a write to the same range (neither awaited) reads the written bytes."""
    a, b = pair
    n = 1 << 20
    src = np.stack([np.full(n, i + 1, np.uint8) for i in range(2)])
    a.register("src", src)
    a.register("back", np.zeros(n, np.uint8))
    b.register("dst", np.zeros(n, np.uint8))
    stale = []
    for trial in range(40):
        w = a.write(b.name, "src", (trial % 2) * n, "dst", 0, n)
        r = a.read(b.name, "back", 0, "dst", 0, n)
        assert r.result(10) == n and w.result(10) == n
        back = a.region("back").obj
        if not (back == trial % 2 + 1).all():
            stale.append(trial)
    assert not stale, f"reads of trials {stale} did not see the write posted before them"


def test_notifications_arrive_in_posting_order(pair):
    """Notifying writes posted in order notify the receiver in that order, also when the receiver is slow to
    take the first notification (the later ones must not overtake it)."""
    a, b = pair
    a.register("src", np.arange(64, dtype=np.uint8))
    b.register("dst", np.zeros(64, np.uint8))
    b.completions.put = _slow_first(b.completions.put)
    count = 3000
    futs = [
        a.write(b.name, "src", i % 48, "dst", i % 48, 16, ("low", "high")[i % 7 == 0], notify=i) for i in range(count)
    ]
    for f in futs:
        f.result(10)
    notes = [b.wait_notification(timeout=5) for _ in range(count)]
    # per class in posting order (classes may overtake each other)
    for cls in ("low", "high"):
        tags = [n.tag for n in notes if (n.tag % 7 == 0) == (cls == "high")]
        assert len(tags) == len({t for t in range(count) if (t % 7 == 0) == (cls == "high")})
        assert _inversions(tags) == 0, f"{cls}: {_inversions(tags)} notifications out of posting order"


def test_messages_arrive_in_send_order(pair):
    """Control messages sent in order by one thread reach the receiver in that order (also when it is slow to
    take the first), and one sender's order is kept per sender when two threads send."""
    a, b = pair
    b.messages.put = _slow_first(b.messages.put)
    count = 3000
    for f in [a.send(b.name, struct.pack("!I", i)) for i in range(count)]:
        f.result(10)
    got = [struct.unpack("!I", b.recv(timeout=5)[1])[0] for _ in range(count)]
    assert sorted(got) == list(range(count))
    assert _inversions(got) == 0, f"{_inversions(got)} messages out of send order"

    # posts from two threads interleave in some order, but each thread's own order is kept
    def sender(base):
        for f in [a.send(b.name, struct.pack("!I", base + i)) for i in range(1000)]:
            f.result(10)

    threads = [threading.Thread(target=sender, args=(base,)) for base in (0, 10**6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    got = [struct.unpack("!I", b.recv(timeout=5)[1])[0] for _ in range(2000)]
    for base in (0, 10**6):
        mine = [x for x in got if base <= x < base + 1000]
        assert mine == list(range(base, base + 1000))


def test_write_many_keeps_order_with_writes(pair):
    """`write_many` batches and single writes posted in order to the same range land in that order, and
    their notifications come in that order."""
    a, b = pair
    n, k = 4096, 4
    src = np.repeat(np.arange(1, 4 * k + 1, dtype=np.uint8), n)  # pattern p at [(p-1)*n, p*n)
    a.register("src", src)
    dst = np.zeros(k * n, np.uint8)
    b.register("dst", dst)
    wrong = []
    for trial in range(20):
        futs, expect = [], np.zeros_like(dst)
        for step in range(6):
            p = (trial + step) % 4  # pattern block: patterns p*k+1 .. p*k+k
            if step % 2:
                entries = [("src", (p * k + i) * n, n, "dst", i * n) for i in range(k)]
                futs.append(a.write_many(b.name, entries, notify=trial * 10 + step))
                expect[:] = src[p * k * n : (p + 1) * k * n]
            else:
                futs.append(a.write(b.name, "src", p * k * n, "dst", 0, k * n, notify=trial * 10 + step))
                expect[:] = src[p * k * n : (p + 1) * k * n]
        for f in futs:
            assert f.result(10) == k * n
        if not np.array_equal(dst, expect):
            wrong.append(trial)
        tags = [b.wait_notification(timeout=5).tag for _ in range(6)]
        assert tags == [trial * 10 + s for s in range(6)]
    assert not wrong, f"trials {wrong}: the last of the posted writes and batches did not win"


class _BaseWriteMany(InProcTransport):
    """inproc with the `Transport.write_many` default (what rdma uses), to check that default keeps order."""

    write_many = Transport.write_many


def test_the_default_write_many_keeps_order():
    """The base class's `write_many` posts its entries in order (the notifying one with them, not after the
    others completed), so a write posted after a notifying batch does not land before its last entry."""
    fabric = InProcFabric()
    a, b = _BaseWriteMany("dwm-a", fabric=fabric), InProcTransport("dwm-b", fabric=fabric)
    try:
        a.connect("dwm-b", "dwm-b")
        n = 64 << 10
        a.register("src", np.repeat(np.arange(1, 4, dtype=np.uint8), n))
        dst = np.zeros(n, np.uint8)
        b.register("dst", dst)
        wrong = 0
        for trial in range(30):
            many = a.write_many("dwm-b", [("src", 0, n, "dst", 0), ("src", n, n, "dst", 0)], notify=trial)
            last = a.write("dwm-b", "src", 2 * n, "dst", 0, n)
            assert many.result(10) == 2 * n and last.result(10) == n
            assert b.wait_notification(timeout=5).tag == trial
            wrong += not (dst == 3).all()
        assert not wrong, f"in {wrong} of 30 trials a write posted after a batch landed before the batch"
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stalled_peer_does_not_hold_up_other_peers(backend):
    """Order is per peer: while one peer's delivery is stuck, writes to another peer of the same class complete."""
    a, b = make_pair(backend)
    c = make_endpoint(backend, f"{b.name}-c")
    release = threading.Event()
    try:
        a.connect(c.name, c.address)
        a.register("src", np.ones(1024, np.uint8))
        b.register("dst", np.zeros(1024, np.uint8))
        c.register("dst", np.zeros(1024, np.uint8))
        put = b.completions.put
        b.completions.put = lambda note: (release.wait(10), put(note))
        stuck = a.write(b.name, "src", 0, "dst", 0, 1024, notify=1)
        behind = a.write(b.name, "src", 0, "dst", 0, 1024)
        assert a.write(c.name, "src", 0, "dst", 0, 1024, notify=2).result(5) == 1024
        assert c.wait_notification(timeout=5).tag == 2
        # (tcp, rdma: the write completes once its bytes landed, not once its notification was taken)
        assert not stuck.done() or backend in ("tcp", "rdma", RDMA_FAKE)
        release.set()
        assert stuck.result(10) == 1024 and behind.result(10) == 1024
        assert b.wait_notification(timeout=5).tag == 1
    finally:
        release.set()
        for ep in (a, b, c):
            ep.close()


# ---- register: unusable buffers are a RegionError naming the region --------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_register_zero_size_buffers_of_any_shape(backend):
    """A zero-size array of any shape is a 0-byte region, as a zero-size 1-D array always was (a 2-D one raised
    memoryview.cast's TypeError); a 0-byte write into it works, and a read-only one is still refused."""
    a, b = make_pair(backend)
    try:
        assert b.register("empty1d", np.zeros(0, np.float32)).size == 0
        assert b.register("empty2d", np.zeros((0, 3), np.float32)).size == 0
        assert b.register("empty3d", np.zeros((2, 0, 4), np.int64)).size == 0
        a.register("src", np.zeros(8, np.uint8))
        assert a.write(b.name, "src", 0, "empty2d", 0, 0).result(10) == 0
        with pytest.raises(RegionError, match="outside"):
            a.write(b.name, "src", 0, "empty2d", 0, 1)
        frozen = np.zeros((0, 3), np.float32)
        frozen.flags.writeable = False
        with pytest.raises(RegionError, match="region 'frozen': buffer is read-only"):
            b.register("frozen", frozen)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize(
    "buf,match",
    [
        (np.zeros(4, "M8[s]"), r"region 'bad': the ndarray cannot be exported as a buffer \(cannot include dtype 'M'"),
        (np.zeros((2, 2), "m8[ns]"), r"region 'bad': the ndarray cannot be exported as a buffer"),
        (np.empty(3, object), r"region 'bad': array of dtype object holds Python objects"),
    ],
    ids=["datetime64", "timedelta64", "object"],
)
def test_register_refuses_buffers_it_cannot_use_with_a_region_error(buf, match):
    """datetime64/timedelta64 arrays (memoryview() raised a bare ValueError) and object arrays (a peer's bytes
    would overwrite PyObject pointers) are refused with a RegionError naming the region and the reason."""
    ep = InProcTransport("reg-refuse", fabric=InProcFabric())
    try:
        with pytest.raises(RegionError, match=match):
            ep.register("bad", buf)
        assert ep.regions() == []
        assert ep.register("ok", buf.view(np.uint8) if buf.dtype != object else np.zeros(3, np.uint8)).size > 0
    finally:
        ep.close()
