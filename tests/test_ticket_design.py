"""Zhou et al.'s mask-0 actions (frozen "lottery heroes") and ticket transfer (Morcos et al. 2019)."""
from __future__ import annotations

import pytest
import torch
from helpers import TINY_ARGS, tiny_config

from stability.apps.cli import main
from stability.config import ModelConfig
from stability.data import permuted_pixels
from stability.errors import ConfigError
from stability.maths.flops import backward_macs, layer_costs, weight_gradient_saved
from stability.maths.pruning import mask0_start, updated_fraction
from stability.models import build_model
from stability.stages.checkpoints import load_weights
from stability.stages.imp import imp_key, imp_settings, run_imp
from stability.stages.instability import InstabilitySettings
from stability.store.files import load_tensors, read_csv


def _masks(run_dir, level, replicate=0):
    return load_tensors(run_dir / "masks" / f"replicate_{replicate}_level_{level}.safetensors")[0]


def _final(run_dir, level, member=0, replicate=0):
    t, _ = load_tensors(run_dir / f"replicate_{replicate}" / f"level_{level}" / "final.safetensors")
    return {k[6:]: v[member] for k, v in t.items() if k.startswith("param/")}


def test_mask0_start_on_a_hand_example():
    start = {"w": torch.tensor([1.0, -2.0, 3.0, -4.0]), "b": torch.tensor([5.0])}
    masks = {"w": torch.tensor([1.0, 0.0, 0.0, 0.0])}
    initial = {"w": torch.tensor([0.5, -1.0, 1.0, -1.0])}
    final = {"w": torch.tensor([0.1, -3.0, 0.5, 0.0])}  # positions 1 moved away from zero, 2 and 3 towards it
    zero = mask0_start("zero", start, masks, initial=initial, final=final)
    assert zero["w"].tolist() == [1.0, 0.0, 0.0, 0.0] and zero["b"].tolist() == [5.0]
    assert mask0_start("freeze", start, masks, initial=initial, final=final)["w"].tolist() == [1.0, -2.0, 3.0, -4.0]
    away = mask0_start("freeze_if_moving_away", start, masks, initial=initial, final=final)
    assert away["w"].tolist() == [1.0, -2.0, 0.0, 0.0]
    with pytest.raises(ConfigError, match="imp.mask0: unknown action 'keep'; choose one of zero, freeze"):
        mask0_start("keep", start, masks, initial=initial, final=final)


def test_updated_fraction_and_backward_flops_on_hand_counts():
    # LeNet-300-100 at width 0.1: 784x30, 30x10, 10x10 weights; biases 30, 10, 10.
    model = build_model(ModelConfig(width=0.1), (1, 28, 28), 10, 0)
    params = dict(model.named_parameters())
    assert {k: tuple(v.shape) for k, v in params.items() if k.endswith("weight")} == {
        "fc.0.weight": (30, 784), "fc.1.weight": (10, 30), "fc.2.weight": (10, 10)}
    masks = {"fc.0.weight": torch.zeros(30, 784), "fc.1.weight": torch.ones(10, 30), "fc.2.weight": torch.ones(10, 10)}
    masks["fc.0.weight"][:, :392] = 1  # half of the first layer
    total = 23520 + 300 + 100 + 50
    assert updated_fraction(masks, params) == pytest.approx((total - 11760) / total)
    costs = layer_costs(model, (1, 28, 28))
    # weight gradients 23520 + 300 + 100 MACs; input gradients of all but the first layer: 300 + 100
    assert backward_macs(costs) == 23920 + 400
    assert weight_gradient_saved(costs, masks) == 11760
    # a convolution: each weight is used once per output position (3x3 conv, 8x8 input, padding 1: 64 positions)
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(256, 10))
    c = layer_costs(conv, (1, 8, 8))
    assert [(x.weight, x.forward, x.input_gradient, x.out_units) for x in c] == [
        ("0.weight", 36 * 64, 0, 4), ("2.weight", 2560, 2560, 10)]


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("heroes")
    cfg = tiny_config(root, optimizer__name="sgd", optimizer__lr="0.05", optimizer__momentum="0.9",
                      optimizer__weight_decay="1e-3")
    results = {action: run_imp(cfg, imp_settings(levels=2, rewind="5it", mask0=action, baselines=["random"]))
               for action in ("zero", "freeze", "freeze_if_moving_away")}
    return cfg, results


def test_freeze_keeps_removed_weights_bit_identical_to_their_rewound_values(frozen_run):
    cfg, results = frozen_run
    run = results["freeze"].run_dir
    rewound = load_weights(tiny_trunk(cfg), 5)
    for level in (1, 2):
        masks, final = _masks(run, level), _final(run, level)
        for name, m in masks.items():
            removed = m == 0
            assert removed.any()
            # removed: exactly the rewound values, through momentum and weight decay
            assert torch.equal(final[name][removed], rewound[name][removed])
            # kept: trained (not one of them left at its rewound value)
            assert not torch.equal(final[name][~removed], rewound[name][~removed])
    # the random-mask baseline is frozen the same way, under its own mask
    random_final = _final(run, 1, member=1)
    level1 = [r for r in results["freeze"].levels if r["level"] == 1]
    assert [r["kind"] for r in level1] == ["imp", "random"]
    assert sum(int((random_final[n] == rewound[n]).sum()) for n in rewound if n.endswith("weight")) > 0


def tiny_trunk(cfg):
    from stability.stages.trunk import trunk_dir

    return trunk_dir(cfg)


def test_freeze_if_moving_away_freezes_only_weights_that_moved_away_from_zero(frozen_run):
    cfg, results = frozen_run
    run = results["freeze_if_moving_away"].run_dir
    rewound = load_weights(tiny_trunk(cfg), 5)
    dense_final = load_weights(tiny_trunk(cfg), 30)
    masks, final = _masks(run, 1), _final(run, 1)
    counts = [0, 0]
    for name, m in masks.items():
        away = dense_final[name].abs() > rewound[name].abs()
        frozen, zeroed = (m == 0) & away, (m == 0) & ~away
        counts[0] += int(frozen.sum())
        counts[1] += int(zeroed.sum())
        assert torch.equal(final[name][frozen], rewound[name][frozen])
        assert torch.all(final[name][zeroed] == 0)
    assert min(counts) > 0  # both cases occur
    # level 2: a weight keeps the decision made when it was removed (held at level 1, it did not move
    # there, yet stays held); weights removed at level 2 are judged by level 1's trained weights
    level1_final, masks2, final2 = _final(run, 1), _masks(run, 2), _final(run, 2)
    carried = 0
    for name, m2 in masks2.items():
        m1 = masks[name]
        held1 = (m1 == 0) & (dense_final[name].abs() > rewound[name].abs())
        newly = (m1 == 1) & (m2 == 0)
        held2 = held1 | (newly & (level1_final[name].abs() > rewound[name].abs()))
        assert torch.equal(final2[name][held2], rewound[name][held2])
        assert torch.all(final2[name][(m2 == 0) & ~held2] == 0)
        carried += int(held1.sum())
    assert carried > 0


def test_mask0_is_recorded_and_names_the_run_only_when_not_zero(frozen_run):
    cfg, results = frozen_run
    zero, freeze = results["zero"], results["freeze"]
    assert len({r.run_dir for r in results.values()}) == 3
    assert "mask0" not in imp_key(cfg, imp_settings(levels=2, rewind="5it"), InstabilitySettings())["imp"]
    # the same masks at level 1 (the same dense network chose them), other trained weights
    assert all(torch.equal(_masks(zero.run_dir, 1)[n], _masks(freeze.run_dir, 1)[n]) for n in _masks(zero.run_dir, 1))
    rows = read_csv(freeze.run_dir / "levels.csv")
    level1 = next(r for r in rows if r["level"] == 1 and r["kind"] == "imp")
    assert (level1["mask0"], level1["mask1"], level1["criterion"], level1["mask_source"]) == \
        ("freeze", "rewind", "large_final", "own")
    # every prunable weight of the level-1 mask that was removed is not updated
    m = _masks(freeze.run_dir, 1)
    n_params = sum(v.numel() for v in build_model(cfg.model, (1, 28, 28), 10, 0).parameters())
    removed = sum(int((v == 0).sum()) for v in m.values())
    assert level1["updated_fraction"] == pytest.approx(1 - removed / n_params)
    assert 0.15 < level1["backward_flops_saved"] < 0.2  # 20% of the weights: their weight gradients
    zero_rows = read_csv(zero.run_dir / "levels.csv")
    assert next(r for r in zero_rows if r["level"] == 1)["final_test_accuracy"] != level1["final_test_accuracy"]


def test_freeze_sparse_instability_holds_the_removed_weights(tmp_path):
    import json

    from stability.stages.base import mask_digest

    cfg = tiny_config(tmp_path)
    result = run_imp(cfg, imp_settings(levels=1, rewind="5it", mask0="freeze", instability=True))
    level1 = next(r for r in result.levels if r["level"] == 1)
    assert isinstance(level1["instability"], float) and level1["instability"] == level1["instability"]
    # its siblings are a run of their own (named mask0 = freeze), under the level-1 mask, from the rewind step
    masks = _masks(result.run_dir, 1)
    frozen = [p for p in tmp_path.glob("siblings_*")
              if json.loads((p / "manifest.json").read_text())["hashed_settings"].get("mask0") == "freeze"]
    assert len(frozen) == 1
    key = json.loads((frozen[0] / "manifest.json").read_text())["hashed_settings"]
    assert key["masks"] == mask_digest(masks) and key["rewind_step"] == 5
    # every sibling's removed weights are held at their rewound values to the end; its kept weights trained
    rewound = load_weights(tiny_trunk(cfg), 5)
    tensors, _ = load_tensors(frozen[0] / "final.safetensors")
    finals = {k[6:]: v for k, v in tensors.items() if k.startswith("param/")}
    assert finals[next(iter(masks))].shape[0] == 2  # two siblings
    for name, m in masks.items():
        removed = m == 0
        assert removed.any() and (rewound[name][removed] != 0).any()  # held, not zeroed
        for sibling in finals[name]:
            assert torch.equal(sibling[removed], rewound[name][removed])
            assert not torch.equal(sibling[~removed], rewound[name][~removed])
    # the two siblings saw different noise: their kept weights differ
    assert any(not torch.equal(finals[n][0], finals[n][1]) for n in masks)


def test_transfer_trains_another_runs_masks_and_says_where_they_came_from(tmp_path):
    source_cfg = tiny_config(tmp_path)
    source = run_imp(source_cfg, imp_settings(levels=2, rewind="5it"))
    # to another optimizer (Adam), and to the pixel-permuted task of the same shape
    for overrides in ({"optimizer.name": "adam", "optimizer.lr": "1e-3"}, {"dataset.name": "mnist5k_permuted"}):
        cfg = source_cfg.with_overrides(overrides)
        result = run_imp(cfg, imp_settings(levels=2, rewind="5it", mask_from=str(source.run_dir)))
        assert result.summary["mask_source"]["run_dir"] == str(source.run_dir)
        assert result.summary["mask_source"]["dataset"] == "mnist5k"
        for level in (1, 2):
            a, b = _masks(source.run_dir, level), _masks(result.run_dir, level)
            assert all(torch.equal(a[n], b[n]) for n in a)
        rows = read_csv(result.run_dir / "levels.csv")
        assert {r["mask_source"] for r in rows if r["level"] > 0} == {source.run_dir.name}
    # the source's masks name the run by their contents, so the same masks elsewhere give the same hash
    moved = tmp_path / "elsewhere"
    import shutil

    shutil.copytree(source.run_dir, moved)
    key_a = imp_key(source_cfg, imp_settings(levels=2, mask_from=str(source.run_dir)), InstabilitySettings())
    key_b = imp_key(source_cfg, imp_settings(levels=2, mask_from=str(moved)), InstabilitySettings())
    assert key_a == key_b


def test_permuted_task_is_mnist5k_with_its_pixels_in_one_fixed_order(tmp_path):
    from stability.config import DatasetConfig
    from stability.data import load_dataset

    plain, permuted = load_dataset(DatasetConfig()), load_dataset(DatasetConfig(name="mnist5k_permuted"))
    order = torch.as_tensor(permuted_pixels())
    assert sorted(order.tolist()) == list(range(784)) and order.tolist() != list(range(784))
    assert torch.equal(plain.x_train.flatten(1)[:, order], permuted.x_train.flatten(1))
    assert torch.equal(plain.y_test, permuted.y_test)


def test_transfer_refuses_masks_that_do_not_fit(tmp_path, capsys):
    source_cfg = tiny_config(tmp_path)
    source = run_imp(source_cfg, imp_settings(levels=1, rewind="5it"))
    before = sorted(p.name for p in tmp_path.iterdir())
    root = f"--set=runtime.results_root={tmp_path}"
    # another width: the shapes differ
    code = main(["imp", "--preset", "lenet300_mnist5k", *TINY_ARGS, "--set=model.width=0.2", root,
                 "--levels", "1", "--mask-from", str(source.run_dir)])
    assert code == 2 and "imp.mask_from" in capsys.readouterr().err
    # more levels than the source has
    code = main(["imp", "--preset", "lenet300_mnist5k", *TINY_ARGS, root, "--levels", "3", "--mask-from",
                 str(source.run_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "no mask for replicate 0, level 2" in err
    # not an IMP run
    code = main(["imp", "--preset", "lenet300_mnist5k", *TINY_ARGS, root, "--mask-from", str(tmp_path)])
    assert code == 2 and "is not an IMP run directory" in capsys.readouterr().err
    code = main(["imp", "--preset", "lenet300_mnist5k", *TINY_ARGS, root, "--mask0", "keep"])
    assert code == 2 and "imp.mask0: unknown action 'keep'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_design_space_figures_from_the_records(frozen_run, tmp_path):
    import analysis
    from analysis.figures import design_labels, plot_all, plot_supermask, plot_ticket_design

    cfg, _ = frozen_run
    levels = analysis.imp_levels(cfg.runtime.results_root)
    imp = levels[levels["kind"] == "imp"]
    labels = design_labels(imp)
    assert set(labels[imp["level"] > 0]) == {"zero", "freeze", "freeze_if_moving_away"}
    assert set(labels[imp["level"] == 0]) == {"zero", "freeze", "freeze_if_moving_away"}  # each run's dense row
    fig = plot_ticket_design(levels)
    lines = {t.get_text() for t in fig.axes[0].get_legend().get_texts()}
    assert {"zero", "freeze", "freeze_if_moving_away"} <= lines and any(t.startswith("dense (") for t in lines)
    with pytest.raises(ValueError, match="no level has a supermask accuracy"):
        plot_supermask(levels)
    written = plot_all(cfg.runtime.results_root, tmp_path / "figures", formats="png")
    assert any(p.name.startswith("ticket_design_") for p in written)


def test_supermask_accuracy_is_the_masked_untrained_network_evaluated_directly(tmp_path):
    import analysis
    from analysis.figures import plot_supermask
    from stability.engine import StackedModel
    from stability.stages.context import prepare

    cfg = tiny_config(tmp_path)
    result = run_imp(cfg, imp_settings(levels=2, rewind="5it", supermask=True))
    ctx = prepare(cfg)
    rewound = load_weights(tiny_trunk(cfg), 5)
    sm = StackedModel(ctx.model)
    x, y = ctx.data.split("test")
    for level in (1, 2):
        masks = _masks(result.run_dir, level)
        params = {k: (v * masks[k] if k in masks else v).unsqueeze(0) for k, v in rewound.items()}
        _, err = sm.evaluate(params, {}, x, y)
        row = next(r for r in result.levels if r["level"] == level)
        assert row["supermask_test_accuracy"] == pytest.approx(1 - float(err[0]), abs=1e-12)
    # with frozen removed weights the untrained ticket is the whole rewound network, at every level
    frozen = run_imp(cfg, imp_settings(levels=2, rewind="5it", supermask=True, mask0="freeze"))
    params = {k: v.unsqueeze(0) for k, v in rewound.items()}
    dense_err = float(sm.evaluate(params, {}, x, y)[1][0])
    assert [r["supermask_test_accuracy"] for r in frozen.levels if r["level"] > 0] == \
        pytest.approx([1 - dense_err] * 2, abs=1e-12)
    fig = plot_supermask(analysis.imp_levels(tmp_path), chance=0.1)
    assert len(fig.axes[0].lines) >= 2


@pytest.mark.slow
def test_frozen_tickets_killed_at_file_boundaries_resume_identically(tmp_path, monkeypatch):
    from test_faults import _kill_and_resume

    settings = imp_settings(levels=1, rewind="5it", mask0="freeze_if_moving_away")

    def run(root):
        return run_imp(tiny_config(root, optimizer__name="sgd", optimizer__lr="0.05", optimizer__momentum="0.9",
                                   optimizer__weight_decay="1e-3"), settings)

    n_writes, checked = _kill_and_resume(tmp_path, monkeypatch, run, "heroes", stride=4)
    assert checked >= 2 * (n_writes // 4)
