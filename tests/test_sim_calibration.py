"""The simulator's calibrated parameters (configs/sim_base.py CALIBRATED) and the calibration's loss."""

import math

import pytest

from configs.sim_base import CALIBRATED
from dualpath_jax.sim import load_sim_config
from dualpath_jax.sim.config import GB, resolve_de_hbm
from dualpath_jax.sim.runner import de_hbm_kv_bytes, make_cost_model
from experiments.reproduce_paper import TABLE, rms_log, table_fit


def _derived_gb(cfg) -> float:
    return de_hbm_kv_bytes(cfg, make_cost_model(cfg, "decode")) / GB


def test_de_hbm_reserve_is_subtracted_from_the_derived_kv_space():
    cfg = load_sim_config("configs/paper_ds660b.py")
    reserve = CALIBRATED["de_hbm_reserve_gb"]
    assert reserve > 0
    bare = load_sim_config("configs/paper_ds660b.py", {"cluster.de_hbm_reserve_gb": 0.0})
    assert bare.cluster.de_hbm_kv_gb == 0.0  # left to the runner: 0.9 * HBM - weights
    assert cfg.cluster.de_hbm_kv_gb == pytest.approx(_derived_gb(bare) - reserve)
    # the same reserve on another DE count: the weights per DE change with the EP degree, the reserve does not
    wide = load_sim_config("configs/paper_ds660b.py:pd=2P8D")
    wide_bare = load_sim_config("configs/paper_ds660b.py:pd=2P8D", {"cluster.de_hbm_reserve_gb": 0.0})
    assert wide.cluster.de_hbm_kv_gb == pytest.approx(_derived_gb(wide_bare) - reserve)
    assert wide.cluster.de_hbm_kv_gb > cfg.cluster.de_hbm_kv_gb


def test_explicit_de_hbm_kv_wins_over_the_reserve():
    cfg = load_sim_config("configs/paper_ds660b.py", {"cluster.de_hbm_kv_gb": 12.5})
    assert cfg.cluster.de_hbm_kv_gb == 12.5


def test_bad_reserves_are_clear_errors():
    with pytest.raises(ValueError, match="de_hbm_reserve_gb must be >= 0"):
        load_sim_config("configs/paper_ds660b.py", {"cluster.de_hbm_reserve_gb": -1.0})
    with pytest.raises(ValueError, match="de_hbm_reserve_gb = 1000.0 GB leaves no DE HBM"):
        load_sim_config("configs/paper_ds660b.py", {"cluster.de_hbm_reserve_gb": 1000.0})


def test_every_paper_config_builds_with_the_calibration():
    for spec in ("configs/paper_ds660b.py", "configs/paper_ds27b.py", "configs/paper_qwen32b.py"):
        cfg = load_sim_config(spec)
        assert cfg.cluster.pe_time_scale == CALIBRATED["pe_time_scale"]
        kv = cfg.cluster.de_hbm_kv_gb
        assert kv == 0.0 or kv > 0, spec
        assert resolve_de_hbm(cfg) is cfg  # idempotent once resolved


def test_rms_log_loss():
    assert rms_log([1.0, 1.0]) == 0.0
    assert rms_log([math.e, 1 / math.e]) == pytest.approx(1.0)
    assert rms_log([2.0]) == pytest.approx(math.log(2.0))
    with pytest.raises(ValueError, match="positive"):
        rms_log([1.0, 0.0])
    with pytest.raises(ValueError, match="positive"):
        rms_log([])
    text = table_fit({"oracle": [1.0, 1.0], "dualpath": [math.e], "basic": []})
    assert text == "oracle 0.000, dualpath 1.000, all 0.577 (3 cells)"


def test_calibration_table_is_the_paper_table():
    assert len(TABLE) == 12
    for (agents, ds), (oracle, dualpath, basic) in TABLE.items():
        assert agents in (512, 1024, 2048, 4096) and ds in ("32K", "48K", "64K")
        assert basic > dualpath * 0.99 and basic > oracle  # basic is the slowest column in every row


def test_runner_applies_the_reserve_to_configs_built_directly():
    """A SimConfig made in code (not through sim_config_from_dict) still gets the reserve from the runner."""
    import dataclasses

    bare = load_sim_config("configs/paper_ds660b.py", {"cluster.de_hbm_reserve_gb": 0.0})
    direct = dataclasses.replace(bare, cluster=dataclasses.replace(bare.cluster, de_hbm_reserve_gb=10.0))
    assert _derived_gb(direct) == pytest.approx(_derived_gb(bare) - 10.0)


def test_scale_config_keeps_the_2p4d_ep_groups():
    """48P96D runs EP groups of 2 PE / 4 DE nodes: same weights and DE KV space per engine as 2P4D."""
    small = load_sim_config("configs/paper_ds660b.py")
    scale = load_sim_config("configs/paper_scale.py")
    assert scale.cluster.de_hbm_kv_gb == pytest.approx(small.cluster.de_hbm_kv_gb)
    for role in ("prefill", "decode"):
        assert make_cost_model(scale, role).ep == make_cost_model(small, role).ep
    one_group = load_sim_config("configs/paper_scale.py", {"cluster.decode_ep_nodes": 0})
    assert make_cost_model(one_group, "decode").ep == 96 * 8
    assert one_group.cluster.de_hbm_kv_gb > scale.cluster.de_hbm_kv_gb  # fewer weights per GPU in one EP 768
    with pytest.raises(ValueError, match="decode_ep_nodes must be >= 0"):
        load_sim_config("configs/paper_scale.py", {"cluster.decode_ep_nodes": -1})
