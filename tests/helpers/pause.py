"""A callback that makes a training subprocess stop at a known point so a test can kill it.

Added to a run with `+callbacks.pause._target_=helpers.pause.PauseAt` (tests/ on PYTHONPATH).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning as L


class PauseAt(L.Callback):
    """Before batch `batch` of epoch `epoch`: touch `flag_file`, then wait to be killed.

    Only once: when `flag_file` exists (a resume of the killed run, with the same overrides),
    it does nothing.
    """

    def __init__(self, epoch: int, batch: int, flag_file: str) -> None:
        self.epoch, self.batch, self.flag_file = epoch, batch, Path(flag_file)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch) and not (
            self.flag_file.exists()
        ):
            self.flag_file.write_text(f"epoch {self.epoch} batch {self.batch}\n")
            # The test sends SIGKILL, SIGTERM or SIGINT meanwhile; Lightning's SIGTERM handler
            # only sets a flag, acted upon after the batch.
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and not trainer.received_sigterm:
                time.sleep(0.1)


class SignalAt(L.Callback):
    """Before batch `batch` of epoch `epoch`, send `signum` to this very process (in-process
    tests of a stop during training)."""

    def __init__(self, epoch: int, batch: int, signum: int) -> None:
        self.epoch, self.batch, self.signum = epoch, batch, signum

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            os.kill(os.getpid(), self.signum)
