"""Defects found by the second simulator hunt of 2026-12-03 (each test failed before its fix):
- a run cut by max_time kept the whole of the paced write-backs still under way: a reservation books its bytes when it
  starts, so links.csv had bytes after the end of the run and the link totals counted bytes never moved."""

import random

import pytest

from dualpath_jax.sim import load_sim_config
from dualpath_jax.sim.runner import build_simulator
from dualpath_jax.workloads.types import Trajectory, Turn

TINY = "configs/sim_tiny.py"


# ---- 1. a cut run keeps only the write-back bytes moved by its end ------------------------------------------------
def test_a_cut_run_keeps_only_the_write_back_bytes_moved_by_max_time():
    """One 1000-token turn, the run cut halfway through its decode: its paced write-back (a reservation over the
    decode) moved half its bytes by then. The DE SNIC counted all of them, in buckets up to 9 s of a 4.05 s run."""
    cfg = load_sim_config(f"{TINY}:dualpath", {"cluster.gpus_per_node": 1})
    trajs = [Trajectory(0, [Turn(640, 1000)])]
    full = build_simulator(cfg, trajs).run()
    rec = full[0][0]
    wb = full[2]["link_totals"]["snic/node1"]  # (the DE node's SNIC: only the write-back crosses it)
    assert wb > 0
    cut = rec.first_token + 0.5 * (rec.finished - rec.first_token)
    _, links, stats = build_simulator(cfg, trajs).run(max_time=cut)
    assert stats["sim_end_s"] == cut
    assert stats["link_totals"]["snic/node1"] == pytest.approx(0.5 * wb, rel=0.02)
    assert all(s.t0 < cut for s in links)
    assert sum(s.nbytes for s in links if s.link == "snic/node1") == pytest.approx(0.5 * wb, rel=0.02)


def _buckets(links):
    out = {}
    for s in links:
        out[(s.link, s.t0)] = s.nbytes
    return out


@pytest.mark.parametrize("seed", range(4))
def test_a_cut_run_has_the_bytes_of_the_full_run_up_to_the_cut(seed):
    """Random small runs with write-backs, cut at a random time: every bucket that ends by the cut holds what the full
    run's does, the bucket of the cut at most that, none starts at or after the cut, and the totals are the buckets'."""
    rng = random.Random(seed)
    mode = rng.choice(["dualpath", "basic", "layerwise", "dualpath_rr"])
    cfg = load_sim_config(f"{TINY}:{mode},agents=6,turns=3,seed={seed}", {"cluster.bucket_s": rng.choice([0.25, 1.0])})
    full_links = _buckets(build_simulator(cfg).run()[1])
    cut = rng.uniform(2.0, 8.0)
    _, links, stats = build_simulator(cfg).run(max_time=cut)
    assert stats["unfinished_turns"] > 0  # (a cut run)
    bucket = cfg.cluster.bucket_s
    for (link, t0), nb in _buckets(links).items():
        assert t0 < cut, (link, t0)
        if t0 + bucket <= cut:
            assert nb == pytest.approx(full_links[(link, t0)], rel=1e-9, abs=2), (link, t0)
        else:
            assert nb <= full_links[(link, t0)] + 2, (link, t0)
    for link, total in stats["link_totals"].items():
        assert sum(nb for (name, _), nb in _buckets(links).items() if name == link) == pytest.approx(
            total, abs=len(links)
        )


# ---- 2. the Python twin writes the compiled run's timestamps ------------------------------------------------------
def _python_twin(monkeypatch):
    """simulator.py from its source with the heapq event heap (a pure-Python install: DUALPATH_PURE_PYTHON=1)."""
    import importlib.util
    import os

    from dualpath_jax.sim import heap as heap_mod
    from dualpath_jax.sim import runner
    from dualpath_jax.sim import simulator as sim_mod

    path = os.path.join(os.path.dirname(sim_mod.__file__), "simulator.py")
    spec = importlib.util.spec_from_file_location("_simulator_source_for_hunt2", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.TimeHeap = heap_mod.PyTimeHeap
    load = runner.compiled.load
    monkeypatch.setattr(
        runner.compiled, "load", lambda name: mod if name == "dualpath_jax.sim.simulator" else load(name)
    )


def test_an_int_arrival_time_gives_the_same_turns_csv_in_the_python_twin(monkeypatch, tmp_path):
    """Agents given in code with an int arrival time (Trajectory(0, turns, 3)): the Python simulator's clock took the
    int from its heap, so the records' arrival, scheduled, read and prefill times were ints and turns.csv said `3`
    where the compiled run (C doubles) says `3.0`."""
    from dualpath_jax.sim import outputs, runner

    cfg = load_sim_config(f"{TINY}:dualpath", {"cluster.gpus_per_node": 1})
    trajs = [Trajectory(0, [Turn(640, 10), Turn(100, 5)], 3), Trajectory(1, [Turn(640, 10)], 3)]
    res = {}
    for which in ("compiled", "python"):
        if which == "python":
            _python_twin(monkeypatch)
        r = runner.run(cfg, trajs)
        assert r.stats["unfinished_turns"] == 0
        outputs.write_results(r, str(tmp_path / which), {}, plot=False)
        res[which] = r
    assert all(type(r.arrival) is float and type(r.prefill_start) is float for r in res["python"].records)
    assert (tmp_path / "python" / "turns.csv").read_bytes() == (tmp_path / "compiled" / "turns.csv").read_bytes()


# ---- 3. the capacity search reports its bracket -------------------------------------------------------------------
@pytest.mark.parametrize("threshold", [0.01, 0.05, 0.3, 0.77, 1.0, 5.0])
def test_capacity_search_brackets_a_monotone_verdict(monkeypatch, threshold):
    """Probes that meet the SLO up to `threshold` APS: the search returns [capacity_aps, upper_aps) around it. When
    even `lo` missed, the result said capacity 0 with no upper_aps, and reproduce_paper reported "0 (a search bound)"
    where the capacity is below `lo`, the lowest failing APS: [0, lo)."""
    from dualpath_jax.sim import capacity

    calls = []

    def probe(cfg, aps, drain_s=120.0):
        calls.append(aps)
        return {"aps": aps, "slo_met": aps <= threshold}

    monkeypatch.setattr(capacity, "probe", probe)
    cfg = load_sim_config(f"{TINY}:dualpath,aps=0.05,duration=30")
    out = capacity.capacity_search(cfg, 0.05, 1.0, iters=4)
    assert [p["aps"] for p in out["probes"]] == calls
    cap, upper = out["capacity_aps"], out.get("upper_aps")
    if threshold >= 1.0:
        assert cap == 1.0 and upper is None  # hi met it: the search bound
    else:
        assert cap <= threshold < upper
        assert cap == 0.0 or upper - cap == pytest.approx(0.95 / 2**4)
        assert all(p["slo_met"] == (p["aps"] <= cap) for p in out["probes"])


# ---- 4. the SLO's percentiles do not overwrite the all-turn ones --------------------------------------------------
@pytest.mark.parametrize("pct", [50.0, 99.0])
def test_the_slo_percentiles_leave_the_all_turn_ones_in_the_summary(pct):
    """An online run judged at slo_percentile 50 or 99: the summary's ttft_p50_s / ttft_p99_s / tpot_* are the
    percentiles over every turn (metrics.summarize), as at the default 90. The SLO's own percentile (turns arriving
    in [warmup, duration) only) overwrote them: ttft_p50_s 0.15522 instead of 0.15510 s."""
    from dualpath_jax import metrics
    from dualpath_jax.sim import runner

    cfg = load_sim_config(f"{TINY}:dualpath,aps=3,duration=20,warmup=5", {"slo_percentile": pct})
    res = runner.run(cfg, max_time=25)
    q = int(pct)
    ttft = [r.ttft for r in res.records]
    tpot = [r.tpot for r in res.records]
    assert res.summary[f"ttft_p{q}_s"] == metrics.percentile(ttft, q)
    assert res.summary[f"tpot_p{q}_s"] == metrics.percentile(tpot, q)
    slo = runner.slo_summary(cfg, res.records)
    assert slo[f"ttft_p{q}_s"] != metrics.percentile(ttft, q)  # (the warm-up's turns are left out there)
    assert res.summary[f"slo_ttft_p{q}_s"] == slo[f"ttft_p{q}_s"]
    assert res.summary[f"slo_tpot_p{q}_s"] == slo[f"tpot_p{q}_s"]
    assert res.summary["slo_met"] == slo["slo_met"] and res.summary["slo_attainment"] == slo["slo_attainment"]


def test_a_negative_or_infinite_drain_is_refused_by_name():
    """A negative drain_s ended every probe before its arrivals did: every probe a miss, capacity 0, no error."""
    from dualpath_jax.sim import capacity

    cfg = None  # refused before the config is looked at
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="drain_s must be >= 0 s and finite"):
            capacity.probe(cfg, 1.0, drain_s=bad)


def test_a_mode_says_which_explicit_settings_it_overrides(caplog):
    """`:basic` with `--config.cluster.layerwise=true` ran without layerwise and said nothing."""
    import logging

    from dualpath_jax.sim.config import sim_config_from_dict

    given = {"cluster.layerwise": True}
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.sim.config"):
        sc = sim_config_from_dict({"mode": "basic", "cluster": {"layerwise": True}}, explicit=given)
    assert sc.cluster.layerwise is False  # the mode still decides
    assert "sets config.cluster.layerwise=False: the given True is not used" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.sim.config"):
        sc = sim_config_from_dict(
            {"mode": "layerwise", "scheduler": {"name": "round_robin", "kwargs": {}}}, explicit={"scheduler.name"}
        )
    assert sc.policy == "basic" and "config.scheduler.name 'round_robin' is not used" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.sim.config"):  # agreeing or not given: quiet
        sim_config_from_dict(
            {"mode": "dualpath_rr", "cluster": {"fetch_scope": "global"}}, explicit={"cluster.fetch_scope"}
        )
        sim_config_from_dict({"mode": "basic", "cluster": {"layerwise": True}})
    assert caplog.text == ""


def test_simulate_warns_when_its_mode_replaces_a_flag(tmp_path):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "experiments.simulate", "--config=configs/sim_tiny.py:basic",
         "--config.cluster.layerwise=true", f"--output_dir={tmp_path}", "--noplot"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "config.mode 'basic' sets config.cluster.layerwise=False: the given True is not used" in out.stderr


def test_a_code_override_through_a_value_is_named():
    """`load_config(spec, {"cluster.snic_gbps.x": 1})` failed with "argument of type 'float' is not iterable"."""
    from dualpath_jax.sim.configs_io import load_config

    with pytest.raises(KeyError, match=r"has no field 'cluster.snic_gbps.x' \('cluster.snic_gbps' is not a section\)"):
        load_config("configs/sim_tiny.py", {"cluster.snic_gbps.x": 1})
    with pytest.raises(KeyError, match=r"has no field 'nope.x'"):
        load_config("configs/sim_tiny.py", {"nope.x": 1})
    assert load_config("configs/sim_tiny.py", {"cluster.snic_gbps": 7.0}).cluster.snic_gbps == 7.0
