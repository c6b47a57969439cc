"""Proposed tests (report fix29_concurrent): two launches into one output directory at once; an orphaned entry in the
JAX compilation cache. Each fails on the code of 27f884b."""

import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*args: str, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def _when_made(path: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until `proc` made `path` (its writable check, just before it runs), failing if it ended first."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} not made"
        time.sleep(0.05)


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)


LONG_SWEEP = ["experiments.sweep", "--setups=configs/sim_tiny.py", "--modes=basic", "--loads=aps=1",
              "--extra=duration=30000", "--workers=1", "--noplot"]  # fmt: skip
LONG_CAPACITY = ["experiments.capacity", "--modes=basic", "--iters=5", "--extra=duration=30000", "--lo=0.5",
                 "--workers=1", "--noplot"]  # fmt: skip
LONG_SIMULATE = ["experiments.simulate", "--config=configs/sim_tiny.py:basic,aps=1,duration=30000", "--noplot",
                 "--noprogress"]  # fmt: skip


@pytest.mark.parametrize(
    "first, second",
    [
        (LONG_SWEEP, ["experiments.sweep", "--setups=configs/sim_tiny.py", "--modes=oracle", "--loads=aps=0.2",
                      "--workers=1", "--noplot"]),
        (LONG_SWEEP, [*LONG_SWEEP, "--resume"]),
        (LONG_CAPACITY, ["experiments.capacity", "--modes=oracle", "--iters=0", "--workers=1", "--noplot"]),
        (LONG_SIMULATE, ["experiments.simulate", "--config=configs/sim_tiny.py:dualpath", "--noplot", "--noprogress"]),
    ],
    ids=["sweep", "sweep-resume", "capacity", "simulate"],
)  # fmt: skip
def test_a_second_launch_into_a_directory_a_running_one_writes_is_refused(tmp_path, first, second):
    out = str(tmp_path / "out")
    a = _launch(*first, f"--output_dir={out}")
    err = tmp_path / "second.err"
    try:
        _when_made(out, a)
        with open(err, "w") as f:
            b = subprocess.Popen([sys.executable, "-m", *second, f"--output_dir={out}"], cwd=REPO, stdout=f, stderr=f)
        # refused: it exits at once; today it runs (a progress bar, "simulating ...") and writes where `a` writes
        deadline = time.monotonic() + 120
        while b.poll() is None and not any(m in err.read_text() for m in ("0%|", "simulating ")):
            assert time.monotonic() < deadline, err.read_text()[-2000:]
            time.sleep(0.05)
        began = b.poll() is None
        if began:
            b.kill()
        b.wait(60)
        assert a.poll() is None, "the first launch ended before the second one ran: no overlap"
        assert not began and b.returncode != 0, err.read_text()[-2000:]
        assert out in err.read_text() and "another" in err.read_text(), err.read_text()[-2000:]
    finally:
        _stop(a)


ORPHAN_CHECK = """
import os, sys
from models.jax_cache import enable_persistent_compilation_cache
d = enable_persistent_compilation_cache()
import jax, jax.numpy as jnp
jax.jit(lambda x: jnp.sin(x) * 3.0)(jnp.float32(0.5)).block_until_ready()
print(sorted(n for n in os.listdir(d) if n.startswith("jit__lambda") and n.endswith("-cache")))
import filelock
filelock.FileLock(os.path.join(d, ".lockfile"), timeout=0).acquire()  # (not left held: jax's lock waits on it)
"""


def test_an_orphaned_compilation_cache_entry_does_not_stop_the_cache_storing(tmp_path):
    """A job killed between jax's write of KEY-cache and of KEY-atime (or a job with DUALPATH_JAX_CACHE_MAX_BYTES=-1,
    which writes no -atime) left KEY-cache alone: every later bounded job's writes failed with FileNotFoundError."""
    cache = tmp_path / "xla"
    cache.mkdir()
    (cache / "jit_killed-0123-cache").write_bytes(b"torn")  # (no jit_killed-0123-atime)
    out = subprocess.run(
        [sys.executable, "-c", ORPHAN_CHECK], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "DUALPATH_JAX_CACHE": str(cache), "PYTHONPATH": REPO},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() != "[]", "the new executable was not stored: " + out.stderr[-1500:]
    assert "Error writing persistent compilation cache entry" not in out.stderr
