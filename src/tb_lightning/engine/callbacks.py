"""Lightning callbacks of this project: exact resume, a guard against NaN, and what the terminal
or the log shows (progress bar or one line per epoch, model summary). TensorBoard's own callbacks
are in engine/dashboard.py; stops by signal in core/signals.py.

Configured in conf/callbacks/default.yaml.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ModelSummary, RichProgressBar

from tb_lightning.core.errors import UserError
from tb_lightning.core.progress import format_duration, interactive
from tb_lightning.engine.averaging import is_batchnorm_pass

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


class EpochProgressLog(Callback):
    """Away from a terminal (`make train > log`, nohup, SLURM, CI): one log line per epoch, and
    no progress bar, whose redrawn frames would fill the file with `\\r`.

        Epoch 3/10: train loss 0.5120, val loss 0.4981, val AUROC 0.8712; 12.3 s/epoch,
        ETA 1 min 26 s; job #2 of 8

    The line goes through logging, so it reaches stdout and the run's train.log. It is written
    when the epoch has ended completely, at the start of the next one (or at the end of
    training): Lightning calls callbacks' `on_train_epoch_end` before the module logs the
    epoch's train loss there. The seconds per epoch are the mean over the epochs of this
    process (checkpoint writing included), the ETA that mean times the epochs left to
    trainer.max_epochs (an early stop ends sooner). In a multirun the job's number and the
    sweep's size (sweep/naming.py job_label). At a terminal it does nothing: the bar is there.
    """

    def __init__(self) -> None:
        self.active = False
        self.job: str | None = None
        self.durations: list[float] = []
        self.epoch: int | None = None  # the epoch running, not yet reported
        self.started = 0.0
        self.validated = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.active = trainer.is_global_zero and not interactive()
        if not interactive() and trainer.progress_bar_callback is not None:
            # Ours (RichProgressBar) or Lightning's default TQDM bar when callbacks.progress_bar
            # is null: drawn frames are no use in a file.
            trainer.progress_bar_callback.disable()
        if self.active:
            from tb_lightning.sweep.naming import job_label

            self.job = job_label()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.report(trainer)
        self.epoch, self.started, self.validated = trainer.current_epoch, time.monotonic(), False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validated = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.report(trainer)

    def report(self, trainer: L.Trainer) -> None:
        """Log the line of the epoch that has just ended, if any."""
        if not self.active or self.epoch is None:
            return
        self.durations.append(time.monotonic() - self.started)
        log.info("%s", self.line(trainer, self.epoch))
        self.epoch = None

    def line(self, trainer: L.Trainer, epoch: int) -> str:
        """The epoch's line (its number counted from 1), from trainer.callback_metrics."""
        metrics = trainer.callback_metrics
        max_epochs = trainer.max_epochs if (trainer.max_epochs or -1) > 0 else None
        head = f"Epoch {epoch + 1}/{max_epochs}" if max_epochs else f"Epoch {epoch + 1}"
        if is_batchnorm_pass(trainer, epoch):
            head += " (callbacks=swa: the averaged weights, BatchNorm statistics recomputed)"
        shown = [("train loss", "train/loss")]
        if self.validated:  # else the val figures are an earlier epoch's
            shown += [("val loss", "val/loss"), ("val AUROC", "val/auroc")]
        figures = ", ".join(
            f"{name} {float(metrics[key]):.4f}" for name, key in shown if key in metrics
        )
        per_epoch = sum(self.durations) / len(self.durations)
        timing = f"{per_epoch:.1f} s/epoch"
        if max_epochs:
            timing += f", ETA {format_duration(per_epoch * max(0, max_epochs - epoch - 1))}"
        parts = [f"{head}: {figures}" if figures else head, timing]
        return "; ".join(parts + ([self.job] if self.job else []))


class OneLineModelSummary(ModelSummary):
    """The model summary in one log line: parameters, trainable ones, size.

    Lightning's table lists every submodule, metric objects included, and ends in "Total FLOPs:
    0"; fourteen rows per job in a sweep say less than this line.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        hparams = getattr(pl_module, "hparams", {})
        net = dict(hparams.get("net") or {})
        features = "frozen" if net.get("freeze_features", True) else "trained"
        tta = f", model.tta={hparams['tta']} out of training" if hparams.get("tta") else ""
        self.network = (
            f"{net.get('arch', 'alexnet')} (weights={net.get('weights')}, {features} features{tta})"
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
