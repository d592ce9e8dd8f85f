"""Loss-landscape planes: a filled contour of the loss (log-spaced levels) and of the error (percent) over a plane,
the networks marked at their coordinates, the straight line between the first two drawn (for a sibling plane: the
path whose barrier is the instability), and a PCA plane's trajectory, as in Garipov et al. (2018) and Li et al.
(2018).

``draw_plane`` is plot_all's kind ``plane``: one figure per ``plane_<hash>`` run and split.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.colors import BoundaryNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from stability.errors import ConfigError

from .style import CMAP, PaperFigure, require, splits_of, styled, suptitle

VALUES = ("loss", "error")
KIND_NAMES = {"siblings": "the trunk and two siblings", "networks": "three networks",
              "random": "filter-normalized random directions", "pca": "PCA directions of the trajectory"}


def loss_levels(values: np.ndarray, count: int = 20) -> np.ndarray:
    """Log-spaced contour levels from the smallest to the largest positive loss (linear when some are <= 0)."""
    finite = values[np.isfinite(values)]
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.array([lo, lo + 1e-9])
    if lo > 0:
        return np.geomspace(lo, hi * (1 + 1e-9), count)
    return np.linspace(lo, hi * (1 + 1e-9), count)


def _grid(df: pd.DataFrame, value: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    table = df.pivot_table(index="v", columns="u", values=value, aggfunc="mean").sort_index().sort_index(axis=1)
    return table.columns.to_numpy(float), table.index.to_numpy(float), table.to_numpy(float)


def _panel(ax: Any, fig: Figure, grid: pd.DataFrame, points: pd.DataFrame, value: str, line: bool) -> None:
    u, v, z = _grid(grid, value)
    if value == "error":
        z = z * 100
        levels = np.linspace(np.nanmin(z), max(np.nanmax(z), np.nanmin(z) + 1e-9), 16)
        norm = BoundaryNorm(levels, CMAP.N)
        label = "error (%)"
    else:
        levels = loss_levels(z)
        norm = BoundaryNorm(levels, CMAP.N)
        label = "loss (log-spaced levels)"
    filled = ax.contourf(u, v, z, levels=levels, cmap=CMAP, norm=norm)
    ax.contour(u, v, z, levels=levels, colors="k", linewidths=0.3, alpha=0.4)
    bar = fig.colorbar(filled, ax=ax, label=label)
    if value == "loss":
        bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:.3g}"))
    nets = points[points["role"] == "network"].sort_values("order")
    ends = nets[nets["on_line"].astype(bool)]
    if line and len(ends) == 2:
        ax.plot(ends["u"], ends["v"], color="white", linestyle="--", linewidth=1.2, label="straight line")
    traj = points[points["role"] == "trajectory"].sort_values("order")
    if not traj.empty:
        ax.plot(traj["u"], traj["v"], color="C3", marker="o", markersize=3, linewidth=1.2, label="trajectory")
    for _, p in nets.iterrows():
        ax.plot(p["u"], p["v"], marker="o", markersize=7, color="white", markeredgecolor="black")
        ax.annotate(str(p["name"]), (p["u"], p["v"]), textcoords="offset points", xytext=(5, 5), fontsize=8,
                    color="white", bbox={"boxstyle": "round,pad=0.15", "fc": "black", "alpha": 0.5, "lw": 0})
    ax.set_xlabel("u (along e₁)")
    ax.set_ylabel("v (along e₂)")
    spans = (float(np.ptp(u)), float(np.ptp(v)))
    if min(spans) > 0 and max(spans) / min(spans) <= 3:  # true geometry, unless it would squash the picture
        ax.set_aspect("equal", adjustable="box")
    ax.grid(False)


@styled
def plot_plane(grid: pd.DataFrame, points: pd.DataFrame | None = None, *, split: str | None = None,
               values: tuple[str, ...] = VALUES, line: bool = True, title: str | None = None) -> Figure:
    """One plane (one run of ``analysis.load.plane_grids``; its ``plane_points`` marked): a panel per quantity in
    ``values`` (``loss``: log-spaced levels; ``error``: percent), the networks marked, the straight line between
    the first two drawn (``line``) and a PCA plane's trajectory."""
    bad = [v for v in values if v not in VALUES]
    if bad or not values:
        raise ConfigError(f"values: unknown quantity {bad[0] if bad else '(none)'!r}; choose from {', '.join(VALUES)}")
    require(grid, ["u", "v", "split", *values], "plot_plane")
    if "run_hash" in grid.columns and grid["run_hash"].nunique() > 1:
        raise ValueError("plot_plane: the frame holds several planes; select one run (its run_hash) first")
    split = split or splits_of(grid, None)[0]
    part = grid[grid["split"] == split]
    if part.empty:
        raise ValueError(f"plot_plane: no rows of split {split!r}")
    if points is None or points.empty:
        points = pd.DataFrame(columns=["split", "role", "name", "order", "u", "v", "on_line"])
    else:
        if "run_hash" in grid.columns and "run_hash" in points.columns:
            points = points[points["run_hash"] == grid["run_hash"].iloc[0]]
        points = points[points["split"] == split]
    fig = PaperFigure(figsize=(4.6 * len(values), 3.9), layout="constrained")
    axes = fig.subplots(1, len(values), squeeze=False)[0]
    for ax, value in zip(axes, values):
        _panel(ax, fig, part, points, value, line)
        ax.set_title(f"{split} {value}")
    kind = part["plane_kind"].iloc[0] if "plane_kind" in part.columns else None
    suptitle(fig, f"plane through {KIND_NAMES.get(kind, 'the networks')}" if kind in ("siblings", "networks")
             else f"plane along {KIND_NAMES.get(kind, 'two directions')}", part, title)
    return fig


# --------------------------------------------------------------------------- plot_all's kind "plane"
def draw_plane(records: Mapping[str, pd.DataFrame]) -> Iterator[tuple[str, Figure]]:
    """Each plane, one figure per split."""
    grids, points = records["plane_grids"], records["plane_points"]
    for run, df in grids.groupby("run_hash", sort=False):
        for split in splits_of(df, None):
            yield f"plane_{run}_{split}", plot_plane(df, points, split=split)


__all__ = ["draw_plane", "loss_levels", "plot_plane"]
