"""A finished run's records as a tracker sees them: settings, tags, scalar series, tables and figures.

One reader for every sink and for ``stability export``: what a tracker shows is read from the files the run
wrote (``store.schema``), never from the live objects, so a live run and an export of it log the same values.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..store.schema import (
    CURVES,
    HESSIAN_COLUMNS,
    HESSIAN_TABLE,
    IMP,
    INSTABILITY,
    LEVEL_COLUMNS,
    LEVELS,
    MANIFEST,
    METRICS,
    SIBLINGS,
    SWEEP,
    SWEEP_COLUMNS,
)

__all__ = ["Report", "Row", "read_report"]

# The numeric columns of a table that become series (the rest are keys, labels or statuses).
_METRIC_SERIES = ("lr", "train_loss", "train_error", "val_loss", "val_error", "test_loss", "test_error")
_SWEEP_SERIES = {"instability_mean": "instability", "instability_std": "instability_std",
                 "loss_barrier_mean": "loss_barrier", "loss_barrier_std": "loss_barrier_std", "pairs": "pairs"}
_LEVEL_SERIES = ("density", "final_test_accuracy", "final_test_loss", "early_stop_step", "early_stop_test_accuracy",
                 "early_stop_val_loss", "trajectory_length", "instability", "supermask_test_accuracy",
                 "updated_fraction", "backward_flops_saved")


@dataclass(frozen=True)
class Row:
    """Values logged together at one point of one axis (``step``, ``rewind_step``, ``level``, ``alpha_index``)."""

    axis: str
    step: int
    values: dict[str, float]


@dataclass
class Report:
    """What a tracker logs for one run."""

    kind: str
    hash: str
    path: Path
    params: dict[str, Any] = field(default_factory=dict)  # the run's settings, flat ("optimizer.lr")
    tags: dict[str, str] = field(default_factory=dict)  # run_dir, hash, kind (+ group)
    rows: list[Row] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # name -> table (sweep statuses, curves)
    figures: dict[str, Callable[[], Any]] = field(default_factory=dict)  # name -> a matplotlib Figure, drawn lazily

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.hash}"

    def series(self) -> dict[str, list[tuple[int, float]]]:
        """Every series as ``tag -> [(step, value), ...]`` (what TensorBoard and MLflow store)."""
        out: dict[str, list[tuple[int, float]]] = {}
        for row in self.rows:
            for tag, value in row.values.items():
                out.setdefault(tag, []).append((row.step, value))
        return out


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, (list, tuple)):
        out[prefix] = json.dumps(value)
    else:
        out[prefix] = value


def settings_of(config: Mapping[str, Any]) -> dict[str, Any]:
    """A manifest's config as flat hyperparameters: the run sections by their own names (``optimizer.lr``), a
    stage's settings under its section (``instability.siblings``); runtime settings are left out."""
    sections = dict(config)
    training = sections.pop("training", None)
    if isinstance(training, Mapping) and "runtime" in training:  # a stage: {"training": cfg.to_dict(), ...}
        sections = {**training, **sections}
    elif training is not None:
        sections["training"] = training
    sections.pop("runtime", None)
    out: dict[str, Any] = {}
    _flat("", sections, out)
    return out


def trackers_of(config: Mapping[str, Any]) -> list[str]:
    """The ``runtime.trackers`` a run was started with (empty when it names none)."""
    for section in (config, config.get("training")):
        if isinstance(section, Mapping) and isinstance(section.get("runtime"), Mapping):
            return list(section["runtime"].get("trackers") or [])
    return []


def tracker_group_of(config: Mapping[str, Any]) -> str | None:
    """The ``runtime.tracker_group`` a run was started with (a grid's name; None when not set)."""
    for section in (config, config.get("training")):
        if isinstance(section, Mapping) and isinstance(section.get("runtime"), Mapping):
            return section["runtime"].get("tracker_group") or None
    return None


def _number(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _rows(table: pd.DataFrame, axis: str, key: str, columns: Mapping[str, str], prefix: Callable[[Any], str],
          ) -> list[Row]:
    out = []
    for record in table.to_dict("records"):
        values = {}
        for column, tag in columns.items():
            if column in record and (x := _number(record[column])) is not None:
                values[prefix(record) + tag] = x
        if values:
            out.append(Row(axis, int(record[key]), values))
    return out


def _metric_rows(table: pd.DataFrame, member_prefix: str | None) -> list[Row]:
    """Metrics rows as ``train/loss``, ``test/error`` (``sibling_<m>/...`` per sibling)."""
    columns = {c: c.replace("_", "/", 1) if c != "lr" else "lr" for c in _METRIC_SERIES}
    members = table["member"].nunique() if "member" in table else 1
    label = member_prefix or ("member" if members > 1 else None)
    return _rows(table, "step", "step", columns, lambda r: f"{label}_{int(r['member'])}/" if label else "")


def _sweep_rows(table: pd.DataFrame) -> list[Row]:
    """Sweep points as ``instability/<split>``, ``loss_barrier/<split>``, ``stable/<split>`` per rewind step."""
    table = table.assign(stable=table["stable"].map(lambda s: 1.0 if str(s).lower() in ("true", "1") else 0.0))
    columns = {**_SWEEP_SERIES, "stable": "stable"}
    out = []
    for record in table.to_dict("records"):
        values = {f"{tag}/{record['split']}": x for column, tag in columns.items()
                  if (x := _number(record.get(column))) is not None}
        if values:
            out.append(Row("rewind_step", int(record["rewind_step"]), values))
    return out


def _level_rows(table: pd.DataFrame) -> list[Row]:
    """IMP levels as ``<kind>/<column>`` (``imp/density``, ``reinit/final_test_accuracy``; ``replicate_<r>/`` in
    front when there are several)."""
    several = table["replicate"].nunique() > 1
    columns = {c: c for c in _LEVEL_SERIES}
    return _rows(table, "level", "level", columns,
                 lambda r: (f"replicate_{int(r['replicate'])}/" if several else "") + f"{r['kind']}/")


def _hessian_rows(table: pd.DataFrame) -> list[Row]:
    """A Hessian track (``hessian/lambda_1`` ... per step) or path (per alpha index, ``hessian/alpha`` too)."""
    columns = {c: f"hessian/{c}" for c in HESSIAN_COLUMNS if c != "seconds" and c in table}
    columns.update({c: f"hessian/{c}" for c in table.columns if c.startswith("lambda_")})
    if "step" in table:
        return _rows(table, "step", "step", columns, lambda r: "")
    table = table.assign(alpha_index=range(len(table)))
    return _rows(table, "alpha_index", "alpha_index", {**columns, "alpha": "hessian/alpha"}, lambda r: "")


def _read(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.is_file() and path.stat().st_size else None


def _curves_figure(curves: pd.DataFrame) -> Callable[[], Any]:
    def draw() -> Any:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(5, 3.5))
        ax = fig.add_subplot()
        test = curves[curves["split"] == curves["split"].iloc[0]]
        for step, group in test.groupby("rewind_step"):
            mean = group.groupby("alpha")["error"].mean()
            ax.plot(mean.index, mean.values, label=f"k = {step}it")
        ax.set(xlabel="alpha", ylabel=f"{test['split'].iloc[0]} error", title="interpolation")
        ax.legend(fontsize="small")
        return fig
    return draw


def _imp_figure(levels: pd.DataFrame) -> Callable[[], Any]:
    def draw() -> Any:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(5, 3.5))
        ax = fig.add_subplot()
        for kind, group in levels.groupby("kind"):
            mean = group.groupby("density")["final_test_accuracy"].mean().sort_index(ascending=False)
            ax.plot(mean.index * 100, mean.values, marker="o", label=str(kind))
        ax.set(xscale="log", xlabel="density (%)", ylabel="final test accuracy", title="IMP")
        ax.invert_xaxis()
        ax.legend(fontsize="small")
        return fig
    return draw


def read_report(path: str | Path, group: str | None = None) -> Report:
    """The records of the finished run in ``path`` as a Report (``group``: a grid's name, as a tag)."""
    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_text())
    kind, run_hash = str(manifest.get("kind", path.name.rsplit("_", 1)[0])), str(manifest.get("hash", ""))
    report = Report(kind, run_hash, path, params=settings_of(manifest.get("config") or {}),
                    tags={"run_dir": str(path.resolve()), "hash": run_hash, "kind": kind})
    if group:
        report.tags["group"] = group
    metrics = _read(path / METRICS)
    if metrics is not None:
        report.rows += _metric_rows(metrics, "sibling" if kind == SIBLINGS else None)
    if kind == INSTABILITY and (sweep := _read(path / SWEEP)) is not None:
        report.rows += _sweep_rows(sweep)
        report.tables["sweep"] = sweep[[c for c in SWEEP_COLUMNS if c in sweep]]
        if (curves := _read(path / CURVES)) is not None and len(curves):
            report.tables["curves"] = curves
            report.figures["interpolation"] = _curves_figure(curves)
    if kind == IMP and (levels := _read(path / LEVELS)) is not None and len(levels):
        report.rows += _level_rows(levels)
        report.tables["levels"] = levels[[c for c in LEVEL_COLUMNS if c in levels]]
        report.figures["imp_accuracy_density"] = _imp_figure(levels)
    hessian = _read(path / HESSIAN_TABLE)
    if hessian is not None:
        report.rows += _hessian_rows(hessian)
    return report
