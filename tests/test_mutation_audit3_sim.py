"""Mutation audit 3, the simulator (/work/notes/mutation3_sim.md): tests that kill hand mutants of
dualpath_jax/sim/{simulator,network,capacity,outputs,config}.py that the rest of the suite let through.

Each test names the mutation it guards against and the contract it checks. They run on whatever the package loads
(the compiled simulator and network where built, `compiled.load`), on the tiny 1P1D config (configs/sim_tiny.py)
or a hand-built FlowNetwork, and take a few seconds in all."""

from __future__ import annotations

import dataclasses
import math

import pytest

from dualpath_jax import compiled
from dualpath_jax.sim import load_sim_config
from dualpath_jax.sim.config import GB
from dualpath_jax.sim.runner import build_simulator
from dualpath_jax.workloads.types import Trajectory, Turn

TINY = "configs/sim_tiny.py"


def _net_mod():
    return compiled.load("dualpath_jax.sim.network")


class _Recording:
    """Wraps a simulator's policy: records (sim time, fetching node, requests shown) per call."""

    def __init__(self, inner, sim):
        self.inner, self.sim, self.calls = inner, sim, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def schedule(self, snapshot, queue, fetching_node=None):
        self.calls.append((self.sim.now, fetching_node, len(queue)))
        return self.inner.schedule(snapshot, queue, fetching_node=fetching_node)


def _recorded(cfg, trajs):
    sim = build_simulator(cfg, trajs)
    sim.policy = _Recording(sim.policy, sim)
    records, links, stats = sim.run()
    return sim, records, links, stats


# ---- the periodic fetch chain --------------------------------------------------------------------------------------


def test_groups_fetch_in_turn_on_their_own_ticks_across_idle_gaps():
    """Mutants: the restarted chain not advancing `_fetch_rr` by the ticks it skipped (`_turn_arrival`), the fetch
    that finds the queue empty not passing the turn on (`_fetch`), and a node-scoped fetch passing
    `fetching_node=None`. Contract (DESIGN.md "Scheduler", PAPER.md: each group fetches periodically): node k fetches
    at the ticks m * fetch_interval_s / nodes with m = k mod nodes, staggered, and a chain stopped on an empty queue
    resumes on the same schedule, so the fetch at time t is by node round(t / step) mod nodes, and the policy is told
    that node (config.cluster.fetch_scope = "node")."""
    cfg = load_sim_config(f"{TINY}:dualpath", {"cluster.decode_nodes": 2})
    arrivals = [0.013, 3.171, 7.52, 7.53, 11.0]
    trajs = [Trajectory(i, [Turn(3000, 20)] * 2, arrival_time=t) for i, t in enumerate(arrivals)]
    sim, records, _, stats = _recorded(cfg, trajs)
    assert stats["unfinished_turns"] == 0
    n = len(sim.nodes)
    assert n == 3
    calls = sim.policy.calls
    assert len(calls) >= len(arrivals)
    for t, node, _ in calls:
        assert node == round(t / sim.fetch_step) % n, (t, node)


def test_a_fetch_that_places_its_whole_window_is_repeated_at_once_by_the_same_group():
    """Mutants: `_fetch` repeating only for held requests (not when the policy placed the whole window), and the
    repeat handed to the next group (`_fetch_rr = node` dropped). Contract (`_fetch`): a fetch shows the policy at most
    `fetch_window` queued requests, and one that places them all is repeated at once by the same group, so the window
    never limits placements: four turns queued together with a window of one are all placed at the first tick, by
    the node whose tick it is."""
    cfg = load_sim_config(f"{TINY}:dualpath", {"cluster.fetch_window": 1, "cluster.decode_nodes": 2})
    trajs = [Trajectory(i, [Turn(2000, 10)], arrival_time=0.01) for i in range(4)]
    sim, records, _, stats = _recorded(cfg, trajs)
    assert stats["unfinished_turns"] == 0
    first = min(t for t, _, _ in sim.policy.calls)
    assert [r.scheduled for r in records] == [first] * 4
    assert [q for _, _, q in sim.policy.calls] == [1, 1, 1, 1]
    for t, node, _ in sim.policy.calls:
        assert t == first and node == round(t / sim.fetch_step) % len(sim.nodes)


class _SplitAt:
    """Wraps a policy: every placement it makes reads `frac` of the hit on the DE side ("split")."""

    def __init__(self, inner, frac):
        self.inner, self.frac = inner, frac

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def schedule(self, snapshot, queue, fetching_node=None):
        out = self.inner.schedule(snapshot, queue, fetching_node=fetching_node)
        return [dataclasses.replace(a, read_side="split", de_read_fraction=self.frac) for a in out]


def _multi_turn(n_agents=6, turns=3, append=1500, gen=40, gap=0.0):
    return [Trajectory(i, [Turn(append, gen, gap_s=gap)] * turns, arrival_time=0.05 * i) for i in range(n_agents)]


def test_a_split_read_takes_whole_blocks_on_each_side():
    """Mutant: `_assign` taking int(hit * frac) tokens on the DE side instead of whole blocks. Contract (DESIGN.md
    "Data paths", `_assign`: "Split reads whole blocks on each side"): a hit is read in whole KV blocks, so with any
    fraction the DE side reads round(hit * frac / block) blocks and the PE side the rest, and the bytes read from
    storage per side are those tokens' KV."""
    cfg = load_sim_config(f"{TINY}:dualpath")
    sim = build_simulator(cfg, _multi_turn())
    sim.policy = _SplitAt(sim.policy, 0.3)
    records, _, stats = sim.run()
    assert stats["unfinished_turns"] == 0
    bs, b = cfg.cluster.block_size, sim.b
    hits = [r for r in records if r.hit_tokens]
    assert hits
    for r in hits:
        de_tokens = round(r.hit_tokens * 0.3 / bs) * bs
        assert r.hit_tokens % bs == 0 and 0 < de_tokens < r.hit_tokens
        assert (r.de_read_bytes, r.pe_read_bytes) == (int(de_tokens * b), int((r.hit_tokens - de_tokens) * b)), r


@pytest.mark.parametrize("mode", ["dualpath", "basic", "split", "slots"])
def test_every_load_and_room_is_given_back_when_the_run_is_done(mode):
    """Mutants: a PE charged prompt + generation at placement (`ps.tok`), a DE's room charged the prompt only
    (`free_tokens`), basic's PE room not taken at admission or not given back after the send, a read's tokens not
    counted in (DE side) or out of (`_read_done`) its node's read queue. Contract (DESIGN.md "Scheduler": the policy
    sees each engine's unfinished requests and tokens, free HBM, and each node's queued read tokens): every charge
    has its refund, so after a run whose turns are all done every engine and node shows what it showed before the
    first turn (and the buffers, HBM and read slots are all free)."""
    over = {"cluster.de_max_seqs": 2} if mode == "slots" else {}
    cfg = load_sim_config(f"{TINY}:{'dualpath' if mode in ('split', 'slots') else mode}", over)
    sim = build_simulator(cfg, _multi_turn(n_agents=8))
    if mode == "split":
        sim.policy = _SplitAt(sim.policy, 0.5)
    snap = sim.snapshot
    before = {e: (s.seq, s.tok, s.free_hbm_tokens) for e, s in snap.engines.items()}
    nodes_before = {n: (s.engine_tok, s.engine_free_hbm_tokens, s.read_queue_tokens) for n, s in snap.nodes.items()}
    assert all(v[:2] == (0, 0) for v in before.values())
    records, _, stats = sim.run()
    assert stats["unfinished_turns"] == 0 and len(records) == 24
    if mode == "split":
        assert any(r.de_read_bytes for r in records)
    assert {e: (s.seq, s.tok, s.free_hbm_tokens) for e, s in snap.engines.items()} == before
    assert {n: (s.engine_tok, s.engine_free_hbm_tokens, s.read_queue_tokens) for n, s in snap.nodes.items()} == (
        nodes_before
    )
    for node in sim.nodes:
        assert (node.buffer_free, node.buf_held, node.reads_active) == (node.buffer_bytes, 0, 0)
    for pe in sim.pes.values():
        assert (pe.hbm_free, pe.hbm_held) == (cfg.cluster.pe_hbm_kv_gb * GB, 0)
    for de in sim.des.values():
        assert (de.hbm_free, de.free_tokens, de.n_seqs) == (before[de.eid][2], before[de.eid][2], 0)


class _SkipHeadOnce:
    """Wraps a policy: its first call leaves the queue's head unplaced (a placement that is not a FIFO prefix)."""

    def __init__(self, inner):
        self.inner, self.skipped = inner, None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def schedule(self, snapshot, queue, fetching_node=None):
        out = self.inner.schedule(snapshot, queue, fetching_node=fetching_node)
        if self.skipped is None and len(out) > 1:
            self.skipped = queue[0].request_id
            out = [a for a in out if a.request_id != self.skipped]
        return out


def test_requests_placed_behind_an_unplaced_head_leave_the_queue_and_the_head_stays_first():
    """Mutant: `_fetch` removing placed requests only while they form a prefix of the queue (the removal of the rest
    "wherever they are" skipped). Contract (`_fetch`): a policy may leave any queued request unplaced; every request it
    placed leaves the global queue (placed once), the others keep their FIFO order. Four turns queued at once, the
    first call leaves the head: the three others are placed once each, the head at the next fetch, and every charge
    is refunded at the end."""
    cfg = load_sim_config(f"{TINY}:dualpath")
    trajs = [Trajectory(i, [Turn(1500 + 100 * i, 20)], arrival_time=0.0) for i in range(4)]
    sim = build_simulator(cfg, trajs)
    sim.policy = _SkipHeadOnce(sim.policy)
    records, _, stats = sim.run()
    assert stats["unfinished_turns"] == 0 and sim.policy.skipped == 0
    head, *rest = sorted(records, key=lambda r: r.trajectory_id)
    assert head.scheduled > max(r.scheduled for r in rest)
    assert len(sim.queue) == len(sim._qids) == len(sim._qlens) == 0
    assert all((s.seq, s.tok) == (0, 0) for s in sim.snapshot.engines.values())
    assert all(r.prefill_start >= r.scheduled for r in records)


# ---- the flow network: byte accounting per link, flows ending, the incremental re-solve ------------------------------


class _NetLoop:
    """The simulator's way of driving a FlowNetwork (its own completion heap, one check event at its earliest,
    deferred solves settled once per instant), without engines. `start(t, path, nbytes, name, cap)` schedules a
    flow; `run()` returns {name: completion time}."""

    def __init__(self, caps, bucket_s=1.0, coalesce_s=0.0):
        import heapq

        self._heapq = heapq
        self.net = _net_mod().FlowNetwork(bucket_s=bucket_s)
        self.links = [self.net.add_link(f"l{i}", c) for i, c in enumerate(caps)]
        self.net.defer = True
        self.net.coalesce_s = coalesce_s
        self.net.wake = lambda t: self._push(t, "check", None)
        self.events, self.seq, self.now, self.done = [], 0, 0.0, {}

    def _push(self, t, kind, arg):
        self.seq += 1
        self._heapq.heappush(self.events, (t, self.seq, kind, arg))

    def start(self, t, path, nbytes, name, cap=math.inf):
        self._push(t, "start", (path, nbytes, name, cap))

    def run(self, until=None):
        heapq, net = self._heapq, self.net
        n = 0
        while self.events and (until is None or self.events[0][0] <= until):
            n += 1
            assert n < 100_000, "the network never settles (a check event at the same instant forever)"
            t, _, kind, arg = heapq.heappop(self.events)
            self.now = t
            if kind == "start":
                path, nbytes, name, cap = arg
                net.start_flow(path, nbytes, t, lambda name=name: self.done.__setitem__(name, self.now), cap)
            else:
                fl = net.check_due(t)
                net.finish_flows(fl, t)
                for f in fl:
                    f.on_done()
            if not self.events or self.events[0][0] > t:
                net.settle(t)
        net.flush(self.now if until is None else until)
        return self.done

    def buckets(self, name):
        return {(t0, t1): nb for link, t0, t1, nb in self.net.link_bytes() if link == name}


def test_a_flows_bytes_fill_the_buckets_it_spans_pro_rata_and_the_link_total():
    """Mutants: `_account` leaving out the last bucket a span reaches, or starting the first bucket at the bucket's
    start instead of the flow's; the link total not counting bytes accounted at a rate change. Contract (network.py:
    "Bytes are accounted per link into time buckets as they move"): 30 B at 10 B/s from 0.5 s to 3.5 s put 5, 10, 10,
    5 B into the 1-s buckets 0..3 and 30 B into the link's total."""
    loop = _NetLoop([10.0])
    loop.start(0.5, (0,), 30.0, "a")
    assert loop.run() == {"a": pytest.approx(3.5)}
    assert loop.buckets("l0") == pytest.approx({(0.0, 1.0): 5.0, (1.0, 2.0): 10.0, (2.0, 3.0): 10.0, (3.0, 4.0): 5.0})
    assert loop.net.link_total == pytest.approx([30.0])


def test_a_link_a_finished_flow_leaves_carries_no_more_bytes():
    """Mutants: a re-solve of a one-flow component giving its rate to every link of the component (not only the
    flow's path), and a re-solve that finds no flow left not setting the links' rates to 0 (bytes kept being
    accounted there). Contract (byte conservation, network.py): each link's buckets sum to the bytes of the flows
    that crossed it. a (links 0, 1) ends first; b (link 1) then runs alone; c (link 2) ends, nothing left on link 2."""
    loop = _NetLoop([10.0, 10.0, 10.0])
    loop.start(0.0, (0, 1), 10.0, "a")
    loop.start(0.0, (1,), 40.0, "b")
    loop.start(0.0, (2,), 5.0, "c")
    done = loop.run(until=9.0)
    assert done == pytest.approx({"a": 2.0, "b": 5.0, "c": 0.5})
    assert loop.net.link_total == pytest.approx([10.0, 50.0, 5.0])
    assert sum(loop.buckets("l0").values()) == pytest.approx(10.0)
    assert sum(loop.buckets("l2").values()) == pytest.approx(5.0)


def test_when_a_flow_ends_the_flows_it_shared_links_with_speed_up():
    """Mutants: `finish_flows` taking the finished flow off its first link only, or not re-solving its component.
    Contract (network.py: a change re-solves the component it touches; max-min fairness): a (links 0, 1) and b
    (link 1) share link 1 at 5 B/s each; once a is done at 2 s, b takes all 10 B/s: 40 B done at 2 + 30 / 10 = 5 s."""
    loop = _NetLoop([100.0, 10.0])
    loop.start(0.0, (0, 1), 10.0, "a")
    loop.start(0.0, (1,), 40.0, "b")
    assert loop.run() == pytest.approx({"a": 2.0, "b": 5.0})
    assert not loop.net.link_flows[1]


def test_flows_capped_above_their_share_of_a_link_share_it_max_min():
    """Mutant: `_all_capped` taking every flow's cap as its rate while the caps sum above a link's capacity.
    Contract (network.py, max-min fairness with per-flow caps): three read streams capped at 5 B/s on a 10 B/s link
    get 10/3 each (the shortcut holds only when the caps fit every link), as `max_min_rates` gives."""
    mod = _net_mod()
    net = mod.FlowNetwork(bucket_s=1.0)
    net.scheduler = lambda t, f, version: None
    link = net.add_link("l", 10.0)
    flows = net.start_flows([((link,), 1e6, lambda: None, 5.0)] * 3, 0.0)
    assert [f.rate for f in flows] == pytest.approx([10.0 / 3] * 3)
    assert mod.max_min_rates([10.0], [(0,)] * 3, [5.0] * 3) == pytest.approx([10.0 / 3] * 3)
    more = net.start_flow((net.add_link("m", 10.0),), 1e6, 0.0, lambda: None, 4.0)
    assert more.rate == pytest.approx(4.0)


def test_the_high_class_moves_at_most_its_share_of_the_link():
    """Mutant: `set_high_load` accounting the demanded high-class rate instead of what it gets (min(demand, share x
    capacity)). Contract (PAPER.md "QoS", network.py): collectives take up to `high_share` of a CNIC, so 1000 B/s
    demanded on a 100 B/s link at 0.99 moves 99 B/s: 198 B in 2 s, in '<link>/high'."""
    net = _net_mod().FlowNetwork(bucket_s=1.0)
    net.scheduler = lambda t, f, version: None
    link = net.add_link("c", 100.0, high_share=0.99)
    net.set_high_load(link, 1000.0, 0.0)
    net.flush(2.0)
    high = [nb for name, _, _, nb in net.link_bytes() if name == "c/high"]
    assert high == pytest.approx([99.0, 99.0])


def test_flows_finished_together_in_a_busy_network_keep_their_last_bytes():
    """Mutant: `finish_flows` dropping the bytes a coalesced flow still had (it finishes up to `coalesce_s` early, at
    the check). Contract (network.py: byte conservation; `finish_flows`: "Bytes a flow had left ... are accounted at
    `now` on its path"): 300 flows (a busy network, COALESCE_MIN_FLOWS) finishing within 1 ms of one another, each on
    its own link, finish at one check and each link still carries its flow's whole size."""
    mod = _net_mod()
    n = mod.COALESCE_MIN_FLOWS + 44
    loop = _NetLoop([1.0] * n, coalesce_s=1e-3)
    sizes = [1.0 + 2e-6 * i for i in range(n)]
    for i, size in enumerate(sizes):
        loop.start(0.0, (i,), size, i)
    done = loop.run()
    assert len(set(done.values())) == 1 and done[0] == pytest.approx(1.0)
    assert loop.net.link_total == pytest.approx(sizes, rel=1e-12, abs=0)


def test_flows_in_a_small_network_finish_at_their_own_times():
    """Mutant: completions coalesced (finished up to `coalesce_s` early) whatever the number of flows. Contract
    (network.py: coalescing only from COALESCE_MIN_FLOWS active flows; "small networks stay exact"): two flows 0.1 ms
    apart with coalesce_s = 1 ms finish at their own times."""
    loop = _NetLoop([1.0, 1.0], coalesce_s=1e-3)
    loop.start(0.0, (0,), 1.0, "a")
    loop.start(0.0, (1,), 1.0001, "b")
    assert loop.run() == {"a": pytest.approx(1.0, abs=1e-12), "b": pytest.approx(1.0001, abs=1e-12)}


def test_requests_waiting_for_a_des_hbm_are_allocated_in_placement_order():
    """Mutant: `_assign` letting a request that fits take the DE's HBM while others placed before it wait there
    (`de.alloc_queue or` dropped). Contract (`DecodeEngine.alloc_queue`: a request placed on a DE without room waits
    there, FIFO, until the tokens of the one at its head are free): round-robin with full_de="queue" on one DE of
    10,000 tokens; a (6,000 tokens) holds it, b (6,000) waits, c (2,000) would fit beside a but waits behind b."""
    b = 23640  # ds27b KV bytes per token
    cfg = load_sim_config(f"{TINY}:dualpath_rr", {"cluster.gpus_per_node": 1, "cluster.de_hbm_kv_gb": 10_000 * b / GB})
    assert cfg.policy_kwargs == {"full_de": "queue"}
    trajs = [
        Trajectory(0, [Turn(5900, 100)], arrival_time=0.01),
        Trajectory(1, [Turn(5900, 100)], arrival_time=0.011),
        Trajectory(2, [Turn(1900, 100)], arrival_time=0.012),
    ]
    sim = build_simulator(cfg, trajs)
    assert sim.snapshot.engines[1].free_hbm_tokens == 10_000
    records, _, stats = sim.run()
    assert stats["unfinished_turns"] == 0
    ra, rb, rc = sorted(records, key=lambda r: r.trajectory_id)
    assert ra.scheduled == rb.scheduled == rc.scheduled  # one fetch placed all three
    assert rb.read_start >= ra.finished
    assert rc.read_start >= rb.read_start and rc.prefill_start >= rb.prefill_start


class _RecordingBatcher:
    """Wraps the PE batcher: records (request, cached, bsz, PE-side hit, DE-side hit, hit) per batch item."""

    def __init__(self, inner, sim):
        self.inner, self.sim, self.items = inner, sim, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def form_batch(self, work):
        items = self.inner.form_batch(work)
        for it in items:
            r = self.sim.requests[it.request_id]
            self.items.append((it.request_id, it.cached, it.bsz, r.hit_pe, r.hit_de, r.hit))
        return items


@pytest.mark.parametrize("mode", ["layerwise", "basic"])
def test_each_cnic_carries_the_kv_of_the_data_paths(mode):
    """Mutants: the PE-side hit sent on to the DE with every chunk (not the first only) or with none; the DE-side
    reload of a chunk counting the DE-side hit only (not the chunks already sent to the DE buffer); loads on the PE's
    outbound CNIC or from the DE's inbound one; the write-back of a partly filled block, or on the DE's inbound CNIC;
    the DE's H2D or basic's sends and H2D of the wrong tokens. Contract (DESIGN.md "Data paths", simulator.py's
    header): layerwise, per chunk the PE loads its cached KV (PE-side hit from the PE buffer; the rest from the DE
    buffer over DE CNIC out -> PE CNIC in) and sends the new KV (plus the PE-side hit with the first chunk) PE CNIC out
    -> DE CNIC in; basic, the hit goes PE DRAM -> PE CNIC in, the whole prompt PE -> DE after the prefill; the DE
    moves the prompt DE DRAM -> DE CNIC in -> HBM and writes its filled blocks back DE CNIC out -> SNIC. One PE, one DE
    (full-duplex CNICs), long prompts split into chunks."""
    spec = f"{TINY}:{'dualpath' if mode == 'layerwise' else 'basic'},batcher.quota_s=0.02"
    cfg = load_sim_config(spec, {"cluster.gpus_per_node": 1})
    assert cfg.cluster.cnic_duplex and cfg.cluster.writeback and cfg.cluster.collective_bytes_per_token == 0
    trajs = [
        Trajectory(i, [Turn(9000 + 500 * i, 300, gap_s=0.5), Turn(5000, 90)], arrival_time=0.3 * i) for i in range(3)
    ]
    sim = build_simulator(cfg, trajs)
    if mode == "layerwise":
        sim.policy = _SplitAt(sim.policy, 0.5)
    sim.batcher = _RecordingBatcher(sim.batcher, sim)
    records, _, stats = sim.run()
    assert stats["unfinished_turns"] == 0
    items = sim.batcher.items
    assert len(items) > len({it[0] for it in items})  # some prompts took more than one chunk
    b, bs = sim.b, cfg.cluster.block_size
    wb = sum(max(0, (r.prompt_tokens + r.gen_tokens) // bs * bs - r.hit_tokens) for r in records) * b
    prompts = sum(r.prompt_tokens for r in records) * b
    if mode == "layerwise":
        assert any(hit_pe and hit_de for *_, hit_pe, hit_de, _ in items)
        assert any(hit_pe and cached > hit for _, cached, _, hit_pe, _, hit in items)  # a later chunk of a hit
        pe_in = sum(cached for _, cached, *_ in items) * b
        pe_out = sum(bsz + (hit_pe if cached == hit else 0) for _, cached, bsz, hit_pe, _, hit in items) * b
        de_out = sum(cached - hit_pe for _, cached, _, hit_pe, _, _ in items) * b + wb
    else:
        pe_in = sum(r.hit_tokens for r in records) * b
        pe_out = prompts
        de_out = wb
    want = {"cnic/engine0/in": pe_in, "cnic/engine0/out": pe_out, "cnic/engine1/out": de_out}
    want["cnic/engine1/in"] = pe_out + prompts
    got = {k: stats["link_totals"][k] for k in want}
    assert got == pytest.approx(want, rel=1e-9)


def test_an_agents_next_turn_waits_for_the_write_back_of_its_last_one():
    """Mutant: `_turn_done_decode` completing the turn (and so bringing on the agent's next turn) without waiting for
    its write-back. Contract (simulator.py's header: "the agent's next turn arrives when decode and write-back are done
    (+ the turn gap)"; the next turn reads those blocks back): with a DE storage NIC of 10 MB/s, the filled blocks of a
    4,000-token first turn take seconds to persist, far longer than its decode; turn 2 arrives after them."""
    cfg = load_sim_config(f"{TINY}:dualpath", {"cluster.snic_gbps": 0.01})
    trajs = [Trajectory(0, [Turn(4000, 30, gap_s=0.25), Turn(500, 10)], arrival_time=0.0)]
    records, _, stats = build_simulator(cfg, trajs).run()
    assert stats["unfinished_turns"] == 0
    first, second = records
    bs = cfg.cluster.block_size
    wb = ((first.prompt_tokens + first.gen_tokens) // bs * bs - first.hit_tokens) * 23640  # ds27b KV bytes per token
    rate = cfg.cluster.snic_gbps * GB * cfg.cluster.storage_efficiency
    assert second.arrival >= first.first_token + wb / rate * (1 - 1e-9) + 0.25
    assert second.arrival > first.finished + 1.0


def test_a_lone_turn_decodes_its_remaining_tokens_one_step_each():
    """Mutant: `_de_join` setting a turn's target to gen (not gen - 1) decode steps after its join. Contract
    (simulator.py: the prefill produces the first token; decode steps make the rest, one token each; DESIGN.md
    "Simulator"): alone on its DE, a turn of G tokens finishes G - 1 steps of its batch after its first token, and its
    second token comes one step after the first; a lone batch's step is the cost model's time for one sequence of
    the prompt's context (the batch changes only at joins and leaves)."""
    cfg = load_sim_config(f"{TINY}:dualpath")
    sim = build_simulator(cfg, [Trajectory(0, [Turn(3000, 40)])])
    (r,), _, stats = sim.run()
    step = sim.decode_time.time(1, 3000)
    assert step > 0
    assert r.second_token - r.first_token == pytest.approx(step, rel=1e-9)
    assert r.finished - r.first_token == pytest.approx(39 * step, rel=1e-9)


# ---- config: the modes -----------------------------------------------------------------------------------------------


def test_the_round_robin_mode_fetches_globally_queues_at_full_des_and_the_configs_own_kwargs_win():
    """Mutants: MODES["dualpath_rr"] with a per-node fetch scope, or without full_de="queue"; a mode's policy kwargs
    overriding the config's own. Contract (config.py MODES: ablation step 2, "Round-robin is global (every fetch may
    place on all engines) ... a request goes to the DE in turn and waits there for HBM (full_de="queue")";
    `sim_config_from_dict`: "the config's own win"): the mode's fetches pass no fetching node to the policy."""
    cfg = load_sim_config(f"{TINY}:dualpath_rr")
    assert (cfg.policy, cfg.cluster.fetch_scope, cfg.policy_kwargs) == ("round_robin", "global", {"full_de": "queue"})
    sim, _, _, stats = _recorded(cfg, _multi_turn(n_agents=3, turns=1))
    assert stats["unfinished_turns"] == 0 and sim.policy.calls
    assert {node for _, node, _ in sim.policy.calls} == {None}
    own = load_sim_config(f"{TINY}:dualpath_rr,policy.full_de=skip")
    assert own.policy_kwargs == {"full_de": "skip"}


def test_reads_and_write_backs_cross_the_storage_clusters_cap():
    """Mutant: storage reads leaving out the storage cluster's link (`_pump_reads`). Contract (config.py
    `storage_gbps`: the aggregate storage-cluster cap; simulator.py: every read and write-back is a flow over it): with a
    1 GB/s cap far below the storage NIC, a lone read of H bytes takes H / 1 GB/s, and the storage link carries every
    byte read and written back."""
    cfg = load_sim_config(f"{TINY}:pe_only", {"cluster.storage_gbps": 1.0, "cluster.read_stream_gbps": 0.0})
    sim = build_simulator(cfg, [Trajectory(0, [Turn(6000, 40, gap_s=0.1), Turn(300, 20)])])
    records, _, stats = sim.run()
    assert stats["unfinished_turns"] == 0
    first, second = records
    assert second.pe_read_bytes == second.hit_tokens * sim.b > 0
    assert second.read_end - second.read_start == pytest.approx(second.pe_read_bytes / 1e9, rel=1e-9)
    bs = cfg.cluster.block_size
    wb = sum(((r.prompt_tokens + r.gen_tokens) // bs * bs - r.hit_tokens) * sim.b for r in records)
    assert stats["link_totals"]["storage"] == pytest.approx(second.pe_read_bytes + wb, rel=1e-9)


def test_a_decode_step_is_timed_on_the_batchs_whole_context_generated_tokens_included():
    """Mutant: `_de_step` timing a DE's step on its requests' prompts only (the tokens they generated since they
    joined left out). Contract (simulator.py `_de_step`; the cost model's decode step time of n sequences and their
    total context): a decode step reads every sequence's KV, prompt and generated tokens. One DE: a decodes alone
    at time(1, prompt_a); when b joins, a has generated v tokens, and the batch steps at time(2, prompt_a + prompt_b +
    v) until a finishes (b outlives it)."""
    cfg = load_sim_config(f"{TINY}:dualpath", {"cluster.gpus_per_node": 1})
    trajs = [Trajectory(0, [Turn(3000, 600)], arrival_time=0.0), Trajectory(1, [Turn(2000, 3000)], arrival_time=1.0)]
    sim = build_simulator(cfg, trajs)
    records, _, stats = sim.run()
    assert stats["unfinished_turns"] == 0
    a, b = sorted(records, key=lambda r: r.trajectory_id)
    assert a.first_token < b.first_token < a.finished < b.finished
    step_a = sim.decode_time.time(1, 3000)
    v = (b.first_token - a.first_token) / step_a  # tokens a generated before b joined
    assert 50 < v < 599
    step_ab = sim.decode_time.time(2, int(3000 + 2000 + v))
    assert step_ab > sim.decode_time.time(2, 5000)
    assert a.finished == pytest.approx(b.first_token + (599 - v) * step_ab, rel=1e-9)


# ---- capacity: what a probe judges ----------------------------------------------------------------------------------


def test_a_probe_runs_its_drain_and_judges_only_the_turns_that_arrived_in_its_window(monkeypatch):
    """Mutants: `probe` judging every turn of the run (later turns of agents that arrived in the window too), or
    stopping the clock at the window's end (no drain). Contract (capacity.py: "turns that arrive in [warmup_s,
    duration_s) are judged ..., and the clock stops `drain_s` after the last arrival"): with duration_s = 60 s and a
    30-s drain, the run goes to 90 s and the turns arriving at 60 s and after are left out of the SLO."""
    from types import SimpleNamespace

    from dualpath_jax.metrics import TurnRecord
    from dualpath_jax.sim import capacity, runner

    cfg = load_sim_config(f"{TINY}:dualpath,aps=0.5,duration=60")
    recs = [
        TurnRecord(trajectory_id=i, turn_index=0, prompt_tokens=10, hit_tokens=0, gen_tokens=2, arrival=t)
        for i, t in enumerate([0.0, 59.5, 60.0, 75.0])
    ]
    seen = {}

    def fake_run(c, max_time):
        seen["max_time"], seen["aps"], seen["kind"] = max_time, c.workload.aps, c.workload.kind
        return SimpleNamespace(records=recs, stats={"turns_per_s": 1.0, "sim_end_s": 89.5}, summary={"hit_rate": 0.0})

    def fake_summary(c, records, clock_end_s=None):
        seen["judged"], seen["clock_end_s"] = [r.arrival for r in records], clock_end_s
        return {"slo_met": True}

    monkeypatch.setattr(runner, "run", fake_run)
    monkeypatch.setattr(runner, "slo_summary", fake_summary)
    out = capacity.probe(cfg, 0.25, drain_s=30.0)
    # (the run's end: a turn still decoding then whose TPOT is already certain to miss is a miss)
    assert seen == {"max_time": 90.0, "aps": 0.25, "kind": "online", "judged": [0.0, 59.5], "clock_end_s": 89.5}
    assert out["aps"] == 0.25 and out["slo_met"]


# ---- outputs: the per-link CSV ---------------------------------------------------------------------------------------


def test_links_csv_holds_each_link_bucket_as_link_t0_t1_bytes(tmp_path):
    """Mutant: `write_results` writing a link sample's fields out of order (t1 before t0). Contract (outputs.py:
    links.csv is "link, t0, t1, nbytes" per non-empty bucket, metrics.LinkBytes): each row is its sample's link, the
    bucket's start and end (t0 < t1) and its bytes, in the order of `result.links`."""
    import csv

    from dualpath_jax.sim import run
    from dualpath_jax.sim.outputs import write_results

    result = run(load_sim_config(f"{TINY}:dualpath,agents=2,turns=2"))
    assert result.links
    paths = write_results(result, str(tmp_path), config={}, plot=False)
    with open(paths["links"], newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["link", "t0", "t1", "nbytes"]
    got = [(name, float(t0), float(t1), int(nb)) for name, t0, t1, nb in rows[1:]]
    n = len(result.links)
    assert got[:n] == [(s.link, s.t0, s.t1, s.nbytes) for s in result.links]
    assert all(t0 < t1 for _, t0, t1, _ in got[:n])
    # then one zero-byte row at t = 0 for each link that moved nothing (2026-12-05)
    idle = [k for k, v in result.stats["link_totals"].items() if v == 0]
    assert got[n:] == [(k, 0.0, 0.0, 0) for k in idle]


# ---- follow-up (session 25, late): decode clock and write-back on a hand-set state; config, capacity, outputs ----


def _cut_mid_decode(cfg, turn=(3000, 600), max_time=2.0):
    """A tiny run of one turn cut by `max_time` while it decodes (run() syncs the groups' clocks at the cut and leaves
    the events after it): the simulator is left in a state its internals can be called on."""
    sim = build_simulator(cfg, [Trajectory(0, [Turn(*turn)])])
    sim.run(max_time=max_time)
    (g,) = [g for g in sim.de_groups if any(m.active for m in g.members)]
    (de,) = [m for m in g.members if m.active]
    return sim, g, de


def test_a_finish_that_pops_nothing_re_times_the_batch_on_its_grown_context():
    """Mutant S62: `_de_finish` re-timing only the DEs whose batch changed (`for de in changed:`), so a finish event
    that pops nothing (rounding: the clock stood a hair short of the target) leaves every step time as it was.
    Contract (`_de_finish`: "New step times for the members whose batch changed (all of them if none did: the clock
    moved)"; a decode step reads the batch's whole context, DESIGN.md "Simulator"): called directly (a documented use
    of the internals) at a cut 2 s into a lone 600-token decode, with the turn not due, the DE's step becomes the cost
    model's time for one sequence of prompt + the tokens generated so far."""
    cfg = load_sim_config(f"{TINY}:dualpath")
    sim, g, de = _cut_mid_decode(cfg)
    assert 100 < g.v < 599 and g.tv == sim.now == 2.0
    old = de.step
    assert old == sim.decode_time.time(1, 3000)
    sim._de_finish((g, g.version))
    assert len(de.active) == 1  # nothing was due
    assert de.step == sim.decode_time.time(1, int(3000 + g.v)) > old
    assert g.step == de.step


def test_a_finish_already_due_is_rescheduled_now_not_in_the_past():
    """Mutant S51: `_de_reschedule` scheduling the next finish at now + (target - v) x step without the clamp at 0,
    so a finish already due when the batch changes (its target at or below the clock, as when a request joins at the
    instant another one is due) lands before `now` and the event loop's clock would run backwards. Contract (the
    event queue: no event is scheduled in the past; `_de_reschedule`): on a hand-set state (the running turn's target
    put half a token below the clock at a cut), the rescheduled finish is at `now`, and it finishes the turn then."""
    cfg = load_sim_config(f"{TINY}:dualpath")
    sim, g, de = _cut_mid_decode(cfg)
    (entry,) = g.finish_heap
    g.finish_heap[0] = (g.v - 0.5,) + tuple(entry[1:])
    sim._de_reschedule(g)
    t, _, _, fn, arg = sim.events.pop()
    assert t == sim.now == 2.0
    assert arg == (g, g.version)
    fn(arg)
    assert not de.active


def test_a_write_back_takes_a_reservation_only_where_the_low_class_has_room_for_its_pace():
    """Mutant S58: `_start_writeback` taking a fixed-rate reservation whenever its pace is under 1% of the path's
    capacity, without checking what the KV (low) class has left on each link. Contract (`_start_writeback`: "within
    what the KV class has left on each (reservations and collectives take the rest), it is a fixed-rate reservation;
    otherwise an ordinary flow capped at that pace"; FlowNetwork.reserve: the caller checks `low_cap`): with all but
    10 MB/s of the DE node's storage NIC held by a reservation made before the run, a 4,000-token turn's write-back
    (~95 MB, paced far below 1% of the NIC) is a flow on what is left and takes seconds, so the agent's next turn
    arrives that much after the first one finishes; a reservation would end with the decode."""
    cfg = load_sim_config(f"{TINY}:dualpath")
    sim = build_simulator(cfg, [Trajectory(0, [Turn(4000, 60, gap_s=0.1), Turn(500, 10)], arrival_time=0.0)])
    snics = {de.node.snic for g in sim.de_groups for de in g.members}
    assert len(snics) == 1
    (snic,) = snics
    left = 10e6
    rate = sim.net.low_cap[snic] - left
    sim.net.reserve((snic,), rate * 1e4, rate, 0.0)
    assert sim.net.low_cap[snic] == pytest.approx(left, rel=1e-6)
    records, _, stats = sim.run()
    assert stats["unfinished_turns"] == 0
    first, second = records
    bs = cfg.cluster.block_size
    wb = ((first.prompt_tokens + first.gen_tokens) // bs * bs - first.hit_tokens) * sim.b
    assert wb / (first.finished - first.first_token) < 0.01 * sim.net.capacity[snic]  # the pace test passes
    assert second.arrival >= first.first_token + wb / left * (1 - 1e-6) + 0.1


@pytest.mark.parametrize("field", ["slo_ttft_s", "slo_tpot_s"])
def test_either_slo_bound_may_be_infinite_to_judge_on_the_other_alone(field):
    """Mutant K24: `_INF_OK` without config.slo_tpot_s, so `slo_tpot_s=inf` (a TTFT-only SLO) is refused as "must
    be finite" like a capacity. Contract (config.py `_INF_OK`: the two SLO bounds are the only fields that may be
    infinite; runner.slo_summary judges TTFT <= slo_ttft_s and TPOT <= slo_tpot_s): with either bound infinite the
    config loads, from the command line and changed in code, and a tiny run meets the SLO on the other bound alone."""
    from dualpath_jax.sim import runner

    cfg = load_sim_config(f"{TINY}:agents=2,turns=2", {field: math.inf})
    assert getattr(cfg, field) == math.inf
    cfg = dataclasses.replace(load_sim_config(f"{TINY}:agents=2,turns=2"), **{field: math.inf})
    sim = build_simulator(cfg)
    records, _, stats = sim.run()
    assert stats["unfinished_turns"] == 0
    s = runner.slo_summary(cfg, records)
    assert s["slo_turns"] == len(records) > 0 and s["slo_met"]


@pytest.mark.parametrize("lo, hi", [(1.0, 1.0), (2.0, 1.0), (0.0, 1.0)])
def test_a_capacity_search_needs_a_bracket_of_positive_width_before_any_probe(monkeypatch, lo, hi):
    """Mutant P06: `capacity_search` accepting lo == hi (`0 < lo <= hi`), so an empty bracket runs two identical
    probes and reports hi as the capacity found. Contract (capacity.py `capacity_search`: "Bisection for the max APS
    meeting the SLO in [lo, hi]"; ValueError "needs 0 < lo < hi"): an empty, reversed or non-positive bracket is
    refused before anything is simulated."""
    from dualpath_jax.sim import capacity, runner

    def no_run(*args, **kwargs):
        raise AssertionError("a probe ran")

    monkeypatch.setattr(runner, "run", no_run)
    cfg = load_sim_config(f"{TINY}:dualpath,aps=0.5,duration=60")
    with pytest.raises(ValueError, match="needs 0 < lo < hi"):
        capacity.capacity_search(cfg, lo, hi, iters=1)


def test_summary_json_holds_the_link_totals_once_beside_the_stats(tmp_path):
    """Mutant O03: `write_results` copying every stat into summary.json's "stats", the per-link byte totals
    included, so they are written twice (a large run has thousands of links). Contract (outputs.py `write_results`:
    summary.json is {"summary", "stats" less the link totals, "link_totals", "config", "policy_config"}): the link totals appear once,
    at the top level, equal to the run's, and every other stat is under "stats"."""
    import json

    from dualpath_jax.sim import run
    from dualpath_jax.sim.outputs import write_results

    result = run(load_sim_config(f"{TINY}:dualpath,agents=2,turns=2"))
    paths = write_results(result, str(tmp_path), config={"x": 1}, plot=False)
    with open(paths["summary"]) as f:
        summary = json.load(f)
    assert set(summary) == {"summary", "stats", "link_totals", "config", "policy_config"}
    assert "link_totals" not in summary["stats"]
    assert set(summary["stats"]) == set(result.stats) - {"link_totals"}
    assert summary["link_totals"] == pytest.approx(result.stats["link_totals"])
    assert summary["link_totals"] and summary["config"] == {"x": 1}


@pytest.mark.parametrize("value, message", [(-1, "must be >= 0, got -1"), (1.5, "must be an integer, got 1.5")])
def test_a_turn_limit_that_is_negative_or_fractional_is_refused_by_name(value, message):
    """Mutant K26: `validate_sim_config` without its check of config.workload.max_turns, so -1 runs every turn of
    every trajectory (runner truncates only when > 0) and 1.5 fails deep in the slicing, naming no field. Contract
    (config.py: max_turns "> 0: truncate every trajectory", an int >= 0 like every count; an out-of-range value is an
    error naming the field): refused when a config changed in code is built, and -1 at load too (the command line
    refuses a float for an int field by itself)."""
    if isinstance(value, int):
        with pytest.raises(ValueError, match=f"config.workload.max_turns {message}"):
            load_sim_config(f"{TINY}:agents=2,turns=2", {"workload.max_turns": value})
    cfg = load_sim_config(f"{TINY}:agents=2,turns=2")
    cfg = dataclasses.replace(cfg, workload=dataclasses.replace(cfg.workload, max_turns=value))
    with pytest.raises(ValueError, match=f"config.workload.max_turns {message}"):
        build_simulator(cfg)


class _SlotsChecked:
    """Wraps a policy: every snapshot it is shown has no room on a DE whose decode slots are all taken."""

    def __init__(self, inner, slots):
        self.inner, self.slots, self.full_seen = inner, slots, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def schedule(self, snapshot, queue, fetching_node=None):
        for s in snapshot.engines.values():
            if s.role == "decode" and s.seq >= self.slots:
                self.full_seen += 1
                assert s.free_hbm_tokens == 0, s
        return self.inner.schedule(snapshot, queue, fetching_node=fetching_node)


def _peak_per_decode_engine(records) -> int:
    """The most turns a decode engine held at once (its HBM from the reads' start to the turn's end)."""
    peak = 0
    for de in {r.decode_engine for r in records}:
        ev = sorted([(r.read_start, 1) for r in records if r.decode_engine == de]
                    + [(r.finished, -1) for r in records if r.decode_engine == de], key=lambda x: (x[0], x[1]))  # fmt: skip
        live = 0
        for _, d in ev:
            live += d
            peak = max(peak, live)
    return peak


def test_a_decode_engine_of_full_slots_shows_no_room_and_never_holds_more():
    """Mutation audit of session 44 (si02, si05): a DE holding exactly `de_max_seqs` sequences still showed free HBM to
    the policy (basic's mean TTFT +1.6% on sim_tiny), and nothing checked the slots bound with `full_de="queue"`."""
    cfg = load_sim_config(f"{TINY}:dualpath", {"cluster.de_max_seqs": 2})
    sim = build_simulator(cfg, _multi_turn(n_agents=12))
    sim.policy = _SlotsChecked(sim.policy, 2)
    records, _, stats = sim.run()
    assert stats["unfinished_turns"] == 0 and sim.policy.full_seen  # (the check was exercised)
    assert _peak_per_decode_engine(records) <= 2
    cfg = load_sim_config(f"{TINY}:dualpath_rr", {"cluster.de_max_seqs": 2})
    assert cfg.policy_kwargs == {"full_de": "queue"}
    records, _, stats = build_simulator(cfg, _multi_turn(n_agents=12)).run()
    assert stats["unfinished_turns"] == 0 and _peak_per_decode_engine(records) <= 2
