"""Every GPU <-> host copy of the runtime crosses the engine's own emulated CNIC (DESIGN.md "Data paths": all GPU
traffic goes through that GPU's CNIC; PAPER.md: even local H2D goes through it), at low priority (KV), in the
direction it crosses the full-duplex NIC (as the simulator's cnic / cnic_in): the PE's per-layer H2D of the cached
KV it feeds and the DE's H2D of the prompt KV into its slot on the ingress link ("cnic/engine<E>/in"), the D2H of
each block filled while decoding (before the SNIC) on the egress link with the transport's writes. Until 2026-12-03
only the transports' writes were paced, so these bytes were missing from the per-link records and no CNIC cap
slowed them.
"""

from __future__ import annotations

import threading
import time
import types

import numpy as np
import pytest

from dualpath_jax.runtime import driver
from dualpath_jax.traffic import TrafficManager


def assert_tokens_equal_reference(res, reference, trajs) -> None:
    total = sum(len(t.turns) for t in trajs)
    keys = [(r.trajectory_id, r.turn_index) for r in res.records]
    assert len(keys) == total and len(set(keys)) == total, "every turn must complete exactly once"
    bad = [k for k in reference if not np.array_equal(reference[k], res.tokens[k])]
    assert not bad, f"turns whose tokens differ from the reference: {bad}"


def link_bytes(res, name: str) -> int:
    return sum(s.nbytes for s in res.links if s.link == name)


def decode_filled_blocks(prompt: int, gen: int, bs: int) -> int:
    """Blocks that fill while decoding: the KV grows from `prompt` to `prompt + gen - 1` tokens (the last generated
    token is never fed)."""
    return (prompt + gen - 1) // bs - prompt // bs


def expected_cnic_bytes(res, kv: int, bs: int, h2d_cached_tokens: dict | None = None) -> dict:
    """Low-class bytes on each engine's CNIC links, from the turn records (no failures: every read whole).

    Egress ("cnic/engine<E>/low"): a PE's writes to the DE (the PE-read hit and the miss); a DE's forwarded DE-read
    hit and the D2H of the blocks filled while decoding. Ingress ("cnic/engine<E>/in/low"): the cached KV each PE
    layer feeds into HBM (the hit, when not chunked); the DE's H2D of the prompt KV.
    """
    want: dict = {}

    def add(name, n):
        want[name] = want.get(name, 0) + n

    for r in res.records:
        pe, de = f"cnic/engine{r.prefill_engine}", f"cnic/engine{r.decode_engine}"
        add(f"{pe}/in/low", r.hit_tokens * kv if h2d_cached_tokens is None else 0)
        add(f"{pe}/low", r.pe_read_bytes + (r.prompt_tokens - r.hit_tokens) * kv)
        d2h = decode_filled_blocks(r.prompt_tokens, r.gen_tokens, bs) * bs * kv
        add(f"{de}/low", r.de_read_bytes + d2h)
        add(f"{de}/in/low", r.prompt_tokens * kv)
    for pe, tokens in (h2d_cached_tokens or {}).items():
        add(f"cnic/engine{pe}/in/low", tokens * kv)
    return want


@pytest.mark.parametrize("policy", ["basic", "de_only", "split"])
def test_cnic_records_hold_every_h2d_and_d2h_byte(base, ops, trajs, reference, policy):
    """PE path (basic): the PE's CNIC ingress now carries the hit KV it loads into HBM, its egress the hit + miss it
    writes to the DE; DE path (de_only): the DE-read hit the PE feeds into HBM crosses the PE's CNIC ingress too (a
    GPU cluster writes it into HBM through that NIC: the simulator's PE cnic_in); every DE's CNIC carries the prompt
    KV's H2D (ingress) and the decode write-back's D2H (egress). Before, each PE CNIC showed only its writes and each
    DE CNIC only its forwarded reads (none at all on the PE path). Tokens stay the reference's."""
    cfg = base.replace(**{"scheduler.name": policy})
    res = driver.run(cfg, trajs, model_ops=ops)
    assert_tokens_equal_reference(res, reference, trajs)
    kv = ops.config.kv_bytes_per_token
    assert kv == ops.kv_layout.num_layers * ops.kv_layout.bytes_per_token_per_layer
    want = expected_cnic_bytes(res, kv, cfg.block_size)
    got = {name: link_bytes(res, name) for name in want}
    assert got == want
    assert sum(r.hit_tokens for r in res.records) > 0, "the run must load some hit KV"
    assert not any(s.link.endswith("/high") and s.nbytes for s in res.links), "KV is low priority"
    if policy == "basic":  # PE path: the hit KV the PE loads shows on its CNIC's ingress; its egress holds its writes
        assert got["cnic/engine0/low"] == sum(r.prompt_tokens for r in res.records) * kv
        assert got["cnic/engine0/in/low"] == sum(r.hit_tokens for r in res.records) * kv > 0


def test_chunked_prefill_feeds_every_chunks_cached_kv_through_the_cnic(base, ops, trajs, reference):
    """Chunked prefill (a prefill token budget of 8): each chunk feeds the KV of everything before it (hit and earlier
    chunks) into HBM again, layer by layer; all of it crosses the PE's CNIC, as the measured steps say."""
    cfg = base.replace(**{"scheduler.name": "split", "cluster.prefill_token_budget": 8})
    res = driver.run(cfg, trajs, model_ops=ops)
    assert_tokens_equal_reference(res, reference, trajs)
    steps = res.node_stats[0]["step_log"][0]
    cached = sum(c0 for items, _ in steps for c0, _n in items)
    assert len(steps) > len(res.records) and cached > sum(r.hit_tokens for r in res.records)
    kv = ops.config.kv_bytes_per_token
    want = expected_cnic_bytes(res, kv, cfg.block_size, h2d_cached_tokens={0: cached})
    assert {name: link_bytes(res, name) for name in want} == want


def test_a_transport_and_the_engines_copies_share_one_cnic_link():
    """The transport's pacer and the engine's own pacer are two `Pacer`s over one `Link` (node.py asks the traffic
    manager for `cnic/engine<E>` twice): the link's one timeline grants both, so together they get the link's rate,
    not twice it, and one record holds both."""
    rate, interval = 10e6, 0.02
    tm = TrafficManager(sample_interval=interval)
    link = tm.add_cnic(0, rate)
    transport_pacer, engine_pacer = tm.pacer("cnic/engine0"), tm.pacer("cnic/engine0")
    assert transport_pacer.links[0] is engine_pacer.links[0] is link
    nbytes = 1 << 20

    def pace(p):
        p.pace(nbytes, "low")

    threads = [threading.Thread(target=pace, args=(p,)) for p in (transport_pacer, engine_pacer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert link.bytes_by_class == {"high": 0, "low": 2 * nbytes}
    samples = tm.samples()
    assert {s.link for s in samples} == {"cnic/engine0/low"}
    # The link's own timeline (not the wall clock): the grants of both flows, in order, never run ahead of the one
    # rate (by more than the burst and a chunk); two separate caps would grant both megabytes in the first half.
    first = min(s.t0 for s in samples)
    early = sum(s.nbytes for s in samples if s.t1 <= first + 0.1)
    assert early <= rate * (0.1 + link.burst_s) + link.quantum < 2 * nbytes * 0.75


# ------------------------------------------------------------------ the decode engine's copies, one step at a time
class _GatePacer:
    """A CNIC pacer that lets each transfer through once `gate` is set; records what it paced."""

    def __init__(self):
        self.gate = threading.Event()
        self.log: list = []

    def pace(self, nbytes, priority="low"):
        assert self.gate.wait(30)
        self.log.append((nbytes, priority))


class _StubBatch:
    def __init__(self):
        self.loaded: dict = {}

    def load(self, slot, area, prompt_tokens):
        self.loaded[slot] = area[:, :prompt_tokens].copy()

    def step(self, tokens, lengths, mask):
        return np.where(mask, 5, 0).astype(np.int32)

    def read_block(self, slot, start, block_size):
        kv = self.loaded[slot]
        return np.zeros((kv.shape[0], block_size, kv.shape[2]), np.uint8)

    def free(self, slot):
        self.loaded.pop(slot, None)


def _decode_engine(cnic, snic, L=2, bpt=8, bs=4, slots=2):
    from dualpath_jax.host_buffers import HostBufferPool
    from dualpath_jax.runtime.engines import DecodeEngine

    kv = types.SimpleNamespace(num_layers=L, bytes_per_token_per_layer=bpt)
    batch = _StubBatch()
    model = types.SimpleNamespace(kv_layout=kv, new_decode_batch=lambda n, cap: batch)
    cfg = types.SimpleNamespace(block_size=bs, cluster=types.SimpleNamespace(decode_slots=slots, max_seq_len=64))
    events = []
    ctx = types.SimpleNamespace(cfg=cfg, model=model, emit=events.append)
    transport = types.SimpleNamespace(
        register=lambda name, arena: None, send=lambda peer, payload: None, peers=lambda: ["engine0"]
    )
    pool = HostBufferPool(slot_nbytes=bs * bpt, budget_bytes=L * 32 * bpt, prefault=False)
    eng = DecodeEngine(1, 1, ctx, transport, pool, snic, cnic=cnic)
    for q in (eng._h2d, eng._d2h):  # its copy threads only: this test drives the engine's loop itself
        q.thread.start()
    return eng, events


def _task(rid, prompt_tokens, gen_tokens, bs=4):
    from dualpath_jax.block_keys import block_keys
    from dualpath_jax.runtime.control import TurnTask

    ids = np.arange(prompt_tokens, dtype=np.int32) + rid
    return TurnTask(rid, 0, rid, 0, ids, gen_tokens, block_keys(ids, bs), 0, 0, 0, 1, "pe")


def _prefilled(eng, rid, prompt_tokens, gen_tokens):
    eng._handle("task", _task(rid, prompt_tokens, gen_tokens))
    eng._prepare()
    eng.reqs[(rid, 0)].area[...] = rid  # the prompt KV the PE wrote
    msg = {"kind": "prefill_done", "request_id": rid, "attempt": 0, "hit_tokens": 0, "first_token": 3}
    eng._handle("msg", msg)
    return eng.reqs[(rid, 0)]


def _drain(eng):
    while (item := eng.inbox.get(0.05)) is not None:
        eng._handle(*item)


def test_decode_engine_h2d_crosses_its_cnic_while_other_slots_decode():
    """A prompt's H2D waits for the DE's CNIC on the DE's copy thread: the request holds its slot and its buffer area
    meanwhile, the requests already in slots keep decoding, and it runs (first token out) once its bytes crossed."""
    cnic = _GatePacer()
    writes = []
    snic = types.SimpleNamespace(submit_write=writes.append)
    eng, events = _decode_engine(cnic, snic)
    try:
        cnic.gate.set()
        a = _prefilled(eng, 1, 6, gen_tokens=8)
        eng._admit()
        _drain(eng)
        assert a.stage == "decoding" and cnic.log == [(2 * 6 * 8, "low")]  # L x prompt x bpt
        cnic.gate.clear()
        b = _prefilled(eng, 2, 5, gen_tokens=4)
        eng._admit()
        assert b.stage == "loading" and eng.slot_req[b.slot] is b and not b.handle.released
        for _ in range(3):
            eng._step()
        assert len(a.tokens) == 4 and b.tokens == [3], "the slot in decode went on; the loading one did not"
        assert [e.kind for e in events if e.request_id == 2] == []  # no first token before its KV is in HBM
        cnic.gate.set()
        _drain(eng)
        assert b.stage == "decoding" and b.handle.released and b.length == 5
        assert [e.kind for e in events if e.request_id == 2] == ["first_token"]
        assert (2 * 5 * 8, "low") in cnic.log[1:]  # (beside the D2H of a's second block)
    finally:
        eng.stop()
        eng.join(5)


def test_decode_write_back_crosses_the_cnic_before_the_snic_and_holds_the_turn():
    """A block filled while decoding is read back from HBM (D2H) through the DE's CNIC before its SNIC write: the
    write job reaches the SNIC only after the CNIC let its bytes through, and the turn is reported only after it."""
    cnic = _GatePacer()
    cnic.gate.set()
    writes = []
    snic = types.SimpleNamespace(submit_write=writes.append)
    eng, events = _decode_engine(cnic, snic)
    try:
        r = _prefilled(eng, 1, 3, gen_tokens=3)  # 3 prompt tokens: no whole prompt block; decode fills block 0
        eng._admit()
        _drain(eng)
        assert r.stage == "decoding" and writes == []
        cnic.gate.clear()
        eng._step()  # length 4: block 0 is full
        eng._step()
        assert r.stage == "finishing" and r.writes_pending == 1
        _drain(eng)
        assert writes == [], "the write-back must cross the CNIC before it reaches the SNIC"
        eng._report_finished()
        assert "turn_done" not in [e.kind for e in events]
        cnic.gate.set()
        _drain(eng)
        (job,) = writes
        assert cnic.log[-1] == (2 * 4 * 8, "low")  # one Full Block: L x block x bpt
        job.on_done(1)
        _drain(eng)
        eng._report_finished()
        assert [e.kind for e in events if e.kind == "turn_done"] == ["turn_done"]
    finally:
        eng.stop()
        eng.join(5)


def test_a_request_cancelled_during_its_h2d_frees_its_slot_and_area():
    """A request dropped (its PE died) while its prompt KV waits for the CNIC: its slot and buffer area are free at
    once, and the copy's late completion is ignored (it used to be loaded synchronously, so there was no such state)."""
    from dualpath_jax.runtime.control import Cancel

    cnic = _GatePacer()
    eng, events = _decode_engine(cnic, types.SimpleNamespace(submit_write=lambda job: None), slots=1)
    try:
        r = _prefilled(eng, 1, 6, gen_tokens=4)
        eng._admit()
        assert r.stage == "loading" and eng.slot_req[0] is r
        eng._handle("cancel", Cancel(1, 0))
        assert eng.slot_req == [None] and r.handle.released and (1, 0) not in eng.reqs
        r2 = _prefilled(eng, 2, 5, gen_tokens=4)
        eng._admit()
        assert r2.stage == "loading" and eng.slot_req[0] is r2
        cnic.gate.set()
        _drain(eng)  # both copies complete: the dropped one's is ignored
        assert r2.stage == "decoding" and eng.batch.loaded.keys() == {0}
        assert (eng.batch.loaded[0] == 2).all(), "the slot holds the live request's KV"
        assert [(e.kind, e.request_id) for e in events] == [("first_token", 2)]
    finally:
        eng.stop()
        eng.join(5)


def test_a_prefill_waiting_for_its_cnic_does_not_hold_up_another_engines_prefill(ops):
    """Two PEs in one process share one `ModelOps`: while one PE's layer load waits for its CNIC (or for a DE's
    layers), another PE's prefill runs to the end. Until 2026-12-03 a lock held for the whole layerwise prefill,
    waits included, made the second wait for the first."""
    bpt = ops.kv_layout.bytes_per_token_per_layer
    cached = 64
    gate, entered = threading.Event(), threading.Event()

    def blocked_h2d(nbytes):
        entered.set()
        assert gate.wait(60)

    def cached_layer(layer):
        return [np.zeros((cached, bpt), np.uint8)]

    first = {}
    t = threading.Thread(
        target=lambda: first.setdefault(
            "tokens",
            ops.prefill([np.arange(8, dtype=np.int32)], [cached], cached_layer, lambda layer, kv: None, blocked_h2d),
        )
    )
    t.start()
    try:
        assert entered.wait(60), "the first prefill never reached its H2D"
        done = threading.Event()
        second = threading.Thread(
            target=lambda: (
                ops.prefill([np.arange(5, dtype=np.int32)], [0], cached_layer, lambda layer, kv: None),
                done.set(),
            )
        )
        second.start()
        assert done.wait(60), "the second engine's prefill waited for the first one's CNIC"
        assert not first, "the first prefill is still waiting for its CNIC"
    finally:
        gate.set()
        t.join(60)
    assert "tokens" in first


def test_a_request_dropped_before_its_h2d_starts_takes_no_cnic_time():
    """A request dropped (its PE died) while its prompt KV's copy still waits in the DE's H2D queue behind another's:
    its copy is skipped -- nothing paced for it, so it neither delays the copies queued behind it nor adds bytes to the
    CNIC's ingress record. Until 2026-12-03 (hunt) its bytes were still paced whole, for an area already freed."""
    from dualpath_jax.runtime.control import Cancel

    cnic = _GatePacer()
    eng, events = _decode_engine(cnic, types.SimpleNamespace(submit_write=lambda job: None), slots=3)
    try:
        a = _prefilled(eng, 1, 6, gen_tokens=4)
        eng._admit()
        b = _prefilled(eng, 2, 5, gen_tokens=4)
        c = _prefilled(eng, 3, 7, gen_tokens=4)
        eng._admit()
        assert (a.stage, b.stage, c.stage) == ("loading", "loading", "loading")
        eng._handle("cancel", Cancel(2, 0))  # b's copy has not started: a's holds the (closed) CNIC
        cnic.gate.set()
        deadline = time.monotonic() + 30
        while c.stage != "decoding" and time.monotonic() < deadline:
            _drain(eng)
        assert a.stage == c.stage == "decoding"
        assert cnic.log == [(2 * 6 * 8, "low"), (2 * 7 * 8, "low")], "the dropped request's H2D was paced"
        assert [(e.kind, e.request_id) for e in events] == [("first_token", 1), ("first_token", 3)]
    finally:
        eng.stop()
        eng.join(5)


def test_a_request_dropped_with_its_d2h_queued_writes_nothing_more():
    """A request dropped while a filled block's D2H still waits for the DE's CNIC: the copy is skipped (no CNIC time, no
    SNIC write of a dropped attempt's block; its re-run writes the block), and the copies behind it go on."""
    from dualpath_jax.runtime.control import Cancel

    cnic = _GatePacer()
    cnic.gate.set()
    writes = []
    eng, events = _decode_engine(cnic, types.SimpleNamespace(submit_write=writes.append), slots=2)
    try:
        a = _prefilled(eng, 1, 3, gen_tokens=4)  # 3 prompt tokens: the first decode step fills block 0
        b = _prefilled(eng, 2, 3, gen_tokens=4)
        eng._admit()
        deadline = time.monotonic() + 30
        while not (a.stage == b.stage == "decoding") and time.monotonic() < deadline:
            _drain(eng)
        cnic.gate.clear()
        eng._step()  # both fill block 0: two D2H jobs queue behind the closed CNIC
        assert a.writes_pending == b.writes_pending == 1 and writes == []
        eng._handle("cancel", Cancel(1, 0))
        cnic.gate.set()
        while not writes and time.monotonic() < deadline:
            _drain(eng)
        time.sleep(0.2)
        _drain(eng)
        assert len(writes) == 1 and len(cnic.log) == 3 and cnic.log[-1] == (2 * 4 * 8, "low")  # 2 H2D + b's D2H
        writes[0].on_done(1)  # the one write is b's
        _drain(eng)
        assert b.writes_pending == 0
    finally:
        eng.stop()
        eng.join(5)


def test_a_stopped_prefill_engine_stops_pacing_its_h2d():
    """A PE stopped (its node killed) inside a layer's H2D on a slow CNIC leaves the batch at once, as it does while
    waiting for a DE's layers. Until 2026-12-03 (hunt) the rest of the H2D was paced to the end: the thread outlived
    `EngineGroup.kill`'s join (kill took its whole 2 s timeout) and its transport was closed under it."""
    from dualpath_jax.block_keys import block_keys
    from dualpath_jax.host_buffers import HostBufferPool
    from dualpath_jax.runtime.control import TurnTask
    from dualpath_jax.runtime.engines import PrefillEngine, _PrefillReq

    L, bpt, bs = 2, 8, 4
    tm = TrafficManager()
    tm.add_cnic_in(0, 1e4)  # 10 kB/s: the 1 MB H2D below would take ~100 s
    entered = threading.Event()

    def prefill(token_ids, cached, cached_layer, on_layer, h2d=None):
        entered.set()
        h2d(1 << 20)
        return np.zeros((len(token_ids),), np.int32)

    kv = types.SimpleNamespace(num_layers=L, bytes_per_token_per_layer=bpt)
    model = types.SimpleNamespace(kv_layout=kv, prefill=prefill)
    cfg = types.SimpleNamespace(block_size=bs, cluster=types.SimpleNamespace(decode_slots=1, max_seq_len=64))
    ctx = types.SimpleNamespace(cfg=cfg, model=model, emit=lambda ev: None)
    transport = types.SimpleNamespace(register=lambda name, arena: None)
    pool = HostBufferPool(slot_nbytes=bs * bpt, budget_bytes=L * 32 * bpt, prefault=False)
    eng = PrefillEngine(0, 0, ctx, transport, pool, None, cnic_in=tm.pacer("cnic/engine0/in"), batcher=None)
    ids = np.arange(8, dtype=np.int32)
    task = TurnTask(1, 0, 1, 0, ids, 2, block_keys(ids, bs), 1, 1, 0, 1, "pe")
    r = _PrefillReq(task=task, bs=bs, area=np.zeros((L, 8, bpt), np.uint8), final_hit=4, cached=4)
    raised = []

    def batch():
        try:
            eng._run_batch([(r, 4, 4)])
        except RuntimeError as e:
            raised.append(e)

    t = threading.Thread(target=batch, daemon=True)
    t.start()
    assert entered.wait(30)
    eng.stop()
    t.join(30)
    assert not t.is_alive(), "the stopped PE kept pacing its H2D"
    assert raised and "stopped" in str(raised[0])


def test_layerwise_pe_runs_its_next_batch_while_the_last_ones_kv_crosses_to_the_de(base, ops, reference_for):
    """Layerwise prefill: once a request's last layer is computed, its KV writes to the DE drain on the CNIC's egress
    while the PE runs its next batch (whose H2D crosses the ingress), as the simulator's full-duplex CNIC overlaps
    them. The PE used to wait for the writes before its next batch: on a CNIC-tight setup ingress and egress added up
    (the main job at CNIC 4e6 B/s: layerwise 45.2 s against Basic's 27.8 s). One request a batch and a slow CNIC
    (each turn's ~50 KB takes ~0.25 s to cross): the next request's batch starts before the last one's hand-over."""
    cfg = base.replace(
        **{
            "scheduler.name": "basic",
            "cluster.prefill_max_batch": 1,
            "nics.cnic_bytes_per_s": 2e5,
            "workload.agents": 3,
            "workload.turns": 1,
        }
    )
    trajs = driver.make_trajectories(cfg)
    res = driver.run(cfg, trajs, model_ops=ops)
    assert_tokens_equal_reference(res, reference_for(cfg, ops, trajs), trajs)
    recs = sorted(res.records, key=lambda r: r.prefill_start)
    assert len(recs) == 3 and {r.prefill_engine for r in recs} == {0}
    overlapped = [(a, b) for a, b in zip(recs, recs[1:], strict=False) if b.prefill_start < a.prefill_end]
    assert overlapped, [(r.trajectory_id, r.prefill_start, r.prefill_end) for r in recs]
