"""`python -m tb_lightning.export ckpt_path=<ckpt> format=onnx|torchscript`.

ckpt_path may also be a k-fold multirun directory: its jobs' checkpoints become one ensemble
file, with the threshold chosen on their out-of-fold predictions (evaluation/ensemble.py).

Writes model.onnx (or model.pt) and model.json into outputs/export/runs/<timestamp>/.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from tb_lightning.config import CONF_DIR
from tb_lightning.config.printing import print_config
from tb_lightning.core.tasks import quiet_known_warnings, run_task, written_files

log = logging.getLogger(__name__)


def export(cfg: DictConfig) -> dict[str, Any]:
    # Imported here: torch and friends take seconds, which --help should not.
    from tb_lightning.config.checks import check_export_config
    from tb_lightning.evaluation.ensemble import load_checkpoint_or_ensemble
    from tb_lightning.inference.checkpoint import resolve_threshold
    from tb_lightning.inference.deploy import export_model

    check_export_config(cfg)  # every value, before the checkpoint is read
    output_dir = Path(cfg.paths.output_dir)
    # A k-fold multirun directory exports its fold models as one ensemble file.
    loaded = load_checkpoint_or_ensemble(
        cfg.get("ckpt_path"), allow_partial=cfg.get("allow_partial", False)
    )
    threshold, threshold_source = resolve_threshold(loaded, cfg.threshold.get("value"))
    sidecar = export_model(
        loaded, cfg.format, output_dir, threshold, threshold_source, cfg.check_images
    )
    log.info("Wrote %s in %s", written_files(output_dir), output_dir)
    return sidecar


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="export")
def main(cfg: DictConfig) -> None:
    # At once, before torch is imported (seconds): the config was checked (config/callback.py).
    log.info("Exporting %s as %s", cfg.ckpt_path, cfg.format)
    print_config(cfg, cfg.paths.output_dir)
    quiet_known_warnings()
    run_task(export, cfg)


if __name__ == "__main__":
    main()
