"""TensorBoard as a user opens it on a sweep: read through TensorBoard's own data endpoints (the
ones its tabs call), so the test checks what the tabs show, not only what the event files hold."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import phantom_overrides, run_cli
from tb_lightning.engine.dashboard import DASHBOARD_HPARAMS, dashboard_hparams

RUN_NAMES = {
    "lr=0.001,dropout=0.3",
    "lr=0.001,dropout=0.5",
    "lr=0.003,dropout=0.3",
    "lr=0.003,dropout=0.5",
}

# A run's final figures (its `final` sub-run), in the order of the HParams metric columns.
FINAL_SCALARS = [
    "val/auroc",
    "val/average_precision",
    "val/loss",
    "val@operating/sensitivity",
    "val@operating/specificity",
    "val@operating/threshold",
]


@pytest.fixture(scope="module")
def sweep_dir(phantom_root, tmp_path_factory) -> Path:
    """A 2 x 2 lr x dropout multirun, 2 epochs each, as a user starts it."""
    sweep = tmp_path_factory.mktemp("dashboard") / "sweep"
    result = run_cli(
        "tb_lightning.train",
        "-m",
        *phantom_overrides(phantom_root),
        "trainer.max_epochs=2",
        "model.optimizer.lr=1e-3,3e-3",
        "model.net.dropout=0.3,0.5",
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
        server.wait_for_runs(8)  # 4 jobs, each with its curves and its `final` sub-run
        yield server
    finally:
        server.close()


@pytest.mark.slow
def test_runs_are_named_by_their_swept_values(tensorboard):
    runs = set(tensorboard.get("/data/runs"))
    expected = {f"{job}/tensorboard/{name}" for job, name in enumerate(sorted(RUN_NAMES))}
    assert runs == expected | {f"{run}/final" for run in expected}


@pytest.mark.slow
def test_hparams_columns_are_the_swept_keys_then_the_short_list(tensorboard):
    experiment = tensorboard.get("/data/plugin/hparams/experiment", {"experimentName": ""})
    columns = [h["name"] for h in experiment["hparamInfos"]]
    # The swept keys first (TensorBoard shows the first five columns), numeric so that the
    # parallel-coordinates and scatter views draw them as axes.
    assert columns[:2] == ["model.net.dropout", "model.optimizer.lr"]
    assert [h["differs"] for h in experiment["hparamInfos"][:3]] == [True, True, False]
    assert {h["type"] for h in experiment["hparamInfos"][:2]} == {"DATA_TYPE_FLOAT64"}
    assert set(columns) == set(DASHBOARD_HPARAMS)  # the short list, not the whole config
    metrics = [m["name"]["tag"] for m in experiment["metricInfos"]]
    # Shown first (five are visible): threshold-free, then at the operating threshold.
    assert metrics == FINAL_SCALARS


@pytest.mark.slow
def test_hparams_rows_hold_each_jobs_final_figures(tensorboard, sweep_dir):
    request = {
        "experimentName": "",
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_RUNNING"],
        "colParams": [],
        "startIndex": 0,
        "sliceSize": 100,
    }
    groups = tensorboard.get("/data/plugin/hparams/session_groups", request)["sessionGroups"]
    assert len(groups) == 4
    for group in groups:
        # The Trial ID starts with what the job is and ends with its folder.
        name, folder = group["name"].split(" [")
        assert name in RUN_NAMES
        job_dir = sweep_dir / folder.rstrip("]").split("/")[-1]
        stored = json.loads((job_dir / "metrics.json").read_text())
        values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        assert values["val/auroc"] == pytest.approx(stored["val/auroc"], abs=1e-6)
        assert values["val@operating/threshold"] == pytest.approx(
            stored["threshold"]["value"], abs=1e-6
        )
        assert group["hparams"]["model.optimizer.lr"] in (0.001, 0.003)


@pytest.mark.slow
def test_scalars_hold_the_curves_without_epoch_or_hparams_copies(tensorboard):
    tags = tensorboard.get("/data/plugin/scalars/tags")
    run = "0/tensorboard/lr=0.001,dropout=0.3"
    assert {"train/loss", "train/auroc", "val/loss", "val/auroc", "val@0.5/acc"} <= set(tags[run])
    every_tag = {tag for run_tags in tags.values() for tag in run_tags}
    assert "epoch" not in every_tag
    assert not any(tag.startswith("hparams/") for tag in every_tag)
    assert sorted(tags[f"{run}/final"]) == FINAL_SCALARS


@pytest.mark.slow
def test_custom_scalars_and_images(tensorboard):
    layout = tensorboard.get("/data/plugin/custom_scalars/layout")
    charts = {c["title"]: c["multiline"]["tag"] for cat in layout["category"] for c in cat["chart"]}
    assert charts["val AUROC"] == ["^val/auroc$"]
    assert charts["train loss"] == ["^train/loss$"]
    images = tensorboard.get("/data/plugin/images/tags")
    assert set(images) == {f"{job}/tensorboard/{n}" for job, n in enumerate(sorted(RUN_NAMES))}
    assert all(set(tags) == {"val@0.5/confusion_matrix"} for tags in images.values())


def test_dashboard_hparams_put_swept_keys_first(tmp_path):
    from conftest import compose_train

    cfg = compose_train(["model.net.weights=null", "data.fold=null"])
    params = dashboard_hparams(cfg, ["seed", "model.optimizer.lr"])
    assert list(params)[:2] == ["seed", "model.net.arch"]  # lr is in the short list already
    assert params["model.net.weights"] == "null" and params["data.fold"] == "null"
    assert params["model.optimizer.lr"] == pytest.approx(1e-4)
