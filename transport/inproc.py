"""In-process transport: engines that live in one process, transfers are memcpys between registered regions.

Endpoints find each other through an `InProcFabric` (a name -> endpoint map; one process-wide default).
Each endpoint runs a small thread pool per priority class, so a long low-priority KV copy never queues in
front of high-priority model traffic, and numpy's copy releases the GIL so copies overlap compute. A pacer
(`dualpath_jax.traffic`) can cap the rate to emulate a NIC.

Ordering (the `Transport` contract, as TCP's one connection per class and RDMA's one QP per class keep it):
what an endpoint posts to one peer in one class (writes, `write_many` batches, reads; messages travel in the
high class) goes into that (peer, class)'s *lane*, a FIFO whose tasks run one at a time, in posting order, on
the class's pool. Lanes to different peers and of different classes run concurrently on the pool's workers; a
busy lane gives its worker back every LANE_BATCH tasks so it does not starve the other lanes of its class.

`close` (as tcp's): no byte moves into or out of the endpoint's regions once it returned (it waits for the copies
running, at most CLOSE_WAIT_S), and it disconnects both ways (its peers no longer list it; an endpoint started later
under its name must be connected again).

Two connected endpoints share a `_Link`; every transfer and message between them runs on it. `disconnect` (either
side; `close` too) fences the link: the lanes between the two fail what they hold with `PeerLostError`, no copy
starts on the link any more (nor continues past its current chunk), and the copies running are waited for, so no
byte of that peer moves into or out of the endpoint's regions once it returned. A later `connect` makes a new link.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import operator
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from dualpath_jax.checks import is_int
from transport.base import (
    PRIORITIES,
    TRANSPORTS,
    MemoryRegion,
    Notification,
    Pacer,
    PeerLostError,
    RegionError,
    Transport,
    TransportClosedError,
    WriteEntry,
    check_message,
    check_notify,
    check_priority,
    check_wait_for_listener,
    completed_future,
)

# Pacing granularity: a paced copy asks its links for this many bytes at a time.
PACE_CHUNK = 1 << 20
# Tasks a lane runs in a row before it lets the other lanes of its class have the worker.
LANE_BATCH = 64
# `close` waits at most this long for copies into or out of the endpoint's regions (a pacer slow to grant a chunk).
CLOSE_WAIT_S = 5.0
# Held while links are made or fenced (`connect`, `disconnect`, `close`), so two endpoints agree on their link.
_LINKS = threading.Lock()

log = logging.getLogger(__name__)


def _remote_offset(offset: Any) -> Any:
    """A remote offset as an int where it is an integer (numpy integers are fine, as on tcp); anything else (a bool,
    a float) is left for `MemoryRegion.check` to refuse."""
    if type(offset) is int or type(offset) is bool:
        return offset
    try:
        return operator.index(offset)
    except TypeError:
        return offset


def _peer_region(ep: InProcTransport, name: str, offset: int, length: int) -> MemoryRegion:
    """`ep`'s region `name` as registered now, [offset, offset+length) inside it, else `RegionError` (the peer
    deregistered it, or registered a smaller buffer under the name, after the transfer was posted)."""
    region = ep._regions.get(name)  # (a dict lookup is atomic)
    if region is None:
        raise RegionError(f"peer {ep.name!r} has no region {name!r} (deregistered after the transfer was posted)")
    if offset + length > region.size:
        raise RegionError(
            f"[{offset}, {offset + length}) is outside region {name!r} of peer {ep.name!r} ({region.size} bytes; "
            f"registered again after the transfer was posted)"
        )
    return region


def _settle_task(fut: Future, result: Any, error: BaseException | None) -> None:
    """Complete a lane task's future (unless `close` or a fence failed it meanwhile)."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if error is None:
            fut.set_result(result)
        else:
            fut.set_exception(error)


class _Lane:
    """The transfers (and messages) an endpoint posted to one peer in one class that have not run yet: run one
    at a time, in posting order, by one `_drain` job on the class's pool while `active`."""

    __slots__ = ("tasks", "active", "pool")

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self.tasks: collections.deque[tuple[Future, Any]] = collections.deque()  # (future, fn) in posting order
        self.active = False  # a `_drain` job is queued or running for this lane
        self.pool = pool


class _Link:
    """The connection of two endpoints (each holds it in `_peers` under the other's name). Transfers and messages
    between them run while `dead` is None; `_fence` sets it, `_settle` waits for the chunks being copied on it
    (`copying`: `_copy` checks `dead` before each chunk, so a paced copy waiting for its pacer is not waited for, beyond
    its pacer's next check: a chunk whose check passed counts from then, see `_copy`'s `claim`)."""

    __slots__ = ("ends", "dead", "copying", "cond")

    def __init__(self, a: InProcTransport, b: InProcTransport) -> None:
        self.ends = (a, b)
        self.dead: BaseException | None = None
        self.copying = 0
        self.cond = threading.Condition()

    def other(self, ep: InProcTransport) -> InProcTransport:
        return self.ends[1] if self.ends[0] is ep else self.ends[0]


def _fence(link: _Link, err: BaseException, closing: InProcTransport | None = None) -> list[tuple[Future, Exception]]:
    """Drop `link` (`_LINKS` held): both ends forget it and no copy starts on it any more. Returns the tasks queued in
    the lanes between the two with their errors (`err`; those of `closing`, an endpoint being closed,
    `TransportClosedError`): `_settle` fails them once `_LINKS` is released (their callbacks may connect)."""
    with link.cond:
        if link.dead is not None:
            return []
        link.dead = err
    failed = []
    for ep in link.ends:
        other = link.other(ep)
        e = TransportClosedError(f"endpoint {ep.name!r} closed with the transfer pending") if ep is closing else err
        with ep._lock:
            if ep._peers.get(other.name) is link:
                del ep._peers[other.name]
            for cls in PRIORITIES:
                lane = ep._lanes.pop((other.name, cls), None)
                if lane is not None:  # (its `_drain` finds it empty; later posts to the name make a new lane)
                    for fut, _ in lane.tasks:
                        ep._pending.discard(fut)
                        failed.append((fut, e))
                    lane.tasks.clear()
    return failed


def _settle(links: list[_Link], failed: list[tuple[Future, Exception]]) -> None:
    """Fail the tasks `_fence` took, then wait for the chunks being copied on the fenced `links` (at most
    CLOSE_WAIT_S)."""
    for fut, e in failed:
        if not fut.done():
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                fut.set_exception(e)
    for link in links:
        with link.cond:  # (a paced copy stops at its next chunk)
            if not link.cond.wait_for(lambda link=link: not link.copying, CLOSE_WAIT_S):
                names = [e.name for e in link.ends]
                log.error(
                    "%s: %d copies still running %s s after the link was dropped", names, link.copying, CLOSE_WAIT_S
                )


class InProcFabric:
    """The set of in-process endpoints that can reach each other by name."""

    def __init__(self) -> None:
        self._endpoints: dict[str, InProcTransport] = {}
        self._lock = threading.Lock()

    def attach(self, ep: InProcTransport) -> None:
        with self._lock:
            old = self._endpoints.get(ep.name)
            if old is not None and not old.closed:
                raise ValueError(f"in-process endpoint name {ep.name!r} is already in use")
            self._endpoints[ep.name] = ep

    def detach(self, ep: InProcTransport) -> None:
        with self._lock:
            if self._endpoints.get(ep.name) is ep:
                del self._endpoints[ep.name]

    def lookup(self, name: str) -> InProcTransport | None:
        with self._lock:
            return self._endpoints.get(name)


DEFAULT_FABRIC = InProcFabric()


@TRANSPORTS.register("inproc")
class InProcTransport(Transport):
    """Endpoint of the in-process fabric. `address` is the endpoint name."""

    backend = "inproc"
    crosses_processes = False

    def __init__(
        self,
        name: str,
        fabric: InProcFabric | None = None,
        pacer: Pacer | None = None,
        workers_per_class: int = 4,
    ):
        super().__init__(name, pacer)
        if not is_int(workers_per_class) or workers_per_class < 1:  # (0 was "max_workers must be greater than 0")
            raise ValueError(
                f"inproc transport {name!r}: workers_per_class must be an int >= 1, got {workers_per_class!r}"
            )
        self.fabric = fabric or DEFAULT_FABRIC
        self._pools = {
            p: ThreadPoolExecutor(max_workers=workers_per_class, thread_name_prefix=f"inproc-{name}-{p}")
            for p in PRIORITIES
        }
        self._lanes: dict[tuple[str, str], _Lane] = {}  # (peer, class) -> its lane, made on first use
        self._peers: dict[str, _Link] = {}  # connected peer -> the link (changed with `_LINKS` held)
        self._pending: set[Future] = set()
        # Copies running into or out of this endpoint's regions (any endpoint's lanes): `close` waits for them, so no
        # byte moves in or out of its regions once it returned (as a closed TCP endpoint's joined readers).
        self._copying = 0
        self._copies_done = threading.Condition()
        self.fabric.attach(self)

    @property
    def address(self) -> str:
        return self.name

    def connect(
        self, peer: str, address: Any = None, timeout: float = 10.0, *, wait_for_listener_s: float | None = None
    ) -> None:
        """`Transport.connect`: `wait_for_listener_s` is checked, and nothing waits for it (no listener here: an
        endpoint not in the fabric fails at once)."""
        self._check_open()
        check_wait_for_listener(wait_for_listener_s, f"{self.name}: connect")
        ep = self.fabric.lookup(address or peer)
        if ep is None or ep.closed:
            raise PeerLostError(f"{self.name}: no in-process endpoint {address or peer!r}")
        if ep.name != peer:
            raise PeerLostError(f"{self.name}: endpoint at {address!r} is {ep.name!r}, expected {peer!r}")
        with _LINKS:  # (a `close` of either side fences its links with it held: it sees this one, or we see it closed)
            if ep.closed or self.closed:
                self._check_open()
                raise PeerLostError(f"{self.name}: in-process endpoint {peer!r} closed while connecting")
            link = self._peers.get(peer)
            if link is None or link.other(self) is not ep or ep._peers.get(self.name) is not link:
                link = _Link(self, ep)
                with self._lock:
                    self._peers[peer] = link
                with ep._lock:
                    ep._peers[self.name] = link

    def disconnect(self, peer: str) -> None:
        """`Transport.disconnect`: the link to `peer` is fenced (see the module docstring)."""
        with _LINKS:
            link = self._peers.get(peer)
            if link is None:
                return
            failed = _fence(link, PeerLostError(f"{self.name!r} disconnected from {peer!r}"))
        _settle([link], failed)

    def peers(self) -> list[str]:
        with self._lock:
            return sorted(self._peers)

    def _peer(self, peer: str) -> InProcTransport:
        return self._link(peer)[0]

    def _link(self, peer: str) -> tuple[InProcTransport, _Link]:
        """The endpoint `peer` and the link to it (PeerLostError if none, or it is down)."""
        link = self._peers.get(peer)  # (a dict lookup is atomic)
        if link is None:
            self._check_open()  # (a post racing `close`, which disconnects first: TransportClosedError, not a lost peer)
            raise PeerLostError(f"{self.name}: not connected to {peer!r} (connect first, or it closed)")
        ep = link.other(self)
        if ep.closed or link.dead is not None:
            self._check_open()
            raise PeerLostError(f"{self.name}: peer {peer!r} is gone")
        return ep, link

    def _copy(
        self,
        src: MemoryRegion | str,
        so: int,
        dst: MemoryRegion | str,
        do: int,
        n: int,
        priority: str,
        ep: InProcTransport,
        link: _Link,
    ) -> None:
        """Copy n bytes between a region of this endpoint and one of `ep`'s. The peer's side is given by name (a str)
        and looked up in `ep`'s regions as each chunk lands, as a tcp receiver takes the region of each frame when it
        arrives (an RDMA NIC checks its MR): a region the peer deregistered after the transfer was posted is a
        `RegionError` and no byte moves, one it registered again under the name takes the bytes (its new buffer,
        bounds checked again). Resolved at posting, a queued write used to land in the deregistered buffer."""
        pos = 0
        # id(region) -> (the region, its bytes as a uint8 array: np.copyto releases the GIL). The region is held and
        # compared: one deregistered mid-transfer was freed and lent its id to the next registered, whose chunks went
        # to the old buffer.
        arrays: dict[int, tuple[MemoryRegion, np.ndarray]] = {}

        def arr(region: MemoryRegion) -> np.ndarray:
            hit = arrays.get(id(region))
            if hit is None or hit[0] is not region:
                hit = arrays[id(region)] = (region, np.frombuffer(region.view, dtype=np.uint8))
            return hit[1]

        def check() -> None:
            """Either side closed or the link dropped mid-way (a paced copy): stop moving and pacing bytes, as a closed
            socket would. Before each chunk, and (traffic pacers) while a chunk waits for its slot."""
            if self._closed:
                raise TransportClosedError(f"endpoint {self.name!r} closed during the transfer")
            if ep.closed:
                raise PeerLostError(f"peer {ep.name!r} closed during the transfer")
            if link.dead is not None:
                raise PeerLostError(f"link to {ep.name!r} dropped during the transfer: {link.dead}")

        held = False  # the chunk the pacer is about to yield is counted in `link.copying` (`claim`)

        def release() -> None:  # (`link.cond` held)
            link.copying -= 1
            if not link.copying:
                link.cond.notify_all()

        def claim() -> None:
            """`check` for a pacer that takes one (`dualpath_jax.traffic`: called while a chunk waits for its slot, at
            least every CHECK_INTERVAL_S, and once when the slot has come, right before the chunk is yielded and
            recorded as moved): once it passes, the chunk counts as being copied until the next call or its copy, so a
            close or disconnect from then on waits for it. A close between the pacer's last check and the copy's own
            failed the copy of a chunk already recorded: the link recorded one chunk more than moved."""
            nonlocal held
            with link.cond:
                if held:
                    held = False
                    release()
                check()
                link.copying += 1
                held = True

        if not n:
            _peer_region(ep, src if isinstance(src, str) else dst, so if isinstance(src, str) else do, 0)
        chunk = PACE_CHUNK if self.pacer is not None else max(n, 1)
        try:
            for step in self._paced_chunks(n, priority, chunk, claim):
                with link.cond:  # (`disconnect` waits for a chunk being copied or claimed, not for its pacer's wait)
                    claimed, held = held, False
                    try:
                        if not claimed:  # (no pacer, or one that takes no `check`)
                            check()
                        s = _peer_region(ep, src, so, n) if isinstance(src, str) else src
                        d = _peer_region(ep, dst, do, n) if isinstance(dst, str) else dst
                    except BaseException:
                        if claimed:
                            release()
                        raise
                    if not claimed:
                        link.copying += 1
                try:
                    np.copyto(arr(d)[do + pos : do + pos + step], arr(s)[so + pos : so + pos + step])
                finally:
                    with link.cond:
                        release()
                pos += step
        finally:
            if held:  # (the pacer raised, or ended, after a check that passed)
                with link.cond:
                    held = False
                    release()

    @contextlib.contextmanager
    def _moving(self, ep: InProcTransport, link: _Link, what: str):
        """Count a copy between this endpoint and `ep` on both (their `close` waits for it); `TransportClosedError` /
        `PeerLostError` instead if either is closed already or their `link` is down (`_copy` checks it per chunk)."""
        entered: list[InProcTransport] = []
        try:
            for e in (self,) if ep is self else (self, ep):
                with e._copies_done:
                    if e._closed:
                        if e is self:
                            raise TransportClosedError(f"endpoint {self.name!r} closed before the {what} ran")
                        raise PeerLostError(f"peer {ep.name!r} closed before the {what} ran")
                    e._copying += 1
                entered.append(e)
            if link.dead is not None:
                raise PeerLostError(f"link to {ep.name!r} dropped before the {what} ran: {link.dead}")
            yield
        finally:
            for e in entered:
                with e._copies_done:
                    e._copying -= 1
                    if not e._copying:
                        e._copies_done.notify_all()

    def _submit(self, peer: str, priority: str, fn) -> Future:
        """Queue `fn` on the (peer, priority) lane; its future resolves to what `fn` returns (or fails with what
        it raises) after every task posted to that lane before it ran."""
        fut: Future = Future()
        with self._lock:
            self._check_open()
            self._pending.add(fut)
            lane = self._lanes.get((peer, priority))
            if lane is None:
                lane = self._lanes[peer, priority] = _Lane(self._pools[priority])
            lane.tasks.append((fut, fn))
            start = not lane.active
            lane.active = True
        if start:
            try:
                lane.pool.submit(self._drain, lane)
            except RuntimeError as e:  # pool shut down by a concurrent close()
                with self._lock:
                    self._pending.discard(fut)
                raise TransportClosedError(f"endpoint {self.name!r} is closed") from e
        return fut

    def _drain(self, lane: _Lane) -> None:
        """Run the lane's tasks in order (on a worker of its class's pool) until it is empty, the endpoint is
        closed (`close` fails what is left), or LANE_BATCH ran: then queue itself behind the class's other lanes.

        A task whose future has done callbacks hands the lane on (to the next `_drain` job, or idle) before it completes
        the future: the callbacks run on this thread, and one that posts to this lane and waits for that transfer waited
        for ever (the lane runs one task at a time, and this drain was it)."""
        done = None
        for _ in range(LANE_BATCH):
            with self._lock:
                if done is not None:
                    self._pending.discard(done)
                if self._closed or not lane.tasks:
                    lane.active = False
                    return
                done, fn = lane.tasks.popleft()
            try:
                if not done.set_running_or_notify_cancel():  # (cancelled by its caller)
                    continue
            except RuntimeError:  # (failed by `close` once taken, before it ran)
                continue
            try:
                result, error = fn(), None
            except BaseException as e:  # noqa: BLE001 - surfaced through the future
                result, error = None, e if isinstance(e, Exception) else PeerLostError(repr(e))
            if done._done_callbacks:  # (read without its lock: a callback added meanwhile runs here, as before)
                self._pass_on(lane, done)
                _settle_task(done, result, error)
                return
            _settle_task(done, result, error)
        with self._lock:
            self._pending.discard(done)
        self._resubmit(lane)

    def _pass_on(self, lane: _Lane, done: Future) -> None:
        """Hand `lane` on after its task `done` ran: to a new `_drain` job if tasks are queued, else idle (a later post
        starts one)."""
        with self._lock:
            self._pending.discard(done)
            if self._closed or not lane.tasks:
                lane.active = False
                return
        self._resubmit(lane)

    def _resubmit(self, lane: _Lane) -> None:
        try:
            lane.pool.submit(self._drain, lane)
        except RuntimeError:  # pool shut down by close(), which fails the lane's leftover futures
            pass

    def write(
        self,
        peer: str,
        local_region: str,
        local_offset: int,
        remote_region: str,
        remote_offset: int,
        length: int,
        priority: str = "low",
        notify: int | None = None,
    ) -> Future:
        self._check_open()
        check_priority(priority)
        tag = check_notify(notify)  # before anything is copied
        ep, link = self._link(peer)
        src = self.region(local_region)
        local_offset, length = src.check(local_offset, length, f"write from {self.name}:{local_region}")
        dst = ep.region(remote_region)
        remote_offset = _remote_offset(remote_offset)
        dst.check(remote_offset, length, f"write to {peer}:{remote_region}")
        # (the peer's region by name: `_copy` takes it as registered when the bytes land)
        copies = [(src, local_offset, remote_region, remote_offset, length)]
        return self._submit(peer, priority, self._landing(ep, link, copies, priority, tag, remote_region))

    def _landing(self, ep: InProcTransport, link: _Link, copies: list, priority: str, tag: int | None, region: str):
        """The lane task of a write or a `write_many` batch: its `copies` ((src region, src offset, the peer's region
        name, dst offset, n), checked when posted) in order, then the notification describing the last one (in `region` of the peer); returns the
        bytes moved."""
        total = sum(c[4] for c in copies)
        _, _, _, last_offset, last_n = copies[-1]

        def run() -> int:
            with self._moving(ep, link, "write"):
                for src, so, dst, do, n in copies:
                    self._copy(src, so, dst, do, n, priority, ep, link)
                if tag is not None:
                    with link.cond:  # (none arrives once `disconnect` returned)
                        if link.dead is not None:
                            raise PeerLostError(f"link to {ep.name!r} dropped before the notification: {link.dead}")
                        ep.completions.put(Notification(self.name, tag, region, last_offset, last_n))
            return total

        return run

    def write_many(
        self,
        peer: str,
        entries: Sequence[WriteEntry],
        priority: str = "low",
        notify: int | None = None,
    ) -> Future:
        """One lane task for the whole batch: its entries land in order, then the notification (see
        `Transport.write_many`)."""
        check_priority(priority)
        self._check_open()
        batch = self._check_write_batch(peer, entries, notify)
        if not batch:
            return completed_future(0)
        tag = check_notify(notify)
        ep, link = self._link(peer)
        copies = [(self.region(lr), lo, rr, _remote_offset(ro), n) for lr, lo, n, rr, ro in batch]
        return self._submit(peer, priority, self._landing(ep, link, copies, priority, tag, batch[-1][3]))

    def _check_remote_range(self, peer: str, region: str, offset: int, length: int) -> None:
        self._peer(peer).region(region).check(_remote_offset(offset), length, f"write to {peer}:{region}")

    def read(
        self,
        peer: str,
        local_region: str,
        local_offset: int,
        remote_region: str,
        remote_offset: int,
        length: int,
        priority: str = "low",
    ) -> Future:
        self._check_open()
        check_priority(priority)
        ep, link = self._link(peer)
        dst = self.region(local_region)
        local_offset, length = dst.check(local_offset, length, f"read into {self.name}:{local_region}")
        src = ep.region(remote_region)
        remote_offset = _remote_offset(remote_offset)
        src.check(remote_offset, length, f"read from {peer}:{remote_region}")

        def run() -> int:
            with self._moving(ep, link, "read"):
                self._copy(remote_region, remote_offset, dst, local_offset, length, priority, ep, link)
            return length

        return self._submit(peer, priority, run)

    def send(self, peer: str, payload: bytes) -> Future:
        self._check_open()
        ep, link = self._link(peer)
        data = check_message(payload)

        def run() -> int:
            with link.cond:  # (none arrives once `disconnect` returned)
                if ep.closed or link.dead is not None:
                    raise PeerLostError(f"peer {peer!r} closed or disconnected before the message was delivered")
                ep.messages.put(self.name, data)
            return len(data)

        return self._submit(peer, "high", run)  # messages keep their order with the high-class transfers

    def _on_deregister(self, region: MemoryRegion) -> None:
        if region.name not in self._regions:
            raise RegionError(f"no region {region.name!r}")

    def _shutdown(self) -> None:
        self.fabric.detach(self)
        # Disconnect both ways, as a closed TCP set is: peers no longer list this endpoint (and it lists none), and an
        # endpoint started later under this name must be connected again. (Closed peers used to stay in `peers()`, and
        # a peer's writes went to a restarted endpoint that had never connected.)
        with _LINKS:
            links = list(self._peers.values())
            failed = [f for link in links for f in _fence(link, PeerLostError(f"peer {self.name!r} closed"), self)]
        _settle(links, failed)
        for pool in self._pools.values():
            # Queued transfers are cancelled (their futures report CancelledError); running copies finish.
            pool.shutdown(wait=False, cancel_futures=True)
        # (a paced copy stops at its next chunk; one waiting for a pacer that takes a `check` (`dualpath_jax.traffic`)
        # stops within its CHECK_INTERVAL_S: close used to sit out the grant, up to CLOSE_WAIT_S)
        with self._copies_done:
            if not self._copies_done.wait_for(lambda: not self._copying, CLOSE_WAIT_S):
                log.error("%s: %d copies still running %s s after close", self.name, self._copying, CLOSE_WAIT_S)
        with self._lock:
            pending, self._pending = list(self._pending), set()
        for fut in pending:
            if not fut.done():
                with contextlib.suppress(concurrent.futures.InvalidStateError):  # raced with completion
                    fut.set_exception(TransportClosedError(f"endpoint {self.name!r} closed with the transfer pending"))
