"""Fix wave 11, the "launch" journey: a new researcher follows the README's commands and makes the usual mistakes with
the launchers in experiments/ (each test failed on the code before its fix, unless it says otherwise)."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*args: str, cwd: str = REPO, timeout: float = 180, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": REPO,
        "DUALPATH_TRACES": os.environ.get("DUALPATH_TRACES", "/work/shared/traces"),
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


# ---- 1. a --config file that does not exist: one line naming it -----------------------------------------------------


@pytest.mark.parametrize(
    "module, extra",
    [("experiments.simulate", []), ("experiments.simulate", ["--config.seed=1"]), ("experiments.run", [])],
    ids=["simulate", "simulate_with_an_override", "run"],
)
def test_a_missing_config_file_is_one_line_naming_the_file(tmp_path, module, extra):
    """A --config path that does not exist was 4 lines: "bad config: OSError: Failed loading config file config_config"
    (the library's module name, not the file) and then its attempts, the path on the third line. Contract: one
    "bad config" line naming the path and the OS error; no traceback; a failing exit."""
    missing = str(tmp_path / "no_such_config.py")
    out = _launch("-m", module, f"--config={missing}", *extra)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if "Failed loading config file" in ln]
    assert lines == [
        f"bad config: OSError: Failed loading config file: [Errno 2] No such file or directory: '{missing}'"
    ]
    assert "config_config" not in out.stderr and "Attempted" not in out.stderr


# ---- 2. reproduce_paper from another working directory -----------------------------------------------------------------


def test_reproduce_paper_runs_from_any_working_directory(tmp_path):
    """`python -m experiments.reproduce_paper` (no file argument of the user's) loaded its paper configs as
    "configs/paper_ds660b.py" relative to the working directory: from anywhere but the repository root every run
    failed ("config file 'configs/paper_ds660b.py' does not exist") and it wrote a report.json of no runs. Contract:
    it finds its configs in the repository; the labels in report.json stay `configs/paper_*.py:...`."""
    out_dir = tmp_path / "rp"
    work = tmp_path / "elsewhere"
    work.mkdir()
    out = _launch(
        "-m", "experiments.reproduce_paper", "--agents=4", "--noplot", f"--output_dir={out_dir}", cwd=str(work)
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert (out_dir / "report.md").is_file()
    import json

    keys = list(json.loads((out_dir / "report.json").read_text()))
    assert "offline configs/paper_ds660b.py:dualpath,dataset=64K,agents=4,seed=0" in keys
    assert not list(work.iterdir())  # nothing written in the working directory


def test_reproduce_paper_config_paths_are_in_the_repository():
    from experiments import reproduce_paper as rp

    spec = f"{rp.DS660B}:basic,agents=4"
    assert rp._in_repo(spec) == os.path.join(REPO, "configs", "paper_ds660b.py") + ":basic,agents=4"


# ---- 3. sweep's default setup from another working directory -----------------------------------------------------------


def test_sweep_with_its_default_setup_runs_from_any_working_directory(tmp_path):
    """sweep's default --setups was "configs/sim_tiny.py" relative to the working directory: from anywhere but the
    repository root `python -m experiments.sweep --output_dir=...` stopped with its whole --help and "--setups: config
    file 'configs/sim_tiny.py' does not exist". Contract: the default is the repository's sim_tiny.py (setups the
    user gives stay relative to the working directory)."""
    out_dir = tmp_path / "sw"
    work = tmp_path / "elsewhere"
    work.mkdir()
    out = _launch("-m", "experiments.sweep", "--noplot", f"--output_dir={out_dir}", cwd=str(work))
    assert out.returncode == 0, out.stderr[-2000:]
    rows = (out_dir / "sweep.csv").read_text().splitlines()
    assert rows[0].startswith("setup,mode,load")
    assert [r.split(",")[:2] for r in rows[1:]] == [["sim_tiny.py", "basic"], ["sim_tiny.py", "dualpath"]]


@pytest.mark.parametrize(
    "setup, why",
    [
        ("{tmp}", "is a directory, not a config file"),
        ("{tmp}/no_such.py", "does not exist"),
        (
            "configs/sim_tiny.py:basic",
            "does not exist (a setup is a file; variant items go in --modes, --loads or --extra)",
        ),
    ],
    ids=["directory", "missing", "with_a_variant"],
)
def test_a_bad_sweep_setup_is_one_line_naming_it(tmp_path, setup, why):
    """A --setups item that is not a file was absl's UsageError: the whole --help (40 lines) above the message, and a
    directory was said not to exist. Contract: one line naming the setup and why; a failing exit; nothing run."""
    setup = setup.format(tmp=tmp_path)
    out = _launch("-m", "experiments.sweep", f"--setups={setup}", f"--output_dir={tmp_path / 'sw'}")
    assert out.returncode == 1
    said = [ln for ln in out.stderr.splitlines() if ln.strip() and not ln.startswith("I1")]
    assert said == [f"bad --setups: config file {setup!r} {why}"]
    assert not (tmp_path / "sw").exists()


@pytest.mark.parametrize(
    "policies, line",
    [
        (
            "basic,basic",
            "bad config: --config.policies runs 'basic' twice with its defaults: basic,basic; give each run of a policy its own policy.NAME=value items",
        ),
        (" ,", "bad config: --config.policies is empty"),
    ],
    ids=["twice", "empty"],
)
def test_a_bad_policy_list_of_the_main_job_is_one_line(tmp_path, policies, line):
    """`experiments.run --config.policies=basic,basic` (or an empty list) was absl's UsageError: the module's whole
    docstring and flag list above the message. Contract: one "bad config" line, a failing exit, nothing written."""
    out = _launch(
        "-m", "experiments.run", "--config=configs/tiny_runtime.py:test", f"--config.policies={policies}",
        f"--config.results_dir={tmp_path / 'results'}",
    )  # fmt: skip
    assert out.returncode == 1
    assert out.stderr.rstrip().splitlines()[-1] == line, out.stderr[-2000:]
    assert out.stderr.count("bad config") == 1 and "Traceback" not in out.stderr
    assert "The main job" not in out.stderr  # the module's docstring: --help
    assert not (tmp_path / "results").exists()


# ---- results directories that are files ----------------------------------------------------------------------------


def test_a_results_directory_that_is_a_file_is_named_as_such(tmp_path):
    """An --output_dir / --config.results_dir / --root that is a file said "cannot write there (File exists)", and one
    below a file "(Not a directory)", the OS's words for it. Contract: the line names the file as the reason; it
    keeps "bad <flag> '<path>': cannot write there" (and --out's "cannot write in '<dir>'")."""
    from experiments import fresh_dir_or_exit, writable_dir_or_exit, writable_file_or_exit

    blocker = tmp_path / "a-file"
    blocker.write_text("kept")
    with pytest.raises(SystemExit) as e:
        writable_dir_or_exit(str(blocker), "--output_dir")
    assert str(e.value) == f"bad --output_dir '{blocker}': cannot write there (it is a file, not a directory)"
    with pytest.raises(SystemExit) as e:
        fresh_dir_or_exit(str(blocker / "sub"), "stamp", "--config.results_dir")
    assert str(e.value) == (
        f"bad --config.results_dir '{blocker}/sub': cannot write there ('{blocker}' is a file, not a directory)"
    )
    with pytest.raises(SystemExit) as e:
        writable_file_or_exit(str(blocker / "out.json"), "--out")
    assert (
        str(e.value) == f"bad --out '{blocker}/out.json': cannot write in '{blocker}' (it is a file, not a directory)"
    )
    assert blocker.read_text() == "kept"


def test_simulate_names_an_output_dir_that_is_a_file(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("kept")
    out = _launch("-m", "experiments.simulate", "--config=configs/sim_tiny.py", f"--output_dir={blocker}")
    assert out.returncode == 1
    assert out.stderr.rstrip().splitlines()[-1] == (
        f"bad --output_dir '{blocker}': cannot write there (it is a file, not a directory)"
    )
    assert blocker.read_text() == "kept"


# ---- 4. Ctrl-C during a simulation ----------------------------------------------------------------------------------

_SIMULATE_INTERRUPTED = """
import runpy, sys
import dualpath_jax.sim.runner as runner

def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

runner.run = interrupted  # Ctrl-C in the middle of the event loop
sys.argv = ["simulate", *sys.argv[1:]]
runpy.run_module("experiments.simulate", run_name="__main__", alter_sys=True)
"""


def test_ctrl_c_during_a_simulation_is_one_line_and_keeps_earlier_results(tmp_path):
    """Ctrl-C during `experiments.simulate` (48P96D runs for minutes) was a 20-line traceback through the event loop
    and the scheduler. Contract: one line saying it was interrupted before the simulation finished and that nothing was
    written (an earlier run's results in the directory are untouched), a failing exit code."""
    out_dir = tmp_path / "sim"
    out_dir.mkdir()
    (out_dir / "summary.json").write_text('{"earlier": true}')
    out = _launch(
        "-c", _SIMULATE_INTERRUPTED, "--config=configs/sim_tiny.py", f"--output_dir={out_dir}", "--noprogress"
    )  # fmt: skip
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "KeyboardInterrupt" not in out.stderr
    assert out.stderr.rstrip().splitlines()[-1] == (
        f"simulate: interrupted (Ctrl-C) before the simulation finished; nothing written to {out_dir}"
    )
    assert sorted(os.listdir(out_dir)) == ["summary.json"]
    assert (out_dir / "summary.json").read_text() == '{"earlier": true}'


def interrupt_when(cmd: list, env: dict, marker: str, timeout: float = 120) -> tuple[int, str]:
    """Run `cmd` from the repo root, send it a real SIGINT once `marker` appears on its stderr; its exit code and the
    rest of its stderr (killed if it outlives the timeouts)."""
    import signal
    import time

    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = ""
        deadline = time.monotonic() + timeout
        while marker not in seen and time.monotonic() < deadline:
            ch = proc.stderr.read(1)
            if not ch:
                break
            seen += ch
        assert marker in seen, seen[-2000:]
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, rest


def test_a_real_sigint_stops_a_running_simulation_with_one_line(tmp_path):
    """The same with a real SIGINT, sent once the simulation's progress bar shows it running (DS 660B, 2048 agents:
    ~25 s here; the test stops it within a few seconds)."""
    out_dir = tmp_path / "sim"
    env = {**os.environ, "PYTHONPATH": REPO}
    cmd = [sys.executable, "-m", "experiments.simulate", "--config=configs/paper_ds660b.py", f"--output_dir={out_dir}"]
    code, rest = interrupt_when(cmd, env, "turn/s")  # the progress bar: the event loop runs
    assert code == 1, rest[-2000:]
    assert "Traceback" not in rest
    assert (
        rest.rstrip()
        .splitlines()[-1]
        .endswith(f"simulate: interrupted (Ctrl-C) before the simulation finished; nothing written to {out_dir}")
    )
    assert not out_dir.exists() or not os.listdir(out_dir)


# ---- 5. Ctrl-C in a benchmark: one line, the finished parts kept --------------------------------------------------------


def test_ctrl_c_in_a_benchmark_part_is_one_line_and_keeps_the_finished_parts():
    """bench_io / bench_store / bench_prefill / bench_invariant run their sections, layouts or models through
    `experiments.run_parts`: on Ctrl-C it kept the finished parts' rows, then re-raised KeyboardInterrupt, a traceback
    through the benchmark. Contract: the finished parts are kept (`keep`), then one line naming the part that was
    stopped and those kept, as a SystemExit (a failing exit)."""
    from experiments import run_parts

    kept = []

    def part(name):
        if name == "tcp":
            raise KeyboardInterrupt

    assert _stopped(run_parts, ["store", "small", "tcp", "overlap"], part, kept.append) == (
        "interrupted (Ctrl-C) during 'tcp'; the finished ones (store, small) are kept"
    )
    assert kept == [["store", "small"]]

    kept.clear()
    assert (
        _stopped(run_parts, ["tcp", "store"], part, kept.append)
        == "interrupted (Ctrl-C) during 'tcp'; none had finished"
    )
    assert kept == []


def _stopped(fn, *args) -> str:
    """fn(*args)'s SystemExit message; a KeyboardInterrupt that goes on is a failure (not pytest's own Ctrl-C)."""
    try:
        fn(*args)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C went on as a KeyboardInterrupt (a traceback), not one line")
    except SystemExit as e:
        return str(e.code)
    pytest.fail("no SystemExit")


def test_an_error_in_a_benchmark_part_still_goes_on_as_itself():
    """(Passed before too.) Another error keeps the finished parts and goes on with its traceback: a bug or a full
    disk is not a user's mistake."""
    from experiments import run_parts

    kept = []

    def part(name):
        if name == "b":
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        run_parts(["a", "b", "c"], part, kept.append)
    assert kept == [["a"]]


# ---- 6. Ctrl-C in bench_gpu: the finished shapes kept and printed ------------------------------------------------------

_BENCH_GPU_INTERRUPTED = """
import sys
from absl import app
import models.prefill_bench as pb
from experiments import bench_gpu

def side(ms):
    return {"step_s": ms / 1e3, "min_step_s": ms / 1e3, "compile_s": 0.0, "model_gflops_per_s": 1.0, "tokens_per_s": 1.0}

def run_one(name, config, batch, miss, cached, repeats):  # stand-in timings: the first shape done, Ctrl-C in the second
    if batch == 2:
        raise KeyboardInterrupt
    return {"model": name, "batch": batch, "miss_tokens": miss, "cached_tokens": cached, "layerwise": side(3),
            "whole": side(4), "ratio": 0.75, "ratio_min": 0.75, "max_abs_logit_diff": 0.0}

pb.run_one = run_one
bench_gpu.whole_on_device = lambda config, batch, miss, cached, repeats: side(2)
sys.argv = ["bench_gpu", *sys.argv[1:]]
app.run(bench_gpu.main)
"""


@pytest.mark.parametrize("with_out", [True, False], ids=["out", "no_out"])
def test_ctrl_c_in_bench_gpu_prints_the_finished_shapes_then_one_line(tmp_path, with_out):
    """bench_gpu (minutes a shape on a GPU lease) on Ctrl-C was a traceback: the shapes it had finished were printed
    nowhere (only in --out, when given). Contract: the finished shapes' tables are printed (and stay in --out), then
    one line naming the shape it stopped in; a failing exit code."""
    out_json = tmp_path / "gpu.json"
    args = ["--shapes=1:64:0,2:64:64,4:64:0", "--layers=1", "--dtype=float32"]
    out = _launch("-c", _BENCH_GPU_INTERRUPTED, *args, *([f"--out={out_json}"] if with_out else []))
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "KeyboardInterrupt" not in out.stderr
    kept = "; the 1 finished shapes are above" + (f" and in {out_json}" if with_out else "")
    assert out.stderr.rstrip().splitlines()[-1] == f"bench_gpu: interrupted (Ctrl-C) during shape 2:64:64{kept}"
    assert "| 1 x 64 (+0) | 2.0 |" in out.stdout and "| 1 x 64 (+0) | 3.0 | 4.0 |" in out.stdout
    assert "2 x 64" not in out.stdout and "4 x 64" not in out.stdout
    if with_out:
        import json

        assert [r["batch"] for r in json.loads(out_json.read_text())] == [1]


_DEMO_INTERRUPTED = """
import runpy, sys
import models.runner as mr

real = mr.ModelRunner.decode_step
calls = []

def decode_step(self, *args, **kwargs):  # Ctrl-C in the second turn's decode
    calls.append(1)
    if len(calls) > 3:
        raise KeyboardInterrupt
    return real(self, *args, **kwargs)

mr.ModelRunner.decode_step = decode_step
sys.argv = ["demo", *sys.argv[1:]]
runpy.run_module("experiments.demo", run_name="__main__", alter_sys=True)
"""


def test_ctrl_c_in_the_demo_is_one_line():
    """`experiments.demo` on Ctrl-C was a traceback through flax / the model runner. Contract: the turns that finished
    are printed as they go, then one line; a failing exit code."""
    out = _launch("-c", _DEMO_INTERRUPTED, "--agents=1", "--turns=3", "--gen_tokens=3", "--nowarmup")
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "KeyboardInterrupt" not in out.stderr
    assert out.stderr.rstrip().splitlines()[-1] == "demo: interrupted (Ctrl-C) before the conversation finished"
    assert "turn 0: prefill" in out.stdout and "turn 1:" not in out.stdout


def test_an_empty_workload_of_workload_stats_is_named():
    """`workload_stats --workload=` was read as a trace directory "." (the working directory): "bad --workload: .: no
    *.json / *.json.gz session file". Contract: a flag error saying --workload is empty."""
    out = _launch("-m", "experiments.workload_stats", "--workload=")
    assert out.returncode == 1
    assert "flag --workload=: --workload is empty" in out.stderr and "Traceback" not in out.stderr
    assert "bad --workload: ." not in out.stderr


_SIMULATE_INTERRUPTED_WRITING = """
import runpy, sys
import dualpath_jax.sim.outputs as outputs

def interrupted(result, output_dir, config, plot=True):  # Ctrl-C after summary.json, in turns.csv
    with open(output_dir + "/summary.json", "w") as f:
        f.write("{}")
    raise KeyboardInterrupt

outputs.write_results = interrupted
sys.argv = ["simulate", *sys.argv[1:]]
runpy.run_module("experiments.simulate", run_name="__main__", alter_sys=True)
"""


def test_ctrl_c_while_simulate_writes_its_results_says_they_are_incomplete(tmp_path):
    """Ctrl-C while the results were written (seconds at 48P96D) was a traceback, and left the directory with this
    run's summary.json beside an earlier run's turns.csv / links.csv, nothing saying so. Contract: one line saying the
    files in the directory are incomplete; a failing exit code."""
    out_dir = tmp_path / "sim"
    out = _launch(
        "-c", _SIMULATE_INTERRUPTED_WRITING, "--config=configs/sim_tiny.py", f"--output_dir={out_dir}", "--noprogress"
    )  # fmt: skip
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "KeyboardInterrupt" not in out.stderr
    assert out.stderr.rstrip().splitlines()[-1] == (
        f"simulate: interrupted (Ctrl-C) while writing the results; the files in {out_dir} are incomplete "
        "(summary.json, turns.csv, links.csv, plot.png may mix this run's and an earlier run's)"
    )


_RUN_INTERRUPTED_CALIBRATING = """
import runpy, sys
import dualpath_jax.runtime.driver as driver

def interrupted(ops, cfg, repeats=3):
    raise KeyboardInterrupt

driver.measure_prefill_tokens_per_s = interrupted  # Ctrl-C while the main job measures the prefill rate
sys.argv = sys.argv[1:]  # experiments.<launcher> and its flags
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("module", ["run", "bench_runtime"])
def test_ctrl_c_while_the_main_job_calibrates_is_one_line(tmp_path, module):
    """Ctrl-C while `experiments.run` (or `bench_runtime`) measured this machine's prefill rate (before any policy
    ran) was a traceback through JAX, and left an empty results/<timestamp>/ behind. Contract: one line, a failing
    exit code, no empty results directory."""
    results = tmp_path / "results"
    out = _launch(
        "-c", _RUN_INTERRUPTED_CALIBRATING, f"experiments.{module}", "--config=configs/tiny_runtime.py:test",
        f"--config.results_dir={results}", *(["--config.calibrate=True"] if module == "run" else ["--skip_sim"]),
    )  # fmt: skip
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "KeyboardInterrupt" not in out.stderr
    assert out.stderr.rstrip().splitlines()[-1] == (
        "interrupted (Ctrl-C) while measuring the prefill throughput; nothing ran"
    )
    assert os.listdir(results) == []


# ---- 7. Ctrl-C in bench_io: its helper processes are stopped by it, not by the signal ----------------------------------

_BENCH_IO_HELPERS = """
import os, signal, sys, time
import numpy as np
from absl import flags
from experiments import bench_io as bio

flags.FLAGS(["bench_io"])
me, peer = bio._transport_pair(1 << 16)  # the first helper process this process starts (the resource tracker's turn)
raw = bio.RawSocketPeer()
assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == set(), "this process's SIGINT stays unblocked"
for pid in (peer.proc.pid, raw.proc.pid):  # Ctrl-C at a terminal reaches the whole process group
    os.kill(pid, signal.SIGINT)
time.sleep(1.0)
print("alive", peer.proc.is_alive(), raw.proc.is_alive(), flush=True)
src = np.zeros(1 << 16, np.uint8)
me.register("src", src)
bio._transport_round(me, 1 << 16, 4, 2)
raw.round(src, 1 << 16, 4)
raw.close()
from transport.peer import PeerProcess
PeerProcess.call(me, "bench-sink", {"op": "quit"})
peer.join()
me.close()
print("done", flush=True)
"""


def test_bench_io_helper_processes_outlive_a_ctrl_c_so_its_cleanup_stops_them():
    """bench_io's helper processes (the transport peer and the raw-socket sink) got the terminal's SIGINT too: each
    died with a KeyboardInterrupt traceback, and bench_io's cleanup then failed on the dead peer (a PeerLostError
    traceback in place of the one "interrupted" line). Contract: the helpers start with SIGINT blocked (this process's
    own SIGINT is unblocked again once they started, also for the first one, which starts multiprocessing's resource
    tracker), so they keep working until bench_io stops them."""
    out = _launch("-c", _BENCH_IO_HELPERS, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["alive", "True", "True", "done"]
    assert "Traceback" not in out.stderr and "KeyboardInterrupt" not in out.stderr


# ---- 8. a bad DUALPATH_PURE_PYTHON -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["experiments.simulate", f"--config={REPO}/configs/sim_tiny.py", "--noplot"],
        ["experiments.sweep", f"--setups={REPO}/configs/sim_tiny.py", "--output_dir=out"],
        ["experiments.bench_store", "--total_mb=8", "--repeats=1"],
    ],
    ids=["simulate", "sweep", "bench_store"],
)
def test_a_bad_pure_python_switch_is_one_line_from_every_launcher(tmp_path, args):
    """README: DUALPATH_PURE_PYTHON takes 1/true/yes/on and 0/false/no/off, "any other value is an error naming the
    variable". From a launcher it was a traceback, raised wherever dualpath_jax.compiled was first imported (sweep:
    when it checked its cells; bench_store: at the launcher's own imports). Contract: one "bad environment" line
    naming it, before anything runs or is written; a failing exit code."""
    out = _launch("-m", *args, cwd=str(tmp_path), env={"DUALPATH_PURE_PYTHON": "maybe"})
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert out.stderr.rstrip().splitlines()[-1] == (
        "bad environment: DUALPATH_PURE_PYTHON='maybe': use 1 (run the Python twins) or 0 (the compiled modules)"
    )
    assert os.listdir(tmp_path) == []


# ---- 9. runtime workload overrides the run does not read ---------------------------------------------------------------


@pytest.mark.parametrize("module", ["experiments.run", "experiments.bench_runtime"])
@pytest.mark.parametrize(
    "override, why",
    [
        ("trace=/no/such/trace", "config.runtime.workload.kind='tiny' (give kind=trace)"),
        ("aps=7", "config.runtime.workload.arrival='offline' (give arrival=online)"),
        ("dataset=48K", "config.runtime.workload.kind='tiny' (give kind=synthetic)"),
    ],
    ids=["trace", "aps", "dataset"],
)
def test_a_runtime_workload_override_the_run_does_not_read_is_refused(tmp_path, module, override, why):
    """`experiments.run --config.runtime.workload.trace=X` with the default kind='tiny' ran the tiny workload (and a
    trace that does not exist was never looked at); `aps=` on an offline run and `dataset=` on a tiny one were ignored
    the same way: a table of another workload than the one asked for. Contract: one "bad config" line naming the
    override and the field that makes it unused, before anything runs; a failing exit code."""
    shown = "7.0" if override == "aps=7" else override.split("=", 1)[1]
    out = _launch(
        "-m", module, "--config=configs/tiny_runtime.py:test", f"--config.runtime.workload.{override}",
        f"--config.results_dir={tmp_path / 'results'}", "--skip_sim" if "bench" in module else "--config.plot=False",
    )  # fmt: skip
    assert out.returncode == 1, out.stderr[-2000:]
    field = override.split("=", 1)[0]
    assert out.stderr.rstrip().splitlines()[-1] == (
        f"bad config: --config.runtime.workload.{field}={shown} is not used by this run: {why}"
    )
    assert "Traceback" not in out.stderr and "turn/s" not in out.stderr
    assert not (tmp_path / "results").exists()


def test_runtime_workload_overrides_the_run_reads_are_taken(tmp_path):
    """(Passed before too.) The same fields where the workload reads them run as before."""
    out = _launch(
        "-m", "experiments.run", "--config=configs/tiny_runtime.py:test", "--config.policies=dualpath",
        "--config.runtime.workload.kind=synthetic", "--config.runtime.workload.dataset=48K",
        "--config.runtime.workload.arrival=online", "--config.runtime.workload.aps=4",
        f"--config.results_dir={tmp_path / 'results'}",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "dualpath" in out.stdout


@pytest.mark.parametrize("module", ["experiments.run", "experiments.bench_runtime"])
def test_a_simulator_config_given_to_the_runtime_launchers_is_one_line(tmp_path, module):
    """`experiments.run --config=configs/sim_tiny.py` (a simulator config to the runtime's launcher) was an
    `AttributeError: "'runtime'"` traceback. Contract: one "bad config" line naming the file and what it lacks."""
    out = _launch("-m", module, "--config=configs/sim_tiny.py")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert out.stderr.rstrip().splitlines()[-1] == (
        "bad config: configs/sim_tiny.py has no 'runtime' section (a runtime config, as configs/tiny_runtime.py; the "
        "simulator's configs run with experiments.simulate)"
    )
