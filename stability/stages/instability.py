"""Instability sweeps: siblings at each rewind point, their interpolation curves, the first stable step.

instability = max_α E(θ(α)) − ½·(E(θ_a) + E(θ_b)) per pair of siblings (the error
barrier; the loss barrier is the same formula on the loss). A rewind point is
stable when the mean over pairs is below ``threshold``. The first stable step is
the first swept k that is stable and stays stable at every later swept k.

Results (in ``results_root/instability_<hash>/``): ``curves.csv``, ``sweep.csv``
and ``instability.json``.
"""
from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from ..config import STRONG_METHODS, Config, settings_from_table, settings_hash
from ..engine import Members, StackedModel
from ..errors import ConfigError, TrainingDiverged
from ..maths.health import DEFAULT_CHANCE_MARGIN, chance_error, check_margin, is_untrained
from ..maths.interpolation import BN_MODES, CurveSettings, curve_rows, error_barrier
from ..steps import format_step
from ..store.files import PointTable, RunDir, read_record, tensors_digest, write_csv, write_json
from ..store.schema import (
    CURVE_COLUMNS,
    CURVES,
    INSTABILITY,
    INSTABILITY_SUMMARY,
    SWEEP,
    SWEEP_COLUMNS,
    TRAIN,
)
from .context import Context, prepare
from .siblings import (
    NOISE_KINDS,
    OPTIMIZER_STATES,
    SiblingSettings,
    mask_digest,
    siblings_info,
    train_siblings,
)
from .trunk import train_trunk, trunk_checkpoint, trunk_dir

SPLITS = ("test", "train", "val")
_ALIGN_FIELDS = ("align", "repair", "align_examples", "align_seed")
# The rewind point "independent": networks trained from different initializations (init and noise seeds
# init_seed + i, noise_seed + i), measured beside the siblings; recorded with rewind_step = -1.
INDEPENDENT = "independent"
INDEPENDENT_STEP = -1



@dataclass(frozen=True)
class InstabilitySettings:
    """Everything an instability sweep adds to the trunk's settings (the ``[instability]`` table)."""

    rewind_points: tuple[str, ...] = ()  # empty = the trunk's training.rewind_points
    siblings: int = 2
    noise: str = "both"
    optimizer_state: str = "fresh"
    sibling_seed: int = 0
    alphas: int = 30
    alpha_grid: tuple[float, ...] = ()
    bn: str = "interpolate"
    bn_batches: int = 20
    splits: tuple[str, ...] = ("test",)
    threshold: float = 0.02
    chance_margin: float = DEFAULT_CHANCE_MARGIN  # endpoints this close to chance error are flagged untrained
    align: str = "none"  # none | weights | activations: permutation alignment of each pair before interpolating
    repair: bool = False  # REPAIR each interpolated network (Jordan et al. 2023)
    align_examples: int = 1000  # training examples for activation matching and REPAIR (fixed, seeded subset)
    align_seed: int = 0

    def sibling_settings(self) -> SiblingSettings:
        return SiblingSettings(self.siblings, self.noise, self.optimizer_state, self.sibling_seed)

    def curve_settings(self, eval_batch_size: int = 1000) -> CurveSettings:
        return CurveSettings(self.alphas, tuple(self.alpha_grid), self.bn, self.bn_batches,
                             eval_batch_size=eval_batch_size, align=self.align, repair=self.repair,
                             align_examples=self.align_examples, align_seed=self.align_seed)

    def alignment(self) -> str:
        """'none', 'weights', 'activations', or one of them followed by '+repair'."""
        return self.align + ("+repair" if self.repair else "")

    @property
    def aligned(self) -> bool:
        """Whether pairs are aligned or repaired before their curves are measured."""
        return self.align != "none" or self.repair

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> InstabilitySettings:
        self.sibling_settings().validate()
        self.curve_settings().validate()
        if not 0 < self.threshold < 1:
            raise ConfigError(f"instability.threshold: must be in (0, 1) (a fraction of examples), got {self.threshold}")
        if self.bn_batches < 1:
            raise ConfigError(f"instability.bn_batches: must be at least 1 (training batches for BatchNorm "
                              f"statistics), got {self.bn_batches}")
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

    def dataframe(self):
        """The sweep table as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.table)


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


def without_plain_alignment(settings: InstabilitySettings, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """``asdict(settings)`` without ``drop`` and without alignment fields that change nothing: all of them
    for plain interpolation (so results from before alignment existed keep their hashes), and the subset
    size and seed when nothing is aligned or repaired."""
    default = InstabilitySettings()
    return {k: v for k, v in asdict(settings).items() if k not in drop
            and not (k in _ALIGN_FIELDS and (v == getattr(default, k) or not settings.aligned))}


def checkpoint_points(points: Iterable[str]) -> list[str]:
    """The swept points that are trunk checkpoints: every one but ``independent``."""
    return [p for p in points if p != INDEPENDENT]


def point_name(step: int) -> str:
    """A swept point for people: '50it', or 'independent' for independently trained networks."""
    return INDEPENDENT if step == INDEPENDENT_STEP else format_step(step)


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
    """Alignment and REPAIR act on trained weights: refuse them for strong tickets (before anything is written)."""
    if settings.aligned and cfg.training.method in STRONG_METHODS:
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
           **without_plain_alignment(settings, ("rewind_points", "threshold", "chance_margin"))}
    if masks is None and start_states is None and label is None:
        return key
    key = {"base": settings_hash(key), "label": label, "masks": mask_digest(masks),
           "start_states": states_digest(start_states)}
    return {**key, "mask0": "freeze"} if freeze else key


def states_digest(states: Mapping[int, Any] | None) -> str | None:
    """A short content hash of start states (rewind step -> Members), or None."""
    if not states:
        return None
    return tensors_digest({f"{k}/{kind}/{name}": v for k, m in states.items()
                           for kind, tensors in (("param", m.params), ("buffer", m.buffers))
                           for name, v in tensors.items()})[:16]


def sweep_dir(cfg: Config, settings: InstabilitySettings, steps: Sequence[int], **sparse: Any) -> RunDir:
    """Where the sweep of these settings lives (``sparse``: masks, start_states, label)."""
    return RunDir(cfg.runtime.results_root, INSTABILITY, settings_hash(sweep_key(cfg, settings, steps, **sparse)))


def instability_sweep(cfg: Config, settings: InstabilitySettings = InstabilitySettings(), *,
                      ctx: Context | None = None, masks: Mapping[str, Tensor] | None = None,
                      start_states: Mapping[int, Any] | None = None, label: str | None = None,
                      freeze: bool = False) -> SweepResult:
    """Train siblings at every rewind point from one trunk and measure their instability.

    ``masks`` and ``start_states`` (rewind step -> single-member Members) serve sparse networks:
    the siblings then start from those weights instead of the dense trunk's checkpoints; ``freeze``
    holds the masks' removed weights at their start values instead of zero.
    """
    settings.validate()
    ctx = ctx or prepare(cfg)
    points = settings.rewind_points or cfg.training.rewind_points
    if not points:
        raise ConfigError("instability.rewind_points: no rewind points to sweep; give --rewind or "
                          "training.rewind_points")
    independent = INDEPENDENT in points
    if independent and (masks is not None or start_states is not None):
        raise ConfigError(f"instability.rewind_points: {INDEPENDENT!r} compares dense networks trained from "
                          "different initializations; it is not available for sparse sweeps")
    steps = ctx.steps(checkpoint_points(points), "instability.rewind_points")
    check_alignment_method(cfg, settings)
    if settings.aligned:
        from ..align import permutation_spec

        permutation_spec(ctx.model)  # a model alignment cannot handle is refused before any training
    if independent:
        steps = [INDEPENDENT_STEP, *steps]
    t0 = time.perf_counter()
    if start_states is None:
        train_trunk(cfg, extra_checkpoints=[k for k in steps if k >= 0], ctx=ctx)
    key = sweep_key(cfg, settings, steps, masks=masks, start_states=start_states, label=label, freeze=freeze)
    run = RunDir(cfg.runtime.results_root, INSTABILITY, settings_hash(key))
    with run.claim():
        return _sweep(cfg, settings, ctx, run, key, steps, masks, start_states, label, t0, freeze)


def _sweep(cfg: Config, settings: InstabilitySettings, ctx: Context, run: RunDir, key: dict[str, Any],
           steps: list[int], masks: Mapping[str, Tensor] | None, start_states: Mapping[int, Any] | None,
           label: str | None, t0: float, freeze: bool = False) -> SweepResult:
    run.start({"training": cfg.to_dict(), "instability": asdict(settings)}, key, {"label": label})
    sm = StackedModel(ctx.model)
    curve_settings = settings.curve_settings(cfg.runtime.eval_batch_size)
    # Curves of rewind points measured by an earlier (finished or interrupted) run of these settings
    # are read back, not measured again: the siblings, and so the curves, are the same.
    stored = PointTable(run / CURVES, "rewind_step", CURVE_COLUMNS, required=CURVE_COLUMNS[:-1])
    chance = {split: chance_error(ctx.data.split(split)[1]) for split in settings.splits}
    siblings_runs = []
    diverged: dict[int, dict[str, Any]] = {}
    measured = 0  # rewind points whose curves this call measures
    for k in steps:
        start = start_states.get(k) if start_states else None
        try:
            if k == INDEPENDENT_STEP:
                members, info = independent_members(cfg, ctx, settings.siblings, sm.param_names)
            else:
                sib = train_siblings(ctx, k, settings.sibling_settings(), masks=masks, start=start,
                                     label=None if start is None else f"{label}@{k}", freeze=freeze)
                members, info = sib.members, siblings_info(sib)
        except TrainingDiverged as exc:
            diverged[k] = exc.info()
            siblings_runs.append({"rewind_step": k, "diverged": exc.info()})
            print(f"warning: {point_name(k)} diverged ({exc}); the point is marked diverged", file=sys.stderr)
            continue
        siblings_runs.append(info)
        if stored.done(k):
            continue
        new = curve_rows(sm, members, settings.splits, ctx.data, curve_settings, k)
        flag_curves(new, chance, settings.chance_margin)
        stored.add(new)  # after every rewind point: a rerun resumes here
        measured += 1
    stored.keep(steps)
    curves = stored.rows
    flag_curves(curves, chance, settings.chance_margin)  # flags follow the margin asked for now
    table = sweep_table(curves, settings.threshold, chance=chance, margin=settings.chance_margin,
                        diverged=diverged, splits=settings.splits)
    by_split = {}
    for split in settings.splits:
        rows = [r for r in table if r["split"] == split and r["rewind_step"] != INDEPENDENT_STEP]
        by_split[split] = first_stable_step([r["rewind_step"] for r in rows], [r["instability_mean"] for r in rows],
                                            settings.threshold, [r["status"] for r in rows])
    primary = settings.splits[0]
    warnings = [f"{point_name(k)}: diverged at step {info['step']} ({info.get('tensor')}); "
                "not a result" for k, info in diverged.items()]
    warnings += [f"{point_name(r['rewind_step'])} ({r['split']}): an endpoint's error is within "
                 f"{settings.chance_margin} of chance ({chance[r['split']]:.3f}): the siblings did not learn, "
                 "so a small barrier does not mean stable" for r in table if r["status"] == "untrained"]
    summary = {
        "settings": {**asdict(settings), "rewind_points": [point_name(s) for s in steps]},
        "bn_mode": settings.bn,
        "alignment": settings.alignment(),
        "independent": {r["split"]: {k: r[k] for k in SWEEP_COLUMNS if k not in ("rewind_step", "split")}
                        for r in table if r["rewind_step"] == INDEPENDENT_STEP},
        "trunk": {"hash": cfg.run_hash(), "run_dir": str(RunDir(cfg.runtime.results_root, TRAIN, cfg.run_hash()).path)},
        "config": cfg.to_dict(),
        "rewind_points": steps,
        "threshold": settings.threshold,
        "primary_split": primary,
        "first_stable_step": by_split[primary],
        "first_stable_step_by_split": by_split,
        "per_split": {s: [{k: r[k] for k in SWEEP_COLUMNS if k != "split"} for r in table if r["split"] == s]
                      for s in settings.splits},
        "siblings": siblings_runs,
        "chance_error": chance,
        "chance_margin": settings.chance_margin,
        "diverged": {str(k): v for k, v in diverged.items()},
        "untrained": sorted({r["rewind_step"] for r in table if r["status"] == "untrained"}),
        "warnings": warnings,
        "label": label,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if measured == 0 and (run / INSTABILITY_SUMMARY).is_file():
        # every curve was read back: the time is the one of the run that measured them
        earlier = read_record(run / INSTABILITY_SUMMARY)
        if earlier is not None:
            summary["seconds"] = earlier.get("seconds", summary["seconds"])
    stored.write()
    write_csv(run / SWEEP, table, SWEEP_COLUMNS)
    write_json(run / INSTABILITY_SUMMARY, summary)
    run.update(status="complete")
    return SweepResult(run.path, steps, table, curves, by_split[primary], by_split, settings.threshold, summary)


__all__ = [
    "BN_MODES",
    "INDEPENDENT",
    "INDEPENDENT_STEP",
    "NOISE_KINDS",
    "OPTIMIZER_STATES",
    "InstabilitySettings",
    "SweepResult",
    "first_stable_step",
    "instability_settings",
    "instability_sweep",
    "pair_barriers",
    "sweep_table",
]
