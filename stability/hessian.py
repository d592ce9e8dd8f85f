"""Hessian probe: top eigenvalues, trace and spectral density of the training loss.

The Hessian is that of the mean cross-entropy loss over a fixed, seeded subset
of training data, with the model in eval mode (BatchNorm uses its running
statistics, dropout is off). For a masked network it is restricted to the
surviving coordinates: pruned weights stay fixed at zero and the operator acts
on the survivors only, so its dimension is the number of survivors.

Two engines compute the same quantities:

- ``native``: Hessian-vector products (HVPs) by double backward over a gradient
  graph built once (or forward-over-reverse ``torch.func.jvp(grad(f))`` per
  chunk when the data are chunked), Lanczos with full reorthogonalization for
  extreme eigenvalues, Hutchinson for the trace and stochastic Lanczos
  quadrature (SLQ) for the density.
- ``pyhessian``: the PyPI ``pyhessian`` 0.1 package (power iteration with
  deflation, Hutchinson), the published reference the native engine is checked
  against. Its ``density()`` calls the removed ``torch.eig``, so the density is
  native only.

Why Lanczos: power iteration converges at the rate λ₂/λ₁ per HVP, Lanczos at a
rate governed by the gap relative to the whole spectrum's width, and it gets the
top k (and the smallest) from one Krylov space. At equal accuracy it needs far
fewer HVPs; ``benchmarks/bench_hessian.py`` measures it.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp

from .errors import ConfigError

ENGINES = ("native", "pyhessian")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
HVP_METHODS = ("auto", "graph", "jvp", "double_backward")

# Lanczos keeps every basis vector (full reorthogonalization), so its memory is
# steps x dim; 200 steps converge the top few eigenvalues of networks to 1e-6
# in the cases measured and bound that memory.
DEFAULT_MAX_STEPS = 200
# Ritz values near zero have no meaningful relative accuracy; measure their
# error against this fraction of the spectral radius instead.
_RELATIVE_FLOOR = 1e-3
# Kahan-Parlett: a Gram-Schmidt pass that keeps this fraction of the norm is exact enough.
_TWICE_IS_ENOUGH = 1 / math.sqrt(2)
# Auto broadening of the density: this fraction of the Ritz-value range.
_AUTO_SIGMA_FRACTION = 1e-2
# The density grid extends this many sigma past the extreme Ritz values, so the
# Gaussian tails beyond the grid hold < 1e-6 of the mass.
_GRID_PAD_SIGMAS = 5.0


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class HessianSettings:
    """What a Hessian probe computes, on which data, and how."""

    samples: int = 1000  # size of the fixed, seeded subset of training examples (all if fewer exist)
    sample_seed: int = 0  # seeds the choice of that subset
    top_k: int = 1  # number of largest eigenvalues; 0 = none
    smallest: bool = False  # also the smallest (most negative) eigenvalue, lambda_min
    trace_probes: int = 0  # Hutchinson Rademacher probes for the trace; 0 = no trace
    density: bool = False  # spectral density by stochastic Lanczos quadrature (native engine only)
    density_vectors: int = 1  # SLQ random (Rademacher) starting vectors, averaged
    density_steps: int = 100  # Lanczos steps per SLQ vector (capped at the dimension)
    # Gaussian broadening (standard deviation, in eigenvalue units) of each Ritz value;
    # 0 = auto: 1e-2 x (largest - smallest Ritz value over all vectors)
    density_sigma: float = 0.0
    density_grid: int = 500  # points of the grid the density is evaluated on
    # Lanczos: most steps (HVPs) for the eigenvalues; 0 = auto: min(dim, max(200, 2*top_k + 20)).
    # With engine = pyhessian: power-iteration iterations per eigenvalue (0 = 1000).
    lanczos_steps: int = 0
    # relative tolerance on the requested eigenvalues (Lanczos: estimated error of each
    # Ritz value; pyhessian: change between iterations); 0 = always run lanczos_steps
    tol: float = 1e-6
    dtype: str = "float32"  # float32 | float64 (model and data are cast on a private copy)
    seed: int = 0  # seeds Lanczos start vectors and Hutchinson / SLQ probes
    batch_size: int = 0  # chunk the subset into batches of this size to bound memory; 0 = all at once
    engine: str = "native"  # native | pyhessian

    def __post_init__(self) -> None:
        _check_int("hessian.samples", self.samples, low=1)
        _check_int("hessian.top_k", self.top_k, low=0)
        _check_int("hessian.trace_probes", self.trace_probes, low=0)
        _check_int("hessian.density_vectors", self.density_vectors, low=1)
        _check_int("hessian.density_steps", self.density_steps, low=1)
        _check_int("hessian.density_grid", self.density_grid, low=2)
        _check_int("hessian.lanczos_steps", self.lanczos_steps, low=0)
        _check_int("hessian.batch_size", self.batch_size, low=0)
        if not (self.density_sigma >= 0 and math.isfinite(self.density_sigma)):
            raise ConfigError(f"hessian.density_sigma must be >= 0 (0 = auto), got {self.density_sigma!r}")
        if not (self.tol >= 0 and math.isfinite(self.tol)):
            raise ConfigError(f"hessian.tol must be >= 0 (0 = run all steps), got {self.tol!r}")
        resolve_dtype(self.dtype)
        _check_engine(self.engine)
        if not (self.top_k or self.smallest or self.trace_probes or self.density):
            raise ConfigError(
                "hessian: nothing to compute; set hessian.top_k >= 1, hessian.smallest, "
                "hessian.trace_probes >= 1 or hessian.density"
            )
        if self.engine == "pyhessian" and (self.smallest or self.density):
            name = "hessian.smallest" if self.smallest else "hessian.density"
            raise ConfigError(
                f"{name} is available only with hessian.engine='native' "
                "(pyhessian has no smallest eigenvalue, and its density() needs the removed torch.eig)"
            )


def _check_int(name: str, value: object, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ConfigError(f"hessian.engine must be one of {' | '.join(ENGINES)}, got {engine!r}")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"float64"`` (or the torch dtypes) as a torch dtype; anything else is a ConfigError."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ConfigError(f"hessian.dtype must be one of {' | '.join(DTYPES)}, got {dtype!r}")


# --------------------------------------------------------------------------- data


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
    ) -> None:
        self.dtype = resolve_dtype(dtype)
        _check_int("hessian.batch_size", batch_size, low=0)
        if hvp not in HVP_METHODS:
            raise ConfigError(f"hvp must be one of {' | '.join(HVP_METHODS)}, got {hvp!r}")
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

        x = x.to(device)
        if x.is_floating_point():
            x = x.to(self.dtype)
        y = y.to(device)
        n = int(x.shape[0])
        step = n if batch_size <= 0 else min(batch_size, n)
        self.chunks = [(x[i : i + step], y[i : i + step]) for i in range(0, n, step)]
        self.n_examples = n
        # Graph reuse (double backward through one retained gradient graph) was the
        # fastest HVP measured on CPU for MLPs and BN-CNNs (benchmarks/bench_hessian.py);
        # it holds every chunk's graph, so chunked data use forward-over-reverse instead.
        self.hvp = ("graph" if len(self.chunks) == 1 else "jvp") if hvp == "auto" else hvp
        self._graph: list[tuple[Tensor, Tensor]] | None = None
        self.n_hvp = 0

    # -- loss as a function of the flat full parameter vector
    def _params(self, flat: Tensor) -> dict[str, Tensor]:
        return {n: c.view(s) for n, c, s in zip(self.names, flat.split(self.sizes), self.shapes)}

    def _chunk_loss(self, flat: Tensor, xc: Tensor, yc: Tensor) -> Tensor:
        out = functional_call(self.model, self._params(flat), (xc,))
        # Weighted so that the chunk losses sum to the mean over all examples.
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


_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _uses_running_stats(module: nn.Module) -> bool:
    return (
        type(module) in _BATCHNORMS
        and module.track_running_stats  # type: ignore[union-attr]
        and module.running_mean is not None
        and module.running_var is not None
    )


def _fast_eval_model(model: nn.Module, names: list[str]) -> nn.Module:
    """The same function of the same named parameters, with eval-mode BatchNorm made cheap to differentiate twice.

    PyTorch's batch-norm double backward is written for train mode and was ~30% of
    a BN-CNN's HVP time. In eval mode BN is y = x * scale + shift per channel;
    folded into the preceding convolution's weight (conv(x, W * scale) + ...) its
    second derivatives touch weight-sized tensors instead of activations. Measured
    on the benchmark's BN-CNN: HVP 0.55x the time of the unmodified model.
    """
    if not any(_uses_running_stats(m) for m in model.modules()):
        return model  # nothing to gain from tracing
    fused = _fuse_conv_bn(model, names)
    if fused is not None:
        model = fused
    _affine_batchnorms(model)  # BNs not right after a convolution
    return model


def _conv_bn(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    *,
    eps: float,
    stride: tuple[int, ...],
    padding: tuple[int, ...] | str,
    dilation: tuple[int, ...],
    groups: int,
) -> Tensor:
    """BatchNorm(eval) after a zero-padded convolution, as one convolution with folded weight and bias."""
    scale = torch.rsqrt(running_var + eps)
    if bn_weight is not None:
        scale = bn_weight * scale
    shift = -running_mean * scale if bias is None else (bias - running_mean) * scale
    if bn_bias is not None:
        shift = shift + bn_bias
    w = weight * scale.view((-1,) + (1,) * (weight.dim() - 1))
    return _CONV_FNS[weight.dim() - 2](x, w, shift, stride, padding, dilation, groups)


def _fuse_conv_bn(model: nn.Module, names: list[str]) -> nn.Module | None:
    """A torch.fx copy with every conv -> eval BatchNorm pair folded into ``_conv_bn``, or None if none or untraceable."""
    from torch import fx

    try:
        gm = fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - data-dependent control flow etc.: keep the module as it is
        return None
    modules = dict(gm.named_modules())
    graph = gm.graph
    fused = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or not _uses_running_stats(modules.get(node.target, nn.Identity())):
            continue
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        conv = modules.get(src.target)
        if type(conv) not in _CONVS or conv.padding_mode != "zeros" or len(src.args) != 1 or src.kwargs:
            continue
        bn = modules[node.target]
        if bn.num_features != conv.out_channels:
            continue

        def attr(owner: str, name: str, mod: nn.Module) -> fx.Node | None:
            return graph.get_attr(f"{owner}.{name}") if getattr(mod, name) is not None else None

        with graph.inserting_before(node):
            new = graph.call_function(
                _conv_bn,
                args=(
                    src.args[0],
                    attr(src.target, "weight", conv),
                    attr(src.target, "bias", conv),
                    attr(node.target, "weight", bn),
                    attr(node.target, "bias", bn),
                    attr(node.target, "running_mean", bn),
                    attr(node.target, "running_var", bn),
                ),
                kwargs={
                    "eps": bn.eps,
                    "stride": conv.stride,
                    "padding": conv.padding,
                    "dilation": conv.dilation,
                    "groups": conv.groups,
                },
            )
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        graph.erase_node(src)
        fused += 1
    if not fused:
        return None
    graph.lint()
    gm.recompile()
    # functional_call addresses parameters by name: the traced copy must hold exactly
    # the model's (a module the forward never calls would be missing from it).
    if sorted(n for n, p in gm.named_parameters() if p.requires_grad) != sorted(names):
        return None
    return gm


class _EvalBatchNorm(nn.Module):
    """BatchNorm in eval mode as the per-channel affine map it is, with the same parameters and buffers."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.eps = bn.eps
        # Same names, same order: functional_call and masks address them unchanged.
        self.weight = bn.weight
        self.bias = bn.bias
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked)

    def forward(self, x: Tensor) -> Tensor:
        scale = torch.rsqrt(self.running_var + self.eps)
        if self.weight is not None:
            scale = self.weight * scale
        shift = -self.running_mean * scale
        if self.bias is not None:
            shift = self.bias + shift
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.view(shape) + shift.view(shape)


def _affine_batchnorms(model: nn.Module) -> None:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _uses_running_stats(child):
                setattr(parent, name, _EvalBatchNorm(child))  # type: ignore[arg-type]


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


# --------------------------------------------------------------------------- Lanczos


@dataclass
class LanczosResult:
    """Extreme eigenpairs from one Lanczos run."""

    eigenvalues: Tensor  # top-k, descending, float64 [k]
    eigenvectors: Tensor  # [k, dim], unit norm, operator dtype
    smallest: float | None  # lambda_min when requested
    smallest_vector: Tensor | None  # [dim]
    steps: int  # Lanczos steps taken = HVPs used
    converged: bool  # every requested value met the tolerance before max_steps
    error_estimate: float  # largest estimated relative error of a requested value


def _lanczos(
    op: HessianOperator,
    steps: int,
    *,
    start: Tensor,
    gen: torch.Generator,
    done: Callable[[Tensor, float], bool] | None = None,
) -> tuple[Tensor, Tensor, float]:
    """Lanczos tridiagonalization with full reorthogonalization.

    Returns T [m, m] (float64), the basis Q [m, dim] and the last residual norm
    beta_m; stops early when ``done(T, beta_m)`` says so.
    """
    dim = op.dim
    steps = min(steps, dim)
    q = start / start.norm()
    cap = min(steps, 32)
    Q = torch.empty(cap, dim, dtype=op.dtype, device=op.device)
    alphas: list[float] = []
    betas: list[float] = []
    beta_prev = 0.0
    beta = 0.0
    for j in range(steps):
        if j == Q.shape[0]:  # grow geometrically: the run usually stops far below `steps`
            Q = torch.cat([Q, torch.empty(min(Q.shape[0], steps - j), dim, dtype=op.dtype, device=op.device)])
        Q[j] = q
        w = op.matvec(q)
        alpha = float(torch.dot(q, w))
        w.sub_(q, alpha=alpha)
        if j > 0:
            w.sub_(Q[j - 1], alpha=beta_prev)
        # Full reorthogonalization against the whole basis keeps it orthogonal to
        # working precision, so no ghost copies of converged eigenvalues. Kahan-Parlett
        # "twice is enough": a second Gram-Schmidt pass only when the first one
        # cancelled enough (norm fell below 1/sqrt(2)) to leave the result inexact.
        basis = Q[: j + 1]
        before = float(w.norm())
        w.addmv_(basis.t(), basis @ w, alpha=-1.0)
        beta = float(w.norm())
        if beta < _TWICE_IS_ENOUGH * before:
            w.addmv_(basis.t(), basis @ w, alpha=-1.0)
            beta = float(w.norm())
        alphas.append(alpha)
        m = j + 1
        if m == steps:
            break
        if done is not None and done(_tridiagonal(alphas, betas), beta):
            break
        scale = max(abs(a) for a in alphas) + beta_prev + beta
        if beta <= 100 * torch.finfo(op.dtype).eps * max(scale, 1e-30):
            # Invariant subspace found: the Krylov space holds exact eigenpairs. Go on
            # from a random direction orthogonal to it (T gets a zero coupling) so
            # eigenvalues the start vector missed can still be found.
            w = op._randn(gen)
            for _ in range(2):
                w.addmv_(basis.t(), basis @ w, alpha=-1.0)
            q = w / w.norm()
            beta_prev = 0.0
        else:
            q = w / beta
            beta_prev = beta
        betas.append(beta_prev)
    m = len(alphas)
    return _tridiagonal(alphas, betas[: m - 1]), Q[:m], beta


def _tridiagonal(alphas: list[float], betas: list[float]) -> Tensor:
    m = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return T


def _ritz_errors(T: Tensor, beta: float, wanted: list[int]) -> tuple[Tensor, Tensor]:
    """Ritz values (ascending) and, for the wanted indices, estimated relative errors."""
    theta, S = torch.linalg.eigh(T)
    m = theta.numel()
    # Residual of Ritz pair i: ||H y - theta y|| = beta * |last component of s_i|.
    resid = beta * S[m - 1].abs()
    spread = float(theta.abs().max()) if m else 0.0
    errs = []
    for i in wanted:
        # For a symmetric operator the eigenvalue error is at most the residual and,
        # once the residual is below the gap to the other Ritz values, at most
        # residual^2 / gap; the second bound is what lets float32 reach 1e-6.
        others = torch.cat([theta[:i], theta[i + 1 :]])
        gap = float((others - theta[i]).abs().min()) if others.numel() else math.inf
        r = float(resid[i])
        err = r * r / gap if r < gap else r
        errs.append(err / max(abs(float(theta[i])), _RELATIVE_FLOOR * spread, 1e-300))
    return theta, torch.tensor(errs, dtype=torch.float64)


def _default_max_steps(dim: int, k: int) -> int:
    return min(dim, max(DEFAULT_MAX_STEPS, 2 * k + 20))


def lanczos_eigenpairs(
    op: HessianOperator,
    k: int,
    *,
    smallest: bool = False,
    max_steps: int | None = None,
    tol: float = 1e-6,
    seed: int = 0,
) -> LanczosResult:
    """Top-k (and optionally the smallest) eigenpairs from one Lanczos run, stopping when all requested values converge."""
    _check_int("hessian.top_k", k, low=0)
    if k > op.dim:
        raise ConfigError(f"hessian.top_k={k} must be at most {op.dim} surviving parameters")
    if k == 0 and not smallest:
        raise ConfigError("hessian.top_k must be >= 1 unless hessian.smallest is set")
    if op.dim == 0:
        raise ConfigError("hessian: the model has no surviving trainable parameters")
    if max_steps is None or max_steps == 0:
        max_steps = _default_max_steps(op.dim, k)
    _check_int("hessian.lanczos_steps", max_steps, low=1)
    max_steps = min(max_steps, op.dim)
    if max_steps < k:
        raise ConfigError(f"hessian.lanczos_steps={max_steps} must be at least hessian.top_k={k}")
    if not (tol >= 0):
        raise ConfigError(f"hessian.tol must be >= 0, got {tol!r}")

    need = max(k, 1) + (1 if smallest else 0)

    def wanted(m: int) -> list[int]:
        idx = list(range(m - k, m))
        if smallest:
            idx = [0] + idx
        return sorted(set(idx))

    previous: list[Tensor] = []

    def done(T: Tensor, beta: float) -> bool:
        m = T.shape[0]
        if tol <= 0 or m < need:
            return False
        theta, errs = _ritz_errors(T, beta, wanted(m))
        # Ranked from the ends: the k largest, then the smallest.
        ends = torch.cat([theta.flip(0)[:k], theta[:1] if smallest else theta[:0]])
        last = previous[0] if previous else None
        previous[:] = [ends]
        if last is None:
            return False
        floor = _RELATIVE_FLOOR * float(theta.abs().max())
        change = (ends - last).abs() / ends.abs().clamp_min(max(floor, 1e-300))
        # Both the residual-based error estimate and the step-to-step change must be
        # below tol: the estimate alone can be fooled while the top Ritz value still
        # sits near lambda_2 (close top eigenvalues); the change alone by a plateau.
        return bool((errs <= tol).all() and (change <= tol).all())

    gen = torch.Generator().manual_seed(int(seed))
    T, Q, beta = _lanczos(op, max_steps, start=op._randn(gen), gen=gen, done=done)
    m = T.shape[0]
    theta, errs = _ritz_errors(T, beta, wanted(m))
    _, S = torch.linalg.eigh(T)
    S = S.to(op.dtype)
    top = list(range(m - 1, m - 1 - k, -1))
    vecs = (S[:, top].T @ Q) if k else Q.new_zeros(0, op.dim)
    vecs = vecs / vecs.norm(dim=1, keepdim=True).clamp_min(1e-300)
    err = float(errs.max()) if errs.numel() else 0.0
    converged = m == op.dim or (tol > 0 and err <= tol)
    if not converged and tol > 0:
        warnings.warn(
            f"Lanczos stopped at hessian.lanczos_steps={m} before the requested eigenvalues reached "
            f"hessian.tol={tol:g} (estimated relative error {err:.2g}); raise hessian.lanczos_steps",
            RuntimeWarning,
            stacklevel=2,
        )
    small_vec = None
    if smallest:
        small_vec = S[:, 0] @ Q
        small_vec = small_vec / small_vec.norm()
    return LanczosResult(
        eigenvalues=theta[top].clone() if k else theta.new_zeros(0),
        eigenvectors=vecs,
        smallest=float(theta[0]) if smallest else None,
        smallest_vector=small_vec,
        steps=m,
        converged=converged,
        error_estimate=err,
    )


def top_eigenvalues(
    op: HessianOperator, k: int, *, max_steps: int | None = None, tol: float = 1e-6, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """The k largest eigenvalues (descending, float64 [k]) and unit eigenvectors [k, dim], by Lanczos."""
    if k < 1:
        _check_int("hessian.top_k", k, low=1)
    res = lanczos_eigenpairs(op, k, max_steps=max_steps, tol=tol, seed=seed)
    return res.eigenvalues, res.eigenvectors


def smallest_eigenvalue(
    op: HessianOperator, *, max_steps: int | None = None, tol: float = 1e-6, seed: int = 0
) -> float:
    """The smallest (most negative) eigenvalue, by Lanczos."""
    return lanczos_eigenpairs(op, 0, smallest=True, max_steps=max_steps, tol=tol, seed=seed).smallest  # type: ignore[return-value]


# --------------------------------------------------------------------------- trace


def hutchinson_trace(op: HessianOperator, probes: int, *, seed: int = 0) -> tuple[float, float]:
    """Hutchinson estimate of tr(H) with Rademacher probes: (mean, standard error; NaN for one probe)."""
    _check_int("hessian.trace_probes", probes, low=1)
    gen = torch.Generator().manual_seed(int(seed))
    samples = torch.empty(probes, dtype=torch.float64)
    for i in range(probes):
        v = op._rademacher(gen)
        samples[i] = float(torch.dot(v, op.matvec(v)))
    mean = float(samples.mean())
    stderr = float(samples.std(correction=1) / math.sqrt(probes)) if probes > 1 else math.nan
    return mean, stderr


# --------------------------------------------------------------------------- density


@dataclass
class SpectralDensity:
    """An SLQ estimate of the eigenvalue density, Gaussian-broadened, on a grid."""

    grid: Tensor  # [grid] eigenvalue axis, float64
    density: Tensor  # [grid], integrates to 1 over the grid (trapezoid)
    ritz_values: Tensor  # [vectors, steps] Lanczos Ritz values per starting vector
    weights: Tensor  # [vectors, steps] squared first components of the Ritz vectors (each row sums to 1)
    sigma: float  # Gaussian broadening (standard deviation) used

    def integral(self) -> float:
        """Trapezoid integral of the density over the grid (1 up to discretization)."""
        return float(torch.trapezoid(self.density, self.grid))


def spectral_density(
    op: HessianOperator,
    *,
    vectors: int = 1,
    steps: int = 100,
    grid: int = 500,
    sigma: float = 0.0,
    seed: int = 0,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature: Gaussian-broadened Ritz values weighted by squared first Ritz-vector components, averaged over Rademacher starts."""
    _check_int("hessian.density_vectors", vectors, low=1)
    _check_int("hessian.density_steps", steps, low=1)
    _check_int("hessian.density_grid", grid, low=2)
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise ConfigError(f"hessian.density_sigma must be >= 0 (0 = auto), got {sigma!r}")
    if op.dim == 0:
        raise ConfigError("hessian: the model has no surviving trainable parameters")
    gen = torch.Generator().manual_seed(int(seed))
    ritz, weights = [], []
    for _ in range(vectors):
        # No early stop: quadrature wants the whole Krylov space of `steps`.
        T, _, _ = _lanczos(op, steps, start=op._rademacher(gen), gen=gen)
        theta, S = torch.linalg.eigh(T)
        ritz.append(theta)
        weights.append(S[0] ** 2)
    ritz_t = torch.stack(ritz)
    w_t = torch.stack(weights)
    lo, hi = float(ritz_t.min()), float(ritz_t.max())
    if sigma == 0.0:
        span = hi - lo
        sigma = _AUTO_SIGMA_FRACTION * (span if span > 0 else max(abs(hi), 1.0))
    pad = _GRID_PAD_SIGMAS * sigma
    axis = torch.linspace(lo - pad, hi + pad, grid, dtype=torch.float64)
    spacing = float(axis[1] - axis[0])
    if spacing > sigma:
        # Sampling a Gaussian coarser than its width loses the trapezoid's accuracy.
        warnings.warn(
            f"hessian.density_grid={grid} spaces points {spacing:.3g} apart, wider than "
            f"hessian.density_sigma={sigma:.3g}; the density is under-resolved (raise the grid or sigma)",
            stacklevel=2,
        )
    z = (axis[None, None, :] - ritz_t[:, :, None]) / sigma
    gauss = torch.exp(-0.5 * z * z) / (sigma * math.sqrt(2 * math.pi))
    dens = (w_t[:, :, None] * gauss).sum(dim=1).mean(dim=0)
    return SpectralDensity(grid=axis, density=dens, ritz_values=ritz_t, weights=w_t, sigma=sigma)


# --------------------------------------------------------------------------- probe


@dataclass
class ProbeResult:
    """Everything one Hessian probe measured."""

    eigenvalues: list[float]  # top-k, descending
    lambda_min: float | None  # smallest eigenvalue, if requested
    trace: float | None  # Hutchinson mean, if requested
    trace_stderr: float | None  # its standard error (NaN with one probe)
    density: SpectralDensity | None
    n_hvp: int  # Hessian-vector products used (over the whole subset)
    seconds: float  # wall time of the probe
    engine: str
    converged: bool = True  # the eigenvalues met hessian.tol before the step limit (pyhessian: not reported, True)
    dim: int = 0  # surviving parameters the Hessian acts on
    samples: int = 0  # examples the loss was averaged over
    settings: HessianSettings = field(default_factory=HessianSettings)

    def row(self) -> dict[str, float | int | None]:
        """A flat record for a table: lambda_1..lambda_k, lambda_min, trace, trace_stderr, n_hvp, seconds."""
        out: dict[str, float | int | None] = {f"lambda_{i + 1}": v for i, v in enumerate(self.eigenvalues)}
        out["lambda_min"] = self.lambda_min
        out["trace"] = self.trace
        out["trace_stderr"] = self.trace_stderr
        out["n_hvp"] = self.n_hvp
        out["seconds"] = self.seconds
        return out


def probe(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    settings: HessianSettings,
    masks: dict[str, Tensor] | None = None,
) -> ProbeResult:
    """Run every quantity ``settings`` requests on the seeded training subset drawn from (x, y)."""
    start = time.perf_counter()
    xs, ys = select_subset(x, y, settings.samples, settings.sample_seed)
    dtype = resolve_dtype(settings.dtype)
    if settings.engine == "pyhessian":
        return _probe_pyhessian(model, xs, ys, settings, masks, dtype, start)
    op = HessianOperator(model, xs, ys, masks=masks, dtype=dtype, batch_size=settings.batch_size)
    eigenvalues: list[float] = []
    lambda_min = None
    converged = True
    if settings.top_k or settings.smallest:
        res = lanczos_eigenpairs(
            op,
            settings.top_k,
            smallest=settings.smallest,
            max_steps=settings.lanczos_steps or None,
            tol=settings.tol,
            seed=settings.seed,
        )
        eigenvalues = [float(v) for v in res.eigenvalues]
        lambda_min = res.smallest
        converged = res.converged
    trace = stderr = None
    if settings.trace_probes:
        trace, stderr = hutchinson_trace(op, settings.trace_probes, seed=settings.seed)
    density = None
    if settings.density:
        density = spectral_density(
            op,
            vectors=settings.density_vectors,
            steps=settings.density_steps,
            grid=settings.density_grid,
            sigma=settings.density_sigma,
            seed=settings.seed,
        )
    return ProbeResult(
        eigenvalues=eigenvalues,
        lambda_min=lambda_min,
        trace=trace,
        trace_stderr=stderr,
        density=density,
        n_hvp=op.n_hvp,
        seconds=time.perf_counter() - start,
        engine="native",
        converged=converged,
        dim=op.dim,
        samples=op.n_examples,
        settings=settings,
    )


# --------------------------------------------------------------------------- pyhessian engine


class _SurvivorModel(nn.Module):
    """The model as a function of its surviving weights only, so pyhessian sees the restricted Hessian."""

    def __init__(self, op: HessianOperator) -> None:
        super().__init__()
        # A plain attribute, not a submodule: pyhessian must see one parameter only.
        object.__setattr__(self, "_op", op)
        assert op.survivors is not None
        self.theta = nn.Parameter(op.theta[op.survivors].clone())

    def forward(self, x: Tensor) -> Tensor:
        op: HessianOperator = self._op  # type: ignore[assignment]
        flat = op.theta.index_put((op.survivors,), self.theta)
        return functional_call(op.model, op._params(flat), (x,))


@contextlib.contextmanager
def _pyhessian_session(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    masks: dict[str, Tensor] | None,
    dtype: torch.dtype,
    batch_size: int,
    seed: int,
) -> Iterator[tuple[object, list[int]]]:
    """A pyhessian ``hessian`` object on a private copy of the model, with an HVP counter."""
    import importlib

    # `pyhessian.hessian` as an attribute is the class (the package re-exports it);
    # the module, whose HVP function we count, is only reachable by its name.
    ph = importlib.import_module("pyhessian.hessian")

    # The model exactly as given (no BatchNorm folding): pyhessian is the reference.
    op = HessianOperator(
        model, x, y, masks=masks, dtype=dtype, batch_size=batch_size, hvp="jvp", fuse_bn=False
    )
    net: nn.Module = _SurvivorModel(op) if op.survivors is not None else op.model
    net.eval()
    # pyhessian reads the graph gradients from .grad; stale ones would be added
    # to the new ones (the doubling pitfall), so start from none.
    for p in net.parameters():
        p.grad = None
    counter = [0]
    original = ph.hessian_vector_product

    def counted(gradsH, params, v):
        counter[0] += 1
        return original(gradsH, params, v)

    old_default = torch.get_default_dtype()
    cuda = op.device.type == "cuda"
    h = None
    with warnings.catch_warnings():
        # pyhessian calls backward(create_graph=True); the .grad <-> graph cycle it
        # warns about is broken below by resetting .grad.
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        try:
            # pyhessian draws its vectors with torch.randn / torch.zeros in the default
            # dtype and from the global generator: set both, and restore them after.
            torch.set_default_dtype(dtype)
            with torch.random.fork_rng(devices=[op.device] if cuda else []):
                torch.manual_seed(int(seed))
                ph.hessian_vector_product = counted
                crit = nn.CrossEntropyLoss()
                if len(op.chunks) == 1:
                    h = ph.hessian(net, crit, data=op.chunks[0], cuda=cuda)
                else:
                    h = ph.hessian(net, crit, dataloader=op.chunks, cuda=cuda)
                    loader_hvp = h.dataloader_hv_product

                    def counted_loader(v):
                        counter[0] += 1
                        return loader_hvp(v)

                    h.dataloader_hv_product = counted_loader
                yield h, counter
        finally:
            ph.hessian_vector_product = original
            torch.set_default_dtype(old_default)
            # Free the retained graph pyhessian left in .grad.
            for p in net.parameters():
                p.grad = None
            del h


def pyhessian_top_eigenvalues(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    k: int,
    *,
    tol: float = 1e-6,
    max_iter: int = 1000,
    masks: dict[str, Tensor] | None = None,
    seed: int = 0,
    dtype: str | torch.dtype = torch.float32,
    batch_size: int = 0,
) -> tuple[list[float], int]:
    """Top-k eigenvalues by pyhessian's power iteration with deflation, and the number of HVPs it used."""
    _check_int("hessian.top_k", k, low=1)
    _check_int("hessian.lanczos_steps", max_iter, low=1)
    with _pyhessian_session(
        model, x, y, masks=masks, dtype=resolve_dtype(dtype), batch_size=batch_size, seed=seed
    ) as (h, counter):
        dim = sum(p.numel() for p in h.params)  # type: ignore[attr-defined]
        if k > dim:
            raise ConfigError(f"hessian.top_k={k} must be at most {dim} surviving parameters")
        values, _ = h.eigenvalues(maxIter=max_iter, tol=tol, top_n=k)  # type: ignore[attr-defined]
        return [float(v) for v in values], counter[0]


def _pyhessian_trace_samples(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    max_iter: int,
    tol: float,
    masks: dict[str, Tensor] | None,
    seed: int,
    dtype: torch.dtype,
    batch_size: int,
) -> list[float]:
    with _pyhessian_session(
        model, x, y, masks=masks, dtype=dtype, batch_size=batch_size, seed=seed
    ) as (h, _):
        return [float(v) for v in h.trace(maxIter=max_iter, tol=tol)]  # type: ignore[attr-defined]


def pyhessian_trace(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    max_iter: int = 100,
    tol: float = 1e-3,
    masks: dict[str, Tensor] | None = None,
    seed: int = 0,
    dtype: str | torch.dtype = torch.float32,
    batch_size: int = 0,
) -> float:
    """Hutchinson trace by pyhessian (stops when the running mean changes < tol relative, or at max_iter probes)."""
    _check_int("hessian.trace_probes", max_iter, low=1)
    samples = _pyhessian_trace_samples(
        model, x, y, max_iter=max_iter, tol=tol, masks=masks, seed=seed,
        dtype=resolve_dtype(dtype), batch_size=batch_size,
    )
    return float(sum(samples) / len(samples))


def _probe_pyhessian(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    settings: HessianSettings,
    masks: dict[str, Tensor] | None,
    dtype: torch.dtype,
    start: float,
) -> ProbeResult:
    eigenvalues: list[float] = []
    n_hvp = 0
    if settings.top_k:
        eigenvalues, n_hvp = pyhessian_top_eigenvalues(
            model, x, y, settings.top_k, tol=settings.tol, max_iter=settings.lanczos_steps or 1000,
            masks=masks, seed=settings.seed, dtype=dtype, batch_size=settings.batch_size,
        )
    trace = stderr = None
    if settings.trace_probes:
        # tol = 0 so pyhessian uses exactly trace_probes probes, like the native engine.
        samples = _pyhessian_trace_samples(
            model, x, y, max_iter=settings.trace_probes, tol=0.0, masks=masks, seed=settings.seed,
            dtype=dtype, batch_size=settings.batch_size,
        )
        n_hvp += len(samples)
        t = torch.tensor(samples, dtype=torch.float64)
        trace = float(t.mean())
        stderr = float(t.std(correction=1) / math.sqrt(len(samples))) if len(samples) > 1 else math.nan
    dim = HessianOperator(model, x[:1], y[:1], masks=masks, dtype=dtype, fuse_bn=False).dim
    return ProbeResult(
        eigenvalues=eigenvalues,
        lambda_min=None,
        trace=trace,
        trace_stderr=stderr,
        density=None,
        n_hvp=n_hvp,
        seconds=time.perf_counter() - start,
        engine="pyhessian",
        converged=True,
        dim=dim,
        samples=int(x.shape[0]),
        settings=settings,
    )
