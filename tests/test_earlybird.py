"""Early-bird tickets: mask distances, detection, BatchNorm channel masks, the search and its ticket end to end."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import tiny_config
from torch import nn

from stability.apps.cli import main
from stability.errors import ConfigError
from stability.maths.earlybird import (
    batchnorm_layers,
    channel_keep,
    channel_masks,
    detect,
    distance_matrix,
    hamming_distance,
    imp_levels_for,
    magnitude_masks,
    training_cost,
    window_maxima,
)
from stability.maths.pruning import prunable_names
from stability.stages.checkpoints import load_weights
from stability.stages.context import prepare
from stability.stages.earlybird import earlybird_settings, run_earlybird
from stability.stages.trunk import trunk_dir
from stability.store import schema
from stability.store.files import load_tensors, read_csv, read_json

# LeNet-300-100 at width 0.1 on mnist5k, 30 iterations, a mask point every 2 (16 points).
EVERY2 = {"training__eval_every": "2it", "runtime__threads": "1"}
EVERY2_ARGS = ["--preset", "lenet300_mnist5k", "--set", "model.width=0.1", "--set", "training.steps=30it",
               "--set", "training.batch_size=32", "--set", "training.eval_every=2it",
               "--set", "training.rewind_points=5it", "--threads", "1", "--quiet"]


# ----------------------------------------------------------------------------- distances, by hand
def test_hamming_distance_is_the_fraction_of_positions_that_differ():
    a = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    b = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    assert hamming_distance(a, b) == 2 / 6
    assert hamming_distance(a, a) == 0.0
    # mask sets: every tensor's positions count, in key order
    ma = {"w": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "v": torch.tensor([1.0, 1.0])}
    mb = {"w": torch.tensor([[1.0, 1.0], [0.0, 0.0]]), "v": torch.tensor([1.0, 0.0])}
    assert hamming_distance(ma, mb) == 3 / 6
    d = distance_matrix([a, b, torch.zeros(6)])
    # a vs 0: three ones; b vs 0: three ones; a vs b: two
    assert d.tolist() == [[0.0, 2 / 6, 3 / 6], [2 / 6, 0.0, 3 / 6], [3 / 6, 3 / 6, 0.0]]


def _chain(consecutive):
    """A distance matrix whose neighbours are ``consecutive`` (other pairs the sum along the chain, capped at 1)."""
    n = len(consecutive) + 1
    d = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i):
            d[i, j] = d[j, i] = min(1.0, sum(consecutive[j:i]))
    return d


def test_detection_fires_at_the_first_full_window_below_the_threshold():
    # distances between neighbouring masks: point i's distance to point i-1 is consecutive[i-1]
    consecutive = [0.5, 0.3, 0.08, 0.05, 0.12, 0.04, 0.03, 0.02, 0.01]
    d = _chain(consecutive)
    # window 3 at point i >= 3: max of the distances into points i-2, i-1, i
    #   i=3: .5  i=4: .3  i=5: .12  i=6: .12  i=7: .12  i=8: max(.04, .03, .02) = .04 < .1
    maxima = window_maxima(d, 3, "consecutive")
    assert maxima[:3] == [None, None, None]
    assert maxima[3:] == pytest.approx([0.5, 0.3, 0.12, 0.12, 0.12, 0.04, 0.03])
    assert detect(d, 0.1, 3) == 8
    assert detect(d, 0.13, 3) == 5  # .12 < .13
    # a window of 2 fires sooner: i=4: max(.08, .05) = .08
    assert detect(d, 0.1, 2) == 4
    # the released code's rule: point i against each of the 3 before it (distances along the chain)
    #   i=8: d(8,7)=.02 d(8,6)=.05 d(8,5)=.09 -> .09 < .1;  i=7: d(7,4) = .12+.04+.03 = .19
    assert detect(d, 0.1, 3, "latest") == 8
    assert window_maxima(d, 3, "latest")[8] == pytest.approx(0.09)


def test_detection_does_not_fire_while_distances_stay_high():
    d = _chain([0.2] * 10)
    assert detect(d, 0.1, 5) is None
    assert detect(d, 0.1, 2, "latest") is None
    # and not before the window is full, however small the distances
    assert detect(_chain([0.0, 0.0, 0.0]), 0.1, 5) is None


def test_detection_on_a_sequence_of_masks():
    # 10 positions, 5 kept; each mask moves k kept positions: distance 2k/10 to the one before
    masks, current = [], list(range(5))
    for k in (2, 2, 1, 0, 0, 0):
        masks.append(torch.zeros(10).index_fill_(0, torch.tensor(current), 1.0))
        current = current[k:] + [p for p in range(10) if p not in current][:k]
    masks.append(torch.zeros(10).index_fill_(0, torch.tensor(current), 1.0))
    d = distance_matrix(masks)
    assert [float(d[i, i - 1]) for i in range(1, len(masks))] == pytest.approx([0.4, 0.4, 0.2, 0.0, 0.0, 0.0])
    # window 3, threshold .25: i=3: max(.4,.4,.2); i=4: max(.4,.2,0) = .4; i=5: max(.2, 0, 0) = .2 -> fires
    assert detect(d, 0.25, 3) == 5


def test_imp_levels_and_cost_by_hand():
    assert imp_levels_for(0.2, 0.2) == 8  # 0.8^7 = 0.2097 > 0.2 >= 0.8^8 = 0.1678
    assert imp_levels_for(0.64, 0.2) == 2  # exactly 0.8^2, not three by round-off
    assert imp_levels_for(0.5, 0.2) == 4
    cost = training_cost(250, 0, 600, 0.2, 0.2)
    assert cost["early_bird_iterations"] == 850 and cost["imp_iterations"] == 600 + 8 * 600
    assert cost["imp_over_early_bird"] == pytest.approx(5400 / 850)
    # rewinding to k: the ticket trains k..T, and the search must reach k
    cost = training_cost(20, 100, 600, 0.5, 0.2)
    assert cost["early_bird_iterations"] == 100 + 500 and cost["imp_iterations"] == 600 + 4 * 500


# ----------------------------------------------------------------------------- BatchNorm channel masks
class _TwoConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 3, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(-2, -1)))


def test_channel_masks_from_batchnorm_scaling_factors_by_hand():
    torch.manual_seed(0)
    model = _TwoConvBN()
    with torch.no_grad():
        model.bn1.weight.copy_(torch.tensor([0.5, -0.1, 0.9, 0.05]))
        model.bn2.weight.copy_(torch.tensor([0.3, -0.02, 0.7]))
    layers = batchnorm_layers(model, (1, 6, 6))
    assert layers == [("bn1", "conv1"), ("bn2", "conv2")]
    state = model.state_dict()
    # 7 channels, density 0.5: round(0.5 * 7) = 4 removed (half up), the smallest |gamma| overall:
    # .02 (bn2[1]), .05 (bn1[3]), .1 (bn1[1]), .3 (bn2[0]); kept: bn1[0], bn1[2], bn2[2]
    keep = channel_keep(state, layers, 0.5)
    assert keep.tolist() == [True, False, True, False, False, False, True]
    assert int(keep.sum()) == 3
    assert channel_keep(state, layers, 0.6).tolist() == [True, False, True, False, True, False, True]  # 3 removed
    masks = channel_masks(keep, layers, state)
    assert masks["bn1.weight"].tolist() == [1, 0, 1, 0] and masks["bn1.bias"].tolist() == [1, 0, 1, 0]
    assert masks["conv1.bias"].tolist() == [1, 0, 1, 0]
    assert masks["bn2.weight"].tolist() == [0, 0, 1] and "conv2.bias" not in masks
    assert masks["conv1.weight"].shape == (4, 1, 3, 3) and masks["conv1.weight"][1].sum() == 0
    assert masks["conv1.weight"][0].sum() == 9 and masks["conv2.weight"][:2].sum() == 0
    assert masks["conv2.weight"][2].sum() == 4 * 9 and "fc.weight" not in masks
    # the masked network's removed channels are exactly zero after BatchNorm, in training mode too
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in masks:
                p.mul_(masks[name])
    seen = {}
    model.bn1.register_forward_hook(lambda _m, _i, out: seen.setdefault("bn1", out))
    model.train()
    model(torch.randn(5, 1, 6, 6))
    assert torch.all(seen["bn1"][:, [1, 3]] == 0) and torch.any(seen["bn1"][:, [0, 2]] != 0)


def test_batchnorm_layers_of_the_zoo_pair_each_norm_with_its_conv(results_root):
    ctx = prepare(tiny_config(results_root, "resnet8_mnist5k", runtime__threads="1"))
    layers = dict(batchnorm_layers(ctx.new_model(), ctx.data.input_shape))
    assert layers["bn"] == "conv" and layers["blocks.0.bn2"] == "blocks.0.conv2"
    assert layers["blocks.1.shortcut.1"] == "blocks.1.shortcut.0"
    assert batchnorm_layers(nn.Sequential(nn.Linear(3, 2)), (3,)) == []


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def found(tmp_path_factory):
    root = tmp_path_factory.mktemp("earlybird")
    cfg = tiny_config(root, **EVERY2)
    settings = earlybird_settings(density=0.5, threshold=0.5, window=2)
    return cfg, settings, run_earlybird(cfg, settings)


def test_search_detects_a_step_and_trains_its_ticket(found):
    cfg, _settings, result = found
    run = result.run_dir
    assert run.name.startswith("earlybird_")
    steps = list(range(0, 30, 2)) + [30]
    assert result.steps == steps
    # every neighbouring distance of this tiny Adam run is far below 0.5: the first full window fires
    assert result.detected_step == 4
    points = read_csv(run / schema.EARLYBIRD_POINTS)
    assert [p["step"] for p in points] == steps and [p["detected"] for p in points].count(True) == 1
    assert all(p["kept"] == p["total"] // 2 for p in points)
    pairs = read_csv(run / schema.EARLYBIRD_DISTANCES)
    assert len(pairs) == len(steps) ** 2
    matrix = torch.tensor(result.distances, dtype=torch.float64)
    assert torch.equal(matrix, matrix.T) and torch.all(matrix.diagonal() == 0)
    assert detect(matrix, 0.5, 2) == steps.index(4)
    # the mask recorded at a point is the global magnitude mask of the trunk's weights at that step
    trunk = trunk_dir(cfg)
    names = prunable_names(prepare(cfg).model)
    at4, at30 = (magnitude_masks(load_weights(trunk, s), names, 0.5) for s in (4, 30))
    assert hamming_distance(at4, at30) == pytest.approx(matrix[2, -1].item(), abs=1e-12)
    saved, meta = load_tensors(run / schema.EARLYBIRD_MASK)
    assert meta["step"] == 4 and all(torch.equal(saved[n], at4[n]) for n in names)
    summary = read_json(run / schema.EARLYBIRD_SUMMARY)
    assert summary["detected_step"] == 4 and summary["mask"] == "magnitude" and summary["target_density"] == 0.5
    assert summary["threshold"] == 0.5 and summary["window"] == 2
    ticket = summary["ticket"]
    assert ticket["weight_density"] == pytest.approx(0.5) and ticket["rewind_step"] == 0
    assert 0 < ticket["final_test_accuracy"] <= 1
    # flagged against chance (about 0.1 on mnist5k; margin 0.05)
    assert ticket["status"] == ("untrained" if 1 - ticket["final_test_accuracy"] > 0.9 - 0.05 else "ok")
    dense = read_json(trunk.path / schema.SUMMARY)["final_test_accuracy"]
    assert summary["dense_final_test_accuracy"] == pytest.approx(dense)
    # the ticket kept the mask through training
    final, _ = load_tensors(Path(ticket["ticket_dir"]) / schema.FINAL_STATE)
    for n in names:
        assert torch.all(final[f"param/{n}"][0][at4[n] == 0] == 0)
    cost = summary["cost"]  # 4 + 30 vs dense 30 + ceil(log .5 / log .8) = 4 levels of 30
    assert cost["early_bird_iterations"] == 34 and cost["imp_levels"] == 4 and cost["imp_iterations"] == 150


def test_a_rerun_reuses_the_records(found, capsys):
    cfg, settings, result = found
    files = {p: p.stat().st_mtime_ns for p in result.run_dir.rglob("*") if p.is_file()}
    trunk_files = {p: p.stat().st_mtime_ns for p in trunk_dir(cfg).path.rglob("*") if p.is_file()}
    again = run_earlybird(cfg, settings)
    assert again.reused and again.run_dir == result.run_dir and again.detected_step == 4
    assert again.distances == result.distances  # repr of floats round-trips exactly
    assert {p: p.stat().st_mtime_ns for p in result.run_dir.rglob("*") if p.is_file()} == files
    assert {p: p.stat().st_mtime_ns for p in trunk_dir(cfg).path.rglob("*") if p.is_file()} == trunk_files
    # the CLI finds the same run; another IMP prune fraction only redoes the comparison
    root = cfg.runtime.results_root
    assert main(["earlybird", *EVERY2_ARGS, "--density", "0.5", "--threshold", "0.5", "--window", "2",
                 "--prune-fraction", "0.5", "--out", root]) == 0
    out = capsys.readouterr().out
    assert "already complete" in out and "early-bird step: 4it" in out
    assert "vs IMP 60 (dense + 1 level at prune fraction 0.5" in out
    assert read_json(result.run_dir / schema.EARLYBIRD_SUMMARY)["cost"]["imp_levels"] == 1


def test_no_detection_means_no_ticket_and_says_so(found, capsys):
    cfg, _, _ = found
    root = cfg.runtime.results_root
    assert main(["earlybird", *EVERY2_ARGS, "--density", "0.5", "--threshold", "1e-6", "--out", root]) == 0
    out = capsys.readouterr().out
    assert "no early-bird ticket" in out and "no ticket was trained" in out
    assert main(["earlybird", *EVERY2_ARGS, "--density", "0.5", "--threshold", "1e-6", "--out", root,
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["detected"] is False and summary["detected_step"] is None and summary["ticket"] is None
    run = summary["run_dir"]
    assert not (Path(run) / schema.EARLYBIRD_MASK).exists()
    assert not [p for p in Path(run).iterdir() if p.is_dir()]  # no ticket_<digest>/


def test_channel_ticket_zeroes_whole_channels(tmp_path):
    cfg = tiny_config(tmp_path, "resnet8_mnist5k", model__width="0.25", training__steps="12it",
                      training__rewind_points="4it", **EVERY2)
    result = run_earlybird(cfg, earlybird_settings(mask="channel", density=0.5, threshold=1.0, window=2))
    assert result.detected_step == 4  # a distance below 1 always: the first full window
    summary = result.summary
    assert summary["ticket"]["channel_density"] == 0.5
    masks, _ = load_tensors(result.run_dir / schema.EARLYBIRD_MASK)
    final, _ = load_tensors(Path(summary["ticket"]["ticket_dir"]) / schema.FINAL_STATE)
    ctx = prepare(cfg)
    pruned = 0
    for bn, conv in batchnorm_layers(ctx.new_model(), ctx.data.input_shape):
        gone = masks[f"{bn}.weight"] == 0
        pruned += int(gone.sum())
        for name in (f"{bn}.weight", f"{bn}.bias"):
            assert torch.all(final[f"param/{name}"][0][gone] == 0)
        assert torch.all(final[f"param/{conv}.weight"][0][gone] == 0)
        assert torch.any(final[f"param/{conv}.weight"][0][~gone] != 0)
    assert pruned == 42  # of 84 channels: 4 + 2 * 4 + 3 * 8 + 3 * 16


def test_records_load_and_draw_the_distance_heat_map(found, tmp_path):
    from analysis.figures import plot_all, plot_earlybird_distances
    from analysis.load import earlybird_distances, earlybird_points

    cfg, _, result = found
    pairs = earlybird_distances(cfg.runtime.results_root)
    pairs = pairs[pairs["run_hash"] == result.run_dir.name.split("_")[1]]
    assert len(pairs) == 16 * 16 and set(pairs["detected_step"]) == {4.0}
    assert set(pairs["mask"]) == {"magnitude"} and pairs["model.name"].iloc[0] == "lenet_300_100"
    points = earlybird_points(result.run_dir)
    assert list(points["step"]) == result.steps and points["detected"].sum() == 1
    fig = plot_earlybird_distances(pairs, save=tmp_path / "eb", formats="png")
    assert "early bird at 4it" in fig.axes[0].get_title()
    assert (tmp_path / "eb.png").stat().st_size > 1000
    written = plot_all(result.run_dir, tmp_path / "all", formats="png", kinds="earlybird")
    assert [p.name for p in written] == [f"{result.run_dir.name}.png"]


# ----------------------------------------------------------------------------- bad settings
@pytest.mark.parametrize("args, match", [
    (["--density", "0"], "earlybird.density: must be in (0, 1)"),
    (["--density", "1"], "earlybird.density: must be in (0, 1)"),
    (["--density", "1.5"], "earlybird.density: must be in (0, 1)"),
    (["--threshold", "0"], "earlybird.threshold: must be in (0, 1]"),
    (["--threshold", "-0.1"], "earlybird.threshold: must be in (0, 1]"),
    (["--window", "1"], "earlybird.window: must be an integer >= 2"),
    (["--mask", "channel"], ("earlybird.mask: 'channel' masks come from BatchNorm scaling factors, and model "
                            "'lenet_300_100' has no BatchNorm with them; choose one of magnitude, channel")),
    (["--mask", "filters"], "earlybird.mask: unknown mask kind 'filters'; choose one of magnitude, channel"),
    (["--rule", "oldest"], "earlybird.rule: unknown rule 'oldest'; choose one of consecutive, latest"),
    (["--every", "10it", "--window", "5"], "earlybird.window: 5 distances need at least 6 mask points"),
    (["--rewind", "30it"], "earlybird.rewind: step '30it' = iteration 30 is at or past the final step 30"),
    (["--prune-fraction", "1"], "earlybird.prune_fraction: must be in (0, 1)"),
])
def test_bad_settings_exit_2_and_write_nothing(results_root, capsys, args, match):
    assert main(["earlybird", *EVERY2_ARGS, *args, "--out", str(results_root)]) == 2
    assert match in capsys.readouterr().err
    assert list(results_root.iterdir()) == []


def test_settings_refuse_bad_values_in_python_too():
    with pytest.raises(ConfigError, match="earlybird.density"):
        earlybird_settings(density=math.nan)
    with pytest.raises(ConfigError, match="earlybird.window"):
        earlybird_settings(window=True)
