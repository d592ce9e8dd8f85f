"""Permutation alignment: linear mode connectivity modulo the renumbering of hidden units.

Two networks that compute the same function can have very different weights: renumbering the
hidden units of a layer (and the inputs of the layers that read them) changes nothing but the
order of rows and columns. Frankle et al. (2020) interpolate two networks as they are; Entezari et
al. (2022) conjectured that, once this symmetry is taken out, networks trained by SGD are linearly
connected, and Ainsworth et al. (2023, "Git Re-Basin") and Jordan et al. (2023, "REPAIR") largely
confirmed it. This package aligns network B to network A before interpolating, so the suite can
measure barriers both ways.

- ``permutation_spec(model)``: which axis of which tensor (parameters and BatchNorm buffers) each
  hidden-unit permutation acts on, derived from the model's structure for every model of the zoo, and
  traced with torch.fx (``traced_spec``) and checked for any other model.
- ``apply_permutation(spec, perms, state)``: renumber a state dict, or a dict of masks, without
  changing the function it computes.
- ``weight_matching``: the permutation that maximizes the inner product of the two networks'
  weights, by coordinate descent over linear assignment problems (data-free; Git Re-Basin).
- ``activation_matching``: the permutation that maximizes the correlation of matched units'
  activations on a fixed batch of training data (Git Re-Basin; REPAIR).
- ``repair``: after interpolating the aligned pair, renormalize each hidden unit of the
  interpolated network so its mean and std equal the interpolation of the endpoints'; for networks
  with BatchNorm this is resetting the BatchNorm statistics (REPAIR).

Everything works on plain ``{name: tensor}`` state dicts; the model is only a template that says
the architecture (and runs the forward passes of the data-dependent methods).
"""
from __future__ import annotations

from .matching import activation_matching, matching_objective, weight_matching
from .repair import repair, repair_endpoints, unit_statistics
from .spec import (
    PermutationSpec,
    apply_permutation,
    identity_permutation,
    invert_permutation,
    permutation_spec,
    permute_tensor,
    random_permutation,
)
from .trace import traced_spec

__all__ = [
    "PermutationSpec",
    "activation_matching",
    "apply_permutation",
    "identity_permutation",
    "invert_permutation",
    "matching_objective",
    "permutation_spec",
    "permute_tensor",
    "random_permutation",
    "repair",
    "repair_endpoints",
    "traced_spec",
    "unit_statistics",
    "weight_matching",
]
