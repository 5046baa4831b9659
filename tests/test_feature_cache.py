"""The frozen-feature cache: keyed, shared, atomic, self-healing, and result-neutral."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from conftest import PHANTOM_SIZE, compose_train, phantom_overrides, train_in_process
from tb_lightning.config.checks import check_data
from tb_lightning.core.errors import ConfigError
from tb_lightning.data import feature_cache
from tb_lightning.data.feature_cache import (
    FeatureCache,
    cache_blockers,
    extract_features,
    should_cache,
)
from tb_lightning.data.sources import Sample
from tb_lightning.data.transforms import build_transform
from tb_lightning.models.net import build_net
from tb_lightning.train import train
from tb_lightning.trained.runner import run_over_images


@pytest.fixture
def images(phantom_root, tmp_path) -> list[Sample]:
    """Six copies of phantom images (copies: the tests touch them)."""
    samples = []
    for label, folder in enumerate(("Normal", "Tuberculosis")):
        for src in sorted((phantom_root / folder).glob("*.png"))[:3]:
            dst = tmp_path / "images" / src.name
            dst.parent.mkdir(exist_ok=True)
            shutil.copy(src, dst)
            samples.append(Sample(str(dst), label, dst.stem, "test"))
    return samples


@pytest.fixture
def net():
    torch.manual_seed(0)
    return build_net(weights=None, image_size=PHANTOM_SIZE)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def make_cache(tmp_path, net, samples, size=PHANTOM_SIZE) -> FeatureCache:
    return FeatureCache(
        tmp_path / "cache",
        net,
        samples,
        build_transform(size),
        run_over_images=run_over_images,
        precision="fp32",
    )


def test_cache_is_fp16_matches_recompute_and_serves_subsets(tmp_path, net, images):
    cache = make_cache(tmp_path, net, images)
    table = cache.load_or_build()
    assert cache.path.is_file() and table.dtype == torch.float16
    reference = extract_features(
        net,
        cache.samples,
        build_transform(PHANTOM_SIZE),
        run_over_images=run_over_images,
        precision="fp32",
        progress=False,
    )
    # fp16 keeps ~3 significant digits: relative error of the whole table below 1e-3.
    assert relative_error(table, reference) < 1e-3
    subset = [images[4], images[0]]
    dataset = cache.dataset(subset)
    features, label = dataset[0]
    assert features.dtype == torch.float32 and label == 1
    direct = net.forward_features(
        build_transform(PHANTOM_SIZE)(
            __import__("tb_lightning.data.transforms", fromlist=["x"]).load_image(subset[0].path)
        )[None]
    )[0]
    assert relative_error(features, direct.detach()) < 1e-3
    # The net is handed back as it was: contiguous conv weights, usable for training.
    assert all(p.is_contiguous() for p in net.parameters())


def test_a_second_cache_reads_the_file_without_extracting(tmp_path, net, images, monkeypatch):
    make_cache(tmp_path, net, images).load_or_build()

    def fail(*args, **kwargs):
        raise AssertionError("extracted again")

    monkeypatch.setattr(feature_cache, "extract_features", fail)
    # Same images in another order (another split): the same file.
    table = make_cache(tmp_path, net, images[::-1]).load_or_build()
    assert len(table) == len(images)


def test_anything_that_changes_features_changes_the_key(tmp_path, net, images):
    base = make_cache(tmp_path, net, images)
    assert make_cache(tmp_path, net, images).path == base.path
    assert make_cache(tmp_path, net, images, size=96).path != base.path  # preprocessing
    assert make_cache(tmp_path, net, images[:-1]).path != base.path  # file list
    torch.manual_seed(1)
    other_weights = build_net(weights=None, image_size=PHANTOM_SIZE)
    assert make_cache(tmp_path, other_weights, images).path != base.path  # weights
    stat = os.stat(images[0].path)
    os.utime(images[0].path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert make_cache(tmp_path, net, images).path != base.path  # file contents / mtime


def test_a_damaged_cache_file_is_rebuilt(tmp_path, net, images, caplog):
    # A copy: the table maps the file, which is damaged in place below (the cache itself only
    # ever replaces files, so the maps of running jobs keep their rows).
    good = make_cache(tmp_path, net, images).load_or_build().clone()
    path = make_cache(tmp_path, net, images).path
    path.write_bytes(path.read_bytes()[:1000])  # truncated, e.g. a full disk
    with caplog.at_level(logging.WARNING):
        rebuilt = make_cache(tmp_path, net, images).load_or_build()
    assert "damaged" in caplog.text
    assert torch.equal(rebuilt, good)
    assert torch.equal(make_cache(tmp_path, net, images).load_or_build(), good)


def test_concurrent_jobs_extract_once(tmp_path, net, images, monkeypatch):
    calls = []
    real = feature_cache.extract_features

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **{**kwargs, "progress": False})

    monkeypatch.setattr(feature_cache, "extract_features", counting)
    results: list[torch.Tensor] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(make_cache(tmp_path, net, images).load_or_build())
        )
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(results) == 3
    assert all(torch.equal(r, results[0]) for r in results)
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_temporary_files_of_killed_writes_are_removed(tmp_path, net, images, caplog):
    cache = make_cache(tmp_path, net, images)
    cache.cache_dir.mkdir(parents=True)
    hour_ago = time.time() - feature_cache.STALE_TMP_SECONDS - 60

    def tmp_file(name: str, old: bool) -> Path:
        path = cache.cache_dir / name
        path.write_bytes(b"half a cache file")
        if old:
            os.utime(path, (hour_ago, hour_ago))
        return path

    # Killed writes: of this file (any age: its writer holds the lock), an old one of another
    # file, and one of the cache's former own writer; a fresh one of another file may be being
    # written by a concurrent job and stays.
    own = tmp_file(f".{cache.path.name}.k1ll3d.tmp", old=False)
    stale = tmp_file(".features-0123456789abcdef01234567.pt.x1.tmp", old=True)
    legacy = tmp_file(".features-a8b7c6.tmp", old=True)
    busy = tmp_file(".features-fedcba9876543210fedcba98.pt.y2.tmp", old=False)
    with caplog.at_level(logging.INFO):
        cache.load_or_build()
    assert "Removed 2 temporary file(s)" in caplog.text  # the stale ones, before the lock
    assert not own.exists() and not stale.exists() and not legacy.exists()
    assert busy.exists() and cache.path.is_file()
    # A run that finds its cache file also sweeps old leftovers.
    os.utime(busy, (hour_ago, hour_ago))
    make_cache(tmp_path, net, images).load_or_build()
    assert not busy.exists()


def test_cache_files_are_written_with_the_atomic_helpers(tmp_path, net, images, monkeypatch):
    from tb_lightning.core import mapped_table

    written = []
    real_target, real_write = mapped_table.atomic_target, mapped_table.atomic_write_json
    monkeypatch.setattr(
        mapped_table,
        "atomic_target",
        lambda path: (written.append(Path(path)), real_target(path))[1],
    )
    monkeypatch.setattr(
        mapped_table,
        "atomic_write_json",
        lambda path, value, **kw: (written.append(Path(path)), real_write(path, value, **kw)),
    )
    cache = make_cache(tmp_path, net, images)
    cache.load_or_build()
    # The table first, its sidecar last: a table without a sidecar is never read.
    assert written == [cache.path, cache.sidecar]
    # Shared by users and sweep jobs: the mode of a plain open(), not mkstemp's private 0600.
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(cache.path.stat().st_mode) == 0o666 & ~umask


def test_rows_stream_into_a_memory_map_and_damage_is_found(tmp_path, net, images, caplog):
    """Extraction writes batch by batch; reading maps the file (no load, no copy per split);
    a sampled row that changed on disk is found by its digest."""
    cache = make_cache(tmp_path, net, images)
    cache.batch_size = 4  # several batches
    table = cache.load_or_build().clone()
    assert isinstance(table, torch.Tensor)
    reread = make_cache(tmp_path, net, images).load_or_build()
    assert torch.equal(reread, table)
    # Rows of a split are rows of the one map: the dataset holds indices, not a copy.
    dataset = cache.dataset(images[:3])
    assert dataset.features.data_ptr() == cache.load_or_build().data_ptr()
    # A row the digest samples (the last one) changed on disk: rebuilt.
    mapped = np.load(cache.path, mmap_mode="r+")
    mapped[-1] = 7.0
    mapped.flush()
    del mapped
    with caplog.at_level(logging.WARNING):
        rebuilt = make_cache(tmp_path, net, images).load_or_build()
    assert "does not match its key" in caplog.text or "damaged" in caplog.text
    assert torch.equal(rebuilt, table)


def test_bf16_features_match_fp32(net, images):
    # bf16 has an 8-bit mantissa (~0.4% per rounding); through AlexNet's five convolutions the
    # features stay within 3% relative (Frobenius norm) of fp32.
    transform = build_transform(PHANTOM_SIZE)
    fp32, bf16 = (
        extract_features(
            net, images, transform, run_over_images=run_over_images, precision=p, progress=False
        )
        for p in ("fp32", "bf16")
    )
    assert relative_error(bf16, fp32) < 3e-2


def test_cache_mode_validation(net):
    transform = build_transform(PHANTOM_SIZE)
    assert should_cache("auto", net, transform) and should_cache(True, net, transform)
    assert not should_cache(False, net, transform)
    data = compose_train(["data.cache_features=sometimes"]).data
    with pytest.raises(ConfigError, match="data.cache_features='sometimes'"):
        check_data(data)
    augmented = v2.Compose([v2.RandomHorizontalFlip(), *transform.transforms])
    assert cache_blockers(net, augmented) and not should_cache("auto", net, augmented)
    with pytest.raises(ConfigError, match="random augmentation"):
        should_cache(True, net, augmented)
    trainable = build_net(weights=None, image_size=PHANTOM_SIZE, freeze_features=False)
    assert not should_cache("auto", trainable, transform)
    with pytest.raises(ConfigError, match="freeze_features=false"):
        should_cache(True, trainable, transform)


def test_cache_on_and_off_give_the_same_val_metrics(phantom_root, tmp_path, caplog):
    caplog.set_level("INFO")
    metrics = {}
    for mode in ("true", "false"):
        caplog.clear()
        metrics[mode] = train_in_process(
            [
                *phantom_overrides(phantom_root),
                f"data.cache_dir={tmp_path / 'cache'}",
                f"data.cache_features={mode}",
                "trainer.max_epochs=2",
            ],
            tmp_path / mode,
        )
        assert ("Cached backbone features" in caplog.text) == (mode == "true")
    # Same seed, same batches, same dropout masks: the per-epoch curves differ only by the fp16
    # storage of the features, and the best checkpoint's final figures (one pass over the
    # images, either way) agree within 1e-3 (counts-based ones exactly, on this small set).
    for key, value in metrics["false"].items():
        if key.startswith("val/") and isinstance(value, float):
            assert metrics["true"][key] == pytest.approx(value, abs=1e-3), key


def test_cache_true_with_a_trainable_backbone_is_a_clear_error(phantom_root, tmp_path):
    cfg = compose_train(
        [
            *phantom_overrides(phantom_root),
            "data.cache_features=true",
            "model.net.freeze_features=false",
        ],
        output_dir=tmp_path,
    )
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert str(err.value).startswith(
        "data.cache_features=true cannot be used because the backbone is trainable"
    )
