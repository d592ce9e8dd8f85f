"""Masks and pruning strategies for iterative magnitude pruning (IMP).

A mask set (``Masks``) maps a parameter name such as ``"fc1.weight"`` to a
float32 tensor of that parameter's shape holding 1 where the weight survives
and 0 where it is pruned. Only the weights of convolution and linear layers
are prunable; biases and normalization parameters never are.

One IMP step removes a fraction of the *surviving* weights, chosen from the
weights at the end of the previous level's training, by one of the strategies
in ``STRATEGIES``:

- ``global``: the smallest ``|w|`` across every masked tensor together.
- ``layerwise``: each tensor loses its own rate of its survivors (Frankle &
  Carbin 2019), with per-layer overrides (e.g. the output layer at half rate).
- ``lamp``: the smallest LAMP scores (Lee et al. 2021) across all tensors.
- ``random``: uniformly random survivors across all tensors (a baseline).

Counts are exact: ``round(rate * survivors)`` rounded half up, and ties in the
score are broken by a stable sort over the survivors in flattened order (tensors
in the mask's key order, then row-major position), so the same inputs always
give the same mask on any device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from numbers import Real

import torch
from torch import Tensor, nn

from ..errors import ConfigError

Masks = dict[str, Tensor]

STRATEGIES = ("global", "layerwise", "lamp", "random")
# Zhou et al. (2019), "Deconstructing Lottery Tickets": which weights a level keeps, scored from the weights
# at the rewind point (w_i) and at the end of training (w_f). large_final is magnitude pruning.
CRITERIA = ("large_final", "small_final", "large_init", "small_init", "large_init_large_final",
            "small_init_small_final", "magnitude_increase", "movement", "large_final_same_sign", "random")


# Elementwise keep-scores of the criteria (higher = kept), from w_f alone or from (w_f, w_i).
_FINAL_ONLY: dict[str, Callable[[Tensor], Tensor]] = {
    "large_final": lambda f: f.abs(),
    "small_final": lambda f: -f.abs(),
}
_ELEMENTWISE: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "large_init": lambda f, i: i.abs(),
    "small_init": lambda f, i: -i.abs(),
    "magnitude_increase": lambda f, i: f.abs() - i.abs(),
    "movement": lambda f, i: (f - i).abs(),
    "large_final_same_sign": lambda f, i: torch.where(torch.sign(f) == torch.sign(i), f.abs(), torch.zeros_like(f)),
}


def criterion_scores(criterion: str, final: Sequence[Tensor], initial: Sequence[Tensor] | None,
                     generator: torch.Generator | None = None) -> list[Tensor]:
    """Keep-scores (higher = kept) of the survivors of one ranking pool, one 1-D tensor per tensor.

    As in Zhou et al.'s code: ``large_init_large_final`` keeps the weights above one percentile
    threshold in both |w_i| and |w_f|, so its score is the smaller of the two percentile ranks
    within the pool (``small_init_small_final`` the same on -|w|); ``large_final_same_sign`` scores
    weights whose sign changed 0; ``random`` draws uniform scores from ``generator``.
    """
    if criterion not in CRITERIA:
        raise ConfigError(f"imp.criterion: unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    wf = [t.double() for t in final]
    if criterion == "random":
        gen_device = generator.device if generator is not None else torch.device("cpu")
        return [torch.rand(t.shape, generator=generator, device=gen_device, dtype=torch.float64).to(t.device)
                for t in wf]
    if criterion in _FINAL_ONLY:
        return [_FINAL_ONLY[criterion](f) for f in wf]
    if initial is None:
        raise ConfigError(f"imp.criterion: {criterion!r} needs the weights at the rewind point")
    wi = [t.double() for t in initial]
    if criterion in _ELEMENTWISE:
        return [_ELEMENTWISE[criterion](f, i) for f, i in zip(wf, wi)]
    sign = 1.0 if criterion == "large_init_large_final" else -1.0
    sizes = [t.numel() for t in wf]
    rank_f = _ranks(torch.cat([sign * t.abs() for t in wf]) if wf else torch.zeros(0, dtype=torch.float64))
    rank_i = _ranks(torch.cat([sign * t.abs() for t in wi]) if wi else torch.zeros(0, dtype=torch.float64))
    return list(torch.minimum(rank_f, rank_i).split(sizes))


# What the kept weights of an IMP ticket start from (Zhou et al. 2019, "mask-1 actions").
MASK1_ACTIONS = ("rewind", "reinit", "reshuffle", "constant", "random_sign")
# What the removed weights do: ``zero`` (pruned), ``freeze`` (held at their start values: the "lottery
# heroes" of Tartaglione et al., the weights that are updated being the ticket), ``freeze_if_moving_away``
# (Zhou et al.: held at their start values where training moved them away from zero, |w_f| > |w_i|,
# zeroed elsewhere).
MASK0_ACTIONS = ("zero", "freeze", "freeze_if_moving_away")


def mask1_start(action: str, rewound: Mapping[str, Tensor], masks: Masks, *,
                fresh: Mapping[str, Tensor] | None = None, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """The start state of a ticket: ``rewound`` with the masked tensors' kept weights set by ``action``.

    ``rewind``: as they were at the rewind point; ``reinit``: from ``fresh`` (a new draw of the init
    scheme); ``reshuffle``: the tensor's kept values permuted among its kept positions; ``constant``:
    ±σ with the rewound sign, σ the std of the whole rewound tensor; ``random_sign``: the rewound
    magnitudes with random signs. Tensors without a mask (biases, normalization) stay rewound; pruned
    positions are zeroed by the mask during training either way. ``generator`` seeds the random actions.
    """
    if action not in MASK1_ACTIONS:
        raise ConfigError(f"imp.mask1: unknown action {action!r}; choose one of {', '.join(MASK1_ACTIONS)}")
    out = {k: v.clone() for k, v in rewound.items()}
    if action == "rewind":
        return out
    if action == "reinit" and fresh is None:
        raise ConfigError("imp.mask1: 'reinit' needs a freshly initialized state")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    for name in sorted(masks):
        w, keep = out[name], masks[name].to(out[name].device).bool()
        if action == "reinit":
            w = torch.where(keep, fresh[name].to(w), w)
        elif action == "reshuffle":
            flat, kept = w.reshape(-1).clone(), keep.reshape(-1).nonzero().squeeze(1)
            order = torch.randperm(kept.numel(), generator=generator, device=gen_device).to(kept.device)
            flat[kept] = flat[kept][order]
            w = flat.view_as(w)
        elif action == "constant":
            sigma = w.double().std().to(w.dtype) if w.numel() > 1 else w.abs().mean()
            w = torch.where(keep, torch.where(w >= 0, sigma, -sigma), w)
        else:  # random_sign
            signs = torch.randint(0, 2, w.shape, generator=generator, device=gen_device).to(w.device) * 2 - 1
            w = torch.where(keep, w.abs() * signs.to(w.dtype), w)
        out[name] = w
    return out


def mask0_start(action: str, start: Mapping[str, Tensor], masks: Masks, *,
                initial: Mapping[str, Tensor] | None = None, final: Mapping[str, Tensor] | None = None,
                held: Masks | None = None) -> dict[str, Tensor]:
    """``start`` with the masks' removed positions set as mask-0 ``action`` wants them before training.

    ``zero``: 0; ``freeze``: unchanged (training then holds them); ``freeze_if_moving_away``: unchanged
    where the weight moved away from zero when it was removed, 0 elsewhere: ``held`` (from
    ``moving_away_held``, which carries the decision through the levels of iterative pruning) or, when
    not given, ``|final| > |initial|`` (the weights at the end and at the rewind point of the training
    that chose the mask). Kept positions and unmasked tensors are never touched.
    """
    if action not in MASK0_ACTIONS:
        raise ConfigError(f"imp.mask0: unknown action {action!r}; choose one of {', '.join(MASK0_ACTIONS)}")
    out = {k: v.clone() for k, v in start.items()}
    if action == "freeze":
        return out
    for name in sorted(masks):
        w, keep = out[name], masks[name].to(out[name].device).bool()
        hold = keep
        if action == "freeze_if_moving_away":
            if held is not None:
                hold = keep | held[name].to(w.device).bool()
            elif initial is None or final is None:
                raise ValueError("mask0_start: freeze_if_moving_away needs held, or initial and final weights")
            else:
                hold = keep | (final[name].to(w.device).abs() > initial[name].to(w.device).abs())
        out[name] = torch.where(hold, w, torch.zeros_like(w))
    return out


def moving_away_held(previous_held: Masks | None, previous_masks: Masks, masks: Masks, *,
                     initial: Mapping[str, Tensor], final: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The removed weights ``freeze_if_moving_away`` holds after this level: a weight is judged once, when
    it is removed (``|final| > |initial|``, the weights the level's mask was chosen from and those at the
    rewind point), and keeps that decision at every later level (where, held, it no longer moves)."""
    out = {}
    for name, m in masks.items():
        keep = m.bool()
        newly = previous_masks[name].to(keep.device).bool() & ~keep
        moved = final[name].to(keep.device).abs() > initial[name].to(keep.device).abs()
        before = previous_held[name].to(keep.device).bool() if previous_held else torch.zeros_like(keep)
        out[name] = (before | (newly & moved)) & ~keep
    return out


def updated_fraction(masks: Masks, params: Mapping[str, Tensor]) -> float:
    """Fraction of all parameters that training updates: the masks' kept weights and every unmasked tensor."""
    total = sum(v.numel() for v in params.values())
    fixed = sum(int(m.numel() - m.count_nonzero()) for m in masks.values())
    return (total - fixed) / total


def _ranks(values: Tensor) -> Tensor:
    """Each value's rank (0 = smallest), ties broken by position, as float64."""
    ranks = torch.empty(values.numel(), dtype=torch.float64, device=values.device)
    ranks[torch.sort(values, stable=True).indices] = torch.arange(values.numel(), dtype=torch.float64,
                                                                   device=values.device)
    return ranks

# Layers whose ``weight`` is prunable; everything else (biases, norms, embeddings) is left dense.
PRUNABLE_MODULES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Linear)


# ---------------------------------------------------------------------------
# Which tensors are prunable
# ---------------------------------------------------------------------------
def prunable_names(model: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
    """Names of the weights of every Conv1d/Conv2d/Linear in model order, less ``exclude``."""
    names: list[str] = []
    for module_name, module in model.named_modules():
        if isinstance(module, PRUNABLE_MODULES) and getattr(module, "weight", None) is not None:
            names.append(f"{module_name}.weight" if module_name else "weight")
    if isinstance(exclude, str):  # a lone string would otherwise be read as a list of characters
        exclude = (exclude,)
    dropped: set[str] = set()
    for entry in exclude:
        hits = {n for n in names if n == entry or _module_of(n) == entry}
        if not hits:
            raise ConfigError(
                f"pruning.exclude: {entry!r} matches no prunable parameter or layer; "
                f"prunable names are {', '.join(names) or '(none)'}"
            )
        dropped |= hits
    return [n for n in names if n not in dropped]


def dense_masks(weights: Mapping[str, Tensor], names: Sequence[str]) -> Masks:
    """All-ones float32 masks for ``names``, on each weight's device."""
    masks: Masks = {}
    for name in names:
        if name not in weights:
            raise KeyError(f"no weight named {name!r}; weights are {', '.join(weights)}")
        masks[name] = torch.ones(
            weights[name].shape, dtype=torch.float32, device=weights[name].device
        )
    return masks


# ---------------------------------------------------------------------------
# Pruning
# ---------------------------------------------------------------------------
def prune(
    weights: Mapping[str, Tensor],
    masks: Masks,
    fraction: float,
    strategy: str,
    *,
    rate_overrides: Mapping[str, float] | None = None,
    generator: torch.Generator | None = None,
    criterion: str = "large_final",
    initial: Mapping[str, Tensor] | None = None,
    invert: bool = False,
) -> Masks:
    """New masks with ``fraction`` of the surviving weights in ``masks`` removed by ``strategy``.

    ``weights`` are the trained weights the choice is made from; only the tensors
    named in ``masks`` are considered. ``rate_overrides`` (``layerwise`` only)
    maps a parameter or module name to its own rate in [0, 1). ``generator``
    seeds ``random``; without it the global torch RNG is used. The input masks
    are not modified, and every pruned entry stays pruned. ``criterion`` (``CRITERIA``, Zhou
    et al. 2019) scores the survivors from ``weights`` (w_f) and ``initial`` (w_i, the weights at
    the rewind point) for the ``global`` and ``layerwise`` strategies; ``large_final`` is magnitude.
    ``invert`` keeps the lowest-scored weights instead (Frankle et al. 2021's sanity check; not ``random``).
    """
    _check_fraction(fraction)
    if criterion != "large_final" and strategy not in ("global", "layerwise"):
        raise ConfigError(f"imp.criterion: {criterion!r} applies to strategies global and layerwise, not "
                          f"{strategy!r} (lamp scores magnitudes, random ignores weights)")
    if strategy not in STRATEGIES:
        raise ConfigError(
            f"pruning.strategy: unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}"
        )
    if rate_overrides and strategy != "layerwise":
        # Silently ignoring per-layer rates would give a different network than the user asked for.
        raise ConfigError(
            f"pruning.rate_overrides: per-layer rates only apply to strategy 'layerwise', not {strategy!r}"
        )
    if invert and strategy == "random":
        raise ConfigError("imp.invert_scores: strategy 'random' has no scores to invert")
    sign = -1.0 if invert else 1.0
    if not masks:
        return {}
    survive = _surviving(weights, masks)
    # Work on one device so the global sort sees every tensor; masks go back to their own device.
    device = next(iter(survive.values())).device

    if strategy == "layerwise":
        rates = _layer_rates(masks, fraction, rate_overrides or {})
        removed: dict[str, Tensor] = {}
        for name, alive in survive.items():
            idx = alive.nonzero().squeeze(1)
            count = _round_count(rates[name], idx.numel())
            init = [initial[name].detach().reshape(-1).to(alive.device)[idx]] if initial is not None else None
            (scores,) = criterion_scores(criterion, [weights[name].detach().reshape(-1).to(alive.device)[idx]], init,
                                         generator)
            order = torch.sort(sign * scores, stable=True).indices
            removed[name] = idx[order[:count]]
        return _drop(masks, survive, removed)

    # Global strategies: one ranking over the survivors of every tensor, concatenated in key order.
    names = list(survive)
    idxs = [survive[n].to(device).nonzero().squeeze(1) for n in names]
    sizes = [i.numel() for i in idxs]
    total = sum(sizes)
    count = _round_count(fraction, total)
    if strategy == "random":
        gen_device = generator.device if generator is not None else torch.device("cpu")
        picked = torch.randperm(total, generator=generator, device=gen_device)[:count].to(device)
    else:
        if strategy == "global":
            init = ([initial[n].detach().reshape(-1).to(device)[i] for n, i in zip(names, idxs)]
                    if initial is not None else None)
            parts = criterion_scores(criterion, [weights[n].detach().reshape(-1).to(device)[i]
                                                 for n, i in zip(names, idxs)], init, generator)
        else:  # lamp
            scores = lamp_scores(weights, masks)
            parts = [scores[n].reshape(-1).to(device)[i] for n, i in zip(names, idxs)]
        flat = sign * torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)
        picked = torch.sort(flat, stable=True).indices[:count]
    # Map each picked position in the concatenation back to (tensor, position among its survivors).
    ends = torch.cumsum(torch.tensor(sizes, device=device), 0)
    owner = torch.searchsorted(ends, picked, right=True)
    removed = {}
    for k, name in enumerate(names):
        start = int(ends[k]) - sizes[k]
        removed[name] = idxs[k][picked[owner == k] - start]
    return _drop(masks, survive, removed)


def lamp_scores(weights: Mapping[str, Tensor], masks: Masks) -> dict[str, Tensor]:
    """LAMP score of every surviving weight (float64, mask's shape); pruned entries get +inf.

    Within a tensor the survivors are sorted so that |w_1| <= |w_2| <= ... (stable
    sort in flattened order, so equal magnitudes keep their position order) and
    score(u) = w_u^2 / sum_{v >= u} w_v^2. The largest survivor of each tensor
    scores 1. Where the tail sum is 0 (all remaining survivors are exactly zero)
    the score is 0, so those weights are pruned first.
    """
    survive = _surviving(weights, masks)
    out: dict[str, Tensor] = {}
    for name, alive in survive.items():
        device = alive.device
        # float64: tail sums over millions of squares lose the small scores in float32.
        w = weights[name].detach().reshape(-1).to(device=device, dtype=torch.float64)
        idx = alive.nonzero().squeeze(1)
        sq = w[idx] ** 2
        order = torch.sort(sq, stable=True).indices
        sorted_sq = sq[order]
        tail = torch.flip(torch.cumsum(torch.flip(sorted_sq, [0]), 0), [0])
        sorted_scores = torch.where(tail > 0, sorted_sq / torch.where(tail > 0, tail, 1.0), 0.0)
        scores = torch.full_like(w, math.inf)
        scores[idx[order]] = sorted_scores
        out[name] = scores.reshape(masks[name].shape)
    return out


def random_masks_like(masks: Masks, generator: torch.Generator | None = None) -> Masks:
    """Masks with the same number of survivors per tensor as ``masks``, at uniformly random positions."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    out: Masks = {}
    for name, mask in masks.items():
        keep = int((mask != 0).sum())
        perm = torch.randperm(mask.numel(), generator=generator, device=gen_device)[:keep]
        new = torch.zeros(mask.numel(), dtype=torch.float32, device=mask.device)
        new[perm.to(mask.device)] = 1.0
        out[name] = new.reshape(mask.shape)
    return out


# ---------------------------------------------------------------------------
# Density and applying masks
# ---------------------------------------------------------------------------
def density(masks: Masks) -> float:
    """Surviving fraction of all masked weights (1.0 = dense)."""
    total = sum(m.numel() for m in masks.values())
    if total == 0:
        raise ValueError("density of an empty mask set is undefined")
    return sum(int((m != 0).sum()) for m in masks.values()) / total


def layer_densities(masks: Masks) -> dict[str, float]:
    """Surviving fraction of each masked tensor."""
    return {name: int((m != 0).sum()) / m.numel() for name, m in masks.items()}


def apply_masks_(params: Mapping[str, Tensor], masks: Masks) -> None:
    """Zero the pruned entries of ``params`` in place; a param may be stacked as ``[N, *mask.shape]``."""
    with torch.no_grad():
        for name, mask in masks.items():
            if name not in params:
                raise KeyError(
                    f"mask {name!r} has no parameter; parameters are {', '.join(params)}"
                )
            p = params[name]
            if p.shape != mask.shape and tuple(p.shape[1:]) != tuple(mask.shape):
                raise ValueError(
                    f"mask {name!r} has shape {tuple(mask.shape)}, parameter has {tuple(p.shape)}"
                )
            # Broadcasting puts a [*shape] mask over every member of an [N, *shape] stack.
            p.mul_(mask.to(device=p.device, dtype=p.dtype))


def target_density(prune_fraction: float, levels: int) -> float:
    """Density after ``levels`` IMP levels that each remove ``prune_fraction``: (1 - p)^L."""
    _check_fraction(prune_fraction)
    if levels < 0:
        raise ConfigError(f"pruning.levels: must be >= 0, got {levels}")
    return (1.0 - prune_fraction) ** levels


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------
def _module_of(param_name: str) -> str:
    return param_name.rpartition(".")[0]


def _check_fraction(fraction: float) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, Real) or not 0 < fraction < 1:
        raise ConfigError(f"pruning.prune_fraction: must be in (0, 1), got {fraction!r}")


def _round_count(rate: float, survivors: int) -> int:
    # Round half up (not Python's round-half-even) so 2.5 weights means 3, as a reader expects.
    return min(survivors, max(0, math.floor(rate * survivors + 0.5)))


def _surviving(weights: Mapping[str, Tensor], masks: Masks) -> dict[str, Tensor]:
    """Flat bool survivor tensor per mask, after checking the weights match."""
    out: dict[str, Tensor] = {}
    for name, mask in masks.items():
        if name not in weights:
            raise KeyError(f"mask {name!r} has no weight; weights are {', '.join(weights)}")
        if tuple(weights[name].shape) != tuple(mask.shape):
            raise ValueError(
                f"mask {name!r} has shape {tuple(mask.shape)}, weight has {tuple(weights[name].shape)}"
            )
        out[name] = (mask != 0).reshape(-1)
    return out


def _layer_rates(masks: Masks, fraction: float, overrides: Mapping[str, float]) -> dict[str, float]:
    rates = {name: fraction for name in masks}
    for key, rate in overrides.items():
        hits = [n for n in masks if n == key or _module_of(n) == key]
        if not hits:
            raise ConfigError(
                f"pruning.rate_overrides: {key!r} matches no pruned parameter or layer; "
                f"pruned names are {', '.join(masks)}"
            )
        if isinstance(rate, bool) or not isinstance(rate, Real) or not 0 <= rate < 1:
            raise ConfigError(
                f"pruning.rate_overrides: rate for {key!r} must be in [0, 1), got {rate!r}"
            )
        for n in hits:
            rates[n] = float(rate)
    return rates


def _drop(masks: Masks, survive: Mapping[str, Tensor], removed: Mapping[str, Tensor]) -> Masks:
    """New float32 masks: the survivors less the removed flat indices, on each mask's device."""
    out: Masks = {}
    for name, alive in survive.items():
        new = alive.to(torch.float32).clone()
        new[removed[name].to(new.device)] = 0.0
        out[name] = new.reshape(masks[name].shape).to(masks[name].device)
    return out
