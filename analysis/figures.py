"""Figures in the style of the papers, from the frames of :mod:`analysis.load`.

Every function takes DataFrames (or, for :func:`plot_all`, a results path) and
returns a :class:`matplotlib.figure.Figure`; ``save="dir/name"`` also writes
``dir/name.png`` and ``dir/name.pdf`` (``formats`` picks which). Figures are
built as plain ``Figure`` objects, not through ``pyplot``: no global figure
registry fills up in a long loop, nothing depends on the backend, and a
notebook shows a returned figure once (not twice).

Conventions: errors and accuracies are stored as fractions and drawn as
percent; steps are iterations. When a frame holds several runs, each run gets
its own line(s), labelled with its hash.
"""
from __future__ import annotations

import functools
import inspect
import io
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from stability.errors import ConfigError
from stability.maths.metrics import matching_tolerance

from .load import (
    Source,
    aggregate,
    find_runs,
    hessian_densities,
    hessian_tracks,
    imp_levels,
    interpolation_curves,
    settings_of,
    sweeps,
    training_curves,
)

FORMATS = ("png", "pdf")
KINDS = ("curves", "sweep", "imp", "hessian", "training", "earlybird", "neq", "all")

_STYLE = {
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "legend.framealpha": 0.85,
    "lines.linewidth": 1.6,
    "lines.markersize": 4,
    "errorbar.capsize": 3,
    "savefig.dpi": 150,
}
_SPLIT_NAMES = {"test": "Test", "train": "Train", "val": "Validation"}
_SPLIT_ORDER = ("test", "train", "val")
_SPLIT_COLORS = {"test": "C0", "train": "C1", "val": "C2"}
_KIND_STYLE = {  # IMP vs its baselines, as in Frankle & Carbin (2019)
    "imp": {"color": "C0", "marker": "o", "linestyle": "-"},
    "reinit": {"color": "C3", "marker": "s", "linestyle": "--"},
    "random": {"color": "C7", "marker": "^", "linestyle": ":"},
}
_MODEL_NAMES = {"lenet_300_100": "LeNet-300-100", "lenet5": "LeNet-5", "conv2": "Conv-2", "conv4": "Conv-4",
                "conv6": "Conv-6", "vgg11": "VGG-11", "vgg16": "VGG-16", "mlp": "MLP"}
_DATASET_NAMES = {"mnist": "MNIST", "mnist5k": "MNIST (5k subset)", "mnist1d": "MNIST-1D",
                  "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100",
                  "digits": "sklearn digits"}
_BATCHNORM_MODELS = ("resnet", "vgg11", "vgg16")
_VALUES = {  # plot_imp's y quantities: column -> axis label, drawn in percent
    "final_test_accuracy": "Test accuracy at the end of training (%)",
    "early_stop_test_accuracy": "Test accuracy at early stopping (%)",
    "instability": "Instability of the sparse network (%)",
}

F = TypeVar("F", bound=Callable[..., Figure])


class PaperFigure(Figure):
    """A Figure that a notebook shows as a PNG by itself: these figures never pass through pyplot."""

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        with matplotlib.rc_context(_STYLE):
            self.savefig(buf, format="png", bbox_inches="tight")
        return buf.getvalue()


# --------------------------------------------------------------------------- saving
def check_formats(formats: str | Iterable[str]) -> tuple[str, ...]:
    """Validated output formats ("png", "pdf"); a comma-joined string is accepted."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    out = tuple(dict.fromkeys(f.strip().lower().lstrip(".") for f in items if f.strip()))
    bad = [f for f in out if f not in FORMATS]
    if bad or not out:
        raise ConfigError(f"--format: unknown format {bad[0] if bad else '(none)'!r}; choose from "
                          f"{', '.join(FORMATS)} (comma-separated)")
    return out


def save_figure(fig: Figure, stem: str | os.PathLike[str], formats: str | Iterable[str] = FORMATS) -> list[Path]:
    """Write ``stem.<format>`` for each format (atomically) and return the paths."""
    formats = check_formats(formats)
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        # Same rule as the run store: a killed process leaves the old file or the new one, never half.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            with matplotlib.rc_context(_STYLE):
                fig.savefig(tmp, format=fmt, bbox_inches="tight")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        written.append(path)
    return written


def _styled(func: F) -> F:
    """Build the figure under the suite's rc style, then save it if ``save=`` was given."""

    @functools.wraps(func)
    def wrapper(*args: Any, save: str | os.PathLike[str] | None = None,
                formats: str | Iterable[str] = FORMATS, **kwargs: Any) -> Figure:
        if save is not None:
            formats = check_formats(formats)  # fail before the (slow) drawing on bad input
        with matplotlib.rc_context(_STYLE):
            fig = func(*args, **kwargs)
        if save is not None:
            save_figure(fig, save, formats)
        return fig

    # help() and IDEs show save= and formats= as the function's own keywords.
    sig = inspect.signature(func)
    extra = [inspect.Parameter("save", inspect.Parameter.KEYWORD_ONLY, default=None,
                               annotation="str | os.PathLike[str] | None"),
             inspect.Parameter("formats", inspect.Parameter.KEYWORD_ONLY, default=FORMATS,
                               annotation="str | Iterable[str]")]
    wrapper.__signature__ = sig.replace(parameters=[*sig.parameters.values(), *extra])  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


# --------------------------------------------------------------------------- text helpers
def _model_text(settings: Mapping[str, Any]) -> str | None:
    name = settings.get("model.name")
    if name is None:
        return None
    if name == "resnet":
        text = f"ResNet-{int(settings.get('model.depth', 20))}"
    else:
        text = _MODEL_NAMES.get(str(name), str(name))
    width = settings.get("model.width")
    if width is not None and not pd.isna(width) and float(width) != 1.0:
        text += f" (width ×{float(width):g})"
    return text


def describe(df: pd.DataFrame) -> str:
    """'Model (width) on Dataset' from a frame's settings columns; empty when they vary or are absent."""
    settings = settings_of(df)
    parts = [p for p in (_model_text(settings),) if p]
    dataset = settings.get("dataset.name")
    if dataset is not None:
        parts.append(_DATASET_NAMES.get(str(dataset), str(dataset)))
    return " on ".join(parts)


def _title(fig: Figure, what: str, df: pd.DataFrame, title: str | None, note: str | None = None) -> None:
    if title is None:
        desc = describe(df)
        title = f"{what}: {desc}" if desc else what
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=10)


INDEPENDENT_STEP = -1  # sweeps record independently trained networks at this rewind step


def step_text(step: Any) -> str:
    """An iteration count as the suite writes steps: ``500it``; '-' for a missing one; 'independent'."""
    if step is None or (isinstance(step, float) and math.isnan(step)):
        return "-"
    if int(step) == INDEPENDENT_STEP:
        return "independent"
    return f"{int(step)}it"


def alignment_of(df: pd.DataFrame) -> pd.Series:
    """Each row's alignment setting: 'none', 'weights', 'activations', with '+repair' (older runs: 'none')."""
    align = df["instability.align"].fillna("none") if "instability.align" in df.columns else \
        pd.Series("none", index=df.index)
    repair = df["instability.repair"].fillna(False).astype(bool) if "instability.repair" in df.columns else \
        pd.Series(False, index=df.index)
    return align.astype(str) + np.where(repair, "+repair", "")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# Reference lines (thresholds, markers) go after the data in legends.
_REFERENCE_LABELS = ("stability threshold", "first stable step", "edge of stability")


def _legend(ax: Any, **kwargs: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: (labels[i].startswith(_REFERENCE_LABELS), i))
    ax.legend([handles[i] for i in order], [labels[i] for i in order], **kwargs)


def _multi_run(df: pd.DataFrame) -> bool:
    return "run_hash" in df.columns and df["run_hash"].nunique() > 1


def _require(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    if df is None or df.empty:
        raise ValueError(f"{what}: no rows to plot")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: the frame lacks column(s) {', '.join(missing)}")


def _std(values: pd.Series) -> np.ndarray:
    # One sibling pair or replicate has no spread: draw no band rather than NaN.
    return np.nan_to_num(values.to_numpy(dtype=float), nan=0.0)


def _splits(df: pd.DataFrame, splits: Sequence[str] | None) -> list[str]:
    present = list(dict.fromkeys(df["split"]))
    if splits is not None:
        missing = [s for s in splits if s not in present]
        if missing:
            raise ValueError(f"split(s) {', '.join(missing)} not in the frame (it has {', '.join(present)})")
        return list(splits)
    return [s for s in _SPLIT_ORDER if s in present] + [s for s in present if s not in _SPLIT_ORDER]


# viridis without its pale yellow end, which vanishes on white.
_CMAP = ListedColormap(matplotlib.colormaps["viridis"](np.linspace(0.0, 0.9, 256)), name="viridis_dark")


def _step_colors(steps: Sequence[Any]) -> dict[Any, Any]:
    n = max(len(steps) - 1, 1)
    return {s: _CMAP(i / n) for i, s in enumerate(steps)}


# --------------------------------------------------------------------------- interpolation
@_styled
def plot_interpolation(curves: pd.DataFrame, *, splits: Sequence[str] | None = None, value: str = "error",
                       title: str | None = None) -> Figure:
    """Error (or loss) along the path between siblings vs α: one line per rewind step, band ±std over pairs.

    One panel per split (Frankle et al. 2020, Figure 2).
    """
    if value not in ("error", "loss"):
        raise ConfigError(f"value: unknown quantity {value!r}; choose from error, loss")
    _require(curves, ["rewind_step", "split", "alpha", value], "plot_interpolation")
    split_list = _splits(curves, splits)
    multi = _multi_run(curves)
    keys = ["run_hash", "rewind_step"] if multi else ["rewind_step"]
    stats = aggregate(curves, ["split", *keys, "alpha"], value)
    lines = list(dict.fromkeys(map(tuple, stats[keys].itertuples(index=False, name=None))))
    colors = _step_colors(lines)
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
            std = _std(sel["std"]) * scale
            label = f"k = {step_text(key[-1])}" + (f" ({key[0]})" if multi else "")
            ax.plot(x, mean, color=colors[key], label=label)
            ax.fill_between(x, mean - std, mean + std, color=colors[key], alpha=0.18, linewidth=0)
        ax.set_xlabel("Interpolation α")
        unit = "error (%)" if value == "error" else "loss (cross-entropy)"
        ax.set_ylabel(f"{_SPLIT_NAMES.get(split, split.capitalize())} {unit}")
        ax.set_title(_SPLIT_NAMES.get(split, split))
        ax.set_xlim(0, 1)
    # Outside the axes: the curves peak in the middle and end high or low at either side.
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.03, 1.0), borderaxespad=0, title="Rewind iteration")
    pairs = curves.groupby(["run_hash", "rewind_step", "split"])["pair"].nunique().max() if "pair" in curves else 1
    note = f"mean ± std over {_count(int(pairs), 'pair')} of siblings"
    note += _bn_note(curves)
    _title(fig, "Linear interpolation", curves, title, note)
    return fig


def _bn_note(df: pd.DataFrame) -> str:
    """How BatchNorm statistics were handled along the path, for models that have BatchNorm."""
    settings = settings_of(df)
    if settings.get("model.name") not in _BATCHNORM_MODELS or "instability.bn" not in settings:
        return ""
    return f"; BatchNorm statistics: {settings['instability.bn']}"


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


@_styled
def plot_instability(sweeps: pd.DataFrame, *, splits: Sequence[str] | None = None, threshold: float | None = None,
                     title: str | None = None) -> Figure:
    """Instability (%) vs rewind iteration on a symlog x axis (linear near 0, so k = 0 shows).

    One line per split with error bars (std over pairs), the stability threshold as a horizontal
    line, and each split's first stable step as a dashed vertical line (Frankle et al. 2020, Figure 3).
    """
    _require(sweeps, ["rewind_step", "split", "instability_mean"], "plot_instability")
    split_list = _splits(sweeps, splits)
    multi = _multi_run(sweeps)
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
                ax.axhline(float(indep["instability_mean"].iloc[0]) * 100, color=_SPLIT_COLORS.get(split),
                           linestyle=(0, (6, 3)), linewidth=1.0, alpha=0.8,
                           label=f"{_SPLIT_NAMES.get(split, split)}: independently trained" + (f" ({run})" if multi else ""))
            if sel.empty:
                continue
            std = _std(sel["instability_std"]) * 100 if "instability_std" in sel else None
            label = f"{_SPLIT_NAMES.get(split, split)} error" + (f" ({run})" if multi else "")
            ax.errorbar(sel["rewind_step"], sel["instability_mean"] * 100, yerr=std, marker="o",
                         linestyle=styles[r % len(styles)], color=_SPLIT_COLORS.get(split), label=label)
            col = "split_first_stable_step" if "split_first_stable_step" in sel else "first_stable_step"
            first = sel[col].iloc[0] if col in sel else float("nan")
            key = (run, None if pd.isna(first) else float(first))
            markers.setdefault(key, []).append(split)
    if threshold is None:
        values = sweeps["threshold"].dropna().unique() if "threshold" in sweeps.columns else []
        threshold = float(values[0]) if len(values) else 0.02
    ax.axhline(threshold * 100, color="0.35", linestyle=":", linewidth=1.2,
               label=f"stability threshold ({threshold * 100:g}%)")
    linthresh = _symlog_steps(ax, sorted(s for s in sweeps["rewind_step"].astype(float).unique() if s >= 0))
    unstable = []
    for (run, first), split_names in markers.items():
        who = ", ".join(split_names) + (f"; {run}" if multi else "")
        if first is None:
            unstable.append(who)
            continue
        color = _SPLIT_COLORS.get(split_names[0]) if len(split_names) == 1 else "k"
        ax.axvline(first, color=color, linestyle="--", linewidth=1.1,
                   label=f"first stable step ({who}): {step_text(first)}")
    if unstable:
        ax.text(0.02, 0.97, "no stable step among those swept (" + "; ".join(unstable) + ")",
                transform=ax.transAxes, va="top", fontsize=8, color="0.3")
    ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
    ax.set_xlabel(f"Rewind iteration k (symlog scale, linear from 0 to {linthresh:g})")
    ax.set_ylabel("Instability (%)")
    _legend(ax, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    pairs = int(sweeps["pairs"].max()) if "pairs" in sweeps.columns else None
    note = "instability = max_α E(θ(α)) − ½(E(θ_a) + E(θ_b))"
    note += (f"; mean ± std over {_count(pairs, 'pair')}" if pairs else "") + _bn_note(sweeps)
    _title(fig, "Instability to SGD noise", sweeps, title, note)
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


@_styled
def plot_alignment_curves(curves: pd.DataFrame, *, rewind_step: int | None = None, split: str = "test",
                          title: str | None = None) -> Figure:
    """Error along the path for one rewind point, one line per alignment setting (naive, aligned, + REPAIR).

    ``curves``: interpolation curves of sweeps of the same networks under different alignment settings
    (:func:`analysis.interpolation_curves`); ``rewind_step`` defaults to the independently trained
    networks when they were measured, else the first rewind step. Mean ± std over pairs.
    """
    _require(curves, ["rewind_step", "split", "alpha", "error"], "plot_alignment_curves")
    df = curves[curves["split"] == split].copy()
    if df.empty:
        raise ConfigError(f"split: no curves on split {split!r}; splits present: {sorted(set(curves['split']))}")
    steps = sorted(df["rewind_step"].unique())
    k = rewind_step if rewind_step is not None else steps[0]
    if k not in steps:
        raise ConfigError(f"rewind_step: {step_text(k)} was not measured; measured: "
                          f"{', '.join(step_text(s) for s in steps)}")
    df = df[df["rewind_step"] == k]
    df["alignment"] = alignment_of(df)
    fig = PaperFigure(figsize=(5.6, 3.6), layout="constrained")
    ax = fig.add_subplot()
    for name in _alignments(df):
        part = df[df["alignment"] == name]
        stats = part.groupby("alpha")["error"].agg(["mean", "std"]).reset_index().sort_values("alpha")
        color, style = _ALIGN_STYLE.get(name, ("C3", ":"))
        x, mean, std = stats["alpha"].to_numpy(float), stats["mean"].to_numpy(float) * 100, _std(stats["std"]) * 100
        barrier = mean.max() - 0.5 * (mean[0] + mean[-1])
        ax.plot(x, mean, color=color, linestyle=style, label=f"{_ALIGN_NAMES.get(name, name)} (barrier {barrier:.1f}%)")
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
    ax.set_xlim(0, 1)
    ax.set_xlabel("Interpolation α")
    ax.set_ylabel(f"{_SPLIT_NAMES.get(split, split)} error (%)")
    _legend(ax, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    what = "independently trained networks" if k == INDEPENDENT_STEP else f"siblings from k = {step_text(k)}"
    _title(fig, f"Linear interpolation modulo permutation, {what}", df, title,
           "barrier of the mean curve; mean ± std over pairs")
    return fig


@_styled
def plot_instability_by_alignment(sweeps: pd.DataFrame, *, split: str = "test", threshold: float | None = None,
                                  title: str | None = None) -> Figure:
    """Instability (%) vs rewind iteration, one line per alignment setting; independently trained
    networks as a dashed level of the same color."""
    _require(sweeps, ["rewind_step", "split", "instability_mean"], "plot_instability_by_alignment")
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
    ax.set_ylabel(f"Instability, {_SPLIT_NAMES.get(split, split).lower()} error (%)")
    _legend(ax, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    _title(fig, "Instability modulo permutation", df, title, "mean over pairs of max_α E(θ(α)) − ½(E(θ_a) + E(θ_b))")
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


# --------------------------------------------------------------------------- IMP
def _rewind_label(df: pd.DataFrame) -> str:
    """'rewind to 0it', 'rewind to first stable step (5it)' from a levels frame of one run."""
    step = df["rewind_step"].dropna()
    step_str = step_text(step.iloc[0]) if len(step) else "?"
    rewind = str(df["rewind"].iloc[0]) if "rewind" in df.columns else ""
    if rewind == "auto":
        return f"rewind to first stable step ({step_str})"
    return f"rewind to {step_str}"


def _percent_axis(ax: Any, densities: Iterable[float]) -> None:
    """Log x of percent of weights remaining, decreasing to the right (100 → 1), ticked at the levels."""
    pct = sorted({round(float(d) * 100, 6) for d in densities if d > 0}, reverse=True)
    ax.set_xscale("log")
    if pct:
        ticks = pct if len(pct) <= 9 else pct[:: math.ceil(len(pct) / 9)]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlim(pct[0] * 1.12, pct[-1] / 1.12)  # left > right: sparser to the right
    ax.set_xlabel("Weights remaining (%, log scale)")


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
        style = dict(_KIND_STYLE.get(kind, {"marker": "o"}))
        if color is not None:
            style["color"] = color
        ax.errorbar(sel["density"] * 100, sel["mean"] * scale, yerr=_std(sel["std"]) * scale, label=label(kind),
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


@_styled
def plot_imp(levels: pd.DataFrame, *, value: str = "final_test_accuracy", kinds: Sequence[str] = ("imp", "reinit", "random"),
             title: str | None = None) -> Figure:
    """Test accuracy (%) vs percent of weights remaining (log x, 100 → 1): IMP, random reinit, random pruning.

    Error bars are the std over replicates (Frankle & Carbin 2019). ``value`` may also be
    ``early_stop_test_accuracy`` or ``instability`` (of each sparse network at the rewind step).
    """
    if value not in _VALUES:
        raise ConfigError(f"value: unknown quantity {value!r}; choose from {', '.join(_VALUES)}")
    _require(levels, ["kind", "level", "density", value], "plot_imp")
    fig = PaperFigure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.add_subplot()
    runs_in = list(dict.fromkeys(levels["run_hash"])) if "run_hash" in levels.columns else [None]
    multi = len(runs_in) > 1
    for i, run in enumerate(runs_in):
        part = levels if run is None else levels[levels["run_hash"] == run]
        prefix = f"{_rewind_label(part)} ({run}): " if multi else ""
        _imp_lines(ax, part, value, 100.0, kinds, lambda k, p=prefix: p + _KIND_NAMES.get(k, k),
                   color=f"C{i}" if multi else None)
    _percent_axis(ax, levels["density"])
    ax.set_ylabel(_VALUES[value])
    if value == "instability":
        thr = levels["instability.threshold"].dropna() if "instability.threshold" in levels.columns else []
        ax.axhline((float(thr.iloc[0]) if len(thr) else 0.02) * 100, color="0.35", linestyle=":", linewidth=1.2,
                   label="stability threshold")
    _legend(ax, loc="best")
    what = "Lottery tickets" + ("" if multi else f", {_rewind_label(levels)}")
    _title(fig, what, levels, title, _imp_note(levels))
    return fig


@_styled
def plot_imp_early_stop(levels: pd.DataFrame, *, kinds: Sequence[str] = ("imp", "reinit", "random"),
                        title: str | None = None) -> Figure:
    """Early-stopping iteration (minimum validation loss) vs percent of weights remaining (log x, 100 → 1)."""
    _require(levels, ["kind", "level", "density", "early_stop_step"], "plot_imp_early_stop")
    fig = PaperFigure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.add_subplot()
    runs_in = list(dict.fromkeys(levels["run_hash"])) if "run_hash" in levels.columns else [None]
    multi = len(runs_in) > 1
    for i, run in enumerate(runs_in):
        part = levels if run is None else levels[levels["run_hash"] == run]
        prefix = f"{_rewind_label(part)} ({run}): " if multi else ""
        _imp_lines(ax, part, "early_stop_step", 1.0, kinds, lambda k, p=prefix: p + _KIND_NAMES.get(k, k),
                   color=f"C{i}" if multi else None)
    _percent_axis(ax, levels["density"])
    ax.set_ylabel("Early-stop iteration (min. validation loss)")
    ax.set_ylim(bottom=0)
    ax.legend(loc="best")
    _title(fig, "Early-stopping iteration", levels, title, _imp_note(levels))
    return fig


@_styled
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
        _require(df, ["kind", "level", "density", value], f"plot_rewind_comparison[{label!r}]")
        kinds = ("imp", "reinit", "random") if baselines else ("imp",)
        _imp_lines(ax, df, value, 100.0, kinds,
                   lambda k, name=label: name if k == "imp" else f"{name}: {_KIND_NAMES.get(k, k)}", color=f"C{i}")
        frames.append(df)
    both = pd.concat(frames, ignore_index=True)
    _percent_axis(ax, both["density"])
    ax.set_ylabel(_VALUES[value])
    ax.legend(loc="best")
    _title(fig, "Lottery tickets by rewind point", both, title, _imp_note(both))
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


@_styled
def plot_ticket_design(levels: pd.DataFrame, *, by: Sequence[str] | None = None,
                       value: str = "final_test_accuracy", title: str | None = None) -> Figure:
    """Zhou et al. (2019), Figure 2: test accuracy (%) vs weights remaining, one line per ticket design.

    ``levels``: the IMP tickets of several runs (e.g. ``imp_levels(root)``); lines are labelled by the
    design columns in ``by`` (criterion, mask1, mask0, mask_source; default: those that vary). Mean ±
    std over replicates; the dense networks (level 0) are a dotted level with their spread shaded.
    """
    if value not in _VALUES:
        raise ConfigError(f"value: unknown quantity {value!r}; choose from {', '.join(_VALUES)}")
    _require(levels, ["kind", "level", "density", value], "plot_ticket_design")
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
        ax.errorbar(stats["density"] * 100, stats["mean"] * 100, yerr=_std(stats["std"]) * 100, marker="o",
                    markersize=4, capsize=2, color=f"C{i}", label=design)
    _percent_axis(ax, imp["density"])
    ax.set_ylabel(_VALUES[value])
    _legend(ax, loc="best", fontsize="small")
    _title(fig, "Ticket design space", imp, title, _imp_note(imp))
    return fig


@_styled
def plot_supermask(levels: pd.DataFrame, *, by: Sequence[str] | None = None, chance: float | None = None,
                   title: str | None = None) -> Figure:
    """Supermasks (Zhou et al. 2019): test accuracy (%) of the *untrained* ticket at every level, per design.

    Reads ``supermask_test_accuracy`` (IMP with ``--supermask``); ``chance``, when given, is drawn as a level.
    """
    _require(levels, ["kind", "level", "density", "supermask_test_accuracy"], "plot_supermask")
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
        ax.errorbar(stats["density"] * 100, stats["mean"] * 100, yerr=_std(stats["std"]) * 100, marker="o",
                    markersize=4, capsize=2, color=f"C{i}", label=design)
    if chance is not None:
        ax.axhline(chance * 100, color="0.35", linestyle=":", linewidth=1.2, label="chance")
    _percent_axis(ax, imp["density"])
    ax.set_ylabel("Test accuracy before training (%)")
    _legend(ax, loc="best", fontsize="small")
    _title(fig, "Supermasks: untrained tickets", imp, title, _imp_note(imp))
    return fig


def _dense_and_tolerance(df: pd.DataFrame, value: str) -> tuple[float, float]:
    """Mean dense (level 0) accuracy and the matching tolerance: its std over replicates, or 0.2 points."""
    dense = df[(df["kind"] == "imp") & (df["level"] == 0)][value].dropna().astype(float)
    return float(dense.mean()), matching_tolerance(dense.tolist())


@_styled
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
        _require(df, ["kind", "level", "density", "instability", value], f"plot_matching_vs_instability[{label!r}]")
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
    _legend(ax, loc="lower left", fontsize=8)
    _title(fig, "Matching ⇔ stable", pd.concat([p for _, p in drawn]), title,
           "one point per IMP level and replicate (IMP tickets)")
    return fig


# --------------------------------------------------------------------------- Hessian
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
        names = [f"k = {step_text(v)}" if k == "rewind_step" else str(v) for k, v in zip(keys, key)]
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


@_styled
def plot_hessian(track: pd.DataFrame, lr: float | None = None, momentum: float = 0.0, *, yscale: str = "auto",
                 title: str | None = None) -> Figure:
    """λ_max (and λ_min when measured) and the Hessian trace vs training step (or α), two panels.

    With ``lr`` (plain or heavy-ball SGD) the edge-of-stability line (2 + 2β)/lr is drawn on the
    eigenvalue panel (Cohen et al. 2021). ``yscale="auto"`` turns to symlog when λ_max or the trace
    spans more than two decades; "linear" or "symlog" force either.
    """
    if yscale not in YSCALES:
        raise ConfigError(f"yscale: unknown scale {yscale!r}; choose from {', '.join(YSCALES)}")
    _require(track, ["lambda_1"], "plot_hessian")
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
    order = sorted(range(len(labels)), key=lambda i: (labels[i].startswith(_REFERENCE_LABELS), i))
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
        note = f"between siblings rewound to k = {step_text(track['rewind_step'].iloc[0])}"
    _title(fig, f"Hessian of the training loss {where}", track, title, note)
    return fig


# A spectrum whose eigenvalue range is below this fraction of the widest one would be a spike in an overlay.
_OVERLAY_MIN_WIDTH = 0.1
_MAX_DENSITY_PANELS = 6


@_styled
def plot_density(densities: pd.DataFrame, *, panels: bool | None = None, title: str | None = None) -> Figure:
    """Spectral density of the Hessian (stochastic Lanczos quadrature) on a log y axis, one line per step or α.

    ``panels=None`` overlays the spectra when their eigenvalue ranges are comparable and otherwise gives
    each step (at most six, evenly chosen) its own panel with its own x range; True/False force either.
    """
    _require(densities, ["x", "density"], "plot_density")
    xcol, _ = _track_x(densities)
    multi = _multi_run(densities)
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
        label = (f"step {step_text(point)}" if xcol == "step" else f"α = {point:.2f}") + (f" ({key[0]})" if multi else "")
        y = part["density"].to_numpy(float)
        peak = float(np.nanmax(y)) if len(y) else 0.0
        # SLQ's Gaussian broadening leaves tails that underflow towards 0: each spectrum is drawn down to
        # 1e-7 of its own peak, so the log axis shows outliers (the top eigenvalues) but not rounding error.
        ax.plot(part["x"], np.where(y >= peak * 1e-7, y, np.nan), color=_CMAP(norm(point)), label=label)
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

            bar = fig.colorbar(ScalarMappable(norm=norm, cmap=_CMAP), ax=axes[0])
            bar.set_label("Training iteration" if xcol == "step" else "Interpolation α")
    _title(fig, "Hessian spectral density", densities, title,
           "one panel per point: their eigenvalue ranges differ too much to overlay" if panels else None)
    return fig


# --------------------------------------------------------------------------- training curves
@_styled
def plot_training(curves: pd.DataFrame, *, splits: Sequence[str] = ("train", "test"), title: str | None = None) -> Figure:
    """Loss and error (%) vs training iteration, one line per split (mean over members, band ±std)."""
    _require(curves, ["step"], "plot_training")
    bad = [s for s in splits if f"{s}_loss" not in curves.columns]
    if bad:
        raise ConfigError(f"splits: unknown split {bad[0]!r}; choose from train, val, test")
    multi = _multi_run(curves)
    fig = PaperFigure(figsize=(9.6, 3.6), layout="constrained")
    ax_loss, ax_err = fig.subplots(1, 2)
    runs_in = list(dict.fromkeys(curves["run_hash"])) if "run_hash" in curves.columns else [None]
    styles = {"train": "-", "test": "--", "val": ":"}
    for i, run in enumerate(runs_in):
        part = curves if run is None else curves[curves["run_hash"] == run]
        for split in splits:
            color = f"C{i}" if multi else _SPLIT_COLORS.get(split)
            label = _SPLIT_NAMES.get(split, split) + (f" ({run})" if multi else "")
            for ax, col, scale in ((ax_loss, f"{split}_loss", 1.0), (ax_err, f"{split}_error", 100.0)):
                stats = aggregate(part, "step", col).dropna(subset=["mean"])
                x = stats["step"].to_numpy(float)
                mean = stats["mean"].to_numpy(float) * scale
                std = _std(stats["std"]) * scale
                ax.plot(x, mean, color=color, linestyle=styles.get(split, "-"), label=label)
                if std.any():
                    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
    ax_loss.set_ylabel("Loss (cross-entropy)")
    ax_err.set_ylabel("Error (%)")
    for ax in (ax_loss, ax_err):
        ax.set_xlabel("Training iteration")
        ax.legend(loc="upper right")
    ax_loss.set_title("Loss")
    ax_err.set_title("Error")
    members = int(curves["member"].nunique()) if "member" in curves.columns else 1
    _title(fig, "Training", curves, title, f"mean ± std over {members} members" if members > 1 else None)
    return fig


# --------------------------------------------------------------------------- early-bird tickets
@_styled
def plot_earlybird_distances(distances: pd.DataFrame, *, title: str | None = None) -> Figure:
    """The mask distance of every pair of mask points as a heat map (You et al. 2020, Figure 2).

    ``distances`` is :func:`analysis.load.earlybird_distances`: one panel per run, both axes the
    training iteration of the mask, colour the normalized Hamming distance; the early-bird step is
    marked by dashed lines on both axes (the panel says when detection never fired).
    """
    _require(distances, ["step_a", "step_b", "distance"], "plot_earlybird_distances")
    runs_in = list(dict.fromkeys(distances["run_hash"])) if "run_hash" in distances.columns else [None]
    fig = PaperFigure(figsize=(4.9 * len(runs_in), 3.9), layout="constrained")
    axes = fig.subplots(1, len(runs_in), squeeze=False)[0]
    for ax, run in zip(axes, runs_in):
        part = distances if run is None else distances[distances["run_hash"] == run]
        matrix = part.pivot_table(index="step_a", columns="step_b", values="distance", aggfunc="first")
        steps = [int(s) for s in matrix.index]
        values = matrix.to_numpy(float)
        # each panel its own scale (magnitude masks move far less than channel masks); as in the paper,
        # a smaller distance is warmer
        image = ax.imshow(values, cmap=matplotlib.colormaps["RdYlBu"], vmin=0.0, vmax=float(np.nanmax(values)) or 1.0,
                          interpolation="nearest")
        fig.colorbar(image, ax=ax, shrink=0.85, label="Mask distance (fraction of positions)")
        # At most ~8 labelled ticks per axis: every point is a row, but their names would overlap.
        every = max(1, math.ceil(len(steps) / 8))
        ticks = list(range(0, len(steps), every))
        for set_ticks, set_labels in ((ax.set_xticks, ax.set_xticklabels), (ax.set_yticks, ax.set_yticklabels)):
            set_ticks(ticks)
            set_labels([f"{steps[i]:,}" for i in ticks])
        ax.tick_params(axis="x", labelrotation=45)
        ax.grid(False)
        ax.set_xlabel("Training iteration of mask")
        ax.set_ylabel("Training iteration of mask")
        first = part.iloc[0]
        detected = first.get("detected_step")
        what = f"{first.get('mask', 'mask')} masks"
        if "target_density" in part.columns and not pd.isna(first.get("target_density")):
            what += f", density {float(first['target_density']):.0%}"
        if detected is not None and not pd.isna(detected) and int(detected) in steps:
            i = steps.index(int(detected))
            ax.axvline(i, color="black", linestyle="--", linewidth=1.0)
            ax.axhline(i, color="black", linestyle="--", linewidth=1.0)
            ax.plot([i], [i], marker="*", markersize=12, color="black", markeredgecolor="white", linestyle="none")
            what += f"\nearly bird at {step_text(detected)}"
        else:
            what += "\nno early bird detected"
        if "threshold" in part.columns and not pd.isna(first.get("threshold")):
            what += f" (ε = {float(first['threshold']):g}, l = {int(first['window'])})"
        ax.set_title(what + (f" [{run}]" if run is not None and len(runs_in) > 1 else ""))
    _title(fig, "Early-bird mask distances", distances, title)
    return fig


# --------------------------------------------------------------------------- NEq (neurons at equilibrium)
@_styled
def plot_neq(records: pd.DataFrame, *, title: str | None = None) -> Figure:
    """NEq against plain training and the random baselines: frozen neurons (%), backward FLOPs saved (%) and
    test accuracy (%) over training, one line per run (mean over members), from ``load.neq_records``.

    Each NEq evaluation's fraction holds until the next one (drawn as steps).
    """
    _require(records, ["step", "layer", "frozen_fraction", "saved_fraction", "test_error", "variant"], "plot_neq")
    df = records[records["layer"] == "all"]
    fig = PaperFigure(figsize=(12.0, 3.6), layout="constrained")
    axes = fig.subplots(1, 3)
    runs_in = list(dict.fromkeys(df["run_hash"])) if "run_hash" in df.columns else [None]
    order = {"plain": 0, "NEq": 1}
    runs_in.sort(key=lambda r: order.get(str((df if r is None else df[df["run_hash"] == r])["variant"].iloc[0]), 2))
    labels = [str((df if r is None else df[df["run_hash"] == r])["variant"].iloc[0]) for r in runs_in]
    for i, run in enumerate(runs_in):
        part = df if run is None else df[df["run_hash"] == run]
        label = labels[i] + (f" ({run})" if labels.count(labels[i]) > 1 else "")
        color = "k" if labels[i] == "plain" else f"C{i}"
        end = float(part["step"].max())
        for ax, col in ((axes[0], "frozen_fraction"), (axes[1], "saved_fraction")):
            stats = aggregate(part, "step", col).dropna(subset=["mean"])
            x = [*stats["step"].to_numpy(float), end]
            y = [*(stats["mean"].to_numpy(float) * 100), float(stats["mean"].iloc[-1]) * 100 if len(stats) else 0.0]
            ax.plot(x, y, drawstyle="steps-post", color=color, label=label)
        stats = aggregate(part, "step", "test_error").dropna(subset=["mean"])
        acc = (1 - stats["mean"].to_numpy(float)) * 100
        axes[2].plot(stats["step"].to_numpy(float), acc, color=color, marker="o", label=label)
    axes[0].set_ylabel("Frozen neurons (%)")
    axes[0].set_title("Neurons skipping their update")
    axes[1].set_ylabel("Backward FLOPs saved (%)")
    axes[1].set_title("Backward pass saved (weight gradients)")
    axes[2].set_ylabel("Test accuracy (%)")
    axes[2].set_title("Accuracy")
    for ax in axes:
        ax.set_xlabel("Training iteration")
        ax.legend(loc="best")
    members = int(df["member"].nunique()) if "member" in df.columns else 1
    _title(fig, "NEq", df, title, f"mean over {members} members" if members > 1 else None)
    return fig


# --------------------------------------------------------------------------- everything at once
def check_kinds(kinds: str | Iterable[str]) -> tuple[str, ...]:
    """Validated figure kinds for :func:`plot_all` (curves, sweep, imp, hessian, training, earlybird, neq, all)."""
    items = kinds.split(",") if isinstance(kinds, str) else list(kinds)
    out = tuple(dict.fromkeys(k.strip().lower() for k in items if k.strip()))
    bad = [k for k in out if k not in KINDS]
    if bad or not out:
        raise ConfigError(f"--kind: unknown kind {bad[0] if bad else '(none)'!r}; choose from {', '.join(KINDS)}")
    return tuple(k for k in KINDS if k != "all") if "all" in out else out


def _sgd_eos(df: pd.DataFrame) -> tuple[float | None, float]:
    """(lr, momentum) for the edge-of-stability line when the run's optimizer is plain or heavy-ball SGD."""
    settings = settings_of(df)
    if str(settings.get("optimizer.name", "")).lower() != "sgd" or settings.get("optimizer.nesterov") is True:
        return None, 0.0  # Adam and Nesterov have other stability thresholds
    lr = settings.get("optimizer.lr")
    return (float(lr) if lr is not None else None), float(settings.get("optimizer.momentum") or 0.0)


def plot_all(results_root: Source, out_dir: str | os.PathLike[str], formats: str | Iterable[str] = FORMATS,
             kinds: str | Iterable[str] = ("all",)) -> list[Path]:
    """Every figure the records under ``results_root`` allow, written to ``out_dir``; returns the files written.

    Sparse-network sweeps made by IMP are drawn as IMP instability plots, not as sweeps of their own.
    """
    formats = check_formats(formats)
    wanted = check_kinds(kinds)
    out = Path(out_dir)
    written: list[Path] = []

    def emit(fig: Figure, name: str) -> None:
        written.extend(save_figure(fig, out / name, formats))

    with matplotlib.rc_context(_STYLE):
        if "training" in wanted:
            frames = training_curves(results_root)
            # Trunks only: sibling sets that log metrics would add one near-identical figure per rewind point.
            frames = frames[frames["run_kind"] == "train"]
            for run, df in frames.groupby("run_hash", sort=False):
                emit(plot_training(df), f"training_{run}")
        if "curves" in wanted:
            frames = interpolation_curves(results_root, include_sparse=False)
            for run, df in frames.groupby("run_hash", sort=False):
                emit(plot_interpolation(df), f"interpolation_{run}")
        if "sweep" in wanted:
            frames = sweeps(results_root, include_sparse=False)
            for run, df in frames.groupby("run_hash", sort=False):
                emit(plot_instability(df), f"instability_{run}")
            # the same networks measured naive and aligned: one figure each, lines per alignment
            for i, df in enumerate(_alignment_groups(frames)):
                emit(plot_instability_by_alignment(df), f"instability_alignment_{i}")
        if "curves" in wanted:
            frames = interpolation_curves(results_root, include_sparse=False)
            for i, df in enumerate(_alignment_groups(frames)):
                emit(plot_alignment_curves(df), f"interpolation_alignment_{i}")
        if "imp" in wanted:
            written.extend(_plot_imp_runs(results_root, out, formats))
            written.extend(_plot_strong_runs(results_root, out, formats))  # strong tickets beside IMP's
        if "hessian" in wanted:
            frames = hessian_tracks(results_root)
            for run, df in frames.groupby("run_hash", sort=False):
                lr, momentum = _sgd_eos(df)
                emit(plot_hessian(df, lr=lr, momentum=momentum), f"hessian_{run}")
            frames = hessian_densities(results_root)
            for run, df in frames.groupby("run_hash", sort=False):
                emit(plot_density(df), f"density_{run}")
        if "earlybird" in wanted:
            from .load import earlybird_distances

            for run, df in earlybird_distances(results_root).groupby("run_hash", sort=False):
                emit(plot_earlybird_distances(df), f"earlybird_{run}")
        if "neq" in wanted:
            from .load import neq_records

            records = neq_records(results_root)
            # one figure per model and data, when NEq trained there: NEq, its baselines and plain training
            keys = [k for k in ("model.name", "dataset.name") if k in records.columns]
            for i, (_, df) in enumerate(records.groupby(keys, sort=False, dropna=False) if keys else []):
                if (df["variant"] != "plain").any():
                    emit(plot_neq(df), f"neq_{i}")
    return written


def _imp_runs_alike(runs: Iterable[Any], ignored: set[str]) -> list[list[str]]:
    """Hashes of IMP runs grouped by trunk and every ``imp.*`` setting but the ``ignored`` ones."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    for run in runs:
        trunk = (run.manifest.get("hashed_settings") or {}).get("trunk")
        others = tuple(sorted((k, str(v)) for k, v in run.settings.items() if k.startswith("imp.") and k not in ignored))
        groups.setdefault((trunk, others), []).append(run.hash)
    return list(groups.values())


def _plot_imp_runs(results_root: Source, out: Path, formats: tuple[str, ...]) -> list[Path]:
    written: list[Path] = []
    frames = imp_levels(results_root)
    by_run = dict(list(frames.groupby("run_hash", sort=False)))
    for run, df in by_run.items():
        written += save_figure(plot_imp(df), out / f"imp_{run}", formats)
        written += save_figure(plot_imp_early_stop(df), out / f"imp_early_stop_{run}", formats)
        if df["instability"].notna().any():
            written += save_figure(plot_imp(df, value="instability"), out / f"imp_instability_{run}", formats)
        if pd.to_numeric(df["supermask_test_accuracy"], errors="coerce").notna().any():
            written += save_figure(plot_supermask(df), out / f"supermask_{run}", formats)
    runs = [run for run in find_runs(results_root, "imp") if run.hash in by_run]
    # Runs of the same trunk and schedule that differ only in their ticket design: Zhou et al.'s comparison.
    design_keys = {f"imp.{k}" for k in ("criterion", "mask1", "mask0", "mask_from", "supermask", "baselines")}
    for hashes in _imp_runs_alike(runs, design_keys):
        if len(hashes) > 1:
            both = pd.concat([by_run[h] for h in sorted(hashes)], ignore_index=True)
            if design_labels(both[both["level"] > 0]).nunique() > 1:
                written += save_figure(plot_ticket_design(both), out / f"ticket_design_{'_'.join(sorted(hashes))}",
                                       formats)
    # Runs of the same trunk and pruning settings that differ only in where they rewind to: one comparison each.
    for hashes in _imp_runs_alike(runs, {"imp.rewind"}):
        rewinds = {str(by_run[h]["rewind"].iloc[0]) for h in hashes}
        if len(hashes) < 2 or len(rewinds) < 2:
            continue
        labelled = {}
        for h in sorted(hashes, key=lambda h: float(by_run[h]["rewind_step"].iloc[0])):
            label = _rewind_label(by_run[h])
            labelled[label if label not in labelled else f"{label} ({h})"] = by_run[h]
        fig = plot_rewind_comparison(labelled)
        written += save_figure(fig, out / f"rewind_comparison_{'_'.join(sorted(hashes))}", formats)
        measured = {k: v for k, v in labelled.items() if v["instability"].notna().any()}
        if measured:
            fig = plot_matching_vs_instability(measured)
            written += save_figure(fig, out / f"matching_vs_instability_{'_'.join(sorted(hashes))}", formats)
    return written


# --------------------------------------------------------------------------- strong lottery tickets
_STRONG_STYLE = {
    "edgepopup": {"color": "C2", "marker": "D", "linestyle": "-", "label": "edge-popup (Ramanujan et al.)"},
    "supermask": {"color": "C4", "marker": "v", "linestyle": "none", "label": "learned supermask (Zhou et al.)"},
}


def _kept_axis(ax: Any, densities: Iterable[float]) -> None:
    """``_percent_axis`` (log, 100 → 1) ticked at the densities drawn, thinned so that no two labels overlap."""
    pct = sorted({float(f"{float(d) * 100:.3g}") for d in densities if d > 0}, reverse=True)
    _percent_axis(ax, [p / 100 for p in pct])
    ticks: list[float] = []
    for value in pct:
        if not ticks or value < ticks[-1] / 1.15:
            ticks.append(value)
    if ticks:
        ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.set_xlabel("Weights kept (%, log scale)")


@_styled
def plot_strong_tickets(frame: pd.DataFrame, dense: float | pd.DataFrame | None = None,
                        imp: pd.DataFrame | None = None, *, title: str | None = None) -> Figure:
    """Test accuracy (%) of strong tickets (scores trained over frozen random weights) vs percent of weights kept.

    ``frame`` is :func:`analysis.load.strong_tickets`: edge-popup is one line, mean ± std over runs (seeds) at
    each ``kept``; supermask runs are points at their learned density. ``dense`` (a test accuracy, or a frame
    with ``final_test_accuracy``, e.g. ``strong_tickets(..., include_dense=True)`` of ``method == "standard"``)
    is a horizontal line (band ± std); ``imp`` (an :func:`analysis.load.imp_levels` frame) adds the IMP
    tickets (trained weights) at their densities. Log x of percent kept, 100 → 1, as ``plot_imp``.
    """
    _require(frame, ["method", "density", "final_test_accuracy"], "plot_strong_tickets")
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
                        yerr=_std(stats["final_test_accuracy_std"]) * 100, label=label, **style)
        else:
            ax.errorbar(part["density"] * 100, part["final_test_accuracy"] * 100, label=label, **style)
    if imp is not None and not imp.empty:
        _require(imp, ["kind", "level", "density", "final_test_accuracy"], "plot_strong_tickets (imp)")
        # one point per (run, level): runs pruned at other rates reach other densities at the same level
        tickets = imp[imp["kind"] == "imp"]
        keys = ["run_hash", "level"] if "run_hash" in tickets.columns else ["level"]
        acc = pd.to_numeric(tickets["final_test_accuracy"], errors="coerce")
        stats = (tickets.assign(acc=acc).groupby(keys, sort=False)
                 .agg(density=("density", "mean"), mean=("acc", "mean"), std=("acc", lambda v: v.std(ddof=0)))
                 .dropna(subset=["mean"]).sort_values("density", ascending=False))
        if not stats.empty:
            ax.errorbar(stats["density"] * 100, stats["mean"] * 100, yerr=_std(stats["std"]) * 100,
                        label="IMP tickets (trained weights)", **_KIND_STYLE.get("imp", {"marker": "o"}))
        densities += list(imp["density"].dropna())
    if dense is not None:
        if isinstance(dense, pd.DataFrame):
            _require(dense, ["final_test_accuracy"], "plot_strong_tickets (dense)")
            values = pd.to_numeric(dense["final_test_accuracy"], errors="coerce").dropna()
            mean, std = float(values.mean()), float(values.std()) if len(values) > 1 else 0.0
            label = f"dense training ({_count(len(values), 'run')})"
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
    _title(fig, "Strong lottery tickets", strong if not strong.empty else frame, title, note)
    return fig


def _recipe(df: pd.DataFrame, columns: Sequence[str]) -> pd.Series:
    """Each row's values of ``columns`` as one string (settings may be lists, which do not group)."""
    if not columns:
        return pd.Series("", index=df.index)
    return df[list(columns)].astype(str).agg("|".join, axis=1)


def _hashed_setting_columns(df: pd.DataFrame) -> list[str]:
    """The setting columns of a frame that name runs (``section.key`` of a run section, not UNHASHED)."""
    from stability.config import SECTIONS

    out = []
    for c in df.columns:
        section, _, key = str(c).partition(".")
        if section in SECTIONS and key in {f.name for f in fields(SECTIONS[section])} \
                and key not in SECTIONS[section].UNHASHED:
            out.append(c)
    return out


def _plot_strong_runs(results_root: Source, out: Path, formats: tuple[str, ...]) -> list[Path]:
    """One strong-ticket figure per recipe: strong runs that differ only in ``strong.kept`` and the init seed,
    with the dense runs and IMP tickets trained by the same recipe (same model, data, optimizer, schedule)."""
    from .load import strong_tickets

    frame = strong_tickets(results_root, include_dense=True)
    if frame.empty or not frame["method"].isin(tuple(_STRONG_STYLE)).any():
        return []
    recipe = [c for c in _hashed_setting_columns(frame)
              if c not in ("strong.kept", "training.init_seed", "training.method")]
    training = [c for c in recipe if not c.startswith("strong.")]  # what dense and IMP runs share with them
    frame = frame.assign(_recipe=_recipe(frame, recipe), _training=_recipe(frame, training))
    levels = imp_levels(results_root)
    if not levels.empty:
        levels = levels.assign(_training=_recipe(levels.reindex(columns=training), training))
    written: list[Path] = []
    strong_rows = frame[frame["method"] != "standard"]
    for i, (_, strong) in enumerate(strong_rows.groupby("_recipe", sort=True)):
        key = strong["_training"].iloc[0]
        dense = frame[(frame["method"] == "standard") & (frame["_training"] == key)]
        imp = levels[levels["_training"] == key] if not levels.empty else levels
        fig = plot_strong_tickets(strong, dense=dense if not dense.empty else None, imp=imp if not imp.empty else None)
        written += save_figure(fig, out / f"strong_tickets_{i}", formats)
    return written


__all__ = [
    "FORMATS",
    "KINDS",
    "check_formats",
    "check_kinds",
    "describe",
    "design_labels",
    "eos_threshold",
    "plot_alignment_curves",
    "plot_all",
    "plot_density",
    "plot_hessian",
    "plot_imp",
    "plot_imp_early_stop",
    "plot_instability",
    "plot_instability_by_alignment",
    "plot_interpolation",
    "plot_matching_vs_instability",
    "plot_neq",
    "plot_rewind_comparison",
    "plot_strong_tickets",
    "plot_supermask",
    "plot_ticket_design",
    "plot_training",
    "save_figure",
    "step_text",
]
