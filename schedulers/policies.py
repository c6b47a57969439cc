"""Inter-engine policies: which PE, which DE and which read side for each waiting request (no jax).

Units every runner must report (the simulator and the runtime build the same snapshot):
  - a PE's `tok` = sum of `prompt_tokens` (hit + miss) of its unfinished requests: the paper's load
    proxy for GPU, disk and network (PAPER.md "Scheduler"); β is in the same unit;
  - a DE's `tok` = sum of `total_tokens` (len_r = prompt + gen) of its unfinished requests, and
    `free_hbm_tokens` the KV tokens it can still admit; a request is admitted only if len_r fits;
  - a node's `read_queue_tokens` = hit tokens queued on its storage NIC; α is in the same unit.

Every policy places a FIFO prefix of the queue (it stops at the first request it cannot place), never
places a request twice, never over-fills a DE's HBM (except `round_robin` with `full_de="queue"`, the
`dualpath_rr` mode's setting: it places on the DE in turn, room or not, and the request waits there for
HBM), and updates a private scratch copy of the loads as it goes (tok, seq, free HBM, read queues) so later
decisions of the same fetch see earlier ones. The snapshot itself is never mutated.

`fetching_node` (the paper's per-group fetch; None: consider all) restricts one thing only, so that no
fetch biases placement toward the node that happened to fetch:
  - a PE group's fetch runs Algorithm 1 over that group's PEs (`basic`, `dualpath` and its variants):
    β caps how much one group takes, later groups' fetches take the rest;
  - a DE group's fetch restricts nothing: DE phase 1 drains the queue over ALL DE groups (the smallest
    Σ tok_e, not necessarily the fetching one), phase 2 picks the DE within the chosen group, and the PE
    is chosen among all PEs;
  - `round_robin` and `random` (assignment without scheduling) ignore which node fetched: they rotate
    over / draw from every engine of each role, and a fetch only decides when placement happens.
Cost per fetch: O(placed · (candidate PEs + DEs of one group)) plus a heap over the DE groups.
"""

from __future__ import annotations

import array
import bisect
import dataclasses
import heapq
import itertools
import math
import operator
import random
from collections.abc import Sequence

from dualpath_jax.compiled import use as use_compiled
from schedulers.api import (
    Assignment,
    ClusterSnapshot,
    InterEnginePolicy,
    PendingRequest,
    QueueWindow,
    ReadSide,
)
from schedulers.cost_model import CostModel
from schedulers.registry import POLICIES, describe, is_int, is_real

# DualPath's inner loops in C (schedulers/_dualpath.pyx, built by setup.py; dualpath_jax/compiled.py says when
# it is not used); None: the Python loops
if use_compiled("schedulers._dualpath"):
    from schedulers import _dualpath as _dualpath_c
else:
    _dualpath_c = None

# Paper defaults (PAPER.md: α = tokens one node reads in 3 s, β = tokens one GPU processes in 5 s).
READ_WINDOW_S = 3.0
COMPUTE_WINDOW_S = 5.0
# Turn shape the profile of β is taken at: Table 2's 64K dataset (mean context 32,721, append 429).
PROFILE_CONTEXT = 32_721
PROFILE_APPEND = 429


_TOK = operator.attrgetter("tok")
_SEQ = operator.attrgetter("seq")
_FREE = operator.attrgetter("free_hbm_tokens")
_REQUEST_ID = operator.attrgetter("request_id")
_READ_Q = operator.attrgetter("read_queue_tokens")
_ENGINE_TOK = operator.attrgetter("engine_tok")
_ENGINE_FREE = operator.attrgetter("engine_free_hbm_tokens")


class _Topology:
    """Engine ids, PE lists per node and DE groups of one snapshot's engine set (what never changes between
    fetches), with the EngineState objects in the same orders."""

    __slots__ = (
        "de_groups",
        "de_ids",
        "de_states",
        "engines",
        "gids",
        "group_states",
        "key",
        "node_of",
        "nodes",
        "pe_states",
        "pe_states_of_node",
        "pes",
        "pes_of_node",
        "state_of",
        "states",
    )

    def __init__(self, states: tuple):
        self.states = states
        self.engines = self.nodes = None  # the snapshot's engines and nodes dicts and engine_set_key last checked
        self.key = None
        self.state_of = {e.engine_id: e for e in states}
        self.node_of = {e.engine_id: e.node_id for e in states}
        pes_of_node: dict[int, list[int]] = {}
        de_groups: dict[int, list[int]] = {}
        for e in states:
            if e.role == "prefill":
                pes_of_node.setdefault(e.node_id, []).append(e.engine_id)
            else:
                de_groups.setdefault(e.node_id, []).append(e.engine_id)
        for g in pes_of_node.values():
            g.sort()
        for g in de_groups.values():
            g.sort()
        state_of = self.state_of
        self.pes = sorted(e for g in pes_of_node.values() for e in g)
        self.pe_states = [state_of[e] for e in self.pes]
        self.pes_of_node = pes_of_node
        self.pe_states_of_node = {n: [state_of[e] for e in g] for n, g in pes_of_node.items()}
        self.de_groups = de_groups
        self.de_ids = [e for g in de_groups.values() for e in g]
        self.de_states = [state_of[e] for e in self.de_ids]
        self.gids = sorted(de_groups)  # DE phase 1's group ranks (`_dualpath.phase1`)
        self.group_states = [[state_of[e] for e in de_groups[g]] for g in self.gids]


_TOPOLOGY_CACHE: list[_Topology] = []  # the last one built (a simulator or runtime keeps one engine set)


def _check_engine_set(snapshot: ClusterSnapshot, topo: _Topology) -> None:
    """Each engine under its own engine_id (an Assignment names engine_id: another key would name an engine the
    runner does not have), on a node the snapshot has (its read queue is read when it is placed on)."""
    bad = [k for k, e in snapshot.engines.items() if k != e.engine_id]
    if bad:
        k = bad[0]
        raise ValueError(f"snapshot.engines[{k}] holds engine_id {snapshot.engines[k].engine_id}: keys must be the ids")
    missing = set(topo.node_of.values()).difference(snapshot.nodes)
    if missing:
        raise KeyError(f"engines on nodes {sorted(missing)} that are not in snapshot.nodes {sorted(snapshot.nodes)}")
    # A node is all-PE or all-DE (NodeState): an engine of the other role was a DE group sharing a PE node's read
    # queue (its reads always went to the PE side) or a PE a DE node's fetch did not restrict to, silently.
    nodes = snapshot.nodes
    wrong = [e for e in topo.states if e.role != nodes[e.node_id].role]
    if wrong:
        e = wrong[0]
        raise ValueError(
            f"engine {e.engine_id} ({e.role}) is on node {e.node_id} whose role is {nodes[e.node_id].role}: a node's "
            "engines all have its role"
        )


def _topology(snapshot: ClusterSnapshot) -> _Topology:
    """The cached topology when the snapshot holds the very same EngineState objects in the same order (the
    simulator keeps one set; an engine's engine_id/role/node_id is never changed in place: a moved or new
    engine is a new EngineState object), else a new one (the runtime builds new objects per fetch)."""
    engines, nodes, key = snapshot.engines, snapshot.nodes, snapshot.engine_set_key
    topo = _TOPOLOGY_CACHE[0] if _TOPOLOGY_CACHE else None
    if topo is not None and key is not None and topo.key == key and topo.engines is engines and topo.nodes is nodes:
        return topo  # the runner vouches for its engine set (ClusterSnapshot.engine_set_key)
    states = tuple(engines.values())
    if topo is None or len(topo.states) != len(states) or not all(map(operator.is_, topo.states, states)):
        topo = _Topology(states)
        _check_engine_set(snapshot, topo)  # once per engine set (what the cache keeps), not per fetch
        _TOPOLOGY_CACHE[:] = [topo]
    elif topo.engines is not engines or topo.nodes is not nodes:
        # the same EngineState objects in other dicts: their keys and nodes were never checked (a snapshot keyed
        # by other ids, or whose nodes lack one or give it the other role, was taken because an earlier one passed)
        _check_engine_set(snapshot, topo)
    topo.engines, topo.nodes, topo.key = engines, nodes, key
    return topo


class _Loads(dict):
    """engine (or node) id -> one load field: filled in bulk for the engines every fetch reads, and on first read
    (`__missing__`) from the snapshot for the others (copy on read; lookups of present keys stay C-fast)."""

    __slots__ = ("getter", "state_of")

    def __init__(self, state_of: dict, getter, ids=(), states=()):
        super().__init__(zip(ids, map(getter, states), strict=True))
        self.state_of = state_of
        self.getter = getter

    def __missing__(self, engine_id: int) -> int:
        value = self.getter(self.state_of[engine_id])
        self[engine_id] = value
        return value

    def fill(self, ids: Sequence[int]) -> None:
        """Read these engines' loads now, in bulk (C-level map), where each would be read on first use. Only
        for ids this fetch has not changed yet: their entries are (re)set to the snapshot's values."""
        self.update(zip(ids, map(self.getter, map(self.state_of.__getitem__, ids)), strict=True))


class _Scratch:
    """Mutable per-fetch copy of the loads a policy reads and updates (ints in dicts, no deep copies).

    Speed (a fetch at 1,152 engines runs ~60 times per simulated second): the engine set's structure is
    cached (`_topology`), the candidate PEs' tok (and, unless `group_sums` are used, DE tok/free) are copied
    in bulk (C-level map/zip), every other load on first read. Same values as a full copy: the snapshot
    does not change during a fetch."""

    __slots__ = (
        "de_groups",
        "free",
        "group_free",
        "group_tok",
        "node_of",
        "pe_nodes",
        "pe_states_of_node",
        "pes",
        "read_q",
        "seq",
        "tok",
    )

    def __init__(self, snapshot: ClusterSnapshot, pe_node: int | None, group_sums: bool = False, pe_loads: bool = True):
        """`pe_node`: keep only this node's PEs as candidates (a PE group's fetch); None: every PE.
        Every DE is always a candidate (DE phase 1 runs over all DE groups). `group_sums`: the policy needs
        Σ tok_e / Σ free_hbm_tokens per DE group (`group_sums()`); when the runner keeps them on every DE
        node (`NodeState.engine_tok` / `engine_free_hbm_tokens`) of its own live snapshot (one with an
        `engine_set_key`) they are taken from there and the DEs' own loads are read only when first used.
        `pe_loads=False`: the candidate PEs' tok are read on first use too (a caller that reads them from
        `pe_states_of_node` itself)."""
        topo = _topology(snapshot)
        if pe_node is None:
            pes, pe_states = topo.pes, topo.pe_states
            self.pe_nodes: dict[int, list[int]] = topo.pes_of_node  # shared, read-only: node -> its PEs (sorted)
            self.pe_states_of_node: dict[int, list] = topo.pe_states_of_node  # their EngineStates, same order
        else:
            pes, pe_states = topo.pes_of_node.get(pe_node, []), topo.pe_states_of_node.get(pe_node, [])
            self.pe_nodes = {pe_node: pes} if pes else {}
            self.pe_states_of_node = {pe_node: pe_states} if pes else {}
        self.pes: list[int] = pes  # shared, read-only
        if not pe_loads:  # the PEs' tok are read on first use (`_Loads.__missing__`), not in bulk here
            pes, pe_states = (), ()
        self.de_groups: dict[int, list[int]] = topo.de_groups  # shared, read-only
        self.group_tok = self.group_free = None
        # Only on a runner's live snapshot (`engine_set_key` set): a copy() keeps the sums but not the key, and a
        # policy that changed the copy's engine loads (the README's recipe) and handed it on was given the stale sums
        # in the simulator only (which keeps them), its engines' in the runtime (which does not): other decisions.
        if group_sums and snapshot.engine_set_key is not None:
            nodes = snapshot.nodes
            gids = self.de_groups
            try:  # C-level maps over the group nodes (a fetch at 48P96D reads 96 groups)
                states = list(map(nodes.__getitem__, gids))
                group_tok = dict(zip(gids, map(_ENGINE_TOK, states), strict=True))
                group_free = dict(zip(gids, map(_ENGINE_FREE, states), strict=True))
            except (KeyError, AttributeError):  # a group without a node state: the sums come from its engines
                group_tok = group_free = None
            if group_tok is not None and None not in group_tok.values() and None not in group_free.values():
                self.group_tok, self.group_free = group_tok, group_free
        if self.group_tok is not None:
            self.tok = _Loads(topo.state_of, _TOK, pes, pe_states)
            self.free = _Loads(topo.state_of, _FREE)
        else:
            self.tok = _Loads(topo.state_of, _TOK, topo.de_ids, topo.de_states)
            self.tok.update(zip(pes, map(_TOK, pe_states), strict=True))
            self.free = _Loads(topo.state_of, _FREE, topo.de_ids, topo.de_states)
        self.seq = _Loads(topo.state_of, _SEQ)
        self.node_of: dict[int, int] = topo.node_of  # shared, read-only
        self.read_q: dict[int, int] = _Loads(snapshot.nodes, _READ_Q)  # node id -> read_q, on first read

    def group_sums(self) -> tuple[dict[int, int], dict[int, int]]:
        """(Σ tok_e, Σ free_hbm_tokens) per DE group before this fetch's placements, in de_groups order."""
        if self.group_tok is not None:
            return self.group_tok, self.group_free
        tok, free = self.tok, self.free
        group_tok = {gid: sum(map(tok.__getitem__, g)) for gid, g in self.de_groups.items()}
        group_free = {gid: sum(map(free.__getitem__, g)) for gid, g in self.de_groups.items()}
        return group_tok, group_free

    @property
    def des(self) -> list[int]:
        return [e for g in sorted(self.de_groups) for e in self.de_groups[g]]

    def shorter_read_side(self, pe: int, de: int) -> ReadSide:
        """DualPath's read path (PAPER.md): the side whose node has the shorter read queue now; ties: the PE side."""
        return "de" if self.read_q[self.node_of[de]] < self.read_q[self.node_of[pe]] else "pe"

    def commit(self, r: PendingRequest, pe: int, de: int, side: ReadSide, de_fraction: float) -> Assignment:
        """Record the placement in the scratch loads and return it."""
        self.tok[pe] += r.prompt_tokens
        self.seq[pe] += 1
        self.tok[de] += r.total_tokens
        self.seq[de] += 1
        self.free[de] -= r.total_tokens
        de_hit = round(r.hit_tokens * de_fraction)
        self.read_q[self.node_of[pe]] += r.hit_tokens - de_hit
        self.read_q[self.node_of[de]] += de_hit
        return Assignment(r.request_id, pe, de, side, de_fraction)


def _check_unique(queue: Sequence[PendingRequest]) -> None:
    if isinstance(queue, QueueWindow):
        ids = queue.request_ids
        if _dualpath_c is not None and isinstance(ids, array.array) and ids.typecode == "q":
            if _dualpath_c.has_duplicates(ids):  # a hash set in C (a runner's array of ids)
                raise ValueError("queue holds the same request_id twice")
            return
    else:
        ids = map(_REQUEST_ID, queue)
    if len(set(ids)) != len(queue):
        raise ValueError("queue holds the same request_id twice")


def _lens(queue: Sequence[PendingRequest]) -> list[int]:
    """len_r (= PendingRequest.total_tokens) of each request, from a QueueWindow's list when it has one."""
    if isinstance(queue, QueueWindow):
        return queue.total_tokens
    return [r.prompt_tokens + r.gen_tokens for r in queue]


def _fast_r_len(heap: list[int], gids: list[int], shift: int, group_tok, group_free) -> dict[int, int] | None:
    """DE phase 1's assign-only loop left `heap`: each group's R is all it got, when that fits its free HBM
    for every group; None when some group's R closed (the closing loop decides)."""
    mask = (1 << shift) - 1
    r_len = {}
    for k in heap:
        g = gids[k & mask]
        got = (k >> shift) - group_tok[g]
        if got > group_free[g]:
            return None
        r_len[g] = got
    return r_len


def _fetch_role(snapshot: ClusterSnapshot, fetching_node: int | None) -> str | None:
    """The fetching node's role (None for `fetching_node=None`); an unknown node is an error."""
    if fetching_node is None:
        return None
    if type(fetching_node) is not int and not is_int(fetching_node):  # True was node 1 (it hashes as 1), 0.0 node 0
        raise TypeError(f"fetching_node must be a node id (an int) or None, got {describe(fetching_node)}")
    node = snapshot.nodes.get(fetching_node)
    if node is None:
        raise KeyError(f"fetching_node {fetching_node} is not in the snapshot (nodes: {sorted(snapshot.nodes)})")
    return node.role


def _pe_scope(snapshot: ClusterSnapshot, fetching_node: int | None) -> int | None:
    """The PE group a fetch restricts PE placement to: the fetching node if it is a PE group, else None."""
    return fetching_node if _fetch_role(snapshot, fetching_node) == "prefill" else None


def _next_after(ids: list[int], last: int | None) -> int:
    """Rotation over sorted engine ids: the index of the first id after `last` (wrapping around). Keyed on
    the id, not a position, so the rotation survives engines joining or dying between fetches."""
    if last is None:
        return 0
    i = bisect.bisect_right(ids, last)
    return 0 if i == len(ids) else i


# ---------------------------------------------------------------------------------------------------------
@POLICIES.register("basic")
class BasicPolicy(InterEnginePolicy):
    """The paper's baseline: PE-side reads only; least-loaded PE (tok_e) and least-loaded DE with room.

    Same fetch scope as `dualpath`: a PE group's fetch picks among that group's PEs, every DE is a
    candidate. Without `max_pe_tokens` (its β) one PE group's fetch takes the whole queue it is shown.
    """

    name = "basic"

    @dataclasses.dataclass(frozen=True)
    class Config:
        max_pe_tokens: int | None = None  # PEs above this tok_e get nothing (None: no cap)

        def __post_init__(self):
            cap = self.max_pe_tokens
            if cap is not None and not (is_real(cap) and cap >= 0):  # NaN too
                raise ValueError(f"basic max_pe_tokens must be >= 0 or None, got {cap!r}")
            if cap is not None and not is_int(cap):  # a token count: 2.5 or True are mistakes
                raise ValueError(f"basic max_pe_tokens must be an int or None, got {describe(cap)}")

    def __init__(self, config: BasicPolicy.Config | None = None):
        self.config = config or self.Config()

    def schedule(
        self, snapshot: ClusterSnapshot, queue: Sequence[PendingRequest], fetching_node: int | None = None
    ) -> list[Assignment]:
        _check_unique(queue)
        s = _Scratch(snapshot, _pe_scope(snapshot, fetching_node))
        cap = self.config.max_pe_tokens
        # least-loaded picks through heaps of (tok, id): O(log engines) per request
        pe_heap = [(s.tok[e], e) for e in s.pes]
        de_heap = [(s.tok[e], e) for e in s.des]
        heapq.heapify(pe_heap)
        heapq.heapify(de_heap)
        out = []
        for r in queue:
            if not pe_heap or (cap is not None and pe_heap[0][0] > cap):
                break
            skipped, de = [], None
            while de_heap:
                item = heapq.heappop(de_heap)
                if s.free[item[1]] >= r.total_tokens:
                    de = item[1]
                    break
                skipped.append(item)
            for item in skipped:
                heapq.heappush(de_heap, item)
            if de is None:
                break
            _, pe = heapq.heappop(pe_heap)
            out.append(s.commit(r, pe, de, "pe", 0.0))
            heapq.heappush(pe_heap, (s.tok[pe], pe))
            heapq.heappush(de_heap, (s.tok[de], de))
        return out


@POLICIES.register("round_robin")
class RoundRobinPolicy(InterEnginePolicy):
    """DualPath without scheduling: PEs and DEs in turn, read side alternating (or one side, or DualPath's own rule:
    the node with the shorter read queue, `read_side="shorter"`: engines in turn, the read path still chosen by load).

    The rotation is global: PEs and DEs each cycle over every engine of their role in engine-id order,
    whichever node fetched (a fetch only decides when placement happens, not where), and it carries over
    from one fetch to the next. `full_de` says what happens when the DE whose turn it is has too little free
    HBM for the head request: "skip" (default) gives it to the next DE in the rotation with room (a little
    scheduling: free HBM is looked at); "wait" stops the fetch, so the request stays queued until that DE
    has room; "queue" gives it to that DE anyway, where it waits for the HBM (the simulator's DE allocation
    queue, FIFO per DE; its reads start once allocated). "wait" and "queue" use no load information at all.
    """

    name = "round_robin"

    @dataclasses.dataclass(frozen=True)
    class Config:
        # "alternate" (pe, de, pe, ...), "pe", "de", or "shorter" (the side whose node has the shorter read queue,
        # ties: PE, as DualPath reads: PAPER.md leaves open whether "w/o scheduling" keeps that rule)
        read_side: str = "alternate"
        # "skip": the next DE with room; "wait": stop until the DE in turn has room; "queue": the DE in turn,
        # room or not (it waits at the DE)
        full_de: str = "skip"

        def __post_init__(self):
            if self.read_side not in ("alternate", "pe", "de", "shorter"):
                raise ValueError(f"round_robin read_side must be alternate/pe/de/shorter, got {self.read_side!r}")
            if self.full_de not in ("skip", "wait", "queue"):
                raise ValueError(f"round_robin full_de must be skip/wait/queue, got {self.full_de!r}")

    def __init__(self, config: RoundRobinPolicy.Config | None = None):
        self.config = config or self.Config()
        self.overcommits_decode = self.config.full_de == "queue"  # (requests wait at the DE in turn)
        self._last_pe: int | None = None  # engine id of the last PE / DE given a request
        self._last_de: int | None = None
        self._next_side = 0

    def schedule(
        self, snapshot: ClusterSnapshot, queue: Sequence[PendingRequest], fetching_node: int | None = None
    ) -> list[Assignment]:
        _check_unique(queue)
        _fetch_role(snapshot, fetching_node)  # validated only: the rotation ignores who fetched
        s = _Scratch(snapshot, None)
        pes = s.pes
        des = sorted(e for g in s.de_groups.values() for e in g)  # engine-id order across DE groups
        out = []
        if not pes or not des:
            return out
        tries = 1 if self.config.full_de == "wait" else len(des)
        anyway = self.config.full_de == "queue"
        for r in queue:
            start = _next_after(des, self._last_de)
            de = None
            for k in range(tries):
                cand = des[(start + k) % len(des)]
                if anyway or s.free[cand] >= r.total_tokens:
                    de = cand
                    break
            if de is None:
                break
            pe = pes[_next_after(pes, self._last_pe)]
            self._last_pe, self._last_de = pe, de
            if self.config.read_side == "alternate":
                side = "pe" if self._next_side % 2 == 0 else "de"
                self._next_side += 1
            elif self.config.read_side == "shorter":
                side = s.shorter_read_side(pe, de)
            else:
                side = self.config.read_side
            out.append(s.commit(r, pe, de, side, 1.0 if side == "de" else 0.0))
        return out


@POLICIES.register("random")
class RandomPolicy(InterEnginePolicy):
    """Uniformly random PE, DE (among those with room) and read side; seeded."""

    name = "random"

    @dataclasses.dataclass(frozen=True)
    class Config:
        seed: int = 0

        def __post_init__(self):
            # random.Random takes any hashable seed: a float, a bool or a string would silently seed something else
            if not is_int(self.seed):
                raise ValueError(f"random seed must be an int, got {describe(self.seed)}")

    def __init__(self, config: RandomPolicy.Config | None = None):
        self.config = config or self.Config()
        self._rng = random.Random(self.config.seed)

    def schedule(
        self, snapshot: ClusterSnapshot, queue: Sequence[PendingRequest], fetching_node: int | None = None
    ) -> list[Assignment]:
        _check_unique(queue)
        _fetch_role(snapshot, fetching_node)  # validated only: random ignores who fetched
        s = _Scratch(snapshot, None)
        pes, des = s.pes, s.des
        out = []
        rng = self._rng
        for r in queue:
            if not pes or not des:
                break
            de = None
            for _ in range(8):  # rejection sampling; a full scan only when DEs are nearly full
                cand = des[rng.randrange(len(des))]
                if s.free[cand] >= r.total_tokens:
                    de = cand
                    break
            if de is None:
                fits = [e for e in des if s.free[e] >= r.total_tokens]
                if not fits:
                    break
                de = rng.choice(fits)
            pe = rng.choice(pes)
            side = rng.choice(("pe", "de"))
            out.append(s.commit(r, pe, de, side, 1.0 if side == "de" else 0.0))
        return out


# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DualPathConfig:
    """α/β thresholds of Algorithm 1 and the DE slack (PAPER.md "Scheduler")."""

    alpha_tokens: int = 0  # α: tokens one node reads in 3 s (0: derive from the paper's DS 660B on H800)
    beta_tokens: int = 0  # β: prompt tokens one GPU processes in 5 s (0: derive likewise)
    z_slack: float = 1.05  # DE phase 2: Z = z_slack * (sum_R len_r + sum_e tok_e) / |E|
    block_size: int = 64  # split policy: DE-side share rounded to whole blocks

    def __post_init__(self):
        # `not x >= ...` refuses NaN too (NaN β would silently place nothing, NaN Z would ignore seq_e)
        a, b = self.alpha_tokens, self.beta_tokens
        if (is_real(a) and not a >= 0) or (is_real(b) and not b >= 0):
            raise ValueError(f"alpha/beta must be >= 0, got {a!r}/{b!r}")
        if not (is_real(self.z_slack) and 1.0 <= self.z_slack < math.inf):
            raise ValueError(f"z_slack must be >= 1 and finite, got {describe(self.z_slack)}")
        if is_real(self.block_size) and not self.block_size >= 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size!r}")
        # token counts are ints: True (α = 1) or 2.5 (DE shares in 2.5-token "blocks") are mistakes
        for name in ("alpha_tokens", "beta_tokens", "block_size"):
            if not is_int(getattr(self, name)):
                raise ValueError(f"{name} must be an int (not a bool or float), got {describe(getattr(self, name))}")
        if self.alpha_tokens == 0 or self.beta_tokens == 0:
            d = _paper_default()
            object.__setattr__(self, "alpha_tokens", self.alpha_tokens or d.alpha_tokens)
            object.__setattr__(self, "beta_tokens", self.beta_tokens or d.beta_tokens)

    @classmethod
    def from_cost_model(
        cls,
        cost_model: CostModel,
        context: int = PROFILE_CONTEXT,
        append: int = PROFILE_APPEND,
        read_window_s: float = READ_WINDOW_S,
        compute_window_s: float = COMPUTE_WINDOW_S,
        **kwargs,
    ) -> DualPathConfig:
        """α = read_window_s · SNIC bytes/s / KV bytes per token; β = compute_window_s · prompt tokens/s
        one PE sustains on turns of (context, append) (the "profiled" values of the paper)."""
        # else α or β would silently become 1 token (inf: a bare "cannot convert float infinity to integer")
        # (a bool was taken as a window of 1 s; a string was a bare "'<' not supported" TypeError)
        if not all(is_real(w) and 0 < w < math.inf for w in (read_window_s, compute_window_s)):
            raise ValueError(
                f"read_window_s and compute_window_s must be > 0 and finite numbers, got {describe(read_window_s)}/"
                f"{describe(compute_window_s)}"
            )
        alpha = int(read_window_s * cost_model.read_tokens_per_s())
        beta = int(compute_window_s * cost_model.prefill_tokens_per_s(context, append))
        return cls(alpha_tokens=max(alpha, 1), beta_tokens=max(beta, 1), **kwargs)


_PAPER_DEFAULT: DualPathConfig | None = None


def _paper_default() -> DualPathConfig:
    """α/β of the paper's main setup (DS 660B on H800), computed once."""
    global _PAPER_DEFAULT
    if _PAPER_DEFAULT is None:
        _PAPER_DEFAULT = DualPathConfig.from_cost_model(CostModel("ds660b", "h800"))
    return _PAPER_DEFAULT


@POLICIES.register("dualpath")
class DualPathPolicy(InterEnginePolicy):
    """DualPath's scheduler: Algorithm 1 for the PE, two-phase DE choice, read from the shorter queue.

    PE (Algorithm 1): engines with tok_e > β get nothing; prefer engines whose node has read_q ≤ α
    (lowest tok_e), else read_q > α (lowest tok_e), else stop the fetch. On a PE group's fetch the
    candidates are that group's PEs; otherwise every PE.
    DE phase 1: each request goes to the DE group with the smallest Σ tok_e among ALL DE groups (a heap
    over groups), also on a DE group's fetch: the fetching group is not favoured.
    DE phase 2 (in the group): R = the group's queue prefix fitting its free HBM, Z = slack·(Σ_R len_r +
    Σ_e tok_e)/|E|; among DEs with room prefer tok_e + len_r ≤ Z with the fewest seq_e, else the lowest
    tok_e; none with room: stop. Read side: the node with the shorter read queue (ties: PE side).
    """

    name = "dualpath"
    Config = DualPathConfig

    def __init__(self, config: DualPathConfig | None = None):
        self.config = config or DualPathConfig()
        self._closed_last = False  # the last fetch's phase 1 closed a group's R (only picks the faster loop)

    def _c_side_mode(self) -> int | None:
        """The read-side rule as `_dualpath.Placement.place` numbers it (0: shorter read queue, 1: DE, 2: PE),
        or None when a subclass changed a step of the loop (then the Python loop runs)."""
        cls = type(self)
        if (cls._node_min, cls._choose_pe, cls._choose_de) != (
            DualPathPolicy._node_min,
            DualPathPolicy._choose_pe,
            DualPathPolicy._choose_de,
        ):
            return None
        return _C_SIDE_MODES.get(cls._read_side)

    # -- PE: Algorithm 1 --
    def _node_min(self, s: _Scratch, engines: Sequence[int]) -> tuple[int, int] | None:
        """(tok, id) of the node's least-loaded PE with tok <= β, or None."""
        beta = self.config.beta_tokens
        if _dualpath_c is not None:
            try:
                return _dualpath_c.node_min(s.tok, engines, beta)  # this loop in C
            except (OverflowError, TypeError):  # values beyond int64 or not ints: the loop below
                pass
        best = None
        for e in engines:
            t = s.tok[e]
            if t <= beta and (best is None or (t, e) < best):
                best = (t, e)
        return best

    def _choose_pe(self, s: _Scratch, node_min: dict[int, tuple[int, int] | None]) -> int | None:
        """Algorithm 1 over per-node minima (O(PE nodes) per request): lowest tok_e on nodes with
        read_q <= α, else lowest tok_e on the other nodes; engines above β were dropped in _node_min."""
        alpha = self.config.alpha_tokens
        if _dualpath_c is not None:
            try:
                return _dualpath_c.choose_pe(node_min, s.read_q, alpha)  # this loop in C
            except (OverflowError, TypeError):  # values beyond int64 or not ints: the loop below
                pass
        best_short = best_long = None
        for node, m in node_min.items():
            if m is None:
                continue
            if s.read_q[node] <= alpha:
                if best_short is None or m < best_short:
                    best_short = m
            elif best_long is None or m < best_long:
                best_long = m
        best = best_short if best_short is not None else best_long
        return None if best is None else best[1]

    # -- DE phase 2 --
    @staticmethod
    def _choose_de(s: _Scratch, r: PendingRequest, group: Sequence[int], z: float) -> int | None:
        need = r.total_tokens
        if _dualpath_c is not None:
            try:
                return _dualpath_c.choose_de(s.free, s.tok, s.seq, group, need, z)  # this loop in C
            except (OverflowError, TypeError):  # values beyond 2**53 or not ints: the loop below
                pass
        best_in = best_out = None
        key_in = key_out = None
        for e in group:
            if s.free[e] < need:
                continue
            t = s.tok[e]
            if t + need <= z:
                k = (s.seq[e], t)
                if key_in is None or k < key_in:
                    best_in, key_in = e, k
            elif key_out is None or t < key_out:
                best_out, key_out = e, t
        return best_in if best_in is not None else best_out

    def _read_side(self, s: _Scratch, r: PendingRequest, pe: int, de: int) -> tuple[ReadSide, float]:
        side = s.shorter_read_side(pe, de)
        return side, 1.0 if side == "de" else 0.0

    @staticmethod
    def _phase1_ints(de_groups, group_tok, group_free, lens, try_fast: bool):
        """DE phase 1 on packed ints: the heap holds (load << S) | rank(gid), which order exactly as the
        (load, gid) tuples. Returns (r_len, keys, heap, gids, shift, closed): keys[i] is the packed key that
        request i was given (gid = gids[key & mask]); heap is the state after the last key, so later
        requests' groups follow lazily; closed: some group's R closed in the window. None for non-int loads.

        `try_fast` first runs a loop that only assigns: when no group's R closes inside the window (the
        usual case while DE HBM is plentiful), R of a group is all it got (Σ len_r = final - initial
        load), valid when that fits its free HBM for every group (len_r >= 0, so no prefix overflowed).
        Otherwise the loop that closes groups runs (the paper's phase 1, exactly as the tuple loop).
        Both loops run in C where it is built (schedulers/_dualpath.pyx), the same loops in Python else."""
        gids = sorted(de_groups)
        shift = len(gids).bit_length()
        try:
            start = [(group_tok[g] << shift) | i for i, g in enumerate(gids)]
        except TypeError:  # float loads: the tuple path
            return None
        heapq.heapify(start)
        fast = try_fast and min(lens, default=0) >= 0
        if _dualpath_c is not None:
            try:  # the loops below in C: same keys, same heap (array order too)
                if fast:
                    heap = start[:]
                    keys = _dualpath_c.heapreplace_run(heap, lens, shift)
                    r_len = _fast_r_len(heap, gids, shift, group_tok, group_free)
                    if r_len is not None:
                        return r_len, keys, heap, gids, shift, False
                rl, keys, n_open = _dualpath_c.phase1_closing(start, lens, shift, [group_free[g] for g in gids])
                return dict(zip(gids, rl, strict=True)), keys, start, gids, shift, n_open < len(gids)
            except (OverflowError, TypeError):  # beyond int64 or not ints (`start` left as it was): Python
                pass
        mask = (1 << shift) - 1
        try:
            steps = list(map(operator.lshift, lens, itertools.repeat(shift, len(lens))))
        except TypeError:  # float lengths: the tuple path
            return None
        heapreplace = heapq.heapreplace
        if fast:
            heap = start[:]
            keys = []
            append = keys.append
            for step in steps:
                append(heapreplace(heap, heap[0] + step))  # returns the key it replaced: (load, rank)
            r_len = _fast_r_len(heap, gids, shift, group_tok, group_free)
            if r_len is not None:
                return r_len, keys, heap, gids, shift, False
        heap = start
        free = [group_free[g] for g in gids]
        rl = [0] * len(gids)
        is_open = [True] * len(gids)
        n_open = len(gids)
        keys = []
        append = keys.append
        for ln, step in zip(lens, steps, strict=True):
            k = heap[0]
            heapreplace(heap, k + step)
            append(k)
            i = k & mask
            if is_open[i]:
                x = rl[i] + ln
                if x <= free[i]:
                    rl[i] = x
                else:
                    is_open[i] = False
                    n_open -= 1
                    if not n_open:
                        break
        return dict(zip(gids, rl, strict=True)), keys, heap, gids, shift, n_open < len(gids)

    def _schedule_c(self, snapshot: ClusterSnapshot, queue: Sequence[PendingRequest], pe_node: int | None, mode: int):
        """The whole fetch in C (schedulers/_dualpath.pyx: `Placement`, `phase1`, `Placement.place`) with no
        `_Scratch`: the same Assignments as the loops of `schedule`. Returns (assignments, True); None where C
        refused a value (beyond int64, not an int) before `place` ran, (None, False) where `place` refused one:
        the caller then runs `schedule`'s loops on the same snapshot (nothing the caller sees was changed)."""
        topo = _topology(snapshot)
        if pe_node is None:
            pe_nodes, pe_states = topo.pes_of_node, topo.pe_states_of_node
        else:
            pes = topo.pes_of_node.get(pe_node)
            pe_nodes, pe_states = ({pe_node: pes}, {pe_node: topo.pe_states_of_node[pe_node]}) if pes else ({}, {})
        if not pe_nodes or not topo.de_groups:
            return [], True
        config = self.config
        try:
            placement = _dualpath_c.Placement(pe_nodes, pe_states, config.beta_tokens)
        except (OverflowError, TypeError):
            return None
        if not queue or not placement.any_pe():
            return [], True  # no PE may take work: nothing is placed, phase 1 is skipped
        lens = _lens(queue)
        try:
            r_len, group_tok, keys, pheap, shift, closed = _dualpath_c.phase1(
                topo.gids, snapshot.nodes, snapshot.engine_set_key is not None, topo.group_states, lens,
                not self._closed_last,
            )  # fmt: skip
        except (OverflowError, TypeError):
            return None
        try:
            out = placement.place(
                queue, lens, keys, pheap, shift, topo.gids, r_len, group_tok, topo.de_groups, topo.state_of,
                topo.node_of, snapshot.nodes, config.alpha_tokens, config.z_slack, mode, Assignment,
            )  # fmt: skip
        except (OverflowError, TypeError):
            return None, False
        self._closed_last = closed
        return out, True

    def schedule(
        self, snapshot: ClusterSnapshot, queue: Sequence[PendingRequest], fetching_node: int | None = None
    ) -> list[Assignment]:
        _check_unique(queue)
        mode = self._c_side_mode() if _dualpath_c is not None else None  # None: the loop runs in Python
        pe_node = _pe_scope(snapshot, fetching_node)
        if mode is not None:
            done = self._schedule_c(snapshot, queue, pe_node, mode)
            if done is not None:
                out, in_c = done
                if in_c:
                    return out
                mode = None  # `place` refused a value: the Python loop (C refuses it again)
        s = _Scratch(snapshot, pe_node, group_sums=True, pe_loads=mode is None)
        if not s.pes or not s.de_groups:
            return []
        pe_nodes = s.pe_nodes
        node_min = placement = None
        if mode is not None:
            try:  # the candidate PEs' loads and per-node minima in C (schedulers/_dualpath.pyx)
                placement = _dualpath_c.Placement(pe_nodes, s.pe_states_of_node, self.config.beta_tokens)
            except (OverflowError, TypeError):  # loads C cannot hold exactly: the Python loop
                pass
        if placement is not None:
            if not queue or not placement.any_pe():
                return []  # no PE may take work (tok_e > β everywhere): nothing is placed, phase 1 is skipped
        else:
            node_min = {n: self._node_min(s, engs) for n, engs in pe_nodes.items()}
            if not queue or self._choose_pe(s, node_min) is None:
                return []  # no PE may take work: nothing is placed, so phase 1 is skipped (same result)

        # Phase 1 (lazy): group of each request by the smallest Σ tok_e, and each group's R and Z.
        de_groups = s.de_groups
        group_tok, group_free = s.group_sums()
        lens = _lens(queue)
        ints = self._phase1_ints(de_groups, group_tok, group_free, lens, not self._closed_last)
        if ints is not None:
            r_len, group_of, pheap, gids, shift, self._closed_last = ints
            mask = (1 << shift) - 1  # group_of holds packed keys: gid = gids[key & mask]

            def assign_group(i: int) -> None:  # after every group's R closed: groups of the rest, lazily
                k = pheap[0]
                heapq.heapreplace(pheap, k + (lens[i] << shift))
                group_of.append(k)

        else:  # non-int loads: the same loop on (load, gid) tuples
            mask = None  # group_of holds gids
            heap = [(t, gid) for gid, t in group_tok.items()]
            heapq.heapify(heap)
            r_len = dict.fromkeys(de_groups, 0)  # Σ_{r∈R} len_r so far
            open_groups = set(de_groups)  # groups whose R is still growing
            group_of = []
            heapreplace = heapq.heapreplace
            n = len(queue)
            i = 0
            while i < n and open_groups:
                # The smallest (load, gid) is unique (gids are), so heapreplace pops what pop+push would.
                ln = lens[i]
                load, gid = heap[0]
                heapreplace(heap, (load + ln, gid))
                group_of.append(gid)
                if gid in open_groups:
                    rl = r_len[gid] + ln
                    if rl <= group_free[gid]:
                        r_len[gid] = rl
                    else:
                        open_groups.discard(gid)
                i += 1

            def assign_group(i: int) -> None:  # after every group's R closed: groups of the rest, lazily
                load, gid = heap[0]
                heapq.heapreplace(heap, (load + lens[i], gid))
                group_of.append(gid)

        slack = self.config.z_slack
        if placement is not None and mask is not None:
            try:  # the loop below in C: the same Assignments
                return placement.place(
                    queue, lens, group_of, pheap, shift, gids, r_len, group_tok, de_groups, s.free.state_of,
                    s.node_of, snapshot.nodes, self.config.alpha_tokens, slack, mode, Assignment,
                )  # fmt: skip
            except (OverflowError, TypeError):  # loads C cannot hold exactly: the loop below (the scratch is
                pass  # untouched; group_of/pheap may have grown, by the keys assign_group would give)
        if node_min is None:
            node_min = {n: self._node_min(s, engs) for n, engs in pe_nodes.items()}
        if not isinstance(group_of, list):  # the C loops' array('q'): Python ints from here (they may grow)
            group_of = list(group_of)  # (assign_group sees this list: it reads the variable, not a copy)
        z = {}  # Z per group, for the groups this fetch reaches

        out = []
        for k, r in enumerate(queue):
            if k >= len(group_of):
                assign_group(k)
            pe = self._choose_pe(s, node_min)
            if pe is None:
                break
            gid = group_of[k] if mask is None else gids[group_of[k] & mask]
            zg = z.get(gid)
            if zg is None:  # the fetch's first placement in this group: none of its DEs was changed yet
                zg = z[gid] = slack * (r_len[gid] + group_tok[gid]) / len(de_groups[gid])
                group = de_groups[gid]
                s.free.fill(group)  # phase 2 reads these for every DE of the group: one bulk read each
                s.tok.fill(group)
                s.seq.fill(group)
            de = self._choose_de(s, r, de_groups[gid], zg)
            if de is None:
                break
            side, frac = self._read_side(s, r, pe, de)
            out.append(s.commit(r, pe, de, side, frac))
            pe_node = s.node_of[pe]
            node_min[pe_node] = self._node_min(s, pe_nodes[pe_node])
        return out


@POLICIES.register("de_only")
class DeOnlyPolicy(DualPathPolicy):
    """DualPath's PE/DE choice, every read on the DE side (ablation)."""

    name = "de_only"

    def _read_side(self, s: _Scratch, r: PendingRequest, pe: int, de: int) -> tuple[ReadSide, float]:
        return "de", 1.0


@POLICIES.register("pe_only")
class PeOnlyPolicy(DualPathPolicy):
    """DualPath's PE/DE choice, every read on the PE side (ablation: scheduler without the DE path)."""

    name = "pe_only"

    def _read_side(self, s: _Scratch, r: PendingRequest, pe: int, de: int) -> tuple[ReadSide, float]:
        return "pe", 0.0


@POLICIES.register("split")
class SplitPolicy(DualPathPolicy):
    """Beyond the paper: split one request's hit blocks across both sides so both read queues drain at
    the same time (equal SNIC bandwidth per node): the DE side reads x tokens with
    q_pe + H − x = q_de + x, i.e. x = (q_pe + H − q_de)/2, clipped to [0, H] and rounded to whole blocks.
    """

    name = "split"

    def _read_side(self, s: _Scratch, r: PendingRequest, pe: int, de: int) -> tuple[ReadSide, float]:
        h = r.hit_tokens
        if h <= 0:
            return super()._read_side(s, r, pe, de)
        q_pe, q_de = s.read_q[s.node_of[pe]], s.read_q[s.node_of[de]]
        bs = self.config.block_size
        blocks = -(-h // bs)
        x_blocks = round((q_pe + h - q_de) / 2 / bs)
        x_blocks = min(max(x_blocks, 0), blocks)
        if x_blocks == 0:
            return "pe", 0.0
        if x_blocks == blocks:
            return "de", 1.0
        return "split", min(1.0, x_blocks * bs / h)


# The read-side rules `_dualpath.Placement.place` runs in C (SplitPolicy's split fractions run in Python).
_C_SIDE_MODES = {DualPathPolicy._read_side: 0, DeOnlyPolicy._read_side: 1, PeOnlyPolicy._read_side: 2}

__all__ = [
    "BasicPolicy",
    "DeOnlyPolicy",
    "DualPathConfig",
    "DualPathPolicy",
    "PeOnlyPolicy",
    "RandomPolicy",
    "RoundRobinPolicy",
    "SplitPolicy",
]
