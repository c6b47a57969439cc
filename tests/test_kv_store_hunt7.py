"""Store defect hunt 7: the block-key contract, read_many into overlapping buffers, `out` arrays of objects."""

import os

import numpy as np
import pytest

from dualpath_jax.block_keys import block_keys
from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.store.local_dir import LocalDirStore

LAY = BlockLayout(4, 16, 40, "test-model/bf16")
FB = LAY.full_block_nbytes
LBN = FB // LAY.num_layers
RM = [{"read_method": "preadv"}, {"read_method": "mmap", "mmap_min_bytes": 0, "mmap_after_reads": 0}]


def _key(i: int) -> bytes:
    return bytes([i]) * 16


def _block(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, FB, dtype=np.uint8)


def _files(s) -> int:
    return sum(len(f) for _, _, f in os.walk(os.path.join(s.root, "blocks")))


def test_a_key_that_lost_its_trailing_zero_byte_through_numpy_is_refused_not_a_silent_miss(tmp_path):
    # A store key is a block_keys key (16 bytes; files are named by its 32 hex digits). Any 1..32 bytes were taken:
    # a key ending in a zero byte, kept in a numpy bytes array (dtype S16 strips trailing NULs), came back 15 bytes
    # long and was another key: lookup 0 for a stored block, and a write stored a second copy under it.
    s = LocalDirStore(tmp_path / "kv", LAY)
    key = next(k for i in range(10_000) if (k := block_keys([i], 1)[0]).endswith(b"\0"))
    assert s.write(key, _block(1))
    stripped = np.array([key])[0]
    assert len(stripped) == 15
    out = np.zeros(FB, np.uint8)
    calls = {
        "lookup": lambda: s.lookup([stripped]),
        "contains": lambda: s.contains(stripped),
        "read": lambda: s.read(stripped, out),
        "submit_read": lambda: s.submit_read(stripped, out),
        "read_many": lambda: s.read_many([stripped], [out]),
        "write": lambda: s.write(stripped, _block(1)),
        "submit_write": lambda: s.submit_write(stripped, _block(1)),
        "verify": lambda: s.verify(stripped),
        "remove": lambda: s.remove(stripped),
        "pin": lambda: s.pin([stripped]),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="must be 16 bytes.*numpy bytes value drops trailing zero"):
            call()
        assert _files(s) == 1, name  # no second copy
    for bad in (b"\x01" * 8, b"\x01" * 17, b"\x01" * 32, b""):  # other lengths: not block keys either
        with pytest.raises(ValueError, match="must be 16 bytes"):
            s.lookup([bad])
    with pytest.raises(TypeError, match="block key must be bytes"):
        s.read("abc", out)
    # the whole key works as bytes and as a 16-byte numpy bytes value (one that did not end in a zero byte)
    assert s.lookup([key]) == 1 and s.read(key, out) and (out == _block(1)).all()
    other = _key(7)
    assert s.write(np.array([other])[0], _block(7)) and s.read(other, out) and (out == _block(7)).all()
    assert s.stats().read_absent == 0


@pytest.mark.parametrize("rm", RM, ids=["preadv", "mmap"])
def test_read_many_into_overlapping_buffers_is_refused_before_any_read(tmp_path, rm):
    # Two blocks read into one buffer raced: a preadv read hashes `out` after its copy, so the other block's bytes
    # landing meanwhile failed the check and a valid block was removed as corrupt (or a read returned True over
    # the other block's bytes). Refused now, naming the buffers; nothing is read, nothing removed.
    s = LocalDirStore(tmp_path / "kv", LAY, **rm)
    k1, k2 = _key(1), _key(2)
    assert s.write(k1, _block(1)) and s.write(k2, _block(2))
    buf = np.zeros(2 * FB, np.uint8)
    for outs, layers in (
        ([buf[:FB], buf[:FB]], None),  # one buffer twice
        ([buf[:FB], buf[FB // 2 : FB // 2 + FB]], None),  # overlapping halves
        ([buf[: 2 * LBN], buf[LBN : 3 * LBN]], [0, 1]),  # packed layer reads
        ([buf[:FB], buf[:FB]], [3]),  # in place into one Full Block, the same layer
    ):
        buf[:] = 0
        with pytest.raises(ValueError, match="out buffers 0 and 1 overlap"):
            s.read_many([k1, k2], outs, layers=layers)
        assert not buf.any()
    # row-strided: two blocks' rows of a layer-major area that overlap by half a block
    area = np.zeros((LAY.num_layers, 4 * LAY.block_tokens, LAY.bytes_per_token_per_layer), np.uint8)
    bs = LAY.block_tokens
    with pytest.raises(ValueError, match="overlap"):
        s.read_many([k1, k2], [area[:, 0:bs], area[:, bs // 2 : bs // 2 + bs]])
    assert not area.any()
    assert s.keys() == [k1, k2] and _files(s) == 2 and s.stats().corrupt_blocks == 0
    assert s.stats().read_hits == 0


@pytest.mark.parametrize("rm", RM, ids=["preadv", "mmap"])
def test_read_many_takes_disjoint_and_same_key_buffers(tmp_path, rm):
    s = LocalDirStore(tmp_path / "kv", LAY, **rm)
    keys = [_key(i) for i in range(1, 4)]
    for i, k in enumerate(keys, 1):
        assert s.write(k, _block(i))
    # adjacent blocks of one layer-major area: rows interleave but never overlap
    bs = LAY.block_tokens
    area = np.zeros((LAY.num_layers, 3 * bs, LAY.bytes_per_token_per_layer), np.uint8)
    assert s.read_many(keys, [area[:, j * bs : (j + 1) * bs] for j in range(3)]) == [True] * 3
    for j in range(3):
        assert (area[:, j * bs : (j + 1) * bs].reshape(-1) == _block(j + 1)).all()
    # different layers of different blocks into disjoint slots of one Full Block (in place)
    full = np.zeros(FB, np.uint8)
    flat = np.zeros(3 * FB, np.uint8)
    assert s.read_many(keys, [flat[:FB], flat[FB : 2 * FB], flat[2 * FB :]], layers=[2, 0]) == [True] * 3
    # the same key twice into the same buffer writes the same bytes there: allowed
    assert s.read_many([keys[0], keys[0]], [full, full]) == [True, True] and (full == _block(1)).all()
    assert s.stats().corrupt_blocks == 0 and _files(s) == 3


def test_an_out_array_of_python_objects_is_refused_naming_out(tmp_path):
    # (numpy's "Cannot change data-type for array of references." named neither `out` nor the dtype)
    s = LocalDirStore(tmp_path / "kv", LAY)
    assert s.write(_key(1), _block(1))
    with pytest.raises(TypeError, match="out must hold plain bytes.*dtype object"):
        s.read(_key(1), np.empty(FB // 8, object))
    with pytest.raises(TypeError, match="full_block must hold plain bytes"):
        s.write(_key(2), np.empty(FB // 8, object))
    assert _files(s) == 1


def test_read_many_checks_many_row_strided_blocks_exactly(tmp_path):
    # (past 256 destination pieces the check runs vectorised: the same answers)
    s = LocalDirStore(tmp_path / "kv", LAY, read_method="preadv")
    n, bs = 80, LAY.block_tokens
    keys = [i.to_bytes(16, "little") for i in range(1, n + 1)]
    for i, k in enumerate(keys):
        assert s.write(k, _block(i))
    area = np.zeros((LAY.num_layers, n * bs, LAY.bytes_per_token_per_layer), np.uint8)
    views = [area[:, j * bs : (j + 1) * bs] for j in range(n)]
    assert s.read_many(keys, views) == [True] * n
    assert all((views[j].reshape(-1) == _block(j)).all() for j in range(n))
    assert s.read_many(keys + keys[:1], views + views[:1]) == [True] * (n + 1)  # one block twice, same place
    area[:] = 0
    with pytest.raises(ValueError, match=f"out buffers 5 and {n} overlap"):  # block 5's rows, shifted by one row
        s.read_many(keys + keys[6:7], views + [area[:, 5 * bs + 1 : 6 * bs + 1]])
    with pytest.raises(ValueError, match=f"out buffers 0 and {n} overlap"):  # another block into block 0's rows
        s.read_many(keys + keys[1:2], views + views[:1])
    assert not area.any() and s.stats().corrupt_blocks == 0
