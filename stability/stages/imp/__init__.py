"""Iterative magnitude pruning with rewinding: lottery tickets and their baselines.

Level 0 is the dense trunk. At each next level a fraction ``prune_fraction`` of
the surviving prunable weights is removed (by ``strategy``, from the previous
level's final weights), the survivors are rewound to their values at the rewind
step (from the dense trunk's checkpoint; optimizer state fresh, as in open_lth),
and the network is trained to the end. ``rewind = auto`` rewinds to the dense
network's first stable step, found by an instability sweep (the stabilized
lottery ticket hypothesis).

``retrain`` (Renda et al. 2020): ``rewind`` (above), ``lr_rewind`` (the previous level's final weights,
the schedule replayed from the rewind step) or ``finetune`` (those weights at the schedule's final
learning rate), each for T - k steps. Strategies ``snip``, ``grasp`` and ``synflow`` prune at the rewind
point instead (one-shot to each level's density; ``maths.saliency``). The sanity checks of Frankle et
al. 2021: ``mask_shuffle = layer`` and ``invert_scores``.

Baselines trained alongside each level, batched as extra members: ``reinit``
(the same mask, weights from a fresh initialization with another init seed,
trained over the same steps) and ``random`` (a random mask with the same
per-layer densities, the same start weights as the ticket). ``random`` is each
level's own mask shuffled within each layer (``saliency.shuffle_within_layers``
draws the very same mask): Frankle et al. 2021's layer shuffle, per level and
for any strategy, where ``mask_shuffle = layer`` keeps the shuffled mask in the
lineage, so that iterative pruning prunes the next level from the shuffled
network and the loss compounds. (With ``mask1`` other than ``rewind`` the random
member still starts from the rewind weights, not from the ticket's mask-1 start.)

Each finished level is stored before the next starts, and a level in progress
saves a resumable state, so a killed run rerun with the same command resumes.
Results in ``results_root/imp_<hash>/``: ``levels.csv``, ``masks/`` (one
safetensors file per replicate and level) and ``imp.json``.

The steps, one module each: ``settings`` (the ``[imp]`` table), ``naming`` (the run's name),
``masks`` (choosing masks and the members' starts), ``levels`` (the driver: the loop over levels,
resuming finished ones), ``rows`` (the rows of ``levels.csv``) and ``summary`` (``imp.json``).
"""
from __future__ import annotations

from .levels import IMP_STAGE, resolve_rewind_step, run_imp
from .masks import MaskSource, mask_source
from .naming import imp_dir, imp_key
from .settings import BASELINES, IMP_STRATEGIES, RETRAINS, ImpSettings, check_method, imp_settings
from .summary import ImpResult

__all__ = ["BASELINES", "IMP_STAGE", "IMP_STRATEGIES", "RETRAINS", "ImpResult", "ImpSettings", "MaskSource", "check_method", "imp_dir", "imp_key",
           "imp_settings", "mask_source", "resolve_rewind_step", "run_imp"]
