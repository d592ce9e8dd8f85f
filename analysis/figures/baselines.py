"""The pruning baselines lottery tickets are compared with (Renda et al. 2020; Frankle et al. 2021): test accuracy vs
weights remaining, one line per strategy and retraining (IMP with weight rewinding, LR rewinding, fine-tuning;
SNIP, GraSP, SynFlow; random pruning), the sanity checks (layer shuffle, inverted scores) dashed and dotted; and
the layer-wise densities each strategy leaves. A method and its sanity checks share a colour.

The ``random`` baseline of a run is that run's own mask shuffled within each layer at every level (Frankle et al.
2021's protocol), labelled '<method> + layer shuffle (per level)'; ``mask_shuffle = layer`` on a magnitude
strategy keeps the shuffled mask in the lineage, labelled '+ layer shuffle (in lineage)' (the loss compounds
from level to level). Pruning at initialization prunes each level afresh, so its '+ layer shuffle' is per level.

``draw_baselines`` is plot_all's kind ``baselines``: drawn when the IMP runs under a root differ in strategy,
retraining or sanity check.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from stability.store import schema

from ..load.frames import read_json

_STRATEGY_NAMES = {"snip": "SNIP", "grasp": "GraSP", "synflow": "SynFlow", "random": "random pruning",
                   "lamp": "LAMP", "global": "IMP", "layerwise": "IMP layerwise"}
_RETRAIN_NAMES = {"rewind": "weight rewinding", "lr_rewind": "LR rewinding", "finetune": "fine-tuning"}
_PAI = ("snip", "grasp", "synflow")


def _flag(value: Any) -> bool:
    return str(value).strip().lower() in ("true", "1", "1.0")


def method_label(row: Mapping[str, Any]) -> str:
    """'IMP (LR rewinding)', 'SynFlow + layer shuffle', ... from a sparse row of levels.csv; a ``random`` row is
    its run's method with its mask shuffled per level ('... + layer shuffle (per level)')."""
    strategy = str(row.get("strategy") or "global")
    if row.get("kind") == "random":
        return method_label({**row, "kind": "imp"}) + " + layer shuffle (per level)"
    if row.get("kind") == "reinit":
        return "random reinitialization"
    name = _STRATEGY_NAMES.get(strategy, strategy)
    retrain = str(row.get("retrain") or "rewind")
    if strategy in ("global", "layerwise", "lamp"):
        name = f"{name} ({_RETRAIN_NAMES.get(retrain, retrain)})"
    if str(row.get("mask_shuffle") or "none") == "layer":
        name += " + layer shuffle" if strategy in _PAI else " + layer shuffle (in lineage)"
    if _flag(row.get("invert_scores")):
        name += " + inverted scores"
    return name


def labelled(levels: pd.DataFrame) -> pd.DataFrame:
    """The sparse rows of ``levels`` with their ``method`` label (baselines pooled over runs)."""
    sparse = levels[pd.to_numeric(levels["level"], errors="coerce") > 0].copy()
    sparse["method"] = [method_label(r) for r in sparse.to_dict("records")]
    return sparse


def _style(method: str, colours: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Dashed: a layer shuffle in the lineage or of pruning at initialization; dash-dot: a per-level shuffle of IMP;
    dotted: inverted scores. ``colours``: one colour per method before its sanity checks."""
    style: dict[str, Any] = {"linestyle": "-"}
    if "inverted" in method:
        style["linestyle"] = ":"
    elif "(per level)" in method and method.split(" ", 1)[0] not in ("SNIP", "GraSP", "SynFlow"):
        style["linestyle"] = "-."
    elif "layer shuffle" in method:
        style["linestyle"] = "--"
    if method.startswith("random"):
        style["color"] = "0.4"
    elif colours is not None:
        style["color"] = colours[method.split(" + ", 1)[0]]
    return style


def _colours(methods: Sequence[str]) -> dict[str, Any]:
    """One colour per method before its sanity checks (' + ...'), in order of first appearance."""
    from matplotlib import colormaps

    bases = list(dict.fromkeys(m.split(" + ", 1)[0] for m in methods))
    cmap = colormaps["tab10" if len(bases) <= 10 else "tab20"]
    return {b: cmap(i % cmap.N) for i, b in enumerate(bases)}


def plot_pruning_baselines(levels: pd.DataFrame, value: str = "final_test_accuracy", *,
                           title: str | None = None) -> Figure:
    """Test accuracy (mean ± std over replicates) vs weights remaining (%, log scale), one line per method; the
    dense networks' mean accuracy as a horizontal line."""
    sparse = labelled(levels)
    sparse[value] = pd.to_numeric(sparse[value], errors="coerce")
    sparse["density"] = pd.to_numeric(sparse["density"], errors="coerce")
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot()
    groups = sorted(sparse.groupby("method"), key=lambda kv: kv[0])
    colours = _colours([m for m, _ in groups])
    for method, df in groups:
        stats = df.groupby("level").agg(density=("density", "mean"), mean=(value, "mean"), std=(value, "std"))
        ax.errorbar(100 * stats["density"], 100 * stats["mean"], yerr=100 * stats["std"].fillna(0.0), label=method,
                    marker="o", markersize=3, capsize=2, **_style(method, colours))
    dense = pd.to_numeric(levels.loc[pd.to_numeric(levels["level"], errors="coerce") == 0, value], errors="coerce")
    if dense.notna().any():
        ax.axhline(100 * dense.mean(), color="k", linewidth=0.8, label="dense")
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("Weights remaining (%)")
    ax.set_ylabel("Test accuracy (%)" if value != "early_stop_test_accuracy" else "Test accuracy at early stopping (%)")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    ax.set_title(title or "Pruning baselines: retraining, pruning at initialization, sanity checks")
    fig.tight_layout()
    return fig


def layer_density_frame(levels: pd.DataFrame, runs: Sequence[Any]) -> pd.DataFrame:
    """Per run, replicate, level and layer: the ticket's layer density (from each level's record), with its method."""
    sparse = labelled(levels)
    sparse = sparse[sparse["kind"] == "imp"]
    paths = {run.hash: run.path for run in runs}
    rows = []
    for (run, rep, level), df in sparse.groupby(["run_hash", "replicate", "level"]):
        if run not in paths:
            continue
        record = read_json(paths[run] / schema.level_dir(int(rep)) / f"level_{int(level)}" / schema.LEVEL_RECORD)
        for layer, d in (record.get("layer_densities") or {}).items():
            rows.append({"run_hash": run, "replicate": int(rep), "level": int(level), "method": df["method"].iloc[0],
                         "density": float(df["density"].mean()), "layer": layer, "layer_density": float(d)})
    return pd.DataFrame(rows, columns=["run_hash", "replicate", "level", "method", "density", "layer", "layer_density"])


def plot_layer_densities(frame: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Each method's layer densities at its sparsest level (mean over replicates), one line per method."""
    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.add_subplot()
    layers = list(dict.fromkeys(frame["layer"]))
    groups = sorted(frame.groupby("method"), key=lambda kv: kv[0])
    colours = _colours([m for m, _ in groups])
    for method, df in groups:
        last = df[df["level"] == df["level"].max()]
        mean = last.groupby("layer")["layer_density"].mean().reindex(layers)
        ax.plot(np.arange(len(layers)), 100 * mean.to_numpy(), marker="o", label=method, **_style(method, colours))
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(layers)), layers, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("Weights remaining in the layer (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax.set_title(title or "Layer-wise density at each method's sparsest level")
    fig.tight_layout()
    return fig


def draw_baselines(records: Mapping[str, Any]) -> Iterator[tuple[str, Figure]]:
    """The comparison of every IMP run under the root, when they differ in strategy, retraining or sanity check."""
    levels = records["imp_levels"]
    if levels is None or levels.empty or "strategy" not in levels.columns:
        return
    sparse = labelled(levels)
    if sparse.empty or sparse.loc[sparse["kind"] == "imp", "method"].nunique() < 2:
        return
    yield "pruning_baselines", plot_pruning_baselines(levels)
    frame = layer_density_frame(levels, records["imp_runs"])
    if not frame.empty:
        yield "pruning_baselines_layer_densities", plot_layer_densities(frame)


__all__ = ["draw_baselines", "layer_density_frame", "method_label", "plot_layer_densities", "plot_pruning_baselines"]
