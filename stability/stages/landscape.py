"""Hessian probes over a run's checkpoints and along interpolation paths.

``hessian_track`` probes the trunk at every saved checkpoint (or chosen steps,
or every k steps, produced by exact replay when missing) and writes
``hessian.csv`` (step, λ1..λk, λmin, trace, trace stderr, HVP count, seconds),
``density.csv`` (step, x, density) and ``hessian.json``. ``hessian_path``
probes θ(α) between two siblings of a rewind point, recomputing BatchNorm
statistics for each α first when the model has them. Finished probe points are
kept, so a rerun after a crash only does the missing ones.
"""
from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Config, settings_hash
from ..engine import StackedModel
from ..errors import CheckpointError, ConfigError, RecordError
from ..hessian import HessianSettings, hessian_settings, probe
from ..maths.interpolation import CurveSettings, interpolate_stacks, reset_bn_stats
from ..steps import to_iterations
from ..store.files import PointTable, RunDir, read_record, write_json
from ..store.schema import (
    DENSITY_TABLE,
    HESSIAN,
    HESSIAN_SUMMARY,
    HESSIAN_TABLE,
    MANIFEST,
    SIBLINGS,
    TRAIN,
)
from .base import Need, run_once, settings_key
from .context import Context, prepare
from .siblings import SiblingSettings, train_siblings
from .trunk import train_trunk, trunk_checkpoint, trunk_dir


def _check_dim(ctx: Context, settings: HessianSettings) -> None:
    dim = sum(p.numel() for p in ctx.model.parameters())
    if settings.top_k > dim:
        raise ConfigError(f"hessian.top_k: {settings.top_k} is more than the {dim} parameters of the model")


@dataclass
class HessianTrack:
    """Probe results at several points of a run or a path."""

    run_dir: Path
    rows: list[dict[str, Any]]
    density: list[dict[str, Any]] = field(repr=False)

    def dataframe(self):
        """hessian.csv as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.rows)


def _probe_rows(point: dict[str, Any], result) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    row = {**point, **result.row(), "converged": result.converged, "dim": result.dim, "engine": result.engine}
    dens = []
    if result.density is not None:
        dens = [{**point, "x": float(x), "density": float(d)}
                for x, d in zip(result.density.grid.tolist(), result.density.density.tolist())]
    return row, dens


def _resolve_steps(ctx: Context, at: str | Sequence[str | int], every: str | None) -> list[int]:
    """The iterations to probe: 'all' saved checkpoints (0, rewind points, T), a list, and/or every k."""
    steps: set[int] = set()
    if at == "all" or (not at and not every):
        steps.update({0, ctx.total_steps, *ctx.steps(ctx.cfg.training.rewind_points, "training.rewind_points")})
    elif at:
        for value in at:
            it = to_iterations(value, ctx.ipe, "hessian --at")
            if it > ctx.total_steps:
                raise ConfigError(f"hessian --at: step {value!r} = iteration {it} is past the final step {ctx.total_steps}")
            steps.add(it)
    if every:
        k = to_iterations(every, ctx.ipe, "hessian --every")
        if k < 1:
            raise ConfigError("hessian --every: must be at least 1 iteration")
        steps.update(range(0, ctx.total_steps + 1, k))
    return sorted(steps)


def track_key(cfg: Config, settings: HessianSettings, steps: Sequence[int]) -> dict[str, Any]:
    """The settings that name a Hessian track of a trunk (its run hash is ``settings_hash`` of this)."""
    return {"trunk": cfg.run_hash(), "hessian": settings_key(settings, legacy=HESSIAN), "steps": list(steps)}


def path_key(cfg: Config, settings: HessianSettings, rewind_step: int, alphas: Sequence[float],
             siblings: SiblingSettings, bn_batches: int) -> dict[str, Any]:
    """The settings that name the Hessian probes of a path between two siblings (its run hash is
    ``settings_hash`` of this)."""
    return {"trunk": cfg.run_hash(), "hessian": settings_key(settings, legacy=HESSIAN), "path": rewind_step,
            "alphas": list(alphas), "siblings": settings_key(siblings, legacy="hessian.siblings"),
            "bn_batches": bn_batches}


def track_steps(ctx: Context, at: str | Sequence[str | int] = "all", every: str | None = None) -> list[int]:
    """The iterations a track probes (``at``: 'all' saved checkpoints or a list; ``every``: also every k)."""
    return _resolve_steps(ctx, at, every)


def hessian_track(cfg: Config, settings: HessianSettings, *, at: str | Sequence[str | int] = "all",
                  every: str | None = None, ctx: Context | None = None) -> HessianTrack:
    """Probe the trunk of ``cfg`` at every chosen step; missing checkpoints are produced by exact replay."""
    ctx = ctx or prepare(cfg)
    _check_dim(ctx, settings)
    steps = _resolve_steps(ctx, at, every)
    key = track_key(cfg, settings, steps)
    run = RunDir(cfg.runtime.results_root, HESSIAN, settings_hash(key))
    train_trunk(cfg, extra_checkpoints=[s for s in steps if s < ctx.total_steps], ctx=ctx)

    def begin(run: RunDir) -> bool:
        new_run = not run.exists()
        run.start({"training": cfg.to_dict(), "hessian": asdict(settings)}, key,
                  {"target": "trunk", "trunk": str(trunk_dir(cfg).path)})
        return new_run

    def compute(run: RunDir, new_run: bool) -> HessianTrack:
        def model_at(step: int) -> nn.Module:
            try:
                members = trunk_checkpoint(ctx, step)  # a damaged checkpoint is replayed, never used
            except CheckpointError:
                if new_run and not (run / HESSIAN_TABLE).is_file():
                    shutil.rmtree(run.path)  # a bad checkpoint before any finished probe: leave nothing behind
                raise
            model = ctx.new_model()
            model.load_state_dict(members.member_state_dict(0))
            return model

        return _probe_points(run, cfg, settings, ctx, "step", steps, lambda step: {"step": step}, model_at,
                             {"target": "trunk", "steps": steps})

    return run_once(run, load=lambda r: _load_probes(r, settings, "step", steps), start=begin, compute=compute,
                    accept_other_versions=cfg.runtime.accept_other_versions)


PATH_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _path_point(ctx: Context, rewind_step: int | str, alphas: Sequence[float]) -> tuple[int, list[float]]:
    """A path's rewind step (in iterations) and α values, checked."""
    step = to_iterations(rewind_step, ctx.ipe, "hessian --path") if isinstance(rewind_step, str) else rewind_step
    if not 0 <= step < ctx.total_steps:
        raise ConfigError(f"hessian --path: rewind step {step} must be before the final step {ctx.total_steps}")
    alphas = [float(a) for a in alphas]
    if not alphas or any(not 0 <= a <= 1 for a in alphas):
        raise ConfigError(f"hessian --alpha-grid: values must lie in [0, 1], got {alphas}")
    return step, alphas


def hessian_path(cfg: Config, settings: HessianSettings, rewind_step: int | str, *,
                 alphas: Sequence[float] = PATH_ALPHAS, siblings: SiblingSettings | None = None,
                 bn_batches: int = 20, ctx: Context | None = None) -> HessianTrack:
    """Probe θ(α) between siblings 0 and 1 of ``rewind_step`` (BatchNorm statistics reset for each α)."""
    siblings = siblings or SiblingSettings()
    ctx = ctx or prepare(cfg)
    _check_dim(ctx, settings)
    step, alphas = _path_point(ctx, rewind_step, alphas)
    key = path_key(cfg, settings, step, alphas, siblings, bn_batches)
    run = RunDir(cfg.runtime.results_root, HESSIAN, settings_hash(key))
    sib = train_siblings(ctx, step, siblings)
    points = sorted(alphas)

    def compute(run: RunDir, _: None) -> HessianTrack:
        sm = StackedModel(ctx.model)
        a, b = sib.members.member_state_dict(0), sib.members.member_state_dict(1)

        def model_at(alpha: float) -> nn.Module:
            grid = torch.tensor([alpha], dtype=torch.float64)
            params = interpolate_stacks({k: a[k] for k in sm.param_names}, {k: b[k] for k in sm.param_names}, grid)
            buffers = interpolate_stacks({k: a[k] for k in sm.buffer_names}, {k: b[k] for k in sm.buffer_names},
                                         grid)
            if sm.buffer_names:
                reset_bn_stats(sm, params, buffers, ctx.data.x_train, CurveSettings(bn="reset", bn_batches=bn_batches))
            model = ctx.new_model()
            model.load_state_dict({**{k: v[0] for k, v in params.items()}, **{k: v[0] for k, v in buffers.items()}})
            return model

        return _probe_points(run, cfg, settings, ctx, "alpha", points,
                             lambda alpha: {"rewind_step": step, "alpha": alpha}, model_at,
                             {"target": "path", "rewind_step": step, "alphas": alphas})

    return run_once(run, load=lambda r: _load_probes(r, settings, "alpha", points), compute=compute,
                    accept_other_versions=cfg.runtime.accept_other_versions,
                    start=lambda r: r.start({"training": cfg.to_dict(), "hessian": asdict(settings)}, key,
                                            {"target": "path", "siblings": str(sib.run_dir)}))


def _probe_points(run: RunDir, cfg: Config, settings: HessianSettings, ctx: Context, key: str, points: list[Any],
                  label: Callable[[Any], dict[str, Any]], model_at: Callable[[Any], nn.Module],
                  where: dict[str, Any]) -> HessianTrack:
    """Probe every point not finished yet; each point's rows are written as soon as it is measured."""
    rows = PointTable(run / HESSIAN_TABLE, key)
    density = PointTable(run / DENSITY_TABLE, key)
    t0 = time.perf_counter()
    for point in points:
        if rows.done(point) and (density.done(point) or not settings.density):
            continue
        result = probe(model_at(point), ctx.data.x_train, ctx.data.y_train, settings)
        row, dens = _probe_rows(label(point), result)
        rows.drop(point)  # a row whose density was lost
        density.drop(point)  # rows a killed probe of this point left
        if dens:
            density.add(dens)
        rows.add([row])  # the point counts as done once its row is written
    rows.keep(points)
    rows.write()
    write_json(run / HESSIAN_SUMMARY, {
        "settings": asdict(settings), **where, "points": len(rows.rows),
        "seconds": round(time.perf_counter() - t0, 3), "optimizer": asdict(cfg.optimizer), "config": cfg.to_dict(),
        "edge_of_stability": _edge_of_stability(cfg),
    })
    return HessianTrack(run.path, rows.rows, density.rows)


def _load_probes(run: RunDir, settings: HessianSettings, key: str, points: list[Any]) -> HessianTrack | None:
    """A finished probe run read back (None, or RecordError, when a record is missing, damaged or short)."""
    if read_record(run / HESSIAN_SUMMARY) is None:
        return None
    rows = PointTable(run / HESSIAN_TABLE, key)
    density = PointTable(run / DENSITY_TABLE, key)
    missing = [p for p in points if not rows.done(p) or (settings.density and not density.done(p))]
    if missing:
        raise RecordError(f"records {HESSIAN_TABLE} and {DENSITY_TABLE} of {run.path.name} lack the probes at "
                          f"{key} = {missing}")
    rows.keep(points)
    return HessianTrack(run.path, rows.rows, density.rows)


def _edge_of_stability(cfg: Config) -> float | None:
    """2/lr for SGD ((2 + 2β)/lr with heavy-ball momentum β); None for Adam."""
    o = cfg.optimizer
    if o.name != "sgd":
        return None
    return (2 + 2 * o.momentum) / o.lr


def config_from_run(run_dir: str | Path) -> Config:
    """The Config of a train run directory (results root = its parent)."""
    from ..config import from_dict
    from ..store.files import read_json

    run_dir = Path(run_dir)
    manifest_path = run_dir / MANIFEST
    if not manifest_path.is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a run directory (no manifest.json)")
    manifest = read_json(manifest_path)
    if manifest.get("kind") != "train":
        raise ConfigError(f"{str(run_dir)!r} is a {manifest.get('kind')!r} run; give a train run directory")
    config = dict(manifest["config"])
    config.pop("runtime", None)
    cfg = from_dict(config).with_overrides({"runtime.results_root": str(run_dir.parent)})
    if cfg.run_hash() != manifest["hash"]:
        raise ConfigError(f"{str(run_dir)!r}: its manifest does not reproduce its hash; was it edited by hand?")
    return cfg


class TrackStage:
    """Hessian tracks of a trunk as a stage. args: ``at``, ``every`` (see ``hessian_track``)."""

    name = HESSIAN
    settings = HessianSettings

    def key(self, ctx: Context, settings: HessianSettings, *, at: str | Sequence[str | int] = "all",
            every: str | None = None) -> dict[str, Any]:
        return track_key(ctx.cfg, settings, track_steps(ctx, at, every))

    def needs(self, ctx: Context, settings: HessianSettings, *, at: str | Sequence[str | int] = "all",
              every: str | None = None) -> list[Need]:
        """The trunk with a checkpoint at every probed step (the final one it always keeps)."""
        steps = [s for s in track_steps(ctx, at, every) if s < ctx.total_steps]
        return [Need(TRAIN, ctx.cfg, None, {"extra_checkpoints": steps})]

    def run(self, ctx: Context, settings: HessianSettings, *, at: str | Sequence[str | int] = "all",
            every: str | None = None) -> HessianTrack:
        return hessian_track(ctx.cfg, settings, at=at, every=every, ctx=ctx)


class PathStage:
    """Hessian probes along the path between two siblings as a stage. args: ``rewind_step``, ``alphas``,
    ``siblings`` (SiblingSettings), ``bn_batches`` (see ``hessian_path``)."""

    name = HESSIAN
    settings = HessianSettings

    def key(self, ctx: Context, settings: HessianSettings, *, rewind_step: int | str,
            alphas: Sequence[float] = PATH_ALPHAS, siblings: SiblingSettings | None = None,
            bn_batches: int = 20) -> dict[str, Any]:
        step, alphas = _path_point(ctx, rewind_step, alphas)
        return path_key(ctx.cfg, settings, step, alphas, siblings or SiblingSettings(), bn_batches)

    def needs(self, ctx: Context, settings: HessianSettings, *, rewind_step: int | str,
              siblings: SiblingSettings | None = None, **args: Any) -> list[Need]:
        """The two siblings of the rewind step."""
        step, _ = _path_point(ctx, rewind_step, args.get("alphas", PATH_ALPHAS))
        return [Need(SIBLINGS, ctx.cfg, siblings or SiblingSettings(), {"rewind_step": step})]

    def run(self, ctx: Context, settings: HessianSettings, *, rewind_step: int | str, **args: Any) -> HessianTrack:
        return hessian_path(ctx.cfg, settings, rewind_step, ctx=ctx, **args)


TRACK_STAGE, PATH_STAGE = TrackStage(), PathStage()


__all__ = ["PATH_STAGE", "TRACK_STAGE", "HessianTrack", "config_from_run", "hessian_path", "hessian_settings",
           "hessian_track", "path_key", "track_key"]
