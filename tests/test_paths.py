"""maths.paths.evaluate_combinations: networks as combinations of base tensor dicts (planes, curves, layer paths)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config

from stability.engine import StackedModel
from stability.errors import ConfigError
from stability.maths.paths import Batches, evaluate_combinations, evaluate_pairs
from stability.stages.context import prepare


def _state(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _nets(tmp_path, preset=None, **overrides):
    cfg = tiny_config(tmp_path, **({"preset": preset} if preset else {}), **overrides)
    ctx = prepare(cfg)
    nets = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        net = ctx.new_model()
        for m in net.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        nets.append(net)
    xt, yt = ctx.data.split("test")
    return nets, (xt[:200], yt[:200])


def _hand(template, bases, coeffs, x, y):
    """load_state_dict(Σ c_k θ_k) and evaluate, one combination at a time."""
    losses, errors = [], []
    for row in coeffs:
        m = copy.deepcopy(template).eval()
        m.load_state_dict({k: sum(float(c) * b[k] for c, b in zip(row, bases)) if bases[0][k].is_floating_point()
                           else bases[0][k] for k in bases[0]})
        with torch.no_grad():
            out = m(x)
        losses.append(float(F.cross_entropy(out.double(), y)))
        errors.append(float((out.argmax(1) != y).double().mean()))
    return losses, errors


@pytest.mark.parametrize("preset", [None, "resnet8_mnist5k"])
def test_combinations_equal_a_hand_loop_and_pairs(tmp_path, preset, one_torch_thread):
    overrides = {"model__width": "0.25"} if preset else {"model__width": "0.3"}
    nets, (x, y) = _nets(tmp_path, preset, **overrides)
    bases = [_state(n) for n in nets]
    # a plane in the coordinates of three networks, and points off it (coefficients need not sum to 1)
    coeffs = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0.2, 0.3, 0.5], [1.5, -0.25, -0.25], [0.9, 0.2, 0.0]],
                          dtype=torch.float64)
    sm = StackedModel(copy.deepcopy(nets[0]))
    data = Batches((x, y), 64)
    losses, errors = evaluate_combinations(sm, bases, coeffs, data)
    slow_losses, _ = evaluate_combinations(sm, bases, coeffs, data, input_layer_outputs=False)
    hand_losses, hand_errors = _hand(nets[0], bases, coeffs, x, y)
    assert losses == pytest.approx(hand_losses, rel=1e-5)
    assert slow_losses == pytest.approx(hand_losses, rel=1e-5)
    assert errors == pytest.approx(hand_errors, abs=1 / len(y) + 1e-9)
    # a pair (1 − α, α) is evaluate_pairs' member (0, 1, α)
    alphas = [0.0, 0.25, 0.5, 1.0]
    pair_losses, pair_errors = evaluate_pairs(sm, bases[:2], [(0, 1, a) for a in alphas], data)
    comb_losses, comb_errors = evaluate_combinations(sm, bases[:2], [[1 - a, a] for a in alphas], data)
    assert comb_losses == pytest.approx(pair_losses, rel=1e-6)
    assert comb_errors == pair_errors


def test_coefficients_of_the_wrong_shape_are_refused(tmp_path):
    nets, (x, y) = _nets(tmp_path, model__width="0.3")
    sm = StackedModel(copy.deepcopy(nets[0]))
    with pytest.raises(ConfigError, match=r"coeffs: expected \[members, 3\]"):
        evaluate_combinations(sm, [_state(n) for n in nets], [[0.5, 0.5]], Batches((x, y)))
