"""Plugins: modules of the user's that register models and datasets.

A plugin is any importable module that calls ``stability.register_model`` and/or
``stability.register_dataset`` when imported. Name it with ``--plugin my_package.models``
(repeatable) or ``runtime.plugins = ["my_package.models"]``; the names travel with the run's
settings, so grid workers on other machines import them too. Installed packages can also
declare an entry point in the group ``stability.plugins``; those are loaded by every command.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterable
from importlib.metadata import entry_points

from .errors import ConfigError

ENTRY_POINT_GROUP = "stability.plugins"
_loaded: set[str] = set()


def load_plugins(names: Iterable[str] = (), *, entry_point_group: bool = True) -> None:
    """Import each plugin module once per process (and the installed ``stability.plugins`` entry points)."""
    if entry_point_group and ENTRY_POINT_GROUP not in _loaded:
        _loaded.add(ENTRY_POINT_GROUP)
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            _import(ep.value.split(":")[0], f"entry point {ep.name!r} ({ep.value})")
    for name in names:
        if name not in _loaded:
            _import(name, f"--plugin {name!r}")
            _loaded.add(name)


def _import(module: str, what: str) -> None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # the user's code: named, with its error, never a bare traceback
        raise ConfigError(f"{what}: import failed: {type(exc).__name__}: {exc}") from exc
