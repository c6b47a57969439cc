"""Discrete-event cluster simulator (DESIGN.md "Simulator"): the registered policies and the shared cost
model on flow-level storage and compute networks, at paper scale.

    from dualpath_jax.sim import load_config, sim_config_from_dict, run
    cfg = sim_config_from_dict(load_config("configs/paper_ds660b.py:basic").to_dict())
    result = run(cfg)            # SimResult(records, links, stats, summary, config, policy_config)
"""

from dualpath_jax.sim.config import MODES, ClusterConfig, SimConfig, WorkloadConfig, sim_config_from_dict
from dualpath_jax.sim.configs_io import load_config, load_sim_config
from dualpath_jax.sim.network import FlowNetwork, max_min_rates
from dualpath_jax.sim.runner import SimResult, build_simulator, run
from dualpath_jax.sim.simulator import Simulator

__all__ = [
    "MODES",
    "ClusterConfig",
    "SimConfig",
    "WorkloadConfig",
    "sim_config_from_dict",
    "load_config",
    "load_sim_config",
    "FlowNetwork",
    "max_min_rates",
    "SimResult",
    "build_simulator",
    "run",
    "Simulator",
]
