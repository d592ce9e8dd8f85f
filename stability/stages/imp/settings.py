"""The ``[imp]`` table: how tickets are searched for, checked once, and the training methods IMP refuses."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...config import Config, settings_from_table
from ...errors import ConfigError
from ...maths.health import DEFAULT_CHANCE_MARGIN, check_margin
from ...maths.pruning import CRITERIA, MASK0_ACTIONS, MASK1_ACTIONS, STRATEGIES
from ...maths.saliency import DATA_DRIVEN, MASK_SHUFFLES, PAI_STRATEGIES
from ...methods import method_of
from ...steps import Step

BASELINES = ("reinit", "random")
IMP_STRATEGIES = (*STRATEGIES, *PAI_STRATEGIES)  # magnitude-style strategies, then pruning at initialization
# How a pruned network is retrained (Renda et al. 2020): weights and schedule back to the rewind step; the
# previous level's final weights with the schedule replayed from the rewind step; or those weights at the
# schedule's final learning rate. Every one trains T - k steps.
RETRAINS = ("rewind", "lr_rewind", "finetune")


@dataclass(frozen=True)
class ImpSettings:
    """The ``[imp]`` table: how tickets are searched for."""

    levels: int = 5
    prune_fraction: float = 0.2  # of the surviving weights, per level
    strategy: str = "global"  # global | layerwise | lamp | random | snip | grasp | synflow (IMP_STRATEGIES)
    rewind: str = "0"  # "0" | a step like "500it" | "auto" (first stable step of the dense network)
    one_shot: bool = False  # prune the dense network's final weights straight to each level's density
    baselines: tuple[str, ...] = ()  # reinit, random
    replicates: int = 1  # different init seeds: init_seed + r
    instability: bool = False  # also measure each sparse network's instability at the rewind step
    exclude: tuple[str, ...] = ()  # tensors left dense; "output" names the output layer
    rate_overrides: tuple[tuple[str, float], ...] = ()  # layerwise per-layer rates; "output" allowed
    conv_fraction: float = 0.0  # layerwise: rate for convolution weights (0 = prune_fraction)
    pruning_seed: int = 0  # random strategy and random-mask baseline
    criterion: str = "large_final"  # which weights a level keeps (Zhou et al. 2019; pruning.CRITERIA)
    mask1: str = "rewind"  # what the kept weights start from (pruning.MASK1_ACTIONS)
    supermask: bool = False  # also record each ticket's test accuracy before training (Zhou et al.'s supermasks)
    mask0: str = "zero"  # what the removed weights do (pruning.MASK0_ACTIONS): zero, freeze, freeze_if_moving_away
    mask_from: str = ""  # an IMP run directory whose masks this run trains (ticket transfer) instead of pruning
    chance_margin: float = DEFAULT_CHANCE_MARGIN  # networks this close to chance error are flagged untrained
    retrain: str = "rewind"  # RETRAINS: rewind | lr_rewind | finetune (Renda et al. 2020)
    score_batch: int = 256  # snip, grasp: training examples (drawn with pruning_seed) the scores are computed on
    synflow_rounds: int = 100  # synflow: pruning rounds, exponential schedule
    mask_shuffle: str = "none"  # none | layer: each level's mask permuted within each layer (Frankle et al. 2021),
    # kept in the lineage (iterative IMP prunes the next level from it); per level, not compounding: baselines random
    invert_scores: bool = False  # keep the lowest-scored weights instead of the highest (Frankle et al. 2021)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> ImpSettings:
        """Raise ConfigError naming the first bad setting and its allowed values; return self."""
        check_margin(self.chance_margin, "imp.chance_margin")
        if self.levels < 1:
            raise ConfigError(f"imp.levels: must be at least 1, got {self.levels}")
        if not 0 < self.prune_fraction < 1:
            raise ConfigError(f"imp.prune_fraction: must be in (0, 1), got {self.prune_fraction}")
        if self.strategy not in IMP_STRATEGIES:
            raise ConfigError(f"imp.strategy: unknown strategy {self.strategy!r}; choose one of "
                              f"{', '.join(IMP_STRATEGIES)}")
        if self.retrain not in RETRAINS:
            raise ConfigError(f"imp.retrain: unknown retraining {self.retrain!r}; choose one of {', '.join(RETRAINS)}")
        if self.retrain != "rewind" and self.strategy in PAI_STRATEGIES:
            raise ConfigError(f"imp.retrain: {self.retrain!r} retrains trained weights; strategy {self.strategy!r} "
                              "prunes at the rewind point, so use imp.retrain = rewind")
        if self.strategy in DATA_DRIVEN and (isinstance(self.score_batch, bool) or self.score_batch < 1):
            raise ConfigError(f"imp.score_batch: strategy {self.strategy!r} scores weights on a batch of training "
                              f"data; must be at least 1 example, got {self.score_batch}")
        if isinstance(self.synflow_rounds, bool) or self.synflow_rounds < 1:
            raise ConfigError(f"imp.synflow_rounds: must be at least 1, got {self.synflow_rounds}")
        if self.mask_shuffle not in MASK_SHUFFLES:
            raise ConfigError(f"imp.mask_shuffle: unknown shuffle {self.mask_shuffle!r}; choose one of "
                              f"{', '.join(MASK_SHUFFLES)}")
        if self.invert_scores and self.strategy == "random":
            raise ConfigError("imp.invert_scores: strategy 'random' has no scores to invert; choose one of "
                              f"{', '.join(s for s in IMP_STRATEGIES if s != 'random')}")
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad:
            raise ConfigError(f"imp.baselines: unknown baseline {bad[0]!r}; choose from {', '.join(BASELINES)}")
        if self.replicates < 1:
            raise ConfigError(f"imp.replicates: must be at least 1, got {self.replicates}")
        if not 0 <= self.conv_fraction < 1:
            raise ConfigError(f"imp.conv_fraction: must be in [0, 1), got {self.conv_fraction}")
        for layer, rate in self.rate_overrides:
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
                raise ConfigError(f"imp.rate_overrides: rate for {layer!r} must be a number in [0, 1) (the fraction "
                                  f"of that layer's surviving weights pruned per level), got {rate!r}")
        if self.mask0 not in MASK0_ACTIONS:
            raise ConfigError(f"imp.mask0: unknown action {self.mask0!r}; choose one of {', '.join(MASK0_ACTIONS)}")
        if self.mask1 not in MASK1_ACTIONS:
            raise ConfigError(f"imp.mask1: unknown action {self.mask1!r}; choose one of {', '.join(MASK1_ACTIONS)}")
        if self.criterion not in CRITERIA:
            raise ConfigError(f"imp.criterion: unknown criterion {self.criterion!r}; choose one of {', '.join(CRITERIA)}")
        if self.criterion != "large_final" and self.strategy not in ("global", "layerwise"):
            raise ConfigError(f"imp.criterion: {self.criterion!r} applies to strategies global and layerwise, not "
                              f"{self.strategy!r}")
        if self.rewind != "auto":
            Step.parse(self.rewind, "imp.rewind")
        return self


def imp_settings(table: Mapping[str, Any] | None = None, **overrides: Any) -> ImpSettings:
    """Settings from a TOML ``[imp]`` table plus keyword overrides (None = not given)."""
    return settings_from_table(ImpSettings, "imp", table, **overrides)


def check_method(cfg: Config) -> None:
    """IMP trains weights under masks: refuse the training methods that cannot (before anything is written)."""
    method = method_of(cfg)
    if not method.trains_weights:  # strong tickets: frozen weights, nothing to prune
        raise ConfigError(f"training.method: IMP prunes trained weights; {method.name!r} {method.trains}; run IMP "
                          "with training.method = standard")
    if not method.accepts_masks:  # refused before the dense trunk is trained, not at the first level
        raise ConfigError(f"training.method: {method.name} {method.trains} and cannot train IMP's masked levels; "
                          "run IMP with training.method = standard")


__all__ = ["BASELINES", "IMP_STRATEGIES", "RETRAINS", "ImpSettings", "check_method", "imp_settings"]
