"""What every stage shares: one run lifecycle (``run_once``), one naming rule (``settings_key``, with today's
legacy exceptions listed once), and the ``Stage`` protocol (a run kind, its settings, ``key``, ``needs``, ``run``).

A stage is one thing you can run (a trunk, a sibling set, an instability sweep, a Hessian track, ...). Its runs
live in ``<results_root>/<name>_<hash>/``, the hash being ``settings_hash(stage.key(...))``. ``needs`` lists the
runs that must exist first, as ``Need`` values (a run kind, the Config it runs under, its settings and
arguments), so a planner can walk the graph without knowing any stage's rules; ``run`` runs (or resumes, or
reuses) the stage, through ``run_once``.
"""
from __future__ import annotations

import functools
import hashlib
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch
from torch import Tensor

from ..config import Config, settings_hash
from ..config.nested import flat_paths, flat_settings
from ..errors import CheckpointError, RecordError, TrainingDiverged
from ..store.files import RunDir
from ..store.ranks import is_writer, sync_ranks
from ..trackers import log_finished

if TYPE_CHECKING:
    from ..engine import Members
    from .context import Context

__all__ = ["LEGACY_NAMED", "Need", "Stage", "mask_digest", "member_tensors", "run_once", "settings_key", "stage_dir"]

S = TypeVar("S")
R = TypeVar("R")


# ---------------------------------------------------------------- the lifecycle
def run_once(run: RunDir, *, load: Callable[[RunDir], R | None], start: Callable[[RunDir], S],
             compute: Callable[[RunDir, S], R], accept_other_versions: bool = True, timed: bool = False,
             again: str = "computing it again") -> R:
    """Run the stage whose run directory is ``run`` once: reuse it when it is finished, else (re)compute it.

    Under the run's claim (one writer across processes and hosts):

    - a ``diverged`` run raises TrainingDiverged from its manifest, now and on every rerun;
    - a ``complete`` run is checked for the code that made it (``check_reuse``, which may refuse it), then
      ``load(run)`` reads its result back. ``load`` returns None, or raises RecordError or CheckpointError,
      when the records are missing or damaged: the run is then computed again, with a warning that says why
      and what happens (``again``; records a stage measures point by point are resumed, not redone). ``load``
      may also refresh the parts of a record that settings outside the run's name decide (a sweep's
      threshold, early-bird's IMP comparison);
    - otherwise ``start(run)`` gathers what the computation needs and writes the ``running`` manifest, and
      ``compute(run, started)`` computes the result, given what ``start`` returned; the run is then marked
      ``complete`` (with the computation's ``seconds`` when ``timed``). A TrainingDiverged out of ``compute``
      marks the run ``diverged`` (unless its training already did) and propagates.
    """
    with run.claim():
        status = run.status()
        # A data-parallel run's ranks all read the status before rank 0 may change it, so they take one branch.
        sync_ranks()
        if status == "diverged":
            raise TrainingDiverged.from_info(run.manifest().get("divergence") or {"step": -1})
        if status == "complete":
            run.check_reuse(accept_other_versions)
            why = "its records are missing or damaged"
            try:
                result = load(run)
            except (RecordError, CheckpointError) as exc:
                result, why = None, str(exc)
            if result is not None:
                return result
            print(f"warning: finished run {run.path.name}: {why}; {again}", file=sys.stderr)
        started = start(run)
        t0 = time.perf_counter()
        try:
            result = compute(run, started)
        except TrainingDiverged as exc:
            if run.status() != "diverged":
                run.update(status="diverged", divergence=exc.info())
            raise
        done: dict[str, Any] = {"seconds": round(time.perf_counter() - t0, 3)} if timed else {}
        run.update(status="complete", **done)
        if is_writer():
            log_finished(run)  # runtime.trackers, once per computed run (a reused run logs nothing), from rank 0
        return result


# ---------------------------------------------------------------- the naming rule
# The one rule, as ``Config.hashed_dict``: a run is named by the fields of its settings that differ from their
# defaults (and are not UNHASHED), so that a field added later, at its default, renames no existing run.
#
# Stage keys were written before the rule, each naming every field it had then, at every value. Those fields
# stay named at every value, and are listed here once per key; every field added since follows the rule. A field
# that only classifies results or is named through a value it resolves to (a threshold; sibling seeds) is left
# out by the stage's ``drop``. Nothing in this table may change: tests/test_hashes.py pins every stage's names.
# The sparse parts of sibling and sparse-sweep keys (``siblings_key``, ``sweep_key``) follow the same pattern by
# hand: the masks' ``mask_digest`` and the label are named at every value (None when dense), ``mask0: "freeze"``
# and the start states' ``short_digest`` only when given.
LEGACY_NAMED: dict[str, tuple[str, ...]] = {
    # SiblingSettings in a sibling set's key: siblings, noise and sibling_seed are named by the seeds they give
    "siblings": ("optimizer_state",),
    # InstabilitySettings in a sweep's key and in an IMP key; align, repair, align_examples, align_seed came later
    "instability": ("rewind_points", "siblings", "noise", "optimizer_state", "sibling_seed", "alphas", "alpha_grid",
                    "bn", "bn_batches", "splits", "threshold", "chance_margin"),
    # ImpSettings in an IMP key; criterion, mask1, supermask, mask0 and mask_from came later
    "imp": ("levels", "prune_fraction", "strategy", "rewind", "one_shot", "baselines", "replicates", "instability",
            "exclude", "rate_overrides", "conv_fraction", "pruning_seed"),
    # EarlybirdSettings in an early-bird key (``every`` and ``rewind`` are named by the steps they resolve to)
    "earlybird": ("mask", "density", "threshold", "window", "rule"),
    # HessianSettings in a Hessian track's or path's key
    "hessian": ("samples", "sample_seed", "top_k", "smallest", "trace_probes", "density", "density_vectors",
                "density_steps", "density_sigma", "density_grid", "lanczos_steps", "tol", "dtype", "seed",
                "batch_size", "engine"),
    # SiblingSettings in a Hessian path's key
    "hessian.siblings": ("siblings", "noise", "optimizer_state", "sibling_seed"),
    # ConnectSettings in a connect key, and the [model] section it names in full
    "connect": ("align", "repair", "alphas", "splits", "bn", "align_examples", "align_seed"),
    "connect.model": ("name", "width", "depth", "hidden", "init", "bn_init", "stem", "dropout"),
}


def settings_key(settings: Any, *, drop: Sequence[str] = (), legacy: str | None = None) -> dict[str, Any]:
    """A settings dataclass as it names a run: its fields, those at their defaults (or UNHASHED, or in ``drop``)
    left out, except the fields ``LEGACY_NAMED[legacy]`` names at every value. Composed settings are named by their
    flat fields (``config.nested.flat_settings``), as they were before they were composed."""
    names = list(flat_paths(type(settings)))
    always = LEGACY_NAMED[legacy] if legacy is not None else ()
    unknown = [n for n in (*always, *drop) if n not in names]
    if unknown:  # a misspelt exception would silently rename runs
        raise TypeError(f"{type(settings).__name__} has no field {unknown[0]!r} (legacy {legacy!r}, drop {tuple(drop)})")
    default = _defaults(type(settings))
    skip = {*drop, *getattr(type(settings), "UNHASHED", ())}
    values, defaults = flat_settings(settings), flat_settings(default)
    return {n: values[n] for n in names
            if n not in skip and (n in always or _plain(values[n]) != _plain(defaults[n]))}


@functools.cache
def _defaults(cls: type) -> Any:
    return cls()


def _plain(value: Any) -> Any:
    """Tuples and lists alike (a TOML list and a dataclass default tuple are the same setting)."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------- digests
# One tensor digest names runs by tensor contents: ``store.files.short_digest`` (the first 16 hex digits of
# ``tensors_digest``: every tensor's name, dtype, shape and bytes). The one legacy exception is ``mask_digest``
# below: sibling sets (their ``masks`` key), sparse sweeps and early-bird ticket directories were named by it
# before, so it keeps its bytes.
def mask_digest(masks: Mapping[str, Tensor] | None) -> str | None:
    """Legacy: a short content hash of a mask set (None when dense): each name and its mask as uint8 bytes."""
    if not masks:
        return None
    h = hashlib.sha256()
    for name in sorted(masks):
        h.update(name.encode())
        h.update(masks[name].detach().to("cpu", torch.uint8).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def member_tensors(members: Members) -> dict[str, Tensor]:
    """What names a start state by its contents: its parameters and buffers (``param/<name>``, ``buffer/<name>``)."""
    return {**{f"param/{k}": v for k, v in members.params.items()},
            **{f"buffer/{k}": v for k, v in members.buffers.items()}}


# ---------------------------------------------------------------- the stage protocol
@dataclass(frozen=True)
class Need:
    """A run a stage needs first: the run kind that makes it, the Config it runs under, its settings (None for a
    trunk, which its Config names) and its arguments (e.g. ``rewind_step``; a trunk's ``extra_checkpoints``)."""

    kind: str
    cfg: Config
    settings: Any = None
    args: Mapping[str, Any] = field(default_factory=dict)


class Stage(Protocol):
    """One thing you can run. ``args`` are the stage's own arguments besides its settings (JSON-able for the
    stages a grid runs: a rewind step, the steps to probe)."""

    name: str  # the run kind: its runs are <results_root>/<name>_<hash>/
    settings: type  # its settings dataclass

    def key(self, ctx: Context, settings: Any, **args: Any) -> dict[str, Any]:
        """What names a run (its hash is ``settings_hash`` of this, recorded in its manifest)."""
        ...

    def needs(self, ctx: Context, settings: Any, **args: Any) -> list[Need]:
        """The runs that must exist before this one (each of them has needs of its own)."""
        ...

    def run(self, ctx: Context, settings: Any, **args: Any) -> Any:
        """Run, resume or reuse the stage (through ``run_once``) and return its result."""
        ...


def stage_dir(stage: Stage, ctx: Context, settings: Any, **args: Any) -> RunDir:
    """Where a stage's run of these settings lives."""
    return RunDir(ctx.cfg.runtime.results_root, stage.name, settings_hash(stage.key(ctx, settings, **args)))
