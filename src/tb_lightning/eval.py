"""`python -m tb_lightning.eval ckpt_path=<run>/checkpoints/best.ckpt`: evaluate without retraining.

Writes metrics.json, report.txt, report.html (the same numbers, the figures and an error
gallery in one self-contained page), predictions.csv, figures/*.png and tensorboard/ (and
skipped.csv, the bad files left out with data.on_bad_file=skip) into
outputs/eval/runs/<timestamp>/ and prints the report. Images the model trained on (rows of a
member's train split, by bytes, patient or near-duplicate hash: inference/seen.py) are marked in
predictions.csv, counted in metrics.json (`seen_in_training`) and named at the top of report.txt.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from tb_lightning.config import CONF_DIR
from tb_lightning.config.entry import run_entry, trained_model_of
from tb_lightning.core.tasks import instantiate_config

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    # Imported here: torch and friends take seconds, which --help should not.
    from tb_lightning.config.checks import check_eval_config
    from tb_lightning.evaluation.evaluate import (
        evaluate_samples,
        refuse_trained_images,
        resolve_split,
        split_samples,
    )
    from tb_lightning.trained.runner import pick_device

    check_eval_config(cfg)  # every value, before the checkpoint or any image is read
    output_dir = Path(cfg.paths.output_dir)
    split = resolve_split(cfg.eval.get("split"), cfg.get("data") is not None)
    loaded, threshold, threshold_source = trained_model_of(
        cfg,
        "eval.split=val of the ensemble would score each fold's val images with the other fold "
        "models, which trained on them; use eval.split=test (a data.test_size split shared by "
        "the folds) or data=... with other images."
        if split == "val"
        else None,
    )
    if split == "all":
        datamodule = instantiate_config(cfg.data)
        samples = datamodule.scan()
        # Bad files (the scan's checks, applied while predicting) follow data.on_bad_file.
        on_bad_file, split_path = datamodule.integrity.on_bad_file, None
        log.info("Evaluating on all %d images of %s", len(samples), cfg.data.root)
    else:
        # Rows of a split file passed training's scan: a bad one is an error (evaluate_samples).
        samples, split_path = split_samples(
            loaded.run_dir,
            cfg.eval.get("split_file"),
            split,
            allow_outside_paths=cfg.eval.get("allow_outside_paths", False),
        )
        for member in (loaded.member_checkpoints or [])[1:]:  # no member trained on them either
            refuse_trained_images(samples, member.parent.parent / "split.csv", split_path, split)
        on_bad_file = "error"
        log.info("Evaluating on the %d %s images of %s", len(samples), split, split_path)
    metrics, report = evaluate_samples(
        loaded,
        samples,
        threshold,
        threshold_source,
        output_dir,
        split,
        n_bootstrap=cfg.eval.bootstrap,
        seed=cfg.seed,
        batch_size=cfg.eval.batch_size,
        num_workers=cfg.eval.num_workers,
        device=pick_device(cfg.trainer.accelerator),
        on_bad_file=on_bad_file,
        split_file=split_path,
        report_images=cfg.eval.report_images,
        gallery_size=cfg.eval.report_gallery_size,
    )
    log.info("Evaluation of %s:\n%s", loaded.checkpoint_path, report)
    return metrics


def evaluated_on(cfg: DictConfig) -> str:
    """What eval scores, in words, before anything is loaded (its first line)."""
    split = cfg.eval.get("split") or ("all" if cfg.get("data") is not None else "val")
    if split == "all":
        return f"every image of {cfg.data.get('root') or 'data.sources'}"
    return f"the {split} split of {cfg.eval.get('split_file') or 'its run (split.csv)'}"


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def main(cfg: DictConfig) -> None:
    run_entry(cfg, evaluate, f"Evaluating {cfg.ckpt_path} on {evaluated_on(cfg)}")


if __name__ == "__main__":
    main()
