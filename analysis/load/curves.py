"""Instability sweeps (``instability_<hash>/``): interpolation curves and the sweep table."""
from __future__ import annotations

import pandas as pd

from stability.store import schema

from .frames import Source, combine, find_runs, number, read_json, read_table, with_run

# The records' own columns (stability.store.schema) plus what the loaders add from the run's instability.json.
# ``batchnorm``: whether the sweep's model has BatchNorm (null for records written before sweeps said so).
CURVE_COLUMNS = [*schema.CURVE_COLUMNS, "label", "batchnorm"]
SWEEP_COLUMNS = [*schema.SWEEP_COLUMNS, "first_stable_step", "split_first_stable_step", "threshold",
                 "primary_split", "bn_mode", "batchnorm", "label"]


def interpolation_curves(source: Source, include_sparse: bool = True) -> pd.DataFrame:
    """curves.csv of every instability sweep: error and loss at each α per rewind step, pair and split.

    ``label`` is null for dense sweeps and names the sparse network for sweeps made by IMP;
    ``include_sparse=False`` keeps the dense ones only. ``batchnorm`` says whether the model has BatchNorm
    (null when the sweep did not record it).
    """
    frames = []
    for run in find_runs(source, "instability"):
        if run.label is not None and not include_sparse:
            continue
        df = read_table(run.path / schema.CURVES)
        if df is not None:
            df["pair"] = df["pair"].astype(str)
            df["label"] = run.label
            df["batchnorm"] = read_json(run.path / schema.INSTABILITY_SUMMARY).get("batchnorm")
            frames.append(with_run(df, run, CURVE_COLUMNS))
    return combine(frames, CURVE_COLUMNS)


def sweeps(source: Source, include_sparse: bool = True) -> pd.DataFrame:
    """sweep.csv of every instability sweep with the run's first stable step, threshold and label attached.

    ``first_stable_step`` is the run's (on its primary split); ``split_first_stable_step`` is the row's split's.
    Either is NaN when no swept step is stable. ``batchnorm`` says whether the model has BatchNorm (null when the
    sweep did not record it) and ``bn_mode`` how its statistics were handled along the path.
    """
    frames = []
    for run in find_runs(source, "instability"):
        if run.label is not None and not include_sparse:
            continue
        df = read_table(run.path / schema.SWEEP)
        if df is None:
            continue
        info = read_json(run.path / schema.INSTABILITY_SUMMARY)
        by_split = info.get("first_stable_step_by_split") or {}
        df["first_stable_step"] = number(info.get("first_stable_step"))
        df["split_first_stable_step"] = [number(by_split.get(s)) for s in df["split"]]
        df["threshold"] = number(info.get("threshold", run.settings.get("instability.threshold")))
        df["primary_split"] = info.get("primary_split")
        df["bn_mode"] = info.get("bn_mode", run.settings.get("instability.bn"))
        df["batchnorm"] = info.get("batchnorm")
        df["label"] = run.label
        frames.append(with_run(df, run, SWEEP_COLUMNS))
    return combine(frames, SWEEP_COLUMNS)



__all__ = ["CURVE_COLUMNS", "SWEEP_COLUMNS", "interpolation_curves", "sweeps"]
