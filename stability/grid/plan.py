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
    nodes = 1                                # slurm, runtime.distributed: nodes per data-parallel unit
    tasks_per_node = 0                       # slurm, runtime.distributed: ranks per node (0: one per GPU)

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
from ..stages.base import stage_dir
from ..stages.context import Context, prepare
from ..stages.imp import ImpSettings, check_method, imp_settings
from ..stages.instability import (
    InstabilitySettings,
    check_alignment_method,
    checkpoint_points,
    instability_settings,
)
from ..stages.landscape import hessian_settings
from ..stages.trunk import trunk_dir
from ..steps import INDEPENDENT
from ..store.files import RunDir, write_json
from ..store.schema import GRIDS, HESSIAN, IMP, INSTABILITY, PLAN, TRAIN
from .stages import GRID_STAGES, flops_per_example, unit_args, unit_cost

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
    # A data-parallel unit (runtime.distributed = true on Slurm): its nodes, and ranks per node (0: one per GPU,
    # or one without GPUs). Every rank of the job runs the unit; rank 0 writes.
    nodes: int = 1
    tasks_per_node: int = 0

    def ranks_per_node(self) -> int:
        return self.tasks_per_node or max(self.gpus, 1)

    def validate(self) -> Resources:
        for name in ("cpus", "units_per_task", "nodes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"resources.{name}: must be at least 1, got {getattr(self, name)}")
        for name in ("gpus", "retries", "tasks_per_node"):
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
    if not base.runtime.tracker_group:  # each unit logs to its own tracker run, grouped by the grid's name
        base = base.with_overrides({"runtime.tracker_group": Path(path).stem})
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
    """Expand a grid into units; every point is checked (settings, names, steps) before anything runs.

    The units of a point are the runs its stages need, found by walking each stage's ``needs`` (see
    ``stages.base.Stage``): one unit per run directory, depending on the runs its stage needs, a trunk
    keeping every checkpoint any of its dependents asks for.
    """
    units: dict[str, Unit] = {}
    tables = grid.tables
    sweep = instability_settings(tables.get("instability"))
    imp = imp_settings(tables.get("imp")) if "imp" in grid.stages else None
    hessian_table = dict(tables.get("hessian", {}))
    at, every = hessian_table.pop("at", "all"), hessian_table.pop("every", None)
    hessian = hessian_settings(hessian_table) if "hessian" in grid.stages else None
    wanted: list[tuple[str, Any, dict[str, Any]]] = []  # the stages every point asks for: (kind, settings, args)
    if "instability" in grid.stages:
        wanted.append((INSTABILITY, sweep, {}))
    if imp is not None:
        wanted.append((IMP, imp, {"sweep": sweep}))
    if hessian is not None:
        wanted.append((HESSIAN, hessian, {"at": at if isinstance(at, str) else list(at), "every": every}))
    for point in grid.points():
        cfg = grid.base.with_overrides(point)
        if sweep.rewind_points:
            cfg = cfg.with_overrides({"training.rewind_points": checkpoint_points(sweep.rewind_points)})
        # units use the threads they are given by the executors (the same number everywhere, so
        # results do not depend on which executor ran them) and print no progress bars
        cfg = cfg.with_overrides({"runtime.threads": str(grid.resources.cpus), "runtime.quiet": "true"})
        _check_point(grid, cfg, sweep, imp)
        _Walk(units, point, cfg).add_all(wanted)
    ordered = sorted(units.values(), key=lambda u: WAVES.index(u.kind))
    return Plan(grid, ordered, grid.points())


def _check_point(grid: Grid, cfg: Config, sweep: InstabilitySettings, imp: ImpSettings | None) -> None:
    """What the stages would refuse when their units run, refused when planning instead."""
    validate_run(cfg)
    if cfg.runtime.distributed:
        world = grid.resources.nodes * grid.resources.ranks_per_node()
        if cfg.training.batch_size % world:
            raise ConfigError(f"training.batch_size: {cfg.training.batch_size} does not divide among the {world} "
                              "ranks of a data-parallel unit (resources.nodes x resources.tasks_per_node, or one "
                              f"task per GPU); use a multiple of {world}")
        if cfg.model.dropout:
            raise ConfigError("model.dropout: dropout masks are drawn per rank, so a data-parallel run would depend "
                              "on the world size; use model.dropout = 0 with runtime.distributed")
    if imp is not None:
        check_method(cfg)  # training methods IMP cannot train
    if "instability" in grid.stages or (imp is not None and (imp.rewind == "auto" or imp.instability)):
        check_alignment_method(cfg, sweep)
    sweeps = "instability" in grid.stages or (imp is not None and imp.rewind == "auto")
    if sweeps and INDEPENDENT not in sweep.rewind_points and \
            not checkpoint_points(sweep.rewind_points or cfg.training.rewind_points):
        raise ConfigError("instability.rewind_points: no rewind points to sweep; give them in the grid's "
                              "[instability] table or as training.rewind_points")


class _Walk:
    """The units of one grid point, added to ``units`` by walking the needs of the stages it asks for."""

    def __init__(self, units: dict[str, Unit], point: dict[str, Any], cfg: Config):
        self.units, self.point, self.cfg = units, point, cfg
        self.contexts: dict[str, tuple[Context, float]] = {}
        self.own_trunk = trunk_dir(cfg).path.name

    def add_all(self, wanted: list[tuple[str, Any, dict[str, Any]]]) -> None:
        for kind, settings, args in wanted:
            self.add(kind, self.cfg, settings, args)

    def context(self, cfg: Config) -> tuple[Context, float]:
        """The context of a run's Config (planned on the CPU: a login node needs no GPU to check settings and
        size the work), and its model's forward FLOPs per example."""
        name = cfg.run_hash()
        if name not in self.contexts:
            # planned in this one process: a data-parallel unit's ranks join their process group when it runs
            ctx = prepare(cfg.with_overrides({"runtime.device": "cpu", "runtime.distributed": "false"}))
            self.contexts[name] = ctx, flops_per_example(ctx)
        return self.contexts[name]

    def add(self, kind: str, cfg: Config, settings: Any, args: dict[str, Any]) -> str:
        """The unit of one run (and, first, of every run it needs); its id."""
        stage = GRID_STAGES[kind]
        ctx, flops = self.context(cfg)
        unit_id = stage_dir(stage, ctx, settings, **args).path.name
        if kind != TRAIN and unit_id in self.units:
            return unit_id  # the same run, needed again: its needs are the same too
        deps: list[str] = []
        for need in stage.needs(ctx, settings, **args):
            dep = self.add(need.kind, replace(need.cfg, runtime=cfg.runtime), need.settings, dict(need.args))
            if dep not in deps:
                deps.append(dep)
        shipped = unit_args(settings, args)
        if kind == TRAIN:
            shipped["extra_checkpoints"] = sorted(shipped.get("extra_checkpoints", ()))
            if unit_id != self.own_trunk:  # another seed's network of this point (its independent point)
                shipped["independent_of"] = self.own_trunk
        iterations, cost = unit_cost(kind, ctx, flops, settings, args)
        self._put(Unit(unit_id, kind, self.point, cfg.to_dict(), shipped, deps, iterations, cost))
        return unit_id

    def _put(self, unit: Unit) -> None:
        old = self.units.get(unit.id)
        if old is None:
            self.units[unit.id] = unit
        elif unit.kind == TRAIN:
            # one trunk can be a point's own and another point's independent network: one unit that
            # keeps every checkpoint either asks for, and counts as the point's own trunk
            own = old if "independent_of" not in old.args else unit
            extra = sorted(set(old.args["extra_checkpoints"]) | set(unit.args["extra_checkpoints"]))
            self.units[unit.id] = replace(own, args={**own.args, "extra_checkpoints": extra})
