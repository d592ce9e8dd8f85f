"""The context of a run: everything derived from its Config that a stage needs (device, data, model template,
step arithmetic), built once by ``prepare``."""
from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import Config
from ..data import DataSplits, load_dataset
from ..engine import configure_threads, distributed, iterations_per_epoch, resolve_device
from ..errors import ConfigError
from ..methods import method_of, validate_run
from ..methods.base import Method
from ..models import build_model
from ..plugins import load_plugins
from ..steps import to_iterations
from ..trackers import require as require_trackers

__all__ = ["Context", "prepare"]


@dataclass
class Context:
    """Everything derived from a Config that a stage needs: device, data, model, step arithmetic."""

    cfg: Config
    device: torch.device
    data: DataSplits
    model: nn.Module
    ipe: int
    total_steps: int

    def steps(self, values: Iterable[str | int], setting: str) -> list[int]:
        """Parse steps to iterations, each within [0, final step)."""
        out = []
        for v in values:
            it = to_iterations(v, self.ipe, setting)
            if it >= self.total_steps:
                raise ConfigError(
                    f"{setting}: step {v!r} = iteration {it} is at or past the final step "
                    f"({self.cfg.training.steps} = iteration {self.total_steps}); rewind points must come before it"
                )
            out.append(it)
        return sorted(set(out))

    @property
    def method(self) -> Method:
        """The training method of the run (``training.method``, checked by ``prepare``)."""
        return method_of(self.cfg)

    def new_model(self, seed: int | None = None) -> nn.Module:
        """A freshly initialized model (seeded by init_seed unless given)."""
        seed = self.cfg.training.init_seed if seed is None else seed
        return _run_model(self.cfg, self.data, seed, self.device)

    @property
    def augmentation(self) -> str | None:
        return self.data.augmentation


@functools.lru_cache(maxsize=4)
def _cached_dataset(dataset_cfg: Any, device: str) -> DataSplits:
    return load_dataset(dataset_cfg, device)


def _run_model(cfg: Config, data: DataSplits, seed: int, device: torch.device) -> nn.Module:
    """The model a run of ``cfg`` trains, initialized from ``seed``, on ``device`` (as its method builds it)."""
    model = build_model(cfg.model, data.input_shape, data.num_classes, seed)
    return method_of(cfg).build(model, cfg, seed).to(device)


def prepare(cfg: Config) -> Context:
    """Validate settings, pick device and threads, load data and build the model template."""
    load_plugins(cfg.runtime.plugins)  # before validating: plugins register models, datasets and methods
    validate_run(cfg)
    require_trackers(cfg.runtime.trackers)  # an unknown or missing tracker stops here, before anything is written
    device = resolve_device(cfg.runtime.device)
    distributed.start(cfg.runtime.distributed, cfg.training.batch_size, device, dropout=cfg.model.dropout > 0)
    configure_threads(cfg.runtime.threads)
    data = _cached_dataset(cfg.dataset, str(device))
    ipe = iterations_per_epoch(data.n_train, cfg.training.batch_size)
    total = to_iterations(cfg.training.steps, ipe, "training.steps")
    if total < 1:
        raise ConfigError(f"training.steps: must be at least 1 iteration, got {cfg.training.steps!r}")
    ctx = Context(cfg, device, data, _run_model(cfg, data, cfg.training.init_seed, device), ipe, total)
    ctx.steps(cfg.training.rewind_points, "training.rewind_points")
    for key in ("eval_every", "checkpoint_every"):
        if to_iterations(getattr(cfg.training, key), ipe, f"training.{key}") < 1:
            raise ConfigError(f"training.{key}: must be at least 1 iteration")
    ctx.method.check(ctx)
    return ctx

