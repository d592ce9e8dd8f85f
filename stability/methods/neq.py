"""NEq: neurons at equilibrium skip their weight updates (Bragagnolo, Tartaglione & Grangetto, NeurIPS 2022).

``training.method = neq`` with the ``[neq]`` settings. At every NEq evaluation (the run's start step,
then every ``neq.every`` iterations, default ``training.eval_every``) each *neuron* (an output unit of
a linear layer, an output channel of a convolution, for every prunable layer but the output layer) is
checked on a fixed, seeded subset of the validation split, model in eval mode:

- ``phi_t``: the cosine similarity between the neuron's outputs now and at the previous evaluation
  (the layer's outputs before any normalization or activation, one vector per neuron over all the
  subset's examples and spatial positions; the reference code instead averages, for convolutions, one
  cosine per example over its spatial positions: the two agree for linear layers). A neuron whose
  outputs are zero both times has phi = 1
  (it did not move); zero once only, phi = 0 (as the reference code's ``cosine_similarity``);
- ``dphi_t = phi_t - phi_{t-1}``, with phi = 1 before the first measured one (the reference code's
  delta buffer starts at 0, and it stores 1 - phi);
- the velocity ``v_t``, by ``neq.velocity``:

  - ``reference`` (default): what EIDOSLAB/NEq's code computes (``Hook.get_velocity`` then
    ``update_velocity``, ``general_utils.py``): ``v_t = dphi_t - dphi_{t-1} + mu * v_{t-1}``,
    i.e. dphi_t less an exponential average of the earlier dphi
    (``v_t = dphi_t - (1 - mu) * sum_{k<t} mu^(t-1-k) dphi_k``);
  - ``paper``: the paper's formula ``v_t = dphi_t - mu * v_{t-1}``.

  Both start from v = 0 and dphi = 0, and agree on the first two velocities when mu = 0.5 (not after);
- a neuron is at equilibrium when ``|v_t| < neq.eps``.

The first evaluation has no previous outputs: everything is updated until the second. From then on
the neurons at equilibrium are frozen until the next evaluation, where every neuron is checked again
(no pinning, as the reference code's default). Freezing a neuron holds the rows of its weight and
bias: their gradients are masked and their values put back exactly after each optimizer step
(``TrainSpec.freeze``), so weight decay and momentum do not move them either. (The optimizer state
of a frozen coordinate still evolves as under a zero gradient: momentum decays, and torch's SGD adds
weight decay into the momentum buffer; the reference code's MaskedSGD zeroes that term.)
BatchNorm parameters are not frozen (the reference code also treats BatchNorm channels as neurons).

Baselines (``neq.baseline``): ``random`` freezes ``neq.random_fraction`` of each layer's neurons,
drawn afresh at each evaluation from the second on; ``matched`` freezes, per layer and evaluation,
as many neurons as NEq's rule finds at equilibrium in this same run, drawn at random.

Backward cost (``stability.maths.flops``): a frozen neuron needs no weight gradient, so it saves
``fan_in x positions`` MACs per example; the input gradients and the forward pass are unchanged.
``neq.csv`` records, at each evaluation, every member's frozen neurons and saved MACs per layer and
in all (``layer = all``: ``saved_fraction`` is of the whole backward pass of the conv and linear
layers). The saving is arithmetic, not time: the engine still computes the masked gradients.

Resume: the state (the weights at the previous evaluation, from which its outputs are recomputed;
phi, dphi, velocity and frozen neurons per layer; the baselines' generator) travels in
``Members.extra`` inside every saved state, so a killed run continues bit for bit.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..config import Config
from ..engine import Members, derive_seed
from ..errors import ConfigError
from ..maths.flops import LayerCost, backward_macs, layer_costs, weight_gradient_saved
from ..maths.pruning import PRUNABLE_MODULES
from ..models import output_layer_name
from ..steps import Step, to_iterations
from ..store.files import RunDir, read_table, write_csv
from ..store.schema import NEQ_COLUMNS, NEQ_RECORDS
from .base import Method, RunParts

BASELINES = ("none", "random", "matched")
VELOCITIES = ("reference", "paper")
ALL = "all"  # the layer name of the rows that sum over every NEq layer
_KEY = "neq/"  # Members.extra keys


# --------------------------------------------------------------------------- the maths
def neq_layers(model: nn.Module) -> list[str]:
    """Module names of the layers whose neurons NEq checks: every prunable layer but the output layer."""
    output = output_layer_name(model)
    return [name for name, m in model.named_modules()
            if isinstance(m, PRUNABLE_MODULES) and getattr(m, "weight", None) is not None and name != output]


def neuron_cosine(current: Tensor, previous: Tensor) -> Tensor:
    """phi: the cosine similarity of each neuron's outputs, ``[..., units, values]`` -> ``[..., units]`` (float64).

    Zero outputs both times give 1, zero outputs once 0 (the reference code's convention).
    """
    a, b = current.double(), previous.double()
    dot = (a * b).sum(-1)
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    both = (na > 0) & (nb > 0)
    phi = torch.where(both, dot / torch.where(both, na * nb, torch.ones_like(dot)), torch.zeros_like(dot))
    return torch.where((na == 0) & (nb == 0), torch.ones_like(phi), phi)


def velocity(dphi: Tensor, dphi_prev: Tensor, v_prev: Tensor, mu: float, rule: str = "reference") -> Tensor:
    """The velocity of phi: ``reference`` = dphi - dphi_prev + mu v_prev (NEq's code), ``paper`` = dphi - mu v_prev."""
    if rule == "paper":
        return dphi - mu * v_prev
    if rule == "reference":
        return dphi - dphi_prev + mu * v_prev
    raise ConfigError(f"neq.velocity: unknown value {rule!r}; choose one of {', '.join(VELOCITIES)}")


def layer_outputs(model: nn.Module, layers: Sequence[str], params: Mapping[str, Tensor],
                  buffers: Mapping[str, Tensor], x: Tensor, batch_size: int) -> dict[str, Tensor]:
    """Each layer's outputs per member, eval mode: ``{layer: [N, units, examples x positions]}`` (float32)."""
    modules = {name: model.get_submodule(name) for name in layers}
    n = next(iter(params.values())).shape[0]
    chunks: dict[str, list[Tensor]] = {name: [] for name in layers}

    def hook_for(name: str, linear: bool) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple, out: Tensor) -> None:
            unit_dim = -1 if linear else 1  # Linear acts on the last axis; a convolution's channels are axis 1
            chunks[name].append(out.detach().movedim(unit_dim, 0).reshape(out.shape[unit_dim], -1))
        return hook

    handles = [m.register_forward_hook(hook_for(name, isinstance(m, nn.Linear))) for name, m in modules.items()]
    was_training = model.training
    per_member: list[dict[str, Tensor]] = []
    try:
        model.eval()
        with torch.no_grad():
            for i in range(n):
                p = {k: v[i] for k, v in params.items()}
                b = {k: v[i] for k, v in buffers.items()}
                for start in range(0, len(x), batch_size):
                    functional_call(model, (p, b), (x[start : start + batch_size],))
                per_member.append({name: torch.cat(c, 1) for name, c in chunks.items()})
                for c in chunks.values():
                    c.clear()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: torch.stack([m[name] for m in per_member]) for name in layers}


def choose_frozen(at_equilibrium: Tensor, baseline: str, fraction: float, generator: torch.Generator) -> Tensor:
    """The neurons to freeze ``[N, units]`` (bool): NEq's own, or a random draw (``random``, ``matched``)."""
    if baseline == "none":
        return at_equilibrium.clone()
    n, units = at_equilibrium.shape
    frozen = torch.zeros(n, units, dtype=torch.bool)
    for i in range(n):
        k = int(at_equilibrium[i].sum()) if baseline == "matched" else math.floor(fraction * units + 0.5)
        frozen[i, torch.randperm(units, generator=generator)[:k]] = True
    return frozen.to(at_equilibrium.device)


# --------------------------------------------------------------------------- the tracker
class NeqTracker:
    """NEq's state over one run and its update at each NEq evaluation (``TrainSpec.update_masks``).

    Calling it with the members at step s evaluates when s is an NEq evaluation point (the run's first
    step ``first``, then every ``every`` iterations) and returns the masks in force from s on
    (``{}`` when nothing is frozen), else None. ``on_record`` gets the rows of each evaluation.
    """

    def __init__(self, ctx: RunParts, first: int, on_record: Callable[[list[dict[str, Any]]], None] | None = None):
        cfg = ctx.cfg
        self.settings = cfg.neq
        self.model = ctx.model
        self.first = first
        self.every = neq_every(ctx)
        self.layers = neq_layers(ctx.model)
        self.batch_size = cfg.runtime.eval_batch_size
        self.on_record = on_record
        x_val, _ = ctx.data.split("val")
        pick = torch.Generator().manual_seed(derive_seed(self.settings.seed, "neq", "examples"))
        idx = torch.randperm(len(x_val), generator=pick)[: self.settings.examples].sort().values
        self.x = x_val[idx.to(x_val.device)]
        costs = {c.weight: c for c in layer_costs(ctx.model, ctx.data.input_shape)}
        self.costs: list[LayerCost] = list(costs.values())
        self.layer_cost = {name: costs[f"{name}.weight"] for name in self.layers}
        self.biased = {name: getattr(ctx.model.get_submodule(name), "bias", None) is not None for name in self.layers}
        self.weight_dims = {name: ctx.model.get_submodule(name).weight.dim() for name in self.layers}
        self._fresh(0)

    def _fresh(self, n: int) -> None:
        self.n = n
        self.evaluations = 0
        self.last_step = -1
        self.generator = torch.Generator().manual_seed(derive_seed(self.settings.seed, "neq", "baseline"))
        self.prev_outputs: dict[str, Tensor] | None = None
        self.prev_weights: dict[str, Tensor] = {}
        self.phi: dict[str, Tensor] = {}
        self.dphi: dict[str, Tensor] = {}
        self.v: dict[str, Tensor] = {}
        self.frozen: dict[str, Tensor] = {}

    def due(self, step: int) -> bool:
        """Whether ``step`` is an NEq evaluation point."""
        return step == self.first or (step > self.first and step % self.every == 0)

    # ---- state in Members.extra
    def save(self, members: Members) -> None:
        """Write the state into ``members.extra`` (replacing an earlier one)."""
        for k in [k for k in members.extra if k.startswith(_KEY)]:
            del members.extra[k]
        t = members.extra
        t[f"{_KEY}first"] = torch.tensor(self.first, dtype=torch.int64)
        t[f"{_KEY}evaluations"] = torch.tensor(self.evaluations, dtype=torch.int64)
        t[f"{_KEY}step"] = torch.tensor(self.last_step, dtype=torch.int64)
        t[f"{_KEY}rng"] = self.generator.get_state()
        for name in self.layers:
            for key, table in (("phi", self.phi), ("dphi", self.dphi), ("velocity", self.v)):
                t[f"{_KEY}{key}/{name}"] = table[name]
            t[f"{_KEY}frozen/{name}"] = self.frozen[name].to(torch.uint8)
        for k, v in self.prev_weights.items():
            t[f"{_KEY}prev/{k}"] = v

    def restore(self, members: Members) -> None:
        """Continue from the state in ``members.extra`` when it belongs to this run, else start afresh."""
        t = members.extra
        try:
            if int(t[f"{_KEY}first"]) != self.first or int(t[f"{_KEY}step"]) >= members.step:
                raise KeyError("another run's state")
            self.n = members.n
            self.evaluations = int(t[f"{_KEY}evaluations"])
            self.last_step = int(t[f"{_KEY}step"])
            self.generator = torch.Generator()
            self.generator.set_state(t[f"{_KEY}rng"].cpu())  # a CPU generator, wherever the state was loaded
            for key, table in (("phi", self.phi), ("dphi", self.dphi), ("velocity", self.v)):
                for name in self.layers:
                    table[name] = t[f"{_KEY}{key}/{name}"]
            self.frozen = {name: t[f"{_KEY}frozen/{name}"].bool() for name in self.layers}
            self.prev_weights = {k[len(_KEY) + 5:]: v for k, v in t.items() if k.startswith(f"{_KEY}prev/")}
            if any(v.shape[0] != members.n for v in self.frozen.values()):
                raise KeyError("another number of members")
        except KeyError:
            self._fresh(members.n)
            for name in self.layers:
                units = self.layer_cost[name].out_units
                device = members.params[f"{name}.weight"].device
                self.phi[name] = torch.ones(members.n, units, dtype=torch.float64, device=device)
                self.dphi[name] = torch.zeros(members.n, units, dtype=torch.float64, device=device)
                self.v[name] = torch.zeros(members.n, units, dtype=torch.float64, device=device)
                self.frozen[name] = torch.zeros(members.n, units, dtype=torch.bool, device=device)
            for k in [k for k in members.extra if k.startswith(_KEY)]:
                del members.extra[k]
            return
        # The previous evaluation's outputs, recomputed from its weights (the same arithmetic as then).
        params = {k[6:]: v for k, v in self.prev_weights.items() if k.startswith("param/")}
        buffers = {k[7:]: v for k, v in self.prev_weights.items() if k.startswith("buffer/")}
        self.prev_outputs = layer_outputs(self.model, self.layers, params, buffers, self.x, self.batch_size)

    # ---- masks for the engine
    def masks(self) -> dict[str, Tensor]:
        """Update masks (1 = updated) of the layers with a frozen neuron: weight ``[N, units, 1, ...]``, bias ``[N, units]``."""
        out: dict[str, Tensor] = {}
        for name in self.layers:
            frozen = self.frozen[name]
            if not bool(frozen.any()):
                continue
            keep = (~frozen).float()
            out[f"{name}.weight"] = keep.reshape(*keep.shape, *([1] * (self.weight_dims[name] - 1)))
            if self.biased[name]:
                out[f"{name}.bias"] = keep
        return out

    # ---- the update
    def __call__(self, members: Members) -> dict[str, Tensor] | None:
        s = members.step
        if not self.due(s) or s <= self.last_step:
            return None
        nq = self.settings
        outputs = layer_outputs(self.model, self.layers, members.params, members.buffers, self.x, self.batch_size)
        measured = self.prev_outputs is not None
        at_eq: dict[str, Tensor] = {}
        for name in self.layers:
            if measured:
                phi = neuron_cosine(outputs[name], self.prev_outputs[name])
                dphi = phi - self.phi[name]
                v = velocity(dphi, self.dphi[name], self.v[name], nq.mu, nq.velocity)
                self.phi[name], self.dphi[name], self.v[name] = phi, dphi, v
                at_eq[name] = v.abs() < nq.eps
                self.frozen[name] = choose_frozen(at_eq[name], nq.baseline, nq.random_fraction, self.generator)
            else:
                at_eq[name] = torch.zeros_like(self.frozen[name])
                self.frozen[name] = torch.zeros_like(self.frozen[name])
        self.prev_outputs = outputs
        self.prev_weights = {**{f"param/{k}": v.detach().clone() for k, v in members.params.items()},
                             **{f"buffer/{k}": v.detach().clone() for k, v in members.buffers.items()}}
        self.evaluations += 1
        self.last_step = s
        self.save(members)
        if self.on_record is not None:
            self.on_record(self.rows(s, at_eq, measured))
        return self.masks()

    def rows(self, step: int, at_eq: Mapping[str, Tensor], measured: bool) -> list[dict[str, Any]]:
        """The records of one evaluation: per member, one row per layer and one for all of them."""
        out = []
        total_backward = backward_macs(self.costs)
        for i in range(self.frozen[self.layers[0]].shape[0]):
            keep = {f"{name}.weight": ~self.frozen[name][i] for name in self.layers}
            per_layer = []
            for name in self.layers:
                c = self.layer_cost[name]
                frozen = int(self.frozen[name][i].sum())
                saved = weight_gradient_saved([c], {c.weight: keep[c.weight]})
                backward = c.weight_gradient + c.input_gradient
                per_layer.append({
                    "step": step, "member": i, "layer": name, "neurons": c.out_units, "frozen": frozen,
                    "frozen_fraction": frozen / c.out_units, "at_equilibrium": int(at_eq[name][i].sum()),
                    "mean_abs_velocity": float(self.v[name][i].abs().mean()) if measured else "",
                    "backward_macs": backward, "macs_saved": saved, "saved_fraction": saved / backward,
                })
            neurons = sum(r["neurons"] for r in per_layer)
            frozen = sum(r["frozen"] for r in per_layer)
            saved = weight_gradient_saved(self.costs, keep)
            velocities = torch.cat([self.v[name][i] for name in self.layers])
            out += per_layer
            out.append({
                "step": step, "member": i, "layer": ALL, "neurons": neurons, "frozen": frozen,
                "frozen_fraction": frozen / neurons, "at_equilibrium": sum(r["at_equilibrium"] for r in per_layer),
                "mean_abs_velocity": float(velocities.abs().mean()) if measured else "",
                "backward_macs": total_backward, "macs_saved": saved, "saved_fraction": saved / total_backward,
            })
        return out


# --------------------------------------------------------------------------- inside a resumable run
def neq_every(ctx: RunParts) -> int:
    """The NEq evaluation cadence in iterations (``neq.every``, else ``training.eval_every``)."""
    every = ctx.cfg.neq.every or ctx.cfg.training.eval_every
    return to_iterations(every, ctx.ipe, "neq.every" if ctx.cfg.neq.every else "training.eval_every")


def check_settings(ctx: RunParts) -> None:
    """Refuse NEq settings this model and data cannot run (before anything is written)."""
    if neq_every(ctx) < 1:
        raise ConfigError(f"neq.every: must be at least 1 iteration, got {ctx.cfg.neq.every!r}")
    if neq_every(ctx) >= ctx.total_steps:
        # one evaluation, at the start: no neuron can ever be judged, and "0% frozen" would read as a result
        setting = "neq.every" if ctx.cfg.neq.every else "training.eval_every"
        raise ConfigError(f"{setting}: NEq needs a second evaluation before the end to judge any neuron; "
                          f"{neq_every(ctx)} iterations is not shorter than training ({ctx.total_steps}); "
                          "evaluate more often")
    if len(ctx.data.split("val")[0]) == 0:
        raise ConfigError("neq.examples: NEq compares outputs on validation examples, and dataset.val_size is 0; "
                          "set dataset.val_size >= 1")
    if not neq_layers(ctx.model):
        raise ConfigError(f"training.method: neq needs a convolution or linear layer besides the output layer; "
                          f"model {ctx.cfg.model.name!r} has none")


def read_records(run: RunDir) -> list[dict[str, Any]] | None:
    """neq.csv of a run, or None when it is missing or damaged (a damaged one is moved aside)."""
    return read_table(run, NEQ_RECORDS, NEQ_COLUMNS)


class NeqRun:
    """NEq inside one training run (``TrainHooks``): its tracker, its records (``neq.csv``) and their resume.

    ``covered(s)``: neq.csv holds every member's rows of every NEq evaluation before step s (a saved
    state at s is used only then); ``attach(members)`` continues from the state the members carry and
    returns the masks in force; the object itself is the engine's ``update_masks`` hook. Without a run
    directory (the trunk's checkpoint replay) it reads and writes no records.
    """

    freeze = True  # a frozen neuron is held at its values, not pruned

    def __init__(self, ctx: RunParts, run: RunDir | None, first: int, members: int):
        self.run = run
        self.tracker = NeqTracker(ctx, first, None if run is None else self._record)
        self.n = members
        self.rows: list[dict[str, Any]] = (read_records(run) or []) if run is not None else []

    def covered(self, step: int) -> bool:
        if self.run is None:
            return True
        counts: dict[int, int] = {}
        for r in self.rows:
            counts[r["step"]] = counts.get(r["step"], 0) + 1
        per_step = self.n * (len(self.tracker.layers) + 1)
        return all(counts.get(t) == per_step for t in range(self.tracker.first, step) if self.tracker.due(t))

    def attach(self, members: Members) -> dict[str, Tensor]:
        self.tracker.restore(members)
        self.rows = [r for r in self.rows if r["step"] < members.step]
        return self.tracker.masks()

    def _record(self, rows: list[dict[str, Any]]) -> None:
        self.rows.extend(rows)
        write_csv(self.run / NEQ_RECORDS, self.rows, NEQ_COLUMNS)

    def __call__(self, members: Members) -> dict[str, Tensor] | None:
        return self.tracker(members)


def neq_summary(rows: Sequence[Mapping[str, Any]], first: int, end: int) -> dict[str, Any]:
    """Over the steps trained: the mean fraction of frozen neurons and of backward MACs saved (mean over members).

    Each evaluation's masks count for the steps from it to the next one (or to ``end``).
    """
    totals = [r for r in rows if r["layer"] == ALL]
    steps = sorted({int(r["step"]) for r in totals})
    if not steps or end <= first:
        return {"evaluations": 0}

    def mean(step: int, key: str) -> float:
        values = [float(r[key]) for r in totals if int(r["step"]) == step]
        return sum(values) / len(values)

    spans = [b - a for a, b in zip(steps, [*steps[1:], end])]
    frozen = sum(mean(s, "frozen_fraction") * n for s, n in zip(steps, spans)) / (end - first)
    saved = sum(mean(s, "saved_fraction") * n for s, n in zip(steps, spans)) / (end - first)
    layers = list(dict.fromkeys(r["layer"] for r in rows if r["layer"] != ALL))
    return {"evaluations": len(steps), "layers": layers, "neurons": int(totals[0]["neurons"]),
            "mean_frozen_fraction": frozen, "final_frozen_fraction": mean(steps[-1], "frozen_fraction"),
            "backward_flops_saved_fraction": saved}


# --------------------------------------------------------------------------- the method
class Neq(Method):
    """``training.method = neq`` with the ``[neq]`` settings: dense training whose neurons at equilibrium
    skip their updates; its records are ``neq.csv`` and the ``neq`` entry of ``summary.json``."""

    name = "neq"
    section = "neq"
    trains = "trains dense networks"
    accepts_masks = False  # its own masks change as it trains: no pruning or frozen weights besides
    records = NEQ_RECORDS

    def validate(self, cfg: Config) -> None:
        """The ``[neq]`` values (ConfigError naming the setting and the allowed values)."""
        nq = cfg.neq
        if not (nq.eps >= 0 and math.isfinite(nq.eps)):
            raise ConfigError(f"neq.eps: the equilibrium threshold must be a finite number >= 0, got {nq.eps}")
        if not 0 <= nq.mu < 1:
            raise ConfigError(f"neq.mu: the velocity momentum mu_eq must be in [0, 1), got {nq.mu}")
        for key, allowed in (("velocity", VELOCITIES), ("baseline", BASELINES)):
            if getattr(nq, key) not in allowed:
                raise ConfigError(f"neq.{key}: unknown value {getattr(nq, key)!r}; choose one of {', '.join(allowed)}")
        if nq.examples < 1:
            raise ConfigError(f"neq.examples: the number of validation examples must be >= 1, got {nq.examples}")
        if nq.every:
            Step.parse(nq.every, "neq.every")
        if not 0 <= nq.random_fraction <= 1:
            raise ConfigError(f"neq.random_fraction: must be a fraction in (0, 1], got {nq.random_fraction}")
        if nq.baseline == "random" and nq.random_fraction == 0:
            raise ConfigError("neq.random_fraction: neq.baseline = random needs the fraction of neurons to freeze, "
                              "in (0, 1] (e.g. the mean fraction an NEq run froze); got 0")
        if nq.baseline != "random" and nq.random_fraction != 0:
            raise ConfigError(f"neq.random_fraction: applies only with neq.baseline = random, not {nq.baseline!r}")

    def check(self, run: RunParts) -> None:
        """``check_settings``: a cadence that judges neurons before the end, validation examples, NEq layers."""
        check_settings(run)

    def hooks(self, run: RunParts, rundir: RunDir | None, first: int, n: int) -> NeqRun:
        """NEq's tracker and records for this training (``NeqRun``)."""
        return NeqRun(run, rundir, first, n)

    def summary(self, run: RunParts, rundir: RunDir, first: int, end: int,
                final: Callable[[], Mapping[str, Tensor]]) -> dict[str, Any] | None:
        """``neq_summary`` of the run's neq.csv under ``"neq"``; None when it is missing or damaged."""
        rows = read_records(rundir)
        return None if rows is None else {"neq": neq_summary(rows, first, end)}


NEQ = Neq()

__all__ = ["ALL", "BASELINES", "NEQ", "VELOCITIES", "Neq", "NeqRun", "NeqTracker", "check_settings", "choose_frozen",
           "layer_outputs", "neq_every", "neq_layers", "neq_summary", "neuron_cosine", "read_records",
           "velocity"]
