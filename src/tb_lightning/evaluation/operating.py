"""At the end of training: choose the operating threshold on validation, store it in the
checkpoint."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tb_lightning.core.artefacts import threshold_text
from tb_lightning.core.atomic import atomic_torch_save
from tb_lightning.evaluation.thresholds import choose_threshold
from tb_lightning.inference.checkpoint import CALIBRATION_KEY, THRESHOLD_KEY
from tb_lightning.models.torch_file import load_checkpoint

log = logging.getLogger(__name__)


def choose_operating_threshold(
    val_probs: np.ndarray, val_labels: Sequence[int], policy: str, target: float
) -> dict[str, Any]:
    """The threshold.policy's choice on the validation probabilities, as stored in checkpoints."""
    return {
        "value": choose_threshold(val_probs, np.asarray(val_labels), policy, target),
        "policy": policy,
        "target": float(target),
        "val_images": len(val_labels),
    }


def store_operating_threshold(
    checkpoint_path: str | Path,
    choice: dict[str, Any],
    calibration: dict[str, Any] | None = None,
) -> None:
    """Add the choice (and the fitted temperature, if any) to the checkpoint file (atomically)
    so that eval, predict and export use them.

    Only the checkpoint whose weights they were chosen with gets them.
    """
    checkpoint = load_checkpoint(checkpoint_path)
    checkpoint[THRESHOLD_KEY] = choice
    checkpoint.pop(CALIBRATION_KEY, None)
    if calibration:
        checkpoint[CALIBRATION_KEY] = calibration
    atomic_torch_save(checkpoint, checkpoint_path)
    log.info(
        "Operating threshold p_tb >= %s (threshold.policy=%s on %d val images), stored in %s",
        threshold_text(choice["value"]),
        choice["policy"],
        choice["val_images"],
        checkpoint_path,
    )
