"""A finished IMP run: its result, the ticket summaries of ``imp.json``, and reading a finished run back."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ...config import Config
from ...errors import RecordError
from ...maths.metrics import lts_score, ticket_summary, trajectory_length_gain
from ...store.files import RunDir, read_csv, read_json, write_csv, write_json
from ...store.schema import IMP_SUMMARY, LEVEL_COLUMNS, LEVELS, MASKS
from .masks import MaskSource
from .settings import ImpSettings


@dataclass
class ImpResult:
    """An IMP run: one row per (replicate, level, kind) and the ticket summaries."""

    run_dir: Path
    rewind_step: int
    levels: list[dict[str, Any]] = field(repr=False)
    summary: dict[str, Any] = field(repr=False)

    def dataframe(self):
        """levels.csv as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.levels)


def _where(run: RunDir) -> dict[str, str]:
    """Where an IMP run's records are (in its summary and ``imp --json``)."""
    return {"run_dir": str(run.path), "levels_csv": str(run / LEVELS), "masks_dir": str(run / MASKS)}


def load_result(run: RunDir) -> ImpResult:
    """A finished run read back from its ``imp.json`` and ``levels.csv`` (RecordError: missing or damaged)."""
    try:
        summary = {**read_json(run / IMP_SUMMARY), **_where(run)}  # the run may have been moved since
        return ImpResult(run.path, summary["rewind_step"], read_csv(run / LEVELS), summary)
    except (FileNotFoundError, KeyError) as exc:
        raise RecordError(f"finished IMP run {run.path.name} lacks a readable {IMP_SUMMARY} or {LEVELS} "
                          f"({type(exc).__name__}: {exc})") from None


def finish(run: RunDir, cfg: Config, settings: ImpSettings, rows: list[dict[str, Any]], rewind_step: int,
           rewind_info: dict[str, Any], source: MaskSource | None, t0: float) -> ImpResult:
    """Write every row and the summary (``t0``: when the run started, ``time.perf_counter``); ``run_once`` then
    marks the run complete."""
    # every row with every column, as levels.csv gives them back to a rerun ("" where a row has no value)
    rows = [{**dict.fromkeys(LEVEL_COLUMNS, ""), **row} for row in rows]
    summary = _summarize(rows, settings, rewind_step, rewind_info, cfg)
    summary["mask_source"] = source.info if source is not None else "own"
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    summary.update(_where(run))
    write_csv(run / LEVELS, rows, LEVEL_COLUMNS)
    write_json(run / IMP_SUMMARY, summary)
    return ImpResult(run.path, rewind_step, rows, summary)


def _tickets(frame, accuracy: str) -> dict[str, Any]:
    """``ticket_summary`` over the replicates whose dense network is a result (trained, finite).

    A replicate whose dense network diverged or never learned has no reference to match: it finds
    no winning ticket (it counts in the success rate's denominator) and is listed as excluded.
    """
    replicates = sorted(set(frame["replicate"]))
    dense = frame[(frame["kind"] == "imp") & (frame["level"] == 0)]
    usable = sorted(set(dense.loc[dense[accuracy].notna(), "replicate"]))
    excluded = [r for r in replicates if r not in usable]
    if not usable:
        return {"accuracy_column": accuracy, "n_replicates": len(replicates), "dense_accuracy": float("nan"),
                "tolerance": float("nan"), "success_rate": 0.0, "replicates": [], "excluded_replicates": excluded,
                "aggregate": {"matching_levels": [], "best_sparse": None, "sparsest_matching": None},
                "baselines": {}, "note": "no dense network is a result (diverged or untrained): nothing can match"}
    tickets = ticket_summary(frame[frame["replicate"].isin(usable)], accuracy=accuracy)
    if excluded:
        tickets["success_rate"] = tickets["success_rate"] * len(usable) / len(replicates)
        for key in ("best_sparse", "sparsest_matching"):
            point = tickets["aggregate"].get(key)
            if point is not None:
                point["lts_score"] = lts_score(point["a_gain"], tickets["success_rate"])
        tickets["n_replicates"] = len(replicates)
    tickets["excluded_replicates"] = excluded
    return tickets


def _summarize(rows: list[dict[str, Any]], settings: ImpSettings, rewind_step: int, rewind_info: dict[str, Any],
               cfg: Config) -> dict[str, Any]:
    """imp.json: the settings, how the rewind step was chosen, flagged networks, tickets and trajectory lengths."""
    import pandas as pd

    frame = pd.DataFrame(rows).rename(columns={"final_test_accuracy": "test_accuracy"})
    # Diverged and untrained networks are not results: no accuracy, so never matching and never best.
    bad = frame["status"] != "ok" if "status" in frame else pd.Series(False, index=frame.index)
    frame.loc[bad, ["test_accuracy", "early_stop_test_accuracy"]] = float("nan")
    flagged = [{"replicate": row["replicate"], "level": row["level"], "kind": row["kind"], "status": row["status"]}
               for row in rows if row.get("status", "ok") != "ok"]
    summary: dict[str, Any] = {"settings": asdict(settings), "rewind_step": rewind_step, "rewind": rewind_info,
                               "flagged": flagged,
                               "config": cfg.to_dict(), "target_density": (1 - settings.prune_fraction) ** settings.levels}
    if settings.supermask:
        summary["supermask"] = [{k: row[k] for k in ("replicate", "level", "density", "supermask_test_accuracy")}
                                for row in rows if row.get("supermask_test_accuracy", "") != ""]
    summary["tickets"] = _tickets(frame, "test_accuracy")
    summary["tickets_early_stop"] = _tickets(frame, "early_stop_test_accuracy")
    # Trajectory-length gains of Best Sparse and Sparsest Matching (aggregate), against the dense network.
    imp = frame[frame["kind"] == "imp"]
    tl = imp.groupby("level")["trajectory_length"].mean()
    gains = {}
    for key in ("best_sparse", "sparsest_matching"):
        point = summary["tickets"]["aggregate"].get(key)
        if point is not None and not math.isnan(tl.get(0, float("nan"))):
            gains[key] = {"level": point["level"], "trajectory_length": float(tl[point["level"]]),
                          "tl_gain": trajectory_length_gain(float(tl[point["level"]]), float(tl[0]))}
    summary["trajectory_length"] = {"dense": float(tl.get(0, float("nan"))), **gains}
    return summary


__all__ = ["ImpResult", "finish", "load_result"]
