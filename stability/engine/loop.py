"""The training loop: all members trained in lockstep from ``members.step`` to an end step.

Batches are indices into the dataset tensors already on the device. One epoch
is ``n_train // batch_size`` iterations (the last partial batch is dropped).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..config import Config
from ..data import DataSplits, EpochReader, augment_batch, is_streamed
from ..errors import ConfigError, TrainingDiverged
from . import distributed
from .members import Members, first_nonfinite
from .optim import Schedule, _MemberwiseFusedAdam, _stacked_optimizer
from .stacked import StackedModel


def iterations_per_epoch(n_train: int, batch_size: int) -> int:
    """Iterations in one epoch: the last partial batch is dropped."""
    if batch_size > n_train:
        raise ConfigError(f"training.batch_size: {batch_size} exceeds the {n_train} training examples")
    return n_train // batch_size


@dataclass
class TrainSpec:
    """What the loop needs besides the members: data, settings and hooks."""

    data: DataSplits
    cfg: Config
    ipe: int
    masks: Mapping[str, Tensor] | None = None  # {name: [N, ...] or [...]} 0/1
    # What the mask-0 coordinates do: False = they are pruned (held at zero); True = they are frozen,
    # holding the values they have when training starts (Zhou et al.'s mask-0 action ``freeze``).
    freeze: bool = False
    after_step: Callable[[Members, float], None] | None = None  # called with the batch loss after each step
    # Masks that change during training (NEq's frozen neurons): called before every step with the members
    # at that step; returns the masks from that step on (replacing ``masks``; with ``freeze`` the mask-0
    # coordinates are held at their values at that step) or None to keep the masks in force.
    update_masks: Callable[[Members], Mapping[str, Tensor] | None] | None = None
    augmentation: str | None = None
    # A streamed dataset's read-ahead of the current epoch (rebuilt when the order or position changes).
    reader: Any = field(default=None, repr=False)


def draw_batch(members: Members, spec: TrainSpec) -> tuple[Tensor, Tensor]:
    """Member batches ``[N, B, ...]`` for iteration ``members.step``, advancing their data streams.

    In a data-parallel run each rank gets its share of every member's batch, ``[N, B / world, ...]``, cut
    from the same global batch (and augmentation) whatever the world size."""
    data, B = spec.data, spec.cfg.training.batch_size
    pos = members.step % spec.ipe
    if pos == 0 or members.perms is None:
        # A fresh epoch (or a member starting mid-epoch with no order yet): new permutation per member.
        members.perms = torch.stack([torch.randperm(data.n_train, generator=g) for g in members.order_gens]).to(data.y_train.device)
    columns = distributed.share(B) if distributed.active() else slice(None)
    idx = members.perms[:, pos * B : (pos + 1) * B][:, columns]
    flat = idx.reshape(-1)  # index_select on the flat index: same values as x_train[idx], ~3x faster
    if is_streamed(data.x_train):
        if spec.reader is None or not spec.reader.matches(members.perms, pos):
            spec.reader = EpochReader(data.x_train, members.perms, pos, B, spec.ipe, columns)
        x = spec.reader.next()
    else:
        x = data.x_train.index_select(0, flat).view(*idx.shape, *data.x_train.shape[1:])
    y = data.y_train.index_select(0, flat).view(idx.shape)
    if spec.augmentation:
        x = torch.stack([augment_batch(x[i], spec.augmentation, g, total=B, rows=columns)
                         for i, g in enumerate(members.aug_gens)])
    return x, y


def train_members(model: StackedModel, members: Members, spec: TrainSpec, end_step: int) -> Members:
    """Train all members from ``members.step`` to ``end_step`` in lockstep; returns the same object."""
    schedule = Schedule(spec.cfg, spec.ipe)
    model.configure(spec.cfg.runtime)
    hand_written = model.hand_written_backward and not model.compile
    plist = [members.params[n] for n in model.param_names]
    for p in plist:
        p.requires_grad_(True)
    opt = _stacked_optimizer(plist, spec.cfg)
    if members.optimizer_state:
        opt.load_state_dict({"state": members.optimizer_state["state"], "param_groups": opt.state_dict()["param_groups"]})
    masks = [spec.masks.get(n) if spec.masks else None for n in model.param_names]
    held = _held_values(plist, masks) if spec.freeze else None
    masked = any(m is not None for m in masks)
    members.optimizer = opt
    fast_update = opt.update if isinstance(opt, _MemberwiseFusedAdam) else None
    dropout_gens = members.dropout_generators(spec.data.y_train.device) if model.dropout else None
    parallel = distributed.active()
    if parallel:
        # Every rank must start from rank 0's state: the run store is shared, so they read the same one.
        if not distributed.all_equal(members.step):
            raise ConfigError(f"runtime.distributed: the ranks start training from different steps (this rank from "
                              f"{members.step}); every rank must read the same run store (runtime.results_root on "
                              "a shared file system)")
        distributed.broadcast(members.params)
        distributed.broadcast(members.buffers)
    while members.step < end_step:
        if spec.update_masks is not None:
            new_masks = spec.update_masks(members)
            if new_masks is not None:
                masks = [new_masks.get(name) for name in model.param_names]
                held = _held_values(plist, masks) if spec.freeze else None
                masked = any(m is not None for m in masks)
        x, y = draw_batch(members, spec)
        lr = schedule.lr(members.step)
        for group in opt.param_groups:
            group["lr"] = lr
        # The hand-written MLP backward overwrites the gradients in place. Otherwise set_to_none:
        # backward hands its fresh gradient to each parameter instead of zero-filling the old one
        # and adding into it (two extra passes over every weight).
        # Under runtime.precision = "bf16" both ways run their matmuls in bf16 and hand float32 gradients to
        # the float32 weights; a compiled step always takes autograd (the compiler writes its own backward).
        loss = model.fc_loss_and_grads(members.params, x, y) if hand_written else None
        if loss is None:
            opt.zero_grad(set_to_none=True)
            loss = model.train_loss(members.params, members.buffers, x, y, dropout_gens)
            loss.sum().backward()
        if parallel:  # each rank's share of the batch: the global batch's gradient is their mean
            distributed.average_gradients(plist)
            loss = distributed.average(loss.detach())
        # One host sync a step (the progress hook needs the value anyway): the mean is finite only when
        # every member's loss is. A non-finite loss stops training before it touches the weights.
        loss_mean = float(loss.detach().mean())
        if not math.isfinite(loss_mean):
            member = int((~torch.isfinite(loss.detach())).nonzero()[0, 0])
            bad = first_nonfinite(members, member)
            tensor = bad[1] if bad is not None else "loss"
            _stop(members, opt, plist)
            raise TrainingDiverged(f"training diverged: member {member}'s {tensor} is not finite at step "
                                   f"{members.step}", step=members.step, member=member, tensor=tensor)
        if masked:
            # Pruned coordinates get no gradient, so momentum/Adam moments stay exactly zero there.
            for p, m in zip(plist, masks):
                if m is not None:
                    p.grad.mul_(m)
        if fast_update is not None:
            with torch.no_grad():
                fast_update()
        else:
            opt.step()
        if held is not None:
            # Frozen coordinates are put back exactly (weight decay and momentum would move them).
            with torch.no_grad():
                for p, h in zip(plist, held):
                    if h is not None:
                        p.copy_(torch.where(h[0], p, h[1]))
        elif masked:
            with torch.no_grad():
                for p, m in zip(plist, masks):
                    if m is not None:
                        p.mul_(m)
        if parallel and members.buffers:
            distributed.broadcast(members.buffers)  # BatchNorm's running statistics: rank 0's, as DDP keeps them
        members.step += 1
        if spec.after_step is not None:
            spec.after_step(members, loss_mean)
    if end_step > 0:
        bad = first_nonfinite(members)
        if bad is not None:
            _stop(members, opt, plist)
            raise TrainingDiverged(f"training diverged: member {bad[0]}'s {bad[1]} is not finite at step "
                                   f"{members.step}", step=members.step, member=bad[0], tensor=bad[1])
    members.optimizer_state = {"state": opt.state_dict()["state"]}
    members.optimizer = None
    for p in plist:
        p.requires_grad_(False)
    return members


def _held_values(plist: Sequence[Tensor], masks: Sequence[Tensor | None]) -> list[tuple[Tensor, Tensor] | None]:
    """(kept, values) per parameter: where the mask is 1, and the values every coordinate holds now."""
    return [None if m is None else (torch.broadcast_to(m != 0, p.shape).clone(), p.detach().clone())
            for p, m in zip(plist, masks)]


def _stop(members: Members, opt: torch.optim.Optimizer, plist: Sequence[Tensor]) -> None:
    """Leave members in their plain state after training stopped early."""
    members.optimizer = None
    for p in plist:
        p.grad = None
        p.requires_grad_(False)
