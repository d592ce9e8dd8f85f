"""Dropout as SGD noise (``model.dropout``): seeded per member, batched = one at a time, resumable bit-exactly."""
from __future__ import annotations

import pytest
import torch
from helpers import TINY_ARGS, tiny_config
from test_faults import _kill_and_resume

from stability.apps.cli import main
from stability.config import Config, ModelConfig
from stability.engine import Members, StackedModel, derive_seed
from stability.engine.loop import TrainSpec
from stability.errors import ConfigError
from stability.models import NoiseDropout, build_model, dropout_noise
from stability.stages.context import prepare
from stability.stages.siblings import SiblingSettings, train_siblings
from stability.stages.trunk import train_trunk, trunk_checkpoint
from stability.testing.reference import train_reference, train_siblings_reference


@pytest.mark.parametrize("preset", ["lenet300_mnist5k", "conv2_mnist5k"])
def test_dropout_siblings_trained_batched_equal_the_one_at_a_time_reference(results_root, preset):
    cfg = tiny_config(results_root, preset=preset, training__steps="12it", model__dropout="0.5")
    ctx = prepare(cfg)
    sib = train_siblings(ctx, 5, SiblingSettings(siblings=3))
    ref = train_siblings_reference(ctx, 5, sib.order_seeds, sib.aug_seeds)
    for i, state in enumerate(ref):
        for k, v in state.items():
            torch.testing.assert_close(sib.members.params.get(k, sib.members.buffers.get(k))[i], v,
                                       rtol=1e-4, atol=1e-5)
    # and the dropout masks mattered: without dropout the same seeds give other weights
    plain = train_siblings_reference(prepare(cfg.with_overrides({"model.dropout": "0"})), 5,
                                     sib.order_seeds, sib.aug_seeds)
    assert not torch.equal(plain[0]["fc.0.weight"], ref[0]["fc.0.weight"])


def _train_one(ctx, order_seed: int, aug_seed: int) -> dict[str, torch.Tensor]:
    start = trunk_checkpoint(ctx, 5).member_state_dict(0)
    spec = TrainSpec(ctx.data, ctx.cfg, ctx.ipe)
    return train_reference(ctx.new_model(), start, spec, 5, 15, order_seed, aug_seed)


def test_dropout_masks_are_noise_of_the_noise_seed_only(results_root):
    """Same data order, other noise seed: weights differ with dropout, are identical without it."""
    for rate, differ in (("0.3", True), ("0", False)):
        ctx = prepare(tiny_config(results_root, preset="conv2_mnist5k", training__steps="15it", model__dropout=rate))
        a, a_again = _train_one(ctx, 1, 10), _train_one(ctx, 1, 10)
        b = _train_one(ctx, 1, 11)
        assert all(torch.equal(a[k], a_again[k]) for k in a)  # the same noise seed: the same masks
        assert any(not torch.equal(a[k], b[k]) for k in a) is differ


def test_dropout_is_off_in_evaluation_and_outside_the_training_loop():
    model = build_model(ModelConfig(name="lenet_300_100", width=0.1, dropout=0.5), (1, 28, 28), 10, seed=0)
    x = torch.randn(8, 1, 28, 28)
    model.eval()
    ev = model(x)
    model.train()
    assert torch.equal(model(x), ev)  # train mode without the loop's generator: no masks drawn
    with dropout_noise(torch.Generator().manual_seed(3)):
        noisy = model(x)
        model.eval()
        assert torch.equal(model(x), ev)  # eval mode inside the loop: off
    assert not torch.equal(noisy, ev)
    # the masked fraction is the rate, and kept units are scaled by 1 / (1 - rate)
    drop = NoiseDropout(0.25).train()
    with dropout_noise(torch.Generator().manual_seed(0)):
        out = drop(torch.ones(100_000))
    assert abs(float((out == 0).double().mean()) - 0.25) < 0.01
    assert torch.allclose(out[out != 0], torch.full_like(out[out != 0], 1 / 0.75))


def test_dropout_members_train_one_at_a_time_with_their_own_generators(results_root):
    cfg = tiny_config(results_root, preset="lenet300_mnist5k", model__dropout="0.5")
    ctx = prepare(cfg)
    sm = StackedModel(ctx.new_model())
    assert sm.dropout and not sm.hand_written_backward
    state = ctx.new_model().state_dict()
    members = Members.from_model_states([state, state], sm.param_names, 0, [1, 1], [2, 3], torch.device("cpu"))
    gens = members.dropout_generators(torch.device("cpu"))
    assert [g.initial_seed() for g in gens] == [derive_seed(2, "dropout"), derive_seed(3, "dropout")]
    x = ctx.data.x_train[:16]
    out = sm.logits(members.params, members.buffers, x, train=True, shared_input=True, dropout_gens=gens)
    assert sm.last_strategy == "loop"
    assert not torch.equal(out[0], out[1])  # equal weights and inputs: only the masks differ
    # the generators' states travel with the members' serialized state
    tensors, meta = members.to_tensors()
    back = Members.from_tensors(tensors, meta, torch.device("cpu"))
    assert all(torch.equal(g.get_state(), h.get_state()) for g, h in zip(gens, back.drop_gens))


def test_dropout_trunk_killed_at_file_boundaries_resumes_identically(tmp_path, monkeypatch):
    def run(root):
        return train_trunk(tiny_config(root, preset="conv2_mnist5k", model__dropout="0.5"))

    n_writes, checked = _kill_and_resume(tmp_path, monkeypatch, run, "dropout", stride=3)
    assert checked >= 2 * (n_writes // 3)


def test_dropout_setting_names_the_run_only_when_set_and_bad_rates_are_refused(tmp_path, capsys):
    base = Config()
    assert base.with_overrides({"model.dropout": "0"}).run_hash() == base.run_hash()
    assert base.with_overrides({"model.dropout": "0.5"}).run_hash() != base.run_hash()
    for rate in ("1", "-0.1", "1.5"):
        with pytest.raises(ConfigError, match=r"model\.dropout"):
            build_model(ModelConfig(name="mlp", dropout=float(rate)), (4,), 2, seed=0)
    with pytest.raises(ConfigError, match=r"model\.dropout: 'resnet' has no dropout option; models with one: "
                                          r"lenet_300_100"):
        build_model(ModelConfig(name="resnet", depth=8, dropout=0.5), (3, 8, 8), 2, seed=0)
    for value in ("1", "resnet"):
        extra = ["--set=model.dropout=1"] if value == "1" else ["--preset=resnet8_mnist5k", "--set=model.dropout=0.2"]
        preset = [] if value == "resnet" else ["--preset=lenet300_mnist5k"]
        code = main(["train", *preset, *TINY_ARGS, f"--set=runtime.results_root={tmp_path}", *extra])
        assert code == 2
        assert "model.dropout" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
