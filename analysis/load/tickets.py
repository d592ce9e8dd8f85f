"""Lottery tickets: IMP levels (``imp_<hash>/``) and early-bird tickets (``earlybird_<hash>/``)."""
from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from stability.store import schema

from .frames import Source, combine, find_runs, number, read_json, read_table, with_run

LEVEL_COLUMNS = [*schema.LEVEL_COLUMNS, "rewind", "first_stable_step"]


def imp_levels(source: Source) -> pd.DataFrame:
    """levels.csv of every IMP run (one row per replicate, level and kind) with its rewind settings.

    ``rewind`` is the requested target ("0", "500it" or "auto") and ``first_stable_step`` the step
    ``auto`` resolved to (NaN otherwise); ``rewind_step`` is the iteration actually rewound to.
    """
    frames = []
    for run in find_runs(source, "imp"):
        df = read_table(run.path / schema.LEVELS)
        if df is None:
            continue
        info = read_json(run.path / schema.IMP_SUMMARY).get("rewind") or {}
        df["rewind"] = str(info.get("rewind", run.settings.get("imp.rewind", "")))
        df["first_stable_step"] = number(info.get("first_stable_step"))
        frames.append(with_run(df, run, LEVEL_COLUMNS))
    return combine(frames, LEVEL_COLUMNS)


# --------------------------------------------------------------------------- early-bird tickets
# What every early-bird row carries from the run's earlybird.json besides its record's own columns.
EARLYBIRD_INFO = ["detected_step", "mask", "target_density", "threshold", "window", "rule",
                  "ticket_final_test_accuracy", "dense_final_test_accuracy"]
EARLYBIRD_POINT_COLUMNS = [*schema.EARLYBIRD_POINT_COLUMNS, *EARLYBIRD_INFO]
EARLYBIRD_DISTANCE_COLUMNS = [*schema.EARLYBIRD_DISTANCE_COLUMNS, *EARLYBIRD_INFO]


def _earlybird_frames(source: Source, table: str, columns: Sequence[str]) -> pd.DataFrame:
    frames = []
    for run in find_runs(source, schema.EARLYBIRD):
        df = read_table(run.path / table)
        if df is None:
            continue
        info = read_json(run.path / schema.EARLYBIRD_SUMMARY)
        ticket = info.get("ticket") or {}
        df["detected_step"] = number(info.get("detected_step"))
        for key in ("mask", "target_density", "threshold", "window", "rule"):
            df[key] = info.get(key, run.settings.get(f"earlybird.{key}"))
        df["ticket_final_test_accuracy"] = number(ticket.get("final_test_accuracy"))
        df["dense_final_test_accuracy"] = number(info.get("dense_final_test_accuracy"))
        frames.append(with_run(df, run, columns))
    return combine(frames, columns)


def earlybird_points(source: Source) -> pd.DataFrame:
    """points.csv of every early-bird run: per mask point the distance to the previous mask and the window max.

    ``detected_step`` is the run's early-bird step (NaN when detection never fired, and then
    ``ticket_final_test_accuracy`` is NaN too: no ticket was trained).
    """
    return _earlybird_frames(source, schema.EARLYBIRD_POINTS, EARLYBIRD_POINT_COLUMNS)


def earlybird_distances(source: Source) -> pd.DataFrame:
    """distances.csv of every early-bird run: the mask distance of every pair of mask points (step_a, step_b)."""
    return _earlybird_frames(source, schema.EARLYBIRD_DISTANCES, EARLYBIRD_DISTANCE_COLUMNS)



__all__ = ["EARLYBIRD_DISTANCE_COLUMNS", "EARLYBIRD_INFO", "EARLYBIRD_POINT_COLUMNS", "LEVEL_COLUMNS",
           "earlybird_distances", "earlybird_points", "imp_levels"]
