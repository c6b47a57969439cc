"""Fix wave 14, area `repro`: researcher B gets researcher A's output directory only and wants to (a) know exactly what
ran, (b) run it again and get the same numbers, (c) compare the two.

What was missing: no launcher recorded the command line, its flags, versions, the git commit, the host, the start
and wall time or the trace file read (the simulator's summary.json held the resolved config only; sweep.json,
report.json and the runtime's results.json not even that per cell); nothing could be pasted to run it again; the
runtime's greedy tokens were compared between the policies of one run and then dropped, so B could not compare them
with A's. Now every launcher writes `run.json` (`dualpath_jax.metrics.run_info`) beside its results, with a `rerun`
line; sweep.json names each cell's spec; the runtime keeps each policy's tokens and their sha256.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Two Mooncake sessions of three requests each (each request's prompt extends the previous one's blocks)
_TRACE = [
    (0, 1024, 4, [0, 1]),
    (0, 700, 3, [10, 11]),
    (2000, 1600, 4, [0, 1, 2, 3]),
    (2500, 1200, 3, [10, 11, 12]),
    (4000, 2100, 5, [0, 1, 2, 3, 4]),
    (5000, 1700, 2, [10, 11, 12, 13]),
]


def _env() -> dict:
    # the `rerun` line says `python`: this interpreter's
    return {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}


def _launch(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=_env()
    )


@pytest.fixture(scope="module")
def a_run(tmp_path_factory):
    """Researcher A's simulation: a trace workload under the `random` policy (its tie-breaks seeded) with an
    override, results in A's directory."""
    tmp = tmp_path_factory.mktemp("repro")
    trace = tmp / "trace.jsonl"
    trace.write_text(
        "".join(
            json.dumps({"timestamp": t, "input_length": n, "output_length": g, "hash_ids": h}) + "\n"
            for t, n, g, h in _TRACE
        )
    )
    out = tmp / "a"
    args = [
        "experiments.simulate", "--config=configs/sim_tiny.py:random,kind=trace,seed=3",
        f"--config.workload.trace_path={trace}", "--config.cluster.snic_gbps=20", f"--output_dir={out}",
        "--noplot", "--noprogress",
    ]  # fmt: skip
    done = _launch(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, trace, args


def test_simulate_records_what_ran_beside_its_results(a_run):
    """(a) run.json names the command and every flag (the config file with its variant, each override), the seed,
    the resolved config, the trace read (its size and sha256), versions, the git commit of the checkout, the host,
    the start time and the wall time. Before: only summary.json's config."""
    out, trace, args = a_run
    info = json.loads((out / "run.json").read_text())
    assert info["command"].startswith("python -m experiments.simulate --config=configs/sim_tiny.py:random,kind=trace")
    assert info["cwd"] == REPO
    assert info["flags"]["config"] == {
        "file": "configs/sim_tiny.py:random,kind=trace,seed=3",
        "overrides": {"workload.trace_path": str(trace), "cluster.snic_gbps": 20.0},
    }
    assert info["flags"]["output_dir"] == str(out) and info["flags"]["plot"] is False
    assert info["seed"] == 3 and info["config"]["scheduler"]["name"] == "random"
    assert info["config"]["cluster"]["snic_gbps"] == 20.0
    assert info["config"] == json.loads((out / "summary.json").read_text())["config"]
    (t,) = info["traces"]
    data = trace.read_bytes()
    assert t["path"] == str(trace) and t["bytes"] == len(data) and t["sha256"] == hashlib.sha256(data).hexdigest()
    import dualpath_jax

    assert info["versions"]["dualpath_jax"] == dualpath_jax.__version__ and info["versions"]["numpy"]
    if os.path.exists(os.path.join(REPO, ".git")):
        assert re.fullmatch(r"[0-9a-f]{40}", info["git"]["commit"]) and isinstance(info["git"]["dirty"], bool)
    assert info["host"]["name"] and info["host"]["cpus"] >= 1
    started = datetime.datetime.fromisoformat(info["started_utc"])
    assert abs((datetime.datetime.now(datetime.UTC) - started).total_seconds()) < 3600
    assert info["wall_s"] > 0


def test_the_recorded_rerun_line_gives_the_same_results(a_run):
    """(b), (c) B pastes run.json's `rerun` line (A's command, in A's directory, with the environment that changes a
    run, and an --output_dir of its own): turns.csv and links.csv are byte-identical, summary.json differs only in the
    figures that are wall-clock by nature and the output directory. Before: there was no line to paste."""
    out, _, _ = a_run
    info = json.loads((out / "run.json").read_text())
    assert info["rerun"].endswith(f"--output_dir={out / 'rerun'}")
    done = subprocess.run(
        info["rerun"], shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=180, env=_env()
    )
    assert done.returncode == 0, done.stderr[-3000:]
    b = out / "rerun"
    for name in ("turns.csv", "links.csv"):
        assert (b / name).read_bytes() == (out / name).read_bytes(), name
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (out, b))
    for s in (sa, sb):
        for k in ("wall_s", "events_per_s", "turns_per_s"):
            s["stats"].pop(k)
        s["config"].pop("output_dir")
    assert sa == sb
    assert json.loads((b / "run.json").read_text())["config"]["output_dir"] == str(b)


def test_the_recorded_config_alone_runs_the_same_simulation(a_run, tmp_path):
    """(b) without A's config file (another checkout, an edited file): run.json's `config` (the resolved config, as
    summary.json's) loads with `sim_config_from_dict` and runs the same turns and links."""
    from dualpath_jax.sim import outputs, run
    from dualpath_jax.sim.config import sim_config_from_dict

    out, _, _ = a_run
    config = json.loads((out / "run.json").read_text())["config"]
    outputs.write_results(run(sim_config_from_dict(config)), str(tmp_path), config, plot=False)
    for name in ("turns.csv", "links.csv"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


def test_sweep_records_what_ran_and_each_cells_spec(tmp_path):
    """sweep.json names the spec each row ran (setup, mode, load, seed as one `file:variant`), and run.json the
    command, flags and cells. Before: rows of a file name, a mode and a load, nothing else."""
    out = tmp_path / "sw"
    setup = os.path.join(REPO, "configs", "sim_tiny.py")
    done = _launch(
        "experiments.sweep", f"--setups={setup}", "--modes=basic", "--loads=agents=2", "--seeds=1",
        "--extra=turns=2", "--noplot", f"--output_dir={out}",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads((out / "sweep.json").read_text())
    assert row["spec"] == f"{setup}:basic,agents=2,turns=2,seed=1"
    info = json.loads((out / "run.json").read_text())
    assert info["command"].startswith("python -m experiments.sweep --setups=")
    assert info["flags"]["seeds"] == ["1"] and info["flags"]["modes"] == ["basic"]
    assert info["cells"] == [row["spec"]]
    assert info["rerun"].endswith(f"--output_dir={out / 'rerun'}") and info["wall_s"] > 0


def test_reproduce_paper_records_what_ran(tmp_path):
    """run.json names the flags and every run's label; report.md the whole command (it said
    `python -m experiments.reproduce_paper`, no flag)."""
    out = tmp_path / "rp"
    done = _launch("experiments.reproduce_paper", "--agents=2", "--noplot", f"--output_dir={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((out / "run.json").read_text())
    assert info["command"] == f"python -m experiments.reproduce_paper --agents=2 --noplot --output_dir={out}"
    assert info["flags"]["agents"] == 2 and info["flags"]["seeds"] == ["0"]
    assert "offline configs/paper_ds660b.py:dualpath,dataset=64K,agents=2,seed=0" in info["runs"]
    assert info["rerun"].endswith(f"--output_dir={out / 'rerun'}")
    assert f"Generated by `{info['command']}` on " in (out / "report.md").read_text()  # (it named no flag)


# The runtime's main job with its runs stubbed (tokens known), as tests/test_launch_hunt2.py does
_STUB_RUN = """
import sys, types
import numpy as np
from absl import app
from dualpath_jax.runtime import driver
from experiments import parse_flags_or_exit, run

def fake_run(cfg, ts, **kw):
    s = {"turns": 2, "jct_s": 2.0, "gen_tokens_per_s": 6.0, "prompt_tokens_per_s": 60.0, "ttft_p50_s": 0.1,
         "ttft_p99_s": 0.2, "tpot_p50_s": 0.01, "tpot_p99_s": 0.02, "pe_read_bytes": 3e6, "de_read_bytes": 0,
         "snic_max_over_avg": 3.0}
    ids = lambda *x: np.array(x, np.int32)
    tokens = {(1, 0): ids(5, 6, 7), (0, 1): ids(9), (0, 0): ids(1, 2)}  # (not in (trajectory, turn) order)
    return types.SimpleNamespace(summary=s, records=[], links=[], requeued=0, schedule_time_s=0.0, node_stats={},
                                 startup_s=0.0, tokens=tokens)

driver.prepare = lambda cfg, *a, **k: ([types.SimpleNamespace(turns=[0, 1])], None)
driver.run = fake_run
app.run(run.main, flags_parser=parse_flags_or_exit)
"""


def test_the_runtime_records_what_ran_and_each_policys_greedy_tokens(tmp_path):
    """run.json beside results.json; each turns_<policy>.json holds the greedy tokens of every turn and results.json
    their sha256 per policy, so B compares a re-run's tokens with A's. Before: the tokens were dropped."""
    results = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-c", _STUB_RUN, "--config=configs/tiny_runtime.py:test", f"--config.results_dir={results}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = results.iterdir()
    info = json.loads((run_dir / "run.json").read_text())
    assert info["flags"]["config"]["file"] == "configs/tiny_runtime.py:test"
    assert info["flags"]["config"]["overrides"] == {"results_dir": str(results)}
    assert info["config"]["runtime"]["workload"]["seed"] == 0 and info["versions"]["jax"] and info["devices"]
    assert info["wall_s"] > 0
    turns = json.loads((run_dir / "turns_basic.json").read_text())
    assert turns["tokens"] == [[0, 0, [1, 2]], [0, 1, [9]], [1, 0, [5, 6, 7]]]  # (trajectory, turn, ids), in order
    digest = hashlib.sha256(b"0 0 1 2\n0 1 9\n1 0 5 6 7\n").hexdigest()
    res = json.loads((run_dir / "results.json").read_text())
    assert res["greedy_tokens"]["sha256"] == {"basic": digest, "dualpath": digest}
