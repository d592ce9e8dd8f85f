"""Instability sweeps: siblings at each rewind point, their interpolation curves, the first stable step.

instability = max_α E(θ(α)) − ½·(E(θ_a) + E(θ_b)) per pair of siblings (the error
barrier; the loss barrier is the same formula on the loss). A rewind point is
stable when the mean over pairs is below ``threshold``. The first stable step is
the first swept k that is stable and stays stable at every later swept k
(``stability.maths.sweep`` judges the curves; this module trains, measures and records).

Results (in ``results_root/instability_<hash>/``): ``curves.csv``, ``sweep.csv``
and ``instability.json``.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import Tensor

from ..config import Config, settings_from_table, settings_hash
from ..config.nested import flat_settings
from ..engine import Members, StackedModel
from ..errors import ConfigError, RecordError, TrainingDiverged
from ..maths.health import DEFAULT_CHANCE_MARGIN, chance_error, check_margin
from ..maths.interpolation import BN_MODES, CurveSettings, curve_rows
from ..maths.sweep import first_stable_step, flag_curves, sweep_table
from ..methods import method_of
from ..models.build import has_batchnorm
from ..steps import INDEPENDENT, INDEPENDENT_STEP, point_name
from ..store.files import (
    PointTable,
    RunDir,
    read_record,
    read_table,
    short_digest,
    write_csv,
    write_json,
)
from ..store.schema import (
    CURVE_COLUMNS,
    CURVES,
    INSTABILITY,
    INSTABILITY_SUMMARY,
    SIBLINGS,
    SWEEP,
    SWEEP_COLUMNS,
    TRAIN,
)
from .base import Need, mask_digest, member_tensors, run_once, settings_key
from .context import Context, prepare
from .siblings import NOISE_KINDS, OPTIMIZER_STATES, SiblingSettings, siblings_info, train_siblings
from .trunk import train_trunk, trunk_checkpoint, trunk_dir

SPLITS = ("test", "train", "val")
# The rewind point INDEPENDENT (stability.steps): networks trained from different initializations (init and noise
# seeds init_seed + i, noise_seed + i), measured beside the siblings; recorded with rewind_step = INDEPENDENT_STEP.



@dataclass(frozen=True)
class InstabilitySettings:
    """Everything an instability sweep adds to the trunk's settings (the ``[instability]`` table): how siblings are
    made, how their curves are measured, and how the curves are judged. The table names every setting flat
    (``instability.siblings`` is the sibling count, ``instability.alphas`` the curve's; see ``config.nested``)."""

    rewind_points: tuple[str, ...] = ()  # empty = the trunk's training.rewind_points
    siblings: SiblingSettings = field(default_factory=SiblingSettings)
    curve: CurveSettings = field(default_factory=CurveSettings)
    splits: tuple[str, ...] = ("test",)
    threshold: float = 0.02
    chance_margin: float = DEFAULT_CHANCE_MARGIN  # endpoints this close to chance error are flagged untrained

    # the flat names in the order records and run keys were written in before the settings were composed
    FLAT_ORDER = ("rewind_points", "siblings", "noise", "optimizer_state", "sibling_seed", "alphas", "alpha_grid",
                  "bn", "bn_batches", "splits", "threshold", "chance_margin", "align", "repair", "align_examples",
                  "align_seed")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> InstabilitySettings:
        """Check the settings (the siblings' and the curve's by their own ``validate``)."""
        self.siblings.validate()
        self.curve.validate(INSTABILITY)
        if not 0 < self.threshold < 1:
            raise ConfigError(f"instability.threshold: must be in (0, 1) (a fraction of examples), got {self.threshold}")
        if not self.splits or any(s not in SPLITS for s in self.splits):
            raise ConfigError(f"instability.splits: unknown split in {list(self.splits)}; choose from {', '.join(SPLITS)}")
        check_margin(self.chance_margin, "instability.chance_margin")
        return self


def instability_settings(table: Mapping[str, Any] | None = None, **overrides: Any) -> InstabilitySettings:
    """Build settings from a TOML ``[instability]`` table and keyword overrides, with clear errors."""
    return settings_from_table(InstabilitySettings, "instability", table, **overrides)


@dataclass
class SweepResult:
    """An instability sweep: per-rewind-point figures, the curves and the first stable step."""

    run_dir: Path
    rewind_steps: list[int]
    table: list[dict[str, Any]]  # sweep.csv rows
    curves: list[dict[str, Any]] = field(repr=False)
    first_stable_step: int | None = None
    first_stable_step_by_split: dict[str, int | None] = field(default_factory=dict)
    threshold: float = 0.02
    summary: dict[str, Any] = field(default_factory=dict, repr=False)
    reused: bool = False  # read back from a finished run (its records as they were written)

    def dataframe(self):
        """The sweep table as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.table)


def instability_settings_key(settings: InstabilitySettings, drop: Sequence[str] = ()) -> dict[str, Any]:
    """The instability settings as they name a run (a sweep's, and an IMP run's that sweeps): ``settings_key``
    with the legacy fields of ``LEGACY_NAMED["instability"]``; the alignment subset's size and seed change
    nothing, and so name nothing, unless pairs are aligned or repaired."""
    inert = () if settings.curve.aligned else ("align_examples", "align_seed")
    return settings_key(settings, drop=(*drop, *inert), legacy=INSTABILITY)


def checkpoint_points(points: Iterable[str]) -> list[str]:
    """The swept points that are trunk checkpoints: every one but ``independent``."""
    return [p for p in points if p != INDEPENDENT]


def independent_config(cfg: Config, i: int) -> Config:
    """The i-th (i >= 1) independently trained network of ``cfg``: init and noise seeds + i, and no rewind
    checkpoints (only its final weights are used)."""
    return cfg.with_overrides({"training.init_seed": cfg.training.init_seed + i,
                               "training.noise_seed": cfg.training.noise_seed + i, "training.rewind_points": []})


def independent_members(cfg: Config, ctx: Context, n: int,
                        param_names: Sequence[str] | None = None) -> tuple[Members, dict[str, Any]]:
    """The final weights of n trunks trained from different seeds (init and noise seeds + i), as members.

    Trunk 0 is the sweep's own (read through ``trunk_checkpoint``, which trains it only when it is not
    complete); the others are runs of their own (reused, resumed and checked like any trunk).
    """
    states = [trunk_checkpoint(ctx, ctx.total_steps).member_state_dict(0)]
    runs = [str(trunk_dir(cfg).path)]
    for i in range(1, n):
        cfg_i = independent_config(cfg, i)
        ctx_i = prepare(cfg_i)
        result = train_trunk(cfg_i, ctx=ctx_i)
        states.append(trunk_checkpoint(ctx_i, ctx_i.total_steps).member_state_dict(0))
        runs.append(str(result.run_dir))
    names = param_names if param_names is not None else [k for k, _ in ctx.model.named_parameters()]
    members = Members.from_model_states(states, names, ctx.total_steps, [0] * n, [0] * n, ctx.device)
    return members, {"rewind_step": INDEPENDENT_STEP, "independent": runs}


def check_alignment_method(cfg: Config, settings: InstabilitySettings) -> None:
    """Alignment and REPAIR act on trained weights: refuse them for methods that train none (before anything is
    written)."""
    if settings.curve.aligned and not method_of(cfg).trains_weights:
        raise ConfigError(f"instability.align: the siblings of a strong ticket ({cfg.training.method}) share their "
                          "frozen weights and differ only in their scores; permuting one of them would give the "
                          "two endpoints different frozen weights. Use align = none (and no repair) here")


def sweep_key(cfg: Config, settings: InstabilitySettings, steps: Sequence[int], *,
              masks: Mapping[str, Tensor] | None = None, start_states: Mapping[int, Any] | None = None,
              label: str | None = None, freeze: bool = False) -> dict[str, Any]:
    """The settings that name a sweep (its run hash is ``settings_hash`` of this, recorded in its manifest).

    Threshold and chance margin only classify the measured curves, so they stay out. A sparse sweep
    is named by the masks' and start states' contents as well (and its label).
    """
    key = {"trunk": cfg.run_hash(), "steps": list(steps),
           **instability_settings_key(settings, ("rewind_points", "threshold", "chance_margin"))}
    if masks is None and start_states is None and label is None:
        return key
    key = {"base": settings_hash(key), "label": label, "masks": mask_digest(masks),
           "start_states": states_digest(start_states)}
    return {**key, "mask0": "freeze"} if freeze else key


def states_digest(states: Mapping[int, Any] | None) -> str | None:
    """A short content hash of start states (rewind step -> Members), or None."""
    if not states:
        return None
    return short_digest({f"{k}/{name}": v for k, m in states.items() for name, v in member_tensors(m).items()})


def sweep_dir(cfg: Config, settings: InstabilitySettings, steps: Sequence[int], **sparse: Any) -> RunDir:
    """Where the sweep of these settings lives (``sparse``: masks, start_states, label)."""
    return RunDir(cfg.runtime.results_root, INSTABILITY, settings_hash(sweep_key(cfg, settings, steps, **sparse)))


def sweep_steps(ctx: Context, settings: InstabilitySettings, *, sparse: bool = False) -> list[int]:
    """The swept steps, checked (``INDEPENDENT_STEP`` first when independent networks are swept)."""
    points = settings.rewind_points or ctx.cfg.training.rewind_points
    if not points:
        raise ConfigError("instability.rewind_points: no rewind points to sweep; give --rewind or "
                          "training.rewind_points")
    independent = INDEPENDENT in points
    if independent and sparse:
        raise ConfigError(f"instability.rewind_points: {INDEPENDENT!r} compares dense networks trained from "
                          "different initializations; it is not available for sparse sweeps")
    steps = ctx.steps(checkpoint_points(points), "instability.rewind_points")
    return [INDEPENDENT_STEP, *steps] if independent else steps


def instability_sweep(cfg: Config, settings: InstabilitySettings = InstabilitySettings(), *,
                      ctx: Context | None = None, masks: Mapping[str, Tensor] | None = None,
                      start_states: Mapping[int, Any] | None = None, label: str | None = None,
                      freeze: bool = False) -> SweepResult:
    """Train siblings at every rewind point from one trunk and measure their instability.

    ``masks`` and ``start_states`` (rewind step -> single-member Members) serve sparse networks:
    the siblings then start from those weights instead of the dense trunk's checkpoints; ``freeze``
    holds the masks' removed weights at their start values instead of zero. Every call makes sure the
    trunk and every point's siblings are intact (trained, repaired or reused); a finished sweep is then reused.
    """
    settings.validate()
    ctx = ctx or prepare(cfg)
    steps = sweep_steps(ctx, settings, sparse=masks is not None or start_states is not None)
    check_alignment_method(cfg, settings)
    if settings.curve.aligned:
        from ..align import permutation_spec

        permutation_spec(ctx.model)  # a model alignment cannot handle is refused before any training
    sweep = _Sweep(cfg, settings, ctx, steps, masks, start_states, label, freeze, time.perf_counter())
    if start_states is None:
        train_trunk(cfg, extra_checkpoints=[k for k in steps if k >= 0], ctx=ctx)
    sweep.train_points()
    key = sweep_key(cfg, settings, steps, masks=masks, start_states=start_states, label=label, freeze=freeze)
    run = RunDir(cfg.runtime.results_root, INSTABILITY, settings_hash(key))
    return run_once(run, load=sweep.load, accept_other_versions=cfg.runtime.accept_other_versions,
                    start=lambda r: r.start({"training": cfg.to_dict(), "instability": flat_settings(settings)}, key,
                                            {"label": label}),
                    compute=sweep.compute)


@dataclass
class _Sweep:
    """One call of ``instability_sweep``: its points' siblings, and the steps of its lifecycle."""

    cfg: Config
    settings: InstabilitySettings
    ctx: Context
    steps: list[int]
    masks: Mapping[str, Tensor] | None
    start_states: Mapping[int, Any] | None
    label: str | None
    freeze: bool
    t0: float
    siblings: list[dict[str, Any]] = field(default_factory=list)  # per point: its siblings' runs, or divergence
    diverged: dict[int, dict[str, Any]] = field(default_factory=dict)

    def members(self, k: int, names: Sequence[str] | None = None) -> tuple[Members, dict[str, Any]]:
        """The networks compared at point k (trained, resumed or reused) and where they are."""
        if k == INDEPENDENT_STEP:
            return independent_members(self.cfg, self.ctx, self.settings.siblings.siblings, names)
        start = self.start_states.get(k) if self.start_states else None
        sib = train_siblings(self.ctx, k, self.settings.siblings, masks=self.masks, start=start,
                             label=None if start is None else f"{self.label}@{k}", freeze=self.freeze)
        return sib.members, siblings_info(sib)

    def train_points(self) -> None:
        """Every point's networks, before the sweep's run is claimed; a point whose training diverged is marked."""
        for k in self.steps:
            try:
                _, info = self.members(k)
            except TrainingDiverged as exc:
                self.diverged[k] = exc.info()
                self.siblings.append({"rewind_step": k, "diverged": exc.info()})
                print(f"warning: {point_name(k)} diverged ({exc}); the point is marked diverged", file=sys.stderr)
                continue
            self.siblings.append(info)

    @property
    def chance(self) -> dict[str, float]:
        return {split: chance_error(self.ctx.data.split(split)[1]) for split in self.settings.splits}

    def curves(self, run: RunDir) -> PointTable:
        # Curves of rewind points measured by an earlier (finished or interrupted) run of these settings
        # are read back, not measured again: the siblings, and so the curves, are the same.
        return PointTable(run / CURVES, "rewind_step", CURVE_COLUMNS, required=CURVE_COLUMNS[:-1])

    def compute(self, run: RunDir, _: None) -> SweepResult:
        """Measure the points not measured yet, then judge and record the whole sweep."""
        settings, ctx = self.settings, self.ctx
        sm = StackedModel(ctx.model).configure_evaluation(self.cfg.runtime)  # runtime.eval_precision of the curves
        curve_settings = replace(settings.curve, eval_batch_size=self.cfg.runtime.eval_batch_size)
        stored = self.curves(run)
        chance = self.chance
        measured = 0  # rewind points whose curves this call measures
        for k in self.steps:
            if k in self.diverged or stored.done(k):
                continue
            members, _ = self.members(k, sm.param_names)
            new = curve_rows(sm, members, settings.splits, ctx.data, curve_settings, k)
            flag_curves(new, chance, settings.chance_margin)
            stored.add(new)  # after every rewind point: a rerun resumes here
            measured += 1
        seconds = round(time.perf_counter() - self.t0, 3)
        if measured == 0 and (run / INSTABILITY_SUMMARY).is_file():
            # every curve was read back: the time is the one of the run that measured them
            earlier = read_record(run / INSTABILITY_SUMMARY)
            if earlier is not None:
                seconds = earlier.get("seconds", seconds)
        return self.write(run, self.judge(run, stored, seconds), stored)

    def load(self, run: RunDir) -> SweepResult | None:
        """A finished sweep read back; judged again (and its records rewritten) when the threshold or chance
        margin asked for now, which name nothing, differ from the recorded ones, or a record lacks a part."""
        summary = read_record(run / INSTABILITY_SUMMARY)
        if summary is None:
            return None
        stored = self.curves(run)
        missing = [point_name(k) for k in self.steps if k not in self.diverged and not stored.done(k)]
        if missing:
            raise RecordError(f"record {str(run / CURVES)!r} lacks the curves of {', '.join(missing)}")
        if set(summary.get("diverged", {})) != {str(k) for k in self.diverged}:
            raise RecordError(f"record {str(run / INSTABILITY_SUMMARY)!r} marks other points diverged than "
                              f"these siblings ({sorted(summary.get('diverged', {}))} against {sorted(self.diverged)})")
        stale = (read_table(run, SWEEP, SWEEP_COLUMNS) is None or any("flag" not in r for r in stored.rows)
                 or (summary.get("threshold"), summary.get("chance_margin"))
                 != (self.settings.threshold, self.settings.chance_margin))
        result = self.judge(run, stored, summary.get("seconds", 0.0))
        if stale or set(result.summary) - set(summary):
            self.write(run, result, stored)
        else:
            result.summary = summary  # the record as it was written
        result.reused = True
        return result

    def judge(self, run: RunDir, stored: PointTable, seconds: float) -> SweepResult:
        """The sweep's table, first stable steps and summary from its curves (flagged by the margin asked for now)."""
        settings, cfg, steps, diverged = self.settings, self.cfg, self.steps, self.diverged
        stored.keep(steps)
        curves = stored.rows
        chance = self.chance
        flag_curves(curves, chance, settings.chance_margin)  # flags follow the margin asked for now
        table = sweep_table(curves, settings.threshold, chance=chance, margin=settings.chance_margin,
                            diverged=diverged, splits=settings.splits)
        by_split = {}
        for split in settings.splits:
            rows = [r for r in table if r["split"] == split and r["rewind_step"] != INDEPENDENT_STEP]
            by_split[split] = first_stable_step([r["rewind_step"] for r in rows],
                                                [r["instability_mean"] for r in rows], settings.threshold,
                                                [r["status"] for r in rows])
        primary = settings.splits[0]
        warnings = [f"{point_name(k)}: diverged at step {info['step']} ({info.get('tensor')}); "
                    "not a result" for k, info in diverged.items()]
        warnings += [f"{point_name(r['rewind_step'])} ({r['split']}): an endpoint's error is within "
                     f"{settings.chance_margin} of chance ({chance[r['split']]:.3f}): the siblings did not learn, "
                     "so a small barrier does not mean stable" for r in table if r["status"] == "untrained"]
        summary = {
            "settings": {**flat_settings(settings), "rewind_points": [point_name(s) for s in steps]},
            "bn_mode": settings.curve.bn,
            "batchnorm": has_batchnorm(self.ctx.model),  # readers note the BatchNorm handling only for such models
            "alignment": settings.curve.alignment(),
            "independent": {r["split"]: {k: r[k] for k in SWEEP_COLUMNS if k not in ("rewind_step", "split")}
                            for r in table if r["rewind_step"] == INDEPENDENT_STEP},
            "trunk": {"hash": cfg.run_hash(),
                      "run_dir": str(RunDir(cfg.runtime.results_root, TRAIN, cfg.run_hash()).path)},
            "config": cfg.to_dict(),
            "rewind_points": steps,
            "threshold": settings.threshold,
            "primary_split": primary,
            "first_stable_step": by_split[primary],
            "first_stable_step_by_split": by_split,
            "per_split": {s: [{k: r[k] for k in SWEEP_COLUMNS if k != "split"} for r in table if r["split"] == s]
                          for s in settings.splits},
            "siblings": self.siblings,
            "chance_error": chance,
            "chance_margin": settings.chance_margin,
            "diverged": {str(k): v for k, v in diverged.items()},
            "untrained": sorted({r["rewind_step"] for r in table if r["status"] == "untrained"}),
            "warnings": warnings,
            "label": self.label,
            "seconds": seconds,
        }
        return SweepResult(run.path, steps, table, curves, by_split[primary], by_split, settings.threshold, summary)

    @staticmethod
    def write(run: RunDir, result: SweepResult, stored: PointTable) -> SweepResult:
        stored.write()
        write_csv(run / SWEEP, result.table, SWEEP_COLUMNS)
        write_json(run / INSTABILITY_SUMMARY, result.summary)
        return result


class SweepStage:
    """Instability sweeps as a stage. args: for sparse networks ``masks``, ``start_states``, ``label``, ``freeze``
    (see ``instability_sweep``)."""

    name = INSTABILITY
    settings = InstabilitySettings

    def key(self, ctx: Context, settings: InstabilitySettings, **sparse: Any) -> dict[str, Any]:
        steps = sweep_steps(ctx, settings, sparse=sparse.get("masks") is not None
                            or sparse.get("start_states") is not None)
        return sweep_key(ctx.cfg, settings, steps, **sparse)

    def needs(self, ctx: Context, settings: InstabilitySettings, *, masks: Mapping[str, Tensor] | None = None,
              start_states: Mapping[int, Any] | None = None, label: str | None = None,
              freeze: bool = False) -> list[Need]:
        """The trunk with a checkpoint at every swept step (unless the start states are given), the siblings of
        every point, and for ``independent`` the other independently trained trunks."""
        cfg = ctx.cfg
        steps = sweep_steps(ctx, settings, sparse=masks is not None or start_states is not None)
        out = [] if start_states is not None else [Need(TRAIN, cfg, None, {"extra_checkpoints": [k for k in steps
                                                                                                  if k >= 0]})]
        for k in steps:
            if k == INDEPENDENT_STEP:
                out += [Need(TRAIN, independent_config(cfg, i), None, {"extra_checkpoints": [0, ctx.total_steps]})
                        for i in range(1, settings.siblings.siblings)]
                continue
            start = start_states.get(k) if start_states else None
            sparse = {"masks": masks, "start": start, "label": None if start is None else f"{label}@{k}",
                      "freeze": freeze} if masks is not None or start is not None or freeze else {}
            out.append(Need(SIBLINGS, cfg, settings.siblings, {"rewind_step": k, **sparse}))
        return out

    def run(self, ctx: Context, settings: InstabilitySettings, **sparse: Any) -> SweepResult:
        return instability_sweep(ctx.cfg, settings, ctx=ctx, **sparse)


SWEEP_STAGE = SweepStage()


__all__ = ["BN_MODES", "NOISE_KINDS", "OPTIMIZER_STATES", "SWEEP_STAGE", "InstabilitySettings", "SweepResult",
           "instability_settings", "instability_settings_key", "instability_sweep", "sweep_dir", "sweep_key"]
