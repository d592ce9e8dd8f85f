"""Trunk runs: train from initialization, keep a checkpoint at every rewind point.

A trunk run directory holds ``manifest.json``, ``metrics.csv`` (train/val/test
loss and error every ``eval_every`` steps), ``checkpoints/step_<k>.safetensors``
(full resumable state at step 0, every rewind point and the final step),
``state/latest.safetensors`` (the rolling resumable state) and ``summary.json``.
Killing the process at any moment and rerunning resumes from the newest state
and ends bit-identical (on CPU) to an uninterrupted run.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config
from ..engine import (
    Members,
    StackedModel,
    TrainSpec,
    train_members,
)
from ..errors import CheckpointError, RecordError
from ..maths.health import DEFAULT_CHANCE_MARGIN, chance_error, is_untrained
from ..steps import format_step, to_iterations
from ..store.files import RunDir, quarantine, read_record, write_json
from ..store.schema import SUMMARY, TRAIN
from .base import Need, run_once
from .checkpoints import (
    checkpoint_path,
    initial_members,
    load_members,
    save_state,
    saved_checkpoints,
)
from .context import Context, prepare
from .training import attach_hooks, read_metrics, resumable_train

__all__ = ["TRUNK_STAGE", "TrainResult", "TrunkStage", "ensure_checkpoints", "produce_checkpoints", "train_trunk", "trunk_checkpoint", "trunk_dir"]


def trunk_dir(cfg: Config) -> RunDir:
    """Where the trunk run of these settings lives."""
    return RunDir(cfg.runtime.results_root, TRAIN, cfg.run_hash())


@dataclass
class TrainResult:
    """A finished trunk run."""

    run_dir: Path
    run_hash: str
    final_step: int
    checkpoints: list[int]
    metrics: list[dict[str, Any]] = field(repr=False)
    reused: bool = False
    seconds: float = 0.0
    chance_test_error: float = float("nan")  # error of always predicting the most frequent test class
    # what the training method adds to summary.json (``Method.summary``): NEq its "neq" fractions, strong
    # tickets their "method" and "mask_density"
    method_summary: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, Any]:
        return self.metrics[-1] if self.metrics else {}

    @property
    def summary(self) -> dict[str, Any]:
        """What ``summary.json`` holds (a dict, as on every result object)."""
        f = self.final
        test_error = f.get("test_error", float("nan"))
        return {
            "run_dir": str(self.run_dir), "hash": self.run_hash, "final_step": self.final_step,
            "final_test_accuracy": 1 - f.get("test_error", float("nan")),
            "final_test_loss": f.get("test_loss"), "final_train_loss": f.get("train_loss"),
            "checkpoints": [format_step(s) for s in self.checkpoints], "reused": self.reused,
            "seconds": round(self.seconds, 3), "chance_test_error": self.chance_test_error,
            "chance_margin": DEFAULT_CHANCE_MARGIN,
            "untrained": is_untrained(test_error, self.chance_test_error, DEFAULT_CHANCE_MARGIN),
            **self.method_summary,
        }


def train_trunk(cfg: Config, *, extra_checkpoints: Iterable[int] = (), ctx: Context | None = None) -> TrainResult:
    """Train (or resume, or reuse) the trunk run of ``cfg``; checkpoints at 0, rewind points and T.

    A run that diverged (non-finite loss or weight) raises TrainingDiverged, now and on every rerun.
    """
    ctx = ctx or prepare(cfg)
    t0 = time.perf_counter()
    T = ctx.total_steps
    wanted = sorted({0, T, *ctx.steps(cfg.training.rewind_points, "training.rewind_points"), *extra_checkpoints})

    def load(run: RunDir) -> TrainResult:
        rows, method_summary, problem = _finished_records(ctx, run)
        if problem is not None:
            raise RecordError(problem)
        ensure_checkpoints(ctx, run, wanted)
        return _result(ctx, run, rows, method_summary, reused=True, seconds=time.perf_counter() - t0)

    def start(run: RunDir) -> None:
        run.start(cfg.to_dict(), cfg.hashed_dict(), {"iterations_per_epoch": ctx.ipe, "final_step": T})

    def compute(run: RunDir, _: None) -> TrainResult:
        eval_every = to_iterations(cfg.training.eval_every, ctx.ipe)
        final = resumable_train(ctx, run, initial_members(ctx), T, eval_every=eval_every, keep=wanted,
                                desc=f"train {run.hash}")
        method_summary = ctx.method.summary(ctx, run, 0, T, lambda: final.member_state_dict(0))
        result = _result(ctx, run, read_metrics(run) or [], method_summary or {}, reused=False,
                         seconds=time.perf_counter() - t0)
        write_json(run / SUMMARY, result.summary)
        return result

    return run_once(trunk_dir(cfg), load=load, start=start, compute=compute,
                    accept_other_versions=cfg.runtime.accept_other_versions,
                    again="training it again from its newest intact state")


def _finished_records(ctx: Context, run: RunDir) -> tuple[list[dict[str, Any]], dict[str, Any], str | None]:
    """A finished trunk's metrics rows and its method's part of the summary, and what is wrong with its records
    (metrics.csv, summary.json, the method's own), or None."""
    rows = read_metrics(run)
    if rows is None:
        return [], {}, "metrics.csv is missing or damaged"
    final_step = run.manifest().get("final_step")
    if not rows or rows[-1]["step"] != final_step:
        return rows, {}, (f"metrics.csv ends at step {rows[-1]['step'] if rows else None}, "
                          f"not at the final step {final_step}")
    summary = read_record(run / SUMMARY)
    if summary is None:
        return rows, {}, "summary.json is missing or damaged"
    T = ctx.total_steps
    method = ctx.method
    method_summary = method.summary(ctx, run, 0, T, lambda: _intact_state(ctx, run, T).member_state_dict(0))
    if method_summary is None:
        return rows, {}, f"{method.records} is missing or damaged"
    missing = [k for k in method_summary if k not in summary]
    if missing:  # written before the method recorded them: the repair rewrites summary.json
        return rows, method_summary, f"summary.json has no {', '.join(missing)}"
    return rows, method_summary, None


def ensure_checkpoints(ctx: Context, run: RunDir, steps: Iterable[int]) -> None:
    """Make sure a finished trunk holds intact checkpoints at ``steps``: replay missing or damaged ones.

    Every file is checked against the digest recorded when it was written (and for non-finite values).
    """
    todo = []
    for s in steps:
        path = checkpoint_path(run, s)
        if not path.is_file():
            todo.append(s)
            continue
        try:
            load_members(path, ctx)
        except CheckpointError as exc:
            quarantine(path, str(exc))
            todo.append(s)
    if todo:
        produce_checkpoints(ctx, run, todo)


def trunk_checkpoint(ctx: Context, step: int) -> Members:
    """The trunk's intact state at ``step``: trained, replayed or repaired as needed (never a damaged file)."""
    run = trunk_dir(ctx.cfg)
    path = checkpoint_path(run, step)
    if not path.is_file() or not run.is_complete():
        train_trunk(ctx.cfg, extra_checkpoints=[step], ctx=ctx)
    try:
        return load_members(path, ctx)
    except CheckpointError:
        with run.claim():
            return _intact_state(ctx, run, step)


def _intact_state(ctx: Context, run: RunDir, step: int) -> Members:
    """A claimed trunk's state at ``step``, replayed when its checkpoint is missing or damaged (moved aside)."""
    path = checkpoint_path(run, step)
    if path.is_file():
        try:
            return load_members(path, ctx)
        except CheckpointError as exc:
            quarantine(path, str(exc))
    produce_checkpoints(ctx, run, [step])
    return load_members(path, ctx)


def produce_checkpoints(ctx: Context, run: RunDir, steps: Iterable[int]) -> None:
    """Create missing checkpoints of a trunk by exact replay from the nearest earlier intact one (or step 0)."""
    sm = StackedModel(ctx.model)
    for target in sorted(steps):
        if checkpoint_path(run, target).is_file():
            continue
        members = None
        for have in sorted((s for s in saved_checkpoints(run) if s < target), reverse=True):
            try:
                members = load_members(checkpoint_path(run, have), ctx)
                break
            except CheckpointError as exc:
                quarantine(checkpoint_path(run, have), str(exc))
        if members is None:
            members = initial_members(ctx)  # step 0 is the seeded initialization: always reproducible
        spec = TrainSpec(ctx.data, ctx.cfg, ctx.ipe, augmentation=ctx.augmentation)
        # the method continues from its state in the checkpoint, as in training; a replay keeps no records
        attach_hooks(spec, ctx.method.hooks(ctx, None, 0, members.n), members)
        train_members(sm, members, spec, target)
        save_state(checkpoint_path(run, target), members)


def _result(ctx: Context, run: RunDir, rows: list[dict[str, Any]], method_summary: dict[str, Any], *,
            reused: bool, seconds: float) -> TrainResult:
    """The run's result from its metrics rows and its method's part of the summary."""
    T = ctx.total_steps
    return TrainResult(run.path, run.hash, T, saved_checkpoints(run), rows, reused, seconds,
                       chance_error(ctx.data.split("test")[1]), method_summary)


class TrunkStage:
    """Trunk runs as a stage: named by the Config itself (no settings of their own). args: ``extra_checkpoints``."""

    name = TRAIN
    settings = type(None)

    def key(self, ctx: Context, settings: None = None, *, extra_checkpoints: Iterable[int] = ()) -> dict[str, Any]:
        return ctx.cfg.hashed_dict()

    def needs(self, ctx: Context, settings: None = None, *, extra_checkpoints: Iterable[int] = ()) -> list[Need]:
        """Nothing: a trunk trains from its seeded initialization."""
        return []

    def run(self, ctx: Context, settings: None = None, *, extra_checkpoints: Iterable[int] = ()) -> TrainResult:
        return train_trunk(ctx.cfg, extra_checkpoints=extra_checkpoints, ctx=ctx)


TRUNK_STAGE = TrunkStage()
