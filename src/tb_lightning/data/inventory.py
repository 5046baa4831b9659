"""`data_report.json`: what the data of a run was (counts, sizes, skipped files, duplicates)."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tb_lightning.core.atomic import atomic_write
from tb_lightning.core.labels import CLASS_NAMES
from tb_lightning.data.sources import Sample


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


def build_data_report(
    splits: Mapping[str, Sequence[Sample]],
    infos: Mapping[str, Mapping[str, Any]],
    skipped: Sequence[Mapping[str, str]],
    duplicates: Mapping[str, Any],
    dropped: Sequence[Mapping[str, str]],
    settings: Mapping[str, Any],
    scan_stats: Mapping[str, Any],
) -> dict[str, Any]:
    """The report as a dict; `splits` are the final train/val/test sides after any drops."""
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
    atomic_write(path, json.dumps(report, indent=2) + "\n")
