"""Stratified, seeded train/val split, and its `split.csv` form (written and reloaded)."""

from __future__ import annotations

import csv
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

from tb_lightning.core.atomic import atomic_write_csv
from tb_lightning.core.errors import ConfigError, DataError
from tb_lightning.core.labels import CLASS_NAMES
from tb_lightning.data.sources import Sample, is_inside

SPLIT_COLUMNS = (
    "path",
    "label",
    "class_name",
    "split",
    "patient_id",
    "source",
    "sha256",
    "phash",
)


def resolve_val_count(val_size: int | float, num_samples: int, key: str = "data.val_size") -> int:
    """`data.val_size` as a count: an int is a count (the reference's 600), a float a fraction."""
    if isinstance(val_size, bool) or not isinstance(val_size, int | float):
        raise ConfigError(
            f"{key}={val_size!r} is not a number; use a count like 600 or a fraction like 0.15."
        )
    if isinstance(val_size, float):
        if not 0.0 < val_size < 1.0:
            raise ConfigError(
                f"{key}={val_size} is not a fraction in (0, 1); use e.g. 0.15, or an "
                "integer count of validation images."
            )
        return max(1, round(val_size * num_samples))
    if not 0 < val_size < num_samples:
        raise ConfigError(
            f"{key}={val_size} must be between 1 and {num_samples - 1} (the data has "
            f"{num_samples} images); use a smaller count or a fraction like 0.15."
        )
    return val_size


def allocate_per_class(class_counts: Sequence[int], val_count: int) -> list[int]:
    """Split val_count over the classes in proportion to their sizes (largest remainder)."""
    total = sum(class_counts)
    exact = [n * val_count / total for n in class_counts]
    alloc = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: exact[i] - alloc[i], reverse=True)
    for i in by_remainder[: val_count - sum(alloc)]:
        alloc[i] += 1
    return alloc


def stratified_split(
    labels: Sequence[int], val_size: int | float, seed: int
) -> tuple[list[int], list[int]]:
    """Indices (train, val) with each class represented in proportion on both sides.

    The same labels, val_size and seed always give the same split (Python's `random.Random` is
    stable across platforms and versions).
    """
    val_count = resolve_val_count(val_size, len(labels))
    by_class = [[i for i, y in enumerate(labels) if y == c] for c in range(len(CLASS_NAMES))]
    per_class_val = allocate_per_class([len(idx) for idx in by_class], val_count)
    rng = random.Random(seed)
    train: list[int] = []
    val: list[int] = []
    for class_name, indices, n_val in zip(CLASS_NAMES, by_class, per_class_val, strict=True):
        if n_val == 0 or n_val >= len(indices):
            side = "validation" if n_val == 0 else "training"
            raise ConfigError(
                f"data.val_size={val_size} leaves no {class_name} image for {side} "
                f"({len(indices)} {class_name} images of {len(labels)}); choose a val_size "
                "that keeps every class on both sides."
            )
        shuffled = indices.copy()
        rng.shuffle(shuffled)
        val.extend(shuffled[:n_val])
        train.extend(shuffled[n_val:])
    # Shuffled, not sorted by class: a validation batch then holds both classes (AUROC is
    # defined on Lightning's sanity-check batches too), and the order is still seeded.
    rng.shuffle(val)
    return sorted(train), val


def write_split_csv(
    path: str | Path,
    train: Sequence[Sample],
    val: Sequence[Sample],
    test: Sequence[Sample] = (),
    hashes: Mapping[str, tuple[str, str]] | None = None,
) -> None:
    """Write the split so that `data.split_file=<path>` reproduces it exactly.

    `hashes` (path -> (SHA-256, pHash) from the scan) fill the sha256/phash columns, so that
    predict and eval can tell which of their inputs the model has seen (inference/seen.py) even
    renamed or resized; a path without them gets empty cells.
    """
    hashes = hashes or {}
    rows = [
        [s.path, s.label, CLASS_NAMES[s.label], split, s.patient_id, s.source]
        + list(hashes.get(s.path, ("", "")))
        for split, samples in (("train", train), ("val", val), ("test", test))
        for s in samples
    ]
    atomic_write_csv(path, SPLIT_COLUMNS, rows)


def read_split_csv(path: str | Path) -> tuple[list[Sample], list[Sample]]:
    """Read a `split.csv` back into (train, val); every listed file must still exist."""
    sides = read_split_sides(path)
    return sides["train"], sides["val"]


# What `<key>=null` does, for the fix of each key's messages.
NULL_MEANS = {
    "data.split_file": "make a new split with data.split_file=null",
    "eval.split_file": "use the checkpoint's own split.csv with eval.split_file=null",
}


def read_split_sides(
    path: str | Path,
    key: str = "data.split_file",
    roots: Sequence[Path] | None = None,
    roots_name: str = "data.root",
    outside_fix: str = (
        "pass data.root=<the folder that holds the images>, remove the row, or set "
        "data.allow_outside_paths=true if the file is trusted"
    ),
) -> dict[str, list[Sample]]:
    """Read a `split.csv` into {"train": [...], "val": [...], "test": [...] (maybe empty)}.

    `key` is the setting that named the file (data.split_file for training, eval.split_file for
    eval), for the messages. With `roots`, every row must lie inside one of those folders once
    symlinks are resolved (sources.is_inside), checked before any listed file is touched; the
    message names them as `roots_name` and ends with `outside_fix` (which names the setting
    that lifts the rule).

    The sha256/phash columns are not needed here (older runs' files lack them): setup hashes
    every image again when it checks it.
    """
    path = Path(path).expanduser()
    fix_null = NULL_MEANS.get(key, f"set {key}=null")
    if not path.is_file():
        raise DataError(
            f"{key}={path} does not exist; pass the split.csv of an earlier run, or {fix_null}."
        )
    sides: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing_columns = {"path", "label", "split"} - set(reader.fieldnames or [])
        if missing_columns:
            raise DataError(
                f"{key}={path} lacks the column(s) {sorted(missing_columns)}; use a "
                "split.csv written by tb_lightning.train."
            )
        for line, row in enumerate(reader, start=2):
            if row["split"] not in sides or row["label"] not in ("0", "1"):
                raise DataError(
                    f"{key}={path} has a row with split={row['split']!r} "
                    f"label={row['label']!r} (allowed: split train/val/test, label 0/1); fix or "
                    "regenerate the file."
                )
            image = Path(row["path"])
            if roots is not None and not any(is_inside(image, root) for root in roots):
                where = " or ".join(str(root) for root in roots)
                raise DataError(
                    f"{key}={path} line {line} lists {row['path']!r} ({row['split']} row), which "
                    f"is outside {roots_name} {where} (symlinks followed: "
                    f"{image.expanduser().resolve()}); {outside_fix}."
                )
            sample = Sample(
                str(image),
                int(row["label"]),
                row.get("patient_id") or image.stem,
                row.get("source") or "split_file",
            )
            sides[row["split"]].append(sample)
    missing = [s.path for side in sides.values() for s in side if not Path(s.path).is_file()]
    if missing:
        raise DataError(
            f"{key}={path} lists {len(missing)} file(s) that do not exist, e.g. "
            f"{missing[0]}; restore the images or {fix_null}."
        )
    for side in ("train", "val"):
        if not sides[side]:
            raise DataError(f"{key}={path} has no '{side}' rows; regenerate it.")
    return sides


def split_class_problem(sides: Mapping[str, Sequence[Sample]]) -> str | None:
    """Which split lacks a class, as a clause ("its val split has 1 image(s) (1 Normal, 0
    Tuberculosis)"), or None when train, val and (when it has rows) test each hold both.

    One image of each class per split is all the rest needs, and it needs that much: the loss
    weights the classes by their train counts (#Normal / #TB), and the threshold choice, AUROC
    and average precision compare the classes on val and test.
    """
    for side in ("train", "val", "test"):
        samples = sides.get(side) or []
        if side == "test" and not samples:
            continue
        counts = [sum(1 for s in samples if s.label == c) for c in range(len(CLASS_NAMES))]
        if min(counts) == 0:
            described = ", ".join(
                f"{n} {name}" for name, n in zip(CLASS_NAMES, counts, strict=True)
            )
            return f"its {side} split has {len(samples)} image(s) ({described})"
    return None


# Patient-safe splits. scikit-learn's StratifiedGroupKFold only gives 1/k fractions and its
# GroupShuffleSplit is not stratified, while data.val_size / data.test_size are exact counts (the
# seed's 600) or fractions; these small greedy splitters do both, seeded with random.Random.


def group_table(labels: Sequence[int], groups: Sequence[str]) -> dict[str, list[int]]:
    """Sample indices per group, in first-seen order."""
    if len(labels) != len(groups):
        raise ValueError("labels and groups differ in length")
    table: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        table.setdefault(group, []).append(i)
    return table


def groups_by_class(
    labels: Sequence[int], groups: Sequence[str], seed: int
) -> list[list[list[int]]]:
    """Per class, the shuffled groups (index lists) whose class it is.

    A group's class is the highest label among its images: a patient with any TB image counts
    as a TB patient, so TB patients are spread over the sides like TB images.
    """
    rng = random.Random(seed)
    per_class: list[list[list[int]]] = [[] for _ in CLASS_NAMES]
    for members in group_table(labels, groups).values():
        per_class[max(labels[i] for i in members)].append(members)
    for class_groups in per_class:
        rng.shuffle(class_groups)
    return per_class


def group_stratified_split(
    labels: Sequence[int],
    groups: Sequence[str],
    val_size: int | float,
    seed: int,
    key: str = "data.val_size",
) -> tuple[list[int], list[int]]:
    """Indices (train, val), stratified by class, with every group wholly on one side.

    With one image per group this is an exact stratified split; with larger groups each class
    gets as close to its share of val_size as whole groups allow.
    """
    val_count = resolve_val_count(val_size, len(labels), key)
    per_class = groups_by_class(labels, groups, seed)
    class_sizes = [sum(len(g) for g in class_groups) for class_groups in per_class]
    targets = allocate_per_class(class_sizes, val_count)
    rng = random.Random(seed)
    train: list[int] = []
    val: list[int] = []
    for class_name, class_groups, target in zip(CLASS_NAMES, per_class, targets, strict=True):
        taken = 0
        for members in class_groups:
            # Take a group when it brings this class's val count closer to its target.
            if abs(taken + len(members) - target) < abs(taken - target):
                val.extend(members)
                taken += len(members)
            else:
                train.extend(members)
        on_train = sum(len(g) for g in class_groups) - taken
        if taken == 0 or on_train == 0:
            side = "validation" if taken == 0 else "training"
            raise ConfigError(
                f"{key}={val_size} leaves no {class_name} image for {side} "
                f"({class_sizes[CLASS_NAMES.index(class_name)]} {class_name} images of "
                f"{len(labels)}); choose a size that keeps every class on both sides."
            )
    rng.shuffle(val)  # mixed classes in every val batch, as in stratified_split
    return sorted(train), val


def group_stratified_folds(
    labels: Sequence[int], groups: Sequence[str], num_folds: int, seed: int
) -> list[int]:
    """The fold (0..num_folds-1) of every sample: stratified by class, groups kept whole.

    Groups are dealt largest first to the fold that holds the fewest images of their class,
    so fold sizes per class differ by at most one group.
    """
    if isinstance(num_folds, bool) or not isinstance(num_folds, int) or num_folds < 2:
        raise ConfigError(f"data.num_folds={num_folds!r} must be an integer >= 2 (or null).")
    fold_of = [-1] * len(labels)
    per_class = groups_by_class(labels, groups, seed)
    totals = [0] * num_folds
    for class_name, class_groups in zip(CLASS_NAMES, per_class, strict=True):
        if len(class_groups) < num_folds:
            raise ConfigError(
                f"data.num_folds={num_folds} is more than the {len(class_groups)} {class_name} "
                "patients; use fewer folds."
            )
        class_counts = [0] * num_folds
        # sorted() is stable: equal-sized groups keep their seeded shuffled order.
        for members in sorted(class_groups, key=len, reverse=True):
            fold = min(range(num_folds), key=lambda f: (class_counts[f], totals[f], f))
            class_counts[fold] += len(members)
            totals[fold] += len(members)
            for i in members:
                fold_of[i] = fold
    return fold_of
