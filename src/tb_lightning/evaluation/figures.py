"""The evaluation figures (matplotlib), written as PNG files and into TensorBoard."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from tb_lightning.core.artefacts import threshold_text  # noqa: E402
from tb_lightning.core.atomic import atomic_write_with
from tb_lightning.core.labels import CLASS_NAMES  # noqa: E402
from tb_lightning.stats.metrics import (  # noqa: E402
    CALIBRATION_BINS,
    calibration_metrics,
    curve_points,
)


def confusion_figure(
    confusion: list[list[int]], threshold: float, title: str | None = None
) -> Figure:
    """Counts with true class in rows, predicted class in columns; titled with the threshold."""
    fig, ax = plt.subplots(figsize=(5, 4.2))
    matrix = np.asarray(confusion)
    ax.imshow(matrix, cmap="Blues")
    for (row, col), value in np.ndenumerate(matrix):
        color = "white" if value > matrix.max() / 2 else "black"
        ax.text(col, row, str(value), ha="center", va="center", color=color, fontsize=14)
    ax.set_xticks([0, 1], CLASS_NAMES)
    ax.set_yticks([0, 1], CLASS_NAMES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"Confusion matrix at p_tb >= {threshold_text(threshold)}")
    fig.tight_layout()
    return fig


def finish_unit_square(
    fig: Figure,
    ax: Any,
    title: str,
    xlabel: str,
    ylabel: str,
    legend: str,
    top: float = 1.02,
) -> Figure:
    """Labels, [0, 1] axes (a little headroom above 1 for curves that reach it), the legend
    (a matplotlib location, or "below" the axes)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, top)
    if legend == "below":
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize="small")
    else:
        ax.legend(loc=legend, fontsize="small")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def roc_figure(probs: np.ndarray, target: np.ndarray, metrics: dict[str, Any]) -> Figure:
    tps, fps, _ = curve_points(probs, target.astype(bool), np.ones((1, len(probs))))
    tpr = np.r_[0, tps[0] / tps[0, -1]]
    fpr = np.r_[0, fps[0] / fps[0, -1]]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"ROC (AUROC {metrics['auroc']:.3f})")
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.plot(
        1 - metrics["specificity"],
        metrics["sensitivity"],
        "o",
        color="red",
        label=f"operating point (p_tb >= {threshold_text(metrics['threshold'])})",
    )
    # The WHO minimum for CXR screening: sensitivity >= 0.90 with specificity >= 0.70.
    ax.fill_between([0, 0.3], 0.9, 1, color="green", alpha=0.1, label="WHO screening minimum")
    return finish_unit_square(
        fig,
        ax,
        "ROC curve",
        "1 - specificity (false positive rate)",
        "sensitivity (true positive rate)",
        legend="lower right",
    )


def pr_figure(probs: np.ndarray, target: np.ndarray, metrics: dict[str, Any]) -> Figure:
    tps, fps, _ = curve_points(probs, target.astype(bool), np.ones((1, len(probs))))
    recall = np.r_[0, tps[0] / tps[0, -1]]
    precision = np.r_[1, tps[0] / (tps[0] + fps[0])]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.step(recall, precision, where="pre", label=f"AP {metrics['average_precision']:.3f}")
    if metrics["ppv"] is not None:  # undefined when no image is called TB at the threshold
        ax.plot(metrics["sensitivity"], metrics["ppv"], "o", color="red", label="operating point")
    ax.axhline(target.mean(), ls=":", color="grey", label=f"prevalence {target.mean():.2f}")
    return finish_unit_square(
        fig, ax, "Precision-recall curve", "recall (sensitivity)", "precision (PPV)", "lower left"
    )


def distribution_figure(probs: np.ndarray, target: np.ndarray, threshold: float) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, 1, 26)
    for label, name in enumerate(CLASS_NAMES):
        ax.hist(probs[target == label], bins=bins, alpha=0.6, label=f"true {name}")
    ax.axvline(threshold, color="red", ls="--", label=f"threshold {threshold_text(threshold)}")
    ax.set_xlabel("predicted TB probability (p_tb)")
    ax.set_ylabel("images")
    ax.legend()
    ax.set_title("Predicted TB probability per true class")
    fig.tight_layout()
    return fig


def calibration_bins(
    probs: np.ndarray, target: np.ndarray, n_bins: int = CALIBRATION_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean predicted probability, observed TB fraction, count) per non-empty equal-width bin."""
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.searchsorted(edges[1:-1], probs)  # bins (lo, hi], as sklearn's calibration_curve
    counts = np.bincount(which, minlength=n_bins)
    keep = counts > 0
    mean_prob = np.bincount(which, weights=probs, minlength=n_bins)[keep] / counts[keep]
    observed = np.bincount(which, weights=target, minlength=n_bins)[keep] / counts[keep]
    return mean_prob, observed, counts[keep]


def calibration_scores(probs: np.ndarray, target: np.ndarray) -> str:
    scores = calibration_metrics(
        np.asarray(probs, dtype=np.float64), np.asarray(target), np.ones((1, len(probs)))
    )
    return f"ECE {scores['ece'][0]:.3f}, Brier {scores['brier'][0]:.3f}"


def calibration_figure(
    probs: np.ndarray, target: np.ndarray, uncalibrated: np.ndarray | None = None
) -> Figure:
    """The reliability curve of `probs`; with `uncalibrated` (the probabilities before the
    model's temperature) that curve too, dashed, so that before and after sit side by side."""
    mean_prob, observed, counts = calibration_bins(probs, target)
    fig, ax = plt.subplots(figsize=(5, 6))
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="perfectly calibrated")
    if uncalibrated is not None:
        before_x, before_y, _ = calibration_bins(uncalibrated, target)
        ax.plot(
            before_x,
            before_y,
            "s--",
            color="tab:orange",
            alpha=0.7,
            label=f"before temperature scaling ({calibration_scores(uncalibrated, target)})",
        )
    name = "model" if uncalibrated is None else "after temperature scaling"
    ax.plot(mean_prob, observed, "o-", label=f"{name} ({calibration_scores(probs, target)})")
    for x, y, n in zip(mean_prob, observed, counts, strict=True):
        ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    return finish_unit_square(
        fig,
        ax,
        "Calibration (reliability) curve",
        "mean predicted TB probability (10 bins)",
        "fraction of images that are TB",
        # Below the axes: a reliability curve can pass through any corner of the square.
        legend="below",
        top=1.0,
    )


def evaluation_figures(
    probs: np.ndarray,
    target: np.ndarray,
    metrics: dict[str, Any],
    uncalibrated: np.ndarray | None = None,
    subject: str | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, Figure]:
    """name -> figure for the overall metrics (see evaluation/report.py for `metrics`);
    `uncalibrated`: the probabilities before a calibration temperature, for its figure;
    `subject`: what the figures are measured on (`test split: 100 images (...)`), a second title
    line on each, so that a figure shown alone still says it; `names`: only these figures."""
    draw = {
        "confusion_matrix": lambda: confusion_figure(
            metrics["confusion_matrix"], metrics["threshold"]
        ),
        "roc_curve": lambda: roc_figure(probs, target, metrics),
        "pr_curve": lambda: pr_figure(probs, target, metrics),
        "p_tb_distribution": lambda: distribution_figure(probs, target, metrics["threshold"]),
        "calibration_curve": lambda: calibration_figure(probs, target, uncalibrated),
    }
    figures = {name: draw[name]() for name in (names or draw)}
    if subject:
        for figure in figures.values():
            ax = figure.axes[0]
            ax.set_title(f"{ax.get_title()}\n{subject}", fontsize="medium")
            figure.tight_layout()
    return figures


def write_figures(
    figures: dict[str, Figure],
    output_dir: Path,
    scalars: dict[str, float] | None = None,
    text: str | None = None,
) -> list[Path]:
    """Save each figure as <output_dir>/figures/<name>.png, and figures, scalars and the report
    text into TensorBoard (<output_dir>/tensorboard/)."""
    from torch.utils.tensorboard import SummaryWriter

    figure_dir = output_dir / "figures"
    figure_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    writer = SummaryWriter(str(output_dir / "tensorboard"))
    try:
        for name, fig in figures.items():
            path = figure_dir / f"{name}.png"
            atomic_write_with(path, lambda f, fig=fig: fig.savefig(f, format="png", dpi=120))
            paths.append(path)
            writer.add_figure(f"eval/{name}", fig, close=True)
        for name, value in (scalars or {}).items():
            writer.add_scalar(name, value)
        if text:
            # Markdown: indent by four spaces to keep the report's columns.
            writer.add_text("eval/report", "\n".join("    " + line for line in text.splitlines()))
    finally:
        writer.close()
    return paths
