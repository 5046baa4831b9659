"""Evaluate a checkpoint on a table of labelled images: numbers, figures, files."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tb_lightning.data.sources import CLASS_NAMES, Sample
from tb_lightning.data.split import read_split_csv
from tb_lightning.errors import ConfigError, DataError
from tb_lightning.evaluation.figures import evaluation_figures, write_figures
from tb_lightning.evaluation.report import (
    format_per_source,
    format_screening_table,
    screening_summary,
    seed_report_metrics,
)
from tb_lightning.evaluation.sources import source_groups, source_of
from tb_lightning.inference import LoadedModel, predict_images
from tb_lightning.report import format_seed_report

log = logging.getLogger(__name__)

SPLITS = ("val", "all")


def resolve_split(split: str | None, has_data: bool) -> str:
    """eval.split: val or all; unset means all when data= is given, else val."""
    if split is None:
        return "all" if has_data else "val"
    if split not in SPLITS:
        raise ConfigError(f"eval.split={split!r} is not one of {list(SPLITS)}.")
    if split == "all" and not has_data:
        raise ConfigError(
            "eval.split=all needs a data source: add data=folder data.root=<folder> (or "
            "data=tb_cxr / data=phantom)."
        )
    return split


def val_samples(run_dir: Path, split_file: str | Path | None) -> tuple[list[Sample], Path]:
    """The val rows of the training run's split.csv (or of split_file)."""
    path = Path(split_file).expanduser() if split_file else run_dir / "split.csv"
    if not path.is_file():
        raise DataError(
            f"No split file at {path} (expected beside the checkpoint's checkpoints/ folder); "
            "pass eval.split_file=<the run's split.csv>, or evaluate a folder with "
            "data=folder data.root=<folder>."
        )
    _, val = read_split_csv(path)
    return val, path


def evaluate_samples(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    threshold: float,
    threshold_source: str,
    output_dir: Path,
    split: str,
    n_bootstrap: int = 2000,
    seed: int = 42,
    batch_size: int = 32,
    num_workers: int = 0,
    device: torch.device | None = None,
) -> tuple[dict[str, Any], str]:
    """Predict, compute every number with its CI, write the run dir; return (metrics, report)."""
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int) or n_bootstrap < 100:
        raise ConfigError(
            f"eval.bootstrap={n_bootstrap!r} must be an integer >= 100 (default 2000)."
        )
    labels = np.array([s.label for s in samples], dtype=int)
    if len(set(labels.tolist())) < 2:
        raise DataError(
            f"The {len(samples)} images to evaluate hold only one class; sensitivity and "
            "specificity need both Normal and Tuberculosis images."
        )
    predictions = predict_images(
        loaded.model,
        [s.path for s in samples],
        loaded.image_size,
        batch_size,
        num_workers,
        device,
    )
    if not predictions.readable.all():
        bad = int((~predictions.readable).sum())
        first = predictions.reasons[int(np.argmin(predictions.readable))]
        raise DataError(
            f"{bad} image(s) could not be read, e.g. {first}; remove or replace them and run again."
        )
    probs = predictions.probs
    overall = screening_summary(probs, labels, threshold, n_bootstrap, seed)
    groups = source_groups(samples)
    per_source = {
        name: screening_summary(probs[idx], labels[idx], threshold, n_bootstrap, seed)
        for name, idx in groups.items()
        if len(set(labels[idx].tolist())) == 2  # a one-class source has no AUROC/spec pair
    }
    seed_metrics = seed_report_metrics(
        predictions.logits, probs, labels, threshold, loaded.pos_weight, "eval"
    )
    seed_metrics["eval/auroc"] = overall["auroc"]
    seed_metrics["eval/confusion_matrix"] = overall["confusion_matrix"]

    metrics: dict[str, Any] = {
        "checkpoint": str(loaded.checkpoint_path),
        "split": split,
        "threshold": threshold,
        "threshold_source": threshold_source,
        "bootstrap": {
            "resamples": n_bootstrap,
            "seed": seed,
            "level": 0.95,
            "stratified_by_class": True,
        },
        **seed_metrics,
        "overall": overall,
        "per_source": per_source,
    }
    report = (
        format_seed_report(seed_metrics, prefix="eval")
        + f"\nOperating threshold: p_tb >= {threshold:.4f} ({threshold_source})\n"
        + f"Images: {overall['images']} ({overall['counts'][CLASS_NAMES[0]]} Normal, "
        f"{overall['counts'][CLASS_NAMES[1]]} Tuberculosis), split: {split}\n"
        + format_screening_table(overall, n_bootstrap)
    )
    if per_source:
        report += "\nPer source:\n" + format_per_source(per_source)

    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (output_dir / "report.txt").write_text(report)
    write_eval_predictions(output_dir / "predictions.csv", samples, probs, threshold)
    scalars = {
        f"eval/{name}": value
        for name, value in overall.items()
        if isinstance(value, float) and name != "threshold"
    }
    write_figures(evaluation_figures(probs, labels, overall), output_dir, scalars, report)
    return metrics, report


def write_eval_predictions(
    path: Path, samples: Sequence[Sample], probs: np.ndarray, threshold: float
) -> None:
    """One row per image: what the model said and what the truth is."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "source", "p_tb", "predicted_label", "threshold"])
        for sample, p in zip(samples, probs, strict=True):
            called = int(p >= threshold)
            writer.writerow(
                [sample.path, sample.label, source_of(sample), f"{p:.6f}", called, threshold]
            )
