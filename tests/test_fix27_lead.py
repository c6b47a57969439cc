"""Session 44, the lead's fixes: a turn that generates 0 tokens (3 of 5,116 requests of the kv-cache-tester traces)
has no first token: the simulator stamps none, and TTFT, its "no first token" count and the SLO leave it out."""

import math

from dualpath_jax import metrics
from dualpath_jax.sim import load_sim_config
from dualpath_jax.sim.runner import build_simulator
from dualpath_jax.workloads.types import Trajectory, Turn

TINY = "configs/sim_tiny.py"


def _record(gen: int, first: float, finished: float = 3.0) -> metrics.TurnRecord:
    return metrics.TurnRecord(
        trajectory_id=0, turn_index=0, prompt_tokens=100, hit_tokens=0, gen_tokens=gen, arrival=0.0,
        first_token=first, finished=finished,
    )  # fmt: skip


def test_a_zero_token_turn_gets_no_first_token_in_the_simulator():
    trajs = [Trajectory(0, [Turn(500, 0), Turn(40, 3)]), Trajectory(1, [Turn(300, 4)])]
    records, _, stats = build_simulator(load_sim_config(f"{TINY}:dualpath"), trajs).run()
    assert stats["unfinished_turns"] == 0
    zero = [r for r in records if r.gen_tokens == 0]
    assert len(zero) == 1 and math.isnan(zero[0].first_token) and not math.isnan(zero[0].finished)
    assert all(not math.isnan(r.first_token) for r in records if r.gen_tokens > 0)
    assert metrics.summarize(records)["turns_without_first_token"] == 0


def test_metrics_leave_a_zero_token_turn_out_of_ttft_and_the_slo():
    recs = [_record(0, math.nan), _record(4, 0.5), _record(4, 2.0)]
    s = metrics.summarize(recs)
    assert s["turns_without_first_token"] == 0 and s["ttft_p50_s"] == 1.25
    slo = metrics.slo_summary(recs, ttft_s=1.0, tpot_s=10.0, percentile=50)
    assert slo["slo_turns"] == 2 and slo["slo_attainment"] == 0.5  # (it was 1 of 3: the 0-token turn a miss)
    # a turn that should have produced a token and did not is still counted and missed
    late = [*recs, _record(2, math.nan, finished=math.nan)]
    assert metrics.summarize(late)["turns_without_first_token"] == 1
    assert metrics.slo_summary(late, ttft_s=1.0, tpot_s=10.0, percentile=50)["slo_attainment"] == 1 / 3
