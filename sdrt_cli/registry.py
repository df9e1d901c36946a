"""Named registries: collisions raise naming both plugins, unknown names suggest close matches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, Iterator, TypeVar

from sdrt_cli.errors import RegistryCollisionError, UnknownNameError, did_you_mean

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    value: T
    plugin: str


class Registry(Generic[T]):
    """Maps names to registered objects of one kind (``backbone``, ``dataset``, ...)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def add(self, name: str, value: T, plugin: str) -> None:
        if not isinstance(name, str) or not name:
            raise RegistryCollisionError(f"plugin {plugin!r} registered a {self.kind} with an empty or non-string name")
        existing = self._entries.get(name)
        if existing is not None:
            raise RegistryCollisionError(
                f"{self.kind} {name!r} is registered by two plugins: {existing.plugin!r} and {plugin!r}"
            )
        self._entries[name] = Entry(name, value, plugin)

    def get(self, name: str) -> T:
        return self.entry(name).value

    def entry(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        known = sorted(self._entries)
        hint = did_you_mean(name, known, cutoff=0.5, sentence=True)
        listing = ", ".join(known) if known else "(none registered)"
        return f"unknown {self.kind} {name!r}; known {self.kind}s: {listing}.{hint}"

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> Iterator[Entry[T]]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def __contains__(self, name: Any) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)
