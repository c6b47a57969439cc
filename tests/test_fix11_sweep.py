"""Fix wave 11, the "sweep" journey: a researcher compares policies with `experiments.sweep` and
`experiments.reproduce_paper` and reads what comes out. Each test failed before its fix:

- reproduce_paper --online with --appends / --pd_ratios / --online_scale: the online capacity rows (4 columns)
  were appended to whichever table came last (the append table's 5 columns, the online scale table's 6), so
  report.md showed "online capacity DS 660B basic (APS)" as a row of the append table; they are now a metric
  table of their own there;
- reproduce_paper --overwrite into a directory with an earlier report, where a run then failed: the partial
  report.json replaced the earlier one but the earlier report.md / report.png stayed beside it, passing for
  this run's; they are now removed (the README: a failed run "writes no report.md");
- sweep: a failed cell's row carried its seed as the flag's text ("1" in sweep.json, where the finished cells
  have the number 1), so a reader selecting seed 1 missed it.

A sweep cell equals a single `experiments.simulate` run of the same spec (checked here by recomputing it).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys

import test_launch_hunt as launch_hunt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "configs/sim_tiny.py"


def _launch(*cmd: str, timeout: float = 300, env: dict | None = None):
    return launch_hunt._launch(*cmd, timeout=timeout, env=env)


# reproduce_paper with its simulations replaced by fixed figures (JCT seconds, capacities in APS); FAIL_AT=mode
# makes that mode's offline runs raise
_FAKE_REPRODUCE = """
import os
from absl import app
import experiments.reproduce_paper as rp

JCT = {"basic": 200.0, "layerwise": 160.0, "dualpath_rr": 120.0, "dualpath": 100.0, "oracle": 90.0}
CAP = {("configs/paper_ds660b.py", "basic"): 0.2, ("configs/paper_ds660b.py", "dualpath"): 0.4,
       ("configs/paper_ds27b.py", "basic"): 0.25, ("configs/paper_ds27b.py", "dualpath"): 0.5}

def offline(spec):
    mode = spec.split(":")[1].split(",")[0]
    if mode == os.environ.get("FAIL_AT"):
        raise RuntimeError("the run broke")
    jct = JCT[mode] * (0.5 if "append=" in spec else 1.0)
    return {"spec": spec, "jct_s": jct, "snic_max_over_avg": 1.2, "unfinished": 0, "wall_s": 0.0,
            "ttft_p50_s": 1.5, "tpot_p50_s": 0.037, "slo_met": True, "turns": 10}

def capacity(args):
    setup, mode = args[:2]
    return {"capacity_aps": CAP[(setup, mode)], "upper_aps": CAP[(setup, mode)] + 0.05, "probes": [],
            "setup": setup, "mode": mode}

rp._offline, rp._capacity = offline, capacity
app.run(rp.main)
"""


def _tables(md: str) -> list[list[list[str]]]:
    """The markdown tables of `md`: each a list of rows, each row its cells."""
    tables, cur = [], None
    for line in md.splitlines():
        if line.startswith("|"):
            if cur is None:
                cur = []
                tables.append(cur)
            cur.append([c.strip() for c in line.strip().strip("|").split("|")])
        else:
            cur = None
    return tables


def test_reproduce_paper_online_capacity_rows_are_their_own_table_after_other_tables(tmp_path):
    """With --appends (or --pd_ratios, --online_scale) the capacity rows ran on under the last table's header:
    a 4-cell row in a 5- or 6-column table. Every table now has rows as wide as its header, and the capacity rows
    sit under a `metric | paper | simulator | sim/paper` header with the right paper figures and ratios."""
    script = tmp_path / "fake_reproduce.py"
    script.write_text(_FAKE_REPRODUCE)
    for extra in (["--appends=2"], ["--online_scale"], ["--appends=2", "--pd_ratios=1P1D"], []):
        out_dir = tmp_path / ("out" + "".join(extra).replace("-", "_").replace("=", "_").replace(",", "_"))
        out = _launch(str(script), "--online", "--noplot", f"--output_dir={out_dir}", *extra)
        assert out.returncode == 0, out.stderr[-2000:]
        tables = _tables((out_dir / "report.md").read_text())
        for t in tables:  # (the header's width is every row's)
            assert all(len(row) == len(t[0]) for row in t), (extra, t)
        (cap,) = [t for t in tables if any(row[0].startswith("online capacity") for row in t)]
        assert cap[0] == ["metric", "paper", "simulator", "sim/paper"], (extra, cap[0])
        rows = {row[0]: row[1:] for row in cap[2:]}
        # PAPER.md: "1.67x (DS 27B: 0.3 -> 0.5 APS), 2.25x (DS 660B: 0.2 -> 0.45 APS)"
        assert rows["online capacity DS 660B basic (APS)"] == ["0.2", "0.2", "1.000"]
        assert rows["online capacity DS 660B DualPath (APS)"] == ["0.45", "0.4", f"{0.4 / 0.45:.3f}"]
        assert rows["online capacity gain DS 660B"] == ["2.25x", "2x", f"{2.0 / 2.25:.3f}"]
        assert rows["online capacity gain DS 27B"] == ["1.67x", "2x", f"{2.0 / 1.67:.3f}"]


def test_reproduce_paper_failed_overwrite_leaves_no_earlier_report_md(tmp_path):
    """A run with --overwrite into a directory holding a finished report, where one run failed: report.json became
    the partial results, and the earlier run's report.md and report.png stayed beside it as if they were this
    run's. Now neither is there, and the failure names the run."""
    script = tmp_path / "fake_reproduce.py"
    script.write_text(_FAKE_REPRODUCE)
    out_dir = tmp_path / "out"
    out = _launch(str(script), f"--output_dir={out_dir}", "--noplot")
    assert out.returncode == 0 and (out_dir / "report.md").exists(), out.stderr[-2000:]
    (out_dir / "report.png").write_bytes(b"an earlier report's plot")
    out = _launch(str(script), f"--output_dir={out_dir}", "--noplot", "--overwrite", env={"FAIL_AT": "oracle"})
    assert out.returncode == 1 and "1 of 5 runs failed" in out.stderr and "the run broke" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert len(json.loads((out_dir / "report.json").read_text())) == 4  # the finished runs
    assert not (out_dir / "report.md").exists() and not (out_dir / "report.png").exists()


# sim_tiny, except that the run of seed 1's cell raises (its second load: the first is the sweep's check)
_FAILING_SEED_SETUP = """
import os
from configs.sim_tiny import get_config as _tiny

def get_config(arg=None):
    cfg = _tiny(arg)
    if cfg.seed == 1:
        key = "SEED1_LOADS_" + cfg.mode
        os.environ[key] = str(int(os.environ.get(key, "0")) + 1)
        if os.environ[key] != "1":
            raise RuntimeError("seed 1 broke")
    return cfg
"""


def test_sweep_failed_cell_keeps_its_seed_as_a_number_and_cells_equal_single_runs(tmp_path):
    """The failed cell's row said seed "1" (text) in sweep.json where finished rows say 1; its neighbours keep
    their places; and each finished cell's figures are those of one `run` of `<setup>:<mode>,<load>,seed=N`."""
    setup = tmp_path / "failing_seed.py"
    setup.write_text(_FAILING_SEED_SETUP)
    out_dir = tmp_path / "out"
    out = _launch(
        "-m", "experiments.sweep", f"--setups={setup}", "--modes=basic,dualpath", "--loads=agents=3",
        "--extra=turns=2", "--seeds=0,1", "--workers=1", "--noplot", f"--output_dir={out_dir}",
    )  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "2 of 4 cells failed" in out.stderr and "seed 1 broke" in out.stderr
    rows = json.loads((out_dir / "sweep.json").read_text())
    assert [(r["mode"], r["seed"]) for r in rows] == [("basic", 0), ("basic", 1), ("dualpath", 0), ("dualpath", 1)]
    assert ["error" in r for r in rows] == [False, True, False, True]
    assert [r["seed"] for r in csv.DictReader(open(out_dir / "sweep.csv"))] == ["0", "1", "0", "1"]

    sys.path.insert(0, REPO)
    from dualpath_jax.sim import load_sim_config, run

    for r in rows[::2]:  # recomputed: one run of the same spec
        s = run(load_sim_config(f"{REPO}/{TINY}:{r['mode']},agents=3,turns=2,seed=0", as_run=True)).summary
        for k in ("turns", "jct_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "snic_max_over_avg"):
            assert r[k] == s[k], (r["mode"], k, r[k], s[k])


def test_sweep_plot_draws_the_seed_mean_with_min_max_bars(tmp_path, monkeypatch):
    """(No fix: a check of the README's contract.) sweep.png's line per mode is the mean over seeds at each load,
    its error bar the [min, max], each load at its place on the x axis; recomputed here from the rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import experiments.sweep as sweep

    figs = []

    class _Plt:
        def subplots(self, *a, **k):
            fig, axes = plt.subplots(*a, **k)
            figs.append(fig)
            return fig, axes

        def close(self, fig):
            pass

    monkeypatch.setattr(sweep, "pyplot_or_none", lambda name: _Plt())
    rows = [
        {"setup": "s.py", "mode": m, "load": ld, "seed": sd, "jct_s": 10.0 * i + sd * (1 + i), "ttft_p50_s": None}
        for i, (m, ld) in enumerate([("basic", "agents=8"), ("basic", "agents=4"), ("dualpath", "agents=8")])
        for sd in (0, 1, 2)
    ]
    assert sweep.plot_sweep(rows, str(tmp_path / "sweep.png")) and (tmp_path / "sweep.png").exists()
    (ax,) = figs[0].axes  # only jct_s has values
    assert [t.get_text() for t in ax.get_xticklabels()] == ["agents=8", "agents=4"]
    lines = {c.get_label(): c for c in ax.containers}  # one ErrorbarContainer per mode
    for mode, want in (("basic", {0: [0, 1, 2], 1: [10, 12, 14]}), ("dualpath", {0: [20, 23, 26]})):
        x, y = lines[mode].lines[0].get_data()
        got = dict(zip(x, y, strict=True))
        for i, vals in want.items():
            assert got[i] == sum(vals) / len(vals)
        # the bars' ends: [min, max] of the seeds
        (bars,) = lines[mode].lines[2]
        segs = [seg for seg in bars.get_segments() if seg.ndim == 2 and all(map(math.isfinite, seg[:, 1]))]
        ends = sorted(tuple(sorted(seg[:, 1])) for seg in segs)  # (a load a mode lacks: NaN, no bar)
        assert ends == sorted((min(v), max(v)) for v in want.values())
