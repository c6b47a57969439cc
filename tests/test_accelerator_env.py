"""Node processes of one host share its accelerators (`launcher.accelerator_sharing_env`): JAX preallocates 75% of a
GPU's memory in every process by default, so of the main job's node processes (and its driver, which calibrates on
the same GPU) only the first could start on a one-GPU host. The launchers spawn them with
`XLA_PYTHON_CLIENT_PREALLOCATE=false` unless the user chose an allocator setting. (Checked here on XLA:CPU, where
the variable changes nothing: what is tested is what a spawned node process gets.)"""

from __future__ import annotations

import multiprocessing as mp
import os

from dualpath_jax.runtime import launcher


def _report_env(conn) -> None:
    conn.send({k: os.environ.get(k) for k in launcher.XLA_ALLOCATOR_VARS})


def _spawned_env() -> dict:
    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    with launcher._node_process_env():
        p = ctx.Process(target=_report_env, args=(theirs,))
        p.start()
    try:
        return mine.recv()
    finally:
        p.join(30)


def test_node_processes_are_spawned_without_preallocation_and_this_ones_env_is_restored(monkeypatch):
    for v in launcher.XLA_ALLOCATOR_VARS:
        monkeypatch.delenv(v, raising=False)
    assert launcher.accelerator_sharing_env() == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    seen = _spawned_env()
    assert seen["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert "XLA_PYTHON_CLIENT_PREALLOCATE" not in os.environ, "the launcher's own environment was left changed"


def test_a_users_allocator_setting_stands(monkeypatch):
    for v in launcher.XLA_ALLOCATOR_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.3")
    assert launcher.accelerator_sharing_env() == {}
    assert _spawned_env() == {
        "XLA_PYTHON_CLIENT_PREALLOCATE": None,
        "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.3",
        "XLA_PYTHON_CLIENT_ALLOCATOR": None,
    }
    assert launcher.accelerator_sharing_env({"XLA_PYTHON_CLIENT_PREALLOCATE": "true"}) == {}
