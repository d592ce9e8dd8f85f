"""Worst-case sharpness (hessian.sharpness, lmc.sharpness) and its place in the Hessian track and CLI."""
from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_ARGS, tiny_config
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from stability import lmc
from stability.apps.cli import main
from stability.errors import ConfigError
from stability.hessian import select_subset
from stability.hessian.settings import HessianSettings
from stability.hessian.sharpness import worst_case_sharpness
from stability.stages.landscape import hessian_settings, hessian_track


@pytest.fixture(scope="module")
def trained():
    """A 20-64-3 ReLU MLP trained 300 Adam steps on a seeded synthetic task, and its data."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 20, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 3))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(200):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return net.eval(), (x, y)


def test_zero_radius_gives_zero(trained, one_torch_thread):
    net, data = trained
    with torch.no_grad():
        loss = float(F.cross_entropy(net(data[0]), data[1]))
    for adaptive in (True, False):
        s = lmc.sharpness(net, data, rho=0.0, adaptive=adaptive)
        assert s.value == 0.0 and s.delta_norm == 0.0
        assert s.loss == pytest.approx(loss, rel=1e-5)


def test_sharpness_grows_with_the_radius_and_stays_in_the_ball(trained, one_torch_thread):
    net, data = trained
    for adaptive in (True, False):
        found = [lmc.sharpness(net, data, rho=rho, adaptive=adaptive, steps=8) for rho in (0.02, 0.05, 0.1, 0.2)]
        values = [s.value for s in found]
        assert all(v > 0 for v in values)
        assert all(later > earlier for earlier, later in itertools.pairwise(values)), values
        for s in found:
            assert s.scaled_norm <= s.rho * (1 + 1e-5)
            if not adaptive:
                assert s.delta_norm == pytest.approx(s.scaled_norm)


def test_ascent_finds_the_first_order_maximum_at_a_small_radius(one_torch_thread):
    """For small ρ, max over the plain ball ≈ ρ·‖∇L‖: the ascent must get most of it (a random δ gets ~0)."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(200, 20, generator=g), torch.randint(0, 3, (200,), generator=g)
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3))
    loss = F.cross_entropy(net(x), y)
    grads = torch.autograd.grad(loss, list(net.parameters()))
    grad_norm = float(torch.sqrt(sum((gr.double() ** 2).sum() for gr in grads)))
    rho = 1e-3
    s = lmc.sharpness(net, (x, y), rho=rho, adaptive=False, steps=10, dtype="float64")
    assert 0.8 * rho * grad_norm < s.value < 1.05 * rho * grad_norm


def _rescaled(net: nn.Sequential, c: float) -> nn.Sequential:
    """The same function: the hidden layer's weights and bias times c, the next layer's weights times 1/c."""
    out = copy.deepcopy(net)
    with torch.no_grad():
        out[0].weight.mul_(c)
        out[0].bias.mul_(c)
        out[2].weight.div_(c)
    return out


def test_adaptive_sharpness_is_invariant_to_relu_rescaling_and_plain_is_not(trained, one_torch_thread):
    net, data = trained
    other = _rescaled(net, 4.0)
    with torch.no_grad():
        assert torch.allclose(net(data[0]), other(data[0]), atol=1e-4)
    adaptive = [lmc.sharpness(m, data, rho=0.1, adaptive=True, seed=3).value for m in (net, other)]
    plain = [lmc.sharpness(m, data, rho=0.1, adaptive=False, seed=3).value for m in (net, other)]
    assert adaptive[1] == pytest.approx(adaptive[0], rel=1e-2)
    assert max(plain) / min(plain) > 3.0


def test_same_seed_same_value_and_any_data_form(trained, one_torch_thread):
    net, (x, y) = trained
    pair = lmc.sharpness(net, (x, y), rho=0.05, batch_size=400)
    loader = lmc.sharpness(net.state_dict(), DataLoader(TensorDataset(x, y), batch_size=400), rho=0.05,
                           template=copy.deepcopy(net))
    assert loader.value == pytest.approx(pair.value, rel=1e-6)
    chunked = lmc.sharpness(net, (x, y), rho=0.05, batch_size=100)  # the mean loss does not depend on the chunks
    assert chunked.value == pytest.approx(pair.value, rel=1e-3)
    assert lmc.sharpness(net, (x, y), rho=0.05, seed=1).value != pair.value


@pytest.mark.parametrize("kwargs, match", [
    ({"rho": -0.1}, "rho: the radius must be a finite number >= 0"),
    ({"rho": float("nan")}, "rho"),
    ({"rho": 0.1, "steps": 0}, "steps: gradient ascent steps must be an integer >= 1"),
])
def test_bad_radius_or_steps_is_refused(trained, kwargs, match):
    net, data = trained
    with pytest.raises(ConfigError, match=match):
        lmc.sharpness(net, data, **kwargs)
    with pytest.raises(ConfigError, match=match):
        worst_case_sharpness(net, [data], **{"rho": 0.1, **kwargs})


def test_settings_name_the_sharpness_fields_and_refuse_a_negative_radius():
    with pytest.raises(ConfigError, match="hessian.sharpness_rho"):
        HessianSettings(sharpness_rho=-1.0)
    with pytest.raises(ConfigError, match="hessian.sharpness_steps"):
        HessianSettings(sharpness_rho=0.1, sharpness_steps=0)
    HessianSettings(top_k=0, sharpness_rho=0.1)  # sharpness alone is something to compute


def test_track_reports_sharpness_beside_lambda_max_and_analysis_reads_it(results_root, one_torch_thread):
    from analysis.load import hessian_tracks

    cfg = tiny_config(results_root)
    settings = hessian_settings(samples=200, sharpness_rho=0.05)
    plain = hessian_track(cfg, hessian_settings(samples=200), at=["0it", "30it"])
    track = hessian_track(cfg, settings, at=["0it", "30it"])
    assert track.run_dir != plain.run_dir and "sharpness" not in plain.rows[0]
    for row, base in zip(track.rows, plain.rows):
        assert row["lambda_1"] == pytest.approx(base["lambda_1"], rel=1e-4)
        assert row["sharpness"] > 0 and row["sharpness_delta"] > 0
    # the same subset, seed and steps through lmc.sharpness give the same number
    from stability.stages.checkpoints import load_weights
    from stability.stages.context import prepare

    ctx = prepare(cfg)
    net = ctx.new_model()
    net.load_state_dict(load_weights(track.run_dir.parent / f"train_{cfg.run_hash()}", 30))
    xs, ys = select_subset(ctx.data.x_train, ctx.data.y_train, 200, 0)
    direct = lmc.sharpness(net, (xs, ys), rho=0.05, batch_size=200)
    assert track.rows[1]["sharpness"] == pytest.approx(direct.value, rel=1e-5)
    frame = hessian_tracks(results_root)
    with_sharpness = frame[frame["run_hash"] == track.run_dir.name.split("_")[1]]
    assert list(with_sharpness["sharpness"]) == pytest.approx([r["sharpness"] for r in track.rows])
    assert frame[frame["run_hash"] == plain.run_dir.name.split("_")[1]]["sharpness"].isna().all()


def test_cli_hessian_sharpness_flags(results_root, capsys, one_torch_thread):
    args = ["hessian", "--preset", "lenet300_mnist5k", *TINY_ARGS, "--out", str(results_root), "--at", "30it",
            "--samples", "100", "--quiet", "--sharpness", "0.05"]
    assert main(args) == 0
    assert "worst-case sharpness: 30: " in capsys.readouterr().out
    assert main([*args, "--json"]) == 0
    adaptive = json.loads(capsys.readouterr().out)["rows"][0]["sharpness"]
    assert main([*args, "--json", "--sharpness-plain"]) == 0
    plain = json.loads(capsys.readouterr().out)["rows"][0]["sharpness"]
    assert adaptive > 0 and plain > 0 and plain != adaptive


@pytest.mark.parametrize("flags, match", [
    (["--sharpness", "-0.1"], "hessian.sharpness_rho"),
    (["--sharpness", "0.1", "--sharpness-steps", "0"], "hessian.sharpness_steps"),
    (["--sharpness-plain"], "hessian.sharpness_adaptive applies only with hessian.sharpness_rho > 0"),
])
def test_cli_bad_sharpness_exits_2_and_writes_nothing(results_root, capsys, flags, match):
    code = main(["hessian", "--preset", "lenet300_mnist5k", *TINY_ARGS, "--out", str(results_root), *flags])
    assert code == 2
    assert match in capsys.readouterr().err
    assert list(results_root.iterdir()) == []
