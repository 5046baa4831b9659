"""Which inputs of predict or eval a trained model has already seen, and in which role.

A p_tb (or a metric) on an image the model trained on says nothing about how it does on new
ones, and the same patient at another resolution, or a renamed copy, is no new image either. The
training run's `split.csv` lists its train/val/test rows with each image's SHA-256 and perceptual
hash (written by the DataModule); an input matches a row by:

- `sha256`: the same file bytes;
- `path`: the same file (links resolved), for rows of an older split.csv without hashes;
- `patient`: the same patient of a known source, from the file name (the NLM naming
  `<PREFIX>_<number>_<0|1>` gives patient `<PREFIX>_<number>`; other names carry no patient),
  or for a DICOM file the hashed PatientID of its header (data/dicom.py patient_key), which
  split.csv's patient_id holds for DICOM rows;
- `phash:<d>`: a perceptual hash at most the run's `near_duplicate_distance` bits away
  (data_report.json; `d` is the distance), a resized or recompressed copy.

An input matched by several rows takes the role train > val > test (a k-fold image that is val
for one member of an ensemble and train for the others is `train`), then the strongest match. The
index holds hashes, paths and patient ids of the training rows, never pixels, and the perceptual
hashes are compared in blocks (integrity.near_pairs), so memory stays flat.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tb_lightning.data.dicom import is_patient_key
from tb_lightning.data.integrity import inspect_files, near_pairs
from tb_lightning.data.sources import NLM_NAME
from tb_lightning.trained.model import TrainedModel

log = logging.getLogger(__name__)

# Roles of a training row, in precedence order: the first that matches an input wins.
ROLES = ("train", "val", "test")
# The key of metrics.json's counts for inputs that match no row.
UNSEEN = "unseen"
# data.near_duplicate_distance's default, for runs whose data_report.json does not say.
DEFAULT_NEAR_DISTANCE = 20
# How an input matched, strongest first: same bytes, same file, same patient, near-duplicate.
METHODS = ("sha256", "path", "patient", "phash")


@dataclass(frozen=True)
class Seen:
    """An input's role in training (`train`, `val`, `test`, or "" for none) and how it matched
    (`sha256`, `path`, `patient`, `phash:<distance>`, or "")."""

    role: str = ""
    by: str = ""


@dataclass
class TrainingIndex:
    """The rows of one or more training split.csv files, by what an input can match.

    Each key keeps the best role (ROLES order) of all the rows that share it.
    """

    split_files: list[Path] = field(default_factory=list)
    by_sha256: dict[str, str] = field(default_factory=dict)
    by_path: dict[str, str] = field(default_factory=dict)
    by_patient: dict[str, str] = field(default_factory=dict)
    # near_duplicate_distance -> {pHash: role}: runs of an ensemble may differ in the distance.
    by_phash: dict[int, dict[str, str]] = field(default_factory=dict)
    # The split files whose rows carry no hashes (written before split.csv had them).
    unhashed: list[Path] = field(default_factory=list)

    @property
    def has_hashes(self) -> bool:
        """True when some row has a SHA-256 or pHash (the inputs then need hashing)."""
        return bool(self.by_sha256 or any(self.by_phash.values()))


def better_role(current: str | None, role: str) -> str:
    """The role that wins between two rows of one key: train > val > test."""
    if current is None:
        return role
    return min(current, role, key=ROLES.index)


def patient_of(path: str | Path) -> str | None:
    """The patient an NLM-named file shows (`CHNCXR_0001_0.png` -> `CHNCXR_0001`), else None.

    Only the NLM naming carries a patient in the file name; any other stem is just a name.
    """
    match = NLM_NAME.match(Path(path).stem)
    return f"{match['prefix'].upper()}_{match['number']}" if match else None


def same_file_key(path: str | Path) -> str:
    """One spelling per file (absolute, links resolved), to compare paths of two machines' CSVs."""
    return os.path.realpath(os.path.expanduser(path))


def near_duplicate_distance(run_dir: Path) -> int:
    """The run's data.near_duplicate_distance as its data_report.json records it (else 20)."""
    try:
        value = json.loads((run_dir / "data_report.json").read_text())["settings"][
            "near_duplicate_distance"
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_NEAR_DISTANCE
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return DEFAULT_NEAR_DISTANCE
    return value


def add_split_file(index: TrainingIndex, split_file: Path) -> bool:
    """Add the rows of one split.csv to the index; False when the file cannot be read.

    Read directly, not with read_split_sides: the training images need not exist on this
    machine for their hashes, paths and patients to be compared.
    """
    distance = near_duplicate_distance(split_file.parent)
    phashes = index.by_phash.setdefault(distance, {})
    hashed = 0
    try:
        with split_file.open(newline="") as f:
            reader = csv.DictReader(f)
            if not {"path", "split"} <= set(reader.fieldnames or []):
                return False
            for row in reader:
                role = row["split"]
                if role not in ROLES:
                    continue
                sha256, phash = row.get("sha256") or "", row.get("phash") or ""
                if sha256:
                    index.by_sha256[sha256] = better_role(index.by_sha256.get(sha256), role)
                else:  # an older split.csv: the file itself is all there is to compare
                    key = same_file_key(row["path"])
                    index.by_path[key] = better_role(index.by_path.get(key), role)
                if phash:
                    phashes[phash] = better_role(phashes.get(phash), role)
                hashed += bool(sha256 or phash)
                # The NLM name's patient, and a DICOM row's hashed PatientID (split.csv's
                # patient_id): an input may match either.
                dicom = row.get("patient_id") if is_patient_key(row.get("patient_id")) else None
                for patient in (patient_of(row["path"]), dicom):
                    if patient is not None:
                        index.by_patient[patient] = better_role(index.by_patient.get(patient), role)
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    index.split_files.append(split_file)
    if not hashed:
        index.unhashed.append(split_file)
    return True


def load_training_index(split_files: Sequence[Path]) -> TrainingIndex | None:
    """The index of every readable split file; None when none can be read."""
    index = TrainingIndex()
    for split_file in split_files:
        if not add_split_file(index, split_file):
            log.warning("Cannot read %s as a split.csv; its rows are not compared.", split_file)
    if not index.split_files:
        return None
    if index.unhashed:
        log.info(
            "%s (written by an older version) has no image hashes, so inputs are compared with "
            "its rows by file path and NLM patient only: renamed, copied or resized images of "
            "its training set are not recognised.",
            ", ".join(str(p) for p in index.unhashed),
        )
    return index


def match_inputs(
    index: TrainingIndex,
    paths: Sequence[str],
    infos: Mapping[str, Mapping[str, Any]],
) -> list[Seen]:
    """Each input's Seen: the best role of the rows it matches, and how (ROLES, METHODS order).

    `infos` holds the inputs' `sha256` and `phash` (integrity.inspect_files); an input without
    them (a bad file, or no hashing) is matched by path and patient only.
    """
    best: list[tuple[int, int, int, str] | None] = [None] * len(paths)

    def offer(i: int, role: str, method: str, distance: int = 0) -> None:
        by = f"phash:{distance}" if method == "phash" else method
        candidate = (ROLES.index(role), METHODS.index(method), distance, by)
        current = best[i]
        if current is None or candidate < current:
            best[i] = candidate

    for i, path in enumerate(paths):
        info = infos.get(path) or {}
        sha256 = info.get("sha256")
        if sha256 and sha256 in index.by_sha256:
            offer(i, index.by_sha256[sha256], "sha256")
        if index.by_path:
            key = same_file_key(path)
            if key in index.by_path:
                offer(i, index.by_path[key], "path")
        for patient in (patient_of(path), info.get("patient")):  # NLM name, DICOM PatientID
            if patient is not None and patient in index.by_patient:
                offer(i, index.by_patient[patient], "patient")
    # A train row matched by bytes, path or patient cannot be beaten: such inputs skip the
    # perceptual comparison.
    todo = [
        i
        for i, path in enumerate(paths)
        if (infos.get(path) or {}).get("phash") and (best[i] is None or best[i][0] > 0)
    ]
    for distance, rows in index.by_phash.items():
        if not rows or not todo:
            continue
        row_hashes, row_roles = list(rows), list(rows.values())
        input_hashes = [infos[paths[i]]["phash"] for i in todo]
        for ia, ib, d in near_pairs(input_hashes, row_hashes, distance):
            offer(todo[ia], row_roles[ib], "phash", d)
    return [Seen() if b is None else Seen(ROLES[b[0]], b[3]) for b in best]


def training_split_files(loaded: TrainedModel) -> list[Path]:
    """The split.csv of the model's training run, or of each member's run for an ensemble."""
    if loaded.member_checkpoints:
        return [ckpt.parent.parent / "split.csv" for ckpt in loaded.member_checkpoints]
    return [loaded.run_dir / "split.csv"]


def seen_in_training(
    loaded: TrainedModel,
    paths: Sequence[str],
    num_workers: int = 0,
    progress: bool = True,
) -> list[Seen] | None:
    """Seen for every path against the model's training split(s); None when no split.csv
    beside the checkpoint (or a member's) can be read, so nothing can be said.

    The inputs are hashed (integrity.inspect_files: each file decoded once more) only when the
    split files carry hashes; a bad file gets no hash and keeps its skipped handling elsewhere.
    """
    split_files = training_split_files(loaded)
    found = [p for p in split_files if p.is_file()]
    missing = [p for p in split_files if not p.is_file()]
    if missing:
        log.info(
            "No split.csv at %s: the inputs are not compared with that run's training images.",
            ", ".join(str(p) for p in missing),
        )
    index = load_training_index(found) if found else None
    if index is None:
        return None
    infos: Mapping[str, Mapping[str, Any]] = {}
    if index.has_hashes:
        infos, _ = inspect_files(list(paths), progress=progress, num_workers=num_workers)
    return match_inputs(index, paths, infos)


def role_counts(seen: Sequence[Seen]) -> dict[str, int]:
    """{"train": k, "val": m, "test": t, "unseen": u} over the inputs."""
    counts = {role: sum(s.role == role for s in seen) for role in ROLES}
    counts[UNSEEN] = len(seen) - sum(counts.values())
    return counts


def describe_seen(
    counts: Mapping[str, int], noun: str = "inputs", subject: str = "their p_tb is"
) -> str | None:
    """One sentence when some inputs are train or val images (or patients) of the model, with
    exact counts; None when none is. `subject`: what is no evidence of generalisation."""
    total = sum(counts.values())
    train, val = counts.get("train", 0), counts.get("val", 0)
    if not train and not val:
        return None
    if train:
        text = f"{train} of {total} {noun} are images or patients this model trained on (its "
        text += "train split)"
        if val:
            text += f" and {val} more are of its validation split"
    else:
        text = f"{val} of {total} {noun} are images or patients of this model's validation split"
    # The val split picked the checkpoint and the threshold: not trained on, still not new.
    text += " (which chose its checkpoint and threshold)" if val else ""
    return f"{text}; {subject} not evidence of how it generalises (see seen_in_training)."
