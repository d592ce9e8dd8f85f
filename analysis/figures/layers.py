"""Layer-wise barriers (Adilova et al. 2024): a heat map of the barrier per layer (x) per rewind point (y), or,
for one pair of networks, bars per layer: each layer interpolated alone, and every layer up to it.

``draw_layers`` is plot_all's kind ``layers``: one figure per ``layers_<hash>`` run and per connect run measured
with ``connect.layers``.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from stability.errors import ConfigError
from stability.steps import point_name

from ..load.layers import layer_frames
from .style import CMAP, PaperFigure, require, splits_of, styled, suptitle

METRICS = {"error": ("barrier", "cumulative_barrier", "error barrier (%)", 100.0),
           "loss": ("loss_barrier", "cumulative_loss_barrier", "loss barrier", 1.0)}


def _rows_of(df: pd.DataFrame) -> pd.Series:
    """What a heat map row is: the rewind point, or the run for a connect run (no rewind step)."""
    steps = pd.to_numeric(df["rewind_step"], errors="coerce")
    runs = df["run_hash"].astype(str) if "run_hash" in df.columns else pd.Series("a-b", index=df.index)
    return pd.Series([point_name(s) if pd.notna(s) else f"a-b {r}" for s, r in zip(steps, runs)], index=df.index)


@styled
def plot_layer_barriers(layers: pd.DataFrame, metric: str = "error", split: str | None = None, *,
                        title: str | None = None) -> Figure:
    """Barrier per layer group, mean over pairs: a heat map over rewind points (rows) when the frame holds several,
    else bars; two panels: each group interpolated alone (the rest at network a), and cumulatively from the input
    (the last group's cumulative barrier is the plain barrier). ``metric``: error or loss."""
    if metric not in METRICS:
        raise ConfigError(f"metric: unknown quantity {metric!r}; choose from {', '.join(METRICS)}")
    alone, cumulative, label, scale = METRICS[metric]
    require(layers, ["group", "position", alone, cumulative, "split"], "plot_layer_barriers")
    split = split or splits_of(layers, None)[0]
    df = layers[layers["split"] == split].copy()
    if df.empty:
        raise ValueError(f"plot_layer_barriers: no rows of split {split!r}")
    df["row"] = _rows_of(df)
    order = df.groupby("group", sort=False)["position"].min().sort_values()
    groups = list(order.index)
    steps = pd.to_numeric(df["rewind_step"], errors="coerce")
    rows = list(dict.fromkeys(df.assign(_s=steps).sort_values("_s", na_position="last")["row"]))
    fig = PaperFigure(figsize=(max(6.0, 0.45 * len(groups) * 2 + 3), 2.2 + 0.3 * len(rows) if len(rows) > 1 else 3.4),
                      layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, column, name in zip(axes, (alone, cumulative), ("alone (the rest at network a)", "cumulative from the input")):
        table = df.pivot_table(index="row", columns="group", values=column, aggfunc="mean").reindex(
            index=rows, columns=groups) * scale
        if len(rows) > 1:
            image = ax.imshow(table.to_numpy(float), aspect="auto", cmap=CMAP, interpolation="nearest")
            ax.set_yticks(range(len(rows)), rows)
            ax.grid(False)
            fig.colorbar(image, ax=ax, label=label, shrink=0.9)
            if ax is axes[0]:
                ax.set_ylabel("rewind point")
        else:
            spread = df.groupby("group")[column].std().reindex(groups).fillna(0.0).to_numpy(float) * scale
            ax.bar(range(len(groups)), table.iloc[0].to_numpy(float), yerr=spread if spread.any() else None,
                   color="C0" if column == alone else "C1")
            ax.axhline(0, color="0.6", linewidth=0.7)
            if ax is axes[0]:
                ax.set_ylabel(label)
        ax.set_xticks(range(len(groups)), groups, rotation=60, ha="right", fontsize=8)
        ax.set_xlabel("layer group (from the input)")
        ax.set_title(name, fontsize=9)
    pairs = df["pair"].nunique() if "pair" in df.columns else 1
    suptitle(fig, "Layer-wise barriers", df, title, f"{split} split, mean over {pairs} pair{'s' * (pairs != 1)}")
    return fig


def draw_layers(records: Mapping[str, Any]) -> Iterator[tuple[str, Figure]]:
    """plot_all's kind ``layers``: each run's layer-wise barriers (runs found by ``find_runs``)."""
    runs: Sequence[Any] = [*records.get("layer_runs", []), *records.get("connect_runs", [])]
    for run in runs:
        frame = layer_frames([run])
        if not frame.empty:
            yield f"layers_{run.hash}", plot_layer_barriers(frame)


__all__ = ["draw_layers", "plot_layer_barriers"]
