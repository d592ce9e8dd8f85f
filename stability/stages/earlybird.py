"""Early-bird tickets (You et al. 2020, "Drawing early-bird tickets", ICLR): a ticket drawn early in training.

**Masks along training.** At every *mask point* of the dense trunk (step 0, every ``every`` iterations,
and the final step; ``every`` defaults to ``training.eval_every``) the mask that pruning to ``density``
would choose is computed from the trunk's weights at that step:

- ``magnitude`` (unstructured): global magnitude pruning over every prunable weight (conv and linear
  weights; ``stability.maths.pruning.prune``, strategy ``global``): the ``round((1 - density) * n)`` smallest
  |w| are removed, ties broken by position.
- ``channel`` (the paper's masks, models with BatchNorm): the BatchNorm scaling factors |γ| of all
  BatchNorm layers ranked together (one global threshold, as the paper's network slimming): the
  ``round((1 - density) * C)`` channels with the smallest |γ| are removed, ties broken by position. (The
  authors' code removes every channel with |γ| <= the value at index ``int(C * ratio)`` of the sorted
  factors, one channel more than the ratio plus ties; here the count is exact.) ``density`` is the
  fraction of BatchNorm channels kept; 1 - density is the paper's channel pruning ratio.

**Distance.** The normalized Hamming distance between two masks: the fraction of positions (prunable
weights; for channel masks, BatchNorm channels) whose 0/1 differs. Every pair of mask points is
measured (the paper's Figure 2 heat map).

**Detection.** Rule ``consecutive`` is the paper's (Algorithm 1: a FIFO queue Q of length l receives
the distance between the current and the last mask at every point; stop when max(Q) < ε), in the words
of the authors' README: "we measure the mask distance [between] consecutive epochs ... we will stop to
draw EB tickets when the last five recorded mask distances are all smaller than given threshold". Here
the queue holds the last l = ``window`` distances between neighbouring mask points, and the early-bird
step is the first mask point at which the queue is full and its largest distance is below ``threshold``
(ε = 0.1 and l = 5 in the paper; the paper's text itself could not be opened where this was written, the
README and code of GATECH-EIC/Early-Bird-Tickets were). Rule ``latest`` is what the authors' released code does instead
(``EarlyBird.cal_dist`` in main.py of GATECH-EIC/Early-Bird-Tickets): it keeps the last ``window + 1``
masks and compares the newest one with each of the ``window`` earlier ones; their ``epoch_keep = 5``
masks are ``window = 4`` here. Both rules fire when every distance in the window is strictly below the
threshold (the released code accepts equality); both need ``window + 1`` mask points before they can fire.

**Exactly the masks of training.** A trunk checkpoint is bit-identical to the state the uninterrupted
run had at that step (exact resume, see ``stability.stages.trunk``), so the masks computed here from the
checkpoints at the mask points are exactly the masks a hook inside the training loop would compute at
those steps; the suite trains the trunk with a checkpoint at every mask point (or replays the ones a
finished trunk lacks) and computes the masks from them.

**The ticket.** The mask drawn at the detected step is applied to the weights at the rewind step
(IMP's convention: step 0 by default, any step before the end like ``500it``; kept weights rewound,
optimizer state fresh, the trunk's data order) and the sparse network is trained to the final step as a
masked branch (``siblings.train_branch``: resumable, pruned coordinates held at zero with their
gradients and momentum). A channel mask is applied as a weight mask: each removed channel zeroes the
filter (and bias) of the convolution or linear layer that feeds its BatchNorm and that BatchNorm's γ and
β, so the channel's output is exactly zero, as if it were removed. (The ticket's ``weight_density``
counts the prunable weights its mask keeps; the weights of the next layer that read a removed
channel's zeros are not masked and count as kept, so a physically slimmed network is smaller still,
and ``channel_density`` is the kept fraction of channels.) When detection never fires no ticket
is trained: the run is complete, its summary says ``detected_step: null``, and nothing pretends otherwise.

**Cost against IMP** (iterations, T the final step, k the rewind step, t* the early-bird step): the
early-bird ticket needs the trunk up to max(t*, k) plus one training of the ticket from k to T. IMP to
the same density with prune fraction p needs L = ceil(log(density) / log(1 - p)) levels: the dense
training (T) plus L trainings from k to T. ``prune_fraction`` only sizes this comparison; it does not
name the run (a rerun with another value rewrites that part of the summary).

Results in ``results_root/earlybird_<hash>/`` (hash of the trunk's and these settings): ``points.csv``,
``distances.csv``, ``earlybird.json``, ``mask.safetensors`` and ``ticket_<mask digest>/``. The masks,
distances, detection and cost are pure functions in ``stability.maths.earlybird``; this module runs them.
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import Config, settings_from_table, settings_hash
from ..engine import Members
from ..errors import ConfigError, RecordError, TrainingDiverged
from ..maths.earlybird import (
    RULES,
    batchnorm_layers,
    channel_keep,
    channel_masks,
    detect,
    distance_matrix,
    flat_mask,
    magnitude_masks,
    training_cost,
    window_maxima,
)
from ..maths.health import DEFAULT_CHANCE_MARGIN, chance_error, is_untrained
from ..maths.pruning import Masks, prunable_names
from ..methods import method_of
from ..models import has_batchnorm
from ..steps import Step, format_step, to_iterations
from ..store.files import RunDir, read_csv, read_json, save_tensors, write_csv, write_json
from ..store.schema import (
    EARLYBIRD,
    EARLYBIRD_DISTANCE_COLUMNS,
    EARLYBIRD_DISTANCES,
    EARLYBIRD_MASK,
    EARLYBIRD_POINT_COLUMNS,
    EARLYBIRD_POINTS,
    EARLYBIRD_SUMMARY,
    EARLYBIRD_TICKET,
    METRICS,
)
from .base import mask_digest, run_once, settings_key
from .context import Context, prepare
from .siblings import train_branch
from .training import early_stop
from .trunk import TrainResult, train_trunk, trunk_checkpoint

MASK_KINDS = ("magnitude", "channel")


@dataclass(frozen=True)
class EarlybirdSettings:
    """How early-bird tickets are searched for and trained."""

    mask: str = "magnitude"  # magnitude (global |w| over prunable weights) | channel (BatchNorm |gamma|)
    density: float = 0.5  # kept fraction: of prunable weights (magnitude) or of BatchNorm channels (channel)
    threshold: float = 0.1  # epsilon: fires when every distance in the window is below this
    window: int = 5  # l: distances in the FIFO queue
    rule: str = "consecutive"  # consecutive (the paper's Algorithm 1) | latest (the authors' released code)
    every: str = ""  # mask-point cadence, a step like "50it"; "" = training.eval_every
    rewind: str = "0"  # the ticket's start: a step before the end (IMP's convention)
    prune_fraction: float = 0.2  # IMP's per-level fraction, for the cost comparison only

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> EarlybirdSettings:
        if self.mask not in MASK_KINDS:
            raise ConfigError(f"earlybird.mask: unknown mask kind {self.mask!r}; choose one of {', '.join(MASK_KINDS)}")
        if _not_number(self.density) or not 0 < self.density < 1:
            raise ConfigError(f"earlybird.density: must be in (0, 1) (the kept fraction), got {self.density!r}")
        if _not_number(self.threshold) or not 0 < self.threshold <= 1:
            raise ConfigError(f"earlybird.threshold: must be in (0, 1] (a fraction of positions), got "
                              f"{self.threshold!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 2:
            raise ConfigError(f"earlybird.window: must be an integer >= 2 (distances in the queue), got "
                              f"{self.window!r}")
        if self.rule not in RULES:
            raise ConfigError(f"earlybird.rule: unknown rule {self.rule!r}; choose one of {', '.join(RULES)}")
        if _not_number(self.prune_fraction) or not 0 < self.prune_fraction < 1:
            raise ConfigError(f"earlybird.prune_fraction: must be in (0, 1), got {self.prune_fraction!r}")
        if self.every:
            Step.parse(self.every, "earlybird.every")
        Step.parse(self.rewind, "earlybird.rewind")
        return self


def _not_number(value: Any) -> bool:
    return isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value)


def earlybird_settings(table: Mapping[str, Any] | None = None, **overrides: Any) -> EarlybirdSettings:
    """Settings from a table (``{"density": 0.2, ...}``) plus keyword overrides (None = not given)."""
    return settings_from_table(EarlybirdSettings, "earlybird", table, **overrides)


# ---------------------------------------------------------------- the driver
@dataclass
class EarlybirdResult:
    """An early-bird search (and its ticket, when detection fired)."""

    run_dir: Path
    detected_step: int | None
    steps: list[int]
    points: list[dict[str, Any]] = field(repr=False)
    distances: list[list[float]] = field(repr=False)
    summary: dict[str, Any] = field(repr=False)
    reused: bool = False

    def dataframe(self):
        """points.csv as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.points)


@dataclass
class _Plan:
    points: list[int]
    rewind_step: int
    every: int
    names: list[str]  # magnitude: the prunable weights
    layers: list[tuple[str, str | None]]  # channel: (BatchNorm, feeding layer)


def _plan(ctx: Context, settings: EarlybirdSettings) -> _Plan:
    """Mask points, rewind step and what is masked; every setting that needs the model is checked here."""
    T = ctx.total_steps
    every = to_iterations(settings.every or ctx.cfg.training.eval_every, ctx.ipe,
                          "earlybird.every" if settings.every else "training.eval_every")
    if every < 1:
        raise ConfigError(f"earlybird.every: must be at least 1 iteration, got {settings.every!r}")
    points = sorted({*range(0, T, every), T})
    if len(points) < settings.window + 1:
        raise ConfigError(f"earlybird.window: {settings.window} distances need at least {settings.window + 1} mask "
                          f"points, but every {every}it up to the final step {T}it gives {len(points)}; lower "
                          "earlybird.every or the window")
    rewind = to_iterations(settings.rewind, ctx.ipe, "earlybird.rewind")
    if rewind >= T:
        raise ConfigError(f"earlybird.rewind: step {settings.rewind!r} = iteration {rewind} is at or past the final "
                          f"step {T}; rewind to an earlier step")
    names: list[str] = []
    layers: list[tuple[str, str | None]] = []
    if settings.mask == "magnitude":
        names = prunable_names(ctx.model)
        if not names:
            raise ConfigError(f"earlybird.mask: model {ctx.cfg.model.name!r} has no prunable weights for "
                              "'magnitude' masks")
    else:
        layers = batchnorm_layers(ctx.new_model(), ctx.data.input_shape) if has_batchnorm(ctx.model) else []
        if not layers:
            raise ConfigError(f"earlybird.mask: 'channel' masks come from BatchNorm scaling factors, and model "
                              f"{ctx.cfg.model.name!r} has no BatchNorm with them; choose one of "
                              f"{', '.join(MASK_KINDS)} ('magnitude' fits any model)")
    return _Plan(points, rewind, every, names, layers)


def earlybird_key(cfg: Config, settings: EarlybirdSettings, plan: _Plan) -> dict[str, Any]:
    """The settings that name an early-bird run: the trunk and the resolved steps (not the IMP comparison)."""
    return {"trunk": cfg.run_hash(),
            "earlybird": {**settings_key(settings, drop=("prune_fraction", "every", "rewind"), legacy="earlybird"),
                          "every": plan.every, "rewind_step": plan.rewind_step}}


def _point_masks(state: Mapping[str, Tensor], settings: EarlybirdSettings, plan: _Plan) -> tuple[Tensor, Masks]:
    """(the flat mask whose distances are measured, the weight masks that train it) at one point."""
    if settings.mask == "magnitude":
        masks = magnitude_masks(state, plan.names, settings.density)
        return flat_mask(masks), masks
    keep = channel_keep(state, plan.layers, settings.density)
    return keep, channel_masks(keep, plan.layers, state)


def run_earlybird(cfg: Config, settings: EarlybirdSettings = EarlybirdSettings(), *,
                  ctx: Context | None = None) -> EarlybirdResult:
    """Search for (or reuse) the early-bird step of the trunk of ``cfg`` and train its ticket.

    Bad settings raise ConfigError before anything is written. A run whose ticket diverged raises
    TrainingDiverged, now and on every rerun.
    """
    settings.validate()
    method = method_of(cfg)
    if not (method.trains_weights and method.accepts_masks):
        raise ConfigError(f"training.method: early-bird tickets are drawn from a network whose weights train; "
                          f"{method.name!r} is not available here; use training.method = standard")
    ctx = ctx or prepare(cfg)
    plan = _plan(ctx, settings)
    key = earlybird_key(cfg, settings, plan)
    run = RunDir(cfg.runtime.results_root, EARLYBIRD, settings_hash(key))
    t0 = time.perf_counter()

    def start(run: RunDir) -> TrainResult:
        trunk = train_trunk(cfg, extra_checkpoints=plan.points, ctx=ctx)
        run.start({"training": cfg.to_dict(), "earlybird": asdict(settings)}, key,
                  {"final_step": ctx.total_steps, "trunk": str(trunk.run_dir)})
        return trunk

    def compute(run: RunDir, trunk: TrainResult) -> EarlybirdResult:
        flats, kept = [], []
        for step in plan.points:
            flat, _ = _point_masks(trunk_checkpoint(ctx, step).member_state_dict(0), settings, plan)
            flats.append(flat)
            kept.append(int(flat.sum()))
        matrix = distance_matrix(flats)
        found = detect(matrix, settings.threshold, settings.window, settings.rule)
        maxima = window_maxima(matrix, settings.window, settings.rule)
        points = [{"step": s, "distance_previous": float(matrix[i, i - 1]) if i else "",
                   "window_max": "" if maxima[i] is None else maxima[i],
                   "below_threshold": maxima[i] is not None and maxima[i] < settings.threshold,
                   "detected": i == found, "kept": kept[i], "total": int(flats[i].numel())}
                  for i, s in enumerate(plan.points)]
        write_csv(run / EARLYBIRD_POINTS, points, EARLYBIRD_POINT_COLUMNS)
        write_csv(run / EARLYBIRD_DISTANCES, [{"step_a": a, "step_b": b, "distance": float(matrix[i, j])}
                                              for i, a in enumerate(plan.points) for j, b in enumerate(plan.points)],
                  EARLYBIRD_DISTANCE_COLUMNS)
        dense = trunk.final
        summary: dict[str, Any] = {
            "detected": found is not None, "detected_step": None if found is None else plan.points[found],
            "mask": settings.mask, "target_density": settings.density, "threshold": settings.threshold,
            "window": settings.window, "rule": settings.rule, "every": plan.every, "points": plan.points,
            "final_step": ctx.total_steps, "rewind_step": plan.rewind_step,
            "dense_final_test_accuracy": 1 - dense["test_error"], "trunk_dir": str(trunk.run_dir),
            "settings": asdict(settings), "config": cfg.to_dict()}
        if found is None:
            kept_max = [m for m in maxima if m is not None]
            summary["note"] = (f"no early-bird ticket: the largest of the last {settings.window} mask distances "
                               f"({settings.rule}) never fell below {settings.threshold} at any of "
                               f"{len(plan.points)} mask points (smallest window maximum "
                               f"{min(kept_max):.4f}); no ticket was trained")
            summary["ticket"] = None
            summary["cost"] = None
        else:
            summary["ticket"] = _train_ticket(ctx, run, plan, settings, plan.points[found])
            summary["cost"] = training_cost(plan.points[found], plan.rewind_step, ctx.total_steps, settings.density,
                                            settings.prune_fraction)
        summary["seconds"] = round(time.perf_counter() - t0, 3)
        summary["run_dir"] = str(run.path)
        write_json(run / EARLYBIRD_SUMMARY, summary)
        return EarlybirdResult(run.path, summary["detected_step"], plan.points, points, matrix.tolist(), summary)

    return run_once(run, load=lambda r: _load(r, settings, ctx.total_steps), start=start, compute=compute,
                    accept_other_versions=cfg.runtime.accept_other_versions)


def _train_ticket(ctx: Context, run: RunDir, plan: _Plan, settings: EarlybirdSettings, step: int) -> dict[str, Any]:
    """Prune at ``step``, rewind to the rewind step and train to the end; the ticket's record."""
    _, masks = _point_masks(trunk_checkpoint(ctx, step).member_state_dict(0), settings, plan)
    save_tensors(run / EARLYBIRD_MASK, masks, {"step": step, "mask": settings.mask, "density": settings.density})
    rewind = trunk_checkpoint(ctx, plan.rewind_step)
    start = Members.from_model_states([rewind.member_state_dict(0)], list(rewind.params), plan.rewind_step,
                                      rewind.order_seeds, rewind.aug_seeds, ctx.device)  # optimizer state fresh
    ticket_run = RunDir(run.path, EARLYBIRD_TICKET, mask_digest(masks))
    ticket_run.path.mkdir(parents=True, exist_ok=True)
    stacked = {k: v.unsqueeze(0).to(ctx.device) for k, v in masks.items()}
    eval_every = to_iterations(ctx.cfg.training.eval_every, ctx.ipe)
    try:
        train_branch(ctx, ticket_run, start, ctx.total_steps, masks=stacked,
                               desc=f"early-bird ticket @{format_step(step)}", eval_every=eval_every)
    except TrainingDiverged as exc:  # run_once marks the run diverged, naming the ticket's directory
        exc.run_dir = str(ticket_run.path)
        raise
    stopped = early_stop(read_csv(ticket_run / METRICS), 0)
    shapes = dict(ctx.model.named_parameters())
    prunable = prunable_names(ctx.model)
    # prunable weights the mask keeps (a channel mask leaves layers that feed no BatchNorm whole)
    surviving = sum(int((masks[n] != 0).sum()) if n in masks else shapes[n].numel() for n in prunable)
    total = sum(shapes[n].numel() for n in prunable)
    record = {"step": step, "rewind_step": plan.rewind_step, **stopped, "weight_density": surviving / total,
              "ticket_dir": str(ticket_run.path), "mask_file": str(run / EARLYBIRD_MASK)}
    # a ticket at chance is not a result: flagged, never reported as a ticket's accuracy
    chance = chance_error(ctx.data.split("test")[1])
    untrained = is_untrained(1 - stopped["final_test_accuracy"], chance, DEFAULT_CHANCE_MARGIN)
    record["status"] = "untrained" if untrained else "ok"
    if settings.mask == "channel":
        keep = torch.cat([masks[f"{bn}.weight"].reshape(-1) for bn, _ in plan.layers])
        record["channel_density"] = float(keep.mean())
    return record


def _load(run: RunDir, settings: EarlybirdSettings, total_steps: int) -> EarlybirdResult:
    """A finished run read back (RecordError: missing or damaged records); the IMP comparison redone for this
    call's prune fraction."""
    try:
        return _read_back(run, settings, total_steps)
    except (KeyError, TypeError, ValueError, FileNotFoundError) as exc:
        raise RecordError(f"finished early-bird run {run.path.name} cannot be read back "
                          f"({type(exc).__name__}: {exc})") from None


def _read_back(run: RunDir, settings: EarlybirdSettings, total_steps: int) -> EarlybirdResult:
    summary = read_json(run / EARLYBIRD_SUMMARY)
    points = read_csv(run / EARLYBIRD_POINTS)
    rows = read_csv(run / EARLYBIRD_DISTANCES)
    steps = [int(p["step"]) for p in points]
    index = {s: i for i, s in enumerate(steps)}
    matrix = [[math.nan] * len(steps) for _ in steps]
    for r in rows:
        matrix[index[int(r["step_a"])]][index[int(r["step_b"])]] = float(r["distance"])
    if any(math.isnan(v) for row in matrix for v in row):
        raise RecordError(f"record {str(run / EARLYBIRD_DISTANCES)!r} lacks pairs of mask points")
    found = summary["detected_step"]
    if found is not None and summary.get("ticket") is None:
        raise RecordError(f"record {str(run / EARLYBIRD_SUMMARY)!r} has a detected step but no ticket")
    if found is not None:
        cost = training_cost(found, summary["rewind_step"], total_steps, settings.density, settings.prune_fraction)
        if cost != summary.get("cost"):
            summary["cost"] = cost
            summary["settings"] = {**summary.get("settings", {}), "prune_fraction": settings.prune_fraction}
            write_json(run / EARLYBIRD_SUMMARY, summary)
    summary["run_dir"] = str(run.path)  # the run may have been moved since
    return EarlybirdResult(run.path, found, steps, points, matrix, summary, reused=True)


__all__ = ["MASK_KINDS", "EarlybirdResult", "EarlybirdSettings", "earlybird_key", "earlybird_settings", "run_earlybird"]
