"""Online capacity: the largest APS whose turns meet the SLO (TTFT <= 4 s, TPOT <= 50 ms), by bisection.

Each probe simulates Poisson agent arrivals at one APS over `duration_s`; turns that arrive in
[warmup_s, duration_s) are judged (the SLO percentile of TTFT and of TPOT within bounds), and the clock
stops at `duration_s + drain_s` (an agent's later turns may arrive after `duration_s`; turns still decoding then
are judged on TTFT only, unless their TPOT is already certain to miss: `metrics.slo_summary`'s `clock_end_s`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from dualpath_jax.sim import runner
from dualpath_jax.sim.config import SimConfig


def probe(cfg: SimConfig, aps: float, drain_s: float = 120.0) -> dict:
    """Simulate `cfg` online at `aps`; returns the SLO summary (slo_met, percentiles, attainment)."""
    if not 0 <= drain_s < math.inf:  # negative: the run ended before the arrivals did, every probe a miss
        raise ValueError(f"drain_s must be >= 0 s and finite, got {drain_s}")
    w = dataclasses.replace(cfg.workload, kind="online", aps=aps)
    c = dataclasses.replace(cfg, workload=w)
    res = runner.run(c, max_time=w.duration_s + drain_s)
    recs = [r for r in res.records if r.arrival < w.duration_s]
    s = runner.slo_summary(c, recs, res.stats.get("sim_end_s"))
    s["aps"] = aps
    s["turns_per_s_wall"] = res.stats["turns_per_s"]
    # the probe's hit rate (all its turns), and a bounded store's counters (cluster.store_capacity_gb): on such a
    # store the hits depend on the load, so the SLO's verdict does too
    s["hit_rate"] = res.summary["hit_rate"]
    s.update({k: res.summary[k] for k in ("store_evicted_bytes", "store_lost_lookups") if k in res.summary})
    return s


def capacity_search(
    cfg: SimConfig,
    lo: float,
    hi: float,
    iters: int = 5,
    drain_s: float = 120.0,
    on_probe: Callable[[dict], None] | None = None,
) -> dict:
    """Bisection for the max APS meeting the SLO in [lo, hi] (lo assumed feasible, checked first).

    Returns {"capacity_aps", "probes": [...], "upper_aps"}: the highest APS that met the SLO and the lowest that
    missed it above. capacity_aps is 0 when even `lo` misses the SLO (upper_aps: `lo`), and `hi` when `hi` meets
    it (no upper_aps: the search bound). `on_probe(p)`, when given, gets each probe's summary as it finishes (a
    launcher's progress line: a paper-scale probe takes minutes).
    """
    if not 0 < lo < hi < math.inf:  # (an infinite hi was refused by its probe, after the probe of lo had run)
        raise ValueError(f"capacity_search needs 0 < lo < hi, both finite, got lo={lo}, hi={hi}")
    if isinstance(iters, bool) or not isinstance(iters, int | np.integer) or iters < 0:
        # (a negative count skipped the bisection and returned lo as the capacity, silently)
        raise ValueError(f"capacity_search needs iters, the bisection steps, to be an int >= 0, got {iters!r}")
    if not cfg.warmup_s < cfg.workload.duration_s:  # no turn would be judged: every probe a miss, capacity 0
        raise ValueError(
            f"capacity_search needs config.warmup_s < config.workload.duration_s (turns arriving in between are "
            f"judged), got {cfg.warmup_s} and {cfg.workload.duration_s}"
        )
    probes = []

    def run_probe(aps: float) -> dict:
        p = probe(cfg, aps, drain_s)
        probes.append(p)
        if on_probe is not None:
            on_probe(p)
        return p

    p = run_probe(lo)
    if not p["slo_met"]:  # the capacity is in [0, lo)
        return {"capacity_aps": 0.0, "probes": probes, "upper_aps": lo}
    p = run_probe(hi)
    if p["slo_met"]:
        return {"capacity_aps": hi, "probes": probes}
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        p = run_probe(mid)
        if p["slo_met"]:
            lo = mid
        else:
            hi = mid
    return {"capacity_aps": lo, "probes": probes, "upper_aps": hi}


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan
