"""Portable artefacts and clean numbers: nothing a run writes holds an absolute path of this
machine (paths relative to the run directory, image paths relative to the data root named once),
an export works from another folder, metrics.json has one key per figure, and thresholds and
probabilities are written at 6 decimals with the threshold's source once per file
(core/artefacts.py)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from hydra import compose, initialize_config_dir
from sklearn import metrics as skm

from conftest import TEST_DATA_DIR, eval_config, phantom_overrides, run_cli
from tb_lightning.config import CONF_DIR, PROJECT_ROOT
from tb_lightning.core.artefacts import (
    probability_text,
    read_data_root,
    relative_path,
    threshold_text,
)
from tb_lightning.data.transforms import build_transform, load_image
from tb_lightning.eval import evaluate
from tb_lightning.export import export
from tb_lightning.inference.deploy import TOLERANCE, without_debug_info
from tb_lightning.predict import predict
from tb_lightning.stats.thresholds import between, choose_threshold
from tb_lightning.sweep.summary import summarise
from test_sweep import fake_job

# What a run directory may hold with this machine's paths: the command line and the composed
# config as given (.hydra/, multirun.yaml, config_resolved.yaml, provenance.json's command and
# overrides), the logs, and Lightning's checkpoints (their ModelCheckpoint state, which a resume
# reads).
EXEMPT_NAMES = {"config_resolved.yaml", "multirun.yaml", ".run.lock"}
EXEMPT_SUFFIXES = {".log", ".ckpt"}
# Files that name the data root (once): the run's record of its images and the sidecar of
# predictions.csv.
NAME_THE_DATA_ROOT = {"split.csv", "data_report.json", "predictions.json"}
P_TB = re.compile(r"^[01]\.\d{6}$")


def compose_task(name: str, overrides: list[str]):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=overrides)


def checked_files(folder: Path) -> list[Path]:
    """Every file under `folder` that must hold no path of this machine."""
    return [
        path
        for path in folder.rglob("*")
        if path.is_file()
        and ".hydra" not in path.relative_to(folder).parts
        and path.name not in EXEMPT_NAMES
        and path.suffix not in EXEMPT_SUFFIXES
    ]


def checked_bytes(path: Path, data_root: Path) -> bytes:
    """The file's content as checked: provenance.json without its command line, predictions.json
    without the data_root it names."""
    if path.name == "provenance.json":
        record = json.loads(path.read_text())
        record.pop("command", None)
        record.pop("overrides", None)
        return json.dumps(record).encode()
    if path.name == "predictions.json":
        record = json.loads(path.read_text())
        assert Path(record.pop("data_root")).is_relative_to(data_root)
        return json.dumps(record).encode()
    return path.read_bytes()


def machine_paths(*folders: Path) -> set[str]:
    """This machine's paths as they would be written: the run folders, the test data folder, the
    checkout and the home folder (with a trailing slash: /root must not match /tmp/x-root)."""
    paths = {str(PROJECT_ROOT), str(TEST_DATA_DIR), str(Path.home()) + os.sep}
    for folder in folders:
        paths |= {str(folder), str(folder.resolve())}
    return paths


def assert_portable(folder: Path, forbidden: set[str], data_root: Path) -> list[Path]:
    """No file under `folder` holds a forbidden path; the data root only where it is named."""
    files = checked_files(folder)
    assert files, folder
    for path in files:
        content = checked_bytes(path, data_root)
        for text in forbidden:
            assert text.encode() not in content, f"{path} holds {text}"
        if path.name not in NAME_THE_DATA_ROOT:
            assert str(data_root).encode() not in content, f"{path} holds {data_root}"
    return files


@pytest.fixture(scope="module")
def artefacts(trained_run, phantom_root, tmp_path_factory) -> dict[str, Path]:
    """eval, predict and export of trained_run, and a 2-job sweep, each in its folder."""
    base = tmp_path_factory.mktemp("portable")
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    folders = {name: base / name for name in ("eval", "predict", "export", "sweep")}
    evaluate(eval_config(ckpt, folders["eval"], f"paths.data_dir={TEST_DATA_DIR}"))
    predict(
        compose_task(
            "predict",
            [
                f"ckpt_path={ckpt}",
                f"input={phantom_root / 'Tuberculosis'}",
                "trainer.accelerator=cpu",
                f"paths.output_dir={folders['predict']}",
                f"paths.data_dir={TEST_DATA_DIR}",
            ],
        )
    )
    export(
        compose_task(
            "export",
            [
                f"ckpt_path={ckpt}",
                "format=onnx",
                f"paths.output_dir={folders['export']}",
                f"paths.data_dir={TEST_DATA_DIR}",
            ],
        )
    )
    result = run_cli(
        "tb_lightning.train",
        "-m",
        *phantom_overrides(phantom_root),
        "trainer.max_epochs=1",
        "model.optimizer.lr=1e-3,3e-4",
        f"hydra.sweep.dir={folders['sweep']}",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"train": trained_run, **folders, "base": base}


@pytest.mark.slow
def test_no_path_of_this_machine_in_what_runs_write(artefacts, phantom_root):
    forbidden = machine_paths(
        artefacts["base"], artefacts["train"], phantom_root.parent / "outputs"
    )
    files = []
    for name in ("train", "eval", "predict", "export", "sweep"):
        files += assert_portable(artefacts[name], forbidden, phantom_root)
    names = {p.name for p in files}
    assert {"report.txt", "metrics.json", "predictions.csv", "predictions.json"} <= names
    assert {"model.json", "model.onnx", "sweep_summary.csv", "sweep_summary.md"} <= names
    assert any(p.name.startswith("events.out.tfevents") for p in files)  # the Text tab too
    # Relative paths that resolve from where they are written.
    train, sweep = artefacts["train"], artefacts["sweep"]
    assert (train / "report.txt").read_text().startswith("Checkpoint: checkpoints/best.ckpt\n")
    evaluated = json.loads((artefacts["eval"] / "metrics.json").read_text())
    ckpt = (train / "checkpoints" / "best.ckpt").resolve()
    assert (artefacts["eval"] / evaluated["checkpoint"]).resolve() == ckpt
    model = json.loads((artefacts["export"] / "model.json").read_text())
    assert (artefacts["export"] / model["checkpoint"]).resolve() == ckpt
    assert all(not Path(p).is_absolute() for p in model["check"]["images"])
    rows = list(csv.DictReader((sweep / "sweep_summary.csv").open()))
    assert [r["run_dir"] for r in rows] == ["0", "1"]
    assert all((sweep / r["run_dir"] / "metrics.json").is_file() for r in rows)
    assert "| 0 |" in (sweep / "sweep_summary.md").read_text()
    for folder in (train, artefacts["eval"], artefacts["predict"]):
        root = read_data_root(folder)
        for row in csv.DictReader((folder / "predictions.csv").open()):
            assert not Path(row["path"]).is_absolute()
            assert (root / row["path"]).is_file()


@pytest.mark.slow
def test_an_export_moved_to_another_folder_still_predicts(artefacts, tmp_path):
    """model.json names its model file and the preprocessing, nothing of where it was made: the
    folder moved elsewhere gives predict's p_tb and calls."""
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(artefacts["export"], moved)
    sidecar = json.loads((moved / "model.json").read_text())
    session = onnxruntime.InferenceSession(str(moved / sidecar["model_file"]))
    folder = artefacts["predict"]
    rows = list(csv.DictReader((folder / "predictions.csv").open()))
    paths = [read_data_root(folder) / r["path"] for r in rows]
    preprocessing = sidecar["preprocessing"]
    transform = build_transform(preprocessing["image_size"], preprocessing["preprocess"])
    images = np.stack([transform(load_image(str(p))).numpy() for p in paths])
    p_tb = session.run([sidecar["output"]["name"]], {sidecar["input"]["name"]: images})[0]
    threshold = sidecar["threshold"]
    # onnxruntime and PyTorch round float32 operators differently (export's own check allows
    # TOLERANCE): predict's 6-decimal p_tb may differ from this one in its last digit.
    for row, p in zip(rows, p_tb, strict=True):
        assert abs(float(row["p_tb"]) - float(p)) <= TOLERANCE, (row["p_tb"], p)
        if abs(float(p) - threshold) > TOLERANCE:
            assert int(row["predicted_label"]) == int(p >= threshold)
        # The printed p_tb never contradicts the printed call.
        assert int(row["predicted_label"]) == int(float(row["p_tb"]) >= threshold)


@pytest.mark.slow
def test_metrics_json_has_one_key_per_figure(artefacts):
    for folder in (artefacts["train"], artefacts["eval"]):
        metrics = json.loads((folder / "metrics.json").read_text())
        assert "val/acc" in metrics and "val/accuracy" not in metrics
        assert not [k for k in metrics if k.endswith("/accuracy")]
        # The figure with its interval stays under <split>.overall.
        assert metrics["val/acc"] == metrics["val"]["overall"]["accuracy"]


@pytest.mark.slow
def test_predictions_state_the_threshold_once_at_six_decimals(artefacts):
    for name in ("train", "eval", "predict"):
        folder = artefacts[name]
        sidecar = json.loads((folder / "predictions.json").read_text())
        threshold = sidecar["threshold"]
        assert threshold_text(threshold) == f"{threshold:.6f}"  # exactly, at 6 decimals
        assert sidecar["threshold_source"].startswith("chosen on the validation split")
        rows = list(csv.DictReader((folder / "predictions.csv").open()))
        assert "threshold_source" not in rows[0]
        for row in rows:
            assert P_TB.match(row["p_tb"]), row["p_tb"]
            assert row.get("threshold", f"{threshold:.6f}") == f"{threshold:.6f}"
            # The written numbers give the written call.
            assert int(row["predicted_label"]) == int(float(row["p_tb"]) >= threshold)
    metrics = json.loads((artefacts["train"] / "metrics.json").read_text())
    assert metrics["threshold"]["value"] == written_threshold(artefacts["train"])
    report = (artefacts["train"] / "report.txt").read_text()
    assert f"Operating threshold: p_tb >= {metrics['threshold']['value']:.6f} (" in report


def written_threshold(folder: Path) -> float:
    """The operating threshold predictions.json names."""
    return json.loads((folder / "predictions.json").read_text())["threshold"]


@pytest.mark.slow
def test_figures_recomputed_from_the_written_predictions_match_the_report(artefacts):
    """train's predictions.csv (logits exact, threshold exact) gives metrics.json's figures."""
    folder = artefacts["train"]
    metrics = json.loads((folder / "metrics.json").read_text())
    threshold = written_threshold(folder)
    rows = [r for r in csv.DictReader((folder / "predictions.csv").open()) if r["split"] == "val"]
    labels = np.array([int(r["label"]) for r in rows])
    logits = np.array([float(r["logit"]) for r in rows], dtype=np.float32)
    # As the model computes them: a float32 sigmoid.
    probs = torch.sigmoid(torch.from_numpy(logits)).double().numpy()
    calls = np.array([int(r["predicted_label"]) for r in rows])
    assert skm.roc_auc_score(labels, probs) == pytest.approx(metrics["val/auroc"], abs=1e-12)
    assert np.array_equal(calls, (probs >= threshold).astype(int))
    assert skm.recall_score(labels, calls) == pytest.approx(metrics["val/sensitivity"], abs=1e-12)
    assert skm.accuracy_score(labels, calls) == pytest.approx(metrics["val/acc"], abs=1e-12)


def test_thresholds_are_chosen_on_the_six_decimal_grid():
    rng = np.random.default_rng(0)
    probs = rng.random(200)
    labels = (rng.random(200) < probs).astype(int)
    for policy in ("youden", "max_f1", "sensitivity"):
        value = choose_threshold(probs, labels, policy, 0.9)
        assert threshold_text(value) == f"{value:.6f}"
        # The same calls on the validation images as the unrounded halfway point.
        order = np.sort(np.unique(probs))
        high = order[order >= value].min()
        low = order[order < value].max()
        assert (probs >= value).sum() == (probs >= (low + high) / 2).sum()
    # Two probabilities closer than 1e-6: more decimals, still strictly between them.
    assert between(0.50485201, 0.50485202) == 0.504852015
    assert threshold_text(0.504852015) == "0.504852015"
    assert threshold_text(0.39453884959220886) == "0.39453884959220886"  # never rounded


def test_probabilities_round_toward_their_call():
    assert probability_text(0.123456789) == "0.123457"
    # Within 5e-7 below the threshold: rounding up would cross it, so it rounds down.
    assert probability_text(0.5048519, 0.504852) == "0.504851"
    assert probability_text(0.5048526, 0.504852) == "0.504853"
    # A threshold off the grid (set by hand): just above it stays above it.
    assert probability_text(0.50485235, 0.5048523) == "0.504853"
    assert probability_text(0.50485225, 0.5048523) == "0.504852"


def test_relative_paths_never_spell_out_another_tree():
    assert relative_path("/a/out/train/r/checkpoints/best.ckpt", "/a/out/eval/e") == (
        "../../train/r/checkpoints/best.ckpt"
    )
    assert relative_path("/home/u/r/checkpoints/best.ckpt", "/work/out") == (
        "r/checkpoints/best.ckpt"
    )


def test_sweep_summary_pairs_images_by_their_full_path(tmp_path):
    """Relative paths under two data roots are other images: the jobs are not compared."""
    rng = np.random.default_rng(0)
    labels = np.array([0] * 20 + [1] * 20)
    paths = [f"Normal/{i}.png" for i in range(40)]
    for job, root in enumerate(("/data/a", "/data/b")):
        logits = (2 * labels - 1 + rng.normal(size=40)).astype(np.float32)
        fake_job(
            tmp_path, job, [f"model.optimizer.lr={job + 1}e-3"],
            {"val/auroc": 0.8 + job / 10, "pos_weight": 1.0}, None, (paths, labels, logits),
        )  # fmt: skip
        (tmp_path / str(job) / "predictions.json").write_text(json.dumps({"data_root": root}))
    summary = summarise(tmp_path)
    other = [c for c in summary.configurations if c is not summary.top][0]
    assert other.difference is None and "other validation images" in other.note
    # The same root: the same images, compared.
    (tmp_path / "1" / "predictions.json").write_text(json.dumps({"data_root": "/data/a"}))
    summary = summarise(tmp_path)
    other = [c for c in summary.configurations if c is not summary.top][0]
    assert other.difference is not None and other.verdict in ("tied", "worse", "better")


@pytest.mark.filterwarnings("ignore:`torch.jit.\\w+` is deprecated:FutureWarning")
def test_a_torchscript_file_keeps_no_source_paths(tmp_path):
    """TorchScript's debug_pkl entries hold the absolute paths of the traced code; the export
    leaves them out, and the file still loads and computes the same."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.ReLU(), torch.nn.Flatten()).eval()
    images = torch.randn(2, 3, 8, 8)
    traced = torch.jit.trace(net, images)
    path = tmp_path / "model.pt"
    torch.jit.save(traced, path)
    with zipfile.ZipFile(path) as archive:
        assert any(name.endswith(".debug_pkl") for name in archive.namelist())
    path.write_bytes(without_debug_info(path.read_bytes()))
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        assert not any(name.endswith(".debug_pkl") for name in names)
        assert not any(str(PROJECT_ROOT).encode() in archive.read(name) for name in names)
    torch.testing.assert_close(torch.jit.load(str(path))(images), net(images))
