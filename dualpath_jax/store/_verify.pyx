# cython: language_level=3, boundscheck=False, wraparound=False
"""Verified Layer-Block reads in C for the KV store (local_dir.py; its Python loops are the fallback).

The store's default checksum is one XXH3-64 per Layer Block (block_file.py). These loops run with the GIL
released and hash each Layer Block while it is in the reader's cache:
- `pread_verified`: `pread` a chunk of whole Layer Blocks into the caller's buffer, then hash them there (the
  copy just put them in L2), chunk after chunk: one pass over DRAM, as a raw `preadv`, plus hashing from cache.
- `copy_verified`: from a read-only mapping of the block file, hash each Layer Block in the page cache, then
  copy it (now in cache) into the caller's buffer, so the buffer only ever receives checked bytes. Big reads
  copy with non-temporal stores (`_verify_c.h`: no read of the destination's lines first, so DRAM carries the
  bytes once each way, where a kernel `preadv` copy also reads the destination).
Both report the bad Layer Blocks by layer index, like the Python loops (see `LocalDirStore._check_chunk`).
Their destination may be row-strided (`dst_stride`): Layer Block j goes to dst[j * dst_stride:][:lbn], e.g.
one block's rows of a layer-major [L, tokens, bytes] buffer, so no staging copy is needed.
"""

from libc.errno cimport EINTR, errno
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcpy
from posix.types cimport off_t
from posix.uio cimport iovec, preadv
from posix.unistd cimport pread

cdef enum:
    MAX_IOV = 256  # iovecs per preadv of a row-strided chunk (IOV_MAX is 1024 on Linux)

cdef extern from "_verify_c.h" nogil:
    uint64_t dp_xxh3(const void* p, size_t n)
    void dp_copy_nt(uint8_t* d, const uint8_t* s, size_t n)
    void dp_copy_done()


def xxh3_64(const uint8_t[::1] buf) -> int:
    """XXH3-64 of `buf` (the same value as `xxhash.xxh3_64_intdigest`)."""
    cdef uint64_t h
    with nogil:
        h = dp_xxh3(&buf[0] if buf.shape[0] else NULL, <size_t>buf.shape[0])
    return h


cdef list _bad_layers(
    const uint8_t* p, Py_ssize_t n, Py_ssize_t lbn, const uint64_t[::1] sums, Py_ssize_t first, Py_ssize_t stride
):
    """Layers (first, first+1, ...) of the n Layer Blocks at p (every `stride` bytes) whose hash is not their
    stored sum."""
    cdef Py_ssize_t j
    return [first + j for j in range(n) if dp_xxh3(p + j * stride, <size_t>lbn) != sums[first + j]]


cdef Py_ssize_t _stride_of(Py_ssize_t dst_stride, Py_ssize_t lbn) except -1:
    if dst_stride == 0:
        return lbn
    if dst_stride < lbn:
        raise ValueError(f"dst_stride ({dst_stride}) must be 0 (packed) or at least a Layer Block ({lbn} B)")
    return dst_stride


cdef _check_dst(Py_ssize_t have, Py_ssize_t blocks, Py_ssize_t lbn, Py_ssize_t stride, str what):
    """A destination of `blocks` Layer Blocks every `stride` bytes spans (blocks - 1) * stride + lbn bytes."""
    cdef Py_ssize_t need = 0 if blocks == 0 else (blocks - 1) * stride + lbn
    if have != need:
        raise ValueError(f"{what} ({have} B) must span {blocks} Layer Blocks of {lbn} B every {stride} B ({need} B)")


cdef _check_span(Py_ssize_t n, Py_ssize_t lbn, const uint64_t[::1] sums, Py_ssize_t first, str what):
    if lbn <= 0 or n % lbn:
        raise ValueError(f"{what} ({n} B) must hold whole Layer Blocks of {lbn} B")
    if first < 0 or first + n // lbn > sums.shape[0]:
        raise ValueError(f"layers {first}..{first + n // lbn - 1} are beyond the {sums.shape[0]} checksums")


def bad_layers(
    const uint8_t[::1] buf, Py_ssize_t lbn, const uint64_t[::1] sums, Py_ssize_t first, Py_ssize_t n_blocks=-1,
    Py_ssize_t stride=0,
) -> list:
    """The layers of the Layer Blocks in `buf` (layers first, first+1, ...; packed, or every `stride` bytes
    with `n_blocks` of them) whose XXH3-64 is not `sums[layer]`; [] when all match."""
    cdef Py_ssize_t n = buf.shape[0], j, bad = -1, blocks
    stride = _stride_of(stride, lbn)
    if n_blocks < 0:
        if stride != lbn and n:
            raise ValueError("a strided buf needs n_blocks")
        _check_span(n, lbn, sums, first, "buf")
        blocks = n // lbn
    else:
        blocks = n_blocks
        _check_dst(n, blocks, lbn, stride, "buf")
        _check_span(blocks * lbn, lbn, sums, first, "buf")
    if blocks == 0:
        return []
    cdef const uint8_t* p = &buf[0]
    with nogil:
        for j in range(blocks):
            if dp_xxh3(p + j * stride, <size_t>lbn) != sums[first + j]:
                bad = j
                break
    return [] if bad < 0 else _bad_layers(p + bad * stride, blocks - bad, lbn, sums, first + bad, stride)


cdef Py_ssize_t _pread_rows(
    int fd, uint8_t* base, Py_ssize_t stride, Py_ssize_t lbn, long long file_off, Py_ssize_t pos, Py_ssize_t end,
    int* err,
) noexcept nogil:
    """pread file bytes [pos, end) (counted from `file_off`, whole Layer Blocks apart) into rows of `lbn` bytes
    every `stride` bytes of `base`: one preadv per call normally; returns the bytes read (short at the end of
    the file); `err` set on an I/O error."""
    cdef iovec iov[MAX_IOV]
    cdef Py_ssize_t k = pos, row, col, cnt, got, q
    while k < end:
        cnt = 0
        q = k
        while q < end and cnt < MAX_IOV:
            row = q // lbn
            col = q - row * lbn
            iov[cnt].iov_base = base + row * stride + col
            iov[cnt].iov_len = <size_t>min(lbn - col, end - q)
            q += <Py_ssize_t>iov[cnt].iov_len
            cnt += 1
        got = preadv(fd, iov, <int>cnt, <off_t>(file_off + k))
        if got < 0:
            if errno == EINTR:
                continue
            err[0] = errno
            break
        if got == 0:
            break
        k += got
    return k - pos


def pread_verified(
    int fd, uint8_t[::1] dst, long long file_off, Py_ssize_t lbn, const uint64_t[::1] sums, Py_ssize_t first,
    Py_ssize_t chunk_bytes, Py_ssize_t n_blocks=-1, Py_ssize_t dst_stride=0,
):
    """Read whole Layer Blocks of `lbn` bytes (layers first, first+1, ...) from `fd` at `file_off` into `dst`,
    in chunks of `chunk_bytes` rounded down to whole Layer Blocks (at least one), each chunk hashed right
    after its read and compared with `sums[layer]`. `dst` is packed (all of it is read), or with `dst_stride`
    it holds `n_blocks` rows every `dst_stride` bytes (one `preadv` of the chunk's rows).

    Returns (file bytes read, bad layers): (all of them, []) when all matched; the bad layers of the first
    chunk with a mismatch (the read stops there; the bytes before that chunk); fewer bytes with [] when the
    file ended first (a truncated block). Raises OSError on an I/O error.
    """
    cdef Py_ssize_t n, done = 0, want, got, k, j, per, bad_at = -1, bad_n = 0, stride
    cdef int err = 0
    stride = _stride_of(dst_stride, lbn)
    if n_blocks < 0:
        if stride != lbn and dst.shape[0]:
            raise ValueError("a strided dst needs n_blocks")
        n = dst.shape[0]
        _check_span(n, lbn, sums, first, "dst")
    else:
        _check_dst(dst.shape[0], n_blocks, lbn, stride, "dst")
        n = n_blocks * lbn
        _check_span(n, lbn, sums, first, "dst")
    per = max(1, chunk_bytes // lbn) * lbn
    cdef uint8_t* base = &dst[0] if dst.shape[0] else NULL
    with nogil:
        while done < n:
            want = min(per, n - done)
            k = 0
            if stride == lbn:
                while k < want:  # a regular file's pread is short only at its end (or on a signal)
                    got = pread(fd, base + done + k, <size_t>(want - k), <off_t>(file_off + done + k))
                    if got < 0:
                        if errno == EINTR:
                            continue
                        err = errno
                        break
                    if got == 0:
                        break
                    k += got
            else:
                k = _pread_rows(fd, base, stride, lbn, file_off, done, done + want, &err)
            if err or k < want:
                done += k
                break
            for j in range(want // lbn):
                if dp_xxh3(base + (done // lbn + j) * stride, <size_t>lbn) != sums[first + done // lbn + j]:
                    bad_at = done
                    bad_n = want // lbn
                    break
            if bad_at >= 0:
                break
            done += want
    if err:
        raise OSError(err, f"pread of a block file at offset {file_off + done}")
    if bad_at >= 0:
        return bad_at, _bad_layers(base + (bad_at // lbn) * stride, bad_n, lbn, sums, first + bad_at // lbn, stride)
    return done, []


def copy_verified(
    const uint8_t[::1] src, uint8_t[::1] dst, Py_ssize_t lbn, const uint64_t[::1] sums, Py_ssize_t first,
    bint nontemporal=True, Py_ssize_t dst_stride=0,
):
    """Hash each Layer Block of `src` (whole Layer Blocks of `lbn` bytes: layers first, first+1, ...) and copy
    it into `dst` (the same size; or, with `dst_stride`, rows every `dst_stride` bytes) only if it matches
    `sums[layer]`; stops at the first bad one.

    Returns [] when all matched and were copied, else [the bad layer] (the blocks before it are copied, it and
    those after it are not). `nontemporal`: copy with non-temporal stores (fenced before returning), which leave
    `dst` out of the cache; else memcpy (better for a small destination that is reused while still in cache).
    """
    cdef Py_ssize_t n = src.shape[0], j, bad = -1, stride
    stride = _stride_of(dst_stride, lbn)
    _check_span(n, lbn, sums, first, "src")
    if stride == lbn:
        if dst.shape[0] != n:
            raise ValueError(f"src ({n} B) and dst ({dst.shape[0]} B) differ in size")
    else:
        _check_dst(dst.shape[0], n // lbn, lbn, stride, "dst")
    if n == 0:
        return []
    cdef const uint8_t* s = &src[0]
    cdef uint8_t* d = &dst[0]
    with nogil:
        for j in range(n // lbn):
            if dp_xxh3(s + j * lbn, <size_t>lbn) != sums[first + j]:
                bad = j
                break
            if nontemporal:
                dp_copy_nt(d + j * stride, s + j * lbn, <size_t>lbn)
            else:
                memcpy(d + j * stride, s + j * lbn, <size_t>lbn)
        if nontemporal:
            dp_copy_done()
    return [] if bad < 0 else [first + bad]
