"""callbacks=swa: the saved, scored and evaluated weights are the mean of the named epochs'
weights (checked against per-epoch checkpoints), with BatchNorm's statistics recomputed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import phantom_overrides, run_cli
from tb_lightning.config.checks import check_weight_averaging
from tb_lightning.core.errors import ConfigError

EVERY_EPOCH = [
    "+callbacks.every_epoch._target_=lightning.pytorch.callbacks.ModelCheckpoint",
    "+callbacks.every_epoch.filename='e{epoch}'",
    "+callbacks.every_epoch.save_top_k=-1",
    "+callbacks.every_epoch.monitor=null",
    # Only to differ from last_checkpoint's state key (Lightning refuses two alike).
    "+callbacks.every_epoch.mode=max",
]


def train_swa(phantom_root: Path, run: Path, *overrides: str) -> dict:
    result = run_cli(
        "tb_lightning.train",
        *phantom_overrides(phantom_root),
        "callbacks=swa",
        *EVERY_EPOCH,
        f"+callbacks.every_epoch.dirpath={run / 'epochs'}",
        *overrides,
        f"hydra.run.dir={run}",
        warm=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((run / "metrics.json").read_text())


def state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def epoch_file(run: Path, epoch: int) -> Path:
    return run / "epochs" / f"eepoch={epoch}.ckpt"


def assert_mean_of(saved: dict, parts: list[dict], keys: list[str]) -> None:
    assert keys
    for key in keys:
        expected = torch.stack([p[key].double() for p in parts]).mean(0)
        torch.testing.assert_close(saved[key].double(), expected, rtol=1e-6, atol=1e-7)


def test_a_head_without_batchnorm_is_the_mean_of_its_epochs(phantom_root, tmp_path):
    run = tmp_path / "run"
    metrics = train_swa(
        phantom_root, run, "trainer.max_epochs=4", "callbacks.weight_averaging.swa_epoch_start=2"
    )
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["weight_averaging"] == {
        "method": "swa",
        "epochs": [0, 2],
        "batchnorm_recomputed": False,
    }
    params = [k for k in saved["state_dict"] if k.startswith("net.head")]
    # swa_epoch_start=2 (from 1): Lightning adds the weights at the start of epochs 1, 2 and 3
    # (from 0), those after epochs 0, 1 and 2.
    assert_mean_of(saved["state_dict"], [state(epoch_file(run, e)) for e in (0, 1, 2)], params)
    last_epoch = state(epoch_file(run, 3))
    assert any(not torch.equal(saved["state_dict"][k], last_epoch[k]) for k in params)
    assert metrics["weight_averaging"]["epochs"] == [0, 2]
    report = (run / "report.txt").read_text()
    assert "Weights: the mean of the weights after epochs 0-2 (callbacks=swa)\n" in report

    # eval of the same file gives train's figures: the averaged weights are the ones scored.
    result = run_cli(
        "tb_lightning.eval",
        f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
        "eval.report_images=false",
        f"hydra.run.dir={tmp_path / 'eval'}",
        warm=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["val/auroc"] == pytest.approx(metrics["val/auroc"], abs=1e-9)
    assert evaluated["weight_averaging"] == saved["weight_averaging"]
    assert "(callbacks=swa)" in (tmp_path / "eval" / "report.txt").read_text()


def test_a_batchnorm_network_gets_its_statistics_recomputed(phantom_root, tmp_path):
    run = tmp_path / "run"
    train_swa(
        phantom_root,
        run,
        "model.net.arch=compact_tb",
        "model.net.freeze_features=false",
        "trainer.max_epochs=3",
        "callbacks.weight_averaging.swa_epoch_start=2",
    )
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["weight_averaging"]["batchnorm_recomputed"] is True
    assert saved["weight_averaging"]["epochs"] == [0, 1]
    weights = state(run / "checkpoints" / "last.ckpt")
    params = [k for k in weights if k.endswith(".weight") and "running" not in k]
    assert_mean_of(weights, [state(epoch_file(run, 0)), state(epoch_file(run, 1))], params)
    # The statistics were recomputed for the averaged weights, not taken from an epoch.
    stats = [k for k in weights if k.endswith("running_mean")]
    assert stats
    for epoch in (0, 1, 2):
        other = state(epoch_file(run, epoch))
        assert any(not torch.allclose(weights[k], other[k]) for k in stats)
    assert "BatchNorm statistics recomputed for them" in (run / "report.txt").read_text()
    # The progress log names Lightning's extra epoch for what it is.
    assert (
        "Epoch 4/4 (callbacks=swa: the averaged weights, BatchNorm statistics recomputed)"
        in (run / "train.log").read_text()
    )


@pytest.mark.parametrize(
    ("callbacks", "max_epochs", "message"),
    [
        ({"model_checkpoint": {"monitor": "val/loss"}}, 10, "callbacks.model_checkpoint cannot"),
        ({"early_stopping": {"patience": 5}}, 10, "callbacks.early_stopping cannot"),
        ({}, 2, "trainer.max_epochs of 3 or more"),
        ({"start": 0.15}, 10, "it is epoch 1"),
        ({"start": 1}, 10, "swa_epoch_start=1 "),
        ({"start": 10}, 10, "swa_epoch_start=10"),
        ({"start": 1.5}, 10, "swa_epoch_start=1.5"),
        ({"swa_lrs": 0}, 10, "swa_lrs=0"),
    ],
)
def test_weight_averaging_mistakes_are_one_sentence(callbacks, max_epochs, message):
    averaging = {
        "swa_lrs": callbacks.pop("swa_lrs", 1e-3),
        "swa_epoch_start": callbacks.pop("start", 0.75),
    }
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        check_weight_averaging({"weight_averaging": averaging, **callbacks}, max_epochs)
    check_weight_averaging({"weight_averaging": {"swa_lrs": 1e-3}}, 4)
    check_weight_averaging({"model_checkpoint": {"monitor": "val/loss"}}, 1)  # no averaging
