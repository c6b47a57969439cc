"""The audit of a researcher who is not root (fix30 "nonroot"): what another user's files, a read-only HOME, a checkout
owned by someone else, an installed wheel or a non-UTF-8 locale did to a run. Each test fails on the code it audited
(ecf65b0 / decea19); the report (notes/fix30_nonroot_report.md) has the commands and a proposed patch.

Root ignores file modes, so "this user cannot write it" is a chmod for a user and `chattr +i` for root (`_read_only`;
skips where the file system has no immutable flag)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import types

import pytest
from test_fix29_concfix_runtime import _gone_pid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def _read_only(path):
    """`path` (a file or a directory) as this process finds another user's: not writable."""
    if os.geteuid() != 0:
        mode = os.stat(path).st_mode
        os.chmod(path, 0o555 if os.path.isdir(path) else 0o444)
        try:
            yield
        finally:
            os.chmod(path, mode)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("root ignores file modes, and chattr +i is refused here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def _held_by_another_open(path) -> bool:
    """Whether a lock on `path` is held now, as another process's probe sees it (a new open file, LOCK_NB)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_the_tests_netns_lock_is_taken_on_a_lock_file_another_user_made(tmp_path, monkeypatch):
    """/tmp/dualpath_jax_tests_netns.lock made by root's test run (0644): a user's `pytest` errored in the 14 tests
    of test_netns_cluster.py / test_fix24_deployfix.py (PermissionError at conftest.py's open(..., "a")) where they
    skip for root's sake. flock(2) needs no write access: the lock is taken on a read-only descriptor."""
    import conftest

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    lock = tmp_path / "dualpath_jax_tests_netns.lock"
    lock.touch()
    with _read_only(lock):
        with conftest._netns_host_lock():
            assert _held_by_another_open(lock)
        assert not _held_by_another_open(lock)


def test_a_store_keeper_sees_another_run_on_a_keepers_lock_another_user_made(tmp_path):
    """A bounded store shared by two users (a group directory, umask 022): keepers.lock is the first user's 0644, the
    second user's keeper could not open it for writing, held no lock and warned of nothing while both kept their
    capacity in one directory. It is held shared on a read-only descriptor, and the second run is warned."""
    from dualpath_jax.runtime.scheduler_service import KEEPERS_LOCK, StoreKeeper

    (tmp_path / KEEPERS_LOCK).touch()
    store = types.SimpleNamespace(root=str(tmp_path), capacity_bytes=1 << 20)
    with _read_only(tmp_path / KEEPERS_LOCK):
        first = StoreKeeper(store)
        second = StoreKeeper(store)
        try:
            assert second.shared_with_another_run
        finally:
            second._release_keepers_lock()
            first._release_keepers_lock()


@pytest.mark.parametrize("where", ["home", "cache"])
def test_a_compilation_cache_this_user_cannot_write_is_a_warning_not_a_crash(tmp_path, monkeypatch, caplog, where):
    """home: HOME read-only (a locked-down account, HOME=/ in a batch job): `experiments.run` died with a traceback
    (PermissionError at jax_cache.py's os.makedirs) before anything ran. cache: $DUALPATH_JAX_CACHE a directory root
    made (a shared cache): jax warned at every compile that it could neither read nor write an entry (its .lockfile
    is root's), and the run compiled everything. Either way: one warning naming the directory and
    $DUALPATH_JAX_CACHE, and the cache is not turned on."""
    import jax

    from models import jax_cache

    updates = []
    monkeypatch.setattr(jax.config, "update", lambda name, value: updates.append(name))
    top = tmp_path / "ro"
    top.mkdir()
    (top / ".lockfile").touch()
    cache = top / ".cache" / "dualpath_jax" / "xla" if where == "home" else top
    with _read_only(top / ".lockfile"), _read_only(top):
        with caplog.at_level(logging.WARNING, logger=jax_cache.__name__):
            jax_cache.enable_persistent_compilation_cache(str(cache))
    assert "jax_compilation_cache_dir" not in updates
    assert str(cache) in caplog.text and "DUALPATH_JAX_CACHE" in caplog.text, caplog.text


def test_a_cache_entry_of_another_user_in_ones_own_cache_is_removed(tmp_path, monkeypatch):
    """`sudo -E python -m experiments.run --config.runtime.netns=true` (a netns run needs root; HOME kept) wrote
    root's 0644 entries into the user's ~/.cache/dualpath_jax/xla: every later run of the user warned "Error reading
    persistent compilation cache entry ... PermissionError" per program (jax updates KEY-atime on each read) and
    compiled them again, run after run. The directory is the user's: such entries are removed once, at enable."""
    from models import jax_cache

    for key in ("mine", "roots"):
        (tmp_path / f"jit_step-{key}-cache").write_bytes(b"x")
        (tmp_path / f"jit_step-{key}-atime").write_bytes(b"12345678")
    roots = tmp_path / "jit_step-roots-atime"
    if os.geteuid() != 0:
        roots.chmod(0o444)
    else:  # (root writes any file: os.access answers as for the user)
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(roots) else real(p, mode, **kw))
    assert jax_cache.remove_orphaned_entries(str(tmp_path)) == ["jit_step-roots-cache"]
    assert sorted(os.listdir(tmp_path)) == [".lockfile", "jit_step-mine-atime", "jit_step-mine-cache"]


def test_the_cleanup_says_removed_only_of_what_it_removed(tmp_path, caplog):
    """Another user's dead run's store in /tmp (sticky: not removable by this user): `remove_stores_of_killed_runs`
    logged "removed ..." and returned it at every run, while it stayed (rmtree(ignore_errors=True))."""
    from dualpath_jax.runtime import driver

    store = tmp_path / f"dualpath_store_{_gone_pid()}_x"
    (store / "blocks").mkdir(parents=True)
    (store / "blocks" / "b").write_bytes(b"x")
    with _read_only(store / "blocks"):
        with caplog.at_level(logging.INFO, logger=driver.__name__):
            removed = driver.remove_stores_of_killed_runs(str(tmp_path))
    assert store.exists()
    assert removed == [] and "removed" not in caplog.text, (removed, caplog.text)


def test_run_json_says_why_git_gave_no_commit(tmp_path, monkeypatch):
    """A checkout owned by another user (a bind mount in a container run as root, a shared lab checkout): git refuses
    it ("detected dubious ownership"), and run.json's git said only `CalledProcessError: ... exit status 128`. The
    error carries git's own line, which names the fix (safe.directory)."""
    from dualpath_jax import metrics

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "git"
    fake.write_text("#!/bin/sh\necho \"fatal: detected dubious ownership in repository at '$3'\" >&2\nexit 128\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    checkout = tmp_path / "checkout"
    (checkout / ".git").mkdir(parents=True)
    state = metrics.git_state(str(checkout))
    assert state["commit"] is None and "dubious ownership" in state["error"], state


def test_a_config_file_of_the_installed_package_is_found_from_another_directory(tmp_path):
    """Installed as a wheel and run from another directory, README's `--config=configs/sim_tiny.py` was `bad config:
    OSError: Failed loading config file: [Errno 2] No such file or directory: 'configs/sim_tiny.py'`, and nothing
    said the configs are installed (site-packages/configs/). Here the package's own configs/ stands in for the
    installed one (PYTHONPATH, the cwd elsewhere)."""
    env = {**os.environ, "PYTHONPATH": REPO}
    out = subprocess.run(
        [sys.executable, "-m", "experiments.simulate", "--config=configs/sim_tiny.py", "--noprogress", "--noplot",
         f"--output_dir={tmp_path / 'out'}", "--config.workload.n_agents=2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0 or os.path.join(REPO, "configs") in out.stderr, out.stderr[-2000:]


def test_a_non_utf8_locale_with_a_non_ascii_package_path_is_one_line_naming_the_fix(tmp_path):
    """LANG=en_US.ISO-8859-1 (here: LC_ALL=C with PYTHONUTF8=0 PYTHONCOERCECLOCALE=0, an ASCII file system encoding)
    and a checkout under a non-ASCII path (~/thèse/dp): jax's first compile raised `RuntimeError: std::bad_cast` deep
    in ModelRunner (the source file names jax passes to XLA), a traceback that names neither the locale nor the
    path. (LC_ALL=C alone is fine: Python then runs in UTF-8 mode.)"""
    link = tmp_path / "thèse"
    link.symlink_to(REPO)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONUTF8"))}
    env.update(LC_ALL="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", PYTHONPATH=str(link))
    out = subprocess.run(
        [sys.executable, "-m", "experiments.run", f"--config={link}/configs/tiny_runtime.py:test",
         "--config.runtime.workload.agents=1", "--config.runtime.workload.turns=1", "--config.plot=False",
         f"--config.results_dir={tmp_path / 'results'}"],
        cwd=tmp_path, env=env, capture_output=True, timeout=300,
    )  # fmt: skip
    err = out.stderr.decode(errors="replace")
    assert "Traceback" not in err, err[-3000:]  # (RuntimeError: std::bad_cast)
    assert out.returncode == 0 or "PYTHONUTF8=1" in err, err[-3000:]
