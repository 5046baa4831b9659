"""Operating-threshold policies, applied to validation predictions at the end of training."""

from __future__ import annotations

import numpy as np

from tb_lightning.core.artefacts import DECIMALS
from tb_lightning.evaluation.stats import curve_points


def choose_threshold(
    probs: np.ndarray, target: np.ndarray, policy: str = "youden", sensitivity: float = 0.95
) -> float:
    """The TB-probability threshold (call TB when p >= it) that the policy picks.

    Candidates are the points of the validation ROC curve (one per distinct probability). The
    threshold returned sits halfway between the chosen point's probability and the next lower
    one: it reproduces that point exactly on the validation images, and a last-bit difference
    in a probability (another device, float32 vs float64) cannot flip an image that lay exactly
    on the threshold. The halfway point is rounded to 6 decimals (core/artefacts.py) when that
    stays strictly between the two, so that every file writes the threshold exactly as used.
    - youden: maximises sensitivity + specificity - 1;
    - max_f1: maximises the F1 score of the Tuberculosis class;
    - sensitivity: the highest threshold whose sensitivity is >= `sensitivity` (so the best
      specificity that meets the target).
    Ties go to the higher threshold (fewer false alarms).
    """
    probs = np.asarray(probs, dtype=np.float64)
    target = np.asarray(target).astype(bool)
    if target.all() or not target.any():
        raise ValueError("choosing a threshold needs both Normal and TB images")
    tps, fps, thresholds = curve_points(probs, target, np.ones((1, len(probs))))
    tps, fps = tps[0], fps[0]
    n_pos, n_neg = tps[-1], fps[-1]
    tpr, fpr = tps / n_pos, fps / n_neg
    if policy == "youden":
        best = int(np.argmax(tpr - fpr))  # argmax takes the first: the highest threshold
    elif policy == "max_f1":
        best = int(np.argmax(2 * tps / (tps + fps + n_pos)))
    else:
        best = int(np.flatnonzero(tpr >= sensitivity - 1e-12)[0])
    lower = thresholds[best + 1] if best + 1 < len(thresholds) else 0.0
    return clip_threshold(between(float(lower), float(thresholds[best])))


def between(low: float, high: float) -> float:
    """The point halfway between low and high, rounded to 6 decimals, or to as few more as keep
    it strictly between them (unrounded when none does: two probabilities a last bit apart)."""
    halfway = (low + high) / 2
    for decimals in range(DECIMALS, 16):
        value = round(halfway, decimals)
        if low < value < high:
            return value
    return halfway


def clip_threshold(value: float) -> float:
    """Keep a threshold inside (0, 1) (float32 sigmoids saturate at exactly 0 or 1)."""
    return float(min(max(value, 1e-7), np.nextafter(np.float32(1), np.float32(0))))
