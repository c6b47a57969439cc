"""The transport interface (DESIGN.md "Contracts: Transport") shared by every backend.

A transport is one endpoint of the compute network (one engine's CNIC). It owns:

- **registered memory regions**: a name bound to a writable, contiguous host buffer (a numpy uint8 array, a
  bytearray, an mmap...). Peers address bytes as (region name, offset, length); nothing is copied into
  intermediate buffers on the hot path (the TCP backend receives straight into the region, RDMA NICs DMA
  into it).
- **one-sided transfers**: `write` pushes local bytes into a peer's region, `read` pulls a peer's bytes into
  a local region. Both return a `concurrent.futures.Future` that resolves (to the byte count) once the bytes
  have landed on the destination side, or fails with a `TransportError` (a peer that dies makes its pending
  transfers fail within the transport's timeout; nothing hangs).
- **a priority class per transfer**: "high" is model traffic (collectives, activations), "low" is KV. Backends
  keep the classes apart (separate queues/connections) and a pacer (`dualpath_jax.traffic`) can weight them
  ~99:1 under contention, like InfiniBand virtual lanes.
- **notifications**: a write may carry an integer `notify` tag; once the bytes have landed, the receiver's
  completion queue gets a `Notification` (like RDMA WRITE-with-immediate), so a prefill engine can wait for
  "layer l of request r arrived" without polling memory.
- **a small control channel**: `send(peer, payload)` / `recv()` of framed messages (scheduler control,
  request hand-offs).

Backends register themselves in `TRANSPORTS` and are built from a config with `make_transport`.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any, Literal, Protocol, Self

from dualpath_jax.registry import Registry

Priority = Literal["high", "low"]
PRIORITIES: tuple[str, ...] = ("high", "low")

TRANSPORTS: Registry[type[Transport]] = Registry("transport")


class TransportError(RuntimeError):
    """A transfer or message could not be completed (peer gone, connection broken, protocol error)."""


class PeerLostError(TransportError):
    """The peer closed, died or stopped answering within the timeout; pending transfers to it fail."""


class TransportClosedError(TransportError):
    """The local endpoint was closed."""


class RegionError(TransportError, ValueError):
    """Unknown region, a non-writable buffer, or (offset, length) outside a region's bounds."""


class Pacer(Protocol):
    """Anything that paces sends: blocks until `nbytes` of class `priority` may cross the link(s).

    `dualpath_jax.traffic.Pacer` implements it over emulated NIC links.
    """

    def pace(self, nbytes: int, priority: str) -> None: ...

    def paced(self, nbytes: int, priority: str) -> Iterator[int]:
        """Yield chunk sizes summing to `nbytes`, each when its bytes may be moved (optional method)."""


@dataclasses.dataclass(frozen=True)
class Notification:
    """A completed write that carried a `notify` tag, as seen by the receiver."""

    peer: str  # the writer's endpoint name
    tag: int  # the writer's tag (e.g. request id and layer packed into an int)
    region: str  # the local region the bytes landed in
    offset: int
    length: int


@dataclasses.dataclass
class MemoryRegion:
    """A registered host buffer: `view` is a writable, flat byte view of it."""

    name: str
    region_id: int  # small integer used on the wire instead of the name
    view: memoryview  # format "B", 1-D, writable
    obj: Any  # the caller's buffer object, kept alive while registered

    @property
    def size(self) -> int:
        return self.view.nbytes

    def check(self, offset: int, length: int, what: str) -> None:
        """Raise `RegionError` unless [offset, offset+length) lies inside the region."""
        if not isinstance(offset, int) or not isinstance(length, int):
            raise RegionError(f"{what}: offset and length must be ints, got {offset!r}, {length!r}")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise RegionError(
                f"{what}: [{offset}, {offset + length}) is outside region {self.name!r} of {self.size} bytes"
            )


def as_region_view(buf: Any, name: str) -> memoryview:
    """A flat writable byte view of `buf`; a clear error if it is read-only or not contiguous."""
    try:
        view = memoryview(buf)
    except TypeError as e:
        raise RegionError(f"region {name!r}: {type(buf).__name__} does not expose a buffer") from e
    if view.readonly:
        raise RegionError(f"region {name!r}: buffer is read-only; register a writable buffer")
    if not view.c_contiguous:
        raise RegionError(f"region {name!r}: buffer must be C-contiguous")
    return view.cast("B") if (view.format != "B" or view.ndim != 1) else view


class CompletionQueue:
    """The receiver's queue of `Notification`s; `get` can wait for a particular tag and/or peer.

    Notifications that do not match a filtered `get` stay queued for later callers (so several waiters can
    wait for different layers concurrently).
    """

    def __init__(self) -> None:
        self._items: collections.deque[Notification] = collections.deque()
        self._cond = threading.Condition()
        self._closed: BaseException | None = None

    def put(self, n: Notification) -> None:
        with self._cond:
            self._items.append(n)
            self._cond.notify_all()

    def close(self, error: BaseException) -> None:
        """Wake every waiter with `error` (endpoint closed)."""
        with self._cond:
            self._closed = error
            self._cond.notify_all()

    def get(self, tag: int | None = None, peer: str | None = None, timeout: float | None = None) -> Notification:
        """Pop the oldest notification matching `tag`/`peer` (None = any); `TimeoutError` after `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                for i, n in enumerate(self._items):
                    if (tag is None or n.tag == tag) and (peer is None or n.peer == peer):
                        del self._items[i]
                        return n
                if self._closed is not None:
                    raise TransportClosedError(f"completion queue closed: {self._closed}")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no notification with tag={tag} peer={peer} within {timeout} s")
                self._cond.wait(remaining)

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


class MessageQueue:
    """Received control messages, `(peer, payload)` in arrival order."""

    def __init__(self) -> None:
        self._items: collections.deque[tuple[str, bytes]] = collections.deque()
        self._cond = threading.Condition()
        self._closed: BaseException | None = None

    def put(self, peer: str, payload: bytes) -> None:
        with self._cond:
            self._items.append((peer, payload))
            self._cond.notify_all()

    def close(self, error: BaseException) -> None:
        with self._cond:
            self._closed = error
            self._cond.notify_all()

    def get(self, peer: str | None = None, timeout: float | None = None) -> tuple[str, bytes]:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                for i, (p, payload) in enumerate(self._items):
                    if peer is None or p == peer:
                        del self._items[i]
                        return p, payload
                if self._closed is not None:
                    raise TransportClosedError(f"message queue closed: {self._closed}")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no message from {peer or 'any peer'} within {timeout} s")
                self._cond.wait(remaining)


def check_priority(priority: str) -> str:
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {PRIORITIES}, got {priority!r}")
    return priority


class Transport(abc.ABC):
    """One endpoint of the compute network. Thread-safe: any thread may submit transfers.

    Lifecycle: construct (listening where the backend needs it), `register` regions, `connect` to peers (by
    `address` of the peer), transfer, `close`. Region names are per endpoint; a peer's regions are addressed by
    the names that peer registered.
    """

    #: The backend's registry name ("inproc", "tcp", "rdma").
    backend: str = ""

    def __init__(self, name: str, pacer: Pacer | None = None):
        if not isinstance(name, str) or not name:
            raise ValueError(f"transport endpoint name must be a non-empty string, got {name!r}")
        self.name = name
        self.pacer = pacer
        self.completions = CompletionQueue()
        self.messages = MessageQueue()
        self._regions: dict[str, MemoryRegion] = {}
        self._regions_by_id: dict[int, MemoryRegion] = {}
        self._next_region_id = 1
        self._lock = threading.RLock()
        self._closed = False

    # ---- memory regions -------------------------------------------------------------------------------
    def register(self, name: str, buf: Any) -> MemoryRegion:
        """Register a writable contiguous buffer under `name`; peers may then read/write it.

        Raises `RegionError` for a duplicate name or a read-only/non-contiguous buffer. The caller must keep
        the buffer alive and not resize it while registered.
        """
        self._check_open()
        view = as_region_view(buf, name)
        with self._lock:
            if name in self._regions:
                raise RegionError(f"region {name!r} is already registered on endpoint {self.name!r}")
            region = MemoryRegion(name, self._next_region_id, view, buf)
            self._next_region_id += 1
            self._on_register(region)
            self._regions[name] = region
            self._regions_by_id[region.region_id] = region
        return region

    def deregister(self, name: str) -> None:
        """Forget a region. Only do this when no transfer into or out of it is in flight."""
        with self._lock:
            region = self.region(name)
            self._on_deregister(region)
            del self._regions[name]
            del self._regions_by_id[region.region_id]

    def region(self, name: str) -> MemoryRegion:
        with self._lock:
            try:
                return self._regions[name]
            except KeyError:
                known = ", ".join(sorted(self._regions)) or "(none)"
                raise RegionError(f"endpoint {self.name!r} has no region {name!r}; registered: {known}") from None

    def regions(self) -> list[str]:
        with self._lock:
            return sorted(self._regions)

    def _on_register(self, region: MemoryRegion) -> None:  # noqa: B027 - optional hook, default: nothing
        """Backend hook (e.g. RDMA memory registration)."""

    def _on_deregister(self, region: MemoryRegion) -> None:  # noqa: B027 - optional hook, default: nothing
        """Backend hook."""

    # ---- peers ------------------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def address(self) -> Any:
        """What a peer passes to `connect` to reach this endpoint (picklable: a name, a (host, port))."""

    @abc.abstractmethod
    def connect(self, peer: str, address: Any, timeout: float = 10.0) -> None:
        """Open the connection set to `peer` at `address`; both sides may then transfer in both directions.

        Raises `TransportError` if the peer is unreachable, its name differs from `peer`, or it fails
        authentication.
        """

    @abc.abstractmethod
    def peers(self) -> list[str]:
        """Names of connected peers (connected by either side)."""

    def wait_for_peer(self, peer: str, timeout: float = 10.0) -> None:
        """Block until `peer` has connected to us (the accepting side of `connect`)."""
        deadline = time.monotonic() + timeout
        while peer not in self.peers():
            self._check_open()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: peer {peer!r} did not connect within {timeout} s")
            time.sleep(0.005)

    # ---- one-sided transfers ----------------------------------------------------------------------------
    @abc.abstractmethod
    def write(
        self,
        peer: str,
        local_region: str,
        local_offset: int,
        remote_region: str,
        remote_offset: int,
        length: int,
        priority: Priority = "low",
        notify: int | None = None,
    ) -> Future:
        """Copy `length` local bytes to the peer's region; the future resolves to `length` once they landed.

        With `notify` set, the peer's completion queue receives `Notification(self.name, notify, ...)` after
        the bytes landed. Bounds are checked on both sides: an out-of-range local range raises `RegionError`
        at once; an unknown remote region or out-of-range remote range raises `RegionError` at once where the
        backend knows the remote size (all backends here do) and never writes outside the region.
        """

    @abc.abstractmethod
    def read(
        self,
        peer: str,
        local_region: str,
        local_offset: int,
        remote_region: str,
        remote_offset: int,
        length: int,
        priority: Priority = "low",
    ) -> Future:
        """Copy `length` bytes of the peer's region into a local region; the future resolves to `length`."""

    # ---- notifications and control messages -------------------------------------------------------------
    def wait_notification(
        self, tag: int | None = None, peer: str | None = None, timeout: float | None = None
    ) -> Notification:
        """Wait for a notifying write (matching `tag`/`peer` if given) to have landed here."""
        return self.completions.get(tag=tag, peer=peer, timeout=timeout)

    @abc.abstractmethod
    def send(self, peer: str, payload: bytes) -> Future:
        """Send a small framed control message; the future resolves once it was handed to the peer link."""

    def recv(self, peer: str | None = None, timeout: float | None = None) -> tuple[str, bytes]:
        """Next control message `(peer, payload)` (from `peer` if given); `TimeoutError` after `timeout`."""
        return self.messages.get(peer=peer, timeout=timeout)

    # ---- shutdown ---------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop serving. Transfers still pending fail with `TransportClosedError`; peers see `PeerLostError`
        for theirs; later calls raise `TransportClosedError`. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        err = TransportClosedError(f"endpoint {self.name!r} closed")
        self._shutdown()
        self.completions.close(err)
        self.messages.close(err)

    @abc.abstractmethod
    def _shutdown(self) -> None:
        """Backend-specific teardown (called once by `close`)."""

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosedError(f"endpoint {self.name!r} is closed")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _paced_chunks(self, nbytes: int, priority: str, chunk: int) -> Iterator[int]:
        """Chunk sizes of a transfer, each yielded when the pacer lets it go (at once without a pacer)."""
        if self.pacer is None:
            for o in range(0, nbytes, chunk):
                yield min(chunk, nbytes - o)
        elif hasattr(self.pacer, "paced"):
            yield from self.pacer.paced(nbytes, priority)
        else:
            for o in range(0, nbytes, chunk):
                n = min(chunk, nbytes - o)
                self.pacer.pace(n, priority)
                yield n


def failed_future(error: BaseException) -> Future:
    f: Future = Future()
    f.set_exception(error)
    return f


def make_transport(config: Mapping[str, Any] | Any, **overrides: Any) -> Transport:
    """Build a transport from a config: `{"backend": "tcp", "name": "pe0", ...backend kwargs}`.

    Works with dicts and `ml_collections.ConfigDict`s; `overrides` (e.g. `pacer=`) take precedence. The
    error for an unknown backend lists the registered ones.
    """
    import transport  # noqa: F401  (registers the built-in backends)

    cfg = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    cfg.update(overrides)
    try:
        backend = cfg.pop("backend")
    except KeyError:
        raise KeyError(
            f"transport config needs a 'backend' field (one of {TRANSPORTS.names()}); got {sorted(cfg)}"
        ) from None
    cls = TRANSPORTS.get(backend)
    return cls(**cfg)


ProgressCallback = Callable[[int], None]
