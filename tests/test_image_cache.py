"""The decoded-image cache (data.cache_images): the same tensors as the files, and a fine-tuning
run that reads it trains exactly as one that decodes the files."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from conftest import PHANTOM_SIZE, phantom_overrides, train_in_process
from tb_lightning.data.augment import build_train_transform
from tb_lightning.data.dataset import ImageDataset
from tb_lightning.data.image_cache import ImageCache
from tb_lightning.data.sources import Sample
from tb_lightning.data.transforms import build_transform


@pytest.fixture
def samples(phantom_root) -> list[Sample]:
    paths = sorted(phantom_root.rglob("*.png"))[:10]
    return [Sample(str(p), int("Tuberculosis" in p.parent.name), p.stem, "phantom") for p in paths]


def test_cached_images_equal_the_decoded_files(tmp_path, samples, caplog):
    cache = ImageCache(tmp_path / "images", samples, PHANTOM_SIZE, batch_size=4)
    table = cache.load_or_build()
    assert table.dtype == np.uint8 and table.shape == (10, 3, PHANTOM_SIZE, PHANTOM_SIZE)
    transform = build_transform(PHANTOM_SIZE)
    subset = samples[3:7][::-1]
    cached = cache.dataset(subset, transform)
    files = ImageDataset([s.path for s in subset], [s.label for s in subset], transform)
    for i in range(len(subset)):
        assert torch.equal(cached[i][0], files[i][0]) and cached[i][1] == files[i][1]
    # Random augmentation runs on the cached tensor as on the decoded file: same draws, same
    # output.
    augment = build_train_transform(PHANTOM_SIZE, {"horizontal_flip": True, "translate": 0.05})
    cached, files = (
        cache.dataset(subset, augment),
        ImageDataset([s.path for s in subset], None, augment),
    )
    torch.manual_seed(3)
    a = cached[0][0]
    torch.manual_seed(3)
    assert torch.equal(a, files[0][0])
    # A second cache reads the file; the map is shared, nothing is copied per split.
    with caplog.at_level(logging.INFO):
        again = ImageCache(tmp_path / "images", samples[::-1], PHANTOM_SIZE).load_or_build()
    assert "Loaded cached decoded images of 10 images" in caplog.text
    assert np.array_equal(again, table)


def test_fine_tuning_with_the_image_cache_trains_as_without(phantom_root, tmp_path):
    """Same seed, same images, same augmentation draws: the same weights and figures."""
    common = [
        *phantom_overrides(phantom_root),
        "model.net.freeze_features=false",
        "data/augment=cxr",  # random crops, rotation, contrast: drawn in the workers' transforms
        "trainer.max_epochs=1",
        "callbacks.model_checkpoint=null",
    ]
    plain = train_in_process(common, tmp_path / "plain")
    cached = train_in_process(
        [*common, "data.cache_images=true", f"data.image_cache_dir={tmp_path / 'images'}"],
        tmp_path / "cached",
    )
    assert list((tmp_path / "images").glob("images-*.npy"))
    for key in ("val/loss", "val/auroc"):
        assert cached[key] == pytest.approx(plain[key], abs=1e-6), key
    stored = json.loads((tmp_path / "cached" / "metrics.json").read_text())
    assert stored["val/loss"] == cached["val/loss"]
