"""Linear mode connectivity: interpolation curves, instability vs rewind step, and both under alignment."""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from stability.errors import ConfigError
from stability.steps import INDEPENDENT_STEP, point_name

from ..load import aggregate, settings_of
from ..load.published import published_steps
from .style import (
    SPLIT_COLORS,
    SPLIT_NAMES,
    PaperFigure,
    legend,
    multi_run,
    plural,
    require,
    splits_of,
    spread,
    step_colors,
    styled,
    suptitle,
)


def alignment_of(df: pd.DataFrame) -> pd.Series:
    """Each row's alignment setting: 'none', 'weights', 'activations', with '+repair' (older runs: 'none')."""
    align = df["instability.align"].fillna("none") if "instability.align" in df.columns else \
        pd.Series("none", index=df.index)
    repair = df["instability.repair"].fillna(False).astype(bool) if "instability.repair" in df.columns else \
        pd.Series(False, index=df.index)
    return align.astype(str) + np.where(repair, "+repair", "")


# --------------------------------------------------------------------------- interpolation
@styled
def plot_interpolation(curves: pd.DataFrame, *, splits: Sequence[str] | None = None, value: str = "error",
                       title: str | None = None) -> Figure:
    """Error (or loss) along the path between siblings vs α: one line per rewind step, band ±std over pairs.

    One panel per split (Frankle et al. 2020, Figure 2).
    """
    if value not in ("error", "loss"):
        raise ConfigError(f"value: unknown quantity {value!r}; choose from error, loss")
    require(curves, ["rewind_step", "split", "alpha", value], "plot_interpolation")
    split_list = splits_of(curves, splits)
    multi = multi_run(curves)
    keys = ["run_hash", "rewind_step"] if multi else ["rewind_step"]
    stats = aggregate(curves, ["split", *keys, "alpha"], value)
    lines = list(dict.fromkeys(map(tuple, stats[keys].itertuples(index=False, name=None))))
    colors = step_colors(lines)
    scale = 100.0 if value == "error" else 1.0
    fig = PaperFigure(figsize=(3.6 * len(split_list) + 1.6, 3.4), layout="constrained")
    axes = fig.subplots(1, len(split_list), squeeze=False)[0]
    for ax, split in zip(axes, split_list):
        part = stats[stats["split"] == split]
        for key in lines:
            sel = part
            for col, v in zip(keys, key):
                sel = sel[sel[col] == v]
            if sel.empty:
                continue
            sel = sel.sort_values("alpha")
            x = sel["alpha"].to_numpy(float)
            mean = sel["mean"].to_numpy(float) * scale
            std = spread(sel["std"]) * scale
            label = f"k = {point_name(key[-1])}" + (f" ({key[0]})" if multi else "")
            ax.plot(x, mean, color=colors[key], label=label)
            ax.fill_between(x, mean - std, mean + std, color=colors[key], alpha=0.18, linewidth=0)
        ax.set_xlabel("Interpolation α")
        unit = "error (%)" if value == "error" else "loss (cross-entropy)"
        ax.set_ylabel(f"{SPLIT_NAMES.get(split, split.capitalize())} {unit}")
        ax.set_title(SPLIT_NAMES.get(split, split))
        ax.set_xlim(0, 1)
    # Outside the axes: the curves peak in the middle and end high or low at either side.
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.03, 1.0), borderaxespad=0, title="Rewind iteration")
    pairs = curves.groupby(["run_hash", "rewind_step", "split"])["pair"].nunique().max() if "pair" in curves else 1
    note = f"mean ± std over {plural(int(pairs), 'pair')} of siblings"
    note += _bn_note(curves)
    suptitle(fig, "Linear interpolation", curves, title, note)
    return fig


def _bn_note(df: pd.DataFrame) -> str:
    """How BatchNorm statistics were handled along the path, when every sweep recorded that its model has BatchNorm.

    Sweeps written before instability.json said ``batchnorm`` get no note.
    """
    if "batchnorm" not in df.columns or df.empty or not df["batchnorm"].eq(True).all():
        return ""
    mode = settings_of(df).get("instability.bn")
    return "" if mode is None else f"; BatchNorm statistics: {mode}"


# --------------------------------------------------------------------------- instability sweep
def _symlog_steps(ax: Any, steps: Sequence[float]) -> float:
    """Symmetric-log x axis whose linear part reaches the smallest positive step, so step 0 shows."""
    positive = sorted(s for s in steps if s > 0)
    linthresh = positive[0] if positive else 1.0
    ax.set_xscale("symlog", linthresh=linthresh, linscale=0.6)
    if 1 < len(steps) <= 10:
        ax.xaxis.set_major_locator(FixedLocator(sorted(set(steps))))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{round(v):,}"))
        ax.xaxis.set_minor_locator(NullLocator())
    top = max(steps) if steps else 1.0
    ax.set_xlim(-0.35 * linthresh, top * 1.6 if top > 0 else 1.0)
    return linthresh


@styled
def plot_instability(sweeps: pd.DataFrame, *, splits: Sequence[str] | None = None, threshold: float | None = None,
                     title: str | None = None, published: float | None = None) -> Figure:
    """Instability (%) vs rewind iteration on a symlog x axis (linear near 0, so k = 0 shows).

    One line per split with error bars (std over pairs), the stability threshold as a horizontal
    line, and each split's first stable step as a dashed vertical line (Frankle et al. 2020, Figure 3).
    ``published``: the paper's first stable step (iterations), drawn as a star on the threshold line beside
    the measured one (``analysis.compare_published`` gives it for runs of a preset that carries it).
    """
    require(sweeps, ["rewind_step", "split", "instability_mean"], "plot_instability")
    split_list = splits_of(sweeps, splits)
    multi = multi_run(sweeps)
    fig = PaperFigure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.add_subplot()
    runs_in = list(dict.fromkeys(sweeps["run_hash"])) if "run_hash" in sweeps.columns else [None]
    styles = ["-", "--", "-.", ":"]
    markers: dict[tuple[Any, ...], list[str]] = {}
    for r, run in enumerate(runs_in):
        part = sweeps if run is None else sweeps[sweeps["run_hash"] == run]
        for split in split_list:
            sel = part[part["split"] == split].sort_values("rewind_step")
            indep = sel[sel["rewind_step"] == INDEPENDENT_STEP]
            sel = sel[sel["rewind_step"] != INDEPENDENT_STEP]
            if not indep.empty:  # independently trained networks: a level, not a rewind step
                ax.axhline(float(indep["instability_mean"].iloc[0]) * 100, color=SPLIT_COLORS.get(split),
                           linestyle=(0, (6, 3)), linewidth=1.0, alpha=0.8,
                           label=f"{SPLIT_NAMES.get(split, split)}: independently trained" + (f" ({run})" if multi else ""))
            if sel.empty:
                continue
            std = spread(sel["instability_std"]) * 100 if "instability_std" in sel else None
            label = f"{SPLIT_NAMES.get(split, split)} error" + (f" ({run})" if multi else "")
            ax.errorbar(sel["rewind_step"], sel["instability_mean"] * 100, yerr=std, marker="o",
                         linestyle=styles[r % len(styles)], color=SPLIT_COLORS.get(split), label=label)
            col = "split_first_stable_step" if "split_first_stable_step" in sel else "first_stable_step"
            first = sel[col].iloc[0] if col in sel else float("nan")
            key = (run, None if pd.isna(first) else float(first))
            markers.setdefault(key, []).append(split)
    if threshold is None:
        values = sweeps["threshold"].dropna().unique() if "threshold" in sweeps.columns else []
        threshold = float(values[0]) if len(values) else 0.02
    ax.axhline(threshold * 100, color="0.35", linestyle=":", linewidth=1.2,
               label=f"stability threshold ({threshold * 100:g}%)")
    steps = sorted(s for s in sweeps["rewind_step"].astype(float).unique() if s >= 0)
    linthresh = _symlog_steps(ax, steps)
    if published is not None and not pd.isna(published):
        ax.plot([published], [threshold * 100], marker="*", markersize=14, color="0.15", linestyle="none",
                zorder=5, label=f"published first stable step: {point_name(published)}")
        if steps and published > max(steps):
            ax.set_xlim(right=published * 1.6)
    unstable = []
    for (run, first), split_names in markers.items():
        who = ", ".join(split_names) + (f"; {run}" if multi else "")
        if first is None:
            unstable.append(who)
            continue
        color = SPLIT_COLORS.get(split_names[0]) if len(split_names) == 1 else "k"
        ax.axvline(first, color=color, linestyle="--", linewidth=1.1,
                   label=f"first stable step ({who}): {point_name(first)}")
    if unstable:
        ax.text(0.02, 0.97, "no stable step among those swept (" + "; ".join(unstable) + ")",
                transform=ax.transAxes, va="top", fontsize=8, color="0.3")
    ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
    ax.set_xlabel(f"Rewind iteration k (symlog scale, linear from 0 to {linthresh:g})")
    ax.set_ylabel("Instability (%)")
    legend(ax, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    pairs = int(sweeps["pairs"].max()) if "pairs" in sweeps.columns else None
    note = "instability = max_α E(θ(α)) − ½(E(θ_a) + E(θ_b))"
    note += (f"; mean ± std over {plural(pairs, 'pair')}" if pairs else "") + _bn_note(sweeps)
    suptitle(fig, "Instability to SGD noise", sweeps, title, note)
    return fig


# --------------------------------------------------------------------------- alignment
_ALIGN_STYLE = {"none": ("0.25", "-"), "weights": ("C0", "-"), "activations": ("C2", "-"),
                "none+repair": ("0.55", "--"), "weights+repair": ("C0", "--"), "activations+repair": ("C2", "--")}
_ALIGN_NAMES = {"none": "naive", "weights": "weight matching", "activations": "activation matching",
                "none+repair": "REPAIR", "weights+repair": "weight matching + REPAIR",
                "activations+repair": "activation matching + REPAIR"}


def _alignments(df: pd.DataFrame) -> list[str]:
    present = set(df["alignment"])
    return [a for a in _ALIGN_STYLE if a in present] + sorted(present - set(_ALIGN_STYLE))


@styled
def plot_alignment_curves(curves: pd.DataFrame, *, rewind_step: int | None = None, split: str = "test",
                          title: str | None = None) -> Figure:
    """Error along the path for one rewind point, one line per alignment setting (naive, aligned, + REPAIR).

    ``curves``: interpolation curves of sweeps of the same networks under different alignment settings
    (:func:`analysis.interpolation_curves`); ``rewind_step`` defaults to the independently trained
    networks when they were measured, else the first rewind step. Mean ± std over pairs.
    """
    require(curves, ["rewind_step", "split", "alpha", "error"], "plot_alignment_curves")
    df = curves[curves["split"] == split].copy()
    if df.empty:
        raise ConfigError(f"split: no curves on split {split!r}; splits present: {sorted(set(curves['split']))}")
    steps = sorted(df["rewind_step"].unique())
    k = rewind_step if rewind_step is not None else steps[0]
    if k not in steps:
        raise ConfigError(f"rewind_step: {point_name(k)} was not measured; measured: "
                          f"{', '.join(point_name(s) for s in steps)}")
    df = df[df["rewind_step"] == k]
    df["alignment"] = alignment_of(df)
    fig = PaperFigure(figsize=(5.6, 3.6), layout="constrained")
    ax = fig.add_subplot()
    for name in _alignments(df):
        part = df[df["alignment"] == name]
        stats = part.groupby("alpha")["error"].agg(["mean", "std"]).reset_index().sort_values("alpha")
        color, style = _ALIGN_STYLE.get(name, ("C3", ":"))
        x, mean, std = stats["alpha"].to_numpy(float), stats["mean"].to_numpy(float) * 100, spread(stats["std"]) * 100
        barrier = mean.max() - 0.5 * (mean[0] + mean[-1])
        ax.plot(x, mean, color=color, linestyle=style, label=f"{_ALIGN_NAMES.get(name, name)} (barrier {barrier:.1f}%)")
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
    ax.set_xlim(0, 1)
    ax.set_xlabel("Interpolation α")
    ax.set_ylabel(f"{SPLIT_NAMES.get(split, split)} error (%)")
    legend(ax, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    what = "independently trained networks" if k == INDEPENDENT_STEP else f"siblings from k = {point_name(k)}"
    suptitle(fig, f"Linear interpolation modulo permutation, {what}", df, title,
           "barrier of the mean curve; mean ± std over pairs")
    return fig


@styled
def plot_instability_by_alignment(sweeps: pd.DataFrame, *, split: str = "test", threshold: float | None = None,
                                  title: str | None = None) -> Figure:
    """Instability (%) vs rewind iteration, one line per alignment setting; independently trained
    networks as a dashed level of the same color."""
    require(sweeps, ["rewind_step", "split", "instability_mean"], "plot_instability_by_alignment")
    df = sweeps[sweeps["split"] == split].copy()
    df["alignment"] = alignment_of(df)
    fig = PaperFigure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.add_subplot()
    for name in _alignments(df):
        part = df[df["alignment"] == name]
        color, style = _ALIGN_STYLE.get(name, ("C3", ":"))
        indep = part[part["rewind_step"] == INDEPENDENT_STEP]
        rows = part[part["rewind_step"] != INDEPENDENT_STEP].groupby("rewind_step")["instability_mean"].mean()
        if not rows.empty:
            ax.plot(rows.index.to_numpy(float), rows.to_numpy(float) * 100, marker="o", color=color, linestyle=style,
                    label=_ALIGN_NAMES.get(name, name))
        if not indep.empty:
            ax.axhline(float(indep["instability_mean"].mean()) * 100, color=color, linestyle=(0, (2, 2)), linewidth=1.0,
                       label=f"{_ALIGN_NAMES.get(name, name)}: independently trained")
    if threshold is None:
        values = df["threshold"].dropna().unique() if "threshold" in df.columns else []
        threshold = float(values[0]) if len(values) else 0.02
    ax.axhline(threshold * 100, color="0.35", linestyle=":", linewidth=1.2,
               label=f"stability threshold ({threshold * 100:g}%)")
    steps = sorted(s for s in df["rewind_step"].astype(float).unique() if s >= 0)
    if steps:
        linthresh = _symlog_steps(ax, steps)
        ax.set_xlabel(f"Rewind iteration k (symlog scale, linear from 0 to {linthresh:g})")
    ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
    ax.set_ylabel(f"Instability, {SPLIT_NAMES.get(split, split).lower()} error (%)")
    legend(ax, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    suptitle(fig, "Instability modulo permutation", df, title, "mean over pairs of max_α E(θ(α)) − ½(E(θ_a) + E(θ_b))")
    return fig


def _alignment_groups(df: pd.DataFrame) -> list[pd.DataFrame]:
    """Frames of sweeps that measured the same networks (same trunk, siblings, α grid) under several alignments."""
    if df.empty:
        return []
    df = df.copy()
    df["alignment"] = alignment_of(df)
    # every setting of the sweep but the alignment ones (and what only classifies or selects points)
    ignored = {"training.rewind_points", "instability.rewind_points", "instability.threshold",
               "instability.chance_margin", "instability.align", "instability.repair", "instability.align_examples",
               "instability.align_seed"}
    keys = [c for c in df.columns if c.startswith(("model.", "dataset.", "optimizer.", "schedule.", "training.",
                                                   "instability.")) and c not in ignored]
    out = []
    for _, part in df.groupby([df[c].astype(str) for c in keys], sort=False) if keys else [(None, df)]:
        if part["alignment"].nunique() > 1:
            out.append(part)
    return out


# --------------------------------------------------------------------------- plot_all's kinds "curves" and "sweep"
def draw_curves(records: Mapping[str, pd.DataFrame]) -> Iterator[tuple[str, Figure]]:
    """Each dense sweep's interpolation curves, then each group of sweeps of the same networks by alignment."""
    curves = records["dense_curves"]
    for run, df in curves.groupby("run_hash", sort=False):
        yield f"interpolation_{run}", plot_interpolation(df)
    for i, df in enumerate(_alignment_groups(curves)):
        yield f"interpolation_alignment_{i}", plot_alignment_curves(df)


def draw_sweep(records: Mapping[str, pd.DataFrame]) -> Iterator[tuple[str, Figure]]:
    """Each dense sweep's instability, then each group of sweeps of the same networks, one line per alignment."""
    sweeps = records["dense_sweeps"]
    # {run_hash: iterations} of the paper's first stable step, where the caller gave analysis.compare_published's
    # frame as records["published"]
    published = published_steps(records["published"]) if "published" in records else {}
    for run, df in sweeps.groupby("run_hash", sort=False):
        yield f"instability_{run}", plot_instability(df, published=published.get(str(run)))
    for i, df in enumerate(_alignment_groups(sweeps)):
        yield f"instability_alignment_{i}", plot_instability_by_alignment(df)


__all__ = ["alignment_of", "plot_alignment_curves", "plot_instability", "plot_instability_by_alignment",
           "plot_interpolation"]
