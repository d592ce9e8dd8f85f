"""Tests for stability.models: shapes, seeded init, init schemes, widths, validation, vmap."""

from __future__ import annotations

import copy
import math
import re
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from stability.config import ModelConfig
from stability.errors import ConfigError
from stability.models import (
    MODELS,
    MaxPool2d,
    NoiseDropout,
    build_model,
    count_parameters,
    has_batchnorm,
    has_dropout,
    model_spec,
    output_layer_name,
    register_model,
)

MNIST = (1, 28, 28)
CIFAR = (3, 32, 32)
DIGITS = (1, 8, 8)
MNIST1D = (40,)

# (model config, input shape) pairs covering every model on its datasets' shapes, at small width
CASES = [
    (ModelConfig(name="lenet_300_100", width=0.25), MNIST),
    (ModelConfig(name="lenet_300_100", width=0.25), MNIST1D),
    (ModelConfig(name="mlp"), MNIST1D),
    (ModelConfig(name="mlp", hidden=(32, 16, 8), width=0.5), DIGITS),
    (ModelConfig(name="mlp", width=0.25), CIFAR),
    (ModelConfig(name="lenet5", width=0.5), MNIST),
    (ModelConfig(name="lenet5", width=0.5), CIFAR),
    (ModelConfig(name="conv2", width=0.25), CIFAR),
    (ModelConfig(name="conv4", width=0.25), CIFAR),
    (ModelConfig(name="conv6", width=0.25), CIFAR),
    (ModelConfig(name="conv6", width=0.25), MNIST),
    (ModelConfig(name="conv2", width=0.25), DIGITS),
    (ModelConfig(name="resnet", depth=8, width=0.25), CIFAR),
    (ModelConfig(name="resnet", depth=20, width=0.25), CIFAR),
    (ModelConfig(name="resnet", depth=8, width=0.25), MNIST),
    (ModelConfig(name="resnet", depth=14, width=0.25), DIGITS),
    (ModelConfig(name="vgg11", width=0.125), CIFAR),
    (ModelConfig(name="vgg11", width=0.125), MNIST),
    (ModelConfig(name="vgg16", width=0.125), CIFAR),
    (ModelConfig(name="vgg16", width=0.125), MNIST),
    (ModelConfig(name="mobilenet_v1", width=0.125), CIFAR),
    (ModelConfig(name="mobilenet_v1", width=0.125), MNIST),
    (ModelConfig(name="conv2", width=0.25, dropout=0.5), CIFAR),
    (ModelConfig(name="mlp", width=0.25, dropout=0.2), MNIST1D),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread is as fast and does not fight other jobs for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def prunable_parameter_names(model: nn.Module) -> list[str]:
    """Weights of conv and linear layers, the tensors masks address (pruning.prunable_names)."""
    return [
        f"{name}.weight"
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]


def _id(case: tuple[ModelConfig, tuple[int, ...]]) -> str:
    cfg, shape = case
    return (
        f"{cfg.name}-d{cfg.depth}-{'x'.join(map(str, shape))}"
        if cfg.name == "resnet"
        else f"{cfg.name}-{'x'.join(map(str, shape))}"
    )


def test_registry_has_exactly_the_documented_models():
    assert set(MODELS) == {
        "lenet_300_100", "lenet5", "conv2", "conv4", "conv6", "resnet", "vgg11", "vgg16", "mlp", "mobilenet_v1",
    }  # fmt: skip


def test_the_table_says_which_models_take_dropout_and_the_built_models_agree():
    """One table: a zoo spec's ``dropout`` flag is exactly whether its model builds an active NoiseDropout."""
    for name, spec in MODELS.items():
        assert spec.name == name and spec.source == "zoo" and not spec.checked
        cfg = ModelConfig(name=name, depth=8, width=0.25, dropout=0.5)
        if spec.dropout:
            assert has_dropout(build_model(cfg, CIFAR, 10, 0)), name
            assert not has_dropout(build_model(replace(cfg, dropout=0.0), CIFAR, 10, 0)), name
        else:
            with pytest.raises(ConfigError, match=rf"model\.dropout: '{name}' has no dropout option; models with one: "
                                                  r"lenet_300_100, lenet5, conv2, conv4, conv6, mlp \(and registered"):
                build_model(cfg, CIFAR, 10, 0)
    tv = model_spec("torchvision/resnet18")
    assert (tv.source, tv.dropout, tv.checked) == ("torchvision", False, True)


@pytest.fixture
def own_models(monkeypatch):
    """Registrations made in a test leave the table as it was."""
    monkeypatch.setattr(MODELS, "_entries", dict(MODELS._entries))


def test_a_registered_model_is_one_entry_taking_dropout_and_a_taken_name_is_refused_once(own_models):
    def factory(cfg, shape, n):
        return nn.Sequential(nn.Flatten(), NoiseDropout(cfg.dropout), nn.Linear(math.prod(shape), n))

    register_model("mine", factory)
    spec = MODELS["mine"]
    assert (spec.source, spec.dropout, spec.checked, spec.factory) == ("registered", True, True, factory)
    assert has_dropout(build_model(ModelConfig(name="mine", dropout=0.5), MNIST1D, 3, 0))
    for name in ("mine", "lenet5"):
        with pytest.raises(ConfigError, match=rf"^model\.name: a model named '{name}' is already registered$"):
            register_model(name, factory)
    register_model("mine", lambda cfg, shape, n: nn.Linear(40, n), replace=True)
    assert isinstance(build_model(ModelConfig(name="mine"), MNIST1D, 3, 0), nn.Linear)
    with pytest.raises(ConfigError, match="the factory registered for 'other' is not callable"):
        register_model("other", 3)
    assert "other" not in MODELS and MODELS["lenet5"].source == "zoo"


def test_mobilenet_v1_has_the_cifar_code_bases_parameter_count_and_depthwise_convs():
    model = build_model(ModelConfig(name="mobilenet_v1"), CIFAR, 10, seed=0)
    # 3.2M in the CIFAR MobileNetV1 of kuangliu/pytorch-cifar: 32-channel 3x3 stem, 13 separable blocks
    assert count_parameters(model) == 3_217_226
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 13 and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert output_layer_name(model) == "fc" and has_batchnorm(model)


def test_torchvision_models_lose_their_stochastic_depth_and_dropout():
    from torchvision.ops import StochasticDepth

    model = build_model(ModelConfig(name="torchvision/efficientnet_b0", stem="cifar", width=1.0), CIFAR, 10, seed=0)
    assert not any(isinstance(m, (StochasticDepth, nn.Dropout)) for m in model.modules())
    model.train()
    x = torch.randn(2, *CIFAR)
    torch.manual_seed(0)
    first = model(x)
    torch.manual_seed(1)  # nothing in the forward pass draws from torch's global generator
    assert torch.equal(model(x), first)


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_forward_and_backward_give_class_logits(case):
    cfg, shape = case
    model = build_model(cfg, shape, num_classes=7, seed=0)
    model.train()
    x = torch.randn(4, *shape)
    logits = model(x)
    assert logits.shape == (4, 7)
    logits.logsumexp(dim=1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (4, 7)
    assert not x.requires_grad and x.shape == (4, *shape)  # input untouched


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_output_layer_is_the_last_linear_with_class_outputs(case):
    cfg, shape = case
    model = build_model(cfg, shape, num_classes=7, seed=0)
    name = output_layer_name(model)
    assert name == model.output_layer
    layer = model.get_submodule(name)
    assert isinstance(layer, nn.Linear) and layer.out_features == 7
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert linears[-1] == name


def test_output_layer_name_falls_back_to_last_linear_on_foreign_models():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    assert output_layer_name(model) == "2"
    with pytest.raises(ConfigError):
        output_layer_name(nn.Sequential(nn.ReLU()))


def test_lenet_300_100_has_the_published_parameter_count():
    model = build_model(ModelConfig(name="lenet_300_100"), (784,), 10, seed=0)
    assert count_parameters(model) == 266_610
    assert (
        count_parameters(build_model(ModelConfig(name="lenet_300_100"), MNIST, 10, seed=0))
        == 266_610
    )


def test_resnet20_and_vgg16_match_open_lth_parameter_counts():
    # open_lth: cifar_resnet_20 has 272,474 parameters; cifar_vgg_16 14.7M (convs keep biases)
    assert (
        count_parameters(build_model(ModelConfig(name="resnet", depth=20), CIFAR, 10, seed=0))
        == 272_474
    )
    assert count_parameters(build_model(ModelConfig(name="vgg16"), CIFAR, 10, seed=0)) == 14_728_266


def test_parameter_names_are_readable():
    names = dict(build_model(ModelConfig(name="lenet_300_100"), MNIST, 10, 0).named_parameters())
    assert {"fc.0.weight", "fc.0.bias", "fc.2.weight"} <= set(names)
    names = dict(
        build_model(ModelConfig(name="conv2", width=0.25), CIFAR, 10, 0).named_parameters()
    )
    assert "features.0.weight" in names and "fc.2.weight" in names
    names = dict(
        build_model(
            ModelConfig(name="resnet", depth=8, width=0.25), CIFAR, 10, 0
        ).named_parameters()
    )
    assert {
        "conv.weight",
        "bn.weight",
        "blocks.0.conv1.weight",
        "blocks.1.shortcut.0.weight",
        "fc.weight",
    } <= set(names)


def test_conv_and_linear_weights_are_named_for_masks():
    model = build_model(ModelConfig(name="resnet", depth=8, width=0.25), CIFAR, 10, 0)
    names = prunable_parameter_names(model)
    params = dict(model.named_parameters())
    assert all(n.endswith(".weight") and params[n].dim() in (2, 4) for n in names)
    assert "fc.weight" in names and "blocks.1.shortcut.0.weight" in names
    assert not any(".bn" in n or n.startswith("bn") for n in names)
    # every conv/linear weight counted: 1 stem + 3 stages x (2 convs) + 2 projections + fc
    assert len(names) == 1 + 6 + 2 + 1


def test_has_batchnorm():
    assert has_batchnorm(build_model(ModelConfig(name="vgg11", width=0.125), CIFAR, 10, 0))
    assert not has_batchnorm(build_model(ModelConfig(name="conv2", width=0.125), CIFAR, 10, 0))


@pytest.mark.parametrize("init", ["default", "kaiming_normal", "glorot_normal"])
@pytest.mark.parametrize("name", ["lenet_300_100", "resnet"])
def test_same_seed_gives_identical_parameters_and_different_seed_differs(name, init):
    cfg = ModelConfig(name=name, depth=8, width=0.25, init=init)
    a, b = (build_model(cfg, CIFAR, 10, seed=3) for _ in range(2))
    c = build_model(cfg, CIFAR, 10, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in prunable_parameter_names(a))


def test_building_does_not_disturb_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    build_model(ModelConfig(name="resnet", depth=8, width=0.25), CIFAR, 10, seed=0)
    assert torch.equal(torch.rand(5), expected)


def test_kaiming_normal_statistics():
    model = build_model(ModelConfig(name="lenet_300_100", init="kaiming_normal"), MNIST, 10, seed=0)
    w = model.fc[0].weight  # 300 x 784: 235k draws
    assert abs(w.std().item() / math.sqrt(2 / 784) - 1) < 0.1
    assert abs(w.mean().item()) < 0.01 * math.sqrt(2 / 784) * 10
    assert all(torch.count_nonzero(layer.bias) == 0 for layer in model.fc)
    conv = build_model(ModelConfig(name="conv2", width=0.25, init="kaiming_normal"), CIFAR, 10, 0)
    w = conv.features[2].weight  # 16 -> 16 channels, 3x3: fan_in 144
    assert abs(w.std().item() / math.sqrt(2 / 144) - 1) < 0.1
    assert torch.count_nonzero(conv.features[2].bias) == 0


def test_glorot_normal_statistics():
    model = build_model(ModelConfig(name="lenet_300_100", init="glorot_normal"), MNIST, 10, seed=0)
    w = model.fc[0].weight
    assert abs(w.std().item() / math.sqrt(2 / (784 + 300)) - 1) < 0.1
    assert all(torch.count_nonzero(layer.bias) == 0 for layer in model.fc)


def test_default_init_is_pytorchs():
    model = build_model(ModelConfig(name="lenet_300_100"), MNIST, 10, seed=0)
    w, b = model.fc[0].weight, model.fc[0].bias
    bound = 1 / math.sqrt(
        784
    )  # kaiming_uniform(a=sqrt(5)) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert w.abs().max() <= bound and abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.1
    assert torch.count_nonzero(b) > 0 and b.abs().max() <= bound
    # same as constructing the layers by hand under the same seed
    torch.manual_seed(0)
    reference = nn.Linear(784, 300)
    assert torch.equal(reference.weight, w)


@pytest.mark.parametrize("init", ["default", "kaiming_normal", "glorot_normal"])
def test_batchnorm_starts_at_identity(init):
    model = build_model(ModelConfig(name="vgg11", width=0.125, init=init), CIFAR, 10, seed=0)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


@pytest.mark.parametrize(
    "name,shape",
    [
        ("lenet_300_100", MNIST),
        ("mlp", MNIST1D),
        ("conv4", CIFAR),
        ("resnet", CIFAR),
        ("vgg11", CIFAR),
    ],
)
def test_width_scales_hidden_sizes(name, shape):
    small = build_model(ModelConfig(name=name, depth=8, width=0.25), shape, 10, 0)
    large = build_model(ModelConfig(name=name, depth=8, width=0.5), shape, 10, 0)
    assert count_parameters(large) > 2 * count_parameters(small)
    first_small = dict(small.named_parameters())[prunable_parameter_names(small)[0]]
    first_large = dict(large.named_parameters())[prunable_parameter_names(large)[0]]
    assert first_large.shape[0] == 2 * first_small.shape[0]


def test_width_rounds_and_keeps_at_least_one_unit():
    model = build_model(ModelConfig(name="mlp", hidden=(10, 3), width=0.01), MNIST1D, 10, 0)
    assert [layer.out_features for layer in model.fc] == [1, 1, 10]
    model = build_model(ModelConfig(name="lenet_300_100", width=0.5), MNIST1D, 10, 0)
    assert [layer.out_features for layer in model.fc] == [150, 50, 10]


def test_mlp_defaults_to_two_hidden_layers_of_100():
    model = build_model(ModelConfig(name="mlp"), MNIST1D, 10, 0)
    assert [(l.in_features, l.out_features) for l in model.fc] == [(40, 100), (100, 100), (100, 10)]


@pytest.mark.parametrize("depth", [8, 14, 20, 32, 56])
def test_resnet_depths_have_6n_plus_2_layers(depth):
    model = build_model(ModelConfig(name="resnet", depth=depth, width=0.125), CIFAR, 10, 0)
    # depth counts the 3x3 convs and the final Linear; 1x1 projection shortcuts are not layers
    layers = [
        m
        for m in model.modules()
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    ]
    assert len(layers) == depth


@pytest.mark.parametrize("depth", [0, 7, 18, 26, 44, 110])
def test_resnet_rejects_other_depths(depth):
    with pytest.raises(ConfigError, match=r"model\.depth.*8, 14, 20, 32, 56"):
        build_model(ModelConfig(name="resnet", depth=depth), CIFAR, 10, 0)


def test_unknown_model_names_the_setting_and_choices():
    with pytest.raises(ConfigError, match=r"model\.name.*'resnet18'.*lenet_300_100.*conv2"):
        build_model(ModelConfig(name="resnet18"), CIFAR, 10, 0)


def test_bad_init_width_classes_and_shape_are_config_errors():
    with pytest.raises(ConfigError, match=r"model\.init.*kaiming_normal"):
        build_model(ModelConfig(init="xavier"), MNIST, 10, 0)
    with pytest.raises(ConfigError, match=r"model\.width"):
        build_model(ModelConfig(width=0.0), MNIST, 10, 0)
    with pytest.raises(ConfigError):
        build_model(ModelConfig(), MNIST, 0, 0)
    with pytest.raises(ConfigError, match=r"input shape"):
        build_model(ModelConfig(), (1, 0, 28), 10, 0)


@pytest.mark.parametrize("name", ["lenet5", "conv2", "conv6", "resnet", "vgg16"])
def test_image_models_reject_1d_input(name):
    with pytest.raises(ConfigError, match=rf"model\.name.*'{name}'.*\(40,\)"):
        build_model(ModelConfig(name=name, depth=8, width=0.25), MNIST1D, 10, 0)


@pytest.mark.parametrize(
    "name,shape,side",
    [
        ("lenet5", DIGITS, 12),
        ("conv6", (1, 4, 4), 8),
        ("conv6", (3, 32, 7), 8),
        ("conv2", (3, 1, 1), 2),
    ],
)
def test_image_models_reject_too_small_images(name, shape, side):
    shape_text = re.escape(str(shape))
    with pytest.raises(ConfigError, match=rf"model\.name.*'{name}'.*{shape_text}.*{side}x{side}"):
        build_model(ModelConfig(name=name, width=0.25), shape, 10, 0)


def test_vgg_skips_pools_on_a_one_pixel_map():
    v32 = build_model(ModelConfig(name="vgg11", width=0.125), CIFAR, 10, 0)
    v28 = build_model(ModelConfig(name="vgg11", width=0.125), MNIST, 10, 0)

    def pools(m: nn.Module) -> int:
        return sum(isinstance(x, nn.MaxPool2d) for x in m.modules())

    assert pools(v32) == 5 and pools(v28) == 4


def _stacked_forward(models: list[nn.Module], x: torch.Tensor):
    """Run copies batched with vmap(functional_call) over stacked parameters and buffers."""
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def call(p, b, xb):
        return functional_call(base, (p, b), (xb,))

    return vmap(call)(params, buffers, x), params, buffers


@pytest.mark.parametrize(
    "cfg,shape",
    [
        (ModelConfig(name="resnet", depth=8, width=0.25), CIFAR),
        (ModelConfig(name="vgg11", width=0.125), MNIST),
        (ModelConfig(name="conv2", width=0.125), DIGITS),
        (ModelConfig(name="lenet5", width=0.5), MNIST),
        (ModelConfig(name="mobilenet_v1", width=0.125), CIFAR),
    ],
    ids=["resnet8", "vgg11", "conv2", "lenet5", "mobilenet_v1"],
)
def test_vmap_over_stacked_copies_matches_each_copy_in_train_mode(cfg, shape):
    models = [build_model(cfg, shape, 10, seed=s) for s in range(3)]
    for m in models:
        m.train()
    x = torch.randn(3, 4, *shape)  # a different batch per copy
    logits, params, buffers = _stacked_forward(models, x)
    assert logits.shape == (3, 4, 10)
    # gradients flow back to the stacked parameters
    logits.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params.values())
    for i, model in enumerate(models):
        torch.testing.assert_close(logits[i].detach(), model(x[i]).detach(), rtol=1e-4, atol=1e-5)
        # running statistics were updated in place on the stacked buffers, per copy
        for name, buf in model.named_buffers():
            torch.testing.assert_close(buffers[name][i], buf, rtol=1e-4, atol=1e-6)
    if has_batchnorm(models[0]):
        tracked = [n for n in buffers if n.endswith("num_batches_tracked")]
        assert tracked and all(torch.all(buffers[n] == 1) for n in tracked)
        means = [n for n in buffers if n.endswith("running_mean")]
        assert any(torch.count_nonzero(buffers[n]) > 0 for n in means)


def test_vmap_in_eval_mode_uses_each_copys_running_stats():
    cfg = ModelConfig(name="resnet", depth=8, width=0.25)
    models = [build_model(cfg, CIFAR, 10, seed=s) for s in range(2)]
    for i, m in enumerate(models):  # distinct running statistics per copy
        m.train()
        m(torch.randn(8, *CIFAR) * (i + 1))
        m.eval()
    x = torch.randn(2, 4, *CIFAR)
    with torch.no_grad():
        logits, _, _ = _stacked_forward(models, x)
        for i, m in enumerate(models):
            torch.testing.assert_close(logits[i], m(x[i]), rtol=1e-4, atol=1e-5)


def test_config_replace_keeps_model_buildable():
    # frozen ModelConfig values from presets are replaced, not mutated
    cfg = replace(ModelConfig(name="mlp"), hidden=(20,))
    model = build_model(cfg, MNIST1D, 3, 0)
    assert count_parameters(model) == 40 * 20 + 20 + 20 * 3 + 3


@pytest.mark.parametrize("shape", [(3, 6, 28, 28), (2, 4, 7, 9), (1, 2, 2, 3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_max_pool_gives_torchs_values_and_gradients(shape, channels_last):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).relu()  # ReLU outputs: many tied zeros in a window
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    fast, ref = MaxPool2d(2), nn.MaxPool2d(2)
    with torch.no_grad():
        assert torch.equal(fast(x), ref(x))  # the four-view maximum, bit for bit
    # with autograd torch's kernel runs: same values, and the gradient goes to one element per window
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_fast, out_ref = fast(xa), ref(xb)
    g = torch.randn(out_ref.shape, generator=gen)
    (out_fast * g).sum().backward()
    (out_ref * g).sum().backward()
    assert torch.equal(out_fast, out_ref) and torch.equal(xa.grad, xb.grad)
    # other pools are torch's
    if min(shape[-2:]) >= 3:
        with torch.no_grad():
            assert torch.equal(MaxPool2d(3, stride=2)(x), nn.MaxPool2d(3, stride=2)(x))


def test_fast_max_pool_under_vmap_sends_tied_gradients_where_torch_does():
    """Inside vmap a tensor carrying a gradient reads requires_grad False: the pool must still be torch's."""
    p = torch.zeros(2, 1, 1, 4, 4, requires_grad=True)  # two members; every window tied
    g = torch.arange(4.0).view(1, 1, 2, 2) + 1

    def f(pi):
        return (MaxPool2d(2)(pi) * g).sum()

    grad_vmap = torch.autograd.grad(vmap(f)(p).sum(), p)[0]
    expected = torch.autograd.grad(sum(f(p[i]) for i in range(2)), p)[0]
    assert torch.equal(grad_vmap, expected)  # torch's kernel: all of a window's gradient to one element
    assert int((expected != 0).sum()) == 2 * 4


def test_lenet5_pools_with_the_fast_max_pool():
    model = build_model(ModelConfig(name="lenet5"), (1, 28, 28), 10, seed=0)
    assert sum(isinstance(m, MaxPool2d) for m in model.modules()) == 2


def test_open_lth_style_presets_draw_batchnorm_weights_uniformly_like_open_lth():
    from stability.presets import get_preset

    for preset in ("resnet20_cifar10", "vgg16_cifar10"):
        cfg = get_preset(preset).model
        assert cfg.bn_init == "uniform"
        model = build_model(ModelConfig(**{**cfg.__dict__, "width": 0.25}), CIFAR, 10, 0)
        weights = torch.cat([m.weight.detach().flatten() for m in model.modules()
                             if isinstance(m, torch.nn.BatchNorm2d)])
        assert 0 <= weights.min() and weights.max() < 1 and weights.std() > 0.2  # U[0, 1): std 0.29
    plain = build_model(ModelConfig(name="resnet", depth=8, width=0.25), CIFAR, 10, 0)
    assert all(torch.all(m.weight == 1) for m in plain.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with pytest.raises(ConfigError, match="model.bn_init"):
        build_model(ModelConfig(name="resnet", depth=8, bn_init="normal"), CIFAR, 10, 0)
