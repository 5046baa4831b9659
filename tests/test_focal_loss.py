"""model.loss=focal: torchvision's sigmoid_focal_loss with the class weight, gamma 0 being the
weighted BCE; the reports recompute the loss the model was trained with and say which it is."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from conftest import phantom_overrides, run_cli
from data_builders import tiny_classifier
from tb_lightning.config.checks import check_loss
from tb_lightning.core.choices import loss_label
from tb_lightning.core.errors import ConfigError
from tb_lightning.stats.loss import mean_loss, per_image_loss
from tb_lightning.sweep.summary import summarise, write_summary
from test_sweep import noisy_logits, scored_job

LOGITS = torch.tensor([-4.0, -1.5, -0.2, 0.0, 0.3, 1.2, 2.5, 6.0, -30.0, 30.0])
LABELS = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0])


def test_focal_at_gamma_0_is_the_weighted_bce():
    bce, focal = tiny_classifier(), tiny_classifier(loss="focal", focal_gamma=0.0)
    for model in (bce, focal):
        model.pos_weight.fill_(3.0)
    expected = F.binary_cross_entropy_with_logits(LOGITS, LABELS, pos_weight=torch.tensor(3.0))
    torch.testing.assert_close(bce.training_loss(LOGITS, LABELS), expected)
    torch.testing.assert_close(focal.training_loss(LOGITS, LABELS), expected)
    assert mean_loss(LOGITS.numpy(), LABELS.numpy(), 3.0, 0.0) == pytest.approx(float(expected))


@pytest.mark.parametrize("gamma", [0.5, 2.0, 5.0])
def test_the_focal_loss_is_torchvisions_with_the_class_weight(gamma):
    model = tiny_classifier(loss="focal", focal_gamma=gamma)
    model.pos_weight.fill_(2.5)
    unweighted = sigmoid_focal_loss(LOGITS, LABELS, alpha=-1, gamma=gamma, reduction="none")
    weights = torch.where(LABELS == 1, 2.5, 1.0)
    expected = (unweighted * weights).mean()
    torch.testing.assert_close(model.training_loss(LOGITS, LABELS), expected)
    # The reports' NumPy recomputation (eval, sweep summaries) agrees, per image too, also at
    # the saturated logits (+-30) where a naive 1 - sigmoid underflows.
    ours = per_image_loss(LOGITS.numpy(), LABELS.numpy(), 2.5, gamma)
    np.testing.assert_allclose(ours, (unweighted * weights).double().numpy(), rtol=1e-5, atol=1e-7)
    # gamma > 0 scales each image's BCE by (1 - p_t) ** gamma: well-classified images most.
    bce = per_image_loss(LOGITS.numpy(), LABELS.numpy(), 2.5, 0.0)
    assert (ours <= bce + 1e-12).all()
    assert ours[7] / bce[7] == pytest.approx(torch.sigmoid(torch.tensor(-6.0)).item() ** gamma)


def test_a_loss_without_model_loss_is_the_bce():
    assert tiny_classifier().focal_gamma == 0.0
    assert tiny_classifier(loss="focal").focal_gamma == 2.0  # the paper's default
    assert loss_label(0.0) == "weighted BCE"
    assert loss_label(2.0) == "focal loss, gamma 2, class-weighted"


@pytest.mark.parametrize(
    ("loss", "gamma", "key"),
    [
        ("hinge", None, "model.loss='hinge'"),
        ("bce", 2, "model.focal_gamma=2"),
        ("focal", -1, "model.focal_gamma=-1"),
        ("focal", "x", "model.focal_gamma='x'"),
    ],
)
def test_a_bad_loss_is_one_sentence(loss, gamma, key):
    with pytest.raises(ConfigError, match=key.replace("(", r"\(")):
        check_loss(loss, gamma)
    check_loss("focal", 1.5)
    check_loss("bce", None)


def test_train_and_eval_report_the_focal_loss_alike(phantom_root, tmp_path):
    """Train with model.loss=focal, then eval its best.ckpt on the same val split: both name the
    loss, and both give the same number for it (the same checkpoint, the same figures)."""
    run = tmp_path / "run"
    result = run_cli(
        "tb_lightning.train",
        *phantom_overrides(phantom_root),
        "trainer.max_epochs=1",
        "model.loss=focal",
        "model.focal_gamma=1.5",
        f"hydra.run.dir={run}",
        warm=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    trained = json.loads((run / "metrics.json").read_text())
    assert trained["training_loss"]["name"] == "focal loss, gamma 1.5, class-weighted"
    assert trained["training_loss"]["focal_gamma"] == 1.5
    assert (
        "(the loss, focal loss, gamma 1.5, class-weighted, is threshold-free)"
        in (run / "report.txt").read_text()
    )

    evaluated = tmp_path / "eval"
    result = run_cli(
        "tb_lightning.eval",
        f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}",
        "eval.report_images=false",
        f"hydra.run.dir={evaluated}",
        warm=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert metrics["training_loss"] == trained["training_loss"]
    assert metrics["val/loss"] == pytest.approx(trained["val/loss"], abs=1e-6)
    assert "focal loss, gamma 1.5, class-weighted" in (evaluated / "report.html").read_text()


def test_a_sweep_over_losses_does_not_rank_or_break_ties_on_the_loss(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 20)
    paths = [f"/img/{i}.png" for i in range(len(labels))]
    for num, (loss, gamma) in enumerate([("bce", 0.0), ("focal", 2.0)]):
        scored_job(
            tmp_path,
            num,
            [f"model.loss={loss}"],
            paths,
            labels,
            noisy_logits(labels, 1.0 + num, rng),
        )
        metrics_file = tmp_path / str(num) / "metrics.json"
        metrics = json.loads(metrics_file.read_text())
        metrics["training_loss"] = {"name": loss_label(gamma), "focal_gamma": gamma}
        metrics_file.write_text(json.dumps(metrics))
    summary = summarise(tmp_path, metric="val/loss")
    assert summary.metric == "val/auroc" and summary.requested_metric == "val/loss"
    assert summary.losses == ["focal loss, gamma 2, class-weighted", "weighted BCE"]
    text = (write_summary(tmp_path, metric="val/loss"), (tmp_path / "sweep_summary.md"))[1]
    markdown = text.read_text()
    assert "optimized_metric=val/loss compares different training losses here" in markdown
    assert "the val loss columns do not compare between them" in markdown
