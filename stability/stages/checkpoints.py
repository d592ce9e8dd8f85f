"""Members on disk: resumable states saved as safetensors (checked against their digest, the model and for
non-finite values when loaded), the checkpoints of a run, and the seeded state at step 0."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..engine import Members, StackedModel, check_matches_model, derive_seed, first_nonfinite
from ..errors import CheckpointError, TrainingDiverged
from ..store.files import RunDir, load_tensors, save_tensors
from ..store.schema import CHECKPOINT_GLOB, CHECKPOINTS, checkpoint_name, checkpoint_step

if TYPE_CHECKING:
    from .context import Context

__all__ = ["checkpoint_path", "initial_members", "load_members", "load_weights", "save_state", "saved_checkpoints"]


def checkpoint_path(run: RunDir, step: int) -> Path:
    return run / checkpoint_name(step)


def saved_checkpoints(run: RunDir) -> list[int]:
    """Steps with a saved checkpoint, ascending."""
    folder = run / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(checkpoint_step(p.name) for p in folder.glob(CHECKPOINT_GLOB))


def load_members(path: Path, ctx: Context) -> Members:
    """A saved state, checked against its digest, the model, and for non-finite values (CheckpointError)."""
    tensors, meta = load_tensors(path, ctx.device)
    try:
        members = Members.from_tensors(tensors, meta, ctx.device)
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a resumable state of this suite: {exc!r}") from None
    sm = StackedModel(ctx.model)
    check_matches_model(sm.param_names, sm.buffer_names, members, str(path))
    shapes = dict(ctx.model.named_parameters())
    for k, v in members.params.items():
        if tuple(v.shape[1:]) != tuple(shapes[k].shape):
            raise CheckpointError(f"checkpoint {str(path)!r} does not match the model: {k} has shape "
                                  f"{tuple(v.shape[1:])}, the model expects {tuple(shapes[k].shape)}")
    bad = first_nonfinite(members)
    if bad is not None:
        raise CheckpointError(f"checkpoint {str(path)!r} holds non-finite values (member {bad[0]}'s {bad[1]}); "
                              "it is not a trained network")
    return members


def save_state(path: Path, members: Members) -> None:
    """Save a resumable state; a state with NaN or inf is never written (TrainingDiverged instead)."""
    bad = first_nonfinite(members)
    if bad is not None:
        raise TrainingDiverged(f"training diverged: member {bad[0]}'s {bad[1]} is not finite at step {members.step}",
                               step=members.step, member=bad[0], tensor=bad[1])
    tensors, meta = members.to_tensors()
    save_tensors(path, tensors, meta)


def load_weights(run: RunDir | str | Path, step: int, member: int = 0) -> dict[str, torch.Tensor]:
    """A model ``state_dict`` from a run's checkpoint at ``step`` (CPU tensors)."""
    run_path = run.path if isinstance(run, RunDir) else Path(run)
    path = run_path / checkpoint_name(step)
    tensors, _ = load_tensors(path)
    out = {}
    for k, v in tensors.items():
        if k.startswith("param/"):
            out[k[6:]] = v[member]
        elif k.startswith("buffer/"):
            out[k[7:]] = v[member]
    bad = [k for k, v in out.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"checkpoint {str(path)!r} holds non-finite values ({bad[0]}); it is not a trained network")
    return out


def initial_members(ctx: Context) -> Members:
    """The trunk at step 0: the seeded initialization and the run's noise streams."""
    sm = StackedModel(ctx.model)
    noise = ctx.cfg.training.noise_seed
    return Members.from_model_states([ctx.model.state_dict()], sm.param_names, 0,
                                     [derive_seed(noise, "order")], [derive_seed(noise, "augment")], ctx.device)

