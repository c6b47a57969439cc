"""Defect hunt in the workloads (arrivals, traces, types, synthetic): each test failed before its fix."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from dualpath_jax.workloads import (
    TraceFormatError,
    Trajectory,
    Turn,
    load_kvcache_session,
    load_kvcache_tester,
    load_mooncake,
    load_trace,
    make_agents,
    make_arrivals,
)


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def _session(requests, **kw):
    return {"id": "s1", "block_size": 64, "requests": requests, **kw}


REQ = {"t": 0.0, "type": "n", "in": 130, "out": 5, "hash_ids": [1, 2], "think_time": 0.0}


# ------------------------------------------------------------------------------------------------ arrivals
def test_arrival_flags_must_be_bools():
    """closed_loop="false" (a truthy string from a config variant) kept the closed loop; use_gaps="no" the gaps."""
    with pytest.raises(ValueError, match=r"closed_loop must be a bool, got 'false'"):
        make_arrivals("trace", closed_loop="false")
    with pytest.raises(ValueError, match=r"use_gaps must be a bool, got 'no'"):
        make_arrivals("online", aps=1.0, use_gaps="no")
    with pytest.raises(ValueError, match=r"use_gaps must be a bool, got 0"):
        make_arrivals("online", aps=1.0, use_gaps=0)
    # real bools (numpy's too) still pick the behaviour
    traj = Trajectory(0, [Turn(10, 1, gap_s=2.0), Turn(10, 1, arrival_offset_s=1.0)], arrival_time=0.0)
    assert make_arrivals("trace", closed_loop=np.bool_(False)).turn_ready(traj, 1, 5.0) == 1.0
    assert make_arrivals("trace", closed_loop=True).turn_ready(traj, 1, 5.0) == 7.0
    assert make_arrivals("online", aps=1.0, use_gaps=False).turn_ready(traj, 1, 5.0) == 5.0


# ------------------------------------------------------------------------------------------------- traces
def test_load_trace_max_agents_takes_numpy_ints(tmp_path):
    """max_agents=np.int64(1) (a count computed with numpy) was refused as 'must be an int', unlike every other
    count of the loaders (checks.is_int)."""
    (tmp_path / "trace_1.json").write_text(json.dumps(_session([REQ])))
    (tmp_path / "trace_2.json").write_text(json.dumps(_session([REQ], id="s2")))
    assert len(load_trace(tmp_path, max_agents=np.int64(1))) == 1
    with pytest.raises(ValueError, match="max_agents must be an int >= 1"):
        load_trace(tmp_path, max_agents=1.0)


def test_kvcache_agent_arrives_with_its_first_request(tmp_path):
    """A (sub)agent whose first request comes t > 0 after its start: its trajectory arrived at the start and turn 0's
    offset was t, so TraceArrivals ran turn 0 t seconds early (and offsets were not from turn 0, as Mooncake's are)."""
    sub = {"type": "subagent", "t": 7.0, "requests": [dict(REQ, t=1.0), dict(REQ, t=3.0, hash_ids=[50, 51])]}
    reqs = [dict(REQ, t=5.0), sub, {**REQ, "t": 9.0, "in": 200, "hash_ids": [1, 2, 3]}]
    p = tmp_path / "trace_late.json"
    p.write_text(json.dumps(_session(reqs)))
    main, subagent = load_kvcache_session(p)
    assert main.arrival_time == 5.0 and [t.arrival_offset_s for t in main.turns] == [0.0, 4.0]
    # the subagent's `t` counts from the parent's session start (0), its requests' `t` from the subagent's
    assert subagent.arrival_time == 8.0 and [t.arrival_offset_s for t in subagent.turns] == [0.0, 2.0]
    model = make_arrivals("trace", closed_loop=False)
    assert list(model.agent_arrivals([main, subagent])) == [5.0, 8.0]
    assert model.turn_ready(main, 1, prev_finish=5.5) == 9.0  # the recorded time of request 2


def test_one_session_loaded_twice_is_refused(tmp_path):
    """A session file given twice (or a copy under another name) made agents whose session-scoped hash ids are
    salted alike: they shared every block, silently (the paper's agents share no prefix)."""
    a = tmp_path / "trace_1.json"
    a.write_text(json.dumps(_session([REQ])))
    copy = tmp_path / "trace_copy.json"
    shutil.copy(a, copy)
    for files in ([a, a], [a, copy]):
        with pytest.raises(TraceFormatError, match=r"session id 's1' was loaded already, from .*trace_1.json"):
            load_kvcache_tester(files)
    with pytest.raises(TraceFormatError, match="was loaded already"):
        load_trace(tmp_path)
    copy.write_text(json.dumps(_session([REQ], id="s2")))
    one, two = load_trace(tmp_path)
    assert not set(one.turns[0].block_hashes) & set(two.turns[0].block_hashes)


@pytest.mark.parametrize(
    "rows,match",
    [
        # an id twice in one prompt
        (
            [{"timestamp": 0, "input_length": 1100, "output_length": 3, "hash_ids": [1, 2, 2]}],
            r"x.jsonl:1: hash id 2 at block 2 was at block 1 before",
        ),
        # block 0 of line 1 is block 1 of line 2
        (
            [
                {"timestamp": 0, "input_length": 1100, "output_length": 3, "hash_ids": [1, 2, 3]},
                {"timestamp": 1, "input_length": 1100, "output_length": 3, "hash_ids": [7, 1, 8]},
            ],
            r"x.jsonl:2: hash id 1 at block 1 was at block 0 before",
        ),
    ],
)
def test_mooncake_hash_id_at_two_block_positions_is_refused(tmp_path, rows, match):
    """A prefix-chained id names one block position; a trace that reuses one elsewhere is damaged (it was kept and
    matched sessions / counted re-read blocks on ids that do not name the prefix)."""
    p = tmp_path / "x.jsonl"
    _write_jsonl(p, rows)
    with pytest.raises(TraceFormatError, match=match):
        load_mooncake(p)


def test_kvcache_hash_id_at_two_block_positions_is_refused(tmp_path):
    p = tmp_path / "trace_pos.json"
    sub = {"type": "subagent", "t": 1.0, "requests": [dict(REQ, hash_ids=[2, 9])]}  # id 2 was block 1 of the parent
    p.write_text(json.dumps(_session([REQ, sub])))
    with pytest.raises(TraceFormatError, match=r"requests\[1\]: requests\[0\]: hash id 2 at block 0 was at block 1"):
        load_kvcache_session(p)


def test_trace_token_counts_past_int32_are_refused(tmp_path):
    """output_length 10**30 was kept: a turn that decodes for ever (positions are int32 on the device)."""
    p = tmp_path / "x.jsonl"
    _write_jsonl(p, [{"timestamp": 0, "input_length": 600, "output_length": 10**30, "hash_ids": [1, 2]}])
    with pytest.raises(TraceFormatError, match=r"x.jsonl:1: field 'output_length' = 1e\+30 is past"):
        load_mooncake(p)
    s = tmp_path / "trace_big.json"
    s.write_text(json.dumps(_session([dict(REQ, out=2**31)])))
    with pytest.raises(TraceFormatError, match=r"requests\[0\]: field 'out' = 2.14748e\+09 is past"):
        load_kvcache_session(s)
    s.write_text(json.dumps(_session([dict(REQ, out=2**31 - 1)])))  # the largest one is fine
    assert load_kvcache_session(s)[0].turns[0].gen_tokens == 2**31 - 1


# -------------------------------------------------------------------------------------------------- types
def test_turn_fields_must_be_numbers():
    """gap_s=True was a 1 s gap and arrival_offset_s=True an offset of 1 s (token counts refused bools already);
    gap_s="0.5" was a TypeError naming no field; hash_block_size -3 or 64.5 was kept when no hashes came."""
    for kw, field in [
        ({"gap_s": True}, "gap_s"),
        ({"arrival_offset_s": True}, "arrival_offset_s"),
        ({"gap_s": "0.5"}, "gap_s"),
        ({"context_tokens": "3"}, "context_tokens"),
    ]:
        with pytest.raises(ValueError, match=f"turn {field} must be a number"):
            Turn(1, 1, **kw)
    with pytest.raises(ValueError, match="turn append_tokens must be a number, got '5'"):
        Turn("5", 1)
    for hbs in (-3, 64.5):
        with pytest.raises(ValueError, match="hash_block_size must be an int >= 0"):
            Turn(1, 1, hash_block_size=hbs)
    assert Turn(np.int64(3), 1, gap_s=np.float64(0.5), hash_block_size=np.int64(64)).gap_s == 0.5


def test_turn_append_token_ids_must_be_token_ids():
    """Float or negative token ids (and a 2-D array) were kept: the runtime's np.asarray(ids, np.int32) turned 1.5
    into token 1 silently, and the block keys of a negative id failed far from the turn that held it."""
    with pytest.raises(ValueError, match="append_token_ids must be 1-D integer token ids, got float64"):
        Turn(3, 1, append_token_ids=np.array([1.5, 2.0, 3.0]))
    with pytest.raises(ValueError, match="append_token_ids must be >= 0, got -1"):
        Turn(3, 1, append_token_ids=np.array([-1, 2, 3]))
    with pytest.raises(ValueError, match="1-D"):
        Turn(2, 1, append_token_ids=np.zeros((2, 2), dtype=np.int32))
    assert Turn(0, 1, append_token_ids=np.array([])).append_tokens == 0  # no ids: any dtype


def test_cut_at_tokens_refuses_nan_and_negative_limits():
    """A nan window kept every turn (no total is > nan); a negative one cut them all, silently."""
    t = Trajectory(0, [Turn(100, 10), Turn(50, 5)])
    for bad in (math.nan, -1, "4096"):
        with pytest.raises(ValueError, match="cut_at_tokens limit must be a token count >= 0"):
            t.cut_at_tokens(bad)
    assert t.cut_at_tokens(math.inf) is t and t.cut_at_tokens(0).turns == []


# ---------------------------------------------------------------------------------------------- synthetic
def test_make_agents_flag_vocab_and_scale_are_checked():
    """with_token_ids="no" drew ids; vocab_size 2**32 was numpy's "high is out of bounds for int32"; append_scale
    True was a silent 1.0 and "2" a bare TypeError."""
    with pytest.raises(ValueError, match="with_token_ids must be a bool, got 'no'"):
        make_agents("32K", 1, base_trajectories=2, with_token_ids="no")
    with pytest.raises(ValueError, match=r"vocab_size must be <= 2\*\*31 \(token ids are int32\), got 4294967296"):
        make_agents("32K", 1, base_trajectories=2, with_token_ids=True, vocab_size=2**32)
    for scale in (True, "2"):
        with pytest.raises(ValueError, match="append_scale must be > 0 and finite"):
            make_agents("32K", 1, base_trajectories=2, append_scale=scale)
    a = make_agents("32K", 1, base_trajectories=2, with_token_ids=True, vocab_size=2**31)
    assert a[0].turns[1].append_token_ids.dtype == np.int32
