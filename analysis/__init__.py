"""analysis: results on disk to pandas DataFrames and matplotlib figures.

Loading (pandas only) is imported here; figures (matplotlib) live in
``analysis.figures`` and are imported on first use, so reading records in a
script that never plots does not pay for matplotlib.
"""
from __future__ import annotations

from typing import Any

from .load import (
    Run,
    aggregate,
    earlybird_distances,
    earlybird_points,
    filter,
    find_runs,
    flatten_settings,
    hessian_densities,
    hessian_tracks,
    imp_levels,
    interpolation_curves,
    neq_records,
    runs,
    settings_of,
    strong_tickets,
    sweeps,
    training_curves,
)

_FIGURES = ("plot_interpolation", "plot_instability", "plot_imp", "plot_imp_early_stop", "plot_rewind_comparison",
            "plot_hessian", "plot_density", "plot_training", "plot_all", "save_figure", "eos_threshold",
            "plot_alignment_curves", "plot_instability_by_alignment", "plot_matching_vs_instability", "plot_strong_tickets",
            "plot_ticket_design", "plot_supermask", "plot_earlybird_distances", "plot_neq")


def __getattr__(name: str) -> Any:
    if name in _FIGURES:
        from . import figures

        return getattr(figures, name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")


__all__ = [
    "Run",
    "aggregate",
    "earlybird_distances",
    "earlybird_points",
    "eos_threshold",
    "filter",
    "find_runs",
    "flatten_settings",
    "hessian_densities",
    "hessian_tracks",
    "imp_levels",
    "interpolation_curves",
    "neq_records",
    "plot_alignment_curves",
    "plot_all",
    "plot_density",
    "plot_earlybird_distances",
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
    "runs",
    "save_figure",
    "settings_of",
    "strong_tickets",
    "sweeps",
    "training_curves",
]
