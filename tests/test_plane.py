"""Loss-landscape planes: the maths (``maths.directions``), ``lmc.plane`` against a per-point loop and against the
PyPI package loss-landscapes, the ``plane_<hash>`` records (resume after a kill) and ``stability landscape``."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_ARGS, train_plain
from torch import nn

from stability import lmc
from stability.apps.cli import main
from stability.engine import StackedModel
from stability.errors import ConfigError
from stability.lmc.plane import forms_input_layer
from stability.maths.directions import filter_normalized_direction, pca_directions, plane_basis
from stability.stages.context import prepare
from stability.stages.external import file_config
from stability.stages.plane import plane_files, plane_settings
from stability.store.files import save_tensors

MODEL = {"model.name": "lenet_300_100", "model.width": "0.1", "dataset.name": "mnist5k", "runtime.threads": "1",
         "runtime.quiet": "true"}
FILE_FLAGS = ["--model", "lenet_300_100", "--set", "model.width=0.1", "--dataset", "mnist5k", "--threads", "1"]


def _train(net, x, y, seed: int, steps: int = 40):
    return train_plain(net, x, y, seed, steps, lr=0.1)


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """Three narrow LeNet-300-100s trained by a plain loop, the test split, and the three saved as files."""
    torch.set_num_threads(1)
    ctx = prepare(file_config(MODEL))
    x, y = ctx.data.x_train, ctx.data.y_train
    trained = [_train(ctx.new_model(s), x, y, s) for s in (1, 2, 3)]
    folder = tmp_path_factory.mktemp("planes")
    paths = []
    for i, net in enumerate(trained):
        paths.append(folder / f"net{i}.safetensors")
        save_tensors(paths[-1], net.state_dict())
    return trained, ctx.data.split("test"), paths


def _bn_net(seed: int) -> nn.Module:
    """A tiny convolution + BatchNorm network with random running statistics (so combining buffers matters)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    net[1].running_mean.normal_(0, 0.3)
    net[1].running_var.uniform_(0.5, 2.0)
    net[1].weight.data.uniform_(0.5, 1.5)
    return net.eval()


def _own(net: nn.Module, x, y) -> tuple[float, float]:
    with torch.no_grad():
        out = net(x)
    return float((out.argmax(1) != y).double().mean()), float(F.cross_entropy(out, y))


def _combined(template: nn.Module, states, coeffs) -> nn.Module:
    net = copy.deepcopy(template)
    net.load_state_dict({k: sum(float(c) * s[k] for c, s in zip(coeffs, states)) if v.is_floating_point() else v
                         for k, v in states[0].items()})
    return net.eval()


# ---------------------------------------------------------------- the maths
def test_basis_is_orthonormal_and_reproduces_the_three_networks(nets):
    trained, _, _ = nets
    states = [n.state_dict() for n in trained]
    names = StackedModel(trained[0]).param_names
    basis = plane_basis(*states, names)
    e1, e2 = basis.vector(states, 1, names), basis.vector(states, 2, names)

    def dot(p, q):
        return float(sum((p[k] * q[k]).sum() for k in names))

    assert dot(e1, e1) == pytest.approx(1, abs=1e-9) and dot(e2, e2) == pytest.approx(1, abs=1e-9)
    assert abs(dot(e1, e2)) < 1e-9
    (ua, va), (ub, vb), (_, vc) = basis.points
    assert (ua, va, vb) == (0.0, 0.0, 0.0) and ub > 0 and vc > 0
    coeffs = basis.coefficients([p[0] for p in basis.points], [p[1] for p in basis.points])
    assert torch.allclose(coeffs, torch.eye(3, dtype=torch.float64), atol=1e-12)
    with pytest.raises(ConfigError, match="one line"):
        mid = {k: 0.5 * (states[0][k] + states[1][k]) for k in states[0]}
        plane_basis(states[0], states[1], mid, names)


def test_filter_normalized_directions_have_the_networks_filter_norms():
    net = _bn_net(0)
    state = net.state_dict()
    names = StackedModel(net).param_names
    d = filter_normalized_direction(state, torch.Generator().manual_seed(3), names)
    for k in ("0.weight", "4.weight"):  # conv filters (output channels) and Linear rows
        want = state[k].reshape(len(state[k]), -1).norm(dim=1)
        got = d[k].reshape(len(d[k]), -1).norm(dim=1)
        assert torch.allclose(got, want, rtol=1e-5)
        assert not torch.allclose(d[k], state[k])
    assert all(float(d[k].abs().sum()) == 0 for k in ("0.bias", "1.weight", "1.bias", "4.bias"))  # biasbn zeroed
    assert all(float(d[k].abs().sum()) == 0 for k in ("1.running_mean", "1.running_var"))  # buffers zero
    kept = filter_normalized_direction(state, torch.Generator().manual_seed(3), names, ignore=None)
    assert torch.equal(kept["1.weight"], state["1.weight"]) and torch.equal(kept["4.weight"], d["4.weight"])
    again = filter_normalized_direction(state, torch.Generator().manual_seed(3), names)
    other = filter_normalized_direction(state, torch.Generator().manual_seed(4), names)
    assert all(torch.equal(d[k], again[k]) for k in d)
    assert not torch.equal(d["4.weight"], other["4.weight"])


def test_pca_directions_match_scikit_learn_and_project_the_trajectory(nets):
    from sklearn.decomposition import PCA

    trained, _, _ = nets
    names = StackedModel(trained[0]).param_names
    a, b, c = (n.state_dict() for n in trained)
    trajectory = [{k: (1 - t) * a[k] + t * (b[k] if t < 0.6 else c[k]) for k in a} for t in (0.0, 0.3, 0.7, 1.0)]
    pca = pca_directions(trajectory, names=names)
    flat = [torch.cat([p[k].double().reshape(-1) - trajectory[-1][k].double().reshape(-1) for k in names])
            for p in trajectory]
    theirs = PCA(n_components=2).fit(torch.stack(flat).numpy())
    for d, comp in zip(pca.directions, theirs.components_):
        ours = torch.cat([d[k].double().reshape(-1) for k in names])
        assert abs(float(ours @ torch.from_numpy(comp))) == pytest.approx(1, abs=1e-5)
    assert pca.explained == pytest.approx(tuple(theirs.explained_variance_ratio_), abs=1e-6)
    d1 = torch.cat([pca.directions[0][k].double().reshape(-1) for k in names])
    assert [p[0] for p in pca.points] == pytest.approx([float(f @ d1) for f in flat], abs=1e-4)
    assert pca.points[-1] == (0.0, 0.0)


# ---------------------------------------------------------------- lmc.plane
def test_networks_have_their_own_error_and_loss_on_the_plane(nets):
    trained, (x, y), _ = nets
    p = lmc.plane(*trained, (x, y), grid=5)
    for name, net in zip("abc", trained):
        error, loss = _own(net, x, y)
        assert p.at_networks[name][0] == pytest.approx(error, abs=1e-9)
        assert p.at_networks[name][1] == pytest.approx(loss, rel=1e-5)
    # a grid whose corners are networks a and b: its values there are theirs
    (_, _), (ub, _), (_, vc) = p.networks.values()
    corners = lmc.plane(*trained, (x, y), grid=2, ranges=((0.0, ub), (0.0, vc)))
    assert corners.error[0][0] == pytest.approx(_own(trained[0], x, y)[0], abs=1e-9)
    assert corners.loss[0][1] == pytest.approx(_own(trained[1], x, y)[1], rel=1e-5)
    assert not p.untrained and p.chance == pytest.approx(0.9) and p.kind == "networks"
    assert list(p.dataframe().columns) == ["u", "v", "error", "loss"] and len(p.dataframe()) == 25


@pytest.mark.parametrize("which", ["mlp", "batchnorm"])
def test_batched_grid_equals_a_per_point_loop(nets, which):
    trained, (x, y), _ = nets
    if which == "batchnorm":
        trained = [_bn_net(s) for s in (1, 2, 3)]
        x = x[:300].reshape(-1, 1, 28, 28) if x.dim() == 2 else x[:300]
        y = y[:300]
    # the input layer's output formed from the three networks' (the default for the MLP; forced for the convolution)
    p = lmc.plane(*trained, (x, y), grid=(4, 3), max_members=5, batch_size=128, input_layer_outputs=True)
    states = [n.state_dict() for n in trained]
    basis = plane_basis(*states, StackedModel(trained[0]).param_names)
    for j, v in enumerate(p.v):
        for i, u in enumerate(p.u):
            coeffs = basis.coefficients([u], [v])[0]
            error, loss = _own(_combined(trained[0], states, coeffs), x, y)
            assert p.error[j][i] == pytest.approx(error, abs=1e-9)
            assert p.loss[j][i] == pytest.approx(loss, rel=2e-5, abs=1e-6)


def test_plane_loss_equals_loss_landscapes_planar_interpolation(nets):
    """loss-landscapes 3.0.6 walks its grid as a snake, adding a step before each evaluation: column i (u = i/S)
    holds v = (j + 1)/S for even i and v = j/S for odd i, in units of the two directions (end − start)."""
    import loss_landscapes
    import loss_landscapes.metrics

    trained, (x, y), _ = nets
    start, one, two = (n.state_dict() for n in trained)
    steps = 4
    d1 = {k: one[k] - start[k] for k in start}
    d2 = {k: two[k] - start[k] for k in start}
    ours = lmc.plane(trained[0], data=(x, y), directions=(d1, d2), grid=(steps, steps + 1),
                     ranges=((0.0, (steps - 1) / steps), (0.0, 1.0)))
    metric = loss_landscapes.metrics.Loss(F.cross_entropy, x, y)
    theirs = loss_landscapes.planar_interpolation(copy.deepcopy(trained[0]), trained[1], trained[2], metric,
                                                  steps=steps)
    for i in range(steps):
        for j in range(steps):
            assert ours.loss[j + 1 if i % 2 == 0 else j][i] == pytest.approx(float(theirs[i][j]), rel=1e-5)


def test_random_and_pca_planes_around_one_network(nets):
    trained, (x, y), _ = nets
    r = lmc.plane(trained[0], data=(x, y), directions="random", grid=3, seed=0)
    assert r.u == [-1.0, 0.0, 1.0] and r.networks == {"a": (0.0, 0.0)}
    assert r.loss[1][1] == pytest.approx(_own(trained[0], x, y)[1], rel=1e-5)
    assert lmc.plane(trained[0], data=(x, y), directions="random", grid=3, seed=0).loss == r.loss
    assert forms_input_layer(StackedModel(trained[0]), [(x[:2], y[:2])], 3)  # a Linear over 784 inputs
    assert not forms_input_layer(StackedModel(_bn_net(0)), [(x[:2].reshape(-1, 1, 28, 28), y[:2])], 3)  # fan-in 9
    pca = lmc.plane(trained[2], data=(x, y), directions="pca", trajectory=trained, grid=3)
    assert len(pca.trajectory) == 3 and pca.trajectory[-1] == (0.0, 0.0) and pca.kind == "pca"


def test_bad_input_is_refused(nets):
    trained, data, _ = nets
    with pytest.raises(ConfigError, match="at least 2"):
        lmc.plane(*trained, data, grid=1)
    with pytest.raises(ConfigError, match="at least 2"):
        lmc.plane(*trained, data, grid=(5, 1))
    with pytest.raises(ConfigError, match="bn"):
        lmc.plane(*trained, data, bn="repair")
    with pytest.raises(ConfigError, match="same architecture"):
        lmc.plane(trained[0], trained[1], _bn_net(0), data)
    with pytest.raises(ConfigError, match="three"):
        lmc.plane(trained[0], trained[1], data=data)


# ---------------------------------------------------------------- records and the command line
def _files_settings(**kw):
    return plane_settings(kind="networks", grid=9, splits=("test", "val"), **kw)


def test_a_killed_plane_resumes_and_ends_identical(nets, tmp_path, monkeypatch):
    _, _, paths = nets
    whole = plane_files(paths, file_config({**MODEL, "runtime.results_root": str(tmp_path / "whole")}),
                        _files_settings())
    import stability.stages.plane as stage

    real, calls = stage.evaluate_points, []

    def dies_after_one_chunk(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return real(*args, **kwargs)

    cfg = file_config({**MODEL, "runtime.results_root": str(tmp_path / "killed")})
    monkeypatch.setattr(stage, "evaluate_points", dies_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        plane_files(paths, cfg, _files_settings())
    run = next((tmp_path / "killed").iterdir())
    assert json.loads((run / "manifest.json").read_text())["status"] == "running"
    assert len((run / "plane.csv").read_text().splitlines()) == 1 + 9 * 7  # the first chunk of 7 rows
    monkeypatch.setattr(stage, "evaluate_points", real)
    resumed = plane_files(paths, cfg, _files_settings())
    assert run.name == whole.run_dir.name and resumed.rows == whole.rows
    assert (run / "plane.csv").read_bytes() == (whole.run_dir / "plane.csv").read_bytes()
    first, second = (json.loads((r / "plane.json").read_text()) for r in (run, whole.run_dir))
    assert {k: v for k, v in first.items() if k != "seconds"} == {k: v for k, v in second.items() if k != "seconds"}


def test_landscape_command_on_files_and_bad_input(nets, tmp_path, capsys):
    _, _, paths = nets
    root = tmp_path / "out"
    args = ["landscape", *map(str, paths), *FILE_FLAGS, "--grid", "3", "--out", str(root)]
    assert main([*args, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == "networks" and list(summary["networks"]) == ["A", "B", "C"]
    assert main(args) == 0 and "results:" in capsys.readouterr().out  # reused
    assert len(list(root.iterdir())) == 1
    assert main(["landscape", *map(str, paths), str(paths[0]), *FILE_FLAGS, "--plane", "pca", "--grid", "3",
                 "--out", str(root), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["trajectory"]) == 4
    before = sorted(p.name for p in root.iterdir())
    wide = tmp_path / "wide.pt"
    torch.save(prepare(file_config({**MODEL, "model.width": "0.2"})).model.state_dict(), wide)
    bad = [
        [*map(str, paths), *FILE_FLAGS, "--grid", "1"],
        [*map(str, paths), *FILE_FLAGS, "--bn", "repair"],
        [str(paths[0]), str(paths[1]), str(wide), *FILE_FLAGS],  # another architecture
        [str(paths[0]), str(paths[0]), str(paths[1]), *FILE_FLAGS],  # no plane through them
        [str(paths[0]), str(paths[1]), *FILE_FLAGS],
        ["--preset", "lenet300_mnist5k", "--plane", "networks"],
    ]
    for extra in bad:
        assert main(["landscape", *extra, "--out", str(root)]) == 2, extra
        assert "error:" in capsys.readouterr().err
    assert sorted(p.name for p in root.iterdir()) == before


def test_landscape_command_siblings_plane_and_its_figure(tmp_path, capsys):
    root = tmp_path / "runs"
    base = ["landscape", "--preset", "lenet300_mnist5k", *TINY_ARGS, "--threads", "1", "--quiet", "--out", str(root)]
    assert main([*base, "--rewind", "5it", "--grid", "4", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert list(summary["networks"]) == ["sibling 0", "sibling 1", "trunk @5it"]
    assert summary["networks"]["sibling 1"][1] == 0.0 and summary["line"] == ["sibling 0", "sibling 1"]
    assert main([*base, "--plane", "pca", "--grid", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trajectory_steps"] == [0, 5, 10, 30]
    assert main(["landscape", *base[1:], "--grid", "1"]) == 2
    assert main(["plot", str(root), "--kind", "plane", "--out", str(tmp_path / "figs"), "--format", "png"]) == 0
    assert len(list((tmp_path / "figs").glob("plane_*.png"))) == 2
