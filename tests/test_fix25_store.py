"""Fix wave 25 "storefix" (session 42's shared-store audit): what a kept KV store directory says. experiments.run
names each policy's store subdirectory (log, results.json, run.json) and warns when --config.runtime.store_dir is
itself a store; the local_dir store names what differs in a layout mismatch and an empty STORE.json; the driver
logs what a kept store_dir holds and uses a read-only store (hits only); launcher='ray' reads with preadv. Each test
failed on the code before its fix."""

from __future__ import annotations

import json
import logging
import os
import types

import numpy as np
import pytest
from absl import flags

from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.store import LocalDirStore, local_dir

_FP = "Qwen2ForCausalLM/L4/gqa[2x2x16]/float32/baac26ba2f62d272/w7f7d2c181c12c6f2"


def _layout(block_tokens=16, fingerprint=_FP) -> BlockLayout:
    return BlockLayout(4, block_tokens, 256, fingerprint)


def _store_with_blocks(root, layout, n: int) -> None:
    s = LocalDirStore(str(root), layout)
    for i in range(n):
        assert s.write(bytes([i]) * 16, np.full(layout.full_block_nbytes, i, np.uint8))
    s.close()


# ---- 4 + 5: the local_dir store's messages -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout, says",
    [
        (_layout(block_tokens=32), "(differs in block_tokens: 16 here, 32 asked)"),
        (_layout(fingerprint=_FP.replace("float32", "bfloat16")), "(differs in fingerprint part 'float32' here, "
         "'bfloat16' asked)"),
        (_layout(fingerprint=_FP.replace("w7f7", "wc32")), "(differs in fingerprint part 'w7f7d2c181c12c6f2' here, "
         "'wc32d2c181c12c6f2' asked (the weights' digest: another checkpoint or model_seed))"),
    ],
)  # fmt: skip
def test_a_layout_mismatch_names_what_differs(tmp_path, layout, says):
    LocalDirStore(str(tmp_path), _layout()).close()
    with pytest.raises(ValueError, match="holds blocks of") as e:
        LocalDirStore(str(tmp_path), layout)
    assert says in str(e.value)


def test_an_empty_store_json_says_so_and_what_to_do(tmp_path):
    LocalDirStore(str(tmp_path), _layout()).close()
    (tmp_path / "STORE.json").write_text("")
    with pytest.raises(ValueError) as e:
        LocalDirStore(str(tmp_path), _layout())
    assert str(e.value).startswith(f"store metadata {tmp_path}/STORE.json is empty (0 B): restore it from a copy")


# ---- 1 + 2: experiments.run names each policy's store and warns about a store given as store_dir --------------------


@pytest.fixture
def job(monkeypatch, tmp_path):
    """experiments.run in this process on stand-in runs (as test_fix24_faultfix's `job`), config `:test` with
    `store_dir`; returns the results directory."""
    from configs.tiny_runtime import get_config
    from dualpath_jax.runtime import driver, launcher
    from experiments import run

    def go(store_dir: str):
        c = get_config("test")
        c.results_dir, c.plot, c.calibrate, c.warmup = str(tmp_path / "res"), False, False, False
        c.runtime.store_dir = store_dir
        monkeypatch.setattr(run, "config_or_exit", lambda flag: c)
        monkeypatch.setattr(flags.FLAGS[run._CONFIG.name], "_override_values", {}, raising=False)
        monkeypatch.setattr(run, "refuse_unused_workload_overrides", lambda flag: None)
        monkeypatch.setattr(launcher, "enable_compilation_cache", lambda: None)
        monkeypatch.setattr(driver, "prepare", lambda cfg, *a, **k: ([types.SimpleNamespace(turns=[0, 1])] * 8, None))
        s = {"jct_s": 2.0, "pe_read_bytes": 1, "de_read_bytes": 0, "snic_max_over_avg": 1.5, "link_bytes": {}}
        res = types.SimpleNamespace(summary=s, records=[], links=[], requeued=0, schedule_time_s=0.0, node_stats={},
                                    startup_s=0.0, tokens={(0, 0): [1, 2]}, dead_nodes={})  # fmt: skip
        monkeypatch.setattr(driver, "run", lambda cfg, ts, **kw: res)
        run.main(["run"])
        (d,) = list((tmp_path / "res").iterdir())
        return d

    return go


def test_each_policys_store_subdirectory_is_logged_and_in_the_results(job, tmp_path, caplog):
    store = tmp_path / "kv"
    with caplog.at_level(logging.INFO):
        d = job(str(store))
    made = {p: str(store / f"{d.name}-{p}") for p in ("basic", "dualpath")}
    assert all(os.path.isdir(v) for v in made.values())
    assert json.loads((d / "results.json").read_text())["store_dirs"] == made
    assert json.loads((d / "run.json").read_text())["store_dirs"] == made
    assert f"basic: KV store in {made['basic']} (fresh)" in caplog.text
    assert "is itself a KV store" not in caplog.text


def test_a_store_given_as_store_dir_warns_that_none_of_its_blocks_are_read(job, tmp_path, caplog):
    store = tmp_path / "kv"
    _store_with_blocks(store, _layout(), 2)  # (a store the driver API filled, say)
    with caplog.at_level(logging.INFO):
        job(str(store))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        f"--config.runtime.store_dir {str(store)!r} is itself a KV store" in w
        and "reads none of its blocks" in w
        and "`driver.run` with `RuntimeConfig.store_dir`" in w
        for w in warned
    ), warned


# ---- 9 + 6: the driver on a kept store_dir ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared():
    """(the :test RuntimeConfig, its trajectories, its ModelOps): built once."""
    from configs.tiny_runtime import get_config
    from dualpath_jax.runtime import driver
    from dualpath_jax.runtime.config import RuntimeConfig

    cfg = RuntimeConfig.from_config_dict(get_config("test").runtime)
    trajs, ops = driver.prepare(cfg)
    return cfg, trajs, ops


def _dead_pid() -> int:
    for pid in range(4_000_000, 4_100_000):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            continue
    pytest.skip("no free pid found")


def test_prepare_logs_the_blocks_a_kept_store_holds_and_the_temp_files_it_removed(prepared, tmp_path, caplog):
    from dualpath_jax.runtime import driver
    from dualpath_jax.runtime.node import block_layout

    cfg, trajs, ops = prepared
    cfg = cfg.replace(store_dir=str(tmp_path))
    _store_with_blocks(tmp_path, block_layout(cfg, ops), 3)
    fan = next(p for p in (tmp_path / "blocks").iterdir() if p.is_dir())
    tmp = fan / f"{local_dir._TMP_PREFIX}{local_dir._host_id()}.{_dead_pid()}.abcd.{'01' * 16}"
    tmp.write_bytes(b"x")  # (a dead writer's temp file)
    with caplog.at_level(logging.INFO, logger="dualpath_jax.runtime.driver"):
        driver.prepare(cfg, trajs, ops)
    assert not tmp.exists()
    assert (
        f"config.store_dir {str(tmp_path)!r}: holds 3 blocks of this model (kept: a run hits them); removed 1 temp "
        "files of dead writers" in caplog.text
    )


def test_prepare_uses_a_store_it_cannot_write_with_a_warning_and_refuses_another_directory(
    prepared, tmp_path, monkeypatch, caplog
):
    """Root writes anyway: the directories are chmod'ed read-only and os.access answers as for another user."""
    from dualpath_jax.runtime import driver
    from dualpath_jax.runtime.config import ConfigError
    from dualpath_jax.runtime.node import block_layout

    cfg, trajs, ops = prepared
    store, plain = tmp_path / "store", tmp_path / "plain"
    _store_with_blocks(store, block_layout(cfg, ops), 2)
    plain.mkdir()
    real = os.access

    def access(path, mode, **kw):
        if os.path.realpath(path) in (str(store), str(plain)) and mode & os.W_OK:
            return False
        return real(path, mode, **kw)

    monkeypatch.setattr(os, "access", access)
    for d in (store, plain):
        d.chmod(0o555)
    try:
        with caplog.at_level(logging.WARNING, logger="dualpath_jax.runtime.driver"):
            driver.prepare(cfg.replace(store_dir=str(store)), trajs, ops)
        assert f"config.store_dir {str(store)!r} is not writable by this process: its KV store is used read-only (hits" \
            in caplog.text  # fmt: skip
        with pytest.raises(ConfigError, match="is not writable"):
            driver.prepare(cfg.replace(store_dir=str(plain)), trajs, ops)
    finally:
        for d in (store, plain):
            d.chmod(0o755)


# ---- 7: launcher='ray' reads a local_dir store with preadv unless store_options choose --------------------------------


def test_ray_reads_the_store_with_preadv_unless_store_options_choose(prepared, monkeypatch, tmp_path):
    import dualpath_jax.store
    from dualpath_jax.runtime import launcher

    cfg = prepared[0].replace(store_dir=str(tmp_path))
    ray = cfg.replace(launcher="ray")
    assert launcher.default_read_method(ray) == "preadv"
    assert launcher.default_read_method(cfg) is None  # (inprocess: the store's default, mmap)
    assert launcher.default_read_method(ray.replace(store_options={"read_method": "mmap"})) is None
    seen = []
    monkeypatch.setattr(dualpath_jax.store, "make_store", lambda options, layout: seen.append(options))
    launcher.open_store(ray, None)
    launcher.open_store(ray.replace(store_options={"read_method": "mmap"}), None)
    launcher.open_store(cfg, None)
    assert [o.get("read_method") for o in seen] == ["preadv", "mmap", None]
