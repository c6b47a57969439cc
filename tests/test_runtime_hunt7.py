"""Runtime hunt, seventh round: engines, storage NIC, driver (tests fail on the commit before their fix)."""

from __future__ import annotations

import math
import threading
import types

import numpy as np

from configs.tiny_runtime import get_config
from dualpath_jax.block_keys import block_keys
from dualpath_jax.host_buffers import HostBufferPool
from dualpath_jax.runtime import driver, engines
from dualpath_jax.runtime.config import RuntimeConfig
from dualpath_jax.runtime.control import Cancel, TurnTask
from dualpath_jax.sim.runner import ttft_breakdown
from transport import make_transport
from transport.inproc import InProcFabric

BREAKDOWN = ("queue", "allocation", "read", "prefill")


def test_the_runtime_summary_has_the_simulators_ttft_breakdown():
    """The runtime's records carry every stamp of the TTFT breakdown, but `RunResult.summary` had none of its keys
    (only the simulator's `runner.summarize` added them): a runtime-vs-simulator comparison of where TTFT goes had
    to recompute it. The summary now has `ttft_{queue,allocation,read,prefill}_mean_s`, finite, summing to the mean
    TTFT."""
    cfg = RuntimeConfig.from_config_dict(get_config("test").runtime).replace(
        **{"workload.agents": 1, "workload.turns": 2}
    )
    res = driver.run(cfg)
    keys = [f"ttft_{k}_mean_s" for k in BREAKDOWN]
    missing = [k for k in keys if k not in res.summary]
    assert not missing, f"summary lacks {missing}"
    assert {k: res.summary[k] for k in keys} == ttft_breakdown(res.records)
    assert all(math.isfinite(res.summary[k]) and res.summary[k] >= 0 for k in keys), res.summary
    mean_ttft = float(np.mean([r.ttft for r in res.records]))
    assert math.isclose(sum(res.summary[k] for k in keys), mean_ttft, rel_tol=1e-6, abs_tol=1e-6)


def _engine(cls, engine_id: int, transport, pool_bytes: int, **kw):
    """A real engine over a real transport endpoint and host buffer pool; model, store and SNIC are stand-ins."""
    cfg = types.SimpleNamespace(block_size=4, cluster=types.SimpleNamespace(decode_slots=2, max_seq_len=64))
    model = types.SimpleNamespace(
        kv_layout=types.SimpleNamespace(bytes_per_token_per_layer=8, num_layers=2), new_decode_batch=lambda *a: None
    )
    ctx = types.SimpleNamespace(cfg=cfg, model=model, emit=lambda ev: None)
    pool = HostBufferPool(slot_nbytes=64, budget_bytes=pool_bytes, prefault=False)
    return cls(engine_id, 0, ctx, transport, pool, None, **kw)


def test_a_cancelled_requests_area_is_reused_at_once_and_its_dead_peer_cannot_write_into_it():
    """A cancel means the request's peer was declared dead, maybe only late (stopped, then continued). Its area was
    held until the peer's connection went -- for good, if the peer stayed stopped -- so a run short of host buffer
    stalled behind it. The engine now drops the peer (`transport.disconnect`) and reuses the area at once; the
    continued peer's write into it, made afresh from its stale directory, must not land (the PE had learnt the DE's
    area from a message and never connected itself: it would have connected again)."""
    fabric = InProcFabric()
    ep = {n: make_transport({"backend": "inproc", "name": f"engine{n}", "fabric": fabric}) for n in (0, 1)}
    directory = {n: (n, ep[n].address) for n in (0, 1)}
    de = _engine(engines.DecodeEngine, 1, ep[1], 2 * 9 * 16)  # one area of 9 tokens
    pe = _engine(engines.PrefillEngine, 0, ep[0], 4 * 9 * 16, batcher=None)
    de.directory, pe.directory = dict(directory), dict(directory)
    pump = threading.Thread(target=pe._pump_messages, daemon=True)
    pump.start()
    try:
        ids = np.arange(9, dtype=np.int32)
        tasks = [TurnTask(rid, 0, rid, 0, ids, 2, block_keys(ids, 4), 0, 0, 0, 1, "pe") for rid in (7, 8)]
        for t in tasks:
            de._handle("task", t)
        pe._handle("task", tasks[0])
        pe._prepare()  # its area (a PE-path request: it sends the DE nothing)
        de._prepare()  # 7 takes the buffer and tells the PE where (the DE connects); 8 waits
        kind, msg = pe.inbox.get(5.0)
        assert msg["kind"] == "de_area"
        pe._handle(kind, msg)
        r7 = pe.reqs[(7, 0)]
        # The PE's node stops here and is declared dead: the DE gets the cancel.
        de._handle("cancel", Cancel(7, 0))
        de._prepare()
        r8 = de.reqs[(8, 0)]
        assert r8.handle is not None, "the area of a request whose peer was declared dead was not reused"
        r8.area[...] = 0xAB  # request 8's KV
        # The PE's node is continued: its prefill writes the layer's KV to the DE.
        r7.area[...] = 0x11
        f = pe.write_to(1, r7.area_off, r7.de_area_off, r7.area.nbytes)
        try:
            f.result(timeout=5.0)
        except Exception:  # noqa: BLE001 -- refused: what we want
            pass
        assert (r8.area == 0xAB).all(), "a dead peer's write landed in the area of another request"
    finally:
        pe.stop()
        pump.join(5.0)
        for e in ep.values():
            e.close()


def test_a_pe_node_dying_does_not_rerun_turns_already_decoding():
    """A PE node declared dead cancelled and re-ran every in-flight turn it had prefilled, also those whose DE already
    ran them (first token out, the whole prompt KV in its decode slot): their prefill and decode started over on
    other engines for nothing (a PE has no part in a turn after the hand-over). They are left to their DE now; a turn
    still in its PE's hands is re-run as before."""
    import schedulers
    from dualpath_jax.runtime.control import Event, GroupReport
    from dualpath_jax.runtime.lifecycle import ConversationBook
    from dualpath_jax.runtime.scheduler_service import GlobalScheduler, GroupSpec
    from dualpath_jax.workloads.types import Trajectory, Turn

    trajs = [Trajectory(0, [Turn(10, 3)]), Trajectory(1, [Turn(10, 3)])]
    groups = [GroupSpec(0, "prefill", [0]), GroupSpec(1, "prefill", [1]), GroupSpec(2, "decode", [2])]
    svc = GlobalScheduler(
        groups,
        schedulers.make_policy("basic"),
        ConversationBook(trajs, vocab_size=50, seed=0),
        lookup_hit_blocks=lambda keys: 0,
        block_keys_of=lambda ids: block_keys(ids, 4),
        block_size=4,
        hbm_tokens_per_decode_engine=4096,
        heartbeat_timeout_s=60.0,
    )

    def fetch(node, events=()):
        g = groups[node]
        return svc.fetch(GroupReport(node, g.role, g.engine_ids, address={e: "a" for e in g.engine_ids}, events=events))

    fetch(2)
    fetch(1)
    tasks = fetch(0).tasks + fetch(1).tasks
    on_pe0 = [t for t in tasks if t.prefill_engine == 0]
    assert len(tasks) == 2 and len(on_pe0) == 2, "basic places both on the fetching PE"
    decoding, prefilling = on_pe0
    # The DE runs the first (its first token is out); the second is still being prefilled.
    now = svc.clock()
    fetch(2, [Event("first_token", decoding.request_id, 0, now, {})])
    svc.declare_dead(0)
    reply = fetch(2)
    assert [c.request_id for c in reply.cancels] == [prefilling.request_id], "only the turn still on its PE re-runs"
    assert svc.requeued == 1
    stamps = {"prefill_start": now, "prefill_end": now, "read": (now, now, 0)}
    done = Event("turn_done", decoding.request_id, 0, now, {"tokens": np.array([1, 2, 3], np.int32), "pe": stamps})
    fetch(2, [done])
    (rec,) = svc.finished_records()
    assert (rec.trajectory_id, rec.finished) == (decoding.trajectory_id, now - svc.t0)
