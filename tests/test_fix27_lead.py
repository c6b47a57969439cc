"""Session 44, the lead's fixes: a turn that generates 0 tokens has no first token; the driver keeps the last model
ops; the compilation cache bounded (and still filling); a closed LocalCluster; an interrupted run names its kept
store; simulate.main turns the collector back on."""

import math
import os

from dualpath_jax import metrics
from dualpath_jax.sim import load_sim_config
from dualpath_jax.sim.runner import build_simulator
from dualpath_jax.workloads.types import Trajectory, Turn

TINY = "configs/sim_tiny.py"


def _record(gen: int, first: float, finished: float = 3.0) -> metrics.TurnRecord:
    return metrics.TurnRecord(
        trajectory_id=0, turn_index=0, prompt_tokens=100, hit_tokens=0, gen_tokens=gen, arrival=0.0,
        first_token=first, finished=finished,
    )  # fmt: skip


def test_a_zero_token_turn_gets_no_first_token_in_the_simulator():
    trajs = [Trajectory(0, [Turn(500, 0), Turn(40, 3)]), Trajectory(1, [Turn(300, 4)])]
    records, _, stats = build_simulator(load_sim_config(f"{TINY}:dualpath"), trajs).run()
    assert stats["unfinished_turns"] == 0
    zero = [r for r in records if r.gen_tokens == 0]
    assert len(zero) == 1 and math.isnan(zero[0].first_token) and not math.isnan(zero[0].finished)
    assert all(not math.isnan(r.first_token) for r in records if r.gen_tokens > 0)
    assert metrics.summarize(records)["turns_without_first_token"] == 0


def test_metrics_leave_a_zero_token_turn_out_of_ttft_and_the_slo():
    recs = [_record(0, math.nan), _record(4, 0.5), _record(4, 2.0)]
    s = metrics.summarize(recs)
    assert s["turns_without_first_token"] == 0 and s["ttft_p50_s"] == 1.25
    slo = metrics.slo_summary(recs, ttft_s=1.0, tpot_s=10.0, percentile=50)
    assert slo["slo_turns"] == 2 and slo["slo_attainment"] == 0.5  # (it was 1 of 3: the 0-token turn a miss)
    # a turn that should have produced a token and did not is still counted and missed
    late = [*recs, _record(2, math.nan, finished=math.nan)]
    assert metrics.summarize(late)["turns_without_first_token"] == 1
    assert metrics.slo_summary(late, ttft_s=1.0, tpot_s=10.0, percentile=50)["slo_attainment"] == 1 / 3


def test_driver_prepare_reuses_the_last_model_ops_of_the_same_model(tmp_path, base, monkeypatch):
    """A loop of `driver.run(cfg)` rebuilt the model and recompiled every run (soak audit, session 44: 5-7 s a run
    instead of 0.3 s, +8-30 MB a run): `prepare` keeps the last ops for the same model, seed, numerics and checkpoint
    files; another model, seed, a rewritten checkpoint or `release_model()` gets new ones."""
    import dataclasses

    import conftest

    from dualpath_jax.runtime import driver
    from dualpath_jax.runtime.model_ops import ModelOps

    # (the tests' conftest shares one ModelOps per model across tests: here every build is a new one, as for a user)
    monkeypatch.setattr(ModelOps, "of_config", classmethod(conftest._of_config))
    cfg = base
    driver.release_model()
    _, ops = driver.prepare(cfg)
    assert driver.prepare(cfg)[1] is ops
    other = driver.prepare(dataclasses.replace(cfg, model_seed=cfg.model_seed + 1))[1]
    assert other is not ops and driver.prepare(cfg)[1] is not ops  # (one kept: the last)
    kept = driver.prepare(cfg)[1]
    driver.release_model()
    assert driver.prepare(cfg)[1] is not kept
    given = driver.prepare(cfg, model_ops=ops)[1]
    assert given is ops and driver.prepare(cfg)[1] is not ops  # (ops one passes are not kept)
    # a checkpoint directory rewritten between runs: its files are in the key
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    key = driver._ops_key(dataclasses.replace(cfg, model=str(ckpt)))
    (ckpt / "model.safetensors").write_bytes(b"x")
    assert driver._ops_key(dataclasses.replace(cfg, model=str(ckpt))) != key
    # ... also where a copy tool keeps the size and the modification time (cp -p, rsync -a): the inode and ctime move
    key = driver._ops_key(dataclasses.replace(cfg, model=str(ckpt)))
    st = (ckpt / "model.safetensors").stat()
    (ckpt / "new").write_bytes(b"y")
    os.replace(ckpt / "new", ckpt / "model.safetensors")
    os.utime(ckpt / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert driver._ops_key(dataclasses.replace(cfg, model=str(ckpt))) != key
    driver.release_model()


def test_the_persistent_compilation_cache_is_bounded(tmp_path, monkeypatch):
    """It grew without bound (every new model, shape or bucket set added entries): 4 GiB unless
    $DUALPATH_JAX_CACHE_MAX_BYTES says otherwise (-1: none); a bad value is named before anything is turned on."""
    import jax
    import pytest

    from models.jax_cache import DEFAULT_MAX_BYTES, enable_persistent_compilation_cache

    keys = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
        "jax_compilation_cache_max_size",
    )
    before = {k: getattr(jax.config, k) for k in keys}
    try:
        monkeypatch.delenv("DUALPATH_JAX_CACHE_MAX_BYTES", raising=False)
        enable_persistent_compilation_cache(str(tmp_path / "a"))
        assert jax.config.jax_compilation_cache_max_size == DEFAULT_MAX_BYTES == 4 << 30
        monkeypatch.setenv("DUALPATH_JAX_CACHE_MAX_BYTES", "-1")
        enable_persistent_compilation_cache(str(tmp_path / "b"))
        assert jax.config.jax_compilation_cache_max_size == -1
        for bad in ("0", "4G", "-2"):
            monkeypatch.setenv("DUALPATH_JAX_CACHE_MAX_BYTES", bad)
            with pytest.raises(ValueError, match=f"DUALPATH_JAX_CACHE_MAX_BYTES='{bad}'"):
                enable_persistent_compilation_cache(str(tmp_path / "c"))
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "b") and not (tmp_path / "c").exists()
    finally:
        for k, v in before.items():
            jax.config.update(k, v)


def test_a_closed_local_cluster_holds_no_descriptors(base):
    """`LocalCluster.close()` left each node's pipe end and its Process's sentinel pipe open until the object was
    collected (soak audit: +3 descriptors per node for every closed session a caller keeps); a second close (`with`
    after an explicit one) is a no-op."""
    from dualpath_jax.runtime import driver
    from dualpath_jax.runtime.launcher import LocalCluster

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()  # (started by a first spawn and kept: its pipe is not the cluster's)
    before = fds()
    cluster = LocalCluster(driver.layout_groups(base.replace(launcher="local"))[:1])
    assert fds() > before
    cluster.close()
    assert fds() == before and all(c.closed for c in cluster.conns.values())
    cluster.close()
    import pytest

    with pytest.raises(RuntimeError, match="this LocalCluster was closed: start a new one"):  # (not a bare ValueError)
        cluster.launcher(base.replace(launcher="local"))


def test_an_interrupted_run_names_the_kv_store_it_keeps(tmp_path):
    """Interrupted before any policy finished, with a kept runtime.store_dir: it said "nothing written" while the
    run's fresh store subdirectory stays (the soak audit: 81-100 blocks, consistent and reusable): it names it."""
    from test_fix12_runtime import _STUB_WARMUP_INTERRUPTED, _launch

    results, store = tmp_path / "results", tmp_path / "store"
    out = _launch("-c", _STUB_WARMUP_INTERRUPTED, "run", str(results), "1", f"--config.runtime.store_dir={store}")
    assert out.returncode == 1, out.stderr[-2000:]
    (kept,) = os.listdir(store)
    last = out.stderr.rstrip().splitlines()[-1]
    assert last == (
        f"interrupted (Ctrl-C) before any policy finished; no results written; its KV store is kept in {store / kept}"
    ), last


_SIMULATE_MAIN_IN_PROCESS = """
import gc, sys
from absl import flags
from experiments import simulate
flags.FLAGS(["simulate", "--config=configs/sim_tiny.py:dualpath,agents=2,turns=2", "--output_dir=" + sys.argv[1],
             "--noplot", "--noprogress"])
simulate.main([])
print("gc enabled after main:", gc.isenabled())
"""


def test_simulate_main_turns_the_collector_back_on(tmp_path):
    """`experiments.simulate.main` turned the cyclic garbage collector off for its run and never back on (the soak
    audit: a notebook calling it ran on without the collector)."""
    from test_fix12_runtime import _launch

    out = _launch("-c", _SIMULATE_MAIN_IN_PROCESS, str(tmp_path / "sim"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "gc enabled after main: True" in out.stdout


_CACHE_FILLS = """
import os, sys
if sys.argv[2] == "hide-filelock":
    sys.modules["filelock"] = None  # (as on an install without it: before jax imports it)
import jax, jax.numpy as jnp
from models.jax_cache import enable_persistent_compilation_cache
enable_persistent_compilation_cache(sys.argv[1])
jax.jit(lambda x: jnp.sin(x) * 3 + 1)(jnp.arange(7.0)).block_until_ready()
print("entries:", len(os.listdir(sys.argv[1])), "bound:", jax.config.jax_compilation_cache_max_size)
"""


def test_the_bounded_compilation_cache_stores_executables(tmp_path, monkeypatch):
    """The review of session 44: with the 4 GiB bound set, jax cached nothing at all where `filelock` is missing (it
    enforces a bound with it only; a tiny model's second start took 7.1 s instead of 2.5 s). filelock is a dependency
    now; without it the bound is dropped with a warning, and the cache still fills."""
    from test_fix12_runtime import _launch

    monkeypatch.delenv("DUALPATH_JAX_CACHE_MAX_BYTES", raising=False)
    for mode, bound in (("as-installed", 4 << 30), ("hide-filelock", -1)):
        out = _launch("-c", _CACHE_FILLS, str(tmp_path / mode), mode, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        entries = int(out.stdout.split("entries:")[1].split()[0])
        assert entries > 0 and f"bound: {bound}" in out.stdout, (mode, out.stdout, out.stderr[-1000:])
        assert (mode == "hide-filelock") == ("needs the 'filelock' package" in out.stderr)
