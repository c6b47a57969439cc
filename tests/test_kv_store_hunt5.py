"""KV store hunt, fifth pass: `verify(key)` (stored and whole, not a read)."""

import dataclasses
import os

import numpy as np
import pytest

from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.store import LocalDirStore, block_file, local_dir

LAY = BlockLayout(num_layers=4, block_tokens=16, bytes_per_token_per_layer=64, fingerprint="hunt5/a")
FB = LAY.full_block_nbytes
FN = block_file.file_nbytes(LAY)
NATIVE = [False, True] if local_dir.native_verify_available() else [False]


def _block(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, FB, dtype=np.uint8)


def _key(i: int) -> bytes:
    return bytes([i]) * 16


def _read_stats(s) -> dict:
    st = dataclasses.asdict(s.stats())
    return {k: v for k, v in st.items() if k.startswith(("read_", "bytes_read"))}


def _damage(path: str, how: str) -> None:
    if how == "flip":
        with open(path, "r+b") as f:
            f.seek(FN - 1)
            b = f.read(1)
            f.seek(FN - 1)
            f.write(bytes([b[0] ^ 1]))
    elif how == "truncate":
        os.truncate(path, FN - 1)
    elif how == "append":
        with open(path, "ab") as f:
            f.write(b"\0")
    elif how == "header":
        with open(path, "r+b") as f:
            f.seek(8)
            f.write(b"\xff")
    elif how == "fifo":
        os.unlink(path)
        os.mkfifo(path)


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("read_method", ["mmap", "preadv"])
def test_verify_says_whether_a_block_is_stored_and_whole_without_counting_a_read(tmp_path, native, read_method):
    s = LocalDirStore(tmp_path / "kv", LAY, native_verify=native, read_method=read_method, populate_cold=False)
    assert s.write(_key(1), _block(1)) and s.write(_key(2), _block(2))
    before = _read_stats(s)
    assert s.verify(_key(1)) and s.verify(_key(2))
    assert not s.verify(_key(3))  # absent
    assert _read_stats(s) == before  # not a read: no hit, no miss, no bytes read
    assert s.keys() == [_key(1), _key(2)]  # used, as a read hit is (LRU), never dropped
    assert s.verify(_key(1)) and s.keys() == [_key(2), _key(1)]
    assert s.stats().corrupt_blocks == 0 and len(s.keys()) == 2
    s.close()


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("how", ["flip", "truncate", "append", "header", "fifo"])
def test_verify_of_a_damaged_block_is_false_and_removes_it_as_a_read_would(tmp_path, native, how):
    s = LocalDirStore(tmp_path / "kv", LAY, native_verify=native, populate_cold=False)
    assert s.write(_key(1), _block(1)) and s.write(_key(2), _block(2))
    _damage(s.path_of(_key(1)), how)
    before = _read_stats(s)
    assert not s.verify(_key(1))
    assert _read_stats(s) == before
    assert s.stats().corrupt_blocks == 1
    assert not os.path.lexists(s.path_of(_key(1))) and s.keys() == [_key(2)]  # removed, the other block kept
    assert not s.contains(_key(1)) and s.lookup([_key(1)]) == 0
    out = np.zeros(FB, np.uint8)
    assert s.read(_key(2), out) and (out == _block(2)).all()
    assert s.write(_key(1), _block(1)) and s.verify(_key(1))  # the write-back stores it again
    s.close()


def test_verify_indexes_a_good_block_another_process_wrote_and_drops_one_removed_elsewhere(tmp_path):
    a = LocalDirStore(tmp_path / "kv", LAY)
    b = LocalDirStore(tmp_path / "kv", LAY)
    assert b.write(_key(1), _block(1)) and a.write(_key(2), _block(2))
    assert a.keys() == [_key(2)]
    assert a.verify(_key(1)) and a.keys() == [_key(2), _key(1)]
    assert b.remove(_key(2))
    assert not a.verify(_key(2)) and a.keys() == [_key(1)]  # gone elsewhere: out of the index, not corrupt
    assert a.stats().corrupt_blocks == 0 and _read_stats(a) == _read_stats(LocalDirStore(tmp_path / "k2", LAY))
    a.close()
    b.close()


def test_a_lookup_that_cannot_keep_an_adopted_block_keeps_its_own_hits_in_a_store_over_capacity(tmp_path):
    # Pinned blocks a refresh indexed leave the store over capacity (documented). A lookup reaching a block another
    # process wrote cannot keep it (no room): that block, and only it, leaves the answer; the indexed, pinned hits
    # before it stay hits (they used to be cut to 0, while the same lookup without the new block said 3).
    other = LocalDirStore(tmp_path / "kv", LAY)
    for i in (1, 2, 3):
        assert other.write(_key(i), _block(i))
    s = LocalDirStore(tmp_path / "kv", LAY, capacity_bytes=2 * FN)  # opens with blocks 2, 3 (block 1 evicted)
    assert other.write(_key(1), _block(1))
    with s.pinned([_key(1), _key(2), _key(3)]):
        s.refresh()
        assert sorted(s.keys()) == [_key(1), _key(2), _key(3)]  # (pinned: indexed beyond capacity)
        assert other.write(_key(4), _block(4))
        want = [_key(1), _key(2), _key(3)]
        evictions = s.stats().evictions
        assert s.lookup(want) == 3
        assert s.lookup([*want, _key(4)]) == 3  # (was 0)
        assert sorted(s.keys()) == want and s.stats().evictions == evictions  # block 4 left out, file kept
        assert os.path.exists(s.path_of(_key(4)))
    s.close()
    other.close()


@pytest.mark.parametrize("flag", ["create", "verify", "durable", "stat_on_hit", "native_verify", "populate_cold"])
def test_a_store_flag_given_as_a_string_from_a_config_is_refused(tmp_path, flag):
    # `create: "false"` in a config used to be truthy: a mistyped root silently became a new, empty store (every
    # lookup a miss); the other flags were silently on.
    from dualpath_jax.store import make_store

    with pytest.raises(TypeError, match=flag):
        make_store({"name": "local_dir", "root": str(tmp_path / "missing"), flag: "false"}, LAY)
    assert not os.path.exists(tmp_path / "missing")
    with pytest.raises(ValueError, match="stale_temp_s"):
        LocalDirStore(tmp_path / "kv", LAY, stale_temp_s="60")


@pytest.mark.parametrize("how", ["truncate", "append"])
@pytest.mark.parametrize("via", ["stat_on_hit", "past_the_index", "contains"])
def test_a_block_file_of_the_wrong_size_found_by_a_stat_is_removed_and_counted(tmp_path, how, via):
    # A lookup (or contains) that stats a damaged file (truncated, bytes appended) said miss and left the file: no
    # read ever reached it, so it stayed on disk, uncounted and outside the capacity (3 files in a store of 2).
    s = LocalDirStore(tmp_path / "kv", LAY, capacity_bytes=2 * FN, stat_on_hit=via == "stat_on_hit")
    assert s.write(_key(1), _block(1)) and s.write(_key(2), _block(2))
    if via != "stat_on_hit":  # a block this store does not index (another process's)
        assert s.remove(_key(1))
        assert LocalDirStore(tmp_path / "kv", LAY).write(_key(1), _block(1))
    _damage(s.path_of(_key(1)), how)
    if via == "contains":
        assert not s.contains(_key(1))
    else:
        assert s.lookup([_key(1), _key(2)]) == 0
    assert s.stats().corrupt_blocks == 1 and not os.path.exists(s.path_of(_key(1)))
    assert s.write(_key(3), _block(3)) and s.write(_key(4), _block(4))
    assert len(s.keys()) == 2 and sum(len(f) for _, _, f in os.walk(tmp_path / "kv" / "blocks")) == 2
    s.close()
