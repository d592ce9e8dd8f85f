"""Plain reference implementations that the fast paths are checked against (tests, benchmarks).

- ``train_reference``: one model at a time with ``module(x)`` and a stock optimizer
  (against ``engine.train_members``);
- ``train_siblings_reference``: a sibling set trained that way (against ``siblings.train_siblings``);
- ``evaluate_path_naive``: one model per α with ``load_state_dict`` (against
  ``interpolation.evaluate_path``);
- ``train_plain`` and ``fresh_model``: a user's own training script and independently initialized networks
  (the networks ``stability.lmc`` measures in tests and benchmarks).

Nothing in the library calls these.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.loop import TrainSpec, draw_batch
from ..engine.members import Members, derive_seed
from ..engine.optim import Schedule, make_optimizer
from ..maths.interpolation import CurveSettings, _bn_modules
from ..models import dropout_noise
from ..stages.context import Context
from ..stages.trunk import trunk_checkpoint


def train_reference(module: nn.Module, state: Mapping[str, Tensor], spec: TrainSpec, start_step: int, end_step: int,
                    order_seed: int, aug_seed: int, mask: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """One model at a time with ``module(x)`` and a stock optimizer: the plain path the batched one must match."""
    module.load_state_dict(state)
    module.train()
    opt = make_optimizer(list(module.parameters()), spec.cfg)
    schedule = Schedule(spec.cfg, spec.ipe)
    single = Members(start_step, {}, {}, [order_seed], [aug_seed])
    named = dict(module.named_parameters())
    # the member's dropout stream, seeded as the engine seeds it (unused by models without dropout)
    dropout_gen = torch.Generator(device=spec.data.x_train.device).manual_seed(derive_seed(aug_seed, "dropout"))
    for t in range(start_step, end_step):
        single.step = t
        x, y = draw_batch(single, spec)
        for group in opt.param_groups:
            group["lr"] = schedule.lr(t)
        with dropout_noise(dropout_gen):
            loss = F.cross_entropy(module(x[0]), y[0])
        opt.zero_grad()
        loss.backward()
        if mask:
            for name, m in mask.items():
                named[name].grad.mul_(m)
        opt.step()
        if mask:
            with torch.no_grad():
                for name, m in mask.items():
                    named[name].mul_(m)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def train_siblings_reference(ctx: Context, rewind_step: int, order: Sequence[int], aug: Sequence[int],
                             masks: Mapping[str, Tensor] | None = None) -> list[dict[str, Tensor]]:
    """The plain one-at-a-time path (fresh optimizer), for checking the batched one."""
    source = trunk_checkpoint(ctx, rewind_step)
    state = source.member_state_dict(0)
    spec = TrainSpec(ctx.data, ctx.cfg, ctx.ipe, augmentation=ctx.augmentation)
    out = []
    for o, a in zip(order, aug):
        module = ctx.new_model()
        if masks:
            state = {k: (v * masks[k] if k in masks else v) for k, v in state.items()}
        out.append(train_reference(module, state, spec, rewind_step, ctx.total_steps, o, a, masks))
    return out


def evaluate_path_naive(model: nn.Module, a: Mapping[str, Tensor], b: Mapping[str, Tensor], alphas: Sequence[float],
                        x: Tensor, y: Tensor, settings: CurveSettings, x_train: Tensor | None = None) -> tuple[list[float], list[float]]:
    """One model per α with ``load_state_dict``: the reference the batched path must match."""
    import copy

    errors, losses = [], []
    for alpha in alphas:
        m = copy.deepcopy(model)
        state = {}
        for k, va in a.items():
            state[k] = (1 - alpha) * va + alpha * b[k] if va.is_floating_point() else va
        m.load_state_dict(state)
        if settings.bn == "reset" and _bn_modules(m):
            for bn in _bn_modules(m):
                bn.reset_running_stats()
                bn.momentum = None  # PyTorch's own cumulative average
            m.train()
            g = torch.Generator().manual_seed(settings.bn_seed)
            with torch.no_grad():
                for _ in range(settings.bn_batches):
                    idx = torch.randint(len(x_train), (min(settings.bn_batch_size, len(x_train)),), generator=g)
                    m(x_train[idx])
        m.eval()
        with torch.no_grad():
            out = m(x)
            losses.append(float(torch.nn.functional.cross_entropy(out, y)))
            errors.append(float((out.argmax(1) != y).double().mean()))
    return errors, losses


def train_plain(net: nn.Module, x: Tensor, y: Tensor, seed: int, steps: int, lr: float = 0.05,
                batch: int = 64) -> nn.Module:
    """Training as a user's own script does it: a plain PyTorch loop, SGD with momentum 0.9, batches of ``batch``
    drawn with replacement from a generator seeded by ``seed``; returns the network in eval mode."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    for _ in range(steps):
        idx = torch.randint(len(x), (batch,), generator=g)
        opt.zero_grad()
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    return net.eval()


def fresh_model(ctx: Context, seed: int) -> nn.Module:
    """The context's architecture with every layer re-initialized from ``seed`` (independent networks start apart)."""
    net = ctx.new_model()
    torch.manual_seed(seed)
    for m in net.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return net
