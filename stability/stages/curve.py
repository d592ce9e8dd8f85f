"""``stability curve``: a curve of low loss fitted between two trained networks, beside the straight line.

The two networks are finished train runs (their final weights), dense IMP levels, state-dict files (with the
architecture and data of ``[model]`` and ``[dataset]``; ``stages.external``), or, in a sweep (``curve_sweep``),
two siblings at each rewind point of an instability sweep. The middle point (Bezier) or bend (polygonal chain) is
fitted on the training split by ``lmc.fit.fit_middle`` (Garipov et al. 2018), B optionally aligned to A first
(Tatro et al. 2020), and the curve and the line are measured at ``points`` evenly spaced t on every split.

A run is named, as ``connect`` names its runs, by both networks' tensor digests, the architecture, the dataset and
the settings that change the result (the seed included; ``checkpoint_every`` names nothing). The fit is
checkpointed every ``checkpoint_every`` steps in the run directory: a killed run resumes there and finishes
bit-identical. Records (``curve_<hash>/``): ``curve.csv``, ``fit.csv``, ``summary.json``, ``middle.safetensors``
(and ``aligned_b.safetensors`` when aligned); see ``store.schema``.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import Tensor

from ..config import Config, settings_from_table, settings_hash
from ..config.nested import flat_settings
from ..engine.precision import eval_precision_key
from ..errors import ConfigError
from ..lmc.curves import align as align_networks
from ..lmc.fit import FitSettings, TrainBatches, fit_middle, measure_curve
from ..lmc.networks import private
from ..maths.bezier import t_grid
from ..maths.interpolation import error_barrier
from ..methods import method_of
from ..models.build import has_batchnorm
from ..steps import INDEPENDENT_STEP, Step, point_name
from ..store.files import (
    RunDir,
    load_tensors,
    read_record,
    read_table,
    save_tensors,
    short_digest,
    write_csv,
    write_json,
)
from ..store.schema import (
    CURVE,
    CURVE_ALIGNED,
    CURVE_FIT,
    CURVE_FIT_COLUMNS,
    CURVE_MIDDLE,
    CURVE_STATE,
    CURVE_SUMMARY,
    CURVE_TABLE,
    CURVE_TABLE_COLUMNS,
)
from .base import Need, run_once, settings_key
from .connect import Network, load_network
from .context import Context, prepare
from .external import data_key, read_network
from .instability import SPLITS, InstabilitySettings, independent_members, instability_sweep

CURVE_BN = ("reset", "interpolate")
CURVE_ALIGN = ("none", "weights", "activations")


@dataclass(frozen=True)
class CurveFitSettings:
    """How the curve is fitted (``fit``, flat: ``curve.kind``, ``curve.steps``, ``curve.lr``, ...) and measured."""

    fit: FitSettings = field(default_factory=FitSettings)
    points: int = 21  # evenly spaced t in [0, 1] where the curve and the line are measured
    splits: tuple[str, ...] = ("test", "train")
    bn: str = "reset"  # reset (BatchNorm statistics recomputed at every t on training data) | interpolate
    bn_batches: int = 20  # training batches (of the run's eval batch size) for bn = reset
    align: str = "none"  # none | weights | activations: B aligned to A before fitting (Tatro et al. 2020)
    checkpoint_every: str = "100it"  # the fit's checkpoint cadence (names nothing)

    UNHASHED = ("checkpoint_every",)

    def validate(self) -> CurveFitSettings:
        """Check every setting; errors name ``curve.<setting>``."""
        self.fit.validate("curve.")
        t_grid(self.points, "curve.points")
        if not self.splits or any(s not in SPLITS for s in self.splits):
            raise ConfigError(f"curve.splits: unknown split in {list(self.splits)}; choose from {', '.join(SPLITS)}")
        for name, allowed in (("bn", CURVE_BN), ("align", CURVE_ALIGN)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"curve.{name}: unknown option {getattr(self, name)!r}; choose one of "
                                  f"{', '.join(allowed)}")
        if self.bn_batches < 1:
            raise ConfigError(f"curve.bn_batches: must be at least 1 training batch, got {self.bn_batches}")
        Step.parse(self.checkpoint_every, "curve.checkpoint_every")
        return self


def curve_settings(table: Mapping[str, Any] | None = None, **overrides: Any) -> CurveFitSettings:
    """Settings from a ``[curve]`` table and keyword overrides (None = not given), with clear errors."""
    return settings_from_table(CurveFitSettings, "curve", table, **overrides)


@dataclass
class CurveResult:
    """A fitted curve's record: barriers of the curve and the line per split, the rows of ``curve.csv``, the
    middle point."""

    run_dir: Path
    barriers: dict[str, float]
    loss_barriers: dict[str, float]
    line_barriers: dict[str, float]
    line_loss_barriers: dict[str, float]
    rows: list[dict[str, Any]] = field(repr=False)
    summary: dict[str, Any] = field(repr=False)
    middle: dict[str, Tensor] = field(repr=False)
    reused: bool = False

    def dataframe(self):
        """``curve.csv`` as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.rows, columns=CURVE_TABLE_COLUMNS)


def curve_key(cfg: Config, settings: CurveFitSettings, a: Network, b: Network) -> dict[str, Any]:
    """What names a curve run: both networks' contents (as ``connect`` names them), the architecture and the data of
    ``cfg``, and the settings."""
    return {"a": short_digest(a.state), "b": short_digest(b.state),
            "model": settings_key(cfg.model, legacy="connect.model"), "dataset": cfg.dataset.name,
            **data_key(cfg), "curve": settings_key(settings), **eval_precision_key(cfg.runtime)}


def _barriers(rows: Sequence[Mapping[str, Any]], path: str, column: str) -> dict[str, float]:
    out: dict[str, list[float]] = {}
    for r in rows:
        if r["path"] == path:
            out.setdefault(r["split"], []).append(float(r[column]))
    return {s: error_barrier(v) for s, v in out.items()}


def _result(run: RunDir, rows: list[dict[str, Any]], summary: dict[str, Any], middle: dict[str, Tensor],
            reused: bool) -> CurveResult:
    return CurveResult(run.path, summary["barrier"], summary["loss_barrier"], summary["line_barrier"],
                       summary["line_loss_barrier"], rows, summary, middle, reused)


def fit_networks(ctx: Context, settings: CurveFitSettings, a: Network, b: Network,
                 t0: float | None = None) -> CurveResult:
    """The curve between two checked networks of ``ctx``'s architecture and data, fitted and recorded (resumed, or
    reused when finished) under the name ``curve_key`` hashes to."""
    settings.validate()
    t0 = time.perf_counter() if t0 is None else t0
    if a.masks is not None or b.masks is not None:
        raise ConfigError("RUN: a curve joins dense networks; these are sparse (IMP levels above 0), and the fitted "
                          "middle point would have neither's mask")
    if not method_of(ctx.cfg).trains_weights:
        raise ConfigError(f"RUN: strong tickets ({ctx.cfg.training.method}) train scores, not weights; a curve joins "
                          "networks whose weights were trained")
    x, y = ctx.data.x_train, ctx.data.y_train
    batches = TrainBatches((x, y), settings.fit.batch_size, settings.fit.seed)  # checks the batch size
    steps = settings.fit.iterations(batches.per_epoch, "curve.")
    every = Step.parse(settings.checkpoint_every).to_iterations(batches.per_epoch)
    if every < 1:
        raise ConfigError(f"curve.checkpoint_every: must be at least 1 iteration, got {settings.checkpoint_every!r}")
    grid = t_grid(settings.points, "curve.points")
    key = curve_key(ctx.cfg, settings, a, b)
    order = list(ctx.model.state_dict())

    def load(run: RunDir) -> CurveResult | None:
        summary, rows = read_record(run / CURVE_SUMMARY), read_table(run, CURVE_TABLE, CURVE_TABLE_COLUMNS)
        if summary is None or rows is None or not (run / CURVE_MIDDLE).is_file() \
                or any(s not in summary.get("barrier", {}) for s in settings.splits):
            return None
        middle, _ = load_tensors(run / CURVE_MIDDLE)
        return _result(run, rows, summary, middle, True)

    def compute(run: RunDir, _: None) -> CurveResult:
        dev = ctx.device
        net = private(ctx.model, dev)
        end_a = {k: a.state[k].to(dev) for k in order}
        end_b = {k: b.state[k].to(dev) for k in order}
        if settings.align != "none":
            aligned, _ = align_networks(end_a, end_b, settings.align, (x, y), model=net)
            end_b = {k: v.detach().to(dev) for k, v in aligned.state_dict().items()}
            save_tensors(run / CURVE_ALIGNED, end_b)
        fit = fit_middle(net, end_a, end_b, batches, settings.fit, steps, checkpoint=run / CURVE_STATE,
                         checkpoint_every=every, identity={"align": settings.align})
        rows: list[dict[str, Any]] = []
        chance: dict[str, float | None] = {}
        untrained = []
        for split in settings.splits:
            curve, line = measure_curve(net, end_a, fit.middle, end_b, settings.fit.kind, grid,
                                        ctx.data.split(split), bn=settings.bn, bn_data=(x, y),
                                        bn_batches=settings.bn_batches, batch_size=ctx.cfg.runtime.eval_batch_size,
                                        precision=ctx.cfg.runtime.eval_precision)
            chance[split] = curve.chance
            if line.untrained:
                untrained.append(split)
            for path, c in (("curve", curve), ("line", line)):
                rows += [{"path": path, "split": split, "t": t, "error": e, "loss": v}
                         for t, e, v in zip(grid, c.error, c.loss)]
        tail = fit.trace[-max(1, len(fit.trace) // 10):]
        summary = {"a": a.source, "b": b.source, "kind": settings.fit.kind, "seed": settings.fit.seed,
                   "batchnorm": has_batchnorm(ctx.model),  # readers note the BatchNorm handling only for such models
                   "settings": flat_settings(settings), "iterations": steps,
                   "barrier": _barriers(rows, "curve", "error"), "loss_barrier": _barriers(rows, "curve", "loss"),
                   "line_barrier": _barriers(rows, "line", "error"),
                   "line_loss_barrier": _barriers(rows, "line", "loss"), "chance": chance, "untrained": untrained,
                   "fit_loss": sum(v for _, v in tail) / len(tail),
                   "seconds": round(time.perf_counter() - t0, 3)}
        save_tensors(run / CURVE_MIDDLE, {k: v.cpu() for k, v in fit.middle.items()},
                     {"kind": settings.fit.kind, "seed": settings.fit.seed})
        write_csv(run / CURVE_FIT, [{"step": i, "t": t, "loss": v} for i, (t, v) in enumerate(fit.trace)],
                  CURVE_FIT_COLUMNS)
        write_csv(run / CURVE_TABLE, rows, CURVE_TABLE_COLUMNS)
        write_json(run / CURVE_SUMMARY, summary)
        return _result(run, rows, summary, {k: v.cpu() for k, v in fit.middle.items()}, False)

    run = RunDir(ctx.cfg.runtime.results_root, CURVE, settings_hash(key))
    return run_once(run, load=load, compute=compute, accept_other_versions=ctx.cfg.runtime.accept_other_versions,
                    start=lambda r: r.start({"curve": flat_settings(settings), "a": a.source, "b": b.source,
                                             "model": asdict(ctx.cfg.model), "dataset": asdict(ctx.cfg.dataset)},
                                            key, {}))


def _same_architecture(a: Network, b: Network) -> None:
    for section in ("model", "dataset"):
        # dropout has no parameters: networks trained with and without it have the same architecture
        sa, sb = getattr(a.cfg, section), getattr(b.cfg, section)
        if hasattr(sa, "dropout"):
            sa, sb = replace(sa, dropout=0.0), replace(sb, dropout=0.0)
        if sa != sb:
            raise ConfigError(f"RUN: the two networks differ in [{section}] ({getattr(a.cfg, section)} vs "
                              f"{getattr(b.cfg, section)}); a curve joins networks of one architecture on one dataset")


def fit_curve_runs(path_a: str | Path, path_b: str | Path, settings: CurveFitSettings = CurveFitSettings(), *,
                   results_root: str | None = None) -> CurveResult:
    """The curve from network A to network B: finished train runs or dense IMP levels (``connect``'s networks)."""
    settings.validate()
    t0 = time.perf_counter()
    a, b = load_network(path_a, results_root), load_network(path_b, results_root)
    _same_architecture(a, b)
    return fit_networks(prepare(a.cfg), settings, a, b, t0)


def fit_curve_files(path_a: str | Path, path_b: str | Path, cfg: Config,
                    settings: CurveFitSettings = CurveFitSettings()) -> CurveResult:
    """The curve from the network in file A to the one in file B, both of ``cfg.model``'s architecture, fitted and
    measured on ``cfg.dataset``; recorded under ``cfg.runtime.results_root``."""
    settings.validate()
    t0 = time.perf_counter()
    ctx = prepare(cfg)
    a, b = read_network(path_a, ctx, "A"), read_network(path_b, ctx, "B")
    return fit_networks(ctx, settings, a, b, t0)


@dataclass
class CurveSweep:
    """The curve barrier beside the line's at each rewind point of an instability sweep (siblings ``pair``)."""

    table: list[dict[str, Any]]
    curves: dict[int, CurveResult] = field(repr=False)
    sweep_dir: Path | None = None

    def dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.table)


def curve_sweep(cfg: Config, settings: CurveFitSettings = CurveFitSettings(),
                instability: InstabilitySettings | None = None, *, pair: tuple[int, int] = (0, 1)) -> CurveSweep:
    """At each rewind point of the instability sweep of ``cfg`` and ``instability`` (run, or reused when finished), a
    curve fitted between siblings ``pair`` (each a ``curve`` run of its own), beside the line: the curve's own line
    on its t grid, and the sweep's instability (its α grid and BatchNorm mode)."""
    settings.validate()
    instability = instability or InstabilitySettings()
    i, j = pair
    if not (0 <= i < instability.siblings.siblings and 0 <= j < instability.siblings.siblings and i != j):
        raise ConfigError(f"curve pair: siblings {pair} are not two of the sweep's {instability.siblings.siblings}")
    ctx = prepare(cfg)
    sweep = instability_sweep(cfg, instability, ctx=ctx)
    measured = {(r["rewind_step"], r["split"]): r for r in sweep.table}
    names = [n for n, _ in ctx.model.named_parameters()]
    table, curves = [], {}
    diverged = {int(k) for k in sweep.summary.get("diverged", {})}
    for k in sweep.rewind_steps:
        if k in diverged:
            continue
        members = _point_members(ctx, instability, k, names)
        a, b = (Network(cfg, members.member_state_dict(n), None, f"{point_name(k)}/sibling_{n}") for n in (i, j))
        result = fit_networks(ctx, settings, a, b)
        curves[k] = result
        for split in settings.splits:
            line = measured.get((k, split), {})
            table.append({"rewind_step": k, "split": split, "line_barrier": result.line_barriers[split],
                          "curve_barrier": result.barriers[split], "line_loss_barrier": result.line_loss_barriers[split],
                          "curve_loss_barrier": result.loss_barriers[split],
                          "instability_mean": line.get("instability_mean"), "run": result.run_dir.name})
    return CurveSweep(table, curves, sweep.run_dir)


def _point_members(ctx: Context, instability: InstabilitySettings, k: int, names: Sequence[str]) -> Any:
    from .siblings import train_siblings

    if k == INDEPENDENT_STEP:
        return independent_members(ctx.cfg, ctx, instability.siblings.siblings, names)[0]
    return train_siblings(ctx, k, instability.siblings).members  # finished: reused as the sweep left them


class CurveStage:
    """``curve`` as a stage: args ``a`` and ``b``, two checked dense Networks of ``ctx``'s architecture and data."""

    name = CURVE
    settings = CurveFitSettings

    def key(self, ctx: Context, settings: CurveFitSettings, *, a: Network, b: Network) -> dict[str, Any]:
        return curve_key(ctx.cfg, settings, a, b)

    def needs(self, ctx: Context, settings: CurveFitSettings, *, a: Network, b: Network) -> list[Need]:
        return []

    def run(self, ctx: Context, settings: CurveFitSettings, *, a: Network, b: Network) -> CurveResult:
        return fit_networks(ctx, settings, a, b)


CURVE_STAGE = CurveStage()

__all__ = ["CURVE_STAGE", "CurveFitSettings", "CurveResult", "CurveSweep", "curve_key", "curve_settings",
           "curve_sweep", "fit_curve_files", "fit_curve_runs", "fit_networks"]
