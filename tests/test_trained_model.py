"""The trained model (src/tb_lightning/trained/): TrainedModel's threshold and predictions,
loading a checkpoint file or a k-fold folder, the operating threshold stored into a checkpoint,
and the ensemble's mean logit. Tiny untrained checkpoints built here (data_builders), no CLI."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data_builders import (
    CLAHE,
    TINY_NET,
    image_set,
    kfold_folder,
    skipped_init_of_discarded_layers,
    threshold_choice,
    tiny_classifier,
    write_checkpoint,
)
from tb_lightning.core.errors import ConfigError, UserError
from tb_lightning.data.split import read_split_sides
from tb_lightning.data.transforms import build_transform, load_image
from tb_lightning.models.torch_file import load_checkpoint
from tb_lightning.stats.thresholds import choose_threshold
from tb_lightning.trained.checkpoint import (
    CALIBRATION_KEY,
    THRESHOLD_KEY,
    load_checkpoint_file,
    store_operating_threshold,
)
from tb_lightning.trained.ensemble_model import (
    COMBINATION,
    EnsembleModel,
    describe_members,
    describe_missing,
)
from tb_lightning.trained.load import load_trained_model
from tb_lightning.trained.model import TrainedModel

SIZE = TINY_NET["image_size"]
CALIBRATION = {"method": "temperature", "temperature": 2.5, "fitted_on": "the val split"}


@pytest.fixture(scope="module", autouse=True)
def quick_builds():
    """Every network built here (tiny ones, and each load) without drawing the weights of
    torchvision's AlexNet classifier, which the builder throws away (data_builders)."""
    with skipped_init_of_discarded_layers():
        yield


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    """Five distinct 64 px images (3 Normal, 2 Tuberculosis)."""
    root = tmp_path_factory.mktemp("images")
    return [s.path for s in image_set(root, 3, 2, size=SIZE)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny best.ckpt with a stored max_f1 threshold, in a run's checkpoints/ folder."""
    run = tmp_path_factory.mktemp("run")
    return write_checkpoint(
        run / "checkpoints" / "best.ckpt",
        threshold=threshold_choice(0.37, "max_f1", 12),
        epoch=3,
        global_step=42,
    )


@pytest.fixture(scope="module")
def loaded(ckpt) -> TrainedModel:
    """ckpt loaded once (loading builds the network): tests only read it."""
    return load_checkpoint_file(ckpt)


def independent_logits(model: torch.nn.Module, paths, preprocess=None) -> np.ndarray:
    """The model's logits computed here from the files, independently of trained/runner.py."""
    transform = build_transform(SIZE, preprocess)
    batch = torch.stack([transform(load_image(p)) for p in paths])
    with torch.no_grad():
        return model.eval()(batch).numpy()


# --- TrainedModel.threshold_for ----------------------------------------------------------------


def test_the_stored_threshold_is_used_and_says_how_it_was_chosen(loaded):
    assert loaded.threshold_for(None) == (
        0.37,
        "chosen on the validation split (12 images) by threshold.policy=max_f1",
    )


def test_threshold_value_overrides_the_stored_threshold(loaded):
    assert loaded.threshold_for(0.8) == (0.8, "threshold.value (command line)")


def test_without_a_stored_threshold_the_models_own_is_used_with_a_warning(tmp_path, caplog):
    path = write_checkpoint(tmp_path / "last.ckpt", model_threshold=0.3)
    trained = load_checkpoint_file(path)
    assert trained.stored_threshold is None and trained.hparams_threshold == 0.3
    with caplog.at_level(logging.WARNING):
        assert trained.threshold_for(None) == (
            0.3,
            "model.threshold (no threshold stored in the checkpoint)",
        )
    assert f"Checkpoint {path.resolve()} stores no operating threshold" in caplog.text
    assert "threshold.value=..." in caplog.text
    caplog.clear()
    assert trained.threshold_for(0.6) == (0.6, "threshold.value (command line)")
    assert "stores no operating threshold" not in caplog.text  # an override needs none


def test_a_sensitivity_target_and_an_ensembles_choice_are_described():
    model = TrainedModel.of_classifier(tiny_classifier(), None, SIZE, None)
    model.stored_threshold = {**threshold_choice(0.2, "sensitivity", 30), "target": 0.95}
    assert model.threshold_for(None)[1] == (
        "chosen on the validation split (30 images) by threshold.policy=sensitivity, target 0.95"
    )
    model.stored_threshold = {
        **threshold_choice(0.4, "youden", 36),
        "chosen_on": "the out-of-fold predictions of the 3 fold models",
    }
    assert model.threshold_for(None) == (
        0.4,
        "chosen on the out-of-fold predictions of the 3 fold models (36 images) by "
        "threshold.policy=youden",
    )


# --- TrainedModel.predict and logits -----------------------------------------------------------


def test_predict_gives_the_networks_logits_for_each_file_and_marks_a_bad_one(
    loaded, images, tmp_path
):
    trained = loaded
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    paths = [images[0], str(bad), *images[1:]]
    predictions = trained.predict(paths, batch_size=2, progress=False)
    assert predictions.readable.tolist() == [True, False, True, True, True, True]
    assert predictions.reasons[1].startswith("not an image") and predictions.reasons[0] == ""
    assert np.isnan(predictions.logits[1])
    expected = independent_logits(trained.model, images)
    np.testing.assert_allclose(np.delete(predictions.logits, 1), expected, atol=1e-5)
    np.testing.assert_allclose(
        np.delete(predictions.probs, 1), 1 / (1 + np.exp(-expected)), atol=1e-6
    )


def test_predict_applies_the_checkpoints_preprocessing_and_temperature(images, tmp_path):
    model = tiny_classifier(seed=1)  # one network, saved three ways
    plain = load_checkpoint_file(write_checkpoint(tmp_path / "plain.ckpt", model))
    clahe = load_checkpoint_file(write_checkpoint(tmp_path / "clahe.ckpt", model, preprocess=CLAHE))
    assert plain.preprocess is None
    assert clahe.preprocess == {"name": "clahe", "clip_limit": 2.0, "tile_grid": 4}
    got = clahe.predict(images, progress=False).logits
    np.testing.assert_allclose(got, independent_logits(clahe.model, images, CLAHE), atol=1e-5)
    assert not np.allclose(got, plain.predict(images, progress=False).logits, atol=1e-4)
    # The calibration temperature divides the logits: set on the module when loaded.
    calibrated = load_checkpoint_file(
        write_checkpoint(tmp_path / "calibrated.ckpt", model, calibration=CALIBRATION)
    )
    assert calibrated.calibration == CALIBRATION and float(calibrated.model.temperature) == 2.5
    np.testing.assert_allclose(
        calibrated.predict(images, progress=False).logits,
        plain.predict(images, progress=False).logits / 2.5,
        atol=1e-5,
    )


def test_logits_of_tensors_run_the_model_in_eval_mode(loaded):
    trained = loaded
    images = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = trained.model.eval()(images)
    trained.model.train()  # dropout 0.5 in the head: eval mode makes the logits repeatable
    first, second = trained.logits(images), trained.logits(images)
    assert first.shape == (4,) and not trained.model.training
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    assert first.is_inference()


def test_of_classifier_wraps_the_model_being_trained(tmp_path):
    model = tiny_classifier(pos_weight=1.5)
    best = tmp_path / "run" / "checkpoints" / "best.ckpt"
    trained = TrainedModel.of_classifier(
        model, best, SIZE, {"name": "clahe", "clip_limit": 3, "tile_grid": 8}
    )
    assert trained.model is model and trained.image_size == SIZE
    assert trained.checkpoint_path == best and trained.run_dir == tmp_path / "run"
    assert trained.stored_threshold is None and trained.calibration is None
    assert trained.preprocess == {"name": "clahe", "clip_limit": 3.0, "tile_grid": 8}
    assert trained.pos_weight == 1.5 and trained.hparams_threshold == 0.5
    assert trained.members is None and trained.member_checkpoints is None
    # No preprocessing said either way: none.
    assert TrainedModel.of_classifier(model, None, SIZE, {"name": "none"}).preprocess is None
    assert TrainedModel.of_classifier(model, None, SIZE, None).checkpoint_path == Path()


def test_of_classifier_keeps_the_models_own_threshold():
    trained = TrainedModel.of_classifier(tiny_classifier(model_threshold=0.3), None, SIZE, None)
    assert trained.hparams_threshold == 0.3


# --- load_checkpoint_file and store_operating_threshold -----------------------------------------


def test_a_checkpoint_file_loads_as_it_was_saved(ckpt, loaded, images):
    trained = loaded
    assert trained.checkpoint_path == ckpt.resolve() and trained.run_dir == ckpt.parent.parent
    assert trained.image_size == SIZE and trained.net == TINY_NET
    assert (trained.epoch, trained.global_step) == (3, 42)
    assert trained.pos_weight == 2.0 and trained.hparams_threshold == 0.5
    assert trained.stored_threshold == threshold_choice(0.37, "max_f1", 12)
    assert trained.calibration is None and not trained.model.training
    # The very weights: the same logits as the module that was saved.
    expected = independent_logits(tiny_classifier(), images)
    np.testing.assert_allclose(trained.predict(images, progress=False).logits, expected, atol=1e-6)


def test_the_stored_threshold_and_temperature_round_trip(tmp_path):
    path = write_checkpoint(tmp_path / "best.ckpt")
    choice = threshold_choice(0.61, "youden", 20)
    store_operating_threshold(path, choice, CALIBRATION)
    stored = load_checkpoint(path)
    assert stored[THRESHOLD_KEY] == choice and stored[CALIBRATION_KEY] == CALIBRATION
    trained = load_checkpoint_file(path)
    assert trained.stored_threshold == choice and trained.calibration == CALIBRATION
    assert float(trained.model.temperature) == 2.5
    assert trained.threshold_for(None)[0] == 0.61
    # Stored again without calibration (a run retrained with calibration=none): no temperature.
    store_operating_threshold(path, threshold_choice(0.5), None)
    again = load_checkpoint_file(path)
    assert again.calibration is None and float(again.model.temperature) == 1.0
    assert CALIBRATION_KEY not in load_checkpoint(path)
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically: no temporary file left


@pytest.mark.parametrize("keep", [0.5, 0.98], ids=["half", "last-bytes-missing"])
def test_a_truncated_checkpoint_is_one_sentence_on_load_and_on_store(tmp_path, keep):
    data = write_checkpoint(tmp_path / "good.ckpt").read_bytes()
    path = tmp_path / "cut.ckpt"
    path.write_bytes(data[: int(len(data) * keep)])
    for action in (
        lambda: load_checkpoint_file(path),
        lambda: store_operating_threshold(path, threshold_choice(0.5)),
        lambda: load_trained_model(path),
    ):
        with pytest.raises(UserError) as err:
            action()
        message = str(err.value)
        assert message.startswith(f"Checkpoint {path} ")
        assert "is truncated or damaged" in message and "cut short" in message
        assert "\n" not in message and "weights_only" not in message
    assert path.read_bytes() == data[: int(len(data) * keep)]  # left as it was


def test_a_foreign_lightning_checkpoint_is_refused_naming_what_it_lacks(tmp_path):
    """Another project's Lightning checkpoint: its hyper_parameters describe no TBClassifier."""
    path = tmp_path / "other.ckpt"
    torch.save(
        {
            "epoch": 0,
            "state_dict": {"layer.weight": torch.zeros(2, 2)},
            "hyper_parameters": {"hidden": 32, "lr": 0.1},
        },
        path,
    )
    with pytest.raises(UserError) as err:
        load_trained_model(path)
    assert str(err.value) == (
        f"Checkpoint {path.resolve()} holds no tb_lightning model (its hyper_parameters lack "
        "net, optimizer, threshold); pass a checkpoints/best.ckpt written by tb_lightning.train."
    )


def test_a_checkpoint_with_a_calibration_warning_repeats_it_when_loaded(tmp_path, caplog):
    warned = {**CALIBRATION, "warnings": ["T = 100.000 did not converge"]}
    path = write_checkpoint(tmp_path / "best.ckpt", calibration=warned)
    with caplog.at_level(logging.WARNING):
        trained = load_trained_model(path)
    assert trained.calibration == warned
    assert "The checkpoint's calibration temperature: T = 100.000 did not converge" in caplog.text


# --- load_trained_model: a file or a k-fold folder ----------------------------------------------


@pytest.mark.parametrize("unset", [None, "", "  "])
def test_an_unset_ckpt_path_is_one_sentence_not_a_path_named_none(unset):
    # A new command without the config checks of eval/predict/export still gets the sentence.
    with pytest.raises(ConfigError, match=r"^ckpt_path is not set; pass ckpt_path="):
        load_trained_model(unset)


@pytest.fixture(scope="module")
def kfold(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("kfold")
    return kfold_folder(base / "sweep", base / "images")


def out_of_fold_logits(folder: Path, members: list[TrainedModel]) -> tuple[np.ndarray, list]:
    """Each fold's val images (its split.csv) scored here by that fold's model."""
    logits, labels = [], []
    for k, member in enumerate(members):
        assert member.checkpoint_path == folder / str(k) / "checkpoints" / "best.ckpt"
        val = read_split_sides(folder / str(k) / "split.csv")["val"]
        logits.append(independent_logits(member.model, [s.path for s in val]))
        labels += [s.label for s in val]
    return np.concatenate(logits), labels


def test_a_folder_is_refused_where_the_command_cannot_use_an_ensemble(kfold):
    with pytest.raises(ConfigError) as err:
        load_trained_model(kfold, ensemble_refusal="export format=x takes one checkpoint.")
    assert str(err.value) == (
        f"ckpt_path={kfold} is a multirun (an ensemble), but export format=x takes one checkpoint."
    )


def test_a_kfold_folder_loads_as_the_mean_logit_of_its_folds(kfold, images):
    trained = load_trained_model(kfold)
    assert isinstance(trained.model, EnsembleModel) and len(trained.members) == 3
    assert trained.member_checkpoints == [
        kfold / str(k) / "checkpoints" / "best.ckpt" for k in range(3)
    ]
    assert trained.checkpoint_path == kfold and trained.run_dir == kfold / "0"
    assert trained.ensemble_folds == {"num_folds": 3, "seeds": [42], "missing_folds": []}
    assert trained.epoch is None and trained.calibration is None
    members = trained.members  # each member's network, as its checkpoint holds it
    mean = np.mean([independent_logits(m.model, images) for m in members], axis=0)
    assert np.ptp([independent_logits(m.model, images[:1]) for m in members]) > 0  # unalike
    np.testing.assert_allclose(trained.predict(images, progress=False).logits, mean, atol=1e-5)
    # The threshold: youden on the out-of-fold logits, each val image scored by its fold model.
    oof, labels = out_of_fold_logits(kfold, members)
    probs = 1 / (1 + np.exp(-oof.astype(np.float64)))
    value, source = trained.threshold_for(None)
    assert value == pytest.approx(choose_threshold(probs, np.array(labels), "youden"), abs=1e-6)
    assert source == (
        f"chosen on the out-of-fold predictions of the 3 fold models ({len(labels)} images) by "
        "threshold.policy=youden"
    )
    assert trained.out_of_fold["images"] == len(labels) == 23


def test_a_calibrated_kfold_folder_fits_one_temperature_out_of_fold(tmp_path, images):
    from tb_lightning.stats.calibration import fit_temperature

    folder = kfold_folder(tmp_path / "sweep", tmp_path / "images", calibration=CALIBRATION)
    trained = load_trained_model(folder)
    # Each member's own T (2.5, stored in its checkpoint) is set aside: raw logits.
    assert all(float(m.model.temperature) == 1.0 for m in trained.members)
    oof, labels = out_of_fold_logits(folder, trained.members)
    temperature = fit_temperature(oof, np.array(labels))
    assert trained.calibration["temperature"] == pytest.approx(temperature, rel=1e-6)
    assert trained.calibration["fitted_on"] == (
        "the out-of-fold predictions of the 3 fold models (23 images)"
    )
    assert float(trained.model.temperature) == pytest.approx(temperature, rel=1e-6)
    mean = np.mean([independent_logits(m.model, images) for m in trained.members], axis=0)
    np.testing.assert_allclose(
        trained.predict(images, progress=False).logits, mean / temperature, atol=1e-5
    )
    probs = 1 / (1 + np.exp(-oof.astype(np.float64) / temperature))
    assert trained.threshold_for(None)[0] == pytest.approx(
        choose_threshold(probs, np.array(labels), "youden"), abs=1e-6
    )


def test_a_missing_fold_is_refused_unless_allow_partial(kfold, tmp_path):
    """The sentence of test_fuzz_ensembles.py's CLI replay (slow), on tiny folds."""
    folder = tmp_path / "sweep"
    for job in (0, 2):  # job 1 left out
        shutil.copytree(kfold / str(job), folder / str(job))
    with pytest.raises(UserError) as err:
        load_trained_model(folder)
    assert str(err.value) == (
        f"ckpt_path={folder} is not a complete k-fold ensemble: fold 1 of 3 is missing; train it "
        "again with the run's overrides (the run folder copied in as a job), or pass "
        "allow_partial=true to use the 2 fold models there are."
    )
    partial = load_trained_model(folder, allow_partial=True)
    assert len(partial.members) == 2
    assert partial.ensemble_folds["missing_folds"] == [{"fold": 1, "seed": 42}]
    assert partial.threshold_for(None)[1].startswith(
        "chosen on the out-of-fold predictions of the 2 fold models (fold 1 of 3 missing: "
        "allow_partial=true) ("
    )


def test_folds_trained_unlike_are_refused(kfold, tmp_path):
    """A job of a CLAHE run among plain folds (test_ensemble.py's CLI replay is slow)."""
    folder = shutil.copytree(kfold, tmp_path / "sweep")
    ckpt = folder / "1" / "checkpoints" / "best.ckpt"
    write_checkpoint(ckpt, preprocess=CLAHE, threshold=threshold_choice(0.5))
    with pytest.raises(UserError) as err:
        load_trained_model(folder)
    message = str(err.value)
    assert message.startswith(f"The jobs of {folder} differ in image size [64], data.preprocess ")
    assert "data.preprocess ['clahe (clip limit 2, 4x4 tiles)', 'none']" in message
    assert "an ensemble needs members trained alike" in message


# --- EnsembleModel -----------------------------------------------------------------------------


class Fixed(torch.nn.Module):
    """A member whose logits are the first pixel of each image times `scale`."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images[:, 0, 0, 0] * self.scale


def test_the_ensemble_is_the_mean_logit_divided_by_its_temperature():
    images = torch.tensor([1.0, -2.0, 4.0]).reshape(3, 1, 1, 1)
    members = [Fixed(1.0), Fixed(3.0), Fixed(-1.0)]  # logits x, 3x, -x: mean x
    torch.testing.assert_close(EnsembleModel(members)(images), torch.tensor([1.0, -2.0, 4.0]))
    calibrated = EnsembleModel(members, temperature=2.0)
    torch.testing.assert_close(calibrated(images), torch.tensor([0.5, -1.0, 2.0]))
    # Not the mean probability: one extreme member does not swamp the others.
    bold = EnsembleModel([Fixed(0.0), Fixed(20.0)])(torch.ones(1, 1, 1, 1))
    assert float(torch.sigmoid(bold)) == pytest.approx(1 / (1 + np.exp(-10.0)))
    assert COMBINATION == "mean logit"
    # The temperature is a buffer: saved with the ensemble, moved with it.
    assert "temperature" in dict(calibrated.named_buffers())


def test_the_words_for_members_and_missing_folds():
    assert describe_members(3, {"num_folds": 3, "seeds": [42], "missing_folds": []}) == (
        "3 fold models"
    )
    assert describe_members(6, {"seeds": [0, 1]}) == "6 fold models of 2 seeds"
    assert describe_members(2, None) == "2 fold models"
    assert describe_missing(None) is None
    assert describe_missing({"num_folds": 3, "seeds": [1], "missing_folds": []}) is None
    one = {"num_folds": 3, "seeds": [42], "missing_folds": [{"fold": 1, "seed": 42}]}
    assert describe_missing(one) == "fold 1 of 3 is missing"
    assert describe_missing(one, verb=False) == "fold 1 of 3"
    two = {
        "num_folds": 5,
        "seeds": [0, 1],
        "missing_folds": [{"fold": 4, "seed": 0}, {"fold": 2, "seed": 0}, {"fold": 1, "seed": 1}],
    }
    assert describe_missing(two) == (
        "folds 2 and 4 of 5 (seed 0) and fold 1 of 5 (seed 1) are missing"
    )
