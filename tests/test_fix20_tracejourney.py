"""Fix wave 20, a researcher replays a real trace in the runtime and the simulator (README "Replaying a trace") and
makes the usual mistakes on the way. Checked: an agent count past what the trace holds (the simulator's new
`workload.max_agents`) is one line naming the field and the trace's count, not a smaller run; a Mooncake request
where a kv-cache-tester session belongs names the format; an agent count given to a trace run points at
max_agents. Each test failed on the code before its fix. Tiny traces written here: no real trace is needed."""

import json
import subprocess

import pytest
from test_launch_hunt import _launch

from dualpath_jax.sim.config import SimConfigError
from dualpath_jax.sim.configs_io import load_sim_config
from dualpath_jax.sim.runner import make_trajectories
from dualpath_jax.workloads.traces import TraceFormatError, load_trace


def _mooncake(path, sessions: int) -> str:
    """A Mooncake JSONL of `sessions` sessions of two turns each (no shared block 0: each its own ids)."""
    rows = []
    for s in range(sessions):
        ids = [1000 * s + k for k in range(3)]
        rows.append({"timestamp": 10 * s, "input_length": 1100, "output_length": 4, "hash_ids": ids})
    for s in range(sessions):  # each session's second turn extends its first prompt
        ids = [1000 * s + k for k in range(4)]
        rows.append({"timestamp": 100 + 10 * s, "input_length": 1600, "output_length": 4, "hash_ids": ids})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _trace_cfg(trace: str, **over):
    return load_sim_config(
        "configs/sim_tiny.py",
        {"workload.kind": "trace", "workload.trace_path": trace, **{f"workload.{k}": v for k, v in over.items()}},
    )


# ---- max_agents past the trace ---------------------------------------------------------------------------------------
def test_max_agents_past_the_trace_is_refused_naming_both_counts(tmp_path):
    """`--config.workload.max_agents=500` on a trace of 3 sessions replayed the 3, silently (a run of another size
    than asked, compared with a runtime run of `workload.agents=500`). Contract: a SimConfigError naming the field,
    the trace and how many sessions it holds; max_agents up to that count replays that many, each whole."""
    trace = _mooncake(tmp_path / "t.jsonl", 3)
    for n in (1, 3):
        trajs, _ = make_trajectories(_trace_cfg(trace, max_agents=n))
        assert [t.trajectory_id for t in trajs] == list(range(n)) and all(len(t.turns) == 2 for t in trajs)
    with pytest.raises(SimConfigError, match=r"max_agents = 4, but the trace .*t\.jsonl holds 3 trajectories"):
        make_trajectories(_trace_cfg(trace, max_agents=4))
    assert len(make_trajectories(_trace_cfg(trace))[0]) == 3  # 0: all of them, as before


def test_simulate_says_max_agents_past_the_trace_in_one_line(tmp_path):
    """The launcher's line (a `bad config:` line, exit code 1, no traceback), before anything ran."""
    trace = _mooncake(tmp_path / "t.jsonl", 2)
    out = _launch(
        "-m",
        "experiments.simulate",
        "--config=configs/sim_tiny.py",
        "--config.workload.kind=trace",
        f"--config.workload.trace_path={trace}",
        "--config.workload.max_agents=5",
        f"--config.output_dir={tmp_path / 'out'}",
    )
    assert out.returncode == 1, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("bad config: config.workload.max_agents = 5, but the trace") and "holds 2" in last
    assert "Traceback" not in out.stderr and not (tmp_path / "out").exists()


# ---- a directory of the wrong format ---------------------------------------------------------------------------------
def test_a_mooncake_request_read_as_a_session_names_the_format(tmp_path):
    """A directory of *.json files each holding one Mooncake request (a researcher's split of a JSONL) said only
    "missing field 'block_size'"; the reverse mistake already named the format. Contract: the file, what it holds,
    and how the file name picks the format."""
    (tmp_path / "r.json").write_text(
        json.dumps({"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [1, 2]})
    )
    with pytest.raises(TraceFormatError, match=r"r\.json: a Mooncake request, not a kv-cache-tester session; the file"):
        load_trace(str(tmp_path))
    with pytest.raises(TraceFormatError, match=r"r\.json: a Mooncake request, not a kv-cache-tester session"):
        load_trace(str(tmp_path / "r.json"))


# ---- an agent count on a trace run -----------------------------------------------------------------------------------
def test_n_agents_on_a_trace_run_points_at_max_agents(tmp_path):
    """`--config.workload.n_agents=8` on a trace run was refused with "a trace [runs] all of its own" and the hint
    "kind=offline, or leave the agent count out": it never named max_agents, the field that replays a trace's first N
    sessions (README). Contract: the refusal names config.workload.max_agents."""
    trace = _mooncake(tmp_path / "t.jsonl", 2)
    with pytest.raises(
        ValueError, match=r"config\.workload\.n_agents applies to offline .*config\.workload\.max_agents=N"
    ):
        load_sim_config(
            "configs/sim_tiny.py",
            {"workload.kind": "trace", "workload.trace_path": trace, "workload.n_agents": 8},
            as_run=True,
        )


# ---- workload_stats of what a replay runs ----------------------------------------------------------------------------
def _stats(*args: str) -> subprocess.CompletedProcess:
    return _launch("-m", "experiments.workload_stats", *args)


def _row(out: str, name: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(name)).split()[-1]


def test_workload_stats_counts_the_first_sessions_a_replay_runs(tmp_path):
    """A researcher comparing a replay of `max_agents=N` (simulator) / `workload.agents=N` (runtime) with
    `workload_stats` had only --limit, which counts Mooncake requests: the first N lines' sessions, cut after their
    turns there (here 3 turns where the replay runs 6). Contract: --max_agents=N prints the statistics of the
    trajectories the replay runs; past the trace it is one line naming the count, as the simulator's field."""
    trace = _mooncake(tmp_path / "t.jsonl", 3)
    out = _stats(f"--workload={trace}", "--max_agents=3")
    assert out.returncode == 0, out.stderr[-2000:]
    replay, _ = make_trajectories(_trace_cfg(trace, max_agents=3))
    assert _row(out.stdout, "trajectories") == "3" and _row(out.stdout, "turns (total)") == "6"
    assert sum(len(t.turns) for t in replay) == 6
    assert _row(_stats(f"--workload={trace}", "--limit=3").stdout, "turns (total)") == "3"  # (why --limit is not it)
    bad = _stats(f"--workload={trace}", "--max_agents=4")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == f"bad --max_agents: 4, but {trace} holds 3 trajectories (sessions)"


def test_runtime_agents_past_the_trace_are_not_dropped_without_a_word(tmp_path, caplog):
    """The runtime's `workload.agents=N` on a trace of fewer sessions (`:test` sets 4, the file 32) replayed what the
    trace holds, silently. Contract: the loader warns, naming the trace, both counts and the runtime's field; a
    count within the trace says nothing. (Refusing it belongs in the runtime's driver, which cannot tell a given
    count from the config file's default: see the fix20 report.)"""
    from configs.tiny_runtime import get_config
    from dualpath_jax.runtime import driver
    from dualpath_jax.runtime.config import RuntimeConfig

    trace = _mooncake(tmp_path / "t.jsonl", 2)
    base = RuntimeConfig.from_config_dict(get_config("test").runtime)
    cfg = base.replace(**{"workload.kind": "trace", "workload.trace": trace, "workload.scale": 0.1})
    with caplog.at_level("WARNING", logger="dualpath_jax.workloads.traces"):
        trajs = driver.make_trajectories(cfg.replace(**{"workload.agents": 5}), 1000)
    assert len(trajs) == 2
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert said == [
        f"{trace} holds 2 trajectories (sessions), fewer than max_agents=5 (the runtime's workload.agents): replaying all 2"
    ]
    caplog.clear()
    with caplog.at_level("WARNING", logger="dualpath_jax.workloads.traces"):
        assert len(driver.make_trajectories(cfg.replace(**{"workload.agents": 2}), 1000)) == 2
        assert len(load_trace(trace, limit=2, max_agents=2)) == 2  # (the first 2 requests: 2 sessions)
    assert not caplog.records
    with caplog.at_level("WARNING", logger="dualpath_jax.workloads.traces"):
        load_trace(trace, limit=1, max_agents=2)
    assert "holds 1 trajectories (sessions) in its first 1 requests, fewer than max_agents=2" in caplog.text


def test_a_pretty_printed_or_array_mooncake_trace_names_the_format(tmp_path):
    """A trace written by `json.dump(rows, f, indent=1)` (or one line holding the array of requests) into a *.jsonl
    said "line 1: not valid JSON (Expecting property name enclosed in double quotes at column 2)" / "expected a JSON
    object, got list": true, but no word of why. Contract: the line's message, then what the format wants."""
    rows = [{"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [1, 2]}]
    (tmp_path / "p.jsonl").write_text(json.dumps(rows[0], indent=1))
    with pytest.raises(TraceFormatError, match=r"p\.jsonl:1: not valid JSON \(.*column 2\); the line holds only '\{'"):
        load_trace(str(tmp_path / "p.jsonl"))
    (tmp_path / "a.jsonl").write_text(json.dumps(rows) + "\n")
    with pytest.raises(TraceFormatError, match=r"a\.jsonl:1: expected a JSON object, got list \(a JSON array: a Moon"):
        load_trace(str(tmp_path / "a.jsonl"))
    (tmp_path / "b.jsonl").write_text('{"timestamp": 0,\n')  # (a line cut short: no hint, as before)
    with pytest.raises(TraceFormatError, match=r"b\.jsonl:1: not valid JSON \([^)]*\)$"):
        load_trace(str(tmp_path / "b.jsonl"))


def test_the_simulators_turn_cap_on_a_trace_is_logged(tmp_path, caplog):
    """`configs/sim_tiny.py` caps every trajectory at max_turns=12: a trace replayed there with max_agents ("each
    session whole") lost its later turns without a word, where the max_context_tokens cut logs what it drops.
    Contract: one info line naming the field and the turns dropped; none when nothing is cut."""
    trace = _mooncake(tmp_path / "t.jsonl", 3)
    with caplog.at_level("INFO", logger="dualpath_jax.sim.runner"):
        trajs, _ = make_trajectories(_trace_cfg(trace, max_turns=1))
    assert [len(t.turns) for t in trajs] == [1, 1, 1]
    assert (
        "workload.max_turns=1: 3 of 6 turns dropped (3 trajectories cut; max_turns=0 keeps every turn)" in caplog.text
    )
    caplog.clear()
    with caplog.at_level("INFO", logger="dualpath_jax.sim.runner"):  # (a sweep's check, then its run: said once)
        make_trajectories(_trace_cfg(trace, max_turns=1))
    assert "max_turns" not in caplog.text
    with caplog.at_level("INFO", logger="dualpath_jax.sim.runner"):
        make_trajectories(_trace_cfg(trace, max_turns=2))
    assert "max_turns" not in caplog.text
