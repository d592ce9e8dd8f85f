"""The training engine: N copies of one architecture trained in lockstep.

A *member* is one copy (the trunk is a single member; siblings are several).
Members share the architecture and are held as stacked tensors ``[N, ...]``;
one step runs all members at once (batched matmuls for MLPs, the module once per
member for convolutional models on the CPU, ``vmap(functional_call)`` otherwise:
see ``StackedModel``). Each member has its own data-order and augmentation
generators, so the only thing that differs between members with equal weights is
their SGD noise: every member goes through exactly the same arithmetic, so members
with equal weights and noise stay bit-identical wherever they sit in the stack.

Batches are indices into the dataset tensors already on the device. One epoch
is ``n_train // batch_size`` iterations (the last partial batch is dropped).
The optimizer is a stock ``torch.optim`` optimizer over the stacked tensors:
SGD and Adam act elementwise, so each member's update equals what a separate
optimizer would do. (Adam steps with torch's fused kernel applied member by
member; its state and update rule are those of ``torch.optim.Adam``.)
"""
from __future__ import annotations

import hashlib
import math
import os
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from .config import Config
from .data import DataSplits, augment_batch
from .errors import CheckpointError, ConfigError, TrainingDiverged
from .steps import to_iterations


# ---------------------------------------------------------------- runtime
def resolve_device(name: str) -> torch.device:
    """``auto`` takes a GPU when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device: 'cuda' was asked for but no GPU is available; use auto or cpu")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"runtime.device: unknown device {name!r}; choose one of auto, cpu, cuda")
    return torch.device(name)


def configure_threads(threads: int) -> int:
    """Set torch's intra-op threads (0 = one per core, at most 8) and return the number.

    Also keeps freed memory for reuse (``configure_allocator``) and flushes denormal floats to zero."""
    n = threads or min(os.cpu_count() or 1, 8)
    configure_allocator()
    # Denormal floats (|x| < 1.2e-38) are flushed to zero: the CPU handles them ~100x slower, and the
    # activations of trained conv nets hold enough of them to make LeNet-5's evaluation 1.7x slower.
    torch.set_flush_denormal(True)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


_ALLOCATOR_TUNED = False


def configure_allocator() -> bool:
    """Keep freed memory in the process for reuse (glibc only; returns whether it was applied).

    glibc gives large freed blocks straight back to the kernel, so every activation of a few
    MB is page-faulted in again (zero-filled) on its next use: for LeNet-5 evaluated at batch
    1,000 that is over a third of the time. Blocks up to 32 MB are kept in the heap instead
    (mmap threshold 32 MB, trim threshold 1 GB, 64 MB top pad): the process's resident memory
    stays at its peak rather than shrinking between steps. Applied once per process.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # from <malloc.h>
    ok = all(libc.mallopt(option, value) == 1 for option, value in (
        (m_mmap_threshold, 32 << 20), (m_trim_threshold, 1 << 30), (m_top_pad, 64 << 20)))
    _ALLOCATOR_TUNED = ok
    return ok


def derive_seed(*parts: object) -> int:
    """A 63-bit seed derived from ``parts`` (stable across processes and platforms)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def iterations_per_epoch(n_train: int, batch_size: int) -> int:
    """Iterations in one epoch: the last partial batch is dropped."""
    if batch_size > n_train:
        raise ConfigError(f"training.batch_size: {batch_size} exceeds the {n_train} training examples")
    return n_train // batch_size


# ---------------------------------------------------------------- schedule
class Schedule:
    """Learning rate at iteration t: warmup x (constant | step decay | cosine)."""

    def __init__(self, cfg: Config, ipe: int):
        self.base = cfg.optimizer.lr
        self.kind = cfg.schedule.kind
        self.gamma = cfg.schedule.gamma
        self.total = to_iterations(cfg.training.steps, ipe, "training.steps")
        self.milestones = sorted(to_iterations(m, ipe, "schedule.milestones") for m in cfg.schedule.milestones)
        self.warmup = to_iterations(cfg.schedule.warmup, ipe, "schedule.warmup")

    def lr(self, t: int) -> float:
        """Learning rate used for the update from iteration t to t+1."""
        factor = 1.0
        if self.warmup and t < self.warmup:
            factor = (t + 1) / self.warmup
        if self.kind == "step":
            factor *= self.gamma ** sum(1 for m in self.milestones if t >= m)
        elif self.kind == "cosine":
            factor *= 0.5 * (1.0 + math.cos(math.pi * min(t, self.total) / max(self.total, 1)))
        return self.base * factor


def make_optimizer(params: Sequence[Tensor], cfg: Config) -> torch.optim.Optimizer:
    """SGD or Adam over (stacked) parameters."""
    o = cfg.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    raise ConfigError(f"optimizer.name: unknown optimizer {o.name!r}; choose one of sgd, adam")


# ---------------------------------------------------------------- functional model
class _StackedLinear(torch.autograd.Function):
    """``x @ w^T + b`` per member: x ``[N, B, in]``, w ``[N, out, in]``, b ``[N, out]``.

    Written out (rather than left to ``vmap(F.linear)``) so that the weight gradient comes
    out of one ``bmm`` already in the weight's own layout: autograd then hands it to the
    parameter as is instead of copying a transposed gradient into place every step.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor) -> Tensor:  # type: ignore[override]
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
    from .models import FullyConnected

    if type(model) is not FullyConnected:
        return None
    if not all(isinstance(layer, nn.Linear) and layer.bias is not None for layer in model.fc):
        return None
    return [(f"fc.{i}.weight", f"fc.{i}.bias") for i in range(len(model.fc))]


class StackedModel:
    """Runs a template module over stacked member parameters ``{name: [N, ...]}``.

    Three equivalent ways, picked per model (and device) for speed:
    - plain ReLU MLPs (``FullyConnected``): batched matmuls written out (``bmm``), and one
      matmul for all members when the input is shared;
    - convolutional models on the CPU: the template module run once per member with that
      member's tensors swapped in (``vmap`` turns a member-batched convolution into a grouped
      one, which is 1.3-2x slower there); channels-last when the model has no BatchNorm;
    - everything else: ``vmap`` over ``functional_call``.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.param_names = [n for n, _ in model.named_parameters()]
        self.buffer_names = [n for n, _ in model.named_buffers()]
        self._fc = _fc_plan(model)
        # MLPs train with the hand-written backward of ``fc_loss_and_grads``; False = autograd (for tests).
        self.hand_written_backward = self._fc is not None
        self._conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
        # Channels-last convolutions on the CPU: ~1.1-1.6x faster evaluation at large batch; in
        # training ~10% faster when every convolution has at least 16 output channels (Conv-4 at
        # width 1/4), ~8% slower with fewer (LeNet-5: 6 and 16), where the layout's max-pool and
        # conversions cost more than they save. Kept off with BatchNorm, whose channels-last batch
        # statistics round differently.
        convs2d = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        no_bn = not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        self.channels_last_eval = bool(convs2d) and no_bn
        self.channels_last_train = self.channels_last_eval and min(m.out_channels for m in convs2d) >= 16
        self._slots = self._tensor_slots(model)

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

    def logits(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor, *, train: bool, shared_input: bool) -> Tensor:
        """Logits ``[N, B, classes]``; x is ``[B, ...]`` when shared_input else ``[N, B, ...]``."""
        self.model.train(train)
        if self._fc is not None:
            return self._fc_logits(params, x, shared_input)
        if self._conv and x.device.type == "cpu":
            return self._member_loop_logits(params, buffers, x, shared_input)

        def f(p: dict, b: dict, xx: Tensor) -> Tensor:
            return functional_call(self.model, (p, b), (xx,))

        return vmap(f, in_dims=(0, 0, None if shared_input else 0))(dict(params), dict(buffers), x)

    def _fc_logits(self, params: Mapping[str, Tensor], x: Tensor, shared_input: bool) -> Tensor:
        assert self._fc is not None
        h = x.flatten(1) if shared_input else x.flatten(2)
        last = len(self._fc) - 1
        for i, (wn, bn) in enumerate(self._fc):
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
        acts = [x.flatten(2)]
        last = len(self._fc) - 1
        for i, (wn, bn) in enumerate(self._fc):
            h = torch.baddbmm(params[bn].unsqueeze(1), acts[-1], params[wn].transpose(1, 2))
            if i < last:
                h.clamp_min_(0)
            acts.append(h)
        logp = torch.log_softmax(acts.pop(), -1)  # [N, B, classes]
        target = y.unsqueeze(-1)
        loss = logp.gather(-1, target).squeeze(-1).mean(1).neg_()
        # d(mean CE)/d logits = (softmax - onehot) / B
        g = logp.exp_()
        g.scatter_add_(-1, target, torch.full(target.shape, -1.0, dtype=g.dtype, device=g.device))
        g.mul_(1.0 / y.shape[1])
        for i in range(last, -1, -1):
            wn, bn = self._fc[i]
            w, b = params[wn], params[bn]
            # written into the previous step's gradient tensors when there are any (no allocation)
            w.grad = torch.bmm(g.transpose(1, 2), acts[i], out=w.grad)
            b.grad = torch.sum(g, 1, out=b.grad)
            if i:
                g = torch.ops.aten.threshold_backward(torch.bmm(g, w), acts[i], 0)
        return loss

    def _member_loop_logits(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor,
                            shared_input: bool) -> Tensor:
        # unbind: one view per member; gradients flow back through a single stack, and
        # in-place buffer updates (BatchNorm running statistics) land in the stacked tensors.
        p_names, b_names = list(params), list(buffers)
        p_views = [params[k].unbind(0) for k in p_names]
        b_views = [buffers[k].unbind(0) for k in b_names]
        n = len(p_views[0]) if p_views else len(b_views[0])
        xs = [x] * n if shared_input else x.unbind(0)
        channels_last = self.channels_last_train if torch.is_grad_enabled() else self.channels_last_eval
        if channels_last and x.dim() == (4 if shared_input else 5):
            xs = [xx.contiguous(memory_format=torch.channels_last) for xx in xs]
            p_views = [[t.contiguous(memory_format=torch.channels_last) for t in v] if v[0].dim() == 4 else v
                       for v in p_views]
        outs = []
        slots = self._slots
        if slots is None or any(k not in slots for k in p_names + b_names):
            for i in range(n):
                p = {k: v[i] for k, v in zip(p_names, p_views)}
                b = {k: v[i] for k, v in zip(b_names, b_views)}
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
                outs.append(self.model(xs[i]))
        finally:
            for (d, leaf), t in zip(places, originals):
                d[leaf] = t
        return torch.stack(outs)

    @torch.no_grad()
    def evaluate(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor, y: Tensor, batch_size: int = 1000) -> tuple[Tensor, Tensor]:
        """Mean cross-entropy loss and error (fraction) per member, eval mode, on (x, y)."""
        n_members = next(iter(params.values())).shape[0]
        loss = torch.zeros(n_members, dtype=torch.float64, device=x.device)
        wrong = torch.zeros(n_members, dtype=torch.float64, device=x.device)
        if len(x) == 0:
            return torch.full((n_members,), float("nan")), torch.full((n_members,), float("nan"))
        for start in range(0, len(x), batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            out = self.logits(params, buffers, xb, train=False, shared_input=True)
            ce = F.cross_entropy(out.flatten(0, 1), yb.repeat(n_members), reduction="none").view(n_members, -1)
            loss += ce.sum(1).double()
            wrong += (out.argmax(-1) != yb).sum(1).double()
        return (loss / len(x)).cpu(), (wrong / len(x)).cpu()


def stack_states(states: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Stack per-member state dicts into ``{name: [N, ...]}``."""
    return {k: torch.stack([s[k] for s in states]).clone() for k in states[0]}


def unstack(stacked: Mapping[str, Tensor], i: int) -> dict[str, Tensor]:
    """Member i's tensors from a stacked dict."""
    return {k: v[i].clone() for k, v in stacked.items()}


# ---------------------------------------------------------------- members
@dataclass
class Members:
    """N members' weights, optimizer state and data streams at iteration ``step``."""

    step: int
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    order_seeds: list[int]
    aug_seeds: list[int]
    order_gens: list[torch.Generator] = field(default_factory=list)
    aug_gens: list[torch.Generator] = field(default_factory=list)
    perms: Tensor | None = None  # [N, n_train]: this epoch's data order per member
    optimizer_state: dict | None = None  # restored state, used to build the optimizer
    optimizer: torch.optim.Optimizer | None = None  # the live optimizer while training

    def __post_init__(self) -> None:
        if not self.order_gens:
            self.order_gens = [torch.Generator().manual_seed(s) for s in self.order_seeds]
        if not self.aug_gens:
            self.aug_gens = [torch.Generator().manual_seed(s) for s in self.aug_seeds]

    @property
    def n(self) -> int:
        return len(self.order_seeds)

    @classmethod
    def from_model_states(cls, states: Sequence[Mapping[str, Tensor]], param_names: Sequence[str], step: int,
                          order_seeds: Sequence[int], aug_seeds: Sequence[int], device: torch.device) -> Members:
        """Members starting from per-member ``state_dict``s with fresh optimizer state."""
        stacked = stack_states(states)
        params = {k: stacked[k].to(device) for k in param_names}
        buffers = {k: v.to(device) for k, v in stacked.items() if k not in params}
        return cls(step, params, buffers, list(order_seeds), list(aug_seeds))

    # -- serialization: everything needed to resume bit-exactly
    def to_tensors(self) -> tuple[dict[str, Tensor], dict]:
        """Tensors and metadata for a safetensors checkpoint."""
        t: dict[str, Tensor] = {}
        for k, v in self.params.items():
            t[f"param/{k}"] = v
        for k, v in self.buffers.items():
            t[f"buffer/{k}"] = v
        for i, g in enumerate(self.order_gens):
            t[f"rng/order/{i}"] = g.get_state()
        for i, g in enumerate(self.aug_gens):
            t[f"rng/aug/{i}"] = g.get_state()
        if self.perms is not None:
            t["perms"] = self.perms
        opt_keys: dict[str, list[str]] = {}
        state = self.optimizer.state_dict()["state"] if self.optimizer is not None else (self.optimizer_state or {}).get("state", {})
        if state:
            for idx, st in state.items():
                for key, val in st.items():
                    if isinstance(val, Tensor):
                        t[f"opt/{idx}/{key}"] = val
                        opt_keys.setdefault(str(idx), []).append(key)
        meta = {"step": self.step, "members": self.n, "order_seeds": self.order_seeds,
                "aug_seeds": self.aug_seeds, "optimizer_keys": opt_keys}
        return t, meta

    @classmethod
    def from_tensors(cls, t: Mapping[str, Tensor], meta: Mapping, device: torch.device) -> Members:
        """Inverse of ``to_tensors``."""
        params = {k[6:]: v.to(device) for k, v in t.items() if k.startswith("param/")}
        buffers = {k[7:]: v.to(device) for k, v in t.items() if k.startswith("buffer/")}
        n = int(meta["members"])
        order_gens = [torch.Generator() for _ in range(n)]
        aug_gens = [torch.Generator() for _ in range(n)]
        for i in range(n):
            order_gens[i].set_state(t[f"rng/order/{i}"])
            aug_gens[i].set_state(t[f"rng/aug/{i}"])
        opt_state = None
        if meta.get("optimizer_keys"):
            opt_state = {"state": {int(idx): {key: t[f"opt/{idx}/{key}"].to(device) for key in keys}
                                   for idx, keys in meta["optimizer_keys"].items()}}
        perms = t["perms"].to(device) if "perms" in t else None
        return cls(int(meta["step"]), params, buffers, list(meta["order_seeds"]), list(meta["aug_seeds"]),
                   order_gens, aug_gens, perms, opt_state)

    def member_state_dict(self, i: int) -> dict[str, Tensor]:
        """Member i as a plain model ``state_dict``."""
        return {**unstack(self.params, i), **unstack(self.buffers, i)}


def check_matches_model(names_params: Sequence[str], names_buffers: Sequence[str], members: Members, where: str) -> None:
    """Raise CheckpointError when a checkpoint's tensors do not fit the model."""
    if set(members.params) != set(names_params) or set(members.buffers) != set(names_buffers):
        missing = sorted(set(names_params) - set(members.params))
        extra = sorted(set(members.params) - set(names_params))
        raise CheckpointError(f"checkpoint {where} does not match the model (missing {missing[:5]}, unexpected {extra[:5]})")


# ---------------------------------------------------------------- the loop
@dataclass
class TrainSpec:
    """What the loop needs besides the members: data, settings and hooks."""

    data: DataSplits
    cfg: Config
    ipe: int
    masks: Mapping[str, Tensor] | None = None  # {name: [N, ...] or [...]} 0/1
    after_step: Callable[[Members, float], None] | None = None  # called with the batch loss after each step
    augmentation: str | None = None


def draw_batch(members: Members, spec: TrainSpec) -> tuple[Tensor, Tensor]:
    """Member batches ``[N, B, ...]`` for iteration ``members.step``, advancing their data streams."""
    data, B = spec.data, spec.cfg.training.batch_size
    pos = members.step % spec.ipe
    if pos == 0 or members.perms is None:
        # A fresh epoch (or a member starting mid-epoch with no order yet): new permutation per member.
        members.perms = torch.stack([torch.randperm(data.n_train, generator=g) for g in members.order_gens]).to(data.x_train.device)
    idx = members.perms[:, pos * B : (pos + 1) * B]
    flat = idx.reshape(-1)  # index_select on the flat index: same values as x_train[idx], ~3x faster
    x = data.x_train.index_select(0, flat).view(*idx.shape, *data.x_train.shape[1:])
    y = data.y_train.index_select(0, flat).view(idx.shape)
    if spec.augmentation:
        x = torch.stack([augment_batch(x[i], spec.augmentation, g) for i, g in enumerate(members.aug_gens)])
    return x, y


class _MemberwiseFusedAdam(torch.optim.Adam):
    """``torch.optim.Adam`` (same settings, state and update rule) stepping with torch's fused kernel.

    The fused kernel makes one pass over each tensor instead of about eight, but it rounds the
    last elements of every tensor it is given (its scalar tail) slightly differently from the rest.
    It is therefore given each member's slice ``p[i]`` as a tensor of its own: every member is then
    updated by exactly the same arithmetic, so members with equal weights, gradients and noise stay
    bit-identical wherever they sit in the stack. (Against the stock kernel the update may differ
    in the last bit.)
    """

    def __init__(self, params: Sequence[Tensor], **settings: object):
        super().__init__(params, **settings)
        self._member_views: dict[Tensor, tuple] = {}
        self._grad_views: dict[Tensor, tuple] = {}

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        if closure is not None:
            raise ValueError("closures are not supported here")
        self.update()

    def zero_grad(self, set_to_none: bool = True) -> None:
        # Gradients set to None are gone: so are the member views of them (they would keep them alive).
        if set_to_none:
            self._grad_views.clear()
        super().zero_grad(set_to_none)

    def update(self) -> None:
        """The step itself, without ``Optimizer.step``'s hook and profiler wrapper (~0.1 ms a call).

        Call under ``torch.no_grad()``; the training loop calls this directly.
        """
        for group in self.param_groups:
            if group.get("amsgrad") or group.get("maximize") or group.get("differentiable") \
                    or group.get("decoupled_weight_decay") or isinstance(group["lr"], Tensor):
                raise ValueError("member-wise fused Adam supports plain Adam settings only")
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if state["step"].device != p.device:
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
                state["step"].add_(1)
                # Per-member views of the weights and moments live as long as those tensors do.
                cached = self._member_views.get(p)
                if cached is None or cached[0] is not state["exp_avg"] or cached[1] is not state["exp_avg_sq"]:
                    cached = (state["exp_avg"], state["exp_avg_sq"], p.unbind(0), state["exp_avg"].unbind(0),
                              state["exp_avg_sq"].unbind(0))
                    self._member_views[p] = cached
                params += cached[2]
                # ... and of the gradient, when it is the same tensor as last step (hand-written backward)
                gcached = self._grad_views.get(p)
                if gcached is None or gcached[0] is not p.grad:
                    gcached = (p.grad, p.grad.unbind(0))
                    self._grad_views[p] = gcached
                grads += gcached[1]
                exp_avgs += cached[3]
                exp_avg_sqs += cached[4]
                steps += [state["step"]] * p.shape[0]
            if params:
                beta1, beta2 = group["betas"]
                torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=group["lr"], beta1=beta1,
                                   beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                                   amsgrad=False, maximize=False)


def _fused_adam_works(params: Sequence[Tensor]) -> bool:
    """Whether torch's fused Adam kernel runs on these parameters' device and dtype."""
    if not params or not hasattr(torch, "_fused_adam_"):
        return False
    kinds = {(p.device, p.dtype) for p in params}
    if len(kinds) != 1 or any(p.dim() == 0 for p in params):
        return False
    device, dtype = next(iter(kinds))
    try:
        z = [torch.zeros(1, device=device, dtype=dtype) for _ in range(4)]
        torch._fused_adam_([z[0]], [z[1]], [z[2]], [z[3]], [], [torch.ones((), device=device)], lr=0.1, beta1=0.9,
                           beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def _stacked_optimizer(params: Sequence[Tensor], cfg: Config) -> torch.optim.Optimizer:
    """The optimizer of ``make_optimizer``; Adam steps with the fused kernel, member by member."""
    o = cfg.optimizer
    if o.name == "adam" and _fused_adam_works(params):
        return _MemberwiseFusedAdam(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    return make_optimizer(params, cfg)


def train_members(model: StackedModel, members: Members, spec: TrainSpec, end_step: int) -> Members:
    """Train all members from ``members.step`` to ``end_step`` in lockstep; returns the same object."""
    schedule = Schedule(spec.cfg, spec.ipe)
    plist = [members.params[n] for n in model.param_names]
    for p in plist:
        p.requires_grad_(True)
    opt = _stacked_optimizer(plist, spec.cfg)
    if members.optimizer_state:
        opt.load_state_dict({"state": members.optimizer_state["state"], "param_groups": opt.state_dict()["param_groups"]})
    masks = [spec.masks.get(n) if spec.masks else None for n in model.param_names]
    n = members.n
    members.optimizer = opt
    fast_update = opt.update if isinstance(opt, _MemberwiseFusedAdam) else None
    while members.step < end_step:
        x, y = draw_batch(members, spec)
        lr = schedule.lr(members.step)
        for group in opt.param_groups:
            group["lr"] = lr
        # The hand-written MLP backward overwrites the gradients in place. Otherwise set_to_none:
        # backward hands its fresh gradient to each parameter instead of zero-filling the old one
        # and adding into it (two extra passes over every weight).
        loss = model.fc_loss_and_grads(members.params, x, y) if model.hand_written_backward else None
        if loss is None:
            opt.zero_grad(set_to_none=True)
            out = model.logits(members.params, members.buffers, x, train=True, shared_input=False)
            loss = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(n, -1).mean(1)
            loss.sum().backward()
        # One host sync a step (the progress hook needs the value anyway): the mean is finite only when
        # every member's loss is. A non-finite loss stops training before it touches the weights.
        loss_mean = float(loss.detach().mean())
        if not math.isfinite(loss_mean):
            member = int((~torch.isfinite(loss.detach())).nonzero()[0, 0])
            bad = first_nonfinite(members, member)
            tensor = bad[1] if bad is not None else "loss"
            _stop(members, opt, plist)
            raise TrainingDiverged(f"training diverged: member {member}'s {tensor} is not finite at step "
                                   f"{members.step}", step=members.step, member=member, tensor=tensor)
        if spec.masks:
            # Pruned coordinates get no gradient, so momentum/Adam moments stay exactly zero there.
            for p, m in zip(plist, masks):
                if m is not None:
                    p.grad.mul_(m)
        if fast_update is not None:
            with torch.no_grad():
                fast_update()
        else:
            opt.step()
        if spec.masks:
            with torch.no_grad():
                for p, m in zip(plist, masks):
                    if m is not None:
                        p.mul_(m)
        members.step += 1
        if spec.after_step is not None:
            spec.after_step(members, loss_mean)
    if end_step > 0:
        bad = first_nonfinite(members)
        if bad is not None:
            _stop(members, opt, plist)
            raise TrainingDiverged(f"training diverged: member {bad[0]}'s {bad[1]} is not finite at step "
                                   f"{members.step}", step=members.step, member=bad[0], tensor=bad[1])
    members.optimizer_state = {"state": opt.state_dict()["state"]}
    members.optimizer = None
    for p in plist:
        p.requires_grad_(False)
    return members


def first_nonfinite(members: Members, member: int | None = None) -> tuple[int, str] | None:
    """(member, tensor name) of the first parameter or buffer holding NaN or inf, or None when all are finite."""
    for kind, tensors in (("parameter", members.params), ("buffer", members.buffers)):
        for name, t in tensors.items():
            if not t.is_floating_point():
                continue
            finite = torch.isfinite(t.detach()).flatten(1).all(1)
            if member is not None:
                if not bool(finite[member]):
                    return member, f"{kind} {name}"
            elif not bool(finite.all()):
                return int((~finite).nonzero()[0, 0]), f"{kind} {name}"
    return None


def _stop(members: Members, opt: torch.optim.Optimizer, plist: Sequence[Tensor]) -> None:
    """Leave members in their plain state after training stopped early."""
    members.optimizer = None
    for p in plist:
        p.grad = None
        p.requires_grad_(False)


# ---------------------------------------------------------------- reference path
def train_reference(module: nn.Module, state: Mapping[str, Tensor], spec: TrainSpec, start_step: int, end_step: int,
                    order_seed: int, aug_seed: int, mask: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """One model at a time with ``module(x)`` and a stock optimizer: the plain path the batched one must match."""
    module.load_state_dict(state)
    module.train()
    opt = make_optimizer(list(module.parameters()), spec.cfg)
    schedule = Schedule(spec.cfg, spec.ipe)
    single = Members(start_step, {}, {}, [order_seed], [aug_seed])
    named = dict(module.named_parameters())
    for t in range(start_step, end_step):
        single.step = t
        x, y = draw_batch(single, spec)
        for group in opt.param_groups:
            group["lr"] = schedule.lr(t)
        loss = F.cross_entropy(module(x[0]), y[0])
        opt.zero_grad()
        loss.backward()
        if mask:
            for name, m in mask.items():
                named[name].grad.mul_(m)
        opt.step()
        if mask:
            with torch.no_grad():
                for name, m in mask.items():
                    named[name].mul_(m)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
