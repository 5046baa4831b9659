"""`python -m tb_lightning.train`: compose the config, fit, evaluate the best checkpoint, report.

Overrides are Hydra's: `python -m tb_lightning.train data.root=/data/TB trainer=gpu`.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from tb_lightning.allocator import keep_large_blocks_in_heap
from tb_lightning.config import CONF_DIR
from tb_lightning.config_checks import check_config, runs_dir
from tb_lightning.data.datamodule import TBDataModule
from tb_lightning.errors import UserError
from tb_lightning.evaluation.operating import select_operating_threshold
from tb_lightning.evaluation.thresholds import check_policy
from tb_lightning.inference import pick_device
from tb_lightning.models.module import TBClassifier, load_checkpoint
from tb_lightning.report import write_report
from tb_lightning.resume import resolve_ckpt_path
from tb_lightning.task import (
    check_accelerator,
    flatten_config,
    instantiate_config,
    instantiate_group,
    quiet_known_warnings,
    run_task,
)

log = logging.getLogger(__name__)

# Config sections shown as columns of TensorBoard's HParams tab.
HPARAM_SECTIONS = ("data", "model", "trainer")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train as configured and return the best checkpoint's validation metrics.

    Under DDP every process runs this function; only global rank 0 writes files and returns
    the metrics (the others return an empty dict).
    """
    check_config(cfg)  # wrong values fail here, before any data is read
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), runs_dir(cfg))
    output_dir = Path(cfg.paths.output_dir)
    log.info("Run directory: %s", output_dir)
    if ckpt_path is not None:
        log.info("Resuming from %s", ckpt_path)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    check_accelerator(cfg.trainer.get("accelerator"))
    threshold_cfg = cfg.get("threshold") or {}
    check_policy(threshold_cfg.get("policy", "youden"), threshold_cfg.get("target", 0.95))

    # Data first: a wrong data.root is reported before any weights are loaded or downloaded.
    datamodule: TBDataModule = instantiate_config(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
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
        # the evaluation below runs undistributed, on the whole val split, like a 1-process run.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if not trainer.is_global_zero:
            return {}

    metrics = evaluate_best_checkpoint(trainer, model, datamodule, cfg)
    if trainer.is_global_zero:  # one process writes the checkpoint
        metrics["operating_threshold"] = select_operating_threshold(
            model,
            [s.path for s in datamodule.val_samples or []],
            [s.label for s in datamodule.val_samples or []],
            datamodule.image_size,
            threshold_cfg.get("policy", "youden"),
            threshold_cfg.get("target", 0.95),
            metrics["checkpoint"],
            datamodule.batch_size,
            datamodule.num_workers,
            pick_device(cfg.trainer.get("accelerator", "auto")),
        )
    report = write_report(output_dir, metrics)
    log.info("Best checkpoint on the validation split:\n%s", report)
    log_hparams(trainer, cfg, metrics)
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


def evaluate_best_checkpoint(
    trainer: L.Trainer, model: TBClassifier, datamodule: TBDataModule, cfg: DictConfig
) -> dict[str, Any]:
    """Validate the best checkpoint (or the final weights when none was saved).

    Without a monitored checkpoint (callbacks.model_checkpoint=null, as experiment=nlm_scratch
    does so that nothing is picked on the validation split) the last epoch's checkpoint is the
    model. A separate Trainer without loggers does it, so the training curves get no extra point.
    """
    monitored = [cb for cb in trainer.checkpoint_callbacks if getattr(cb, "monitor", None)]
    if not monitored and trainer.checkpoint_callbacks:
        log.info("No monitored checkpoint (callbacks.model_checkpoint): reporting the last epoch.")
    chosen = monitored or trainer.checkpoint_callbacks
    best = chosen[0].best_model_path if chosen else ""
    if not best:
        log.warning("No checkpoint was saved (e.g. fast_dev_run); reporting the final weights.")
    evaluator = L.Trainer(
        accelerator=cfg.trainer.get("accelerator", "auto"),
        devices=1,
        precision=cfg.trainer.get("precision", "32-true"),
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    if best:
        model.load_state_dict(load_checkpoint(best)["state_dict"])
    evaluator.validate(model, datamodule=datamodule, verbose=False)
    val_results = model.val_results
    n_normal, n_tb = datamodule.class_counts("train")
    v_normal, v_tb = datamodule.class_counts("val")
    return {
        **val_results,
        **evaluate_test_split(evaluator, model, datamodule),
        # The cross-validation fold of this run (null without k-fold); sweep summaries use it.
        "data.fold": datamodule.fold if datamodule.num_folds is not None else None,
        "data.num_folds": datamodule.num_folds,
        "checkpoint": best or None,
        "train_counts": {"Normal": n_normal, "Tuberculosis": n_tb},
        "val_counts": {"Normal": v_normal, "Tuberculosis": v_tb},
        "pos_weight": float(model.pos_weight),
    }


def evaluate_test_split(
    evaluator: L.Trainer, model: TBClassifier, datamodule: TBDataModule
) -> dict[str, Any]:
    """The held-out test split (data.test_size), evaluated once with the best weights.

    Validation metrics computed on the test loader, renamed test/*; {} when there is no test split.
    """
    if not datamodule.test_samples:
        return {}
    evaluator.validate(model, dataloaders=datamodule.test_dataloader(), verbose=False)
    t_normal, t_tb = datamodule.class_counts("test")
    results = {f"test/{k.removeprefix('val/')}": v for k, v in model.val_results.items()}
    return {**results, "test_counts": {"Normal": t_normal, "Tuberculosis": t_tb}}


def log_hparams(trainer: L.Trainer, cfg: DictConfig, metrics: dict[str, Any]) -> None:
    """One row per run in TensorBoard's HParams tab: the config and the final val metrics."""
    params = {"seed": cfg.get("seed")}
    for section in HPARAM_SECTIONS:
        params.update(flatten_config(cfg[section], f"{section}."))
    final = {
        f"hparams/{name}": value
        for name, value in metrics.items()
        if name.startswith("val/") and isinstance(value, float)
    }
    for logger in trainer.loggers:
        if isinstance(logger, L.pytorch.loggers.TensorBoardLogger):
            logger.log_hyperparams(params, metrics=final)
        else:
            logger.log_hyperparams(params)
        logger.finalize("success")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    quiet_known_warnings()
    keep_large_blocks_in_heap()
    metrics = run_task(train, cfg)
    # The sweepers (e.g. Optuna) optimise what main returns.
    value = metrics.get(cfg.get("optimized_metric")) if cfg.get("optimized_metric") else None
    return float(value) if value is not None else None


if __name__ == "__main__":
    main()
