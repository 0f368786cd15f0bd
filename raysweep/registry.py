"""One registry type for everything added to raysweep by name: tasks, forgetting methods and
analyses. Each is one registered unit, and all three follow the same duplicate rule."""

from __future__ import annotations

from typing import Generic, Iterator, TypeVar

from raysweep.errors import BadInput

T = TypeVar("T")


class Registry(Generic[T]):
    """name -> entry, in registration order.

    A name names one entry. Adding an equal entry again is harmless (a module imported twice);
    adding a different one under a taken name raises, because silently replacing the first
    would change what every spec naming it runs."""

    def __init__(self, kind: str, *, field: str, hint: str | None = None):
        self.kind = kind  # "task", "forgetting method": what an error calls an entry
        self.field = field  # where in a spec or command the name came from, for errors
        self.hint = hint  # what an unknown name's error suggests; None lists the known names
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries and self._entries[name] != entry:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise BadInput(f"{self.field}: {self.unknown(name)}") from None

    def unknown(self, name: str) -> str:
        return f"unknown {self.kind} {name!r} ({self.hint or f'known: {sorted(self._entries)}'})"

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
