"""Registries: the only way a config names code.

A config block ``{key: dcn, kwargs: {...}}`` is resolved by looking ``key`` up in the registry of
that slot. Nothing in a config is imported or evaluated: extensions call :meth:`Registry.register`
from their own module, and a plugin module is imported only when the user lists it explicitly
(``plugins: [my_pkg.my_method]`` in the config).

Example:
    >>> INTERACTIONS = Registry("interaction")
    >>> @INTERACTIONS.register("dot")
    ... class Dot: ...
    >>> INTERACTIONS.get("dot") is Dot
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from appdistill.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object table for one kind of extension (methods, teachers, interactions...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Any:
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted."""

        def deco(o: T) -> T:
            if name in self._items and self._items[name] is not o:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._items[name] = o
            return o

        return deco if obj is None else deco(obj)

    def get(self, name: str, context: str = "") -> T:
        if name not in self._items:
            known = ", ".join(sorted(self._items)) or "(none)"
            ctx = f" in {context}" if context else ""
            raise ConfigError(f"unknown {self.kind} '{name}'{ctx}; known: {known}")
        return self._items[name]

    def build(self, name: str, kwargs: dict[str, Any] | None = None, /, context: str = "",
              **extra: Any) -> Any:
        """Look up ``name`` and call it with ``kwargs`` (+ ``extra`` supplied by the framework)."""
        factory: Callable[..., Any] = self.get(name, context)  # type: ignore[assignment]
        try:
            return factory(**extra, **(kwargs or {}))
        except TypeError as e:
            raise ConfigError(f"bad kwargs for {self.kind} '{name}'{' in ' + context if context else ''}: {e}") from e

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
