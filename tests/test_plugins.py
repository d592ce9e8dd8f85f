"""The user's own model and data: registered by a plugin module, used everywhere a built-in name is."""
from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

from stability.apps.cli import main

PLUGIN = textwrap.dedent('''
    """A plugin of the user's: a model with layers the zoo does not use, and a dataset of its own."""
    import numpy as np
    import torch
    from torch import nn

    import stability


    class DepthwiseGN(nn.Module):
        """A depthwise-separable conv net with GroupNorm (no BatchNorm, no zoo layer layout)."""

        def __init__(self, cfg, input_shape, num_classes):
            super().__init__()
            c = max(4, int(8 * cfg.width))
            self.stem = nn.Conv2d(input_shape[0], c, 3, padding=1)
            self.norm = nn.GroupNorm(2, c)
            self.depthwise = nn.Conv2d(c, c, 3, padding=1, groups=c)
            self.pointwise = nn.Conv2d(c, 2 * c, 1)
            self.head = nn.Linear(2 * c, num_classes)
            self.output_layer = "head"

        def forward(self, x):
            x = torch.relu(self.norm(self.stem(x)))
            x = torch.relu(self.pointwise(self.depthwise(x)))
            return self.head(x.mean((2, 3)))


    def blobs():
        """Three Gaussian blobs drawn as 8x8 images: a dataset that exists nowhere but here."""
        rng = np.random.default_rng(0)
        centers = rng.normal(size=(3, 1, 8, 8)).astype(np.float32)
        y = rng.integers(0, 3, size=900)
        x = centers[y] + 0.9 * rng.normal(size=(900, 1, 8, 8)).astype(np.float32)
        return x[:700], y[:700], x[700:], y[700:]


    stability.register_model("depthwise_gn", lambda cfg, shape, n: DepthwiseGN(cfg, shape, n), replace=True)
    stability.register_dataset("blobs", blobs, replace=True)
    stability.register_model("broken_factory", lambda cfg, shape, n: 1 / 0, replace=True)
    stability.register_model("wrong_logits", lambda cfg, shape, n: nn.Flatten(), replace=True)
''')

SETTINGS = ["--set=model.name=depthwise_gn", "--set=dataset.name=blobs", "--set=dataset.val_size=100",
            "--set=optimizer.name=sgd", "--set=optimizer.lr=0.1", "--set=optimizer.momentum=0.9",
            "--set=training.steps=40it", "--set=training.batch_size=32", "--set=training.eval_every=10it",
            "--set=training.checkpoint_every=10it", "--set=training.rewind_points=0it,10it", "--quiet"]


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "my_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_plugin"
    sys.modules.pop("my_plugin", None)


def test_a_registered_model_and_dataset_run_a_sweep_imp_and_hessian_from_the_cli(tmp_path, plugin, capsys):
    base = ["--preset", "lenet300_mnist5k", *SETTINGS, "--plugin", plugin, "--out", str(tmp_path / "runs")]
    assert main(["instability", *base, "--rewind", "0it,10it", "--alphas", "5", "--json"]) == 0
    sweep = json.loads(capsys.readouterr().out)
    rows = sweep["per_split"]["test"]
    assert [r["rewind_step"] for r in rows] == [0, 10] and all(r["status"] == "ok" for r in rows)
    assert main(["imp", *base, "--levels", "2", "--rewind", "10it", "--baselines", "reinit", "--json"]) == 0
    imp = json.loads(capsys.readouterr().out)
    assert imp["tickets"]["dense_accuracy"] > 0.6  # it learned the blobs (chance is ~1/3)
    # prunable: the conv and linear weights; GroupNorm's affine parameters are not pruned
    from stability.store.files import load_tensors

    masks, _ = load_tensors(next((tmp_path / "runs").glob("imp_*/masks/replicate_0_level_1.safetensors")))
    assert set(masks) == {"stem.weight", "depthwise.weight", "pointwise.weight", "head.weight"}
    assert main(["hessian", *base, "--at", "40it", "--top", "2", "--samples", "200", "--json"]) == 0
    hessian = json.loads(capsys.readouterr().out)["rows"][0]
    assert hessian["lambda_1"] >= hessian["lambda_2"] > 0


def test_registered_names_work_from_python_and_the_batched_siblings_equal_one_at_a_time(tmp_path, plugin):
    import importlib

    importlib.import_module(plugin)
    from helpers import tiny_config

    from stability.engine import StackedModel
    from stability.stages.context import prepare
    from stability.stages.siblings import SiblingSettings, sibling_seeds, train_siblings
    from stability.testing.reference import train_siblings_reference

    cfg = tiny_config(tmp_path, model__name="depthwise_gn", dataset__name="blobs", dataset__val_size="100",
                      optimizer__name="sgd", optimizer__lr="0.1")
    ctx = prepare(cfg)
    assert ctx.data.input_shape == (1, 8, 8) and ctx.data.num_classes == 3
    sib = train_siblings(ctx, 5, SiblingSettings(2))
    order, aug = sibling_seeds(cfg.training.noise_seed, SiblingSettings(2))
    reference = train_siblings_reference(ctx, 5, order, aug)
    for i, ref in enumerate(reference):
        got = sib.members.member_state_dict(i)
        assert all(torch.allclose(got[k], ref[k], atol=1e-5) for k in ref)
    # the vmap path (used on GPUs) batches this module too, and agrees with the member loop
    sm = StackedModel(ctx.model, strategy="vmap")
    x = ctx.data.x_test[:16]
    stacked = sib.members.params
    out_vmap = sm.logits(stacked, sib.members.buffers, x, train=False, shared_input=True)
    out_loop = StackedModel(ctx.model, strategy="loop").logits(stacked, sib.members.buffers, x, train=False,
                                                               shared_input=True)
    assert sm.last_strategy == "vmap" and torch.allclose(out_vmap, out_loop, atol=1e-5)


@pytest.mark.parametrize("args, match", [
    (["--plugin", "no_such_plugin_module"], "--plugin 'no_such_plugin_module': import failed: ModuleNotFoundError"),
    (["--set=model.name=broken_factory"], "the factory of 'broken_factory' failed: ZeroDivisionError"),
    (["--set=model.name=wrong_logits"], "must map [B, 1, 8, 8] inputs to [B, 3] logits"),
    (["--set=model.name=not_registered"], "model.name: unknown model 'not_registered'; choose one of"),
])
def test_broken_or_unknown_plugins_exit_2_naming_them_and_write_nothing(tmp_path, plugin, capsys, args, match):
    base = ["--preset", "lenet300_mnist5k", *SETTINGS, "--plugin", plugin, "--out", str(tmp_path / "runs")]
    base = [a for a in base if a != "--set=model.name=depthwise_gn"]
    assert main(["train", *base, *args]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_torchvision_model_by_name_trains_as_batched_siblings_equal_to_one_at_a_time(tmp_path):
    from helpers import tiny_config

    from stability.stages.context import prepare
    from stability.stages.siblings import SiblingSettings, sibling_seeds, train_siblings
    from stability.testing.reference import train_siblings_reference

    cfg = tiny_config(tmp_path, model__name="torchvision/mobilenet_v3_small", model__stem="cifar",
                      dataset__name="digits", dataset__val_size="100", training__steps="6it",
                      training__rewind_points="3it", training__eval_every="6it", optimizer__name="sgd",
                      optimizer__lr="0.05")
    ctx = prepare(cfg)
    first = next(m for m in ctx.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 1 and first.stride == (1, 1)  # CIFAR stem on 1-channel images
    sib = train_siblings(ctx, 3, SiblingSettings(2))
    order, aug = sibling_seeds(cfg.training.noise_seed, SiblingSettings(2))
    for i, ref in enumerate(train_siblings_reference(ctx, 3, order, aug)):
        got = sib.members.member_state_dict(i)
        assert all(torch.allclose(got[k].float(), ref[k].float(), atol=1e-5) for k in ref), i


@pytest.mark.parametrize("overrides, match", [
    ({"model.name": "torchvision/resnet9000"}, "is not a torchvision classification model"),
    ({"model.name": "lenet5", "model.stem": "cifar"}, r"model.stem: only torchvision/\* models"),
    ({"model.name": "torchvision/resnet18", "model.stem": "tiny"}, "model.stem: unknown stem 'tiny'"),
])
def test_bad_torchvision_settings_are_refused(tmp_path, overrides, match):
    from helpers import tiny_config

    from stability.errors import ConfigError
    from stability.stages.context import prepare

    with pytest.raises(ConfigError, match=match):
        prepare(tiny_config(tmp_path, **{k.replace(".", "__"): v for k, v in overrides.items()}))
