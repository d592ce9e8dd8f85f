"""The one resumable training loop: trunks, sibling sets and IMP levels all train through ``resumable_train``.

A run directory being trained holds ``metrics.csv`` (one row per member at every
evaluation), ``checkpoints/step_<k>.safetensors`` (full resumable states at the
steps asked to be kept) and ``state/latest.safetensors`` (the rolling resumable
state). At each step the order of writes is: metrics row, kept checkpoint,
rolling state. Every saved state therefore has its metrics rows on disk, and a
run killed at any file boundary resumes from its newest intact state with the
same ``metrics.csv`` an uninterrupted run writes.

Damaged states (digest mismatch, truncation, non-finite values) are moved aside
as ``*.corrupt`` and never used; training resumes from the newest intact one.
A non-finite loss or weight stops training: the run is recorded as
``diverged`` (step, member, tensor) in its manifest and ``TrainingDiverged``
is raised, so nothing downstream treats the run as data.
"""
from __future__ import annotations

import sys
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ..engine import (
    Members,
    Schedule,
    StackedModel,
    TrainSpec,
    train_members,
)
from ..errors import CheckpointError, ConfigError, TrainingDiverged
from ..maths.pruning import apply_masks_
from ..methods import names_with
from ..methods.base import TrainHooks
from ..steps import to_iterations
from ..store.files import (
    RunDir,
    quarantine,
    read_table,
    tensors_metadata,
    write_csv,
)
from ..store.schema import (
    LATEST_STATE,
    METRIC_COLUMNS,
    METRICS,
)
from .checkpoints import checkpoint_path, load_members, save_state, saved_checkpoints

if TYPE_CHECKING:
    from .context import Context


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


def read_metrics(run: RunDir) -> list[dict[str, Any]] | None:
    """metrics.csv of a run, or None when it is missing or damaged (a damaged one is moved aside)."""
    return read_table(run, METRICS, METRIC_COLUMNS)


def early_stop(rows: list[dict[str, Any]], member: int) -> dict[str, Any]:
    """A member's final test accuracy and loss, and its early-stopping point: the step of minimum validation
    loss (earliest on ties; the final step when there is no validation split) with its test accuracy."""
    mine = [r for r in rows if r["member"] == member]
    final = mine[-1]
    with_val = [r for r in mine if r["val_loss"] == r["val_loss"]]  # NaN when there is no validation split
    best = min(with_val, key=lambda r: (r["val_loss"], r["step"])) if with_val else final
    return {"final_test_accuracy": 1 - final["test_error"], "final_test_loss": final["test_loss"],
            "early_stop_step": best["step"], "early_stop_test_accuracy": 1 - best["test_error"],
            "early_stop_val_loss": best["val_loss"]}


def resumable_train(ctx: Context, run: RunDir, start: Members, end_step: int, *,
                    masks: Mapping[str, Tensor] | None = None, freeze: bool = False, eval_every: int = 0,
                    keep: Collection[int] = (), desc: str = "train") -> Members:
    """Train ``start`` (or the newest intact saved state) to ``end_step`` inside ``run``.

    ``eval_every`` > 0 evaluates every member at the start step, every ``eval_every`` steps and at
    the end into ``metrics.csv``; ``keep`` are the steps saved as ``checkpoints/step_<k>``. ``masks``
    prune (the mask-0 coordinates held at zero) or, with ``freeze``, freeze (held at their values in
    ``start``, which a resumed state holds too, bit for bit); a method whose masks change as it trains
    (NEq) brings them itself (``Method.hooks``) and refuses these. A non-finite loss or weight marks the
    run ``diverged`` in its manifest and raises TrainingDiverged.
    """
    cfg = ctx.cfg
    sm = StackedModel(ctx.model).configure(cfg.runtime)  # precision, compile and layout of training and metrics
    schedule = Schedule(cfg, ctx.ipe)
    keep = set(keep)
    state_every = to_iterations(cfg.training.checkpoint_every, ctx.ipe)
    latest = run / LATEST_STATE
    first = start.step

    def eval_due(s: int) -> bool:
        return bool(eval_every) and (s == first or s % eval_every == 0 or s == end_step)

    method = ctx.method
    if masks and not method.accepts_masks:
        allowed = " or ".join(names_with("accepts_masks"))
        raise ConfigError(f"training.method: {method.name} {method.trains}; it cannot be combined with masks "
                          f"(pruning or frozen weights); use training.method = {allowed} here")
    hooks = method.hooks(ctx, run, first, start.n)
    members, rows = _resume(ctx, run, start, end_step, keep, eval_due, hooks.covered if hooks else None)
    spec = TrainSpec(ctx.data, cfg, ctx.ipe, masks=masks, freeze=freeze, augmentation=ctx.augmentation)
    attach_hooks(spec, hooks, members)
    if spec.masks and not spec.freeze:
        apply_masks_(members.params, spec.masks)

    def evaluate(m: Members) -> None:
        new = evaluate_rows(ctx, sm, m, schedule.lr(m.step - 1 if m.step > first else m.step))
        progress.evaluated(new)
        rows.extend(new)
        write_csv(run / METRICS, rows, METRIC_COLUMNS)

    progress = Progress(end_step, members.step, desc, cfg.runtime.quiet)
    try:
        s = members.step
        if eval_due(s) and not any(r["step"] == s for r in rows):
            evaluate(members)  # the start, or a state saved just before its metrics row was written
        if s in keep and not checkpoint_path(run, s).is_file():
            save_state(checkpoint_path(run, s), members)

        def after_step(m: Members, loss: float) -> None:
            progress.update(loss)
            s = m.step
            if eval_due(s):
                evaluate(m)
            if s in keep:
                save_state(checkpoint_path(run, s), m)
            if s % state_every == 0 and s != end_step:
                save_state(latest, m)

        spec.after_step = after_step
        train_members(sm, members, spec, end_step)
    except TrainingDiverged as exc:
        exc.run_dir = str(run.path)
        if run.exists():  # IMP level directories have no manifest: their record.json says it
            run.update(status="diverged", divergence=exc.info())
        raise
    finally:
        progress.close()
    return members


def attach_hooks(spec: TrainSpec, hooks: TrainHooks | None, members: Members) -> None:
    """Wire a method's hooks into the engine, for training and checkpoint replay alike: the masks in force from
    the state ``members`` carry, what their mask-0 coordinates do, and the update before every step."""
    if hooks is not None:
        spec.masks, spec.freeze, spec.update_masks = hooks.attach(members), hooks.freeze, hooks


def _resume(ctx: Context, run: RunDir, start: Members, end_step: int, keep: set[int],
            eval_due, records_cover=None) -> tuple[Members, list[dict[str, Any]]]:
    """The newest intact saved state whose metrics rows are on disk, and those rows (else ``start``, [])."""
    latest = run / LATEST_STATE
    rows_disk = read_metrics(run) if eval_due(start.step) else []
    n = start.n
    counts: dict[int, int] = {}
    for r in rows_disk or []:
        counts[r["step"]] = counts.get(r["step"], 0) + 1

    def covered(s: int) -> bool:
        """Every evaluation before step s has all members' rows (the one at s may be redone)."""
        if records_cover is not None and not records_cover(s):  # the method's own records (``TrainHooks.covered``)
            return False
        if not eval_due(start.step):
            return True
        return all(counts.get(t) == n for t in range(start.step, s) if eval_due(t))

    candidates: list[tuple[int, Path]] = [(s, checkpoint_path(run, s)) for s in saved_checkpoints(run)
                                          if start.step < s <= end_step]
    if latest.is_file():
        try:  # the step from the header; the state itself is checked (digest and all) when it is loaded
            candidates.append((int(tensors_metadata(latest)["step"]), latest))
        except (CheckpointError, KeyError, ValueError, TypeError) as exc:
            quarantine(latest, f"resumable state {str(latest)!r} is damaged ({exc})")
    for s, path in sorted(candidates, key=lambda c: -c[0]):
        if not covered(s):
            continue
        try:
            members = load_members(path, ctx)
        except CheckpointError as exc:
            quarantine(path, str(exc))
            continue
        if members.n != n:
            continue
        return members, [r for r in rows_disk or [] if r["step"] <= s and (r["step"] < s or counts.get(s) == n)]
    return start, []

