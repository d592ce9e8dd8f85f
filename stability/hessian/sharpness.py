"""Worst-case sharpness: the largest loss increase within a radius-ρ ball around the weights.

S_ρ(θ) = max_{‖δ‖₂ ≤ ρ} L(θ + δ) − L(θ) (plain), or, adaptive (Kwon et al. 2021; Andriushchenko et al. 2023),
δ = |θ| ⊙ ε with ‖ε‖₂ ≤ ρ: each weight may move by a fraction of its own magnitude, which makes the measure invariant
to the rescalings that leave a ReLU network's function unchanged (a layer times c, the next times 1/c). L is the
mean loss over fixed data, the model in eval mode (BatchNorm on its running statistics, no dropout); every
parameter is perturbed (a pruned weight, at zero, is never moved by the adaptive measure).

The maximum is searched by projected gradient ascent in ε (δ for the plain measure): a seeded random start uniform
in the ball, then ``steps`` steps ε ← Π(ε + η·g/‖g‖) of the normalized gradient g = ∂L/∂ε, η = 2ρ/steps by default
(the ℓ2 PGD of adversarial training, as Andriushchenko et al.'s worst-case sharpness uses a few ascent steps), each
followed by the projection Π onto the ball. The largest increase found at any iterate, or 0 (δ = 0 is in the ball),
is reported: a lower bound on S_ρ that grows with ``steps``. Each step is one pass over the data (loss and
gradient), plus one pass for L(θ) and one for the last iterate.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import ConfigError

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Sharpness:
    """What a sharpness search found: ``value`` = L(θ + δ) − L(θ) at the best δ, ``delta_norm`` = ‖δ‖₂ (parameter
    units), ``scaled_norm`` = ‖ε‖₂ (adaptive: ‖δ / |θ|‖₂; plain: ‖δ‖₂), ``loss`` = L(θ)."""

    value: float
    delta_norm: float
    scaled_norm: float
    loss: float
    rho: float
    adaptive: bool
    steps: int

    def row(self) -> dict[str, float]:
        """Columns of a Hessian track row: sharpness, sharpness_delta (‖δ‖₂), sharpness_loss (L(θ))."""
        return {"sharpness": self.value, "sharpness_delta": self.delta_norm, "sharpness_loss": self.loss}


def check_sharpness(rho: object, steps: object, rho_name: str = "rho", steps_name: str = "steps") -> None:
    """ConfigError naming the setting when ρ is not a finite number >= 0 or the steps not an integer >= 1."""
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho < 0:
        raise ConfigError(f"{rho_name}: the radius must be a finite number >= 0, got {rho!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"{steps_name}: gradient ascent steps must be an integer >= 1, got {steps!r}")


def _norm(tensors: Iterable[Tensor]) -> Tensor:
    return torch.sqrt(sum((t.double() ** 2).sum() for t in tensors))


def worst_case_sharpness(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], rho: float, *,
                         adaptive: bool = True, steps: int = 10, step_size: float | None = None, seed: int = 0,
                         loss_fn: LossFn | None = None, dtype: torch.dtype | None = None) -> Sharpness:
    """S_ρ of ``model`` over ``batches`` (re-iterable ``(x, y)`` pairs; the loss is their mean over examples), by
    seeded projected gradient ascent (see the module's docstring). ``model`` is not changed (its mode is restored).
    ``loss_fn(logits, y)``: the mean loss of a batch (default cross-entropy); ``dtype``: cast parameters, buffers
    and float inputs to it (default the model's)."""
    check_sharpness(rho, steps)
    if step_size is not None and not (math.isfinite(step_size) and step_size > 0):
        raise ConfigError(f"step_size: must be a finite number > 0, got {step_size!r}")
    loss_fn = loss_fn or F.cross_entropy
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    if dtype is not None:
        params = {n: p.to(dtype) for n, p in params.items()}
        buffers = {n: b.to(dtype) if b.is_floating_point() else b for n, b in buffers.items()}
    if not params:
        raise ConfigError("sharpness: the model has no parameters to perturb")
    scale = {n: p.abs() for n, p in params.items()} if adaptive else None
    device = next(iter(params.values())).device
    was_training = model.training
    model.eval()

    def mean_loss(eps: dict[str, Tensor] | None, grad: bool) -> tuple[float, dict[str, Tensor] | None]:
        total, seen = 0.0, 0
        grads = {n: torch.zeros_like(p) for n, p in params.items()} if grad else None
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            x = x.to(dtype) if dtype is not None and x.is_floating_point() else x
            leaves = {n: e.detach().requires_grad_(grad) for n, e in eps.items()} if eps is not None else None
            with torch.set_grad_enabled(grad):
                point = params if leaves is None else {
                    n: p + (scale[n] * leaves[n] if scale is not None else leaves[n]) for n, p in params.items()}
                out = functional_call(model, {**point, **buffers}, (x,))
                loss = loss_fn(out, y) * len(y)
            if grad:
                assert leaves is not None and grads is not None
                for n, g in zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)):
                    if g is not None:
                        grads[n] += g
            total += float(loss.detach().double())
            seen += len(y)
        if seen == 0:
            raise ConfigError("sharpness: the data hold no examples")
        if grads is not None:
            grads = {n: g / seen for n, g in grads.items()}
        return total / seen, grads

    try:
        base, _ = mean_loss(None, False)
        rho = float(rho)
        if rho == 0:
            return Sharpness(0.0, 0.0, 0.0, base, 0.0, adaptive, steps)
        gen = torch.Generator().manual_seed(int(seed))
        eps = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device, p.dtype)
               for n, p in params.items()}
        dim = sum(p.numel() for p in params.values())
        radius = rho * float(torch.rand((), generator=gen, dtype=torch.float64)) ** (1.0 / dim)
        eps = _scaled(eps, radius)
        eta = step_size if step_size is not None else 2.0 * rho / steps
        best = (0.0, {n: torch.zeros_like(e) for n, e in eps.items()})
        for step in range(steps + 1):
            value, grads = mean_loss(eps, step < steps)
            if value - base > best[0]:
                best = (value - base, eps)
            if grads is None:
                break
            g_norm = float(_norm(grads.values()))
            if g_norm == 0 or not math.isfinite(g_norm):
                break
            eps = {n: e + (eta / g_norm) * grads[n] for n, e in eps.items()}
            eps = _scaled(eps, min(rho, float(_norm(eps.values()))))
        value, eps = best
        delta = [scale[n] * e for n, e in eps.items()] if scale is not None else list(eps.values())
        return Sharpness(value, float(_norm(delta)), float(_norm(eps.values())), base, rho, adaptive, steps)
    finally:
        model.train(was_training)


def _scaled(eps: dict[str, Tensor], radius: float) -> dict[str, Tensor]:
    """``eps`` rescaled to norm ``radius`` (unchanged when it is zero)."""
    norm = float(_norm(eps.values()))
    if norm == 0:
        return eps
    return {n: e * (radius / norm) for n, e in eps.items()}


__all__ = ["Sharpness", "check_sharpness", "worst_case_sharpness"]
