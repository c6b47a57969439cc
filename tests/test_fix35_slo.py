"""A turn still decoding when the clock stops whose TPOT is already past the bound is a miss (`metrics.slo_summary`'s
`clock_end_s`): it was judged on its TTFT alone, a hit, so a cut or overloaded probe's attainment counted turns that
could no longer meet the TPOT bound (the metrics audit's F3, session 51)."""

import math

from dualpath_jax import metrics
from dualpath_jax.metrics import TurnRecord


def _turn(i, first, finished, gen=11):
    return TurnRecord(i, 0, 100, 0, gen, arrival=0.0, first_token=first, second_token=first + 0.01, finished=finished)


def test_a_turn_still_decoding_past_the_tpot_bound_is_a_miss():
    turns = [
        _turn(0, 1.0, 1.2),  # finished: TPOT 20 ms, a hit
        _turn(1, 1.0, math.nan),  # still decoding since 1 s: at a 2 s end at least 100 ms a token, a miss
        _turn(2, 1.9, math.nan),  # still decoding since 1.9 s: at least 10 ms a token so far, judged on its TTFT
    ]
    unknown = metrics.slo_summary(turns, ttft_s=4.0, tpot_s=0.05, percentile=90)
    assert unknown["slo_attainment"] == 1.0  # (no clock end: as before, both judged on their TTFT)
    assert math.isclose(unknown["tpot_p90_s"], 0.02) and unknown["slo_met"]
    got = metrics.slo_summary(turns, ttft_s=4.0, tpot_s=0.05, percentile=90, clock_end_s=2.0)
    assert got["slo_attainment"] == 2 / 3
    # its TPOT counts as infinite in the percentile, as a missing first token's TTFT does
    assert got["tpot_p90_s"] == math.inf and not got["slo_met"]
    assert metrics.slo_summary(turns, 4.0, 0.05, 50, clock_end_s=2.0)["tpot_p50_s"] == math.inf  # ([0.02, inf])
    # a bound the decoding turns can still meet: nothing changes
    assert metrics.slo_summary(turns, 4.0, 0.2, 90, clock_end_s=2.0)["slo_attainment"] == 1.0
