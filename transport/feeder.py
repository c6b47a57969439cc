"""The layer feeder: per-layer host -> device feeding with prefetch, and device -> host saves of new KV.

Layerwise prefill (DESIGN.md "Data paths") keeps one layer's KV of the batch in device memory: while layer
l computes, layer l+1's KV is being read from storage or received from a decode engine, then copied to the
device. The feeder is that pipeline, with the hooks of vLLM's KV connector:

    feeder.start_load()                 # kick off loads of the first layers
    for l in range(L):
        kv_l = feeder.wait_for_layer(l) # device array of layer l (loads of l+1.. run meanwhile)
        kv_l, hidden = layer_step(params, kv_l, hidden, meta)
        feeder.save_layer(l, kv_l)      # device -> host of the new KV, sent on in the background
    feeder.wait_for_save()

It is generic over where bytes come from and go to:

- a **source** fills a host staging buffer with layer l's bytes: `source(layer, out) -> array`. It may
  fill `out` and return it, or return a view of memory it owns (bytes a transport already wrote into a
  registered region). `StoreLayerSource` reads the Layer Blocks of a request's hit blocks from the KV
  store (PE path: store -> PE buffer -> device); `TransportLayerSource` waits for the notification "layer
  l arrived" and returns the view of the region it landed in (DE path: store -> DE buffer -> transport ->
  PE). A source raises on failure (a store miss, a lost peer); the feeder surfaces it as
  `LayerLoadError` from `wait_for_layer`, never as garbage KV.
- the **sink** moves a host array to the device (default `jax.device_put` + `block_until_ready`, so the
  staging buffer can be reused);
- a **saver** takes layer l's new KV as a host array: `saver(layer, host) -> Future | None` (e.g.
  `TransportSaver`: write it into the DE buffer with a notification).

`close()` stops the feed but does not wait for a source still running (blocked on a slow disk or a dead peer);
`join(timeout)` waits for it, before memory the source writes into is released or reused.

At most `prefetch` layers beyond the one being computed are loading or loaded, so device memory holds at
most `prefetch + 1` layers of KV of this feed. One host staging buffer is preallocated and reused (no per-layer
allocation): the loader stages one layer at a time, and the sink has copied it out (it keeps no reference to the
staging buffer) before the next layer's source runs.
"""

from __future__ import annotations

import array
import bisect
import logging
import numbers
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, InvalidStateError, ThreadPoolExecutor
from typing import Any, Protocol, Self

import numpy as np

from transport.base import PeerLostError, deadline

log = logging.getLogger(__name__)

CLOSE_SINK_WAIT_S = 5.0  # `close` waits at most this long for a layer's device copy that is running
PEER_CHECK_S = 0.2  # a `TransportLayerSource` waiting on a named peer checks this often that the peer is still there


def _fail(fut: Future, err: BaseException) -> None:
    """Fail `fut` unless it is done; the loader and close() may race to settle a layer (the first one wins)."""
    try:
        if not fut.done():
            fut.set_exception(err)
    except InvalidStateError:
        pass


class LayerLoadError(RuntimeError):
    """Layer l's KV could not be loaded (store miss or corruption, lost peer, timeout)."""


class LayerSaveError(RuntimeError):
    """Saving layer l's new KV failed."""


class LayerSaveTimeout(LayerSaveError, TimeoutError):
    """`wait_for_save(timeout)` ran out of time; the saves it names are still running (and still tracked)."""


class KVMissError(LookupError):
    """The store has no valid copy of a block (missing, truncated or checksum failure)."""


class LayerSource(Protocol):
    def __call__(self, layer: int, out: np.ndarray) -> np.ndarray:
        """Put layer `layer`'s bytes into `out` (uint8, `layer_nbytes`) and return it, or return a view of
        other host memory holding them; raise on failure."""


LayerSaver = Callable[[int, np.ndarray], "Future | None"]


def default_to_device(host: np.ndarray) -> Any:
    """Copy a host array to the default device and wait, so its staging buffer may be reused.

    XLA:CPU may alias a suitably aligned numpy buffer instead of copying it (zero-copy `device_put`, even
    with may_alias=False, measured with jax 0.10.2), which would let the next layer's bytes overwrite this
    layer's "device" array; on CPU the bytes are therefore copied first. Accelerators copy H2D anyway.
    """
    import jax

    if jax.default_backend() == "cpu":
        host = np.array(host, copy=True)
    x = jax.device_put(host)
    x.block_until_ready()
    return x


def aligned_empty(nbytes: int, align: int = 4096) -> np.ndarray:
    """An uninitialised uint8 buffer whose first byte is `align`-aligned (page-aligned staging for O_DIRECT
    reads and RDMA registration)."""
    raw = np.empty(nbytes + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start : start + nbytes]


def layer_tag(request_id: int, layer: int) -> int:
    """The notification tag of "layer `layer` of request `request_id` arrived": `request_id << 12 | layer` (ints;
    numpy ints fine)."""
    # (a float was truncated: layer 1.7 got layer 1's tag, request 2.5 request 2's)
    request_id = _count("layer_tag: request_id", request_id)
    layer = _count("layer_tag: layer", layer)
    if not 0 <= layer < 4096:
        raise ValueError(f"layer {layer} out of range for a layer tag (0..4095)")
    # (a larger id made a tag past the wire's signed 64 bits: the sender's write was refused, and its failure signal
    # with it, while the receiver waited for that tag until its timeout)
    if not -(1 << 51) <= request_id < 1 << 51:
        raise ValueError(f"request id {request_id} out of range for a layer tag (a signed 52-bit integer)")
    return (request_id << 12) | layer


def _count(what: str, value: Any) -> int:
    """`value` as a Python int; refuses bools, floats and other non-integers by name (numpy ints are fine)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be an int, got {value!r} ({type(value).__name__})")
    return int(value)


def _check_timeout(what: str, timeout: float | None) -> None:
    """A timeout as the transports take one (`transport.base.deadline`: a number of seconds or None; bools, strings
    and NaN refused by name; inf = forever), and not negative."""
    try:  # (True was taken as a 1 s timeout, "5" failed on `>=` with no name)
        deadline(timeout)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{what}: {e}") from None
    if timeout is not None and timeout < 0:  # (a negative one waited 0 s)
        raise ValueError(f"{what} must be >= 0 s or None, got {timeout}")


def _remaining(until: float | None) -> float | None:
    """Seconds left to a `deadline` (None: forever; a lock cannot wait inf or 1e300 s: OverflowError)."""
    return None if until is None else max(0.0, until - time.monotonic())


class _LayerResults:
    """A feed's per-layer futures, made when first asked for and dropped once the consumer moved past them (a feed
    of 10**6 layers made 10**6 Futures, each with its Condition, before any ran: 18 s and 1.7 GB). A layer asked for
    after it was dropped (`release`), failed (`fail_from`) or closed (`close`) gets a future failed as it would have."""

    def __init__(self, num_layers: int, name: str):
        self.num_layers, self.name = num_layers, name
        self._futs: dict[int, Future] = {}
        self._lock = threading.Lock()  # (taken under the feeder's, never the other way round)
        self._loaded = 0  # layers < this were loaded (the loader goes in order)
        self._released = 0  # layers < this the consumer moved past
        # Releases of more than one layer, wait_for_layer(upto) from `start` (ascending; one layer d: upto = d + 1).
        self._starts, self._uptos = array.array("q"), array.array("q")
        self._failed: tuple[int, BaseException] | None = None  # (first failed layer, its error)
        self._closed: BaseException | None = None

    def __getitem__(self, layer: int) -> Future:
        with self._lock:
            fut = self._futs.get(layer)
            if fut is None:
                fut = Future()
                err = self._error(layer)
                if err is not None:
                    fut.set_exception(err)  # (a new future: no callbacks run under the lock)
                else:
                    self._futs[layer] = fut
            return fut

    def __len__(self) -> int:
        return self.num_layers

    def __iter__(self):
        """Every layer's future, in order (made as it goes, as by `[]`)."""
        return (self[layer] for layer in range(self.num_layers))

    def _error(self, layer: int) -> BaseException | None:
        if layer < self._released and layer < self._loaded:
            i = bisect.bisect_right(self._starts, layer) - 1
            at = self._uptos[i] if i >= 0 and layer < self._uptos[i] else layer + 1
            return LayerLoadError(
                f"{self.name}: layer {layer} was released (wait_for_layer({at}) moved past it): the feeder no longer "
                "holds it"
            )
        if self._closed is not None:
            return self._closed
        if self._failed is not None and layer >= self._failed[0]:
            return self._failed[1]
        return None

    def loaded(self, layer: int) -> None:
        """Layer `layer` is settled (its future set); dropped at once if released meanwhile."""
        with self._lock:
            self._loaded = max(self._loaded, layer + 1)
            if layer < self._released and self._futs.get(layer) is not None and self._futs[layer].done():
                del self._futs[layer]

    def release(self, upto: int) -> None:
        """The consumer moved to layer `upto`: layers before it go (one still loading, once `loaded`)."""
        with self._lock:
            if upto <= self._released:
                return
            for layer in range(self._released, upto):
                fut = self._futs.get(layer)
                if fut is not None and fut.done():
                    del self._futs[layer]
            if upto > self._released + 1:
                self._starts.append(self._released)
                self._uptos.append(upto)
            self._released = upto

    def fail_from(self, layer: int, err: BaseException) -> None:
        """Layer `layer` and every later one fail with `err` (those settled already keep their result)."""
        with self._lock:
            if self._failed is None or layer < self._failed[0]:
                self._failed = (layer, err)
            futs = [f for i, f in self._futs.items() if i >= layer]
        for f in futs:
            _fail(f, err)

    def close(self, err: BaseException) -> None:
        """Every layer fails with `err` from now on, loaded ones too (their device arrays are no longer held)."""
        with self._lock:
            self._closed = err
            futs = list(self._futs.items())
        for i, f in futs:
            _fail(f, err)
            if f.exception() is None:  # (loaded: its array dropped)
                with self._lock:
                    if self._futs.get(i) is f:
                        del self._futs[i]


def _load_loop(ref: weakref.ref) -> None:
    """The loader thread of a `LayerFeeder` (`ref` to it): layers in order, each once a token is free. It holds the
    feeder only while it loads a layer, so a feeder dropped without `close()` goes, and this thread with it."""
    layer = 0
    while True:
        feeder = ref()
        if feeder is None or feeder._stop.is_set() or layer >= feeder.num_layers:
            return
        tokens = feeder._tokens
        del feeder  # (not held while waiting for a token)
        if not tokens.acquire(timeout=0.1):
            continue
        feeder = ref()
        if feeder is None or not feeder._load(layer):
            return
        del feeder
        layer += 1


class LayerFeeder:
    """Prefetching per-layer loader (host -> device) and background saver (device -> host).

    Args:
      num_layers: L, layers to feed, in order 0..L-1.
      source: `source(layer, out) -> host array` (see the module docstring).
      layer_nbytes: bytes of one layer's KV for this feed (size of each staging buffer).
      prefetch: layers loaded ahead of the one being computed (>= 1 for overlap; 0 = no overlap).
      host_view: optional `host array -> array` applied before the sink (e.g. reshape/bitcast to the
        model's KV dtype and shape; must be a view, not a copy).
      to_device: the sink (default `default_to_device`); must not keep a reference to the staging buffer.
      saver: where `save_layer` sends new KV; None = saving is an error.
      timeout_s: how long `wait_for_layer` waits before failing (None or math.inf = forever).
    """

    def __init__(
        self,
        num_layers: int,
        source: LayerSource,
        layer_nbytes: int,
        *,
        prefetch: int = 1,
        host_view: Callable[[np.ndarray], np.ndarray] | None = None,
        to_device: Callable[[np.ndarray], Any] | None = None,
        saver: LayerSaver | None = None,
        timeout_s: float | None = 60.0,
        name: str = "feed",
    ):
        num_layers = _count(f"{name}: num_layers", num_layers)
        prefetch = _count(f"{name}: prefetch", prefetch)
        layer_nbytes = _count(f"{name}: layer_nbytes", layer_nbytes)
        if num_layers <= 0:
            raise ValueError(f"num_layers must be > 0, got {num_layers}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        if layer_nbytes < 0:
            raise ValueError(f"layer_nbytes must be >= 0, got {layer_nbytes}")
        _check_timeout(f"{name}: timeout_s", timeout_s)
        own = getattr(source, "layer_nbytes", None)  # (a mismatch failed only at the first wait_for_layer, a reshape)
        if isinstance(own, numbers.Integral) and not isinstance(own, bool) and own != layer_nbytes:
            raise ValueError(
                f"{name}: layer_nbytes={layer_nbytes} but its source gives layers of {own} bytes "
                f"({type(source).__name__}.layer_nbytes)"
            )
        self.num_layers, self.source, self.layer_nbytes = num_layers, source, layer_nbytes
        self.prefetch, self.host_view, self.saver = prefetch, host_view, saver
        self.to_device = to_device or default_to_device
        self.timeout_s, self.name = timeout_s, name
        # One layer is staged at a time: the one loader thread fills it (source) and the sink copies it out before
        # the next. (min(prefetch + 1, L) buffers were allocated, prefetch of them never used: prefetch=3 with 1 GiB
        # layers kept 3 GiB of host memory idle. The tokens bound the layers on the device, not the staging.)
        self._staging = [aligned_empty(self.layer_nbytes)]
        self._results = _LayerResults(num_layers, name)  # (made as asked for: not one Future per layer up front)
        self._tokens = threading.Semaphore(prefetch + 1)  # layers loading, loaded or being computed
        self._released = 0  # layers whose token went back (consumer moved past them)
        self._lock = threading.Lock()
        self._loader: threading.Thread | None = None
        self._stop = threading.Event()  # set by close() with `_lock` held
        self._sinking = False  # the loader is copying a layer to the device (set with `_lock` held, stop not set)
        self._sunk = threading.Condition(self._lock)  # notified when it is done
        self._saves: list[tuple[int, Future]] = []
        self._save_pool: ThreadPoolExecutor | None = None
        # per-layer timing (monotonic s): load start/end, consumer wait start/end (for overlap checks)
        self.load_times: list[tuple[float, float]] = [(np.nan, np.nan)] * num_layers
        self.wait_times: list[tuple[float, float]] = [(np.nan, np.nan)] * num_layers

    # ---- loading --------------------------------------------------------------------------------------
    def start_load(self) -> None:
        """Start the background loader (idempotent)."""
        with self._lock:
            if self._loader is not None:
                return
            # (the thread holds the feeder only while it loads a layer: a feeder dropped part way without close() was
            # kept alive for ever by its loader, polling for a token, with its staging buffers and loaded layers)
            self._loader = threading.Thread(
                target=_load_loop, args=(weakref.ref(self),), name=f"feeder-{self.name}", daemon=True
            )
            self._loader.start()

    def _load(self, layer: int) -> bool:
        """Load layer `layer` (its token taken); False when it failed (it and every later layer are failed)."""
        if self._stop.is_set():
            return False
        fut = self._results[layer]
        t0 = time.monotonic()
        try:
            out = self._staging[0]
            host = self.source(layer, out)
            host = out if host is None else host
            if not isinstance(host, np.ndarray):
                host = np.frombuffer(host, dtype=np.uint8)
            if host.nbytes != self.layer_nbytes:
                raise LayerLoadError(
                    f"{self.name}: source gave {host.nbytes} bytes for layer {layer}, expected {self.layer_nbytes}"
                )
            if self.host_view is not None:
                host = self.host_view(host)
            # Closed while the source ran: close() failed the layer, so no device copy of it (it was copied anyway and
            # then dropped: device memory taken again for a feed already torn down, e.g. a request whose peer died).
            # Checked with `_lock` held: close() either sees the copy running (and waits for it) or no copy starts.
            with self._lock:
                if self._stop.is_set():
                    return False
                self._sinking = True
            try:
                x = self.to_device(host)
            finally:
                with self._lock:
                    self._sinking = False
                    self._sunk.notify_all()
            self.load_times[layer] = (t0, time.monotonic())  # before the consumer may look (it was NaN then)
            fut.set_result(x)
            del x
            self._results.loaded(layer)  # (dropped at once if the consumer moved past it while it loaded)
        except BaseException as e:  # noqa: BLE001 - surfaced by wait_for_layer
            if isinstance(e, LayerLoadError):
                err = e
            else:
                err = LayerLoadError(f"{self.name}: loading layer {layer} failed: {type(e).__name__}: {e}")
                err.__cause__ = e
            self._results.fail_from(layer, err)  # this layer and all later ones fail: no hang, no garbage
            return False
        return True

    def wait_for_layer(self, layer: int) -> Any:
        """Block until layer `layer` is on the device and return it; raises `LayerLoadError` on failure.

        Calling it for layer l also tells the feeder that layers < l are done (their slots are reused, their device
        arrays no longer held: waiting for one of them again raises `LayerLoadError`).
        """
        # (a float layer released the layers before it, then failed on the list index: an unclear error, layers lost)
        layer = _count(f"{self.name}: layer", layer)
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"{self.name}: layer {layer} out of range 0..{self.num_layers - 1}")
        if self._stop.is_set():
            raise LayerLoadError(f"{self.name}: feeder closed (wait_for_layer({layer}) after close)")
        self.start_load()
        with self._lock:
            if self._released < layer:
                self._results.release(layer)
            while self._released < layer:
                self._released += 1
                self._tokens.release()
        t0 = time.monotonic()
        try:
            x = self._results[layer].result(timeout=_remaining(deadline(self.timeout_s)))
        except TimeoutError:
            raise LayerLoadError(f"{self.name}: layer {layer} not loaded within {self.timeout_s} s") from None
        self.wait_times[layer] = (t0, time.monotonic())
        return x

    # ---- saving ---------------------------------------------------------------------------------------
    def save_layer(self, layer: int, kv: Any) -> None:
        """Copy layer `layer`'s new KV device -> host and hand it to the saver, in the background, in order (`layer`: an
        int in 0..L-1, checked at the call)."""
        # (a float layer was taken, and only failed later in the saver, reported by wait_for_save)
        layer = _count(f"{self.name}: layer", layer)
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"{self.name}: layer {layer} out of range 0..{self.num_layers - 1}")
        if self.saver is None:
            raise RuntimeError(f"{self.name}: save_layer needs a saver")
        if self._stop.is_set():
            raise RuntimeError(f"{self.name}: save_layer after close")
        with self._lock:
            if self._save_pool is None:
                self._save_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"feeder-{self.name}-save")

        # A host array is copied now: the caller may reuse it at once (saving it later saved whatever it held
        # by then, e.g. the next layer's KV). Device arrays are immutable and copied D2H in the background.
        # (a bytearray or memoryview is a host buffer too: it was saved as whatever it held when the save ran)
        snapshot = np.array(kv, copy=True) if isinstance(kv, (np.ndarray, bytearray, memoryview)) else kv

        def run() -> Any:
            host = np.asarray(snapshot)  # D2H (a copy for device arrays)
            r = self.saver(layer, host)
            return r.result() if isinstance(r, Future) else r

        fut = self._save_pool.submit(run)
        with self._lock:
            self._saves.append((layer, fut))

    def wait_for_save(self, timeout: float | None = None) -> None:
        """Wait for every `save_layer` so far; raises `LayerSaveError` naming the first failed layer (and the
        other failed ones).

        A save that fails is reported once. If `timeout` runs out first, `LayerSaveTimeout` (a `TimeoutError`
        and a `LayerSaveError`) names the layers whose saves are still running; they stay tracked, so a later
        `wait_for_save` still waits for them and reports their failure.
        """
        _check_timeout(f"{self.name}: wait_for_save timeout", timeout)
        until = deadline(timeout)
        with self._lock:
            saves = list(self._saves)
        failed: list[tuple[int, BaseException]] = []
        pending: list[int] = []
        settled: set[Future] = set()  # the futures examined done (removed from the tracked saves)
        for layer, fut in saves:
            remaining = _remaining(until)
            try:
                fut.result(timeout=remaining)
            except TimeoutError:
                if not fut.done():  # still running (a save that itself raised TimeoutError is done)
                    pending.append(layer)
                    continue
                failed.append((layer, fut.exception()))
            except BaseException as e:  # noqa: BLE001
                failed.append((layer, e))
            settled.add(fut)
        with self._lock:
            self._saves = [(layer, fut) for layer, fut in self._saves if fut not in settled]
        if failed:
            # (every failed save is named: only the first was, and the others were dropped from tracking unreported)
            layer, e = failed[0]
            too = f" (the saves of layers {[lay for lay, _ in failed[1:]]} failed too)" if len(failed) > 1 else ""
            still = f" (saves of layers {pending} still running)" if pending else ""
            raise LayerSaveError(
                f"{self.name}: saving layer {layer} failed: {type(e).__name__}: {e}{too}{still}"
            ) from e
        if pending:
            raise LayerSaveTimeout(
                f"{self.name}: the saves of layers {pending} did not finish within {timeout} s (still running; "
                "wait_for_save again to wait for them)"
            )

    def close(self) -> None:
        """Stop loading and the save worker (after queued saves). Every layer fails from now on, loaded ones too: their
        device arrays are no longer held, and `wait_for_layer` raises `LayerLoadError` naming the closed feeder."""
        closed = LayerLoadError(f"{self.name}: feeder closed")
        with self._lock:  # (a loaded layer was still returned after close, and its device array held until gc)
            self._stop.set()
            self._results.close(closed)
            # A device copy running is waited for (no device memory taken by this feed once close returned); the
            # loader is not joined: blocked in its source (a wait for a dead peer's notification), it held close up to
            # 5 s. It stops when the source returns, its result dropped (no device copy: `_load` checks the flag).
            if threading.current_thread() is not self._loader and not self._sunk.wait_for(
                lambda: not self._sinking, CLOSE_SINK_WAIT_S
            ):
                log.error("%s: a layer's device copy still running %s s after close", self.name, CLOSE_SINK_WAIT_S)
        if self._save_pool is not None:
            self._save_pool.shutdown(wait=True)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the loader thread has ended (after `close`, a failed layer, or the last layer loaded), so the
        source no longer runs: memory it writes into (a PE buffer's slots) may be released only then. `close` does not
        wait for it (a source blocked on a dead peer held close). True once it ended (or never started), False if
        `timeout` ran out (None or inf: forever)."""
        _check_timeout(f"{self.name}: join timeout", timeout)
        loader = self._loader
        if loader is None:
            return True
        if loader is threading.current_thread():
            raise RuntimeError(f"{self.name}: join() from the feeder's own loader (its source) would wait for ever")
        loader.join(_remaining(deadline(timeout)))
        return not loader.is_alive()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- sources ------------------------------------------------------------------------------------------


class StoreLayerSource:
    """PE/DE-side reads: layer l of each hit block, from the KV store into the staging buffer.

    `out` is viewed as `[len(keys), block_tokens, bytes_per_token_per_layer]`; row i receives Layer Block l
    of `keys[i]` via `store.read(key, out_row, layers=[l])`. A read that reports a miss (returns False/None
    or raises) fails the layer with `KVMissError`. `pacer` (optional) paces each block's bytes over an emulated SNIC
    once read (a miss moves none).
    """

    def __init__(self, store: Any, keys: Sequence[Any], layout: Any, pacer: Any = None, parallel: bool = True):
        self.store, self.keys, self.layout, self.pacer = store, list(keys), layout, pacer
        self.layer_nbytes = len(self.keys) * layout.layer_block_nbytes
        # the store's own I/O pool reads the blocks of one layer in parallel
        self.parallel = parallel and hasattr(store, "submit_read")

    def __call__(self, layer: int, out: np.ndarray) -> np.ndarray:
        rows = out.reshape(len(self.keys), self.layout.block_tokens, self.layout.bytes_per_token_per_layer)
        nbytes = self.layout.layer_block_nbytes
        # Each block is paced once read (as the runtime's SNIC does): a miss moved no bytes (paced before its read,
        # it was recorded on the SNIC as moved). A sequential read stops at the first miss.
        results: list[Any] = []
        miss: KVMissError | None = None
        for i, key in enumerate(self.keys):
            try:
                if self.parallel:
                    results.append(self.store.submit_read(key, rows[i], layers=[layer]))
                    continue
                ok = self.store.read(key, rows[i], layers=[layer])
            except Exception as e:
                miss = KVMissError(f"block {i} ({key!r}), layer {layer}: read failed: {e}")
                miss.__cause__ = e
                break
            if not ok:
                miss = KVMissError(f"block {i} ({key!r}), layer {layer}: not in the store or corrupt (miss)")
                break
            self._pace(nbytes)
        for i, r in enumerate(results):
            if miss is not None and isinstance(r, Future):
                r.cancel()  # (a read not started yet is not made: the layer failed)
            try:
                ok = r.result() if isinstance(r, Future) else r
            except CancelledError:
                continue
            except Exception as e:
                if miss is None:
                    miss = KVMissError(f"block {i} ({self.keys[i]!r}), layer {layer}: read failed: {e}")
                    miss.__cause__ = e
                continue
            if ok:
                self._pace(nbytes)  # (a block read beside a miss moved its bytes too)
            elif miss is None:
                miss = KVMissError(f"block {i} ({self.keys[i]!r}), layer {layer}: not in the store or corrupt (miss)")
        if miss is not None:
            raise miss
        return out

    def _pace(self, nbytes: int) -> None:
        if self.pacer is not None:
            self.pacer.pace(nbytes, "low")


class TransportLayerSource:
    """PE side of the DE path: wait until layer l's bytes were written into `region` (by the DE, with
    notification tag `tag_fn(l)`), and return the view of where they landed (no extra host copy).

    `offset_fn(l)` is the byte offset of layer l's bytes in the region; each layer is `layer_nbytes` long.
    With a `peer` named, a wait fails with `PeerLostError` within `PEER_CHECK_S` once that peer (seen connected) is gone.
    """

    def __init__(
        self,
        transport: Any,
        region: str,
        offset_fn: Callable[[int], int],
        layer_nbytes: int,
        tag_fn: Callable[[int], int],
        peer: str | None = None,
        timeout_s: float | None = 60.0,
    ):
        self.transport, self.region, self.offset_fn = transport, region, offset_fn
        self.layer_nbytes, self.tag_fn, self.peer, self.timeout_s = layer_nbytes, tag_fn, peer, timeout_s
        # The peer was seen connected by this source (by any layer's wait): a wait that starts once it is gone fails
        # at once. (Per wait, a layer whose wait began after the peer went never saw it, and waited out the timeout.)
        self.seen_peer = False

    def __call__(self, layer: int, out: np.ndarray) -> np.ndarray:
        n = self._wait(layer, self.tag_fn(layer))
        off = self.offset_fn(layer)
        if n.length == 0 and self.layer_nbytes > 0:  # the sender's failure signal (see LayerForwarder)
            raise KVMissError(f"layer {layer}: the sender {n.peer!r} could not load it (miss or read error)")
        if n.region != self.region or n.offset != off or n.length != self.layer_nbytes:
            raise LayerLoadError(
                f"layer {layer}: notification for {n.region}[{n.offset}:+{n.length}] does not match the expected "
                f"{self.region}[{off}:+{self.layer_nbytes}]"
            )
        view = self.transport.region(self.region).view
        return np.frombuffer(view, dtype=np.uint8, count=self.layer_nbytes, offset=off)

    def _wait(self, layer: int, tag: int) -> Any:
        """Layer `layer`'s notification; with a named peer, `PeerLostError` as soon as that peer (seen connected) is
        gone: neither its bytes nor its failure signal can come then (the PE waited out its whole timeout)."""
        if self.peer is None:
            return self.transport.wait_notification(tag=tag, peer=None, timeout=self.timeout_s)
        until = deadline(self.timeout_s)
        while True:
            # (a peer not connected yet may still connect: only one seen connected, then gone, is lost)
            seen = self.seen_peer = self.seen_peer or self.peer in self.transport.peers()
            left = _remaining(until)
            try:
                return self.transport.wait_notification(
                    tag=tag, peer=self.peer, timeout=PEER_CHECK_S if left is None else min(left, PEER_CHECK_S)
                )
            except TimeoutError:
                if left is not None and left <= PEER_CHECK_S:
                    raise TimeoutError(
                        f"layer {layer}: no notification (tag {tag}) from {self.peer!r} within {self.timeout_s} s"
                    ) from None
            if seen and self.peer not in self.transport.peers():
                try:  # it may have landed just before the peer went
                    return self.transport.wait_notification(tag=tag, peer=self.peer, timeout=0)
                except TimeoutError:
                    raise PeerLostError(
                        f"layer {layer}: peer {self.peer!r} is gone (disconnected or closed) before its notification "
                        f"(tag {tag}) came"
                    ) from None


# ---- savers -------------------------------------------------------------------------------------------


class TransportSaver:
    """Send each saved layer to a peer's region: stage it into a registered local region, then one-sided
    write with notification `tag_fn(l)` (PE path: hit+miss KV to the DE buffer; DE path: miss KV back)."""

    def __init__(
        self,
        transport: Any,
        peer: str,
        local_region: str,
        local_offset_fn: Callable[[int], int],
        remote_region: str,
        remote_offset_fn: Callable[[int], int],
        tag_fn: Callable[[int], int] | None = None,
        priority: str = "low",
    ):
        self.transport, self.peer = transport, peer
        self.local_region, self.local_offset_fn = local_region, local_offset_fn
        self.remote_region, self.remote_offset_fn = remote_region, remote_offset_fn
        self.tag_fn, self.priority = tag_fn, priority

    def __call__(self, layer: int, host: np.ndarray) -> Future:
        data = np.ascontiguousarray(host).reshape(-1).view(np.uint8)
        lo = self.local_offset_fn(layer)
        region = self.transport.region(self.local_region)
        region.check(lo, data.nbytes, f"stage layer {layer}")
        np.frombuffer(region.view, dtype=np.uint8, count=data.nbytes, offset=lo)[:] = data
        return self.transport.write(
            self.peer,
            self.local_region,
            lo,
            self.remote_region,
            self.remote_offset_fn(layer),
            data.nbytes,
            priority=self.priority,
            notify=None if self.tag_fn is None else self.tag_fn(layer),
        )


class BufferSaver:
    """Copy each saved layer into a host buffer at `offset_fn(l)` (e.g. the local DE buffer)."""

    def __init__(self, buffer: np.ndarray, offset_fn: Callable[[int], int]):
        # reshape(-1) of a non-contiguous array is a copy: saved layers would land there and be lost
        if not buffer.flags.c_contiguous or not buffer.flags.writeable:
            raise ValueError("BufferSaver: the buffer must be a writable C-contiguous array")
        self.buffer, self.offset_fn = buffer.reshape(-1).view(np.uint8), offset_fn

    def __call__(self, layer: int, host: np.ndarray) -> None:
        data = np.ascontiguousarray(host).reshape(-1).view(np.uint8)
        off = self.offset_fn(layer)
        if off < 0 or off + data.nbytes > self.buffer.nbytes:
            raise LayerSaveError(
                f"layer {layer}: [{off}, {off + data.nbytes}) outside the {self.buffer.nbytes}-byte buffer"
            )
        self.buffer[off : off + data.nbytes] = data


# ---- DE side of the DE path -----------------------------------------------------------------------------


class LayerForwarder:
    """DE side of the DE path: per layer, read the hit blocks' Layer Blocks from storage into the DE buffer
    (a registered region) and write them to the PE's region with notification `tag_fn(l)`. Reading layer
    l+1 overlaps sending layer l; at most `prefetch + 1` layers of staging are used (ring in the region).

    `source(l, out)` reads layer l (e.g. a `StoreLayerSource`); the DE buffer slot of layer l is
    `local_offset + (l % (prefetch + 1)) * layer_nbytes` (the region holds `min(prefetch + 1, num_layers)` slots);
    the PE offset is `remote_offset_fn(l)`.
    A failed read is never forwarded as bytes: for the failed layer and every later one the PE gets a
    0-byte notifying write with that layer's tag, which `TransportLayerSource` turns into a miss error at
    once (instead of a timeout). A layer whose write fails (even after the call returned) gets that signal as soon as
    its future fails, and the forwarder stops; every layer gets either its bytes or the signal.
    """

    def __init__(
        self,
        transport: Any,
        peer: str,
        source: LayerSource,
        num_layers: int,
        layer_nbytes: int,
        local_region: str,
        local_offset: int,
        remote_region: str,
        remote_offset_fn: Callable[[int], int],
        tag_fn: Callable[[int], int],
        prefetch: int = 1,
        priority: str = "low",
    ):
        # (a float num_layers killed the DE's thread before it settled `done`: the caller waited forever)
        num_layers = _count(f"forwarder to {peer!r}: num_layers", num_layers)
        layer_nbytes = _count(f"forwarder to {peer!r}: layer_nbytes", layer_nbytes)
        prefetch = _count(f"forwarder to {peer!r}: prefetch", prefetch)
        if num_layers < 0 or layer_nbytes < 0:
            raise ValueError(
                f"forwarder to {peer!r}: num_layers and layer_nbytes must be >= 0, got {num_layers}, {layer_nbytes}"
            )
        if prefetch < 0:  # the staging ring has prefetch + 1 slots
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self.transport, self.peer, self.source = transport, peer, source
        self.num_layers, self.layer_nbytes, self.prefetch = num_layers, layer_nbytes, prefetch
        self.local_region, self.local_offset = local_region, local_offset
        self.remote_region, self.remote_offset_fn, self.tag_fn = remote_region, remote_offset_fn, tag_fn
        self.priority = priority
        # the ring's slots in use: layer % (prefetch + 1) for layers < num_layers (a prefetch beyond L - 1 reserves
        # no slot for layers that do not exist, as in `LayerFeeder`; it asked for a region prefetch + 1 layers long)
        slots = max(0, min(prefetch + 1, num_layers))
        transport.region(local_region).check(local_offset, slots * layer_nbytes, "forwarder staging")
        self.done: Future = Future()
        self._write_error: LayerLoadError | None = None  # the first write that failed (see `_on_write_done`)
        self._thread = threading.Thread(target=self._run, name=f"forwarder-{peer}", daemon=True)

    def start(self) -> Future:
        self._thread.start()
        return self.done

    def _run(self) -> None:
        inflight: list[Future] = []
        posted = 0  # layers whose write was posted: each gets its bytes or (failed write) its failure signal
        try:
            # (inside the try: a staging region deregistered before `start` killed this thread before it settled
            # `done`, and its caller waited for ever)
            region = self.transport.region(self.local_region)
            for layer in range(self.num_layers):
                self._check_writes()
                slot = layer % (self.prefetch + 1)
                off = self.local_offset + slot * self.layer_nbytes
                if len(inflight) > self.prefetch:  # the slot we are about to overwrite must have been sent
                    inflight.pop(0).result()
                out = np.frombuffer(region.view, dtype=np.uint8, count=self.layer_nbytes, offset=off)
                host = self.source(layer, out)
                if host is not None and host is not out:
                    host = np.asarray(host).reshape(-1).view(np.uint8)
                    if host.nbytes != self.layer_nbytes:  # (1 byte was broadcast over the layer: forwarded as KV)
                        raise LayerLoadError(
                            f"forwarder to {self.peer!r}: source gave {host.nbytes} bytes for layer {layer}, "
                            f"expected {self.layer_nbytes}"
                        )
                    out[:] = host
                self._check_writes()
                fut = self.transport.write(
                    self.peer,
                    self.local_region,
                    off,
                    self.remote_region,
                    self.remote_offset_fn(layer),
                    self.layer_nbytes,
                    priority=self.priority,
                    notify=self.tag_fn(layer),
                )
                posted = layer + 1
                # (a write failing after the call returned sent no signal for its layer: the PE waited out its timeout)
                fut.add_done_callback(lambda f, layer=layer: self._on_write_done(layer, f))
                inflight.append(fut)
            for f in inflight:
                f.result()
            self.done.set_result(self.num_layers)
        except BaseException as e:  # noqa: BLE001
            try:
                self._signal_failure(posted)
            finally:  # (settled whatever the signalling does: the caller never waits forever)
                self.done.set_exception(e)

    def _on_write_done(self, layer: int, fut: Future) -> None:
        """A layer's write failed (possibly long after it was posted): signal that layer at once, without waiting (this
        may run on a transport thread), and stop the forwarder before its next layer."""
        err = LayerLoadError(f"forwarder to {self.peer!r}: the write of layer {layer} failed")
        if fut.cancelled():
            err.__cause__ = CancelledError()
        elif fut.exception() is not None:
            err.__cause__ = fut.exception()
        else:
            return
        if self._write_error is None:
            self._write_error = err
        try:
            self._signal(layer)
        except Exception:  # noqa: BLE001 - best effort (a closed transport): the PE then times out instead
            pass

    def _check_writes(self) -> None:
        if self._write_error is not None:
            raise self._write_error

    def _signal(self, layer: int) -> Any:
        """Post layer `layer`'s failure signal: a 0-byte notifying write with its tag."""
        return self.transport.write(
            self.peer,
            self.local_region,
            self.local_offset,
            self.remote_region,
            self.remote_offset_fn(layer),
            0,
            priority=self.priority,
            notify=self.tag_fn(layer),
        )

    def _signal_failure(self, first_failed: int) -> None:
        for layer in range(first_failed, self.num_layers):
            try:
                self._signal(layer).result(10)
            except Exception:  # noqa: BLE001 - best effort: the PE then times out instead
                return
