"""Fitted curves beside the straight line (Garipov et al. 2018): error and loss along t, one column per split."""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .style import SPLIT_COLORS, SPLIT_NAMES, PaperFigure, require, splits_of, styled, suptitle

PATH_STYLE = {"curve": {"linestyle": "-", "marker": "o", "markersize": 3}, "line": {"linestyle": "--"}}
CURVE_NAMES = {"bezier": "Bezier curve", "polychain": "Polygonal chain"}


def _barrier(values: np.ndarray) -> float:
    """max_t v(t) − ½·(v(0) + v(1)), the barrier's definition along the line and the curve alike."""
    return float(values.max() - 0.5 * (values[0] + values[-1]))


@styled
def plot_fitted_curve(curves: pd.DataFrame, *, splits: Sequence[str] | None = None, title: str | None = None) -> Figure:
    """Error (top row, %) and loss (bottom row) along the fitted curve (solid) and the straight line (dashed)
    against t, one column per split; each legend gives the path's error or loss barrier."""
    require(curves, ["path", "split", "t", "error", "loss"], "plot_fitted_curve")
    if "run_hash" in curves.columns and curves["run_hash"].nunique() > 1:
        raise ValueError("plot_fitted_curve: the frame holds several curve runs; select one (by run_hash)")
    split_list = splits_of(curves, splits)
    kind = str(curves["kind"].iloc[0]) if "kind" in curves.columns else "curve"
    fig = PaperFigure(figsize=(3.6 * len(split_list) + 0.6, 5.6), layout="constrained")
    axes = fig.subplots(2, len(split_list), squeeze=False, sharex=True)
    for col, split in enumerate(split_list):
        part = curves[curves["split"] == split]
        for row, (value, scale, unit) in enumerate((("error", 100.0, "error (%)"), ("loss", 1.0, "loss"))):
            ax = axes[row][col]
            for path in ("line", "curve"):
                sel = part[part["path"] == path].sort_values("t")
                if sel.empty:
                    continue
                y = sel[value].to_numpy(float)
                name = "Straight line" if path == "line" else CURVE_NAMES.get(kind, kind)
                barrier = f"{_barrier(y) * scale:.3g}" + ("%" if value == "error" else "")
                ax.plot(sel["t"].to_numpy(float), y * scale, color=SPLIT_COLORS.get(split, "C0") if path == "curve"
                        else "0.45", label=f"{name} (barrier {barrier})", **PATH_STYLE[path])
            ax.set_ylabel(f"{SPLIT_NAMES.get(split, split.capitalize())} {unit}")
            ax.set_xlim(0, 1)
            ax.legend(fontsize=7)
            if row == 0:
                ax.set_title(SPLIT_NAMES.get(split, split))
            else:
                ax.set_xlabel("t (A at 0, B at 1)")
    bn = curves["curve.bn"].iloc[0] if "curve.bn" in curves.columns else None
    has_bn = "batchnorm" in curves.columns and curves["batchnorm"].eq(True).all()
    note = f"BatchNorm statistics along both paths: {bn}" if has_bn and isinstance(bn, str) else None
    align = curves["curve.align"].iloc[0] if "curve.align" in curves.columns else "none"
    aligned = f" (B aligned to A: {align})" if isinstance(align, str) and align != "none" else ""
    suptitle(fig, f"{CURVE_NAMES.get(kind, kind)} vs line{aligned}", curves, title, note)
    return fig


def draw_curve(records: Mapping[str, pd.DataFrame]) -> Iterator[tuple[str, Figure]]:
    """Each curve run's curve beside its line."""
    for run, df in records["fitted_curves"].groupby("run_hash", sort=False):
        yield f"curve_{run}", plot_fitted_curve(df)


__all__ = ["draw_curve", "plot_fitted_curve"]
