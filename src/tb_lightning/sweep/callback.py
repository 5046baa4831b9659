"""The Hydra callback that writes the sweep summary (configured in conf/hydra/default.yaml)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from tb_lightning.core.atomic import atomic_write
from tb_lightning.core.tasks import ERROR_FILE
from tb_lightning.sweep.naming import command_line_sweeps
from tb_lightning.sweep.summary import Summary, write_summary

log = logging.getLogger(__name__)


def ranking_metric(config: DictConfig) -> str:
    """The metric that ranks the sweep's configurations (`optimized_metric`, val/auroc unset)."""
    return config.get("optimized_metric") or "val/auroc"


class SweepSummary(Callback):
    """Writes sweep_summary.csv/.md and sweep_configurations.csv into the multirun directory
    after every job and at the end.

    Rewriting after every job keeps the finished jobs' results even when a later job fails or
    the sweep is stopped.
    """

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        if job_return.status == JobStatus.FAILED:
            try:
                job_return.return_value  # noqa: B018 - re-raises the job's exception
            except Exception as err:  # a bug's error, recorded next to the job's outputs
                output_dir = Path(config.hydra.runtime.output_dir)
                atomic_write(output_dir / ERROR_FILE, f"{type(err).__name__}: {err}\n")
        self._write(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        jobs = self._write(config).jobs
        path = sweep_dir / "sweep_summary.md"
        log.info("Sweep summary: %s\n%s", path, path.read_text())
        failed = [j for j in jobs if j.status != "ok"]
        if failed:
            log.error(
                "%d of %d jobs failed (job %s): their errors are in %s and in each job's %s.",
                len(failed),
                len(jobs),
                ", ".join(j.job for j in failed),
                path,
                ERROR_FILE,
            )
            # SystemExit, not an exception: Hydra turns a callback's exceptions into warnings.
            raise SystemExit(1)

    @staticmethod
    def _write(config: DictConfig) -> Summary:
        return write_summary(Path(config.hydra.sweep.dir), ranking_metric(config))


# Overrides that can change which pretrained weights a job loads; when one of them is swept,
# each job checks its own weights instead.
WEIGHTS_KEYS = ("model.net.weights", "model.net.arch", "experiment", "model")


class PretrainedWeightsCheck(Callback):
    """Before a multirun starts any job: are the ImageNet weights every job needs at hand?

    Offline, each job would otherwise try the download again and fail with the same sentence.
    Here the weights are loaded once (downloaded into torchvision's cache when online, so the
    jobs then read the cache); when they cannot be had the multirun stops with that one
    sentence and exit code 1, before any job starts. Skipped when a swept override could
    change the weights (each job then checks its own).
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        weights = OmegaConf.select(config, "model.net.weights", default=None)
        if weights != "imagenet":
            return
        task_overrides = OmegaConf.to_container(config.hydra.overrides.task)
        if command_line_sweeps(task_overrides) & set(WEIGHTS_KEYS):  # type: ignore[arg-type]
            return
        from tb_lightning.core.errors import WeightsError
        from tb_lightning.models.weights import load_imagenet_state_dict

        arch = OmegaConf.select(config, "model.net.arch", default="alexnet")
        try:
            load_imagenet_state_dict(arch)
        except WeightsError as err:
            log.error("No job was started: %s", err)
            # SystemExit, not an exception: Hydra turns a callback's exceptions into warnings.
            raise SystemExit(1) from None
