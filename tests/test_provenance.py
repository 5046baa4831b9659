"""provenance.json in every run directory (core/provenance.py), the chosen checkpoint's epoch and
step in the reports and metrics.json, and what an export's model.json says about its model."""

from __future__ import annotations

import csv
import datetime
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import run_cli
from helpers.hydra_job import job_config
from tb_lightning.config import PROJECT_ROOT
from tb_lightning.core.provenance import (
    PROVENANCE_FILE,
    Provenance,
    git_state,
    split_fingerprint,
)
from tb_lightning.models.torch_file import load_checkpoint

TESTS = Path(__file__).resolve().parent
# Every provenance.json of a job has these keys.
KEYS = {
    "task",
    "status",
    "started",
    "ended",
    "duration_s",
    "command",
    "overrides",
    "config",
    "choices",
    "packages",
    "git",
    "machine",
    "accelerators",
    "data",
}


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def sorted_digest(values: list[str]) -> str:
    """The digest as the module docstring defines it, computed here independently."""
    return hashlib.sha256("".join(v + "\n" for v in sorted(values)).encode()).hexdigest()


def checkout_commit() -> str | None:
    if not (PROJECT_ROOT / ".git").exists():
        return None
    result = subprocess.run(
        ["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    return result.stdout.strip() if result.returncode == 0 else None


def assert_finished(record: dict[str, Any], task: str) -> None:
    assert set(record) >= KEYS, KEYS - set(record)
    assert record["task"] == task
    assert record["status"] == "completed"
    started = datetime.datetime.fromisoformat(record["started"])
    assert datetime.datetime.fromisoformat(record["ended"]) >= started
    assert record["duration_s"] >= 0
    assert f"tb_lightning.{task}" in record["command"]
    assert record["packages"]["torch"] and torch.__version__.startswith(record["packages"]["torch"])
    assert set(record["packages"]) >= {"torchvision", "lightning", "hydra-core", "numpy"}
    machine = record["machine"]
    assert machine["python"] and machine["os"] and machine["cpu_cores"] == os.cpu_count()
    # torch is imported by the end of every task: its CUDA build and the GPUs it sees.
    assert record["accelerators"] is not None
    assert len(record["accelerators"]["gpus"]) == (
        torch.cuda.device_count() if torch.cuda.is_available() else 0
    )
    commit = checkout_commit()
    if commit is None:
        assert record["git"] is None
    else:
        assert record["git"]["commit"] == commit
        assert isinstance(record["git"]["dirty"], bool)


def assert_portable(record: dict[str, Any], *paths: Path) -> None:
    """No path of this machine outside the command line and the overrides (which are what the
    user typed)."""
    text = json.dumps({k: v for k, v in record.items() if k not in ("command", "overrides")})
    for path in (*paths, PROJECT_ROOT, Path.home()):
        assert str(path) not in text, path


def test_train_run_records_command_versions_machine_and_data(trained_run):
    record = read_json(trained_run / PROVENANCE_FILE)
    assert_finished(record, "train")
    assert "trainer.max_epochs=2" in record["overrides"]["task"]
    assert any(o.startswith("hydra.run.dir=") for o in record["overrides"]["hydra"])
    assert record["choices"]["data"] == "phantom"
    assert (trained_run / record["config"]).is_file()
    # The data fingerprint: every row of split.csv, the digest of their sorted SHA-256s.
    rows = csv_rows(trained_run / "split.csv")
    data = record["data"]
    assert data["images"] == len(rows) == sum(data["splits"].values())
    assert data["sha256"] == sorted_digest([r["sha256"] for r in rows])
    assert data["split_sha256"] == sorted_digest(
        [f"{r['sha256']},{r['label']},{r['split']}" for r in rows]
    )
    assert_portable(record, trained_run, trained_run.parent)


def test_report_and_metrics_name_the_checkpoints_epoch_and_step(trained_run):
    checkpoint = load_checkpoint(trained_run / "checkpoints" / "best.ckpt")
    metrics = read_json(trained_run / "metrics.json")
    assert (metrics["epoch"], metrics["step"]) == (checkpoint["epoch"], checkpoint["global_step"])
    header = (trained_run / "report.txt").read_text().splitlines()[:3]
    assert (
        f"Checkpoint epoch: {checkpoint['epoch']} (counted from 0, as Lightning counts), "
        f"global step {checkpoint['global_step']}"
    ) in header


def test_export_model_json_says_what_the_model_is_and_was_trained_on(trained_run, exported_run):
    """`python -m tb_lightning.export` with its default format (ONNX), as a user runs it
    (conftest.exported_run)."""
    out = exported_run
    best = trained_run / "checkpoints" / "best.ckpt"
    sidecar = read_json(out / "model.json")
    assert sidecar["format"] == "onnx" and (out / sidecar["model_file"]).is_file()
    checkpoint = load_checkpoint(best)
    model = sidecar["model"]
    # The session's run: AlexNet, model.net.weights=null (random frozen features), 64 px.
    assert model["architecture"] == "alexnet"
    assert model["weights"].startswith("random")
    assert model["features_frozen"] is True
    assert model["image_size"] == 64
    assert model["preprocess"] == "none"
    assert (model["epoch"], model["step"]) == (checkpoint["epoch"], checkpoint["global_step"])
    # Trained on: the run's split.csv fingerprint.
    rows = csv_rows(trained_run / "split.csv")
    training = sidecar["training_data"]
    assert "synthetic phantom images" in training.pop("synthetic")
    assert set(training.pop("images_per_source")) == {"phantom"}
    assert training == split_fingerprint(trained_run / "split.csv")
    assert sidecar["training_data"]["images"] == len(rows)
    assert sidecar["training_data"]["sha256"] == sorted_digest([r["sha256"] for r in rows])
    # Chosen on: the run's validation figures, as its metrics.json has them.
    metrics = read_json(trained_run / "metrics.json")
    val = metrics["val"]["overall"]
    chosen = sidecar["chosen_on"]
    assert chosen["split"] == "validation"
    assert chosen["images"] == val["images"] == sum(r["split"] == "val" for r in rows)
    for name in ("auroc", "sensitivity", "specificity", "threshold"):
        assert chosen[name] == val[name], name
    assert chosen["loss"] == metrics["val/loss"]
    assert sidecar["test"] is None  # the session's run keeps no test split
    # The export's own provenance: the exported model's training data.
    record = read_json(out / PROVENANCE_FILE)
    assert_finished(record, "export")
    assert record["data"]["sha256"] == sidecar["training_data"]["sha256"]
    assert_portable(record, out, trained_run)


def test_eval_records_what_it_scored(trained_run, evaluated_run):
    """The session's `python -m tb_lightning.eval` of best.ckpt (conftest.evaluated_run)."""
    best = trained_run / "checkpoints" / "best.ckpt"
    checkpoint = load_checkpoint(best)
    evaluated, _ = evaluated_run
    record = read_json(evaluated / PROVENANCE_FILE)
    assert_finished(record, "eval")
    scored = csv_rows(evaluated / "predictions.csv")
    val_rows = [r for r in csv_rows(trained_run / "split.csv") if r["split"] == "val"]
    assert record["data"]["images"] == len(scored) == len(val_rows)
    assert record["data"]["paths_sha256"] == sorted_digest([r["path"] for r in scored])
    metrics = read_json(evaluated / "metrics.json")
    assert (metrics["epoch"], metrics["step"]) == (checkpoint["epoch"], checkpoint["global_step"])
    assert f"Checkpoint epoch: {checkpoint['epoch']} " in (evaluated / "report.txt").read_text()
    assert_portable(record, evaluated, trained_run)


@pytest.mark.slow  # one more predict start-up: its provenance.json, as eval's above
def test_predict_records_what_it_scored(trained_run, phantom_root, tmp_path):
    best = trained_run / "checkpoints" / "best.ckpt"
    predicted = tmp_path / "predict"
    folder = phantom_root / "Tuberculosis"
    assert_ok(
        run_cli(
            "tb_lightning.predict",
            f"ckpt_path={best}",
            f"input={folder}",
            f"hydra.run.dir={predicted}",
        )
    )
    record = read_json(predicted / PROVENANCE_FILE)
    assert_finished(record, "predict")
    assert record["data"]["images"] == len(list(folder.glob("*.png")))
    assert record["data"]["skipped"] == 0
    assert_portable(record, predicted, trained_run)


def test_multirun_folder_and_each_job_have_provenance(kfold_run):
    """The session's `-m sweep=kfold` multirun of 3 jobs (conftest.kfold_run)."""
    sweep = kfold_run
    for num in range(3):
        job = read_json(sweep / str(num) / PROVENANCE_FILE)
        assert_finished(job, "train")
        assert job["job"]["num"] == num
        assert job["data"]["images"] == len(csv_rows(sweep / str(num) / "split.csv"))
    whole = read_json(sweep / PROVENANCE_FILE)
    assert whole["status"] == "completed" and whole["ended"] is not None
    assert whole["jobs"] == {"completed": 3}
    assert whole["config"] == "multirun.yaml"
    assert "sweep=kfold" in whole["overrides"]["task"]


STOPPING_JOB = """
import sys
from pathlib import Path
from helpers.hydra_job import job_config
from tb_lightning.core.provenance import Provenance

Provenance().on_job_start(job_config(Path(sys.argv[1])))
sys.exit(1)  # as run_task ends a run on a user's mistake, before its job returns
"""


def test_a_job_that_never_returns_is_recorded_as_stopped_and_a_resume_keeps_it(tmp_path):
    """Written at the start with `ended: null`; a program that exits before its job returns
    (a user's mistake, a signal) rewrites it at exit as `stopped`; the next invocation in the
    same folder (a resume) keeps the earlier record."""
    started = Provenance()
    started.on_job_start(job_config(tmp_path / "running"))  # no such folder: nothing written
    (tmp_path / "running").mkdir()
    started.on_job_start(job_config(tmp_path / "running"))
    record = read_json(tmp_path / "running" / PROVENANCE_FILE)
    assert record["status"] == "running" and record["ended"] is None
    assert record["overrides"]["task"] == ["seed=1"]
    started.on_job_end(job_config(tmp_path / "running"), job_return=_completed())
    assert read_json(tmp_path / "running" / PROVENANCE_FILE)["status"] == "completed"

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT / "src"), str(TESTS)])}
    result = subprocess.run(
        [sys.executable, "-c", STOPPING_JOB, str(tmp_path)], env=env, capture_output=True
    )
    assert result.returncode == 1, result.stderr
    stopped = read_json(tmp_path / PROVENANCE_FILE)
    assert stopped["status"] == "stopped" and stopped["ended"] is not None

    resumed_run = Provenance()
    resumed_run.on_job_start(job_config(tmp_path))
    resumed_run.on_job_end(job_config(tmp_path), job_return=_completed())
    resumed = read_json(tmp_path / PROVENANCE_FILE)
    assert resumed["status"] == "completed"
    assert [r["status"] for r in resumed["earlier"]] == ["stopped"]


def _completed() -> Any:
    from hydra.core.utils import JobReturn, JobStatus

    return JobReturn(status=JobStatus.COMPLETED)


def test_no_git_record_outside_a_checkout(tmp_path):
    assert git_state(tmp_path) is None


def test_split_without_hashes_is_counted_but_not_digested(tmp_path):
    """A split.csv of an older version (no sha256 column) gives no digest that would claim to
    identify the images."""
    path = tmp_path / "split.csv"
    path.write_text("path,label,split\na.png,0,train\nb.png,1,val\n")
    fingerprint = split_fingerprint(path)
    assert fingerprint["images"] == 2
    assert fingerprint["splits"] == {"train": 1, "val": 1}
    assert fingerprint["sha256"] is None and fingerprint["split_sha256"] is None


def test_an_ensembles_report_names_each_members_epoch_and_step():
    from tb_lightning.evaluation.evaluate import describe_trained

    assert describe_trained([3, 4], [30, 40]) == (
        "Members' epochs: 3, 4 (counted from 0, as Lightning counts), global steps 30, 40\n"
    )
    assert describe_trained([None], [None]) is None  # a checkpoint without them: no line


def test_gpus_and_driver_are_recorded_when_torch_sees_them(monkeypatch):
    """The GPU branch, on a machine without one: torch's answers stand in."""
    from types import SimpleNamespace

    from tb_lightning.core import provenance

    fake_torch = SimpleNamespace(
        version=SimpleNamespace(cuda="12.4"),
        cuda=SimpleNamespace(
            is_available=lambda: True,
            device_count=lambda: 2,
            get_device_name=lambda i: f"NVIDIA H200 #{i}",
        ),
        backends=SimpleNamespace(cudnn=SimpleNamespace(version=lambda: 90100)),
    )
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    monkeypatch.setattr(provenance, "nvidia_driver", lambda: "550.54.15")
    assert provenance.accelerators() == {
        "torch_cuda": "12.4",
        "gpus": ["NVIDIA H200 #0", "NVIDIA H200 #1"],
        "cudnn": 90100,
        "driver": "550.54.15",
    }
    monkeypatch.delitem(sys.modules, "torch")
    assert provenance.accelerators() is None  # torch is not imported for this alone


def test_driver_version_from_the_kernel_modules_text():
    from tb_lightning.core.provenance import driver_version

    proprietary = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 2024"
    open_module = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release"
    assert driver_version(proprietary) == "550.54.15"
    assert driver_version(open_module) == "570.86.15"
    assert driver_version("no driver here") is None


def test_model_json_names_the_weights_source_without_a_path():
    from tb_lightning.inference.deploy import weights_source

    assert weights_source(None).startswith("random")
    assert weights_source("imagenet").startswith("imagenet")
    assert weights_source("/home/someone/weights/tbnet.pth") == "file tbnet.pth"


def test_model_json_says_when_a_model_was_trained_on_phantoms(tmp_path):
    from tb_lightning.inference.deploy import data_sources

    report = {"counts": {"per_source": {"phantom": {"Normal": 4, "Tuberculosis": 2}}}}
    (tmp_path / "data_report.json").write_text(json.dumps(report))
    what = data_sources(tmp_path)
    assert what["images_per_source"] == {"phantom": {"Normal": 4, "Tuberculosis": 2}}
    assert "synthetic phantom images (not medical data)" in what["synthetic"]
    report["counts"]["per_source"] = {"shenzhen": {"Normal": 3, "Tuberculosis": 3}}
    (tmp_path / "data_report.json").write_text(json.dumps(report))
    assert "synthetic" not in data_sources(tmp_path)
    assert data_sources(tmp_path / "no-such-run") == {}
