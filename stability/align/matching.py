"""Finding the permutation of network B's hidden units that best matches network A's.

Both methods return ``{permutation name: LongTensor}`` to apply to B with ``apply_permutation`` (new
unit j of B = old unit ``perm[j]``), so that unit j of the permuted B plays the role of unit j of A.

- ``weight_matching`` (Ainsworth et al. 2023, "Git Re-Basin", Algorithm 1): maximize
  ``sum_tensors <W_a, P(W_b)>`` over the permutations by coordinate descent: permutations in a
  seeded random order, each solved exactly as a linear assignment with the others held fixed, until
  a whole round changes none (or ``max_rounds``). Data-free.
- ``activation_matching`` (Git Re-Basin section 3.1; Jordan et al. 2023, "REPAIR"): the Pearson
  correlation of every unit of A with every unit of B on the same inputs, then the assignment that
  maximizes the total correlation, independently per permutation.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from ..errors import ConfigError
from ._observe import batches, evaluating, observe, unit_rows
from .spec import PermutationSpec, _layout, identity_permutation, permute_tensor


def _unit_matrix(t: Tensor, axis: int, units: int, block: int) -> Tensor:
    """``t`` as ``[units, -1]``: row i holds every entry of unit i on ``axis`` (its block included)."""
    if block != 1:
        t = t.reshape(*t.shape[:axis], units, block, *t.shape[axis + 1:])
    return t.movedim(axis, 0).reshape(units, -1)


def _check_pair(spec: PermutationSpec, state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor]) -> None:
    if set(state_a) != set(state_b):
        diff = sorted(set(state_a) ^ set(state_b))
        raise ConfigError(f"the two networks have different tensors ({diff[:4]}): they must have the same "
                          "architecture")
    spec.check_state(state_a, "network A")
    spec.check_state(state_b, "network B")


def _matched_tensors(spec: PermutationSpec, state: Mapping[str, Tensor]) -> list[str]:
    """Tensors in weight matching's objective: the spec's parameters (not BatchNorm running stats)."""
    return [n for n in spec.axes if n in state and n not in spec.buffers and state[n].is_floating_point()]


def matching_objective(spec: PermutationSpec, state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor],
                       perms: Mapping[str, Tensor]) -> float:
    """``sum <W_a, P(W_b)>`` over the parameters weight matching uses (float64): what it maximizes."""
    total = 0.0
    for name in _matched_tensors(spec, state_a):
        wb = permute_tensor(spec, perms, name, state_b[name])
        total += float((state_a[name].double() * wb.double()).sum())
    return total


@torch.no_grad()
def weight_matching(spec: PermutationSpec, state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor], *,
                    seed: int = 0, max_rounds: int = 100,
                    init: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Permutations of B's units that maximize ``sum <W_a, P(W_b)>`` (Git Re-Basin weight matching).

    For a permutation p with the others fixed, the objective is linear in p with cost matrix
    ``C = sum over the axes p acts on of W_a (that axis first, flattened) @ P_others(W_b)^T``, solved by
    ``scipy.optimize.linear_sum_assignment(C, maximize=True)``. A permutation is replaced only when
    that strictly raises the objective, so the objective never decreases and the result is a
    deterministic function of ``seed``. Only parameters count (Git Re-Basin's reference uses
    parameters, BatchNorm scale and shift included); running statistics are permuted along but are not
    evidence. Stops after a round that changes nothing, or after ``max_rounds`` rounds.
    """
    if max_rounds < 1:
        raise ConfigError(f"max_rounds: must be at least 1, got {max_rounds}")
    _check_pair(spec, state_a, state_b)
    names = set(_matched_tensors(spec, state_a))
    on_axes = {p: [(n, ax) for n, ax in axes if n in names] for p, axes in spec.perm_to_axes().items()}
    a = {n: state_a[n].detach().double().cpu() for n in names}
    b = {n: state_b[n].detach().double().cpu() for n in names}
    perms = {p: q.clone().cpu() for p, q in (init or identity_permutation(spec)).items()}
    order = sorted(spec.perms)
    g = torch.Generator().manual_seed(seed)
    for _ in range(max_rounds):
        changed = False
        for i in torch.randperm(len(order), generator=g).tolist():
            p = order[i]
            units = spec.perms[p]
            cost = torch.zeros(units, units, dtype=torch.float64)
            for name, axis in on_axes[p]:
                block = spec.block(name, axis)
                wa = _unit_matrix(a[name], axis, units, block)
                wb = _unit_matrix(permute_tensor(spec, perms, name, b[name], except_axis=axis), axis, units, block)
                cost += wa @ wb.T
            _, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            new = torch.as_tensor(cols, dtype=torch.long)
            rows = torch.arange(units)
            old_value, new_value = float(cost[rows, perms[p]].sum()), float(cost[rows, new].sum())
            if new_value > old_value + 1e-12 * max(1.0, abs(old_value)):
                perms[p] = new
                changed = True
        if not changed:
            break
    return perms


def _correlation(sa: Tensor, sb: Tensor, saa: Tensor, sbb: Tensor, sab: Tensor, n: int) -> Tensor:
    """Pearson correlation ``[units_a, units_b]`` from sums; 0 for a unit that never varies."""
    ma, mb = sa / n, sb / n
    cov = sab / n - torch.outer(ma, mb)
    std_a = (saa / n - ma ** 2).clamp_min(0).sqrt()
    std_b = (sbb / n - mb ** 2).clamp_min(0).sqrt()
    return cov / torch.outer(std_a, std_b).clamp_min(1e-12)


# Weight of the pre-activation correlation in activation matching's cost: a tie-breaker only. A unit
# that is dead on x (post-ReLU activation constant) correlates 0 with everything, and its pre-ReLU
# correlations then decide which unit it is; elsewhere they move the cost by at most 2e-6.
_PRE_ACTIVATION_WEIGHT = 1e-6


@torch.no_grad()
def activation_matching(model: nn.Module, spec: PermutationSpec, state_a: Mapping[str, Tensor],
                        state_b: Mapping[str, Tensor], x: Tensor, *, batch_size: int = 500) -> dict[str, Tensor]:
    """Permutations of B's units that maximize the total correlation of matched units' activations on ``x``.

    ``model`` is a template of the architecture (its own weights are not used). Both networks run in
    eval mode on the same inputs ``x`` (the caller's fixed, seeded subset of training data), in
    batches of ``batch_size``. A unit's activation is its post-ReLU output, as in the references,
    every example and (for convolutions) every spatial position counting as one observation. Forward
    hooks read it: for plain chains and VGG on each hidden Conv/Linear (or on the BatchNorm after
    it), the ReLU applied to the hooked output; for ResNets on the stem's BatchNorm (ReLU applied)
    and on every block (whose output is after its final ReLU) for a stage's residual stream, whose
    permutation sums the correlation matrices of all these points, and on ``bn1`` (ReLU applied) for
    a block's inner units. Where the pre-activation is a module's output (all but the ResNet block
    outputs), its correlation is added with weight 1e-6 as a tie-breaker, so that units that are dead
    on ``x`` are still told apart (and a permuted copy of a network is recovered exactly).
    """
    layout = _layout(model)
    if layout.spec != spec:
        raise ConfigError("activation_matching: the spec is not the one of this model")
    _check_pair(spec, state_a, state_b)
    sums: dict[tuple[str, int, bool], list] = {}
    captured: dict[str, dict[tuple[str, int, bool], Tensor]] = {}

    def hooks(net: str) -> dict:
        out = {}
        for p, points in layout.points.items():
            for k, (module, relu) in enumerate(points):
                def record(t: Tensor, key=(p, k), relu=relu) -> None:
                    rows = unit_rows(t)
                    captured[net][(*key, True)] = rows.clamp_min(0) if relu else rows
                    if relu:
                        captured[net][(*key, False)] = rows
                out[module] = record
        return out

    with evaluating(model):
        for xb in batches(x, batch_size):
            for net, state in (("a", state_a), ("b", state_b)):
                captured[net] = {}
                observe(model, state, xb, hooks(net))
            for key, ra in captured["a"].items():
                rb = captured["b"][key]
                new = [ra.sum(0), rb.sum(0), (ra * ra).sum(0), (rb * rb).sum(0), ra.T @ rb, ra.shape[0]]
                old = sums.get(key)
                sums[key] = new if old is None else [u + v for u, v in zip(old, new)]
    perms = {}
    for p, units in spec.perms.items():
        cost = torch.zeros(units, units, dtype=torch.float64)
        for k in range(len(layout.points[p])):
            cost += _correlation(*sums[(p, k, True)]).cpu()
            if (p, k, False) in sums:
                cost += _PRE_ACTIVATION_WEIGHT * _correlation(*sums[(p, k, False)]).cpu()
        _, cols = linear_sum_assignment(cost.numpy(), maximize=True)
        perms[p] = torch.as_tensor(cols, dtype=torch.long)
    return perms
