"""`python -m tb_lightning.eval|predict|export` on a checkpoint trained here on phantoms."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from sklearn import metrics as skm
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import PHANTOM_SIZE, eval_config, run_cli
from data_builders import CLAHE, image_set, threshold_choice, write_bad, write_checkpoint
from tb_lightning.config import CONF_DIR
from tb_lightning.config.checks import check_eval_config
from tb_lightning.core.artefacts import read_data_root, threshold_text
from tb_lightning.core.errors import ConfigError, DataError, UserError
from tb_lightning.data.sources import Sample
from tb_lightning.data.split import read_split_csv, read_split_sides, write_split_csv
from tb_lightning.data.transforms import build_transform, load_image
from tb_lightning.eval import evaluate
from tb_lightning.evaluation.evaluate import evaluate_samples
from tb_lightning.inference.deploy import export_model
from tb_lightning.inference.predict_files import collect_inputs, run_prediction
from tb_lightning.models.torch_file import load_checkpoint
from tb_lightning.trained.checkpoint import load_checkpoint_file
from test_integrity import corrupt_png, png_with_header

# Only checkpoints loaded here, nothing trained: loads without the discarded init (conftest).
pytestmark = pytest.mark.usefixtures("quick_loads")

FIGURES = {"confusion_matrix", "roc_curve", "pr_curve", "p_tb_distribution", "calibration_curve"}


def image_paths(folder: Path, rows: list[dict]) -> list[str]:
    """The images of predictions.csv rows: their paths joined to the data root that
    predictions.json names."""
    root = read_data_root(folder)
    assert root is not None and root.is_absolute()
    return [str(root / r["path"]) for r in rows]


def assert_ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture
def eval_run(evaluated_run) -> tuple[Path, str]:
    """`python -m tb_lightning.eval` of the session's best.ckpt on its val split, as a user
    runs it (conftest.evaluated_run): its run directory and its output."""
    return evaluated_run


@pytest.fixture(scope="module")
def loaded(trained_run):
    return load_checkpoint_file(trained_run / "checkpoints" / "best.ckpt")


def model_probs(loaded, paths) -> np.ndarray:
    """TB probabilities computed here, independently of the eval/predict code."""
    transform = build_transform(loaded.image_size)
    images = torch.stack([transform(load_image(p)) for p in paths])
    with torch.no_grad():
        return torch.sigmoid(loaded.model(images)).numpy().astype(np.float64)


def test_training_stores_the_operating_threshold(trained_run, loaded):
    checkpoint = load_checkpoint(trained_run / "checkpoints" / "best.ckpt")
    stored = checkpoint["operating_threshold"]
    assert stored["policy"] == "max_f1" and stored["val_images"] == 12
    # It is the max-F1 threshold over the val predictions, checked by brute force.
    _, val = read_split_csv(trained_run / "split.csv")
    probs, target = model_probs(loaded, [s.path for s in val]), [s.label for s in val]
    f1 = [skm.f1_score(target, probs >= t) for t in probs]
    assert skm.f1_score(target, probs >= stored["value"]) == pytest.approx(max(f1))
    recorded = json.loads((trained_run / "metrics.json").read_text())["threshold"]
    assert {k: v for k, v in recorded.items() if k != "source"} == stored
    assert (
        recorded["source"]
        == "chosen on the validation split (12 images) by threshold.policy=max_f1"
    )
    assert "operating_threshold" not in load_checkpoint(trained_run / "checkpoints" / "last.ckpt")


def val_block(report: str) -> str:
    """The report's validation-split block: from its title to the next blank line or the end."""
    start = report.index("== Validation split")
    end = report.find("\n\n", start)
    return report[start:] if end < 0 else report[start:end]


def test_train_report_and_eval_print_the_same_numbers(trained_run, eval_run):
    """One threshold story: eval of best.ckpt on its val split reproduces train's report."""
    tmp_path, _ = eval_run
    trained = json.loads((trained_run / "metrics.json").read_text())
    evaluated = json.loads((tmp_path / "metrics.json").read_text())
    shared = [k for k in trained if k == "val" or k.startswith("val/")]
    assert len(shared) > 15 and "val/sensitivity" in shared and "val" in shared
    for key in shared:
        assert evaluated[key] == trained[key], key
    assert evaluated["threshold"]["value"] == trained["threshold"]["value"]
    assert evaluated["threshold"]["source"] == trained["threshold"]["source"]
    train_report = (trained_run / "report.txt").read_text()
    eval_report = (tmp_path / "report.txt").read_text()
    assert val_block(eval_report) == val_block(train_report)
    # Every threshold-dependent figure names its threshold; the val figures carry the warning.
    value = threshold_text(trained["threshold"]["value"])
    assert f"Operating threshold: p_tb >= {value} (chosen on the validation split" in eval_report
    assert val_block(train_report).count(f"p_tb >= {value}") >= 4
    assert "optimistic" in val_block(train_report)
    assert "SYNTHETIC DATA" in train_report and "SYNTHETIC DATA" in eval_report


def test_eval_cli_on_the_val_split(trained_run, loaded, eval_run):
    tmp_path, output = eval_run
    for text in (
        "Validation loss:",
        "for class Tuberculosis:",
        "Sensitivity",
        "Specificity",
        "PPV",
        "NPV",
        "Average precision",
        "WHO screening minimum",
        "95% CI",
    ):
        assert text in output
    assert {"metrics.json", "report.txt", "predictions.csv", "figures", "tensorboard"} <= {
        p.name for p in tmp_path.iterdir()
    }
    assert {p.stem for p in (tmp_path / "figures").glob("*.png")} == FIGURES

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    stored = load_checkpoint(trained_run / "checkpoints" / "best.ckpt")["operating_threshold"]
    threshold = metrics["threshold"]["value"]
    assert threshold == stored["value"] and "max_f1" in metrics["threshold"]["source"]
    # Every number against scikit-learn on probabilities computed independently.
    _, val = read_split_csv(trained_run / "split.csv")
    target = np.array([s.label for s in val])
    probs = model_probs(loaded, [s.path for s in val])
    preds = (probs >= threshold).astype(int)
    overall = metrics["val"]["overall"]
    assert overall["images"] == 12 and overall["counts"] == {"Normal": 8, "Tuberculosis": 4}
    assert overall["auroc"] == pytest.approx(skm.roc_auc_score(target, probs), abs=1e-6)
    assert overall["average_precision"] == pytest.approx(
        skm.average_precision_score(target, probs), abs=1e-6
    )
    assert overall["sensitivity"] == pytest.approx(skm.recall_score(target, preds))
    assert overall["specificity"] == pytest.approx(skm.recall_score(target, preds, pos_label=0))
    assert overall["accuracy"] == pytest.approx(skm.accuracy_score(target, preds))
    assert overall["confusion_matrix"] == skm.confusion_matrix(target, preds).tolist()
    assert metrics["val/confusion_matrix"] == overall["confusion_matrix"]
    assert metrics["val/f1/Tuberculosis"] == pytest.approx(skm.f1_score(target, preds))
    for name in ("auroc", "sensitivity", "specificity", "accuracy"):
        low, high = overall["ci"][name]
        assert low <= overall[name] <= high, name
    assert metrics["bootstrap"]["resamples"] == 2000
    assert set(overall["who_screening_minimum"]) >= {"met", "met_by_lower_ci"}

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {f"eval/{name}" for name in FIGURES} <= set(events.Tags()["images"])
    assert "val/auroc" in events.Tags()["scalars"]
    # The threshold and its source are said once, in predictions.json, not on every row.
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert "threshold_source" not in rows[0]
    sidecar = json.loads((tmp_path / "predictions.json").read_text())
    assert sidecar["threshold_source"] == metrics["threshold"]["source"]
    assert sidecar["threshold"] == metrics["threshold"]["value"]


def test_eval_per_source_with_threshold_override(loaded, phantom_root, tmp_path):
    """NLM-named files (CHNCXR_/MCUCXR_) get per-source metrics; threshold.value wins."""
    data = tmp_path / "nlm"
    for label, folder in enumerate(("Normal", "Tuberculosis")):
        (data / folder).mkdir(parents=True)
        for i, src in enumerate(sorted((phantom_root / folder).glob("*.png"))[:6]):
            prefix = "CHNCXR" if i % 2 else "MCUCXR"
            shutil.copy(src, data / folder / f"{prefix}_{i:04d}_{label}.png")
    samples = [
        Sample(str(p), label, p.stem, "folder")
        for label, folder in enumerate(("Normal", "Tuberculosis"))
        for p in sorted((data / folder).glob("*.png"))
    ]
    threshold, source = loaded.threshold_for(0.3)
    assert (threshold, source) == (0.3, "threshold.value (command line)")
    metrics, report = evaluate_samples(
        loaded, samples, threshold, source, tmp_path / "out", "all", n_bootstrap=200
    )
    assert set(metrics["all"]["per_source"]) == {"montgomery", "shenzhen"}
    assert metrics["all"]["per_source"]["shenzhen"]["images"] == 6
    assert "Per source (sensitivity and specificity at p_tb >= 0.300000)" in report
    assert "shenzhen" in report
    rows = list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))
    assert {r["source"] for r in rows} == {"montgomery", "shenzhen"}
    assert all(r["predicted_label"] == str(int(float(r["p_tb"]) >= 0.3)) for r in rows)


def test_eval_user_errors(loaded):
    cfg = compose_config("eval", ["ckpt_path=x.ckpt", "eval.split=all"])
    with pytest.raises(ConfigError, match="eval.split=all needs a data source"):
        check_eval_config(cfg)
    cfg = compose_config("eval", ["ckpt_path=x.ckpt", "threshold.value=1.5"])
    with pytest.raises(ConfigError, match="threshold.value=1.5 must be in"):
        check_eval_config(cfg)
    with pytest.raises(UserError, match="does not exist; check ckpt_path"):
        load_checkpoint_file("/no/such.ckpt")


def test_predict_cli_with_saliency_skips_unreadable_files(
    trained_run, loaded, phantom_root, tmp_path
):
    images = tmp_path / "in"
    images.mkdir()
    good = sorted((phantom_root / "Tuberculosis").glob("*.png"))[:2]
    good += sorted((phantom_root / "Normal").glob("*.png"))[:1]
    for path in good:
        shutil.copy(path, images / path.name)
    (images / "broken.png").write_bytes(b"not an image")
    (images / "truncated.png").write_bytes(good[0].read_bytes()[:200])
    corrupt_png(images / "corrupt.png")  # torchvision's PNG decoder crashes on this one
    (images / "notes.txt").write_text("not an image, ignored")
    out = tmp_path / "run"
    result = run_cli(
        "tb_lightning.predict",
        f"ckpt_path={trained_run / 'checkpoints' / 'best.ckpt'}",
        f"input={images}",
        "saliency=true",
        "batch_size=2",
        f"hydra.run.dir={out}",
        warm=True,
    )
    assert_ok(result)
    output = result.stdout + result.stderr
    assert "Skipped 3 bad file(s)" in output and "broken.png" in output
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [Path(r["path"]).name for r in rows] == sorted(p.name for p in good)
    expected = model_probs(loaded, image_paths(out, rows))
    stored = load_checkpoint(trained_run / "checkpoints" / "best.ckpt")["operating_threshold"]
    sidecar = json.loads((out / "predictions.json").read_text())
    assert sidecar["threshold_source"].startswith("chosen on the validation split")
    for row, p in zip(rows, expected, strict=True):
        assert float(row["p_tb"]) == pytest.approx(p, abs=1e-5)
        assert float(row["threshold"]) == pytest.approx(stored["value"])
        assert row["predicted_label"] == str(int(p >= stored["value"]))
        assert row["predicted_class"] in ("Normal", "Tuberculosis")
        # The image and its overlay side by side, each at least 512 px, with a colour bar.
        figure = Image.open(out / row["saliency"])  # relative to the run directory
        assert figure.size[0] >= 2 * 512 and figure.size[1] >= 512
        assert row["saliency_flag"] in ("", "empty", "border")
        if row["saliency_flag"] == "empty":
            assert row["saliency_border_share"] == ""
        else:  # a share with 3 decimals, flagged exactly when it is over one half
            share = row["saliency_border_share"]
            assert len(share.split(".")[1]) == 3 and 0.0 <= float(share) <= 1.0
            assert (row["saliency_flag"] == "border") == (float(share) > 0.5)
    skipped = list(csv.DictReader((out / "skipped.csv").open()))
    reasons = {Path(r["path"]).name: r["reason"] for r in skipped}
    assert reasons.keys() == {"broken.png", "truncated.png", "corrupt.png"}
    assert reasons["broken.png"].startswith("not an image")
    assert reasons["truncated.png"].startswith("truncated or corrupt PNG")
    assert reasons["corrupt.png"].startswith("truncated or corrupt PNG")


def border_mask(height: int, width: int, fraction: float) -> np.ndarray:
    """True on the outer `fraction` of each side: pixel distances to the nearest edge."""
    rows, cols = np.indices((height, width))
    to_edge_y = np.minimum(rows, height - 1 - rows)
    to_edge_x = np.minimum(cols, width - 1 - cols)
    return (to_edge_y < round(height * fraction)) | (to_edge_x < round(width * fraction))


@pytest.mark.parametrize("where", ["border", "centre", "uniform", "random"])
def test_border_share_of_a_heatmap(where):
    from tb_lightning.inference.saliency import BORDER_FRACTION, border_share, flag_map

    height, width = 64, 80
    heat = np.zeros((height, width), dtype=np.float32)
    if where == "border":  # a blob in a corner, as users saw
        heat[:5, :6] = 1.0
        heat[40:, 2:4] = 0.3
    elif where == "centre":
        heat[20:44, 25:55] = np.linspace(0.1, 1.0, 30, dtype=np.float32)
    elif where == "uniform":
        heat[:] = 0.5
    else:
        heat = np.random.default_rng(0).random((height, width)).astype(np.float32)
    mask = border_mask(height, width, BORDER_FRACTION)
    expected = float(heat[mask].sum() / heat.sum())
    share = border_share(heat)
    assert share == pytest.approx(expected, abs=1e-6)
    # The frame is 1 - 0.8^2 of the area: what an even map puts there (the check of the mask).
    assert mask.mean() == pytest.approx(1 - (1 - 2 * 0.1) ** 2, abs=0.01)
    if where in ("border", "centre"):
        assert share == {"border": 1.0, "centre": 0.0}[where]
    assert flag_map(share) == ("border" if where == "border" else "")
    assert border_share(np.zeros((height, width))) is None
    assert flag_map(None) == "empty"


def test_flagged_gradcam_maps_are_marked(loaded, phantom_root, tmp_path, monkeypatch, caplog):
    """A map with no region that raises p_tb, and one on the image border, are marked in
    predictions.csv, in their figure's title and in the log."""
    from tb_lightning.inference import saliency

    real = saliency.gradcam

    def first_empty_second_on_the_border(net, images):
        maps = real(net, images)
        maps[0] = 0
        maps[1] = 0
        maps[1, :, :4] = 1.0  # the left edge: all the mass in the border
        maps[2] = 0
        maps[2, 20:40, 20:40] = 1.0  # the centre: none of it
        return maps

    notes = []
    real_figure = saliency.saliency_figure

    def recording_figure(image, heatmap, title, note=None, frame=None):
        notes.append(note)
        return real_figure(image, heatmap, title, note, frame)

    monkeypatch.setattr(saliency, "gradcam", first_empty_second_on_the_border)
    monkeypatch.setattr(saliency, "saliency_figure", recording_figure)
    paths = [str(p) for p in sorted((phantom_root / "Tuberculosis").glob("*.png"))[:4]]
    run_prediction(loaded, paths, 0.5, "test", tmp_path, batch_size=8, saliency=True)
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert "saliency_empty" not in rows[0]
    assert [r["saliency_flag"] for r in rows[:3]] == ["empty", "border", ""]
    assert [r["saliency_border_share"] for r in rows[:3]] == ["", "1.000", "0.000"]
    assert notes[0] == "EMPTY map: no region raises p_tb"
    assert notes[1] == "FLAGGED: 100% of the map lies in the image border, outside the body"
    assert notes[2] is None
    # The weak test model's own map (the fourth) may add to either count.
    empty = sum(r["saliency_flag"] == "empty" for r in rows)
    border = sum(r["saliency_flag"] == "border" for r in rows)
    assert f"{empty} of 4 Grad-CAM maps are empty" in caplog.text
    assert f"{border} of 4 Grad-CAM maps have most of their mass (more than 50%) in the " in (
        caplog.text
    )
    assert "saliency_flag=empty/border" in caplog.text
    # Named relative to the run directory.
    assert all(not Path(r["saliency"]).is_absolute() for r in rows)
    assert all((tmp_path / r["saliency"]).is_file() for r in rows)


def test_predict_and_eval_say_when_the_checkpoint_upsamples_the_inputs(
    loaded, phantom_root, tmp_path, caplog
):
    """64 px phantoms through a model of 160 px input: 2.5x, said once per run with the native
    size (a copy of the session's model that claims 160 px; its network takes any size)."""
    assert PHANTOM_SIZE == 64  # 160 / 64 = 2.5
    larger = dataclasses.replace(loaded, image_size=160)
    samples = [
        Sample(str(p), label, p.stem, "phantom")
        for label, folder in enumerate(("Normal", "Tuberculosis"))
        for p in sorted((phantom_root / folder).glob("*.png"))[:2]
    ]
    paths = [s.path for s in samples]
    expected = (
        "The checkpoint's image size (160 px, its data.image_size) upsamples these images 2.5x "
        "(native 64x64 px, median): 6.25x the pixels to compute and no detail gained; a model "
        "trained with data.image_size=64 matches them."
    )
    tasks = {
        "predict": lambda model, out: run_prediction(model, paths, 0.5, "test", out),
        "eval": lambda model, out: evaluate_samples(
            model, samples, 0.5, "test", out, "all", n_bootstrap=20
        ),
    }
    for task, run in tasks.items():
        caplog.clear()
        run(larger, tmp_path / task / "up")
        run(loaded, tmp_path / task / "same")  # 1x: nothing to say
        said = [r.getMessage() for r in caplog.records if "upsamples" in r.getMessage()]
        assert said == [expected]


def test_predict_csv_input_and_user_errors(loaded, phantom_root, tmp_path):
    manifest = tmp_path / "list.csv"
    first = sorted((phantom_root / "Normal").glob("*.png"))[0]
    manifest.write_text(f"path\n{first}\nmissing.png\n")
    paths = collect_inputs(manifest)
    assert paths == [str(first), str(tmp_path / "missing.png")]
    predictions = run_prediction(loaded, paths, 0.5, "test", tmp_path / "out")
    assert predictions.readable.tolist() == [True, False]
    assert "does not exist" in predictions.reasons[1]
    with pytest.raises(DataError, match="input=/no/such/folder does not exist"):
        collect_inputs("/no/such/folder")


def write_hostile_files(folder: Path) -> dict[str, str]:
    """One file of every bad kind in folder: {file name: words its reason must hold}."""
    png_with_header(folder / "huge_30000.png", 30000, 30000)  # 2.7 GB if decoded
    png_with_header(folder / "bomb_70000.png", 70000, 70000)  # PIL's decompression-bomb limit
    png_with_header(folder / "tiny_1x1.png", 1, 1)
    write_bad(folder, "truncated_png")
    write_bad(folder, "not_an_image")
    write_bad(folder, "zero_byte")
    return {
        "huge_30000.png": "huge image",
        "bomb_70000.png": "huge image",
        "tiny_1x1.png": "tiny image (1x1 px",
        "truncated_png.png": "truncated or corrupt PNG",
        "not_an_image.png": "not an image",
        "zero_byte.png": "empty file",
    }


def test_predict_keeps_going_past_every_kind_of_bad_file(loaded, phantom_root, tmp_path):
    """Huge, bomb, tiny, truncated, non-image, empty: each skipped with its reason, the good
    images beside them predicted as if alone."""
    images = tmp_path / "in"
    good = sorted((phantom_root / "Tuberculosis").glob("*.png"))[:2]
    images.mkdir()
    for path in good:
        shutil.copy(path, images / path.name)
    expected = write_hostile_files(images)
    predictions = run_prediction(loaded, collect_inputs(images), 0.5, "test", tmp_path / "out")
    assert int(predictions.readable.sum()) == len(good)
    rows = list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))
    assert [Path(r["path"]).name for r in rows] == sorted(p.name for p in good)
    probs = model_probs(loaded, image_paths(tmp_path / "out", rows))
    assert [float(r["p_tb"]) for r in rows] == pytest.approx(probs.tolist(), abs=1e-5)
    skipped = list(csv.DictReader((tmp_path / "out" / "skipped.csv").open()))
    reasons = {Path(r["path"]).name: r["reason"] for r in skipped}
    assert reasons.keys() == expected.keys()
    for name, words in expected.items():
        assert words in reasons[name], (name, reasons[name])


def test_eval_of_a_folder_follows_data_on_bad_file(trained_run, loaded, phantom_root, tmp_path):
    """eval data=folder: the scan's checks, data.on_bad_file=error stops naming the file, skip
    leaves every bad file out of the numbers and lists it in skipped.csv."""
    root = tmp_path / "db"
    for folder in ("Normal", "Tuberculosis"):
        (root / folder).mkdir(parents=True)
        for path in sorted((phantom_root / folder).glob("*.png"))[:6]:
            shutil.copy(path, root / folder / path.name)
    expected = write_hostile_files(root / "Normal")
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    data = ["data=folder", f"data.root={root}"]
    with pytest.raises(DataError) as err:
        evaluate(eval_config(ckpt, tmp_path / "error", *data))
    message = str(err.value)
    assert "data.on_bad_file=skip" in message and "(5 more bad file(s) after it)" in message
    assert any(str(root / "Normal" / name) in message for name in expected)
    out = tmp_path / "skip"
    metrics = evaluate(eval_config(ckpt, out, *data, "data.on_bad_file=skip"))
    assert metrics["all"]["overall"]["images"] == 12 and metrics["skipped_files"] == 6
    assert metrics["all"]["overall"]["counts"] == {"Normal": 6, "Tuberculosis": 6}
    skipped = list(csv.DictReader((out / "skipped.csv").open()))
    reasons = {Path(r["path"]).name: r["reason"] for r in skipped}
    assert reasons.keys() == expected.keys() and {r["label"] for r in skipped} == {"0"}
    for name, words in expected.items():
        assert words in reasons[name], (name, reasons[name])
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 12 and not {Path(r["path"]).name for r in rows} & expected.keys()
    probs = model_probs(loaded, image_paths(out, rows))
    assert [float(r["p_tb"]) for r in rows] == pytest.approx(probs.tolist(), abs=1e-5)
    assert "Left out: 6 bad file(s)" in (out / "report.txt").read_text()


def test_eval_of_a_split_file_refuses_a_bad_row(trained_run, tmp_path):
    """A split.csv's rows passed training's scan: a bad one now is an error naming it."""
    sides = read_split_sides(trained_run / "split.csv")
    tiny = png_with_header(tmp_path / "tiny.png", 1, 1)
    val = [*sides["val"], Sample(str(tiny), 1, "tiny", "phantom")]
    split_file = tmp_path / "split.csv"
    write_split_csv(split_file, sides["train"], val)
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    # tiny.png lies outside the training data folder: allowed here, to reach the image check.
    config = eval_config(
        ckpt, tmp_path / "out", f"eval.split_file={split_file}", "eval.allow_outside_paths=true"
    )
    with pytest.raises(DataError) as err:
        evaluate(config)
    message = str(err.value)
    assert f"Cannot use image {tiny} (val row of {split_file}): tiny image (1x1 px" in message


def test_eval_refuses_a_split_whose_val_images_were_trained_on(trained_run, tmp_path):
    sides = read_split_sides(trained_run / "split.csv")
    seen = sides["train"][:3]
    split_file = tmp_path / "other_split.csv"
    write_split_csv(split_file, sides["train"][3:], [*sides["val"], *seen])
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    config = eval_config(ckpt, tmp_path / "out", f"eval.split_file={split_file}")
    with pytest.raises(DataError) as err:
        evaluate(config)
    message = str(err.value)
    assert message.startswith(f"3 val image(s) of {split_file} are training images of the ")
    assert f"(train rows of {trained_run / 'split.csv'}), e.g. {seen[0].path};" in message
    assert not (tmp_path / "out").exists()  # refused before any image was predicted


@pytest.mark.slow  # every real image decoded at 512 px and a Grad-CAM figure drawn for each
@pytest.mark.parametrize("folder", ["tbx11k-512", "shenzhen-512"])
def test_predict_on_real_images(shared_data, loaded, folder, tmp_path):
    """512 px RGB (TBX11K) and grayscale, mixed-size (Shenzhen) PNGs all read and predict."""
    root = shared_data / folder
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    paths = collect_inputs(root)
    assert len(paths) == len(list(root.rglob("*.png")))
    predictions = run_prediction(loaded, paths, 0.5, "test", tmp_path, batch_size=8, saliency=True)
    assert predictions.readable.all()
    assert np.isfinite(predictions.probs).all()
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert len(rows) == len(paths) and len(list((tmp_path / "saliency").glob("*.png"))) == len(
        paths
    )


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_cli_torchscript(trained_run, loaded, tmp_path):
    """`python -m tb_lightning.export format=torchscript` (ONNX, the default format, through the
    CLI: test_provenance.py's model.json test)."""
    assert_ok(
        run_cli(
            "tb_lightning.export",
            f"ckpt_path={trained_run / 'checkpoints' / 'best.ckpt'}",
            "format=torchscript",
            f"hydra.run.dir={tmp_path}",
            warm=True,
        )
    )
    sidecar = json.loads((tmp_path / "model.json").read_text())
    assert sidecar["model_file"] == "model.pt"
    assert sidecar["class_names"] == ["Normal", "Tuberculosis"]
    assert sidecar["preprocessing"]["image_size"] == PHANTOM_SIZE
    assert sidecar["threshold"] == loaded.stored_threshold["value"]
    assert sidecar["check"]["max_abs_difference"] <= 1e-5
    module = torch.jit.load(str(tmp_path / "model.pt"))
    images = torch.randn(3, 3, PHANTOM_SIZE, PHANTOM_SIZE)  # another batch size than traced
    with torch.no_grad():
        expected = torch.sigmoid(loaded.model(images))
    torch.testing.assert_close(module(images), expected)


def test_export_onnx(trained_run, loaded, exported_run):
    """The session's `python -m tb_lightning.export` (ONNX, its default format; its model.json
    in full: test_provenance.py): one self-contained file that computes the module's p_tb."""
    sidecar = json.loads((exported_run / "model.json").read_text())
    assert sidecar["model_file"] == "model.onnx"
    assert sidecar["threshold"] == loaded.stored_threshold["value"]
    # Weights inside the .onnx: no external data file beside it.
    assert {p.name for p in exported_run.iterdir() if p.is_file() and "model" in p.name} == {
        "model.onnx",
        "model.json",
    }
    assert not [p for p in exported_run.iterdir() if p.suffix in (".data", ".bin", ".pb")]
    # Run the file on images it was not checked on, preprocessing as model.json says.
    _, val = read_split_csv(trained_run / "split.csv")
    paths = [s.path for s in val[-3:]]
    checked = {Path(name).name for name in sidecar["check"]["images"]}
    assert checked and not checked & {Path(p).name for p in paths}
    transform = build_transform(sidecar["preprocessing"]["image_size"])
    images = torch.stack([transform(load_image(p)) for p in paths]).numpy()
    session = onnxruntime.InferenceSession(str(exported_run / "model.onnx"))
    got = session.run(None, {"image": images})[0]
    np.testing.assert_allclose(got, model_probs(loaded, paths), atol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_a_checkpoints_clahe_reaches_eval_predict_and_export(tmp_path):
    """A checkpoint trained with data.preprocess=clahe (a tiny one, built here): eval's report
    and metrics.json name the preprocessing, predict applies it, the ONNX export takes the
    CLAHE'd input and model.json says how to make it. (Training with CLAHE through the command
    line, with an ONNX export: test_preprocess.py, slow.)"""
    samples = image_set(tmp_path / "images", 4, 4)
    run = tmp_path / "run"
    ckpt = write_checkpoint(
        run / "checkpoints" / "best.ckpt", preprocess=CLAHE, threshold=threshold_choice(0.5)
    )
    write_split_csv(run / "split.csv", samples[::2], samples[1::2])
    loaded = load_checkpoint_file(ckpt)
    spec = {"name": "clahe", "clip_limit": 2.0, "tile_grid": 4}
    assert loaded.preprocess == spec
    paths = [s.path for s in samples]
    transform = build_transform(loaded.image_size, spec)
    images = torch.stack([transform(load_image(p)) for p in paths])
    plain = torch.stack([build_transform(loaded.image_size)(load_image(p)) for p in paths])
    with torch.no_grad():
        expected = torch.sigmoid(loaded.model(images)).numpy()
        without = torch.sigmoid(loaded.model(plain)).numpy()
    assert np.abs(expected - without).max() > 1e-4  # the CLAHE makes a difference

    metrics, report = evaluate_samples(
        loaded, samples, 0.5, "test", tmp_path / "eval", "all", n_bootstrap=20
    )
    assert "Preprocessing: clahe (clip limit 2, 4x4 tiles), stored in the checkpoint" in report
    assert metrics["preprocess"] == spec
    rows = list(csv.DictReader((tmp_path / "eval" / "predictions.csv").open()))
    got = {Path(r["path"]).name: float(r["p_tb"]) for r in rows}
    assert [got[Path(p).name] for p in paths] == pytest.approx(expected.tolist(), abs=1e-5)

    predictions = run_prediction(loaded, paths, 0.5, "test", tmp_path / "predict")
    np.testing.assert_allclose(predictions.probs, expected, atol=1e-5)

    # TorchScript: the quicker export (the exporters take the same module and the same check).
    sidecar = export_model(
        loaded, "torchscript", tmp_path / "export", 0.5, "test", num_check_images=2
    )
    assert sidecar["preprocessing"]["preprocess"] == spec
    assert any("cv2.createCLAHE(clipLimit=2.0" in s for s in sidecar["preprocessing"]["steps"])
    scripted = torch.jit.load(str(tmp_path / "export" / "model.pt"))
    with torch.no_grad():
        np.testing.assert_allclose(scripted(images).numpy(), expected, atol=1e-5)


def compose_config(name: str, overrides: list[str]):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=overrides)
