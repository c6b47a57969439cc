"""Defects found in the second hunt of the jax-free core modules (host buffers, metrics, KV layout, registry)."""

import copy
import json
import math

import numpy as np
import pytest

from dualpath_jax import metrics
from dualpath_jax.host_buffers import BufferBudgetExceeded, HostBuffer, HostBufferPool
from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.registry import Registry


def _pool(n=2):
    return HostBufferPool(slot_nbytes=16, num_slots=n, name="p", prefault=False)


def test_releasing_a_copy_of_a_handle_does_not_free_its_slots_twice():
    # A copy had its own "released" flag: the original and its copy each freed slot 0, so the pool counted 3 free
    # slots of 2 and handed the same slot to two later requests.
    pool = _pool()
    h = pool.acquire(nslots=1)
    c = copy.copy(h)
    h.release()
    with pytest.raises(ValueError, match="not handed out by pool 'p'"):
        c.release()
    assert pool.free_slots == 2 and pool.stats().slots_in_use == 0
    a, b = pool.acquire(nslots=1), pool.acquire(nslots=1)
    assert sorted(a.slots + b.slots) == [0, 1]
    with pytest.raises(BufferBudgetExceeded):
        pool.acquire(nslots=1, timeout=0)


def test_a_handle_built_by_hand_cannot_free_a_slot_another_request_holds():
    pool = _pool()
    held = pool.acquire(nslots=1)
    with pytest.raises(ValueError, match="not handed out by pool 'p'"):
        pool.release(HostBuffer(pool, list(held.slots), 16))
    assert pool.free_slots == 1
    other = pool.acquire(nslots=1, timeout=0)
    assert not set(other.slots) & set(held.slots)
    with pytest.raises(TypeError, match="release takes a HostBuffer, got None"):
        pool.release(None)


def test_release_frees_the_slots_handed_out_not_the_handles_edited_list():
    # `slots` is a public list: a caller trimming it left the popped slot held for ever (and appending freed
    # a slot another request held).
    pool = _pool(3)
    h = pool.acquire(nslots=2)
    h.slots.pop()
    h.release()
    assert pool.free_slots == 3
    pool.acquire(nslots=3, timeout=0).release()


def test_double_release_is_still_named_as_such():
    pool = _pool()
    h = pool.acquire(nslots=1)
    h.release()
    with pytest.raises(RuntimeError, match="released twice"):
        pool.release(h)
    assert pool.free_slots == 2


@pytest.mark.parametrize("flag", ["no", 1, None])
def test_a_non_bool_contiguous_flag_is_refused(flag):
    pool = _pool()
    with pytest.raises(TypeError, match="contiguous must be True or False"):
        pool.acquire(nslots=1, contiguous=flag)
    assert pool.free_slots == 2 and not pool._queue
    pool.acquire(nslots=1, contiguous=np.bool_(True)).release()


@pytest.mark.parametrize("q", [150, -1, math.nan, True, "50"])
@pytest.mark.parametrize("values", [[], [math.nan], [1.0, 2.0], [1.0, math.inf]])
def test_a_bad_percentile_rank_is_refused_whatever_the_values(values, q):
    # On empty or all-NaN values a bad q gave NaN silently; q=True was taken as p1.
    with pytest.raises(ValueError, match="Percentiles must be in the range"):
        metrics.percentile(values, q)


def test_good_percentile_ranks_still_work_on_empty_and_numpy_inputs():
    assert math.isnan(metrics.percentile([], 50))
    assert metrics.percentile([1.0, 2.0, 3.0], np.float64(50)) == 2.0
    assert metrics.percentile(np.array([1, 3]), 100) == 3.0


def test_json_safe_writes_numpy_scalars_and_arrays_as_json_values():
    # json.dump's default wrote np.int64(5) as "5" (default=str, as summary.json is written) or 5.0 (default=float),
    # np.bool_ as "True" / 1.0, np.float32 as "0.5", an array as "[1. nan]"
    v = {"n": np.int64(5), "b": np.bool_(True), "f": np.float32(0.5), "a": np.array([1.0, np.nan]), "x": 2.5}
    want = {"n": 5, "b": True, "f": 0.5, "a": [1.0, None], "x": 2.5}
    for default in (str, float):
        assert json.loads(json.dumps(metrics.json_safe(v), default=default)) == want
    out = metrics.json_safe(v)
    assert type(out["n"]) is int and type(out["b"]) is bool
    assert metrics.json_safe(np.float32("nan")) is None


def test_write_json_keeps_integer_byte_counts_integers(tmp_path):
    r = metrics.TurnRecord(0, 0, 64, 0, 2, 0.0, first_token=1.0, finished=2.0, pe_read_bytes=np.int64(4096))
    p = tmp_path / "t.json"
    metrics.write_json(str(p), [r])
    doc = json.loads(p.read_text())
    assert doc["turns"][0]["pe_read_bytes"] == 4096 and isinstance(doc["turns"][0]["pe_read_bytes"], int)
    assert isinstance(doc["summary"]["pe_read_bytes"], int)


@pytest.mark.parametrize("layers", [b"\x01", bytearray(b"\x00"), "1", 1.0])
def test_layers_of_the_wrong_type_are_refused_naming_them(layers):
    # b"\x01" was read as [1] (bytes iterate as ints); "1" reported "layer '1' out of range"; 1.0 "not iterable"
    lay = BlockLayout(num_layers=2, block_tokens=4, bytes_per_token_per_layer=8, fingerprint="m")
    with pytest.raises(TypeError, match="layers must be None, an int, a slice or an iterable of ints"):
        lay.normalize_layers(layers)


def test_layers_of_a_one_layer_layout():
    lay = BlockLayout(num_layers=1, block_tokens=3, bytes_per_token_per_layer=5, fingerprint="m")
    assert lay.full_block_nbytes == lay.layer_block_nbytes == 15 and lay.layer_offset(0) == 0
    assert lay.normalize_layers(None) == lay.normalize_layers(np.array([0])) == lay.normalize_layers((0,)) == [0]
    assert lay.normalize_layers(slice(None)) == [0]
    with pytest.raises(IndexError):
        lay.normalize_layers([1])


def test_a_bare_register_decorator_is_an_error_not_a_lost_class():
    # `@REG.register` (no name) bound the class to the inner decorator and registered nothing, silently.
    reg = Registry("policy")
    with pytest.raises(ValueError, match=r"policy name must be a non-empty string.*not a bare @register"):

        @reg.register
        class Foo:
            pass

    assert len(reg) == 0
    for bad in ("", None, 3):
        with pytest.raises(ValueError, match="policy name must be a non-empty string"):
            reg.register(bad)
