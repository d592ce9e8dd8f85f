"""Records on disk to tidy pandas DataFrames.

Point any loader at a results root (every ``<kind>_<hash>/`` run directory below
it is read), at a single run directory, or at a list of either. Each record
frame carries the run's ``run_kind`` and ``run_hash`` and the run's settings
flattened as ``section.key`` columns (``model.name``, ``optimizer.lr``,
``instability.siblings``, ...), so one :func:`filter` call selects by any
setting. Stage runs (instability, imp, hessian, siblings) store the trunk's
whole config under ``training``; it is lifted to the top level so that every
run answers to the same ``model.name``.

Record frames use ``run_kind``/``run_hash`` rather than ``kind``/``hash``
because ``levels.csv`` already has a ``kind`` column (imp | reinit | random).

A missing optional file gives an empty frame with the right columns, never an
error: a run that is still going has written only part of its records.
"""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import pandas as pd

from stability.config import STRONG_METHODS
from stability.errors import ConfigError
from stability.store import schema

Source = Union[str, "os.PathLike[str]", Sequence[Union[str, "os.PathLike[str]"]]]

RUN_COLUMNS = ["kind", "hash", "status", "path", "label"]
META_COLUMNS = ["run_kind", "run_hash"]
# The records' own columns (stability.store.schema) plus what the loaders add from the run's summary.
TRAINING_COLUMNS = list(schema.METRIC_COLUMNS)
CURVE_COLUMNS = [*schema.CURVE_COLUMNS, "label"]
SWEEP_COLUMNS = [*schema.SWEEP_COLUMNS, "first_stable_step", "split_first_stable_step", "threshold",
                 "primary_split", "bn_mode", "label"]
LEVEL_COLUMNS = [*schema.LEVEL_COLUMNS, "rewind", "first_stable_step"]
HESSIAN_COLUMNS = ["track", "step", "alpha", "rewind_step", *schema.HESSIAN_COLUMNS]
DENSITY_COLUMNS = ["track", "step", "alpha", *schema.DENSITY_COLUMNS]

# How deep below a given path run directories are looked for: results/demo/runs/<run> is three levels.
_MAX_DEPTH = 4
# Config sections of a training run; a stage run nests them under "training".
_CONFIG_SECTIONS = ("dataset", "model", "optimizer", "schedule", "training", "runtime")


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
    if isinstance(inner, Mapping) and any(isinstance(inner.get(s), Mapping) for s in _CONFIG_SECTIONS):
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


def _with_run(df: pd.DataFrame, run: Run, columns: Sequence[str]) -> pd.DataFrame:
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


def _combine(frames: list[pd.DataFrame], columns: Sequence[str]) -> pd.DataFrame:
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=META_COLUMNS + list(columns))
    return pd.concat(frames, ignore_index=True, sort=False)


def _read_csv(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return None
    return None if df.empty else df


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def training_curves(source: Source) -> pd.DataFrame:
    """metrics.csv of every run that has one (trunks): step, member, lr, {train,val,test}_{loss,error}."""
    frames = []
    for run in find_runs(source):
        df = _read_csv(run.path / schema.METRICS)
        if df is not None:
            frames.append(_with_run(df, run, TRAINING_COLUMNS))
    return _combine(frames, TRAINING_COLUMNS)


def interpolation_curves(source: Source, include_sparse: bool = True) -> pd.DataFrame:
    """curves.csv of every instability sweep: error and loss at each α per rewind step, pair and split.

    ``label`` is null for dense sweeps and names the sparse network for sweeps made by IMP;
    ``include_sparse=False`` keeps the dense ones only.
    """
    frames = []
    for run in find_runs(source, "instability"):
        if run.label is not None and not include_sparse:
            continue
        df = _read_csv(run.path / schema.CURVES)
        if df is not None:
            df["pair"] = df["pair"].astype(str)
            df["label"] = run.label
            frames.append(_with_run(df, run, CURVE_COLUMNS))
    return _combine(frames, CURVE_COLUMNS)


def sweeps(source: Source, include_sparse: bool = True) -> pd.DataFrame:
    """sweep.csv of every instability sweep with the run's first stable step, threshold and label attached.

    ``first_stable_step`` is the run's (on its primary split); ``split_first_stable_step`` is the row's split's.
    Either is NaN when no swept step is stable.
    """
    frames = []
    for run in find_runs(source, "instability"):
        if run.label is not None and not include_sparse:
            continue
        df = _read_csv(run.path / schema.SWEEP)
        if df is None:
            continue
        info = _read_json(run.path / schema.INSTABILITY_SUMMARY)
        by_split = info.get("first_stable_step_by_split") or {}
        df["first_stable_step"] = _number(info.get("first_stable_step"))
        df["split_first_stable_step"] = [_number(by_split.get(s)) for s in df["split"]]
        df["threshold"] = _number(info.get("threshold", run.settings.get("instability.threshold")))
        df["primary_split"] = info.get("primary_split")
        df["bn_mode"] = info.get("bn_mode", run.settings.get("instability.bn"))
        df["label"] = run.label
        frames.append(_with_run(df, run, SWEEP_COLUMNS))
    return _combine(frames, SWEEP_COLUMNS)


def _number(value: Any) -> float:
    return float("nan") if value is None or value == "" else float(value)


def imp_levels(source: Source) -> pd.DataFrame:
    """levels.csv of every IMP run (one row per replicate, level and kind) with its rewind settings.

    ``rewind`` is the requested target ("0", "500it" or "auto") and ``first_stable_step`` the step
    ``auto`` resolved to (NaN otherwise); ``rewind_step`` is the iteration actually rewound to.
    """
    frames = []
    for run in find_runs(source, "imp"):
        df = _read_csv(run.path / schema.LEVELS)
        if df is None:
            continue
        info = _read_json(run.path / schema.IMP_SUMMARY).get("rewind") or {}
        df["rewind"] = str(info.get("rewind", run.settings.get("imp.rewind", "")))
        df["first_stable_step"] = _number(info.get("first_stable_step"))
        frames.append(_with_run(df, run, LEVEL_COLUMNS))
    return _combine(frames, LEVEL_COLUMNS)


# --------------------------------------------------------------------------- early-bird tickets
# What every early-bird row carries from the run's earlybird.json besides its record's own columns.
EARLYBIRD_INFO = ["detected_step", "mask", "target_density", "threshold", "window", "rule",
                  "ticket_final_test_accuracy", "dense_final_test_accuracy"]
EARLYBIRD_POINT_COLUMNS = [*schema.EARLYBIRD_POINT_COLUMNS, *EARLYBIRD_INFO]
EARLYBIRD_DISTANCE_COLUMNS = [*schema.EARLYBIRD_DISTANCE_COLUMNS, *EARLYBIRD_INFO]


def _earlybird_frames(source: Source, table: str, columns: Sequence[str]) -> pd.DataFrame:
    frames = []
    for run in find_runs(source, schema.EARLYBIRD):
        df = _read_csv(run.path / table)
        if df is None:
            continue
        info = _read_json(run.path / schema.EARLYBIRD_SUMMARY)
        ticket = info.get("ticket") or {}
        df["detected_step"] = _number(info.get("detected_step"))
        for key in ("mask", "target_density", "threshold", "window", "rule"):
            df[key] = info.get(key, run.settings.get(f"earlybird.{key}"))
        df["ticket_final_test_accuracy"] = _number(ticket.get("final_test_accuracy"))
        df["dense_final_test_accuracy"] = _number(info.get("dense_final_test_accuracy"))
        frames.append(_with_run(df, run, columns))
    return _combine(frames, columns)


def earlybird_points(source: Source) -> pd.DataFrame:
    """points.csv of every early-bird run: per mask point the distance to the previous mask and the window max.

    ``detected_step`` is the run's early-bird step (NaN when detection never fired, and then
    ``ticket_final_test_accuracy`` is NaN too: no ticket was trained).
    """
    return _earlybird_frames(source, schema.EARLYBIRD_POINTS, EARLYBIRD_POINT_COLUMNS)


def earlybird_distances(source: Source) -> pd.DataFrame:
    """distances.csv of every early-bird run: the mask distance of every pair of mask points (step_a, step_b)."""
    return _earlybird_frames(source, schema.EARLYBIRD_DISTANCES, EARLYBIRD_DISTANCE_COLUMNS)


# --------------------------------------------------------------------------- NEq (training.method = neq)
NEQ_RECORD_COLUMNS = [*schema.NEQ_COLUMNS, "test_error", "variant"]


def neq_variant(settings: Mapping[str, Any]) -> str:
    """How a trunk trained, for legends: 'plain', 'NEq', 'random 30%' (random baseline), 'matched random'."""
    if settings.get("training.method", "standard") != "neq":
        return "plain" if settings.get("training.method", "standard") == "standard" else str(settings["training.method"])
    baseline = settings.get("neq.baseline", "none")
    if baseline == "random":
        return f"random {float(settings.get('neq.random_fraction', 0.0)):.0%}"
    return "matched random" if baseline == "matched" else "NEq"


def neq_records(source: Source, include_plain: bool = True) -> pd.DataFrame:
    """neq.csv of every NEq trunk: per NEq evaluation, member and layer (and ``layer = all``), the frozen neurons
    and backward MACs saved, with the test error at that step from metrics.csv and the run's ``variant``.

    metrics.csv rows at steps without an NEq evaluation (the final step) come as ``layer = all`` rows with
    NaN NEq columns. With ``include_plain``, plain trunks (``training.method = standard``) come as
    ``layer = all`` rows with nothing frozen and nothing saved (variant ``plain``), to compare against.
    """
    frames = []
    for run in find_runs(source, schema.TRAIN):
        method = run.settings.get("training.method", "standard")
        metrics = _read_csv(run.path / schema.METRICS)
        accuracy = None if metrics is None else metrics[["step", "member", "test_error"]]
        if method == "neq":
            df = _read_csv(run.path / schema.NEQ_RECORDS)
            if df is None:
                continue
            if accuracy is not None:
                on_all = df["layer"] == "all"
                merged = df[on_all].merge(accuracy, on=["step", "member"], how="left")
                rest = accuracy[~accuracy["step"].isin(df["step"])].assign(layer="all")
                df = pd.concat([df[~on_all], merged, rest], ignore_index=True, sort=False)
        elif method == "standard" and include_plain and accuracy is not None:
            df = accuracy.assign(layer="all", frozen=0, frozen_fraction=0.0, macs_saved=0, saved_fraction=0.0)
        else:
            continue
        df = df.sort_values(["step", "member"], kind="stable").reset_index(drop=True)
        df["variant"] = neq_variant(run.settings)
        frames.append(_with_run(df, run, NEQ_RECORD_COLUMNS))
    return _combine(frames, NEQ_RECORD_COLUMNS)


def _track_kind(df: pd.DataFrame) -> str:
    return "alpha" if "alpha" in df.columns and "step" not in df.columns else "step"


def _hessian_run_settings(run: Run) -> None:
    """Add hessian.json's settings to the run's when the manifest does not carry them."""
    info = _read_json(run.path / schema.HESSIAN_SUMMARY)
    settings = info.get("settings")
    if isinstance(settings, Mapping):
        for key, value in flatten_settings({"hessian": settings}).items():
            run.settings.setdefault(key, value)


def hessian_tracks(source: Source) -> pd.DataFrame:
    """hessian.csv of every Hessian run: λ_1..λ_k, λ_min, trace per probe point.

    ``track`` says what the points are: ``step`` (training iterations) or ``alpha`` (an interpolation
    path, with ``rewind_step``); the other of the two columns is NaN.
    """
    frames = []
    for run in find_runs(source, "hessian"):
        df = _read_csv(run.path / schema.HESSIAN_TABLE)
        if df is None:
            continue
        _hessian_run_settings(run)
        df.insert(0, "track", _track_kind(df))
        lambdas = sorted((c for c in df.columns if c.startswith("lambda_") and c[7:].isdigit()), key=lambda c: int(c[7:]))
        columns = HESSIAN_COLUMNS[:5] + [c for c in lambdas if c != "lambda_1"] + HESSIAN_COLUMNS[5:]
        frames.append(_with_run(df, run, columns))
    out = _combine(frames, HESSIAN_COLUMNS)
    for col in ("lambda_min", "trace", "trace_stderr"):
        out[col] = pd.to_numeric(out[col], errors="coerce")  # empty cells (not measured) -> NaN
    return out


def hessian_densities(source: Source) -> pd.DataFrame:
    """density.csv of every Hessian run: the spectral density on an eigenvalue grid ``x`` per step or α."""
    frames = []
    for run in find_runs(source, "hessian"):
        df = _read_csv(run.path / schema.DENSITY_TABLE)
        if df is None:
            continue
        _hessian_run_settings(run)
        df.insert(0, "track", _track_kind(df))
        frames.append(_with_run(df, run, DENSITY_COLUMNS))
    return _combine(frames, DENSITY_COLUMNS)


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


# --------------------------------------------------------------------------- strong lottery tickets
# One row per trunk run that trains scores over frozen weights (training.method = edgepopup | supermask).
STRONG_COLUMNS = ["method", "kept", "density", "final_test_accuracy", "final_step", "init_seed"]
_STRONG_METHODS = STRONG_METHODS


def strong_tickets(source: Source, include_dense: bool = False) -> pd.DataFrame:
    """Strong-ticket train runs: test accuracy at the final step against the fraction of weights kept.

    ``method`` is edgepopup or supermask; ``kept`` is edge-popup's setting (``strong.kept``; NaN for the
    supermask, whose density is learned); ``density`` is the evaluation mask's measured fraction of weights
    kept (read from the final checkpoint). ``include_dense=True`` adds plain training runs (``standard``,
    kept = density = 1). Runs without a final summary (still going) are left out.
    """
    frames = []
    for run in find_runs(source, "train"):
        method = str(run.settings.get("training.method", "standard"))
        if method not in _STRONG_METHODS and not (include_dense and method == "standard"):
            continue
        summary = _read_json(run.path / schema.SUMMARY)
        if "final_test_accuracy" not in summary:
            continue
        density, kept = 1.0, 1.0
        if method in _STRONG_METHODS:
            from stability.methods.strong import run_mask_density  # torch only for strong runs

            try:
                density = run_mask_density(run.path)
            except Exception as exc:  # noqa: BLE001 - a damaged checkpoint: the row says NaN, never a crash
                warnings.warn(f"{str(run.path)!r}: cannot read the final mask ({exc})", stacklevel=2)
                density = None
            density = float("nan") if density is None else density
            kept = float(run.settings.get("strong.kept", 0.5)) if method == "edgepopup" else float("nan")
        row = {"method": method, "kept": kept, "density": density,
               "final_test_accuracy": _number(summary.get("final_test_accuracy")),
               "final_step": _number(summary.get("final_step")),
               "init_seed": run.settings.get("training.init_seed", 0)}
        frames.append(_with_run(pd.DataFrame([row]), run, STRONG_COLUMNS))
    return _combine(frames, STRONG_COLUMNS)


__all__ = [
    "Run",
    "aggregate",
    "filter",
    "find_runs",
    "flatten_settings",
    "hessian_densities",
    "hessian_tracks",
    "imp_levels",
    "interpolation_curves",
    "neq_records",
    "neq_variant",
    "runs",
    "settings_of",
    "strong_tickets",
    "sweeps",
    "training_curves",
]
