"""How a run trains its weights: the training methods, one registry of them, and the settings they own.

``METHODS`` maps ``training.method`` to its ``Method`` (``base``): ``standard`` (every weight trains),
``edgepopup`` and ``supermask`` (strong tickets: scores over frozen weights, ``strong``), ``neq`` (neurons
at equilibrium skip their updates, ``neq``). An unknown name is a ConfigError naming ``training.method``
and the registered names. The stages ask a method what it can do (``method_of(cfg).trains_weights``,
``.accepts_masks``) instead of testing its name; ``names_with`` lists the methods that can, for messages.

Adding a method is one new file and one entry in ``METHODS`` below. A file ``methods/mine.py``::

    from .base import Method

    class Mine(Method):
        name = "mine"
        trains = "trains ..."           # how messages describe it: "mine trains ..."
        accepts_masks = False           # the flags it does not share with plain training

        def hooks(self, run, rundir, first, n):
            return MineHooks(run, rundir, first, n)  # a TrainHooks; or override build / check / summary

    MINE = Mine()

and its entry here: ``from .mine import MINE`` and ``MINE`` in the tuple below. The drivers, the
stages' refusals and the settings checks then take it as they are. A method with settings of its own also
gives them a section (a frozen dataclass in ``config.SECTIONS`` and a field of ``Config``), names it in
``section`` and checks its values in ``validate``; ``validate_run`` refuses that section changed under any
other method. A plugin (``runtime.plugins``) may instead call ``METHODS.register("mine", Mine())``.
"""
from __future__ import annotations

from ..config import Config, validate
from ..errors import ConfigError
from ..registry import Registry
from .base import Method, changed_settings
from .neq import NEQ
from .standard import STANDARD
from .strong import EDGEPOPUP, SUPERMASK

__all__ = ["METHODS", "method_of", "names_with", "validate_run"]

METHODS: Registry[Method] = Registry("method", "training.method",
                                     {m.name: m for m in (STANDARD, EDGEPOPUP, SUPERMASK, NEQ)})


def method_of(cfg: Config) -> Method:
    """The method a run of ``cfg`` trains with (ConfigError naming ``training.method`` when unknown)."""
    return METHODS[cfg.training.method]


def names_with(flag: str, value: bool = True) -> list[str]:
    """Names of the registered methods whose capability ``flag`` is ``value``, in registry order."""
    return [name for name, m in METHODS.items() if getattr(m, flag) == value]


def validate_run(cfg: Config) -> Config:
    """Every setting of a run: ``config.validate``, the method's name, each method's section set only with
    that method, and the values of the run's own method's section."""
    validate(cfg)
    method = method_of(cfg)
    for section in dict.fromkeys(m.section for m in METHODS.values() if m.section):
        changed = changed_settings(getattr(cfg, section))
        if changed and section != method.section:
            owners = " or ".join(name for name, m in METHODS.items() if m.section == section)
            which = f" = {owners}" if " or " not in owners else ""
            raise ConfigError(f"{section}.{changed[0]}: applies only with training.method = {owners}, not "
                              f"{method.name!r}; set training.method{which} or leave [{section}] at its defaults")
    method.validate(cfg)
    return cfg
