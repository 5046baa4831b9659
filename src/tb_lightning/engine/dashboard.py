"""What a run shows in TensorBoard, and under which names.

- Runs are named by what they are (sweep/naming.py): `<run>/tensorboard/lr=0.0003,dropout=0.5`.
  One run per job: its curves, its final figures and its HParams row all live in it.
- Per-epoch curves (models/metrics.py): `train/...` and `val/...` (loss, AUROC, average
  precision, lr), then `val@0.5/...` (figures at the fixed per-epoch threshold).
- The final figures of the chosen checkpoint, at its step (`final/...`): the threshold-free
  `final/val_auroc`, `final/val_average_precision`, `final/val_loss`, then the figures at the
  operating threshold `final/val_operating_sensitivity`, `..._specificity`, `..._threshold`;
  the confusion matrix, ROC and PR curve at the operating threshold as images
  (`final/val_confusion_matrix`, ..., and `final/test_...` with a held-out test split), titled
  with the split and the threshold; and the final report as text. The group is named so that
  it sorts first: the HParams tab takes its metric columns from every scalar of a session's run,
  sorted by tag, and shows the first five, which are then these figures (the per-epoch tags
  can be ticked too); in Time Series the `final` group therefore comes before train and val.
- HParams columns (`dashboard_hparams`): in a multirun the keys it sweeps, except the repeat keys
  (seed, data.fold: a configuration's repeats form one session group, sweep/naming.py
  trial_id, and TensorBoard shows their mean, median, min or max); in a single run a short list.
  A key searched on a log scale (the learning rate) is also given as its log10, which the
  parallel-coordinates view spaces evenly. No experiment summary is written: TensorBoard then
  builds the columns from every run it reads, also across sweeps opened together.
- Custom Scalars: one chart per metric and split, one line per run.
- Images: the per-epoch val confusion matrix at the fixed threshold, drawn like eval's, at the
  scalars' step, and the final figures above.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from tb_lightning.core.labels import CLASS_NAMES
from tb_lightning.stats.metrics import METRICS
from tb_lightning.sweep.naming import REPEAT_KEYS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# The hyperparameters people compare between single runs: the HParams columns of a run that is
# not part of a multirun (a multirun shows the keys it sweeps instead).
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
)
# Keys searched on a log scale: also shown as log10, so that 1e-4 and 3e-4 do not crowd together
# at one end of a linear axis.
LOG_SCALE_KEYS = (
    "model.optimizer.lr",
    "model.optimizer.weight_decay",
    "model.optimizer.backbone_lr_scale",
)
# metrics.json key -> TensorBoard tag of the final figures (stats/metrics.py's rows marked
# `dashboard`, tagged by `Metric.tag`), in the order of the HParams columns (sorted by tag; the
# first five are shown): threshold-free first, then at the operating threshold, which is the
# last. Test-split figures are left out on purpose: the HParams tab is where hyperparameters
# are chosen, and they are chosen on val (the test figures are in report.txt and
# sweep_summary.md).
FINAL_TAGS = {
    **{f"val/{m.key}": m.tag("val") for m in METRICS if m.dashboard and m.threshold_free},
    **{f"val/{m.key}": m.tag("val") for m in METRICS if m.dashboard and not m.threshold_free},
    "threshold": "final/val_operating_threshold",
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
    """The HParams tab's columns with their values: the swept keys but the repeat keys, or
    DASHBOARD_HPARAMS when nothing else is swept; each LOG_SCALE_KEYS key also as log10.

    Values are numbers, booleans or strings (None becomes "null"), as TensorBoard takes them.
    """
    keys = [k for k in swept if k not in REPEAT_KEYS] or list(DASHBOARD_HPARAMS)
    params: dict[str, Any] = {}
    for key in keys:
        value = OmegaConf.select(cfg, key, default=None)
        if OmegaConf.is_config(value):  # a list or section: shown as its text
            value = str(OmegaConf.to_container(value))
        params[key] = "null" if value is None else value
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if key in LOG_SCALE_KEYS and is_number and value > 0:
            params[f"log10({key})"] = math.log10(value)
    return params


def final_figures(metrics: Mapping[str, Any]) -> dict[str, float]:
    """FINAL_TAGS' figures out of metrics.json's dict (threshold: its value)."""
    values = {**metrics, "threshold": (metrics.get("threshold") or {}).get("value")}
    return {
        tag: float(values[key])
        for key, tag in FINAL_TAGS.items()
        if isinstance(values.get(key), int | float)
    }


def write_final_figures(
    log_dir: str | Path,
    trial_id: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, Any],
    report: str,
    figures: Mapping[str, Mapping[str, Figure]],
    step: int,
) -> None:
    """Into the run's own folder (a second event file, which TensorBoard reads as the same run,
    written once the trainer has closed its own): the HParams row (session start), the final
    figures and images at `step`, and the final report as text."""
    from tensorboard.plugins.hparams import summary_v2 as hp
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        # trial_id is TensorBoard's "group name": the HParams tab's Trial ID column.
        session = hp.hparams_pb(dict(params), trial_id=trial_id, start_time_secs=time.time())
        writer.file_writer.add_summary(session, step)
        for tag, value in final_figures(metrics).items():
            writer.add_scalar(tag, value, step)
        for split, named in figures.items():
            for name, figure in named.items():
                writer.add_figure(f"final/{split}_{name}", figure, global_step=step, close=True)
        # Markdown: indent by four spaces to keep the report's columns.
        report_text = "\n".join("    " + line for line in report.splitlines())
        writer.add_text("final/report", report_text, step)
    finally:
        writer.close()


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
