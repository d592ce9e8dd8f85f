"""stability.data: packaged datasets, torchvision loaders on tiny files, splits, augmentation."""

from __future__ import annotations

import hashlib
import pickle
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from stability.config import DatasetConfig
from stability.data import (
    CIFAR_PAD,
    DATASETS,
    DataSplits,
    augment_batch,
    load_dataset,
    register_dataset,
)
from stability.data import sources as D
from stability.errors import ConfigError, DatasetError


@pytest.fixture(scope="module", autouse=True)
def stability_cache(tmp_path_factory):
    """Point the mnist1d disk cache at a temporary folder for this module."""
    cache = tmp_path_factory.mktemp("stability_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STABILITY_CACHE", str(cache))
        D._mnist1d_arrays.cache_clear()
        yield cache
    D._mnist1d_arrays.cache_clear()


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.tobytes() for row in x.reshape(len(x), -1).numpy()}


def _check_splits(s: DataSplits, cfg: DatasetConfig) -> None:
    spec = DATASETS[cfg.name]
    assert s.name == cfg.name
    assert s.input_shape == spec.input_shape
    assert s.num_classes == spec.num_classes
    for name in ("train", "val", "test"):
        x, y = s.split(name)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert tuple(x.shape[1:]) == spec.input_shape
        assert len(x) == len(y)
        assert bool(((y >= 0) & (y < spec.num_classes)).all())
    assert len(s.y_val) == cfg.val_size
    assert s.n_train == len(s.y_train)


# ---- registry and bad input -------------------------------------------------------------


def test_registry_keys():
    assert set(DATASETS) == {
        "mnist5k",
        "mnist5k_permuted",
        "mnist1d",
        "digits",
        "mnist",
        "fashion_mnist",
        "cifar10",
        "cifar100",
        "imagenet",  # named by the Frankle et al. 2020 presets; streamed from a local root
    }
    assert DATASETS["cifar100"].num_classes == 100
    assert DATASETS["cifar10"].augmentation == "cifar"


def test_unknown_dataset_names_setting_and_choices():
    with pytest.raises(ConfigError, match=r"dataset\.name.*mnist5k.*cifar100"):
        load_dataset(DatasetConfig(name="tinyimagenet"))


def test_val_size_too_large():
    with pytest.raises(ConfigError, match=r"dataset\.val_size"):
        load_dataset(DatasetConfig(name="mnist5k", val_size=4000))
    with pytest.raises(ConfigError, match=r"dataset\.val_size"):
        load_dataset(DatasetConfig(name="mnist5k", val_size=-1))


@pytest.fixture
def own_datasets(monkeypatch):
    """Registrations made in a test leave the table as it was."""
    monkeypatch.setattr(DATASETS, "_entries", dict(DATASETS._entries))


def test_every_name_carries_its_own_loader():
    """One table: the spec of a name is what loads it (no second table of loaders to fall out of step)."""
    assert all(spec.name == name and callable(spec.loader) for name, spec in DATASETS.items())
    assert DATASETS["mnist5k"].loader is not DATASETS["mnist1d"].loader
    assert DATASETS["cifar10"].loader is DATASETS["mnist"].loader  # one torchvision reader, by name


def test_a_registered_dataset_is_one_entry_loaded_once_and_split_as_the_packaged_ones(own_datasets):
    calls = []

    def loader():
        calls.append(1)
        x = np.random.default_rng(0).normal(size=(300, 2, 4)).astype(np.float32)
        y = np.arange(300) % 3
        return x[:240], y[:240], x[240:], y[240:]

    register_dataset("mine", loader)
    assert DATASETS["mine"].input_shape == () and DATASETS["mine"].num_classes == 0  # read from the data
    a = load_dataset(DatasetConfig(name="mine", val_size=30, split_seed=1))
    b = load_dataset(DatasetConfig(name="mine", val_size=30, split_seed=1))
    assert len(calls) == 1
    assert a.input_shape == (2, 4) and a.num_classes == 3 and torch.bincount(a.y_val).tolist() == [10, 10, 10]
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.x_val, b.x_val)
    for name in ("mine", "mnist5k"):
        with pytest.raises(ConfigError, match=rf"^dataset\.name: a dataset named '{name}' is already registered$"):
            register_dataset(name, loader)
    register_dataset("mine", loader, num_classes=5, replace=True)
    assert load_dataset(DatasetConfig(name="mine", val_size=30)).num_classes == 5
    assert DATASETS["mnist5k"].num_classes == 10


# ---- packaged datasets ------------------------------------------------------------------


def test_mnist5k_shapes_balance_and_partition():
    cfg = DatasetConfig(name="mnist5k", val_size=500, split_seed=0)
    s = load_dataset(cfg)
    _check_splits(s, cfg)
    assert (len(s.y_train), len(s.y_val), len(s.y_test)) == (3500, 500, 1000)
    assert torch.bincount(torch.cat([s.y_train, s.y_val]), minlength=10).tolist() == [400] * 10
    assert torch.bincount(s.y_test, minlength=10).tolist() == [100] * 10
    assert torch.bincount(s.y_val, minlength=10).tolist() == [50] * 10
    assert s.augmentation is None
    # the 5,000 source images are distinct, so distinct rows across splits = a partition
    rows = [_rows(x) for x in (s.x_train, s.x_val, s.x_test)]
    assert len(rows[0] | rows[1] | rows[2]) == 5000
    # scaled to [0, 1] then normalized with the MNIST constants
    assert s.x_train.min().item() == pytest.approx(-D.MNIST_MEAN / D.MNIST_STD, abs=1e-5)
    assert s.x_train.max().item() == pytest.approx((1 - D.MNIST_MEAN) / D.MNIST_STD, abs=1e-5)


def test_mnist5k_deterministic_and_seeded():
    cfg = DatasetConfig(name="mnist5k", val_size=500, split_seed=0)
    a, b = load_dataset(cfg), load_dataset(cfg)
    for name in ("train", "val", "test"):
        assert torch.equal(a.split(name)[0], b.split(name)[0])
        assert torch.equal(a.split(name)[1], b.split(name)[1])
    c = load_dataset(DatasetConfig(name="mnist5k", val_size=500, split_seed=1))
    assert _rows(a.x_test) != _rows(c.x_test)
    assert _rows(a.x_val) != _rows(c.x_val)
    # same test split with a different validation size: the val slice only comes out of train
    d = load_dataset(DatasetConfig(name="mnist5k", val_size=0, split_seed=0))
    assert torch.equal(a.x_test, d.x_test)
    assert _rows(d.x_train) == _rows(a.x_train) | _rows(a.x_val)


def test_val_remainder_spread_and_empty_val():
    s = load_dataset(DatasetConfig(name="mnist5k", val_size=505))
    counts = torch.bincount(s.y_val, minlength=10).tolist()
    assert sorted(counts) == [50] * 5 + [51] * 5
    assert torch.bincount(torch.cat([s.y_train, s.y_val]), minlength=10).tolist() == [400] * 10
    e = load_dataset(DatasetConfig(name="mnist5k", val_size=0))
    assert e.x_val.shape == (0, 1, 28, 28) and e.y_val.shape == (0,)
    assert e.n_train == 4000


def test_digits():
    cfg = DatasetConfig(name="digits", val_size=100, split_seed=3)
    s = load_dataset(cfg)
    _check_splits(s, cfg)
    assert len(s.y_train) + len(s.y_val) + len(s.y_test) == 1797
    assert len(s.y_test) == 359
    assert all(8 <= c <= 11 for c in torch.bincount(s.y_val, minlength=10).tolist())
    assert all(34 <= c <= 38 for c in torch.bincount(s.y_test, minlength=10).tolist())
    rows = [_rows(x) for x in (s.x_train, s.x_val, s.x_test)]
    assert len(rows[0] | rows[1] | rows[2]) == 1797  # the digits images are distinct
    assert abs(s.x_train.mean().item()) < 0.05 and abs(s.x_train.std().item() - 1) < 0.05
    again = load_dataset(cfg)
    assert torch.equal(s.x_train, again.x_train) and torch.equal(s.y_test, again.y_test)


def test_mnist1d(stability_cache):
    cfg = DatasetConfig(name="mnist1d", val_size=500)
    s = load_dataset(cfg)
    _check_splits(s, cfg)
    assert (len(s.y_train), len(s.y_val), len(s.y_test)) == (3500, 500, 1000)
    assert all(45 <= c <= 55 for c in torch.bincount(s.y_val, minlength=10).tolist())
    assert not _rows(s.x_test) & (_rows(s.x_train) | _rows(s.x_val))
    assert not _rows(s.x_train) & _rows(s.x_val)
    cached = list(Path(stability_cache).glob("mnist1d-*.npz"))
    assert len(cached) == 1 and not list(Path(stability_cache).glob("*.tmp"))
    # a fresh process reads the disk cache instead of regenerating
    arrays = D._load_or_make_mnist1d(stability_cache)
    assert np.array_equal(arrays["x_test"], s.x_test.numpy())


def _fake_make_dataset(calls: list):
    def make_dataset(args):
        from mnist1d.utils import set_seed

        calls.append(dict(vars(args)))
        set_seed(args.seed)  # as the real one does: reseeds the global generators
        rng = np.random.default_rng(args.seed)
        return {
            "x": rng.normal(size=(20, 40)),
            "y": np.arange(20) % 10,
            "x_test": rng.normal(size=(5, 40)),
            "y_test": np.arange(5),
        }

    return make_dataset


def test_mnist1d_disk_cache_keyed_atomic_and_restores_global_rng(tmp_path, monkeypatch):
    import mnist1d.data

    calls: list = []
    monkeypatch.setattr(mnist1d.data, "make_dataset", _fake_make_dataset(calls))
    args = D._mnist1d_args()
    random.seed(123)
    np.random.seed(123)
    before = (random.random(), np.random.rand())
    random.seed(123)
    np.random.seed(123)
    first = D._load_or_make_mnist1d(tmp_path, args)
    assert (random.random(), np.random.rand()) == before  # global streams untouched
    assert len(calls) == 1 and first["x"].dtype == np.float32 and first["y"].dtype == np.int64
    again = D._load_or_make_mnist1d(tmp_path, args)
    assert len(calls) == 1 and np.array_equal(first["x"], again["x"])
    changed = dict(args, seed=7)
    assert D._mnist1d_cache_path(tmp_path, changed) != D._mnist1d_cache_path(tmp_path, args)
    assert D._mnist1d_cache_path(tmp_path, dict(args, url="elsewhere")) == D._mnist1d_cache_path(
        tmp_path, args
    )
    other = D._load_or_make_mnist1d(tmp_path, changed)
    assert len(calls) == 2 and not np.array_equal(other["x"], first["x"])
    # a truncated cache file is regenerated, not trusted
    D._mnist1d_cache_path(tmp_path, args).write_bytes(b"PK\x03\x04trunc")
    D._load_or_make_mnist1d(tmp_path, args)
    assert len(calls) == 3
    assert len(list(tmp_path.glob("*.npz"))) == 2 and not list(tmp_path.glob("*.tmp"))


# ---- torchvision datasets from tiny files in the real on-disk format --------------------


N_TRAIN, N_TEST = 30, 10


def _image_ids(n: int, offset: int) -> np.ndarray:
    return np.arange(n, dtype=np.uint8) + offset  # stored in the first pixel of each image


def _write_idx(path: Path, array: np.ndarray) -> None:
    # big-endian header: 0x0000, type code 0x08 (uint8), number of dimensions, then the sizes
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _write_mnist(root: Path, folder: str) -> dict[str, np.ndarray]:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out = {}
    for prefix, n, offset in (("train", N_TRAIN, 0), ("t10k", N_TEST, 100)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = _image_ids(n, offset)
        labels = (np.arange(n) % 10).astype(np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        out[prefix] = images
    return out


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _write_cifar(root: Path, monkeypatch, hundred: bool) -> dict[str, np.ndarray]:
    from torchvision import datasets

    cls = datasets.CIFAR100 if hundred else datasets.CIFAR10
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    label_key = "fine_labels" if hundred else "labels"
    classes = 100 if hundred else 10

    def batch(name: str, n: int, offset: int) -> tuple[list[str], np.ndarray]:
        # rows of 3072 bytes: the red plane (32x32), then green, then blue
        images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        images[:, 0, 0, 0] = _image_ids(n, offset)
        entry = {
            "data": images.reshape(n, 3072),
            label_key: [int(i % classes) for i in range(offset, offset + n)],
        }
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh)
        return [name, _md5(folder / name)], images

    if hundred:
        train_parts = [batch("train", N_TRAIN, 0)]
        test_parts = [batch("test", N_TEST, 100)]
        meta = {"filename": "meta", "key": "fine_label_names"}
        names = {"fine_label_names": [f"c{i}" for i in range(100)]}
    else:
        per = N_TRAIN // 5
        train_parts = [batch(f"data_batch_{i + 1}", per, i * per) for i in range(5)]
        test_parts = [batch("test_batch", N_TEST, 100)]
        meta = {"filename": "batches.meta", "key": "label_names"}
        names = {"label_names": [f"c{i}" for i in range(10)]}
    with open(folder / meta["filename"], "wb") as fh:
        pickle.dump(names, fh)
    # keep torchvision's real integrity check, against the md5 sums of the files written here
    monkeypatch.setattr(cls, "train_list", [entry for entry, _ in train_parts])
    monkeypatch.setattr(cls, "test_list", [entry for entry, _ in test_parts])
    monkeypatch.setattr(cls, "meta", dict(meta, md5=_md5(folder / meta["filename"])))
    return {
        "train": np.concatenate([im for _, im in train_parts]),
        "t10k": np.concatenate([im for _, im in test_parts]),
    }


NORMALIZATION = {
    "mnist": (D.MNIST_MEAN, D.MNIST_STD),
    "fashion_mnist": (D.FASHION_MEAN, D.FASHION_STD),
    "cifar10": (D.CIFAR10_MEAN, D.CIFAR10_STD),
    "cifar100": (D.CIFAR100_MEAN, D.CIFAR100_STD),
}


def _to_uint8(x: torch.Tensor, name: str) -> np.ndarray:
    mean, std = (
        torch.tensor(v, dtype=torch.float32).reshape(1, -1, 1, 1) for v in NORMALIZATION[name]
    )
    return torch.round((x * std + mean) * 255).to(torch.int64).numpy()


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "cifar100"])
def test_torchvision_tiny(name, tmp_path, monkeypatch):
    if name.startswith("cifar"):
        written = _write_cifar(tmp_path, monkeypatch, hundred=name == "cifar100")
    else:
        written = _write_mnist(tmp_path, {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[name])
    cfg = DatasetConfig(name=name, val_size=5, data_root=str(tmp_path), augment=True)
    s = load_dataset(cfg)
    _check_splits(s, cfg)
    assert (len(s.y_train), len(s.y_val), len(s.y_test)) == (N_TRAIN - 5, 5, N_TEST)
    assert s.augmentation == ("cifar" if name.startswith("cifar") else None)
    classes = DATASETS[name].num_classes
    # pixel values round-trip through normalization and the channel layout
    test_pixels = _to_uint8(s.x_test, name)
    expected = written["t10k"] if written["t10k"].ndim == 4 else written["t10k"][:, None]
    assert np.array_equal(test_pixels, expected)
    assert s.y_test.tolist() == [
        (100 + i) % classes if name == "cifar100" else i % 10 for i in range(N_TEST)
    ]
    # index bookkeeping through the id pixel: train and val partition the 30 training images
    train_ids = _to_uint8(s.x_train, name)[:, 0, 0, 0]
    val_ids = _to_uint8(s.x_val, name)[:, 0, 0, 0]
    assert sorted(train_ids.tolist() + val_ids.tolist()) == list(range(N_TRAIN))
    assert s.y_val.tolist() == [i % classes for i in val_ids]
    # validation is stratified: 5 examples from 5 different classes
    assert len(set(s.y_val.tolist())) == 5
    again = load_dataset(cfg)
    assert torch.equal(again.x_val, s.x_val) and torch.equal(again.x_train, s.x_train)
    other = load_dataset(
        DatasetConfig(name=name, val_size=5, data_root=str(tmp_path), split_seed=9)
    )
    assert not torch.equal(other.y_val, s.y_val) or not torch.equal(other.x_val, s.x_val)
    assert (
        load_dataset(
            DatasetConfig(name=name, val_size=5, data_root=str(tmp_path), augment=False)
        ).augmentation
        is None
    )


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "cifar100"])
def test_torchvision_missing_root(name, tmp_path):
    with pytest.raises(DatasetError, match=r"dataset\.data_root.*dataset\.download=true"):
        load_dataset(DatasetConfig(name=name, data_root=""))
    with pytest.raises(DatasetError) as info:
        load_dataset(DatasetConfig(name=name, data_root=str(tmp_path / "nowhere")))
    message = str(info.value)
    assert "dataset.data_root" in message and "dataset.download=true" in message
    assert str(tmp_path / "nowhere") in message


# ---- DataSplits -------------------------------------------------------------------------


def test_datasplits_to_and_split():
    s = load_dataset(DatasetConfig(name="digits", val_size=10), device="meta")
    assert all(
        t.device.type == "meta"
        for t in (s.x_train, s.y_train, s.x_val, s.y_val, s.x_test, s.y_test)
    )
    back = load_dataset(DatasetConfig(name="digits", val_size=10)).to(torch.device("cpu"))
    assert back.x_train.device.type == "cpu" and back.n_train == len(back.y_train)
    with pytest.raises(ConfigError, match="train, val, test"):
        back.split("validation")


# ---- augmentation -----------------------------------------------------------------------


def _crop_params(x: torch.Tensor, out: torch.Tensor) -> list[tuple[int, int, bool]]:
    """For each output image, the (dy, dx, flip) crop of the zero-padded input that it equals."""
    p = CIFAR_PAD
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    h, w = x.shape[-2:]
    crops = padded.unfold(2, h, 1).unfold(3, w, 1)  # (N, C, 2p+1, 2p+1, H, W)
    found = []
    for flip in (False, True):
        target = out.flip(-1) if flip else out
        match = (
            (crops == target[:, :, None, None]).all(dim=-1).all(dim=-1).all(dim=1)
        )  # (N, 2p+1, 2p+1)
        found.append(match)
    params = []
    for i in range(len(x)):
        hits = [
            (int(dy), int(dx), flip)
            for flip, m in zip((False, True), found)
            for dy, dx in m[i].nonzero().tolist()
        ]
        assert len(hits) == 1, (
            f"example {i}: output is not a unique crop/flip of the padded input: {hits}"
        )
        params.append(hits[0])
    return params


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_augment_is_a_crop_and_flip_of_the_padded_input():
    x = torch.randn(64, 3, 32, 32, generator=_gen(0))
    out = augment_batch(x, "cifar", _gen(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    params = _crop_params(x, out)
    assert {dy for dy, _, _ in params} == set(range(9))
    assert {dx for _, dx, _ in params} == set(range(9))
    flips = sum(f for _, _, f in params)
    assert 16 <= flips <= 48
    # an unshifted, unflipped crop reproduces the input exactly
    for i, (dy, dx, flip) in enumerate(params):
        if (dy, dx, flip) == (4, 4, False):
            assert torch.equal(out[i], x[i])


def test_augment_determinism_and_none():
    x = torch.randn(8, 3, 32, 32, generator=_gen(0))
    a = augment_batch(x, "cifar", _gen(5))
    b = augment_batch(x, "cifar", _gen(5))
    c = augment_batch(x, "cifar", _gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert augment_batch(x, None, _gen(5)) is x
    with pytest.raises(ConfigError, match="cifar"):
        augment_batch(x, "imagenet", _gen(5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_augment_same_on_cpu_and_gpu():
    x = torch.randn(16, 3, 32, 32, generator=_gen(0))
    cpu = augment_batch(x, "cifar", _gen(3))
    gpu = augment_batch(x.cuda(), "cifar", _gen(3))
    assert torch.equal(cpu, gpu.cpu())
