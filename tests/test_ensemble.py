"""`python -m tb_lightning.predict ckpt_path=<k-fold multirun dir>`: one p_tb per image from all
the fold models (mean logit), at the threshold chosen on their out-of-fold predictions.

The session's 3-fold multirun (conftest.kfold_run, through the CLI) is the ensemble of the
default tests, and its sweep summary theirs too; the calibrated CLAHE folds train 3 more (slow).
The ensemble's arithmetic on tiny untrained folds, without training: test_trained_model.py.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import (
    KFOLD_FOLDS,
    KFOLD_TEST_SIZE,
    PROJECT_ROOT,
    TEST_DATA_DIR,
    compose_task,
    eval_config,
    phantom_overrides,
    run_cli,
)
from tb_lightning.core.artefacts import read_data_root
from tb_lightning.core.errors import ConfigError
from tb_lightning.core.tasks import run_task
from tb_lightning.data.split import read_split_csv
from tb_lightning.data.transforms import build_transform, load_image
from tb_lightning.eval import evaluate
from tb_lightning.predict import predict
from tb_lightning.stats.thresholds import choose_threshold
from tb_lightning.trained.checkpoint import load_checkpoint_file

# Only checkpoints loaded here, nothing trained: loads without the discarded init (conftest).
pytestmark = pytest.mark.usefixtures("quick_loads")

FOLDS = KFOLD_FOLDS


def train_folds(phantom_root, sweep, *overrides: str, test_size: int = 8):
    """A FOLDS-fold multirun with a shared test split (8 images), as a user runs it."""
    result = run_cli(
        "tb_lightning.train", "-m", *phantom_overrides(phantom_root), "sweep=kfold",
        f"data.num_folds={FOLDS}", f"data.test_size={test_size}", *overrides,
        f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return sweep


@pytest.fixture
def kfold_dir(kfold_run):
    """The session's 3-fold run: 1 epoch each, a shared 8-image test split."""
    assert KFOLD_TEST_SIZE == 8
    return kfold_run


def logits_of(model, paths, image_size) -> np.ndarray:
    """A member's logits, computed here from the files, independently of predict's code."""
    transform = build_transform(image_size)
    images = torch.stack([transform(load_image(p)) for p in paths])
    with torch.no_grad():
        return model(images).double().numpy()


def predict_rows(ckpt_path, input_path, out, warm: bool = False) -> list[dict[str, str]]:
    """`python -m tb_lightning.predict ckpt_path=... input=...` as a user runs it: its CSV rows,
    each path joined to the data root predictions.json names."""
    result = run_cli(
        "tb_lightning.predict", f"ckpt_path={ckpt_path}", f"input={input_path}",
        f"hydra.run.dir={out}", warm=warm,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    root = read_data_root(out)
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    return [{**r, "path": str(root / r["path"])} for r in rows]


@pytest.fixture(scope="module")
def members(kfold_run):
    """The session's fold models, each loaded from its best.ckpt (once: tests only read them)."""
    return [
        load_checkpoint_file(kfold_run / str(k) / "checkpoints" / "best.ckpt") for k in range(FOLDS)
    ]


def test_predict_with_a_kfold_directory_uses_every_fold_model(
    kfold_dir, members, phantom_root, tmp_path
):
    rows = predict_rows(kfold_dir, phantom_root, tmp_path / "predict", warm=True)
    assert len(rows) == len(list(phantom_root.rglob("*.png")))  # one p_tb per image
    paths = [r["path"] for r in rows]
    mean_logit = np.mean([logits_of(m.model, paths, m.image_size) for m in members], axis=0)
    expected = 1 / (1 + np.exp(-mean_logit))
    np.testing.assert_allclose([float(r["p_tb"]) for r in rows], expected, atol=1e-5)
    # The threshold: each fold's val images scored by the model that did not train on them.
    oof_probs, oof_labels = [], []
    for k, member in enumerate(members):
        _, val = read_split_csv(kfold_dir / str(k) / "split.csv")
        oof_probs.append(1 / (1 + np.exp(-logits_of(member.model, [s.path for s in val], 64))))
        oof_labels += [s.label for s in val]
    threshold = choose_threshold(np.concatenate(oof_probs), np.array(oof_labels), "youden")
    assert float(rows[0]["threshold"]) == pytest.approx(threshold, abs=1e-6)
    sidecar = json.loads((tmp_path / "predict" / "predictions.json").read_text())
    assert sidecar["threshold_source"] == (
        f"chosen on the out-of-fold predictions of the {FOLDS} fold models "
        f"({len(oof_labels)} images) by threshold.policy=youden"
    )


def test_eval_of_a_kfold_directory_scores_the_shared_test_split(
    kfold_dir, members, tmp_path, caplog
):
    """eval's task in-process, as `python -m tb_lightning.eval ckpt_path=<folder>` composes it
    (the ensemble through the command line: the predict test above)."""
    from sklearn import metrics as skm

    out = tmp_path / "eval"
    evaluate(eval_config(kfold_dir, out, "eval.split=test", f"paths.data_dir={TEST_DATA_DIR}"))
    metrics = json.loads((out / "metrics.json").read_text())
    _, test = read_split_sides_test(kfold_dir / "0" / "split.csv")
    paths = [s.path for s in test]
    mean_logit = np.mean([logits_of(m.model, paths, m.image_size) for m in members], axis=0)
    labels = [s.label for s in test]
    assert metrics["test/auroc"] == pytest.approx(
        skm.roc_auc_score(labels, 1 / (1 + np.exp(-mean_logit))), abs=1e-6
    )
    assert "out-of-fold predictions" in metrics["threshold"]["source"]
    report = (out / "report.txt").read_text()
    # The multirun folder relative to the eval run, the members relative to it.
    assert f"Ensemble: the mean logit of {FOLDS} fold models (0/checkpoints/" in report
    assert len(metrics["ensemble_members"]) == FOLDS
    # docs/experiments.md's table: the folds' own test rows and this ensemble row.
    table = subprocess.run(
        [sys.executable, "scripts/fold_table.py", f"plain={kfold_dir}={out}"],
        capture_output=True, text=True, cwd=PROJECT_ROOT, check=True,
    ).stdout  # fmt: skip
    rows = [line for line in table.splitlines() if line.startswith("| plain |")]
    assert len(rows) == FOLDS + 2  # each fold, their mean ± std, the ensemble
    assert f"| **{FOLDS}-fold ensemble** | - | {metrics['test/auroc']:.3f} [" in rows[-1]
    # Its val split would be scored by models that trained on it: refused, exit code 1 (the
    # entry point's run_task, in-process: a second eval start-up would test nothing more).
    cfg = eval_config(kfold_dir, tmp_path / "v", f"paths.data_dir={TEST_DATA_DIR}")
    with pytest.raises(SystemExit) as refused:
        run_task(evaluate, cfg)
    assert refused.value.code == 1
    assert "eval.split=val of the ensemble" in caplog.text
    assert not (tmp_path / "v" / "metrics.json").exists()


def test_a_screening_policy_on_the_command_line_rechooses_the_ensembles_threshold(
    kfold_dir, members, tmp_path, caplog
):
    """threshold.policy=sensitivity on eval's (and predict's) command line: the ensemble's
    threshold chosen on the same out-of-fold predictions by that policy, said so in the report;
    a single checkpoint, whose threshold was chosen in training, is refused in one sentence."""
    from tb_lightning.trained.load import load_trained_model

    oof_probs, oof_labels = [], []
    for k, member in enumerate(members):
        _, val = read_split_csv(kfold_dir / str(k) / "split.csv")
        oof_probs.append(1 / (1 + np.exp(-logits_of(member.model, [s.path for s in val], 64))))
        oof_labels += [s.label for s in val]
    expected = choose_threshold(
        np.concatenate(oof_probs), np.array(oof_labels), "sensitivity", 0.75
    )
    policy = ["threshold.policy=sensitivity", "threshold.target=0.75"]
    out = tmp_path / "eval"
    evaluate(eval_config(kfold_dir, out, "eval.split=test", "eval.report_images=false", *policy))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["threshold"]["value"] == pytest.approx(expected, abs=1e-6)
    assert metrics["threshold"]["source"].endswith(
        "by threshold.policy=sensitivity, target 0.75 (given on the command line; the members "
        "were trained with threshold.policy=youden)"
    )
    # scripts/paired_test.py (docs/experiments.md's comparison table) reads the eval folder:
    # its AUROC is eval's, its oracle specificity at sensitivity >= 0.90 scikit-learn's ROC's.
    from sklearn.metrics import roc_curve

    table = subprocess.run(
        [sys.executable, "scripts/paired_test.py", f"a={out}", f"b={out}"],
        capture_output=True, text=True, cwd=PROJECT_ROOT, check=True,
    ).stdout  # fmt: skip
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in table.splitlines()[2:]}
    assert rows["a"][1].startswith(f"{metrics['test/auroc']:.3f} [")
    probs = [float(r["p_tb"]) for r in csv.DictReader((out / "predictions.csv").open())]
    labels = [int(r["label"]) for r in csv.DictReader((out / "predictions.csv").open())]
    fpr, tpr, _ = roc_curve(labels, probs)
    assert float(rows["a"][3]) == pytest.approx(max(1 - fpr[tpr >= 0.9]), abs=1e-3)
    assert rows["b"][4].startswith("+0.000 [+0.000, +0.000]")
    # predict, export and eval load through one function: the same threshold.
    loaded = load_trained_model(kfold_dir, policy="sensitivity", target=0.75)
    assert loaded.stored_threshold["value"] == metrics["threshold"]["value"]

    with pytest.raises(ConfigError, match="is one checkpoint, whose threshold was chosen"):
        load_trained_model(kfold_dir / "0" / "checkpoints" / "best.ckpt", policy="sensitivity")
    cfg = eval_config(kfold_dir, tmp_path / "both", "threshold.value=0.4", *policy)
    with pytest.raises(SystemExit):
        run_task(check_and_evaluate, cfg)
    assert "both set the operating threshold: keep one" in caplog.text


def check_and_evaluate(cfg) -> None:
    """What the entry point does: the config checks, then the evaluation."""
    from tb_lightning.config.checks import check_eval_values

    check_eval_values(cfg)
    evaluate(cfg)


def test_the_kfold_multirun_summarises_its_folds_as_one_configuration(kfold_dir):
    """The multirun's own sweep_summary files (sweep/callback.py, at the end of the CLI's
    multirun): three ok folds, nothing ranked, one configuration with its pooled out-of-fold
    AUROC recomputed here from the jobs' predictions.csv."""
    from sklearn.metrics import roc_auc_score

    rows = list(csv.DictReader((kfold_dir / "sweep_summary.csv").open()))
    assert [(r["job"], r["status"], r["verdict"]) for r in rows] == [
        (str(k), "ok", "") for k in range(FOLDS)
    ]
    for row in rows:
        stored = json.loads((kfold_dir / row["run_dir"] / "metrics.json").read_text())
        assert float(row["val/auroc"]) == pytest.approx(stored["val/auroc"], abs=1e-4)
    (configuration,) = csv.DictReader((kfold_dir / "sweep_configurations.csv").open())
    assert configuration["n_runs"] == str(FOLDS)
    labels, logits = [], []
    for k in range(FOLDS):
        for r in csv.DictReader((kfold_dir / str(k) / "predictions.csv").open()):
            if r["split"] == "val":
                labels.append(int(r["label"]))
                logits.append(float(r["logit"]))
    assert len(labels) == 36 - KFOLD_TEST_SIZE  # every image but the test split, once
    assert float(configuration["oof_auroc"]) == pytest.approx(
        roc_auc_score(labels, logits), abs=1e-4
    )
    markdown = (kfold_dir / "sweep_summary.md").read_text()
    assert f"One configuration, {FOLDS} runs (folds 0,1,2): nothing is ranked." in markdown


def read_split_sides_test(path):
    from tb_lightning.data.split import read_split_sides

    sides = read_split_sides(path)
    return sides["val"], sides["test"]


def test_a_folder_that_is_not_a_finished_multirun_is_refused(tmp_path, phantom_root, caplog):
    """predict's task as its entry point runs it (run_task, in-process): exit code 1 and the
    sentence."""
    (tmp_path / "runs" / "0").mkdir(parents=True)
    cfg = compose_task(
        "predict",
        [
            f"ckpt_path={tmp_path / 'runs'}",
            f"input={phantom_root}",
            f"paths.output_dir={tmp_path / 'out'}",
        ],
    )
    with pytest.raises(SystemExit) as refused:
        run_task(predict, cfg)
    assert refused.value.code == 1
    assert (
        "is a folder but not a finished multirun: it has no best.ckpt or last.ckpt in "
        f"{(tmp_path / 'runs' / '0').resolve()}/checkpoints"
    ) in caplog.text


@pytest.fixture(scope="module")
def calibrated_clahe_kfold_dir(phantom_root, tmp_path_factory):
    """Folds trained with CLAHE and calibration=temperature (the ensemble refits T out of fold),
    keeping only last.ckpt as experiment=nlm_scratch does (callbacks.model_checkpoint=null)."""
    return train_folds(
        phantom_root, tmp_path_factory.mktemp("kfold_clahe") / "sweep", "trainer.max_epochs=3",
        "data.preprocess=clahe", "data.clahe.tile_grid=4", "calibration=temperature",
        "callbacks.model_checkpoint=null",
        # 6 test images leave 30 to the folds: 10 val images each, calibration's minimum.
        test_size=6,
    )  # fmt: skip


def raw_logits_of(loaded, paths) -> np.ndarray:
    """A member's logits before any temperature: its network on the CLAHE'd images."""
    transform = build_transform(loaded.image_size, loaded.preprocess)
    images = torch.stack([transform(load_image(p)) for p in paths])
    with torch.no_grad():
        return loaded.model.net(images).double().numpy()


@pytest.mark.slow
def test_a_calibrated_ensemble_fits_its_temperature_out_of_fold_and_exports_as_one_file(
    calibrated_clahe_kfold_dir, phantom_root, tmp_path
):
    import onnxruntime

    from tb_lightning.stats.calibration import fit_temperature

    folder = calibrated_clahe_kfold_dir
    members = [
        load_checkpoint_file(folder / str(k) / "checkpoints" / "last.ckpt") for k in range(FOLDS)
    ]
    assert all(m.calibration and m.preprocess["name"] == "clahe" for m in members)
    # The temperature, computed here: one T on the pooled out-of-fold raw logits.
    oof_logits, oof_labels = [], []
    for k, member in enumerate(members):
        _, val = read_split_csv(folder / str(k) / "split.csv")
        oof_logits.append(raw_logits_of(member, [s.path for s in val]))
        oof_labels += [s.label for s in val]
    temperature = fit_temperature(np.concatenate(oof_logits), np.array(oof_labels))
    oof_probs = 1 / (1 + np.exp(-np.concatenate(oof_logits) / temperature))
    threshold = choose_threshold(oof_probs, np.array(oof_labels), "youden")

    rows = predict_rows(folder, phantom_root, tmp_path / "predict")
    paths = [r["path"] for r in rows]
    mean_raw = np.mean([raw_logits_of(m, paths) for m in members], axis=0)
    expected = 1 / (1 + np.exp(-mean_raw / temperature))
    np.testing.assert_allclose([float(r["p_tb"]) for r in rows], expected, atol=1e-5)
    assert float(rows[0]["threshold"]) == pytest.approx(threshold, abs=1e-6)

    # export: the whole ensemble in one ONNX file, with the out-of-fold threshold and T.
    exported = tmp_path / "export"
    result = run_cli("tb_lightning.export", f"ckpt_path={folder}", f"hydra.run.dir={exported}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sidecar = json.loads((exported / "model.json").read_text())
    assert sorted(p.name for p in exported.iterdir() if p.suffix != ".log") == [
        ".hydra", "config_resolved.yaml", "model.json", "model.onnx", "provenance.json"
    ]  # fmt: skip
    assert sidecar["ensemble"]["members"] == [  # relative to the multirun folder
        f"{k}/checkpoints/last.ckpt" for k in range(FOLDS)
    ]
    assert (exported / sidecar["checkpoint"]).resolve() == folder.resolve()
    assert sidecar["threshold"] == pytest.approx(threshold, abs=1e-6)
    assert sidecar["calibration"]["temperature"] == pytest.approx(temperature, rel=1e-6)
    assert "out-of-fold" in sidecar["threshold_source"]
    transform = build_transform(64, members[0].preprocess)
    images = torch.stack([transform(load_image(p)) for p in paths[:8]])
    session = onnxruntime.InferenceSession(str(exported / "model.onnx"))
    np.testing.assert_allclose(
        session.run(["p_tb"], {"image": images.numpy()})[0], expected[:8], atol=1e-5
    )


@pytest.mark.slow
def test_members_trained_differently_are_refused(
    kfold_dir, calibrated_clahe_kfold_dir, phantom_root, tmp_path
):
    import shutil

    mixed = tmp_path / "mixed"
    shutil.copytree(kfold_dir / "0", mixed / "0")
    shutil.copytree(calibrated_clahe_kfold_dir / "1", mixed / "1")
    result = run_cli(
        "tb_lightning.predict", f"ckpt_path={mixed}", f"input={phantom_root}",
        f"hydra.run.dir={tmp_path / 'out'}",
    )  # fmt: skip
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "data.preprocess ['clahe (clip limit 2, 4x4 tiles)', 'none']" in output
    assert "an ensemble needs members trained alike" in output
