"""Defects found by the fourth 2026-12-03 hunt over the launchers, workloads, schedulers and metrics (each test
failed before its fix):

- a sweep cell whose setup calls `sys.exit` (at run time: a researcher's policy giving up) ended the whole sweep
  with no results; a `sys.exit(0)` in a setup's get_config ended it "successfully" with nothing run;
- `limit=0` gave [] for kv-cache-tester sessions but "no request in the trace" for Mooncake; a fractional limit
  cut Mooncake at its floor and was a TypeError for session files;
- `fit_report` gave NaN errors for a NaN shape (and dropped NaN / negative bsz); fractional token counts and batch
  sizes were taken by `Turn`, `PendingRequest`, `PrefillWork` (compute_quota formed an empty batch: the PE never
  progressed) and `CostModel.fit`;
- `make_agents(prefix_max_tokens=2.5)` drew prefixes silently, a float count or seed was a numpy TypeError naming
  no argument; `workloads.summarize(block_size=64.5)` counted half tokens as hits;
- `load_mooncake(block_size=512.5)` blamed every line of a good trace; `metrics.json_safe` let a numpy float32 /
  float16 NaN or inf through (written as NaN / Infinity, not JSON);
- `bench_invariant` wrote no file and lost every finished model's rows when a later model failed.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from dualpath_jax.workloads import generate_trajectories, load_kvcache_tester, load_mooncake, load_trace, make_agents
from dualpath_jax.workloads.stats import summarize
from dualpath_jax.workloads.types import Turn
from experiments import run_jobs
from schedulers.api import PendingRequest, PrefillWork
from schedulers.calibrate import default_grid, fit_report
from schedulers.cost_model import CostModel, DecodeMeasurement, PrefillMeasurement
from schedulers.registry import make_batcher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "configs/sim_tiny.py"


def _launch(*cmd: str, timeout: float = 120):
    return subprocess.run(
        [sys.executable, *cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
    )


# ------------------------------------------------------------------------------------------- sys.exit in a cell
def _exits_on_one(x):
    if x == 1:
        sys.exit("the setup gave up")
    return x * 10


def test_run_jobs_keeps_the_other_jobs_when_one_calls_sys_exit():
    """SystemExit is no Exception: it went through run_jobs and the sweep lost every finished cell."""
    out = run_jobs(_exits_on_one, [0, 1, 2], 1, "test")
    assert out == [(0, None), (None, "SystemExit: sys.exit('the setup gave up') called"), (20, None)]


# A setup whose policy "quits" calls sys.exit(0) when it schedules (at run time, after the sweep's checks)
_QUITTER = """
import sys
from configs.sim_tiny import get_config as _tiny
from schedulers import POLICIES
from schedulers.policies import BasicPolicy


def get_config(arg=None):
    if "quits" not in POLICIES:
        @POLICIES.register("quits")
        class Quits(BasicPolicy):
            name = "quits"

            def schedule(self, snapshot, queue, fetching_node=None):
                sys.exit(0)
    if EXIT_AT_CONFIG:
        sys.exit(0)
    return _tiny(arg)
"""


def test_sweep_cell_that_calls_sys_exit_fails_alone(tmp_path):
    setup = tmp_path / "quitter.py"
    setup.write_text("EXIT_AT_CONFIG = False\n" + _QUITTER)
    out_dir = tmp_path / "out"
    out = _launch("-m", "experiments.sweep", f"--setups={setup}", "--modes=dualpath,quits", "--loads=agents=2",
                  "--extra=turns=2", "--workers=1", "--noplot", f"--output_dir={out_dir}")  # fmt: skip
    assert out.returncode == 1, out.stderr[-2000:]
    assert "sweep: 1 of 2 cells failed" in out.stderr and "SystemExit: sys.exit(0) called" in out.stderr
    rows = list(csv.DictReader(open(out_dir / "sweep.csv")))
    assert [r["mode"] for r in rows] == ["dualpath", "quits"]
    assert float(rows[0]["jct_s"]) > 0 and not rows[0]["error"]
    assert rows[1]["error"] == "SystemExit: sys.exit(0) called" and not rows[1]["jct_s"]


def test_sweep_setup_whose_get_config_calls_sys_exit_0_is_a_bad_cell(tmp_path):
    """sys.exit(0) in get_config (at the sweep's check of every cell) ended the sweep with exit code 0, nothing run
    and nothing written."""
    setup = tmp_path / "quitter.py"
    setup.write_text("EXIT_AT_CONFIG = True\n" + _QUITTER)
    out = _launch("-m", "experiments.sweep", f"--setups={setup}", "--modes=dualpath", "--loads=agents=2",
                  "--workers=1", "--noplot", f"--output_dir={tmp_path / 'out'}")  # fmt: skip
    assert out.returncode == 1, out.stderr[-2000:]
    assert f"bad sweep cell '{setup}:dualpath,agents=2': SystemExit: sys.exit(0) called" in out.stderr
    assert "Traceback" not in out.stderr


# ------------------------------------------------------------------------------------------------ trace limits
def _traces(tmp_path):
    moon = tmp_path / "m.jsonl"
    moon.write_text(json.dumps({"timestamp": 0, "input_length": 600, "output_length": 3, "hash_ids": [1, 2]}) + "\n")
    sessions = tmp_path / "s"
    sessions.mkdir()
    req = {"t": 0.0, "type": "n", "in": 130, "out": 5, "hash_ids": [1, 2], "think_time": 0.0}
    (sessions / "trace_1.json").write_text(json.dumps({"id": "s1", "block_size": 64, "requests": [req]}))
    return moon, sessions


def test_trace_limit_zero_is_refused_alike_for_both_formats(tmp_path):
    """limit=0: [] from kv-cache-tester sessions, "no request in the trace" (a format error) from Mooncake."""
    moon, sessions = _traces(tmp_path)
    for load in (
        lambda: load_trace(moon, limit=0),
        lambda: load_trace(sessions, limit=0),
        lambda: load_kvcache_tester(sessions, limit=0),
    ):
        with pytest.raises(ValueError, match="limit=0 loads nothing: give an int >= 1, or None for the whole trace"):
            load()
    with pytest.raises(ValueError, match="max_requests=0 loads nothing"):
        load_mooncake(moon, max_requests=0)
    assert len(load_trace(moon, limit=1)) == len(load_trace(sessions, limit=1)) == 1


def test_trace_limit_must_be_an_int(tmp_path):
    """limit=1.5 read the first line of a Mooncake trace (lineno > 1.5) and was a slice TypeError for sessions."""
    moon, sessions = _traces(tmp_path)
    for load in (lambda: load_trace(moon, limit=1.5), lambda: load_trace(sessions, limit=1.5)):
        with pytest.raises(ValueError, match=r"limit must be an int >= 1 \(or None for all\), got 1.5 \(float\)"):
            load()


# ------------------------------------------------------------------------------------- fractions and NaN shapes
def test_fit_report_refuses_nan_negative_and_fractional_shapes():
    """A NaN cached made both errors NaN; a NaN, negative or fractional bsz was predicted as no forward (error 1.0)
    or as half a token."""
    cm = CostModel("ds27b", "h800")
    assert fit_report(cm, [PrefillMeasurement(((128, 64),), 0.01)]).n == 1
    for items in (((math.nan, 10),), ((0, math.nan),), ((-5, 10),), ((0, -10),), ((0, 10.5),), ((0.5, 10),)):
        with pytest.raises(ValueError, match="fit_report needs items with cached >= 0 and bsz >= 0"):
            fit_report(cm, [PrefillMeasurement(items, 0.1)])


def test_fit_refuses_fractional_measurements():
    """Half a token or half a sequence was fitted like any shape (measurements come from timing real steps)."""
    cm = CostModel("ds27b", "h800")
    fit_grid, _ = default_grid(4096)
    good = [PrefillMeasurement(items, 0.01 * (i + 1)) for i, items in enumerate(fit_grid)]
    assert cm.fit(good)[0] is not None
    with pytest.raises(ValueError, match="bad prefill measurement"):
        cm.fit([*good, PrefillMeasurement(((0, 10.5),), 0.1)])
    dec = [DecodeMeasurement(b, c, 0.001 * b + 1e-7 * c) for b in (1, 4, 16) for c in (1000, 8000, 64000)]
    assert cm.fit(dec)[1] is not None
    with pytest.raises(ValueError, match="bad decode measurement"):
        cm.fit([*dec, DecodeMeasurement(2.5, 1000, 0.1)])


def test_fractional_token_counts_are_refused():
    with pytest.raises(ValueError, match="turn lengths must be whole numbers"):
        Turn(2.5, 1)
    with pytest.raises(ValueError, match="context_tokens must be a whole number"):
        Turn(2, 1, context_tokens=64.5)
    with pytest.raises(ValueError, match="request 1: token counts must be whole numbers"):
        PendingRequest(1, 1, 0, 100.5, 64, 3)
    Turn(2.0, 1), PendingRequest(1, 1, 0, 100.0, 64, 3)  # whole floats are still taken


@pytest.mark.parametrize("batcher", ["fifo", "compute_quota"])
def test_fractional_prefill_work_is_refused(batcher):
    """compute_quota formed an empty batch for 0.5 remaining tokens (the PE never progressed); fifo a 0.5-token one."""
    b = make_batcher(batcher)
    with pytest.raises(ValueError, match="prefill work 1: token counts must be whole numbers"):
        b.form_batch([PrefillWork(1, 0, 0.5)])
    with pytest.raises(ValueError, match="prefill work 2: token counts must be whole numbers"):
        b.form_batch([PrefillWork(2, 10.5, 100)])
    with pytest.raises(ValueError, match="negative, NaN or infinite"):  # the batchers' own check, as before
        b.form_batch([PrefillWork(3, 0, math.nan)])


# ------------------------------------------------------------------------------------------ bench_invariant --out
# bench_invariant with its models replaced by no-op cases (no jax); the model "tiny_llama" fails
_FAKE_INVARIANT = """
import dataclasses, sys, types
reg = types.ModuleType("models.registry")
reg.TINY_CONFIGS = {"tiny_qwen2": None, "tiny_llama": None}
runner = types.ModuleType("models.runner")

class ModelRunner:
    def __init__(self, cfg, seed=0):
        self.cfg = cfg

runner.ModelRunner = ModelRunner
sys.modules["models.registry"], sys.modules["models.runner"] = reg, runner
from absl import app
import experiments.bench_invariant as bi

@dataclasses.dataclass
class Cfg:
    batch_invariant: bool = False

def config(name):
    if name == "tiny_llama":
        raise MemoryError("out of memory")
    return Cfg()

bi._config = config
bi._cases = lambda r, *a: {"case a": lambda: None}
bi._chunked_equals_whole = lambda r, rng: r.cfg.batch_invariant
app.run(bi.main)
"""


def test_bench_invariant_writes_out_and_keeps_the_finished_models(tmp_path):
    script = tmp_path / "fake_invariant.py"
    script.write_text(_FAKE_INVARIANT)
    out = tmp_path / "inv.json"
    r = _launch(str(script), "--models=tiny_qwen2", "--repeats=1", f"--out={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [x["case"] for x in rows] == ["case a", "chunked KV == whole KV"]
    assert rows[0]["model"] == "tiny_qwen2" and rows[0]["ratio"] > 0
    assert rows[1]["default"] is False and rows[1]["invariant"] is True
    assert "| tiny_qwen2 | case a |" in r.stdout
    r = _launch(str(script), "--models=tiny_qwen2,tiny_llama", "--repeats=1", f"--out={out}")
    assert r.returncode != 0 and "MemoryError: out of memory" in r.stderr
    assert [x["model"] for x in json.loads(out.read_text())] == ["tiny_qwen2", "tiny_qwen2"]
    assert "| tiny_qwen2 | case a |" in r.stdout


# ------------------------------------------------------------------------------------ synthetic counts, block size
def test_synthetic_counts_and_seeds_must_be_ints():
    """prefix_max_tokens=2.5 drew prefixes silently; a float count or seed was a numpy TypeError naming nothing."""
    for kw, match in (
        ({"prefix_max_tokens": 2.5}, r"prefix_max_tokens must be an int, got 2.5 \(float\)"),
        ({"n_agents": 3.0}, r"n_agents must be an int, got 3.0 \(float\)"),
        ({"seed": 1.5}, r"seed must be an int, got 1.5 \(float\)"),
        ({"base_trajectories": 2.5}, r"base_trajectories must be an int, got 2.5 \(float\)"),
    ):
        with pytest.raises(ValueError, match=match):
            make_agents("32K", **{"n_agents": 2, **kw})
    with pytest.raises(ValueError, match=r"n must be an int, got 2.5 \(float\)"):
        generate_trajectories("32K", 2.5)
    assert len(make_agents("32K", np.int64(2), seed=np.int64(1))) == 2  # numpy ints are ints


def test_workload_stats_block_size_must_be_an_int():
    """block_size=64.5 counted half tokens as hits (a hit rate of fractional blocks), True 1-token blocks."""
    agents = make_agents("32K", 4)
    assert 0 < summarize(agents, block_size=64).hit_rate < 1
    for bs in (64.5, True):
        with pytest.raises(ValueError, match=rf"block_size must be an int >= 1, got {bs!r}"):
            summarize(agents, block_size=bs)


def test_mooncake_block_size_must_be_an_int(tmp_path):
    """block_size=512.5 refused every line of a good trace as a format error of the file ("expected ... = 2.0")."""
    moon, _ = _traces(tmp_path)
    assert len(load_mooncake(moon, block_size=512)) == 1
    for kw in ({"block_size": 512.5}, {"min_shared_blocks": 1.5}, {"block_size": True}):
        with pytest.raises(ValueError, match=r"min_shared_blocks and block_size must be >= 1 \(ints\)"):
            load_mooncake(moon, **kw)


def test_json_safe_nulls_numpy_float32_nan_and_inf():
    """json_safe took only Python floats: a float32 / float16 NaN or inf was written as NaN / Infinity (not JSON)."""
    from dualpath_jax.metrics import json_safe

    v = {"a": np.float32("nan"), "b": [np.float16("inf")], "c": np.float64("nan"), "d": np.float32(1.5), "e": 2}
    text = json.dumps(json_safe(v), default=float)
    assert json.loads(text) == {"a": None, "b": [None], "c": None, "d": 1.5, "e": 2}
    assert "NaN" not in text and "Infinity" not in text
