"""The torch.fx graph analysis behind ``trace``: which tensor axes hold which group of hidden units.

One pass over the graph in forward order gives every node a label: ``_Units`` (the axis holding a group's
units and their block length), ``_Param`` (a state tensor the graph reads directly) or None (nothing
permuted). Groups are opened by Conv/Linear outputs and joined by union-find where operations combine
them; the group of the network's input and output (``FIXED``) never moves.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .spec import PermutationSpec, _Layout, _unsupported

_BN = nn.modules.batchnorm._BatchNorm
_IN = nn.modules.instancenorm._InstanceNorm
_NORMS = (_BN, _IN, nn.GroupNorm, nn.LayerNorm)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid,
                nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus, nn.PReLU)
_PASS_MODULES = (*_ACTIVATIONS, nn.Identity, nn.modules.dropout._DropoutNd, nn.Softmax, nn.LogSoftmax)
_NOISE = frozenset({"NoiseDropout", "StochasticDepth", "DropPath", "DropBlock2d"})  # per-example noise layers
_SPATIAL_MODULES = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd, nn.Upsample,
                    *(getattr(nn, f"{kind}Pad{d}d") for kind in ("Zero", "Constant", "Reflection", "Replication",
                                                              "Circular") for d in (1, 2, 3)))


def _functions(*names: str) -> frozenset:
    return frozenset(getattr(mod, n) for n in names for mod in (F, torch) if hasattr(mod, n))


_PASS_FUNCS = _functions("relu", "relu_", "relu6", "gelu", "silu", "hardswish", "hardsigmoid", "hardtanh", "sigmoid",
                         "tanh", "leaky_relu", "elu", "mish", "softplus", "dropout", "dropout1d", "dropout2d",
                         "dropout3d", "alpha_dropout", "softmax", "log_softmax", "neg", "exp") | {operator.neg}
_PASS_METHODS = frozenset({"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "softmax", "log_softmax", "neg",
                           "exp", "clamp", "clamp_", "clamp_min", "clamp_max", "contiguous", "clone", "detach",
                           "float", "double", "half", "to", "type_as"})
_RELUS = _functions("relu", "relu_")
_BINARY_FUNCS = _functions("add", "sub", "mul", "div") | {operator.add, operator.iadd, operator.sub, operator.isub,
                                                           operator.mul, operator.imul, operator.truediv,
                                                           operator.itruediv}
_BINARY_METHODS = frozenset({"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"})
_SPATIAL_FUNCS = _functions(*(f"{p}{d}d" for p in ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool")
                              for d in (1, 2, 3)), "interpolate", "pad")
_RESHAPE_FUNCS = _functions("flatten", "reshape", "squeeze", "unsqueeze")
_RESHAPE_METHODS = frozenset({"flatten", "view", "reshape", "squeeze", "unsqueeze", "view_as", "reshape_as"})
_REDUCE_FUNCS = _functions("mean", "sum", "amax", "amin")
_REDUCE_METHODS = frozenset({"mean", "sum", "amax", "amin"})
_CAT_FUNCS = _functions("cat", "concat", "concatenate")
_TRANSPOSE = frozenset({"permute", "transpose"})
_SHAPE_METHODS = frozenset({"size", "dim", "numel"})


@dataclass(frozen=True)
class _Units:
    """Axis ``axis`` of a tensor holds the units of ``group``, each as ``block`` consecutive entries."""

    axis: int
    group: int
    block: int = 1


@dataclass(frozen=True)
class _Param:
    """A tensor of the state dict read directly by the graph (``get_attr``)."""

    name: str


class _Tracer(fx.Tracer):
    """Layers alignment understands, layers with tensors of their own and torch.nn's are traced as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        known = (nn.modules.conv._ConvNd, nn.Linear, *_NORMS, *_PASS_MODULES, *_SPATIAL_MODULES, nn.Flatten,
                 nn.Unflatten)
        own = any(t is not None for t in (*m._parameters.values(), *m._buffers.values()))
        return isinstance(m, known) or type(m).__name__ in _NOISE or own or super().is_leaf_module(m, qualname)


def _shape(node: object) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def _dims(dim: object, ndim: int) -> set[int] | None:
    if dim is None:
        return None
    return {d % ndim for d in (dim if isinstance(dim, (tuple, list)) else (dim,))}


def _arg(node: fx.Node, index: int, name: str, default: object = None) -> object:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


class _Analysis:
    """One pass over the graph in order: a ``_Units``, ``_Param`` or None (no permuted axis) per node."""

    FIXED = 0  # the group of units that must not move (the network's input and output)

    def __init__(self, model: nn.Module, gm: fx.GraphModule) -> None:
        self.model, self.gm = model, gm
        self.modules = dict(gm.named_modules())
        self.state = model.state_dict(keep_vars=True)
        self.parent, self.units, self.opener = [0], [0], [""]
        self.axes: dict[str, list[int | None]] = {}
        self.blocks: dict[str, list[int]] = {}
        self.opened: dict[str, int] = {}
        self.labels: dict[fx.Node, object] = {}

    # ---- union-find over groups ----
    def new(self, units: int, opener: str) -> int:
        self.parent.append(len(self.parent))
        self.units.append(units)
        self.opener.append(opener)
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, node: fx.Node, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if self.FIXED not in (a, b) and self.units[a] != self.units[b]:
            self.refuse(node, f"joins {self.units[a]} units with {self.units[b]}")
        a, b = min(a, b), max(a, b)  # the earliest group (FIXED first) names the union
        self.parent[b] = a
        return a

    def assign(self, node: fx.Node, name: str, axis: int, group: int, block: int = 1) -> None:
        """Axis ``axis`` of state tensor ``name`` holds ``group``'s units (blocks of ``block``)."""
        ndim = self.state[name].dim()
        axes = self.axes.setdefault(name, [None] * ndim)
        blocks = self.blocks.setdefault(name, [1] * ndim)
        if axes[axis] is not None:
            if blocks[axis] != block:
                self.refuse(node, f"reads {name!r} in blocks of {block} and of {blocks[axis]}")
            group = self.union(node, axes[axis], group)
        axes[axis], blocks[axis] = group, block

    def refuse(self, node: fx.Node, why: str) -> None:
        if node.op == "call_module":
            where = f"layer {node.target!r} ({type(self.modules[node.target]).__name__})"
        elif node.op == "call_method":
            where = f"operation {node.name!r} (.{node.target}())"
        else:
            where = f"operation {node.name!r} ({getattr(node.target, '__name__', node.target)})"
        raise _unsupported(self.model, f"{where} {why}")

    def units_of(self, node: object) -> _Units | None:
        label = self.labels.get(node) if isinstance(node, fx.Node) else None
        return label if isinstance(label, _Units) else None

    # ---- the pass ----
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.labels[node] = self.visit(node)

    def visit(self, node: fx.Node) -> object:
        if node.op == "placeholder":
            return None
        if node.op == "get_attr":
            return _Param(node.target) if node.target in self.state else None
        if node.op == "output":
            fx.node.map_arg(node.args, lambda n: self.fix(node, n))
            return None
        inputs = node.all_input_nodes
        first = node.args[0] if node.args else None
        if node.op == "call_module":
            return self.module(node, self.modules[node.target], first)
        t = node.target
        if node.op == "call_method" and t in _SHAPE_METHODS or t is getattr:
            return None
        if t is operator.getitem and self.units_of(first) is None:
            return None
        if not any(self.units_of(n) for n in inputs):
            return None  # no hidden units flow in: nothing of this operation is permuted
        method = node.op == "call_method"
        if (t in _PASS_METHODS) if method else (t in _PASS_FUNCS):
            return self.units_of(first)
        if (t in _BINARY_METHODS) if method else (t in _BINARY_FUNCS):
            return self.elementwise(node, [a for a in node.args[:2] if isinstance(a, fx.Node)])
        if not method and t in _SPATIAL_FUNCS:
            return self.spatial(node, first)
        if (t in _RESHAPE_METHODS) if method else (t in _RESHAPE_FUNCS):
            return self.reshape(node, first)
        if (t in _REDUCE_METHODS) if method else (t in _REDUCE_FUNCS):
            return self.reduce(node, first)
        if method and t in _TRANSPOSE or t in (torch.permute, torch.transpose):
            return self.transpose(node, first)
        if not method and t in _CAT_FUNCS:
            return self.cat(node)
        self.refuse(node, "reads hidden units and is not an operation alignment knows how to permute")

    def fix(self, node: fx.Node, n: fx.Node) -> fx.Node:
        units = self.units_of(n)
        if units is not None:
            self.union(node, self.FIXED, units.group)
        return n

    def module(self, node: fx.Node, m: nn.Module, first: object) -> object:
        units = self.units_of(first)
        name = node.target
        if isinstance(m, nn.modules.conv._ConvNd):
            return self.conv(node, m, units)
        if isinstance(m, nn.Linear):
            return self.linear(node, m, units, len(_shape(node)))
        if type(m).__name__ in _NOISE or isinstance(m, _PASS_MODULES):
            if isinstance(m, nn.PReLU) and m.num_parameters != 1:
                return self.channelwise(node, m, units, ("weight",))
            return units
        if isinstance(m, (nn.Flatten, nn.Unflatten)):
            return self.reshape(node, first)
        if isinstance(m, _SPATIAL_MODULES):
            return self.spatial(node, first)
        if isinstance(m, (_BN, _IN)):
            return self.channelwise(node, m, units, ("weight", "bias", "running_mean", "running_var"))
        if isinstance(m, nn.GroupNorm):
            if units is not None and m.num_groups not in (1, m.num_channels):
                self.refuse(node, f"normalizes {m.num_groups} groups of channels: a permutation would move "
                                  "channels between groups (GroupNorm with 1 group or one per channel is supported)")
            return self.channelwise(node, m, units, ("weight", "bias"))
        if isinstance(m, nn.LayerNorm):
            if units is not None and m.elementwise_affine:
                shape = _shape(first)
                offset = len(shape) - len(m.normalized_shape)
                if units.axis >= offset:
                    for leaf in ("weight", "bias"):
                        if getattr(m, leaf, None) is not None:
                            self.assign(node, f"{name}.{leaf}", units.axis - offset, units.group, units.block)
            return units
        if units is not None or any(self.units_of(n) for n in node.all_input_nodes):
            self.refuse(node, "reads hidden units and is not a layer alignment knows how to permute")
        return None

    def conv(self, node: fx.Node, m: nn.modules.conv._ConvNd, units: _Units | None) -> _Units | None:
        name = node.target
        if units is not None and (units.axis != 1 or units.block != 1):
            self.refuse(node, "reads hidden units on an axis other than its channels")
        if m.groups != 1:
            if units is None:
                return None  # its channels can only move within their groups: none of them is permuted
            if m.transposed or not m.groups == m.in_channels == m.out_channels:
                self.refuse(node, f"is a grouped convolution ({m.groups} groups) that is not depthwise")
            self.assign(node, f"{name}.weight", 0, units.group)  # channel c reads only channel c: its units stay
            if m.bias is not None:
                self.assign(node, f"{name}.bias", 0, units.group)
            return units
        if name not in self.opened:
            self.opened[name] = self.new(m.out_channels, name)
        out = self.opened[name]
        w_out, w_in = (1, 0) if m.transposed else (0, 1)
        self.assign(node, f"{name}.weight", w_out, out)
        if units is not None:
            self.assign(node, f"{name}.weight", w_in, units.group)
        if m.bias is not None:
            self.assign(node, f"{name}.bias", 0, out)
        return _Units(1, out)

    def linear(self, node: fx.Node, m: nn.Linear, units: _Units | None, ndim: int) -> _Units:
        name = node.target
        if units is not None and units.axis != ndim - 1:
            self.refuse(node, "reads hidden units on an axis other than its last (its input features)")
        if name not in self.opened:
            self.opened[name] = self.new(m.out_features, name)
        out = self.opened[name]
        self.assign(node, f"{name}.weight", 0, out)
        if units is not None:
            self.assign(node, f"{name}.weight", 1, units.group, units.block)
        if m.bias is not None:
            self.assign(node, f"{name}.bias", 0, out)
        return _Units(ndim - 1, out)

    def channelwise(self, node: fx.Node, m: nn.Module, units: _Units | None, leaves: tuple[str, ...]) -> object:
        """A layer with one entry per channel (axis 1) in each of ``leaves``."""
        if units is None:
            return None
        if units.axis != 1:
            self.refuse(node, "normalizes an axis other than the one holding the hidden units")
        for leaf in leaves:
            if getattr(m, leaf, None) is not None:
                self.assign(node, f"{node.target}.{leaf}", 0, units.group, units.block)
        return units

    def spatial(self, node: fx.Node, first: object) -> object:
        units, before, after = self.units_of(first), _shape(first), _shape(node)
        if units is None:
            return None
        if units.axis != 1 or units.block != 1 or len(before) < 3 or after is None or after[1] != before[1]:
            self.refuse(node, "acts on the channel axis, not only on the spatial ones")
        return units

    def reshape(self, node: fx.Node, first: object) -> object:
        units, before, after = self.units_of(first), _shape(first), _shape(node)
        if units is None:
            return None
        count = self.units[self.find(units.group)] or before[units.axis] // units.block
        lead = _prod(before[:units.axis])
        entries = units.block * _prod(before[units.axis + 1:])  # per unit, in row-major order
        acc = 1
        for k, size in enumerate(after or ()):
            if acc == lead and size % count == 0 and size // count * _prod(after[k + 1:]) == entries:
                return _Units(k, units.group, size // count)
            acc *= size
            if acc > lead:
                break
        self.refuse(node, f"reshapes {before} to {after}, splitting the axis that holds the hidden units")

    def reduce(self, node: fx.Node, first: object) -> object:
        units, ndim = self.units_of(first), len(_shape(first))
        if units is None:
            return None
        dims = _dims(_arg(node, 1, "dim"), ndim)
        if dims is None or units.axis in dims:
            return None  # a sum over the units does not depend on their order
        if _arg(node, 2, "keepdim", False):
            return units
        return _Units(units.axis - sum(d < units.axis for d in dims), units.group, units.block)

    def transpose(self, node: fx.Node, first: object) -> _Units | None:
        units, ndim = self.units_of(first), len(_shape(first))
        if units is None:
            return None
        rest = [a for a in node.args[1:]]
        if node.target in ("permute", torch.permute):
            order = [d % ndim for d in (rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest)]
            return _Units(order.index(units.axis), units.group, units.block)
        d0, d1 = (d % ndim for d in rest[:2])
        swap = {d0: d1, d1: d0}
        return _Units(swap.get(units.axis, units.axis), units.group, units.block)

    def elementwise(self, node: fx.Node, operands: list[fx.Node]) -> _Units:
        """Broadcast operands: the hidden units must sit on the same output axis; a plain tensor that spans
        that axis fixes the group, a state tensor read directly is permuted along."""
        out = len(_shape(node))
        placed = {(u.axis + out - len(_shape(n)), u.block) for n in operands if (u := self.units_of(n))}
        if len(placed) != 1:
            self.refuse(node, "combines hidden units that lie on different axes")
        (axis, block), group = placed.pop(), self.FIXED
        for n in operands:
            if (u := self.units_of(n)) is not None:
                group = u.group if group == self.FIXED else self.union(node, group, u.group)
        for n in operands:
            shape = _shape(n)
            if self.units_of(n) is not None or shape is None or axis - (out - len(shape)) < 0:
                continue
            own = axis - (out - len(shape))
            if shape[own] == 1:
                continue
            if isinstance(self.labels.get(n), _Param):
                self.assign(node, self.labels[n].name, own, group, block)
            else:
                group = self.union(node, self.FIXED, group)
        return _Units(axis, group, block)

    def cat(self, node: fx.Node) -> object:
        tensors = [n for n in _arg(node, 0, "tensors") if isinstance(n, fx.Node)]
        ndim = len(_shape(node))
        dim = _arg(node, 1, "dim", 0) % ndim
        if any((u := self.units_of(n)) is not None and u.axis == dim for n in tensors):
            self.refuse(node, "concatenates hidden units along their axis (one permutation per axis is supported)")
        return self.elementwise(node, tensors)

    # ---- the result ----
    def layout(self) -> _Layout:
        roots = sorted({self.find(g) for g in range(1, len(self.parent))} - {self.FIXED})
        names = {r: self.opener[r] for r in roots}
        perms = {names[r]: self.units[r] for r in roots}
        alias = {}
        for name, t in self.state.items():
            alias.setdefault((t.data_ptr(), t.shape, t.dtype), name)  # tied tensors share the first name's axes
        axes, blocks = {}, {}
        for name, t in self.state.items():
            src = alias[(t.data_ptr(), t.shape, t.dtype)] if t.numel() else name
            groups = self.axes.get(src, [None] * t.dim())
            axes[name] = tuple(names.get(self.find(g)) if g is not None else None for g in groups)
            kept = [b if p is not None else 1 for b, p in zip(self.blocks.get(src, [1] * t.dim()), axes[name])]
            if any(b != 1 for b in kept):
                blocks[name] = tuple(kept)
        buffers = frozenset(n for n, _ in self.model.named_buffers() if n in self.state)
        spec = PermutationSpec(perms, axes, blocks, buffers)
        return _Layout(spec, self.points(names), self.repair(names))

    def _perm_of(self, node: fx.Node, names: dict[int, str]) -> str | None:
        u = self.units_of(node)
        if u is None or u.block != 1 or u.axis != 1:
            return None
        return names.get(self.find(u.group))

    def points(self, names: dict[int, str]) -> dict[str, list[tuple[str, bool]]]:
        """Modules whose every output holds one permutation's units on axis 1: post-ReLU outputs first, else
        BatchNorm/Conv/Linear outputs (pre-activations) for a group seen only there."""
        calls: dict[str, list[fx.Node]] = {}
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                calls.setdefault(node.target, []).append(node)
        relu_fed, activations, pre = {}, {}, {}
        for name, nodes in calls.items():
            perms = {self._perm_of(n, names) for n in nodes}
            if len(perms) != 1 or None in perms:
                continue
            (p,) = perms
            m = self.modules[name]
            users = [u for n in nodes for u in n.users]
            if isinstance(m, _ACTIVATIONS):
                feeds = {i.target for n in nodes for i in n.all_input_nodes if i.op == "call_module"}
                activations.setdefault(p, []).append((name, feeds))
            elif users and all(_is_relu(u, self.modules) for u in users):
                relu_fed.setdefault(p, []).append((name, True))
            elif isinstance(m, (*_NORMS, nn.modules.conv._ConvNd, nn.Linear)):
                pre.setdefault(p, []).append((name, False))
        fed = {name for pts in relu_fed.values() for name, _ in pts}
        out = {}
        for p in sorted(set(names.values())):
            chosen = relu_fed.get(p, []) + [(n, False) for n, feeds in activations.get(p, []) if not (feeds and feeds <= fed)]
            if not chosen:  # normalized outputs if there are any, else the layers' own
                chosen = [pt for pt in pre.get(p, []) if isinstance(self.modules[pt[0]], _NORMS)] or pre.get(p, [])
            if chosen:
                out[p] = chosen
        return out

    def repair(self, names: dict[int, str]) -> list[tuple[str, str]]:
        """Every BatchNorm (its statistics reset), and hidden Conv/Linear layers whose output no norm follows."""
        seen, out = set(), []
        for node in self.gm.graph.nodes:
            if node.op != "call_module" or node.target in seen:
                continue
            seen.add(node.target)
            m = self.modules[node.target]
            if isinstance(m, _BN) and m.track_running_stats:
                out.append((node.target, "bn"))
            elif (isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and self._perm_of(node, names)
                  and not any(u.op == "call_module" and isinstance(self.modules[u.target], _NORMS)
                              for u in node.users)):
                out.append((node.target, "fused"))
        return out


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.ReLU)
    return node.target in _RELUS or (node.op == "call_method" and node.target in ("relu", "relu_"))


def _prod(sizes: object) -> int:
    out = 1
    for s in sizes:
        out *= s
    return out
