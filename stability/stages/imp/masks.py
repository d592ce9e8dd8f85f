"""Choosing each level's masks and the states its members start from.

A level's mask is pruned from the previous level's final weights, or (one-shot) from the dense
network's final weights straight to the level's density, or read from another IMP run (``mask_from``,
ticket transfer). The ticket's kept weights start as ``mask1`` says and its removed weights as ``mask0``
says; the baselines (a fresh initialization under the same mask, the rewound weights under a random
mask of the same per-layer densities) are stacked after it as extra members.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...config import settings_hash
from ...engine import derive_seed
from ...errors import CheckpointError, ConfigError, RecordError
from ...maths.pruning import (
    Masks,
    dense_masks,
    mask0_start,
    mask1_start,
    moving_away_held,
    prunable_names,
    prune,
    random_masks_like,
)
from ...maths.saliency import DATA_DRIVEN, PAI_STRATEGIES, pai_masks, shuffle_within_layers
from ...models.build import output_layer_name
from ...store.files import load_tensors, read_json, tensors_digest
from ...store.schema import MANIFEST, MASKS, mask_name
from ..context import Context
from .settings import ImpSettings

State = dict[str, Tensor]


# ---------------------------------------------------------------- which tensors, at which rates
def _resolve_layer(name: str, ctx: Context) -> str:
    return output_layer_name(ctx.model) if name == "output" else name


def prunable(ctx: Context, settings: ImpSettings) -> list[str]:
    """The tensors IMP prunes: every prunable weight but those ``imp.exclude`` leaves dense."""
    return prunable_names(ctx.model, [_resolve_layer(n, ctx) for n in settings.exclude])


def rate_overrides(ctx: Context, settings: ImpSettings, names: list[str]) -> dict[str, float] | None:
    """Layerwise per-tensor rates (``conv_fraction``, ``rate_overrides``), or a ConfigError naming the layers."""
    if settings.strategy not in ("layerwise", *PAI_STRATEGIES):
        return None
    rates: dict[str, float] = {}
    if settings.conv_fraction:
        shapes = dict(ctx.model.named_parameters())
        rates.update({n: settings.conv_fraction for n in names if shapes[n].dim() > 2})
    every = prunable_names(ctx.model)  # a layer left dense by imp.exclude may still be named
    for key, rate in settings.rate_overrides:
        layer = _resolve_layer(key, ctx)
        if not any(n == layer or n.rsplit(".", 1)[0] == layer for n in every):
            layers = sorted({"output", *every, *(n.rsplit(".", 1)[0] for n in every if "." in n)})
            raise ConfigError(f"imp.rate_overrides: {key!r} names no prunable layer of model "
                              f"{ctx.cfg.model.name!r}; layers are {', '.join(layers)}")
        rates.update({n: rate for n in names if n == layer or n.rsplit(".", 1)[0] == layer})
    return rates or None


def _scaled_rates(rates: dict[str, float] | None, level: int) -> dict[str, float] | None:
    """Per-layer one-shot rates after ``level`` rounds at each layer's own rate."""
    if not rates:
        return None
    return {k: 1 - (1 - v) ** level for k, v in rates.items()}


# ---------------------------------------------------------------- transferred masks
@dataclass(frozen=True)
class MaskSource:
    """The IMP run whose masks a transfer run trains: its directory, a digest of the masks, what it was."""

    run_dir: str
    digest: str
    files: dict[tuple[int, int], str] = field(repr=False)
    info: dict[str, Any] = field(repr=False)

    def masks(self, replicate: int, level: int, device: torch.device) -> Masks:
        """The mask of one (replicate, level), on ``device``."""
        return load_tensors(self.files[(replicate, level)], device)[0]


def mask_source(settings: ImpSettings, names: list[str] | None = None,
                shapes: Mapping[str, Tensor] | None = None) -> MaskSource:
    """The masks ``imp.mask_from`` names: every (replicate, level) this run needs, or a ConfigError.

    With ``names`` and ``shapes`` (the model's prunable tensors and parameters) every mask is also checked
    to fit the model, as it is read for its digest."""
    root = Path(settings.mask_from)
    if not (root / MASKS).is_dir():
        raise ConfigError(f"imp.mask_from: {settings.mask_from!r} is not an IMP run directory (no {MASKS}/ folder in "
                          "it); give the imp_<hash> directory whose masks to train")
    files, digests = {}, {}
    for r in range(settings.replicates):
        for level in range(1, settings.levels + 1):
            path = root / mask_name(r, level)
            if not path.is_file():
                held = sorted(p.name for p in (root / MASKS).glob("*.safetensors"))
                raise ConfigError(f"imp.mask_from: {settings.mask_from!r} has no mask for replicate {r}, level {level} "
                                  f"(it holds {', '.join(held) or 'none'}); ask for fewer imp.levels or replicates")
            try:
                masks = load_tensors(path)[0]
            except CheckpointError as exc:
                raise ConfigError(f"imp.mask_from: mask {str(path)!r} cannot be read ({exc})") from None
            if names is not None and shapes is not None:
                _check_transferred(masks, names, shapes, str(path))
            digests[f"{r}/{level}"] = tensors_digest(masks)
            files[(r, level)] = str(path)
    try:
        manifest = read_json(root / MANIFEST)
    except (RecordError, FileNotFoundError):
        manifest = {}
    config = (manifest.get("config") or {}).get("training", {}) if isinstance(manifest, dict) else {}
    info = {"run_dir": str(root), "hash": root.name.split("_", 1)[-1],
            "dataset": config.get("dataset", {}).get("name"), "model": config.get("model", {}).get("name"),
            "optimizer": config.get("optimizer", {}).get("name"), "init_seed": config.get("training", {}).get("init_seed")}
    return MaskSource(str(root), settings_hash(digests), files, info)


def _check_transferred(masks: Mapping[str, Tensor], names: list[str], shapes: Mapping[str, Tensor], where: str) -> None:
    """A transferred mask must cover exactly this model's prunable tensors, with their shapes."""
    if set(masks) != set(names):
        raise ConfigError(f"imp.mask_from: the mask {where} is for other tensors (missing {sorted(set(names) - set(masks))[:4]}, "
                          f"unexpected {sorted(set(masks) - set(names))[:4]}); masks transfer between models of the "
                          "same architecture only")
    for n in names:
        if tuple(masks[n].shape) != tuple(shapes[n].shape):
            raise ConfigError(f"imp.mask_from: the mask {where} has shape {tuple(masks[n].shape)} for {n}, the model's "
                              f"is {tuple(shapes[n].shape)}; masks transfer between models of the same shape only")


# ---------------------------------------------------------------- one replicate's masks, level by level
@dataclass(frozen=True)
class Basis:
    """What one replicate's masks and starts are made from, the same at every level."""

    replicate: int
    names: list[str]  # the pruned tensors
    rates: dict[str, float] | None  # layerwise per-tensor rates
    dense: State  # the dense network's final weights (one-shot masks are chosen from these)
    rewind: State  # the weights at the rewind step: every start, and w_i of the mask criteria
    mask1_fresh: State | None  # mask1 = reinit: the fresh draw the ticket's kept weights start from
    reinit: State | None  # the reinit baseline's start: a fresh initialization with another seed
    source: MaskSource | None  # mask_from: the transferred masks, instead of pruning
    model: torch.nn.Module | None = None  # snip, grasp, synflow: the network the scores are computed through
    batch: tuple[Tensor, Tensor] | None = None  # snip, grasp: the seeded batch of training data
    input_shape: tuple[int, ...] = ()  # synflow: the shape of the all-ones input


def basis(ctx: Context, settings: ImpSettings, replicate: int, dense: State, rewind: State,
          source: MaskSource | None) -> Basis:
    """The basis of replicate ``replicate``, whose context ``ctx`` draws its initializations."""
    names = prunable(ctx, settings)
    seed = ctx.cfg.training.init_seed
    fresh = (ctx.new_model(seed=derive_seed(seed, "mask1-reinit", replicate)).state_dict()
             if settings.mask1 == "reinit" else None)
    reinit = (ctx.new_model(seed=derive_seed(seed, "reinit", replicate)).state_dict()
              if "reinit" in settings.baselines else None)
    batch = None
    if settings.strategy in DATA_DRIVEN:  # drawn once per replicate, the same at every level
        gen = torch.Generator().manual_seed(derive_seed(settings.pruning_seed, "score-batch", replicate))
        pick = torch.randperm(ctx.data.n_train, generator=gen)[:settings.score_batch].to(ctx.data.x_train.device)
        batch = (ctx.data.x_train.index_select(0, pick), ctx.data.y_train.index_select(0, pick))
    return Basis(replicate, names, rate_overrides(ctx, settings, names), dense, rewind, fresh, reinit, source,
                 ctx.model, batch, tuple(ctx.data.input_shape))


@dataclass
class Lineage:
    """A replicate's pruning so far: its latest mask, its latest final weights, the weights mask-0 holds."""

    settings: ImpSettings
    basis: Basis
    masks: Masks  # the latest level's mask (every tensor dense before level 1)
    final: State  # the latest level's final weights (the dense network's before level 1)
    held: Masks | None = None  # freeze_if_moving_away: the removed weights held so far

    @classmethod
    def dense(cls, settings: ImpSettings, basis: Basis) -> Lineage:
        """Before level 1: the dense network."""
        return cls(settings, basis, dense_masks(basis.dense, basis.names), basis.dense)

    @property
    def chooser(self) -> State:
        """The weights the next mask is chosen from: the dense network's (one-shot) or the latest level's."""
        return self.basis.dense if self.settings.one_shot else self.final

    def take(self, masks: Masks) -> None:
        """Move on to a level's mask. A removed weight's freeze_if_moving_away decision is made once, here, when it
        is removed, and carried to every later level (the ticket's; the baselines' masks are drawn afresh)."""
        if self.settings.mask0 == "freeze_if_moving_away":
            self.held = moving_away_held(self.held, self.masks, masks, initial=self.basis.rewind, final=self.chooser)
        self.masks = masks


def choose_masks(lineage: Lineage, level: int, device: torch.device) -> Masks:
    """Level ``level``'s mask: transferred, pruned one-shot from the dense network, or pruned from the latest level."""
    settings, basis = lineage.settings, lineage.basis
    masks = _chosen(lineage, level, device)
    if settings.mask_shuffle == "layer":  # the sanity check: each layer's mask permuted, its density kept
        masks = shuffle_within_layers(masks, torch.Generator().manual_seed(
            derive_seed(settings.pruning_seed, "mask-shuffle", basis.replicate, level)))
    return masks


def _chosen(lineage: Lineage, level: int, device: torch.device) -> Masks:
    settings, basis = lineage.settings, lineage.basis
    if basis.source is not None:  # checked to fit the model when the source was read
        return basis.source.masks(basis.replicate, level, device)
    if settings.strategy in PAI_STRATEGIES:  # one-shot from the rewind point to the level's density
        density = (1 - settings.prune_fraction) ** level
        layer = {n: (1 - r) ** level for n, r in (basis.rates or {}).items()}
        assert basis.model is not None
        return pai_masks(settings.strategy, basis.model, basis.rewind, dense_masks(basis.rewind, basis.names),
                         density, batch=basis.batch, input_shape=basis.input_shape, rounds=settings.synflow_rounds,
                         layer_density=layer, invert=settings.invert_scores)
    gen = torch.Generator().manual_seed(derive_seed(settings.pruning_seed, "prune", basis.replicate, level))
    if settings.one_shot:
        fraction = 1 - (1 - settings.prune_fraction) ** level
        return prune(basis.dense, dense_masks(basis.dense, basis.names), fraction, settings.strategy,
                     rate_overrides=_scaled_rates(basis.rates, level), generator=gen, criterion=settings.criterion,
                     initial=basis.rewind, invert=settings.invert_scores)
    return prune(lineage.final, lineage.masks, settings.prune_fraction, settings.strategy,
                 rate_overrides=basis.rates, generator=gen, criterion=settings.criterion, initial=basis.rewind,
                 invert=settings.invert_scores)


@dataclass(frozen=True)
class LevelStart:
    """The members one level trains, the ticket first and then the baselines: each one's mask and start state."""

    kinds: list[str]
    masks: dict[str, Masks]
    states: dict[str, State]


def level_starts(lineage: Lineage, level: int) -> LevelStart:
    """The ticket (the lineage's latest mask, started as mask-1 and mask-0 say) and its baselines at ``level``."""
    settings, basis = lineage.settings, lineage.basis
    r, masks = basis.replicate, lineage.masks
    # rewind: the weights at the rewind step; lr_rewind and finetune: the previous level's final weights
    begin = basis.rewind if settings.retrain == "rewind" else lineage.final
    member_masks = {"imp": masks}
    states = {"imp": mask1_start(settings.mask1, begin, masks, fresh=basis.mask1_fresh,
                                 generator=torch.Generator().manual_seed(
                                     derive_seed(settings.pruning_seed, "mask1", r, level)))}
    if "random" in settings.baselines:  # this level's own mask shuffled within each layer (the same draw as
        # saliency.shuffle_within_layers): Frankle et al. 2021's layer shuffle, outside the lineage
        member_masks["random"] = random_masks_like(masks, torch.Generator().manual_seed(
            derive_seed(settings.pruning_seed, "random-baseline", r, level)))
        states["random"] = begin
    if "reinit" in settings.baselines:
        member_masks["reinit"] = masks
        states["reinit"] = basis.reinit
    if settings.mask0 != "zero":  # the removed weights of every kind keep their start values (or zero, where not
        # moving away). The ticket carries each weight's decision from the level that removed it; the baselines'
        # masks are drawn afresh at every level, so their removed weights are judged by this level's weights.
        states = {k: mask0_start(settings.mask0, s, member_masks[k], initial=basis.rewind, final=lineage.chooser,
                                 held=lineage.held if k == "imp" else None)
                  for k, s in states.items()}
    return LevelStart(["imp", *settings.baselines], member_masks, states)


__all__ = ["Basis", "LevelStart", "Lineage", "MaskSource", "basis", "choose_masks", "level_starts", "mask_source",
           "prunable", "rate_overrides"]
