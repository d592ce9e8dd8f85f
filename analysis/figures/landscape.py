"""The loss landscape: Hessian eigenvalues and trace over training or along a path, and spectral densities."""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from stability.errors import ConfigError
from stability.steps import point_name

from ..load import settings_of
from .style import CMAP, REFERENCE_LABELS, PaperFigure, multi_run, require, styled, suptitle


def eos_threshold(lr: float, momentum: float = 0.0) -> float:
    """Edge-of-stability sharpness of (heavy-ball) SGD: (2 + 2β)/lr, i.e. 2/lr without momentum."""
    if lr <= 0:
        raise ConfigError(f"lr: must be positive, got {lr}")
    if not 0 <= momentum < 1:
        raise ConfigError(f"momentum: must be in [0, 1), got {momentum}")
    return (2.0 + 2.0 * momentum) / lr


def _track_x(track: pd.DataFrame) -> tuple[str, str]:
    if "track" in track.columns and (track["track"] == "alpha").all():
        return "alpha", "Interpolation α"
    if "step" in track.columns and track["step"].notna().any():
        return "step", "Training iteration"
    return "alpha", "Interpolation α"


def _track_groups(track: pd.DataFrame, xcol: str) -> list[tuple[str, pd.DataFrame]]:
    keys = [k for k in ("run_hash",) if k in track.columns and track[k].nunique() > 1]
    if xcol == "alpha" and "rewind_step" in track.columns and track["rewind_step"].nunique() > 1:
        keys.append("rewind_step")
    if not keys:
        return [("", track)]
    out = []
    for key, part in track.groupby(keys, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        names = [f"k = {point_name(v)}" if k == "rewind_step" else str(v) for k, v in zip(keys, key)]
        out.append((", ".join(names), part))
    return out


# Sharpness often falls or rises by orders of magnitude in the first iterations; past this ratio the
# y axes switch to symlog (linear through zero, so λ_min's sign still shows).
_SYMLOG_RATIO = 100.0
YSCALES = ("auto", "linear", "symlog")


def _auto_yscale(ax: Any, values: np.ndarray, yscale: str) -> None:
    mags = np.abs(values[np.isfinite(values) & (values != 0)])
    if yscale == "linear" or not len(mags):
        return
    if yscale == "symlog" or mags.max() / mags.min() > _SYMLOG_RATIO:
        ax.set_yscale("symlog", linthresh=10.0 ** math.floor(math.log10(mags.min())), linscale=0.5)
        ax.margins(y=0.08)  # margins in the new scale, so the extreme markers are not cut at the edge
        ax.autoscale_view()
        ax.set_ylabel(f"{ax.get_ylabel()} (symlog scale)")


@styled
def plot_hessian(track: pd.DataFrame, lr: float | None = None, momentum: float = 0.0, *, yscale: str = "auto",
                 title: str | None = None) -> Figure:
    """λ_max (and λ_min when measured) and the Hessian trace vs training step (or α), two panels.

    With ``lr`` (plain or heavy-ball SGD) the edge-of-stability line (2 + 2β)/lr is drawn on the
    eigenvalue panel (Cohen et al. 2021). ``yscale="auto"`` turns to symlog when λ_max or the trace
    spans more than two decades; "linear" or "symlog" force either.
    """
    if yscale not in YSCALES:
        raise ConfigError(f"yscale: unknown scale {yscale!r}; choose from {', '.join(YSCALES)}")
    require(track, ["lambda_1"], "plot_hessian")
    xcol, xlabel = _track_x(track)
    fig = PaperFigure(figsize=(9.6, 3.6), layout="constrained")
    ax_eig, ax_tr = fig.subplots(1, 2)
    groups = _track_groups(track, xcol)
    for i, (name, part) in enumerate(groups):
        part = part.sort_values(xcol)
        x = part[xcol].to_numpy(float)
        suffix = f" ({name})" if name else ""
        c_max = f"C{i}" if len(groups) > 1 else "C0"
        c_min = f"C{i}" if len(groups) > 1 else "C2"
        ax_eig.plot(x, part["lambda_1"].to_numpy(float), marker="o", color=c_max, label=f"λ_max{suffix}")
        lmin = pd.to_numeric(part.get("lambda_min"), errors="coerce") if "lambda_min" in part else None
        if lmin is not None and lmin.notna().any():
            ax_eig.plot(x, lmin.to_numpy(float), marker="v", linestyle="--", color=c_min, label=f"λ_min{suffix}")
        trace = pd.to_numeric(part["trace"], errors="coerce") if "trace" in part else None
        if trace is not None and trace.notna().any():
            t = trace.to_numpy(float)
            ax_tr.plot(x, t, marker="o", color=f"C{i}" if len(groups) > 1 else "C1", label=f"trace{suffix}")
            if "trace_stderr" in part:
                se = np.nan_to_num(pd.to_numeric(part["trace_stderr"], errors="coerce").to_numpy(float))
                ax_tr.fill_between(x, t - se, t + se, color=f"C{i}" if len(groups) > 1 else "C1", alpha=0.2,
                                   linewidth=0)
    if lr is not None:
        eos = eos_threshold(lr, momentum)
        form, opt = ("2/η", f"SGD, η = {lr:g}") if momentum == 0 else \
            ("(2+2β)/η", f"SGD with momentum, η = {lr:g}, β = {momentum:g}")
        ax_eig.axhline(eos, color="C3", linestyle=":", linewidth=1.3,
                       label=f"edge of stability {form} = {eos:.3g} ({opt})")
    ax_eig.axhline(0, color="0.6", linewidth=0.7)
    ax_eig.set_xlabel(xlabel)
    ax_eig.set_ylabel("Hessian eigenvalue")
    ax_eig.set_title("Extreme eigenvalues")
    # Below the panels: λ_max climbs towards the edge-of-stability line, where a legend inside would sit.
    handles, labels = ax_eig.get_legend_handles_labels()
    if len(groups) > 1:
        more = ax_tr.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    order = sorted(range(len(labels)), key=lambda i: (labels[i].startswith(REFERENCE_LABELS), i))
    fig.legend([handles[i] for i in order], [labels[i] for i in order], loc="outside lower center",
               ncols=min(len(labels), 4))
    ax_tr.set_xlabel(xlabel)
    ax_tr.set_ylabel("Hessian trace ± s.e.")
    ax_tr.set_title("Trace (Hutchinson estimate)")
    if not ax_tr.lines:
        ax_tr.text(0.5, 0.5, "trace not measured", transform=ax_tr.transAxes, ha="center", color="0.4")
    _auto_yscale(ax_eig, pd.to_numeric(track["lambda_1"], errors="coerce").to_numpy(float), yscale)
    if "trace" in track.columns:
        _auto_yscale(ax_tr, pd.to_numeric(track["trace"], errors="coerce").to_numpy(float), yscale)
    where = "over training" if xcol == "step" else "along the interpolation path"
    note = None
    if xcol == "alpha" and "rewind_step" in track.columns and track["rewind_step"].nunique() == 1:
        note = f"between siblings rewound to k = {point_name(track['rewind_step'].iloc[0])}"
    suptitle(fig, f"Hessian of the training loss {where}", track, title, note)
    return fig


# A spectrum whose eigenvalue range is below this fraction of the widest one would be a spike in an overlay.
_OVERLAY_MIN_WIDTH = 0.1
_MAX_DENSITY_PANELS = 6


@styled
def plot_density(densities: pd.DataFrame, *, panels: bool | None = None, title: str | None = None) -> Figure:
    """Spectral density of the Hessian (stochastic Lanczos quadrature) on a log y axis, one line per step or α.

    ``panels=None`` overlays the spectra when their eigenvalue ranges are comparable and otherwise gives
    each step (at most six, evenly chosen) its own panel with its own x range; True/False force either.
    """
    require(densities, ["x", "density"], "plot_density")
    xcol, _ = _track_x(densities)
    multi = multi_run(densities)
    keys = (["run_hash"] if multi else []) + [xcol]
    groups = [(k if isinstance(k, tuple) else (k,), part.sort_values("x"))
              for k, part in densities.groupby(keys, sort=True)]
    points = sorted(densities[xcol].dropna().unique())
    norm = Normalize(min(points), max(points) if max(points) > min(points) else min(points) + 1)
    widths = [float(part["x"].max() - part["x"].min()) for _, part in groups]
    if panels is None:
        panels = len(groups) > 1 and min(widths) < _OVERLAY_MIN_WIDTH * max(widths)
    if panels and len(groups) > _MAX_DENSITY_PANELS:
        pick = np.unique(np.linspace(0, len(groups) - 1, _MAX_DENSITY_PANELS).round().astype(int))
        groups = [groups[i] for i in pick]
    n = len(groups) if panels else 1
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = PaperFigure(figsize=(6.4 if n == 1 else 3.4 * cols, 3.8 if n == 1 else 2.8 * rows + 0.6),
                      layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for extra_ax in axes[n:]:
        extra_ax.remove()
    for i, (key, part) in enumerate(groups):
        ax = axes[i if panels else 0]
        point = key[-1]
        label = (f"step {point_name(point)}" if xcol == "step" else f"α = {point:.2f}") + (f" ({key[0]})" if multi else "")
        y = part["density"].to_numpy(float)
        peak = float(np.nanmax(y)) if len(y) else 0.0
        # SLQ's Gaussian broadening leaves tails that underflow towards 0: each spectrum is drawn down to
        # 1e-7 of its own peak, so the log axis shows outliers (the top eigenvalues) but not rounding error.
        ax.plot(part["x"], np.where(y >= peak * 1e-7, y, np.nan), color=CMAP(norm(point)), label=label)
        if panels:
            ax.set_title(label)
    for ax in axes[:n]:
        ax.set_yscale("log")
        ax.set_xlabel("Eigenvalue λ")
        ax.set_ylabel("Spectral density (log scale)")
    if not panels:
        if len(groups) <= 8:
            axes[0].legend(loc="upper right")
        else:
            from matplotlib.cm import ScalarMappable

            bar = fig.colorbar(ScalarMappable(norm=norm, cmap=CMAP), ax=axes[0])
            bar.set_label("Training iteration" if xcol == "step" else "Interpolation α")
    suptitle(fig, "Hessian spectral density", densities, title,
           "one panel per point: their eigenvalue ranges differ too much to overlay" if panels else None)
    return fig


def _sgd_eos(df: pd.DataFrame) -> tuple[float | None, float]:
    """(lr, momentum) for the edge-of-stability line when the run's optimizer is plain or heavy-ball SGD."""
    settings = settings_of(df)
    if str(settings.get("optimizer.name", "")).lower() != "sgd" or settings.get("optimizer.nesterov") is True:
        return None, 0.0  # Adam and Nesterov have other stability thresholds
    lr = settings.get("optimizer.lr")
    return (float(lr) if lr is not None else None), float(settings.get("optimizer.momentum") or 0.0)


# --------------------------------------------------------------------------- plot_all's kind "hessian"
def draw_hessian(records: Mapping[str, pd.DataFrame]) -> Iterator[tuple[str, Figure]]:
    """Each Hessian run's eigenvalues and trace (with SGD's edge of stability), then each run's spectral density."""
    for run, df in records["hessian_tracks"].groupby("run_hash", sort=False):
        lr, momentum = _sgd_eos(df)
        yield f"hessian_{run}", plot_hessian(df, lr=lr, momentum=momentum)
    for run, df in records["hessian_densities"].groupby("run_hash", sort=False):
        yield f"density_{run}", plot_density(df)


__all__ = ["YSCALES", "eos_threshold", "plot_density", "plot_hessian"]
