"""The policy registries and factories (no jax).

    POLICIES.get("dualpath")                     # -> DualPathPolicy (class)
    make_policy("dualpath", alpha_tokens=..., beta_tokens=...)   # -> configured instance
    make_batcher("compute_quota", quota_s=0.3, cost_model=cm)

Each policy class owns a config dataclass `Config`; the factories build it from keyword arguments and
refuse unknown keys with the list of known ones.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import types
import typing
from collections.abc import Mapping
from typing import Any

from dualpath_jax.checks import is_bool, is_int, is_real  # noqa: F401 - the Config fields' type checks
from dualpath_jax.registry import Registry
from schedulers.api import InterEnginePolicy, IntraEnginePolicy

# Names the simulator reads as its modes (`dualpath_jax.sim.config.MODES`: a policy with cluster flags), not as the
# policy registered under them: a policy of one's own named "oracle" was never run by `configs/sim_tiny.py:oracle` or
# `sweep --modes=oracle`, which ran DualPath with free I/O under its name, silently. (`basic` and `dualpath`, the other
# modes, are built-in policies: taken anyway.)
SIM_MODE_NAMES = ("layerwise", "dualpath_rr", "oracle")


class _PolicyRegistry(Registry):
    """The policies' registry: also refuses the simulator's mode names (`SIM_MODE_NAMES`)."""

    def _check_reserved(self, name: str) -> None:
        super()._check_reserved(name)
        if name in SIM_MODE_NAMES:
            raise ValueError(
                f"{self.kind} name {name!r} is the simulator's mode {name!r} (dualpath_jax.sim.config.MODES): a config "
                f"variant `:{name}` and `sweep --modes={name}` would run that mode, not this policy; pick another name"
            )


# How a policy of one's own gets known to the launchers: the end of their error for a name that is not registered
OWN_POLICY_HINT = (
    "a policy of one's own: register it in a module that your --config file imports; README \"A policy of one's own\""
)
# (policy names are split on "," by --config.policies, sweep --modes and config variants, which read "key=value")
POLICIES: Registry[type[InterEnginePolicy]] = _PolicyRegistry("inter-engine policy", reserved=",=", own=OWN_POLICY_HINT)
BATCHERS: Registry[type[IntraEnginePolicy]] = Registry(
    "intra-engine batching policy",
    own="a batcher of one's own: register it in a module that your --config file imports; README \"A policy of one's "
    'own"',
)


class PolicyClassError(TypeError, ValueError):
    """A registered class that cannot run as registered (no `Config` dataclass, cannot be built as cls(config), no
    schedule() / form_batch(), or one the runners cannot call): a config error of the run that names it. A ValueError
    too, so that the launchers' config checks (`sweep`'s cells) report it in one line; it was a bare TypeError, and
    `simulate` / `sweep` showed the traceback of building the simulator."""


def describe(x: Any) -> str:
    """`x` and its type, for error messages: `2.5 (float)`, `'no' (str)`."""
    return f"{x!r} ({type(x).__name__})"


def config_fields(cls: type) -> set[str] | None:
    """The field names of a registered class's `Config` dataclass; None when it has none (`build_config` says so)."""
    config_cls = getattr(cls, "Config", None)
    if not (isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls)):
        return None
    return {f.name for f in dataclasses.fields(config_cls)}


# The Config fields the launchers fill from the run where a policy's Config has them (the simulator's
# `runner._policy_kwargs`, the runtime's `driver.policy_kwargs`): α / β from the cluster when not given or given 0,
# block_size and seed when not given; and the class defaults that say "fill me" (any other default is replaced too).
RUN_FILLED_FIELDS: dict[str, tuple] = {
    "alpha_tokens": (0, None),
    "beta_tokens": (0, None),
    "block_size": (None,),
    "seed": (None,),
}


def warn_replaced_defaults(cls: type, name: str, given: Mapping[str, Any], kwargs: Mapping[str, Any]) -> str | None:
    """Log one warning naming each field of `RUN_FILLED_FIELDS` whose default in the policy's own `Config` class is
    not a sentinel but which the run fills with another value (`kwargs`: the policy's keyword arguments as the run
    builds it; `given`: those the user gave): a researcher reads `seed: int = 7` as set, and the run used its own
    seed, silently. The built-in Configs' defaults (schedulers.*: DualPath's block_size 64, random's seed 0) are
    documented as filled: not named. Returns the warning (None: nothing to say)."""
    config_cls = getattr(cls, "Config", None)
    if not (isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls)):
        return None
    replaced = []
    for f in dataclasses.fields(config_cls):
        if f.name not in RUN_FILLED_FIELDS or f.name not in kwargs or f.name in given:  # (given: not its default)
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            continue  # a required field, which the run fills
        sentinels = RUN_FILLED_FIELDS[f.name]
        sentinel = default is None or (0 in sentinels and type(default) is int and default == 0)
        if sentinel or _same(default, kwargs[f.name]) or _defined_in_schedulers(config_cls, f.name):
            continue
        replaced.append((f.name, default, kwargs[f.name]))
    if not replaced:
        return None
    parts = ", ".join(f"{k}={d!r} by the run's {v!r}" for k, d, v in replaced)
    keep = [f"policy.{k}={d!r}" for k, d, _ in replaced if k != "block_size"]
    line = f"policy {name!r}: the run replaces its Config's default{'s' * (len(replaced) > 1)} {parts}"
    if keep:
        line += f" (give {', '.join(keep)} to keep {'them' if len(keep) > 1 else 'it'})"
    if any(k == "block_size" for k, _, _ in replaced):
        line += "; block_size is always the run's KV block size"
    logging.getLogger(__name__).warning("%s", line)
    return line


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # (an object whose == raises or is not a bool: not the same)
        return False


def _defined_in_schedulers(config_cls: type, field: str) -> bool:
    """Whether `field` of `config_cls` (a dataclass) is declared by a built-in class (schedulers.*), not by a class of
    one's own: the nearest class of its MRO that annotates it."""
    for klass in config_cls.__mro__:
        if field in vars(klass).get("__annotations__", {}):
            return klass.__module__.startswith("schedulers.")
    return False


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
        raise PolicyClassError(
            f"{name!r} ({getattr(cls, '__qualname__', cls)!r}) has no `Config` dataclass: every registered policy and "
            f"batcher is a class with a nested @dataclasses.dataclass `Config` (its keyword arguments, may be empty) "
            f"built as cls(config); got Config={config_cls!r}"
        )
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise TypeError(f"{name!r} does not take {unknown}; its config fields are: {sorted(fields)}")
    if not getattr(cls, "__module__", "").startswith("schedulers."):  # (the built-in Configs check their own fields)
        check_field_types(config_cls, name, kwargs)
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


# what a value of each simple annotation must be, the framework's own checks (a bool is no count, 1.5 no int)
_SIMPLE_TYPES = {
    int: ("an int", is_int),
    float: ("a number", is_real),
    bool: ("a bool (true / false)", is_bool),
    str: ("a string", lambda x: isinstance(x, str)),
    type(None): ("None", lambda x: x is None),
}


def _field_annotations(config_cls: type) -> dict[str, Any]:
    """Each field's annotation as a type where it resolves (`from __future__ import annotations` leaves strings);
    a field whose annotation does not resolve is left out (not checked)."""
    try:
        return typing.get_type_hints(config_cls)
    except Exception:  # one name that does not resolve: each field on its own
        pass
    module = sys.modules.get(config_cls.__module__)
    namespace = dict(vars(module)) if module is not None else {}
    out = {}
    for f in dataclasses.fields(config_cls):
        try:
            out[f.name] = eval(f.type, namespace, dict(vars(config_cls))) if isinstance(f.type, str) else f.type
        except Exception:
            pass
    return out


def _accepts(tp: Any, value: Any) -> tuple[bool, str] | None:
    """(whether `value` fits annotation `tp`, what the annotation asks for), or None when it is not one of the simple
    kinds (int, float, bool, str, None, Literal and unions of them) checked here."""
    try:
        simple = _SIMPLE_TYPES.get(tp)
    except TypeError:  # an unhashable annotation object: not one of these
        simple = None
    if simple is not None:
        what, ok = simple
        return ok(value), what
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        options = typing.get_args(tp)
        ok = any(value == o and type(value) is type(o) for o in options)
        return ok, "one of " + ", ".join(repr(o) for o in options)
    if origin in (typing.Union, types.UnionType):
        parts = [_accepts(t, value) for t in typing.get_args(tp)]
        if any(p is None for p in parts):
            return None
        return any(ok for ok, _ in parts), " or ".join(what for _, what in parts)
    return None


def check_field_types(config_cls: type, name: str, kwargs: dict) -> None:
    """Refuse a config field given a value its annotation does not allow (`margin_tokens: int` given 1.5 or 'abc',
    `prefer: str` given 5, `flag: bool` given 'no'), for a policy or batcher of one's own: its Config took any value
    and the run went on with it (a float where an int belongs, silently) or failed inside schedule() at the first
    fetch. Only simple annotations are checked (int, float, bool, str, None, Literal and their unions)."""
    hints = _field_annotations(config_cls)
    for key, value in kwargs.items():
        tp = hints.get(key)
        checked = None if tp is None else _accepts(tp, value)
        if checked is not None and not checked[0]:
            hint = ""
            if not isinstance(value, str) and "a string" in checked[1]:  # (the launchers read `policy.x=5` as an int)
                hint = "; a command line's policy.FIELD=5, true or none reads as a number, bool or None"
            raise TypeError(f"{name} {key} must be {checked[1]} (its Config's annotation), got {describe(value)}{hint}")


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
        raise PolicyClassError(f"{what} cannot be built as cls(config): {e}") from e
    if not callable(getattr(obj, method, None)):
        raise PolicyClassError(f"{what} has no {_NEEDS[method]}")
    _check_call(what, getattr(obj, method), method)
    return obj


# how the simulator and the runtime call each method (keywords as they pass them)
_CALLS = {"schedule": (("snapshot", "queue"), {"fetching_node": None}), "form_batch": (("queue",), {})}


def _check_call(what: str, bound: Any, method: str) -> None:
    """`bound` takes the arguments the simulator and the runtime pass: a `schedule(self, snapshot, queue)` without
    `fetching_node` (they pass it by keyword) was built and failed at the first fetch, as "policy raised TypeError(...
    got an unexpected keyword argument 'fetching_node')" in the runtime and, in the simulator, named the runner's line
    as where it raised."""
    import inspect

    try:
        sig = inspect.signature(bound)
    except (TypeError, ValueError):  # (no signature to tell: a builtin, a C method)
        return
    args, kwargs = _CALLS[method]
    try:
        sig.bind(*args, **kwargs)
    except TypeError as e:
        call = ", ".join([*args, *(f"{k}={v}" for k, v in kwargs.items())])
        raise PolicyClassError(
            f"{what}.{method}{sig} cannot be called as {method}({call}), as the simulator and the runtime call it: {e}"
        ) from None


def _named(obj: Any, name: str) -> Any:
    """`obj` named as it was registered and asked for: the runtime's errors name a policy / batcher by its `name`,
    which was the base class's "?" for a class that set none (the registry example sets none) and "basic" for one
    copied from BasicPolicy, so a custom policy's bad assignment was blamed on policy '?' or 'basic'."""
    obj.name = name
    return obj
