"""Tests that kill hand mutations of the workload, metrics and report code the rest of the suite let pass (the third
audit of the suite: workloads/*, metrics, registry, checks and the computations of experiments/reproduce_paper.py and
experiments/sweep.py). Each test names the mutation of the code it guards against, e.g. "the block-size check
`block_size < 1` changed to `block_size < 0`". All unit-level and jax-free; two subprocesses: one reproduce_paper run
with its simulations replaced by fixed results (shared by the report tests, as in test_launch_hunt.py), and one of
sweep's `run_cell` on configs/sim_tiny.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_launch_hunt import _launch

from dualpath_jax import metrics
from dualpath_jax.metrics import TurnRecord
from dualpath_jax.workloads import make_arrivals
from dualpath_jax.workloads.types import Trajectory, Turn

# ---- workloads/types.py ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -64])
def test_a_block_size_below_one_is_refused_where_hits_are_counted(bad):
    """Mutation: `check_block_size`'s `block_size < 1` changed to `block_size < 0`. A hit is whole blocks of
    `block_size` tokens (PAPER.md "Workloads": only Full Blocks are stored): block 0 was a ZeroDivisionError naming
    no argument, a negative block a negative miss."""
    from dualpath_jax.workloads import summarize

    t = Trajectory(0, [Turn(100, 10), Turn(50, 5)])
    for call in (lambda: t.hit_tokens(1, bad), lambda: t.turn_shapes(bad), lambda: summarize([t], block_size=bad)):
        with pytest.raises(ValueError, match=r"block_size must be an int >= 1"):
            call()
    # block 1 (the least): every earlier token stored (all but turn 0's last generated one, whose KV is never computed)
    assert t.hit_tokens(1, 1) == 109 and t.miss_tokens(1, 1) == 51


def test_the_peak_turn_is_the_first_turn_that_holds_the_most_kv():
    """Mutation: `peak_turn`'s `total > best` changed to `total >= best`. The simulator names the peak turn in its
    "holds N tokens of KV, more than a decode engine's HBM" error: on a tie it is the first turn that holds that
    much (the earliest turn that could never be placed), not a later one."""
    # a trace agent whose later turns re-read less (context_tokens): totals 110, 110, 60
    t = Trajectory(
        0,
        [Turn(100, 10, context_tokens=0), Turn(100, 10, context_tokens=0), Turn(50, 10, context_tokens=0)],
    )
    assert t.peak_turn() == (0, 110)
    assert Trajectory(1, [Turn(5, 0), Turn(0, 0)]).peak_turn() == (0, 5)  # a turn adding nothing: still turn 0


def test_append_token_ids_must_have_one_id_per_appended_token():
    """Mutation: the `len(append_token_ids) != append_tokens` check of `Turn` dropped. The ids are the appended
    tokens themselves (the runtime feeds them to the model): two ids for a three-token append is no turn."""
    with pytest.raises(ValueError, match=r"append_token_ids has 2 ids but append_tokens=3"):
        Turn(3, 1, append_token_ids=np.arange(2))
    with pytest.raises(ValueError, match=r"append_token_ids has 4 ids but append_tokens=3"):
        Turn(3, 1, append_token_ids=np.arange(4))
    assert len(Turn(3, 1, append_token_ids=np.arange(3)).append_token_ids) == 3


@pytest.mark.parametrize(
    "kwargs, says",
    [
        ({"gap_s": -1.0}, r"turn gap must be >= 0 s and finite, got -1.0"),
        ({"arrival_offset_s": -0.5}, r"arrival_offset_s must be >= 0 and finite, got -0.5"),
        ({"context_tokens": 10.5}, r"context_tokens must be a whole number, got 10.5"),
        ({"context_tokens": -1}, r"context_tokens must be >= 0 and finite"),
    ],
    ids=["negative-gap", "negative-offset", "half-token-context", "negative-context"],
)
def test_turn_times_are_not_negative_and_a_context_is_whole_tokens(kwargs, says):
    """Mutations: `Turn`'s `0 <= gap_s` and `0 <= arrival_offset_s` lower bounds dropped, and the
    `context_tokens % 1` check dropped. A negative gap made the next turn ready before the previous one finished
    (arrivals.py: ready = finished + gap), a negative trace offset before its agent arrived; half a token of
    re-read context is a fractional hit."""
    with pytest.raises(ValueError, match=says):
        Turn(10, 1, **kwargs)
    assert Turn(10, 1, gap_s=0.0, arrival_offset_s=0.0, context_tokens=10.0).context_tokens == 10.0  # edges accepted


@pytest.mark.parametrize("append, gen", [(10.5, 1), (10, 2.5)], ids=["half-append", "half-gen"])
def test_turn_lengths_are_whole_tokens(append, gen):
    """Mutation: `Turn`'s `append_tokens % 1 or gen_tokens % 1` check cut to `append_tokens % 1`. A turn generates
    exactly `gen_tokens` tokens (PAPER.md: generation forced to g_i tokens): 2.5 of them is no turn (the runtime's
    ConversationBook checks a generation of `(gen_tokens,)` shape)."""
    with pytest.raises(ValueError, match=r"turn lengths must be whole numbers"):
        Turn(append, gen)
    assert Turn(10.0, 2.0).gen_tokens == 2.0  # whole floats are whole numbers


# ---- workloads/arrivals.py ------------------------------------------------------------------------------------------


def test_online_arrivals_without_gaps_still_refuse_turn_zero():
    """Mutation: `OnlineArrivals.turn_ready`'s `i < 1` check dropped from its use_gaps=False branch. Turn 0 is ready
    at its agent's arrival (`agent_arrivals`), never "after the previous turn" (ArrivalModel.turn_ready is for turns
    >= 1): with the check gone, use_gaps=False answered turn 0 with the time it was given."""
    t = Trajectory(0, [Turn(10, 1, gap_s=3.0), Turn(10, 1)])
    for m in (make_arrivals("online", aps=1.0, use_gaps=False), make_arrivals("online", aps=1.0)):
        with pytest.raises(ValueError, match=r"turn_ready is for turns >= 1, got 0"):
            m.turn_ready(t, 0, 4.0)
    assert make_arrivals("online", aps=1.0, use_gaps=False).turn_ready(t, 1, 4.0) == 4.0


def test_a_trace_turn_without_a_timestamp_is_ready_its_gap_after_the_previous_one():
    """Mutation: `TraceArrivals.turn_ready` returned `prev_finish` (the gap dropped) for a turn without a trace
    offset. Such a turn is ready as in offline mode: the previous turn's finish plus that turn's gap (module
    docstring of arrivals.py); closed or open loop alike."""
    t = Trajectory(0, [Turn(10, 1, gap_s=2.5), Turn(10, 1)], arrival_time=50.0)
    for closed in (True, False):
        assert make_arrivals("trace", closed_loop=closed).turn_ready(t, 1, prev_finish=60.0) == 62.5


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, math.inf, math.nan, True])
def test_an_online_probe_window_is_a_positive_finite_time(bad):
    """Mutation: OnlineArrivals' `0 < duration_s` check loosened to `0 <= duration_s`. A window of 0 s put every
    agent at t = 0 (uniform on [0, 0)): an offline burst judged as an online probe."""
    with pytest.raises(ValueError, match=r"finite duration_s > 0 s"):
        make_arrivals("online", aps=1.0, duration_s=bad)
    agents = [Trajectory(i, [Turn(1, 1)]) for i in range(50)]
    times = make_arrivals("online", aps=1.0, duration_s=10.0).agent_arrivals(agents)
    assert (np.diff(times) >= 0).all() and 0 <= times[0] and times[-1] < 10.0


# ---- metrics.py -----------------------------------------------------------------------------------------------------


def _record(tid, arrival, first, finished, gen=3, prompt=64, pe=0, de=0, second=math.nan):
    return TurnRecord(
        tid, 0, prompt, 0, gen, arrival, first_token=first, second_token=second, finished=finished,
        pe_read_bytes=pe, de_read_bytes=de,
    )  # fmt: skip


def test_the_summary_counts_pe_and_de_read_bytes_apart():
    """Mutation: `summarize`'s `pe_read_bytes` summed the records' `de_read_bytes`. The PE-side and DE-side storage
    reads are DualPath's two paths (PAPER.md "dual-path loading"): each total is its own side's bytes."""
    recs = [_record(0, 0.0, 1.0, 2.0, pe=100, de=7), _record(1, 0.0, 1.0, 3.0, pe=20, de=0)]
    s = metrics.summarize(recs)
    assert (s["pe_read_bytes"], s["de_read_bytes"]) == (120, 7)


def test_json_safe_writes_infinities_and_nans_in_tuples_as_null():
    """Mutations: `json_safe`'s `not math.isfinite(v)` narrowed to `math.isnan(v)` (inf went out as Infinity), and its
    `(list, tuple)` narrowed to `list` (a NaN inside a tuple went out as NaN). Neither is JSON: strict readers
    refuse the file (metrics.write_json's contract, DESIGN.md "Metrics")."""
    import json

    v = {"ttft_p99_s": math.inf, "neg": -math.inf, "pair": (1.5, math.nan), "f32": np.float32("inf")}
    out = metrics.json_safe(v)
    assert out == {"ttft_p99_s": None, "neg": None, "pair": [1.5, None], "f32": None}
    json.dumps(out, allow_nan=False)  # strict JSON


def test_a_percentile_between_minus_and_plus_infinity_is_undefined():
    """Mutation: `_percentile_with_inf`'s "between -inf and inf: undefined" case dropped (it then answered inf).
    numpy's linear interpolation between -inf and inf is inf - inf: NaN; a tie of two infinities is that one."""
    assert math.isnan(metrics.percentile([-math.inf, math.inf], 50))
    assert metrics.percentile([-math.inf, math.inf], 100) == math.inf
    assert metrics.percentile([-math.inf, math.inf], 0) == -math.inf
    assert metrics.percentile([math.inf, math.inf], 50) == math.inf
    assert metrics.percentile([1.0, math.inf, math.inf], 75) == math.inf


def test_throughputs_of_a_zero_length_span_are_undefined():
    """Mutation: `summarize`'s throughput guard `end > start` loosened to `end >= start`: a run whose one finished
    turn ended at its arrival (a span of 0 s) raised ZeroDivisionError instead of reporting no throughput."""
    s = metrics.summarize([_record(0, 5.0, 5.0, 5.0, gen=1)])
    assert s["jct_s"] == 0.0 and math.isnan(s["gen_tokens_per_s"]) and math.isnan(s["prompt_tokens_per_s"])


def test_ttft_ttst_and_tpot_of_a_record():
    """Mutations: `TurnRecord.ttst` measured from the first token instead of the arrival, `tpot`'s `gen_tokens <= 1`
    guard loosened to `< 1`, and its divisor `gen_tokens - 1` changed to `gen_tokens`. TTFT and TTST both count from
    the turn's arrival (the record's comments; PAPER.md's SLO: TTFT and TTST); TPOT is the mean time per output
    token after the first, undefined for a one-token turn."""
    r = _record(0, 1.0, 2.0, 6.0, gen=5, second=2.5)
    assert (r.ttft, r.ttst, r.tpot) == (1.0, 1.5, 1.0)
    one = _record(1, 1.0, 2.0, 2.0, gen=1)
    assert math.isnan(one.tpot)
    ttft, tpot = metrics.ttft_tpot([r, one])
    assert list(ttft) == [1.0, 1.0] and tpot[0] == 1.0 and math.isnan(tpot[1])


# ---- experiments/reproduce_paper.py: the report's computations ------------------------------------------------------

# reproduce_paper with its simulations replaced by fixed results: the headline JCTs per mode (seed 1's DualPath is
# slower, so the two seeds differ), the append runs' and the DS 27B P/D layouts' JCTs, and the capacity searches
_FAKE_REPRODUCE = """
from absl import app
import experiments.reproduce_paper as rp

JCT = {"basic": 200.0, "layerwise": 160.0, "dualpath_rr": 120.0, "dualpath": 100.0, "oracle": 90.0}
APPEND = {"2": {"basic": 182.0, "dualpath": 100.0}, "3": {"basic": 199.0, "dualpath": 100.0}}  # 1.82x, 1.99x
PD = {"1P1D": 300.0, "1P2D": 150.0, "2P1D": 200.0}  # basic JCT; DualPath's is 100: 3x, 1.5x, 2x
CAPACITY = {("paper_ds660b.py", "basic"): 0.2, ("paper_ds660b.py", "dualpath"): 0.5,
            ("paper_ds27b.py", "basic"): 0.25, ("paper_ds27b.py", "dualpath"): 0.5}

def fake_offline(spec):
    path, items = spec.split(":", 1)
    mode, *rest = items.split(",")
    kv = dict(x.split("=", 1) for x in rest)
    if "pd" in kv:
        jct = PD[kv["pd"]] if mode == "basic" else 100.0
    elif "append" in kv:
        jct = APPEND[kv["append"]][mode]
    else:
        jct = 125.0 if (mode, kv.get("seed")) == ("dualpath", "1") else JCT[mode]
    snic = 1.35 if kv.get("seed") == "1" else 1.25
    return {"spec": spec, "jct_s": jct, "snic_max_over_avg": snic, "unfinished": 0, "wall_s": 0.0}

def fake_capacity(args):
    setup, mode = args[0], args[1]
    aps = CAPACITY[(setup.rsplit("/", 1)[-1], mode)]
    return {"capacity_aps": aps, "upper_aps": 2 * aps, "setup": setup, "mode": mode}

rp._offline = fake_offline
rp._capacity = fake_capacity
app.run(rp.main)
"""


@pytest.fixture(scope="module")
def fake_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reproduce")
    script = tmp / "fake_reproduce.py"
    script.write_text(_FAKE_REPRODUCE)
    args = ["--seeds=0,1", "--appends=2,3", "--pd_ratios=1P1D,1P2D,2P1D", "--online", "--noplot"]
    out = _launch(str(script), f"--output_dir={tmp}", *args)
    assert out.returncode == 0, out.stderr[-2000:]
    return (tmp / "report.md").read_text()


def test_report_rows_over_several_seeds_are_their_mean_with_min_and_max(fake_report):
    """Mutations: `_spread`'s mean `sum(values) / len(values)` changed to the first seed's value, and its
    " [min, max]" written as " [max, min]". With --seeds=0,1 each figure is the mean over the seeds with their
    [min, max] beside it (--seeds' help): speedups 2.0 and 1.6 are 1.8x [1.6, 2]; sim/paper is of the mean."""
    for row in [
        "| offline speedup Basic -> DualPath | 1.87x | 1.8x [1.6, 2] | 0.963 |",
        "| ablation: + scheduler (JCT %) | -45.62 | -43.75 [-50, -37.5] | 0.959 |",
        "| ablation: + layerwise (JCT %) | -17.21 | -20 [-20, -20] | 1.162 |",
        "| storage-NIC max/avg, scheduler | 1.18 | 1.3 [1.25, 1.35] | 1.102 |",
        "| dualpath | 112 [100, 125] | 1.300 [1.250, 1.350] |",
    ]:
        assert row in fake_report, row


def test_append_speedups_at_the_edges_of_the_papers_range_are_in_it(fake_report):
    """Mutations: the append table's `lo <= sp <= hi` changed to `lo < sp < hi`, and PAPER's append range
    (1.82, 1.99) changed. PAPER.md: "Append x1...x3: 1.82-1.99x", both ends included."""
    assert "Paper: 1.82-1.99x over x1...x3" in fake_report
    assert "| x2 | 182 | 100 | 1.82x | yes |" in fake_report
    assert "| x3 | 199 | 100 | 1.99x | yes |" in fake_report
    assert "| x1 | 200 | 100 | 2.00x | no |" in fake_report  # the headline run (seed 0): just above the range


def test_pd_sweep_rows_are_the_mean_and_the_max_over_the_layouts(fake_report):
    """Mutations: the P/D sweep's mean `sum(sps) / len(sps)` divided by another count (the seeds'), and its max
    `max(sps)` taken as the last layout's. PAPER.md: "Across P/D ratios on DS 27B: 1.64x on average, up to 2.46x"
    (3x, 1.5x and 2x here: a mean of 2.167x and a max of 3x, which is not the last layout's)."""
    assert "| DS 27B P/D sweep: mean speedup | 1.64x | 2.167x | 1.321 |" in fake_report
    assert "| DS 27B P/D sweep: max speedup | 2.46x | 3x | 1.220 |" in fake_report
    for row in ("| 1P1D | 300 | 100 | 3.00x |", "| 1P2D | 150 | 100 | 1.50x |", "| 2P1D | 200 | 100 | 2.00x |"):
        assert row in fake_report, row


def test_online_capacity_gains_are_dualpath_over_basic_per_model(fake_report):
    """Mutations: the DS 660B gain `c6d / c6b` inverted, and DS 27B's basic and DualPath capacities swapped.
    PAPER.md: "Online capacity under SLO: 1.67x (DS 27B: 0.3 -> 0.5 APS), 2.25x (DS 660B: 0.2 -> 0.45 APS)"; the
    gain is DualPath's capacity over basic's (0.5 / 0.2 and 0.5 / 0.25 here)."""
    for row in [
        "| online capacity DS 660B basic (APS) | 0.2 | 0.2 | 1.000 |",
        "| online capacity DS 660B DualPath (APS) | 0.45 | 0.5 | 1.111 |",
        "| online capacity gain DS 660B | 2.25x | 2.5x | 1.111 |",
        "| online capacity DS 27B basic (APS) | 0.3 | 0.25 | 0.833 |",
        "| online capacity DS 27B DualPath (APS) | 0.5 | 0.5 | 1.000 |",
        "| online capacity gain DS 27B | 1.67x | 2x | 1.198 |",
    ]:
        assert row in fake_report, row


def _paper_md() -> str:
    from dualpath_jax.workloads.traces import traces_dir

    path = traces_dir().parent / "PAPER.md"  # shared/PAPER.md beside shared/traces
    if not path.exists():
        pytest.skip(f"PAPER.md not found at {path} (set $DUALPATH_TRACES)")
    return " ".join(path.read_text().replace("\u2212", "-").split())  # one line, ASCII minus


def test_the_reports_paper_figures_are_paper_mds():
    """Mutation: a figure of reproduce_paper's PAPER dict changed (the DS 27B capacity gain 1.67 -> 1.76, the SNIC
    max/avg 1.18 -> 1.81, the append range). Every sim/paper ratio of report.md divides by these: each is checked
    against its sentence in PAPER.md "Headline results"."""
    from experiments.reproduce_paper import PAPER

    text = _paper_md()
    p = PAPER
    lo, hi = p["append_speedup_range"]
    (t1, p1), (t2, p2) = p["online_scale_2p4d"], p["online_scale_44p88d"]
    for phrase in [
        f"Basic \u2192 DualPath: up to {p['speedup_basic_to_dualpath']:g}\u00d7 (DS 660B)",
        f"Append \u00d71\u2026\u00d73: {lo:g}\u2013{hi:g}\u00d7",
        f"{p['pd_sweep_ds27b_mean_speedup']:g}\u00d7 on average, up to {p['pd_sweep_ds27b_max_speedup']:g}\u00d7",
        f"{p['online_capacity_gain_ds27b']:g}\u00d7 (DS 27B: {p['online_capacity_ds27b_basic_aps']:g} \u2192 "
        f"{p['online_capacity_ds27b_dualpath_aps']:g} APS)",
        f"{p['online_capacity_gain_ds660b']:g}\u00d7 (DS 660B: {p['online_capacity_ds660b_basic_aps']:g} \u2192 "
        f"{p['online_capacity_ds660b_dualpath_aps']:g} APS)",
        f"JCT {p['ablation_layerwise_pct']:g}% with layerwise prefill, {p['ablation_dual_path_pct']:g}% adding dual "
        f"path, {p['ablation_scheduler_pct']:g}% adding the scheduler",
        f"{p['snic_max_over_avg_round_robin']:g} (round-robin) \u2192 {p['snic_max_over_avg_dualpath']:g} (scheduler)",
        f"TTFT {t1:g} s \u2192 {t2:g} s, TPOT {round(1e3 * p1, 6):g} \u2192 {round(1e3 * p2, 6):g} ms",
    ]:
        assert phrase in text, phrase


def test_the_calibration_table_and_table_2_targets_are_paper_mds():
    """Mutations: a cell of reproduce_paper's TABLE changed ((4096, 48K) basic 10348 -> 10438), or a Table 2 target of
    a synthetic dataset. The calibration's loss (rms of ln(sim/paper)) and the workload's tuning aim at these
    numbers: each row is PAPER.md's ("Calibration data" and Table 2; "~19280" read as 19280)."""
    import re

    from dualpath_jax.workloads import DATASETS
    from experiments.reproduce_paper import TABLE

    text = _paper_md()
    for agents in (512, 1024, 2048, 4096):
        cells = " | ".join(" / ".join(str(x) for x in TABLE[(agents, ds)]) for ds in ("32K", "48K", "64K"))
        row = re.sub(r"~(\d)", r"\1", text)  # the paper's "~19280": read off the figure
        assert f"| {agents} | {cells} |" in row, (agents, cells)
    for name in ("32K", "48K", "64K"):
        s = DATASETS.get(name)
        row = (
            f"| {name} | {s.target_turns:g} | {s.target_append:g} | {s.target_gen:g} | {s.target_total:,.0f} | "
            f"{s.target_context:,.0f} |"
        )
        assert row in text, row


# ---- workloads/stats.py ---------------------------------------------------------------------------------------------


def test_workload_statistics_percentiles_and_max_by_hand():
    """Mutations: `summarize`'s p90 context taken at p50, its max context taken over the appends, and its p50 append
    over the prompts. One agent of five turns of append 100 and gen 100 (prompts 100, 300, ..., 900: Table 2's
    "context" is the prompt) and one of two turns (prompts 5 and 5 + 1 + 7 = 13, a gap of 4 s between them)."""
    from dualpath_jax.workloads import summarize

    trajs = [Trajectory(0, [Turn(100, 100)] * 5), Trajectory(1, [Turn(5, 1, gap_s=4.0), Turn(7, 2)])]
    st = summarize(trajs, block_size=4)
    prompts = [100, 300, 500, 700, 900, 5, 13]
    assert st.p50_context == pytest.approx(np.percentile(prompts, 50)) == 300
    assert st.p90_context == pytest.approx(np.percentile(prompts, 90)) == pytest.approx(780)
    assert st.max_context == 900
    assert st.p50_append == 100 and st.p90_append == 100
    assert st.mean_gap_s == pytest.approx(4.0 / 5)  # 5 gaps between turns (the last turns' gaps precede nothing)
    # whole blocks of 4 of the stored KV (the earlier context but its last generated token): 199 -> 196, 5 -> 4
    assert st.hit_rate == pytest.approx((196 + 396 + 596 + 796 + 4) / sum(prompts))


def test_turnless_trajectories_count_in_no_mean_and_an_empty_workload_hits_nothing():
    """Mutations: `summarize`'s mean turns per trajectory divided by every trajectory given (turnless ones too), and
    its hit-rate guard `p.sum() > 0` loosened to `>= 0` (0 / 0: NaN and a numpy warning). Turnless trajectories
    are left out of the statistics (n_trajectories and mean_turns alike); prompts of 0 tokens hit nothing: 0.0."""
    from dualpath_jax.workloads import summarize

    st = summarize([Trajectory(0, [Turn(10, 1), Turn(10, 1)]), Trajectory(1, []), Trajectory(2, [Turn(10, 1)])])
    assert (st.n_trajectories, st.n_turns, st.mean_turns) == (2, 3, 1.5)
    with np.errstate(all="raise"):
        assert summarize([Trajectory(0, [Turn(0, 1)])]).hit_rate == 0.0


# ---- workloads/synthetic.py -----------------------------------------------------------------------------------------


def _fixed_spec(**kw):
    """A dataset without randomness (every sigma 0): turn 1 appends 30 tokens, later turns 6, every turn generates
    4; the natural length is far above max_len, so max_len alone ends a trajectory."""
    from dualpath_jax.workloads.synthetic import SyntheticSpec

    base = dict(
        name="fixed", max_len=104, first_append_mean=30.0, first_append_sigma=0.0, append_mean=6.0, append_sigma=0.0,
        gen_mean=4.0, gen_sigma=0.0, length_median=1e6, length_sigma=0.0,
    )  # fmt: skip
    return SyntheticSpec(**{**base, **kw})


def test_a_synthetic_trajectory_fills_its_max_length_exactly_when_turns_fit():
    """Mutation: the generator's `searchsorted(cum, limit, side="right")` changed to side="left". A trajectory ends
    before the first turn that would take its total *past* the max length (module docstring: "turns that keep
    total <= limit"): 34 + 7 x 10 = 104 tokens fit a max length of 104 exactly (8 turns), not 7 turns."""
    from dualpath_jax.workloads.synthetic import generate_trajectories

    (t,) = generate_trajectories(_fixed_spec(), 1, seed=0)
    assert [(x.append_tokens, x.gen_tokens) for x in t.turns] == [(30, 4)] + [(6, 4)] * 7
    assert t.total_tokens == 104
    (t,) = generate_trajectories(_fixed_spec(max_len=103), 1, seed=0)
    assert len(t.turns) == 7 and t.total_tokens == 94


def test_agent_prefixes_reach_prefix_max_tokens_and_every_base_trajectory_is_drawn():
    """Mutations: make_agents' prefix lengths drawn from [1, prefix_max_tokens) (the upper end left out) and its
    base picks from [0, base_trajectories - 1) (the last base trajectory never drawn). PAPER.md: agents are made by
    sampling a trajectory and prepending a random first turn; make_agents' docstring: an append of
    1..prefix_max_tokens tokens."""
    from dualpath_jax.workloads import make_agents

    agents = make_agents(_fixed_spec(), 40, seed=1, base_trajectories=1, prefix_max_tokens=1)
    assert {a.turns[0].append_tokens for a in agents} == {1}
    agents = make_agents("32K", 200, seed=2, base_trajectories=3, prefix_max_tokens=2)
    assert {a.turns[0].append_tokens for a in agents} == {1, 2}
    assert {a.source.rsplit("#base", 1)[1] for a in agents} == {"0", "1", "2"}


# ---- workloads/traces.py --------------------------------------------------------------------------------------------


def _mooncake(tmp_path, rows, name="m.jsonl"):
    import json

    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _line(ts, n_in, ids, n_out=10):
    return {"timestamp": ts, "input_length": n_in, "output_length": n_out, "hash_ids": ids}


def test_a_mooncake_session_continues_from_its_last_full_block(tmp_path):
    """Mutations: the re-read context's previous block taken as the prompt's last id (a partial block) instead of
    its last *full* block; the session search stopping before block `min_shared_blocks - 1`; a session's tail
    registered only past `min_shared_blocks` full blocks. traces.py: a request continues a session when its ids
    hold the last full block of the session's latest prompt (here block 1, id 2: min_shared_blocks = 2 blocks
    shared) and, extending it past prompt + generation, re-reads all of it (1100 + 10 tokens)."""
    from dualpath_jax.workloads.traces import load_mooncake

    p = _mooncake(tmp_path, [_line(0, 1100, [1, 2, 3]), _line(5000, 1700, [1, 2, 4, 5])])
    (t,) = load_mooncake(p)
    assert [t.context_before(i) for i in range(2)] == [0, 1110]
    assert [t.prompt_tokens(i) for i in range(2)] == [1100, 1700]
    assert [x.arrival_offset_s for x in t.turns] == [0.0, 5.0]


def test_a_mooncake_sessions_tail_is_taken_once(tmp_path):
    """Mutation: the matched tail left in `tails` (not deleted). Once request 2 continued the session, the session's
    latest prompt is request 2's (last full block id 4); request 3 shares only blocks 1-2 with request 1 (another
    branch of a common prefix) and holds no block 4: it starts a new session (module docstring)."""
    from dualpath_jax.workloads.traces import load_mooncake

    p = _mooncake(tmp_path, [_line(0, 1100, [1, 2, 3]), _line(1000, 1700, [1, 2, 4, 5]), _line(2000, 1100, [1, 2, 6])])
    trajs = load_mooncake(p)
    assert [len(t.turns) for t in trajs] == [2, 1] and trajs[1].arrival_time == 2.0


def test_a_repeated_mooncake_prompt_re_reads_its_whole_blocks_only(tmp_path):
    """Mutation: the re-read context's `lead = min(lead, prompt // block)` cap dropped. A prompt shorter than the
    previous prompt + generation (a retry of the same 1100 tokens) re-reads the whole blocks it has seen: 2 of
    512 tokens, not its partial third block (only Full Blocks are stored, PAPER.md)."""
    from dualpath_jax.workloads.traces import load_mooncake

    p = _mooncake(tmp_path, [_line(0, 1100, [1, 2, 3]), _line(1000, 1100, [1, 2, 3])])
    (t,) = load_mooncake(p)
    assert [t.context_before(i) for i in range(2)] == [0, 1024]


def test_a_prompt_exactly_as_long_as_the_previous_context_re_reads_all_of_it_but_one_token(tmp_path):
    """Mutations: the re-read rule's `prompt >= prev_context` changed to `>`, and the cap `prompt - 1` changed to
    `prompt`. A prompt of exactly the previous prompt + generation (1100 + 10) that extends its blocks re-reads that
    whole context (traces.py: "at least as long as prompt + generation"), capped so one token is prefilled."""
    from dualpath_jax.workloads.traces import load_mooncake

    p = _mooncake(tmp_path, [_line(0, 1100, [1, 2, 3]), _line(1000, 1110, [1, 2, 4])])
    (t,) = load_mooncake(p)
    assert t.context_before(1) == 1109 and t.turns[1].append_tokens == 1


def test_mooncake_hash_ids_of_a_prompt_of_whole_blocks_are_that_many(tmp_path):
    """Mutation: the Mooncake id count `ceil(input_length / 512)` computed as `input_length // 512 + 1` (one id too
    many for a prompt of whole blocks). The traces README: `len(hash_ids) == ceil(input_length / 512)`."""
    from dualpath_jax.workloads.traces import TraceFormatError, load_mooncake

    (t,) = load_mooncake(_mooncake(tmp_path, [_line(0, 1024, [1, 2])]))
    assert t.prompt_tokens(0) == 1024
    with pytest.raises(TraceFormatError, match=r"3 hash ids for 1024 input tokens; expected ceil\(1024/512\) = 2"):
        load_mooncake(_mooncake(tmp_path, [_line(0, 1024, [1, 2, 3])], name="bad.jsonl"))


def test_mooncake_requests_of_one_timestamp_are_in_order(tmp_path):
    """Mutation: the `ts < prev_ts` time check tightened to `ts <= prev_ts`. Two requests in one millisecond are
    not time going back."""
    from dualpath_jax.workloads.traces import load_mooncake

    trajs = load_mooncake(_mooncake(tmp_path, [_line(7, 600, [1, 2]), _line(7, 600, [3, 4])]))
    assert [t.arrival_time for t in trajs] == [0.007, 0.007]


def test_hash_ids_past_int64_are_a_trace_format_error():
    """Mutation: the id range check's `max(ids) < 2**63` loosened to `<= 2**63`: 2**63 then failed in numpy (an
    OverflowError naming no line) instead of a TraceFormatError naming it."""
    from dualpath_jax.workloads.traces import TraceFormatError, _hash_ids

    assert _hash_ids({"h": [2**63 - 1, -(2**63)]}, "h", "w", 1000, 512, True) == [2**63 - 1, -(2**63)]
    with pytest.raises(TraceFormatError, match=r"w: field 'h' holds an id outside the int64 range"):
        _hash_ids({"h": [1, 2**63]}, "h", "w", 1000, 512, True)


def _session_file(path, sid, requests, block=64):
    import json

    path.write_text(json.dumps({"id": sid, "block_size": block, "requests": requests}))
    return path


def _req(t, n_in, ids, n_out=5, think=0.0):
    return {"t": t, "type": "n", "in": n_in, "out": n_out, "hash_ids": ids, "think_time": think}


def test_a_nested_subagent_counts_its_time_from_its_parent_subagent(tmp_path):
    """Mutation: a subagent's origin `t0 + sub_t` changed to `sub_t` (the parent's origin dropped). Each subagent
    arrives at its parent's time origin plus its `t` (traces.py `_session_turns`): a subagent at t=10 of the main
    agent, holding one at t=5 of its own, puts that one at 15 s (+ its first request's t=1)."""
    from dualpath_jax.workloads.traces import load_kvcache_session

    inner = {"type": "subagent", "t": 5.0, "agent_id": "b", "requests": [_req(1.0, 70, [30])]}
    outer = {"type": "subagent", "t": 10.0, "agent_id": "a", "requests": [_req(0.0, 70, [20]), inner]}
    trajs = load_kvcache_session(_session_file(tmp_path / "trace_n.json", "n", [_req(0.0, 70, [10]), outer]))
    assert [(t.source, t.arrival_time) for t in trajs] == [
        ("trace_n.json", 0.0), ("trace_n.json#a", 10.0), ("trace_n.json#a#b", 16.0),
    ]  # fmt: skip


def test_sessions_keep_their_ids_apart_and_their_block_positions_to_themselves(tmp_path):
    """Mutations: the session salt shifted by 16 bits instead of 32 (session-scoped ids below 2**32 then collide
    across sessions), and one `_BlockPositions` shared by every session file (an id is scoped to its session, so
    another session's id 3 at another block is no damage). traces.py: sessions never share blocks."""
    import zlib

    from dualpath_jax.workloads.traces import load_kvcache_tester

    # two session ids whose salts are close: salt_a < salt_b < salt_a + 2**16
    salts = sorted((zlib.crc32(f"sess-{i}".encode()) & 0x7FFFFFFF, f"sess-{i}") for i in range(2000))
    (salt_a, sa), (salt_b, sb) = min(zip(salts, salts[1:], strict=False), key=lambda p: p[1][0] - p[0][0])
    y = 7
    x = (salt_b - salt_a) * 2**16 + y  # x + (salt_a << 16) == y + (salt_b << 16)
    assert 0 <= x < 2**32  # a session-scoped id (the real ones are below 2**14)
    a = _session_file(tmp_path / "trace_a.json", sa, [_req(0.0, 64, [x])])
    b = _session_file(tmp_path / "trace_b.json", sb, [_req(0.0, 64, [y]), _req(1.0, 130, [3, 4])])
    c = _session_file(tmp_path / "trace_c.json", "sess-c", [_req(0.0, 200, [9, 8, 3])])  # id 3 at block 2, not 0
    trajs = load_kvcache_tester([a, b, c])
    ids = [set(h for turn in t.turns for h in turn.block_hashes.tolist()) for t in trajs]
    assert len(trajs) == 3 and not ids[0] & ids[1] and not ids[1] & ids[2] and not ids[0] & ids[2]


def test_max_agents_reads_no_session_file_past_the_ones_it_needs(tmp_path):
    """Mutations: `_load_kvcache_files`' stop at `max_agents` dropped (every file read, the list cut afterwards),
    `_session_files`' `files[:limit]` off by one, and `_check_count`'s refusal of a count of 0 dropped. Its docstring:
    it stops after the file that brings `max_agents` sessions, so a later file (damaged here, or one of 160 large
    ones) is not read; `limit` is the first that many files, and 0 of them is no workload."""
    from dualpath_jax.workloads.traces import load_trace

    _session_file(tmp_path / "trace_1.json", "one", [_req(0.0, 70, [1])])
    _session_file(tmp_path / "trace_2.json", "two", [_req(0.0, 70, [1])])
    (tmp_path / "trace_3.json").write_text("{ not json")
    assert [t.source for t in load_trace(tmp_path, max_agents=2)] == ["trace_1.json", "trace_2.json"]
    assert [t.source for t in load_trace(tmp_path, limit=1)] == ["trace_1.json"]  # `limit`: the first files
    assert [t.source for t in load_trace(tmp_path, limit=2)] == ["trace_1.json", "trace_2.json"]
    # (mutation: the `n == 0` refusal of `_check_count` dropped: limit=0 loaded no session, silently)
    with pytest.raises(ValueError, match=r"limit=0 loads nothing: give an int >= 1, or None for the whole trace"):
        load_trace(tmp_path, limit=0)


# ---- registry.py ----------------------------------------------------------------------------------------------------


def test_a_registry_lists_and_iterates_its_names_sorted():
    """Mutations: `Registry.names()` and `Registry.__iter__` in registration order instead of sorted. The names
    are what CLIs and error messages list ("known: 32K, 48K, 64K"), the same whatever order the modules that
    register them were imported in."""
    from dualpath_jax.registry import Registry

    reg = Registry("thing")
    for name in ("zeta", "alpha", "mid"):
        reg.add(name, object())
    assert reg.names() == ["alpha", "mid", "zeta"] and list(reg) == ["alpha", "mid", "zeta"] and len(reg) == 3
    with pytest.raises(KeyError, match=r"known: alpha, mid, zeta"):
        reg.get("nope")


# ---- experiments/sweep.py -------------------------------------------------------------------------------------------


def test_a_sweep_row_names_the_seed_the_cell_ran_with_and_its_simulation_rates():
    """Mutations: `run_cell`'s row took the cell's seed item ("" for the config's own seed) instead of the seed the
    simulation ran with (`cfg.seed`), and dropped the simulator's events_per_s / turns_per_s. sweep.csv's `seed`
    column says which seed each row is (rows of one cell over --seeds are told apart by it), and its COLUMNS list
    both rates. (In a subprocess: the launcher's absl flags stay out of the test process.)"""
    import json

    code = (
        "import json; from experiments.sweep import COLUMNS, run_cell; "
        "rows = [run_cell(('configs/sim_tiny.py', 'dualpath', 'agents=2', 'turns=2', s)) for s in ('', '3')]; "
        "print(json.dumps({'rows': rows, 'columns': COLUMNS}))"
    )
    out = _launch("-c", code)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    (row, seeded), columns = got["rows"], got["columns"]
    assert row["seed"] == 0 and row["setup"] == "sim_tiny.py" and row["load"] == "agents=2"
    assert row["events_per_s"] > 0 and row["turns_per_s"] > 0 and row["turns"] == 4
    assert set(row) <= set(columns)
    assert seeded["seed"] == 3
