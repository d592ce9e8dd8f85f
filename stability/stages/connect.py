"""``stability connect``: the interpolation barrier between any two trained networks, aligned or not.

A network is a finished trunk run (``train_<hash>``: its final weights) or a level of an IMP run
(``imp_<hash>/replicate_<r>/level_<l>``: the IMP ticket trained at that level, with its mask). The two
must share the architecture and the dataset. Sparse networks are compared with their masks: aligning
two networks whose masks differ is refused unless asked for (``allow_different_masks``), since the
interpolated network then has neither network's sparsity pattern. State-dict files trained elsewhere are
connected by ``stages.external.connect_files`` through the same core (``connect_networks``).

Results (in ``results_root/connect_<hash>/``): ``curves.csv`` (pair ``a-b``) and ``connect.json``; with
``connect.layers``, ``layers.csv`` (the layer-wise barriers, ``stages.layerwise``).
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import Config, from_dict, settings_from_table, settings_hash
from ..config.nested import flat_settings
from ..engine import Members, StackedModel
from ..engine.precision import eval_precision_key
from ..errors import ConfigError
from ..maths.health import DEFAULT_CHANCE_MARGIN, chance_error
from ..maths.interpolation import CurveSettings, curve_rows
from ..maths.sweep import flag_curves, pair_barriers
from ..methods import method_of, names_with
from ..store.files import (
    RunDir,
    load_tensors,
    read_record,
    read_table,
    short_digest,
    write_csv,
    write_json,
)
from ..store.schema import (
    CONNECT,
    CONNECT_SUMMARY,
    CURVE_COLUMNS,
    CURVES,
    FINAL_STATE,
    IMP,
    LAYER_COLUMNS,
    LAYERS_TABLE,
    MANIFEST,
    TRAIN,
    mask_name,
)
from .base import Need, run_once, settings_key
from .checkpoints import load_members, load_weights
from .context import Context, prepare
from .instability import SPLITS
from .layerwise import check_layers, layer_rows


@dataclass(frozen=True)
class ConnectSettings:
    """How the path between the two networks is measured (the ``connect`` table names the curve's settings flat:
    ``connect.align``, ``connect.alphas``; see ``config.nested``)."""

    curve: CurveSettings = field(default_factory=CurveSettings)
    splits: tuple[str, ...] = ("test",)
    allow_different_masks: bool = False
    layers: bool = False  # also the layer-wise barriers (layers.csv; Adilova et al. 2024)
    layer_groups: str = "layers"  # layers | blocks: what is interpolated at a time (stability.lmc.layers)

    # the flat names in the order records and run keys were written in before the settings were composed
    FLAT_ORDER = ("align", "repair", "alphas", "splits", "bn", "align_examples", "align_seed", "allow_different_masks")

    def validate(self) -> ConnectSettings:
        """Check the settings (the curve's by its own ``validate``)."""
        self.curve.validate(CONNECT)
        if self.layers:
            check_layers(self.layer_groups, self.curve, CONNECT)
        if not self.splits or any(s not in SPLITS for s in self.splits):
            raise ConfigError(f"connect.splits: unknown split in {list(self.splits)}; choose from {', '.join(SPLITS)}")
        return self


def connect_settings(table: Mapping[str, Any] | None = None, **overrides: Any) -> ConnectSettings:
    """Settings from a table and keyword overrides (None = not given), with clear errors."""
    return settings_from_table(ConnectSettings, "connect", table, **overrides)


@dataclass
class Network:
    """One end of the path: its settings, weights, mask (None = dense) and where it came from."""

    cfg: Config
    state: dict[str, Tensor]
    masks: dict[str, Tensor] | None
    source: str


@dataclass
class ConnectResult:
    """Barriers (per split) between two networks, and their curve."""

    run_dir: Path
    barriers: dict[str, float]
    loss_barriers: dict[str, float]
    curves: list[dict[str, Any]] = field(repr=False)
    summary: dict[str, Any] = field(repr=False)
    layers: list[dict[str, Any]] = field(default_factory=list, repr=False)  # layers.csv rows (connect.layers)


def _manifest(path: Path, kind: str) -> dict[str, Any]:
    manifest = read_record(path / MANIFEST)
    if manifest is None or manifest.get("kind") != kind:
        raise ConfigError(f"RUN: {str(path)!r} is not a {kind} run directory (no readable {MANIFEST} of kind {kind!r})")
    if manifest.get("status") != "complete":
        raise ConfigError(f"RUN: {str(path)!r} is not finished (status {manifest.get('status')!r}); run it to the end first")
    return manifest


def load_network(path: str | Path, results_root: str | None = None) -> Network:
    """A finished trunk run directory or an IMP level directory, as a Network (ConfigError otherwise)."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"RUN: {str(path)!r} is not a directory; give a train_<hash> run directory or an "
                          f"imp_<hash>/replicate_<r>/level_<l> directory")
    if path.name.startswith(f"{TRAIN}_"):
        manifest = _manifest(path, TRAIN)
        cfg = from_dict(manifest["config"])
        state = load_weights(path, int(manifest["final_step"]))
        return Network(_rooted(cfg, results_root or str(path.parent)), state, None, str(path))
    imp_dir = path.parent.parent
    if path.name.startswith("level_") and path.parent.name.startswith("replicate_") and imp_dir.name.startswith(f"{IMP}_"):
        manifest = _manifest(imp_dir, IMP)
        cfg = _rooted(from_dict(manifest["config"]["training"]), results_root or str(imp_dir.parent))
        replicate, level = int(path.parent.name.split("_")[1]), int(path.name.split("_")[1])
        ctx = prepare(cfg)
        state = load_members(path / FINAL_STATE, ctx).member_state_dict(0)  # member 0: the IMP ticket
        masks = None
        if level > 0:
            masks, _ = load_tensors(imp_dir / mask_name(replicate, level))
        return Network(cfg, {k: v.cpu() for k, v in state.items()}, masks, str(path))
    raise ConfigError(f"RUN: {str(path)!r} is neither a train_<hash> run directory nor an "
                      f"imp_<hash>/replicate_<r>/level_<l> directory")


def _comparable(section: Any) -> Any:
    return replace(section, dropout=0.0) if hasattr(section, "dropout") else section


def _rooted(cfg: Config, root: str) -> Config:
    return cfg.with_overrides({"runtime.results_root": root})


def _same_masks(a: Mapping[str, Tensor] | None, b: Mapping[str, Tensor] | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.keys() == b.keys() and all(torch.equal(a[k].bool(), b[k].bool()) for k in a)


def connect_key(a: Network, b: Network, settings: ConnectSettings) -> dict[str, Any]:
    """What names a connect run: both networks' and masks' contents, the architecture, the dataset and the settings
    (allowing different masks only lets a run happen: it names nothing)."""
    return {"a": short_digest(a.state), "b": short_digest(b.state),
            "masks": [short_digest(a.masks), short_digest(b.masks)],
            "model": settings_key(a.cfg.model, legacy="connect.model"), "dataset": a.cfg.dataset.name,
            **settings_key(settings, drop=("allow_different_masks", *(() if settings.layers else ("layer_groups",))),
                           legacy=CONNECT), **eval_precision_key(a.cfg.runtime)}


def connect(path_a: str | Path, path_b: str | Path, settings: ConnectSettings = ConnectSettings(), *,
            results_root: str | None = None) -> ConnectResult:
    """The interpolation curve and barrier from network A to network B (B aligned to A when asked).

    A finished connect run of the same two networks (by contents) and settings is reused, its records as written.
    """
    settings.validate()
    t0 = time.perf_counter()
    a, b = load_network(path_a, results_root), load_network(path_b, results_root)
    for section in ("model", "dataset"):
        # dropout has no parameters: networks trained with and without it have the same architecture
        if _comparable(getattr(a.cfg, section)) != _comparable(getattr(b.cfg, section)):
            raise ConfigError(f"RUN: the two networks differ in [{section}] ({getattr(a.cfg, section)} vs "
                              f"{getattr(b.cfg, section)}); only networks of the same architecture on the same data connect")
    methods = {a.cfg.training.method, b.cfg.training.method}
    if not (method_of(a.cfg).trains_weights and method_of(b.cfg).trains_weights):
        # strong tickets: only the scores are interpolated, so both must sit on the same frozen weights
        frozen = [k for k in a.state if k.endswith((".weight", ".bias"))]  # buffers in a strong model
        if (len(methods) > 1 or a.cfg.strong != b.cfg.strong or settings.curve.aligned
                or any(k not in b.state or not torch.equal(a.state[k], b.state[k]) for k in frozen)):
            raise ConfigError(f"RUN: strong tickets ({', '.join(names_with('trains_weights', False))}) connect only "
                              "to strong tickets of the same method and [strong] settings over the same frozen "
                              "weights (the same init seed), without alignment or REPAIR; these two differ")
    if settings.curve.align != "none" and not settings.allow_different_masks and not _same_masks(a.masks, b.masks):
        raise ConfigError("connect.align: the two networks have different masks, so the aligned interpolation "
                              "has neither's sparsity pattern; pass --allow-different-masks to align them anyway")
    return connect_networks(prepare(a.cfg), settings, a, b, t0)  # a.cfg: rooted at results_root (when given)


def connect_networks(ctx: Context, settings: ConnectSettings, a: Network, b: Network, t0: float | None = None, *,
                     key: Mapping[str, Any] | None = None, record: Mapping[str, Any] | None = None) -> ConnectResult:
    """The curve between two checked networks of ``ctx``'s architecture and data, recorded (or reused) under the
    name ``key`` hashes to (default ``connect_key``); ``record``: more settings for the manifest's config."""
    t0 = time.perf_counter() if t0 is None else t0
    key = dict(key) if key is not None else connect_key(a, b, settings)
    splits = settings.splits

    def load(run: RunDir) -> ConnectResult | None:
        summary, rows = read_record(run / CONNECT_SUMMARY), read_table(run, CURVES, CURVE_COLUMNS)
        if summary is None or rows is None or any(s not in summary.get("barrier", {}) for s in splits):
            return None
        layers = read_table(run, LAYERS_TABLE, LAYER_COLUMNS) if settings.layers else []
        if layers is None:
            return None
        return ConnectResult(run.path, summary["barrier"], summary["loss_barrier"], rows, summary, layers)

    def compute(run: RunDir, _: None) -> ConnectResult:
        sm = StackedModel(ctx.model).configure_evaluation(ctx.cfg.runtime)  # runtime.eval_precision of the curves
        curve_settings = replace(settings.curve, eval_batch_size=ctx.cfg.runtime.eval_batch_size)
        # the two networks as the two members of a sweep point: measured as a sweep measures its siblings
        members = Members.from_model_states([a.state, b.state], sm.param_names, 0, [0, 0], [0, 0], ctx.device)
        rows = curve_rows(sm, members, splits, ctx.data, curve_settings, rewind_step="")
        for row in rows:
            row["pair"] = "a-b"
        flag_curves(rows, {s: chance_error(ctx.data.split(s)[1]) for s in splits}, DEFAULT_CHANCE_MARGIN)
        untrained = [s for s in splits if any(r["flag"] for r in rows if r["split"] == s)]
        by_pair = pair_barriers(rows)
        barriers = {s: by_pair["", s, "a-b"][0] for s in splits}
        loss_barriers = {s: by_pair["", s, "a-b"][1] for s in splits}
        summary = {"a": a.source, "b": b.source, "settings": flat_settings(settings), "alignment":
                   curve_settings.alignment(), "barrier": barriers,
                   "loss_barrier": loss_barriers, "untrained": untrained, "sparse": a.masks is not None,
                   "seconds": round(time.perf_counter() - t0, 3)}
        layers = []
        if settings.layers:
            layers = layer_rows(ctx, a.state, b.state, curve_settings, splits, settings.layer_groups, sm=sm)
            write_csv(run / LAYERS_TABLE, layers, LAYER_COLUMNS)
        write_csv(run / CURVES, rows, CURVE_COLUMNS)
        write_json(run / CONNECT_SUMMARY, summary)
        return ConnectResult(run.path, barriers, loss_barriers, rows, summary, layers)

    run = RunDir(ctx.cfg.runtime.results_root, CONNECT, settings_hash(key))
    return run_once(run, load=load, compute=compute, accept_other_versions=ctx.cfg.runtime.accept_other_versions,
                    start=lambda r: r.start({"connect": flat_settings(settings), "a": a.source, "b": b.source,
                                            **(record or {})}, key, {}))


class ConnectStage:
    """``connect`` as a stage: args ``a`` and ``b``, the two checked Networks (``connect`` loads and checks them);
    ``ctx`` is their shared architecture's and dataset's. It needs no run made first: both are finished runs."""

    name = CONNECT
    settings = ConnectSettings

    def key(self, ctx: Context, settings: ConnectSettings, *, a: Network, b: Network) -> dict[str, Any]:
        return connect_key(a, b, settings)

    def needs(self, ctx: Context, settings: ConnectSettings, *, a: Network, b: Network) -> list[Need]:
        return []

    def run(self, ctx: Context, settings: ConnectSettings, *, a: Network, b: Network) -> ConnectResult:
        return connect_networks(ctx, settings, a, b)


CONNECT_STAGE = ConnectStage()


__all__ = ["CONNECT_STAGE", "ConnectResult", "ConnectSettings", "Network", "connect", "connect_key", "connect_networks",
           "connect_settings", "load_network"]
