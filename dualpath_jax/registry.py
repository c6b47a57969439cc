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


class Registry(Generic[T]):
    """A name -> object map that refuses duplicates and explains unknown names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register `obj` under `name`; a second registration of the same name is an error."""
        if not isinstance(name, str) or not name:
            # `@REG.register` without a name bound the class to this decorator and registered nothing, silently
            hint = ' (use @register("name"), not a bare @register)' if callable(name) else ""
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}{hint}")

        def decorator(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._entries:
            raise ValueError(
                f"{self.kind} {name!r} is already registered (by {self._entries[name]!r}); names must be unique"
            )
        self._entries[name] = obj

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name (a list, a dict)
            known = ", ".join(sorted(self._entries)) or "(none registered)"
            close = difflib.get_close_matches(name, self._entries, n=1) if isinstance(name, str) else []
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise KeyError(f"unknown {self.kind} {name!r}{hint}; known: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)
