"""Fuzz replays (issue 24): `ckpt_path=<folder>` is an ensemble only when its jobs are the folds
of one k-fold run (repeated over seeds at most), each once, all there.

One 3-fold run is trained (the session's, conftest.kfold_run: 1 epoch on the tiny phantom set);
every attack is a copy of it with job folders deleted, copied or edited (their saved
.hydra/config.yaml and metrics.json), as a user's folder would be. The CLI is run where it
adds something (exit code 1, one sentence, the files written with allow_partial=true); the
other refusals call load_ensemble directly.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import KFOLD_FOLDS, KFOLD_TEST_SIZE, run_cli
from tb_lightning.core.errors import ConfigError, UserError
from tb_lightning.data.split import read_split_sides
from tb_lightning.data.transforms import build_transform, load_image
from tb_lightning.stats.thresholds import choose_threshold
from tb_lightning.trained.checkpoint import load_checkpoint_file
from tb_lightning.trained.ensemble import load_ensemble
from tb_lightning.trained.ensemble_model import describe_missing

FOLDS = 3
SEED = 42  # conf/train.yaml's


@pytest.fixture
def kfold_dir(kfold_run) -> Path:
    """The one trained folder: the session's 3-fold multirun (conftest.kfold_run) with its
    shared 8-image test split. Attacks work on copies of its jobs."""
    assert (KFOLD_FOLDS, KFOLD_TEST_SIZE) == (FOLDS, 8)
    return kfold_run


def folder_of(kfold_dir: Path, target: Path, jobs: dict[int, int]) -> Path:
    """A multirun folder at target whose job `name` is a copy of the trained job `source`."""
    for name, source in jobs.items():
        shutil.copytree(kfold_dir / str(source), target / str(name))
    return target


def edit_job(job: Path, **changes: object) -> None:
    """Change keys (dotted, `__` for `.`) of a job's saved config, and of its metrics.json where
    it records them, as a job trained with those values would hold them."""
    config = OmegaConf.load(job / ".hydra" / "config.yaml")
    metrics = json.loads((job / "metrics.json").read_text())
    for name, value in changes.items():
        key = name.replace("__", ".")
        OmegaConf.update(config, key, value, merge=False)
        if key in metrics:
            metrics[key] = value
    OmegaConf.save(config, job / ".hydra" / "config.yaml")
    (job / "metrics.json").write_text(json.dumps(metrics))


def refusal(folder: Path, **kwargs: object) -> str:
    with pytest.raises(UserError) as caught:
        load_ensemble(folder, **kwargs)
    assert not isinstance(caught.value, ConfigError)
    return str(caught.value)


@pytest.mark.slow
def test_a_missing_fold_is_refused_through_the_cli(kfold_dir, phantom_root, tmp_path):
    folder = folder_of(kfold_dir, tmp_path / "missing", {0: 0, 2: 2})  # job 1 deleted
    out = tmp_path / "predict"
    result = run_cli(
        "tb_lightning.predict", f"ckpt_path={folder}", f"input={phantom_root}",
        f"hydra.run.dir={out}",
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert (
        f"ckpt_path={folder.resolve()} is not a complete k-fold ensemble: fold 1 of 3 is "
        "missing; train it again with the run's overrides (the run folder copied in as a job), "
        "or pass allow_partial=true to use the 2 fold models there are."
    ) in output
    assert "Traceback" not in output
    assert not (out / "predictions.csv").exists()


@pytest.mark.slow
def test_attacks_are_refused_with_their_sentence(kfold_dir, tmp_path):
    # Only job 0: a "1 fold model" ensemble.
    only_0 = folder_of(kfold_dir, tmp_path / "only_0", {0: 0})
    assert re.search(
        "folds 1 and 2 of 3 are missing;.* use the 1 fold model there is.", refusal(only_0)
    )

    # An lr sweep (no folds): two runs on the same val split.
    lr_sweep = folder_of(kfold_dir, tmp_path / "lr_sweep", {0: 0, 1: 0})
    for job, lr in ((0, 1e-4), (1, 1e-3)):
        edit_job(lr_sweep / str(job), data__num_folds=None, data__fold=0)
        edit_job(lr_sweep / str(job), model__optimizer__lr=lr)
    assert (
        f"ckpt_path={lr_sweep.resolve()} is not a k-fold ensemble: job 0 is not a k-fold job "
        "(data.num_folds is null);"
    ) in refusal(lr_sweep)

    # A k-fold x lr sweep: the lr=1e-3 run's fold 0 among the lr=1e-4 run's folds.
    kfold_lr = folder_of(kfold_dir, tmp_path / "kfold_lr", {0: 0, 1: 1, 2: 2, 3: 0})
    edit_job(kfold_lr / "3", model__optimizer__lr=1e-3)
    assert (
        "job 3 is not a fold of this run (differs in model.optimizer.lr: 0.001, against 0.0001 "
        "in job 0); an ensemble is the folds of one `-m sweep=kfold` run"
    ) in refusal(kfold_lr)

    # A copied job: fold 0 twice.
    copied = folder_of(kfold_dir, tmp_path / "copied", {0: 0, 1: 1, 2: 2, 3: 0})
    assert "jobs 0 and 3 are both fold 0 (seed 42), which would count" in refusal(copied)
    # ... allow_partial accepts missing folds, never a fold twice.
    assert "jobs 0 and 3 are both fold 0 (seed 42)" in refusal(copied, allow_partial=True)

    # An ordinary run (no folds) mixed in.
    ordinary = folder_of(kfold_dir, tmp_path / "ordinary", {0: 0, 1: 1, 2: 2, 3: 0})
    edit_job(ordinary / "3", data__num_folds=None, data__fold=0)
    assert "job 3 is not a k-fold job (data.num_folds is null);" in refusal(ordinary)

    # Another run's fold: a 5-fold run's fold 3 mixed in.
    other = folder_of(kfold_dir, tmp_path / "other", {0: 0, 1: 1, 2: 2, 3: 0})
    edit_job(other / "3", data__num_folds=5, data__fold=3)
    assert "job 3 is not a fold of this run (differs in data.num_folds: 5, against 3 in job 0)" in (
        refusal(other)
    )

    # A job without its saved config: nothing says which fold it is.
    no_config = folder_of(kfold_dir, tmp_path / "no_config", {0: 0, 1: 1, 2: 2})
    shutil.rmtree(no_config / "1" / ".hydra")
    assert "job 1 has no .hydra/config.yaml" in refusal(no_config)

    # Seeds whose test splits differ (data.split_seed followed the seed): members trained on
    # each other's test images.
    moved = folder_of(kfold_dir, tmp_path / "moved_test", {0: 0, 1: 1, 2: 2, 3: 0, 4: 1, 5: 2})
    for job in (3, 4, 5):
        edit_job(moved / str(job), seed=7)
    split_csv = moved / "4" / "split.csv"
    lines = split_csv.read_text().splitlines(keepends=True)
    first_test = next(i for i, line in enumerate(lines) if ",test," in line)
    lines[first_test] = lines[first_test].replace(",test,", ",train,")
    split_csv.write_text("".join(lines))
    assert (
        f"the test split of {split_csv.resolve()} is not that of {(moved / '0').resolve()}"
        "/split.csv, so some members trained on the others' test images"
    ) in refusal(moved)


def logits_of(loaded, paths: list[str]) -> np.ndarray:
    """A member's logits, computed here from the files, independently of the runner."""
    transform = build_transform(loaded.image_size, loaded.preprocess)
    images = torch.stack([transform(load_image(p)) for p in paths])
    with torch.no_grad():
        return loaded.model(images).double().numpy()


@pytest.mark.slow
def test_a_seed_by_fold_folder_pools_each_image_once(kfold_dir, tmp_path):
    """Seed 7's folds are the trained models with their val folds rotated (job 3 + f holds
    model f and the split of fold f + 1), so that each image's two out-of-fold scores differ."""
    folder = folder_of(kfold_dir, tmp_path / "seeds", {0: 0, 1: 1, 2: 2, 3: 0, 4: 1, 5: 2})
    for fold in range(FOLDS):
        job = folder / str(FOLDS + fold)
        edit_job(job, seed=7)
        shutil.copy(kfold_dir / str((fold + 1) % FOLDS) / "split.csv", job / "split.csv")
    loaded = load_ensemble(folder)

    assert loaded.ensemble_folds == {"num_folds": FOLDS, "seeds": [SEED, 7], "missing_folds": []}
    assert len(loaded.member_checkpoints) == 2 * FOLDS
    # Computed here: each image's mean logit over the members whose val split holds it.
    scores: dict[str, list[float]] = {}
    labels: dict[str, int] = {}
    for job in range(2 * FOLDS):
        member = load_checkpoint_file(folder / str(job) / "checkpoints" / "best.ckpt")
        val = read_split_sides(folder / str(job) / "split.csv")["val"]
        for sample, logit in zip(val, logits_of(member, [s.path for s in val]), strict=True):
            scores.setdefault(sample.path, []).append(logit)
            labels[sample.path] = sample.label
    assert {len(v) for v in scores.values()} == {2}  # one model per seed, each image once
    paths = list(scores)
    mean_logits = np.array([np.mean(scores[p]) for p in paths])
    assert any(abs(a - b) > 1e-4 for a, b in scores.values())  # the pooling is exercised
    threshold = choose_threshold(
        1 / (1 + np.exp(-mean_logits)), np.array([labels[p] for p in paths]), "youden"
    )
    choice = loaded.stored_threshold
    assert choice["value"] == pytest.approx(threshold, abs=1e-6)
    assert choice["val_images"] == len(paths) == 28  # 36 phantoms - 8 test, each counted once
    assert choice["chosen_on"] == (
        "the out-of-fold predictions of the 6 fold models of 2 seeds (each image's mean over "
        "those that did not train on it, one per seed)"
    )
    # The ensemble itself: the mean logit of all six members.
    members = [
        load_checkpoint_file(folder / str(j) / "checkpoints" / "best.ckpt") for j in range(6)
    ]
    expected = np.mean([logits_of(m, paths[:6]) for m in members], axis=0)
    np.testing.assert_allclose(logits_of(loaded, paths[:6]), expected, atol=1e-5)


@pytest.mark.slow
def test_allow_partial_accepts_a_missing_fold_and_says_so(kfold_dir, tmp_path):
    folder = folder_of(kfold_dir, tmp_path / "missing", {0: 0, 2: 2})
    out = tmp_path / "eval"
    result = run_cli(
        "tb_lightning.eval", f"ckpt_path={folder}", "allow_partial=true", "eval.split=test",
        "eval.bootstrap=100", f"hydra.run.dir={out}",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (out / "report.txt").read_text()
    members = ", ".join(f"{job}/checkpoints/best.ckpt" for job in (0, 2))
    assert (
        f"Ensemble: the mean logit of 2 fold models ({members}); fold 1 of 3 is missing "
        "(allow_partial=true)\n"
    ) in report
    assert "the 2 fold models (fold 1 of 3 missing: allow_partial=true)" in report
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["ensemble_members"]) == 2
    assert metrics["ensemble_missing_folds"] == [{"fold": 1, "seed": SEED}]
    assert "fold 1 of 3 is missing (allow_partial=true)" in (out / "eval.log").read_text()

    exported = tmp_path / "export"
    result = run_cli(
        "tb_lightning.export", f"ckpt_path={folder}", "allow_partial=true", "format=torchscript",
        "check_images=2", f"hydra.run.dir={exported}",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sidecar = json.loads((exported / "model.json").read_text())
    assert sidecar["ensemble"]["num_folds"] == FOLDS
    assert sidecar["ensemble"]["missing_folds"] == [{"fold": 1, "seed": SEED}]
    assert len(sidecar["ensemble"]["members"]) == 2
    assert "fold 1 of 3 missing" in sidecar["threshold_source"]


def test_missing_folds_are_named_per_seed():
    one_seed = {"num_folds": 5, "seeds": [42], "missing_folds": [{"fold": 3, "seed": 42}]}
    assert describe_missing(one_seed) == "fold 3 of 5 is missing"
    one_seed["missing_folds"] = [{"fold": f, "seed": 42} for f in (1, 2, 4)]
    assert describe_missing(one_seed) == "folds 1, 2 and 4 of 5 are missing"
    seeds = {
        "num_folds": 3,
        "seeds": [0, 1],
        "missing_folds": [{"fold": 2, "seed": 0}, {"fold": 0, "seed": 1}],
    }
    assert describe_missing(seeds) == "fold 2 of 3 (seed 0) and fold 0 of 3 (seed 1) are missing"
    assert describe_missing({"num_folds": 3, "seeds": [0], "missing_folds": []}) is None


@pytest.mark.parametrize("task", ["eval", "predict", "export"])
def test_allow_partial_must_be_a_boolean(task):
    from hydra import compose, initialize_config_dir

    from tb_lightning.config import CONF_DIR, checks

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(task, ["ckpt_path=x.ckpt", "allow_partial=yes"])
    check = getattr(checks, f"check_{task}_config")
    with pytest.raises(ConfigError, match=re.escape("allow_partial='yes' must be true or false")):
        check(cfg)
