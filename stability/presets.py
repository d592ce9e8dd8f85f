"""Named settings: the papers' reference setups and small ones that run in seconds on a CPU.

A preset is a nested dict in the shape of a TOML config. Sections other than the
training run's (``[instability]``, ``[imp]``, ``[hessian]``) hold the defaults of
the later stages for that preset.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from .config import STAGE_TABLES, Config, from_dict, read_toml
from .errors import ConfigError

PRESETS: dict[str, dict[str, Any]] = {
    # ---- paper settings (DESIGN section 5); need torchvision data under dataset.data_root
    "lenet300_mnist": {
        "description": "LeNet-300-100 on MNIST (Frankle & Carbin 2019): Adam 1.2e-3, batch 60, 50K iterations",
        "dataset": {"name": "mnist", "val_size": 5000},
        "model": {"name": "lenet_300_100", "init": "glorot_normal"},
        "optimizer": {"name": "adam", "lr": 1.2e-3},
        "training": {"steps": "50000it", "batch_size": 60, "eval_every": "1000it", "checkpoint_every": "2000it",
                     "rewind_points": ["0it", "100it", "250it", "500it", "1000it", "2000it"]},
        "imp": {"strategy": "layerwise", "prune_fraction": 0.2, "rate_overrides": {"output": 0.1}},
    },
    "conv2_cifar10": {
        "description": "Conv-2 on CIFAR-10 (Frankle & Carbin 2019): Adam 2e-4, batch 60, 20K iterations",
        "dataset": {"name": "cifar10", "val_size": 5000},
        "model": {"name": "conv2", "init": "glorot_normal"},
        "optimizer": {"name": "adam", "lr": 2e-4},
        "training": {"steps": "20000it", "batch_size": 60, "eval_every": "1000it", "checkpoint_every": "2000it"},
        "imp": {"strategy": "layerwise", "prune_fraction": 0.2, "conv_fraction": 0.1, "rate_overrides": {"output": 0.1}},
    },
    "conv4_cifar10": {
        "description": "Conv-4 on CIFAR-10 (Frankle & Carbin 2019): Adam 3e-4, batch 60, 25K iterations",
        "dataset": {"name": "cifar10", "val_size": 5000},
        "model": {"name": "conv4", "init": "glorot_normal"},
        "optimizer": {"name": "adam", "lr": 3e-4},
        "training": {"steps": "25000it", "batch_size": 60, "eval_every": "1000it", "checkpoint_every": "2000it"},
        "imp": {"strategy": "layerwise", "prune_fraction": 0.2, "conv_fraction": 0.1, "rate_overrides": {"output": 0.1}},
    },
    "conv6_cifar10": {
        "description": "Conv-6 on CIFAR-10 (Frankle & Carbin 2019): Adam 3e-4, batch 60, 30K iterations",
        "dataset": {"name": "cifar10", "val_size": 5000},
        "model": {"name": "conv6", "init": "glorot_normal"},
        "optimizer": {"name": "adam", "lr": 3e-4},
        "training": {"steps": "30000it", "batch_size": 60, "eval_every": "1000it", "checkpoint_every": "2000it"},
        "imp": {"strategy": "layerwise", "prune_fraction": 0.2, "conv_fraction": 0.15, "rate_overrides": {"output": 0.1}},
    },
    "resnet20_cifar10": {
        "description": "ResNet-20 on CIFAR-10, Frankle et al. 2020 Table 1 'Standard' on open_lth's schedule "
                       "(models/cifar_resnet.py): SGD 0.1 m0.9 wd1e-4, batch 128, 160 epochs (62,400 it), lr x0.1 "
                       "at 80ep and 120ep; the paper's own schedule (63K it, x0.1 at 32K and 48K) is "
                       "resnet20_cifar10_frankle2020",
        "dataset": {"name": "cifar10", "val_size": 0},
        "model": {"name": "resnet", "depth": 20, "init": "kaiming_normal", "bn_init": "uniform"},
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
        "schedule": {"kind": "step", "milestones": ["80ep", "120ep"], "gamma": 0.1},
        "training": {"steps": "160ep", "batch_size": 128, "eval_every": "1ep", "checkpoint_every": "1ep",
                     "rewind_points": ["0it", "100it", "250it", "500it", "1000it", "2000it", "4000it"]},
        "imp": {"strategy": "global", "prune_fraction": 0.2},
    },
    "vgg16_cifar10": {
        "description": "VGG-16 on CIFAR-10, Frankle et al. 2020 Table 1 'Standard' on open_lth's schedule "
                       "(models/cifar_vgg.py): SGD 0.1 m0.9 wd1e-4, batch 128, 160 epochs (62,400 it), lr x0.1 at "
                       "80ep and 120ep, output layer unpruned; the paper's own schedule (63K it, x0.1 at 32K and "
                       "48K) is vgg16_cifar10_frankle2020",
        "dataset": {"name": "cifar10", "val_size": 0},
        "model": {"name": "vgg16", "init": "kaiming_normal", "bn_init": "uniform"},
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
        "schedule": {"kind": "step", "milestones": ["80ep", "120ep"], "gamma": 0.1},
        "training": {"steps": "160ep", "batch_size": 128, "eval_every": "1ep", "checkpoint_every": "1ep",
                     "rewind_points": ["0it", "100it", "250it", "500it", "1000it", "2000it"]},
        "imp": {"strategy": "global", "prune_fraction": 0.2, "exclude": ["output"]},
    },
    # ---- small settings on packaged data: seconds on 2 CPU cores
    "lenet300_mnist5k": {
        "description": "LeNet-300-100 on 5,000 packaged MNIST digits: Adam 1.2e-3, batch 60, 600 iterations",
        "dataset": {"name": "mnist5k"},
        "model": {"name": "lenet_300_100", "init": "glorot_normal"},
        "optimizer": {"name": "adam", "lr": 1.2e-3},
        "training": {"steps": "600it", "batch_size": 60, "eval_every": "50it", "checkpoint_every": "100it",
                     "rewind_points": ["0it", "10it", "25it", "50it", "100it", "200it"]},
        "imp": {"strategy": "layerwise", "prune_fraction": 0.2, "rate_overrides": {"output": 0.1}},
    },
    "conv4_mnist5k": {
        # lr 0.05 (no BatchNorm) dies at step ~50: lambda_max at init ~890 is far past 2(1+m)/lr.
        "description": "Conv-4 at width 1/4 on 5,000 packaged MNIST digits: SGD 0.01 m0.9, batch 60, 400 iterations",
        "dataset": {"name": "mnist5k"},
        "model": {"name": "conv4", "width": 0.25, "init": "kaiming_normal"},
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
        "training": {"steps": "400it", "batch_size": 60, "eval_every": "100it", "checkpoint_every": "100it",
                     "rewind_points": ["0it", "10it", "25it", "50it", "100it", "200it"]},
        "imp": {"strategy": "global", "prune_fraction": 0.2},
    },
    "lenet5_mnist5k": {
        "description": "LeNet-5 (conv 6-16, FC 120-84) on 5,000 packaged MNIST digits: SGD 0.02 m0.9, batch 60, 500 iterations",
        "dataset": {"name": "mnist5k"},
        "model": {"name": "lenet5", "init": "kaiming_normal"},
        "optimizer": {"name": "sgd", "lr": 0.02, "momentum": 0.9},
        "training": {"steps": "500it", "batch_size": 60, "eval_every": "50it", "checkpoint_every": "100it",
                     "rewind_points": ["0it", "10it", "25it", "50it", "100it", "200it"]},
        "imp": {"strategy": "global", "prune_fraction": 0.2},
    },
    "resnet8_mnist5k": {
        "description": "ResNet-8 at width 1/2 (BatchNorm) on 5,000 packaged MNIST digits: SGD 0.05 m0.9, 300 iterations",
        "dataset": {"name": "mnist5k"},
        "model": {"name": "resnet", "depth": 8, "width": 0.5, "init": "kaiming_normal"},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
        "training": {"steps": "300it", "batch_size": 60, "eval_every": "50it", "checkpoint_every": "100it",
                     "rewind_points": ["0it", "25it", "50it", "100it"]},
        "imp": {"strategy": "global", "prune_fraction": 0.2},
    },
    "conv2_mnist5k": {
        "description": "Conv-2 at width 1/4 (conv 16-16, FC 64-64) on 5,000 packaged MNIST digits: Adam 1e-3, "
                       "batch 60, 1000 iterations; the no-dropout half of the dropout + pruning pair",
        "dataset": {"name": "mnist5k"},
        "model": {"name": "conv2", "width": 0.25, "init": "glorot_normal"},
        "optimizer": {"name": "adam", "lr": 1e-3},
        "training": {"steps": "1000it", "batch_size": 60, "eval_every": "100it", "checkpoint_every": "100it",
                     "rewind_points": ["0it", "10it", "25it", "50it", "100it", "200it"]},
        "imp": {"strategy": "layerwise", "prune_fraction": 0.2, "conv_fraction": 0.1, "rate_overrides": {"output": 0.1}},
    },
    "mlp_mnist1d": {
        "description": "MLP 100-100 on MNIST-1D (generated locally with the package's defaults: 4,000 train / "
                       "1,000 test, none held out): Adam 1e-2, batch 100, 6000 iterations, the settings of the "
                       "mnist1d repo's notebooks (train.py get_model_args, mnist1d-classification.ipynb). "
                       "Published: MLP 68% test accuracy (mnist1d README table); that notebook's own run prints "
                       "65.1% at step 6000. Here: 66.3% (64.6-67.1 over init seeds 0-4); the reference MLP adds a "
                       "residual to its second layer and takes batches in order. Before (Adam 1e-3, 3000 it, 500 "
                       "held out): 59.0%",
        "dataset": {"name": "mnist1d", "val_size": 0},
        "model": {"name": "mlp", "hidden": [100, 100]},
        "optimizer": {"name": "adam", "lr": 1e-2},
        "training": {"steps": "6000it", "batch_size": 100, "eval_every": "250it", "checkpoint_every": "500it",
                     "rewind_points": ["0it", "25it", "100it", "250it", "500it"]},
        "imp": {"strategy": "global", "prune_fraction": 0.2},
    },
}


# ResNet-32: the open_lth recipe of ResNet-20, at depth 32.
PRESETS["resnet32_cifar10"] = {
    **copy.deepcopy(PRESETS["resnet20_cifar10"]),
    "description": "ResNet-32 on CIFAR-10 (the open_lth recipe of ResNet-20 at depth 32): SGD 0.1 m0.9 wd1e-4, "
                   "batch 128, 160 epochs",
    "model": {**PRESETS["resnet20_cifar10"]["model"], "depth": 32},
}


# Frankle et al. 2020 ("Linear Mode Connectivity and the Lottery Ticket Hypothesis", ICML 2020, PMLR
# 119:3259-3269), Tables 1 and 2 read from the proceedings PDF (issue 27). Two families of presets:
# - <network>_<variant>_frankle2020: the paper's own schedule (Table 1: 63K it, x0.1 at 32K and 48K on CIFAR-10),
#   IMP to the density Table 1 studies; these are what examples/grids/frankle2020_*.toml run;
# - resnet20_cifar10[_low|_warmup], vgg16_cifar10[_low|_warmup]: the same rows on open_lth's 160-epoch schedule
#   (kept: their run names are pinned by tests/test_hashes.py and results exist under them).
# The paper prints no momentum coefficient and no weight decay: open_lth's 0.9 and 1e-4 are used.
PAPER = "Frankle et al. 2020 (ICML, PMLR 119:3259-3269)"
CITED = {"test_accuracy_pct": "Table 1", "density_pct": "Table 1", "pruning": "Table 1 and section 4.2",
         "first_stable_step_dense": "section 3, Figure 3", "first_stable_step_imp": "section 4.3",
         "table2_k0_pct": "Table 2 (IMP rewound to k = 0 at the Table 1 density; means over 3 initializations, "
                          "every std < 0.2)",
         "criteria": "Figure 9 (stable: instability < 2%; matching: accuracy drop < 0.2 points)"}
TABLE2_COLUMNS = ("full", "imp", "random_pruning", "random_reinit", "delta_imp", "matching")


def _published(accuracy: float, std: float, density: float, pruning: str, dense: str | None, imp: str,
               table2: tuple[float, float, float, float, float, bool]) -> dict[str, Any]:
    """A Table 1 row's published figures: percents, steps as the paper gives them (None: not printed for the row)."""
    return {"paper": PAPER, "test_accuracy_pct": accuracy, "test_accuracy_std_pct": std, "density_pct": density,
            "pruning": pruning, "first_stable_step_dense": dense, "first_stable_step_imp": imp,
            "table2_k0_pct": dict(zip(TABLE2_COLUMNS, table2)),
            "criteria": {"instability": 0.02, "matching_drop_pct": 0.2}, "cited": dict(CITED)}


def _published_text(pub: dict[str, Any]) -> str:
    """The published figures in words, each with its table or section."""
    t2 = pub["table2_k0_pct"]
    dense = pub["first_stable_step_dense"]
    dense_text = (f"{dense} (section 3, Figure 3)" if dense is not None else
                  "not printed for this row in Tables 1-2 or section 3 (which give the Standard rows)")
    return (f"Published ({PAPER}): dense test accuracy {pub['test_accuracy_pct']} +- {pub['test_accuracy_std_pct']}% "
            f"(Table 1); IMP matching sparsity: {pub['pruning']} global magnitude pruning to {pub['density_pct']}% "
            f"density (Table 1), where IMP rewound to k = 0 reaches {t2['imp']}% vs {t2['full']}% dense, random "
            f"pruning {t2['random_pruning']}%, random reinit {t2['random_reinit']}% (Table 2: "
            f"{'matching' if t2['matching'] else 'not matching'}, delta {t2['delta_imp']}); first stable step: dense "
            f"{dense_text}, IMP subnetwork {pub['first_stable_step_imp']} (section 4.3, where it also becomes matching)")


# preset stem: (network, variant, lr, warmup, IMP levels at 20% to the Table 1 density, published)
FRANKLE2020_CIFAR10 = {
    "resnet20_cifar10": ("ResNet-20", "Standard", 0.1, "0it", 8,
                         _published(91.7, 0.1, 16.8, "iterative", "2000it", "500it", (91.7, 88.5, 88.6, 88.8, 3.2, False))),
    "resnet20_cifar10_low": ("ResNet-20", "Low", 0.01, "0it", 11,
                             _published(88.8, 0.1, 8.6, "iterative", None, "0it", (88.8, 89.0, 85.7, 84.7, -0.2, True))),
    "resnet20_cifar10_warmup": ("ResNet-20", "Warmup", 0.03, "30000it", 11,
                                _published(89.7, 0.3, 8.6, "iterative", None, "0it", (89.7, 89.6, 85.7, 85.6, 0.1, True))),
    "vgg16_cifar10": ("VGG-16", "Standard", 0.1, "0it", 19,
                      _published(93.7, 0.1, 1.5, "iterative", "1000it", "1000it", (93.7, 90.9, 89.4, 91.0, 2.8, False))),
    "vgg16_cifar10_low": ("VGG-16", "Low", 0.01, "0it", 13,
                          _published(91.7, 0.1, 5.5, "iterative", None, "0it", (91.7, 91.6, 90.1, 90.2, 0.1, True))),
    "vgg16_cifar10_warmup": ("VGG-16", "Warmup", 0.1, "30000it", 19,
                             _published(93.4, 0.1, 1.5, "iterative", None, "0it", (93.4, 93.2, 90.1, 90.7, 0.2, True))),
}
PAPER_REWIND_POINTS = ["0it", "25it", "100it", "500it", "2000it", "10000it"]  # Figure 3's axis


def _frankle2020_variant(base: str, variant: str, lr: float, warmup: str) -> dict[str, Any]:
    tables = copy.deepcopy(PRESETS[base])
    tables["optimizer"]["lr"] = lr
    if warmup != "0it":
        tables["schedule"]["warmup"] = warmup
    return tables


for _stem, (_net, _variant, _lr, _warmup, _levels, _pub) in FRANKLE2020_CIFAR10.items():
    _base = "resnet20_cifar10" if _net == "ResNet-20" else "vgg16_cifar10"
    _settings = f"SGD lr {_lr}" + (f" reached by a linear warmup over {_warmup}" if _warmup != "0it" else "")
    if _stem != _base:  # open_lth's schedule, the Standard preset with the row's learning rate and warmup
        PRESETS[_stem] = _frankle2020_variant(_base, _variant, _lr, _warmup)
        PRESETS[_stem]["description"] = (
            f"{_net} on CIFAR-10, Frankle et al. 2020 Table 1 '{_variant}': {_base} ({_settings}) on open_lth's "
            f"160-epoch schedule; the paper's own schedule is {_stem}_frankle2020")
    PRESETS[_stem]["description"] += ". " + _published_text(_pub)
    PRESETS[_stem]["published"] = {**_pub, "schedule": "open_lth's 160 epochs, not the paper's 63K it"}
    paper = copy.deepcopy(PRESETS[_stem])
    paper["schedule"]["milestones"] = ["32000it", "48000it"]
    paper["training"].update(steps="63000it", eval_every="1000it", checkpoint_every="1000it",
                             rewind_points=list(PAPER_REWIND_POINTS))
    paper["imp"]["levels"] = _levels
    paper["published"] = _pub
    paper["description"] = (
        f"{_net} on CIFAR-10, {PAPER} Table 1 '{_variant}', the paper's schedule: {_settings}, momentum 0.9 and "
        f"weight decay 1e-4 (open_lth's; the paper prints neither), batch 128, 63,000 it, lr x0.1 at 32,000 and "
        f"48,000 it, BatchNorm, IMP {_levels} levels of 20% (0.8^{_levels} = {100 * 0.8 ** _levels:.1f}%)"
        + (", output layer unpruned (open_lth)" if _net == "VGG-16" else "") + ". " + _published_text(_pub))
    PRESETS[f"{_stem}_frankle2020"] = paper

PRESETS["lenet_mnist_frankle2020"] = {
    "description": f"LeNet-300-100 (266K weights) on MNIST, {PAPER} Table 1: Adam 1.2e-3 (no weight decay), batch 60, "
                   "24,000 it, constant lr, no warmup, no BatchNorm; init kaiming_normal and output layer unpruned "
                   "(open_lth's mnist_lenet_300_100); IMP 15 levels of 20% (0.8^15 = 3.5%). ",
    "dataset": {"name": "mnist", "val_size": 0},
    "model": {"name": "lenet_300_100", "init": "kaiming_normal"},
    "optimizer": {"name": "adam", "lr": 1.2e-3},
    "training": {"steps": "24000it", "batch_size": 60, "eval_every": "1000it", "checkpoint_every": "1000it",
                 "rewind_points": list(PAPER_REWIND_POINTS)},
    "imp": {"strategy": "global", "prune_fraction": 0.2, "levels": 15, "exclude": ["output"]},
    "published": _published(98.3, 0.1, 3.5, "iterative", "0it", "0it", (98.3, 98.2, 96.7, 97.5, 0.1, True)),
}
# ImageNet: the data cannot be downloaded; it streams from a local root (dataset.data_root with train/ and val/
# class folders), and without one the presets are refused when planned, with the setting named.
PRESETS["resnet50_imagenet_frankle2020"] = {
    "description": f"ResNet-50 (25.5M) on ImageNet, {PAPER} Table 1: SGD 0.4 m0.9 wd1e-4 (open_lth's momentum and "
                   "weight decay), batch 1024, 90 epochs, lr x0.1 at epochs 30, 60, 80, linear warmup over 5 epochs, "
                   "BatchNorm; one-shot global magnitude pruning to 30% density. Needs a local ImageNet root "
                   "(dataset.data_root with train/ and val/ class folders), streamed from disk; data-parallel with "
                   "runtime.distributed under torchrun or a Slurm grid. ",
    "dataset": {"name": "imagenet", "val_size": 0},
    "model": {"name": "torchvision/resnet50"},
    "optimizer": {"name": "sgd", "lr": 0.4, "momentum": 0.9, "weight_decay": 1e-4},
    "schedule": {"kind": "step", "milestones": ["30ep", "60ep", "80ep"], "gamma": 0.1, "warmup": "5ep"},
    "training": {"steps": "90ep", "batch_size": 1024, "eval_every": "1ep", "checkpoint_every": "1ep",
                 "rewind_points": ["0it", "2ep", "4ep", "5ep", "6ep", "10ep", "18ep", "28ep"]},
    "imp": {"strategy": "global", "prune_fraction": 0.7, "levels": 1, "one_shot": True},
    "published": _published(76.1, 0.1, 30.0, "one-shot", "18ep", "5ep", (76.1, 73.7, 73.1, 73.4, 2.4, False)),
}
PRESETS["inception_v3_imagenet_frankle2020"] = {
    "description": f"Inception-v3 (27.1M) on ImageNet, {PAPER} Table 1: SGD 0.03 m0.9 wd1e-4 (open_lth's momentum "
                   "and weight decay), batch 1024, 171 epochs, lr decayed linearly to 0.005, no warmup, BatchNorm; "
                   "one-shot global magnitude pruning to 30% density. Needs a local ImageNet root "
                   "(dataset.data_root with train/ and val/ class folders), streamed from disk; data-parallel with "
                   "runtime.distributed under torchrun or a Slurm grid. ",
    "dataset": {"name": "imagenet", "val_size": 0},
    "model": {"name": "torchvision/inception_v3"},
    "optimizer": {"name": "sgd", "lr": 0.03, "momentum": 0.9, "weight_decay": 1e-4},
    "schedule": {"kind": "linear", "final_lr": 0.005},
    "training": {"steps": "171ep", "batch_size": 1024, "eval_every": "1ep", "checkpoint_every": "1ep",
                 "rewind_points": ["0it", "2ep", "4ep", "6ep", "8ep", "10ep", "18ep", "28ep"]},
    "imp": {"strategy": "global", "prune_fraction": 0.7, "levels": 1, "one_shot": True},
    "published": _published(78.1, 0.1, 30.0, "one-shot", "28ep", "6ep", (78.1, 75.7, 75.2, 75.5, 2.4, False)),
}
for _name in ("lenet_mnist_frankle2020", "resnet50_imagenet_frankle2020", "inception_v3_imagenet_frankle2020"):
    PRESETS[_name]["description"] += _published_text(PRESETS[_name]["published"])
FRANKLE2020_PRESETS = tuple(n for n in PRESETS if n.endswith("_frankle2020"))


# Conv-2 with dropout on its fully connected layers: Frankle & Carbin (2019, section 4 and Figure 9) train
# Conv-2/4/6 with dropout, which raised their initial test accuracy and the gains of iterative pruning.
PRESETS["conv2_dropout_mnist5k"] = {
    **copy.deepcopy(PRESETS["conv2_mnist5k"]),
    "description": "Conv-2 at width 1/4 with dropout 0.5 on its FC layers, on 5,000 packaged MNIST digits: Adam 1e-3, "
                   "batch 60, 1000 iterations (compare with conv2_mnist5k)",
    "model": {**PRESETS["conv2_mnist5k"]["model"], "dropout": 0.5},
}


# The warmup control at CPU scale (results/warmup_control/): Frankle et al. 2020 (section 3, Table 1's 'Warmup'
# rows) make ResNet-20 and VGG-16 stable at initialization with a linear learning-rate warmup. A Conv-4 on mnist5k
# at lr 0.03 is unstable at step 0 without warmup (results/lth_search); the pair differs only in the warmup.
PRESETS["conv4_mnist5k_lr03"] = {
    **copy.deepcopy(PRESETS["conv4_mnist5k"]),
    "description": "Conv-4 at width 1/4 on 5,000 packaged MNIST digits: SGD 0.03 m0.9, batch 60, 400 iterations, no "
                   "warmup; unstable at step 0 (the no-warmup half of the warmup control, results/warmup_control)",
    "optimizer": {"name": "sgd", "lr": 0.03, "momentum": 0.9},
}

PRESETS["conv4_mnist5k_lr03_warmup"] = {
    **copy.deepcopy(PRESETS["conv4_mnist5k_lr03"]),
    "description": "conv4_mnist5k_lr03 with a linear warmup over its first 200 of 400 iterations (half of training, "
                   "as the paper's 30K of 63K it): the warmup half of the warmup control (results/warmup_control)",
    "schedule": {"warmup": "200it"},
}


def preset_tables(name: str) -> dict[str, Any]:
    """The raw nested settings of a preset (a copy)."""
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def get_preset(name: str) -> Config:
    """The training-run Config of a preset."""
    tables = preset_tables(name)
    from .config import SECTIONS

    return from_dict({k: v for k, v in tables.items() if k in SECTIONS})


def stage_tables(name: str | None) -> dict[str, dict[str, Any]]:
    """A preset's tables for the later stages (``instability``, ``imp``, ``hessian``), or {}."""
    if not name:
        return {}
    return {k: dict(v) for k, v in preset_tables(name).items() if k in STAGE_TABLES}


def load_toml(path: str | Path) -> tuple[Config, dict[str, dict[str, Any]]]:
    """A TOML config file as (run Config, stage tables).

    A top-level ``preset = "name"`` starts from that preset: its run sections, and its stage
    tables, each overridden key by key by the file's own tables.
    """
    run_sections, tables, preset = read_toml(path)
    base = get_preset(preset) if preset is not None else None
    merged = stage_tables(preset)
    for stage, values in tables.items():
        merged[stage] = {**merged.get(stage, {}), **values}
    return from_dict(run_sections, base), merged
