"""Run one unit of a grid (what an executor ships): the unit's stage, its outcome, its failure record."""
from __future__ import annotations

import os
import socket
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import from_dict
from ..errors import ConfigError, TrainingDiverged
from ..store.files import RunDir, write_json
from ..store.schema import HESSIAN, IMP, INSTABILITY, TRAIN, failure_name

__all__ = ["run_unit", "run_units", "unit_complete"]


def run_unit(unit: Mapping[str, Any]) -> dict[str, Any]:
    """Run one unit (a dict, as executors ship it); returns its outcome and never raises for the unit's own errors.

    Outcome: ``{"id", "status": complete | diverged | failed, "error", "seconds", "host", "pid"}``.
    A failure is also written to the grid's ``failures/`` folder (and removed once the unit completes).
    """
    from ..stages.context import prepare
    from ..stages.imp import imp_settings, run_imp
    from ..stages.instability import instability_settings, instability_sweep
    from ..stages.landscape import hessian_settings, hessian_track
    from ..stages.siblings import SiblingSettings, train_siblings
    from ..stages.trunk import train_trunk

    t0 = time.perf_counter()
    cfg = from_dict(unit["config"])
    failure = Path(unit["failures"]) / Path(failure_name(unit["id"])).name if unit.get("failures") else None
    outcome = {"id": unit["id"], "kind": unit["kind"], "host": socket.gethostname(), "pid": os.getpid(),
               "error": None}
    try:
        kind, args = unit["kind"], unit["args"]
        if kind == TRAIN:
            train_trunk(cfg, extra_checkpoints=args["extra_checkpoints"])
        elif kind == "siblings":
            train_siblings(prepare(cfg), args["rewind_step"], SiblingSettings(**args["settings"]))
        elif kind == INSTABILITY:
            instability_sweep(cfg, instability_settings(args["settings"]))
        elif kind == IMP:
            run_imp(cfg, imp_settings(args["settings"]), instability_settings(args["sweep"]))
        elif kind == HESSIAN:
            hessian_track(cfg, hessian_settings(args["settings"]), at=args["at"], every=args["every"])
        else:
            raise ConfigError(f"unknown unit kind {kind!r}")
        outcome["status"] = "complete"
        if failure is not None and failure.is_file():
            failure.unlink()
    except TrainingDiverged as exc:  # a result of its own: recorded in the run, not retried
        outcome.update(status="diverged", error=str(exc))
    except Exception as exc:  # noqa: BLE001 - any error of the unit is recorded on disk and reported, not dropped
        outcome.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        if failure is not None:
            write_json(failure, {**outcome, "traceback": traceback.format_exc(), "time": time.time()})
    outcome["seconds"] = round(time.perf_counter() - t0, 3)
    return outcome



def unit_complete(unit: Mapping[str, Any]) -> bool:
    """Whether a unit (as executors ship it) is complete on its results root."""
    kind, _, run_hash = unit["id"].rpartition("_")
    return RunDir(unit["config"]["runtime"]["results_root"], kind, run_hash).is_complete()



def run_units(units: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Several units one after another (a packed array task); each unit's outcome."""
    return [run_unit(u) for u in units]
