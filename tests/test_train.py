"""`python -m tb_lightning.train` end to end, as a user runs it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import (
    PHANTOM_NORMAL,
    PHANTOM_SIZE,
    PHANTOM_TB,
    compose_train,
    phantom_overrides,
    train_in_process,
)
from tb_lightning.core.errors import ConfigError
from tb_lightning.core.tasks import run_task
from tb_lightning.data.dataset import ImageDataset
from tb_lightning.data.sources import Sample
from tb_lightning.data.transforms import build_transform
from tb_lightning.models.classifier import TBClassifier
from tb_lightning.models.torch_file import load_checkpoint
from tb_lightning.train import train

# Per-epoch curves: threshold-free loss, AUROC (and val's average precision, train's lr), the
# val figures at the fixed threshold 0.5 in a group named for it (the operating-point figures
# are in report.txt / metrics.json, and in TensorBoard's `final` sub-run).
EXPECTED_SCALARS = {
    "train/loss",
    "train/auroc",
    "train/lr",
    "val/loss",
    "val/auroc",
    "val/average_precision",
    "val@0.5/acc",
    "val@0.5/precision/Normal",
    "val@0.5/recall/Normal",
    "val@0.5/f1/Normal",
    "val@0.5/precision/Tuberculosis",
    "val@0.5/recall/Tuberculosis",
    "val@0.5/f1/Tuberculosis",
}


def assert_ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def two_epoch_run(trained_run) -> Path:
    """The session's CLI run (conftest.trained_run): 2 epochs on the phantom set."""
    return trained_run


def test_run_dir_holds_every_artefact(two_epoch_run):
    names = {p.name for p in two_epoch_run.iterdir()}
    assert {
        ".hydra",
        "checkpoints",
        "tensorboard",
        "split.csv",
        "metrics.json",
        "report.txt",
    } <= names
    assert {p.name for p in (two_epoch_run / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
    assert load_checkpoint(two_epoch_run / "checkpoints" / "last.ckpt")["epoch"] == 1
    report = (two_epoch_run / "report.txt").read_text()
    threshold = json.loads((two_epoch_run / "metrics.json").read_text())["threshold"]["value"]
    # The checkpoint relative to the run directory; the threshold exactly, at 6 decimals.
    assert report.startswith("Checkpoint: checkpoints/best.ckpt\n")
    assert f"Operating threshold: p_tb >= {threshold:.6f}" in report
    assert float(f"{threshold:.6f}") == threshold
    assert "== Validation split: 12 images (8 Normal, 4 Tuberculosis) ==" in report
    assert "Validation loss: " in report and "for class Tuberculosis:" in report


def test_split_csv_is_stratified(two_epoch_run):
    rows = list(csv.DictReader((two_epoch_run / "split.csv").open()))
    val = [r for r in rows if r["split"] == "val"]
    assert len(rows) == 36 and len(val) == 12
    assert sum(r["label"] == "1" for r in val) == 4


def test_metrics_json_matches_sklearn_on_the_best_checkpoints_predictions(two_epoch_run):
    metrics = json.loads((two_epoch_run / "metrics.json").read_text())
    checkpoint = load_checkpoint(two_epoch_run / "checkpoints" / "best.ckpt")
    hparams = checkpoint["hyper_parameters"]
    model = TBClassifier(**{**hparams, "net": {**hparams["net"], "weights": None}})
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    rows = [r for r in csv.DictReader((two_epoch_run / "split.csv").open()) if r["split"] == "val"]
    samples = [Sample(r["path"], int(r["label"]), r["patient_id"], r["source"]) for r in rows]
    dataset = ImageDataset(
        [s.path for s in samples],
        [s.label for s in samples],
        build_transform(hparams["net"]["image_size"]),
    )
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    target = np.array([s.label for s in samples])
    with torch.no_grad():
        probs = torch.sigmoid(model(images)).numpy()
    # Every threshold-dependent figure is at the operating threshold that metrics.json states.
    threshold = metrics["threshold"]["value"]
    preds = (probs >= threshold).astype(int)
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        target, preds, labels=[0, 1], zero_division=0
    )
    weights = np.where(target == 1, metrics["pos_weight"], 1.0)
    loss = skm.log_loss(target, probs.astype(np.float64), labels=[0, 1], sample_weight=weights)
    loss *= weights.sum() / len(weights)  # BCE with pos_weight is a plain mean over images
    assert metrics["val/acc"] == pytest.approx(skm.accuracy_score(target, preds), abs=1e-6)
    assert metrics["val/auroc"] == pytest.approx(skm.roc_auc_score(target, probs), abs=1e-6)
    assert metrics["val/average_precision"] == pytest.approx(
        skm.average_precision_score(target, probs), abs=1e-6
    )
    assert metrics["val/sensitivity"] == pytest.approx(recall[1], abs=1e-6)
    assert metrics["val/specificity"] == pytest.approx(recall[0], abs=1e-6)
    assert metrics["val/loss"] == pytest.approx(loss, rel=1e-4)
    for i, name in enumerate(("Normal", "Tuberculosis")):
        assert metrics[f"val/precision/{name}"] == pytest.approx(precision[i], abs=1e-6)
        assert metrics[f"val/recall/{name}"] == pytest.approx(recall[i], abs=1e-6)
        assert metrics[f"val/f1/{name}"] == pytest.approx(f1[i], abs=1e-6)
    expected_cm = skm.confusion_matrix(target, preds, labels=[0, 1]).tolist()
    assert metrics["val/confusion_matrix"] == expected_cm
    assert metrics["pos_weight"] == pytest.approx(16 / 8)  # 24-8 Normal / 12-4 TB in train


def test_tensorboard_has_curves_confusion_images_and_a_final_row(two_epoch_run):
    (run,) = (two_epoch_run / "tensorboard").iterdir()  # one run, named by its overrides
    assert run.name.startswith("data=phantom,")
    assert not [p for p in run.iterdir() if p.is_dir()]  # no sub-run: one run in the list
    events = EventAccumulator(str(run), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    final_tags = {tag for tag in tags["scalars"] if tag.startswith("final/")}
    # The curves and the final figures, nothing else: no `epoch` staircase, no hparams/* copies.
    # (The step loss is written every trainer.log_every_n_steps, more than this run's steps.)
    assert set(tags["scalars"]) - {"train/loss_step"} - final_tags == EXPECTED_SCALARS
    assert len(events.Scalars("val/auroc")) == 2  # one point per epoch
    images = events.Images("val@0.5/confusion_matrix")
    # One per epoch, at the same steps as the epoch's val scalars.
    assert [i.step for i in images] == [s.step for s in events.Scalars("val/auroc")]
    # The final figures and the HParams row live in the run itself.
    stored = json.loads((two_epoch_run / "metrics.json").read_text())
    values = {tag: events.Scalars(tag)[0].value for tag in final_tags}
    assert values == pytest.approx(
        {
            "final/val_auroc": stored["val/auroc"],
            "final/val_average_precision": stored["val/average_precision"],
            "final/val_loss": stored["val/loss"],
            "final/val_operating_sensitivity": stored["val/sensitivity"],
            "final/val_operating_specificity": stored["val/specificity"],
            "final/val_operating_threshold": stored["threshold"]["value"],
        },
        abs=1e-6,
    )
    # Drawn on the curve at the chosen checkpoint's epoch.
    chosen = load_checkpoint(two_epoch_run / "checkpoints" / "best.ckpt")["global_step"] - 1
    assert {s.step for tag in values for s in events.Scalars(tag)} == {chosen}
    assert chosen in [s.step for s in events.Scalars("val/auroc")]
    # The chosen checkpoint's figures at the operating threshold, at that step.
    for name in ("confusion_matrix", "roc_curve", "pr_curve"):
        (image,) = events.Images(f"final/val_{name}")
        assert image.step == chosen and image.width > 100
    assert "final/report" in {tag.split("/text_summary")[0] for tag in tags["tensors"]}
    hparams = events.PluginTagToContent("hparams")
    assert set(hparams) == {"_hparams_/session_start_info"}  # no experiment summary
    assert b"model.optimizer.lr" in hparams["_hparams_/session_start_info"]
    assert b"log10(model.optimizer.lr)" in hparams["_hparams_/session_start_info"]


def test_more_epochs_is_not_a_resume_of_a_finished_run(two_epoch_run, phantom_root, tmp_path):
    """A resume continues a run with its own config; training a finished run further with
    other settings is a new run from its weights (init_from), not a rewrite of that run."""
    last = two_epoch_run / "checkpoints" / "last.ckpt"
    cfg = compose_train(
        [
            *phantom_overrides(phantom_root),
            "threshold.policy=max_f1",
            "trainer.max_epochs=3",
            f"ckpt_path={last}",
        ],
        output_dir=tmp_path,
    )
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert "differs from this one in trainer.max_epochs (2 there, 3 here)" in str(err.value)
    assert f"init_from={last}" in str(err.value)
    assert load_checkpoint(last)["epoch"] == 1


def test_fast_dev_run(phantom_root, tmp_path, caplog):
    train_in_process([*phantom_overrides(phantom_root), "debug=fdr"], tmp_path)
    assert (tmp_path / "report.txt").is_file()
    assert "reporting the final weights" in caplog.text


def test_upsampling_run_says_so_once_and_in_the_data_report(
    two_epoch_run, phantom_root, tmp_path, caplog
):
    """64 px phantoms at data.image_size=160: 2.5x on a side, said once with the native size."""
    assert PHANTOM_SIZE == 64  # the figures below are 160 / 64
    train_in_process(
        [*phantom_overrides(phantom_root), "data.image_size=160", "debug=fdr"], tmp_path
    )
    said = [r.getMessage() for r in caplog.records if "upsamples" in r.getMessage()]
    assert said == [
        "data.image_size=160 upsamples these images 2.5x (native 64x64 px, median): 6.25x the "
        "pixels to compute and no detail gained; data.image_size=64 matches them."
    ]
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["upsampling"] == {
        "factor": 2.5,
        "image_size": 160,
        "native_side": 64,
        "native_width": 64,
        "native_height": 64,
        "statistic": f"median over {PHANTOM_NORMAL + PHANTOM_TB} images of the shorter side",
    }
    # At its own size (the session's run) there is nothing to report.
    assert json.loads((two_epoch_run / "data_report.json").read_text())["upsampling"] is None


def test_same_seed_same_metrics(two_epoch_run, phantom_root, tmp_path):
    """The CLI run and an in-process run with the same seed: identical metrics, not just close
    (trainer=cpu is deterministic: trainer.deterministic=true)."""
    train_in_process(
        [*phantom_overrides(phantom_root), "trainer.max_epochs=2", "threshold.policy=max_f1"],
        tmp_path,
    )
    first = json.loads((two_epoch_run / "metrics.json").read_text())
    second = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("val/loss", "val/acc", "val/auroc", "val/f1/Tuberculosis", "threshold"):
        assert second[key] == first[key], key


def test_user_errors_are_one_clear_sentence(tmp_path, caplog):
    """run_task (what the CLI runs): the sentence, exit code 1, no traceback (the CLI's own
    output is checked in test_sweep and test_eval_predict_export)."""
    cfg = compose_train(
        ["data=tb_cxr", "data.root=/no/such/folder", "model.net.weights=imagenet"],
        output_dir=tmp_path,
    )
    with pytest.raises(SystemExit) as stop:
        run_task(train, cfg)
    assert stop.value.code == 1
    assert "data.root=/no/such/folder does not exist" in caplog.text
    assert "kaggle.com" in caplog.text and "data=phantom" in caplog.text
    assert "Traceback" not in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_gpu_without_gpu_is_one_clear_sentence(phantom_root, tmp_path):
    cfg = compose_train([*phantom_overrides(phantom_root), "trainer=gpu"], output_dir=tmp_path)
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert str(err.value).startswith(
        "trainer.accelerator=gpu but PyTorch sees no CUDA GPU here; use trainer=cpu"
    )


@pytest.mark.slow  # real images: nlm-tb-128's 500 PNGs scanned, hashed and trained on
def test_real_images_short_run(shared_data, tmp_path):
    train_in_process(
        [
            "data=folder",
            f"data.root={shared_data / 'nlm-tb-128'}",
            "data.image_size=128",
            "data.val_size=0.2",
            "data.batch_size=32",
            "data.num_workers=0",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"data.scan_cache_dir={tmp_path / 'scan'}",
            "model.net.weights=null",
            "trainer=cpu",
            "trainer.max_epochs=1",
            "callbacks.progress_bar=null",
            "callbacks.model_summary=null",
        ],
        tmp_path / "run",
    )
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["val_counts"] == {"Normal": 51, "Tuberculosis": 49}
    assert 0.0 <= metrics["val/auroc"] <= 1.0
