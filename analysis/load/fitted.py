"""Curves fitted between two networks (``curve_<hash>/``, ``stability curve``): error and loss along the curve and
along the straight line, and their barriers."""
from __future__ import annotations

import pandas as pd

from stability.store import schema

from .frames import Source, combine, find_runs, read_json, read_table, with_run

# curve.csv's columns (stability.store.schema) plus, from the run's summary.json, the curve's kind and seed and
# whether the model has BatchNorm
FITTED_CURVE_COLUMNS = [*schema.CURVE_TABLE_COLUMNS, "kind", "seed", "batchnorm"]
CURVE_BARRIER_COLUMNS = ["split", "kind", "seed", "iterations", "barrier", "loss_barrier", "line_barrier",
                         "line_loss_barrier", "a", "b"]


def fitted_curves(source: Source) -> pd.DataFrame:
    """curve.csv of every curve run: error and loss at each t, per path (``curve`` or ``line``) and split."""
    frames = []
    for run in find_runs(source, schema.CURVE):
        df = read_table(run.path / schema.CURVE_TABLE)
        if df is None:
            continue
        info = read_json(run.path / schema.CURVE_SUMMARY)
        df["kind"] = info.get("kind", run.settings.get("curve.kind"))
        df["seed"] = info.get("seed", run.settings.get("curve.seed"))
        df["batchnorm"] = info.get("batchnorm")
        frames.append(with_run(df, run, FITTED_CURVE_COLUMNS))
    return combine(frames, FITTED_CURVE_COLUMNS)


def curve_barriers(source: Source) -> pd.DataFrame:
    """One row per curve run and split: the error and loss barriers along the curve and along the line."""
    frames = []
    for run in find_runs(source, schema.CURVE):
        info = read_json(run.path / schema.CURVE_SUMMARY)
        barrier = info.get("barrier") or {}
        rows = [{"split": s, "kind": info.get("kind"), "seed": info.get("seed"), "iterations": info.get("iterations"),
                 "barrier": barrier[s], "loss_barrier": info["loss_barrier"][s],
                 "line_barrier": info["line_barrier"][s], "line_loss_barrier": info["line_loss_barrier"][s],
                 "a": info.get("a"), "b": info.get("b")} for s in barrier]
        if rows:
            frames.append(with_run(pd.DataFrame(rows), run, CURVE_BARRIER_COLUMNS))
    return combine(frames, CURVE_BARRIER_COLUMNS)


__all__ = ["CURVE_BARRIER_COLUMNS", "FITTED_CURVE_COLUMNS", "curve_barriers", "fitted_curves"]
