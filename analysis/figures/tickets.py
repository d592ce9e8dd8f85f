"""Lottery tickets: IMP against its baselines, rewind points, ticket designs, supermasks, matching vs stable.

Strong tickets (scores over frozen weights) are in :mod:`analysis.figures.strong`; ``stability plot --kind imp``
draws them beside IMP's.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from stability.errors import ConfigError
from stability.maths.metrics import matching_tolerance
from stability.steps import point_name

from ..load import aggregate, settings_of
from .strong import draw_strong
from .style import KIND_STYLE, PaperFigure, legend, percent_axis, require, spread, styled, suptitle

_VALUES = {  # plot_imp's y quantities: column -> axis label, drawn in percent
    "final_test_accuracy": "Test accuracy at the end of training (%)",
    "early_stop_test_accuracy": "Test accuracy at early stopping (%)",
    "instability": "Instability of the sparse network (%)",
}


# --------------------------------------------------------------------------- IMP
def _rewind_label(df: pd.DataFrame) -> str:
    """'rewind to 0it', 'rewind to first stable step (5it)' from a levels frame of one run."""
    step = df["rewind_step"].dropna()
    step_str = point_name(step.iloc[0]) if len(step) else "?"
    rewind = str(df["rewind"].iloc[0]) if "rewind" in df.columns else ""
    if rewind == "auto":
        return f"rewind to first stable step ({step_str})"
    return f"rewind to {step_str}"



def _level_stats(df: pd.DataFrame, value: str) -> pd.DataFrame:
    """Mean and std over replicates per level and kind, with mean density."""
    stats = aggregate(df, ["kind", "level"], value)
    dens = df.groupby(["kind", "level"], sort=True)["density"].mean().reset_index()
    return stats.merge(dens, on=["kind", "level"])


_KIND_NAMES = {"imp": "IMP", "reinit": "random reinitialization", "random": "random pruning"}


def _imp_lines(ax: Any, df: pd.DataFrame, value: str, scale: float, kinds: Sequence[str],
               label: Callable[[str], str] = lambda kind: _KIND_NAMES.get(kind, kind), color: str | None = None) -> None:
    """One error-bar line per kind: mean ± std over replicates at each level's density (in percent)."""
    stats = _level_stats(df, value)
    dense = stats[(stats["kind"] == "imp") & (stats["level"] == 0)]
    for kind in kinds:
        sel = stats[stats["kind"] == kind]
        if sel.empty:
            continue
        if kind != "imp" and not dense.empty and value != "instability":
            # Baselines share the dense network at 100%: start their lines there, as the papers do.
            sel = pd.concat([dense.assign(kind=kind), sel])
        sel = sel.dropna(subset=["mean"]).sort_values("density", ascending=False)
        if sel.empty:
            continue
        style = dict(KIND_STYLE.get(kind, {"marker": "o"}))
        if color is not None:
            style["color"] = color
        ax.errorbar(sel["density"] * 100, sel["mean"] * scale, yerr=spread(sel["std"]) * scale, label=label(kind),
                    **style)


def _imp_note(df: pd.DataFrame) -> str:
    reps = int(df["replicate"].nunique()) if "replicate" in df.columns else 1
    settings = settings_of(df)
    parts = []
    if "imp.strategy" in settings:
        frac = settings.get("imp.prune_fraction")
        parts.append(f"{settings['imp.strategy']} pruning" + (f", {float(frac):.0%} per level" if frac else ""))
    parts.append(f"mean ± std over {reps} replicates" if reps > 1 else "1 replicate")
    return "; ".join(parts)


@styled
def plot_imp(levels: pd.DataFrame, *, value: str = "final_test_accuracy", kinds: Sequence[str] = ("imp", "reinit", "random"),
             title: str | None = None) -> Figure:
    """Test accuracy (%) vs percent of weights remaining (log x, 100 → 1): IMP, random reinit, random pruning.

    Error bars are the std over replicates (Frankle & Carbin 2019). ``value`` may also be
    ``early_stop_test_accuracy`` or ``instability`` (of each sparse network at the rewind step).
    """
    if value not in _VALUES:
        raise ConfigError(f"value: unknown quantity {value!r}; choose from {', '.join(_VALUES)}")
    require(levels, ["kind", "level", "density", value], "plot_imp")
    fig = PaperFigure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.add_subplot()
    runs_in = list(dict.fromkeys(levels["run_hash"])) if "run_hash" in levels.columns else [None]
    multi = len(runs_in) > 1
    for i, run in enumerate(runs_in):
        part = levels if run is None else levels[levels["run_hash"] == run]
        prefix = f"{_rewind_label(part)} ({run}): " if multi else ""
        _imp_lines(ax, part, value, 100.0, kinds, lambda k, p=prefix: p + _KIND_NAMES.get(k, k),
                   color=f"C{i}" if multi else None)
    percent_axis(ax, levels["density"])
    ax.set_ylabel(_VALUES[value])
    if value == "instability":
        thr = levels["instability.threshold"].dropna() if "instability.threshold" in levels.columns else []
        ax.axhline((float(thr.iloc[0]) if len(thr) else 0.02) * 100, color="0.35", linestyle=":", linewidth=1.2,
                   label="stability threshold")
    legend(ax, loc="best")
    what = "Lottery tickets" + ("" if multi else f", {_rewind_label(levels)}")
    suptitle(fig, what, levels, title, _imp_note(levels))
    return fig


@styled
def plot_imp_early_stop(levels: pd.DataFrame, *, kinds: Sequence[str] = ("imp", "reinit", "random"),
                        title: str | None = None) -> Figure:
    """Early-stopping iteration (minimum validation loss) vs percent of weights remaining (log x, 100 → 1)."""
    require(levels, ["kind", "level", "density", "early_stop_step"], "plot_imp_early_stop")
    fig = PaperFigure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.add_subplot()
    runs_in = list(dict.fromkeys(levels["run_hash"])) if "run_hash" in levels.columns else [None]
    multi = len(runs_in) > 1
    for i, run in enumerate(runs_in):
        part = levels if run is None else levels[levels["run_hash"] == run]
        prefix = f"{_rewind_label(part)} ({run}): " if multi else ""
        _imp_lines(ax, part, "early_stop_step", 1.0, kinds, lambda k, p=prefix: p + _KIND_NAMES.get(k, k),
                   color=f"C{i}" if multi else None)
    percent_axis(ax, levels["density"])
    ax.set_ylabel("Early-stop iteration (min. validation loss)")
    ax.set_ylim(bottom=0)
    ax.legend(loc="best")
    suptitle(fig, "Early-stopping iteration", levels, title, _imp_note(levels))
    return fig


@styled
def plot_rewind_comparison(levels: Mapping[str, pd.DataFrame], *, value: str = "final_test_accuracy",
                           baselines: bool = False, title: str | None = None) -> Figure:
    """IMP accuracy vs percent remaining for several rewind targets on one plot, e.g. rewind 0 vs first stable step.

    ``levels`` maps a legend label to one IMP run's levels frame; ``baselines=True`` adds each run's
    random-reinitialization and random-pruning lines, dashed, in the same colour.
    """
    if value not in _VALUES:
        raise ConfigError(f"value: unknown quantity {value!r}; choose from {', '.join(_VALUES)}")
    if not levels:
        raise ValueError("plot_rewind_comparison: no runs to compare")
    fig = PaperFigure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.add_subplot()
    frames = []
    for i, (label, df) in enumerate(levels.items()):
        require(df, ["kind", "level", "density", value], f"plot_rewind_comparison[{label!r}]")
        kinds = ("imp", "reinit", "random") if baselines else ("imp",)
        _imp_lines(ax, df, value, 100.0, kinds,
                   lambda k, name=label: name if k == "imp" else f"{name}: {_KIND_NAMES.get(k, k)}", color=f"C{i}")
        frames.append(df)
    both = pd.concat(frames, ignore_index=True)
    percent_axis(ax, both["density"])
    ax.set_ylabel(_VALUES[value])
    ax.legend(loc="best")
    suptitle(fig, "Lottery tickets by rewind point", both, title, _imp_note(both))
    return fig


# The settings that place a ticket in Zhou et al.'s design space, as levels.csv columns (and the labels used).
DESIGN_COLUMNS = {"criterion": "criterion", "mask1": "mask-1", "mask0": "mask-0", "mask_source": "masks from"}


def design_labels(levels: pd.DataFrame, by: Sequence[str] | None = None) -> pd.Series:
    """A legend label per row naming its ticket design: the design columns ``by`` (default: those that vary).

    Level 0 (the dense network) has no design of its own; its rows get the label of their run's other rows.
    """
    cols = [c for c in (by or DESIGN_COLUMNS) if c in levels.columns]
    sparse = levels[levels["level"] > 0] if "level" in levels.columns else levels
    if by is None:
        cols = [c for c in cols if sparse[c].astype(str).nunique() > 1] or cols[:1]
    if not cols:
        raise ConfigError(f"design_labels: the levels have none of the design columns {', '.join(DESIGN_COLUMNS)}")

    def text(row: pd.Series) -> str:
        return ", ".join(str(row[c]) if len(cols) == 1 else f"{DESIGN_COLUMNS[c]} {row[c]}" for c in cols)

    labels = sparse.apply(text, axis=1) if len(sparse) else pd.Series(dtype=str)
    out = pd.Series("", index=levels.index, dtype=object)
    out.loc[labels.index] = labels
    if "run_hash" in levels.columns:  # the dense rows of each run take the run's label
        first = labels.groupby(levels.loc[labels.index, "run_hash"]).first()
        dense = levels.index.difference(labels.index)
        out.loc[dense] = levels.loc[dense, "run_hash"].map(first).fillna("dense")
    return out


@styled
def plot_ticket_design(levels: pd.DataFrame, *, by: Sequence[str] | None = None,
                       value: str = "final_test_accuracy", title: str | None = None) -> Figure:
    """Zhou et al. (2019), Figure 2: test accuracy (%) vs weights remaining, one line per ticket design.

    ``levels``: the IMP tickets of several runs (e.g. ``imp_levels(root)``); lines are labelled by the
    design columns in ``by`` (criterion, mask1, mask0, mask_source; default: those that vary). Mean ±
    std over replicates; the dense networks (level 0) are a dotted level with their spread shaded.
    """
    if value not in _VALUES:
        raise ConfigError(f"value: unknown quantity {value!r}; choose from {', '.join(_VALUES)}")
    require(levels, ["kind", "level", "density", value], "plot_ticket_design")
    imp = levels[levels["kind"] == "imp"].copy()
    imp["design"] = design_labels(imp, by)
    fig = PaperFigure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.add_subplot()
    dense = imp[imp["level"] == 0][value].dropna().astype(float)
    if len(dense):
        mean, std = float(dense.mean()) * 100, float(dense.std(ddof=0)) * 100 if len(dense) > 1 else 0.0
        ax.axhline(mean, color="0.3", linestyle=":", linewidth=1.2, label=f"dense ({mean:.1f}%)")
        if std:
            ax.axhspan(mean - std, mean + std, color="0.85", zorder=0)
    for i, (design, part) in enumerate(imp[imp["level"] > 0].groupby("design", sort=False)):
        stats = _level_stats(part, value).dropna(subset=["mean"]).sort_values("density", ascending=False)
        ax.errorbar(stats["density"] * 100, stats["mean"] * 100, yerr=spread(stats["std"]) * 100, marker="o",
                    markersize=4, capsize=2, color=f"C{i}", label=design)
    percent_axis(ax, imp["density"])
    ax.set_ylabel(_VALUES[value])
    legend(ax, loc="best", fontsize="small")
    suptitle(fig, "Ticket design space", imp, title, _imp_note(imp))
    return fig


@styled
def plot_supermask(levels: pd.DataFrame, *, by: Sequence[str] | None = None, chance: float | None = None,
                   title: str | None = None) -> Figure:
    """Supermasks (Zhou et al. 2019): test accuracy (%) of the *untrained* ticket at every level, per design.

    Reads ``supermask_test_accuracy`` (IMP with ``--supermask``); ``chance``, when given, is drawn as a level.
    """
    require(levels, ["kind", "level", "density", "supermask_test_accuracy"], "plot_supermask")
    imp = levels[(levels["kind"] == "imp") & (levels["level"] > 0)].copy()
    imp = imp[pd.to_numeric(imp["supermask_test_accuracy"], errors="coerce").notna()]
    if imp.empty:
        raise ValueError("plot_supermask: no level has a supermask accuracy (run IMP with --supermask)")
    imp["supermask_test_accuracy"] = imp["supermask_test_accuracy"].astype(float)
    imp["design"] = design_labels(imp, by)
    fig = PaperFigure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.add_subplot()
    for i, (design, part) in enumerate(imp.groupby("design", sort=False)):
        stats = _level_stats(part, "supermask_test_accuracy").sort_values("density", ascending=False)
        ax.errorbar(stats["density"] * 100, stats["mean"] * 100, yerr=spread(stats["std"]) * 100, marker="o",
                    markersize=4, capsize=2, color=f"C{i}", label=design)
    if chance is not None:
        ax.axhline(chance * 100, color="0.35", linestyle=":", linewidth=1.2, label="chance")
    percent_axis(ax, imp["density"])
    ax.set_ylabel("Test accuracy before training (%)")
    legend(ax, loc="best", fontsize="small")
    suptitle(fig, "Supermasks: untrained tickets", imp, title, _imp_note(imp))
    return fig


def _dense_and_tolerance(df: pd.DataFrame, value: str) -> tuple[float, float]:
    """Mean dense (level 0) accuracy and the matching tolerance: its std over replicates, or 0.2 points."""
    dense = df[(df["kind"] == "imp") & (df["level"] == 0)][value].dropna().astype(float)
    return float(dense.mean()), matching_tolerance(dense.tolist())


@styled
def plot_matching_vs_instability(levels: Mapping[str, pd.DataFrame], *, value: str = "final_test_accuracy",
                                 threshold: float = 0.02, title: str | None = None) -> Figure:
    """Frankle et al. (2020), Figure 5: one point per IMP level and replicate, x = the sparse network's
    instability at its rewind point, y = its accuracy minus the dense network's; matching <=> stable.

    ``levels`` maps a legend label (e.g. the rewind point) to one IMP run's levels frame, measured
    with the ``instability`` option. Points are shaded by density (darker = sparser).
    """
    if not levels:
        raise ValueError("plot_matching_vs_instability: no runs to draw")
    fig = PaperFigure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.add_subplot()
    markers = ["o", "s", "^", "D"]
    tolerances = []
    drawn = []
    for i, (label, df) in enumerate(levels.items()):
        require(df, ["kind", "level", "density", "instability", value], f"plot_matching_vs_instability[{label!r}]")
        dense, tol = _dense_and_tolerance(df, value)
        tolerances.append(tol)
        pts = df[(df["kind"] == "imp") & (df["level"] > 0)].dropna(subset=["instability", value])
        if "status" in pts.columns:
            pts = pts[pts["status"].astype(object).fillna("ok") == "ok"]  # diverged or untrained levels: not results
        if pts.empty:
            continue
        x = pts["instability"].astype(float).to_numpy() * 100
        y = (pts[value].astype(float).to_numpy() - dense) * 100
        sc = ax.scatter(x, y, c=-np.log(pts["density"].astype(float).to_numpy()), cmap="viridis", vmin=0,
                        marker=markers[i % len(markers)], edgecolors=f"C{i}", linewidths=1.2, s=36, label=label)
        drawn.append((sc, pts))
    if not drawn:
        raise ConfigError("levels: no IMP level has a measured instability; run IMP with the instability option")
    ax.axvline(threshold * 100, color="0.35", linestyle=":", linewidth=1.2,
               label=f"stability threshold ({threshold * 100:g}%)")
    tol = max(tolerances)
    ax.axhline(-tol * 100, color="0.35", linestyle="--", linewidth=1.0, label=f"matching tolerance (−{tol * 100:.2f} pts)")
    ax.axhline(0, color="0.7", linewidth=0.8)
    ax.set_xlabel("Instability of the sparse network at its rewind point (%)")
    ax.set_ylabel("Accuracy − dense accuracy (points)")
    cbar = fig.colorbar(drawn[-1][0], ax=ax, pad=0.02)
    ticks = sorted({float(d) for _, pts in drawn for d in pts["density"]}, reverse=True)
    shown = ticks[:: max(1, len(ticks) // 5)]
    cbar.set_ticks([-math.log(d) for d in shown])
    cbar.set_ticklabels([f"{100 * d:.3g}%" for d in shown])
    cbar.set_label("weights remaining")
    legend(ax, loc="lower left", fontsize=8)
    suptitle(fig, "Matching ⇔ stable", pd.concat([p for _, p in drawn]), title,
           "one point per IMP level and replicate (IMP tickets)")
    return fig


def _imp_runs_alike(runs: Iterable[Any], ignored: set[str]) -> list[list[str]]:
    """Hashes of IMP runs grouped by trunk and every ``imp.*`` setting but the ``ignored`` ones."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    for run in runs:
        trunk = (run.manifest.get("hashed_settings") or {}).get("trunk")
        others = tuple(sorted((k, str(v)) for k, v in run.settings.items() if k.startswith("imp.") and k not in ignored))
        groups.setdefault((trunk, others), []).append(run.hash)
    return list(groups.values())


# --------------------------------------------------------------------------- plot_all's kind "imp"
def draw_imp(records: Mapping[str, Any]) -> Iterator[tuple[str, Figure]]:
    """Each IMP run's levels, then comparisons of runs that differ only in ticket design or rewind point, then
    the strong tickets beside IMP's."""
    by_run = dict(list(records["imp_levels"].groupby("run_hash", sort=False)))
    for run, df in by_run.items():
        yield f"imp_{run}", plot_imp(df)
        yield f"imp_early_stop_{run}", plot_imp_early_stop(df)
        if df["instability"].notna().any():
            yield f"imp_instability_{run}", plot_imp(df, value="instability")
        if pd.to_numeric(df["supermask_test_accuracy"], errors="coerce").notna().any():
            yield f"supermask_{run}", plot_supermask(df)
    runs = [run for run in records["imp_runs"] if run.hash in by_run]
    # Runs of the same trunk and schedule that differ only in their ticket design: Zhou et al.'s comparison.
    design_keys = {f"imp.{k}" for k in ("criterion", "mask1", "mask0", "mask_from", "supermask", "baselines")}
    for hashes in _imp_runs_alike(runs, design_keys):
        if len(hashes) > 1:
            both = pd.concat([by_run[h] for h in sorted(hashes)], ignore_index=True)
            if design_labels(both[both["level"] > 0]).nunique() > 1:
                yield f"ticket_design_{'_'.join(sorted(hashes))}", plot_ticket_design(both)
    # Runs of the same trunk and pruning settings that differ only in where they rewind to: one comparison each.
    for hashes in _imp_runs_alike(runs, {"imp.rewind"}):
        rewinds = {str(by_run[h]["rewind"].iloc[0]) for h in hashes}
        if len(hashes) < 2 or len(rewinds) < 2:
            continue
        labelled = {}
        for h in sorted(hashes, key=lambda h: float(by_run[h]["rewind_step"].iloc[0])):
            label = _rewind_label(by_run[h])
            labelled[label if label not in labelled else f"{label} ({h})"] = by_run[h]
        yield f"rewind_comparison_{'_'.join(sorted(hashes))}", plot_rewind_comparison(labelled)
        measured = {k: v for k, v in labelled.items() if v["instability"].notna().any()}
        if measured:
            yield f"matching_vs_instability_{'_'.join(sorted(hashes))}", plot_matching_vs_instability(measured)
    yield from draw_strong(records)


__all__ = ["DESIGN_COLUMNS", "design_labels", "plot_imp", "plot_imp_early_stop", "plot_matching_vs_instability",
           "plot_rewind_comparison", "plot_supermask", "plot_ticket_design"]
