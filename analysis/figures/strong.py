"""Strong lottery tickets: accuracy of scores trained over frozen random weights against the weights kept."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator

from ..load import aggregate, hashed_keys
from .style import KIND_STYLE, PaperFigure, percent_axis, plural, require, spread, styled, suptitle

_STRONG_STYLE = {
    "edgepopup": {"color": "C2", "marker": "D", "linestyle": "-", "label": "edge-popup (Ramanujan et al.)"},
    "supermask": {"color": "C4", "marker": "v", "linestyle": "none", "label": "learned supermask (Zhou et al.)"},
}


def _kept_axis(ax: Any, densities: Iterable[float]) -> None:
    """``percent_axis`` (log, 100 → 1) ticked at the densities drawn, thinned so that no two labels overlap."""
    pct = sorted({float(f"{float(d) * 100:.3g}") for d in densities if d > 0}, reverse=True)
    percent_axis(ax, [p / 100 for p in pct])
    ticks: list[float] = []
    for value in pct:
        if not ticks or value < ticks[-1] / 1.15:
            ticks.append(value)
    if ticks:
        ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.set_xlabel("Weights kept (%, log scale)")


@styled
def plot_strong_tickets(frame: pd.DataFrame, dense: float | pd.DataFrame | None = None,
                        imp: pd.DataFrame | None = None, *, title: str | None = None) -> Figure:
    """Test accuracy (%) of strong tickets (scores trained over frozen random weights) vs percent of weights kept.

    ``frame`` is :func:`analysis.load.strong_tickets`: edge-popup is one line, mean ± std over runs (seeds) at
    each ``kept``; supermask runs are points at their learned density. ``dense`` (a test accuracy, or a frame
    with ``final_test_accuracy``, e.g. ``strong_tickets(..., include_dense=True)`` of ``method == "standard"``)
    is a horizontal line (band ± std); ``imp`` (an :func:`analysis.load.imp_levels` frame) adds the IMP
    tickets (trained weights) at their densities. Log x of percent kept, 100 → 1, as ``plot_imp``.
    """
    require(frame, ["method", "density", "final_test_accuracy"], "plot_strong_tickets")
    fig = PaperFigure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.add_subplot()
    strong = frame[frame["method"].isin(tuple(_STRONG_STYLE))]
    densities = list(strong["density"].dropna())
    for method, style in _STRONG_STYLE.items():
        part = strong[strong["method"] == method].dropna(subset=["density", "final_test_accuracy"])
        if part.empty:
            continue
        style = dict(style)
        label = style.pop("label")
        if method == "edgepopup":
            stats = aggregate(part, "kept", ["density", "final_test_accuracy"]).sort_values("density_mean")
            ax.errorbar(stats["density_mean"] * 100, stats["final_test_accuracy_mean"] * 100,
                        yerr=spread(stats["final_test_accuracy_std"]) * 100, label=label, **style)
        else:
            ax.errorbar(part["density"] * 100, part["final_test_accuracy"] * 100, label=label, **style)
    if imp is not None and not imp.empty:
        require(imp, ["kind", "level", "density", "final_test_accuracy"], "plot_strong_tickets (imp)")
        # one point per (run, level): runs pruned at other rates reach other densities at the same level
        tickets = imp[imp["kind"] == "imp"]
        keys = ["run_hash", "level"] if "run_hash" in tickets.columns else ["level"]
        acc = pd.to_numeric(tickets["final_test_accuracy"], errors="coerce")
        stats = (tickets.assign(acc=acc).groupby(keys, sort=False)
                 .agg(density=("density", "mean"), mean=("acc", "mean"), std=("acc", lambda v: v.std(ddof=0)))
                 .dropna(subset=["mean"]).sort_values("density", ascending=False))
        if not stats.empty:
            ax.errorbar(stats["density"] * 100, stats["mean"] * 100, yerr=spread(stats["std"]) * 100,
                        label="IMP tickets (trained weights)", **KIND_STYLE.get("imp", {"marker": "o"}))
        densities += list(imp["density"].dropna())
    if dense is not None:
        if isinstance(dense, pd.DataFrame):
            require(dense, ["final_test_accuracy"], "plot_strong_tickets (dense)")
            values = pd.to_numeric(dense["final_test_accuracy"], errors="coerce").dropna()
            mean, std = float(values.mean()), float(values.std()) if len(values) > 1 else 0.0
            label = f"dense training ({plural(len(values), 'run')})"
        else:
            mean, std, label = float(dense), 0.0, "dense training"
        ax.axhline(mean * 100, color="0.2", linestyle="--", linewidth=1.2, label=label)
        if std > 0:
            ax.axhspan((mean - std) * 100, (mean + std) * 100, color="0.2", alpha=0.1, linewidth=0)
    _kept_axis(ax, densities)
    ax.set_ylabel("Test accuracy at the end of training (%)")
    ax.legend(loc="best")
    seeds = int(strong["init_seed"].nunique()) if "init_seed" in strong.columns and not strong.empty else 0
    note = "frozen weights, trained scores" + (f"; mean ± std over {seeds} init seeds" if seeds > 1 else "")
    suptitle(fig, "Strong lottery tickets", strong if not strong.empty else frame, title, note)
    return fig


def _recipe(df: pd.DataFrame, columns: Sequence[str]) -> pd.Series:
    """Each row's values of ``columns`` as one string (settings may be lists, which do not group)."""
    if not columns:
        return pd.Series("", index=df.index)
    return df[list(columns)].astype(str).agg("|".join, axis=1)


# --------------------------------------------------------------------------- plot_all's strong tickets (kind "imp")
def draw_strong(records: Mapping[str, Any]) -> Iterator[tuple[str, Figure]]:
    """One strong-ticket figure per recipe: strong runs that differ only in ``strong.kept`` and the init seed,
    with the dense runs and IMP tickets trained by the same recipe (same model, data, optimizer, schedule).

    A recipe is the run's settings that name runs (``hashed_settings`` of the train runs' manifests).
    """
    frame = records["strong_tickets"]
    if frame.empty or not frame["method"].isin(tuple(_STRONG_STYLE)).any():
        return
    named = hashed_keys(records["train_runs"])
    recipe = [c for c in frame.columns
              if c in named and c not in ("strong.kept", "training.init_seed", "training.method")]
    training = [c for c in recipe if not c.startswith("strong.")]  # what dense and IMP runs share with them
    frame = frame.assign(_recipe=_recipe(frame, recipe), _training=_recipe(frame, training))
    levels = records["imp_levels"]
    if not levels.empty:
        levels = levels.assign(_training=_recipe(levels.reindex(columns=training), training))
    strong_rows = frame[frame["method"] != "standard"]
    for i, (_, strong) in enumerate(strong_rows.groupby("_recipe", sort=True)):
        key = strong["_training"].iloc[0]
        dense = frame[(frame["method"] == "standard") & (frame["_training"] == key)]
        imp = levels[levels["_training"] == key] if not levels.empty else levels
        yield f"strong_tickets_{i}", plot_strong_tickets(strong, dense=dense if not dense.empty else None,
                                                         imp=imp if not imp.empty else None)


__all__ = ["plot_strong_tickets"]
