"""Fix wave 24 "faultfix" (session 41's faults audit): experiments.run's ending under faults, and the local_dir store's
messages. `experiments.run` runs in this process on stand-in runs (no model, `driver.run` replaced): a store directory
that turns read-only between policies, a failure before any policy finished, a second Ctrl-C or SIGTERM while the
results are written or --config.reference computes, a full results disk, the failed line printed once. Each test
failed on the code before its fix."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import sys
import types

import numpy as np
import pytest
from absl import flags

from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.store import LocalDirStore, local_dir

_STORE_GONE = "bad --config.runtime.store_dir '{d}': cannot write there (Read-only file system)"


def _result(dead: dict | None = None):
    s = {"jct_s": 2.0, "pe_read_bytes": 1, "de_read_bytes": 0, "snic_max_over_avg": 1.5, "link_bytes": {}}
    return types.SimpleNamespace(summary=s, records=[], links=[], requeued=3 if dead else 0, schedule_time_s=0.0,
                                 node_stats={}, startup_s=0.0, tokens={(0, 0): [1, 2]}, dead_nodes=dead or {})  # fmt: skip


@pytest.fixture
def job(monkeypatch, tmp_path):
    """`go(fake_run, **config)`: experiments.run in this process on `fake_run(cfg, trajs)` (`driver.run`'s stand-in),
    config `:test` with the fields given; returns (exit line or None, its results directory or None)."""
    from configs.tiny_runtime import get_config
    from dualpath_jax.runtime import driver, launcher
    from experiments import run

    def go(fake_run, **fields):
        c = get_config("test")
        c.results_dir, c.plot, c.calibrate, c.warmup = str(tmp_path / "res"), False, False, False
        for k, v in fields.items():
            node, *path = k.split("__")
            target = c
            for p in [node, *path][:-1]:
                target = target[p]
            target[[node, *path][-1]] = v
        monkeypatch.setattr(run, "config_or_exit", lambda flag: c)
        # (no --config.* overrides; another launcher imported into this pytest process after experiments.run, e.g.
        # experiments.simulate, defines --config anew, unparsed: its override_values raised UnparsedFlagError)
        monkeypatch.setattr(flags.FLAGS[run._CONFIG.name], "_override_values", {}, raising=False)
        monkeypatch.setattr(run, "refuse_unused_workload_overrides", lambda flag: None)
        monkeypatch.setattr(launcher, "enable_compilation_cache", lambda: None)
        monkeypatch.setattr(driver, "prepare", lambda cfg, *a, **k: ([types.SimpleNamespace(turns=[0, 1])] * 8, None))
        monkeypatch.setattr(driver, "run", lambda cfg, ts, **kw: fake_run(cfg, ts))
        code = None
        try:
            run.main(["run"])
        except SystemExit as e:
            code = e.code
        except KeyboardInterrupt:  # (raised out of the job: pytest would stop every test after this one)
            pytest.fail("a Ctrl-C / SIGTERM escaped experiments.run as a KeyboardInterrupt (a traceback)")
        dirs = list((tmp_path / "res").iterdir())
        assert len(dirs) <= 1
        return code, (dirs[0] if dirs else None)

    return go


def _files(d) -> list[str]:
    return sorted(os.listdir(d))


# ---- 2: a SystemExit (a store directory it cannot make) in a later policy keeps the finished ones ------------------


def test_a_store_directory_refused_in_a_later_policy_keeps_the_finished_policys_results(job, monkeypatch, tmp_path):
    from experiments import run

    store = tmp_path / "store"
    real = run.fresh_dir_or_exit

    def fresh(parent, name, what):  # (the store directory remounted read-only once basic finished)
        if name.endswith("-dualpath"):
            raise SystemExit(_STORE_GONE.format(d=parent))
        return real(parent, name, what)

    monkeypatch.setattr(run, "fresh_dir_or_exit", fresh)
    code, d = job(lambda cfg, ts: _result(), runtime__store_dir=str(store))
    line = f"run failed: {_STORE_GONE.format(d=store)} (results of basic only, not of dualpath)"
    assert code == line
    assert _files(d) == ["results.json", "run.json", "table.txt", "turns_basic.json"]
    assert json.loads((d / "results.json").read_text())["failed"] == line
    assert (d / "table.txt").read_text().rstrip().splitlines()[-1] == line


# ---- 4 + 8: a failure before any policy finished says "nothing written"; runtime fields as the flags name them -----


def test_a_run_failed_before_any_policy_finished_says_nothing_written_and_names_the_flag(job):
    from dualpath_jax.runtime.scheduler_service import RunFailed

    def fake_run(cfg, ts):
        raise RunFailed("run did not finish within 1.0 s (9/32 turns; config.run_timeout_s)")

    code, d = job(fake_run)
    assert (
        code
        == "run failed: run did not finish within 1.0 s (9/32 turns; config.runtime.run_timeout_s); nothing written"
    )
    assert d is None


def test_a_run_failed_after_a_policy_finished_names_the_flag(job):
    from dualpath_jax.runtime.scheduler_service import RunFailed

    def fake_run(cfg, ts):
        if cfg.scheduler.name == "dualpath":
            raise RunFailed("engine groups did not all start within 5 s (config.run_timeout_s)")
        return _result()

    code, d = job(fake_run)
    assert code == (
        "run failed: engine groups did not all start within 5 s (config.runtime.run_timeout_s) "
        "(results of basic only, not of dualpath)"
    )
    assert json.loads((d / "results.json").read_text())["failed"] == code


# ---- 5: a Ctrl-C / SIGTERM after the policies' loop: noted, everything written ------------------------------------


def test_a_second_ctrl_c_while_the_results_are_written_loses_nothing(job, monkeypatch):
    from dualpath_jax import metrics

    real = metrics.write_run_info

    def write_run_info(*a, **k):  # (the second Ctrl-C of an impatient user, as the last file is written)
        os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    def fake_run(cfg, ts):
        if cfg.scheduler.name == "dualpath":
            raise KeyboardInterrupt  # (the first Ctrl-C)
        return _result()

    monkeypatch.setattr(metrics, "write_run_info", write_run_info)
    code, d = job(fake_run)
    assert code == "interrupted (results of basic only, not of dualpath)"
    assert _files(d) == ["results.json", "run.json", "table.txt", "turns_basic.json"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # (put back)


@pytest.mark.parametrize("sig, by", [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
def test_an_interrupted_reference_is_not_compared_and_everything_is_written(job, monkeypatch, sig, by):
    from experiments import run

    def reference_tokens(base, trajs, ops):
        os.kill(os.getpid(), sig)
        return {(0, 0): np.array([1, 2])}  # (reached where the signal was only noted)

    monkeypatch.setattr(run, "reference_tokens", reference_tokens)
    code, d = job(lambda cfg, ts: _result(), reference=True)
    assert _files(d) == ["results.json", "run.json", "table.txt", "turns_basic.json", "turns_dualpath.json"]
    table = (d / "table.txt").read_text()
    assert "reference interrupted: not compared" in table and by in table
    assert "basic equal" not in table
    summary = json.loads((d / "results.json").read_text())
    assert summary["failed"] is None and "not_compared" in summary["greedy_tokens"]["reference"]
    stopped = "interrupted (Ctrl-C)" if by == "Ctrl-C" else "stopped by SIGTERM"
    assert code == f"{stopped} after every policy finished; the results are in {d}"


# ---- 6: a full results disk at the end: one line, no traceback --------------------------------------------------


def test_a_full_disk_at_the_final_writes_is_one_line_naming_what_is_there(job, monkeypatch):
    from experiments import run

    real = run.write_results_json

    def write_results_json(out_dir, summary):
        if not str(summary["failed"]).startswith("incomplete"):  # (the final one: the disk is full by now)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(out_dir, summary)

    monkeypatch.setattr(run, "write_results_json", write_results_json)
    code, d = job(lambda cfg, ts: _result())
    assert isinstance(code, str), code
    assert code.startswith(f"cannot write the results in {d} (No space left on device): ")
    assert "written turns_basic.json, turns_dualpath.json; not written results.json, table.txt, run.json" in code
    assert "its results.json is the one written while the policies ran" in code  # (its "killed" is not so)
    assert _files(d) == ["results.json", "turns_basic.json", "turns_dualpath.json"]


# ---- 9: turns_<policy>.json says which nodes its run lost -------------------------------------------------------


def test_turns_json_records_the_nodes_lost_and_the_requests_rerun(job):
    def fake_run(cfg, ts):
        return _result({1: "its process or thread exited"} if cfg.scheduler.name == "dualpath" else None)

    code, d = job(fake_run)
    assert code is None
    dual = json.loads((d / "turns_dualpath.json").read_text())
    basic = json.loads((d / "turns_basic.json").read_text())
    assert (dual["dead_nodes"], dual["requeued"]) == ({"1": "its process or thread exited"}, 3)
    assert (basic["dead_nodes"], basic["requeued"]) == ({}, 0)


# ---- 11: the failed line once where stdout and stderr are one terminal -----------------------------------------


@pytest.mark.parametrize("shared", [True, False])
def test_the_failed_line_is_under_the_printed_table_only_where_stdout_goes_apart(job, monkeypatch, capsys, shared):
    from dualpath_jax.runtime.scheduler_service import RunFailed
    from experiments import run

    def fake_run(cfg, ts):
        if cfg.scheduler.name == "dualpath":
            raise RunFailed("no live prefill or decode engine left")
        return _result()

    monkeypatch.setattr(run, "shares_stderr", lambda: shared)
    code, d = job(fake_run)
    assert code == "run failed: no live prefill or decode engine left (results of basic only, not of dualpath)"
    assert (code in capsys.readouterr().out) is not shared  # (the exit prints it on stderr)
    assert (d / "table.txt").read_text().rstrip().splitlines()[-1] == code


def test_shares_stderr_compares_where_the_two_streams_go(monkeypatch, tmp_path):
    from experiments.run import shares_stderr

    with open(tmp_path / "a", "w") as a, open(tmp_path / "b", "w") as b:
        monkeypatch.setattr(sys, "stdout", a)
        monkeypatch.setattr(sys, "stderr", a)
        assert shares_stderr()
        monkeypatch.setattr(sys, "stderr", b)
        assert not shares_stderr()


# ---- local_dir: 1a (STORE.json not written), 7 (one warning per spell of failed writes) ----------------------------

_LAYOUT = BlockLayout(num_layers=2, block_tokens=4, bytes_per_token_per_layer=8, fingerprint="fix24/bf16")


def _block(i: int) -> tuple[bytes, np.ndarray]:
    return bytes([i]) * 16, np.full(_LAYOUT.full_block_nbytes, i, np.uint8)


def test_a_store_whose_metadata_cannot_be_written_names_the_path_and_the_cause(monkeypatch, tmp_path):
    def dump(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")  # (a full disk opens pending: test_fix28_exhaustfix)

    monkeypatch.setattr(local_dir.json, "dump", dump)
    with pytest.raises(OSError) as e:
        LocalDirStore(tmp_path / "kv", _LAYOUT)
    assert e.value.errno == errno.EROFS
    assert str(tmp_path / "kv" / "STORE.json") in str(e.value) and "Read-only file system" in str(e.value)
    assert os.listdir(tmp_path / "kv") == ["blocks"]  # (no temp file left behind)


def _warnings(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "writing block" in r.getMessage()
    ]


def test_writes_failing_for_one_cause_log_once_per_spell_and_count_each(monkeypatch, tmp_path, caplog):
    store = LocalDirStore(tmp_path / "kv", _LAYOUT)
    real = store._write_file

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    caplog.set_level(logging.DEBUG, logger="dualpath_jax.store.local_dir")
    monkeypatch.setattr(store, "_write_file", read_only)
    assert not any(store.write(*_block(i)) for i in range(3))
    assert len(_warnings(caplog)) == 1 and "counted (stats write_errors)" in _warnings(caplog)[0]
    monkeypatch.setattr(store, "_write_file", real)
    assert store.write(*_block(3))  # (the spell ends)
    monkeypatch.setattr(store, "_write_file", read_only)
    assert not store.write(*_block(4))
    assert len(_warnings(caplog)) == 2
    assert store.stats().write_errors == 4


def test_writes_into_a_removed_store_directory_log_once(tmp_path, caplog):
    store = LocalDirStore(tmp_path / "kv", _LAYOUT)
    shutil.rmtree(tmp_path / "kv" / "blocks")
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.store.local_dir"):
        assert not any(store.write(*_block(i)) for i in range(3))
    (line,) = _warnings(caplog)
    assert "is gone (removed or moved away)" in line
    assert store.stats().write_errors == 3
