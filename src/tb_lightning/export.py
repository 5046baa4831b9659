"""`python -m tb_lightning.export ckpt_path=<ckpt> format=onnx|torchscript`.

ckpt_path may also be a k-fold multirun directory: its jobs' checkpoints become one ensemble
file, with the threshold chosen on their out-of-fold predictions (trained/ensemble.py).

Writes model.onnx (or model.pt) and model.json into outputs/export/runs/<timestamp>/.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from tb_lightning.config import CONF_DIR
from tb_lightning.config.entry import run_entry, trained_model_of

log = logging.getLogger(__name__)


def export(cfg: DictConfig) -> dict[str, Any]:
    # Imported here: torch and friends take seconds, which --help should not.
    from tb_lightning.config.checks import check_export_config
    from tb_lightning.inference.deploy import export_model

    check_export_config(cfg)  # every value, before the checkpoint is read
    output_dir = Path(cfg.paths.output_dir)
    # A k-fold multirun directory exports its fold models as one ensemble file.
    loaded, threshold, threshold_source = trained_model_of(cfg)
    sidecar = export_model(
        loaded, cfg.format, output_dir, threshold, threshold_source, cfg.check_images
    )
    return sidecar


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="export")
def main(cfg: DictConfig) -> None:
    run_entry(cfg, export, f"Exporting {cfg.ckpt_path} as {cfg.format}")


if __name__ == "__main__":
    main()
