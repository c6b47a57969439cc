"""Mutation audit 3, transport area: tests that kill hand mutations of transport/{tcp,inproc,base,feeder}.py and
dualpath_jax/traffic.py that the rest of the suite let pass (see /work/notes/mutation3_transport.md). Each test
names the mutation it guards against and the contract it checks.

Sockets and threads: every wait is on an event (a future, a socket read with a generous timeout), never a sleep
used as synchronisation; "nothing arrives" checks wait a bounded time for something that must not come."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest

from dualpath_jax.metrics import LinkBytes
from dualpath_jax.traffic import ClusterLinks, Link, Pacer, TrafficManager, rate_of
from transport import tcp as tcpmod
from transport.base import MessageQueue, TransportError
from transport.tcp import HEADER, OP_HELLO, OP_HELLO_ACK, OP_WRITE, TcpTransport, pack_header, unpack_header

# ---- traffic: SFQ refunds, take-backs, pacing defaults, per-link byte records ------------------------------


def _slow_link(**kw) -> Link:
    """A link so slow (1 B/s, 100-byte chunks: 100 s a chunk, 50 s horizon) that only its first chunk is granted
    while a test runs: the others stay queued, so their SFQ tags can be looked at."""
    return Link("cnic/engine0", 1.0, weights={"high": 1.0, "low": 1.0}, quantum=100, burst_s=0.0, **kw)


def test_a_refund_moves_up_only_the_chunks_queued_after_the_dropped_one():
    """Mutation: `Link.cancel` refunds a dropped chunk's share to every queued chunk of its class (`u.seq > t.seq`
    dropped). Contract (SFQ, PAPER.md "QoS"): a chunk's start tag is its class's finish tag when it was queued; a
    dropped chunk's share is refunded to the chunks queued *behind* it, and the class's finish tag goes down by it.
    Chunks queued before it keep their tags (moved up, they would jump ahead of the other class)."""
    link = _slow_link()
    first = link.enqueue(100, "low")  # granted at once (the link is idle)
    b, c, d = (link.enqueue(100, "low") for _ in range(3))
    assert first.slot is not None and b.slot is None and d.slot is None
    tags = (b.start_tag, c.start_tag, d.start_tag)
    assert tags == (100.0, 200.0, 300.0)
    link.cancel(c)
    assert b.start_tag == 100.0, "a chunk queued before the dropped one keeps its tag"
    assert d.start_tag == 200.0 and d.charge == 300.0
    assert link._finish["low"] == 300.0
    for t in (d, b, first):
        link.cancel(t)


def test_a_chunk_cancelled_twice_is_refunded_and_taken_back_once():
    """Mutations: `t.charge = None` dropped from `Link.cancel` (a second cancel refunds the share again) and
    `t.nbytes = 0` dropped (a granted chunk cancelled twice takes its bytes back twice). Contract: cancel is
    idempotent: the class pays each dropped chunk's share back once, and the link's records lose its bytes once
    (`bytes_by_class` never goes negative)."""
    link = _slow_link()
    granted = link.enqueue(100, "low")
    queued, behind = link.enqueue(100, "low"), link.enqueue(100, "low")
    assert granted.slot is not None and queued.slot is None
    assert link.total_bytes == 100
    link.cancel(queued)
    link.cancel(queued)
    assert behind.start_tag == 100.0 and link._finish["low"] == 200.0
    link.cancel(granted)
    link.cancel(granted)
    assert link.total_bytes == 0 and link.bytes_by_class["low"] == 0
    assert link.samples() == []
    link.cancel(behind)


def test_the_rest_of_a_cut_chunk_goes_at_the_virtual_time():
    """Mutation: `Link.enqueue(paid=True)` (the rest of a chunk cut to fill the gap before a held slot) takes the
    class's finish tag as its start tag instead of the virtual time. Contract (`Link.paced`): the rest's share was
    paid by the cut chunk, so it is not charged and goes at once in SFQ order (the virtual time), ahead of the
    other class's chunks queued behind their own finish tags; it changes no finish tag."""
    link = Link("cnic/engine0", math.inf, weights={"high": 1.0, "low": 1.0})
    cut = link.enqueue(1000, "low", split=True)
    link.enqueue(1000, "high")
    high_next = link.enqueue(1000, "high")  # start tag 1000: behind high's first chunk
    rest = link.enqueue(400, "low", split=True, paid=True)
    assert cut.charge == 1000.0
    assert rest.start_tag == link._vtime == 0.0 and rest.charge is None
    assert link._finish == {"high": 2000.0, "low": 1000.0}
    assert min(rest, high_next) is rest, "the paid rest goes before the other class's later chunk"


def test_a_chunk_dropped_on_an_unpaced_link_is_never_recorded():
    """Mutation: `Link.wait` on an unpaced (inf-rate) link grants and records a ticket that was already cancelled
    (`and not t.dropped` dropped). Contract (hunt 7): an unpaced link records a chunk when its transfer waits for it;
    a chunk taken back never moved, so it is never recorded, whoever waits for it later."""
    link = Link("snic/node0", math.inf, weights={"low": 1.0})
    t = link.enqueue(500, "low")
    link.cancel(t)
    assert link.wait(t) is None
    assert link.total_bytes == 0 and link.samples() == []
    moved = link.enqueue(300, "low")
    assert link.wait(moved) is not None and link.total_bytes == 300


def test_a_link_idle_for_long_catches_up_burst_s_of_bytes_at_once():
    """Mutation: `Link._dispatch` advances the idle link's timeline to now instead of now - burst_s (no catch-up).
    Contract (`Link` docstring, burst_s = the token-bucket depth): a link that was idle may catch up burst_s worth of
    bytes at once (their slots lie in the past, moved to now), and no more: then it paces at its rate.
    (The link's idle spell is made by moving its private timeline back 100 s: no sleep.)"""
    link = Link("snic/node0", 100.0, weights={"low": 1.0}, quantum=100, burst_s=5.0)  # 1 s a chunk, 0.5 s horizon
    _idle_for_long(link)
    tickets = [link.enqueue(100, "low") for _ in range(12)]
    granted = [t for t in tickets if t.slot is not None]
    # 5 s of catch-up (5 chunks, slots in the past), then the chunk due now; the rest wait for their slots
    assert 6 <= len(granted) < 12
    assert tickets[-1].slot is None
    for t in reversed(tickets):
        link.cancel(t)


def test_the_default_quantum_is_5_ms_of_the_rate_within_16_kib_and_8_mib():
    """Mutations: the default quantum's floor 16 KiB changed (8 KiB). Contract (`Link` docstring): the default chunk
    is ~5 ms of the link's rate, at least 16 KiB (and at most 8 MiB; 1 MiB on an unpaced link)."""
    assert Link("a", 1e6).quantum == 16 << 10  # 5 ms = 5000 B: the floor
    assert Link("b", 2e6).quantum == 16 << 10  # 10000 B: still the floor
    assert Link("c", 1e9).quantum == 5_000_000
    assert Link("d", 1e11).quantum == 8 << 20
    assert Link("e", math.inf).quantum == 1 << 20


def test_a_record_lands_in_the_bin_its_time_falls_in_and_never_before_the_origin():
    """Mutations: the bin of a record rounded instead of floored (`round(rel / interval)`), and a record before the
    link's clock origin put in a negative bin (`max(0.0, ...)` dropped). Contract (`LinkBytes` bins, DESIGN.md
    metrics): bin k covers [k, k + 1) * sample_interval after the origin; bytes moved before the origin count in
    the first bin."""
    now = time.monotonic()
    late = Link("snic/node0", math.inf, weights={"low": 1.0}, clock_origin=now - 7.0, sample_interval=10.0)
    late.record(123)  # 7 s (and a little) after the origin: bin 0, [0, 10)
    (s,) = late.samples()
    assert (s.link, s.t0, s.t1, s.nbytes) == ("snic/node0", 0.0, 10.0, 123)
    early = Link("snic/node1", math.inf, weights={"low": 1.0}, clock_origin=now + 100.0, sample_interval=1.0)
    early.record(7)
    (s,) = early.samples()
    assert (s.t0, s.t1, s.nbytes) == (0.0, 1.0, 7)


def _idle_for_long(*links: Link) -> None:
    """Make `links` look idle for the last 100 s (their booked timelines moved back: no sleep)."""
    for link in links:
        link._busy_until = link._wake = time.monotonic() - 100.0


def test_a_joint_chunk_caught_up_after_an_idle_spell_is_recorded_when_it_moves():
    """Mutation: `Pacer._reserve` returns (and records at) the joint slot itself when it lies in the past (a burst
    caught up after an idle spell) instead of moving it to now. Contract (as `Link._dispatch`, test_traffic_hunt's
    single-link test): bytes are recorded when they move, never in a bin before the transfer started."""
    origin = time.monotonic() - 10.0
    a = Link("snic/node0", 100.0, {"low": 1.0}, quantum=100, burst_s=5.0, clock_origin=origin, sample_interval=1.0)
    b = Link("cnic/engine0", 100.0, {"low": 1.0}, quantum=100, burst_s=5.0, clock_origin=origin, sample_interval=1.0)
    _idle_for_long(a, b)
    started = time.monotonic() - origin
    Pacer([a, b]).pace(100, "low")
    for link in (a, b):
        (s,) = link.samples()
        assert s.nbytes == 100 and s.t1 > started, (s, started)


def test_a_paths_next_chunk_is_reserved_while_the_current_one_waits_for_its_slot():
    """Mutation: `Pacer.paced` no longer reserves the path's next chunk when its turn comes while the current chunk
    waits for its slot (`if joint and pending:` made False). Contract (`Pacer.paced`, "like a link's grant ahead"):
    a multi-link path keeps its next chunk booked on every link as soon as it may, so another flow cannot take the
    slot right behind it; with the links catching up after an idle spell the next chunk's turn has come at once, so
    it is booked (and recorded at its slot) before the first chunk is handed over."""
    a = Link("snic/node0", 100.0, {"low": 1.0}, quantum=100, burst_s=5.0)
    b = Link("cnic/engine0", 100.0, {"low": 1.0}, quantum=100, burst_s=5.0)
    _idle_for_long(a, b)
    chunks = Pacer([a, b]).paced(300, "low")
    assert next(chunks) == 100
    assert a.total_bytes == b.total_bytes == 200, "the second chunk should be booked on both links already"
    chunks.close()  # (dropped: the chunks booked ahead are taken back)
    assert a.total_bytes == b.total_bytes == 100


@pytest.mark.parametrize(("gap_s", "cut"), [(0.5, False), (10.0, True)])
def test_a_chunk_is_cut_to_fill_a_gap_only_of_at_least_a_16th_of_a_quantum(gap_s, cut):
    """Mutation: `Link._dispatch` cuts a split chunk to fill any gap before a held slot, however small (`fill >=
    max(1, quantum // 16)` made `fill >= 1`). Contract (test_traffic_hunt3, work conservation): a chunk too long for
    the gap before a slot held for a multi-link path is cut to fill it when the gap holds at least quantum / 16 bytes;
    a smaller sliver is left idle (a tiny chunk costs a wake-up and a send for almost no bytes), the chunk goes whole
    after the held slot."""
    link = Link("snic/node0", 100.0, {"low": 1.0}, quantum=1600, burst_s=0.0)  # q/16 = 100 B = 1 s of the rate
    now = time.monotonic()
    with link.lock:
        link.book([], now + gap_s, 2.0, now)  # a multi-link path's slot held from gap_s on
    t = link.enqueue(1600, "low", split=True)
    if cut:
        assert 0 < t.nbytes <= 1000 and t.nbytes + t.rest == 1600 and t.slot < now + gap_s  # in the gap
    else:
        assert (t.nbytes, t.rest) == (1600, 0) and t.slot >= now + gap_s + 2.0 - 1e-6  # after the held slot
    link.cancel(t)


def test_the_rest_of_a_chunk_cut_by_paced_is_not_charged_again():
    """Mutation: `Link.paced` queues the rest of a chunk cut to fill a gap without `paid=True` (its class is charged a
    second time for those bytes). Contract (`Link.paced`, `Link.cancel`): a chunk cut to fill the gap before a held
    slot keeps its whole charge; its rest goes as one more chunk whose share was paid, so the class's finish tag grows
    by the transfer's bytes / weight once."""
    link = Link("snic/node0", 100.0, {"low": 1.0}, quantum=1600, burst_s=0.0)
    now = time.monotonic()
    with link.lock:
        link.book([], now + 10.0, 2.0, now)  # a path's slot held from 10 s on: ~1000 B of gap before it
    chunks = link.paced(1600, "low")
    first = next(chunks)
    assert 0 < first < 1600
    assert link._finish["low"] == 1600.0, "the rest of the cut chunk was charged again"
    chunks.close()


def test_rate_of_averages_the_bins_inside_the_window_only():
    """Mutation: `rate_of` keeps bins that end after t1 (`s.t1 <= t1` dropped). Contract: the mean bytes/s of a link
    over the bins inside [t0, t1)."""
    samples = [
        LinkBytes("snic/node0", 0.0, 1.0, 100),
        LinkBytes("snic/node0", 1.0, 2.0, 200),
        LinkBytes("snic/node0", 2.0, 3.0, 400),
        LinkBytes("snic/node1", 0.0, 1.0, 999),
    ]
    assert rate_of(samples, "snic/node0", 0.0, 2.0) == pytest.approx(150.0)
    assert rate_of(samples, "snic/node0", 1.0) == pytest.approx(300.0)
    assert rate_of(samples, "snic/node0", 5.0) == 0.0


def test_a_clusters_cnics_take_the_weights_it_is_given():
    """Mutation: `TrafficManager.for_cluster` builds every CNIC with the default weights, ignoring
    `ClusterLinks.cnic_weights`. Contract: the rates and CNIC weights of `ClusterLinks` shape every link (the SNIC one
    class, each CNIC the given classes)."""
    tm = TrafficManager.for_cluster(
        {0: [0, 1], 1: [2]},
        ClusterLinks(snic_bytes_per_s=1e6, cnic_bytes_per_s=2e6, cnic_weights={"high": 3, "low": 1}),
    )
    for e in (0, 1, 2):
        assert tm.cnic(e).weights == {"high": 3, "low": 1} and tm.cnic(e).rate == 2e6
    assert tm.snic(1).weights == {"low": 1.0} and tm.snic(1).rate == 1e6


# ---- tcp: hand-driven peers --------------------------------------------------------------------------------


@pytest.fixture
def server():
    ep = TcpTransport("srv3")
    ep.register("dst", np.zeros(1 << 16, np.uint8))
    yield ep
    ep.close()


def _raw_handshake(server, name: str = "evil3") -> list[socket.socket]:
    """A connection set opened by hand (loopback, no secret): [high, low] sockets to send crafted frames on."""
    socks = []
    for stream in ("high", "low"):
        s = socket.create_connection(server.address, timeout=10)
        hello = {"name": name, "peer": server.name, "session": "s3", "stream": stream, "nonce": os.urandom(32).hex()}
        payload = json.dumps(hello).encode()
        s.sendall(pack_header(OP_HELLO, length=len(payload)) + payload)
        op, _, _, _, length, _, _ = unpack_header(tcpmod._recv_exact(s, HEADER.size))
        assert op == OP_HELLO_ACK
        tcpmod._recv_exact(s, length)
        socks.append(s)
    server.wait_for_peer(name)
    return socks


def _frame(s: socket.socket) -> tuple[tuple, bytes]:
    """The next frame on `s` (header fields, whole payload)."""
    hdr = unpack_header(tcpmod._recv_exact(s, HEADER.size))
    return hdr, tcpmod._recv_exact(s, hdr[4]) if hdr[4] else b""


def _closed_by_server(s: socket.socket, timeout: float = 10.0) -> bool:
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_a_write_frame_whose_header_checksum_is_wrong_lands_nothing_and_closes_the_set(server, caplog):
    """Mutation: the data path's header check (`_BufferedReceiver.header`) skips the checksum comparison (only
    `unpack_header`, used by the handshake, kept it). Contract (tcp module docstring): everything a peer sends is
    validated, the header checksum included; a bad frame closes that connection set and lands nothing."""
    caplog.set_level(logging.ERROR, logger="transport.tcp")
    socks = _raw_handshake(server)
    try:
        rid = server.region("dst").region_id
        header = bytearray(pack_header(OP_WRITE, region=rid, offset=0, length=4, req=1))
        header[-1] ^= 0xFF  # the checksum
        socks[1].sendall(bytes(header) + b"evil")
        assert _closed_by_server(socks[1])
        assert bytes(server.region("dst").obj[:4]) == b"\0\0\0\0"
        assert "checksum" in caplog.text
    finally:
        for s in socks:
            s.close()


def test_a_stream_of_more_flagged_writes_is_acknowledged_every_32_frames(server):
    """Mutation: the receiver sends its held acknowledgements only at ACK_BATCH entries (`held >= ACK_FRAMES`
    dropped). Contract (tcp module docstring): acknowledgements go out when the socket drains, or once 128 writes or
    32 write frames landed, so a sender that keeps its window full (every frame flagged FLAG_MORE, the socket never
    drains) is still acknowledged every 32 frames."""
    socks = _raw_handshake(server)
    rid, s = server.region("dst").region_id, socks[1]
    try:
        frames = b"".join(
            pack_header(OP_WRITE, tcpmod.FLAG_MORE, rid, 4 * i, 4, 0, 100 + i) + b"%04d" % i for i in range(40)
        )
        s.sendall(frames)
        (op, *_), body = _frame(s)
        assert op == tcpmod.OP_WRITE_ACKS
        assert list(tcpmod.ACK_ENTRY.iter_unpack(body)) == [(100 + i, 4) for i in range(tcpmod.ACK_FRAMES)]
        s.sendall(pack_header(OP_WRITE, region=rid, offset=160, length=4, req=140) + b"last")
        (op, *_), body = _frame(s)
        assert op == tcpmod.OP_WRITE_ACKS
        assert list(tcpmod.ACK_ENTRY.iter_unpack(body)) == [(100 + i, 4) for i in range(32, 40)] + [(140, 4)]
        assert bytes(server.region("dst").obj[:8]) == b"00000001"
    finally:
        for x in socks:
            x.close()


def _writes_to_raw_peer(server, n: int) -> tuple[list[socket.socket], list[Future], list[tuple[int, int]]]:
    """`server` writes n small frames to a hand-driven peer (which answers the region query): its sockets, the
    write futures and the (request id, length) of each frame it got."""
    socks = _raw_handshake(server)
    holder: list = []
    t = threading.Thread(target=lambda: holder.append(server.write("evil3", "dst", 0, "peer_dst", 0, 10)))
    t.start()
    (op, *_, req), body = _frame(socks[0])
    assert op == tcpmod.OP_REGION_QUERY and body == b"peer_dst"
    socks[0].sendall(pack_header(tcpmod.OP_REGION_INFO, region=9, offset=1 << 16, req=req))
    t.join(10)
    futs = holder + [server.write("evil3", "dst", 0, "peer_dst", 0, 11 + i) for i in range(n - 1)]
    frames = []
    for _ in range(n):
        (op, _, rid, _, length, _, req), _ = _frame(socks[1])
        assert op == OP_WRITE and rid == 9
        frames.append((req, length))
    return socks, futs, frames


def test_an_ack_batch_of_more_than_128_entries_is_refused(server, caplog):
    """Mutation: the OP_WRITE_ACKS length check loses its upper bound (`length <= ack_max`). Contract (tcp module
    docstring, OP_WRITE_ACKS): a receiver acknowledges at most ACK_BATCH writes per frame; a longer batch is a
    protocol error (a peer must not make this side read an unbounded ack payload): the set is closed and its pending
    writes fail, none completes."""
    caplog.set_level(logging.ERROR, logger="transport.tcp")
    n = tcpmod.ACK_BATCH + 1
    socks, futs, frames = _writes_to_raw_peer(server, n)
    try:
        payload = b"".join(tcpmod.ACK_ENTRY.pack(req, length) for req, length in frames)
        socks[1].sendall(pack_header(tcpmod.OP_WRITE_ACKS, length=len(payload)) + payload)
        for f in futs:
            with pytest.raises(TransportError):
                f.result(10)
        assert "write acknowledgement batch of" in caplog.text
    finally:
        for s in socks:
            s.close()


def test_a_message_one_byte_over_the_receivers_limit_closes_the_set(caplog):
    """Mutation: the receiver's OP_MSG size check lets a message of max_message_bytes + 1 through (`length >
    max_message_bytes + 1`). Contract (`TcpTransport` max_message_bytes): the largest control message the endpoint
    accepts; a larger one (a peer ignoring the limit the handshake told it) closes the connection set, and nothing of it
    is queued; one of exactly the limit is delivered."""
    caplog.set_level(logging.ERROR, logger="transport.tcp")
    ep = TcpTransport("srv3m", max_message_bytes=64)
    try:
        socks = _raw_handshake(ep)
        try:
            socks[0].sendall(pack_header(tcpmod.OP_MSG, length=64) + b"m" * 64)
            assert ep.recv(timeout=10) == ("evil3", b"m" * 64)
            socks[0].sendall(pack_header(tcpmod.OP_MSG, length=65) + b"n" * 65)
            assert _closed_by_server(socks[0])
            assert "exceeds the 64 limit" in caplog.text
            with pytest.raises(TimeoutError):
                ep.recv(timeout=0.2)
        finally:
            for s in socks:
                s.close()
    finally:
        ep.close()


# ---- base: the message and completion queues --------------------------------------------------------------


def test_a_message_queue_get_for_one_peer_leaves_the_others_messages_queued():
    """Mutation: `MessageQueue.get(peer=...)` takes the oldest message of any peer (the filter dropped). Contract
    (`Transport.recv`): the next control message from `peer` if given; other peers' messages stay queued in order."""
    q = MessageQueue()
    q.put("a", b"1")
    q.put("b", b"2")
    q.put("a", b"3")
    assert q.get(peer="b", timeout=5) == ("b", b"2")
    assert q.get(peer="a", timeout=5) == ("a", b"1")
    with pytest.raises(TimeoutError):
        q.get(peer="b", timeout=0.05)
    assert q.get(timeout=5) == ("a", b"3")


class _PaceOnly:
    """A pacer with only `pace` (the `transport.base.Pacer` protocol's required method): records each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str]] = []
        self.lock = threading.Lock()

    def pace(self, nbytes: int, priority: str) -> None:
        with self.lock:
            self.calls.append((nbytes, priority))


def test_a_pacer_without_paced_is_asked_for_exactly_the_bytes_moved():
    """Mutation: `Transport._paced_chunks` asks a pacer that has only `pace` for a whole chunk for the last, shorter
    piece too (`pace(chunk)` instead of `pace(n)`). Contract (`transport.base.Pacer`): the pacer meters the bytes that
    cross, chunk by chunk: their sizes sum to the transfer's length (an emulated link would otherwise record and wait
    for bytes never sent)."""
    from transport.inproc import PACE_CHUNK, InProcFabric, InProcTransport

    fabric = InProcFabric()
    pacer = _PaceOnly()
    a, b = InProcTransport("m3a", fabric=fabric, pacer=pacer), InProcTransport("m3b", fabric=fabric)
    try:
        n = PACE_CHUNK + PACE_CHUNK // 2 + 3
        src = np.random.default_rng(1).integers(0, 256, n, dtype=np.uint8)
        a.register("src", src)
        b.register("dst", np.zeros(n, np.uint8))
        a.connect("m3b")
        assert a.write("m3b", "src", 0, "dst", 0, n, priority="high").result(30) == n
        assert pacer.calls == [(PACE_CHUNK, "high"), (n - PACE_CHUNK, "high")]
        np.testing.assert_array_equal(b.region("dst").obj, src)
    finally:
        a.close()
        b.close()


# ---- feeder ------------------------------------------------------------------------------------------------


def test_a_layer_the_consumer_moved_past_while_it_loaded_is_dropped_once_loaded():
    """Mutation: `LayerFeeder._load` keeps a layer that finished loading after the consumer moved past it (`if
    self._released > layer: self._forget(layer)` skipped). Contract (`LayerFeeder.wait_for_layer`, "device memory
    holds at most prefetch + 1 layers of this feed"): layers < l are released when the consumer waits for l, a layer
    still loading then included: once loaded it is not held, and waiting for it again raises `LayerLoadError`."""
    from transport.feeder import LayerFeeder, LayerLoadError

    gate = threading.Event()

    def source(layer, out):
        if layer == 0:
            assert gate.wait(30)
        out[:] = layer
        return out

    feed = LayerFeeder(3, source, 16, prefetch=1, to_device=lambda h: np.array(h, copy=True))
    got: list = []
    try:
        consumer = threading.Thread(target=lambda: got.append(feed.wait_for_layer(1)))
        consumer.start()  # releases layer 0 (still loading), then waits for layer 1
        deadline = time.monotonic() + 30
        while feed._released < 1 and time.monotonic() < deadline:  # (no event to wait on: the feeder's own counter)
            time.sleep(0.001)
        assert feed._released == 1
        gate.set()
        consumer.join(30)
        assert not consumer.is_alive() and int(got[0][0]) == 1
        with pytest.raises(LayerLoadError, match=r"layer 0 was released"):
            feed.wait_for_layer(0)
    finally:
        gate.set()
        feed.close()


class _NotifyingTransport:
    """Stands in for a transport on the PE side of the DE path: one region, notifications handed out as given."""

    def __init__(self, nbytes: int, notes: dict) -> None:
        from transport.base import MemoryRegion

        self.buf = np.arange(nbytes, dtype=np.uint8)
        self._region = MemoryRegion("pe_buf", 1, memoryview(self.buf), self.buf)
        self.notes = notes

    def wait_notification(self, tag=None, peer=None, timeout=None):
        return self.notes[tag]

    def region(self, name):
        assert name == "pe_buf"
        return self._region


def test_a_layer_notification_at_another_offset_is_not_taken_as_the_layer():
    """Mutation: `TransportLayerSource` no longer compares the notification's offset with `offset_fn(layer)`.
    Contract (feeder module docstring: a source never hands over garbage KV): the notification "layer l arrived" must
    describe exactly where layer l is expected (region, offset, length); bytes that landed elsewhere fail the layer
    with `LayerLoadError` instead of the feeder taking the expected spot's stale bytes as layer l."""
    from transport.base import Notification
    from transport.feeder import LayerLoadError, TransportLayerSource

    notes = {
        10: Notification("de0", 10, "pe_buf", 0, 32),
        11: Notification("de0", 11, "pe_buf", 0, 32),  # layer 1 belongs at offset 32
    }
    src = TransportLayerSource(_NotifyingTransport(64, notes), "pe_buf", lambda k: 32 * k, 32, lambda k: 10 + k)
    out = np.zeros(32, np.uint8)
    np.testing.assert_array_equal(src(0, out), np.arange(32, dtype=np.uint8))
    with pytest.raises(LayerLoadError, match=r"pe_buf\[0:\+32\] does not match the expected pe_buf\[32:\+32\]"):
        src(1, out)


@pytest.mark.parametrize("priority", ["high", "low"])
def test_a_read_reply_is_paced_by_the_endpoint_that_sends_it_in_the_reads_class(priority):
    """Mutation: the reader serving OP_READ queues the reply as a control frame (`priority=None`: unpaced).
    Contract (dualpath_jax/traffic.py: "a transport paces the bytes it sends", its egress): a read's bytes cross the
    link of the endpoint that holds them, so its pacer meters the reply, in the read's class, byte for byte."""
    pacer = _PaceOnly()
    a, b = TcpTransport("m3ra"), TcpTransport("m3rb", pacer=pacer)
    try:
        n = 200_000
        src = np.random.default_rng(2).integers(0, 256, n, dtype=np.uint8)
        b.register("src", src)
        a.register("dst", np.zeros(n, np.uint8))
        a.connect("m3rb", b.address)
        assert a.read("m3rb", "dst", 0, "src", 0, n, priority=priority).result(30) == n
        np.testing.assert_array_equal(a.region("dst").obj, src)
        assert {p for _, p in pacer.calls} == {priority}
        assert sum(k for k, _ in pacer.calls) == n
    finally:
        a.close()
        b.close()


def test_small_paced_writes_queued_behind_each_other_are_each_paced():
    """Mutation: `_Conn._is_small` takes a small paced payload for a control frame, so the sender thread coalesces
    queued small writes into one unpaced sendmsg. Contract (`TcpTransport` pacer: "paces outgoing payload bytes"):
    every payload byte a paced endpoint sends goes through its pacer, small writes queued behind a busy connection
    too (only control frames and empty payloads are coalesced unpaced). The pacer holds the first write until the
    others are queued behind it."""
    gate, first = threading.Event(), threading.Event()

    class HeldPacer(_PaceOnly):
        def pace(self, nbytes: int, priority: str) -> None:
            first.set()
            assert gate.wait(30)
            super().pace(nbytes, priority)

    pacer = HeldPacer()
    a, b = TcpTransport("m3sa", pacer=pacer), TcpTransport("m3sb")
    try:
        a.register("src", np.arange(1 << 16, dtype=np.uint64).astype(np.uint8))
        b.register("dst", np.zeros(1 << 16, np.uint8))
        a.connect("m3sb", b.address)
        a._check_remote_range("m3sb", "dst", 0, 1)  # (the region query answered before the writes)
        futs = [a.write("m3sb", "src", 0, "dst", 0, 1000)]
        assert first.wait(30)  # the sender thread is pacing the first write
        futs += [a.write("m3sb", "src", 1000 * i, "dst", 1000 * i, 1000) for i in range(1, 20)]
        gate.set()
        assert [f.result(30) for f in futs] == [1000] * 20
        assert pacer.calls == [(1000, "low")] * 20
        np.testing.assert_array_equal(b.region("dst").obj[:20000], a.region("src").obj[:20000])
    finally:
        gate.set()
        a.close()
        b.close()


def test_read_replies_that_wait_for_a_full_socket_hold_the_bytes_of_when_the_reads_were_served():
    """Mutations: the rest of a read reply that the socket did not take inline is not copied (`_send_inline`'s `if
    self.snapshot` made False), and a reply queued behind it is not copied either (`enqueue`'s `if snapshot and n`).
    Contract (tcp module docstring, base `Transport` ordering): a read's reply holds the region's bytes as of when
    the read was served; a write posted after the read (here: landing on the other connection while the replies
    wait for the reader's full socket) does not change the bytes it returns. The hand-driven peer reads nothing until
    the write landed, so the socket fills and the replies wait."""
    n, reads = 512 << 10, 96  # 48 MiB of replies: more than the sockets buffer
    server = TcpTransport("srv3r")
    pattern = np.random.default_rng(5).integers(0, 256, n, dtype=np.uint8)
    region = server.register("big", pattern.copy())
    socks = _raw_handshake(server)
    high, low = socks
    try:
        low.sendall(b"".join(pack_header(tcpmod.OP_READ, 0, region.region_id, 0, n, 0, 1000 + i) for i in range(reads)))
        low.sendall(pack_header(tcpmod.OP_MSG, length=4) + b"sync")  # served after every read before it
        assert server.recv(timeout=30) == ("evil3", b"sync")
        high.sendall(pack_header(OP_WRITE, 0, region.region_id, 0, n, 0, 7) + b"\xff" * n)
        (op, *_), body = _frame(high)
        assert op == tcpmod.OP_WRITE_ACKS and list(tcpmod.ACK_ENTRY.iter_unpack(body)) == [(7, n)]
        assert bytes(region.obj[:4]) == b"\xff\xff\xff\xff"  # the write landed
        low.settimeout(60)
        for i in range(reads):
            (op, _, _, _, length, _, req), body = _frame(low)
            assert (op, length, req) == (tcpmod.OP_READ_RESP, n, 1000 + i)
            assert body == pattern.tobytes(), f"reply {i} holds bytes written after its read was served"
    finally:
        for s in socks:
            s.close()
        server.close()


class _LazyWrite(Future):
    """A write that is "sent" only when the forwarder waits for it: `result()` takes the bytes of its staging slot
    then (what a real transport would send) and completes."""

    def __init__(self, view: memoryview, n: int, sent: list, layer: int) -> None:
        super().__init__()
        self.args = view, n, sent, layer

    def result(self, timeout=None):
        if not self.done():
            view, n, sent, layer = self.args
            sent.append((layer, bytes(view)))
            self.set_result(n)
        return super().result(timeout)


class _ForwardingTransport:
    """Stands in for the DE's transport: one staging region; each write is a `_LazyWrite` of its slot."""

    def __init__(self, nbytes: int) -> None:
        from transport.base import MemoryRegion

        self.buf = np.zeros(nbytes, np.uint8)
        self._region = MemoryRegion("de_buf", 1, memoryview(self.buf), self.buf)
        self.sent: list = []

    def region(self, name):
        return self._region

    def write(
        self, peer, local_region, local_offset, remote_region, remote_offset, length, priority="low", notify=None
    ):
        view = self._region.view[local_offset : local_offset + length]
        return _LazyWrite(view, length, self.sent, notify)


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_a_forwarder_reuses_a_staging_slot_only_after_its_layer_was_sent(prefetch):
    """Mutation: `LayerForwarder._run` waits for the oldest write only once more than prefetch + 1 are in flight (`>
    self.prefetch + 1`), so it reads the next layer into a slot whose write has not gone yet. Contract
    (`LayerForwarder`: "at most prefetch + 1 layers of staging are used (ring in the region)"): the slot about to be
    overwritten must have been sent; every layer reaches the PE as its own bytes."""
    from transport.feeder import LayerForwarder

    layers, nbytes = 6, 64
    ep = _ForwardingTransport((prefetch + 1) * nbytes)

    def source(layer, out):
        out[:] = layer
        return out

    fwd = LayerForwarder(
        ep, "pe0", source, layers, nbytes, "de_buf", 0, "pe_buf", lambda k: k * nbytes, lambda k: k, prefetch
    )
    assert fwd.start().result(30) == layers
    assert sorted(ep.sent) == [(layer, bytes([layer]) * nbytes) for layer in range(layers)]


@pytest.mark.parametrize("backend", ["inproc", "tcp"])
def test_a_negative_length_is_a_region_error_at_the_call(backend):
    """Mutation: `MemoryRegion.check` no longer refuses a negative length (`length < 0` dropped), so [offset, offset +
    length) with length < 0 passed as inside the region (inproc then resolved a write of -5 bytes to -5, moving
    nothing). Contract (`Transport.write`/`read`): an out-of-range local range raises `RegionError` at once."""
    from transport import make_transport
    from transport.base import MemoryRegion, RegionError
    from transport.inproc import InProcFabric

    buf = np.zeros(64, np.uint8)
    with pytest.raises(RegionError, match=r"\[10, 5\) is outside region 'r'"):
        MemoryRegion("r", 1, memoryview(buf), buf).check(10, -5, "check")
    extra = {"fabric": InProcFabric()} if backend == "inproc" else {}
    a = make_transport({"backend": backend, "name": f"m3n{backend}a", **extra})
    b = make_transport({"backend": backend, "name": f"m3n{backend}b", **extra})
    try:
        a.register("src", np.zeros(64, np.uint8))
        b.register("dst", np.zeros(64, np.uint8))
        a.connect(b.name, b.address)
        with pytest.raises(RegionError):
            a.write(b.name, "src", 10, "dst", 10, -5)
        with pytest.raises(RegionError):
            a.read(b.name, "src", 10, "dst", 10, -5)
        assert a.write(b.name, "src", 0, "dst", 0, 64).result(30) == 64  # (the endpoints still work)
    finally:
        a.close()
        b.close()


def test_a_one_byte_layers_zero_byte_signal_is_a_miss():
    """Mutation: `TransportLayerSource` takes a 0-byte notification as the sender's failure signal only for layers of
    more than 1 byte (`layer_nbytes > 1`). Contract (`LayerForwarder`): a 0-byte notifying write with the layer's tag
    is the sender's "could not load it" signal for any layer that has bytes: a `KVMissError` at once."""
    from transport.base import Notification
    from transport.feeder import KVMissError, TransportLayerSource

    notes = {0: Notification("de0", 0, "pe_buf", 0, 0)}
    src = TransportLayerSource(_NotifyingTransport(4, notes), "pe_buf", lambda k: k, 1, lambda k: k)
    with pytest.raises(KVMissError, match="could not load it"):
        src(0, np.zeros(1, np.uint8))


def test_a_region_the_peer_no_longer_has_is_forgotten_once_it_says_so():
    """Mutation: the reply "no such region" to a region query no longer drops the cached (id, size) (`_query`'s
    `remote_regions.pop`). Contract (`_remote_range`: a range past the cached size asks again; `base.Transport.write`:
    an unknown remote region is a `RegionError` at once where the backend knows it): once the peer said it has no
    region of that name (it deregistered it), a later write to it, even inside the old range, is a `RegionError` at the
    call, not a frame with the stale id that makes the peer close the connection set."""
    from transport.base import RegionError

    a, b = TcpTransport("m3qa"), TcpTransport("m3qb")
    try:
        a.register("src", np.zeros(256, np.uint8))
        b.register("r", np.zeros(64, np.uint8))
        a.connect("m3qb", b.address)
        assert a.write("m3qb", "src", 0, "r", 0, 64).result(30) == 64  # (id, size) of "r" cached
        b.deregister("r")
        with pytest.raises(RegionError, match="no region 'r'"):
            a.write("m3qb", "src", 0, "r", 0, 128)  # past the cached size: asked again, the peer has none
        with pytest.raises(RegionError, match="no region 'r'"):
            a.write("m3qb", "src", 0, "r", 0, 64)
        assert a.peers() == ["m3qb"] and b.peers() == ["m3qa"]
    finally:
        a.close()
        b.close()


def test_an_inproc_message_keeps_its_place_behind_a_high_class_write():
    """Mutation: inproc's `send` posts the message on the low lane instead of the high one. Contract (inproc module
    docstring, `Transport` ordering: "messages travel in the high class"): a message sent after a high-class write
    to the same peer is delivered after that write landed, never while the write is still held by its pacer."""
    from transport.inproc import InProcFabric, InProcTransport

    gate, pacing = threading.Event(), threading.Event()

    class HighHeld:
        def pace(self, nbytes: int, priority: str) -> None:
            if priority == "high":
                pacing.set()
                assert gate.wait(30)

    fabric = InProcFabric()
    a, b = InProcTransport("m3ia", fabric=fabric, pacer=HighHeld()), InProcTransport("m3ib", fabric=fabric)
    try:
        a.register("src", np.full(64, 7, np.uint8))
        b.register("dst", np.zeros(64, np.uint8))
        a.connect("m3ib")
        fut = a.write("m3ib", "src", 0, "dst", 0, 64, priority="high")
        assert pacing.wait(30)
        a.send("m3ib", b"after the write")
        with pytest.raises(TimeoutError):  # (held behind the write: nothing can arrive while it waits)
            b.recv(timeout=1.0)
        gate.set()
        assert b.recv(timeout=30) == ("m3ia", b"after the write")
        assert fut.result(30) == 64 and int(b.region("dst").obj.min()) == 7
    finally:
        gate.set()
        a.close()
        b.close()


def test_on_peer_lost_is_called_once_per_lost_set_with_its_error():
    """Mutations: `_fail_peer` no longer calls `on_peer_lost`, and its `if peer.dead is not None: return` guard
    dropped (a set failed again, by a sender thread or the watchdog racing the reader, ran the hook again and replaced
    the set's error). Contract (`TcpTransport.on_peer_lost`, used by the RDMA backend's control channel): called once
    per lost set, with the error its pending transfers failed with."""
    from transport.base import PeerLostError

    a, b = TcpTransport("m3la"), TcpTransport("m3lb")
    calls: list = []
    lost = threading.Event()

    def hook(name, err):
        calls.append((name, err))
        lost.set()

    try:
        a.on_peer_lost = hook
        a.connect("m3lb", b.address)
        p = a._live_peer("m3lb")
        b.close()  # a's readers see the peer close
        assert lost.wait(30)
        a._fail_peer(p, PeerLostError("failed again"))  # (as a sender thread failing afterwards would)
        assert len(calls) == 1 and calls[0][0] == "m3lb" and isinstance(calls[0][1], PeerLostError)
        assert p.dead is calls[0][1]
        assert "m3lb" not in a.peers()
    finally:
        a.close()
        b.close()


def test_an_inproc_endpoint_closed_with_transfers_queued_fails_them_as_closed():
    """Mutation: `_fence` fails the lane tasks of the endpoint being closed with the link's `PeerLostError` instead of
    `TransportClosedError`. Contract (`Transport.close`): transfers still pending fail with `TransportClosedError` on
    the endpoint that was closed (its peers see `PeerLostError` for theirs). The first write is held by its pacer, so
    the second waits in the lane when `close` runs."""
    from transport.base import TransportClosedError
    from transport.inproc import InProcFabric, InProcTransport

    gate, pacing = threading.Event(), threading.Event()

    class Held:
        def pace(self, nbytes: int, priority: str) -> None:
            pacing.set()
            assert gate.wait(30)

    fabric = InProcFabric()
    a, b = InProcTransport("m3ca", fabric=fabric, pacer=Held()), InProcTransport("m3cb", fabric=fabric)
    closer = threading.Thread(target=a.close)
    try:
        a.register("src", np.zeros(64, np.uint8))
        b.register("dst", np.zeros(64, np.uint8))
        a.connect("m3cb")
        first = a.write("m3cb", "src", 0, "dst", 0, 64)
        assert pacing.wait(30)
        queued = a.write("m3cb", "src", 0, "dst", 0, 64)
        closer.start()  # (waits for the held copy once it has failed the queued one)
        with pytest.raises(TransportClosedError):
            queued.result(30)
        gate.set()
        with pytest.raises(TransportClosedError):
            first.result(30)
        closer.join(30)
        assert not closer.is_alive()
    finally:
        gate.set()
        if closer.is_alive():
            closer.join(30)
        a.close()
        b.close()


@pytest.mark.parametrize("backend", ["inproc", "tcp"])
def test_a_write_batchs_notification_describes_its_last_entry(backend):
    """Mutation: inproc's `write_many` names the first entry's region in the batch's notification (`batch[0][3]`).
    Contract (`Transport.write_many`): with `notify`, the peer gets one `Notification` describing the last entry
    (its region, offset and length), after every entry landed; tcp and inproc alike."""
    from transport import make_transport
    from transport.inproc import InProcFabric

    extra = {"fabric": InProcFabric()} if backend == "inproc" else {}
    a = make_transport({"backend": backend, "name": f"m3w{backend}a", **extra})
    b = make_transport({"backend": backend, "name": f"m3w{backend}b", **extra})
    try:
        a.register("src", np.arange(64, dtype=np.uint8))
        b.register("first", np.zeros(64, np.uint8))
        b.register("last", np.zeros(64, np.uint8))
        a.connect(b.name, b.address)
        entries = [("src", 0, 8, "first", 4), ("src", 8, 16, "last", 40)]
        assert a.write_many(b.name, entries, notify=77).result(30) == 24
        n = b.wait_notification(tag=77, timeout=30)
        assert (n.peer, n.region, n.offset, n.length) == (a.name, "last", 40, 16)
        assert bytes(b.region("last").obj[40:56]) == bytes(range(8, 24))
    finally:
        a.close()
        b.close()


def test_an_inproc_connect_to_an_endpoint_of_another_name_is_refused():
    """Mutation: inproc's `connect` no longer checks that the endpoint at `address` has the name it was asked for.
    Contract (`Transport.connect`): raises `TransportError` if the peer's name differs from `peer` (transfers
    addressed to one name must not reach another endpoint)."""
    from transport.base import PeerLostError
    from transport.inproc import InProcFabric, InProcTransport

    fabric = InProcFabric()
    a, b = InProcTransport("m3na", fabric=fabric), InProcTransport("m3nb", fabric=fabric)
    try:
        with pytest.raises(PeerLostError, match="is 'm3nb', expected 'm3nx'"):
            a.connect("m3nx", "m3nb")
        assert a.peers() == [] and b.peers() == []
    finally:
        a.close()
        b.close()


def test_a_cnics_ingress_link_is_named_for_its_engine_and_direction():
    """Mutation: `TrafficManager.add_cnic_in` names the link "cnic/engine<E>in". Contract (traffic module docstring,
    the load-balance metrics): the ingress direction of engine E's CNIC records "cnic/engine<E>/in/<class>" samples,
    and is found by that name."""
    tm = TrafficManager(clock_origin=time.monotonic() - 0.05)
    link = tm.add_cnic_in(3, math.inf)
    assert tm.link("cnic/engine3/in") is link and link.weights == {"high": 99.0, "low": 1.0}
    link.record(10, "high")
    assert [s.link for s in tm.samples()] == ["cnic/engine3/in/high"]


def test_a_remote_region_name_too_long_to_ask_for_is_a_region_error_at_the_call(server):
    """Mutation: tcp's `_remote_region_of` no longer refuses a name longer than REGION_NAME_MAX before asking the
    peer. Contract (base `REGION_NAME_MAX`: "tcp peers ask for a region by name in one frame of at most this many
    bytes"): no peer can have such a region, so the write fails at once with `RegionError`; the query is never sent
    (the peer would take it for a protocol error and close the whole set)."""
    from transport.base import REGION_NAME_MAX, RegionError

    c = TcpTransport("m3long")
    try:
        c.register("src", np.zeros(64, np.uint8))
        c.connect(server.name, server.address)
        with pytest.raises(RegionError, match="longer than"):
            c.write(server.name, "src", 0, "x" * (REGION_NAME_MAX + 1), 0, 8)
        assert c.write(server.name, "src", 0, "dst", 0, 64).result(30) == 64  # the set is still up
        assert c.peers() == [server.name]
    finally:
        c.close()


def test_disconnect_drops_a_set_the_peer_has_half_opened():
    """Mutation: `TcpTransport.disconnect` leaves the peer's half-open sets (a handshake of one stream done, the other
    not yet) in place. Contract (`disconnect`): sets the peer has half opened are dropped too (their sockets closed at
    once, not at the handshake timeout); a later connect makes a fresh set."""
    ep = TcpTransport("srv3h", handshake_timeout_s=60.0)
    s = socket.create_connection(ep.address, timeout=10)
    try:
        hello = {"name": "half", "peer": ep.name, "session": "h1", "stream": "high", "nonce": os.urandom(32).hex()}
        payload = json.dumps(hello).encode()
        s.sendall(pack_header(OP_HELLO, length=len(payload)) + payload)
        (op, *_), _ = _frame(s)  # the HELLO_ACK: the stream is in the half-open set now
        assert op == OP_HELLO_ACK
        ep.disconnect("half")
        assert _closed_by_server(s, timeout=10), "the half-open set was not dropped by disconnect"
        c = TcpTransport("half")
        try:
            c.connect(ep.name, ep.address)
            assert ep.peers() == ["half"]
        finally:
            c.close()
    finally:
        s.close()
        ep.close()


def test_chunks_with_equal_start_tags_go_in_the_order_they_were_queued():
    """Mutation: the SFQ order compares start tags only (`_Ticket.__lt__` without the sequence number), so a tie
    between the classes' heads always went to the class listed first. Contract (start-time fair queuing): the chunk
    with the smallest start tag goes next; ties go in queuing order (FIFO), so neither class wins every tie."""
    link = Link("cnic/engine0", math.inf, weights={"high": 1.0, "low": 1.0})
    low, high = link.enqueue(100, "low"), link.enqueue(100, "high")  # both start at virtual time 0
    assert low.start_tag == high.start_tag == 0.0
    assert min(high, low) is low and min(low, high) is low
    later_high, later_low = link.enqueue(100, "high"), link.enqueue(100, "low")  # both at 100
    assert min(later_low, later_high) is later_high


def test_layer_tags_of_different_requests_never_collide():
    """Mutation: `layer_tag` shifts the request id by 11 bits instead of 12. Contract (`layer_tag`): the tag of
    "layer l of request r" is r << 12 | l for l in 0..4095, one tag per (request, layer): a PE waiting for layer 2048
    of request 0 must not take request 1's layer 0."""
    from transport.feeder import layer_tag

    assert layer_tag(1, 0) == 4096 and layer_tag(0, 4095) == 4095
    tags = {layer_tag(r, layer) for r in range(3) for layer in (0, 1, 2047, 2048, 4095)}
    assert len(tags) == 15


def test_writes_that_landed_are_acknowledged_before_an_on_message_hook_runs(server):
    """Mutation: the reader no longer sends its held acknowledgements before running the `on_message` hook. Contract
    (`_read_loop`: "a hook may take its time; landed writes must not wait for it"): a write that landed before a
    control message is acknowledged even while the hook handling that message is still running. The hand-driven
    peer sends the write and the message in one segment, so the receiver has not drained its socket in between."""
    release, in_hook = threading.Event(), threading.Event()

    def hook(peer, payload):
        in_hook.set()
        release.wait(30)
        return True

    server.on_message = hook
    socks = _raw_handshake(server)
    rid, s = server.region("dst").region_id, socks[0]
    try:
        s.sendall(
            pack_header(OP_WRITE, region=rid, offset=0, length=4, req=5)
            + b"data"
            + pack_header(tcpmod.OP_MSG, length=2)
            + b"hi"
        )
        assert in_hook.wait(30)
        s.settimeout(10)
        (op, *_), body = _frame(s)
        assert op == tcpmod.OP_WRITE_ACKS and list(tcpmod.ACK_ENTRY.iter_unpack(body)) == [(5, 4)]
        assert in_hook.is_set() and not release.is_set()  # acknowledged while the hook still runs
    finally:
        release.set()
        for x in socks:
            x.close()


def test_a_sequential_store_source_stops_at_the_first_miss():
    """Mutation: `StoreLayerSource` (parallel=False) goes on reading the blocks after a miss (`break` made
    `continue`). Contract (`StoreLayerSource`: "A sequential read stops at the first miss"; "a miss moves none"): the
    layer fails with `KVMissError` naming the first missing block, no later block is read, and only the blocks read
    before it are paced over the emulated SNIC."""
    import types

    from transport.feeder import KVMissError, StoreLayerSource

    class Store:
        def __init__(self) -> None:
            self.reads: list = []

        def read(self, key, out, layers):
            self.reads.append(key)
            out[...] = 1
            return key != "k1"

    pacer = _PaceOnly()
    layout = types.SimpleNamespace(block_tokens=2, bytes_per_token_per_layer=4, layer_block_nbytes=8)
    store = Store()
    src = StoreLayerSource(store, ["k0", "k1", "k2"], layout, pacer=pacer, parallel=False)
    with pytest.raises(KVMissError, match=r"block 1 \('k1'\), layer 0"):
        src(0, np.zeros(24, np.uint8))
    assert store.reads == ["k0", "k1"]
    assert pacer.calls == [(8, "low")]


def test_binding_every_interface_by_the_empty_host_needs_a_secret():
    """Mutation: `is_loopback("")` answers True. Contract (tcp module docstring, Security): binding any non-loopback
    address requires a shared secret; the empty host binds every interface (like 0.0.0.0), so it needs one too, while
    "localhost" does not."""
    assert tcpmod.is_loopback("localhost") and tcpmod.is_loopback("127.0.0.1") and tcpmod.is_loopback("::1")
    assert not tcpmod.is_loopback("") and not tcpmod.is_loopback("0.0.0.0")
    with pytest.raises(ValueError, match="requires a shared secret"):
        TcpTransport("m3any", host="")
    TcpTransport("m3local", host="localhost").close()


def test_closing_a_feeder_waits_for_the_saves_queued_before_it():
    """Mutation: `LayerFeeder.close` shuts the save worker down without waiting (`shutdown(wait=False)`). Contract
    (`close`: "Stop loading and the save worker (after queued saves)"): every save handed over before close has run
    when close returns (a DE path's last layers are written back before the request's buffers are reused). The first
    save waits up to 1 s for close to return: it must time out, as close is waiting for it."""
    from transport.feeder import LayerFeeder

    returned, saved = threading.Event(), []

    def saver(layer, host):
        if layer == 0:
            saved.append(("close had returned", returned.wait(1.0)))
        saved.append(layer)

    feed = LayerFeeder(3, lambda layer, out: out, 8, saver=saver, to_device=lambda h: np.array(h, copy=True))
    for layer in range(3):
        feed.save_layer(layer, np.full(8, layer, np.uint8))
    feed.close()
    returned.set()
    assert saved == [("close had returned", False), 0, 1, 2]


def test_a_traffic_managers_samples_come_in_time_order_across_its_links():
    """Mutation: `TrafficManager.samples` returns the links' samples link by link instead of sorted. Contract: the
    process's link samples as one time series, ordered by bin start, then link name (what `rate_of` and the
    benchmarks read)."""
    now = time.monotonic()
    tm = TrafficManager(clock_origin=now - 25.0, sample_interval=10.0)  # records now fall in bin 2
    late_first, early = tm.add_snic(0, math.inf), tm.add_snic(1, math.inf)
    late_first.record(5)
    early.clock_origin = now - 5.0  # (its records fall in bin 0)
    early.record(7)
    assert [(s.link, s.t0, s.nbytes) for s in tm.samples()] == [("snic/node1", 0.0, 7), ("snic/node0", 20.0, 5)]


def test_a_region_query_with_a_name_over_the_limit_closes_the_set(server, caplog):
    """Mutation audit of session 44 (tc08): nothing pinned the bound on a REGION_QUERY's name length; without it a
    peer past the handshake made the reader allocate `length` bytes up front (2**40: MemoryError or the OOM killer)."""
    caplog.set_level(logging.ERROR, logger="transport.tcp")
    socks = _raw_handshake(server)
    try:
        n = tcpmod.REGION_NAME_MAX + 1
        socks[0].sendall(pack_header(tcpmod.OP_REGION_QUERY, length=n, req=7) + b"d" * n)
        assert _closed_by_server(socks[0])
        assert "region name of" in caplog.text
    finally:
        for s in socks:
            s.close()
