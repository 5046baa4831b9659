"""The training loss, as the reports recompute it from stored logits (`model.loss`).

Two losses, one formula: the class-weighted focal loss of Lin et al. (2017),

    loss(z, y) = w_y * CE(z, y) * (1 - p_t) ** gamma,    p_t = sigmoid(z) if y else 1 - sigmoid(z)

with w_TB = pos_weight (the data module's class weight) and w_Normal = 1, averaged over images.
gamma = 0 is the weighted binary cross-entropy (`model.loss=bce`) exactly; `model.loss=focal`
uses `model.focal_gamma` (2 unless set). Training computes the same thing in torch
(models/classifier.py: torch's BCE for gamma 0, torchvision's sigmoid_focal_loss otherwise); here
it is NumPy because eval, the sweep summary and the paired comparisons score stored logits
without torch. tests/test_focal_loss.py checks the two against each other.
"""

from __future__ import annotations

import numpy as np


def per_image_loss(
    logits: np.ndarray, labels: np.ndarray, pos_weight: float, focal_gamma: float = 0.0
) -> np.ndarray:
    """Each image's training loss (float64): see the module docstring."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels).astype(np.float64)
    # -log(sigmoid(z)) = logaddexp(0, -z); -log(1 - sigmoid(z)) = logaddexp(0, z): stable.
    cross_entropy = pos_weight * y * np.logaddexp(0, -z) + (1 - y) * np.logaddexp(0, z)
    if focal_gamma == 0:
        return cross_entropy
    # 1 - p_t = sigmoid(-z) for TB, sigmoid(z) for Normal; as exp(-logaddexp) to stay stable.
    signed = np.where(y == 1, -z, z)
    one_minus_p_t = np.exp(-np.logaddexp(0, -signed))
    return cross_entropy * one_minus_p_t**focal_gamma


def mean_loss(
    logits: np.ndarray, labels: np.ndarray, pos_weight: float, focal_gamma: float = 0.0
) -> float:
    """The training loss over a set of images (the mean of per_image_loss)."""
    return float(np.mean(per_image_loss(logits, labels, pos_weight, focal_gamma)))
