"""Inputs the model has seen: split.csv's hashes, inference/seen.py, and what predict and eval
say about images (or patients) of the training run's train/val/test splits."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest
from PIL import Image

from conftest import eval_config
from data_builders import write_png
from datamodules import make_datamodule
from tb_lightning.data.integrity import inspect_file
from tb_lightning.data.sources import Sample
from tb_lightning.data.split import SPLIT_COLUMNS, read_split_sides, write_split_csv
from tb_lightning.eval import evaluate
from tb_lightning.inference import seen as seen_module
from tb_lightning.inference.predict_files import collect_inputs, run_prediction
from tb_lightning.inference.seen import (
    Seen,
    describe_seen,
    load_training_index,
    match_inputs,
    patient_of,
    role_counts,
    seen_in_training,
)
from tb_lightning.trained.checkpoint import load_checkpoint_file
from tb_lightning.trained.model import TrainedModel

# Only checkpoints loaded here, nothing trained: loads without the discarded init (conftest).
pytestmark = pytest.mark.usefixtures("quick_loads")


@pytest.fixture(scope="module")
def loaded(trained_run):
    return load_checkpoint_file(trained_run / "checkpoints" / "best.ckpt")


def split_rows(split_csv: Path) -> list[dict[str, str]]:
    with split_csv.open(newline="") as f:
        return list(csv.DictReader(f))


def predicted_rows(folder: Path) -> dict[str, dict[str, str]]:
    """predictions.csv of a predict or eval run, by file name."""
    with (folder / "predictions.csv").open(newline="") as f:
        return {Path(r["path"]).name: r for r in csv.DictReader(f)}


def fake_run(folder: Path, rows: list[tuple[str, str]], hashes: bool = True) -> Path:
    """A run directory whose split.csv lists (path, split) rows, with the files' hashes."""
    sides: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    for path, split in rows:
        sides[split].append(Sample(path, 0, Path(path).stem, "folder"))
    infos = {path: inspect_file(path) for path, _ in rows} if hashes else {}
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    write_split_csv(
        folder / "split.csv",
        sides["train"],
        sides["val"],
        sides["test"],
        {p: (i["sha256"], i["phash"]) for p, i in infos.items()},
    )
    return folder


def as_run(loaded, run_dir: Path):
    """The session's model, as if its checkpoint lived in run_dir (no weights copied)."""
    return dataclasses.replace(loaded, checkpoint_path=run_dir / "checkpoints" / "best.ckpt")


def no_model(run_dirs: list[Path]) -> TrainedModel:
    """A TrainedModel without a network, for what seen.py reads of it: where its run(s) are
    (one run dir, or an ensemble's members)."""
    checkpoints = [run / "checkpoints" / "best.ckpt" for run in run_dirs]
    return TrainedModel(
        model=None,
        checkpoint_path=checkpoints[0],
        image_size=64,
        stored_threshold=None,
        hparams_threshold=0.5,
        pos_weight=1.0,
        member_checkpoints=checkpoints if len(checkpoints) > 1 else None,
    )


def test_split_csv_carries_each_images_hashes(trained_run):
    rows = split_rows(trained_run / "split.csv")
    assert tuple(rows[0]) == SPLIT_COLUMNS and {"sha256", "phash"} <= set(rows[0])
    for row in rows[::7]:
        info = inspect_file(row["path"])
        assert (row["sha256"], row["phash"]) == (info["sha256"], info["phash"])


def test_split_files_with_or_without_hashes_read_and_reload_alike(trained_run, tmp_path):
    """An older split.csv (no hash columns) still reads, and data.split_file= on it writes a
    split.csv with the same rows and the hashes."""
    new = read_split_sides(trained_run / "split.csv")
    old_csv = tmp_path / "old_split.csv"
    with old_csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, SPLIT_COLUMNS[:-2], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(split_rows(trained_run / "split.csv"))
    assert "sha256" not in old_csv.read_text()
    assert read_split_sides(old_csv) == new
    datamodule = make_datamodule(
        source="folder", root=str(tmp_path), image_size=64, split_file=str(old_csv), num_workers=0
    )
    datamodule.setup("fit")
    datamodule.write_split(tmp_path / "split.csv")
    assert read_split_sides(tmp_path / "split.csv") == new
    rewritten = {r["path"]: r for r in split_rows(tmp_path / "split.csv")}
    for row in split_rows(trained_run / "split.csv"):
        assert rewritten[row["path"]] == row


def test_predict_on_its_training_folder_marks_every_image(
    trained_run, loaded, phantom_root, tmp_path, caplog
):
    roles = {Path(r["path"]).name: r["split"] for r in split_rows(trained_run / "split.csv")}
    # The phantoms are far apart (>= 34 bits): no image borrows another's role by pHash.
    report = json.loads((trained_run / "data_report.json").read_text())
    assert report["duplicates"]["near_pairs_across_split"] == 0
    paths = collect_inputs(phantom_root)
    with caplog.at_level(logging.INFO):
        run_prediction(loaded, paths, 0.5, "test", tmp_path)
    rows = predicted_rows(tmp_path)
    assert len(rows) == len(paths) == len(roles)
    assert {name: r["seen_in_training"] for name, r in rows.items()} == roles
    assert {r["seen_by"] for r in rows.values()} == {"sha256"}
    n_train = sum(role == "train" for role in roles.values())
    n_val = sum(role == "val" for role in roles.values())
    assert (
        f"{n_train} of {len(paths)} inputs are images or patients this model trained on (its "
        f"train split) and {n_val} more are of its validation split" in caplog.text
    )
    assert "not evidence of how it generalises" in caplog.text


def test_predict_finds_copies_by_bytes_perceptual_hash_and_patient(
    trained_run, loaded, tmp_path, caplog
):
    sides = read_split_sides(trained_run / "split.csv")
    train_image, val_image = Path(sides["train"][0].path), Path(sides["val"][0].path)
    # NLM-named training rows (a fake run beside the session's model): patients by file name.
    trained = tmp_path / "trained"
    nlm_train = write_png(trained / "CHNCXR_0007_1.png", seed=7, size=64)
    run_dir = fake_run(
        tmp_path / "run",
        [
            *((s.path, "train") for s in sides["train"]),
            *((s.path, "val") for s in sides["val"]),
            (str(nlm_train), "train"),
        ],
    )
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(train_image, inputs / "renamed.png")
    Image.open(val_image).resize((96, 96)).save(inputs / "resized.png")
    # The same patient at another resolution and in other pixels (another seed).
    write_png(inputs / "CHNCXR_0007_1.png", seed=99, size=128)
    # A training image's name on other pixels: a stem outside the NLM naming is no patient.
    write_png(inputs / train_image.name, seed=123, size=64)
    write_png(inputs / "unrelated.png", seed=321, size=64)
    with caplog.at_level(logging.INFO):
        run_prediction(as_run(loaded, run_dir), collect_inputs(inputs), 0.5, "test", tmp_path / "o")
    rows = predicted_rows(tmp_path / "o")
    seen = {name: (r["seen_in_training"], r["seen_by"]) for name, r in rows.items()}
    assert seen["renamed.png"] == ("train", "sha256")
    role, by = seen["resized.png"]
    assert role == "val" and by.startswith("phash:") and int(by.split(":")[1]) <= 20
    assert seen["CHNCXR_0007_1.png"] == ("train", "patient")
    assert seen[train_image.name] == ("", "")
    assert seen["unrelated.png"] == ("", "")
    assert (
        "2 of 5 inputs are images or patients this model trained on (its train split) and 1 "
        "more are of its validation split" in caplog.text
    )


def test_real_images_of_training_patients_at_another_resolution(shared_data, tmp_path):
    """shenzhen-512 holds 11 patients of nlm-tb-128 at 512/256 px: all found, by patient."""
    small, large = shared_data / "nlm-tb-128", shared_data / "shenzhen-512"
    if not small.is_dir() or not large.is_dir():
        pytest.skip("nlm-tb-128 or shenzhen-512 not found")
    inputs = sorted(str(p) for p in large.rglob("*.png"))
    by_name = {p.name: p for p in small.rglob("*.png")}
    training = [str(by_name[Path(p).name]) for p in inputs if Path(p).name in by_name]
    assert len(training) == len(inputs) == 11
    others = sorted(str(p) for p in by_name.values() if str(p) not in training)[:20]
    run_dir = fake_run(tmp_path, [*((p, "train") for p in training), *((p, "val") for p in others)])
    index = load_training_index([run_dir / "split.csv"])
    infos = {p: inspect_file(p) for p in inputs}
    found = match_inputs(index, inputs, infos)
    assert found == [Seen("train", "patient")] * 11
    assert patient_of(inputs[0]) == Path(inputs[0]).stem.rsplit("_", 1)[0]


def test_an_old_split_csv_compares_paths_and_patients_only(tmp_path, caplog, monkeypatch):
    data = tmp_path / "data"
    trained = [write_png(data / f"{name}.png", seed) for seed, name in enumerate("ab")]
    nlm = write_png(data / "MCUCXR_0104_1.png", seed=5, size=64)
    rows = [(str(p), "train") for p in trained] + [(str(nlm), "val")]
    run_dir = fake_run(tmp_path / "run", rows, hashes=False)
    written = split_rows(run_dir / "split.csv")
    with (run_dir / "split.csv").open("w", newline="") as f:  # as older versions wrote it
        writer = csv.DictWriter(f, SPLIT_COLUMNS[:-2], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(written)

    def no_hashing(*args, **kwargs):
        raise AssertionError("inputs hashed although the split file has no hashes")

    monkeypatch.setattr(seen_module, "inspect_files", no_hashing)
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(trained[1], inputs / "renamed.png")
    write_png(inputs / "MCUCXR_0104_1.png", seed=6, size=96)
    # The first training image through a link: the same file, another spelling.
    (inputs / "link.png").symlink_to(trained[0])
    paths = [str(trained[0]), *collect_inputs(inputs)]
    with caplog.at_level(logging.INFO):
        found = seen_in_training(no_model([run_dir]), paths)
    assert found == [Seen("train", "path"), Seen("val", "patient"), Seen("train", "path"), Seen()]
    assert f"{run_dir / 'split.csv'} (written by an older version) has no image hashes" in (
        caplog.text
    )
    assert "by file path and NLM patient only" in caplog.text


def test_eval_on_its_training_folder_says_so(trained_run, phantom_root, tmp_path, caplog):
    roles = [r["split"] for r in split_rows(trained_run / "split.csv")]
    expected = {role: roles.count(role) for role in ("train", "val", "test")}
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        metrics = evaluate(eval_config(ckpt, out, "data=folder", f"data.root={phantom_root}"))
    assert metrics["seen_in_training"] == {**expected, "unseen": 0}
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["seen_in_training"] == metrics["seen_in_training"]
    lines = (out / "report.txt").read_text().splitlines()
    assert lines[0].startswith("Checkpoint: ") and lines[1].startswith("Checkpoint epoch: ")
    assert lines[2].startswith("Operating threshold: ")
    sentence = (
        f"{expected['train']} of {len(roles)} evaluated images are images or patients this "
        f"model trained on (its train split) and {expected['val']} more are of its validation "
        "split"
    )
    assert lines[3].startswith(f"SEEN IN TRAINING: {sentence}")
    assert sentence in caplog.text
    rows = predicted_rows(out)
    assert {r["seen_in_training"] for r in rows.values()} == {"train", "val"}
    assert {r["seen_by"] for r in rows.values()} == {"sha256"}


def test_precedence_train_over_val_over_test_across_members(tmp_path):
    """An ensemble's image that is val for one member and train for another is `train`; within
    one role the strongest match names how; each run's near_duplicate_distance applies."""
    images = {name: str(write_png(tmp_path / "img" / f"{name}.png", seed)) for seed, name in
              enumerate(["kfold", "held_out", "val_or_test", "near", "far"])}  # fmt: skip
    members = [
        fake_run(
            tmp_path / "0",
            [
                (images["kfold"], "val"),
                (images["held_out"], "test"),
                (images["val_or_test"], "val"),
            ],
        ),
        fake_run(
            tmp_path / "1",
            [(images["kfold"], "train"), (images["held_out"], "test")],
        ),
        fake_run(tmp_path / "2", [(images["val_or_test"], "test"), (images["kfold"], "test")]),
    ]
    # Resized copies: "near" of a member with the default distance, "far" of one that allows 0.
    near_row = tmp_path / "3" / "near_original.png"
    far_row = tmp_path / "4" / "far_original.png"
    near_row.parent.mkdir(parents=True)
    far_row.parent.mkdir(parents=True)
    Image.open(images["near"]).resize((160, 160)).save(near_row)
    Image.open(images["far"]).resize((160, 160)).save(far_row)
    members.append(fake_run(tmp_path / "3", [(str(near_row), "test")]))
    members.append(fake_run(tmp_path / "4", [(str(far_row), "train")]))
    (tmp_path / "4" / "data_report.json").write_text(
        json.dumps({"settings": {"near_duplicate_distance": 0}})
    )
    found = seen_in_training(no_model(members), list(images.values()))
    found = dict(zip(images, found, strict=True))
    assert found["kfold"] == Seen("train", "sha256")
    assert found["held_out"] == Seen("test", "sha256")
    assert found["val_or_test"] == Seen("val", "sha256")
    assert found["near"].role == "test" and found["near"].by.startswith("phash:")
    assert int(found["near"].by.split(":")[1]) > 0
    assert found["far"] == Seen()


def test_match_precedence_and_the_sentence(tmp_path):
    """Unit: role first (train > val > test), then the match (sha256 > path > patient >
    phash, nearest first); the counts and the one sentence."""
    zero, three_bits, five_bits = "0" * 64, "7" + "0" * 63, "1f" + "0" * 62
    run = tmp_path / "run"
    run.mkdir()
    rows = [
        ("/data/a.png", "val", "sha-a", zero),
        ("/data/CHNCXR_0001_0.png", "train", "sha-p", "f" * 64),
        ("/data/c.png", "test", "sha-c", three_bits),
        ("/data/d.png", "train", "sha-d", five_bits),
    ]
    with (run / "split.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(SPLIT_COLUMNS)
        for path, split, sha, phash in rows:
            writer.writerow([path, 0, "Normal", split, Path(path).stem, "folder", sha, phash])
    index = load_training_index([run / "split.csv"])
    inputs = ["/in/x.png", "/in/CHNCXR_0001_1.png", "/in/y.png", "/in/z.png", "/in/w.png"]
    infos = {
        "/in/x.png": {"sha256": "sha-a", "phash": zero},  # val by bytes; train d is 5 bits off
        "/in/CHNCXR_0001_1.png": {"sha256": "sha-c", "phash": "0" * 64},  # train patient
        "/in/y.png": {"sha256": "other", "phash": three_bits},  # test c 0, val a 3, train d 6
        "/in/z.png": {"sha256": "other", "phash": "f" * 64},  # only the train patient's hash
        "/in/w.png": {},  # a bad file: no hashes
    }
    found = match_inputs(index, inputs, infos)
    assert found == [
        Seen("train", "phash:5"),
        Seen("train", "patient"),
        Seen("train", "phash:6"),
        Seen("train", "phash:0"),
        Seen(),
    ]
    counts = role_counts([*found, Seen("val", "sha256"), Seen("test", "path")])
    assert counts == {"train": 4, "val": 1, "test": 1, "unseen": 1}
    sentence = describe_seen(counts)
    assert sentence == (
        "4 of 7 inputs are images or patients this model trained on (its train split) and 1 "
        "more are of its validation split (which chose its checkpoint and threshold); their "
        "p_tb is not evidence of how it generalises (see seen_in_training)."
    )
    assert describe_seen({"train": 0, "val": 0, "test": 2, "unseen": 3}) is None
