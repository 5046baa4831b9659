"""What `python -m tb_lightning.train` does: fit, then score the chosen checkpoint and report.

Kept apart from the entry point (tb_lightning/train.py) so that the entry point starts without
importing torch and Lightning: `--help` and the first log line come at once.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from tb_lightning.config_checks import check_config, runs_dir
from tb_lightning.data.datamodule import TBDataModule
from tb_lightning.errors import UserError
from tb_lightning.evaluation.final import final_report
from tb_lightning.evaluation.thresholds import check_policy
from tb_lightning.inference import pick_device
from tb_lightning.models.module import TBClassifier, load_checkpoint
from tb_lightning.resume import resolve_ckpt_path
from tb_lightning.task import (
    check_accelerator,
    flatten_config,
    instantiate_config,
    instantiate_group,
    log_lightning_through_hydra,
)

log = logging.getLogger(__name__)

# Config sections shown as columns of TensorBoard's HParams tab.
HPARAM_SECTIONS = ("data", "model", "trainer")
# Final figures shown as the HParams tab's metric columns: threshold-free first.
HPARAM_METRICS = {
    "val/auroc": "val/auroc",
    "val/average_precision": "val/average_precision",
    "val/loss": "val/loss",
    "threshold": "operating_threshold",
    "val/sensitivity": "val/sensitivity_at_operating_threshold",
    "val/specificity": "val/specificity_at_operating_threshold",
    "test/auroc": "test/auroc",
    "test/sensitivity": "test/sensitivity_at_operating_threshold",
    "test/specificity": "test/specificity_at_operating_threshold",
}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train as configured and return the chosen checkpoint's final metrics (metrics.json).

    Under DDP every process runs this function; only global rank 0 writes files and returns
    the metrics (the others return an empty dict).
    """
    log_lightning_through_hydra()
    check_config(cfg)  # wrong values fail here, before any data is read
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), runs_dir(cfg))
    output_dir = Path(cfg.paths.output_dir)
    if ckpt_path is not None:
        log.info("Resuming from %s", ckpt_path)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    check_accelerator(cfg.trainer.get("accelerator"))
    threshold_cfg = cfg.get("threshold") or {}
    policy, target = threshold_cfg.get("policy", "youden"), threshold_cfg.get("target", 0.95)
    check_policy(policy, target)

    # Data first: a wrong data.root is reported before any weights are loaded or downloaded.
    datamodule: TBDataModule = instantiate_config(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    if datamodule.is_synthetic:
        log.warning(
            "The data are SYNTHETIC phantom images (data=phantom), not medical images: the "
            "figures of this run say the pipeline works, nothing about TB detection."
        )
    # Every DDP process computes the same seeded split; only rank 0 writes it.
    if rank_zero_only.rank == 0:
        datamodule.write_split(output_dir / "split.csv")
        datamodule.write_data_report(output_dir / "data_report.json")
    # The module keeps net/optimizer as plain dicts (saved in checkpoints), so no recursion.
    model: TBClassifier = instantiate_config(cfg.model, _recursive_=False)
    # data.cache_features: frozen backbone features computed once, shared by sweeps and runs.
    datamodule.use_feature_cache(
        model.net, device=extraction_device(cfg.trainer.get("accelerator"))
    )

    trainer: L.Trainer = instantiate_config(
        cfg.trainer,
        callbacks=instantiate_group(cfg.get("callbacks")),
        logger=instantiate_group(cfg.get("logger")) or False,
    )
    fit(trainer, model, datamodule, ckpt_path)
    if trainer.world_size > 1:
        # The report comes from rank 0 alone: the others leave, and without a process group
        # the scoring below runs undistributed, on the whole val split, like a 1-process run.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if not trainer.is_global_zero:
            return {}

    checkpoint = chosen_checkpoint(trainer)
    if checkpoint:
        model.load_state_dict(load_checkpoint(checkpoint)["state_dict"])
    metrics, report = final_report(
        model,
        checkpoint,
        datamodule,
        policy,
        target,
        output_dir,
        device=pick_device(cfg.trainer.get("accelerator", "auto")),
    )
    log.info("Final figures of %s:\n%s", checkpoint or "the final weights", report)
    log_hparams(trainer, cfg, metrics, report)
    log.info("Wrote %s", ", ".join(sorted(p.name for p in output_dir.iterdir())))
    return metrics


def extraction_device(accelerator: str | None) -> str:
    """Where backbone features are extracted: the GPU the trainer would use, else the CPU."""
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def fit(
    trainer: L.Trainer, model: TBClassifier, datamodule: TBDataModule, ckpt_path: Path | None
) -> None:
    """trainer.fit; a checkpoint that holds pickled code is refused, not run."""
    try:
        # weights_only=True: torch.load refuses anything but tensors and plain containers.
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message is long; its "unsupported GLOBAL" line names the refused object.
        lines = str(err).splitlines()
        reason = next((line for line in lines if "GLOBAL" in line), lines[0])
        raise UserError(
            f"ckpt_path={ckpt_path} was refused because loading it could run code "
            f"({reason.strip()}); resume only from checkpoints written by tb_lightning.train."
        ) from None


def chosen_checkpoint(trainer: L.Trainer) -> str | None:
    """The checkpoint the run reports: the best on the monitored metric, else the last epoch's.

    Without a monitored checkpoint (callbacks.model_checkpoint=null, as experiment=nlm_scratch
    does so that nothing is picked on the validation split) the last epoch is the model.
    """
    monitored = [cb for cb in trainer.checkpoint_callbacks if getattr(cb, "monitor", None)]
    if not monitored and trainer.checkpoint_callbacks:
        log.info("No monitored checkpoint (callbacks.model_checkpoint): reporting the last epoch.")
    chosen = monitored or trainer.checkpoint_callbacks
    best = chosen[0].best_model_path if chosen else ""
    if not best:
        log.warning("No checkpoint was saved (e.g. fast_dev_run); reporting the final weights.")
    return best or None


def log_hparams(trainer: L.Trainer, cfg: DictConfig, metrics: dict[str, Any], report: str) -> None:
    """One row per run in TensorBoard's HParams tab (the config and the final figures), and the
    final report as text."""
    params = {"seed": cfg.get("seed")}
    for section in HPARAM_SECTIONS:
        params.update(flatten_config(cfg[section], f"{section}."))
    values = {**metrics, "threshold": metrics["threshold"]["value"]}
    final = {
        f"hparams/{name}": float(values[key])
        for key, name in HPARAM_METRICS.items()
        if isinstance(values.get(key), int | float)
    }
    for logger in trainer.loggers:
        if isinstance(logger, L.pytorch.loggers.TensorBoardLogger):
            logger.log_hyperparams(params, metrics=final)
            # Markdown: indent by four spaces to keep the report's columns.
            text = "\n".join("    " + line for line in report.splitlines())
            logger.experiment.add_text("final_report", text, global_step=trainer.global_step)
        else:
            logger.log_hyperparams(params)
        logger.finalize("success")
