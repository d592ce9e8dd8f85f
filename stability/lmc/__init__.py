"""``stability.lmc``: linear mode connectivity, alignment, Hessians and instability for any network and any data.

The run store is one user of these functions; they take any ``nn.Module`` (or a state dict / checkpoint file with
a template of its architecture) and any data: a ``DataLoader``, an iterable of ``(x, y)`` batches or a pair of
tensors. The data are read batch by batch (nothing needs to fit in memory); within a batch every α of a curve, and
every pair of siblings, is evaluated at once on a stacked axis.

>>> import stability
>>> curve = stability.lmc.interpolate(net_a, net_b, test_loader)          # a Curve: .barrier, .dataframe(), .plot()
>>> aligned_b, perm = stability.lmc.align(net_a, net_b)                   # Git Re-Basin weight matching
>>> stability.lmc.barrier(net_a, aligned_b, test_loader)
>>> stability.lmc.hessian(net_a, train_loader, top_k=3).eigenvalues       # Lanczos over the loader
>>> result = stability.lmc.instability(net, my_train, siblings=2, data=test_loader)  # your own training loop
>>> stability.lmc.sweep({0: ckpt0, 100: ckpt100}, my_train, data=test_loader, template=net).first_stable_step

- ``interpolate``, ``barrier``, ``Curve``, ``align``, ``repair``: ``lmc.curves``;
- ``hessian``, ``instability``, ``Instability``, ``sweep``, ``Sweep``: ``lmc.probes``;
- ``Batches``: the data stream (``maths.paths``); what counts as a network: ``lmc.networks``.
"""
from __future__ import annotations

from ..maths.paths import Batches
from .curves import Curve, align, alpha_grid, barrier, interpolate, repair
from .fit import FittedCurve, fit_curve
from .layers import LayerBarriers, layer_barriers, layer_groups
from .plane import Plane, plane
from .probes import Instability, Sweep, hessian, instability, sweep
from .sharp import Sharpness, sharpness

__all__ = ["Batches", "Curve", "FittedCurve", "Instability", "LayerBarriers", "Plane", "Sharpness", "Sweep", "align",
           "alpha_grid", "barrier", "fit_curve", "hessian", "instability", "interpolate", "layer_barriers",
           "layer_groups", "plane", "repair", "sharpness", "sweep"]
