"""The simulator's per-turn records as columns (metrics.TurnTable): a few hundred bytes a turn, not ~700, with the
same records, turns.csv and summaries as TurnRecord objects gave."""

import csv
import dataclasses
import gc
import io
import math
import sys

import numpy as np
import pytest
from test_sim_e2e import _cfg

from dualpath_jax import metrics
from dualpath_jax.sim import run
from dualpath_jax.sim.outputs import write_results


def _deep_bytes(root) -> int:
    """Bytes held by `root` and every object it reaches (each once; classes, modules and functions left out)."""
    seen, stack, total = set(), [root], 0
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, (type, type(sys), type(_deep_bytes))):
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)
        stack.extend(gc.get_referents(o))
    return total


@pytest.fixture(scope="module")
def online():
    """An online run cut before every turn is done: unreached stamps, turns of 1 and more tokens, both read sides."""
    return run(_cfg("dualpath,aps=4,duration=20"), max_time=18.0)


def test_records_hold_under_300_bytes_a_turn():
    res = run(_cfg("dualpath,agents=20,turns=8"))
    recs = res.records
    assert len(recs) > 100 and res.stats["unfinished_turns"] == 0
    per_turn = _deep_bytes(recs) / len(recs)
    # (a list of TurnRecords: ~480 B a turn here, boxed floats and large ints each an object of its own)
    assert per_turn < 300, per_turn


def test_records_read_as_turn_records(online):
    recs = online.records
    rows = list(recs)
    assert all(type(r) is metrics.TurnRecord for r in rows)
    assert [dataclasses.astuple(r) for r in rows] == [dataclasses.astuple(recs[i]) for i in range(len(recs))]
    assert [dataclasses.astuple(r) for r in recs[-3:]] == [dataclasses.astuple(r) for r in rows[-3:]]
    assert recs[-1] == rows[-1] and rows[0].ttft == recs.first_token[0] - recs.arrival[0]
    assert any(math.isnan(r.finished) for r in rows) and {r.read_side for r in rows} >= {"pe", "de"}
    with pytest.raises(IndexError, match="out of range"):
        recs[len(recs)]
    for name in ("arrival", "first_token", "prompt_tokens", "pe_read_bytes"):
        np.testing.assert_array_equal(metrics.column(recs, name), metrics.column(rows, name))


def test_summaries_and_csv_match_turn_records(online, tmp_path):
    recs, rows = online.records, list(online.records)
    assert repr(metrics.summarize(recs, online.links)) == repr(metrics.summarize(rows, online.links))
    assert repr(metrics.ttft_breakdown(recs)) == repr(metrics.ttft_breakdown(rows))
    for window in ((0.0, math.inf), (5.0, 15.0)):
        slo = metrics.slo_summary(recs, 2.0, 0.05, 90.0, *window)
        assert slo["slo_turns"] > 0 and repr(slo) == repr(_slo_by_records(rows, 2.0, 0.05, 90.0, *window))
    paths = write_results(online, str(tmp_path), {"name": "t"}, plot=False)
    with open(paths["turns"], newline="") as f:
        got = f.read()
    want = io.StringIO(newline="")
    w = csv.writer(want)
    w.writerow([fl.name for fl in dataclasses.fields(metrics.TurnRecord)])
    w.writerows(dataclasses.astuple(r) for r in rows)
    assert got == want.getvalue()


def _slo_by_records(records, ttft_s, tpot_s, percentile, warmup_s, end_s) -> dict:
    """`metrics.slo_summary` as it was, record by record (it is column-wise now)."""
    recs = [r for r in records if warmup_s <= r.arrival < end_s and r.gen_tokens > 0]
    done = [r for r in recs if not math.isnan(r.finished)]
    ttft = [r.ttft if not math.isnan(r.first_token) else math.inf for r in recs]
    tpot = [r.tpot for r in done if r.gen_tokens > 1]
    ttft_q = metrics.percentile(ttft, percentile)
    ttst = [r.ttst if r.gen_tokens <= 1 or not math.isnan(r.second_token) else math.inf for r in recs]
    tpot_q = float(np.percentile(tpot, percentile)) if tpot else math.nan
    ok = [
        (not math.isnan(r.first_token))
        and r.ttft <= ttft_s
        and (r.gen_tokens <= 1 or math.isnan(r.finished) or r.tpot <= tpot_s)
        for r in recs
    ]
    pct = f"{percentile:g}"
    return {
        "slo_turns": len(recs),
        "slo_attainment": float(np.mean(ok)),
        f"ttft_p{pct}_s": ttft_q,
        f"tpot_p{pct}_s": tpot_q,
        "ttst_p50_s": metrics.percentile(ttst, 50),
        "slo_met": bool(ttft_q <= ttft_s and (math.isnan(tpot_q) or tpot_q <= tpot_s)),
    }


def test_table_keeps_values_that_are_no_int64():
    t = metrics.TurnTable(capacity=1)
    t.add(0, 0, 100, 0, 5, 0.0)
    t.add(np.int64(7), 1, 100.0, 2**70, 5, 1.5)  # a workload's whole-number float, a count past int64
    rows = list(t.rows())
    assert rows[1][:5] == (7, 1, 100.0, 2**70, 5) and type(rows[1][2]) is float and type(rows[1][0]) is np.int64
    assert rows[0][:6] == (0, 0, 100, 0, 5, 0.0) and type(rows[0][2]) is int
    assert rows[0][6] is not None and math.isnan(rows[0][6]) and rows[0][-5:] == (-1, -1, "", 0, 0)
    np.testing.assert_array_equal(t.column("prompt_tokens"), [100.0, 100.0])
    assert len(t) == 2 and t[1].hit_tokens == 2**70
