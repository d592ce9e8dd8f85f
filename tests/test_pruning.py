"""Masks, prunable tensors and the four pruning strategies, against hand-computed picks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stability.errors import ConfigError
from stability.maths.pruning import (
    STRATEGIES,
    apply_masks_,
    dense_masks,
    density,
    lamp_scores,
    layer_densities,
    prunable_names,
    prune,
    random_masks_like,
    target_density,
)


def _alive(masks):
    return {k: int(v.sum()) for k, v in masks.items()}


def _half_up(x: float) -> int:
    return math.floor(x + 0.5)


def _random_weights(seed: int, shapes: dict[str, tuple[int, ...]]):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


SHAPES = {"conv.weight": (4, 3, 3, 3), "fc1.weight": (7, 11), "fc2.weight": (3, 7)}


# ---------------------------------------------------------------------------
# prunable_names
# ---------------------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Conv1d(2, 2, 1)
        )
        self.fc1 = nn.Linear(8, 4)
        self.norm = nn.LayerNorm(4)
        self.fc3 = nn.Linear(4, 2)


def test_prunable_names_weights_only_in_model_order():
    seq = nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8, 4),
        nn.Linear(4, 2),
    )
    assert prunable_names(seq) == ["0.weight", "4.weight", "5.weight"]
    assert prunable_names(_Net()) == [
        "features.0.weight",
        "features.3.weight",
        "fc1.weight",
        "fc3.weight",
    ]


def test_prunable_names_exclude_by_module_or_parameter():
    net = _Net()
    assert prunable_names(net, exclude=["fc3"]) == [
        "features.0.weight",
        "features.3.weight",
        "fc1.weight",
    ]
    assert prunable_names(net, exclude=("fc3.weight", "features.0")) == [
        "features.3.weight",
        "fc1.weight",
    ]
    assert prunable_names(net, exclude="fc3") == [
        "features.0.weight",
        "features.3.weight",
        "fc1.weight",
    ]


@pytest.mark.parametrize("bad", ["fc2", "fc3.bias", "norm", "features.1"])
def test_prunable_names_bad_exclude(bad):
    with pytest.raises(ConfigError, match="pruning.exclude") as info:
        prunable_names(_Net(), exclude=[bad])
    assert "fc1.weight" in str(info.value) and repr(bad) in str(info.value)


def test_dense_masks():
    weights = {"a": torch.randn(2, 3, dtype=torch.float64), "b": torch.randn(4)}
    masks = dense_masks(weights, ["a"])
    assert list(masks) == ["a"]
    assert (
        masks["a"].dtype == torch.float32
        and masks["a"].shape == (2, 3)
        and bool((masks["a"] == 1).all())
    )
    with pytest.raises(KeyError):
        dense_masks(weights, ["c"])


# ---------------------------------------------------------------------------
# Exact counts, ties, existing masks
# ---------------------------------------------------------------------------
def test_global_picks_smallest_magnitudes():
    weights = {"a": torch.tensor([[3.0, -1.0], [2.0, 5.0]]), "b": torch.tensor([-4.0, 0.5, 6.0])}
    # 7 survivors, 0.5 * 7 = 3.5 rounds half up to 4: 0.5, 1, 2, 3 go
    new = prune(weights, dense_masks(weights, ["a", "b"]), 0.5, "global")
    assert new["a"].tolist() == [[0.0, 0.0], [0.0, 1.0]]
    assert new["b"].tolist() == [1.0, 0.0, 1.0]


def test_global_ties_broken_by_flattened_order():
    weights = {"a": torch.ones(3), "b": -torch.ones(2)}
    new = prune(weights, dense_masks(weights, ["a", "b"]), 0.6, "global")  # 3 of 5
    assert new["a"].tolist() == [0.0, 0.0, 0.0] and new["b"].tolist() == [1.0, 1.0]
    new = prune(
        weights, dense_masks(weights, ["b", "a"]), 0.4, "global"
    )  # key order decides: b first
    assert new["b"].tolist() == [0.0, 0.0] and new["a"].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("fraction", [0.2, 0.37, 0.5, 0.9])
def test_exact_count_and_pruned_stay_pruned(strategy, fraction):
    weights = _random_weights(0, SHAPES)
    # An existing partial mask whose pruned entries hold the smallest weights (zeros), as after training:
    # a strategy that ignored the mask would pick them again and remove too few.
    masks = random_masks_like(
        {
            k: (torch.rand(s, generator=torch.Generator().manual_seed(1)) < 0.63).float()
            for k, s in SHAPES.items()
        },
        torch.Generator().manual_seed(2),
    )
    weights = {k: w * masks[k] for k, w in weights.items()}
    # ties: duplicate magnitudes across and within tensors
    weights["fc1.weight"][0, :4] = 0.25
    weights["fc2.weight"][1, :3] = -0.25
    before = _alive(masks)
    original = {k: v.clone() for k, v in masks.items()}
    kw = {"generator": torch.Generator().manual_seed(3)} if strategy == "random" else {}
    if strategy == "layerwise":
        kw["rate_overrides"] = {"fc2": fraction / 2}
    new = prune(weights, masks, fraction, strategy, **kw)
    after = _alive(new)
    if strategy == "layerwise":
        for name in SHAPES:
            rate = fraction / 2 if name == "fc2.weight" else fraction
            assert before[name] - after[name] == _half_up(rate * before[name])
    else:
        total = sum(before.values())
        assert total - sum(after.values()) == _half_up(fraction * total)
    for name in SHAPES:
        assert new[name].dtype == torch.float32 and new[name].shape == masks[name].shape
        assert bool((new[name] <= masks[name]).all()), "a pruned weight came back"
    assert all(torch.equal(masks[k], original[k]) for k in SHAPES)  # inputs untouched


def test_odd_counts_round_half_up():
    weights = {"a": torch.arange(1.0, 6.0)}  # 5 weights
    masks = dense_masks(weights, ["a"])
    assert _alive(prune(weights, masks, 0.5, "global"))["a"] == 2  # 2.5 -> 3 removed
    assert _alive(prune(weights, masks, 0.5, "layerwise"))["a"] == 2
    assert _alive(prune(weights, masks, 0.05, "global"))["a"] == 5  # 0.25 -> nothing removed
    assert _alive(prune(weights, masks, 0.1, "global"))["a"] == 4  # 0.5 -> 1


def test_layerwise_output_layer_at_half_rate():
    weights = _random_weights(
        4, {"fc1.weight": (30, 20), "fc2.weight": (10, 30), "fc3.weight": (5, 10)}
    )
    masks = dense_masks(weights, list(weights))
    for overrides in ({"fc3": 0.1}, {"fc3.weight": 0.1}):
        new = prune(weights, masks, 0.2, "layerwise", rate_overrides=overrides)
        assert _alive(new) == {"fc1.weight": 480, "fc2.weight": 240, "fc3.weight": 45}
        for name, w in weights.items():  # within a layer, the smallest magnitudes go
            kept, gone = w.abs()[new[name] == 1], w.abs()[new[name] == 0]
            assert gone.max() <= kept.min()
    # Twice: 20% of the 480 survivors of fc1, 10% of fc3's 45 (4.5 -> 5)
    twice = prune(weights, new, 0.2, "layerwise", rate_overrides={"fc3": 0.1})
    assert _alive(twice) == {"fc1.weight": 384, "fc2.weight": 192, "fc3.weight": 40}


def test_rate_override_errors():
    weights = {"fc1.weight": torch.randn(3, 3)}
    masks = dense_masks(weights, ["fc1.weight"])
    with pytest.raises(ConfigError, match="pruning.rate_overrides.*'fc9'"):
        prune(weights, masks, 0.2, "layerwise", rate_overrides={"fc9": 0.1})
    with pytest.raises(ConfigError, match="pruning.rate_overrides"):
        prune(weights, masks, 0.2, "layerwise", rate_overrides={"fc1": 1.0})
    with pytest.raises(ConfigError, match="layerwise"):
        prune(weights, masks, 0.2, "global", rate_overrides={"fc1": 0.1})


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, float("nan")])
def test_bad_fraction(fraction):
    weights = {"a": torch.randn(4)}
    with pytest.raises(ConfigError, match=r"prune_fraction.*\(0, 1\)"):
        prune(weights, dense_masks(weights, ["a"]), fraction, "global")
    with pytest.raises(ConfigError, match="prune_fraction"):
        target_density(fraction, 3)


def test_bad_strategy():
    weights = {"a": torch.randn(4)}
    with pytest.raises(ConfigError, match="strategy") as info:
        prune(weights, dense_masks(weights, ["a"]), 0.2, "magnitude")
    assert all(s in str(info.value) for s in STRATEGIES)


def test_mismatched_weights():
    with pytest.raises(ValueError, match="shape"):
        prune({"a": torch.randn(4)}, {"a": torch.ones(5)}, 0.2, "global")
    with pytest.raises(KeyError):
        prune({"a": torch.randn(4)}, {"b": torch.ones(4)}, 0.2, "global")


# ---------------------------------------------------------------------------
# LAMP
# ---------------------------------------------------------------------------
def test_lamp_scores_hand_computed():
    weights = {"a": torch.tensor([3.0, -1.0, 2.0]), "b": torch.tensor([2.0, -2.0, 5.0, 7.0])}
    masks = {"a": torch.ones(3), "b": torch.tensor([1.0, 1.0, 1.0, 0.0])}
    scores = lamp_scores(weights, masks)
    # a sorted: 1, 2, 3 -> 1/14, 4/13, 9/9
    assert torch.allclose(scores["a"], torch.tensor([1.0, 1 / 14, 4 / 13], dtype=torch.float64))
    # b survivors 2, -2, 5 (7 is pruned): the tie keeps flattened order, so b[0] comes first
    assert scores["b"][:3].tolist() == pytest.approx([4 / 33, 4 / 29, 1.0])
    assert scores["b"][3] == math.inf


def test_lamp_zero_weights_score_zero():
    scores = lamp_scores({"a": torch.zeros(3)}, {"a": torch.ones(3)})
    assert scores["a"].tolist() == [0.0, 0.0, 0.0]


def test_lamp_prune_across_layers_differs_from_global():
    weights = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([20.0, 10.0])}
    masks = dense_masks(weights, ["a", "b"])
    # scores: a = 1/14, 4/13, 1; b = 1, 100/500. Two of five go: a[0] (0.071) and b[1] (0.2)
    new = prune(weights, masks, 0.4, "lamp")
    assert new["a"].tolist() == [0.0, 1.0, 1.0] and new["b"].tolist() == [1.0, 0.0]
    # Magnitude would take the two smallest of a instead
    mag = prune(weights, masks, 0.4, "global")
    assert mag["a"].tolist() == [0.0, 0.0, 1.0] and mag["b"].tolist() == [1.0, 1.0]
    # Three go: a[1] (0.308) next
    new = prune(weights, masks, 0.6, "lamp")
    assert new["a"].tolist() == [0.0, 0.0, 1.0] and new["b"].tolist() == [1.0, 0.0]
    # From a partial mask, scores are recomputed over the survivors only: a = [2, 3] -> 4/13, 1; b -> 0.2, 1
    again = prune(weights, prune(weights, masks, 0.2, "lamp"), 0.5, "lamp")  # 1 of 5, then 2 of 4
    assert again["a"].tolist() == [0.0, 0.0, 1.0] and again["b"].tolist() == [1.0, 0.0]


# ---------------------------------------------------------------------------
# Random
# ---------------------------------------------------------------------------
def test_random_is_seeded():
    weights = _random_weights(5, SHAPES)
    masks = dense_masks(weights, list(SHAPES))

    def run(seed):
        return prune(weights, masks, 0.3, "random", generator=torch.Generator().manual_seed(seed))

    a, b, c = run(7), run(7), run(8)
    assert all(torch.equal(a[k], b[k]) for k in SHAPES)
    assert not all(torch.equal(a[k], c[k]) for k in SHAPES)


def test_random_masks_like_keeps_layer_counts():
    weights = _random_weights(6, SHAPES)
    masks = prune(
        weights, dense_masks(weights, list(SHAPES)), 0.6, "layerwise", rate_overrides={"fc2": 0.3}
    )
    a = random_masks_like(masks, torch.Generator().manual_seed(0))
    b = random_masks_like(masks, torch.Generator().manual_seed(0))
    assert _alive(a) == _alive(masks) and layer_densities(a) == layer_densities(masks)
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == torch.float32 for k in SHAPES)
    assert not all(torch.equal(a[k], masks[k]) for k in SHAPES)
    assert set(torch.cat([v.flatten() for v in a.values()]).tolist()) == {0.0, 1.0}


# ---------------------------------------------------------------------------
# Density, target density, applying masks
# ---------------------------------------------------------------------------
def test_density_and_layer_densities():
    masks = {"a": torch.tensor([1.0, 0.0, 0.0, 1.0]), "b": torch.ones(2, 3)}
    assert density(masks) == pytest.approx(8 / 10)
    assert layer_densities(masks) == {"a": 0.5, "b": 1.0}


def test_target_density_and_imp_levels():
    assert target_density(0.2, 0) == 1.0
    assert target_density(0.2, 3) == pytest.approx(0.512)
    weights = _random_weights(9, SHAPES)
    masks = dense_masks(weights, list(SHAPES))
    for level in range(1, 6):
        masks = prune(weights, masks, 0.2, "global")
        n = sum(m.numel() for m in masks.values())
        assert abs(density(masks) - target_density(0.2, level)) <= level / n


def test_apply_masks_plain_and_stacked():
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = nn.Parameter(torch.full((2, 2), 3.0))
    stacked = torch.full((3, 2, 2), 2.0, dtype=torch.float64)
    other = torch.full((2,), 5.0)
    apply_masks_({"w": p, "s": stacked, "b": other}, {"w": mask, "s": mask})
    assert p.tolist() == [[3.0, 0.0], [0.0, 3.0]] and p.requires_grad
    assert all(stacked[i].tolist() == [[2.0, 0.0], [0.0, 2.0]] for i in range(3))
    assert other.tolist() == [5.0, 5.0]
    with pytest.raises(ValueError, match="shape"):
        apply_masks_({"w": torch.ones(2, 3)}, {"w": mask})
    with pytest.raises(KeyError):
        apply_masks_({}, {"w": mask})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gpu_matches_cpu(strategy):
    weights = _random_weights(10, SHAPES)
    weights["fc1.weight"][0, :5] = 0.5  # ties
    masks = dense_masks(weights, list(SHAPES))
    cuda_w = {k: v.cuda() for k, v in weights.items()}
    cuda_m = {k: v.cuda() for k, v in masks.items()}
    if strategy == "random":
        gen = torch.Generator(device="cuda").manual_seed(0)
        new = prune(cuda_w, cuda_m, 0.3, strategy, generator=gen)
        assert all(m.is_cuda for m in new.values())
        assert sum(_alive(masks).values()) - sum(_alive(new).values()) == _half_up(
            0.3 * sum(_alive(masks).values())
        )
        return
    cpu = prune(weights, masks, 0.3, strategy)
    gpu = prune(cuda_w, cuda_m, 0.3, strategy)
    assert all(gpu[k].is_cuda and torch.equal(gpu[k].cpu(), cpu[k]) for k in SHAPES)
    mixed = prune(cuda_w, masks, 0.3, strategy)  # weights on the GPU, masks on the CPU
    assert all(not mixed[k].is_cuda and torch.equal(mixed[k], cpu[k]) for k in SHAPES)


# ---------------------------------------------------------------- Zhou et al. (2019) mask criteria
@pytest.mark.parametrize("criterion,kept", [
    ("large_final", [0, 2]),             # |w_f| = 3, .5, 2.5, 2
    ("small_final", [1, 3]),
    ("large_init", [1, 2]),              # |w_i| = 1, 1, 2, .5 (ties: the earlier position is pruned first)
    ("small_init", [1, 3]),
    ("magnitude_increase", [0, 3]),      # |w_f| - |w_i| = 2, -.5, .5, 1.5
    ("movement", [0, 3]),                # |w_f - w_i| = 2, .5, .5, 2.5
    ("large_final_same_sign", [0, 2]),   # w_3 changed sign: score 0
    ("large_init_large_final", [0, 2]),  # ranks of |w_i| 1,2,3,0 and of |w_f| 3,0,2,1: min 1,0,2,0
])
def test_mask_criteria_keep_the_weights_zhou_et_al_keep(criterion, kept):
    w_i = {"w": torch.tensor([1.0, -1.0, 2.0, 0.5])}
    w_f = {"w": torch.tensor([3.0, -0.5, 2.5, -2.0])}
    for strategy in ("global", "layerwise"):
        masks = prune(w_f, {"w": torch.ones(4)}, 0.5, strategy, criterion=criterion, initial=w_i)
        assert masks["w"].nonzero().squeeze(1).tolist() == kept, strategy


def test_large_init_large_final_keeps_the_weights_above_one_percentile_in_both():
    # the reference's quadrant: kept iff |w_i| and |w_f| are both above the same percentile threshold
    w_i = {"w": torch.tensor([4.0, 3.0, 2.0, 1.0])}
    w_f = {"w": torch.tensor([1.0, 4.0, 3.0, 2.0])}
    masks = prune(w_f, {"w": torch.ones(4)}, 0.5, "layerwise", criterion="large_init_large_final", initial=w_i)
    assert masks["w"].tolist() == [0.0, 1.0, 1.0, 0.0]  # 25th percentile: {0,1,2} and {1,2,3} intersect in {1,2}
    masks = prune(w_f, {"w": torch.ones(4)}, 0.5, "layerwise", criterion="small_init_small_final", initial=w_i)
    assert masks["w"].tolist() == [0.0, 0.0, 1.0, 1.0]  # small in both: {1,2,3} and {0,2,3} intersect in {2,3}


def test_random_criterion_is_seeded_and_keeps_the_exact_count_and_bad_criteria_are_refused():
    w = {"a": torch.randn(50), "b": torch.randn(30)}
    ones = {k: torch.ones_like(v) for k, v in w.items()}
    one = prune(w, ones, 0.25, "layerwise", criterion="random", generator=torch.Generator().manual_seed(1))
    two = prune(w, ones, 0.25, "layerwise", criterion="random", generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(one[k], two[k]) for k in w)
    magnitude = prune(w, ones, 0.25, "layerwise")
    assert [int(one[k].sum()) for k in w] == [int(magnitude[k].sum()) for k in w] == [37, 22]  # 25% per layer
    assert not torch.equal(one["a"], magnitude["a"])
    with pytest.raises(ConfigError, match="imp.criterion: unknown criterion 'biggest'"):
        prune(w, ones, 0.25, "global", criterion="biggest", initial=w)
    with pytest.raises(ConfigError, match="imp.criterion: 'movement' applies to strategies global and layerwise"):
        prune(w, ones, 0.25, "lamp", criterion="movement", initial=w)
    with pytest.raises(ConfigError, match="needs the weights at the rewind point"):
        prune(w, ones, 0.25, "global", criterion="movement")


def test_mask1_actions_set_the_kept_weights_as_zhou_et_al_describe():
    from stability.maths.pruning import MASK1_ACTIONS, mask1_start

    g = torch.Generator().manual_seed(0)
    rewound = {"w": torch.randn(6, 5, generator=g), "b": torch.randn(6, generator=g)}
    fresh = {"w": torch.randn(6, 5, generator=g), "b": torch.randn(6, generator=g)}
    mask = {"w": (torch.rand(6, 5, generator=g) < 0.5).float()}
    keep = mask["w"].bool()
    out = {a: mask1_start(a, rewound, mask, fresh=fresh, generator=torch.Generator().manual_seed(1))
           for a in MASK1_ACTIONS}
    for a, state in out.items():
        assert torch.equal(state["b"], rewound["b"]), a  # tensors without a mask stay rewound
        assert torch.equal(state["w"][~keep], rewound["w"][~keep]), a  # pruned positions untouched
    assert torch.equal(out["rewind"]["w"], rewound["w"])
    assert torch.equal(out["reinit"]["w"][keep], fresh["w"][keep])
    shuffled = out["reshuffle"]["w"][keep]
    assert torch.equal(shuffled.sort().values, rewound["w"][keep].sort().values)  # the same values ...
    assert not torch.equal(shuffled, rewound["w"][keep])  # ... in other places
    sigma = rewound["w"].double().std().float()
    assert torch.allclose(out["constant"]["w"][keep], torch.sign(rewound["w"][keep]) * sigma)
    flipped = out["random_sign"]["w"][keep]
    assert torch.equal(flipped.abs(), rewound["w"][keep].abs())
    assert (torch.sign(flipped) != torch.sign(rewound["w"][keep])).any()
    with pytest.raises(ConfigError, match="imp.mask1: unknown action 'zero'"):
        mask1_start("zero", rewound, mask)
