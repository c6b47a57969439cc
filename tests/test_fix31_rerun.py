"""Fix wave 31, "rerun" audit: does run.json's "what ran" reproduce what ran? (failing tests handed to the lead)

Each test is a gap the audit found (/work/notes/fix31_rerun_report.md): an input that changes the results but is
not recorded (one's own policy file, the config file, a module a setup imports, PYTHONPATH), or a `rerun` line that
does not run (a benchmark run as a script).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
from test_fix14_repro import REPO, _env

# A policy of one's own (as README "A policy of one's own"): SIDE decides which side reads the hit, so an edit of
# this file changes the results.
_POLICY = """
import dataclasses

from schedulers import POLICIES, Assignment, InterEnginePolicy

SIDE = "de"


@POLICIES.register("fix31_least_loaded")
class LeastLoaded(InterEnginePolicy):
    @dataclasses.dataclass(frozen=True)
    class Config:
        pass

    def __init__(self, config):
        self.config = config

    def schedule(self, snapshot, queue, fetching_node=None):
        s = snapshot.copy()
        out = []
        pes, des = s.engines_of("prefill"), s.engines_of("decode")
        for r in queue:
            fit = [d for d in des if d.free_hbm_tokens >= r.total_tokens]
            if not fit:
                break
            pe, de = min(pes, key=lambda e: e.tok), min(fit, key=lambda e: e.tok)
            pe.tok += r.prompt_tokens
            de.tok += r.total_tokens
            de.free_hbm_tokens -= r.total_tokens
            out.append(Assignment(r.request_id, pe.engine_id, de.engine_id, SIDE, 1.0 if SIDE == "de" else 0.0))
        return out
"""

# A setup of one's own that takes its numbers from a module of its own (as a config file importing configs.sim_tiny)
_BASE = """
from configs.sim_tiny import get_config as _tiny

SNIC_GBPS = 50.0


def get_config(variant=""):
    c = _tiny(variant)
    c.cluster.snic_gbps = SNIC_GBPS
    return c
"""


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _in(cwd, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m args` run from `cwd` (a researcher's own directory: its modules import from there)."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=env or {**_env(), "PYTHONPATH": REPO},
        check=False,
    )


@pytest.fixture(scope="module")
def own_policy_run(tmp_path_factory):
    """A simulation of one's own policy from one's own config file, in one's own directory."""
    tmp = tmp_path_factory.mktemp("own")
    (tmp / "my_policies.py").write_text(_POLICY)
    (tmp / "my_config.py").write_text("import my_policies  # noqa: F401\n\nfrom configs.sim_tiny import get_config\n")
    done = _in(
        tmp,
        "experiments.simulate",
        "--config=my_config.py:agents=4,turns=2",
        "--config.scheduler.name=fix31_least_loaded",
        "--output_dir=out",
        "--noplot",
        "--noprogress",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp


def test_simulate_records_the_digest_of_ones_own_policy_file(own_policy_run):
    """What is wrong: simulate's run.json names the policy but not its source: after an edit of my_policies.py the
    `rerun` line gives other results (turns.csv differs) and its run.json is the same as the first one's but for the
    times and the output directory, so nothing tells. The sweep records it (`policy_file`, `policy_sha256`)."""
    text = (own_policy_run / "out" / "run.json").read_text()
    assert _sha256(own_policy_run / "my_policies.py") in text


def test_simulate_records_the_digest_of_its_config_file(own_policy_run):
    """What is wrong: the `rerun` line names the config file (`--config=my_config.py:...`) but run.json holds no
    digest of it: an edited file runs silently (the sweep's rows carry `setup_sha256`)."""
    text = (own_policy_run / "out" / "run.json").read_text()
    assert _sha256(own_policy_run / "my_config.py") in text


def test_capacity_records_its_setup_files_digest(tmp_path):
    """What is wrong: capacity's run.json and capacity.json record the searches as variant strings only (no resolved
    config, no digest of the setup file): after an edit of the setup the `rerun` line searches another cluster and
    both files read as before but for the probes' figures."""
    (tmp_path / "tinybase.py").write_text(_BASE)
    (tmp_path / "setup.py").write_text("from tinybase import get_config  # noqa: F401\n")
    done = _in(
        tmp_path,
        "experiments.capacity",
        "--setups=setup.py",
        "--modes=basic",
        "--lo=0.05",
        "--hi=0.4",
        "--iters=0",
        "--extra=duration=40,warmup=10",
        "--noplot",
        "--output_dir=cap",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = (tmp_path / "cap" / "run.json").read_text() + (tmp_path / "cap" / "capacity.json").read_text()
    assert _sha256(tmp_path / "setup.py") in text


def test_sweep_resume_refuses_a_cell_whose_setup_imports_an_edited_module(tmp_path):
    """What is wrong: a sweep's `setup_sha256` covers the setup file's own bytes, not the module of one's own it
    takes its numbers from: after an edit of that module (SNIC 50 -> 0.5 Gbps) `--resume` keeps the earlier cell and
    runs the new one on the edited cluster, one table of two clusters (jct_s_vs_basic compares them), said nowhere."""
    (tmp_path / "tinybase.py").write_text(_BASE)
    (tmp_path / "setup.py").write_text("from tinybase import get_config  # noqa: F401\n")
    grid = ["experiments.sweep", "--setups=setup.py", "--loads=agents=4", "--output_dir=out", "--noplot"]
    first = _in(tmp_path, *grid, "--modes=basic")
    assert first.returncode == 0, first.stderr[-3000:]
    (tmp_path / "tinybase.py").write_text(_BASE.replace("SNIC_GBPS = 50.0", "SNIC_GBPS = 0.5"))
    resumed = _in(tmp_path, *grid, "--modes=basic,dualpath", "--resume")
    assert resumed.returncode != 0, "the kept basic cell of the unedited module was mixed with the edited one's"
    assert "tinybase.py" in resumed.stderr + resumed.stdout


def test_run_json_records_pythonpath(monkeypatch, tmp_path):
    """What is wrong: PYTHONPATH decides which modules run (a policy or store module of one's own "on PYTHONPATH" as
    the README says; a scratch build's copy of the package), but run.json's `env` leaves it out: the `rerun` line from
    a fresh shell fails (`bad config: ModuleNotFoundError: No module named 'my_policies'`) or runs other code."""
    from dualpath_jax import clock, metrics

    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    info = metrics.run_info("experiments.simulate", clock.now(), output_dir=str(tmp_path / "out"))
    assert info["env"].get("PYTHONPATH") == str(tmp_path)
    assert f"PYTHONPATH={tmp_path}" in info["rerun"]


def test_a_benchmark_run_as_a_script_gets_a_rerun_line_that_runs(tmp_path):
    """What is wrong: a benchmark run as a file (`python experiments/bench_store.py ...`, which runs) records
    `command` and `rerun` as `python -m bench_store ...` (`experiments._write_run_info_beside` takes the module from
    the script's file name): pasted, it fails with "No module named bench_store"."""
    out = tmp_path / "rows.json"
    args = ["--layouts=deepseek_v3_fp8", "--total_mb=1", "--repeats=1", "--threads=1", "--cold_blocks=0"]
    done = subprocess.run(
        [sys.executable, os.path.join("experiments", "bench_store.py"), *args, f"--root={tmp_path}", f"--out={out}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**_env(), "PYTHONPATH": REPO},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((tmp_path / "rows.run.json").read_text())
    again = subprocess.run(
        info["rerun"], shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=120, env=_env()
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "rows.rerun.json").is_file()
