"""The Hydra callback that writes the sweep summary (configured in conf/hydra/default.yaml)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from tb_lightning.sweep.summary import ERROR_FILE, atomic_write, write_summary

log = logging.getLogger(__name__)


def metric_direction(config: DictConfig) -> tuple[str, str]:
    """The metric that picks the best job (`optimized_metric`) and whether higher is better.

    The Optuna sweeper's `direction` wins; otherwise losses are minimised, the rest maximised.
    """
    metric = config.get("optimized_metric") or "val/auroc"
    direction = OmegaConf.select(config, "hydra.sweeper.direction", default=None)
    if not isinstance(direction, str):
        direction = "minimize" if metric.endswith("loss") else "maximize"
    return metric, direction


class SweepSummary(Callback):
    """Writes sweep_summary.csv/.md into the multirun directory after every job and at the end.

    Rewriting after every job keeps the finished jobs' results even when a later job fails or
    the sweep is stopped.
    """

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        if job_return.status == JobStatus.FAILED:
            try:
                job_return.return_value  # noqa: B018 - re-raises the job's exception
            except Exception as err:  # the job's error, recorded next to its outputs
                output_dir = Path(config.hydra.runtime.output_dir)
                atomic_write(output_dir / ERROR_FILE, f"{type(err).__name__}: {err}\n")
        self._write(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = self._write(config)
        if path is not None:
            log.info("Sweep summary: %s\n%s", path, path.read_text())

    @staticmethod
    def _write(config: DictConfig) -> Path | None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return None
        write_summary(sweep_dir, *metric_direction(config))
        return sweep_dir / "sweep_summary.md"
