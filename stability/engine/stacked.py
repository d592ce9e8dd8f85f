"""``StackedModel``: one template module run over stacked member tensors ``{name: [N, ...]}``."""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ..data import in_chunks
from ..models import FullyConnected, dropout_noise, has_dropout
from . import distributed
from .precision import Compiled, autocast, compute_dtype


class _StackedLinear(torch.autograd.Function):
    """``x @ w^T + b`` per member: x ``[N, B, in]``, w ``[N, out, in]``, b ``[N, out]``.

    Written out (rather than left to ``vmap(F.linear)``) so that the weight gradient comes
    out of one ``bmm`` already in the weight's own layout: autograd then hands it to the
    parameter as is instead of copying a transposed gradient into place every step.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor) -> Tensor:  # type: ignore[override]
        if torch.is_autocast_enabled(x.device.type):
            # Under autocast the backward (run outside it) must see the same low-precision operands;
            # autograd casts the gradients back to the float32 weights' dtype.
            dt = torch.get_autocast_dtype(x.device.type)
            x, w, b = x.to(dt), w.to(dt), b.to(dt)
        ctx.save_for_backward(x, w)
        return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # type: ignore[override]
        x, w = ctx.saved_tensors
        gx = torch.bmm(g, w) if ctx.needs_input_grad[0] else None
        gw = torch.bmm(g.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        gb = g.sum(1) if ctx.needs_input_grad[2] else None
        return gx, gw, gb


def _fc_plan(model: nn.Module) -> list[tuple[str, str]] | None:
    """(weight, bias) names of a plain ReLU MLP (``models.FullyConnected``), else None."""
    if type(model) is not FullyConnected or has_dropout(model):
        return None
    if not all(isinstance(layer, nn.Linear) and layer.bias is not None for layer in model.fc):
        return None
    return [(f"fc.{i}.weight", f"fc.{i}.bias") for i in range(len(model.fc))]


class GivenOutput(Protocol):
    """The output of module ``name`` for every member, known without running it (``StackedModel.logits(first=)``)."""

    name: str
    count: int  # members

    @property
    def prefix(self) -> str:
        """``name + "."``: the module's parameters' names start with it."""

    def member(self, i: int) -> Tensor:
        """Member i's output ``[B, ...]``."""

    def stacked(self) -> Tensor:
        """Every member's output ``[N, B, ...]``."""


class _Given(nn.Module):
    """Stands in for a module whose output is given: returns ``value`` whatever its input."""

    def __init__(self) -> None:
        super().__init__()
        self.value: Tensor | None = None

    def forward(self, *args: object, **kwargs: object) -> Tensor:
        assert self.value is not None
        return self.value


class StackedModel:
    """Runs a template module over stacked member parameters ``{name: [N, ...]}``.

    Three equivalent ways, picked per model (and device) for speed:
    - plain ReLU MLPs (``FullyConnected``): batched matmuls written out (``bmm``), and one
      matmul for all members when the input is shared;
    - convolutional models on the CPU: the template module run once per member with that
      member's tensors swapped in (``vmap`` turns a member-batched convolution into a grouped
      one, which is 1.3-2x slower there); channels-last when the model has no BatchNorm;
    - everything else: ``vmap`` over ``functional_call``.

    ``strategy`` = ``auto`` picks as above; ``loop`` (the module once per member) or ``vmap``
    forces that way for any model and device (for tests: the GPU's ``vmap`` path on the CPU).
    ``last_strategy`` records the way the latest ``logits`` call took: ``mlp``, ``loop`` or ``vmap``.
    """

    STRATEGIES = ("auto", "loop", "vmap")

    def __init__(self, model: nn.Module, strategy: str = "auto"):
        if strategy not in self.STRATEGIES:
            raise ValueError(f"StackedModel strategy: {strategy!r} is not one of {', '.join(self.STRATEGIES)}")
        self.model = model
        self.strategy = strategy
        self.last_strategy: str | None = None
        self.param_names = [n for n, _ in model.named_parameters()]
        self.buffer_names = [n for n, _ in model.named_buffers()]
        self._fc = _fc_plan(model) if strategy == "auto" else None
        # MLPs train with the hand-written backward of ``fc_loss_and_grads``; False = autograd (for tests).
        self.hand_written_backward = self._fc is not None
        self._conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
        # Dropout masks come from each member's own generator: one member at a time while training.
        self.dropout = has_dropout(model)
        # Channels-last convolutions on the CPU: ~1.1-1.6x faster evaluation at large batch; in
        # training ~10% faster when every convolution has at least 16 output channels (Conv-4 at
        # width 1/4), ~8% slower with fewer (LeNet-5: 6 and 16), where the layout's max-pool and
        # conversions cost more than they save. Kept off with BatchNorm, whose channels-last batch
        # statistics round differently.
        convs2d = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        no_bn = not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        self.channels_last_eval = bool(convs2d) and no_bn
        self.channels_last_train = self.channels_last_eval and min(m.out_channels for m in convs2d) >= 16
        self._auto_layout = (self.channels_last_train, self.channels_last_eval, bool(convs2d))
        self._slots = self._tensor_slots(model)
        # Set by ``configure`` from the run's [runtime] settings: autocast dtypes, compiled callables.
        self.train_dtype: torch.dtype | None = None
        self.eval_dtype: torch.dtype | None = None
        self.compile = False
        self.quiet = False
        self._compiled: dict[str, Compiled] = {}

    def configure(self, runtime: Any) -> StackedModel:
        """Apply ``runtime.precision``, ``eval_precision``, ``compile`` and ``channels_last``; returns self."""
        self.train_dtype = compute_dtype(runtime.precision)
        self.eval_dtype = compute_dtype(runtime.eval_precision)
        self.compile = bool(runtime.compile)
        self.quiet = bool(runtime.quiet)
        train_cl, eval_cl, has_conv2d = self._auto_layout
        layout = runtime.channels_last
        if layout == "on":
            train_cl = eval_cl = has_conv2d
        elif layout == "off":
            train_cl = eval_cl = False
        self.channels_last_train, self.channels_last_eval = train_cl, eval_cl
        return self

    def configure_evaluation(self, runtime: Any) -> StackedModel:
        """Apply ``runtime.eval_precision`` alone (nothing compiled, training's settings left as they are): for the
        measurements made outside training (interpolation curves, a supermask's accuracy); returns self."""
        self.eval_dtype = compute_dtype(runtime.eval_precision)
        return self

    @property
    def compile_seconds(self) -> float:
        """Wall time spent compiling (first calls of the compiled step and evaluation)."""
        return sum(c.seconds for c in self._compiled.values())

    def _maybe_compiled(self, what: str, fn: Any) -> Any:
        if not self.compile:
            return fn
        if what not in self._compiled:
            self._compiled[what] = Compiled(fn, f"{what} of {type(self.model).__name__}", self.quiet)
        return self._compiled[what]

    def train_loss(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor, y: Tensor,
                   dropout_gens: Sequence[torch.Generator] | None = None) -> Tensor:
        """Mean training cross-entropy per member ``[N]`` (float32), in the configured precision, with a graph
        for ``backward``; compiled when ``compile`` is set (members with dropout run uncompiled)."""
        if self.compile and not dropout_gens:
            step = self._maybe_compiled("the training step", self._train_loss)
            return step(dict(params), dict(buffers), x, y, signature=(tuple(x.shape), x.dtype))
        return self._train_loss(params, buffers, x, y, dropout_gens)

    def _train_loss(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor, y: Tensor,
                    dropout_gens: Sequence[torch.Generator] | None = None) -> Tensor:
        with autocast(x.device, self.train_dtype):
            out = self.logits(params, buffers, x, train=True, shared_input=False, dropout_gens=dropout_gens)
        n = out.shape[0]
        return F.cross_entropy(out.float().flatten(0, 1), y.flatten(), reduction="none").view(n, -1).mean(1)

    def _tensor_slots(self, model: nn.Module) -> dict[str, tuple[dict, str]] | None:
        """Where each parameter and buffer lives (its module's dict and key), for swapping members in.

        None when some tensor is shared under two names (tied weights): then ``functional_call``,
        which handles ties, does the swapping.
        """
        n_params = len(list(model.named_parameters(remove_duplicate=False)))
        n_buffers = len(list(model.named_buffers(remove_duplicate=False)))
        if n_params != len(self.param_names) or n_buffers != len(self.buffer_names):
            return None
        slots = {}
        for name in self.param_names + self.buffer_names:
            module_name, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_name)
            slots[name] = (module._parameters if leaf in module._parameters else module._buffers, leaf)
        return slots

    def logits(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor, *, train: bool,
               shared_input: bool, dropout_gens: Sequence[torch.Generator] | None = None,
               first: GivenOutput | None = None) -> Tensor:
        """Logits ``[N, B, classes]``; x is ``[B, ...]`` when shared_input else ``[N, B, ...]``.

        ``dropout_gens``: one generator per member for the model's dropout masks (training only).
        ``first``: the output of one module (the layer that reads the input) already known for every member;
        that module is not run and its parameters need not be in ``params`` (see ``maths.paths``).
        """
        self.model.train(train)
        if first is not None:
            params = {k: v for k, v in params.items() if not k.startswith(first.prefix)}
        if self._fc is not None:
            self.last_strategy = "mlp"
            return self._fc_logits(params, x, shared_input, first)
        noisy = train and self.dropout and dropout_gens is not None
        if noisy or self.strategy == "loop" or (self.strategy == "auto" and self._conv and x.device.type == "cpu"):
            self.last_strategy = "loop"
            with self._given(first) as given:
                return self._member_loop_logits(params, buffers, x, shared_input, dropout_gens if noisy else None,
                                                given, first)
        self.last_strategy = "vmap"
        if first is not None:
            with self._given(first) as given:
                def g(p: dict, b: dict, xx: Tensor, out: Tensor) -> Tensor:
                    given.value = out
                    return functional_call(self.model, (p, b), (xx,))

                return vmap(g, in_dims=(0, 0, None if shared_input else 0, 0))(dict(params), dict(buffers), x,
                                                                             first.stacked())

        def f(p: dict, b: dict, xx: Tensor) -> Tensor:
            return functional_call(self.model, (p, b), (xx,))

        try:
            return vmap(f, in_dims=(0, 0, None if shared_input else 0))(dict(params), dict(buffers), x)
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            if self.strategy != "auto":
                raise
            # A module vmap cannot batch (e.g. data-dependent control flow, in-place updates of a
            # captured tensor): one member after another instead, never a wrong answer.
            print(f"note: {type(self.model).__name__} cannot be batched over members with vmap "
                  f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); training members one at a time",
                  file=sys.stderr)
            self.strategy = "loop"
            self.last_strategy = "loop"
            return self._member_loop_logits(params, buffers, x, shared_input)

    @contextlib.contextmanager
    def _given(self, first: GivenOutput | None):
        """The module ``first.name`` replaced by a ``_Given`` (its output set per member) while the block runs."""
        if first is None:
            yield None
            return
        parent_name, _, leaf = first.name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        original = parent._modules[leaf]
        given = _Given()
        parent._modules[leaf] = given
        try:
            yield given
        finally:
            parent._modules[leaf] = original

    def _fc_logits(self, params: Mapping[str, Tensor], x: Tensor, shared_input: bool,
                   first: GivenOutput | None = None) -> Tensor:
        assert self._fc is not None
        h = x.flatten(1) if shared_input else x.flatten(2)
        last = len(self._fc) - 1
        if first is not None:
            assert first.name == "fc.0", first.name
            h = first.stacked()  # a fresh tensor: the ReLU may write into it
            if last:
                h = torch.relu_(h)
        for i, (wn, bn) in enumerate(self._fc):
            if first is not None and i == 0:
                continue
            w, b = params[wn], params[bn]
            if h.dim() == 2:
                # Shared input: one [B, in] x [in, N*out] matmul serves every member.
                n, out_f, in_f = w.shape
                h = torch.addmm(b.reshape(n * out_f), h, w.reshape(n * out_f, in_f).t())
                h = h.view(h.shape[0], n, out_f).transpose(0, 1)
            else:
                h = _StackedLinear.apply(h, w, b)
            if i < last:
                h = F.relu(h)
        return h

    @torch.no_grad()
    def fc_loss_and_grads(self, params: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor | None:
        """Training loss per member of a plain ReLU MLP, its gradients put in each parameter's ``.grad``.

        The forward and backward passes written out (batched matmuls, no autograd graph): the same
        gradients ``loss.sum().backward()`` gives for the mean cross-entropy per member, ~10-15% sooner.
        x is ``[N, B, ...]``, y ``[N, B]``. Returns None when the model is not such an MLP.
        """
        if self._fc is None:
            return None
        dt = self.train_dtype
        if dt is not None:
            return self._fc_loss_and_grads_low(params, x, y, dt)
        acts = [x.flatten(2)]
        last = len(self._fc) - 1
        for i, (wn, bn) in enumerate(self._fc):
            h = torch.baddbmm(params[bn].unsqueeze(1), acts[-1], params[wn].transpose(1, 2))
            if i < last:
                h.clamp_min_(0)
            acts.append(h)
        loss, g = _ce_loss_and_grad(acts.pop(), y)
        for i in range(last, -1, -1):
            wn, bn = self._fc[i]
            w, b = params[wn], params[bn]
            # written into the previous step's gradient tensors when there are any (no allocation)
            w.grad = torch.bmm(g.transpose(1, 2), acts[i], out=w.grad)
            b.grad = torch.sum(g, 1, out=b.grad)
            if i:
                g = torch.ops.aten.threshold_backward(torch.bmm(g, w), acts[i], 0)
        return loss

    def _fc_loss_and_grads_low(self, params: Mapping[str, Tensor], x: Tensor, y: Tensor, dt: torch.dtype) -> Tensor:
        """``fc_loss_and_grads`` with the matmuls in ``dt`` (bf16), as autocast would run them: the weights
        are cast once per step, log-softmax, the loss and the bias gradients are float32, and every gradient
        is handed to its float32 parameter in float32."""
        assert self._fc is not None
        last = len(self._fc) - 1
        ws = [params[wn].to(dt) for wn, _ in self._fc]
        acts = [x.flatten(2).to(dt)]
        for i, (_, bn) in enumerate(self._fc):
            h = torch.baddbmm(params[bn].to(dt).unsqueeze(1), acts[-1], ws[i].transpose(1, 2))
            if i < last:
                h.clamp_min_(0)
            acts.append(h)
        loss, g = _ce_loss_and_grad(acts.pop().float(), y)
        for i in range(last, -1, -1):
            wn, bn = self._fc[i]
            w, b = params[wn], params[bn]
            b.grad = torch.sum(g, 1, dtype=b.dtype, out=b.grad)
            g = g.to(dt)
            gw = torch.bmm(g.transpose(1, 2), acts[i])
            if w.grad is None:
                w.grad = gw.to(w.dtype)
            else:
                w.grad.copy_(gw)
            if i:
                g = torch.ops.aten.threshold_backward(torch.bmm(g, ws[i]), acts[i], 0)
        return loss

    def _member_loop_logits(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor,
                            shared_input: bool, dropout_gens: Sequence[torch.Generator] | None = None,
                            given: _Given | None = None, first: GivenOutput | None = None) -> Tensor:
        # unbind: one view per member; gradients flow back through a single stack, and
        # in-place buffer updates (BatchNorm running statistics) land in the stacked tensors.
        p_names, b_names = list(params), list(buffers)
        p_views = [params[k].unbind(0) for k in p_names]
        b_views = [buffers[k].unbind(0) for k in b_names]
        n = len(p_views[0]) if p_views else len(b_views[0]) if b_views else first.count  # type: ignore[union-attr]
        xs = [x] * n if shared_input else x.unbind(0)
        channels_last = self.channels_last_train if torch.is_grad_enabled() else self.channels_last_eval
        if channels_last and x.dim() == (4 if shared_input else 5):
            xs = [xx.contiguous(memory_format=torch.channels_last) for xx in xs]
            p_views = [[t.contiguous(memory_format=torch.channels_last) for t in v] if v[0].dim() == 4 else v
                       for v in p_views]
        def noise(i: int):
            # member i's dropout masks from its own generator; nothing to set up for models without dropout
            return dropout_noise(dropout_gens[i]) if dropout_gens else contextlib.nullcontext()

        outs = []
        slots = self._slots
        if slots is None or any(k not in slots for k in p_names + b_names):
            for i in range(n):
                p = {k: v[i] for k, v in zip(p_names, p_views)}
                b = {k: v[i] for k, v in zip(b_names, b_views)}
                if given is not None:
                    given.value = first.member(i)
                with noise(i):
                    outs.append(functional_call(self.model, (p, b), (xs[i],)))
            return torch.stack(outs)
        # What functional_call does, without its per-call bookkeeping (~20 µs per tensor, which
        # adds up to ~1 ms per member for a ResNet): put member i's tensors into the module's
        # parameter and buffer dicts, run it, and put the originals back.
        places = [slots[k] for k in p_names + b_names]
        views = p_views + b_views
        originals = [d[leaf] for d, leaf in places]
        try:
            for i in range(n):
                for (d, leaf), v in zip(places, views):
                    d[leaf] = v[i]
                if given is not None:
                    given.value = first.member(i)
                with noise(i):
                    outs.append(self.model(xs[i]))
        finally:
            for (d, leaf), t in zip(places, originals):
                d[leaf] = t
        return torch.stack(outs)

    @torch.no_grad()
    def evaluate(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor, y: Tensor, batch_size: int = 1000) -> tuple[Tensor, Tensor]:
        """Mean cross-entropy loss and error (fraction) per member, eval mode, on (x, y).

        In float32 unless ``configure`` asked for ``eval_precision = "bf16"``; compiled when ``compile`` is set."""
        n_members = next(iter(params.values())).shape[0]
        loss = torch.zeros(n_members, dtype=torch.float64, device=x.device)
        wrong = torch.zeros(n_members, dtype=torch.float64, device=x.device)
        if len(x) == 0:
            return torch.full((n_members,), float("nan")), torch.full((n_members,), float("nan"))
        # A data-parallel run's ranks evaluate every world-th chunk each and add up.
        parallel = distributed.active()
        starts = range(0, len(x), batch_size)
        if parallel:
            starts = starts[distributed.rank()::distributed.world()]
        for start, xb in zip(starts, in_chunks(x, batch_size, starts)):
            yb = y[start : start + batch_size]
            if self.compile:
                ev = self._maybe_compiled("the stacked evaluation", self._eval_batch)
                ce, wr = ev(dict(params), dict(buffers), xb, yb, signature=(tuple(xb.shape), xb.dtype))
            else:
                ce, wr = self._eval_batch(params, buffers, xb, yb)
            loss += ce.double()
            wrong += wr.double()
        if parallel:
            distributed.sum_across_ranks(loss)
            distributed.sum_across_ranks(wrong)
        return (loss / len(x)).cpu(), (wrong / len(x)).cpu()

    def _eval_batch(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor,
                    y: Tensor) -> tuple[Tensor, Tensor]:
        """Summed cross-entropy and wrong answers per member on one shared batch."""
        with autocast(x.device, self.eval_dtype):
            out = self.logits(params, buffers, x, train=False, shared_input=True)
        n = out.shape[0]
        out = out.float()
        ce = F.cross_entropy(out.flatten(0, 1), y.repeat(n), reduction="none").view(n, -1)
        return ce.sum(1), (out.argmax(-1) != y).sum(1)

def stack_states(states: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Stack per-member state dicts into ``{name: [N, ...]}``."""
    return {k: torch.stack([s[k] for s in states]).clone() for k in states[0]}


def unstack(stacked: Mapping[str, Tensor], i: int) -> dict[str, Tensor]:
    """Member i's tensors from a stacked dict."""
    return {k: v[i].clone() for k, v in stacked.items()}


def _ce_loss_and_grad(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Each member's mean cross-entropy over its batch (``logits`` [N, B, classes], ``y`` [N, B]) and its gradient
    with respect to the logits, (softmax − onehot) / B, computed in place of the log-softmax."""
    logp = torch.log_softmax(logits, -1)
    target = y.unsqueeze(-1)
    loss = logp.gather(-1, target).squeeze(-1).mean(1).neg_()
    g = logp.exp_()
    g.scatter_add_(-1, target, torch.full(target.shape, -1.0, dtype=g.dtype, device=g.device))
    g.mul_(1.0 / y.shape[1])
    return loss, g
