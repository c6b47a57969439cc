"""One small registry helper used by every kind of pluggable part.

Policies, model families, transports and stores are each registered by name:

    POLICIES = Registry("inter-engine policy")

    @POLICIES.register("dualpath")
    class DualPathPolicy: ...

    POLICIES.get("dualpath")      # -> DualPathPolicy
    POLICIES.get("dualpth")       # KeyError naming the known policies (and "did you mean 'dualpath'?")

This module imports nothing heavy (no jax), so `schedulers/` and `transport/` may use it while keeping the
layering of DESIGN.md (policies never import jax).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
S = TypeVar("S")  # (a registered subclass keeps its own type through the decorator)

# Where a class defined by a script lives: `__main__`, or `__mp_main__` in a process multiprocessing spawned from it.
MAIN_MODULES = ("__main__", "__mp_main__")


def _definition(obj: object) -> tuple[str, str] | None:
    """(module, qualified name) of a class or function, None for other objects."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    return (module, qualname) if isinstance(module, str) and isinstance(qualname, str) else None


class Registry(Generic[T]):
    """A name -> object map that refuses duplicates and explains unknown names."""

    def __init__(self, kind: str, reserved: str = "", own: str = ""):
        """`reserved`: characters a name may not hold, where the launchers parse names out of lists (leading and
        trailing whitespace is then refused too). `own`: how one of one's own gets registered, ending the error for an
        unknown name (one's own policy named before the module registering it was imported had no word of it)."""
        self.kind = kind
        self.reserved = reserved
        self.own = own
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[S], S]:
        """Decorator: register `obj` under `name`; a second registration of the same name is an error."""
        if not isinstance(name, str) or not name:
            # `@REG.register` without a name bound the class to this decorator and registered nothing, silently
            hint = ' (use @register("name"), not a bare @register)' if callable(name) else ""
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}{hint}")
        self._check_reserved(name)

        def decorator(obj: S) -> S:
            self.add(name, obj)  # type: ignore[arg-type]  # (an S is a T: its subclass or itself)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        self._check_reserved(name)
        if name in self._entries:
            old = self._entries[name]
            defined = _definition(old)
            if old is not obj and defined is not None and defined == _definition(obj):
                # A module executed again (a config file that defines its policy, which experiments.sweep loads once
                # per cell; importlib.reload; a notebook cell run again) was told "registered (by <its own class>)".
                # Still refused: another file's class of the same module and class name would be swapped in silently.
                raise ValueError(
                    f"{self.kind} {name!r} is already registered by the same definition ({'.'.join(defined)}): "
                    "the module that registers it ran again (a config file loaded once per run or sweep cell, a "
                    "reload, a notebook cell run twice); register it in a module of its own that the config file or "
                    "script imports (Python imports a module once)"
                )
            raise ValueError(f"{self.kind} {name!r} is already registered (by {old!r}); names must be unique")
        self._entries[name] = obj

    def _check_reserved(self, name: str) -> None:
        if self.reserved and (name != name.strip() or any(c in name for c in self.reserved)):
            raise ValueError(
                f"{self.kind} name {name!r} cannot be given to the launchers: it holds one of "
                f"{' '.join(repr(c) for c in self.reserved)} or spaces at an end (the launchers split lists of names on "
                "',', read 'key=value' items and strip each name)"
            )

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name (a list, a dict)
            known = ", ".join(sorted(self._entries)) or "(none registered)"
            close = difflib.get_close_matches(name, self._entries, n=1) if isinstance(name, str) else []
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            own = f" ({self.own})" if self.own else ""
            raise KeyError(f"unknown {self.kind} {name!r}{hint}; known: {known}{own}") from None

    def importable_module(self, name: str) -> str | None:
        """The module that defines `name`'s object, for another process to import before it looks `name` up there; None
        for one of a script's `__main__` (`MAIN_MODULES`), which cannot be imported by name. KeyError as `get`."""
        module = getattr(self.get(name), "__module__", None)
        return module if isinstance(module, str) and module not in MAIN_MODULES else None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)
