"""The one pass over image files (trained/runner.py): bad files marked not run, the order of the
paths kept across batches and workers, logits independent of the batch size, streaming to a
sink, and the helpers around it. Tiny networks and 64 px images, no CLI."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from data_builders import write_bad, write_png
from tb_lightning.data.transforms import BadImageError, build_transform, load_image
from tb_lightning.trained.runner import (
    INFERENCE_BATCH_SIZE,
    pick_device,
    predict_images,
    probabilities,
    problem_of,
    run_over_images,
    warn_if_upsampled,
)

SIZE = 64


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> list[str]:
    """Seven distinct 64 px images."""
    folder = tmp_path_factory.mktemp("good")
    return [str(write_png(folder / f"{i}.png", 40 + i, SIZE)) for i in range(7)]


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, str]:
    """{path: the start of its reason} for three unusable files."""
    folder = tmp_path_factory.mktemp("bad")
    return {
        str(write_bad(folder, "not_an_image")): "not an image",
        str(write_bad(folder, "truncated_png")): "truncated or corrupt PNG",
        str(write_bad(folder, "zero_byte")): "empty file",
    }


class TinyNet(torch.nn.Module):
    """A small convolutional network with batch norm and dropout (eval mode must fix both):
    one logit per image."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 5, stride=2),
            torch.nn.BatchNorm2d(4),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(2),
            torch.nn.Flatten(),
            torch.nn.Dropout(0.5),
            torch.nn.Linear(16, 1),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images).squeeze(1)


def mean_pixel(images: torch.Tensor) -> torch.Tensor:
    """A forward whose output identifies its image: the mean of its normalised pixels."""
    return images.mean(dim=(1, 2, 3))


def expected_mean_pixels(paths: list[str], preprocess=None) -> np.ndarray:
    transform = build_transform(SIZE, preprocess)
    return np.array([float(transform(load_image(p)).mean()) for p in paths])


def test_every_path_gets_its_row_in_order_and_bad_files_are_marked_not_run(good, bad):
    bad_paths = list(bad)
    # Bad files first, between and last, across batches of 3.
    paths = [bad_paths[0], *good[:3], bad_paths[1], *good[3:], bad_paths[2]]
    seen: list[int] = []

    def forward(images: torch.Tensor) -> torch.Tensor:
        seen.append(len(images))
        return mean_pixel(images)

    run = run_over_images(forward, paths, build_transform(SIZE), SIZE, batch_size=3, progress=False)
    is_bad = np.array([p in bad for p in paths])
    assert run.readable.tolist() == (~is_bad).tolist()
    assert run.outputs.shape == (len(paths),) and run.outputs.dtype == torch.float32
    assert torch.isnan(run.outputs[is_bad]).all()
    np.testing.assert_allclose(run.outputs[~is_bad].numpy(), expected_mean_pixels(good), atol=1e-6)
    for path, reason in zip(paths, run.reasons, strict=True):
        assert reason.startswith(bad[path]) if path in bad else reason == ""
    assert seen == [3, 3, 3, 1]  # batches of batch_size, the last one shorter


def test_the_order_is_kept_with_dataloader_workers(good):
    paths = [*good, *good[:2]]
    run = run_over_images(
        mean_pixel, paths, build_transform(SIZE), SIZE, batch_size=2, num_workers=2,
        progress=False,
    )  # fmt: skip
    np.testing.assert_allclose(run.outputs.numpy(), expected_mean_pixels(paths), atol=1e-6)


def test_not_tolerant_a_bad_file_stops_the_pass(good, bad):
    with pytest.raises(BadImageError) as err:
        run_over_images(
            mean_pixel, [good[0], next(iter(bad))], build_transform(SIZE), SIZE,
            tolerant=False, progress=False,
        )  # fmt: skip
    assert "not an image" in str(err.value)


def test_a_sink_gets_every_batch_with_its_first_index_and_nothing_is_kept(good, bad):
    paths = [*good[:4], next(iter(bad)), *good[4:]]
    received: dict[int, torch.Tensor] = {}
    run = run_over_images(
        lambda images: torch.stack([mean_pixel(images), -mean_pixel(images)], dim=1),
        paths, build_transform(SIZE), SIZE, batch_size=3, progress=False,
        sink=lambda start, out: received.setdefault(start, out),
    )  # fmt: skip
    assert list(received) == [0, 3, 6]
    assert [len(out) for out in received.values()] == [3, 3, 2]
    rows = torch.cat(list(received.values()))
    assert rows.shape == (len(paths), 2) and rows.dtype == torch.float32
    assert torch.isnan(rows[4]).all()  # the bad file's row, marked in the stream too
    np.testing.assert_allclose(
        np.delete(rows[:, 0].numpy(), 4), expected_mean_pixels(good), atol=1e-6
    )
    assert run.outputs.numel() == 0 and run.readable.tolist() == [p in good for p in paths]


def test_no_paths_no_rows():
    run = run_over_images(mean_pixel, [], build_transform(SIZE), SIZE, progress=False)
    assert run.outputs.numel() == 0 and run.readable.size == 0 and run.reasons == []


def test_the_logits_do_not_depend_on_the_batch_size(good, bad):
    """The same image gets the same logit alone, in a batch of 3 or of 32, a bad file beside
    it or not (eval mode: batch norm uses its running statistics, dropout is off)."""
    net = TinyNet().train()  # predict_images puts it in eval mode
    paths = [*good, next(iter(bad))]
    runs = {size: predict_images(net, paths, SIZE, size, progress=False) for size in (1, 3, 32)}
    assert not net.training
    reference = runs[INFERENCE_BATCH_SIZE].logits
    assert np.isnan(reference[-1]) and np.isfinite(reference[:-1]).all()
    for size, predictions in runs.items():
        np.testing.assert_allclose(predictions.logits, reference, atol=1e-6, err_msg=str(size))
        assert predictions.readable.tolist() == [True] * len(good) + [False]
    alone = [predict_images(net, [p], SIZE, progress=False).logits[0] for p in good[:2]]
    np.testing.assert_allclose(alone, reference[:2], atol=1e-6)
    # And they are the network's logits on the images decoded and resized as in training.
    images = torch.stack([build_transform(SIZE)(load_image(p)) for p in good])
    with torch.no_grad():
        np.testing.assert_allclose(reference[:-1], net(images).numpy(), atol=1e-5)


def test_predict_images_applies_the_preprocessing(good):
    clahe = {"name": "clahe", "clip_limit": 2.0, "tile_grid": 4}
    plain = predict_images(mean_pixel_module(), good, SIZE, progress=False)
    applied = predict_images(mean_pixel_module(), good, SIZE, progress=False, preprocess=clahe)
    np.testing.assert_allclose(applied.logits, expected_mean_pixels(good, clahe), atol=1e-6)
    np.testing.assert_allclose(plain.logits, expected_mean_pixels(good), atol=1e-6)
    assert not np.allclose(applied.logits, plain.logits)


def mean_pixel_module() -> torch.nn.Module:
    class MeanPixel(torch.nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return mean_pixel(images)

    return MeanPixel()


def test_probabilities_are_the_modules_float32_sigmoid():
    logits = np.array([-3.0, 0.0, 0.1, 12.0, np.nan])
    probs = probabilities(logits)
    assert probs.dtype == np.float64
    expected = torch.sigmoid(torch.tensor(logits, dtype=torch.float32)).double().numpy()
    np.testing.assert_array_equal(probs, expected)  # bit for bit, NaN kept
    assert probs[1] == 0.5 and np.isnan(probs[-1])


def test_problem_of_a_file(good, bad):
    for path, reason in bad.items():
        assert problem_of(path).startswith(reason)
    # A file that reads now was bad during the pass (it changed meanwhile).
    assert problem_of(good[0]) == "could not be read during the pass (it changed meanwhile)"


def test_upsampling_is_said_once_with_the_native_size(good, caplog):
    with caplog.at_level(logging.WARNING):
        assert warn_if_upsampled(good, SIZE) is None
        assert not caplog.records
        found = warn_if_upsampled(good, 160)
    assert found is not None and found["native_side"] == SIZE
    (record,) = caplog.records
    assert record.getMessage().startswith(
        "The checkpoint's image size (160 px, its data.image_size) upsamples these images 2.5x"
    )
    assert "a model trained with data.image_size=64 matches them." in record.getMessage()


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("gpu") == torch.device("cuda") == pick_device("cuda")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto") == torch.device(expected)
