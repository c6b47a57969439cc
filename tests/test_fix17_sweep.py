"""Fix wave 17, the "sweep" journey: a sweep of hours of cells keeps every finished cell on disk as it finishes, and
`--resume` runs only the cells that are missing. Each test failed before its fix:

- a driver killed hard (kill -9, the OOM killer, a reboot) lost every finished cell: the rows were held in memory
  until the end. Each cell's row is now appended to sweep.rows.jsonl (fsynced) as it finishes;
- after any stop the only way on was --overwrite, which ran every cell again. `--resume` keeps the earlier
  sweep's finished cells (sweep.json and/or sweep.rows.jsonl) and runs the others; a different grid, a malformed
  log line (other than a torn last one) are refused, and nothing stored is touched;
- run_jobs had no way to hand a job's result to its caller as it finished (`on_done`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import test_launch_hunt as launch_hunt
from test_fix13_traceload import needs_traces as needs_kvcache_traces

from experiments import INTERRUPTED, run_jobs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("wall_s", "events_per_s", "turns_per_s")  # a row's figures, less these, are the same on every run

# sim_tiny, where each cell's run (its second load: the first is the sweep's check) is noted in $RAN_LOG; the run
# of cell $HANG_AT (`mode,agents`) marks $HANG_MARK and sleeps (to be killed), that of $FAIL_AT raises
_SETUP = """
import os, time
from configs.sim_tiny import get_config as _tiny

def get_config(arg=None):
    cfg = _tiny(arg)
    cell = f"{cfg.mode},{cfg.workload.n_agents}"
    key = "LOADS_" + cell.replace(",", "_")
    os.environ[key] = str(int(os.environ.get(key, "0")) + 1)
    if os.environ[key] == "2":
        with open(os.environ["RAN_LOG"], "a") as f:
            f.write(cell + "\\n")
        if cell == os.environ.get("FAIL_AT"):
            raise RuntimeError("this cell broke")
        if cell == os.environ.get("HANG_AT"):
            with open(os.environ["HANG_MARK"], "w") as f:
                f.write(str(os.getpid()))
            time.sleep(300)
    return cfg
"""


def _args(setup, out_dir, modes="basic,dualpath", *extra):
    return [
        "-m", "experiments.sweep", f"--setups={setup}", f"--modes={modes}", "--loads=agents=2,agents=3",
        "--extra=turns=2", "--workers=1", "--noplot", f"--output_dir={out_dir}", *extra,
    ]  # fmt: skip


def _sweep(setup, out_dir, *extra, modes="basic,dualpath", env=None):
    return launch_hunt._launch(*_args(setup, out_dir, modes, *extra), env={"RAN_LOG": f"{out_dir}.ran", **(env or {})})


def _ran(out_dir) -> list[str]:
    with open(f"{out_dir}.ran") as f:
        return f.read().split()


def _files(d) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _kill_while_hanging(setup, out_dir, workers: int = 1) -> list[int]:
    """Run the sweep of `_args` until cell (dualpath, agents=2) runs (it hangs), then SIGKILL its driver; returns the
    pids of its worker processes (workers > 1)."""
    mark = out_dir.parent / f"{out_dir.name}.hanging"
    env = {
        **os.environ,
        "PYTHONPATH": REPO,
        "RAN_LOG": f"{out_dir}.ran",
        "HANG_AT": "dualpath,2",
        "HANG_MARK": str(mark),
    }
    args = [sys.executable, *_args(setup, out_dir), f"--workers={workers}"]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not mark.exists() or not mark.read_text():  # (a guard against a hang, not a timing assertion)
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the sweep never reached its 3rd cell"
            time.sleep(0.05)
        workers_pids = [pid for pid in _children(proc.pid) if b"spawn_main" in _cmdline(pid)]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return workers_pids


def _children(pid: int) -> list[int]:
    out = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(p))
        except (OSError, IndexError, ValueError):
            continue
    return out


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # (a zombie has exited)
    except OSError:
        return False


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A real sweep of 4 cells killed with SIGKILL while its 3rd cell (dualpath, agents=2) runs: (setup, its dir)."""
    tmp = tmp_path_factory.mktemp("killed")
    setup = tmp / "noted.py"
    setup.write_text(_SETUP)
    _kill_while_hanging(setup, tmp / "out")
    return setup, tmp / "out"


def _copy(killed, tmp_path):
    """The killed sweep's directory and its run log, copied to `tmp_path` (each test changes its own)."""
    setup, out_dir = killed
    shutil.copytree(out_dir, tmp_path / "out")
    shutil.copy(f"{out_dir}.ran", tmp_path / "out.ran")
    return setup, tmp_path / "out"


def test_a_killed_sweep_kept_its_finished_cells_and_resume_runs_only_the_others(killed, tmp_path):
    """kill -9 lost every finished cell (no file at all). Now its finished cells are in sweep.rows.jsonl, and the
    same command with --resume runs only the 2 missing cells; its sweep.json is that of an uninterrupted sweep."""
    setup, out_dir = _copy(killed, tmp_path)
    assert sorted(os.listdir(out_dir)) == ["sweep.rows.jsonl"]
    earlier = [json.loads(line) for line in (out_dir / "sweep.rows.jsonl").read_text().splitlines()]
    assert [(r["mode"], r["load"]) for r in earlier] == [("basic", "agents=2"), ("basic", "agents=3")]
    assert all("error" not in r and r["jct_s"] > 0 for r in earlier)
    assert _ran(out_dir) == ["basic,2", "basic,3", "dualpath,2"]

    out = _sweep(setup, out_dir, "--resume")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert f"--resume: kept 2 finished cells of 4 from {out_dir}; running the other 2" in out.stderr
    assert _ran(out_dir)[3:] == ["dualpath,2", "dualpath,3"]  # only the missing cells ran
    rows = json.loads((out_dir / "sweep.json").read_text())
    assert [r["wall_s"] for r in rows[:2]] == [r["wall_s"] for r in earlier]  # the kept rows, as they were
    assert not (out_dir / "sweep.rows.jsonl").exists()  # sweep.json holds every row
    info = json.loads((out_dir / "run.json").read_text())
    assert info["resumed_cells"] == [r["spec"] for r in earlier] and len(info["cells"]) == 4
    assert info["flags"]["resume"] is True

    fresh = _sweep(setup, tmp_path / "fresh")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    want = json.loads((tmp_path / "fresh" / "sweep.json").read_text())
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in rows] == [
        {k: v for k, v in r.items() if k not in TIMING} for r in want
    ]
    header = (tmp_path / "fresh" / "sweep.csv").read_text().splitlines()[0]
    assert (out_dir / "sweep.csv").read_text().splitlines()[0] == header


def test_without_resume_an_earlier_rows_log_is_refused_and_kept(killed, tmp_path):
    setup, out_dir = _copy(killed, tmp_path)
    before = _files(out_dir)
    out = _sweep(setup, out_dir)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "it holds an earlier run's results (sweep.rows.jsonl)" in out.stderr and "--resume" in out.stderr
    assert _files(out_dir) == before and len(_ran(out_dir)) == 3


def test_resume_with_a_different_grid_is_refused_and_touches_nothing(killed, tmp_path):
    setup, out_dir = _copy(killed, tmp_path)
    before = _files(out_dir)
    out = _sweep(setup, out_dir, "--resume", modes="dualpath")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert f"--resume: {out_dir} holds 2 cells this sweep does not have ({setup}:basic,agents=2,turns=2; " in out.stderr
    assert "pass the same --setups/--modes/--loads/--extra/--seeds, or --overwrite" in out.stderr
    assert _files(out_dir) == before and len(_ran(out_dir)) == 3  # nothing ran


def test_resume_ignores_a_torn_last_line(killed, tmp_path):
    setup, out_dir = _copy(killed, tmp_path)
    log = out_dir / "sweep.rows.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines) + lines[0][:40])  # killed mid-write
    out = _sweep(setup, out_dir, "--resume")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert f"--resume: {log} line 3 is torn (the sweep was killed mid-write): ignored" in out.stderr
    assert _ran(out_dir)[3:] == ["dualpath,2", "dualpath,3"]
    rows = json.loads((out_dir / "sweep.json").read_text())
    assert [(r["mode"], r["load"]) for r in rows] == [(m, f"agents={n}") for m in ("basic", "dualpath") for n in (2, 3)]
    assert all("error" not in r for r in rows)


@pytest.mark.parametrize(
    ("mend", "why"),
    [
        (lambda lines: [lines[0], "{not json\n", lines[1]], "line 2 is not a JSON row"),
        (lambda lines: [json.dumps({"mode": "basic"}) + "\n", *lines], "line 1 is not a sweep row with its cell's"),
    ],
    ids=["not-json", "no-spec"],
)
def test_resume_refuses_a_malformed_line_naming_it(killed, tmp_path, mend, why):
    setup, out_dir = _copy(killed, tmp_path)
    log = out_dir / "sweep.rows.jsonl"
    log.write_text("".join(mend(log.read_text().splitlines(keepends=True))))
    before = _files(out_dir)
    out = _sweep(setup, out_dir, "--resume")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert f"--resume: {log} {why}" in out.stderr
    assert _files(out_dir) == before and len(_ran(out_dir)) == 3


def test_resume_matches_a_setup_spelled_another_way_and_names_it_as_this_sweep_does(killed, tmp_path):
    setup, out_dir = _copy(killed, tmp_path)
    spelled = f"{setup.parent}/./{setup.name}"
    out = launch_hunt._launch(*_args(spelled, out_dir), "--resume", env={"RAN_LOG": f"{out_dir}.ran"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert _ran(out_dir)[3:] == ["dualpath,2", "dualpath,3"]
    rows = json.loads((out_dir / "sweep.json").read_text())
    assert [r["spec"] for r in rows] == [
        f"{spelled}:{m},agents={n},turns=2" for m in ("basic", "dualpath") for n in (2, 3)
    ]


def test_overwrite_starts_a_new_rows_log(killed, tmp_path):
    """--overwrite replaces an earlier sweep's rows log too (appended to, it mixed two sweeps' rows)."""
    setup, out_dir = _copy(killed, tmp_path)
    out = _sweep(setup, out_dir, "--overwrite")
    assert out.returncode == 0, out.stderr[-2000:]
    assert _ran(out_dir)[3:] == ["basic,2", "basic,3", "dualpath,2", "dualpath,3"]
    assert sorted(os.listdir(out_dir)) == ["run.json", "sweep.csv", "sweep.json"]
    assert json.loads((out_dir / "run.json").read_text())["resumed_cells"] == []


def test_a_failed_cell_says_resume_and_resume_runs_only_it(tmp_path):
    """A sweep with a failed cell ends with its rows in sweep.json (no log left) and says how to go on; --resume
    then keeps the 3 finished cells (read from sweep.json) and runs the failed one."""
    setup = tmp_path / "noted.py"
    setup.write_text(_SETUP)
    out_dir = tmp_path / "out"
    out = _sweep(setup, out_dir, env={"FAIL_AT": "dualpath,3"})
    assert out.returncode == 1 and "1 of 4 cells failed" in out.stderr, out.stderr[-2000:]
    assert "go on with the same command and --resume" in out.stderr
    assert sorted(os.listdir(out_dir)) == ["run.json", "sweep.csv", "sweep.json"]
    out = _sweep(setup, out_dir, "--resume")
    assert out.returncode == 0, out.stderr[-2000:]
    assert _ran(out_dir) == ["basic,2", "basic,3", "dualpath,2", "dualpath,3", "dualpath,3"]
    rows = json.loads((out_dir / "sweep.json").read_text())
    assert len(rows) == 4 and all("error" not in r for r in rows)


def test_resume_in_an_empty_directory_runs_and_resume_with_overwrite_is_refused(tmp_path):
    setup = tmp_path / "noted.py"
    setup.write_text(_SETUP)
    out = _sweep(setup, tmp_path / "out", "--resume", "--overwrite")
    assert out.returncode == 1 and "bad flags: --resume keeps" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()
    out = _sweep(setup, tmp_path / "out", "--resume")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "holds no earlier sweep's rows: every cell runs" in out.stderr
    assert len(json.loads((tmp_path / "out" / "sweep.json").read_text())) == 4 and len(_ran(tmp_path / "out")) == 4


def test_the_workers_of_a_killed_sweep_exit(tmp_path):
    """With --workers=2, kill -9 of the driver left its worker processes behind: the one running a cell went on with
    it (a paper-scale cell: minutes, its memory held), then both waited for their next cell forever. Now they exit
    when their driver is gone; and the finished cells are in the log, as with one worker."""
    setup = tmp_path / "noted.py"
    setup.write_text(_SETUP)
    pids = _kill_while_hanging(setup, tmp_path / "out", workers=2)
    try:
        assert len(pids) == 2, pids
        deadline = time.monotonic() + 60  # (a guard: they exit within about a second)
        while any(map(_alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, pids)), "the killed sweep's workers are still running"
    finally:
        for pid in filter(_alive, pids):
            os.kill(pid, signal.SIGKILL)
    rows = [json.loads(line) for line in (tmp_path / "out" / "sweep.rows.jsonl").read_text().splitlines()]
    assert {(r["mode"], r["load"]) for r in rows} <= {
        ("basic", "agents=2"),
        ("basic", "agents=3"),
        ("dualpath", "agents=3"),
    }
    assert all(r["jct_s"] > 0 for r in rows)


@pytest.mark.parametrize("workers", [1, 2])
def test_run_jobs_calls_on_done_once_per_job(workers):
    calls = []
    out = run_jobs(math.sqrt, [4.0, -1.0, 9.0], workers, "test", on_done=lambda *a: calls.append(a))
    want = [(0, 2.0, None), (1, None, "ValueError: math domain error"), (2, 3.0, None)]
    assert sorted(calls) == want and out == [c[1:] for c in want]
    if workers == 1:
        assert calls == want  # (as each finishes, in order)


def test_run_jobs_keeps_a_job_whose_on_done_was_interrupted():
    def on_done(i, result, error):
        if i == 1:
            raise KeyboardInterrupt

    out = run_jobs(math.sqrt, [4.0, 9.0, 16.0], 1, "test", on_done=on_done)
    assert out == [(2.0, None), (3.0, None), (None, INTERRUPTED)]


def test_resume_refuses_kept_cells_of_a_setup_file_edited_since(killed, tmp_path):
    """--resume trusted the earlier rows whatever happened to the setup file in between: cells of the file as it was
    beside cells of the file as it is, in one sweep.json. Each row now carries the file's sha256 (`setup_sha256`);
    a kept row whose file changed is refused, nothing touched; the file restored, the resume runs."""
    setup, out_dir = _copy(killed, tmp_path)
    rows = [json.loads(x) for x in (out_dir / "sweep.rows.jsonl").read_text().splitlines()]
    assert rows and all(len(r["setup_sha256"]) == 64 for r in rows)
    before, text = _files(out_dir), setup.read_text()
    setup.write_text(text + "\n# an edit\n")
    out = _sweep(setup, out_dir, "--resume")
    assert out.returncode != 0 and _files(out_dir) == before
    assert "changed since the earlier sweep ran its cells there" in out.stderr.strip().splitlines()[-1], out.stderr
    setup.write_text(text)
    out = _sweep(setup, out_dir, "--resume")
    assert out.returncode == 0, out.stderr[-2000:]


def test_each_row_names_its_code_and_a_resume_records_the_kept_cells_code(killed, tmp_path):
    """A sweep killed hard wrote no run.json, so the code its finished cells ran was nowhere once resumed. Each row now
    carries `code` (the git commit, `+dirty` with changed files); the resumed run.json lists the kept cells' codes
    (`resumed_code`), and a kept cell of other code is logged."""
    from dualpath_jax.metrics import git_state

    g = git_state()  # (as experiments.sweep.code_version; that module's absl flags stay out of this process)
    commit = str(g["commit"] if g else None)  # (its "+dirty" may change while the tests write files: left out)
    setup, out_dir = _copy(killed, tmp_path)
    log = out_dir / "sweep.rows.jsonl"
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert {str(r["code"]).split("+")[0] for r in rows} == {commit}
    rows[0]["code"] = "0123abc"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = _sweep(setup, out_dir, "--resume")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "kept cells ran at code 0123abc" in out.stderr, out.stderr[-3000:]
    info = json.loads((out_dir / "run.json").read_text())
    codes = info["resumed_code"]
    assert "0123abc" in codes and [c.split("+")[0] for c in codes if c != "0123abc"] == [commit], codes


@needs_kvcache_traces
def test_resume_refuses_kept_cells_of_a_trace_changed_since(tmp_path):
    """--resume checked the setup file (`setup_sha256`) but not the trace a cell replays: a trace directory that had
    gained a session since was resumed silently, the kept cells' figures of the trace as it was beside new cells of
    the trace as it is. A trace cell's row now carries the trace's sha256 (`trace_sha256`); a kept row whose trace
    changed is refused, nothing touched; the trace restored, the resume runs."""
    from dualpath_jax.workloads import traces_dir

    sessions = str(traces_dir())
    trace = tmp_path / "sessions"
    trace.mkdir()
    for name in ("trace_0001.json.gz", "trace_0002.json.gz"):
        shutil.copy(os.path.join(sessions, "kvcache_tester", name), trace / name)
    out_dir = tmp_path / "out"
    args = ["-m", "experiments.sweep", "--setups=configs/sim_tiny.py", "--modes=basic", f"--loads=trace={trace}"]
    args += ["--workers=1", "--noplot", f"--output_dir={out_dir}"]
    out = launch_hunt._launch(*args)
    assert out.returncode == 0, out.stderr[-2000:]
    (row,) = json.loads((out_dir / "sweep.json").read_text())
    assert len(row["trace_sha256"]) == 64
    before = _files(out_dir)
    shutil.copy(os.path.join(sessions, "kvcache_tester", "trace_0006.json.gz"), trace / "trace_0006.json.gz")
    out = launch_hunt._launch(*args, "--resume")
    assert out.returncode != 0 and _files(out_dir) == before
    assert f"trace {trace} changed since the earlier sweep" in out.stderr.strip().splitlines()[-1], out.stderr
    os.remove(trace / "trace_0006.json.gz")
    out = launch_hunt._launch(*args, "--resume")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "kept 1 finished cells of 1" in out.stderr
