"""The launchers' defects found by the third 2026-12-03 hunt over experiments/ (each test failed before its fix):

- sweep / reproduce_paper: a second run (or a failed one, with its partial rows) into the same --output_dir
  replaced an earlier run's sweep.csv / sweep.json / report.md / report.json: now refused unless --overwrite;
  Ctrl-C lost every finished cell / run (a traceback, nothing written);
- a list flag item given twice (`bench_prefill --models=dense,dense`, `bench_store --layouts=X,X`, `bench_io
  --sections=tcp,tcp`, `sweep --modes=basic,basic`, ...) ran it twice: duplicate rows (a sweep plot averaged them
  as seeds); now a flag error naming the item;
- bench_io: `--tcp_batches` larger than `--tcp_small_count` timed no transfer and reported ~10^7 transfers/s (183x
  raw); a count not a multiple of the batch was counted whole; both size lists empty: a max() traceback;
  a shaped-link quantum under one byte: a traceback after the other sections;
- bad values that passed the flags and failed later with a traceback (demo --seed=-1, pd_bounds --M_GBps=1e300)
  or after hours of runs (reproduce_paper --online_duration_s=inf), or printed nonsense (bench_prefill
  --peak_tflops=nan); reproduce_paper --appends=1 printed no append table;
- bench_io / bench_store / bench_prefill: a section / layout / model that raised lost the finished ones' rows
  (no --out file); run / bench_runtime: an error other than RunFailed lost the finished policies' results.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "configs/sim_tiny.py"


def _launch(*cmd: str, timeout: float = 120, env: dict | None = None):
    return subprocess.run(
        [sys.executable, *cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO, **(env or {})},
    )


def test_sweep_keeps_an_earlier_sweeps_results(tmp_path):
    """A second sweep into the same --output_dir (the default results/sweep for every sweep) replaced the first
    one's sweep.csv / sweep.json; a failed one replaced them with its partial rows."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "sweep.csv").write_text("an earlier sweep's rows\n")
    args = ["-m", "experiments.sweep", f"--setups={TINY}", "--modes=dualpath", "--loads=agents=2",
            "--extra=turns=2", "--workers=1", "--noplot", f"--output_dir={out_dir}"]  # fmt: skip
    out = _launch(*args)
    assert out.returncode != 0, out.stderr[-2000:]
    assert f"bad --output_dir '{out_dir}': it holds an earlier run's results (sweep.csv)" in out.stderr
    assert "--overwrite" in out.stderr and "Traceback" not in out.stderr
    assert (out_dir / "sweep.csv").read_text() == "an earlier sweep's rows\n" and not (out_dir / "sweep.json").exists()
    out = _launch(*args, "--overwrite")
    assert out.returncode == 0, out.stderr[-2000:]
    (row,) = csv.DictReader(open(out_dir / "sweep.csv"))
    assert row["mode"] == "dualpath" and float(row["jct_s"]) > 0


# reproduce_paper with its simulations replaced by fixed JCTs (seconds)
_FAKE_REPRODUCE = """
import os
from absl import app
import experiments.reproduce_paper as rp

JCT = {"basic": 200.0, "layerwise": 160.0, "dualpath_rr": 120.0, "dualpath": 100.0, "oracle": 90.0}

def fake(spec):
    mode = spec.split(":")[1].split(",")[0]
    if mode == os.environ.get("CTRL_C_AT"):
        raise KeyboardInterrupt
    return {"spec": spec, "jct_s": JCT[mode], "snic_max_over_avg": 1.2, "unfinished": 0, "wall_s": 0.0}

rp._offline = fake
app.run(rp.main)
"""


def test_reproduce_paper_keeps_an_earlier_report(tmp_path):
    script = tmp_path / "fake_reproduce.py"
    script.write_text(_FAKE_REPRODUCE)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "report.json").write_text('{"earlier": 1}')
    out = _launch(str(script), f"--output_dir={out_dir}", "--noplot")
    assert out.returncode != 0 and "it holds an earlier run's results (report.json)" in out.stderr, out.stderr[-2000:]
    assert (out_dir / "report.json").read_text() == '{"earlier": 1}' and not (out_dir / "report.md").exists()
    out = _launch(str(script), f"--output_dir={out_dir}", "--noplot", "--overwrite")
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(json.loads((out_dir / "report.json").read_text())) == 5 and (out_dir / "report.md").exists()


# sim_tiny, except that Ctrl-C comes during the `basic` cell's run (its second load: the first is the sweep's check)
_INTERRUPTED_SETUP = """
import os
from configs.sim_tiny import get_config as _tiny

def get_config(arg=None):
    cfg = _tiny(arg)
    if cfg.mode == "basic":
        os.environ["BASIC_LOADS"] = str(int(os.environ.get("BASIC_LOADS", "0")) + 1)
        if os.environ["BASIC_LOADS"] != "1":
            raise KeyboardInterrupt
    return cfg
"""


def test_ctrl_c_keeps_the_finished_cells_of_a_sweep_and_runs_of_reproduce_paper(tmp_path):
    """Ctrl-C during a sweep (or reproduce_paper) was a traceback and no sweep.csv (report.json): every finished
    cell lost. Now the finished ones are written, the others are rows saying so, and the exit code is 1."""
    setup = tmp_path / "interrupted.py"
    setup.write_text(_INTERRUPTED_SETUP)
    out = _launch(
        "-m", "experiments.sweep", f"--setups={setup}", "--modes=dualpath,basic,oracle", "--loads=agents=2",
        "--extra=turns=2", "--workers=1", "--noplot", f"--output_dir={tmp_path / 'out'}",
    )  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "interrupted.py:basic,agents=2,turns=2: interrupted (Ctrl-C) before this finished" in out.stderr
    rows = list(csv.DictReader(open(tmp_path / "out" / "sweep.csv")))
    assert [r["mode"] for r in rows] == ["dualpath", "basic", "oracle"] and float(rows[0]["jct_s"]) > 0
    assert [r["error"] for r in rows][1:] == ["interrupted (Ctrl-C) before this finished"] * 2
    script = tmp_path / "fake_reproduce.py"
    script.write_text(_FAKE_REPRODUCE)
    out = _launch(str(script), f"--output_dir={tmp_path}", "--noplot", env={"CTRL_C_AT": "oracle"})
    assert out.returncode == 1 and "1 of 5 runs failed" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert len(json.loads((tmp_path / "report.json").read_text())) == 4


def test_reproduce_paper_appends_1_prints_the_x1_row(tmp_path):
    """--appends=1 (x1 is the headline run itself) printed no append table at all."""
    script = tmp_path / "fake_reproduce.py"
    script.write_text(_FAKE_REPRODUCE)
    out = _launch(str(script), f"--output_dir={tmp_path}", "--noplot", "--appends=1")
    assert out.returncode == 0, out.stderr[-2000:]
    report = (tmp_path / "report.md").read_text()
    assert report.count("| x1 | 200 | 100 | 2.00x | no |") == 1 and "| x2 |" not in report


@pytest.mark.parametrize(
    "argv, says",
    [
        (["experiments.bench_prefill", "--models=dense,dense"], "--models names 'dense' twice"),
        (["experiments.bench_store", "--layouts=deepseek_v3_fp8,deepseek_v3_fp8"], "--layouts names 'deepseek_v3_fp8"),
        (["experiments.bench_io", "--sections=overlap,overlap"], "--sections names 'overlap' twice"),
        (["experiments.bench_io", "--tcp_sizes=65536,065536"], "--tcp_sizes names '65536' twice ('065536')"),
        (["experiments.bench_invariant", "--models=tiny_qwen2,tiny_qwen2"], "--models names 'tiny_qwen2' twice"),
        (["experiments.sweep", "--modes=basic,dualpath,basic"], "--modes names 'basic' twice"),
        (["experiments.sweep", "--loads=agents=2,agents=2"], "--loads names 'agents=2' twice"),
        (["experiments.sweep", f"--setups={TINY},./{TINY}"], f"--setups names '{TINY}' twice ('./{TINY}')"),
        # a write_many batch of more transfers than are timed posted none (183x raw socket "transfers/s")
        (["experiments.bench_io", "--tcp_small_count=10", "--tcp_batches=16"], "--tcp_batches must each be <= --tcp_s"),
        # both empty: a ValueError traceback from max(); no rate: an empty table
        (["experiments.bench_io", "--tcp_sizes=", "--tcp_small_sizes="], "--tcp_sizes and --tcp_small_sizes are both"),
        (["experiments.bench_io", "--sections=shaped", "--shaped_rates_mb="], "--shaped_rates_mb needs at least one"),
        # a quantum under one byte: a traffic.Link ValueError traceback once the section started
        (
            ["experiments.bench_io", "--sections=shaped", "--shaped_rates_mb=1", "--shaped_quantum_ms=0.0001"],
            "--shaped_quantum_ms is under one byte",
        ),
        # finite GB/s, but inf bytes/s: a ValueError traceback
        (["experiments.pd_bounds", "--M_GBps=1e300"], "--M_GBps must be > 0 and finite"),
        # a negative seed: numpy's ValueError traceback once the model was built
        (["experiments.demo", "--seed=-1"], "--seed=-1: -1 is not a non-negative integer"),
        # inf: every capacity probe failed on the simulator's "must be finite", after all the offline runs
        (
            ["experiments.reproduce_paper", "--online", "--online_duration_s=inf"],
            "--online_duration_s must be > 0 and f",
        ),
        # nan passed the lower bound (MFU nan%), inf printed MFU 0.0%
        (["experiments.bench_prefill", "--peak_tflops=nan"], "--peak_tflops must be >= 0 and finite"),
    ],
)
def test_flags_refuse_an_item_given_twice_and_bad_values(argv, says):
    """Refused when the flags are parsed, before anything runs. (The stray argument makes the unfixed launchers
    stop at once instead of running the benchmark.)"""
    out = _launch("-m", *argv, "stray-argument")
    assert out.returncode != 0 and "Flags parsing error" in out.stderr and says in out.stderr, out.stderr[-1500:]


def test_bench_io_small_transfer_rows_count_the_transfers_a_batch_mode_moved(tmp_path):
    """20 transfers in batches of 16: one batch (16 transfers) is posted, and its rate is of 16, not 20."""
    path = tmp_path / "tcp.json"
    out = _launch(
        "-m", "experiments.bench_io", "--sections=tcp", "--tcp_sizes=", "--tcp_small_sizes=1024",
        "--tcp_small_count=20", "--tcp_batches=16", "--repeats=1", f"--out={path}",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {r["mode"]: r for r in json.loads(path.read_text())}
    assert {m: r["count"] for m, r in rows.items()} == {"raw socket": 20, "write": 20, "write_many x16": 16}
    r = rows["write_many x16"]
    assert r["GBps"] == pytest.approx(1024 * r["per_s"] / 1e9)
    assert r["ratio"] == pytest.approx(r["per_s"] / rows["raw socket"]["per_s"])  # a ratio of rates


_BENCH_IO_FAILING_SECTION = """
import sys
from absl import app
import experiments.bench_io as bi

def overlap():
    raise MemoryError("overlap ran out")

bi.SECTIONS["shaped"] = lambda: [{"section": "shaped", "ratio": 0.99}]
bi.SECTIONS["overlap"] = overlap
app.run(bi.main)
"""


def test_bench_io_keeps_the_finished_sections_rows_when_one_raises(tmp_path):
    path = tmp_path / "io.json"
    out = _launch("-c", _BENCH_IO_FAILING_SECTION, "--sections=shaped,overlap", f"--out={path}")
    assert out.returncode != 0 and "MemoryError: overlap ran out" in out.stderr, out.stderr[-2000:]
    assert json.loads(path.read_text()) == [{"section": "shaped", "ratio": 0.99}]
    assert "the rows of shaped only" in out.stderr


# bench_store run as `python -m`, with the second layout's store failing as a file where its directory goes would
# fail it (bench_store works in a fresh directory of its own inside --root since 2026-12-07: no such file can be
# placed there beforehand)
_BENCH_STORE_FAILING_LAYOUT = """
import runpy
import dualpath_jax.store as store

class Failing(store.LocalDirStore):
    def __init__(self, root, *args, **kwargs):
        if "qwen2.5_32b_fp16" in str(root):
            raise NotADirectoryError(20, "Not a directory", str(root))
        super().__init__(root, *args, **kwargs)

store.LocalDirStore = Failing  # (bench_store imports it from dualpath_jax.store as it runs below)
runpy.run_module("experiments.bench_store", run_name="__main__", alter_sys=True)
"""


def test_bench_store_keeps_the_finished_layouts_rows_when_one_fails(tmp_path):
    """The second layout's store cannot be made (NotADirectoryError, as a file where its directory goes, a full or
    read-only disk would fail it): the first layout's rows are printed and written."""
    root = tmp_path / "root"
    root.mkdir()
    path = tmp_path / "store.json"
    out = _launch(
        "-c", _BENCH_STORE_FAILING_LAYOUT, "--layouts=deepseek_v3_fp8,qwen2.5_32b_fp16", "--total_mb=1",
        "--repeats=1", "--cold_blocks=0", "--threads=1", f"--root={root}", f"--out={path}",
    )  # fmt: skip
    assert out.returncode != 0 and "NotADirectoryError" in out.stderr, out.stderr[-2000:]
    rows = json.loads(path.read_text())
    assert rows and {r["layout"] for r in rows} == {"deepseek_v3_fp8"}
    assert "| deepseek_v3_fp8 | write |" in out.stdout


_BENCH_PREFILL_FAILING_MODEL = """
from absl import app
import experiments.bench_prefill as bp

def run_one(name, *args):
    if name == "moe":
        raise MemoryError("moe ran out")
    return {"model": name, "ratio": 1.05}

bp.run_one = run_one
app.run(bp.main)
"""


def test_bench_prefill_keeps_the_finished_models_results_when_one_raises(tmp_path):
    path = tmp_path / "prefill.json"
    out = _launch("-c", _BENCH_PREFILL_FAILING_MODEL, "--models=dense,moe", "--no_persistent_cache", f"--out={path}")
    assert out.returncode != 0 and "MemoryError: moe ran out" in out.stderr, out.stderr[-2000:]
    assert json.loads(path.read_text()) == [{"model": "dense", "ratio": 1.05}]


# run's main with the runtime replaced: `basic` finishes with fixed figures, `dualpath` raises a plain error
_STUB_RUN = """
import sys, types
from absl import app
from dualpath_jax.runtime import driver
from experiments import parse_flags_or_exit, run

def fake_run(cfg, ts, **kw):
    if cfg.scheduler.name != "basic":
        raise OSError(28, "No space left on device")
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


def test_run_keeps_the_finished_policy_results_when_another_raises_any_error(tmp_path):
    """Not only RunFailed: any error of the second policy's run (a full disk here) kept nothing but a traceback."""
    out = _launch("-c", _STUB_RUN, str(tmp_path))
    assert out.returncode == 1, out.stderr[-2000:]
    assert "run failed: OSError: [Errno 28] No space left on device (results of basic only, not of dualpath)" in (
        out.stderr
    )
    assert "Traceback" in out.stderr  # logged: an unexpected error keeps its traceback
    (run_dir,) = list(tmp_path.iterdir())
    res = json.loads((run_dir / "results.json").read_text())
    assert list(res["results"]) == ["basic"] and res["failed"].startswith("run failed: OSError")
    assert (run_dir / "table.txt").exists()


_STUB_BENCH_RUNTIME = """
import math, sys, types
from absl import app
from dualpath_jax.runtime import driver
from experiments import bench_runtime, parse_flags_or_exit

def run(cfg, ts, **kw):
    if cfg.scheduler.name == "dualpath":
        raise OSError(28, "No space left on device")
    s = {"jct_s": 2.0, "pe_read_bytes": 1, "de_read_bytes": 0, "snic_max_over_avg": 1.5}
    return types.SimpleNamespace(summary=s, tokens={})

driver.prepare = lambda cfg, *a, **k: ([types.SimpleNamespace(turns=[0])] * 8, None)
driver.measure_prefill_tokens_per_s = lambda ops, cfg, *a, **k: 1000.0
driver.run = run
bench_runtime._plot = lambda out, path: None
sys.argv = [sys.argv[0], "--config=configs/tiny_runtime.py:test", "--skip_sim", "--skip_overhead",
            "--config.results_dir=" + sys.argv[1]]
app.run(bench_runtime.main, flags_parser=parse_flags_or_exit)
"""


def test_bench_runtime_keeps_the_measured_run_when_another_raises_any_error(tmp_path):
    out = _launch("-c", _STUB_BENCH_RUNTIME, str(tmp_path))
    assert out.returncode == 1 and "failed: OSError: [Errno 28] No space left on device" in out.stderr, out.stderr
    (run_dir,) = list(tmp_path.glob("bench_runtime-*"))
    res = json.loads((run_dir / "bench_runtime.json").read_text())
    assert list(res["measured"]) == ["basic"] and res["failed"].startswith("failed: OSError")
