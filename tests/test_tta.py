"""model.tta=hflip: the mean logit of each image and its mirror, wherever the model runs out of
training (predict, eval, the exported graph), and never while it trains."""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import torch

from data_builders import image_set, threshold_choice, tiny_classifier, write_checkpoint
from tb_lightning.config.checks import check_model
from tb_lightning.core.errors import ConfigError
from tb_lightning.data.feature_cache import cache_blockers
from tb_lightning.data.split import write_split_csv
from tb_lightning.data.transforms import build_transform, load_image
from tb_lightning.inference.deploy import export_model
from tb_lightning.inference.predict_files import run_prediction
from tb_lightning.trained.checkpoint import load_checkpoint_file


@pytest.fixture(scope="module")
def pair():
    """The same weights without and with model.tta=hflip."""
    return tiny_classifier(seed=3), tiny_classifier(seed=3, tta="hflip")


def test_hflip_is_the_mean_logit_of_the_image_and_its_mirror(pair):
    plain, flipped = pair
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = (plain(images) + plain(images.flip(-1))) / 2
        np.testing.assert_allclose(flipped(images).numpy(), expected.numpy(), atol=1e-6)
        assert not torch.allclose(plain(images), expected, atol=1e-4)  # the mirror counts
        # Training sees the images as they are (the augmentation flips them, if asked); the
        # same seed gives both the same dropout mask.
        flipped.net.train(), plain.net.train()
        try:
            torch.manual_seed(0)
            trained_with_tta = flipped.net(images)
            torch.manual_seed(0)
            np.testing.assert_allclose(
                trained_with_tta.numpy(), plain.net(images).numpy(), atol=1e-6
            )
        finally:
            flipped.net.eval(), plain.net.eval()


def test_tta_is_stored_and_reaches_predict_and_the_export(tmp_path):
    samples = image_set(tmp_path / "images", 3, 3)
    run = tmp_path / "run"
    ckpt = write_checkpoint(
        run / "checkpoints" / "best.ckpt", tta="hflip", threshold=threshold_choice(0.5)
    )
    write_split_csv(run / "split.csv", samples[::2], samples[1::2])
    loaded = load_checkpoint_file(ckpt)
    assert loaded.model.hparams["tta"] == "hflip" and loaded.model.net.tta == "hflip"
    paths = [s.path for s in samples]
    transform = build_transform(loaded.image_size)
    images = torch.stack([transform(load_image(p)) for p in paths])
    with torch.no_grad():
        plain = loaded.model.net.forward_head(loaded.model.net.forward_features(images))
        mirrored = loaded.model.net.forward_head(loaded.model.net.forward_features(images.flip(-1)))
    expected = torch.sigmoid((plain + mirrored) / 2).numpy()

    predictions = run_prediction(loaded, paths, 0.5, "test", tmp_path / "predict")
    np.testing.assert_allclose(predictions.probs, expected, atol=1e-5)

    # The flip is inside the exported graph: the file alone gives predict's p_tb.
    sidecar = export_model(loaded, "onnx", tmp_path / "export", 0.5, "test", num_check_images=2)
    session = onnxruntime.InferenceSession(str(tmp_path / "export" / sidecar["model_file"]))
    exported = session.run([sidecar["output"]["name"]], {sidecar["input"]["name"]: images.numpy()})
    np.testing.assert_allclose(exported[0], expected, atol=1e-5)
    assert sidecar["model"]["tta"] == ["hflip"]


def test_tta_turns_the_feature_cache_off(pair):
    plain, flipped = pair
    identity = build_transform(64)
    assert cache_blockers(plain.net, identity) == []
    assert cache_blockers(flipped.net, identity) == [
        "model.tta=hflip runs the backbone on mirrored images too"
    ]


def test_a_bad_model_tta_is_one_sentence():
    model = {
        "optimizer": {"lr": 1e-3},
        "net": {"arch": "alexnet", "dropout": 0.5, "hidden_dim": 8, "image_size": 128},
        "threshold": 0.5,
        "scheduler": {"name": "none"},
        "tta": "vflip",
    }
    with pytest.raises(ConfigError, match=r"^model.tta='vflip' must be null .* \['hflip'\]"):
        check_model(model)


def test_gradcam_of_a_tta_model_is_the_map_of_the_image_itself(pair):
    from tb_lightning.inference.saliency import gradcam

    plain, flipped = pair
    images = torch.randn(2, 3, 64, 64)
    maps = gradcam(flipped.net, images)
    assert maps.shape == (2, 64, 64) and flipped.net.tta == "hflip"
    np.testing.assert_allclose(maps.numpy(), gradcam(plain.net, images).numpy(), atol=1e-6)
