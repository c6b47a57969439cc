"""Trace loaders against the real files in ../shared/traces, and malformed input."""

from __future__ import annotations

import gzip
import json

import pytest

from dualpath_jax.workloads import summarize, traces
from dualpath_jax.workloads.traces import (
    TRACES_ENV,
    TraceFormatError,
    load_kvcache_session,
    load_kvcache_tester,
    load_mooncake,
    load_trace,
    resolve_trace_path,
    traces_dir,
)

MOONCAKE = "mooncake_conversation_trace.jsonl.gz"
needs_traces = pytest.mark.skipif(
    not (traces_dir() / MOONCAKE).exists(),
    reason=f"real traces not found at {traces_dir()} (set ${TRACES_ENV})",
)


def _raw_mooncake(n):
    with gzip.open(traces_dir() / MOONCAKE, "rt") as f:
        return [json.loads(next(f)) for _ in range(n)]


@needs_traces
def test_mooncake_real_sessions():
    n = 3000
    trajs = load_mooncake(MOONCAKE, max_requests=n)
    raw = _raw_mooncake(n)
    turns = [(t, i) for t in trajs for i in range(len(t.turns))]
    assert len(turns) == n
    assert any(len(t.turns) > 1 for t in trajs)  # sessions were inferred
    # every turn keeps its request's prompt, output and arrival; turns of a session come in time order
    by_ts = sorted(
        ((t.arrival_time + t.turns[i].arrival_offset_s, t.prompt_tokens(i), t.turns[i].gen_tokens) for t, i in turns)
    )
    assert by_ts == sorted((r["timestamp"] / 1000, r["input_length"], r["output_length"]) for r in raw)
    for t in trajs:
        offs = [x.arrival_offset_s for x in t.turns]
        assert offs == sorted(offs) and offs[0] == 0.0
        for i in range(1, len(t.turns)):
            prev, cur = t.turns[i - 1], t.turns[i]
            # a continuation extends the previous prompt's full blocks (more than the shared block 0)
            n_full = t.prompt_tokens(i - 1) // 512
            assert n_full >= 2 and prev.block_hashes[n_full - 1] in set(cur.block_hashes.tolist())
            assert 0 < t.hit_tokens(i, 512) <= t.prompt_tokens(i) - 1
    st = summarize(trajs, block_size=512)
    assert 0.1 < st.hit_rate < 0.6


@needs_traces
def test_kvcache_tester_real_sessions_with_subagent():
    files = ["kvcache_tester/trace_0001.json.gz", "kvcache_tester/trace_0014.json.gz"]
    trajs = load_kvcache_tester(files)
    with gzip.open(traces_dir() / files[0]) as f:
        raw = json.load(f)
    main = trajs[0]
    reqs = [r for r in raw["requests"] if r["type"] != "subagent"]
    assert len(main.turns) == len(reqs)
    assert [main.prompt_tokens(i) for i in range(len(reqs))] == [r["in"] for r in reqs]
    assert [x.gen_tokens for x in main.turns] == [r["out"] for r in reqs]
    assert [x.gap_s for x in main.turns] == [r["think_time"] for r in reqs[1:]] + [0.0]
    assert [x.arrival_offset_s for x in main.turns] == [r["t"] for r in reqs]
    assert all(x.hash_block_size == 64 for x in main.turns)
    subs = [t for t in trajs if "#" in t.source]
    assert len(subs) == 1 and subs[0].source == "trace_0014.json.gz#agent_001"
    assert [t.source for t in trajs][1:3] == ["trace_0014.json.gz", "trace_0014.json.gz#agent_001"]
    assert subs[0].arrival_time == pytest.approx(961.349) and len(subs[0].turns) == 2
    # sessions never share blocks (session-scoped ids are salted)
    a = set(trajs[0].turns[0].block_hashes.tolist())
    b = {h for t in trajs[1:] for x in t.turns for h in x.block_hashes.tolist()}
    assert not a & b
    st = summarize(trajs)
    assert st.hit_rate > 0.85  # "over 95% of each prompt's KV reusable" (whole blocks, dropped thinking)
    assert [t.trajectory_id for t in trajs] == list(range(len(trajs)))


@needs_traces
def test_load_trace_dispatch_and_lookup():
    assert resolve_trace_path(MOONCAKE) == traces_dir() / MOONCAKE
    assert len(load_trace("kvcache_tester", limit=2)) >= 2
    assert sum(len(t.turns) for t in load_trace(MOONCAKE, limit=50)) == 50
    assert traces.load is load_trace
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_trace("nope.jsonl")


def test_env_var_moves_traces_dir(tmp_path, monkeypatch):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"timestamp": 0, "input_length": 600, "output_length": 3, "hash_ids": [1, 2]}) + "\n")
    monkeypatch.setenv(TRACES_ENV, str(tmp_path))
    assert traces_dir() == tmp_path
    trajs = load_trace("x.jsonl")
    assert len(trajs) == 1 and trajs[0].prompt_tokens(0) == 600 and trajs[0].hit_tokens(0, 64) == 0


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")


GOOD = {"timestamp": 0, "input_length": 600, "output_length": 3, "hash_ids": [1, 2]}


@pytest.mark.parametrize(
    "bad,match",
    [
        ("{not json", r":3: not valid JSON"),
        ({"timestamp": 5, "input_length": 600, "output_length": 3}, r":3: missing field 'hash_ids'"),
        (
            {"timestamp": 5, "input_length": 600, "output_length": 3, "hash_ids": [1]},
            r":3: 1 hash ids for 600 input tokens",
        ),
        (
            {"timestamp": 5, "input_length": -2, "output_length": 3, "hash_ids": []},
            r":3: field 'input_length' must be an integer >= 1",
        ),
        (
            {"timestamp": -1, "input_length": 600, "output_length": 3, "hash_ids": [1, 2]},
            r":3: field 'timestamp'",
        ),
        ("[1, 2]", r":3: expected a JSON object"),
        # JSON's NaN / Infinity (1e999 parses as inf) were int() errors naming no file
        (
            '{"timestamp": 5, "input_length": 1e999, "output_length": 3, "hash_ids": [1, 2]}',
            r":3: field 'input_length' must be an integer >= 1, got inf",
        ),
        (
            '{"timestamp": 5, "input_length": 600, "output_length": NaN, "hash_ids": [1, 2]}',
            r":3: field 'output_length' must be an integer >= 0, got nan",
        ),
        (
            {"timestamp": 5, "input_length": 600, "output_length": 3, "hash_ids": [1, 2**64]},
            r":3: field 'hash_ids' holds an id outside the int64 range",
        ),
    ],
)
def test_mooncake_malformed_line_names_file_and_line(tmp_path, bad, match):
    p = tmp_path / "bad.jsonl"
    _write_jsonl(p, [GOOD, dict(GOOD, timestamp=1), bad])
    with pytest.raises(TraceFormatError, match=match) as e:
        load_mooncake(p)
    assert str(p) in str(e.value)


def test_mooncake_time_going_back_and_empty(tmp_path):
    p = tmp_path / "back.jsonl"
    _write_jsonl(p, [dict(GOOD, timestamp=10), dict(GOOD, timestamp=5)])
    with pytest.raises(TraceFormatError, match=r"back.jsonl:2: timestamp 5 ms goes back"):
        load_mooncake(p)
    e = tmp_path / "empty.jsonl"
    e.write_text("\n")
    with pytest.raises(TraceFormatError, match="no request"):
        load_mooncake(e)


def test_corrupt_gzip_names_file(tmp_path):
    p = tmp_path / "broken.jsonl.gz"
    p.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(TraceFormatError, match="broken.jsonl.gz: cannot read as gzipped text"):
        load_mooncake(p)


def test_gzip_with_corrupt_data_names_file(tmp_path):
    """A gzip whose header is fine but whose deflate data is damaged (zlib.error, not an OSError) names the file."""
    rows = "".join(json.dumps(dict(GOOD, timestamp=k, input_length=600 + k)) + "\n" for k in range(2000))
    raw = bytearray(gzip.compress(rows.encode(), mtime=0))
    raw[100:200] = bytes(b ^ 0xFF for b in raw[100:200])
    p = tmp_path / "damaged.jsonl.gz"
    p.write_bytes(bytes(raw))
    with pytest.raises(TraceFormatError, match="damaged.jsonl.gz: cannot read as gzipped text"):
        load_mooncake(p)
    s = tmp_path / "trace_damaged.json.gz"
    s.write_bytes(bytes(raw))
    with pytest.raises(TraceFormatError, match="trace_damaged.json.gz: cannot read as gzipped text"):
        load_kvcache_session(s)


def test_loader_arguments_out_of_range_are_refused(tmp_path):
    """min_shared_blocks 0 matched a session by its partial last block (ids[-1]); a negative limit dropped the
    last session files (files[:-1]); block_size 0 was a ZeroDivisionError."""
    p = tmp_path / "x.jsonl"
    _write_jsonl(
        p, [dict(GOOD, input_length=100, hash_ids=[5]), dict(GOOD, timestamp=1, input_length=100, hash_ids=[5])]
    )
    assert len(load_mooncake(p)) == 2
    for kw in ({"min_shared_blocks": 0}, {"min_shared_blocks": -1}, {"block_size": 0}):
        with pytest.raises(ValueError, match="min_shared_blocks and block_size must be >= 1"):
            load_mooncake(p, **kw)
    with pytest.raises(ValueError, match="max_requests must be >= 0, got -1"):
        load_mooncake(p, max_requests=-1)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "trace_1.json").write_text(json.dumps(_session([REQ])))
    with pytest.raises(ValueError, match="limit must be >= 0, got -1"):
        load_kvcache_tester(tmp_path / "s", limit=-1)


def test_session_directory_reads_only_json_and_json_gz(tmp_path):
    """A Mooncake *.jsonl or a leftover *.json.gz.part beside the sessions is not read as a session."""
    (tmp_path / "trace_1.json").write_text(json.dumps(_session([REQ])))
    (tmp_path / "trace_2.json.gz").write_bytes(gzip.compress(json.dumps(_session([REQ], id="s2")).encode()))
    (tmp_path / "trace_3.json.gz.part").write_bytes(b"\x1f\x8b")
    _write_jsonl(tmp_path / "mooncake.jsonl", [GOOD])
    assert [t.source for t in load_trace(tmp_path)] == ["trace_1.json", "trace_2.json.gz"]


def _session(requests, **kw):
    return {"id": "s1", "block_size": 64, "requests": requests, **kw}


REQ = {"t": 0.0, "type": "n", "in": 130, "out": 5, "hash_ids": [1, 2], "think_time": 0.0}


@pytest.mark.parametrize(
    "doc,match",
    [
        (_session([REQ, dict(REQ, type="x")]), r"requests\[1\]: unknown request type 'x'"),
        (
            _session([REQ, dict(REQ, hash_ids=[1])]),
            r"requests\[1\]: 1 hash ids for 130 input tokens; expected floor",
        ),
        (
            _session([REQ, {k: v for k, v in REQ.items() if k != "out"}]),
            r"requests\[1\]: missing field 'out'",
        ),
        (_session([dict(REQ, t=5.0), dict(REQ, t=1.0)]), r"requests\[1\]: t=1.0 goes back in time"),
        (
            _session([REQ, {"type": "subagent", "t": 1.0, "requests": [dict(REQ, think_time=-1)]}]),
            r"requests\[1\]: requests\[0\]: field 'think_time'",
        ),
        ({"id": "s1", "requests": []}, "missing field 'block_size'"),
        ([1, 2], "expected one JSON object"),
    ],
)
def test_kvcache_malformed_names_file_and_request(tmp_path, doc, match):
    p = tmp_path / "trace_9999.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(TraceFormatError, match=match) as e:
        load_kvcache_session(p)
    assert str(p) in str(e.value)


def test_kvcache_bad_json_names_line(tmp_path):
    p = tmp_path / "trace_bad.json"
    p.write_text('{\n"id": "x",\n"block_size": 64,\n"requests": [,]\n}')
    with pytest.raises(TraceFormatError, match=r"trace_bad.json:4: not valid JSON"):
        load_kvcache_session(p)


def test_kvcache_context_rules(tmp_path):
    """Growth past prompt + gen re-reads the whole previous context; a rewrite re-reads whole seen blocks."""
    reqs = [
        {"t": 0.0, "type": "n", "in": 130, "out": 10, "hash_ids": [1, 2], "think_time": 0.0},
        {"t": 5.0, "type": "n", "in": 200, "out": 7, "hash_ids": [1, 2, 3], "think_time": 2.0},  # 200 >= 140
        {
            "t": 9.0,
            "type": "s",
            "in": 210,
            "out": 1,
            "hash_ids": [1, 2, 9],
            "think_time": 1.5,
        },  # block 3 rewritten: 2 blocks
        {
            "t": 12.0,
            "type": "n",
            "in": 150,
            "out": 1,
            "hash_ids": [1, 7],
            "think_time": 0.5,
        },  # shrink: block 1 only
    ]
    p = tmp_path / "trace_ok.json"
    p.write_text(json.dumps(_session(reqs)))
    (t,) = load_kvcache_session(p)
    assert [t.context_before(i) for i in range(4)] == [0, 140, 128, 64]
    assert [t.prompt_tokens(i) for i in range(4)] == [130, 200, 210, 150]
    assert [x.gap_s for x in t.turns] == [2.0, 1.5, 0.5, 0.0]


@needs_traces
@pytest.mark.slow
def test_all_real_traces_load_consistently():
    """Every shipped trace loads; every turn keeps its recorded prompt and re-reads less than it."""
    files = sorted((traces_dir() / "kvcache_tester").glob("*.json.gz"))
    n_requests = 0
    for f in files:
        with gzip.open(f) as fh:
            doc = json.load(fh)

        def count(reqs):
            return sum(count(r["requests"]) if r["type"] == "subagent" else 1 for r in reqs)

        n_requests += count(doc["requests"])
    sessions = load_kvcache_tester("kvcache_tester")
    assert sum(len(t.turns) for t in sessions) == n_requests
    for name in (MOONCAKE, "mooncake_synthetic_trace.jsonl.gz"):
        with gzip.open(traces_dir() / name, "rt") as fh:
            lines = sum(1 for line in fh if line.strip())
        trajs = load_trace(name)
        assert sum(len(t.turns) for t in trajs) == lines
        sessions = sessions + trajs
    for t in sessions:
        for (prompt, hit, _), turn in zip(t.turn_shapes(64), t.turns, strict=True):
            assert 0 <= hit < prompt and turn.context_tokens < prompt


@pytest.fixture(scope="module")
def mooncake_full():
    """The whole Mooncake conversation trace, loaded once for the tests below (~0.6 s a load); read only."""
    return load_trace(MOONCAKE)


def test_max_agents_gives_the_first_whole_trajectories(mooncake_full, tmp_path):
    """The runtime's `workload.agents` for a trace meant agents but was passed as `limit`, which counts Mooncake
    lines: the first 24 lines gave however many sessions began there, each cut after its turns in those lines."""
    full = mooncake_full
    cut = load_trace("mooncake_conversation_trace.jsonl.gz", limit=24)
    assert any(len(c.turns) < len(f.turns) for c, f in zip(cut, full, strict=False))  # why `limit` is not agents
    first = load_trace("mooncake_conversation_trace.jsonl.gz", max_agents=5)
    assert len(first) == 5
    for a, b in zip(first, full[:5], strict=True):
        assert a.turns == b.turns and a.arrival_time == b.arrival_time and a.trajectory_id == b.trajectory_id
    # kv-cache-tester sessions: a directory of the trace's first 6 files (its 160 files load in ~4 s, twice here)
    head = tmp_path / "kvcache_head"
    head.mkdir()
    for f in sorted((traces_dir() / "kvcache_tester").glob("*.json.gz"))[:6]:
        (head / f.name).write_bytes(f.read_bytes())
    sessions = load_trace(str(head))
    assert len(sessions) >= 6
    some = load_trace("kvcache_tester", max_agents=3)  # (the whole trace: its first 3 are in its first files)
    assert [t.turns for t in some] == [t.turns for t in sessions[:3]]
    assert [t.turns for t in load_trace(str(head), max_agents=4)] == [t.turns for t in sessions[:4]]
    assert len(load_trace(str(head), max_agents=10**6)) == len(sessions)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="max_agents must be an int >= 1"):
            load_trace("kvcache_tester", max_agents=bad)


def test_runtime_trace_workload_takes_whole_agents(mooncake_full):
    from dualpath_jax.runtime.config import RuntimeConfig, WorkloadConfig
    from dualpath_jax.runtime.driver import make_trajectories

    cfg = RuntimeConfig(workload=WorkloadConfig(kind="trace", trace="mooncake_conversation_trace.jsonl.gz", agents=4))
    trajs = make_trajectories(cfg)
    full = mooncake_full
    assert len(trajs) == 4
    assert [len(t.turns) for t in trajs] == [min(len(t.turns), cfg.workload.turns) for t in full[:4]]
