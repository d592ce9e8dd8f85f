"""Judging a sweep's curves: the barrier of each pair, endpoints at chance, the table over pairs per point, and
the first stable step (pure functions of curve rows; ``stages.instability`` measures and records them).

instability = max_α E(θ(α)) − ½·(E(θ_a) + E(θ_b)) per pair of networks (the error barrier; the loss barrier is the
same formula on the loss). A point is stable when the mean over pairs is below the threshold.
"""
from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from .health import DEFAULT_CHANCE_MARGIN, is_untrained
from .interpolation import error_barrier

__all__ = ["first_stable_step", "flag_curves", "pair_barriers", "sweep_table", "untrained_pairs"]


def first_stable_step(steps: Sequence[int], instabilities: Sequence[float], threshold: float,
                      statuses: Sequence[str] | None = None) -> int | None:
    """First k below threshold that stays below it at every later k (steps ascending).

    With ``statuses``, diverged points are skipped and untrained points count as not stable.
    """
    first = None
    for i, (k, value) in enumerate(zip(steps, instabilities)):
        status = statuses[i] if statuses is not None else "ok"
        if status == "diverged":
            continue
        if status == "ok" and value < threshold:
            if first is None:
                first = k
        else:
            first = None
    return first


def pair_barriers(curves: Sequence[Mapping[str, Any]]) -> dict[tuple[int, str, str], tuple[float, float]]:
    """(rewind_step, split, pair) -> (error barrier, loss barrier) from curve rows sorted by α."""
    grouped: dict[tuple[int, str, str], list[Mapping[str, Any]]] = {}
    for row in curves:
        grouped.setdefault((row["rewind_step"], row["split"], row["pair"]), []).append(row)
    out = {}
    for key, rows in grouped.items():
        rows = sorted(rows, key=lambda r: r["alpha"])
        out[key] = (error_barrier([r["error"] for r in rows]), error_barrier([r["loss"] for r in rows]))
    return out


def untrained_pairs(curves: Sequence[Mapping[str, Any]], chance: Mapping[str, float],
                    margin: float) -> set[tuple[int, str, str]]:
    """(rewind_step, split, pair) whose endpoint (α = 0 or 1) error is within ``margin`` of chance."""
    out = set()
    for row in curves:
        if row["alpha"] in (0.0, 1.0) and is_untrained(row["error"], chance[row["split"]], margin):
            out.add((row["rewind_step"], row["split"], row["pair"]))
    return out


def flag_curves(curves: Sequence[dict[str, Any]], chance: Mapping[str, float], margin: float) -> None:
    """Set each curve row's ``flag``: ``untrained`` for pairs with an endpoint at chance, else empty."""
    bad = untrained_pairs(curves, chance, margin)
    for row in curves:
        row["flag"] = "untrained" if (row["rewind_step"], row["split"], row["pair"]) in bad else ""


def sweep_table(curves: Sequence[Mapping[str, Any]], threshold: float, *, chance: Mapping[str, float] | None = None,
                margin: float = DEFAULT_CHANCE_MARGIN, diverged: Mapping[int, Any] | None = None,
                splits: Sequence[str] = ()) -> list[dict[str, Any]]:
    """sweep.csv rows: mean/std over pairs of the error and loss barriers per (rewind step, split).

    With ``chance`` (split -> chance error), a point with an untrained endpoint is ``untrained`` and not
    stable; points in ``diverged`` (rewind step -> info) get a ``diverged`` row per split in ``splits``.
    """
    by_point: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for (k, split, _), barriers in pair_barriers(curves).items():
        by_point.setdefault((k, split), []).append(barriers)
    bad = {(k, split) for k, split, _ in untrained_pairs(curves, chance, margin)} if chance else set()
    rows = []
    for (k, split), values in sorted(by_point.items()):
        errs = [v[0] for v in values]
        losses = [v[1] for v in values]
        mean = statistics.fmean(errs)
        status = "untrained" if (k, split) in bad else "ok"
        rows.append({
            "rewind_step": k, "split": split, "instability_mean": mean,
            "instability_std": statistics.stdev(errs) if len(errs) > 1 else 0.0,
            "loss_barrier_mean": statistics.fmean(losses),
            "loss_barrier_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "pairs": len(values), "stable": bool(status == "ok" and mean < threshold), "status": status,
        })
    nan = float("nan")
    for k in diverged or {}:
        for split in splits:
            rows.append({"rewind_step": k, "split": split, "instability_mean": nan, "instability_std": nan,
                         "loss_barrier_mean": nan, "loss_barrier_std": nan, "pairs": 0, "stable": False,
                         "status": "diverged"})
    return sorted(rows, key=lambda r: (r["rewind_step"], r["split"]))
