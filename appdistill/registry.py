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

import inspect
import typing
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


#: parameters the framework supplies (never written in a config)
FRAMEWORK_ARGS = frozenset({"self", "committee", "student_dim", "item_frequency", "held_out", "spec", "name"})


def kwargs_model(factory: Callable[..., Any]) -> Any:
    """A pydantic model of ``factory``'s config kwargs: its signature's names, annotated types and
    defaults, plus ranges the factory declares in ``kwarg_ranges`` (``{"alpha": {"ge": 0, "le": 1}}``).
    Unknown names are errors (``extra="forbid"``)."""
    from pydantic import ConfigDict, Field, create_model

    cached = getattr(factory, "__dict__", {}).get("_kwargs_model")
    if cached is not None:
        return cached
    fn = factory.__init__ if inspect.isclass(factory) else factory
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable annotations: names and ranges still checked
        hints = {}
    ranges: dict[str, dict[str, Any]] = {}
    for klass in reversed(getattr(factory, "__mro__", (factory,))):
        ranges.update(getattr(klass, "kwarg_ranges", {}) or {})
    fields: dict[str, Any] = {}
    for p in inspect.signature(fn).parameters.values():
        if p.name in FRAMEWORK_ARGS or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = ... if p.default is p.empty else p.default
        fields[p.name] = (hints.get(p.name, Any), Field(default, **ranges.get(p.name, {})))
    model = create_model(f"{getattr(factory, '__name__', 'factory')}Kwargs",
                         __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True), **fields)
    if inspect.isclass(factory):
        factory._kwargs_model = model  # type: ignore[attr-defined]
    return model


def kwargs_errors(factory: Callable[..., Any], kwargs: dict[str, Any], where: str) -> list[str]:
    """``["where.name: message", ...]`` for ``kwargs`` that ``factory``'s typed model refuses."""
    from pydantic import ValidationError

    model = kwargs_model(factory)
    try:
        valid = model.model_validate(kwargs or {})
    except ValidationError as e:
        out = []
        for err in e.errors():
            path = [str(x) for x in err["loc"]]
            # a union's member tags (``bool``, ``CommitteePath``) are pydantic's, not the user's keys;
            # a map given where a model or a bool is accepted was meant for the model
            if len(path) > 1 and path[1] in _SCALARS and isinstance((kwargs or {}).get(path[0]), dict):
                continue
            path = [x for x in path if x not in _SCALARS and not x[:1].isupper()]
            loc = ".".join(path)
            moved = (getattr(factory, "moved_kwargs", None) or {}).get(loc)
            if err["type"] == "extra_forbidden" and moved:
                out.append(f"{where}.{loc}: {moved}")
            elif err["type"] == "extra_forbidden":
                out.append(f"{where}.{loc}: unknown key (accepted: {', '.join(_accepted(model, path[:-1]))})")
            else:
                out.append(f"{where}.{loc}: {err['msg']}")
        return out
    # constraints between kwargs (one kwarg's value needs another's), declared by the factory
    check = getattr(factory, "check_kwargs", None)
    return [f"{where}.{m}" for m in check(valid.model_dump())] if check else []


_SCALARS = frozenset({"bool", "int", "float", "str", "none"})


def _accepted(model: Any, path: list[str]) -> list[str]:
    """The field names of the (nested) model at ``path`` of ``model``."""
    from pydantic import BaseModel

    for name in path:
        ann = model.model_fields[name].annotation
        members = typing.get_args(ann) or (ann,)
        nested = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return sorted(model.model_fields)
