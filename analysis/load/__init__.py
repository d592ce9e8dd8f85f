"""Records on disk to tidy pandas DataFrames, one module per record family.

Point any loader at a results root (every ``<kind>_<hash>/`` run directory below
it is read), at a single run directory, or at a list of either. Each record
frame carries the run's ``run_kind`` and ``run_hash`` and the run's settings
flattened as ``section.key`` columns (``model.name``, ``optimizer.lr``,
``instability.siblings``, ...), so one :func:`filter` call selects by any
setting. Stage runs (instability, imp, hessian, siblings) store the trunk's
whole config under ``training``; it is lifted to the top level so that every
run answers to the same ``model.name``.

Record frames use ``run_kind``/``run_hash`` rather than ``kind``/``hash``
because ``levels.csv`` already has a ``kind`` column (imp | reinit | random).

A missing optional file gives an empty frame with the right columns, never an
error: a run that is still going has written only part of its records.

- ``frames``: discovery, the ``runs`` table, ``filter``, ``aggregate``, ``settings_of``;
- ``curves``: instability sweeps (``interpolation_curves``, ``sweeps``);
- ``tickets``: IMP levels and early-bird tickets;
- ``landscape``: Hessian tracks and spectral densities;
- ``training``: metrics over training, NEq records, strong tickets;
- ``published``: the papers' published figures (a preset's ``published``) beside the measured ones.

Only the run store's schema is needed from ``stability``: reading records imports no torch.
"""
from __future__ import annotations

from .curves import CURVE_COLUMNS, SWEEP_COLUMNS, interpolation_curves, sweeps
from .fitted import CURVE_BARRIER_COLUMNS, FITTED_CURVE_COLUMNS, curve_barriers, fitted_curves
from .frames import (
    META_COLUMNS,
    RUN_COLUMNS,
    Run,
    Source,
    aggregate,
    filter,
    find_runs,
    flatten_settings,
    hashed_keys,
    runs,
    settings_of,
)
from .landscape import DENSITY_COLUMNS, HESSIAN_COLUMNS, hessian_densities, hessian_tracks
from .plane import PLANE_COLUMNS, PLANE_POINT_COLUMNS, plane_grids, plane_points
from .published import COMPARE_COLUMNS, compare_published, preset_of, published_steps
from .tickets import (
    EARLYBIRD_DISTANCE_COLUMNS,
    EARLYBIRD_INFO,
    EARLYBIRD_POINT_COLUMNS,
    LEVEL_COLUMNS,
    earlybird_distances,
    earlybird_points,
    imp_levels,
)
from .training import (
    NEQ_RECORD_COLUMNS,
    STRONG_COLUMNS,
    TRAINING_COLUMNS,
    neq_records,
    neq_variant,
    strong_tickets,
    training_curves,
)

__all__ = [
    "COMPARE_COLUMNS",
    "CURVE_BARRIER_COLUMNS",
    "CURVE_COLUMNS",
    "DENSITY_COLUMNS",
    "EARLYBIRD_DISTANCE_COLUMNS",
    "EARLYBIRD_INFO",
    "EARLYBIRD_POINT_COLUMNS",
    "FITTED_CURVE_COLUMNS",
    "HESSIAN_COLUMNS",
    "LEVEL_COLUMNS",
    "META_COLUMNS",
    "NEQ_RECORD_COLUMNS",
    "PLANE_COLUMNS",
    "PLANE_POINT_COLUMNS",
    "RUN_COLUMNS",
    "STRONG_COLUMNS",
    "SWEEP_COLUMNS",
    "TRAINING_COLUMNS",
    "Run",
    "Source",
    "aggregate",
    "compare_published",
    "curve_barriers",
    "earlybird_distances",
    "earlybird_points",
    "filter",
    "find_runs",
    "fitted_curves",
    "flatten_settings",
    "hashed_keys",
    "hessian_densities",
    "hessian_tracks",
    "imp_levels",
    "interpolation_curves",
    "neq_records",
    "neq_variant",
    "plane_grids",
    "plane_points",
    "preset_of",
    "published_steps",
    "runs",
    "settings_of",
    "strong_tickets",
    "sweeps",
    "training_curves",
]
