"""Prefix-chained block keys: key_i = blake2b(key_{i-1} || token ids of block i).

A block's key names the whole prefix up to and including that block, so two prompts that share a prefix
share the keys (and so the stored Full Blocks) of its whole blocks, and the set of stored keys is a trie of
Full Blocks: a lookup walks a prompt's keys in order and stops at the first one not stored. Only whole
blocks get keys (the partial tail of a prompt is never stored).

The chain starts at a root key that may name a namespace (the model fingerprint), so two models never
share keys. Keys of turn i+1 extend those of turn i: `block_keys(ids[n*bs:], bs, parent=keys[n-1])`, or keep
a `BlockKeyChain` per trajectory and feed it tokens as they come (decode write-back).

Traces that give integer block hashes instead of token ids map them to keys with `keys_from_hash_ids`
(chained the same way, in a separate domain so they never collide with token-id keys).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from dualpath_jax.checks import is_int

KEY_NBYTES = 16  # 128-bit keys: a collision (= wrong KV) needs ~2**64 stored blocks
_TOKEN_DOMAIN = b"T"  # domain tags keep token-id keys and trace-hash-id keys apart
_HASH_ID_DOMAIN = b"H"


def _blake(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=KEY_NBYTES).digest()


def root_key(namespace: str = "") -> bytes:
    """The parent of a prompt's first block; `namespace` (e.g. the model fingerprint) separates key spaces."""
    if not isinstance(namespace, str):
        raise TypeError(f"namespace must be a str, got {type(namespace).__name__}")
    return _blake(b"dualpath-jax/block-key/v1\x00" + namespace.encode("utf-8"))


ROOT = root_key("")


def _check_parent(parent: bytes) -> bytes:
    if not isinstance(parent, (bytes, bytearray)) or len(parent) != KEY_NBYTES:
        raise ValueError(f"parent must be a {KEY_NBYTES}-byte key, got {parent!r}")
    return bytes(parent)


def _token_bytes(token_ids) -> np.ndarray:
    """Token ids as canonical little-endian uint32 (lists and arrays of any int dtype give the same keys)."""
    ids = np.asarray(token_ids)
    if ids.ndim != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"token_ids must be integers, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= 2**32):
        raise ValueError(f"token ids must be in [0, 2**32), got range [{ids.min()}, {ids.max()}]")
    return ids.astype("<u4", copy=False)


def _check_block_size(block_size) -> int:
    if not is_int(block_size) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    return int(block_size)


def block_keys(token_ids, block_size: int, parent: bytes = ROOT) -> list[bytes]:
    """Keys of the whole blocks of `token_ids` (a partial last block gets none), chained from `parent`."""
    _check_block_size(block_size)
    key = _check_parent(parent)
    ids = _token_bytes(token_ids)
    return _chain_blocks(ids, block_size, key)


def _chain_blocks(ids: np.ndarray, block_size: int, key: bytes) -> list[bytes]:
    """Keys of the whole blocks of canonical `<u4` ids, chained from `key` (each block's bytes hashed once)."""
    n_blocks = ids.size // block_size
    blocks = ids[: n_blocks * block_size].reshape(n_blocks, block_size)  # [n_blocks, block_size] uint32
    keys = []
    for row in blocks:
        key = _blake(key + _TOKEN_DOMAIN + row.tobytes())
        keys.append(key)
    return keys


def extend_block_keys(prev_keys: Sequence[bytes], token_ids, block_size: int, root: bytes = ROOT) -> list[bytes]:
    """Keys of all whole blocks of `token_ids` (the full prompt), reusing `prev_keys` for its first blocks.

    `prev_keys` are the keys of an earlier turn of the same trajectory (a prefix of this prompt); only the
    blocks after them are hashed.
    """
    block_size = _check_block_size(block_size)
    n_prev = len(prev_keys)
    ids = _token_bytes(token_ids)
    if n_prev * block_size > ids.size:
        raise ValueError(
            f"prev_keys cover {n_prev} blocks ({n_prev * block_size} tokens) but token_ids has only {ids.size}"
        )
    parent = prev_keys[-1] if n_prev else root
    return list(prev_keys) + block_keys(ids[n_prev * block_size :], block_size, parent)


class BlockKeyChain:
    """Incremental keys of one growing token sequence (a trajectory): feed tokens, get keys of new blocks.

    The decode engine persists each block as soon as it is full; `extend` returns exactly the keys of the
    blocks completed by the tokens it was given. Amortised O(1) a token: the not-yet-full block is a fixed
    buffer filled in place and each block's bytes are hashed once, when it completes (feeding one token at a
    time costs the same per token for any block size or sequence length).
    """

    def __init__(self, block_size: int, root: bytes = ROOT):
        self.block_size = _check_block_size(block_size)
        self.keys: list[bytes] = []
        self._root = _check_parent(root)
        self._buf = np.zeros((self.block_size,), dtype="<u4")  # [block_size] the not-yet-full block's tokens...
        self._fill = 0  # ...of which the first `_fill` are fed

    @classmethod
    def resume(cls, prev_keys: Sequence[bytes], token_ids, block_size: int, root: bytes = ROOT) -> BlockKeyChain:
        """A chain that was fed `token_ids`, reusing `prev_keys` for its first blocks (as `extend_block_keys`):
        only the tokens after them are read, so a turn's prompt keys are not rehashed."""
        chain = cls(block_size, root)
        n_prev = len(prev_keys)
        ids = _token_bytes(token_ids)
        if n_prev * chain.block_size > ids.size:
            raise ValueError(
                f"prev_keys cover {n_prev} blocks ({n_prev * chain.block_size} tokens) but token_ids has only {ids.size}"
            )
        chain.keys = list(prev_keys)
        if n_prev:
            _check_parent(prev_keys[-1])  # the parent of the blocks after them
        chain.extend(ids[n_prev * chain.block_size :])
        return chain

    @property
    def num_tokens(self) -> int:
        return len(self.keys) * self.block_size + self._fill

    def extend(self, token_ids) -> list[bytes]:
        if (
            type(token_ids) in (list, tuple)
            and len(token_ids) < self.block_size - self._fill
            and all(type(t) is int and 0 <= t < 2**32 for t in token_ids)
        ):  # a few plain ints that leave the open block open (decode's one token): no array round trip
            self._buf[self._fill : self._fill + len(token_ids)] = token_ids
            self._fill += len(token_ids)
            return []
        ids = _token_bytes(token_ids)  # checked before any state changes
        bs, n = self.block_size, ids.size
        key = self.keys[-1] if self.keys else self._root
        new: list[bytes] = []
        pos = 0
        if self._fill:  # complete the open block first
            pos = min(bs - self._fill, n)
            self._buf[self._fill : self._fill + pos] = ids[:pos]
            self._fill += pos
            if self._fill < bs:
                return new
            key = _blake(key + _TOKEN_DOMAIN + self._buf.tobytes())
            new.append(key)
            self._fill = 0
        n_whole = (n - pos) // bs * bs
        new += _chain_blocks(ids[pos : pos + n_whole], bs, key)
        rest = ids[pos + n_whole :]  # [< block_size] the new open block
        self._buf[: rest.size] = rest
        self._fill = rest.size
        self.keys.extend(new)
        return new


def keys_from_hash_ids(hash_ids: Sequence[int], parent: bytes = ROOT) -> list[bytes]:
    """Keys for a trace's per-block integer hash ids (one id per whole block), chained like token keys.

    Chaining keeps the prefix meaning even if the trace's ids are per-block content hashes only.
    """
    key = _check_parent(parent)
    keys = []
    for i, hid in enumerate(hash_ids):
        if isinstance(hid, bool) or not isinstance(hid, (int, np.integer)):
            raise TypeError(f"hash_ids[{i}] must be an int, got {hid!r}")
        if not -(2**63) <= int(hid) < 2**64:
            raise ValueError(f"hash_ids[{i}] = {hid} does not fit in 64 bits")
        key = _blake(key + _HASH_ID_DOMAIN + (int(hid) % 2**64).to_bytes(8, "little"))
        keys.append(key)
    return keys
