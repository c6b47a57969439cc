"""Small launcher defects found in session 36 (each test fails without its fix)."""

from __future__ import annotations

import os

from test_fix18_launchers import _launch

from experiments.bench_store import file_system_of


# ---- bench_store: a --root that did not exist ------------------------------------------------------------------------
def test_file_system_of_names_the_mount_a_path_is_on(tmp_path):
    mount, fstype = file_system_of(str(tmp_path))
    assert os.path.ismount(mount) and os.path.realpath(tmp_path).startswith(mount)
    assert fstype != "unknown"  # (Linux: /proc/mounts lists every mount point)
    assert file_system_of("/proc/self") == ("/proc", "proc")


def test_bench_store_says_which_file_system_a_root_it_made_is_on(tmp_path):
    """`--root=/mnt/3fs/bench` on a host without that mount made the directory on the local disk and measured it,
    without a word. Contract: a --root the benchmark had to make is a warning naming the mount point and file system
    it is on."""
    root = tmp_path / "mnt" / "3fs" / "bench"
    out = _launch(
        "-m", "experiments.bench_store", f"--root={root}", "--layouts=deepseek_v3_fp8", "--total_mb=1", "--repeats=1",
        "--cold_blocks=0", "--threads=1",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    mount, fstype = file_system_of(str(tmp_path))
    said = [line for line in out.stderr.splitlines() if line.startswith("W") and "--root=" in line]
    assert len(said) == 1 and said[0].endswith(
        f"--root={root} did not exist: made it; it is on the file system mounted at {mount} ({fstype}): the benchmark "
        "measures that"
    ), out.stderr[-3000:]
