"""Small launcher defects found in session 36 (each test fails without its fix)."""

from __future__ import annotations

import os

import pytest
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


# ---- reproduce_paper: a capacity at a search bound ------------------------------------------------------------------
def test_reproduce_paper_reports_a_capacity_at_a_search_bound_as_one(tmp_path):
    """A capacity search whose lowest probe missed the SLO returns capacity 0 (below `lo`), one whose highest met it
    returns `hi`: the report printed `| online capacity DS 660B basic (APS) | 0.2 | 0 | 0.000 |`, a measured-looking 0,
    and a gain of nan or of hi over a capacity. Contract: a bound reads as `experiments.capacity` prints it ("< lo",
    ">= hi"), and a gain over a bound is no measured gain."""
    from test_mutation_audit3_workloads import _FAKE_REPRODUCE

    bounds = """
def fake_capacity(args):
    setup, mode = args[0].rsplit("/", 1)[-1], args[1]
    if setup == "paper_ds660b.py":  # basic: even lo=0.05 missed; DualPath: hi=0.8 met
        return {"capacity_aps": 0.0, "upper_aps": 0.05} if mode == "basic" else {"capacity_aps": 0.8}
    return {"capacity_aps": 0.25, "upper_aps": 0.3} if mode == "basic" else {"capacity_aps": 0.5, "upper_aps": 0.6}
"""
    head, tail = _FAKE_REPRODUCE.split("def fake_capacity(args):")
    script = tmp_path / "fake_reproduce.py"
    script.write_text(head + bounds + tail[tail.index("rp._offline") :])
    out = _launch(str(script), f"--output_dir={tmp_path}", "--online", "--noplot")
    assert out.returncode == 0, out.stderr[-2000:]
    report = (tmp_path / "report.md").read_text()
    for row in [
        "| online capacity DS 660B basic (APS) | 0.2 | < 0.05 (a search bound) | n/a |",
        "| online capacity DS 660B DualPath (APS) | 0.45 | >= 0.8 (a search bound) | n/a |",
        "| online capacity gain DS 660B | 2.25x | n/a (a search bound) | n/a |",
        "| online capacity DS 27B basic (APS) | 0.3 | 0.25 | 0.833 |",
        "| online capacity gain DS 27B | 1.67x | 2x | 1.198 |",
    ]:
        assert row in report, report


# ---- sim configs: overrides and variant items the run does not use ---------------------------------------------------
TINY = "configs/sim_tiny.py"
MOONCAKE = "../shared/traces/mooncake_synthetic_trace.jsonl.gz"


def test_a_dataset_item_beside_kind_trace_is_refused_by_name():
    """`kind=trace,dataset=48K` ran the trace and dropped the dataset without a word (`dataset=` was not among the
    variant items `check_given_fields` knows)."""
    from dualpath_jax.sim import load_sim_config

    with pytest.raises(ValueError, match=r"^config variant item 'dataset=48K' \(config.workload.dataset\) applies to"):
        load_sim_config(f"{TINY}:kind=trace,dataset=48K", {"workload.trace_path": MOONCAKE}, as_run=True)
    assert load_sim_config(f"{TINY}:kind=offline,dataset=48K", as_run=True).workload.dataset == "48K"


@pytest.mark.parametrize(
    "override, says",
    [
        ({"cluster.snic_gbps": True}, "override cluster.snic_gbps=True is a bool; the field holds 50.0"),
        ({"cluster.snic_gbps": "fast"}, "override cluster.snic_gbps='fast': "),
    ],
    ids=["bool_for_a_number", "str_for_a_number"],
)
def test_a_python_override_of_the_wrong_type_is_refused_by_name(override, says):
    """`load_sim_config(spec, {"cluster.snic_gbps": True})` ran with a 1 GB/s storage NIC (ml_collections casts a
    bool to a float field), and a str for a number was a bare TypeError; a right-typed override still loads."""
    from dualpath_jax.sim import load_sim_config

    with pytest.raises(ValueError) as e:
        load_sim_config(TINY, override)
    assert str(e.value).startswith(f"config {TINY!r}: {says}")
    cfg = load_sim_config(f"{TINY}:pe_only", {"cluster.snic_gbps": 3, "cluster.layerwise": False})
    assert cfg.cluster.snic_gbps == 3.0 and cfg.cluster.layerwise is False


# ---- runtime: a policy's α / β of 0, a batcher's unused cost fields -------------------------------------------------
def test_an_alpha_or_beta_of_0_is_this_clusters_as_when_left_unset(base):
    """`policy.alpha_tokens=0` / `beta_tokens=0` stayed 0 in the runtime, and DualPathConfig took 0 for the paper's DS
    660B on H800 values (β ~17x this tiny cluster's: Algorithm 1's cap off); the simulator fills 0 as unset."""
    from dualpath_jax.runtime import driver

    cfg = base.replace(**{"scheduler.name": "dualpath"})
    unset = driver.policy_kwargs(cfg, 1024, 2000.0)
    zero = driver.policy_kwargs(
        cfg.replace(**{"scheduler.policy_kwargs": {"alpha_tokens": 0, "beta_tokens": 0}}), 1024, 2000.0
    )
    assert zero == unset and unset["beta_tokens"] == 10_000
    given = driver.policy_kwargs(cfg.replace(**{"scheduler.policy_kwargs": {"beta_tokens": 7}}), 1024, 2000.0)
    assert given["beta_tokens"] == 7


@pytest.mark.parametrize("field, value", [("model", "qwen2.5-32b"), ("hardware", "h800")])
def test_a_compute_quota_model_or_hardware_the_runtime_does_not_use_is_refused(base, field, value):
    """The runtime's compute_quota batcher prices batches with the run's own model on this CPU
    (`launcher.batcher_kwargs`): `batcher_kwargs={"model": "qwen2.5-32b"}` was checked by name and then ignored."""
    from dualpath_jax.runtime.config import ConfigError, validate

    cfg = base.replace(**{"scheduler.batcher": "compute_quota", "scheduler.batcher_kwargs": {field: value}})
    with pytest.raises(ConfigError, match=rf"^config.scheduler.batcher_kwargs.{field}='{value}' is not used: "):
        validate(cfg)
    validate(base.replace(**{"scheduler.batcher": "compute_quota", "scheduler.batcher_kwargs": {"quota_s": 0.5}}))


# ---- bench_runtime: kill -9 during DualPath's run keeps basic's measurement -----------------------------------------
_STUB_BENCH_KILL = """
import os, signal, sys, types
from absl import app
from dualpath_jax.runtime import driver
from experiments import parse_flags_or_exit

def fake_run(cfg, ts, **kw):
    if cfg.scheduler.name == "dualpath":
        os.kill(os.getpid(), signal.SIGKILL)
    s = {"jct_s": 2.0, "pe_read_bytes": 1, "de_read_bytes": 0, "snic_max_over_avg": 1.5, "link_bytes": {}}
    return types.SimpleNamespace(summary=s, records=[], links=[], slo=None, tokens={})

driver.prepare = lambda cfg, *a, **k: ([types.SimpleNamespace(turns=[0, 1])] * 8, None)
driver.measure_prefill_tokens_per_s = lambda ops, cfg: 1000.0
driver.run = fake_run
from experiments import bench_runtime as job
sys.argv = [sys.argv[0], "--config=configs/tiny_runtime.py:test", "--config.results_dir=" + sys.argv[1],
            "--skip_sim", "--skip_overhead"]
app.run(job.main, flags_parser=parse_flags_or_exit)
"""


def test_bench_runtime_killed_during_dualpath_keeps_basics_measurement(tmp_path):
    """bench_runtime.json was written at the very end only: a job killed hard (kill -9, the OOM killer) while
    DualPath ran left an empty results directory, basic's measured run lost. Contract: written (atomically) once basic
    is measured, its `failed` saying DualPath's run is missing; the final write replaces it."""
    import json
    import signal

    out = _launch("-c", _STUB_BENCH_KILL, str(tmp_path / "results"))
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    (run_dir,) = (tmp_path / "results").iterdir()
    assert sorted(os.listdir(run_dir)) == ["bench_runtime.json"]  # (no temp file)
    written = json.loads((run_dir / "bench_runtime.json").read_text())
    assert list(written["measured"]) == ["basic"] and written["measured"]["basic"]["jct_s"] == 2.0
    assert written["failed"].startswith("incomplete: written when basic had finished")


# ---- runtime: the temporary KV store of a run killed hard ----------------------------------------------------------
def test_the_temporary_store_of_a_killed_run_is_removed_by_the_next_run(tmp_path):
    """`driver.run` without `store_dir` makes a temporary store and removes it at its end; a job killed hard (kill -9,
    the OOM killer) left it in /tmp, gigabytes for a real model, for good. Contract: the next run removes the stores
    of runs whose process is gone, and keeps a live process's (another job's) and anything else."""
    import subprocess
    import sys

    from dualpath_jax.runtime import driver

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    for name in (f"dualpath_store_{dead_pid}_ab12", f"dualpath_store_{os.getppid()}_cd34", "dualpath_store_x1y2"):
        (tmp_path / name / "blocks").mkdir(parents=True)
    (tmp_path / f"dualpath_store_{dead_pid}_file").write_text("not a store")  # (a file: not ours to remove)
    assert driver.remove_stores_of_killed_runs(str(tmp_path)) == [str(tmp_path / f"dualpath_store_{dead_pid}_ab12")]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"dualpath_store_{os.getppid()}_cd34", "dualpath_store_x1y2", f"dualpath_store_{dead_pid}_file"]
    )
    # a netns run's control-socket directory (its driver SIGKILLed): removed the same way (session 42: left for good)
    (tmp_path / f"dpj-control-{dead_pid}-ab_1").mkdir()
    (tmp_path / f"dpj-control-{os.getppid()}-cd_2").mkdir()
    assert driver.remove_stores_of_killed_runs(str(tmp_path)) == [str(tmp_path / f"dpj-control-{dead_pid}-ab_1")]
    assert (tmp_path / f"dpj-control-{os.getppid()}-cd_2").is_dir()


# ---- runtime: heartbeats across a wall-clock step ------------------------------------------------------------------
def test_a_wall_clock_step_declares_no_node_dead():
    """Heartbeats ran on the wall clock: a step of it (an NTP step, a VM resumed) longer than heartbeat_timeout_s
    declared every node dead at once, and their requests re-ran. Contract: silence is measured on a monotonic clock
    (an injected clock, the tests', is still used for both)."""
    import time

    from test_misc_hunt8 import _service

    from dualpath_jax.runtime.control import GroupReport
    from dualpath_jax.runtime.scheduler_service import GroupSpec

    groups = [GroupSpec(0, "prefill", [0]), GroupSpec(1, "decode", [1])]
    svc = _service(groups, heartbeat_timeout_s=5.0)
    for g in groups:
        svc.fetch(GroupReport(g.node_id, g.role, g.engine_ids, address={e: "a" for e in g.engine_ids}, stats={}))
    wall = time.time() + 3600.0  # the wall clock (the service's default `clock`, time.time) jumps an hour ahead
    svc.clock = lambda: wall
    assert svc.check_heartbeats() == [] and not svc.dead_nodes


def test_a_directory_given_as_a_sim_config_is_named_as_one():
    """`--config=configs` (a directory) said "config file 'configs' ... does not exist"."""
    from dualpath_jax.sim import load_sim_config

    with pytest.raises(FileNotFoundError, match=r"^config file 'configs' \(from 'configs:basic'\) is a directory"):
        load_sim_config("configs:basic")
