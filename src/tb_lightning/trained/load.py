"""`ckpt_path` as eval, predict and export take it: one checkpoint file, or a k-fold multirun
directory as one ensemble; both come back as a TrainedModel."""

from __future__ import annotations

import logging
from pathlib import Path

from tb_lightning.core.errors import ConfigError
from tb_lightning.stats.calibration import warnings_of
from tb_lightning.trained.checkpoint import load_checkpoint_file
from tb_lightning.trained.ensemble import load_ensemble
from tb_lightning.trained.model import TrainedModel

log = logging.getLogger(__name__)


def load_trained_model(
    ckpt_path: str | Path | None,
    ensemble_refusal: str | None = None,
    allow_partial: bool = False,
    policy: str | None = None,
    target: float | None = None,
) -> TrainedModel:
    """`ensemble_refusal`: why this command cannot use an ensemble (the sentence's reason), or
    None when it can; `allow_partial`: accept an ensemble with folds missing
    (allow_partial=true); `policy`, `target`: an ensemble's threshold policy instead of its
    members' (threshold.policy, threshold.target on the command line)."""
    # The entry points' config checks refuse this first; a new command without them still gets
    # the sentence instead of "Checkpoint <cwd>/None does not exist".
    if ckpt_path is None or str(ckpt_path).strip() == "":
        raise ConfigError(
            "ckpt_path is not set; pass ckpt_path=outputs/train/runs/<run>/checkpoints/best.ckpt "
            "(or a k-fold multirun directory)."
        )
    path = Path(str(ckpt_path)).expanduser()
    if not path.is_dir() and policy is not None:
        raise ConfigError(
            f"threshold.policy={policy} chooses a k-fold ensemble's threshold on its out-of-fold "
            f"predictions, but ckpt_path={path} is one checkpoint, whose threshold was chosen "
            "when it was trained: pass threshold.value=<p_tb> instead, or train again with "
            f"threshold.policy={policy}."
        )
    if not path.is_dir():
        trained = load_checkpoint_file(path)
        # Repeated wherever the temperature is applied (eval, predict, export): its
        # probabilities are not calibrated ones.
        for warning in warnings_of(trained.calibration) if trained.calibration else []:
            log.warning("The checkpoint's calibration temperature: %s", warning)
        return trained
    if ensemble_refusal:
        raise ConfigError(f"ckpt_path={path} is a multirun (an ensemble), but {ensemble_refusal}")
    return load_ensemble(path, allow_partial, policy, target)
