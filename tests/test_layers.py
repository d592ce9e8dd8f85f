"""Layer-wise barriers (lmc.layer_barriers, connect --layers, layer_sweep, the layers figure)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config

from stability import lmc
from stability.apps.cli import main
from stability.config import ModelConfig
from stability.errors import ConfigError
from stability.lmc.layers import chord_barrier, layer_groups
from stability.models.build import build_model
from stability.stages.checkpoints import load_weights
from stability.stages.connect import connect, connect_settings
from stability.stages.context import prepare
from stability.stages.trunk import train_trunk
from stability.store.files import read_csv
from stability.store.schema import LAYER_COLUMNS, LAYERS_TABLE


@pytest.fixture(scope="module")
def trunks(tmp_path_factory):
    """Two LeNet-300-100s (width 0.1) trained 30 iterations on mnist5k from different initializations."""
    root = tmp_path_factory.mktemp("layers")
    cfg_a, cfg_b = tiny_config(root), tiny_config(root, training__init_seed="1")
    a, b = train_trunk(cfg_a), train_trunk(cfg_b)
    ctx = prepare(cfg_a)
    nets = []
    for run in (a, b):
        net = ctx.new_model()
        net.load_state_dict(load_weights(run.run_dir, ctx.total_steps))
        nets.append(net.eval())
    return root, cfg_a, a.run_dir, b.run_dir, nets[0], nets[1], ctx.data.split("test")


def _resnets():
    """Two ResNet-8s (width 1/4, BatchNorm with running statistics of a few batches) and random 12x12 data."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 12, 12, generator=g)
    y = torch.randint(0, 10, (96,), generator=g)
    nets = []
    for seed in (0, 1):
        net = build_model(ModelConfig(name="resnet", depth=8, width=0.25), (1, 12, 12), 10, seed).train()
        with torch.no_grad():
            for i in range(3):
                net(x[i * 32:(i + 1) * 32])
        nets.append(net.eval())
    return nets[0], nets[1], x, y


def _hand_group(a, b, names, alphas, x, y):
    """load_state_dict with one group interpolated at every α (the rest at a), evaluate: the reference loop."""
    m = copy.deepcopy(a).eval()
    sa, sb = a.state_dict(), b.state_dict()
    errs, losses = [], []
    for alpha in alphas:
        m.load_state_dict({k: (1 - alpha) * sa[k] + alpha * sb[k] if k in names and sa[k].is_floating_point()
                           else sa[k] for k in sa})
        with torch.no_grad():
            out = m(x)
        errs.append(float((out.argmax(1) != y).double().mean()))
        losses.append(float(F.cross_entropy(out.double(), y)))
    return errs, losses


def test_groups_cover_every_tensor_once_and_follow_the_architecture():
    net = build_model(ModelConfig(name="resnet", depth=8, width=0.25), (1, 12, 12), 10, 0)
    every = [*dict(net.named_parameters()), *dict(net.named_buffers())]
    blocks = layer_groups(net, "blocks")
    assert [g for g, _ in blocks] == ["conv", "blocks.0", "blocks.1", "blocks.2", "fc"]
    assert "bn.weight" in dict(blocks)["conv"]  # the stem's BatchNorm travels with its convolution
    layers = layer_groups(net, "layers")
    assert [g for g, _ in layers][:3] == ["conv", "blocks.0.conv1", "blocks.0.conv2"]
    assert "blocks.0.bn1.running_mean" in dict(layers)["blocks.0.conv1"]
    for grouping in (blocks, layers):
        names = [n for _, group in grouping for n in group]
        assert sorted(names) == sorted(every)
    with pytest.raises(ConfigError, match="groups: unknown grouping 'rows'"):
        layer_groups(net, "rows")


def test_identical_networks_have_no_barrier_at_any_layer(trunks, one_torch_thread):
    _, _, _, _, a, _, test = trunks
    result = lmc.layer_barriers(a, copy.deepcopy(a), test, alphas=5)
    assert result.groups == ["fc.0", "fc.1", "fc.2"]
    for values in (result.barriers, result.loss_barriers, result.cumulative_barriers, result.cumulative_loss_barriers,
                   result.chord_barriers):
        assert values == pytest.approx([0.0] * 3, abs=1e-6)


def test_cumulative_barrier_over_every_layer_is_the_plain_barrier(trunks, one_torch_thread):
    _, _, _, _, a, b, test = trunks
    result = lmc.layer_barriers(a, b, test, alphas=11)
    curve = lmc.interpolate(a, b, test, alphas=11)
    assert result.barrier == pytest.approx(curve.barrier, abs=1e-9)
    assert result.cumulative_loss_barriers[-1] == pytest.approx(curve.loss_barrier, rel=1e-5)
    assert result.cumulative_error[-1] == pytest.approx(curve.error, abs=1e-9)
    assert result.barrier > 0.02  # independent networks: a real barrier, so the equality means something
    # the first group alone and cumulatively are one path
    assert result.error[0] == result.cumulative_error[0]
    # the chord barrier: the bump above the line between the path's own ends; the hybrid's error is the path's end
    for g, errors in enumerate(result.error):
        chord = max(e - ((1 - t) * errors[0] + t * errors[-1]) for t, e in zip(result.alphas, errors))
        assert result.chord_barriers[g] == pytest.approx(chord) and result.end_errors[g] == errors[-1]
    assert chord_barrier([0.0, 0.5, 1.0], [0.1, 0.2, 0.9]) == pytest.approx(0.0)  # convex: no bump
    assert chord_barrier([0.0, 0.5, 1.0], [0.1, 0.6, 0.1]) == pytest.approx(0.5)
    frame = result.dataframe()
    assert list(frame.columns) == [c for c in LAYER_COLUMNS if c not in ("rewind_step", "pair", "split")]
    assert frame["parameters"].sum() == sum(p.numel() for p in a.parameters())


@pytest.mark.parametrize("bn", ["interpolate", "reset"])
def test_stacked_layer_paths_equal_a_hand_loop_with_batchnorm(bn, one_torch_thread):
    a, b, x, y = _resnets()
    alphas = [0.0, 0.5, 1.0]
    result = lmc.layer_barriers(a, b, (x, y), alphas=alphas, groups="blocks", bn=bn, batch_size=48)
    group = result.groups.index("blocks.1")
    names = set(result.tensors[group])
    if bn == "interpolate":
        errs, losses = _hand_group(a, b, names, alphas, x, y)
    else:  # recompute the statistics of each hybrid network by hand: cumulative average over the two batches
        errs, losses = [], []
        for alpha in alphas:
            m = copy.deepcopy(a)
            sa, sb = a.state_dict(), b.state_dict()
            m.load_state_dict({k: (1 - alpha) * sa[k] + alpha * sb[k] if k in names and sa[k].is_floating_point()
                               else sa[k] for k in sa})
            for mod in m.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.reset_running_stats()
                    mod.momentum = None
            m.train()
            with torch.no_grad():
                m(x[:48])
                m(x[48:])
            e, loss = _hand_group(m, m, set(), [0.0], x, y)
            errs += e
            losses += loss
    assert result.error[group] == pytest.approx(errs, abs=1.5 / len(y))
    assert result.loss[group] == pytest.approx(losses, rel=1e-4)


def test_connect_layers_writes_the_table_and_keeps_old_names(trunks, capsys, one_torch_thread):
    _, _, run_a, run_b, a, b, test = trunks
    plain = connect(run_a, run_b, connect_settings(alphas=5))
    assert plain.layers == [] and not (plain.run_dir / LAYERS_TABLE).exists()
    assert connect(run_a, run_b, connect_settings(alphas=5, layer_groups="blocks")).run_dir == plain.run_dir
    code = main(["connect", str(run_a), str(run_b), "--alphas", "5", "--layers"])
    out = capsys.readouterr().out
    assert code == 0 and "cumulative from the input" in out
    result = connect(run_a, run_b, connect_settings(alphas=5, layers=True))
    assert result.run_dir != plain.run_dir
    rows = read_csv(result.run_dir / LAYERS_TABLE)
    assert [r["group"] for r in rows] == ["fc.0", "fc.1", "fc.2"]
    direct = lmc.layer_barriers(a, b, test, alphas=5)
    assert [r["barrier"] for r in rows] == pytest.approx(direct.barriers, abs=1e-9)
    assert rows[-1]["cumulative_barrier"] == pytest.approx(result.barriers["test"], abs=1e-9)


@pytest.mark.parametrize("flags, match", [
    (["--layers", "--repair"], "connect.layers"),
    (["--layers", "--layer-groups", "rows"], "connect.layer_groups"),
])
def test_connect_layers_bad_input_exits_2_and_writes_nothing(trunks, tmp_path, capsys, flags, match):
    _, _, run_a, run_b, _, _, _ = trunks
    out = tmp_path / "out"
    code = main(["connect", str(run_a), str(run_b), "--alphas", "3", "--out", str(out), *flags])
    assert code == 2 and match in capsys.readouterr().err
    assert not out.exists() or list(out.iterdir()) == []


def test_layer_sweep_per_rewind_point_resumes_and_draws(tmp_path, one_torch_thread):
    from analysis.figures import plot_all
    from analysis.load.layers import layer_barriers
    from stability.stages.instability import instability_settings
    from stability.stages.layerwise import layer_sweep

    cfg = tiny_config(tmp_path)
    settings = instability_settings(rewind_points=["0it", "10it"], siblings=2, alphas=5)
    result = layer_sweep(cfg, settings)
    frame = result.dataframe()
    assert sorted(set(frame["rewind_step"])) == [0, 10]
    assert list(frame[frame["rewind_step"] == 0]["group"]) == ["fc.0", "fc.1", "fc.2"]
    table = read_csv(result.run_dir / LAYERS_TABLE)
    # a killed run: one rewind point's rows lost, the summary gone -> the point is measured again, identical
    from stability.store.files import write_csv

    write_csv(result.run_dir / LAYERS_TABLE, [r for r in table if r["rewind_step"] == 0], LAYER_COLUMNS)
    (result.run_dir / "layers.json").unlink()
    again = layer_sweep(cfg, settings)
    assert again.run_dir == result.run_dir and again.rows == table
    loaded = layer_barriers(tmp_path)
    assert set(loaded["run_kind"]) == {"layers"} and len(loaded) == 6
    written = plot_all(tmp_path, tmp_path / "figs", formats="png", kinds="layers")
    assert [p.name for p in written] == [f"layers_{result.run_dir.name.split('_')[1]}.png"]
