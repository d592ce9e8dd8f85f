"""Strong lottery tickets: subnetworks of frozen random weights, found by training one score per weight.

``training.method = edgepopup`` (Ramanujan et al. 2020, "What's hidden in a randomly weighted neural
network"): the forward pass uses, in every Linear and Conv layer, the weights whose |score| is among the
top ``strong.kept`` fraction of that layer (``kept_count``: round(kept * n), halves up, at least 1);
the backward pass goes straight through the top-k to |score|, so dL/d|s| = dL/dw_eff * w, as the
paper's update rule; the stored score gets dL/ds = dL/dw_eff * w * sign(s), as in the paper's code,
which ranks by |s| (``GetSubnet`` on ``scores.abs()``). The output layer is score-trained too.

``training.method = supermask`` (Zhou et al. 2019, "Deconstructing lottery tickets"): in training each
weight is kept with probability sigmoid(s), a fresh Bernoulli mask per step drawn from the member's noise
generator (the one dropout uses: siblings differ, a resumed run draws the same masks), straight-through:
w_eff = w * (m + (p - p.detach())), p = sigmoid(s). Evaluation is deterministic: ``strong.eval_mask =
expected`` (default) keeps the weights with sigmoid(s) > 0.5 (i.e. s > 0), the most likely mask, whose
density the run reports; ``sample`` evaluates one fixed Bernoulli draw (uniforms drawn once from the init
seed and stored with the weights, as Zhou et al. evaluate a sampled mask).

``make_strong`` converts a built model in place: every Linear and Conv1d/Conv2d becomes a scored layer
whose ``weight`` and ``bias`` are *buffers* (frozen; saved in checkpoints) and whose ``scores`` are the
only parameters; BatchNorm loses its affine parameters (as the paper's ``NonAffineBatchNorm``), LayerNorm
and GroupNorm theirs (frozen at their init, 1 and 0). Biases stay frozen: at zero when ``strong.weight_init``
re-initializes the weights (the paper's models have no biases), at the model's own initialization with
``weight_init = default``. Anything else with parameters is refused.

The effective weight is computed with ``w * (m + (a - a.detach()))``: exactly ``w * m`` in the forward
pass, the straight-through gradient in the backward pass, no custom autograd.Function (so ``vmap`` over
members works), the top-k by ``torch.topk`` indices (exactly k kept, ties broken by topk).

The two methods (``EDGEPOPUP``, ``SUPERMASK``: ``StrongTicket``) build that model, train no weights (so IMP,
early-bird tickets and alignment refuse them) and accept no masks, and write at the top of the run's
``summary.json`` its ``"method"`` and ``"mask_density"``: the fraction of scored weights the final evaluation
mask keeps, so readers need not load the weights.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config, StrongConfig
from ..engine.members import derive_seed
from ..errors import ConfigError
from ..models import noise_generator
from ..store.schema import STRONG_METHODS
from .base import Method, RunParts, changed_settings

if TYPE_CHECKING:
    from ..store.files import RunDir

__all__ = ["EDGEPOPUP", "SUPERMASK", "ScoredConv1d", "ScoredConv2d", "ScoredLinear", "StrongTicket",
           "edgepopup_mask", "evaluation_mask", "kept_count", "make_strong", "mask_density", "scored_layers",
           "state_masks"]

WEIGHT_INITS = ("signed_constant", "kaiming_normal", "default")
SCORE_INITS = ("kaiming_uniform", "kaiming_normal")
EVAL_MASKS = ("expected", "sample")
_RELU_GAIN = math.sqrt(2.0)
_DEFAULTS = StrongConfig()


def kept_count(kept: float, n: int) -> int:
    """Weights kept of a layer of n by edge-popup: round(kept * n), halves rounded up, at least 1, at most n."""
    return min(n, max(1, math.floor(kept * n + 0.5)))


def edgepopup_mask(importance: Tensor, k: int) -> Tensor:
    """0/1 mask (importance's dtype and shape) keeping exactly the k largest entries; works under ``vmap``."""
    flat = importance.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(importance)
    if k <= n - k:
        idx = torch.topk(flat, k, sorted=False).indices
        return torch.zeros_like(flat).scatter(0, idx, 1.0).view_as(importance)
    # the complement is the smaller top-k: the same mask, found sooner
    idx = torch.topk(flat, n - k, largest=False, sorted=False).indices
    return torch.ones_like(flat).scatter(0, idx, 0.0).view_as(importance)


def evaluation_mask(scores: Tensor, method: str, n_kept: int, eval_mask: str = "expected",
                    eval_uniform: Tensor | None = None) -> Tensor:
    """The deterministic 0/1 mask of a layer's scores: edge-popup's top ``n_kept`` |scores|; the supermask's
    sigmoid(s) > 0.5 (``expected``, i.e. s > 0) or its stored draw (``sample``: ``eval_uniform`` < sigmoid(s))."""
    if method == "edgepopup":
        return edgepopup_mask(scores.abs(), n_kept)
    if eval_mask == "sample":
        return (eval_uniform < torch.sigmoid(scores)).to(scores.dtype)
    return (scores > 0).to(scores.dtype)


class _Scored:
    """What scored Linear and Conv layers share: the mask and the straight-through effective weight."""

    weight: Tensor
    scores: nn.Parameter
    method: str
    n_kept: int
    eval_mask: str
    training: bool

    def _setup(self, method: str, settings: StrongConfig, weight: Tensor, bias: Tensor | None, scores: Tensor,
               eval_uniform: Tensor | None) -> None:
        self.method = method
        self.n_kept = kept_count(settings.kept, weight.numel())
        self.eval_mask = settings.eval_mask
        # the supermask draws its training masks from the member's noise generator
        self.draws_noise = method == "supermask"
        self.register_buffer("weight", weight)  # type: ignore[attr-defined]
        self.register_buffer("bias", bias)  # type: ignore[attr-defined]
        self.scores = nn.Parameter(scores)
        if eval_uniform is not None:
            self.register_buffer("eval_uniform", eval_uniform)  # type: ignore[attr-defined]

    def mask(self) -> Tensor:
        """The 0/1 mask this layer uses now (edge-popup's top-k; the supermask's evaluation mask or a training draw)."""
        s = self.scores.detach()
        gen = noise_generator() if self.method == "supermask" and self.training else None
        if gen is not None:  # a training draw from the member's noise
            p = torch.sigmoid(s)
            return (torch.rand(p.shape, generator=gen, device=p.device, dtype=p.dtype) < p).to(p.dtype)
        return evaluation_mask(s, self.method, self.n_kept, self.eval_mask, getattr(self, "eval_uniform", None))

    def effective_weight(self) -> Tensor:
        """``weight * mask`` in value; the gradient goes straight through the mask to the scores."""
        m = self.mask()
        s = self.scores
        if not torch.is_grad_enabled():  # (inside vmap ``requires_grad`` does not show through: not asked)
            return self.weight * m
        a = s.abs() if self.method == "edgepopup" else torch.sigmoid(s)
        return self.weight * (m + (a - a.detach()))

    def _strong_repr(self) -> str:
        what = f"kept={self.n_kept}/{self.weight.numel()}" if self.method == "edgepopup" else f"eval_mask={self.eval_mask}"
        return f"{self.method}, {what}"


class ScoredLinear(_Scored, nn.Module):
    """A Linear layer of frozen weights and trained scores (not an ``nn.Linear``: no code takes its weight for a parameter)."""

    def __init__(self, linear: nn.Linear, method: str, settings: StrongConfig, weight: Tensor, bias: Tensor | None,
                 scores: Tensor, eval_uniform: Tensor | None = None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._setup(method, settings, weight, bias, scores, eval_uniform)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._strong_repr()}"


def _scored_conv(base: type[nn.Module]) -> type[nn.Module]:
    class ScoredConv(_Scored, base):  # type: ignore[valid-type, misc]
        __doc__ = (f"An ``nn.{base.__name__}`` whose weight and bias are frozen buffers and whose scores train "
                   "(still a convolution for the code that reads its shape: strategy choice, FLOPs).")

        def __init__(self, conv: nn.Module, method: str, settings: StrongConfig, weight: Tensor,
                     bias: Tensor | None, scores: Tensor, eval_uniform: Tensor | None = None) -> None:
            # built on the meta device: no memory and no draw from the caller's random streams
            base.__init__(self, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,  # type: ignore[attr-defined]
                          conv.padding, conv.dilation, conv.groups, conv.bias is not None,  # type: ignore[attr-defined]
                          conv.padding_mode, device="meta")  # type: ignore[attr-defined]
            del self.weight
            del self.bias
            self._setup(method, settings, weight, bias, scores, eval_uniform)

        def forward(self, x: Tensor) -> Tensor:
            return self._conv_forward(x, self.effective_weight(), self.bias)  # type: ignore[attr-defined]

        def extra_repr(self) -> str:
            return f"{base.extra_repr(self)}, {self._strong_repr()}"

    ScoredConv.__name__ = ScoredConv.__qualname__ = f"Scored{base.__name__}"
    return ScoredConv


ScoredConv1d = _scored_conv(nn.Conv1d)
ScoredConv2d = _scored_conv(nn.Conv2d)
_SCORED = (ScoredLinear, ScoredConv1d, ScoredConv2d)
_FROZEN_NORMS = (nn.LayerNorm, nn.GroupNorm)


def _fan_in(weight: Tensor) -> int:
    return weight.shape[1] * math.prod(weight.shape[2:]) if weight.dim() > 1 else weight.shape[0]


def _initial_weight(weight: Tensor, scheme: str, gen: torch.Generator) -> Tensor:
    """The frozen weight: signed constant ±σ (random signs), Kaiming normal N(0, σ²), or the model's own;
    σ = sqrt(2 / fan_in), the Kaiming-normal std (ReLU gain, fan_in)."""
    if scheme == "default":
        return weight.detach().clone()
    sigma = _RELU_GAIN / math.sqrt(_fan_in(weight))
    if scheme == "signed_constant":
        signs = torch.randint(0, 2, weight.shape, generator=gen, dtype=torch.int64)
        return torch.where(signs.bool(), sigma, -sigma).to(weight.dtype)
    return torch.randn(weight.shape, generator=gen, dtype=weight.dtype) * sigma


def _initial_scores(weight: Tensor, scheme: str, gen: torch.Generator) -> Tensor:
    """Scores: Kaiming uniform with a = sqrt(5) (U(±1/sqrt(fan_in)), edge-popup's code) or Kaiming normal (ReLU)."""
    fan = _fan_in(weight)
    if scheme == "kaiming_uniform":
        bound = 1.0 / math.sqrt(fan)
        return torch.rand(weight.shape, generator=gen, dtype=weight.dtype) * (2 * bound) - bound
    return torch.randn(weight.shape, generator=gen, dtype=weight.dtype) * (_RELU_GAIN / math.sqrt(fan))


def _scored_type(module: nn.Module) -> type[nn.Module] | None:
    if isinstance(module, _SCORED):
        return None
    if isinstance(module, nn.Conv2d):
        return ScoredConv2d
    if isinstance(module, nn.Conv1d):
        return ScoredConv1d
    if isinstance(module, nn.Linear):
        return ScoredLinear
    return None


def make_strong(model: nn.Module, method: str, settings: StrongConfig = _DEFAULTS, seed: int = 0) -> nn.Module:
    """Turn ``model`` (in place, returned) into its score-trained version for ``method``; seeded by ``seed``.

    Frozen weights, scores and the supermask's evaluation uniforms come from three streams derived from
    ``seed`` (the run's init seed), so changing one setting does not change the others' draws.
    """
    if method not in STRONG_METHODS:
        raise ConfigError(f"training.method: {method!r} is not a strong-ticket method; choose one of "
                          f"{', '.join(STRONG_METHODS)}")
    gens = {k: torch.Generator().manual_seed(derive_seed(seed, "strong", k)) for k in ("weights", "scores", "eval")}
    converted = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            cls = _scored_type(child)
            if cls is not None:
                w = child.weight.detach().cpu()
                b = child.bias
                weight = _initial_weight(w, settings.weight_init, gens["weights"])
                bias = None if b is None else (b.detach().cpu().clone() if settings.weight_init == "default"
                                               else torch.zeros_like(b.detach().cpu()))
                scores = _initial_scores(w, settings.score_init, gens["scores"])
                uniform = (torch.rand(w.shape, generator=gens["eval"], dtype=w.dtype)
                           if method == "supermask" and settings.eval_mask == "sample" else None)
                new = cls(child, method, settings, weight.to(child.weight.device), None if bias is None else
                          bias.to(child.weight.device), scores.to(child.weight.device),
                          None if uniform is None else uniform.to(child.weight.device))
                new.train(child.training)
                setattr(parent, name, new)
                converted += 1
            elif isinstance(child, nn.modules.batchnorm._BatchNorm) and child.affine:
                del child.weight
                del child.bias
                child.register_parameter("weight", None)
                child.register_parameter("bias", None)
                child.affine = False
            elif isinstance(child, _FROZEN_NORMS):
                for leaf, p in list(child.named_parameters(recurse=False)):
                    delattr(child, leaf)
                    child.register_buffer(leaf, p.detach().clone())
    if not converted:
        raise ConfigError(f"training.method: {method} trains scores of Linear and Conv layers; model "
                          f"{type(model).__name__} has none")
    others = [n for n, _ in model.named_parameters() if not n.endswith("scores")]
    if others:
        raise ConfigError(f"training.method: {method} trains only scores of Linear/Conv layers over frozen weights; "
                          f"{type(model).__name__} has other parameters it cannot freeze or score ({', '.join(others[:4])})")
    model.strong_method = method  # type: ignore[assignment]
    return model


def scored_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> scored layer, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _SCORED)}


def state_masks(state: Mapping[str, Tensor], method: str, settings: StrongConfig = _DEFAULTS) -> dict[str, Tensor]:
    """The evaluation masks ``{layer.weight: 0/1}`` of a strong network's state dict (pure function of its scores).

    edgepopup: the top ``kept`` fraction of |scores| per layer; supermask: sigmoid(s) > 0.5 (``expected``) or
    the stored draw (``sample``).
    """
    out = {}
    for key, s in state.items():
        if not key.endswith(".scores") and key != "scores":
            continue
        layer = key[: -len("scores")]
        out[layer + "weight"] = evaluation_mask(s, method, kept_count(settings.kept, s.numel()), settings.eval_mask,
                                                state.get(layer + "eval_uniform"))
    return out


def mask_density(state: Mapping[str, Tensor], method: str, settings: StrongConfig = _DEFAULTS) -> float:
    """Fraction of the scored weights the evaluation mask keeps (over every scored layer together)."""
    masks = state_masks(state, method, settings)
    total = sum(m.numel() for m in masks.values())
    return float(sum(float(m.sum()) for m in masks.values()) / total) if total else float("nan")


# --------------------------------------------------------------------------- the methods
_ONLY = {"kept": "edgepopup", "eval_mask": "supermask"}  # [strong] settings that one strong method alone reads


class StrongTicket(Method):
    """edge-popup or the learned supermask: scores trained over frozen weights, with ``[strong]`` settings."""

    section = "strong"
    trains = "trains scores over frozen weights (its own masks)"
    trains_weights = False
    accepts_masks = False  # its parameters are scores: a pruning mask of weights does not apply to them

    def __init__(self, name: str):
        self.name = name

    def validate(self, cfg: Config) -> None:
        """The ``[strong]`` values, and the settings only the other strong method reads left at their defaults."""
        st = cfg.strong
        if not (0 < st.kept <= 1):
            raise ConfigError(f"strong.kept: the fraction of each layer's weights kept must be in (0, 1], got {st.kept}")
        for key, allowed in (("weight_init", WEIGHT_INITS), ("score_init", SCORE_INITS), ("eval_mask", EVAL_MASKS)):
            if getattr(st, key) not in allowed:
                raise ConfigError(f"strong.{key}: unknown value {getattr(st, key)!r}; choose one of {', '.join(allowed)}")
        for key in changed_settings(st):
            if key in _ONLY and _ONLY[key] != self.name:
                raise ConfigError(f"strong.{key}: applies only with training.method = {_ONLY[key]}, not {self.name!r}")

    def build(self, model: nn.Module, cfg: Config, seed: int) -> nn.Module:
        """The score-trained version of ``model`` (``make_strong``)."""
        return make_strong(model, self.name, cfg.strong, seed)

    def summary(self, run: RunParts, rundir: RunDir, first: int, end: int,
                final: Callable[[], Mapping[str, Tensor]]) -> dict[str, Any]:
        """The method and the density of the final evaluation mask (so readers need not load the weights)."""
        return {"method": self.name, "mask_density": mask_density(final(), self.name, run.cfg.strong)}


# the names are the schema's, which says what these runs write into summary.json
EDGEPOPUP, SUPERMASK = (StrongTicket(name) for name in STRONG_METHODS)
