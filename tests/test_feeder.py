"""Layer feeder: ordering, overlap of loads with compute, bounded prefetch, errors, and both data paths
(PE path from a real KV store; DE path through a real transport with per-layer notifications)."""

from __future__ import annotations

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualpath_jax.block_keys import block_keys
from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.kv_store import LocalDirStore
from transport import make_transport
from transport.feeder import (
    BufferSaver,
    KVMissError,
    LayerFeeder,
    LayerForwarder,
    LayerLoadError,
    LayerSaveError,
    StoreLayerSource,
    TransportLayerSource,
    TransportSaver,
    layer_tag,
)

L, NBYTES = 6, 4096


def layer_bytes(layer: int, n: int = NBYTES) -> np.ndarray:
    return ((np.arange(n) * 7 + layer * 13) % 251).astype(np.uint8)


def test_layers_in_order_and_exact_bytes():
    calls = []

    def source(layer, out):
        calls.append(layer)
        out[:] = layer_bytes(layer)
        return out

    kept = []
    with LayerFeeder(L, source, NBYTES, prefetch=2) as f:
        f.start_load()
        for layer in range(L):
            x = f.wait_for_layer(layer)
            assert isinstance(x, jax.Array)
            np.testing.assert_array_equal(np.asarray(x), layer_bytes(layer))
            kept.append(x)
    assert calls == list(range(L))
    # the staging buffers were reused by later layers: earlier device arrays must not have changed
    for layer, x in enumerate(kept):
        np.testing.assert_array_equal(np.asarray(x), layer_bytes(layer))


def test_prefetch_is_bounded():
    """The loader never runs more than `prefetch` layers ahead of the consumer."""
    loaded = []
    consumer_at = [-1]
    gap = []

    def source(layer, out):
        gap.append(layer - consumer_at[0])
        loaded.append(layer)
        out[:] = layer
        return out

    with LayerFeeder(10, source, 64, prefetch=2) as f:
        for layer in range(10):
            f.wait_for_layer(layer)
            consumer_at[0] = layer
            time.sleep(0.01)  # "compute": the loader runs ahead meanwhile, but only 2 layers
    # loading layer l starts only after the consumer reached l - prefetch (0..2 loads before any wait)
    assert max(gap) <= 3 and loaded == list(range(10))
    # one staging buffer, reused for every layer (the loader stages one layer at a time)
    assert len(f._staging) == 1


def test_overlap_load_with_compute():
    """L layers, load t and compute c per layer: layer l+1 loads while layer l computes (checked on the recorded
    intervals, not on the total wall time, which a loaded machine stretches; that is bench_io's "overlap")."""
    n_layers, t_load, t_comp = 8, 0.03, 0.03
    loads, computes = {}, {}

    def source(layer, out):
        start = time.monotonic()
        time.sleep(t_load)  # a storage read / network transfer
        out[:] = layer
        loads[layer] = (start, time.monotonic())
        return out

    f = LayerFeeder(n_layers, source, 1024, prefetch=1)
    f.start_load()
    for layer in range(n_layers):
        f.wait_for_layer(layer)
        start = time.monotonic()
        time.sleep(t_comp)
        computes[layer] = (start, time.monotonic())
    f.close()
    # Layer l+1's load started before layer l's compute ended, and it began no later than that compute did
    # (the feeder does not wait for the consumer to prefetch).
    overlapped = [loads[i + 1][0] < computes[i][1] for i in range(n_layers - 1)]
    assert all(overlapped), (loads, computes)
    assert all(loads[i + 1][0] <= computes[i][0] + t_comp / 2 for i in range(n_layers - 1)), (loads, computes)


def test_failed_load_surfaces_as_error_not_garbage():
    def source(layer, out):
        if layer == 3:
            raise OSError("disk on fire")
        out[:] = layer
        return out

    with LayerFeeder(L, source, 256, prefetch=1, timeout_s=10) as f:
        for layer in range(3):
            assert int(np.asarray(f.wait_for_layer(layer))[0]) == layer
        for layer in (3, 4, 5):  # the failed layer and every later one fail; none hangs
            with pytest.raises(LayerLoadError, match="layer 3 failed: OSError: disk on fire"):
                f.wait_for_layer(layer)


def test_wrong_size_source_rejected_and_timeout():
    with (
        LayerFeeder(2, lambda layer, out: np.zeros(10, np.uint8), 256) as f,
        pytest.raises(LayerLoadError, match="gave 10 bytes"),
    ):
        f.wait_for_layer(0)
    stuck = threading.Event()
    with LayerFeeder(2, lambda layer, out: stuck.wait(5) and out, 8, timeout_s=0.1) as f:
        with pytest.raises(LayerLoadError, match="not loaded within"):
            f.wait_for_layer(0)
        stuck.set()


def test_save_layers_in_order_and_errors():
    dest = np.zeros(L * NBYTES, np.uint8)
    f = LayerFeeder(L, lambda layer, out: out, NBYTES, saver=BufferSaver(dest, lambda layer: layer * NBYTES))
    for layer in range(L):
        f.save_layer(layer, jnp.asarray(layer_bytes(layer)))
    f.wait_for_save()
    np.testing.assert_array_equal(dest.reshape(L, NBYTES), np.stack([layer_bytes(i) for i in range(L)]))

    def bad_saver(layer, host):
        if layer == 2:
            raise OSError("DE buffer gone")

    f2 = LayerFeeder(L, lambda layer, out: out, NBYTES, saver=bad_saver)
    for layer in range(L):
        f2.save_layer(layer, jnp.zeros(NBYTES, jnp.uint8))
    with pytest.raises(LayerSaveError, match="layer 2 failed: OSError: DE buffer gone"):
        f2.wait_for_save()
    f.close()
    f2.close()


@pytest.fixture
def store(tmp_path):
    layout = BlockLayout(num_layers=L, block_tokens=64, bytes_per_token_per_layer=32, fingerprint="test-feeder")
    s = LocalDirStore(tmp_path / "kv", layout)
    keys = block_keys(np.arange(4 * 64), 64)
    blocks = np.random.default_rng(0).integers(0, 256, (4, *layout.full_block_shape), dtype=np.uint8)
    for k, b in zip(keys, blocks, strict=True):
        assert s.write(k, b)
    yield s, layout, keys, blocks
    s.close()


def test_pe_path_from_store(store):
    """store -> PE buffer (staging) -> device, layer by layer; then new KV device -> host."""
    s, layout, keys, blocks = store
    src = StoreLayerSource(s, keys, layout)
    out = np.zeros((L, len(keys), 64, 32), np.uint8)
    f = LayerFeeder(
        L,
        src,
        src.layer_nbytes,
        prefetch=1,
        host_view=lambda h: h.reshape(len(keys), 64, 32),
        saver=BufferSaver(out, lambda layer: layer * src.layer_nbytes),
    )
    f.start_load()
    for layer in range(L):
        kv = f.wait_for_layer(layer)  # [blocks, tokens, bytes]
        np.testing.assert_array_equal(np.asarray(kv), blocks[:, layer])
        f.save_layer(layer, kv + 1)  # "new" KV computed from it
    f.wait_for_save()
    f.close()
    np.testing.assert_array_equal(out, (blocks.transpose(1, 0, 2, 3) + 1).astype(np.uint8))


def test_store_miss_and_corruption_fail_the_layer(store):
    s, layout, keys, _ = store
    # a missing block
    f = LayerFeeder(L, StoreLayerSource(s, keys + [b"\x00" * 16], layout), 5 * layout.layer_block_nbytes)
    with pytest.raises(LayerLoadError, match="miss"):
        f.wait_for_layer(0)
    f.close()
    # a corrupted block file: the checksum fails, the feed reports a miss instead of returning bad KV
    path = s.path_of(keys[1])
    with open(path, "r+b") as fh:
        fh.seek(-100, 2)
        fh.write(b"\xff" * 50)
    f = LayerFeeder(L, StoreLayerSource(s, keys, layout), 4 * layout.layer_block_nbytes)
    with pytest.raises(LayerLoadError, match="miss"):
        for layer in range(L):
            f.wait_for_layer(layer)
    f.close()


@pytest.mark.parametrize("backend", ["inproc", "tcp"])
def test_de_path_through_transport(store, backend):
    """store -> DE buffer -> transport -> PE (notification per layer) -> device; miss KV back to the DE."""
    s, layout, keys, blocks = store
    nb = len(keys) * layout.layer_block_nbytes
    miss_nb = layout.layer_block_nbytes  # one block of miss tokens per layer
    de = make_transport({"backend": backend, "name": f"de-{backend}"})
    pe = make_transport({"backend": backend, "name": f"pe-{backend}"})
    try:
        de_buf = np.zeros(2 * nb + L * miss_nb, np.uint8)  # forward staging ring + miss KV landing area
        pe_buf = np.zeros(L * nb + L * miss_nb, np.uint8)  # per-layer landing slots + miss staging
        de.register("de_buffer", de_buf)
        pe.register("pe_buffer", pe_buf)
        de.connect(pe.name, pe.address)
        pe.wait_for_peer(de.name)
        req = 7
        fwd = LayerForwarder(
            de,
            pe.name,
            StoreLayerSource(s, keys, layout),
            L,
            nb,
            "de_buffer",
            0,
            "pe_buffer",
            lambda layer: layer * nb,
            lambda layer: layer_tag(req, layer),
            prefetch=1,
        )
        saver = TransportSaver(
            pe,
            de.name,
            "pe_buffer",
            lambda layer: L * nb + layer * miss_nb,
            "de_buffer",
            lambda layer: 2 * nb + layer * miss_nb,
            tag_fn=lambda layer: layer_tag(req, 1000 + layer),
        )
        f = LayerFeeder(
            L,
            TransportLayerSource(
                pe, "pe_buffer", lambda layer: layer * nb, nb, lambda layer: layer_tag(req, layer), peer=de.name
            ),
            nb,
            prefetch=1,
            host_view=lambda h: h.reshape(len(keys), 64, 32),
            saver=saver,
        )
        done = fwd.start()
        f.start_load()
        for layer in range(L):
            kv = f.wait_for_layer(layer)
            np.testing.assert_array_equal(np.asarray(kv), blocks[:, layer])
            f.save_layer(layer, kv[0] ^ 0x55)  # the miss block's KV of this layer
        f.wait_for_save()
        assert done.result(10) == L
        for layer in range(L):
            n = de.wait_notification(tag=layer_tag(req, 1000 + layer), timeout=5)
            assert n.peer == pe.name
        np.testing.assert_array_equal(de_buf[2 * nb :].reshape(L, 64, 32), blocks[0] ^ 0x55)
        f.close()
    finally:
        de.close()
        pe.close()


def test_de_path_sender_miss_fails_fast(store):
    """A block missing on the DE side: the PE's wait for that layer fails at once with a miss, never garbage."""
    s, layout, keys, _ = store
    nb = 5 * layout.layer_block_nbytes
    de = make_transport({"backend": "inproc", "name": "de-miss"})
    pe = make_transport({"backend": "inproc", "name": "pe-miss"})
    try:
        de.register("de_buffer", np.zeros(2 * nb, np.uint8))
        pe.register("pe_buffer", np.zeros(L * nb, np.uint8))
        de.connect(pe.name, pe.address)
        fwd = LayerForwarder(
            de,
            pe.name,
            StoreLayerSource(s, keys + [b"\x01" * 16], layout),
            L,
            nb,
            "de_buffer",
            0,
            "pe_buffer",
            lambda layer: layer * nb,
            lambda layer: layer_tag(3, layer),
        )
        f = LayerFeeder(
            L,
            TransportLayerSource(pe, "pe_buffer", lambda layer: layer * nb, nb, lambda layer: layer_tag(3, layer)),
            nb,
            timeout_s=30,
        )
        done = fwd.start()
        t0 = time.monotonic()
        with pytest.raises(LayerLoadError, match="could not load it"):
            f.wait_for_layer(0)
        assert time.monotonic() - t0 < 5
        with pytest.raises(KVMissError, match="not in the store"):
            done.result(10)
        assert not pe.region("pe_buffer").obj.any(), "no bytes of a failed layer were forwarded"
        f.close()
    finally:
        de.close()
        pe.close()


def _source(layer, out):
    out[:] = layer_bytes(layer, out.nbytes)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_layers": 0}, ValueError, "num_layers must be > 0, got 0"),
        ({"prefetch": -1}, ValueError, "prefetch must be >= 0, got -1"),
        ({"layer_nbytes": -8}, ValueError, "layer_nbytes must be >= 0, got -8"),
    ],
)
def test_bad_feeder_arguments_are_named(kwargs, error, match):
    args = {"num_layers": L, "source": _source, "layer_nbytes": NBYTES} | kwargs
    with pytest.raises(error, match=match):
        LayerFeeder(**args)


def test_forwarder_refuses_a_negative_prefetch():
    """prefetch=-1 used to fail the DE's thread with a ZeroDivisionError and tell the PE every layer was a miss."""
    de = make_transport({"backend": "inproc", "name": "de-prefetch"})
    try:
        de.register("de_buffer", np.zeros(NBYTES, np.uint8))
        with pytest.raises(ValueError, match="prefetch must be >= 0, got -1"):
            LayerForwarder(
                de,
                "pe",
                _source,
                L,
                NBYTES,
                "de_buffer",
                0,
                "pe_buffer",
                lambda layer: 0,
                lambda layer: layer,
                prefetch=-1,
            )
    finally:
        de.close()


def test_misuse_of_a_feeder_is_a_clear_error():
    """A layer outside 0..L-1, or saving through a feeder built without a saver, names what is wrong."""
    with LayerFeeder(L, _source, NBYTES, name="pe3") as feed:
        with pytest.raises(IndexError, match=r"pe3: layer 6 out of range 0\.\.5"):
            feed.wait_for_layer(L)
        with pytest.raises(IndexError, match="out of range"):
            feed.wait_for_layer(-1)
        with pytest.raises(RuntimeError, match="pe3: save_layer needs a saver"):
            feed.save_layer(0, np.zeros(NBYTES, np.uint8))
        np.testing.assert_array_equal(np.asarray(feed.wait_for_layer(0)).reshape(-1).view(np.uint8), layer_bytes(0))
    with pytest.raises(ValueError, match="layer 4096 out of range for a layer tag"):
        layer_tag(1, 4096)


def test_save_after_close_is_refused():
    """A closed feeder takes no more saves (it used to start a fresh save thread if none had run yet, or fail
    with the executor's "cannot schedule new futures after shutdown")."""
    saved = []
    for save_first in (False, True):
        feed = LayerFeeder(L, _source, NBYTES, saver=lambda layer, host: saved.append(layer), name="pe4")
        if save_first:
            feed.save_layer(0, np.zeros(8, np.uint8))
            feed.wait_for_save(5)
        feed.close()
        with pytest.raises(RuntimeError, match="pe4: save_layer after close"):
            feed.save_layer(1, np.zeros(8, np.uint8))
        assert feed._save_pool is None or feed._save_pool._shutdown
    assert saved == [0]


def test_buffer_saver_refuses_a_layer_outside_its_buffer():
    saver = BufferSaver(np.zeros(2 * NBYTES, np.uint8), offset_fn=lambda layer: layer * NBYTES)
    saver(1, np.ones(NBYTES, np.uint8))  # fits: [4096, 8192)
    with pytest.raises(LayerSaveError, match=r"layer 2: \[8192, 12288\) outside the 8192-byte buffer"):
        saver(2, np.ones(NBYTES, np.uint8))


@pytest.mark.parametrize(
    "buffer",
    [
        np.zeros((8, 2 * NBYTES), np.uint8)[:, ::2],  # strided
        np.zeros(NBYTES, np.uint8)[::-1],  # reversed
        np.frombuffer(bytes(NBYTES), np.uint8),  # read-only
    ],
)
def test_buffer_saver_refuses_a_buffer_it_would_not_write_into(buffer):
    """A non-contiguous buffer would be flattened into a copy, so saved layers would vanish silently; a
    read-only one would fail every save."""
    with pytest.raises(ValueError, match="BufferSaver: the buffer must be a writable C-contiguous array"):
        BufferSaver(buffer, offset_fn=lambda layer: 0)


def test_failing_a_layer_the_loader_just_settled_is_not_an_error():
    """close() and the loader may settle the same layer at once: close() checks done(), the loader sets the result,
    then close() fails it. The first settlement wins and close() does not raise InvalidStateError."""
    from concurrent.futures import Future

    from transport.feeder import _fail

    class Raced(Future):
        def done(self):  # what close() saw just before the loader's set_result
            return False

    f = Raced()
    f.set_result("layer 0")
    _fail(f, RuntimeError("feeder closed"))
    assert f.result() == "layer 0"
