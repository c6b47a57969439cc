"""Link samples of traffic managers made at different times (each runtime node process has its own) share one
wall-clock grid of bins, so their bytes add up bin by bin: no re-binning before a per-bin balance."""

from __future__ import annotations

import math
import time

import pytest

from dualpath_jax.traffic import TrafficManager


def _wall_starts(tm: TrafficManager, link: str) -> list[float]:
    """Wall-clock starts of `link`'s bins (as the runtime's nodes report them: `node.EngineGroup.wall_origin`)."""
    wall_origin = time.time() - (time.monotonic() - tm.clock_origin)
    return [s.t0 + wall_origin for s in tm.link(link).samples()]


@pytest.mark.parametrize("interval", [0.1, 0.25])
def test_managers_made_apart_bin_on_one_wall_grid(interval):
    first = TrafficManager(sample_interval=interval)
    time.sleep(interval * 0.37)  # (a node process that starts a little later)
    second = TrafficManager(sample_interval=interval)
    starts = []
    for tm, node in ((first, 0), (second, 1)):
        tm.add_snic(node, math.inf)
        tm.pacer(f"snic/node{node}").pace(4096, "low")
        starts += _wall_starts(tm, f"snic/node{node}")
    assert starts
    for t in starts:  # every bin starts on the grid (to the clocks' read jitter)
        k = t / interval
        assert abs(k - round(k)) < 1e-3, (t, interval)


def test_wall_grid_origin():
    from dualpath_jax.traffic import wall_grid_origin

    o = wall_grid_origin(0.1)
    assert time.monotonic() - 0.1 - 1e-3 <= o <= time.monotonic()
    assert TrafficManager(clock_origin=5.0).clock_origin == 5.0  # (given: kept as it is)
    for bad in ("0.1", True, 0, -1.0, math.inf, math.nan):  # refused by the links made (tests/test_traffic.py)
        assert TrafficManager(sample_interval=bad).clock_origin <= time.monotonic()
