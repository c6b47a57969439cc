# cython: language_level=3, boundscheck=False, wraparound=False
"""The TCP transport's receive path in C (the Python twin: `transport.tcp._BufferedReceiver` and the write branch of
`_Conn._read_loop`).

`Receiver` is `_BufferedReceiver` in C: frames come in through a 256 KiB buffer (a small frame costs one recv), large
payloads go straight to their destination (one recvmsg with the next frame's header), a header is checked in place,
and the system calls run with the GIL released. `land_writes` also runs the read loop's hot case in C: it lands
plain write frames (OP_WRITE without FLAG_NOTIFY, into a registered region, within its bounds, in a consistent
write_many chain) one after the other, holding their acknowledgements as the Python loop does, and returns the header
fields of the first frame it leaves to the Python loop (any other op, a notifying write, a write the loop must refuse):
the loop then handles that frame exactly as it would have. So the protocol, its checks and its errors stay in one
place (tcp.py); only the per-frame interpreter work of a stream of writes is gone (on loopback, 2 vCPUs, ~half of a
receiving thread's CPU per 64 KiB write was the interpreter's).

`configure` takes the protocol's constants and exceptions from tcp.py once (one source of truth). The header checksum
is zlib's CRC-32 (the same polynomial, reflected, init and final xor), computed here from a table so the build needs
no zlib headers.
"""

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_CheckSignals
from libc.errno cimport EAGAIN, EBADF, EINTR, errno
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, strerror


cdef extern from "<sys/types.h>" nogil:
    ctypedef long ssize_t

cdef extern from "<errno.h>" nogil:
    int EWOULDBLOCK


cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len

cdef extern from "<sys/socket.h>" nogil:
    struct msghdr:
        void *msg_name
        unsigned int msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t recvmsg(int fd, msghdr *msg, int flags)
    int MSG_DONTWAIT


DEF HEADER_SIZE = 48
DEF BODY_SIZE = 44

cdef uint32_t _CRC_TABLE[256]
cdef bint _OPS[256]
cdef bytes _MAGIC = b""
cdef int _VERSION = -1
cdef int _OP_WRITE = -1
cdef int _FLAG_NOTIFY = 0
cdef int _FLAG_CHAIN = 0
cdef int _FLAG_MORE = 0
cdef int _ACK_FRAMES = 0
cdef Py_ssize_t _SIZE = 0
cdef Py_ssize_t _DIRECT = 0
cdef Py_ssize_t _DIRECT_CHUNK = 0
cdef object _check_header = None
cdef object _CleanEOF = None
cdef object _PeerLostError = None
cdef bint _configured = False


cdef void _make_crc_table():
    cdef uint32_t c
    cdef int n, k
    for n in range(256):
        c = <uint32_t>n
        for k in range(8):
            c = (0xEDB88320u ^ (c >> 1)) if (c & 1) else (c >> 1)
        _CRC_TABLE[n] = c


_make_crc_table()


cdef inline uint32_t _crc32(const uint8_t *p, Py_ssize_t n) noexcept nogil:
    cdef uint32_t c = 0xFFFFFFFFu
    cdef Py_ssize_t i
    for i in range(n):
        c = _CRC_TABLE[(c ^ p[i]) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFFu


def crc32(data) -> int:
    """zlib.crc32 of `data` (bytes-like), computed by this module's table (tested against zlib)."""
    cdef const uint8_t[::1] v = data
    return _crc32(&v[0], v.shape[0]) if v.shape[0] else 0


cdef int _raise_errno(int err) except -1:
    """OSError for `err` (the subclass the errno maps to, e.g. ConnectionResetError), as the socket module raises."""
    raise OSError(err, strerror(err).decode("utf-8", "replace"))


cdef inline uint32_t _be32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | <uint32_t>p[3]


cdef inline uint64_t _be64(const uint8_t *p) noexcept nogil:
    return (<uint64_t>_be32(p) << 32) | <uint64_t>_be32(p + 4)


cdef inline void _put_be64(uint8_t *p, uint64_t v) noexcept nogil:
    cdef int i
    for i in range(8):
        p[7 - i] = <uint8_t>(v & 0xFF)
        v >>= 8


def configure(*, magic, version, ops, op_write, flag_notify, flag_chain, flag_more, ack_frames, size, direct,
              direct_chunk, check_header, clean_eof, peer_lost_error) -> None:
    """The protocol's constants and exceptions, from `transport.tcp` (called once, at its import)."""
    global _MAGIC, _VERSION, _OP_WRITE, _FLAG_NOTIFY, _FLAG_CHAIN, _FLAG_MORE, _ACK_FRAMES, _SIZE, _DIRECT
    global _DIRECT_CHUNK, _check_header, _CleanEOF, _PeerLostError, _configured
    if len(magic) != 4:
        raise ValueError(f"magic must be 4 bytes, got {magic!r}")
    if not 0 < direct <= size:
        raise ValueError(f"direct ({direct}) must be in (0, size={size}]")
    _MAGIC, _VERSION, _OP_WRITE = bytes(magic), version, op_write
    _FLAG_NOTIFY, _FLAG_CHAIN, _FLAG_MORE, _ACK_FRAMES = flag_notify, flag_chain, flag_more, ack_frames
    _SIZE, _DIRECT, _DIRECT_CHUNK = size, direct, direct_chunk
    _check_header, _CleanEOF, _PeerLostError = check_header, clean_eof, peer_lost_error
    cdef int i
    for i in range(256):
        _OPS[i] = i in ops
    _configured = True


cdef class Receiver:
    """`transport.tcp._BufferedReceiver` in C (same attributes and methods, same errors), plus `land_writes`.

    `sock` must be a blocking socket (no timeout): its descriptor is read anew before every system call, so a socket
    closed meanwhile gives EBADF, as the socket module's own calls do. `on_progress()` runs after every recv that
    got bytes; `idle()` sends the held acknowledgements (`acks`, a bytearray of (request id, length) records; `held`
    counts the write frames landed since the last acknowledgement frame; the caller's `idle` resets both).
    """

    cdef readonly object sock
    cdef public object on_progress, idle
    cdef public bytearray acks
    cdef public Py_ssize_t held
    cdef public int more  # the frame being received carried FLAG_MORE: its successor is coming
    cdef public bint exact  # after a large payload: refill only the bytes asked for (the next header)
    cdef public Py_ssize_t start, end
    cdef readonly bytearray buf
    cdef readonly object view
    cdef bytearray _hdr
    cdef object _fileno
    cdef bint _chaining
    cdef uint64_t _chain_req
    cdef public uint64_t chain_bytes

    SIZE = property(lambda self: _SIZE)
    DIRECT = property(lambda self: _DIRECT)

    def __init__(self, sock, on_progress, idle=None, acks=None):
        if not _configured:
            raise RuntimeError("transport._tcprx.configure was not called")
        if sock.gettimeout() is not None:
            raise ValueError("the C receiver needs a blocking socket (timeout None)")
        self.sock, self.on_progress, self.idle = sock, on_progress, idle
        self.acks = acks if acks is not None else bytearray()
        self.held = 0
        self.more = 0
        self.exact = False
        self.start = self.end = 0
        self.buf = bytearray(_SIZE)
        self.view = memoryview(self.buf)
        self._hdr = bytearray(HEADER_SIZE)
        self._fileno = sock.fileno
        self._chaining = False
        self._chain_req = 0
        self.chain_bytes = 0

    @property
    def chain_req(self):
        """The request id of the write_many batch being received (its FLAG_CHAIN frames so far), or None."""
        return self._chain_req if self._chaining else None

    @chain_req.setter
    def chain_req(self, value):
        if value is None:
            self._chaining = False
            self._chain_req = 0
        else:
            self._chaining = True
            self._chain_req = value

    # ---- system calls (GIL released) ------------------------------------------------------------------------
    cdef int _fd(self) except -1:
        cdef int fd = self._fileno()
        if fd < 0:  # closed meanwhile
            _raise_errno(EBADF)
        return fd

    cdef bint _try_first(self):
        return PyByteArray_GET_SIZE(self.acks) > 0 and not self.more

    cdef Py_ssize_t _recv(self, char *dst, Py_ssize_t n) except -1:
        """recv up to `n` bytes into `dst`; while acknowledgements are held, a drained socket first runs `idle()`."""
        cdef ssize_t got
        cdef int fd, err
        if self._try_first():
            fd = self._fd()
            with nogil:
                got = recv(fd, dst, n, MSG_DONTWAIT)
                err = errno
            if got >= 0:
                return got
            if err != EAGAIN and err != EWOULDBLOCK and err != EINTR:
                _raise_errno(err)
            self.idle()
        while True:
            fd = self._fd()
            with nogil:
                got = recv(fd, dst, n, 0)
                err = errno
            if got >= 0:
                return got
            if err != EINTR:
                _raise_errno(err)
            PyErr_CheckSignals()  # (raises what a signal handler raised, as the socket module's calls do)

    cdef Py_ssize_t _recv_with_header(self, char *dst, Py_ssize_t n) except -1:
        """recv into `dst` (`n` bytes at most) and, in the same call, the next frame's header into the (empty)
        buffer if it is already there; returns the bytes that went to `dst`."""
        cdef iovec iov[2]
        cdef msghdr msg
        cdef ssize_t got
        cdef int fd, err, flags
        cdef bint first = self._try_first()
        iov[0].iov_base = dst
        iov[0].iov_len = n
        iov[1].iov_base = PyByteArray_AS_STRING(self.buf)
        iov[1].iov_len = HEADER_SIZE
        msg.msg_name = NULL
        msg.msg_namelen = 0
        msg.msg_iov = iov
        msg.msg_iovlen = 2
        msg.msg_control = NULL
        msg.msg_controllen = 0
        msg.msg_flags = 0
        while True:
            flags = MSG_DONTWAIT if first else 0
            fd = self._fd()
            with nogil:
                got = recvmsg(fd, &msg, flags)
                err = errno
            if got >= 0:
                break
            if first and (err == EAGAIN or err == EWOULDBLOCK or err == EINTR):
                first = False
                self.idle()
                continue
            if err != EINTR:
                _raise_errno(err)
            PyErr_CheckSignals()  # (raises what a signal handler raised, as the socket module's calls do)
        if got > n:
            self.start, self.end = 0, got - n
            return n
        return got

    # ---- reading frames -----------------------------------------------------------------------------------------
    cdef int _fill(self, char *dst, Py_ssize_t n, bint frame_start) except -1:
        """`read_into` on a raw destination of `n` bytes."""
        cdef char *bufp = PyByteArray_AS_STRING(self.buf)
        cdef Py_ssize_t take = min(n, self.end - self.start)
        cdef Py_ssize_t pos, got
        if take:
            memcpy(dst, bufp + self.start, take)
            self.start += take
        pos = take
        while pos < n:
            if n - pos >= _DIRECT:
                if n - pos <= _DIRECT_CHUNK:  # the rest of the payload, and the next header if it is there
                    got = self._recv_with_header(dst + pos, n - pos)
                else:
                    got = self._recv(dst + pos, _DIRECT_CHUNK)
                if got == 0:
                    raise _PeerLostError(f"connection closed by peer after {pos} of {n} bytes of a frame")
                pos += got
            else:
                self.start = self.end = 0
                got = self._recv(bufp, n - pos if self.exact else _SIZE)
                if got == 0:
                    if pos == 0 and frame_start:
                        raise _CleanEOF("connection closed by peer")
                    raise _PeerLostError(f"connection closed by peer after {pos} of {n} bytes of a frame")
                self.end = got
                take = min(n - pos, got)
                memcpy(dst + pos, bufp, take)
                self.start = take
                pos += take
            self.on_progress()
        return 0

    cdef const uint8_t *_next_header(self) except NULL:
        """The next frame's 48 header bytes (in the buffer, or copied to `_hdr`), consumed; not checked yet."""
        cdef Py_ssize_t s = self.start
        cdef char *h
        if self.end - s >= HEADER_SIZE:
            self.start = s + HEADER_SIZE
            return <const uint8_t *>PyByteArray_AS_STRING(self.buf) + s
        h = PyByteArray_AS_STRING(self._hdr)
        self._fill(h, HEADER_SIZE, True)
        return <const uint8_t *>h

    cdef tuple _fields(self, const uint8_t *h):
        return (
            PyBytes_FromStringAndSize(<const char *>h, 4), h[4], h[5], h[6], _be32(h + 8), _be64(h + 12),
            _be64(h + 20), <int64_t>_be64(h + 28), _be64(h + 36), _be32(h + 44),
        )

    cdef bint _valid(self, const uint8_t *h) noexcept:
        return (
            memcmp(h, <const char *>_MAGIC, 4) == 0
            and h[4] == _VERSION
            and _OPS[h[5]]
            and _crc32(h, BODY_SIZE) == _be32(h + 44)
        )

    cdef tuple _checked(self, const uint8_t *h):
        """The header's fields; ProtocolError (by tcp's `_check_header`) when it is malformed."""
        cdef tuple fields = self._fields(h)
        if not self._valid(h):
            _check_header(fields, PyBytes_FromStringAndSize(<const char *>h, BODY_SIZE))
        return fields

    def header(self) -> tuple:
        """The next frame's header fields (magic, version, op, flags, region, offset, length, tag, req, crc),
        checked (ProtocolError); `_CleanEOF` if the peer closed at a frame boundary."""
        return self._checked(self._next_header())

    def read_into(self, dst, frame_start=False) -> None:
        cdef Py_buffer pb
        PyObject_GetBuffer(dst, &pb, PyBUF_WRITABLE)
        try:
            self._fill(<char *>pb.buf, pb.len, frame_start)
        finally:
            PyBuffer_Release(&pb)

    def read(self, Py_ssize_t n) -> bytes:
        cdef Py_ssize_t s = self.start
        if self.end - s >= n:  # all in the buffer already
            self.start = s + n
            return PyBytes_FromStringAndSize(PyByteArray_AS_STRING(self.buf) + s, n)
        out = bytearray(n)
        self._fill(PyByteArray_AS_STRING(out), n, False)
        return bytes(out)

    # ---- the read loop's hot case ---------------------------------------------------------------------------------
    cdef int _hold_ack(self, uint64_t req, uint64_t length) except -1:
        cdef Py_ssize_t k = PyByteArray_GET_SIZE(self.acks)
        PyByteArray_Resize(self.acks, k + 16)
        cdef uint8_t *p = <uint8_t *>PyByteArray_AS_STRING(self.acks) + k
        _put_be64(p, req)
        _put_be64(p + 8, length)
        return 0

    def land_writes(self, regions, peer, owner):
        """Land plain write frames while they come (see the module docstring): each goes into its region, its
        acknowledgement is held (sent at ACK_FRAMES frames, or by `idle()` when the socket drains), and a write_many
        batch is acknowledged once with its total. Returns the checked header fields of the first frame it does not
        land itself (header consumed, payload not), or None once `peer.dead` is set and `owner._closed` is not (the
        fence of `disconnect`: the caller's loop then stops). ProtocolError / PeerLostError / OSError as `header`."""
        cdef const uint8_t *h
        cdef int flags
        cdef uint64_t offset, length, req, size
        cdef object region, rid
        cdef Py_buffer pb
        while True:
            if peer.dead is not None and not owner._closed:
                return None
            h = self._next_header()
            if not self._valid(h) or h[5] != _OP_WRITE:
                return self._checked(h)
            flags = h[6]
            req = _be64(h + 36)
            if flags & _FLAG_NOTIFY or (self._chaining and req != self._chain_req):
                return self._fields(h)
            rid = _be32(h + 8)
            region = regions.get(rid)  # (an atomic dict lookup, as in the Python loop: no lock per frame)
            offset, length = _be64(h + 12), _be64(h + 20)
            if region is None:
                return self._fields(h)
            size = region.size
            if length > size or offset > size - length:
                return self._fields(h)
            self.more = flags & _FLAG_MORE
            PyObject_GetBuffer(region.view, &pb, PyBUF_WRITABLE)  # (`size` is the view's nbytes)
            try:
                if self.end - self.start >= <Py_ssize_t>length:  # the whole payload is in the buffer: one copy
                    memcpy(<char *>pb.buf + offset, PyByteArray_AS_STRING(self.buf) + self.start, length)
                    self.start += length
                else:
                    self._fill(<char *>pb.buf + offset, length, False)
            finally:
                PyBuffer_Release(&pb)
            self.exact = length >= <uint64_t>_DIRECT
            self.held += 1
            if flags & _FLAG_CHAIN:  # a write_many frame before its last: acknowledged with the last one
                if not self._chaining:
                    self._chaining, self._chain_req = True, req
                self.chain_bytes += length
                continue
            if self._chaining:  # the last frame of a write_many: one ack for the whole batch
                length += self.chain_bytes
                self._chaining, self._chain_req, self.chain_bytes = False, 0, 0
            self._hold_ack(req, length)
            if self.held >= _ACK_FRAMES:
                self.idle()
