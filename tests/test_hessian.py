"""Hessian probe: the operator against autograd's dense Hessian, Lanczos against eigvalsh,
Hutchinson against the exact trace, pyhessian against the native engine, SLQ, masks, bad input."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from stability.errors import ConfigError
from stability.hessian import (
    HessianOperator,
    HessianSettings,
    hutchinson_trace,
    lanczos_eigenpairs,
    probe,
    pyhessian_top_eigenvalues,
    pyhessian_trace,
    select_subset,
    smallest_eigenvalue,
    spectral_density,
    top_eigenvalues,
)

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are all per-op overhead; on shared cores a second thread only adds contention (10x slower)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_mlp(act: type[nn.Module] = nn.Tanh, seed: int = 0) -> nn.Module:
    """MLP 5 -> 4 -> 3: 39 parameters."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), act(), nn.Linear(4, 3))


def make_bn_cnn(seed: int = 0) -> nn.Module:
    """conv(1->2, 3x3) -> BatchNorm -> tanh -> avgpool -> linear(8 -> 3): 51 parameters, BN with non-trivial running stats."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 3)
    )
    bn = model[1]
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.3, 0.7]))
        bn.bias.copy_(torch.tensor([0.1, -0.2]))
        bn.running_mean.copy_(torch.tensor([0.2, -0.1]))
        bn.running_var.copy_(torch.tensor([0.5, 2.0]))
    return model


class ResBlockNet(nn.Module):
    """A custom forward: conv -> BN (foldable), a residual add followed by BN (not foldable), BN1d after a linear."""

    def __init__(self, branchy: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(2)
        self.bn2 = nn.BatchNorm2d(2, affine=False)
        self.fc = nn.Linear(8, 4)
        self.bn3 = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 3)
        self.branchy = branchy
        gen = torch.Generator().manual_seed(7)
        for bn in (self.bn1, self.bn2, self.bn3):
            bn.running_mean.copy_(0.3 * torch.randn(bn.num_features, generator=gen))
            bn.running_var.copy_(0.5 + torch.rand(bn.num_features, generator=gen))
            if bn.affine:
                with torch.no_grad():
                    bn.weight.copy_(1 + 0.3 * torch.randn(bn.num_features, generator=gen))
                    bn.bias.copy_(0.2 * torch.randn(bn.num_features, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.bn1(self.conv1(x)))
        if self.branchy and bool(x.sum() > 0):  # data-dependent: torch.fx cannot trace it
            h = h * 1.5
        h = self.bn2(h + x)
        h = F.avg_pool2d(h, 3).flatten(1)
        return self.out(torch.tanh(self.bn3(self.fc(h))))


@pytest.fixture
def mlp_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(24, 5, generator=gen), torch.randint(0, 3, (24,), generator=gen)


@pytest.fixture
def cnn_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return torch.randn(16, 1, 6, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)


def reference_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, masks=None) -> torch.Tensor:
    """torch.autograd.functional.hessian of the mean CE loss as a function of the flat params (float64, eval)."""
    import copy

    m = copy.deepcopy(model).double().eval()
    named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])
    if masks:
        flat = flat * torch.cat([masks[n].reshape(-1).double() if n in masks else torch.ones(p.numel(), dtype=torch.float64) for n, p in named])
    sizes = [p.numel() for _, p in named]

    def loss(t: torch.Tensor) -> torch.Tensor:
        params = {n: c.view(p.shape) for (n, p), c in zip(named, t.split(sizes))}
        return F.cross_entropy(functional_call(m, params, (x.double(),)), y)

    return torch.autograd.functional.hessian(loss, flat)


def random_masks(model: nn.Module, density: float = 0.5, seed: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        n: (torch.rand(p.shape, generator=gen) < density).float()
        for n, p in model.named_parameters()
        if n.endswith("weight") and p.dim() > 1
    }


# --------------------------------------------------------------------------- (1) operator


@pytest.mark.parametrize("kind", ["mlp", "bn_cnn"])
def test_dense_operator_equals_autograd_hessian(kind, mlp_data, cnn_data):
    model, (x, y) = (make_mlp(), mlp_data) if kind == "mlp" else (make_bn_cnn(), cnn_data)
    op = HessianOperator(model, x, y, dtype="float64")
    H = op.dense()
    ref = reference_hessian(model, x, y)
    assert op.dim == ref.shape[0] == sum(p.numel() for p in model.parameters())
    assert op.n_hvp == op.dim
    torch.testing.assert_close(H, ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("branchy", [False, True])
def test_batchnorm_folding_keeps_the_hessian_exact(branchy, cnn_data):
    x, y = cnn_data
    model = ResBlockNet(branchy)
    op = HessianOperator(model, x, y, dtype="float64")
    assert isinstance(op.model, torch.fx.GraphModule) != branchy, "traced and folded unless untraceable"
    assert op.names == [n for n, _ in model.named_parameters()]
    torch.testing.assert_close(op.dense(), reference_hessian(model, x, y), atol=1e-10, rtol=0)
    plain = HessianOperator(model, x, y, dtype="float64", fuse_bn=False)
    assert not isinstance(plain.model, torch.fx.GraphModule)
    torch.testing.assert_close(plain.dense(), reference_hessian(model, x, y), atol=1e-10, rtol=0)


def test_bn_model_passed_in_train_mode_is_probed_in_eval_mode_and_left_untouched(cnn_data):
    x, y = cnn_data
    model = make_bn_cnn().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    H = HessianOperator(model, x, y, dtype="float64").dense()
    torch.testing.assert_close(H, reference_hessian(model, x, y), atol=1e-10, rtol=0)
    assert model.training, "the caller's model keeps its mode"
    assert next(model.parameters()).dtype == torch.float32, "float64 works on a private copy"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed (running stats must not update)"


@pytest.mark.parametrize("hvp", ["graph", "jvp", "double_backward"])
def test_hvp_methods_and_chunking_agree(hvp, cnn_data):
    x, y = cnn_data
    model = make_bn_cnn()
    v = torch.randn(51, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    whole = HessianOperator(model, x, y, dtype="float64", hvp="graph").matvec(v)
    chunked = HessianOperator(model, x, y, dtype="float64", batch_size=5, hvp=hvp)
    assert len(chunked.chunks) == 4
    torch.testing.assert_close(chunked.matvec(v), whole, atol=1e-12, rtol=0)


def test_float32_operator_close_to_float64(mlp_data):
    x, y = mlp_data
    model = make_mlp()
    H32 = HessianOperator(model, x, y).dense()
    H64 = HessianOperator(model, x, y, dtype="float64").dense()
    assert H32.dtype == torch.float32
    torch.testing.assert_close(H32.double(), H64, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- (2) Lanczos


@pytest.mark.parametrize("kind", ["mlp", "bn_cnn"])
def test_lanczos_top3_and_smallest_match_eigvalsh(kind, mlp_data, cnn_data):
    model, (x, y) = (make_mlp(), mlp_data) if kind == "mlp" else (make_bn_cnn(), cnn_data)
    op = HessianOperator(model, x, y, dtype="float64")
    exact = torch.linalg.eigvalsh(reference_hessian(model, x, y))
    vals, vecs = top_eigenvalues(op, 3, tol=1e-10)
    torch.testing.assert_close(vals, exact.flip(0)[:3], rtol=1e-5, atol=0)
    assert vals.shape == (3,) and vecs.shape == (3, op.dim)
    scale = exact.abs().max()
    for lam, v in zip(vals, vecs):
        assert abs(float(v.norm()) - 1) < 1e-10
        assert float((op.matvec(v) - lam * v).norm()) < 1e-6 * scale
    lam_min = smallest_eigenvalue(op, tol=1e-10)
    assert abs(lam_min - float(exact[0])) <= 1e-5 * abs(float(exact[0]))


def test_lanczos_uses_fewer_steps_than_dim_and_is_seeded(mlp_data):
    x, y = mlp_data
    op = HessianOperator(make_mlp(), x, y, dtype="float64")
    a = lanczos_eigenpairs(op, 1, tol=1e-6, seed=5)
    b = lanczos_eigenpairs(op, 1, tol=1e-6, seed=5)
    assert a.converged and a.steps < op.dim
    assert torch.equal(a.eigenvalues, b.eigenvalues)
    both = lanczos_eigenpairs(op, 2, smallest=True, tol=1e-10)
    exact = torch.linalg.eigvalsh(op.dense())
    assert abs(both.smallest - float(exact[0])) <= 1e-5 * abs(float(exact[0]))
    torch.testing.assert_close(both.eigenvalues, exact.flip(0)[:2], rtol=1e-5, atol=0)


def test_lanczos_warns_when_step_limit_cuts_it_short(mlp_data):
    x, y = mlp_data
    op = HessianOperator(make_mlp(), x, y, dtype="float64")
    with pytest.warns(RuntimeWarning, match="hessian.lanczos_steps"):
        res = lanczos_eigenpairs(op, 3, max_steps=4, tol=1e-12)
    assert not res.converged and res.steps == 4


# --------------------------------------------------------------------------- (3) Hutchinson


def test_hutchinson_trace_within_three_stderr_and_shrinking(cnn_data):
    x, y = cnn_data
    op = HessianOperator(make_bn_cnn(), x, y, dtype="float64")
    exact = float(torch.trace(op.dense()))
    mean, se = hutchinson_trace(op, 1000, seed=0)
    assert abs(mean - exact) < 3 * se
    _, se_small = hutchinson_trace(op, 60, seed=0)
    assert se < se_small
    again = hutchinson_trace(op, 30, seed=0)
    assert again == hutchinson_trace(op, 30, seed=0)
    assert again != hutchinson_trace(op, 30, seed=1)
    one = hutchinson_trace(op, 1, seed=0)
    assert math.isnan(one[1])


# --------------------------------------------------------------------------- (4) pyhessian


@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU])
def test_pyhessian_and_native_agree_on_top_eigenvalue(act, mlp_data):
    x, y = mlp_data
    model = make_mlp(act)
    native, _ = top_eigenvalues(HessianOperator(model, x, y), 1, tol=1e-8)
    ph, n_hvp = pyhessian_top_eigenvalues(model, x, y, 1, tol=1e-8, max_iter=5000)
    assert n_hvp > 0
    assert abs(ph[0] - float(native[0])) <= 1e-4 * abs(float(native[0]))


def test_pyhessian_does_not_double_on_a_model_with_stale_graph_grads(mlp_data):
    x, y = mlp_data
    model = make_mlp()
    # What a previous pyhessian object leaves behind: graph gradients in .grad.
    F.cross_entropy(model(x), y).backward(create_graph=True)
    stale = [p.grad for p in model.parameters()]
    first, _ = pyhessian_top_eigenvalues(model, x, y, 1, tol=1e-8, max_iter=5000)
    second, _ = pyhessian_top_eigenvalues(model, x, y, 1, tol=1e-8, max_iter=5000)
    exact = float(torch.linalg.eigvalsh(reference_hessian(model, x, y))[-1])
    assert abs(first[0] - exact) <= 1e-4 * exact
    assert abs(second[0] - exact) <= 1e-4 * exact
    assert all(p.grad is g for p, g in zip(model.parameters(), stale)), "caller's .grad untouched"


def test_pyhessian_trace_and_float64_and_masks(mlp_data):
    x, y = mlp_data
    model = make_mlp()
    masks = random_masks(model)
    op = HessianOperator(model, x, y, masks=masks, dtype="float64")
    H = op.dense()
    exact_top = float(torch.linalg.eigvalsh(H)[-1])
    ph, _ = pyhessian_top_eigenvalues(model, x, y, 1, tol=1e-10, max_iter=5000, masks=masks, dtype="float64")
    # Not tighter: pyhessian normalizes by (|v| + 1e-6), which biases its eigenvalue
    # low by about 2e-6 / lambda_1 relative (4e-6 here) even in float64.
    assert abs(ph[0] - exact_top) <= 1e-4 * exact_top
    exact_trace = float(torch.trace(H))
    _, se = hutchinson_trace(op, 400, seed=3)
    tr = pyhessian_trace(model, x, y, max_iter=400, tol=0.0, masks=masks, dtype="float64")
    assert abs(tr - exact_trace) < 4 * se


def test_probe_with_pyhessian_engine(mlp_data):
    x, y = mlp_data
    model = make_mlp()
    s = HessianSettings(samples=24, top_k=2, trace_probes=50, engine="pyhessian", tol=1e-9, dtype="float64")
    res = probe(model, x, y, s)
    exact = torch.linalg.eigvalsh(reference_hessian(model, x, y)).flip(0)
    assert res.engine == "pyhessian" and res.n_hvp > 50
    assert abs(res.eigenvalues[0] - float(exact[0])) <= 1e-4 * float(exact[0])
    assert res.trace is not None and res.trace_stderr is not None and res.trace_stderr > 0
    # Chunked data go through pyhessian's dataloader path, HVPs still counted.
    vals, n_hvp = pyhessian_top_eigenvalues(model, x, y, 1, tol=1e-9, max_iter=5000, dtype="float64", batch_size=10)
    assert n_hvp > 0 and abs(vals[0] - float(exact[0])) <= 1e-4 * float(exact[0])


# --------------------------------------------------------------------------- (5) density


@pytest.mark.parametrize("kind", ["mlp", "bn_cnn"])
def test_density_integrates_to_one_and_ritz_values_inside_spectrum(kind, mlp_data, cnn_data):
    model, (x, y) = (make_mlp(), mlp_data) if kind == "mlp" else (make_bn_cnn(), cnn_data)
    op = HessianOperator(model, x, y, dtype="float64")
    exact = torch.linalg.eigvalsh(op.dense())
    d = spectral_density(op, vectors=3, steps=20, grid=500, seed=0)
    assert d.ritz_values.shape == d.weights.shape == (3, 20)
    assert d.grid.shape == d.density.shape == (500,)
    assert abs(d.integral() - 1.0) < 1e-3
    torch.testing.assert_close(d.weights.sum(dim=1), torch.ones(3, dtype=torch.float64), atol=1e-12, rtol=0)
    slack = 1e-8 * float(exact.abs().max())
    assert float(d.ritz_values.min()) >= float(exact[0]) - slack
    assert float(d.ritz_values.max()) <= float(exact[-1]) + slack
    assert float(d.grid[0]) < float(exact[0]) and float(d.grid[-1]) > float(exact[-1]) - slack
    # All steps (steps >= dim): the Ritz values are the whole spectrum.
    full = spectral_density(op, vectors=1, steps=500, seed=1, sigma=0.05)
    assert full.ritz_values.shape == (1, op.dim)
    torch.testing.assert_close(full.ritz_values[0], exact, atol=1e-8 * float(exact.abs().max()), rtol=0)
    assert abs(full.integral() - 1.0) < 1e-3


def test_density_warns_when_grid_cannot_resolve_sigma(mlp_data):
    x, y = mlp_data
    op = HessianOperator(make_mlp(), x, y, dtype="float64")
    with pytest.warns(UserWarning, match="under-resolved"):
        spectral_density(op, steps=10, grid=10, sigma=1e-6)


# --------------------------------------------------------------------------- (6) masks


@pytest.mark.parametrize("kind", ["mlp", "bn_cnn"])
def test_masked_operator_is_the_survivor_block(kind, mlp_data, cnn_data):
    model, (x, y) = (make_mlp(), mlp_data) if kind == "mlp" else (make_bn_cnn(), cnn_data)
    masks = random_masks(model)
    names = [n for n, _ in model.named_parameters()]
    keep = torch.cat([masks[n].reshape(-1) if n in masks else torch.ones(p.numel()) for n, p in model.named_parameters()]).bool()
    op = HessianOperator(model, x, y, masks=masks, dtype="float64")
    assert op.dim == int(keep.sum()) < keep.numel()
    sub = reference_hessian(model, x, y, masks)[keep][:, keep]
    torch.testing.assert_close(op.dense(), sub, atol=1e-10, rtol=0)
    exact = torch.linalg.eigvalsh(sub)
    vals, vecs = top_eigenvalues(op, 3, tol=1e-10)
    torch.testing.assert_close(vals, exact.flip(0)[:3], rtol=1e-5, atol=0)
    for v in vecs:
        full = op.to_full(v)
        assert list(full) == names
        for n, m in masks.items():
            assert torch.all(full[n][m == 0] == 0), f"{n} has weight on pruned coordinates"
        flat = torch.cat([full[n].reshape(-1) for n in names])
        torch.testing.assert_close(flat[keep], v)


def test_masked_probe_ignores_pruned_weight_values(mlp_data):
    """The operator computes the masked network: whatever sits on pruned coordinates does not matter."""
    x, y = mlp_data
    model = make_mlp()
    masks = random_masks(model)
    zeroed = make_mlp()
    with torch.no_grad():
        for n, p in zeroed.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    a = HessianOperator(model, x, y, masks=masks, dtype="float64").dense()
    b = HessianOperator(zeroed, x, y, masks=masks, dtype="float64").dense()
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


# --------------------------------------------------------------------------- probe


def test_probe_runs_everything_and_row_is_flat(cnn_data):
    x, y = cnn_data
    model = make_bn_cnn()
    s = HessianSettings(
        samples=12, top_k=2, smallest=True, trace_probes=20, density=True, density_steps=15,
        dtype="float64", tol=1e-8,
    )
    res = probe(model, x, y, s)
    xs, ys = select_subset(x, y, 12, 0)
    exact = torch.linalg.eigvalsh(reference_hessian(model, xs, ys))
    assert res.engine == "native" and res.samples == 12 and res.dim == 51 and res.converged
    assert len(res.eigenvalues) == 2
    assert abs(res.eigenvalues[0] - float(exact[-1])) <= 1e-5 * float(exact[-1])
    assert abs(res.lambda_min - float(exact[0])) <= 1e-5 * abs(float(exact[0]))
    assert res.density is not None and abs(res.density.integral() - 1) < 1e-3
    assert res.n_hvp >= 20 + 15 and res.seconds > 0
    row = res.row()
    assert list(row) == ["lambda_1", "lambda_2", "lambda_min", "trace", "trace_stderr", "n_hvp", "seconds"]
    assert all(isinstance(v, (int, float)) for v in row.values())
    # The same settings give the same numbers.
    assert probe(model, x, y, s).row()["trace"] == row["trace"]


def test_select_subset_is_fixed_and_seeded():
    x = torch.arange(100).float().unsqueeze(1)
    y = torch.arange(100)
    a, ay = select_subset(x, y, 10, 0)
    b, _ = select_subset(x, y, 10, 0)
    c, _ = select_subset(x, y, 10, 1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a.squeeze(1).long(), ay) and torch.all(ay[1:] > ay[:-1])
    with pytest.warns(UserWarning, match="hessian.samples=200 exceeds the 100 available"):
        allx, _ = select_subset(x, y, 200, 0)
    assert allx.shape[0] == 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_subset(x, y, 100, 0)[0].shape[0] == 100


# --------------------------------------------------------------------------- (7) bad input


def test_bad_inputs_raise_config_error_naming_the_setting(mlp_data):
    x, y = mlp_data
    model = make_mlp()
    op = HessianOperator(model, x, y)
    with pytest.raises(ConfigError, match=r"hessian.top_k=40 must be at most 39 surviving parameters"):
        top_eigenvalues(op, 40)
    with pytest.raises(ConfigError, match="hessian.top_k"):
        probe(model, x, y, HessianSettings(samples=24, top_k=40))
    masked = HessianOperator(model, x, y, masks={"0.weight": torch.zeros(4, 5)})
    with pytest.raises(ConfigError, match=r"at most 19 surviving"):
        top_eigenvalues(masked, 20)
    with pytest.raises(ConfigError, match="hessian.samples"):
        HessianSettings(samples=0)
    with pytest.raises(ConfigError, match="hessian.samples"):
        select_subset(x, y, -1, 0)
    with pytest.raises(ConfigError, match=r"hessian.engine must be one of native \| pyhessian"):
        HessianSettings(engine="jax")
    with pytest.raises(ConfigError, match=r"hessian.dtype must be one of float32 \| float64"):
        HessianSettings(dtype="float16")
    with pytest.raises(ConfigError, match="hessian.dtype"):
        HessianOperator(model, x, y, dtype="bfloat16")
    with pytest.raises(ConfigError, match="hessian.density is available only with hessian.engine='native'"):
        HessianSettings(engine="pyhessian", density=True)
    with pytest.raises(ConfigError, match="hessian.trace_probes"):
        hutchinson_trace(op, 0)
    with pytest.raises(ConfigError, match="hessian.tol"):
        HessianSettings(tol=-1.0)
    with pytest.raises(ConfigError, match="nothing to compute"):
        HessianSettings(top_k=0)
    with pytest.raises(ConfigError, match="not trainable parameters"):
        HessianOperator(model, x, y, masks={"nope.weight": torch.ones(1)})
    with pytest.raises(ConfigError, match="mask for 0.weight has shape"):
        HessianOperator(model, x, y, masks={"0.weight": torch.ones(5, 4)})
