"""Everything that talks to the PyPI ``pyhessian`` 0.1 package, the reference engine.

pyhessian computes the top eigenvalues by power iteration with deflation and
the trace by Hutchinson. Its ``density()`` calls the removed ``torch.eig``, so
the density is native only.

Global state a pyhessian session changes, each for the session only and each
restored in a ``finally`` (so also when pyhessian or the caller raises):

- ``pyhessian.hessian.hessian_vector_product`` is wrapped to count HVPs, only
  while the caller uses the ``hessian`` object (not while it is built, which
  takes no HVP); ``_counting_hvps``.
- ``torch.set_default_dtype``: pyhessian draws its vectors with ``torch.randn`` /
  ``torch.zeros`` in the default dtype, so the probe's dtype is the default
  while the object is built and used; ``_default_dtype``.
- the global random generator is seeded inside ``torch.random.fork_rng``, which
  restores it; the warning pyhessian's ``backward(create_graph=True)`` raises is
  silenced inside ``warnings.catch_warnings``, which restores the filters.

The patches are process-wide: two pyhessian sessions must not run in
concurrent threads.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from types import ModuleType

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import ConfigError
from .operator import HessianOperator
from .settings import _check_int, resolve_dtype


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
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """torch's global default dtype is ``dtype`` inside the block; the old one is restored on exit, also on error."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def _counting_hvps(ph: ModuleType, counter: list[int]) -> Iterator[None]:
    """``ph.hessian_vector_product`` adds its calls to ``counter[0]`` inside the block; restored on exit, also on error."""
    original = ph.hessian_vector_product

    def counted(gradsH, params, v):
        counter[0] += 1
        return original(gradsH, params, v)

    ph.hessian_vector_product = counted
    try:
        yield
    finally:
        ph.hessian_vector_product = original


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
    cuda = op.device.type == "cuda"
    h = None
    with warnings.catch_warnings():
        # pyhessian calls backward(create_graph=True); the .grad <-> graph cycle it
        # warns about is broken below by resetting .grad.
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        try:
            # pyhessian draws its vectors with torch.randn / torch.zeros in the default
            # dtype and from the global generator: set both, and restore them after.
            with _default_dtype(dtype), torch.random.fork_rng(devices=[op.device] if cuda else []):
                torch.manual_seed(int(seed))
                crit = nn.CrossEntropyLoss()
                if len(op.chunks) == 1:
                    h = ph.hessian(net, crit, data=op.chunks[0], cuda=cuda)
                else:
                    h = ph.hessian(net, crit, dataloader=op.chunks, cuda=cuda)
                    loader_hvp = h.dataloader_hv_product

                    def counted_loader(v):
                        counter[0] += 1
                        return loader_hvp(v)

                    # An attribute of this session's own object, not a patch of pyhessian.
                    h.dataloader_hv_product = counted_loader
                # Building the object takes no HVP: the count patch covers only its use.
                with _counting_hvps(ph, counter):
                    yield h, counter
        finally:
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
