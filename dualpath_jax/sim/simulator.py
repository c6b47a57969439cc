"""Discrete-event cluster simulator: PE/DE engines, storage and compute networks, the registered policies.

Time advances through a heap of events (time, seq, 0, callback, arg) (`heap.TimeHeap`, in C when built).
Engines and requests are plain Python objects with __slots__ (extension types with C fields where setup.py
compiled this module with the types of simulator.pxd; runner.py loads it through dualpath_jax/compiled.py,
so DUALPATH_PURE_PYTHON=1 runs this source as Python, with the same results); every transfer is a flow on
`network.FlowNetwork`, so the storage NICs (SNIC, shared by PE reads, DE reads and DE write-backs), the
per-GPU compute NICs (CNIC, KV in the low class under model collectives in the high class) and host DRAM
share bandwidth max-min fairly.

Per request (DESIGN.md "Data paths"):
  arrival -> global queue -> a group's periodic fetch runs the policy -> (PE, DE, read side)
  -> the DE node's host buffer: room for the whole prompt KV (the DE-side hit it reads, the PE-side hit and
     the new KV the PE sends), FIFO per DE node, taken before any read starts, held until the H2D into DE HBM
  -> storage read of the hit KV into the reading node's host buffer (SNIC + DRAM; FIFO per node, gated by
     a per-node read concurrency and, on the PE node, by buffer space)
  -> PE batch (intra-engine batcher from the registry):
       layerwise: per layer the Layer Blocks go to PE HBM (PE side: DRAM->PE CNIC; DE side: DE DRAM->DE
       CNIC->PE CNIC) while the previous layer computes; the outputs go PE CNIC->DE CNIC->DE DRAM.
       The per-layer pipeline is solved in closed form per batch: the batch ends when its compute
       (time from the cost model, plus one layer of pipeline fill) and all its KV flows are done, i.e.
       max(compute + compute/L, transfers) (the flows start with the batch). Per-layer events would be L (61)
       times more events for a difference below one layer's time.
       basic (not layerwise): the whole prompt KV must be in PE HBM before prefill: PE HBM is reserved
       before the read starts, the hit KV is copied DRAM->CNIC->HBM, then the batch computes, then the
       KV (hit + miss) goes to the DE.
  -> DE: H2D of the prompt KV (DE DRAM->DE CNIC), join the continuous decode batch
  -> decode: events only when the batch changes (join/leave); the DE write-back of the filled blocks is
     a paced flow over DE CNIC -> DE DRAM -> DE SNIC.
  -> the agent's next turn arrives when decode and write-back are done (+ the turn gap).

A bounded KV store (`cluster.store_capacity_gb`; None: unbounded, every earlier turn's KV can hit): one store-wide
LRU of trajectories, each holding a block range [lo, hi) of its context; a turn hits min(its shape's hit, hi) where
lo is 0 (`_store_lookup`), and its decode start writes its new blocks (`_store_write`), evicting the least recently
used trajectories whole until the store fits. With shared prefix hits, a trace's hash blocks go with the trajectories
that stored them (`_store_prompt_blocks`): a hash hits while one of them is in the store.
"""

from __future__ import annotations

import gc
import heapq
import logging
import math
import time as _time
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence

from dualpath_jax import compiled
from dualpath_jax.metrics import LinkBytes, TurnTable
from dualpath_jax.sim.config import GB, SimConfig, SimConfigError
from dualpath_jax.sim.heap import TimeHeap
from dualpath_jax.workloads.types import Trajectory, stored_kv_tokens
from schedulers.api import (
    Assignment,
    ClusterSnapshot,
    EngineState,
    NodeState,
    PendingRequest,
    PrefillWork,
    QueueWindow,
)

log = logging.getLogger(__name__)


class Request:
    """One turn in flight."""

    __slots__ = (
        "rid",
        "traj",
        "turn",
        "pending",
        "prompt",
        "hit",
        "miss",
        "gen",
        "pe",
        "de",
        "frac",
        "hit_pe",
        "hit_de",
        "reads_left",
        "cached",
        "remaining",
        "wb_done",
        "wb",
        "decode_done",
        "target",
        "vjoin",
        "work",
    )

    def __init__(self, rid: int, traj: Trajectory, turn: int, pending: PendingRequest):
        self.rid = rid  # (its turn's row in Simulator.records)
        self.traj = traj
        self.turn = turn
        self.pending = pending
        self.prompt = pending.prompt_tokens
        self.hit = pending.hit_tokens
        self.miss = pending.miss_tokens
        self.gen = pending.gen_tokens
        self.pe = self.de = None
        self.frac = 0.0
        self.hit_pe = self.hit_de = 0  # hit tokens read on the PE / DE side
        self.reads_left = 0
        self.cached = self.hit
        self.remaining = self.miss
        self.wb_done = True
        self.wb = None  # its paced write-back while it runs: a reservation (seq, path, rate, end) or a Flow
        self.decode_done = False
        self.target = 0.0
        self.vjoin = 0.0
        self.work = None  # PrefillWork(rid, cached, remaining) while queued in its PE (rebuilt after a chunk)


class Node:
    __slots__ = (
        "nid",
        "role",
        "snic",
        "dram",
        "buffer_free",
        "buffer_bytes",
        "read_queue",
        "reads_active",
        "buf_queue",
        "buf_held",
        "state",
        "engines",
    )

    def __init__(self, nid: int, role: str, snic: int, dram: int, buffer_bytes: float, state: NodeState):
        self.nid = nid
        self.role = role
        self.snic = snic
        self.dram = dram
        self.buffer_free = buffer_bytes
        self.buffer_bytes = buffer_bytes  # all of it
        self.read_queue: deque = deque()  # (request, tokens, side)
        self.reads_active = 0
        # DE nodes: requests waiting for room for their whole prompt KV (FIFO); how many hold room in this node's
        # buffer (DE nodes: for their prompt KV; PE nodes: for their PE-side hit, from its read to the prefill)
        self.buf_queue: deque = deque()
        self.buf_held = 0
        self.state = state
        self.engines: list = []


class PrefillEngine:
    __slots__ = ("eid", "node", "cnic", "cnic_in", "queue", "busy", "hbm_free", "hbm_held", "admit_queue", "state")

    def __init__(self, eid: int, node: Node, cnic: int, cnic_in: int, hbm_bytes: float, state: EngineState):
        self.eid = eid
        self.node = node
        self.cnic = cnic  # outbound CNIC link (the only one when not full duplex)
        self.cnic_in = cnic_in  # inbound CNIC link
        self.queue: list[Request] = []  # requests whose hit KV is readable, FIFO (intra-engine queue)
        self.busy = False
        self.hbm_free = hbm_bytes  # basic mode: HBM for whole-prompt KV
        self.hbm_held = 0  # basic mode: requests holding some of it (admitted, KV not yet sent to the DE)
        self.admit_queue: deque = deque()  # basic mode: waiting for HBM before their read may start
        self.state = state


class DecodeGroup:
    """DEs that decode in lockstep: the DEs of one EP group of a MoE model (`cluster.decode_lockstep`). Every
    decode step runs the MoE layers' all-to-all over the whole group, so each step takes its slowest member's
    time and all members generate at one rate: one virtual clock `v` (tokens generated per running request)
    and one finish heap per group. A DE of a dense model (DP only), or any DE with lockstep off, is a group
    of one (then exactly the old per-DE clock)."""

    __slots__ = ("members", "v", "tv", "step", "version", "finish_heap", "second")

    def __init__(self):
        self.members: list[DecodeEngine] = []
        self.v = 0.0  # tokens generated per running request since the group started (virtual clock)
        self.tv = 0.0
        self.step = 0.0  # current step time (s/token): the slowest member's
        self.version = 0
        self.finish_heap: list = []  # (target v, rid, DE)
        # (v at which a request's first decode step ends, its record) of requests whose second token is not out
        # yet, in join order: v only grows, so the targets are sorted and a deque serves (no heap)
        self.second: deque = deque()


class DecodeEngine:
    __slots__ = (
        "eid",
        "node",
        "cnic",
        "cnic_in",
        "active",
        "group",
        "step",
        "sum_prompt",
        "sum_vjoin",
        "state",
        "wb",
        "hbm_free",
        "alloc_queue",
        "free_tokens",
        "n_seqs",
    )

    def __init__(self, eid: int, node: Node, cnic: int, cnic_in: int, state: EngineState, group: DecodeGroup):
        self.eid = eid
        self.node = node
        self.cnic = cnic  # outbound CNIC link (the only one when not full duplex)
        self.cnic_in = cnic_in  # inbound CNIC link
        self.active: dict[int, Request] = {}
        self.group = group  # its lockstep group (of one unless decode_lockstep)
        group.members.append(self)
        self.step = 0.0  # the step time of this DE's own batch (s/token); 0 when idle
        self.sum_prompt = 0
        self.sum_vjoin = 0.0
        self.state = state
        self.wb = None  # (write-back path, its smallest link capacity), set at its first write-back
        # KV tokens of HBM not held by a request. A policy that places only where there is room never waits
        # here; one that places regardless (round_robin full_de="queue") leaves a request in `alloc_queue`
        # (FIFO) until the tokens of the one at its head are free: its allocation wait, before its reads.
        self.hbm_free = state.free_hbm_tokens
        self.alloc_queue: deque = deque()
        # KV tokens not placed on it (the policy's room; `state.free_hbm_tokens` shows it, or no room while every
        # slot of `cluster.de_max_seqs` is taken), and the requests holding its HBM (allocated, decode not done)
        self.free_tokens = state.free_hbm_tokens
        self.n_seqs = 0


class _Batch:
    __slots__ = ("pe", "items", "left", "reqs", "t0")

    def __init__(self, pe, items, reqs, t0):
        self.pe = pe
        self.items = items
        self.reqs = reqs
        self.left = 0
        self.t0 = t0


class Simulator:
    """Simulates one run. `run()` returns (turn records: `records`, a metrics.TurnTable, link byte samples, stats
    dict)."""

    def __init__(
        self,
        cfg: SimConfig,
        trajectories: Sequence[Trajectory],
        policy,
        batcher,
        cost_model,
        kv_bytes_per_token: float,
        n_layers: int,
        arrival_model=None,
        de_group_engines: int = 1,
    ):
        self.cfg = cfg
        c = cfg.cluster
        self.c = c
        self.policy = policy
        self.batcher = batcher
        self.cost = cost_model
        self.decode_time = _DecodeTime(cost_model, c.de_time_scale)  # its decode_step_time * de_time_scale
        self.b = float(kv_bytes_per_token)
        self.L = int(n_layers)
        self.trajectories = list(trajectories)
        self.arrival_model = arrival_model  # workloads.arrivals model: when turn i+1 is ready (None: + gap)
        if int(de_group_engines) < 1:
            raise ValueError(f"de_group_engines must be >= 1, got {de_group_engines}")
        self.de_group_engines = int(de_group_engines)  # DEs per lockstep group (consecutive engine ids)
        # The host buffer of each DE node, where it differs from the PE nodes' (cluster.de_host_buffer_gb: the
        # runtime sizes them apart, experiments.bench_runtime's copy); None: every node cluster.host_buffer_gb
        self.de_buffer_bytes = None if c.de_host_buffer_gb is None else float(c.de_host_buffer_gb) * GB
        self._shapes: dict[int, list] = {}  # trajectory id -> [(prompt, hit, gen)] per turn
        # Prefix hits across trajectories (`workload.shared_prefix_hits`): the block hashes (`Turn.block_hashes`, a
        # trace's) of every prompt prefilled so far, whatever its trajectory; a turn then hits the longest run of
        # its leading blocks found here, where that is more than its own trajectory's context
        # (only where some trajectory has hashes: synthetic runs pay nothing per turn)
        self.shared_hits = bool(cfg.workload.shared_prefix_hits) and any(
            [any([t.block_hashes is not None for t in traj.turns[:1]]) for traj in self.trajectories]
        )
        self._stored: set = set()
        # A bounded KV store (cluster.store_capacity_gb): trajectory id -> (lo, hi), the block range of its context
        # the store holds (tokens, whole blocks), least recently used first. A prefix-chained store hits a prompt's
        # leading blocks only, so a trajectory hits hi where lo is 0 and nothing otherwise; under block LRU its
        # prefix blocks are its oldest, so losing its first block loses its whole hit: eviction takes whole
        # trajectories from the LRU end. None: unbounded (no per-turn work).
        self.bounded = c.store_capacity_gb is not None
        self._store = OrderedDict()
        self.store_cap_tokens = 0
        self.store_held = 0  # tokens held by all trajectories
        self.store_evicted_tokens = 0  # tokens that left the store (evicted, or written by a turn too large for it)
        self.store_evicted_entries = 0  # trajectories evicted (each its whole range)
        self.store_lost_lookups = 0  # turns that hit less than their shape's hit (their own context's blocks)
        self.store_lost_tokens = 0  # ... and the hit tokens they lost
        # With shared prefix hits: hash -> how many trajectories hold it, and each trajectory's hashes (in place of
        # _stored: a hash block goes with the last trajectory that holds it)
        self._store_refs: dict = {}
        self._store_hashes: dict = {}
        if self.bounded:
            self.store_cap_tokens = _room_tokens(c.store_capacity_gb, self.b, "store_capacity_gb")
        self.now = 0.0
        self.events = TimeHeap()  # (time, seq, 0, callback, arg), earliest first (compiled when built)
        self._seq = 0
        self.n_events = 0
        # network.py, compiled when built (dualpath_jax/compiled.py; DUALPATH_PURE_PYTHON=1: its Python source)
        self.net = compiled.load("dualpath_jax.sim.network").FlowNetwork(bucket_s=c.bucket_s)
        self.net.wake = self._schedule_check
        self.net.coalesce_s = c.flow_coalesce_s
        self.net.defer = True  # one solve per instant: the event loop settles before the clock moves on
        self.queue: deque[PendingRequest] = deque()  # the global FIFO queue
        # beside it, index for index: request ids and len_r (passed to the policy as a QueueWindow); int
        # arrays, so a fetch's window of them is one memcpy (no per-object reference counting)
        self._qids = array("q")
        self._qlens = array("q")
        self.requests: dict[int, Request] = {}
        # one row per turn, in arrival order (row = request id): columns of C numbers (metrics.TurnTable, 152 B a
        # turn), not a TurnRecord object each (~590 B with its boxed fields: most of the 48P96D run's 2.5 GB peak);
        # `run` sizes it for every turn of a whole run, and a run cut by max_time grows it as turns arrive
        self.records = TurnTable()
        self.turns_done = 0  # turns whose decode finished (for progress reports)
        self._next_rid = 0
        self.fetch_running = False
        self._fetch_rr = 0
        # when the fetch chain, stopped on an empty queue, would have fetched next (node _fetch_rr)
        self._next_tick = 0.0
        self.n_fetches = 0
        self._idle_fetches = 0  # fetches in a row that placed nothing with no other event pending (IDLE_FETCHES)
        self._ran = False  # run() once: a second call would start every trajectory again
        self._build()
        self._check_turns_fit()

    # ---- construction ---------------------------------------------------------------------------------
    def _build(self) -> None:
        c = self.c
        net = self.net
        self.storage_link = net.add_link("storage", c.storage_gbps * GB) if c.storage_gbps > 0 else None
        engines: dict[int, EngineState] = {}
        nodes: dict[int, NodeState] = {}
        self.nodes: list[Node] = []
        self.pes: dict[int, PrefillEngine] = {}
        self.des: dict[int, DecodeEngine] = {}
        eid = 0
        de_hbm_tokens = _room_tokens(c.de_hbm_kv_gb, self.b, "de_hbm_kv_gb")
        self.de_groups: list[DecodeGroup] = []
        for nid in range(c.prefill_nodes + c.decode_nodes):
            role = "prefill" if nid < c.prefill_nodes else "decode"
            snic = net.add_link(f"snic/node{nid}", c.snic_gbps * GB * c.storage_efficiency)
            dram = net.add_link(f"dram/node{nid}", c.dram_gbps * GB)
            # engine_tok / engine_free_hbm_tokens: kept equal to the sums over the node's engines (policies
            # read the DE group sums from them instead of summing 8 engines per group per fetch)
            ns = NodeState(node_id=nid, role=role, engine_tok=0, engine_free_hbm_tokens=0)
            nodes[nid] = ns
            buffer_bytes = c.host_buffer_gb * GB
            if role == "decode" and self.de_buffer_bytes is not None:
                buffer_bytes = self.de_buffer_bytes
            node = Node(nid, role, snic, dram, buffer_bytes, ns)
            self.nodes.append(node)
            for _ in range(c.gpus_per_node):
                if c.cnic_duplex:  # full duplex: each direction has the line rate (and its own collectives)
                    cnic = net.add_link(f"cnic/engine{eid}/out", c.cnic_gbps * GB, high_share=c.high_share)
                    cnic_in = net.add_link(f"cnic/engine{eid}/in", c.cnic_gbps * GB, high_share=c.high_share)
                else:
                    cnic = cnic_in = net.add_link(f"cnic/engine{eid}", c.cnic_gbps * GB, high_share=c.high_share)
                es = EngineState(engine_id=eid, role=role, node_id=nid)
                if role == "prefill":
                    es.free_hbm_tokens = _room_tokens(c.pe_hbm_kv_gb, self.b, "pe_hbm_kv_gb")
                    eng = PrefillEngine(eid, node, cnic, cnic_in, c.pe_hbm_kv_gb * GB, es)
                    self.pes[eid] = eng
                else:
                    es.free_hbm_tokens = de_hbm_tokens
                    if len(self.des) % self.de_group_engines == 0:
                        de_group = DecodeGroup()
                        self.de_groups.append(de_group)
                    eng = DecodeEngine(eid, node, cnic, cnic_in, es, de_group)
                    self.des[eid] = eng
                engines[eid] = es
                ns.engine_free_hbm_tokens += es.free_hbm_tokens
                node.engines.append(eng)
                eid += 1
        # One engine set for the whole run (engine_set_key: policies need not re-check it every fetch).
        self.snapshot = ClusterSnapshot(now=0.0, engines=engines, nodes=nodes, engine_set_key=0)
        # Every flow through a node's DRAM also crosses that node's SNIC or one of its CNICs, so when
        # M >= SNIC + g * CNIC the DRAM can never be a bottleneck and is left out of the paths (smaller
        # components, same rates). The paper's hardware: 500 >= 27.5 + 8 * 50.
        # With full-duplex CNICs the strict bound would be SNIC + 2g*CNIC; CNICs run far below line rate
        # on average, so DRAM is still left out (a modelling choice, not a proof, in that case).
        if c.fetch_scope not in ("node", "global"):
            raise ValueError(f"config.cluster.fetch_scope must be 'node' or 'global', got {c.fetch_scope!r}")
        self.read_cap = c.read_stream_gbps * GB if c.read_stream_gbps > 0 else math.inf
        # Each node fetches once per fetch_interval_s, consecutive nodes staggered evenly: one fetch every step
        self.fetch_step = c.fetch_interval_s / len(self.nodes)
        self.dram_binds = c.dram_gbps < c.snic_gbps * c.storage_efficiency + c.gpus_per_node * c.cnic_gbps
        # Sequences a DE holds at most (the runtime's decode slots); inf: only its HBM room limits them
        self.max_seqs = math.inf if c.de_max_seqs is None else float(c.de_max_seqs)

    def _check_turns_fit(self) -> None:
        """A turn holds its prompt + generation in one DE's HBM from placement to the end of its decode, so a
        turn larger than a whole DE could never be placed: every policy would wait for room that never comes
        and the run would never end. Refused here, before anything runs, naming the turn and the settings. So is a
        run of no turn at all (its JCT was NaN, silently)."""
        if not any([traj.turns for traj in self.trajectories]):
            raise SimConfigError(
                f"nothing to simulate: {len(self.trajectories)} trajectories given, none with a turn (a run needs at "
                "least one turn)"
            )
        ids = [traj.trajectory_id for traj in self.trajectories]
        if len(set(ids)) != len(ids):  # records, outputs and the arrival model are keyed by it
            seen: set = set()
            dup = next(i for i in ids if i in seen or seen.add(i))
            raise SimConfigError(f"trajectory id {dup} appears more than once among the {len(ids)} trajectories")
        bs = self.c.block_size
        max_time = self.fetch_step * 2.0**40  # (~3,500 years at 0.1 s: a double then resolves a fetch step exactly)
        for traj in self.trajectories:
            if not 0 <= traj.arrival_time < math.inf:  # NaN in the event heap, or an agent that never arrives
                raise SimConfigError(
                    f"trajectory {traj.trajectory_id} arrives at {traj.arrival_time} s: it must be finite and >= 0"
                )
            # Times the clock cannot step through (a trace's t = 1e308 failed inside the run with an OverflowError;
            # 1e300 ran with a JCT of 0 and NaN throughputs): the agent's arrival, its turns' offsets and gaps
            latest = traj.arrival_time + sum([t.gap_s for t in traj.turns])  # (inf past the range: refused)
            latest += max([t.arrival_offset_s or 0.0 for t in traj.turns], default=0.0)
            if not latest <= max_time:
                raise SimConfigError(
                    f"trajectory {traj.trajectory_id} ({traj.source or 'no source'}) reaches t = {latest:g} s with its "
                    f"arrival, turn offsets and gaps: past the {max_time:g} s the simulator's clock can step through "
                    f"at a fetch interval of {self.fetch_step:g} s"
                )
            if any([not t.append_tokens for t in traj.turns]):  # only then can a prompt be empty
                for i, (prompt, _, _) in enumerate(traj.turn_shapes(bs)):
                    # (a hit leaves >= 1 prompt token to prefill, `stored_hit`: only an empty prompt has none)
                    if not prompt:  # no PE batch could hold it (the batcher's empty batch, mid-run)
                        raise SimConfigError(
                            f"turn {i} of trajectory {traj.trajectory_id} has nothing to prefill: it appends no "
                            "tokens to an empty context; a turn needs at least one prompt token"
                        )
        if not self.des:
            return
        cap = _room_tokens(self.c.de_hbm_kv_gb, self.b, "de_hbm_kv_gb")
        worst_t, worst_i, worst = None, -1, 0
        for traj in self.trajectories:
            i, tokens = traj.peak_turn()
            if tokens > worst:
                worst_t, worst_i, worst = traj, i, tokens
        if worst > cap:
            over = sum([1 for traj in self.trajectories if traj.peak_turn()[1] > cap])
            raise SimConfigError(
                f"turn {worst_i} of trajectory {worst_t.trajectory_id} holds {worst:,} tokens of KV (prompt + "
                f"generation), more than a decode engine's HBM holds ({cap:,} tokens: config.cluster.de_hbm_kv_gb "
                f"= {self.c.de_hbm_kv_gb:.4g} GB at {self.b:,.0f} B/token); {over} of {len(self.trajectories)} "
                "trajectories have such a turn and could never be placed. Give the DEs more KV room "
                "(config.cluster.de_hbm_kv_gb, or a higher hbm_usable_fraction or lower de_hbm_reserve_gb when it "
                "is derived), use a shorter dataset, or cut trajectories at a context length with "
                "config.workload.max_context_tokens."
            )

    # ---- event queue ----------------------------------------------------------------------------------
    def at(self, t: float, fn, arg=None) -> None:
        self._seq += 1
        self.events.push(t, self._seq, 0, fn, arg)

    def _dram(self, node: Node) -> tuple:
        """The node's DRAM link, or () when it cannot bind (see _build)."""
        return (node.dram,) if self.dram_binds else ()

    def _schedule_check(self, t: float) -> None:
        self._seq += 1
        self.events.push(t, self._seq, 0, self._check_event, None)

    def _check_event(self, _arg) -> bool:
        """False when nothing was due (a stale check: the flow it was asked for sped up and finished earlier)."""
        net = self.net
        now = self.now
        done = net.check_due(now)
        if done:
            net.finish_flows(done, now)  # one solve for all of them
            for f in done:
                f.on_done()
            return True
        return False

    def _flow(self, path, nbytes: float, on_done, max_rate: float = math.inf) -> bool:
        """Start a flow unless it is empty; returns whether `on_done` will be called later."""
        if nbytes <= 0.0:
            return False
        self.net.start_flow(path, nbytes, self.now, on_done, max_rate)
        return True

    # ---- workload -------------------------------------------------------------------------------------
    def _turn_arrival(self, arg) -> None:
        traj, i = arg
        shapes = self._shapes.get(traj.trajectory_id)
        if shapes is None:
            shapes = self._shapes[traj.trajectory_id] = traj.turn_shapes(self.c.block_size)
        prompt, hit, gen = shapes[i]
        if self.bounded:
            hit = self._store_lookup(traj, i, prompt, hit)
        elif self.shared_hits:
            hit = self._shared_hit(traj.turns[i], prompt, hit)
        rid = self._next_rid
        self._next_rid += 1
        pending = PendingRequest(
            request_id=rid,
            trajectory_id=traj.trajectory_id,
            turn_index=i,
            prompt_tokens=prompt,
            hit_tokens=hit,
            gen_tokens=gen,
            arrival_time=self.now,
        )
        self.records.add(traj.trajectory_id, i, prompt, hit, gen, self.now)  # (its row: rid)
        self.requests[rid] = Request(rid, traj, i, pending)
        self.queue.append(pending)
        self._qids.append(rid)
        self._qlens.append(prompt + gen)
        if not self.fetch_running:  # the next group's periodic fetch takes it (not one at its arrival)
            self.fetch_running = True
            tick = self._next_tick
            if tick < self.now:
                k = math.ceil((self.now - tick) / self.fetch_step)
                tick += k * self.fetch_step
                self._fetch_rr = (self._fetch_rr + k) % len(self.nodes)
                # (rounding can leave tick + k * step an ulp below now: that fetch is now, not in the past, which
                # ran the clock backwards and scheduled the turn before it arrived)
                if tick < self.now:
                    tick = self.now
            self.at(tick, self._fetch)

    # ---- global scheduler: groups fetch periodically ----------------------------------------------------
    def _shared_hit(self, turn, prompt, hit):
        """The turn's hit with the blocks other trajectories' prompts stored (`self._stored`,
        `Turn.stored_prefix_tokens`: the store's lookup at the turn's arrival); `hit` (its own trajectory's context)
        where that is more."""
        if not self._stored:
            return hit
        shared = turn.stored_prefix_tokens(self._stored, prompt, self.c.block_size)
        return shared if shared > hit else hit

    def _store_prompt_blocks(self, r: Request) -> None:
        """r's prompt KV is computed: its whole hash blocks are in the store for every later turn to hit."""
        hashes = r.traj.turns[r.turn].prompt_block_hashes(r.prompt)
        if not self.bounded:
            self._stored.update(hashes)
            return
        # Bounded: the trajectory holds them (each hash counted once per trajectory that stored it; their bytes are
        # in its block range from its write) and it is the most recently used
        tid = r.traj.trajectory_id
        store = self._store
        if tid in store:
            store.move_to_end(tid)
        else:
            store[tid] = (0, 0)  # (no range until its write, at its decode's start)
        mine = self._store_hashes.get(tid)
        if mine is None:
            mine = self._store_hashes[tid] = set()
        refs = self._store_refs
        for x in hashes:
            if x not in mine:
                mine.add(x)
                refs[x] = refs.get(x, 0) + 1

    def _store_lookup(self, traj, i, prompt, hit):
        """The bounded store's lookup of turn i of `traj` at its arrival: its shape's `hit`, or the leading blocks the
        store still holds of its trajectory where that is less (a hit refreshes the trajectory: most recently used);
        with shared prefix hits, the leading hash blocks any trajectory holds where that is more."""
        tid = traj.trajectory_id
        e = self._store.get(tid)
        have = 0
        if e is not None and e[0] == 0:
            have = e[1]
            if have:
                self._store.move_to_end(tid)
        own = hit if have >= hit else have
        if self.shared_hits and self._store_refs:
            shared = traj.turns[i].stored_prefix_tokens(self._store_refs, prompt, self.c.block_size)
            if shared > own:
                own = shared
        if own < hit:
            self.store_lost_lookups += 1
            self.store_lost_tokens += hit - own
        return own

    def _store_drop_hashes(self, tid) -> None:
        """Trajectory `tid` left the store: the hash blocks it held are gone unless another trajectory holds them."""
        mine = self._store_hashes.pop(tid, None)
        if mine:
            refs = self._store_refs
            for x in mine:
                n = refs[x] - 1
                if n:
                    refs[x] = n
                else:
                    del refs[x]

    def _store_write(self, r: Request) -> None:
        """r's decode starts: the DE writes its new whole blocks [hit, end) of its stored KV, prompt + generation but
        the last generated token (`stored_kv_tokens`; the runtime's write-back; counted whole from now, with or without
        `cluster.writeback`'s bytes). The trajectory becomes most recently used; least recently used ones are evicted
        whole until the store fits. One trajectory larger than the store keeps nothing: under block LRU its first
        blocks would go first, and with them its whole hit."""
        bs = self.c.block_size
        h = r.hit
        end = (stored_kv_tokens(r.prompt, r.gen) // bs) * bs
        if end <= h:  # no new whole block
            return
        tid = r.traj.trajectory_id
        store = self._store
        e = store.pop(tid, None)
        old = 0
        lo = h
        hi = end
        # Its leading blocks held as hash blocks (its own prompt's, or other trajectories' it hit): its prefix is whole
        # (their bytes count in its range, again where other trajectories hold them)
        if (
            lo > 0
            and self.shared_hits
            and r.traj.turns[r.turn].stored_prefix_tokens(self._store_refs, r.prompt, bs) >= lo
        ):
            lo = 0
        if e is not None:
            old = e[1] - e[0]
            if lo <= e[1]:  # contiguous with what it holds (an entry evicted after the lookup is gone: e is None)
                lo = min(e[0], lo)
                hi = max(e[1], hi)
            else:  # (not contiguous: a write past what it held, an entry of hashes alone) its old range goes
                self.store_evicted_tokens += old
                self.store_held -= old
                old = 0
        size = hi - lo
        if size > self.store_cap_tokens:
            self.store_held -= old
            self.store_evicted_tokens += size
            self.store_evicted_entries += 1
            if self.shared_hits:
                self._store_drop_hashes(tid)
            return
        store[tid] = (lo, hi)
        self.store_held += size - old
        while self.store_held > self.store_cap_tokens:
            k, v = store.popitem(False)  # least recently used (never tid: it alone fits)
            n = v[1] - v[0]
            self.store_held -= n
            self.store_evicted_tokens += n
            self.store_evicted_entries += 1
            if self.shared_hits:
                self._store_drop_hashes(k)

    def _fetch(self, _arg) -> bool | None:
        n_nodes = len(self.nodes)
        if not self.queue:  # the chain stops; it keeps its phase: a later arrival waits for the next group's tick
            self.fetch_running = False
            self._fetch_rr = (self._fetch_rr + 1) % n_nodes
            self._next_tick = self.now + self.fetch_step
            return False  # nothing fetched
        node = self._fetch_rr
        self._fetch_rr = (node + 1) % n_nodes
        self.n_fetches += 1
        self.snapshot.now = self.now
        # Policies place a FIFO prefix (schedulers/policies.py), so they see at most fetch_window requests;
        # a fetch that places the whole window is repeated at once, so the window never limits placements.
        k = self.c.fetch_window
        q, qids, qlens = self.queue, self._qids, self._qlens
        window = QueueWindow(q, qids[:k], qlens[:k])  # the live deque, not a copy: placed below, after the policy
        scope = node if self.c.fetch_scope == "node" else None
        assignments = self.policy.schedule(self.snapshot, window, fetching_node=scope)
        if not isinstance(assignments, (list, tuple)):  # (None was taken for "nothing placed": fetched forever)
            raise TypeError(
                f"policy {self.cfg.policy!r} returned {assignments!r} from schedule(), not a list of Assignments"
            )
        if assignments:
            self._idle_fetches = 0
            placed = set()
            held = set()
            # With decode slots (cluster.de_max_seqs), as the runtime's scheduler: a policy counts a DE's room in
            # tokens within one call, so one call may give a DE more requests than it has free slots; those stay
            # queued, in their place, and the policy is asked again at once (a policy that places on a full DE on
            # purpose, e.g. round_robin full_de="queue", is not held back: they wait at the DE)
            hold = self.max_seqs < math.inf and not getattr(self.policy, "overcommits_decode", False)
            requests = self.requests
            for a in assignments:
                if not isinstance(a, Assignment):
                    raise TypeError(f"policy {self.cfg.policy!r} returned {a!r} in its list, not an Assignment")
                if a.request_id in placed or a.request_id in held:
                    raise RuntimeError(f"policy {self.cfg.policy!r} placed request {a.request_id} twice")
                r = requests.get(a.request_id)
                if r is None or not math.isnan(self.records.scheduled[r.rid]):  # (NaN until placed: not queued)
                    why = "unknown or finished" if r is None else "placed before"
                    raise RuntimeError(
                        f"policy {self.cfg.policy!r} placed request {a.request_id}, which is not in the queue ({why}); "
                        "it may place only requests of its window"
                    )
                if hold:
                    de = self.des.get(a.decode_engine)
                    if de is not None and de.state.seq >= self.max_seqs:
                        held.add(a.request_id)
                        continue
                placed.add(a.request_id)
                self._assign(a)
            n = len(placed)
            j = 0
            while j < n and j < len(qids) and qids[j] in placed:
                j += 1
            for _ in range(j):
                q.popleft()
            del qids[:j]
            del qlens[:j]
            if j < n:  # not a prefix: remove the rest wherever they are
                keep = [x for x in zip(q, qids, qlens, strict=True) if x[1] not in placed]
                self.queue = deque(x[0] for x in keep)
                self._qids = array("q", (x[1] for x in keep))
                self._qlens = array("q", (x[2] for x in keep))
            if n and (held or len(assignments) == len(window) == k):
                self._fetch_rr = node
                self.at(self.now, self._fetch)
                return
        elif self.events:
            self._idle_fetches = 0
        else:  # placed nothing, and nothing else will ever happen: only this fetch, again and again
            self._idle_fetches += 1
            if self._idle_fetches >= IDLE_FETCHES:
                raise RuntimeError(
                    f"policy {self.cfg.policy!r} placed none of the {len(q)} queued requests in {IDLE_FETCHES} "
                    f"fetches on an idle cluster (no engine, transfer or arrival pending; t = {self.now:.3f} s): "
                    "the run cannot go on"
                )
        self.at(self.now + self.fetch_step, self._fetch)

    def _assign(self, a: Assignment) -> None:
        r = self.requests[a.request_id]
        pe = self.pes.get(a.prefill_engine)
        de = self.des.get(a.decode_engine)
        if pe is None or de is None:
            raise RuntimeError(
                f"policy {self.cfg.policy!r} returned PE {a.prefill_engine} / DE {a.decode_engine} for request "
                f"{a.request_id}; PEs are {min(self.pes)}..{max(self.pes)}, DEs {min(self.des)}..{max(self.des)}"
            )
        r.pe, r.de, r.frac = pe, de, a.de_read_fraction
        rec = self.records
        rid = r.rid
        rec.scheduled[rid] = self.now
        rec.prefill_engine[rid] = pe.eid
        rec.decode_engine[rid] = de.eid
        rec.read_side[rid] = a.read_side
        bs = self.c.block_size
        # Split reads whole blocks on each side.
        hit_de = int(round(r.hit * r.frac / bs)) * bs if 0.0 < r.frac < 1.0 else int(r.hit * r.frac)
        r.hit_de = min(hit_de, r.hit)
        r.hit_pe = r.hit - r.hit_de
        if not self.c.layerwise:  # basic: only PE reads (the record said the policy's side: "de" with no DE read)
            r.hit_pe, r.hit_de = r.hit, 0
            rec.read_side[rid] = "pe"
        # (pe_read_bytes / de_read_bytes: bytes read from storage, filled as each side's read ends: _read_done)
        ps, ds = pe.state, de.state
        ln = r.prompt + r.gen
        ps.seq += 1
        ps.tok += r.prompt
        pe.node.state.engine_tok += r.prompt
        ds.seq += 1
        ds.tok += ln
        de.free_tokens -= ln
        de.node.state.engine_tok += ln
        self._de_room(de)
        # The DE has no room (HBM, or a free slot) for it yet: it waits there, FIFO
        if de.alloc_queue or de.hbm_free < ln or de.n_seqs >= self.max_seqs:
            de.alloc_queue.append(r)
            return
        de.hbm_free -= ln
        de.n_seqs += 1
        self._allocated(r)

    def _de_room(self, de: DecodeEngine) -> None:
        """The DE's room as the policy sees it (its engine's and node's free_hbm_tokens): its free tokens, or none
        while every slot is taken (`cluster.de_max_seqs`), as the runtime's snapshot shows a DE of full slots."""
        ds = de.state
        free = de.free_tokens
        if ds.seq >= self.max_seqs and free > 0:
            free = 0
        de.node.state.engine_free_hbm_tokens += free - ds.free_hbm_tokens
        ds.free_hbm_tokens = free

    def _allocated(self, r: Request) -> None:
        """The request holds its DE's HBM: its reads (or, basic, its PE admission) start."""
        if self.c.io_free:
            self.records.read_start[r.rid] = self.records.read_end[r.rid] = self.now
            self._enqueue_prefill(r)
            return
        if self.c.layerwise:
            self._submit_reads(r)
        else:
            r.pe.admit_queue.append(r)
            self._admit_basic(r.pe)

    # ---- DE buffer and storage reads -------------------------------------------------------------------
    def _submit_reads(self, r: Request) -> None:
        """The request's reads are due (its DE HBM held; basic: its PE HBM too). First it takes room in its DE
        node's host buffer for its whole prompt KV (DESIGN.md "Data paths": the DE buffer holds the whole prompt
        KV, then H2D into DE HBM, buffer freed): the DE-side hit it reads there, the PE-side hit and new KV the
        PE sends there (and, chunked, reloads from there). One piece per request, before any of its reads (as the
        runtime's DE takes its area when the task arrives), held until its H2D into DE HBM is done. No deadlock:
        the DE room is the first buffer a request takes; holding it, a request may wait only for PE-buffer room,
        held by reads in flight and by requests whose reads are done, which need no buffer any more (PE compute,
        flows, the H2D), so every holder gets through and frees its room. Taken later (when the PE sends), a PE
        batch could wait for room held by requests queued behind it. Its read tokens count in its nodes' read
        queues from now, as a read waiting for buffer did."""
        for node, tokens in ((r.pe.node, r.hit_pe), (r.de.node, r.hit_de)):
            if tokens > 0:
                node.state.read_queue_tokens += tokens
        node = r.de.node
        node.buf_queue.append(r)
        self._pump_buffer(node)

    def _pump_buffer(self, node: Node) -> None:
        """DE node: FIFO, as the reads: the head waits for room, unless no request holds any (a prompt larger
        than the whole buffer then runs alone)."""
        q = node.buf_queue
        while q:
            r = q[0]
            need = r.prompt * self.b
            if node.buffer_free < need - ROOM_SLACK * node.buffer_bytes and node.buf_held > 0:
                break
            q.popleft()
            node.buffer_free -= need
            node.buf_held += 1
            self._start_reads(r)

    def _de_buffer_free(self, r: Request) -> None:
        """The prompt KV is in DE HBM: its room in the DE buffer is free again."""
        node = r.de.node
        self._room_freed(node, r.prompt * self.b)
        self._pump_buffer(node)

    def _room_freed(self, node: Node, nbytes: float) -> None:
        """One holder of room in `node`'s host buffer gave its `nbytes` back."""
        node.buf_held -= 1
        if node.buf_held:
            node.buffer_free += nbytes
        else:  # all of it free again: exactly its size, not a sum that rounding may have left a little off
            node.buffer_free = node.buffer_bytes

    def _start_reads(self, r: Request) -> None:
        r.reads_left = 0
        for node, tokens, side in ((r.pe.node, r.hit_pe, "pe"), (r.de.node, r.hit_de, "de")):
            if tokens > 0:
                r.reads_left += 1
                node.read_queue.append((r, tokens, side))
        if r.reads_left == 0:
            self.records.read_start[r.rid] = self.records.read_end[r.rid] = self.now
            self._reads_done(r)
            return
        # PE node, then DE node: a fixed order (a set of the two iterated in an address-dependent one)
        for node in (r.pe.node,) if r.pe.node is r.de.node else (r.pe.node, r.de.node):
            self._pump_reads(node)

    def _pump_reads(self, node: Node) -> None:
        c = self.c
        q = node.read_queue
        while q and node.reads_active < c.max_reads_per_node:
            r, tokens, side = q[0]
            nbytes = tokens * self.b
            if side == "pe":  # (a DE-side read lands in the DE room its request already holds)
                # Wait for room while any request holds some (a read larger than the whole buffer then runs alone).
                # That was `while reads are in flight`: a read started beside hits already read and waiting for
                # their prefill, and the buffer held more than its size.
                if node.buffer_free < nbytes - ROOM_SLACK * node.buffer_bytes and node.buf_held > 0:
                    break
                node.buffer_free -= nbytes
                node.buf_held += 1
            q.popleft()
            node.reads_active += 1
            if math.isnan(self.records.read_start[r.rid]):
                self.records.read_start[r.rid] = self.now
            path = (node.snic,) + self._dram(node)
            if self.storage_link is not None:
                path = (self.storage_link,) + path
            self.net.start_flow(path, nbytes, self.now, _ReadDone(self, r, node, tokens), self.read_cap)

    def _read_done(self, r: Request, node: Node, tokens: int) -> None:
        # Bytes read from storage (metrics.TurnRecord), as the runtime counts them: when the read is over. They were
        # set at placement, so a run cut by max_time gave turns whose reads had not ended (or begun) their bytes.
        if node is r.pe.node:
            self.records.pe_read_bytes[r.rid] = int(tokens * self.b)
        else:
            self.records.de_read_bytes[r.rid] = int(tokens * self.b)
        node.reads_active -= 1
        node.state.read_queue_tokens -= tokens
        r.reads_left -= 1
        if r.reads_left == 0:
            self.records.read_end[r.rid] = self.now
            if self.c.layerwise:
                self._reads_done(r)
            else:
                self._h2d_basic(r)
        self._pump_reads(node)

    def _reads_done(self, r: Request) -> None:
        self._enqueue_prefill(r)

    def _pe_buffer_free(self, r: Request) -> None:
        """The PE-side hit has left the PE node's buffer (layerwise: the prefill is done; basic: it is in PE HBM)."""
        node = r.pe.node
        self._room_freed(node, r.hit_pe * self.b)
        self._pump_reads(node)

    # ---- basic (not layerwise): whole prompt KV in PE HBM ---------------------------------------------------
    def _admit_basic(self, pe: PrefillEngine) -> None:
        q = pe.admit_queue
        while q:
            r = q[0]
            need = r.prompt * self.b
            # Wait for HBM; a prompt larger than all of it runs alone, once no request holds any. (That used to
            # be `hbm_free < all of it`: with a bytes-per-token that is not an integer, the freed bytes could sum
            # to a rounding below all of it, and such a prompt then waited forever.)
            if pe.hbm_free < need - ROOM_SLACK * self.c.pe_hbm_kv_gb * GB and pe.hbm_held:
                break
            q.popleft()
            pe.hbm_free -= need
            pe.hbm_held += 1
            pe.state.free_hbm_tokens -= r.prompt
            pe.node.state.engine_free_hbm_tokens -= r.prompt
            self._submit_reads(r)

    def _h2d_basic(self, r: Request) -> None:
        node = r.pe.node
        nbytes = r.hit * self.b
        # The hit KV leaves the host buffer into PE HBM (through the PE's CNIC, see PAPER.md).
        if not self._flow(self._dram(node) + (r.pe.cnic_in,), nbytes, _Call(self._h2d_basic_done, r)):
            self._h2d_basic_done(r)

    def _h2d_basic_done(self, r: Request) -> None:
        self._pe_buffer_free(r)  # (basic reads every hit on the PE side: hit_pe = hit)
        self._enqueue_prefill(r)

    # ---- prefill engine -----------------------------------------------------------------------------------
    def _enqueue_prefill(self, r: Request) -> None:
        pe = r.pe
        r.work = PrefillWork(r.rid, r.cached, r.remaining)
        pe.queue.append(r)
        if not pe.busy:
            self._start_batch(pe)

    def _start_batch(self, pe: PrefillEngine) -> None:
        if not pe.queue:
            pe.busy = False
            return
        work = _WorkView(pe.queue)  # batchers read a FIFO prefix: no PrefillWork list of the whole queue
        items = self.batcher.form_batch(work)
        if not items:
            raise RuntimeError(f"batcher {self.cfg.batcher!r} formed an empty batch from {len(work)} requests")
        pe.busy = True
        # The items' requests: batchers take a FIFO prefix, so walk the queue (a dict only if out of order).
        queue = pe.queue
        n = len(queue)
        j = 0
        byid = None
        reqs = []
        for it in items:
            rid = it.request_id
            while j < n and queue[j].rid != rid:
                j += 1
            if j < n:
                r = queue[j]
                j += 1
            else:
                if byid is None:
                    byid = {q.rid: q for q in queue}
                r = byid.get(rid)
                if r is not None and r in reqs:  # (a request listed twice: the FIFO walk passed it already)
                    raise RuntimeError(f"batcher {self.cfg.batcher!r} returned a bad item {it}: request listed twice")
            if r is None or it.bsz <= 0 or it.bsz > r.remaining:
                raise RuntimeError(f"batcher {self.cfg.batcher!r} returned a bad item {it}")
            if it.cached != r.cached:  # (it was priced at that cached length, as the runtime refuses)
                raise RuntimeError(
                    f"batcher {self.cfg.batcher!r} returned a bad item {it}: cached={it.cached!r}, but request {rid} "
                    f"has {r.cached} cached tokens"
                )
            reqs.append(r)
        batch = _Batch(pe, items, reqs, self.now)
        compute = self.cost.batch_prefill_time([(it.cached, it.bsz) for it in items]) * self.c.pe_time_scale
        prefill_start = self.records.prefill_start
        for r in reqs:
            if math.isnan(prefill_start[r.rid]):
                prefill_start[r.rid] = self.now
        c = self.c
        b = self.b
        if not c.io_free and c.layerwise:
            specs = []
            part = _BatchPart(self, batch)
            inf = math.inf
            for it, r in zip(items, reqs, strict=True):
                first = it.cached == r.hit
                # Loads per layer into PE HBM: the PE-side hit from the PE buffer, the DE-side hit (and any
                # earlier chunks, which went to the DE buffer) from the DE buffer over the compute network.
                if r.hit_pe > 0:
                    specs.append((self._dram(pe.node) + (pe.cnic_in,), r.hit_pe * b, part, inf))
                de_side = (it.cached - r.hit_pe) * b
                if de_side > 0:
                    specs.append((self._dram(r.de.node) + (r.de.cnic, pe.cnic_in), de_side, part, inf))
                # Outputs to the DE buffer: the new KV, plus the PE-side hit on the first chunk.
                out = (it.bsz + (r.hit_pe if first else 0)) * b
                specs.append(((pe.cnic, r.de.cnic_in) + self._dram(r.de.node), out, part, inf))
            batch.left += len(specs)
            self.net.start_flows(specs, self.now)
        batch.left += 1
        # Layerwise: one extra layer of pipeline fill/drain on top of the compute.
        tail = compute / self.L if (c.layerwise and not c.io_free) else 0.0
        coll = c.collective_bytes_per_token
        if coll > 0 and compute > 0 and not c.io_free:
            tokens = sum([it.bsz for it in items])  # (lists, not generators: no closures when compiled)
            # tokens * coll bytes each way over the batch's whole compute (held until _compute_done, at compute + tail)
            rate = tokens * coll / (compute + tail)
            if rate > c.high_share * c.cnic_gbps * GB:  # the high class gets no more: the rest is dropped
                _collectives_cut(self, rate)
            self.net.set_high_load(pe.cnic, rate, self.now)
            if pe.cnic_in != pe.cnic:
                self.net.set_high_load(pe.cnic_in, rate, self.now)
        self.at(self.now + compute + tail, self._compute_done, batch)

    def _compute_done(self, batch: _Batch) -> None:
        if self.c.collective_bytes_per_token > 0 and not self.c.io_free:
            self.net.set_high_load(batch.pe.cnic, 0.0, self.now)
            if batch.pe.cnic_in != batch.pe.cnic:
                self.net.set_high_load(batch.pe.cnic_in, 0.0, self.now)
        self._batch_part_done(batch)

    def _batch_part_done(self, batch: _Batch) -> None:
        batch.left -= 1
        if batch.left:
            return
        pe = batch.pe
        done_ids = set()
        for it, r in zip(batch.items, batch.reqs, strict=False):
            r.cached += it.bsz
            r.remaining -= it.bsz
            if r.remaining <= 0:
                done_ids.add(r.rid)
            else:
                r.work = PrefillWork(r.rid, r.cached, r.remaining)
        if done_ids:
            q = pe.queue
            k = len(done_ids)
            if all([q[i].rid in done_ids for i in range(k)]):  # the usual case: the finished requests lead the queue
                del q[:k]
            else:
                pe.queue = [r for r in q if r.rid not in done_ids]
            for r in batch.reqs:
                if r.rid in done_ids:
                    done_ids.discard(r.rid)
                    self._prefill_done(r)
        self._start_batch(pe)

    def _prefill_done(self, r: Request) -> None:
        if self.shared_hits:
            self._store_prompt_blocks(r)
        pe = r.pe
        pe.state.seq -= 1
        pe.state.tok -= r.prompt
        pe.node.state.engine_tok -= r.prompt
        c = self.c
        if c.io_free:
            self._de_join(r)
            return
        if c.layerwise:
            if r.hit_pe > 0:  # it held PE buffer room from its PE-side read until now
                self._pe_buffer_free(r)
            self._de_h2d(r)
        else:
            # basic: the whole prompt KV (hit + miss) goes PE HBM -> DE buffer after the prefill.
            nbytes = r.prompt * self.b
            if not self._flow((pe.cnic, r.de.cnic_in) + self._dram(r.de.node), nbytes, _Call(self._basic_sent, r)):
                self._basic_sent(r)

    def _basic_sent(self, r: Request) -> None:
        pe = r.pe
        pe.hbm_held -= 1
        if pe.hbm_held:
            pe.hbm_free += r.prompt * self.b
        else:  # all of it free again: exactly its size, not a sum that rounding may have left a little off
            pe.hbm_free = self.c.pe_hbm_kv_gb * GB
        pe.state.free_hbm_tokens += r.prompt
        pe.node.state.engine_free_hbm_tokens += r.prompt
        self._admit_basic(pe)
        self._de_h2d(r)

    # ---- decode engine ----------------------------------------------------------------------------------
    def _de_h2d(self, r: Request) -> None:
        self.records.prefill_end[r.rid] = self.now
        node = r.de.node
        # The whole prompt KV sits in the DE buffer (the DE-side hit since its read, the rest sent by the PE);
        # its room is freed once it is in HBM.
        if not self._flow(self._dram(node) + (r.de.cnic_in,), r.prompt * self.b, _Call(self._de_h2d_done, r)):
            self._de_h2d_done(r)

    def _de_h2d_done(self, r: Request) -> None:
        self._de_buffer_free(r)
        self._de_join(r)

    def _de_sync(self, g: DecodeGroup) -> None:
        """Advance the group's virtual clock to now (it ran at one step time since `tv`); the second tokens that
        came out meanwhile are stamped at the instant the clock passed them."""
        now = self.now
        if g.step > 0.0:
            v = g.v + (now - g.tv) / g.step
            q = g.second
            second_token = self.records.second_token
            while q and q[0][0] <= v:
                target, rid = q.popleft()
                if math.isnan(second_token[rid]):  # (a 2-token turn that finished within eps of it has one)
                    t = g.tv + (target - g.v) * g.step
                    second_token[rid] = t if t < now else now
            g.v = v
        g.tv = now

    def _de_step(self, de: DecodeEngine) -> None:
        """This DE's own step time from its batch now (the group's clock must be synced)."""
        n = len(de.active)
        if n == 0:
            de.step = 0.0
            return
        context = de.sum_prompt + n * de.group.v - de.sum_vjoin
        de.step = self.decode_time.time(n, int(context))

    def _de_reschedule(self, g: DecodeGroup) -> None:
        """The group steps at its slowest member's time; (re)schedule its next finish."""
        g.version += 1
        step = 0.0
        for m in g.members:
            if m.step > step:
                step = m.step
        g.step = step
        if step == 0.0:
            return
        h = g.finish_heap
        while h and h[0][1] not in h[0][2].active:
            heapq.heappop(h)
        target = h[0][0]
        self.at(self.now + max(target - g.v, 0.0) * step, self._de_finish, (g, g.version))

    def _de_join(self, r: Request) -> None:
        de = r.de
        g = de.group
        rec = self.records
        rid = r.rid
        if math.isnan(rec.prefill_end[rid]):
            rec.prefill_end[rid] = self.now
        self._de_sync(g)
        if r.gen > 0:  # (a 0-token turn of a real trace: prefill only, no first token; metrics leave it out of TTFT)
            rec.first_token[rid] = self.now  # the prefill produced it; it is out once the request runs on the DE
        if r.gen <= 1:  # no second token (its record keeps NaN, as the runtime's does)
            self._start_writeback(r, 0.0)
            self._turn_done_decode(r)
            return
        r.vjoin = g.v
        r.target = g.v + (r.gen - 1)
        de.active[r.rid] = r
        de.sum_prompt += r.prompt
        de.sum_vjoin += g.v
        heapq.heappush(g.finish_heap, (r.target, r.rid, de))
        # Its second token comes out at the end of its first decode step: when the group's clock reaches
        # vjoin + 1 (stamped by _de_sync then, whatever the batch did in between; the runtime stamps it when the
        # step that made it ends). It was timed here as one step of the batch at the join.
        g.second.append((g.v + 1.0, rid))
        self._de_step(de)
        self._de_reschedule(g)
        self._start_writeback(r, (r.gen - 1) * g.step)

    def _start_writeback(self, r: Request, decode_s: float) -> None:
        """The DE persists every newly filled block (prompt miss + generated, `stored_kv_tokens`) during decode."""
        if self.bounded:
            self._store_write(r)
        if not self.c.writeback or self.c.io_free:
            return
        bs = self.c.block_size
        new_blocks_tokens = (stored_kv_tokens(r.prompt, r.gen) // bs) * bs - r.hit
        if new_blocks_tokens <= 0:
            return
        r.wb_done = False
        de = r.de
        # Paced: blocks fill at the decode rate, so the write-back spreads over the expected decode time.
        # Far below every link's capacity, and within what the KV class has left on each (reservations and
        # collectives take the rest), it is a fixed-rate reservation; otherwise an ordinary flow capped at that pace.
        nbytes = new_blocks_tokens * self.b
        pace = nbytes / max(decode_s, 1e-6)
        if de.wb is None:  # the same path every time (capacities are fixed)
            node = de.node
            path = (de.cnic,) + self._dram(node) + (node.snic,)
            if self.storage_link is not None:
                path = path + (self.storage_link,)
            de.wb = path, min([self.net.capacity[k] for k in path])
        path, min_capacity = de.wb
        low_cap = self.net.low_cap
        if pace <= 0.01 * min_capacity and pace <= min([low_cap[k] for k in path]):
            end = self.net.reserve(path, nbytes, pace, self.now)
            r.wb = (self.net._resv_seq, path, pace, end)
            self.at(end, self._wb_release, (r, r.wb))
        else:
            r.wb = self.net.start_flow(path, nbytes, self.now, _Call(self._wb_done, r), pace)

    def _wb_release(self, arg) -> bool | None:
        r, wb = arg
        if r.wb is not wb:
            return False  # cut short at its decode's end (`_unpace_writeback`): it ended then
        self.net.release(wb[1], wb[2], self.now)
        self._wb_done(r)

    def _unpace_writeback(self, r: Request) -> None:
        """r's decode ended with its write-back still paced at the decode time estimated when r joined its batch
        (a batch that shrank since decoded faster): the blocks are all filled now, so what is left goes at what the
        links give, as an ordinary KV flow. The agent's next turn waited out the rest of the estimate (sim_tiny:
        94 of 165 turns, up to 1.9 s each; `tests/test_fix18_siminv.py`)."""
        wb = r.wb
        if isinstance(wb, tuple):  # a reservation: its bytes after now move as a flow
            seq, path, pace, end = wb
            left = self.net.cut_reservation(seq, path, pace, end, self.now)
            if left > 1e-9 * left + 1e-3:  # (the network's rule for a flow with bytes left)
                r.wb = self.net.start_flow(path, left, self.now, _Call(self._wb_done, r))
            else:  # (nothing left to speak of: done now; the caller completes the turn)
                r.wb = None
                r.wb_done = True
        elif wb.max_rate < r.de.wb[1]:  # a flow capped below its path's capacity: the cap goes
            self.net.set_max_rate(wb, math.inf, self.now)

    def _de_finish(self, arg) -> bool | None:
        g, version = arg
        if version != g.version:
            return False  # stale: the group's batch changed since
        self._de_sync(g)
        h = g.finish_heap
        eps = 1e-6
        now = self.now
        step = g.step
        changed = []
        last = None
        # Due: within eps tokens of its target, or so close that its finish would not move the clock (late in a
        # long run a double's clock cannot step by a fraction of a decode step: the finish was rescheduled at
        # this same instant, forever)
        while h and (h[0][1] not in h[0][2].active or h[0][0] <= g.v + eps or now + (h[0][0] - g.v) * step <= now):
            _, rid, de = heapq.heappop(h)
            r = de.active.pop(rid, None)
            if r is None:
                continue
            de.sum_prompt -= r.prompt
            de.sum_vjoin -= r.vjoin
            if de is not last:
                changed.append(de)
                last = de
            self._turn_done_decode(r)
        # New step times for the members whose batch changed (all of them if none did: the clock moved)
        for de in changed or g.members:
            self._de_step(de)
        self._de_reschedule(g)

    def _wb_done(self, r: Request) -> None:
        r.wb_done = True
        r.wb = None
        if r.decode_done:
            self._turn_complete(r)

    def _turn_done_decode(self, r: Request) -> None:
        r.decode_done = True
        if not r.wb_done and r.wb is not None:
            self._unpace_writeback(r)
        rec = self.records
        rid = r.rid
        rec.finished[rid] = self.now
        # A 2-token turn finishes at its second token: due within eps tokens of it, the clock may stand a hair
        # short of the target _de_sync waits for.
        if r.gen > 1 and math.isnan(rec.second_token[rid]):
            rec.second_token[rid] = self.now
        self.turns_done += 1
        de = r.de
        ds = de.state
        ln = r.prompt + r.gen
        ds.seq -= 1
        ds.tok -= ln
        de.free_tokens += ln
        de.node.state.engine_tok -= ln
        self._de_room(de)
        de.hbm_free += ln
        de.n_seqs -= 1
        q = de.alloc_queue
        while q:
            w = q[0]
            need = w.prompt + w.gen
            if de.hbm_free < need or de.n_seqs >= self.max_seqs:
                break
            q.popleft()
            de.hbm_free -= need
            de.n_seqs += 1
            self._allocated(w)
        if r.wb_done:
            self._turn_complete(r)

    def _turn_complete(self, r: Request) -> None:
        del self.requests[r.rid]
        nxt = r.turn + 1
        if nxt < len(r.traj.turns):
            if self.arrival_model is not None:
                t = max(self.arrival_model.turn_ready(r.traj, nxt, self.now), self.now)
            else:
                t = self.now + r.traj.turns[r.turn].gap_s
            self.at(t, self._turn_arrival, (r.traj, nxt))
        else:
            self._shapes.pop(r.traj.trajectory_id, None)

    def _n_turns(self) -> int:
        return sum([len(traj.turns) for traj in self.trajectories])

    # ---- run --------------------------------------------------------------------------------------------
    def run(self, max_time: float = math.inf, progress=None) -> tuple[TurnTable, list[LinkBytes], dict]:
        """Run the events up to `max_time`. `progress(now, turns_done, events)`, if given, is called every
        65,536 events and once at the end (a progress bar; it must not touch the simulator). Once per simulator."""
        if self._ran:
            raise RuntimeError("Simulator.run() was already called on this simulator: build a new one to run again")
        self._ran = True
        if max_time == math.inf and not len(self.records):  # every turn will come: its rows at once (152 B a turn)
            self.records = TurnTable(capacity=self._n_turns())
        for traj in self.trajectories:
            if traj.turns:
                # (a float, as in the compiled run: an int arrival gave int timestamps in the Python one)
                self.at(float(traj.arrival_time), self._turn_arrival, (traj, 0))
        t_wall = _time.perf_counter()
        events = self.events
        pop = events.pop
        top_t = events.top_t
        net = self.net
        pending = net._pending  # changes not solved yet; settled once per instant, before time moves on
        n = 0
        last = self.now  # the last event that did something: stale checks or finishes, empty fetches come after
        # The event loop creates no reference cycles (tests/test_sim_e2e.py checks it), so the cyclic
        # collector would only re-scan the millions of live objects of a large run (~20% of its CPU at
        # 48P96D): it is off while the events run and restored afterwards.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            while events:
                t, _, _, fn, arg = pop()
                if t > max_time:
                    events.push(t, 0, 0, fn, arg)
                    break
                self.now = t
                if fn(arg) is not False:  # False: it did nothing (a stale check or finish, an empty fetch)
                    last = t
                if pending and top_t() > t:  # top_t: inf when empty
                    net.settle(t)
                n += 1
                if progress is not None and not n & 0xFFFF:
                    progress(t, self.turns_done, n)
        finally:
            if gc_was_enabled:
                gc.enable()
            _COLLECTIVES_CUT_SAID.discard(id(self))
        self.n_events = n
        if events and not self.requests and not net.flows and len(self.records) == self._n_turns():
            events = None  # cut, but every turn had come and was done: the events left are stale (as uncut)
        if events:  # cut by max_time: nothing happens between the last event and it, so the run holds up to it
            # (flows moved bytes and decode clocks ran until then; the links and second tokens stopped at the last
            # event, which can be long before)
            self.now = float(max_time)  # (a float, as in the compiled run, whatever the caller passed)
            for g in self.de_groups:
                self._de_sync(g)
        else:  # the run ends at its last event that did something, not at a stale check or empty fetch after it
            self.now = last
        if progress is not None:
            progress(self.now, self.turns_done, n)
        wall = _time.perf_counter() - t_wall
        self.net.flush(self.now)
        link_totals = {name: tot for name, tot in zip(self.net.names, self.net.link_total, strict=False)}
        links = whole_byte_samples(self.net.link_bytes(), link_totals)
        unfinished = sum(map(math.isnan, self.records.values("finished")))
        stats = {
            "events": n,
            "wall_s": wall,
            "events_per_s": n / wall if wall > 0 else math.nan,
            "turns_per_s": (len(self.records) - unfinished) / wall if wall > 0 else math.nan,
            "fetches": self.n_fetches,
            "flow_solves": self.net.solves,
            "mean_component_flows": self.net.solved_flows / max(self.net.solves, 1),
            "unfinished_turns": unfinished,
            "sim_end_s": self.now,
            "link_totals": link_totals,
            "compiled": compiled.status(),  # which hot paths ran compiled (False: their Python twins)
        }
        if self.bounded:  # (unbounded runs keep their keys as before)
            bs = self.c.block_size
            stats["store_capacity_bytes"] = self.c.store_capacity_gb * GB
            stats["store_held_bytes"] = self.store_held * self.b
            stats["store_evicted_bytes"] = self.store_evicted_tokens * self.b
            stats["store_evicted_blocks"] = self.store_evicted_tokens // bs
            stats["store_evicted_trajectories"] = self.store_evicted_entries
            stats["store_lost_lookups"] = self.store_lost_lookups
            stats["store_lost_hit_tokens"] = self.store_lost_tokens
        return self.records, links, stats


def whole_byte_samples(buckets, totals: dict) -> list:
    """The network's (link, t0, t1, bytes) buckets (`link_bytes`: a link's buckets in a row) as `LinkBytes` of whole
    bytes, the remainder carried: each sample holds its link's running sum, rounded, less what the samples before it
    hold, so a link's samples add up to its total in `totals` (`link_totals`, rounded; a link not in it,
    '<name>/high': its buckets' sum, rounded). (`int()` of each bucket lost up to a byte a sample: links.csv fell 21 B
    short of sim_tiny's snic/node1 total.)"""
    out = []
    name = None
    run = 0.0  # the link's bytes so far in its buckets
    held = 0  # ... in the samples written
    for link, t0, t1, nb in buckets:
        if link != name:
            _end_on_total(out, name, run, held, totals)
            name, run, held = link, 0.0, 0
        run += nb
        whole = round(run)
        out.append(LinkBytes(link, t0, t1, whole - held))
        held = whole
    _end_on_total(out, name, run, held, totals)
    return out


def _end_on_total(out: list, name, run: float, held: int, totals: dict) -> None:
    """Its last sample ends on the link's total (the buckets' float sum, in another order, can round a byte off)."""
    total = totals.get(name) if name is not None else None
    if total is None or abs(total - run) > 1.0 or round(total) == held:
        return
    k = len(out) - 1  # (not out[-1]: the compiled module has no wraparound)
    last = out[k]
    if last.nbytes + round(total) - held >= 0:
        out[k] = LinkBytes(name, last.t0, last.t1, last.nbytes + round(total) - held)


# A room within this share of a whole token count is that count (GB x 1e9 / B per token of N tokens' bytes is N up to
# rounding, whichever way it fell); a byte room (host buffer, basic prefill's PE HBM) takes what needs up to this share
# of its size more than it has free, so N tokens' KV fits a room of N tokens' bytes given in GB (a prompt of exactly the
# room, or two halves, waited for room a hair short of theirs)
ROOM_SLACK = 1e-9


def _room_tokens(gb: float, b: float, field: str) -> int:
    """An HBM room (or the store's capacity) in whole tokens; one too large for a double (1e300 GB, or ~0 B/token) is
    refused by name (it was an OverflowError converting infinity). A room of N tokens' bytes given in GB (N x b / 1e9,
    e.g. experiments.bench_runtime's decode_slots x max_seq_len) is N tokens, not the N - 1 that flooring the
    quotient's rounding (1023.9999999999999) gave: a turn of exactly the room was refused, two halves ran one at a
    time."""
    room = gb * GB / b
    if room == math.inf:
        raise SimConfigError(
            f"config.cluster.{field} = {gb:g} GB at {b:g} B/token (config.cluster.kv_bytes_per_token, 0: the "
            "model's) holds more tokens than a double can count; give a finite KV room"
        )
    n = round(room)
    return n if abs(room - n) <= ROOM_SLACK * room else int(room)


class _WorkView(Sequence):
    """The PrefillWork of a PE's queued requests, read lazily (batchers stop after a FIFO prefix)."""

    __slots__ = ("_q",)

    def __init__(self, queue: list):
        self._q = queue

    def __len__(self) -> int:
        return len(self._q)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [r.work for r in self._q[i]]
        return self._q[i].work

    def __iter__(self):
        for r in self._q:
            yield r.work


# A policy that places nothing while nothing else is pending (no engine busy, no transfer, no arrival to come) would be
# asked again every fetch step forever: after this many such fetches in a row the run fails, naming it.
IDLE_FETCHES = 1000
_EXACT = float(1 << 53)  # integers below this are exact in a double, and so are their sums and products


def _exact_double(v) -> bool:
    """A float, or an int that a double holds exactly."""
    return type(v) is float or (type(v) is int and -_EXACT < v < _EXACT)


# The simulators (by id) whose running run said its collectives were cut (`_collectives_cut`): once per run.
# (Here, not a Simulator field: simulator.pxd fixes those when it is compiled. `run` drops its id when it ends.)
_COLLECTIVES_CUT_SAID = set()  # (no annotation: Cython may type annotated globals)


def _collectives_cut(sim, rate: float) -> None:
    """A batch's collectives ask `rate` B/s of its PE's CNIC, more than the high class gets (high_share x cnic_gbps):
    the network moves that much and drops the rest, and the compute is not stretched. Said once per run."""
    if id(sim) in _COLLECTIVES_CUT_SAID:
        return
    _COLLECTIVES_CUT_SAID.add(id(sim))
    c = sim.c
    log.warning(
        "config.cluster.collective_bytes_per_token = %g: a prefill batch's collectives ask %.4g GB/s of its PE's "
        "CNIC, more than the high class gets (high_share x cnic_gbps = %.4g GB/s): the collectives are cut to that, "
        "the rest of their bytes dropped, and the compute is not stretched (a collective-bound prefill runs as "
        "compute-bound; said once per run)",
        c.collective_bytes_per_token,
        rate / GB,
        c.high_share * c.cnic_gbps,
    )


class _DecodeTime:
    """`cost.decode_step_time(n, ctx) * scale`, bit for bit, in C doubles (a decode step is timed on every batch
    change of every DE: ~7M times at 48P96D, ~5% of the run as Python). The cost model computes with Python
    ints where it can (exact) and floats elsewhere; every int that this mirror turns into a double, and every
    int sum or product it forms in doubles, is below 2**53 (checked: `ctx_max`, and per batch size), so
    doubles give the same values, and the float operations run in the same order. Any other cost model
    (a subclass, a fitted one with non-float coefficients), or a context beyond `ctx_max`, is asked itself.
    `cost`: anything whose `decode_step_time` is a CostModel's bound method (a CostModel, the runner's split
    prefill / decode cost object)."""

    __slots__ = (
        "cost", "scale", "native", "topk", "pf", "ipf", "layers", "tp", "kv_tok", "index_kv", "main_kv",
        "sparse_kv", "fit", "overhead", "a_lin", "a_attn", "a_byte", "linear_rate", "attention_rate",
        "hbm_rate", "ctx_max", "by_n",
    )  # fmt: skip

    def __init__(self, cost, scale: float):
        from schedulers.cost_model import CostModel

        self.cost = cost
        self.scale = float(scale)
        self.by_n = []  # batch size -> (linear FLOPs, weight bytes) as doubles, or None: ask the cost model
        self.native = False
        # The runner's cost object hands out a CostModel's own bound method (sim/runner.py `_SplitCost`)
        owner = getattr(cost.decode_step_time, "__self__", None)
        if type(owner) is not CostModel:
            return
        self.cost = cost = owner  # the same decode_step_time: the fall-back asks it directly
        ints = (cost._topk, cost._pair_flops, cost._index_pair_flops, cost._layers, cost._tp, cost._kv_per_token)
        ints += (cost._index_kv, cost._main_kv)
        if any(type(v) is not int or v < 0 for v in ints):
            return
        f = cost._decode_fit
        if f is not None:
            coef = (f.overhead_s, f.s_per_linear_flop, f.s_per_attention_flop, f.s_per_byte)
            if any(type(v) is not float for v in coef):
                return
            self.overhead, self.a_lin, self.a_attn, self.a_byte = coef
        else:
            self.overhead = cost._hw.step_overhead_s
            if type(self.overhead) is not float:
                return
            self.a_lin = self.a_attn = self.a_byte = 0.0
        self.fit = f is not None
        self.topk, self.pf, self.ipf = float(cost._topk), float(cost._pair_flops), float(cost._index_pair_flops)
        self.layers, self.tp, self.kv_tok = float(cost._layers), float(cost._tp), float(cost._kv_per_token)
        self.index_kv, self.main_kv = float(cost._index_kv), float(cost._main_kv)
        self.sparse_kv = bool(cost._sparse_kv)
        self.linear_rate = float(cost._linear_rate)
        self.attention_rate = float(cost._attention_rate)
        self.hbm_rate = float(cost._hbm_rate)
        # Every int the cost model forms is at most layers * ctx * (per-pair or per-token-per-layer size), as the
        # selected / main pairs never exceed ctx: keep that below 2**53.
        per = max(
            cost._pair_flops + cost._index_pair_flops,
            cost._index_kv + cost._main_kv,
            cost._kv_per_token,
            cost._topk,
            1,
        )
        self.ctx_max = float((1 << 53) // (max(cost._layers, 1) * per)) - 1.0
        self.native = True

    def _terms(self, n: int):
        """(linear FLOPs, weight bytes) of batch size n as doubles, or None when one is not exact as a double."""
        by_n = self.by_n
        while len(by_n) <= n:
            by_n.append(False)  # not looked up yet
        t = by_n[n]
        if t is False:
            lin, weights = self.cost._decode_batch_terms(n)
            t = (float(lin), float(weights)) if _exact_double(lin) and _exact_double(weights) else None
            by_n[n] = t
        return t

    def time(self, n: int, ctx: int) -> float:
        if n <= 0:
            return 0.0
        if not self.native or ctx < 0 or ctx > self.ctx_max:
            return self.cost.decode_step_time(n, ctx) * self.scale
        terms = self._terms(n)
        if terms is None:
            return self.cost.decode_step_time(n, ctx) * self.scale
        lin = terms[0]
        weights = terms[1]
        c = float(ctx)
        layers = self.layers
        main_pairs = 0.0
        if self.topk > 0.0:
            # n * min(ctx / n, topk): per sequence the quotient (a float), or topk itself when it is smaller
            sel = c / n
            if self.topk < sel:
                sel = self.topk
            main_pairs = n * sel
            attn = layers * (main_pairs * self.pf + c * self.ipf)
        else:
            attn = layers * c * self.pf
        attn = attn / self.tp
        if self.sparse_kv:  # (only with topk: the same selected pairs as the attention's)
            kv = layers * (c * self.index_kv + main_pairs * self.main_kv) / self.tp
        else:
            kv = (c * self.kv_tok) / self.tp
        nbytes = weights + kv
        if self.fit:
            t = self.overhead + lin * self.a_lin + attn * self.a_attn + nbytes * self.a_byte
        else:
            compute = lin / self.linear_rate + attn / self.attention_rate
            memory = nbytes / self.hbm_rate
            t = self.overhead + (memory if memory > compute else compute)
        return t * self.scale


class _Call:
    """A bound callback without closures (cheaper, and picklable for debugging)."""

    __slots__ = ("fn", "arg")

    def __init__(self, fn, arg):
        self.fn = fn
        self.arg = arg

    def __call__(self):
        self.fn(self.arg)


class _ReadDone:
    __slots__ = ("sim", "r", "node", "tokens")

    def __init__(self, sim, r, node, tokens):
        self.sim, self.r, self.node, self.tokens = sim, r, node, tokens

    def __call__(self):
        self.sim._read_done(self.r, self.node, self.tokens)


class _BatchPart:
    __slots__ = ("sim", "batch")

    def __init__(self, sim, batch):
        self.sim, self.batch = sim, batch

    def __call__(self):
        self.sim._batch_part_done(self.batch)
