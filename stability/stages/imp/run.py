"""Iterative magnitude pruning with rewinding: lottery tickets and their baselines.

Level 0 is the dense trunk. At each next level a fraction ``prune_fraction`` of
the surviving prunable weights is removed (by ``strategy``, from the previous
level's final weights), the survivors are rewound to their values at the rewind
step (from the dense trunk's checkpoint; optimizer state fresh, as in open_lth),
and the network is trained to the end. ``rewind = auto`` rewinds to the dense
network's first stable step, found by an instability sweep (the stabilized
lottery ticket hypothesis).

Baselines trained alongside each level, batched as extra members: ``reinit``
(the same mask, weights from a fresh initialization with another init seed,
trained over the same steps) and ``random`` (a random mask with the same
per-layer densities, the same rewound weights).

Each finished level is stored before the next starts, and a level in progress
saves a resumable state, so a killed run rerun with the same command resumes.
Results in ``results_root/imp_<hash>/``: ``levels.csv``, ``masks/`` (one
safetensors file per replicate and level) and ``imp.json``.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...config import STRONG_METHODS, Config, settings_from_table, settings_hash
from ...engine import Members, StackedModel, derive_seed
from ...errors import CheckpointError, ConfigError, RecordError, TrainingDiverged
from ...maths.flops import backward_macs, layer_costs, weight_gradient_saved
from ...maths.health import DEFAULT_CHANCE_MARGIN, chance_error, check_margin, is_untrained
from ...maths.metrics import lts_score, ticket_summary, trajectory_length, trajectory_length_gain
from ...maths.pruning import (
    CRITERIA,
    MASK0_ACTIONS,
    MASK1_ACTIONS,
    STRATEGIES,
    dense_masks,
    layer_densities,
    mask0_start,
    mask1_start,
    moving_away_held,
    prunable_names,
    prune,
    random_masks_like,
    updated_fraction,
)
from ...maths.pruning import density as mask_density
from ...models.build import output_layer_name
from ...steps import format_step, to_iterations
from ...store.files import (
    RunDir,
    load_tensors,
    quarantine,
    read_csv,
    read_json,
    save_tensors,
    write_csv,
    write_json,
)
from ...store.schema import (
    FINAL_STATE,
    IMP,
    IMP_SUMMARY,
    LATEST_STATE,
    LEVEL_COLUMNS,
    LEVEL_RECORD,
    LEVELS,
    MANIFEST,
    MASKS,
    METRICS,
    level_dir,
    mask_name,
)
from ..checkpoints import load_members
from ..context import Context, prepare
from ..instability import (
    INDEPENDENT_STEP,
    InstabilitySettings,
    checkpoint_points,
    instability_settings,
    instability_sweep,
    without_plain_alignment,
)
from ..siblings import train_branch
from ..training import early_stop
from ..trunk import train_trunk, trunk_checkpoint

BASELINES = ("reinit", "random")



@dataclass(frozen=True)
class ImpSettings:
    """The ``[imp]`` table: how tickets are searched for."""

    levels: int = 5
    prune_fraction: float = 0.2  # of the surviving weights, per level
    strategy: str = "global"  # global | layerwise | lamp | random
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

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> ImpSettings:
        check_margin(self.chance_margin, "imp.chance_margin")
        if self.levels < 1:
            raise ConfigError(f"imp.levels: must be at least 1, got {self.levels}")
        if not 0 < self.prune_fraction < 1:
            raise ConfigError(f"imp.prune_fraction: must be in (0, 1), got {self.prune_fraction}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"imp.strategy: unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
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
            from ...steps import Step

            Step.parse(self.rewind, "imp.rewind")
        return self


def check_method(cfg: Config) -> None:
    """IMP trains weights under masks: refuse the training methods that cannot (before anything is written)."""
    if cfg.training.method in STRONG_METHODS:  # strong tickets: frozen weights, nothing to prune
        raise ConfigError(f"training.method: IMP prunes trained weights; {cfg.training.method!r} trains scores over "
                          "frozen weights (its own masks); run IMP with training.method = standard")
    if cfg.training.method == "neq":  # refused before the dense trunk is trained, not at the first level
        raise ConfigError("training.method: neq trains dense networks and cannot train IMP's masked levels; run IMP "
                          "with training.method = standard")


def imp_settings(table: Mapping[str, Any] | None = None, **overrides: Any) -> ImpSettings:
    """Settings from a TOML ``[imp]`` table plus keyword overrides (None = not given)."""
    return settings_from_table(ImpSettings, "imp", table, **overrides)


@dataclass
class ImpResult:
    """An IMP run: one row per (replicate, level, kind) and the ticket summaries."""

    run_dir: Path
    rewind_step: int
    levels: list[dict[str, Any]] = field(repr=False)
    summary: dict[str, Any] = field(repr=False)

    def dataframe(self):
        """levels.csv as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.levels)


# ---------------------------------------------------------------- helpers
def _resolve_layer(name: str, ctx: Context) -> str:
    return output_layer_name(ctx.model) if name == "output" else name


def _prunable(ctx: Context, settings: ImpSettings) -> list[str]:
    return prunable_names(ctx.model, [_resolve_layer(n, ctx) for n in settings.exclude])


def _rate_overrides(ctx: Context, settings: ImpSettings, names: list[str]) -> dict[str, float] | None:
    if settings.strategy != "layerwise":
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


def resolve_rewind_step(ctx: Context, settings: ImpSettings) -> int:
    """A fixed rewind point (not ``auto``) as an iteration before the final step."""
    step = to_iterations(settings.rewind, ctx.ipe, "imp.rewind")
    if step >= ctx.total_steps:
        raise ConfigError(f"imp.rewind: step {settings.rewind!r} = iteration {step} is at or past the final step "
                          f"{ctx.total_steps}; rewind to an earlier step")
    return step


def resolve_rewind(cfg: Config, ctx: Context, settings: ImpSettings,
                   sweep: InstabilitySettings) -> tuple[int, dict[str, Any]]:
    """The rewind iteration, and how it was chosen."""
    if settings.rewind != "auto":
        return resolve_rewind_step(ctx, settings), {"rewind": settings.rewind}
    points = sweep.rewind_points or cfg.training.rewind_points
    if not checkpoint_points(points):
        raise ConfigError("imp.rewind: 'auto' needs rewind points to sweep ('independent' is not a rewind step); "
                          "set training.rewind_points or instability.rewind_points")
    result = instability_sweep(cfg, sweep, ctx=ctx)
    info = {"rewind": "auto", "sweep_dir": str(result.run_dir), "first_stable_step": result.first_stable_step,
            "swept": result.rewind_steps}
    if result.first_stable_step is None:
        # Never stable in the swept range: the latest swept point is the closest to stability we have.
        info["note"] = "not stable at any swept step; rewinding to the last swept step"
        return max(k for k in result.rewind_steps if k != INDEPENDENT_STEP), info
    return result.first_stable_step, info


def _trajectory(ctx: Context, state: Mapping[str, Tensor]) -> float:
    """Trajectory length of the network's logits on a circle through two fixed test inputs."""
    model = ctx.new_model()
    model.load_state_dict(dict(state))
    model.eval()
    x = ctx.data.x_test
    return trajectory_length(model, x[0], x[1], n_points=500)


def _single(members: Members, i: int) -> Members:
    return Members(members.step, {k: v[i : i + 1].clone() for k, v in members.params.items()},
                   {k: v[i : i + 1].clone() for k, v in members.buffers.items()}, [members.order_seeds[i]],
                   [members.aug_seeds[i]])


@dataclass(frozen=True)
class MaskSource:
    """The IMP run whose masks a transfer run trains: its directory, a digest of the masks, what it was."""

    run_dir: str
    digest: str
    files: dict[tuple[int, int], str] = field(repr=False)
    info: dict[str, Any] = field(repr=False)

    def masks(self, replicate: int, level: int, device: torch.device) -> dict[str, Tensor]:
        return load_tensors(self.files[(replicate, level)], device)[0]


def mask_source(settings: ImpSettings, names: list[str] | None = None,
                shapes: Mapping[str, Tensor] | None = None) -> MaskSource:
    """The masks ``imp.mask_from`` names: every (replicate, level) this run needs, or a ConfigError.

    With ``names`` and ``shapes`` (the model's prunable tensors and parameters) every mask is also checked
    to fit the model, as it is read for its digest."""
    from ...store.files import tensors_digest

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


# ---------------------------------------------------------------- the driver
def imp_key(cfg: Config, settings: ImpSettings, sweep: InstabilitySettings,
            source: MaskSource | None = None) -> dict[str, Any]:
    """The settings that name an IMP run (its hash is ``settings_hash`` of this, recorded in its manifest).

    ``source``: the masks of ``imp.mask_from`` when already read (else they are read here for their digest)."""
    # chance margins only classify results: they do not name the run
    imp = _without(asdict(settings), "chance_margin")
    # magnitude pruning and rewinding, as before these settings existed: the same names
    for field_name, default in (("criterion", "large_final"), ("mask1", "rewind"), ("supermask", False),
                                ("mask0", "zero"), ("mask_from", "")):
        if imp[field_name] == default:
            del imp[field_name]
    if settings.mask_from:  # named by the masks' contents, not by where they are
        imp["mask_from"] = (source or mask_source(settings)).digest
    key = {"trunk": cfg.run_hash(), "imp": imp}
    if settings.rewind == "auto" or settings.instability:
        key["instability"] = without_plain_alignment(sweep, ("chance_margin",))
    return key


def imp_dir(cfg: Config, settings: ImpSettings, sweep: InstabilitySettings, source: MaskSource | None = None) -> RunDir:
    """Where the IMP run of these settings lives."""
    return RunDir(cfg.runtime.results_root, IMP, settings_hash(imp_key(cfg, settings, sweep, source)))


def run_imp(cfg: Config, settings: ImpSettings = ImpSettings(),
            sweep_settings: InstabilitySettings | None = None) -> ImpResult:
    """Run (or resume, or reuse) iterative magnitude pruning with rewinding and baselines.

    ``sweep_settings`` are the instability settings used to find the first stable step
    (``rewind = auto``) and to measure sparse networks' instability (``instability = true``).
    """
    settings.validate()
    sweep = (sweep_settings or InstabilitySettings()).validate()
    check_method(cfg)
    ctx = prepare(cfg)
    # the transferred masks, each checked to fit this model, are read once: for the run's name and for training
    source = (mask_source(settings, _prunable(ctx, settings), dict(ctx.model.named_parameters()))
              if settings.mask_from else None)
    run = imp_dir(cfg, settings, sweep, source)
    if run.is_complete():
        with run.claim():
            try:
                result = _load_result(run)
                run.check_reuse(cfg.runtime.accept_other_versions)
                return result
            except (RecordError, FileNotFoundError, KeyError) as exc:
                print(f"warning: finished IMP run {run.path.name} lacks a readable imp.json or levels.csv ({exc}); "
                      "rebuilding them from the stored levels", file=sys.stderr)
    if settings.rewind != "auto":
        resolve_rewind(cfg, ctx, settings, sweep)  # check the step before anything is written
    _rate_overrides(ctx, settings, _prunable(ctx, settings))  # layer names, before anything is written
    t0 = time.perf_counter()
    rewind_step, rewind_info = resolve_rewind(cfg, ctx, settings, sweep)
    train_trunk(cfg, extra_checkpoints=[rewind_step], ctx=ctx)  # a diverged dense trunk stops here, before any record
    with run.claim():
        return _imp(cfg, ctx, settings, sweep, run, rewind_step, rewind_info, t0, source)


def _imp(cfg: Config, ctx: Context, settings: ImpSettings, sweep: InstabilitySettings, run: RunDir,
         rewind_step: int, rewind_info: dict[str, Any], t0: float, source: MaskSource | None = None) -> ImpResult:
    run.start({"training": cfg.to_dict(), "imp": asdict(settings), "instability": asdict(sweep)},
              imp_key(cfg, settings, sweep, source), {"rewind_step": rewind_step})
    rows: list[dict[str, Any]] = []
    for r in range(settings.replicates):
        try:
            rows.extend(_run_replicate(cfg, ctx, settings, sweep, run, r, rewind_step, source))
        except TrainingDiverged as exc:  # the dense trunk of replicate r: no reference, no IMP for it
            print(f"warning: the dense trunk of IMP replicate {r} diverged ({exc}); the replicate counts as "
                  "finding no ticket", file=sys.stderr)
            nan = float("nan")
            rows.append({"replicate": r, "level": 0, "kind": "imp", "density": 1.0, "rewind_step": rewind_step,
                         "final_test_accuracy": nan, "final_test_loss": nan, "early_stop_step": "",
                         "early_stop_test_accuracy": nan, "early_stop_val_loss": nan, "trajectory_length": nan,
                         "instability": "", "status": "diverged"})
        write_csv(run / LEVELS, rows, LEVEL_COLUMNS)
    # every row with every column, as levels.csv gives them back to a rerun ("" where a row has no value)
    rows = [{**dict.fromkeys(LEVEL_COLUMNS, ""), **row} for row in rows]
    summary = _summarize(rows, settings, rewind_step, rewind_info, cfg)
    summary["mask_source"] = source.info if source is not None else "own"
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    summary.update(_where(run))
    write_csv(run / LEVELS, rows, LEVEL_COLUMNS)
    write_json(run / IMP_SUMMARY, summary)
    run.update(status="complete")
    return ImpResult(run.path, rewind_step, rows, summary)


def _without(d: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != key}


def _where(run: RunDir) -> dict[str, str]:
    """Where an IMP run's records are (in its summary and ``imp --json``)."""
    return {"run_dir": str(run.path), "levels_csv": str(run / LEVELS), "masks_dir": str(run / MASKS)}


def _load_result(run: RunDir) -> ImpResult:
    summary = {**read_json(run / IMP_SUMMARY), **_where(run)}  # the run may have been moved since
    return ImpResult(run.path, summary["rewind_step"], read_csv(run / LEVELS), summary)


def _run_replicate(cfg: Config, ctx: Context, settings: ImpSettings, sweep: InstabilitySettings, run: RunDir,
                   r: int, rewind_step: int, source: MaskSource | None = None) -> list[dict[str, Any]]:
    """All levels of one replicate (init seed ``init_seed + r``); finished levels are read back."""
    rcfg = cfg.with_overrides({"training.init_seed": str(cfg.training.init_seed + r)})
    # The replicate's own template model: its trunk starts from init seed init_seed + r.
    rctx = Context(rcfg, ctx.device, ctx.data, ctx.new_model(seed=rcfg.training.init_seed), ctx.ipe, ctx.total_steps)
    trunk = train_trunk(rcfg, extra_checkpoints=[rewind_step], ctx=rctx)
    rewind = trunk_checkpoint(rctx, rewind_step)
    dense_final = trunk_checkpoint(rctx, ctx.total_steps)
    chance = chance_error(ctx.data.split("test")[1])
    names = _prunable(rctx, settings)
    rates = _rate_overrides(rctx, settings, names)
    dense_state = dense_final.member_state_dict(0)
    rewind_state = rewind.member_state_dict(0)  # w_i of the mask criteria
    mask1_fresh = (rctx.new_model(seed=derive_seed(rcfg.training.init_seed, "mask1-reinit", r)).state_dict()
                   if settings.mask1 == "reinit" else None)
    rows: list[dict[str, Any]] = []
    costs = layer_costs(rctx.model, ctx.data.input_shape)
    design = {"criterion": settings.criterion if source is None else "",  # how this run's tickets are made
              "mask1": settings.mask1, "mask0": settings.mask0,
              "mask_source": "own" if source is None else Path(source.run_dir).name}
    freeze = settings.mask0 != "zero"

    # Level 0: the dense trunk itself.
    level0 = {"replicate": r, "level": 0, "kind": "imp", "density": 1.0, "rewind_step": rewind_step,
              **early_stop(trunk.metrics, 0), "trajectory_length": _trajectory(rctx, dense_state), "instability": "",
              "updated_fraction": 1.0, "backward_flops_saved": 0.0}
    level0["status"] = _status(level0, chance, settings.chance_margin)
    masks = dense_masks(dense_state, names)
    if settings.instability:
        level0["instability"] = _sparse_instability(rcfg, rctx, sweep, rewind, None, rewind_step, f"r{r}-dense")
    rows.append(level0)

    previous_final = dense_state
    held = None  # freeze_if_moving_away: the removed weights held so far (each judged when it was removed)
    carry = settings.mask0 == "freeze_if_moving_away"
    for level in range(1, settings.levels + 1):
        chooser = dense_state if settings.one_shot else previous_final  # the weights this level's mask is chosen from
        ldir = RunDir(run.path / level_dir(r), "level", str(level))
        record_path = ldir / LEVEL_RECORD
        mask_path = run / mask_name(r, level)
        if record_path.is_file():
            # Finished before a restart: read it back instead of redoing it (a damaged record is redone).
            try:
                record = read_json(record_path)
                if any(row.get("status") == "diverged" for row in record["rows"]):
                    rows.extend(record["rows"])
                    break  # this replicate stopped at a diverged level
                # everything is read before anything is kept: a level that cannot be read back whole
                # is redone from the previous level's mask and weights, not from half of its own
                level_masks, _ = load_tensors(mask_path, ctx.device)
                level_final = load_members(ldir / FINAL_STATE, rctx).member_state_dict(0)
                level_rows = [{**row, "status": row.get("status") or _status(row, chance, settings.chance_margin)}
                              for row in record["rows"]]  # records written before statuses existed
                if carry:
                    held = moving_away_held(held, masks, level_masks, initial=rewind_state, final=chooser)
                masks, previous_final = level_masks, level_final
                rows.extend(level_rows)
                continue
            except (RecordError, CheckpointError, KeyError, TypeError) as exc:
                print(f"warning: level {level} of replicate {r} in {run.path.name} cannot be read back ({exc}); "
                      "training it again", file=sys.stderr)
                _forget_level(ldir, record_path, mask_path)
        gen = torch.Generator().manual_seed(derive_seed(settings.pruning_seed, "prune", r, level))
        previous_masks = masks
        if source is not None:  # checked to fit the model when the source was read
            masks = source.masks(r, level, ctx.device)
        elif settings.one_shot:
            fraction = 1 - (1 - settings.prune_fraction) ** level
            masks = prune(dense_state, dense_masks(dense_state, names), fraction, settings.strategy,
                          rate_overrides=_scaled_rates(rates, level), generator=gen, criterion=settings.criterion,
                          initial=rewind_state)
        else:
            masks = prune(previous_final, masks, settings.prune_fraction, settings.strategy,
                          rate_overrides=rates, generator=gen, criterion=settings.criterion, initial=rewind_state)
        save_tensors(mask_path, masks, {"replicate": r, "level": level, "density": mask_density(masks)})
        if carry:
            held = moving_away_held(held, previous_masks, masks, initial=rewind_state, final=chooser)
        kinds = ["imp", *settings.baselines]
        member_masks = {"imp": masks}
        starts = {"imp": mask1_start(settings.mask1, rewind.member_state_dict(0), masks, fresh=mask1_fresh,
                                     generator=torch.Generator().manual_seed(
                                         derive_seed(settings.pruning_seed, "mask1", r, level)))}
        if "random" in settings.baselines:
            member_masks["random"] = random_masks_like(masks, torch.Generator().manual_seed(
                derive_seed(settings.pruning_seed, "random-baseline", r, level)))
            starts["random"] = rewind.member_state_dict(0)
        if "reinit" in settings.baselines:
            member_masks["reinit"] = masks
            starts["reinit"] = rctx.new_model(seed=derive_seed(rcfg.training.init_seed, "reinit", r)).state_dict()
        if freeze:  # the removed weights of every kind keep their start values (or zero, where not moving away)
            # The ticket carries each weight's decision from the level that removed it; the baselines' masks
            # are drawn afresh at every level, so their removed weights are judged by this level's weights.
            starts = {k: mask0_start(settings.mask0, s, member_masks[k], initial=rewind_state, final=chooser,
                                     held=held if k == "imp" else None)
                      for k, s in starts.items()}
        stacked_masks = {n: torch.stack([member_masks[k][n] for k in kinds]).to(ctx.device) for n in names}
        start = Members.from_model_states([starts[k] for k in kinds], list(rewind.params), rewind_step,
                                          rewind.order_seeds * len(kinds), rewind.aug_seeds * len(kinds), ctx.device)
        rewound_imp = _single(start, 0)  # kept apart: training advances ``start`` in place
        supermask = _untrained_accuracy(rctx, rewound_imp, None if freeze else masks) if settings.supermask else None
        ldir.path.mkdir(parents=True, exist_ok=True)
        eval_every = to_iterations(cfg.training.eval_every, ctx.ipe)
        try:
            members = train_branch(rctx, ldir, start, ctx.total_steps, masks=stacked_masks, freeze=freeze,
                                   desc=f"imp r{r} level {level}", eval_every=eval_every)
        except TrainingDiverged as exc:
            print(f"warning: IMP replicate {r} level {level} diverged ({exc}); no later level of this replicate "
                  "is trained", file=sys.stderr)
            nan = float("nan")
            level_rows = [{"replicate": r, "level": level, "kind": kind, "density": mask_density(member_masks[kind]),
                           "rewind_step": rewind_step, "final_test_accuracy": nan, "final_test_loss": nan,
                           "early_stop_step": "", "early_stop_test_accuracy": nan, "early_stop_val_loss": nan,
                           "trajectory_length": nan, "instability": "", "status": "diverged"} for kind in kinds]
            write_json(record_path, {"rows": level_rows, "diverged": exc.info()})
            rows.extend(level_rows)
            break
        metrics = read_csv(ldir / METRICS)
        level_rows = []
        for i, kind in enumerate(kinds):
            kind_masks = member_masks[kind]
            row = {"replicate": r, "level": level, "kind": kind, "density": mask_density(kind_masks),
                   "rewind_step": rewind_step, **early_stop(metrics, i),
                   "trajectory_length": _trajectory(rctx, members.member_state_dict(i)), "instability": "",
                   **design, "updated_fraction": updated_fraction(kind_masks, rewind.params),
                   "backward_flops_saved": weight_gradient_saved(costs, kind_masks) / backward_macs(costs)}
            if supermask is not None and kind == "imp":
                row["supermask_test_accuracy"] = supermask
            if settings.instability and kind == "imp":
                row["instability"] = _sparse_instability(rcfg, rctx, sweep, rewound_imp, masks, rewind_step,
                                                         f"r{r}-level{level}-{ldir.hash}", freeze)
            row["status"] = _status(row, chance, settings.chance_margin)
            level_rows.append(row)
        write_json(record_path, {"rows": level_rows, "layer_densities": layer_densities(masks)})
        rows.extend(level_rows)
        previous_final = members.member_state_dict(0)
    return rows


def _status(row: Mapping[str, Any], chance: float, margin: float) -> str:
    """ok, or untrained when the final test error is within ``margin`` of chance."""
    return "untrained" if is_untrained(1 - row["final_test_accuracy"], chance, margin) else "ok"


def _forget_level(ldir: RunDir, record_path: Path, mask_path: Path) -> None:
    """Move a level's unreadable records aside so it is trained again from its start (no resumable state kept)."""
    for path in (record_path, mask_path, ldir / FINAL_STATE, ldir / LATEST_STATE, ldir / METRICS):
        if path.is_file():
            quarantine(path, f"level record {str(path)!r} belongs to a level that is redone")


def _scaled_rates(rates: dict[str, float] | None, level: int) -> dict[str, float] | None:
    """Per-layer one-shot rates after ``level`` rounds at each layer's own rate."""
    if not rates:
        return None
    return {k: 1 - (1 - v) ** level for k, v in rates.items()}


def _untrained_accuracy(ctx: Context, start: Members, masks: Mapping[str, Tensor] | None) -> float:
    """Test accuracy of the ticket's start state under its mask, before any training (a supermask's).

    ``masks`` None: the start state as it is (frozen removed weights: the network that is trained)."""
    sm = StackedModel(ctx.model)
    params = {k: v * masks[k].to(v) if masks and k in masks else v for k, v in start.params.items()}
    x, y = ctx.data.split("test")
    _, err = sm.evaluate(params, start.buffers, x, y, ctx.cfg.runtime.eval_batch_size)
    return 1.0 - float(err[0])


def _sparse_instability(cfg: Config, ctx: Context, sweep: InstabilitySettings, start: Members,
                        masks: Mapping[str, Tensor] | None, step: int, label: str, freeze: bool = False) -> float:
    """Mean test-error barrier of siblings of the (sparse) network rewound to ``step``."""
    settings = InstabilitySettings(**{**asdict(sweep), "rewind_points": (format_step(step),), "splits": ("test",)})
    if masks is None:
        result = instability_sweep(cfg, settings, ctx=ctx)
    else:
        result = instability_sweep(cfg, settings, ctx=ctx, masks=masks, start_states={step: start}, label=label,
                                   freeze=freeze)
    return result.table[0]["instability_mean"]


def _tickets(frame, accuracy: str) -> dict[str, Any]:
    """``ticket_summary`` over the replicates whose dense network is a result (trained, finite).

    A replicate whose dense network diverged or never learned has no reference to match: it finds
    no winning ticket (it counts in the success rate's denominator) and is listed as excluded.
    """
    replicates = sorted(set(frame["replicate"]))
    dense = frame[(frame["kind"] == "imp") & (frame["level"] == 0)]
    usable = sorted(set(dense.loc[dense[accuracy].notna(), "replicate"]))
    excluded = [r for r in replicates if r not in usable]
    if not usable:
        return {"accuracy_column": accuracy, "n_replicates": len(replicates), "dense_accuracy": float("nan"),
                "tolerance": float("nan"), "success_rate": 0.0, "replicates": [], "excluded_replicates": excluded,
                "aggregate": {"matching_levels": [], "best_sparse": None, "sparsest_matching": None},
                "baselines": {}, "note": "no dense network is a result (diverged or untrained): nothing can match"}
    tickets = ticket_summary(frame[frame["replicate"].isin(usable)], accuracy=accuracy)
    if excluded:
        tickets["success_rate"] = tickets["success_rate"] * len(usable) / len(replicates)
        for key in ("best_sparse", "sparsest_matching"):
            point = tickets["aggregate"].get(key)
            if point is not None:
                point["lts_score"] = lts_score(point["a_gain"], tickets["success_rate"])
        tickets["n_replicates"] = len(replicates)
    tickets["excluded_replicates"] = excluded
    return tickets


def _summarize(rows: list[dict[str, Any]], settings: ImpSettings, rewind_step: int, rewind_info: dict[str, Any],
               cfg: Config) -> dict[str, Any]:
    import pandas as pd

    frame = pd.DataFrame(rows).rename(columns={"final_test_accuracy": "test_accuracy"})
    # Diverged and untrained networks are not results: no accuracy, so never matching and never best.
    bad = frame["status"] != "ok" if "status" in frame else pd.Series(False, index=frame.index)
    frame.loc[bad, ["test_accuracy", "early_stop_test_accuracy"]] = float("nan")
    flagged = [{"replicate": row["replicate"], "level": row["level"], "kind": row["kind"], "status": row["status"]}
               for row in rows if row.get("status", "ok") != "ok"]
    summary: dict[str, Any] = {"settings": asdict(settings), "rewind_step": rewind_step, "rewind": rewind_info,
                               "flagged": flagged,
                               "config": cfg.to_dict(), "target_density": (1 - settings.prune_fraction) ** settings.levels}
    if settings.supermask:
        summary["supermask"] = [{k: row[k] for k in ("replicate", "level", "density", "supermask_test_accuracy")}
                                for row in rows if row.get("supermask_test_accuracy", "") != ""]
    summary["tickets"] = _tickets(frame, "test_accuracy")
    summary["tickets_early_stop"] = _tickets(frame, "early_stop_test_accuracy")
    # Trajectory-length gains of Best Sparse and Sparsest Matching (aggregate), against the dense network.
    imp = frame[frame["kind"] == "imp"]
    tl = imp.groupby("level")["trajectory_length"].mean()
    gains = {}
    for key in ("best_sparse", "sparsest_matching"):
        point = summary["tickets"]["aggregate"].get(key)
        if point is not None and not math.isnan(tl.get(0, float("nan"))):
            gains[key] = {"level": point["level"], "trajectory_length": float(tl[point["level"]]),
                          "tl_gain": trajectory_length_gain(float(tl[point["level"]]), float(tl[0]))}
    summary["trajectory_length"] = {"dense": float(tl.get(0, float("nan"))), **gains}
    return summary


__all__ = ["BASELINES", "ImpResult", "ImpSettings", "imp_settings", "instability_settings", "resolve_rewind", "run_imp"]
