"""Pickled code is refused; checkpoints are written atomically; a NaN loss stops the run."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import compose_train, phantom_overrides
from tb_lightning.core.errors import UserError, WeightsError
from tb_lightning.engine.callbacks import StopOnNonFiniteLoss, TrainingDivergedError
from tb_lightning.engine.checkpoint_io import AtomicCheckpointIO
from tb_lightning.models.classifier import TBClassifier
from tb_lightning.models.torch_file import load_checkpoint
from tb_lightning.train import train
from tb_lightning.trained.checkpoint import load_checkpoint_file

# Checkpoints loaded, nothing trained (the refused runs stop before any epoch): loads without
# the discarded init (conftest).
pytestmark = pytest.mark.usefixtures("quick_loads")


class Payload:
    """Unpickling this runs os.system: what a booby-trapped checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_malicious(path: Path, marker: Path) -> Path:
    with path.open("wb") as f:
        pickle.dump({"state_dict": {}, "epoch": 0, "boom": Payload(marker)}, f, protocol=2)
    return path


def test_malicious_pickle_as_ckpt_path_is_refused(phantom_root, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = write_malicious(tmp_path / "evil.ckpt", marker)
    cfg = compose_train(
        [*phantom_overrides(phantom_root), f"ckpt_path={ckpt}"], output_dir=tmp_path / "run"
    )
    with pytest.raises(UserError) as err:
        train(cfg)
    assert str(err.value).startswith(f"ckpt_path={ckpt} was refused because loading it could run")
    assert not marker.exists()


def test_malicious_pickle_as_weights_is_refused(phantom_root, tmp_path):
    marker = tmp_path / "pwned"
    weights = write_malicious(tmp_path / "evil.pth", marker)
    cfg = compose_train(
        [*phantom_overrides(phantom_root), f"model.net.weights={weights}"],
        output_dir=tmp_path / "run",
    )
    with pytest.raises(WeightsError) as err:
        train(cfg)
    assert str(err.value).startswith(f"model.net.weights={weights} was refused because loading")
    assert "could run code (it asks for posix.system" in str(err.value)
    assert "weights_only" not in str(err.value)
    assert not marker.exists()


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"epoch": 0, "w": torch.ones(3)}, path)

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # what a signal in the middle of torch.save looks like

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"epoch": 1, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path, weights_only=True)["epoch"] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~current_umask())


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_nan_loss_stops_with_one_sentence_naming_the_last_good_checkpoint(tmp_path):
    good = tmp_path / "last.ckpt"
    good.write_bytes(b"x")
    last_cb = SimpleNamespace(monitor=None, best_model_path=str(good))
    optimizer = SimpleNamespace(param_groups=[{"lr": 0.5}])
    trainer = SimpleNamespace(
        checkpoint_callbacks=[last_cb], optimizers=[optimizer], current_epoch=3
    )
    callback = StopOnNonFiniteLoss()
    callback.on_train_batch_end(trainer, None, {"loss": torch.tensor(0.7)}, None, 0)
    with pytest.raises(TrainingDivergedError) as err:
        callback.on_train_batch_end(trainer, None, {"loss": torch.tensor(float("nan"))}, None, 5)
    message = str(err.value)
    assert message.startswith("Training stopped: the loss became nan at epoch 3, batch 5;")
    assert f"the last good checkpoint is {good}" in message
    assert "model.optimizer.lr (now 0.5)" in message
    assert isinstance(err.value, UserError)


# --- Bad checkpoint and weight files: one sentence on what is wrong with the file (issue 14) ---

TINY_OPTIMIZER = {"_target_": "torch.optim.Adam", "lr": 1e-4}


def save_checkpoint(path: Path, arch: str = "alexnet", edit: dict | None = None) -> Path:
    """What tb_lightning.train writes, without training; `edit` changes its hparams' net."""
    net = {"arch": arch, "weights": None, "freeze_features": False, "image_size": 128}
    model = TBClassifier(net={**net, "hidden_dim": 8}, optimizer=TINY_OPTIMIZER, threshold=0.5)
    hparams = dict(model.hparams)
    hparams["net"] = {**hparams["net"], **(edit or {})}
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams, "epoch": 0}, path)
    return path


def checkpoint_error(path: Path) -> str:
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert message.startswith(f"Checkpoint {path} ")
    assert "weights_only" not in message
    assert "\n" not in message
    return message


def test_a_missing_checkpoint_is_named(tmp_path):
    message = checkpoint_error(tmp_path / "nope.ckpt")
    assert "does not exist" in message


def test_an_empty_checkpoint_is_called_empty(tmp_path):
    path = tmp_path / "empty.ckpt"
    path.write_bytes(b"")
    assert "is empty (0 bytes)" in checkpoint_error(path)


@pytest.mark.parametrize(
    "content, looks",
    [
        (bytes(range(1, 256)) * 8, "its first bytes are not those of a torch.save file"),
        (b"epochs: 3\nlr: 0.1\n", "it is a text file starting 'epochs: 3'"),
        (b"\x89PNG\r\n\x1a\n" + bytes(200), "it is a PNG image"),
        (pickle.dumps({"state_dict": {}}, protocol=4), "a plain Python pickle"),
    ],
    ids=["random-bytes", "text", "png", "plain-pickle"],
)
def test_a_file_that_is_no_pytorch_file_is_called_so(tmp_path, content, looks):
    path = tmp_path / "best.ckpt"
    path.write_bytes(content)
    message = checkpoint_error(path)
    assert "is not a PyTorch file" in message
    assert looks in message
    assert "could run code" not in message


@pytest.mark.parametrize("keep", [0.5, 0.98], ids=["half", "last-bytes-missing"])
def test_a_truncated_checkpoint_is_called_truncated(tmp_path, keep):
    good = save_checkpoint(tmp_path / "good.ckpt")
    data = good.read_bytes()
    path = tmp_path / "cut.ckpt"
    path.write_bytes(data[: int(len(data) * keep)])
    message = checkpoint_error(path)
    assert "is truncated or damaged" in message
    assert "cut short" in message


def test_a_checkpoint_with_pickled_code_is_refused_naming_the_object(tmp_path):
    marker = tmp_path / "pwned"
    path = write_malicious(tmp_path / "evil.ckpt", marker)
    message = checkpoint_error(path)
    assert "was refused because loading it could run code" in message
    assert f"{os.system.__module__}.system" in message  # posix.system
    assert not marker.exists()


def test_a_zipped_checkpoint_with_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "boom": Payload(marker)}, path)
    assert "could run code" in checkpoint_error(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "obj, problem",
    [
        ({"net.head.1.weight": torch.zeros(1, 2)}, "holds a plain state dict (1 tensors)"),
        ({"state_dict": {}, "epoch": 3}, "no hyper_parameters (its keys: state_dict, epoch)"),
        (torch.zeros(3), "holds a Tensor, not a Lightning checkpoint"),
    ],
    ids=["state-dict", "no-hyper-parameters", "tensor"],
)
def test_a_loadable_file_that_is_no_checkpoint_is_called_so(tmp_path, obj, problem):
    path = tmp_path / "model.ckpt"
    torch.save(obj, path)
    assert problem in checkpoint_error(path)


def test_a_good_checkpoint_loads(tmp_path):
    checkpoint = load_checkpoint(save_checkpoint(tmp_path / "best.ckpt"))
    assert checkpoint["hyper_parameters"]["net"]["arch"] == "alexnet"


def test_a_checkpoint_of_another_architecture_names_the_keys(tmp_path):
    # A resnet18 checkpoint whose hyper_parameters were edited to say alexnet.
    path = save_checkpoint(tmp_path / "edited.ckpt", arch="resnet18", edit={"arch": "alexnet"})
    with pytest.raises(UserError) as err:
        load_checkpoint_file(path)
    message = str(err.value)
    assert message.startswith(f"Checkpoint {path} does not fit the network")
    assert "model.net.arch=alexnet" in message
    assert "lacks 10 keys of the network (net.features.0.weight, net.features.0.bias, " in message
    assert "has 120 keys the network does not (net.features.conv1.weight, " in message
    assert "120 in all" in message
    assert "weights_only" not in message and "\n" not in message


def test_a_checkpoint_of_another_head_size_names_the_mis_shaped_keys(tmp_path):
    path = save_checkpoint(tmp_path / "edited.ckpt", edit={"image_size": 224})
    with pytest.raises(UserError) as err:
        load_checkpoint_file(path)
    message = str(err.value)
    assert "image_size=224" in message
    assert "has 1 key with the wrong shape (net.head.1.weight 8x2304 for 8x9216)" in message
