"""Fix wave 17, the "qa" journey: today's launchers used in earnest, with odd but legitimate inputs. Each test failed
before its fix:

- a sweep run with --overwrite over a finished one, killed hard, then --resume'd, kept the earlier (overwritten)
  sweep's rows for the cells it had not finished yet: its sweep.json stayed until the end;
- a capacity probe that judged no turn (none arrived in the SLO window) was a miss: "< lo", a capacity never measured;
- the runtime's table said "missed" for an SLO that judged no turn (a trace run's warm-up after every turn), and
  run.png "nan%";
- a capacity --modes item's signed value (`policy.x=+inf`) was split at its '+';
- one sweep load in two spellings (agents=2, agents=02) ran as two cells;
- a capacity search of a setup that replays a trace ran synthetic agents instead, without a word;
- a resumed sweep's run.json `rerun` line carried --resume: pasted twice, it ran nothing the second time;
- `trace=` beside `dataset=` ran the trace and ignored the dataset (a sweep over datasets: identical rows).
"""

from __future__ import annotations

import json
import os

import pytest
import test_launch_hunt as launch_hunt

# sim_tiny, whose turns per agent come from $TURNS (a change the setup file's sha256 does not see: as a change of the
# code); the second load of cell $KILL_AT (`mode,agents`: the run's own, after the sweep's check) kills its process
# hard, as kill -9 / the OOM killer would (one worker: the driver itself)
_SETUP = """
import os, signal
from configs.sim_tiny import get_config as _tiny

def get_config(arg=None):
    cfg = _tiny(arg)
    cfg.workload.max_turns = int(os.environ.get("TURNS", "2"))
    cell = f"{cfg.mode},{cfg.workload.n_agents}"
    key = "LOADS_" + cell.replace(",", "_")
    os.environ[key] = str(int(os.environ.get(key, "0")) + 1)
    if os.environ[key] == "2" and cell == os.environ.get("KILL_AT"):
        os.kill(os.getpid(), signal.SIGKILL)
    return cfg
"""


def _sweep(setup, out_dir, modes: str, *extra: str, env: dict | None = None):
    return launch_hunt._launch(
        "-m", "experiments.sweep", f"--setups={setup}", f"--modes={modes}", "--loads=agents=2,agents=3",
        "--workers=1", "--noplot", f"--output_dir={out_dir}", *extra, env=env,
    )  # fmt: skip


def test_resume_after_a_killed_overwrite_keeps_none_of_the_overwritten_sweeps_rows(tmp_path):
    """Sweep A (1 turn per agent) finished; sweep B (2 turns) ran over it with --overwrite and was killed hard after
    its 2 basic cells. B's --resume kept A's dualpath rows as B's finished cells (A's sweep.json was still there):
    it ran nothing, and half its table was another sweep's. Now --overwrite removes the earlier rows as it starts,
    so the resume runs B's 2 missing cells."""
    setup = tmp_path / "turns.py"
    setup.write_text(_SETUP)
    out_dir = tmp_path / "out"
    a = _sweep(setup, out_dir, "dualpath,basic", env={"TURNS": "1"})
    assert a.returncode == 0, a.stderr[-2000:]
    b = _sweep(setup, out_dir, "basic,dualpath", "--overwrite", env={"TURNS": "2", "KILL_AT": "dualpath,2"})
    assert b.returncode == -9, b.stderr[-2000:]
    assert "sweep.json" not in os.listdir(out_dir)  # (A's rows: gone as B started)
    out = _sweep(setup, out_dir, "basic,dualpath", "--resume", env={"TURNS": "2"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"--resume: kept 2 finished cells of 4 from {out_dir}; running the other 2" in out.stderr
    rows = json.loads((out_dir / "sweep.json").read_text())
    # every row is B's: 2 turns per agent
    assert [(r["mode"], r["load"], r["turns"]) for r in rows] == [
        ("basic", "agents=2", 4), ("basic", "agents=3", 6), ("dualpath", "agents=2", 4), ("dualpath", "agents=3", 6)
    ]  # fmt: skip


def test_a_capacity_probe_that_judged_no_turn_is_no_verdict(tmp_path):
    """At a low --lo on a window of 300 s, seed 2's one agent (round(0.001 x 600) = 1, the least) and its turns
    arrive before the warm-up ends: the probe judged no turn, which slo_summary calls a miss, and the search said
    "< 0.001": this setup cannot sustain 0.001 APS. Now that search has no capacity, says why, and has no gain."""
    out_dir = tmp_path / "out"
    out = launch_hunt._launch(
        "-m", "experiments.capacity", "--setups=configs/sim_tiny.py", "--modes=basic,dualpath", "--lo=0.001",
        "--hi=0.002", "--iters=0", "--extra=duration=600,warmup=300", "--seeds=1,2", "--noplot",
        f"--output_dir={out_dir}",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((out_dir / "capacity.json").read_text())
    seed1 = [r for r in rows if r["seed"] == 1]
    assert [(r["bound"], r["capacity"]) for r in seed1] == [("at_hi", ">= 0.002")] * 2  # (judged: as before)
    for r in (r for r in rows if r["seed"] == 2):
        assert [p["slo_turns"] for p in r["probe_results"]] == [0]
        assert (r["bound"], r["capacity"], r["capacity_aps"], r["missed_aps"]) == (
            "no_turn_judged", "n/a", None, None
        ), r  # fmt: skip
        assert r["unjudged_aps"] == [0.001]
        assert r.get("gain") is None
    assert "< 0.001" not in out.stdout
    assert (
        "capacity: sim_tiny.py:basic, seed 2: no turn arrived in the SLO window [300 s, 600 s) at 0.001 APS: no "
        "verdict there (widen the window, --extra=warmup=...,duration=..., or raise --lo)"
    ) in out.stdout, out.stdout


def test_a_runtime_table_with_no_turn_judged_says_n_a_not_missed():
    """A trace-arrival run whose config.runtime.slo.warmup_s is after every turn (1000 s on a run of 1 s) judged no
    turn: the table said "n/a" for the attainment and "missed" beside it, a verdict on nothing. Now "n/a" for both
    (and `experiments.run` adds a note naming the policies with no turn in the SLO's window)."""
    import math
    from types import SimpleNamespace

    from experiments.run import format_table

    s = {"jct_s": 1.0, "ttft_p50_s": 0.1}
    none = {**s, "slo_turns": 0, "slo_attainment": math.nan, "slo_met": False}
    judged = {**s, "slo_turns": 5, "slo_attainment": 0.8, "slo_met": False}
    table = format_table({"basic": SimpleNamespace(summary=none), "dualpath": SimpleNamespace(summary=judged)})
    _, _, basic, dualpath = table.splitlines()
    assert basic.split()[-4:-2] == ["n/a", "n/a"] and dualpath.split()[-4:-2] == ["80.0%", "missed"]


def test_a_runtime_plot_with_no_turn_judged_says_n_a_not_nan(tmp_path, monkeypatch):
    """run.png's JCT panel named the attainment of a policy that judged no turn "nan%"; now "n/a", as the table."""
    import math
    from types import SimpleNamespace

    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.axes

    from experiments.run import plot

    titles = []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda self, text, **kw: titles.append(text))
    s = {"jct_s": 1.0, "link_bytes": {}}
    results = {
        "basic": SimpleNamespace(summary={**s, "slo_turns": 0, "slo_attainment": math.nan}, records=[]),
        "dualpath": SimpleNamespace(summary={**s, "slo_turns": 4, "slo_attainment": 0.75}, records=[]),
    }
    assert plot(results, str(tmp_path / "run.png"))
    assert titles[0] == "JCT (arrivals spread); SLO attained: basic n/a, dualpath 75%", titles


def test_a_capacity_mode_item_keeps_a_signed_value_whole():
    """`--modes=dualpath+policy.x=+inf`: the '+' of a value's sign was taken for a join ('policy.x=' and a mode
    'inf', a confusing error); a '+' right after '=' now stays in the value, as that of 1e+6 did."""
    from experiments.capacity import search_spec

    mode = "dualpath_rr+policy.alpha_tokens=+inf+cluster.snic_gbps=1e+1+batcher.quota_s=+0.5"
    assert search_spec("s.py", mode, "dataset=48K", "3") == (
        "s.py:dualpath_rr,policy.alpha_tokens=+inf,cluster.snic_gbps=1e+1,batcher.quota_s=+0.5,kind=online,"
        "dataset=48K,seed=3"
    )


@pytest.mark.parametrize(
    "loads", ["agents=2,agents=02", "aps=0.5,aps=.5", "policy.alpha_tokens=1000000,policy.alpha_tokens=1e6"]
)
def test_a_sweep_load_spelled_twice_is_a_flag_error(tmp_path, loads):
    """`--loads=agents=2,agents=02`: one load in two spellings ran twice (two cells of one config, drawn as two
    loads); now a flag error naming both, as for `--loads=agents=2,agents=2`."""
    first, second = loads.split(",")
    out = launch_hunt._launch("-m", "experiments.sweep", f"--loads={loads}", f"--output_dir={tmp_path / 'out'}")
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert f"--loads names {first!r} twice ({second!r})" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_capacity_refuses_a_setup_that_replays_a_trace(tmp_path):
    """A setup file of kind=trace (a trace_path) searched with `experiments.capacity`: each probe made the workload
    online (`kind=online`) and ran synthetic agents of the file's dataset at each APS, with no word that the trace
    was not replayed; its capacity passed for the trace's. Now one line naming the setup, before any search."""
    setup = tmp_path / "replay.py"
    setup.write_text(
        "from configs.sim_tiny import get_config as _tiny\n"
        "from configs.sim_base import apply_variant\n\n"
        "def get_config(arg=None):\n"
        "    cfg = _tiny()\n"
        "    cfg.workload.kind, cfg.workload.trace_path = 'trace', 'mooncake_conversation_trace.jsonl.gz'\n"
        "    return apply_variant(cfg, arg)\n"
    )
    out_dir = tmp_path / "out"
    out = launch_hunt._launch(
        "-m", "experiments.capacity", f"--setups=configs/sim_tiny.py,{setup}", "--modes=basic", "--lo=0.5",
        "--hi=1", "--iters=0", "--noplot", f"--output_dir={out_dir}",
    )  # fmt: skip
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == (
        f"bad --setups: {str(setup)!r} replays a trace (config.workload.trace_path="
        "'mooncake_conversation_trace.jsonl.gz'): a capacity search runs the synthetic online agents of its dataset "
        "at each APS, not a trace; give a setup of synthetic agents"
    ), out.stderr[-2000:]
    assert not out_dir.exists()


def test_the_rerun_line_of_a_resumed_sweep_runs_every_cell_each_time(tmp_path):
    """A resumed sweep's run.json `rerun` line carried --resume: pasted once it ran every cell into <dir>/rerun, but
    pasted again (a second check) it kept the first paste's rows and ran nothing, a "reproduction" of nothing. Now
    it ends with --noresume: every paste runs every cell, and a second one into the same directory is refused."""
    import subprocess
    import sys

    out_dir = tmp_path / "out"
    out = launch_hunt._launch(
        "-m", "experiments.sweep", "--modes=basic", "--loads=agents=2", "--extra=turns=2", "--noplot", "--resume",
        f"--output_dir={out_dir}",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rerun = json.loads((out_dir / "run.json").read_text())["rerun"]
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    first = subprocess.run(rerun, shell=True, executable="/bin/bash", capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    rows = [json.loads((d / "sweep.json").read_text()) for d in (out_dir, out_dir / "rerun")]
    assert [r["jct_s"] for r in rows[0]] == [r["jct_s"] for r in rows[1]]
    again = subprocess.run(rerun, shell=True, executable="/bin/bash", capture_output=True, text=True, env=env)
    assert again.returncode == 1 and "it holds an earlier run's results" in again.stderr, again.stderr[-2000:]


def test_a_trace_item_refuses_a_dataset_item_it_would_ignore():
    """`--loads=dataset=32K,dataset=64K --extra=trace=...`: a trace replays its own turns, so both cells ran the same
    trace with identical figures, as if the datasets gave one result. Now `trace=` with `dataset=` is refused by name
    (as with `aps=` / `kind=`), before anything runs."""
    from dualpath_jax.sim import load_sim_config

    with pytest.raises(ValueError, match=r"trace= replays a trace; it cannot go with dataset=64K \(a synthetic"):
        load_sim_config("configs/sim_tiny.py:basic,dataset=64K,trace=x.jsonl", as_run=True)
    load_sim_config("configs/sim_tiny.py:basic,dataset=64K", as_run=True)  # (synthetic: taken)


def test_a_capacity_mode_spelled_twice_is_a_flag_error(tmp_path):
    """`--modes=dualpath+policy.z_slack=1.1,dualpath+policy.z_slack=1.10`: one search in two spellings ran twice (and
    the second's gain over the first was 1x); now a flag error, as sweep's --loads."""
    modes = "dualpath+policy.z_slack=1.1,dualpath+policy.z_slack=1.10"
    out = launch_hunt._launch("-m", "experiments.capacity", f"--modes={modes}", f"--output_dir={tmp_path / 'out'}")
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "--modes names 'dualpath+policy.z_slack=1.1' twice" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("launcher, held", [("sweep", "sweep.json"), ("capacity", "capacity.json")])
def test_an_occupied_output_dir_is_said_before_any_cell_is_built(tmp_path, launcher, held):
    """The launchers built every cell's / search's simulator (minutes at paper scale) before saying that --output_dir
    holds an earlier run's results; now that comes first (here: before a bad mode would have been found)."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / held).write_text("[]")
    out = launch_hunt._launch("-m", f"experiments.{launcher}", "--modes=no_such_mode", f"--output_dir={out_dir}")
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "it holds an earlier run's results" in out.stderr.strip().splitlines()[-1], out.stderr[-2000:]
