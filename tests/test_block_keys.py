"""Prefix-chained block keys and the block layout."""

import hashlib

import numpy as np
import pytest

from dualpath_jax.block_keys import (
    KEY_NBYTES,
    ROOT,
    BlockKeyChain,
    block_keys,
    extend_block_keys,
    keys_from_hash_ids,
    root_key,
)
from dualpath_jax.kv_layout import BlockLayout


def test_keys_match_the_definition():
    ids = np.arange(130, dtype=np.int64)
    keys = block_keys(ids, 64)
    assert len(keys) == 2  # the partial tail (2 tokens) gets no key
    k0 = hashlib.blake2b(ROOT + b"T" + ids[:64].astype("<u4").tobytes(), digest_size=KEY_NBYTES).digest()
    k1 = hashlib.blake2b(k0 + b"T" + ids[64:128].astype("<u4").tobytes(), digest_size=KEY_NBYTES).digest()
    assert keys == [k0, k1]


def test_equal_prefixes_share_keys_and_a_changed_token_changes_all_later_keys():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 150_000, size=64 * 5)
    b = a.copy()
    b[64 * 2 + 7] += 1  # change one token in block 2
    ka, kb = block_keys(a, 64), block_keys(b, 64)
    assert ka[:2] == kb[:2]
    assert all(x != y for x, y in zip(ka[2:], kb[2:], strict=True))


def test_list_and_array_dtypes_give_the_same_keys():
    ids = list(range(100, 228))
    assert (
        block_keys(ids, 32) == block_keys(np.array(ids, dtype=np.int32), 32) == block_keys(np.array(ids, np.uint64), 32)
    )


def test_incremental_extension_equals_recomputation():
    rng = np.random.default_rng(1)
    turn1 = rng.integers(0, 1000, size=200)
    turn2 = np.concatenate([turn1, rng.integers(0, 1000, size=333)])
    k1 = block_keys(turn1, 64)
    assert extend_block_keys(k1, turn2, 64) == block_keys(turn2, 64)
    assert block_keys(turn2[len(k1) * 64 :], 64, parent=k1[-1]) == block_keys(turn2, 64)[len(k1) :]

    chain = BlockKeyChain(64)
    got = []
    for piece in np.array_split(turn2, 17):  # decode-like: a few tokens at a time
        got += chain.extend(piece)
    assert got == chain.keys == block_keys(turn2, 64)
    assert chain.num_tokens == turn2.size


def test_namespaces_separate_key_spaces():
    ids = np.arange(64)
    assert block_keys(ids, 64, parent=root_key("qwen2-0.5b")) != block_keys(ids, 64, parent=root_key("deepseek"))
    assert root_key("") == ROOT


def test_hash_ids_are_chained_and_separate_from_token_keys():
    k = keys_from_hash_ids([5, 7, 9])
    assert len(k) == 3 and len({*k}) == 3
    assert keys_from_hash_ids([5, 7, 9])[:2] == keys_from_hash_ids([5, 7, 11])[:2]
    assert keys_from_hash_ids([1, 7])[1] != keys_from_hash_ids([2, 7])[1]  # the prefix matters
    assert keys_from_hash_ids([np.int64(-1)]) == keys_from_hash_ids([2**64 - 1])


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="block_size"):
        block_keys([1, 2], 0)
    with pytest.raises(ValueError, match="parent"):
        block_keys([1, 2], 1, parent=b"short")
    with pytest.raises(ValueError, match="token ids"):
        block_keys([-1, 2], 1)
    with pytest.raises(TypeError, match="integers"):
        block_keys([1.5, 2.0], 1)
    with pytest.raises(ValueError, match="1-D"):
        block_keys(np.zeros((2, 2), int), 1)
    with pytest.raises(ValueError, match="prev_keys"):
        extend_block_keys(block_keys(np.arange(128), 64), np.arange(64), 64)
    with pytest.raises(TypeError, match=r"hash_ids\[1\]"):
        keys_from_hash_ids([1, "x"])


def test_extend_block_keys_checks_block_size():
    """extend_block_keys used `block_size` before checking it: a TypeError about operands or slice indices."""
    keys = block_keys(np.arange(8), 4)
    for bad in (None, 2.0, 0, True):
        with pytest.raises(ValueError, match="block_size must be a positive int"):
            extend_block_keys(keys[:1], np.arange(8), bad)
    assert extend_block_keys(keys[:1], np.arange(8), np.int64(4)) == keys


def test_block_layout_offsets_and_errors():
    lay = BlockLayout(num_layers=61, block_tokens=64, bytes_per_token_per_layer=656, fingerprint="dsv3-fp8")
    assert lay.layer_block_nbytes == 64 * 656
    assert lay.full_block_nbytes == 61 * 64 * 656
    assert lay.layer_offset(0) == 0 and lay.layer_offset(60) == 60 * 64 * 656
    buf = np.arange(lay.full_block_nbytes, dtype=np.int64).astype(np.uint8)
    view = lay.full_block_view(buf)
    assert view.shape == (61, 64, 656)
    l7 = buf[lay.layer_offset(7) : lay.layer_offset(7) + lay.layer_block_nbytes]
    np.testing.assert_array_equal(view[7].reshape(-1), l7)  # a Layer Block is a contiguous slice
    view[3, 0, 0] = 77  # a view: writes land in the buffer
    assert buf[lay.layer_offset(3)] == 77
    strided = np.zeros(2 * lay.full_block_nbytes, dtype=np.uint8)[::2]  # reshape would copy it
    with pytest.raises(ValueError, match="C-contiguous"):
        lay.full_block_view(strided)
    assert lay.normalize_layers(range(2, 5)) == [2, 3, 4]
    assert lay.normalize_layers(slice(-2, None)) == [59, 60]
    assert lay.normalize_layers(5) == [5] and lay.normalize_layers(None) == list(range(61))
    with pytest.raises(ValueError, match="at least one layer"):
        lay.normalize_layers([])
    with pytest.raises(ValueError, match="names no layer of 61"):  # a store read of it reported a hit, read nothing
        lay.normalize_layers(slice(2, 2))
    with pytest.raises(IndexError, match="layer 61"):
        lay.layer_offset(61)
    with pytest.raises(ValueError, match="num_layers"):
        BlockLayout(0, 64, 656, "x")
    with pytest.raises(ValueError, match="fingerprint"):
        BlockLayout(2, 64, 656, "")
    with pytest.raises(ValueError, match="bytes_per_token_per_layer"):
        BlockLayout(2, 64, 1.5, "x")
