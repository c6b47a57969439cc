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
