"""On-disk format of one stored Full Block, and the per-Layer-Block checksums (no jax).

A block file is a header padded to a multiple of 4 KiB (so the payload is page-aligned, as direct I/O and
distributed file systems like) followed by the payload, the Full Block `[layers, tokens, bytes]` layer-major.

Header (little-endian):
    magic "DPKVBLK1" | format_version u32 | header_nbytes u32 | checksum_algo u32 | num_layers u32 |
    block_tokens u32 | bytes_per_token_per_layer u32 | payload_nbytes u64 | key_len u32 | key 32s |
    fingerprint digest 16s | per-Layer-Block checksums u64 x num_layers | header crc32 u32 | zero padding

Checksums (one u64 per Layer Block, so a layer read verifies only what it read; the algo id is in each header, so
a store reads blocks of every algo below whatever it writes):
- "xxh3" (id 3, the default of new blocks): XXH3-64 (seed 0) of the Layer Block's bytes, from the `xxhash`
  package. ~50-60 GB/s per core on cache-resident data here (~2x "wsum64", ~10x crc32) and a well-studied
  non-cryptographic hash: any damage passes with probability ~2**-64. Not a defence against an adversary.
- "wsum64" (id 1, the default before xxh3): sum_i w_i * x_i mod 2**64 over the Layer Block's little-endian u64 words x_i, with fixed
  pseudo-random odd weights w_i (a multilinear hash with a fixed key). Any change of a single word is
  always detected (odd weights are invertible mod 2**64) and so is any swap of two different words;
  unstructured damage passes with probability ~2**-64. It is not a defence against an adversary (the store
  trusts its writers). ~12-35 GB/s per core with NumPy einsum here.
- "crc32" (id 2): zlib.crc32 of the Layer Block (~3-6 GB/s, standard).
Adding an algo keeps FORMAT_VERSION (the header layout is unchanged). A reader never trusts a block of an algo id
it does not know, nor one of a newer format version (NEWER_FORMAT_VERSIONS; a version further off is damage):
parse_header raises BlockOfNewerFormat, and the store takes it as a miss that leaves the file (a newer dualpath-jax
on the same mount wrote it: not damage, unlike every other BlockFormatError, whose block is removed); a write of
that key may replace it.
"""

from __future__ import annotations

import functools
import hashlib
import struct
import zlib

import numpy as np
import xxhash

from dualpath_jax.kv_layout import BlockLayout

MAGIC = b"DPKVBLK1"
FORMAT_VERSION = 1
# Versions a newer dualpath-jax may write (a block of one is left, not removed); one further off is damage (a header
# byte overwritten: 0xff made version 255).
NEWER_FORMAT_VERSIONS = range(FORMAT_VERSION + 1, FORMAT_VERSION + 17)
HEADER_ALIGN = 4096
MAX_KEY_NBYTES = 32
CHECKSUM_ALGOS = {"wsum64": 1, "crc32": 2, "xxh3": 3}
_ALGO_NAMES = {v: k for k, v in CHECKSUM_ALGOS.items()}

_FIXED = struct.Struct("<8sIIIIIIQI32s16s")  # everything before the checksum table


class BlockFormatError(ValueError):
    """A block file that is not a valid block of the expected layout/key (the reason is the message)."""


class BlockOfNewerFormat(BlockFormatError):
    """A block that a newer dualpath-jax wrote (a newer format version, or a checksum algo this code does not know):
    not readable here, but not damage either."""


def fingerprint_digest(fingerprint: str) -> bytes:
    return hashlib.blake2b(fingerprint.encode("utf-8"), digest_size=16).digest()


def newer_format_version(head: bytes) -> int | None:
    """The format version in a block file's first bytes when it is newer than this code's (a file of another size
    than this code's blocks may be one), else None."""
    if len(head) < 12 or head[:8] != MAGIC:
        return None
    (version,) = struct.unpack_from("<I", head, 8)
    return version if version in NEWER_FORMAT_VERSIONS else None


def header_nbytes(layout: BlockLayout) -> int:
    raw = _FIXED.size + 8 * layout.num_layers + 4
    return -(-raw // HEADER_ALIGN) * HEADER_ALIGN


def header_used_nbytes(layout: BlockLayout) -> int:
    """Bytes of a header that parse_header reads (the rest is zero padding)."""
    return _FIXED.size + 8 * layout.num_layers + 4


def file_nbytes(layout: BlockLayout) -> int:
    """Bytes one block file of `layout` takes: header + Full Block payload."""
    return header_nbytes(layout) + layout.full_block_nbytes


@functools.lru_cache(maxsize=16)
def _wsum_weights(nwords: int) -> np.ndarray:
    """[nwords] odd uint64 weights from splitmix64(i): fixed forever (they define stored checksums)."""
    with np.errstate(over="ignore"):
        z = np.arange(1, nwords + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    w = z | np.uint64(1)
    w.flags.writeable = False
    return w


_xxh3 = xxhash.xxh3_64_intdigest


def layer_checksum_list(buf: np.ndarray, layer_block_nbytes: int, algo: str) -> list[int]:
    """Checksums of the Layer Blocks packed in flat C-contiguous uint8 `buf` (a whole number of them), as ints.

    The read path's form: no array per call, and xxh3 hashes straight from the buffer (one call per Layer Block).
    """
    if algo == "xxh3":
        mv = memoryview(buf)
        return [_xxh3(mv[o : o + layer_block_nbytes]) for o in range(0, len(mv), layer_block_nbytes)]
    return layer_checksums(buf.reshape(-1, layer_block_nbytes), algo).tolist()


def layer_checksums(blocks: np.ndarray, algo: str) -> np.ndarray:
    """Checksums of Layer Blocks: `blocks` is uint8 `[n, layer_block_nbytes]` (C-contiguous) -> uint64 `[n]`."""
    n, lbn = blocks.shape
    if algo == "xxh3":
        return np.array(layer_checksum_list(np.ascontiguousarray(blocks).reshape(-1), lbn, algo), dtype=np.uint64)
    if algo == "wsum64":
        nwords, tail = divmod(lbn, 8)
        w = _wsum_weights(nwords + (1 if tail else 0))
        if tail == 0:
            # [n, nwords] x [nwords] -> [n], wrapping mod 2**64; einsum's loop is ~3x faster than matmul's here.
            return np.einsum("ij,j->i", blocks.view("<u8"), w)
        out = np.empty((n,), dtype=np.uint64)
        with np.errstate(over="ignore"):  # mod 2**64 by design
            for i in range(n):  # odd sizes (rare): words, then the tail zero-padded to one more word
                words = np.frombuffer(blocks[i, : nwords * 8].tobytes(), dtype="<u8")
                last = np.frombuffer(blocks[i, nwords * 8 :].tobytes() + b"\0" * (8 - tail), dtype="<u8")
                out[i] = words @ w[:nwords] + last[0] * w[nwords]
        return out
    if algo == "crc32":
        return np.array([zlib.crc32(blocks[i]) for i in range(n)], dtype=np.uint64)
    raise ValueError(f"unknown checksum algo {algo!r}; known: {sorted(CHECKSUM_ALGOS)}")


def pack_header(layout: BlockLayout, key: bytes, checksums: np.ndarray, algo: str) -> bytearray:
    """The header of a block file (header_nbytes(layout) bytes)."""
    if not 0 < len(key) <= MAX_KEY_NBYTES:
        raise ValueError(f"block key must be 1..{MAX_KEY_NBYTES} bytes, got {len(key)}")
    size = header_nbytes(layout)
    buf = bytearray(size)
    _FIXED.pack_into(
        buf, 0, MAGIC, FORMAT_VERSION, size, CHECKSUM_ALGOS[algo], layout.num_layers, layout.block_tokens,
        layout.bytes_per_token_per_layer, layout.full_block_nbytes, len(key), key,
        fingerprint_digest(layout.fingerprint),
    )  # fmt: skip
    table_end = _FIXED.size + 8 * layout.num_layers
    buf[_FIXED.size : table_end] = np.asarray(checksums, dtype="<u8").tobytes()
    struct.pack_into("<I", buf, table_end, zlib.crc32(memoryview(buf)[:table_end]))
    return buf


def parse_header(buf, layout: BlockLayout, key: bytes, fp_digest: bytes) -> tuple[str, np.ndarray]:
    """Check a header against the expected layout and key; return (checksum algo, checksums [L] uint64).

    Raises BlockFormatError naming the first mismatch (another model's block, another layout, a block
    stored under the wrong name, or plain garbage); BlockOfNewerFormat for a block a newer dualpath-jax wrote.
    """
    mv = memoryview(buf)
    if len(mv) < _FIXED.size or bytes(mv[:8]) != MAGIC:
        raise BlockFormatError(f"bad magic {bytes(mv[:8])!r} (expected {MAGIC!r})")
    (_, version, hdr_n, algo_id, layers, tokens, bpt, payload_n, key_len, stored_key, fp) = _FIXED.unpack_from(mv, 0)
    if version in NEWER_FORMAT_VERSIONS:  # (before the other checks: a newer format may lay its header out otherwise)
        raise BlockOfNewerFormat(f"format version {version}, this code reads {FORMAT_VERSION}")
    if version != FORMAT_VERSION:
        raise BlockFormatError(f"format version {version}, this code reads {FORMAT_VERSION}")
    if hdr_n != len(mv) or layers != layout.num_layers:
        raise BlockFormatError(
            f"layout mismatch: header of {hdr_n} B for {layers} layers, expected {len(mv)} B for {layout.num_layers}"
        )
    table_end = _FIXED.size + 8 * layers
    (crc,) = struct.unpack_from("<I", mv, table_end)
    if crc != zlib.crc32(mv[:table_end]):
        raise BlockFormatError("header checksum mismatch")
    if (tokens, bpt, payload_n) != (layout.block_tokens, layout.bytes_per_token_per_layer, layout.full_block_nbytes):
        raise BlockFormatError(
            f"layout mismatch: block of {tokens} tokens x {bpt} B/token/layer ({payload_n} B), expected "
            f"{layout.block_tokens} x {layout.bytes_per_token_per_layer} ({layout.full_block_nbytes} B)"
        )
    if fp != fp_digest:
        raise BlockFormatError("model fingerprint mismatch (a block of another model or KV format)")
    if stored_key[:key_len] != key or key_len != len(key):
        raise BlockFormatError(f"key mismatch: file holds block {stored_key[:key_len].hex()}, expected {key.hex()}")
    if algo_id not in _ALGO_NAMES:  # (after the header crc: a damaged id is damage)
        raise BlockOfNewerFormat(f"unknown checksum algo id {algo_id}")
    return _ALGO_NAMES[algo_id], np.frombuffer(mv[_FIXED.size : table_end], dtype="<u8")
