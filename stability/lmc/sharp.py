"""Worst-case sharpness of any network over any data (``stability.hessian.sharpness`` over a stream of batches)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..hessian.settings import resolve_dtype
from ..hessian.sharpness import Sharpness, check_sharpness, worst_case_sharpness
from ..maths.paths import Batches, LossFn
from .networks import Network, device_of, module_with, private, resolve


def sharpness(model: Network, data: Any, rho: float = 0.05, adaptive: bool = True, steps: int = 10, seed: int = 0,
              loss_fn: LossFn | None = None, *, template: nn.Module | None = None, step_size: float | None = None,
              dtype: str = "float32", batch_size: int = 1000,
              device: str | torch.device | None = None) -> Sharpness:
    """The largest increase of the mean loss over ``data`` within a radius-``rho`` ball around the weights, found
    by ``steps`` seeded steps of projected gradient ascent, the model in eval mode (Andriushchenko et al. 2023).

    ``adaptive``: the ball is ‖δ / |θ|‖₂ ≤ ρ (each weight moves by at most a fraction of its magnitude; invariant to
    a ReLU network's rescalings) rather than ‖δ‖₂ ≤ ρ. ``data``: a ``DataLoader``, an iterable of ``(x, y)`` batches
    or a pair of tensors (cut into ``batch_size``), read once per step: give a fixed subset. ``model``: a module, or
    a state dict / checkpoint file with ``template=``. Returns ``Sharpness`` (``.value``, ``.delta_norm``, ...).

    >>> stability.lmc.sharpness(net, (x_train[:1000], y_train[:1000]), rho=0.05).value
    """
    check_sharpness(rho, steps)
    net_template, state = resolve(model, template, "model")
    dev = device_of(net_template, device)
    net = module_with(private(net_template, dev), {k: v.to(dev) for k, v in state.items()})
    return worst_case_sharpness(net, Batches(data, batch_size), float(rho), adaptive=adaptive, steps=steps, step_size=step_size,
                                seed=seed, loss_fn=loss_fn, dtype=resolve_dtype(dtype))


__all__ = ["Sharpness", "sharpness"]
