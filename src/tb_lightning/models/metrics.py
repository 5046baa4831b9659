"""Per-epoch classification metrics for one split, built from torchmetrics.

These are the training curves. AUROC is threshold-free; accuracy, precision, recall, F1 and the
confusion matrix are computed at the fixed `model.threshold` (0.5) and named for it
(`acc@0.5`, `recall@0.5/Tuberculosis`): they are not the operating-point figures, which are
computed once at the end of training at the threshold chosen on the validation split
(evaluation/evaluate.py) and written to report.txt and metrics.json.
Binary metrics take TB probabilities; the per-class precision/recall/F1 take the predicted
class so that both Normal and Tuberculosis get a value.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from tb_lightning.core.labels import CLASS_NAMES


class ClassificationMetrics(nn.Module):
    """Accumulates predictions over an epoch; `compute()` gives flat names like `f1/Normal`."""

    def __init__(self, threshold: float = 0.5, class_names: Sequence[str] = CLASS_NAMES) -> None:
        super().__init__()
        self.threshold = threshold
        self.class_names = tuple(class_names)
        self.binary = MetricCollection(
            {"acc": BinaryAccuracy(threshold=threshold), "auroc": BinaryAUROC()}
        )
        # average=None keeps one value per class: index 0 Normal, index 1 Tuberculosis.
        self.per_class = MetricCollection(
            {
                "precision": MulticlassPrecision(num_classes=2, average=None),
                "recall": MulticlassRecall(num_classes=2, average=None),
                "f1": MulticlassF1Score(num_classes=2, average=None),
            }
        )
        self.confmat = BinaryConfusionMatrix(threshold=threshold)

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        target = target.long()
        self.binary.update(probs, target)
        self.per_class.update((probs >= self.threshold).long(), target)
        self.confmat.update(probs, target)

    @property
    def suffix(self) -> str:
        """`@0.5`: appended to the names of the figures that depend on the fixed threshold."""
        return f"@{self.threshold:g}"

    def compute(self) -> dict[str, torch.Tensor]:
        binary = self.binary.compute()
        values = {"auroc": binary["auroc"], f"acc{self.suffix}": binary["acc"]}
        for name, per_class in self.per_class.compute().items():
            for class_name, value in zip(self.class_names, per_class, strict=True):
                values[f"{name}{self.suffix}/{class_name}"] = value
        return values

    def confusion_matrix(self) -> torch.Tensor:
        """[[TN, FP], [FN, TP]] with rows = true class, columns = predicted class."""
        return self.confmat.compute()

    def reset(self) -> None:
        self.binary.reset()
        self.per_class.reset()
        self.confmat.reset()
