"""Binary screening metrics for many weightings of one set of predictions at once.

Every metric here is computed from per-image weights: all ones for the point estimate, bootstrap
multiplicities (how often each image was drawn) for a resample. One vectorised pass then gives
all 2000 bootstrap replicates; calling a metric library 2000 times would be ~100x slower. The
definitions match scikit-learn's (`roc_auc_score`, `average_precision_score`, the confusion
matrix at `p >= threshold`); tests/test_evaluation.py checks them against it.
"""

from __future__ import annotations

import numpy as np

# Metric names, in report order. Counts come last.
RATES = ("sensitivity", "specificity", "ppv", "npv", "accuracy")
RANKING = ("auroc", "average_precision")
# Calibration: how far the probabilities are from the observed TB rates (lower is better).
CALIBRATION = ("brier", "ece")
# Equal-width probability bins of the expected calibration error (and the calibration curve).
CALIBRATION_BINS = 10
COUNTS = ("tn", "fp", "fn", "tp")


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where den is 0 (e.g. PPV when nothing is called TB)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def weighted_metrics(
    probs: np.ndarray, target: np.ndarray, threshold: float, weights: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """AUROC, AP, sensitivity, specificity, PPV, NPV, accuracy and counts.

    Args:
        probs: TB probabilities, shape (n,).
        target: labels 0 (Normal) / 1 (Tuberculosis), shape (n,).
        threshold: an image is called TB when its probability is >= threshold.
        weights: shape (n,) or (b, n); None means one weighting of all ones.

    Returns:
        name -> array of shape (b,) (or () when weights is 1-D or None).
    """
    probs = np.asarray(probs, dtype=np.float64)
    target = np.asarray(target).astype(bool)
    w = np.ones_like(probs) if weights is None else np.asarray(weights, dtype=np.float64)
    single = w.ndim == 1
    w = np.atleast_2d(w)

    called = probs >= threshold
    tp = w @ (target & called)
    fn = w @ (target & ~called)
    fp = w @ (~target & called)
    tn = w @ (~target & ~called)
    out = {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
        **ranking_metrics(probs, target, w),
        **calibration_metrics(probs, target, w),
        "tn": tn,
        "fp": fp,
        "fn": fn,
        "tp": tp,
    }
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
