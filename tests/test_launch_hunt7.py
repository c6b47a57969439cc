"""Defects found by the seventh launcher hunt of 2026-12-04 (each test failed before its fix):
- `batcher.model` / `batcher.hardware` (compute_quota's Config) did nothing in the simulator, silently: its batcher
  times batches with the prefill engines' cost model (config.cluster.model / hardware);
- `workload.n_agents` (`agents=`) did nothing on a trace (or online) run: it ran every agent of the trace;
- `duration=` / `warmup=` variant items on an offline run did nothing (the `--config.*` flags were refused);
- SIGTERM of experiments.sweep / experiments.reproduce_paper ended it at once: the finished cells were lost."""

import csv
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

from dualpath_jax.sim import load_sim_config
from dualpath_jax.sim.config import sim_config_from_dict
from dualpath_jax.sim.configs_io import load_config, variant_fields
from dualpath_jax.sim.runner import build_simulator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs/sim_tiny.py")


def _launch(*args, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO, **(env or {})},
    )


# ---- 1. the batcher's own model / hardware ------------------------------------------------------------------------
@pytest.mark.parametrize("item, field", [("batcher.model=ds660b", "model"), ("batcher.hardware=h100", "hardware")])
def test_a_batcher_model_or_hardware_the_simulator_does_not_use_is_refused_by_name(item, field):
    """sim_tiny (DS 27B on H800) with `batcher.model=ds660b` ran with DS 27B's batch costs, as without the item."""
    with pytest.raises(ValueError, match=re.escape(f"config.batcher.kwargs.{field}=") + ".* is not used"):
        load_sim_config(f"{TINY}:dualpath,{item}")
    cfg = load_sim_config(f"{TINY}:dualpath")  # a SimConfig changed in code: refused when its simulator is built
    cfg = dataclasses.replace(cfg, batcher_kwargs={field: item.split("=")[1]})
    with pytest.raises(ValueError, match=re.escape(f"config.batcher.kwargs.{field}=")):
        build_simulator(cfg)


def test_a_batcher_model_and_hardware_the_cluster_has_are_accepted():
    cfg = load_sim_config(f"{TINY}:dualpath,batcher.model=ds27b,batcher.hardware=h800")
    assert cfg.batcher_kwargs == {"model": "ds27b", "hardware": "h800"}
    assert build_simulator(cfg).batcher.cost_model.model.name == "ds27b"


# ---- 2. agents on a trace (or online) run --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["trace", "online"])
def test_an_agent_count_given_for_a_trace_or_online_run_is_refused_by_name(kind):
    """`--config.workload.n_agents=3 --config.workload.kind=trace` ran every agent of the trace (online:
    aps * duration_s agents)."""
    d = load_config(f"{TINY}:dualpath").to_dict()
    d["workload"].update(kind=kind, trace_path="x.jsonl", n_agents=3)
    with pytest.raises(ValueError, match=re.escape("config.workload.n_agents applies to offline workloads only")):
        sim_config_from_dict(d, explicit={"workload.n_agents": 3})
    assert sim_config_from_dict(d).workload.kind == kind  # the config files set it: only a given one is refused
    d["workload"]["kind"] = "offline"
    assert sim_config_from_dict(d, explicit={"workload.n_agents": 3}).workload.n_agents == 3


def test_an_agents_item_on_a_trace_run_is_refused_by_name():
    spec = f"{TINY}:dualpath,kind=trace,agents=3"
    with pytest.raises(ValueError, match=re.escape("config variant item 'agents=3' (config.workload.n_agents)")):
        load_sim_config(spec, {"workload.trace_path": "x.jsonl"}, as_run=True)
    assert load_sim_config(spec, {"workload.trace_path": "x.jsonl"}).workload.kind == "trace"  # as a base


def test_the_workload_stats_launcher_still_loads_a_trace_with_its_agent_count():
    """experiments.workload_stats passes its --n_agents (500) for traces too: a limit it never was, not refused."""
    from dualpath_jax.workloads import load_trace, load_workload

    path = os.path.join(REPO, "../shared/traces/kvcache_tester")
    if not os.path.isdir(path):
        pytest.skip("no kv-cache-tester traces here")
    assert len(load_workload(path, n_agents=500, limit=2)) == len(load_trace(path, limit=2))


# ---- 3. duration= / warmup= on an offline run ----------------------------------------------------------------------
@pytest.mark.parametrize("item, field", [("duration=5", "workload.duration_s"), ("warmup=3", "warmup_s")])
def test_an_online_variant_item_on_an_offline_run_is_refused_by_name(item, field):
    """`configs/sim_tiny.py:dualpath,duration=5` ran offline as if the item were not there."""
    with pytest.raises(ValueError, match=re.escape(f"config variant item {item!r} (config.{field}) applies to")):
        load_sim_config(f"{TINY}:dualpath,{item}", as_run=True)
    assert load_sim_config(f"{TINY}:dualpath,aps=0.5,{item}", as_run=True).workload.kind == "online"
    # a base for capacity_search (which makes it online) takes them, as before
    assert load_sim_config(f"{TINY}:dualpath,{item}").workload.kind == "offline"


def test_a_warmup_item_on_a_trace_run_is_accepted():
    cfg = load_sim_config(f"{TINY}:dualpath,kind=trace,warmup=3", {"workload.trace_path": "x.jsonl"}, as_run=True)
    assert cfg.warmup_s == 3.0


def test_variant_fields_names_the_items_that_set_kind_fields():
    spec = "configs/x.py:dualpath,agents=4, duration=60,warmup=5,aps=0.2,dataset=48K,policy.duration=1"
    assert variant_fields(spec) == {
        "workload.n_agents": "agents=4",
        "workload.duration_s": "duration=60",
        "warmup_s": "warmup=5",
        "workload.dataset": "dataset=48K",  # (a kind field since 2026-12-06: refused beside kind=trace)
    }
    assert variant_fields("configs/x.py") == {}


def test_simulate_and_sweep_refuse_an_online_item_on_an_offline_run(tmp_path):
    out = _launch(
        "-m", "experiments.simulate", "--config=configs/sim_tiny.py:dualpath,duration=5", "--noplot",
        "--noprogress", f"--output_dir={tmp_path / 'sim'}",
    )  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "bad config: config variant item 'duration=5' (config.workload.duration_s) applies to" in out.stderr
    assert not (tmp_path / "sim" / "turns.csv").exists()
    out = _launch(
        "-m", "experiments.sweep", "--setups=configs/sim_tiny.py", "--modes=dualpath", "--loads=agents=2",
        "--extra=turns=2,warmup=60", "--noplot", f"--output_dir={tmp_path / 'sweep'}",
    )  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "bad sweep cell" in out.stderr and "config variant item 'warmup=60' (config.warmup_s)" in out.stderr
    assert not (tmp_path / "sweep" / "sweep.csv").exists()


# ---- 4. SIGTERM keeps the finished cells ---------------------------------------------------------------------------
# sim_tiny, except that SIGTERM comes during the `basic` cell's run (its second load: the first is the sweep's check)
_TERMINATED_SETUP = """
import os
import signal
from configs.sim_tiny import get_config as _tiny

def get_config(arg=None):
    cfg = _tiny(arg)
    if cfg.mode == "basic":
        os.environ["BASIC_LOADS"] = str(int(os.environ.get("BASIC_LOADS", "0")) + 1)
        if os.environ["BASIC_LOADS"] != "1":
            os.kill(os.getpid(), signal.SIGTERM)
    return cfg
"""

# reproduce_paper with its simulations replaced by fixed JCTs; SIGTERM during the TERM_AT mode's run
_FAKE_REPRODUCE = """
import os
import signal
from absl import app
import experiments.reproduce_paper as rp

JCT = {"basic": 200.0, "layerwise": 160.0, "dualpath_rr": 120.0, "dualpath": 100.0, "oracle": 90.0}

def fake(spec):
    mode = spec.split(":")[1].split(",")[0]
    if mode == os.environ.get("TERM_AT"):
        os.kill(os.getpid(), signal.SIGTERM)
    return {"spec": spec, "jct_s": JCT[mode], "snic_max_over_avg": 1.2, "unfinished": 0, "wall_s": 0.0}

rp._offline = fake
app.run(rp.main)
"""


def test_sigterm_keeps_the_finished_cells_of_a_sweep(tmp_path):
    """SIGTERM of a sweep ended it at once (SIGTERM's default): no sweep.csv, every finished cell lost. Now it stops
    as Ctrl-C does: the finished cells are written, the others are rows saying so, and the exit code is 1."""
    setup = tmp_path / "terminated.py"
    setup.write_text(_TERMINATED_SETUP)
    out = _launch(
        "-m", "experiments.sweep", f"--setups={setup}", "--modes=dualpath,basic,oracle", "--loads=agents=2",
        "--extra=turns=2", "--workers=1", "--noplot", f"--output_dir={tmp_path / 'out'}",
    )  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr, (out.returncode, out.stderr[-2000:])
    assert "sweep: stopped by SIGTERM; the 1 finished cells of 3 are in" in out.stderr
    assert "terminated.py:basic,agents=2,turns=2: interrupted (SIGTERM) before this finished" in out.stderr
    rows = list(csv.DictReader(open(tmp_path / "out" / "sweep.csv")))
    assert [r["mode"] for r in rows] == ["dualpath", "basic", "oracle"] and float(rows[0]["jct_s"]) > 0
    assert [r["error"] for r in rows][1:] == ["interrupted (SIGTERM) before this finished"] * 2
    assert len(json.loads((tmp_path / "out" / "sweep.json").read_text())) == 3


def test_sigterm_keeps_the_finished_runs_of_reproduce_paper(tmp_path):
    script = tmp_path / "fake_reproduce.py"
    script.write_text(_FAKE_REPRODUCE)
    out = _launch(str(script), f"--output_dir={tmp_path}", "--noplot", env={"TERM_AT": "oracle"})
    assert out.returncode == 1 and "Traceback" not in out.stderr, (out.returncode, out.stderr[-2000:])
    assert "reproduce_paper: stopped by SIGTERM; 1 of 5 runs failed" in out.stderr
    assert "oracle,dataset=64K,agents=2048,seed=0: interrupted (SIGTERM) before this finished" in out.stderr
    assert len(json.loads((tmp_path / "report.json").read_text())) == 4 and not (tmp_path / "report.md").exists()


def test_ctrl_c_while_reproduce_paper_writes_its_report_is_noted_and_the_report_kept(tmp_path):
    """After the last run, Ctrl-C was still KeyboardInterrupt (only SIGTERM was held): one while report.json /
    report.md were written was a traceback, half a report, and (after a failed run) "stopped ... before any run
    started" (session 42). Now it is noted, the report is whole, and the last line says it came after the runs."""
    script = tmp_path / "fake_reproduce.py"
    report_hook = (
        "_report = rp._report\n"
        "def noisy(*a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    return _report(*a, **k)\n"
        "rp._report = noisy\n"
    )
    script.write_text(_FAKE_REPRODUCE.replace("rp._offline = fake\n", "rp._offline = fake\n" + report_hook))
    out = _launch(str(script), f"--output_dir={tmp_path}", "--noplot")
    assert out.returncode == 1 and "Traceback" not in out.stderr, (out.returncode, out.stderr[-2000:])
    assert out.stderr.splitlines()[-1] == (
        "reproduce_paper: stopped by Ctrl-C after every run finished (the report is written)"
    )
    assert (tmp_path / "report.md").exists() and len(json.loads((tmp_path / "report.json").read_text())) == 5
