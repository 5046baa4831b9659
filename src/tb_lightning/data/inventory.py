"""`data_report.json`: what the data of a run was (counts, sizes, skipped files, duplicates)."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tb_lightning.core.atomic import atomic_write_json
from tb_lightning.core.labels import CLASS_NAMES
from tb_lightning.data.sources import Sample
from tb_lightning.data.transforms import check_image_file

# Resizing up by more than this on a side is reported: interpolation invents no detail, so the
# model computes on factor^2 times the pixels of the files for nothing (up to 2x is the usual
# slack between a dataset's export size and a standard input size).
UPSAMPLING_WARN_FACTOR = 2.0
# eval and predict read the headers of at most this many inputs (evenly spread over the list)
# for the native size: a median needs no more, and a folder of 100k images stays quick.
UPSAMPLING_SAMPLE = 1000


def class_counts(samples: Sequence[Sample]) -> dict[str, int]:
    counts = Counter(s.label for s in samples)
    return {name: counts.get(label, 0) for label, name in enumerate(CLASS_NAMES)}


def size_stats(values: Sequence[int]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "min": min(values),
        "max": max(values),
        "mean": round(statistics.fmean(values), 2),
        "median": statistics.median(values),
    }


def upsampling(image_size: int, sizes: Iterable[tuple[int, int]]) -> dict[str, Any] | None:
    """How much resizing to image_size x image_size enlarges images of these (width, height),
    or None when it is at most UPSAMPLING_WARN_FACTOR on a side (or there are no sizes).

    The native side is the median over the images of their shorter side, the one the square
    resize stretches most; factor = image_size / that side. The median, not the smallest, so a
    few odd files do not speak for the set.
    """
    sizes = [(int(w), int(h)) for w, h in sizes]
    if not sizes:
        return None
    side = statistics.median(min(w, h) for w, h in sizes)
    factor = image_size / side
    if factor <= UPSAMPLING_WARN_FACTOR:
        return None
    return {
        "factor": round(factor, 2),
        "image_size": image_size,
        "native_side": round(side),
        "native_width": round(statistics.median(w for w, _ in sizes)),
        "native_height": round(statistics.median(h for _, h in sizes)),
        "statistic": f"median over {len(sizes)} images of the shorter side",
    }


def describe_upsampling(found: Mapping[str, Any], subject: str, remedy: str) -> str:
    """One sentence: `<subject> upsamples these images 4.0x (native 128x128 px, median): 16x the
    pixels to compute and no detail gained; <remedy>`; the remedy may name found["native_side"]."""
    factor = found["factor"]
    return (
        f"{subject} upsamples these images {factor:.1f}x (native {found['native_width']}x"
        f"{found['native_height']} px, median): {factor**2:.3g}x the pixels to compute and no "
        f"detail gained; {remedy}"
    )


def header_sizes(paths: Sequence[str], limit: int = UPSAMPLING_SAMPLE) -> list[tuple[int, int]]:
    """(width, height) from the headers (no pixel decoded) of at most `limit` paths spread
    evenly over the list; unusable files are left out (they are reported where they are read)."""
    step = max(1, -(-len(paths) // limit))
    sizes = []
    for path in paths[::step]:
        info = check_image_file(path)
        if not info["problem"]:
            sizes.append((info["width"], info["height"]))
    return sizes


def dicom_report(
    samples: Sequence[Sample], infos: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any] | None:
    """What the DICOM images of the run are by their headers (None when there are none):
    counts of `modalities` and `view_positions` ("" for none given), how many have their
    `patient_from_header` (the hashed PatientID as the patient), and the `flagged` files: a
    modality other than CR/DX/DR, or a view other than PA/AP (data/dicom.py flags_of). Only
    codes and paths: no value that identifies a patient."""
    dicom = [(s, infos[s.path]) for s in samples if infos.get(s.path, {}).get("format") == "DICOM"]
    if not dicom:
        return None
    return {
        "images": len(dicom),
        "modalities": dict(Counter(i.get("modality", "") for _, i in dicom)),
        "view_positions": dict(Counter(i.get("view_position", "") for _, i in dicom)),
        "patient_from_header": sum(1 for s, i in dicom if s.patient_id == i.get("patient")),
        "flagged": [
            {
                "path": s.path,
                "modality": i.get("modality", ""),
                "view_position": i.get("view_position", ""),
                "flags": list(i.get("flags", [])),
            }
            for s, i in dicom
            if i.get("flags")
        ],
    }


def build_data_report(
    splits: Mapping[str, Sequence[Sample]],
    infos: Mapping[str, Mapping[str, Any]],
    skipped: Sequence[Mapping[str, str]],
    duplicates: Mapping[str, Any],
    dropped: Sequence[Mapping[str, str]],
    settings: Mapping[str, Any],
    scan_stats: Mapping[str, Any],
    upsampled: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report as a dict; `splits` are the final train/val/test sides after any drops;
    `upsampled`: what upsampling() found for data.image_size (None: no image upsampled > 2x)."""
    used = [s for side in splits.values() for s in side]
    sources = sorted({s.source for s in used})
    n_normal, n_tb = (class_counts(splits.get("train", []))[name] for name in CLASS_NAMES)
    known = [infos[s.path] for s in used if s.path in infos and infos[s.path].get("width")]
    exact_leaks = [g for g in duplicates.get("exact", []) if g["leak"]]
    return {
        "settings": dict(settings),
        "images": len(used),
        "patients": len({(s.source, s.patient_id) for s in used}),
        "counts": {
            "total": class_counts(used),
            "per_split": {name: class_counts(side) for name, side in splits.items()},
            "per_source": {
                src: class_counts([s for s in used if s.source == src]) for src in sources
            },
            "per_split_and_source": {
                name: {src: class_counts([s for s in side if s.source == src]) for src in sources}
                for name, side in splits.items()
            },
        },
        "image_size": {
            "width": size_stats([i["width"] for i in known]),
            "height": size_stats([i["height"] for i in known]),
            "modes": dict(Counter(i["mode"] for i in known)),
            "formats": dict(Counter(i["format"] for i in known)),
        },
        "upsampling": dict(upsampled) if upsampled else None,
        # DICOM images: modalities, views, flags, patients from the header (None: no DICOM).
        "dicom": dicom_report(used, infos),
        # Class weights of the loss: Normal 1, Tuberculosis #Normal / #TB of the train split.
        "class_weights": {
            "Normal": 1.0,
            "Tuberculosis": (n_normal / n_tb) if n_tb else None,
        },
        "skipped_files": list(skipped),
        "duplicates": {
            "exact_groups": len(duplicates.get("exact", [])),
            "exact_groups_across_split": len(exact_leaks),
            "near_pairs_across_split": len(duplicates.get("near", [])),
            "exact": list(duplicates.get("exact", [])),
            "near": list(duplicates.get("near", [])),
            "dropped": list(dropped),
        },
        "scan": dict(scan_stats),
    }


def write_data_report(path: str | Path, report: Mapping[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, report)
