"""The runtime's storage NIC: read jobs fill a request's layer-major host area from the KV store, in place
(a store that takes row-strided `out`) or through a staging buffer (any other store), with the same bytes."""

import threading

import numpy as np
import pytest

from dualpath_jax.block_keys import block_keys, root_key
from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.runtime.storage_nic import ReadJob, StorageNIC
from dualpath_jax.store import LocalDirStore

LAYOUT = BlockLayout(num_layers=3, block_tokens=16, bytes_per_token_per_layer=24, fingerprint="snic-test/bf16")


class _NoStridedStore(LocalDirStore):
    strided_out = False  # as a store without in-place reads: the NIC stages each block


def _content(key):
    rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
    return rng.integers(0, 256, LAYOUT.full_block_shape, dtype=np.uint8)


def _run_job(snic, keys, first_block, area):
    done = threading.Event()
    got = {}

    def on_done(job, ok, nbytes, t0, t1):
        got.update(ok=ok, nbytes=nbytes)
        done.set()

    snic.submit_read(ReadJob(1, 0, keys, first_block, area, on_done))
    assert done.wait(30)
    return got


@pytest.mark.parametrize("store_cls", [LocalDirStore, _NoStridedStore])
@pytest.mark.parametrize("read_method", ["mmap", "preadv"])
def test_read_jobs_fill_the_area_in_place_or_staged(tmp_path, store_cls, read_method):
    store = store_cls(tmp_path / "kv", LAYOUT, read_method=read_method, mmap_min_bytes=0, mmap_after_reads=0)
    ids = np.random.default_rng(0).integers(0, 1000, 6 * LAYOUT.block_tokens)
    keys = block_keys(ids, LAYOUT.block_tokens, parent=root_key(LAYOUT.fingerprint))
    for k in keys:
        assert store.write(k, _content(k))
    snic = StorageNIC(0, store, LAYOUT.block_tokens, pace=lambda n: None)
    assert (snic._read_staging is None) == store.strided_out
    bs = LAYOUT.block_tokens
    area = np.full((LAYOUT.num_layers, 7 * bs, LAYOUT.bytes_per_token_per_layer), 9, np.uint8)  # 7 blocks' room
    got = _run_job(snic, keys[1:5], 1, area)  # blocks 1..4 of the prompt
    assert got == {"ok": 4, "nbytes": 4 * LAYOUT.full_block_nbytes}
    want = np.concatenate([_content(k) for k in keys[1:5]], axis=1)
    np.testing.assert_array_equal(area[:, bs : 5 * bs], want)
    assert (area[:, :bs] == 9).all() and (area[:, 5 * bs :] == 9).all()
    # a damaged block ends the job there: the hit is the blocks before it; later blocks' rows are untouched
    path = store.path_of(keys[3])
    raw = bytearray(open(path, "rb").read())
    raw[-3] ^= 1
    open(path, "wb").write(raw)
    area[:] = 9
    got = _run_job(snic, keys[1:6], 1, area)
    assert got["ok"] == 2 and snic.failed_reads == 1
    np.testing.assert_array_equal(area[:, bs : 3 * bs], want[:, : 2 * bs])
    assert (area[:, 4 * bs :] == 9).all()
    snic.close()
    store.close()
