"""The policy registries and factories (no jax).

    POLICIES.get("dualpath")                     # -> DualPathPolicy (class)
    make_policy("dualpath", alpha_tokens=..., beta_tokens=...)   # -> configured instance
    make_batcher("compute_quota", quota_s=0.3, cost_model=cm)

Each policy class owns a config dataclass `Config`; the factories build it from keyword arguments and
refuse unknown keys with the list of known ones.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dualpath_jax.checks import is_bool, is_int, is_real  # noqa: F401 - the Config fields' type checks
from dualpath_jax.registry import Registry
from schedulers.api import InterEnginePolicy, IntraEnginePolicy

# (policy names are split on "," by --config.policies, sweep --modes and config variants, which read "key=value")
POLICIES: Registry[type[InterEnginePolicy]] = Registry("inter-engine policy", reserved=",=")
BATCHERS: Registry[type[IntraEnginePolicy]] = Registry("intra-engine batching policy")


def describe(x: Any) -> str:
    """`x` and its type, for error messages: `2.5 (float)`, `'no' (str)`."""
    return f"{x!r} ({type(x).__name__})"


def config_fields(cls: type) -> set[str] | None:
    """The field names of a registered class's `Config` dataclass; None when it has none (`build_config` says so)."""
    config_cls = getattr(cls, "Config", None)
    if not (isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls)):
        return None
    return {f.name for f in dataclasses.fields(config_cls)}


def build_config(cls: type, name: str, config: Any = None, /, **kwargs: Any) -> Any:
    """`cls.Config` from a config instance (or None) updated by `kwargs`; unknown keys are an error (`name` too: it
    was a "got multiple values for argument 'name'" TypeError, e.g. from a variant's `batcher.name=fifo`).

    A value the Config refuses is a ValueError / TypeError naming the policy (`split block_size must be ...`).
    """
    config_cls = getattr(cls, "Config", None)
    fields = config_fields(cls)
    # a registered class without one failed as "type object 'X' has no attribute 'Config'" (or dataclasses' "must be
    # called with a dataclass type or instance"), naming neither the policy nor what it lacks
    if fields is None:
        raise TypeError(
            f"{name!r} ({getattr(cls, '__qualname__', cls)!r}) has no `Config` dataclass: every registered policy and "
            f"batcher is a class with a nested @dataclasses.dataclass `Config` (its keyword arguments, may be empty) "
            f"built as cls(config); got Config={config_cls!r}"
        )
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise TypeError(f"{name!r} does not take {unknown}; its config fields are: {sorted(fields)}")
    if config is not None and not isinstance(config, config_cls):
        raise TypeError(f"{name!r} needs a {config_cls.__name__}, got {type(config).__name__}")
    try:
        if config is None:
            return config_cls(**kwargs)
        return dataclasses.replace(config, **kwargs) if kwargs else config
    except (TypeError, ValueError) as e:
        msg = str(e)
        if msg.startswith(f"{name} "):  # the check named its policy already
            raise
        raise (TypeError if isinstance(e, TypeError) else ValueError)(f"{name} {msg}") from None


def make_policy(name: str, /, config: Any = None, **kwargs: Any) -> InterEnginePolicy:
    """A configured inter-engine policy: `make_policy("dualpath", alpha_tokens=..., beta_tokens=...)`."""
    cls = POLICIES.get(name)
    return _named(_build(cls, name, build_config(cls, name, config, **kwargs), "schedule"), name)


def make_batcher(name: str, /, config: Any = None, **kwargs: Any) -> IntraEnginePolicy:
    """A configured intra-engine batching policy: `make_batcher("fifo", token_budget=8192)`."""
    cls = BATCHERS.get(name)
    return _named(_build(cls, name, build_config(cls, name, config, **kwargs), "form_batch"), name)


_NEEDS = {
    "schedule": "schedule(snapshot, queue, fetching_node) method, which a schedulers.POLICIES entry needs (a batcher "
    "is registered in schedulers.BATCHERS)",
    "form_batch": "form_batch(queue) method, which a schedulers.BATCHERS entry needs (a policy is registered in "
    "schedulers.POLICIES)",
}


def _build(cls: type, name: str, config: Any, method: str) -> Any:
    """`cls(config)`, checked to have `method`. A class that could not be built (an abstract `schedule` left by a
    misspelt one) was a TypeError naming no registered name; a batcher registered as a policy (or the reverse) was
    built and failed at its first fetch as "'X' object has no attribute 'schedule'"."""
    what = f"{name!r} ({getattr(cls, '__qualname__', cls)})"
    try:
        obj = cls(config)
    except TypeError as e:
        raise TypeError(f"{what} cannot be built as cls(config): {e}") from e
    if not callable(getattr(obj, method, None)):
        raise TypeError(f"{what} has no {_NEEDS[method]}")
    return obj


def _named(obj: Any, name: str) -> Any:
    """`obj` named as it was registered and asked for: the runtime's errors name a policy / batcher by its `name`,
    which was the base class's "?" for a class that set none (the registry example sets none) and "basic" for one
    copied from BasicPolicy, so a custom policy's bad assignment was blamed on policy '?' or 'basic'."""
    obj.name = name
    return obj
