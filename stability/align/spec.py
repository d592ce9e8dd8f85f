"""Permutation specs: which axis of which tensor each hidden-unit permutation acts on.

A hidden unit (a neuron of a Linear layer, a channel of a convolution) can be renumbered without
changing the function a network computes, as long as every tensor that reads or writes that unit is
renumbered the same way: the producing layer's output axis (weight rows, bias, the BatchNorm
parameters and running statistics that follow it) and the consuming layers' input axes. A
``PermutationSpec`` lists those axes for one architecture, as Git Re-Basin's ``PermutationSpec``
does (Ainsworth et al. 2023), for parameters and buffers alike.

Specs are derived from a model's structure (its layers, walked by type), never hand-listed per depth
or width; the zoo's four layouts are understood:

- ``FullyConnected`` (``lenet_300_100``, ``mlp``) and ``ConvThenFC`` (``lenet5``, ``conv2/4/6``):
  a chain; one permutation per hidden layer, named after the layer that produces it (``fc.0``,
  ``features.3``). The first ``fc`` layer reads the flattened ``C x H x W`` features, channel-major,
  so a channel permutation acts on its input axis in blocks of ``H*W`` consecutive entries
  (``PermutationSpec.blocks``).
- ``CifarVGG``: a chain of conv (with bias) + BatchNorm, then global average pooling and one Linear.
- ``CifarResNet``: one permutation per stage's residual stream (``stream.0``, ``stream.1``, ...),
  shared by the stem conv+BN, every block's ``conv2``/``bn2`` output, the projection shortcut's
  conv+BN output and every input axis that reads the stream; a block with a projection shortcut
  maps its input stream to the next one. One inner permutation per block (``blocks.<i>.conv1``)
  for ``conv1``/``bn1`` and the input axis of ``conv2``.

Modules without tensors (ReLU, max-pool, Identity, Dropout, Flatten) are transparent. Any other model
(a registered model of the user's, a torchvision or timm model) is traced with ``torch.fx`` (``trace``).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import ConfigError

_BN = nn.modules.batchnorm._BatchNorm
_BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class PermutationSpec:
    """The permutations of one architecture and the tensor axes each acts on.

    ``perms``: permutation name -> number of units it permutes. ``axes``: state-dict name -> for each
    axis of that tensor, the permutation acting on it or None (every tensor of the model's state dict
    is listed; ``num_batches_tracked`` has ``()``). ``blocks``: tensors whose permuted axis holds
    each unit as a block of consecutive entries (the flattened ``C*H*W`` input of the first fully
    connected layer after convolutions): name -> block length per axis (1 = plain); tensors not
    listed have blocks of 1 on every axis. ``buffers``: names that are buffers (BatchNorm running
    statistics), which weight matching leaves out of its objective.
    """

    perms: dict[str, int]
    axes: dict[str, tuple[str | None, ...]]
    blocks: dict[str, tuple[int, ...]] = field(default_factory=dict)
    buffers: frozenset[str] = frozenset()

    def block(self, name: str, axis: int) -> int:
        """Entries per unit on ``axis`` of tensor ``name`` (1 unless a flattened feature map)."""
        blocks = self.blocks.get(name)
        return blocks[axis] if blocks else 1

    def perm_to_axes(self) -> dict[str, list[tuple[str, int]]]:
        """Permutation name -> the (tensor name, axis) pairs it acts on, in state-dict order."""
        out: dict[str, list[tuple[str, int]]] = {p: [] for p in self.perms}
        for name, axes in self.axes.items():
            for axis, p in enumerate(axes):
                if p is not None:
                    out[p].append((name, axis))
        return out

    def check_state(self, state: Mapping[str, Tensor], what: str = "state") -> None:
        """ConfigError unless every permuted axis of the tensors in ``state`` has the spec's size."""
        for name, t in state.items():
            axes = self.axes.get(name)
            if axes is None:
                continue
            if t.dim() != len(axes):
                raise ConfigError(f"{what}: tensor {name!r} has {t.dim()} axes, the model's has {len(axes)}: "
                                  "the networks must have the same architecture")
            for axis, p in enumerate(axes):
                if p is not None and t.shape[axis] != self.perms[p] * self.block(name, axis):
                    raise ConfigError(
                        f"{what}: tensor {name!r} has shape {tuple(t.shape)}, but axis {axis} should hold "
                        f"{self.perms[p]} units of permutation {p!r}: the networks must have the same "
                        "architecture and width")


@dataclass
class _Layout:
    """A spec plus where the model's hidden units can be observed and corrected.

    ``points``: permutation name -> (module name, apply ReLU) for every module whose output holds
    that permutation's units as the network's hidden activations (post-ReLU; ``True`` = the ReLU is
    a functional call after the module, so the observer applies it). ``repair``: in forward order,
    (module name, kind): ``fused`` for a Conv/Linear without BatchNorm after it (its output is the
    pre-activation), ``bn`` for a BatchNorm layer.
    """

    spec: PermutationSpec
    points: dict[str, list[tuple[str, bool]]]
    repair: list[tuple[str, str]]


class _Builder:
    def __init__(self) -> None:
        self.perms: dict[str, int] = {}
        self.axes: dict[str, tuple[str | None, ...]] = {}
        self.blocks: dict[str, tuple[int, ...]] = {}
        self.buffers: set[str] = set()
        self.points: dict[str, list[tuple[str, bool]]] = {}
        self.repair: list[tuple[str, str]] = []

    def perm(self, name: str, size: int) -> str:
        self.perms[name] = size
        return name

    def layer(self, prefix: str, m: nn.Module, out_p: str | None, in_p: str | None, in_block: int = 1) -> None:
        """A Conv2d or Linear: weight ``[out, in, ...]``, optional bias ``[out]``."""
        w = m.weight
        self.axes[f"{prefix}.weight"] = (out_p, in_p) + (None,) * (w.dim() - 2)
        if in_block != 1:
            self.blocks[f"{prefix}.weight"] = (1, in_block) + (1,) * (w.dim() - 2)
        if m.bias is not None:
            self.axes[f"{prefix}.bias"] = (out_p,)

    def norm(self, prefix: str, m: nn.Module, p: str) -> None:
        for leaf in _BN_TENSORS:
            if getattr(m, leaf, None) is not None:
                self.axes[f"{prefix}.{leaf}"] = (p,)
        for leaf in ("running_mean", "running_var", "num_batches_tracked"):
            if getattr(m, leaf, None) is not None:
                self.buffers.add(f"{prefix}.{leaf}")
        if getattr(m, "num_batches_tracked", None) is not None:
            self.axes[f"{prefix}.num_batches_tracked"] = ()

    def point(self, p: str, module: str, relu: bool) -> None:
        self.points.setdefault(p, []).append((module, relu))

    def build(self, model: nn.Module) -> _Layout:
        missing = [k for k in model.state_dict() if k not in self.axes]
        if missing:
            raise _unsupported(model, f"tensors {missing[:4]} are not part of a layout alignment knows")
        for name, axes in self.axes.items():
            named = [p for p in axes if p is not None]
            # a permutation on two axes of one tensor would make weight matching's step quadratic
            assert len(named) == len(set(named)), f"{name}: one permutation on two axes"
        spec = PermutationSpec(dict(self.perms), dict(self.axes), dict(self.blocks), frozenset(self.buffers))
        return _Layout(spec, self.points, self.repair)


def _unsupported(model: nn.Module, why: str) -> ConfigError:
    name = getattr(model, "name", None)
    label = f"{name!r} ({type(model).__name__})" if isinstance(name, str) else f"{type(model).__name__} modules"
    return ConfigError(
        f"model.name: permutation alignment does not support {label}: {why}; it supports the zoo's "
        "layouts (lenet_300_100, mlp, lenet5, conv2, conv4, conv6, vgg11, vgg16, resnet, mobilenet_v1) and "
        "models torch.fx can trace that are built of Conv/Linear layers (depthwise convolutions too), "
        "BatchNorm, InstanceNorm, LayerNorm, GroupNorm with 1 group or one per channel, element-wise "
        "activations and dropout, pooling, flattening and residual additions")


def _own_tensors(m: nn.Module) -> bool:
    return bool(m._parameters) or any(b is not None for b in m._buffers.values())


def _chain_layout(model: nn.Module) -> _Layout:
    """Conv/Linear layers (each optionally followed by a BatchNorm) in registration order, which is
    their order in the forward pass for FullyConnected, ConvThenFC and CifarVGG."""
    b = _Builder()
    layers = [(n, m) for n, m in model.named_modules() if _own_tensors(m)]
    computing = [n for n, m in layers if isinstance(m, (nn.Linear, nn.Conv2d))]
    output = getattr(model, "output_layer", None)
    if not computing or computing[-1] != output:
        raise _unsupported(model, "its output layer is not its last Conv/Linear layer")
    in_p: str | None = None
    prev: nn.Module | None = None
    for name, m in layers:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                if not (m.groups == m.in_channels == m.out_channels and in_p is not None
                        and b.perms[in_p] == m.in_channels):
                    raise _unsupported(model, f"{name} is a grouped convolution that is not depthwise")
                # depthwise (MobileNet): channel c reads only channel c, so its units keep the input's order
                b.layer(name, m, in_p, None)
                b.point(in_p, name, relu=True)
                b.repair.append((name, "fused"))
                prev = m
                continue
            block = 1
            if in_p is not None:
                fan_in, units = m.weight.shape[1], b.perms[in_p]
                if isinstance(m, nn.Linear) and isinstance(prev, nn.Conv2d | _BN) and fan_in % units == 0:
                    block = fan_in // units  # flattened C x H x W: channel-major blocks of H*W
                elif fan_in != units:
                    raise _unsupported(model, f"{name} reads {fan_in} inputs, the layer before gives {units}")
            out_p = None if name == output else b.perm(name, m.weight.shape[0])
            b.layer(name, m, out_p, in_p, block)
            if out_p is not None:
                b.point(out_p, name, relu=True)
                b.repair.append((name, "fused"))
            in_p = out_p
        elif isinstance(m, _BN) and isinstance(prev, (nn.Linear, nn.Conv2d)) and in_p is not None:
            if m.num_features != b.perms[in_p]:
                raise _unsupported(model, f"{name} normalizes {m.num_features} features, not {b.perms[in_p]}")
            b.norm(name, m, in_p)
            b.points[in_p][-1] = (name, True)  # the unit's pre-activation is the BatchNorm's output
            b.repair[-1] = (name, "bn")
        else:
            raise _unsupported(model, f"layer {name} ({type(m).__name__}) is not Conv2d/Linear/BatchNorm")
        prev = m
    return b.build(model)


def _resnet_layout(model: nn.Module) -> _Layout:
    from ..models import ResidualBlock

    b = _Builder()
    stage = 0
    stream = b.perm("stream.0", model.conv.out_channels)
    b.layer("conv", model.conv, stream, None)
    b.norm("bn", model.bn, stream)
    b.point(stream, "bn", relu=True)
    b.repair.append(("bn", "bn"))
    for i, block in enumerate(model.blocks):
        if not isinstance(block, ResidualBlock):
            raise _unsupported(model, f"blocks.{i} is a {type(block).__name__}, not a ResidualBlock")
        pre = f"blocks.{i}"
        inner = b.perm(f"{pre}.conv1", block.conv1.out_channels)
        b.layer(f"{pre}.conv1", block.conv1, inner, stream)
        b.norm(f"{pre}.bn1", block.bn1, inner)
        b.point(inner, f"{pre}.bn1", relu=True)
        b.repair.append((f"{pre}.bn1", "bn"))
        if isinstance(block.shortcut, nn.Identity):
            out = stream
        else:
            parts = list(block.shortcut.children())
            if len(parts) != 2 or not isinstance(parts[0], nn.Conv2d) or not isinstance(parts[1], _BN):
                raise _unsupported(model, f"{pre}.shortcut is not a Conv2d + BatchNorm projection")
            stage += 1
            out = b.perm(f"stream.{stage}", parts[0].out_channels)
            b.layer(f"{pre}.shortcut.0", parts[0], out, stream)
            b.norm(f"{pre}.shortcut.1", parts[1], out)
        b.layer(f"{pre}.conv2", block.conv2, out, inner)
        b.norm(f"{pre}.bn2", block.bn2, out)
        b.repair.append((f"{pre}.bn2", "bn"))
        if out != stream:
            b.repair.append((f"{pre}.shortcut.1", "bn"))  # runs after bn2 in the block's forward
        b.point(out, pre, relu=False)  # the block's output: after its final ReLU
        stream = out
    b.layer("fc", model.fc, None, stream)  # after global average pooling: one entry per channel
    return b.build(model)


# The layout of a model outside the zoo: ``trace.traced_layout``, which registers itself here when imported
# (the package imports it), so that this module, which ``trace`` builds on, never imports ``trace``.
_traced_layout: Callable[[nn.Module, Tensor | None], _Layout] | None = None


def _layout(model: nn.Module, example_input: Tensor | None = None) -> _Layout:
    """The spec of a model plus its observation and correction points: hand-derived for the zoo's
    layouts, traced with torch.fx (and checked on ``example_input``) for any other model."""
    from ..models import CifarResNet, CifarVGG, ConvThenFC, FullyConnected, MobileNetV1

    if type(model) in (FullyConnected, ConvThenFC, CifarVGG, MobileNetV1):
        return _chain_layout(model)
    if type(model) is CifarResNet:
        return _resnet_layout(model)
    if _traced_layout is None:
        raise _unsupported(model, "not one of the zoo's layouts, and stability.align.trace is not loaded")
    return _traced_layout(model, example_input)


def permutation_spec(model: nn.Module, example_input: Tensor | None = None) -> PermutationSpec:
    """The hidden-unit permutations of ``model`` and the axes of its state dict they act on.

    The zoo's layouts are derived from their structure; any other model is traced with torch.fx on
    ``example_input`` (default: a random batch of the shape its first layer takes) and checked: a random
    permutation must leave its outputs unchanged, or it is refused with a ConfigError.
    """
    return _layout(model, example_input).spec


def _permute_axis(t: Tensor, axis: int, perm: Tensor, block: int) -> Tensor:
    """``t`` with its units on ``axis`` reordered: new unit j = old unit ``perm[j]``."""
    perm = perm.to(t.device)
    if block == 1:
        return t.index_select(axis, perm)
    shape = t.shape
    split = t.reshape(*shape[:axis], shape[axis] // block, block, *shape[axis + 1:])
    return split.index_select(axis, perm).reshape(shape)


def permute_tensor(spec: PermutationSpec, perms: Mapping[str, Tensor], name: str, t: Tensor,
                   except_axis: int | None = None) -> Tensor:
    """Tensor ``name`` of a state dict with every permutation of ``spec`` applied (but on ``except_axis``)."""
    for axis, p in enumerate(spec.axes.get(name, ())):
        if p is not None and axis != except_axis:
            t = _permute_axis(t, axis, perms[p], spec.block(name, axis))
    return t


def apply_permutation(spec: PermutationSpec, perms: Mapping[str, Tensor],
                      state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A new dict with every axis of every tensor in ``state`` permuted as ``spec`` says.

    New unit j of permutation p is old unit ``perms[p][j]``. ``state`` may be a whole state dict or
    any subset of its names (e.g. masks ``{weight name: 0/1 tensor}``, permuted exactly as the
    weights); names the spec does not know pass through unchanged.
    """
    missing = sorted({p for name in state for p in spec.axes.get(name, ()) if p is not None} - set(perms))
    if missing:
        raise ConfigError(f"permutations: missing {missing}; the spec's are {sorted(spec.perms)}")
    spec.check_state(state)
    return {name: permute_tensor(spec, perms, name, t) for name, t in state.items()}


def identity_permutation(spec: PermutationSpec) -> dict[str, Tensor]:
    """Every permutation of ``spec`` as the identity (``arange``)."""
    return {p: torch.arange(n) for p, n in spec.perms.items()}


def random_permutation(spec: PermutationSpec, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """A uniformly random permutation for each of ``spec``'s, drawn from ``generator``."""
    return {p: torch.randperm(n, generator=generator) for p, n in spec.perms.items()}


def invert_permutation(perms: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The permutations that undo ``perms`` (``apply(inv, apply(perms, s)) == s``)."""
    return {p: torch.argsort(q) for p, q in perms.items()}
