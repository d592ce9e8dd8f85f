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
from stability.presets import FRANKLE2020_PRESETS, PRESETS, get_preset
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
    # each published figure is stated, with its number and its table or section (issue 27)
    assert "not confirmed" not in description
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


# ---------------------------------------------------------------- the paper's own schedule (issue 27)
# Table 1 of the ICML 2020 paper: preset: (dataset, model, steps, batch, optimizer, lr, milestones (it or ep),
# warmup, BatchNorm, density %, style)
PAPER_TABLE1 = {
    "lenet_mnist_frankle2020": ("mnist", "lenet_300_100", "24000it", 60, "adam", 1.2e-3, (), "0it", False, 3.5,
                                "iterative"),
    "resnet20_cifar10_frankle2020": ("cifar10", "resnet", "63000it", 128, "sgd", 0.1, ("32000it", "48000it"), "0it",
                                     True, 16.8, "iterative"),
    "resnet20_cifar10_low_frankle2020": ("cifar10", "resnet", "63000it", 128, "sgd", 0.01, ("32000it", "48000it"),
                                         "0it", True, 8.6, "iterative"),
    "resnet20_cifar10_warmup_frankle2020": ("cifar10", "resnet", "63000it", 128, "sgd", 0.03, ("32000it", "48000it"),
                                            "30000it", True, 8.6, "iterative"),
    "vgg16_cifar10_frankle2020": ("cifar10", "vgg16", "63000it", 128, "sgd", 0.1, ("32000it", "48000it"), "0it",
                                  True, 1.5, "iterative"),
    "vgg16_cifar10_low_frankle2020": ("cifar10", "vgg16", "63000it", 128, "sgd", 0.01, ("32000it", "48000it"), "0it",
                                      True, 5.5, "iterative"),
    "vgg16_cifar10_warmup_frankle2020": ("cifar10", "vgg16", "63000it", 128, "sgd", 0.1, ("32000it", "48000it"),
                                         "30000it", True, 1.5, "iterative"),
    "resnet50_imagenet_frankle2020": ("imagenet", "torchvision/resnet50", "90ep", 1024, "sgd", 0.4,
                                      ("30ep", "60ep", "80ep"), "5ep", True, 30.0, "one-shot"),
    "inception_v3_imagenet_frankle2020": ("imagenet", "torchvision/inception_v3", "171ep", 1024, "sgd", 0.03, (), "0it",
                                          True, 30.0, "one-shot"),
}
# Table 2 (k = 0): full / IMP / random pruning / random reinit / delta / matching; the stable steps of section 3
# (dense) and 4.3 (IMP)
PAPER_TABLE2 = {
    "lenet_mnist_frankle2020": ((98.3, 98.2, 96.7, 97.5, 0.1, True), "0it", "0it"),
    "resnet20_cifar10_frankle2020": ((91.7, 88.5, 88.6, 88.8, 3.2, False), "2000it", "500it"),
    "resnet20_cifar10_low_frankle2020": ((88.8, 89.0, 85.7, 84.7, -0.2, True), None, "0it"),
    "resnet20_cifar10_warmup_frankle2020": ((89.7, 89.6, 85.7, 85.6, 0.1, True), None, "0it"),
    "vgg16_cifar10_frankle2020": ((93.7, 90.9, 89.4, 91.0, 2.8, False), "1000it", "1000it"),
    "vgg16_cifar10_low_frankle2020": ((91.7, 91.6, 90.1, 90.2, 0.1, True), None, "0it"),
    "vgg16_cifar10_warmup_frankle2020": ((93.4, 93.2, 90.1, 90.7, 0.2, True), None, "0it"),
    "resnet50_imagenet_frankle2020": ((76.1, 73.7, 73.1, 73.4, 2.4, False), "18ep", "5ep"),
    "inception_v3_imagenet_frankle2020": ((78.1, 75.7, 75.2, 75.5, 2.4, False), "28ep", "6ep"),
}
PAPER_GRIDS = {  # grid file: its preset
    "frankle2020_lenet.toml": "lenet_mnist_frankle2020",
    "frankle2020_resnet20.toml": "resnet20_cifar10_frankle2020",
    "frankle2020_resnet20_low.toml": "resnet20_cifar10_low_frankle2020",
    "frankle2020_resnet20_warmup.toml": "resnet20_cifar10_warmup_frankle2020",
    "frankle2020_vgg16.toml": "vgg16_cifar10_frankle2020",
    "frankle2020_vgg16_low.toml": "vgg16_cifar10_low_frankle2020",
    "frankle2020_vgg16_warmup.toml": "vgg16_cifar10_warmup_frankle2020",
    "frankle2020_resnet50.toml": "resnet50_imagenet_frankle2020",
    "frankle2020_inception_v3.toml": "inception_v3_imagenet_frankle2020",
}
PAPER_REWINDS = ["0it", "25it", "100it", "500it", "2000it", "10000it"]  # Figure 3's axis


def test_the_paper_presets_are_exactly_table1():
    assert set(FRANKLE2020_PRESETS) == set(PAPER_TABLE1)


@pytest.mark.parametrize("name", list(PAPER_TABLE1))
def test_each_paper_preset_equals_its_table1_row_field_by_field(name):
    dataset, model, steps, batch, opt, lr, milestones, warmup, bn, density, style = PAPER_TABLE1[name]
    cfg = validate(get_preset(name))
    assert (cfg.dataset.name, cfg.model.name, cfg.training.steps, cfg.training.batch_size) == (dataset, model, steps,
                                                                                              batch)
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.schedule.warmup) == (opt, lr, warmup)
    if opt == "sgd":  # the paper prints neither: open_lth's, and the description says so
        assert (cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (0.9, 1e-4)
        assert "open_lth" in PRESETS[name]["description"]
    else:
        assert cfg.optimizer.weight_decay == 0.0 and cfg.schedule.kind == "constant"
    assert tuple(cfg.schedule.milestones) == milestones
    if milestones:
        assert cfg.schedule.kind == "step" and cfg.schedule.gamma == 0.1
    if name.startswith("inception"):  # linear decay from 0.03 to 0.005
        assert (cfg.schedule.kind, cfg.schedule.final_lr) == ("linear", 0.005)
    assert (cfg.model.name != "lenet_300_100") == bn
    imp = PRESETS[name]["imp"]
    assert imp["strategy"] == "global"  # section 4.2
    # the level whose density (1 - p)^L is nearest Table 1's (VGG-16's 1.5%: 0.8^19 = 1.44%, 0.8^18 = 1.80%)
    nearest = min(range(1, 40), key=lambda L: abs(100 * (1 - imp["prune_fraction"]) ** L - density))
    assert imp["levels"] == nearest and abs(100 * (1 - imp["prune_fraction"]) ** nearest - density) < 0.1
    if style == "iterative":
        assert imp["prune_fraction"] == 0.2 and not imp.get("one_shot")
    else:
        assert imp["levels"] == 1 and imp["one_shot"]
    if dataset != "imagenet":
        assert list(cfg.training.rewind_points) == PAPER_REWINDS


@pytest.mark.parametrize("name", list(PAPER_TABLE1))
def test_each_paper_preset_carries_the_published_figures_with_their_sources(name):
    pub = PRESETS[name]["published"]
    table2, dense, imp = PAPER_TABLE2[name]
    row = PAPER_TABLE1[name]
    assert pub["test_accuracy_pct"] == table2[0] and pub["test_accuracy_std_pct"] in (0.1, 0.3)
    assert pub["density_pct"] == row[9] and pub["pruning"] == row[10]
    assert [pub["table2_k0_pct"][k] for k in ("full", "imp", "random_pruning", "random_reinit", "delta_imp",
                                               "matching")] == list(table2)
    assert (pub["first_stable_step_dense"], pub["first_stable_step_imp"]) == (dense, imp)
    assert pub["criteria"] == {"instability": 0.02, "matching_drop_pct": 0.2}
    assert set(pub["cited"]) >= {"test_accuracy_pct", "density_pct", "first_stable_step_dense",
                                 "first_stable_step_imp", "table2_k0_pct"}
    description = PRESETS[name]["description"]
    assert "not confirmed" not in description and "Table 1" in description and "Table 2" in description
    assert f"{table2[1]}%" in description  # the Table 2 IMP accuracy, in words too


def test_the_open_lth_schedule_presets_carry_the_same_published_row():
    for name in TABLE1:
        pub = PRESETS[name]["published"]
        assert {k: v for k, v in pub.items() if k != "schedule"} == PRESETS[f"{name}_frankle2020"]["published"]
        assert "160 epochs" in pub["schedule"]


def test_presets_json_exposes_the_published_fields(capsys):
    assert main(["presets", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert all("published" in table[n] for n in PAPER_TABLE1)
    assert table["vgg16_cifar10_frankle2020"]["published"]["first_stable_step_dense"] == "1000it"


def test_the_linear_schedule_decays_from_lr_to_final_lr():
    from stability.engine.optim import Schedule

    cfg = get_preset("inception_v3_imagenet_frankle2020").with_overrides({"training.steps": "100it"})
    schedule = Schedule(cfg, ipe=10)
    assert schedule.lr(0) == pytest.approx(0.03) and schedule.lr(100) == pytest.approx(0.005)
    assert schedule.lr(50) == pytest.approx(0.0175)


def _write_tiny_mnist(root: Path, n_train: int = 200, n_test: int = 20) -> Path:
    """An MNIST of random digits in torchvision's idx-ubyte format."""
    import struct

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind, array in (("images-idx3", rng.integers(0, 256, size=(n, 28, 28))), ("labels-idx1", np.arange(n) % 10)):
            header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
            (raw / f"{prefix}-{kind}-ubyte").write_bytes(header + array.astype(np.uint8).tobytes())
    return root


@pytest.mark.parametrize("file", [f for f, p in PAPER_GRIDS.items() if "imagenet" not in p])
def test_the_paper_grids_plan_and_size_their_units_without_training(file, tiny_cifar10, tmp_path, capsys):
    preset = PAPER_GRIDS[file]
    data = _write_tiny_mnist(tmp_path / "mnist") if preset.startswith("lenet") else tiny_cifar10
    root = tmp_path / "runs"
    grid = load_grid(GRIDS / file, {"runtime.results_root": str(root), "dataset.data_root": str(data)})
    assert grid.stages == ("instability", "imp") and len(grid.points()) == 3
    assert sorted(grid.base.with_overrides(p).run_hash() for p in grid.points()) == sorted(
        get_preset(preset).with_overrides({"training.init_seed": s}).run_hash() for s in SEEDS)
    assert grid.tables["instability"]["rewind_points"] == PAPER_REWINDS
    assert grid.tables["imp"]["levels"] == PRESETS[preset]["imp"]["levels"] and grid.tables["imp"]["rewind"] == "0"
    plan = make_plan(grid)
    kinds = [u.kind for u in plan.units]
    assert kinds.count("train") == 3 and kinds.count("instability") == 3 and kinds.count("imp") == 3
    assert kinds.count("siblings") == 3 * len(PAPER_REWINDS)
    trunk = next(u for u in plan.units if u.kind == "train")
    assert trunk.iterations == int(PAPER_TABLE1[preset][2][:-2])  # 63,000 or 24,000 it
    assert not root.exists()
    assert main(["grid", str(GRIDS / file), "--dry-run", "--out", str(root),
                 "--set", f"dataset.data_root={data}"]) == 0
    out = capsys.readouterr().out
    assert "GPU-hours" in out and "TFLOP/s" in out and not root.exists()


@pytest.mark.parametrize("file", ["frankle2020_resnet50.toml", "frankle2020_inception_v3.toml"])
def test_the_imagenet_grids_are_refused_when_planned(file, tmp_path, capsys):
    out = str(tmp_path / "runs")
    assert main(["grid", str(GRIDS / file), "--dry-run", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "dataset.data_root is not set" in err and "imagenet" in err
    # a root without ImageNet's train/ and val/ class folders: refused at planning, not mid-run
    assert main(["grid", str(GRIDS / file), "--dry-run", "--out", out,
                 "--set", f"dataset.data_root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "dataset.data_root" in err and "train" in err and "val" in err
    assert not (tmp_path / "runs").exists()


def test_the_imagenet_grid_plans_where_the_data_exists(tmp_path, capsys):
    """A (tiny) ImageNet root with its class folders: the grid plans, streaming the data from disk."""
    from PIL import Image

    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        (root / split / "n01440764").mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (64, 64)).save(root / split / "n01440764" / f"{i}.JPEG")
    out = tmp_path / "runs"
    assert main(["grid", str(GRIDS / "frankle2020_resnet50.toml"), "--dry-run", "--out", str(out),
                 "--set", f"dataset.data_root={root}", "--set", "training.batch_size=8"]) == 0
    assert "GPU-hours" in capsys.readouterr().out and not out.exists()


# ---------------------------------------------------------------- published beside measured
def _frame(preset: str, run: str, rows: list[dict], **overrides):
    """A record frame of one run of ``preset``: ``rows`` with the preset's settings as ``section.key`` columns."""
    import pandas as pd

    from analysis.load import flatten_settings

    settings = flatten_settings(get_preset(preset).with_overrides(overrides).to_dict())
    return pd.DataFrame([{"run_hash": run, **row, **settings} for row in rows])


def _presets_json(capsys) -> dict:
    assert main(["presets", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_compare_published_puts_the_papers_first_stable_steps_beside_the_measured_ones(capsys, tmp_path):
    import pandas as pd

    from analysis import compare_published

    presets = _presets_json(capsys)
    sweep = [{"rewind_step": k, "split": "test", "instability_mean": m, "first_stable_step": 500.0, "label": None}
             for k, m in ((0, 0.3), (100, 0.1), (500, 0.01), (2000, 0.005))]
    frame = pd.concat([_frame("resnet20_cifar10_frankle2020", "a", sweep),
                       _frame("vgg16_cifar10_warmup_frankle2020", "b", sweep),
                       _frame("lenet300_mnist5k", "c", sweep)])  # no published figures: left out
    (tmp_path / "presets.json").write_text(json.dumps(presets))
    for table in (presets, tmp_path / "presets.json"):
        out = compare_published(frame, table)
        assert list(out["run_hash"]) == ["a", "b"] and set(out["quantity"]) == {"first_stable_step_dense"}
        row = out.set_index("run_hash").loc["a"]
        assert (row["preset"], row["published"], row["measured"]) == ("resnet20_cifar10_frankle2020", 2000, 500.0)
        assert row["source"] == "section 3, Figure 3"
        # the warmup row prints no dense step: NaN, and the preset is told apart from the Standard one by warmup
        assert out.set_index("run_hash").loc["b", "preset"] == "vgg16_cifar10_warmup_frankle2020"
        assert pd.isna(out.set_index("run_hash").loc["b", "published"])


def test_compare_published_reads_table2_from_an_imp_frame_at_the_published_density(capsys):
    from analysis import compare_published

    levels = [{"replicate": r, "level": L, "kind": kind, "density": 0.8 ** L, "rewind_step": 0, "status": "ok",
               "final_test_accuracy": acc - 0.001 * r}
              for r in range(3) for kind, acc in (("imp", 0.885), ("reinit", 0.888), ("random", 0.886))
              for L in range(0 if kind == "imp" else 1, 9)]
    for row in levels:
        if row["level"] == 0:
            row["final_test_accuracy"] = 0.917
    out = compare_published(_frame("resnet20_cifar10_frankle2020", "a", levels), _presets_json(capsys))
    got = out.set_index("quantity")
    assert got.loc["test_accuracy", "published"] == 91.7 and got.loc["test_accuracy", "measured"] == pytest.approx(91.7)
    assert got.loc["table2_imp", "published"] == 88.5
    assert got.loc["table2_imp", "measured"] == pytest.approx(88.4) and got.loc["table2_imp", "count"] == 3
    assert "16.78%" in got.loc["table2_imp", "unit"]  # 0.8^8, the level nearest Table 1's 16.8%
    assert got.loc["table2_random_reinit", "published"] == 88.8 and got.loc["table2_random_pruning", "published"] == 88.6


def test_the_sweep_figure_draws_the_published_step_beside_the_measured_one(capsys):
    import matplotlib

    matplotlib.use("Agg")
    from analysis import compare_published
    from analysis.figures.curves import draw_sweep

    sweep = [{"rewind_step": k, "split": "test", "instability_mean": m, "instability_std": 0.0, "pairs": 1,
              "first_stable_step": 500.0, "split_first_stable_step": 500.0, "threshold": 0.02, "label": None}
             for k, m in ((0, 0.3), (100, 0.1), (500, 0.01), (2000, 0.005))]
    frame = _frame("resnet20_cifar10_frankle2020", "a", sweep)
    comparison = compare_published(frame, _presets_json(capsys))
    (_, fig), = [(n, f) for n, f in draw_sweep({"dense_sweeps": frame, "published": comparison})
                    if n.startswith("instability_a")]
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert any("published first stable step: 2000" in label for label in labels)
    assert any("first stable step" in t.get_text() and "500" in t.get_text()
               for t in fig.axes[0].get_legend().get_texts())
    import matplotlib.pyplot as plt

    plt.close("all")


def test_the_warmup_control_pair_differs_only_in_the_warmup_and_its_grid_sweeps_it(tmp_path):
    plain, warm = get_preset("conv4_mnist5k_lr03"), get_preset("conv4_mnist5k_lr03_warmup")
    assert plain.schedule.warmup == "0it" and warm == plain.with_overrides({"schedule.warmup": "200it"})
    grid = load_grid(GRIDS / "frankle2020_warmup_control_mnist5k.toml", {"runtime.results_root": str(tmp_path)})
    hashes = {grid.base.with_overrides(p).run_hash() for p in grid.points()}
    assert plain.run_hash() in hashes and warm.run_hash() in hashes  # the pair are points of the sweep


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
