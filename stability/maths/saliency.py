"""Pruning at initialization: SNIP, GraSP and SynFlow scores, masks to a density, and the sanity checks.

Every score is computed at the given weights under the given masks (w = θ ⊙ m, so pruned entries score 0):

- SNIP (Lee et al. 2019): ``|g ⊙ w|``, g = ∂L/∂w the gradient of the cross-entropy on one batch.
- GraSP (Wang et al. 2020): ``S = -w ⊙ Hg``, H the Hessian and g the gradient of the loss on one batch
  (logits divided by a temperature, 200 in Wang et al.'s code); the weights with the *lowest* S are kept.
- SynFlow (Tanaka et al. 2020): ``|∂R/∂w ⊙ w|`` with R the sum of the network's output for an all-ones
  input through ``|w|`` (every parameter, biases included, made non-negative; normalization layers in eval
  mode); in float64, since the product of |w| over layers underflows in float32. Pruned iteratively over
  ``rounds`` rounds to densities ``d^(j/rounds)`` (the exponential schedule), rescored each round.

``keep_to_density`` turns keep-scores (higher = kept) into masks: one ranking over every tensor, except the
tensors given a density of their own (``layer_density``), each ranked alone. Counts round half up and ties
break by position (stable sort), as in ``pruning.prune``.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import ConfigError

Masks = dict[str, Tensor]

PAI_STRATEGIES = ("snip", "grasp", "synflow")
DATA_DRIVEN = ("snip", "grasp")  # scored from a batch of training data
GRASP_TEMPERATURE = 200.0  # Wang et al.'s code divides the logits by T = 200 for the scores
MASK_SHUFFLES = ("none", "layer")


# ---------------------------------------------------------------- scores
def _weights(model: nn.Module, state: Mapping[str, Tensor], masks: Mapping[str, Tensor],
             dtype: torch.dtype | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The effective parameters ``θ ⊙ m`` (leaves requiring grad) and the buffers, copied from ``state``."""
    params = {}
    for n, _ in model.named_parameters():
        t = state[n].detach().clone()
        if dtype is not None:
            t = t.to(dtype)
        if n in masks:
            t = t * masks[n].to(t)
        params[n] = t.requires_grad_(True)
    buffers = {n: state.get(n, b).detach().clone() for n, b in model.named_buffers()}
    if dtype is not None:
        buffers = {n: b.to(dtype) if b.is_floating_point() else b for n, b in buffers.items()}
    return params, buffers


def _loss(model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, y: Tensor,
          temperature: float = 1.0) -> Tensor:
    was = model.training
    model.train()  # as a training step sees the batch (batch statistics in normalization layers)
    try:
        out = functional_call(model, {**params, **buffers}, (x,))
    finally:
        model.train(was)
    return F.cross_entropy(out / temperature, y)


def snip_scores(model: nn.Module, state: Mapping[str, Tensor], masks: Masks, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """SNIP: ``|∂L/∂w ⊙ w|`` of each masked tensor on the batch ``(x, y)``."""
    params, buffers = _weights(model, state, masks)
    loss = _loss(model, params, buffers, x, y)
    names = list(masks)
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    return {n: (g * params[n]).detach().abs() for n, g in zip(names, grads)}


def grasp_scores(model: nn.Module, state: Mapping[str, Tensor], masks: Masks, x: Tensor, y: Tensor,
                 temperature: float = GRASP_TEMPERATURE) -> dict[str, Tensor]:
    """GraSP: ``S = -w ⊙ Hg`` of each masked tensor (H, g: Hessian and gradient of the loss over every
    parameter, on the batch ``(x, y)``); the weights with the lowest S are the ones to keep."""
    params, buffers = _weights(model, state, masks)
    names = list(params)
    first = torch.autograd.grad(_loss(model, params, buffers, x, y, temperature), [params[n] for n in names])
    grads = torch.autograd.grad(_loss(model, params, buffers, x, y, temperature), [params[n] for n in names],
                                create_graph=True)
    z = sum((g * f.detach()).sum() for g, f in zip(grads, first))
    hg = dict(zip(names, torch.autograd.grad(z, [params[n] for n in names])))
    return {n: (-params[n] * hg[n]).detach() for n in masks}


def synflow_scores(model: nn.Module, state: Mapping[str, Tensor], masks: Masks,
                   input_shape: Sequence[int]) -> tuple[dict[str, Tensor], float]:
    """SynFlow: ``|∂R/∂w ⊙ w|`` (float64) of each masked tensor, and R."""
    net = copy.deepcopy(model).double().eval()
    params, buffers = _weights(net, state, masks, torch.float64)
    with torch.no_grad():
        for p in params.values():
            p.abs_()
    x = torch.ones((1, *input_shape), dtype=torch.float64, device=next(iter(params.values())).device)
    r = functional_call(net, {**params, **buffers}, (x,)).sum()
    names = list(masks)
    grads = torch.autograd.grad(r, [params[n] for n in names])
    return {n: (g * params[n]).detach().abs() for n, g in zip(names, grads)}, float(r.detach())


# ---------------------------------------------------------------- masks from scores
def _kept(total: int, density: float) -> int:
    return total - min(total, max(0, math.floor((1 - density) * total + 0.5)))


def keep_to_density(scores: Mapping[str, Tensor], masks: Masks, density: float, *,
                    layer_density: Mapping[str, float] | None = None, invert: bool = False) -> Masks:
    """Masks keeping the highest keep-scores (``invert``: the lowest) among ``masks``' survivors: ``density`` of
    the tensors ranked together, each tensor in ``layer_density`` at its own density. Pruned entries stay pruned."""
    layer_density = dict(layer_density or {})
    pooled = [n for n in masks if n not in layer_density]
    groups = [([n], layer_density[n]) for n in masks if n in layer_density]
    if pooled:
        groups.append((pooled, density))
    out: Masks = {}
    for names, d in groups:
        flat = []
        for n in names:
            s = scores[n].detach().reshape(-1).double()
            s = -s if invert else s
            flat.append(torch.where(masks[n].reshape(-1).to(s.device) != 0, s, torch.full_like(s, -math.inf)))
        cat = torch.cat(flat)
        keep = torch.zeros(cat.numel(), dtype=torch.float32, device=cat.device)
        count = _kept(cat.numel(), d)
        alive = int((cat > -math.inf).sum())
        order = torch.sort(cat, stable=True, descending=True).indices[:min(count, alive)]
        keep[order] = 1.0
        for n, part in zip(names, keep.split([masks[n].numel() for n in names])):
            out[n] = part.reshape(masks[n].shape).to(masks[n].device)
    return {n: out[n] for n in masks}


def synflow_masks(model: nn.Module, state: Mapping[str, Tensor], masks: Masks, density: float,
                  input_shape: Sequence[int], *, rounds: int = 100, layer_density: Mapping[str, float] | None = None,
                  invert: bool = False) -> Masks:
    """SynFlow's iterative pruning: ``rounds`` rounds, round j to density ``density^(j/rounds)`` (each tensor
    of ``layer_density`` to its own density to that power), rescored from the masks of the round before."""
    if rounds < 1:
        raise ConfigError(f"imp.synflow_rounds: must be at least 1, got {rounds}")
    current = dict(masks)
    for j in range(1, rounds + 1):
        scores, _ = synflow_scores(model, state, current, input_shape)
        e = j / rounds
        current = keep_to_density(scores, current, density ** e, invert=invert,
                                  layer_density={n: d ** e for n, d in (layer_density or {}).items()})
    return current


def pai_masks(strategy: str, model: nn.Module, state: Mapping[str, Tensor], masks: Masks, density: float, *,
              batch: tuple[Tensor, Tensor] | None = None, input_shape: Sequence[int] = (), rounds: int = 100,
              layer_density: Mapping[str, float] | None = None, invert: bool = False) -> Masks:
    """Masks of ``strategy`` (``PAI_STRATEGIES``) at ``density``, scored at ``state`` under ``masks``."""
    if strategy == "synflow":
        return synflow_masks(model, state, masks, density, input_shape, rounds=rounds,
                             layer_density=layer_density, invert=invert)
    if strategy not in DATA_DRIVEN:
        raise ConfigError(f"imp.strategy: {strategy!r} is not a pruning-at-initialization strategy; "
                          f"choose one of {', '.join(PAI_STRATEGIES)}")
    if batch is None or batch[0].shape[0] == 0:
        raise ConfigError(f"imp.score_batch: strategy {strategy!r} scores weights on a batch of training data; "
                          "give at least 1 example")
    if strategy == "snip":
        scores = snip_scores(model, state, masks, *batch)
    else:  # GraSP keeps the lowest S
        scores = {n: -s for n, s in grasp_scores(model, state, masks, *batch).items()}
    return keep_to_density(scores, masks, density, layer_density=layer_density, invert=invert)


# ---------------------------------------------------------------- sanity checks (Frankle et al. 2021)
def shuffle_within_layers(masks: Masks, generator: torch.Generator | None = None) -> Masks:
    """Each tensor's mask permuted uniformly at random within the tensor: every layer keeps its density.

    The values, survivors first, are placed at the positions of one ``randperm`` per tensor, in order: the draw
    of ``pruning.random_masks_like``, so for 0/1 masks and generators in the same state the two give the same
    mask. IMP's ``random`` baseline (a random mask with the ticket's per-layer counts, from the ticket's start)
    is therefore each level's own mask shuffled within each layer: Frankle et al. 2021's non-compounding shuffle.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    out: Masks = {}
    for name in masks:
        m = masks[name]
        flat = m.reshape(-1)
        perm = torch.randperm(flat.numel(), generator=generator, device=gen_device).to(m.device)
        new = torch.empty_like(flat)
        new[perm] = flat.sort(descending=True, stable=True).values
        out[name] = new.reshape(m.shape)
    return out


__all__ = ["DATA_DRIVEN", "GRASP_TEMPERATURE", "MASK_SHUFFLES", "PAI_STRATEGIES", "grasp_scores", "keep_to_density",
           "pai_masks", "shuffle_within_layers", "snip_scores", "synflow_masks", "synflow_scores"]
