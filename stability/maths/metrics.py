"""Ticket-search summaries from Sahu et al. ("Not All Lotteries Are Made Equal").

Pure functions over plain pandas DataFrames and sequences. Units, everywhere:

- accuracies are fractions in [0, 1] (0.98, not 98);
- the matching tolerance is in the same units as the accuracies (0.002 = 0.2
  percentage points);
- success rate (SR), accuracy gain (A_gain) and trajectory-length gain
  (TL_gain) are in percent; the LTS score A_gain × SR is therefore in
  percent × percent (a 1% gain that every run finds scores 100).

A *levels* DataFrame has one row per trained network, with columns
``replicate``, ``level`` (0 = dense), ``kind`` (``"imp"``, ``"reinit"`` or
``"random"``), ``density`` and ``test_accuracy``; an IMP record may carry other
accuracy columns (e.g. the early-stopping accuracy), which every function here
can use instead through ``accuracy=``.

Definitions:

- *matching*: a network whose accuracy is >= dense accuracy − tolerance;
- *winning ticket*: a matching IMP network at level > 0;
- *Best Sparse*: the level > 0 with the highest accuracy (ties → the sparser);
- *Sparsest Matching*: the matching level > 0 with the lowest density (it need
  not be preceded by an unbroken run of matching levels);
- SR = runs with at least one winning ticket / runs × 100;
- A_gain = (A_sparse − A_dense) / A_dense × 100;
- LTS = A_gain × SR;
- TL_gain = (TL_sparse − TL_dense) / TL_dense × 100, TL the length of the
  network's output curve for inputs on a circle (Raghu et al. 2017).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from torch import Tensor

# Matching tolerance with a single dense replicate: 0.2 percentage points (as a fraction).
SINGLE_REPLICATE_TOLERANCE = 0.002

# Slack on the matching comparison so that e.g. 0.898 >= 0.900 - 0.002 holds despite float rounding.
_EPS = 1e-12

LEVEL_COLUMNS = ("replicate", "level", "kind", "density")


# ---------------------------------------------------------------------------
# Matching and winning tickets
# ---------------------------------------------------------------------------
def matching(
    levels: pd.DataFrame,
    dense_accuracy: float,
    tolerance: float,
    *,
    accuracy: str = "test_accuracy",
) -> pd.Series:
    """Bool per row: accuracy (fraction) >= ``dense_accuracy`` − ``tolerance`` (same units)."""
    _require(levels, (accuracy,))
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    return (levels[accuracy] >= dense_accuracy - tolerance - _EPS).rename("matching")


def matching_tolerance(dense_accuracies: Sequence[float]) -> float:
    """Std (ddof=1) of the dense accuracies over replicates; 0.002 (0.2 points) with one replicate."""
    values = np.asarray([float(a) for a in dense_accuracies], dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        raise ValueError("matching_tolerance needs at least one dense accuracy")
    if values.size == 1:
        return SINGLE_REPLICATE_TOLERANCE
    return float(np.std(values, ddof=1))


def best_sparse(levels: pd.DataFrame, *, accuracy: str = "test_accuracy") -> dict[str, Any] | None:
    """The row (as a dict) of the level > 0 with the highest accuracy, ties to the sparser; None if none.

    ``levels`` holds one run's rows (one replicate, one kind).
    """
    sparse = _one_run(levels, accuracy)
    sparse = sparse[sparse["level"] > 0]
    if sparse.empty:
        return None
    # Highest accuracy first, then lowest density (sparser), then deepest level.
    ranked = sparse.sort_values(
        [accuracy, *_sparsity_keys(sparse)],
        ascending=[False, *_sparsity_ascending(sparse)],
        kind="mergesort",
    )
    return _row(ranked.iloc[0])


def sparsest_matching(
    levels: pd.DataFrame,
    dense_accuracy: float,
    tolerance: float,
    *,
    accuracy: str = "test_accuracy",
) -> dict[str, Any] | None:
    """The row (as a dict) of the sparsest matching level > 0, or None when no sparse level matches.

    ``levels`` holds one run's rows (one replicate, one kind). Ties in density go
    to the higher accuracy.
    """
    sparse = _one_run(levels, accuracy)
    sparse = sparse[
        (sparse["level"] > 0) & matching(sparse, dense_accuracy, tolerance, accuracy=accuracy)
    ]
    if sparse.empty:
        return None
    ranked = sparse.sort_values(
        [*_sparsity_keys(sparse), accuracy],
        ascending=[*_sparsity_ascending(sparse), False],
        kind="mergesort",
    )
    return _row(ranked.iloc[0])


# ---------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------
def success_rate(runs: Sequence[bool]) -> float:
    """SR in percent: runs that found at least one winning ticket / runs × 100."""
    flags = [bool(r) for r in runs]
    if not flags:
        raise ValueError("success_rate needs at least one run")
    return 100.0 * sum(flags) / len(flags)


def accuracy_gain(a_sparse: float, a_dense: float) -> float:
    """A_gain in percent: (A_sparse − A_dense) / A_dense × 100 (relative, not percentage points)."""
    if a_dense == 0:
        raise ValueError("accuracy_gain is undefined for a dense accuracy of 0")
    return (a_sparse - a_dense) / a_dense * 100.0


def lts_score(a_gain: float, sr: float) -> float:
    """LTS score: A_gain (percent) × SR (percent)."""
    return a_gain * sr


def trajectory_length(
    forward: Callable[[Tensor], Tensor],
    x1: Tensor,
    x2: Tensor,
    n_points: int = 1000,
    *,
    batch_size: int = 250,
) -> float:
    """Length of the output curve of ``forward`` for inputs x(t) = cos(t)·x1 + sin(t)·x2, t in [0, 2π).

    ``x1`` and ``x2`` are single inputs of the same shape (no batch dimension);
    ``forward`` maps a batch ``[B, *x1.shape]`` to outputs (logits) ``[B, ...]``.
    The curve is sampled at t_i = 2π·i/n_points and measured as the closed
    polyline sum_i ||f(x(t_{i+1})) − f(x(t_i))||_2 (t_n = t_0), in the units of the
    outputs. Evaluated under no_grad in batches of ``batch_size``; put a model
    in eval mode first so BatchNorm and dropout do not change along the curve.
    """
    import torch  # here, not at the top: analysis reads records through this module without torch

    if n_points < 3:
        raise ValueError(f"n_points must be >= 3, got {n_points}")
    if x1.shape != x2.shape:
        raise ValueError(
            f"x1 and x2 must have the same shape, got {tuple(x1.shape)} and {tuple(x2.shape)}"
        )
    t = torch.arange(n_points, dtype=torch.float64) * (2 * math.pi / n_points)
    cos, sin = torch.cos(t), torch.sin(t)
    shape = (-1,) + (1,) * x1.dim()
    total = 0.0
    first: Tensor | None = None
    prev: Tensor | None = None
    with torch.no_grad():
        for start in range(0, n_points, batch_size):
            c = cos[start : start + batch_size].to(device=x1.device, dtype=x1.dtype).reshape(shape)
            s = sin[start : start + batch_size].to(device=x1.device, dtype=x1.dtype).reshape(shape)
            out = forward(c * x1.unsqueeze(0) + s * x2.unsqueeze(0))
            out = out.reshape(out.shape[0], -1).double()
            # Carry the last output of the previous batch so segments across batch edges count.
            chain = out if prev is None else torch.cat([prev, out])
            total += float(torch.linalg.vector_norm(chain[1:] - chain[:-1], dim=1).sum())
            if first is None:
                first = out[:1]
            prev = out[-1:]
    assert first is not None and prev is not None
    total += float(torch.linalg.vector_norm(first - prev))  # close the loop: t_{n-1} back to t_0
    return total


def trajectory_length_gain(tl_sparse: float, tl_dense: float) -> float:
    """TL_gain in percent: (TL_sparse − TL_dense) / TL_dense × 100."""
    if tl_dense == 0:
        raise ValueError("trajectory_length_gain is undefined for a dense trajectory length of 0")
    return (tl_sparse - tl_dense) / tl_dense * 100.0


# ---------------------------------------------------------------------------
# Whole ticket search
# ---------------------------------------------------------------------------
def ticket_summary(
    levels: pd.DataFrame,
    *,
    tolerance: float | None = None,
    accuracy: str = "test_accuracy",
    dense_reference: str = "mean",
) -> dict[str, Any]:
    """Sahu et al. summaries of an IMP search over replicates, as a JSON-able dict.

    ``levels`` has columns replicate, level, kind, density and ``accuracy``
    (fractions in [0, 1]), one row per (replicate, kind, level). Definitions:

    - dense accuracy of a replicate: its ``kind == "imp"`` level-0 accuracy;
      ``dense_accuracy`` is their mean over replicates;
    - ``tolerance``: given, or ``matching_tolerance`` of the per-replicate dense
      accuracies (std with ddof=1; 0.002 with one replicate);
    - a row matches when its accuracy >= reference − tolerance, the reference
      being the mean dense accuracy (``dense_reference="mean"``, default) or the
      row's own replicate's dense accuracy (``"replicate"``);
    - per replicate (IMP rows only): matching levels (> 0), Best Sparse,
      Sparsest Matching, whether it found a winning ticket, and A_gain (percent)
      of Best Sparse and Sparsest Matching against the reference;
    - SR (percent) = replicates with a winning ticket / replicates × 100, from
      IMP rows only;
    - aggregate: the same on the mean-over-replicates accuracy per level (density
      also averaged), against the mean dense accuracy, with LTS = A_gain × SR
      for Best Sparse and Sparsest Matching;
    - baselines: for every other kind, the aggregate entries (no SR or LTS:
      only IMP networks count as winning tickets).

    Best Sparse / Sparsest Matching entries are ``{"level", "density",
    "accuracy", "a_gain"}`` (plus ``"lts_score"`` in the aggregate), or None.
    """
    _require(levels, (*LEVEL_COLUMNS, accuracy))
    if dense_reference not in ("mean", "replicate"):
        raise ValueError(f"dense_reference must be 'mean' or 'replicate', got {dense_reference!r}")
    dupes = levels.duplicated(["replicate", "kind", "level"])
    if dupes.any():
        first = levels[dupes].iloc[0]
        raise ValueError(
            f"more than one row for replicate {first['replicate']!r}, kind {first['kind']!r}, level {first['level']!r}"
        )
    imp = levels[levels["kind"] == "imp"]
    if imp.empty:
        raise ValueError("ticket_summary needs rows with kind == 'imp'")
    dense_rows = imp[imp["level"] == 0]
    replicates = list(pd.unique(imp["replicate"]))
    missing = [r for r in replicates if r not in set(dense_rows["replicate"])]
    if missing:
        raise ValueError(f"replicates {missing!r} have no dense (level 0, kind 'imp') row")
    dense_by_rep = {
        r: float(dense_rows.loc[dense_rows["replicate"] == r, accuracy].iloc[0]) for r in replicates
    }
    dense_mean = float(np.mean(list(dense_by_rep.values())))
    tol = matching_tolerance(list(dense_by_rep.values())) if tolerance is None else float(tolerance)

    per_rep: list[dict[str, Any]] = []
    for rep in replicates:
        rows = imp[imp["replicate"] == rep]
        ref = dense_by_rep[rep] if dense_reference == "replicate" else dense_mean
        entry = _run_summary(rows, ref, tol, accuracy)
        per_rep.append({"replicate": _plain(rep), "dense_accuracy": dense_by_rep[rep], **entry})
    sr = success_rate([e["winning"] for e in per_rep])

    aggregate = _run_summary(_mean_curve(imp, accuracy), dense_mean, tol, accuracy)
    aggregate.pop("winning")
    for key in ("best_sparse", "sparsest_matching"):
        if aggregate[key] is not None:
            aggregate[key]["lts_score"] = lts_score(aggregate[key]["a_gain"], sr)

    baselines: dict[str, Any] = {}
    for kind in pd.unique(levels["kind"]):
        if kind == "imp":
            continue
        summary = _run_summary(
            _mean_curve(levels[levels["kind"] == kind], accuracy), dense_mean, tol, accuracy
        )
        summary.pop("winning")
        baselines[str(kind)] = summary

    return {
        "accuracy_column": accuracy,
        "dense_reference": dense_reference,
        "n_replicates": len(replicates),
        "dense_accuracy": dense_mean,
        "tolerance": tol,
        "success_rate": sr,
        "replicates": per_rep,
        "aggregate": aggregate,
        "baselines": baselines,
    }


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------
def _require(frame: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(
            f"levels table lacks column(s) {', '.join(missing)}; it has {', '.join(map(str, frame.columns))}"
        )


def _one_run(levels: pd.DataFrame, accuracy: str) -> pd.DataFrame:
    """Check the table is one run (one replicate, one kind) with a level column."""
    _require(levels, ("level", accuracy))
    for col in ("replicate", "kind"):
        # Picking a best row across replicates or baselines would silently mix runs.
        if col in levels.columns and levels[col].nunique() > 1:
            raise ValueError(
                f"levels table mixes several values of {col!r}; pass one run's rows or use ticket_summary"
            )
    return levels


def _sparsity_keys(frame: pd.DataFrame) -> list[str]:
    return ["density", "level"] if "density" in frame.columns else ["level"]


def _sparsity_ascending(frame: pd.DataFrame) -> list[bool]:
    # Sparser = lower density, then higher level.
    return [True, False] if "density" in frame.columns else [False]


def _plain(value: Any) -> Any:
    """A numpy scalar as the matching Python scalar, so summaries serialize to JSON."""
    return value.item() if isinstance(value, np.generic) else value


def _row(row: pd.Series) -> dict[str, Any]:
    return {str(k): _plain(v) for k, v in row.items()}


def _mean_curve(rows: pd.DataFrame, accuracy: str) -> pd.DataFrame:
    """Mean accuracy and density per level over replicates, one row per level.

    A level's mean accuracy is NaN (so never matching, never best) unless every replicate has an
    accuracy there: a replicate that diverged or never learned counts as a failure, not as missing.
    """
    n = rows["replicate"].nunique()
    grouped = rows.groupby("level")
    out = grouped[["density"]].mean()
    out[accuracy] = grouped[accuracy].agg(lambda s: s.mean() if len(s) == n and s.notna().all() else float("nan"))
    return out.reset_index()


def _point(row: dict[str, Any] | None, dense: float, accuracy: str) -> dict[str, Any] | None:
    if row is None:
        return None
    acc = float(row[accuracy])
    return {
        "level": int(row["level"]),
        "density": float(row["density"]),
        "accuracy": acc,
        "a_gain": accuracy_gain(acc, dense),
    }


def _run_summary(rows: pd.DataFrame, dense: float, tol: float, accuracy: str) -> dict[str, Any]:
    """Matching levels, Best Sparse, Sparsest Matching and winning flag of one accuracy-per-level curve."""
    curve = rows.drop(columns=[c for c in ("replicate", "kind") if c in rows.columns])
    match = matching(curve, dense, tol, accuracy=accuracy) & (curve["level"] > 0)
    matched = sorted(int(v) for v in curve.loc[match, "level"])
    return {
        "matching_levels": matched,
        "winning": bool(matched),
        "best_sparse": _point(best_sparse(curve, accuracy=accuracy), dense, accuracy),
        "sparsest_matching": _point(
            sparsest_matching(curve, dense, tol, accuracy=accuracy), dense, accuracy
        ),
    }
