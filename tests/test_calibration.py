"""Temperature scaling (calibration=temperature): the fit, and one temperature for every command
that reads the checkpoint (train's report, eval, predict, export)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from conftest import (
    TEST_DATA_DIR,
    compose_task,
    compose_train,
    eval_config,
    phantom_overrides,
    run_cli,
    train_in_process,
)
from tb_lightning.core.errors import ConfigError
from tb_lightning.core.tasks import instantiate_config
from tb_lightning.data.split import read_split_csv
from tb_lightning.data.transforms import build_transform, load_image
from tb_lightning.eval import evaluate
from tb_lightning.evaluation.final_report import final_report
from tb_lightning.inference.deploy import export_model
from tb_lightning.models.torch_file import load_checkpoint
from tb_lightning.predict import predict
from tb_lightning.stats.calibration import (
    MIN_CALIBRATION_IMAGES,
    auroc_interval,
    calibration_warnings,
    fit_temperature,
    mean_nll,
)
from tb_lightning.trained.checkpoint import load_checkpoint_file
from tb_lightning.trained.load import load_trained_model

# Checkpoints loaded without the discarded init (conftest); the module's run (calibrated_run,
# module-scoped) is trained before it applies, and the refused runs stop before any epoch.
pytestmark = pytest.mark.usefixtures("quick_loads")


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


def in_process_eval(ckpt, output_dir):
    """`python -m tb_lightning.eval ckpt_path=<ckpt>` as composed, for evaluate(cfg) here."""
    return eval_config(ckpt, output_dir, f"paths.data_dir={TEST_DATA_DIR}")


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
    # (eval and predict run in-process: their command lines are tested in
    # test_eval_predict_export.py; here the temperature is.)
    evaluate(in_process_eval(best, tmp_path / "e"))
    evaluated = json.loads((tmp_path / "e" / "metrics.json").read_text())
    for key in ("val/auroc", "val/brier", "val/ece", "val/sensitivity", "val/loss"):
        assert evaluated[key] == metrics[key], key
    assert f"T = {stored['temperature']:.3f}" in (tmp_path / "e" / "report.txt").read_text()
    # predict's p_tb is sigmoid(raw logit / T), computed here independently.
    loaded = load_checkpoint_file(best)
    _, val = read_split_csv(run_dir / "split.csv")
    paths = [s.path for s in val]
    expected = 1 / (1 + np.exp(-raw_logits(loaded, paths) / stored["temperature"]))
    predict(
        compose_task(
            "predict",
            [f"ckpt_path={best}", f"input={val[0].path}", f"paths.output_dir={tmp_path / 'p'}"],
        )
    )
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


def overrides_with_val_size(phantom_root, val_size) -> list[str]:
    """The phantom run's overrides with another data.val_size (in place of theirs)."""
    kept = [o for o in phantom_overrides(phantom_root) if not o.startswith("data.val_size=")]
    return [*kept, f"data.val_size={val_size}"]


def test_a_val_size_too_small_to_calibrate_on_is_refused_before_training(phantom_root, tmp_path):
    result = run_cli(
        "tb_lightning.train", *overrides_with_val_size(phantom_root, 2), "calibration=temperature",
        f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "Traceback" not in output
    sentence = (
        f"calibration=temperature needs at least {MIN_CALIBRATION_IMAGES} validation images, of "
        "both classes, to fit a temperature on; this split has 2 (data.val_size=2): raise "
        "data.val_size or use calibration=none."
    )
    assert sentence in output
    assert not list(tmp_path.rglob("*.ckpt")) and not (tmp_path / "split.csv").exists()


def test_a_fraction_too_small_to_calibrate_on_is_refused_once_split(phantom_root, tmp_path):
    """A fraction is counted once the split is made: refused there, before any epoch."""
    overrides = [*overrides_with_val_size(phantom_root, 0.2), "calibration=temperature"]
    with pytest.raises(ConfigError, match=r"this split has [0-9] \(data\.val_size=0\.2\)"):
        train_in_process(overrides, tmp_path)
    assert not list(tmp_path.rglob("*.ckpt")) and not (tmp_path / "split.csv").exists()


def test_the_warnings_say_when_a_temperature_means_nothing():
    rng = np.random.default_rng(1)
    # Logits unrelated to the labels: the fit flattens them as far as it may, and the AUROC
    # interval includes 0.5.
    labels = (rng.random(60) < 0.5).astype(int)
    noise = rng.normal(0, 3, 60)
    temperature = fit_temperature(noise, labels)
    warnings = calibration_warnings(temperature, auroc_interval(noise, labels, 500, 0))
    assert temperature == pytest.approx(100, rel=1e-6)
    assert len(warnings) == 2
    assert "the fit did not converge inside its range" in warnings[0]
    assert "includes 0.5: the probabilities carry almost no information" in warnings[1]
    # Two perfectly separated images: sharpened to the other end of the range.
    separated = fit_temperature([-3.0, 2.0], [0, 1])
    assert separated == pytest.approx(0.05, rel=1e-6)
    assert "did not converge" in calibration_warnings(separated, [1.0, 1.0])[0]
    # Extreme but inside the range; and the interval check alone.
    assert calibration_warnings(46.3, [0.8, 0.9]) == [
        "T = 46.300 is extreme (outside 0.1 to 10): it flattens the logits 46x, a sign of nearly "
        "uninformative logits or of a fit on too few images, not of a calibrated model."
    ]
    assert "sharpens the logits 14x" in calibration_warnings(0.07, None)[0]
    assert calibration_warnings(1.8, [0.45, 0.7]) == [
        "the validation AUROC's 95% interval (0.450 to 0.700) includes 0.5: the probabilities "
        "carry almost no information; calibration is trivial here, and a low ECE after it is no "
        "evidence of a useful model."
    ]
    # An informative, over-confident model: a temperature that means something.
    labels = (rng.random(400) < 0.4).astype(int)
    logits = 3.0 * (rng.normal(0, 1.5, 400) + 2 * labels - 0.8)
    temperature = fit_temperature(logits, labels)
    assert calibration_warnings(temperature, auroc_interval(logits, labels, 500, 0)) == []


class NoiseNet(torch.nn.Module):
    """A network whose logits are noise, whatever the image: a chance-level model."""

    def __init__(self) -> None:
        super().__init__()
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return 3 * torch.randn(len(images), generator=self.generator)


def copy_run(run_dir, to):
    """A run folder with the run's split.csv and a copy of its best.ckpt (eval reads both)."""
    (to / "checkpoints").mkdir(parents=True)
    (to / "split.csv").write_bytes((run_dir / "split.csv").read_bytes())
    best = to / "checkpoints" / "best.ckpt"
    best.write_bytes((run_dir / "checkpoints" / "best.ckpt").read_bytes())
    return best


def test_a_chance_level_model_is_calibrated_with_warnings_everywhere(
    calibrated_run, phantom_root, tmp_path, caplog
):
    """train's final report of a model whose logits are noise: the warnings stand next to the
    ECE line and are stored with T; eval's report and predict's log repeat them."""
    run_dir, _ = calibrated_run
    best = copy_run(run_dir, tmp_path / "run")
    loaded = load_checkpoint_file(best)
    loaded.model.net = NoiseNet()
    datamodule = instantiate_config(compose_train(phantom_overrides(phantom_root)).data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    final_report(
        loaded.model, str(best), datamodule, "youden", 0.95, tmp_path / "run",
        calibration="temperature",
    )  # fmt: skip
    warnings = json.loads((tmp_path / "run" / "metrics.json").read_text())["calibration"][
        "warnings"
    ]
    assert any("includes 0.5: the probabilities carry almost no information" in w for w in warnings)
    assert load_checkpoint(best)["calibration"]["warnings"] == warnings
    # The ECE "before -> after" line says it is no evidence, and the warnings follow it.
    lines = (tmp_path / "run" / "report.txt").read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if "temperature scaling: T =" in line)
    assert lines[at].startswith("Probabilities rescaled by temperature scaling")
    assert lines[at].endswith("(before -> after), which is NO evidence of calibration:")
    assert lines[at + 1 : at + 1 + len(warnings)] == [
        f"  WARNING (calibration): {w}" for w in warnings
    ]
    # eval of that checkpoint repeats them in its report (its network is the real one now: the
    # warnings are the fit's, stored with T).
    evaluate(in_process_eval(best, tmp_path / "e"))
    evaluated = (tmp_path / "e" / "report.txt").read_text()
    assert all(f"  WARNING (calibration): {w}" in evaluated for w in warnings)
    # predict (and export) load it through here: the warnings go to the log.
    with caplog.at_level("WARNING"):
        load_trained_model(best)
    assert all(w in caplog.text for w in warnings)


def test_a_checkpoint_without_stored_warnings_still_evaluates(calibrated_run, tmp_path):
    """Checkpoints written before the warnings were stored: eval works, and a T at an end of
    the range is still called what it is (from T alone)."""
    run_dir, _ = calibrated_run
    best = copy_run(run_dir, tmp_path / "run")
    checkpoint = load_checkpoint(best)
    checkpoint["calibration"].pop("warnings", None)
    checkpoint["calibration"]["temperature"] = 100.0
    torch.save(checkpoint, best)
    evaluate(in_process_eval(best, tmp_path / "e"))
    report = (tmp_path / "e" / "report.txt").read_text()
    assert "temperature scaling: T = 100.000" in report
    assert "the fit did not converge inside its range" in report
    evaluated = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert "warnings" not in evaluated["calibration"]
