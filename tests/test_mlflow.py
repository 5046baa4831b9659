"""logger=mlflow: a 2 x 2 sweep as a user starts it, read back through MLflow's own client API
(the runs, their params, curves, final figures and artefacts), and the sentence without the
extra."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import compose_train, phantom_overrides, run_cli, train_in_process
from tb_lightning.core.errors import ConfigError
from tb_lightning.sweep.naming import single_run_name

LRS, DROPOUTS = ("0.001", "0.003"), ("0.3", "0.5")
SWEPT = {"model.optimizer.lr", "model.net.dropout"}


@pytest.fixture(scope="module")
def sweep(phantom_root, tmp_path_factory) -> tuple[Path, Path]:
    """Two learning rates x two dropouts, 1 epoch each, logged into an embedded store under
    paths.log_dir: (log_dir, sweep dir)."""
    pytest.importorskip("mlflow", reason="the optional 'mlflow' extra (make install)")
    log_dir = tmp_path_factory.mktemp("mlflow") / "outputs"
    overrides = [o for o in phantom_overrides(phantom_root) if not o.startswith("paths.log_dir")]
    result = run_cli(
        "tb_lightning.train",
        "-m",
        *overrides,
        f"paths.log_dir={log_dir}",
        "logger=mlflow",
        "trainer.max_epochs=1",
        f"model.optimizer.lr={','.join(LRS)}",
        f"model.net.dropout={','.join(DROPOUTS)}",
        f"hydra.sweep.dir={log_dir}/sweep",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The one line that says where the runs went, and none of the store's set-up chatter.
    output = result.stdout + result.stderr
    assert "MLflow: run lr=0.001,dropout=0.3 of experiment train/default" in output
    assert "alembic" not in output and "not found. Creating it" not in output
    return log_dir, log_dir / "sweep"


@pytest.fixture(scope="module")
def client(sweep):
    # Imported here, not when the module is collected: MLflow takes ~1.5 s to import, which
    # a run without these (slow) tests should not pay.
    mlflow = pytest.importorskip("mlflow", reason="the optional 'mlflow' extra (make install)")
    store = sweep[0] / "mlruns" / "mlflow.db"
    assert store.is_file()
    return mlflow.MlflowClient(f"sqlite:///{store}")


@pytest.mark.slow
def test_one_run_per_job_with_its_params_and_final_figures(sweep, client):
    log_dir, sweep_dir = sweep
    experiment = client.get_experiment_by_name("train/default")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    # The artefacts are in the store, not in ./mlruns of the folder the run started from.
    assert experiment.artifact_location == (log_dir / "mlruns" / "artifacts").as_uri()
    seen = set()
    for run in runs:
        params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
        # The HParams tab's columns: the swept keys (no log10 twin: MLflow refuses the name),
        # and not Lightning's nested model hyperparameters.
        assert set(params) == SWEPT
        lr, dropout = params["model.optimizer.lr"], params["model.net.dropout"]
        seen.add((lr, dropout))
        # Named as in TensorBoard, tagged with the sweep folder, the job and the run folder.
        assert tags["mlflow.runName"] == f"lr={lr},dropout={dropout}"
        job = tags["job"]
        assert tags["sweep"] == "sweep" and tags["run_dir"] == f"sweep/{job}"
        assert tags["trial"] == f"lr={lr},dropout={dropout} [sweep]"
        run_dir = sweep_dir / job
        metrics_json = json.loads((run_dir / "metrics.json").read_text())
        # The final figures are metrics.json's, exactly.
        assert metrics["final/val_auroc"] == metrics_json["val/auroc"]
        assert metrics["final/val_loss"] == metrics_json["val/loss"]
        assert metrics["final/val_average_precision"] == metrics_json["val/average_precision"]
        threshold = metrics_json["threshold"]["value"]
        assert metrics["final/val_operating_threshold"] == threshold
        # The per-epoch curves, one point per epoch; `@` renamed, no `epoch` staircase.
        assert len(client.get_metric_history(run.info.run_id, "val/auroc")) == 1
        assert "val_at_0.5/acc" in metrics and "epoch" not in metrics
    assert seen == {(lr, d) for lr in LRS for d in DROPOUTS}


@pytest.mark.slow
def test_report_and_figures_are_artefacts(sweep, client, tmp_path):
    _, sweep_dir = sweep
    experiment = client.get_experiment_by_name("train/default")
    run = client.search_runs([experiment.experiment_id], "tags.job = '0'")[0]
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.txt", "metrics.json", "config.yaml", "overrides.yaml", "figures"} <= names
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert figures == {
        "figures/val_confusion_matrix.png",
        "figures/val_roc_curve.png",
        "figures/val_pr_curve.png",
    }
    local = Path(client.download_artifacts(run.info.run_id, "report.txt", str(tmp_path)))
    assert local.read_text() == (sweep_dir / "0" / "report.txt").read_text()
    png = Path(client.download_artifacts(run.info.run_id, figures.pop(), str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # imports torch and Lightning: ~15 s alone on 2 busy cores
def test_without_the_extra_one_sentence_before_any_data_is_read(
    phantom_root, tmp_path, monkeypatch
):
    find_spec = importlib.util.find_spec

    def without_mlflow(name, *args):
        return None if name == "mlflow" else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_mlflow)
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        train_in_process([*phantom_overrides(phantom_root), "logger=mlflow"], run_dir)
    assert "logger=mlflow needs the optional 'mlflow' packages" in str(err.value)
    assert "pip install -e '.[mlflow]'" in str(err.value)
    assert not (run_dir / "split.csv").exists()


def test_tensorboard_and_mlflow_together_with_hydras_list_of_options(tmp_path):
    cfg = compose_train(["logger=[tensorboard,mlflow]"], output_dir=tmp_path)
    assert set(cfg.logger) == {"tensorboard", "mlflow"}
    cfg = compose_train(["logger=[many,mlflow]"], output_dir=tmp_path)
    assert set(cfg.logger) == {"tensorboard", "csv", "mlflow"}
    # Which loggers a run writes to is no part of its name (TensorBoard's and MLflow's).
    assert single_run_name(["experiment=quickstart", "logger=[tensorboard,mlflow]"]) == (
        "quickstart"
    )
    assert single_run_name(["experiment=quickstart", "logger=mlflow"]) == "quickstart"
