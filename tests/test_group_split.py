"""Patient-safe splits: groups stay whole, k-fold covers every image once, test is held out."""

from __future__ import annotations

import csv
import random

import pytest

from data_builders import class_tree
from datamodules import make_datamodule
from tb_lightning.core.errors import ConfigError
from tb_lightning.data.split import group_stratified_folds, group_stratified_split, read_split_sides


def patients(n_patients: int, seed: int = 0) -> tuple[list[int], list[str]]:
    """Labels and patient ids: 1-4 images per patient, a third of the patients TB."""
    rng = random.Random(seed)
    labels: list[int] = []
    groups: list[str] = []
    for p in range(n_patients):
        for _ in range(rng.randint(1, 4)):
            labels.append(int(p % 3 == 0))
            groups.append(f"p{p}")
    return labels, groups


def test_group_split_keeps_patients_whole_and_stratifies():
    labels, groups = patients(200)
    train, val = group_stratified_split(labels, groups, 0.2, seed=3)
    assert sorted(train + val) == list(range(len(labels)))
    assert not {groups[i] for i in train} & {groups[i] for i in val}
    val_tb = sum(labels[i] for i in val) / len(val)
    assert abs(val_tb - sum(labels) / len(labels)) < 0.05
    assert abs(len(val) - 0.2 * len(labels)) <= 4  # whole patients of <= 4 images
    assert group_stratified_split(labels, groups, 0.2, seed=3) == (train, val)


def test_one_image_per_patient_is_an_exact_stratified_split():
    labels = [0] * 3500 + [1] * 700
    train, val = group_stratified_split(labels, [str(i) for i in range(4200)], 600, seed=0)
    assert len(val) == 600 and sum(labels[i] for i in val) == 100


@pytest.mark.parametrize("num_folds", [2, 5])
def test_kfold_covers_every_image_once_with_patients_whole(num_folds):
    labels, groups = patients(120, seed=1)
    folds = group_stratified_folds(labels, groups, num_folds, seed=0)
    assert set(folds) == set(range(num_folds))  # every image has exactly one fold
    for group in set(groups):
        assert len({f for f, g in zip(folds, groups, strict=True) if g == group}) == 1
    for label in (0, 1):
        sizes = [
            sum(1 for f, y in zip(folds, labels, strict=True) if f == k and y == label)
            for k in range(num_folds)
        ]
        assert max(sizes) - min(sizes) <= 4  # balanced up to one patient
    with pytest.raises(ConfigError, match="data.num_folds"):
        group_stratified_folds(labels, groups, 1, seed=0)


def test_datamodule_folds_and_test_split(tmp_path):
    class_tree(tmp_path, counts=(20, 10))
    common = dict(root=str(tmp_path), image_size=64, num_workers=0, test_size=6, num_folds=3)
    val_sets, test_sets = [], []
    for fold in range(3):
        dm = make_datamodule(fold=fold, **common)
        dm.setup()
        val_sets.append({s.path for s in dm.val_samples})
        test_sets.append({s.path for s in dm.test_samples})
        assert dm.class_counts("test") == [4, 2]
        assert not {s.path for s in dm.train_samples} & (val_sets[-1] | test_sets[-1])
        dm.write_split(tmp_path / f"split{fold}.csv")
    assert test_sets[0] == test_sets[1] == test_sets[2]  # one held-out test split for all folds
    all_val = [p for v in val_sets for p in v]
    assert len(all_val) == len(set(all_val)) == 24  # each non-test image in exactly one val fold
    sides = read_split_sides(tmp_path / "split0.csv")
    assert {s.path for s in sides["test"]} == test_sets[0]
    rows = list(csv.DictReader((tmp_path / "split0.csv").open()))
    assert {r["split"] for r in rows} == {"train", "val", "test"}


def test_patients_never_straddle_train_and_val(tmp_path):
    class_tree(tmp_path / "img", counts=(16, 16))
    rows = ["path,label,patient_id"]
    for name in ("Normal", "Tuberculosis"):
        rows += [f"img/{name}/{name}-{i}.png,{name},{name}-{i % 5}" for i in range(16)]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    for seed in range(5):
        dm = make_datamodule(
            source="manifest",
            root=str(tmp_path / "list.csv"),
            image_size=64,
            num_workers=0,
            val_size=0.25,
            split_seed=seed,
        )
        dm.setup()
        assert not {s.patient_id for s in dm.train_samples} & {s.patient_id for s in dm.val_samples}
        assert dm.report["patients"] == 10
