"""KV store hunt, sixth pass: per-call flags, lookups over capacity, a write's reserved room, numpy-int options."""

import os

import numpy as np
import pytest

from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.store import LocalDirStore, block_file

LAY = BlockLayout(num_layers=2, block_tokens=4, bytes_per_token_per_layer=8, fingerprint="hunt6/a")
FB = LAY.full_block_nbytes
FN = block_file.file_nbytes(LAY)


def _block(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, FB, dtype=np.uint8)


def _key(i: int) -> bytes:
    return bytes([i]) * 16


_CALLS = {
    "read.verify": lambda s, v: s.read(_key(1), np.zeros(FB, np.uint8), verify=v),
    "submit_read.verify": lambda s, v: s.submit_read(_key(1), np.zeros(FB, np.uint8), verify=v).result(),
    "write.durable": lambda s, v: s.write(_key(2), _block(2), durable=v),
    "write.overwrite": lambda s, v: s.write(_key(1), _block(1), overwrite=v),
    "submit_write.durable": lambda s, v: s.submit_write(_key(2), _block(2), durable=v).result(),
}


@pytest.mark.parametrize("call", sorted(_CALLS))
def test_a_per_call_flag_that_is_not_a_bool_is_refused_naming_it(tmp_path, call):
    s = LocalDirStore(tmp_path / "kv", LAY)
    assert s.write(_key(1), _block(1))
    name = call.split(".")[1]
    for bad in ("no", "false", 0, 1, 1.0, [True]):  # (verify="no" verified, durable="false" fsync'ed)
        with pytest.raises(TypeError, match=name):
            _CALLS[call](s, bad)
    assert not os.path.exists(s.path_of(_key(2)))  # a refused write wrote nothing
    for ok in (True, False, np.True_, np.False_, None):  # bools, numpy bools, None: the store's option
        assert _CALLS[call](s, ok)
    s.close()


def test_a_lookup_that_keeps_no_adopted_block_evicts_nothing_in_a_store_over_capacity(tmp_path):
    # A store 1 block over capacity (pinned blocks a refresh indexed, one unpinned since: documented); another
    # process writes block 9. A lookup that adopts 9 cannot keep it (2 victims needed, 1 there): it used to evict
    # block 5 anyway (the most recent unpinned one) and then drop 9, a block lost for nothing; a read of 9 and a
    # lookup that adopts nothing evict nothing there.
    s = LocalDirStore(tmp_path / "kv", LAY, capacity_bytes=3 * FN)
    other = LocalDirStore(tmp_path / "kv", LAY)
    s.pin([_key(i) for i in (2, 3, 4, 5)])
    for i in (2, 3, 4, 5):
        assert other.write(_key(i), _block(i))
    s.refresh()
    s.unpin([_key(5)])
    assert other.write(_key(9), _block(9))
    assert s.lookup([_key(9)]) == 0
    assert s.stats().evictions == 0 and os.path.exists(s.path_of(_key(5)))
    assert s.lookup([_key(5)]) == 1 and sorted(s.keys()) == [_key(i) for i in (2, 3, 4, 5)]
    # where it can keep some of them, it still evicts for those (unchanged): 2 unpinned, 2 adopted -> keeps 1
    s.unpin([_key(4)])
    assert other.write(_key(10), _block(10))
    assert s.lookup([_key(9), _key(10)]) == 1
    assert s.stats().evictions == 2 and sorted(s.keys()) == [_key(i) for i in (2, 3, 9)]
    out = np.zeros(FB, np.uint8)
    assert s.read(_key(9), out) and (out == _block(9)).all()
    s.close()
    other.close()


_INT_OPTIONS = {
    "io_threads": 2,
    "write_threads": 2,
    "read_chunk_bytes": 64,
    "mmap_min_bytes": 0,
    "mmap_after_reads": 1,
    "fd_cache": 3,
    "nontemporal_min_bytes": 0,
}


@pytest.mark.parametrize("option", sorted(_INT_OPTIONS))
def test_an_int_option_given_as_a_numpy_int_is_taken_as_capacity_bytes_is(tmp_path, option):
    # (a sweep's np.arange of chunk sizes was refused with "must be an int >= 0, got np.int64(64)")
    value = _INT_OPTIONS[option]
    s = LocalDirStore(tmp_path / "kv", LAY, **{option: np.int64(value)}, capacity_bytes=np.int64(4 * FN))
    assert s.write(_key(1), _block(1))
    out = np.zeros(FB, np.uint8)
    assert s.submit_read(_key(1), out).result() and (out == _block(1)).all()
    assert s.read(_key(1), out[: LAY.layer_block_nbytes], layers=[1])
    s.close()
    for bad in (True, float(value), str(value), -1):  # still refused: a bool, a float, a string, a negative
        with pytest.raises(ValueError, match=option):
            LocalDirStore(tmp_path / "kv", LAY, **{option: bad})


def test_a_lookup_naming_a_block_twice_never_reports_a_block_it_left_out(tmp_path):
    # (hand-made keys: a prompt's chained keys never repeat) block 2 is adopted at position 0 and named again at 2;
    # a full store (block 1 pinned) cannot keep 2 or 3: the answer was 1, block 2 unindexed
    s = LocalDirStore(tmp_path / "kv", LAY, capacity_bytes=FN)
    other = LocalDirStore(tmp_path / "kv", LAY)
    s.pin([_key(1)])
    assert s.write(_key(1), _block(1))
    assert other.write(_key(2), _block(2)) and other.write(_key(3), _block(3))
    assert s.lookup([_key(2), _key(3), _key(2)]) == 0
    assert s.keys() == [_key(1)] and s.stats().evictions == 0
    s.close()
    other.close()


def test_a_nan_stale_temp_s_is_refused(tmp_path):
    # NaN compared False with every age: a dead writer's temp file was never old enough to be removed
    with pytest.raises(ValueError, match="stale_temp_s"):
        LocalDirStore(tmp_path / "kv", LAY, stale_temp_s=float("nan"))
    LocalDirStore(tmp_path / "kv", LAY, stale_temp_s=float("inf")).close()  # (never by age: still allowed)


def _hook_write_file(s, after):
    """Run `after(key)` once each block a write stores is renamed into place, before the write indexes it (another
    thread's call in that window, deterministically)."""
    real = s._write_file

    def hooked(path, key, header, src, durable, *rest):
        real(path, key, header, src, durable, *rest)
        after(key)

    s._write_file = hooked


@pytest.mark.parametrize("call", ["lookup", "read", "verify", "refresh"])
def test_a_block_indexed_by_another_call_while_its_write_ends_counts_once(tmp_path, call):
    # Capacity 2, blocks 1 and 2 stored; write(3): once its file is renamed into place, a lookup / read / verify /
    # refresh in another thread finds and indexes it before the write does. Its reserved room and its index entry
    # both counted: blocks 1 and 2 were evicted (only 3 left) where evicting 1 fits 3.
    s = LocalDirStore(tmp_path / "kv", LAY, capacity_bytes=2 * FN)
    assert s.write(_key(1), _block(1)) and s.write(_key(2), _block(2))
    calls = {
        "lookup": lambda: s.lookup([_key(3)]),
        "read": lambda: s.read(_key(3), np.zeros(FB, np.uint8)),
        "verify": lambda: s.verify(_key(3)),
        "refresh": s.refresh,
    }
    _hook_write_file(s, after=lambda key: calls[call]())
    assert s.write(_key(3), _block(3))
    assert s.stats().evictions == 1 and s.keys() == [_key(2), _key(3)]
    assert os.path.exists(s.path_of(_key(2))) and not os.path.exists(s.path_of(_key(1)))
    s.close()
