"""The engine's hand-written MLP backward against autograd, and both training paths against each other."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config

from stability.config import ModelConfig
from stability.engine import StackedModel, TrainSpec, train_members
from stability.engine.stacked import stack_states
from stability.models import build_model
from stability.stages.checkpoints import initial_members
from stability.stages.context import prepare


def _stacked_mlp(results_root, members=3):
    ctx = prepare(tiny_config(results_root))
    sm = StackedModel(ctx.model)
    gen = torch.Generator().manual_seed(0)
    params = {n: (torch.randn(members, *p.shape, generator=gen) * 0.1) for n, p in ctx.model.named_parameters()}
    x = torch.randn(members, 16, *ctx.data.input_shape, generator=gen)
    y = torch.randint(0, 10, (members, 16), generator=gen)
    return ctx, sm, params, x, y


def test_hand_written_mlp_backward_matches_autograd(results_root):
    _ctx, sm, params, x, y = _stacked_mlp(results_root)
    assert sm.hand_written_backward  # a FullyConnected model takes the hand-written path

    auto = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    out = sm.logits(auto, {}, x, train=True, shared_input=False)
    loss_auto = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(3, -1).mean(1)
    loss_auto.sum().backward()

    hand = {n: p.clone() for n, p in params.items()}
    loss_hand = sm.fc_loss_and_grads(hand, x, y)
    torch.testing.assert_close(loss_hand, loss_auto.detach(), rtol=1e-6, atol=1e-6)
    for n in params:
        assert hand[n].grad.shape == params[n].shape
        torch.testing.assert_close(hand[n].grad, auto[n].grad, rtol=1e-5, atol=1e-6)
    # member i's gradient depends on member i only
    solo = {n: p[1:2].clone() for n, p in params.items()}
    sm.fc_loss_and_grads(solo, x[1:2], y[1:2])
    for n in params:
        torch.testing.assert_close(solo[n].grad[0], hand[n].grad[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_hand_written_and_autograd_training_agree(results_root, optimizer):
    cfg = tiny_config(results_root, optimizer__name=optimizer, optimizer__lr="0.01", optimizer__momentum="0.9")
    ctx = prepare(cfg)
    finals = []
    for hand in (True, False):
        members = initial_members(ctx)
        sm = StackedModel(ctx.model)
        sm.hand_written_backward = hand
        losses = []
        spec = TrainSpec(ctx.data, cfg, ctx.ipe, after_step=lambda m, loss, losses=losses: losses.append(loss))
        train_members(sm, members, spec, 15)
        finals.append((members.params, losses))
    (hand_p, hand_l), (auto_p, auto_l) = finals
    assert len(hand_l) == 15
    assert hand_l == pytest.approx(auto_l, rel=1e-4)
    for n in hand_p:
        torch.testing.assert_close(hand_p[n], auto_p[n], rtol=1e-4, atol=1e-5)


def test_vmap_strategy_matches_member_loop_for_a_conv_net():
    # The GPU's vmap(functional_call) path, forced on the CPU, against the CPU's per-member loop.
    cfg = ModelConfig(name="lenet5", width=0.25)
    model = build_model(cfg, (1, 28, 28), 10, seed=0)
    states = [build_model(cfg, (1, 28, 28), 10, seed=s).state_dict() for s in range(3)]
    stacked = stack_states(states)
    names = [n for n, _ in model.named_parameters()]
    params = {n: stacked[n] for n in names}
    buffers = {n: v for n, v in stacked.items() if n not in params}
    assert not torch.equal(params["features.0.weight"][0], params["features.0.weight"][1])
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 8, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (3, 8), generator=gen)

    results = {}
    for strategy in ("auto", "vmap"):
        sm = StackedModel(model, strategy=strategy)
        p = {n: t.clone().requires_grad_(True) for n, t in params.items()}
        out = sm.logits(p, buffers, x, train=True, shared_input=False)
        F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(3, -1).mean(1).sum().backward()
        train_strategy = sm.last_strategy
        with torch.no_grad():
            shared = sm.logits(params, buffers, x[0], train=False, shared_input=True)
        assert sm.last_strategy == train_strategy
        results[train_strategy] = (out.detach(), shared, {n: t.grad for n, t in p.items()})

    assert set(results) == {"loop", "vmap"}  # auto takes the member loop for conv nets on the CPU
    (loop_out, loop_shared, loop_grads), (vmap_out, vmap_shared, vmap_grads) = results["loop"], results["vmap"]
    assert vmap_out.shape == (3, 8, 10)
    torch.testing.assert_close(vmap_out, loop_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vmap_shared, loop_shared, rtol=1e-5, atol=1e-5)
    for n in names:
        assert vmap_grads[n].shape == params[n].shape
        torch.testing.assert_close(vmap_grads[n], loop_grads[n], rtol=1e-5, atol=1e-5)
