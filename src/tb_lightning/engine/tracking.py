"""MLflow beside TensorBoard (`logger=mlflow`, conf/logger/mlflow.yaml): what each run holds.

- Where: by default an embedded store under `<paths.log_dir>/mlruns` (a SQLite database,
  `mlflow.db`, and an `artifacts/` folder), opened with
  `mlflow ui --backend-store-uri sqlite:///outputs/mlruns/mlflow.db` (`make mlflow`). MLflow 3
  refuses its old file store (`mlruns/` of YAML files) unless MLFLOW_ALLOW_FILE_STORE=true, and
  recommends SQLite for a local store, hence the database. A lab's server:
  `logger.mlflow.tracking_uri=http://...` (or MLFLOW_TRACKING_URI); it then chooses where
  artefacts go.
- Experiment: `<task>/<experiment preset>` (`train/quickstart`; `train/default` without one), so
  that the runs of every sweep of one experiment can be compared in one table.
- Run name: the TensorBoard run's (sweep/naming.py): `lr=0.001,dropout=0.3` in a multirun,
  `quickstart` or `quickstart,lr=0.001` for a single run. Tags: `run_dir` (relative to
  paths.log_dir), `trial` (TensorBoard's Trial ID: the configuration and the multirun folder,
  which the runs table can group repeats by), and in a multirun `sweep` (its folder) and `job`
  (its number). A resumed run (ckpt_path) continues the MLflow run of its run directory.
- Params: the HParams tab's columns (engine/dashboard.py dashboard_hparams: the swept keys but
  seed and data.fold, else a short list), logged when training starts; their log10 twins are
  left out (MLflow's names refuse parentheses; its parallel-coordinates view reads the values).
  Lightning's automatic log of the LightningModule's hyperparameters is left out too: the whole
  composed config is the `config.yaml` artefact.
- Metrics: the per-epoch curves under Lightning's names (`train/loss`, `val/auroc`, ...; the
  fixed-threshold group `val@0.5/...` as `val_at_0.5/...`, since MLflow refuses `@`), and the
  final figures of the chosen checkpoint under TensorBoard's names (`final/val_auroc`, ...), read
  back from metrics.json so that they are the file's values exactly.
- Artefacts: report.txt, metrics.json, the final confusion matrix, ROC and PR curve at the
  operating threshold (`figures/val_confusion_matrix.png`, ...), the composed `config.yaml`
  (and config_resolved.yaml), the overrides, and provenance.json when the run has them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import MLFlowLogger

from tb_lightning.core.errors import ConfigError
from tb_lightning.core.extras import require
from tb_lightning.engine.dashboard import final_figures

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

# The embedded store's database and artefact folder, inside logger.mlflow.save_dir.
STORE_DB = "mlflow.db"
STORE_ARTIFACTS = "artifacts"
# Characters MLflow takes in param and metric names (besides letters and digits).
_NAME_EXTRA = set("_-. /:")
# Files of the run directory logged as artefacts at the end, when present (path -> folder in
# the MLflow run, "" for its root).
RUN_ARTEFACTS = {
    "report.txt": "",
    "metrics.json": "",
    "provenance.json": "",
    # The composed config as Hydra saved it, and resolved (the config printed at the start).
    ".hydra/config.yaml": "",
    "config_resolved.yaml": "",
    ".hydra/overrides.yaml": "",
}


class MLflowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger with this project's store, names, tags and resume.

    Args:
        save_dir: the embedded store's folder (used when tracking_uri is empty).
        run_dir: this run's directory (paths.output_dir), for the run_dir tag and resume.
        log_dir: paths.log_dir, which run_dir is shown relative to.
        tracking_uri: a tracking server (http://...), or any URI MLflow takes; empty: the
            embedded store in save_dir.
        experiment_name: empty: `<task>/<experiment preset>` of this Hydra job.
        run_name: the run's name in MLflow (conf: the TensorBoard run's name).
        resume: the run's ckpt_path: when set, the MLflow run that has this run_dir continues.
    """

    def __init__(
        self,
        save_dir: str,
        run_dir: str,
        log_dir: str,
        tracking_uri: str | None = None,
        experiment_name: str | None = None,
        run_name: str | None = None,
        resume: str | None = None,
        tags: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        require("mlflow", "logger=mlflow")
        quiet_store_setup()
        artifact_location = kwargs.pop("artifact_location", None)
        store: Path | None = None
        if not tracking_uri:
            store = Path(save_dir).expanduser().resolve()
            store.mkdir(parents=True, exist_ok=True)
            tracking_uri = f"sqlite:///{store / STORE_DB}"
            # Else MLflow puts a new experiment's artefacts in ./mlruns of the current folder.
            artifact_location = artifact_location or (store / STORE_ARTIFACTS).as_uri()
        run_dir_tag = relative_run_dir(run_dir, log_dir)
        extra_tags = {str(k): str(v) for k, v in (tags or {}).items()}  # MLflow's are text
        super().__init__(
            experiment_name=experiment_name or default_experiment_name(),
            run_name=run_name,
            tracking_uri=tracking_uri,
            tags={**run_tags(run_dir_tag, run_name or ""), **extra_tags},
            artifact_location=artifact_location,
            **kwargs,
        )
        self._store = store
        # Found or created here rather than by Lightning on first use: one line that says
        # where the run goes, and a job of a parallel sweep that loses the race to create it
        # takes the other's.
        self._experiment_id = self._find_or_create_experiment()
        if resume:
            self._run_id = self._run_of(run_dir_tag)
        where = (
            f"the store {tracking_uri} (open it with: mlflow ui --backend-store-uri {tracking_uri})"
            if tracking_uri.startswith("sqlite:")
            else tracking_uri
        )
        log.info("MLflow: run %s of experiment %s in %s", run_name, self._experiment_name, where)

    def _find_or_create_experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        client, name = self._mlflow_client, self._experiment_name
        found = client.get_experiment_by_name(name)
        if found is not None and found.lifecycle_stage == "deleted":
            raise ConfigError(
                f"The MLflow experiment {name} was deleted; restore it (mlflow experiments "
                "restore) or log into another with logger.mlflow.experiment_name=<name>."
            )
        if found is not None:
            return found.experiment_id
        try:
            return client.create_experiment(name, artifact_location=self._artifact_location)
        except MlflowException:  # created meanwhile by another job
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _run_of(self, run_dir_tag: str) -> str | None:
        """The MLflow run logged from this run directory before (a resume), or None."""
        escaped = run_dir_tag.replace("'", "\\'")
        runs = self._mlflow_client.search_runs(
            [self._experiment_id],
            filter_string=f"tags.run_dir = '{escaped}'",
            max_results=1,
        )
        if runs:
            log.info("MLflow: continuing run %s (%s)", runs[0].info.run_id, run_dir_tag)
        return runs[0].info.run_id if runs else None

    @property
    def save_dir(self) -> str | None:
        """The embedded store's folder; None with a server (Lightning's own answers only for
        a file: URI)."""
        return str(self._store) if self._store is not None else None

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        """Left out: Lightning calls it at fit start with the LightningModule's hyperparameters
        (nested dicts). The run's params are the HParams tab's columns (log_run_params); the
        whole config is the config.yaml artefact."""

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        # `epoch` is a staircase the step axis already shows (as in TensorBoard); `@` is not
        # allowed in MLflow's names.
        renamed = {k.replace("@", "_at_"): v for k, v in metrics.items() if k != "epoch"}
        super().log_metrics(renamed, step)


def quiet_store_setup() -> None:
    """The embedded store's first creation logs its schema migrations at INFO (mlflow's and
    alembic's lines): nothing the user acts on."""
    for name in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)


def default_experiment_name() -> str:
    """`<task>/<experiment preset>` of the current Hydra job: `train/quickstart`, else
    `<task>/default`; `tb-lightning` outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return "tb-lightning"
    hydra_cfg = HydraConfig.get()
    experiment = hydra_cfg.runtime.choices.get("experiment") or "default"
    return f"{hydra_cfg.job.name}/{experiment}"


def relative_run_dir(run_dir: str, log_dir: str) -> str:
    """The run directory relative to paths.log_dir (`train/multiruns/<time>/0`), else as given."""
    path, root = Path(run_dir).expanduser().resolve(), Path(log_dir).expanduser().resolve()
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(run_dir)


def run_tags(run_dir_tag: str, run_name: str) -> dict[str, str]:
    """run_dir, trial (sweep/naming.py trial_id), and in a multirun its folder and job number."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from tb_lightning.sweep.naming import trial_id

    tags = {"run_dir": run_dir_tag, "trial": trial_id(run_name, Path(run_dir_tag))}
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        hydra_cfg = HydraConfig.get()
        tags["sweep"] = Path(hydra_cfg.sweep.dir).name
        tags["job"] = str(hydra_cfg.job.num)
    return tags


def mlflow_loggers(trainer: L.Trainer) -> list[MLFlowLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)]


def valid_name(name: str) -> bool:
    return all(c.isalnum() or c in _NAME_EXTRA for c in name)


@rank_zero_only
def log_run_params(trainer: L.Trainer, params: Mapping[str, Any]) -> None:
    """The HParams tab's columns as every MLflow logger's params (at the start: MLflow shows
    them while the run trains). Keys MLflow refuses (the log10(...) twins) are left out."""
    kept = {k: v for k, v in params.items() if valid_name(k)}
    for logger in mlflow_loggers(trainer):
        MLFlowLogger.log_hyperparams(logger, kept)


@rank_zero_only
def log_final_run(
    logger: MLFlowLogger,
    run_dir: Path,
    figures: Mapping[str, Mapping[str, Figure]],
    step: int,
) -> None:
    """The final figures (from metrics.json, at the chosen checkpoint's step), report.txt,
    metrics.json, config and figures as artefacts of the logger's run."""
    from mlflow.entities import Metric

    client, run_id = logger.experiment, logger.run_id
    metrics = json.loads((run_dir / "metrics.json").read_text())
    now_ms = int(time.time() * 1000)
    values = [
        Metric(key=tag, value=value, timestamp=now_ms, step=step)
        for tag, value in final_figures(metrics).items()
    ]
    client.log_batch(run_id, metrics=values)
    for name, folder in RUN_ARTEFACTS.items():
        if (run_dir / name).is_file():
            client.log_artifact(run_id, str(run_dir / name), folder or None)
    for split, named in figures.items():
        for name, figure in named.items():
            client.log_figure(run_id, figure, f"figures/{split}_{name}.png")
