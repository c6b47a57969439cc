"""The traffic manager: emulated NIC links that pace real transfers and record per-link bytes over time.

DualPath's data plane is bounded by two kinds of links (DESIGN.md "Vocabulary", PAPER.md "Hardware"):

- each node's **SNIC** (storage NIC, bandwidth s*B), shared by the node's engines, carries storage reads
  and write-backs;
- each engine's **CNIC** (compute NIC, bandwidth B) carries model collectives at **high** priority and KV
  at **low** priority; InfiniBand virtual lanes share it by weighted round-robin, ~99:1 under contention,
  while either class may use the whole link when the other is idle (work-conserving).

A `Link` reproduces that on one machine: a transfer asks the link for permission to move n bytes, in chunks
of at most `quantum` bytes, and sleeps until its slot. Slots are handed out by start-time fair queuing
(SFQ) across the classes, so the achieved rates follow the weights under contention and the whole rate
goes to a class that is alone. Each grant is recorded as `dualpath_jax.metrics.LinkBytes` samples (per
class for CNICs: "cnic/engine<E>/high", "cnic/engine<E>/low", and "cnic/engine<E>/in/<class>" for the ingress
direction where a CNIC has one; "snic/node<N>" for SNICs), binned over
time, for the load-balance metrics.

Scope: links are thread-safe objects in one process. Engines of one emulated node must therefore live in
one process (threads) to share its SNIC; a CNIC belongs to one engine, which is one process or thread, so
per-engine processes are fine. (For caps enforced across processes by the kernel see
`experiments/netns_cluster.sh`: network namespaces with separate storage and compute veth networks shaped
by tc.)

Pacing models the sender's egress (like tc on an interface): a transport paces the bytes it sends.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import itertools
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

from dualpath_jax import clock
from dualpath_jax.checks import is_int, is_real
from dualpath_jax.metrics import LinkBytes

DEFAULT_CNIC_WEIGHTS = {"high": 99.0, "low": 1.0}  # InfiniBand VL arbitration, PAPER.md "QoS"
LOOKAHEAD = 4  # at least this many chunks a paced transfer keeps queued on a link ahead of the one it is moving,
LOOKAHEAD_S = 0.02  # and at least this much of the link's time (a fast link's chunks are short): `Link.lookahead`
LOOKAHEAD_MAX = 64  # (at most this many chunks)
ANTICIPATE_S = 0.002  # a class whose queue just emptied keeps its turn this long past its last slot (`Link._dispatch`)
MAX_WEIGHT_RATIO = 1e7  # largest / smallest class weight of a link: the float64 SFQ tags (bytes / weight) resolve it
MIN_RATE = 1.0  # bytes/s: a slower link's one chunk takes hours (1e-300 B/s: a wait the clock could not express)
CHECK_INTERVAL_S = 0.02  # a paced transfer given a `check` calls it at least this often while it waits for its slot


class _Ticket:
    __slots__ = (
        "after",
        "charge",
        "cls",
        "dropped",
        "joint",
        "nbytes",
        "ready",
        "rest",
        "seq",
        "slot",
        "split",
        "start_tag",
    )

    def __init__(
        self, start_tag: float, seq: int, nbytes: int, cls: str, joint: bool = False, after=None, split: bool = False
    ):
        self.start_tag, self.seq, self.nbytes, self.cls = start_tag, seq, nbytes, cls
        # A chunk that may be cut to fill the gap before a held slot (`Link.paced`): `rest` bytes then go as one more.
        self.split, self.rest = split, 0
        self.charge: float | None = None  # the class's SFQ finish tag its enqueue set (None: its share was paid)
        self.slot: float | None = None  # granted slot start (monotonic time)
        # A chunk of a multi-link path: the link only gives it its turn (`ready`, SFQ order); the slot is then
        # reserved on every link of the path at once (`Pacer`), so the chunk crosses each link in its own slot.
        self.joint = joint
        self.ready = False
        # The path's previous chunk here: a turn takes no time on the link until it is reserved, so a path gets its
        # next turn only then (else a class idle for an instant let the other's queued chunks all take turns at once).
        self.after: _Ticket | None = after
        self.dropped = False  # cancelled

    def eligible(self) -> bool:
        a = self.after
        return a is None or a.slot is not None or a.dropped

    def __lt__(self, other: _Ticket) -> bool:
        return (self.start_tag, self.seq) < (other.start_tag, other.seq)


class Link:
    """A rate-capped link with weighted priority classes (thread-safe).

    Args:
      name: the link's metric name ("snic/node0", "cnic/engine3"); CNIC samples get "/<class>" appended
        when `per_class_names` is set.
      rate_bytes_per_s: capacity in bytes/s, at least MIN_RATE (`math.inf` = unpaced, only recorded).
      weights: class -> weight (> 0 and finite); under contention class c gets weight_c / sum(weights of backlogged
        classes) of the rate. A class alone gets the whole rate. A class whose queue just emptied keeps its turn
        until ANTICIPATE_S (at most `burst_s`) past its last slot, as a flow sending one transfer after another
        asks for its next one only once its thread wakes at its last slot.
      quantum: largest chunk granted at once (bytes). Default: ~5 ms of the link's rate, within 16 KiB..8 MiB
        (1 MiB on an unpaced link).
      burst_s: how far the link may catch up after being idle or late (token-bucket depth, seconds). A class's
        anticipated turn (above) is caught up within it.
      clock_origin: `time.monotonic()` value that sample times are measured from.
      sample_interval: width of the recorded `LinkBytes` bins, seconds.
    """

    def __init__(
        self,
        name: str,
        rate_bytes_per_s: float,
        weights: Mapping[str, float] | None = None,
        quantum: int | None = None,
        burst_s: float = 0.01,
        clock_origin: float | None = None,
        sample_interval: float = 0.1,
        per_class_names: bool = False,
    ):
        # (True was a 1 B/s link and quantum=True 1-byte chunks, silently: a transfer that never ends; "1e6" failed on
        # `>` without a name)
        for what, x in (("rate", rate_bytes_per_s), ("burst_s", burst_s), ("sample_interval", sample_interval)):
            if not is_real(x):
                raise TypeError(f"link {name!r}: {what} must be a number, got {x!r}")
        if quantum is not None and not is_int(quantum):
            raise TypeError(f"link {name!r}: quantum must be a whole number of bytes or None, got {quantum!r}")
        check_rate(rate_bytes_per_s, f"link {name!r}: rate")
        self.name = name
        self.rate = float(rate_bytes_per_s)
        if weights is not None:  # (empty: it silently took the default classes)
            check_weights(weights, f"link {name!r}: weights", lambda c: f"link {name!r}: weight of class {c!r}")
        self.weights = dict({"high": 1.0, "low": 1.0} if weights is None else weights)
        if quantum is None:
            quantum = 1 << 20 if math.isinf(self.rate) else int(max(16 << 10, min(8 << 20, self.rate * 0.005)))
        if not quantum >= 1:  # 0: no chunk ever fits; < 0: nothing would be paced or recorded
            raise ValueError(f"link {name!r}: quantum must be >= 1 byte, got {quantum}")
        if not burst_s >= 0:  # < 0 would put every slot beyond the grant horizon: transfers would wait forever
            raise ValueError(f"link {name!r}: burst_s must be >= 0 s, got {burst_s}")
        if not 0 < sample_interval < math.inf:  # (inf put every byte in one bin starting at 0 * inf: NaN)
            raise ValueError(
                f"link {name!r}: sample_interval must be > 0 s, got {sample_interval} (bins of a finite width)"
            )
        self.quantum = int(quantum)
        self.burst_s = float(burst_s)
        # How far ahead of the link's timeline a slot may be granted: less than one chunk, so a flow that
        # immediately asks for its next chunk competes for the next slot.
        self.horizon = 0.5 * self.quantum / self.rate if not math.isinf(self.rate) else 0.0
        self.per_class_names = per_class_names
        self.clock_origin = time.monotonic() if clock_origin is None else clock_origin
        self.sample_interval = float(sample_interval)
        self._cond = threading.Condition()
        self._queues: dict[str, collections.deque[_Ticket]] = {c: collections.deque() for c in self.weights}
        self._finish: dict[str, float] = {c: 0.0 for c in self.weights}  # SFQ finish tag per class
        # The tags' weights, the smallest 1 (SFQ order is the same under a common factor; a tag grows by at most the
        # bytes): tiny weights, e.g. (1e-300, 2e-300), made tags of bytes / 1e-300, inf within a few chunks (the
        # classes then tied whatever their weights; `cancel`'s refund, inf - inf, was NaN).
        least = min(self.weights.values())
        self._tag_weight: dict[str, float] = {c: w / least for c, w in self.weights.items()}
        self._vtime = 0.0  # SFQ virtual time = start tag of the last granted chunk
        self._busy_until = time.monotonic()  # end of the last granted slot on the link's timeline
        self._held: list[tuple[float, float]] = []  # joint chunks' slots booked beyond it (a path's slower link's time)
        self._wake = self._busy_until  # when the head of the queues may be granted next
        # Joint chunks whose turn came here (`ready`) but whose slot is not booked yet, and the end of their time counted
        # from when their turns came: until then (less the horizon) it holds the link's next turns.
        self._turns: set[_Ticket] = set()
        self._turns_end = 0.0
        self._seq = itertools.count()
        self._bins: dict[tuple[str, int], int] = collections.defaultdict(int)
        self.bytes_by_class: dict[str, int] = {c: 0 for c in self.weights}
        self._last_end: dict[str, float] = {c: -math.inf for c in self.weights}  # end of each class's last slot
        self.anticipate_s = min(ANTICIPATE_S, self.burst_s)  # (caught up within the burst: the link idles no longer)

    def lookahead(self, quantum: int | None = None) -> int:
        """Chunks (of `quantum`, default the link's) a paced transfer keeps queued: LOOKAHEAD, or LOOKAHEAD_S of the
        link's time where that is more (at most LOOKAHEAD_MAX)."""
        if math.isinf(self.rate):
            return LOOKAHEAD
        n = LOOKAHEAD_S * self.rate / (self.quantum if quantum is None else quantum)
        return max(LOOKAHEAD, min(LOOKAHEAD_MAX, math.ceil(n * (1 - 1e-6))))  # (the default quantum: exactly 4)

    # ---- pacing -----------------------------------------------------------------------------------------
    def acquire(self, nbytes: int, cls: str = "low") -> None:
        """Block until `nbytes` of class `cls` may cross the link (chunk by chunk); records the bytes."""
        for _ in self.paced(nbytes, cls):
            pass

    def paced(self, nbytes: int, cls: str = "low", check: Callable[[], None] | None = None) -> Iterator[int]:
        """Yield the chunk sizes of an `nbytes` transfer, each once its slot has come: move the chunk's bytes
        right after it is yielded. `check` (optional): called at least every CHECK_INTERVAL_S while waiting; what it
        raises (the transport closed) ends the wait at once, the transfer's chunks taken back.

        The next `lookahead()` - 1 chunks stay queued while the thread sleeps until the current chunk's slot, so a
        backlogged flow always has a ticket waiting when the link decides who goes next (however late its
        thread wakes up). Tickets are granted at most `horizon` ahead, so queued tickets do not hog the link.
        A chunk too long for the gap before a slot held for a multi-link path (`Pacer`) is cut to fill it, and its rest
        goes as one more chunk: the yielded sizes may be smaller than `quantum`.
        """
        sizes = iter(self.chunks(nbytes))  # (lazy: a list of a huge transfer's tiny chunks took GBs before its first)
        # (a fixed 4 chunks were 3.4 ms of a 10 GB/s link: a high thread descheduled longer left its class queue
        # empty, and low took 3-12x its 1% share)
        ahead = self.lookahead()
        pending = collections.deque(self.enqueue(n, cls, split=True) for n in itertools.islice(sizes, ahead))
        cur = None  # the chunk being waited for (out of `pending`) until it is yielded
        try:
            while pending:
                cur = t = pending.popleft()
                start = self.wait(t, check=check)
                if t.rest:  # cut to fill a gap before a held slot: the rest goes as one more chunk (its share paid)
                    pending.append(self.enqueue(t.rest, cls, split=True, paid=True))
                elif (n := next(sizes, None)) is not None:
                    pending.append(self.enqueue(n, cls, split=True))
                _sleep_until(start, check)
                cur = None
                yield t.nbytes
        finally:
            # A transfer dropped part way (its consumer stopped iterating): the chunks it queued ahead never cross.
            # Left queued, they were granted later anyway, holding up other flows and recorded as bytes moved.
            for t in reversed(pending):  # (newest first: each is then its class's last chunk)
                self.cancel(t)
            # An exception while waiting for a chunk (`check`, a KeyboardInterrupt): it never crosses either. (It was
            # out of `pending`: left queued, the class's later transfers waited behind it and its bytes were recorded.)
            if cur is not None:
                self.cancel(cur)

    def chunks(self, nbytes: int) -> Sequence[int]:
        """The chunk sizes of an `nbytes` transfer (a lazy sequence: len and indexing, no list of them)."""
        return _chunks(nbytes, self.quantum, f"link {self.name!r}")

    def reserve(self, nbytes: int, cls: str) -> float:
        """Queue one chunk (<= quantum), block until granted; returns the slot start (monotonic seconds)."""
        # (more than a quantum took one slot as long as the whole transfer: the other class, 99:1 high, waited behind
        # all of it; a negative size was recorded as negative bytes and moved its class's finish tag back, ahead of the
        # other; 2.5 bytes were 2)
        if not is_int(nbytes) or not 0 <= nbytes <= self.quantum:
            raise ValueError(
                f"link {self.name!r}: reserve takes one chunk, a whole number of 0..{self.quantum} bytes (the quantum), "
                f"got {nbytes!r}; pace a transfer with acquire() or paced()"
            )
        t = self.enqueue(nbytes, cls)
        try:
            return self.wait(t)
        except BaseException:  # (interrupted: the chunk does not cross, nor stays queued ahead of the class)
            self.cancel(t)
            raise

    def enqueue(
        self,
        nbytes: int,
        cls: str,
        joint: bool = False,
        after: _Ticket | None = None,
        split: bool = False,
        paid: bool = False,
    ) -> _Ticket:
        """Queue one chunk of class `cls` for a slot (start-time fair queuing tag). `joint`: a chunk of a multi-link
        path, only made `ready` here; `Pacer` reserves its slot on all the path's links at once. `split`: the chunk may
        be cut to fill a gap before a held slot (its `rest` is then queued again, `paid`: its share was charged)."""
        if cls not in self.weights:
            raise ValueError(f"link {self.name!r} has classes {sorted(self.weights)}, not {cls!r}")
        with self._cond:
            start_tag = self._vtime if paid else max(self._vtime, self._finish[cls])
            t = _Ticket(start_tag, next(self._seq), int(nbytes), cls, joint, after, split)
            if not paid:
                t.charge = self._finish[cls] = start_tag + nbytes / self._tag_weight[cls]
            if math.isinf(self.rate):
                # An unpaced link grants a chunk when its transfer waits for it (`wait`), and records it then: granted
                # here, the LOOKAHEAD chunks `paced` queues ahead were recorded before they moved (a slow consumer's
                # bytes landed in bins up to LOOKAHEAD chunks early).
                t.ready = joint
            else:
                self._queues[cls].append(t)
                self._dispatch()
            return t

    def cancel(self, t: _Ticket) -> None:
        """Take back a queued chunk that will not cross: an ungranted one leaves the queue (a `ready` joint one, whose
        turn came but which holds no slot, too) and its class share is refunded; a granted one's bytes leave the
        records (its slot is not handed out again)."""
        with self._cond:
            t.dropped = True
            self._turns.discard(t)
            if t.slot is None:
                q = self._queues[t.cls]
                if t in q:
                    q.remove(t)
                # Its fair share is not charged: the class's chunks queued after it move up by the share it was
                # charged (by the tag it set: a chunk cut to fill a gap kept its whole charge, a paid rest none).
                # (Only the class's last chunk was refunded: with another flow of the class queued behind a dropped
                # transfer, the class kept the charge, and 99:1 classes ran ~99:0.67 under steady drops.)
                # (A joint chunk whose turn came while its path waited for another link kept its charge when its
                # transfer was dropped: its class then waited a whole chunk behind the other for bytes never moved.)
                if t.charge is not None:
                    share = t.charge - t.start_tag
                    for u in q:
                        if u.charge is not None and u.seq > t.seq:
                            u.start_tag -= share
                            u.charge -= share
                    self._finish[t.cls] -= share
                    t.charge = None  # (cancelled twice: refunded once)
                self._dispatch()  # (the next in line, or the path's next chunk, may go now)
            elif t.nbytes:
                self._record(t.slot, -t.nbytes, t.cls)
                t.nbytes = 0  # (cancelled twice: taken back once)

    def wait(self, t: _Ticket, until: float = math.inf, check: Callable[[], None] | None = None) -> float | None:
        """Block until ticket `t` is granted (a joint one: `ready`), or until monotonic time `until`; returns its
        slot start (None for a joint one). The caller moves its bytes from then. `check` (must not block; called with
        the link's lock held) is called at least every CHECK_INTERVAL_S meanwhile: what it raises ends the wait (the
        caller cancels `t`)."""
        if t.slot is not None or t.ready:
            return t.slot
        with self._cond:
            if math.isinf(self.rate):  # unpaced: granted (and recorded) now, unless taken back
                if t.slot is None and not t.dropped:
                    t.slot = time.monotonic()
                    self._record(t.slot, t.nbytes, t.cls)
                return t.slot
            while t.slot is None and not t.ready:
                if t.dropped:  # (taken back, it is in no queue: the wait never ended)
                    raise RuntimeError(f"link {self.name!r}: a chunk of {t.nbytes} B was cancelled; it will not cross")
                if check is not None:
                    check()
                self._dispatch()
                now = time.monotonic()
                if t.slot is not None or t.ready or now >= until:
                    break
                timeout = min(max(self._wake - now, 0.0005), until - now, threading.TIMEOUT_MAX)
                self._cond.wait(timeout if check is None else min(timeout, CHECK_INTERVAL_S))
            return t.slot

    def _dispatch(self) -> None:
        """Grant slots, in SFQ order over the class heads, while the link timeline is within the horizon."""
        now = time.monotonic()
        granted = False
        while True:
            heads = [next((t for t in q if t.eligible()), None) for q in self._queues.values()]
            heads = [t for t in heads if t is not None]
            if not heads:
                break
            # A link idle for long may only catch up burst_s worth of bytes.
            self._advance(now - self.burst_s)
            # A joint chunk's turn takes link time only once booked, and its path's next chunk waits for that: the next
            # turn waits too, until it is booked or for at most its own time (its path may wait on a busier link).
            # (Turns went on meanwhile: the other class got one beside every chunk of a multi-link path, and 99:1
            # classes ran ~50:50.)
            if self._turns and self._turns_end - self.horizon > now:
                self._wake = self._turns_end - self.horizon
                break
            t = min(heads)
            slot = self._busy_until if t.joint else self._fit(self._busy_until, t.nbytes / self.rate)
            if t.split and slot > self._busy_until:
                # Too long for the gap before a held slot: cut to fill it (left idle, the link was not work-conserving).
                fill = int((self._held[0][0] - self._busy_until) * self.rate)
                if fill >= max(1, self.quantum // 16):
                    t.nbytes, t.rest, slot = fill, t.rest + t.nbytes - fill, self._busy_until
            if slot > now + self.horizon:
                self._wake = slot - self.horizon
                break
            # Anticipation: a class that would go before t (SFQ order) and whose queue emptied as its last slot ran may
            # be a flow between two transfers (its thread asks again once it wakes at that slot): t waits until
            # `anticipate_s` past it, and the link's timeline catches the wait up (`burst_s`). (Granted at once, a
            # high flow of one-chunk transfers got ~1 low quantum per transfer: 99:1 weights ran ~17:83.)
            hold = max(
                (
                    end + self.anticipate_s
                    for c, end in self._last_end.items()
                    if c != t.cls
                    and now < end + self.anticipate_s
                    and self._finish[c] <= t.start_tag
                    and not self._queues[c]  # (chunks waiting for their path's other links: `_turns` holds for them)
                ),
                default=None,
            )
            if hold is not None:
                self._wake = hold
                break
            self._queues[t.cls].remove(t)
            t.after = None  # (no longer needed: a long transfer's tickets are not kept alive in a chain)
            self._vtime = max(self._vtime, t.start_tag)  # (a joint chunk skipped until eligible may go late)
            granted = True
            if t.joint:  # its turn: the slot is reserved on all its path's links at once (`Pacer._reserve`)
                t.ready = True
                base = max(self._busy_until, now, self._turns_end if self._turns else now)
                self._turns.add(t)
                self._turns_end = base + t.nbytes / self.rate
                continue
            self._advance(slot + t.nbytes / self.rate)
            self._last_end[t.cls] = max(self._last_end[t.cls], max(slot, now) + t.nbytes / self.rate)
            # A slot in the past (catching up a burst) is moved now: recorded then, not in a bin before the transfer.
            t.slot = max(slot, now)
            self._record(t.slot, t.nbytes, t.cls)
        if granted:
            self._cond.notify_all()

    def _advance(self, until: float) -> None:
        """Move the end of the link's booked timeline to `until` (at least) and past the held slots it reaches."""
        busy, held = max(self._busy_until, until), self._held
        while held and held[0][0] <= busy + 1e-9:
            busy = max(busy, held.pop(0)[1])
        self._busy_until = busy

    def _fit(self, start: float, duration: float) -> float:
        """The earliest slot from `start` on that overlaps no held slot (the gaps before them are filled)."""
        for h0, h1 in self._held:
            if start + duration <= h0 + 1e-9:
                break
            start = max(start, h1)
        return start

    def _hold(self, start: float, duration: float) -> None:
        """Book [start, start + duration) for a joint chunk (`start` >= the booked timeline, a free gap)."""
        if start <= self._busy_until + 1e-9:
            self._advance(start + duration)
        else:
            bisect.insort(self._held, (start, start + duration))

    # ---- joint slots: a multi-link path's chunk, booked on all its links at once (`Pacer._reserve`) -------
    @property
    def lock(self) -> threading.Condition:
        """The link's lock: `Pacer` holds those of all the path's links while it books a joint slot."""
        return self._cond

    def free_slot(self, start: float, duration: float, now: float) -> float:
        """(`lock` held) The earliest slot from `start` on that this link's timeline has free for `duration` s (a link
        idle for long catches up at most `burst_s`); a joint slot is one every link of the path has free."""
        self._advance(now - self.burst_s)
        return self._fit(max(start, self._busy_until), duration)

    def book(self, tickets: Sequence[_Ticket], slot: float, duration: float, start: float) -> None:
        """(`lock` held) Book [slot, slot + duration) for a joint chunk (a `free_slot` of every link of its path; 0 s:
        an unpaced link) and grant its `tickets` here at `start`, recorded then (the path's next chunk may take its
        turn)."""
        # A slot held beyond the timeline leaves a gap that other flows fill: its class is not between two transfers
        # here, and anticipating it would leave the gap idle (a path at half the link's rate left low 2-40% of it).
        contiguous = slot <= self._busy_until + 1e-9
        if duration:
            self._hold(slot, duration)
        for t in tickets:
            t.slot = start
            if contiguous:
                self._last_end[t.cls] = max(self._last_end[t.cls], start + duration)
            self._turns.discard(t)
            self._record(start, t.nbytes, t.cls)
        self._cond.notify_all()

    # ---- recording --------------------------------------------------------------------------------------
    def _record(self, when: float, nbytes: int, cls: str) -> None:
        # No bin for no bytes: `reserve(0)` and `record(0)` left a 0-byte bin, whose time `rate_of` then counted
        if not nbytes:
            return
        rel = max(0.0, when - self.clock_origin)
        name = f"{self.name}/{cls}" if self.per_class_names else self.name
        key = (name, int(rel / self.sample_interval))
        self._bins[key] += nbytes
        if nbytes < 0 and not self._bins[key]:  # (a chunk taken back: no empty bin left behind)
            del self._bins[key]
        self.bytes_by_class[cls] = self.bytes_by_class.get(cls, 0) + nbytes

    def record(self, nbytes: int, cls: str = "low") -> None:
        """Record bytes that crossed the link without pacing them (e.g. measured elsewhere)."""
        # (a typo of a class was recorded as a class of its own: samples "cnic/engine0/hihg", bytes_by_class too)
        if cls not in self.weights:
            raise ValueError(f"link {self.name!r} has classes {sorted(self.weights)}, not {cls!r}")
        if not is_int(nbytes) or nbytes < 0:
            raise ValueError(f"link {self.name!r}: a record of {nbytes!r} bytes (a whole number >= 0)")
        nbytes = int(nbytes)
        with self._cond:
            self._record(time.monotonic(), nbytes, cls)

    def samples(self) -> list[LinkBytes]:
        with self._cond:
            items = sorted(self._bins.items())
        return [LinkBytes(name, b * self.sample_interval, (b + 1) * self.sample_interval, n) for (name, b), n in items]

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_class.values())


class _Chunks(Sequence[int]):
    """The chunk sizes of an `n`-byte transfer cut into chunks of at most `quantum` bytes, computed on access (a list
    of them held ~8 bytes per chunk: 1-byte chunks of a 1 GB transfer were 8 GB before its first chunk moved)."""

    __slots__ = ("n", "quantum")

    def __init__(self, n: int, quantum: int):
        self.n, self.quantum = n, quantum

    def __len__(self) -> int:
        return -(-self.n // self.quantum)

    def __getitem__(self, k):  # (int index; a slice gives a list)
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        k = k + len(self) if k < 0 else k
        if not 0 <= k < len(self):
            raise IndexError(k)
        return min(self.quantum, self.n - k * self.quantum)

    def __repr__(self) -> str:
        return f"_Chunks(n={self.n}, quantum={self.quantum})"


def _sleep_until(start: float, check: Callable[[], None] | None) -> None:
    """Sleep until monotonic time `start` (a granted slot), calling `check` at least every CHECK_INTERVAL_S and once
    when it has come."""
    while (delay := start - time.monotonic()) > 0:
        if check is None:
            time.sleep(min(delay, threading.TIMEOUT_MAX))
            continue
        check()
        time.sleep(min(delay, CHECK_INTERVAL_S))
    if check is not None:  # (closed during the last sleep: the chunk was yielded, recorded, and never moved)
        check()


def _chunks(nbytes: int, quantum: int, where: str) -> _Chunks:
    """`nbytes` cut into chunks of at most `quantum` bytes (none for 0)."""
    # (a negative transfer was paced as nothing, silently; 2.5 paced and recorded 2 bytes, 0.9 none, "7" seven)
    if not is_int(nbytes) or nbytes < 0:
        raise ValueError(f"{where}: a transfer of {nbytes!r} bytes (a whole number >= 0)")
    return _Chunks(int(nbytes), int(quantum))


class Pacer:
    """Paces one transfer path over several links (e.g. a DE's SNIC then its CNIC): each chunk waits for its
    turn on every link (each link's own SFQ order), then one slot is reserved on all of them at once, from when the
    busiest is free, so no link carries more than its rate. Implements `transport.base.Pacer`."""

    def __init__(self, links: Sequence[Link], class_map: Mapping[str, str] | None = None):
        if not links:
            raise ValueError("a pacer needs at least one link")
        self.links = list(links)
        # Which class of each link a transfer priority uses (SNICs carry KV only: map everything to "low").
        self.class_map = dict(class_map or {})
        # The priorities a transfer on this path may name (an unknown one is a typo, never paced as another class).
        self._known = set(DEFAULT_CNIC_WEIGHTS) | set(self.class_map)
        for link in self.links:
            self._known.update(link.weights)

    def classes(self, priority: str) -> list[str]:
        """The class `priority` uses on each link of the path.

        A link with that class (after `class_map`) uses it; a one-class link (an SNIC) takes any known
        priority as its single class. An unknown priority (a typo) is refused, never paced as some other class.
        """
        known = self._known
        if priority not in known:
            raise ValueError(
                f"pacer over {[link.name for link in self.links]}: unknown priority {priority!r}; "
                f"known: {sorted(known)}"
            )
        classes = []
        for link in self.links:
            cls = self.class_map.get(priority, priority)
            if cls in link.weights:
                classes.append(cls)
            elif len(link.weights) == 1:
                classes.append(next(iter(link.weights)))
            else:
                raise ValueError(f"link {link.name!r} has classes {sorted(link.weights)}, not {cls!r}")
        return classes

    def pace(self, nbytes: int, priority: str = "low") -> None:
        """Block until `nbytes` of `priority` may cross every link of the path."""
        for _ in self.paced(nbytes, priority):
            pass

    def paced(self, nbytes: int, priority: str = "low", check: Callable[[], None] | None = None) -> Iterator[int]:
        """Like `Link.paced` over all links of the path: yields each chunk size once every link granted it (`check`:
        see `Link.paced`)."""
        quantum = min(link.quantum for link in self.links)
        sizes = _chunks(nbytes, quantum, f"pacer over {[link.name for link in self.links]}")
        classes = self.classes(priority)
        if len(self.links) == 1:  # one link: its own pacing (a chunk may be cut to fill a gap before a held slot)
            yield from self.links[0].paced(nbytes, classes[0], check)
            return

        # Over several links a chunk is a joint ticket: each link gives it its turn, then one slot is reserved on all.
        joint = len(self.links) > 1
        last: list = [None] * len(self.links)  # the previous chunk's ticket on each link

        def enqueue(k: int) -> list:
            last[:] = [
                link.enqueue(sizes[k], c, joint, after if joint else None)
                for link, c, after in zip(self.links, classes, last, strict=True)
            ]
            return list(last)

        paced_links = [link for link in self.links if not math.isinf(link.rate)]
        ahead = min((link.lookahead(quantum) for link in paced_links), default=LOOKAHEAD)  # (`Link.paced`)
        pending = collections.deque(enqueue(k) for k in range(min(ahead, len(sizes))))
        cur = None  # the chunk's tickets being waited for (out of `pending`) until it is yielded (`Link.paced`)
        try:
            for k in range(len(sizes)):
                cur = tickets = pending.popleft()
                for link, t in zip(self.links, tickets, strict=True):
                    link.wait(t, check=check)
                start = self._reserve(tickets) if tickets[0].slot is None else tickets[0].slot
                if k + ahead < len(sizes):
                    pending.append(enqueue(k + ahead))
                if joint and pending:  # the next chunk's turn may come while this one waits for its slot: reserve it
                    nxt = pending[0]  # then (the path's next turn waits for that, like a link's grant ahead)
                    if all(link.wait(t, start) is None and t.ready for link, t in zip(self.links, nxt, strict=True)):
                        self._reserve(nxt)
                _sleep_until(start, check)
                cur = None
                yield sizes[k]
        finally:
            for tickets in reversed(pending):  # a transfer dropped part way: its chunks queued ahead never cross
                for link, t in zip(self.links, tickets, strict=True):  # (`Link.paced`)
                    link.cancel(t)
            if cur is not None:  # interrupted while waiting for its slot: that chunk does not cross either
                for link, t in zip(self.links, cur, strict=True):
                    link.cancel(t)

    def _reserve(self, tickets: list[_Ticket]) -> float:
        """Reserve one slot for a chunk on every link of the path (each link gave it its turn) and record it there;
        returns the slot start.

        The slot starts when the busiest link is free, and every link's timeline moves past it, so the chunk crosses
        each link in a slot of its own. (Granted link by link, a fast link gave its slot early and moved on to other
        flows while the chunk crossed later, at the slow link's slot: the fast link carried more than its rate.)
        """
        locks = sorted({id(link): link.lock for link in self.links}.items())
        for _, lock in locks:  # (always in the same order: no deadlock between paths sharing links)
            lock.acquire()
        try:
            now = time.monotonic()
            # id -> [link, time the chunk takes on it, its tickets there] (a link twice on the path: twice; unpaced: 0 s)
            path: dict[int, list] = {}
            for link, t in zip(self.links, tickets, strict=True):
                entry = path.setdefault(id(link), [link, 0.0, []])
                entry[1] += 0.0 if math.isinf(link.rate) else t.nbytes / link.rate
                entry[2].append(t)
            paced = [(link, d) for link, d, _ in path.values() if d]
            # The earliest slot free on every link: from the busiest link's booked end, past slots held on any link.
            slot = -math.inf if paced else now
            while (later := max([link.free_slot(slot, d, now) for link, d in paced], default=slot)) > slot:
                slot = later
            start = max(slot, now)  # (a slot in the past, catching up a burst, is moved now: `Link._dispatch`)
            for link, d, ts in path.values():
                link.book(ts, slot, d, start)
        finally:
            for _, lock in reversed(locks):
                lock.release()
        return start


class RecordingPacer:
    """Paces nothing, records every transfer on its links (in each priority's class, as `Pacer` would): for a path the
    kernel shapes instead (`config.netns`: transports over tc-shaped veths), so its bytes still show in the link
    samples. Implements `transport.base.Pacer`."""

    def __init__(self, pacer: Pacer):
        self._pacer = pacer
        self.links = pacer.links

    def pace(self, nbytes: int, priority: str = "low") -> None:
        for _ in self.paced(nbytes, priority):
            pass

    def paced(self, nbytes: int, priority: str = "low", check: Callable[[], None] | None = None) -> Iterator[int]:
        """Yield the chunks of an `nbytes` transfer (the path's smallest quantum, as `Pacer`) without waiting, each
        recorded as it is yielded (about to move); `check` (the transport closed) is called before each. (The whole transfer
        was recorded when it started: however long the kernel-shaped link took to move it, all its bytes fell in one
        bin, and a transfer cut off part way counted in full.)"""
        classes = self._pacer.classes(priority)  # (an unknown priority is refused, as by `Pacer`)
        quantum = min(link.quantum for link in self.links)
        for n in _chunks(nbytes, quantum, f"recording pacer over {[link.name for link in self.links]}"):
            if check is not None:
                check()
            for link, cls in zip(self.links, classes, strict=True):
                link.record(n, cls)
            yield n


@dataclasses.dataclass
class ClusterLinks:
    """Rates (bytes/s) that shape an emulated cluster: see `TrafficManager.for_cluster`."""

    snic_bytes_per_s: float
    cnic_bytes_per_s: float
    cnic_weights: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_CNIC_WEIGHTS))

    def __post_init__(self):
        # (as `Link` checks them: ClusterLinks(-1, 1) was built, refused only in `for_cluster` as link 'snic/node0',
        # and not at all by a `for_cluster` of no nodes)
        for what in ("snic_bytes_per_s", "cnic_bytes_per_s"):
            check_rate(getattr(self, what), f"ClusterLinks: {what}")
        if not isinstance(self.cnic_weights, Mapping):
            raise TypeError(f"ClusterLinks: cnic_weights must be a mapping class -> weight, got {self.cnic_weights!r}")
        check_weights(self.cnic_weights, "ClusterLinks: cnic_weights", lambda c: f"ClusterLinks: cnic_weights[{c!r}]")


def check_rate(x, what: str) -> None:
    """A link rate in bytes/s (`what` names it in the error): a number, > 0 (NaN refused; math.inf: unpaced) and at
    least MIN_RATE (1e-300: an OverflowError from the wait for a slot; 1e-3: days per chunk). `Link`, `ClusterLinks`."""
    if not is_real(x):
        raise TypeError(f"{what} must be a number, got {x!r}")
    if not x > 0:
        raise ValueError(f"{what} must be > 0 bytes/s, got {x}")
    if x < MIN_RATE:
        raise ValueError(f"{what} must be >= {MIN_RATE:g} byte/s, got {x}")


def check_weights(weights: Mapping, what: str, weight_of) -> None:
    """Class weights (`what` names the mapping, `weight_of(c)` one weight in the error): at least one class, each a
    finite number > 0 (an infinite one was strict priority, silently: the other class got nothing beside it), the
    largest at most MAX_WEIGHT_RATIO times the smallest (weights (1e-300, 1) overflowed the fair-queuing tags to inf:
    the classes then tied, whatever their weights). `Link`, `ClusterLinks`."""
    if not weights:
        raise ValueError(f"{what} must name at least one class, got {dict(weights)!r}")
    for c, w in weights.items():
        if not is_real(w):
            raise TypeError(f"{weight_of(c)} must be a number, got {w!r}")
        if not w > 0:
            raise ValueError(f"{weight_of(c)} must be > 0, got {w}")
        if math.isinf(w):
            raise ValueError(f"{weight_of(c)} must be finite (a ratio), got {w}")
    lo, hi = min(weights, key=weights.get), max(weights, key=weights.get)
    if weights[hi] / weights[lo] > MAX_WEIGHT_RATIO:  # (the quotient of two tiny weights is exact enough: a ratio)
        raise ValueError(
            f"{what}: class {hi!r}'s weight {weights[hi]:g} is {weights[hi] / weights[lo]:.3g} times class {lo!r}'s "
            f"{weights[lo]:g}, more than MAX_WEIGHT_RATIO={MAX_WEIGHT_RATIO:g}: the fair-queuing tags (bytes / weight, "
            "float64) cannot resolve the heavier class's chunks beside such a ratio; weights are ratios (~99:1 is "
            "InfiniBand's high:low)"
        )


def wall_grid_origin(sample_interval: float) -> float:
    """A `time.monotonic()` origin at a wall-clock instant that is a multiple of `sample_interval`: the bins of links
    made from it in different processes (the runtime's nodes) or at different times start at the same wall-clock
    instants, so their samples line up bin by bin (one host, or hosts with synced clocks). The grid is the event
    clock's (`clock.now`): a wall-clock step after a process's start moves neither. (Each process's manager used its
    own start as the origin: no two nodes' bins shared a start, and a per-bin balance had to re-bin first.)"""
    mono = time.monotonic()
    return mono - (clock.EPOCH + mono) % sample_interval


class TrafficManager:
    """All emulated links of one process: SNICs per node, CNICs per engine, their pacers and samples. Without a
    `clock_origin`, sample times count from `wall_grid_origin` (bins on the wall clock's grid)."""

    def __init__(self, clock_origin: float | None = None, sample_interval: float = 0.1):
        if clock_origin is None:  # (a bad interval: the plain origin; every link made refuses the interval, naming it)
            good = is_real(sample_interval) and 0 < sample_interval < math.inf
            clock_origin = wall_grid_origin(sample_interval) if good else time.monotonic()
        self.clock_origin = clock_origin
        self.sample_interval = sample_interval
        self._links: dict[str, Link] = {}
        self._lock = threading.Lock()

    def add_link(
        self,
        name: str,
        rate_bytes_per_s: float,
        weights: Mapping[str, float] | None = None,
        per_class_names: bool = False,
        **kw,
    ) -> Link:
        with self._lock:
            if name in self._links:
                raise ValueError(f"link {name!r} already exists")
            link = Link(
                name,
                rate_bytes_per_s,
                weights,
                clock_origin=self.clock_origin,
                sample_interval=self.sample_interval,
                per_class_names=per_class_names,
                **kw,
            )
            self._links[name] = link
            return link

    def add_snic(self, node: int, rate_bytes_per_s: float, **kw) -> Link:
        """The storage NIC of `node`, shared by all its engines (one class: storage traffic)."""
        return self.add_link(f"snic/node{node}", rate_bytes_per_s, {"low": 1.0}, **kw)

    def add_cnic(self, engine: int, rate_bytes_per_s: float, weights: Mapping[str, float] | None = None, **kw) -> Link:
        """The compute NIC of `engine`: high (model) and low (KV) classes, ~99:1 under contention."""
        return self.add_link(
            f"cnic/engine{engine}",
            rate_bytes_per_s,
            DEFAULT_CNIC_WEIGHTS if weights is None else weights,
            per_class_names=True,
            **kw,
        )

    def add_cnic_in(
        self, engine: int, rate_bytes_per_s: float, weights: Mapping[str, float] | None = None, **kw
    ) -> Link:
        """The ingress direction of `engine`'s full-duplex compute NIC ("cnic/engine<E>/in"; `add_cnic` is its
        egress): what the engine pulls into its device memory (H2D) paces here."""
        return self.add_link(
            f"cnic/engine{engine}/in",
            rate_bytes_per_s,
            DEFAULT_CNIC_WEIGHTS if weights is None else weights,
            per_class_names=True,
            **kw,
        )

    def link(self, name: str) -> Link:
        try:
            return self._links[name]
        except KeyError:
            raise KeyError(f"no link {name!r}; known: {', '.join(sorted(self._links)) or '(none)'}") from None

    def snic(self, node: int) -> Link:
        return self.link(f"snic/node{node}")

    def cnic(self, engine: int) -> Link:
        return self.link(f"cnic/engine{engine}")

    def pacer(self, *names: str) -> Pacer:
        """A pacer over the named links in order; SNIC links take every priority as their single class."""
        return Pacer([self.link(n) for n in names])

    def samples(self) -> list[LinkBytes]:
        """Every link's bins (`Link.samples`), sorted by (t0, link): `LinkBytes(link, t0, t1, nbytes)` of
        `sample_interval` seconds each, times from `clock_origin` (without one given, a wall-clock grid instant, so a
        process's first bin may start before its own start); a CNIC's per class ("cnic/engine0/high", ".../low"); the
        bins bytes were recorded in only."""
        out: list[LinkBytes] = []
        for link in list(self._links.values()):
            out.extend(link.samples())
        return sorted(out, key=lambda s: (s.t0, s.link))

    @classmethod
    def for_cluster(cls, engines_per_node: Mapping[int, Iterable[int]], rates: ClusterLinks, **kw) -> TrafficManager:
        """SNIC per node and CNIC per engine, e.g. `for_cluster({0: [0, 1], 1: [2, 3]}, ClusterLinks(...))`."""
        if not isinstance(engines_per_node, Mapping):  # (a list was an AttributeError: no attribute 'items')
            raise TypeError(
                f"engines_per_node must be a mapping node -> engine ids, e.g. {{0: [0, 1], 1: [2, 3]}}, "
                f"got {type(engines_per_node).__name__}"
            )
        tm = cls(**kw)
        for node, engines in engines_per_node.items():
            tm.add_snic(node, rates.snic_bytes_per_s)
            for e in engines:
                tm.add_cnic(e, rates.cnic_bytes_per_s, rates.cnic_weights)
        return tm


def rate_of(samples: Iterable[LinkBytes], link: str, t0: float = 0.0, t1: float = math.inf) -> float:
    """Mean bytes/s of `link` over its recorded bins inside [t0, t1), from the first one's start to the last one's end
    (a stretch with nothing recorded at either end of the window does not count, one between bins does; 0.0 without
    bins there; for checks and benchmarks). A link that records per class (a CNIC: "cnic/engine0/high",
    "cnic/engine0/low") is asked for by one of those names; its own name is a ValueError listing them (it was 0.0:
    an idle link)."""
    for what, x in (("t0", t0), ("t1", t1)):
        if not is_real(x):
            raise TypeError(f"rate_of: {what} must be a number, got {x!r}")
    if not t0 <= t1:  # (NaN, or an inverted window: was 0.0, an idle link)
        raise ValueError(f"rate_of: the window [t0, t1) needs t0 <= t1 (no NaN), got t0={t0}, t1={t1}")
    samples = list(samples)
    sel = [s for s in samples if s.link == link and s.t0 >= t0 and s.t1 <= t1]
    if not sel:
        if not any(s.link == link for s in samples):
            streams = sorted({s.link for s in samples if s.link.startswith(f"{link}/")})
            if streams:
                raise ValueError(
                    f"no samples of {link!r}: it records per class; ask for one of {', '.join(map(repr, streams))}"
                )
        return 0.0
    span = max(s.t1 for s in sel) - min(s.t0 for s in sel)
    return sum(s.nbytes for s in sel) / span if span > 0 else math.nan


__all__ = ["DEFAULT_CNIC_WEIGHTS", "ClusterLinks", "Link", "Pacer", "TrafficManager", "rate_of"]
