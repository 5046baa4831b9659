"""Lightning callbacks of this project (conf/callbacks/)."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from tb_lightning.data.sources import CLASS_NAMES


def custom_scalars_layout(class_names: Sequence[str] = CLASS_NAMES) -> dict:
    """TensorBoard's Custom Scalars layout: train vs val curves and per-class P/R/F1 charts.

    Tags are regular expressions; "Multiline" draws every matching tag in one chart.
    """
    layout = {
        "Loss and ranking": {
            "loss: train vs val": ["Multiline", [r"^(train|val)/loss$"]],
            "accuracy: train vs val": ["Multiline", [r"^(train|val)/acc$"]],
            "AUROC: train vs val": ["Multiline", [r"^(train|val)/auroc$"]],
        }
    }
    for name in class_names:
        layout[f"Class {name}"] = {
            f"val precision/recall/F1 ({name})": [
                "Multiline",
                [rf"^val/(precision|recall|f1)/{name}$"],
            ],
            f"F1 train vs val ({name})": ["Multiline", [rf"^(train|val)/f1/{name}$"]],
        }
    return layout


class CustomScalarsLayout(L.Callback):
    """Writes the Custom Scalars layout into each run's TensorBoard event file at fit start.

    Lightning's TensorBoardLogger has no option for it, so the callback calls the underlying
    SummaryWriter's `add_custom_scalars`.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_custom_scalars(custom_scalars_layout())
