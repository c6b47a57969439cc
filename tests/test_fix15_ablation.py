"""The paper's ablation on the runtime: Basic prefill (`cluster.layerwise` False) and experiments.run's run items.

Basic (PAPER.md "Baselines": no layerwise prefill, PE reads only) as the simulator's non-layerwise PE models it: a
request's whole hit KV crosses the PE's CNIC into HBM before its first layer computes, and its prompt KV goes to the
DE after its last. The same model steps run, so the greedy tokens stay the reference's.
"""

from __future__ import annotations

import threading
import types

import numpy as np
import pytest
from test_runtime import assert_matches_reference
from test_runtime_cnic import expected_cnic_bytes, link_bytes

from dualpath_jax.runtime import driver
from dualpath_jax.runtime.config import ConfigError, RuntimeConfig, parse_policy_list, validate


# ------------------------------------------------------------------ the field and its validation
def test_layerwise_is_a_bool_named_when_wrong(base):
    from configs.tiny_runtime import get_config

    d = get_config("test").runtime.to_dict()
    d["cluster"]["layerwise"] = "no"
    with pytest.raises(ConfigError, match=r"config\.cluster\.layerwise must be a bool, got 'no'"):
        RuntimeConfig.from_config_dict(d)
    with pytest.raises(ConfigError, match=r"config\.cluster\.layerwise must be a bool, got 0"):
        validate(base.replace(**{"cluster.layerwise": 0}))
    assert base.cluster.layerwise is True  # (the default: layerwise, as the simulator's)
    with pytest.raises(ConfigError, match=r"config\.cluster\.pe_hbm_kv_bytes must be >= 0 \(0: no bound\), got -1"):
        validate(base.replace(**{"cluster.pe_hbm_kv_bytes": -1}))


@pytest.mark.parametrize(
    "policy, kwargs, ok",
    [
        ("basic", {}, True),
        ("pe_only", {}, True),
        ("round_robin", {"read_side": "pe"}, True),
        ("round_robin", {}, False),  # alternates PE / DE reads
        ("dualpath", {}, False),
        ("de_only", {}, False),
        ("split", {}, False),
    ],
)
def test_basic_prefill_refuses_a_policy_that_reads_on_the_de_side(base, policy, kwargs, ok):
    """The paper's Basic reads the hit on the PE side only: a policy that may read on the DE side is refused, named."""
    cfg = base.replace(**{"cluster.layerwise": False, "scheduler.name": policy, "scheduler.policy_kwargs": kwargs})
    if ok:
        validate(cfg)
        return
    with pytest.raises(ConfigError, match=rf"config\.cluster\.layerwise=False .* policy '{policy}' may read on the DE"):
        validate(cfg)
    validate(cfg.replace(**{"cluster.layerwise": True}))  # (layerwise: any policy)


# ------------------------------------------------------------------ the prefill engine, one step at a time
class _Pacer:
    """A CNIC ingress pacer that records what crossed."""

    def __init__(self):
        self.log: list = []

    def pace(self, nbytes, priority="low"):
        self.log.append(nbytes)


class _Transport:
    """Writes complete when the test says so (`finish`), or at once (`auto`); records each (remote offset, bytes) and
    what the model had computed when it came."""

    def __init__(self, clock: list, auto: bool = False):
        self.clock = clock
        self.auto = auto
        self.writes: list = []
        self.sent: list = []
        self.futures: list = []

    def register(self, name, arena):
        pass

    def peers(self):
        return ["engine1"]

    def write(self, peer, region, local, rregion, remote, nbytes, priority="low", notify=None):
        from concurrent.futures import Future

        f: Future = Future()
        self.writes.append((remote, nbytes, list(self.clock)))
        self.futures.append(f)
        if self.auto:  # (writes that end at once)
            f.set_result(0)
        return f

    def send(self, peer, payload):
        from dualpath_jax.runtime.engines import decode_msg

        self.sent.append(decode_msg(payload))

    def finish(self):
        for f in self.futures:
            if not f.done():
                f.set_result(0)


def _prefill_engine(layerwise: bool, L=3, bpt=8, bs=4, pacer=None, hbm=0):
    from dualpath_jax.host_buffers import HostBufferPool
    from dualpath_jax.runtime.engines import PrefillEngine

    clock: list = []  # what the model has computed so far: ("layer", l) entries

    def prefill(token_ids, cached, cached_layer, on_layer, h2d=None):
        seen["h2d_given"] = h2d is not None
        seen["paced_before_compute"] = sum(pacer.log)
        seen["layers_from_de_before_compute"] = [sorted(r.layers_from_de) for r in eng.reqs.values()]
        for layer in range(L):
            cached_layer(layer)
            if h2d is not None:
                h2d(sum(cached) * bpt)
            clock.append(("layer", layer))
            on_layer(layer, [np.full((len(t), bpt), 7, np.uint8) for t in token_ids])
        return np.full((len(token_ids),), 11, np.int32)

    seen: dict = {}
    pacer = _Pacer() if pacer is None else pacer
    kv = types.SimpleNamespace(num_layers=L, bytes_per_token_per_layer=bpt)
    model = types.SimpleNamespace(kv_layout=kv, prefill=prefill)
    cluster = types.SimpleNamespace(decode_slots=1, max_seq_len=64, layerwise=layerwise, pe_hbm_kv_bytes=hbm)
    events: list = []
    ctx = types.SimpleNamespace(
        cfg=types.SimpleNamespace(block_size=bs, cluster=cluster), model=model, emit=events.append
    )
    transport = _Transport(clock, auto=layerwise)
    pool = HostBufferPool(slot_nbytes=bs * bpt, budget_bytes=L * 64 * bpt, prefault=False)

    def form_batch(work):  # every ready request whole, in one batch
        return [
            types.SimpleNamespace(request_id=w.request_id, cached=w.cached_tokens, bsz=w.remaining_tokens) for w in work
        ]

    batcher = types.SimpleNamespace(name="all", form_batch=form_batch)
    snic = types.SimpleNamespace(submit_read=lambda job: None)  # (the test reports the read done itself)
    eng = PrefillEngine(0, 0, ctx, transport, pool, snic, cnic_in=pacer, batcher=batcher)
    if eng._h2d is not None:  # its copy thread only: this test drives the engine's loop itself
        eng._h2d.thread.start()
    return eng, pacer, transport, seen, events


def _step(eng, rounds=20):
    """The engine's loop, a few rounds, on this thread (no batch when nothing is ready)."""
    for _ in range(rounds):
        eng._drain(0.02)
        eng._prepare()
        if not eng.layerwise:
            eng._load_whole()
        ready = [eng.reqs[k] for k in eng.order if eng._ready(eng.reqs[k])]
        if ready:
            from schedulers.api import PrefillWork

            work = [PrefillWork(r.task.request_id, r.cached, r.prompt_tokens - r.cached) for r in ready]
            eng._run_batch(eng._batch_items(eng.batcher.form_batch(work), {r.task.request_id: r for r in ready}))


@pytest.mark.parametrize("layerwise", [False, True])
def test_basic_prefill_loads_every_layer_before_computing_and_sends_after(layerwise):
    """A request read half on the PE side, half on the DE side (8 hit tokens, 4 new; 3 layers). Basic: the model is
    called only once every DE-forwarded layer has landed and the whole hit KV (3 layers x 8 tokens) crossed the CNIC
    (it is given no per-layer H2D), and the KV goes to the DE only after the last layer was computed; the first token
    is handed over after those writes. Layerwise (the reference behaviour): the model loads layer by layer, and each
    layer's KV goes out as soon as it is computed."""
    from dualpath_jax.block_keys import block_keys
    from dualpath_jax.runtime.control import TurnTask

    L, bpt, bs = 3, 8, 4
    eng, pacer, transport, seen, events = _prefill_engine(layerwise, L, bpt, bs)
    try:
        ids = np.arange(12, dtype=np.int32)
        # hit 2 blocks: [0, 1) on the PE side, [1, 2) on the DE side; PE 0, DE 1
        task = TurnTask(1, 0, 1, 0, ids, 2, block_keys(ids, bs), 2, 1, 0, 1, "split")
        eng._handle("task", task)
        eng._handle("msg", {"kind": "de_area", "request_id": 1, "attempt": 0, "offset": 0})
        eng._prepare()
        r = eng.reqs[(1, 0)]
        job = r.read_job
        eng._handle("read_done", (job, 1, bs * L * bpt, 0.0, 0.0))  # its PE-side block read
        eng._handle("msg", {"kind": "de_read_done", "request_id": 1, "attempt": 0, "end_blocks": 2})
        if not layerwise:
            for layer in range(L - 1):  # all but the last DE-side layer landed: not loaded, not computed
                eng._handle("layer", (1, 0, layer))
            # (on a thread: a PE that computes anyway waits inside the batch for the last layer)
            stepping = threading.Thread(target=_step, args=(eng, 3), daemon=True)
            stepping.start()
            stepping.join(10)
            assert not seen, "the model computed before every DE-side layer was in"
            assert not stepping.is_alive() and r.hbm == "none" and pacer.log == []
            eng._handle("layer", (1, 0, L - 1))
            _step(eng, 5)
            assert seen, "the request never computed"
            assert seen["paced_before_compute"] == L * 8 * bpt and pacer.log == [L * 8 * bpt]
            assert not seen["h2d_given"], "basic prefill must not pace per layer inside the compute"
            assert seen["layers_from_de_before_compute"] == [list(range(L))]
            # the DE lacks the PE-read hit [0, 4) and the new tokens [8, 12) of every layer: sent after the last layer
            assert len(transport.writes) == 2 * L
            assert all(clock == [("layer", x) for x in range(L)] for _, _, clock in transport.writes)
            assert not any(m["kind"] == "prefill_done" for m in transport.sent), "handed over before its writes landed"
            transport.finish()
            _step(eng, 3)
        else:
            for layer in range(L):
                eng._handle("layer", (1, 0, layer))
            _step(eng, 1)
            assert seen["h2d_given"]
            # layer l's writes (PE-read hit + new) go out as soon as layer l is computed
            assert [len(c) for _, _, c in transport.writes] == [1, 1, 2, 2, 3, 3]
            # the batch does not wait for them: the hand-over comes from the inbox ("sent"), in the next round
            assert not any(m["kind"] == "prefill_done" for m in transport.sent)
            _step(eng, 1)
        done = [m for m in transport.sent if m["kind"] == "prefill_done"]
        assert len(done) == 1 and done[0]["first_token"] == 11 and done[0]["hit_tokens"] == 8
        assert [e.kind for e in events if e.request_id == 1][-1] == "prefill_end"
        assert not eng.reqs and r.handle.released
    finally:
        eng.stop()
        eng.join(5)


# ------------------------------------------------------------------ end to end on the :test config
def test_basic_prefill_tokens_equal_the_reference_and_load_the_hit_once(base, ops, trajs, reference):
    """Basic prefill with chunks (a prefill token budget of 8): the tokens are the reference's (the same model steps),
    and the PE's CNIC ingress carries each request's hit KV once (in HBM for all its chunks; layerwise reloads the
    earlier chunks for each one, test_runtime_cnic), its egress the whole prompt KV it sends the DE."""
    cfg = base.replace(**{"scheduler.name": "basic", "cluster.layerwise": False, "cluster.prefill_token_budget": 8})
    res = driver.run(cfg, trajs, model_ops=ops)
    assert_matches_reference(res, reference, trajs)
    kv = ops.config.kv_bytes_per_token
    want = expected_cnic_bytes(res, kv, cfg.block_size)
    assert {name: link_bytes(res, name) for name in want} == want
    assert sum(r.hit_tokens for r in res.records) > 0 and not any(r.de_read_bytes for r in res.records)
    steps = res.node_stats[0]["step_log"][0]
    assert len(steps) > len(res.records), "no request was chunked"
    assert set(res.node_stats[0]["h2d_wait_s"].values()) == {0.0}, "basic prefill paces no H2D inside a batch"


# ------------------------------------------------------------------ experiments.run's run items
def test_the_ablation_list_labels_each_step():
    from experiments.run import expand_presets

    runs = parse_policy_list(expand_presets("ablation"))
    assert [r.label for r in runs] == ["basic[layerwise=false]", "basic", "round_robin", "dualpath"]
    assert [r.layerwise for r in runs] == [False, None, None, None]
    assert runs[2].fields == {"full_de": "queue"}
    # a layerwise item is in the label also where the policy runs once; with a policy's own fields
    runs = parse_policy_list("dualpath,policy.alpha_tokens=5,layerwise=false,dualpath")
    assert [r.label for r in runs] == ["dualpath[alpha_tokens=5,layerwise=false]", "dualpath"]
    assert runs[0].fields == {"alpha_tokens": 5} and runs[0].items == ("policy.alpha_tokens=5",)
    assert parse_policy_list("basic,layerwise=False")[0].label == "basic[layerwise=false]"


@pytest.mark.parametrize(
    "text, line",
    [
        ("layerwise=false,basic", "item 'layerwise=false' comes before any policy name"),
        ("basic,layerwise=maybe", "item 'layerwise=maybe': layerwise is true or false"),
        ("basic,layerwise=1", "item 'layerwise=1': layerwise is true or false"),
        ("basic,layerwise=false,layerwise=true", "two values for basic's layerwise, 'layerwise=false' and"),
    ],
)
def test_a_bad_layerwise_item_is_named(text, line):
    with pytest.raises(ConfigError, match=line):
        parse_policy_list(text)


def test_run_items_set_each_runs_prefill():
    from configs.tiny_runtime import get_config
    from experiments.run import policy_configs

    config = get_config("test")
    config.policies = "ablation"
    cfgs = policy_configs(config, {})
    assert {p: (c.scheduler.name, c.cluster.layerwise) for p, c in cfgs.items()} == {
        "basic[layerwise=false]": ("basic", False),
        "basic": ("basic", True),
        "round_robin": ("round_robin", True),
        "dualpath": ("dualpath", True),
    }
    assert cfgs["round_robin"].scheduler.policy_kwargs == {"full_de": "queue"}
    config.policies = "basic,dualpath,layerwise=false"
    with pytest.raises(ConfigError, match=r"item layerwise=false of 'dualpath' \(basic prefill.*may read on the DE"):
        policy_configs(config, {})
    config.policies = "basic,dualpath"  # set for every run: the run that reads on the DE side is named
    config.runtime.cluster.layerwise = False
    with pytest.raises(ConfigError, match=r"config\.runtime\.cluster\.layerwise=False .* policy 'dualpath'"):
        policy_configs(config, {})
    config.policies = "basic,dualpath,layerwise=true"
    assert [c.cluster.layerwise for c in policy_configs(config, {}).values()] == [False, True]


def test_the_table_gives_each_runs_jct_change_vs_the_first():
    from experiments.run import format_table

    res = {n: types.SimpleNamespace(summary={"jct_s": j}) for n, j in (("basic[layerwise=false]", 10.0), ("b", 8.0))}
    header, _, first, second = format_table(res).splitlines()
    assert header.split()[-3:] == ["JCT", "vs", "basic[layerwise=false]"]
    assert first.split()[-2:] == ["1.00x", "+0.0%"] and second.split()[-2:] == ["1.25x", "-20.0%"]


def test_a_request_cancelled_while_its_kv_loads_never_computes():
    """Basic prefill: a request cancelled (its DE declared dead) while its hit KV crosses the CNIC is dropped at once
    (its area freed); the end of that copy later neither revives it nor runs a batch."""
    from test_runtime_cnic import _GatePacer

    from dualpath_jax.block_keys import block_keys
    from dualpath_jax.runtime.control import Cancel, TurnTask

    class Gate(_GatePacer):  # (says when the copy thread is inside it)
        entered = threading.Event()

        def pace(self, nbytes, priority="low"):
            self.entered.set()
            super().pace(nbytes, priority)

    gate = Gate()
    eng, _, transport, seen, _ = _prefill_engine(False, pacer=gate)
    try:
        ids = np.arange(12, dtype=np.int32)
        eng._handle("task", TurnTask(1, 0, 1, 0, ids, 2, block_keys(ids, 4), 2, 2, 0, 1, "pe"))  # both blocks PE-side
        eng._handle("msg", {"kind": "de_area", "request_id": 1, "attempt": 0, "offset": 0})
        eng._prepare()
        r = eng.reqs[(1, 0)]
        eng._handle("read_done", (r.read_job, 2, 2 * 4 * 3 * 8, 0.0, 0.0))
        _step(eng, 2)
        assert r.hbm == "loading" and not seen and gate.entered.wait(30)
        eng._handle("cancel", Cancel(1, 0))
        assert not eng.reqs and r.handle.released
        gate.gate.set()
        _step(eng, 3)
        assert gate.log == [(3 * 8 * 8, "low")]  # (it was crossing when cancelled)
        assert not seen and not transport.writes and r.hbm == "loading"
    finally:
        eng.stop()
        eng.join(5)


@pytest.mark.parametrize("hbm", [0, 3 * 12 * 8 + 1])
def test_basic_prefill_holds_whole_prompts_within_the_pe_hbm(hbm):
    """`cluster.pe_hbm_kv_bytes` (the simulator's pe_hbm_kv_gb): a request takes room for its whole prompt KV before
    its reads start and holds it until its KV left for the DE, FIFO. Room for one 12-token prompt: the second request
    starts reading only once the first handed its first token over. 0: no bound, both read at once."""
    from dualpath_jax.block_keys import block_keys
    from dualpath_jax.runtime.control import TurnTask

    L, bpt, bs = 3, 8, 4
    eng, _, transport, seen, _ = _prefill_engine(False, L, bpt, bs, hbm=hbm)
    try:
        ids = np.arange(12, dtype=np.int32)
        for rid in (1, 2):  # 2 hit blocks each, read on the PE side
            eng._handle("task", TurnTask(rid, 0, rid, 0, ids + rid, 2, block_keys(ids + rid, bs), 2, 2, 0, 1, "pe"))
            eng._handle("msg", {"kind": "de_area", "request_id": rid, "attempt": 0, "offset": 0})
        eng._prepare()
        r1, r2 = eng.reqs[(1, 0)], eng.reqs[(2, 0)]
        assert r1.read_job is not None
        if not hbm:
            assert r2.read_job is not None and eng.hbm_used == 0
            return
        assert r2.area is None and r2.read_job is None, "read beyond the PE's HBM"
        eng._handle("read_done", (r1.read_job, 2, 2 * bs * L * bpt, 0.0, 0.0))
        _step(eng, 3)
        assert seen and r2.area is None and eng.hbm_used == L * 12 * bpt  # computed, its KV not yet out
        transport.finish()
        _step(eng, 2)
        assert (1, 0) not in eng.reqs and r2.read_job is not None and eng.hbm_used == L * 12 * bpt
    finally:
        eng.stop()
        eng.join(5)


def test_bench_runtime_simulator_copy_prefills_as_the_runtime():
    """`bench_runtime.sim_config` gave the simulator layerwise prefill and a 1 GB PE HBM always: a runtime run with
    `cluster.layerwise=False` (and its `pe_hbm_kv_bytes`) was predicted as a layerwise one."""
    from test_launch_hunt5 import _runtime_cfg

    from experiments import bench_runtime
    from schedulers.cost_model import MODEL_SHAPES

    shape = MODEL_SHAPES.get("qwen2.5-32b")  # (a registered stand-in for the runtime's model: no jax here)
    sc = bench_runtime.sim_config(_runtime_cfg(), shape, {})
    assert sc.cluster.layerwise and sc.cluster.pe_hbm_kv_gb == 1.0
    basic = _runtime_cfg(
        **{"scheduler.name": "basic", "cluster.layerwise": False, "cluster.pe_hbm_kv_bytes": 1_500_000}
    )
    sc = bench_runtime.sim_config(basic, shape, {})
    assert not sc.cluster.layerwise and sc.cluster.pe_hbm_kv_gb == 0.0015


def test_a_layerwise_pe_hands_over_between_the_layers_of_its_next_batch():
    """Layerwise: the PE runs its next batch while a request's KV writes drain (`_after_writes`). When they end
    mid-batch, the first token goes to the DE between two layers of the running batch (`_hand_over_sent`), not a
    whole batch later from the inbox."""
    from dualpath_jax.block_keys import block_keys
    from dualpath_jax.runtime.control import TurnTask

    L, bpt, bs = 3, 8, 4
    eng, _pacer, transport, _seen, _events = _prefill_engine(True, L, bpt, bs)
    transport.auto = False  # request 1's writes end when the test says
    at_send: list = []
    send = transport.send

    def send_at(peer, payload):
        send(peer, payload)
        at_send.append((transport.sent[-1]["kind"], transport.sent[-1]["request_id"], len(transport.clock)))

    transport.send = send_at
    write = transport.write

    def write_then_end_request_1(peer, region, local, rregion, remote, nbytes, priority="low", notify=None):
        f = write(peer, region, local, rregion, remote, nbytes, priority, notify)
        if len(transport.clock) > L:  # request 2's batch: request 1's writes end now
            transport.finish()
        return f

    transport.write = write_then_end_request_1
    try:
        for rid in (1, 2):
            ids = np.arange(8, dtype=np.int32) + rid
            eng._handle("task", TurnTask(rid, 0, rid, 0, ids, 2, block_keys(ids, bs), 0, 0, 0, 1, "pe"))
            eng._handle("msg", {"kind": "de_area", "request_id": rid, "attempt": 0, "offset": 0})
            eng._prepare()
            r = eng.reqs[(rid, 0)]
            assert eng._ready(r)
            eng._run_batch([(r, 0, 8)])
        done = [(rid, clock) for kind, rid, clock in at_send if kind == "prefill_done"]
        assert done and done[0] == (1, L + 1), f"request 1 handed over at {done} (layers computed), not after layer 0"
        transport.finish()
        eng._drain(1)
        assert [rid for kind, rid, _ in at_send if kind == "prefill_done"] == [1, 2]
    finally:
        eng.stop()
        eng.join(5)
