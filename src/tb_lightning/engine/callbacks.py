"""Lightning callbacks of this project: exact resume, a guard against NaN, and TensorBoard's
Custom Scalars layout and confusion-matrix images. (Stops by signal: tb_lightning/signals.py.)

Configured in conf/callbacks/default.yaml.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from tb_lightning.core.errors import UserError
from tb_lightning.core.labels import CLASS_NAMES

log = logging.getLogger(__name__)


class TrainingDivergedError(UserError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


def last_checkpoint_callback(trainer: L.Trainer) -> ModelCheckpoint | None:
    """The ModelCheckpoint that writes last.ckpt every epoch (the one without a monitor)."""
    return next((cb for cb in trainer.checkpoint_callbacks if cb.monitor is None), None)


def last_good_checkpoint(trainer: L.Trainer) -> str | None:
    """Path of the last end-of-epoch checkpoint written in this run (or restored from), if any."""
    callback = last_checkpoint_callback(trainer)
    path = callback.best_model_path if callback is not None else ""
    return path if path and Path(path).is_file() else None


class RNGStateCheckpoint(Callback):
    """Saves the torch/numpy/python RNG states in every checkpoint and restores them on resume.

    Lightning restores the weights, the optimizer and the loop counters but not the global RNGs
    that draw the shuffling order and the dropout masks, so a resumed run would take other random
    draws than an uninterrupted one. last.ckpt is written at the end of an epoch, right before the
    next epoch creates its DataLoader iterator; on resume the states are set back while Lightning
    restores the checkpoint, and nothing draws from them before that same iterator is created
    (the sanity check runs under Lightning's `isolate_rng`). They are stored as tensors and plain
    lists so that the checkpoint still loads with `weights_only=True`.
    """

    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        py_state = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": [py_state[0], list(py_state[1]), py_state[2]],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        if state_dict["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
        name, keys, *rest = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        version, internal, gauss = state_dict["python"]
        random.setstate((version, tuple(internal), gauss))
        log.info("Restored the random number generators of the checkpoint (exact resume).")


class StopOnNonFiniteLoss(Callback):
    """Stops training at the first NaN/inf training loss with one clear sentence.

    Lightning's EarlyStopping(check_finite=True) only looks at a validation metric once per epoch;
    this checks every training step, before the bad weights reach a checkpoint. The last
    end-of-epoch checkpoint is kept as it is.
    """

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None or torch.isfinite(loss).all():
            return
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else math.nan
        last = last_good_checkpoint(trainer)
        kept = (
            f"the last good checkpoint is {last}"
            if last
            else "no epoch had finished, so there is no checkpoint"
        )
        raise TrainingDivergedError(
            f"Training stopped: the loss became {loss.item()} at epoch {trainer.current_epoch}, "
            f"batch {batch_idx}; {kept}. Lower model.optimizer.lr (now {lr:g}) or check the "
            "input images, then train again."
        )


def custom_scalars_layout(class_names: Sequence[str] = CLASS_NAMES) -> dict:
    """TensorBoard's Custom Scalars layout: train vs val curves and per-class P/R/F1 charts.

    Tags are regular expressions; "Multiline" draws every matching tag in one chart. The
    threshold-dependent curves carry their fixed threshold in the name (`acc@0.5`).
    """
    layout = {
        "Loss and ranking": {
            "loss: train vs val": ["Multiline", [r"^(train|val)/loss$"]],
            "AUROC: train vs val": ["Multiline", [r"^(train|val)/auroc$"]],
            "accuracy at the fixed threshold: train vs val": [
                "Multiline",
                [r"^(train|val)/acc@[0-9.]+$"],
            ],
        }
    }
    for name in class_names:
        layout[f"Class {name}"] = {
            f"val precision/recall/F1 ({name}) at the fixed threshold": [
                "Multiline",
                [rf"^val/(precision|recall|f1)@[0-9.]+/{name}$"],
            ],
            f"F1 train vs val ({name}) at the fixed threshold": [
                "Multiline",
                [rf"^(train|val)/f1@[0-9.]+/{name}$"],
            ],
        }
    return layout


def tensorboard_logger(trainer: L.Trainer) -> TensorBoardLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


class CustomScalarsLayout(L.Callback):
    """Writes the Custom Scalars layout into each run's TensorBoard event file at fit start.

    Lightning's TensorBoardLogger has no option for it, so the callback calls the underlying
    SummaryWriter's `add_custom_scalars`.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tensorboard = tensorboard_logger(trainer)
        if tensorboard is not None:
            tensorboard.experiment.add_custom_scalars(custom_scalars_layout())


class ValConfusionImage(L.Callback):
    """Each validation epoch's confusion matrix as an image in TensorBoard's Images tab.

    Drawn like eval's confusion matrix (evaluation/figures.py), titled with the epoch and the
    fixed per-epoch threshold (`model.threshold`), at the same step as the scalars.
    """

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tensorboard = tensorboard_logger(trainer)
        confusion = getattr(pl_module, "val_confusion", None)
        if tensorboard is None or trainer.sanity_checking or not confusion:
            return
        from tb_lightning.evaluation.figures import confusion_figure

        threshold = pl_module.val_metrics.threshold
        fig = confusion_figure(
            confusion, threshold, title=f"val, epoch {trainer.current_epoch}, p_tb >= {threshold:g}"
        )
        # Lightning writes the epoch's val scalars at the index of the last training step taken.
        step = max(trainer.global_step - 1, 0)
        tensorboard.experiment.add_figure(
            f"val/confusion_matrix@{threshold:g}", fig, global_step=step, close=True
        )
