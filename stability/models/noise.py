"""Per-member training noise inside a model: dropout masks drawn from the member's own generator.

The training loop puts each member's generator in place with ``dropout_noise``; ``NoiseDropout`` layers
and any layer that draws SGD noise (strong tickets' sampled supermasks, through ``noise_generator``) read
it there, so the noise is part of the member's seeds and saved training state, never torch's global
generator.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["NoiseDropout", "dropout_noise", "has_dropout", "noise_generator"]

_DROPOUT_GENERATOR: contextvars.ContextVar[torch.Generator | None] = contextvars.ContextVar(
    "dropout_generator", default=None)


@contextlib.contextmanager
def dropout_noise(generator: torch.Generator | None) -> Iterator[None]:
    """Inside this block, ``NoiseDropout`` layers in train mode draw their masks from ``generator``."""
    token = _DROPOUT_GENERATOR.set(generator)
    try:
        yield
    finally:
        _DROPOUT_GENERATOR.reset(token)


class NoiseDropout(nn.Module):
    """Dropout whose masks are SGD noise: drawn from the generator the training loop puts in place.

    Each member (trunk, sibling, IMP replicate) owns a dropout generator seeded from its augmentation
    seed (dropout is noise of the same kind: ``--noise data_order`` holds it fixed across siblings,
    ``augmentation`` and ``both`` vary it) and saved with its training state, so siblings differ in their dropout masks as in their data order and a
    resumed run draws the same masks. Active only in train mode *and* inside ``dropout_noise(generator)``:
    evaluation, interpolation, BatchNorm resets and Hessian probes see the deterministic network (torch's
    global generator, which ``nn.Dropout`` would use, is part of no run's seeds).
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gen = _DROPOUT_GENERATOR.get()
        if not self.training or self.p == 0.0 or gen is None:
            return x
        keep = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) >= self.p
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def noise_generator() -> torch.Generator | None:
    """The generator ``dropout_noise`` put in place (None outside the training loop): for layers that draw SGD noise."""
    return _DROPOUT_GENERATOR.get()


def has_dropout(model: nn.Module) -> bool:
    """Whether the model draws training noise, an active ``NoiseDropout`` layer or a layer that says
    ``draws_noise`` (the supermask's sampled masks): then it trains one member at a time."""
    return any((isinstance(m, NoiseDropout) and m.p > 0) or getattr(m, "draws_noise", False) for m in model.modules())
