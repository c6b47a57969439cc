"""Fix wave 13, small items left by the helpers' journeys."""

from __future__ import annotations

import os

import pytest

from dualpath_jax.runtime.config import ConfigError, RuntimeConfig
from dualpath_jax.runtime.driver import make_trajectories


def test_a_runtime_context_cap_that_cuts_every_agent_names_the_shortest_first_turn():
    """`workload.max_context_tokens` below every agent's first turn ended with "the workload has no trajectories"
    (the simulator names the shortest first turn); the runtime says so too."""
    cfg = RuntimeConfig().replace(
        **{"workload.kind": "synthetic", "workload.agents": 3, "workload.max_context_tokens": 1}
    )
    with pytest.raises(ConfigError, match=r"max_context_tokens = 1 leaves no turn to run: .*3 agents; the shortest "):
        make_trajectories(cfg)
    assert make_trajectories(cfg.replace(**{"workload.max_context_tokens": 0}))  # (no cap: the agents run)


def test_links_csv_names_a_link_that_moved_nothing(tmp_path):
    """The simulator's links.csv had no row for an idle link: a storage-NIC balance from links.csv alone (as from the
    runtime's files, which mark an idle SNIC with a zero-byte sample) was 1.0 where the summary said 2.0."""
    from dualpath_jax import metrics
    from dualpath_jax.sim import load_sim_config, run
    from dualpath_jax.sim.outputs import write_results

    res = run(load_sim_config("configs/sim_tiny.py:dualpath,agents=4,turns=2"))
    idle = [k for k, v in res.stats["link_totals"].items() if v == 0]
    assert "snic/node0" in idle  # (this run's DE-side reads: the PE node's SNIC idle)
    write_results(res, str(tmp_path), {}, plot=False)
    links = metrics.read_links(str(tmp_path / "links.csv"))
    assert {s.link for s in links} == set(res.stats["link_totals"])
    assert [(s.t0, s.t1, s.nbytes) for s in links if s.link == "snic/node0"] == [(0.0, 0.0, 0)]
    assert metrics.snic_max_over_avg(links) == res.summary["snic_max_over_avg"]


def test_a_config_file_rewritten_at_once_with_as_many_bytes_is_executed_again(tmp_path):
    """Config modules are kept while their file is unchanged; a file rewritten within the same file-time tick with the
    same size must not be taken for the one before."""
    from dualpath_jax.sim.configs_io import load_config

    path = tmp_path / "agents.py"
    text = "from configs.sim_tiny import get_config as _base\n\n\ndef get_config(arg=None):\n    c = _base(arg)\n"
    path.write_text(text + "    c.workload.n_agents = 3\n    return c\n")
    assert load_config(str(path)).workload.n_agents == 3
    before = path.stat().st_mtime_ns
    path.write_text(text + "    c.workload.n_agents = 4\n    return c\n")
    os.utime(path, ns=(before, before))  # (within one tick of the file clock)
    assert load_config(str(path)).workload.n_agents == 4


def test_a_sweep_load_may_be_any_variant_item_a_parameter_sweep(tmp_path):
    """README / --loads help: a "load" is any variant item, so `--loads=policy.alpha_tokens=A,policy.alpha_tokens=B`
    sweeps DualPath's alpha; each row names its item and ran with it."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "experiments.sweep", "--setups=configs/sim_tiny.py", "--modes=dualpath",
         "--loads=policy.alpha_tokens=500,policy.beta_tokens=1", f"--output_dir={tmp_path}", "--noplot"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["load"] for r in rows] == ["policy.alpha_tokens=500", "policy.beta_tokens=1"]
    bad = subprocess.run(
        [sys.executable, "-m", "experiments.sweep", "--setups=configs/sim_tiny.py", "--modes=basic",
         "--loads=policy.alpha_tokens=500", f"--output_dir={tmp_path / 'b'}", "--noplot"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode != 0 and "alpha_tokens" in bad.stderr
