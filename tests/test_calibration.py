"""Temperature scaling (calibration=temperature): the fit, and one temperature for every command
that reads the checkpoint (train's report, eval, predict, export)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from conftest import phantom_overrides, run_cli, train_in_process
from tb_lightning.data.split import read_split_csv
from tb_lightning.data.transforms import build_transform, load_image
from tb_lightning.evaluation.calibration import fit_temperature, mean_nll
from tb_lightning.inference.checkpoint import load_model
from tb_lightning.inference.deploy import export_model
from tb_lightning.models.torch_file import load_checkpoint


def test_fitted_temperature_minimises_the_validation_loss():
    rng = np.random.default_rng(0)
    labels = (rng.random(400) < 0.4).astype(int)
    logits = 3.0 * (rng.normal(0, 1.5, 400) + 2 * labels - 0.8)  # 3x over-confident
    temperature = fit_temperature(logits, labels)
    grid = np.linspace(0.5, 8, 4000)
    best = grid[np.argmin([mean_nll(logits, labels, 1 / t) for t in grid])]
    assert temperature == pytest.approx(best, abs=5e-3)
    # The loss is scikit-learn's log loss of the calibrated probabilities.
    probs = 1 / (1 + np.exp(-logits / temperature))
    assert mean_nll(logits, labels, 1 / temperature) == pytest.approx(
        skm.log_loss(labels, probs), rel=1e-9
    )


@pytest.fixture(scope="module")
def calibrated_run(phantom_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("calibrated")
    metrics = train_in_process(
        [*phantom_overrides(phantom_root), "trainer.max_epochs=2", "calibration=temperature"],
        run_dir,
    )
    return run_dir, metrics


def raw_logits(loaded, paths) -> np.ndarray:
    """The network's logits computed here, without the model's temperature."""
    transform = build_transform(loaded.image_size)
    images = torch.stack([transform(load_image(p)) for p in paths])
    with torch.no_grad():
        return loaded.model.net(images).double().numpy()


def test_one_temperature_for_train_eval_predict_and_export(calibrated_run, tmp_path):
    run_dir, metrics = calibrated_run
    best = run_dir / "checkpoints" / "best.ckpt"
    stored = load_checkpoint(best)["calibration"]
    assert stored["method"] == "temperature" and stored["temperature"] > 0
    assert metrics["calibration"] == stored
    report = (run_dir / "report.txt").read_text()
    assert f"temperature scaling: T = {stored['temperature']:.3f}" in report
    # The threshold was chosen on the calibrated probabilities: eval reproduces train's figures.
    result = run_cli("tb_lightning.eval", f"ckpt_path={best}", f"hydra.run.dir={tmp_path / 'e'}")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    evaluated = json.loads((tmp_path / "e" / "metrics.json").read_text())
    for key in ("val/auroc", "val/brier", "val/ece", "val/sensitivity", "val/loss"):
        assert evaluated[key] == metrics[key], key
    assert f"T = {stored['temperature']:.3f}" in (tmp_path / "e" / "report.txt").read_text()
    # predict's p_tb is sigmoid(raw logit / T), computed here independently.
    loaded = load_model(best)
    _, val = read_split_csv(run_dir / "split.csv")
    paths = [s.path for s in val]
    expected = 1 / (1 + np.exp(-raw_logits(loaded, paths) / stored["temperature"]))
    result = run_cli(
        "tb_lightning.predict", f"ckpt_path={best}", f"input={val[0].path}",
        f"hydra.run.dir={tmp_path / 'p'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    row = (tmp_path / "p" / "predictions.csv").read_text().splitlines()[1].split(",")
    assert float(row[1]) == pytest.approx(expected[0], abs=1e-5)
    # The export carries the temperature inside its graph (export_model checks it against the
    # module within 1e-5) and records it.
    sidecar = export_model(loaded, "torchscript", tmp_path / "x", 0.5, "test", num_check_images=2)
    assert sidecar["calibration"] == stored
    scripted = torch.jit.load(str(tmp_path / "x" / "model.pt"))
    transform = build_transform(loaded.image_size)
    image = transform(load_image(paths[0]))[None]
    assert float(scripted(image)[0]) == pytest.approx(expected[0], abs=1e-5)


def test_calibration_value_is_checked(phantom_root, tmp_path):
    result = run_cli(
        "tb_lightning.train", *phantom_overrides(phantom_root), "calibration=platt",
        f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    assert result.returncode == 1
    assert "calibration='platt' is not one of ['none', 'temperature']" in result.stdout + (
        result.stderr
    )
