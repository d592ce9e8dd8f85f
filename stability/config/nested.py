"""Settings composed of other settings (a sweep's siblings and curve settings): one flat name per setting.

A stage's settings dataclass may hold other settings dataclasses as fields (``InstabilitySettings.curve``).
TOML tables, ``--set``, keyword overrides, run keys and records name every setting flat (``instability.alphas``);
``flat_paths`` routes a flat name to the nested dataclass that owns it, ``build`` makes a composed value from flat
values and ``flat_settings`` flattens one back. A nested dataclass's fields take the place of the field that
holds it, so a field named like its holder (``InstabilitySettings.siblings``, a SiblingSettings whose count is
``siblings``) is the nested setting. Two more class attributes shape the flat names:

- ``FIXED`` (on a nested class): fields a stage fills itself (e.g. from the run's runtime section); no table names
  them, so they are not flat settings of the class that holds it;
- ``FLAT_ORDER`` (on a composed class): the flat names in the order records were written in before the settings
  were composed; names it lacks follow in field order.
"""
from __future__ import annotations

import functools
import typing
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import Any

__all__ = ["build", "flat_paths", "flat_settings", "owner"]


@functools.cache
def flat_paths(cls: type) -> dict[str, tuple[str, ...]]:
    """Every flat setting name of a settings dataclass -> the path of fields that holds it (nested settings
    expanded, in ``FLAT_ORDER`` then field order)."""
    hints = typing.get_type_hints(cls)
    paths: dict[str, tuple[str, ...]] = {}
    for f in fields(cls):
        nested = hints[f.name]
        if is_dataclass(nested):
            fixed = getattr(nested, "FIXED", ())
            inner = {name: (f.name, *path) for name, path in flat_paths(nested).items() if name not in fixed}
        else:
            inner = {f.name: (f.name,)}
        clash = sorted(set(inner) & set(paths))
        if clash:  # one flat name must mean one setting
            raise TypeError(f"{cls.__name__}: the flat setting {clash[0]!r} is held twice")
        paths.update(inner)
    order = [n for n in getattr(cls, "FLAT_ORDER", ()) if n in paths]
    return {n: paths[n] for n in [*order, *(n for n in paths if n not in order)]}


def _get(settings: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        settings = getattr(settings, part)
    return settings


def owner(cls: type, name: str) -> tuple[type, str]:
    """The dataclass that holds the flat setting ``name`` of ``cls``, and its field name there."""
    path = flat_paths(cls)[name]
    for part in path[:-1]:
        cls = typing.get_type_hints(cls)[part]
    return cls, path[-1]


def flat_settings(settings: Any) -> dict[str, Any]:
    """A (composed) settings value as flat name -> value, as tables, run keys and records name them."""
    return {name: _get(settings, path) for name, path in flat_paths(type(settings)).items()}


def build(cls: type, values: Mapping[str, Any]) -> Any:
    """``cls`` from flat values (converted already), each given to the nested dataclass that holds it."""
    paths = flat_paths(cls)
    return _build(cls, {paths[name]: value for name, value in values.items()})


def _build(cls: type, values: Mapping[tuple[str, ...], Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if (f.name,) in values:
            kwargs[f.name] = values[(f.name,)]
            continue
        inner = {path[1:]: v for path, v in values.items() if path[0] == f.name}
        if inner:
            kwargs[f.name] = _build(hints[f.name], inner)
    return cls(**kwargs)
