"""A small named registry of classes, for the agent's extension points (runtimes, power sensors, ...)."""
from __future__ import annotations

from typing import Callable, Dict, Generic, List, Type, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to classes. ``register(name)`` is a class decorator that also sets ``cls.name``.

    ``lookup`` raises ``error`` (an exception class) with a message listing what is known.
    """

    def __init__(self, what: str, error: Type[Exception]) -> None:
        self.what = what
        self.error = error
        self._items: Dict[str, Type[T]] = {}

    def register(self, name: str) -> Callable[[Type[T]], Type[T]]:
        def deco(cls: Type[T]) -> Type[T]:
            if name in self._items:
                raise ValueError("%s %r is already registered" % (self.what, name))
            cls.name = name  # type: ignore[attr-defined]
            self._items[name] = cls
            return cls
        return deco

    def names(self) -> List[str]:
        return sorted(self._items)

    def lookup(self, name: str) -> Type[T]:
        try:
            return self._items[name]
        except KeyError:
            raise self.error("unknown %s %r (this agent knows: %s)"
                             % (self.what, name, ", ".join(self.names()))) from None
