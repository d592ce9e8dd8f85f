"""Lanczos with full reorthogonalization: extreme eigenpairs of the Hessian operator.

Why Lanczos: power iteration converges at the rate λ₂/λ₁ per HVP, Lanczos at a
rate governed by the gap relative to the whole spectrum's width, and it gets the
top k (and the smallest) from one Krylov space. At equal accuracy it needs far
fewer HVPs; ``benchmarks/bench_hessian.py`` measures it.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from .operator import HessianOperator
from .settings import _check_int

# Lanczos keeps every basis vector (full reorthogonalization), so its memory is
# steps x dim; 200 steps converge the top few eigenvalues of networks to 1e-6
# in the cases measured and bound that memory.
DEFAULT_MAX_STEPS = 200
# Ritz values near zero have no meaningful relative accuracy; measure their
# error against this fraction of the spectral radius instead.
_RELATIVE_FLOOR = 1e-3
# Kahan-Parlett: a Gram-Schmidt pass that keeps this fraction of the norm is exact enough.
_TWICE_IS_ENOUGH = 1 / math.sqrt(2)


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
