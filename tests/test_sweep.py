"""Multiruns: presets, the sweep summary (with k-fold aggregation), TensorBoard run names."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import phantom_overrides, run_cli
from tb_lightning.config import CONF_DIR
from tb_lightning.engine.dashboard import custom_scalars_layout
from tb_lightning.sweep.naming import run_name, single_run_name
from tb_lightning.sweep.summary import write_summary


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


def fake_job(sweep_dir: Path, num: int, overrides: list[str], metrics: dict | None, error=None):
    run_dir = sweep_dir / str(num)
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")
    if metrics is not None:
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    if error is not None:
        (run_dir / "error.txt").write_text(error)


def metrics_for(auroc: float) -> dict:
    return {
        "val/loss": 1 - auroc,
        "val/acc": auroc - 0.05,
        "val/auroc": auroc,
        "val/recall/Tuberculosis": auroc - 0.1,
        "val/precision/Tuberculosis": auroc - 0.2,
        "val/f1/Tuberculosis": auroc - 0.15,
        "val/confusion_matrix": [[1, 2], [3, 4]],
    }


def test_summary_marks_the_best_lists_failures_and_aggregates_folds(tmp_path):
    aurocs = {("0.001", 0): 0.80, ("0.001", 1): 0.84, ("0.001", 2): 0.90, ("0.01", 0): 0.70}
    aurocs |= {("0.01", 1): 0.95, ("0.01", 2): 0.72}
    for num, ((lr, fold), auroc) in enumerate(aurocs.items()):
        overrides = ["data.root=/d", f"model.optimizer.lr={lr}", f"data.fold={fold}"]
        fake_job(tmp_path, num, overrides, metrics_for(auroc))
    fake_job(
        tmp_path, 6, ["data.root=/d", "model.optimizer.lr=0.1", "data.fold=0"], None, "DataError: x"
    )
    jobs = write_summary(tmp_path, "val/auroc", "maximize")
    assert [j.status for j in jobs] == ["ok"] * 6 + ["failed"]
    rows = list(csv.DictReader((tmp_path / "sweep_summary.csv").open()))
    assert [r["best"] for r in rows[:7]] == ["", "", "", "", "best", "", ""]
    assert rows[4]["overrides"] == "model.optimizer.lr=0.01 data.fold=1"  # data.root is constant
    assert rows[6]["status"] == "failed" and rows[6]["error"] == "DataError: x"
    aggregates = {(r["job"], r["overrides"]): r for r in rows[7:]}
    for lr in ("0.001", "0.01"):
        values = [aurocs[(lr, fold)] for fold in range(3)]
        mean = aggregates[("mean over 3 folds", f"model.optimizer.lr={lr}")]
        std = aggregates[("std over 3 folds", f"model.optimizer.lr={lr}")]
        assert float(mean["val/auroc"]) == pytest.approx(statistics.fmean(values), abs=1e-4)
        assert float(std["val/auroc"]) == pytest.approx(statistics.stdev(values), abs=1e-4)
    markdown = (tmp_path / "sweep_summary.md").read_text()
    assert "| mean ± std | 3 folds | model.optimizer.lr=0.001 |" in markdown
    assert "failed: DataError: x" in markdown and "**best**" in markdown


def test_summary_without_folds_minimises_a_loss(tmp_path):
    for num, auroc in enumerate((0.7, 0.9)):
        fake_job(tmp_path, num, [f"model.net.dropout={num / 2}"], metrics_for(auroc))
    jobs = write_summary(tmp_path, "val/loss", "minimize")
    assert [j.best for j in jobs] == [False, True]
    assert "mean" not in (tmp_path / "sweep_summary.csv").read_text()


@pytest.mark.slow
def test_multirun_summary_tensorboard_and_a_failed_job(phantom_root, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        "tb_lightning.train",
        "-m",
        *phantom_overrides(phantom_root),
        "trainer.max_epochs=1",
        "model.optimizer.lr=1e-3,3e-3,-1",
        f"hydra.sweep.dir={sweep_dir}",
    )
    output = result.stdout + result.stderr
    # The failed jobs are recorded by Hydra (exit code 1), after every job has run.
    assert result.returncode == 1, output[-3000:]
    assert "model.optimizer.lr=-1 must be a number > 0" in output
    rows = list(csv.DictReader((sweep_dir / "sweep_summary.csv").open()))
    assert [(r["overrides"], r["status"]) for r in rows] == [
        ("model.optimizer.lr=0.001", "ok"),
        ("model.optimizer.lr=0.003", "ok"),
        ("model.optimizer.lr=-1", "failed"),
    ]
    # The user's mistake is its one sentence, in the summary and at the end: no traceback.
    assert rows[2]["error"] == "model.optimizer.lr=-1 must be a number > 0, e.g. 1e-4."
    assert "Traceback" not in output
    assert "HYDRA_FULL_ERROR" not in output
    assert "1 of 3 jobs failed (job 2)" in result.stdout.rstrip().splitlines()[-1]
    assert sum(r["best"] == "best" for r in rows) == 1
    for row in rows[:2]:
        stored = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())
        assert float(row["val/auroc"]) == pytest.approx(stored["val/auroc"], abs=1e-4)
        # The threshold-dependent columns are at the job's own stored threshold, named beside.
        assert float(row["threshold"]) == pytest.approx(stored["threshold"]["value"], abs=1e-4)
        assert row["threshold_policy"] == "youden"
        for key in ("val/sensitivity", "val/specificity"):
            assert float(row[key]) == pytest.approx(stored[key], abs=1e-4)
    markdown = (sweep_dir / "sweep_summary.md").read_text()
    assert (
        "| val AUROC | val AP | val loss | threshold | val sens @thr | val spec @thr |" in markdown
    )
    assert "chosen on that job's validation split by threshold.policy=youden" in markdown
    run = sweep_dir / "1" / "tensorboard" / "lr=0.003"
    events = EventAccumulator(str(run))
    events.Reload()
    assert "val/loss" in events.Tags()["scalars"]
    assert "custom_scalars__config__" in events.Tags()["tensors"]
    final = EventAccumulator(str(run / "final"))
    final.Reload()
    assert set(final.PluginTagToContent("hparams")) == {"_hparams_/session_start_info"}


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
