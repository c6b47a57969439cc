"""Session 37's own small fixes (the lead's; the helpers' are in tests/test_fix20_<name>.py), each test failing on the
code before."""

from __future__ import annotations

import pytest
from test_fix20_tracejourney import _mooncake
from test_launch_hunt import _launch


def test_the_main_job_refuses_a_given_agent_count_past_the_trace(tmp_path):
    """`--config.runtime.workload.agents=5` on a trace of 2 sessions ran the 2 (with a warning in the log since the
    tracejourney fix): a run of another size than asked. A given count is now a `bad config` line naming both
    counts, before anything starts (a config file's own count stays the loader's warning)."""
    trace = _mooncake(tmp_path / "t.jsonl", 2)
    out = _launch(
        "-m",
        "experiments.run",
        "--config=configs/tiny_runtime.py:test",
        "--config.runtime.workload.kind=trace",
        f"--config.runtime.workload.trace={trace}",
        "--config.runtime.workload.agents=5",
        f"--config.results_dir={tmp_path / 'results'}",
    )
    assert out.returncode == 1, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last == (
        f"bad config: --config.runtime.workload.agents=5, but the trace {trace} holds 2 trajectories (sessions): "
        "give agents <= 2, or 0 for all of them"
    ), out.stderr[-2000:]
    assert not (tmp_path / "results").exists()


def test_a_trace_of_absolute_times_is_named_as_such_not_told_to_raise_its_arrival_rate(tmp_path):
    """A trace with Unix-ms timestamps under arrival='trace' was refused with "raise the arrival rate", which a trace
    has not (found by the tracejourney helper). The line now names the fields a trace run has and the first agent's
    arrival."""
    import json

    from configs.tiny_runtime import get_config
    from dualpath_jax.runtime import driver
    from dualpath_jax.runtime.config import ConfigError, RuntimeConfig

    trace = tmp_path / "unix.jsonl"
    rows = [
        {"timestamp": 1.7e12 + 1000 * i, "input_length": 500, "output_length": 4, "hash_ids": [i]} for i in range(2)
    ]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = RuntimeConfig.from_config_dict(get_config("test").runtime)
    over = {"workload.kind": "trace", "workload.trace": str(trace), "workload.arrival": "trace", "workload.scale": 0.1}
    cfg = base.replace(**over)
    with pytest.raises(ConfigError) as e:
        driver._check_arrivals_within_timeout(cfg, driver.make_trajectories(cfg, 1000))
    assert "raise the arrival rate" not in str(e.value)
    assert (
        "lower config.workload.time_scale or raise config.run_timeout_s; the first agent arrives at 1.7e+09 s"
        in str(e.value)
    )


def test_a_simulator_run_records_every_field_its_policy_ran_with():
    """The simulator's results held only the policy kwargs given (`config.scheduler.kwargs`): a dualpath run's alpha
    and beta (filled from the cluster) and a policy's defaults were nowhere in them, where the runtime's results.json
    has `policy_config` (found by the policyown helper). `SimResult.policy_config` holds every field; simulate writes
    it as summary.json's `policy_config` (tests/test_sim_hunt4.py)."""
    import dataclasses

    from dualpath_jax.sim import load_sim_config, run
    from schedulers import POLICIES

    res = run(load_sim_config("configs/sim_tiny.py:dualpath,agents=2,turns=2"))
    conf = res.policy_config
    assert conf is not None and set(conf) == {f.name for f in dataclasses.fields(POLICIES.get("dualpath").Config)}
    assert conf["alpha_tokens"] > 0 and conf["beta_tokens"] > 0  # filled from the cluster, not the Config's defaults


def test_a_config_file_error_names_the_users_file_and_line(tmp_path):
    """A config file that imports a module of one's own (one registering a policy) which fails to import said only
    `ModuleNotFoundError: No module named 'numpyy' (from config file 'cfg.py')` (found by the policyown helper); an
    error in the config file itself gave no line. Both now name the file and line where it was raised."""
    from dualpath_jax.sim.configs_io import ConfigFileError, load_config

    (tmp_path / "broken_policies_fix20.py").write_text("import os\nimport numpyy\n")
    head = f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\n"
    (tmp_path / "cfg.py").write_text(head + "import broken_policies_fix20\ndef get_config(arg=None):\n    pass\n")
    (tmp_path / "cfg2.py").write_text("x = 1\ny = 1 / 0\ndef get_config(arg=None):\n    pass\n")
    with pytest.raises(ConfigFileError) as e:
        load_config(str(tmp_path / "cfg.py"))
    assert str(e.value) == (
        f"ModuleNotFoundError: No module named 'numpyy' (at {tmp_path / 'broken_policies_fix20.py'}:2, from config "
        f"file {str(tmp_path / 'cfg.py')!r})"
    )
    with pytest.raises(ConfigFileError) as e:
        load_config(str(tmp_path / "cfg2.py"))
    assert (
        str(e.value) == f"ZeroDivisionError: division by zero (from config file {str(tmp_path / 'cfg2.py')!r}, line 2)"
    )


def test_the_variant_item_max_agents_replays_a_traces_first_sessions(tmp_path):
    """`configs/x.py:trace=T,agents=5` was refused (agents= is the synthetic agent count) and no item set the new
    `workload.max_agents`: a sweep could not grid a trace's size (`--loads=max_agents=100,max_agents=500`)."""
    from test_fix20_tracejourney import _mooncake

    from dualpath_jax.sim import load_sim_config
    from dualpath_jax.sim.runner import make_trajectories

    trace = _mooncake(tmp_path / "t.jsonl", 4)
    cfg = load_sim_config(f"configs/sim_tiny.py:trace={trace},max_agents=3", as_run=True)
    assert cfg.workload.max_agents == 3 and len(make_trajectories(cfg)[0]) == 3
    with pytest.raises(ValueError, match=r"max_agents applies to kind='trace' only"):
        load_sim_config("configs/sim_tiny.py:max_agents=3", as_run=True)
    with pytest.raises(ValueError, match=r"max_agents must be an integer"):
        load_sim_config(f"configs/sim_tiny.py:trace={trace},max_agents=1.5")


def test_an_override_of_a_policy_field_says_how_to_give_it():
    """`--config.scheduler.kwargs.alpha_tokens=5` (the simulator's kwargs are a dict with no such field) said only
    "the config has no field 'alpha_tokens'" (found by the policyown helper): the line now names the two ways."""
    out = _launch(
        "-m", "experiments.simulate", "--config=configs/sim_tiny.py", "--config.scheduler.kwargs.alpha_tokens=5"
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        "bad override --config.scheduler.kwargs.alpha_tokens=5: the config has no field 'alpha_tokens'. A policy's own "
        "field is the variant item policy.alpha_tokens=VALUE after the config file "
        "(--config=FILE:MODE,policy.alpha_tokens=VALUE), or --config.scheduler.kwargs=\"{'alpha_tokens': VALUE}\""
    )


def test_a_tiny_agents_length_override_on_another_workload_is_refused():
    """`--config.runtime.workload.append_tokens=8` with kind=synthetic ran the synthetic agents' own appends, silently
    (found by the docstr_runtime helper): the tiny lengths and gap are refused on other kinds, by name."""
    out = _launch(
        "-m",
        "experiments.run",
        "--config=configs/tiny_runtime.py:test",
        "--config.runtime.workload.kind=synthetic",
        "--config.runtime.workload.append_tokens=8",
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        "bad config: --config.runtime.workload.append_tokens=8 is not used by this run: "
        "config.runtime.workload.kind='synthetic' (it shapes tiny agents only; give kind=tiny)"
    )
