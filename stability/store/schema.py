"""The run store's schema: every file name and every table's columns, written once.

Writers (``trunk``, ``siblings``, ``instability``, ``imp``, ``landscape``) and
readers (``analysis``) import these names; no file name or column list is
spelled anywhere else. A run lives in ``<results_root>/<kind>_<hash>/``.

| kind          | files                                                                     |
|---------------|---------------------------------------------------------------------------|
| train         | manifest.json, metrics.csv, checkpoints/step_<k>.safetensors,             |
|               | state/latest.safetensors, summary.json (+ neq.csv with method = neq)      |
| siblings      | manifest.json, final.safetensors, state/latest.safetensors                |
| instability   | manifest.json, curves.csv, sweep.csv, instability.json                    |
| imp           | manifest.json, levels.csv, masks/replicate_<r>_level_<l>.safetensors,     |
|               | imp.json, replicate_<r>/level_<l>/{record.json, metrics.csv, final...}    |
| hessian       | manifest.json, hessian.csv, density.csv, hessian.json                     |
| earlybird     | manifest.json, points.csv, distances.csv, earlybird.json,                 |
|               | mask.safetensors, ticket_<digest>/{metrics.csv, final...}                 |

Every run directory also holds ``.lock`` while a process computes it.
"""
from __future__ import annotations

# ---------------------------------------------------------------- run kinds
TRAIN, SIBLINGS, INSTABILITY, IMP, HESSIAN = "train", "siblings", "instability", "imp", "hessian"
RUN_KINDS = (TRAIN, SIBLINGS, INSTABILITY, IMP, HESSIAN)

# ---------------------------------------------------------------- files of every run
MANIFEST = "manifest.json"
LOCK = ".lock"
# The sections of a training run's config, in order (stability.config.SECTIONS; a test holds them equal). A train
# run's manifest holds them under "config"; a stage run's manifest nests them under "config" -> "training".
CONFIG_SECTIONS = ("dataset", "model", "optimizer", "schedule", "training", "runtime", "strong", "neq")

# ---------------------------------------------------------------- training runs (trunk, siblings, IMP levels)
METRICS = "metrics.csv"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
LATEST_STATE = "state/latest.safetensors"
FINAL_STATE = "final.safetensors"
# training.method = neq (stability.methods.neq): one row per member and NEq layer (and one "all" row) at each NEq
# evaluation; the frozen neurons skip their updates from that step to the next evaluation
NEQ_RECORDS = "neq.csv"
NEQ_COLUMNS = ["step", "member", "layer", "neurons", "frozen", "frozen_fraction", "at_equilibrium",
               "mean_abs_velocity", "backward_macs", "macs_saved", "saved_fraction"]
# training.method in STRONG_METHODS (stability.methods.strong names its registry entries from here; a test
# holds them equal to the methods that do not train weights): scores over frozen weights. summary.json
# then says at its top level "method" and "mask_density", the fraction of weights the evaluation mask keeps.
STRONG_METHODS = ("edgepopup", "supermask")


def step_file(step: int) -> str:
    """``step_<k>.safetensors``: the file of the weights at step k (a run's checkpoint, a Lightning rewind point)."""
    return f"step_{int(step)}.safetensors"


def checkpoint_name(step: int) -> str:
    """``checkpoints/step_<k>.safetensors``, relative to the run directory."""
    return f"{CHECKPOINTS}/{step_file(step)}"


CHECKPOINT_GLOB = "step_*.safetensors"  # in CHECKPOINTS


def checkpoint_step(filename: str) -> int:
    """The step of a ``step_<k>.safetensors`` file name."""
    return int(filename.removeprefix("step_").removesuffix(".safetensors"))


# ---------------------------------------------------------------- instability sweeps
CURVES = "curves.csv"
SWEEP = "sweep.csv"
INSTABILITY_SUMMARY = "instability.json"

# ---------------------------------------------------------------- stability connect (connect_<hash>/)
CONNECT = "connect"  # the run kind of a barrier between two given networks: CURVES and CONNECT_SUMMARY
CONNECT_SUMMARY = "connect.json"

# ---------------------------------------------------------------- loss-landscape planes (plane_<hash>/)
# Not in RUN_KINDS (like CONNECT): made only by ``stability landscape`` (stages.plane). plane.csv: one row per grid
# point and split; plane.json: the networks' coordinates (and their own error and loss there), the grid's axes, the
# projected trajectory of a PCA plane, the chance error per split.
PLANE = "plane"
PLANE_TABLE = "plane.csv"
PLANE_SUMMARY = "plane.json"
PLANE_COLUMNS = ["split", "u", "v", "error", "loss"]

# ---------------------------------------------------------------- layer-wise barriers (Adilova et al. 2024)
# LAYERS_TABLE in a connect run measured with connect.layers, and in a layers_<hash>/ run (the layer-wise barriers of
# a finished sweep's siblings, made by ``stages.layerwise``; not in RUN_KINDS, like CONNECT) beside LAYERS_SUMMARY.
LAYERS = "layers"
LAYERS_TABLE = "layers.csv"
LAYERS_SUMMARY = "layers.json"
LAYER_COLUMNS = ["rewind_step", "pair", "split", "group", "position", "parameters", "barrier", "loss_barrier",
                 "cumulative_barrier", "cumulative_loss_barrier", "chord_barrier", "end_error"]

# ---------------------------------------------------------------- stability curve (curve_<hash>/)
# Not in RUN_KINDS (like CONNECT): a curve of low loss fitted between two given networks (Garipov et al. 2018;
# ``stages.curve``), measured beside the straight line.
CURVE = "curve"
CURVE_TABLE = "curve.csv"  # path (curve | line), split, t, error, loss
CURVE_SUMMARY = "summary.json"  # barriers of the curve and the line per split, how the curve was fitted (seed)
CURVE_MIDDLE = "middle.safetensors"  # the fitted middle point (Bezier) or bend (polygonal chain): a state dict
CURVE_ALIGNED = "aligned_b.safetensors"  # B aligned to A (curve.align != none): the curve's other end
CURVE_FIT = "fit.csv"  # step, t, training loss of every fitting step
CURVE_STATE = "state/fit.safetensors"  # the fit's checkpoint: middle point, optimizer state, step
CURVE_TABLE_COLUMNS = ["path", "split", "t", "error", "loss"]
CURVE_FIT_COLUMNS = ["step", "t", "loss"]

# ---------------------------------------------------------------- IMP
LEVELS = "levels.csv"
IMP_SUMMARY = "imp.json"
MASKS = "masks"
LEVEL_RECORD = "record.json"


def mask_name(replicate: int, level: int) -> str:
    """``masks/replicate_<r>_level_<l>.safetensors``, relative to the IMP run directory."""
    return f"{MASKS}/replicate_{replicate}_level_{level}.safetensors"


def level_dir(replicate: int) -> str:
    """The folder holding the level sub-runs of one replicate (each ``level_<l>``)."""
    return f"replicate_{replicate}"


# ---------------------------------------------------------------- early-bird tickets (earlybird_<hash>/)
# Not in RUN_KINDS (like CONNECT): a run of this kind is made only by ``stability earlybird``.
EARLYBIRD = "earlybird"
EARLYBIRD_POINTS = "points.csv"  # one row per mask point: distance to the previous mask, window max, detection
EARLYBIRD_DISTANCES = "distances.csv"  # every pair of mask points (step_a, step_b, distance)
EARLYBIRD_SUMMARY = "earlybird.json"
EARLYBIRD_MASK = "mask.safetensors"  # the mask drawn at the detected step, as a weight mask
EARLYBIRD_TICKET = "ticket"  # the ticket's training sub-run: ticket_<mask digest>/{metrics.csv, final...}
EARLYBIRD_POINT_COLUMNS = ["step", "distance_previous", "window_max", "below_threshold", "detected", "kept",
                           "total"]
EARLYBIRD_DISTANCE_COLUMNS = ["step_a", "step_b", "distance"]

# ---------------------------------------------------------------- Hessian probes
HESSIAN_TABLE = "hessian.csv"
DENSITY_TABLE = "density.csv"
HESSIAN_SUMMARY = "hessian.json"

# ---------------------------------------------------------------- grids (<results_root>/grids/<grid hash>/)
GRIDS = "grids"
PLAN = "plan.json"
FAILURES = "failures"  # <unit id>.json per failed unit
SLURM_LOGS = "slurm"


def failure_name(unit_id: str) -> str:
    """``failures/<unit id>.json``, relative to a grid's folder."""
    return f"{FAILURES}/{unit_id}.json"


# ---------------------------------------------------------------- columns
METRIC_COLUMNS = ["step", "member", "lr", "train_loss", "train_error", "val_loss", "val_error", "test_loss",
                  "test_error"]
CURVE_COLUMNS = ["rewind_step", "pair", "split", "alpha", "error", "loss", "flag"]
SWEEP_COLUMNS = ["rewind_step", "split", "instability_mean", "instability_std", "loss_barrier_mean",
                 "loss_barrier_std", "pairs", "stable", "status"]
LEVEL_COLUMNS = ["replicate", "level", "kind", "density", "final_test_accuracy", "final_test_loss",
                 "early_stop_step", "early_stop_test_accuracy", "early_stop_val_loss", "trajectory_length",
                 "instability", "rewind_step", "status", "criterion", "mask1", "mask0", "mask_source",
                 "supermask_test_accuracy", "updated_fraction", "backward_flops_saved", "strategy", "retrain",
                 "mask_shuffle", "invert_scores"]
# hessian.csv: the point (step, or rewind_step and alpha), lambda_1..lambda_k, then these
HESSIAN_COLUMNS = ["lambda_1", "lambda_min", "trace", "trace_stderr", "n_hvp", "seconds"]
DENSITY_COLUMNS = ["x", "density"]

# ---------------------------------------------------------------- statuses
# A sweep point or IMP level: ok; untrained (an endpoint within the chance margin of chance error:
# never stable, never matching); diverged (training went non-finite: no result).
POINT_STATUSES = ("ok", "untrained", "diverged")
# A run's manifest: running, complete, or diverged.
RUN_STATUSES = ("running", "complete", "diverged")
