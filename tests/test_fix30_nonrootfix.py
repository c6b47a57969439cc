"""Leftovers of the nonroot audit. A netns run's control socket under a long $TMPDIR: a Unix socket path holds
107 bytes, and the run failed with "AF_UNIX path too long" (F9); the launcher puts the socket's directory under /tmp
then. The compilation cache's default under $XDG_CACHE_HOME (F10)."""

import os
import shutil
import tempfile

import pytest

from dualpath_jax.runtime import launcher
from dualpath_jax.runtime.control import ControlServer
from dualpath_jax.runtime.driver import held_temp_dir


def test_a_long_temp_dir_puts_the_control_socket_under_tmp(tmp_path, monkeypatch):
    long_tmp = tmp_path / ("t" * 60) / ("é" * 20)
    long_tmp.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(long_tmp))
    prefix = f"dpj-control-{os.getpid()}-"
    naive = os.path.join(str(long_tmp), prefix + "x" * 8, "control")
    assert len(os.fsencode(naive)) > launcher.UNIX_PATH_MAX
    with pytest.raises(OSError, match="too long"):  # what the run met before
        ControlServer(lambda *a: None, b"k" * 16, unix_path=naive).close()
    assert launcher.control_dir_parent(prefix, "/tmp") is None  # a short one: the temp directory itself
    parent = launcher.control_dir_parent(prefix)
    assert parent == "/tmp"
    path, fd = held_temp_dir(prefix, parent)
    try:
        server = ControlServer(lambda *a: None, b"k" * 16, unix_path=os.path.join(path, "control"))
        server.close()
    finally:
        os.close(fd)
        shutil.rmtree(path)


@pytest.mark.parametrize(
    "xdg, expected",
    [
        (None, "~/.cache/dualpath_jax/xla"),
        ("/srv/cache", "/srv/cache/dualpath_jax/xla"),
        ("rel", "~/.cache/dualpath_jax/xla"),
    ],
)
def test_the_compilation_cache_follows_xdg_cache_home(monkeypatch, xdg, expected):
    """An XDG_CACHE_HOME set elsewhere was ignored (nonroot audit F10); a relative one is not a base directory."""
    from models import jax_cache

    if xdg is None:
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    assert jax_cache.default_cache_dir() == expected


_STUB_PREPARE_CRASHES = """
import sys
from absl import app
from dualpath_jax.runtime import driver
from experiments import parse_flags_or_exit
from experiments import run as job

def crash(*a, **k):
    raise RuntimeError("std::bad_cast")  # (jax's crash in a non-UTF-8 locale, F3; any crash while the model is built)

driver.prepare = crash
sys.argv = [sys.argv[0], "--config=configs/tiny_runtime.py:test", "--config.results_dir=" + sys.argv[1]]
app.run(job.main, flags_parser=parse_flags_or_exit)
"""


def test_a_crash_while_the_model_is_built_leaves_no_empty_results_directory(tmp_path):
    """Only a bad config (ConfigError) dropped the results directory the launcher had just made: any other error while
    the model was built (F3's std::bad_cast) left it empty behind (nonroot audit F10). Its traceback stays."""
    from test_fix12_runtime import _launch

    results = tmp_path / "made" / "results"
    out = _launch("-c", _STUB_PREPARE_CRASHES, str(results))
    assert out.returncode == 1, out.stderr[-2000:]
    assert "RuntimeError: std::bad_cast" in out.stderr
    assert not (tmp_path / "made").exists()


def test_a_results_directory_of_another_user_is_named_with_its_owner(tmp_path, monkeypatch):
    """`sudo -E` for the netns run made results/ root's in one's own checkout: later runs said only "cannot write there
    (Permission denied)" (nonroot audit F10). The refusal names the owner (here: this process seen as another user)."""
    import errno
    import pwd

    import experiments

    results = tmp_path / "results"
    results.mkdir()
    denied = PermissionError(errno.EACCES, "Permission denied")
    assert experiments._why(str(results), denied) == "Permission denied"  # (this user's own: nothing more)
    owner = pwd.getpwuid(os.stat(results).st_uid).pw_name
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(results).st_uid + 1)
    assert (
        experiments._why(str(results / "x" / "y"), denied) == f"Permission denied, {str(results)!r} is owned by {owner}"
    )


def test_the_netns_script_named_in_errors_exists_from_another_directory(tmp_path):
    """Installed as a wheel and run from another directory, the netns errors named `experiments/netns_cluster.sh`,
    a file not there (and the wheel did not install it: setup.cfg's package_data now does; nonroot audit F4)."""
    import subprocess
    import sys

    from test_fix12_runtime import REPO

    code = "from dualpath_jax.runtime import netns; print(netns.SCRIPT)"
    env = {**os.environ, "PYTHONPATH": REPO}
    elsewhere = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    script = elsewhere.stdout.strip()
    assert os.path.isabs(script) and os.path.isfile(script), elsewhere.stderr[-2000:]
    here = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert here.stdout.strip() == "experiments/netns_cluster.sh"  # (as the README writes it, from a checkout)


def test_the_handlers_above_progress_bars_are_made_with_ctrl_c_held_back(monkeypatch):
    """A real SIGINT in the warm-up (test_fix12_runtime) printed a traceback at exit once (a fresh-clone CI run,
    2026-12-07): it had landed inside `logging.Handler.__init__` of `logs_above_bars`'s wrappers, between the handler's
    registration and its lock, and logging.shutdown failed on the lockless handler. They are made with SIGINT and
    SIGTERM blocked now (delivered after)."""
    import logging
    import signal

    import experiments

    masks = []
    create_lock = logging.Handler.createLock

    def recording(self):
        masks.append(signal.pthread_sigmask(signal.SIG_BLOCK, set()))
        create_lock(self)

    monkeypatch.setattr(logging.Handler, "createLock", recording)
    root = logging.getLogger()
    if not root.handlers:
        monkeypatch.setattr(root, "handlers", [logging.NullHandler()])
    masks.clear()
    with experiments.logs_above_bars():
        pass
    assert masks and all({signal.SIGINT, signal.SIGTERM} <= m for m in masks), masks
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, set())  # (given back)
