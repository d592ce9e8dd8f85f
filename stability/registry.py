"""Named tables of models and datasets that check their own names when looked up.

``MODELS["lenet5"]`` returns its entry (a ``ModelSpec``) or raises ConfigError naming the setting
(``model.name``) and every registered name, so a name is checked in one place: where
it is used. New entries are added with ``register``.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """A read-mostly mapping ``name -> entry`` whose lookups of unknown names are clear errors."""

    def __init__(self, what: str, setting: str, entries: Mapping[str, T] | None = None):
        self.what = what  # e.g. "model"
        self.setting = setting  # e.g. "model.name"
        self._entries: dict[str, T] = dict(entries or {})

    def register(self, name: str, entry: T, *, replace: bool = False) -> None:
        """Add ``name``; an existing name is refused unless ``replace``."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{self.setting}: a {self.what} name must be a non-empty string, got {name!r}")
        if name in self._entries and not replace:
            raise ConfigError(f"{self.setting}: a {self.what} named {name!r} is already registered")
        self._entries[name] = entry

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ConfigError(f"{self.setting}: unknown {self.what} {name!r}; choose one of "
                              f"{', '.join(self._entries)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.what}: {', '.join(self._entries)})"
