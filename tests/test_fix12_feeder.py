"""Fix pass 12, the layer feeder and host buffer pools used on their own (each test failed on the code before)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from transport import make_transport
from transport.feeder import LayerFeeder, LayerForwarder, LayerLoadError, TransportLayerSource, layer_tag

L = 4


@pytest.mark.parametrize("backend", ["inproc", "tcp"])
@pytest.mark.parametrize("how", ["close", "disconnect"])
def test_de_path_fails_at_once_when_the_decode_engine_goes_mid_feed(backend, how):
    """The DE goes after layer 1 reached the PE: the PE's wait for layer 2 fails naming the lost peer, instead of
    waiting out its whole timeout for a notification that can never come (its failure signal cannot come either)."""
    nb = 512
    de = make_transport({"backend": backend, "name": f"de-gone-{backend}-{how}"})
    pe = make_transport({"backend": backend, "name": f"pe-gone-{backend}-{how}"})
    gone = threading.Event()

    def source(layer, out):
        if layer >= 2:
            gone.wait(10)  # layers 2.. are read only once the DE is gone
        out[:] = layer + 1
        return out

    try:
        de.register("de_buffer", np.zeros(2 * nb, np.uint8))
        pe.register("pe_buffer", np.zeros(L * nb, np.uint8))
        de.connect(pe.name, pe.address)
        pe.wait_for_peer(de.name)
        fwd = LayerForwarder(
            de, pe.name, source, L, nb, "de_buffer", 0, "pe_buffer", lambda layer: layer * nb,
            lambda layer: layer_tag(9, layer),
        )  # fmt: skip
        tags = [layer_tag(9, layer) for layer in range(L)]
        src = TransportLayerSource(pe, "pe_buffer", lambda layer: layer * nb, nb, tags.__getitem__, de.name, 20)
        done = fwd.start()
        with LayerFeeder(L, src, nb, timeout_s=20, to_device=np.array) as f:
            for layer in range(2):
                np.testing.assert_array_equal(f.wait_for_layer(layer), np.full(nb, layer + 1, np.uint8))
            de.close() if how == "close" else de.disconnect(pe.name)
            gone.set()
            t0 = time.monotonic()
            with pytest.raises(LayerLoadError, match=f"layer 2 failed: PeerLostError: .*{de.name}"):
                f.wait_for_layer(2)
            assert time.monotonic() - t0 < 15, "waited out the timeout"
        with pytest.raises(Exception):  # noqa: B017 - the forwarder fails too (closed, or the PE lost)
            done.result(10)
    finally:
        de.close()
        pe.close()


def test_closing_a_pool_fails_its_waiters_at_once_and_keeps_the_budget():
    """A request waiting (no timeout) on a pool being closed fails naming the closed pool (it waited for ever);
    later requests are refused; slots held at close can still be released, so no budget is lost."""
    from dualpath_jax.host_buffers import BufferPoolClosed, HostBufferPool

    pool = HostBufferPool(4096, num_slots=2, name="pe0")
    held = pool.acquire(nslots=2)
    result: list[BaseException] = []
    waiter = threading.Thread(target=lambda: result.append(_raised(lambda: pool.acquire(nslots=1))), daemon=True)
    waiter.start()
    deadline = time.monotonic() + 10
    while not pool._queue and time.monotonic() < deadline:  # the request is waiting
        time.sleep(0.01)
    pool.close()
    waiter.join(10)
    assert not waiter.is_alive(), "the waiter still waits on the closed pool"
    assert isinstance(result[0], BufferPoolClosed) and "'pe0'" in str(result[0]), result
    with pytest.raises(BufferPoolClosed, match="pool 'pe0' is closed"):
        pool.acquire(nslots=1, timeout=0)
    held.release()
    assert pool.free_slots == 2 and pool.stats().bytes_in_use == 0
    pool.close()  # idempotent


def _raised(fn) -> BaseException | None:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001
        return e
    return None


def test_a_pool_the_host_cannot_map_is_named():
    """A budget no host can map (1 EiB, a typo'd unit) named neither the pool nor the size: a bare `OSError: [Errno 12]
    Cannot allocate memory` (and an `OverflowError` past ssize_t)."""
    from dualpath_jax.host_buffers import HostBufferPool

    with pytest.raises(OSError, match=r"host buffer pool 'de1': cannot map 1152921504606846976 B"):
        HostBufferPool(4096, budget_bytes=1 << 60, name="de1", prefault=False)
    with pytest.raises(ValueError, match=r"host buffer pool 'de1': .*larger than"):
        HostBufferPool(4096, budget_bytes=1 << 70, name="de1", prefault=False)


def test_a_pe_buffer_a_source_reads_into_is_released_only_once_the_loader_is_done(tmp_path):
    """PE path store -> PE buffer (a pool's slots) -> device; the consumer raises in layer 0 while the loader reads
    layer 1 from a slow disk. `close()` does not wait for a running source (a dead peer held it), so the PE buffer could
    be released, and handed to another request, while the read still wrote into it: `join(timeout)` waits for the
    loader, and the buffer goes back only then, holding no other request's bytes."""
    from dualpath_jax.block_keys import block_keys
    from dualpath_jax.host_buffers import HostBufferPool
    from dualpath_jax.kv_layout import BlockLayout
    from dualpath_jax.kv_store import LocalDirStore
    from transport.feeder import StoreLayerSource

    layout = BlockLayout(num_layers=L, block_tokens=16, bytes_per_token_per_layer=8, fingerprint="fix12-feeder")
    store = LocalDirStore(tmp_path / "kv", layout)
    keys = block_keys(np.arange(2 * 16), 16)
    blocks = np.random.default_rng(1).integers(0, 256, (2, *layout.full_block_shape), dtype=np.uint8)
    for k, b in zip(keys, blocks, strict=True):
        assert store.write(k, b)
    reads = StoreLayerSource(store, keys, layout, parallel=False)
    pool = HostBufferPool(reads.layer_nbytes, num_slots=1, name="pe0")
    buf = pool.acquire(reads.layer_nbytes)
    reading, disk = threading.Event(), threading.Event()

    def source(layer, out):  # into the PE buffer, not the feeder's staging
        pe_buffer = buf.contiguous_view()
        if layer == 1:
            reading.set()
            disk.wait(10)  # a slow disk: the read into the PE buffer is under way
        return reads(layer, pe_buffer)

    try:
        f = LayerFeeder(L, source, reads.layer_nbytes, timeout_s=20, to_device=np.array)
        with pytest.raises(KeyError), f:
            np.testing.assert_array_equal(f.wait_for_layer(0).reshape(2, 16, 8), blocks[:, 0])
            assert reading.wait(10)
            raise KeyError("the consumer fails in layer 0")
        threading.Timer(0.2, disk.set).start()
        assert f.join(10), "the loader still runs"
        buf.release()
        with pool.acquire(reads.layer_nbytes, timeout=0) as other:  # the next request's PE buffer
            other.contiguous_view()[:] = 0xEE
            time.sleep(0.1)
            assert (other.contiguous_view() == 0xEE).all(), "the feed wrote into a buffer it no longer owned"
        assert pool.free_slots == pool.num_slots
    finally:
        disk.set()
        store.close()


def test_a_named_peer_that_connects_after_the_feed_started_is_waited_for():
    """Only a peer seen connected and then gone is lost: a DE that connects after the PE's feed began is waited for."""
    nb = 256
    de = make_transport({"backend": "inproc", "name": "de-late"})
    pe = make_transport({"backend": "inproc", "name": "pe-late"})

    def source(layer, out):
        out[:] = layer + 1
        return out

    try:
        de.register("de_buffer", np.zeros(2 * nb, np.uint8))
        pe.register("pe_buffer", np.zeros(L * nb, np.uint8))
        tags = [layer_tag(2, layer) for layer in range(L)]
        src = TransportLayerSource(pe, "pe_buffer", lambda layer: layer * nb, nb, tags.__getitem__, de.name, 20)
        with LayerFeeder(L, src, nb, timeout_s=20, to_device=np.array) as f:
            f.start_load()
            time.sleep(0.5)  # the PE waits for layer 0 before the DE is connected
            de.connect(pe.name, pe.address)
            fwd = LayerForwarder(
                de, pe.name, source, L, nb, "de_buffer", 0, "pe_buffer", lambda x: x * nb, tags.__getitem__
            )
            done = fwd.start()
            for layer in range(L):
                np.testing.assert_array_equal(f.wait_for_layer(layer), np.full(nb, layer + 1, np.uint8))
        assert done.result(10) == L
    finally:
        de.close()
        pe.close()


@pytest.mark.parametrize("backend", ["inproc", "tcp"])
def test_a_layer_whose_wait_starts_after_the_peer_went_fails_at_once(backend):
    """The source saw the DE connected while it waited for layer 0; the DE then goes before the wait for layer 1
    starts (a loader thread late under load): that wait fails with PeerLostError within the peer check, not after its
    whole timeout (each wait tracked "seen connected" on its own, so this one never saw the peer: the CI flake of
    test_de_path_fails_at_once_when_the_decode_engine_goes_mid_feed, 2026-12-05)."""
    from transport.base import PeerLostError

    nb = 64
    de = make_transport({"backend": backend, "name": f"de-late-{backend}"})
    pe = make_transport({"backend": backend, "name": f"pe-late-{backend}"})
    try:
        de.register("src", np.ones(nb, np.uint8))
        pe.register("pe_buffer", np.zeros(2 * nb, np.uint8))
        de.connect(pe.name, pe.address)
        pe.wait_for_peer(de.name)
        src = TransportLayerSource(pe, "pe_buffer", lambda layer: layer * nb, nb, lambda layer: 40 + layer, de.name, 8)
        de.write(pe.name, "src", 0, "pe_buffer", 0, nb, notify=40).result(10)
        np.testing.assert_array_equal(src(0, np.empty(nb, np.uint8)), np.ones(nb, np.uint8))
        de.close()
        deadline = time.monotonic() + 10
        while de.name in pe.peers() and time.monotonic() < deadline:  # (tcp: the PE sees the close a little later)
            time.sleep(0.01)
        t0 = time.monotonic()
        with pytest.raises(PeerLostError, match=f"layer 1: peer {de.name!r} is gone"):
            src(1, np.empty(nb, np.uint8))
        assert time.monotonic() - t0 < 6, "waited out the timeout"
    finally:
        de.close()
        pe.close()
