"""Training: loss and error curves, early-bird mask distances, NEq's frozen neurons and FLOPs saved."""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from stability.errors import ConfigError
from stability.steps import point_name

from ..load import aggregate
from .style import (
    SPLIT_COLORS,
    SPLIT_NAMES,
    PaperFigure,
    multi_run,
    require,
    spread,
    styled,
    suptitle,
)


# --------------------------------------------------------------------------- training curves
@styled
def plot_training(curves: pd.DataFrame, *, splits: Sequence[str] = ("train", "test"), title: str | None = None) -> Figure:
    """Loss and error (%) vs training iteration, one line per split (mean over members, band ±std)."""
    require(curves, ["step"], "plot_training")
    bad = [s for s in splits if f"{s}_loss" not in curves.columns]
    if bad:
        raise ConfigError(f"splits: unknown split {bad[0]!r}; choose from train, val, test")
    multi = multi_run(curves)
    fig = PaperFigure(figsize=(9.6, 3.6), layout="constrained")
    ax_loss, ax_err = fig.subplots(1, 2)
    runs_in = list(dict.fromkeys(curves["run_hash"])) if "run_hash" in curves.columns else [None]
    styles = {"train": "-", "test": "--", "val": ":"}
    for i, run in enumerate(runs_in):
        part = curves if run is None else curves[curves["run_hash"] == run]
        for split in splits:
            color = f"C{i}" if multi else SPLIT_COLORS.get(split)
            label = SPLIT_NAMES.get(split, split) + (f" ({run})" if multi else "")
            for ax, col, scale in ((ax_loss, f"{split}_loss", 1.0), (ax_err, f"{split}_error", 100.0)):
                stats = aggregate(part, "step", col).dropna(subset=["mean"])
                x = stats["step"].to_numpy(float)
                mean = stats["mean"].to_numpy(float) * scale
                std = spread(stats["std"]) * scale
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
    suptitle(fig, "Training", curves, title, f"mean ± std over {members} members" if members > 1 else None)
    return fig


# --------------------------------------------------------------------------- early-bird tickets
@styled
def plot_earlybird_distances(distances: pd.DataFrame, *, title: str | None = None) -> Figure:
    """The mask distance of every pair of mask points as a heat map (You et al. 2020, Figure 2).

    ``distances`` is :func:`analysis.load.earlybird_distances`: one panel per run, both axes the
    training iteration of the mask, colour the normalized Hamming distance; the early-bird step is
    marked by dashed lines on both axes (the panel says when detection never fired).
    """
    require(distances, ["step_a", "step_b", "distance"], "plot_earlybird_distances")
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
            what += f"\nearly bird at {point_name(detected)}"
        else:
            what += "\nno early bird detected"
        if "threshold" in part.columns and not pd.isna(first.get("threshold")):
            what += f" (ε = {float(first['threshold']):g}, l = {int(first['window'])})"
        ax.set_title(what + (f" [{run}]" if run is not None and len(runs_in) > 1 else ""))
    suptitle(fig, "Early-bird mask distances", distances, title)
    return fig


# --------------------------------------------------------------------------- NEq (neurons at equilibrium)
@styled
def plot_neq(records: pd.DataFrame, *, title: str | None = None) -> Figure:
    """NEq against plain training and the random baselines: frozen neurons (%), backward FLOPs saved (%) and
    test accuracy (%) over training, one line per run (mean over members), from ``load.neq_records``.

    Each NEq evaluation's fraction holds until the next one (drawn as steps).
    """
    require(records, ["step", "layer", "frozen_fraction", "saved_fraction", "test_error", "variant"], "plot_neq")
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
    suptitle(fig, "NEq", df, title, f"mean over {members} members" if members > 1 else None)
    return fig


# --------------------------------------------------------------------------- plot_all's kinds "training", "earlybird", "neq"
def draw_training(records: Mapping[str, pd.DataFrame]) -> Iterator[tuple[str, Figure]]:
    """Each trunk's training curves."""
    curves = records["training_curves"]
    # Trunks only: sibling sets that log metrics would add one near-identical figure per rewind point.
    for run, df in curves[curves["run_kind"] == "train"].groupby("run_hash", sort=False):
        yield f"training_{run}", plot_training(df)


def draw_earlybird(records: Mapping[str, pd.DataFrame]) -> Iterator[tuple[str, Figure]]:
    """Each early-bird run's mask distances."""
    for run, df in records["earlybird_distances"].groupby("run_hash", sort=False):
        yield f"earlybird_{run}", plot_earlybird_distances(df)


def draw_neq(records: Mapping[str, pd.DataFrame]) -> Iterator[tuple[str, Figure]]:
    """One figure per model and data where NEq trained: NEq, its baselines and plain training."""
    neq = records["neq_records"]
    keys = [k for k in ("model.name", "dataset.name") if k in neq.columns]
    for i, (_, df) in enumerate(neq.groupby(keys, sort=False, dropna=False) if keys else []):
        if (df["variant"] != "plain").any():
            yield f"neq_{i}", plot_neq(df)


__all__ = ["plot_earlybird_distances", "plot_neq", "plot_training"]
