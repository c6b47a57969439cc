"""Fix wave 9, workloads / schedulers / metrics: argument checks the earlier audits noticed and left alone."""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import numpy as np
import pytest

from dualpath_jax import metrics
from dualpath_jax.workloads import traces
from dualpath_jax.workloads.types import Trajectory, Turn
from schedulers import PrefillWork, make_batcher
from schedulers.batching import largest_fitting_bsz
from schedulers.cost_model import CostModel
from schedulers.pd_bounds import as_fraction, binding_constraints

CM = CostModel("ds27b", "h800")


def _work(i, cached, remaining):
    return PrefillWork(request_id=i, cached_tokens=cached, remaining_tokens=remaining)


# ---- 1. load_trace's limit on one file ------------------------------------------------------------------------------


def test_load_trace_limit_counts_files_for_one_session_file_as_for_a_directory(tmp_path, monkeypatch):
    """Noticed: `load_trace(<one session file>, limit=N)` "ignores" limit. Not a defect: for kv-cache-tester input
    `limit` counts session files (a directory's first N), and one file given by name is one file, so any limit >= 1
    keeps it whole, as `load_kvcache_tester([file], limit=N)` does; a bad limit is refused for it too. A Mooncake
    file counts lines (its first N)."""
    monkeypatch.setenv(traces.TRACES_ENV, "/work/shared/traces")
    one = traces.resolve_trace_path("kvcache_tester/trace_0001.json.gz")
    whole = traces.load_trace(one)
    for n in (1, 2):
        got = traces.load_trace(one, limit=n)
        assert [(t.source, t.arrival_time, len(t.turns)) for t in got] == [
            (t.source, t.arrival_time, len(t.turns)) for t in whole
        ]
        assert len(traces.load_kvcache_tester([one], limit=n)) == len(whole)
    with pytest.raises(ValueError, match="limit=0 loads nothing"):
        traces.load_trace(one, limit=0)
    # Mooncake: the first `limit` lines
    lines = [
        '{"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [1, 2]}',
        '{"timestamp": 10, "input_length": 600, "output_length": 5, "hash_ids": [3, 4]}',
    ]
    p = tmp_path / "two.jsonl"
    p.write_text("\n".join(lines) + "\n")
    assert len(traces.load_trace(p)) == 2 and len(traces.load_trace(p, limit=1)) == 1


# ---- 2. Trajectory.arrival_time -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0, -1e-9, True, np.bool_(False), "0.5", None, 1j])
def test_trajectory_refuses_an_arrival_time_that_is_no_finite_time(bad):
    """`Trajectory.arrival_time` was not checked: NaN, inf, a negative time, a bool (True: 1 s) or a string was kept
    until the simulator refused (NaN / inf / negative) or a comparison failed naming no field (the runtime driver
    scales it without the simulator's check). The contract: a real number of seconds, finite and >= 0."""
    with pytest.raises(ValueError, match=r"trajectory 7 arrival_time must be a finite number of seconds >= 0, got"):
        Trajectory(7, [Turn(100, 5)], arrival_time=bad)


def test_trajectory_takes_numpy_and_int_arrival_times():
    assert Trajectory(0, [Turn(100, 5)], arrival_time=np.float32(2.5)).arrival_time == 2.5
    assert Trajectory(0, [Turn(100, 5)], arrival_time=3).arrival_time == 3
    assert Trajectory(0, [Turn(100, 5)]).arrival_time == 0.0


# ---- 3. largest_fitting_bsz and the compute quota -------------------------------------------------------------------


def _cost(b):
    return float(b)


@pytest.mark.parametrize("budget", [math.nan, math.inf, -1.0, True, "0.3", None])
def test_largest_fitting_bsz_refuses_a_budget_that_is_no_finite_time(budget):
    """`largest_fitting_bsz(cost, nan, upper)` returned 1 (no comparison with NaN holds, so the search kept its lower
    end) instead of refusing; inf took `upper` whatever it cost, a negative budget 0. The budget is a finite time >= 0.
    """
    with pytest.raises(ValueError, match=r"largest_fitting_bsz budget must be a finite number >= 0, got"):
        largest_fitting_bsz(_cost, budget, 10)


@pytest.mark.parametrize("upper", [2.5, True, math.nan, -1, "10", None])
def test_largest_fitting_bsz_refuses_an_upper_bound_that_is_no_token_count(upper):
    """`upper` is a token count: 2.5 searched fractional sizes' midpoints, True was 1, NaN a TypeError in `//`."""
    with pytest.raises(ValueError, match=r"largest_fitting_bsz upper must be an int >= 0, got"):
        largest_fitting_bsz(_cost, 5.0, upper)


def test_largest_fitting_bsz_still_searches_valid_input():
    assert largest_fitting_bsz(_cost, 5.0, 10) == 5
    assert largest_fitting_bsz(_cost, 0.0, 10) == 0
    assert largest_fitting_bsz(_cost, 5.0, 0) == 0
    assert largest_fitting_bsz(_cost, 50, np.int64(10)) == 10


def test_compute_quota_refuses_an_infinite_quota():
    """`compute_quota(quota_s=inf)` was taken: no quota at all (PAPER.md's quota is 300 ms of attention per forward);
    a finite quota is the contract (a larger one still chunks by time)."""
    with pytest.raises(ValueError, match=r"compute_quota quota_s must be > 0, got inf"):
        make_batcher("compute_quota", cost_model=CM, quota_s=math.inf)
    assert make_batcher("compute_quota", cost_model=CM, quota_s=1e6).config.quota_s == 1e6


# ---- 4. duplicate request ids in a batcher's queue ------------------------------------------------------------------


@pytest.mark.parametrize("name, kw", [("fifo", {"token_budget": 1000}), ("compute_quota", {"cost_model": CM})])
def test_batchers_refuse_a_request_id_twice(name, kw):
    """The batchers took one request twice in one batch (two BatchItems of request 1: its tokens prefilled twice),
    where the inter-engine policies refuse a queue with a request_id twice. Checked on the requests a batcher reaches
    (it reads a FIFO prefix of the PE's queue, not the whole queue)."""
    b = make_batcher(name, **kw)
    with pytest.raises(ValueError, match=r"queue holds the same request_id twice \(1\)"):
        b.form_batch([_work(1, 0, 10), _work(2, 0, 10), _work(1, 0, 10)])
    with pytest.raises(ValueError, match=r"queue holds the same request_id twice \(3\)"):  # a finished one too
        b.form_batch([_work(3, 10, 0), _work(3, 0, 10)])
    assert [x.request_id for x in b.form_batch([_work(1, 0, 10), _work(2, 0, 10)])] == [1, 2]


# ---- 7. pd_bounds -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rel_tol", [True, False, np.bool_(True), "1e-9", None])
def test_binding_constraints_refuses_a_tolerance_that_is_no_number(rel_tol):
    """`binding_constraints(rel_tol=True)` was taken as a tolerance of 1 (every constraint within 100% "binds"); a
    string or None was a TypeError from a comparison naming no argument."""
    with pytest.raises(ValueError, match=r"rel_tol must be a finite number >= 0, got"):
        binding_constraints(8, 1.0, 50.0, 500.0, rel_tol=rel_tol)


@pytest.mark.parametrize("x", [math.nan, math.inf, True, "0.5", None])
def test_as_fraction_refuses_a_value_that_is_no_finite_number(x):
    """`as_fraction(nan / inf)` was a bare ValueError / OverflowError from `Fraction`, True was 1."""
    with pytest.raises(ValueError, match=r"as_fraction x must be a finite number, got"):
        as_fraction(x)


@pytest.mark.parametrize("max_den", [0, -3, 2.5, True, math.inf, None])
def test_as_fraction_refuses_a_denominator_that_is_no_count(max_den):
    """`as_fraction(x, max_den=True)` limited to denominator 1, 2.5 and inf were taken, 0 a bare ValueError."""
    with pytest.raises(ValueError, match=r"as_fraction max_den must be an int >= 1, got"):
        as_fraction(0.5, max_den=max_den)


def test_as_fraction_takes_numpy_numbers():
    """np.float32 was a TypeError of Fraction, an np.int64 max_den overflowed (int64 arithmetic) in its search."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert as_fraction(1 / 7) == as_fraction(1 / 7, max_den=np.int64(1000)) == Fraction(1, 7)
        assert as_fraction(np.float32(0.5)) == Fraction(1, 2)


# ---- 8. summarize: turns without a first token ----------------------------------------------------------------------


def _record(tid, arrival, first, finished, gen=3):
    return metrics.TurnRecord(
        trajectory_id=tid,
        turn_index=0,
        prompt_tokens=100,
        hit_tokens=0,
        gen_tokens=gen,
        arrival=arrival,
        first_token=first,
        finished=finished,
    )


def test_summarize_counts_the_turns_without_a_first_token():
    """The TTFT percentiles of `summarize` leave out turns that never got a first token (NaN), while the SLO judge
    counts them as misses: a reader saw a good ttft_p99_s for a run whose slow turns never started. `summarize` now
    says how many turns the TTFT figures left out (`turns_without_first_token`); the other keys keep their meaning."""
    recs = [_record(0, 0.0, 1.0, 2.0), _record(1, 0.0, math.nan, math.nan), _record(2, 1.0, 2.0, math.nan)]
    s = metrics.summarize(recs)
    assert s["turns_without_first_token"] == 1
    assert s["turns"] == 3 and s["ttft_p50_s"] == 1.0 and s["ttft_p99_s"] == 1.0
    assert metrics.summarize(recs[:1])["turns_without_first_token"] == 0
    assert isinstance(s["turns_without_first_token"], int)
