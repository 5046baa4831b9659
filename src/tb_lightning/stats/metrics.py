"""Binary screening metrics: the one table of them (`METRICS`), and their computation for many
weightings of one set of predictions at once.

`METRICS` says, per figure, its metrics.json key, its report label and short name, how it is
computed, whether it depends on the operating threshold, which way is better, which interval it
gets, and where else it is shown (sweep summary columns, final TensorBoard scalars). report.txt
(evaluation/report.py), metrics.json (evaluation/evaluate.py), the sweep summary
(sweep/summary.py) and the dashboards (engine/dashboard.py) read it, in its order; a row added
here is a figure in all of them (tests/test_registries.py checks that each one appears where its
row says).

Every figure is computed from per-image weights: all ones for the point estimate, bootstrap
multiplicities (how often each image was drawn) for a resample. One vectorised pass then gives
all 2000 bootstrap replicates; calling a metric library 2000 times would be ~100x slower. The
definitions match scikit-learn's (`roc_auc_score`, `average_precision_score`, the confusion
matrix at `p >= threshold`); tests/test_evaluation.py checks them against it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

# Equal-width probability bins of the expected calibration error (and the calibration curve).
CALIBRATION_BINS = 10
# The confusion counts, in weighted_metrics' output after the figures (not figures themselves:
# the rates' intervals are computed from them).
COUNTS = ("tn", "fp", "fn", "tp")

# Sections of the table, which report.txt prints in the order they first appear in METRICS:
# threshold-free ranking figures, calibration errors, figures at the operating threshold. The
# loss is computed from the logits by the reference report (evaluation/report.py), not here.
RANKING_SECTION = "ranking"
CALIBRATION_SECTION = "calibration"
THRESHOLD_SECTION = "at_threshold"
LOSS_SECTION = "loss"


class Weighted:
    """One set of predictions under b weightings of its images: what the rows of METRICS are
    computed from. Each part is computed once, when a row first asks for it (AUROC and AP share
    one ROC/PR curve, sensitivity and PPV one confusion matrix)."""

    def __init__(
        self, probs: np.ndarray, target: np.ndarray, threshold: float, weights: np.ndarray
    ) -> None:
        self.probs = probs  # (n,) TB probabilities
        self.target = target  # (n,) bool, True = Tuberculosis
        self.threshold = threshold
        self.weights = weights  # (b, n)

    @cached_property
    def confusion(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Weighted (tn, fp, fn, tp) at p >= threshold, each of shape (b,)."""
        called = self.probs >= self.threshold
        w, target = self.weights, self.target
        tn = w @ (~target & ~called)
        fp = w @ (~target & called)
        fn = w @ (target & ~called)
        tp = w @ (target & called)
        return tn, fp, fn, tp

    @cached_property
    def ranking(self) -> dict[str, np.ndarray]:
        return ranking_metrics(self.probs, self.target, self.weights)

    @cached_property
    def calibration(self) -> dict[str, np.ndarray]:
        return calibration_metrics(self.probs, self.target, self.weights)


# A proportion of counted images: (tn, fp, fn, tp) -> (successes, trials), on ints (report.txt's
# fractions) or on weighted counts (arrays). Its value is successes / trials, its interval the
# Wilson score interval (evaluation/report.py says why).
Proportion = Callable[[Any, Any, Any, Any], tuple[Any, Any]]


@dataclass(frozen=True)
class Metric:
    """One figure of the reports."""

    key: str  # metrics.json: `<split>.overall.<key>`, `<split>.overall.ci.<key>`, `<split>/<key>`
    label: str  # its row in report.txt's screening table
    short: str  # in headings and columns: "AUROC, AP, Brier, ECE ...", "val sens @thr"
    section: str  # RANKING_SECTION, CALIBRATION_SECTION, THRESHOLD_SECTION or LOSS_SECTION
    higher_is_better: bool
    # How it is computed from the weighted predictions (None: from `proportion`, or, for the
    # loss, from the logits elsewhere).
    compute: Callable[[Weighted], np.ndarray] | None = None
    proportion: Proportion | None = None
    # Also a flat `<split>/<key>` key of metrics.json (accuracy is not: the reference report's
    # `<split>/acc` is it; the reference report writes `<split>/loss` itself).
    flat: bool = True
    # The splits whose columns it is in the sweep summary (sweep_summary.csv/.md), and whether
    # there with its 95% interval (`<split>_<key>_ci_low/high`).
    sweep: tuple[str, ...] = ()
    sweep_interval: bool = False
    # Its val figure is a `final/...` TensorBoard scalar, an HParams column (tag: `tag`).
    dashboard: bool = False

    @property
    def threshold_free(self) -> bool:
        return self.section != THRESHOLD_SECTION

    @property
    def screening(self) -> bool:
        """Computed here (weighted_metrics), with a 95% interval: report.txt's table, metrics.json's
        `<split>.overall`."""
        return self.compute is not None or self.proportion is not None

    @property
    def interval(self) -> str | None:
        """How its 95% interval is computed, as metrics.json's `ci_method` names it."""
        if not self.screening:
            return None
        return "wilson" if self.proportion is not None else "bootstrap"

    def tag(self, split: str = "val") -> str:
        """Its final TensorBoard scalar: `final/val_auroc`, `final/val_operating_sensitivity`
        (the figures at the operating threshold say so)."""
        return f"final/{split}_{'' if self.threshold_free else 'operating_'}{self.key}"

    def column_title(self, split: str) -> str:
        """Its sweep summary column: `val AUROC`, `val sens @thr`."""
        return f"{split} {self.short}" + ("" if self.threshold_free else " @thr")

    def of(self, weighted: Weighted) -> np.ndarray:
        """Its value under each weighting, shape (b,)."""
        if self.compute is not None:
            return self.compute(weighted)
        if self.proportion is None:
            raise ValueError(f"{self.key} is not computed from the predictions")
        return _ratio(*self.proportion(*weighted.confusion))


# Every figure, in report order: section by section (ranking, calibration, at the threshold),
# then the loss. The rates' proportions keep their order of additions: they give the same
# floats as before the table existed, and the same for ints (report.py's fractions).
METRICS: tuple[Metric, ...] = (
    Metric(
        "auroc",
        "AUROC",
        "AUROC",
        RANKING_SECTION,
        higher_is_better=True,
        compute=lambda w: w.ranking["auroc"],
        sweep=("val", "test"),
        sweep_interval=True,
        dashboard=True,
    ),
    Metric(
        "average_precision",
        "Average precision",
        "AP",
        RANKING_SECTION,
        higher_is_better=True,
        compute=lambda w: w.ranking["average_precision"],
        sweep=("val",),
        dashboard=True,
    ),
    Metric(
        "brier",
        "Brier score",
        "Brier",
        CALIBRATION_SECTION,
        higher_is_better=False,
        compute=lambda w: w.calibration["brier"],
    ),
    Metric(
        "ece",
        f"ECE ({CALIBRATION_BINS} bins)",
        "ECE",
        CALIBRATION_SECTION,
        higher_is_better=False,
        compute=lambda w: w.calibration["ece"],
    ),
    Metric(
        "sensitivity",
        "Sensitivity",
        "sens",
        THRESHOLD_SECTION,
        higher_is_better=True,
        proportion=lambda tn, fp, fn, tp: (tp, tp + fn),
        sweep=("val", "test"),
        sweep_interval=True,
        dashboard=True,
    ),
    Metric(
        "specificity",
        "Specificity",
        "spec",
        THRESHOLD_SECTION,
        higher_is_better=True,
        proportion=lambda tn, fp, fn, tp: (tn, tn + fp),
        sweep=("val", "test"),
        sweep_interval=True,
        dashboard=True,
    ),
    Metric(
        "ppv",
        "PPV",
        "PPV",
        THRESHOLD_SECTION,
        higher_is_better=True,
        proportion=lambda tn, fp, fn, tp: (tp, tp + fp),
    ),
    Metric(
        "npv",
        "NPV",
        "NPV",
        THRESHOLD_SECTION,
        higher_is_better=True,
        proportion=lambda tn, fp, fn, tp: (tn, tn + fn),
    ),
    Metric(
        "accuracy",
        "Accuracy",
        "acc",
        THRESHOLD_SECTION,
        higher_is_better=True,
        proportion=lambda tn, fp, fn, tp: (tp + tn, tp + tn + fp + fn),
        flat=False,
    ),
    Metric(
        "loss",
        "Loss",
        "loss",
        LOSS_SECTION,
        higher_is_better=False,
        sweep=("val",),
        dashboard=True,
    ),
)
# The figures weighted_metrics computes, with their intervals, in report order.
SCREENING: tuple[Metric, ...] = tuple(m for m in METRICS if m.screening)
# Their names by section (the report and older callers).
RANKING = tuple(m.key for m in SCREENING if m.section == RANKING_SECTION)
CALIBRATION = tuple(m.key for m in SCREENING if m.section == CALIBRATION_SECTION)
RATES = tuple(m.key for m in SCREENING if m.section == THRESHOLD_SECTION)


def metric(key: str) -> Metric:
    """The row of METRICS named `key`."""
    for row in METRICS:
        if row.key == key:
            return row
    raise KeyError(key)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where den is 0 (e.g. PPV when nothing is called TB)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def weighted_metrics(
    probs: np.ndarray, target: np.ndarray, threshold: float, weights: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Every figure of SCREENING (AUROC, AP, Brier, ECE, sensitivity, ...) and the counts.

    Args:
        probs: TB probabilities, shape (n,).
        target: labels 0 (Normal) / 1 (Tuberculosis), shape (n,).
        threshold: an image is called TB when its probability is >= threshold.
        weights: shape (n,) or (b, n); None means one weighting of all ones.

    Returns:
        name -> array of shape (b,) (or () when weights is 1-D or None), in SCREENING's order,
        then COUNTS.
    """
    probs = np.asarray(probs, dtype=np.float64)
    target = np.asarray(target).astype(bool)
    w = np.ones_like(probs) if weights is None else np.asarray(weights, dtype=np.float64)
    single = w.ndim == 1
    weighted = Weighted(probs, target, threshold, np.atleast_2d(w))
    out = {m.key: m.of(weighted) for m in SCREENING}
    out.update(zip(COUNTS, weighted.confusion, strict=True))
    return {k: v[0] for k, v in out.items()} if single else out


def curve_points(
    probs: np.ndarray, target: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative weighted (TP, FP) at each distinct score, from the highest down.

    Returns (tps, fps, thresholds); tps/fps have shape (b, k) for k distinct scores: column j
    counts the images with score >= thresholds[j].
    """
    order = np.argsort(-probs, kind="mergesort")
    sorted_probs = probs[order]
    # The last index of each group of tied scores: the curve only moves between distinct scores.
    ends = np.r_[np.flatnonzero(np.diff(sorted_probs)), len(sorted_probs) - 1]
    w = weights[:, order]
    pos = target[order]
    tps = np.cumsum(w * pos, axis=1)[:, ends]
    fps = np.cumsum(w * ~pos, axis=1)[:, ends]
    return tps, fps, sorted_probs[ends]


def calibration_metrics(
    probs: np.ndarray, target: np.ndarray, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """Brier score (mean squared error of the TB probability, sklearn's `brier_score_loss`) and
    the expected calibration error: over CALIBRATION_BINS equal-width bins (lo, hi], the
    image-weighted mean of |mean probability - observed TB fraction| (the bins of the
    calibration curve, evaluation/figures.py)."""
    total = weights.sum(axis=1)
    y = target.astype(np.float64)
    brier = _ratio(weights @ (probs - y) ** 2, total)
    edges = np.linspace(0, 1, CALIBRATION_BINS + 1)
    which = np.searchsorted(edges[1:-1], probs)  # bins (lo, hi], as sklearn's calibration_curve
    members = np.arange(CALIBRATION_BINS)[:, None] == which[None, :]  # (bins, n)
    # Per bin: |sum of weights x (probability - label)| = its count x |mean prob - TB fraction|.
    gaps = np.abs(weights @ (members * (probs - y)).T)  # (b, bins)
    return {"brier": brier, "ece": _ratio(gaps.sum(axis=1), total)}


def ranking_metrics(
    probs: np.ndarray, target: np.ndarray, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """AUROC (trapezoidal ROC, ties count half) and average precision (step-wise, sklearn's)."""
    tps, fps, _ = curve_points(probs, target, weights)
    n_pos, n_neg = tps[:, -1:], fps[:, -1:]
    zero = np.zeros((tps.shape[0], 1))
    tpr = _ratio(np.hstack([zero, tps]), n_pos)
    fpr = _ratio(np.hstack([zero, fps]), n_neg)
    auroc = np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2, axis=1)
    precision = _ratio(tps, tps + fps)
    recall_steps = np.diff(tpr, axis=1)
    average_precision = np.nansum(recall_steps * precision, axis=1)
    average_precision[n_pos[:, 0] == 0] = np.nan
    return {"auroc": auroc, "average_precision": average_precision}
