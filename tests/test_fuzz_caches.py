"""Fuzz suite, caches: each attack on a cache file is replayed and must be caught on the next run.

The attack that got through before block checksums: rows of `features-*.npy` (or of the
decoded-image cache) overwritten where the sidecar's digest of 256 sampled rows did not look;
the next runs loaded them silently and trained on garbage. Now every row is in a checksummed
block (core/mapped_table.py): a damaged row, wherever it lies, makes its block fail at load, and
the cache is rebuilt (one warning naming the file and the block) with the rows it had.
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import PHANTOM_SIZE, phantom_overrides, train_in_process
from tb_lightning.core import mapped_table
from tb_lightning.core.mapped_table import BlockChecksums, MappedTable
from tb_lightning.data.feature_cache import FeatureCache
from tb_lightning.data.image_cache import ImageCache
from tb_lightning.data.sources import Sample
from tb_lightning.data.transforms import build_transform
from tb_lightning.models.net import build_net
from tb_lightning.trained.runner import run_over_images

# Attacks on what the project writes: with the slow tests (make test-slow, CI), not in make test.
pytestmark = pytest.mark.slow

# Small tables: 10 rows in blocks of 4, so blocks 0 and 1 are whole and block 2 (rows 8-9) is
# partial. The attacked rows: the first row, a row of the middle block, the last row of the
# partial last block.
ROWS, BLOCK = 10, 4
ATTACKED_ROWS = [0, 5, 9]


def original_rows() -> np.ndarray:
    return np.arange(ROWS * 6, dtype=np.float32).reshape(ROWS, 2, 3) / 7


def filler(rows: np.ndarray, batch: int = 3, calls: list | None = None, reverse: bool = False):
    """fill(write): the rows in batches of `batch` (3 straddles the blocks of 4)."""

    def fill(write) -> None:
        if calls is not None:
            calls.append(1)
        starts = list(range(0, len(rows), batch))
        for start in reversed(starts) if reverse else starts:
            write(start, rows[start : start + batch])

    return fill


def table_at(folder: Path, block_rows: int | None = BLOCK) -> MappedTable:
    paths = [f"image-{i}.png" for i in range(ROWS)]
    return MappedTable(folder, "rows", "k" * 64, paths, np.float32, "test rows", block_rows)


def damage(path: Path, row: int, how: str, rng: np.random.Generator) -> None:
    """Change row `row` of the .npy file in place, as a user's (or a disk's) write would."""
    mapped = np.load(path, mmap_mode="r+")
    raw = mapped.view(np.uint8).reshape(len(mapped), -1)
    if how == "row":  # the whole row overwritten with other values
        raw[row] = rng.integers(0, 256, raw.shape[1], dtype=np.uint8)
        if np.array_equal(raw[row], np.zeros_like(raw[row])):  # pragma: no cover
            raw[row, 0] = 1
    else:  # one bit of the row flipped
        raw[row, rng.integers(raw.shape[1])] ^= np.uint8(1 << int(rng.integers(8)))
    mapped.flush()
    del mapped, raw


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The caches' warnings (not, e.g., the one about a random-init backbone)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name == mapped_table.__name__
    ]


@pytest.mark.parametrize("how", ["row", "bit"])
@pytest.mark.parametrize("row", ATTACKED_ROWS)
def test_a_damaged_row_anywhere_fails_its_block_and_the_table_is_rebuilt(
    tmp_path, caplog, row, how
):
    rows, calls = original_rows(), []
    table = table_at(tmp_path).load_or_build(filler(rows, calls=calls))
    assert np.array_equal(table, rows) and len(calls) == 1
    stored = json.loads(table_at(tmp_path).sidecar.read_text())["checksums"]
    assert stored["block_rows"] == BLOCK and len(stored["crc32"]) == 3  # 4 + 4 + 2 rows
    del table
    damage(table_at(tmp_path).path, row, how, np.random.default_rng(row))
    with caplog.at_level(logging.INFO):
        rebuilt = table_at(tmp_path).load_or_build(filler(rows, calls=calls))
    # One warning, naming the file and the block (and its rows); the table is built again.
    block = row // BLOCK
    first, last = block * BLOCK, min((block + 1) * BLOCK, ROWS) - 1
    (warning,) = warnings(caplog)
    assert str(table_at(tmp_path).path) in warning
    assert f"1 of its 3 blocks of {BLOCK} rows" in warning
    assert f"block {block} (rows {first}-{last})" in warning
    assert len(calls) == 2 and np.array_equal(rebuilt, rows)
    # The rebuilt table passes the check: read, not built again.
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = table_at(tmp_path).load_or_build(filler(rows, calls=calls))
    assert len(calls) == 2 and np.array_equal(again, rows) and not warnings(caplog)
    assert "every row checked: 3 block(s)" in caplog.text


@pytest.mark.parametrize("chunk", [5, 24, 1 << 20])
def test_the_check_reads_in_chunks_and_still_finds_every_row(tmp_path, monkeypatch, chunk):
    """The verification reads READ_CHUNK bytes at a time (its memory): chunks that end inside
    a row or a block give the same checksums."""
    monkeypatch.setattr(mapped_table, "READ_CHUNK", chunk)
    rows = original_rows()
    table_at(tmp_path).load_or_build(filler(rows))
    for row in range(ROWS):
        table = table_at(tmp_path)
        assert table.read() is not None
        damage(table.path, row, "bit", np.random.default_rng(row))
        assert table.read() is None, row
        table.path.unlink()
        table.load_or_build(filler(rows))


@pytest.mark.parametrize("batch", [1, 3, 4, 7, ROWS])
def test_checksums_are_those_of_the_blocks_whatever_the_batches(tmp_path, batch):
    rows = original_rows()
    table_at(tmp_path).load_or_build(filler(rows, batch=batch))
    stored = json.loads(table_at(tmp_path).sidecar.read_text())["checksums"]["crc32"]
    expected = [zlib.crc32(rows[i : i + BLOCK].tobytes()) for i in range(0, ROWS, BLOCK)]
    assert stored == expected
    checksums = BlockChecksums(BLOCK)
    for start in range(0, ROWS, batch):
        checksums.update(rows[start : start + batch])
    assert checksums.finish() == expected


def test_checksums_are_computed_as_rows_are_written_not_in_a_second_pass(tmp_path, monkeypatch):
    """In-order writes (every fill today) are checksummed as they go: the build never reads
    the file back. A fill that writes out of order gets its checksums from one pass."""

    def no_pass(*args, **kwargs):
        raise AssertionError("the build read the file back")

    rows = original_rows()
    with monkeypatch.context() as patch:
        patch.setattr(mapped_table, "file_block_crcs", no_pass)
        built = table_at(tmp_path).load_or_build(filler(rows))
    assert np.array_equal(built, rows)
    assert table_at(tmp_path).read() is not None  # and the checksums are right
    out_of_order = tmp_path / "reversed"
    assert np.array_equal(table_at(out_of_order).load_or_build(filler(rows, reverse=True)), rows)
    sidecar = json.loads(table_at(out_of_order).sidecar.read_text())
    assert sidecar["checksums"] == json.loads(table_at(tmp_path).sidecar.read_text())["checksums"]
    damage(table_at(out_of_order).path, 9, "bit", np.random.default_rng(0))
    assert table_at(out_of_order).read() is None


def old_sidecar(table: MappedTable) -> None:
    """The sidecar as the code before block checksums wrote it: a digest of sampled rows."""
    data = np.load(table.path, mmap_mode="r")
    picks = np.unique(np.linspace(0, len(data) - 1, min(256, len(data))).astype(int))
    digest = __import__("hashlib").sha256(np.ascontiguousarray(data[picks]).tobytes())
    sidecar = {"key": table.key, "paths": table.paths, "rows_digest": digest.hexdigest()}
    table.sidecar.write_text(json.dumps(sidecar))


@pytest.mark.parametrize("damaged", [False, True])
def test_a_table_written_without_block_checksums_is_not_trusted(tmp_path, caplog, damaged):
    rows, calls = original_rows(), []
    table_at(tmp_path).load_or_build(filler(rows, calls=calls))
    old_sidecar(table_at(tmp_path))
    if damaged:
        damage(table_at(tmp_path).path, 5, "row", np.random.default_rng(0))
    with caplog.at_level(logging.WARNING):
        rebuilt = table_at(tmp_path).load_or_build(filler(rows, calls=calls))
    (warning,) = warnings(caplog)
    assert "without block checksums" in warning and str(table_at(tmp_path).path) in warning
    assert len(calls) == 2 and np.array_equal(rebuilt, rows)
    # Rebuilt once, with checksums: the next run reads it.
    assert "checksums" in json.loads(table_at(tmp_path).sidecar.read_text())
    table_at(tmp_path).load_or_build(filler(rows, calls=calls))
    assert len(calls) == 2


@pytest.mark.parametrize(
    "tamper",
    [
        lambda c: c["crc32"].pop(),  # a block without its checksum
        lambda c: c["crc32"].append(0),  # a checksum without its block
        lambda c: c.update(block_rows=0),
        lambda c: c.update(algorithm="md5"),
        lambda c: c["crc32"].__setitem__(1, c["crc32"][1] ^ 1),  # a wrong checksum
    ],
)
def test_a_damaged_checksum_list_is_not_trusted(tmp_path, caplog, tamper):
    rows, calls = original_rows(), []
    table = table_at(tmp_path)
    table.load_or_build(filler(rows, calls=calls))
    sidecar = json.loads(table.sidecar.read_text())
    tamper(sidecar["checksums"])
    table.sidecar.write_text(json.dumps(sidecar))
    with caplog.at_level(logging.WARNING):
        rebuilt = table_at(tmp_path).load_or_build(filler(rows, calls=calls))
    assert len(warnings(caplog)) == 1 and "damaged" in warnings(caplog)[0]
    assert len(calls) == 2 and np.array_equal(rebuilt, rows)


def test_the_block_size_of_the_sidecar_is_used(tmp_path):
    """A table is checked with the block size it was written with: another BLOCK_ROWS later
    reads it as it is, and still finds a damaged row."""
    rows = original_rows()
    table_at(tmp_path, block_rows=3).load_or_build(filler(rows))
    assert table_at(tmp_path, block_rows=None).read() is not None
    damage(table_at(tmp_path).path, 9, "bit", np.random.default_rng(0))
    assert table_at(tmp_path, block_rows=None).read() is None


# The two caches, attacked through their own classes (blocks of 4 rows over 10 phantoms).


@pytest.fixture
def samples(phantom_root) -> list[Sample]:
    paths = sorted(phantom_root.rglob("*.png"))[:ROWS]
    return [Sample(str(p), int("Tuberculosis" in p.parent.name), p.stem, "phantom") for p in paths]


def feature_cache(folder: Path, samples: list[Sample]) -> FeatureCache:
    torch.manual_seed(0)
    net = build_net(weights=None, image_size=PHANTOM_SIZE)
    return FeatureCache(
        folder,
        net,
        samples,
        build_transform(PHANTOM_SIZE),
        run_over_images=run_over_images,
        precision="fp32",
    )


def read_features(folder: Path, samples: list[Sample]) -> np.ndarray:
    return feature_cache(folder, samples).load_or_build().numpy().copy()


def read_images(folder: Path, samples: list[Sample]) -> np.ndarray:
    return np.array(ImageCache(folder, samples, PHANTOM_SIZE, batch_size=3).load_or_build())


@pytest.mark.parametrize("row", ATTACKED_ROWS)
@pytest.mark.parametrize(("read", "prefix"), [(read_features, "features"), (read_images, "images")])
def test_an_overwritten_row_of_either_cache_is_rebuilt(
    tmp_path, samples, monkeypatch, caplog, read, prefix, row
):
    monkeypatch.setattr(mapped_table, "BLOCK_ROWS", BLOCK)
    good = read(tmp_path, samples)
    (path,) = tmp_path.glob(f"{prefix}-*.npy")
    damage(path, row, "row", np.random.default_rng(row))
    with caplog.at_level(logging.INFO):
        rebuilt = read(tmp_path, samples)
    (warning,) = warnings(caplog)
    assert str(path) in warning and f"block {row // BLOCK} " in warning
    assert "Cached " in caplog.text  # built again, not loaded
    assert np.array_equal(rebuilt, good)


def test_a_cache_written_without_block_checksums_is_rebuilt(tmp_path, samples, caplog):
    good = read_features(tmp_path, samples)
    cache = feature_cache(tmp_path, samples)
    old_sidecar(cache.table)
    with caplog.at_level(logging.WARNING):
        rebuilt = read_features(tmp_path, samples)
    assert "without block checksums" in caplog.text and str(cache.path) in caplog.text
    assert np.array_equal(rebuilt, good)


def test_training_re_verifies_the_feature_cache(phantom_root, tmp_path, monkeypatch, caplog):
    """The attack end to end: train, overwrite one row of the feature cache, train again. The
    second run finds the block, rebuilds the cache, and trains to the first run's figures."""
    monkeypatch.setattr(mapped_table, "BLOCK_ROWS", 8)  # 36 rows: 5 blocks, the last partial
    common = [
        *phantom_overrides(phantom_root),
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.cache_features=true",
        "trainer.max_epochs=1",
        "callbacks.model_checkpoint=null",
    ]
    caplog.set_level(logging.INFO)
    first = train_in_process(common, tmp_path / "first")
    (path,) = (tmp_path / "cache").glob("features-*.npy")
    rows = len(np.load(path, mmap_mode="r"))
    damage(path, rows // 2, "row", np.random.default_rng(0))
    caplog.clear()
    second = train_in_process(common, tmp_path / "second")
    damaged = [w for w in warnings(caplog) if "damaged" in w]
    assert len(damaged) == 1 and str(path) in damaged[0]
    assert f"block {rows // 2 // 8} " in damaged[0]
    assert "Cached backbone features" in caplog.text  # rebuilt, then trained on
    for key, value in first.items():
        if key.startswith("val/") and isinstance(value, float):
            assert second[key] == pytest.approx(value, abs=1e-6), key
    # And a third run reads the rebuilt cache, every row checked.
    caplog.clear()
    train_in_process(common, tmp_path / "third")
    assert "every row checked: 5 block(s)" in caplog.text and "damaged" not in caplog.text
