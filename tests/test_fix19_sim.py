"""Fix wave 19, the simulator's configs, capacity search and outputs (helper "sim"). Each test failed before its fix:

- a `cluster.NAME=true` / `=false` variant item on a number field was cast to 1.0 / 0.0 by ml_collections (a bool is
  an int): `cluster.de_host_buffer_gb=true` ran with a 1 GB DE buffer, `cluster.storage_efficiency=true` at 1.0,
  silently, where `--config.cluster.*=true` is refused; now the item is refused by name;
- a `sweep --resume` wrote another sweep.csv and table than one run of the same grid: a kept row comes back from
  sweep.json with null where the run had NaN (oracle's storage-NIC max/avg), so the CSV had "" beside "nan" and
  the table "None" beside "nan". NaN is None in sweep.json, sweep.csv and the table alike now, and the table shows
  "-" for no figure;
- the capacity launcher's progress line for a probe that judged no turn said "SLO missed, attainment nan%", where
  the table and README call it no verdict ("n/a").
"""

from __future__ import annotations

import math
import os

import pytest
import test_launch_hunt as launch_hunt

from dualpath_jax.sim.configs_io import load_config, load_sim_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "sim_tiny.py")


@pytest.mark.parametrize(
    "item, what",
    [
        ("cluster.de_host_buffer_gb=true", "a number"),  # a placeholder float field (None by default)
        ("cluster.snic_gbps=true", "a number"),
        ("cluster.storage_efficiency=true", "a number"),  # 1.0 is in range: it ran, silently
        ("cluster.storage_gbps=false", "a number"),  # 0.0 is "no cap": it ran, silently
        ("cluster.gpus_per_node=true", "an integer"),
        ("cluster.de_max_seqs=false", "an integer"),  # a placeholder int field
    ],
)
def test_a_cluster_item_of_true_or_false_for_a_number_is_refused_by_name(item, what):
    name = item.split("=")[0]
    with pytest.raises(ValueError, match=rf"config variant item '{item}': config\.{name} must be {what}, got (True|F)"):
        load_config(f"{TINY}:{item}")


def test_cluster_items_of_the_right_type_still_load():
    c = load_sim_config(
        f"{TINY}:pe_only,cluster.layerwise=false,cluster.de_host_buffer_gb=100,cluster.de_max_seqs=3,"
        "cluster.snic_gbps=25"
    ).cluster
    assert (c.layerwise, c.de_host_buffer_gb, c.de_max_seqs, c.snic_gbps) == (False, 100.0, 3, 25.0)
    assert load_sim_config(f"{TINY}:cluster.de_host_buffer_gb=none").cluster.de_host_buffer_gb is None


def test_a_resumed_sweep_writes_the_csv_and_table_one_run_writes(tmp_path):
    """oracle reads nothing from storage: its storage-NIC max/avg is NaN. `--resume` of a finished sweep keeps every
    cell and runs none; its sweep.csv and printed table are the one run's, byte for byte."""
    out_dir = tmp_path / "sw"
    args = [
        "-m", "experiments.sweep", f"--setups={TINY}", "--modes=oracle,basic", "--loads=agents=2",
        "--extra=turns=2", "--noplot", f"--output_dir={out_dir}",
    ]  # fmt: skip
    fresh = launch_hunt._launch(*args)
    assert fresh.returncode == 0, fresh.stderr
    csv_fresh = (out_dir / "sweep.csv").read_text()
    resumed = launch_hunt._launch(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert (out_dir / "sweep.csv").read_text() == csv_fresh
    table = [line for line in fresh.stdout.splitlines() if not line.startswith("wrote")]
    assert [line for line in resumed.stdout.splitlines() if not line.startswith("wrote")] == table
    oracle = next(line for line in csv_fresh.splitlines() if ",oracle," in line).split(",")
    header = csv_fresh.splitlines()[0].split(",")
    assert oracle[header.index("snic_max_over_avg")] == ""  # (as capacity.csv writes no figure)
    assert "nan" not in csv_fresh and "None" not in "\n".join(table)


def test_a_probe_that_judged_no_turn_logs_no_verdict():
    from dualpath_jax.sim import runner
    from experiments import capacity

    cfg = load_sim_config(f"{TINY}:aps=1,duration=10,warmup=5")
    none = {**runner.slo_summary(cfg, []), "aps": 0.01}  # what `sim.capacity.probe` gives when no turn arrived
    assert none["slo_turns"] == 0 and math.isnan(none["slo_attainment"])
    line = capacity._probe_line("sim_tiny.py:basic", none, "90")
    assert "no verdict" in line and "missed" not in line and "nan" not in line, line
    judged = {**none, "slo_turns": 3, "slo_met": False, "slo_attainment": 0.5, "ttft_p90_s": 5.0, "tpot_p90_s": 0.02}
    assert "SLO missed, attainment 50.0%" in capacity._probe_line("sim_tiny.py:basic", judged, "90")
