"""Fix pass 17, area `slo`: the runtime judges an online run against an SLO, as the simulator does.

The simulator judged its online runs (`sim.runner.slo_summary`: TTFT / TPOT at a percentile, turns arriving in
[warmup, duration), unfinished ones as misses); the runtime's `experiments.run` printed TTFT / TPOT percentiles
and no SLO at all, so policies' online quality on the real engines could not be compared, nor with the simulator's.
Contract: one judgement over TurnRecords (`metrics.slo_summary`) used by both; `config.runtime.slo` (checked
before anything runs); an online / trace-arrival run's table, results.json and turns_<policy>.json hold its
attainment and verdict; an offline run's are unchanged, and SLO fields given to one are refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from dualpath_jax import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "configs/sim_tiny.py"


def _same(a, b) -> bool:
    return repr(a) == repr(b)  # equal bits, NaN equals NaN


def _turn(i, arrival, ttft=None, gen=3, tpot=0.01, decoding=False):
    """A turn arriving at `arrival`: `ttft` None = no first token; `decoding` = first (and second) token, not done."""
    r = metrics.TurnRecord(i, 0, 100, 0, gen, arrival)
    if ttft is None:
        return r
    r.scheduled = r.read_start = r.read_end = r.prefill_start = r.prefill_end = arrival
    r.first_token = arrival + ttft
    if gen > 1:
        r.second_token = r.first_token + tpot
    if not decoding:
        r.finished = r.first_token + tpot * (gen - 1)
    return r


def _hand_records():
    return [
        _turn(0, 0.5, ttft=9.0),  # before the warm-up: not judged (a miss if it were)
        _turn(1, 1.0, ttft=0.5),  # ok
        _turn(2, 2.0, ttft=3.0),  # TTFT over 2 s: a miss
        _turn(3, 3.0, ttft=0.5, gen=1),  # 1 token: no TPOT, judged on its TTFT: ok
        _turn(4, 4.0),  # no first token: a miss (TTFT inf)
        _turn(5, 5.0, ttft=0.2, gen=5, decoding=True),  # still decoding: judged on its TTFT: ok
        _turn(6, 6.0, ttft=0.1, tpot=0.2),  # TPOT over 50 ms: a miss
        _turn(7, 10.0, ttft=0.1),  # at the window's end: not judged
    ]


def test_the_shared_judgement_on_hand_made_turns():
    recs = _hand_records()
    s = metrics.slo_summary(recs, ttft_s=2.0, tpot_s=0.05, percentile=50, warmup_s=1.0, end_s=10.0)
    # judged: turns 1-6; ok: 1, 3, 5. TTFT [0.1, 0.2, 0.5, 0.5, 3, inf] p50 0.5; TPOT of the finished 2+-token
    # turns [0.01, 0.01, 0.2] p50 0.01; TTST [0.21, 0.3, 0.51, 3.01, inf] of 5, 6, 1, 2, 4 (no second token: a miss;
    # turn 3, of 1 token, has none) p50 0.51
    assert s == {
        "slo_turns": 6,
        "slo_attainment": 0.5,
        "ttft_p50_s": 0.5,
        "tpot_p50_s": pytest.approx(0.01, rel=1e-12),
        "ttst_p50_s": pytest.approx(0.51, rel=1e-12),
        "slo_met": True,
    }
    p90 = metrics.slo_summary(recs, ttft_s=2.0, tpot_s=0.05, percentile=90, warmup_s=1.0, end_s=10.0)
    assert p90["ttft_p90_s"] == math.inf and p90["slo_met"] is False  # the miss without a first token reaches p90
    assert p90["tpot_p90_s"] == pytest.approx(np.percentile([0.01, 0.01, 0.2], 90), rel=1e-12)
    # no end, no warm-up: every turn judged
    every = metrics.slo_summary(recs, ttft_s=2.0, tpot_s=0.05, percentile=50)
    assert every["slo_turns"] == 8 and every["slo_attainment"] == 4 / 8
    # an infinite bound is no bound: only the turn without a first token misses
    loose = metrics.slo_summary(recs, ttft_s=math.inf, tpot_s=math.inf, percentile=50)
    assert loose["slo_attainment"] == 7 / 8


def test_the_shared_judgement_of_no_turn_has_every_key_and_is_missed():
    s = metrics.slo_summary(_hand_records(), 2.0, 0.05, 95, warmup_s=20.0)
    assert list(s) == ["slo_turns", "slo_attainment", "ttft_p95_s", "tpot_p95_s", "ttst_p50_s", "slo_met"]
    assert s["slo_turns"] == 0 and s["slo_met"] is False
    assert all(math.isnan(s[k]) for k in ("slo_attainment", "ttft_p95_s", "tpot_p95_s", "ttst_p50_s"))


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(ttft_s=0.0), "SLO ttft_s must be a number > 0, got 0.0"),
        (dict(tpot_s=math.nan), "SLO tpot_s must be a number > 0, got nan"),
        (dict(warmup_s=-1.0), "SLO warmup_s must be a number >= 0, got -1.0"),
        (dict(percentile=0), r"SLO percentile must be in \(0, 100\], got 0"),
        (dict(percentile=101), r"SLO percentile must be in \(0, 100\], got 101"),
    ],
)
def test_the_shared_judgement_refuses_bad_bounds(kw, message):
    args = {"ttft_s": 4.0, "tpot_s": 0.05, "percentile": 90.0, **kw}
    with pytest.raises(ValueError, match=message):
        metrics.slo_summary(_hand_records(), **args)


# ---- the simulator: the same judgement, bit for bit --------------------------------------------------------------


def _frozen_sim_slo_summary(cfg, records):
    """`sim.runner.slo_summary` as it was before the judgement moved to `metrics` (2026-12-05)."""
    end = cfg.workload.duration_s if cfg.workload.kind == "online" else math.inf
    recs = [r for r in records if cfg.warmup_s <= r.arrival < end]
    done = [r for r in recs if not math.isnan(r.finished)]
    if not recs:
        pct = f"{cfg.slo_percentile:g}"
        nan = math.nan
        return {"slo_turns": 0, "slo_attainment": nan, f"ttft_p{pct}_s": nan, f"tpot_p{pct}_s": nan,
                "ttst_p50_s": nan, "slo_met": False}  # fmt: skip
    ttft = [r.ttft if not math.isnan(r.first_token) else math.inf for r in recs]
    tpot = [r.tpot for r in done if r.gen_tokens > 1]
    ttft_q = metrics.percentile(ttft, cfg.slo_percentile)
    ttst = [r.ttst if r.gen_tokens <= 1 or not math.isnan(r.second_token) else math.inf for r in recs]
    tpot_q = float(np.percentile(tpot, cfg.slo_percentile)) if tpot else math.nan
    ok = [
        (not math.isnan(r.first_token))
        and r.ttft <= cfg.slo_ttft_s
        and (r.gen_tokens <= 1 or math.isnan(r.finished) or r.tpot <= cfg.slo_tpot_s)
        for r in recs
    ]
    return {
        "slo_turns": len(recs),
        "slo_attainment": float(np.mean(ok)),
        f"ttft_p{cfg.slo_percentile:g}_s": ttft_q,
        f"tpot_p{cfg.slo_percentile:g}_s": tpot_q,
        "ttst_p50_s": metrics.percentile(ttst, 50),
        "slo_met": bool(ttft_q <= cfg.slo_ttft_s and (math.isnan(tpot_q) or tpot_q <= cfg.slo_tpot_s)),
    }


@pytest.fixture(scope="module")
def sim_online():
    """An online sim_tiny run cut while turns run (unfinished ones, turns without a first token)."""
    from dualpath_jax.sim import load_sim_config, runner

    cfg = load_sim_config(f"{TINY}:dualpath,aps=3,duration=20,warmup=5")
    return cfg, runner.run(cfg, max_time=22)


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"slo_percentile": 50},
        {"slo_percentile": 99, "slo_ttft_s": 0.5},
        {"slo_tpot_s": 1e-4, "warmup_s": 0.0},
        {"warmup_s": 30.0},  # (no turn judged)
        {"kind": "offline"},  # (no end: every turn from the warm-up on, as a trace's)
    ],
)
def test_the_simulators_slo_is_the_shared_judgement_bit_for_bit(sim_online, change):
    from dualpath_jax.sim import runner

    cfg, res = sim_online
    change = dict(change)
    if "kind" in change:
        cfg = dataclasses.replace(cfg, workload=dataclasses.replace(cfg.workload, kind=change.pop("kind")))
    cfg = dataclasses.replace(cfg, **change)
    got = runner.slo_summary(cfg, res.records)
    assert _same(got, _frozen_sim_slo_summary(cfg, res.records))
    end = cfg.workload.duration_s if cfg.workload.kind == "online" else math.inf
    shared = metrics.slo_summary(res.records, cfg.slo_ttft_s, cfg.slo_tpot_s, cfg.slo_percentile, cfg.warmup_s, end)
    assert _same(got, shared)


def test_the_simulators_summary_keeps_its_slo_keys(sim_online):
    cfg, res = sim_online
    s = res.summary
    assert s["slo_turns"] > 0 and s["unfinished_turns"] > 0  # (a cut run: turns still running are judged too)
    for k, v in _frozen_sim_slo_summary(cfg, res.records).items():
        assert _same(s[k], v), k


# ---- the runtime: config.runtime.slo, experiments.run ------------------------------------------------------------


def _runtime_config(**slo):
    from configs.tiny_runtime import get_config
    from dualpath_jax.runtime.config import RuntimeConfig

    c = get_config("test")
    c.runtime.workload.arrival = "online"
    c.runtime.slo.update(slo)
    return RuntimeConfig.from_config_dict(c.runtime)


def test_the_runtime_config_has_the_simulators_slo_by_default():
    from dualpath_jax.runtime.config import RuntimeConfig
    from dualpath_jax.sim.config import SimConfig

    sim, slo = SimConfig(), RuntimeConfig().slo
    assert (slo.ttft_s, slo.tpot_s, slo.percentile, slo.warmup_s) == (
        sim.slo_ttft_s,
        sim.slo_tpot_s,
        sim.slo_percentile,
        sim.warmup_s,
    )
    assert _runtime_config().slo == slo  # configs/tiny_runtime.py sets the same


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("ttft_s", 0.0, "config.slo.ttft_s must be > 0 (inf: no bound), got 0.0"),
        ("ttft_s", math.nan, "config.slo.ttft_s must be > 0 (inf: no bound), got nan"),
        ("tpot_s", -0.05, "config.slo.tpot_s must be > 0 (inf: no bound), got -0.05"),
        ("percentile", 0.0, "config.slo.percentile must be > 0 and <= 100, got 0.0"),
        ("percentile", 100.5, "config.slo.percentile must be > 0 and <= 100, got 100.5"),
        ("percentile", math.nan, "config.slo.percentile must be > 0 and <= 100, got nan"),
        ("warmup_s", -1.0, "config.slo.warmup_s must be >= 0 and finite, got -1.0"),
        ("warmup_s", math.inf, "config.slo.warmup_s must be >= 0 and finite, got inf"),
        ("warmup_s", "1", "config.slo.warmup_s must be a number, got '1'"),
    ],
)
def test_bad_slo_fields_are_refused_before_anything_runs(field, value, message):
    from dualpath_jax.runtime.config import ConfigError, validate_workload

    cfg = _runtime_config()
    cfg = cfg.replace(**{f"slo.{field}": value})
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        validate_workload(cfg)


def test_an_slo_without_a_bound_is_taken():
    from dualpath_jax.runtime.config import validate_workload

    validate_workload(_runtime_config(ttft_s=math.inf, tpot_s=math.inf, percentile=100.0))


def test_the_judged_window_per_arrival_mode():
    from dualpath_jax.runtime import driver
    from dualpath_jax.runtime.config import ConfigError
    from dualpath_jax.runtime.driver import slo_window

    cfg = _runtime_config(warmup_s=0.25)
    trajs = driver.make_trajectories(cfg)
    arrivals = driver.make_arrival_model(cfg).agent_arrivals(trajs)
    assert slo_window(cfg, trajs) == (0.25, float(arrivals.max()))  # online: to the last agent's arrival
    assert slo_window(cfg.replace(**{"workload.arrival": "trace"}), trajs) == (0.25, math.inf)
    assert slo_window(cfg.replace(**{"workload.arrival": "offline"}), trajs) is None
    late = cfg.replace(**{"slo.warmup_s": float(arrivals.max()) + 1})
    with pytest.raises(ConfigError, match=r"^config.slo.warmup_s \(.*\) must not be after the last agent's arrival"):
        slo_window(late, trajs)


def test_slo_fields_given_to_an_offline_run_are_refused():
    from configs.tiny_runtime import get_config
    from dualpath_jax.runtime.config import ConfigError
    from experiments.run import policy_configs

    c = get_config("test")
    with pytest.raises(ConfigError, match=r"^--config.runtime.slo.ttft_s=1.0 is not used by this run: .*'offline'"):
        policy_configs(c, {"runtime.slo.ttft_s": 1.0})
    c.runtime.workload.arrival = "online"
    assert policy_configs(c, {"runtime.slo.ttft_s": 1.0})["basic"].slo.ttft_s == 4.0  # (the file's; taken)


def test_an_offline_table_has_no_slo_columns_and_an_online_one_has_them():
    from types import SimpleNamespace

    from experiments.run import format_table

    s = {"jct_s": 2.0, "ttft_p50_s": 0.1}
    offline = format_table({"basic": SimpleNamespace(summary=s)}).splitlines()[0]
    assert "SLO" not in offline
    judged = {"basic": {**s, "slo_attainment": 0.75, "slo_met": False}, "dualpath": {**s, "slo_attainment": 1.0,
              "slo_met": True}}  # fmt: skip
    header, _, basic, dualpath = format_table({k: SimpleNamespace(summary=v) for k, v in judged.items()}).splitlines()
    assert header.split()[-10:-6] == ["max/avg", "SLO", "att.", "SLO"]  # (then the speedups)
    assert basic.split()[-4:-2] == ["75.0%", "missed"] and dualpath.split()[-4:-2] == ["100.0%", "met"]


@pytest.fixture(scope="module")
def online_run(tmp_path_factory):
    """`experiments.run` of the small in-process variant, online (3 agents x 2 turns, basic and dualpath), judged on a
    TTFT bound no turn meets."""
    results = tmp_path_factory.mktemp("online") / "results"
    out = subprocess.run(
        [
            sys.executable, "-m", "experiments.run", "--config=configs/tiny_runtime.py:test",
            "--config.runtime.workload.arrival=online", "--config.runtime.workload.aps=4",
            "--config.runtime.workload.agents=3", "--config.runtime.workload.turns=2",
            "--config.runtime.slo.ttft_s=1e-6", f"--config.results_dir={results}",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = results.iterdir()
    return out, run_dir


def test_an_online_run_reports_the_slo_of_its_own_turn_records(online_run):
    from dualpath_jax.runtime.config import RuntimeConfig
    from dualpath_jax.runtime.driver import judge_slo

    out, run_dir = online_run
    summary = json.loads((run_dir / "results.json").read_text())
    slo = summary["slo"]
    assert {k: slo[k] for k in ("ttft_s", "tpot_s", "percentile", "warmup_s")} == {
        "ttft_s": 1e-6,
        "tpot_s": 0.05,
        "percentile": 90.0,
        "warmup_s": 0.0,
    }
    lo, hi = slo["window_s"]
    cfg = RuntimeConfig.from_config_dict(summary["config"]["runtime"])
    for p in ("basic", "dualpath"):
        path = run_dir / f"turns_{p}.json"
        recs = metrics.read_turns(str(path))
        firsts = [r.arrival for r in recs if r.turn_index == 0]
        assert hi == max(firsts)  # the window ends with the last agent's arrival ...
        want = metrics.slo_summary(recs, 1e-6, 0.05, 90.0, lo, math.nextafter(hi, math.inf))
        assert want["slo_turns"] >= 3  # ... its first turn judged too
        assert want == judge_slo(cfg, (lo, hi), recs)
        got = summary["results"][p]
        assert all(_same(metrics.json_safe(v), got[k]) for k, v in want.items()), (want, got)
        assert got["slo_met"] is False and got["slo_attainment"] == 0.0  # no TTFT within 1 us
        turns_slo = json.loads(path.read_text())["slo"]
        assert all(_same(metrics.json_safe(v), turns_slo[k]) for k, v in want.items())
        assert turns_slo["window_s"] == [lo, hi]
        # a loose SLO over the same turns: met, every turn within it
        loose = judge_slo(cfg.replace(**{"slo.ttft_s": 600.0, "slo.tpot_s": 60.0}), (lo, hi), recs)
        assert loose["slo_met"] is True and loose["slo_attainment"] == 1.0
    table = (run_dir / "table.txt").read_text()
    assert "SLO att." in table and table.count("missed") == 2
    assert "SLO (config.runtime.slo): TTFT p90 <= 1e-06 s and TPOT p90 <= 50 ms on the turns arriving in [0, " in table
    assert table in out.stdout + "\n"


@pytest.mark.parametrize("override", ["--config.runtime.slo.ttft_s=1", "--config.runtime.slo.warmup_s=2"])
def test_bench_runtime_refuses_slo_fields_on_an_offline_run(override):
    """`experiments.bench_runtime` judges online and trace-arrival runs (the runtime and its simulator copy) against
    `config.runtime.slo`; an SLO field given to an offline one ran without a word: one line naming it."""
    from test_launch_hunt import _launch

    p = _launch("-m", "experiments.bench_runtime", "--config=configs/tiny_runtime.py:test", override, timeout=60)
    assert p.returncode != 0
    assert (
        p.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"bad config: --config.{override[9:].split('=')[0]} is not used by this run: "
            "config.runtime.workload.arrival='offline'"
        )
    ), p.stderr[-2000:]


def test_bench_runtimes_simulator_copy_is_judged_on_the_runtimes_slo(base):
    """`bench_runtime.simulate(..., window)`: the copy's turns judged as the runtime's (`driver.judge_slo`, one SLO and
    window), so an online bench run prints both attainments; without a window no SLO (offline, as before)."""
    pytest.importorskip("ml_collections")
    from dualpath_jax.runtime import driver
    from dualpath_jax.workloads.types import Trajectory, Turn
    from experiments import bench_runtime
    from schedulers.cost_model import MODEL_SHAPES, CostModel

    cfg = base.replace(**{"workload.arrival": "trace", "slo.ttft_s": 1e-9, "block_size": 16})
    cost = CostModel(MODEL_SHAPES.get("ds27b"), "cpu")
    trajs = [Trajectory(i, [Turn(300, 4), Turn(40, 4)], arrival_time=0.5 * i) for i in range(3)]
    window = driver.slo_window(cfg, trajs)
    out = bench_runtime.simulate(cfg, trajs, cost, {"block_size": 16}, window)
    assert out["slo"]["slo_turns"] == 6 and out["slo"]["slo_attainment"] == 0.0 and out["slo"]["slo_met"] is False
    loose = bench_runtime.simulate(
        cfg.replace(**{"slo.ttft_s": 1e9, "slo.tpot_s": 1e9}), trajs, cost, {"block_size": 16}, window
    )
    assert loose["slo"]["slo_attainment"] == 1.0 and loose["slo"]["slo_met"] is True
    assert "slo" not in bench_runtime.simulate(cfg, trajs, cost, {"block_size": 16})
