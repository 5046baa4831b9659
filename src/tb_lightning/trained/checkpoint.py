"""One checkpoint file as a TrainedModel (trained/model.py), and the operating threshold and
temperature that training stores into it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tb_lightning.core.artefacts import threshold_text
from tb_lightning.core.atomic import atomic_torch_save
from tb_lightning.core.errors import UserError
from tb_lightning.data.preprocess import preprocess_spec
from tb_lightning.models.classifier import TBClassifier
from tb_lightning.models.torch_file import describe_key_mismatch, load_checkpoint
from tb_lightning.trained.model import TrainedModel

log = logging.getLogger(__name__)

# Where training stores the operating threshold chosen on the validation split.
THRESHOLD_KEY = "operating_threshold"
# Where training stores the temperature of calibration=temperature (with what it was fitted on).
CALIBRATION_KEY = "calibration"
# Averaged weights (callbacks=swa, engine/averaging.py): {"method", "epochs", ...}; absent else.
WEIGHT_AVERAGING_KEY = "weight_averaging"


def load_checkpoint_file(ckpt_path: str | Path | None) -> TrainedModel:
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
            tta=hparams.get("tta"),
            loss=hparams.get("loss") or "bce",  # checkpoints older than model.loss: BCE
            focal_gamma=hparams.get("focal_gamma"),
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
    return TrainedModel(
        model=model,
        checkpoint_path=path,
        image_size=int(net["image_size"]),
        stored_threshold=checkpoint.get(THRESHOLD_KEY),
        hparams_threshold=float(hparams["threshold"]),
        pos_weight=float(model.pos_weight),
        focal_gamma=model.focal_gamma,
        calibration=calibration,
        # Checkpoints written before data.preprocess existed have none: no preprocessing.
        preprocess=preprocess_spec(hparams.get("preprocess")),
        epoch=checkpoint_int(checkpoint, "epoch"),
        global_step=checkpoint_int(checkpoint, "global_step"),
        net=dict(hparams["net"]),
        weight_averaging=checkpoint.get(WEIGHT_AVERAGING_KEY),
    )


def checkpoint_int(checkpoint: dict[str, Any], key: str) -> int | None:
    """An integer entry of a Lightning checkpoint (epoch, global_step), None when absent."""
    value = checkpoint.get(key)
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


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
