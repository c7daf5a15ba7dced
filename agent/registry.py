"""Named registries of classes, for the agent's extension points.

:class:`Registry` holds classes registered with a decorator (the thermal sources). :class:`LazyRegistry` holds
``"module:Class"`` strings (the runtimes and the power sensors: one module per member) and imports a member's module
only when its name is looked up, so listing the names imports no member.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Generic, List, Mapping, Type, TypeVar

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


class LazyRegistry(Generic[T]):
    """Maps names to ``"package.module:Class"``. ``lookup`` imports the module (importlib, once: Python caches it)
    and returns the class, whose ``name`` attribute must be the name it is registered under; ``names`` imports
    nothing. An unknown name raises ``error`` (an exception class) with a message listing what is known.
    """

    def __init__(self, what: str, error: Type[Exception], members: Mapping[str, str]) -> None:
        for name, where in members.items():
            module, _, attr = where.partition(":")
            if not (module and attr):
                raise ValueError("%s %r: %r is not \"package.module:Class\"" % (what, name, where))
        self.what = what
        self.error = error
        self._members = dict(members)

    def names(self) -> List[str]:
        return sorted(self._members)

    def lookup(self, name: str) -> Type[T]:
        try:
            where = self._members[name]
        except KeyError:
            raise self.error("unknown %s %r (this agent knows: %s)"
                             % (self.what, name, ", ".join(self.names()))) from None
        module, _, attr = where.partition(":")
        cls: Type[T] = getattr(importlib.import_module(module), attr)
        if getattr(cls, "name", None) != name:
            raise TypeError("%s %r: %s has name %r" % (self.what, name, where, getattr(cls, "name", None)))
        return cls
