"""stability.integrations: rewind checkpoints from a Lightning Trainer read by lmc; Lightning .ckpt files; timm models."""
from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from stability import lmc
from stability.config import DatasetConfig, ModelConfig
from stability.data import load_dataset
from stability.errors import ConfigError
from stability.models import build_model
from stability.store.files import load_tensors

pl = pytest.importorskip("lightning.pytorch")

from stability.integrations import RewindCheckpoints, rewind_checkpoints

pytestmark = [pytest.mark.filterwarnings("ignore:.*does not have many workers"),
              pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*")]

N_TRAIN, BATCH = 1280, 32  # 40 batches an epoch


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))


class Lit(pl.LightningModule):
    """The usual shape: the network under ``self.model``, SGD with momentum."""

    def __init__(self, net: nn.Module, lr: float = 0.05):
        super().__init__()
        self.model, self.lr = net, lr

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def _trainer(max_steps: int, callbacks=(), **kwargs) -> pl.Trainer:
    return pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks), **kwargs)


def _replay(net: nn.Module, loader, steps: int, accumulate: int = 1, lr: float = 0.05) -> dict[int, dict]:
    """The plain loop Lightning runs: the state after every optimizer step ``1 .. steps``."""
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    batches = iter(loader)
    out = {}
    for k in range(1, steps + 1):
        opt.zero_grad()
        for _ in range(accumulate):
            x, y = next(batches)
            (F.cross_entropy(net(x), y) / accumulate).backward()
        opt.step()
        out[k] = copy.deepcopy(net.state_dict())
    return out


def _close(a: dict, b: dict, atol: float = 1e-6) -> bool:
    return list(a) == list(b) and all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


@pytest.fixture(scope="module")
def data():
    splits = load_dataset(DatasetConfig(name="mnist5k", val_size=0))
    x, y = splits.x_train[:N_TRAIN], splits.y_train[:N_TRAIN]
    return (x, y), splits.split("test")


def _loader(data):
    return DataLoader(TensorDataset(*data[0]), batch_size=BATCH, shuffle=False)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """Two LightningModules trained 40 steps from seeds 1 and 2: the first with RewindCheckpoints, both saved."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster
    root = tmp_path_factory.mktemp("lit")
    out = {"root": root, "init": copy.deepcopy(_net(1).state_dict())}
    for seed in (1, 2):
        lit = Lit(_net(seed))
        callbacks = [RewindCheckpoints([0, 5, 20, 100], root / "rewind")] if seed == 1 else []
        trainer = _trainer(40, callbacks)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(lit, _loader(data))
        trainer.save_checkpoint(root / f"seed{seed}.ckpt")
        out[seed] = lit
        if seed == 1:
            out["warnings"] = [str(w.message) for w in caught if "RewindCheckpoints" in str(w.message)]
    yield out
    torch.set_num_threads(threads)


def test_rewind_files_hold_the_initial_weights_and_those_after_k_optimizer_steps(trained, data):
    files = rewind_checkpoints(trained["root"] / "rewind")
    assert list(files) == [0, 5, 20] and all(p.name == f"step_{k}.safetensors" for k, p in files.items())
    states = {}
    for k, path in files.items():
        tensors, meta = load_tensors(path)  # the digest is checked
        assert meta["step"] == k and meta["module"] == "" and meta["source"] == "lightning:Lit"
        states[k] = tensors
    # the whole LightningModule by default: its keys carry the attribute's prefix
    assert list(states[0]) == [f"model.{k}" for k in trained["init"]]
    bare = {k: {name.removeprefix("model."): t for name, t in s.items()} for k, s in states.items()}
    assert all(torch.equal(bare[0][k], v) for k, v in trained["init"].items())
    replay = _replay(_net(1), _loader(data), 20)
    assert _close(bare[5], replay[5]) and _close(bare[20], replay[20])
    assert not _close(bare[20], replay[19])
    expected = "RewindCheckpoints: no checkpoint for steps [100]: training ran from step 0 to step 40 (optimizer steps)"
    assert trained["warnings"] == [expected]


def test_a_named_submodule_is_saved_bare_once_per_optimizer_step_under_accumulation(data, tmp_path, one_torch_thread):
    lit = Lit(_net(3))
    cb = RewindCheckpoints([0, 3], tmp_path, module="model")
    _trainer(4, [cb], accumulate_grad_batches=2).fit(lit, _loader(data))
    assert cb.written == [0, 3]
    tensors, meta = load_tensors(tmp_path / "step_3.safetensors")
    assert meta == {"step": 3, "epoch": 0, "module": "model", "source": "lightning:Lit"}
    replay = _replay(_net(3), _loader(data), 3, accumulate=2)
    assert _close(tensors, replay[3], atol=1e-5)
    with pytest.raises(ConfigError, match=r"module: Lit has no submodule 'net'"):
        _trainer(2, [RewindCheckpoints([0], tmp_path / "x", module="net")]).fit(Lit(_net(3)), _loader(data))
    assert not (tmp_path / "x").exists()


def test_bad_steps_and_folders_are_refused_naming_the_setting(tmp_path):
    for steps in ([], [-1], ["10"], [1.5], 10):
        with pytest.raises(ConfigError, match=r"^steps: expected"):
            RewindCheckpoints(steps, tmp_path)
    with pytest.raises(ConfigError, match=r"dirpath: .* is not a folder"):
        rewind_checkpoints(tmp_path / "none")
    with pytest.raises(ConfigError, match=r"holds no step_<k>\.safetensors files"):
        rewind_checkpoints(tmp_path)
    assert RewindCheckpoints([50, 0, 10, 10], tmp_path).steps == [0, 10, 50]


def _train_fn(data):
    (x, y), _ = data

    def train(net: nn.Module, noise_seed: int) -> nn.Module:
        """The user's own loop: 30 SGD steps, the batches drawn by ``noise_seed``."""
        loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True,
                            generator=torch.Generator().manual_seed(noise_seed))
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        for step, (xb, yb) in enumerate(loader):
            if step == 30:
                break
            opt.zero_grad()
            F.cross_entropy(net(xb), yb).backward()
            opt.step()
        return net

    return train


def test_sweep_reads_the_rewind_files_against_a_bare_template(trained, data):
    files = rewind_checkpoints(trained["root"] / "rewind")
    train = _train_fn(data)
    result = lmc.sweep(files, train, data=data[1], template=_net(0), alphas=5, threshold=0.02)
    assert [r["rewind_step"] for r in result.table] == [0, 5, 20]
    for row in result.table:
        assert row["split"] == "test" and row["pairs"] == 1 and row["status"] == "ok"
        assert 0 <= row["instability_mean"] < 1 and row["stable"] == (row["instability_mean"] < 0.02)
    assert result.first_stable_step in (None, 0, 5, 20)
    assert {(r["rewind_step"], r["pair"]) for r in result.curves} == {(k, "0-1") for k in (0, 5, 20)}
    # the same points as modules give the same numbers: the files were read as written
    modules = {}
    for k, path in files.items():
        net = _net(0)
        net.load_state_dict({n.removeprefix("model."): t for n, t in load_tensors(path)[0].items()})
        modules[k] = net
    again = lmc.sweep(modules, train, data=data[1], alphas=5, threshold=0.02)
    assert [r["instability_mean"] for r in again.table] == pytest.approx(
        [r["instability_mean"] for r in result.table], abs=1e-9)


def test_a_lightning_ckpt_interpolates_like_its_modules(trained, data, one_torch_thread):
    root, xt_yt = trained["root"], data[1]
    ref = lmc.interpolate(trained[1].model, trained[2].model, xt_yt, alphas=7)
    for template in (_net(0), Lit(_net(0))):  # the bare network ("model." stripped) or the LightningModule
        curve = lmc.interpolate(root / "seed1.ckpt", root / "seed2.ckpt", xt_yt, alphas=7, model=template)
        assert curve.error == pytest.approx(ref.error, abs=1e-6)
        assert curve.loss == pytest.approx(ref.loss, abs=1e-6)
    assert min(ref.error[0], ref.error[-1]) < 0.5


def test_timm_models_build_seeded_without_dropout_and_give_class_logits():
    pytest.importorskip("timm")
    from timm.layers import DropBlock2d, DropPath

    cfg = ModelConfig(name="timm/resnet10t", stem="cifar")
    model = build_model(cfg, (1, 28, 28), 10, seed=0)
    same, other = build_model(cfg, (1, 28, 28), 10, seed=0), build_model(cfg, (1, 28, 28), 10, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert not any(isinstance(m, (nn.Dropout, DropPath, DropBlock2d)) for m in model.modules())
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert (first_conv.in_channels, first_conv.kernel_size, first_conv.stride) == (1, (3, 3), (1, 1))
    x = torch.randn(2, 1, 28, 28)
    model.train()
    torch.manual_seed(0)
    logits = model(x)
    torch.manual_seed(1)  # nothing in the forward pass draws from torch's global generator
    assert logits.shape == (2, 10) and torch.equal(model(x), logits)
    with pytest.raises(ConfigError, match=r"model\.name: 'timm/nope' is not a timm model"):
        build_model(ModelConfig(name="timm/nope"), (1, 28, 28), 10, seed=0)
    with pytest.raises(ConfigError, match=r"model\.stem: the cifar stem is known for the timm families .*"
                                          r"not 'timm/test_convnext'"):
        build_model(ModelConfig(name="timm/test_convnext", stem="cifar"), (1, 28, 28), 10, seed=0)


def test_instability_refuses_a_train_fn_that_returns_no_module(data):
    net = _net(0)
    for returned, kind in ((lambda m, s: None, "NoneType"), (lambda m, s: m.state_dict(), "OrderedDict")):
        with pytest.raises(ConfigError, match=rf"train_fn: must return the trained nn.Module .*got {kind}"):
            lmc.instability(net, returned, data=data[1], alphas=3)


def test_the_package_does_not_import_lightning_and_says_what_to_install_without_it():
    code = (
        "import sys, stability.integrations as I\n"
        "assert not any(m == 'lightning' or m.startswith('lightning.') for m in sys.modules), 'imported'\n"
        "sys.modules['lightning'] = sys.modules['lightning.pytorch'] = None\n"
        "from stability.integrations import RewindCheckpoints, rewind_checkpoints\n"
        "try:\n"
        "    RewindCheckpoints([0], '.')\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert "pip install stability[lightning]" in out.stdout


LIT_PLUGIN = '''
from torch import nn
from stability.models import register_model


def lit_mlp(cfg, input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, num_classes))


register_model("lit_mlp", lit_mlp, replace=True)
'''


def test_stability_connect_reads_the_rewind_files_and_a_lightning_ckpt(trained, data, tmp_path, monkeypatch, capsys):
    """The CLI connects a RewindCheckpoints file (the LightningModule's state: ``model.`` keys) and a Lightning
    ``.ckpt``, and its barrier is lmc's on the same networks and the same test split."""
    import json

    from stability.apps.cli import main

    (tmp_path / "lit_plugin.py").write_text(LIT_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lit_plugin", raising=False)
    files = rewind_checkpoints(trained["root"] / "rewind")
    out = tmp_path / "runs"
    argv = ["connect", str(files[20]), str(trained["root"] / "seed2.ckpt"), "--model", "lit_mlp", "--plugin",
            "lit_plugin", "--dataset", "mnist5k", "--set", "dataset.val_size=0", "--alphas", "5", "--out", str(out),
            "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    net = _net(0)
    expected = lmc.barrier(files[20], trained["root"] / "seed2.ckpt", data[1], alphas=5, model=net)
    assert summary["barrier"]["test"] == pytest.approx(expected, abs=1e-6)
    assert [p.name.split("_")[0] for p in out.iterdir()] == ["connect"]
    sys.modules.pop("lit_plugin", None)
