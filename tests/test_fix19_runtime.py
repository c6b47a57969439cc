"""Fix wave 19, the runtime driver's left-overs: results.json kept through a kill -9 of `experiments.run`, a heartbeat
timeout that can never declare a node dead refused, a node declared dead while alive killed at the run's end (not
waited for), the SLO's figures in every online `RunResult.summary`. Each test failed on the code before its fix
(checked on a copy of the files with the fix taken out)."""

import json
import math
import os
import re
import signal

import pytest
from test_fix18_launchers import _launch

# ---- 1. kill -9 of experiments.run keeps the finished policies' results.json ----------------------------------------

# A stand-in for the runs (no model): policy `stop_at` is killed hard (SIGKILL: kill -9, the OOM killer) while it runs.
_STUB_KILL = """
import os, signal, sys, types
from absl import app
from dualpath_jax.runtime import driver
from experiments import parse_flags_or_exit

results_dir, stop_at = sys.argv[1], sys.argv[2]

def fake_run(cfg, ts, **kw):
    if cfg.scheduler.name == stop_at:
        os.kill(os.getpid(), signal.SIGKILL)
    s = {"jct_s": 2.0, "pe_read_bytes": 1, "de_read_bytes": 0, "snic_max_over_avg": 1.5, "link_bytes": {}}
    return types.SimpleNamespace(summary=s, records=[], links=[], requeued=0, schedule_time_s=0.0, node_stats={},
                                 startup_s=0.0, tokens={(0, 0): [1, 2]}, dead_nodes={})

driver.prepare = lambda cfg, *a, **k: ([types.SimpleNamespace(turns=[0, 1])] * 8, None)
driver.run = fake_run
from experiments import run as job
sys.argv = [sys.argv[0], "--config=configs/tiny_runtime.py:test", "--config.results_dir=" + results_dir,
            "--config.policies=basic,dualpath,round_robin"]
app.run(job.main, flags_parser=parse_flags_or_exit)
"""


def test_kill_9_during_a_later_policy_keeps_the_finished_ones_results_json(tmp_path):
    """Only turns_<policy>.json was written per policy: a job killed hard (kill -9, the OOM killer, a node lost) while
    its second policy ran kept no results.json at all (no summary, config, policy_config, greedy-token digest).
    Contract: results.json is rewritten (atomically: no half file) after each finished policy, its `failed` saying
    which policies it lacks; the final write replaces it as before."""
    results = tmp_path / "results"
    out = _launch("-c", _STUB_KILL, str(results), "round_robin")
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    (run_dir,) = results.iterdir()
    assert sorted(os.listdir(run_dir)) == ["results.json", "turns_basic.json", "turns_dualpath.json"]  # (no temp)
    summary = json.loads((run_dir / "results.json").read_text())
    assert list(summary["results"]) == ["basic", "dualpath"] and summary["results"]["dualpath"]["jct_s"] == 2.0
    assert summary["failed"] == (
        "incomplete: written when basic, dualpath had finished; the job ended (killed) or was still running before "
        "round_robin finished (results of basic, dualpath only)"
    )
    assert set(summary["greedy_tokens"]["sha256"]) == {"basic", "dualpath"}
    assert summary["config"]["policies"] == "basic,dualpath,round_robin"

    assert list(summary) == [  # (the final write's keys: one function writes both)
        "failed", "greedy_tokens", "config", "prefill_tokens_per_s", "policy_kwargs", "policy_config", "layerwise",
        "results", "requeued", "dead_nodes", "unstored_blocks", "store_stats", "schedule_time_s", "node_stats",
        "speedup_vs_first",
    ]  # fmt: skip


# ---- 2. a heartbeat timeout that can never declare a node dead ------------------------------------------------------


@pytest.mark.parametrize(
    "value, message",
    [
        (math.inf, "config.scheduler.heartbeat_timeout_s must be finite, got inf: a node that stops fetching"),
        (math.nan, "config.scheduler.heartbeat_timeout_s (nan) must exceed fetch_interval_s (0.005)"),
        (0.0, "config.scheduler.heartbeat_timeout_s (0.0) must exceed fetch_interval_s (0.005)"),
        (-3.0, "config.scheduler.heartbeat_timeout_s (-3.0) must exceed fetch_interval_s (0.005)"),
        (0.004, "config.scheduler.heartbeat_timeout_s (0.004) must exceed fetch_interval_s (0.005)"),
    ],
)
def test_a_heartbeat_timeout_that_never_declares_a_node_dead_is_refused(base, value, message):
    """`heartbeat_timeout_s=inf` passed the config check: a node stopped mid-run (SIGSTOP, a deadlock) was then never
    declared dead, its requests never re-ran, and the run waited for it until `run_timeout_s` (900 s) and failed with
    "run did not finish", naming neither the node nor the heartbeat. NaN, 0, negative values and values not above the
    fetch interval (the heartbeat's period) are refused too, naming the field."""
    from dualpath_jax.runtime.config import ConfigError, validate

    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        validate(base.replace(**{"scheduler.heartbeat_timeout_s": value}))
    validate(base.replace(**{"scheduler.heartbeat_timeout_s": 1e6}))  # (long, but finite: taken)


# ---- 3. a node declared dead while alive is killed at the run's end, not waited for ---------------------------------


class _Stuck:
    """A node's control client that stops answering (as a SIGSTOPped or deadlocked node: no fetch, no heartbeat) until
    the node is stopped or killed."""

    def __init__(self, group):
        self.group = group

    def fetch(self, report):
        from dualpath_jax.runtime.scheduler_service import GroupReply

        self.group._stop.wait(60.0)
        return GroupReply(shutdown=True)


def _small(base, **kw):
    return base.replace(**{"workload.agents": 2, "workload.turns": 2, **kw})


@pytest.fixture(scope="module")
def ops(base):
    from dualpath_jax.runtime.model_ops import ModelOps

    return ModelOps.of_config(_small(base))


def test_a_node_declared_dead_while_alive_is_killed_at_the_end_not_waited_for(base, ops, caplog):
    """A DE node that stops fetching mid-run (stopped, deadlocked) is declared dead by its heartbeat and its requests
    re-run on the other DE: every turn finishes. Then the driver waited 15 s for it to end its run (`launcher.join`),
    and a `LocalCluster` session 15 s more (`END_TIMEOUT_S`) before killing it: no fetch ever told it the run ended.
    Contract: a node declared dead that has not fetched since is killed at the run's end, with a warning naming it."""
    import logging
    import time

    from dualpath_jax.runtime import driver

    cfg = _small(base, **{"scheduler.name": "round_robin", "scheduler.heartbeat_timeout_s": 1.0})
    stuck, done_at = [], []

    def fault(service, launcher):
        if not stuck and service.progress()[0] >= 1:
            launcher.groups[2].control = _Stuck(launcher.groups[2])
            stuck.append(2)

    def progress(done, total):
        if done == total:
            done_at.append(time.monotonic())

    with caplog.at_level(logging.WARNING):
        res = driver.run(cfg, model_ops=ops, fault=fault, on_progress=progress)
    took = time.monotonic() - done_at[0]
    assert stuck and list(res.dead_nodes) == [2] and res.dead_nodes[2].startswith("no fetch for ")
    assert len(res.records) == 4  # (every turn: the stuck node's re-ran on node 1)
    assert took < 5.0, f"{took:.1f} s from the last turn to the run's end"
    assert "node 2 was declared dead (no fetch for " in caplog.text and "killed, not waited for" in caplog.text
    assert res.slo is None and "slo_attainment" not in res.summary  # (offline: judged on its JCT, no SLO)


# ---- 4. the SLO's figures in every online RunResult ------------------------------------------------------------------


def test_an_online_run_result_carries_its_slo_judgement(base, ops):
    """`driver.run` of an online run returned a summary without the SLO's figures: only `experiments.run` judged its
    turns (and wrote them to its table and results.json), so `bench_runtime`, a notebook or any other caller of
    `driver.run` got no attainment nor verdict. Contract: an online / trace-arrival `RunResult` has the judgement
    (`RunResult.slo`, on `slo_window`'s turns) and its summary the same keys experiments.run's results.json gives."""
    from dualpath_jax.runtime import driver

    cfg = _small(base, **{"workload.arrival": "online", "workload.aps": 4.0, "slo.ttft_s": 1e-6})
    trajs = driver.make_trajectories(cfg)
    res = driver.run(cfg, trajs, model_ops=ops)
    window = driver.slo_window(cfg, trajs)
    want = driver.judge_slo(cfg, window, res.records)
    assert want["slo_turns"] >= 2 and want["slo_met"] is False and want["slo_attainment"] == 0.0  # (no TTFT in 1 us)
    assert res.slo == want and res.slo_window == window
    # the summary's keys as experiments.run's results.json gives them (its SLO percentile, p90, is no all-turn key)
    assert sorted(want) == ["slo_attainment", "slo_met", "slo_turns", "tpot_p90_s", "ttft_p90_s", "ttst_p50_s"]
    assert json.dumps({k: res.summary[k] for k in want}) == json.dumps(want)  # (NaN-safe)
    assert res.summary["ttft_p99_s"] > 0  # (the all-turn figures stay)


def test_a_run_of_agents_all_before_the_slo_warmup_judges_nothing(base):
    """experiments.run's warm-up runs a few of the agents: all of them may arrive before `slo.warmup_s`, where
    `slo_window` refuses the config. That run is judged on no turn (the keys, slo_turns 0), not failed."""
    from dualpath_jax.runtime import driver

    cfg = _small(base, **{"workload.arrival": "online", "workload.aps": 4.0, "slo.warmup_s": 50.0})
    trajs = driver.make_trajectories(cfg)
    window, slo = driver._judged_slo(cfg, trajs, [])
    assert window == (50.0, 50.0) and slo["slo_turns"] == 0 and slo["slo_met"] is False
    assert math.isnan(slo["slo_attainment"])


# ---- hunt: a transport option the endpoints refuse, found before anything starts -------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        ({"timeout_s": 0}, "timeout_s must be > 0 seconds, got 0"),
        ({"max_message_bytes": 0}, "max_message_bytes must be an int >= 1, got 0"),
        # (a non-loopback host is taken since session 44, the nodes' endpoints having the run's secret: one that is
        # no interface here is still refused, by the OS)
        ({"host": "10.0.0.1"}, "Cannot assign requested address"),
    ],
)
def test_a_tcp_option_the_endpoints_refuse_is_a_config_error_before_the_run(base, ops, options, message):
    """`validate` checked `config.transport_options`' names only: a value the tcp endpoint refuses passed, and every
    node failed as it built its endpoints, after its model (minutes for a real checkpoint); `experiments.run` ended
    with a ValueError traceback. Contract: `driver.prepare` refuses it, naming the field and the endpoint's reason."""
    from dualpath_jax.runtime import driver
    from dualpath_jax.runtime.config import ConfigError

    cfg = _small(base, transport="tcp", transport_options=options)
    with pytest.raises(
        ConfigError, match=rf"^config.transport_options {re.escape(repr(options))}: .*{re.escape(message)}"
    ) as e:
        driver.prepare(cfg, model_ops=ops)
    assert "config-check" not in str(e.value)
    driver.prepare(_small(base, transport="tcp", transport_options={"timeout_s": 5.0}), model_ops=ops)  # (taken)


# ---- hunt: arrival='trace' of a workload without timestamps ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["tiny", "synthetic"])
def test_trace_arrivals_of_a_workload_without_timestamps_are_refused(base, kind):
    """`workload.arrival='trace'` replays a trace's timestamps; the tiny and synthetic agents have none (every
    `arrival_time` 0, no turn offsets), so such a run was an offline rollout, silently, and experiments.run judged it
    on the SLO as an online run (SLO columns, attainment) beside its offline JCT. Contract: refused, naming both fields;
    trajectories given to the driver (with their own timestamps) still run with arrival='trace'."""
    from dualpath_jax.runtime import driver
    from dualpath_jax.runtime.config import ConfigError
    from dualpath_jax.workloads.types import Trajectory, Turn

    cfg = base.replace(**{"workload.arrival": "trace", "workload.kind": kind})
    with pytest.raises(ConfigError, match=rf"^config.workload.arrival='trace' .* config.workload.kind='{kind}' makes"):
        driver.make_trajectories(cfg)
    given = [Trajectory(0, [Turn(8, 2)], arrival_time=0.5), Trajectory(1, [Turn(8, 2)], arrival_time=1.5)]
    assert driver.slo_window(cfg, given) == (0.0, math.inf)  # (the given ones: judged as before)
    assert list(driver.make_arrival_model(cfg).agent_arrivals(given)) == [0.5, 1.5]
