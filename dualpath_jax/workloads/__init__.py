"""Agent workloads: types, synthetic generator (paper Table 2), real-trace loaders, arrival models.

from dualpath_jax.workloads import make_agents, load_trace, make_arrivals, summarize
agents = make_agents("64K", n_agents=512, seed=0)
sessions = load_trace("kvcache_tester", limit=4)
"""

from dualpath_jax.workloads.arrivals import ARRIVALS, ArrivalModel, make_arrivals  # noqa: F401
from dualpath_jax.workloads.stats import WorkloadStats, summarize  # noqa: F401
from dualpath_jax.workloads.synthetic import DATASETS, SyntheticSpec, generate_trajectories, make_agents  # noqa: F401
from dualpath_jax.workloads.traces import (  # noqa: F401
    TraceFormatError,
    load_kvcache_session,
    load_kvcache_tester,
    load_mooncake,
    load_trace,
    traces_dir,
)
from dualpath_jax.workloads.types import Trajectory, Turn  # noqa: F401


def load_workload(
    spec: str, n_agents: int | None = None, seed: int = 0, limit: int | None = None, max_agents: int | None = None
) -> list[Trajectory]:
    """A synthetic dataset by name ("32K", "48K", "64K": `n_agents` agents, default 500) or a trace path (its first
    `limit` requests / files, its first `max_agents` trajectories each whole: `load_trace`)."""
    if spec in DATASETS:
        return make_agents(spec, 500 if n_agents is None else n_agents, seed=seed)
    return load_trace(spec, limit=limit, max_agents=max_agents, warn_fewer=False)  # (workload_stats refuses)
