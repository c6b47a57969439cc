"""Load `configs/<file>.py[:variant]` the way the launchers' --config flag does (for sweeps and tests)."""

from __future__ import annotations

import importlib.util
import os

from dualpath_jax.sim.config import SimConfig, sim_config_from_dict


def load_config(spec: str, overrides: dict | None = None):
    """`spec` = "configs/paper_ds660b.py:basic,agents=512" -> the file's get_config(variant) ConfigDict.

    `overrides` maps dotted keys to values ("cluster.snic_gbps": 100.0), like --config.x.y=... flags.
    """
    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} (from {spec!r}) does not exist")
    name = "_simcfg_" + os.path.splitext(os.path.basename(path))[0]
    mod_spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    if not hasattr(mod, "get_config"):
        raise AttributeError(f"config file {path!r} has no get_config(arg)")
    cfg = mod.get_config(variant or None)
    for key, value in (overrides or {}).items():
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[p]
        if parts[-1] not in node:
            raise KeyError(f"config {spec!r} has no field {key!r}")
        node[parts[-1]] = value
    return cfg


def load_sim_config(spec: str, overrides: dict | None = None) -> SimConfig:
    return sim_config_from_dict(load_config(spec, overrides).to_dict())
