"""The IMP driver: the rewind step, then for each replicate the dense trunk and a loop over its levels.

Each level is a few steps (compare open_lth's ``LotteryRunner.run``: prune a level, train it)::

    masks = choose_masks(...)   # prune, prune one-shot, or read transferred masks
    start = level_starts(...)   # the ticket and its baselines, as mask-1 and mask-0 say
    trained = _train_level(...) # one stacked, resumable training of them all
    rows = _level_rows(...)     # measure, build the rows, store the level's record

A level whose record was stored before a restart is read back instead, and a level in training saves a
resumable state, so a killed run rerun with the same command resumes bit for bit.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ...config import Config
from ...config.nested import flat_settings
from ...engine import Members, Schedule
from ...errors import CheckpointError, ConfigError, RecordError, TrainingDiverged
from ...maths.flops import backward_macs, layer_costs, weight_gradient_saved
from ...maths.health import chance_error
from ...maths.pruning import density as mask_density
from ...maths.pruning import layer_densities, updated_fraction
from ...steps import INDEPENDENT_STEP, to_iterations
from ...store.files import (
    RunDir,
    load_tensors,
    quarantine,
    read_csv,
    read_json,
    save_tensors,
    write_csv,
    write_json,
)
from ...store.schema import (
    FINAL_STATE,
    IMP,
    INSTABILITY,
    LATEST_STATE,
    LEVEL_COLUMNS,
    LEVEL_RECORD,
    LEVELS,
    METRICS,
    TRAIN,
    level_dir,
    mask_name,
)
from ..base import Need, run_once
from ..checkpoints import load_members
from ..context import Context, prepare
from ..instability import (
    InstabilitySettings,
    checkpoint_points,
    instability_sweep,
)
from ..siblings import train_branch
from ..training import early_stop
from ..trunk import TrainResult, train_trunk, trunk_checkpoint
from .masks import (
    Basis,
    LevelStart,
    Lineage,
    MaskSource,
    basis,
    choose_masks,
    level_starts,
    mask_source,
    prunable,
    rate_overrides,
)
from .naming import imp_dir, imp_key
from .rows import RowHead, level_row, sparse_instability, trajectory, untrained_accuracy
from .settings import ImpSettings, check_method
from .summary import ImpResult, finish, load_result


# ---------------------------------------------------------------- the run
def run_imp(cfg: Config, settings: ImpSettings | None = None,
            sweep_settings: InstabilitySettings | None = None) -> ImpResult:
    """Run (or resume, or reuse) iterative magnitude pruning with rewinding and baselines.

    ``settings`` None: the ``[imp]`` defaults. ``sweep_settings`` are the instability settings used to find the
    first stable step (``rewind = auto``) and to measure sparse networks' instability (``instability = true``).
    """
    settings = (settings or ImpSettings()).validate()
    sweep = (sweep_settings or InstabilitySettings()).validate()
    check_method(cfg)
    ctx = prepare(cfg)
    # the transferred masks, each checked to fit this model, are read once: for the run's name and for training
    source = (mask_source(settings, prunable(ctx, settings), dict(ctx.model.named_parameters()))
              if settings.mask_from else None)
    run = imp_dir(cfg, settings, sweep, source)
    # a fixed rewind step and the layer names are checked before anything is written (``auto`` sweeps)
    fixed = None if settings.rewind == "auto" else resolve_rewind_step(ctx, settings)
    rate_overrides(ctx, settings, prunable(ctx, settings))
    t0 = time.perf_counter()

    def start(run: RunDir) -> tuple[int, dict[str, Any]]:
        rewind_step, rewind_info = (first_stable_rewind(cfg, ctx, sweep) if fixed is None
                                    else (fixed, {"rewind": settings.rewind}))
        # a diverged dense trunk stops here, before any record of this run is written
        train_trunk(cfg, extra_checkpoints=[rewind_step], ctx=ctx)
        run.start({"training": cfg.to_dict(), "imp": asdict(settings), "instability": flat_settings(sweep)},
                  imp_key(cfg, settings, sweep, source), {"rewind_step": rewind_step})
        return rewind_step, rewind_info

    def compute(run: RunDir, started: tuple[int, dict[str, Any]]) -> ImpResult:
        rewind_step, rewind_info = started
        rows: list[dict[str, Any]] = []
        chance = chance_error(ctx.data.split("test")[1])
        for r in range(settings.replicates):
            head = RowHead(r, rewind_step, chance, settings.chance_margin)
            try:
                rows.extend(_run_replicate(cfg, ctx, settings, sweep, run, head, source))
            except TrainingDiverged as exc:  # the dense trunk of replicate r: no reference, no IMP for it
                print(f"warning: the dense trunk of IMP replicate {r} diverged ({exc}); the replicate counts as "
                      "finding no ticket", file=sys.stderr)
                rows.append(level_row(head, 0, "imp", 1.0, None))
            write_csv(run / LEVELS, rows, LEVEL_COLUMNS)
        return finish(run, cfg, settings, rows, rewind_step, rewind_info, source, t0)

    return run_once(run, load=load_result, start=start, compute=compute,
                    accept_other_versions=cfg.runtime.accept_other_versions,
                    again="rebuilding its records from the stored levels")


def resolve_rewind_step(ctx: Context, settings: ImpSettings) -> int:
    """A fixed rewind point (not ``auto``) as an iteration before the final step."""
    step = to_iterations(settings.rewind, ctx.ipe, "imp.rewind")
    if step >= ctx.total_steps:
        raise ConfigError(f"imp.rewind: step {settings.rewind!r} = iteration {step} is at or past the final step "
                          f"{ctx.total_steps}; rewind to an earlier step")
    return step


def first_stable_rewind(cfg: Config, ctx: Context, sweep: InstabilitySettings) -> tuple[int, dict[str, Any]]:
    """``rewind = auto``: the dense network's first stable step, found by an instability sweep, and how."""
    points = sweep.rewind_points or cfg.training.rewind_points
    if not checkpoint_points(points):
        raise ConfigError("imp.rewind: 'auto' needs rewind points to sweep ('independent' is not a rewind step); "
                          "set training.rewind_points or instability.rewind_points")
    result = instability_sweep(cfg, sweep, ctx=ctx)
    info = {"rewind": "auto", "sweep_dir": str(result.run_dir), "first_stable_step": result.first_stable_step,
            "swept": result.rewind_steps}
    if result.first_stable_step is None:
        # Never stable in the swept range: the latest swept point is the closest to stability we have.
        info["note"] = "not stable at any swept step; rewinding to the last swept step"
        return max(k for k in result.rewind_steps if k != INDEPENDENT_STEP), info
    return result.first_stable_step, info



class ImpStage:
    """IMP runs as a stage. args: ``sweep``, the instability settings of ``rewind = auto`` and of
    ``instability = true`` (see ``run_imp``)."""

    name = IMP
    settings = ImpSettings

    def key(self, ctx: Context, settings: ImpSettings, *, sweep: InstabilitySettings) -> dict[str, Any]:
        return imp_key(ctx.cfg, settings, sweep)

    def needs(self, ctx: Context, settings: ImpSettings, *, sweep: InstabilitySettings) -> list[Need]:
        """The trunk with a checkpoint at a fixed rewind step; with ``rewind = auto`` the sweep that finds it
        (the step is known only once the sweep is done)."""
        if settings.rewind == "auto":
            return [Need(TRAIN, ctx.cfg, None, {"extra_checkpoints": []}), Need(INSTABILITY, ctx.cfg, sweep)]
        return [Need(TRAIN, ctx.cfg, None, {"extra_checkpoints": [resolve_rewind_step(ctx, settings)]})]

    def run(self, ctx: Context, settings: ImpSettings, *, sweep: InstabilitySettings) -> ImpResult:
        return run_imp(ctx.cfg, settings, sweep)


IMP_STAGE = ImpStage()

# ---------------------------------------------------------------- one replicate
@dataclass(frozen=True)
class _Replicate:
    """One replicate (init seed ``init_seed + r``): its config and context, run, dense trunk and what its rows share."""

    cfg: Config
    ctx: Context
    settings: ImpSettings
    sweep: InstabilitySettings
    run: RunDir
    head: RowHead
    trunk: TrainResult
    rewind: Members  # the trunk at the rewind step
    basis: Basis  # what its masks and starts are made from
    design: dict[str, Any]  # how this run's tickets are made, in every sparse row
    costs: list[Any]  # the model's layer costs, for the backward FLOPs a mask saves


def _run_replicate(cfg: Config, ctx: Context, settings: ImpSettings, sweep: InstabilitySettings, run: RunDir,
                   head: RowHead, source: MaskSource | None) -> list[dict[str, Any]]:
    """All levels of one replicate; finished levels are read back."""
    rep = _replicate(cfg, ctx, settings, sweep, run, head, source)
    r = head.replicate
    rows = [_dense_row(rep)]
    lineage = Lineage.dense(settings, rep.basis)
    for level in range(1, settings.levels + 1):
        files = _LevelFiles(RunDir(run.path / level_dir(r), "level", str(level)), run / mask_name(r, level))
        level_rows = _read_back(rep, files, lineage, level)
        if level_rows is None:
            masks = choose_masks(lineage, level, ctx.device)
            save_tensors(files.mask, masks, {"replicate": r, "level": level, "density": mask_density(masks)})
            lineage.take(masks)
            start = level_starts(lineage, level)
            trained = _train_level(rep, files, start, level)
            level_rows = _level_rows(rep, files, start, trained, level)
            if trained.members is not None:
                lineage.final = trained.members.member_state_dict(0)
        rows.extend(level_rows)
        if any(row.get("status") == "diverged" for row in level_rows):
            break  # no later level of this replicate is trained
    return rows


def _replicate(cfg: Config, ctx: Context, settings: ImpSettings, sweep: InstabilitySettings, run: RunDir,
               head: RowHead, source: MaskSource | None) -> _Replicate:
    """Replicate ``head.replicate``: its trunk trained (or reused) to the end, with a checkpoint at the rewind step."""
    r = head.replicate
    rcfg = cfg.with_overrides({"training.init_seed": str(cfg.training.init_seed + r)})
    # The replicate's own template model: its trunk starts from init seed init_seed + r.
    rctx = Context(rcfg, ctx.device, ctx.data, ctx.new_model(seed=rcfg.training.init_seed), ctx.ipe, ctx.total_steps)
    trunk = train_trunk(rcfg, extra_checkpoints=[head.rewind_step], ctx=rctx)
    rewind = trunk_checkpoint(rctx, head.rewind_step)
    dense = trunk_checkpoint(rctx, ctx.total_steps).member_state_dict(0)
    design = {"criterion": settings.criterion if source is None else "",
              "mask1": settings.mask1, "mask0": settings.mask0,
              "mask_source": "own" if source is None else Path(source.run_dir).name,
              "strategy": settings.strategy if source is None else "", "retrain": settings.retrain,
              "mask_shuffle": settings.mask_shuffle, "invert_scores": settings.invert_scores}
    return _Replicate(rcfg, rctx, settings, sweep, run, head, trunk, rewind,
                      basis(rctx, settings, r, dense, rewind.member_state_dict(0), source), design,
                      layer_costs(rctx.model, ctx.data.input_shape))


def _dense_row(rep: _Replicate) -> dict[str, Any]:
    """Level 0: the dense trunk itself."""
    measured = {**early_stop(rep.trunk.metrics, 0), "trajectory_length": trajectory(rep.ctx, rep.basis.dense),
                "instability": "", "updated_fraction": 1.0, "backward_flops_saved": 0.0}
    if rep.settings.instability:
        measured["instability"] = sparse_instability(rep.cfg, rep.ctx, rep.sweep, rep.rewind, None,
                                                     rep.head.rewind_step, f"r{rep.head.replicate}-dense")
    return level_row(rep.head, 0, "imp", 1.0, measured)


# ---------------------------------------------------------------- one level
@dataclass(frozen=True)
class _LevelFiles:
    """Where one level of one replicate is stored: its directory (record, states, metrics) and its mask."""

    dir: RunDir
    mask: Path

    @property
    def record(self) -> Path:
        return self.dir / LEVEL_RECORD


def _read_back(rep: _Replicate, files: _LevelFiles, lineage: Lineage, level: int) -> list[dict[str, Any]] | None:
    """The rows of a level finished before a restart, the lineage moved past it; None: the level is to be trained.

    Everything is read before anything is kept: a level that cannot be read back whole is redone from the
    previous level's mask and weights, not from half of its own."""
    if not files.record.is_file():
        return None
    try:
        record = read_json(files.record)
        if any(row.get("status") == "diverged" for row in record["rows"]):
            return record["rows"]  # this replicate stopped at a diverged level
        masks, _ = load_tensors(files.mask, rep.ctx.device)
        final = load_members(files.dir / FINAL_STATE, rep.ctx).member_state_dict(0)
        rows = [{**row, "status": row.get("status") or rep.head.status(row)}
                for row in record["rows"]]  # records written before statuses existed
        lineage.take(masks)
        lineage.final = final
        return rows
    except (RecordError, CheckpointError, KeyError, TypeError) as exc:
        print(f"warning: level {level} of replicate {rep.head.replicate} in {rep.run.path.name} cannot be read back "
              f"({exc}); training it again", file=sys.stderr)
        for path in (files.record, files.mask, files.dir / FINAL_STATE, files.dir / LATEST_STATE, files.dir / METRICS):
            if path.is_file():  # no resumable state kept: the level is trained again from its start
                quarantine(path, f"level record {str(path)!r} belongs to a level that is redone")
        return None


@dataclass(frozen=True)
class _Trained:
    """One level's training: its members at the end (None: diverged, with ``divergence``), and the ticket as it
    started with its supermask accuracy (measured before training advanced the start in place)."""

    members: Members | None
    rewound: Members
    supermask: float | None
    divergence: dict[str, Any] | None = None


def _train_level(rep: _Replicate, files: _LevelFiles, start: LevelStart, level: int) -> _Trained:
    """Train the level's members, stacked, from the rewind step to the end (resumable)."""
    ctx, freeze, r = retrain_context(rep.ctx, rep.settings), rep.settings.mask0 != "zero", rep.head.replicate
    stacked_masks = {n: torch.stack([start.masks[k][n] for k in start.kinds]).to(ctx.device) for n in rep.basis.names}
    n = len(start.kinds)
    members = Members.from_model_states([start.states[k] for k in start.kinds], list(rep.rewind.params),
                                        rep.head.rewind_step, rep.rewind.order_seeds * n, rep.rewind.aug_seeds * n,
                                        ctx.device)
    rewound = _single(members, 0)  # kept apart: training advances ``members`` in place
    supermask = (untrained_accuracy(ctx, rewound, None if freeze else start.masks["imp"])
                 if rep.settings.supermask else None)
    files.dir.path.mkdir(parents=True, exist_ok=True)
    eval_every = to_iterations(rep.cfg.training.eval_every, ctx.ipe)
    try:
        trained = train_branch(ctx, files.dir, members, ctx.total_steps, masks=stacked_masks, freeze=freeze,
                               desc=f"imp r{r} level {level}", eval_every=eval_every)
    except TrainingDiverged as exc:
        print(f"warning: IMP replicate {r} level {level} diverged ({exc}); no later level of this replicate "
              "is trained", file=sys.stderr)
        return _Trained(None, rewound, supermask, exc.info())
    return _Trained(trained, rewound, supermask)


def _level_rows(rep: _Replicate, files: _LevelFiles, start: LevelStart, trained: _Trained,
                level: int) -> list[dict[str, Any]]:
    """A trained level's rows, one per member, measured and stored in the level's record."""
    if trained.members is None:
        rows = [level_row(rep.head, level, kind, mask_density(start.masks[kind]), None) for kind in start.kinds]
        write_json(files.record, {"rows": rows, "diverged": trained.divergence})
        return rows
    metrics = read_csv(files.dir / METRICS)
    rows = []
    for i, kind in enumerate(start.kinds):
        masks = start.masks[kind]
        measured = {**early_stop(metrics, i),
                    "trajectory_length": trajectory(rep.ctx, trained.members.member_state_dict(i)), "instability": "",
                    **rep.design, "updated_fraction": updated_fraction(masks, rep.rewind.params),
                    "backward_flops_saved": weight_gradient_saved(rep.costs, masks) / backward_macs(rep.costs)}
        if kind == "imp" and trained.supermask is not None:
            measured["supermask_test_accuracy"] = trained.supermask
        if kind == "imp" and rep.settings.instability:  # siblings of the start, trained as the level is
            tctx = retrain_context(rep.ctx, rep.settings)
            measured["instability"] = sparse_instability(
                tctx.cfg, tctx, rep.sweep, trained.rewound, masks, rep.head.rewind_step,
                f"r{rep.head.replicate}-level{level}-{files.dir.hash}", rep.settings.mask0 != "zero")
        rows.append(level_row(rep.head, level, kind, mask_density(masks), measured))
    write_json(files.record, {"rows": rows, "layer_densities": layer_densities(start.masks["imp"])})
    return rows


def retrain_context(ctx: Context, settings: ImpSettings) -> Context:
    """The context a level trains in: ``finetune`` holds the schedule's final learning rate (that of the last
    step, warmup included) for all T - k steps; otherwise the run's own."""
    if settings.retrain != "finetune":
        return ctx
    final_lr = Schedule(ctx.cfg, ctx.ipe).lr(ctx.total_steps - 1)
    cfg = ctx.cfg.with_overrides({"optimizer.lr": repr(final_lr), "schedule.kind": "constant",
                                  "schedule.warmup": "0it"})
    return Context(cfg, ctx.device, ctx.data, ctx.model, ctx.ipe, ctx.total_steps)


def _single(members: Members, i: int) -> Members:
    """Member ``i`` alone, copied."""
    return Members(members.step, {k: v[i : i + 1].clone() for k, v in members.params.items()},
                   {k: v[i : i + 1].clone() for k, v in members.buffers.items()}, [members.order_seeds[i]],
                   [members.aug_seeds[i]])


__all__ = ["IMP_STAGE", "ImpStage", "resolve_rewind_step", "retrain_context", "run_imp"]
