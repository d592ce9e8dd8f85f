"""The Hessian-vector-product operator and the data it is taken over.

The Hessian is that of the mean cross-entropy loss over a fixed, seeded subset
of training data, with the model in eval mode (BatchNorm uses its running
statistics, dropout is off). For a masked network it is restricted to the
surviving coordinates: pruned weights stay fixed at zero and the operator acts
on the survivors only, so its dimension is the number of survivors.

HVPs are taken by double backward over a gradient graph built once (or
forward-over-reverse ``torch.func.jvp(grad(f))`` per chunk when the data are
chunked); ``fusion`` makes eval-mode BatchNorm cheap to differentiate twice.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp

from ..errors import ConfigError
from .fusion import _fast_eval_model
from .settings import _check_int, resolve_dtype

HVP_METHODS = ("auto", "graph", "jvp", "double_backward")


def select_subset(x: Tensor, y: Tensor, samples: int, seed: int) -> tuple[Tensor, Tensor]:
    """The fixed, seeded subset of ``samples`` examples (in their original order); all of them, with a warning, if fewer exist."""
    _check_int("hessian.samples", samples, low=1)
    n = int(x.shape[0])
    if int(y.shape[0]) != n:
        raise ValueError(f"x has {n} examples but y has {int(y.shape[0])}")
    if samples >= n:
        if samples > n:
            # A warning, not an error: small datasets (tests, digits) still get a
            # probe, and the subset is still a deterministic function of the settings.
            warnings.warn(
                f"hessian.samples={samples} exceeds the {n} available examples; using all {n}",
                stacklevel=2,
            )
        return x, y
    gen = torch.Generator().manual_seed(int(seed))
    # Sorted so that the subset does not depend on how the permutation orders it
    # (chunk composition, summation order).
    idx = torch.randperm(n, generator=gen)[:samples].sort().values.to(x.device)
    return x[idx], y[idx]


# --------------------------------------------------------------------------- operator


class HessianOperator:
    """H·v of the mean cross-entropy training loss over fixed data, model in eval mode, restricted to surviving coords.

    - ``masks``: {parameter name: 0/1 tensor}; the operator evaluates the masked
      network (pruned weights at zero, whatever the model holds there) and acts on
      the flat vector of surviving coordinates, in ``named_parameters`` order;
      ``dim`` counts them and ``to_full`` maps a vector back to named tensors.
    - ``dtype``: float32 or float64; model and data are cast on a private copy.
    - ``batch_size``: 0 = one batch; otherwise HVPs accumulate over chunks of this
      many examples (same Hessian, bounded memory).
    - ``hvp``: ``graph`` keeps one gradient graph (create_graph) alive and
      differentiates it again per HVP (fastest measured; its memory is held while
      the operator lives), ``jvp`` is forward-over-reverse, ``double_backward``
      rebuilds the graph per HVP; ``auto`` = graph for one batch, jvp for chunks.
    - ``fuse_bn``: evaluate eval-mode BatchNorm as an affine map folded into the
      preceding convolution where torch.fx can trace the model. Same function of
      the same parameters, so the same Hessian; cheaper second derivatives.
    """

    def __init__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        masks: dict[str, Tensor] | None = None,
        dtype: str | torch.dtype = torch.float32,
        batch_size: int = 0,
        hvp: str = "auto",
        fuse_bn: bool = True,
        *,
        batches: Iterable[tuple[Tensor, Tensor]] | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        self.dtype = resolve_dtype(dtype)
        _check_int("hessian.batch_size", batch_size, low=0)
        if hvp not in HVP_METHODS:
            raise ConfigError(f"hvp must be one of {' | '.join(HVP_METHODS)}, got {hvp!r}")
        self.loss_fn = loss_fn
        if batches is not None:
            # streamed: the loss is the mean over every example of one pass over ``batches`` (re-read per HVP)
            counts = [int(yb.shape[0]) for _, yb in batches]
            if sum(counts) == 0:
                raise ConfigError("data: the Hessian needs at least one example, got none")
            x, y = next(iter(batches))
        if int(x.shape[0]) != int(y.shape[0]):
            raise ValueError(f"x has {int(x.shape[0])} examples but y has {int(y.shape[0])}")
        if int(x.shape[0]) == 0:
            raise ConfigError("hessian.samples: the probe needs at least one example, got none")

        # A private copy: the caller's model keeps its mode, dtype and .grad, and
        # later changes to it do not leak into this operator.
        base = _private_copy(model, self.dtype)
        named = [(n, p) for n, p in base.named_parameters() if p.requires_grad]
        self.model = _fast_eval_model(base, [n for n, _ in named]) if fuse_bn else base
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.full_dim = sum(self.sizes)
        device = named[0][1].device if named else x.device
        self.device = device

        mask_flat = _flat_mask(masks, self.names, self.shapes, device)
        theta = torch.cat([p.detach().reshape(-1) for _, p in named]) if named else torch.zeros(0)
        theta = theta.to(device=device, dtype=self.dtype)
        if mask_flat is not None:
            # The masked network computes with pruned weights at exactly zero.
            theta = theta * mask_flat.to(self.dtype)
            self.survivors: Tensor | None = mask_flat.nonzero().squeeze(1)
        else:
            self.survivors = None
        self.theta = theta
        self.dim = int(self.survivors.numel()) if self.survivors is not None else self.full_dim

        if batches is not None and len(counts) > 1:
            self.chunks: Iterable[tuple[Tensor, Tensor]] = _Cast(batches, device, self.dtype)
            self.n_examples = sum(counts)
            n_chunks = len(counts)
        else:
            x = _cast(x, device, self.dtype)
            y = _cast(y, device, self.dtype)
            n = int(x.shape[0])
            step = n if batch_size <= 0 else min(batch_size, n)
            self.chunks = [(x[i : i + step], y[i : i + step]) for i in range(0, n, step)]
            self.n_examples = n
            n_chunks = len(self.chunks)
        # Graph reuse (double backward through one retained gradient graph) was the
        # fastest HVP measured on CPU for MLPs and BN-CNNs (benchmarks/bench_hessian.py);
        # it holds every chunk's graph, so chunked data use forward-over-reverse instead.
        # Streamed batches (``batches``): double backward per batch, ~2x faster than forward-over-reverse there
        # (benchmarks/bench_lmc.py) with only one batch's graph alive at a time.
        chunked = "double_backward" if batches is not None else "jvp"
        self.hvp = ("graph" if n_chunks == 1 else chunked) if hvp == "auto" else hvp
        self._graph: list[tuple[Tensor, Tensor]] | None = None
        self.n_hvp = 0

    # -- loss as a function of the flat full parameter vector
    def _params(self, flat: Tensor) -> dict[str, Tensor]:
        return {n: c.view(s) for n, c, s in zip(self.names, flat.split(self.sizes), self.shapes)}

    def _chunk_loss(self, flat: Tensor, xc: Tensor, yc: Tensor) -> Tensor:
        out = functional_call(self.model, self._params(flat), (xc,))
        # Weighted so that the chunk losses sum to the mean over all examples.
        if self.loss_fn is not None:
            return self.loss_fn(out, yc) * (int(yc.shape[0]) / self.n_examples)
        return F.cross_entropy(out, yc, reduction="sum") / self.n_examples

    def loss(self) -> float:
        """The mean cross-entropy loss over the operator's data at its parameters."""
        with torch.no_grad():
            return float(sum(self._chunk_loss(self.theta, xc, yc) for xc, yc in self.chunks))

    def _full_hvp(self, v: Tensor) -> Tensor:
        if self.hvp == "graph":
            if self._graph is None:
                self._graph = []
                for xc, yc in self.chunks:
                    t = self.theta.clone().requires_grad_(True)
                    (g,) = torch.autograd.grad(self._chunk_loss(t, xc, yc), t, create_graph=True)
                    self._graph.append((t, g))
            return sum(
                torch.autograd.grad(g, t, v, retain_graph=True)[0] for t, g in self._graph
            )  # type: ignore[return-value]
        if self.hvp == "jvp":
            out = torch.zeros_like(self.theta)
            for xc, yc in self.chunks:
                f = lambda t, xc=xc, yc=yc: self._chunk_loss(t, xc, yc)
                out += jvp(grad(f), (self.theta,), (v,))[1]
            return out
        out = torch.zeros_like(self.theta)
        for xc, yc in self.chunks:
            t = self.theta.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(self._chunk_loss(t, xc, yc), t, create_graph=True)
            out += torch.autograd.grad(g, t, v)[0]
        return out

    def matvec(self, v: Tensor) -> Tensor:
        """H·v for a flat vector over the surviving coordinates; counts one HVP in ``n_hvp``."""
        if v.shape != (self.dim,):
            raise ValueError(f"matvec expects a vector of shape ({self.dim},), got {tuple(v.shape)}")
        v = v.to(device=self.device, dtype=self.dtype)
        if self.survivors is not None:
            # Restriction = the survivor block of the full Hessian: embed with zeros
            # on pruned coordinates, apply, keep the survivor rows.
            full = torch.zeros(self.full_dim, dtype=self.dtype, device=self.device)
            full[self.survivors] = v
            hv = self._full_hvp(full)[self.survivors]
        else:
            hv = self._full_hvp(v)
        self.n_hvp += 1
        return hv.detach()

    def dense(self, max_dim: int = 10_000) -> Tensor:
        """The full Hessian [dim, dim] column by column from ``dim`` HVPs (for tiny models and tests)."""
        if self.dim > max_dim:
            raise ValueError(f"dense() would need {self.dim} HVPs and a {self.dim}^2 matrix; max_dim={max_dim}")
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        return torch.stack([self.matvec(e) for e in eye], dim=1)

    def to_full(self, v: Tensor) -> dict[str, Tensor]:
        """A flat survivor-space vector as per-parameter tensors, exactly zero on pruned coordinates."""
        if v.shape != (self.dim,):
            raise ValueError(f"to_full expects a vector of shape ({self.dim},), got {tuple(v.shape)}")
        if self.survivors is None:
            flat = v.detach().clone()
        else:
            flat = torch.zeros(self.full_dim, dtype=v.dtype, device=v.device)
            flat[self.survivors.to(v.device)] = v.detach()
        return {n: c.view(s).clone() for n, c, s in zip(self.names, flat.split(self.sizes), self.shapes)}

    def _randn(self, gen: torch.Generator) -> Tensor:
        # Drawn on the CPU in float64 so a seed gives the same vector for every
        # device and dtype.
        return torch.randn(self.dim, generator=gen, dtype=torch.float64).to(self.device, self.dtype)

    def _rademacher(self, gen: torch.Generator) -> Tensor:
        r = torch.randint(0, 2, (self.dim,), generator=gen, dtype=torch.int8)
        return (2 * r - 1).to(self.device, self.dtype)


def _cast(x: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    x = x.to(device)
    return x.to(dtype) if x.is_floating_point() else x


class _Cast:
    """Batches moved to the operator's device and (floating inputs) dtype as they are read, pass after pass."""

    def __init__(self, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device, dtype: torch.dtype) -> None:
        self.batches, self.device, self.dtype = batches, device, dtype

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in self.batches:
            yield _cast(x, self.device, self.dtype), _cast(y, self.device, self.dtype)


def _private_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    # A .grad built with create_graph=True (pyhessian leaves those behind) is a
    # non-leaf tensor that deepcopy refuses; the copy needs no gradients anyway.
    stash = {p: p.grad for p in model.parameters()}
    try:
        for p in stash:
            p.grad = None
        clone = copy.deepcopy(model)
    finally:
        for p, g in stash.items():
            p.grad = g
    return clone.to(dtype=dtype).eval()


def _flat_mask(
    masks: dict[str, Tensor] | None, names: list[str], shapes: list[torch.Size], device: torch.device
) -> Tensor | None:
    if not masks:
        return None
    by_name = dict(zip(names, shapes))
    unknown = sorted(set(masks) - set(by_name))
    if unknown:
        raise ConfigError(
            f"masks name {', '.join(unknown)}, which are not trainable parameters of the model; "
            f"parameters are {', '.join(names)}"
        )
    parts = []
    for n, s in zip(names, shapes):
        m = masks.get(n)
        if m is None:
            parts.append(torch.ones(s.numel(), dtype=torch.bool, device=device))
            continue
        if tuple(m.shape) != tuple(s):
            raise ConfigError(f"mask for {n} has shape {tuple(m.shape)}, the parameter has {tuple(s)}")
        parts.append(m.detach().reshape(-1).to(device) != 0)
    return torch.cat(parts)
