from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import make_datamodule
from tb_lightning.core.errors import DataError
from tb_lightning.data.transforms import load_image


def make_tree(root: Path, n_normal: int = 8, n_tb: int = 4, names=("Normal", "Tuberculosis")):
    """A class-folder tree with mixed formats: grayscale PNG, RGB JPEG, upper-case suffixes."""
    rng = np.random.default_rng(0)
    for name, n in zip(names, (n_normal, n_tb), strict=True):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(n):
            size = 80 + 10 * i
            pixels = rng.integers(0, 255, (size, size), dtype=np.uint8)
            if i % 3 == 0:
                Image.fromarray(pixels, "L").save(folder / f"{name}-{i}.png")
            elif i % 3 == 1:
                Image.fromarray(np.stack([pixels] * 3, -1), "RGB").save(folder / f"{name}-{i}.JPG")
            else:
                Image.fromarray(pixels, "L").save(folder / f"{name}-{i}.jpeg")
        (folder / ".DS_Store").write_bytes(b"junk")  # hidden files are ignored
        (folder / "notes.txt").write_text("not an image")  # other extensions too
    return root


def test_folder_tree_split_and_class_weights(tmp_path):
    make_tree(tmp_path / "db", n_normal=30, n_tb=10)
    dm = make_datamodule(
        source="tb_cxr",
        root=str(tmp_path / "db"),
        image_size=64,
        batch_size=4,
        val_size=8,
        num_workers=0,
    )
    dm.setup("fit")
    assert dm.class_counts("train") == [24, 8]
    assert dm.class_counts("val") == [6, 2]
    assert dm.pos_weight == pytest.approx(24 / 8)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 64, 64) and images.dtype == torch.float32
    assert set(labels.tolist()) <= {0, 1}


def test_split_file_reproduces_the_split(tmp_path):
    make_tree(tmp_path / "db", n_normal=20, n_tb=10)
    kwargs = dict(root=str(tmp_path / "db"), image_size=64, val_size=0.3, num_workers=0)
    first = make_datamodule(split_seed=1, **kwargs)
    first.setup()
    first.write_split(tmp_path / "split.csv")
    again = make_datamodule(split_seed=999, split_file=str(tmp_path / "split.csv"), **kwargs)
    again.setup()
    assert again.train_samples == first.train_samples
    assert again.val_samples == first.val_samples
    other = make_datamodule(split_seed=2, **kwargs)
    other.setup()
    assert other.val_samples != first.val_samples


def test_custom_class_names(tmp_path):
    make_tree(tmp_path / "db", names=("healthy", "tb"))
    dm = make_datamodule(
        source="folder",
        root=str(tmp_path / "db"),
        class_names=["healthy", "tb"],
        image_size=64,
        val_size=4,
        num_workers=0,
    )
    dm.setup()
    assert dm.class_counts("train") + dm.class_counts("val") != [0, 0]


def test_grayscale_and_rgb_decode_to_three_channels(tmp_path):
    make_tree(tmp_path / "db", n_normal=3, n_tb=3)
    for path in (tmp_path / "db").rglob("*-*.*"):
        image = load_image(path)
        assert image.shape[0] == 3 and image.dtype == torch.uint8


def test_missing_root_names_path_and_fixes(tmp_path):
    dm = make_datamodule(root=str(tmp_path / "nowhere"), num_workers=0)
    with pytest.raises(DataError) as err:
        dm.setup()
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message
    assert "kaggle.com" in message and "data=phantom" in message


def test_missing_class_folder(tmp_path):
    (tmp_path / "db" / "Normal").mkdir(parents=True)
    with pytest.raises(DataError, match="no class folder 'Tuberculosis/'"):
        make_datamodule(root=str(tmp_path / "db"), num_workers=0).setup()


def test_empty_class_folder(tmp_path):
    make_tree(tmp_path / "db")
    for f in (tmp_path / "db" / "Tuberculosis").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="holds no .png/.jpg/.jpeg images"):
        make_datamodule(root=str(tmp_path / "db"), num_workers=0).setup()


def test_unreadable_image_is_named_at_scan_time(tmp_path):
    make_tree(tmp_path / "db")
    bad = tmp_path / "db" / "Normal" / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="broken.png"):
        make_datamodule(root=str(tmp_path / "db"), num_workers=0).setup()


def test_phantom_source(phantom_root):
    from conftest import PHANTOM_NORMAL, PHANTOM_SIZE, PHANTOM_TB

    dm = make_datamodule(
        source="phantom",
        root=str(phantom_root),
        image_size=PHANTOM_SIZE,
        val_size=12,
        num_workers=0,
        phantom={
            "num_normal": PHANTOM_NORMAL,
            "num_tb": PHANTOM_TB,
            "image_size": PHANTOM_SIZE,
            "progress": False,
        },
    )
    dm.prepare_data()
    dm.setup()
    assert (
        sum(dm.class_counts("train")) + sum(dm.class_counts("val")) == PHANTOM_NORMAL + PHANTOM_TB
    )
    assert dm.class_counts("val") == [8, 4]


def test_upsampling_factor_from_the_median_shorter_side():
    from tb_lightning.data.inventory import describe_upsampling, upsampling

    # Shorter sides 100, 128, 128, 128, 3000: the median (128) speaks for the set, not the odd
    # large file nor the small one.
    sizes = [(100, 120), (128, 128), (128, 140), (150, 128), (3000, 3200)]
    found = upsampling(512, sizes)
    assert found == {
        "factor": 4.0,
        "image_size": 512,
        "native_side": 128,
        "native_width": 128,
        "native_height": 128,
        "statistic": "median over 5 images of the shorter side",
    }
    assert describe_upsampling(found, "data.image_size=512", "data.image_size=128 fits.") == (
        "data.image_size=512 upsamples these images 4.0x (native 128x128 px, median): 16x the "
        "pixels to compute and no detail gained; data.image_size=128 fits."
    )
    assert upsampling(256, sizes) is None  # exactly 2x is the usual slack: nothing to say
    assert upsampling(257, sizes)["factor"] == pytest.approx(257 / 128, abs=0.01)
    assert upsampling(64, sizes) is None  # downsampling
    assert upsampling(512, []) is None
    assert upsampling(512, [(600, 100)])["factor"] == pytest.approx(5.12)  # the shorter side
