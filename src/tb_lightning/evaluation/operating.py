"""At the end of training: choose the operating threshold on validation, store it in best.ckpt."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from tb_lightning.evaluation.thresholds import choose_threshold
from tb_lightning.inference import THRESHOLD_KEY, predict_images
from tb_lightning.models.module import load_checkpoint

log = logging.getLogger(__name__)


def select_operating_threshold(
    model: torch.nn.Module,
    val_paths: list[str],
    val_labels: list[int],
    image_size: int,
    policy: str,
    target: float,
    checkpoint_path: str | None,
    batch_size: int = 32,
    num_workers: int = 0,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Choose the threshold on the validation images and add it to the checkpoint file.

    `model` must already hold the checkpoint's weights. The choice is written into the
    checkpoint (under "operating_threshold") so that eval and predict use it by default; only the
    checkpoint whose weights it was chosen with gets it.
    """
    predictions = predict_images(
        model, val_paths, image_size, batch_size, num_workers, device, progress=False
    )
    value = choose_threshold(predictions.probs, val_labels, policy, target)
    choice = {
        "value": value,
        "policy": policy,
        "target": float(target),
        "val_images": len(val_paths),
    }
    if checkpoint_path:
        checkpoint = load_checkpoint(checkpoint_path)
        checkpoint[THRESHOLD_KEY] = choice
        torch.save(checkpoint, Path(checkpoint_path))
        log.info(
            "Operating threshold p_tb >= %.4f (threshold.policy=%s on %d val images), stored in %s",
            value,
            policy,
            len(val_paths),
            checkpoint_path,
        )
    return choice
