"""Datasets read from disk: splits whose inputs stay there (``StreamedInputs``), their labels, and ImageNet's root.

``streamed_splits`` makes the ``DataSplits`` of a streamed dataset (``dataset.stream``): the same seeded
validation slice as in memory, inputs read through a DataLoader on access, labels as tensors.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import DatasetConfig
from ..errors import ConfigError, DatasetError
from .splits import DataSplits, validation_split
from .streaming import StreamedInputs, image_folder, resolve_workers

__all__ = ["datasets_to_stream", "gives_datasets", "imagenet_root", "labels_of", "stream_imagenet", "streamed_splits"]


def datasets_to_stream(cfg: DatasetConfig, streamer: Callable[[DatasetConfig], tuple[Any, Any] | None] | None,
                       streams_by_default: Callable[[DatasetConfig], bool] | None) -> tuple[Any, Any] | None:
    """The (train, test) Datasets to stream when ``dataset.stream`` asks for it, else None (load into memory)."""
    if cfg.stream == "off":
        return None  # imagenet's in-memory loader refuses, naming the setting
    if streamer is None:
        if cfg.stream == "on":
            raise ConfigError(f"dataset.stream: {cfg.name} is held in memory as tensors and cannot stream; "
                              "streaming needs a dataset given as torch Datasets (register_dataset with a loader "
                              "returning (train, test) Datasets, or imagenet); use stream = auto or off")
        return None
    if cfg.stream == "auto" and not (streams_by_default and streams_by_default(cfg)):
        return None
    return streamer(cfg)


def gives_datasets(out: Any) -> bool:
    return isinstance(out, (tuple, list)) and len(out) == 2 and all(hasattr(d, "__getitem__") and hasattr(d, "__len__")
                                                                    and not isinstance(d, (Tensor, np.ndarray)) for d in out)


def labels_of(dataset: Any, name: str, split: str) -> np.ndarray:
    """A Dataset's labels: its ``targets`` (ImageFolder, torchvision) or, failing that, read example by example."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [int(dataset[i][1]) for i in range(len(dataset))]
    y = np.asarray(targets.numpy() if isinstance(targets, Tensor) else targets)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise DatasetError(f"dataset.name: {name!r} {split} split: labels must be non-negative integers, "
                           f"got {y.dtype} of shape {y.shape}")
    return y.astype(np.int64)


def streamed_splits(cfg: DatasetConfig, train: Any, test: Any, device: torch.device | str, *,
                    num_classes: int = 0, input_shape: tuple[int, ...] = (), augmentation: str | None = None) -> DataSplits:
    """DataSplits whose inputs stay on disk (``StreamedInputs``) and whose labels are tensors."""
    y_tr, y_te = labels_of(train, cfg.name, "train"), labels_of(test, cfg.name, "test")
    if len(y_tr) == 0:
        raise DatasetError(f"dataset.name: {cfg.name!r} has no training examples")
    if cfg.val_size >= len(y_tr):
        raise ConfigError(f"dataset.val_size: {cfg.val_size} leaves no training examples; {cfg.name} has "
                          f"{len(y_tr)} in its training split, so use at most {len(y_tr) - 1}")
    val_idx, train_idx = validation_split(y_tr, cfg.val_size, cfg.split_seed)
    device = torch.device(device)
    first = StreamedInputs(train, np.arange(1), (), device).load([0])
    shape = tuple(int(d) for d in first.shape[1:])
    if input_shape and shape != tuple(input_shape):
        raise DatasetError(f"dataset.name: {cfg.name!r} gives inputs of shape {shape}, expected {input_shape}")

    def inputs(ds: Any, idx: np.ndarray) -> StreamedInputs:
        return StreamedInputs(ds, np.asarray(idx, dtype=np.int64), shape, device, resolve_workers(cfg.workers))

    def labels(y: np.ndarray) -> Tensor:
        return torch.from_numpy(np.array(y, dtype=np.int64)).to(device)

    classes = num_classes or int(max(y_tr.max(initial=0), y_te.max(initial=0))) + 1
    return DataSplits(name=cfg.name, x_train=inputs(train, train_idx), y_train=labels(y_tr[train_idx]),
                      x_val=inputs(train, val_idx), y_val=labels(y_tr[val_idx]),
                      x_test=inputs(test, np.arange(len(y_te))), y_test=labels(y_te), num_classes=classes,
                      input_shape=shape, augmentation=augmentation if cfg.augment else None)


def imagenet_root(cfg: DatasetConfig) -> Path:
    if not cfg.data_root:
        raise DatasetError(
            "dataset.data_root is not set: imagenet (ILSVRC-2012, 1,281,167 train / 50,000 val images) is read "
            "from a local ImageNet root, which cannot be downloaded; set dataset.data_root to the folder holding "
            "its train/ and val/ class folders")
    root = Path(os.path.expanduser(cfg.data_root))
    missing = [str(root / part) for part in ("train", "val") if not (root / part).is_dir()]
    if missing:
        raise DatasetError(f"dataset.data_root={cfg.data_root!r}: imagenet needs the class folders "
                           f"{' and '.join(missing)}, which do not exist")
    return root


def stream_imagenet(cfg: DatasetConfig) -> tuple[Any, Any]:
    """ImageNet's train/ and val/ class folders, 224x224 centre crops (resized from 256), normalized."""
    root = imagenet_root(cfg)
    return image_folder(str(root / "train"), size=224), image_folder(str(root / "val"), size=224)
