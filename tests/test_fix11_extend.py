"""Fix wave 11, "extend" journey: a researcher extends the framework from outside the package.

A policy and a batcher registered from a test-local module run in the simulator and the runtime (found by name, used,
named in the results, greedy tokens equal to the reference); mistakes in them are named. Model variants written as
local HF checkpoints keep layerwise == full prefill and cached == uncached decode. A user's own traces: edge cases
load, malformed ones are named by file, line / request and field.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from dualpath_jax.workloads.traces import TraceFormatError, load_trace
from schedulers import BATCHERS, POLICIES, Assignment, BatchItem, InterEnginePolicy, IntraEnginePolicy
from schedulers.registry import make_batcher, make_policy


# ------------------------------------------------------------------------- a researcher's own policy and batcher
class LeastLoadedDE(InterEnginePolicy):
    """Least-loaded PE and DE (tok), every hit read on the DE side."""

    # (no `name`: the registry docstring's example sets none)

    @dataclasses.dataclass(frozen=True)
    class Config:
        pass

    def __init__(self, config):
        self.config = config

    def schedule(self, snapshot, queue, fetching_node=None):
        s = snapshot.copy()
        out = []
        pes, des = s.engines_of("prefill"), s.engines_of("decode")
        for r in queue:
            fit = [d for d in des if d.free_hbm_tokens >= r.total_tokens]
            if not fit:
                break
            pe, de = min(pes, key=lambda e: e.tok), min(fit, key=lambda e: e.tok)
            pe.tok += r.prompt_tokens
            de.tok += r.total_tokens
            de.free_hbm_tokens -= r.total_tokens
            out.append(Assignment(r.request_id, pe.engine_id, de.engine_id, "de", 1.0))
        return out


class HeadOnly(IntraEnginePolicy):
    """One request a batch, at most `max_tokens` of it (chunked prefill)."""

    name = "fifo"  # copied from FifoBatcher and not changed

    @dataclasses.dataclass(frozen=True)
    class Config:
        max_tokens: int = 64

    def __init__(self, config):
        self.config = config

    def form_batch(self, queue):
        if not queue:
            return []
        w = queue[0]
        return [BatchItem(w.request_id, w.cached_tokens, min(w.remaining_tokens, self.config.max_tokens))]


class UnknownEnginePolicy(LeastLoadedDE):
    name = "basic"  # copied from BasicPolicy and not changed

    def schedule(self, snapshot, queue, fetching_node=None):
        de = snapshot.engines_of("decode")[0].engine_id
        return [Assignment(r.request_id, 999, de, "pe") for r in list(queue)[:1]]


class NoConfig(InterEnginePolicy):
    def __init__(self, config=None):
        pass

    def schedule(self, snapshot, queue, fetching_node=None):
        return []


class PlainConfig(LeastLoadedDE):
    class Config:  # not a dataclass
        pass


EXT_POLICIES = {
    "fix11_least_loaded_de": LeastLoadedDE,
    "fix11_unknown_engine": UnknownEnginePolicy,
    "fix11_no_config": NoConfig,
    "fix11_plain_config": PlainConfig,
}
EXT_BATCHERS = {"fix11_head_only": HeadOnly}


@pytest.fixture(scope="module")
def registered():
    """Register the test-local classes as a user module would (decorator form), and take them out afterwards so that
    other test modules that enumerate the registries see only the package's own."""
    for name, cls in EXT_POLICIES.items():
        POLICIES.register(name)(cls)
    for name, cls in EXT_BATCHERS.items():
        BATCHERS.register(name)(cls)
    yield
    for name in EXT_POLICIES:
        POLICIES._entries.pop(name, None)
    for name in EXT_BATCHERS:
        BATCHERS._entries.pop(name, None)


def test_registering_a_name_twice_is_refused_naming_it(registered):
    with pytest.raises(ValueError, match="'fix11_least_loaded_de' is already registered .*names must be unique"):
        POLICIES.register("fix11_least_loaded_de")(LeastLoadedDE)
    with pytest.raises(ValueError, match="'fifo' is already registered"):
        BATCHERS.register("fifo")(HeadOnly)


def test_a_policy_or_batcher_is_named_as_it_was_registered(registered):
    """What was wrong: `make_policy` / `make_batcher` built the class as is, so a policy that set no `name` (as the
    registry docstring's example) was `'?'`, and one copied from a built-in kept that one's name: the runtime's errors
    blamed "policy '?'" or "policy 'basic'" for a custom policy's bad assignment (and "batcher 'fifo'" for a custom
    batcher's empty batch). Contract: the instance's `name` is the name it was registered and built by; the built-in
    ones are unchanged."""
    assert make_policy("fix11_least_loaded_de").name == "fix11_least_loaded_de"
    assert make_policy("fix11_unknown_engine").name == "fix11_unknown_engine"
    assert make_batcher("fix11_head_only").name == "fix11_head_only"
    assert make_policy("basic").name == "basic" and make_batcher("fifo").name == "fifo"
    assert type(make_policy("fix11_unknown_engine")).name == "basic"  # the class attribute is left alone


@pytest.mark.parametrize("name", ["fix11_no_config", "fix11_plain_config"])
def test_a_registered_class_without_a_config_dataclass_is_named(registered, name):
    """What was wrong: a registered policy without a nested `Config` dataclass failed in `make_policy` (and in the
    runtime's / simulator's config checks, which build the Config first) as "type object 'NoConfig' has no attribute
    'Config'" or dataclasses' "must be called with a dataclass type or instance", naming neither the policy nor what
    it lacks. Contract: a TypeError naming the registered name and the nested `Config` dataclass it needs."""
    with pytest.raises(TypeError, match=rf"'{name}' .*has no `Config` dataclass"):
        make_policy(name)


def test_custom_policy_and_batcher_run_in_the_simulator(registered):
    """The journey, simulator side (passed before this wave): found by name, used (every read on the DE side), named
    in the result's config; every turn finishes."""
    from dualpath_jax.sim import load_config, run, sim_config_from_dict

    cfg = sim_config_from_dict(load_config("configs/sim_tiny.py:fix11_least_loaded_de").to_dict())
    cfg = dataclasses.replace(cfg, batcher="fix11_head_only", batcher_kwargs={"max_tokens": 256})
    res = run(cfg)
    assert res.config.policy == "fix11_least_loaded_de" and res.config.batcher == "fix11_head_only"
    assert res.summary["unfinished_turns"] == 0 and res.summary["turns"] == len(res.records) > 0
    assert {r.read_side for r in res.records} == {"de"} and res.summary["pe_read_bytes"] == 0


def test_custom_policy_and_batcher_run_in_the_runtime_and_mistakes_are_named(registered, base, ops, trajs, reference):
    """The journey, runtime side: the custom policy + a 16-token chunking batcher give the reference's greedy tokens,
    all reads on the DE side, and the result names the policy. A custom policy's unknown engine fails the run at
    once (no hang) naming that policy (it said "policy 'basic'", the name its class was copied with)."""
    from dualpath_jax.runtime import driver
    from dualpath_jax.runtime.scheduler_service import RunFailed

    cfg = base.replace(
        **{
            "scheduler.name": "fix11_least_loaded_de",
            "scheduler.batcher": "fix11_head_only",
            "scheduler.batcher_kwargs": {"max_tokens": 16},
        }
    )
    res = driver.run(cfg, trajs, model_ops=ops)
    assert res.policy == "fix11_least_loaded_de"
    assert {r.read_side for r in res.records} == {"de"}
    assert len(res.records) == sum(len(t.turns) for t in trajs)
    bad = [k for k in reference if not np.array_equal(reference[k], res.tokens[k])]
    assert not bad, f"turns whose tokens differ from the reference: {bad}"

    cfg = base.replace(**{"scheduler.name": "fix11_unknown_engine", "run_timeout_s": 120.0})
    with pytest.raises(RunFailed, match="policy 'fix11_unknown_engine' assigned a dead or unknown engine"):
        driver.run(cfg, trajs, model_ops=ops)


# ------------------------------------------------------------------------------------------ a user's own traces
def _session(requests, **fields) -> dict:
    return {"id": "s", "block_size": 64, "requests": requests, **fields}


def _req(t, n_in, hash_ids, **fields) -> dict:
    return {"t": t, "type": "n", "in": n_in, "out": 2, "hash_ids": hash_ids, **fields}


def test_a_session_trace_without_any_request_is_refused_naming_it(tmp_path):
    """What was wrong: kv-cache-tester session files without an 'n' / 's' request loaded as no trajectory at all (an
    empty Mooncake trace is an error), and the simulator then "ran" the empty workload: turns 0 and NaN figures
    written as results. Contract: `load_trace` of such a file or directory is a TraceFormatError naming it ("holds
    no turn"); a directory where some sessions hold requests loads those."""
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps(_session([])))
    with pytest.raises(TraceFormatError, match=f"{empty} holds no turn"):
        load_trace(str(empty))
    d = tmp_path / "dir"
    d.mkdir()
    (d / "a.json").write_text(json.dumps(_session([], id="a")))
    (d / "b.json").write_text(json.dumps(_session([{"type": "subagent", "t": 1.0, "requests": []}], id="b")))
    with pytest.raises(TraceFormatError, match=f"{d} \\(2 session files\\) holds no turn"):
        load_trace(str(d))
    (d / "c.json").write_text(json.dumps(_session([_req(0.0, 130, [1, 2])], id="c")))
    (t,) = load_trace(str(d))
    assert len(t.turns) == 1 and t.turns[0].append_tokens == 130


def test_session_ids_null_or_with_a_lone_surrogate_load(tmp_path):
    """What was wrong: `"id": null` was the session id "None", so a second session without an id was refused as
    "session id 'None' was loaded already"; an id with a lone surrogate ("\\ud800", valid JSON) was a bare
    UnicodeEncodeError naming no file. Contract: a null id is no id (the file name is used, as for a missing one);
    any JSON string is an id."""
    for i in (1, 2):
        (tmp_path / f"s{i}.json").write_text(json.dumps(_session([_req(0.0, 70, [i])], id=None)))
    assert [len(t.turns) for t in load_trace(str(tmp_path))] == [1, 1]
    odd = tmp_path / "odd" / "s.json"
    odd.parent.mkdir()
    odd.write_text(
        '{"id": "a\\ud800", "block_size": 64, "requests": [{"t": 0, "type": "n", "in": 70, "out": 1, "hash_ids": [5]}]}'
    )
    (t,) = load_trace(str(odd))
    assert t.turns[0].append_tokens == 70


def test_a_subagent_arriving_past_the_float_range_is_named(tmp_path):
    """What was wrong: a subagent's arrival (its parent's origin + its `t`, each finite) could sum to inf, a bare
    ValueError of `Trajectory` ("trajectory 1 arrival_time must be a finite number") naming no file or request; and a
    later request of it could sit at origin + t = inf, loaded silently (arrival and offset each finite) and made
    ready at t = inf by the trace arrivals (an OverflowError inside the simulator's run). Contract: a TraceFormatError
    naming the file, the request and field 't'; huge but finite times load."""
    p = tmp_path / "s.json"
    sub = {"type": "subagent", "t": 1.7e308, "requests": [_req(1.7e308, 70, [9])]}
    p.write_text(json.dumps(_session([_req(0.0, 70, [1]), sub])))
    with pytest.raises(TraceFormatError, match=rf"{p}: requests\[1\]: requests\[0\]: field 't' = 1.7e\+308"):
        load_trace(str(p))
    sub = {"type": "subagent", "t": 1.7e308, "requests": [_req(0.0, 70, [9]), _req(1.7e308, 140, [9, 10])]}
    p.write_text(json.dumps(_session([_req(0.0, 70, [1]), sub])))
    with pytest.raises(TraceFormatError, match=rf"{p}: requests\[1\]: requests\[1\]: field 't' = 1.7e\+308"):
        load_trace(str(p))
    sub = {"type": "subagent", "t": 1.7e308, "requests": [_req(0.0, 70, [9])]}
    p.write_text(json.dumps(_session([_req(0.0, 70, [1]), sub])))
    main, subagent = load_trace(str(p))
    assert subagent.arrival_time == 1.7e308


@pytest.mark.parametrize("scope", ["global", "LOCAL", 1])
def test_a_session_of_another_hash_id_scope_is_refused(tmp_path, scope):
    """What was wrong: the loader salts every session's hash ids with its session id (the files' `hash_id_scope:
    "local"`), whatever the file's `hash_id_scope` said: ids of another scope, shared across sessions, were salted
    apart and their shared prefixes never hit, silently. Contract: a TraceFormatError naming the file and the field;
    "local", null or no field loads as before."""
    p = tmp_path / "s.json"
    p.write_text(json.dumps(_session([_req(0.0, 70, [1])], hash_id_scope=scope)))
    with pytest.raises(TraceFormatError, match=f"{p}: field 'hash_id_scope' = {scope!r} is not supported"):
        load_trace(str(p))
    for ok in ("local", None):
        p.write_text(json.dumps(_session([_req(0.0, 70, [1])], hash_id_scope=ok)))
        assert len(load_trace(str(p))) == 1


def test_a_trace_in_the_other_format_than_its_name_says_is_named_so(tmp_path):
    """What was wrong: `load_trace` picks the format by the file name, and a Mooncake trace saved as *.json said only
    "not valid JSON (Extra data at column 1)", a kv-cache-tester session saved as *.jsonl "missing field 'timestamp'":
    nothing pointed at the name. Contract: both errors name the file and line and say how the name picks the
    format."""
    row = {"timestamp": 0, "input_length": 600, "output_length": 1, "hash_ids": [0, 1]}
    mc = tmp_path / "mine.json"
    mc.write_text(json.dumps(row) + "\n" + json.dumps(dict(row, timestamp=5)) + "\n")
    with pytest.raises(TraceFormatError, match=rf"{mc}:2: not valid JSON \(Extra data.*\*\.jsonl\[\.gz\] Mooncake"):
        load_trace(str(mc))
    kv = tmp_path / "mine.jsonl"
    kv.write_text(json.dumps(_session([_req(0.0, 70, [1])])) + "\n")
    with pytest.raises(TraceFormatError, match=rf"{kv}:1: a kv-cache-tester session, not a Mooncake request; the file"):
        load_trace(str(kv))
    (tmp_path / "ok.jsonl").write_text(json.dumps(row) + "\n")  # the right names load
    (tmp_path / "ok.json").write_text(json.dumps(_session([_req(0.0, 70, [1])])))
    assert len(load_trace(str(tmp_path / "ok.jsonl"))) == len(load_trace(str(tmp_path / "ok.json"))) == 1
