"""Training runs (``train_<hash>/``): metrics over training, NEq's frozen neurons, strong tickets."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from stability.store import schema

from .frames import Source, combine, find_runs, number, read_json, read_table, with_run

TRAINING_COLUMNS = list(schema.METRIC_COLUMNS)


def training_curves(source: Source) -> pd.DataFrame:
    """metrics.csv of every run that has one (trunks): step, member, lr, {train,val,test}_{loss,error}."""
    frames = []
    for run in find_runs(source):
        df = read_table(run.path / schema.METRICS)
        if df is not None:
            frames.append(with_run(df, run, TRAINING_COLUMNS))
    return combine(frames, TRAINING_COLUMNS)


# --------------------------------------------------------------------------- NEq (training.method = neq)
NEQ_RECORD_COLUMNS = [*schema.NEQ_COLUMNS, "test_error", "variant"]


def neq_variant(settings: Mapping[str, Any]) -> str:
    """How a trunk trained, for legends: 'plain', 'NEq', 'random 30%' (random baseline), 'matched random'."""
    if settings.get("training.method", "standard") != "neq":
        return "plain" if settings.get("training.method", "standard") == "standard" else str(settings["training.method"])
    baseline = settings.get("neq.baseline", "none")
    if baseline == "random":
        return f"random {float(settings.get('neq.random_fraction', 0.0)):.0%}"
    return "matched random" if baseline == "matched" else "NEq"


def neq_records(source: Source, include_plain: bool = True) -> pd.DataFrame:
    """neq.csv of every NEq trunk: per NEq evaluation, member and layer (and ``layer = all``), the frozen neurons
    and backward MACs saved, with the test error at that step from metrics.csv and the run's ``variant``.

    metrics.csv rows at steps without an NEq evaluation (the final step) come as ``layer = all`` rows with
    NaN NEq columns. With ``include_plain``, plain trunks (``training.method = standard``) come as
    ``layer = all`` rows with nothing frozen and nothing saved (variant ``plain``), to compare against.
    """
    frames = []
    for run in find_runs(source, schema.TRAIN):
        method = run.settings.get("training.method", "standard")
        metrics = read_table(run.path / schema.METRICS)
        accuracy = None if metrics is None else metrics[["step", "member", "test_error"]]
        if method == "neq":
            df = read_table(run.path / schema.NEQ_RECORDS)
            if df is None:
                continue
            if accuracy is not None:
                on_all = df["layer"] == "all"
                merged = df[on_all].merge(accuracy, on=["step", "member"], how="left")
                rest = accuracy[~accuracy["step"].isin(df["step"])].assign(layer="all")
                df = pd.concat([df[~on_all], merged, rest], ignore_index=True, sort=False)
        elif method == "standard" and include_plain and accuracy is not None:
            df = accuracy.assign(layer="all", frozen=0, frozen_fraction=0.0, macs_saved=0, saved_fraction=0.0)
        else:
            continue
        df = df.sort_values(["step", "member"], kind="stable").reset_index(drop=True)
        df["variant"] = neq_variant(run.settings)
        frames.append(with_run(df, run, NEQ_RECORD_COLUMNS))
    return combine(frames, NEQ_RECORD_COLUMNS)


# --------------------------------------------------------------------------- strong lottery tickets
# One row per trunk run that trains scores over frozen weights (training.method in schema.STRONG_METHODS).
STRONG_COLUMNS = ["method", "kept", "density", "final_test_accuracy", "final_step", "init_seed"]


def strong_tickets(source: Source, include_dense: bool = False) -> pd.DataFrame:
    """Strong-ticket train runs: test accuracy at the final step against the fraction of weights kept.

    ``method`` is edgepopup or supermask; ``kept`` is edge-popup's setting (``strong.kept``; NaN for the
    supermask, whose density is learned); ``density`` is the evaluation mask's fraction of weights kept, as the
    trainer recorded it in summary.json (``"mask_density"``; NaN for records written before summaries carried
    it: the weights are never loaded here). ``include_dense=True`` adds plain training runs (``standard``,
    kept = density = 1). Runs without a final summary (still going) are left out.
    """
    frames = []
    for run in find_runs(source, schema.TRAIN):
        summary = read_json(run.path / schema.SUMMARY)
        method = str(summary.get("method") or run.settings.get("training.method", "standard"))
        if method not in schema.STRONG_METHODS and not (include_dense and method == "standard"):
            continue
        if "final_test_accuracy" not in summary:
            continue
        density, kept = 1.0, 1.0
        if method in schema.STRONG_METHODS:
            density = number(summary.get("mask_density"))
            kept = number(run.settings.get("strong.kept")) if method == "edgepopup" else float("nan")
        row = {"method": method, "kept": kept, "density": density,
               "final_test_accuracy": number(summary.get("final_test_accuracy")),
               "final_step": number(summary.get("final_step")),
               "init_seed": run.settings.get("training.init_seed", 0)}
        frames.append(with_run(pd.DataFrame([row]), run, STRONG_COLUMNS))
    return combine(frames, STRONG_COLUMNS)


__all__ = ["NEQ_RECORD_COLUMNS", "STRONG_COLUMNS", "TRAINING_COLUMNS", "neq_records", "neq_variant",
           "strong_tickets", "training_curves"]
