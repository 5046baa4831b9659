"""The end of a training run: one pass over the val (and test) images with the chosen checkpoint,
the operating threshold chosen from that pass's validation probabilities, and report.txt /
metrics.json at that threshold.

The pass runs the whole network on the decoded images, exactly as `python -m tb_lightning.eval`
(and predict and export) do, with the same batch size: the same checkpoint and split give the
same numbers in train's report and in eval's. The per-epoch curves may come from cached
backbone features in reduced precision (data.cache_features); the final figures never do.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from tb_lightning.core.artefacts import (
    data_root,
    image_path,
    probability_text,
    relative_path,
    write_predictions_sidecar,
)
from tb_lightning.core.atomic import atomic_write, atomic_write_csv, atomic_write_json
from tb_lightning.core.errors import DataError
from tb_lightning.core.labels import CLASS_NAMES
from tb_lightning.data.datamodule import TBDataModule
from tb_lightning.data.sources import Sample
from tb_lightning.evaluation.evaluate import (
    SYNTHETIC_BANNER,
    bootstrap_settings,
    describe_trained,
    format_threshold_header,
    optimism_note,
    score_split,
)
from tb_lightning.evaluation.figures import evaluation_figures
from tb_lightning.evaluation.populations import source_of
from tb_lightning.evaluation.report import format_split_block
from tb_lightning.stats.bootstrap import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED
from tb_lightning.stats.calibration import (
    calibration_warnings,
    describe_calibration,
    fit_temperature,
)
from tb_lightning.stats.thresholds import choose_operating_threshold, describe_threshold_choice
from tb_lightning.trained.checkpoint import store_operating_threshold
from tb_lightning.trained.model import TrainedModel
from tb_lightning.trained.runner import INFERENCE_BATCH_SIZE, probabilities

log = logging.getLogger(__name__)

TEST_NOTE = (
    "Scored at the same operating threshold, which these images did not influence: the "
    "unbiased estimate of the figures at it."
)
NO_TEST_HINT = (
    "No held-out test split: data.test_size=0.15 (or a count) keeps one apart and reports it "
    "here at this threshold.\n"
)


def final_report(
    model: torch.nn.Module,
    checkpoint: str | None,
    datamodule: TBDataModule,
    policy: str,
    target: float,
    output_dir: Path,
    device: torch.device | None = None,
    extra: dict[str, Any] | None = None,
    calibration: str = "none",
    epoch: int | None = None,
    step: int | None = None,
    weight_averaging: dict[str, Any] | None = None,
) -> FinalReport:
    """Score `model` (holding the checkpoint's weights) on the val and test splits, choose and
    store the operating threshold, write metrics.json, report.txt and predictions.csv; return
    them with the figures at the operating threshold.

    calibration=temperature: a temperature is fitted on the val logits first and set on the
    model; the threshold is then chosen on, and every figure computed from, the calibrated
    probabilities, which eval, predict and export reproduce from the stored temperature. The
    temperature is stored with its warnings (calibration_warnings: [] when it may be trusted).
    `epoch` (from 0) and `step`: the checkpoint's, named in the report and metrics.json;
    `weight_averaging`: its record of averaged weights (callbacks=swa), None else.
    """
    val, test = list(datamodule.val_samples or []), list(datamodule.test_samples)
    # The same TrainedModel.predict as eval's: the same checkpoint gives the same numbers.
    trained = TrainedModel.of_classifier(
        model, checkpoint, datamodule.image_size, datamodule.preprocess
    )
    predictions = trained.predict(
        [s.path for s in [*val, *test]],
        INFERENCE_BATCH_SIZE,
        datamodule.num_workers,
        device,
        description="Scoring the val/test images",
    )
    if not predictions.readable.all():  # they passed the scan: changed on disk since
        first = predictions.reasons[int(np.argmin(predictions.readable))]
        raise DataError(f"An image could not be read after the scan ({first}); train again.")
    val_logits, test_logits = predictions.logits[: len(val)], predictions.logits[len(val) :]
    val_labels = np.array([s.label for s in val])
    fitted = None
    if calibration == "temperature":
        # The pass ran at temperature 1 (training's): its logits are the raw ones.
        temperature = fit_temperature(val_logits, val_labels)
        fitted = {
            "method": "temperature",
            "temperature": temperature,
            "fitted_on": f"the validation split ({len(val)} images)",
        }
        model.temperature.fill_(temperature)
        # The same division the model now does, in float32 as its forward: the numbers here
        # are then the ones eval computes from the stored temperature.
        val_logits, test_logits = (
            (torch.from_numpy(z.astype(np.float32)) / model.temperature.cpu()).numpy()
            for z in (val_logits, test_logits)
        )

    choice = choose_operating_threshold(probabilities(val_logits), val_labels, policy, target)
    source = describe_threshold_choice(choice)
    threshold = choice["value"]
    pos_weight, gamma = float(model.pos_weight), model.focal_gamma
    scores = score_split("val", val, val_logits, threshold, pos_weight, focal_gamma=gamma)
    if test:
        scores.update(
            score_split("test", test, test_logits, threshold, pos_weight, focal_gamma=gamma)
        )
    if fitted:
        # Stored with T (so stored after the scoring): the val AUROC's interval is the same
        # before and after T, which changes no ranking.
        fitted["warnings"] = calibration_warnings(
            fitted["temperature"], scores["val"]["overall"]["ci"]["auroc"]
        )
        for warning in fitted["warnings"]:
            log.warning("calibration=temperature: %s", warning)
    if checkpoint:
        store_operating_threshold(checkpoint, choice, fitted)

    counts = {
        f"{split}_counts": dict(zip(CLASS_NAMES, datamodule.class_counts(split), strict=True))
        for split in ("train", "val", "test")
    }
    # The run's files name the checkpoint relative to the run directory (core/artefacts.py).
    written_checkpoint = relative_path(checkpoint, output_dir) if checkpoint else None
    metrics: dict[str, Any] = {
        "checkpoint": written_checkpoint,
        # The epoch (Lightning's count, from 0) and global step the checkpoint was saved at.
        "epoch": epoch,
        "step": step,
        "threshold": {**choice, "source": source},
        "calibration": fitted,
        "preprocess": datamodule.preprocess,
        "bootstrap": bootstrap_settings(BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED),
        "synthetic_data": datamodule.is_synthetic,
        **scores,
        # The cross-validation fold of this run (null without k-fold); sweep summaries use it.
        "data.fold": datamodule.split.fold if datamodule.split.num_folds is not None else None,
        "data.num_folds": datamodule.split.num_folds,
        **counts,
        "pos_weight": pos_weight,
        "weight_averaging": weight_averaging,
        **(extra or {}),
    }
    report = format_threshold_header(
        written_checkpoint or "final weights (no checkpoint saved)",
        threshold,
        source,
        datamodule.preprocess,
        trained=describe_trained([epoch], [step], weight_averaging),
    )
    if fitted:
        raw = np.concatenate([val_logits, test_logits]) * fitted["temperature"]
        labels = np.array([s.label for s in [*val, *test]])
        report += describe_calibration(fitted, raw[: len(val)], labels[: len(val)])
    if datamodule.is_synthetic:
        report += SYNTHETIC_BANNER
    if not test:
        report += NO_TEST_HINT
    report += "\n" + format_split_block(
        scores, "val", BOOTSTRAP_RESAMPLES, optimism_note("val", source)
    )
    if test:
        report += "\n" + format_split_block(scores, "test", BOOTSTRAP_RESAMPLES, TEST_NOTE)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(output_dir / "metrics.json", metrics)
    atomic_write(output_dir / "report.txt", report)
    write_run_predictions(
        output_dir / "predictions.csv",
        [("val", val, val_logits), ("test", test, test_logits)],
        threshold,
        source,
    )
    figures = {
        split: operating_figures(samples, logits, scores[split]["overall"], split)
        for split, samples, logits in (("val", val, val_logits), ("test", test, test_logits))
        if samples
    }
    return FinalReport(metrics, report, figures)


@dataclass
class FinalReport:
    """What final_report wrote (metrics.json, report.txt) and the chosen checkpoint's figures
    at the operating threshold, split -> name -> figure, for the dashboards."""

    metrics: dict[str, Any]
    report: str
    figures: dict[str, dict[str, Figure]]


def write_run_predictions(
    path: Path,
    splits: Sequence[tuple[str, Sequence[Sample], np.ndarray]],
    threshold: float,
    threshold_source: str,
) -> None:
    """predictions.csv of a training run: the chosen checkpoint's logit and p_tb for every val
    and test image, paths relative to the data root that predictions.json names with the
    threshold. The logit is written exactly (float32 round-trips in 9 digits), so that the
    sweep summary recomputes the run's figures bit for bit and compares runs image by image."""
    root = data_root(s.path for _, samples, _ in splits for s in samples)
    header = ["path", "split", "label", "source", "logit", "p_tb", "predicted_label"]
    rows = []
    for split, samples, logits in splits:
        for sample, logit, p in zip(samples, logits, probabilities(logits), strict=True):
            rows.append(
                [
                    image_path(sample.path, root),
                    split,
                    sample.label,
                    source_of(sample),
                    f"{float(logit):.9g}",
                    probability_text(p, threshold),
                    int(p >= threshold),
                ]
            )
    atomic_write_csv(path, header, rows)
    write_predictions_sidecar(path.parent, root, threshold, threshold_source)


def operating_figures(
    samples: Sequence[Sample], logits: np.ndarray, overall: dict[str, Any], split: str
) -> dict[str, Figure]:
    """Confusion matrix, ROC and PR curve of one split at the operating threshold, each titled
    with the split, its class counts and the threshold."""
    labels = np.array([s.label for s in samples])
    n_tb = int(labels.sum())
    subject = (
        f"{split} split: {len(labels)} images ({len(labels) - n_tb} Normal, {n_tb} TB), "
        f"at p_tb >= {overall['threshold']:.4f}"
    )
    return evaluation_figures(
        probabilities(logits),
        labels,
        overall,
        subject=subject,
        names=("confusion_matrix", "roc_curve", "pr_curve"),
    )
