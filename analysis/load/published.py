"""The papers' published figures beside the suite's measurements.

A preset that reproduces a paper carries ``published`` (``stability presets --json``): Frankle et al. 2020's
dense accuracy and density (Table 1), first stable steps (section 3 and 4.3) and Table 2's accuracies at k = 0.
``compare_published`` finds, for each run of a record frame, the preset whose run settings it has, and puts
each published figure beside the one the run measured. ``analysis`` does not import the presets (it reads
records without the training code): give it the presets table, as a dict or as the JSON file that
``stability presets --json > presets.json`` writes.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from stability.errors import ConfigError
from stability.steps import Step

COMPARE_COLUMNS = ["preset", "run_hash", "quantity", "published", "published_std", "measured", "measured_std",
                   "count", "unit", "source"]
# The run settings a preset is recognised by (those it states); every other setting may differ (seeds, cadence).
IDENTITY = ("dataset.name", "model.name", "model.depth", "model.width", "optimizer.name", "optimizer.lr",
            "schedule.kind", "schedule.warmup", "training.steps", "training.batch_size")
NO_WARMUP = "0it"  # a preset that states no warmup has none


def _presets(presets: Mapping[str, Any] | str | Path) -> dict[str, dict[str, Any]]:
    if isinstance(presets, (str, Path)):
        presets = json.loads(Path(presets).read_text())
    if not isinstance(presets, Mapping):
        raise ConfigError(f"compare_published: presets must be the `stability presets --json` table or its file, "
                          f"got {type(presets).__name__}")
    return {name: dict(tables) for name, tables in presets.items() if isinstance(tables, Mapping)
            and isinstance(tables.get("published"), Mapping)}


def _identity(tables: Mapping[str, Any]) -> dict[str, Any]:
    out = {key: tables[section][name] for key in IDENTITY
           for section, name in [key.split(".", 1)] if isinstance(tables.get(section), Mapping)
           and name in tables[section]}
    out.setdefault("schedule.warmup", NO_WARMUP)
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    return str(a) == str(b)


def preset_of(settings: Mapping[str, Any], presets: Mapping[str, Any] | str | Path) -> str | None:
    """The first preset carrying ``published`` whose stated run settings ``settings`` (``section.key``) all have."""
    for name, tables in _presets(presets).items():
        identity = _identity(tables)
        if all(key not in settings or _same(settings[key], value) for key, value in identity.items()) and \
                any(key in settings for key in identity):
            return name
    return None


def _steps(value: Any) -> Any:
    """A published step in iterations when the paper gives iterations; epochs stay as written (``"18ep"``)."""
    if value is None:
        return math.nan
    step = Step.parse(value, "published")
    return step.iterations if not step.epochs else str(value)


def compare_published(frame: pd.DataFrame, presets: Mapping[str, Any] | str | Path) -> pd.DataFrame:
    """Published figures beside measured ones, one row per (run, quantity), ``COMPARE_COLUMNS``.

    ``frame``: a sweeps frame (``analysis.sweeps``: first stable step, dense runs and IMP's sparse ones) or an
    IMP levels frame (``analysis.imp_levels``: the dense accuracy at level 0, and at the level nearest the
    published density the accuracies of IMP, random reinit and random pruning, against Table 2; only
    rewind-to-0 runs are compared with Table 2). Runs of no preset carrying ``published`` are left out.
    Accuracies are percent; steps are iterations (or the paper's epochs, as a string).
    """
    table = _presets(presets)
    rows: list[dict[str, Any]] = []
    if frame.empty or not table or "run_hash" not in frame.columns:
        return pd.DataFrame(rows, columns=COMPARE_COLUMNS)
    settings_cols = [c for c in frame.columns if "." in c]
    for run, part in frame.groupby("run_hash", sort=False):
        settings = {c: part[c].iloc[0] for c in settings_cols if not pd.isna(part[c].iloc[0])}
        name = preset_of(settings, table)
        if name is None:
            continue
        pub = table[name]["published"]
        cited = pub.get("cited", {})
        base = {"preset": name, "run_hash": run, "published_std": math.nan, "measured_std": math.nan, "count": 1}
        if "first_stable_step" in part.columns:
            sparse = "label" in part.columns and part["label"].notna().any()
            key = "first_stable_step_imp" if sparse else "first_stable_step_dense"
            rows.append({**base, "quantity": key, "published": _steps(pub.get(key)),
                         "measured": float(part["first_stable_step"].iloc[0]), "unit": "iterations",
                         "source": cited.get(key, "")})
        if {"kind", "density", "final_test_accuracy"} <= set(part.columns):
            rows += _table2_rows(part, pub, base, cited)
    return pd.DataFrame(rows, columns=COMPARE_COLUMNS)


def _table2_rows(part: pd.DataFrame, pub: Mapping[str, Any], base: dict[str, Any],
                 cited: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    ok = part[part["status"].fillna("ok") == "ok"] if "status" in part.columns else part

    def accuracy(sel: pd.DataFrame) -> tuple[float, float, int]:
        values = sel["final_test_accuracy"].astype(float) * 100
        return float(values.mean()), float(values.std()) if len(values) > 1 else math.nan, len(values)

    dense = ok[(ok["kind"] == "imp") & (ok["level"] == 0)] if "level" in ok.columns else ok.iloc[0:0]
    if not dense.empty:
        mean, std, n = accuracy(dense)
        rows.append({**base, "quantity": "test_accuracy", "published": pub["test_accuracy_pct"],
                     "published_std": pub.get("test_accuracy_std_pct", math.nan), "measured": mean,
                     "measured_std": std, "count": n, "unit": "percent", "source": cited.get("test_accuracy_pct", "")})
    if "rewind_step" in ok.columns and not (ok["rewind_step"].astype(float) == 0).all():
        return rows  # Table 2 is at k = 0
    t2 = pub.get("table2_k0_pct", {})
    target = pub["density_pct"] / 100
    for kind, column in (("imp", "imp"), ("reinit", "random_reinit"), ("random", "random_pruning")):
        sel = ok[ok["kind"] == kind]
        if sel.empty or column not in t2:
            continue
        nearest = sel.loc[(sel["density"].astype(float) - target).abs().idxmin(), "density"]
        mean, std, n = accuracy(sel[sel["density"] == nearest])
        rows.append({**base, "quantity": f"table2_{column}", "published": t2[column], "measured": mean,
                     "measured_std": std, "count": n, "unit": f"percent at density {float(nearest) * 100:.2f}%",
                     "source": cited.get("table2_k0_pct", "")})
    return rows


def published_steps(comparison: pd.DataFrame) -> dict[str, float]:
    """``{run_hash: published first stable step in iterations}`` of a ``compare_published`` frame (dense runs)."""
    if comparison.empty:
        return {}
    sel = comparison[comparison["quantity"] == "first_stable_step_dense"]
    out = {}
    for run, value in zip(sel["run_hash"], sel["published"]):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value):
            out[str(run)] = float(value)
    return out


__all__ = ["COMPARE_COLUMNS", "compare_published", "preset_of", "published_steps"]
