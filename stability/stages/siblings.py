"""Siblings: copies of a trunk checkpoint trained to the end under different SGD noise.

All siblings of one rewind point train together, batched over the sibling axis
(see ``engine``). Each sibling's noise seeds are derived from the trunk's noise
seed, the sibling set's seed and the sibling index, and recorded.

Optimizer state at the rewind step defaults to ``fresh`` (a new optimizer; the
learning-rate schedule resumes at step k), as in open_lth, whose rewinding
restores weights only; ``restore`` copies momentum / Adam moments from the
trunk's checkpoint.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from ..config import Config, settings_hash
from ..engine import Members, derive_seed
from ..errors import CheckpointError, ConfigError
from ..steps import format_step
from ..store.files import RunDir, quarantine, short_digest
from ..store.schema import FINAL_STATE, SIBLINGS, TRAIN
from .base import Need, mask_digest, member_tensors, run_once, settings_key
from .checkpoints import load_members, save_state
from .context import Context
from .training import read_metrics, resumable_train
from .trunk import trunk_checkpoint, trunk_dir

NOISE_KINDS = ("both", "data_order", "augmentation")
OPTIMIZER_STATES = ("fresh", "restore")


@dataclass(frozen=True)
class SiblingSettings:
    """How siblings are made from a checkpoint."""

    siblings: int = 2
    noise: str = "both"  # both | data_order | augmentation
    optimizer_state: str = "fresh"  # fresh | restore
    sibling_seed: int = 0  # a different value gives a different set of siblings

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> SiblingSettings:
        if self.siblings < 2:
            raise ConfigError(f"instability.siblings: need at least 2 siblings to compare, got {self.siblings}")
        if self.noise not in NOISE_KINDS:
            raise ConfigError(f"instability.noise: unknown noise kind {self.noise!r}; choose one of {', '.join(NOISE_KINDS)}")
        if self.optimizer_state not in OPTIMIZER_STATES:
            raise ConfigError(f"instability.optimizer_state: unknown value {self.optimizer_state!r}; "
                              f"choose one of {', '.join(OPTIMIZER_STATES)}")
        return self


def sibling_seeds(noise_seed: int, settings: SiblingSettings) -> tuple[list[int], list[int]]:
    """Per-sibling (order, augmentation) seeds; the kind of noise that is not varied is shared."""
    def seed(i: int | str, stream: str) -> int:
        return derive_seed(noise_seed, "sibling", settings.sibling_seed, i, stream)

    n = settings.siblings
    vary_order = settings.noise in ("both", "data_order")
    vary_aug = settings.noise in ("both", "augmentation")
    order = [seed(i if vary_order else "shared", "order") for i in range(n)]
    aug = [seed(i if vary_aug else "shared", "augment") for i in range(n)]
    return order, aug


@dataclass
class SiblingsResult:
    """Final weights of N siblings trained from step ``rewind_step`` to the end."""

    run_dir: Path
    rewind_step: int
    final_step: int
    members: Members
    order_seeds: list[int]
    aug_seeds: list[int]
    reused: bool


def start_members(ctx: Context, source: Members, n: int, order: Sequence[int], aug: Sequence[int],
                  optimizer_state: str) -> Members:
    """N copies of a single saved member, with their own noise streams."""
    if source.n != 1:
        raise ConfigError("siblings start from a single-member checkpoint")
    params = {k: v.expand(n, *v.shape[1:]).clone() for k, v in source.params.items()}
    buffers = {k: v.expand(n, *v.shape[1:]).clone() for k, v in source.buffers.items()}
    opt = None
    if optimizer_state == "restore" and source.optimizer_state:
        opt = {"state": {i: {key: (val.expand(n, *val.shape[1:]).clone() if val.dim() > 0 else val.clone())
                             for key, val in st.items()} for i, st in source.optimizer_state["state"].items()}}
    return Members(source.step, params, buffers, list(order), list(aug), optimizer_state=opt)


def train_branch(ctx: Context, run: RunDir, start: Members, end_step: int, *,
                 masks: Mapping[str, Tensor] | None = None, freeze: bool = False, desc: str = "branch",
                 eval_every: int = 0) -> Members:
    """Train members from their step to ``end_step`` in ``run`` (resumable); writes ``run/final.safetensors``.

    A damaged ``final.safetensors`` is moved aside and the branch trained again from its newest intact
    state. With ``eval_every`` > 0, every member is evaluated at the start, every ``eval_every`` steps
    and at the end into ``run/metrics.csv``. Divergence marks ``run`` diverged (TrainingDiverged).
    """
    final = run / FINAL_STATE
    if final.is_file():
        try:
            members = load_members(final, ctx)
            if not eval_every or read_metrics(run) is not None:
                return members
        except CheckpointError as exc:
            quarantine(final, str(exc))
    members = resumable_train(ctx, run, start, end_step, masks=masks, freeze=freeze, eval_every=eval_every, desc=desc)
    save_state(final, members)
    return members


def siblings_key(cfg: Config, rewind_step: int, settings: SiblingSettings, *,
                 masks: Mapping[str, Tensor] | None = None, noise_seeds: Sequence[tuple[int, int]] | None = None,
                 start: Members | None = None, label: str | None = None, freeze: bool = False) -> dict[str, Any]:
    """The settings that name a sibling set (its run hash is ``settings_hash`` of this)."""
    if noise_seeds is not None:
        if len(noise_seeds) < 2:
            raise ConfigError(f"instability.siblings: need at least 2 siblings to compare, got {len(noise_seeds)}")
        order, aug = [s[0] for s in noise_seeds], [s[1] for s in noise_seeds]
    else:
        order, aug = sibling_seeds(cfg.training.noise_seed, settings)
    # the count, noise kind and seed are named by the seeds they give
    key = {"trunk": cfg.run_hash(), "rewind_step": rewind_step, "order_seeds": order, "aug_seeds": aug,
           **settings_key(settings, drop=("siblings", "noise", "sibling_seed"), legacy=SIBLINGS),
           "masks": mask_digest(masks), "start": label}
    if freeze:  # removed weights frozen rather than pruned (named only then: older sets keep their hash)
        key["mask0"] = "freeze"
    if start is not None:  # named by the start state's contents, not only by its label
        key["start_state"] = short_digest(member_tensors(start))
    return key


def siblings_dir(cfg: Config, rewind_step: int, settings: SiblingSettings = SiblingSettings()) -> RunDir:
    """Where the (dense) siblings of ``rewind_step`` live."""
    return RunDir(cfg.runtime.results_root, SIBLINGS, settings_hash(siblings_key(cfg, rewind_step, settings)))


def train_siblings(ctx: Context, rewind_step: int, settings: SiblingSettings = SiblingSettings(), *,
                   masks: Mapping[str, Tensor] | None = None, noise_seeds: Sequence[tuple[int, int]] | None = None,
                   start: Members | None = None, label: str | None = None, freeze: bool = False) -> SiblingsResult:
    """Train N siblings from the trunk's checkpoint at ``rewind_step`` (or from ``start``) to the final step.

    ``noise_seeds`` overrides the derived (order, augmentation) seed pairs. ``masks`` keeps pruned
    weights at zero, or with ``freeze`` at their values in the start state. The siblings are a run of their
    own in the store, reused when complete.
    """
    settings.validate()
    cfg = ctx.cfg
    if not 0 <= rewind_step < ctx.total_steps:
        raise ConfigError(f"instability.rewind_points: step {rewind_step} is not before the final step {ctx.total_steps}")
    key = siblings_key(cfg, rewind_step, settings, masks=masks, noise_seeds=noise_seeds, start=start, label=label,
                       freeze=freeze)
    order, aug = key["order_seeds"], key["aug_seeds"]

    def result(run: RunDir, members: Members, reused: bool) -> SiblingsResult:
        return SiblingsResult(run.path, rewind_step, ctx.total_steps, members, order, aug, reused)

    def load(run: RunDir) -> SiblingsResult | None:
        final = run / FINAL_STATE
        if not final.is_file():
            return None
        try:
            return result(run, load_members(final, ctx), True)
        except CheckpointError as exc:
            quarantine(final, str(exc))
            return None

    def begin(run: RunDir) -> Members:
        source = start if start is not None else trunk_checkpoint(ctx, rewind_step)
        members0 = start_members(ctx, source, len(order), order, aug, settings.optimizer_state)
        run.start({"training": cfg.to_dict(), "siblings": asdict(settings)}, key,
                  {"rewind_step": rewind_step, "final_step": ctx.total_steps, "trunk": str(trunk_dir(cfg).path)})
        return members0

    def compute(run: RunDir, members0: Members) -> SiblingsResult:
        members = train_branch(ctx, run, members0, ctx.total_steps, masks=masks, freeze=freeze,
                               desc=f"siblings @{format_step(rewind_step)}")
        return result(run, members, False)

    run = RunDir(cfg.runtime.results_root, SIBLINGS, settings_hash(key))
    return run_once(run, load=load, start=begin, compute=compute,
                    accept_other_versions=cfg.runtime.accept_other_versions, timed=True)


def siblings_info(result: SiblingsResult) -> dict[str, Any]:
    """JSON-able description of a sibling set."""
    return {"run_dir": str(result.run_dir), "rewind_step": result.rewind_step, "final_step": result.final_step,
            "order_seeds": result.order_seeds, "aug_seeds": result.aug_seeds, "reused": result.reused}


class SiblingsStage:
    """Sibling sets as a stage. args: ``rewind_step``, and for sparse networks ``masks``, ``start``, ``label``,
    ``freeze`` (see ``train_siblings``)."""

    name = SIBLINGS
    settings = SiblingSettings

    def key(self, ctx: Context, settings: SiblingSettings, *, rewind_step: int, **sparse: Any) -> dict[str, Any]:
        return siblings_key(ctx.cfg, rewind_step, settings, **sparse)

    def needs(self, ctx: Context, settings: SiblingSettings, *, rewind_step: int, start: Members | None = None,
              **sparse: Any) -> list[Need]:
        """The trunk with a checkpoint at the rewind step (nothing when the start state is given)."""
        return [] if start is not None else [Need(TRAIN, ctx.cfg, None, {"extra_checkpoints": [rewind_step]})]

    def run(self, ctx: Context, settings: SiblingSettings, *, rewind_step: int, **sparse: Any) -> SiblingsResult:
        return train_siblings(ctx, rewind_step, settings, **sparse)


SIBLINGS_STAGE = SiblingsStage()
