"""Hessian probes (``hessian_<hash>/``): eigenvalues and trace per point, and the spectral density."""
from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from stability.store import schema

from .frames import (
    Run,
    Source,
    combine,
    find_runs,
    flatten_settings,
    read_json,
    read_table,
    with_run,
)

HESSIAN_COLUMNS = ["track", "step", "alpha", "rewind_step", *schema.HESSIAN_COLUMNS]
DENSITY_COLUMNS = ["track", "step", "alpha", *schema.DENSITY_COLUMNS]


def _track_kind(df: pd.DataFrame) -> str:
    return "alpha" if "alpha" in df.columns and "step" not in df.columns else "step"


def _hessian_run_settings(run: Run) -> None:
    """Add hessian.json's settings to the run's when the manifest does not carry them."""
    info = read_json(run.path / schema.HESSIAN_SUMMARY)
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
        df = read_table(run.path / schema.HESSIAN_TABLE)
        if df is None:
            continue
        _hessian_run_settings(run)
        df.insert(0, "track", _track_kind(df))
        lambdas = sorted((c for c in df.columns if c.startswith("lambda_") and c[7:].isdigit()), key=lambda c: int(c[7:]))
        columns = HESSIAN_COLUMNS[:5] + [c for c in lambdas if c != "lambda_1"] + HESSIAN_COLUMNS[5:]
        frames.append(with_run(df, run, columns))
    out = combine(frames, HESSIAN_COLUMNS)
    for col in ("lambda_min", "trace", "trace_stderr"):
        out[col] = pd.to_numeric(out[col], errors="coerce")  # empty cells (not measured) -> NaN
    return out


def hessian_densities(source: Source) -> pd.DataFrame:
    """density.csv of every Hessian run: the spectral density on an eigenvalue grid ``x`` per step or α."""
    frames = []
    for run in find_runs(source, "hessian"):
        df = read_table(run.path / schema.DENSITY_TABLE)
        if df is None:
            continue
        _hessian_run_settings(run)
        df.insert(0, "track", _track_kind(df))
        frames.append(with_run(df, run, DENSITY_COLUMNS))
    return combine(frames, DENSITY_COLUMNS)


__all__ = ["DENSITY_COLUMNS", "HESSIAN_COLUMNS", "hessian_densities", "hessian_tracks"]
