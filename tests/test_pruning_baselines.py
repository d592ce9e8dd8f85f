"""The baselines lottery tickets are compared with: LR rewinding and fine-tuning (Renda et al. 2020), pruning at
initialization (SNIP, GraSP, SynFlow) and the sanity checks of Frankle et al. 2021 (layer shuffle, inverted scores)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import TINY_ARGS, tiny_config
from torch import nn
from torch.func import functional_call

from stability.apps.cli import main
from stability.engine import Schedule, derive_seed
from stability.maths.pruning import dense_masks, layer_densities, prune, random_masks_like
from stability.maths.pruning import density as mask_density
from stability.maths.saliency import (
    grasp_scores,
    keep_to_density,
    shuffle_within_layers,
    snip_scores,
    synflow_masks,
    synflow_scores,
)
from stability.stages.imp import imp_settings, run_imp
from stability.store.files import load_tensors, read_json

torch.set_num_threads(1)


def _tiny_net(bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4, bias=bias), nn.Tanh(), nn.Linear(4, 2, bias=bias)).double()


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 3, generator=g, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])


# ---------------------------------------------------------------- scores by hand
def test_snip_is_the_gradient_times_the_weight_on_the_batch():
    net = _tiny_net()
    x, y = _batch()
    masks = dense_masks(net.state_dict(), ["0.weight", "2.weight"])
    masks["0.weight"][0, 0] = 0
    scores = snip_scores(net, net.state_dict(), masks, x, y)
    w = {n: p.detach().clone() for n, p in net.named_parameters()}
    w["0.weight"] = w["0.weight"] * masks["0.weight"]
    w = {n: t.requires_grad_(True) for n, t in w.items()}
    loss = nn.functional.cross_entropy(functional_call(net, w, (x,)), y)
    loss.backward()
    for n in masks:
        assert torch.allclose(scores[n], (w[n].grad * w[n]).abs().detach(), atol=1e-12)
    assert scores["0.weight"][0, 0] == 0


def test_grasp_is_minus_weight_times_hessian_gradient_from_a_dense_hessian():
    net = _tiny_net()
    x, y = _batch()
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in net.named_parameters()])
    temperature = 3.0

    def loss_of(flat):
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = flat[i: i + s.numel()].view(s)
            i += s.numel()
        return nn.functional.cross_entropy(functional_call(net, parts, (x,)) / temperature, y)

    hessian = torch.autograd.functional.hessian(loss_of, flat0)
    grad = torch.autograd.functional.jacobian(loss_of, flat0)
    expected = -flat0 * (hessian @ grad)
    masks = dense_masks(net.state_dict(), ["0.weight", "2.weight"])
    scores = grasp_scores(net, net.state_dict(), masks, x, y, temperature=temperature)
    i = 0
    for n, s in zip(names, shapes):
        if n in masks:
            assert torch.allclose(scores[n], expected[i: i + s.numel()].view(s), atol=1e-12, rtol=1e-9)
        i += s.numel()


def test_synflow_is_the_path_norm_gradient_times_the_weight_and_conserves_flow_without_biases():
    net = nn.Sequential(nn.Linear(6, 5, bias=False), nn.ReLU(), nn.Linear(5, 4, bias=False), nn.ReLU(),
                        nn.Linear(4, 3, bias=False)).float()
    state = net.state_dict()
    names = ["0.weight", "2.weight", "4.weight"]
    scores, r = synflow_scores(net, state, dense_masks(state, names), (6,))
    a = [state[n].double().abs() for n in names]
    ones = torch.ones(6, dtype=torch.float64)
    assert r == pytest.approx(float(torch.ones(3, dtype=torch.float64) @ a[2] @ a[1] @ a[0] @ ones), rel=1e-12)
    # dR/d|W1|_ij = (1^T |W3| |W2|)_i * 1_j, and the same pattern in every layer
    left = [torch.ones(3, dtype=torch.float64) @ a[2] @ a[1], torch.ones(3, dtype=torch.float64) @ a[2],
            torch.ones(3, dtype=torch.float64)]
    right = [ones, a[0] @ ones, a[1] @ a[0] @ ones]
    for n, w, lft, rgt in zip(names, a, left, right):
        assert scores[n].dtype == torch.float64
        assert torch.allclose(scores[n], torch.outer(lft, rgt) * w, rtol=1e-12)
        assert abs(float(scores[n].sum()) - r) <= 1e-9 * r  # conservation: every layer carries all of R


def test_synflow_at_a_tenth_of_a_percent_of_lenet_keeps_a_path_where_random_pruning_empties_the_output_layer():
    from stability.config import ModelConfig
    from stability.models.build import build_model

    model = build_model(ModelConfig(), (1, 28, 28), 10, 0)
    state = model.state_dict()
    names = [n for n in state if n.endswith("weight")]
    masks = dense_masks(state, names)
    flow = synflow_masks(model, state, masks, 0.001, (1, 28, 28), rounds=100)
    rand = prune(state, masks, 0.999, "random", generator=torch.Generator().manual_seed(0))
    kept = sum(int(m.sum()) for m in flow.values())
    assert kept == round(0.001 * sum(m.numel() for m in masks.values()))
    assert all(int(m.sum()) > 0 for m in flow.values())
    path = flow[names[2]] @ flow[names[1]] @ flow[names[0]]  # input-output paths through the kept weights
    assert float(path.sum()) > 0
    assert int(rand[names[2]].sum()) <= 5  # 1000 output weights at 0.1%: about one survives


# ---------------------------------------------------------------- masks from scores, sanity checks
def test_inverted_scores_keep_the_lowest_and_layer_densities_are_honoured():
    scores = {"a": torch.arange(10.0), "b": torch.arange(10.0, 30.0)}
    masks = {"a": torch.ones(10), "b": torch.ones(20)}
    top = keep_to_density(scores, masks, 0.5)
    assert top["a"].sum() == 0 and top["b"][5:].sum() == 15
    low = keep_to_density(scores, masks, 0.5, invert=True)
    assert low["a"].sum() == 10 and low["b"][:5].sum() == 5 and low["b"][5:].sum() == 0
    own = keep_to_density(scores, masks, 0.5, layer_density={"a": 0.3})
    assert own["a"].tolist() == [0] * 7 + [1] * 3 and own["b"][10:].sum() == 10
    w = {"w": torch.tensor([[0.1, -3.0], [2.0, -0.2]])}
    kept = prune(w, dense_masks(w, ["w"]), 0.5, "global", invert=True)
    assert kept["w"].tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_layer_shuffle_keeps_every_layer_density_and_changes_the_mask():
    g = torch.Generator().manual_seed(0)
    masks = {"a": (torch.rand(20, 30, generator=g) < 0.3).float(), "b": (torch.rand(50, generator=g) < 0.6).float()}
    shuffled = shuffle_within_layers(masks, torch.Generator().manual_seed(1))
    assert layer_densities(shuffled) == layer_densities(masks)
    assert all(not torch.equal(shuffled[n], masks[n]) for n in masks)


def test_layer_shuffle_is_the_random_mask_draw_and_depends_only_on_the_layer_counts():
    g = torch.Generator().manual_seed(2)
    masks = {"a": (torch.rand(7, 9, generator=g) < 0.2).float(), "b": (torch.rand(40, generator=g) < 0.7).float()}
    shuffled = shuffle_within_layers(masks, torch.Generator().manual_seed(5))
    drawn = random_masks_like(masks, torch.Generator().manual_seed(5))
    assert all(torch.equal(shuffled[n], drawn[n]) for n in masks)
    assert not all(torch.equal(shuffled[n], shuffle_within_layers(masks, torch.Generator().manual_seed(6))[n])
                   for n in masks)
    # a layer-shuffled mask keeps nothing of the mask but its layer counts: any mask with those counts gives it
    others = {n: m.reshape(-1).flip(0).reshape(m.shape) for n, m in masks.items()}
    assert all(torch.equal(shuffle_within_layers(others, torch.Generator().manual_seed(5))[n], shuffled[n])
               for n in masks)
    values = {"w": torch.arange(12.0).reshape(3, 4)}  # a permutation of the values, whatever they are
    moved = shuffle_within_layers(values, torch.Generator().manual_seed(0))["w"]
    assert sorted(moved.reshape(-1).tolist()) == list(range(12)) and not torch.equal(moved, values["w"])


def test_the_random_baseline_is_each_levels_own_mask_shuffled_while_mask_shuffle_compounds(results_root):
    """Frankle et al. 2021 shuffle each density's unshuffled IMP mask: that is the ``random`` baseline (the level's
    own mask through shuffle_within_layers, from the ticket's start weights). ``mask_shuffle = layer`` instead prunes
    each next level from the shuffled network: with global pruning the layer densities drift from IMP's."""
    import stability.stages.imp.levels as imp_module
    import stability.stages.imp.masks as masks_module

    cfg = tiny_config(results_root, training__steps="20it")
    seen: dict[tuple[str, str], tuple[dict, dict]] = {}
    pruned_from: list[dict] = []  # the mask each level is pruned from, in call order
    real_branch, real_prune = imp_module.train_branch, masks_module.prune

    def branch(ctx, run, start, end_step, **kw):
        seen[run.path.parts[-3], run.path.parts[-1]] = ({k: v.clone() for k, v in kw["masks"].items()},
                                                        {k: v.clone() for k, v in start.params.items()})
        return real_branch(ctx, run, start, end_step, **kw)

    def prune(weights, masks, *a, **kw):
        pruned_from.append({k: v.clone() for k, v in masks.items()})
        return real_prune(weights, masks, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(imp_module, "train_branch", branch)
        mp.setattr(masks_module, "prune", prune)
        per_level = run_imp(cfg, imp_settings(levels=2, rewind="0", strategy="global", baselines=["random"]))
        in_lineage = run_imp(cfg, imp_settings(levels=2, rewind="0", strategy="global", mask_shuffle="layer"))

    def stored(result, level):
        return load_tensors(result.run_dir / "masks" / f"replicate_0_level_{level}.safetensors")[0]

    own = {level: stored(per_level, level) for level in (1, 2)}
    names = list(own[1])
    assert len(pruned_from) == 4 and all(torch.equal(pruned_from[1][n], own[1][n]) for n in names)
    assert all(bool((own[2][n] <= own[1][n]).all()) for n in names)  # the ticket's lineage is unshuffled
    for level in (1, 2):
        masks, params = seen[per_level.run_dir.name, f"level_{level}"]
        expected = shuffle_within_layers(own[level], torch.Generator().manual_seed(
            derive_seed(0, "random-baseline", 0, level)))
        assert all(torch.equal(masks[n][0], own[level][n]) and torch.equal(masks[n][1], expected[n]) for n in names)
        assert layer_densities(expected) == layer_densities(own[level])
        assert all(torch.equal(p[1], p[0]) for p in params.values())  # the ticket's start weights
    shuffled = {level: stored(in_lineage, level) for level in (1, 2)}
    assert all(torch.equal(shuffled[1][n], shuffle_within_layers(own[1], torch.Generator().manual_seed(
        derive_seed(0, "mask-shuffle", 0, 1)))[n]) for n in names)  # level 1: the same shuffle of the same mask
    # level 2 in the lineage is pruned from the shuffled level 1, whose trained weights set its layer densities
    assert all(torch.equal(pruned_from[3][n], shuffled[1][n]) for n in names)
    assert layer_densities(shuffled[2]) != layer_densities(own[2])
    assert mask_density(shuffled[2]) == pytest.approx(mask_density(own[2]))


# ---------------------------------------------------------------- retraining: LR rewinding and fine-tuning
_SCHEDULE = {"optimizer__name": "sgd", "optimizer__lr": "0.1", "optimizer__momentum": "0.9",
             "schedule__kind": "step", "schedule__milestones": "10it,20it"}


@pytest.fixture(scope="module")
def retrained(tmp_path_factory):
    """lr_rewind and finetune runs, with the learning rate of every optimizer step of every level recorded."""
    import stability.stages.imp.levels as imp_module

    root = tmp_path_factory.mktemp("retrain")
    cfg = tiny_config(root, **_SCHEDULE)
    seen: dict[str, list[float]] = {}
    starts: dict[str, dict[str, torch.Tensor]] = {}
    label = [None]
    real_branch, real_step = imp_module.train_branch, torch.optim.SGD.step

    def branch(ctx, run, start, end_step, **kw):
        label[0] = "/".join(run.path.parts[-3:])  # imp_<hash>/replicate_<r>/level_<l>
        starts[label[0]] = {k: v[0].clone() for k, v in start.params.items()}
        seen[label[0]] = []
        return real_branch(ctx, run, start, end_step, **kw)

    def step(self, *a, **kw):
        if label[0] is not None:
            seen[label[0]].append(self.param_groups[0]["lr"])
        return real_step(self, *a, **kw)

    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(imp_module, "train_branch", branch)
        mp.setattr(torch.optim.SGD, "step", step)
        for retrain in ("lr_rewind", "finetune"):
            settings = imp_settings(levels=2, rewind="5it", retrain=retrain, baselines=["random"])
            result = run_imp(cfg, settings)
            mine = result.run_dir.name + "/"
            out[retrain] = (settings, result, {k[len(mine):]: v for k, v in seen.items() if k.startswith(mine)},
                            {k[len(mine):]: v for k, v in starts.items() if k.startswith(mine)})
    return cfg, out


def test_lr_rewind_replays_the_learning_rates_of_steps_k_to_t_from_the_previous_final_weights(retrained):
    cfg, out = retrained
    _, result, lrs, starts = out["lr_rewind"]
    schedule = Schedule(cfg, 1)
    expected = [schedule.lr(t) for t in range(5, 30)]
    assert sorted(lrs) == ["replicate_0/level_1", "replicate_0/level_2"]
    assert all(v == expected for v in lrs.values()) and len(set(expected)) == 3
    level1, _ = load_tensors(result.run_dir / "replicate_0" / "level_1" / "final.safetensors")
    for name, w in starts["replicate_0/level_2"].items():  # the previous level's final weights, unrewound
        assert torch.equal(w, level1[f"param/{name}"][0])
    assert {r["retrain"] for r in result.levels if r["level"] > 0} == {"lr_rewind"}


def test_finetune_trains_t_minus_k_steps_at_the_final_learning_rate(retrained):
    cfg, out = retrained
    _, result, lrs, _ = out["finetune"]
    final = Schedule(cfg, 1).lr(29)
    assert all(v == [final] * 25 for v in lrs.values()) and len(lrs) == 2
    assert {r["retrain"] for r in result.levels if r["level"] > 0} == {"finetune"}
    assert result.run_dir != out["lr_rewind"][1].run_dir


@pytest.mark.parametrize("retrain", ["lr_rewind", "finetune"])
def test_a_killed_run_resumes_bit_identically(tmp_path, retrained, retrain):
    cfg0, out = retrained
    settings, reference, _, _ = out[retrain]
    shutil.copytree(cfg0.runtime.results_root, tmp_path / "copy")  # the finished runs, then killed here
    cfg = cfg0.with_overrides({"runtime.results_root": str(tmp_path / "copy")})
    first = run_imp(cfg, settings)
    level2 = first.run_dir / "replicate_0" / "level_2"
    manifest = read_json(first.run_dir / "manifest.json")
    manifest["status"] = "running"
    for _ in ("boundary", "mid-level"):  # first level 2 is gone; then only its rolling state remains
        if _ == "boundary":
            for p in level2.rglob("*"):
                if p.is_file():
                    p.unlink()
        for name in ("record.json", "final.safetensors"):
            (level2 / name).unlink(missing_ok=True)
        (first.run_dir / "imp.json").unlink()
        (first.run_dir / "manifest.json").write_text(json.dumps(manifest))
        if _ == "mid-level":
            assert 5 < load_tensors(level2 / "state" / "latest.safetensors")[1]["step"] < 30
        again = run_imp(cfg, settings)
        assert again.levels == reference.levels
        final, _m = load_tensors(level2 / "final.safetensors")
        ref, _m = load_tensors(reference.run_dir / "replicate_0" / "level_2" / "final.safetensors")
        assert all(torch.equal(final[k], ref[k]) for k in ref)


# ---------------------------------------------------------------- pruning at initialization in IMP
def test_synflow_in_imp_respects_rate_overrides_and_records_layer_densities(results_root):
    settings = imp_settings(levels=2, rewind="0", strategy="synflow", synflow_rounds=5, prune_fraction=0.5,
                            rate_overrides={"output": 0.2}, exclude=["fc.0"], mask_shuffle="layer")
    result = run_imp(tiny_config(results_root), settings)
    record = read_json(result.run_dir / "replicate_0" / "level_2" / "record.json")
    dens = record["layer_densities"]
    assert "fc.0.weight" not in dens  # left dense
    assert dens["fc.2.weight"] == pytest.approx(0.64, abs=0.02)  # the output layer at its own rate
    assert dens["fc.1.weight"] == pytest.approx(0.25, abs=0.01)
    row = next(r for r in result.levels if r["level"] == 2)
    assert row["strategy"] == "synflow" and row["mask_shuffle"] == "layer"


def test_data_driven_strategies_train_and_invert(results_root):
    cfg = tiny_config(results_root)
    snip = run_imp(cfg, imp_settings(levels=1, rewind="0", strategy="snip", score_batch=32))
    inverted = run_imp(cfg, imp_settings(levels=1, rewind="0", strategy="grasp", score_batch=32, invert_scores=True))
    a, _ = load_tensors(snip.run_dir / "masks" / "replicate_0_level_1.safetensors")
    b, _ = load_tensors(inverted.run_dir / "masks" / "replicate_0_level_1.safetensors")
    assert all(not torch.equal(a[n], b[n]) for n in a)
    assert snip.levels[1]["strategy"] == "snip" and inverted.levels[1]["invert_scores"] in (True, "True")
    assert inverted.levels[1]["density"] == pytest.approx(0.8, abs=1e-3)


# ---------------------------------------------------------------- the CLI
@pytest.mark.parametrize("flags, match", [
    (["--strategy", "snip", "--score-batch", "0"], "imp.score_batch"),
    (["--retrain", "warm"], "imp.retrain"),
    (["--strategy", "synflow", "--synflow-rounds", "0"], "imp.synflow_rounds"),
    (["--mask-shuffle", "global"], "imp.mask_shuffle"),
    (["--strategy", "random", "--invert-scores"], "imp.invert_scores"),
    (["--strategy", "grasp", "--retrain", "lr_rewind"], "imp.retrain"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(results_root, capsys, flags, match):
    code = main(["imp", "--preset", "lenet300_mnist5k", *TINY_ARGS, "--out", str(results_root), *flags])
    assert code == 2
    assert match in capsys.readouterr().err
    assert list(results_root.iterdir()) == []


def test_imp_help_shows_the_baseline_options(capsys):
    with pytest.raises(SystemExit):
        main(["imp", "--help"])
    out = capsys.readouterr().out
    for flag in ("--retrain", "lr_rewind", "--score-batch", "--synflow-rounds", "--mask-shuffle", "--invert-scores",
                 "synflow"):
        assert flag in out
    text = " ".join(out.split())  # the per-level (non-compounding) layer shuffle is the random baseline
    assert "the layer shuffle of Frankle et al. 2021 without compounding" in text and "the loss compounds" in text


def test_the_baselines_figure_draws_one_line_per_retraining_and_the_layer_densities(retrained, tmp_path):
    from analysis.figures import plot_all
    from analysis.figures.baselines import labelled, layer_density_frame
    from analysis.load import find_runs, imp_levels

    cfg, _ = retrained
    root = cfg.runtime.results_root
    written = plot_all(root, tmp_path, formats="png", kinds="baselines")
    assert sorted(p.name for p in written) == ["pruning_baselines.png", "pruning_baselines_layer_densities.png"]
    levels = imp_levels(root)
    assert {"IMP (LR rewinding)", "IMP (fine-tuning)", "IMP (LR rewinding) + layer shuffle (per level)",
            "IMP (fine-tuning) + layer shuffle (per level)"} <= set(labelled(levels)["method"])
    frame = layer_density_frame(levels, find_runs(root, "imp"))
    assert set(frame["layer"]) == {"fc.0.weight", "fc.1.weight", "fc.2.weight"}
