"""The learning-rate schedule and the optimizers over stacked member tensors.

The optimizer is a stock ``torch.optim`` optimizer over the stacked tensors:
SGD and Adam act elementwise, so each member's update equals what a separate
optimizer would do. (Adam steps with torch's fused kernel applied member by
member; its state and update rule are those of ``torch.optim.Adam``.)
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..config import Config
from ..errors import ConfigError
from ..steps import to_iterations


class Schedule:
    """Learning rate at iteration t: warmup x (constant | step decay | cosine | linear decay)."""

    def __init__(self, cfg: Config, ipe: int):
        self.base = cfg.optimizer.lr
        self.kind = cfg.schedule.kind
        self.gamma = cfg.schedule.gamma
        self.total = to_iterations(cfg.training.steps, ipe, "training.steps")
        self.milestones = sorted(to_iterations(m, ipe, "schedule.milestones") for m in cfg.schedule.milestones)
        self.warmup = to_iterations(cfg.schedule.warmup, ipe, "schedule.warmup")
        self.final = cfg.schedule.final_lr

    def lr(self, t: int) -> float:
        """Learning rate used for the update from iteration t to t+1."""
        factor = 1.0
        if self.warmup and t < self.warmup:
            factor = (t + 1) / self.warmup
        if self.kind == "step":
            factor *= self.gamma ** sum(1 for m in self.milestones if t >= m)
        elif self.kind == "cosine":
            factor *= 0.5 * (1.0 + math.cos(math.pi * min(t, self.total) / max(self.total, 1)))
        elif self.kind == "linear":  # from lr at step 0 to final_lr at the final step
            factor *= 1.0 + (self.final / self.base - 1.0) * min(t, self.total) / max(self.total, 1)
        return self.base * factor


def make_optimizer(params: Sequence[Tensor], cfg: Config) -> torch.optim.Optimizer:
    """SGD or Adam over (stacked) parameters."""
    o = cfg.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    raise ConfigError(f"optimizer.name: unknown optimizer {o.name!r}; choose one of sgd, adam")


class _MemberwiseFusedAdam(torch.optim.Adam):
    """``torch.optim.Adam`` (same settings, state and update rule) stepping with torch's fused kernel.

    The fused kernel makes one pass over each tensor instead of about eight, but it rounds the
    last elements of every tensor it is given (its scalar tail) slightly differently from the rest.
    It is therefore given each member's slice ``p[i]`` as a tensor of its own: every member is then
    updated by exactly the same arithmetic, so members with equal weights, gradients and noise stay
    bit-identical wherever they sit in the stack. (Against the stock kernel the update may differ
    in the last bit.)
    """

    def __init__(self, params: Sequence[Tensor], **settings: object):
        super().__init__(params, **settings)
        self._member_views: dict[Tensor, tuple] = {}
        self._grad_views: dict[Tensor, tuple] = {}

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        if closure is not None:
            raise ValueError("closures are not supported here")
        self.update()

    def zero_grad(self, set_to_none: bool = True) -> None:
        # Gradients set to None are gone: so are the member views of them (they would keep them alive).
        if set_to_none:
            self._grad_views.clear()
        super().zero_grad(set_to_none)

    def update(self) -> None:
        """The step itself, without ``Optimizer.step``'s hook and profiler wrapper (~0.1 ms a call).

        Call under ``torch.no_grad()``; the training loop calls this directly.
        """
        for group in self.param_groups:
            if group.get("amsgrad") or group.get("maximize") or group.get("differentiable") \
                    or group.get("decoupled_weight_decay") or isinstance(group["lr"], Tensor):
                raise ValueError("member-wise fused Adam supports plain Adam settings only")
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if state["step"].device != p.device:
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
                state["step"].add_(1)
                # Per-member views of the weights and moments live as long as those tensors do.
                cached = self._member_views.get(p)
                if cached is None or cached[0] is not state["exp_avg"] or cached[1] is not state["exp_avg_sq"]:
                    cached = (state["exp_avg"], state["exp_avg_sq"], p.unbind(0), state["exp_avg"].unbind(0),
                              state["exp_avg_sq"].unbind(0))
                    self._member_views[p] = cached
                params += cached[2]
                # ... and of the gradient, when it is the same tensor as last step (hand-written backward)
                gcached = self._grad_views.get(p)
                if gcached is None or gcached[0] is not p.grad:
                    gcached = (p.grad, p.grad.unbind(0))
                    self._grad_views[p] = gcached
                grads += gcached[1]
                exp_avgs += cached[3]
                exp_avg_sqs += cached[4]
                steps += [state["step"]] * p.shape[0]
            if params:
                beta1, beta2 = group["betas"]
                torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=group["lr"], beta1=beta1,
                                   beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                                   amsgrad=False, maximize=False)


def _fused_adam_works(params: Sequence[Tensor]) -> bool:
    """Whether torch's fused Adam kernel runs on these parameters' device and dtype."""
    if not params or not hasattr(torch, "_fused_adam_"):
        return False
    kinds = {(p.device, p.dtype) for p in params}
    if len(kinds) != 1 or any(p.dim() == 0 for p in params):
        return False
    device, dtype = next(iter(kinds))
    try:
        z = [torch.zeros(1, device=device, dtype=dtype) for _ in range(4)]
        torch._fused_adam_([z[0]], [z[1]], [z[2]], [z[3]], [], [torch.ones((), device=device)], lr=0.1, beta1=0.9,
                           beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def _stacked_optimizer(params: Sequence[Tensor], cfg: Config) -> torch.optim.Optimizer:
    """The optimizer of ``make_optimizer``; Adam steps with the fused kernel, member by member."""
    o = cfg.optimizer
    if o.name == "adam" and _fused_adam_works(params):
        return _MemberwiseFusedAdam(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    return make_optimizer(params, cfg)
