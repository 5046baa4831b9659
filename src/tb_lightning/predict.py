"""`python -m tb_lightning.predict ckpt_path=<ckpt> input=<file|folder|csv> [saliency=true]`.

ckpt_path may also be a k-fold multirun directory: its jobs' checkpoints predict as one ensemble
(trained/ensemble.py).

Writes predictions.csv (path, p_tb, predicted label and class, threshold, and whether the model
saw the image in training: seen_in_training, seen_by), skipped.csv for files that could not be
read, and with saliency=true a Grad-CAM overlay per image in saliency/. The log warns when some
inputs are images or patients of the model's train or val split (inference/seen.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from tb_lightning.config import CONF_DIR
from tb_lightning.config.entry import run_entry, trained_model_of

log = logging.getLogger(__name__)


def predict(cfg: DictConfig) -> Path:
    # Imported here: torch and friends take seconds, which --help should not.
    from tb_lightning.config.checks import check_predict_config
    from tb_lightning.core.artefacts import threshold_text
    from tb_lightning.inference.predict_files import collect_inputs, run_prediction
    from tb_lightning.trained.runner import pick_device

    check_predict_config(cfg)  # every value, before the checkpoint or any image is read
    output_dir = Path(cfg.paths.output_dir)
    paths = collect_inputs(cfg.get("input"))
    loaded, threshold, threshold_source = trained_model_of(
        cfg,
        "saliency=true needs one checkpoint (Grad-CAM of an ensemble is not drawn); pass one of "
        "its jobs' checkpoints/best.ckpt."
        if cfg.saliency
        else None,
    )
    log.info("Operating threshold p_tb >= %s (%s)", threshold_text(threshold), threshold_source)
    run_prediction(
        loaded,
        paths,
        threshold,
        threshold_source,
        output_dir,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        saliency=bool(cfg.saliency),
        device=pick_device(cfg.trainer.accelerator),
    )
    return output_dir


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="predict")
def main(cfg: DictConfig) -> None:
    run_entry(cfg, predict, f"Predicting {cfg.input} with {cfg.ckpt_path}")


if __name__ == "__main__":
    main()
