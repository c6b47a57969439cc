"""Type predicates of config values (kwargs come from config files, command-line variants and code: a float block
size, a bool token count or a truthy string for a flag must be refused, not used). Used by the workloads, the
runtime, the traffic manager and the scheduler registry (`schedulers.registry` re-exports them). Also
`file_in_the_way`, for the errors of a directory that cannot be made, `fd_shortage_text`, for those of a process out
of file descriptors, `FailureSpell`, how an accept loop backs off and tells a spell of failing accepts once, and
`keyword_fit`, how a config's fields fit a pluggable class's constructor (transport backends, KV stores)."""

from __future__ import annotations

import errno
import inspect
import numbers
import os
import resource
import time
from collections.abc import Iterable
from typing import Any

import numpy as np


def is_int(x: Any) -> bool:
    """An integer: Python or numpy ints; not a bool (True is no token count), not a float (not even 64.0)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_real(x: Any) -> bool:
    """A real number (int or float, numpy scalars too); not a bool, not a string."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def is_bool(x: Any) -> bool:
    """True or False (numpy bools too); not 0/1, not a string such as 'no' (which is truthy)."""
    return isinstance(x, (bool, np.bool_))


def file_in_the_way(directory: str) -> str | None:
    """Why `directory` cannot be a directory when a file is where it, or a directory above it, goes (the OS says only
    "File exists" / "Not a directory"): "it is a file, not a directory" or "'<path>' is a file, not a directory";
    None when no file is in the way."""
    above = directory
    while above and not os.path.exists(above) and os.path.dirname(above) != above:
        above = os.path.dirname(above)
    if os.path.exists(above) and not os.path.isdir(above):
        return "it is a file, not a directory" if above == directory else f"{above!r} is a file, not a directory"
    return None


def variant_value(text: str):
    """A config variant item's value (`configs/sim_base.py`; `experiments.run`'s `policy.NAME=value`) as int, float,
    bool or None (`None` / `null`) when it reads as one, else the string itself."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):  # `batcher.max_requests=None`: no cap (it was the string 'None', refused)
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def keyword_fit(cls: Any, names: Iterable[str]) -> tuple[list[str], list[str], list[str]] | None:
    """How keyword arguments `names` fit `cls`'s constructor: (those it does not take, its required ones they lack,
    every name it takes), or None when it has no signature to tell. `transport.make_transport` checks a config with it,
    `store.store_options_fit` a store's options, the runtime's config check what its launchers pass."""
    try:
        params = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):
        return None
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    takes = [p.name for p in params if p.kind in named]
    names = list(names)
    anything = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    unknown = [] if anything else [k for k in names if k not in takes]
    missing = [p.name for p in params if p.kind in named and p.default is p.empty and p.name not in names]
    return unknown, missing, takes


def fd_shortage_text(e: BaseException, who: str, hint: str = "") -> str | None:
    """Where `e` is a process out of file descriptors (EMFILE: `who`, e.g. "the driver"; ENFILE: the system): that
    in words, naming the limit and what to do (`hint` after `ulimit -n`); else None."""
    if isinstance(e, OSError) and e.errno == errno.EMFILE:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return (
            f"{who} is out of file descriptors (RLIMIT_NOFILE {soft}, hard limit {hard}: raise it, `ulimit -n`{hint}) "
            f"({e})"
        )
    if isinstance(e, OSError) and e.errno == errno.ENFILE:
        return f"the system is out of file descriptors (fs.file-max) ({e})"
    return None


class FailureSpell:
    """The failures of a call a loop repeats (a listener's `accept`: out of descriptors, say) told once a spell, not
    once a failure, with a back-off between tries: the tcp transport's and the driver's control server's accept loops.

    Each failure: `failed(cause)` (True: a spell of a new cause starts, the caller logs it), then wait `pause()`.
    Each success: `ended()`, the spell it ends where one did (more than one failure). The back-off starts at 10 ms
    and doubles to `most_s`; a new cause keeps it, a success resets it."""

    FIRST_PAUSE_S = 0.01

    def __init__(self, most_s: float):
        self.most_s = most_s
        self._reset()

    def _reset(self) -> None:
        self.backoff_s, self.cause, self.failures, self.since = self.FIRST_PAUSE_S, None, 0, 0.0

    def failed(self, cause: Any) -> bool:
        """Count one failure of `cause` (compared with `==`); True where the last failure's cause was another one."""
        self.failures += 1
        if cause == self.cause:
            return False
        self.cause, self.since = cause, time.monotonic()
        return True

    def pause(self) -> float:
        """Seconds to wait before the next try: this one's back-off; the next one's doubles, up to `most_s`."""
        pause, self.backoff_s = self.backoff_s, min(self.most_s, self.backoff_s * 2)
        return pause

    def ended(self) -> tuple[int, float] | None:
        """After a success: (failures, seconds since its cause began) of the spell it ends, or None where there was
        none (no failure, or one: an aborted connection, not a spell); back-off and count start again."""
        spell = (self.failures, time.monotonic() - self.since) if self.failures > 1 else None
        self._reset()
        return spell
