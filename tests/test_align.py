"""Permutation alignment: specs of the zoo, weight and activation matching, REPAIR."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import stability.align.matching as matching_module
from stability.align import (
    activation_matching,
    apply_permutation,
    identity_permutation,
    invert_permutation,
    matching_objective,
    permutation_spec,
    random_permutation,
    repair,
    unit_statistics,
    weight_matching,
)
from stability.config import DatasetConfig, ModelConfig
from stability.errors import ConfigError
from stability.models import build_model

ZOO = [
    ("lenet_300_100", {}), ("mlp", {}), ("lenet5", {}), ("conv2", {}), ("conv4", {}), ("conv6", {}),
    ("vgg11", {}), ("vgg16", {}), ("resnet", {"depth": 8}), ("resnet", {"depth": 20}), ("mobilenet_v1", {}),
    ("conv2", {"dropout": 0.5}),
]
SHAPES = [(3, 32, 32), (1, 28, 28)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(name: str, shape=(3, 32, 32), seed: int = 0, width: float = 0.25, **kw) -> nn.Module:
    return build_model(ModelConfig(name=name, width=width, **kw), shape, 10, seed)


def _bn_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def _with_random_bn(model: nn.Module, seed: int) -> dict:
    """The model's state with every BatchNorm's tensors drawn at random (weights positive)."""
    g = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name in _bn_names(model):
        n = state[f"{name}.weight"].shape[0]
        state[f"{name}.weight"] = torch.rand(n, generator=g) + 0.5
        state[f"{name}.bias"] = 0.1 * torch.randn(n, generator=g)
        state[f"{name}.running_mean"] = 0.1 * torch.randn(n, generator=g)
        state[f"{name}.running_var"] = torch.rand(n, generator=g) + 0.5
    return state


def _logits(model: nn.Module, state: dict, x: torch.Tensor, train: bool) -> torch.Tensor:
    model.train(train)
    with torch.no_grad():
        # clones: a train-mode pass updates BatchNorm running statistics in place. In float64: a permutation
        # reorders float sums, which in float32 moves deep networks' logits (VGG-16) by ~1e-5 on some runs
        state = {k: v.double() if v.is_floating_point() else v.clone() for k, v in state.items()}
        return functional_call(model, state, (x.double(),))


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ---- specs -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name,kw", ZOO, ids=[n + str(kw.get("depth", "")) for n, kw in ZOO])
def test_random_permutation_leaves_outputs_unchanged(name, kw, shape):
    model = _model(name, shape, **kw)
    spec = permutation_spec(model)
    state = _with_random_bn(model, seed=1)
    perms = random_permutation(spec, torch.Generator().manual_seed(2))
    permuted = apply_permutation(spec, perms, state)
    assert set(spec.axes) == set(state)  # every tensor, parameters and buffers, is described
    assert not _same(permuted, state)
    x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(3))
    for train in (False, True):
        ref = _logits(model, state, x, train)
        torch.testing.assert_close(_logits(model, permuted, x, train), ref, rtol=1e-4, atol=1e-5)
    back = apply_permutation(spec, invert_permutation(perms), permuted)
    assert _same(back, state)


def test_resnet_spec_shares_one_permutation_per_residual_stream():
    model = _model("resnet", depth=20)
    spec = permutation_spec(model)
    assert sorted(p for p in spec.perms if p.startswith("stream")) == ["stream.0", "stream.1", "stream.2"]
    assert len(spec.perms) == 3 + 9  # one inner permutation per block
    assert spec.axes["conv.weight"] == ("stream.0", None, None, None)
    assert spec.axes["blocks.2.bn2.running_var"] == ("stream.0",)
    assert spec.axes["blocks.2.conv1.weight"] == ("blocks.2.conv1", "stream.0", None, None)
    assert spec.axes["blocks.3.shortcut.0.weight"] == ("stream.1", "stream.0", None, None)
    assert spec.axes["blocks.3.conv2.weight"] == ("stream.1", "blocks.3.conv1", None, None)
    assert spec.axes["fc.weight"] == (None, "stream.2")
    assert spec.axes["blocks.0.bn1.num_batches_tracked"] == ()
    # derived from the structure: any depth, no list per depth
    assert len(permutation_spec(_model("resnet", depth=56, width=0.125)).perms) == 3 + 27


def test_flattened_features_are_permuted_in_blocks_of_height_times_width():
    model = _model("conv2", (1, 28, 28))  # 14x14 maps after the pool
    spec = permutation_spec(model)
    assert spec.axes["fc.0.weight"] == ("fc.0", "features.2")
    assert spec.blocks["fc.0.weight"] == (1, 14 * 14)
    assert spec.perms["features.2"] * 14 * 14 == model.fc[0].in_features


def test_masks_are_permuted_like_the_weights():
    model = _model("lenet5")
    spec = permutation_spec(model)
    state = model.state_dict()
    g = torch.Generator().manual_seed(0)
    masks = {k: (torch.rand(v.shape, generator=g) < 0.5).float() for k, v in state.items() if k.endswith("weight")}
    perms = random_permutation(spec, g)
    pm, ps = apply_permutation(spec, perms, masks), apply_permutation(spec, perms, state)
    assert set(pm) == set(masks)
    for k in masks:
        assert torch.equal(pm[k] * ps[k], apply_permutation(spec, perms, {k: masks[k] * state[k]})[k])


def test_unsupported_models_are_refused_naming_them():
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))  # a user's model (registered or not)
    with pytest.raises(ConfigError, match="Sequential.*zoo"):
        permutation_spec(model)

    class Gated(nn.Module):
        name = "gated"

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

    with pytest.raises(ConfigError, match="'gated'.*lenet_300_100"):
        permutation_spec(Gated())


def test_mismatched_widths_are_refused():
    spec = permutation_spec(_model("mlp", width=0.25))
    with pytest.raises(ConfigError, match="same architecture and width"):
        weight_matching(spec, _model("mlp", width=0.25).state_dict(), _model("mlp", width=0.5).state_dict())


# ---- matching -------------------------------------------------------------------------


@pytest.mark.parametrize("name,kw", [("mlp", {}), ("conv4", {}), ("vgg11", {}), ("resnet", {"depth": 20}),
                                     ("mobilenet_v1", {})],
                         ids=["mlp", "conv4", "vgg11", "resnet20", "mobilenet_v1"])
def test_matching_recovers_a_known_permutation(name, kw):
    model = _model(name, width=0.125 if name != "mlp" else 0.25, **kw)
    spec = permutation_spec(model)
    # MobileNet with random BatchNorm statistics has channels dead on every input (a depthwise conv then
    # passes a constant on): activations cannot tell those apart, so it is checked at its initialization
    a = _with_random_bn(model, seed=1) if name != "mobilenet_v1" else dict(model.state_dict())
    b = apply_permutation(spec, random_permutation(spec, torch.Generator().manual_seed(5)), a)
    assert not _same(a, b)
    assert _same(apply_permutation(spec, weight_matching(spec, a, b), b), a)
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    assert _same(apply_permutation(spec, activation_matching(model, spec, a, b, x, batch_size=32), b), a)


def test_weight_matching_brings_independent_networks_closer():
    model = _model("conv4")
    spec = permutation_spec(model)
    a, b = model.state_dict(), _model("conv4", seed=1).state_dict()
    perms = weight_matching(spec, a, b)
    matched = apply_permutation(spec, perms, b)

    def dist(u, v):
        return sum(float((u[k] - v[k]).pow(2).sum()) for k in u) ** 0.5

    assert dist(a, matched) < 0.95 * dist(a, b)  # observed: 11.44 vs 12.61 (0.91) at init


def test_weight_matching_is_deterministic_monotone_and_capped(monkeypatch):
    model = _model("resnet", depth=8)
    spec = permutation_spec(model)
    a, b = _with_random_bn(model, 1), _with_random_bn(_model("resnet", seed=1, depth=8), 2)
    assert all(torch.equal(u, v) for u, v in zip(weight_matching(spec, a, b, seed=3).values(),
                                                  weight_matching(spec, a, b, seed=3).values()))
    objective = [matching_objective(spec, a, b, identity_permutation(spec))]
    for rounds in range(1, 5):
        objective.append(matching_objective(spec, a, b, weight_matching(spec, a, b, seed=3, max_rounds=rounds)))
    assert all(later >= earlier - 1e-9 for earlier, later in itertools.pairwise(objective))
    assert objective[-1] > objective[0]

    calls = []
    real = matching_module.linear_sum_assignment
    monkeypatch.setattr(matching_module, "linear_sum_assignment", lambda c, maximize: calls.append(1) or real(
        c, maximize=maximize))
    weight_matching(spec, a, b, max_rounds=2)
    assert len(calls) <= 2 * len(spec.perms)
    with pytest.raises(ConfigError, match="max_rounds"):
        weight_matching(spec, a, b, max_rounds=0)


# ---- REPAIR ---------------------------------------------------------------------------


def _lerp(a: dict, b: dict, alpha: float) -> dict:
    return {k: (1 - alpha) * a[k] + alpha * b[k] if a[k].is_floating_point() else a[k] for k in a}


@pytest.mark.parametrize("name,shape", [("mlp", (1, 28, 28)), ("conv4", (3, 32, 32)), ("lenet5", (1, 28, 28))])
def test_repair_gives_every_hidden_unit_the_goal_statistics(name, shape):
    model = _model(name, shape, width=0.125)
    a, b = model.state_dict(), _model(name, shape, seed=1, width=0.125).state_dict()
    x = torch.randn(100, *shape, generator=torch.Generator().manual_seed(0))
    alpha = 0.3
    mid = _lerp(a, b, alpha)
    template = {k: v.clone() for k, v in model.state_dict().items()}
    repaired = repair(model, a, b, mid, alpha, x, batch_size=64)
    assert _same(model.state_dict(), template)  # the template's own tensors are left alone
    stats_a, stats_b = unit_statistics(model, a, x), unit_statistics(model, b, x)
    before, after = unit_statistics(model, mid, x), unit_statistics(model, repaired, x)
    assert set(after) == {n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)} - {
        model.output_layer}
    for layer, (mean, std) in after.items():
        goal_mean = (1 - alpha) * stats_a[layer][0] + alpha * stats_b[layer][0]
        goal_std = (1 - alpha) * stats_a[layer][1] + alpha * stats_b[layer][1]
        torch.testing.assert_close(mean, goal_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(std, goal_std, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(before[layer][1], goal_std, rtol=1e-2)  # it had something to repair
    assert {k: v.shape for k, v in repaired.items()} == {k: v.shape for k, v in mid.items()}
    out = model.output_layer
    assert torch.equal(repaired[f"{out}.weight"], mid[f"{out}.weight"])


def test_repair_keeps_pruned_weights_at_zero():
    model = _model("mlp")
    a, b = model.state_dict(), _model("mlp", seed=1).state_dict()
    mask = (torch.rand(a["fc.0.weight"].shape, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    a["fc.0.weight"] = a["fc.0.weight"] * mask
    b["fc.0.weight"] = b["fc.0.weight"] * mask
    repaired = repair(model, a, b, _lerp(a, b, 0.5), 0.5, torch.randn(50, 3, 32, 32))
    assert torch.all(repaired["fc.0.weight"][mask == 0] == 0)


def _torch_bn_reset(model: nn.Module, state: dict, x: torch.Tensor) -> dict:
    """Reset by torch itself: cumulative averaging, one train-mode pass over all of x."""
    net = copy.deepcopy(model)
    net.load_state_dict(state)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        net(x)
    return net.state_dict()


@pytest.mark.parametrize("name,kw", [("vgg11", {}), ("resnet", {"depth": 8})], ids=["vgg11", "resnet8"])
def test_repair_of_a_batchnorm_network_is_a_reset_of_its_statistics(name, kw):
    model = _model(name, width=0.125, **kw)
    a = _with_random_bn(model, 1)
    b = _with_random_bn(_model(name, seed=1, width=0.125, **kw), 2)
    for state, seed in ((a, 3), (b, 4)):  # BatchNorm weights of both signs
        g = torch.Generator().manual_seed(seed)
        for bn in _bn_names(model):
            state[f"{bn}.weight"] = torch.randn(state[f"{bn}.weight"].shape, generator=g)
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    alpha = 0.4
    mid = _lerp(a, b, alpha)
    repaired = repair(model, a, b, mid, alpha, x, batch_size=64)

    reference = _torch_bn_reset(model, mid, x)
    for bn in _bn_names(model):
        n = x.shape[0] * _positions(model, mid, x, bn)
        torch.testing.assert_close(repaired[f"{bn}.running_mean"], reference[f"{bn}.running_mean"], rtol=1e-4, atol=1e-5)
        # torch records the unbiased variance; REPAIR the population variance it normalizes with
        torch.testing.assert_close(repaired[f"{bn}.running_var"], reference[f"{bn}.running_var"] * (n - 1) / n,
                                   rtol=1e-4, atol=1e-6)
    assert all(torch.equal(repaired[k], mid[k]) for k in mid if "running" not in k)

    # The REPAIR goal, with the endpoints' statistics those of x too: met exactly for the means,
    # and for the stds of every unit whose BatchNorm weights have the same sign in A and B. Exactly
    # with BatchNorm's eps at 0; with eps, up to a factor sigma / sqrt(sigma^2 + eps) per network
    # (here up to 0.5%: some BatchNorm inputs have variance 1e-3).
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps = 0.0
    repaired = repair(model, a, b, mid, alpha, x, batch_size=64)
    a_reset, b_reset = (repair(model, s, s, s, 0.0, x) for s in (a, b))
    stats_a, stats_b, after = (unit_statistics(model, s, x) for s in (a_reset, b_reset, repaired))
    agreeing = 0
    for bn, (mean, std) in after.items():
        torch.testing.assert_close(mean, (1 - alpha) * stats_a[bn][0] + alpha * stats_b[bn][0], rtol=1e-4, atol=1e-5)
        same_sign = torch.sign(a[f"{bn}.weight"]) == torch.sign(b[f"{bn}.weight"])
        goal_std = (1 - alpha) * stats_a[bn][1] + alpha * stats_b[bn][1]
        torch.testing.assert_close(std[same_sign], goal_std[same_sign], rtol=1e-4, atol=1e-5)
        agreeing += int(same_sign.sum())
        # where they differ, the reset unit varies less than REPAIR's goal: |g(alpha)| < (1-alpha)|g_A| + alpha|g_B|
        assert torch.all(std[~same_sign] <= goal_std[~same_sign] * (1 + 1e-4))
    assert agreeing > 0


def _positions(model: nn.Module, state: dict, x: torch.Tensor, module: str) -> int:
    """Spatial positions per example at the input of ``module``."""
    seen = []
    handle = model.get_submodule(module).register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    try:
        model.eval()
        with torch.no_grad():
            functional_call(model, state, (x[:1],))
    finally:
        handle.remove()
    shape = seen[0]
    return int(torch.tensor(shape[2:]).prod()) if len(shape) > 2 else 1


@pytest.fixture(scope="module")
def mnist5k():
    from stability.data import load_dataset

    return load_dataset(DatasetConfig(name="mnist5k", val_size=0))


def test_alignment_and_repair_lower_the_barrier_of_independently_trained_mlps(mnist5k):
    """Two MLPs (4 hidden layers of 64) from different seeds, 1000 SGD iterations each on mnist5k.

    Observed test-error barriers at the midpoint (seeds 1/2, one thread): naive 0.781, weight
    matching -0.002, + REPAIR -0.007, activation matching -0.001, naive + REPAIR 0.286. Over seeds
    3/4 to 9/10: naive 0.50-0.78, weight matching -0.004-0.000, + REPAIR within 0.005 of it either
    way, naive + REPAIR 0.17-0.29. At this scale aligned networks are already linearly connected,
    so REPAIR has nothing left to lower after alignment (it must not raise the barrier); it does
    remove most of the naive barrier, which is mostly variance collapse.
    """
    data = mnist5k

    def train(seed: int) -> nn.Module:
        model = build_model(ModelConfig(name="mlp", hidden=(64, 64, 64, 64)), (1, 28, 28), 10, seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(seed)
        for _ in range(1000):
            idx = torch.randint(len(data.x_train), (64,), generator=g)
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model

    model_a, model_b = train(1), train(2)
    a, b = model_a.state_dict(), model_b.state_dict()
    model_a.eval()

    def error(state: dict) -> float:
        with torch.no_grad():
            return float((functional_call(model_a, state, (data.x_test,)).argmax(1) != data.y_test).float().mean())

    ends = 0.5 * (error(a) + error(b))
    assert ends < 0.1

    def barrier(state: dict) -> float:
        return error(state) - ends

    spec = permutation_spec(model_a)
    x = data.x_train[torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(0))[:1000]]
    b_weights = apply_permutation(spec, weight_matching(spec, a, b), b)
    b_acts = apply_permutation(spec, activation_matching(model_a, spec, a, b, x), b)
    naive = barrier(_lerp(a, b, 0.5))
    naive_repaired = barrier(repair(model_a, a, b, _lerp(a, b, 0.5), 0.5, x))
    weights = barrier(_lerp(a, b_weights, 0.5))
    repaired = barrier(repair(model_a, a, b_weights, _lerp(a, b_weights, 0.5), 0.5, x))
    acts = barrier(_lerp(a, b_acts, 0.5))
    print(f"barriers: naive {naive:.4f}, weights {weights:.4f}, weights+repair {repaired:.4f}, "
          f"activations {acts:.4f}, naive+repair {naive_repaired:.4f}")
    assert naive > 0.4
    assert weights < 0.02
    assert repaired <= weights + 0.015
    assert acts < 0.02
    assert naive_repaired < naive - 0.2
