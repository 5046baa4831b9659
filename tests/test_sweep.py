"""Multiruns: presets, the sweep summary (verdicts from paired comparisons, repeats pooled into
configurations, k-fold out-of-fold figures), TensorBoard run names."""

from __future__ import annotations

import csv
import json
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from sklearn.metrics import average_precision_score, log_loss, roc_auc_score
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import phantom_overrides, run_cli
from tb_lightning.config import CONF_DIR
from tb_lightning.engine.dashboard import custom_scalars_layout
from tb_lightning.evaluation.compare import PAIRED_RESAMPLES, PAIRED_SEED, draw_resamples
from tb_lightning.sweep.naming import run_name, single_run_name
from tb_lightning.sweep.summary import summarise, write_summary


def compose_hydra(overrides: list[str]):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_sweep_presets_compose():
    grid = compose_hydra(["sweep=lr_dropout"]).hydra.sweeper
    assert grid.params == {"model.optimizer.lr": "1e-4,3e-4,1e-3", "model.net.dropout": "0.3,0.5"}
    cfg = compose_hydra(["sweep=optuna"])
    assert "optuna" in cfg.hydra.sweeper._target_.lower()
    assert cfg.hydra.sweeper.direction == "maximize" and cfg.optimized_metric == "val/auroc"
    assert set(cfg.hydra.sweeper.params) == {"model.optimizer.lr", "model.net.dropout"}


def test_run_names_carry_the_swept_values():
    overrides = ["data.root=/x", "model.optimizer.lr=0.0003", "model.net.dropout=0.5"]
    keys = {"model.optimizer.lr", "model.net.dropout"}
    assert run_name(overrides, keys) == "lr=0.0003,dropout=0.5"
    # Two swept keys with the same last component keep their full names.
    clash = ["model.net.dropout=0.5", "data.dropout=0.1"]
    assert run_name(clash, {"model.net.dropout", "data.dropout"}) == (
        "model.net.dropout=0.5,data.dropout=0.1"
    )


def fake_job(
    sweep_dir: Path,
    num: int,
    overrides: list[str],
    metrics: dict | None,
    error: str | None = None,
    predictions: tuple[list[str], np.ndarray, np.ndarray] | None = None,
) -> None:
    """A job folder as a multirun writes it; `predictions`: (paths, labels, logits) of its val
    images, written as train's predictions.csv."""
    run_dir = sweep_dir / str(num)
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")
    if metrics is not None:
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    if error is not None:
        (run_dir / "error.txt").write_text(error)
    if predictions is not None:
        paths, labels, logits = predictions
        with (run_dir / "predictions.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "split", "label", "source", "logit", "p_tb"])
            for path, label, logit in zip(paths, labels, logits, strict=True):
                writer.writerow([path, "val", label, "x", f"{logit:.9g}", ""])


def scored_job(sweep_dir, num, overrides, paths, labels, logits, error=None):
    """A finished job whose metrics.json figures are computed from its predictions."""
    probs = 1 / (1 + np.exp(-logits.astype(np.float32)))
    metrics = {
        "val/auroc": roc_auc_score(labels, probs),
        "val/average_precision": average_precision_score(labels, probs),
        "val/loss": log_loss(labels, probs),
        "pos_weight": 1.0,
        "val": {"overall": {"ci": {"auroc": [0.5, 0.9]}}},
    }
    fake_job(sweep_dir, num, overrides, metrics, error, (paths, labels, logits))


def noisy_logits(labels: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    return (strength * (2 * labels - 1) + rng.normal(size=len(labels))).astype(np.float32)


def pairs_auroc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The weighted AUROC of every row of `weights` (replicates, images) at once: the weighted
    share of (TB, Normal) pairs that `scores` rank right, ties counting half (Mann-Whitney), as
    scikit-learn's roc_auc_score(sample_weight=row) computes it one row at a time."""
    pos, neg = labels == 1, labels == 0
    right = (scores[pos][:, None] > scores[neg][None, :]) + 0.5 * (
        scores[pos][:, None] == scores[neg][None, :]
    )
    w_pos, w_neg = weights[:, pos], weights[:, neg]
    return np.einsum("ri,ij,rj->r", w_pos, right, w_neg) / (w_pos.sum(1) * w_neg.sum(1))


def sklearn_replicates(paths, labels, *logits):
    """Each model's AUROC on compare's bootstrap replicates, recomputed independently of
    compare.py (draw_resamples draws the distinct images in the sorted order of their paths):
    by pairs_auroc, checked against scikit-learn replicate by replicate on the first 50 (all
    PAIRED_RESAMPLES through scikit-learn took ~20 s of CPU)."""
    order = np.argsort(paths)
    labels = np.asarray(labels)[order]
    sorted_logits = [np.asarray(z, dtype=np.float64)[order] for z in logits]
    weights = np.concatenate(
        [w for w, _ in draw_resamples(labels, 1, PAIRED_RESAMPLES, PAIRED_SEED)]
    )
    assert len(weights) == PAIRED_RESAMPLES
    replicates = np.array([pairs_auroc(labels, z, weights) for z in sorted_logits])
    for z, figures in zip(sorted_logits, replicates, strict=True):
        checked = [roc_auc_score(labels, z, sample_weight=w) for w in weights[:50]]
        np.testing.assert_allclose(figures[:50], checked, rtol=0, atol=1e-12)
    return replicates


def sklearn_difference(paths, labels, top_logits, other_logits):
    """The paired bootstrap interval of (other - top), recomputed with scikit-learn."""
    top, other = sklearn_replicates(paths, labels, top_logits, other_logits)
    return np.percentile(other - top, [2.5, 97.5])


def read_rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


def test_summary_verdicts_are_paired_comparisons_with_the_top_job(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.array([0] * 30 + [1] * 30)
    paths = [f"/d/img{i}.png" for i in range(60)]
    strong = noisy_logits(labels, 1.5, rng)
    close = (strong + rng.normal(scale=0.4, size=60)).astype(np.float32)
    chance = rng.normal(size=60).astype(np.float32)
    for num, logits in enumerate((close, strong, chance)):
        scored_job(
            tmp_path,
            num,
            ["data.root=/d", f"model.optimizer.lr=0.00{num + 1}"],
            paths,
            labels,
            logits,
        )
    fake_job(tmp_path, 3, ["data.root=/d", "model.optimizer.lr=0.009"], None, "DataError: x")
    write_summary(tmp_path, "val/auroc")
    rows = read_rows(tmp_path / "sweep_summary.csv")
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed"]
    assert rows[3]["error"] == "DataError: x"
    assert rows[0]["overrides"] == "model.optimizer.lr=0.001"  # data.root is constant
    assert rows[0]["configuration"] == "model.optimizer.lr=0.001"  # no repeats: one job each
    top = 1 if roc_auc_score(labels, strong) > roc_auc_score(labels, close) else 0
    assert rows[top]["verdict"] == "best"
    assert {r["verdict"] for i, r in enumerate(rows[:3]) if i != top} == {"tied", "worse"}
    assert rows[2]["verdict"] == "worse"  # chance-level against a strong model
    assert float(rows[0]["val_auroc_ci_low"]) == 0.5  # read from metrics.json
    for i in range(3):
        if i == top:
            assert rows[i]["difference"] == ""
            continue
        low, high = sklearn_difference(
            paths, labels, (close, strong)[top], (close, strong, chance)[i]
        )
        assert float(rows[i]["difference_ci_low"]) == pytest.approx(low, abs=1e-4)
        assert float(rows[i]["difference_ci_high"]) == pytest.approx(high, abs=1e-4)
        verdict = "worse" if high < 0 else "tied"
        assert rows[i]["verdict"] == verdict
        assert rows[i]["compared_on"] == "60 val images"
    configurations = read_rows(tmp_path / "sweep_configurations.csv")
    assert [c["n_runs"] for c in configurations] == ["1", "1", "1", "0"]
    assert [c["verdict"] for c in configurations[:3]] == [r["verdict"] for r in rows[:3]]
    markdown = (tmp_path / "sweep_summary.md").read_text()
    headline = "Best" if "tied" not in {r["verdict"] for r in rows[:3]} else "Top"
    assert f"**{headline}: job {top} (model.optimizer.lr=0.00{top + 1})**" in markdown
    assert "Worse beyond the noise (`worse`): job 2" in markdown
    assert "failed: DataError: x" in markdown


def test_summary_says_when_nothing_is_distinguishable_and_breaks_exact_ties(tmp_path):
    rng = np.random.default_rng(1)
    labels = np.array([0] * 10 + [1] * 10)
    paths = [f"/d/img{i}.png" for i in range(20)]
    logits = noisy_logits(labels, 0.7, rng)
    # Jobs 0 and 1 rank the images alike (equal AUROC and AP); job 1's logits are 3x bolder
    # and mostly right, so its val loss is lower: the tie rule puts it first.
    scored_job(tmp_path, 0, ["model.net.dropout=0.1"], paths, labels, logits)
    scored_job(tmp_path, 1, ["model.net.dropout=0.2"], paths, labels, logits * 3)
    scored_job(
        tmp_path,
        2,
        ["model.net.dropout=0.3"],
        paths,
        labels,
        (logits + rng.normal(scale=0.3, size=20)).astype(np.float32),
    )
    summary = write_summary(tmp_path, "val/auroc")
    rows = read_rows(tmp_path / "sweep_summary.csv")
    assert rows[0]["val/auroc"] == rows[1]["val/auroc"]
    assert rows[1]["verdict"] == "best" and rows[0]["verdict"] == "tied"
    assert float(rows[0]["difference"]) == 0
    markdown = (tmp_path / "sweep_summary.md").read_text()
    assert "**No job is distinguishable from the top one** (job 1" in markdown
    assert "job 1 (model.net.dropout=0.2) and job 0 (model.net.dropout=0.1) tie exactly" in (
        markdown
    )
    assert "put first by the tie rule" in markdown
    assert summary.top is not None and summary.top.name == "model.net.dropout=0.2"


def test_repeats_form_configurations_compared_over_seeds(tmp_path):
    """lr x seed: two configurations of two runs; the runs are not ranked, the configurations
    are compared on the images and seeds they share."""
    rng = np.random.default_rng(2)
    num = 0
    for seed in (0, 1):
        labels = np.array([0] * 20 + [1] * 20)
        paths = [f"/d/seed{seed}/img{i}.png" for i in range(40)]  # each seed its own split
        for lr, strength in (("0.001", 2.0), ("0.01", 0.0)):
            scored_job(
                tmp_path,
                num,
                [f"model.optimizer.lr={lr}", f"seed={seed}"],
                paths,
                labels,
                noisy_logits(labels, strength, rng),
            )
            num += 1
    write_summary(tmp_path, "val/auroc")
    rows = read_rows(tmp_path / "sweep_summary.csv")
    assert [r["configuration"] for r in rows] == [
        "model.optimizer.lr=0.001",
        "model.optimizer.lr=0.01",
    ] * 2
    assert all(r["verdict"] == "" for r in rows)  # repeats are never ranked
    configurations = {
        c["configuration"]: c for c in read_rows(tmp_path / "sweep_configurations.csv")
    }
    good, bad = (
        configurations["model.optimizer.lr=0.001"],
        configurations["model.optimizer.lr=0.01"],
    )
    assert good["n_runs"] == bad["n_runs"] == "2"
    assert good["units"] == "seeds 0,1"
    aurocs = [float(r["val/auroc"]) for r in rows if r["configuration"] == good["configuration"]]
    assert float(good["val_auroc_mean"]) == pytest.approx(statistics.fmean(aurocs), abs=1e-4)
    assert float(good["val_auroc_sd"]) == pytest.approx(statistics.stdev(aurocs), abs=1e-4)
    assert good["verdict"] == "best" and bad["verdict"] == "worse"
    assert bad["compared_on"] == "80 val images, 2 seeds"
    assert good["oof_auroc"] == ""  # no folds
    markdown = (tmp_path / "sweep_summary.md").read_text()
    assert "## Configurations" in markdown and "2 (seeds 0,1)" in markdown


def test_kfold_folds_are_one_configuration_with_a_pooled_out_of_fold_auroc(tmp_path):
    rng = np.random.default_rng(3)
    all_paths, all_labels, all_logits = [], [], []
    for fold in range(3):
        labels = np.array([0] * 8 + [1] * 6)
        paths = [f"/d/fold{fold}/img{i}.png" for i in range(14)]
        logits = noisy_logits(labels, 1.0, rng)
        scored_job(tmp_path, fold, ["sweep=kfold", f"data.fold={fold}"], paths, labels, logits)
        all_paths += paths
        all_labels.append(labels)
        all_logits.append(logits)
    write_summary(tmp_path, "val/auroc")
    rows = read_rows(tmp_path / "sweep_summary.csv")
    assert all(r["verdict"] == "" for r in rows)  # no "best" fold
    (configuration,) = read_rows(tmp_path / "sweep_configurations.csv")
    assert configuration["configuration"] == "all jobs" and configuration["n_runs"] == "3"
    labels, logits = np.concatenate(all_labels), np.concatenate(all_logits)
    assert float(configuration["oof_auroc"]) == pytest.approx(
        roc_auc_score(labels, logits), abs=1e-4
    )
    (replicates,) = sklearn_replicates(all_paths, labels, logits)
    low, high = np.percentile(replicates, [2.5, 97.5])
    assert float(configuration["oof_auroc_ci_low"]) == pytest.approx(low, abs=1e-4)
    assert float(configuration["oof_auroc_ci_high"]) == pytest.approx(high, abs=1e-4)
    markdown = (tmp_path / "sweep_summary.md").read_text()
    assert "One configuration, 3 runs (folds 0,1,2): nothing is ranked." in markdown
    assert "**best**" not in markdown


def test_summary_minimising_the_loss(tmp_path):
    rng = np.random.default_rng(4)
    labels = np.array([0] * 30 + [1] * 30)
    paths = [f"/d/img{i}.png" for i in range(60)]
    scored_job(tmp_path, 0, ["model.net.dropout=0.1"], paths, labels, rng.normal(size=60) * 3)
    scored_job(tmp_path, 1, ["model.net.dropout=0.2"], paths, labels, noisy_logits(labels, 2, rng))
    summary = write_summary(tmp_path, "val/loss")
    assert [j.verdict for j in summary.jobs] == ["worse", "best"]
    assert "ranked by val loss" in (tmp_path / "sweep_summary.md").read_text()


def test_older_jobs_without_predictions_are_listed_but_not_compared(tmp_path):
    for num, auroc in enumerate((0.7, 0.9)):
        fake_job(tmp_path, num, [f"model.net.dropout={num / 2}"], {"val/auroc": auroc})
    summary = write_summary(tmp_path, "val/auroc")
    assert [j.verdict for j in summary.jobs] == ["", "best"]
    assert "no predictions.csv" in (tmp_path / "sweep_summary.md").read_text()


@pytest.mark.slow
def test_multirun_summary_tensorboard_and_a_failed_job(phantom_root, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        "tb_lightning.train",
        "-m",
        *phantom_overrides(phantom_root),
        "trainer.max_epochs=1",
        # lr=1e30 passes the config checks (a mistake there stops the multirun before any job:
        # test_fail_fast.py) and diverges in its job's first steps.
        "model.optimizer.lr=1e-3,3e-3,1e30",
        f"hydra.sweep.dir={sweep_dir}",
    )
    output = result.stdout + result.stderr
    # The failed jobs are recorded by Hydra (exit code 1), after every job has run.
    assert result.returncode == 1, output[-3000:]
    assert "Training stopped: the loss became" in output
    rows = list(csv.DictReader((sweep_dir / "sweep_summary.csv").open()))
    assert [(r["overrides"], r["status"]) for r in rows] == [
        ("model.optimizer.lr=0.001", "ok"),
        ("model.optimizer.lr=0.003", "ok"),
        ("model.optimizer.lr=1e+30", "failed"),
    ]
    # The job's error is its one sentence, in the summary and at the end: no traceback.
    assert re.match(r"Training stopped: the loss became (nan|inf) at epoch 0", rows[2]["error"])
    assert rows[2]["error"].endswith("Lower model.optimizer.lr (now 1e+30) or check the input "
                                     "images, then train again.")  # fmt: skip
    assert "Traceback" not in output
    assert "HYDRA_FULL_ERROR" not in output
    assert "1 of 3 jobs failed (job 2)" in result.stdout.rstrip().splitlines()[-1]
    # Piped: each job's epoch line names the job and the sweep's size.
    assert re.search(r"Epoch 1/1: train loss .*; job #1 of 3\n", result.stdout)
    assert [r["verdict"] for r in rows].count("best") == 1
    assert (sweep_dir / "sweep_configurations.csv").is_file()
    for row in rows[:2]:
        assert row["run_dir"] == row["job"]  # relative to the multirun folder
        stored = json.loads((sweep_dir / row["run_dir"] / "metrics.json").read_text())
        assert float(row["val/auroc"]) == pytest.approx(stored["val/auroc"], abs=1e-4)
        # The threshold-dependent columns are at the job's own stored threshold, named beside.
        assert float(row["threshold"]) == pytest.approx(stored["threshold"]["value"], abs=1e-4)
        assert row["threshold_policy"] == "youden"
        for key in ("val/sensitivity", "val/specificity"):
            assert float(row[key]) == pytest.approx(stored[key], abs=1e-4)
    markdown = (sweep_dir / "sweep_summary.md").read_text()
    assert (
        "| val AUROC [95% CI] | Δ val AUROC vs best [95% CI] | verdict | val AP | val loss | "
        "threshold | val sens @thr [95% CI] | val spec @thr [95% CI] |" in markdown
    )
    assert "chosen on its validation split by threshold.policy=youden" in markdown
    # The summary's comparisons use the very figures of metrics.json: recomputed from each
    # job's predictions.csv, bit for bit.
    summary = summarise(sweep_dir)
    for configuration in summary.configurations[:2]:
        stored = json.loads((configuration.jobs[0].run_dir / "metrics.json").read_text())
        assert configuration.value == stored["val/auroc"]
    run = sweep_dir / "1" / "tensorboard" / "lr=0.003"
    events = EventAccumulator(str(run))
    events.Reload()
    assert "val/loss" in events.Tags()["scalars"]
    assert "custom_scalars__config__" in events.Tags()["tensors"]
    assert set(events.PluginTagToContent("hparams")) == {"_hparams_/session_start_info"}


def test_custom_scalars_layout_has_one_chart_per_metric_and_split():
    layout = custom_scalars_layout(0.5)
    charts = {title: spec for category in layout.values() for title, spec in category.items()}
    # One tag pattern per chart: the lines of a chart are runs, never train vs val.
    assert all(kind == "Multiline" and len(tags) == 1 for kind, tags in charts.values())
    assert charts["val loss"] == ["Multiline", [r"^val/loss$"]]
    assert charts["train AUROC"] == ["Multiline", [r"^train/auroc$"]]
    assert charts["val recall (Tuberculosis) at p_tb >= 0.5"] == [
        "Multiline",
        [r"^val@0.5/recall/Tuberculosis$"],
    ]
    assert list(layout)[0].startswith("val: loss, AUROC")  # the first category is val's


def test_single_runs_are_named_by_experiment_and_overrides():
    assert single_run_name([]) == "defaults"
    assert single_run_name(["experiment=quickstart"]) == "quickstart"
    name = single_run_name(
        [
            "experiment=nlm_scratch",
            "data.root=../shared/data/nlm-tb-128/",
            "data.fold=2",
            "hydra.run.dir=/tmp/x",
            "trainer.accelerator=gpu",
            "ckpt_path=last",
        ]
    )
    assert name == "nlm_scratch,root=nlm-tb-128,fold=2"
    long = single_run_name([f"model.net.key{i}=value{i}" for i in range(20)])
    assert len(long) == 80 and long.startswith("key0=value0,key1=value1")


@pytest.mark.slow
def test_offline_imagenet_multirun_stops_before_any_job(phantom_root, tmp_path, monkeypatch):
    """model.net.weights=imagenet with no cached file and no network: one sentence, exit 1,
    no job started (not one failure, and one download attempt, per job)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    # No network, whatever the machine has: every download goes to a closed local port.
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    sweep_dir = tmp_path / "sweep"
    overrides = [o for o in phantom_overrides(phantom_root) if o != "model.net.weights=null"]
    result = run_cli(
        "tb_lightning.train",
        "-m",
        *overrides,
        "model.net.weights=imagenet",
        "model.optimizer.lr=1e-4,1e-3",
        "model.net.dropout=0.3,0.5",
        f"hydra.sweep.dir={sweep_dir}",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "Traceback" not in output and "HYDRA_FULL_ERROR" not in output
    errors = [line for line in output.splitlines() if "No job was started" in line]
    assert len(errors) == 1
    for fix in (
        "alexnet-owt-7be5be79.pth",
        str(tmp_path / "torch_home" / "hub" / "checkpoints"),
        "model.net.weights=null model.net.freeze_features=false",
        "experiment=nlm_scratch",
    ):
        assert fix in errors[0], fix
    assert not sweep_dir.exists()  # no job directory, no summary
