"""Data that stays on disk: a split's inputs read from a ``torch.utils.data.Dataset`` through a ``DataLoader``.

``StreamedInputs`` stands where a split's input tensor ``x`` stands in ``DataSplits``: it has a length, a
shape and a device, and indexing it (``x[i:j]``, ``x[idx]``, ``x.index_select(0, idx)``) reads those examples
through a ``DataLoader`` (workers, pinned memory on CUDA). Labels stay in memory as tensors (a few bytes per
example), so splits, chance levels and class counts are computed as for in-memory data.

The suite's noise model holds because nothing random happens in the workers: each member's data order is
its own seeded permutation (drawn in the training loop exactly as for in-memory data) and augmentation is
applied in the main process from the member's generator. So a streamed run draws the same batches as the
in-memory run of the same images, whatever the number of workers, and a resumed run continues the order
from the step it stopped at (the permutation and generators are saved with the training state).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["EpochReader", "StreamedInputs", "image_folder", "in_chunks", "is_streamed", "resolve_workers"]


class _Inputs(Dataset):
    """The inputs of ``dataset`` at ``indices`` as float32 tensors (labels are held elsewhere)."""

    def __init__(self, dataset: Any, indices: np.ndarray, transform: Callable[[Any], Tensor] | None) -> None:
        self.dataset, self.indices, self.transform = dataset, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Tensor:
        item = self.dataset[int(self.indices[i])]
        x = item[0] if isinstance(item, (tuple, list)) else item
        if self.transform is not None:
            x = self.transform(x)
        if not isinstance(x, Tensor):
            x = torch.as_tensor(np.asarray(x))
        return x.to(torch.float32)


def _stack(xs: Sequence[Tensor]) -> Tensor:
    return torch.stack(list(xs))


@dataclass
class StreamedInputs:
    """One split's inputs, read from ``dataset`` on access; indexed like a ``[n, *input_shape]`` float32 tensor.

    ``indices``: the dataset positions of the split's examples, in split order. ``workers``: DataLoader
    worker processes (0 reads in the calling process); results never depend on it.
    """

    dataset: Any
    indices: np.ndarray
    input_shape: tuple[int, ...]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    workers: int = 0
    batch_size: int = 256
    transform: Callable[[Any], Tensor] | None = None

    dtype = torch.float32

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.indices), *self.input_shape))

    def dim(self) -> int:
        return 1 + len(self.input_shape)

    @property
    def ndim(self) -> int:
        return self.dim()

    def __len__(self) -> int:
        return len(self.indices)

    def to(self, device: torch.device | str) -> StreamedInputs:
        return replace(self, device=torch.device(device))

    def subset(self, positions: Sequence[int] | np.ndarray) -> StreamedInputs:
        """The examples at ``positions`` of this split, still on disk."""
        return replace(self, indices=self.indices[np.asarray(positions, dtype=np.int64)])

    # ---- reading --------------------------------------------------------------------------------------
    def _loader(self, batches: list[list[int]]) -> DataLoader:
        pin = self.device.type == "cuda"
        return DataLoader(_Inputs(self.dataset, self.indices, self.transform), batch_sampler=batches,
                          num_workers=self.workers, pin_memory=pin, collate_fn=_stack,
                          persistent_workers=False, prefetch_factor=2 if self.workers else None)

    def read(self, batches: list[list[int]]) -> Iterator[Tensor]:
        """One tensor per list of split positions, in order, read ahead by the workers."""
        if not batches:
            return iter(())
        if self.workers == 0:
            data = _Inputs(self.dataset, self.indices, self.transform)
            return (_stack([data[i] for i in b]).to(self.device) for b in batches)
        return (x.to(self.device, non_blocking=True) for x in self._loader(batches))

    def load(self, positions: Sequence[int]) -> Tensor:
        """The examples at ``positions`` as one tensor on the device, read in this process: for the subsets
        drawn at random (BatchNorm batches, alignment and Hessian subsets), where starting workers for each
        read costs more than it saves. Whole splits stream through ``in_chunks``, training through ``EpochReader``."""
        positions = [int(p) for p in positions]
        if not positions:
            return torch.zeros((0, *self.input_shape), device=self.device)
        data = _Inputs(self.dataset, self.indices, self.transform)
        return _stack([data[i] for i in positions]).to(self.device)

    def __getitem__(self, key: Any) -> Tensor:
        if isinstance(key, slice):
            return self.load(range(len(self))[key])
        if isinstance(key, (int, np.integer)):
            return self.load([int(key)])[0]
        if isinstance(key, Tensor):
            if key.dtype == torch.bool:
                key = key.nonzero().flatten()
            return self.load(key.flatten().tolist()).view(*key.shape, *self.input_shape)
        positions = np.asarray(key)
        if positions.dtype == bool:
            positions = np.flatnonzero(positions)
        return self.load(positions.reshape(-1).tolist()).view(*positions.shape, *self.input_shape)

    def index_select(self, dim: int, index: Tensor) -> Tensor:
        if dim != 0:
            raise ValueError("a streamed split is indexed along its examples (dim 0) only")
        return self.load(index.tolist())


def resolve_workers(workers: int) -> int:
    """``dataset.workers``, with -1 resolved to the cores left over by training's threads (at most 8): worker
    processes competing with training's threads for cores stall its parallel kernels (on 2 cores at 2 threads,
    ResNet-20 trained at 0.69x the in-memory rate with 2 workers against 0.78x with none)."""
    if workers >= 0:
        return workers
    return max(0, min(8, (os.cpu_count() or 1) - torch.get_num_threads()))


def in_chunks(x: Tensor | StreamedInputs, size: int, starts: Sequence[int] | None = None) -> Iterator[Tensor]:
    """``x[s:s + size]`` for every start in ``starts`` (default: the whole split, in order), from a tensor or a
    streamed split (read ahead by its DataLoader's workers)."""
    starts = range(0, len(x), size) if starts is None else starts
    if isinstance(x, StreamedInputs):
        return x.read([list(range(s, min(s + size, len(x)))) for s in starts])
    return (x[s:s + size] for s in starts)


def is_streamed(x: object) -> bool:
    """Whether ``x`` is a streamed split's inputs (read from disk) rather than a tensor."""
    return isinstance(x, StreamedInputs)


class EpochReader:
    """The rest of one epoch's member batches, read ahead: built from the members' permutations at ``pos``.

    ``columns``: the slice of each member's batch this process reads (a data-parallel rank's share).
    Yields ``[N, b, ...]`` for iterations ``pos, pos + 1, ...`` of the epoch.
    """

    def __init__(self, x: StreamedInputs, perms: Tensor, pos: int, batch_size: int, ipe: int,
                 columns: slice = slice(None)) -> None:
        self.perms, self.next_pos = perms, pos
        n = perms.shape[0]
        cpu = perms.cpu()
        self.batches: list[list[int]] = []
        for p in range(pos, ipe):
            idx = cpu[:, p * batch_size:(p + 1) * batch_size][:, columns]
            self.batches.append(idx.reshape(-1).tolist())
        self.width = len(range(batch_size)[columns])
        self.n = n
        self._it = x.read(self.batches)

    def matches(self, perms: Tensor | None, pos: int) -> bool:
        return perms is self.perms and pos == self.next_pos

    def next(self) -> Tensor:
        x = next(self._it)
        self.next_pos += 1
        return x.view(self.n, self.width, *x.shape[1:])


def image_folder(root: str, size: int | None = None, mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225)) -> Any:
    """A torchvision ``ImageFolder`` of ``root`` whose images come out as normalized float tensors.

    ``size``: resize the shorter side to ``size * 8 / 7`` and centre-crop ``size`` (ImageNet's evaluation
    transform; 224 from 256); None keeps the images as they are (they must then share one size).
    ``mean``/``std``: per-channel normalization (ImageNet's by default).
    """
    from torchvision import datasets, transforms

    steps: list[Any] = []
    if size is not None:
        steps += [transforms.Resize(round(size * 8 / 7)), transforms.CenterCrop(size)]
    steps += [transforms.ToTensor(), transforms.Normalize(list(mean), list(std))]
    return datasets.ImageFolder(root, transform=transforms.Compose(steps))
