"""What names an IMP run, and where it lives: ``results_root/imp_<hash>/``. These names must never change
(tests/test_hashes.py pins them)."""
from __future__ import annotations

from typing import Any

from ...config import Config, settings_hash
from ...store.files import RunDir
from ...store.schema import IMP
from ..base import settings_key
from ..instability import InstabilitySettings, instability_settings_key
from .masks import MaskSource, mask_source
from .settings import ImpSettings


def imp_key(cfg: Config, settings: ImpSettings, sweep: InstabilitySettings,
            source: MaskSource | None = None) -> dict[str, Any]:
    """The settings that name an IMP run (its hash is ``settings_hash`` of this, recorded in its manifest).

    ``source``: the masks of ``imp.mask_from`` when already read (else they are read here for their digest)."""
    # chance margins only classify results: they do not name the run
    imp = settings_key(settings, drop=("chance_margin",), legacy="imp")
    if settings.mask_from:  # named by the masks' contents, not by where they are
        imp["mask_from"] = (source or mask_source(settings)).digest
    key = {"trunk": cfg.run_hash(), "imp": imp}
    if settings.rewind == "auto" or settings.instability:
        key["instability"] = instability_settings_key(sweep, ("chance_margin",))
    return key


def imp_dir(cfg: Config, settings: ImpSettings, sweep: InstabilitySettings, source: MaskSource | None = None) -> RunDir:
    """Where the IMP run of these settings lives."""
    return RunDir(cfg.runtime.results_root, IMP, settings_hash(imp_key(cfg, settings, sweep, source)))


__all__ = ["imp_dir", "imp_key"]
