"""The torchmetrics-based metrics against scikit-learn on the same predictions."""

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from tb_lightning.evaluation.report import format_reference_report
from tb_lightning.models.metrics import ClassificationMetrics


def sklearn_metrics(probs: np.ndarray, target: np.ndarray, threshold: float) -> dict:
    preds = (probs >= threshold).astype(int)
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        target, preds, labels=[0, 1], zero_division=0
    )
    return {
        "acc": skm.accuracy_score(target, preds),
        "auroc": skm.roc_auc_score(target, probs),
        "average_precision": skm.average_precision_score(target, probs),
        "precision/Normal": precision[0],
        "precision/Tuberculosis": precision[1],
        "recall/Normal": recall[0],
        "recall/Tuberculosis": recall[1],
        "f1/Normal": f1[0],
        "f1/Tuberculosis": f1[1],
        "confusion": skm.confusion_matrix(target, preds, labels=[0, 1]),
    }


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_metrics_match_sklearn_over_several_batches(threshold):
    rng = np.random.default_rng(0)
    target = (rng.random(203) < 0.2).astype(int)  # imbalanced like the TB data
    probs = np.clip(0.35 * target + rng.random(203) * 0.7, 0, 1).astype(np.float32)
    metrics = ClassificationMetrics("val", threshold=threshold)
    for start in range(0, 203, 18):  # batches of 18, the last one short
        metrics.update(
            torch.from_numpy(probs[start : start + 18]),
            torch.from_numpy(target[start : start + 18]),
        )
    ours = {k: float(v) for k, v in metrics.compute().items()}
    expected = sklearn_metrics(probs, target, threshold)
    for name, value in expected.items():
        if name == "confusion":
            assert metrics.confusion_matrix().tolist() == value.tolist()
        elif name in ("auroc", "average_precision"):  # threshold-free: the split's own group
            assert ours[f"val/{name}"] == pytest.approx(value, abs=1e-6), name
        else:  # in the group of the fixed threshold they are computed at: val@0.3/f1/Normal
            assert ours[f"val@{threshold:g}/{name}"] == pytest.approx(value, abs=1e-6), name
    assert len(ours) == len(expected) - 1  # nothing else (the confusion matrix is not a scalar)


def test_train_split_keeps_only_the_threshold_free_curves():
    metrics = ClassificationMetrics("train", at_threshold=False)
    metrics.update(torch.tensor([0.9, 0.2, 0.6]), torch.tensor([1, 0, 0]))
    assert set(metrics.compute()) == {"train/auroc"}
    assert float(metrics.compute()["train/auroc"]) == pytest.approx(1.0)


def test_reset_starts_a_new_epoch():
    metrics = ClassificationMetrics()
    metrics.update(torch.tensor([0.9, 0.1]), torch.tensor([0, 1]))
    metrics.reset()
    metrics.update(torch.tensor([0.9, 0.1]), torch.tensor([1, 0]))
    assert float(metrics.compute()["val@0.5/acc"]) == 1.0


def test_seed_report_format():
    values = {
        "val/loss": 0.019457,
        "val/acc": 0.99333333,
        "val/auroc": 0.999,
        "val/precision/Normal": 0.994024,
        "val/recall/Normal": 0.998,
        "val/f1/Normal": 0.996008,
        "val/precision/Tuberculosis": 0.989796,
        "val/recall/Tuberculosis": 0.97,
        "val/f1/Tuberculosis": 0.979798,
        "val/confusion_matrix": [[499, 1], [3, 97]],
    }
    report = format_reference_report(values, "val", threshold=0.4321)
    assert report.startswith(
        "At p_tb >= 0.432100 (the loss, weighted BCE, is threshold-free):\n"
        "Validation loss: 0.019457, Validation acc: 99.333333,\n"
        "for class Normal:\n"
        " validation precision: 0.994024, validation recall: 0.998000 , validation F1: 0.996008\n"
        "for class Tuberculosis:\n"
        " validation precision: 0.989796, validation recall: 0.970000 , validation F1: 0.979798\n"
    )
    assert "Confusion matrix at p_tb >= 0.432100" in report
