"""Layer-wise barriers (``layers.csv``): of ``layers_<hash>/`` runs (every sibling pair of a sweep's rewind points)
and of connect runs measured with ``connect.layers`` (one pair ``a-b``, no rewind step)."""
from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from stability.store import schema

from .frames import Run, Source, combine, find_runs, read_table, with_run

LAYER_COLUMNS = list(schema.LAYER_COLUMNS)


def layer_frames(runs: Iterable[Run]) -> pd.DataFrame:
    """``layers.csv`` of the given runs (those without one are skipped), with each run's kind, hash and settings."""
    frames = []
    for run in runs:
        df = read_table(run.path / schema.LAYERS_TABLE)
        if df is not None:
            frames.append(with_run(df, run, LAYER_COLUMNS))
    out = combine(frames, LAYER_COLUMNS)
    for col in LAYER_COLUMNS:
        if col in ("pair", "split", "group"):
            continue
        out[col] = pd.to_numeric(out[col], errors="coerce")  # a connect run's empty rewind step -> NaN
    return out


def layer_barriers(source: Source) -> pd.DataFrame:
    """Every layer-wise barrier below ``source``: one row per (run, rewind_step, pair, split, group) with the
    barrier of the group alone and cumulative from the input, its chord barrier and the error with the whole group
    from B (errors as fractions), the layers runs first."""
    return layer_frames([*find_runs(source, schema.LAYERS), *find_runs(source, schema.CONNECT)])


__all__ = ["LAYER_COLUMNS", "layer_barriers", "layer_frames"]
