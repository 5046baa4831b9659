"""Weight averaging (`callbacks=swa`): Lightning's StochasticWeightAveraging, made to save what
it averaged.

What Lightning's callback does (2.x): from epoch `swa_epoch_start` (counted from 1; a float is a
share of max_epochs) it anneals the learning rate to `swa_lrs` (SWALR, replacing
model.scheduler) and, at the start of each epoch from there to the last, adds the weights as
they are then to a running mean: with max_epochs 30 and 0.75, the weights after epochs 20-28
(counted from 0, as the reports count), so not those of the last epoch. A network with
BatchNorm gets one more pass over the training images (an extra "epoch" with no backward pass)
with the averaged weights, to recompute the BatchNorm statistics the averaged weights need; its
validation is the averaged model's.

What this subclass adds: the averaged weights are what is saved. Lightning copies them into the
module only at the end of training (without BatchNorm), after last.ckpt was written with the
last epoch's weights; here last.ckpt is written again once the module holds them, so that
train's final scoring, eval, predict, ensembles and export all use the averaged model. A best.ckpt
chosen on the validation loss would be an unaveraged epoch: config/checks.py refuses
callbacks.model_checkpoint (and early stopping, which would stop before the average is made)
beside it.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, StochasticWeightAveraging

from tb_lightning.trained.checkpoint import WEIGHT_AVERAGING_KEY

log = logging.getLogger(__name__)


class WeightAveraging(StochasticWeightAveraging):
    """StochasticWeightAveraging whose averaged weights end up in checkpoints/last.ckpt, marked
    there (WEIGHT_AVERAGING_KEY) so that the reports can say what the weights are."""

    def __init__(self, swa_lrs: float, swa_epoch_start: float | int = 0.75, **kwargs: Any):
        super().__init__(swa_lrs=swa_lrs, swa_epoch_start=swa_epoch_start, **kwargs)
        self._holds_average = False  # the module's weights are the average (not saved state)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        bn_pass = (
            f", then one pass over the training images (shown as epoch {self.swa_end + 2}, no "
            "weight changes) recomputes BatchNorm's statistics for them"
            if self._model_contains_batch_norm
            else ""
        )
        log.info(
            "callbacks=swa: the mean of the weights after epochs %d-%d (counted from 0) is the "
            "model%s; the learning rate anneals to %s from epoch %d; checkpoints/last.ckpt holds "
            "the average",
            *self.averaged_epochs,
            bn_pass,
            self._swa_lrs,
            self.swa_start,
        )

    @property
    def averaged_epochs(self) -> tuple[int, int]:
        """The first and last epoch (from 0) whose end-of-epoch weights are in the average."""
        return self.swa_start - 1, self.swa_end - 1

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        # Lightning's BatchNorm pass: the averaged weights are in the module from now on.
        if self._model_contains_batch_norm and trainer.current_epoch == self.swa_end + 1:
            self._holds_average = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        finished = trainer.current_epoch - 1 >= self.swa_end
        super().on_train_end(trainer, pl_module)
        if not finished or self._model_contains_batch_norm:
            # Interrupted: last.ckpt stays the last finished epoch, to resume. With BatchNorm,
            # last.ckpt was written after the BatchNorm pass: it holds the average already.
            return
        self._holds_average = True
        last = last_checkpoint_path(trainer)
        if last:
            trainer.save_checkpoint(last)
            log.info("Saved the averaged weights (callbacks=swa) in %s", last)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._holds_average:
            first, last = self.averaged_epochs
            checkpoint[WEIGHT_AVERAGING_KEY] = {
                "method": "swa",
                "epochs": [first, last],
                "batchnorm_recomputed": bool(self._model_contains_batch_norm),
            }


def is_batchnorm_pass(trainer: L.Trainer, epoch: int) -> bool:
    """Whether `epoch` is the one Lightning's StochasticWeightAveraging adds after the last for
    a network with BatchNorm: no backward pass, BatchNorm's statistics recomputed for the
    averaged weights (the progress log says so)."""
    return any(
        isinstance(cb, StochasticWeightAveraging)
        and getattr(cb, "_model_contains_batch_norm", False)
        and epoch == cb.swa_end + 1
        for cb in trainer.callbacks
    )


def last_checkpoint_path(trainer: L.Trainer) -> str | None:
    """The path of the unmonitored ModelCheckpoint's file (callbacks.last_checkpoint:
    checkpoints/last.ckpt), that named `last` first if there are several."""
    unmonitored = [
        cb
        for cb in trainer.checkpoint_callbacks
        if isinstance(cb, ModelCheckpoint) and cb.monitor is None
    ]
    unmonitored.sort(key=lambda cb: cb.filename != "last")
    return (unmonitored[0].best_model_path or None) if unmonitored else None
