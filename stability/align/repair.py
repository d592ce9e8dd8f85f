"""REPAIR (Jordan et al. 2023): renormalize the interpolated network's hidden units.

Interpolating two aligned networks shrinks the variance of hidden units ("variance collapse"),
which is much of the remaining barrier. REPAIR measures, for every hidden unit's pre-activation,
the mean and std in network A and in network B on training inputs, sets the goal
``(1 - alpha) * stats_A + alpha * stats_B``, and rescales and shifts the unit in the interpolated
network so its statistics equal the goal.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ._observe import Moments, batches, evaluating, observe, unit_rows
from .spec import _layout


def _moments(model: nn.Module, state: Mapping[str, Tensor], x: Tensor, modules: list[str], batch_size: int,
             *, inputs: bool = False) -> dict[str, Moments]:
    """Per-unit moments of each module's output (or input) on ``x``, the model in eval mode."""
    acc = {m: Moments() for m in modules}
    stop = modules[-1] if len(modules) == 1 else None
    for xb in batches(x, batch_size):
        observe(model, state, xb, {m: (lambda t, m=m: acc[m].add(unit_rows(t))) for m in modules},
                inputs=inputs, stop_at=stop)
    return acc


@torch.no_grad()
def repair(model: nn.Module, state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor],
           state_interp: Mapping[str, Tensor], alpha: float, x: Tensor, *,
           batch_size: int = 1000, endpoints: tuple[dict[str, Moments], dict[str, Moments]] | None = None,
           ) -> dict[str, Tensor]:
    """``state_interp`` (the interpolation at ``alpha`` of A and an already aligned B) after REPAIR.

    ``model`` is a template of the architecture (its own weights are not used); ``x`` is a fixed
    set of training inputs, run in eval mode in batches of ``batch_size``. Statistics are per unit
    (a convolution's channel pools every example and position), mean and population std.

    Networks without BatchNorm (``FullyConnected``, ``ConvThenFC``): every hidden Conv/Linear (not
    the output layer) is corrected. Its output (the pre-activation) has mean mu and std sigma in the
    interpolated network; with the goal (mu*, sigma*) from A and B, its weight rows are multiplied by
    sigma*/sigma and its bias becomes ``(bias - mu) * sigma*/sigma + mu*``: the correction is fused
    into the layer, so the state dict keeps the model's shapes (and pruned weights stay zero).
    Layers are corrected one after another in forward order, each measured with the corrections
    before it in place: the same as the reference's BatchNorm "reset" layers, which normalize with
    the statistics of their input after the earlier ones have acted. Afterwards every hidden unit's
    pre-activation on ``x`` has exactly the goal mean and std.

    Networks with BatchNorm (``CifarVGG``, ``CifarResNet``): REPAIR reduces to resetting the
    BatchNorm statistics, as in the reference (which resets them for BatchNorm networks instead of
    adding correction layers), so ``state_a`` and ``state_b`` are not read. Each BatchNorm's running
    mean and variance become the mean and population variance of its input on ``x``, in forward
    order with the earlier ones already reset, which is the state after one train-mode pass over
    all of ``x`` with cumulative averaging, except that torch records the unbiased variance
    (larger by n/(n-1), n = examples x positions). Why this is REPAIR: after the reset a unit's
    BatchNorm output on ``x`` has mean beta(alpha) = (1-alpha) beta_A + alpha beta_B exactly, and std
    |gamma(alpha)| * c, where c = sigma/sqrt(sigma^2 + eps) ~ 1; if A's and B's running statistics
    are those of ``x`` too, their outputs have means beta_A, beta_B and stds |gamma_A| c_A, |gamma_B| c_B,
    so the goal mean is met exactly and the goal std wherever gamma_A and gamma_B have the same sign
    (up to the eps in c).

    ``endpoints``: ``repair_endpoints(model, state_a, state_b, x)``, computed once for every α of a path.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha: must be in [0, 1], got {alpha}")
    layout = _layout(model)
    for what, state in (("network A", state_a), ("network B", state_b), ("interpolated network", state_interp)):
        layout.spec.check_state(state, what)
    out = {k: v.clone() for k, v in state_interp.items()}
    with evaluating(model):
        ends = endpoints or repair_endpoints(model, state_a, state_b, x, batch_size=batch_size)  # ({}, {}): none fused
        for name, kind in layout.repair:
            if kind == "bn":
                m = _moments(model, out, x, [name], batch_size, inputs=True)[name]
                mean, var = out[f"{name}.running_mean"], out[f"{name}.running_var"]
                out[f"{name}.running_mean"] = m.mean().to(mean)
                out[f"{name}.running_var"] = m.var().to(var)
                continue
            if f"{name}.bias" not in out:
                raise ConfigError(f"repair: layer {name} has no bias to shift its units with")
            cur = _moments(model, out, x, [name], batch_size)[name]
            goal_mean = (1 - alpha) * ends[0][name].mean() + alpha * ends[1][name].mean()
            goal_std = (1 - alpha) * ends[0][name].std() + alpha * ends[1][name].std()
            scale = goal_std / cur.std().clamp_min(1e-12)
            w, bias = out[f"{name}.weight"], out[f"{name}.bias"]
            out[f"{name}.weight"] = (w.double() * scale.view(-1, *([1] * (w.dim() - 1)))).to(w)
            out[f"{name}.bias"] = ((bias.double() - cur.mean()) * scale + goal_mean).to(bias)
    return out


@torch.no_grad()
def repair_endpoints(model: nn.Module, state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor], x: Tensor, *,
                     batch_size: int = 1000) -> tuple[dict[str, Moments], dict[str, Moments]]:
    """The endpoints' unit moments REPAIR's goals are made of (the same for every α of a path)."""
    fused = [name for name, kind in _layout(model).repair if kind == "fused"]
    if not fused:
        return {}, {}
    with evaluating(model):
        return _moments(model, state_a, x, fused, batch_size), _moments(model, state_b, x, fused, batch_size)


def unit_statistics(model: nn.Module, state: Mapping[str, Tensor], x: Tensor, *,
                    batch_size: int = 1000) -> dict[str, tuple[Tensor, Tensor]]:
    """Mean and population std (float64) of every hidden unit's pre-activation on ``x``, eval mode:
    ``{module name: (mean, std)}`` for the modules REPAIR corrects (hidden Conv/Linear outputs, or
    BatchNorm outputs in networks with BatchNorm)."""
    layout = _layout(model)
    names = [name for name, _ in layout.repair]
    with evaluating(model), torch.no_grad():
        acc = _moments(model, state, x, names, batch_size)
    return {n: (m.mean(), m.std()) for n, m in acc.items()}
