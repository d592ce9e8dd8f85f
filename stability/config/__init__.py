"""Typed settings for a training run, read from TOML, presets and ``--set`` overrides.

A run is named by a hash of the settings that change its result. Fields left at
their defaults stay out of the hash (as in open_lth), so adding a setting later
keeps old results addressable; settings that do not change results (paths,
device, threads, checkpoint cadence) are never hashed.

Values are converted to their declared types by ``convert.coerce_field``. ``validate`` checks the
settings every run reads; the training method's name and the sections only one method reads
(``[strong]``, ``[neq]``) are checked by ``stability.methods.validate_run``, which the methods own.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..steps import Step
from .convert import coerce_field
from .nested import build, flat_paths, owner

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "step", "cosine", "linear")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
STREAM = ("auto", "on", "off")
CHANNELS_LAST = ("auto", "on", "off")
# Tables of a TOML config besides the run's SECTIONS: the later stages' settings.
STAGE_TABLES = ("instability", "imp", "hessian")
# Plain keys allowed at the top of a TOML config.
TOP_LEVEL_KEYS = ("preset", "description")


@dataclass(frozen=True)
class DatasetConfig:
    """Which data, how it is split and normalized; ``data_root``/``download`` do not change results."""

    name: str = "mnist5k"
    val_size: int = 500  # examples held out of the training split for early stopping
    split_seed: int = 0  # seeds the stratified split of packaged datasets and the validation slice
    augment: bool = True  # only datasets with augmentation (CIFAR) use it
    data_root: str = ""
    download: bool = False
    # Read the training data from disk through a DataLoader instead of holding it as tensors: "auto" streams
    # what cannot be held (imagenet, a registered Dataset over MAX_REGISTERED_BYTES), "on" streams any dataset
    # given as a torch Dataset, "off" never streams. The batches are the same either way, so it names no run.
    stream: str = "auto"
    # DataLoader worker processes of a streamed dataset (results do not depend on it); -1: the cores left over by
    # training's threads (none on a 2-core machine training at 2 threads, where workers would compete with it)
    workers: int = -1

    UNHASHED = ("data_root", "download", "stream", "workers")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture, width multiplier and initialization scheme."""

    name: str = "lenet_300_100"
    width: float = 1.0
    depth: int = 20  # resnet only: 8, 14, 20, 32, 56
    hidden: tuple[int, ...] = ()  # mlp only: hidden widths (empty = (100, 100))
    init: str = "default"  # default | kaiming_normal | glorot_normal
    bn_init: str = "ones"  # BatchNorm weights: ones | uniform (in [0, 1), as open_lth's ResNets and VGGs)
    stem: str = "default"  # torchvision/* models: default | cifar (3x3 stride-1 first conv, no max-pool)
    dropout: float = 0.0  # rate after each hidden fully connected layer (mlp, lenet_300_100, lenet5, conv2/4/6)

    UNHASHED = ()


@dataclass(frozen=True)
class OptimizerConfig:
    """SGD (momentum, Nesterov, weight decay) or Adam."""

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    UNHASHED = ()


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule: constant, step decay at milestones, cosine, or linear decay; optional linear warmup."""

    kind: str = "constant"
    milestones: tuple[str, ...] = ()  # steps at which lr is multiplied by gamma (kind = step)
    gamma: float = 0.1
    warmup: str = "0it"  # linear warmup from 0 to lr over this many steps
    final_lr: float = 0.0  # kind = linear: the learning rate reached at the final step (lr decays linearly to it)

    UNHASHED = ()


@dataclass(frozen=True)
class TrainingConfig:
    """Length of training, batch size, seeds, rewind points and evaluation cadence."""

    steps: str = "1000it"  # final step T
    batch_size: int = 60
    init_seed: int = 0
    noise_seed: int = 0  # data order and augmentation
    rewind_points: tuple[str, ...] = ()  # checkpoints kept besides step 0 and T
    eval_every: str = "100it"
    checkpoint_every: str = "200it"  # resumable state cadence; does not change results
    # how the run trains, a name in ``stability.methods.METHODS`` (names the run only when not standard)
    method: str = "standard"

    # rewind points are produced on demand by exact resume, so they do not name the run
    UNHASHED = ("rewind_points", "checkpoint_every")


# ---- strong lottery tickets (training.method = edgepopup | supermask; checked by stability.methods.strong) ----
@dataclass(frozen=True)
class StrongConfig:
    """Strong lottery tickets over frozen weights: edge-popup's fraction kept, the inits, supermask evaluation.

    Only read when ``training.method`` is ``edgepopup`` or ``supermask``; a non-default value with another
    method is refused (so these settings name a run only together with the method they belong to).
    """

    kept: float = 0.5  # edgepopup: fraction of each layer's weights kept, in (0, 1]
    weight_init: str = "signed_constant"  # signed_constant | kaiming_normal | default (the model's own)
    score_init: str = "kaiming_uniform"  # kaiming_uniform (edge-popup's code) | kaiming_normal
    eval_mask: str = "expected"  # supermask: expected (sigmoid(score) > 0.5) | sample (a fixed seeded draw)

    UNHASHED = ()


# ---- NEq: neurons at equilibrium skip their updates (training.method = neq; checked by stability.methods.neq) ----
@dataclass(frozen=True)
class NeqConfig:
    """NEq (Bragagnolo et al. 2022): which neurons skip their updates, checked at every NEq evaluation.

    Only read when ``training.method`` is ``neq``; a non-default value with another method is refused
    (so these settings name a run only together with NEq).
    """

    eps: float = 1e-3  # a neuron is at equilibrium when |velocity| < eps
    mu: float = 0.5  # mu_eq, the velocity's momentum, in [0, 1)
    velocity: str = "reference"  # reference (EIDOSLAB/NEq's code) | paper (v_t = dphi_t - mu v_{t-1})
    examples: int = 500  # validation examples whose outputs are compared (at most the validation split)
    seed: int = 0  # picks those examples, and the random baselines' neurons
    every: str = ""  # NEq evaluation cadence; empty = training.eval_every
    baseline: str = "none"  # none (NEq) | random (random_fraction of each layer) | matched (NEq's count, at random)
    random_fraction: float = 0.0  # baseline random: fraction of each layer's neurons frozen, in (0, 1]

    UNHASHED = ()


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how to run; nothing here changes results except ``precision`` and ``eval_precision``."""

    device: str = "auto"
    threads: int = 0  # 0 = as many as there are cores (at most 8)
    results_root: str = "results/runs"
    quiet: bool = False
    eval_batch_size: int = 1000
    accept_other_versions: bool = True  # reuse finished results made by another version or commit (with a note)
    plugins: tuple[str, ...] = ()  # modules imported before a run: they register models and datasets
    # Arithmetic of training's forward and backward passes (weights and optimizer state stay fp32); it changes
    # results, so a run is named by it when it is not fp32. ``eval_precision``: the same for evaluation.
    precision: str = "fp32"
    eval_precision: str = "fp32"
    compile: bool = False  # torch.compile the lockstep step and stacked evaluation (results equal to float tolerance)
    channels_last: str = "auto"  # conv models' memory layout: auto (where it helps), on, off
    # Where finished runs are also sent (stability.trackers): "tensorboard", "wandb", "mlflow", each optionally
    # "NAME:TARGET" (a log root, a W&B project, an MLflow tracking URI). Never names a run.
    trackers: tuple[str, ...] = ()
    # Train data-parallel across the processes of a launcher (torchrun, or Slurm through the grid): the global
    # batch is split across ranks, the data order is the same whatever the world size, and rank 0 writes the
    # run store. Equal to a one-process run to float tolerance, so it names no run.
    distributed: bool = False
    # The tracker group of the run (a W&B group, an MLflow experiment, a TensorBoard subfolder); a grid sets its name.
    tracker_group: str = ""

    UNHASHED = ("device", "threads", "results_root", "quiet", "eval_batch_size", "accept_other_versions", "plugins",
                "compile", "channels_last", "trackers", "tracker_group", "distributed")


SECTIONS: dict[str, type] = {
    "dataset": DatasetConfig,
    "model": ModelConfig,
    "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig,
    "training": TrainingConfig,
    "runtime": RuntimeConfig,
    "strong": StrongConfig,
    "neq": NeqConfig,
}


@dataclass(frozen=True)
class Config:
    """Every setting of a training run, one dataclass per TOML section."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    strong: StrongConfig = field(default_factory=StrongConfig)
    neq: NeqConfig = field(default_factory=NeqConfig)

    # ---- derived -------------------------------------------------------
    def to_dict(self) -> dict[str, dict[str, Any]]:
        """All settings as plain JSON-able values."""
        return {name: _section_dict(getattr(self, name)) for name in SECTIONS}

    def hashed_dict(self) -> dict[str, dict[str, Any]]:
        """The settings that change results and differ from their defaults."""
        out: dict[str, dict[str, Any]] = {}
        for name, cls in SECTIONS.items():
            section = getattr(self, name)
            default = cls()
            kept = {
                f.name: _plain(getattr(section, f.name))
                for f in fields(cls)
                if f.name not in cls.UNHASHED and getattr(section, f.name) != getattr(default, f.name)
            }
            if kept:
                out[name] = kept
        return out

    def run_hash(self) -> str:
        """A stable 12-hex-digit name for the run these settings describe."""
        return settings_hash(self.hashed_dict())

    def with_overrides(self, overrides: Mapping[str, Any]) -> Config:
        """A copy with ``{"section.key": value}`` applied (values may be strings from the CLI)."""
        cfg = self
        for dotted, value in overrides.items():
            section_name, key = _split_key(dotted)
            section = getattr(cfg, section_name)
            section = replace(section, **{key: coerce(section_name, key, value)})
            cfg = replace(cfg, **{section_name: section})
        return cfg


def settings_hash(settings: Mapping[str, Any]) -> str:
    """sha256 of canonical JSON, first 12 hex digits."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _section_dict(section: Any) -> dict[str, Any]:
    return {f.name: _plain(getattr(section, f.name)) for f in fields(section)}


def _split_key(dotted: str) -> tuple[str, str]:
    if "." not in dotted:
        raise ConfigError(
            f"setting {dotted!r}: write it as section.key; sections are {', '.join(SECTIONS)}"
        )
    section_name, key = dotted.split(".", 1)
    if section_name not in SECTIONS:
        raise ConfigError(
            f"setting {dotted!r}: unknown section {section_name!r}; sections are {', '.join(SECTIONS)}"
        )
    names = [f.name for f in fields(SECTIONS[section_name])]
    if key not in names:
        raise ConfigError(
            f"setting {dotted!r}: unknown key {key!r} in [{section_name}]; keys are {', '.join(names)}"
        )
    return section_name, key


def coerce(section_name: str, key: str, value: Any) -> Any:
    """Convert ``value`` to the type of ``[section_name].key`` or raise ConfigError naming it."""
    return coerce_field(SECTIONS[section_name], section_name, key, value)


def settings_from_table(cls: type, section: str, table: Mapping[str, Any] | None = None, **overrides: Any) -> Any:
    """A stage's settings (``[instability]``, ``[imp]``, ``[hessian]``) from its TOML table and keyword
    overrides (None = not given), converted by ``coerce_field`` and checked by the class's ``validate``.

    Names are flat: a setting of a nested settings dataclass (``instability.alphas``, held by its curve settings)
    goes to the dataclass that holds it (``nested.build``)."""
    values = {**(table or {}), **{k: v for k, v in overrides.items() if v is not None}}
    names = list(flat_paths(cls))
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"{section}.{key}: unknown setting; settings are {', '.join(names)}")
        kwargs[key] = coerce_field(owner(cls, key)[0], section, key, value)
    return build(cls, kwargs).validate()


def from_dict(data: Mapping[str, Any], base: Config | None = None) -> Config:
    """Build a Config from nested ``{section: {key: value}}`` (as TOML gives), over ``base``."""
    overrides: dict[str, Any] = {}
    for section_name, values in data.items():
        if section_name not in SECTIONS:
            raise ConfigError(
                f"unknown section [{section_name}]; sections are {', '.join(SECTIONS)}"
            )
        if not isinstance(values, Mapping):
            raise ConfigError(f"[{section_name}] must be a table of settings")
        for key, value in values.items():
            overrides[f"{section_name}.{key}"] = value
    return (base or Config()).with_overrides(overrides)


def read_toml_data(path: str | Path) -> dict[str, Any]:
    """A TOML file as a dict; a missing file or a syntax error is a ConfigError naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r}: TOML syntax error: {exc}") from None


def read_toml(path: str | Path) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """Read a TOML config file: (run sections, stage tables, preset name or None), all raw.

    Any table other than the run sections and the stage tables (a misspelt section such as
    ``[trainng]``) is refused, naming the allowed ones. ``presets.load_toml`` builds the Config.
    """
    data = read_toml_data(path)
    allowed = [*SECTIONS, *STAGE_TABLES]
    for key, value in data.items():
        if key in TOP_LEVEL_KEYS:
            if not isinstance(value, str):
                raise ConfigError(f"config file {str(path)!r}: {key} must be a string, got {value!r}")
        elif key not in allowed:
            raise ConfigError(
                f"config file {str(path)!r}: unknown section [{key}]; sections are {', '.join(allowed)} "
                f"(and {' and '.join(TOP_LEVEL_KEYS)} at the top)"
            )
        elif not isinstance(value, Mapping):
            raise ConfigError(f"config file {str(path)!r}: [{key}] must be a table of settings, got {value!r}")
    preset = data.pop("preset", None)
    data.pop("description", None)
    run_sections = {k: v for k, v in data.items() if k in SECTIONS}
    stage_tables = {k: v for k, v in data.items() if k not in SECTIONS}
    return run_sections, stage_tables, preset


def validate(cfg: Config) -> Config:
    """Check the settings every run reads, raising ConfigError with the allowed values."""
    # Names of datasets, models and init schemes are checked where they are looked up (``registry``,
    # ``models.build_model``), the training method and its section by ``methods.validate_run``: ``prepare``
    # does all of it before anything is written.
    if not (cfg.model.width > 0 and math.isfinite(cfg.model.width)):
        raise ConfigError(f"model.width: must be a positive finite number, got {cfg.model.width}")
    if not 0 <= cfg.model.dropout < 1:
        raise ConfigError(f"model.dropout: must be a rate in [0, 1), got {cfg.model.dropout}")
    if cfg.optimizer.name not in OPTIMIZERS:
        raise ConfigError(
            f"optimizer.name: unknown optimizer {cfg.optimizer.name!r}; choose one of {', '.join(OPTIMIZERS)}"
        )
    if not (cfg.optimizer.lr > 0 and math.isfinite(cfg.optimizer.lr)):
        raise ConfigError(f"optimizer.lr: must be a positive number (finite), got {cfg.optimizer.lr}")
    if not 0 <= cfg.optimizer.momentum < 1:
        raise ConfigError(f"optimizer.momentum: must be in [0, 1), got {cfg.optimizer.momentum}")
    if cfg.optimizer.nesterov and cfg.optimizer.momentum == 0:
        raise ConfigError("optimizer.nesterov: needs optimizer.momentum > 0")
    if not (cfg.optimizer.weight_decay >= 0 and math.isfinite(cfg.optimizer.weight_decay)):
        raise ConfigError(f"optimizer.weight_decay: must be a finite number >= 0, got {cfg.optimizer.weight_decay}")
    for key in ("beta1", "beta2"):
        beta = getattr(cfg.optimizer, key)
        if not 0 <= beta < 1:
            raise ConfigError(f"optimizer.{key}: must be in [0, 1), got {beta}")
    if not (cfg.optimizer.eps >= 0 and math.isfinite(cfg.optimizer.eps)):
        raise ConfigError(f"optimizer.eps: must be a finite number >= 0, got {cfg.optimizer.eps}")
    if cfg.schedule.kind not in SCHEDULES:
        raise ConfigError(f"schedule.kind: unknown schedule {cfg.schedule.kind!r}; choose one of {', '.join(SCHEDULES)}")
    if not (cfg.schedule.gamma >= 0 and math.isfinite(cfg.schedule.gamma)):
        raise ConfigError(f"schedule.gamma: must be a finite number >= 0, got {cfg.schedule.gamma}")
    if not (cfg.schedule.final_lr >= 0 and math.isfinite(cfg.schedule.final_lr)):
        raise ConfigError(f"schedule.final_lr: must be a finite number >= 0, got {cfg.schedule.final_lr}")
    if cfg.training.batch_size < 1:
        raise ConfigError(f"training.batch_size: must be >= 1, got {cfg.training.batch_size}")
    if cfg.dataset.val_size < 0:
        raise ConfigError(f"dataset.val_size: must be >= 0, got {cfg.dataset.val_size}")
    if cfg.dataset.stream not in STREAM:
        raise ConfigError(f"dataset.stream: unknown value {cfg.dataset.stream!r}; choose one of {', '.join(STREAM)}")
    if cfg.dataset.workers < -1:
        raise ConfigError(f"dataset.workers: must be >= 0, or -1 for the cores training leaves free; got "
                          f"{cfg.dataset.workers}")
    if cfg.runtime.device not in DEVICES:
        raise ConfigError(f"runtime.device: unknown device {cfg.runtime.device!r}; choose one of {', '.join(DEVICES)}")
    for key in ("precision", "eval_precision"):
        if getattr(cfg.runtime, key) not in PRECISIONS:
            raise ConfigError(f"runtime.{key}: unknown precision {getattr(cfg.runtime, key)!r}; choose one of "
                              f"{', '.join(PRECISIONS)} (fp16 is not supported: its range overflows without loss scaling)")
    if cfg.runtime.channels_last not in CHANNELS_LAST:
        raise ConfigError(f"runtime.channels_last: unknown layout {cfg.runtime.channels_last!r}; choose one of "
                          f"{', '.join(CHANNELS_LAST)}")
    if cfg.runtime.threads < 0:
        raise ConfigError(f"runtime.threads: must be >= 0, got {cfg.runtime.threads}")
    if cfg.runtime.eval_batch_size < 1:
        raise ConfigError(f"runtime.eval_batch_size: must be >= 1, got {cfg.runtime.eval_batch_size}")
    for key in ("steps", "eval_every", "checkpoint_every"):
        Step.parse(getattr(cfg.training, key), f"training.{key}")
    for point in cfg.training.rewind_points:
        Step.parse(point, "training.rewind_points")
    for point in cfg.schedule.milestones:
        Step.parse(point, "schedule.milestones")
    Step.parse(cfg.schedule.warmup, "schedule.warmup")
    check_results_root(cfg.runtime.results_root)
    return cfg


def check_results_root(root: str) -> None:
    """Refuse a results root that cannot hold run directories, before anything is created.

    It must be a writable directory, or not exist yet with its nearest existing parent a
    writable directory (it is created on the first write).
    """
    name = "runtime.results_root"
    if not root:
        raise ConfigError(f"{name}: must name a directory (existing or to be created), got ''")
    path = Path(os.path.abspath(root))
    try:
        existing = next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())
    except OSError as exc:
        raise ConfigError(f"{name}: cannot inspect {root!r}: {exc.strerror or exc}") from None
    if not existing.is_dir():
        what = f"{root!r} is" if existing == path else f"{root!r} cannot be created: {str(existing)!r} is"
        kind = "a broken symbolic link" if not existing.exists() else "an existing file"
        raise ConfigError(f"{name}: {what} {kind}, not a directory; give a directory (existing or to be created)")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = f"directory {root!r} is" if existing == path else \
            f"{root!r} cannot be created: its nearest existing parent {str(existing)!r} is"
        raise ConfigError(f"{name}: {what} not writable; give a directory you can write to")


def settings_help() -> str:
    """Every setting with its default, one per line, for ``--help``."""
    lines = []
    for name, cls in SECTIONS.items():
        for f in fields(cls):
            default = getattr(cls(), f.name)
            lines.append(f"  {name}.{f.name} = {json.dumps(_plain(default))}")
    return "\n".join(lines)



