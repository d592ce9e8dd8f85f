"""Strong lottery tickets (``training.method = edgepopup | supermask``, ``stability.methods.strong``): scores over frozen weights."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_ARGS, tiny_config
from test_faults import _kill_and_resume

from stability.apps.cli import main
from stability.config import Config, ModelConfig, StrongConfig
from stability.engine import Members, StackedModel, train_members
from stability.engine.loop import TrainSpec
from stability.errors import ConfigError
from stability.methods import validate_run
from stability.methods.strong import (
    ScoredConv2d,
    ScoredLinear,
    kept_count,
    make_strong,
    mask_density,
    scored_layers,
    state_masks,
)
from stability.models import build_model
from stability.stages.checkpoints import load_weights
from stability.stages.context import prepare
from stability.stages.imp import run_imp
from stability.stages.trunk import train_trunk, trunk_checkpoint
from stability.store.files import read_csv, read_json, write_json
from stability.store.schema import SWEEP
from stability.testing.reference import train_reference

# one torch thread: tiny models on 2 shared cores run several times faster than with two
SGD = {"optimizer__name": "sgd", "optimizer__lr": "0.1", "optimizer__momentum": "0.9", "runtime__threads": "1"}


@pytest.fixture(autouse=True)
def _restore_threads(one_torch_thread):
    """Runs set one torch thread (``runtime.threads = 1``); the fixture puts the count back afterwards."""
    yield


def _strong(model_name: str = "lenet_300_100", shape=(1, 28, 28), method: str = "edgepopup", seed: int = 0,
            **settings) -> torch.nn.Module:
    extra = {"width": 0.25} if model_name != "resnet" else {"width": 0.25, "depth": 8}
    model = build_model(ModelConfig(name=model_name, **extra), shape, 10, seed=seed)
    return make_strong(model, method, StrongConfig(**settings), seed=seed)


def test_kept_count_rounds_halves_up_and_keeps_at_least_one():
    assert kept_count(0.25, 10) == 3 and kept_count(0.24, 10) == 2 and kept_count(0.5, 7) == 4
    assert kept_count(1e-6, 10) == 1 and kept_count(1.0, 10) == 10


@pytest.mark.parametrize("kept", [0.3, 0.5, 0.7, 1.0, 0.001])
def test_edgepopup_keeps_exactly_round_k_n_weights_in_every_layer(kept):
    for name, shape in (("lenet_300_100", (1, 28, 28)), ("conv4", (1, 28, 28))):
        model = _strong(name, shape, kept=kept)
        layers = scored_layers(model)
        assert layers and all(isinstance(m, (ScoredLinear, ScoredConv2d)) for m in layers.values())
        for layer in layers.values():
            n = layer.weight.numel()
            assert int(layer.mask().sum()) == kept_count(kept, n) == max(1, math.floor(kept * n + 0.5))
        masks = state_masks(model.state_dict(), "edgepopup", StrongConfig(kept=kept))
        assert [int(m.sum()) for m in masks.values()] == [kept_count(kept, layer.weight.numel())
                                                          for layer in layers.values()]


@pytest.mark.parametrize("name,shape", [("lenet_300_100", (1, 28, 28)), ("mlp", (40,)), ("lenet5", (1, 28, 28)),
                                        ("conv4", (1, 28, 28)), ("resnet", (3, 16, 16)), ("vgg11", (3, 16, 16)),
                                        ("mobilenet_v1", (3, 16, 16)), ("torchvision/mobilenet_v3_small", (3, 32, 32))])
def test_every_zoo_model_converts_to_scores_over_frozen_weights(name, shape):
    rng = torch.get_rng_state()
    model = _strong(name, shape)
    assert torch.equal(rng, torch.get_rng_state())  # the caller's random stream is untouched
    params = [n for n, _ in model.named_parameters()]
    assert params and all(n.endswith(".scores") for n in params)
    buffers = dict(model.named_buffers())
    assert all(f"{n[:-len('scores')]}weight" in buffers for n in params)  # frozen weights live in the state dict
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            assert not m.affine and m.weight is None and m.bias is None
    assert model(torch.randn(2, *shape)).shape == (2, 10)


def test_only_scores_train_and_the_frozen_weights_stay_bit_identical(results_root):
    cfg = tiny_config(results_root, training__method="edgepopup", **SGD)
    result = train_trunk(cfg)
    ctx = prepare(cfg)
    start, end = load_weights(result.run_dir, 0), load_weights(result.run_dir, result.final_step)
    fresh = ctx.new_model().state_dict()
    for key in start:
        if key.endswith((".weight", ".bias")):
            assert torch.equal(start[key], end[key]) and torch.equal(start[key], fresh[key]), key
    assert all(not torch.equal(start[k], end[k]) for k in start if k.endswith(".scores"))
    # the trained masks moved: another subnetwork than the one at initialization
    m0, m1 = state_masks(start, "edgepopup"), state_masks(end, "edgepopup")
    assert any(not torch.equal(m0[k], m1[k]) for k in m0)
    summary = read_json(result.run_dir / "summary.json")
    assert summary["method"] == "edgepopup"
    assert summary["mask_density"] == mask_density(end, "edgepopup") == pytest.approx(0.5, abs=1e-3)


def test_a_finished_strong_run_without_its_mask_density_gets_it_on_reuse(results_root, capsys):
    cfg = tiny_config(results_root, training__method="supermask", **SGD)
    result = train_trunk(cfg)
    path = result.run_dir / "summary.json"
    written = read_json(path)
    final = (result.run_dir / "checkpoints" / "step_30.safetensors").read_bytes()
    write_json(path, {k: v for k, v in written.items() if k not in ("method", "mask_density")})  # an older writer's
    again = train_trunk(cfg)
    assert "summary.json has no method, mask_density; training it again" in capsys.readouterr().err
    assert not again.reused and (result.run_dir / "checkpoints" / "step_30.safetensors").read_bytes() == final
    assert {k: read_json(path)[k] for k in ("method", "mask_density")} == \
        {"method": "supermask", "mask_density": written["mask_density"]}
    reused = train_trunk(cfg)
    assert reused.reused and reused.summary["mask_density"] == written["mask_density"]


def test_signed_constant_weights_are_plus_or_minus_the_kaiming_std_and_biases_zero():
    model = _strong("conv4", (1, 28, 28))
    for layer in scored_layers(model).values():
        w = layer.weight
        fan_in = w.shape[1] * math.prod(w.shape[2:])
        sigma = torch.tensor(math.sqrt(2.0 / fan_in), dtype=w.dtype)
        assert torch.equal(w.abs(), sigma.expand_as(w))
        assert 0.4 < float((w > 0).double().mean()) < 0.6  # random signs
        assert layer.bias is None or not layer.bias.any()
        bound = 1 / math.sqrt(fan_in)  # scores: Kaiming uniform with a = sqrt(5), as edge-popup's code
        top = float(layer.scores.detach().abs().max())
        assert 0.9 * bound < top <= bound
    # kaiming_normal: N(0, 2 / fan_in); default: the model's own initialization, biases included
    kn = scored_layers(_strong("lenet_300_100", weight_init="kaiming_normal"))["fc.0"].weight
    assert float(kn.std()) == pytest.approx(math.sqrt(2 / 784), rel=0.02)
    plain = build_model(ModelConfig(name="lenet_300_100", width=0.25), (1, 28, 28), 10, seed=0)
    default = scored_layers(_strong("lenet_300_100", weight_init="default"))["fc.0"]
    assert torch.equal(default.weight, plain.fc[0].weight) and torch.equal(default.bias, plain.fc[0].bias)


def _hand_gradients(method: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    linear = torch.nn.Linear(3, 2)
    w = torch.tensor([[0.5, -1.0, 2.0], [1.5, -0.25, 0.75]])
    scores = torch.tensor([[0.3, -0.9, 0.1], [-0.2, 0.8, -0.05]])
    layer = ScoredLinear(linear, method, StrongConfig(kept=0.5), w.clone(), torch.zeros(2), scores.clone())
    x = torch.tensor([[1.0, 2.0, -1.0], [0.5, -1.5, 3.0]])
    c = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    (layer(x) * c).sum().backward()
    mask = layer.mask()
    w_eff = (w * mask).requires_grad_(True)
    (F.linear(x, w_eff, torch.zeros(2)) * c).sum().backward()
    return layer.scores.grad, w_eff.grad, w, mask


def test_edgepopup_straight_through_gradient_on_a_hand_example():
    grad, g_eff, w, mask = _hand_gradients("edgepopup")
    # top 3 of |s| = (0.3, 0.9, 0.1, 0.2, 0.8, 0.05): 0.9, 0.8, 0.3
    assert torch.equal(mask, torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]]))
    scores = torch.tensor([[0.3, -0.9, 0.1], [-0.2, 0.8, -0.05]])
    # dL/d|s| = dL/dw_eff * w (the paper's rule); through |s| the stored score gets the sign of s (the paper's code)
    torch.testing.assert_close(grad, g_eff * w * scores.sign(), rtol=0, atol=1e-6)
    assert bool((grad != 0).all())  # pruned weights get gradient too: they can come back


def test_supermask_straight_through_gradient_and_expected_mask():
    grad, g_eff, w, mask = _hand_gradients("supermask")
    scores = torch.tensor([[0.3, -0.9, 0.1], [-0.2, 0.8, -0.05]])
    assert torch.equal(mask, (scores > 0).float())  # evaluation (no generator): sigmoid(s) > 0.5
    p = torch.sigmoid(scores)
    torch.testing.assert_close(grad, g_eff * w * p * (1 - p), rtol=1e-6, atol=1e-7)


def test_edgepopup_lenet300_beats_a_random_mask_of_the_same_density_over_the_same_weights(results_root):
    # Measured (LeNet-300-100 at width 0.5, kept 0.5, SGD 0.1 m0.9, batch 32, 200 it, init seed 0): trained
    # mask 0.905 test accuracy; random masks (top half of uniform random scores, seeds 0-4) 0.141, 0.122,
    # 0.096, 0.102, 0.158; a gap of 0.75. Asserted: a gap of at least 0.5 to the best of three random masks.
    cfg = tiny_config(results_root, training__method="edgepopup", model__width="0.5", training__steps="200it",
                      training__eval_every="100it", training__rewind_points="", **SGD)
    result = train_trunk(cfg)
    trained = 1 - result.final["test_error"]
    ctx = prepare(cfg)
    state = load_weights(result.run_dir, result.final_step)
    sm = StackedModel(ctx.model)
    x, y = ctx.data.split("test")
    randoms = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        st = {k: torch.rand(v.shape, generator=g) if k.endswith("scores") else v for k, v in state.items()}
        assert [int(m.sum()) for m in state_masks(st, "edgepopup").values()] == \
            [int(m.sum()) for m in state_masks(state, "edgepopup").values()]
        _, err = sm.evaluate({k: st[k][None] for k in sm.param_names}, {k: st[k][None] for k in sm.buffer_names}, x, y)
        randoms.append(1 - float(err[0]))
    assert trained > 0.85
    assert trained - max(randoms) > 0.5, (trained, randoms)


def _train_one(ctx, order_seed: int, aug_seed: int) -> dict[str, torch.Tensor]:
    start = trunk_checkpoint(ctx, 5).member_state_dict(0)
    spec = TrainSpec(ctx.data, ctx.cfg, ctx.ipe)
    return train_reference(ctx.new_model(), start, spec, 5, 15, order_seed, aug_seed)


def test_supermask_masks_are_sgd_noise_of_the_member_and_evaluation_is_deterministic(results_root):
    ctx = prepare(tiny_config(results_root, training__method="supermask", training__steps="15it", **SGD))
    sm = StackedModel(ctx.model)
    assert sm.dropout and not sm.hand_written_backward  # one member at a time, each with its own generator
    a, a_again, b = _train_one(ctx, 1, 10), _train_one(ctx, 1, 10), _train_one(ctx, 1, 11)
    assert all(torch.equal(a[k], a_again[k]) for k in a)  # the same seeds: the same masks, the same scores
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("scores"))  # another noise seed: other masks
    state = ctx.model.state_dict()
    members = Members.from_model_states([state, state], sm.param_names, 0, [1, 1], [2, 3], torch.device("cpu"))
    gens = members.dropout_generators(torch.device("cpu"))
    x = ctx.data.x_train[:16]
    noisy = sm.logits(members.params, members.buffers, x, train=True, shared_input=True, dropout_gens=gens)
    assert not torch.equal(noisy[0], noisy[1])  # equal scores and inputs: only the sampled masks differ
    ev1 = sm.logits(members.params, members.buffers, x, train=False, shared_input=True)
    ev2 = sm.logits(members.params, members.buffers, x, train=False, shared_input=True)
    assert torch.equal(ev1, ev2) and torch.equal(ev1[0], ev1[1])


def test_supermask_sampled_evaluation_is_a_fixed_draw_and_density_is_reported():
    model = _strong(method="supermask", eval_mask="sample")
    layer = scored_layers(model)["fc.0"]
    model.eval()
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(model(x), model(x))
    assert not torch.equal(layer.mask(), (layer.scores > 0).float())  # a draw, not the expected mask
    state = model.state_dict()
    for eval_mask in ("sample", "expected"):
        d = mask_density(state, "supermask", StrongConfig(eval_mask=eval_mask))
        assert 0.45 < d < 0.55  # sigmoid of scores near 0: about half the weights
    assert "fc.0.eval_uniform" in state and "fc.0.eval_uniform" not in _strong(method="supermask").state_dict()


def test_supermask_trunk_killed_at_file_boundaries_resumes_identically(tmp_path, monkeypatch):
    def run(root):
        return train_trunk(tiny_config(root, training__method="supermask", training__steps="20it",
                                       training__rewind_points="5it", training__checkpoint_every="5it", **SGD))

    n_writes, checked = _kill_and_resume(tmp_path, monkeypatch, run, "supermask")
    assert checked == 2 * n_writes


# ResNet (BatchNorm, no max-pool) for the conv case: under vmap, ``models.MaxPool2d`` cannot see that its input
# requires grad and takes its no-grad path, whose gradient splits ties (torch.maximum) where torch's kernel gives
# it to the first maximum; with signed-constant weights ties are common, so Conv-4's gradients differ there.
@pytest.mark.parametrize("preset", ["lenet300_mnist5k", "resnet8_mnist5k"])
def test_edgepopup_under_vmap_matches_one_member_at_a_time_and_trains(results_root, preset):
    cfg = tiny_config(results_root, preset=preset, training__method="edgepopup", training__steps="6it",
                      training__rewind_points="", **SGD)
    ctx = prepare(cfg)
    state = ctx.model.state_dict()
    spec = TrainSpec(ctx.data, cfg, ctx.ipe)
    x = ctx.data.x_train[:24].view(3, 8, *ctx.data.x_train.shape[1:])
    y = ctx.data.y_train[:24].view(3, 8)
    results = {}
    for strategy in ("vmap", "loop"):
        sm = StackedModel(ctx.model, strategy=strategy)
        g = torch.Generator().manual_seed(0)
        params = {k: (state[k][None] + 0.01 * torch.randn(3, *state[k].shape, generator=g)).requires_grad_(True)
                  for k in sm.param_names}  # three members with different scores
        buffers = {k: state[k].expand(3, *state[k].shape).clone() for k in sm.buffer_names}
        out = sm.logits(params, buffers, x, train=True, shared_input=False)
        assert sm.last_strategy == strategy
        F.cross_entropy(out.flatten(0, 1), y.flatten()).backward()
        results[strategy] = (out.detach(), {k: v.grad for k, v in params.items()})
    (v_out, v_grads), (l_out, l_grads) = results["vmap"], results["loop"]
    torch.testing.assert_close(v_out, l_out, rtol=1e-5, atol=1e-5)
    for k in v_grads:
        torch.testing.assert_close(v_grads[k], l_grads[k], rtol=1e-5, atol=1e-5)
    # and the vmap path trains: scores move, every member keeps exactly its top-k
    sm = StackedModel(ctx.model, strategy="vmap")
    members = Members.from_model_states([state, state], sm.param_names, 0, [1, 2], [3, 4], torch.device("cpu"))
    train_members(sm, members, spec, 6)
    for i in range(2):
        trained = members.member_state_dict(i)
        assert any(not torch.equal(trained[k], state[k]) for k in sm.param_names)
        assert [int(m.sum()) for m in state_masks(trained, "edgepopup").values()] == \
            [int(m.sum()) for m in state_masks(state, "edgepopup").values()]


def test_instability_sweep_of_strong_tickets_from_the_cli(tmp_path, capsys):
    code = main(["instability", "--preset=lenet300_mnist5k", *TINY_ARGS, "--set=training.method=edgepopup",
                 "--set=strong.kept=0.3", "--set=optimizer.name=sgd", "--set=optimizer.momentum=0.9",
                 "--rewind=0it,10it", "--alphas=4", f"--out={tmp_path}", "--threads=1", "--quiet"])
    assert code == 0
    rows = read_csv(next(tmp_path.glob(f"instability_*/{SWEEP}")))
    assert sorted({int(r["rewind_step"]) for r in rows}) == [0, 10]
    assert all(math.isfinite(float(r["instability_mean"])) for r in rows)
    train = next(tmp_path.glob("train_*"))
    assert read_json(train / "summary.json")["mask_density"] == pytest.approx(0.3, abs=1e-3)
    assert "first stable step" in capsys.readouterr().out


def test_strong_settings_name_the_run_only_with_their_method():
    base = Config().with_overrides({"training.method": "edgepopup"})
    assert base.with_overrides({"strong.kept": "0.5"}).run_hash() == base.run_hash()  # defaults stay out
    assert base.with_overrides({"strong.kept": "0.3"}).run_hash() != base.run_hash()
    assert Config().with_overrides({"strong.kept": "0.5"}).run_hash() == Config().run_hash()
    assert "strong" not in Config().hashed_dict()
    with pytest.raises(ConfigError, match=r"strong\.kept: applies only with training\.method = edgepopup or supermask"):
        validate_run(Config().with_overrides({"strong.kept": "0.3"}))
    with pytest.raises(ConfigError, match=r"strong\.eval_mask: applies only with training\.method = supermask"):
        validate_run(base.with_overrides({"strong.eval_mask": "sample"}))
    with pytest.raises(ConfigError, match=r"strong\.kept: applies only with training\.method = edgepopup"):
        validate_run(Config().with_overrides({"training.method": "supermask", "strong.kept": "0.3"}))
    with pytest.raises(ConfigError, match=r"strong\.kept: applies only with training\.method = edgepopup or supermask"):
        validate_run(Config().with_overrides({"training.method": "neq", "strong.kept": "0.3"}))


@pytest.mark.parametrize("sets,message", [
    (["training.method=edgepopup", "strong.kept=0"], "strong.kept: the fraction of each layer's weights kept must be in (0, 1]"),
    (["training.method=edgepopup", "strong.kept=1.5"], "strong.kept"),
    (["training.method=edgepopup", "strong.weight_init=xavier"],
     "strong.weight_init: unknown value 'xavier'; choose one of signed_constant, kaiming_normal, default"),
    (["training.method=supermask", "strong.eval_mask=mean"],
     "strong.eval_mask: unknown value 'mean'; choose one of expected, sample"),
    (["training.method=edgepopup", "strong.score_init=zeros"], "strong.score_init"),
    (["strong.kept=0.3"], "strong.kept: applies only with training.method = edgepopup or supermask"),
    (["training.method=edgepopup", "strong.eval_mask=sample"], "strong.eval_mask: applies only with"),
])
def test_bad_strong_settings_exit_2_naming_the_setting_and_write_nothing(tmp_path, capsys, sets, message):
    code = main(["train", "--preset=lenet300_mnist5k", *TINY_ARGS, *[f"--set={s}" for s in sets], f"--out={tmp_path}",
                 "--threads=1"])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_imp_refuses_strong_tickets(results_root):
    with pytest.raises(ConfigError, match=r"training\.method: IMP prunes trained weights; 'edgepopup'"):
        run_imp(tiny_config(results_root, training__method="edgepopup", **SGD))
    assert not any(results_root.iterdir())


def test_strong_ticket_frame_and_figure_with_dense_and_imp_lines(results_root, tmp_path):
    import pandas as pd

    from analysis import strong_tickets
    from analysis.figures import plot_all, plot_strong_tickets

    for kept in ("0.3", "0.7"):
        train_trunk(tiny_config(results_root, training__method="edgepopup", strong__kept=kept, **SGD))
    train_trunk(tiny_config(results_root, **SGD))  # dense training of the same model
    frame = strong_tickets(results_root)
    assert sorted(frame["kept"]) == [0.3, 0.7] and set(frame["method"]) == {"edgepopup"}
    assert frame["density"].tolist() == pytest.approx(frame["kept"].tolist(), abs=1e-3)
    assert frame["final_test_accuracy"].between(0, 1).all() and "model.name" in frame.columns
    everything = strong_tickets(results_root, include_dense=True)
    dense = everything[everything["method"] == "standard"]
    assert len(dense) == 1 and float(dense["density"].iloc[0]) == 1.0
    imp = pd.DataFrame({"kind": "imp", "level": [0, 1, 2], "replicate": 0, "density": [1.0, 0.8, 0.64],
                        "final_test_accuracy": [0.9, 0.91, 0.9]})
    fig = plot_strong_tickets(frame, dense=dense, imp=imp, save=tmp_path / "strong", formats="png")
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert labels == ["dense training (1 run)", "edge-popup (Ramanujan et al.)", "IMP tickets (trained weights)"]
    assert (tmp_path / "strong.png").is_file()
    written = plot_all(results_root, tmp_path / "figures", formats="png", kinds="imp")
    assert [p.name for p in written] == ["strong_tickets_0.png"]
    # another recipe (other frozen weights and learning rate) is a figure of its own, never averaged in
    train_trunk(tiny_config(results_root, training__method="edgepopup", strong__kept="0.3",
                            strong__weight_init="kaiming_normal", **{**SGD, "optimizer__lr": "0.2"}))
    written = plot_all(results_root, tmp_path / "figures2", formats="png", kinds="imp")
    assert sorted(p.name for p in written) == ["strong_tickets_0.png", "strong_tickets_1.png"]


def test_cli_train_reports_the_mask_density(tmp_path, capsys):
    import json

    args = ["train", "--preset=lenet300_mnist5k", *TINY_ARGS, f"--out={tmp_path}", "--threads=1", "--quiet"]
    assert main([*args, "--set=training.method=edgepopup", "--set=strong.kept=0.3"]) == 0
    assert "mask density        0.3000 (edgepopup" in capsys.readouterr().out
    assert main([*args, "--set=training.method=supermask", "--set=optimizer.name=sgd", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "supermask" and 0.4 < summary["mask_density"] < 0.6


def test_methods_that_cannot_combine_are_refused_before_anything_is_written(tmp_path, capsys):
    args = ["--preset=lenet300_mnist5k", *TINY_ARGS, f"--out={tmp_path}", "--threads=1", "--quiet"]
    # alignment would give the two siblings of a strong ticket different frozen weights
    code = main(["instability", *args, "--set=training.method=edgepopup", "--rewind=0it", "--align=weights"])
    assert code == 2 and "instability.align: the siblings of a strong ticket (edgepopup)" in capsys.readouterr().err
    # NEq trains dense networks: no IMP, no early-bird ticket
    code = main(["imp", *args, "--set=training.method=neq", "--levels=1"])
    assert code == 2 and "training.method: neq trains dense networks" in capsys.readouterr().err
    code = main(["earlybird", *args, "--set=training.method=neq"])
    assert code == 2 and "training.method: early-bird tickets are drawn from a network whose weights train" \
        in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_connect_joins_strong_tickets_only_over_the_same_frozen_weights(tmp_path, capsys):
    args = ["--preset=lenet300_mnist5k", *TINY_ARGS, f"--out={tmp_path}", "--threads=1", "--quiet",
            "--set=training.method=edgepopup", "--set=optimizer.name=sgd"]
    for seed in ("0", "1"):
        assert main(["train", *args, f"--set=training.noise_seed={seed}"]) == 0
    assert main(["train", *args, "--set=training.init_seed=1"]) == 0
    a, b, other = sorted(tmp_path.glob("train_*"), key=lambda p: p.stat().st_mtime)
    capsys.readouterr()
    assert main(["connect", str(a), str(b), f"--out={tmp_path}", "--alphas=3"]) == 0
    code = main(["connect", str(a), str(other), f"--out={tmp_path}", "--alphas=3"])
    assert code == 2 and "over the same frozen weights" in capsys.readouterr().err
