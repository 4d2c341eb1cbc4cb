"""A registry: names to objects, with one behaviour.

Registering a name twice raises. Looking up an unknown name raises an error that lists
every known name and the closest match. The registry is the only list of names.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownName(KeyError):
    """A name that is not in a registry; ``str()`` says what would be valid."""

    def __init__(self, what: str, name: str, known: list[str]):
        self.what, self.name, self.known = what, name, known
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        super().__init__(f"unknown {what}: {name!r}; known: {', '.join(known)}.{hint}")

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return self.args[0]


def _same_definition(old: object, new: object) -> bool:
    """The same definition executed again (a pipeline file loaded twice), not a clash. An
    entry that wraps a function (a declared variant's ``fn``) is that function's definition."""
    def key(o: object) -> tuple:
        o = getattr(o, "fn", o)
        return getattr(o, "__module__", None), getattr(o, "__qualname__", None)

    return key(old) == key(new) and None not in key(old)  # instances have a module but no qualname


class Registry(Generic[T]):
    def __init__(self, what: str):
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            old = self._items.get(name)
            if old is not None and not _same_definition(old, obj):
                raise ValueError(f"{self.what} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return add

    def __getitem__(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownName(self.what, name, sorted(self._items)) from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)
