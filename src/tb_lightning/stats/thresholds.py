"""The operating threshold, in one place: the policies that choose it on validation predictions at
the end of training, the record stored in checkpoints, and the words every report prints for it.
(trained/checkpoint.py writes the record into the checkpoint; trained/model.py reads it back.)"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tb_lightning.core.artefacts import DECIMALS
from tb_lightning.stats.metrics import curve_points

# How a choice made on validation is described wherever a figure at it is reported (the reports
# test for it).
CHOSEN_ON_VAL = "chosen on the validation split"


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


def choose_operating_threshold(
    val_probs: np.ndarray, val_labels: Sequence[int], policy: str, target: float
) -> dict[str, Any]:
    """The threshold.policy's choice on the validation probabilities, as stored in checkpoints."""
    return {
        "value": choose_threshold(val_probs, np.asarray(val_labels), policy, target),
        "policy": policy,
        "target": float(target),
        "val_images": len(val_labels),
    }


def describe_threshold_choice(choice: dict[str, Any]) -> str:
    """`chosen on the validation split (60 images) by threshold.policy=youden`, for reports."""
    target = f", target {choice['target']}" if choice.get("policy") == "sensitivity" else ""
    images = f" ({choice['val_images']} images)" if choice.get("val_images") else ""
    if choice.get("chosen_on"):  # an ensemble's: trained/ensemble.py
        given = (
            f" (given on the command line; the members were trained with "
            f"threshold.policy={choice['trained_policy']})"
            if choice.get("trained_policy")
            else ""
        )
        return (
            f"chosen on {choice['chosen_on']}{images} by threshold.policy={choice['policy']}"
            f"{target}{given}"
        )
    return f"{CHOSEN_ON_VAL}{images} by threshold.policy={choice['policy']}{target}"
