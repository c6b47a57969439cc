"""The launchers' defects found by the second 2026-12-03 hunt over experiments/run.py and the benchmarks (each
test failed before its fix):

- bench_runtime: bench_runtime.json held NaN (TPOT of 1-token turns), which strict JSON readers refuse;
- workload_stats: the paper's 64-token-block hit rate (~98.7%) was printed beside any --block_size's hit rate;
- run: a policy whose run failed (or Ctrl-C during it) lost the finished policies' table and results.json;
  bench_runtime: a failed dualpath run lost the measured basic run (a traceback, no bench_runtime.json).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# bench_runtime's main with the runtime replaced by fixed results (no model, no runs): what it writes is checked
_STUB_BENCH_RUNTIME = """
import math, sys, types
from absl import app
from dualpath_jax.runtime import driver
from experiments import bench_runtime, parse_flags_or_exit

def run(cfg, ts, **kw):
    s = {"jct_s": 2.0 if cfg.scheduler.name == "basic" else 1.0, "pe_read_bytes": 1, "de_read_bytes": 0,
         "snic_max_over_avg": 1.5, "tpot_p50_s": math.nan, "tpot_p99_s": math.nan}
    return types.SimpleNamespace(summary=s, tokens={})

driver.prepare = lambda cfg, *a, **k: ([types.SimpleNamespace(turns=[0])] * 8, None)
driver.measure_prefill_tokens_per_s = lambda ops, cfg, *a, **k: 1000.0
driver.run = run
bench_runtime._plot = lambda out, path: None
sys.argv = [sys.argv[0], "--config=configs/tiny_runtime.py:test", "--skip_sim", "--skip_overhead",
            "--config.results_dir=" + sys.argv[1]]
app.run(bench_runtime.main, flags_parser=parse_flags_or_exit)
"""


def test_bench_runtime_json_is_strict_json_with_nan_figures(tmp_path):
    """A 1-token turn has no TPOT (NaN): bench_runtime.json writes it as null, as run's results.json does."""
    out = subprocess.run(
        [sys.executable, "-c", _STUB_BENCH_RUNTIME, str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "speedup basic -> dualpath: 2.00x" in out.stdout
    (run_dir,) = list(tmp_path.glob("bench_runtime-*"))
    text = (run_dir / "bench_runtime.json").read_text()

    def refuse(c):
        raise ValueError(f"not JSON: {c}")

    res = json.loads(text, parse_constant=refuse)
    assert res["measured"]["basic"]["tpot_p50_s"] is None and res["measured_speedup"] == 2.0


def test_workload_stats_prints_the_paper_hit_rate_only_for_its_block_size():
    """PAPER.md's ~98.7% hit rate is of 64-token blocks: beside another block size's hit rate it compared unlike
    things (`--block_size=16` printed `hit rate (block 16) ... ~98.7%`)."""

    def stats(block_size):
        out = subprocess.run(
            [sys.executable, "-m", "experiments.workload_stats", "--workload=64K", "--n_agents=3",
             f"--block_size={block_size}"],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        (line,) = [x for x in out.stdout.splitlines() if x.startswith("hit rate")]
        return line

    assert stats(64).endswith("~98.7%")
    assert not stats(16).endswith("~98.7%")


# run's main with the runtime replaced: `basic` finishes with fixed figures, `dualpath` fails as a run does
_STUB_RUN = """
import sys, types
from absl import app
from dualpath_jax.runtime import driver
from dualpath_jax.runtime.scheduler_service import RunFailed
from experiments import parse_flags_or_exit, run

def fake_run(cfg, ts, **kw):
    if cfg.scheduler.name != "basic":
        raise RunFailed("no live decode engine left")
    s = {"turns": 2, "jct_s": 2.0, "gen_tokens_per_s": 6.0, "prompt_tokens_per_s": 60.0, "ttft_p50_s": 0.1,
         "ttft_p99_s": 0.2, "tpot_p50_s": 0.01, "tpot_p99_s": 0.02, "pe_read_bytes": 3e6, "de_read_bytes": 0,
         "snic_max_over_avg": 3.0}
    return types.SimpleNamespace(summary=s, records=[], links=[], requeued=0, schedule_time_s=0.0, node_stats={},
                                 startup_s=0.0, tokens={})

driver.prepare = lambda cfg, *a, **k: ([types.SimpleNamespace(turns=[0, 1])], None)
driver.run = fake_run
sys.argv = [sys.argv[0], "--config=configs/tiny_runtime.py:test", "--config.results_dir=" + sys.argv[1]]
app.run(run.main, flags_parser=parse_flags_or_exit)
"""


def test_run_keeps_the_finished_policy_results_when_another_fails(tmp_path):
    """basic finished, dualpath's run failed: basic's table and results.json are written (they were lost: only
    `run failed: ...`), the failure is named there, and the job still exits non-zero."""
    out = subprocess.run(
        [sys.executable, "-c", _STUB_RUN, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 1, out.stderr[-2000:]
    assert "run failed: no live decode engine left (results of basic only, not of dualpath)" in out.stderr
    (run_dir,) = list(tmp_path.iterdir())
    res = json.loads((run_dir / "results.json").read_text())
    assert list(res["results"]) == ["basic"] and res["results"]["basic"]["jct_s"] == 2.0
    assert res["failed"].startswith("run failed: no live decode engine left")
    table = (run_dir / "table.txt").read_text()
    assert table.splitlines()[2].split()[:2] == ["basic", "2.00"] and "not of dualpath" in table
    assert (run_dir / "turns_basic.json").exists() and not (run_dir / "turns_dualpath.json").exists()


def test_bench_runtime_keeps_the_measured_basic_run_when_dualpath_fails(tmp_path):
    """bench_runtime: basic measured, then dualpath's run failed: bench_runtime.json keeps basic's figures and
    names the failure (it was a RunFailed traceback and no file), and the job exits non-zero."""
    stub = _STUB_BENCH_RUNTIME.replace(
        "def run(cfg, ts, **kw):\n",
        "def run(cfg, ts, **kw):\n"
        "    if cfg.scheduler.name == 'dualpath':\n"
        "        from dualpath_jax.runtime.scheduler_service import RunFailed\n"
        "        raise RunFailed('no live decode engine left')\n",
    )
    out = subprocess.run(
        [sys.executable, "-c", stub, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 1 and "run failed: no live decode engine left" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    (run_dir,) = list(tmp_path.glob("bench_runtime-*"))
    res = json.loads((run_dir / "bench_runtime.json").read_text())
    assert list(res["measured"]) == ["basic"] and res["measured"]["basic"]["jct_s"] == 2.0
    assert res["failed"] == "run failed: no live decode engine left"
