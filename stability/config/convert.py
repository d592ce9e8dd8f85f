"""Values from TOML, keywords and ``--set`` strings converted to the declared types of settings dataclasses.

The one converter for the run's sections and the stages' tables alike (``coerce_field``); errors name the
setting (``section.key``) and what it expects.
"""
from __future__ import annotations

import functools
import tomllib
import typing
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError

__all__ = ["coerce_field"]


def _parse_cli_value(text: str) -> Any:
    """A ``--set`` value: a TOML literal if it parses as one, else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


# Settings whose values are steps ("500it", "2ep"): a bare number is taken as written.
_STEP_KEYS = ("steps", "warmup", "eval_every", "checkpoint_every", "rewind", "every")


def coerce_field(cls: type, section: str, key: str, value: Any) -> Any:
    """Convert ``value`` (from TOML, a keyword or a CLI string) to the declared type of ``cls.key``.

    The one converter for run sections and stage tables alike: booleans, integers, numbers,
    strings, and tuples of those (``tuple[tuple[str, float], ...]`` also from a table
    ``{name = number}``). A CLI string is read as a TOML literal first. Errors name the setting.
    """
    name = f"{section}.{key}"
    hint = _field_types(cls)[key]
    if isinstance(value, str) and hint is not str:
        value = _parse_cli_value(value)
    return _convert(name, hint, value, key)


def _convert(name: str, hint: Any, value: Any, key: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if hint is str:
        if key in _STEP_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        if typing.get_origin(item) is tuple:  # pairs, e.g. per-layer rates: a table or a list of pairs
            return _pairs(name, typing.get_args(item), value)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        if item is str:
            return tuple(str(v) for v in value)
        if item is int:  # "512,512" from the CLI: each element read as a literal
            value = [_parse_cli_value(v) if isinstance(v, str) else v for v in value]
        if item is int and not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
            raise ConfigError(f"{name}: expected a list of positive integers, got {list(value)!r}")
        if item is float:
            try:
                return tuple(_convert(name, float, _parse_cli_value(v) if isinstance(v, str) else v, key)
                             for v in value)
            except ConfigError:
                raise ConfigError(f"{name}: expected a list of numbers, got {list(value)!r}") from None
        return tuple(value)
    raise ConfigError(f"{name}: cannot set a value of type {hint!r}")


def _pairs(name: str, types: tuple[Any, ...], value: Any) -> tuple[tuple[Any, ...], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    try:
        pairs = [(k, v) for k, v in items]
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a table of name = value, e.g. {{ output = 0.1 }}, got {value!r}") from None
    out = []
    for k, v in pairs:
        if types[1] is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ConfigError(f"{name}: value for {str(k)!r} must be a number, got {v!r}")
        out.append((str(k), float(v) if types[1] is float else v))
    return tuple(sorted(out))


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)
