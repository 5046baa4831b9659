"""Lightning callbacks of this project: exact resume, a guard against NaN, and what the terminal
shows (progress bar, model summary). TensorBoard's own callbacks are in engine/dashboard.py; stops
by signal in core/signals.py.

Configured in conf/callbacks/default.yaml.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ModelSummary, RichProgressBar

from tb_lightning.core.errors import UserError

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


class ProgressBar(RichProgressBar):
    """Lightning's Rich progress bar without `v_num`.

    `v_num` is the logger's version, here the run's name (`lr=0.0003,dropout=0.5`), which the
    bar cuts to its tail (`=0.5`); the run directory is printed at start instead. The val loss and
    AUROC that the module logs with prog_bar=True appear after each validation.
    """

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class OneLineModelSummary(ModelSummary):
    """The model summary in one log line: parameters, trainable ones, size.

    Lightning's table lists every submodule, metric objects included, and ends in "Total FLOPs:
    0"; fourteen rows per job in a sweep say less than this line.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        net = dict(getattr(pl_module, "hparams", {}).get("net") or {})
        features = "frozen" if net.get("freeze_features", True) else "trained"
        self.network = (
            f"{net.get('arch', 'alexnet')} (weights={net.get('weights')}, {features} features)"
        )
        super().on_fit_start(trainer, pl_module)

    def summarize(
        self,
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int = 0,
        **summarize_kwargs: Any,
    ) -> None:
        log.info(
            "Model: %s, %s parameters, %s trainable (%.1f MB)",
            getattr(self, "network", "the network"),
            f"{total_parameters:,}",
            f"{trainable_parameters:,}",
            model_size,
        )
