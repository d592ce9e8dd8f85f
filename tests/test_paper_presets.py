"""The papers' presets: Frankle et al. 2020's Table 1 variants, their grid files, and the MNIST-1D baseline.

CIFAR-10 is not on the test machines: the grids are planned against a tiny CIFAR-10 written in the
on-disk format torchvision reads (with a batch size of 1, so that its epochs are long enough for the
rewind points), which checks every point's settings and counts the units without training anything.
"""
from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_ARGS

from stability.apps.cli import main
from stability.config import validate
from stability.data import sources as D
from stability.grid.plan import load_grid, make_plan
from stability.presets import PRESETS, get_preset
from stability.steps import to_iterations

GRIDS = Path(__file__).resolve().parents[1] / "examples" / "grids"
TABLE1 = {  # preset: (network, variant, lr, warmup)
    "resnet20_cifar10": ("resnet", "Standard", 0.1, "0it"),
    "resnet20_cifar10_low": ("resnet", "Low", 0.01, "0it"),
    "resnet20_cifar10_warmup": ("resnet", "Warmup", 0.03, "30000it"),
    "vgg16_cifar10": ("vgg16", "Standard", 0.1, "0it"),
    "vgg16_cifar10_low": ("vgg16", "Low", 0.01, "0it"),
    "vgg16_cifar10_warmup": ("vgg16", "Warmup", 0.1, "30000it"),
}
# grid file: (the presets its points are, points, rewind points per point)
TABLE1_GRIDS = {
    "frankle2020_table1.toml": (["resnet20_cifar10", "resnet20_cifar10_low", "vgg16_cifar10", "vgg16_cifar10_low"],
                                12, 9),
    "frankle2020_table1_warmup_resnet20.toml": (["resnet20_cifar10_warmup"], 3, 9),
    "frankle2020_table1_warmup_vgg16.toml": (["vgg16_cifar10_warmup"], 3, 9),
}
SEEDS = (0, 1, 2)


# ---------------------------------------------------------------- the presets
@pytest.mark.parametrize("name", list(TABLE1))
def test_table1_presets_are_valid_and_name_the_paper_and_its_figures(name):
    cfg = validate(get_preset(name))
    network, variant, lr, warmup = TABLE1[name]
    assert cfg.dataset.name == "cifar10" and cfg.model.name == network
    assert cfg.optimizer.name == "sgd" and cfg.optimizer.lr == lr and cfg.schedule.warmup == warmup
    description = PRESETS[name]["description"]
    assert "Frankle et al. 2020" in description and "Table 1" in description and f"'{variant}'" in description
    # each published figure is stated, with its number and source or as "not confirmed"
    for figure in ("dense test accuracy", "IMP matching sparsity", "first stable step"):
        assert figure in description
    assert "open_lth" in description


def test_the_variants_change_only_the_learning_rate_and_warmup_of_the_standard_presets():
    for name, (network, variant, lr, warmup) in TABLE1.items():
        standard = get_preset("resnet20_cifar10" if network == "resnet" else "vgg16_cifar10")
        assert get_preset(name) == standard.with_overrides({"optimizer.lr": lr, "schedule.warmup": warmup})
        if variant == "Warmup":  # the paper's 30,000-iteration linear warmup, whatever the epoch length
            assert to_iterations(get_preset(name).schedule.warmup, 390, "schedule.warmup") == 30000
        if variant == "Low":  # the paper's low learning rate, a tenth of the standard one
            assert get_preset(name).optimizer.lr == 0.01 == lr
            assert standard.optimizer.lr == 0.1
        # IMP settings (stage tables) are the standard preset's
        base = "resnet20_cifar10" if network == "resnet" else "vgg16_cifar10"
        assert PRESETS[name]["imp"] == PRESETS[base]["imp"]


# ---------------------------------------------------------------- the grid files
def test_every_point_of_the_table1_grids_is_one_of_the_presets(tmp_path):
    for file, (presets, points, _) in TABLE1_GRIDS.items():
        grid = load_grid(GRIDS / file, {"runtime.results_root": str(tmp_path)})
        assert grid.stages == ("instability",) and len(grid.points()) == points
        got = sorted(grid.base.with_overrides(p).run_hash() for p in grid.points())
        want = sorted(get_preset(n).with_overrides({"training.init_seed": s}).run_hash()
                      for n in presets for s in SEEDS)
        assert got == want, file


def _write_tiny_cifar10(root: Path, monkeypatch, n_train: int = 200, n_test: int = 20) -> Path:
    """A CIFAR-10 of n_train + n_test random images in torchvision's on-disk format (pickled batches)."""
    from torchvision import datasets

    cls = datasets.CIFAR10
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(name: str, n: int) -> list[str]:
        entry = {"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), "labels": [i % 10 for i in range(n)]}
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh)
        return [name, hashlib.md5((folder / name).read_bytes()).hexdigest()]

    train = [batch(f"data_batch_{i + 1}", n_train // 5) for i in range(5)]
    test = [batch("test_batch", n_test)]
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)
    # torchvision's own integrity check runs, against the md5 sums of the files written here
    monkeypatch.setattr(cls, "train_list", train)
    monkeypatch.setattr(cls, "test_list", test)
    monkeypatch.setattr(cls, "meta", {"filename": "batches.meta", "key": "label_names",
                                      "md5": hashlib.md5((folder / "batches.meta").read_bytes()).hexdigest()})
    return root


@pytest.fixture
def tiny_cifar10(tmp_path, monkeypatch):
    return _write_tiny_cifar10(tmp_path / "data", monkeypatch)


@pytest.mark.parametrize("file", list(TABLE1_GRIDS))
def test_the_table1_grids_plan_their_units_without_training(file, tiny_cifar10, tmp_path):
    _, points, rewinds = TABLE1_GRIDS[file]
    root = tmp_path / "runs"
    # batch 1 on 200 images: 200 it/epoch, 160 epochs = 32,000 it, past every rewind point and the warmup
    grid = load_grid(GRIDS / file, {"runtime.results_root": str(root), "dataset.data_root": str(tiny_cifar10),
                                    "training.batch_size": 1})
    plan = make_plan(grid)
    kinds = [u.kind for u in plan.units]
    assert kinds.count("train") == points and kinds.count("instability") == points
    assert kinds.count("siblings") == points * rewinds and len(kinds) == points * (rewinds + 2)
    assert all(u.iterations > 0 for u in plan.units if u.kind in ("train", "siblings"))
    assert not root.exists()  # planned, nothing run or written


def test_the_cli_dry_run_prints_the_table1_plan_and_writes_nothing(tiny_cifar10, tmp_path, capsys):
    root = tmp_path / "runs"
    assert main(["grid", str(GRIDS / "frankle2020_table1.toml"), "--dry-run", "--out", str(root),
                 "--set", f"dataset.data_root={tiny_cifar10}", "--set", "training.batch_size=1"]) == 0
    out = capsys.readouterr().out
    assert "siblings" in out and "iterations" in out
    assert not root.exists()


def test_without_cifar10_the_table1_grid_is_refused_with_the_setting_named(tmp_path, capsys):
    assert main(["grid", str(GRIDS / "frankle2020_table1.toml"), "--dry-run", "--out", str(tmp_path / "runs"),
                 "--set", f"dataset.data_root={tmp_path / 'nothing'}"]) == 2
    assert "dataset.data_root" in capsys.readouterr().err


# ---------------------------------------------------------------- MNIST-1D
@pytest.fixture
def mnist1d_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STABILITY_CACHE", str(tmp_path / "cache"))
    D._mnist1d_arrays.cache_clear()
    yield
    D._mnist1d_arrays.cache_clear()


def test_mlp_mnist1d_has_the_mnist1d_reference_settings_and_states_both_figures():
    cfg = validate(get_preset("mlp_mnist1d"))
    # the mnist1d repo's notebooks/train.py (Adam 1e-2, batch 100, no weight decay) for 6000 steps, on the
    # package's 4,000 / 1,000 split with nothing held out
    assert cfg.dataset.name == "mnist1d" and cfg.dataset.val_size == 0
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.weight_decay) == ("adam", 1e-2, 0.0)
    assert cfg.training.batch_size == 100 and cfg.training.steps == "6000it"
    description = PRESETS["mlp_mnist1d"]["description"]
    assert "68%" in description and "66.3%" in description  # the published figure and the suite's


def test_mlp_mnist1d_tiny_run_trains(mnist1d_cache, results_root, capsys):
    assert main(["train", "--preset", "mlp_mnist1d", *TINY_ARGS, "--out", str(results_root), "--threads", "1",
                 "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["final_step"] == 30 and not summary["untrained"]
    assert summary["checkpoints"] == ["0it", "5it", "10it", "30it"]
