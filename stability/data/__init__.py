"""Datasets as in-memory tensors: packaged, torchvision and registered sources, seeded splits, augmentation.

- ``splits``: ``DataSplits`` (the train / validation / test tensors a run trains on), the seeded
  stratified splits that make them, and ``augment_batch``;
- ``sources``: ``DATASETS`` (one ``DatasetSpec`` per name, carrying its loader), ``load_dataset`` and
  ``register_dataset``.

Import from this package, not its modules; the modules import each other, never this face.
"""

from __future__ import annotations

from .sources import (
    DATASETS,
    MAX_REGISTERED_BYTES,
    DatasetSpec,
    load_dataset,
    permuted_pixels,
    register_dataset,
)
from .splits import CIFAR_PAD, DataSplits, augment_batch

__all__ = ["CIFAR_PAD", "DATASETS", "MAX_REGISTERED_BYTES", "DataSplits", "DatasetSpec", "augment_batch",
           "load_dataset", "permuted_pixels", "register_dataset"]
