"""The launchers' plots, looked at (session 44): each plot function still writes a file for normal and edge inputs
(no data, one point, NaN), and what a reader stumbled on is fixed, checked on the Figure (no pixel compare):

- plot.png (simulate): an idle storage-NIC bucket drew as traffic (links.csv has no row for it: the line ran
  straight between busy buckets); an oracle run's title said "dualpath"; a blank panel said nothing; 144 nodes
  drew 144 lines and a legend over the panel; the TTFT axis labelled its minor ticks over one another.
- capacity.png: the APS axis labelled its minor ticks as 2x10^0, 3x10^0, 4x10^0, 6x10^0, overlapping; the SLO
  was in no title; a mode's colour changed with the panel.
- sweep.png: a mode with no value (oracle's storage-NIC max/avg) was a missing line with no word; equal values
  showed only the last mode.
- report.png: a simulator value of NaN (a search bound) was a missing bar, its "n/a" nowhere.
- run.png: the JCT bars were all blue, the policies orange / blue in the panels beside.
- bench_runtime.png: its title said "1P2D I/O-bound" whatever ran, and not the simulator's speedup.
"""

from __future__ import annotations

import math
import os
import types

import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def figs(monkeypatch):
    """The figures the plot functions draw, kept open (pyplot.close is a no-op here): `figs()` -> the last one."""
    import matplotlib.pyplot as plt

    plt.close("all")
    monkeypatch.setattr(plt, "close", lambda *a: None)
    yield plt.gcf
    monkeypatch.undo()
    plt.close("all")


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def _visible_tick_labels(ax, axis: str = "x") -> list:
    """The drawn tick labels (major and minor) inside the axis' view, as Text objects."""
    ax.figure.canvas.draw()
    a = ax.xaxis if axis == "x" else ax.yaxis
    lo, hi = sorted(ax.get_xlim() if axis == "x" else ax.get_ylim())
    out = []
    for ticks in (a.get_major_ticks(), a.get_minor_ticks()):
        for t in ticks:
            if t.label1.get_visible() and t.label1.get_text() and lo <= t.get_loc() <= hi:
                out.append(t.label1)
    return out


def _assert_no_overlap(labels) -> None:
    boxes = [t.get_window_extent() for t in labels]
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not boxes[i].overlaps(boxes[j]), (labels[i].get_text(), labels[j].get_text())


# ---- simulate: plot.png -------------------------------------------------------------------------------------------
def _sim_config(spec: str = "sim_tiny.py:dualpath,agents=2,turns=2"):
    from dualpath_jax.sim import load_sim_config

    return load_sim_config(os.path.join(REPO, "configs", spec))


def _record(i: int, ttft: float):
    from dualpath_jax.metrics import TurnRecord

    return TurnRecord(trajectory_id=i, turn_index=0, prompt_tokens=10, hit_tokens=0, gen_tokens=2, arrival=0.0,
                      first_token=ttft)  # fmt: skip


def test_simulate_plot_draws_an_idle_bucket_as_zero(figs, tmp_path):
    from dualpath_jax.metrics import LinkBytes
    from dualpath_jax.sim.outputs import plot_result

    links = [LinkBytes("snic/node0", t, t + 1.0, 2 * 10**9) for t in (0.0, 1.0, 5.0)]  # idle in [2, 5)
    res = types.SimpleNamespace(links=links, records=[_record(0, 0.5)])
    assert plot_result(res, str(tmp_path / "p.png")) and (tmp_path / "p.png").stat().st_size > 0
    (line,) = figs().axes[0].lines
    assert list(line.get_xdata()) == [0.0, 1.0, 2.0, 4.0, 5.0]
    assert list(line.get_ydata()) == [2.0, 2.0, 0.0, 0.0, 2.0]


def test_simulate_plot_names_the_oracle_and_its_empty_panels(figs, tmp_path):
    from dualpath_jax.sim.outputs import plot_result

    cfg = _sim_config("sim_tiny.py:oracle,agents=2,turns=2")
    res = types.SimpleNamespace(config=cfg, links=[], records=[], summary={"jct_s": math.nan})
    plot_result(res, str(tmp_path / "p.png"), name="sim_tiny")
    fig = figs()
    assert fig._suptitle.get_text().startswith("sim_tiny dualpath oracle (I/O free), 2 agents offline")
    assert _texts(fig.axes[0]) == ["no storage-NIC traffic (oracle: I/O free)"]
    assert _texts(fig.axes[1]) == ["no turn got its first token"]
    assert (tmp_path / "p.png").stat().st_size > 0


def test_simulate_plot_one_point_nan_and_a_zero_ttft(figs, tmp_path):
    """One bucket, a turn with no first token (NaN) and a TTFT of 0 (a log axis would drop it: linear there)."""
    from dualpath_jax.metrics import LinkBytes
    from dualpath_jax.sim.outputs import plot_result

    recs = [_record(0, math.nan), _record(1, 0.0), _record(2, 0.3)]
    res = types.SimpleNamespace(links=[LinkBytes("snic/node0", 0.0, 0.0, 0)], records=recs)
    assert plot_result(res, str(tmp_path / "p.png"))
    ax2 = figs().axes[1]
    assert ax2.get_xscale() == "linear" and list(ax2.lines[0].get_xdata()) == [0.0, 0.3]


def test_simulate_plot_of_many_nodes_draws_each_role_not_each_node(figs, tmp_path):
    from dualpath_jax.metrics import LinkBytes
    from dualpath_jax.sim.outputs import plot_result

    cfg = _sim_config("sim_tiny.py:dualpath,agents=2,turns=2,pd=4P8D")
    links = [LinkBytes(f"snic/node{n}", 0.0, 1.0, (n + 1) * 10**9) for n in range(12)]
    links.append(LinkBytes("snic/node2/high", 0.0, 1.0, 10**9))  # (a class of node 2's link: not a node)
    plot_result(types.SimpleNamespace(config=cfg, links=links, records=[]), str(tmp_path / "p.png"))
    ax = figs().axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["PE nodes (4): mean", "PE nodes: busiest", "other links (1): mean", "other links: busiest",
                      "DE nodes (8): mean", "DE nodes: busiest"]  # fmt: skip
    assert [line.get_ydata()[0] for line in ax.lines] == [2.5, 4.0, 1.0, 1.0, 8.5, 12.0]  # GB/s


def test_simulate_ttft_axis_labels_do_not_overlap(figs, tmp_path):
    from dualpath_jax.sim.outputs import plot_result

    recs = [_record(i, 0.2 + 0.05 * i) for i in range(100)]  # 0.2 .. 5.15 s: about one decade
    plot_result(types.SimpleNamespace(links=[], records=recs), str(tmp_path / "p.png"))
    labels = _visible_tick_labels(figs().axes[1])
    assert [t.get_text() for t in labels] == ["0.2", "0.5", "1", "2", "5"]
    _assert_no_overlap(labels)


# ---- capacity.png -------------------------------------------------------------------------------------------------
def _capacity_row(setup, mode, seed, aps, att, capacity_aps=None):
    probes = [
        {"aps": a, "slo_attainment": t, "slo_met": t is not None and t >= 0.9} for a, t in zip(aps, att, strict=True)
    ]
    return {"setup": setup, "mode": mode, "seed": seed, "capacity": str(capacity_aps or ">= 8"),
            "capacity_aps": capacity_aps, "probe_results": probes, "slo_ttft_s": 4.0, "slo_tpot_s": 0.05,
            "slo_percentile": 90.0, "warmup_s": 5.0, "duration_s": 30.0}  # fmt: skip


def test_capacity_plot_aps_labels_are_plain_and_apart(figs, tmp_path):
    """capacity.png over APS 0.5 .. 8 (sim_tiny, 2 bisection steps): its x labels were 10^0 and the minor ticks'
    2x10^0, 3x10^0, 4x10^0, 6x10^0 run together."""
    from experiments.capacity import plot_capacity

    rows = [
        _capacity_row("sim_tiny.py", "basic", 0, [0.5, 8.0], [1.0, 0.986]),
        _capacity_row("sim_tiny.py", "dualpath", 0, [0.5, 4.25, 6.125, 8.0], [1.0, 1.0, 1.0, 0.873], 6.125),
    ]
    assert plot_capacity(rows, str(tmp_path / "c.png")) and (tmp_path / "c.png").stat().st_size > 0
    ax = figs().axes[0]
    labels = _visible_tick_labels(ax)
    assert [t.get_text() for t in labels] == ["0.5", "1", "2", "5"]
    _assert_no_overlap(labels)
    assert "SLO: TTFT p90 <= 4 s, TPOT p90 <= 0.05 s, turns arriving in [5, 30) s" in ax.get_title()


def test_capacity_plot_keeps_a_mode_colour_across_panels_and_handles_edges(figs, tmp_path):
    from experiments.capacity import plot_capacity

    rows = [
        _capacity_row("a.py", "basic", 0, [0.5], [1.0]),  # one point
        _capacity_row("a.py", "dualpath", 0, [0.5, 1.0], [None, math.nan]),  # no turn judged
        _capacity_row("b.py", "dualpath", 0, [0.5, 2.0], [1.0, 0.5], 0.5),  # (basic absent in b.py)
        _capacity_row("c.py", "basic", 0, [], []),  # no probe
    ]
    assert plot_capacity(rows, str(tmp_path / "c.png"))
    a, b, c = figs().axes
    hexes: dict[str, set] = {}  # mode -> the colours of its lines in every panel (a hollow marker: "_" label)
    for ax in (a, b):
        for ln in ax.lines:
            if not ln.get_label().startswith("_"):
                hexes.setdefault(ln.get_label().split(":")[0], set()).add(matplotlib.colors.to_hex(ln.get_color()))
    assert hexes == {"basic": {matplotlib.colors.to_hex("C0")}, "dualpath": {matplotlib.colors.to_hex("C1")}}
    assert _texts(c) == ["no probe ran"]
    assert plot_capacity([], str(tmp_path / "empty.png")) and (tmp_path / "empty.png").exists()


# ---- sweep.png ----------------------------------------------------------------------------------------------------
def test_sweep_plot_names_a_mode_without_values_and_tells_equal_lines_apart(figs, tmp_path):
    from experiments import sweep

    rows = [
        {"setup": "s.py", "mode": m, "load": ld, "seed": 0, "jct_s": 10.0, "ttft_p50_s": 0.1,
         "snic_max_over_avg": (math.nan if m == "oracle" else 1.5), "slo_attainment": 1.0,
         "slo": "ttft<=4s;tpot<=0.05s;p90;warmup=0s"}
        for m in ("basic", "dualpath", "oracle") for ld in ("aps=0.5", "aps=1")
    ]  # fmt: skip
    assert sweep.plot_sweep(rows, str(tmp_path / "s.png")) and (tmp_path / "s.png").stat().st_size > 0
    fig = figs()
    jct, ttft, snic, att = fig.axes
    assert snic.get_title().endswith("\nno value: oracle") and "no value" not in jct.get_title()
    assert snic.get_ylim()[0] == 1 and att.get_ylim()[1] == 1.02
    marks = [c.lines[0].get_marker() for c in att.containers]  # equal values: each mode its own marker
    assert len(set(marks)) == 3
    assert jct.get_ylim()[1] > 10.0 * 1.05  # (the top marker was cut in half at the frame)
    assert "SLO ttft<=4s;tpot<=0.05s;p90;warmup=0s" in fig._suptitle.get_text()


def test_sweep_plot_one_cell(figs, tmp_path):
    from experiments import sweep

    rows = [{"setup": "s.py", "mode": "basic", "load": "", "seed": 0, "jct_s": math.nan, "ttft_p50_s": None}]
    assert sweep.plot_sweep(rows, str(tmp_path / "s.png"))
    assert figs().axes[0].get_title().endswith("no value: basic")


# ---- report.png ---------------------------------------------------------------------------------------------------
def test_report_plot_says_n_a_where_the_simulator_has_no_value(figs, tmp_path):
    from experiments import reproduce_paper

    headline = {
        "speedup and storage-NIC max/avg": [("speedup", 1.87, [1.0, 1.02]), ("SNIC max/avg", 1.18, [2.3, 2.4])],
        "online capacity gain under the SLO": [("DS 660B", 2.25, [math.nan]), ("DS 27B", 1.67, [math.nan])],
    }
    assert reproduce_paper.plot_report(headline, [], str(tmp_path / "r.png"))
    ratio, gain = figs().axes
    assert [t.get_text() for t in gain.texts] == ["n/a", "n/a"]
    lo, hi = gain.get_xlim()
    assert all(lo < t.get_position()[0] < hi for t in gain.texts)  # (inside the frame)
    assert ratio.get_legend().get_texts()[1].get_text() == "simulator (mean of 2 seeds, bar [min, max])"
    assert all(t.get_ha() == "right" for t in ratio.get_xticklabels())


def test_report_plot_table_only_and_empty(figs, tmp_path):
    from experiments import reproduce_paper

    cells = [("oracle", 900.0, 950.0), ("dualpath", 1000.0, 1100.0), ("basic", 2000.0, math.nan)]
    assert reproduce_paper.plot_report({}, cells, str(tmp_path / "t.png"))
    assert figs().axes[0].get_xscale() == "log"
    assert reproduce_paper.plot_report({}, [], str(tmp_path / "e.png")) and (tmp_path / "e.png").exists()


# ---- run.png and bench_runtime.png ---------------------------------------------------------------------------------
def test_run_plot_gives_each_policy_one_colour(figs, tmp_path):
    from configs.tiny_runtime import get_config
    from experiments import run as run_launcher

    def res(jct):
        recs = [types.SimpleNamespace(finished=f) for f in (0.5, jct)]
        return types.SimpleNamespace(summary={"jct_s": jct, "link_bytes": {"snic/node0": 10**6}}, records=recs)

    assert run_launcher.plot({"basic": res(2.0), "dualpath": res(1.0)}, str(tmp_path / "run.png"), get_config("test"))
    jct, nic, progress = figs().axes
    bars = [matplotlib.colors.to_hex(p.get_facecolor()) for p in jct.patches]
    lines = [matplotlib.colors.to_hex(ln.get_color()) for ln in progress.lines]
    assert bars == lines and len(set(bars)) == 2


def test_run_plot_with_no_turn_says_so(figs, tmp_path):
    from experiments import run as run_launcher

    empty = types.SimpleNamespace(summary={"jct_s": math.nan, "link_bytes": {}}, records=[])
    assert run_launcher.plot({"basic": empty}, str(tmp_path / "run.png"), None)
    _, nic, progress = figs().axes
    assert _texts(nic) == ["no storage-NIC bytes"] and _texts(progress) == ["no turn finished"]


def test_bench_runtime_plot_title_names_the_setup_and_both_speedups(figs, tmp_path):
    from configs.tiny_runtime import get_config
    from experiments import bench_runtime

    out = {
        "config": get_config("test").to_dict(),
        "measured": {"basic": {"jct_s": 2.0}, "dualpath": {"jct_s": 1.0}},
        "measured_speedup": 2.0,
        "simulated": {"basic": {"jct_s": 1.8}, "dualpath": {"jct_s": 1.2}},
        "simulated_speedup": 1.5,
    }
    bench_runtime._plot(out, str(tmp_path / "b.png"))
    fig = figs()
    assert fig._suptitle.get_text() == "tiny_qwen2 1P2D, storage NIC 1 GB/s, compute NIC 1 GB/s, 4 agents offline"
    assert fig.axes[0].get_title() == "speedup basic -> dualpath: runtime 2.00x, simulator 1.50x"
    del out["config"], out["simulated"]  # (a measured run only, no config)
    bench_runtime._plot(out, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").stat().st_size > 0


def test_equal_seed_values_make_no_negative_error_bar(tmp_path):
    """The review of session 44: the float mean of 3+ equal seed values lands 1 ulp outside them ([0.1] * 3:
    0.10000000000000002), and matplotlib refused the negative error bar: sweep ended with a traceback and no run.json,
    reproduce_paper without report.png. The means stay within [min, max] (sweep_mean.csv's too)."""
    from experiments import mean_within, reproduce_paper, sweep

    assert mean_within([0.1] * 3) == 0.1 and mean_within([0.7] * 3) == 0.7 and mean_within([1.0, 2.0]) == 1.5
    rows = [dict(setup="s", mode="dualpath", load="", seed=s, jct_s=10.0, slo_attainment=0.1) for s in (1, 2, 3)]
    assert sweep.plot_sweep(rows, str(tmp_path / "sweep.png"))
    assert reproduce_paper.plot_report({"speedup": [("x", 1.9, [0.1, 0.1, 0.1])]}, [], str(tmp_path / "r.png"))
