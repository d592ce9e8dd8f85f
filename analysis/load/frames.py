"""Run discovery and the frame helpers every record family shares: settings, selection and aggregation."""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import pandas as pd

from stability.errors import ConfigError
from stability.store import schema

Source = Union[str, "os.PathLike[str]", Sequence[Union[str, "os.PathLike[str]"]]]

RUN_COLUMNS = ["kind", "hash", "status", "path", "label"]
META_COLUMNS = ["run_kind", "run_hash"]

# How deep below a given path run directories are looked for: results/demo/runs/<run> is three levels.
_MAX_DEPTH = 4


@dataclass
class Run:
    """One run directory and its manifest."""

    path: Path
    kind: str
    hash: str
    status: str
    manifest: dict[str, Any] = field(repr=False)
    settings: dict[str, Any] = field(repr=False)

    @property
    def label(self) -> str | None:
        return self.manifest.get("label")


# --------------------------------------------------------------------------- discovery
def _paths(source: Source) -> list[Path]:
    if isinstance(source, (str, os.PathLike)):
        items: Iterable[Any] = [source]
    else:
        items = source
    paths = [Path(p) for p in items]
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"results path {str(p)!r} does not exist")
    return paths


def _walk(path: Path, depth: int) -> Iterator[Path]:
    if (path / schema.MANIFEST).is_file():
        yield path
        return  # never descend into a run: IMP keeps per-level sub-runs inside its own directory
    if depth >= _MAX_DEPTH or not path.is_dir():
        return
    for child in sorted(path.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            yield from _walk(child, depth + 1)


def flatten_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """A run's nested config as ``{"section.key": value}``; lists become tuples so they can be grouped."""
    config = dict(config)
    inner = config.get("training")
    if isinstance(inner, Mapping) and any(isinstance(inner.get(s), Mapping) for s in schema.CONFIG_SECTIONS):
        # A stage run: {"training": <trunk config>, "instability": {...}} -> model.*, optimizer.*, instability.*
        del config["training"]
        config = {**inner, **config}
    out: dict[str, Any] = {}
    _flatten_into(out, "", config)
    return out


def _flatten_into(out: dict[str, Any], prefix: str, value: Any) -> None:
    if isinstance(value, Mapping):
        for key, sub in value.items():
            _flatten_into(out, f"{prefix}.{key}" if prefix else str(key), sub)
    else:
        out[prefix] = _hashable(value)


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, Mapping):
        return tuple((k, _hashable(v)) for k, v in value.items())
    return value


def find_runs(source: Source, kind: str | None = None) -> list[Run]:
    """Every run directory at or below ``source`` (a root, a run directory, or a list), optionally of one kind."""
    runs: list[Run] = []
    seen: set[Path] = set()
    for base in _paths(source):
        for path in _walk(base, 0):
            resolved = path.resolve()
            if resolved in seen:
                continue
            seen.add(resolved)
            try:
                manifest = json.loads((path / schema.MANIFEST).read_text())
            except (OSError, ValueError) as exc:
                warnings.warn(f"skipping {str(path)!r}: unreadable manifest ({exc})", stacklevel=2)
                continue
            name_kind, _, name_hash = path.name.rpartition("_")
            run_kind = str(manifest.get("kind") or name_kind)
            if kind is not None and run_kind != kind:
                continue
            settings = flatten_settings(manifest.get("config") or {})
            runs.append(Run(path, run_kind, str(manifest.get("hash") or name_hash),
                            str(manifest.get("status", "unknown")), manifest, settings))
    return runs


# --------------------------------------------------------------------------- frames
def runs(source: Source) -> pd.DataFrame:
    """One row per run: kind, hash, status, path, label and every setting as a ``section.key`` column."""
    rows = [{"kind": r.kind, "hash": r.hash, "status": r.status, "path": str(r.path), "label": r.label,
             **r.settings} for r in find_runs(source)]
    if not rows:
        return pd.DataFrame(columns=RUN_COLUMNS)
    df = pd.DataFrame(rows)
    return df[RUN_COLUMNS + sorted(c for c in df.columns if c not in RUN_COLUMNS)]


def with_run(df: pd.DataFrame, run: Run, columns: Sequence[str]) -> pd.DataFrame:
    """Prefix run_kind/run_hash, put the record's known columns next, then the run's settings."""
    for col in columns:
        if col not in df.columns:
            df[col] = float("nan")
    extra = [c for c in df.columns if c not in columns and c not in META_COLUMNS]
    df = df[list(columns) + extra].copy()
    df.insert(0, "run_kind", run.kind)
    df.insert(1, "run_hash", run.hash)
    # Built as its own frame: assigning a tuple-valued setting to a column would spread it over rows.
    settings = pd.DataFrame([run.settings] * len(df), index=df.index)
    settings = settings[[c for c in sorted(settings.columns) if c not in df.columns]]
    return pd.concat([df, settings], axis=1)


def combine(frames: list[pd.DataFrame], columns: Sequence[str]) -> pd.DataFrame:
    """One frame of every run's records; an empty one with the meta and record ``columns`` when there are none."""
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=META_COLUMNS + list(columns))
    return pd.concat(frames, ignore_index=True, sort=False)


def read_table(path: Path) -> pd.DataFrame | None:
    """A record table (csv), or None when it is missing or has no rows yet."""
    if not path.is_file():
        return None
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return None
    return None if df.empty else df


def read_json(path: Path) -> dict[str, Any]:
    """A JSON record as a dict; {} when it is missing or unreadable (a run still going)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}

def number(value: Any) -> float:
    """A record's number, NaN for a missing one (None or an empty cell)."""
    return float("nan") if value is None or value == "" else float(value)


def hashed_keys(found: Iterable[Run]) -> set[str]:
    """The ``section.key`` settings that name any of ``found``: the keys of their manifests' ``hashed_settings``.

    A setting left at its default is not in a manifest's hashed settings; a setting that never changes a run's
    name (``runtime.*``, ``dataset.data_root``, ...) is in none.
    """
    out: set[str] = set()
    for run in found:
        hashed = run.manifest.get("hashed_settings")
        if isinstance(hashed, Mapping):
            flat: dict[str, Any] = {}
            _flatten_into(flat, "", hashed)
            out.update(k for k in flat if "." in k)
    return out


# --------------------------------------------------------------------------- selection and aggregation
def filter(df: pd.DataFrame, **settings: Any) -> pd.DataFrame:
    """Rows whose columns match every given value: ``filter(df, **{"model.name": "lenet_300_100"}, split="test")``.

    A value may be a scalar (equality), a list or set of allowed values, or a callable taking the column
    and returning a boolean mask. For a column that holds tuples (a list setting such as
    ``training.rewind_points``) a list value is compared as a whole.
    """
    mask = pd.Series(True, index=df.index)
    for key, wanted in settings.items():
        if key not in df.columns:
            known = ", ".join(c for c in df.columns if "." in c) or "(none)"
            raise ConfigError(f"filter: no column {key!r}; settings columns are {known}")
        column = df[key]
        if callable(wanted):
            mask &= pd.Series(wanted(column), index=df.index).astype(bool)
        elif isinstance(wanted, (list, tuple, set, frozenset)):
            if column.map(lambda v: isinstance(v, tuple)).any():
                whole = _hashable(list(wanted))
                mask &= column.map(lambda v, w=whole: v == w)
            else:
                mask &= column.isin(list(wanted))
        elif wanted is None:
            mask &= column.isna()
        else:
            mask &= column == wanted
    return df[mask]


def aggregate(df: pd.DataFrame, by: str | Sequence[str], value: str | Sequence[str]) -> pd.DataFrame:
    """Mean, std (ddof 1; NaN for one value) and count of ``value`` per group of ``by``, e.g. over pairs.

    One value gives columns ``mean``, ``std``, ``count``; several give ``<value>_mean`` and so on.
    """
    keys = [by] if isinstance(by, str) else list(by)
    values = [value] if isinstance(value, str) else list(value)
    for col in keys + values:
        if col not in df.columns:
            raise ConfigError(f"aggregate: no column {col!r}; columns are {', '.join(map(str, df.columns))}")
    numeric = df[keys + values].copy()
    for col in values:
        numeric[col] = pd.to_numeric(numeric[col], errors="coerce")
    grouped = numeric.groupby(keys, dropna=False, sort=True)[values].agg(["mean", "std", "count"])
    if len(values) == 1:
        grouped.columns = ["mean", "std", "count"]
    else:
        grouped.columns = [f"{v}_{stat}" for v, stat in grouped.columns]
    return grouped.reset_index()


def settings_of(df: pd.DataFrame) -> dict[str, Any]:
    """The ``section.key`` settings that take a single value over all rows of ``df``."""
    out: dict[str, Any] = {}
    for col in df.columns:
        if "." not in str(col):
            continue
        values = list(dict.fromkeys(v for v in df[col] if isinstance(v, tuple) or not pd.isna(v)))
        if len(values) == 1:
            out[col] = values[0]
    return out



__all__ = [
    "META_COLUMNS",
    "RUN_COLUMNS",
    "Run",
    "Source",
    "aggregate",
    "combine",
    "filter",
    "find_runs",
    "flatten_settings",
    "hashed_keys",
    "number",
    "read_json",
    "read_table",
    "runs",
    "settings_of",
    "with_run",
]
