"""Grids of experiments: a TOML file expands into a plan of units that any executor can run.

A grid names a base (a preset or a config file), fixed settings, the axes to vary
and the stages to run on every point::

    preset = "lenet300_mnist5k"
    stages = ["instability", "imp"]          # default: the stage tables present

    [set]                                    # every point
    "training.steps" = "300it"

    [axes]                                   # the cartesian product of these
    "optimizer.lr" = [6e-4, 1.2e-3]
    "training.init_seed" = [0, 1]

    [instability]                            # as in a config file
    rewind_points = ["0it", "50it"]

    [imp]
    levels = 3

    [hessian]                                # plus `at` (steps, or "all") and `every`
    top_k = 1

    [resources]                              # how executors size their work
    cpus = 1                                 # per unit (torch threads too)
    gpus = 0
    units_per_task = 4                       # slurm: units packed into one array task
    retries = 2                              # ray: retries of a unit whose worker died
    partition = ""                           # slurm
    time = 60                                # slurm: minutes per array task

The plan's units are the run store's own runs (``train_<hash>``, ``siblings_<hash>``
per rewind point, ``instability_<hash>``, ``imp_<hash>``, ``hessian_<hash>``), with
their dependencies, so a unit that is complete on the results root is skipped and a
rerun after any failure finishes only what is missing. Executors (``executors``) run
the units stage by stage; the results root is the only shared state, and each run
directory is claimed by one writer at a time (``runlock``). A unit's failure is
written to ``<root>/grids/<grid>/failures/<unit>.json`` for ``stability status``.
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import Config, read_toml_data, settings_hash
from ..errors import ConfigError
from ..methods import validate_run
from ..store.files import RunDir, write_json
from ..store.schema import (
    GRIDS,
    HESSIAN,
    IMP,
    INSTABILITY,
    PLAN,
    TRAIN,
)

STAGES = ("instability", "imp", "hessian")
GRID_KEYS = ("preset", "config", "description", "stages", "set", "axes", "resources", *STAGES)
# units run in this order; a unit's dependencies are always in an earlier wave
WAVES = ("train", "siblings", "instability", "imp", "hessian")


@dataclass(frozen=True)
class Resources:
    """What one unit needs and how executors pack units (the ``[resources]`` table)."""

    cpus: int = 1
    gpus: int = 0
    units_per_task: int = 4
    retries: int = 2
    partition: str = ""
    time: int = 60

    def validate(self) -> Resources:
        for name in ("cpus", "units_per_task"):
            if getattr(self, name) < 1:
                raise ConfigError(f"resources.{name}: must be at least 1, got {getattr(self, name)}")
        for name in ("gpus", "retries"):
            if getattr(self, name) < 0:
                raise ConfigError(f"resources.{name}: must be >= 0, got {getattr(self, name)}")
        if self.time < 1:
            raise ConfigError(f"resources.time: must be at least 1 minute, got {self.time}")
        return self


@dataclass(frozen=True)
class Grid:
    """A parsed grid: base config, axes, stage tables and resources."""

    base: Config
    axes: dict[str, list[Any]]
    stages: tuple[str, ...]
    tables: dict[str, dict[str, Any]]
    resources: Resources
    source: dict[str, Any] = field(repr=False)

    @property
    def hash(self) -> str:
        return settings_hash(self.source)

    @property
    def root(self) -> Path:
        return Path(self.base.runtime.results_root)

    def points(self) -> list[dict[str, Any]]:
        """Every combination of axis values, as ``{"section.key": value}``."""
        names = list(self.axes)
        return [dict(zip(names, values)) for values in itertools.product(*(self.axes[n] for n in names))]


def load_grid(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Grid:
    """Read and check a grid file (``overrides``: ``{"section.key": value}`` for every point, e.g. runtime)."""
    from ..presets import get_preset, load_toml, stage_tables

    path = Path(path)
    data = read_toml_data(path)
    unknown = [k for k in data if k not in GRID_KEYS]
    if unknown:
        raise ConfigError(f"grid {str(path)!r}: unknown key or table {unknown[0]!r}; a grid has "
                          f"{', '.join(GRID_KEYS)}")
    if "preset" in data and "config" in data:
        raise ConfigError(f"grid {str(path)!r}: give either preset or config, not both")
    tables: dict[str, dict[str, Any]] = {}
    if "preset" in data:
        base, tables = get_preset(str(data["preset"])), stage_tables(str(data["preset"]))
    elif "config" in data:
        config_path = Path(str(data["config"]))
        base, tables = load_toml(config_path if config_path.is_absolute() else path.parent / config_path)
    else:
        raise ConfigError(f"grid {str(path)!r}: name a base with preset = \"name\" or config = \"file.toml\"")
    for stage in STAGES:
        if stage in data:
            if not isinstance(data[stage], Mapping):
                raise ConfigError(f"grid {str(path)!r}: [{stage}] must be a table of settings")
            tables[stage] = {**tables.get(stage, {}), **data[stage]}
    stages = data.get("stages", [s for s in STAGES if s in data])
    if isinstance(stages, str) or not isinstance(stages, list) or any(s not in STAGES for s in stages):
        raise ConfigError(f"grid.stages: a list drawn from {', '.join(STAGES)}, got {stages!r}")
    fixed = dict(data.get("set", {}))
    base = base.with_overrides(fixed).with_overrides(dict(overrides or {}))
    # workers (Ray, Slurm) may start in other directories: the shared results root is an absolute path
    base = base.with_overrides({"runtime.results_root": os.path.abspath(base.runtime.results_root)})
    axes = data.get("axes", {})
    if not isinstance(axes, Mapping):
        raise ConfigError("grid [axes]: must be a table of setting = [values]")
    for name, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid axis {name!r}: must be a non-empty list of values, got {values!r}")
        if name.split(".", 1)[0] == "runtime":
            raise ConfigError(f"grid axis {name!r}: runtime settings do not change results; they cannot be an axis")
    res = dict(data.get("resources", {}))
    names = {f for f in Resources.__dataclass_fields__}
    bad = [k for k in res if k not in names]
    if bad:
        raise ConfigError(f"resources.{bad[0]}: unknown setting; settings are {', '.join(names)}")
    from ..config.convert import coerce_field

    resources = Resources(**{k: coerce_field(Resources, "resources", k, v) for k, v in res.items()}).validate()
    source = {k: v for k, v in data.items() if k != "description"}
    source["base"] = base.hashed_dict()
    return Grid(base, {k: list(v) for k, v in axes.items()}, tuple(stages), tables, resources, source)


# ---------------------------------------------------------------- the plan
@dataclass
class Unit:
    """One unit of work: a run of the store, what it needs first, and how to run it (JSON-able)."""

    id: str  # the run directory's name, <kind>_<hash>
    kind: str  # train | siblings | instability | imp | hessian
    point: dict[str, Any]  # the axis values of the grid point
    config: dict[str, Any]  # the point's full Config (to_dict)
    args: dict[str, Any]  # what the stage function needs besides the config
    deps: list[str]
    iterations: int = 0  # training iterations summed over members
    flops: float = 0.0  # estimated forward + backward FLOPs of its training and evaluation

    def run_dir(self, root: Path) -> RunDir:
        kind, _, run_hash = self.id.rpartition("_")
        return RunDir(root, kind, run_hash)


@dataclass
class Plan:
    grid: Grid
    units: list[Unit]
    points: list[dict[str, Any]]

    def by_id(self) -> dict[str, Unit]:
        return {u.id: u for u in self.units}

    @property
    def folder(self) -> Path:
        return self.grid.root / GRIDS / self.grid.hash

    def save(self) -> None:
        write_json(self.folder / PLAN, {
            "grid": self.grid.hash, "source": self.grid.source, "axes": self.grid.axes, "stages": self.grid.stages,
            "resources": asdict(self.grid.resources), "points": self.points,
            "units": [asdict(u) for u in self.units]})


def make_plan(grid: Grid) -> Plan:
    """Expand a grid into units; every point is checked (settings, names, steps) before anything runs."""
    from ..stages.context import prepare
    from ..stages.imp import check_method, imp_dir, imp_settings, resolve_rewind_step
    from ..stages.instability import (
        check_alignment_method,
        checkpoint_points,
        independent_config,
        instability_settings,
        sweep_dir,
    )
    from ..stages.landscape import hessian_settings, track_key, track_steps
    from ..stages.siblings import siblings_dir
    from ..stages.trunk import trunk_dir
    from ..steps import INDEPENDENT, INDEPENDENT_STEP

    units: dict[str, Unit] = {}

    def add(unit: Unit) -> str:
        old = units.get(unit.id)
        if old is not None and unit.kind == TRAIN:
            # one trunk can be a point's own and another point's independent network: one unit that
            # keeps every checkpoint either asks for, and counts as the point's own trunk
            own = old if "independent_of" not in old.args else unit
            extra = sorted(set(old.args["extra_checkpoints"]) | set(unit.args["extra_checkpoints"]))
            units[unit.id] = replace(own, args={**own.args, "extra_checkpoints": extra})
        else:
            units.setdefault(unit.id, unit)
        return unit.id

    tables = grid.tables
    sweep = instability_settings(tables.get("instability"))
    imp = imp_settings(tables.get("imp")) if "imp" in grid.stages else None
    hessian_table = dict(tables.get("hessian", {}))
    at, every = hessian_table.pop("at", "all"), hessian_table.pop("every", None)
    hessian = hessian_settings(hessian_table) if "hessian" in grid.stages else None
    for point in grid.points():
        cfg = grid.base.with_overrides(point)
        independent = INDEPENDENT in sweep.rewind_points
        if sweep.rewind_points:
            cfg = cfg.with_overrides({"training.rewind_points": checkpoint_points(sweep.rewind_points)})
        # units use the threads they are given by the executors (the same number everywhere, so
        # results do not depend on which executor ran them) and print no progress bars
        cfg = cfg.with_overrides({"runtime.threads": str(grid.resources.cpus), "runtime.quiet": "true"})
        validate_run(cfg)
        if imp is not None:
            check_method(cfg)  # training methods IMP cannot train: refused when planning, not when the unit runs
        if "instability" in grid.stages or (imp is not None and (imp.rewind == "auto" or imp.instability)):
            check_alignment_method(cfg, sweep)
        # planned on the CPU: a login node needs no GPU to check settings and size the work
        ctx = prepare(cfg.with_overrides({"runtime.device": "cpu"}))
        config = cfg.to_dict()
        flops = _flops_per_example(ctx)
        B, T = cfg.training.batch_size, ctx.total_steps
        needs_sweep = "instability" in grid.stages or (imp is not None and imp.rewind == "auto")
        steps = ctx.steps(checkpoint_points(sweep.rewind_points or cfg.training.rewind_points),
                          "instability.rewind_points") if needs_sweep else []
        if needs_sweep and not steps and not independent:
            raise ConfigError("instability.rewind_points: no rewind points to sweep; give them in the grid's "
                              "[instability] table or as training.rewind_points")
        extra: set[int] = set(steps)
        if imp is not None and imp.rewind != "auto":
            extra.add(resolve_rewind_step(ctx, imp))
        hessian_steps = track_steps(ctx, at if isinstance(at, str) else list(at), every) if hessian else []
        extra.update(s for s in hessian_steps if s < T)
        trunk = add(Unit(trunk_dir(cfg).path.name, TRAIN, point, config, {"extra_checkpoints": sorted(extra)}, [],
                         T, 3 * flops * B * T + _eval_flops(ctx, flops, T)))
        sweep_id = None
        if needs_sweep:
            sibs = []
            for k in steps:
                n = sweep.siblings
                sibs.append(add(Unit(siblings_dir(cfg, k, sweep.sibling_settings()).path.name, "siblings", point,
                                     config, {"rewind_step": k, "settings": asdict(sweep.sibling_settings())},
                                     [trunk], n * (T - k), 3 * flops * B * n * (T - k))))
            if independent:  # the other independently trained networks: trunks of their own seeds
                sibs.append(trunk)
                for i in range(1, sweep.siblings):
                    cfg_i = independent_config(cfg, i)
                    sibs.append(add(Unit(trunk_dir(cfg_i).path.name, TRAIN, point, cfg_i.to_dict(),
                                         {"extra_checkpoints": [0, T], "independent_of": trunk}, [], T,
                                         3 * flops * B * T + _eval_flops(ctx, flops, T))))
            swept = ([INDEPENDENT_STEP] if independent else []) + steps
            pairs = sweep.siblings * (sweep.siblings - 1) // 2
            examples = sum(len(ctx.data.split(s)[1]) for s in sweep.splits)
            curve_flops = flops * len(sweep.curve_settings().grid()) * pairs * examples * len(swept)
            sweep_id = add(Unit(sweep_dir(cfg, sweep, swept).path.name, INSTABILITY, point, config,
                                {"settings": asdict(sweep)}, sibs, 0, curve_flops))
        if imp is not None:
            members = 1 + len(imp.baselines)
            rewind = 0 if imp.rewind == "auto" else resolve_rewind_step(ctx, imp)
            iters = imp.replicates * imp.levels * members * (T - rewind)
            deps = [trunk] + ([sweep_id] if imp.rewind == "auto" and sweep_id else [])
            add(Unit(imp_dir(cfg, imp, sweep).path.name, IMP, point, config,
                     {"settings": asdict(imp), "sweep": asdict(sweep)}, deps, iters, 3 * flops * B * iters))
        if hessian is not None:
            key = track_key(cfg, hessian, hessian_steps)
            hvps = len(hessian_steps) * (max(hessian.lanczos_steps, 2 * hessian.top_k + 20) * bool(hessian.top_k)
                                         + hessian.trace_probes + hessian.density_steps * hessian.density)
            add(Unit(f"{HESSIAN}_{settings_hash(key)}", HESSIAN, point, config,
                     {"settings": asdict(hessian), "at": at, "every": every}, [trunk], 0,
                     4 * flops * min(hessian.samples, ctx.data.n_train) * hvps))
    ordered = sorted(units.values(), key=lambda u: WAVES.index(u.kind))
    return Plan(grid, ordered, grid.points())


def _flops_per_example(ctx: Any) -> float:
    """Forward multiply-adds x 2 of one example through the model (Linear and Conv2d layers)."""
    import torch
    from torch import nn

    total = 0.0

    def count(module: nn.Module, inputs: Any, output: Any) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += 2 * module.in_features * module.out_features
        elif isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += 2 * module.in_channels // module.groups * k * output[0].numel()

    model = ctx.new_model()
    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        model.eval()
        with torch.no_grad():
            model(ctx.data.x_test[:1].to("cpu"))
    finally:
        for h in hooks:
            h.remove()
    return total


def _eval_flops(ctx: Any, flops: float, T: int) -> float:
    from ..steps import to_iterations

    evals = T // max(to_iterations(ctx.cfg.training.eval_every, ctx.ipe), 1) + 2
    n = ctx.data.n_train + len(ctx.data.split("val")[1]) + len(ctx.data.split("test")[1])
    return flops * n * evals


