"""analysis: results on disk to pandas DataFrames and matplotlib figures.

Loading (pandas) lives in ``analysis.load`` and figures (matplotlib) in ``analysis.figures``; the names below
are imported from them on first use, so ``import analysis`` is free, reading records in a script that never
plots does not pay for matplotlib, and neither needs torch: of ``stability`` they read only the run store's
schema, the step names, the errors and the ticket metrics.
"""
from __future__ import annotations

from typing import Any

__all__ = [
    "Run",
    "aggregate",
    "compare_published",
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


def __getattr__(name: str) -> Any:
    """A loader from ``analysis.load`` or a figure function from ``analysis.figures``, imported on first use."""
    if name in __all__:
        from . import load

        if name in load.__all__:
            return getattr(load, name)
        from . import figures

        return getattr(figures, name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
