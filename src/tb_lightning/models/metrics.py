"""Per-epoch classification metrics for one split, built from torchmetrics, named as TensorBoard
shows them.

These are the training curves. Threshold-free figures (AUROC, average precision) are named
`<split>/auroc`; the validation figures at the fixed `model.threshold` (0.5) live in a group of
their own, `val@0.5/acc`, `val@0.5/recall/Tuberculosis`, ...: they are not the operating-point
figures, which are computed once at the end of training at the threshold chosen on the
validation split (evaluation/evaluate.py) and written to report.txt and metrics.json.

Why the names: TensorBoard's Time Series tab sorts its card groups by the tag's first part and
opens the first two, so `train` and `val` (loss, AUROC, average precision) come first and open,
and `val@0.5` comes after them, folded (engine/dashboard.py).
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
    BinaryAveragePrecision,
    BinaryConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from tb_lightning.core.labels import CLASS_NAMES


class ClassificationMetrics(nn.Module):
    """Accumulates one split's predictions over an epoch; `compute()` gives TensorBoard tags.

    Args:
        split: `train` or `val`, the first part of every tag.
        threshold: the fixed per-epoch threshold of the `<split>@0.5/...` figures.
        at_threshold: whether to compute the figures at `threshold` (accuracy, per-class
            precision/recall/F1, the confusion matrix). The train split leaves them out: its
            curves are compared with val's threshold-free ones (loss, AUROC), and every metric
            left out is one update less per training step.
    """

    def __init__(
        self,
        split: str = "val",
        threshold: float = 0.5,
        at_threshold: bool = True,
        class_names: Sequence[str] = CLASS_NAMES,
    ) -> None:
        super().__init__()
        self.split = split
        self.threshold = threshold
        self.at_threshold = at_threshold
        self.class_names = tuple(class_names)
        self.ranking = MetricCollection({"auroc": BinaryAUROC()})
        if at_threshold:
            self.ranking.add_metrics({"average_precision": BinaryAveragePrecision()})
            self.accuracy = BinaryAccuracy(threshold=threshold)
            # average=None keeps one value per class: index 0 Normal, index 1 Tuberculosis.
            self.per_class = MetricCollection(
                {
                    "precision": MulticlassPrecision(num_classes=2, average=None),
                    "recall": MulticlassRecall(num_classes=2, average=None),
                    "f1": MulticlassF1Score(num_classes=2, average=None),
                }
            )
            self.confmat = BinaryConfusionMatrix(threshold=threshold)

    @property
    def fixed_group(self) -> str:
        """`val@0.5`: the tag group of the figures at the fixed threshold."""
        return f"{self.split}@{self.threshold:g}"

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        target = target.long()
        self.ranking.update(probs, target)
        if self.at_threshold:
            self.accuracy.update(probs, target)
            self.per_class.update((probs >= self.threshold).long(), target)
            self.confmat.update(probs, target)

    def compute(self) -> dict[str, torch.Tensor]:
        """`{'val/auroc': ..., 'val/average_precision': ..., 'val@0.5/acc': ...,
        'val@0.5/recall/Tuberculosis': ...}`."""
        values = {f"{self.split}/{name}": v for name, v in self.ranking.compute().items()}
        if self.at_threshold:
            values[f"{self.fixed_group}/acc"] = self.accuracy.compute()
            for name, per_class in self.per_class.compute().items():
                for class_name, value in zip(self.class_names, per_class, strict=True):
                    values[f"{self.fixed_group}/{name}/{class_name}"] = value
        return values

    def confusion_matrix(self) -> torch.Tensor:
        """[[TN, FP], [FN, TP]] at the fixed threshold, rows = true class, columns = predicted."""
        return self.confmat.compute()

    def reset(self) -> None:
        self.ranking.reset()
        if self.at_threshold:
            self.accuracy.reset()
            self.per_class.reset()
            self.confmat.reset()
