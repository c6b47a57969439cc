"""The TCP transport's frame receiver (`tcp._BufferedReceiver` and the read loop) on hand-made streams: every write
lands, acknowledgements come in order with write_many batches acknowledged once, FLAG_MORE holds them up to
ACK_FRAMES, and other frames (a message, a region query, notifying writes) are served in between, whatever way the
stream is cut into segments."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
from test_transport_tcp import _raw_handshake

from transport import tcp as tcpmod
from transport.tcp import (
    ACK_ENTRY,
    FLAG_CHAIN,
    FLAG_MORE,
    FLAG_NOTIFY,
    HEADER,
    OP_MSG,
    OP_REGION_INFO,
    OP_REGION_QUERY,
    OP_WRITE,
    OP_WRITE_ACKS,
    TcpTransport,
    pack_header,
)

KIB = 1 << 10


def _frames(rid: int, region_bytes: int, rng) -> tuple[list[bytes], np.ndarray, list[tuple[int, int]], list[int], int]:
    """A stream of frames for region `rid`: plain writes of sizes around every boundary of the receiver (the
    48-byte header, the 64 KiB direct receive, the 256 KiB buffer), write_many batches, FLAG_MORE and notifying
    writes, with a message and a region query among them. Returns the frames, the region's expected bytes, the
    (request, length) acknowledgements expected in order, and the tags of the notifying writes."""
    expect = np.zeros(region_bytes, np.uint8)
    frames, acks, tags = [], [], []
    req = 1

    def write(size: int, flags: int = 0, tag: int = 0) -> tuple[int, int]:
        nonlocal req
        offset = int(rng.integers(0, region_bytes - size + 1))
        payload = rng.integers(0, 256, size, dtype=np.uint8)
        expect[offset : offset + size] = payload
        frames.append(pack_header(OP_WRITE, flags, rid, offset, size, tag, req) + payload.tobytes())
        return req, size

    sizes = [1, 47, 48, 49, 4 * KIB, 64 * KIB - 1, 64 * KIB, 64 * KIB + 1, 200 * KIB, 256 * KIB, 300 * KIB, 1100 * KIB]
    for size in sizes:
        acks.append(write(size))
        req += 1
    for k, size in enumerate((100, 64 * KIB, 3 * KIB)):  # FLAG_MORE: the sender announces the next frame
        acks.append(write(size, FLAG_MORE if k < 2 else 0))
        req += 1
    frames.append(pack_header(OP_MSG, length=5) + b"hello")
    for sizes in ((10, 20, 30), (64 * KIB, 1, 70 * KIB), (500 * KIB, 500 * KIB)):  # write_many batches
        for k, size in enumerate(sizes):
            write(size, FLAG_CHAIN if k < len(sizes) - 1 else 0)
        acks.append((req, sum(sizes)))
        req += 1
    frames.append(pack_header(OP_REGION_QUERY, length=3, req=req) + b"dst")
    query_req = req
    req += 1
    for tag, size in ((7, 33), (8, 80 * KIB)):  # notifying writes: the read loop's Python branch lands them
        acks.append(write(size, FLAG_NOTIFY, tag))
        tags.append(tag)
        req += 1
    for _ in range(40):  # more than ACK_FRAMES small writes back to back
        acks.append(write(int(rng.integers(1, 2 * KIB))))
        req += 1
    return frames, expect, acks, tags, query_req


def _read_replies(s: socket.socket, n_acks: int, timeout: float = 20.0) -> tuple[list[tuple[int, int]], list]:
    """Read frames from the server until `n_acks` acknowledgements came; returns them and the other frames."""
    got, others = [], []
    s.settimeout(timeout)
    while len(got) < n_acks:
        op, _, rid, offset, length, tag, req = tcpmod.unpack_header(tcpmod._recv_exact(s, HEADER.size))
        payload = tcpmod._recv_exact(s, length) if op == OP_WRITE_ACKS and length else b""
        if op == OP_WRITE_ACKS:
            got.extend(ACK_ENTRY.iter_unpack(payload))
        else:
            others.append((op, rid, offset, req))
    return got, others


@pytest.mark.parametrize("cut", ["whole", "segments"])
def test_a_mixed_stream_lands_whole(cut):
    rng = np.random.default_rng(7)
    size = 4 << 20
    server = TcpTransport("srv-rx")
    dst = np.zeros(size, np.uint8)
    server.register("dst", dst)
    try:
        socks = _raw_handshake(server)
        server.wait_for_peer("evil")
        for s in socks:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        frames, expect, acks, tags, query_req = _frames(server.region("dst").region_id, size, rng)
        stream = b"".join(frames)
        if cut == "whole":
            socks[1].sendall(stream)
        else:  # segments of random lengths, with pauses: headers and payloads arrive split anywhere
            pos = 0
            while pos < len(stream):
                n = int(rng.choice([1, 7, 30, 47, 100, 4 * KIB, 70 * KIB]))
                socks[1].sendall(stream[pos : pos + n])
                pos += n
                if rng.random() < 0.05:
                    time.sleep(0.002)
        got, others = _read_replies(socks[1], len(acks))
        assert got == acks
        assert others == [(OP_REGION_INFO, server.region("dst").region_id, size, query_req)]
        np.testing.assert_array_equal(dst, expect)
        assert server.recv("evil", timeout=5) == ("evil", b"hello")
        assert [server.wait_notification(peer="evil", timeout=5).tag for _ in tags] == tags
        assert "evil" in server.peers()
    finally:
        for s in socks:
            s.close()
        server.close()


def test_a_frame_cut_off_mid_payload_fails_the_set_and_lands_nothing_after():
    server = TcpTransport("srv-rx2")
    dst = np.zeros(1 << 20, np.uint8)
    server.register("dst", dst)
    try:
        socks = _raw_handshake(server)
        server.wait_for_peer("evil")
        rid = server.region("dst").region_id
        whole = pack_header(OP_WRITE, 0, rid, 0, 100, 0, 1) + b"a" * 100
        cut = pack_header(OP_WRITE, 0, rid, 1000, 200 * KIB, 0, 2) + b"b" * (100 * KIB)
        socks[1].sendall(whole + cut)
        socks[1].shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 10
        while "evil" in server.peers() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "evil" not in server.peers()
        assert bytes(dst[:100]) == b"a" * 100
        assert not dst[1000 + 100 * KIB :].any()
    finally:
        for s in socks:
            s.close()
        server.close()


def test_acknowledgements_held_behind_flag_more_go_out_at_ack_frames():
    """Write frames flagged FLAG_MORE (the sender announced the next) hold their acknowledgements even when the socket
    drains, until ACK_FRAMES frames landed; the rest go out once a frame without the flag lands."""
    server = TcpTransport("srv-rx3")
    server.register("dst", np.zeros(1 << 16, np.uint8))
    n = tcpmod.ACK_FRAMES + 8
    try:
        socks = _raw_handshake(server)
        server.wait_for_peer("evil")
        rid = server.region("dst").region_id
        socks[1].sendall(
            b"".join(pack_header(OP_WRITE, FLAG_MORE, rid, 0, 8, 0, r) + b"m" * 8 for r in range(1, n + 1))
        )
        got, _ = _read_replies(socks[1], tcpmod.ACK_FRAMES)
        assert got == [(r, 8) for r in range(1, tcpmod.ACK_FRAMES + 1)]
        socks[1].settimeout(0.3)
        with pytest.raises(TimeoutError):  # the other 8 stay held: the next frame was announced
            socks[1].recv(1)
        socks[1].sendall(pack_header(OP_WRITE, 0, rid, 0, 8, 0, n + 1) + b"z" * 8)
        got, _ = _read_replies(socks[1], 9)
        assert got == [(r, 8) for r in range(tcpmod.ACK_FRAMES + 1, n + 2)]
    finally:
        for s in socks:
            s.close()
        server.close()
