"""Fix wave 9, launchers and simulator outputs (each test failed before its fix, unless it says otherwise):
- `capacity_search` with an infinite `hi` ran the probe of `lo` (a whole simulation) before the probe of `hi` refused
  it; its `iters` check (already fixed in b387016) is pinned here to run before any probe;
- experiments.sweep, experiments.reproduce_paper and experiments.simulate could not be imported into one process
  (absl's DuplicateFlagError on --output_dir, --workers, --plot, ...);
- reproduce_paper `_spread` gave a range that depended on where a NaN sat among the seeds' values, and `_row` took a
  numpy int for a sequence (TypeError);
- the last bucket of a run's link samples (links.csv, plot.png) ended a whole bucket after the run did, so its rate
  (bytes / width) was understated;
- the TTFT CDF of plot.png, checked with the real matplotlib (Agg) instead of a stand-in module."""

import csv
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
from test_launch_hunt import _launch

from dualpath_jax.sim import load_sim_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs/sim_tiny.py")


# ---- 1. capacity_search refuses a bad bracket or step count before any probe ------------------------------------
def _no_probe(monkeypatch):
    from dualpath_jax.sim import runner

    def no_run(*args, **kwargs):
        raise AssertionError("a probe ran")

    monkeypatch.setattr(runner, "run", no_run)


@pytest.mark.parametrize("hi", [math.inf, math.nan])
def test_capacity_search_refuses_an_infinite_hi_before_any_probe(monkeypatch, hi):
    """An infinite hi passed `0 < lo < hi`: the probe of lo ran (minutes at paper scale), then the probe of hi failed
    on "config.workload.aps must be finite". Contract: the bracket is 0 < lo < hi, both finite, checked first."""
    from dualpath_jax.sim.capacity import capacity_search

    _no_probe(monkeypatch)
    cfg = load_sim_config(f"{TINY}:dualpath,aps=0.5,duration=60")
    with pytest.raises(ValueError, match="needs 0 < lo < hi, both finite"):
        capacity_search(cfg, 0.05, hi, iters=1)


@pytest.mark.parametrize("iters", [-1, 2.5, 2.0, True, "3", None])
def test_capacity_search_refuses_a_bad_step_count_before_any_probe(monkeypatch, iters):
    """(Fixed in b387016, pinned here: the check comes before the first probe.) Contract: iters, the bisection steps,
    is an int >= 0 (a numpy int too); anything else is a ValueError naming it, before anything is simulated."""
    from dualpath_jax.sim.capacity import capacity_search

    _no_probe(monkeypatch)
    cfg = load_sim_config(f"{TINY}:dualpath,aps=0.5,duration=60")
    with pytest.raises(ValueError, match="iters, the bisection steps"):
        capacity_search(cfg, 0.05, 1.0, iters=iters)


@pytest.mark.parametrize("iters", [0, np.int64(2)])
def test_capacity_search_takes_zero_steps_or_a_numpy_int(monkeypatch, iters):
    """0 steps: only lo and hi are probed (reproduce_paper's --online_iters has lower_bound=0); a numpy int counts."""
    from dualpath_jax.sim import capacity

    probed = []

    def probe(cfg, aps, drain_s=120.0):
        probed.append(aps)
        return {"slo_met": aps <= 0.3, "aps": aps}

    monkeypatch.setattr(capacity, "probe", probe)
    out = capacity.capacity_search(load_sim_config(f"{TINY}:dualpath,aps=0.5,duration=60"), 0.1, 0.5, iters=iters)
    assert probed == [0.1, 0.5, 0.3, 0.4][: 2 + int(iters)]
    assert out["capacity_aps"] == (0.1 if iters == 0 else 0.3) and len(out["probes"]) == 2 + int(iters)


# ---- 2. the launchers import into one process ---------------------------------------------------------------------
_BOTH = """
import importlib, sys
from absl import flags
order = sys.argv[1].split(",")
mods = [importlib.import_module("experiments." + m) for m in order]
last = order[-1]
print("defaults", flags.FLAGS["output_dir"].default, flags.FLAGS["seeds"].default)
# the launcher imported last defines the shared flags: its validators judge them, and every module's holder reads them
for argv in (["x"], ["x", "--seeds=-1"], ["x", "--seeds=1,1"]):
    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(argv)
        print(argv[1:], "ok", all(m._PLOT.value is flags.FLAGS.plot is True for m in mods))
    except flags.Error as e:
        print(argv[1:], "refused", e)
"""


@pytest.mark.parametrize(
    ("order", "output_dir", "seeds"),
    [
        ("sweep,reproduce_paper", "results/reproduce", "['0']"),
        ("reproduce_paper,sweep", "results/sweep", "[]"),
        ("simulate,sweep,reproduce_paper", "results/reproduce", "['0']"),
        ("reproduce_paper,sweep,simulate", "None", "[]"),
    ],
)
def test_the_launchers_can_be_imported_into_one_process(order, output_dir, seeds):
    """Both define --output_dir, --workers, --plot, --overwrite, --seeds (simulate: --output_dir, --plot): the second
    import raised absl's DuplicateFlagError. Contract: they import together in any order; there the launcher imported
    last defines the shared flags (its default, help and validators), and every launcher reads the same value."""
    out = _launch("-c", _BOTH, order)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0] == f"defaults {output_dir} {seeds}"
    assert lines[1] == "[] ok True"
    last = order.split(",")[-1]
    if last == "reproduce_paper":
        assert lines[2].startswith("['--seeds=-1'] refused") and "integers >= 0" in lines[2]
    if last == "sweep":
        assert lines[3].startswith("['--seeds=1,1'] refused") and "distinct integers" in lines[3]


@pytest.mark.parametrize(
    ("launcher", "expected"),
    [
        (
            "sweep",
            [
                "--output_dir: Where sweep.csv / sweep.json / sweep.png go.\n    (default: 'results/sweep')",
                "--seeds: Run every cell once per seed",
                "--workers: Parallel worker processes.\n    (default: '1')",
                "--[no]plot: Write sweep.png",
                "--[no]overwrite: Replace an earlier sweep's",
                "--setups:",
            ],
        ),
        (
            "reproduce_paper",
            [
                "--output_dir: Where report.md / report.json / report.png / run.json go.\n    (default:",
                "--seeds: Seeds of the headline offline runs",
                "(default: '0')",
                "--workers: Parallel worker processes.\n    (default: '1')",
                "--[no]plot: Write report.png",
                "--[no]overwrite: Replace an earlier report.md",
                "--online_iters:",
            ],
        ),
        (
            "simulate",
            ["--output_dir: Where to write results (default: config.output_dir).", "--[no]plot: Write plot.png"],
        ),
    ],
)
def test_each_launchers_help_still_lists_its_own_flags(launcher, expected):
    """The flags keep their names, defaults and help: a launcher's --help is as before."""
    out = _launch("-m", f"experiments.{launcher}", "--help")
    for text in expected:
        assert text in out.stdout, (text, out.stdout[-4000:])


# ---- 3. reproduce_paper: _spread with a NaN, _row with a numpy scalar -------------------------------------------
def test_spread_of_values_with_a_nan_does_not_depend_on_where_the_nan_is():
    """min/max over [nan, 1, 2] gave nan and nan, over [1, nan, 2] 1 and 2. Contract: a NaN among the seeds' values
    (oracle's storage-NIC max/avg) makes the mean NaN and the range [nan, nan], whichever seed it is."""
    from experiments.reproduce_paper import _mean_range, _spread

    outs = {_spread(v, ".3f")[1] for v in ([math.nan, 1.0, 2.0], [1.0, math.nan, 2.0], [1.0, 2.0, math.nan])}
    assert outs == {" [nan, nan]"}
    assert math.isnan(_spread([1.0, math.nan], ".3f")[0])
    assert _mean_range([1.0, 3.0], ".1f") == "2.0 [1.0, 3.0]"  # (no NaN: as before)
    assert _mean_range([math.nan], ".3f") == "nan"


@pytest.mark.parametrize("sim", [np.int64(3), np.int32(3), np.float32(3.0), np.float64(3.0), 3, 3.0])
def test_row_takes_a_numpy_scalar_as_one_value(sim):
    """`_row` took anything but an int or float for a sequence: list(np.int64(3)) raised TypeError. Contract: one
    value, a numpy scalar included, is a row of that value with no range."""
    from experiments.reproduce_paper import _row

    assert _row("x", 2.0, sim, "x") == "| x | 2x | 3x | 1.500 |"
    assert _row("x", 2.0, [np.int64(1), 3.0]) == "| x | 2 | 2 [1, 3] | 1.000 |"


# ---- 4. the last link bucket ends where the run does --------------------------------------------------------------
@pytest.mark.parametrize(("spec", "max_time"), [("agents=2,turns=2", math.inf), ("agents=6,turns=3", 3.5)])
def test_the_last_link_bucket_ends_where_the_run_does(tmp_path, spec, max_time):
    """The bucket holding the run's end said [k * bucket_s, (k + 1) * bucket_s) though no byte moved after the end:
    links.csv gave it a full width, and plot.png's rate (bytes / width) understated it. Contract: every sample ends
    by stats["sim_end_s"] (t0 < t1 still), the bucket that holds the end ends there, the bytes are the simulator's,
    and links.csv says so (same columns)."""
    from dualpath_jax.sim import run
    from dualpath_jax.sim.outputs import write_results
    from dualpath_jax.sim.runner import build_simulator

    cfg = load_sim_config(f"{TINY}:dualpath,{spec}")
    raw = build_simulator(cfg).run(max_time=max_time)[1]
    result = run(cfg, max_time=max_time)
    end = result.stats["sim_end_s"]
    assert any(s.t1 > end for s in raw)  # (the simulator's buckets: the last one ends after the run)
    assert [(s.link, s.t0, s.nbytes) for s in result.links] == [(s.link, s.t0, s.nbytes) for s in raw]
    assert all(s.t0 < s.t1 <= end for s in result.links)
    last = [s for s in result.links if s.t0 < end < s.t0 + cfg.cluster.bucket_s]
    assert last and all(s.t1 == end for s in last)
    paths = write_results(result, str(tmp_path), config={}, plot=False)
    with open(paths["links"], newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["link", "t0", "t1", "nbytes"]
    assert max(float(r[2]) for r in rows[1:]) == end


# ---- 5. plot.png with the real matplotlib ------------------------------------------------------------------------
def _drawn_figure(monkeypatch, result, tmp_path):
    """plot_result's figure, kept open (pyplot.close monkeypatched) to read what it drew."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dualpath_jax.sim.outputs import plot_result

    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    path = str(tmp_path / "plot.png")
    assert plot_result(result, path) == path and os.path.getsize(path) > 0
    (fig,) = kept
    return fig


def test_the_ttft_cdf_plots_only_the_turns_that_got_their_first_token(monkeypatch, tmp_path):
    """(The stand-in-module test of tests/test_mutation_audit3_sim.py, with the real matplotlib, Agg: it is in the
    test extra.) Mutant O04 drew the CDF over every record, a turn with no first token yet (a run cut by max_time)
    included as NaN, so the curve stopped short of 1. Contract (outputs.py `plot_result`): the second axes' CDF has
    the sorted finite TTFTs as x and climbs to 1 over them."""
    from dualpath_jax.metrics import TurnRecord

    recs = [
        TurnRecord(trajectory_id=i, turn_index=0, prompt_tokens=10, hit_tokens=0, gen_tokens=2, arrival=1.0)
        for i in range(3)
    ]
    recs[0].first_token, recs[2].first_token = 4.0, 1.5  # recs[1]: none yet
    fig = _drawn_figure(monkeypatch, SimpleNamespace(links=[], records=recs), tmp_path)
    ax1, ax2 = fig.axes
    assert len(ax1.lines) == 0
    (line,) = ax2.lines
    assert list(line.get_xdata()) == [0.5, 3.0]
    assert list(line.get_ydata()) == [0.5, 1.0]
    assert ax2.get_xscale() == "log" and ax2.get_ylabel() == "CDF"


def test_the_storage_nic_rate_of_the_last_bucket_is_over_its_real_width(monkeypatch, tmp_path):
    """plot.png's storage-NIC rate of the bucket holding the run's end is its bytes over [t0, end) (it was over a
    whole bucket_s), in GB/s."""
    from dualpath_jax.sim import run

    result = run(load_sim_config(f"{TINY}:dualpath,agents=2,turns=2"))
    end = result.stats["sim_end_s"]
    fig = _drawn_figure(monkeypatch, result, tmp_path)
    for line in fig.axes[0].lines:
        mine = [s for s in result.links if s.link == line.get_label()]
        last = max(mine, key=lambda s: s.t0)
        assert line.get_xdata()[-1] == last.t0
        assert line.get_ydata()[-1] == pytest.approx(last.nbytes / (end - last.t0) / 1e9, rel=1e-12)
    assert fig.axes[0].lines  # (the tiny run read from storage)


def test_the_storage_nic_legend_sorts_any_link_name_by_node_number(monkeypatch, tmp_path):
    """plot_result sorted the SNIC links by `int(name.split("node")[-1])`: a per-class link name ("snic/node2/high")
    raised ValueError after the whole run. Now names sort with their numbers compared as numbers."""
    from dualpath_jax.metrics import LinkBytes

    links = [LinkBytes(n, 0.0, 1.0, 10**9) for n in ("snic/node10", "snic/node2/high", "snic/node2", "snic/node1")]
    fig = _drawn_figure(monkeypatch, SimpleNamespace(links=links, records=[]), tmp_path)
    assert [line.get_label() for line in fig.axes[0].lines] == [
        "snic/node1",
        "snic/node2",
        "snic/node2/high",
        "snic/node10",
    ]
