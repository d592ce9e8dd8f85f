"""Trunk runs: train from initialization, keep a checkpoint at every rewind point.

A trunk run directory holds ``manifest.json``, ``metrics.csv`` (train/val/test
loss and error every ``eval_every`` steps), ``checkpoints/step_<k>.safetensors``
(full resumable state at step 0, every rewind point and the final step),
``state/latest.safetensors`` (the rolling resumable state) and ``summary.json``.
Killing the process at any moment and rerunning resumes from the newest state
and ends bit-identical (on CPU) to an uninterrupted run.
"""
from __future__ import annotations

import functools
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import Config, validate
from .data import DataSplits, load_dataset
from .engine import (
    Members,
    StackedModel,
    TrainSpec,
    check_matches_model,
    configure_threads,
    derive_seed,
    iterations_per_epoch,
    resolve_device,
    train_members,
)
from .errors import CheckpointError, ConfigError
from .models import build_model
from .steps import format_step, to_iterations
from .store import RunDir, load_tensors, read_csv, save_tensors, write_csv, write_json

METRIC_COLUMNS = ["step", "member", "lr", "train_loss", "train_error", "val_loss", "val_error", "test_loss", "test_error"]


@dataclass
class Context:
    """Everything derived from a Config that a stage needs: device, data, model, step arithmetic."""

    cfg: Config
    device: torch.device
    data: DataSplits
    model: nn.Module
    ipe: int
    total_steps: int

    def steps(self, values: Iterable[str | int], setting: str) -> list[int]:
        """Parse steps to iterations, each within [0, final step)."""
        out = []
        for v in values:
            it = to_iterations(v, self.ipe, setting)
            if it >= self.total_steps:
                raise ConfigError(
                    f"{setting}: step {v!r} = iteration {it} is at or past the final step "
                    f"({self.cfg.training.steps} = iteration {self.total_steps}); rewind points must come before it"
                )
            out.append(it)
        return sorted(set(out))

    def new_model(self, seed: int | None = None) -> nn.Module:
        """A freshly initialized model (seeded by init_seed unless given)."""
        seed = self.cfg.training.init_seed if seed is None else seed
        return build_model(self.cfg.model, self.data.input_shape, self.data.num_classes, seed).to(self.device)

    @property
    def augmentation(self) -> str | None:
        return self.data.augmentation


@functools.lru_cache(maxsize=4)
def _cached_dataset(dataset_cfg: Any, device: str) -> DataSplits:
    return load_dataset(dataset_cfg, device)


def prepare(cfg: Config) -> Context:
    """Validate settings, pick device and threads, load data and build the model template."""
    validate(cfg)
    device = resolve_device(cfg.runtime.device)
    configure_threads(cfg.runtime.threads)
    data = _cached_dataset(cfg.dataset, str(device))
    ipe = iterations_per_epoch(data.n_train, cfg.training.batch_size)
    total = to_iterations(cfg.training.steps, ipe, "training.steps")
    if total < 1:
        raise ConfigError(f"training.steps: must be at least 1 iteration, got {cfg.training.steps!r}")
    model = build_model(cfg.model, data.input_shape, data.num_classes, cfg.training.init_seed).to(device)
    ctx = Context(cfg, device, data, model, ipe, total)
    ctx.steps(cfg.training.rewind_points, "training.rewind_points")
    for key in ("eval_every", "checkpoint_every"):
        if to_iterations(getattr(cfg.training, key), ipe, f"training.{key}") < 1:
            raise ConfigError(f"training.{key}: must be at least 1 iteration")
    return ctx


def trunk_dir(cfg: Config) -> RunDir:
    """Where the trunk run of these settings lives."""
    return RunDir(cfg.runtime.results_root, "train", cfg.run_hash())


def checkpoint_path(run: RunDir, step: int) -> Path:
    return run / "checkpoints" / f"step_{step}.safetensors"


def saved_checkpoints(run: RunDir) -> list[int]:
    """Steps with a saved checkpoint, ascending."""
    folder = run / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.stem.split("_")[1]) for p in folder.glob("step_*.safetensors"))


def load_members(path: Path, ctx: Context) -> Members:
    """A saved state, checked against the model."""
    tensors, meta = load_tensors(path, ctx.device)
    members = Members.from_tensors(tensors, meta, ctx.device)
    sm = StackedModel(ctx.model)
    check_matches_model(sm.param_names, sm.buffer_names, members, str(path))
    for k, v in members.params.items():
        expected = dict(ctx.model.named_parameters())[k].shape
        if tuple(v.shape[1:]) != tuple(expected):
            raise CheckpointError(f"checkpoint {str(path)!r} does not match the model: {k} has shape "
                                  f"{tuple(v.shape[1:])}, the model expects {tuple(expected)}")
    return members


def load_weights(run: RunDir | str | Path, step: int, member: int = 0) -> dict[str, torch.Tensor]:
    """A model ``state_dict`` from a run's checkpoint at ``step`` (CPU tensors)."""
    run_path = run.path if isinstance(run, RunDir) else Path(run)
    tensors, _ = load_tensors(run_path / "checkpoints" / f"step_{step}.safetensors")
    out = {}
    for k, v in tensors.items():
        if k.startswith("param/"):
            out[k[6:]] = v[member]
        elif k.startswith("buffer/"):
            out[k[7:]] = v[member]
    return out


def initial_members(ctx: Context) -> Members:
    """The trunk at step 0: the seeded initialization and the run's noise streams."""
    sm = StackedModel(ctx.model)
    noise = ctx.cfg.training.noise_seed
    return Members.from_model_states([ctx.model.state_dict()], sm.param_names, 0,
                                     [derive_seed(noise, "order")], [derive_seed(noise, "augment")], ctx.device)


class Progress:
    """A tqdm bar on stderr with loss and accuracy; silent when quiet or not a terminal."""

    def __init__(self, total: int, initial: int, desc: str, quiet: bool):
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="it", leave=False, dynamic_ncols=True)
        self.losses: list[float] = []
        self.accuracy: str = "-"

    def evaluated(self, rows: list[dict[str, Any]]) -> None:
        """Show the test accuracy of the latest evaluation (mean over members)."""
        errors = [r["test_error"] for r in rows]
        if errors:
            self.accuracy = f"{1 - sum(errors) / len(errors):.3f}"

    def update(self, loss: float) -> None:
        if self.bar is None:
            return
        self.losses.append(loss)
        self.bar.update(1)
        if self.bar.n % 10 == 0:
            recent = self.losses[-10:]
            self.bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}", test_acc=self.accuracy)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def evaluate_rows(ctx: Context, sm: StackedModel, members: Members, lr: float) -> list[dict[str, Any]]:
    """One metrics row per member at the members' current step."""
    bs = ctx.cfg.runtime.eval_batch_size
    rows = [{"step": members.step, "member": i, "lr": lr} for i in range(members.n)]
    for split in ("train", "val", "test"):
        x, y = ctx.data.split(split)
        loss, err = sm.evaluate(members.params, members.buffers, x, y, bs)
        for i, row in enumerate(rows):
            row[f"{split}_loss"] = float(loss[i])
            row[f"{split}_error"] = float(err[i])
    return rows


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

    @property
    def final(self) -> dict[str, Any]:
        return self.metrics[-1] if self.metrics else {}

    def summary(self) -> dict[str, Any]:
        f = self.final
        return {
            "run_dir": str(self.run_dir), "hash": self.run_hash, "final_step": self.final_step,
            "final_test_accuracy": 1 - f.get("test_error", float("nan")),
            "final_test_loss": f.get("test_loss"), "final_train_loss": f.get("train_loss"),
            "checkpoints": [format_step(s) for s in self.checkpoints], "reused": self.reused,
            "seconds": round(self.seconds, 3),
        }


def train_trunk(cfg: Config, *, extra_checkpoints: Iterable[int] = (), ctx: Context | None = None) -> TrainResult:
    """Train (or resume, or reuse) the trunk run of ``cfg``; checkpoints at 0, rewind points and T."""
    ctx = ctx or prepare(cfg)
    t0 = time.perf_counter()
    run = trunk_dir(cfg)
    T = ctx.total_steps
    wanted = sorted({0, T, *ctx.steps(cfg.training.rewind_points, "training.rewind_points"), *extra_checkpoints})
    if run.is_complete():
        missing = [s for s in wanted if s not in saved_checkpoints(run)]
        if missing:
            produce_checkpoints(ctx, run, missing)
        return _result(run, T, reused=True, seconds=time.perf_counter() - t0)

    run.start(cfg.to_dict(), cfg.hashed_dict(), {"iterations_per_epoch": ctx.ipe, "final_step": T})
    sm = StackedModel(ctx.model)
    members, rows = _resume_point(ctx, run)
    eval_every = to_iterations(cfg.training.eval_every, ctx.ipe)
    ckpt_every = to_iterations(cfg.training.checkpoint_every, ctx.ipe)
    from .engine import Schedule

    schedule = Schedule(cfg, ctx.ipe)
    if members.step == 0:
        _save_state(checkpoint_path(run, 0), members)
        rows = evaluate_rows(ctx, sm, members, schedule.lr(0))
        write_csv(run / "metrics.csv", rows, METRIC_COLUMNS)
    progress = Progress(T, members.step, f"train {run.hash}", cfg.runtime.quiet)

    def after_step(m: Members, loss: float) -> None:
        progress.update(loss)
        s = m.step
        if s in wanted:
            _save_state(checkpoint_path(run, s), m)
        if s % eval_every == 0 or s == T:
            new_rows = evaluate_rows(ctx, sm, m, schedule.lr(s - 1))
            progress.evaluated(new_rows)
            rows.extend(new_rows)
            write_csv(run / "metrics.csv", rows, METRIC_COLUMNS)
        if s % ckpt_every == 0 and s != T:
            _save_state(run / "state" / "latest.safetensors", m)

    spec = TrainSpec(ctx.data, cfg, ctx.ipe, after_step=after_step, augmentation=ctx.augmentation)
    try:
        train_members(sm, members, spec, T)
    finally:
        progress.close()
    result = _result(run, T, reused=False, seconds=time.perf_counter() - t0)
    write_json(run / "summary.json", result.summary())
    run.update(status="complete")
    return result


def _save_state(path: Path, members: Members) -> None:
    tensors, meta = members.to_tensors()
    save_tensors(path, tensors, meta)


def _resume_point(ctx: Context, run: RunDir) -> tuple[Members, list[dict[str, Any]]]:
    """The newest saved state (or step 0) and the metrics rows up to it."""
    candidates = [(s, checkpoint_path(run, s)) for s in saved_checkpoints(run)]
    latest = run / "state" / "latest.safetensors"
    if latest.is_file():
        _, meta = load_tensors(latest)
        candidates.append((int(meta["step"]), latest))
    if not candidates:
        return initial_members(ctx), []
    step, path = max(candidates, key=lambda c: c[0])
    members = load_members(path, ctx)
    rows = [r for r in read_csv(run / "metrics.csv") if r["step"] <= step] if (run / "metrics.csv").is_file() else []
    return members, rows


def produce_checkpoints(ctx: Context, run: RunDir, steps: Iterable[int]) -> None:
    """Create missing checkpoints of a finished trunk by exact replay from the nearest earlier one."""
    sm = StackedModel(ctx.model)
    for target in sorted(steps):
        have = [s for s in saved_checkpoints(run) if s <= target]
        if target in have:
            continue
        members = load_members(checkpoint_path(run, max(have)), ctx)
        spec = TrainSpec(ctx.data, ctx.cfg, ctx.ipe, augmentation=ctx.augmentation)
        train_members(sm, members, spec, target)
        _save_state(checkpoint_path(run, target), members)


def _result(run: RunDir, T: int, reused: bool, seconds: float) -> TrainResult:
    rows = read_csv(run / "metrics.csv") if (run / "metrics.csv").is_file() else []
    return TrainResult(run.path, run.hash, T, saved_checkpoints(run), rows, reused, seconds)
