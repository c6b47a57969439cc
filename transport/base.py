"""The transport interface (DESIGN.md "Contracts: Transport") shared by every backend.

A transport is one endpoint of the compute network (one engine's CNIC). It owns:

- **registered memory regions**: a name bound to a writable, contiguous host buffer (a numpy uint8 array, a
  bytearray, an mmap...). Peers address bytes as (region name, offset, length); nothing is copied into
  intermediate buffers on the hot path (the TCP backend receives straight into the region, RDMA NICs DMA
  into it).
- **one-sided transfers**: `write` pushes local bytes into a peer's region, `read` pulls a peer's bytes into
  a local region. Both return a `concurrent.futures.Future` that resolves (to the byte count) once the bytes
  have landed on the destination side, or fails with a `TransportError` (a peer that dies makes its pending
  transfers fail within the transport's timeout; nothing hangs). `write_many` posts a batch of writes with
  one future (a chain of work requests with one signaled completion).
- **a priority class per transfer**: "high" is model traffic (collectives, activations), "low" is KV. Backends
  keep the classes apart (separate queues/connections) and a pacer (`dualpath_jax.traffic`) can weight them
  ~99:1 under contention, like InfiniBand virtual lanes.
- **notifications**: a write may carry an integer `notify` tag; once the bytes have landed, the receiver's
  completion queue gets a `Notification` (like RDMA WRITE-with-immediate), so a prefill engine can wait for
  "layer l of request r arrived" without polling memory.
- **a small control channel**: `send(peer, payload)` / `recv()` of framed messages (scheduler control,
  request hand-offs).
- **ordering**: what an endpoint posts to one peer in one class takes effect there in posting order (last
  write wins, notifications and messages in order; see `Transport`), as on a TCP connection or an RDMA QP.

Backends register themselves in `TRANSPORTS` and are built from a config with `make_transport`.
"""

from __future__ import annotations

import abc
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import inspect
import operator
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, InvalidStateError
from typing import Any, Literal, Protocol, Self

from dualpath_jax.checks import is_real, keyword_fit  # noqa: F401  (keyword_fit: also this module's name)
from dualpath_jax.registry import Registry

Priority = Literal["high", "low"]
PRIORITIES: tuple[str, ...] = ("high", "low")
#: The longest region name (UTF-8 bytes) any backend takes: tcp peers ask for a region by name in one frame of at
#: most this many bytes, so a longer name could be registered but never reached.
REGION_NAME_MAX = 1024
#: One entry of `Transport.write_many`: (local_region, local_offset, length, remote_region, remote_offset).
WriteEntry = tuple[str, int, int, str, int]


class _TransportRegistry(Registry):
    """The backends' registry: a `Transport` subclass's `backend` is the name it is registered under. Its `backend`
    was never checked (the README asks for `backend = "NAME"` beside `@TRANSPORTS.register("NAME")`): a class that
    forgot the line ran as its parent's ('inproc'). A class that does not set `backend` itself (it inherits its
    parent's, or the base class's "") gets the name; one that sets another name is refused."""

    def add(self, name: str, obj: Any) -> None:
        own = isinstance(obj, type) and issubclass(obj, Transport) and "backend" in vars(obj)
        if own and obj.backend != name:
            raise ValueError(
                f"{self.kind} {name!r}: {obj.__name__} sets backend = {obj.backend!r}, not the name it is "
                f"registered under: set backend = {name!r} (or leave it out: registration names the backend)"
            )
        super().add(name, obj)
        if isinstance(obj, type) and issubclass(obj, Transport) and not own:
            obj.backend = name


TRANSPORTS: Registry[type[Transport]] = _TransportRegistry("transport")


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
    size: int = dataclasses.field(init=False)  # bytes (a plain attribute: read on every transfer)

    def __post_init__(self) -> None:
        self.size = self.view.nbytes

    def check(self, offset: int, length: int, what: str) -> tuple[int, int]:
        """(offset, length) as ints if [offset, offset+length) lies inside the region, else `RegionError`. Numpy
        integers are fine (as for remote offsets: local ones were refused on every backend); a bool is not."""
        if type(offset) is not int or type(length) is not int:
            try:
                if isinstance(offset, bool) or isinstance(length, bool):
                    raise TypeError
                offset, length = operator.index(offset), operator.index(length)
            except TypeError:
                raise RegionError(f"{what}: offset and length must be ints, got {offset!r}, {length!r}") from None
        if offset < 0 or length < 0 or offset + length > self.size:
            raise RegionError(
                f"{what}: [{offset}, {offset + length}) is outside region {self.name!r} of {self.size} bytes"
            )
        return offset, length


def wait_timeout(timeout: float | None) -> float | None:
    """`timeout` s as a lock or Condition can wait it: None (forever) for None, inf or past `threading.TIMEOUT_MAX`
    (a lock's wait of inf or 1e10 s is an OverflowError at once); `TypeError` unless a number (bools are not), a
    `ValueError` for NaN (it would never expire)."""
    if timeout is None:
        return None
    if not is_real(timeout):
        raise TypeError(f"timeout must be a number of seconds or None, got {timeout!r}")
    if timeout != timeout:
        raise ValueError(f"timeout must be a number of seconds or None, got {timeout}")
    if timeout >= threading.TIMEOUT_MAX:  # inf, or longer than a lock can wait
        return None
    return timeout


def deadline(timeout: float | None) -> float | None:
    """The monotonic deadline of a wait of `timeout` s (None, inf or past `threading.TIMEOUT_MAX` = forever; checked
    as by `wait_timeout`): a NaN timeout would never expire, an infinite or huge one overflowed the lock's timeout
    (OverflowError), a string was a TypeError from `+`."""
    timeout = wait_timeout(timeout)
    return None if timeout is None else time.monotonic() + timeout


def as_region_view(buf: Any, name: str) -> memoryview:
    """A flat writable byte view of `buf`; a `RegionError` naming the region if it is read-only, not contiguous,
    holds Python objects, or cannot be viewed as a buffer at all.

    A zero-size buffer of any shape is a 0-byte region (as a zero-size 1-D array always was): only 0-byte
    transfers at offset 0 fit in it."""
    try:
        view = memoryview(buf)
    except TypeError as e:
        raise RegionError(f"region {name!r}: {type(buf).__name__} does not expose a buffer") from e
    except ValueError as e:  # e.g. numpy datetime64/timedelta64 arrays: "cannot include dtype 'M' in a buffer"
        raise RegionError(
            f"region {name!r}: the {type(buf).__name__} cannot be exported as a buffer ({e}); register a byte "
            f"view of it instead (e.g. arr.view(np.uint8))"
        ) from e
    if view.readonly:
        raise RegionError(f"region {name!r}: buffer is read-only; register a writable buffer")
    if not view.c_contiguous:
        raise RegionError(f"region {name!r}: buffer must be C-contiguous")
    if getattr(getattr(buf, "dtype", None), "hasobject", False):  # peer bytes would overwrite PyObject pointers
        raise RegionError(f"region {name!r}: array of dtype {buf.dtype} holds Python objects, not raw bytes")
    if view.format == "B" and view.ndim == 1:
        return view
    if view.nbytes == 0:  # memoryview.cast refuses zeros in the shape ("cannot cast view with zeros in shape")
        return memoryview(bytearray())
    return view.cast("B")


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
        end = deadline(timeout)
        with self._cond:
            while True:
                for i, n in enumerate(self._items):
                    if (tag is None or n.tag == tag) and (peer is None or n.peer == peer):
                        del self._items[i]
                        return n
                if self._closed is not None:
                    raise TransportClosedError(f"completion queue closed: {self._closed}")
                remaining = None if end is None else end - time.monotonic()
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
        end = deadline(timeout)
        with self._cond:
            while True:
                for i, (p, payload) in enumerate(self._items):
                    if peer is None or p == peer:
                        del self._items[i]
                        return p, payload
                if self._closed is not None:
                    raise TransportClosedError(f"message queue closed: {self._closed}")
                remaining = None if end is None else end - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no message from {peer or 'any peer'} within {timeout} s")
                self._cond.wait(remaining)


def check_notify(notify: Any) -> int | None:
    """A write's notify tag as an int (None = no notification): `TypeError` unless it is an integer (numpy integers
    are fine), `ValueError` unless it fits the wire's signed 64 bits."""
    if notify is None or type(notify) is int and -(1 << 63) <= notify < 1 << 63:
        return notify
    try:
        tag = operator.index(notify)
    except TypeError:
        raise TypeError(f"notify tag must be an int, got {notify!r}") from None
    if not -(1 << 63) <= tag < 1 << 63:
        raise ValueError(f"notify tag {tag} does not fit in a signed 64-bit integer")
    return tag


def check_message(payload: Any, most: int | None = None) -> bytes:
    """A `send` payload as bytes: `TypeError` unless it is bytes, a bytearray or a memoryview; `ValueError` where it
    is longer than `most` (the endpoint's max_message_bytes; None: no limit here)."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"message payload must be bytes, got {type(payload).__name__}")
    data = bytes(payload)
    if most is not None and len(data) > most:
        raise ValueError(f"message of {len(data)} bytes exceeds max_message_bytes={most}")
    return data


def check_priority(priority: str) -> str:
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {PRIORITIES}, got {priority!r}")
    return priority


def check_wait_for_listener(wait_for_listener_s: Any, what: str = "connect") -> None:
    """`connect`'s `wait_for_listener_s`: None, or a finite number of seconds >= 0."""
    if wait_for_listener_s is not None and not (
        is_real(wait_for_listener_s) and 0 <= wait_for_listener_s < threading.TIMEOUT_MAX
    ):
        raise ValueError(
            f"{what}: wait_for_listener_s must be None or a finite number of seconds >= 0 (how long a refused "
            f"connection is tried again), got {wait_for_listener_s!r}"
        )


@functools.cache
def _takes_wait_for_listener(connect: Callable) -> bool:
    params = inspect.signature(connect).parameters
    return "wait_for_listener_s" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def connect_published(transport: Transport, peer: str, address: Any, timeout: float = 10.0) -> None:
    """`transport.connect` to an address `peer` published only once it listened (the runtime's directory, a spawned
    peer's report): a refused connection there means the peer is gone, so it fails at once (`wait_for_listener_s=0`)
    instead of being tried for the whole timeout. A backend of one's own whose `connect` does not take the keyword
    is called without it."""
    if _takes_wait_for_listener(type(transport).connect):
        transport.connect(peer, address, timeout, wait_for_listener_s=0.0)
    else:
        transport.connect(peer, address, timeout)


class Transport(abc.ABC):
    """One endpoint of the compute network. Thread-safe: any thread may submit transfers.

    Lifecycle: construct (listening where the backend needs it), `register` regions, `connect` to peers (by
    `address` of the peer), transfer, `close`. Region names are per endpoint; a peer's regions are addressed by
    the names that peer registered.

    Ordering (every backend keeps it): what this endpoint posts to one peer in one priority class takes effect
    at the peer in posting order, like frames of one TCP connection or work requests of one RDMA RC queue pair.
    Posting order is the order of the posting calls (calls racing in different threads are ordered however
    they interleave). So, per (this endpoint, peer, class):

    - writes, and the entries of `write_many` batches, land in posting order: a later write to the same bytes
      overwrites an earlier one ("last write wins", also when both are in flight at once);
    - a read reads the peer's bytes after every write posted before it has landed;
    - notifications enter the peer's completion queue in posting order (each after its own bytes landed);
    - control messages (`send`) reach the peer's message queue in send order.

    Nothing is promised across classes (a high-class write may overtake a low-class one: that is what the
    classes are for), across peers, between messages and transfers, or about the order in which futures
    complete; transfers to different peers or of different classes may run concurrently.

    A backend of one's own (README "A transport backend of one's own"): subclass (`crosses_processes = False` if its
    endpoints meet only inside one process), register the class in `TRANSPORTS` at the top level of an importable
    module (the name it is registered under is its `backend`: set there where the class does not set it, refused where
    it sets another), and implement the abstract members
    (`address`, `connect`, `peers`, `disconnect`, `write`, `read`, `send`, `_shutdown`; `write_many`,
    `_check_remote_range`, `_on_register` / `_on_deregister` optionally). `__init__` takes `name` and `pacer` as
    keywords (what `make_transport`'s overrides and the runtime's launchers pass; they pass nothing else, so other
    settings need defaults) and calls `Transport.__init__(name, pacer)`; the config's other fields are its keywords.
    Transfers return futures that fail with `TransportError`s (never hang), pace each chunk through `_paced_chunks`,
    land in the peer's region as registered when the bytes arrive, and keep the ordering above; `close` fails what is
    pending and moves no byte afterwards. tests/test_transport_conformance.py runs on it with
    DUALPATH_TRANSPORT_BACKENDS=module:name.
    """

    #: The backend's registry name ("inproc", "tcp", "rdma", or one's own; `TRANSPORTS` sets it when it registers a
    #: class that does not set it itself).
    backend: str = ""
    #: Whether endpoints in different processes reach each other (False: "inproc", whose endpoints meet in one
    #: process's fabric); the runtime runs a backend that does not only with `config.launcher='inprocess'`.
    crosses_processes: bool = True

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
        self._region_ids: dict[str, int] = {}  # name -> its region id, kept across deregister/register
        self._lock = threading.RLock()
        self._closed = False

    # ---- memory regions -------------------------------------------------------------------------------
    def register(self, name: str, buf: Any) -> MemoryRegion:
        """Register a writable contiguous buffer under `name`; peers may then read/write it.

        Raises `RegionError` for a duplicate or non-string name, a name that is not UTF-8 (lone surrogates) or
        longer than REGION_NAME_MAX bytes in UTF-8 (peers could not address it: tcp asks by name in one frame), or
        a read-only/non-contiguous buffer. The caller must keep the buffer alive and not resize it while registered.
        """
        self._check_open()
        if not isinstance(name, str) or not name:
            raise RegionError(f"region name must be a non-empty string, got {name!r}")
        try:
            nbytes = len(name.encode())
        except UnicodeEncodeError as e:
            raise RegionError(
                f"region name {name!r} is not valid UTF-8 ({e.reason}); peers could not address it"
            ) from None
        if nbytes > REGION_NAME_MAX:
            raise RegionError(
                f"region name of {nbytes} bytes (UTF-8) is longer than {REGION_NAME_MAX}; peers could not address it"
            )
        view = as_region_view(buf, name)
        with self._lock:
            if name in self._regions:
                raise RegionError(f"region {name!r} is already registered on endpoint {self.name!r}")
            # A name keeps its id when registered again: peers cache (name -> id) (tcp), and a write by name to the
            # re-registered region took the stale id for a remote access error that closed the connection set.
            rid = self._region_ids.get(name)
            if rid is None:
                rid = self._region_ids[name] = self._next_region_id
                self._next_region_id += 1
            region = MemoryRegion(name, rid, view, buf)
            self._on_register(region)
            self._regions[name] = region
            self._regions_by_id[region.region_id] = region
        return region

    def deregister(self, name: str) -> None:
        """Forget a region. Only do this when no transfer into or out of it is in flight. Peers cache region ids
        (tcp, rdma): a peer's later write to it is a remote access error that closes that peer's connection set.
        Registering the name again gives it back its region id (tcp peers' writes by name then land in the new
        buffer; a smaller one than before is still a remote access error for a range only the old one held)."""
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
    def connect(
        self, peer: str, address: Any, timeout: float = 10.0, *, wait_for_listener_s: float | None = None
    ) -> None:
        """Open the connection set to `peer` at `address`; both sides may then transfer in both directions.

        `wait_for_listener_s`: how long a refused connection (nothing listening at `address` yet: a peer process
        still starting) is tried again; None: within `timeout`; 0: not at all (an address published only once its
        peer listened, where a refusal means the peer is gone: `connect_published`). A backend with no listener
        (inproc) checks it and has nothing to wait for. Not None nor a number >= 0: ValueError
        (`check_wait_for_listener`).

        Raises `TransportError` if the peer is unreachable, its name differs from `peer`, or it fails
        authentication.
        """

    @abc.abstractmethod
    def peers(self) -> list[str]:
        """Names of connected peers (connected by either side)."""

    @abc.abstractmethod
    def disconnect(self, peer: str) -> None:
        """Drop `peer` now, as if its connection set broke: transfers and messages pending between the two (posted
        by either side) fail with `PeerLostError`, and once this returns no one-sided write or read of that peer
        lands in this endpoint's regions any more, nor one of this side's reads from it (tcp: its connections
        closed and their reader threads ended or fenced, a frame already being received included; inproc: the
        lanes between the two fenced, running copies waited for; rdma: its queue pairs moved to the error state).
        So a buffer area the peer could write (a cancelled request's) may be reused at once. The peer sees its
        pending transfers fail and no longer lists this endpoint; a later `connect` (either side) makes a fresh
        connection set. Nothing to do for a peer that is not connected, or on a closed endpoint."""

    def wait_for_peer(self, peer: str, timeout: float = 10.0) -> None:
        """Block until `peer` has connected to us (the accepting side of `connect`)."""
        end = deadline(timeout)
        while peer not in self.peers():
            self._check_open()
            if end is not None and time.monotonic() > end:  # (None: a TypeError after the first look)
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

    def write_many(
        self,
        peer: str,
        entries: Sequence[WriteEntry],
        priority: Priority = "low",
        notify: int | None = None,
    ) -> Future:
        """Post a batch of one-sided writes to `peer`, like a chain of RDMA work requests with one doorbell and
        one signaled completion: `entries` are `(local_region, local_offset, length, remote_region,
        remote_offset)`. The future resolves to the total byte count once every entry landed, or fails as soon
        as one fails. Entries are checked before any is posted (`RegionError`/`TypeError` naming the entry and
        what is wrong): local ranges always, remote ranges where the backend knows the peer's regions up front
        (it overrides `_check_remote_range`: inproc, tcp, rdma; elsewhere `write` checks them as it posts). An empty
        batch resolves to 0 at once.

        With `notify`, the peer gets one `Notification` (describing the last entry) after all entries landed.

        This default posts one `write` per entry, in order, the last one carrying `notify` (the ordering contract,
        see `Transport`, lands it, and so sends its notification, after the others), and combines their futures;
        backends override it with a cheaper path (TCP: one vectored send, one acknowledgement). (It used to post
        the notifying entry only once the others had completed, so a write posted after the batch could land
        before the batch's last entry.)
        """
        check_priority(priority)
        self._check_open()
        batch = self._check_write_batch(peer, entries, notify)
        if not batch:
            return completed_future(0)
        total = sum(e[2] for e in batch)
        last = len(batch) - 1
        return combine_futures(
            [
                self.write(peer, lr, lo, rr, ro, n, priority, notify=notify if i == last else None)
                for i, (lr, lo, n, rr, ro) in enumerate(batch)
            ],
            total,
        )

    def _check_write_batch(
        self, peer: str, entries: Sequence[WriteEntry], notify: int | None
    ) -> list[tuple[str, int, int, str, int]]:
        """The entries of a `write_many` as tuples, every local range (and, where the backend knows the peer's
        regions, every remote range) checked; errors name the entry."""
        return [self._check_write_entry(peer, i, e) for i, e in enumerate(check_write_entries(entries, notify))]

    def _check_write_entry(self, peer: str, i: int, e: Any) -> tuple[str, int, int, str, int]:
        """Entry `i` of a `write_many` as a tuple, its local range (and remote range, see
        `_check_remote_range`) checked; errors name the entry and what is wrong."""
        if not isinstance(e, (tuple, list)) or len(e) != 5:
            raise TypeError(
                f"write_many entry {i}: expected (local_region, local_offset, length, remote_region, "
                f"remote_offset), got {e!r}"
            )
        lr, lo, n, rr, ro = e
        try:
            lo, n = self.region(lr).check(lo, n, f"write from {self.name}:{lr}")
            self._check_remote_range(peer, rr, ro, n)
        except RegionError as err:
            raise RegionError(f"write_many entry {i}: {err}") from err
        return lr, lo, n, rr, ro

    def _check_remote_range(self, peer: str, region: str, offset: int, length: int) -> None:  # noqa: B027
        """Raise `RegionError` if [offset, offset+length) is not inside the peer's `region`, where the backend
        knows it before posting (default: nothing; `write` still checks)."""

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

    def _paced_chunks(
        self, nbytes: int, priority: str, chunk: int, check: Callable[[], None] | None = None
    ) -> Iterator[int]:
        """Chunk sizes of a transfer, each yielded when the pacer lets it go (at once without a pacer). `check`: passed
        to a pacer whose `paced` takes one (`dualpath_jax.traffic`), which calls it while a chunk waits for its slot,
        so what it raises (the endpoint or the link closed) ends the wait at once."""
        if self.pacer is None:
            for o in range(0, nbytes, chunk):
                yield min(chunk, nbytes - o)
        elif hasattr(self.pacer, "paced"):
            paced = self.pacer.paced
            if check is not None and _takes_check(paced):
                yield from paced(nbytes, priority, check=check)
            else:
                yield from paced(nbytes, priority)
        else:
            for o in range(0, nbytes, chunk):
                n = min(chunk, nbytes - o)
                self.pacer.pace(n, priority)
                yield n


_TAKES_CHECK: dict[Any, bool] = {}


def _takes_check(paced: Any) -> bool:
    """Whether a pacer's `paced` takes a `check` keyword (cached per function; the `Pacer` protocol's method need
    not)."""
    fn = getattr(paced, "__func__", paced)
    r = _TAKES_CHECK.get(fn)
    if r is None:
        try:
            r = "check" in inspect.signature(fn).parameters
        except (TypeError, ValueError):
            r = False
        _TAKES_CHECK[fn] = r
    return r


_FINISHED = concurrent.futures._base.FINISHED
_DONE = frozenset((concurrent.futures._base.CANCELLED, concurrent.futures._base.CANCELLED_AND_NOTIFIED, _FINISHED))
_MAKE_CONDITION = threading.Lock()
_allocate_lock = threading.Lock


class TransferFuture(Future):
    """A `concurrent.futures.Future` that is cheap to make, complete and wait on (a transfer acknowledged in a
    batch): making one runs no Python code (its state starts as class attributes); completing one that nobody
    waits on, and reading a completed result, touch no Condition; a blocking `result` waits on a plain lock of
    its own (released by the completion) instead of making the Future's Condition. The Condition and the
    waiter and callback lists are made on first use by `Future`'s own code (a callback,
    `concurrent.futures.wait`, `as_completed`, `exception`), which then works as usual.

    Correctness: the Condition is made, and the light waiters (`result`) are registered, under a module lock;
    a completion without a Condition happens under that lock too, and every completion (quiet or not) releases
    the light waiters it finds there after setting the state. So a waiter either sees the finished state or is
    released, and a callback registered concurrently is either run or sees the finished state. The lists are
    only touched with the Condition held (by `Future`'s code), so making them lazily does not race.
    """

    __init__ = object.__init__  # Future.__init__ would make the Condition and the lists at once
    _state = concurrent.futures._base.PENDING
    _result = None
    _exception = None

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        c = self.__dict__.get("_cond")
        if c is None:
            with _MAKE_CONDITION:
                c = self.__dict__.get("_cond")
                if c is None:
                    c = self.__dict__["_cond"] = threading.Condition()
        return c

    @property
    def _waiters(self) -> list:  # type: ignore[override]
        return self.__dict__.setdefault("_waiter_list", [])

    @property
    def _done_callbacks(self) -> list:  # type: ignore[override]
        return self.__dict__.setdefault("_callback_list", [])

    def _finish_quietly(self, result: Any, error: BaseException | None) -> bool:
        """Complete without a Condition if none exists (so no callback is registered and no `Future`-style
        waiter); releases the light waiters of `result`."""
        if "_cond" in self.__dict__:
            return False
        with _MAKE_CONDITION:
            if "_cond" in self.__dict__:
                return False
            done = self._state in _DONE
            if not done:
                self._result, self._exception = result, error
                self._state = _FINISHED
                light = self.__dict__.pop("_light", None)
        if done:  # (raised under the lock, its repr took the lock again: the process's every transfer hung)
            raise InvalidStateError(f"{self._state}: {self!r}")
        if light:
            for lock in light:
                lock.release()
        return True

    def _release_light(self) -> None:
        """Release the light waiters (after a completion through `Future`'s own code)."""
        with _MAKE_CONDITION:
            light = self.__dict__.pop("_light", None)
        if light:
            for lock in light:
                lock.release()

    def _wait_light(self, timeout: float | None) -> bool:
        """Block until done (True) or `timeout` s passed (False) on a lock of this waiter's own."""
        with _MAKE_CONDITION:
            if self._state in _DONE:
                return True
            lock = _allocate_lock()
            lock.acquire()
            self.__dict__.setdefault("_light", []).append(lock)
        if lock.acquire(True, -1 if timeout is None else max(0.0, timeout)):
            return True
        with _MAKE_CONDITION:  # timed out: deregister unless a completion took the lock list meanwhile
            light = self.__dict__.get("_light")
            if light is not None and lock in light:
                light.remove(lock)
        return self._state in _DONE

    def set_result(self, result: Any) -> None:
        if not self._finish_quietly(result, None):
            super().set_result(result)
            self._release_light()

    def set_exception(self, exception: BaseException | None) -> None:
        if not self._finish_quietly(None, exception):
            super().set_exception(exception)
            self._release_light()

    def cancel(self) -> bool:
        cancelled = super().cancel()
        if cancelled:
            self._release_light()
        return cancelled

    def done(self) -> bool:
        return self._state in _DONE

    def result(self, timeout: float | None = None) -> Any:
        if self._state == _FINISHED and self._exception is None:
            return self._result
        if timeout is not None:  # (inf or 1e10: the lock's wait raised OverflowError; now forever, as `deadline`)
            timeout = wait_timeout(timeout)
        if self._state not in _DONE and "_cond" not in self.__dict__:
            if not self._wait_light(timeout):
                raise concurrent.futures.TimeoutError()
            if self._state == _FINISHED and self._exception is None:
                return self._result
            timeout = 0  # done: Future's code raises the exception or CancelledError
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state == _FINISHED:
            return self._exception
        return super().exception(None if timeout is None else wait_timeout(timeout))


class PostedFuture(TransferFuture):
    """The `TransferFuture` of a transfer or message handed to the transport: it runs, so `cancel` returns False
    (`Future.cancel`: a call being executed cannot be cancelled). tcp and rdma returned True, and the bytes landed
    (and the notification came) all the same: a caller that reused the buffer on a cancel saw it overwritten."""

    _state = concurrent.futures._base.RUNNING


def complete_quietly(futs: Sequence[TransferFuture], results: Sequence[Any]) -> None:
    """Complete a batch of pending `TransferFuture`s (an acknowledgement batch): those without a Condition under
    one lock acquisition, the others (and any already done, which raise nothing here) one by one."""
    loud, light = [], []
    with _MAKE_CONDITION:
        for f, r in zip(futs, results, strict=True):
            d = f.__dict__
            if "_cond" in d or f._state in _DONE:
                loud.append((f, r))
            else:
                f._result, f._state = r, _FINISHED
                if "_light" in d:
                    light.extend(d.pop("_light"))
    for lock in light:
        lock.release()
    for f, r in loud:
        with contextlib.suppress(InvalidStateError):
            f.set_result(r)


def check_write_entries(entries: Any, notify: int | None) -> Sequence[Any]:
    """The entries of a `write_many` as a list or tuple (a TypeError for anything that is not a sequence, a
    ValueError for an empty batch with `notify`; `notify` checked as by `check_notify`)."""
    check_notify(notify)
    if isinstance(entries, (str, bytes)) or not hasattr(entries, "__iter__"):
        raise TypeError(f"write_many: entries must be a sequence of 5-tuples, got {type(entries).__name__}")
    if not isinstance(entries, (list, tuple)):
        entries = list(entries)
    if notify is not None and not entries:
        raise ValueError("write_many: notify needs at least one entry to carry it")
    return entries


def failed_future(error: BaseException) -> Future:
    f: Future = Future()
    f.set_exception(error)
    return f


def completed_future(result: Any) -> Future:
    f: Future = Future()
    f.set_result(result)
    return f


def _fail(f: Future, error: BaseException) -> None:
    with contextlib.suppress(InvalidStateError):  # already failed by another part, or completed
        f.set_exception(error)


def _complete(f: Future, result: Any) -> None:
    with contextlib.suppress(InvalidStateError):
        f.set_result(result)


def _error_of(f: Future) -> BaseException | None:
    """The exception of a done future (a cancelled one counts as failed)."""
    if f.cancelled():
        return concurrent.futures.CancelledError("a part of the batch was cancelled")
    return f.exception()


def combine_futures(futs: Sequence[Future], result: Any, into: Future | None = None) -> Future:
    """A future that resolves to `result` once all `futs` succeeded, or fails with the first failure. It runs (its
    `cancel` returns False): cancelling it could not cancel the parts."""
    out: Future = PostedFuture() if into is None else into
    if not futs:
        _complete(out, result)
        return out
    left = [len(futs)]
    lock = threading.Lock()

    def on_done(f: Future) -> None:
        err = _error_of(f)
        if err is not None:
            _fail(out, err)
            return
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            _complete(out, result)

    for f in futs:
        f.add_done_callback(on_done)
    return out


def make_transport(config: Mapping[str, Any] | Any, **overrides: Any) -> Transport:
    """Build a transport from a config: `{"backend": "tcp", "name": "pe0", ...backend kwargs}`.

    Works with dicts and `ml_collections.ConfigDict`s; `overrides` (e.g. `pacer=`) take precedence. The other fields
    are the backend class's keyword arguments. The error for an unknown backend lists the registered ones; a field the
    class does not take, or a required one missing, is a `TypeError` naming the backend and the fields it takes.
    """
    import transport  # noqa: F401  (registers the built-in backends)

    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, Mapping):  # (a list was "dictionary update sequence element #0 has length 7")
        raise TypeError(
            f"transport config must be a mapping (a dict or an ml_collections.ConfigDict), got {type(config).__name__}"
        )
    cfg = dict(config)
    cfg.update(overrides)
    try:
        backend = cfg.pop("backend")
    except KeyError:
        raise KeyError(
            f"transport config needs a 'backend' field (one of {TRANSPORTS.names()}); got {sorted(cfg)}"
        ) from None
    cls = TRANSPORTS.get(backend)
    _check_fields(backend, cls, cfg)
    return cls(**cfg)


def _check_fields(backend: str, cls: Any, cfg: Mapping[str, Any]) -> None:
    """A `TypeError` naming the backend and the fields its class takes if `cfg` has one it does not take or lacks a
    required one (it was the class's own "__init__() got an unexpected keyword argument", naming no backend)."""
    fit = keyword_fit(cls, cfg)
    if fit is None:  # no signature to check against: the call itself says what is wrong
        return
    unknown, missing, takes = fit
    problems = []
    if unknown:
        problems.append(f"unexpected field{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}")
    if missing:
        problems.append(f"missing field{'s' * (len(missing) > 1)} {', '.join(map(repr, missing))}")
    if problems:
        raise TypeError(
            f"transport config of backend {backend!r}: {'; '.join(problems)} "
            f"({getattr(cls, '__name__', repr(cls))} takes: {', '.join(takes)})"
        )


ProgressCallback = Callable[[int], None]
