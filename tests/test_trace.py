"""Permutation specs traced with torch.fx: the zoo's hand-derived specs, torchvision models and plugins."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from stability.align import (
    apply_permutation,
    invert_permutation,
    permutation_spec,
    random_permutation,
    traced_spec,
    weight_matching,
)
from stability.align.spec import _layout
from stability.align.trace import traced_layout
from stability.config import ModelConfig
from stability.errors import ConfigError
from stability.models import MODELS, build_model, register_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ZOO = [
    ("lenet_300_100", {}, (1, 28, 28)), ("mlp", {}, (3, 32, 32)), ("lenet5", {}, (1, 28, 28)),
    ("conv2", {"dropout": 0.5}, (3, 32, 32)), ("conv4", {}, (1, 28, 28)), ("conv6", {}, (3, 32, 32)),
    ("vgg11", {}, (3, 32, 32)), ("vgg16", {}, (1, 28, 28)), ("resnet", {"depth": 8}, (3, 32, 32)),
    ("resnet", {"depth": 20}, (1, 28, 28)), ("mobilenet_v1", {}, (3, 32, 32)),
]


class GroupNormNet(nn.Module):
    """A plugin's model: GroupNorm (1 group and one per channel), GELU/SiLU, a depthwise conv, a residual
    addition, adaptive pooling flattened into a Linear (blocks of 4x4), LayerNorm, functional ReLUs."""

    def __init__(self, channels: int, num_classes: int, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.gn1 = nn.GroupNorm(1, width)
        self.depthwise = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.gn2 = nn.GroupNorm(width, width)
        self.pointwise = nn.Conv2d(width, width, 1)
        self.gn3 = nn.GroupNorm(1, width)
        self.hidden = nn.Linear(width * 4 * 4, 32)
        self.ln = nn.LayerNorm(32)
        self.head = nn.Linear(32, num_classes)
        self.output_layer = "head"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.gn1(self.stem(x)))
        y = F.silu(self.gn2(self.depthwise(x)))
        x = x + self.gn3(self.pointwise(y))
        x = torch.flatten(F.adaptive_avg_pool2d(torch.relu(x), 4), 1)
        return self.head(torch.relu(self.ln(self.hidden(x))))


@pytest.fixture
def plugin(monkeypatch):
    """``trace_gn`` registered as a plugin would register it; the model table is restored after."""
    monkeypatch.setattr(MODELS, "_entries", dict(MODELS._entries))
    register_model("trace_gn", lambda cfg, shape, n: GroupNormNet(shape[0], n))
    return build_model(ModelConfig(name="trace_gn"), (3, 16, 16), 10, 0)


def _torchvision(arch: str, seed: int = 0) -> nn.Module:
    return build_model(ModelConfig(name=f"torchvision/{arch}", stem="cifar"), (3, 32, 32), 10, seed)


def _partition(spec) -> tuple:
    """The spec without its permutations' names: which axes move together, how many units, in what blocks."""
    groups: dict[str, set] = {}
    for name, axes in spec.axes.items():
        for axis, p in enumerate(axes):
            if p is not None:
                groups.setdefault(p, set()).add((name, axis))
    return ({(frozenset(v), spec.perms[p]) for p, v in groups.items()}, spec.blocks, spec.buffers,
            {name: tuple(p is None for p in axes) for name, axes in spec.axes.items()})


def _randomized(model: nn.Module, seed: int) -> dict:
    """The model's state with every floating tensor drawn at random (running variances positive)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        if not v.is_floating_point():
            out[k] = v.clone()
        elif k.endswith("running_var"):
            out[k] = torch.rand(v.shape, generator=g) + 0.5
        else:
            out[k] = 0.1 * torch.randn(v.shape, generator=g) + (1.0 if k.endswith("weight") and v.dim() == 1 else 0.0)
    return out


def _logits(model: nn.Module, state: dict, x: torch.Tensor, train: bool) -> torch.Tensor:
    model.train(train)
    with torch.no_grad():
        state = {k: v.double() if v.is_floating_point() else v.clone() for k, v in state.items()}
        return functional_call(model, state, (x.double(),))


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name,kw,shape", ZOO, ids=[n + str(kw.get("depth", "")) for n, kw, _ in ZOO])
def test_the_traced_spec_of_a_zoo_model_is_its_hand_derived_spec(name, kw, shape):
    model = build_model(ModelConfig(name=name, width=0.125, **kw), shape, 10, 0)
    traced, derived = traced_layout(model), _layout(model)
    assert _partition(traced.spec) == _partition(derived.spec)
    assert set(traced.points) == set(traced.spec.perms)  # every permutation can be observed


@pytest.mark.parametrize("arch", ["resnet18", "vgg11_bn", "mobilenet_v2", "plugin"])
def test_a_random_permutation_leaves_the_outputs_unchanged(arch, request):
    model = request.getfixturevalue("plugin") if arch == "plugin" else _torchvision(arch)
    x = torch.randn(4, 3, *((16, 16) if arch == "plugin" else (32, 32)), generator=torch.Generator().manual_seed(3))
    spec = permutation_spec(model, example_input=x[:2])
    assert set(spec.axes) == set(model.state_dict())  # parameters and buffers alike
    state = _randomized(model, seed=1)
    perms = random_permutation(spec, torch.Generator().manual_seed(2))
    permuted = apply_permutation(spec, perms, state)
    assert not _same(permuted, state)
    for train in (False, True):
        ref = _logits(model, state, x, train)
        torch.testing.assert_close(_logits(model, permuted, x, train), ref, rtol=1e-6, atol=1e-8)
    assert _same(apply_permutation(spec, invert_permutation(perms), permuted), state)


def test_resnet18_has_one_permutation_per_residual_stream_and_block():
    spec = traced_spec(_torchvision("resnet18"))
    assert len(spec.perms) == 4 + 8  # a stream per stage, one inner permutation per block
    stream = spec.axes["conv1.weight"][0]
    assert spec.axes["layer1.1.bn2.running_mean"] == (stream,)
    assert spec.axes["layer2.0.conv1.weight"][1] == stream
    assert spec.axes["layer2.0.downsample.0.weight"][0] == spec.axes["layer2.1.conv2.weight"][0]
    assert spec.axes["fc.weight"][0] is None and spec.axes["layer1.0.bn1.num_batches_tracked"] == ()


def test_the_plugin_spec_keeps_groupnorm_with_its_channels_and_flattens_in_blocks(plugin):
    spec = permutation_spec(plugin)
    stream = spec.axes["stem.weight"][0]
    assert spec.axes["gn1.weight"] == spec.axes["gn2.bias"] == spec.axes["gn3.weight"] == (stream,)
    assert spec.axes["depthwise.weight"] == (stream, None, None, None)  # depthwise: keeps its input's units
    assert spec.axes["hidden.weight"] == ("hidden", stream) and spec.blocks["hidden.weight"] == (1, 16)
    assert spec.axes["ln.weight"] == ("hidden",) and spec.axes["head.weight"] == (None, "hidden")


@pytest.mark.parametrize("arch", ["resnet18", "plugin"])
def test_weight_matching_recovers_a_known_permutation_of_a_traced_model(arch, request):
    model = request.getfixturevalue("plugin") if arch == "plugin" else _torchvision(arch)
    spec = permutation_spec(model)
    a = _randomized(model, seed=4)
    known = random_permutation(spec, torch.Generator().manual_seed(5))
    b = apply_permutation(spec, known, a)
    found = weight_matching(spec, a, b)
    inverse = invert_permutation(known)
    assert all(torch.equal(found[p], inverse[p]) for p in spec.perms)
    assert _same(apply_permutation(spec, found, b), a)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h, _ = self.attn(h, h, h)
        return self.head(h.mean(1))


class _Gated(nn.Module):
    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.GroupNorm(groups, 8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv(x))
        if h.sum() > 0:  # data-dependent control flow
            h = h * 2
        return self.fc(h.mean((2, 3)))


class _Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.a(x), self.b(x)], dim=1).mean((2, 3)))


class _GroupNorm2(_Gated):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("model,example,message", [
    (_Attention(), torch.randn(2, 5, 8), r"layer 'attn' \(MultiheadAttention\)"),
    (_Gated(), None, r"_Gated modules: torch.fx cannot trace it"),
    (_Concat(), None, r"operation 'cat' \(cat\) concatenates hidden units"),
    (_GroupNorm2(groups=2), None, r"layer 'norm' \(GroupNorm\) normalizes 2 groups"),
    (nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), None, "no hidden units to permute"),
], ids=["attention", "control_flow", "cat", "groupnorm", "linear"])
def test_models_alignment_cannot_permute_are_refused_naming_the_layer(model, example, message):
    with pytest.raises(ConfigError, match=rf"^model\.name: permutation alignment does not support .*{message}"):
        permutation_spec(model, example_input=example)


def test_a_traced_spec_that_changes_the_outputs_is_refused_naming_the_layer(monkeypatch):
    from stability.align import _graph

    class Mixer(nn.Module):  # a channel-mixing operation smuggled in as if it were element-wise
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.mix, self.fc = nn.Conv2d(3, 4, 1), nn.Softmax(dim=1), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.mix(self.conv(x).roll(1, dims=1)).mean((2, 3)))

    monkeypatch.setattr(_graph, "_PASS_METHODS", _graph._PASS_METHODS | {"roll"})
    with pytest.raises(ConfigError, match=r"changes the output of layer 'mix' \(Softmax\) in eval mode"):
        permutation_spec(Mixer(), example_input=torch.randn(2, 3, 5, 5))
