"""stability.lmc: curves, Hessians and instability of networks the suite did not train, over any data."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import fresh_model, tiny_config, train_plain
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import stability
from stability import lmc
from stability.errors import ConfigError
from stability.stages.checkpoints import load_weights
from stability.stages.context import prepare
from stability.stages.instability import InstabilitySettings, instability_sweep
from stability.stages.siblings import train_siblings
from stability.stages.trunk import trunk_dir
from stability.store.files import read_csv


def _train(net: nn.Module, x, y, seed: int, steps: int = 150, lr: float = 0.05) -> nn.Module:
    return train_plain(net, x, y, seed, steps, lr)


_fresh = fresh_model


def _hand_curve(a: nn.Module, b: nn.Module, alphas, x, y):
    """load_state_dict at every α, evaluate: the loop lmc.interpolate must equal."""
    m = copy.deepcopy(a).eval()
    sa, sb = a.state_dict(), b.state_dict()
    errs, losses = [], []
    for alpha in alphas:
        m.load_state_dict({k: (1 - alpha) * sa[k] + alpha * sb[k] if sa[k].is_floating_point() else sa[k]
                           for k in sa})
        with torch.no_grad():
            out = m(x)
        errs.append(float((out.argmax(1) != y).double().mean()))
        losses.append(float(F.cross_entropy(out.double(), y)))
    return errs, losses


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two LeNet-300-100s (width 0.3) trained on mnist5k by a plain loop from different seeds."""
    ctx = prepare(tiny_config(tmp_path_factory.mktemp("lmc"), model__width="0.3"))
    x, y = ctx.data.x_train, ctx.data.y_train
    xt, yt = ctx.data.split("test")
    a = _train(_fresh(ctx, 1), x, y, 1)
    b = _train(_fresh(ctx, 2), x, y, 2)
    return ctx, a, b, (x, y), (xt, yt)


def test_interpolate_equals_a_hand_loop_and_loss_landscapes(pair, one_torch_thread):
    import loss_landscapes
    import loss_landscapes.metrics

    _ctx, a, b, _, (xt, yt) = pair
    curve = lmc.interpolate(a, b, (xt, yt), alphas=11)
    errs, losses = _hand_curve(a, b, curve.alphas, xt, yt)
    assert curve.alphas == pytest.approx(np.linspace(0, 1, 11).tolist(), abs=1e-12)
    assert curve.error == pytest.approx(errs, abs=1e-6)
    assert curve.loss == pytest.approx(losses, abs=1e-6)
    assert min(curve.error[0], curve.error[-1]) < 0.2 and not curve.untrained  # really trained
    assert curve.barrier == pytest.approx(max(errs) - (errs[0] + errs[-1]) / 2, abs=1e-6)
    assert curve.barrier > 0.01  # two independently trained networks: a barrier to measure
    # the PyPI package loss-landscapes walks α = 1/10 .. 1 (it moves a copy of A in place)
    theirs = loss_landscapes.linear_interpolation(copy.deepcopy(a), copy.deepcopy(b),
                                                  loss_landscapes.metrics.Loss(F.cross_entropy, xt, yt), steps=10)
    assert curve.loss[1:] == pytest.approx(theirs.tolist(), rel=2e-5)
    frame = curve.dataframe()
    assert list(frame.columns) == ["alpha", "error", "loss"] and len(frame) == 11
    assert stability.lmc.barrier(a, b, (xt, yt), alphas=11) == curve.barrier
    # without forming the input layer's output from the ends' the numbers are the same
    from stability.engine import StackedModel
    from stability.maths.paths import Batches, evaluate_pairs

    members = [(0, 1, al) for al in curve.alphas]
    direct = evaluate_pairs(StackedModel(copy.deepcopy(a)), [a.state_dict(), b.state_dict()], members,
                            Batches((xt, yt)), input_layer_outputs=False)
    assert direct[0] == pytest.approx(curve.loss, abs=1e-6)


def test_tensors_loader_and_generator_give_one_curve_and_one_hessian(pair, one_torch_thread):
    from stability.hessian.pyhessian_adapter import pyhessian_top_eigenvalues

    _ctx, a, b, (x, y), (xt, yt) = pair
    loader = DataLoader(TensorDataset(xt, yt), batch_size=37)
    ref = lmc.interpolate(a, b, (xt, yt), alphas=7)
    for data in (loader, ((xb, yb) for xb, yb in loader), list(loader), lambda: iter(loader)):
        curve = lmc.interpolate(a, b, data, alphas=7)
        assert curve.loss == pytest.approx(ref.loss, abs=1e-6)
        assert curve.error == pytest.approx(ref.error, abs=1e-9)
    xs, ys = x[:400], y[:400]
    h_tensors = lmc.hessian(a, (xs, ys), top_k=2, trace=3)
    h_loader = lmc.hessian(a, DataLoader(TensorDataset(xs, ys), batch_size=37), top_k=2, trace=3)
    h_gen = lmc.hessian(a, ((xs[i:i + 50], ys[i:i + 50]) for i in range(0, 400, 50)), top_k=2)
    assert h_loader.samples == h_tensors.samples == 400
    assert h_loader.eigenvalues == pytest.approx(h_tensors.eigenvalues, rel=1e-4)
    assert h_gen.eigenvalues == pytest.approx(h_tensors.eigenvalues, rel=1e-4)
    assert h_loader.trace == pytest.approx(h_tensors.trace, rel=1e-4)
    theirs, _ = pyhessian_top_eigenvalues(a, xs, ys, 2, tol=1e-7, max_iter=500, seed=0)
    assert h_loader.eigenvalues == pytest.approx(theirs, rel=2e-3)
    assert h_loader.eigenvalues[0] > 0.1  # a trained network's loss is curved


def test_batchnorm_modes_and_a_convolutional_input_layer_equal_hand_loops(tmp_path, one_torch_thread):
    ctx = prepare(tiny_config(tmp_path, preset="resnet8_mnist5k", model__width="0.25"))
    x, y = ctx.data.x_train[:600], ctx.data.y_train[:600]
    xt, yt = ctx.data.split("test")
    xt, yt = xt[:300], yt[:300]
    a = _train(_fresh(ctx, 1), x, y, 1, steps=40)
    b = _train(_fresh(ctx, 2), x, y, 2, steps=40)
    curve = lmc.interpolate(a, b, DataLoader(TensorDataset(xt, yt), batch_size=100), alphas=5)
    errs, losses = _hand_curve(a, b, curve.alphas, xt, yt)  # buffers interpolated like the parameters
    assert curve.loss == pytest.approx(losses, rel=1e-5)
    assert curve.error == pytest.approx(errs, abs=1 / 300 + 1e-9)  # at most one borderline example may flip
    # reset: every θ(α)'s BatchNorm statistics recomputed by a cumulative average over bn_data's batches
    bn_loader = DataLoader(TensorDataset(x[:256], y[:256]), batch_size=64)
    reset = lmc.interpolate(a, b, (xt, yt), alphas=3, bn="reset", bn_data=bn_loader)
    sa, sb = a.state_dict(), b.state_dict()
    for alpha, loss in zip(reset.alphas, reset.loss):
        m = copy.deepcopy(a)
        m.load_state_dict({k: (1 - alpha) * sa[k] + alpha * sb[k] if sa[k].is_floating_point() else sa[k] for k in sa})
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.reset_running_stats()
                mod.momentum = None  # PyTorch's cumulative moving average
        m.train()
        with torch.no_grad():
            for xb, _ in bn_loader:
                m(xb)
            m.eval()
            assert loss == pytest.approx(float(F.cross_entropy(m(xt).double(), yt)), rel=1e-4)
    assert reset.loss != pytest.approx(lmc.interpolate(a, b, (xt, yt), alphas=3).loss, rel=1e-3)


def test_lmc_reproduces_a_sweeps_curves_and_first_stable_step(tmp_path, one_torch_thread):
    cfg = tiny_config(tmp_path, training__steps="60it", training__rewind_points="0it,10it,30it")
    settings = InstabilitySettings(threshold=0.05)
    result = instability_sweep(cfg, settings)
    ctx = prepare(cfg)
    xt, yt = ctx.data.split("test")
    stored = read_csv(result.run_dir / "curves.csv")
    for k in result.rewind_steps:
        members = train_siblings(ctx, k, settings.siblings).members  # reused: the sweep's own siblings
        nets = [copy.deepcopy(ctx.model) for _ in range(2)]
        for i, net in enumerate(nets):
            net.load_state_dict(members.member_state_dict(i))
        curve = lmc.interpolate(nets[0], nets[1], (xt, yt))
        rows = sorted((r for r in stored if r["rewind_step"] == k), key=lambda r: r["alpha"])
        assert curve.error == pytest.approx([r["error"] for r in rows], abs=1e-9)
        assert curve.loss == pytest.approx([r["loss"] for r in rows], rel=1e-6)

    trunk = trunk_dir(cfg)

    def train_fn(model: nn.Module, noise_seed: int, step: int) -> nn.Module:
        # the suite's engine trains the siblings (reused here); the copy lmc hands over is the trunk at `step`
        start = load_weights(trunk, step)
        assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
        model.load_state_dict(train_siblings(ctx, step, settings.siblings).members.member_state_dict(noise_seed))
        return model

    points = {k: load_weights(trunk, k) for k in result.rewind_steps}
    swept = lmc.sweep(points, train_fn, noise_seeds=[0, 1], data=(xt, yt), template=ctx.new_model(),
                      threshold=settings.threshold)
    assert swept.first_stable_step == result.first_stable_step
    assert [r["instability_mean"] for r in swept.table] == pytest.approx(
        [r["instability_mean"] for r in result.table], abs=1e-9)
    assert [r["status"] for r in swept.table] == [r["status"] for r in result.table]
    assert [r["stable"] for r in swept.table] == [r["stable"] for r in result.table]


def test_instability_with_your_own_loop_and_what_is_refused(pair, one_torch_thread):
    ctx, _a, _, (x, y), (xt, yt) = pair
    start = _train(ctx.new_model(), x, y, 7, steps=30)
    calls = []

    def train_fn(model, noise_seed):
        calls.append(noise_seed)
        assert model is not start
        return _train(model, x, y, 100 + noise_seed, steps=60)

    result = lmc.instability(start, train_fn, noise_seeds=[3, 4, 5], data=(xt, yt), alphas=5)
    assert calls == [3, 4, 5] and set(result.curves) == {(0, 1), (0, 2), (1, 2)}
    assert not result.untrained and result.barrier == pytest.approx(np.mean(result.barriers))
    for (i, j), curve in result.curves.items():  # every pair as lmc.interpolate measures it alone
        alone = lmc.interpolate(result.networks[i], result.networks[j], (xt, yt), alphas=5)
        assert curve.loss == pytest.approx(alone.loss, abs=1e-6)
    assert len(result.dataframe()) == 3 * 5
    # a train_fn that does not train: the siblings sit at the (untrained) start, flagged, never stable
    untrained = lmc.instability(ctx.new_model(), lambda m, s: m, data=(xt, yt), alphas=3)
    assert untrained.untrained
    swept = lmc.sweep({0: ctx.new_model().state_dict()}, lambda m, s: m, data=(xt, yt), template=ctx.new_model())
    assert swept.table[0]["status"] == "untrained" and swept.first_stable_step is None
    with pytest.raises(ConfigError, match="train_fn: must return the trained nn.Module"):
        lmc.instability(start, lambda m, s: m.state_dict(), data=(xt, yt))
    with pytest.raises(ConfigError, match=r"train_fn \(noise seed 0\): tensor 'fc.0.weight' is missing"):
        lmc.instability(start, lambda m, s: nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), data=(xt, yt))


def test_bad_input_is_refused_with_the_setting_named(pair):
    _ctx, a, b, _, (xt, yt) = pair
    with pytest.raises(ConfigError, match="bn: unknown option 'bogus'; choose one of interpolate, reset, repair"):
        lmc.interpolate(a, b, (xt, yt), bn="bogus")
    with pytest.raises(ConfigError, match="alphas: need at least 2"):
        lmc.interpolate(a, b, (xt, yt), alphas=1)
    with pytest.raises(ConfigError, match="data: expected a DataLoader"):
        lmc.interpolate(a, b, 42)
    with pytest.raises(ConfigError, match="each batch must be a tuple"):
        lmc.interpolate(a, b, [xt])
    with pytest.raises(ConfigError, match="needs the architecture: pass model="):
        lmc.interpolate(a.state_dict(), b, (xt, yt))
    with pytest.raises(ConfigError, match="noise_seeds: need at least 2 distinct"):
        lmc.instability(a, lambda m, s: m, noise_seeds=[1, 1], data=(xt, yt))
    with pytest.raises(ConfigError, match="method: unknown alignment"):
        lmc.align(a, b, method="bogus")


def test_weight_matching_through_lmc_undoes_a_permutation(pair):
    from stability.align import apply_permutation, permutation_spec, random_permutation

    ctx, a, _, _, (xt, yt) = pair
    spec = permutation_spec(ctx.model)
    perms = random_permutation(spec, torch.Generator().manual_seed(3))
    shuffled = copy.deepcopy(a)
    shuffled.load_state_dict(apply_permutation(spec, perms, a.state_dict()))
    aligned, _found = lmc.align(a, shuffled)
    assert all(torch.equal(aligned.state_dict()[k], v) for k, v in a.state_dict().items())
    assert lmc.barrier(a, aligned, (xt, yt), alphas=5) == pytest.approx(0.0, abs=1e-9)
    # the same function: both ends of the naive curve have the same error
    naive = lmc.interpolate(a, shuffled, (xt, yt), alphas=5)
    assert naive.error[0] == pytest.approx(naive.error[-1], abs=1e-9) and naive.barrier > 0.05
