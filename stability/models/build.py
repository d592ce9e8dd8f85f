"""Models by name: one table of what each model is and takes, seeded construction and initialization.

``MODELS`` maps ``model.name`` to a ``ModelSpec``: the builder, whether the model takes ``model.dropout``
and where it comes from (the zoo, or ``register_model``); ``torchvision/<arch>`` and ``timm/<arch>``
name any torchvision classification model or timm model without an entry of its own (their adapters are
in ``external``). ``build_model`` checks the ``[model]`` settings against the spec, then builds and
initializes on the CPU from one seed, so a seed means the same weights on every device. Adding an architecture to the zoo is a builder in ``zoo.py`` and one line in ``MODELS``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..errors import ConfigError
from ..registry import Registry
from . import zoo
from .external import TIMM_PREFIX, TORCHVISION_PREFIX, timm_factory, torchvision_factory

__all__ = ["BN_INITS", "INIT_SCHEMES", "MODELS", "STEMS", "TIMM_PREFIX", "TORCHVISION_PREFIX", "ModelSpec",
           "build_model", "count_parameters", "has_batchnorm", "model_spec", "output_layer_name", "register_model"]

# What a builder is called with: the whole ``[model]`` section, the input shape without batch, the classes.
Factory = Callable[[ModelConfig, tuple[int, ...], int], nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    """One model the suite can build: its builder, whether it takes dropout, and where it comes from."""

    name: str
    factory: Factory
    dropout: bool = False  # takes ``model.dropout`` (NoiseDropout after its hidden fully connected layers)
    # "zoo": the suite's own; "registered": a user's factory (register_model); "torchvision": torchvision/<arch>;
    # "timm": timm/<arch>
    source: Literal["zoo", "registered", "torchvision", "timm"] = "zoo"

    @property
    def checked(self) -> bool:
        """Whether a built model is checked for its logits' shape: code from outside the zoo."""
        return self.source != "zoo"


MODELS: Registry[ModelSpec] = Registry("model", "model.name", {spec.name: spec for spec in (
    ModelSpec("lenet_300_100", zoo.lenet_300_100, dropout=True),
    ModelSpec("lenet5", zoo.lenet5, dropout=True),
    ModelSpec("conv2", zoo.convn, dropout=True),
    ModelSpec("conv4", zoo.convn, dropout=True),
    ModelSpec("conv6", zoo.convn, dropout=True),
    ModelSpec("resnet", zoo.resnet),
    ModelSpec("vgg11", zoo.vgg),
    ModelSpec("vgg16", zoo.vgg),
    ModelSpec("mlp", zoo.mlp, dropout=True),
    ModelSpec("mobilenet_v1", zoo.mobilenet_v1),
)})
# Initialization schemes for conv and linear weights (``model.init``) and BatchNorm weights (``model.bn_init``).
INIT_SCHEMES = ("default", "kaiming_normal", "glorot_normal")
BN_INITS = ("ones", "uniform")
STEMS = ("default", "cifar")  # ``model.stem`` of torchvision/* and timm/* models
_EXTERNAL = ("torchvision", "timm")  # the sources that take ``model.stem``


def model_spec(name: str) -> ModelSpec:
    """The spec of ``model.name``: its entry in ``MODELS``, or a torchvision or timm model by
    ``torchvision/<arch>`` or ``timm/<arch>``."""
    if name.startswith(TORCHVISION_PREFIX):
        return ModelSpec(name, torchvision_factory(name), source="torchvision")
    if name.startswith(TIMM_PREFIX):
        return ModelSpec(name, timm_factory(name), source="timm")
    return MODELS[name]  # an unknown name is a ConfigError listing the known ones


def _initialize(model: nn.Module, scheme: str, bn_init: str = "ones") -> None:
    """Apply ``scheme`` to conv and linear layers; BatchNorm starts at bias 0 and weight 1 (``ones``) or
    uniform in [0, 1) (``uniform``, open_lth's default for its CIFAR ResNets and VGGs)."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if scheme == "kaiming_normal":
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            elif scheme == "glorot_normal":
                nn.init.xavier_normal_(module.weight)
            if scheme != "default" and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            if bn_init == "uniform":
                nn.init.uniform_(module.weight, 0.0, 1.0)
            else:
                nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def build_model(
    cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, seed: int
) -> nn.Module:
    """Build and initialize ``cfg.name`` for ``[B, *input_shape]`` inputs, seeded, on CPU."""
    spec = model_spec(cfg.name)
    if cfg.stem not in STEMS:
        raise ConfigError(f"model.stem: unknown stem {cfg.stem!r}; choose one of {', '.join(STEMS)}")
    if cfg.stem != "default" and spec.source not in _EXTERNAL:
        raise ConfigError(f"model.stem: only torchvision/* models and timm/* models take a stem option, "
                          f"not {cfg.name!r}")
    if not 0 <= cfg.dropout < 1:
        raise ConfigError(f"model.dropout: must be a rate in [0, 1), got {cfg.dropout}")
    if cfg.dropout and not spec.dropout:
        with_dropout = [n for n, s in MODELS.items() if s.dropout and s.source == "zoo"]
        raise ConfigError(f"model.dropout: {cfg.name!r} has no dropout option; models with one: "
                          f"{', '.join(with_dropout)} (and registered models that use stability.models.NoiseDropout)")
    if cfg.init not in INIT_SCHEMES:
        raise ConfigError(
            f"model.init: unknown scheme {cfg.init!r}; choose one of {', '.join(INIT_SCHEMES)}"
        )
    if cfg.bn_init not in BN_INITS:
        raise ConfigError(f"model.bn_init: unknown scheme {cfg.bn_init!r}; choose one of {', '.join(BN_INITS)}")
    if not (cfg.width > 0 and math.isfinite(cfg.width)):
        raise ConfigError(f"model.width: must be a positive finite number, got {cfg.width}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"number of classes must be a positive integer, got {num_classes!r}")
    shape = tuple(input_shape)
    if not shape or not all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape
    ):
        raise ConfigError(
            f"model.name: {cfg.name!r} got input shape {shape}; expected positive sizes"
        )
    # Fork only the CPU generator and seed only it (torch.manual_seed would also reseed
    # every CUDA generator): the caller's random streams stay untouched. Building on
    # CPU regardless of the default device makes a seed mean the same weights everywhere.
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.default_generator.manual_seed(seed)
        model = _checked_build(spec, cfg, shape, num_classes) if spec.checked else spec.factory(cfg, shape, num_classes)
        _initialize(model, cfg.init, cfg.bn_init)
    return model


# ---- models of the user's own ------------------------------------------------------------


def register_model(name: str, factory: Factory, *, replace: bool = False) -> None:
    """Make ``model.name = name`` build ``factory(model_config, input_shape, num_classes)``.

    The factory gets the whole ``[model]`` section (``width``, ``depth``, ``hidden``, ... are the
    user's to interpret) and returns an ``nn.Module`` mapping ``[B, *input_shape]`` to
    ``[B, num_classes]`` logits. What the suite derives from the module: prunable tensors (weights of
    Conv/Linear layers), the output layer (an ``output_layer`` attribute naming a module, else the
    last ``nn.Linear``), BatchNorm layers (by type). ``model.init`` re-initializes Conv/Linear weights
    unless it is ``default`` (the factory's own initialization, seeded by ``training.init_seed``).
    ``model.dropout`` is the factory's to use (``stability.models.NoiseDropout`` draws from each member's seed).
    """
    if not callable(factory):
        raise ConfigError(f"model.name: the factory registered for {name!r} is not callable")
    MODELS.register(name, ModelSpec(name, factory, dropout=True, source="registered"), replace=replace)


def _checked_build(spec: ModelSpec, cfg: ModelConfig, shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A model built outside the zoo (a user's factory, torchvision, timm), with clear errors for failures
    and bad logits."""
    try:
        model = spec.factory(cfg, shape, num_classes)
    except Exception as exc:  # the user's code: named, never a traceback from inside the suite
        raise ConfigError(f"model.name: the factory of {cfg.name!r} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.name: the factory of {cfg.name!r} returned {type(model).__name__}, not an nn.Module")
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *shape))
    except Exception as exc:
        raise ConfigError(f"model.name: {cfg.name!r} fails on inputs of shape [B, {', '.join(map(str, shape))}]: "
                          f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(out, Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ConfigError(f"model.name: {cfg.name!r} must map [B, {', '.join(map(str, shape))}] inputs to "
                          f"[B, {num_classes}] logits, got {got}")
    model.train()
    return model


def output_layer_name(model: nn.Module) -> str:
    """Module name of the final classification ``nn.Linear`` (``model.output_layer``)."""
    name = getattr(model, "output_layer", None)
    if isinstance(name, str):
        return name
    # models from elsewhere: the last Linear registered is the classifier in every usual layout
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"model {type(model).__name__} has no nn.Linear output layer")
    return linears[-1]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether the model keeps BatchNorm running statistics (which interpolation must handle)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def count_parameters(model: nn.Module) -> int:
    """Total number of parameter elements (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())
