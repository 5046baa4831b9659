"""How paths and numbers are written into a run's artefacts, so that the files can move.

Paths. A run's files name other files relative to the run directory: the checkpoint in
report.txt, metrics.json and the TensorBoard text; a sweep's jobs relative to the multirun
folder (sweep_summary.*); an export's checkpoint relative to model.json's folder, an ensemble's
members relative to their multirun folder. Image paths (predictions.csv, skipped.csv) are
relative to the data root, named once in predictions.json beside them. Nothing written for
deployment (an export's model.json) holds an absolute path of the training machine. split.csv
is the run's record of its data and keeps the absolute paths it reads the images from.

Numbers. Probabilities (p_tb) and thresholds are written with 6 decimals (DECIMALS) in CSV,
JSON and report text:
- operating thresholds are chosen on that grid (stats/thresholds.py), so the written value
  is the one every tool uses; a threshold that is not on it (chosen between two validation
  probabilities closer than 1e-6, set by hand with more decimals, or from an older checkpoint)
  is written in full, never rounded;
- p_tb is rounded to 6 decimals, toward its call's side when it lies within 5e-7 of the
  threshold, so that `p_tb >= threshold` on the written values gives the written call;
- logits (train's predictions.csv) are written with 9 significant digits, which round-trip
  float32 exactly: figures recomputed from the file match the reported ones bit for bit.
Every figure is computed from the unrounded values; only the writing rounds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tb_lightning.core.atomic import atomic_write_json
from tb_lightning.core.labels import CLASS_NAMES

DECIMALS = 6
# The sidecar of predictions.csv (and skipped.csv): the data root and the threshold, once.
PREDICTIONS_SIDECAR = "predictions.json"
PRECISION_NOTE = (
    "p_tb and threshold: 6 decimals (p_tb rounded toward its call's side within 5e-7 of the "
    "threshold, so that p_tb >= threshold on the written values gives the written call); "
    "logit: 9 significant digits, exact for float32"
)


def relative_path(path: str | Path, start: str | Path) -> str:
    """`path` relative to the folder `start` (`../../train/runs/<run>/checkpoints/best.ckpt`).

    When the two share no folder but the filesystem root, the relative path would spell out
    the absolute one: then only its last three parts are kept (`<run>/checkpoints/best.ckpt`),
    which name it without saying where this machine keeps it.
    """
    path, start = os.path.abspath(path), os.path.abspath(start)
    if os.path.commonpath([path, start]) == os.path.sep:
        return "/".join(Path(path).parts[-3:])
    return os.path.relpath(path, start)


def data_root(paths: Iterable[str | Path]) -> Path:
    """The deepest folder that holds every one of `paths` (files): the root their relative
    paths are written against."""
    folders = [os.path.dirname(os.path.abspath(p)) for p in paths]
    return Path(os.path.commonpath(folders)) if folders else Path(os.path.sep)


def image_path(path: str | Path, root: str | Path) -> str:
    """An image's path as written in a run's CSVs: relative to the data root."""
    return os.path.relpath(os.path.abspath(path), root)


def threshold_text(value: float) -> str:
    """A threshold as every file writes it: 6 decimals when that is its exact value (the
    operating threshold is chosen so), else in full (Python's shortest exact form)."""
    text = f"{value:.{DECIMALS}f}"
    return text if float(text) == value else repr(float(value))


def probability_text(p: float, threshold: float | None = None) -> str:
    """p_tb with 6 decimals; with `threshold`, rounded toward the side of its call when plain
    rounding would cross it (only within 5e-7 of the threshold)."""
    p = float(p)
    text = f"{p:.{DECIMALS}f}"
    if threshold is None or (float(text) >= threshold) == (p >= threshold):
        return text
    step = 10.0**-DECIMALS
    return f"{float(text) + (step if p >= threshold else -step):.{DECIMALS}f}"


def write_predictions_sidecar(
    output_dir: Path, root: str | Path, threshold: float | None, threshold_source: str | None
) -> None:
    """predictions.json: what predictions.csv (and skipped.csv) need said once, not per row."""
    sidecar: dict[str, Any] = {
        "data_root": str(root),
        "paths": "image paths in predictions.csv and skipped.csv are relative to data_root; "
        "saliency figures relative to this folder",
    }
    if threshold is not None:
        sidecar["threshold"] = float(threshold)  # JSON writes it as threshold_text does
        sidecar["threshold_source"] = threshold_source
        sidecar["decision_rule"] = (
            f"predicted_label 1 ({CLASS_NAMES[1]}) when p_tb >= threshold, else 0 "
            f"({CLASS_NAMES[0]})"
        )
    sidecar["precision"] = PRECISION_NOTE
    atomic_write_json(output_dir / PREDICTIONS_SIDECAR, sidecar)


def read_data_root(folder: Path) -> Path | None:
    """The data root predictions.json names in `folder`, None without one (an older run)."""
    try:
        root = json.loads((folder / PREDICTIONS_SIDECAR).read_text())["data_root"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Path(root) if isinstance(root, str) else None
