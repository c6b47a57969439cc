"""The launchers' defects found by the 2026-12-03 hunt over experiments/ and configs/ (each test failed before its
fix):

- sweep: a worker process that died (killed for memory) hung the sweep forever, and a cell whose run raised lost
  every other cell's results (a traceback, no sweep.csv);
- reproduce_paper: a run that raised lost every finished run's raw results (a traceback, no report.json);
  `--table=512,0512` ran the row once but printed it twice and counted its cells twice in the fit;
- a variant string that sets one key twice ran the last value silently: a sweep's `--loads=agents=2,agents=4`
  with `--extra=agents=3` ran agents=3 in every row, labelled agents=2 and agents=4;
- run: results.json held NaN (TPOT of 1-token turns), which strict JSON readers refuse.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A setup file: sim_tiny, except that the `basic` cell's run fails as given by `{how}` (its second load: the
# sweep loads each cell once to check it, then again to run it, in this process or a worker that inherits the count)
_FAILING_SETUP = """
import os, signal
from configs.sim_tiny import get_config as _tiny

def get_config(arg=None):
    cfg = _tiny(arg)
    if cfg.mode == "basic":
        os.environ["BASIC_LOADS"] = str(int(os.environ.get("BASIC_LOADS", "0")) + 1)
        if os.environ["BASIC_LOADS"] != "1":
            {how}
    return cfg
"""


def _launch(*cmd: str, timeout: float = 120, env: dict | None = None):
    return subprocess.run(
        [sys.executable, *cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO, **(env or {})},
    )


def _strict_json(path):
    def refuse(token):
        raise ValueError(f"{path} holds {token}, which is not JSON")

    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def _sweep_with_a_failing_cell(tmp_path, how: str, workers: int):
    setup = tmp_path / "failing.py"
    setup.write_text(_FAILING_SETUP.format(how=how))
    out_dir = tmp_path / "out"
    out = _launch(
        "-m", "experiments.sweep", f"--setups={setup}", "--modes=dualpath,basic,oracle", "--loads=agents=2",
        "--extra=turns=2", f"--workers={workers}", "--noplot", f"--output_dir={out_dir}",
    )  # fmt: skip
    return out, out_dir


def test_sweep_keeps_the_other_cells_when_one_raises(tmp_path):
    out, out_dir = _sweep_with_a_failing_cell(tmp_path, 'raise MemoryError("no room for this cell")', workers=1)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "sweep: 1 of 3 cells failed" in out.stderr and "failing.py:basic,agents=2,turns=2: " in out.stderr
    assert "MemoryError: no room for this cell" in out.stderr
    rows = list(csv.DictReader(open(out_dir / "sweep.csv")))
    assert [r["mode"] for r in rows] == ["dualpath", "basic", "oracle"]
    assert float(rows[0]["jct_s"]) > 0 and float(rows[2]["jct_s"]) > 0
    assert rows[1]["jct_s"] == "" and "no room for this cell" in rows[1]["error"]
    assert [r.get("error") for r in _strict_json(out_dir / "sweep.json")][::2] == [None, None]


def test_sweep_reports_a_killed_worker_instead_of_hanging(tmp_path):
    """A worker killed mid-run (the OOM killer on a paper-scale cell): multiprocessing.Pool waited for its cell
    forever. Which other cells finish before the pool notices depends on timing; the killed one never does."""
    try:
        out, out_dir = _sweep_with_a_failing_cell(tmp_path, "os.kill(os.getpid(), signal.SIGKILL)", workers=2)
    except subprocess.TimeoutExpired:
        pytest.fail("the sweep hung on its killed worker")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "failing.py:basic,agents=2,turns=2: a worker process died" in out.stderr
    rows = {r["mode"]: r for r in csv.DictReader(open(out_dir / "sweep.csv"))}
    assert set(rows) == {"dualpath", "basic", "oracle"} and "worker process died" in rows["basic"]["error"]


# reproduce_paper with its simulations replaced by fixed JCTs (seconds), so its report is checked in a second
_FAKE_REPRODUCE = """
import os, sys
from absl import app
import experiments.reproduce_paper as rp

JCT = {"basic": 200.0, "layerwise": 160.0, "dualpath_rr": 120.0, "dualpath": 100.0, "oracle": 90.0}

def fake(spec):
    mode = spec.split(":", 1)[1].split(",", 1)[0]
    if mode == os.environ.get("FAIL_MODE"):
        raise MemoryError(f"{mode} ran out")
    return {"spec": spec, "jct_s": JCT[mode], "snic_max_over_avg": 1.25, "unfinished": 0, "wall_s": 0.0}

rp._offline = fake
app.run(rp.main)
"""


def _fake_reproduce(tmp_path, *args, fail_mode=""):
    script = tmp_path / "fake_reproduce.py"
    script.write_text(_FAKE_REPRODUCE)
    return _launch(str(script), f"--output_dir={tmp_path}", "--noplot", *args, env={"FAIL_MODE": fail_mode})


def test_reproduce_paper_keeps_the_finished_runs_when_one_fails(tmp_path):
    out = _fake_reproduce(tmp_path, fail_mode="oracle")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "reproduce_paper: 1 of 5 runs failed, so no report (the 4 finished runs are in" in out.stderr
    assert ":oracle,dataset=64K,agents=2048,seed=0: MemoryError: oracle ran out" in out.stderr
    kept = _strict_json(tmp_path / "report.json")
    assert sorted(v["spec"].split(":")[1].split(",")[0] for v in kept.values()) == [
        "basic", "dualpath", "dualpath_rr", "layerwise",
    ]  # fmt: skip
    assert not (tmp_path / "report.md").exists()


def test_reproduce_paper_report_ratios_and_a_table_row_given_twice(tmp_path):
    """The headline rows are computed against PAPER.md's figures; --table=512,0512 is one row of the table (it was
    printed twice and its 9 cells counted as 18 in the fit), --appends=2,2.0 one append row (it was two)."""
    out = _fake_reproduce(tmp_path, "--table=512,0512", "--appends=2,2.0")
    assert out.returncode == 0, out.stderr[-2000:]
    report = (tmp_path / "report.md").read_text()
    for row in [
        "| offline speedup Basic -> DualPath | 1.87x | 2x | 1.070 |",  # 200 / 100 vs PAPER.md's 1.87x
        "| ablation: + layerwise (JCT %) | -17.21 | -20 | 1.162 |",
        "| ablation: + dual path, round-robin (JCT %) | -38.19 | -40 | 1.047 |",
        "| ablation: + scheduler (JCT %) | -45.62 | -50 | 1.096 |",
        "| storage-NIC max/avg, round-robin | 1.53 | 1.25 | 0.817 |",
        "| storage-NIC max/avg, scheduler | 1.18 | 1.25 | 1.059 |",
        "| 512 | 64K | 1875 / 90 (0.05) | 1979 / 100 (0.05) | 2813 / 200 (0.07) |",
    ]:
        assert row in report, row
    assert report.count("| 32K |") == 1 and "(9 cells)" in report
    assert report.count("| x2 | 200 | 100 | 2.00x | no |") == 1  # 2.00x: outside the paper's 1.82-1.99x


def test_a_variant_key_given_twice_is_an_error(tmp_path):
    from configs.sim_base import apply_variant, base_config
    from dualpath_jax.sim import load_sim_config

    with pytest.raises(ValueError, match=r"two values for agents, '2' and '3'; give one"):
        load_sim_config("configs/sim_tiny.py:dualpath,agents=2,turns=2,agents=3")
    with pytest.raises(ValueError, match=r"two values for policy.full_de"):
        apply_variant(base_config(), "policy.full_de=wait,policy.full_de=skip")
    assert load_sim_config("configs/sim_tiny.py:agents=2,agents=2").workload.n_agents == 2  # the same value: fine
    out = _launch(
        "-m", "experiments.sweep", "--setups=configs/sim_tiny.py", "--modes=dualpath", "--loads=agents=2,agents=4",
        "--extra=turns=2,agents=3", "--noplot", f"--output_dir={tmp_path}",
    )  # fmt: skip
    assert out.returncode != 0 and "two values for agents, '2' and '3'" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "sweep.csv").exists()


def test_run_results_json_is_strict_json_with_one_token_turns(tmp_path):
    """Turns of one generated token have no TPOT (NaN): results.json wrote it as NaN."""
    out = _launch(
        "-m", "experiments.run", "--config=configs/tiny_runtime.py:test", f"--config.results_dir={tmp_path}",
        "--config.runtime.workload.gen_tokens=1", "--config.runtime.workload.agents=2",
        "--config.runtime.workload.turns=2", "--config.policies=dualpath", timeout=170,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    (run_dir,) = tmp_path.iterdir()
    summary = _strict_json(run_dir / "results.json")["results"]["dualpath"]
    assert summary["tpot_p50_s"] is None and summary["ttft_p50_s"] > 0


def test_sweep_tells_apart_two_setups_of_one_file_name(tmp_path):
    """Setups a/x.py and b/x.py were both rows of "x.py" (one setup in sweep.csv and one line in sweep.png)."""
    other = tmp_path / "slow"
    other.mkdir()
    (other / "sim_tiny.py").write_text(
        "from configs.sim_tiny import get_config as _tiny\n\n\n"
        "def get_config(arg=None):\n    cfg = _tiny(arg)\n    cfg.cluster.snic_gbps = 0.05\n    return cfg\n"
    )
    out = _launch(
        "-m", "experiments.sweep", f"--setups=configs/sim_tiny.py,{other / 'sim_tiny.py'}", "--modes=dualpath",
        "--loads=agents=2", "--extra=turns=4", "--noplot", f"--output_dir={tmp_path / 'out'}",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "out" / "sweep.csv")))
    assert [r["setup"] for r in rows] == ["configs/sim_tiny.py", str(other / "sim_tiny.py")]
    assert float(rows[1]["jct_s"]) > float(rows[0]["jct_s"])  # the slow storage NIC's setup
    (row,) = json.load(open(tmp_path / "out" / "sweep.json"))[:1]
    assert list(row)[:3] == ["setup", "mode", "load"]


@pytest.mark.parametrize(
    "argv, says",
    [
        # an infinite target per layer ran the overlap section forever; inf seconds / quantum: an OverflowError
        (["experiments.bench_io", "--sections=overlap", "--layers=1", "--layer_ms=inf"], "--layer_ms must be > 0 and"),
        (["experiments.bench_io", "--sections=shaped", "--shaped_quantum_ms=inf"], "--shaped_quantum_ms must be > 0"),
        (["experiments.bench_io", "--sections=shaped", "--shaped_seconds=inf"], "--shaped_seconds must be > 0 and"),
        # an empty list printed an empty table; an unknown model was a KeyError after the others had run
        (["experiments.bench_invariant", "--models="], "--models takes one or more of tiny_qwen2"),
        (["experiments.bench_invariant", "--models=tiny_qwen2,bogus", "--repeats=1", "--prompt=64"], "--models takes"),
        # a stray argument was ignored (every other launcher refuses it)
        (["experiments.bench_invariant", "stray", "--models=tiny_qwen2", "--repeats=1", "--prompt=64"], "unknown argu"),
    ],
)
def test_benchmark_flags_refuse_bad_values_before_running(argv, says):
    try:
        out = _launch("-m", *argv, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{argv} still ran after 60 s")
    assert out.returncode != 0 and says in out.stderr and "Traceback" not in out.stderr, out.stderr[-1500:]
