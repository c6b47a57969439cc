"""Fix 12, workloads: a researcher's own trace files and synthetic datasets (a non-UTF-8 byte's line, a UTF-8 BOM, a
session request without a type, custom SyntheticSpec fields, huge append scales, online arrivals at a tiny aps)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math

import numpy as np
import pytest
from test_workloads_traces import needs_traces

from dualpath_jax.workloads import make_agents, make_arrivals
from dualpath_jax.workloads.synthetic import DATASETS, SyntheticSpec, generate_trajectories
from dualpath_jax.workloads.traces import TraceFormatError, load_trace

ROWS = [
    {"timestamp": 0, "input_length": 600, "output_length": 10, "hash_ids": [1, 2]},
    {"timestamp": 5, "input_length": 1200, "output_length": 20, "hash_ids": [1, 2, 3]},
    {"timestamp": 9, "input_length": 300, "output_length": 5, "hash_ids": [7]},
]
REQ = {"t": 0.0, "type": "n", "in": 130, "out": 7, "hash_ids": [1, 2]}
SESSION = {"id": "s1", "block_size": 64, "requests": [REQ, dict(REQ, t=3.0, **{"in": 200, "hash_ids": [1, 2, 3]})]}


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _shapes(trajs):
    return [(t.arrival_time, t.turn_shapes(64), [x.arrival_offset_s for x in t.turns]) for t in trajs]


@pytest.mark.parametrize("gz", [False, True])
def test_a_non_utf8_byte_names_its_line(tmp_path, gz):
    """A Latin-1 byte on line 3 said "'utf-8' codec can't decode byte 0xe9 in position 106": no line, and a position
    inside the reader's buffer, not the file."""
    data = _jsonl(ROWS).replace(b'{"timestamp": 9', b'{"timestamp\xe9": 9')
    p = tmp_path / ("bad.jsonl.gz" if gz else "bad.jsonl")
    p.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(TraceFormatError, match=r"bad\.jsonl(\.gz)?:3: cannot read as (gzipped )?text: byte 0xe9 "):
        load_trace(p)


def test_a_non_utf8_byte_of_a_session_file_names_its_line(tmp_path):
    data = json.dumps(SESSION, indent=1).encode().replace(b'"type"', b'"typ\xe9"', 1)
    line = data[: data.index(b"\xe9")].count(b"\n") + 1
    p = tmp_path / "trace_x.json"
    p.write_bytes(data)
    with pytest.raises(TraceFormatError, match=rf"trace_x\.json:{line}: cannot read as text: byte 0xe9 at column "):
        load_trace(p)


@pytest.mark.parametrize("name", ["bom.jsonl", "bom.jsonl.gz", "trace_bom.json", "trace_bom.json.gz"])
def test_a_utf8_bom_loads(tmp_path, name):
    """A file saved with a UTF-8 byte order mark (RFC 8259 lets a reader ignore it) was refused on line 1 ("Unexpected
    UTF-8 BOM (decode using utf-8-sig)", advice the loaders give no way to follow)."""
    data = _jsonl(ROWS) if ".jsonl" in name else json.dumps(SESSION).encode()
    plain = tmp_path / name.replace("bom", "plain")
    bom = tmp_path / name
    for p, d in ((plain, data), (bom, b"\xef\xbb\xbf" + data)):
        p.write_bytes(gzip.compress(d) if name.endswith(".gz") else d)
    assert _shapes(load_trace(bom)) == _shapes(load_trace(plain))


def test_a_bom_inside_the_file_is_still_an_error(tmp_path):
    """Only a leading BOM is skipped: one on a later line (files joined with `cat`) stays an error naming its line."""
    p = tmp_path / "joined.jsonl"
    p.write_bytes(_jsonl(ROWS[:2]) + b"\xef\xbb\xbf" + _jsonl(ROWS[2:]))
    with pytest.raises(TraceFormatError, match=r"joined\.jsonl:3: not valid JSON"):
        load_trace(p)


def test_a_session_request_without_type_names_the_field(tmp_path):
    """It said "unknown request type None" (the field missing, not unknown)."""
    doc = dict(SESSION, requests=[REQ, {k: v for k, v in REQ.items() if k != "type"}])
    p = tmp_path / "trace_t.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(TraceFormatError, match=r"trace_t\.json: requests\[1\]: missing field 'type'"):
        load_trace(p)


BASE = DATASETS.get("32K")


@pytest.mark.parametrize(
    "field, value",
    [
        ("append_mean", 0.0),  # math.log(0): "math domain error"
        ("gen_mean", -5.0),
        ("first_append_mean", math.nan),
        ("append_mean", math.inf),
        ("length_median", 0.0),
        ("length_median", math.inf),  # int(inf): OverflowError
        ("gen_sigma", -1.0),  # numpy's "sigma < 0"
        ("length_sigma", math.nan),
        ("max_len", 2.5),  # "turn lengths must be whole numbers, got append=1.0 gen=1.5"
        ("max_len", 1),
        ("max_len", True),
        ("max_len", 2**31),  # past the token positions (the trace loaders' limit too)
        ("append_mean", "500"),
    ],
)
def test_a_custom_spec_with_a_bad_field_names_it(field, value):
    """A custom dataset (`SyntheticSpec`, a documented input of generate_trajectories / make_agents) was not checked:
    a zero mean was "math domain error", an infinite length an OverflowError, a NaN mean a turn of -2**63 tokens."""
    with pytest.raises(ValueError, match=rf"synthetic dataset 'mine': {field} must be"):
        SyntheticSpec(**{**dataclasses.asdict(dataclasses.replace(BASE, name="mine")), field: value})


@pytest.mark.parametrize("scale", [1e20, 1e300])
def test_a_huge_append_scale_ends_each_trajectory_after_its_first_turn(scale):
    """Appends past the int64 range wrapped to -2**63 ("turn lengths must be >= 0 and finite, got
    append=-9223372036854775808"); no append that large fits the max length, so each trajectory is its first turn,
    cut to the max length."""
    trajs = generate_trajectories("32K", 3, seed=0, append_scale=scale)
    assert [t.num_turns for t in trajs] == [1, 1, 1]
    assert [t.total_tokens for t in trajs] == [BASE.max_len] * 3


def test_a_huge_spec_mean_ends_each_trajectory_after_its_first_turn():
    spec = dataclasses.replace(BASE, name="huge", append_mean=1e300)
    trajs = generate_trajectories(spec, 2, seed=0)
    assert [t.num_turns for t in trajs] == [1, 1]


def test_clipping_the_draws_changes_no_ordinary_trajectory():
    """The clip at the limit keeps every ordinary draw: a fixed seed gives the trajectories it gave before."""
    t = generate_trajectories("64K", 2, seed=0)
    assert [x.num_turns for x in t] == [113, 119]
    assert [(x.append_tokens, x.gen_tokens) for x in t[0].turns[:3]] == [(5788, 214), (245, 368), (129, 213)]
    assert [x.total_tokens for x in t] == [65514, 65366]


def test_online_arrivals_past_the_float_range_name_aps():
    """aps=1e-320 (finite, > 0) puts every arrival at t = inf: with_arrivals blamed trajectory 0 ("arrival_time must
    be a finite number of seconds >= 0, got inf"), naming no aps."""
    agents = make_agents("32K", 3, seed=0, base_trajectories=3)
    model = make_arrivals("online", aps=1e-320, seed=0)
    with pytest.raises(ValueError, match=r"online arrivals at aps=1e-320 agents/s put agent 0 of 3 past the float"):
        model.with_arrivals(agents)
    # tiny and huge but representable rates still work
    assert all(math.isfinite(t.arrival_time) for t in make_arrivals("online", aps=1e-300).with_arrivals(agents))
    assert np.all(make_arrivals("online", aps=1e300, seed=0).agent_arrivals(agents) < 1e-290)


def test_online_arrivals_past_the_float_range_stay_a_runtime_config_error(base):
    """agent_arrivals still returns t = inf there (no raise): the runtime's driver reports it as a config error naming
    run_timeout_s and aps (a raise inside agent_arrivals made that a traceback of `experiments.run`)."""
    from dualpath_jax.runtime import driver
    from dualpath_jax.runtime.config import ConfigError

    cfg = base.replace(**{"workload.arrival": "online", "workload.aps": 1e-320, "run_timeout_s": 20.0})
    with pytest.raises(ConfigError, match=r"config.run_timeout_s=20 s ends before the workload's last agent arrives"):
        driver.prepare(cfg)


def test_max_requests_counts_requests_not_blank_lines(tmp_path):
    """`max_requests` (the Mooncake `limit`) counted physical lines: a blank line among the first N (skipped as a
    request) left N - 1 requests."""
    p = tmp_path / "gaps.jsonl"
    p.write_bytes(b"\n" + _jsonl(ROWS[:1]) + b"\r\n" + _jsonl(ROWS[1:]))
    assert sum(t.num_turns for t in load_trace(p, limit=2)) == 2
    assert sum(t.num_turns for t in load_trace(p, limit=3)) == 3


def test_a_hash_list_of_the_wrong_length_names_both_fields(tmp_path):
    """It said "4 hash ids for 2290 input tokens", naming neither JSON field (a session's is 'in', not 'input')."""
    p = tmp_path / "short.jsonl"
    p.write_bytes(_jsonl([dict(ROWS[0], hash_ids=[1])]))
    with pytest.raises(
        TraceFormatError, match=r"short\.jsonl:1: 1 hash ids for 600 input tokens; .*'hash_ids'.*'input_length'"
    ):
        load_trace(p)
    doc = dict(SESSION, requests=[REQ, dict(REQ, hash_ids=[1, 2, 3])])
    q = tmp_path / "trace_h.json"
    q.write_text(json.dumps(doc))
    with pytest.raises(
        TraceFormatError, match=r"trace_h\.json: requests\[1\]: 3 hash ids for 130 input tokens; .*'hash_ids'.*'in'"
    ):
        load_trace(q)


def test_an_online_workload_too_large_for_memory_is_one_line(tmp_path):
    """simulate with aps=1e9 for 60 s asks for 6e10 agents: one line naming the rate and duration (it was numpy's
    MemoryError traceback, "Unable to allocate 447. GiB"), nothing written."""
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "sim"
    cmd = [
        sys.executable, "-m", "experiments.simulate", "--config=configs/sim_tiny.py:dualpath",
        "--config.workload.kind=online", "--config.workload.aps=1e9", "--config.workload.duration_s=60",
        f"--output_dir={out}", "--noprogress",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=repo, env={**os.environ, "PYTHONPATH": repo}, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.rstrip().splitlines()[-1]
    assert last.startswith("simulate: out of memory for its agents (online: aps 1e+09 x duration_s 60 = 6e+10)")
    assert last.endswith(f"nothing written to {out}")
    assert not out.exists() or not any(out.iterdir())


@needs_traces
def test_a_trace_path_under_the_home_directory_may_start_with_a_tilde(tmp_path, monkeypatch):
    """`--workload=~/x.jsonl` gets no tilde expansion from the shell (it follows '='): the loader expands it (it said
    "trace '~/x.jsonl' not found")."""
    import shutil

    from dualpath_jax.workloads import traces

    monkeypatch.setenv("HOME", str(tmp_path))
    src = traces.resolve_trace_path("mooncake_conversation_trace.jsonl.gz")
    shutil.copy(src, tmp_path / "mine.jsonl.gz")
    assert traces.resolve_trace_path("~/mine.jsonl.gz") == tmp_path / "mine.jsonl.gz"
    assert len(traces.load_trace("~/mine.jsonl.gz", limit=5)) >= 1
