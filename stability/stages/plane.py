"""``stability landscape``: loss-landscape planes of the suite's runs and of state-dict files, recorded and resumable.

What a plane goes through (``plane.kind``):

- ``siblings`` (default): siblings 0 and 1 of a rewind step k and the trunk (its weights at k with ``anchor =
  rewind``, at the final step with ``anchor = final``): sibling 0 at (0, 0), sibling 1 on the u axis, so the
  straight line between the siblings, whose barrier is the instability, lies along v = 0;
- ``networks``: any three finished runs (``train_<hash>``, IMP levels) or state-dict files, A at (0, 0), B on the
  u axis;
- ``random``: around one network (a run's final weights, or a file) along two filter-normalized Gaussian
  directions (Li et al. 2018), seeded;
- ``pca``: around the trunk's final weights along the top two PCA directions of its saved checkpoints (or of
  state-dict files in trajectory order, the last the centre), with the trajectory projected on the plane.

Records (``results_root/plane_<hash>/``): ``plane.csv`` (split, u, v, error, loss: one row per grid point and
split) and ``plane.json`` (the networks' coordinates and their own error and loss there, the axes, the trajectory,
chance errors). A plane is named by its networks' tensor digests, the architecture, the data and its settings
(``settings_key``): a finished plane is reused. The grid is measured a few rows at a time, each chunk written as it
is finished, so a killed plane resumes after its last finished chunk and ends with the same records.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import Tensor

from ..config import Config, settings_from_table, settings_hash
from ..engine import StackedModel
from ..errors import ConfigError
from ..lmc.plane import PLANE_BN, PlaneGeometry, evaluate_points, plane_geometry
from ..maths.health import DEFAULT_CHANCE_MARGIN, chance_error, is_untrained
from ..maths.interpolation import CurveSettings, seeded_bn_batches
from ..maths.paths import Batches
from ..steps import format_step, to_iterations
from ..store.files import RunDir, read_record, read_table, short_digest, write_csv, write_json
from ..store.schema import PLANE, PLANE_COLUMNS, PLANE_SUMMARY, PLANE_TABLE
from .base import run_once, settings_key
from .checkpoints import saved_checkpoints
from .connect import Network, load_network
from .context import Context, prepare
from .external import data_key, read_network
from .instability import SPLITS
from .siblings import SiblingSettings, train_siblings
from .trunk import train_trunk, trunk_checkpoint, trunk_dir

PLANE_KINDS = ("siblings", "networks", "random", "pca")
ANCHORS = ("rewind", "final")
BIASBN = ("zero", "keep")
CHUNK_MEMBERS = 64  # grid points per chunk (whole rows): written when measured, the unit of resume


@dataclass(frozen=True)
class PlaneSettings:
    """How a plane is drawn and measured (the ``[plane]`` table; ``--set plane.KEY=VALUE``)."""

    kind: str = "siblings"  # siblings | networks | random | pca
    grid: int = 21  # grid points along u (and along v unless grid_v)
    grid_v: int = 0  # grid points along v (0: as grid)
    margin: float = 0.2  # the grid spans the networks' bounding box widened by this fraction of its span per side
    range_u: tuple[float, ...] = ()  # (low, high) instead of the margin's (a random plane: default -1, 1)
    range_v: tuple[float, ...] = ()
    splits: tuple[str, ...] = ("test",)
    bn: str = "interpolate"  # interpolate | reset (BatchNorm statistics recomputed at every grid point)
    bn_batches: int = 20  # training batches for bn = reset (seeded, as sweeps use)
    seed: int = 0  # random directions
    biasbn: str = "zero"  # random directions' biases and BatchNorm parameters: zero | keep (the network's)
    anchor: str = "rewind"  # siblings: the trunk at the rewind step | at the final step

    def validate(self) -> PlaneSettings:
        """Check every field; errors name ``plane.<field>``."""
        for name, value, allowed in (("kind", self.kind, PLANE_KINDS), ("bn", self.bn, PLANE_BN),
                                     ("biasbn", self.biasbn, BIASBN), ("anchor", self.anchor, ANCHORS)):
            if value not in allowed:
                raise ConfigError(f"plane.{name}: unknown value {value!r}; choose one of {', '.join(allowed)}")
        if self.grid < 2 or (self.grid_v != 0 and self.grid_v < 2):
            raise ConfigError(f"plane.grid: need at least 2 grid points per axis, got {self.grid} x "
                              f"{self.grid_v or self.grid}")
        if self.margin < 0:
            raise ConfigError(f"plane.margin: must be >= 0 (a fraction of the span on each side), got {self.margin}")
        for name, pair in (("range_u", self.range_u), ("range_v", self.range_v)):
            if pair and (len(pair) != 2 or not pair[0] < pair[1]):
                raise ConfigError(f"plane.{name}: expected two increasing numbers LOW,HIGH, got {list(pair)}")
        if not self.splits or any(s not in SPLITS for s in self.splits):
            raise ConfigError(f"plane.splits: unknown split in {list(self.splits)}; choose from {', '.join(SPLITS)}")
        if self.bn_batches < 1:
            raise ConfigError(f"plane.bn_batches: must be at least 1, got {self.bn_batches}")
        return self

    @property
    def counts(self) -> tuple[int, int]:
        return self.grid, self.grid_v or self.grid

    @property
    def ranges(self) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
        return self.range_u or None, self.range_v or None


def plane_settings(table: Mapping[str, Any] | None = None, **overrides: Any) -> PlaneSettings:
    """Settings from a ``[plane]`` table and keyword overrides (None = not given), with clear errors."""
    return settings_from_table(PlaneSettings, "plane", table, **overrides)


@dataclass
class PlaneResult:
    """A measured plane: its records' rows (split, u, v, error, loss) and ``plane.json``."""

    run_dir: Path
    rows: list[dict[str, Any]] = field(repr=False)
    summary: dict[str, Any] = field(repr=False)

    def dataframe(self):
        """plane.csv as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.rows, columns=PLANE_COLUMNS)


def plane_key(cfg: Config, settings: PlaneSettings, states: Sequence[Mapping[str, Tensor]]) -> dict[str, Any]:
    """What names a plane: its networks' contents (in order), the architecture, the data and the settings."""
    return {"networks": [short_digest(s) for s in states], "model": settings_key(cfg.model),
            "dataset": cfg.dataset.name, **data_key(cfg), **settings_key(settings)}


def _geometry(ctx: Context, settings: PlaneSettings, states: Sequence[Mapping[str, Tensor]],
              labels: Sequence[str]) -> PlaneGeometry:
    sm = StackedModel(ctx.model)
    states = [{k: v.to(ctx.device) for k, v in s.items()} for s in states]
    kind = settings.kind
    common = {"grid": settings.counts, "margin": settings.margin, "ranges": settings.ranges, "labels": labels}
    if kind in ("siblings", "networks"):
        if len(states) != 3:
            raise ConfigError(f"plane.kind {kind}: a plane through networks needs three, got {len(states)}")
        return plane_geometry(states, sm.param_names, **common)
    if kind == "random":
        return plane_geometry(states[-1:], sm.param_names, directions="random", seed=settings.seed,
                              ignore="biasbn" if settings.biasbn == "zero" else None, **common)
    return plane_geometry(states[-1:], sm.param_names, directions="pca", trajectory=states, **common)


def measure_plane(ctx: Context, settings: PlaneSettings, states: Sequence[Mapping[str, Tensor]],
                  labels: Sequence[str], *, sources: Mapping[str, str], record: Mapping[str, Any] | None = None,
                  info: Mapping[str, Any] | None = None) -> PlaneResult:
    """The plane of checked networks of ``ctx``'s architecture (``states``: three networks, the centre of a random
    plane, or a trajectory ending at its centre), recorded under ``ctx``'s results root or reused.

    ``labels``: the networks' names (the centre's for random and PCA planes); ``sources``: where each came from;
    ``record``: the manifest's config; ``info``: more for ``plane.json`` (e.g. the rewind step).
    """
    settings.validate()
    geometry = _geometry(ctx, settings, states, labels)  # bad networks (one line, too few) fail before any write
    key = plane_key(ctx.cfg, settings, states)
    nu, nv = len(geometry.u), len(geometry.v)

    def load(run: RunDir) -> PlaneResult | None:
        summary, rows = read_record(run / PLANE_SUMMARY), read_table(run, PLANE_TABLE, PLANE_COLUMNS)
        if summary is None or rows is None or len(rows) != nu * nv * len(settings.splits):
            return None
        return PlaneResult(run.path, rows, summary)

    def compute(run: RunDir, _: None) -> PlaneResult:
        t0 = time.perf_counter()
        sm = StackedModel(ctx.model)
        bn = seeded_bn_batches(ctx.data.x_train, CurveSettings(bn="reset", bn_batches=settings.bn_batches)) \
            if settings.bn == "reset" else None
        done = _finished_rows(run, geometry, settings.splits)
        chunk = max(1, CHUNK_MEMBERS // nu)
        at_networks, chance = {}, {}
        for split in settings.splits:
            x, y = ctx.data.split(split)
            batches = Batches((x, y), ctx.cfg.runtime.eval_batch_size)
            chance[split] = chance_error(y)
            for start in range(0, nv, chunk):
                rows = range(start, min(nv, start + chunk))
                if all((split, j) in done for j in rows):
                    continue
                us, vs = geometry.rows(rows)
                losses, errors = evaluate_points(sm, geometry, us, vs, batches, bn=settings.bn, bn_batches=bn)
                for m, j in enumerate(j for j in rows for _ in range(nu)):
                    done.setdefault((split, j), []).append({"split": split, "u": us[m], "v": vs[m],
                                                            "error": errors[m], "loss": losses[m]})
                write_csv(run / PLANE_TABLE, _ordered(done, settings.splits, nv), PLANE_COLUMNS)
            points = list(geometry.networks.values())
            losses, errors = evaluate_points(sm, geometry, [p[0] for p in points], [p[1] for p in points], batches,
                                             bn=settings.bn, bn_batches=bn)
            at_networks[split] = {n: {"error": e, "loss": lo} for n, e, lo in zip(geometry.networks, errors, losses)}
        rows = _ordered(done, settings.splits, nv)
        untrained = [s for s in settings.splits
                     if any(is_untrained(v["error"], chance[s], DEFAULT_CHANCE_MARGIN) for v in at_networks[s].values())]
        summary = {"kind": settings.kind, "networks": {n: list(p) for n, p in geometry.networks.items()},
                   "sources": dict(sources), "line": list(geometry.networks)[:2] if len(geometry.networks) >= 2 else None,
                   "at_networks": at_networks, "u": geometry.u, "v": geometry.v, "grid": [nu, nv],
                   "trajectory": [list(p) for p in geometry.trajectory], "explained": geometry.explained,
                   "chance": chance, "chance_margin": DEFAULT_CHANCE_MARGIN, "untrained": untrained,
                   "settings": asdict(settings), "batchnorm": bool(sm.buffer_names), **dict(info or {}),
                   "seconds": round(time.perf_counter() - t0, 3)}
        write_csv(run / PLANE_TABLE, rows, PLANE_COLUMNS)
        write_json(run / PLANE_SUMMARY, summary)
        return PlaneResult(run.path, rows, summary)

    run = RunDir(ctx.cfg.runtime.results_root, PLANE, settings_hash(key))
    return run_once(run, load=load, compute=compute, accept_other_versions=ctx.cfg.runtime.accept_other_versions,
                    start=lambda r: r.start({**dict(record or {}), "plane": asdict(settings)}, key,
                                            {"plane_kind": settings.kind}), again="measuring the missing rows")


def _finished_rows(run: RunDir, geometry: PlaneGeometry, splits: Sequence[str]) -> dict[tuple[str, int], list]:
    """The rows an earlier, killed measurement of this plane wrote: {(split, row index): its nu rows}, only rows
    that are whole and on this grid."""
    rows = read_table(run, PLANE_TABLE, PLANE_COLUMNS) or []
    by_v = {v: j for j, v in enumerate(geometry.v)}
    found: dict[tuple[str, int], list] = {}
    for r in rows:
        if r["split"] in splits and r["v"] in by_v:
            found.setdefault((r["split"], by_v[r["v"]]), []).append(r)
    return {k: rs for k, rs in found.items() if [r["u"] for r in rs] == geometry.u}


def _ordered(done: Mapping[tuple[str, int], list], splits: Sequence[str], nv: int) -> list[dict[str, Any]]:
    return [r for s in splits for j in range(nv) for r in done.get((s, j), [])]


# ---------------------------------------------------------------- what a plane goes through
def _run_record(cfg: Config) -> dict[str, Any]:
    return {"training": cfg.to_dict()}


def plane_siblings(cfg: Config, settings: PlaneSettings, rewind_step: int | str = 0, *,
                   siblings: SiblingSettings | None = None, ctx: Context | None = None) -> PlaneResult:
    """The plane through siblings 0 and 1 of ``rewind_step`` and the trunk (at that step, or at the end with
    ``anchor = final``); the trunk and siblings are trained first when missing."""
    settings = replace(settings.validate(), kind="siblings")
    ctx = ctx or prepare(cfg)
    step = to_iterations(rewind_step, ctx.ipe, "landscape --rewind") if isinstance(rewind_step, str) else rewind_step
    if not 0 <= step < ctx.total_steps:
        raise ConfigError(f"landscape --rewind: step {step} must be before the final step {ctx.total_steps}")
    sib = train_siblings(ctx, step, siblings or SiblingSettings())
    at = step if settings.anchor == "rewind" else ctx.total_steps
    trunk = trunk_checkpoint(ctx, at).member_state_dict(0)
    states = [sib.members.member_state_dict(0), sib.members.member_state_dict(1), trunk]
    labels = ["sibling 0", "sibling 1", f"trunk @{format_step(at)}"]
    sources = {labels[0]: f"{sib.run_dir} member 0", labels[1]: f"{sib.run_dir} member 1",
               labels[2]: f"{trunk_dir(cfg).path} step {at}"}
    return measure_plane(ctx, settings, states, labels, sources=sources, record=_run_record(cfg),
                         info={"rewind_step": step})


def plane_trajectory(cfg: Config, settings: PlaneSettings, *, ctx: Context | None = None) -> PlaneResult:
    """The plane of the top two PCA directions of the trunk's saved checkpoints, around its final weights."""
    settings = replace(settings.validate(), kind="pca")
    ctx = ctx or prepare(cfg)
    train_trunk(cfg, ctx=ctx)
    run = trunk_dir(cfg)
    steps = saved_checkpoints(run)
    states = [trunk_checkpoint(ctx, s).member_state_dict(0) for s in steps]  # damaged ones replayed
    label = f"trunk @{format_step(ctx.total_steps)}"
    return measure_plane(ctx, settings, states, [label], sources={label: str(run.path)}, record=_run_record(cfg),
                         info={"trajectory_steps": steps})


def plane_random(cfg: Config, settings: PlaneSettings, *, ctx: Context | None = None) -> PlaneResult:
    """The random plane around the trunk's final weights (trained first when missing)."""
    settings = replace(settings.validate(), kind="random")
    ctx = ctx or prepare(cfg)
    label = f"trunk @{format_step(ctx.total_steps)}"
    state = trunk_checkpoint(ctx, ctx.total_steps).member_state_dict(0)
    return measure_plane(ctx, settings, [state], [label], sources={label: str(trunk_dir(cfg).path)},
                         record=_run_record(cfg))


def _names(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)] if n <= 3 else [f"point {i}" for i in range(n)]


def plane_runs(paths: Sequence[str | Path], settings: PlaneSettings, *,
               runtime: Mapping[str, Any] | None = None) -> PlaneResult:
    """The plane through three finished runs (``kind = networks``), or around one (``kind = random``).

    ``runtime``: ``{"runtime.KEY": value}`` overrides (``runtime.results_root``: where the record goes; default the
    first run's results root)."""
    settings.validate()
    count = {"networks": 3, "random": 1}.get(settings.kind)
    if count is None or len(paths) != count:
        raise ConfigError(f"landscape: runs give a plane through three networks (plane.kind networks) or around one "
                          f"(plane.kind random); got {len(paths)} with plane.kind {settings.kind}")
    runtime = dict(runtime or {})
    bad = [k for k in runtime if not k.startswith("runtime.")]
    if bad:
        raise ConfigError(f"--set {bad[0]}: a run directory carries its own settings; only [runtime] ones apply")
    root = runtime.pop("runtime.results_root", None)
    nets: list[Network] = [load_network(p, root) for p in paths]
    for net in nets[1:]:
        for section in ("model", "dataset"):
            if getattr(net.cfg, section) != getattr(nets[0].cfg, section):
                raise ConfigError(f"RUN: {net.source} differs from {nets[0].source} in [{section}]; only networks of "
                                  "the same architecture on the same data span a plane")
    labels = _names(len(nets))
    return measure_plane(prepare(nets[0].cfg.with_overrides(runtime)), settings, [n.state for n in nets], labels[-1:] if count == 1 else labels,
                         sources={lab: n.source for lab, n in zip(labels, nets)}, record=_run_record(nets[0].cfg))


def plane_files(paths: Sequence[str | Path], cfg: Config, settings: PlaneSettings) -> PlaneResult:
    """The plane of state-dict files of ``cfg.model``'s architecture on ``cfg.dataset``: through three (``kind =
    networks``), around one (``random``), or along the PCA directions of several in trajectory order (``pca``)."""
    settings.validate()
    wanted = {"networks": len(paths) == 3, "random": len(paths) == 1, "pca": len(paths) >= 3}.get(settings.kind)
    if not wanted:
        raise ConfigError(f"landscape: files give a plane through three networks (plane.kind networks), around one "
                          f"(random) or along a trajectory of three or more (pca); got {len(paths)} with plane.kind "
                          f"{settings.kind}")
    ctx = prepare(cfg)
    labels = _names(len(paths)) if settings.kind != "pca" else [f"point {i}" for i in range(len(paths))]
    nets = [read_network(p, ctx, lab) for p, lab in zip(paths, labels)]
    states = [n.state for n in nets]
    shown = labels if settings.kind == "networks" else labels[-1:]
    return measure_plane(ctx, settings, states, shown, sources={lab: str(p) for lab, p in zip(labels, paths)},
                         record={"model": asdict(cfg.model), "dataset": asdict(cfg.dataset)})


__all__ = ["ANCHORS", "BIASBN", "PLANE_KINDS", "PlaneResult", "PlaneSettings", "measure_plane", "plane_files",
           "plane_key", "plane_random", "plane_runs", "plane_settings", "plane_siblings", "plane_trajectory"]
