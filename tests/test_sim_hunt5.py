"""Defects found by the fifth simulator hunt of 2026-12-03 (each test failed before its fix):
- `sim_end_s` was the time of a stale network check: a flow slowed by the collectives asked for a check ~1.7 M s
  ahead, then sped up and finished; the check still fired and moved the clock (turns done by 1.32 s). The fetch
  that found the queue empty after the last turn moved it too (up to a fetch step);
- a KV room of 1e300 GB (or a ~0 B/token KV, a ~0 prefill time scale) failed with an OverflowError naming nothing;
- a ~0 GB/s link, a ~0 s bucket or a ~infinite decode time scale ran for hours in the per-bucket byte accounting."""

import json
import math
import subprocess
import sys

import pytest

from dualpath_jax.sim import load_sim_config
from dualpath_jax.sim.config import SimConfigError
from dualpath_jax.sim.runner import build_simulator

TINY = "configs/sim_tiny.py:dualpath,agents=2,turns=2"
TINY1 = "configs/sim_tiny.py:dualpath,agents=2,turns=1"
DS = "configs/paper_ds660b.py:dualpath,agents=4,turns=2"


# ---- 1. a stale check does not extend the run ----------------------------------------------------------------------
def test_a_stale_network_check_does_not_extend_the_run():
    over = {"cluster.high_share": 0.999999999, "cluster.collective_bytes_per_token": 1e12}
    records, links, stats = build_simulator(load_sim_config(TINY, over)).run()
    end = max(r.finished for r in records)
    assert stats["unfinished_turns"] == 0 and end < 10.0
    assert stats["sim_end_s"] == end  # was ~1.7e6 s (or 3.4e6): the stale check's time
    assert all(s.t1 <= math.ceil(end) + 1.0 for s in links)


def test_the_fetch_that_finds_the_queue_empty_does_not_extend_the_run():
    """Two 7 ms turns, a group fetch every 2.5 s: the run ended at the next fetch, which found nothing (2.5 s)."""
    records, _, stats = build_simulator(load_sim_config(TINY1, {"cluster.fetch_interval_s": 5.0})).run()
    assert stats["sim_end_s"] == max(r.finished for r in records) < 0.1


def test_an_uncut_run_still_ends_at_its_last_event():
    records, _, stats = build_simulator(load_sim_config(TINY)).run()
    assert stats["sim_end_s"] == max(r.finished for r in records) > 0


# ---- 2. values too large for a double are refused by name ---------------------------------------------------------
@pytest.mark.parametrize("field", ["de_hbm_kv_gb", "pe_hbm_kv_gb"])
def test_an_infinite_kv_room_is_refused_by_name(field):
    with pytest.raises(SimConfigError, match=f"config.cluster.{field} = 1e\\+300 GB"):
        build_simulator(load_sim_config(f"{TINY}", {f"cluster.{field}": 1e300}))


@pytest.mark.parametrize(
    "field, value", [("kv_bytes_per_token", 1e-300), ("pe_time_scale", 1e-320)], ids=["kv_bytes", "pe_time_scale"]
)
def test_a_policy_window_of_infinite_tokens_is_refused_by_name(field, value):
    with pytest.raises(SimConfigError, match=f"config.cluster.{field} is too close to 0"):
        build_simulator(load_sim_config(DS, {f"cluster.{field}": value}))


# ---- 3. a run that cannot end is refused instead of running for hours ---------------------------------------------
_NEVER_ENDS = """
import json, sys
from dualpath_jax.sim import load_sim_config
from dualpath_jax.sim.config import SimConfigError
from dualpath_jax.sim.runner import build_simulator
out = []
for field, value in json.loads(sys.argv[1]):
    try:
        build_simulator(load_sim_config(sys.argv[2], {field: value})).run()
        out.append("ran")
    except SimConfigError as e:
        out.append(str(e))
print(json.dumps(out))
"""


def test_a_run_that_cannot_end_is_refused_by_name():
    cases = [("cluster.snic_gbps", 1e-12), ("cluster.bucket_s", 1e-300), ("cluster.de_time_scale", 1e300)]
    try:  # (a subprocess: before the fix each ran for hours in the per-bucket accounting)
        p = subprocess.run(
            [sys.executable, "-c", _NEVER_ENDS, json.dumps(cases), TINY], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        pytest.fail("a run with a ~0 GB/s SNIC, a ~0 s bucket or a ~inf decode time scale did not end")
    assert p.returncode == 0, p.stderr
    msgs = json.loads(p.stdout.strip().splitlines()[-1])
    for (field, _), msg in zip(cases, msgs, strict=True):
        assert "config.cluster.bucket_s" in msg and field.split(".")[1] in msg, msg
