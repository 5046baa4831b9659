"""Data integrity at scan time: unreadable files, exact and near duplicates across the split.

Every image is checked (transforms.check_image_file: size, header, side limits, the one check
eval and predict apply too) and fully decoded once when the data is scanned, so a broken file
stops the run (or is skipped) before training, never in the middle of an epoch. The same pass
computes a content hash (SHA-256 of the bytes, read in chunks) and a perceptual hash
(imagehash's 256-bit pHash of the 8-bit grayscale image). Both are cached per file (keyed by
path, size and modification time), so a rescan of an unchanged folder reads no image.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
from PIL import Image

from tb_lightning.core.atomic import atomic_write_json
from tb_lightning.core.choices import PHASH_BITS, PHASH_SIZE
from tb_lightning.core.errors import DataError
from tb_lightning.core.progress import report_progress
from tb_lightning.core.signals import cancel_pending_on_stop, raise_if_stopped
from tb_lightning.data.dicom import UnusableDicom, is_patient_key, read_pixels
from tb_lightning.data.sources import Sample
from tb_lightning.data.transforms import IMAGE_FORMATS, check_image_file, pil_to_rgb_array

log = logging.getLogger(__name__)

# Bump when inspect_file changes what it stores, so old cache entries are not trusted.
# 2: the file-size limit and `bytes`; no hash of a file the check refuses.
# 3: DICOM files (format DICOM, with modality, view_position, patient and flags).
CACHE_VERSION = 3
# Files are hashed in chunks of this size: a large file never sits in memory whole.
HASH_CHUNK_BYTES = 2**20
# Split order: on a leak, `drop` keeps the copy on the earliest side and drops the later ones.
SPLIT_ORDER = ("train", "val", "test")


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in HASH_CHUNK_BYTES chunks into one reused buffer."""
    digest = hashlib.sha256()
    buffer = bytearray(HASH_CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while size := f.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def inspect_file(path: str) -> dict[str, Any]:
    """Check and decode one image fully; return its hashes, size and mode, or `problem`.

    check_image_file comes first, so a huge, tiny or non-image file is refused from its size or
    header, before it is hashed or decoded.
    """
    info = check_image_file(path)
    if info["problem"]:
        return info
    try:
        info["sha256"] = sha256_file(path)
    except OSError as err:
        return {**info, "problem": f"cannot be read ({err.strerror or err})"}
    if info["format"] == "DICOM":
        try:
            pixels = read_pixels(path)  # what load_image decodes; gray as it is, RGB to L
        except UnusableDicom as err:
            return {**info, "problem": err.problem}
        gray = Image.fromarray(pixels).convert("L")
        info["phash"] = str(imagehash.phash(gray, hash_size=PHASH_SIZE))
        return info
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as image:
            image.load()  # a truncated PNG/JPEG fails here
            gray = Image.fromarray(pil_to_rgb_array(image)).convert("L")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        info["problem"] = f"truncated or corrupt {info['format']} ({err})"
        return info
    info["phash"] = str(imagehash.phash(gray, hash_size=PHASH_SIZE))
    return info


def file_key(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def cache_file_for(cache_dir: str | Path, roots: Iterable[str]) -> Path:
    """One cache file per set of data roots (so two datasets never share or clobber one)."""
    digest = hashlib.sha1("\n".join(sorted(str(r) for r in roots)).encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / f"scan-{digest}.json"


def load_cache(path: Path | None) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a damaged cache is only a slower scan
    return cache.get("files", {}) if cache.get("version") == CACHE_VERSION else {}


def save_cache(path: Path | None, entries: Mapping[str, Any]) -> None:
    if path is None:
        return
    # Atomic: a concurrent run reads the old or the new cache, never half of one.
    atomic_write_json(path, {"version": CACHE_VERSION, "files": entries}, indent=None)


def inspect_files(
    paths: Sequence[str],
    cache_path: Path | None = None,
    progress: bool = True,
    num_workers: int = 0,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Inspect every path (from the cache when unchanged); return (infos, scan statistics).

    num_workers > 0: that many worker processes decode and hash (`data.num_workers`, like the
    DataLoaders); 0: threads of this process.
    """
    start = time.perf_counter()
    cache = load_cache(cache_path)
    infos: dict[str, dict[str, Any]] = {}
    entries: dict[str, Any] = {}
    todo: list[str] = []
    for path in paths:
        key = file_key(path)
        cached = cache.get(path)
        if key is not None and cached is not None and tuple(cached["key"]) == key:
            infos[path] = cached["info"]
            entries[path] = cached
        else:
            todo.append(path)
    if todo:
        with (
            scan_pool(num_workers) as pool,
            cancel_pending_on_stop(pool),
            # A bar at a terminal, a log line every 10 % elsewhere (core/progress.py).
            report_progress(
                "Checking images", len(todo), enabled=progress and len(todo) >= 200, logger=log
            ) as bar,
        ):
            # Chunks: a process pool pays a round trip per task, and the files are small jobs.
            chunk = max(1, min(64, len(todo) // (4 * max(num_workers, 1))))
            results = pool.map(inspect_file, todo, chunksize=chunk)
            for path, info in zip(todo, results, strict=True):
                raise_if_stopped()  # a safe point for Ctrl-C / SIGTERM (core/signals.py)
                infos[path] = info
                key = file_key(path)
                if key is not None:
                    entries[path] = {"key": list(key), "info": info}
                bar.update(1)
        save_cache(cache_path, entries)
    stats = {
        "files": len(paths),
        "from_cache": len(paths) - len(todo),
        "decoded": len(todo),
        "seconds": round(time.perf_counter() - start, 3),
    }
    return infos, stats


def scan_pool(num_workers: int) -> Executor:
    """Worker processes for the scan (data.num_workers > 0), else threads of this process.

    Processes scale the decoding past one interpreter (the perceptual hash and the file reads
    hold the GIL part of the time); threads need no start-up, for small scans and tests. PIL and
    hashlib release the GIL while decoding and hashing, so threads scale too, less far.
    """
    if num_workers > 0:
        return ProcessPoolExecutor(num_workers)
    return ThreadPoolExecutor(min(16, os.cpu_count() or 1))


def with_header_patients(
    samples: Sequence[Sample], infos: Mapping[str, Mapping[str, Any]]
) -> list[Sample]:
    """The samples, each DICOM file's patient taken from its header (the hashed PatientID the
    scan recorded: data/dicom.py patient_key) where its source gave the file name as the
    patient, as class folders and a manifest without patient_id do: two studies of one patient
    then stay on one side of the split. A patient the source states (NLM names, a manifest's
    patient_id column) is kept. The key comes from the scan's infos, so it is cached with them.
    """
    result = []
    for sample in samples:
        key = (infos.get(sample.path) or {}).get("patient")
        if key and sample.patient_id == Path(sample.path).stem:
            sample = dataclasses.replace(sample, patient_id=key)
        result.append(sample)
    keys = Counter(s.patient_id for s in result if is_patient_key(s.patient_id))
    if keys:
        _, largest = keys.most_common(1)[0]
        if largest >= 3 and largest > len(result) / 2:
            log.warning(
                "%d of %d images share one DICOM PatientID, so the split keeps them on one "
                "side as one patient; if an anonymiser gave every file the same PatientID, "
                "give each patient its own, or list the images in a manifest with a patient_id "
                "column (data=manifest).",
                largest,
                len(result),
            )
    return result


def apply_bad_file_policy(
    samples: Sequence[Sample],
    infos: Mapping[str, Mapping[str, Any]],
    on_bad_file: str,
    listed_in: str = "data_report.json",
) -> tuple[list[Sample], list[dict[str, str]]]:
    """Samples that decode; `error` stops at the first bad file, `skip` lists each one.

    `listed_in` names the file that lists the skipped ones (train: data_report.json, eval:
    skipped.csv).
    """
    bad = [(s, infos[s.path]["problem"]) for s in samples if infos[s.path]["problem"]]
    if bad and on_bad_file == "error":
        sample, problem = bad[0]
        more = f" ({len(bad) - 1} more bad file(s) after it)" if len(bad) > 1 else ""
        raise DataError(
            f"Cannot use image {sample.path}: {problem}{more}; remove or replace it, or pass "
            f"data.on_bad_file=skip to leave bad files out (listed in {listed_in})."
        )
    skipped = [{"path": s.path, "reason": problem} for s, problem in bad]
    for entry in skipped:
        log.warning("Skipping %s: %s", entry["path"], entry["reason"])
    bad_paths = {s.path for s, _ in bad}
    return [s for s in samples if s.path not in bad_paths], skipped


def phash_matrix(hex_hashes: Sequence[str]) -> np.ndarray:
    """PHASH_BITS-bit perceptual hashes (hex) as an (N, PHASH_BITS) array of 0/1 floats."""
    if not hex_hashes:
        return np.zeros((0, PHASH_BITS), dtype=np.float32)
    packed = np.frombuffer(b"".join(bytes.fromhex(h) for h in hex_hashes), dtype=np.uint8)
    return np.unpackbits(packed).reshape(len(hex_hashes), -1).astype(np.float32)


# Rows of the first list compared at once: the distance block is NEAR_BLOCK x len(second list)
# float32 (4 MB per 1,000 images of the second list), whatever the data set's size.
NEAR_BLOCK = 1024


def near_pairs(
    a: Sequence[str], b: Sequence[str], max_distance: int
) -> Iterator[tuple[int, int, int]]:
    """(index in a, index in b, Hamming distance) of every pair of hashes at most max_distance
    apart: pairwise distances as matrix products, a block of rows of `a` at a time, so that
    memory stays bounded (a whole train x val matrix is 1.6 billion cells at 100k images)."""
    bits_b = phash_matrix(b)
    ones_b = 1 - bits_b
    for start in range(0, len(a), NEAR_BLOCK):
        bits_a = phash_matrix(a[start : start + NEAR_BLOCK])
        same = bits_a @ bits_b.T + (1 - bits_a) @ ones_b.T
        distances = np.rint(bits_a.shape[1] - same)
        for ia, ib in zip(*np.nonzero(distances <= max_distance), strict=True):
            yield start + int(ia), int(ib), int(distances[ia, ib])


def find_duplicates(
    splits: Mapping[str, Sequence[Sample]],
    infos: Mapping[str, Mapping[str, Any]],
    near_distance: int,
) -> dict[str, Any]:
    """Exact duplicates (same bytes) anywhere, and near duplicates across two sides of the split.

    Returns {"exact": [groups], "near": [pairs]}; a group or pair marked `leak` spans two sides.
    Near duplicates are pairs whose pHash differ in at most `near_distance` of 256 bits (and are
    not exact duplicates); within one side they do no harm and are not listed.
    """
    by_hash: dict[str, list[tuple[str, str]]] = {}
    for split, samples in splits.items():
        for s in samples:
            by_hash.setdefault(infos[s.path]["sha256"], []).append((split, s.path))
    exact = [
        {
            "sha256": digest,
            "files": [{"path": p, "split": split} for split, p in members],
            "leak": len({split for split, _ in members}) > 1,
        }
        for digest, members in by_hash.items()
        if len(members) > 1
    ]
    near: list[dict[str, Any]] = []
    names = [name for name in SPLIT_ORDER if splits.get(name)]
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            a, b = list(splits[first]), list(splits[second])
            pairs = near_pairs(
                [infos[s.path]["phash"] for s in a],
                [infos[s.path]["phash"] for s in b],
                near_distance,
            )
            for ia, ib, distance in pairs:
                sa, sb = a[ia], b[ib]
                if infos[sa.path]["sha256"] == infos[sb.path]["sha256"]:
                    continue  # already an exact duplicate
                near.append(
                    {
                        "files": [
                            {"path": sa.path, "split": first},
                            {"path": sb.path, "split": second},
                        ],
                        "distance": distance,
                        "leak": True,
                    }
                )
    return {"exact": exact, "near": near}


def leaking_paths(duplicates: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(path to drop, its split, the copy it duplicates) for every leak: later sides lose."""
    drops: dict[str, tuple[str, str, str]] = {}
    for entry in [*duplicates["exact"], *duplicates["near"]]:
        if not entry["leak"]:
            continue
        files = sorted(entry["files"], key=lambda f: SPLIT_ORDER.index(f["split"]))
        keep_split = files[0]["split"]
        for f in files[1:]:
            if f["split"] != keep_split:
                drops.setdefault(f["path"], (f["path"], f["split"], files[0]["path"]))
    return list(drops.values())


def apply_leak_policy(
    splits: dict[str, list[Sample]], duplicates: Mapping[str, Any], on_leak: str
) -> list[dict[str, str]]:
    """Warn about, refuse, or drop (from val/test) images duplicated across the split.

    Returns the dropped files; `splits` is changed in place when dropping.
    """
    leaks = leaking_paths(duplicates)
    if not leaks:
        return []
    n_exact = sum(1 for g in duplicates["exact"] if g["leak"])
    n_near = len(duplicates["near"])
    path, split, twin = leaks[0]
    summary = (
        f"{n_exact} exact and {n_near} near duplicate(s) cross the split, e.g. {path} ({split}) "
        f"duplicates {twin}"
    )
    if on_leak == "error":
        raise DataError(
            f"{summary}; remove the copies, or pass data.on_leak=drop to drop them from the "
            "evaluation side (or data.on_leak=warn to keep them). All are listed in "
            "data_report.json."
        )
    if on_leak == "warn":
        log.warning(
            "%s. Validation/test metrics may be optimistic; data.on_leak=drop removes them "
            "(all listed in data_report.json).",
            summary,
        )
        return []
    dropped_paths = {p for p, _, _ in leaks}
    for name in splits:
        splits[name] = [s for s in splits[name] if s.path not in dropped_paths]
    log.warning("%s; dropped %d image(s) from val/test (data.on_leak=drop).", summary, len(leaks))
    return [{"path": p, "split": s, "duplicate_of": twin} for p, s, twin in leaks]
