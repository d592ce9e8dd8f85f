"""Figures in the style of the papers, from the frames of :mod:`analysis.load`, one module per figure family.

- ``style``: the Figure class, the ``save=`` decorator, titles and shared axes (``saving``: formats and files);
- ``curves``: linear mode connectivity (interpolation curves, instability vs rewind step, alignment);
- ``tickets``: IMP, rewind points, ticket designs, supermasks, matching vs stable (``strong``: strong tickets);
- ``baselines``: LR rewinding, fine-tuning, pruning at initialization and their sanity checks beside IMP;
- ``landscape``: Hessian eigenvalues, trace and spectral density;
- ``training``: training curves, early-bird mask distances, NEq.

``FIGURES`` is the one table of the kinds :func:`plot_all` (and ``stability plot --kind``) draws: what each
shows, the record frames it reads (``RECORDS``) and the family function that draws it. This module imports
neither matplotlib nor pandas: ``stability --help`` reads ``KINDS`` from here, and the figure functions
(``analysis.figures.plot_imp``, ...) are imported from their family on first use.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stability.errors import ConfigError

from .saving import FORMATS, STYLE, check_formats, save_figure

if TYPE_CHECKING:
    from ..load import Source


@dataclass(frozen=True)
class FigureKind:
    """One kind of figure of :func:`plot_all`: what it shows, the record frames it reads, and who draws it.

    ``draw`` names a function of the module ``family`` that takes ``{name: frame}`` for the names in ``needs``
    and yields ``(file stem, figure)`` pairs.
    """

    shows: str
    needs: tuple[str, ...]
    family: str
    draw: str


# The record frames figures are drawn from: name -> (function of analysis.load, its keyword arguments). Each is
# loaded once per plot_all, however many kinds read it. Sparse-network sweeps made by IMP are left out of the
# curves and sweeps: they are drawn as IMP instability plots, not as sweeps of their own.
RECORDS: dict[str, tuple[str, dict[str, Any]]] = {
    "dense_curves": ("interpolation_curves", {"include_sparse": False}),
    "dense_sweeps": ("sweeps", {"include_sparse": False}),
    "imp_levels": ("imp_levels", {}),
    "imp_runs": ("find_runs", {"kind": "imp"}),
    "train_runs": ("find_runs", {"kind": "train"}),
    "strong_tickets": ("strong_tickets", {"include_dense": True}),
    "hessian_tracks": ("hessian_tracks", {}),
    "hessian_densities": ("hessian_densities", {}),
    "training_curves": ("training_curves", {}),
    "earlybird_distances": ("earlybird_distances", {}),
    "neq_records": ("neq_records", {}),
    "layer_runs": ("find_runs", {"kind": "layers"}),
    "connect_runs": ("find_runs", {"kind": "connect"}),
    "fitted_curves": ("fitted_curves", {}),
    "plane_grids": ("plane_grids", {}),
    "plane_points": ("plane_points", {}),
}

FIGURES: dict[str, FigureKind] = {
    "curves": FigureKind("interpolation curves", ("dense_curves",), "curves", "draw_curves"),
    "sweep": FigureKind("instability vs rewind step", ("dense_sweeps",), "curves", "draw_sweep"),
    "imp": FigureKind("lottery-ticket levels and rewind comparisons (and strong tickets beside them)",
                      ("imp_levels", "imp_runs", "strong_tickets", "train_runs"), "tickets", "draw_imp"),
    "hessian": FigureKind("eigenvalues, trace and spectral density", ("hessian_tracks", "hessian_densities"),
                          "landscape", "draw_hessian"),
    "training": FigureKind("loss and error curves", ("training_curves",), "training", "draw_training"),
    "earlybird": FigureKind("early-bird mask distances", ("earlybird_distances",), "training", "draw_earlybird"),
    "neq": FigureKind("frozen neurons and FLOPs saved over training", ("neq_records",), "training", "draw_neq"),
    "layers": FigureKind("layer-wise barriers per layer (and rewind point)", ("layer_runs", "connect_runs"), "layers",
                         "draw_layers"),
    "curve": FigureKind("fitted curve vs straight line (error and loss along t)", ("fitted_curves",), "curve",
                        "draw_curve"),
    "plane": FigureKind("loss-landscape planes (filled contours, networks marked)", ("plane_grids", "plane_points"),
                        "plane", "draw_plane"),
    "baselines": FigureKind("accuracy vs weights remaining per strategy and retraining, with sanity checks; "
                            "layer-wise densities", ("imp_levels", "imp_runs"), "baselines", "draw_baselines"),
}
KINDS = (*FIGURES, "all")


def check_kinds(kinds: str | Iterable[str]) -> tuple[str, ...]:
    """Validated figure kinds for :func:`plot_all` (those of ``FIGURES``, or ``all``); a comma-joined string too."""
    items = kinds.split(",") if isinstance(kinds, str) else list(kinds)
    out = tuple(dict.fromkeys(k.strip().lower() for k in items if k.strip()))
    bad = [k for k in out if k not in KINDS]
    if bad or not out:
        raise ConfigError(f"--kind: unknown kind {bad[0] if bad else '(none)'!r}; choose from {', '.join(KINDS)}")
    return tuple(FIGURES) if "all" in out else out


def plot_all(results_root: Source, out_dir: str | os.PathLike[str], formats: str | Iterable[str] = FORMATS,
             kinds: str | Iterable[str] = ("all",)) -> list[Path]:
    """Every figure the records under ``results_root`` allow, written to ``out_dir``; returns the files written.

    ``results_root`` is a results root, a run directory, or a list of either. The kinds are drawn in the order
    of ``FIGURES``; each record frame they need is read once.
    """
    formats = check_formats(formats)
    wanted = check_kinds(kinds)
    import matplotlib

    from .. import load
    from . import baselines, curve, curves, landscape, layers, plane, tickets, training

    families = {module.__name__.rpartition(".")[2]: module
                for module in (baselines, curve, curves, landscape, layers, plane, tickets, training)}
    frames: dict[str, Any] = {}

    def frame(name: str) -> Any:
        if name not in frames:
            loader, kwargs = RECORDS[name]
            frames[name] = getattr(load, loader)(results_root, **kwargs)
        return frames[name]

    out = Path(out_dir)
    written: list[Path] = []
    with matplotlib.rc_context(STYLE):
        for kind, entry in FIGURES.items():
            if kind not in wanted:
                continue
            draw = getattr(families[entry.family], entry.draw)
            for stem, fig in draw({name: frame(name) for name in entry.needs}):
                written.extend(save_figure(fig, out / stem, formats))
    return written


def __getattr__(name: str) -> Any:
    """The figure functions and helpers of the families, imported (with matplotlib) on first use."""
    if name in __all__:
        from . import curves, landscape, strong, style, tickets, training

        for module in (curves, landscape, strong, style, tickets, training):
            if name in module.__all__:
                return getattr(module, name)
    raise AttributeError(f"module 'analysis.figures' has no attribute {name!r}")


__all__ = [
    "DESIGN_COLUMNS",
    "FIGURES",
    "FORMATS",
    "KINDS",
    "RECORDS",
    "STYLE",
    "YSCALES",
    "FigureKind",
    "PaperFigure",
    "alignment_of",
    "check_formats",
    "check_kinds",
    "describe",
    "design_labels",
    "eos_threshold",
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
    "save_figure",
]
