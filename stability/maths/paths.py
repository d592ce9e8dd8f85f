"""Networks on interpolation paths evaluated over a stream of batches: the one evaluation the suite's curves use.

Data come as ``Batches``: a pair of tensors ``(x, y)`` (cut into batches), a ``DataLoader``, any re-iterable of
``(x, y)`` batches, a function returning a fresh iterator, or a one-shot iterator (a generator: read once and
kept, as it is read, for evaluations that need a second pass). Nothing assumes the split fits in memory.

``evaluate_pairs`` evaluates θ = (1 − α)·θ_i + α·θ_j for any list of (i, j, α) over any number of networks in
one pass over the data, every member of a batch stacked on one axis (``engine.StackedModel``). It does less work
than evaluating each θ(α) from scratch where the maths allow: the layer that reads the input (a Linear or a
convolution applied to the input or a reshaped view of it) computes W(α)·x + b(α) = (1 − α)·(W_i·x + b_i) +
α·(W_j·x + b_j), so two products per batch (one per network) give that layer at every α. For LeNet-300-100 the
first layer is 88% of the multiply-adds. The results are those of evaluating each θ(α) to float rounding.

``evaluate_combinations`` is the general form: member m is Σ_k c_mk·θ_k over any K base tensors dicts (networks,
or directions), for planes (θ_0 + u·d_1 + v·d_2), Bezier curves ((1 − t)²·θ_a + 2t(1 − t)·θ_m + t²·θ_b) and
layer-wise paths; the input layer's output is Σ_k c_mk·(W_k·x + b_k), K products per batch for every member.

Both evaluate in float32 unless the ``StackedModel`` was configured with ``runtime.eval_precision = "bf16"``
(``StackedModel.configure_evaluation``): then the forward passes run in bf16 autocast, while the losses and the
combination of the bases' input-layer outputs stay float32. ``reset_bn`` never autocasts.

``reset_bn`` recomputes BatchNorm running statistics of stacked members over batches (cumulative average:
momentum 1/(j+1) at batch j, the same for every member).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..data import StreamedInputs, in_chunks
from ..engine import StackedModel
from ..engine.precision import autocast
from ..errors import ConfigError

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


class Batches:
    """Data as a stream of ``(x, y)`` batches that can be read more than once.

    ``source``: a pair of tensors ``(x, y)`` (cut into batches of ``batch_size``), a ``DataLoader`` or any
    re-iterable of batches (each a tuple or list whose first two items are the inputs and targets, as
    ``DataLoader`` gives), a zero-argument function returning an iterator of batches, or a one-shot iterator
    (a generator), which is read once and its batches kept as they are read.
    """

    def __init__(self, source: object, batch_size: int = 1000, what: str = "data") -> None:
        if isinstance(source, Batches):
            source = source._source
        self.what = what
        self._cache: list[Batch] | None = None
        self._one_shot: Iterator | None = None
        self._source = source
        if _is_pair(source):
            x, y = source  # type: ignore[misc]
            if len(x) != len(y):
                raise ConfigError(f"{what}: x has {len(x)} examples but y has {len(y)}")
            if batch_size < 1:
                raise ConfigError(f"{what}: batch size must be at least 1, got {batch_size}")
            if isinstance(x, StreamedInputs):  # a streamed split: read batch by batch on every pass, never held
                self._source = lambda: zip(in_chunks(x, batch_size), y.split(batch_size))
            else:
                self._cache = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        elif callable(source) and not hasattr(source, "__iter__"):
            pass
        elif isinstance(source, Iterator):
            self._one_shot = source
            self._cache = []
        elif isinstance(source, Iterable) and not isinstance(source, (str, bytes, Tensor)):
            pass
        else:
            raise ConfigError(f"{what}: expected a DataLoader, an iterable of (x, y) batches or a pair of tensors "
                              f"(x, y), got {type(source).__name__}")

    def __iter__(self) -> Iterator[Batch]:
        if self._one_shot is not None:
            assert self._cache is not None
            yield from self._cache
            for batch in self._one_shot:  # the rest of a one-shot iterator, kept for the next pass
                pair = _batch(batch, self.what)
                self._cache.append(pair)
                yield pair
            self._one_shot = None
            return
        if self._cache is not None:
            yield from self._cache
            return
        source = self._source() if callable(self._source) and not hasattr(self._source, "__iter__") else self._source
        for batch in source:  # type: ignore[union-attr]
            yield _batch(batch, self.what)

    def take(self, n: int) -> Batch:
        """The first ``n`` examples (fewer if the data hold fewer), concatenated: for alignment subsets."""
        xs, ys, have = [], [], 0
        for x, y in self:
            xs.append(x[: n - have])
            ys.append(y[: n - have])
            have += len(xs[-1])
            if have >= n:
                break
        if not xs:
            raise ConfigError(f"{self.what}: holds no examples")
        return torch.cat(xs), torch.cat(ys)

    def count(self) -> int:
        """Examples in one pass."""
        return sum(len(y) for _, y in self)


def _is_pair(source: object) -> bool:
    return (isinstance(source, (tuple, list)) and len(source) == 2 and isinstance(source[0], (Tensor, StreamedInputs))
            and isinstance(source[1], Tensor) and source[0].dim() >= 1 and source[1].dim() >= 1)


def _batch(batch: object, what: str) -> Batch:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], Tensor) \
            and isinstance(batch[1], Tensor):
        return batch[0], batch[1]
    raise ConfigError(f"{what}: each batch must be a tuple (x, y) of tensors (as a DataLoader of a TensorDataset "
                      f"gives), got {type(batch).__name__}")


# ---------------------------------------------------------------- the layer that reads the input


@dataclass(frozen=True)
class InputLayer:
    """A Linear or convolution whose input is the network's input (or a reshaped view of it)."""

    name: str
    shape: tuple[int, ...]  # the layer's input per example (the view of x it reads)

    @property
    def prefix(self) -> str:
        return self.name + "."


_LINEAR_IN_ALPHA = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def input_layer(model: nn.Module, x: Tensor) -> InputLayer | None:
    """The layer whose output is affine in its own weights alone: a Linear or convolution (of its standard kind)
    called once, on a contiguous view of the input ``x`` itself. None when there is no such layer."""
    calls: list[tuple[str, Tensor]] = []
    hooks = []
    for name, m in model.named_modules():
        if type(m) in _LINEAR_IN_ALPHA:
            hooks.append(m.register_forward_pre_hook(lambda mod, args, name=name: calls.append((name, args[0]))))
    probe = x[:2].contiguous()
    try:
        with torch.no_grad():
            model.eval()
            model(probe)
    finally:
        for h in hooks:
            h.remove()
    if not calls:
        return None
    name, inp = calls[0]
    if (not isinstance(inp, Tensor) or sum(1 for n, _ in calls if n == name) != 1 or not inp.is_contiguous()
            or inp.data_ptr() != probe.data_ptr() or inp.numel() != probe.numel() or inp.shape[0] != probe.shape[0]):
        return None
    module = model.get_submodule(name)
    own = {id(p) for p in module.parameters(recurse=False)}
    shared = [n for n, p in model.named_parameters(remove_duplicate=False)
              if id(p) in own and not n.startswith(name + ".")]
    if shared or any(not isinstance(v, nn.Parameter) for v in module._parameters.values() if v is not None):
        return None
    return InputLayer(name, tuple(inp.shape[1:]))


def _runs(left: Sequence[int], right: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """Contiguous runs ``(start, stop, i, j)`` of members on the same pair of ends."""
    runs: list[tuple[int, int, int, int]] = []
    for m, (i, j) in enumerate(zip(left, right)):
        if runs and runs[-1][1] == m and runs[-1][2:] == (i, j):
            runs[-1] = (runs[-1][0], m + 1, i, j)
        else:
            runs.append((m, m + 1, i, j))
    return runs


def _combine(ends: Sequence[Tensor], runs: Sequence[tuple[int, int, int, int]], w: Tensor) -> Tensor:
    """``[N, ...]`` with member m = (1 − w_m)·ends[i] + w_m·ends[j] (exactly ends[i] at w = 0 and ends[j] at w = 1),
    written run by run without gathering copies of the ends."""
    shape = ends[0].shape
    out = torch.empty(len(w), *shape, dtype=ends[0].dtype, device=ends[0].device)
    w = w.to(ends[0].dtype).view(-1, *([1] * len(shape)))
    for start, stop, i, j in runs:
        part = out[start:stop]
        torch.mul(ends[i], 1 - w[start:stop], out=part)
        part.addcmul_(ends[j].expand_as(part), w[start:stop])
    return out


class _AffineOutputs:
    """The input layer's output at every member (i, j, α): (1 − α)·out_i + α·out_j from each network's output."""

    def __init__(self, layer: InputLayer, outs: Sequence[Tensor], left: Sequence[int], right: Sequence[int],
                 alpha: Tensor):
        self.name, self.prefix, self.count = layer.name, layer.prefix, len(alpha)
        self.outs, self.left, self.right, self.alpha = outs, list(left), list(right), alpha

    def member(self, i: int) -> Tensor:
        a = self.alpha[i].to(self.outs[0].dtype)
        return (1 - a) * self.outs[self.left[i]] + a * self.outs[self.right[i]]

    def stacked(self) -> Tensor:
        return _combine(self.outs, _runs(self.left, self.right), self.alpha)


class _CombinedOutputs:
    """The input layer's output at every member m: Σ_k c_mk·out_k from each base's output (exact: the layer's output
    is linear in its weight and bias jointly)."""

    def __init__(self, layer: InputLayer, outs: Tensor, coeffs: Tensor):
        """``outs``: the bases' outputs stacked ``[K, B, ...]``; ``coeffs``: ``[M, K]``."""
        self.name, self.prefix, self.count = layer.name, layer.prefix, coeffs.shape[0]
        self.outs, self.coeffs = outs, coeffs.to(outs.dtype)

    def member(self, i: int) -> Tensor:
        return torch.tensordot(self.coeffs[i], self.outs, dims=1)

    def stacked(self) -> Tensor:
        return torch.tensordot(self.coeffs, self.outs, dims=1)


# ---------------------------------------------------------------- members and their evaluation


def combine_members(bases: Sequence[Mapping[str, Tensor]], coeffs: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """``{name: [M, ...]}`` with member m = Σ_k coeffs[m, k]·bases[k][name] for float tensors (``coeffs``: [M, K]);
    the others (BatchNorm's ``num_batches_tracked``) are ``bases[0]``'s."""
    m = coeffs.shape[0]
    out = {}
    for k in names:
        first = bases[0][k]
        if not first.is_floating_point():
            out[k] = first.unsqueeze(0).expand(m, *first.shape).clone()
            continue
        c = coeffs.to(first.dtype).to(first.device)
        out[k] = torch.tensordot(c, torch.stack([b[k] for b in bases]), dims=1)
    return out




def stack_members(ends: Sequence[Mapping[str, Tensor]], members: Sequence[tuple[int, int, float]],
                  names: Sequence[str]) -> dict[str, Tensor]:
    """``{name: [N, ...]}`` with member m = (1 − α)·ends[i] + α·ends[j] for m = (i, j, α) (float tensors; the
    others, e.g. BatchNorm's ``num_batches_tracked``, are network i's)."""
    left = [i for i, _, _ in members]
    runs = _runs(left, [j for _, j, _ in members])
    out = {}
    for k in names:
        if not ends[0][k].is_floating_point():
            out[k] = torch.stack([ends[i][k] for i in left])
            continue
        w = torch.tensor([a for _, _, a in members], dtype=torch.float64, device=ends[0][k].device)
        out[k] = _combine([e[k] for e in ends], runs, w)
    return out


@torch.no_grad()
def reset_bn(sm: StackedModel, params: Mapping[str, Tensor], buffers: dict[str, Tensor], batches: Iterable[Batch],
             *, max_members: int = 64, limit: int | None = None) -> int:
    """Recompute the BatchNorm running statistics of stacked members in place over ``batches`` (the first
    ``limit`` of them): a cumulative average (momentum 1/(j+1) at batch j, the same for every member), the model
    in train mode. Returns the number of batches read (0 when the model has no BatchNorm)."""
    bns = [m for m in sm.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    for name, buf in buffers.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("running_mean", "num_batches_tracked"):
            buf.zero_()
        elif leaf == "running_var":
            buf.fill_(1.0)
    n = next(iter(params.values())).shape[0]
    old = [m.momentum for m in bns]
    read = 0
    device = next(iter(params.values())).device
    try:
        for j, (x, _) in enumerate(itertools.islice(batches, limit)):
            for m in bns:
                m.momentum = 1.0 / (j + 1)
            x = x.to(device)
            for start in range(0, n, max_members):
                part = slice(start, start + max_members)
                sm.logits({k: v[part] for k, v in params.items()}, {k: v[part] for k, v in buffers.items()}, x,
                          train=True, shared_input=True)
            read += 1
    finally:
        for m, mom in zip(bns, old):
            m.momentum = mom
    if read == 0:
        raise ConfigError("bn_data: holds no batches to recompute BatchNorm statistics on")
    return read


def _input_outputs(sm: StackedModel, layer: InputLayer, ends: Sequence[Mapping[str, Tensor]], x: Tensor) -> list[Tensor]:
    module = sm.model.get_submodule(layer.name)
    x_in = x.reshape(x.shape[0], *layer.shape)
    keys = [k for k in ends[0] if k.startswith(layer.prefix)]
    return [functional_call(module, {k[len(layer.prefix):]: e[k] for k in keys}, (x_in,)) for e in ends]


@torch.no_grad()
def evaluate_stream(sm: StackedModel, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
                    batches: Iterable[Batch], *, loss_fn: LossFn | None = None, max_members: int = 64,
                    ends: Sequence[Mapping[str, Tensor]] | None = None,
                    members: Sequence[tuple[int, int, float]] | None = None,
                    layer: InputLayer | None = None, tally: list[Tensor] | None = None) -> tuple[list[float], list[float]]:
    """Mean loss and error (fraction misclassified) of each stacked member over every batch, eval mode.

    ``loss_fn(logits, y)`` is the mean loss of a batch (default cross-entropy); the error counts ``argmax`` of
    the logits against integer labels ``y`` (NaN when the targets are not class labels). With ``ends``,
    ``members`` and ``layer``, the members lie on paths between the ``ends`` and ``layer``'s output is formed from
    the ends' outputs (see the module's docstring). ``tally``: each batch's label counts are appended to it
    (``torch.bincount`` of integer labels), for the chance level of the data.
    """
    n = next(iter(params.values())).shape[0]
    device = next(iter(params.values())).device
    loss = torch.zeros(n, dtype=torch.float64, device=device)
    wrong = torch.zeros(n, dtype=torch.float64, device=device)
    if layer is None:
        return _stream(sm, params, buffers, batches, loss_fn, max_members, tally, loss, wrong, None, None)
    assert ends is not None and members is not None
    left = [i for i, _, _ in members]
    right = [j for _, j, _ in members]
    alpha = torch.tensor([a for _, _, a in members], dtype=torch.float64, device=device)
    return _stream(sm, params, buffers, batches, loss_fn, max_members, tally, loss, wrong,
                   lambda x: _input_outputs(sm, layer, ends, x),
                   lambda outs, part: _AffineOutputs(layer, outs, left[part], right[part], alpha[part]))


def _stream(sm: StackedModel, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], batches: Iterable[Batch],
            loss_fn: LossFn | None, max_members: int, tally: list[Tensor] | None, loss: Tensor, wrong: Tensor,
            outputs: Callable[[Tensor], Any] | None,
            given: Callable[[Any, slice], object] | None) -> tuple[list[float], list[float]]:
    """The batch loop of ``evaluate_stream`` and ``evaluate_combinations``: ``outputs(x)`` the bases' input-layer
    outputs of a batch, ``given(outs, part)`` the members' (None: every member computes its own)."""
    n = loss.shape[0]
    device = loss.device
    classify = True
    seen = 0
    # ``sm.eval_dtype`` (``runtime.eval_precision`` = bf16, set by ``StackedModel.configure``): the forward passes
    # in bf16 autocast; the bases' input-layer outputs are combined, and the losses taken, in float32. None (the
    # default): plain float32, no autocast at all.
    low = sm.eval_dtype
    for x, y in batches:
        if tally is not None and not y.is_floating_point() and y.dim() == 1 and len(y):
            tally.append(torch.bincount(y.detach().to("cpu", torch.long)))
        x, y = x.to(device), y.to(device)
        outs = None
        if outputs is not None:
            with autocast(device, low):
                outs = outputs(x)
            if low is not None:
                outs = [o.float() for o in outs] if isinstance(outs, list) else outs.float()
        for start in range(0, n, max_members):
            part = slice(start, start + max_members)
            first = given(outs, part) if given is not None and outs is not None else None
            with autocast(device, low):
                out = sm.logits({k: v[part] for k, v in params.items()}, {k: v[part] for k, v in buffers.items()},
                                x, train=False, shared_input=True, first=first)
            if low is not None:
                out = out.float()
            m = out.shape[0]
            if loss_fn is None:
                ce = F.cross_entropy(out.flatten(0, 1), y.repeat(m), reduction="none").view(m, -1)
                loss[part] += ce.sum(1).double()
            else:
                loss[part] += torch.stack([loss_fn(o, y).double() for o in out]) * len(y)
            if classify and not y.is_floating_point() and out.dim() == 3 and y.dim() == 1:
                wrong[part] += (out.argmax(-1) != y).sum(1).double()
            else:
                classify = False
        seen += len(y)
    if seen == 0:
        nan = [float("nan")] * n
        return nan, nan
    errors = (wrong / seen).tolist() if classify else [float("nan")] * n
    return (loss / seen).tolist(), errors


def _members(sm: StackedModel, batches: Batches | list, device: torch.device, input_layer_outputs: bool, bn: str,
             bn_batches: Iterable[Batch] | None, bn_limit: int | None, max_members: int,
             build: Callable[[Sequence[str]], dict[str, Tensor]]) -> tuple[InputLayer | None, dict, dict]:
    """The input layer whose output is formed from the bases' (None: every member computes it), and the members'
    stacked parameters and buffers (``build(names)``), BatchNorm statistics recomputed when ``bn`` is ``reset``."""
    layer = None
    if input_layer_outputs:
        for x, _ in batches:
            layer = input_layer(sm.model, x.to(device))
            break
        if layer is not None and sm._fc is not None and layer.name != "fc.0":
            layer = None
    reset = bn == "reset" and bool(sm.buffer_names)
    # the input layer's own parameters are not needed at every member when its output is formed from the bases'
    names = [k for k in sm.param_names if reset or layer is None or not k.startswith(layer.prefix)]
    params, buffers = build(names), build(sm.buffer_names)
    if reset:
        if bn_batches is None:
            raise ConfigError("bn: 'reset' needs data to recompute BatchNorm statistics on")
        reset_bn(sm, params, buffers, bn_batches, max_members=max_members, limit=bn_limit)
    return layer, params, buffers


def evaluate_pairs(sm: StackedModel, ends: Sequence[Mapping[str, Tensor]], members: Sequence[tuple[int, int, float]],
                   batches: Iterable[Batch], *, bn: str = "interpolate", bn_batches: Iterable[Batch] | None = None,
                   bn_limit: int | None = None, loss_fn: LossFn | None = None, max_members: int = 64,
                   input_layer_outputs: bool = True, tally: list[Tensor] | None = None) -> tuple[list[float], list[float]]:
    """Loss and error of θ = (1 − α)·θ_i + α·θ_j for every member (i, j, α), in one pass over ``batches``.

    ``bn``: ``interpolate`` (BatchNorm buffers interpolated as the parameters) or ``reset`` (recomputed for each
    member over ``bn_batches``, the first ``bn_limit`` of them). ``input_layer_outputs``: form the input layer's
    output from the ends' (False: every member computes it, for checks).
    """
    batches = batches if isinstance(batches, (Batches, list)) else Batches(batches)
    device = next(iter(ends[0].values())).device
    layer, params, buffers = _members(sm, batches, device, input_layer_outputs, bn, bn_batches, bn_limit, max_members,
                                      lambda names: stack_members(ends, members, names))
    return evaluate_stream(sm, params, buffers, batches, loss_fn=loss_fn, max_members=max_members, ends=ends,
                           members=members, layer=layer, tally=tally)


def evaluate_combinations(sm: StackedModel, bases: Sequence[Mapping[str, Tensor]], coeffs: Tensor | Sequence,
                          batches: Iterable[Batch], *, bn: str = "interpolate",
                          bn_batches: Iterable[Batch] | None = None, bn_limit: int | None = None,
                          loss_fn: LossFn | None = None, max_members: int = 64, input_layer_outputs: bool = True,
                          tally: list[Tensor] | None = None) -> tuple[list[float], list[float]]:
    """Loss and error of θ_m = Σ_k coeffs[m, k]·bases[k] for every row m of ``coeffs`` ([M, K]), in one pass.

    ``bases``: K dicts holding every parameter and buffer of ``sm``'s model (networks, or directions whose
    BatchNorm buffers are zero). ``bn``: ``interpolate`` (the buffers combined as the parameters) or ``reset``
    (recomputed for each member over ``bn_batches``, the first ``bn_limit``). ``input_layer_outputs``: form the
    input layer's output from the bases' (K products per batch; False: every member computes it, for checks).
    """
    batches = batches if isinstance(batches, (Batches, list)) else Batches(batches)
    device = next(iter(bases[0].values())).device
    coeffs = torch.as_tensor(coeffs, dtype=torch.float64, device=device)
    if coeffs.dim() != 2 or coeffs.shape[1] != len(bases):
        raise ConfigError(f"coeffs: expected [members, {len(bases)}] (one coefficient per base), got "
                          f"{list(coeffs.shape)}")
    layer, params, buffers = _members(sm, batches, device, input_layer_outputs, bn, bn_batches, bn_limit, max_members,
                                      lambda names: combine_members(bases, coeffs, names))
    n = coeffs.shape[0]
    loss = torch.zeros(n, dtype=torch.float64, device=device)
    wrong = torch.zeros(n, dtype=torch.float64, device=device)
    return _stream(sm, params, buffers, batches, loss_fn, max_members, tally, loss, wrong,
                   (lambda x: torch.stack(_input_outputs(sm, layer, bases, x))) if layer is not None else None,
                   (lambda outs, part: _CombinedOutputs(layer, outs, coeffs[part])) if layer is not None else None)


def chance_of(tally: list[Tensor]) -> float | None:
    """The error of always predicting the most frequent class, from ``evaluate_stream``'s tally (None: no labels)."""
    if not tally:
        return None
    size = max(len(t) for t in tally)
    counts = sum(torch.nn.functional.pad(t, (0, size - len(t))) for t in tally)
    return 1.0 - float(counts.max()) / float(counts.sum())


__all__ = [
    "Batch",
    "Batches",
    "InputLayer",
    "LossFn",
    "chance_of",
    "combine_members",
    "evaluate_combinations",
    "evaluate_pairs",
    "evaluate_stream",
    "input_layer",
    "reset_bn",
    "stack_members",
]
