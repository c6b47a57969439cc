"""Defects found by the eighth simulator hunt of 2026-12-04 (each test failed before its fix; notes:
/work/notes/hunt_sim8.md):
- the simulator had one host-buffer size for every node, so experiments/bench_runtime.py's copy of a runtime setup
  gave its DE nodes the PE buffer (`buffers.pe_buffer_bytes`) where the runtime's DE nodes map `de_buffer_bytes`
  (now `cluster.de_host_buffer_gb`, default None: every node `cluster.host_buffer_gb`, as before);
- a turn arriving at an idle scheduler waits for the next periodic fetch tick, found as tick + k * step with k rounded
  up: rounding could leave that tick an ulp below the arrival, so the fetch was an event in the past (the clock ran
  backwards) and the turn was scheduled before it arrived (a negative queue time)."""

import re

import pytest

from dualpath_jax.sim import load_sim_config
from dualpath_jax.sim.config import GB
from dualpath_jax.sim.runner import build_simulator
from dualpath_jax.workloads.types import Trajectory, Turn

TINY = "configs/sim_tiny.py"


def _simulator(spec: str, trajs, overrides: dict | None = None, de_gb: float | None = None):
    """The runner's simulator of `spec`, its DE nodes' buffer `de_gb` (cluster.de_host_buffer_gb) when given."""
    over = dict(overrides or {})
    if de_gb is not None:
        over["cluster.de_host_buffer_gb"] = de_gb
    return build_simulator(load_sim_config(spec, over), trajs)


# ---- 1. DE nodes' host buffer apart from the PE nodes' ---------------------------------------------------------------


def test_de_nodes_get_their_own_host_buffer_and_pe_nodes_keep_theirs():
    over = {"cluster.host_buffer_gb": 3.0}
    trajs = [Trajectory(0, [Turn(1000, 4)])]
    sim = _simulator(f"{TINY}:dualpath", trajs, over, de_gb=0.25)
    assert {(n.role, n.buffer_bytes) for n in sim.nodes} == {("prefill", 3.0 * GB), ("decode", 0.25 * GB)}
    # not given (the default None): every node host_buffer_gb, as before
    assert {n.buffer_bytes for n in _simulator(f"{TINY}:dualpath", trajs, over).nodes} == {3.0 * GB}


def test_a_de_buffer_of_one_prompt_holds_one_request_at_a_time_beside_a_large_pe_buffer():
    """The DE node's buffer holds a request's whole prompt KV from before its reads to its H2D (after its prefill):
    sized for one prompt, two requests on that node never overlap there, whatever the PE buffer."""
    b = 1000.0  # bytes per token
    over = {"cluster.gpus_per_node": 1, "cluster.kv_bytes_per_token": b, "cluster.host_buffer_gb": 80.0}
    trajs = [Trajectory(i, [Turn(5000, 8)]) for i in range(4)]
    records, _, stats = _simulator(f"{TINY}:dualpath", trajs, over, de_gb=5000 * b * 1.5 / GB).run()
    assert stats["unfinished_turns"] == 0 and len(records) == 4
    spans = sorted((r.read_start, r.prefill_end) for r in records)
    assert all(a[1] <= b_[0] for a, b_ in zip(spans, spans[1:], strict=False)), spans
    # with the PE-sized buffer on the DE node too, they overlap (the setting is what serialises them)
    records, _, _ = _simulator(f"{TINY}:dualpath", trajs, over).run()
    spans = sorted((r.read_start, r.prefill_end) for r in records)
    assert any(a[1] > b_[0] for a, b_ in zip(spans, spans[1:], strict=False)), spans


@pytest.mark.parametrize("value", [0, 0.0, -1.0, float("inf"), float("nan"), "1"])
def test_a_de_buffer_out_of_range_is_refused_by_name(value):
    # (a string is ml_collections' TypeError naming the field; True is 1.0 to a float field, as for every other)
    with pytest.raises((ValueError, TypeError), match=re.escape("de_host_buffer_gb")):
        _simulator(f"{TINY}:dualpath", [Trajectory(0, [Turn(1000, 4)])], de_gb=value)


def test_bench_runtime_simulator_copy_sizes_de_buffers_as_the_runtime():
    """The runtime's DE nodes map `buffers.de_buffer_bytes`, its PE nodes `pe_buffer_bytes`
    (dualpath_jax/runtime/node.py); the simulator copy gave every node the PE size."""
    pytest.importorskip("ml_collections")
    from configs.tiny_runtime import get_config
    from dualpath_jax.runtime.config import RuntimeConfig
    from experiments import bench_runtime
    from schedulers.cost_model import MODEL_SHAPES, CostModel

    cfg = RuntimeConfig.from_config_dict(get_config().runtime).replace(
        **{"buffers.pe_buffer_bytes": 48 << 20, "buffers.de_buffer_bytes": 96 << 20}
    )
    cost = CostModel(MODEL_SHAPES.get("ds27b"), "cpu")
    trajs = [Trajectory(i, [Turn(300, 4)]) for i in range(2)]
    assert hasattr(bench_runtime, "build_simulator"), "no simulator to look at (sizes set inside simulate)"
    sim = bench_runtime.build_simulator(cfg, trajs, cost, {"block_size": 16})
    sizes = {(n.role, round(n.buffer_bytes)) for n in sim.nodes}
    assert sizes == {("prefill", 48 << 20), ("decode", 96 << 20)}
    assert bench_runtime.simulate(cfg, trajs, cost, {"block_size": 16})["unfinished_turns"] == 0


# ---- 2. the fetch an arrival waits for is never in the past -----------------------------------------------------------


@pytest.mark.parametrize("arrival", [0.35000000000000003, 1.8500000000000003, 1.9000000000000004])
def test_a_turn_arriving_an_ulp_past_a_fetch_tick_is_not_scheduled_before_it_arrives(arrival):
    """1P1D at fetch_interval_s 0.1: a fetch every 0.05 s; the chain stops at 0.05 (empty queue) with its next tick
    at 0.1. An arrival at 0.35000000000000003 gave k = 5 and a fetch at 0.1 + 5 * 0.05 = 0.35, before it."""
    cfg = load_sim_config(f"{TINY}:dualpath")
    assert cfg.cluster.fetch_interval_s == 0.1 and cfg.cluster.prefill_nodes + cfg.cluster.decode_nodes == 2
    trajs = [Trajectory(0, [Turn(1000, 4)]), Trajectory(1, [Turn(1000, 4)], arrival_time=arrival)]
    records, _, stats = build_simulator(cfg, trajs).run()
    assert stats["unfinished_turns"] == 0
    late = records[1]
    assert late.arrival == arrival
    assert late.scheduled >= late.arrival, (late.arrival, late.scheduled)
    assert late.scheduled - late.arrival < 1e-9  # the tick it waited for is (within rounding) its arrival
