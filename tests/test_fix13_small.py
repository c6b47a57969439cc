"""Fix wave 13, small items left by the helpers' journeys."""

from __future__ import annotations

import pytest

from dualpath_jax.runtime.config import ConfigError, RuntimeConfig
from dualpath_jax.runtime.driver import make_trajectories


def test_a_runtime_context_cap_that_cuts_every_agent_names_the_shortest_first_turn():
    """`workload.max_context_tokens` below every agent's first turn ended with "the workload has no trajectories"
    (the simulator names the shortest first turn); the runtime says so too."""
    cfg = RuntimeConfig().replace(
        **{"workload.kind": "synthetic", "workload.agents": 3, "workload.max_context_tokens": 1}
    )
    with pytest.raises(ConfigError, match=r"max_context_tokens = 1 leaves no turn to run: .*3 agents; the shortest "):
        make_trajectories(cfg)
    assert make_trajectories(cfg.replace(**{"workload.max_context_tokens": 0}))  # (no cap: the agents run)
