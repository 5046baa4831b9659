"""What a run shows in TensorBoard, and under which names.

- Runs are named by what they are (sweep/naming.py): `<run>/tensorboard/lr=0.0003,dropout=0.5`.
- Per-epoch curves (models/metrics.py): `train/...` and `val/...` (loss, AUROC, average
  precision, lr), then `val@0.5/...` (figures at the fixed per-epoch threshold). TensorBoard's
  Time Series tab sorts card groups by name and opens the first two: train and val.
- The final figures of the chosen checkpoint go into a sub-run `<run>/final`: `val/auroc`,
  `val/average_precision`, `val/loss` (one point each, on the curve, at the chosen epoch's step)
  and `val@operating/sensitivity`, `.../specificity`, `.../threshold`. That sub-run is also the
  HParams tab's row (its "session"): TensorBoard takes a session's metrics from the scalars of
  its own run, so the HParams metric columns are exactly these figures, in this order, and the
  per-epoch curves are not among them.
- HParams columns (`dashboard_hparams`): the keys a multirun sweeps plus a short list, not the
  whole config (which stays in `.hydra/`). No experiment summary is written: TensorBoard then
  builds the columns from every run it reads, marks the keys whose values differ and shows those
  first, also across sweeps opened together.
- Custom Scalars: one chart per metric and split, one line per run.
- Images: the per-epoch val confusion matrix, drawn like eval's, at the scalars' step.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from tb_lightning.core.labels import CLASS_NAMES

# The hyperparameters people compare between runs, always in the HParams tab; a multirun's
# swept keys are added to them (and TensorBoard shows the keys whose values differ first).
DASHBOARD_HPARAMS = (
    "model.net.arch",
    "model.net.weights",
    "model.net.freeze_features",
    "model.optimizer.lr",
    "model.net.dropout",
    "data.batch_size",
    "data.image_size",
    "data.preprocess",
    "trainer.max_epochs",
    "data.fold",
)
# Sub-run of a run's TensorBoard folder that holds its final figures and its HParams row.
FINAL_RUN = "final"
# metrics.json key -> TensorBoard tag of the final figures. The HParams tab lists metric columns
# sorted by tag and shows the first five: AUROC, average precision, loss, sensitivity and
# specificity; the threshold is the sixth, one click away. Test-split figures are left out on
# purpose: the HParams tab is where hyperparameters are chosen, and they are chosen on val (the
# test figures are in report.txt and sweep_summary.md).
FINAL_TAGS = {
    "val/auroc": "val/auroc",
    "val/average_precision": "val/average_precision",
    "val/loss": "val/loss",
    "val/sensitivity": "val@operating/sensitivity",
    "val/specificity": "val@operating/specificity",
    "threshold": "val@operating/threshold",
}


class DashboardLogger(TensorBoardLogger):
    """Lightning's TensorBoardLogger without the `epoch` scalar.

    Lightning adds `epoch` to every logged dict; TensorBoard would show it as the first card, a
    staircase that says nothing the step axis does not. (The CSV logger keeps it.)
    """

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)


def dashboard_logger(trainer: L.Trainer) -> TensorBoardLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def dashboard_hparams(cfg: DictConfig, swept: Iterable[str] = ()) -> dict[str, Any]:
    """The HParams tab's columns: the swept keys, then DASHBOARD_HPARAMS, with their values.

    Values are numbers, booleans or strings (None becomes "null"), as TensorBoard takes them.
    """
    keys = [k for k in swept if k not in DASHBOARD_HPARAMS] + list(DASHBOARD_HPARAMS)
    params: dict[str, Any] = {}
    for key in keys:
        value = OmegaConf.select(cfg, key, default=None)
        if OmegaConf.is_config(value):  # a list or section: shown as its text
            value = str(OmegaConf.to_container(value))
        params[key] = "null" if value is None else value
    return params


def final_figures(metrics: Mapping[str, Any]) -> dict[str, float]:
    """FINAL_TAGS' figures out of metrics.json's dict (threshold: its value)."""
    values = {**metrics, "threshold": (metrics.get("threshold") or {}).get("value")}
    return {
        tag: float(values[key])
        for key, tag in FINAL_TAGS.items()
        if isinstance(values.get(key), int | float)
    }


def write_final_run(
    log_dir: str | Path,
    trial_id: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, Any],
    report: str,
    step: int,
) -> Path:
    """Write `<log_dir>/final`: the HParams row (session start), the final figures at `step`
    and the final report as text. Returns the sub-run's folder."""
    from tensorboard.plugins.hparams import summary_v2 as hp
    from torch.utils.tensorboard import SummaryWriter

    folder = Path(log_dir) / FINAL_RUN
    writer = SummaryWriter(log_dir=str(folder))
    try:
        # trial_id is TensorBoard's "group name": the HParams tab's Trial ID column.
        session = hp.hparams_pb(dict(params), trial_id=trial_id, start_time_secs=time.time())
        writer.file_writer.add_summary(session, step)
        for tag, value in final_figures(metrics).items():
            writer.add_scalar(tag, value, step)
        # Markdown: indent by four spaces to keep the report's columns.
        writer.add_text("final_report", "\n".join("    " + ln for ln in report.splitlines()), step)
    finally:
        writer.close()
    return folder


def custom_scalars_layout(threshold: float = 0.5) -> dict:
    """TensorBoard's Custom Scalars layout: one chart per metric and split, one line per run.

    Tags are regular expressions; "Multiline" draws every run's matching tag in one chart.
    """
    at = f"{threshold:g}"
    fixed = f"^val@{at}/"

    def chart(tag_regex: str) -> list:
        return ["Multiline", [tag_regex]]

    per_class = {
        f"val {metric} ({name}) at p_tb >= {at}": chart(f"{fixed}{metric}/{name}$")
        for name in reversed(CLASS_NAMES)  # Tuberculosis first: sensitivity, then specificity
        for metric in ("recall", "precision", "f1")
    }
    return {
        "val: loss, AUROC, average precision (threshold-free)": {
            "val loss": chart(r"^val/loss$"),
            "val AUROC": chart(r"^val/auroc$"),
            "val average precision": chart(r"^val/average_precision$"),
        },
        "train: loss, AUROC, learning rate": {
            "train loss": chart(r"^train/loss$"),
            "train AUROC": chart(r"^train/auroc$"),
            "learning rate (head)": chart(r"^train/lr$"),
        },
        f"val at the fixed per-epoch threshold p_tb >= {at} (not the operating threshold)": {
            f"val accuracy at p_tb >= {at}": chart(f"{fixed}acc$"),
            **per_class,
        },
    }


class CustomScalarsLayout(L.Callback):
    """Writes the Custom Scalars layout into each run's TensorBoard event file at fit start.

    Lightning's TensorBoardLogger has no option for it, so the callback calls the underlying
    SummaryWriter's `add_custom_scalars`.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tensorboard = dashboard_logger(trainer)
        if tensorboard is not None:
            threshold = getattr(getattr(pl_module, "val_metrics", None), "threshold", 0.5)
            tensorboard.experiment.add_custom_scalars(custom_scalars_layout(threshold))


class ValConfusionImage(L.Callback):
    """Each validation epoch's confusion matrix as an image in TensorBoard's Images tab.

    Drawn like eval's confusion matrix (evaluation/figures.py), titled with the epoch and the
    fixed per-epoch threshold (`model.threshold`), at the same step as the scalars.
    """

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tensorboard = dashboard_logger(trainer)
        confusion = getattr(pl_module, "val_confusion", None)
        if tensorboard is None or trainer.sanity_checking or not confusion:
            return
        from tb_lightning.evaluation.figures import confusion_figure

        metrics = pl_module.val_metrics
        fig = confusion_figure(
            confusion,
            metrics.threshold,
            title=f"val, epoch {trainer.current_epoch}\nat the fixed threshold p_tb >= "
            f"{metrics.threshold:g}",
        )
        tensorboard.experiment.add_figure(
            f"{metrics.fixed_group}/confusion_matrix",
            fig,
            global_step=epoch_end_step(trainer.global_step),
            close=True,
        )


def epoch_end_step(global_step: int) -> int:
    """The step at which Lightning writes an epoch's scalars: the index of its last training
    step (global_step counts the steps taken)."""
    return max(global_step - 1, 0)
