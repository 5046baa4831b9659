"""The synthetic phantom generator: determinism, the on-disk set, a learnability sanity check."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tb_lightning.core.errors import DataError
from tb_lightning.data import phantom
from tb_lightning.data.phantom import (
    CLASS_NAMES,
    PHANTOM_VERSION,
    ensure_phantom_dataset,
    phantom_path,
    render_phantom,
)

SIZE = 64  # smallest allowed size keeps the on-disk tests fast


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "L"
        return np.asarray(im)


def _mtimes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns
        for name in CLASS_NAMES
        for p in (root / name).glob("*.png")
    }


def _without_lesions(monkeypatch) -> None:
    """Render TB phantoms with their lesions drawn (same random stream) but not painted."""
    draw = phantom._sample_lesions

    def no_lesions(rng, pt, lesions="mixed"):
        draw(rng, pt, lesions)
        return []

    monkeypatch.setattr(phantom, "_sample_lesions", no_lesions)


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney form of the AUROC (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


# --------------------------------------------------------------------------------------------
# render_phantom
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [128, 512])
def test_render_shape_dtype_and_determinism(size):
    a = render_phantom(3, 1, seed=0, image_size=size)
    assert a.shape == (size, size) and a.dtype == np.uint8
    assert np.array_equal(a, render_phantom(3, 1, seed=0, image_size=size))
    assert not np.array_equal(a, render_phantom(4, 1, seed=0, image_size=size))
    assert not np.array_equal(a, render_phantom(3, 0, seed=0, image_size=size))
    assert not np.array_equal(a, render_phantom(3, 1, seed=1, image_size=size))
    assert a.min() < 80 and a.max() > 180  # dark air outside, bright mediastinum/abdomen


def test_sizes_show_the_same_patient():
    big = render_phantom(5, 1, image_size=512).astype(np.float32)
    small = render_phantom(5, 1, image_size=128).astype(np.float32)
    pooled = big.reshape(128, 4, 128, 4).mean(axis=(1, 3))
    assert np.corrcoef(pooled.ravel(), small.ravel())[0, 1] > 0.95


def test_chest_layout():
    """Dark lungs either side of a bright mediastinum, bright below the diaphragm."""
    imgs = np.stack([render_phantom(i, 0, image_size=128) for i in range(1, 9)])
    img = imgs.astype(np.float32).mean(axis=0)
    lungs = (img[40:70, 25:45].mean() + img[40:70, 83:103].mean()) / 2
    mediastinum = img[40:70, 60:68].mean()
    abdomen = img[112:124, 30:98].mean()
    assert lungs + 40 < mediastinum and lungs + 40 < abdomen


def test_invalid_label():
    with pytest.raises(ValueError, match="label"):
        render_phantom(1, 2)


@pytest.fixture(scope="module")
def small_set() -> tuple[np.ndarray, np.ndarray]:
    """60 Normal then 60 TB phantoms at 128 px, as float32, with their labels."""
    n = 60
    imgs = np.stack([render_phantom(i, lab, image_size=128) for lab in (0, 1) for i in range(n)])
    return imgs.astype(np.float32), np.repeat([0, 1], n)


def test_mean_intensity_alone_separates_classes_poorly(small_set):
    imgs, labels = small_set
    assert _auroc(imgs.mean(axis=(1, 2)), labels) < 0.75


def _lesion_peaks(monkeypatch, lesions: str, n: int = 40, size: int = 128):
    """Per TB phantom: the largest grey-level change its lesions make, and the share of the
    changed pixels that lie inside the thorax."""
    with_lesions = [
        render_phantom(i, 1, image_size=size, lesions=lesions).astype(np.int16) for i in range(n)
    ]
    with monkeypatch.context() as patch:
        _without_lesions(patch)
        without = [
            render_phantom(i, 1, image_size=size, lesions=lesions).astype(np.int16)
            for i in range(n)
        ]
    peaks, in_chest = [], []
    for a, b in zip(with_lesions, without, strict=True):
        diff = a - b
        assert diff.min() >= -2  # lesions only add density (rounding aside)
        peaks.append(diff.max())
        changed = np.argwhere(diff > 4)
        if len(changed):  # within the thorax, not the neck or abdomen
            rows, cols = changed[:, 0] / size, changed[:, 1] / size
            in_chest.append(np.mean((rows > 0.05) & (rows < 0.85) & (cols > 0.05) & (cols < 0.95)))
    return np.array(peaks), in_chest


def test_lesions_range_from_subtle_to_obvious(monkeypatch):
    """Render each TB phantom with and without its lesions: the only difference is the lesion,
    it lies in the lung fields, and its contrast varies widely from case to case."""
    peaks, in_chest = _lesion_peaks(monkeypatch, "mixed")
    assert (peaks > 4).mean() > 0.8  # nearly every TB case has a finding ...
    assert np.percentile(peaks, 10) < 30 and np.percentile(peaks, 90) > 60  # subtle to obvious
    assert np.mean(in_chest) > 0.95


def test_conspicuous_lesions_are_the_same_findings_drawn_stronger(monkeypatch):
    """data.phantom.lesions=conspicuous (the quickstart): the same anatomy, findings in the
    lungs, and no subtle ones left."""
    mixed, _ = _lesion_peaks(monkeypatch, "mixed")
    bold, in_chest = _lesion_peaks(monkeypatch, "conspicuous")
    assert (bold > 4).all() and np.median(bold) > np.median(mixed) + 15
    assert np.percentile(bold, 10) > np.percentile(mixed, 10)
    assert np.mean(in_chest) > 0.95
    # Normal phantoms do not depend on the setting.
    assert (render_phantom(3, 0, lesions="conspicuous") == render_phantom(3, 0)).all()


def test_lesion_statistic_differs_between_classes(small_set):
    """Loose sanity check: upper-zone opacities (the commonest finding) lift the upper lung
    zones relative to the mid zones, normalised by the image's own grey-level range."""
    imgs, labels = small_set

    def lung_zone(rows: slice) -> np.ndarray:
        both = np.concatenate([imgs[:, rows, 19:51], imgs[:, rows, 77:109]], axis=2)
        return both.reshape(len(imgs), -1)

    flat = imgs.reshape(len(imgs), -1)
    spread = np.percentile(flat, 99, axis=1) - np.percentile(flat, 1, axis=1)
    upper, mid = lung_zone(slice(19, 51)), lung_zone(slice(51, 77))
    stat = (np.median(upper, axis=1) - np.median(mid, axis=1)) / spread
    assert _auroc(stat, labels) > 0.6


# --------------------------------------------------------------------------------------------
# ensure_phantom_dataset
# --------------------------------------------------------------------------------------------


def test_layout_names_order_and_contents(tmp_path):
    root = tmp_path / "ph"
    items = ensure_phantom_dataset(root, 3, 2, image_size=SIZE, progress=False)
    expected = [root / "Normal" / f"Normal-{i}.png" for i in (1, 2, 3)]
    expected += [root / "Tuberculosis" / f"Tuberculosis-{i}.png" for i in (1, 2)]
    assert [p for p, _ in items] == expected
    assert [label for _, label in items] == [0, 0, 0, 1, 1]
    assert phantom_path(root, 1, 2) == root / "Tuberculosis" / "Tuberculosis-2.png"
    for path, label in items:
        index = int(path.stem.split("-")[1])
        assert np.array_equal(_read(path), render_phantom(index, label, 0, SIZE))
    meta = json.loads((root / "phantom.json").read_text())
    assert {k: meta[k] for k in ("version", "seed", "image_size")} == {
        "version": PHANTOM_VERSION,
        "seed": 0,
        "image_size": SIZE,
    }
    assert "not medical data" in meta["note"]
    assert not list(root.rglob("*.tmp"))


def test_second_call_generates_nothing(tmp_path, caplog):
    ensure_phantom_dataset(tmp_path, 2, 2, image_size=SIZE, progress=False)
    before = _mtimes(tmp_path)
    json_mtime = (tmp_path / "phantom.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger=phantom.__name__):
        ensure_phantom_dataset(tmp_path, 2, 2, image_size=SIZE, progress=False)
    assert _mtimes(tmp_path) == before
    assert (tmp_path / "phantom.json").stat().st_mtime_ns == json_mtime
    assert "Generated" not in caplog.text


def test_growth_adds_only_missing_and_smaller_request_is_a_subset(tmp_path, caplog):
    ensure_phantom_dataset(tmp_path, 2, 1, image_size=SIZE, progress=False)
    before = _mtimes(tmp_path)
    with caplog.at_level(logging.INFO, logger=phantom.__name__):
        items = ensure_phantom_dataset(tmp_path, 4, 3, image_size=SIZE, progress=False)
    assert len(items) == 7
    after = _mtimes(tmp_path)
    assert {k: after[k] for k in before} == before
    assert len(after) == 7
    assert "Generated 4 synthetic" in caplog.text and str(tmp_path) in caplog.text

    subset = ensure_phantom_dataset(tmp_path, 1, 1, image_size=SIZE, progress=False)
    assert subset == [(phantom_path(tmp_path, 0, 1), 0), (phantom_path(tmp_path, 1, 1), 1)]
    assert _mtimes(tmp_path) == after  # higher indices are kept for later


def test_settings_change_regenerates(tmp_path):
    ensure_phantom_dataset(tmp_path, 3, 2, image_size=SIZE, seed=0, progress=False)
    keep = tmp_path / "Normal" / "notes.txt"  # not ours: must survive
    keep.write_text("user file")
    items = ensure_phantom_dataset(tmp_path, 1, 1, image_size=SIZE, seed=1, progress=False)
    for path, label in items:
        assert np.array_equal(_read(path), render_phantom(1, label, 1, SIZE))
    assert _mtimes(tmp_path).keys() == {"Normal/Normal-1.png", "Tuberculosis/Tuberculosis-1.png"}
    assert keep.read_text() == "user file"
    assert json.loads((tmp_path / "phantom.json").read_text())["seed"] == 1

    items = ensure_phantom_dataset(tmp_path, 1, 1, image_size=SIZE + 32, seed=1, progress=False)
    assert _read(items[0][0]).shape == (SIZE + 32, SIZE + 32)


def test_corrupt_json_regenerates(tmp_path):
    ensure_phantom_dataset(tmp_path, 1, 1, image_size=SIZE, progress=False)
    (tmp_path / "phantom.json").write_text("{not json")
    items = ensure_phantom_dataset(tmp_path, 1, 1, image_size=SIZE, progress=False)
    assert json.loads((tmp_path / "phantom.json").read_text())["image_size"] == SIZE
    assert all(p.is_file() for p, _ in items)


def test_partial_set_is_completed(tmp_path):
    items = ensure_phantom_dataset(tmp_path, 3, 2, image_size=SIZE, progress=False)
    missing = items[1][0]
    missing.unlink()
    before = _mtimes(tmp_path)
    ensure_phantom_dataset(tmp_path, 3, 2, image_size=SIZE, progress=False)
    after = _mtimes(tmp_path)
    assert {k: after[k] for k in before} == before
    assert np.array_equal(_read(missing), render_phantom(2, 0, 0, SIZE))


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ensure_phantom_dataset(tmp_path, 1, 1, image_size=SIZE, progress=False)
    assert not list(tmp_path.rglob("*.png")) and not list(tmp_path.rglob("*.tmp"))
    monkeypatch.undo()
    items = ensure_phantom_dataset(tmp_path, 1, 1, image_size=SIZE, progress=False)
    assert all(_read(p).shape == (SIZE, SIZE) for p, _ in items)


def test_refuses_to_touch_what_may_be_the_real_dataset(tmp_path):
    (tmp_path / "Normal").mkdir()
    real = tmp_path / "Normal" / "Normal-1.png"
    real.write_bytes(b"real image")
    with pytest.raises(DataError, match="data.root"):
        ensure_phantom_dataset(tmp_path, 1, 1, image_size=SIZE, progress=False)
    assert real.read_bytes() == b"real image"
    assert not (tmp_path / "phantom.json").exists()


def test_parallel_generation_matches_serial(tmp_path):
    serial = ensure_phantom_dataset(tmp_path / "a", 3, 3, image_size=SIZE, progress=False)
    parallel = ensure_phantom_dataset(
        tmp_path / "b", 3, 3, image_size=SIZE, progress=False, workers=2
    )
    for (pa, la), (pb, lb) in zip(serial, parallel, strict=True):
        assert la == lb and pa.name == pb.name
        assert np.array_equal(_read(pa), _read(pb))


def test_progress_bar(tmp_path, capsys, monkeypatch):
    # At a terminal, rich's bar; elsewhere log lines (tests/test_progress.py).
    monkeypatch.setattr("tb_lightning.core.progress.interactive", lambda: True)
    ensure_phantom_dataset(tmp_path, 2, 1, image_size=SIZE, progress=True)
    assert "Generating phantom CXR images" in capsys.readouterr().out
