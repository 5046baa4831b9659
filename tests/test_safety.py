"""Pickled code is refused; checkpoints are written atomically; a NaN loss stops the run."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import phantom_overrides
from tb_lightning.callbacks import StopOnNonFiniteLoss, TrainingDivergedError
from tb_lightning.checkpoint_io import AtomicCheckpointIO
from tb_lightning.errors import UserError, WeightsError
from tb_lightning.train import train
from test_config import compose_train


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
    assert str(err.value).startswith(f"model.net.weights={weights} is not a plain state dict")
    assert "could run code" in str(err.value)
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
