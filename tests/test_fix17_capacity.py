"""Fix wave 17, the "capacity" journey: a researcher gets the paper's headline online figure, the capacity under the
SLO and DualPath's gain in it, for a setup, policy or SLO of their own with `python -m experiments.capacity`
(before, only `reproduce_paper --online` searched it, for the paper's two setups; anything else was Python).

The launcher is a new feature: these tests pin its contract. Each search equals `capacity_search` called directly
on the same config (deterministic per seed), the gain printed is the ratio of the two capacities, a bracket edge is
reported as such ("< lo" / ">= hi", no measured-looking number), a bad flag / mode / item is one line before any
search runs, and an earlier search's results are refused without --overwrite. `capacity_search`'s new `on_probe`
callback (the launcher's progress line per probe) is checked on its own.
"""

from __future__ import annotations

import csv
import json
import os
import re

import pytest
import test_launch_hunt as launch_hunt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "configs/sim_tiny.py"
# a short arrival window: at 30 s, 2 bisection steps give basic 8.25 APS and dualpath 4.375 (a gain not 1)
WINDOW = "duration=30"


def _capacity(out_dir, *flags: str):
    return launch_hunt._launch(
        "-m", "experiments.capacity", f"--setups={TINY}", f"--output_dir={out_dir}", *flags, timeout=120
    )


def _rows(out_dir) -> tuple[list[dict], list[dict]]:
    with open(os.path.join(out_dir, "capacity.json")) as f:
        searches = json.load(f)
    with open(os.path.join(out_dir, "capacity.csv"), newline="") as f:
        return searches, list(csv.DictReader(f))


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """basic and dualpath on the tiny setup, 2 bisection steps in [0.5, 16] APS."""
    out_dir = str(tmp_path_factory.mktemp("capacity"))
    out = _capacity(out_dir, "--modes=basic,dualpath", "--lo=0.5", "--hi=16", "--iters=2", f"--extra={WINDOW}")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    return out_dir, out


def test_each_search_is_capacity_search_on_the_same_config_and_the_gain_their_ratio(searched):
    from dualpath_jax.sim import load_sim_config
    from dualpath_jax.sim.capacity import capacity_search

    out_dir, out = searched
    for name in ("capacity.json", "capacity.csv", "capacity.png", "run.json"):
        assert os.path.exists(os.path.join(out_dir, name)), name
    searches, csv_rows = _rows(out_dir)
    assert [(r["mode"], r["seed"]) for r in searches] == [("basic", 0), ("dualpath", 0)]
    assert [r["mode"] for r in csv_rows] == ["basic", "dualpath"]
    caps = {}
    for r, c in zip(searches, csv_rows, strict=True):
        # the same search, called directly (as reproduce_paper's --online does: a probe makes the workload online)
        direct = capacity_search(load_sim_config(f"{TINY}:{r['mode']},{WINDOW},aps=0.5"), 0.5, 16.0, iters=2)
        assert r["bound"] == "measured" and r["capacity_aps"] == direct["capacity_aps"] > 0
        assert [p["aps"] for p in r["probe_results"]] == [p["aps"] for p in direct["probes"]]
        assert [p["slo_attainment"] for p in r["probe_results"]] == [p["slo_attainment"] for p in direct["probes"]]
        assert (r["met_aps"], r["missed_aps"]) == (direct["capacity_aps"], direct["upper_aps"])
        for p in r["probe_results"]:  # every probe: aps, verdict, attainment, TTFT / TPOT at the percentile
            assert {"aps", "slo_met", "slo_attainment", "ttft_p90_s", "tpot_p90_s"} <= set(p)
        assert float(c["capacity_aps"]) == direct["capacity_aps"] and int(c["probes"]) == len(direct["probes"])
        assert (r["slo_ttft_s"], r["slo_tpot_s"], r["slo_percentile"], r["duration_s"]) == (4.0, 0.05, 90.0, 30.0)
        caps[r["mode"]] = direct["capacity_aps"]
    gain = caps["dualpath"] / caps["basic"]
    assert gain != 1.0  # (the ratio is told apart from a copy of either capacity)
    assert searches[1]["gain"] == pytest.approx(gain) and "gain" not in searches[0]
    assert float(csv_rows[1]["gain"]) == pytest.approx(gain) and csv_rows[0]["gain"] == ""
    printed = re.search(r"dualpath / basic: ([0-9.]+)x", out.stdout)
    assert printed and float(printed.group(1)) == pytest.approx(gain, rel=1e-2), out.stdout
    assert "SLO: p90 TTFT <= 4 s and p90 TPOT <= 50 ms" in out.stdout
    # a log line per probe (the search shows life): each probe's APS and verdict
    assert len(re.findall(r"capacity sim_tiny.py:basic: [0-9.]+ APS: SLO (met|missed)", out.stderr)) == 4
    with open(os.path.join(out_dir, "run.json")) as f:
        info = json.load(f)
    assert info["bracket"] == {"lo": 0.5, "hi": 16.0, "iters": 2} and len(info["searches"]) == 2


def test_an_earlier_search_is_refused_without_overwrite(searched, tmp_path):
    out_dir, _ = searched
    held = {n: open(os.path.join(out_dir, n)).read() for n in ("capacity.json", "capacity.csv")}
    out = _capacity(out_dir, "--modes=basic", "--iters=0", f"--extra={WINDOW}")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "holds an earlier run's results" in out.stderr and "--overwrite" in out.stderr, out.stderr[-2000:]
    assert held == {n: open(os.path.join(out_dir, n)).read() for n in held}  # nothing replaced
    # with --overwrite, in a copy: replaced, and the earlier plot goes when none is drawn
    copy = tmp_path / "copy"
    copy.mkdir()
    for n in ("capacity.json", "capacity.csv", "capacity.png"):
        (copy / n).write_bytes(open(os.path.join(out_dir, n), "rb").read())
    out = _capacity(str(copy), "--modes=basic", "--lo=12", "--hi=16", "--iters=0", f"--extra={WINDOW}", "--overwrite",
                    "--noplot")  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert [r["mode"] for r in _rows(str(copy))[0]] == ["basic"] and not (copy / "capacity.png").exists()


def test_a_bracket_edge_is_reported_as_such_not_as_a_measured_capacity(tmp_path):
    """lo missing its SLO: "< lo" (capacity_search's 0.0 is no capacity of 0 APS); hi meeting it: ">= hi" (hi is the
    search bound, not a capacity); neither has a gain."""
    below, above = str(tmp_path / "below"), str(tmp_path / "above")
    out = _capacity(below, "--modes=basic,dualpath", "--lo=12", "--hi=16", "--iters=0", f"--extra={WINDOW}",
                    "--noplot", "--seeds=0,1")  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    searches, csv_rows = _rows(below)
    assert [(r["mode"], r["seed"]) for r in searches] == [("basic", 0), ("dualpath", 0), ("basic", 1), ("dualpath", 1)]
    for r, c in zip(searches, csv_rows, strict=True):
        assert r["spec"].endswith(f",seed={r['seed']}")
        assert (r["bound"], r["capacity"], r["capacity_aps"], r["met_aps"], r["missed_aps"]) == (
            "below_lo", "< 12", None, None, 12.0
        )  # fmt: skip
        assert (c["capacity"], c["capacity_aps"]) == ("< 12", "")
        assert r.get("gain") is None
    assert "< 12" in out.stdout and "dualpath / basic: n/a (dualpath capacity < 12)" in out.stdout
    out = _capacity(above, "--modes=basic", "--lo=0.25", "--hi=0.5", "--iters=3", f"--extra={WINDOW}", "--noplot")
    assert out.returncode == 0, out.stderr[-2000:]
    (r,), (c,) = _rows(above)
    assert (r["bound"], r["capacity"], r["capacity_aps"], r["met_aps"], r["missed_aps"]) == (
        "at_hi", ">= 0.5", None, 0.5, None
    )  # fmt: skip
    assert (c["capacity"], c["capacity_aps"]) == (">= 0.5", "") and r["probes"] == 2
    assert ">= 0.5" in out.stdout


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--lo=2", "--hi=1"], "need 0 < lo < hi"),
        (["--lo=0", "--hi=1"], "need 0 < lo < hi"),
        (["--hi=inf"], "need 0 < lo < hi"),
        (["--modes=basic,nosuch"], "'nosuch' is neither a mode"),
        (["--extra=snic=25"], "unknown key 'snic'"),
        (["--modes=basic,dualpath+policy.nosuch=1"], "'dualpath' does not take ['nosuch']"),
        (["--extra=aps=1"], "'aps=1' has no place in a capacity search"),
        (["--extra=agents=64"], "'agents=64' has no place in a capacity search"),
        (["--extra=warmup=40,duration=30"], "must be below config.workload.duration_s"),
        (["--slo_percentile=150"], "config.slo_percentile must be > 0 and <= 100"),
        (["--seeds=1", "--extra=seed=2"], "--seeds and a seed= item both set the seed"),
    ],
)
def test_a_bad_flag_mode_or_item_is_one_line_before_any_search(tmp_path, flags, says):
    out_dir = tmp_path / "out"
    out = _capacity(str(out_dir), *flags)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert says in out.stderr, out.stderr[-2000:]
    assert not out_dir.exists()  # no search ran, nothing was written


def test_slo_flags_set_the_bound_the_searches_judge(tmp_path):
    """No variant item sets the SLO's bounds: --slo_ttft_s / --slo_tpot_s / --slo_percentile do."""
    out = _capacity(str(tmp_path), "--modes=basic", "--lo=0.5", "--hi=16", "--iters=0", f"--extra={WINDOW}",
                    "--noplot", "--slo_ttft_s=0.05", "--slo_percentile=50")  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    (r,), _ = _rows(str(tmp_path))
    assert (r["slo_ttft_s"], r["slo_percentile"], r["bound"]) == (0.05, 50.0, "below_lo")  # 0.3 s TTFTs miss 50 ms
    assert "ttft_p50_s" in r["probe_results"][0] and "p50 TTFT <= 0.05 s" in out.stdout


def test_capacity_search_reports_each_probe_as_it_finishes(monkeypatch):
    """`on_probe` gets every probe, in the order run, the same dicts the result holds."""
    from dualpath_jax.sim import capacity

    monkeypatch.setattr(capacity, "probe", lambda cfg, aps, drain_s: {"aps": aps, "slo_met": aps <= 3.0})

    class Cfg:
        warmup_s = 0.0

        class workload:
            duration_s = 10.0

    seen = []
    out = capacity.capacity_search(Cfg, 1.0, 5.0, iters=2, on_probe=seen.append)
    assert [p["aps"] for p in seen] == [1.0, 5.0, 3.0, 4.0] and seen == out["probes"]
    assert (out["capacity_aps"], out["upper_aps"]) == (3.0, 4.0)


# sim_tiny, whose search of mode $FAIL_AT raises when it runs (its config's second load: the first is the check)
_FAILING_SETUP = """
import os
from configs.sim_tiny import get_config as _tiny

def get_config(arg=None):
    cfg = _tiny(arg)
    key = "LOADS_" + cfg.mode
    os.environ[key] = str(int(os.environ.get(key, "0")) + 1)
    if cfg.mode == os.environ.get("FAIL_AT") and os.environ[key] == "2":
        raise RuntimeError("this search broke")
    return cfg
"""


def test_a_failed_search_is_its_rows_error_and_the_others_are_kept(tmp_path):
    """A search that raises is its row's error (a failing exit naming it, after the results are written); the
    other searches report, and a gain over a failed first mode says why it has none."""
    setup = tmp_path / "failing_tiny.py"
    setup.write_text(_FAILING_SETUP)
    out = launch_hunt._launch(
        "-m", "experiments.capacity", f"--setups={setup}", f"--output_dir={tmp_path / 'out'}",
        "--modes=basic,dualpath", "--lo=0.5", "--hi=16", "--iters=0", f"--extra={WINDOW}", "--noplot",
        env={"FAIL_AT": "basic"}, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "1 of 2 searches failed" in out.stderr and "this search broke" in out.stderr
    searches, csv_rows = _rows(str(tmp_path / "out"))
    assert "this search broke" in searches[0]["error"] and "error" not in searches[1]
    assert searches[1]["bound"] == "measured" and csv_rows[1]["capacity"] == searches[1]["capacity"]
    assert searches[1]["gain"] is None and searches[1]["gain_note"] == "basic failed"
    assert "dualpath / basic: n/a (basic failed)" in out.stdout
