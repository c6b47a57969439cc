"""The DualPath runtime end to end: real tiny model, real store, real transports, registered policies.

Ground truth is a single-process reference run of the same conversations (full prefill of every prompt +
greedy decode, no store, no transport). Every runtime run must reproduce its tokens exactly, whatever the
policy, read path or transport, and complete every turn exactly once, also when a block is corrupted or a
decode engine dies mid-run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import time

import numpy as np
import pytest
from test_fix13_traceload import needs_traces as needs_kvcache_traces

from configs.tiny_runtime import get_config
from dualpath_jax.runtime import driver
from dualpath_jax.runtime.config import ConfigError, RuntimeConfig
from dualpath_jax.runtime.model_ops import ModelOps, reference_generate


def assert_matches_reference(res: driver.RunResult, reference: dict, trajs) -> None:
    total = sum(len(t.turns) for t in trajs)
    keys = [(r.trajectory_id, r.turn_index) for r in res.records]
    assert len(keys) == total and len(set(keys)) == total, "every turn must complete exactly once"
    assert set(res.tokens) == set(reference)
    bad = [k for k in reference if not np.array_equal(reference[k], res.tokens[k])]
    assert not bad, f"turns whose tokens differ from the reference: {bad}"
    for r in res.records:
        assert r.arrival <= r.scheduled <= r.prefill_start <= r.prefill_end <= r.first_token <= r.finished, r


def expected_hit(traj, i: int, block_size: int) -> int:
    """Blocks persisted by turn i-1 (its prompt's whole blocks + blocks filled while decoding), capped so at
    least one prompt token is computed."""
    if i == 0:
        return 0
    prev_prompt = traj.prompt_tokens(i - 1)
    kv_tokens = prev_prompt + traj.turns[i - 1].gen_tokens - 1  # the last generated token is never fed
    stored = (kv_tokens // block_size) * block_size
    return min(stored, ((traj.prompt_tokens(i) - 1) // block_size) * block_size)


@pytest.mark.parametrize(
    "policy,transport",
    [
        ("basic", "inproc"),  # PE path only
        ("de_only", "inproc"),  # DE path only
        ("dualpath", "tcp"),
        ("round_robin", "tcp"),
        ("split", "inproc"),  # one request's blocks read on both sides
    ],
)
def test_tokens_equal_reference(base, ops, trajs, reference, policy, transport):
    cfg = base.replace(**{"scheduler.name": policy, "transport": transport})
    res = driver.run(cfg, trajs, model_ops=ops)
    assert_matches_reference(res, reference, trajs)
    # the last link bins end at the run's end, no later (`driver.run_links`; a 0.1 s bin ran past it)
    assert max(s.t1 for s in res.links) <= res.wall_s
    sides = {r.read_side for r in res.records if r.hit_tokens}
    if policy == "basic":
        assert sides == {"pe"} and res.summary["de_read_bytes"] == 0
    if policy == "de_only":
        assert sides == {"de"} and res.summary["pe_read_bytes"] == 0
    # Hits come from the store: every block the previous turn persisted (prompt + decode write-back).
    by_traj = {t.trajectory_id: t for t in trajs}
    for r in res.records:
        assert r.hit_tokens == expected_hit(by_traj[r.trajectory_id], r.turn_index, cfg.block_size), r
    hit_bytes = sum(r.hit_tokens for r in res.records) * ops.config.kv_bytes_per_token
    assert res.summary["pe_read_bytes"] + res.summary["de_read_bytes"] == hit_bytes


def test_reference_decodes_in_the_runtimes_batch_shape(ops):
    """`reference_generate(decode_slots=N)` gives the tokens a DE's N-slot batch gives, whatever the slot and
    the other slots' requests (decode rounds by batch shape; README "Known limits": greedy tokens at a near-tie)."""
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, ops.vocab_size, n).astype(np.int32) for n in (37, 70, 12)]
    gen, cap, n = 12, 128, 3
    ref = reference_generate(ops, [(p, gen) for p in prompts], cap, decode_slots=n)
    batch = ops.new_decode_batch(n, cap)
    slots = (2, 0, 1)  # prompt i decodes in slot slots[i], all three together
    out = {}
    for slot, p in zip(slots, prompts, strict=True):
        logits, kv = ops.runner.full_prefill([p])
        batch.runner.load_prompt_kv(slot, kv[0])
        out[slot] = [int(np.argmax(logits[0][-1]))]
    for _ in range(gen - 1):
        order = np.array(sorted(out))
        nxt = batch.decode(order, np.array([out[s][-1] for s in order]))
        for s, t in zip(order, nxt, strict=True):
            out[s].append(int(t))
    for i, slot in enumerate(slots):
        np.testing.assert_array_equal(ref[i], out[slot], err_msg=f"prompt {i} in slot {slot}")


def test_chunked_prefill_and_small_buffers(base, ops, trajs, reference):
    """A tiny prefill token budget forces chunked prefill; small host buffers make requests wait for space."""
    cfg = base.replace(
        **{
            "scheduler.name": "dualpath",
            "cluster.prefill_token_budget": 8,
            "buffers.pe_buffer_bytes": 160 * 1024,
            "buffers.de_buffer_bytes": 160 * 1024,
        }
    )
    res = driver.run(cfg, trajs, model_ops=ops)
    assert_matches_reference(res, reference, trajs)


# The default run: V3 (MLA + MoE) with the compute-quota batcher. V2 has the same latent KV layout and cost-model branch
# (test_cost_model_shape_of_every_runtime_model[tiny_deepseek_v2]) and the fifo batcher is every other test's: -m slow.
@pytest.mark.parametrize(
    "model, batcher",
    [("tiny_deepseek", "compute_quota"), pytest.param("tiny_deepseek_v2", "fifo", marks=pytest.mark.slow)],
)
def test_mla_moe_model_both_paths(base, model, batcher, reference_for):
    """DeepSeek-style models (MLA latent KV, MoE; V3 and V2 routing): the runtime moves their KV bytes unchanged on
    both paths. The compute-quota batcher prices their batches with an MLA + MoE cost-model shape (it raised
    NotImplementedError for anything but dense GQA models)."""
    cfg = base.replace(model=model, **{"scheduler.name": "split", "transport": "tcp", "scheduler.batcher": batcher})
    ts, ds_ops = driver.prepare(cfg)
    ref = reference_for(cfg, ds_ops, ts)
    res = driver.run(cfg, ts, model_ops=ds_ops)
    assert_matches_reference(res, ref, ts)
    assert res.summary["pe_read_bytes"] > 0 and res.summary["de_read_bytes"] > 0


def test_two_engines_per_node(base, ops, trajs, reference):
    """g = 2: the engines of a node share its SNIC and host buffer budget; each has its own CNIC/endpoint."""
    cfg = base.replace(**{"scheduler.name": "dualpath", "cluster.engines_per_node": 2, "transport": "tcp"})
    res = driver.run(cfg, trajs, model_ops=ops)
    assert_matches_reference(res, reference, trajs)
    assert {r.prefill_engine for r in res.records} <= {0, 1} and {r.decode_engine for r in res.records} <= {2, 3, 4, 5}


def test_first_token_is_out_when_the_request_runs_on_its_decode_engine(base, ops, trajs, reference):
    """TTFT ends when the request runs in a decode slot with its prompt KV loaded (the simulator's definition; the
    metrics are compared field by field). With one slot per DE, turns waiting for it used to get their first
    token stamped when the PE's prefill_done arrived, so a DE's [first token, finished] spans overlapped."""
    cfg = base.replace(**{"scheduler.name": "dualpath", "cluster.decode_slots": 1})
    res = driver.run(cfg, trajs, model_ops=ops)
    assert_matches_reference(res, reference, trajs)
    for de in {r.decode_engine for r in res.records}:
        spans = sorted((r.first_token, r.finished) for r in res.records if r.decode_engine == de)
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert start >= end - 1e-6, f"DE {de} ran two turns at once in its one slot: {spans}"
    for r in res.records:
        assert r.prefill_end <= r.first_token + 1e-6


def test_prefill_end_is_stamped_before_the_decode_engine_hears_of_it(base, ops, trajs, reference, monkeypatch):
    """Found by the runtime fuzz: the PE sent `prefill_done` to the DE and only then emitted its prefill_end event, so
    the DE could run the request (its first-token stamp) and even finish it first: prefill_end > first_token, or,
    reported after the DE's turn_done, dropped and replaced by the turn's end. A PE slow right after the send (here
    50 ms) made it happen on every turn."""
    from dualpath_jax.runtime.engines import PrefillEngine

    send = PrefillEngine.send_msg

    def send_then_stall(self, engine_id, msg):
        send(self, engine_id, msg)
        if msg["kind"] == "prefill_done":
            time.sleep(0.05)

    monkeypatch.setattr(PrefillEngine, "send_msg", send_then_stall)
    res = driver.run(base.replace(**{"scheduler.name": "dualpath"}), trajs, model_ops=ops)
    assert_matches_reference(res, reference, trajs)  # (checks prefill_start <= prefill_end <= first_token per turn)
    assert all(r.prefill_end < r.first_token for r in res.records)


def test_compute_quota_batcher(base, ops, trajs, reference):
    """The paper's intra-engine policy: a quota small enough to chunk most requests (cost model of this CPU)."""
    cfg = base.replace(**{"scheduler.name": "dualpath", "scheduler.batcher": "compute_quota"})
    cfg = cfg.replace(**{"scheduler.batcher_kwargs": {"quota_s": 5e-5}})
    res = driver.run(cfg, trajs, model_ops=ops)
    assert_matches_reference(res, reference, trajs)
    chunks = sum(len(items) for items, _ in res.node_stats[0]["step_log"][0])
    assert chunks > len(res.records), "the quota must have chunk-prefilled some requests"


def test_corrupt_block_is_recomputed(base, ops, trajs, reference, tmp_path, block_corrupter):
    """Corrupt every stored block once the first turns are done: reads miss, the KV is recomputed, and the
    tokens stay identical."""
    store = tmp_path / "store"
    cfg = base.replace(**{"scheduler.name": "round_robin", "store_dir": str(store)})
    fault, corrupted = block_corrupter(store, len(trajs))
    res = driver.run(cfg, trajs, model_ops=ops, fault=fault)
    assert corrupted, "the test must have corrupted stored blocks"
    assert_matches_reference(res, reference, trajs)
    failed = sum(s.get("failed_reads", 0) for s in res.node_stats.values())
    assert failed > 0, "corrupt blocks must have been detected on read"
    by_traj = {t.trajectory_id: t for t in trajs}
    short = [
        r for r in res.records if r.hit_tokens < expected_hit(by_traj[r.trajectory_id], r.turn_index, cfg.block_size)
    ]
    assert short, "some hit must have been cut by a corrupt block"


def test_local_process_launcher_matches_reference(base, ops, trajs, reference):
    """The default main job's launcher: one OS process per node, TCP between them."""
    cfg = base.replace(**{"scheduler.name": "dualpath", "launcher": "local", "transport": "tcp"})
    res = driver.run(cfg, trajs, model_ops=ops)
    assert_matches_reference(res, reference, trajs)
    assert any(s.link.startswith("snic/") for s in res.links)
    # every node process bins its links on one wall-clock grid (0.1 s): the bins of all links start in step (an idle
    # SNIC's zero-byte marker is no bin: it sits at t0 = t1 = 0, `driver.run_links`)
    bins = [s for s in res.links if s.nbytes or s.t1 > s.t0]
    ref = bins[0].t0
    assert all(abs((s.t0 - ref + 0.05) % 0.1 - 0.05) < 1e-3 for s in bins), sorted({s.t0 for s in bins})


def test_max_context_tokens_cuts_each_agent_before_its_first_longer_turn(base):
    """workload.max_context_tokens (e.g. the cluster's max_seq_len) keeps each agent's turns up to the first one
    whose prompt + generation (after `scale`) exceeds it; agents left without turns are dropped; 0 cuts nothing."""
    cfg = base.replace(**{"workload.kind": "synthetic", "workload.agents": 6, "workload.turns": 8})
    full = driver.make_trajectories(cfg)
    limit = sorted(t.peak_turn()[1] for t in full)[2]
    cut = driver.make_trajectories(cfg.replace(**{"workload.max_context_tokens": limit}))
    by_id = {t.trajectory_id: t for t in full}
    assert 3 <= len(cut) <= len(full) and all(t.peak_turn()[1] <= limit for t in cut)
    for t in cut:
        assert list(t.turns) == list(by_id[t.trajectory_id].turns)[: len(t.turns)]
    assert sum(len(t.turns) == len(by_id[t.trajectory_id].turns) for t in cut) == 3
    with pytest.raises(ConfigError, match=re.escape("config.workload.max_context_tokens must be >= 0")):
        driver.prepare(base.replace(**{"workload.max_context_tokens": -1}))
    with pytest.raises(ConfigError, match="cut the agents there with config.workload.max_context_tokens"):
        driver.prepare(cfg.replace(**{"cluster.max_seq_len": limit}))  # longer turns than the slots hold


def test_a_kept_store_of_another_model_is_a_config_error(base, ops, tmp_path):
    """config.store_dir kept from a run of another model (or block size) is refused before anything starts, naming
    the store's layout (every node used to fail on it at start, with a traceback); the same model reuses it."""
    from dualpath_jax.runtime.launcher import open_store
    from dualpath_jax.runtime.node import block_layout

    store_dir = str(tmp_path / "kv")
    kept = base.replace(store_dir=store_dir)
    open_store(kept, block_layout(kept, ops)).close()  # a store of tiny_qwen2 blocks
    driver.prepare(kept, model_ops=ops)
    for change in ({"model": "tiny_llama"}, {"block_size": 32}):
        with pytest.raises(ConfigError, match=re.escape(f"config.store_dir: store {store_dir} holds blocks of")):
            driver.prepare(kept.replace(**change))


@pytest.mark.parametrize("model", ["tiny_qwen2", "tiny_llama", "tiny_deepseek", "tiny_deepseek_v2"])
def test_cost_model_shape_of_every_runtime_model(model):
    """The cost model's view of each servable model: its KV bytes per token are the model's own (checked inside),
    MLA models count latent KV, MoE models their routed experts."""
    from dualpath_jax.runtime.model_ops import cost_model_shape

    ops = ModelOps(model)
    shape = cost_model_shape(ops)
    assert shape.kv_bytes_per_token == ops.config.kv_bytes_per_token and shape.layers == ops.config.num_layers
    assert shape.is_mla == model.startswith("tiny_deepseek") and shape.is_moe == model.startswith("tiny_deepseek")
    assert cost_model_shape(ops) is shape  # registered once per process


def test_runtime_serves_a_local_hf_checkpoint(base, tmp_path, reference_for):
    """config.runtime.model may name a local HF checkpoint directory (config.json + *.safetensors) instead of a
    tiny config: every node process loads its weights, and greedy tokens equal the single-process reference of
    the same weights. A directory that is no checkpoint, or one missing a tensor, is a config error naming it."""
    pytest.importorskip("safetensors", reason="HF import needs the 'hf' extra (safetensors)")
    from test_models_checkpoint import QWEN2_HF, hf_tensors, write_hf_checkpoint

    from models.registry import config_from_hf
    from models.runner import ModelRunner

    ckpt = tmp_path / "tiny-qwen2-hf"
    direct = ModelRunner(config_from_hf(QWEN2_HF), seed=7, num_slots=1, capacity=16)
    tensors = hf_tensors(QWEN2_HF, direct.pure_params())
    write_hf_checkpoint(ckpt, QWEN2_HF, tensors)
    cfg = base.replace(model=str(ckpt), launcher="local", transport="tcp")
    trajs, ops = driver.prepare(cfg)
    assert ops.fingerprint == direct.fingerprint() and ops.vocab_size == QWEN2_HF["vocab_size"]
    reference = reference_for(cfg, ops, trajs)
    res = driver.run(cfg, trajs, model_ops=ops)  # the node processes load the checkpoint themselves
    assert_matches_reference(res, reference, trajs)
    assert sum(r.hit_tokens for r in res.records) > 0  # later turns read the checkpoint model's KV from the store

    with pytest.raises(ConfigError, match=re.escape(f"config.model: HF checkpoint directory {str(tmp_path)!r}")):
        driver.prepare(base.replace(model=str(tmp_path)))  # a directory without config.json
    del tensors["model.layers.1.mlp.up_proj.weight"]
    write_hf_checkpoint(tmp_path / "broken", QWEN2_HF, tensors)
    with pytest.raises(ConfigError, match=r"config.model: .*model.layers.1.mlp.up_proj.weight"):
        driver.prepare(base.replace(model=str(tmp_path / "broken")))
    with pytest.raises(ConfigError, match=r"unknown model 'tiny_qwen3'; known: .*tiny_qwen2.*or a local HF checkpoint"):
        driver.prepare(base.replace(model="tiny_qwen3"))


def kill_decode_node_when_busy(node: int):
    """A `driver.run` fault hook that kills DE node `node` once it holds a request and two turns are done; returns
    (hook, killed): `killed` lists the node once it was killed."""
    killed: list[int] = []

    def fault(service, launcher):
        if killed:
            return
        with service._lock:
            busy = any(
                inf.assignment is not None and service.engine_node[inf.assignment.decode_engine] == node
                for inf in service._inflight.values()
            )
        if busy and service.progress()[0] >= 2:
            launcher.kill(node)
            killed.append(node)

    return fault, killed


@pytest.mark.parametrize(
    "launch",
    [
        pytest.param({}, id="inprocess"),  # engines in this process: kill = stop the node's engines
        pytest.param({"launcher": "local", "transport": "tcp"}, id="local-sigkill"),  # SIGKILL a DE process
    ],
)
def test_killed_decode_node_loses_nothing(base, ops, launch, reference_for):
    """Kill a DE node while it holds requests: the scheduler notices (exit / heartbeat), re-queues them and
    re-runs them on the other DE; every token still matches the reference."""
    cfg = base.replace(
        **{"scheduler.name": "round_robin", "workload.agents": 6, "scheduler.heartbeat_timeout_s": 1.0, **launch}
    )
    trajs6 = driver.make_trajectories(cfg)
    ref6 = reference_for(cfg, ops, trajs6)
    fault, killed = kill_decode_node_when_busy(2)
    res = driver.run(cfg, trajs6, model_ops=ops, fault=fault)
    assert killed and res.requeued > 0
    assert_matches_reference(res, ref6, trajs6)


def test_a_request_cancelled_between_prefill_chunks_frees_its_buffer(base, ops, trajs, reference):
    """Found by the runtime fuzz: a PE request whose DE died between two chunks of its chunked prefill was cancelled
    but kept (only a request not yet started was dropped at once; a started one was to be dropped after its batch,
    and a cancelled request never gets another), holding its host-buffer area for the rest of the run. With a PE
    buffer of one prompt the re-run and every later request waited for it until the run timed out."""
    layer_block = base.block_size * ops.kv_layout.bytes_per_token_per_layer
    longest = max(t.prompt_tokens(i) for t in trajs for i in range(len(t.turns)))
    one_prompt = -(-longest * ops.config.kv_bytes_per_token // layer_block) * layer_block
    cfg = base.replace(
        **{
            "scheduler.name": "basic",  # PE-side reads only: the cancel always reaches the PE between two batches
            "cluster.prefill_token_budget": 1,  # one token per batch: every prompt is prefilled in many chunks
            "buffers.pe_buffer_bytes": one_prompt,
            "run_timeout_s": 30.0,
        }
    )
    killed = []

    def fault(service, launcher):
        if killed:
            return
        pe = launcher.groups[0].engines[0]
        if any(
            r.started and r.cached < r.prompt_tokens and service.engine_node[r.task.decode_engine] == 2
            for r in list(pe.reqs.values())
        ):
            launcher.kill(2)
            killed.append(2)

    res = driver.run(cfg, trajs, model_ops=ops, fault=fault)
    assert killed and res.requeued > 0
    assert_matches_reference(res, reference, trajs)


def test_a_run_with_no_decode_engine_left_fails_clearly(base, ops, trajs):
    """Both DE nodes killed: nothing can finish, so the run stops at once with the scheduler's reason (not a
    hang until the run timeout)."""
    from dualpath_jax.runtime.scheduler_service import RunFailed

    cfg = base.replace(**{"scheduler.name": "round_robin", "scheduler.heartbeat_timeout_s": 1.0})
    killed = []

    def fault(service, launcher):
        if not killed and service.progress()[0] >= 1:
            for node in (1, 2):
                launcher.kill(node)
                killed.append(node)

    t0 = time.monotonic()
    with pytest.raises(RunFailed, match="no live prefill or decode engine left"):
        driver.run(cfg, trajs, model_ops=ops, fault=fault)
    assert killed == [1, 2] and time.monotonic() - t0 < cfg.run_timeout_s


def test_a_crashing_engine_fails_the_run_with_its_error(base, ops, trajs, monkeypatch, caplog):
    """A prefill engine whose model step raises: the engine reports the error, and the run stops with it (the
    engine and the exception named), not a hang until the run timeout."""
    from dualpath_jax.runtime.scheduler_service import RunFailed

    calls = []

    def broken_prefill(*args, **kwargs):
        calls.append(1)
        raise FloatingPointError("NaN in layer 3 (injected)")

    monkeypatch.setattr(ops, "prefill", broken_prefill)
    t0 = time.monotonic()
    with (
        caplog.at_level(logging.ERROR),
        pytest.raises(RunFailed, match=r"node 0: pe 0: FloatingPointError\('NaN in layer 3"),
    ):
        driver.run(base, trajs, model_ops=ops)
    assert calls and time.monotonic() - t0 < base.run_timeout_s
    assert "engine" in caplog.text and "crashed" in caplog.text


def test_node_processes_that_exit_at_start_fail_the_run_naming_it(base, ops, trajs):
    """Every node process gone before registering (a crash at start): the run fails at once saying no engine is
    left, instead of waiting for the startup timeout with nobody left to register."""
    from dualpath_jax.runtime.scheduler_service import RunFailed

    class ExitedAtStart:  # a launcher whose node processes all exited before their first fetch
        cfg = None

        def start(self, groups, service):
            pass

        def alive(self, node_id):
            return False

        def join(self, timeout=10.0):
            pass

        def shutdown(self):
            pass

    cfg = base.replace(**{"run_timeout_s": 5.0})
    with pytest.raises(RunFailed, match=r"no live prefill or decode engine left \(dead: \[0\]\)"):
        driver.run(cfg, trajs, model_ops=ops, launcher=ExitedAtStart())


def test_a_run_past_its_timeout_fails_naming_it(base, ops, trajs, monkeypatch):
    from dualpath_jax.runtime.scheduler_service import RunFailed

    cfg = base.replace(**{"run_timeout_s": 0.05})
    # 1 s between turns: the run cannot finish within the timeout however fast the machine (it once did in 50 ms).
    # The driver refuses such gaps up front now (a ConfigError); this test is about the guard while running.
    monkeypatch.setattr(driver, "_check_last_turns_within_timeout", lambda *a: None)
    slow = [dataclasses.replace(t, turns=[dataclasses.replace(u, gap_s=1.0) for u in t.turns]) for t in trajs]
    with pytest.raises(RunFailed, match=r"within 0\.05 s"):
        driver.run(cfg, slow, model_ops=ops)


# ------------------------------------------------------------------------------------------------ config
def test_unknown_policy_is_rejected_before_start(base, ops):
    cfg = base.replace(**{"scheduler.name": "dualpth"})
    with pytest.raises(ConfigError, match=r"config.scheduler.name.*dualpth.*known: .*dualpath"):
        driver.run(cfg, model_ops=ops)


def test_impossible_buffer_budget_is_rejected(base, ops):
    cfg = base.replace(**{"buffers.de_buffer_bytes": 4096})
    with pytest.raises(ConfigError, match=r"config.buffers.de_buffer_bytes=4096 B cannot hold one request"):
        driver.run(cfg, model_ops=ops)


def test_short_decode_slot_is_rejected(base, ops):
    with pytest.raises(ConfigError, match=r"config.cluster.max_seq_len"):
        driver.run(base.replace(**{"cluster.max_seq_len": 64}), model_ops=ops)


def test_unknown_fields_and_values(base):
    d = get_config("test").runtime.to_dict()
    d["cluster"]["prefil_nodes"] = 1
    with pytest.raises(ConfigError, match=r"config.cluster: unknown field\(s\) \['prefil_nodes'\]"):
        RuntimeConfig.from_config_dict(d)
    with pytest.raises(ConfigError, match=r"config.launcher 'mpi' unknown"):
        driver.prepare(base.replace(launcher="mpi"))
    with pytest.raises(ConfigError, match=r"config.model: unknown model 'gpt5'"):
        driver.prepare(base.replace(model="gpt5"))
    # the policy's / batcher's own Config refuses a field or a value: a config error, not a TypeError
    with pytest.raises(ConfigError, match=r"config.scheduler.policy_kwargs: 'round_robin' does not take \['bogus'\]"):
        driver.prepare(base.replace(**{"scheduler.name": "round_robin", "scheduler.policy_kwargs": {"bogus": 1}}))
    with pytest.raises(ConfigError, match=r"config.scheduler.batcher_kwargs: fifo token_budget must be >= 1"):
        driver.prepare(base.replace(**{"scheduler.batcher_kwargs": {"token_budget": 0}}))


def test_every_runtime_field_can_be_overridden_from_the_command_line():
    """ml_collections only overrides keys the config has: every RuntimeConfig field, nested ones too, is in
    configs/tiny_runtime.py, so `--config.runtime.<path>=value` reaches it."""
    import dataclasses

    from configs.tiny_runtime import get_config

    missing = []

    def walk(cls, section, path):
        for f in dataclasses.fields(cls):
            if f.name not in section:
                missing.append(path + f.name)
            elif dataclasses.is_dataclass(f.default):
                walk(type(f.default), section[f.name], f"{path}{f.name}.")

    walk(RuntimeConfig, get_config().runtime, "")
    assert not missing, f"RuntimeConfig fields missing from configs/tiny_runtime.py: {missing}"


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("nics.high_priority_share", 1.0, "config.nics.high_priority_share must be > 0 and < 1"),
        ("cluster.prefill_token_budget", 0, "config.cluster.prefill_token_budget must be >= 1, got 0"),
        ("cluster.prefill_max_batch", 0, "config.cluster.prefill_max_batch must be >= 1, got 0"),
        ("scheduler.fetch_interval_s", 0.0, "config.scheduler.fetch_interval_s must be > 0, got 0.0"),
        ("scheduler.heartbeat_timeout_s", 0.001, "config.scheduler.heartbeat_timeout_s (0.001) must exceed"),
        ("run_timeout_s", 0.0, "config.run_timeout_s must be > 0"),
        ("workload.agents", 0, "config.workload.agents must be >= 1, got 0"),
        ("workload.turns", 0, "config.workload.turns must be >= 1, got 0"),
        ("workload.scale", 0.0, "config.workload.scale must be > 0"),
        ("workload.gap_s", -1.0, "config.workload.gap_s must be >= 0"),
        # a NaN or infinite gap never makes the next turn due (NaN was a ValueError, inf a hang until the timeout)
        ("workload.gap_s", math.nan, "config.workload.gap_s must be >= 0 and finite, got nan"),
        ("workload.gap_s", math.inf, "config.workload.gap_s must be >= 0 and finite, got inf"),
        # the tiny workload made these 1 token silently
        ("workload.gen_tokens", 0, "config.workload.gen_tokens must be >= 1, got 0"),
        ("workload.append_tokens", -2, "config.workload.append_tokens must be >= 1, got -2"),
        ("workload.first_append_tokens", 0, "config.workload.first_append_tokens must be >= 1, got 0"),
        # NaN passed the check and failed inside the run; inf failed there too (int(inf) for DualPath's alpha)
        ("nics.snic_bytes_per_s", math.nan, "config.nics.snic_bytes_per_s must be > 0 and finite"),
        ("nics.cnic_bytes_per_s", math.inf, "config.nics.cnic_bytes_per_s must be > 0 and finite"),
    ],
)
def test_out_of_range_values_are_rejected_before_start(base, key, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        driver.prepare(base.replace(**{key: value}))


@pytest.mark.parametrize(
    "fields, message",
    [
        # `replace` does not coerce as `from_config_dict` does: a float budget passed every check, then each PE node
        # failed building its batcher (after the others had started)
        ({"cluster.prefill_token_budget": 1.5}, "config.cluster.prefill_token_budget must be an integer, got 1.5"),
        ({"workload.agents": 2.0}, "config.workload.agents must be an integer, got 2.0"),
        ({"nics.snic_bytes_per_s": "fast"}, "config.nics.snic_bytes_per_s must be a number, got 'fast'"),
        ({"cluster.precompile": 1}, "config.cluster.precompile must be a bool, got 1"),
        # a registered batcher/policy whose kwargs name something unknown: the kwargs are named, not the batcher
        (
            {"scheduler.batcher": "compute_quota", "scheduler.batcher_kwargs": {"model": "nope"}},
            "config.scheduler.batcher_kwargs: unknown model shape 'nope'",
        ),
        (
            {"scheduler.batcher": "compute_quota", "scheduler.batcher_kwargs": {"hardware": "nope"}},
            "config.scheduler.batcher_kwargs: unknown hardware profile 'nope'",
        ),
    ],
)
def test_a_field_of_the_wrong_type_or_a_bad_kwarg_is_named(base, fields, message):
    """Found by the runtime fuzz."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        driver.prepare(base.replace(**fields))


def test_a_launch_that_fails_part_way_closes_what_it_started(base, ops, trajs, monkeypatch):
    """Found by the runtime fuzz: `launcher.start` ran outside the driver's try/finally and a node that failed while
    building its engines closed nothing, so the nodes built before it kept their storage-NIC threads and TCP
    endpoints (listening sockets, accept threads) running after `run` raised."""
    import threading

    from dualpath_jax.runtime import node

    class NoDevice(node.DecodeEngine):
        def __init__(self, engine_id, *a, **kw):
            super().__init__(engine_id, *a, **kw)
            if engine_id == 2:  # the second DE node, after the PE node and the first DE node were built
                raise RuntimeError("no device for engine 2")

    def state():
        return sorted(t.name for t in threading.enumerate()), len(os.listdir("/proc/self/fd"))

    monkeypatch.setattr(node, "DecodeEngine", NoDevice)
    before = state()
    with pytest.raises(RuntimeError, match="no device for engine 2"):
        driver.run(base.replace(transport="tcp"), trajs, model_ops=ops)
    deadline = time.monotonic() + 5.0  # (a closed TCP endpoint's watchdog thread ends within a second)
    while state() != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state() == before


@pytest.mark.parametrize("aps", [0.0, -1.0, math.nan])
def test_online_arrivals_without_a_positive_rate_are_a_config_error(base, aps):
    """It was the arrival model's ValueError: a traceback from the launchers instead of a `bad config` line."""
    with pytest.raises(ConfigError, match=r"config.workload.aps must be > 0 and finite for arrival='online'"):
        driver.prepare(base.replace(**{"workload.arrival": "online", "workload.aps": aps}))


def test_a_buffer_of_exactly_the_prompt_kv_bytes_is_rejected(base, ops, trajs):
    """The host buffer hands out whole Layer Blocks, so the longest prompt's area takes more than its KV bytes: a
    budget of exactly those bytes passed the check and the run then waited for space until its timeout."""
    kv = ops.config.kv_bytes_per_token
    longest = max(t.prompt_tokens(i) for t in trajs for i in range(len(t.turns)))
    layer_block = base.block_size * ops.kv_layout.bytes_per_token_per_layer
    assert longest * ops.config.num_layers % base.block_size, "the test needs a prompt that ends mid Layer Block"
    with pytest.raises(ConfigError, match=r"config.buffers.de_buffer_bytes=\d+ B cannot hold one request"):
        driver.prepare(base.replace(**{"buffers.de_buffer_bytes": longest * kv}))
    enough = -(-longest * kv // layer_block) * layer_block
    driver.prepare(base.replace(**{"buffers.de_buffer_bytes": enough}))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.runtime.workload.turns=0"], "bad config: config.runtime.workload.turns must be >= 1, got 0"),
        (["--config=configs/no_such_runtime.py"], "bad config: OSError: Failed loading config file"),
        (
            ["--config.runtime.workload.agnets=4"],
            "bad override --config.runtime.workload.agnets=4: the config has no field 'agnets'. Did you mean",
        ),
        (["--config=configs/no_such_runtime.py", "--config.policies=basic"], "bad config: OSError: Failed loading"),
        (
            ["--config.runtime.workload.arrival=online", "--config.runtime.workload.aps=0"],
            "bad config: config.runtime.workload.aps must be > 0 and finite for arrival='online', got 0.0",
        ),
    ],
    ids=["bad_field", "missing_config_file", "unknown_field", "override_on_missing_file", "online_without_rate"],
)
def test_run_launcher_prints_a_bad_config_as_one_line(args, message):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "experiments.run", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and message in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("module", ["experiments.run", "experiments.bench_runtime"])
def test_runtime_launchers_refuse_an_unwritable_results_dir_before_running(tmp_path, module):
    import subprocess
    import sys

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cmd = [sys.executable, "-m", module, "--config=configs/tiny_runtime.py:test", f"--config.results_dir={blocker}/r"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "bad --config.results_dir " in out.stderr and "cannot write there" in out.stderr
    assert "Traceback" not in out.stderr and "turn/s" not in out.stderr  # no policy ran


def test_workload_token_ids_outside_the_vocabulary_are_a_config_error(base, trajs):
    """A trace's own token ids beyond the model's vocabulary fail before any engine starts, naming the turn."""
    import dataclasses

    t = trajs[1]
    first = t.turns[0]
    bad_turn = dataclasses.replace(first, append_token_ids=np.full(first.append_tokens, 10**6, np.int32))
    bad = [trajs[0], dataclasses.replace(t, turns=[bad_turn, *t.turns[1:]]), *trajs[2:]]
    with pytest.raises(
        ConfigError, match=rf"trajectory {t.trajectory_id} turn 0 has token ids in \[1000000, 1000000\]"
    ):
        driver.prepare(base, trajectories=bad)


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"workload.kind": "trace", "workload.trace": "/no/such/trace.jsonl"},
            "config.workload.trace: trace '/no/such",
        ),
        ({"workload.kind": "synthetic", "workload.dataset": "99K"}, "config.workload.dataset '99K' unknown"),
        ({"store_dir": "/proc/no_store_here"}, "config.store_dir '/proc/no_store_here' cannot be created"),
    ],
    ids=["missing_trace", "unknown_dataset", "unusable_store_dir"],
)
def test_workload_and_store_dir_errors_are_config_errors(base, fields, message):
    """A missing trace, an unknown synthetic dataset or a store directory that cannot be made: one ConfigError
    from prepare (before any engine starts), not a traceback from inside the run."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        driver.prepare(base.replace(**fields))


def test_synthetic_workload_with_the_default_dataset_prepares(base):
    """`--config.runtime.workload.kind=synthetic` alone (as the README shows): the default dataset is a Table 2
    name (it was "32k", which no dataset is called)."""
    trajs, _ = driver.prepare(base.replace(**{"workload.kind": "synthetic"}))
    assert base.workload.dataset == "32K" and trajs and all(t.source.startswith("synthetic:32K") for t in trajs)


def test_a_malformed_trace_is_a_config_error_naming_the_line(base, tmp_path):
    trace = tmp_path / "bad.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": "x"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: field 'input_length' must be an integer"):
        driver.prepare(base.replace(**{"workload.kind": "trace", "workload.trace": str(trace)}))


def test_ray_launcher_without_ray_is_a_config_error(base):
    """launcher='ray' where ray is not installed: one ConfigError naming the extra, before anything starts."""
    import importlib.util

    if importlib.util.find_spec("ray") is not None:
        pytest.skip("ray is installed here")
    with pytest.raises(ConfigError, match=r"config.launcher='ray' needs ray, which is not installed: pip install"):
        driver.prepare(base.replace(**{"launcher": "ray", "transport": "tcp"}))


def test_pd_outside_range_warns(base, caplog):
    cfg = base.replace(**{"cluster.prefill_nodes": 9, "nics.snic_bytes_per_s": 1e6, "nics.cnic_bytes_per_s": 8e6})
    with caplog.at_level(logging.WARNING):
        driver.prepare(cfg)
    assert any("outside the bottleneck-free range" in r.message for r in caplog.records)


def test_pd_warning_says_when_no_ratio_is_bottleneck_free(base, caplog):
    """s > g/2 (one engine per node, SNIC = CNIC): PAPER.md's range is empty; the warning says so, not a range
    like [inf, -1]."""
    cfg = base.replace(
        **{"cluster.engines_per_node": 1, "cluster.prefill_nodes": 3, "nics.snic_bytes_per_s": 2e6,
           "nics.cnic_bytes_per_s": 2e6}
    )  # fmt: skip
    with caplog.at_level(logging.WARNING):
        driver.prepare(cfg)
    (msg,) = [r.getMessage() for r in caplog.records if "bottleneck-free" in r.getMessage()]
    assert "there is none when s > g/2" in msg and "inf" not in msg


@pytest.mark.slow
def test_ray_launcher_matches_reference(base, ops, trajs, reference):
    """The Ray launcher on a local Ray instance (one actor per node)."""
    ray = pytest.importorskip("ray", reason="ray is not installed (optional extra: pip install -e '.[ray]')")
    ray.init(address="local", num_cpus=4, ignore_reinit_error=True)  # (private: a `ray start` cluster may be up)
    try:
        cfg = base.replace(**{"scheduler.name": "dualpath", "launcher": "ray", "transport": "tcp"})
        res = driver.run(cfg, trajs, model_ops=ops)
        assert_matches_reference(res, reference, trajs)
    finally:
        ray.shutdown()


@pytest.mark.parametrize(
    "workload",
    [
        {"workload.arrival": "online", "workload.aps": 20.0, "workload.gap_s": 0.05},
        {
            "workload.kind": "synthetic",
            "workload.dataset": "32K",
            "workload.scale": 0.02,
            "workload.turns": 3,
            "cluster.max_seq_len": 512,
        },
        pytest.param(
            {
                "workload.kind": "trace",
                "workload.trace": "kvcache_tester",
                "workload.agents": 2,
                "workload.turns": 3,
                "workload.scale": 0.002,
                "workload.time_scale": 0.002,
                "workload.arrival": "trace",
            },
            marks=needs_kvcache_traces,  # (a clone without ../shared/traces: skipped, not failed)
        ),
    ],
    ids=["online", "synthetic", "trace"],
)
def test_drivers_over_shared_workloads(base, ops, workload, reference_for):
    """Online arrivals (Poisson, gaps) and the shared synthetic / real-trace workloads run to completion with the
    reference's tokens; no turn starts before it is due."""
    cfg = base.replace(**{"scheduler.name": "dualpath", **workload})
    ts = driver.make_trajectories(cfg)
    ref = reference_for(cfg, ops, ts)
    res = driver.run(cfg, ts, model_ops=ops)
    assert_matches_reference(res, ref, ts)
    recs = {(r.trajectory_id, r.turn_index): r for r in res.records}
    arrivals = driver.make_arrival_model(cfg).agent_arrivals(ts)
    for t, a in zip(ts, arrivals, strict=True):
        assert recs[(t.trajectory_id, 0)].arrival == pytest.approx(a)
        for i in range(1, len(t.turns)):
            prev, cur = recs[(t.trajectory_id, i - 1)], recs[(t.trajectory_id, i)]
            assert cur.arrival >= prev.finished + t.turns[i - 1].gap_s - 1e-6


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    """README command 1 on the small in-process variant, once for the two tests below: with a plot and a kept store
    directory (--config.runtime.store_dir). Returns (the finished process, its results run dir, the store dir)."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tmp = tmp_path_factory.mktemp("main_job")
    store, results = tmp / "kv", tmp / "results"
    cmd = [
        sys.executable, "-m", "experiments.run", "--config=configs/tiny_runtime.py:test",
        f"--config.results_dir={results}", "--config.plot=True", f"--config.runtime.store_dir={store}",
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = list(results.iterdir())
    return out, run_dir, store


def test_main_job_command(main_job):
    """README command 1 on the small in-process variant: prints the table, writes JSON + turns + plot."""
    import json

    out, run_dir, _ = main_job
    assert "speedup vs basic" in out.stdout and "dualpath" in out.stdout
    # the :test variant skips the warm-up, so the table says its speedups compare a cold run with warm ones
    assert "--config.warmup=False, so basic's JCT includes what it compiled first" in out.stdout
    res = json.loads((run_dir / "results.json").read_text())
    assert set(res["results"]) == {"basic", "dualpath"} and res["results"]["basic"]["turns"] == 12
    assert (run_dir / "turns_dualpath.json").exists() and (run_dir / "run.png").exists()
    assert "greedy tokens: identical under basic / dualpath for all 12 turns" in out.stdout
    assert res["greedy_tokens"]["turns_differing"] == 0


def test_main_job_with_a_kept_store_dir_runs_each_policy_on_a_fresh_store(main_job):
    """With --config.runtime.store_dir the policies used to share one store: the second one hit every block the
    first had written (even turn 0's prompts), so the side-by-side numbers compared different hit rates."""
    import json

    _, run_dir, store = main_job
    hits = {}
    for p in ("basic", "dualpath"):
        turns = json.loads((run_dir / f"turns_{p}.json").read_text())["turns"]
        hits[p] = {(t["trajectory_id"], t["turn_index"]): t["hit_tokens"] for t in turns}
    assert hits["basic"] == hits["dualpath"]
    assert all(h == 0 for (_, i), h in hits["dualpath"].items() if i == 0)
    runs = sorted(d.name.rsplit("-", 1)[-1] for d in store.iterdir() if d.is_dir())
    assert runs == ["basic", "dualpath"]  # one subdirectory per run, kept
    # and nothing else: the launcher's checks opened the directory itself as a store (STORE.json, blocks/ beside the
    # runs' subdirectories; a store kept there was trimmed to capacity_bytes)
    assert sorted(p.name for p in store.iterdir() if not p.is_dir()) == []


def test_unknown_argument_and_bad_override_fail_before_start(tmp_path):
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.run",
            "--config=configs/tiny_runtime.py:test",
            "--config.policies=basic,nope",
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and "--config.policies: unknown inter-engine policy 'nope'" in out.stderr
    twice = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.run",
            "--config=configs/tiny_runtime.py:test",
            "--config.policies=basic,basic",
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        twice.returncode != 0
        and "--config.policies runs 'basic' twice with its defaults: basic,basic; give each run of a policy its own policy.NAME=value items"
        in twice.stderr
    )


def test_ray_launcher_without_ray_says_how_to_install(base):
    try:
        import ray  # noqa: F401

        pytest.skip("ray is installed: the slow Ray test covers the launcher")
    except ImportError:
        pass
    from dualpath_jax.runtime.ray_launcher import RayLauncher

    with pytest.raises(ImportError, match=r"pip install -e '.\[ray\]'"):
        RayLauncher(base.replace(launcher="ray"))


def test_bench_runtime_launcher_runs_small(tmp_path):
    """experiments.bench_runtime end to end on the small in-process config: the measured speedup, the simulator's
    prediction beside it, the per-turn overhead breakdown, and its results (JSON and plot) written."""
    import json
    import subprocess
    import sys

    cmd = [
        sys.executable, "-m", "experiments.bench_runtime", "--config=configs/tiny_runtime.py:test",
        "--overhead_turns=2", f"--config.results_dir={tmp_path}",
        # the forced precompile compiles the prefill buckets up to these: 12, not 48 (the :test turns: <= 120 tokens)
        "--config.runtime.cluster.max_seq_len=128", "--config.runtime.cluster.prefill_max_batch=2",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for section in ("== DualPath vs Basic", "== Simulator prediction", "== Per-turn runtime overhead"):
        assert section in out.stdout
    # the turns' latencies beside the copy's, and where they go (2026-12-05)
    assert "TTFT p50 s: runtime" in out.stdout and "TTFT parts, mean ms, runtime / sim" in out.stdout, out.stdout
    assert "cluster.precompile forced on" in out.stderr  # :test turns it off; no measured JCT may hold compiles
    # a progress bar per run, as experiments.run's (session 42: none; the runs took minutes in silence)
    assert "    dualpath: 100%" in out.stderr and "     warm-up: 100%" in out.stderr, out.stderr[-2000:]
    glued = re.findall(r"turn/s\] *[IWE]\d{4} .*", out.stderr)  # (a log line right after a bar, on its line)
    assert not glued, glued[:2]
    (run_dir,) = list(tmp_path.glob("bench_runtime-*"))
    res = json.loads((run_dir / "bench_runtime.json").read_text())
    assert res["measured_speedup"] > 0 and res["simulated_speedup"] > 0
    assert res["overhead_per_turn"]["wall_ms"] > 0 and (run_dir / "bench_runtime.png").exists()


def test_bench_runtime_says_when_its_runs_are_too_small_to_fit_the_cost_model(tmp_path):
    """One agent of one turn measures one prefill shape: the cost-model fit is underdetermined (refused since
    2026-12-03), so the benchmark prints its measured figures, says why the simulator prediction is skipped and
    still writes its results (it stopped with a traceback)."""
    import json
    import subprocess
    import sys

    cmd = [
        sys.executable, "-m", "experiments.bench_runtime", "--config=configs/tiny_runtime.py:test",
        "--config.runtime.workload.agents=1", "--config.runtime.workload.turns=1", "--skip_overhead",
        f"--config.results_dir={tmp_path}",
        # (its one turn of 60 tokens: the forced precompile compiles 2 prefill buckets, not 48)
        "--config.runtime.cluster.max_seq_len=64", "--config.runtime.cluster.prefill_max_batch=1",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "speedup basic -> dualpath" in out.stdout
    assert "(simulator prediction skipped: prefill fit is underdetermined" in out.stdout
    (run_dir,) = list(tmp_path.glob("bench_runtime-*"))
    res = json.loads((run_dir / "bench_runtime.json").read_text())
    assert res["measured_speedup"] > 0 and "simulated" not in res


def test_compilation_cache_is_one_setting_for_every_launcher(tmp_path, monkeypatch):
    """The runtime's node processes and the model launchers share one persistent compilation cache: the directory
    from the argument, else $DUALPATH_JAX_CACHE; every executable is cached (tiny steps compile fast)."""
    import jax

    from dualpath_jax.runtime.launcher import enable_compilation_cache
    from models.jax_cache import enable_persistent_compilation_cache

    keys = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    before = {k: getattr(jax.config, k) for k in keys}
    try:
        monkeypatch.setenv("DUALPATH_JAX_CACHE", str(tmp_path / "env"))
        assert enable_persistent_compilation_cache() == str(tmp_path / "env")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "env") and (tmp_path / "env").is_dir()
        enable_compilation_cache(str(tmp_path / "arg"))
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "arg")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
        assert jax.config.jax_persistent_cache_min_entry_size_bytes == 0
    finally:
        for k, v in before.items():
            jax.config.update(k, v)
