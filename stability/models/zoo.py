"""The networks of the lottery-ticket and mode-connectivity papers, built from a ModelConfig.

Every model takes a batch ``[B, *input_shape]`` and returns logits ``[B, classes]``.
Fully connected models (``lenet_300_100``, ``mlp``) flatten any input; image models
(``lenet5``, ``conv2``/``conv4``/``conv6``, ``resnet``, ``vgg11``/``vgg16``, ``mobilenet_v1``)
take ``(C, H, W)`` images of any channel count that are large enough for them.

Parameter names are stable and readable because masks and checkpoints address
tensors by name: convolutional stacks live in ``features.<i>``, fully connected
stacks in ``fc.<i>`` (a single output ``fc`` for ResNet and VGG), ResNet blocks in
``blocks.<i>.conv1`` etc. Every model carries ``output_layer``, the module name of
its final classification ``nn.Linear``.

Forward passes are written for ``torch.func.functional_call`` + ``vmap`` over
stacked parameters and buffers (siblings train batched): no in-place ReLU, no
in-place ops on inputs or activations, no ``.item()`` and no data-dependent
Python branches.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from .noise import NoiseDropout

RESNET_DEPTHS = (8, 14, 20, 32, 56)

# Frankle & Carbin (2019), Figure 2: pairs of 3x3 convolutions, max-pool after each pair.
_CONVN_PLANS: dict[str, tuple[int, ...]] = {
    "conv2": (64, 64),
    "conv4": (64, 64, 128, 128),
    "conv6": (64, 64, 128, 128, 256, 256),
}

# CIFAR VGG plans ("M" = 2x2 max-pool), as in open_lth's cifar_vgg.
# fmt: off
_VGG_PLANS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
              512, 512, 512, "M", 512, 512, 512, "M"),
}
# fmt: on


def _scaled(channels: int, width: float) -> int:
    """A hidden width times the width multiplier, rounded, at least 1."""
    return max(1, round(channels * width))


def _fc_forward(layers: nn.ModuleList, x: torch.Tensor, dropout: nn.Module | None = None) -> torch.Tensor:
    """Linear layers with ReLU (then dropout, if any) between them and none after the last."""
    last = len(layers) - 1
    for i, layer in enumerate(layers):
        x = layer(x)
        if i < last:
            x = F.relu(x)
            if dropout is not None:
                x = dropout(x)
    return x


def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(C, H, W)`` of an image input, or ConfigError for inputs an image model cannot take."""
    if len(input_shape) != 3:
        raise ConfigError(
            f"model.name: {name!r} needs image input (channels, height, width); got input shape "
            f"{tuple(input_shape)}; for 1-D or flat inputs use 'lenet_300_100' or 'mlp'"
        )
    return input_shape[0], input_shape[1], input_shape[2]


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that evaluates a plain 2x2, stride-2 pool faster when no gradient is needed.

    Without autograd the pool is the elementwise maximum of four strided views of the input:
    exactly the same values as torch's kernel (which also computes the argmax indices), 4-8x
    faster on the CPU, where it was a third of LeNet-5's evaluation time. With autograd, torch's
    kernel runs as usual (its gradient goes to the first maximum of a window; ``torch.maximum``'s
    would split ties), so training is unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Grad mode alone decides: inside ``vmap`` a tensor that carries a gradient reads
        # ``requires_grad = False``, and the shortcut would then split the gradient at ties.
        if torch.is_grad_enabled() or not self._plain_2x2() or x.dim() != 4:
            return super().forward(x)
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
        if h == 0 or w == 0:
            return super().forward(x)  # torch's own error for a map smaller than the window
        x = x[..., :h, :w]
        top = torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2])
        bottom = torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2])
        return torch.maximum(top, bottom)

    def _plain_2x2(self) -> bool:
        return (_pair(self.kernel_size) == (2, 2) and _pair(self.stride or self.kernel_size) == (2, 2)
                and _pair(self.padding) == (0, 0) and _pair(self.dilation) == (1, 1)
                and not self.ceil_mode and not self.return_indices)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _spatial_after(layers: Sequence[nn.Module], h: int, w: int) -> tuple[int, int] | None:
    """Spatial size after ``layers`` from their hyperparameters (a dry shape run); None if empty."""
    for layer in layers:
        if isinstance(layer, (nn.Conv2d, nn.MaxPool2d)):
            k, s, p, d = (
                _pair(v) for v in (layer.kernel_size, layer.stride, layer.padding, layer.dilation)
            )
            h = (h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
            w = (w + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
            if h < 1 or w < 1:
                return None
    return h, w


def _checked_spatial_after(
    layers: Sequence[nn.Module], name: str, input_shape: tuple[int, ...]
) -> tuple[int, int]:
    """Spatial size after ``layers`` for ``(C, H, W)`` input, or ConfigError giving the minimum."""
    out = _spatial_after(layers, input_shape[1], input_shape[2])
    if out is None:
        side = next(s for s in itertools.count(1) if _spatial_after(layers, s, s) is not None)
        raise ConfigError(
            f"model.name: {name!r} cannot take input shape {tuple(input_shape)}: "
            f"images must be at least {side}x{side}"
        )
    return out


class _Network(nn.Module):
    """Shared attributes: ``name``, ``input_shape``, ``num_classes`` and ``output_layer``."""

    output_layer: str

    def __init__(self, name: str, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.name = name
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes


class FullyConnected(_Network):
    """ReLU MLP on flattened input: LeNet-300-100 and the configurable ``mlp``."""

    def __init__(
        self, name: str, input_shape: tuple[int, ...], num_classes: int, hidden: Sequence[int],
        dropout: float = 0.0,
    ) -> None:
        super().__init__(name, input_shape, num_classes)
        sizes = [math.prod(input_shape), *hidden, num_classes]
        self.fc = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.output_layer = f"fc.{len(self.fc) - 1}"
        # after each hidden layer's ReLU; no parameters, so state dicts are the same with or without it
        self.dropout = NoiseDropout(dropout) if dropout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fc_forward(self.fc, torch.flatten(x, 1), self.dropout)


class ConvThenFC(_Network):
    """A conv/pool ``features`` stack, flattened, then a ReLU ``fc`` stack: LeNet-5 and Conv-2/4/6."""

    def __init__(
        self,
        name: str,
        input_shape: tuple[int, ...],
        num_classes: int,
        features: list[nn.Module],
        fc_hidden: Sequence[int],
        dropout: float = 0.0,
    ) -> None:
        super().__init__(name, input_shape, num_classes)
        _image_shape(name, input_shape)
        self.features = nn.Sequential(*features)
        h, w = _checked_spatial_after(features, name, input_shape)
        out_channels = [m.out_channels for m in features if isinstance(m, nn.Conv2d)][-1]
        sizes = [out_channels * h * w, *fc_hidden, num_classes]
        self.fc = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.output_layer = f"fc.{len(self.fc) - 1}"
        # on the fully connected layers, as Frankle & Carbin (2019) train Conv-2/4/6 with dropout
        self.dropout = NoiseDropout(dropout) if dropout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fc_forward(self.fc, torch.flatten(self.features(x), 1), self.dropout)


class ResidualBlock(nn.Module):
    """Two 3x3 conv+BN layers with an identity or 1x1-conv+BN projection shortcut (open_lth style)."""

    def __init__(self, f_in: int, f_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(f_in, f_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(f_out)
        self.conv2 = nn.Conv2d(f_out, f_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(f_out)
        if stride != 1 or f_in != f_out:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(f_in, f_out, 1, stride=stride, bias=False), nn.BatchNorm2d(f_out)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # out-of-place add: in-place on activations breaks autograd and vmap
        return F.relu(out + self.shortcut(x))


class CifarResNet(_Network):
    """CIFAR ResNet of depth 6n+2: stages of 16/32/64 channels (times width), n blocks each."""

    def __init__(
        self, name: str, input_shape: tuple[int, ...], num_classes: int, depth: int, width: float
    ) -> None:
        super().__init__(name, input_shape, num_classes)
        channels, _, _ = _image_shape(name, input_shape)
        n = (depth - 2) // 6
        stages = [_scaled(c, width) for c in (16, 32, 64)]
        self.conv = nn.Conv2d(channels, stages[0], 3, stride=1, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(stages[0])
        blocks = []
        f_in = stages[0]
        for s, f_out in enumerate(stages):
            for b in range(n):
                blocks.append(ResidualBlock(f_in, f_out, stride=2 if s > 0 and b == 0 else 1))
                f_in = f_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(stages[-1], num_classes)
        self.output_layer = "fc"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.conv(x)))
        out = self.blocks(out)
        return self.fc(out.mean(dim=(-2, -1)))  # global average pool


class CifarVGG(_Network):
    """CIFAR VGG: 3x3 conv+BN+ReLU stack with max-pools, global average pool, one Linear."""

    def __init__(
        self,
        name: str,
        input_shape: tuple[int, ...],
        num_classes: int,
        plan: Sequence[int | str],
        width: float,
    ) -> None:
        super().__init__(name, input_shape, num_classes)
        channels, h, w = _image_shape(name, input_shape)
        layers: list[nn.Module] = []
        for item in plan:
            if item == "M":
                # A 1-pixel map cannot be pooled; skipping the pool lets 28x28 (and 8x8) inputs
                # through a plan designed for 32x32, and the global average pool absorbs the rest.
                if h >= 2 and w >= 2:
                    layers.append(MaxPool2d(2))
                    h, w = h // 2, w // 2
            else:
                out = _scaled(int(item), width)
                # convs keep their bias, as in open_lth's cifar_vgg (parameter counts match it)
                layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
                channels = out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, num_classes)
        self.output_layer = "fc"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(-2, -1)))  # global average pool


# MobileNetV1 (Howard et al. 2017) for 32x32 inputs, as the CIFAR code bases Sahu et al. build on write it:
# a 3x3 stride-1 stem of 32 channels, then depthwise-separable blocks (out channels, stride).
_MOBILENET_PLAN: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)


class DepthwiseSeparable(nn.Module):
    """A 3x3 depthwise conv + BN + ReLU, then a 1x1 pointwise conv + BN + ReLU."""

    def __init__(self, f_in: int, f_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(f_in, f_in, 3, stride=stride, padding=1, groups=f_in, bias=False)
        self.bn1 = nn.BatchNorm2d(f_in)
        self.conv2 = nn.Conv2d(f_in, f_out, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(f_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class MobileNetV1(_Network):
    """CIFAR MobileNetV1: stem conv+BN+ReLU, 13 depthwise-separable blocks, global average pool, one Linear."""

    def __init__(self, name: str, input_shape: tuple[int, ...], num_classes: int, width: float) -> None:
        super().__init__(name, input_shape, num_classes)
        channels, _, _ = _image_shape(name, input_shape)
        f_in = _scaled(32, width)
        self.conv = nn.Conv2d(channels, f_in, 3, stride=1, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(f_in)
        blocks = []
        for f_out, stride in _MOBILENET_PLAN:
            blocks.append(DepthwiseSeparable(f_in, _scaled(f_out, width), stride))
            f_in = _scaled(f_out, width)
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(f_in, num_classes)
        self.output_layer = "fc"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(out.mean(dim=(-2, -1)))  # global average pool


# ---- builders: (cfg, input_shape, num_classes) -> module; ``build.MODELS`` names them -----


def lenet_300_100(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """LeNet-300-100 (Frankle & Carbin 2019): two hidden layers of 300 and 100 units, times width."""
    return FullyConnected(
        cfg.name, input_shape, num_classes, [_scaled(c, cfg.width) for c in (300, 100)], cfg.dropout
    )


def mlp(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A ReLU MLP with ``model.hidden`` widths (default 100, 100), times width."""
    hidden = tuple(cfg.hidden) or (100, 100)
    if not all(isinstance(c, int) and c > 0 for c in hidden):
        raise ConfigError(f"model.hidden: expected positive integers, got {list(hidden)}")
    return FullyConnected(
        cfg.name, input_shape, num_classes, [_scaled(c, cfg.width) for c in hidden], cfg.dropout
    )


def lenet5(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """LeNet-5: two 5x5 conv+pool stages (6, 16 channels), then 120 and 84 hidden units."""
    channels, _, _ = _image_shape(cfg.name, input_shape)
    c1, c2 = _scaled(6, cfg.width), _scaled(16, cfg.width)
    features: list[nn.Module] = [
        nn.Conv2d(channels, c1, 5, padding=2), nn.ReLU(), MaxPool2d(2),
        nn.Conv2d(c1, c2, 5), nn.ReLU(), MaxPool2d(2),
    ]  # fmt: skip
    fc_hidden = [_scaled(c, cfg.width) for c in (120, 84)]
    return ConvThenFC(cfg.name, input_shape, num_classes, features, fc_hidden, cfg.dropout)


def convn(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Conv-2/4/6 (Frankle & Carbin 2019): pairs of 3x3 convs with a max-pool after each, then 256, 256."""
    channels, _, _ = _image_shape(cfg.name, input_shape)
    features: list[nn.Module] = []
    plan = _CONVN_PLANS[cfg.name]
    for i, c in enumerate(plan):
        out = _scaled(c, cfg.width)
        features += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU()]
        if i % 2 == 1:
            features.append(MaxPool2d(2))
        channels = out
    fc_hidden = [_scaled(c, cfg.width) for c in (256, 256)]
    return ConvThenFC(cfg.name, input_shape, num_classes, features, fc_hidden, cfg.dropout)


def resnet(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """CIFAR ResNet of ``model.depth`` (one of ``RESNET_DEPTHS``), times width."""
    if cfg.depth not in RESNET_DEPTHS:
        raise ConfigError(
            f"model.depth: resnet depth {cfg.depth} is not supported; choose one of "
            f"{', '.join(map(str, RESNET_DEPTHS))}"
        )
    return CifarResNet(cfg.name, input_shape, num_classes, cfg.depth, cfg.width)


def mobilenet_v1(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """CIFAR MobileNetV1, times width."""
    return MobileNetV1(cfg.name, input_shape, num_classes, cfg.width)


def vgg(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """CIFAR VGG-11 or VGG-16 (by ``model.name``), times width."""
    return CifarVGG(cfg.name, input_shape, num_classes, _VGG_PLANS[cfg.name], cfg.width)
