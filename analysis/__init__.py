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
    filter,
    find_runs,
    flatten_settings,
    hessian_densities,
    hessian_tracks,
    imp_levels,
    interpolation_curves,
    runs,
    settings_of,
    sweeps,
    training_curves,
)

_FIGURES = ("plot_interpolation", "plot_instability", "plot_imp", "plot_imp_early_stop", "plot_rewind_comparison",
            "plot_hessian", "plot_density", "plot_training", "plot_all", "save_figure", "eos_threshold",
            "plot_alignment_curves", "plot_instability_by_alignment", "plot_matching_vs_instability")


def __getattr__(name: str) -> Any:
    if name in _FIGURES:
        from . import figures

        return getattr(figures, name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")


__all__ = [
    "Run",
    "aggregate",
    "eos_threshold",
    "filter",
    "find_runs",
    "flatten_settings",
    "hessian_densities",
    "hessian_tracks",
    "imp_levels",
    "interpolation_curves",
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
    "plot_rewind_comparison",
    "plot_training",
    "runs",
    "save_figure",
    "settings_of",
    "sweeps",
    "training_curves",
]
