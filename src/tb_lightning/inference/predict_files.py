"""What `python -m tb_lightning.predict` does: list the inputs, predict, write the CSVs."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import torch

from tb_lightning.core.artefacts import (
    data_root,
    image_path,
    probability_text,
    relative_path,
    threshold_text,
    write_predictions_sidecar,
)
from tb_lightning.core.atomic import atomic_write_csv
from tb_lightning.core.errors import DataError
from tb_lightning.core.labels import CLASS_NAMES
from tb_lightning.data.dicom import is_dicom_content, read_head
from tb_lightning.data.sources import is_image_file
from tb_lightning.data.transforms import check_image_file
from tb_lightning.inference.saliency import SaliencyMap, write_saliency_maps
from tb_lightning.inference.seen import Seen, describe_seen, role_counts, seen_in_training
from tb_lightning.trained.model import TrainedModel
from tb_lightning.trained.runner import Predictions, warn_if_upsampled

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = (
    "path",
    "p_tb",
    "predicted_label",
    "predicted_class",
    "threshold",
    # The input's role in the model's training (train/val/test, empty: none) and how it matched
    # (sha256, path, patient, phash:<bits>): inference/seen.py.
    "seen_in_training",
    "seen_by",
    # A DICOM input's Modality and ViewPosition codes (empty for PNG/JPEG, or when the header
    # has none); a value other than CR/DX/DR or PA/AP is logged as flagged (data/dicom.py).
    "modality",
    "view_position",
)


def collect_inputs(input_path: str | Path | None) -> list[str]:
    """The image paths named by `input`: one file, a folder (recursive), or a CSV's path column.

    Folder entries that are not images (sources.is_image_file: no .png/.jpg/.jpeg/.dcm
    extension, and no DICOM preamble in an extension-less file) are left out (and counted in
    the log); files that are named but cannot be used (missing, unreadable, not an image,
    truncated, huge, tiny) are kept here and reported as skipped after prediction.
    """
    path = Path(input_path).expanduser().resolve()
    if not path.exists():
        raise DataError(
            f"input={path} does not exist; pass an image file, a folder of images or a CSV "
            "with a `path` column."
        )
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        images = [str(p) for p in files if is_image_file(p)]
        if len(files) > len(images):
            log.info("Ignored %d non-image file(s) in %s", len(files) - len(images), path)
        if not images:
            raise DataError(f"input={path} holds no .png/.jpg/.jpeg images (nor DICOM files).")
        return images
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if "path" not in (reader.fieldnames or []):
                raise DataError(
                    f"input={path} has no `path` column; write one image path per row under a "
                    "`path` header."
                )
            rows = [row["path"] for row in reader if row["path"]]
        if not rows:
            raise DataError(f"input={path} lists no image paths.")
        # Relative paths are relative to the CSV file, so a manifest travels with its images.
        return [str((path.parent / Path(r).expanduser()).resolve()) for r in rows]
    return [str(path)]


def dicom_codes(paths: list[str]) -> dict[str, dict[str, object]]:
    """path -> {modality, view_position, flags} of each readable DICOM input, from its header
    (transforms.check_image_file; no pixel decoded); of a PNG or JPEG input only the first 132
    bytes are read, which tell it is not DICOM."""
    codes: dict[str, dict[str, object]] = {}
    for path in paths:
        if not is_dicom_content(path, read_head(path)):
            continue
        info = check_image_file(path)
        if info.get("format") == "DICOM" and not info["problem"]:
            codes[path] = {
                "modality": info["modality"],
                "view_position": info["view_position"],
                "flags": info["flags"],
            }
    return codes


def write_predictions(
    output_dir: Path,
    paths: list[str],
    predictions: Predictions,
    threshold: float,
    threshold_source: str,
    saliency: list[SaliencyMap] | None = None,
    seen: list[Seen] | None = None,
    codes: dict[str, dict[str, object]] | None = None,
) -> tuple[Path, Path | None]:
    """predictions.csv for the usable images and skipped.csv (path, reason) for the rest, with
    predictions.json naming once the data root their image paths are relative to (the inputs'
    deepest common folder) and the threshold's source; saliency figures are named relative to
    output_dir, numbers written as core/artefacts.py says.

    `seen` (one per path) fills seen_in_training and seen_by; without it they stay empty.
    `codes` (dicom_codes) fills modality and view_position of DICOM inputs; empty otherwise.

    With Grad-CAM figures: their path (`saliency`), the share of the map's mass in the image
    border (`saliency_border_share`, 3 decimals; empty for an empty map) and `saliency_flag`:
    `empty` (no region raises p_tb) or `border` (most of the map lies in the border, outside the
    body), each a figure that shows no evidence; empty for the others (saliency.py).
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    predictions_csv = output_dir / "predictions.csv"
    root = data_root(paths)
    write_predictions_sidecar(output_dir, root, threshold, threshold_source)
    columns = list(PREDICTION_COLUMNS)
    if saliency is not None:
        columns += ["saliency", "saliency_border_share", "saliency_flag"]
    readable_saliency = iter(saliency or [])
    rows = []
    marks = seen or [Seen()] * len(paths)
    for path, p, ok, mark in zip(
        paths, predictions.probs, predictions.readable, marks, strict=True
    ):
        if not ok:
            continue
        label = int(p >= threshold)
        row = [image_path(path, root), probability_text(p, threshold), label, CLASS_NAMES[label]]
        row.append(threshold_text(threshold))
        row += [mark.role, mark.by]
        dicom = (codes or {}).get(path, {})
        row += [dicom.get("modality", ""), dicom.get("view_position", "")]
        if saliency is not None:
            figure = next(readable_saliency)
            share = "" if figure.border_share is None else f"{figure.border_share:.3f}"
            row += [relative_path(figure.path, output_dir), share, figure.flag]
        rows.append(row)
    atomic_write_csv(predictions_csv, columns, rows)
    skipped = [
        (image_path(p, root), r)
        for p, r, ok in zip(paths, predictions.reasons, predictions.readable, strict=True)
        if not ok
    ]
    if not skipped:
        return predictions_csv, None
    skipped_csv = output_dir / "skipped.csv"
    atomic_write_csv(skipped_csv, ["path", "reason"], skipped)
    return predictions_csv, skipped_csv


def run_prediction(
    loaded: TrainedModel,
    paths: list[str],
    threshold: float,
    threshold_source: str,
    output_dir: Path,
    batch_size: int = 32,
    num_workers: int = 0,
    saliency: bool = False,
    device: torch.device | None = None,
) -> Predictions:
    """Predict every path, write the CSVs (and Grad-CAM overlays); bad files are skipped.

    Each predicted image is compared with the model's training split(s) (inference/seen.py):
    predictions.csv says which ones it has seen, and the log counts them.

    Every file gets the scan's checks (transforms.check_image_file, then a decode): a huge,
    tiny, truncated, unreadable or non-image file is listed in skipped.csv with the reason and
    gets no prediction, and the run goes on with the rest; when no file is left, DataError.
    """
    warn_if_upsampled(paths, loaded.image_size)
    predictions = loaded.predict(paths, batch_size, num_workers, device)
    readable = [p for p, ok in zip(paths, predictions.readable, strict=True) if ok]
    if not readable:
        # Nothing was predicted: a run that "succeeds" with an empty predictions.csv would be
        # read as "no TB found". skipped.csv still says why each input was left out.
        _, skipped_csv = write_predictions(
            output_dir, paths, predictions, threshold, threshold_source
        )
        raise DataError(
            f"No image could be predicted: all {len(paths)} input(s) are bad files, each listed "
            f"with the reason in {skipped_csv}; fix or replace them, or pass input=<other images>."
        )
    maps = None
    if saliency:
        maps = write_saliency_maps(
            loaded.model.net,
            readable,
            predictions.probs[predictions.readable].tolist(),
            threshold,
            loaded.image_size,
            output_dir / "saliency",
            preprocess=loaded.preprocess,
            batch_size=min(batch_size, 16),
            device=device,
        )
    seen = seen_in_training(loaded, paths, num_workers=num_workers)
    codes = dicom_codes(readable)
    predictions_csv, skipped_csv = write_predictions(
        output_dir, paths, predictions, threshold, threshold_source, maps, seen, codes
    )
    n_tb = int((predictions.probs[predictions.readable] >= threshold).sum())
    log.info(
        "Predicted %d image(s): %d Tuberculosis, %d Normal at p_tb >= %s -> %s",
        len(readable),
        n_tb,
        len(readable) - n_tb,
        threshold_text(threshold),
        predictions_csv,
    )
    flagged = sum(1 for c in codes.values() if c["flags"])
    if flagged:
        log.warning(
            "%d of %d DICOM input(s) are not frontal chest radiographs by their header "
            "(modality other than CR/DX/DR, or view other than PA/AP): their p_tb is that of an "
            "image unlike the training images; see the modality and view_position columns of %s.",
            flagged,
            len(codes),
            predictions_csv,
        )
    if seen is not None:
        log_seen([s for s, ok in zip(seen, predictions.readable, strict=True) if ok])
    if skipped_csv:
        skipped = [(p, r) for p, r in zip(paths, predictions.reasons, strict=True) if r]
        listing = "\n".join(f"  {path}: {reason}" for path, reason in skipped[:20])
        more = f"\n  ... and {len(skipped) - 20} more" if len(skipped) > 20 else ""
        log.warning(
            "Skipped %d bad file(s) (no prediction), listed in %s:\n%s%s",
            len(skipped),
            skipped_csv,
            listing,
            more,
        )
    return predictions


def log_seen(seen: list[Seen]) -> None:
    """Warn when some predicted images are the model's train or val images (or patients)."""
    counts = role_counts(seen)
    sentence = describe_seen(counts)
    if sentence:
        log.warning("%s", sentence)
    if counts["test"]:
        log.info(
            "%d of %d inputs are images or patients of the model's held-out test split "
            "(seen_in_training=test in predictions.csv).",
            counts["test"],
            len(seen),
        )
