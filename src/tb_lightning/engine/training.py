"""What `python -m tb_lightning.train` does: fit, then score the chosen checkpoint and report.

Kept apart from the entry point (tb_lightning/train.py) so that the entry point starts without
importing torch and Lightning: `--help` and the first log line come at once.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from tb_lightning.config import compose_train_config
from tb_lightning.config.checks import check_config, runs_dir
from tb_lightning.core.artefacts import relative_path
from tb_lightning.core.atomic import check_writable, remove_temp_files
from tb_lightning.core.errors import ConfigError
from tb_lightning.core.extras import require_logger_extras
from tb_lightning.core.run_dirs import describe_differences, plan_resume, refuse_differences
from tb_lightning.core.run_lock import LOCK_NAME
from tb_lightning.core.signals import (
    SIGNAL_NAMES,
    Stopped,
    lightning_fit,
    set_phase,
    stop_on_signals,
)
from tb_lightning.core.tasks import (
    instantiate_config,
    instantiate_group,
    log_lightning_through_hydra,
)
from tb_lightning.data.datamodule import TBDataModule
from tb_lightning.data.feature_cache import build_feature_cache
from tb_lightning.data.image_cache import build_image_cache
from tb_lightning.engine.dashboard import (
    DashboardLogger,
    dashboard_hparams,
    epoch_end_step,
    write_final_figures,
)
from tb_lightning.engine.tracking import MLFlowLogger, log_final_run, log_run_params
from tb_lightning.evaluation.final_report import FinalReport, final_report
from tb_lightning.models.classifier import TBClassifier, to_plain_dict
from tb_lightning.models.torch_file import describe_key_mismatch, load_checkpoint
from tb_lightning.stats.calibration import calibration_refusal
from tb_lightning.sweep.naming import current_swept_keys, trial_id
from tb_lightning.trained.checkpoint import WEIGHT_AVERAGING_KEY, checkpoint_int
from tb_lightning.trained.runner import pick_device, run_over_images

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train as configured and return the chosen checkpoint's final metrics (metrics.json).

    A signal stops it in any phase with `Stopped` (core/signals.py) carrying the sentence
    that says how to resume. Under DDP every process runs this function; only global rank 0
    writes files and returns the metrics (the others return an empty dict).
    """
    output_dir = Path(cfg.paths.output_dir)
    with stop_on_signals():
        try:
            return _train(cfg, output_dir)
        except Stopped as stop:
            raise Stopped(stop.signum, stop.phase, stop_message(stop, cfg, output_dir)) from None


def _train(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    log_lightning_through_hydra()
    set_phase("the config checks")
    check_config(cfg)  # wrong values fail here, before any data is read
    require_logger_extras(cfg.get("logger"))  # logger=mlflow without its extra
    # Which checkpoint to resume, and whether this run may continue its run directory: a run
    # whose config differs is refused here, before anything is read or written.
    plan = plan_resume(cfg.get("ckpt_path"), runs_dir(cfg), cfg, compose_train_config)
    refuse_differences(plan, cfg.get("ckpt_path"), compose_train_config)
    if plan.checkpoint is None:
        refuse_foreign_run(output_dir)
    else:
        check_resume_checkpoint(plan.checkpoint, cfg)
        log.info("Resuming from %s", plan.checkpoint)
    # Folders the run will write into, checked now rather than after an epoch's work; and the
    # temporary files that a killed write may have left in this run's own folders.
    check_writable(output_dir / "checkpoints", "hydra.run.dir")
    cache_keys = ("scan_cache_dir", "cache_dir") + (
        ("image_cache_dir",) if cfg.data.get("cache_images") else ()
    )
    for key in cache_keys:
        if cfg.data.get(key):
            check_writable(cfg.data[key], f"data.{key}")
    remove_temp_files(output_dir)
    remove_temp_files(output_dir / "checkpoints")
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    policy, target = cfg.threshold.policy, cfg.threshold.target  # conf/train.yaml: threshold

    # Data first: a wrong data.root is reported before any weights are loaded or downloaded.
    set_phase("the data scan")
    # A resume takes the split its run was trained on, never a new one.
    same_split = plan.run_dir / "split.csv" if plan.run_dir is not None else None
    if same_split is not None and same_split.is_file():
        datamodule: TBDataModule = instantiate_config(cfg.data, split_file=str(same_split))
    else:
        datamodule = instantiate_config(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    if cfg.get("calibration") == "temperature":
        refuse_calibration_split(datamodule)
    if datamodule.is_synthetic:
        log.warning(
            "The data are SYNTHETIC phantom images (data=phantom), not medical images: the "
            "figures of this run say the pipeline works, nothing about TB detection."
        )
    # Every DDP process computes the same seeded split; only rank 0 writes it. A resume that
    # continues its run leaves the run's split.csv and data_report.json as they are.
    if rank_zero_only.rank == 0 and not plan.continues_run:
        datamodule.write_split(output_dir / "split.csv")
        datamodule.write_data_report(output_dir / "data_report.json")
    # The module keeps net/optimizer as plain dicts (saved in checkpoints), so no recursion.
    model: TBClassifier = instantiate_config(cfg.model, _recursive_=False)
    if cfg.get("init_from"):
        initialise_from(model, cfg.init_from)
    # data.cache_features: frozen backbone features computed once, shared by sweeps and runs.
    set_phase("the feature extraction")
    features = build_feature_cache(
        datamodule,
        model.net,
        run_over_images,  # the one image pass (trained/runner.py); data/ may not import it
        device=extraction_device(cfg.trainer.get("accelerator")),
    )
    if features is not None:
        datamodule.serve_features(features)
        if datamodule.caches.cache_images:
            log.info(
                "data.cache_images=true is not used: the head trains on cached backbone "
                "features, which need no images after the extraction."
            )
    elif datamodule.caches.cache_images:
        set_phase("the image caching")
        datamodule.serve_images(build_image_cache(datamodule))

    trainer: L.Trainer = instantiate_config(
        cfg.trainer,
        callbacks=instantiate_group(cfg.get("callbacks")),
        logger=instantiate_group(cfg.get("logger")) or False,
    )
    # MLflow shows a run's params while it trains: the HParams columns, logged now.
    log_run_params(trainer, dashboard_hparams(cfg, current_swept_keys()))
    with lightning_fit():
        fit(trainer, model, datamodule, plan.checkpoint)
    if trainer.world_size > 1:
        # The report comes from rank 0 alone: the others leave, and without a process group
        # the scoring below runs undistributed, on the whole val split, like a 1-process run.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if not trainer.is_global_zero:
            return {}

    set_phase("the final scoring")
    checkpoint = chosen_checkpoint(trainer)
    # The step of the chosen checkpoint's epoch: the final figures are drawn on the curves there.
    chosen_step, chosen_epoch, averaging = trainer.global_step, None, None
    if checkpoint:
        state = load_checkpoint(checkpoint)
        model.load_state_dict(state["state_dict"])
        chosen_step = int(state.get("global_step", chosen_step))
        chosen_epoch = checkpoint_int(state, "epoch")
        averaging = state.get(WEIGHT_AVERAGING_KEY)  # callbacks=swa
    final = final_report(
        model,
        checkpoint,
        datamodule,
        policy,
        target,
        output_dir,
        device=pick_device(cfg.trainer.accelerator),
        # Relative to the run directory, as every path in its files (core/artefacts.py).
        extra={"init_from": relative_path(cfg.init_from, output_dir)}
        if cfg.get("init_from")
        else None,
        calibration=cfg.get("calibration") or "none",
        epoch=chosen_epoch,
        step=chosen_step if checkpoint else None,
        weight_averaging=averaging,
    )
    log.info("Final figures of %s:\n%s", checkpoint or "the final weights", final.report)
    log_final_figures(trainer, cfg, final, epoch_end_step(chosen_step))
    # The run's lock (core/run_lock.py) is no output: it goes when the process ends.
    written = sorted(p.name for p in output_dir.iterdir() if p.name != LOCK_NAME)
    log.info("Wrote %s", ", ".join(written))
    return final.metrics


def refuse_calibration_split(datamodule: TBDataModule) -> None:
    """calibration=temperature on a validation split too small (or of one class) to fit on:
    refused once the split is made, before anything is written or trained."""
    val, split = datamodule.val_samples or [], datamodule.split
    if split.split_file:
        source, fix = f"data.split_file={split.split_file}", "give it more val rows"
    elif split.num_folds is not None:
        source = f"fold {split.fold} of data.num_folds={split.num_folds}"
        fix = "use fewer folds or more images"
    else:
        source, fix = f"data.val_size={split.val_size}", "raise data.val_size"
    refusal = calibration_refusal(len(val), len({s.label for s in val}), source, fix)
    if refusal:
        raise ConfigError(refusal)


def refuse_foreign_run(output_dir: Path) -> None:
    """A new run never writes into a directory that holds another run's results."""
    found = [p.name for p in (output_dir / "metrics.json", output_dir / "report.txt") if p.exists()]
    found += [f"checkpoints/{p.name}" for p in sorted(output_dir.glob("checkpoints/*.ckpt"))]
    if found:
        raise ConfigError(
            f"hydra.run.dir={output_dir} already holds a run ({', '.join(found)}); choose "
            f"another directory, or resume it with ckpt_path={output_dir}/checkpoints/last.ckpt."
        )


def check_resume_checkpoint(path: Path, cfg: DictConfig) -> None:
    """Before anything is written: the file is a checkpoint of this project, of this model."""
    checkpoint = load_checkpoint(path, config_key="ckpt_path")
    hparams = checkpoint.get("hyper_parameters") or {}
    current = to_plain_dict(cfg.model)
    differences = [
        (key, hparams.get(key), current.get(key))
        for key in ("net", "optimizer", "threshold", "scheduler")
        if key in hparams and hparams.get(key) != current.get(key)
    ]
    if "loops" not in checkpoint:  # load_checkpoint made sure of the state_dict
        raise ConfigError(
            f"ckpt_path={path} is not a training checkpoint of tb_lightning.train (no "
            "optimizer and loop state to resume); start a new run from its weights with "
            f"init_from={path}."
        )
    if differences:
        raise ConfigError(
            f"ckpt_path={path} was trained with other model settings: "
            f"{describe_differences([(f'model.{k}', a, b) for k, a, b in differences])}; "
            "resume with the same model.* overrides, or start a new run from its weights with "
            f"init_from={path}."
        )


def initialise_from(model: TBClassifier, path: Any) -> None:
    """init_from: a new run that starts from a checkpoint's network weights (fine-tuning)."""
    checkpoint = load_checkpoint(Path(str(path)).expanduser(), config_key="init_from")
    state = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    own = {k: v for k, v in model.state_dict().items() if k.startswith("net.")}
    mismatch = describe_key_mismatch(own, state)
    if mismatch:
        raise ConfigError(
            f"init_from={path} holds another network than model.net.* describes: it {mismatch}; "
            "use the same model.net settings and data.image_size as the run it comes from."
        )
    model.load_state_dict(state, strict=False)
    log.info("Initialised the network from %s (a new run: optimizer and epochs start afresh)", path)


def stop_message(stop: Stopped, cfg: DictConfig, output_dir: Path) -> str:
    """What to tell a user whose run a signal stopped: what was kept and the command to resume."""
    last = output_dir / "checkpoints" / "last.ckpt"
    what = f"Stopped by {SIGNAL_NAMES.get(stop.signum, stop.signum)} during {stop.phase}."
    command = "python -m tb_lightning.train " + " ".join(
        shlex.quote(o) for o in task_overrides() if not o.startswith("ckpt_path=")
    )
    if last.is_file():
        return (
            f"{what} Kept: {last} (the end of the last finished epoch). Resume with: "
            f"{command} ckpt_path={last}"
        )
    return f"{what} No epoch had finished, so there is nothing to resume: run {command} again."


def task_overrides() -> list[str]:
    """The overrides this run was started with (Hydra's), or none outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def extraction_device(accelerator: str | None) -> str:
    """Where backbone features are extracted: the GPU the trainer would use, else the CPU."""
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def fit(
    trainer: L.Trainer, model: TBClassifier, datamodule: TBDataModule, ckpt_path: Path | None
) -> None:
    """trainer.fit, resuming from ckpt_path (already checked by check_resume_checkpoint)."""
    # weights_only=True: torch.load refuses anything but tensors and plain containers.
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)


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


def log_final_figures(trainer: L.Trainer, cfg: DictConfig, final: FinalReport, step: int) -> None:
    """The run's HParams row, final figures and images in its own TensorBoard run
    (engine/dashboard.py); in MLflow the final figures, report and images (engine/tracking.py);
    the other loggers get the same hyperparameters."""
    params = dashboard_hparams(cfg, current_swept_keys())
    for logger in trainer.loggers:
        if isinstance(logger, DashboardLogger):
            run_dir = Path(cfg.paths.output_dir)
            write_final_figures(
                logger.log_dir,
                trial_id(str(logger.version), run_dir),
                params,
                final.metrics,
                final.report,
                final.figures,
                step,
            )
        elif isinstance(logger, MLFlowLogger):  # params logged at the start
            log_final_run(logger, Path(cfg.paths.output_dir), final.figures, step)
        else:
            logger.log_hyperparams(params)
        logger.finalize("success")
    import matplotlib.pyplot as plt

    for named in final.figures.values():  # closed once drawn; unused without TensorBoard
        for figure in named.values():
            plt.close(figure)
