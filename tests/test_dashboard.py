"""TensorBoard as a user opens it on a sweep (two learning rates x two seeds): read through
TensorBoard's own data endpoints (the ones its tabs call), so the test checks what the tabs show,
not only what the event files hold."""

from __future__ import annotations

import csv
import json
import math
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import phantom_overrides, run_cli
from tb_lightning.engine.dashboard import DASHBOARD_HPARAMS, dashboard_hparams

# Jobs in Hydra's order: the last swept key varies fastest.
RUN_NAMES = ["lr=0.001,seed=0", "lr=0.001,seed=1", "lr=0.003,seed=0", "lr=0.003,seed=1"]

# A run's final figures, the first of the HParams metric columns (five are shown).
FINAL_SCALARS = [
    "final/val_auroc",
    "final/val_average_precision",
    "final/val_loss",
    "final/val_operating_sensitivity",
    "final/val_operating_specificity",
    "final/val_operating_threshold",
]
FINAL_IMAGES = {"final/val_confusion_matrix", "final/val_roc_curve", "final/val_pr_curve"}


@pytest.fixture(scope="module")
def sweep_dir(phantom_root, tmp_path_factory) -> Path:
    """Two learning rates, each repeated with two seeds, 2 epochs each, as a user starts it."""
    sweep = tmp_path_factory.mktemp("dashboard") / "sweep"
    result = run_cli(
        "tb_lightning.train",
        "-m",
        *phantom_overrides(phantom_root),
        "trainer.max_epochs=2",
        "model.optimizer.lr=1e-3,3e-3",
        "seed=0,1",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return sweep


class TensorBoard:
    """A TensorBoard server on a free port, asked as its web page asks."""

    def __init__(self, logdir: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.process = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("tensorboard")),
                f"--logdir={logdir}",
                f"--port={self.port}",
                "--host=127.0.0.1",
                "--load_fast=false",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def get(self, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=data,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read())

    def wait_for_runs(self, count: int) -> list[str]:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                runs = self.get("/data/runs")
                if len(runs) >= count:
                    return runs
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"TensorBoard did not list {count} runs in 90 s")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def tensorboard(sweep_dir):
    server = TensorBoard(sweep_dir)
    try:
        server.wait_for_runs(4)
        yield server
    finally:
        server.close()


@pytest.mark.slow
def test_one_run_per_job_named_by_its_swept_values(tensorboard):
    runs = tensorboard.get("/data/runs")
    assert sorted(runs) == [f"{job}/tensorboard/{name}" for job, name in enumerate(RUN_NAMES)]


@pytest.mark.slow
def test_hparams_columns_are_the_swept_keys_with_log10_and_the_final_figures(tensorboard):
    experiment = tensorboard.get("/data/plugin/hparams/experiment", {"experimentName": ""})
    columns = {h["name"]: h for h in experiment["hparamInfos"]}
    # The swept key and its log10, numeric (the parallel-coordinates axes); no constant keys,
    # and no seed: the seeds of one configuration are one session group.
    assert set(columns) == {"model.optimizer.lr", "log10(model.optimizer.lr)"}
    assert {h["type"] for h in columns.values()} == {"DATA_TYPE_FLOAT64"}
    assert all(h["differs"] for h in columns.values())
    metrics = [m["name"]["tag"] for m in experiment["metricInfos"]]
    # Shown first (five are visible): threshold-free, then at the operating threshold.
    assert metrics[:6] == FINAL_SCALARS
    assert {m["name"]["group"] for m in experiment["metricInfos"]} == {""}  # no sub-runs


@pytest.mark.slow
def test_hparams_groups_the_seeds_of_a_configuration(tensorboard, sweep_dir):
    request = {
        "experimentName": "",
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_RUNNING"],
        "colParams": [],
        "startIndex": 0,
        "sliceSize": 100,
        "aggregationType": "AGGREGATION_AVG",
        "aggregationMetric": {"tag": "final/val_auroc", "group": ""},
    }
    groups = tensorboard.get("/data/plugin/hparams/session_groups", request)["sessionGroups"]
    assert len(groups) == 2
    for group in groups:
        # The Trial ID is the configuration (no seed) and the multirun folder.
        name, folder = group["name"].split(" [")
        assert name in ("lr=0.001", "lr=0.003") and folder == f"{sweep_dir.name}]"
        assert len(group["sessions"]) == 2
        lr = float(name.split("=")[1])
        assert group["hparams"]["model.optimizer.lr"] == pytest.approx(lr)
        assert group["hparams"]["log10(model.optimizer.lr)"] == pytest.approx(math.log10(lr))
        jobs = [RUN_NAMES.index(f"{name},seed={seed}") for seed in (0, 1)]
        stored = [json.loads((sweep_dir / str(j) / "metrics.json").read_text()) for j in jobs]
        values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        # The group's row: the mean over its seeds.
        mean = sum(m["val/auroc"] for m in stored) / 2
        assert values["final/val_auroc"] == pytest.approx(mean, abs=1e-6)


@pytest.mark.slow
def test_sweep_files_count_the_repeats_as_configurations(sweep_dir):
    rows = list(csv.DictReader((sweep_dir / "sweep_configurations.csv").open()))
    assert [(r["configuration"], r["n_runs"], r["units"]) for r in rows] == [
        ("model.optimizer.lr=0.001", "2", "seeds 0,1"),
        ("model.optimizer.lr=0.003", "2", "seeds 0,1"),
    ]
    assert {r["verdict"] for r in rows} in ({"best", "tied"}, {"best", "worse"})
    jobs = list(csv.DictReader((sweep_dir / "sweep_summary.csv").open()))
    assert [j["configuration"] for j in jobs] == [r["configuration"] for r in rows for _ in (0, 1)]
    assert {j["verdict"] for j in jobs} == {""}  # repeats are not ranked


@pytest.mark.slow
def test_scalars_and_images_of_a_run(tensorboard):
    tags = tensorboard.get("/data/plugin/scalars/tags")
    run = f"0/tensorboard/{RUN_NAMES[0]}"
    assert {"train/loss", "train/auroc", "val/loss", "val/auroc", "val@0.5/acc"} <= set(tags[run])
    assert set(FINAL_SCALARS) <= set(tags[run])
    every_tag = {tag for run_tags in tags.values() for tag in run_tags}
    assert "epoch" not in every_tag
    assert not any(tag.startswith("hparams/") for tag in every_tag)
    layout = tensorboard.get("/data/plugin/custom_scalars/layout")
    charts = {c["title"]: c["multiline"]["tag"] for cat in layout["category"] for c in cat["chart"]}
    assert charts["val AUROC"] == ["^val/auroc$"]
    assert charts["train loss"] == ["^train/loss$"]
    images = tensorboard.get("/data/plugin/images/tags")
    assert set(images) == {f"{job}/tensorboard/{n}" for job, n in enumerate(RUN_NAMES)}
    assert all(set(tags) == {"val@0.5/confusion_matrix"} | FINAL_IMAGES for tags in images.values())


def test_dashboard_hparams_are_the_swept_keys_or_the_short_list():
    from conftest import compose_train

    cfg = compose_train(["model.net.weights=null", "model.net.dropout=0.25"])
    # A multirun: the swept keys but the repeat keys, a log-scale key with its log10.
    params = dashboard_hparams(cfg, ["seed", "model.optimizer.lr", "model.net.dropout"])
    assert params == {
        "model.optimizer.lr": pytest.approx(1e-4),
        "log10(model.optimizer.lr)": pytest.approx(-4),
        "model.net.dropout": 0.25,
    }
    # A single run, or a multirun of repeats only (seeds, folds): the short list.
    for swept in ([], ["seed", "data.fold"]):
        params = dashboard_hparams(cfg, swept)
        assert list(params) == [
            *DASHBOARD_HPARAMS[:4],
            "log10(model.optimizer.lr)",
            *DASHBOARD_HPARAMS[4:],
        ]
        assert params["model.net.weights"] == "null"
