"""Defects found by the fourth simulator hunt of 2026-12-03 (each test failed before its fix):
- summary.json recorded the config as given, not as it ran: a `:basic` run said `scheduler.name: dualpath` beside
  `mode: basic`;
- a switch of the cluster (layerwise, io_free, writeback, cnic_duplex, decode_lockstep) set to a string in code ran
  as true ("false" included)."""

import dataclasses
import json
import subprocess
import sys

import pytest

from dualpath_jax.sim import load_sim_config
from dualpath_jax.sim.config import validate_sim_config
from dualpath_jax.sim.runner import build_simulator

TINY = "configs/sim_tiny.py"


# ---- 1. summary.json records the config that ran ------------------------------------------------------------------
def test_summary_json_records_the_config_that_ran(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "experiments.simulate", f"--config={TINY}:dualpath_rr,agents=2,turns=2",
         f"--output_dir={tmp_path}", "--noplot", "--noprogress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = json.loads((tmp_path / "summary.json").read_text())["config"]
    assert cfg["mode"] == "dualpath_rr" and cfg["name"] == "sim_tiny" and cfg["output_dir"] == str(tmp_path)
    # the mode's policy, its kwargs and its global fetch (the file says dualpath, no kwargs, per-node fetch)
    assert cfg["scheduler"] == {"name": "round_robin", "kwargs": {"full_de": "queue"}}
    ran = json.loads((tmp_path / "summary.json").read_text())["policy_config"]  # every field it ran with
    assert ran["full_de"] == "queue" and "read_side" in ran
    assert cfg["cluster"]["layerwise"] is True and cfg["cluster"]["fetch_scope"] == "global"
    # the DE KV room the run used (derived from the HBM by the calibrated reserve), not the file's 0
    assert cfg["cluster"]["de_hbm_kv_gb"] > 0


# ---- 2. a switch set to a string is refused -----------------------------------------------------------------------
@pytest.mark.parametrize("field", ["cnic_duplex", "decode_lockstep", "layerwise", "io_free", "writeback"])
def test_a_switch_given_as_a_string_is_refused_by_name(field):
    """A SimConfig built in code (as experiments.bench_runtime does) with `layerwise="false"` passed the checks and ran
    layerwise: any non-empty string is true. Booleans (and numpy's) still pass."""
    import numpy as np

    cfg = load_sim_config(f"{TINY}:pe_only")  # (reads on the PE side: layerwise=False is valid for it)
    bad = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, **{field: "false"}))
    with pytest.raises(ValueError, match=rf"config.cluster.{field} must be true or false, got 'false'"):
        validate_sim_config(bad)
    with pytest.raises(ValueError, match=rf"config.cluster.{field} must be true or false"):
        build_simulator(bad)
    for ok in (True, False, np.bool_(True)):
        validate_sim_config(dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, **{field: ok})))


# ---- 3. a policy name as the mode says it replaces an explicit scheduler.name -------------------------------------
def test_a_policy_mode_says_it_replaces_an_explicit_scheduler_name(caplog):
    """`:split` with `--config.scheduler.name=dualpath` ran split and said nothing (a bundle mode such as `:basic`
    logs it since the second hunt)."""
    import logging

    from dualpath_jax.sim.config import sim_config_from_dict

    with caplog.at_level(logging.WARNING, logger="dualpath_jax.sim.config"):
        sc = sim_config_from_dict({"mode": "split", "scheduler": {"name": "dualpath"}}, explicit={"scheduler.name"})
    assert sc.policy == "split"  # the mode still decides
    assert "config.mode 'split' runs policy 'split': the given config.scheduler.name 'dualpath' is not used" in (
        caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.sim.config"):  # agreeing or not given: quiet
        sim_config_from_dict({"mode": "split", "scheduler": {"name": "split"}}, explicit={"scheduler.name"})
        sim_config_from_dict({"mode": "split", "scheduler": {"name": "dualpath"}})
    assert caplog.text == ""
