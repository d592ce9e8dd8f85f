"""Layer-wise barriers (Adilova et al. 2024) of the run store's networks: of two connected networks
(``stability connect --layers``, through ``layer_rows``) and of every pair of siblings at every rewind point of a
finished instability sweep (``layer_sweep``).

One row per (rewind step, pair, split, group): the barrier of interpolating that group alone (the rest at network
a) and of interpolating every group up to it from the input (``lmc.layers``). A sweep's layer-wise barriers are a
run of their own, ``layers_<hash>/`` (``layers.csv``, ``layers.json``), named by the sweep's run and the grouping;
rewind points already measured are kept, so a killed run resumes. Dense sweeps only: a sparse (IMP) sweep's
siblings are not read here.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import Tensor

from ..config import Config, settings_hash
from ..config.nested import flat_settings
from ..engine import StackedModel
from ..errors import ConfigError
from ..lmc.layers import GROUPINGS, LayerBarriers, layer_curves, layer_groups
from ..maths.interpolation import (
    CurveSettings,
    align_pair,
    alignment_subset,
    pairs,
    seeded_bn_batches,
)
from ..maths.paths import Batches
from ..steps import INDEPENDENT_STEP
from ..store.files import PointTable, RunDir, read_record, write_json
from ..store.schema import LAYER_COLUMNS, LAYERS, LAYERS_SUMMARY, LAYERS_TABLE
from .base import run_once
from .context import Context, prepare
from .instability import InstabilitySettings, independent_members, instability_sweep
from .siblings import train_siblings


def check_layers(groups: str, curve: CurveSettings, section: str) -> None:
    """ConfigError (naming ``section``'s settings) for a grouping that does not exist, or REPAIR, which renormalizes
    the whole interpolated network and so has no layer-wise form."""
    if groups not in GROUPINGS:
        raise ConfigError(f"{section}.layer_groups: unknown grouping {groups!r}; choose one of {', '.join(GROUPINGS)}")
    if curve.repair:
        raise ConfigError(f"{section}.layers: layer-wise barriers are measured without REPAIR (it renormalizes the "
                          "whole network); drop repair, or measure the layers in a run of their own")


def layer_rows(ctx: Context, a: Mapping[str, Tensor], b: Mapping[str, Tensor], curve: CurveSettings,
               splits: Sequence[str], groups: str = "layers", *, sm: StackedModel | None = None,
               rewind_step: Any = "", pair: str = "a-b") -> list[dict[str, Any]]:
    """``layers.csv`` rows of networks a and b (state dicts of ``ctx``'s model) on every split: b aligned to a first
    when ``curve.align`` asks, BatchNorm statistics as ``curve.bn`` says (``reset``: on the seeded training
    batches of ``bn = reset`` curves)."""
    sm = sm or StackedModel(ctx.model)
    a = {k: v.to(ctx.device) for k, v in a.items()}
    b = {k: v.to(ctx.device) for k, v in b.items()}
    if curve.align != "none":
        x_align = alignment_subset(ctx.data.x_train, curve) if curve.needs_align_subset else None
        b = align_pair(sm.model, a, b, curve, x_align)
    found = layer_groups(sm.model, groups)
    sizes = dict(sm.model.named_parameters())
    parameters = [sum(sizes[k].numel() for k in names if k in sizes) for _, names in found]
    bn_batches = seeded_bn_batches(ctx.data.x_train, curve) if curve.bn == "reset" else None
    grid = curve.grid()
    rows: list[dict[str, Any]] = []
    for split in splits:
        x, y = ctx.data.split(split)
        curves = layer_curves(sm, a, b, found, grid, Batches((x, y), curve.eval_batch_size), bn=curve.bn,
                              bn_batches=bn_batches, max_members=curve.max_members)
        result = LayerBarriers([g for g, _ in found], [list(n) for _, n in found], parameters, grid, *curves,
                               grouping=groups, bn=curve.bn)
        rows += result.rows(rewind_step=rewind_step, pair=pair, split=split)
    return rows


@dataclass
class LayerSweep:
    """Layer-wise barriers at every rewind point of a sweep: ``layers.csv`` rows and where they are."""

    run_dir: Path
    sweep_dir: Path
    rows: list[dict[str, Any]] = field(repr=False)

    def dataframe(self):
        """layers.csv as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.rows, columns=LAYER_COLUMNS)


def layer_sweep_key(sweep_dir: Path, groups: str) -> dict[str, Any]:
    """What names the layer-wise barriers of a sweep: the sweep's run (its name is its settings' hash) and the
    grouping."""
    return {"sweep": Path(sweep_dir).name, "groups": groups}


def layer_sweep(cfg: Config, settings: InstabilitySettings | None = None, groups: str = "layers", *,
                ctx: Context | None = None) -> LayerSweep:
    """Layer-wise barriers of every pair of siblings at every rewind point of the sweep ``instability_sweep(cfg,
    settings)`` (run first when it is not finished; a finished one is reused with its siblings), measured with the
    sweep's own curve settings on its splits. Diverged points are left out.

    >>> result = layer_sweep(cfg, InstabilitySettings(rewind_points=("0it", "100it")))
    >>> result.dataframe().pivot_table(index="rewind_step", columns="group", values="barrier")
    """
    settings = (settings or InstabilitySettings()).validate()
    check_layers(groups, settings.curve, "instability")
    ctx = ctx or prepare(cfg)
    sweep = instability_sweep(cfg, settings, ctx=ctx)
    diverged = {r["rewind_step"] for r in sweep.table if r.get("status") == "diverged"}
    steps = [k for k in sweep.rewind_steps if k not in diverged]
    key = layer_sweep_key(sweep.run_dir, groups)
    run = RunDir(cfg.runtime.results_root, LAYERS, settings_hash(key))
    curve = replace(settings.curve, eval_batch_size=cfg.runtime.eval_batch_size)

    def load(run: RunDir) -> LayerSweep | None:
        if read_record(run / LAYERS_SUMMARY) is None:
            return None
        table = PointTable(run / LAYERS_TABLE, "rewind_step", LAYER_COLUMNS, required=LAYER_COLUMNS)
        if any(not table.done(k) for k in steps):
            return None
        table.keep(steps)
        return LayerSweep(run.path, sweep.run_dir, table.rows)

    def compute(run: RunDir, _: None) -> LayerSweep:
        t0 = time.perf_counter()
        table = PointTable(run / LAYERS_TABLE, "rewind_step", LAYER_COLUMNS, required=LAYER_COLUMNS)
        sm = StackedModel(ctx.model).configure_evaluation(cfg.runtime)  # named by the sweep: its eval_precision
        for k in steps:
            if table.done(k):
                continue
            if k == INDEPENDENT_STEP:
                members, _ = independent_members(cfg, ctx, settings.siblings.siblings)
            else:
                members = train_siblings(ctx, k, settings.siblings).members  # the sweep's: reused
            ends = [members.member_state_dict(i) for i in range(members.n)]
            rows = []
            for i, j in pairs(members.n):
                rows += layer_rows(ctx, ends[i], ends[j], curve, settings.splits, groups, sm=sm, rewind_step=k,
                                   pair=f"{i}-{j}")
            table.add(rows)  # the point counts as done once its rows are written
        table.keep(steps)
        table.write()
        write_json(run / LAYERS_SUMMARY, {"sweep": str(sweep.run_dir), "groups": groups, "steps": steps,
                                          "instability": flat_settings(settings), "rows": len(table.rows),
                                          "seconds": round(time.perf_counter() - t0, 3)})
        return LayerSweep(run.path, sweep.run_dir, table.rows)

    return run_once(run, load=load, compute=compute, accept_other_versions=cfg.runtime.accept_other_versions,
                    start=lambda r: r.start({"training": cfg.to_dict(), "instability": flat_settings(settings),
                                             "layers": {"groups": groups}}, key, {"sweep": str(sweep.run_dir)}))


__all__ = ["LayerSweep", "check_layers", "layer_rows", "layer_sweep", "layer_sweep_key"]
