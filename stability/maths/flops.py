"""Multiply-accumulate counts of the layers that hold prunable weights, from their shapes.

Counted for one example by running the model once on a zero input and reading every
convolution's and linear layer's output shape. For a layer with weight W producing P output
positions per example (1 for a linear layer, H_out x W_out for a 2-d convolution):

- forward: ``numel(W) * P`` MACs (each weight is used once per output position);
- backward, weight gradient dL/dW: the same ``numel(W) * P`` MACs;
- backward, input gradient dL/dx: the same again, except for the first layer, whose input
  (the data) needs no gradient.

A weight that is not updated (frozen, or a neuron at equilibrium) needs no weight-gradient
MACs: ``weight_gradient_saved`` counts what the update masks save. FLOPs are 2 x MACs.
Biases, normalization and activations are left out (they are a small share and not masked).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LayerCost:
    """MACs per example of one layer: ``weight`` is its parameter name, ``positions`` its output positions."""

    weight: str
    numel: int
    out_units: int
    positions: int
    first: bool

    @property
    def forward(self) -> int:
        return self.numel * self.positions

    @property
    def weight_gradient(self) -> int:
        return self.numel * self.positions

    @property
    def input_gradient(self) -> int:
        return 0 if self.first else self.numel * self.positions


def layer_costs(model: nn.Module, input_shape: tuple[int, ...]) -> list[LayerCost]:
    """The convolution and linear layers of ``model`` in forward order, with their MACs per example."""
    shapes: dict[str, tuple[int, ...]] = {}
    order: list[str] = []
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            def hook(mod: nn.Module, args: tuple, out: Tensor, name: str = name) -> None:
                if name not in shapes:
                    order.append(name)
                shapes[name] = tuple(out.shape[1:])
            hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        p = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, dtype=p.dtype, device=p.device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    out = []
    for i, name in enumerate(order):
        module = model.get_submodule(name)
        shape = shapes[name]
        positions = 1
        for s in (shape[1:] if isinstance(module, nn.modules.conv._ConvNd) else shape[:-1]):
            positions *= s
        units = shape[0] if isinstance(module, nn.modules.conv._ConvNd) else shape[-1]
        out.append(LayerCost(f"{name}.weight", module.weight.numel(), units, positions, i == 0))
    return out


def backward_macs(costs: list[LayerCost]) -> int:
    """MACs of one example's backward pass through the counted layers (weight and input gradients)."""
    return sum(c.weight_gradient + c.input_gradient for c in costs)


def weight_gradient_saved(costs: list[LayerCost], update_masks: Mapping[str, Tensor]) -> int:
    """Weight-gradient MACs per example not needed when only the 1-entries of ``update_masks`` are updated.

    A mask may be per weight (the weight's shape) or per output unit (a vector of ``out_units``).
    """
    saved = 0.0
    for c in costs:
        m = update_masks.get(c.weight)
        if m is None:
            continue
        frozen = 1.0 - float(m.double().mean())  # float64: exact counts for layers of millions of MACs
        saved += frozen * c.weight_gradient
    return round(saved)


__all__ = ["LayerCost", "backward_macs", "layer_costs", "weight_gradient_saved"]
