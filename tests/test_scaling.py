"""Several processes: trainer=ddp_cpu (2 processes, gloo), a submitit_local sweep, SLURM config."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import compose_train, phantom_overrides, run_cli
from tb_lightning.config import CONF_DIR
from tb_lightning.core.tasks import instantiate_config
from tb_lightning.models.torch_file import load_checkpoint

# Threshold-free: the per-epoch figures at 0.5 and the report's at the operating threshold differ
# by design.
COMPARED = ("val/loss", "val/auroc")


def val_paths(run_dir: Path) -> list[str]:
    rows = csv.DictReader((run_dir / "split.csv").open())
    return [r["path"] for r in rows if r["split"] == "val"]


@pytest.mark.slow
def test_ddp_cpu_metrics_are_synced_and_match_one_process(phantom_root, tmp_path):
    ddp_dir = tmp_path / "ddp"
    result = run_cli(
        "tb_lightning.train",
        *phantom_overrides(phantom_root),
        "trainer=ddp_cpu",
        "trainer.max_epochs=1",
        # Per-epoch validation on the images in fp32, like the final report (not on cached
        # features in reduced precision), so that the two can be compared to 1e-5.
        "data.cache_features=false",
        f"hydra.run.dir={ddp_dir}",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "distributed_backend=gloo" in output and "All distributed processes registered" in output
    metrics = json.loads((ddp_dir / "metrics.json").read_text())
    # The report covers the whole val split once (12 images), not a rank's half or a padded copy.
    assert sum(map(sum, metrics["val/confusion_matrix"])) == 12
    # What the 2 processes logged for the best epoch (torchmetrics synced across them) equals a
    # single-process evaluation of the same checkpoint (metrics.json, rank 0 alone).
    # The best epoch's scalars are at the index of its last step (engine/dashboard.py).
    best_step = load_checkpoint(ddp_dir / "checkpoints" / "best.ckpt")["global_step"] - 1
    (run,) = (ddp_dir / "tensorboard").iterdir()
    events = EventAccumulator(str(run))
    events.Reload()
    for key in COMPARED:
        logged = {s.step: s.value for s in events.Scalars(key)}
        assert logged[best_step] == pytest.approx(metrics[key], abs=1e-5), key
    # The split (and so the class weights) is the one a 1-process run makes; rank 0 wrote it.
    single = compose_train([*phantom_overrides(phantom_root)], output_dir=tmp_path / "single")
    datamodule = instantiate_config(single.data)
    datamodule.setup("fit")
    assert val_paths(ddp_dir) == [s.path for s in datamodule.val_samples]
    assert metrics["pos_weight"] == pytest.approx(datamodule.pos_weight)
    # Only rank 0 reports; the second process has its own log and writes no report.
    rank1_log = (ddp_dir / "train_ddp_process_1.log").read_text()
    assert "Final figures of" not in rank1_log
    assert "Final figures of" in (ddp_dir / "train.log").read_text()


@pytest.mark.slow
def test_submitit_local_sweep_runs_each_job_in_its_own_process(phantom_root, tmp_path):
    result = run_cli(
        "tb_lightning.train",
        "-m",
        "hydra/launcher=submitit_local",
        *phantom_overrides(phantom_root),
        "trainer.max_epochs=1",
        "model.optimizer.lr=1e-4,1e-3",
        f"hydra.sweep.dir={tmp_path}",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Submitit 'local' sweep output dir" in output
    lrs = []
    for job in ("0", "1"):
        metrics = json.loads((tmp_path / job / "metrics.json").read_text())
        assert 0.0 <= metrics["val/auroc"] <= 1.0
        ckpt = load_checkpoint(tmp_path / job / "checkpoints" / "last.ckpt")
        lrs.append(ckpt["hyper_parameters"]["optimizer"]["lr"])
    assert lrs == [1e-4, 1e-3]
    # submitit ran them as separate jobs, each with its own log folder.
    assert len([p for p in (tmp_path / ".submitit").iterdir() if p.name != "%j"]) == 2


def test_slurm_launcher_config_composes():
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=short"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "short"
    assert launcher.gpus_per_node == 1 and launcher.timeout_min == 240
