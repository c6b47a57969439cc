"""The global scheduler service: request queue, cluster view, the configured policy, heartbeats.

Engine groups (nodes) fetch through `fetch(GroupReport)`. Each fetch:
1. refreshes the group's heartbeat and applies its events (reads done, prefill done, tokens, finished turns);
2. admits turns that became due (the lifecycle's previous turn finished + gap), looking up their hit prefix
   in the store (whole blocks, by prefix-chained block keys);
3. when a PE group fetches, runs the registered inter-engine policy on a `ClusterSnapshot` built from the service's own accounting
   (per engine: unfinished requests seq_e, their tokens tok_e, free HBM tokens; per node: hit tokens queued
   for storage reads), exactly the view the simulator builds;
4. returns the tasks queued for this group's engines.
`check_heartbeats()` declares a group dead when it has not fetched for `heartbeat_timeout_s` (from the reply to its
last fetch; never while a fetch of it waits for a policy call to end): every request
placed on one of its engines is cancelled on its peer and re-queued with a new attempt number (re-looked up,
since the dead DE may have written some blocks already), so each turn still completes exactly once -- but for a
dead PE's turns that their DE already runs (first token out), which need nothing more of it. A group that reports
a part `stalled` (an engine's main thread or a storage-NIC store call without progress for
`scheduler.stall_timeout_s`, `node.EngineGroup._stalled`) is declared dead the same way at that fetch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from dualpath_jax.block_keys import extend_block_keys
from dualpath_jax.clock import now as clock_now
from dualpath_jax.metrics import TIMESTAMPS, LinkBytes, TurnRecord
from dualpath_jax.runtime.control import Cancel, Event, GroupReply, GroupReport, TurnTask
from dualpath_jax.runtime.lifecycle import ConversationBook, TurnRequest
from schedulers.api import Assignment, ClusterSnapshot, EngineState, InterEnginePolicy, NodeState, PendingRequest

log = logging.getLogger(__name__)


@dataclasses.dataclass
class GroupSpec:
    node_id: int
    role: str  # "prefill" | "decode"
    engine_ids: list


@dataclasses.dataclass
class _InFlight:
    turn: TurnRequest
    keys: list  # block keys of the prompt's whole blocks
    attempt: int
    pending: PendingRequest
    assignment: Assignment | None = None
    task: TurnTask | None = None
    pe_read_tokens: int = 0  # queued on the PE node's read queue, not yet read
    de_read_tokens: int = 0
    prefill_done: bool = False


#: A group's reported gauges of its storage NIC's queues (`node.py`'s report): what it has queued, not what it did.
_QUEUE_GAUGES = ("read_queue_tokens", "pending_writes")


def _dead_stats(stats: dict) -> dict:
    """The stats of a group declared dead: its counters as reported (bytes read and written, failed reads, busy
    time: they happened), its storage-NIC queue gauges 0 and `dead` True. Its requests were cancelled and re-run
    elsewhere, so what it still had queued is no load of the run's; the last report before the declaration (a group
    stopped past the heartbeat timeout, then continued) used to stay in the run's node stats as if still queued."""
    out = dict(stats) if isinstance(stats, dict) else {}
    for k in _QUEUE_GAUGES:
        if k in out:
            out[k] = 0
    out["dead"] = True
    return out


def _stall_reason(stalled: dict, timeout) -> str:
    """Why a group that reported `stalled` ({what: seconds}) is dead."""
    parts = ", ".join(f"{what} made no progress for {float(s):.1f} s" for what, s in sorted(stalled.items()))
    limit = f"{timeout:g}" if isinstance(timeout, int | float) else repr(timeout)
    return f"{parts} (> scheduler.stall_timeout_s={limit})"


EXITED = "its process or thread exited"  # a launcher's death reason when it cannot say how (`watch_exits`)

#: A policy that places none of the queued requests on an idle cluster for this long and this many calls fails the run.
# The watcher's own gap (driver.run checks every 20 ms) that counts as a pause of the whole job, at least: a gap past
# max(this, heartbeat_timeout_s / 2) is left out of the nodes' silence (`check_heartbeats`)
PAUSE_MIN_S = 1.0
IDLE_POLICY_S = 10.0
IDLE_POLICY_CALLS = 20


class RunFailed(RuntimeError):
    """An engine reported an error or the cluster can no longer run (no live PE or DE)."""


#: A node clock's offset from the driver's beyond which the driver's log warns (once per node): its stamps are moved
#: by the estimate (`clock.Offset`), but the hosts' clocks are not synced as the README asks.
OFFSET_WARN_S = 0.010
KEEPERS_LOCK = "keepers.lock"  # in a bounded store's root: each live run's StoreKeeper holds a shared flock on it


class StoreKeeper:
    """The one keeper of a bounded KV store's capacity for a whole run: the driver's store object
    (`launcher.open_store(keeper=True)`), which answers every lookup of the scheduler and sees every turn run and
    finish. The nodes' objects write and read without a capacity (each evicting from its own view held the capacity
    per decode node process, and deleted blocks other processes were about to read). Called under the scheduler's
    lock.

    - `lookup(request_id, keys)`: the hit prefix, pinned until the turn is done or looked up again (a re-run after a
      node's death: the new hits pinned, then the old unpinned), so no block a placed turn reads is evicted under it.
    - `written(request_id, keys)` (the turn's first token is out: its DE stored, or is storing, the prompt's whole
      blocks past the hit) and `turn_done(request_id, keys, first)` (a DE reports a turn once each of its
      write-backs is stored or refused: `keys[first:]`, the whole blocks of prompt + generated tokens past the hit):
      the blocks stored are indexed, in order, each the most recently used, evicting LRU unpinned blocks to fit (the
      store's adoption: one lookup of one key each); turn_done also unpins. A block that cannot be kept (the rest is
      pinned) is removed at once, as one store would have refused its write (`unkept_blocks`, in `evictions`); one
      whose file cannot be removed (EACCES, EPERM, EROFS) is left on disk over the capacity, as a failed eviction's
      block (`unremovable_blocks`, in `evict_failures`; logged once per run): it costs room, not the run.
    - `finish()`: unpins the turns still in flight (a failed or interrupted run), then indexes the blocks no turn
      did (a killed node's writes, a failed run's turns in flight) the same way.
    The directory holds up to the capacity plus the blocks stored by turns in flight and not indexed yet (their
    decode blocks until they end). The adoption lookups are not the scheduler's: `report` takes them out of the
    store's lookup counters."""

    def __init__(self, store):
        self.store = store
        self._lock = threading.Lock()
        self._pinned: dict[int, list] = {}  # request id -> its pinned hit keys
        self._pins: dict[bytes, int] = {}  # key -> pins held (the turns in flight that hit it)
        self._written: dict[int, set] = {}  # request id -> its write-back keys indexed before its end
        self._adopt = [0, 0, 0]  # the keeper's own lookups (adoptions, LRU order): calls, blocks, hit blocks
        self.adopted_blocks = 0  # write-back blocks indexed (found stored and kept)
        self.unkept_blocks = 0  # write-back blocks removed at once: no room beside the pinned ones
        self._unremovable: set[bytes] = set()  # blocks that could not be kept nor removed (EACCES, EPERM, EROFS)
        self.finished = False
        self.shared_with_another_run = False  # (warned once: `_hold_keepers_lock`)
        self._keepers_lock = self._hold_keepers_lock()

    def _hold_keepers_lock(self) -> int | None:
        """A shared flock on the store root's KEEPERS_LOCK for the run's life (the descriptor; None where there is no
        directory or no flock): a run that finds another live run's lock there (its probe for an exclusive one
        fails) warns once. Two runs keeping one bounded store each kept the capacity for its own view: the directory
        ended over it, each evicting the other's blocks, and nothing said why."""
        from dualpath_jax import flocks

        root = getattr(self.store, "root", None)
        if not isinstance(root, str) or not os.path.isdir(root):
            return None
        try:
            fd = flocks.open_lock_file(os.path.join(root, KEEPERS_LOCK))
        except OSError:  # (a read-only directory: no lock, as before)
            return None
        shared = flocks.hold_shared(fd)
        if shared is None:  # (a file system without flock)
            os.close(fd)
            return None
        if shared:
            self._warn_shared()
        return fd

    def _release_keepers_lock(self) -> None:
        """Drop this run's lock, then warn if another run still holds one (it started after this one: this run's
        warning was not said)."""
        import fcntl

        from dualpath_jax import flocks

        fd, self._keepers_lock = self._keepers_lock, None
        if fd is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
            if flocks.take(fd) is False:
                self._warn_shared()
        except OSError:
            pass
        finally:
            os.close(fd)

    def _warn_shared(self) -> None:
        if self.shared_with_another_run:
            return
        self.shared_with_another_run = True
        capacity = getattr(self.store, "capacity_bytes", None)
        log.warning(
            "another live run keeps the bounded KV store %s too: capacity is per run, so the directory may hold N x "
            "capacity_bytes (%s bytes each) with N runs at once, and each evicts the other's blocks (give each run "
            "its own store_dir)",
            self.store.root,
            f"{capacity:,}" if isinstance(capacity, int) else capacity,
        )

    @property
    def unremovable_blocks(self) -> int:
        """Write-back blocks left on disk over the capacity: neither kept nor removable (`_adopt_locked`)."""
        return len(self._unremovable)

    def lookup(self, request_id: int, keys: list) -> int:
        with self._lock:
            hit = self.store.lookup(keys)
            if self.finished:
                return hit
            new = list(keys[:hit])
            self.store.pin(new)
            for k in new:
                self._pins[k] = self._pins.get(k, 0) + 1
            self._release_locked(request_id)
            if new:
                self._pinned[request_id] = new
            self._written.pop(request_id, None)  # (a re-run writes its blocks again)
            return hit

    def _release_locked(self, request_id: int) -> None:
        old = self._pinned.pop(request_id, None)
        if not old:
            return
        self.store.unpin(old)
        for k in old:
            n = self._pins[k] - 1
            if n:
                self._pins[k] = n
            else:
                del self._pins[k]

    def release(self, request_id: int) -> None:
        """Unpin a turn's hits (it will read none of them)."""
        with self._lock:
            self._release_locked(request_id)

    def written(self, request_id: int, keys: list) -> None:
        """Index the stored ones of `keys`, part of a turn in flight's write-back (an absent one: at its end)."""
        with self._lock:
            if self.finished:
                return
            done = self._written.setdefault(request_id, set())
            self._adopt_locked([k for k in keys if k not in done], done)

    def turn_done(self, request_id: int, keys: list, first: int) -> None:
        with self._lock:
            done = self._written.pop(request_id, set())
            if not self.finished:  # (its own hits still pinned: room for its new blocks is not made from its head)
                self._adopt_locked([k for k in keys[first:] if k not in done])
            self._release_locked(request_id)
            if not self.finished:
                self._tail_first_locked(keys)

    def _lookup_locked(self, keys: list) -> int:
        """The store's lookup of `keys` for the keeper's own bookkeeping (counted apart: `report`)."""
        hit = self.store.lookup(keys)
        self._adopt[0] += 1
        self._adopt[1] += len(keys)
        self._adopt[2] += hit
        return hit

    def _tail_first_locked(self, keys: list) -> None:
        """Order a finished turn's stored prefix in the LRU from its tail (least recent) to its head (most recent), so
        that eviction takes a trajectory's last blocks first. A prefix-chained store loses every block after an evicted
        one for lookups, and a lookup or an adoption uses keys head first, which made the head the first victim: a
        trajectory longer than the free room lost its whole hit (the main job at 1 MiB: hit rate 3% under block LRU).
        vLLM's prefix cache frees a request's blocks in reverse order for the same reason."""
        stored = self._lookup_locked(list(keys))
        self._lookup_locked(keys[:stored][::-1])  # (a lookup uses its keys in order: the head last, the most recent)

    def _adopt_locked(self, keys, kept_into: set | None = None) -> None:
        """Index `keys` (blocks written by other processes) in order, each as the most recently used; one that cannot
        be kept beside the pinned blocks is removed (stored, but one store would have refused its write). Those kept
        are held (pinned) until the last is indexed, so a turn's later blocks do not push out its earlier ones: where
        they do not all fit, its first ones stay (a usable prefix)."""
        held = []
        try:
            for key in keys:
                kept = self._lookup_locked([key])
                if kept:
                    self.adopted_blocks += 1
                    self.store.pin([key])
                    held.append(key)
                    if kept_into is not None:
                        kept_into.add(key)
                elif key not in self._pins and self.store.contains(key):
                    try:
                        removed = self.store.remove(key)
                    except OSError as e:  # (EACCES, EPERM, EROFS) left over the capacity, as a failed eviction's
                        removed = False
                        if key not in self._unremovable:  # (counted once: `finish` finds it on disk again)
                            self._unremovable.add(key)
                            if len(self._unremovable) == 1:
                                log.warning(
                                    "kv store %s: write-back block %s has no room beside the pinned blocks and could "
                                    "not be removed: %s (left on disk, over the capacity; other such blocks are "
                                    "counted, store_stats' unremovable_blocks and evict_failures)",
                                    getattr(self.store, "root", "?"), key.hex(), e,
                                )  # fmt: skip
                    if removed:
                        self.unkept_blocks += 1
        finally:
            if held:
                self.store.unpin(held)

    def finish(self) -> None:
        """The run's end: unpin every turn still in flight, then index what no turn did (the write-backs of turns cut
        short: a killed node's, a failed run's), evicting LRU to fit, so the directory holds the capacity. Those
        blocks are found by a scan of the directory (a second store object, without a capacity: the keeper's own
        `refresh` would reorder its index by the files' mtimes, which its lookups never set)."""
        from dualpath_jax.store import LocalDirStore

        with self._lock:
            self.finished = True
            self._release_keepers_lock()
            for rid in list(self._pinned):
                self._release_locked(rid)
            self._written.clear()
            if not isinstance(self.store, LocalDirStore):
                return
            if self.store.meta_pending and not os.path.exists(os.path.join(self.store.root, "STORE.json")):
                return  # (opened on a full disk and never made: no block was stored)
            try:
                scan = LocalDirStore(self.store.root, self.store.layout, create=False, lru_touch_s=None, io_threads=1)
                try:
                    on_disk = scan.keys()  # (oldest first: the files' mtimes)
                finally:
                    scan.close()
                indexed = set(self.store.keys())
                self._adopt_locked([k for k in on_disk if k not in indexed])
            except Exception as e:  # noqa: BLE001 -- (its directory removed under it): the run's results stand
                log.warning("kv store %s: the final pass over the store's directory failed: %r", self.store.root, e)

    def report(self, stats: dict | None) -> dict | None:
        """The keeper's store counters (`node.store_stats`) as the scheduler's: its adoption lookups taken out of
        `lookups` / `lookup_blocks` / `lookup_hit_blocks`, the blocks it removed unkept added to `evictions`."""
        if not stats:
            return stats
        out = dict(stats)
        calls, blocks, hits = self._adopt
        for name, n in (("lookups", calls), ("lookup_blocks", blocks), ("lookup_hit_blocks", hits)):
            if name in out:
                out[name] -= n
        out["evictions"] = out.get("evictions", 0) + self.unkept_blocks
        nbytes = getattr(self.store, "file_nbytes", 0)
        out["bytes_evicted"] = out.get("bytes_evicted", 0) + self.unkept_blocks * nbytes
        out["unkept_blocks"] = self.unkept_blocks
        out["evict_failures"] = out.get("evict_failures", 0) + self.unremovable_blocks
        out["unremovable_blocks"] = self.unremovable_blocks
        out["adopted_blocks"] = self.adopted_blocks
        return out

    @property
    def pinned_requests(self) -> list[int]:
        """The turns whose hits are pinned (in flight)."""
        with self._lock:
            return sorted(self._pinned)

    @property
    def pinned_blocks(self) -> int:
        """Pins held on the store (a block hit by two turns in flight counts twice)."""
        with self._lock:
            return sum(self._pins.values())


class GlobalScheduler:
    """Owns the queue, the cluster view and the policy. Thread-safe (one lock; fetches are short)."""

    def __init__(
        self,
        groups: Sequence[GroupSpec],
        policy: InterEnginePolicy,
        book: ConversationBook,
        lookup_hit_blocks: Callable[[list], int],
        block_keys_of: Callable[[np.ndarray], list],
        block_size: int,
        hbm_tokens_per_decode_engine: int,
        heartbeat_timeout_s: float,
        clock: Callable[[], float] = clock_now,
        decode_slots: int | None = None,
        store_keeper: StoreKeeper | None = None,
    ):
        self.policy = policy
        self.book = book
        self._lookup = lookup_hit_blocks
        # a bounded store's keeper (the driver's store object): lookups go through it (it pins the hits of the turns
        # in flight) and each finished turn's write-back blocks are indexed there (`StoreKeeper`)
        self.store_keeper = store_keeper
        self._keys_of = block_keys_of
        self.block_size = block_size
        self.hbm_tokens = hbm_tokens_per_decode_engine
        # A runtime DE holds at most `decode_slots` requests (a fixed-slot decode cache), whatever their lengths: a
        # DE with every slot taken reports no room (short requests used to be placed beyond its slots and wait there),
        # and one fetch places no more requests on a DE than it has free slots (`_schedule`).
        self.decode_slots = decode_slots
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._said_slow_policy = False  # a schedule() call over heartbeat_timeout_s was logged
        self.clock = clock
        # Heartbeats on a monotonic clock (an injected `clock`: that one): a wall-clock step (an NTP step, a VM resumed)
        # longer than heartbeat_timeout_s declared every node dead at once. Event times are on `clock` (engines stamp
        # theirs with `clock.now` too: wall-clock seconds that never step).
        self._beat_clock = time.monotonic if clock is clock_now else clock
        self.t0 = clock()
        self.groups = {g.node_id: g for g in groups}
        self.engine_node = {e: g.node_id for g in groups for e in g.engine_ids}
        self.engine_role = {e: g.role for g in groups for e in g.engine_ids}
        self._lock = threading.Lock()
        self._last_seen: dict[int, float] = {}  # node -> the end of its last fetch (its heartbeat)
        self._last_check: float | None = None  # (beat clock) the last `check_heartbeats`: a pause of the watcher
        self._in_fetch: set[int] = set()  # nodes with a fetch in progress, or waiting for the lock (alive)
        self._addresses: dict[int, object] = {}
        self.dead_nodes: set[int] = set()
        self.death_reasons: dict[int, str] = {}  # node -> why it was declared dead
        self._told_dead: set[int] = set()  # dead nodes that fetched since (told to stop: they end their run)
        # How a node's process or thread ended, or None while it runs (the launcher's, `watch_exits`): named in its
        # death reason, also where a peer noticed first ("could not reach it" named no kill, no exit code).
        self._exit_of: Callable[[int], str | None] | None = None
        self._exit_named: set[int] = set()  # dead nodes whose reason names their exit
        self._queue: deque[int] = deque()  # request ids, FIFO
        self._inflight: dict[int, _InFlight] = {}
        self._completed_attempt: dict[int, int] = {}  # request id -> the attempt that completed it
        self._reads_applied: set[tuple] = set()  # (request id, attempt, side) of reads already in the records
        self._outbox: dict[int, GroupReply] = {g.node_id: GroupReply() for g in groups}
        self.records: dict[int, TurnRecord] = {}
        self._link_bins: dict[tuple, int] = {}  # (node, link, t0, t1) -> bytes, as reported (see `links`)
        # node -> the seconds its stamps are behind the driver's clock, as its last report said (`GroupReport`'s
        # clock_offset_s: 0.0 in the driver's process and on its boot, else `clock.Offset`'s estimate), and the round
        # trip of that estimate (None: exact). Its events and link bins are taken at its stamp + offset.
        self.clock_offsets: dict[int, float] = {}
        self.clock_rtts: dict[int, float | None] = {}
        self._offset_warned: set[int] = set()
        self.events_seen = 0
        self.requeued = 0
        self.failure: str | None = None
        self.schedule_time_s = 0.0  # wall time spent inside the policy (runtime overhead figure)
        self.schedule_calls = 0
        self.stats: dict[int, dict] = {}
        self.started = False
        self.stopping = False  # the driver is done with the run (finished or gave up): every fetch says shutdown
        # The current streak of policy calls that placed nothing on an idle cluster (`_check_idle_policy`).
        self._idle_since: float | None = None
        self._idle_calls = 0
        self._idle_queue_len = 0
        self._idle_fetchers: set[int] = set()

    # ---------------------------------------------------------------- time
    def now(self) -> float:
        """Seconds since the run started (the TurnRecord time base)."""
        return self.clock() - self.t0

    # ---------------------------------------------------------------- fetch
    def fetch(self, report: GroupReport) -> GroupReply:
        # A node waiting for the lock (the policy runs, for a PE's fetch maybe longer than the heartbeat timeout) is not
        # silent: `check_heartbeats` skips it. (A set's add / discard are atomic; one fetch at a time per node.)
        node = report.node_id
        try:
            tracked = node in self.groups  # (an unknown node fails in `_fetch`)
        except TypeError:  # (unhashable)
            tracked = False
        if tracked:
            self._in_fetch.add(node)
        try:
            return self._fetch(report)
        except Exception as e:
            # A bad report (unknown node or event, malformed event data) or a bad policy fails the run, also
            # when the caller is a control-server thread that can only drop the group's connection.
            self.fail(str(e) if isinstance(e, RunFailed) else f"fetch from node {report.node_id} failed: {e!r}")
            raise
        finally:
            if tracked:
                self._in_fetch.discard(node)

    def _fetch(self, report: GroupReport) -> GroupReply:
        with self._lock:
            node = report.node_id
            if node not in self.groups:
                raise RunFailed(f"fetch from unknown node {node}")
            self._take_clock(node, report)
            for s in report.link_bytes:  # (also a dead group's: those bytes did move)
                key = (node, s.link, s.t0, s.t1)  # (on the node's clock: its offset is added in `links`)
                self._link_bins[key] = self._link_bins.get(key, 0) + s.nbytes
            if node in self.dead_nodes:
                # A group declared dead must not come back with stale work: tell it to stop. Its counters are taken
                # (those bytes did move, as its link bytes), its queues are not (see `_dead_stats`).
                dead = _dead_stats(report.stats)  # (stats that are no dict: {"dead": True} alone, nothing made up)
                self.stats[node] = self._with_clock(node, dead) if isinstance(report.stats, dict) else dead
                self._told_dead.add(node)
                return GroupReply(shutdown=True)
            self._last_seen[node] = self._beat_clock()
            if report.address is not None:
                self._addresses[node] = report.address
            self.stats[node] = self._with_clock(node, report.stats)
            for ev in report.events:
                self._apply(node, ev)
            stalled = report.stats.get("stalled") if isinstance(report.stats, dict) else None
            if stalled:
                # A part of the group hangs (a step, a store call) while its leader still fetches: dead, as a silent
                # group (its requests re-run elsewhere), and told to stop now.
                self._declare_dead(node, _stall_reason(stalled, report.stats.get("stall_timeout_s")))
                self._told_dead.add(node)
                return GroupReply(shutdown=True)
            if not self.started and self._all_registered():
                # The run's clock starts when every group is up (models built, endpoints listening).
                self.started = True
                self.t0 = self.clock()
            if self.started:
                self._admit_due()
                if self.groups[node].role == "prefill":
                    # As in the paper, placement runs when a PE group fetches: its PEs (Algorithm 1) and, for
                    # each request, a DE among all DE groups (two-phase) and the read side. DE groups fetch
                    # only to pick up their tasks: placing on a DE group's fetch would favour whichever
                    # group happens to fetch right after a turn arrives. (The simulator places on every group's
                    # fetch: README "A PE group's `fetching_node` restricts PE placement ..." and its "deviation
                    # from PAPER.md" bullet.)
                    self._schedule(node)
            reply = self._outbox[node]
            self._outbox[node] = GroupReply()
            if self._all_registered():
                reply.directory = {
                    e: (self.engine_node[e], self._addresses[self.engine_node[e]][e])
                    for e in self.engine_node
                    if self.engine_node[e] not in self.dead_nodes
                }
            reply.shutdown = self.book.done or self.failure is not None or self.stopping
            # Silence counts from the reply: the policy (run above, under the lock) may have taken longer than the
            # heartbeat timeout, and the node fetches again an interval after it got the reply.
            self._last_seen[node] = self._beat_clock()
            return reply

    @property
    def links(self) -> list[LinkBytes]:
        """Every link's bytes per bin, run-relative. Groups report each bin's change since their last report, so a
        bin may come in several parts (summed here); a bin taken back to 0 is left out, an idle SNIC's marker kept.
        A node's bins are on its clock, put in the driver's with its last offset (one for all of them: a bin of two
        reports stays one bin)."""
        with self._lock:
            bins = list(self._link_bins.items())
            offsets = dict(self.clock_offsets)
        out = []
        for (node, link, t0, t1), n in bins:
            if not (n or t0 == t1):
                continue
            if self._absolute(t0):
                shift = offsets.get(node, 0.0) - self.t0
                t0, t1 = t0 + shift, t1 + shift
            out.append(LinkBytes(link, t0, t1, n))
        return out

    def _absolute(self, t0: float) -> bool:
        # Engines record event-clock times (`clock.now`: seconds since the epoch); convert to run-relative.
        return t0 > 1e9

    def _take_clock(self, node: int, report: GroupReport) -> None:
        """The node's clock offset and its round trip as `report` says (none yet: the last, or 0); a warning, once per
        node, where it is surely over OFFSET_WARN_S (beyond half its round trip)."""
        off = getattr(report, "clock_offset_s", None)
        rtt = getattr(report, "clock_rtt_s", None)
        if off is None:
            off, rtt = self.clock_offsets.get(node, 0.0), self.clock_rtts.get(node)
        bad = [
            f"{name}={v!r}"
            for name, v, ok in (("clock_offset_s", off, True), ("clock_rtt_s", rtt, rtt is not None))
            if ok and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v))
        ]
        if bad:
            raise RunFailed(f"node {node} reported {', '.join(bad)}: not a number of seconds")
        self.clock_offsets[node], self.clock_rtts[node] = float(off), rtt
        if abs(off) - (rtt or 0.0) / 2 > OFFSET_WARN_S and node not in self._offset_warned:
            self._offset_warned.add(node)
            how = (
                "its boot's, exact: a wall-clock step between the two processes' starts"
                if rtt is None
                else f"estimated from its fetches, best round trip {rtt * 1e3:.1f} ms"
            )
            log.warning(
                "node %d's clock is %.3f s %s the driver's (%s): its stamps are put in the driver's timebase by that "
                "much; sync the hosts' clocks (NTP) to leave less to estimate",
                node, abs(off), "behind" if off > 0 else "ahead of", how,
            )  # fmt: skip

    def _with_clock(self, node: int, stats):
        """A node's reported stats with its clock offset (seconds to add to its stamps) and that estimate's round trip
        (None: exact), for the run's node_stats."""
        if not isinstance(stats, dict):
            return stats
        return {**stats, "clock_offset_s": self.clock_offsets.get(node, 0.0), "clock_rtt_s": self.clock_rtts.get(node)}

    def _all_registered(self) -> bool:
        return all(n in self._addresses or n in self.dead_nodes for n in self.groups)

    def unregistered(self) -> list[int]:
        """The live nodes that have not registered yet (fetched with their endpoints' addresses)."""
        with self._lock:
            return sorted(n for n in self.groups if n not in self._addresses and n not in self.dead_nodes)

    # ---------------------------------------------------------------- lifecycle
    def _admit_due(self) -> None:
        for turn in self.book.pop_due(self.now()):
            keys = self._keys_of(turn.prompt_ids)
            rec = TurnRecord(
                trajectory_id=turn.trajectory_id,
                turn_index=turn.turn_index,
                prompt_tokens=int(turn.prompt_ids.shape[0]),
                hit_tokens=0,
                gen_tokens=turn.gen_tokens,
                arrival=turn.arrival,
            )
            self.records[turn.request_id] = rec
            inf = _InFlight(turn=turn, keys=keys, attempt=0, pending=None)  # type: ignore[arg-type]
            self._inflight[turn.request_id] = inf
            self._requeue_lookup(inf)
            self._queue.append(turn.request_id)

    def _requeue_lookup(self, inf: _InFlight) -> None:
        """(Re)compute the hit prefix: whole stored blocks, leaving at least one token to prefill."""
        prompt = int(inf.turn.prompt_ids.shape[0])
        usable = (prompt - 1) // self.block_size  # the last token must be computed to get logits
        keeper, rid = self.store_keeper, inf.turn.request_id
        if usable <= 0:
            hit_blocks = 0
            if keeper is not None:
                keeper.release(rid)  # (a re-run's earlier hits)
        elif keeper is not None:
            hit_blocks = min(keeper.lookup(rid, inf.keys[:usable]), usable)
        else:
            hit_blocks = min(self._lookup(inf.keys[:usable]), usable)
        inf.pending = PendingRequest(
            request_id=inf.turn.request_id,
            trajectory_id=inf.turn.trajectory_id,
            turn_index=inf.turn.turn_index,
            prompt_tokens=prompt,
            hit_tokens=hit_blocks * self.block_size,
            gen_tokens=inf.turn.gen_tokens,
            arrival_time=inf.turn.arrival,
        )
        self.records[inf.turn.request_id].hit_tokens = inf.pending.hit_tokens

    # ---------------------------------------------------------------- policy
    def snapshot(self) -> ClusterSnapshot:
        engines: dict[int, EngineState] = {}
        for e, node in self.engine_node.items():
            if node in self.dead_nodes:
                continue
            role = self.engine_role[e]
            engines[e] = EngineState(
                engine_id=e, role=role, node_id=node, free_hbm_tokens=self.hbm_tokens if role == "decode" else 1 << 40
            )
        nodes = {n: NodeState(node_id=n, role=g.role) for n, g in self.groups.items() if n not in self.dead_nodes}
        for inf in self._inflight.values():
            a = inf.assignment
            if a is None:
                continue
            p = inf.pending
            if not inf.prefill_done and a.prefill_engine in engines:
                engines[a.prefill_engine].seq += 1
                engines[a.prefill_engine].tok += p.prompt_tokens
            if a.decode_engine in engines:
                d = engines[a.decode_engine]
                d.seq += 1
                d.tok += p.total_tokens
                d.free_hbm_tokens -= p.total_tokens
            for eng, toks in ((a.prefill_engine, inf.pe_read_tokens), (a.decode_engine, inf.de_read_tokens)):
                n = self.engine_node[eng]
                if n in nodes:
                    nodes[n].read_queue_tokens += toks
        if self.decode_slots is not None:
            per_slot = self.hbm_tokens // self.decode_slots
            for d in engines.values():
                if d.role == "decode":
                    d.free_hbm_tokens = min(d.free_hbm_tokens, max(0, self.decode_slots - d.seq) * per_slot)
        return ClusterSnapshot(now=self.now(), engines=engines, nodes=nodes)

    def _schedule(self, fetching_node: int) -> None:
        """Run the policy on the queue. A policy counts a DE's room in tokens within one call, so one call may give a
        DE more requests than it has free decode slots (short requests fit its tokens many times over): those stay
        queued, in order, and the policy is asked again with a snapshot showing that DE full. Each such round fills
        at least one more DE, so there are at most as many rounds as DEs, plus one."""
        rounds = 1 + sum(1 for r in self.engine_role.values() if r == "decode")
        for _ in range(rounds):
            placed, held = self._schedule_once(fetching_node)
            if not placed or not held or not self._queue:
                return

    def _schedule_once(self, fetching_node: int) -> tuple[int, int]:
        """One policy call; returns (requests placed, requests held back for want of a free decode slot)."""
        if not self._queue:
            return 0, 0
        snap = self.snapshot()
        if not snap.engines_of("prefill") or not snap.engines_of("decode"):
            # (`_declare_dead` said which nodes and why: kept; this line overwrote it once a PE fetched)
            self.failure = self.failure or "no live prefill or decode engine left"
            return 0, 0
        queue = [self._inflight[r].pending for r in self._queue]
        idle = all(e.seq == 0 for e in snap.engines.values())  # nothing placed anywhere (before the policy sees it)
        t = time.perf_counter()
        # (a list: the checks below and the placements each walk it; a policy yielding its assignments, which the
        # simulator takes, placed nothing here, ever -- its generator was spent by the checks)
        assignments = self._call_policy(snap, queue, fetching_node)
        self.schedule_time_s += time.perf_counter() - t
        self.schedule_calls += 1
        seen = set()
        for a in assignments:
            if not isinstance(a, Assignment):  # (was an AttributeError naming no policy: "fetch from node 0 failed")
                raise RunFailed(
                    f"policy {self.policy.name!r} returned {a!r} ({type(a).__name__}), not a schedulers.Assignment"
                )
            inf = self._inflight.get(a.request_id)
            if inf is None or inf.assignment is not None or a.request_id in seen:  # (each said "an invalid assignment")
                why = (
                    "twice in one call"
                    if a.request_id in seen
                    else "which is not in the queue (unknown or finished)"
                    if inf is None
                    else "which was placed before"
                )
                raise RunFailed(f"policy {self.policy.name!r} placed request {a.request_id} {why}: {a}")
            if a.prefill_engine not in snap.engines or a.decode_engine not in snap.engines:
                raise RunFailed(f"policy {self.policy.name!r} assigned a dead or unknown engine: {a}")
            if snap.engines[a.prefill_engine].role != "prefill" or snap.engines[a.decode_engine].role != "decode":
                raise RunFailed(f"policy {self.policy.name!r} swapped the engines' roles: {a}")
            seen.add(a.request_id)
        slots = None
        # (a policy that places on a DE without room on purpose, e.g. round_robin full_de="queue", is not held back)
        if self.decode_slots is not None and not getattr(self.policy, "overcommits_decode", False):
            slots = {e: self.decode_slots - d.seq for e, d in snap.engines.items() if d.role == "decode"}
        placed, held = set(), 0
        for a in assignments:
            if slots is not None:
                if slots.get(a.decode_engine, 0) <= 0:
                    held += 1  # stays queued (in its place) for the next round or fetch
                    continue
                slots[a.decode_engine] -= 1
            placed.add(a.request_id)
            self._place(self._inflight[a.request_id], a)
        if placed:
            self._queue = deque(r for r in self._queue if r not in placed)
        self._check_idle_policy(idle and not placed, len(queue), fetching_node)
        return len(placed), held

    def _check_idle_policy(self, idle: bool, queued: int, fetching_node: int) -> None:
        """Fail the run when the policy keeps placing none of the same queued requests on an idle cluster (no request
        placed anywhere: no engine computes, reads or sends for this run, every DE is empty): nothing can change its
        view but the clock, so it never will. Such a policy made the run wait out `run_timeout_s` (900 s in
        configs/tiny_runtime.py), then fail as "run did not finish". A policy that waits for a DE's room never gets
        here (a full DE is not idle); one that waits for more arrivals is reset by each new queued request. Counted
        over at least IDLE_POLICY_CALLS calls, IDLE_POLICY_S seconds and a fetch of every live PE group. `idle`: this
        call placed nothing on an idle cluster."""
        if not idle or self._idle_since is None or queued != self._idle_queue_len:
            self._idle_since = self.clock() if idle else None
            self._idle_calls, self._idle_queue_len, self._idle_fetchers = 0, queued, set()
        if self._idle_since is None:
            return
        self._idle_calls += 1
        self._idle_fetchers.add(fetching_node)
        waited = self.clock() - self._idle_since
        pe_nodes = {n for n, g in self.groups.items() if g.role == "prefill" and n not in self.dead_nodes}
        if waited >= IDLE_POLICY_S and self._idle_calls >= IDLE_POLICY_CALLS and pe_nodes <= self._idle_fetchers:
            self.failure = self.failure or (
                f"policy {self.policy.name!r} placed none of the {queued} queued requests on an idle cluster (nothing "
                f"placed, every engine free) in {self._idle_calls} calls over {waited:.1f} s: the run cannot finish"
            )

    def _call_policy(self, snap: ClusterSnapshot, queue: list, fetching_node: int) -> list:
        """The policy's assignments as a list. A policy that raises (a bad read side is its Assignment's ValueError)
        or returns no iterable fails the run naming it: it failed as "fetch from node 0 failed: ValueError(...)",
        naming neither the policy nor that it was the policy, and the node logged a traceback as if it had crashed.
        The policy's own traceback is logged here, once."""
        name = self.policy.name
        started = time.monotonic()
        try:
            out = self.policy.schedule(snap, queue, fetching_node=fetching_node)
        except Exception as e:
            log.error("policy %r raised scheduling %d queued requests", name, len(queue), exc_info=True)
            raise RunFailed(f"policy {name!r} raised {e!r} (scheduling {len(queue)} queued requests)") from e
        try:
            out = list(out)
        except Exception as e:  # None, a number: not iterable; or a generator that raised
            if out is None or not hasattr(out, "__iter__"):
                raise RunFailed(
                    f"policy {name!r} returned {out!r} ({type(out).__name__}), not a list of schedulers.Assignment"
                ) from None
            log.error("policy %r raised scheduling %d queued requests", name, len(queue), exc_info=True)
            raise RunFailed(f"policy {name!r} raised {e!r} (scheduling {len(queue)} queued requests)") from e
        took = time.monotonic() - started
        if took > self.heartbeat_timeout_s and not self._said_slow_policy:
            # (the fetch waits for it, and the other nodes' fetches wait on the lock: a node gives up on a reply
            # after config.fetch_timeout_s, so a failure that follows is traced to the policy here)
            self._said_slow_policy = True
            log.warning(
                "policy %r took %.1f s for one schedule() call (%d queued requests), longer than heartbeat_timeout_s="
                "%g: every fetch waits for it; a node gives up on a reply after the stall timeout (at least 30 s)",
                name,
                took,
                len(queue),
                self.heartbeat_timeout_s,
            )
        return out

    def _place(self, inf: _InFlight, a: Assignment) -> None:
        p = inf.pending
        hit_blocks = p.hit_tokens // self.block_size
        de_blocks = int(round(a.de_read_fraction * hit_blocks))
        pe_blocks = hit_blocks - de_blocks
        inf.assignment = a
        inf.pe_read_tokens = pe_blocks * self.block_size
        inf.de_read_tokens = de_blocks * self.block_size
        inf.prefill_done = False
        task = TurnTask(
            request_id=p.request_id,
            attempt=inf.attempt,
            trajectory_id=p.trajectory_id,
            turn_index=p.turn_index,
            prompt_ids=inf.turn.prompt_ids,
            gen_tokens=p.gen_tokens,
            block_keys=inf.keys,
            hit_blocks=hit_blocks,
            pe_read_blocks=pe_blocks,
            prefill_engine=a.prefill_engine,
            decode_engine=a.decode_engine,
            read_side=a.read_side,
        )
        inf.task = task
        rec = self.records[p.request_id]
        rec.scheduled = self.now()
        rec.prefill_engine, rec.decode_engine, rec.read_side = a.prefill_engine, a.decode_engine, a.read_side
        rec.hit_tokens = p.hit_tokens
        pe_node, de_node = self.engine_node[a.prefill_engine], self.engine_node[a.decode_engine]
        self._outbox[pe_node].tasks.append(task)
        if de_node != pe_node:
            self._outbox[de_node].tasks.append(task)

    # ---------------------------------------------------------------- events
    def _apply(self, node: int, ev: Event) -> None:
        self.events_seen += 1
        if ev.kind == "error":
            self.failure = f"node {node}: {ev.data.get('message')}"
            log.error("engine error on node %d: %s", node, ev.data.get("message"))
            return
        inf = self._inflight.get(ev.request_id)
        # A PE's events reach the service in its group's fetches, a DE's in another's: the DE's turn_done can come
        # first (a one-token turn is done as soon as it runs). Those of the attempt that completed the turn still
        # fill its record (its prefill end, final hit and PE-side read bytes used to be lost, the prefill end
        # then set to the turn's end).
        late = inf is None and self._completed_attempt.get(ev.request_id) == ev.attempt and ev.kind != "turn_done"
        if not late and (inf is None or inf.attempt != ev.attempt):
            return  # a stale attempt (re-run elsewhere) or a duplicate completion: ignore
        rec = self.records[ev.request_id]
        off = self.clock_offsets.get(node, 0.0)  # (the node's stamps, in the driver's timebase: `_take_clock`)
        t = ev.t + off - self.t0
        if ev.kind == "read_done":
            self._apply_read(
                ev.request_id, ev.attempt, inf, ev.data["side"], ev.data["nbytes"], ev.data["t_start"] + off, ev.t + off
            )
        elif ev.kind == "prefill_start":
            rec.prefill_start = t
        elif ev.kind == "prefill_end":
            if inf is not None:
                inf.prefill_done = True
                inf.pe_read_tokens = 0
            rec.prefill_end = t
            rec.hit_tokens = ev.data["hit_tokens"]  # a corrupt/missing block shortens the hit (recomputed)
        elif ev.kind == "first_token":
            rec.first_token = t
            if self.store_keeper is not None and inf is not None:
                # the DE wrote (or is writing) the prompt's new whole blocks before it ran the turn: those stored
                # by now are indexed now (the rest at the turn's end), so the directory holds fewer unindexed ones
                self.store_keeper.written(ev.request_id, inf.keys[inf.pending.hit_tokens // self.block_size :])
        elif ev.kind == "second_token":
            rec.second_token = t
        elif ev.kind == "peer_lost":
            if inf is not None:  # (not a late one: its turn is done)
                self._peer_lost(node, ev.data)
        elif ev.kind == "turn_done":
            rec.finished = t
            pe = ev.data.get("pe") or {}
            # The PE's own stamps, handed to the DE with the first token: its events never come when its node died
            # after the hand-over (the record kept prefill_start and the PE-side read as NaN). Its late events, if
            # they do come, say the same. On the PE's clock: its node's offset, not the DE's.
            pe_off = self.clock_offsets.get(self.engine_node.get(rec.prefill_engine), 0.0)
            if math.isnan(rec.prefill_start) and "prefill_start" in pe:
                rec.prefill_start = pe["prefill_start"] + pe_off - self.t0
            if pe.get("read") is not None:
                t_start, t_end, nbytes = pe["read"]
                self._apply_read(ev.request_id, ev.attempt, inf, "pe", nbytes, t_start + pe_off, t_end + pe_off)
            if math.isnan(rec.prefill_end):
                # Until the PE's prefill_end arrives (it overrides these; it never does when the PE's node died
                # after the hand-over): the DE's first token is out after it, and the DE knows the final hit.
                if "prefill_end" in pe:
                    rec.prefill_end = pe["prefill_end"] + pe_off - self.t0
                else:
                    rec.prefill_end = t if math.isnan(rec.first_token) else rec.first_token
                rec.hit_tokens = ev.data.get("hit_tokens", rec.hit_tokens)
            del self._inflight[ev.request_id]
            self._completed_attempt[ev.request_id] = ev.attempt
            self.book.complete(ev.request_id, ev.data["tokens"], t)
            if self.store_keeper is not None:
                self._keep_write_back(inf, ev)
        else:
            raise RunFailed(f"unknown event kind {ev.kind!r} from node {node}")

    def _keep_write_back(self, inf: _InFlight, ev: Event) -> None:
        """Hand a finished turn's write-back to the store's keeper: the whole blocks of its sequence (prompt, then the
        generated tokens but the last, whose KV no step computed: `DecodeEngine._decode_block_key`) past its hit. Their
        keys as the DE made them: the prompt's (the task's `block_keys`) extended, not the prompt rehashed."""
        tokens = np.asarray(ev.data["tokens"], np.int32)
        seq = np.concatenate([np.asarray(inf.turn.prompt_ids, np.int32), tokens[:-1]])
        first = int(ev.data.get("hit_tokens", 0) or 0) // self.block_size
        self.store_keeper.turn_done(ev.request_id, extend_block_keys(inf.keys, seq, self.block_size), first)

    def _peer_lost(self, node: int, data: dict) -> None:
        """An engine of `node` could not reach the peer engine of a request in flight (a failed message or KV write:
        its transport gave up on the link or the peer). Engines take a lost peer for a dead one, so its node is
        declared dead now and its requests re-run on the others (or the run fails, naming it, if none is left). Only
        a dead peer's node was: a live one's requests were dropped, and the run waited out `run_timeout_s`."""
        peer_node = self.engine_node.get(data.get("peer"))
        if peer_node is None or peer_node in self.dead_nodes or self.book.done or self.stopping:
            return
        self._declare_dead(
            peer_node, f"engine {data.get('engine')} (node {node}) could not reach it: {data.get('error')}"
        )

    def _apply_read(self, rid: int, attempt: int, inf, side: str, nbytes: int, t_start: float, t_end: float) -> None:
        """A side's SNIC read of an attempt (wall-clock times), once: the PE's comes as its event and again in the
        DE's turn_done (`pe`), whichever reaches the service first."""
        if (rid, attempt, side) in self._reads_applied:
            return
        self._reads_applied.add((rid, attempt, side))
        rec = self.records[rid]
        if side == "pe":
            if inf is not None:
                inf.pe_read_tokens = 0
            rec.pe_read_bytes += nbytes
        else:
            if inf is not None:
                inf.de_read_tokens = 0
            rec.de_read_bytes += nbytes
        t0, t1 = t_start - self.t0, t_end - self.t0
        rec.read_start = t0 if math.isnan(rec.read_start) else min(rec.read_start, t0)
        rec.read_end = t1 if math.isnan(rec.read_end) else max(rec.read_end, t1)

    def fail(self, why: str) -> None:
        """Fail the run with `why` (an earlier failure is kept): a fetch that raised, or the control server dropped a
        node's connection for breaking the protocol (`ControlServer`'s `on_error`). The node only saw its connection
        closed and exited with "the driver closed the control connection", which was the run's error, the reason in a
        log line alone."""
        with self._lock:
            self.failure = self.failure or why

    def stop(self) -> None:
        """Tell every group to shut down at its next fetch (the driver gave up: its timeout, a failed node, Ctrl-C).
        Nothing else told them: their fetches went on being answered as if the run went on, so a `LocalCluster`
        session's nodes never ended that run ("did not finish their run" after 15 s, hiding why the run failed)."""
        with self._lock:
            self.stopping = True

    # ---------------------------------------------------------------- failures
    def watch_exits(self, exit_of: Callable[[int], str | None]) -> None:
        """`exit_of(node)`: how the node's process or thread ended ("its process node2 (pid 7) was killed by SIGKILL
        (exit code -9)"), None while it runs; quick, called with the service's lock held (the launcher's `start`)."""
        self._exit_of = exit_of

    def _ended(self, node: int) -> str | None:
        if self._exit_of is None:
            return None
        try:
            return self._exit_of(node)
        except Exception:  # noqa: BLE001 -- a reason's detail, never the run's failure
            log.exception("could not tell how node %d ended", node)
            return None

    def _name_exits(self) -> None:
        """(Lock held.) A dead node whose process or thread has ended since, not told to stop (a killed one, noticed
        first by a peer or its heartbeat): its reason names the exit first."""
        for n in sorted(self.dead_nodes - self._exit_named - self._told_dead):
            ended = self._ended(n)
            if ended is not None:
                self._exit_named.add(n)
                self.death_reasons[n] = f"{ended} (noticed first as: {self.death_reasons.get(n) or 'dead'})"
                log.warning("node %d: %s", n, self.death_reasons[n])

    def check_heartbeats(self) -> list[int]:
        """Declare silent groups dead and re-queue their requests; name the exits of dead nodes that have ended
        since (`watch_exits`). Returns the nodes newly declared dead."""
        newly = []
        arrived = self._beat_clock()  # (before the lock: a wait behind a long policy call is no pause)
        with self._lock:
            self._name_exits()
            now = self._beat_clock()
            last, self._last_check = self._last_check, now
            excess = -1.0 if last is None else arrived - last - max(PAUSE_MIN_S, self.heartbeat_timeout_s / 2)
            if excess > 0:
                # The watcher itself did not run for that long: the whole job was paused (Ctrl-Z and fg, a VM or
                # container frozen, swapping), and so were the nodes. That pause is no node's silence: it declared
                # every node dead at once on resuming ("no live engine left"), though none had failed. The part of
                # the gap past the bound is left out of each node's silence since the last check (or since its fetch
                # in the gap): a node silent before the pause is still declared dead a timeout after it, and a
                # watcher that is only late again and again (a loaded host) still sees silence grow.
                for n, seen in self._last_seen.items():
                    self._last_seen[n] = seen + max(0.0, min(excess, arrived - max(seen, last)))
            silent = {}
            for n in self.groups:
                if n in self.dead_nodes or n in self._in_fetch:
                    continue
                seen = self._last_seen.get(n)
                if seen is not None and now - seen > self.heartbeat_timeout_s:
                    newly.append(n)
                    silent[n] = now - seen
            for n in newly:
                self._declare_dead(
                    n, f"no fetch for {silent[n]:.3f} s > heartbeat_timeout_s={self.heartbeat_timeout_s:g}"
                )
        return newly

    def declare_dead(self, node: int, why: str = EXITED) -> None:
        """A launcher saw the group's process exit: no need to wait for the heartbeat timeout."""
        with self._lock:
            if node not in self.dead_nodes:
                self._declare_dead(node, why)

    def silent_dead_nodes(self) -> list[int]:
        """The nodes declared dead that have not fetched since (stopped, deadlocked, stuck in a step): no fetch told
        them to stop, so they never end their run on their own (the driver kills them, `driver._kill_silent_dead`)."""
        with self._lock:
            return sorted(self.dead_nodes - self._told_dead)

    def _declare_dead(self, node: int, why: str = "") -> None:
        ended = self._ended(node)  # (a launcher's exit, not a peer's "could not reach it": `watch_exits`)
        if ended is not None:
            self._exit_named.add(node)
            why = ended if why in ("", EXITED) else f"{ended} (noticed first as: {why})"
        log.warning("node %d (%s) is dead (%s): re-queueing its requests", node, self.groups[node].role, why)
        self.dead_nodes.add(node)
        self.death_reasons[node] = why
        if node in self.stats:
            self.stats[node] = _dead_stats(self.stats[node])
        rerun = []
        for rid, inf in self._inflight.items():
            a = inf.assignment
            if a is None:
                continue
            nodes = {self.engine_node[a.prefill_engine], self.engine_node[a.decode_engine]}
            if node not in nodes:
                continue
            if node != self.engine_node[a.decode_engine] and not math.isnan(self.records[rid].first_token):
                # Its DE runs it (first token out: the whole prompt KV is in its slot): it needs nothing more of its
                # PE. Re-run, every turn decoding there started over when a PE node died (its prefill and decode).
                continue
            for other in nodes - {node}:
                self._outbox[other].cancels.append(Cancel(rid, inf.attempt))
            rerun.append(rid)
        for rid in rerun:
            inf = self._inflight[rid]
            inf.attempt += 1
            inf.assignment = None
            inf.task = None
            inf.pe_read_tokens = inf.de_read_tokens = 0
            inf.prefill_done = False
            self._requeue_lookup(inf)
            rec = self.records[rid]
            for f in TIMESTAMPS[1:-1]:  # all but arrival and finished (not reached yet)
                setattr(rec, f, math.nan)
            rec.pe_read_bytes = rec.de_read_bytes = 0
            self.requeued += 1
        # Re-run requests go to the front, oldest first (they were admitted before anything still queued).
        self._queue = deque(sorted(rerun, key=lambda r: self._inflight[r].turn.arrival) + list(self._queue))
        live = {g.role for n, g in self.groups.items() if n not in self.dead_nodes}
        if not {"prefill", "decode"} <= live:  # (placement runs on PE fetches: with no PE left, none would say so)
            # Each dead node with why: a heartbeat timeout close to the fetch interval kills live nodes that were only
            # a little late (the failure used to list the nodes alone, as if they had crashed).
            why = "; ".join(f"node {n}: {self.death_reasons.get(n) or 'dead'}" for n in sorted(self.dead_nodes))
            self.failure = (
                self.failure or f"no live prefill or decode engine left (dead: {sorted(self.dead_nodes)}): {why}"
            )

    # ---------------------------------------------------------------- results
    def progress(self) -> tuple[int, int]:
        with self._lock:
            return self.book.completed_turns, self.book.total_turns

    def finished_records(self) -> list[TurnRecord]:
        with self._lock:
            return [self.records[r] for r in sorted(self.records) if not math.isnan(self.records[r].finished)]
