"""Fix wave 25, the sweep audit's findings (notes/fix25_sweep_report.md). Each test failed before its fix:

- a trace path that is not there was a traceback in a sweep (one line in simulate);
- Ctrl-C while the cells' simulators were built was a KeyboardInterrupt traceback (SIGTERM: one line), in sweep,
  capacity and reproduce_paper;
- a policy's error in a sweep cell lost its file:line and its traceback;
- cells an interruption left unrun were counted as "failed"; the printed table had no `error` column;
- `--loads=agents=8,,agents=16` ran an extra cell at the default, a list flag given twice kept the last;
- `--config` on sweep had no hint naming --setups / --loads / --extra; `--results_dir` no hint at all;
- no ratio to the first mode, no mean over seeds, `--extra` nowhere in sweep.csv, no `wrote .../sweep.json`;
- --resume kept the rows of a policy of one's own edited since, without a word.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from absl import flags
from absl.testing import flagsaver

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "sim_tiny.py")

# a policy of one's own that raises in schedule() (its line: BOOM_LINE of the file)
_BOOM = """import dataclasses

import schedulers
from configs.sim_tiny import get_config  # noqa: F401
from schedulers import InterEnginePolicy


@schedulers.POLICIES.register("fix25_boom")
class Boom(InterEnginePolicy):
    @dataclasses.dataclass(frozen=True)
    class Config:
        pass

    def schedule(self, snapshot, queue, fetching_node=None):
        raise ZeroDivisionError("fix25 policy broke on purpose")
"""
BOOM_LINE = 15

# a policy in a module of its own (not the setup file): --resume must see it change
_MINE = """import dataclasses

import schedulers
from schedulers import Assignment, InterEnginePolicy


@schedulers.POLICIES.register("fix25_mine")
class Mine(InterEnginePolicy):
    @dataclasses.dataclass(frozen=True)
    class Config:
        pass

    def schedule(self, snapshot, queue, fetching_node=None):
        s = snapshot.copy()
        out = []
        pes, des = s.engines_of("prefill"), s.engines_of("decode")
        for r in queue:
            fit = [d for d in des if d.free_hbm_tokens >= r.total_tokens]
            if not fit:
                break
            pe, de = min(pes, key=lambda e: e.tok), min(fit, key=lambda e: e.tok)
            pe.tok += r.prompt_tokens
            de.tok += r.total_tokens
            de.free_hbm_tokens -= r.total_tokens
            out.append(Assignment(r.request_id, pe.engine_id, de.engine_id, "de"))
        return out
"""


def _launch(*args: str, cwd=REPO, path: str = ""):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (REPO, path) if p)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


def test_a_missing_trace_is_one_bad_cell_line():
    from experiments.sweep import _check_cells

    with pytest.raises(SystemExit) as e:
        _check_cells([(TINY, "basic", "", "trace=fix25_nope.jsonl.gz", "")])
    line = str(e.value.code)
    assert line.startswith("bad sweep cell ") and "trace 'fix25_nope.jsonl.gz' not found" in line, line


@pytest.mark.parametrize("who", ["sweep", "capacity"])
def test_ctrl_c_while_the_cells_build_is_one_line(tmp_path, who):
    setup = tmp_path / "interrupted.py"  # (Ctrl-C as its config loads, in the check before anything runs)
    setup.write_text("def get_config(arg=None):\n    raise KeyboardInterrupt\n")
    out = _launch("-m", f"experiments.{who}", f"--setups={setup}", f"--output_dir={tmp_path / 'out'}")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert f"{who}: stopped by Ctrl-C before any " in out.stderr.splitlines()[-1]


def test_ctrl_c_while_reproduce_papers_runs_are_checked_is_one_line(tmp_path):
    code = (
        "import experiments.reproduce_paper as r\n"
        "def stop(*a):\n    raise KeyboardInterrupt\n"
        "r._check_runs = stop\n"
        "from absl import app\napp.run(r.main)\n"
    )
    out = _launch("-c", code, "--extra=turns=2", f"--output_dir={tmp_path / 'out'}")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.splitlines()[-1] == "reproduce_paper: stopped by Ctrl-C before any run started (nothing written)"


def test_a_policys_error_names_its_line_and_the_outputs_say_more(tmp_path):
    """One sweep: a failing policy beside basic and dualpath, 2 seeds, an --extra."""
    setup = tmp_path / "boom.py"
    setup.write_text(_BOOM)
    out_dir = tmp_path / "out"
    out = _launch(
        "-m", "experiments.sweep", f"--setups={setup}", "--modes=basic,dualpath,fix25_boom", "--loads=agents=2",
        "--extra=turns=2", "--seeds=0,1", "--noplot", f"--output_dir={out_dir}",
    )  # fmt: skip
    assert out.returncode == 1, out.stderr[-2000:]
    at = f"(at {setup}:{BOOM_LINE} in schedule)"
    assert "sweep: 2 of 6 cells failed" in out.stderr and out.stderr.count(at) == 2, out.stderr[-3000:]
    # the worker logged the policy's traceback, once per failed cell
    assert out.stderr.count('raise ZeroDivisionError("fix25 policy broke on purpose")') == 2, out.stderr[-3000:]
    with open(out_dir / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0])
    assert header[:5] == ["setup", "mode", "load", "seed", "extra"] and header[-1] == "error"
    assert {r["extra"] for r in rows} == {"turns=2"}
    by = {(r["mode"], r["seed"]): r for r in rows}
    for seed in ("0", "1"):
        ratio = float(by["dualpath", seed]["jct_s"]) / float(by["basic", seed]["jct_s"])
        assert float(by["dualpath", seed]["jct_s_vs_basic"]) == pytest.approx(ratio)
        assert float(by["basic", seed]["jct_s_vs_basic"]) == 1.0
        assert by["fix25_boom", seed]["jct_s_vs_basic"] == "" and at in by["fix25_boom", seed]["error"]
    # the printed table has the error column too
    table = out.stdout.splitlines()
    assert table[0].split() == header and any(line.rstrip().endswith(f"{at}") for line in table)
    # mean [min, max] over the seeds: printed and in sweep_mean.csv
    with open(out_dir / "sweep_mean.csv") as f:
        means = {r["mode"]: r for r in csv.DictReader(f)}
    jct = [float(by["basic", s]["jct_s"]) for s in ("0", "1")]
    basic = means["basic"]
    assert basic["seeds"] == "2" and means["fix25_boom"]["seeds"] == "0"
    assert float(basic["jct_s_mean"]) == pytest.approx(sum(jct) / 2)
    assert (float(basic["jct_s_min"]), float(basic["jct_s_max"])) == pytest.approx((min(jct), max(jct)))
    assert "mean [min, max] over 2 seeds:" in out.stdout
    # sweep.json: said, and its keys in the CSV's order
    assert f"wrote {out_dir / 'sweep.json'}" in out.stdout
    with open(out_dir / "sweep.json") as f:
        first = json.load(f)[0]
    assert list(first)[: len(header) - 1] == header[:-1]


def test_interrupted_cells_are_not_run_not_failed():
    from experiments import INTERRUPTED, exit_if_stopped_or_failed

    cut = [f"x.py:basic,seed={n}: {INTERRUPTED}" for n in range(2)]
    with pytest.raises(SystemExit) as e:
        exit_if_stopped_or_failed("sweep", "cells", 3, cut, "out/sweep.csv", False)
    assert str(e.value.code).startswith("sweep: 2 of 3 cells not run (interrupted; their rows say so):")
    with pytest.raises(SystemExit) as e:
        exit_if_stopped_or_failed("sweep", "cells", 3, ["x.py:basic: RuntimeError: broke", cut[0]], "o", False)
    assert str(e.value.code).startswith("sweep: 2 of 3 cells did not finish: 1 failed, 1 not run (interrupted)")
    with pytest.raises(SystemExit) as e:
        exit_if_stopped_or_failed("sweep", "cells", 3, ["x.py:basic: RuntimeError: broke"], "o", False)
    assert str(e.value.code).startswith("sweep: 1 of 3 cells failed (their rows say so):")


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--loads=agents=2,,agents=3"], "--loads item 2 of 3 is empty"),
        (["--modes=basic,"], "--modes item 2 of 2 is empty"),
        (["--modes=basic", "--modes=dualpath"], "bad flags: --modes given more than once"),
        (["--loads=agents=2", "--extra=turns=2", "--loads=agents=3"], "bad flags: --loads given more than once"),
        ([f"--config={TINY}"], "Hint: sweep takes its config files with --setups=FILE"),
        (["--config.cluster.snic_gbps=5"], "Unknown command line flag 'config.cluster.snic_gbps'"),
        (["--results_dir=x"], "Hint: this launcher writes its results under --output_dir (e.g. --output_dir=x)"),
    ],
)
def test_flag_slips_are_refused(args, said, capsys):
    from experiments import sweep

    with flagsaver.flagsaver(), pytest.raises(SystemExit) as e:
        try:
            sweep.parse_flags(["sweep", *args])
        finally:
            flags.FLAGS.unparse_flags()
    text = f"{e.value.code}\n{capsys.readouterr().err}"
    assert said in text, text
    sweep.parse_flags(["sweep"])  # (and the flags parse again: the grid's defaults)
    flags.FLAGS.unparse_flags()


def test_unknown_policy_in_a_sweep_names_setups():
    from experiments.sweep import _check_cells

    with pytest.raises(SystemExit) as e:
        _check_cells([(TINY, "fix25_no_such_policy", "", "", "")], build=False)
    assert "--setups file" in str(e.value.code) and "--config file" not in str(e.value.code), e.value.code


def test_resume_refuses_the_rows_of_a_policy_edited_since(tmp_path):
    (tmp_path / "fix25_pol.py").write_text(_MINE)
    setup = tmp_path / "mine.py"
    setup.write_text("import fix25_pol  # noqa: F401\nfrom configs.sim_tiny import get_config  # noqa: F401\n")
    args = ["-m", "experiments.sweep", f"--setups={setup}", "--modes=fix25_mine", "--extra=turns=2", "--noplot"]
    out = _launch(*args, "--loads=agents=2", "--output_dir=out", cwd=tmp_path, path=str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    with open(tmp_path / "out" / "sweep.json") as f:
        assert json.load(f)[0]["policy_file"] == str(tmp_path / "fix25_pol.py")
    (tmp_path / "fix25_pol.py").write_text(_MINE.replace('"de"))', '"pe"))'))
    out = _launch(*args, "--loads=agents=2,agents=3", "--output_dir=out", "--resume", cwd=tmp_path, path=str(tmp_path))
    assert out.returncode == 1, out.stderr[-2000:]
    last = out.stderr.splitlines()[-1]
    assert last.startswith(f"--resume: policy fix25_mine: {tmp_path / 'fix25_pol.py'} changed since"), last


def test_an_online_rows_slo_is_named_beside_its_slo_columns():
    from experiments.sweep import _check_cells, _grid_row, table_columns

    cell = (TINY, "basic", "aps=0.2", "warmup=1", "")
    _check_cells([cell], build=False)
    row = _grid_row(cell, {"slo_met": True}, None, {TINY: "sim_tiny.py"})
    assert row["slo"] == "ttft<=4s;tpot<=0.05s;p90;warmup=1s" and row["policy_sha256"] is None, row
    cols = table_columns([row])
    assert cols[cols.index("slo_met") + 1] == "slo"


_INT_WHILE_WRITING = """
import os
import signal
from absl import app
import experiments.sweep as sw

plot = sw.plot_sweep
def noisy(*a, **k):  # (Ctrl-C while the results are written: after sweep.csv / sweep.json, before the plot)
    os.kill(os.getpid(), signal.SIGINT)
    return plot(*a, **k)
sw.plot_sweep = noisy
app.run(sw.main, flags_parser=sw.parse_flags)
"""


def test_ctrl_c_while_a_sweep_writes_its_results_is_noted_and_they_stay_whole(tmp_path):
    """Only SIGTERM was held once the cells finished: a Ctrl-C while the results were written was a traceback, no
    plot and no run.json (session 42). Now it is noted: everything is written, then the exit says it came."""
    script = tmp_path / "int_sweep.py"
    script.write_text(_INT_WHILE_WRITING)
    out = _launch(str(script), f"--setups={TINY}", "--modes=basic", "--loads=agents=2", f"--output_dir={tmp_path}")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "sweep: stopped by Ctrl-C; the 1 finished cells of 1 are in" in out.stderr, out.stderr[-2000:]
    assert (tmp_path / "sweep.png").exists() and (tmp_path / "run.json").exists()
    assert len(json.loads((tmp_path / "sweep.json").read_text())) == 1


def test_an_empty_modes_item_gets_no_loads_hint():
    # (--modes=basic, said "e.g. agents=16" and that '' alone is the default, which --loads='' refuses)
    from experiments.sweep import _no_empty_item

    with pytest.raises(flags.ValidationError) as e:
        _no_empty_item("modes")(["basic", ""])
    assert str(e.value) == "--modes item 2 of 2 is empty (a doubled or trailing comma?)"
    with pytest.raises(flags.ValidationError, match=r"name its value \(e.g. agents=16\)"):
        _no_empty_item("loads")(["agents=2", ""])
