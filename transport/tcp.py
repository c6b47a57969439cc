"""TCP transport: engines in separate processes or hosts.

One *connection set* per peer pair: one TCP connection per priority class ("high" for model traffic, "low"
for KV), so a 64 MB KV write never sits in front of a small high-priority message. Each connection has a
reader thread (receives frames; large payloads go with `recvmsg_into` straight into the registered region at
the frame's offset, the next frame's header in the same call when it is already there) and a sender thread
(sends queued frames; payloads with `sendmsg` on memoryviews of the region, the header with the first chunk, no
copies), so any number of transfers can be in flight and a reader never blocks on a send. (A read's reply is the
exception: what of it does not go out at once is copied when the read is served, so that a write posted after the
read, landing meanwhile, does not change the bytes it returns: the posting order. Memory: the replies queued, at most
REPLY_COPY_MAX per connection (past it the reader stops reading that peer's requests until the sender caught up);
a message's buffer grows as its bytes arrive; at most MAX_SETS connection sets, MAX_SETS_PER_PEER of one peer.)

Small transfers are kept cheap: a small frame is sent by the thread that queues it when the connection is
idle (non-blocking; the sender thread takes over what the socket does not accept at once, keeping frame
order), queued small frames are coalesced into one `sendmsg` (a write posted while more than
QUEUE_AFTER_PENDING requests to its peer are pending is always queued, so a deep pipeline of small writes
goes out in such bursts: fewer syscalls, TCP segments and acknowledgements than one send per write), small
frames are received through a buffer (one `recv` for several), and the receiver acknowledges writes in
batches: one OP_WRITE_ACKS frame lists the (request id, length) of every write that landed since the last one
and goes out when its socket has no more data to read (or 128 writes or 32 write frames landed), so a write
still completes only after its bytes are in the region.

`write_many` (a chain of work requests with one signaled completion) is one request: its frames go back to back
on the class's connection (one vectored send when the batch is small and the connection idle), every frame but
the last flagged FLAG_CHAIN; the receiver acknowledges the batch once, with its total length, after the last
frame landed (frames of a connection land in order). Transfers complete `TransferFuture`s (no Condition unless a
callback or `concurrent.futures.wait` needs one; a blocking `result` waits on a plain lock), and a write is
checked, recorded and framed with little Python (its pending record is its future).

Frame = fixed 48-byte header + payload:

    magic "DPKV" | version u8 | op u8 | flags u8 | pad | region id u32 | offset u64 | length u64
    | tag i64 | request id u64 | crc32 of the preceding 44 header bytes u32

Acknowledgements of a pipelined stream are coalesced further by the sender: a write frame that the sender thread
sends while more frames are queued behind it on the connection carries FLAG_MORE (at most half of the peer's
pending requests in a row, and never on a paced endpoint), and the receiver then holds the acknowledgements back
through that frame and until the next one lands instead of sending them when its socket drains (the next frame is
already on its way). A lone write, or the last of a burst, is acknowledged as soon as the socket drains.

Protocol version 5 (2 added batched acknowledgements, 3 write batches, 4 FLAG_MORE, 5 the instance id after the
proof, max_read_bytes); a peer of another version is refused at connect, naming both versions (a server answers its
HELLO with an error HELLO_ACK in its own version; a version-4 server closes without a word, which the client's
error names as a possible cause after SILENT_DROP_TRIES quick tries). The handshake (HELLO / HELLO_ACK, JSON) also
tells each side the other's `max_message_bytes`: a `send` larger than the peer's raises `TransportError` at once
instead of making the peer close the set; and its `max_read_bytes` (its `reply_copy_max_bytes`): a `read` larger
than that goes as several READs of at most that many bytes, back to back (a READ frame above it closes the set,
naming the sizes).

Everything a peer sends is validated (magic, version, header checksum, op, region id, bounds against the
registered region's size, message size limits); a bad frame closes *that* connection set with a logged
error and fails its pending transfers, while the endpoint keeps serving its other peers.

A peer's regions are addressed by name: their (id, size) is asked once (OP_REGION_QUERY) and cached. A thread
posting to a region not known yet waits for the reply, except a reader thread (a transfer's done callback, an
`on_message` hook), which never waits for one (it could wait for a reply only it can read, or for another reader
thread waiting in turn for it): its `write`, `read` or `write_many` returns the future at once, and the transfer is
posted when the reply comes; what it raises then (a region the peer lacks, a range outside it, a lost peer) fails
that future. Until it is posted, later posts to that peer and class, from any thread, wait behind it (so the
posting order holds); messages and the other class do not. A sender thread (a `send` future's done callback) is
treated as a reader thread: its query could sit in the queue only it sends, behind the frames queued before it; so
is the watchdog (the callbacks of the transfers it fails): only it would drop a peer that never answers.

Security: the endpoint binds 127.0.0.1 unless told otherwise; binding any non-loopback address requires a
shared `secret`, and every connection then runs a mutual HMAC-SHA256 challenge-response (each side proves it
knows the secret for a fresh nonce of the other side; `hmac.compare_digest`). Only authenticated
connections reach the data path, and with a secret nothing about the endpoint (its instance id, whether it holds a
set) is told before the client's proof; a HELLO for another endpoint name is refused without this one's. At most
MAX_PENDING_HANDSHAKES handshakes run at once (MAX_PENDING_PER_ADDRESS from one other host), each step (HELLO, AUTH)
within HANDSHAKE_STEP_S; with all taken, a new connection waits for one in arrival order, so a flood of idle or
trickling connections delays a peer by about a step instead of locking it out, and a client whose connection is
dropped for want of a slot is told so ("busy") and tries again within its connect timeout (one dropped without a word
is given up after a few quick tries: no tcp transport of this version there).

Liveness: a peer that dies (its sockets reset or close) fails the pending transfers at once with
`PeerLostError`, a read whose reply it cut off mid-payload included; a peer that stops answering without closing
(host down, process stopped) fails them after `timeout_s` without progress (a watchdog thread, plus TCP keepalive).
Progress is a byte received from the peer, or a chunk of a large frame sent (its socket drains only while the peer's
host takes data); posting more requests is not, so an application posting steadily to a silent peer sees its
transfers fail too. It is also counted per connection (a reply comes back on its request's): requests pending on a
connection that brings nothing for `timeout_s` fail the set even while the peer talks on the other one (its clock
starts when the watchdog first sees them, so up to one period later). A paced frame (chunks our pacer may space
further apart than timeout_s) progresses while the peer's host takes what was sent (Linux: the socket's
unacknowledged bytes fall, or none are left), while a chunk waits for our pacer too; a chunk put in our send buffer
alone is not progress there (the buffer, megabytes, takes chunk after chunk at a slow pace). A read is
watched until its reply's payload is in: a reply that stops mid-payload fails after `timeout_s` (so the reader's
`timeout_s` must exceed the time the peer's pacer holds one reply chunk). (Not TCP_USER_TIMEOUT: it also cuts a connection whose peer reads slowly with nothing pending.) A handshake must finish within `handshake_timeout_s` in all (not per recv), and a failed
`accept` (out of descriptors, say: the line names RLIMIT_NOFILE) is logged once per spell and accepting goes on with
backoff (at most ACCEPT_BACKOFF_MAX_S), the connected peers served meanwhile. The handshake tells each side the other
endpoint's instance id (new per endpoint object): a set from a new instance of a peer (started again under its name
after a crash that left its old connections silently open) drops that name's sets of other instances at once, their
pending transfers failed with `PeerLostError` (they went to the dead process until the watchdog noticed).
`disconnect(peer)` drops the peer's sets at once: sockets closed, readers joined, and fenced (a reader busy in a hook
lands no further frame, not even one already in its receive buffer).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import hmac
import ipaddress
import itertools
import json
import logging
import operator
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from typing import Any

from dualpath_jax.checks import FailureSpell, fd_shortage_text, is_int, is_real
from transport.base import (
    REGION_NAME_MAX,
    TRANSPORTS,
    MemoryRegion,
    Notification,
    Pacer,
    PeerLostError,
    PostedFuture,
    RegionError,
    TransferFuture,
    Transport,
    TransportClosedError,
    TransportError,
    WriteEntry,
    check_message,
    check_notify,
    check_priority,
    check_wait_for_listener,
    check_write_entries,
    complete_quietly,
    deadline,
)

log = logging.getLogger(__name__)

MAGIC = b"DPKV"
# 2: batched write acknowledgements (OP_WRITE_ACKS); 3: write batches (FLAG_CHAIN); 4: FLAG_MORE; 5: with a secret the
# instance id comes in AUTH_OK's payload (after the client's proof), the handshake tells max_read_bytes (a READ above
# it is refused; `read` splits a larger one) and a HELLO of another version gets an error HELLO_ACK naming both
VERSION = 5
HEADER = struct.Struct("!4sBBBxIQQqQI")  # see the module docstring; 48 bytes
assert HEADER.size == 48

# ops
OP_HELLO, OP_HELLO_ACK, OP_AUTH, OP_AUTH_OK = 1, 2, 3, 4
OP_WRITE, OP_WRITE_ACK, OP_READ, OP_READ_RESP = 10, 11, 12, 13
OP_MSG, OP_REGION_QUERY, OP_REGION_INFO = 14, 15, 16
OP_WRITE_ACKS = 17  # payload: count x (request id u64, length u64) of writes that landed, in arrival order
OPS = {
    OP_HELLO,
    OP_HELLO_ACK,
    OP_AUTH,
    OP_AUTH_OK,
    OP_WRITE,
    OP_WRITE_ACK,
    OP_READ,
    OP_READ_RESP,
    OP_MSG,
    OP_REGION_QUERY,
    OP_REGION_INFO,
    OP_WRITE_ACKS,
}
FLAG_NOTIFY = 1
FLAG_CHAIN = 2  # OP_WRITE of a write_many batch, not its last frame: acknowledged with the batch's last frame
FLAG_MORE = 4  # OP_WRITE sent with more frames queued behind it: the receiver may hold acks until the next lands

STREAMS = ("high", "low")  # connection index per priority class
PROBE = "probe"  # HELLO stream of a `connect` to a live peer asking its instance id (answered, then closed)
HANDSHAKE_MAX = 64 << 10  # bytes of a handshake payload (a HELLO holds two names of ENDPOINT_NAME_MAX, JSON-escaped)
# The longest endpoint name (UTF-8 bytes; every name that fitted the old 4 KiB HELLO): JSON escapes up to 6 bytes per
# byte, so two fit in a HELLO. (With 4 KiB and no limit, a pair of 350-character CJK names made every connect fail
# with "Connection reset by peer".)
ENDPOINT_NAME_MAX = 4096
SEND_CHUNK = 4 << 20  # unpaced sends go out in chunks this big (progress bookkeeping for the watchdog)
PACE_CHUNK = 1 << 20  # paced sends ask the pacer for this many bytes at a time
SMALL = 64 << 10  # header + payload up to this size go out in one sendmsg
INLINE_MAX = 1 << 20  # unpaced frames up to this size may be sent by the queuing thread (never blocking)
BATCH_INLINE_MAX = 8 << 20  # the same for the frames of one write_many together
# A write posted while more requests than this are pending to its peer is queued for the sender thread even when
# the connection is idle: behind a deep pipeline it goes out with the others queued meanwhile in one sendmsg.
# (Measured on loopback, 2 vCPUs: 64 in flight, 64 KiB writes +35%, 41 KiB +20-30%; 16 in flight unchanged,
# while queueing from 8 pending made 16 in flight 20% slower: the bursts then starve the pipeline.)
QUEUE_AFTER_PENDING = 16
ACK_ENTRY = struct.Struct("!QQ")  # (request id, length) of one landed write in an OP_WRITE_ACKS payload
ACK_BATCH = 128  # acknowledgements held back at most (they go out when the socket drains, or at this count)
ACK_FRAMES = 32  # ... or once this many write frames landed (write_many frames count one each)
# Each held acknowledgement is at least one landed frame, so the frame count sends them before ACK_BATCH are held: the
# read loop checks ACK_FRAMES only (its ACK_BATCH check was dead). ACK_BATCH bounds the OP_WRITE_ACKS payload a
# receiver accepts, so a sender's batch must stay within it.
assert ACK_FRAMES <= ACK_BATCH
MAX_PENDING_HANDSHAKES = 64  # concurrent unauthenticated connections per endpoint
# A connection from another address may hold at most this many of them, so one host's flood leaves the rest to the
# others. Not one from this host (its source address is the address it connected to, loopback or not): this host's
# engines share that address with anything else running here, so a cap would shut them out with a local flood; they
# wait their turn with it instead (see `_accept_loop`).
MAX_PENDING_PER_ADDRESS = MAX_PENDING_HANDSHAKES // 2
# Each step of a handshake (the client's HELLO, then its AUTH) must arrive within this long (at most
# handshake_timeout_s in all): a legitimate client sends it at once, so a flood of idle or trickling connections
# turns the slots over quickly.
HANDSHAKE_STEP_S = 1.0
MAX_SETS = 256  # live connection sets per endpoint (4 threads each); more are refused at the handshake
MAX_SETS_PER_PEER = 8  # ... of one peer instance (two connecting at once make 2)
# Read replies copied for a connection and not sent yet: past this, its reader stops reading from the peer until its
# sender caught up (the peer's requests then wait in its socket). A READ frame larger than this is refused (the set
# closed); `read` splits a larger read into READs of at most the peer's (told in the handshake as max_read_bytes).
REPLY_COPY_MAX = 64 << 20
REPLY_COPY_MIN = 64 << 10  # the smallest reply_copy_max_bytes (less would split reads into tiny frames)
# (These caps are the defaults of the TcpTransport arguments reply_copy_max_bytes, max_sets, max_sets_per_peer,
# max_pending_handshakes and handshake_step_s; `config.transport_options` sets those for a run.)
MSG_STEP = 1 << 20  # a message buffer grows by at least this much as its bytes arrive (not allocated up front)
# Tries of a `connect` whose server closes the connection without answering its HELLO (no tcp transport of this
# version: it is up, so waiting does not help); a server short of handshake slots answers "busy" (`_drop_busy`) and
# is tried until the connect timeout
SILENT_DROP_TRIES = 3
# A failed `accept` (out of file descriptors, say) is tried again after a backoff doubling from 10 ms to this.
ACCEPT_BACKOFF_MAX_S = 1.0
CLOSE_GRACE_S = 1.0  # `close` waits this long for peers to close their ends before it cuts the connections


class ProtocolError(TransportError):
    """The peer sent a frame that violates the protocol (the connection set is closed)."""


class _CleanEOF(PeerLostError):
    """The peer closed the connection at a frame boundary."""


class _Busy(TransportError):
    """The server had no handshake slot for this connection and said so (`_drop_busy`): `connect` tries again."""


_HEADER_BODY = struct.Struct(HEADER.format[:-1])  # the 44 bytes the checksum covers
_BODY = _HEADER_BODY.size
_CRC = struct.Struct("!I")
_INT = struct.Struct("i")  # (an ioctl's int argument, native order)
try:  # Linux: the socket's unacknowledged bytes (SIOCOUTQ, which is TIOCOUTQ); elsewhere a pacer wait is progress
    import fcntl
    import termios

    _SIOCOUTQ: int | None = termios.TIOCOUTQ if os.uname().sysname == "Linux" else None
except (ImportError, AttributeError):
    _SIOCOUTQ = None
_crc32 = zlib.crc32
_unpack_from = HEADER.unpack_from
_DONTWAIT = socket.MSG_DONTWAIT
_DIRECT_CHUNK = 16 << 20  # a receive straight into a region asks for at most this much at once


def pack_header(
    op: int, flags: int = 0, region: int = 0, offset: int = 0, length: int = 0, tag: int = 0, req: int = 0
) -> bytes:
    body = _HEADER_BODY.pack(MAGIC, VERSION, op, flags, region, offset, length, tag, req)
    return body + _CRC.pack(_crc32(body))


def _check_header(fields: tuple, body: Any) -> None:
    """Raise ProtocolError unless the unpacked header `fields` (with `body`, its first 44 bytes) is well formed."""
    magic, version, op = fields[:3]
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version} (speak {VERSION})")
    if _crc32(body) != fields[9]:
        raise ProtocolError("header checksum mismatch")
    if op not in OPS:
        raise ProtocolError(f"unknown op {op}")


def unpack_header(data: bytes) -> tuple[int, int, int, int, int, int, int]:
    """(op, flags, region, offset, length, tag, req); raises ProtocolError for a malformed header."""
    fields = HEADER.unpack(data)
    _check_header(fields, memoryview(data)[:_BODY])
    return fields[2:9]


def _ip_version(host: str) -> int | None:
    """4 or 6 for an IP address literal, None for a host name."""
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    """The host binds every interface ("", 0.0.0.0, ::): no address a peer on another host can connect to."""
    if host == "":
        return True
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _unacked(sock: socket.socket) -> int | None:
    """Bytes sent on `sock` that the peer's host has not acknowledged yet (SIOCOUTQ), or None where not known."""
    if _SIOCOUTQ is None:
        return None
    try:
        return _INT.unpack(fcntl.ioctl(sock.fileno(), _SIOCOUTQ, bytes(_INT.size)))[0]
    except (OSError, ValueError):  # (not supported here, or the socket closed meanwhile)
        return None


def _recv_exact_into(sock: socket.socket, view: memoryview, on_progress=None, deadline: float | None = None) -> None:
    """Fill `view` from `sock`. `deadline` (time.monotonic) bounds the whole receive, not each recv: a handshake
    trickled a byte at a time must not hold its slot for longer than its timeout."""
    pos, n = 0, view.nbytes
    while pos < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out after {pos} of {n} bytes")
            sock.settimeout(left)
        got = sock.recv_into(view[pos:], min(n - pos, 16 << 20))
        if got == 0:
            if pos == 0 and on_progress is None:
                raise _CleanEOF("connection closed by peer")
            raise PeerLostError(f"connection closed by peer after {pos} of {n} bytes of a frame")
        pos += got
        if on_progress is not None:
            on_progress()


class _BufferedReceiver:
    """Receives frames through a 256 KiB buffer, so a small frame (header + payload) costs one recv; large
    payloads (>= 64 KiB still missing) go with recv_into straight to their destination. A header already in
    the buffer is unpacked and checked in place (`header`).

    While `held` (a bytearray of held-back acknowledgements) is not empty, every recv first tries not to block:
    only when the socket is drained is `idle()` run (it sends the acknowledgements) before the blocking recv.
    So one ack frame covers everything that arrived back to back, and none waits while this side sits idle
    (except while `more` is set: the sender announced the next frame, so the recv just waits for it).
    """

    SIZE = 256 << 10
    DIRECT = 64 << 10

    def __init__(self, sock: socket.socket, on_progress, idle=None, held: bytearray | None = None) -> None:
        self.sock, self.on_progress = sock, on_progress
        self.idle, self.held = idle, held if held is not None else bytearray()
        self.more = 0  # the frame being received (or the last one) carried FLAG_MORE: its successor is coming
        self.buf = bytearray(self.SIZE)
        self.view = memoryview(self.buf)
        self.next_header = self.view[: HEADER.size]  # where `_recv_with_header` puts the next frame's header
        self.hdr = bytearray(HEADER.size)
        self.hv = memoryview(self.hdr)
        self.start = self.end = 0
        # Set after a large payload: the next frame is likely large too, so refill the buffer only up to the
        # bytes asked for (its header) instead of pulling the next payload through the buffer (a second copy).
        self.exact = False

    def _recv(self, dst: memoryview, n: int) -> int:
        if self.held and not self.more:
            try:
                return self.sock.recv_into(dst, n, _DONTWAIT)
            except (BlockingIOError, InterruptedError):
                self.idle()
        return self.sock.recv_into(dst, n)

    def _recv_with_header(self, dst: memoryview) -> int:
        """recv into `dst` and, in the same call, the next frame's header into the (empty) buffer if it is
        already there: a frame received straight into its region then costs one recvmsg, not two recvs. Returns
        the bytes that went to `dst`."""
        bufs = [dst, self.next_header]
        if self.held and not self.more:
            try:
                got = self.sock.recvmsg_into(bufs, 0, _DONTWAIT)[0]
            except (BlockingIOError, InterruptedError):
                self.idle()
                got = self.sock.recvmsg_into(bufs)[0]
        else:
            got = self.sock.recvmsg_into(bufs)[0]
        n = dst.nbytes
        if got > n:
            self.start, self.end = 0, got - n
            return n
        return got

    def header(self) -> tuple:
        """The next frame's header fields (magic, version, op, flags, region, offset, length, tag, req, crc),
        checked (ProtocolError); `_CleanEOF` if the peer closed at a frame boundary."""
        s = self.start
        if self.end - s >= HEADER.size:
            self.start = s + HEADER.size
            fields = _unpack_from(self.buf, s)
            body = self.view[s : s + _BODY]
        else:
            self.read_into(self.hv, frame_start=True)
            fields = _unpack_from(self.hdr)
            body = self.hv[:_BODY]
        if fields[0] != MAGIC or fields[1] != VERSION or _crc32(body) != fields[9] or fields[2] not in OPS:
            _check_header(fields, body)
        return fields

    def read_into(self, dst: memoryview, frame_start: bool = False) -> None:
        n = dst.nbytes
        take = min(n, self.end - self.start)
        if take:
            dst[:take] = self.view[self.start : self.start + take]
            self.start += take
        pos = take
        while pos < n:
            if n - pos >= self.DIRECT:
                if n - pos <= _DIRECT_CHUNK:  # the rest of the payload, and the next header if it is there
                    got = self._recv_with_header(dst[pos:])
                else:
                    got = self._recv(dst[pos:], _DIRECT_CHUNK)
                if got == 0:
                    raise PeerLostError(f"connection closed by peer after {pos} of {n} bytes of a frame")
                pos += got
            else:
                self.start = self.end = 0
                got = self._recv(self.view, n - pos if self.exact else self.SIZE)
                if got == 0:
                    if pos == 0 and frame_start:
                        raise _CleanEOF("connection closed by peer")
                    raise PeerLostError(f"connection closed by peer after {pos} of {n} bytes of a frame")
                self.end = got
                take = min(n - pos, got)
                dst[pos : pos + take] = self.view[:take]
                self.start = take
                pos += take
            self.on_progress()

    def read(self, n: int) -> bytes:
        s = self.start
        if self.end - s >= n:  # all in the buffer already
            self.start = s + n
            return bytes(self.view[s : s + n])
        out = bytearray(n)
        self.read_into(memoryview(out))
        return bytes(out)

    def read_growing(self, n: int) -> bytes:
        """`read(n)` for a length the peer told (a message): the buffer grows as the bytes arrive (at most doubling)
        instead of `n` bytes allocated up front, so a header alone cannot make this endpoint allocate its limit."""
        if n <= MSG_STEP:
            return self.read(n)
        out = bytearray()
        while len(out) < n:
            k = min(n - len(out), max(MSG_STEP, len(out)))
            start = len(out)
            out.extend(bytes(k))  # (zeros, filled in place below)
            self.read_into(memoryview(out)[start:])
        return bytes(out)


def _recv_exact(sock: socket.socket, n: int, on_progress=None, deadline: float | None = None) -> bytes:
    buf = bytearray(n)
    _recv_exact_into(sock, memoryview(buf), on_progress, deadline)
    return bytes(buf)


def _told_limit(hello: dict, peer: str, field: str, least: int) -> int | None:
    """A limit the peer told in its HELLO / HELLO_ACK (`_limits_told`), an int >= `least` (None if it did not say:
    hand-driven test peers)."""
    limit = hello.get(field)
    if limit is not None and (type(limit) is not int or limit < least):
        raise ProtocolError(f"{peer!r} sent {field}={limit!r} in its handshake (an int >= {least} expected)")
    return limit


def _peer_limit(hello: dict, peer: str) -> int | None:
    """The peer's max_message_bytes (its largest message)."""
    return _told_limit(hello, peer, "max_message_bytes", 1)


def _peer_read_max(hello: dict, peer: str) -> int | None:
    """The peer's max_read_bytes (its largest READ): at least REPLY_COPY_MIN, as no endpoint of this version tells
    less (a peer telling 1 made `read` of 256 KiB 262,144 READs, 7.8 s and +566 MB)."""
    return _told_limit(hello, peer, "max_read_bytes", REPLY_COPY_MIN)


def _version_refusal(data: bytes) -> int | None:
    """The protocol version of a handshake header `data` of ours (magic "DPKV") but of another version, else None:
    checked before `unpack_header` (another version may lay the rest out otherwise), so both ends can name both."""
    if len(data) > 4 and data[:4] == MAGIC and data[4] != VERSION:
        return data[4]
    return None


def _peer_instance(hello: dict) -> str | None:
    """The peer endpoint's instance id from its HELLO / HELLO_ACK (new per endpoint object: a process started again
    under a name has a new one; None if it did not say)."""
    instance = hello.get("instance")
    return None if instance is None else str(instance)


def _check_caps(name: str, reply_copy: Any, sets: Any, per_peer: Any, pending: Any, step: Any) -> tuple:
    """The caps of a `TcpTransport` (None: the module's default), checked: a ValueError names the argument."""
    out = []
    for arg, value, default, low in (
        ("reply_copy_max_bytes", reply_copy, REPLY_COPY_MAX, REPLY_COPY_MIN),
        ("max_sets", sets, MAX_SETS, 1),
        ("max_sets_per_peer", per_peer, MAX_SETS_PER_PEER, 1),
        ("max_pending_handshakes", pending, MAX_PENDING_HANDSHAKES, 1),
    ):
        if value is None:
            value = default
        elif not is_int(value) or value < low:  # (bools too)
            raise ValueError(f"tcp transport {name!r}: {arg} must be an int >= {low} (None: {default}), got {value!r}")
        out.append(int(value))
    if step is None:
        step = HANDSHAKE_STEP_S
    elif not is_real(step) or not 0 < step < float("inf"):  # (NaN too)
        raise ValueError(
            f"tcp transport {name!r}: handshake_step_s must be a number of seconds > 0 and finite (None: "
            f"{HANDSHAKE_STEP_S}), got {step!r}"
        )
    return (*out, float(step))


class _RateLimitedLog:
    """Logs at most `burst` lines of one kind (`what`) per second; the others are counted, and the count is logged in
    one line with the next that passes, or by `flush` (the watchdog calls it): a flood of connections cannot flood
    the log."""

    def __init__(self, level: int, burst: int, what: str) -> None:
        self.level, self.burst, self.what = level, burst, what
        self.lock = threading.Lock()
        self.start, self.logged, self.skipped = 0.0, 0, 0

    def _roll(self) -> int:
        """Start a new second if the last one is over; returns the lines it did not log (lock held)."""
        now = time.monotonic()
        if now - self.start < 1.0:
            return 0
        skipped, self.skipped, self.logged, self.start = self.skipped, 0, 0, now
        return skipped

    def __call__(self, msg: str, *args: Any) -> None:
        with self.lock:
            skipped = self._roll()
            ok = self.logged < self.burst
            self.logged += ok
            self.skipped += not ok
        self._summary(skipped)
        if ok:
            log.log(self.level, msg, *args)

    def flush(self) -> None:
        with self.lock:
            skipped = self._roll()
        self._summary(skipped)

    def _summary(self, skipped: int) -> None:
        if skipped:
            log.log(self.level, "%s: %d more in the last second (not logged one by one)", self.what, skipped)


def _field(hello: Any, key: str, who: str) -> Any:
    """`hello[key]` of a HELLO / HELLO_ACK: ProtocolError naming the field if it is missing or `hello` is no JSON object
    (a bare KeyError "'nonce'" or AttributeError "'list' object has no attribute 'get'" was logged or raised)."""
    if not isinstance(hello, dict):
        raise ProtocolError(f"{who} is not a JSON object: {type(hello).__name__}")
    if key not in hello:
        raise ProtocolError(f"{who} lacks the field {key!r}")
    return hello[key]


def _hex_nonce(hello: dict, who: str) -> bytes:
    nonce = _field(hello, "nonce", who)
    try:
        return bytes.fromhex(nonce)
    except (TypeError, ValueError):
        raise ProtocolError(f"{who} has a nonce that is not hex: {str(nonce)[:80]!r}") from None


def _proof(secret: bytes, role: bytes, nonce_a: bytes, nonce_b: bytes, name_a: str, name_b: str) -> str:
    msg = b"|".join([b"dualpath-tcp-v1", role, nonce_a, nonce_b, name_a.encode(), name_b.encode()])
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


# IP TOS (DSCP) per stream, so kernel shaping (tc, experiments/netns_cluster.sh) can tell model traffic from KV.
STREAM_TOS = {"high": 0xB8, "low": 0x20}  # DSCP EF, DSCP CS1


def _set_sockopts(sock: socket.socket, stream: str) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        if sock.family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, STREAM_TOS[stream])
        elif sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, STREAM_TOS[stream])
    except OSError:
        pass
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, val in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), val)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        except OSError:
            pass


def _advance(views: list[memoryview], k: int) -> list[memoryview]:
    """What is left of `views` after the first `k` bytes were sent."""
    i = 0
    while i < len(views) and k >= views[i].nbytes:
        k -= views[i].nbytes
        i += 1
    rest = views[i:]
    if k and rest:
        rest[0] = rest[0][k:]
    return rest


def _as_int(value: Any, what: str, error: type[Exception] = RegionError) -> int:
    """`value` as an int (anything with __index__, e.g. numpy integers); `error` naming `what` otherwise."""
    try:
        return operator.index(value)
    except TypeError:
        raise error(f"{what} must be an int, got {value!r}") from None


def _as_offset(value: Any) -> int:
    """A remote offset as an int: RegionError for a bool (True was taken as offset 1), as for the local one."""
    if type(value) is bool:
        raise RegionError(f"remote offset must be an int, got {value!r}")
    return _as_int(value, "remote offset")


class _Request(PostedFuture):
    """A pending request: the future its caller holds, with what the reply must match (kind, length) and, for a
    read, where the reply's bytes go. Defaults are class attributes, so a write sets only its length. (Running: it
    cannot be cancelled, see `PostedFuture`.)"""

    kind = "write"  # "write", "read" or "query"
    length = 0
    view: memoryview | None = None
    stream: str | None = None  # the class whose connection brings the reply (the watchdog's progress per connection)


def _request(kind: str, length: int, view: memoryview | None = None, stream: str | None = None) -> _Request:
    r = _Request()
    r.kind, r.length, r.view, r.stream = kind, length, view, stream
    return r


class _Copied:
    """Stands for the future of a queued read reply that was copied (see `_Conn.enqueue`): the sender thread asks every
    job's future `done()` once it sent the job or dropped it, which gives the copy's bytes back to the connection's
    budget (`_Conn.copied`). No cost for other frames."""

    __slots__ = ("conn", "n")

    def __init__(self, conn: _Conn, n: int) -> None:
        self.conn, self.n = conn, n

    def done(self) -> bool:
        n, self.n = self.n, 0
        if n:
            self.conn._release(n)
        return True


def _drop_busy(sock: socket.socket, why: str) -> None:
    """Close a connection this endpoint has no handshake slot for, telling the client so first: an error HELLO_ACK
    with "busy" (sent without waiting: it fits the empty socket buffer), which the client's `connect` tries again
    within its timeout. (A connection closed without a word is what an endpoint of another protocol version, or no
    dualpath endpoint, does: the client gives that up at once.) What of the HELLO arrived is read first: the close then
    sends no reset (Linux keeps the answer readable after one, other systems may drop it)."""
    data = json.dumps({"error": f"busy: {why}", "busy": True}).encode()
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # (nothing there yet: BlockingIOError)
            sock.recv(HEADER.size + HANDSHAKE_MAX)
        sock.send(pack_header(OP_HELLO_ACK, length=len(data)) + data)
    sock.close()


def _cut(sock: socket.socket) -> None:
    """Shut a socket down both ways: a thread blocked in its recv or send returns (closing it alone does not)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# `conn`: the connection whose reader or sender thread this is, or the endpoint on its watchdog thread (unset on other
# threads): a thread that never waits for a region reply; `fresh`: while a deferred transfer is posted, the answers to
# its region queries, by name (see `_Deferral`)
_reader = threading.local()


class _Defer(Exception):  # noqa: N818 - control flow, never seen by a caller
    """Raised by `_remote_region_of` on a thread that must not wait for a region reply (a reader thread): the
    transfer is posted when `query` (the reply for region `name`) completes instead."""

    def __init__(self, name: str, query: _Request):
        super().__init__(name)
        self.name, self.query = name, query


class _Deferral:
    """Stands in for a connection in `peer.post[class]` while a transfer posted from a reader thread waits for a
    region reply (a reader thread never waits for one: two could wait for each other, or one for a reply only it
    can read). It keeps the class's posting order: everything posted to this peer and class after the deferred
    transfer, from any thread (frames of transfers to known regions, other deferred transfers), is held here
    behind it and goes to the connection in posting order once the replies it waits for arrived; then the
    connection takes posts directly again. Messages (`send`) and the other class are not held.

    Items: `(method, args, kwargs)` of a held frame (its request is pending already, so a lost peer fails it), or
    `[_Defer, call, outer, answers]` of a deferred transfer: `call` posts it again (from the thread that completes
    the reply, its regions then known), and its future is chained into `outer`, the one the caller got."""

    def __init__(self, peer: _Peer, stream: str):
        self.peer, self.stream, self.conn = peer, stream, peer.conns[stream]
        self.items: collections.deque = collections.deque()
        self.drainer: threading.Thread | None = None  # the thread forwarding the items (its posts go straight on)
        self.retired = False  # drained and replaced by the connection in `peer.post`

    def enqueue(self, *args: Any, **kwargs: Any) -> None:
        self._hold(self.conn.enqueue, args, kwargs)

    def enqueue_batch(self, *args: Any) -> None:
        self._hold(self.conn.enqueue_batch, args, {})

    def _hold(self, method: Callable, args: tuple, kwargs: dict) -> None:
        with self.peer.defer_lock:
            if not self.retired and self.drainer is not threading.current_thread():
                self.items.append((method, args, kwargs))
                return
        method(*args, **kwargs)  # all items before it went out already

    def drain(self, _: object = None) -> None:
        """Forward the items in order, up to the first deferred transfer whose reply has not come yet (its
        reply's callback drains again); retire once empty."""
        p, chains = self.peer, []
        with p.defer_lock:
            if self.drainer is not None or self.retired:  # (this thread is forwarding already: it goes on)
                return
            self.drainer = threading.current_thread()
            fresh = getattr(_reader, "fresh", None)
            try:
                items = self.items
                while items:
                    item = items[0]
                    if type(item) is tuple:  # a frame posted behind a deferred transfer
                        items.popleft()
                        method, args, kwargs = item
                        method(*args, **kwargs)
                        continue
                    defer, call, outer, answers = item
                    if not defer.query.done():
                        break
                    items.popleft()
                    err = _error_of(defer.query)
                    if err is None and p.dead is not None:
                        err = p.dead
                    if err is not None:
                        chains.append((outer, err))
                        continue
                    answers[defer.name] = defer.query.result()
                    _reader.fresh = answers  # those answers stand: no second query for this transfer
                    try:
                        chains.append((outer, call()))
                    except _Defer as again:  # it needs another region (write_many): it keeps its place
                        item[0] = again
                        items.appendleft(item)
                        again.query.add_done_callback(self.drain)  # (done already: runs here, returns at once)
                    except BaseException as e:  # noqa: BLE001 - the transfer's error, for its future
                        chains.append((outer, e))
                    finally:
                        _reader.fresh = fresh
                if not items:
                    self.retired = True
                    p.post[self.stream] = self.conn
            finally:
                self.drainer = None
        for outer, inner in chains:  # (outside the lock: the callers' callbacks run here)
            if isinstance(inner, BaseException):
                with contextlib.suppress(InvalidStateError):
                    outer.set_exception(inner if isinstance(inner, Exception) else TransportError(str(inner)))
            else:
                inner.add_done_callback(functools.partial(_chain, outer))


def _error_of(f: Future) -> BaseException | None:
    return f.exception() if not f.cancelled() else TransportError("cancelled")


def _chain(outer: Future, inner: Future) -> None:
    """Complete `outer` as `inner` completed."""
    err = _error_of(inner)
    with contextlib.suppress(InvalidStateError):
        if err is None:
            outer.set_result(inner.result())
        else:
            outer.set_exception(err)


class _Conn:
    """One TCP connection of a peer's set: a reader thread and a sender thread.

    A small unpaced frame (an acknowledgement, a Layer Block, a control message) is sent by the thread that
    queues it, without blocking (MSG_DONTWAIT), when nothing is queued before it and no thread is sending:
    no hand-off to the sender thread. Whatever the socket does not take at once goes to the front of the
    queue for the sender thread, so frames always leave in the order they were queued and a reader thread
    never blocks on a send.
    """

    def __init__(self, owner: TcpTransport, peer: _Peer, sock: socket.socket, stream: str):
        self.owner, self.peer, self.sock, self.stream = owner, peer, sock, stream
        # Queued jobs: (header, payload, future, priority); a partly sent frame is (views left, payload, future,
        # None). `busy`: a thread is writing to the socket. Both guarded by `cv`.
        self.jobs: collections.deque[tuple] = collections.deque()
        self.lock = threading.Lock()  # `with self.lock` is cheaper than entering the Condition
        self.cv = threading.Condition(self.lock)
        self.busy = False
        self.snapshot = False  # the frame being sent inline is a read reply: copy what the socket does not take
        self.stopped = False
        self.eof = False
        self.more_run = 0  # write frames sent with FLAG_MORE in a row (sender thread only)
        # The watchdog's progress per connection: a byte received on it, or a chunk of a large frame sent on it (replies
        # come back on the connection of their request: a peer chatting on one class must not keep the other alive).
        self.last_progress = time.monotonic()
        self.busy_seen: float | None = None  # when the watchdog first saw requests pending on it (None: none pending)
        self.unacked_seen = 0  # the socket's unacknowledged bytes at the last `_paced_progress` (sender thread only)
        # Bytes of read replies copied and queued here (`enqueue`, snapshot); the reader waits on `room` past the cap.
        self.copied = 0
        self.room = threading.Condition(threading.Lock())
        self.reader = threading.Thread(
            target=self._read_loop, name=f"tcp-{owner.name}-{peer.name}-{stream}-rx", daemon=True
        )
        self.sender = threading.Thread(
            target=self._send_loop, name=f"tcp-{owner.name}-{peer.name}-{stream}-tx", daemon=True
        )

    def start(self) -> None:
        self.reader.start()
        self.sender.start()

    def stop(self) -> None:
        """Stop the sender thread (after the frame it is sending); queued messages fail."""
        with self.cv:
            self.stopped = True
            self.cv.notify_all()
        with self.room:  # (a reader waiting for room for a read reply)
            self.room.notify_all()

    def touch(self) -> None:
        self.last_progress = self.peer.last_activity = time.monotonic()

    def close_sock(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # ---- sending --------------------------------------------------------------------------------------
    def enqueue(
        self,
        header: bytes,
        payload: memoryview | None = None,
        fut: Future | None = None,
        priority: str | None = None,
        queue: bool = False,
        snapshot: bool = False,
    ) -> None:
        """Queue a frame; `priority` names the pacer class of its payload (None = control frame, unpaced). `queue`:
        leave it to the sender thread even if this thread could send it now (a deep pipeline: see
        QUEUE_AFTER_PENDING). `snapshot` (a read reply): what does not go out at once is copied first, so the reply
        holds the region's bytes as of now, not those of writes that land after it (the posting order)."""
        n = 0 if payload is None else payload.nbytes
        with self.lock:
            if self.stopped:  # the set was lost after the caller picked it: its sender thread takes no more jobs
                self._refuse(fut)
                return
            if queue or not self._inline_free_locked(n, INLINE_MAX, paced=priority is not None):
                if snapshot and n:
                    payload = memoryview(bytes(payload))
                    fut = self._copied(n)
                self.jobs.append((header, payload, fut, priority))
                self.cv.notify()
                return
            self.busy = True  # the connection is idle: this thread sends the frame itself
            self.snapshot = snapshot  # (read by `_send_inline`: `busy` keeps other threads out)
        self._send_inline([header] if n == 0 else [header, payload], HEADER.size + n, fut, payload)

    def _copied(self, n: int) -> _Copied:
        """Account `n` bytes of a read reply copied for the queue; returned token given back when sent or dropped."""
        with self.room:
            self.copied += n
        return _Copied(self, n)

    def _release(self, n: int) -> None:
        with self.room:
            self.copied -= n
            self.room.notify_all()

    def _wait_room(self, n: int) -> None:
        """Backpressure (the reader thread, serving a peer's READ): while the read replies copied for this connection
        would pass the endpoint's reply_copy_max_bytes with `n` more, stop reading from the peer until the sender
        thread sent enough of them: a peer asking for replies it never reads cannot make this endpoint copy without
        bound. Not while this endpoint has reads of its own pending on this connection (their replies come to this
        thread: two endpoints reading from each other could otherwise each wait for the other to read)."""
        with self.room:
            while self.copied and self.copied + n > self.owner.reply_copy_max and not self.stopped:
                if any(r.kind == "read" and r.stream == self.stream for r in list(self.peer.pending.values())):
                    return
                self.room.wait(0.1)  # (and again: a read of ours may be posted meanwhile)

    def _refuse(self, fut: Future | None) -> None:
        """Fail `fut` (if any) of a frame offered to this stopped connection. Transfers' futures also sit in the
        peer's pending table, which the set's failure fails; a message's future sits only here."""
        if fut is not None and not fut.done():
            err = self.peer.dead or PeerLostError(f"connection to {self.peer.name!r} closed")
            fut.set_exception(err if isinstance(err, TransportError) else PeerLostError(str(err)))

    def _inline_free_locked(self, nbytes: int, limit: int, paced: bool) -> bool:
        """May the posting thread send `nbytes` of payload itself now (lock held)? Only when nothing is queued or
        being sent, the payload is at most `limit`, and no pacer has to meter it."""
        return (
            not self.jobs
            and not self.busy
            and not self.stopped
            and nbytes <= limit
            and (nbytes == 0 or not paced or self.owner.pacer is None)
        )

    def enqueue_batch(self, frames: list[tuple[bytes, memoryview]], nbytes: int, priority: str) -> None:
        """Queue the frames of a `write_many` back to back (no other frame between them); `nbytes` = payload
        bytes. Sent inline in one vectored send when the connection is idle and the batch is unpaced and at most
        BATCH_INLINE_MAX (what the socket does not take goes to the sender thread, as for one frame)."""
        with self.lock:
            inline = self._inline_free_locked(nbytes, BATCH_INLINE_MAX, paced=True)
            if inline:
                self.busy, self.snapshot = True, False
            else:
                self.jobs.extend((h, v, None, priority) for h, v in frames)
                self.cv.notify()
        if inline:
            views: list = []
            for h, v in frames:
                views.append(h)
                if v.nbytes:
                    views.append(v)
            self._send_inline(views, HEADER.size * len(frames) + nbytes, None, None)

    def _send_inline(self, views: list, total: int, fut: Future | None, payload: memoryview | None) -> None:
        """Send `views` (`total` bytes) from the calling thread without blocking; what the socket does not take
        goes to the front of the queue for the sender thread (copied first if `snapshot`, see `enqueue`). The caller
        set `busy`."""
        try:
            try:
                k = self.sock.sendmsg(views if len(views) <= 1024 else views[:1024], (), _DONTWAIT)
            except (BlockingIOError, InterruptedError):
                k = 0
        except BaseException as e:  # noqa: BLE001 - the connection set is dead
            with self.lock:
                self.busy = False
            err = e if isinstance(e, TransportError) else PeerLostError(f"send to {self.peer.name!r} failed: {e}")
            if fut is not None and not fut.done():
                fut.set_exception(err)
            self.owner._fail_peer(self.peer, err)
            if not isinstance(e, Exception):  # Ctrl-C in the caller's sendmsg: the set is failed (the stream may
                raise  # hold part of a frame) and the interrupt goes on to the caller (it was swallowed)
            return
        if k == total:
            # Done: no lock needed to go idle, but a frame queued meanwhile must wake the sender thread (it saw
            # `busy` and went back to waiting; it re-checks both under the lock once notified).
            self.busy = False
            if self.jobs:
                with self.lock:
                    self.cv.notify()
        else:  # the socket is full: the sender thread sends the rest before anything queued later
            rest = _advance([memoryview(v).cast("B") for v in views], k)
            if self.snapshot:
                rest = [memoryview(bytes(v)) for v in rest]
                fut = self._copied(sum(v.nbytes for v in rest))  # (a read reply has no future of its own)
            with self.lock:
                self.busy = False
                if self.stopped:
                    self._refuse(fut)
                    return
                self.jobs.appendleft((rest, payload, fut, None))
                self.cv.notify()
            return
        if fut is not None and not fut.done():
            fut.set_result(0 if payload is None else payload.nbytes)

    def _is_small(self, job: tuple) -> bool:
        _, payload, _, priority = job
        n = 0 if payload is None else payload.nbytes
        return n <= SMALL and (self.owner.pacer is None or n == 0 or priority is None)

    def _take(self) -> list[tuple] | None:
        """The next job, or a batch of small ones to go out in one sendmsg; None once stopped."""
        with self.cv:
            while (not self.jobs or self.busy) and not self.stopped:
                self.cv.wait()
            if self.stopped:
                return None
            job = self.jobs.popleft()
            batch = [job]
            if self._is_small(job):
                # Coalesce queued small frames (acks, Layer Blocks, messages) into one sendmsg: fewer syscalls.
                nbytes = 0
                while self.jobs and len(batch) < 64 and nbytes < SMALL * 4 and self._is_small(self.jobs[0]):
                    nxt = self.jobs.popleft()
                    batch.append(nxt)
                    nbytes += 0 if nxt[1] is None else nxt[1].nbytes
            self.busy = True
            return batch

    def _send_loop(self) -> None:
        # (a `send` future's done callback runs here: a transfer it posts to a region not asked about yet must not wait
        # for the reply, as on a reader thread: the query would sit behind the frames queued here, which only this
        # thread sends, until the watchdog dropped the peer)
        _reader.conn = self
        while True:
            batch = self._take()
            if batch is None:
                break
            job = batch[0]
            try:
                if len(batch) == 1 and not isinstance(job[0], list):
                    self._send_frame(self._flag_more(job[0]), job[1], job[3])
                else:
                    self._send_small_batch(batch)
            except BaseException as e:  # noqa: BLE001 - the connection set is dead
                with self.cv:
                    self.busy = False
                err = e if isinstance(e, TransportError) else PeerLostError(f"send to {self.peer.name!r} failed: {e}")
                if isinstance(self.peer.dead, TransportError):  # cut by the set's loss or our `close`: its error
                    err = self.peer.dead
                for _, _, fut, _ in batch:
                    if fut is not None and not fut.done():
                        fut.set_exception(err)
                self.owner._fail_peer(self.peer, err)
                break
            with self.cv:
                self.busy = False
            for _, payload, fut, _ in batch:
                if fut is not None and not fut.done():
                    fut.set_result(len(payload) if payload is not None else 0)
        # fail whatever is still queued (messages carry futures; transfers are failed via the pending table)
        with self.cv:
            self.stopped = True
            leftovers = list(self.jobs)
            self.jobs.clear()
        for job in leftovers:  # (with the set's error: TransportClosedError after our own `close`, as transfers get)
            self._refuse(job[2])

    def _flag_more(self, header: bytes) -> bytes:
        """`header` with FLAG_MORE set if it is a write frame and more frames are queued behind it (only this
        thread takes jobs, so they will follow it), on an unpaced endpoint, and fewer than half of the peer's
        pending requests went out flagged in a row (so a sender waiting for its oldest writes to complete is
        acknowledged well before its window runs dry)."""
        if (
            not self.jobs
            or header[5] != OP_WRITE
            or self.owner.pacer is not None
            or self.more_run >= len(self.peer.pending) // 2
        ):
            self.more_run = 0
            return header
        self.more_run += 1
        body = bytearray(header[:_BODY])
        body[6] |= FLAG_MORE
        return bytes(body) + _CRC.pack(_crc32(body))

    def _send_small_batch(self, batch: list[tuple]) -> None:
        bufs: list = []
        for header, payload, _, _ in batch:
            if isinstance(header, list):  # the rest of a frame an inline send left
                bufs.extend(header)
                continue
            bufs.append(header)
            if payload is not None and payload.nbytes:
                bufs.append(payload)
        self._sendmsg_all(bufs)

    def _sendmsg_all(self, bufs: list) -> None:
        """sendmsg of a buffer list, resuming after partial sends."""
        views = [memoryview(b).cast("B") for b in bufs]
        while views:
            views = _advance(views, self.sock.sendmsg(views[:1024]))

    def _send_frame(self, header: bytes, payload: memoryview | None, priority: str | None) -> None:
        sock = self.sock
        n = 0 if payload is None else payload.nbytes
        paced = self.owner.pacer is not None and n > 0 and priority is not None
        if n <= SMALL and not paced:
            self._sendmsg_all([header] if n == 0 else [header, payload])
            return
        pos = 0
        steps = (
            self.owner._paced_chunks(n, priority, PACE_CHUNK, self._check_set)
            if paced
            else (min(SEND_CHUNK, n - o) for o in range(0, n, SEND_CHUNK))
        )
        for step in steps:
            if pos == 0:  # the header goes with the first chunk: one send, no segment of its own
                self._sendmsg_all([header, payload[:step]])
            else:
                sock.sendall(payload[pos : pos + step])
            pos += step
            if paced:
                self._paced_progress(step + (len(header) if pos == step else 0))
            else:
                self.touch()

    def _paced_progress(self, sent: int = 0) -> None:
        """Progress of a paced frame, which our pacer may space further apart than timeout_s: the peer's host took data
        since the last look (`_unacked`: the socket's unacknowledged bytes below those seen then plus the `sent` ones,
        or none left); where that is not known, every chunk sent and every wait counts. (A chunk sent, or a wait,
        counted as such: our send buffer, megabytes, takes chunk after chunk at the paced rate, so a peer whose host
        stopped taking data, gone or its window shut, was kept alive until the buffer filled, minutes at a slow pace.)
        Sender thread only: nothing else sends on the socket while it is in a frame."""
        unacked = _unacked(self.sock)
        if unacked is None or unacked == 0 or unacked < self.unacked_seen + sent:
            self.touch()
        self.unacked_seen = unacked or 0

    def _check_set(self) -> None:
        """Called by the pacer while a chunk of a paced frame waits for its slot: once the set is dead (our `close`,
        `disconnect`, the peer gone) the wait ends at once with the set's error, and the chunks not moved are taken back
        from the link. (Without it the sender thread waited for the next grant, however far: `close` gave up on it
        after 2 x CLOSE_GRACE_S and left it running; `disconnect` left it running with its chunks queued.)
        The wait is this endpoint's, not the peer's silence: while the peer's host takes what was sent it is progress
        (`_paced_progress`), on the connection's clock and the peer's (`_watchdog` judges the peer as a whole first),
        so chunks paced further apart than timeout_s are not failed. (Only the connection's clock restarted: such a
        write failed after timeout_s.)"""
        self._paced_progress()
        dead = self.peer.dead  # (set by `_fail_peer` before it stops the senders; our `close` fails every set)
        if dead is not None:
            kind = TransportClosedError if isinstance(dead, TransportClosedError) else PeerLostError
            raise kind(f"send to {self.peer.name!r} ended while waiting for the pacer: {dead}")

    # ---- receiving ------------------------------------------------------------------------------------
    def _read_loop(self) -> None:
        _reader.conn = self  # (see `_remote_region_of`)
        owner, peer, sock = self.owner, self.peer, self.sock
        acks = bytearray()  # held-back acknowledgements: ACK_ENTRY records of writes that landed
        held = 0  # write frames landed since the last acknowledgement frame

        def send_acks() -> None:
            nonlocal held
            self.enqueue(pack_header(OP_WRITE_ACKS, length=len(acks)), memoryview(bytes(acks)))
            acks.clear()
            held = 0

        rx = _BufferedReceiver(sock, self.touch, idle=send_acks, held=acks)
        ack_max = ACK_BATCH * ACK_ENTRY.size
        pack_ack = ACK_ENTRY.pack
        regions = owner._regions_by_id  # changed in place only (register/deregister)
        chain_req, chain_bytes = None, 0  # the write_many batch being received (FLAG_CHAIN frames so far)
        try:
            # (the fence of `disconnect`: once the set is dropped, no frame lands, not one already in the receive buffer
            # behind a frame whose hook or callback ran meanwhile; our own `close` reads on until the peer's EOF)
            while peer.dead is None or owner._closed:
                _, _, op, flags, rid, offset, length, tag, req, _ = rx.header()
                rx.more = flags & FLAG_MORE if op == OP_WRITE else 0
                if op == OP_WRITE:
                    region = regions.get(rid)  # atomic dict lookup: no lock per frame
                    if region is None or offset + length > region.size:
                        # raises, naming what is wrong; or the region registered again since the lookup above
                        region = owner._region_for_frame(rid, offset, length, "WRITE")
                    at = rx.start
                    if rx.end - at >= length:  # the whole payload is in the receive buffer: one copy, no recv
                        region.view[offset : offset + length] = rx.view[at : at + length]
                        rx.start = at + length
                    else:
                        rx.read_into(region.view[offset : offset + length])
                    rx.exact = length >= rx.DIRECT
                    if flags & FLAG_NOTIFY:
                        owner.completions.put(Notification(peer.name, tag, region.name, offset, length))
                    held += 1
                    if flags & FLAG_CHAIN:  # a write_many frame before its last: acknowledged with the last one
                        if chain_req is None:
                            chain_req = req
                        elif req != chain_req:
                            raise ProtocolError(f"write batch frame of request {req} inside the batch of {chain_req}")
                        chain_bytes += length
                        continue
                    if chain_req is not None:  # the last frame of a write_many: one ack for the whole batch
                        if req != chain_req:
                            raise ProtocolError(f"write of request {req} inside the write batch of {chain_req}")
                        length += chain_bytes
                        chain_req, chain_bytes = None, 0
                    # The ack goes out with the others once the socket drains, or once ACK_BATCH requests or
                    # ACK_FRAMES frames landed (so a sender with a bounded window of small writes keeps streaming).
                    acks += pack_ack(req, length)
                    if held >= ACK_FRAMES:  # (<= ACK_FRAMES acknowledgements held: within ack_max)
                        send_acks()
                elif op == OP_READ:
                    region = owner._region_for_frame(rid, offset, length, "READ")
                    if length > owner.reply_copy_max:  # (its copy would pass the cap alone; peers split such reads)
                        raise ProtocolError(
                            f"READ of {length} bytes exceeds this endpoint's reply_copy_max_bytes="
                            f"{owner.reply_copy_max} (a larger read must come in parts, as `read` of a peer of protocol "
                            f"version {VERSION} sends it; or raise reply_copy_max_bytes, config.transport_options)"
                        )
                    if self.copied:  # (backpressure: replies copied and not sent yet)
                        self._wait_room(length)
                    self.enqueue(
                        pack_header(OP_READ_RESP, length=length, req=req),
                        region.view[offset : offset + length],
                        priority=self.stream,
                        snapshot=True,  # (a write posted after the read may land before the reply is sent)
                    )
                elif op == OP_WRITE_ACKS:
                    if length % ACK_ENTRY.size or not 0 < length <= ack_max:
                        raise ProtocolError(f"write acknowledgement batch of {length} bytes")
                    done = peer.pop_acks(rx.read(length))
                    complete_quietly(done, [p.length for p in done])
                elif op == OP_WRITE_ACK:
                    p = peer.pop(req, "write", length)
                    if not p.done():
                        p.set_result(p.length)
                elif op == OP_READ_RESP:
                    # Pending until its payload is in: a peer that stops mid-reply (stopped, hung) is dropped by
                    # `_watchdog` after timeout_s without a byte (it waited for it forever once the header was in).
                    p = peer.pop(req, "read", length, keep=True)
                    try:
                        rx.read_into(p.view)
                    except BaseException as e:  # cut off mid-payload (by the peer, or by `_fail_peer`: its reason)
                        if not p.done():
                            p.set_exception(
                                peer.dead
                                if peer.dead is not None
                                else e
                                if isinstance(e, TransportError)
                                else PeerLostError(f"read reply from {peer.name!r} cut off: {e}")
                            )
                        raise
                    finally:
                        with peer.lock:
                            peer.pending.pop(req, None)
                    if not p.done():
                        p.set_result(p.length)
                elif op == OP_MSG:
                    if length > owner.max_message_bytes:
                        raise ProtocolError(f"message of {length} bytes exceeds the {owner.max_message_bytes} limit")
                    payload = rx.read_growing(length)  # (the buffer grows with the bytes: not the length told)
                    hook = owner.on_message
                    if hook is not None:
                        if acks:
                            send_acks()  # a hook may take its time; landed writes must not wait for it
                        try:
                            handled = hook(peer.name, payload)
                        except Exception:  # the application's bug, not the peer's: the set stays up
                            log.exception(
                                "%s: on_message hook failed on a message from %r; queued for recv",
                                owner.name,
                                peer.name,
                            )
                            handled = False
                    if hook is None or not handled:
                        owner.messages.put(peer.name, payload)
                elif op == OP_REGION_QUERY:
                    if length > REGION_NAME_MAX:
                        raise ProtocolError(f"region name of {length} bytes")
                    name = rx.read(length).decode("utf-8", errors="replace")
                    with owner._lock:
                        region = owner._regions.get(name)
                    if region is None:
                        self.enqueue(pack_header(OP_REGION_INFO, tag=-1, req=req))
                    else:
                        self.enqueue(pack_header(OP_REGION_INFO, region=region.region_id, offset=region.size, req=req))
                elif op == OP_REGION_INFO:
                    p = peer.pop(req, "query", 0)
                    if not p.done():
                        p.set_result(None if tag < 0 else (rid, offset))
                else:
                    raise ProtocolError(f"op {op} is not valid after the handshake")
            self.close_sock()  # dropped by `disconnect` (its sockets are closed already)
        except _CleanEOF:
            if owner.closed or peer.dead:
                self.close_sock()
                return
            # The peer closes all connections of its set; replies may still be arriving on the others.
            self.eof = True
            if all(c.eof for c in peer.conns.values()):
                why = _refused_hint(peer)
                owner._fail_peer(peer, PeerLostError(f"peer {peer.name!r} closed the connection{why}"))
        except BaseException as e:  # noqa: BLE001
            if owner.closed or peer.dead:
                self.close_sock()
                return
            if isinstance(e, (ProtocolError, RegionError)):
                log.error("%s: closing connection set from %r: %s", owner.name, peer.name, e)
                err: TransportError = ProtocolError(f"connection to {peer.name!r} closed after a protocol error: {e}")
            elif isinstance(e, TransportError):
                err = e
            else:
                err = PeerLostError(f"connection to {peer.name!r} lost: {e}{_refused_hint(peer)}")
            owner._fail_peer(peer, err)


def _refused_hint(peer: _Peer) -> str:
    """What a writer is told when the peer closed a set with transfers pending. The protocol has no frame for the
    reason: a receiver that refuses a frame (e.g. a write past the end of a region it registered again smaller) logs it
    and closes the set, and the writer saw only "peer closed the connection". A peer process that died (kill -9) looks
    the same from here (a reset or an EOF), so both are named."""
    if not peer.pending:
        return ""
    return (
        " with transfers pending: the peer died, or it refused a frame (a peer closes the set when it refuses a frame, "
        "e.g. a write outside a region it registered again smaller: its log names the region, offset and length)"
    )


class _Peer:
    """A connected peer: its connection set, pending requests, and a cache of its regions."""

    def __init__(self, owner: TcpTransport, name: str):
        self.owner, self.name = owner, name
        self.conns: dict[str, _Conn] = {}
        # Where transfers of a class are posted: its connection, or a `_Deferral` while one posted from a reader
        # thread waits for a region reply (changed under `defer_lock`; read without a lock).
        self.post: dict[str, _Conn | _Deferral] = {}
        self.defer_lock = threading.RLock()
        self.pending: dict[int, _Request] = {}
        self.remote_regions: dict[str, tuple[int, int]] = {}
        self.queries: dict[str, _Request] = {}  # region name -> its query in flight
        self.lock = threading.Lock()
        self.dead: BaseException | None = None
        self.last_activity = time.monotonic()
        self.max_message: int | None = None  # the peer's max_message_bytes (from the handshake; None: not told)
        self.max_read: int | None = None  # the largest READ it serves, its reply_copy_max_bytes (None: not told)
        self.address: tuple | None = None  # (host, port) our `connect` used; None for a set the peer opened
        self.sockaddr: tuple | None = None  # the peer's socket address on that set (host, port)
        self.instance: str | None = None  # the peer endpoint's instance id (from the handshake; None: not told)

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def add(self, req: int, p: _Request) -> None:
        """Record a pending request. No lock: the store is atomic, and `_fail_peer` sets `dead` before it takes
        the pending table, so a request stored after that is seen here, taken back, and the error raised.

        Posting is not progress from the peer: the watchdog's clock restarts only when this is the first request
        pending (an idle peer is not late). Later posts leave it alone, so a peer that stopped answering is
        dropped `timeout_s` after its last sign of life however often the application posts to it."""
        if not self.pending:
            self.last_activity = time.monotonic()
        self.pending[req] = p
        if self.dead is not None:
            self.pending.pop(req, None)
            raise self.dead

    def pop(self, req: int, kind: str, length: int, keep: bool = False) -> _Request:
        """The pending request a reply answers (checked), taken out of the pending table unless `keep`."""
        with self.lock:
            p = self.pending.get(req)
            if p is None or p.kind != kind:
                raise ProtocolError(f"{kind} reply for unknown request {req}")
            if kind != "query" and p.length != length:
                raise ProtocolError(f"{kind} reply of {length} bytes for a {p.length}-byte request {req}")
            if not keep:
                del self.pending[req]
            return p

    def pop_acks(self, payload: bytes) -> list[_Request]:
        """The pending writes acknowledged by an OP_WRITE_ACKS payload (all checked before any completes)."""
        done: dict[int, _Request] = {}
        with self.lock:
            for req, length in ACK_ENTRY.iter_unpack(payload):
                p = self.pending.pop(req, None)
                if p is None or p.kind != "write" or p.length != length:
                    self.pending.update(done)  # a bad batch completes nothing; _fail_peer fails them all
                    if p is not None:
                        self.pending[req] = p
                        raise ProtocolError(f"write reply of {length} bytes for {p.kind} request {req} of {p.length}")
                    raise ProtocolError(f"write reply for unknown request {req}")
                done[req] = p
        return list(done.values())


@TRANSPORTS.register("tcp")
class TcpTransport(Transport):
    """TCP endpoint. `address` is `(host, port)`; pass it to a peer's `connect`.

    Args:
      name: this endpoint's name (peers address it by this name).
      host, port: where to listen (port 0 = any free port). Non-loopback hosts need `secret`. Bind a concrete
        address for peers on other hosts: a wildcard ("0.0.0.0", "::", "") listens on every interface, but
        `address` is then that wildcard, which a peer on this host reaches (as loopback) and one on another host
        cannot; such a bind logs a warning, and peers elsewhere must connect to one of this host's addresses.
      secret: shared secret (str or bytes) every connection must prove (mutual HMAC); required to bind a
        non-loopback address, optional on loopback. A client with a secret refuses servers without one.
      pacer: optional `Pacer` that paces outgoing payload bytes (emulated NIC caps).
      timeout_s: a peer with pending transfers and no progress for this long is declared dead.
      handshake_timeout_s: a new connection's handshake (HELLO, authentication) must finish within this long in all.
      max_message_bytes: the largest control message this endpoint accepts (a larger one closes the connection set).
        The handshake tells peers; their `send` of a larger message raises `TransportError` at once.
      The caps against a peer that floods or hogs this endpoint (None: the module's default, in brackets; each
      checked here, a bad one a ValueError naming it):
      reply_copy_max_bytes: read-reply bytes copied for one connection and not sent yet [REPLY_COPY_MAX, 64 MiB;
        at least REPLY_COPY_MIN, 64 KiB]. Past it the reader stops reading that peer's requests until they went out.
        A peer's READ above it is refused; the handshake tells peers, whose `read` of more goes in parts of at most it.
      max_sets, max_sets_per_peer: live connection sets, all and of one peer instance [MAX_SETS 256,
        MAX_SETS_PER_PEER 8]; more are refused at the handshake.
      max_pending_handshakes: handshakes in progress at once [MAX_PENDING_HANDSHAKES 64]; a host other than this one
        holds at most half of them.
      handshake_step_s: each step of a server handshake (the client's HELLO, then its AUTH) must arrive within this
        long [HANDSHAKE_STEP_S, 1 s; at most handshake_timeout_s].
    """

    backend = "tcp"

    def __init__(
        self,
        name: str,
        host: str = "127.0.0.1",
        port: int = 0,
        secret: str | bytes | None = None,
        pacer: Pacer | None = None,
        timeout_s: float = 30.0,
        handshake_timeout_s: float = 5.0,
        max_message_bytes: int = 16 << 20,
        reply_copy_max_bytes: int | None = None,
        max_sets: int | None = None,
        max_sets_per_peer: int | None = None,
        max_pending_handshakes: int | None = None,
        handshake_step_s: float | None = None,
    ):
        super().__init__(name, pacer)
        caps = _check_caps(
            name, reply_copy_max_bytes, max_sets, max_sets_per_peer, max_pending_handshakes, handshake_step_s
        )
        for what, t in (("timeout_s", timeout_s), ("handshake_timeout_s", handshake_timeout_s)):
            if not is_real(t):  # (True was a 1 s timeout; "30" or None a bare TypeError from `>` naming no setting)
                raise TypeError(f"tcp transport {name!r}: {what} must be a number of seconds, got {t!r}")
            if not t > 0:  # 0 would drop every peer with a transfer pending; NaN would never time out
                raise ValueError(f"tcp transport {name!r}: {what} must be > 0 seconds, got {t}")
        if handshake_timeout_s == float("inf"):  # (a socket timeout of inf: OverflowError, every connection refused)
            raise ValueError(f"tcp transport {name!r}: handshake_timeout_s must be finite, got {handshake_timeout_s}")
        if isinstance(max_message_bytes, bool) or not isinstance(max_message_bytes, int) or max_message_bytes < 1:
            # (0 or less refused every message, the RDMA backend's control messages too; 1.5 was taken as 1)
            raise ValueError(
                f"tcp transport {name!r}: max_message_bytes must be an int >= 1, got {max_message_bytes!r}"
            )
        try:
            name_bytes = len(name.encode())
        except UnicodeEncodeError:  # (a lone surrogate)
            name_bytes = -1
        if not 0 < name_bytes <= ENDPOINT_NAME_MAX:
            raise ValueError(
                f"tcp transport {name[:40]!r}...: the name must be valid UTF-8 of at most {ENDPOINT_NAME_MAX} bytes "
                f"(peers' handshakes carry it), got {len(name)} characters"
            )
        if not is_int(port) or not 0 <= port <= 65535:  # ("80" was a bare TypeError, -1 an OverflowError from bind)
            raise ValueError(
                f"tcp transport {name!r}: port must be an int in 0..65535 (0: any free port), got {port!r}"
            )
        port = int(port)
        if secret is not None and not isinstance(secret, (str, bytes, bytearray)):
            # (an int or a path object was taken, and every handshake then failed with a TypeError from hmac)
            raise TypeError(f"tcp transport {name!r}: secret must be str or bytes, got {type(secret).__name__}")
        if not is_loopback(host) and not secret:
            raise ValueError(
                f"tcp transport {name!r}: binding non-loopback address {host!r} requires a shared secret "
                "(pass secret=...); peers must prove it at connect"
            )
        # An empty secret is no secret, as the check above takes it: it made this endpoint demand an HMAC proof
        # (with an empty key) from every peer and refuse peers without a secret ("requires a shared secret").
        self.secret = (secret.encode() if isinstance(secret, str) else bytes(secret)) if secret else None
        self.timeout_s = float(timeout_s)
        self.handshake_timeout_s = float(handshake_timeout_s)
        self.reply_copy_max, self.max_sets, self.max_sets_per_peer, self.max_pending_handshakes, step_s = caps
        # (one from another host holds at most half; the module's own figure when not set here)
        per_addr = MAX_PENDING_PER_ADDRESS if max_pending_handshakes is None else self.max_pending_handshakes // 2
        self.max_pending_per_address = max(1, per_addr)
        self._step_s = min(step_s, self.handshake_timeout_s)  # each step of a server handshake
        self.max_message_bytes = int(max_message_bytes)
        self._req_ids = itertools.count(1)
        self.instance = os.urandom(8).hex()  # told to peers at every handshake: this endpoint, not its name
        # Optional hook `(peer, payload) -> handled` run by a reader thread on each control message (the RDMA
        # backend uses this endpoint as its control channel); unhandled messages go to `recv`, and so does the message
        # of a hook that raises (logged with its traceback; the set stays up: it is not the peer's fault).
        self.on_message: Callable[[str, bytes], bool] | None = None
        self.on_peer_lost: Callable[[str, BaseException], None] | None = None  # called once per lost set
        self._peers: dict[str, list[_Peer]] = {}
        self._live: dict[str, _Peer] = {}  # name -> a live connection set (read without the lock)
        self._handshakes = threading.BoundedSemaphore(self.max_pending_handshakes)
        self._pending_by_addr: collections.Counter[str] = collections.Counter()  # handshakes per source (`_lock`)
        self._flood_log = _RateLimitedLog(logging.ERROR, 1, f"{name}: too many pending handshakes")
        self._reject_log = _RateLimitedLog(logging.ERROR, 5, f"{name}: rejected connections")
        self._half_open: dict[tuple[str, str], tuple[float, dict[str, socket.socket]]] = {}
        self._connecting: collections.Counter[str] = collections.Counter()  # peer -> our `connect`s in progress
        # (an IPv6 address needs an AF_INET6 listener: create_server's default AF_INET refused "::1" at once)
        family = socket.AF_INET6 if _ip_version(host) == 6 else socket.AF_INET
        self._listener = socket.create_server((host, port), family=family, backlog=128)
        self._address = self._listener.getsockname()[:2]
        if is_wildcard(host):  # (allowed: every interface; but `address` is no host a remote peer can use)
            log.warning(
                "tcp transport %r: bound to the wildcard address %r (every interface): its address %s reaches it "
                "from this host only; a peer on another host must connect to one of this host's addresses at port %d "
                "(or bind that address instead)",
                name,
                host,
                self._address,
                self._address[1],
            )
        self._stopping = threading.Event()  # set by `close`: wakes the watchdog at once
        self._handshaking: dict[threading.Thread, socket.socket] = {}  # server handshakes in progress (`_lock`)
        self._retired: list[_Conn] = []  # connections of dead sets whose threads may still be ending (`_lock`)
        self._threads = [
            threading.Thread(target=self._accept_loop, name=f"tcp-{name}-accept", daemon=True),
            threading.Thread(target=self._watchdog, name=f"tcp-{name}-watchdog", daemon=True),
        ]
        for t in self._threads:
            t.start()

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) as bound: of a wildcard bind, the wildcard (this host's peers only; see the class)."""
        return tuple(self._address)

    # ---- connection setup -------------------------------------------------------------------------------
    def connect(
        self, peer: str, address: Any, timeout: float | None = 10.0, *, wait_for_listener_s: float | None = None
    ) -> None:
        """Open the connection set to `peer` at `address` = (host, port). Nothing to do if a live set to `peer`
        exists already: one the peer opened, or one this endpoint opened to the same address (the same socket
        address once resolved), and the endpoint at `address` is still the instance of that set (asked with one
        short connection, PROBE); a new instance there (the peer started again) is connected, which drops the old
        set and fails its pending transfers with `PeerLostError`; so is the same instance when it holds no set of
        ours any more (it dropped it: `disconnect`, its watchdog; our reader has not seen the reset yet), after our
        sets to it are dropped. A live set this endpoint opened to *another*
        address raises `TransportError` naming both (it was silently kept and the new address ignored): the old set
        stays until the peer closes it or its pending transfers time out. A connection the server refuses as busy (short
        of handshake slots under a flood) is tried again with backoff within `timeout`; one it closes without an answer
        (another protocol version, or no dualpath tcp transport there) after SILENT_DROP_TRIES quick tries at most,
        and the error names those causes. A refused TCP connection (nothing listening there yet: a peer process
        still starting) is tried again with the same backoff for `wait_for_listener_s` (None: until `timeout` is up;
        0: not at all, for an address published only once its peer listened, where a refusal means the peer is
        gone, as the runtime's engines connect), then fails naming the address and how long it was tried; an address
        that does not resolve, or a failed authentication, fails at once."""
        self._check_open()
        check_wait_for_listener(wait_for_listener_s, f"{self.name}: connect")
        if not isinstance(address, (tuple, list)) or len(address) != 2:
            raise TypeError(f"{self.name}: the address of {peer!r} must be (host, port), got {address!r}")
        # (inf, and anything past threading.TIMEOUT_MAX such as 1e10: OverflowError from the socket, which was reported
        # as "cannot connect"; NaN, <= 0)
        if timeout is not None and not 0 < timeout < threading.TIMEOUT_MAX:
            raise ValueError(
                f"{self.name}: connect timeout must be > 0 seconds and finite (or None), got {timeout} "
                f"(at most threading.TIMEOUT_MAX = {threading.TIMEOUT_MAX:.0f} s)"
            )
        live = self._live_peer(peer)
        if live is not None:
            self._check_same_address(live, tuple(address))
            # Is it still the same endpoint there? A peer started again at this address (its old set silently open:
            # host crash) kept getting our posts on the dead set until the watchdog noticed; a new instance is
            # connected below, which drops the old set (`_add_peer`). The same instance that holds no set of ours any
            # more (it `disconnect`ed us, or its watchdog dropped us, and our reader has not seen the reset yet): our
            # sets to it are dead, dropped here, and a new one is connected (`connect` returned, posting to them).
            if live.instance is None:
                return
            instance, ours = self._probe_instance(peer, tuple(address), timeout)
            if instance is None or instance == live.instance and ours is not False:
                return
            if instance == live.instance:
                with self._lock:
                    stale = [q for q in self._peers.get(peer, ()) if q.instance == instance]
                for q in stale:
                    self._fail_peer(q, PeerLostError(f"{self.name}: {peer!r} dropped this connection set"))
        host, port = address
        with self._lock:  # (the peer already holds this set while we finish it: a probe of it is told so)
            self._connecting[peer] += 1
        try:
            # A server short of handshake slots (a flood of connections that never authenticate) says so ("busy"), and
            # a refused connection is a peer not listening yet: both tried again, with backoff, for as long as
            # `timeout` (10 s if None) allows (a refused one failed at once: a peer started a moment later was lost).
            # One that closes the connection without an answer is no tcp transport of this version (one of version 4
            # or older does so): given up after SILENT_DROP_TRIES quick tries (it took the whole timeout, 10 s by
            # default, before saying so).
            start = time.monotonic()
            give_up, delay, tries, silent = start + (10.0 if timeout is None else timeout), 0.05, 1, 0
            listen_until = give_up if wait_for_listener_s is None else min(give_up, start + wait_for_listener_s)
            while True:
                session = os.urandom(8).hex()
                socks: dict[str, socket.socket] = {}
                try:
                    for stream in STREAMS:
                        sock = socket.create_connection((host, port), timeout=timeout)
                        socks[stream] = sock
                        limit, instance, ack = self._client_handshake(sock, peer, session, stream, timeout)
                    read_max = _peer_read_max(ack, peer)  # (checked here: a bad one closes the sockets below)
                    sockaddr = socks["high"].getpeername()[:2]
                    break
                except BaseException as e:
                    for s in socks.values():
                        s.close()
                    busy = isinstance(e, _Busy)
                    dropped = isinstance(e, (_CleanEOF, ConnectionResetError, BrokenPipeError, ConnectionAbortedError))
                    refused = isinstance(e, ConnectionRefusedError)  # (of the TCP connect: the handshake's is a reset)
                    silent += dropped
                    again = busy or refused or dropped and silent < SILENT_DROP_TRIES
                    # (a refused try is quick: the last one comes at the deadline; a busy one may take a handshake step)
                    wait = min(delay, listen_until - time.monotonic()) if refused else delay
                    if again and not self.closed and (0 < wait if refused else time.monotonic() + delay < give_up):
                        time.sleep(wait)
                        delay, tries = min(1.0, delay * 2), tries + 1
                        continue
                    if isinstance(e, TransportError) and not (dropped or busy):
                        raise
                    took = f"{tries} tries in {time.monotonic() - start:.1f} s"
                    if busy:
                        why = (
                            f" ({took}: a flood of connections that never authenticate holds its handshake slots? "
                            "its log says)"
                        )
                    elif refused and wait_for_listener_s == 0:  # (an address its peer published once listening)
                        why = " (not tried again, wait_for_listener_s=0: the peer is gone, or this is not its address)"
                    elif refused:
                        why = f" ({took}: nothing listening there; is the peer's process up, at this port?)"
                    elif dropped:
                        why = (
                            f" (it closed the connection without answering the handshake, {took}: it is no "
                            "dualpath tcp transport, or it speaks another protocol version: this endpoint speaks "
                            f"{VERSION}, and one of version 4 or older closes without an answer, logging "
                            f"'unsupported protocol version {VERSION}'; its log says)"
                        )
                    else:
                        why = ""
                    raise PeerLostError(f"{self.name}: cannot connect to {peer!r} at {host}:{port}: {e}{why}") from e
            self._add_peer(peer, socks, limit, (host, port), sockaddr, instance, read_max)
        finally:
            with self._lock:
                self._connecting[peer] -= 1
                if not self._connecting[peer]:
                    del self._connecting[peer]

    def _probe_instance(self, peer: str, address: tuple, timeout: float | None) -> tuple[str | None, bool | None]:
        """(instance id, holds a set of ours) of the endpoint `peer` at `address` now, from one connection's handshake
        of stream PROBE (the server answers it and closes; with a secret, once both sides proved it): None if it
        cannot be told (unreachable, another endpoint there, refused; the second: a peer that does not say)."""
        try:
            with socket.create_connection(address, timeout=timeout) as sock:
                _, instance, ack = self._client_handshake(sock, peer, os.urandom(8).hex(), PROBE, timeout)
        except Exception as e:  # noqa: BLE001 - the live set stays, as before the probe
            log.info("%s: cannot probe %r at %s: %s", self.name, peer, address, e)
            return None, None
        ours = ack.get("sets")
        return instance, ours if isinstance(ours, bool) else None

    def _check_same_address(self, p: _Peer, address: tuple) -> None:
        """Raise `TransportError` if the live set `p` was opened by our `connect` to an address other than
        `address` (compared as given, then as resolved socket addresses)."""
        if p.address is None or p.address == address:
            return
        try:
            resolved = {ai[4][:2] for ai in socket.getaddrinfo(*address, type=socket.SOCK_STREAM)}
        except (OSError, TypeError, ValueError, UnicodeError):
            resolved = set()
        if p.sockaddr in resolved:
            return
        raise TransportError(
            f"{self.name}: {p.name!r} is connected at {p.address[0]}:{p.address[1]}, not {address[0]}:{address[1]}; "
            "the live connection set stays until the peer closes it or its transfers time out"
        )

    def _limits_told(self) -> dict[str, int]:
        """What every HELLO / HELLO_ACK tells the peer of this endpoint's limits (`_peer_limit`, `_peer_read_max`)."""
        return {"max_message_bytes": self.max_message_bytes, "max_read_bytes": self.reply_copy_max}

    def _client_handshake(
        self, sock: socket.socket, peer: str, session: str, stream: str, timeout: float
    ) -> tuple[int | None, str | None, dict]:
        """Run the client side of one connection's handshake; returns the server's max_message_bytes, its instance and
        its HELLO_ACK."""
        sock.settimeout(timeout)
        end = deadline(timeout)  # for the whole handshake, not each recv
        nonce = os.urandom(32)
        hello = json.dumps(
            {
                "name": self.name,
                "peer": peer,
                "session": session,
                "stream": stream,
                "nonce": nonce.hex(),
                "auth": self.secret is not None,
                **self._limits_told(),
                "instance": self.instance,
            }
        ).encode()
        sock.sendall(pack_header(OP_HELLO, length=len(hello)) + hello)
        data = _recv_exact(sock, HEADER.size, deadline=end)
        theirs = _version_refusal(data)
        if theirs is not None:
            raise ProtocolError(
                f"{peer!r} at {sock.getpeername()[:2]} speaks protocol version {theirs} and this endpoint {VERSION}: "
                "unsupported (run the same transport/tcp.py on both ends)"
            )
        op, _, _, _, length, _, _ = unpack_header(data)
        if op != OP_HELLO_ACK or length > HANDSHAKE_MAX:
            raise ProtocolError(f"{peer!r} answered the handshake with op {op}")
        ack = json.loads(_recv_exact(sock, length, deadline=end))
        if not isinstance(ack, dict):
            raise ProtocolError(f"{peer!r} answered the handshake with a HELLO_ACK that is not a JSON object")
        if ack.get("error"):
            raise (_Busy if ack.get("busy") is True else TransportError)(
                f"{peer!r} refused the connection: {ack['error']}"
            )
        if ack.get("name") != peer:
            raise TransportError(f"endpoint at {sock.getpeername()} is {ack.get('name')!r}, expected {peer!r}")
        limit, instance = _peer_limit(ack, peer), _peer_instance(ack)
        if ack.get("auth"):
            if self.secret is None:
                raise TransportError(f"{peer!r} requires a shared secret; this endpoint has none")
            server_nonce = _hex_nonce(ack, f"the HELLO_ACK of {peer!r}")
            expect = _proof(self.secret, b"server", nonce, server_nonce, self.name, peer)
            got = str(ack.get("proof", "")).encode("utf-8", "replace")
            if not hmac.compare_digest(expect.encode(), got):  # (bytes: a non-ASCII str raised TypeError)
                raise TransportError(
                    f"{peer!r} failed to prove the shared secret (authentication failed: do the two endpoints' "
                    "secrets differ?)"
                )
            proof = _proof(self.secret, b"client", server_nonce, nonce, self.name, peer).encode()
            sock.sendall(pack_header(OP_AUTH, length=len(proof)) + proof)
            op, _, _, _, length, _, _ = unpack_header(_recv_exact(sock, HEADER.size, deadline=end))
            if op != OP_AUTH_OK:
                raise TransportError(f"{peer!r} rejected our proof of the shared secret")
            # (what the server tells only a client that proved the secret: its instance; to a probe, "sets")
            if length > HANDSHAKE_MAX:
                raise ProtocolError(f"{peer!r} answered our proof with an AUTH_OK of {length} bytes")
            told = json.loads(_recv_exact(sock, length, deadline=end)) if length else {}
            if not isinstance(told, dict):
                raise ProtocolError(f"{peer!r} answered our proof with an AUTH_OK that is not a JSON object")
            instance, ack = _peer_instance(told), {**ack, **told}
        elif self.secret is not None:
            raise TransportError(f"{peer!r} does not authenticate but this endpoint requires a shared secret")
        if stream == PROBE:
            return limit, instance, ack
        sock.settimeout(None)
        _set_sockopts(sock, stream)
        return limit, instance, ack

    def _accept_loop(self) -> None:
        spell = FailureSpell(ACCEPT_BACKOFF_MAX_S)
        while not self.closed:
            try:
                sock, addr = self._listener.accept()
            except OSError as e:
                if self.closed or self._stopping.is_set():
                    return  # the listener was closed
                # EMFILE / ENFILE / ENOBUFS / ECONNABORTED...: a passing condition, not the end of the endpoint. Said
                # once per spell of one cause (it was a line a second while the process was out of descriptors).
                if spell.failed(e.errno):
                    log.error(
                        "%s: accept failed: %s; still accepting: the connected peers are served on, new connections "
                        "wait in the listen backlog, accept is tried again every %.0f s at most (said once a spell)",
                        self.name, fd_shortage_text(e, "this process") or e, spell.most_s,
                    )  # fmt: skip
                else:
                    log.debug("%s: accept failed again (%s)", self.name, e)
                self._stopping.wait(spell.pause())
                continue
            ended = spell.ended()
            if ended is not None:
                log.warning("%s: accepting connections again (%d accepts failed over %.1f s)", self.name, *ended)
            # A flood of connections that never finish the handshake must not grow threads without bound, nor keep
            # legitimate peers out: one from another host holds at most MAX_PENDING_PER_ADDRESS slots; with all slots
            # taken, the next connection waits for one (a handshake step at most), so the others queue in the
            # listener's backlog in arrival order and a peer's turn comes however fast a flood reconnects (dropping
            # them instead let a flood's reconnects win nearly every freed slot).
            source = str(addr[0])
            try:
                local = source == sock.getsockname()[0]  # (this host connects from the address it connects to)
            except OSError:  # (reset already)
                sock.close()
                continue
            with self._lock:
                over = not local and self._pending_by_addr[source] >= self.max_pending_per_address
            if over:
                self._flood_log(
                    "%s: too many pending handshakes from %s (%d); dropping a connection",
                    self.name,
                    source,
                    self.max_pending_per_address,
                )
                _drop_busy(sock, f"too many pending handshakes from {source} (max_pending_handshakes / 2)")
                continue
            if not self._take_handshake_slot(addr):
                _drop_busy(sock, "too many pending handshakes (max_pending_handshakes)")
                continue
            t = threading.Thread(
                target=self._serve_handshake, args=(sock, addr), daemon=True, name=f"tcp-{self.name}-handshake"
            )
            with self._lock:
                if self.closed:  # (`close` joins every handshake thread it saw: start none after it looked)
                    self._handshakes.release()
                    sock.close()
                    return
                self._handshaking[t] = sock
                self._pending_by_addr[source] += 1
                try:
                    t.start()
                except RuntimeError as e:  # can't start new thread: drop this connection, keep accepting
                    self._handshaking.pop(t, None)
                    self._forget_source(source)
                    self._handshakes.release()
                    _drop_busy(sock, f"cannot start a handshake thread ({e})")
                    log.error("%s: dropping connection from %s: %s", self.name, addr, e)

    def _take_handshake_slot(self, addr: Any) -> bool:
        """A handshake slot for the connection from `addr`: at once, or within one handshake step (the slots of idle or
        trickling connections turn over by then); False (logged, at most once a second) if none came free."""
        if self._handshakes.acquire(blocking=False):
            return True
        self._flood_log(
            "%s: too many pending handshakes (all %d slots taken): a new connection waits up to %.1f s for one, then is "
            "dropped (this one from %s)",
            self.name,
            self.max_pending_handshakes,
            self._step_s,
            addr,
        )
        end = time.monotonic() + self._step_s
        while not self.closed:
            left = end - time.monotonic()
            if left <= 0:
                break
            if self._handshakes.acquire(timeout=min(0.1, left)):
                return True
        self._flood_log("%s: too many pending handshakes: dropping connection from %s", self.name, addr)
        return False

    def _forget_source(self, source: str) -> None:
        """One handshake from `source` ended (`_lock` held)."""
        self._pending_by_addr[source] -= 1
        if self._pending_by_addr[source] <= 0:
            del self._pending_by_addr[source]

    def _serve_handshake(self, sock: socket.socket, addr: Any) -> None:
        try:
            self._serve_handshake_inner(sock, addr)
        finally:
            with self._lock:
                self._handshaking.pop(threading.current_thread(), None)
                self._forget_source(str(addr[0]))
            self._handshakes.release()

    def _set_refusal(self, peer: str, session: str, instance: str | None) -> str | None:
        """Why a new connection set from `peer` is refused (too many live sets: each holds 4 threads), or None. (Sets
        half open hold no thread; the watchdog drops them after handshake_timeout_s.)"""
        with self._lock:
            if (peer, session) in self._half_open:  # the second stream of a set being opened
                return None
            live = sum(map(len, self._peers.values()))
            mine = sum(q.dead is None and q.instance == instance for q in self._peers.get(peer, ()))
        if live >= self.max_sets:
            return f"{self.name!r} holds {live} connection sets, its limit (max_sets)"
        if mine >= self.max_sets_per_peer:
            return f"{self.name!r} holds {mine} connection sets of {peer!r}, the limit (max_sets_per_peer)"
        return None

    def _serve_handshake_inner(self, sock: socket.socket, addr: Any) -> None:
        try:
            now = time.monotonic()
            end = now + self.handshake_timeout_s  # the whole handshake, however it is trickled
            step = min(end, now + self._step_s)  # the HELLO: a client sends it at once
            sock.settimeout(self._step_s)
            data = _recv_exact(sock, HEADER.size, deadline=step)
            theirs = _version_refusal(data)
            if theirs is not None:  # (told in our version: a version-4 client names both versions as well)
                why = f"unsupported protocol version {theirs} (this endpoint speaks {VERSION})"
                with contextlib.suppress(Exception):  # (its HELLO read first: closing on unread bytes resets the
                    length = HEADER.unpack(data)[6]  # connection, which can drop our answer before it is read)
                    if length <= HANDSHAKE_MAX:
                        _recv_exact(sock, length, deadline=step)
                self._reply(sock, OP_HELLO_ACK, {"error": why})
                raise ProtocolError(f"{why}: the peer runs another transport/tcp.py")
            op, _, _, _, length, _, _ = unpack_header(data)
            if op != OP_HELLO or length > HANDSHAKE_MAX:
                raise ProtocolError(f"expected HELLO of <= {HANDSHAKE_MAX} bytes, got op {op} length {length}")
            hello = json.loads(_recv_exact(sock, length, deadline=step))
            if not isinstance(hello, dict):
                raise ProtocolError("HELLO payload is not a JSON object")
            peer, session, stream = (str(_field(hello, k, "HELLO")) for k in ("name", "session", "stream"))
            if stream not in STREAMS and stream != PROBE:
                raise ProtocolError(f"unknown stream {stream!r}")
            limit, instance = _peer_limit(hello, peer), _peer_instance(hello)
            read_max = _peer_read_max(hello, peer)
            if hello.get("peer") != self.name:  # (not this endpoint's name: a client that knows none learns none)
                self._reply(sock, OP_HELLO_ACK, {"error": f"wrong endpoint: this is not {hello.get('peer')!r}"})
                raise ProtocolError(f"client expected endpoint {hello.get('peer')!r}")
            # Secret on one side only: the client would refuse after our HELLO_ACK and this log said only "connection
            # closed by peer". Refused here by name (a HELLO_ACK with "error", as for a wrong name: no new frame).
            # (`is False`/`is True`: a HELLO that does not say, a hand-driven peer's, goes on as before.)
            auth = hello.get("auth")
            if self.secret is not None and auth is False:
                why = f"{self.name!r} requires a shared secret and {peer!r} has none"
            elif self.secret is None and auth is True:
                why = f"{self.name!r} does not authenticate (it has no shared secret) and {peer!r} requires one"
            else:
                why = None
            if why is not None:
                self._reply(sock, OP_HELLO_ACK, {"error": why})
                raise ProtocolError(f"authentication failed: {why}")
            if stream != PROBE:
                why = self._set_refusal(peer, session, instance)
                if why is not None:
                    self._reply(sock, OP_HELLO_ACK, {"error": why})
                    raise ProtocolError(f"refused a connection set: {why}")
            # What only an authenticated client is told: this instance and, to a probe, whether this endpoint holds a
            # set of the asking instance (one it dropped looks live there). With a secret it comes with AUTH_OK.
            told: dict[str, Any] = {"instance": self.instance}
            if stream == PROBE:
                told["sets"] = self._holds_set(peer, instance)
            if self.secret is not None:
                client_nonce, nonce = _hex_nonce(hello, f"the HELLO of {peer!r}"), os.urandom(32)
                proof = _proof(self.secret, b"server", client_nonce, nonce, peer, self.name)
                self._reply(
                    sock,
                    OP_HELLO_ACK,
                    {
                        "name": self.name,
                        "auth": True,
                        "nonce": nonce.hex(),
                        "proof": proof,
                        **self._limits_told(),
                    },
                )
                step = min(end, time.monotonic() + self._step_s)  # the client's AUTH: one round trip away
                try:
                    op, _, _, _, length, _, _ = unpack_header(_recv_exact(sock, HEADER.size, deadline=step))
                except (_CleanEOF, ConnectionError) as e:  # (the client found our proof wrong and closed)
                    raise ProtocolError(
                        f"{peer!r} closed the connection during authentication (authentication failed: do the two "
                        "endpoints' secrets differ?)"
                    ) from e
                if op != OP_AUTH or length > HANDSHAKE_MAX:
                    raise ProtocolError(f"expected AUTH, got op {op}")
                got = _recv_exact(sock, length, deadline=step)
                expect = _proof(self.secret, b"client", nonce, client_nonce, peer, self.name)
                if not hmac.compare_digest(expect.encode(), got):  # (bytes: a non-ASCII str raised TypeError)
                    raise ProtocolError(
                        f"{peer!r} at {addr} failed to prove the shared secret (authentication failed: do the two "
                        "endpoints' secrets differ?)"
                    )
                data = json.dumps(told).encode()
                final = pack_header(OP_AUTH_OK, length=len(data)) + data
                if stream == PROBE:  # (a `connect` asking who is here now: nothing to add)
                    sock.sendall(final)
                    sock.close()
                    return
            else:
                final = None
                self_ack = {
                    "name": self.name,
                    "auth": False,
                    **self._limits_told(),
                    **told,
                }
                if stream == PROBE:
                    self._reply(sock, OP_HELLO_ACK, self_ack)
                    sock.close()
                    return
            sock.settimeout(None)
            _set_sockopts(sock, stream)
            # Complete the set before the last ack: the client sends data only after all its handshakes.
            key = (peer, session)
            with self._lock:
                _, socks = self._half_open.setdefault(key, (time.monotonic(), {}))
                if stream in socks:
                    raise ProtocolError(f"duplicate stream {stream!r} for session {session}")
                socks[stream] = sock
                complete = len(socks) == len(STREAMS)
                if complete:
                    del self._half_open[key]
            if complete:
                self._add_peer(peer, socks, limit, instance=instance, read_max=read_max)
            if final is not None:
                sock.sendall(final)
            else:
                self._reply(sock, OP_HELLO_ACK, self_ack)
        except BaseException as e:  # noqa: BLE001 - one bad client must not stop the server
            if not self.closed:
                self._reject_log("%s: rejected connection from %s: %s", self.name, addr, e)
            try:
                sock.close()
            except OSError:
                pass

    @staticmethod
    def _reply(sock: socket.socket, op: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        sock.sendall(pack_header(op, length=len(data)) + data)

    def _add_peer(
        self,
        name: str,
        socks: dict[str, socket.socket],
        limit: int | None = None,
        address: tuple | None = None,
        sockaddr: tuple | None = None,
        instance: str | None = None,
        read_max: int | None = None,
    ) -> None:
        """Add a connection set to `name`. The sets of another instance of that name (a process started again under
        it, after a crash that left its old connections silently open) are dropped at once, their pending transfers
        failed with `PeerLostError`: they were used until the watchdog or keepalive noticed, so every transfer in the
        meantime went to the dead process. (Two sets of one instance, both sides connecting at once, both stay.)"""
        p = _Peer(self, name)
        p.max_message, p.address, p.sockaddr, p.instance, p.max_read = limit, address, sockaddr, instance, read_max
        for stream, sock in socks.items():
            p.conns[stream] = _Conn(self, p, sock, stream)
        p.post = dict(p.conns)
        with self._lock:
            if self.closed:
                for s in socks.values():
                    s.close()
                raise TransportClosedError(f"endpoint {self.name!r} is closed")
            sets = self._peers.setdefault(name, [])
            stale = [q for q in sets if instance is not None and q.instance not in (None, instance)]
            sets.append(p)
            live = self._live.get(name)
            if live is None or live.dead is not None or live in stale:
                self._live[name] = p
            for c in p.conns.values():  # (under the lock: `close` joins the threads of every set it saw)
                c.start()
        for q in stale:
            log.warning("%s: %r connected again as a new instance; dropping its old connection set", self.name, name)
            self._fail_peer(
                q, PeerLostError(f"peer {name!r} restarted (a new instance connected); its old set is gone")
            )

    def _holds_set(self, name: str, instance: str | None) -> bool | None:
        """Whether a live set to `name` of that instance is here, or one is being connected (its server side is live
        there already); None: an instance not told."""
        if instance is None:
            return None
        with self._lock:
            return name in self._connecting or any(
                p.dead is None and p.instance == instance for p in self._peers.get(name, ())
            )

    def _live_peer(self, name: str) -> _Peer | None:
        with self._lock:
            for p in self._peers.get(name, ()):
                if p.dead is None:
                    return p
        return None

    def _get_peer(self, name: str) -> _Peer:
        self._check_open()
        p = self._live_peer(name)
        if p is None:
            raise PeerLostError(f"{self.name}: no live connection to {name!r} (connect first, or it died)")
        return p

    def peers(self) -> list[str]:
        with self._lock:
            return sorted(n for n, ps in self._peers.items() if any(p.dead is None for p in ps))

    def disconnect(self, peer: str) -> None:
        """`Transport.disconnect`: every connection set to `peer` is dropped at once (its pending transfers fail with
        `PeerLostError`, its sockets are closed: the peer's fail too) and their reader threads are joined (at most
        CLOSE_GRACE_S each: one busy in a hook or a done callback stops before its next frame, see `_read_loop`), so no
        frame of it lands here once this returned; so are the readers of its sets lost before (a reset, the watchdog)
        that may still be ending. Sets it has half opened (a handshake not complete) are dropped too; a later `connect`
        (either side) makes a fresh set."""
        if self._closed:
            return
        with self._lock:
            sets = list(self._peers.get(peer, ()))
            # (sets of it lost before, whose readers may still be ending: waited for too, so that "not in `peers()`,
            # then `disconnect`" also means nothing of it lands any more)
            retired = [c for c in self._retired if c.peer.name == peer]
            half = [k for k in self._half_open if k[0] == peer]
            dropped = [self._half_open.pop(k)[1] for k in half]
        for socks in dropped:
            for sock in socks.values():
                _cut(sock)
                sock.close()
        err = PeerLostError(f"{self.name}: disconnected from {peer!r}")
        for p in sets:
            self._fail_peer(p, err)
        me = threading.current_thread()  # (from a done callback on one of the set's readers: it stops at the fence)
        for c in [*retired, *(c for p in sets for c in p.conns.values())]:
            if c.reader is not me and c.reader.ident is not None:
                c.reader.join(CLOSE_GRACE_S)
                if c.reader.is_alive():
                    log.warning("%s: reader %s still busy after disconnect (fenced)", self.name, c.reader.name)

    def _fail_peer(self, peer: _Peer, err: BaseException, graceful: bool = False) -> None:
        """Declare `peer`'s connection set dead: fail its pending transfers and close its sockets.

        `graceful` (our own close): send FIN after what the kernel already holds and keep reading until the
        peer closes too, so nothing the peer has not read yet is destroyed by a reset (`_shutdown` cuts the
        connections after CLOSE_GRACE_S and joins the threads).
        """
        with peer.lock:
            if peer.dead is not None:
                return
            peer.dead = err
            pending, peer.pending = list(peer.pending.values()), {}
        with self._lock:
            # (`close` joins these too; the list keeps only connections whose threads have not ended yet)
            self._retired = [c for c in self._retired if c.reader.is_alive() or c.sender.is_alive()]
            self._retired.extend(peer.conns.values())
            lst = self._peers.get(peer.name, [])
            if peer in lst:
                lst.remove(peer)
            if not lst:
                self._peers.pop(peer.name, None)
            if self._live.get(peer.name) is peer:
                self._live.pop(peer.name)
                for other in lst:
                    if other.dead is None:
                        self._live[peer.name] = other
                        break
        for c in peer.conns.values():
            c.stop()
            try:
                c.sock.shutdown(socket.SHUT_WR if graceful else socket.SHUT_RDWR)
            except OSError:
                pass
            if not graceful:
                c.close_sock()
        for p in pending:
            if not p.done():
                with contextlib.suppress(InvalidStateError):  # raced with completion
                    p.set_exception(err)
        if self.on_peer_lost is not None:
            try:
                self.on_peer_lost(peer.name, err)
            except Exception:
                log.exception("%s: on_peer_lost hook failed", self.name)

    def _watchdog(self) -> None:
        # (the done callbacks of the transfers a dropped peer fails run here: one posting to a region not asked about
        # yet must not wait for the reply, which may never come: only this thread would drop that silent peer)
        _reader.conn = self
        period = max(0.05, min(1.0, self.timeout_s / 4))
        while not self._stopping.wait(period):
            now = time.monotonic()
            with self._lock:
                peers = [p for ps in self._peers.values() for p in ps]
                stale = [k for k, (t, _) in self._half_open.items() if now - t > self.handshake_timeout_s]
                dropped = [self._half_open.pop(k)[1] for k in stale]
            if dropped:  # (one line for them all: a flood of them made one each)
                log.error("%s: dropping half-open connection set(s) (missing streams): %d", self.name, len(dropped))
            for socks in dropped:
                for s in socks.values():
                    s.close()
            self._flood_log.flush()
            self._reject_log.flush()
            for p in peers:
                if not p.pending:
                    for c in p.conns.values():
                        c.busy_seen = None
                    continue
                if now - p.last_activity > self.timeout_s:
                    self._fail_peer(
                        p,
                        PeerLostError(
                            f"peer {p.name!r} made no progress for {self.timeout_s} s with {len(p.pending)} transfers pending"
                        ),
                    )
                    continue
                self._check_streams(p, now)

    def _check_streams(self, p: _Peer, now: float) -> None:
        """Progress per connection: a reply comes back on the connection of its request, so a connection with requests
        pending that received nothing for `timeout_s` fails the set even while the peer talks on the other one (its KV
        stream wedged, say by a network that drops one DSCP class, while control messages pass). Its clock starts when
        this thread first saw requests pending on it (at most one period late: no per-request cost on the hot path)."""
        waiting = collections.Counter(r.stream for r in list(p.pending.values()))
        for stream, c in p.conns.items():
            if not waiting[stream]:
                c.busy_seen = None
            elif c.busy_seen is None:
                c.busy_seen = now
            elif now - max(c.last_progress, c.busy_seen) > self.timeout_s:
                self._fail_peer(
                    p,
                    PeerLostError(
                        f"peer {p.name!r} made no progress on its {stream!r} connection for {self.timeout_s} s with "
                        f"{waiting[stream]} transfers pending there (it may still send on its other connection)"
                    ),
                )
                return

    # ---- regions ------------------------------------------------------------------------------------------
    def _region_for_frame(self, rid: int, offset: int, length: int, what: str) -> MemoryRegion:
        region = self._regions_by_id.get(rid)  # atomic dict lookup: no lock per frame
        if region is None:
            # (ids are kept across deregister/register: one we gave out names its region, deregistered since)
            name = next((n for n, i in list(self._region_ids.items()) if i == rid), None)
            if name is not None:
                raise ProtocolError(
                    f"{what} frame [{offset}, {offset + length}) for region {name!r} (id {rid}), which is not "
                    "registered (deregistered after the peer looked it up)"
                )
            raise ProtocolError(f"{what} frame for unknown region id {rid}")
        if offset + length > region.size:
            raise ProtocolError(
                f"{what} frame [{offset}, {offset + length}) is out of bounds of region {region.name!r} "
                f"({region.size} bytes)"
            )
        return region

    def remote_region(self, peer: str, name: str, timeout: float = 10.0) -> tuple[int, int]:
        """(region id, size) of the peer's region `name` (asked once, then cached). On a reader thread (a transfer's
        done callback, an `on_message` hook) only a cached region: that thread must not wait for the reply (the
        query is sent, so a later call finds it), but a transfer posted there waits for its region itself."""
        try:
            return self._remote_region_of(self._get_peer(peer), name, timeout)
        except _Defer:
            raise TransportError(
                f"{self.name}: region {name!r} of {peer!r} is not known yet, and a reader thread (a transfer's done "
                "callback, an on_message hook) must not wait for the reply: post the transfer (it waits for the "
                "region itself) or ask from another thread"
            ) from None

    def _remote_region_of(
        self, p: _Peer, name: str, timeout: float | None = None, refresh: bool = False
    ) -> tuple[int, int]:
        """`refresh`: ask again even if cached (a range outside the cached size: the peer may have registered the
        name again, larger). On a reader thread, instead of waiting for the reply, raises `_Defer` (the caller
        posts the transfer when the reply arrives, see `_defer`). `timeout` None (a transfer's query): wait until the
        reply comes or the watchdog drops the peer (`timeout_s` without progress), as for the transfer itself; a
        fixed 10 s raised a bare TimeoutError for a healthy peer whose reply sat behind a long paced frame."""
        info = None if refresh else p.remote_regions.get(name)  # a dict lookup is atomic; entries are only replaced
        if info is not None:
            return info
        peer = p.name
        if not isinstance(name, str):
            raise RegionError(f"peer {peer!r} has no region {name!r} (region names are strings)")
        try:
            data = name.encode()
        except UnicodeEncodeError:  # (`register` refuses such names: the peer cannot have one)
            raise RegionError(f"peer {peer!r} has no region {name!r} (not valid UTF-8)") from None
        if len(data) > REGION_NAME_MAX:
            raise RegionError(f"region name longer than {REGION_NAME_MAX} bytes")
        # The reply comes back on the query's connection, read by its reader thread. A reader thread (it posts from a
        # transfer's done callback or an `on_message` hook) never waits for it: it would wait for a reply only it can
        # read, or for another reader thread waiting in turn for it (across peers and endpoints too).
        fresh = getattr(_reader, "fresh", None)
        if fresh is not None and name in fresh:  # asked for this very transfer: the answer stands
            info = fresh[name]
            if info is None:
                raise RegionError(f"peer {peer!r} has no region {name!r}")
            return info
        if fresh is not None or getattr(_reader, "conn", None) is not None:
            raise _Defer(name, self._query(p, name, data))
        try:
            info = self._query(p, name, data).result(timeout)
        except TimeoutError:
            raise TimeoutError(
                f"{self.name}: {peer!r} did not answer the query for region {name!r} in {timeout} s"
            ) from None
        if info is None:
            raise RegionError(f"peer {peer!r} has no region {name!r}")
        with p.lock:
            p.remote_regions[name] = info
        return info

    def _query(self, p: _Peer, name: str, data: bytes) -> _Request:
        """The pending query for region `name` of `p` (one in flight per name); its reply is cached when it comes."""
        q = _request("query", 0)

        def cache(_: object) -> None:
            answered = not q.cancelled() and q.exception() is None
            with p.lock:
                if answered and q.result() is not None:
                    p.remote_regions[name] = q.result()
                elif answered:  # the peer has no such region (any more)
                    p.remote_regions.pop(name, None)
                if p.queries.get(name) is q:
                    del p.queries[name]

        q.add_done_callback(cache)  # first: callbacks that post the transfers waiting for it find the region
        with p.lock:
            asked = p.queries.setdefault(name, q)
        if asked is not q:
            return asked
        # (on the connection this thread does not read, so a reader thread may still wait for the transfer itself)
        conn = p.conns["low"] if getattr(_reader, "conn", None) is p.conns["high"] else p.conns["high"]
        q.stream = conn.stream
        req = next(self._req_ids)
        try:
            p.add(req, q)
        except BaseException:
            with p.lock:
                if p.queries.get(name) is q:
                    del p.queries[name]
            raise
        conn.enqueue(pack_header(OP_REGION_QUERY, length=len(data), req=req), memoryview(data))
        return q

    def _defer(self, p: _Peer, priority: str, defer: _Defer, call: Callable[[], Future]) -> Future:
        """The future of a transfer that `call` posts once `defer.query` is answered (see `_Deferral`): later posts
        to `p` in this class wait behind it, so it keeps its place in the posting order."""
        with p.defer_lock:
            d = p.post[priority]
            if type(d) is not _Deferral:
                d = p.post[priority] = _Deferral(p, priority)
            elif d.drainer is threading.current_thread():
                raise defer  # `drain` posting a deferred transfer that needs another region: it keeps its place
            outer = PostedFuture()  # (posted once the reply came, cancelled or not)
            d.items.append([defer, call, outer, {}])
        defer.query.add_done_callback(d.drain)
        return outer

    # ---- transfers --------------------------------------------------------------------------------------
    def _peer_for(self, name: str) -> _Peer:
        p = self._live.get(name)  # lock-free: a dict lookup is atomic
        if p is None or p.dead is not None or self._closed:
            p = self._get_peer(name)
        return p

    def write(
        self,
        peer: str,
        local_region: str,
        local_offset: int,
        remote_region: str,
        remote_offset: int,
        length: int,
        priority: str = "low",
        notify: int | None = None,
    ) -> Future:
        # The hot path of every transfer: checks first (nothing is recorded or sent for a bad write), then one
        # request record, one header, and the frame goes out from this thread when the connection is idle.
        if priority not in STREAMS:
            check_priority(priority)
        src = self._regions.get(local_region) or self.region(local_region)  # lock-free when registered
        if (
            type(local_offset) is not int
            or type(length) is not int
            or length < 0
            or not 0 <= local_offset <= src.size - length
        ):
            local_offset, length = src.check(local_offset, length, f"write from {self.name}:{local_region}")
        p = self._peer_for(peer)
        info = p.remote_regions.get(remote_region)
        if info is not None and type(remote_offset) is int and 0 <= remote_offset <= info[1] - length:
            rid = info[0]
        else:  # not asked yet, or a range to check closely
            try:
                rid, remote_offset = self._remote_range(p, remote_region, remote_offset, length, "write to")
            except _Defer as d:  # a reader thread and a region not known yet: posted when the peer answers
                args = (peer, local_region, local_offset, remote_region, remote_offset, length, priority, notify)
                return self._defer(p, priority, d, functools.partial(self.write, *args))
        if notify is None:
            flags = tag = 0
        else:
            flags, tag = FLAG_NOTIFY, notify if type(notify) is int else _as_int(notify, "notify tag", TypeError)
        req = next(self._req_ids)
        try:
            header = pack_header(OP_WRITE, flags, rid, remote_offset, length, tag, req)
        except struct.error:  # offsets and length are checked: only the tag can be out of range
            check_notify(tag)  # raises, naming it
            raise
        fut = _Request()
        fut.length, fut.stream = length, priority
        p.add(req, fut)
        view = src.view[local_offset : local_offset + length]
        p.post[priority].enqueue(header, view, priority=priority, queue=len(p.pending) > QUEUE_AFTER_PENDING)
        return fut

    def write_many(
        self,
        peer: str,
        entries: Sequence[WriteEntry],
        priority: str = "low",
        notify: int | None = None,
    ) -> Future:
        """One request for the whole batch: its frames go back to back on the class's connection (one vectored
        send when small and the connection is idle), all but the last flagged FLAG_CHAIN; the receiver
        acknowledges the batch once, after its last frame landed (frames land in order)."""
        check_priority(priority)
        self._check_open()
        entries = check_write_entries(entries, notify)
        if not entries:
            fut: Future = TransferFuture()
            fut.set_result(0)
            return fut
        p = self._peer_for(peer)
        regions, remote = self._regions, p.remote_regions
        items = []
        nbytes = 0
        for i, e in enumerate(entries):
            try:
                lr, lo, n, rr, ro = e
                src, (rid, size) = regions[lr], remote[rr]
                ok = type(lo) is int and type(n) is int and type(ro) is int
                ok = ok and n >= 0 and 0 <= lo <= src.size - n and 0 <= ro <= size - n
            except (TypeError, ValueError, KeyError):
                ok = False
            if not ok:  # the slow path: full checks, an error naming the entry (may ask the peer for a region)
                try:
                    lr, lo, n, rr, ro = self._check_write_entry(peer, i, e)
                except _Defer as d:  # a reader thread and a region not known yet: posted when the peer answers
                    return self._defer(
                        p, priority, d, functools.partial(self.write_many, peer, entries, priority, notify)
                    )
                src, (rid, _) = regions[lr], remote[rr]
            items.append((src.view[lo : lo + n], rid, ro, n))
            nbytes += n
        req = next(self._req_ids)
        last = len(items) - 1
        frames = [(pack_header(OP_WRITE, FLAG_CHAIN, rid, ro, n, 0, req), view) for view, rid, ro, n in items[:last]]
        view, rid, ro, n = items[last]
        flags = 0 if notify is None else FLAG_NOTIFY
        tag = 0 if notify is None else _as_int(notify, "notify tag", TypeError)
        frames.append((pack_header(OP_WRITE, flags, rid, ro, n, tag, req), view))
        fut = _request("write", nbytes, stream=priority)
        p.add(req, fut)  # recorded once every frame is packed: a bad batch leaves nothing pending
        p.post[priority].enqueue_batch(frames, nbytes, priority)
        return fut

    def _check_remote_range(self, peer: str, region: str, offset: int, length: int) -> None:
        """The peer's region sizes are known here (asked once per region name): check before posting."""
        self._remote_range(self._peer_for(peer), region, offset, length, "write to")

    def _remote_range(self, p: _Peer, region: str, offset: Any, length: int, what: str) -> tuple[int, int]:
        """(region id, offset as an int) of [offset, offset + length) in `p`'s region `region`, else RegionError.
        A range past the cached size asks the peer again first: it may have registered the name again, larger."""
        rid, size = p.remote_regions.get(region) or self._remote_region_of(p, region)
        if type(offset) is not int:
            offset = _as_offset(offset)  # numpy integers are fine; a bool is a RegionError
        if offset < 0 or offset + length > size:
            if offset >= 0:
                rid, size = self._remote_region_of(p, region, refresh=True)
            if offset < 0 or offset + length > size:
                raise RegionError(
                    f"{what} {p.name}:{region}: [{offset}, {offset + length}) is outside the region of {size} bytes"
                )
        return rid, offset

    def read(
        self,
        peer: str,
        local_region: str,
        local_offset: int,
        remote_region: str,
        remote_offset: int,
        length: int,
        priority: str = "low",
    ) -> Future:
        check_priority(priority)
        dst = self._regions.get(local_region) or self.region(local_region)
        local_offset, length = dst.check(local_offset, length, f"read into {self.name}:{local_region}")
        p = self._get_peer(peer)
        try:
            rid, remote_offset = self._remote_range(p, remote_region, remote_offset, length, "read from")
        except _Defer as d:  # a reader thread and a region not known yet: posted when the peer answers
            args = (peer, local_region, local_offset, remote_region, remote_offset, length, priority)
            return self._defer(p, priority, d, functools.partial(self.read, *args))
        view = dst.view[local_offset : local_offset + length]
        most = p.max_read or self.reply_copy_max  # (the peer serves READs of at most its max_read_bytes)
        if length > most:
            return self._read_in_parts(p, rid, remote_offset, view, priority, most)
        req = next(self._req_ids)
        header = pack_header(OP_READ, 0, rid, remote_offset, length, 0, req)
        fut = _request("read", length, view, priority)
        p.add(req, fut)
        p.post[priority].enqueue(header)
        return fut

    def _read_in_parts(self, p: _Peer, rid: int, offset: int, view: memoryview, priority: str, most: int) -> Future:
        """A read larger than the peer's max_read_bytes (`most`) as READs of at most that, back to back in one job (no
        frame between them: a later post lands after all of them, as after one READ). Its future completes with the
        whole length once every part did; the first part to fail fails it."""
        outer: Future = PostedFuture()
        parts, headers = [], []
        for k in range(0, view.nbytes, most):
            n = min(most, view.nbytes - k)
            req = next(self._req_ids)
            part = _request("read", n, view[k : k + n], priority)
            p.add(req, part)
            parts.append(part)
            headers.append(pack_header(OP_READ, 0, rid, offset + k, n, 0, req))
        left, lock = [len(parts)], threading.Lock()

        def one_done(part: Future) -> None:
            err = _error_of(part)
            with lock:
                left[0] -= 1
                last = not left[0]
            with contextlib.suppress(InvalidStateError):
                if err is not None:
                    outer.set_exception(err)
                elif last:
                    outer.set_result(view.nbytes)

        for part in parts:
            part.add_done_callback(one_done)
        # (one job: the first header, the others as its payload bytes; unpaced, as one READ header is)
        p.post[priority].enqueue(headers[0], memoryview(b"".join(headers[1:])))
        return outer

    def send(self, peer: str, payload: bytes, priority: str = "high") -> Future:
        """`Transport.send` on the connection of class `priority`: messages go on "high" (in send order per class;
        nothing is promised across classes). The RDMA backend asks its questions on "low", whose sender thread runs
        no application callback that could block them."""
        stream = check_priority(priority)
        data = memoryview(check_message(payload, self.max_message_bytes))
        p = self._get_peer(peer)
        if p.max_message is not None and data.nbytes > p.max_message:  # the peer would close the whole set
            raise TransportError(
                f"{self.name}: message of {data.nbytes} bytes exceeds the max_message_bytes={p.max_message} of "
                f"peer {peer!r} (it would close the connection set); this endpoint's is {self.max_message_bytes}"
            )
        fut: Future = PostedFuture()
        p.conns[stream].enqueue(pack_header(OP_MSG, length=data.nbytes), data, fut)
        return fut

    def _shutdown(self) -> None:
        """Stop every thread this endpoint started and join them (none is left when `close` returns): the accept
        loop and the watchdog at once, handshakes in progress by cutting their sockets, and each connection's
        threads once the peer closed its end too (graceful: FIN, then read until its EOF) or, at the latest,
        CLOSE_GRACE_S later, when the sockets are cut (a sender waiting for its pacer ends at once: `_check_set`);
        threads still running then (a reader inside a blocking `on_message` hook) get CLOSE_GRACE_S more in all, then
        are logged and left, so `close` returns within about 2 x CLOSE_GRACE_S whatever their number.
        (Until 2026-12-03 the watchdog ended up to 1 s after `close` and the connection threads whenever the peer
        closed; a silent peer's reader never ended.)"""
        self._stopping.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        me = threading.current_thread()  # (`close` from a hook on one of our threads must not join itself)
        for t in self._threads:
            if t is not me:
                t.join(CLOSE_GRACE_S)
        with self._lock:  # the accept loop is gone: no handshake starts any more
            peers = [p for ps in self._peers.values() for p in ps]
            half = list(self._half_open.values())
            self._half_open.clear()
            handshaking = list(self._handshaking.items())
        for _, socks in half:
            for s in socks.values():
                s.close()
        for _, sock in handshaking:  # wakes its blocked recv (a close alone would not)
            _cut(sock)
        for t, _ in handshaking:
            if t is not me:
                t.join(CLOSE_GRACE_S)
        with self._lock:  # (a handshake that completed meanwhile was refused: `_add_peer` saw the endpoint closed)
            peers += [p for ps in self._peers.values() for p in ps if p not in peers]
        err = TransportClosedError(f"endpoint {self.name!r} closed with the transfer pending")
        for p in peers:
            self._fail_peer(p, err, graceful=True)
        with self._lock:
            conns = list(dict.fromkeys([*self._retired, *(c for p in peers for c in p.conns.values())]))
            self._retired = []
        threads = [t for c in conns for t in (c.sender, c.reader) if t is not me and t.ident is not None]

        def join_all() -> None:  # one CLOSE_GRACE_S for them all (each had its own after the cut: N stuck, N s)
            deadline = time.monotonic() + CLOSE_GRACE_S
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))

        join_all()
        for c in conns:  # the peer did not close its end in time (or a send is stuck): cut the connection
            if c.reader.is_alive() or c.sender.is_alive():
                _cut(c.sock)
            c.close_sock()
        join_all()
        for t in threads:
            if t.is_alive():
                log.error("%s: thread %s did not stop after close", self.name, t.name)
