"""Load `configs/<file>.py[:variant]` the way the launchers' --config flag does (for sweeps and tests)."""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import reprlib

from dualpath_jax.sim.config import SimConfig, sim_config_from_dict


class ConfigFileError(ValueError):
    """A config file that does not load (not Python, a syntax error, an import that fails, no get_config, an
    error raised by its get_config other than a ValueError): its message is one line naming the file."""


def describe_config_file_error(path: str, e: BaseException) -> str:
    """One line for `e`, raised while loading the config file `path` or running its get_config: the error's type
    and message and the file (the launchers print it as `bad config: ...`, with no traceback). A file not named
    .py gets a hint whatever its error (a JSON object is valid Python: it loaded and had no get_config)."""
    return _describe(path, e) + not_py_hint(path)


def not_py_hint(path: str) -> str:
    """The hint for a config file not named .py (README.md, a YAML or JSON file), else ""."""
    return "" if path.endswith(".py") else " (it is not a .py file: a config file is Python with a get_config(arg))"


def _describe(path: str, e: BaseException) -> str:
    if isinstance(e, AttributeError) and getattr(e, "name", None) == "get_config" and _is_module(e):
        return f"config file {path!r} has no get_config(arg)"
    if isinstance(e, SyntaxError):  # README.md, or a .py file with an error
        where = f"{path!r}" + (f", line {e.lineno}" if e.lineno else "")
        return f"SyntaxError: {e.msg} (config file {where})"
    lines = str(e).strip().splitlines()
    what = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    at = users_frame(e)
    if at is None:
        return f"{what} (from config file {path!r})"
    if os.path.realpath(at.filename) == os.path.realpath(path):
        return f"{what} (from config file {path!r}, line {at.lineno})"
    # (a module the config file imports, e.g. one registering a policy of one's own: it named only the config file)
    return f"{what} (at {at.filename}:{at.lineno}, from config file {path!r})"


def users_frame(e: BaseException):
    """The deepest frame of `e`'s traceback in a file of the user's (not Python's, an installed package's or this
    framework's: dualpath_jax, schedulers), a `traceback.FrameSummary`; None where there is none. A config file's
    error and a policy's own mistake (`experiments.simulate`) name it."""
    import sys
    import traceback

    import schedulers

    framework = (os.path.dirname(os.path.dirname(__file__)), os.path.dirname(schedulers.__file__))
    outside = tuple(os.path.realpath(p) + os.sep for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, *framework))
    frames = [
        f
        for f in traceback.extract_tb(e.__traceback__)
        if not f.filename.startswith("<") and not os.path.realpath(f.filename).startswith(outside)
    ]
    return frames[-1] if frames else None


def _is_module(e: AttributeError) -> bool:
    import types

    return isinstance(getattr(e, "obj", None), types.ModuleType)


# Loaded config modules by (real path, name, content hash): a file is executed once per process while it is unchanged,
# as Python imports a module once. experiments.sweep loads a setup per cell: a config file that defines and registers
# its own policy was refused at the second cell (the registration ran again). (Not by mtime: file times tick in
# milliseconds, so a file rewritten at once with as many bytes kept its key.)
_MODULES: dict[tuple, object] = {}


def load_config_module(path: str, name: str):
    """The module of the config file `path` (any extension, as ml_collections' --config flag loads it), or
    ConfigFileError naming the file when it does not load or has no get_config. Executed again only when the file
    changed."""
    try:
        with open(path, "rb") as f:
            key = (os.path.realpath(path), name, hashlib.sha256(f.read()).hexdigest())
    except OSError:
        key = None  # (the loader below names the problem)
    if key in _MODULES:
        return _MODULES[key]
    mod = _exec_config_module(path, name)
    if key is not None:
        _MODULES[key] = mod
    return mod


def _exec_config_module(path: str, name: str):
    loader = importlib.machinery.SourceFileLoader(name, path)
    mod_spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    mod = importlib.util.module_from_spec(mod_spec)
    try:
        loader.exec_module(mod)
    except Exception as e:  # noqa: BLE001 - whatever the file raises: one line naming it
        raise ConfigFileError(describe_config_file_error(path, e)) from e
    if not callable(getattr(mod, "get_config", None)):
        raise ConfigFileError(f"config file {path!r} has no get_config(arg){not_py_hint(path)}")
    return mod


def load_config(spec: str, overrides: dict | None = None):
    """`spec` = "configs/paper_ds660b.py:basic,agents=512" -> the file's get_config(variant) ConfigDict.

    `overrides` maps dotted keys to values ("cluster.snic_gbps": 100.0), like --config.x.y=... flags.
    A file that does not load is a ConfigFileError (a ValueError); a ValueError of its get_config (an unknown
    variant) is raised as it is.
    """
    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):  # (a directory said "does not exist")
        what = "is a directory, not a config file" if os.path.isdir(path) else "does not exist"
        raise FileNotFoundError(f"config file {path!r} (from {spec!r}) {what}")
    mod = load_config_module(path, "_simcfg_" + os.path.splitext(os.path.basename(path))[0])
    try:
        cfg = mod.get_config(variant or None)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - an ImportError, KeyError, ... of the file itself, not of an override
        raise ConfigFileError(describe_config_file_error(path, e)) from e
    if not callable(getattr(cfg, "to_dict", None)):  # (None: "'NoneType' object has no attribute 'to_dict'" traceback)
        what = (
            "None (its get_config has no `return`?)" if cfg is None else f"{reprlib.repr(cfg)} ({type(cfg).__name__})"
        )
        raise ConfigFileError(f"config file {path!r}: get_config returned {what}, not an ml_collections ConfigDict")
    for key, value in (overrides or {}).items():
        node = cfg
        parts = key.split(".")
        for i, p in enumerate(parts):
            # (a path through a number, `cluster.snic_gbps.x`, failed with "argument of type 'float' is not iterable")
            if not _is_section(node):
                raise KeyError(f"config {spec!r} has no field {key!r} ({'.'.join(parts[:i])!r} is not a section)")
            if p not in node:
                raise KeyError(f"config {spec!r} has no field {key!r}")
            if i < len(parts) - 1:
                node = node[p]
        old = node[parts[-1]]
        # (ml_collections casts a bool to a float field, bool being an int: {"cluster.snic_gbps": True} ran at 1 GB/s;
        # a str for a number was a bare TypeError)
        if isinstance(value, bool) and old is not None and not isinstance(old, bool):
            raise ValueError(f"config {spec!r}: override {key}={value!r} is a bool; the field holds {old!r}")
        try:
            node[parts[-1]] = value
        except TypeError as e:
            raise ValueError(f"config {spec!r}: override {key}={value!r}: {e}") from None
    return cfg


def _is_section(node) -> bool:
    """A dict or a ConfigDict (fields by name), not a value."""
    return callable(getattr(node, "keys", None))


# The configs/sim_base.py variant items that set a field only some workload kinds use (sim.config._KIND_FIELDS):
# `configs/paper_ds660b.py:dualpath,duration=600` ran offline as if the item were not there.
_VARIANT_FIELDS = {
    "agents": "workload.n_agents",
    "max_agents": "workload.max_agents",
    "duration": "workload.duration_s",
    "warmup": "warmup_s",
    "shared_hits": "workload.shared_prefix_hits",
    "dataset": "workload.dataset",  # (`kind=trace,dataset=48K` on a setup that replays a trace ran it, silently)
}


def variant_fields(spec: str) -> dict[str, str]:
    """The dotted config fields that the variant of `spec` ("configs/x.py:VARIANT", configs/sim_base.py syntax)
    sets by an item of `_VARIANT_FIELDS` or a `cluster.NAME=` item, each to its item: {"workload.duration_s":
    "duration=600"} (for `sim.config.sim_config_from_dict(..., variant=)`)."""
    _, _, variant = spec.partition(":")
    out = {}
    for item in variant.split(","):
        key, eq, _ = item.strip().partition("=")
        if eq and key in _VARIANT_FIELDS:
            out[_VARIANT_FIELDS[key]] = item.strip()
        elif eq and key.startswith("cluster."):  # (a mode replacing it says so, as for a --config.cluster.* flag)
            out[key] = item.strip()
    return out


def load_sim_config(spec: str, overrides: dict | None = None, *, as_run: bool = False) -> SimConfig:
    """The SimConfig of `spec` with `overrides` (see `load_config`). `as_run`: the config runs as it is (a
    launcher's cell, not the base of a capacity search that makes it online): a variant item or override that its
    workload kind does not use (`duration=` / `warmup=` on an offline run, `agents=` on an online or trace one) is
    refused by name, as the launchers' `--config.*` flags are."""
    cfg = load_config(spec, overrides).to_dict()
    if not as_run:
        return sim_config_from_dict(cfg)
    return sim_config_from_dict(cfg, explicit=set(overrides or ()), variant=variant_fields(spec))
