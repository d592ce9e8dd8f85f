"""State-dict files trained elsewhere, measured like the suite's own runs.

A file (``.pt``/``.pth``/``.bin``, ``.safetensors``, a Lightning ``.ckpt``; see ``store.statefiles``) holds a
network's weights but neither its architecture nor its data: those come from the ``[model]`` and ``[dataset]``
settings (``--model``, ``--stem``, ``--dataset`` on the command line). ``connect_files`` measures the curve
between two files with ``connect``'s core, ``hessian_file`` probes one file's Hessian as the run-based probe does.

Runs are named by the files' tensor digests (``short_digest``), never by their paths: a moved or renamed file
finds its record again, and a file holding the weights of a ``train_<hash>`` run names the same ``connect`` run as
that run does. Bad input (a file that would run code, another architecture, missing keys) is refused before
anything is written.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..config import Config, settings_hash
from ..errors import ConfigError
from ..hessian import HessianSettings, probe
from ..store.files import RunDir, read_record, read_table, short_digest, write_csv, write_json
from ..store.schema import DENSITY_TABLE, HESSIAN, HESSIAN_SUMMARY, HESSIAN_TABLE
from ..store.statefiles import match_state, read_state_file
from .base import run_once, settings_key
from .connect import ConnectResult, ConnectSettings, Network, connect_key, connect_networks
from .context import Context, prepare
from .landscape import HessianTrack, _check_dim, _probe_rows

# What a file's measurement reads: its architecture, its data, and where to run and write.
FILE_SECTIONS = ("model", "dataset", "runtime")
POINT = "network"  # the column of hessian.csv that names the probed network (``sha256:<short digest>``)


def file_config(overrides: Mapping[str, Any]) -> Config:
    """The settings a state-dict file is measured under: the defaults with ``overrides`` (``{"model.name": ...}``)
    of the ``[model]``, ``[dataset]`` and ``[runtime]`` sections; a training setting is refused (a file's weights
    are given, not trained here)."""
    for key in overrides:
        if key.partition(".")[0] not in FILE_SECTIONS:
            raise ConfigError(f"{key}: a checkpoint file is measured under [model], [dataset] and [runtime] settings "
                              "only; its weights were trained elsewhere")
    return Config().with_overrides(dict(overrides))


def read_network(path: str | Path, ctx: Context, what: str) -> Network:
    """The weights of a state-dict file, checked against ``ctx``'s architecture (ConfigError naming the file and the
    first offending key)."""
    state = match_state(read_state_file(path), ctx.model.state_dict(), f"{what} ({path})")
    return Network(ctx.cfg, state, None, str(path))


def data_key(cfg: Config) -> dict[str, Any]:
    """The dataset's settings that change the measured splits (the held-out size, the split's seed) when not at
    their defaults: files carry no run whose hash would name them."""
    data = settings_key(cfg.dataset, drop=("name", "augment"))
    return {"data": data} if data else {}


def _record(cfg: Config) -> dict[str, Any]:
    return {"model": asdict(cfg.model), "dataset": asdict(cfg.dataset)}


def connect_files(path_a: str | Path, path_b: str | Path, cfg: Config,
                  settings: ConnectSettings | None = None) -> ConnectResult:
    """The interpolation curve and barrier from the network in file A to the one in file B, both of ``cfg.model``'s
    architecture, on ``cfg.dataset``; recorded under ``cfg.runtime.results_root`` (a finished record is reused)."""
    settings = (settings or ConnectSettings()).validate()
    t0 = time.perf_counter()
    ctx = prepare(cfg)
    a, b = read_network(path_a, ctx, "A"), read_network(path_b, ctx, "B")
    key = {**connect_key(a, b, settings), **data_key(cfg)}
    return connect_networks(ctx, settings, a, b, t0, key=key, record=_record(cfg))


def file_hessian_key(state_digest: str | None, cfg: Config, settings: HessianSettings) -> dict[str, Any]:
    """What names the Hessian probe of a file: its tensors' digest, the architecture, the data and the settings."""
    return {"network": state_digest, "model": settings_key(cfg.model, legacy="connect.model"),
            "dataset": cfg.dataset.name, **data_key(cfg), "hessian": settings_key(settings, legacy=HESSIAN)}


def hessian_file(path: str | Path, cfg: Config, settings: HessianSettings) -> HessianTrack:
    """Top eigenvalues, trace and density of the Hessian of the network in a state-dict file, on the seeded subset
    of ``cfg.dataset``'s training split that the run-based probe uses; recorded (or reused) like a Hessian track."""
    ctx = prepare(cfg)
    _check_dim(ctx, settings)
    net = read_network(path, ctx, "CHECKPOINT")
    digest = short_digest(net.state)
    key = file_hessian_key(digest, cfg, settings)
    point = {POINT: f"sha256:{digest}"}

    def load(run: RunDir) -> HessianTrack | None:
        rows = read_table(run, HESSIAN_TABLE, [POINT])
        density = read_table(run, DENSITY_TABLE, [POINT]) if settings.density else []
        if read_record(run / HESSIAN_SUMMARY) is None or not rows or density is None:
            return None
        return HessianTrack(run.path, rows, density)

    def compute(run: RunDir, _: None) -> HessianTrack:
        t0 = time.perf_counter()
        model = ctx.new_model()
        model.load_state_dict(net.state)
        row, density = _probe_rows(point, probe(model, ctx.data.x_train, ctx.data.y_train, settings))
        if density:
            write_csv(run / DENSITY_TABLE, density)
        write_csv(run / HESSIAN_TABLE, [row])
        write_json(run / HESSIAN_SUMMARY, {"settings": asdict(settings), "target": "file", "file": str(path),
                                           **point, "points": 1, "seconds": round(time.perf_counter() - t0, 3),
                                           **_record(cfg)})
        return HessianTrack(run.path, [row], density)

    run = RunDir(cfg.runtime.results_root, HESSIAN, settings_hash(key))
    return run_once(run, load=load, compute=compute, accept_other_versions=cfg.runtime.accept_other_versions,
                    start=lambda r: r.start({**_record(cfg), "hessian": asdict(settings), "file": str(path)}, key,
                                            {"target": "file"}))


__all__ = ["FILE_SECTIONS", "connect_files", "data_key", "file_config", "file_hessian_key", "hessian_file",
           "read_network"]
