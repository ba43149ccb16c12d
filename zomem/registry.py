"""One registry type for models, workloads, optimizers and hardware.

Entries are registered directly, by decorator, or lazily by a ``"module:object"`` string or an
entry point, so that importing zomem does not import every plug-in.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from zomem.errors import UnknownNameError, UsageError

T = TypeVar("T")


def load_object(spec: str) -> object:
    """Import ``"package.module:attr"`` and return the attribute."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"{spec!r} is not a 'module:object' spec")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r} from {spec!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UsageError(f"module {module_name!r} has no attribute {attr!r}") from None


class Registry(Generic[T]):
    """Names to objects of one kind; unknown names raise :class:`UnknownNameError` with suggestions."""

    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T | str] = {}
        self._entry_point_group = entry_point_group
        self._entry_points_loaded = entry_point_group is None

    def register(self, name: str, obj: T | str | None = None) -> Callable[[T], T] | None:
        """Register ``obj`` (or a lazy ``"module:object"`` string) as ``name``; without ``obj``, a decorator."""
        if obj is None:

            def decorator(value: T) -> T:
                self._entries[name] = value
                return value

            return decorator
        self._entries[name] = obj
        return None

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=self._entry_point_group):
            self._entries.setdefault(ep.name, ep.value)

    def names(self) -> list[str]:
        """Every registered name, in registration order."""
        self._load_entry_points()
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load_entry_points()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> T:
        """The object registered as ``name``, importing it if it was registered lazily."""
        self._load_entry_points()
        if name not in self._entries:
            raise self.unknown(name)
        obj = self._entries[name]
        if isinstance(obj, str):
            obj = load_object(obj)
            self._entries[name] = obj
        return obj  # type: ignore[return-value]

    def unknown(self, name: str) -> UnknownNameError:
        """The error for a name this registry does not know."""
        names = self.names()
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        return UnknownNameError(f"unknown {self.kind} {name!r}.{hint} Valid: {', '.join(names)}")
