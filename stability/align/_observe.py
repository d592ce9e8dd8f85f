"""Running a template module on a state dict while forward hooks read its hidden units."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import functional_call


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer it needs has run."""


def unit_rows(t: Tensor) -> Tensor:
    """``[B, C, *spatial]`` activations as ``[B * prod(spatial), C]`` float64 rows (one per position)."""
    t = t.detach().double()
    if t.dim() > 2:
        t = t.movedim(1, -1).reshape(-1, t.shape[1])
    return t


class Moments:
    """Running per-unit sums for mean and population (biased) variance, in float64."""

    def __init__(self) -> None:
        self.n = 0
        self.sum: Tensor | float = 0.0
        self.sumsq: Tensor | float = 0.0

    def add(self, rows: Tensor) -> None:
        self.n += rows.shape[0]
        self.sum = self.sum + rows.sum(0)
        self.sumsq = self.sumsq + (rows * rows).sum(0)

    def mean(self) -> Tensor:
        return self.sum / self.n

    def var(self) -> Tensor:
        return (self.sumsq / self.n - self.mean() ** 2).clamp_min(0)

    def std(self) -> Tensor:
        return self.var().sqrt()


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode (BatchNorm uses its running statistics); each module's mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def batches(x: Tensor, batch_size: int) -> Iterator[Tensor]:
    for start in range(0, len(x), max(1, batch_size)):
        yield x[start:start + batch_size]


@torch.no_grad()
def observe(model: nn.Module, state: Mapping[str, Tensor], x: Tensor,
            hooks: Mapping[str, Callable[[Tensor], None]], *, inputs: bool = False,
            stop_at: str | None = None) -> None:
    """One forward pass of ``model`` with ``state`` on ``x``, calling ``hooks[name](tensor)`` with the
    output (or, with ``inputs``, the first input) of each named module; the pass ends early once the
    module ``stop_at`` has been observed."""
    handles = []

    def make(name: str, fn: Callable[[Tensor], None]) -> Callable:
        if inputs:
            def pre(_m: nn.Module, args: tuple) -> None:
                fn(args[0])
                if name == stop_at:
                    raise _Stop
            return pre

        def post(_m: nn.Module, _args: tuple, out: Tensor) -> None:
            fn(out)
            if name == stop_at:
                raise _Stop
        return post

    try:
        for name, fn in hooks.items():
            module = model.get_submodule(name)
            hook = make(name, fn)
            handles.append(module.register_forward_pre_hook(hook) if inputs else module.register_forward_hook(hook))
        try:
            functional_call(model, dict(state), (x,))
        except _Stop:
            pass
    finally:
        for h in handles:
            h.remove()
