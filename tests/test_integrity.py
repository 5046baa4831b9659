"""Bad files found at scan time (error | skip), odd modes decoded right, duplicates, the cache."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import train_in_process
from data_builders import (
    BAD_KINDS,
    VALID_ODD_KINDS,
    class_tree,
    pixels,
    write_bad,
    write_odd_valid,
)
from datamodules import make_datamodule
from tb_lightning.config import PROJECT_ROOT
from tb_lightning.core.errors import DataError
from tb_lightning.data.datamodule import TBDataModule
from tb_lightning.data.integrity import cache_file_for, inspect_file, inspect_files
from tb_lightning.data.sources import Sample
from tb_lightning.data.split import write_split_csv
from tb_lightning.data.transforms import load_image


def data_module(root, **kwargs) -> TBDataModule:
    return make_datamodule(root=str(root), image_size=64, num_workers=0, val_size=0.25, **kwargs)


@pytest.mark.parametrize("kind", VALID_ODD_KINDS)
def test_odd_but_valid_modes_decode_to_the_8bit_picture(tmp_path, kind):
    path = write_odd_valid(tmp_path, kind, seed=5)
    image = load_image(path)
    assert image.dtype.is_floating_point is False and image.shape == (3, 96, 96)
    expected = pixels(5).astype(int)
    tolerance = 3 if kind == "cmyk" else 1  # JPEG is lossy; 16-bit -> 8-bit rounds
    assert np.abs(image[0].numpy().astype(int) - expected).max() <= tolerance
    # The scan accepts it and hashes the same picture as the plain 8-bit PNG.
    infos, _ = inspect_files([str(path)], progress=False)
    assert infos[str(path)]["problem"] is None


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_bad_file_stops_the_scan_naming_file_and_problem(tmp_path, kind):
    class_tree(tmp_path, counts=(6, 6))
    bad = write_bad(tmp_path / "Tuberculosis", kind)
    with pytest.raises(DataError) as err:
        data_module(tmp_path).setup()
    message = str(err.value)
    assert str(bad) in message and BAD_KINDS[kind] in message
    assert "data.on_bad_file=skip" in message


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_bad_file_is_skipped_and_listed(tmp_path, kind):
    class_tree(tmp_path, counts=(6, 6))
    bad = write_bad(tmp_path / "Normal", kind)
    dm = data_module(tmp_path, on_bad_file="skip")
    dm.setup()
    used = [s.path for s in dm.train_samples + dm.val_samples]
    assert str(bad) not in used and len(used) == 12
    (skipped,) = dm.report["skipped_files"]
    assert skipped["path"] == str(bad) and BAD_KINDS[kind] in skipped["reason"]


def test_hidden_and_non_image_files_are_ignored(tmp_path):
    class_tree(tmp_path, counts=(4, 4))
    (tmp_path / "Normal" / ".DS_Store").write_bytes(b"\0junk")
    (tmp_path / "Normal" / "._Normal-0.png").write_bytes(b"mac resource fork")
    (tmp_path / "Normal" / ".thumbs").mkdir()
    write_bad(tmp_path / "Normal" / ".thumbs", "tiny")
    (tmp_path / "Normal" / "notes.txt").write_text("x")
    dm = data_module(tmp_path)
    dm.setup()
    assert dm.report["images"] == 8 and dm.report["skipped_files"] == []


def leak_setup(tmp_path, on_leak: str) -> tuple[TBDataModule, dict[str, str]]:
    """Train holds originals; val holds an exact copy and a recompressed, resized copy."""
    class_tree(tmp_path / "db", counts=(6, 6))
    normal, tb = tmp_path / "db" / "Normal", tmp_path / "db" / "Tuberculosis"
    exact = shutil.copy(normal / "Normal-0.png", normal / "copy-of-0.png")
    near = normal / "near-copy-of-1.jpg"
    with Image.open(normal / "Normal-1.png") as im:
        buffer = io.BytesIO()
        im.resize((120, 120)).save(buffer, "JPEG", quality=80)
    near.write_bytes(buffer.getvalue())

    def sample(path, label):
        return Sample(str(path), label, os.path.basename(path), "tb_cxr")

    train = [sample(normal / f"Normal-{i}.png", 0) for i in range(4)]
    train += [sample(tb / f"Tuberculosis-{i}.png", 1) for i in range(4)]
    val = [sample(exact, 0), sample(near, 0), sample(normal / "Normal-5.png", 0)]
    val += [sample(tb / f"Tuberculosis-{i}.png", 1) for i in (4, 5)]
    write_split_csv(tmp_path / "split.csv", train, val)
    dm = data_module(tmp_path / "db", split_file=str(tmp_path / "split.csv"), on_leak=on_leak)
    return dm, {"exact": str(exact), "near": str(near)}


def test_duplicates_across_the_split_are_reported(tmp_path):
    dm, copies = leak_setup(tmp_path, "warn")
    dm.setup()
    dups = dm.report["duplicates"]
    assert dups["exact_groups_across_split"] == 1 and dups["near_pairs_across_split"] == 1
    (group,) = dups["exact"]
    assert {f["split"] for f in group["files"]} == {"train", "val"}
    assert copies["exact"] in {f["path"] for f in group["files"]}
    (pair,) = dups["near"]
    assert pair["files"][1]["path"] == copies["near"] and pair["files"][0]["path"].endswith(
        "Normal-1.png"
    )
    assert len(dm.val_samples) == 5  # warn keeps them


def test_leaks_refused_or_dropped(tmp_path):
    dm, copies = leak_setup(tmp_path, "error")
    with pytest.raises(DataError, match="cross the split.*data.on_leak=drop"):
        dm.setup()
    dm, copies = leak_setup(tmp_path / "again", "drop")
    dm.setup()
    val = {s.path for s in dm.val_samples}
    assert len(val) == 3 and not val & set(copies.values())
    assert {d["path"] for d in dm.report["duplicates"]["dropped"]} == set(copies.values())


def test_exact_duplicates_on_one_side_are_not_leaks(tmp_path):
    class_tree(tmp_path, counts=(8, 8))
    shutil.copy(tmp_path / "Normal" / "Normal-0.png", tmp_path / "Normal" / "again.png")
    for seed in range(4):
        dm = data_module(tmp_path, split_seed=seed)
        dm.setup()
        (group,) = dm.report["duplicates"]["exact"]
        sides = {f["split"] for f in group["files"]}
        assert group["leak"] == (len(sides) == 2)
        assert dm.report["duplicates"]["exact_groups_across_split"] == int(group["leak"])


def test_hash_cache_makes_a_rescan_decode_nothing(tmp_path):
    class_tree(tmp_path / "db", counts=(5, 5))
    paths = sorted(str(p) for p in (tmp_path / "db").rglob("*.png"))
    cache = cache_file_for(tmp_path / "cache", [str(tmp_path / "db")])
    first, stats = inspect_files(paths, cache, progress=False)
    assert stats["decoded"] == 10 and cache.is_file()
    again, stats = inspect_files(paths, cache, progress=False)
    assert stats == {**stats, "decoded": 0, "from_cache": 10} and again == first
    write_bad(tmp_path / "db" / "Normal", "truncated_png")
    os.replace(tmp_path / "db" / "Normal" / "truncated_png.png", paths[0])  # changed file
    changed, stats = inspect_files(paths, cache, progress=False)
    assert stats["decoded"] == 1 and changed[paths[0]]["problem"]


def test_train_skips_bad_files_and_reports_test_and_fold(tmp_path):
    """A run with data.on_bad_file=skip; the error policy is covered above."""
    class_tree(tmp_path / "db", counts=(10, 10))
    for i, kind in enumerate(sorted(BAD_KINDS)):
        write_bad(tmp_path / "db" / ("Normal", "Tuberculosis")[i % 2], kind, seed=90 + i)
    for i, kind in enumerate(VALID_ODD_KINDS):
        write_odd_valid(tmp_path / "db" / "Normal" / kind, kind, seed=80 + i)
    common = [
        "data=folder",
        f"data.root={tmp_path / 'db'}",
        "data.image_size=64",
        "data.num_workers=0",
        "data.scan_cache_dir=null",
        f"data.cache_dir={tmp_path / 'cache'}",
        "model.net.weights=null",
        "trainer=cpu",
        "debug=fdr",
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
    ]
    run_dir = tmp_path / "skip"
    train_in_process(
        [*common, "data.on_bad_file=skip", "data.test_size=4", "data.num_folds=3", "data.fold=2"],
        run_dir,
    )
    report = json.loads((run_dir / "data_report.json").read_text())
    reasons = {os.path.basename(s["path"]): s["reason"] for s in report["skipped_files"]}
    assert len(reasons) == len(BAD_KINDS)
    assert all(any(BAD_KINDS[kind] in reason for reason in reasons.values()) for kind in BAD_KINDS)
    assert report["images"] == 24  # 20 plain + 4 odd-but-valid images
    assert set(report["image_size"]["modes"]) >= {"L", "I;16", "RGBA", "P", "CMYK"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["data.fold"] == 2 and metrics["data.num_folds"] == 3
    assert "test/auroc" in metrics and sum(metrics["test_counts"].values()) == 4
    assert "Held-out test split:" in (run_dir / "report.txt").read_text()


def png_with_header(path, width: int, height: int):
    """A PNG whose header says width x height, with one row of pixel data (a few hundred bytes).

    The header is all the check may read: a decoder would allocate width x height x 3 bytes
    before finding the data short (30000 x 30000 is 2.7 GB).
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    pixels_row = zlib.compress(b"\0" * (min(width, 70000) + 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", pixels_row)
        + chunk(b"IEND", b"")
    )
    return path


HEADER_CASES = {
    "huge_30000": ((30000, 30000), "huge image"),
    "bomb_70000": ((70000, 70000), "huge image"),
    "wide_8200": ((8200, 64), "huge image (8200x64 px, more than 8192 px)"),
    "tiny_1x1": ((1, 1), "tiny image (1x1 px, less than 64 px)"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_one_check_refuses_from_the_header_before_decoding(tmp_path, case):
    """The scan, and load_image (train, eval, predict, saliency, export) refuse alike."""
    (width, height), words = HEADER_CASES[case]
    path = png_with_header(tmp_path / f"{case}.png", width, height)
    assert path.stat().st_size < 1000
    # The scan first: a decoder that got this far would crash on the short pixel data.
    info = inspect_file(str(path))
    assert words in info["problem"] and "sha256" not in info  # refused before hashing
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as err:
            load_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in str(err.value) and words in str(err.value)
    assert err.value.problem == info["problem"]  # one wording everywhere
    assert peak < 2**20  # nothing was decoded


def test_huge_file_is_refused_without_reading_it(tmp_path, monkeypatch):
    """A 3 GB sparse `.png` (no disk used) is `huge` from its size alone: no byte is read."""
    path = tmp_path / "sparse.png"
    with path.open("wb") as f:
        f.truncate(3 * 2**30)

    def no_whole_file_reads(self):
        raise AssertionError(f"{self} was read into memory whole")

    monkeypatch.setattr(Path, "read_bytes", no_whole_file_reads)
    tracemalloc.start()
    try:
        infos, _ = inspect_files([str(path)], progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    problem = infos[str(path)]["problem"]
    assert problem == "huge image file (3072 MiB, more than 256 MiB)"
    assert peak < 2**20
    with pytest.raises(DataError, match="huge image file"):
        load_image(path)


def test_files_are_hashed_in_chunks(tmp_path):
    """A valid image larger than the hash chunk: the right SHA-256, with flat memory."""
    from tb_lightning.data import integrity

    path = tmp_path / "noise.png"
    noise = np.random.default_rng(0).integers(0, 256, (1200, 1200), dtype=np.uint8)
    Image.fromarray(noise).save(path, compress_level=0)  # ~1.4 MB: more than one chunk
    assert path.stat().st_size > integrity.HASH_CHUNK_BYTES
    tracemalloc.start()
    try:
        digest = integrity.sha256_file(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert peak < 1.5 * integrity.HASH_CHUNK_BYTES
    assert inspect_file(str(path))["sha256"] == digest


def test_cache_of_an_older_version_is_not_trusted(tmp_path):
    """Entries written before the file-size check are checked again, not reused."""
    from tb_lightning.data import integrity

    tiny = png_with_header(tmp_path / "db" / "tiny.png", 1, 1)
    cache = cache_file_for(tmp_path / "cache", [str(tmp_path / "db")])
    key = list(integrity.file_key(str(tiny)))
    stale = {"key": key, "info": {"problem": None, "sha256": "0" * 64, "phash": "0" * 64}}
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({"version": 1, "files": {str(tiny): stale}}))
    infos, stats = inspect_files([str(tiny)], cache, progress=False)
    assert stats["decoded"] == 1 and "tiny image" in infos[str(tiny)]["problem"]
    assert json.loads(cache.read_text())["version"] == integrity.CACHE_VERSION > 1


def corrupt_png(path, seed: int = 0, fix_crc: bool = True):
    """A PNG with one byte of its compressed pixel data flipped (and the chunk CRC redone, as a
    careless repair tool would, unless fix_crc=False): the header is fine, decoding fails."""
    buffer = io.BytesIO()
    Image.fromarray(pixels(seed)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    start = data.index(b"IDAT")
    (length,) = struct.unpack(">I", data[start - 4 : start])
    data[start + 4 + length // 2] ^= 0xFF
    if fix_crc:
        crc = zlib.crc32(bytes(data[start : start + 4 + length]))
        data[start + 4 + length : start + 8 + length] = struct.pack(">I", crc)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.slow
def test_corrupt_png_data_is_refused_not_a_crash(tmp_path):
    """torchvision's PNG decoder kills the process (SIGSEGV) on these; load_image refuses them.

    Run in a child process, so that a crash fails this test instead of the whole session.
    """
    paths = [
        corrupt_png(tmp_path / "crc_fixed.png"),
        corrupt_png(tmp_path / "bad_crc.png", seed=1, fix_crc=False),
    ]
    code = (
        "import sys\n"
        "from tb_lightning.data.transforms import load_image\n"
        "from tb_lightning.core.errors import DataError\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        load_image(path)\n"
        "        print('decoded', path)\n"
        "    except DataError as err:\n"
        "        print(err.problem)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src")}
    result = subprocess.run(
        [sys.executable, "-c", code, *map(str, paths)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("truncated or corrupt PNG") for line in lines)
    for path in paths:  # the scan says the same
        assert inspect_file(str(path))["problem"].startswith("truncated or corrupt PNG")


def test_near_pairs_in_blocks_equal_all_pairs(monkeypatch):
    """The near-duplicate search compares a block of rows at a time (bounded memory): the same
    pairs and distances as a brute-force count of differing bits."""
    from tb_lightning.data import integrity

    rng = np.random.default_rng(0)
    hashes_a = [rng.bytes(32).hex() for _ in range(11)]
    hashes_b = [rng.bytes(32).hex() for _ in range(7)]
    # Near copies: a few bits flipped.
    flipped = bytearray(bytes.fromhex(hashes_a[4]))
    flipped[0] ^= 0b1011
    hashes_b[2] = flipped.hex()
    hashes_b[5] = hashes_a[9]
    monkeypatch.setattr(integrity, "NEAR_BLOCK", 3)  # several blocks
    found = sorted(integrity.near_pairs(hashes_a, hashes_b, 20))

    def bits(h: str) -> int:
        return int(h, 16)

    expected = sorted(
        (i, j, bin(bits(a) ^ bits(b)).count("1"))
        for i, a in enumerate(hashes_a)
        for j, b in enumerate(hashes_b)
        if bin(bits(a) ^ bits(b)).count("1") <= 20
    )
    assert found == expected and (4, 2, 3) in found and (9, 5, 0) in found


def test_scan_in_worker_processes_gives_the_threads_results(tmp_path):
    """data.num_workers > 0: the scan decodes in processes, with the same results."""
    root = class_tree(tmp_path / "data", counts=(6, 4))
    paths = sorted(str(p) for p in root.rglob("*.png"))
    threads, _ = inspect_files(paths, None, progress=False, num_workers=0)
    processes, _ = inspect_files(paths, None, progress=False, num_workers=2)
    assert processes == threads
