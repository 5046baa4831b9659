"""Rebuild a trained classifier from its checkpoint, with the operating threshold it stores."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tb_lightning.core.errors import UserError
from tb_lightning.data.preprocess import preprocess_spec
from tb_lightning.models.classifier import TBClassifier
from tb_lightning.models.torch_file import describe_key_mismatch, load_checkpoint

log = logging.getLogger(__name__)

# Where training stores the operating threshold chosen on the validation split.
THRESHOLD_KEY = "operating_threshold"
# Where training stores the temperature of calibration=temperature (with what it was fitted on).
CALIBRATION_KEY = "calibration"
# How that choice is described wherever a figure at it is reported (the reports test for it).
CHOSEN_ON_VAL = "chosen on the validation split"


def describe_threshold_choice(choice: dict[str, Any]) -> str:
    """`chosen on the validation split (60 images) by threshold.policy=youden`, for reports."""
    target = f", target {choice['target']}" if choice.get("policy") == "sensitivity" else ""
    images = f" ({choice['val_images']} images)" if choice.get("val_images") else ""
    if choice.get("chosen_on"):  # an ensemble's: evaluation/ensemble.py
        return f"chosen on {choice['chosen_on']}{images} by threshold.policy={choice['policy']}"
    return f"{CHOSEN_ON_VAL}{images} by threshold.policy={choice['policy']}{target}"


@dataclass
class LoadedModel:
    """A classifier in eval mode with what its checkpoint says about it."""

    model: TBClassifier
    checkpoint_path: Path
    image_size: int
    stored_threshold: dict[str, Any] | None  # train.py's threshold choice, if any
    hparams_threshold: float
    pos_weight: float
    calibration: dict[str, Any] | None = None  # {"temperature": T, "fitted_on": ...} or None
    # The images' preprocessing (data/preprocess.py preprocess_spec): None, or CLAHE's settings.
    preprocess: dict[str, Any] | None = None
    # An ensemble's members' checkpoints (evaluation/ensemble.py); None for one checkpoint.
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
    members: list[LoadedModel] | None = None
    # An ensemble's figures on the out-of-fold predictions its threshold was chosen on
    # (evaluation/ensemble.py); None for one checkpoint (its run's metrics.json has them).
    out_of_fold: dict[str, Any] | None = None

    @property
    def run_dir(self) -> Path:
        """The training run directory (checkpoints/<name>.ckpt lives one level below it); an
        ensemble's first member's."""
        if self.member_checkpoints:
            return self.member_checkpoints[0].parent.parent
        return self.checkpoint_path.parent.parent


def load_model(ckpt_path: str | Path | None) -> LoadedModel:
    """The TBClassifier of a checkpoint written by tb_lightning.train, ready for inference."""
    path = Path(ckpt_path).expanduser().resolve()
    checkpoint = load_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters")
    # load_checkpoint made sure of state_dict and hyper_parameters; these say what to build.
    absent = [k for k in ("net", "optimizer", "threshold") if k not in hparams]
    if absent:
        raise UserError(
            f"Checkpoint {path} holds no tb_lightning model (its hyper_parameters lack "
            f"{', '.join(absent)}); pass a checkpoints/best.ckpt written by tb_lightning.train."
        )
    # The checkpoint holds every weight: never look for (or download) ImageNet weights here.
    net = {**hparams["net"], "weights": None}
    # build_net warns that weights=null means random features; here the checkpoint's weights
    # replace them at once, so that warning would mislead.
    net_log = logging.getLogger("tb_lightning.models.net")
    level = net_log.level
    net_log.setLevel(logging.ERROR)
    try:
        model = TBClassifier(
            net=net,
            optimizer=hparams["optimizer"],
            threshold=hparams["threshold"],
            preprocess=hparams.get("preprocess"),
        )
    finally:
        net_log.setLevel(level)
    # A checkpoint of another architecture or head size (or with edited hyper_parameters) would
    # fail in load_state_dict with a long traceback: say which keys do not fit instead.
    mismatch = describe_key_mismatch(model.state_dict(), checkpoint["state_dict"])
    if mismatch:
        raise UserError(
            f"Checkpoint {path} does not fit the network its hyper_parameters describe "
            f"(model.net.arch={net.get('arch', 'alexnet')}, image_size={net.get('image_size')}): "
            f"its state_dict {mismatch}; pass a checkpoint written by tb_lightning.train, with "
            "its hyper_parameters unedited."
        )
    model.load_state_dict(checkpoint["state_dict"])
    calibration = checkpoint.get(CALIBRATION_KEY)
    if calibration:  # the model's logits are divided by it, as in train's final report
        model.temperature.fill_(float(calibration["temperature"]))
    model.eval()
    return LoadedModel(
        model=model,
        checkpoint_path=path,
        image_size=int(net["image_size"]),
        stored_threshold=checkpoint.get(THRESHOLD_KEY),
        hparams_threshold=float(hparams["threshold"]),
        pos_weight=float(model.pos_weight),
        calibration=calibration,
        # Checkpoints written before data.preprocess existed have none: no preprocessing.
        preprocess=preprocess_spec(hparams.get("preprocess")),
        epoch=checkpoint_int(checkpoint, "epoch"),
        global_step=checkpoint_int(checkpoint, "global_step"),
        net=dict(hparams["net"]),
    )


def checkpoint_int(checkpoint: dict[str, Any], key: str) -> int | None:
    """An integer entry of a Lightning checkpoint (epoch, global_step), None when absent."""
    value = checkpoint.get(key)
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def resolve_threshold(loaded: LoadedModel, override: float | None) -> tuple[float, str]:
    """(threshold, where it came from): threshold.value, else the stored choice, else 0.5."""
    if override is not None:  # in (0, 1): checked with the config
        return float(override), "threshold.value (command line)"
    stored = loaded.stored_threshold
    if stored:
        return float(stored["value"]), describe_threshold_choice(stored)
    log.warning(
        "Checkpoint %s stores no operating threshold (only best.ckpt gets one, at the end of "
        "training); using model.threshold=%s. Set one with threshold.value=...",
        loaded.checkpoint_path,
        loaded.hparams_threshold,
    )
    return loaded.hparams_threshold, "model.threshold (no threshold stored in the checkpoint)"
