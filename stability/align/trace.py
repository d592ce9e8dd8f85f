"""Permutation specs of any model, derived from its ``torch.fx`` graph and checked on an example input.

The zoo's layouts are hand-derived in ``spec``; any other model (a registered plugin, ``torchvision/*``,
``timm/*``) is traced with ``torch.fx`` and its hidden units found by union-find over *unit axes*:

- every Conv/Linear layer's output axis opens a group of units (a layer called twice keeps one group);
- element-wise operations (activations, dropout, softmax, identity), BatchNorm and InstanceNorm, GroupNorm
  with 1 group or one group per channel, LayerNorm, pooling, padding and upsampling pass a group on;
- a residual addition (``+``, ``+=``, ``torch.add``, ``*`` of a gate) joins the groups it adds;
- flattening or reshaping turns a channel into a block of consecutive entries (``H*W`` after a
  flatten, 1 after global pooling), from the shapes ``ShapeProp`` records on the example input;
- a depthwise convolution (``groups == in == out``) keeps its input's group;
- the network's input and output are never permuted: a group that reaches the output is fixed.

Anything else that reads hidden units (attention, a concatenation along the channels, a grouped
convolution, GroupNorm with 1 < groups < channels, an operation it does not know, a layer with its own
parameters it does not know) is refused with a ``ConfigError`` naming the layer or operation. Every
traced spec is then checked: a random permutation of a perturbed copy of the weights must leave the
outputs unchanged in eval mode and with BatchNorm on batch statistics, or the model is refused, naming
the first layer whose output changed.
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor, fx, nn
from torch.func import functional_call
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils._pytree import tree_leaves

from ..errors import ConfigError
from . import spec as _spec
from ._graph import _BN, _IN, _Analysis, _Tracer
from .spec import (
    PermutationSpec,
    _Layout,
    _permute_axis,
    _unsupported,
    apply_permutation,
    random_permutation,
)

__all__ = ["traced_layout", "traced_spec"]

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (structure, layout)
_CHECK_BATCH = 4  # BatchNorm on batch statistics needs a few examples
_MAX_BATCH = 16  # the example's shapes are what matter: more rows only slow the check down
_RTOL = 1e-4


def traced_spec(model: nn.Module, example_input: Tensor | None = None) -> PermutationSpec:
    """The hidden-unit permutations of any model torch.fx can trace, checked on ``example_input``."""
    return traced_layout(model, example_input).spec


def traced_layout(model: nn.Module, example_input: Tensor | None = None) -> _Layout:
    """The spec of ``model`` traced with torch.fx, plus its observation and correction points.

    ``example_input``: a batch the model takes (its shapes say how flattened feature maps are laid out);
    by default ``model.input_shape`` or the first Conv/Linear layer's inputs (32x32 images), random. The
    spec is checked before it is returned (a random permutation must leave the outputs unchanged); the
    result is remembered per model until its layers or tensor shapes change.
    """
    structure = (tuple((n, type(m)) for n, m in model.named_modules()),
                 tuple((k, tuple(v.shape)) for k, v in model.state_dict().items()))
    hit = _CACHE.get(model)
    if hit is not None and hit[0] == structure:
        return hit[1]
    x = _example(model, example_input)
    gm = _trace(model)
    if len([n for n in gm.graph.nodes if n.op == "placeholder"]) != 1:
        raise _unsupported(model, "its forward takes other than one input tensor")
    with _modes(model, train=False), torch.no_grad():
        try:
            ShapeProp(gm).propagate(x)
        except Exception as exc:
            raise ConfigError(f"example_input: {_label(model)} fails on inputs of shape {tuple(x.shape)} "
                              f"({type(exc).__name__}: {exc}); pass example_input=<a batch it takes>") from exc
    analysis = _Analysis(model, gm)
    analysis.run()
    layout = analysis.layout()
    if not layout.spec.perms:
        raise _unsupported(model, "it has no hidden units to permute (no Conv/Linear layer before its output layer)")
    _check(model, layout, x, analysis)
    _CACHE[model] = (structure, layout)
    return layout


def _label(model: nn.Module) -> str:
    name = getattr(model, "name", None)
    return f"model {name!r} ({type(model).__name__})" if isinstance(name, str) else f"model {type(model).__name__}"


def _trace(model: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    try:
        with _modes(model, train=False):
            graph = tracer.trace(model)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise _unsupported(model, f"torch.fx cannot trace it ({type(exc).__name__}: {first}): its forward must "
                                  "run on symbolic tensors, with no control flow that depends on the data") from exc
    return fx.GraphModule(tracer.root, graph)


def _example(model: nn.Module, x: Tensor | None) -> Tensor:
    """``x`` (or a random input of the model's shape) topped up with random rows to ``_CHECK_BATCH`` examples."""
    ref = next((t for t in model.state_dict().values() if t.is_floating_point()), torch.zeros(()))
    g = torch.Generator().manual_seed(0)
    if x is None:
        shape = getattr(model, "input_shape", None)
        if not (isinstance(shape, tuple) and shape and all(isinstance(d, int) for d in shape)):
            shape = _first_input_shape(model)
        return torch.randn(_CHECK_BATCH, *shape, generator=g).to(ref)
    if not isinstance(x, Tensor) or x.dim() < 1 or len(x) == 0:
        raise ConfigError(f"example_input: expected a non-empty batch tensor, got {type(x).__name__}")
    x = x.detach()[:_MAX_BATCH].to(device=ref.device, dtype=ref.dtype if x.is_floating_point() else x.dtype)
    if len(x) < _CHECK_BATCH and x.is_floating_point():
        scale = float(x.float().std()) if x.numel() > 1 else 1.0
        more = torch.randn(_CHECK_BATCH - len(x), *x.shape[1:], generator=g).to(x) * (scale or 1.0) + x.mean()
        x = torch.cat([x, more])
    return x


def _first_input_shape(model: nn.Module) -> tuple[int, ...]:
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return (m.in_channels, *[32 if len(m.kernel_size) < 3 else 16] * len(m.kernel_size))
        if isinstance(m, nn.Linear):
            return (m.in_features,)
    raise ConfigError(f"example_input: cannot tell what inputs {_label(model)} takes (it has no Conv/Linear "
                      "layer); pass example_input=<a batch it takes>")


class _modes:
    """``model`` in eval mode, or in eval mode but with its norm layers on batch statistics (``train``);
    every module's mode restored after."""

    def __init__(self, model: nn.Module, train: bool) -> None:
        self.model, self.train = model, train

    def __enter__(self) -> None:
        self.saved = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        if self.train:  # dropout stays off: its masks would differ between the two runs
            for m in self.model.modules():
                if isinstance(m, (_BN, _IN)):
                    m.train()

    def __exit__(self, *exc: object) -> None:
        for m, mode in self.saved:
            m.training = mode


def _run(model: nn.Module, state: dict[str, Tensor], buffers: frozenset[str], x: Tensor, train: bool,
         hooks: dict[str, list] | None = None) -> list[Tensor]:
    state = {k: v.clone() if k in buffers else v for k, v in state.items()}  # a train pass updates running stats
    handles = []
    if hooks is not None:
        for name, seen in hooks.items():
            handles.append(model.get_submodule(name).register_forward_hook(
                lambda _m, _a, out, seen=seen: seen.append(out.detach().clone()) if isinstance(out, Tensor) else None))
    try:
        with _modes(model, train), torch.no_grad():
            return [t for t in tree_leaves(functional_call(model, state, (x,))) if isinstance(t, Tensor)]
    finally:
        for h in handles:
            h.remove()


def _perturbed(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every floating tensor moved by seeded noise (running variances kept positive), so that no layer's
    units are alike and a wrongly permuted tensor shows in the outputs."""
    g = torch.Generator().manual_seed(1)
    out = {}
    for k, v in state.items():
        v = v.detach()
        if not v.is_floating_point() or v.numel() == 0:
            out[k] = v.clone()
            continue
        noise = torch.randn(v.shape, generator=g).to(v)
        scale = max(float(v.float().std()) if v.numel() > 1 else 0.0, 0.1)
        out[k] = v + 0.1 * scale * (noise.abs() if k.endswith("running_var") else noise)
    return out


def _close(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    atol = _RTOL * max(1.0, float(b.abs().max()) if b.numel() else 0.0)
    return bool(torch.allclose(a, b, rtol=_RTOL, atol=atol))


def _check(model: nn.Module, layout: _Layout, x: Tensor, analysis: _Analysis) -> None:
    """ConfigError unless a random permutation leaves the outputs unchanged (eval and batch statistics)."""
    spec = layout.spec
    state = _perturbed(model.state_dict())
    perms = random_permutation(spec, torch.Generator().manual_seed(2))
    permuted = apply_permutation(spec, perms, state)
    for train in (False, True):
        ref = _run(model, state, spec.buffers, x, train)
        out = _run(model, permuted, spec.buffers, x, train)
        if len(ref) == len(out) and all(_close(a, b) for a, b in zip(out, ref)):
            continue
        mode = "with BatchNorm on batch statistics" if train else "in eval mode"
        where = _first_changed(model, analysis, spec, perms, state, permuted, x, train)
        raise _unsupported(model, f"its traced permutation spec changes {where} {mode}, so some operation "
                                  "mixes hidden units in a way alignment does not understand")


def _first_changed(model: nn.Module, analysis: _Analysis, spec: PermutationSpec, perms: dict[str, Tensor],
                   state: dict[str, Tensor], permuted: dict[str, Tensor], x: Tensor, train: bool) -> str:
    """The first layer (in forward order) whose output differs from the permuted original; else 'the outputs'."""
    nodes = {}
    for node in analysis.gm.graph.nodes:
        if node.op == "call_module":
            nodes.setdefault(node.target, node)
    hooks_a = {name: [] for name in nodes}
    hooks_b = {name: [] for name in nodes}
    _run(model, state, spec.buffers, x, train, hooks_a)
    _run(model, permuted, spec.buffers, x, train, hooks_b)
    names = {analysis.find(g): analysis.opener[analysis.find(g)] for g in range(1, len(analysis.parent))}
    for name, node in nodes.items():
        if not hooks_a[name] or not hooks_b[name]:
            continue
        expected = hooks_a[name][0]
        units = analysis.units_of(node)
        p = names.get(analysis.find(units.group)) if units is not None else None
        if p is not None and p in perms:
            expected = _permute_axis(expected, units.axis, perms[p], units.block)
        if not _close(hooks_b[name][0], expected):
            return f"the output of layer {name!r} ({type(analysis.modules[name]).__name__})"
    return "the outputs"


_spec._traced_layout = traced_layout
