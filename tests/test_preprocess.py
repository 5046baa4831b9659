"""`data.preprocess=clahe`: CLAHE after the resize, stored in the checkpoint, rebuilt by eval,
predict and export from it, and part of the feature cache's key."""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose_train, phantom_overrides, run_cli
from tb_lightning.config.checks import check_config
from tb_lightning.core.artefacts import read_data_root
from tb_lightning.core.errors import ConfigError
from tb_lightning.data.feature_cache import is_deterministic
from tb_lightning.data.preprocess import CLAHE, preprocess_spec
from tb_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transform, load_image
from tb_lightning.trained.checkpoint import load_checkpoint_file

CLAHE_OVERRIDES = ["data.preprocess=clahe", "data.clahe.clip_limit=3.0", "data.clahe.tile_grid=4"]
SPEC = {"name": "clahe", "clip_limit": 3.0, "tile_grid": 4}


def low_contrast_image(seed: int = 0) -> np.ndarray:
    """A 64 x 64 gray image whose values stay within 100..130 (a dim, flat radiograph)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(100, 120, 64)[None, :] + np.linspace(0, 5, 64)[:, None]
    return np.clip(ramp + rng.normal(0, 2, (64, 64)), 0, 255).round().astype(np.uint8)


def test_clahe_is_opencvs_on_the_gray_values():
    gray = low_contrast_image()
    expected = cv2.createCLAHE(clipLimit=3.0, tileGridSize=(4, 4)).apply(gray)
    out = CLAHE(3.0, 4)(torch.from_numpy(np.repeat(gray[None], 3, axis=0)))
    assert out.dtype == torch.uint8 and out.shape == (3, 64, 64)
    for channel in out:
        np.testing.assert_array_equal(channel.numpy(), expected)
    # It widens the gray range of a flat image (what it is for).
    assert expected.std() > 1.5 * gray.std()


def test_clahe_of_a_colour_image_equalises_the_channels_mean():
    rgb = np.stack([low_contrast_image(s) for s in range(3)])
    mean = np.rint(rgb.astype(np.float32).mean(axis=0)).astype(np.uint8)
    expected = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(mean)
    out = CLAHE(2.0, 8)(torch.from_numpy(rgb))
    for channel in out:
        np.testing.assert_array_equal(channel.numpy(), expected)


def test_clahe_is_deterministic_and_named_in_the_feature_cache_key():
    plain, clahe = build_transform(64), build_transform(64, preprocess_spec(SPEC))
    assert is_deterministic(clahe)  # the feature cache may be used with it
    # The cache key holds repr(transform): another preprocessing or clip limit, another key.
    other_clip = build_transform(64, preprocess_spec({**SPEC, "clip_limit": 2.0}))
    assert len({repr(plain), repr(clahe), repr(other_clip)}) == 3
    assert "CLAHE(clip_limit=3.0, tile_grid=4)" in repr(clahe)
    assert preprocess_spec({"name": "none", "clip_limit": 2.0, "tile_grid": 8}) is None
    assert preprocess_spec(None) is None  # checkpoints written before the option


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.preprocess=histogram"], "data.preprocess='histogram' is not one of"),
        (["data.preprocess=clahe", "data.clahe.clip_limit=0"], "data.clahe.clip_limit=0 must be"),
        (["data.preprocess=clahe", "data.clahe.tile_grid=9"], "data.clahe.tile_grid=9 must be"),
    ],
)
def test_bad_preprocess_settings_are_refused(phantom_root, overrides, message):
    cfg = compose_train([*phantom_overrides(phantom_root), *overrides])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        check_config(cfg)


def test_the_classifier_takes_the_preprocessing_from_the_data_module(phantom_root):
    """data.preprocess/data.clahe are set once, under data.: the module records them at setup
    (in its hyper-parameters, hence checkpoints, and in the loggers' copy) as it always has."""
    from types import SimpleNamespace

    from hydra.utils import instantiate

    cfg = compose_train([*phantom_overrides(phantom_root), *CLAHE_OVERRIDES])
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, _recursive_=False)
    assert model.hparams["preprocess"] is None  # not a model.* key
    datamodule.setup("fit")
    model._trainer = SimpleNamespace(datamodule=datamodule)
    model.setup("fit")
    assert model.hparams["preprocess"] == SPEC == datamodule.preprocess
    assert model.hparams_initial["preprocess"] == SPEC
    assert list(model.hparams) == [
        "net",
        "optimizer",
        "threshold",
        "scheduler",
        "preprocess",
        "tta",
        "loss",
        "focal_gamma",
    ]


@pytest.fixture(scope="module")
def clahe_run(phantom_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("clahe_train")
    result = run_cli(
        "tb_lightning.train", *phantom_overrides(phantom_root), *CLAHE_OVERRIDES,
        "trainer.max_epochs=2", f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


def independent_input(path: str, size: int, clahe: bool) -> torch.Tensor:
    """The model input of one file, computed here with PIL, OpenCV and NumPy."""
    with Image.open(path) as image:
        gray = np.asarray(image.convert("L"))
    tensor = torch.from_numpy(np.repeat(gray[None], 3, axis=0))
    from torchvision.transforms import v2

    resized = v2.Resize((size, size), antialias=True)(tensor)[0].numpy()
    if clahe:
        resized = cv2.createCLAHE(clipLimit=3.0, tileGridSize=(4, 4)).apply(resized)
    scaled = np.repeat(resized[None].astype(np.float32) / 255.0, 3, axis=0)
    mean, std = np.array(IMAGENET_MEAN)[:, None, None], np.array(IMAGENET_STD)[:, None, None]
    return torch.from_numpy(((scaled - mean) / std).astype(np.float32))


@pytest.mark.slow
def test_the_checkpoint_carries_clahe_to_predict_and_export(clahe_run, phantom_root, tmp_path):
    import onnxruntime

    ckpt = clahe_run / "checkpoints" / "best.ckpt"
    loaded = load_checkpoint_file(ckpt)
    assert loaded.preprocess == SPEC
    preprocessing = "Preprocessing: clahe (clip limit 3, 4x4 tiles), stored in the checkpoint"
    assert preprocessing in (clahe_run / "report.txt").read_text()
    assert json.loads((clahe_run / "metrics.json").read_text())["preprocess"] == SPEC
    assert torch.load(ckpt, weights_only=False)["hyper_parameters"]["preprocess"] == SPEC
    # predict, with no preprocessing option on its command line, applies the stored CLAHE.
    result = run_cli(
        "tb_lightning.predict", f"ckpt_path={ckpt}", f"input={phantom_root}",
        f"hydra.run.dir={tmp_path / 'predict'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "predict" / "predictions.csv").open()))[:6]
    paths = [str(read_data_root(tmp_path / "predict") / r["path"]) for r in rows]
    with torch.no_grad():
        inputs = torch.stack([independent_input(p, 64, clahe=True) for p in paths])
        expected = torch.sigmoid(loaded.model(inputs)).numpy()
        plain = torch.stack([independent_input(p, 64, clahe=False) for p in paths])
        without = torch.sigmoid(loaded.model(plain)).numpy()
    got = np.array([float(r["p_tb"]) for r in rows])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.abs(got - without).max() > 1e-4  # the CLAHE made a difference
    # The independent input is the project's transform, pixel for pixel after rounding.
    ours = build_transform(64, SPEC)(load_image(paths[0]))
    assert torch.allclose(ours, independent_input(paths[0], 64, clahe=True), atol=1e-5)

    # export: the exported graph takes the CLAHE'd input; model.json says so.
    out = tmp_path / "export"
    result = run_cli("tb_lightning.export", f"ckpt_path={ckpt}", f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sidecar = json.loads((out / "model.json").read_text())
    assert sidecar["preprocessing"]["preprocess"] == SPEC
    assert any("cv2.createCLAHE(clipLimit=3.0" in s for s in sidecar["preprocessing"]["steps"])
    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    onnx_p = session.run(["p_tb"], {"image": inputs.numpy()})[0]
    np.testing.assert_allclose(onnx_p, got, atol=1e-5)
