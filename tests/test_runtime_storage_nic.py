"""The runtime's storage NIC: read jobs fill a request's layer-major host area from the KV store, in place
(a store that takes row-strided `out`) or through a staging buffer (any other store), with the same bytes."""

import threading
import types

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


# ------------------------------------------------------------------ engines over the SNIC (no model, no peer)
class _GatedStore:
    """A store whose first read blocks until `gate` is set (a slow SNIC read); every block reads as 0xEE."""

    strided_out = True

    def __init__(self, layout):
        self.layout = layout
        self.entered = threading.Event()
        self.gate = threading.Event()

    def read(self, key, out):
        self.entered.set()
        assert self.gate.wait(30)
        out[...] = 0xEE
        return True


class _StubBatch:
    def load(self, slot, area, prompt_tokens):
        pass

    def free(self, slot):
        pass


def _engine(role, layout, snic, budget_bytes):
    from dualpath_jax.host_buffers import HostBufferPool
    from dualpath_jax.runtime.engines import DecodeEngine, PrefillEngine

    kv = types.SimpleNamespace(num_layers=layout.num_layers, bytes_per_token_per_layer=layout.bytes_per_token_per_layer)
    model = types.SimpleNamespace(kv_layout=kv, new_decode_batch=lambda n, cap: _StubBatch())
    cfg = types.SimpleNamespace(
        block_size=layout.block_tokens, cluster=types.SimpleNamespace(decode_slots=1, max_seq_len=256)
    )
    ctx = types.SimpleNamespace(cfg=cfg, model=model, emit=lambda ev: None)
    transport = types.SimpleNamespace(register=lambda name, arena: None, disconnect=lambda name: None)
    pool = HostBufferPool(slot_nbytes=layout.layer_block_nbytes, budget_bytes=budget_bytes, prefault=False)
    if role == "pe":
        return PrefillEngine(0, 0, ctx, transport, pool, snic, batcher=None)
    return DecodeEngine(1, 1, ctx, transport, pool, snic)


def _task(rid, prompt_tokens, bs, hit_blocks, pe_read_blocks, gen_tokens=4):
    from dualpath_jax.runtime.control import TurnTask

    ids = np.arange(prompt_tokens, dtype=np.int32)
    keys = block_keys(ids, bs, parent=root_key(LAYOUT.fingerprint))
    side = "pe" if pe_read_blocks == hit_blocks else "de"
    return TurnTask(rid, 0, rid, 0, ids, gen_tokens, keys, hit_blocks, pe_read_blocks, 0, 1, side)


@pytest.mark.parametrize("role", ["pe", "de"])
def test_a_dropped_requests_area_is_not_reused_under_its_running_read(role):
    """A request cancelled (its peer died) while its SNIC read is still running: its host-buffer area must not
    go to the next request until the read stops writing into it -- else the stale blocks land in that request's
    KV (written by its peer meanwhile) and it decodes wrong tokens."""
    from dualpath_jax.runtime.control import Cancel

    bs = LAYOUT.block_tokens
    store = _GatedStore(LAYOUT)
    snic = StorageNIC(0, store, bs, pace=lambda n: None)
    eng = _engine(role, LAYOUT, snic, budget_bytes=LAYOUT.num_layers * 2 * bs * LAYOUT.bytes_per_token_per_layer)
    pe_read = 2 if role == "pe" else 0
    eng._handle("task", _task(1, 2 * bs, bs, hit_blocks=2, pe_read_blocks=pe_read))
    eng._prepare()
    assert store.entered.wait(30), "the first request's read must have started"
    eng._handle("cancel", Cancel(1, 0))
    eng._handle("task", _task(2, 2 * bs, bs, hit_blocks=0, pe_read_blocks=0))
    r2 = eng.reqs[(2, 0)]

    def prepare_and_fill():  # the new request's KV, as its peer writes it into the area
        had = r2.area is not None
        eng._prepare()
        if not had and r2.area is not None:
            r2.area[...] = 0x11

    prepare_and_fill()
    store.gate.set()
    item = eng.inbox.get(30)
    assert item is not None and item[0] == "read_done"
    eng._handle(*item)
    prepare_and_fill()
    assert r2.area is not None, "the area must be free once the dropped request's read reported done"
    assert (r2.area == 0x11).all(), "a dropped request's read wrote into the next request's area"
    snic.close()


def test_prompt_write_back_owns_its_blocks_with_one_layer():
    """A one-layer model: a prompt block's rows of the DE area are contiguous, and the write-back job must still
    hold copies -- the area is freed (and reused) right after, before the SNIC writes the blocks."""
    layout = BlockLayout(num_layers=1, block_tokens=16, bytes_per_token_per_layer=24, fingerprint="snic-test/bf16")
    bs = layout.block_tokens
    jobs = []
    snic = types.SimpleNamespace(submit_write=jobs.append)
    eng = _engine("de", layout, snic, budget_bytes=2 * bs * layout.bytes_per_token_per_layer)
    eng._handle("task", _task(1, 2 * bs, bs, hit_blocks=0, pe_read_blocks=0))
    eng._prepare()
    r = eng.reqs[(1, 0)]
    r.area[...] = 0x5A  # the prompt KV the PE wrote
    eng._handle("msg", {"kind": "prefill_done", "request_id": 1, "attempt": 0, "hit_tokens": 0, "first_token": 7})
    eng._admit()
    assert r.stage == "decoding" and r.handle.released
    eng.pool.arena[...] = 0  # the freed area reused by the next request
    (job,) = jobs
    assert len(job.blocks) == 2 and all((b == 0x5A).all() for b in job.blocks), "write-back kept a view of the area"


class _MissingStore:
    """Every block is missing (evicted between lookup and read)."""

    strided_out = True

    def __init__(self, layout):
        self.layout = layout

    def read(self, key, out):
        return False


class _StubModel:
    """Layerwise prefill stand-in: asks each layer's cached KV, then hands back new KV of 0x33."""

    def __init__(self, bpt, num_layers):
        self.bpt, self.num_layers = bpt, num_layers

    def prefill(self, token_ids, cached, cached_layer, on_layer):
        for layer in range(self.num_layers):
            cached_layer(layer)
            on_layer(layer, [np.full((len(t), self.bpt), 0x33, np.uint8) for t in token_ids])
        return np.zeros(len(token_ids), np.int32)


def test_a_pe_cut_hit_lets_the_des_forwarded_layers_land_before_freeing_its_area():
    """Split read, the PE-side block missing: the hit is cut to 0 and everything recomputed, but the DE read its
    blocks and forwards them into the PE area layer by layer. The PE must let those writes land before it frees
    the area: a late one would overwrite the KV of the next request holding that area."""
    bs, bpt, L = LAYOUT.block_tokens, LAYOUT.bytes_per_token_per_layer, LAYOUT.num_layers
    snic = StorageNIC(0, _MissingStore(LAYOUT), bs, pace=lambda n: None)
    pe = _engine("pe", LAYOUT, snic, budget_bytes=L * 3 * bs * bpt)
    pe.model = _StubModel(bpt, L)
    pe._handle("task", _task(1, 3 * bs, bs, hit_blocks=2, pe_read_blocks=1))
    pe._prepare()
    r = pe.reqs[(1, 0)]
    item = pe.inbox.get(30)
    assert item is not None and item[0] == "read_done"
    pe._handle(*item)
    assert r.pe_ok_blocks == 0
    pe._handle("msg", {"kind": "de_area", "request_id": 1, "attempt": 0, "offset": 0})
    pe._handle("msg", {"kind": "de_read_done", "request_id": 1, "attempt": 0, "end_blocks": 2})
    handle, off = pe._handle, r.area_off

    def handle_landing(kind, it):  # a notifying write: the DE's rows of block 1 land, then the notification
        if kind == "layer":
            o = pe.area_offset(off, 3 * bs, it[2], bs)
            pe.pool.arena[o : o + bs * bpt] = 0xEE
        handle(kind, it)

    pe._handle = handle_landing
    for layer in range(L):
        pe.inbox.put("layer", (1, 0, layer))
    assert pe._ready(r) and r.final_hit == 0
    pe._run_batch([(r, 0, 3 * bs)])
    pe._drain(5)  # "sent": its writes to the DE are over, the hand-over frees the area
    assert (1, 0) not in pe.reqs and r.handle.released
    pe._handle("task", _task(2, 3 * bs, bs, hit_blocks=0, pe_read_blocks=0))
    pe._prepare()
    r2 = pe.reqs[(2, 0)]
    r2.area[...] = 0x11  # the next request's KV
    while (item := pe.inbox.get(0)) is not None:
        pe._handle(*item)
    assert (r2.area == 0x11).all(), "the DE's forwarded layers landed in the next request's area"
    snic.close()


def test_a_read_that_raises_is_a_counted_miss(tmp_path):
    """A store read raising (an I/O error) ends the job there like a corrupt block: the hit is the blocks
    before it, and the failure shows in `failed_reads` (the node's stats) like any other failed read."""
    store = LocalDirStore(tmp_path / "kv", LAYOUT)
    ids = np.random.default_rng(1).integers(0, 1000, 3 * LAYOUT.block_tokens)
    keys = block_keys(ids, LAYOUT.block_tokens, parent=root_key(LAYOUT.fingerprint))
    for k in keys:
        assert store.write(k, _content(k))
    real_read = store.read

    def read(key, out):
        if key == keys[1]:
            raise OSError(5, "Input/output error (injected)")
        return real_read(key, out)

    store.read = read
    snic = StorageNIC(0, store, LAYOUT.block_tokens, pace=lambda n: None)
    area = np.zeros((LAYOUT.num_layers, 3 * LAYOUT.block_tokens, LAYOUT.bytes_per_token_per_layer), np.uint8)
    got = _run_job(snic, keys, 0, area)
    assert got == {"ok": 1, "nbytes": LAYOUT.full_block_nbytes} and snic.failed_reads == 1
    snic.close()
    store.close()


def test_a_raising_completion_callback_does_not_stop_the_queues(tmp_path, caplog):
    """A read or write-back whose completion callback raises is logged; the SNIC's threads keep serving the
    jobs behind it (they used to die with the callback, leaving every later job of the node waiting)."""
    from dualpath_jax.runtime.storage_nic import WriteJob

    store = LocalDirStore(tmp_path / "kv", LAYOUT)
    ids = np.random.default_rng(2).integers(0, 1000, 2 * LAYOUT.block_tokens)
    keys = block_keys(ids, LAYOUT.block_tokens, parent=root_key(LAYOUT.fingerprint))
    snic = StorageNIC(0, store, LAYOUT.block_tokens, pace=lambda n: None)

    def bad_write_done(n):
        raise RuntimeError("write callback bug (injected)")

    snic.submit_write(WriteJob(keys[:1], [_content(keys[0])], bad_write_done))
    written = threading.Event()
    snic.submit_write(WriteJob(keys[1:], [_content(keys[1])], lambda n: written.set()))
    assert written.wait(30) and snic.pending_writes == 0
    with pytest.raises(ValueError, match="1 keys but 2 blocks"):
        snic.submit_write(WriteJob(keys[:1], [_content(keys[0])] * 2))
    assert snic.pending_writes == 0

    def bad_read_done(job, ok, nbytes, t0, t1):
        raise RuntimeError("read callback bug (injected)")

    area = np.zeros((LAYOUT.num_layers, 2 * LAYOUT.block_tokens, LAYOUT.bytes_per_token_per_layer), np.uint8)
    snic.submit_read(ReadJob(1, 0, keys, 0, area, bad_read_done))
    got = _run_job(snic, keys, 0, area)
    assert got == {"ok": 2, "nbytes": 2 * LAYOUT.full_block_nbytes}
    assert "completion callback raised" in caplog.text
    snic.close()
    store.close()
