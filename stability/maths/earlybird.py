"""The pure maths of early-bird tickets (You et al. 2020): masks at a mask point, Hamming distances between
masks, the detection window, and the training cost against IMP. ``stability.stages.earlybird`` runs them on a
trunk's checkpoints; its docstring states the method and the choices made."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .pruning import PRUNABLE_MODULES, Masks, dense_masks, prune

RULES = ("consecutive", "latest")
# Column blocks of at most 2**22 positions: 0/1 sums in float32 stay exact (below 2**24).
_CHUNK = 1 << 22


def magnitude_masks(weights: Mapping[str, Tensor], names: Sequence[str], density: float) -> Masks:
    """Global magnitude masks over ``names`` keeping ``density`` of their weights (``pruning.prune``)."""
    return prune(weights, dense_masks(weights, names), 1.0 - density, "global")


def batchnorm_layers(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[str, str | None]]:
    """(BatchNorm module, the conv or linear layer whose output it normalizes, or None), in model order.

    Found by one forward pass in eval mode on zeros: a BatchNorm feeds on a layer when its input is
    that layer's output tensor. BatchNorms without affine parameters are left out (they have no γ).
    """
    bns = [(n, m) for n, m in model.named_modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]
    if not bns:
        return []
    outputs: list[tuple[Tensor, str]] = []
    feeds: dict[str, str | None] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE_MODULES):
            handles.append(module.register_forward_hook(
                lambda _m, _inp, out, name=name: outputs.append((out, name))))

    def fed_by(name: str, inp: tuple[Tensor, ...]) -> None:  # a pre-hook that returned a value would replace inp
        feeds.setdefault(name, next((c for t, c in outputs if t is inp[0]), None))

    for name, module in bns:
        handles.append(module.register_forward_pre_hook(lambda _m, inp, name=name: fed_by(name, inp)))
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(2, *input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    modules = dict(model.named_modules())
    out = []
    for name, bn in bns:
        conv = feeds.get(name)
        if conv is not None and modules[conv].weight.shape[0] != bn.weight.shape[0]:
            conv = None  # not channel for channel (never seen in the suite's models)
        out.append((name, conv))
    return out


def channel_keep(weights: Mapping[str, Tensor], layers: Sequence[tuple[str, str | None]], density: float) -> Tensor:
    """Kept BatchNorm channels (bool, all layers concatenated in order): the largest |γ| overall.

    ``round((1 - density) * C)`` channels (half up) with the smallest |γ| are removed; ties go by position.
    """
    if not layers:
        raise ConfigError("earlybird.mask: 'channel' needs BatchNorm layers with scaling factors")
    gammas = torch.cat([weights[f"{bn}.weight"].detach().reshape(-1).abs().double().cpu() for bn, _ in layers])
    total = gammas.numel()
    removed = min(total, max(0, math.floor((1.0 - density) * total + 0.5)))
    keep = torch.ones(total, dtype=torch.bool)
    keep[torch.sort(gammas, stable=True).indices[:removed]] = False
    return keep


def channel_masks(keep: Tensor, layers: Sequence[tuple[str, str | None]], weights: Mapping[str, Tensor]) -> Masks:
    """A channel mask as weight masks: γ, β of each removed channel and the filter (and bias) feeding it."""
    out: Masks = {}
    offset = 0
    for bn, conv in layers:
        gamma = weights[f"{bn}.weight"]
        k = keep[offset:offset + gamma.numel()].to(torch.float32)
        offset += gamma.numel()
        out[f"{bn}.weight"] = k.clone()
        if f"{bn}.bias" in weights:
            out[f"{bn}.bias"] = k.clone()
        if conv is None:
            continue
        w = weights[f"{conv}.weight"]
        rows = k.view(-1, *([1] * (w.dim() - 1))).expand(w.shape)
        out[f"{conv}.weight"] = rows.clone() * out.get(f"{conv}.weight", torch.ones(w.shape))
        if f"{conv}.bias" in weights:
            out[f"{conv}.bias"] = k.clone()
    return out


def flat_mask(masks: Mapping[str, Tensor]) -> Tensor:
    """Every mask tensor flattened and concatenated in key order (bool)."""
    return torch.cat([m.detach().reshape(-1).cpu() != 0 for m in masks.values()])


def hamming_distance(a: Tensor | Mapping[str, Tensor], b: Tensor | Mapping[str, Tensor]) -> float:
    """Fraction of positions whose 0/1 differs between two masks (tensors, or mask sets with the same keys)."""
    fa = flat_mask(a) if isinstance(a, Mapping) else a.detach().reshape(-1).cpu() != 0
    fb = flat_mask(b) if isinstance(b, Mapping) else b.detach().reshape(-1).cpu() != 0
    if fa.shape != fb.shape or fa.numel() == 0:
        raise ValueError(f"masks of {fa.numel()} and {fb.numel()} positions cannot be compared")
    return int((fa != fb).sum()) / fa.numel()


def distance_matrix(masks: Sequence[Tensor]) -> Tensor:
    """Normalized Hamming distance between every pair of flat masks: a float64 ``[P, P]`` matrix (exact counts)."""
    m = torch.stack([x.detach().reshape(-1).cpu() != 0 for x in masks])
    n = m.shape[1]
    counts = torch.zeros(len(masks), len(masks), dtype=torch.int64)
    for start in range(0, n, _CHUNK):
        block = m[:, start:start + _CHUNK].to(torch.float32)
        ones = block.sum(1)
        both = block @ block.T
        # |a xor b| = |a| + |b| - 2 |a and b|
        counts += (ones[:, None] + ones[None, :] - 2 * both).round().to(torch.int64)
    return counts.double() / n


def window_maxima(distances: Tensor, window: int, rule: str = "consecutive") -> list[float | None]:
    """At each mask point, the largest distance in its detection window (None until the window is full).

    ``consecutive``: the last ``window`` distances between neighbouring masks (``D[j, j-1]``, j = i-window+1..i);
    ``latest``: the distances from mask i to each of the ``window`` masks before it (``D[i, j]``).
    """
    if rule not in RULES:
        raise ConfigError(f"earlybird.rule: unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    d = distances.tolist()
    out: list[float | None] = []
    for i in range(len(d)):
        if i < window:
            out.append(None)
        elif rule == "consecutive":
            out.append(max(d[j][j - 1] for j in range(i - window + 1, i + 1)))
        else:
            out.append(max(d[i][j] for j in range(i - window, i)))
    return out


def detect(distances: Tensor, threshold: float, window: int, rule: str = "consecutive") -> int | None:
    """Index of the first mask point whose window maximum is below ``threshold`` (None: never)."""
    for i, top in enumerate(window_maxima(distances, window, rule)):
        if top is not None and top < threshold:
            return i
    return None


def imp_levels_for(density: float, prune_fraction: float) -> int:
    """IMP levels to reach ``density`` at ``prune_fraction`` per level: ceil(log(density) / log(1 - p))."""
    exact = math.log(density) / math.log(1.0 - prune_fraction)
    return max(1, math.ceil(exact - 1e-9))  # 0.8^2 = 0.64 is two levels, not three by round-off


def training_cost(detected_step: int, rewind_step: int, total_steps: int, density: float,
                  prune_fraction: float) -> dict[str, Any]:
    """Iterations of the early-bird ticket (trunk to max(t*, k), ticket k..T) and of IMP to the same density."""
    ticket = total_steps - rewind_step
    search = max(detected_step, rewind_step)
    levels = imp_levels_for(density, prune_fraction)
    eb, imp = search + ticket, total_steps + levels * ticket
    return {"prune_fraction": prune_fraction, "early_bird_iterations": eb, "search_iterations": search,
            "ticket_iterations": ticket, "imp_levels": levels, "imp_density": (1.0 - prune_fraction) ** levels,
            "imp_iterations": imp, "early_bird_trainings": eb / total_steps, "imp_trainings": imp / total_steps,
            "imp_over_early_bird": imp / eb}


__all__ = ["RULES", "batchnorm_layers", "channel_keep", "channel_masks", "detect", "distance_matrix", "flat_mask",
           "hamming_distance", "imp_levels_for", "magnitude_masks", "training_cost", "window_maxima"]
