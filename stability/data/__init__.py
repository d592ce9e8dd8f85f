"""Datasets as in-memory tensors or streamed from disk: packaged, torchvision and registered sources, seeded splits,
augmentation.

- ``splits``: ``DataSplits`` (the train / validation / test tensors a run trains on), the seeded
  stratified splits that make them, and ``augment_batch``;
- ``sources``: ``DATASETS`` (one ``DatasetSpec`` per name, carrying its loader), ``load_dataset`` and
  ``register_dataset``;
- ``streaming``: ``StreamedInputs`` (a split's inputs read through a DataLoader on access) and ``image_folder``.

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
from .streaming import EpochReader, StreamedInputs, image_folder, in_chunks, is_streamed

__all__ = ["CIFAR_PAD", "DATASETS", "MAX_REGISTERED_BYTES", "DataSplits", "DatasetSpec", "EpochReader",
           "StreamedInputs", "augment_batch", "image_folder", "in_chunks", "is_streamed", "load_dataset", "permuted_pixels",
           "register_dataset"]
