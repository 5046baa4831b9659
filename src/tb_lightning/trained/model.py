"""What a trained model is, in one place: its network and the settings it must be used with."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tb_lightning.core.choices import preprocess_spec
from tb_lightning.models.classifier import TBClassifier
from tb_lightning.stats.thresholds import describe_threshold_choice
from tb_lightning.trained.runner import INFERENCE_BATCH_SIZE, Predictions, predict_images

log = logging.getLogger(__name__)


@dataclass
class TrainedModel:
    """A trained classifier in eval mode (one checkpoint's TBClassifier, or a k-fold folder's
    EnsembleModel) with what it needs to be used as trained: the image size and preprocessing,
    the operating threshold and how it was chosen, the calibration temperature, the members.

    Built by trained/load.py (load_trained_model: a checkpoint file or a k-fold folder) or, at
    the end of training, around the fitted classifier (`of_classifier`); eval, predict, export
    and train's final scoring all predict through `predict`.
    """

    model: nn.Module  # TBClassifier, or EnsembleModel of them
    checkpoint_path: Path
    image_size: int
    stored_threshold: dict[str, Any] | None  # train.py's threshold choice, if any
    hparams_threshold: float
    pos_weight: float
    # The training loss's focal gamma (stats/loss.py): 0 for the weighted BCE. The reports'
    # loss is this loss, with pos_weight.
    focal_gamma: float = 0.0
    calibration: dict[str, Any] | None = None  # {"temperature": T, "fitted_on": ...} or None
    # The images' preprocessing (data/preprocess.py preprocess_spec): None, or CLAHE's settings.
    preprocess: dict[str, Any] | None = None
    # An ensemble's members' checkpoints (trained/ensemble.py); None for one checkpoint.
    member_checkpoints: list[Path] | None = None
    # An ensemble's folds: {"num_folds": k, "seeds": [...], "missing_folds": [{"fold", "seed"}]}
    # (the folds left out with allow_partial=true); None for one checkpoint.
    ensemble_folds: dict[str, Any] | None = None
    # The checkpoint's epoch (Lightning's count, from 0) and global step; None for an ensemble,
    # whose members (`members`) each have theirs.
    epoch: int | None = None
    global_step: int | None = None
    # The network's settings (hyper_parameters["net"]: arch, weights, freeze_features, ...).
    net: dict[str, Any] | None = None
    # An ensemble's members, loaded; None for one checkpoint.
    members: list[TrainedModel] | None = None
    # An ensemble's figures on the out-of-fold predictions its threshold was chosen on
    # (trained/ensemble.py); None for one checkpoint (its run's metrics.json has them).
    out_of_fold: dict[str, Any] | None = None
    # Averaged weights (callbacks=swa): {"method", "epochs": [first, last], ...}; None else.
    weight_averaging: dict[str, Any] | None = None

    @property
    def run_dir(self) -> Path:
        """The training run directory (checkpoints/<name>.ckpt lives one level below it); an
        ensemble's first member's."""
        if self.member_checkpoints:
            return self.member_checkpoints[0].parent.parent
        return self.checkpoint_path.parent.parent

    @classmethod
    def of_classifier(
        cls,
        model: TBClassifier,
        checkpoint_path: str | Path | None,
        image_size: int,
        preprocess: Mapping[str, Any] | None,
    ) -> TrainedModel:
        """The classifier being trained, holding its chosen checkpoint's weights (train's final
        scoring: nothing is stored in it yet)."""
        return cls(
            model=model,
            checkpoint_path=Path(checkpoint_path) if checkpoint_path else Path(),
            image_size=int(image_size),
            stored_threshold=None,
            hparams_threshold=float(model.hparams["threshold"]),
            pos_weight=float(model.pos_weight),
            focal_gamma=model.focal_gamma,
            preprocess=preprocess_spec(preprocess),
        )

    def threshold_for(self, override: float | None) -> tuple[float, str]:
        """(threshold, where it came from): threshold.value, else the stored choice, else the
        model's 0.5 (with a warning)."""
        if override is not None:  # in (0, 1): checked with the config
            return float(override), "threshold.value (command line)"
        if self.stored_threshold:
            return float(self.stored_threshold["value"]), describe_threshold_choice(
                self.stored_threshold
            )
        log.warning(
            "Checkpoint %s stores no operating threshold (only best.ckpt gets one, at the end "
            "of training); using model.threshold=%s. Set one with threshold.value=...",
            self.checkpoint_path,
            self.hparams_threshold,
        )
        return self.hparams_threshold, "model.threshold (no threshold stored in the checkpoint)"

    def predict(
        self,
        paths: Sequence[str],
        batch_size: int = INFERENCE_BATCH_SIZE,
        num_workers: int = 0,
        device: torch.device | None = None,
        progress: bool = True,
        description: str = "Predicting",
    ) -> Predictions:
        """TB logits (temperature applied) for every image file, decoded and preprocessed as in
        training; bad files are marked, not run (trained/runner.py)."""
        return predict_images(
            self.model,
            paths,
            self.image_size,
            batch_size,
            num_workers,
            device,
            progress=progress,
            description=description,
            preprocess=self.preprocess,
        )

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """TB logits (N,) of images already decoded, resized and normalised as `predict` does."""
        with torch.inference_mode():
            return self.model.eval()(images)
