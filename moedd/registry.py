"""A small name -> factory registry, one per kind of component (nets, experts, sources...).

Modelled on timm's ``register_model``/``create_model`` but stricter: registering a name twice
raises, and an unknown name raises with the list of valid choices, so a typo in params.yaml or
on the command line fails with one clear line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from fnmatch import fnmatch
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """Raised when a registry is asked for a name it does not hold.

    A ValueError too, so pydantic validators that look names up report it as a validation error.
    """

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps names to objects (classes or factory functions) of one kind.

    Args:
        kind: what the registry holds, used in error messages ("network", "expert").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator that registers an object under ``name`` (default: its ``__name__``)."""

        def deco(obj: T) -> T:
            key = name or getattr(obj, "__name__")
            if key in self._items:
                raise ValueError(f"{self.kind} '{key}' is already registered")
            self._items[key] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """Return the object registered as ``name``.

        Raises:
            UnknownNameError: with the valid names, when ``name`` is not registered.
        """
        try:
            return self._items[name]
        except KeyError:
            choices = ", ".join(sorted(self._items))
            raise UnknownNameError(f"unknown {self.kind} '{name}'; choose from: {choices}") from None

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted registered names matching an fnmatch ``pattern``."""
        return sorted(n for n in self._items if fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
