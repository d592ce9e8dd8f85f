"""Golden run-directory names: every stage key, pinned.

A run is found again by the name its settings hash to (``<kind>_<12 hex digits>``). If a refactor
changes what goes into a key, or how it is hashed, every existing result directory silently stops
being found and is computed again. The names below were computed once with the code at ca3d170 and
pasted here; they are computed through the stages' public functions (and, where a stage builds its
key inline, by running the stage on a tiny network), so a change of naming fails here.

These names must never change. A test failing here means a run would be renamed: restore the old
name (keep the legacy exception in the key), never update the expected value.

The networks whose contents name a run (masks, start states, the two ends of ``connect``) are built
from integer patterns, exact in float32, so the digests do not depend on the machine's arithmetic.
"""
from __future__ import annotations

import math

import pytest
import torch

from stability.config import Config, settings_hash
from stability.engine import Members
from stability.presets import get_preset

# The tiny network of these tests, spelled out here (not taken from helpers.TINY) so that a change to the
# shared test settings cannot move these names.
TINY = {
    "model.width": "0.1",
    "training.steps": "30it",
    "training.batch_size": "32",
    "training.eval_every": "10it",
    "training.checkpoint_every": "5it",
    "training.rewind_points": "5it,10it",
    "runtime.threads": "2",
    "runtime.quiet": "true",
}


def _tiny(root="/unused", preset: str = "lenet300_mnist5k", **overrides: str) -> Config:
    extra = {k.replace("__", "."): v for k, v in overrides.items()}
    return get_preset(preset).with_overrides({**TINY, "runtime.results_root": str(root), **extra})


def _pattern(shape, k: int) -> torch.Tensor:
    """Values in {-3/8, ..., 3/8}, a function of the position and ``k`` only (exact in float32)."""
    n = math.prod(shape)
    return (((torch.arange(n, dtype=torch.float64) * k) % 7 - 3) / 8).to(torch.float32).reshape(shape)


def _masks(model_state, k: int) -> dict[str, torch.Tensor]:
    """float32 0/1 masks (as pruning writes them) over the weights, a function of the position and ``k``."""
    return {n: ((torch.arange(v.numel()) % (k + 2)) != 0).to(torch.float32).reshape(v.shape)
            for n, v in model_state.items() if n.endswith("weight")}


def _lenet_state() -> dict[str, torch.Tensor]:
    from stability.config import ModelConfig
    from stability.models.build import build_model

    return build_model(ModelConfig(width=0.1), (1, 28, 28), 10, 0).state_dict()


def _members(state_k: int, step: int) -> Members:
    """A single-member start state with patterned weights."""
    shapes = _lenet_state()
    state = {n: _pattern(v.shape, state_k) for n, v in shapes.items()}
    return Members.from_model_states([state], list(state), step, [0], [0], torch.device("cpu"))


# ----------------------------------------------------------------------------- trunk
GOLDEN_TRUNK = {
    "default": "train_44136fa355b3",
    "lenet300_mnist5k": "train_dffb6baa533a",
    "conv4_mnist5k": "train_e6b626812c55",
    "resnet20_cifar10": "train_a81e69d14fd6",
    "tiny": "train_593d6e57ec85",
    "tiny_sgd_seeds": "train_b498aaede186",
    "tiny_edgepopup": "train_27116210d86a",
    "tiny_neq": "train_2ce7555b971d",
    "tiny_dropout": "train_3104f6315ba8",
}


def test_trunk_names_never_change():
    """Trunk run names (``Config.run_hash`` / ``trunk_dir``): these names must never change."""
    from stability.stages.trunk import trunk_dir

    configs = {
        "default": Config(),
        "lenet300_mnist5k": get_preset("lenet300_mnist5k"),
        "conv4_mnist5k": get_preset("conv4_mnist5k"),
        "resnet20_cifar10": get_preset("resnet20_cifar10"),
        "tiny": _tiny(),
        "tiny_sgd_seeds": _tiny(optimizer__name="sgd", optimizer__lr="0.05", optimizer__momentum="0.9",
                                training__init_seed="1", training__noise_seed="2"),
        "tiny_edgepopup": _tiny(training__method="edgepopup"),
        "tiny_neq": _tiny(training__method="neq"),
        "tiny_dropout": _tiny(model__dropout="0.5"),
    }
    got = {name: trunk_dir(cfg).path.name for name, cfg in configs.items()}
    assert {name: cfg.run_hash() for name, cfg in configs.items()} == {n: d.split("_", 1)[1] for n, d in got.items()}
    assert got == GOLDEN_TRUNK


# ----------------------------------------------------------------------------- siblings
GOLDEN_SIBLINGS = {
    "default@5": "siblings_747e12b517eb",
    "default@0_preset": "siblings_f09b242d3856",
    "other@10": "siblings_e6745cdbd5be",
    "augmentation_only@5": "siblings_35fb3f5fcb4b",
    "masks@5": "dcc749509f89",
    "masks_freeze@5": "0ae8324f59e7",
    "masks_start_label@5": "4ccb794ff08a",
    "masks_start_label_freeze@5": "3801add85b8b",
    "noise_seeds@10": "0f872ba4dd4e",
}


def test_siblings_names_never_change():
    """Sibling-set names (``siblings.siblings_key`` / ``siblings_dir``), dense, sparse, frozen and from given
    start states: these names must never change."""
    from stability.stages.siblings import SiblingSettings, siblings_dir, siblings_key

    cfg = _tiny()
    masks = _masks(_lenet_state(), 1)
    start = _members(3, 5)
    other = SiblingSettings(siblings=3, noise="data_order", optimizer_state="restore", sibling_seed=1)
    got = {
        "default@5": siblings_dir(cfg, 5).path.name,
        "default@0_preset": siblings_dir(get_preset("lenet300_mnist5k"), 0).path.name,
        "other@10": siblings_dir(cfg, 10, other).path.name,
        "augmentation_only@5": siblings_dir(cfg, 5, SiblingSettings(noise="augmentation")).path.name,
    }
    keys = {
        "masks@5": siblings_key(cfg, 5, SiblingSettings(), masks=masks),
        "masks_freeze@5": siblings_key(cfg, 5, SiblingSettings(), masks=masks, freeze=True),
        "masks_start_label@5": siblings_key(cfg, 5, SiblingSettings(), masks=masks, start=start, label="r0-level1@5"),
        "masks_start_label_freeze@5": siblings_key(cfg, 5, SiblingSettings(), masks=masks, start=start,
                                                   label="r0-level1@5", freeze=True),
        "noise_seeds@10": siblings_key(cfg, 10, SiblingSettings(), noise_seeds=[(1, 2), (3, 4)]),
    }
    got.update({name: settings_hash(key) for name, key in keys.items()})
    assert got == GOLDEN_SIBLINGS


# ----------------------------------------------------------------------------- instability sweeps
GOLDEN_SWEEP = {
    "dense_default": "instability_0dbc539c04b9",
    "dense_default_preset": "instability_53739e9a07a7",
    "dense_threshold_margin": "instability_0dbc539c04b9",
    "dense_other": "instability_d6f82d9ac0bd",
    "dense_alpha_grid": "instability_64a4603c7cbd",
    "dense_independent": "instability_b2b2621423e0",
    "dense_align_subset_unaligned": "instability_0dbc539c04b9",
    "dense_align_weights": "instability_32fae872a8e1",
    "dense_align_activations_repair": "instability_de5f0aa0fa9e",
    "sparse_masks": "instability_9eb522435af5",
    "sparse_masks_label": "instability_4fcbf06813f8",
    "sparse_masks_starts_label": "instability_17a44be086c1",
    "sparse_masks_starts_label_freeze": "instability_3b73a06b80a2",
    "sparse_masks_freeze": "instability_91b657c4dc11",
}


def test_instability_sweep_names_never_change():
    """Instability sweep names (``instability.sweep_key`` / ``sweep_dir``), dense and sparse (masks, frozen
    removed weights, start states, label): these names must never change."""
    from stability.stages.instability import instability_settings, sweep_dir
    from stability.steps import INDEPENDENT_STEP

    cfg = _tiny()
    default = instability_settings()
    masks = _masks(_lenet_state(), 1)
    starts = {5: _members(3, 5)}
    got = {
        "dense_default": sweep_dir(cfg, default, [5, 10]).path.name,
        "dense_default_preset": sweep_dir(get_preset("lenet300_mnist5k"), default, [0, 100]).path.name,
        # threshold and chance margin only classify: the same name as the default
        "dense_threshold_margin": sweep_dir(cfg, instability_settings(threshold=0.05, chance_margin=0.1),
                                            [5, 10]).path.name,
        "dense_other": sweep_dir(cfg, instability_settings(siblings=3, noise="data_order", optimizer_state="restore",
                                                           sibling_seed=2, alphas=11, bn="reset", bn_batches=5,
                                                           splits=["test", "train"]), [5, 10]).path.name,
        "dense_alpha_grid": sweep_dir(cfg, instability_settings(alpha_grid=[0.0, 0.5, 1.0]), [5]).path.name,
        "dense_independent": sweep_dir(cfg, instability_settings(rewind_points=["independent", "5it"]),
                                       [INDEPENDENT_STEP, 5]).path.name,
        # a subset size or seed without alignment names nothing
        "dense_align_subset_unaligned": sweep_dir(cfg, instability_settings(align_examples=50, align_seed=3),
                                                  [5, 10]).path.name,
        "dense_align_weights": sweep_dir(cfg, instability_settings(align="weights"), [5, 10]).path.name,
        "dense_align_activations_repair": sweep_dir(cfg, instability_settings(align="activations", repair=True,
                                                                              align_examples=50, align_seed=3),
                                                    [5, 10]).path.name,
        "sparse_masks": sweep_dir(cfg, default, [5], masks=masks).path.name,
        "sparse_masks_label": sweep_dir(cfg, default, [5], masks=masks, label="r0-dense").path.name,
        "sparse_masks_starts_label": sweep_dir(cfg, default, [5], masks=masks, start_states=starts,
                                               label="r0-level1-1").path.name,
        "sparse_masks_starts_label_freeze": sweep_dir(cfg, default, [5], masks=masks, start_states=starts,
                                                      label="r0-level1-1", freeze=True).path.name,
        "sparse_masks_freeze": sweep_dir(cfg, default, [5], masks=masks, freeze=True).path.name,
    }
    assert got == GOLDEN_SWEEP


# ----------------------------------------------------------------------------- IMP
GOLDEN_IMP = {
    "default": "imp_a99e82d6b05c",
    "default_preset": "imp_2762d6112627",
    "rewind_5it": "imp_097860870e1d",
    "rewind_auto": "imp_77490f458bcd",
    "rewind_auto_other_sweep": "imp_77b03dfb4ecb",
    "rewind_auto_aligned_sweep": "imp_3c19ad41f61c",
    "instability": "imp_2554fcc296b7",
    "criterion_small_final": "imp_08d66b70c7a7",
    "criterion_movement": "imp_cf3969350c6a",
    "mask0_freeze": "imp_68e4af64701a",
    "mask0_freeze_instability": "imp_9327a3e0bc1e",
    "mask0_freeze_if_moving_away": "imp_363506e55d4a",
    "mask1_reinit_supermask": "imp_8d5ff592e9f6",
    "one_shot_baselines": "imp_1a312a80de7f",
    "random_strategy_seed": "imp_94aa73d60059",
    "layerwise_overrides": "imp_9b751e6cc03e",
    "chance_margin": "imp_a99e82d6b05c",
    "mask_from": "imp_c0b93a59e867",
    "mask_from_elsewhere": "imp_c0b93a59e867",
}


def _mask_source_dir(root, levels: int) -> str:
    """An IMP run directory holding only patterned masks (what ``imp.mask_from`` reads)."""
    from stability.store.files import save_tensors
    from stability.store.schema import mask_name

    shapes = _lenet_state()
    for level in range(1, levels + 1):
        save_tensors(root / mask_name(0, level), _masks(shapes, level), {"replicate": 0, "level": level})
    return str(root)


def test_imp_names_never_change(tmp_path):
    """IMP run names (``imp.imp_key`` / ``imp_dir``): default, rewind auto, other criteria, mask-0 and mask-1
    actions, instability, one-shot with baselines, transferred masks: these names must never change."""
    from stability.stages.imp import imp_dir, imp_key, imp_settings, mask_source
    from stability.stages.instability import instability_settings

    cfg = _tiny()
    sweep = instability_settings()
    other_sweep = instability_settings(rewind_points=["0it", "5it"], siblings=3, threshold=0.05)
    source_a = _mask_source_dir(tmp_path / "imp_a", 2)
    source_b = _mask_source_dir(tmp_path / "imp_b", 2)  # the same masks elsewhere: the same name
    cases = {
        "default": (cfg, imp_settings(), sweep),
        "default_preset": (get_preset("lenet300_mnist5k"), imp_settings(), sweep),
        "rewind_5it": (cfg, imp_settings(levels=2, rewind="5it"), sweep),
        "rewind_auto": (cfg, imp_settings(rewind="auto"), sweep),
        "rewind_auto_other_sweep": (cfg, imp_settings(rewind="auto"), other_sweep),
        "rewind_auto_aligned_sweep": (cfg, imp_settings(rewind="auto"), instability_settings(align="weights")),
        "instability": (cfg, imp_settings(rewind="5it", instability=True), sweep),
        "criterion_small_final": (cfg, imp_settings(criterion="small_final"), sweep),
        "criterion_movement": (cfg, imp_settings(criterion="movement", strategy="layerwise"), sweep),
        "mask0_freeze": (cfg, imp_settings(levels=2, rewind="5it", mask0="freeze"), sweep),
        "mask0_freeze_instability": (cfg, imp_settings(levels=1, rewind="5it", mask0="freeze", instability=True),
                                     sweep),
        "mask0_freeze_if_moving_away": (cfg, imp_settings(levels=2, rewind="5it", mask0="freeze_if_moving_away"),
                                        sweep),
        "mask1_reinit_supermask": (cfg, imp_settings(mask1="reinit", supermask=True), sweep),
        "one_shot_baselines": (cfg, imp_settings(levels=3, one_shot=True, baselines=["reinit", "random"],
                                                 replicates=2, prune_fraction=0.5), sweep),
        "random_strategy_seed": (cfg, imp_settings(strategy="random", pruning_seed=4), sweep),
        "layerwise_overrides": (cfg, imp_settings(strategy="layerwise", rate_overrides={"output": 0.1},
                                                  exclude=["fc.0.weight"]), sweep),
        # chance margins only classify: the same name as the default
        "chance_margin": (cfg, imp_settings(chance_margin=0.1), sweep),
        "mask_from": (cfg, imp_settings(levels=2, rewind="5it", mask_from=source_a), sweep),
        "mask_from_elsewhere": (cfg, imp_settings(levels=2, rewind="5it", mask_from=source_b), sweep),
    }
    got = {name: imp_dir(*args).path.name for name, args in cases.items()}
    # the digest of masks already read, passed in, names the run as reading them does
    settings = imp_settings(levels=2, rewind="5it", mask_from=source_a)
    assert settings_hash(imp_key(cfg, settings, sweep, mask_source(settings))) == got["mask_from"].split("_", 1)[1]
    assert got == GOLDEN_IMP


# ----------------------------------------------------------------------------- early-bird tickets
GOLDEN_EARLYBIRD = {
    "default": "8727696a97cd",
    "every_rewind": "f77ce996f1c0",
    "density_threshold_window_rule": "34e81a4796f1",
    "prune_fraction": "8727696a97cd",
    "channel": "013b0c92fb5a",
}


@pytest.fixture(scope="module")
def contexts():
    from stability.stages.context import prepare

    return {"lenet": prepare(_tiny(training__eval_every="2it")),
            "resnet": prepare(_tiny(preset="resnet8_mnist5k", model__width="0.25"))}


def test_earlybird_names_never_change(contexts):
    """Early-bird run names (``earlybird.earlybird_key`` over the resolved plan): these names must never change."""
    from stability.stages.earlybird import _plan, earlybird_key, earlybird_settings

    cases = {
        "default": ("lenet", earlybird_settings()),
        "every_rewind": ("lenet", earlybird_settings(every="5it", rewind="10it")),
        "density_threshold_window_rule": ("lenet", earlybird_settings(density=0.3, threshold=0.05, window=3,
                                                                      rule="latest")),
        # the IMP comparison's fraction is not part of the name
        "prune_fraction": ("lenet", earlybird_settings(prune_fraction=0.5)),
        "channel": ("resnet", earlybird_settings(mask="channel", every="5it", window=2)),
    }
    got = {}
    for name, (which, settings) in cases.items():
        ctx = contexts[which]
        got[name] = settings_hash(earlybird_key(ctx.cfg, settings, _plan(ctx, settings)))
    assert got == GOLDEN_EARLYBIRD


# ----------------------------------------------------------------------------- Hessian tracks and paths
GOLDEN_TRACK = {
    "default_all": "16b92d0e8b33",
    "top2_smallest_trace_density_at": "0e9de078f643",
    "every_15it": "0d8d3fd7c8d2",
    "float64_seeded": "4e5e880b793e",
}


def test_hessian_track_names_never_change(contexts):
    """Hessian track names (``landscape.track_key`` over ``track_steps``): these names must never change."""
    from stability.stages.landscape import hessian_settings, track_key, track_steps

    ctx = contexts["lenet"]
    cfg = ctx.cfg
    cases = {
        "default_all": (hessian_settings(), track_steps(ctx)),
        "top2_smallest_trace_density_at": (hessian_settings(top_k=2, smallest=True, trace_probes=5, density=True,
                                                            density_steps=20, samples=200), track_steps(ctx, ["5it"])),
        "every_15it": (hessian_settings(top_k=1, samples=100), track_steps(ctx, (), "15it")),
        "float64_seeded": (hessian_settings(dtype="float64", seed=3, sample_seed=2, batch_size=50),
                           track_steps(ctx, "all", "10it")),
    }
    got = {name: settings_hash(track_key(cfg, settings, steps)) for name, (settings, steps) in cases.items()}
    assert got == GOLDEN_TRACK


GOLDEN_HESSIAN_RUNS = {
    "track_at_5it": "hessian_e8a68fde351a",
    "path_default_alphas": "hessian_74f008bb994f",
    "path_alphas_siblings_bn": "hessian_1ad340cf7607",
}


def test_hessian_run_directories_never_change(tmp_path):
    """The directories ``hessian_track`` and ``hessian_path`` (whose key is built inline) write, run on a tiny
    network: these names must never change. The names depend on settings only, not on trained values."""
    from stability.stages.landscape import hessian_path, hessian_settings, hessian_track
    from stability.stages.siblings import SiblingSettings

    cfg = _tiny(tmp_path, training__steps="10it", training__rewind_points="5it", training__eval_every="10it")
    settings = hessian_settings(top_k=1, samples=32, lanczos_steps=4, tol=0.0)
    got = {
        "track_at_5it": hessian_track(cfg, settings, at=["5it"]).run_dir.name,
        "path_default_alphas": hessian_path(cfg, settings, 5).run_dir.name,
        "path_alphas_siblings_bn": hessian_path(cfg, settings, "5it", alphas=[0.0, 1.0],
                                                siblings=SiblingSettings(sibling_seed=1), bn_batches=2).run_dir.name,
    }
    assert got == GOLDEN_HESSIAN_RUNS


# ----------------------------------------------------------------------------- connect
GOLDEN_CONNECT = {
    "dense_alphas3": "connect_7c7eb4979933",
    "dense_reversed": "connect_bce6f8e5cd93",
    "dense_align_weights": "connect_4ed7cb2cc072",
    "dense_allow_different_masks": "connect_7c7eb4979933",
    "sparse_alphas3": "connect_5feb7c68da9e",
}


def _patterned_trunk(cfg: Config, k: int):
    """A finished trunk run of ``cfg`` whose final weights are the pattern ``k`` (no training)."""
    from stability.stages.checkpoints import save_state
    from stability.stages.trunk import trunk_dir
    from stability.store.schema import checkpoint_name

    run, T = trunk_dir(cfg), 30
    run.start(cfg.to_dict(), cfg.hashed_dict(), {"final_step": T})
    save_state(run / checkpoint_name(T), _members(k, T))
    run.update(status="complete")
    return run.path


def _patterned_imp_level(root, cfg: Config, name: str, k: int, mask_k: int):
    """Level 1 of a finished IMP run (``imp_<name>``) with patterned final weights and mask."""
    from stability.stages.checkpoints import save_state
    from stability.store.files import RunDir, save_tensors
    from stability.store.schema import FINAL_STATE, IMP, mask_name

    run = RunDir(root, IMP, name)
    run.start({"training": cfg.to_dict()}, {})
    save_tensors(run / mask_name(0, 1), _masks(_lenet_state(), mask_k))
    level = run.path / "replicate_0" / "level_1"
    level.mkdir(parents=True)
    save_state(level / FINAL_STATE, _members(k, 30))
    run.update(status="complete")
    return level


def test_connect_names_never_change(tmp_path):
    """``connect`` run names (key built inline: digests of both networks and their masks, model, dataset,
    settings), run on patterned networks: these names must never change."""
    from stability.stages.connect import connect, connect_settings

    cfg_a, cfg_b = _tiny(tmp_path), _tiny(tmp_path, training__init_seed="1")
    a, b = _patterned_trunk(cfg_a, 1), _patterned_trunk(cfg_b, 2)
    sparse_a = _patterned_imp_level(tmp_path, cfg_a, "000000000001", 1, 1)
    sparse_b = _patterned_imp_level(tmp_path, cfg_a, "000000000002", 2, 2)
    got = {
        "dense_alphas3": connect(a, b, connect_settings(alphas=3)).run_dir.name,
        "dense_reversed": connect(b, a, connect_settings(alphas=3)).run_dir.name,
        "dense_align_weights": connect(a, b, connect_settings(alphas=3, align="weights")).run_dir.name,
        # allowing different masks names nothing
        "dense_allow_different_masks": connect(a, b, connect_settings(alphas=3, allow_different_masks=True)
                                               ).run_dir.name,
        "sparse_alphas3": connect(sparse_a, sparse_b, connect_settings(alphas=3)).run_dir.name,
    }
    assert got == GOLDEN_CONNECT



# ----------------------------------------------------------------------------- curve
GOLDEN_CURVE = {
    "default": "curve_b943ec90042f",
    "reversed": "curve_8401fb392d8c",
    "polychain_steps200_seed1": "curve_954cf6a478a5",
    "align_weights": "curve_11330fea227d",
    "checkpoint_every_names_nothing": "curve_b943ec90042f",
    "steps_as_integer": "curve_b943ec90042f",
}


def test_curve_names_never_change():
    """``curve`` run names (``curve_key``: digests of both networks, model, dataset, the settings that change the
    fit, seed included), on patterned networks: these names must never change."""
    from stability.stages.connect import Network
    from stability.stages.curve import curve_key, curve_settings

    cfg = _tiny()
    a = Network(cfg, _members(1, 30).member_state_dict(0), None, "a")
    b = Network(cfg, _members(2, 30).member_state_dict(0), None, "b")

    def name(settings, first=a, second=b):
        return "curve_" + settings_hash(curve_key(cfg, settings, first, second))

    got = {
        "default": name(curve_settings()),
        "reversed": name(curve_settings(), b, a),
        "polychain_steps200_seed1": name(curve_settings(kind="polychain", steps=200, seed=1)),
        "align_weights": name(curve_settings(align="weights")),
        # the checkpoint cadence names nothing; 1000 and "1000it" are one setting
        "checkpoint_every_names_nothing": name(curve_settings(checkpoint_every=7)),
        "steps_as_integer": name(curve_settings(steps=1000)),
    }
    assert got == GOLDEN_CURVE


def test_eval_precision_bf16_names_connect_and_curve_records_and_fp32_names_nothing():
    """``runtime.eval_precision`` names the records measured from given weights (connect, curve) when it is not
    fp32 (``engine.precision.eval_precision_key``); fp32 keeps the names above. Pinned: they must never change."""
    from stability.stages.connect import Network, connect_key, connect_settings
    from stability.stages.curve import curve_key, curve_settings

    names = {}
    for precision in ("fp32", "bf16"):
        cfg = _tiny(runtime__eval_precision=precision)
        a = Network(cfg, _members(1, 30).member_state_dict(0), None, "a")
        b = Network(cfg, _members(2, 30).member_state_dict(0), None, "b")
        names[precision] = ("connect_" + settings_hash(connect_key(a, b, connect_settings(alphas=3))),
                            "curve_" + settings_hash(curve_key(cfg, curve_settings(), a, b)))
    assert names["fp32"] == (GOLDEN_CONNECT["dense_alphas3"], GOLDEN_CURVE["default"])
    assert names["bf16"] == ("connect_080db5b91c81", "curve_153e83a5fb61")


# ----------------------------------------------------------------------------- layer-wise barriers and sharpness
GOLDEN_LAYERS = {
    "connect_alphas3": "connect_7c7eb4979933",  # = GOLDEN_CONNECT["dense_alphas3"]: connect.layers off names nothing
    "connect_groups_without_layers": "connect_7c7eb4979933",
    "connect_layers": "connect_ee5a64a8559e",
    "connect_layers_blocks": "connect_d0e52315a95e",
    "sweep_layers": "layers_7e203b96ec6e",
    "sweep_blocks": "layers_a047130ee93b",
    "track_sharpness": "c1b37a6a0089",
    "track_sharpness_plain_steps20": "c50097645e8c",
}


def test_layer_and_sharpness_names_never_change(contexts):
    """Connect runs with ``connect.layers``, ``layers_<hash>`` runs of a sweep, and Hessian tracks with
    ``hessian.sharpness_rho``: these names must never change (and the new fields at their defaults name nothing)."""
    from pathlib import Path

    from stability.stages.connect import Network, connect_key, connect_settings
    from stability.stages.landscape import hessian_settings, track_key, track_steps
    from stability.stages.layerwise import layer_sweep_key

    cfg = _tiny()
    a = Network(cfg, _members(1, 30).member_state_dict(0), None, "a")
    b = Network(cfg, _members(2, 30).member_state_dict(0), None, "b")
    ctx = contexts["lenet"]

    def connect_name(**settings):
        return "connect_" + settings_hash(connect_key(a, b, connect_settings(alphas=3, **settings)))

    def track_name(**settings):
        return settings_hash(track_key(ctx.cfg, hessian_settings(**settings), track_steps(ctx)))

    sweep = Path("instability_0123456789ab")
    got = {
        "connect_alphas3": connect_name(),
        "connect_groups_without_layers": connect_name(layer_groups="blocks"),
        "connect_layers": connect_name(layers=True),
        "connect_layers_blocks": connect_name(layers=True, layer_groups="blocks"),
        "sweep_layers": "layers_" + settings_hash(layer_sweep_key(sweep, "layers")),
        "sweep_blocks": "layers_" + settings_hash(layer_sweep_key(sweep, "blocks")),
        "track_sharpness": track_name(sharpness_rho=0.05),
        "track_sharpness_plain_steps20": track_name(sharpness_rho=0.05, sharpness_adaptive=False, sharpness_steps=20),
    }
    assert got == GOLDEN_LAYERS
    assert track_name() == GOLDEN_TRACK["default_all"]


# ----------------------------------------------------------------------------- loss-landscape planes
GOLDEN_PLANE = {
    "siblings_default": "plane_8c99cff2e9f6",
    "networks_grid9": "plane_9d2dbe77b938",
    "reordered": "plane_97a91a6b290b",
    "random_seed1_keep": "plane_be8a794c43b6",
    "pca_reset_splits": "plane_a00324aee1ee",
    "ranges": "plane_a0707cef7adb",
}


def test_plane_names_never_change():
    """``plane`` run names (``plane_key``: the networks' digests in order, model, dataset, the plane settings not at
    their defaults), on patterned networks: these names must never change."""
    from stability.stages.plane import plane_key, plane_settings

    cfg = _tiny()
    a, b, c = (_members(k, 30).member_state_dict(0) for k in (1, 2, 3))

    def name(states, **settings):
        return "plane_" + settings_hash(plane_key(cfg, plane_settings(**settings), states))

    got = {
        "siblings_default": name([a, b, c]),
        "networks_grid9": name([a, b, c], kind="networks", grid=9),
        "reordered": name([b, a, c]),
        "random_seed1_keep": name([a], kind="random", seed=1, biasbn="keep"),
        "pca_reset_splits": name([a, b, c], kind="pca", bn="reset", splits=("test", "train")),
        "ranges": name([a, b, c], range_u=(-1.0, 1.0), range_v=(-1, 1), grid_v=11),
    }
    assert got == GOLDEN_PLANE


GOLDEN_IMP_BASELINES = {
    "default_with_new_fields_at_defaults": "imp_a99e82d6b05c",  # = GOLDEN_IMP["default"]
    "retrain_lr_rewind": "imp_8a5c1ed6e1b3",
    "retrain_finetune": "imp_9ed8d91dd8cd",
    "snip_batch_100": "imp_e4624ab34c54",
    "grasp": "imp_952a3d238c98",
    "synflow_rounds_10": "imp_a9983b28f039",
    "mask_shuffle_layer": "imp_6829e9838b8b",
    "invert_scores": "imp_c4008419acaa",
}


def test_imp_baseline_option_names_never_change():
    """IMP names with the retraining, pruning-at-initialization and sanity-check options (named only when not
    at their defaults): these names must never change."""
    from stability.stages.imp import imp_dir, imp_settings
    from stability.stages.instability import instability_settings

    cfg, sweep = _tiny(), instability_settings()
    cases = {
        "default_with_new_fields_at_defaults": imp_settings(retrain="rewind", score_batch=256, synflow_rounds=100,
                                                            mask_shuffle="none", invert_scores=False),
        "retrain_lr_rewind": imp_settings(levels=2, rewind="5it", retrain="lr_rewind"),
        "retrain_finetune": imp_settings(levels=2, rewind="5it", retrain="finetune"),
        "snip_batch_100": imp_settings(strategy="snip", score_batch=100),
        "grasp": imp_settings(strategy="grasp"),
        "synflow_rounds_10": imp_settings(strategy="synflow", synflow_rounds=10),
        "mask_shuffle_layer": imp_settings(mask_shuffle="layer"),
        "invert_scores": imp_settings(invert_scores=True),
    }
    assert {k: imp_dir(cfg, v, sweep).path.name for k, v in cases.items()} == GOLDEN_IMP_BASELINES
