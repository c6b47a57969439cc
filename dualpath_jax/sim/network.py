"""Flow-level network: links with capacities, flows over paths, max-min fair rates.

Bandwidth is shared max-min fairly among the active flows (progressive filling / water-filling). A change
(a flow starts or ends, a link's high-priority load changes) re-solves only the connected component of
links and flows it touches, never the whole network. Each link has two priority classes: a high class
(model collectives, a rate demand set with `set_high_load`) that takes up to `high_share` of the capacity,
and the low class (KV flows) that shares what is left (work-conserving: an idle high class leaves all of it).

Bytes are accounted per link into time buckets as they move, so per-link bytes over time come out exactly
(byte conservation: each link's buckets sum to the bytes of the flows that crossed it).
"""

from __future__ import annotations

import heapq
import math
import operator
from collections.abc import Callable, Iterable, Sequence

from dualpath_jax.sim.config import SimConfigError
from dualpath_jax.sim.heap import TimeHeap

_EPS_BYTES = 1e-3  # a flow with less than this left is done (float rounding): sizes are in bytes, not unit-free
# One transfer's bytes spread over at most this many time buckets of a link (more: the per-bucket accounting of a
# ~0 GB/s link or a ~0 s bucket would run for hours and fill the memory; refused)
_MAX_SPAN_BUCKETS = 10_000_000
COALESCE_MIN_FLOWS = 256  # active flows from which group checks coalesce completions (`coalesce_s`)
_by_max_rate = operator.attrgetter("max_rate")  # a sort key (not a lambda: the compiled module has no closures)


class Flow:
    """One transfer of `size` bytes over `path` (link ids). `max_rate` caps it (e.g. a paced write-back)."""

    __slots__ = (
        "fid",
        "path",
        "remaining",
        "rate",
        "t_last",
        "max_rate",
        "on_done",
        "version",
        "size",
        "event_t",
        "mark",
        "nr",
    )

    def __init__(self, fid: int, path: tuple[int, ...], size: float, now: float, max_rate: float, on_done):
        self.fid = fid
        self.path = path
        self.size = size
        self.remaining = size
        self.rate = 0.0
        self.t_last = now
        self.max_rate = max_rate
        self.on_done = on_done
        self.version = 0
        self.event_t = math.inf  # time of its pending completion event (inf: none)
        self.mark = 0  # the last solve whose component holds it (FlowNetwork._stamp)
        self.nr = 0.0  # its rate in that solve (-1: not frozen yet)

    # Hash by flow id, not by address: sets of flows then iterate in the same order in every process, so a
    # run is deterministic per seed across processes (address-ordered sets changed float summation order).
    def __hash__(self) -> int:
        return self.fid

    def __eq__(self, other: object) -> bool:
        return self is other


def max_min_rates(
    capacities: Sequence[float], paths: Sequence[Sequence[int]], max_rates: Sequence[float] | None = None
) -> list[float]:
    """Max-min fair rates by progressive filling (reference form, also used by the network on components).

    capacities: [links] bytes/s; paths: per flow the link ids it crosses; max_rates: per-flow cap (inf: none).
    Repeatedly find the most constrained link (smallest fair share of its remaining capacity among its
    unfrozen flows, or a flow's own cap), freeze those flows at that share, and subtract.
    """
    n = len(paths)
    rates = [0.0] * n
    caps = max_rates if max_rates is not None else [math.inf] * n
    remaining = {}
    members: dict[int, list[int]] = {}
    for i, p in enumerate(paths):
        for link in p:
            members.setdefault(link, []).append(i)
    for link in members:
        remaining[link] = float(capacities[link])
    active_count = {link: len(m) for link, m in members.items()}
    frozen = [False] * n
    left = n
    while left:
        best_share = math.inf
        best_link = -1
        for link, cnt in active_count.items():
            if cnt:
                share = remaining[link] / cnt
                if share < best_share:
                    best_share, best_link = share, link
        # A flow whose own cap is below every link's share is frozen at its cap first.
        best_flow = -1
        for i in range(n):
            if not frozen[i] and caps[i] < best_share:
                best_share, best_flow = caps[i], i
        if best_flow >= 0:
            to_freeze = [best_flow]
        elif best_link >= 0:
            to_freeze = [i for i in members[best_link] if not frozen[i]]
        else:  # flows with empty paths: unconstrained
            to_freeze = [i for i in range(n) if not frozen[i]]
            best_share = math.inf
        share = max(best_share, 0.0)
        for i in to_freeze:
            frozen[i] = True
            rates[i] = share
            left -= 1
            for link in paths[i]:
                remaining[link] -= share
                active_count[link] -= 1
    return rates


class FlowNetwork:
    """Links + active flows; the simulator asks it for the next flow completion and advances it.

    `scheduler(time, flow, version)` is the event-queue hook. A flow keeps at most one live completion
    event: a re-solve that makes it finish earlier pushes a new one (the old one goes stale: its version
    no longer matches); one that makes it finish later pushes nothing, and the early event re-checks and
    re-arms itself (`handle_event`). That keeps heap traffic low when many flows slow down at once.

    Speed: a solve touches only the component of the change; within it, progressive filling runs over a
    heap of link shares (shares only grow as flows freeze, so stale heap entries are re-pushed lazily);
    a flow whose rate is unchanged is not touched; bytes are accounted per link from the link's aggregate
    rate (one update per link whose aggregate changed), not per flow. With `wake` set (the simulator), the
    network keeps its own heap of projected completions and asks the simulator for one check event at the
    earliest of them (`check_due`); in a busy network completions within `coalesce_s` of a check finish
    together with one solve. The component is found by stamping flows and links (no sets); a one-flow
    component, and one whose flows are all capped below every link's capacity (storage read streams), skip
    the heap (same rates).
    """

    def __init__(self, bucket_s: float = 10.0):
        self.names: list[str] = []
        self.capacity: list[float] = []  # bytes/s
        self.high_load: list[float] = []  # bytes/s demanded by the high-priority class now
        self.high_share: list[float] = []  # fraction of capacity the high class may take under contention
        self.reserved: list[float] = []  # bytes/s held by fixed-rate reservations (paced write-backs)
        # live reservations, a heap of (end, seq, start, bytes, path): `flush` takes back the bytes booked after
        # its time (a run cut by max_time); those that ended are dropped by the next `reserve`
        self._resv: list[tuple] = []
        self._resv_seq = 0  # (a tie-break in `_resv`: paths are never compared; the latest reservation's id)
        self._cut: set = set()  # ids of reservations in `_resv` cut short (`cut_reservation`)
        # what the KV (low) class may use: capacity - min(high_load, high_share * capacity) - reserved, >= 0;
        # kept up to date by every change of those (the solves read it for every link they touch)
        self.low_cap: list[float] = []
        self.link_flows: list[dict[int, Flow]] = []  # per link: fid -> flow (insertion order: deterministic)
        self._link_mark: list[int] = []  # per link: the last solve whose component holds it
        self._stamp = 0
        self.flows: dict[int, Flow] = {}
        self._next_fid = 0
        self.bucket_s = bucket_s
        self.buckets: list[dict[int, float]] = []  # per link: bucket index -> bytes (low class)
        self.high_bytes: list[dict[int, float]] = []  # per link: bucket index -> high-class bytes
        self._high_t: list[float] = []
        self.link_rate: list[float] = []  # aggregate low-class flow rate now
        self._link_t: list[float] = []  # when link_rate was last accounted
        self.link_total: list[float] = []
        # scratch per link for the solves (_fill, _all_capped): low-class capacity left, unfrozen flows, and
        # the aggregate rate; only the entries of the component being solved are meaningful
        self._rem: list[float] = []
        self._cnt: list[int] = []
        self._agg: list[float] = []
        self.solves = 0
        self.solved_flows = 0
        self.scheduler: Callable[[float, Flow, int], None] | None = None
        # Optional: `wake(time)` schedules one network check event (`check_due`) at `time`. With it, projected
        # completions go to the network's own heap `_due` (a `heap.TimeHeap`), and the simulator
        # holds one event for the earliest of them instead of one event per flow; without it, `scheduler`.
        self.wake: Callable[[float], None] | None = None
        self._due = TimeHeap()  # (time, fid, version, flow, None)
        self._wake_t = math.inf  # the earliest check asked of `wake` and not yet run
        self._asked: set[float] = set()  # times of the check events asked for and not yet run
        # With `wake` and at least COALESCE_MIN_FLOWS active flows: a flow that would finish within
        # `coalesce_s` after a check is finished at that check (its last bytes are accounted there),
        # so near-simultaneous completions cost one solve instead of one each. 0: exact completion times.
        self.coalesce_s = 0.0
        # Deferred solves (`defer = True`, the simulator): changes only record their links, and one `settle`
        # re-solves them all before time moves on. Rates matter only over positive time, so every change at
        # one instant (a batch's flows ending, its requests' next flows and the next batch starting) costs
        # one solve of their union instead of one each; the rates are the same max-min solution.
        self.defer = False
        self._pending: list[int] = []  # seed links of the changes not solved yet (defer mode)

    # ---- topology -------------------------------------------------------------------------------------
    def add_link(self, name: str, capacity: float, high_share: float = 0.99) -> int:
        if not capacity > 0:
            raise ValueError(f"link {name!r} needs a positive capacity (bytes/s), got {capacity}")
        self.names.append(name)
        self.capacity.append(float(capacity))
        self.high_load.append(0.0)
        self.high_share.append(high_share)
        self.reserved.append(0.0)
        self.low_cap.append(float(capacity))
        self.link_flows.append({})
        self._link_mark.append(0)
        self.buckets.append({})
        self.high_bytes.append({})
        self._high_t.append(0.0)
        self.link_rate.append(0.0)
        self._link_t.append(0.0)
        self.link_total.append(0.0)
        self._rem.append(0.0)
        self._cnt.append(0)
        self._agg.append(0.0)
        return len(self.names) - 1

    def low_capacity(self, link: int) -> float:
        return self.low_cap[link]

    def _update_low_cap(self, link: int) -> None:
        cap = self.capacity[link]
        self.low_cap[link] = max(
            cap - min(self.high_load[link], self.high_share[link] * cap) - self.reserved[link], 0.0
        )

    # ---- byte accounting ------------------------------------------------------------------------------
    def _account(self, link: int, t0: float, t1: float, nbytes: float, table: list[dict[int, float]]) -> None:
        if nbytes <= 0.0:
            return
        b = self.bucket_s
        if t1 - t0 > _MAX_SPAN_BUCKETS * b:
            raise SimConfigError(self._span_error(link, t0, t1))
        k0 = int(t0 // b)
        k1 = int(t1 // b)
        d = table[link]
        if k0 == k1 or t1 <= t0:
            d[k0] = d.get(k0, 0.0) + nbytes
            return
        rate = nbytes / (t1 - t0)
        for k in range(k0, k1 + 1):
            lo = max(t0, k * b)
            hi = min(t1, (k + 1) * b)
            if hi > lo:
                d[k] = d.get(k, 0.0) + rate * (hi - lo)

    def _span_error(self, link: int, t0: float, t1: float) -> str:
        return (
            f"link {self.names[link]} moves bytes over [{t0:.6g}, {t1:.6g}] s: more than {_MAX_SPAN_BUCKETS:,} "
            f"buckets of config.cluster.bucket_s = {self.bucket_s:g} s, a run that cannot end. A bandwidth near 0 "
            "(config.cluster.snic_gbps, cnic_gbps, dram_gbps, storage_gbps), a time scale near infinity "
            "(config.cluster.pe_time_scale, de_time_scale) or a bucket_s near 0 makes one"
        )

    def _account_link(self, link: int, now: float, new_rate: float) -> None:
        r = self.link_rate[link]
        t0 = self._link_t[link]
        if r > 0.0 and now > t0:
            nb = r * (now - t0)
            self._account(link, t0, now, nb, self.buckets)
            self.link_total[link] += nb
        self._link_t[link] = now
        self.link_rate[link] = new_rate

    # ---- flows ----------------------------------------------------------------------------------------
    def start_flow(self, path: Sequence[int], nbytes: float, now: float, on_done, max_rate: float = math.inf) -> Flow:
        """Start a flow; `on_done()` is called (through the event queue) when its last byte arrives."""
        if not path:
            raise ValueError("a flow needs at least one link in its path")
        if not nbytes > 0:
            raise ValueError(f"a flow needs a positive size in bytes, got {nbytes}")
        f = Flow(self._next_fid, tuple(path), float(nbytes), now, max_rate, on_done)
        self._next_fid += 1
        self.flows[f.fid] = f
        fid = f.fid
        for link in f.path:
            self.link_flows[link][fid] = f
        self._changed(f.path, now)
        return f

    def start_flows(self, specs: Sequence[tuple[Sequence[int], float, object, float]], now: float) -> list[Flow]:
        """Start several flows at once [(path, nbytes, on_done, max_rate)] with one solve over the union of
        their components (same rates as starting them one by one; one solve instead of len(specs))."""
        flows = []
        seeds: set[int] = set()
        for path, nbytes, on_done, max_rate in specs:
            if not path:
                raise ValueError("a flow needs at least one link in its path")
            if not nbytes > 0:
                raise ValueError(f"a flow needs a positive size in bytes, got {nbytes}")
            f = Flow(self._next_fid, tuple(path), float(nbytes), now, max_rate, on_done)
            self._next_fid += 1
            self.flows[f.fid] = f
            for link in f.path:
                self.link_flows[link][f.fid] = f
            seeds.update(f.path)
            flows.append(f)
        if flows:
            self._changed(seeds, now)
        return flows

    def handle_event(self, f: Flow, version: int, now: float) -> bool:
        """A completion event fired: True (and the flow is finished) if its last byte has arrived."""
        if f.version != version or f.fid not in self.flows:
            return False  # stale
        f.event_t = math.inf
        rem = f.remaining - f.rate * (now - f.t_last)
        if rem > 1e-9 * f.size + _EPS_BYTES:
            if f.rate <= 0.0:
                return False  # stalled: the re-solve that gives it bandwidth again pushes a new event
            t = now + rem / f.rate
            if t > now + 8.0 * math.ulp(now):  # it slowed down since this event was pushed: re-arm
                f.event_t = t
                f.version += 1
                self.scheduler(t, f, f.version)
                return False
            # else: less than a few ulps of the clock are left; finishing now avoids an event at `now` forever
        self.finish_flow(f, now)
        return True

    def check_due(self, now: float) -> list[Flow]:
        """The check event that `wake(now)` asked for fired: returns the flows whose last byte has arrived
        (the caller finishes them with `finish_flows`, then calls their `on_done`), in (projected time, fid)
        order, or [] when an earlier check was asked for since (it ran first). Flows that slowed down since
        their entry was pushed are re-pushed at their new time; then the next check is asked for at the
        earliest entry left.

        One heap for all completions: a solve that speeds up many flows pushes one entry each (C heap ops),
        and a check pops only the entries that are due, instead of walking every flow a solve touched.
        """
        self._asked.discard(now)
        if now != self._wake_t:
            return []
        self._wake_t = math.inf
        due = self._due
        flows = self.flows
        done = []
        # Coalesce only in a busy network, where solves are large; small networks stay exact.
        horizon = now + self.coalesce_s if len(flows) >= COALESCE_MIN_FLOWS else now
        while due and due.top_t() <= horizon:
            _, fid, version, f, _ = due.pop()
            if f.version != version or fid not in flows:
                continue  # covered by a newer entry, or finished
            f.event_t = math.inf
            rem = f.remaining - f.rate * (now - f.t_last)
            if rem > 1e-9 * f.size + _EPS_BYTES:
                if f.rate <= 0.0:
                    continue  # stalled: the re-solve that gives it bandwidth again pushes a new entry
                t = now + rem / f.rate
                if t > now + 8.0 * math.ulp(now) and t > horizon:  # it slowed down since: re-push
                    f.event_t = t
                    f.version += 1
                    due.push(t, fid, f.version, f, None)
                    continue
            done.append(f)
        if due:
            t = due.top_t()
            self._wake_t = t
            self._ask(t)
        return done

    def _ask(self, t: float) -> None:
        """Ask `wake` for a check event at `t`, unless one asked for earlier at that time is still to run."""
        if t not in self._asked:
            self._asked.add(t)
            self.wake(t)

    def finish_flows(self, fl: Sequence[Flow], now: float) -> None:
        """Finish several flows at `now` with one solve over the union of their components. Bytes a flow
        had left (it was finished up to `coalesce_s` early) are accounted at `now` on its path."""
        seeds: set[int] = set()
        for f in fl:
            rem = f.remaining - f.rate * (now - f.t_last)
            if rem > 0.0:
                for link in f.path:
                    self._account(link, now, now, rem, self.buckets)
                    self.link_total[link] += rem
            f.remaining = 0.0
            f.t_last = now
            del self.flows[f.fid]
            for link in f.path:
                self.link_flows[link].pop(f.fid, None)
            seeds.update(f.path)
        if seeds:
            self._changed(seeds, now)

    def finish_flow(self, f: Flow, now: float) -> None:
        """Called by the simulator when a flow's completion event fires (and is current)."""
        f.remaining = 0.0
        f.t_last = now
        del self.flows[f.fid]
        for link in f.path:
            self.link_flows[link].pop(f.fid, None)
        self._changed(f.path, now)

    def _changed(self, seed_links: Iterable[int], now: float) -> None:
        """A change touched these links: re-solve their component now, or (defer mode) at the instant's
        `settle`."""
        if self.defer:
            self._pending.extend(seed_links)
        else:
            self._resolve(list(seed_links), now)

    def settle(self, now: float) -> None:
        """Defer mode: solve the union of the components changed since the last settle (call it before the
        clock moves past `now`)."""
        pending = self._pending  # the same list object for the whole run (the simulator's loop holds it)
        if pending:
            seeds = pending[:]
            pending.clear()
            self._resolve(seeds, now)

    def reserve(self, path: Sequence[int], nbytes: float, rate: float, now: float) -> float:
        """A fixed-rate transfer (a paced write-back far below link capacity): holds `rate` on every link
        of `path` until the returned end time, when the caller must `release` it. Its bytes are accounted
        at once over [now, end] (a run that ends before `end` takes back the rest: `flush`). Where the flows on
        its links then take more than is left, they are re-solved now (they share what it leaves), so no link
        carries more than its capacity as long as `rate` fits the low class's capacity left on the path (the
        caller's check: `low_cap`)."""
        if not nbytes > 0 or not rate > 0:
            raise ValueError(f"a reservation needs positive bytes and rate, got {nbytes}, {rate}")
        end = now + nbytes / rate
        over = False
        for link in path:
            self.reserved[link] += rate
            self._update_low_cap(link)
            if self.link_rate[link] > self.low_cap[link]:
                over = True
            self._account(link, now, end, nbytes, self.buckets)
            self.link_total[link] += nbytes
        resv = self._resv
        while resv and resv[0][0] <= now:  # ended (released at their end)
            self._cut.discard(heapq.heappop(resv)[1])
        self._resv_seq += 1
        heapq.heappush(resv, (end, self._resv_seq, float(now), float(nbytes), tuple(path)))
        if over:
            self._changed(path, now)
        return end

    def _unbook_reservations(self, now: float) -> None:
        """The run ends at `now`: take back the bytes that live reservations booked after it (the buckets after
        the one of `now` held only those)."""
        kn = int(now // self.bucket_s)
        touched = []
        for end, seq, t0, nbytes, path in self._resv:
            if end <= now or seq in self._cut:  # (a cut one took its bytes back already)
                continue
            self._take_back(path, nbytes / (end - t0), end, now)
            touched.extend(path)
        self._resv = []
        self._cut = set()
        for link in touched:
            d = self.buckets[link]
            for k in [k for k in d if k > kn or (k == kn and d[k] < _EPS_BYTES)]:
                del d[k]

    def cut_reservation(self, seq: int, path: Sequence[int], rate: float, end: float, now: float) -> float:
        """End reservation `seq` (`reserve`'s latest id, `_resv_seq`, right after it booked `rate` on `path` until
        `end`) at `now`, before `end`: the bytes it booked after `now` are taken back, to be moved otherwise by the
        caller (a paced write-back whose decode ended: the rest as an ordinary flow), and its rate goes back to the
        low class (`release`). Returns those bytes (0 at or after `end`)."""
        if now >= end:
            self.release(path, rate, now)
            return 0.0
        self._take_back(path, rate, end, now)
        b = self.bucket_s
        for link in path:
            d = self.buckets[link]
            for k in range(int(now // b) + 1, int(end // b) + 1):  # (its later buckets with nothing else: float dust)
                if k in d and abs(d[k]) < _EPS_BYTES:
                    del d[k]
        self._cut.add(seq)
        self.release(path, rate, now)
        return rate * (end - now)

    def _take_back(self, path: Sequence[int], rate: float, end: float, now: float) -> None:
        """Take back from `path`'s buckets and totals the bytes a reservation of `rate` until `end` booked after `now`
        (`reserve` accounts them at once)."""
        b = self.bucket_s
        for link in path:
            d = self.buckets[link]
            for k in range(int(now // b), int(end // b) + 1):
                lo = max(now, k * b)
                hi = min(end, (k + 1) * b)
                if hi > lo and k in d:
                    nb = rate * (hi - lo)
                    self.link_total[link] -= nb
                    d[k] -= nb

    def set_max_rate(self, f: Flow, max_rate: float, now: float) -> None:
        """Change a live flow's rate cap (a paced write-back whose decode ended: the rest at what the links give);
        its links are re-solved now."""
        if f.fid not in self.flows or f.max_rate == max_rate:
            return
        f.max_rate = max_rate
        self._changed(f.path, now)

    def release(self, path: Sequence[int], rate: float, now: float | None = None) -> None:
        """A reservation ended: its rate goes back to the low class. With `now`, the flows of a link they filled
        are re-solved then to take it (a link with room left changes no max-min rate; flows a full reservation
        load stalled at rate 0 would wait for the next change of their component)."""
        full = False
        for link in path:
            if self.link_rate[link] >= self.low_cap[link] * (1.0 - 1e-9):
                full = True
            self.reserved[link] = max(self.reserved[link] - rate, 0.0)
            self._update_low_cap(link)
        if full and now is not None:
            self._changed(path, now)

    def set_high_load(self, link: int, rate: float, now: float) -> None:
        """Set the high-priority (collective) demand on a link; re-solve the KV flows crossing it."""
        old = self.high_load[link]
        if old > 0.0:
            dt = now - self._high_t[link]
            if dt > 0:
                moved = min(old, self.high_share[link] * self.capacity[link]) * dt
                self._account(link, self._high_t[link], now, moved, self.high_bytes)
        self._high_t[link] = now
        self.high_load[link] = rate
        self._update_low_cap(link)
        if self.link_flows[link]:
            self._changed((link,), now)

    # ---- the incremental solve ------------------------------------------------------------------------
    def _component(self, seed_links: Sequence[int]) -> tuple[list[int], list[Flow]]:
        """The links and flows connected to `seed_links`; marks them with a new solve stamp (no sets:
        membership is the stamp on the flow / link) and resets each flow's `nr` to -1 (not frozen)."""
        self._stamp += 1
        stamp = self._stamp
        lmark = self._link_mark
        link_flows = self.link_flows
        links = []
        for link in seed_links:
            if lmark[link] != stamp:
                lmark[link] = stamp
                links.append(link)
        flows: list[Flow] = []
        i = 0
        while i < len(links):
            link = links[i]
            for f in link_flows[link].values():
                if f.mark != stamp:
                    f.mark = stamp
                    f.nr = -1.0
                    flows.append(f)
                    for l2 in f.path:
                        if lmark[l2] != stamp:
                            lmark[l2] = stamp
                            links.append(l2)
            i += 1
        return links, flows

    def _resolve(self, seed_links: Sequence[int], now: float) -> None:
        links, flows = self._component(seed_links)
        link_rate = self.link_rate
        if not flows:
            for link in links:
                if link_rate[link] != 0.0:
                    self._account_link(link, now, 0.0)
            return
        self.solves += 1
        self.solved_flows += len(flows)
        low_cap = self.low_cap
        share = 0.0
        path = ()
        if len(flows) == 1:
            # One flow (the common case): it gets the smallest low-class capacity on its path, or its cap.
            f = flows[0]
            share = f.max_rate
            path = f.path
            for link in path:
                rem = low_cap[link]
                if rem < share:
                    share = rem
            f.nr = share
            agg = None
        else:
            agg = self._all_capped(links, flows, low_cap)
            if agg is None:
                agg = self._fill(links, flows, self.link_flows, low_cap)
        due = None if self.wake is None else self._due
        t_min = math.inf
        for f in flows:
            r = f.nr
            if r != f.rate or f.version == 0:
                dt = now - f.t_last
                if dt > 0.0 and f.rate > 0.0:
                    rem = f.remaining - f.rate * dt
                    f.remaining = rem if rem > 0.0 else 0.0
                f.t_last = now
                f.rate = r
                if r > 0.0:
                    t = now + f.remaining / r
                    if t < f.event_t:
                        f.event_t = t
                        f.version += 1
                        if due is None:
                            self.scheduler(t, f, f.version)
                        else:
                            due.push(t, f.fid, f.version, f, None)
                            if t < t_min:
                                t_min = t
        if t_min < self._wake_t:
            self._wake_t = t_min
            self._ask(t_min)
        # Per-link aggregate rates: bytes moved at the old rate are accounted up to now (_account_link,
        # its one-bucket case inline).
        link_t = self._link_t
        bucket_s = self.bucket_s
        buckets = self.buckets
        link_total = self.link_total
        for link in links:
            if agg is None:
                a = share if link in path else 0.0
            else:
                a = agg[link]
            r = link_rate[link]
            if a != r:
                t0 = link_t[link]
                if r > 0.0 and now > t0:
                    nb = r * (now - t0)
                    k0 = int(t0 // bucket_s)
                    if k0 == int(now // bucket_s):
                        d = buckets[link]
                        d[k0] = d.get(k0, 0.0) + nb
                    else:
                        self._account(link, t0, now, nb, buckets)
                    link_total[link] += nb
                link_t[link] = now
                link_rate[link] = a

    def _all_capped(self, links, flows, low_cap) -> list[float] | None:
        """When every flow has a cap (storage read streams) and the caps fit every link's low-class capacity,
        max-min gives each flow its cap: set `nr` and return the per-link sums (`_agg`, valid for `links`);
        else None (no change)."""
        inf = math.inf
        for f in flows:
            if f.max_rate == inf:
                return None
        agg = self._agg
        for link in links:
            agg[link] = 0.0
        for f in flows:
            m = f.max_rate
            for link in f.path:
                agg[link] += m
        for link in links:
            a = agg[link]
            if a > 0.0 and a > low_cap[link]:
                return None
        for f in flows:
            f.nr = f.max_rate
        return agg

    def _fill(self, links, flows, link_flows, low_cap) -> list[float]:
        """Progressive filling over a component with a heap of link shares; sets each flow's `nr` and
        returns the aggregate rate per link (`_agg`, valid for `links`). Per-link state lives in lists
        indexed by link id, reused by every solve (cheaper than dicts)."""
        remaining = self._rem
        count = self._cnt
        agg = self._agg
        heap = []
        for link in links:
            agg[link] = 0.0
            n = len(link_flows[link])
            count[link] = n
            if n:
                rem = low_cap[link]
                remaining[link] = rem
                heap.append((rem / n, link))
        heapq.heapify(heap)
        inf = math.inf
        capped = [f for f in flows if f.max_rate < inf]
        if capped:
            capped.sort(key=_by_max_rate)
        n_capped = len(capped)
        ci = 0
        left = len(flows)
        heappop, heapreplace = heapq.heappop, heapq.heapreplace
        while left:
            while ci < n_capped and capped[ci].nr >= 0.0:
                ci += 1
            share = inf
            link = -1
            while heap:
                s0, l0 = heap[0]
                n = count[l0]
                if n == 0:
                    heappop(heap)
                    continue
                cur = remaining[l0] / n
                if cur > s0 + 1e-12 * (abs(s0) + 1.0):
                    heapreplace(heap, (cur, l0))
                    continue
                share, link = cur, l0
                break
            if ci < n_capped and capped[ci].max_rate < share:
                to_freeze = (capped[ci],)
                share = capped[ci].max_rate
            else:
                to_freeze = [f for f in link_flows[link].values() if f.nr < 0.0]
            if share < 0.0:
                share = 0.0
            for f in to_freeze:
                f.nr = share
                left -= 1
                for l2 in f.path:
                    remaining[l2] -= share
                    count[l2] -= 1
                    agg[l2] += share
        return agg

    # ---- outputs --------------------------------------------------------------------------------------
    def flush(self, now: float) -> None:
        """Account bytes of active flows and high-class loads up to `now`, where the run ends (before reading
        buckets); reservations not over by then keep only the bytes they moved by `now`."""
        self.settle(now)
        self._unbook_reservations(now)
        for link in range(len(self.names)):
            self._account_link(link, now, self.link_rate[link])
            if self.high_load[link] > 0.0:
                old_solves = self.solves
                self.set_high_load(link, self.high_load[link], now)
                self.solves = old_solves
        self._pending.clear()  # defer mode: set_high_load above left the same loads (nothing to re-solve)

    def link_bytes(self, prefixes: Sequence[str] = ("",)) -> list[tuple[str, float, float, float]]:
        """(link name, t0, t1, bytes) per non-empty bucket, low class; high class as '<name>/high'."""
        out = []
        b = self.bucket_s
        for link, name in enumerate(self.names):
            if not any(name.startswith(p) for p in prefixes):
                continue
            for k in sorted(self.buckets[link]):
                out.append((name, k * b, (k + 1) * b, self.buckets[link][k]))
            for k in sorted(self.high_bytes[link]):
                out.append((name + "/high", k * b, (k + 1) * b, self.high_bytes[link][k]))
        return out
