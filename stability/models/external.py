"""Architectures from other libraries by name: ``torchvision/<arch>`` and ``timm/<arch>``.

Each adapter builds the library's model untrained, for the dataset's channels and classes, with its
dropout and stochastic depth made identities (their masks would come from torch's global generator, which
is not part of a run's noise seed) and, with ``model.stem = "cifar"``, a 3x3 stride-1 first convolution
and no stem max-pool. The libraries are imported only when such a model is named.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError

__all__ = ["TIMM_PREFIX", "TIMM_STEM_FAMILIES", "TORCHVISION_PREFIX", "timm_factory", "torchvision_factory"]

TORCHVISION_PREFIX = "torchvision/"
TIMM_PREFIX = "timm/"
# timm families whose stem ``model.stem = "cifar"`` knows how to replace (class in timm.models.<module>)
TIMM_STEM_FAMILIES = {"resnet": ("resnet", "ResNet"), "efficientnet": ("efficientnet", "EfficientNet"),
                      "mobilenetv3": ("mobilenetv3", "MobileNetV3")}

Builder = Callable[[ModelConfig, tuple[int, ...], int], nn.Module]


def _images(name: str, input_shape: tuple[int, ...]) -> None:
    if len(input_shape) != 3:
        raise ConfigError(f"model.name: {name!r} takes images [C, H, W], the dataset gives {input_shape}")


# ---- torchvision ------------------------------------------------------------------------------


def torchvision_factory(name: str) -> Builder:
    """``torchvision/<arch>``: any torchvision.models classification builder, untrained (weights=None)."""
    from torchvision import models as tv

    arch = name[len(TORCHVISION_PREFIX):]
    known = tv.list_models(module=tv)
    if arch not in known:
        raise ConfigError(f"model.name: {name!r} is not a torchvision classification model; choose "
                          f"torchvision/ followed by one of {', '.join(known)}")

    def build(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        _images(name, input_shape)
        model = tv.get_model(arch, weights=None, num_classes=num_classes)
        adapt_stem(model, input_shape[0], cifar=cfg.stem == "cifar")
        drop_dropout(model)
        return model

    return build


def drop_dropout(model: nn.Module, extra: tuple[type, ...] = ()) -> None:
    """Dropout and stochastic-depth layers (torchvision's ``StochasticDepth``, and the ``extra`` types) become
    identities: siblings, resume and the batched path would otherwise not be reproducible."""
    from torchvision.ops import StochasticDepth

    kinds = (nn.modules.dropout._DropoutNd, StochasticDepth, *extra)
    for name, module in list(model.named_modules()):
        if name and isinstance(module, kinds):
            _replace(model, name, nn.Identity())


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)


def _stem_conv(channels: int, conv: nn.Conv2d, cifar: bool) -> nn.Conv2d | None:
    """The replacement of a first convolution: 3x3 stride 1 (``cifar``), else the same taking ``channels``."""
    if cifar:
        return nn.Conv2d(channels, conv.out_channels, 3, stride=1, padding=1, bias=conv.bias is not None)
    if channels != conv.in_channels:
        return nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         bias=conv.bias is not None)
    return None


def adapt_stem(model: nn.Module, channels: int, cifar: bool) -> None:
    """The first convolution takes ``channels`` inputs; ``cifar``: 3x3, stride 1, and no stem max-pool
    (the CIFAR variants of ResNet and MobileNet that Sahu et al. use on 32x32 images)."""
    name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    new = _stem_conv(channels, conv, cifar)
    if new is None:
        return
    _replace(model, name, new)
    if cifar and isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):
        model.maxpool = nn.Identity()


# ---- timm -------------------------------------------------------------------------------------


def _import_timm():
    try:
        import timm
    except ImportError as exc:
        raise ConfigError("model.name: timm/* models need timm: pip install stability[timm]") from exc
    return timm


def timm_factory(name: str) -> Builder:
    """``timm/<arch>``: any model ``timm.create_model`` knows, untrained (pretrained=False), for the dataset's
    channels (``in_chans``) and classes, with drop_rate and drop_path_rate 0."""
    timm = _import_timm()
    arch = name[len(TIMM_PREFIX):]
    if not arch or not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ConfigError(f"model.name: {name!r} is not a timm model; choose timm/ followed by a name from "
                          f"timm.list_models() (e.g. timm.list_models('resnet*')){hint}")

    def build(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        _images(name, input_shape)
        model = _create(timm, arch, num_classes=num_classes, in_chans=input_shape[0])
        if cfg.stem == "cifar":
            _timm_cifar_stem(model, name, input_shape[0])
        from timm.layers import DropBlock2d, DropPath

        drop_dropout(model, (DropPath, DropBlock2d))
        return model

    return build


def _create(timm, arch: str, **kwargs) -> nn.Module:
    """``timm.create_model`` with no dropout or drop-path, leaving out the options a model does not take."""
    for drops in ({"drop_rate": 0.0, "drop_path_rate": 0.0}, {"drop_rate": 0.0}, {}):
        try:
            return timm.create_model(arch, pretrained=False, **kwargs, **drops)
        except TypeError as exc:
            if not any(k in str(exc) for k in drops):
                raise
    raise AssertionError("unreachable")  # the last attempt passes no drop option, so it returns or raises


def _timm_cifar_stem(model: nn.Module, name: str, channels: int) -> None:
    """The first convolution of a supported family becomes 3x3 stride 1; a ResNet loses its stem max-pool."""
    import importlib

    family = next((f for f, (module, cls) in TIMM_STEM_FAMILIES.items()
                   if isinstance(model, getattr(importlib.import_module(f"timm.models.{module}"), cls))), None)
    if family is None:
        raise ConfigError(f"model.stem: the cifar stem is known for the timm families "
                          f"{', '.join(TIMM_STEM_FAMILIES)}, not {name!r} ({type(model).__name__}); "
                          f"use model.stem = \"default\"")
    first = getattr(model, "pretrained_cfg", {}).get("first_conv")
    try:
        conv = model.get_submodule(first) if isinstance(first, str) else None
    except AttributeError:
        conv = None
    if not isinstance(conv, nn.Conv2d):
        first, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    _replace(model, first, _stem_conv(channels, conv, cifar=True))
    if family == "resnet":
        model.maxpool = nn.Identity()
