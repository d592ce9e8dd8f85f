"""Loss-landscape planes (``plane_<hash>/``): the grid (``plane_grids``) and the points drawn on it
(``plane_points``: the networks at their coordinates, a PCA plane's projected trajectory)."""
from __future__ import annotations

import pandas as pd

from stability.store import schema

from .frames import Source, combine, find_runs, number, read_json, read_table, with_run

PLANE_COLUMNS = [*schema.PLANE_COLUMNS, "plane_kind"]
PLANE_POINT_COLUMNS = ["split", "role", "name", "order", "u", "v", "error", "loss", "on_line", "plane_kind"]


def plane_grids(source: Source) -> pd.DataFrame:
    """plane.csv of every plane: error (fraction) and loss at each grid point (u, v) per split, with the plane's kind
    (siblings, networks, random, pca) and settings."""
    frames = []
    for run in find_runs(source, schema.PLANE):
        df = read_table(run.path / schema.PLANE_TABLE)
        if df is not None:
            df["plane_kind"] = read_json(run.path / schema.PLANE_SUMMARY).get("kind")
            frames.append(with_run(df, run, PLANE_COLUMNS))
    return combine(frames, PLANE_COLUMNS)


def plane_points(source: Source) -> pd.DataFrame:
    """The points of every finished plane, per split: each network (``role`` network: its name, coordinates, its
    own error and loss there; ``on_line``: one of the two ends of the straight line drawn) and each trajectory point
    of a PCA plane (``role`` trajectory, ``order`` along it)."""
    frames = []
    for run in find_runs(source, schema.PLANE):
        info = read_json(run.path / schema.PLANE_SUMMARY)
        if not info:
            continue
        line = info.get("line") or []
        rows = []
        for split, values in (info.get("at_networks") or {}).items():
            for i, (name, (u, v)) in enumerate((info.get("networks") or {}).items()):
                at = values.get(name, {})
                rows.append({"split": split, "role": "network", "name": name, "order": i, "u": u, "v": v,
                             "error": number(at.get("error")), "loss": number(at.get("loss")),
                             "on_line": name in line, "plane_kind": info.get("kind")})
            steps = info.get("trajectory_steps") or []
            for i, (u, v) in enumerate(info.get("trajectory") or []):
                rows.append({"split": split, "role": "trajectory", "name": f"{steps[i]}it" if i < len(steps) else "",
                             "order": i, "u": u, "v": v, "error": float("nan"), "loss": float("nan"),
                             "on_line": False, "plane_kind": info.get("kind")})
        if rows:
            frames.append(with_run(pd.DataFrame(rows), run, PLANE_POINT_COLUMNS))
    return combine(frames, PLANE_POINT_COLUMNS)


__all__ = ["PLANE_COLUMNS", "PLANE_POINT_COLUMNS", "plane_grids", "plane_points"]
