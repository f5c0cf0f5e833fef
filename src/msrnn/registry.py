"""One registry by name, shared by the library, the CLI and the evaluators.

Entries are factories (classes or functions), never pre-built instances, so importing msrnn builds nothing.
A lookup of an unknown name fails with the list of names that do exist.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from msrnn.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named mapping from string keys to factories with helpful lookup errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, help: str = "") -> Callable[[T], T]:
        """Decorator: register ``obj`` under ``name`` (names are unique)."""

        def deco(obj: T) -> T:
            self.add(name, obj, help)
            return obj

        return deco

    def add(self, name: str, obj: T, help: str = "") -> None:
        """Register ``obj`` under ``name`` (names are unique)."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj
        self._help[name] = help or (getattr(obj, "__doc__", "") or "").strip().split("\n")[0]

    def get(self, name: str) -> T:
        """The entry named ``name``, or a ConfigError listing the names that exist."""
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(sorted(self._entries))}"
            ) from None

    def describe(self, name: str) -> str:
        """The one-line help of ``name``."""
        return self._help.get(name, "")

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._entries)

    def values(self) -> list[T]:
        """The entries in registration order."""
        return list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
