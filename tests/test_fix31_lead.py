"""Fix wave 31 (session 48), the lead's own: sweep's and capacity's --setups of an installed package."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "launcher, flags, table",
    [
        ("sweep", ["--modes=basic", "--loads=agents=2"], "sweep.json"),
        (
            "capacity",
            ["--modes=basic", "--lo=0.5", "--hi=1", "--iters=0", "--extra=duration=4,warmup=1"],
            "capacity.json",
        ),
    ],
)
def test_setups_of_the_installed_package_are_found_from_another_directory(tmp_path, launcher, flags, table):
    """Installed as a wheel and run from another directory, README's `--setups=configs/sim_tiny.py` was `bad --setups:
    config file 'configs/sim_tiny.py' does not exist` (session 47 gave only --config the package's own configs/).
    Here the package's own configs/ stands in for the installed one (PYTHONPATH, the cwd elsewhere)."""
    out_dir = tmp_path / "out"
    out = subprocess.run(
        [sys.executable, "-m", f"experiments.{launcher}", "--setups=configs/sim_tiny.py", *flags, "--noplot",
         f"--output_dir={out_dir}"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"--setups configs/sim_tiny.py: not in {tmp_path}; this package's {REPO}/configs/sim_tiny.py" in out.stderr
    rows = json.loads((out_dir / table).read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    own = os.path.join(REPO, "configs", "sim_tiny.py")
    assert rows and all(r["spec"].startswith(own + ":") and os.path.basename(r["setup"]) == "sim_tiny.py" for r in rows)


def test_a_missing_setup_is_still_named(tmp_path):
    """A --setups item that is neither here nor one of the package's configs is refused as before, naming it."""
    out = subprocess.run(
        [sys.executable, "-m", "experiments.sweep", "--setups=configs/no_such_setup.py", f"--output_dir={tmp_path}"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode != 0
    assert "bad --setups: config file 'configs/no_such_setup.py' does not exist" in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("launcher", ["bench_prefill", "bench_invariant", "bench_gpu", "bench_io", "demo"])
def test_the_jax_launchers_without_a_config_flag_check_the_locale_too(tmp_path, launcher):
    """Session 47's locale check ran in `parse_flags_or_exit` only (the launchers with a --config): these five compile
    jax steps too, and under a non-UTF-8 locale with a non-ASCII package path they still ended in `RuntimeError:
    std::bad_cast` from jax's first compile (here: --helpshort, which parses the flags and would print the help)."""
    link = tmp_path / "thèse"
    link.symlink_to(REPO)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONUTF8"))}
    env.update(LC_ALL="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", PYTHONPATH=str(link))
    out = subprocess.run(
        [sys.executable, "-m", f"experiments.{launcher}", "--helpshort"], cwd=tmp_path, env=env, capture_output=True,
        timeout=120,
    )  # fmt: skip
    err = out.stderr.decode(errors="replace")
    assert out.returncode != 0 and "PYTHONUTF8=1" in err and "Traceback" not in err, err[-2000:]


@pytest.mark.parametrize("from_main_thread", [True, False])
def test_a_node_whose_driver_is_gone_says_so_as_it_exits(from_main_thread):
    """`launcher._end_with_parent` exited a node whose driver was gone with a bare `os._exit(1)`: nothing on stderr
    told it from a node that never started (session 47's flaky test_the_node_processes_of_a_sigkilled_driver_...:
    nodes silent for 120 s). Here the "driver" is a pid that is not this process's parent (the prctl path's check,
    and the polling thread's)."""
    code = (
        "import os, time\n"
        "from dualpath_jax.runtime import launcher\n"
        f"launcher._end_with_parent(os.getppid() + 1, {from_main_thread})\n"
        "time.sleep(5)\n"
        "print('not exited', flush=True)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1 and "not exited" not in out.stdout, (out.stdout, out.stderr)
    assert "its driver (pid " in out.stderr and ") is gone; exiting" in out.stderr, out.stderr


def _epoch_in_child(env_value: str | None) -> tuple[float, str]:
    """`clock.EPOCH` of a fresh process whose environment holds `env_value` (None: unset), and the environment value
    it leaves for the processes it would start."""
    env = {k: v for k, v in os.environ.items() if k != "DUALPATH_JAX_CLOCK_EPOCH"}
    if env_value is not None:
        env["DUALPATH_JAX_CLOCK_EPOCH"] = env_value
    code = "import os; from dualpath_jax import clock; print(repr(clock.EPOCH), os.environ[clock.ENV])"
    out = subprocess.run(
        [sys.executable, "-c", code], env={**env, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    epoch, left = out.stdout.split()
    return float(epoch), left


@pytest.mark.skipif(not os.path.exists("/proc/sys/kernel/random/boot_id"), reason="Linux boot id")
def test_processes_started_from_a_run_share_its_clock_reading_on_the_same_boot_only():
    """The event clock (`clock.now`: the wall clock read once, carried on by the monotonic clock) is read once per
    process tree: a node process started by the driver takes the driver's reading (else a step of the wall clock while
    the nodes start, their ~70 s of compiles, became an offset between each node's stamps and the driver's); a
    reading of another boot (monotonic time restarts at boot) or a malformed one is not taken."""
    import time

    from dualpath_jax import clock

    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    assert os.environ[clock.ENV] == f"{clock.EPOCH!r}@{boot}"  # (this process put its reading there)
    assert _epoch_in_child(f"{123456.25!r}@{boot}") == (123456.25, f"{123456.25!r}@{boot}")
    for other in (f"{123456.25!r}@another-boot", "not-a-number@" + boot, ""):
        epoch, left = _epoch_in_child(other)
        assert abs(epoch - (time.time() - time.monotonic())) < 5.0, (other, epoch)
        assert left == f"{epoch!r}@{boot}", (other, left)


def test_run_info_wall_s_is_not_moved_by_a_wall_clock_step(monkeypatch):
    """run.json's `wall_s` was `time.time() - started`: a step of the host's clock back an hour during a launcher's
    run wrote `wall_s: -3600.0` (clock audit F5). Now both ends are on the event clock."""
    import time

    from dualpath_jax import clock, metrics

    started = clock.now()
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 3600.0)
    info = metrics.run_info("experiments.simulate", started)
    assert 0 <= info["wall_s"] < 60, info["wall_s"]
    assert info["started_utc"].endswith("+00:00")
    # (the clock's shared reading is in this process's environment, but is no setting of the run: not in run.json)
    assert clock.ENV in os.environ and clock.ENV not in info["env"] and clock.ENV not in info["rerun"]
    assert info["executable"] == sys.executable  # (rerun's bare `python`: which one ran, rerun audit F7)


_LOST_CTRL_C_IN_A_LAUNCHER = """
import sys, time
from absl import app
import experiments

class Swallowed:
    def __del__(self):
        raise KeyboardInterrupt  # as a Ctrl-C landing in JAX's gc callback: Python prints it and goes on

def main(argv):
    try:
        Swallowed()
        for _ in range(200):
            time.sleep(0.05)
        print("went on to the end", flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(3)

app.run(main, flags_parser=getattr(experiments, sys.argv[1]))
"""


@pytest.mark.parametrize("parser", ["parse_flags_or_exit", "parse_flags_checking_locale"])
def test_a_ctrl_c_that_lands_in_a_gc_callback_stops_a_launcher_too(parser):
    """A Ctrl-C lost in JAX's gc callback was raised again in node processes only (fix wave 12). The launcher's own
    process lost it the same way: `experiments.run` (in-process launcher) SIGINTed in its warm-up printed "Exception
    ignored in: <function _xla_gc_callback ...> ... KeyboardInterrupt", then ran basic to the end and wrote its
    results (2 in 20 under load; test_fix12_runtime's test_a_real_sigint_in_the_warm_up_leaves_no_results_directory
    failed so).
    Contract: every launcher's flag parser installs the hook; the interrupt reaches the launcher's main."""
    out = subprocess.run(
        [sys.executable, "-c", _LOST_CTRL_C_IN_A_LAUNCHER, parser], env={**os.environ, "PYTHONPATH": REPO},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 3 and out.stdout.split() == ["interrupted"], (out.returncode, out.stdout, out.stderr)
    assert "Exception ignored" not in out.stderr


def test_a_plot_out_of_memory_still_leaves_the_results_and_run_json_to_write(tmp_path, monkeypatch, caplog):
    """Under `ulimit -v` a simulation that finished and wrote summary.json / turns.csv / links.csv raised MemoryError
    while matplotlib's backend imported: a raw traceback, and run.json (written after the results) was lost
    (resources audit F7). Now plot.png is skipped with one warning and the rest goes on."""
    from dualpath_jax.sim import load_sim_config, outputs, runner

    res = runner.run(load_sim_config(os.path.join(REPO, "configs", "sim_tiny.py:basic,agents=2")))

    def no_memory(*a, **k):
        raise MemoryError

    monkeypatch.setattr(outputs, "plot_result", no_memory)
    with caplog.at_level("WARNING", logger=outputs.__name__):
        paths = outputs.write_results(res, str(tmp_path), {}, plot=True)
    assert set(paths) == {"summary", "turns", "links"} and all(os.path.exists(p) for p in paths.values())
    assert "plot.png not drawn: out of memory" in caplog.text


def test_an_out_of_memory_line_names_the_address_space_limit():
    """`str(MemoryError())` is empty: simulate said "out of memory for the run: ; nothing written" (resources audit
    F7). The line now names RLIMIT_AS where the process has one."""
    code = (
        "import resource; resource.setrlimit(resource.RLIMIT_AS, (4 << 30, resource.RLIM_INFINITY))\n"
        "from dualpath_jax.sim.outputs import address_space_note; print(address_space_note())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "the address-space limit (RLIMIT_AS, ulimit -v) is 4096 MB", out.stderr


def test_a_worker_process_that_cannot_start_is_one_line_naming_the_process_limit(monkeypatch):
    """Under a low `ulimit -u` (not root) a sweep with --workers=4 ended in a raw traceback from `pool.submit`,
    `BlockingIOError: [Errno 11] Resource temporarily unavailable`, naming no limit (resources audit F6)."""
    import concurrent.futures as cf
    import errno

    import experiments

    def cannot_fork(self, *a, **k):
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(cf.ProcessPoolExecutor, "submit", cannot_fork)
    with pytest.raises(SystemExit) as e:
        experiments.run_jobs(abs, [1, 2, 3], workers=4, desc="cells")
    line = str(e.value.code)
    assert line.startswith("cannot start a worker process of --workers=4: Resource temporarily unavailable"), line
    assert "RLIMIT_NPROC, `ulimit -u`" in line


def test_a_node_aborted_under_a_low_process_limit_says_so(monkeypatch):
    """Under `ulimit -u 40` (not root) a node process aborted inside XLA's CPU client, which could not start its
    threads: the run failed with "its process node0 ... was killed by SIGABRT (exit code -6)", naming no limit
    (resources audit F6)."""
    import resource

    from dualpath_jax.runtime import launcher as launcher_mod

    lau = object.__new__(launcher_mod.LocalProcessLauncher)
    lau.procs, lau._killed, lau.session, lau._running = (
        {0: launcher_mod._EndedProcess("node0", 4321, -6)},
        set(),
        None,
        {0},
    )
    monkeypatch.setattr(resource, "getrlimit", lambda what: (40, 40) if what == resource.RLIMIT_NPROC else (-1, -1))
    monkeypatch.setattr(os, "getuid", lambda: 1000)
    why = lau.exit_reason(0)
    assert why.startswith("its process node0 (pid 4321) was killed by SIGABRT (exit code -6)"), why
    assert "RLIMIT_NPROC, `ulimit -u`, is 40" in why
    monkeypatch.setattr(os, "getuid", lambda: 0)  # (root: no process limit applies)
    assert "RLIMIT_NPROC" not in lau.exit_reason(0)


def test_the_lost_ctrl_c_hook_hands_other_unraisables_to_the_hook_before_it(monkeypatch):
    """`catch_lost_ctrl_c` keeps the hook installed before it (pytest's, which turns unraisable exceptions into
    warnings) for everything but a KeyboardInterrupt, and a second call does not stack a second hook."""
    import types

    from dualpath_jax import interrupts

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    interrupts.catch_lost_ctrl_c()
    interrupts.catch_lost_ctrl_c()
    assert sys.unraisablehook.keywords["previous"] == seen.append
    other = types.SimpleNamespace(exc_type=ValueError, exc_value=ValueError("x"), exc_traceback=None, object=None)
    sys.unraisablehook(other)
    assert seen == [other]


def test_a_temp_file_a_live_writer_holds_is_kept_whatever_its_age(tmp_path, monkeypatch):
    """A store's sweep judged another process's temp file by its writer's pid and the file's age alone: after a
    wall-clock step forward past `stale_temp_s` (1 h; an NTP step, a VM resumed) a live writer's file was removed
    mid-write and its block lost (clock audit F7: `temp_files_removed=1` for a writer still alive). A writer now holds its temp file flock'ed until it is renamed;
    a held file is kept. An unheld one of a live pid older than `stale_temp_s` (a pid reused since its writer was
    killed) is still removed."""
    import fcntl
    import time

    from test_kv_store import LAYOUT, content

    from dualpath_jax.block_keys import root_key
    from dualpath_jax.store import LocalDirStore, local_dir

    root = str(tmp_path / "store")
    store = LocalDirStore(root, LAYOUT)
    key = root_key(LAYOUT.fingerprint)
    seen_held = []
    real_write_all = local_dir._write_all

    def write_all(fd, parts):  # (the writer's own temp file, as another process's sweep sees it mid-write)
        probe = os.open(os.readlink(f"/proc/self/fd/{fd}"), os.O_RDONLY)
        try:
            fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
            seen_held.append(False)
        except BlockingIOError:
            seen_held.append(True)
        finally:
            os.close(probe)
        return real_write_all(fd, parts)

    monkeypatch.setattr(local_dir, "_write_all", write_all)
    store.write(key, content(key))
    assert seen_held == [True]
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # (a live writer's pid)
    try:
        d = os.path.dirname(store.path_of(key))
        tmp = os.path.join(d, f".tmp.{store._host}.{other.pid}.abcd1234.{key.hex()}")
        with open(tmp, "wb") as f:
            f.write(b"half a block")
        hour_ago = time.time() - 7200
        os.utime(tmp, (hour_ago, hour_ago))  # (as a wall-clock step of +2 h makes it look)
        fd = os.open(tmp, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)  # (its writer, mid-write)
        try:
            LocalDirStore(root, LAYOUT).close()  # (an open sweeps every directory)
            assert os.path.exists(tmp), "a temp file its writer holds was removed"
        finally:
            os.close(fd)
        LocalDirStore(root, LAYOUT).close()
        assert not os.path.exists(tmp)  # (unheld and old: removed, as before)
    finally:
        other.kill()
        other.wait()
        store.close()


@pytest.mark.parametrize("launcher", ["sweep", "capacity"])
def test_the_simulator_launchers_run_json_says_whether_the_compiled_simulator_ran(tmp_path, launcher):
    """simulate's run.json said `compiled` (the simulator's hot paths in C, or the Python twins: the same figures, not
    the same times); sweep's, capacity's and reproduce_paper's did not (rerun audit F8)."""
    flags = ["--modes=basic", "--loads=agents=2"] if launcher == "sweep" else ["--modes=basic", "--iters=0"]
    flags += ["--extra=duration=4,warmup=1"] if launcher == "capacity" else []
    out = subprocess.run(
        [sys.executable, "-m", f"experiments.{launcher}", *flags, "--noplot", f"--output_dir={tmp_path / 'out'}"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads((tmp_path / "out" / "run.json").read_text())
    assert set(info["compiled"]) >= {"simulator", "network", "heap", "policy"}, info.get("compiled")
