"""Resume after a real SIGKILL, clean stops on SIGTERM, determinism, ckpt_path=last."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import phantom_overrides, run_cli
from tb_lightning.config import PROJECT_ROOT
from tb_lightning.errors import ConfigError
from tb_lightning.models.module import load_checkpoint
from tb_lightning.resume import find_last_checkpoint, resolve_ckpt_path, run_dir_of

TESTS_DIR = Path(__file__).resolve().parent
# Metrics of a resumed run equal an uninterrupted run's to this absolute tolerance (the float32
# values are stored to 7 digits; in practice they are identical).
TOLERANCE = 1e-6
COMPARED = ("val/loss", "val/acc", "val/auroc", "val/f1/Tuberculosis", "val/precision/Normal")


def start_paused_run(phantom_root: Path, run_dir: Path, flag: Path) -> subprocess.Popen:
    """A 2-epoch training subprocess that stops before batch 1 of epoch 1 (mid-epoch)."""
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore::DeprecationWarning",
        "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT / "src"), str(TESTS_DIR)]),
    }
    overrides = [
        *phantom_overrides(phantom_root),
        "trainer.max_epochs=2",
        f"hydra.run.dir={run_dir}",
        "+callbacks.pause._target_=helpers.pause.PauseAt",
        "+callbacks.pause.epoch=1",
        "+callbacks.pause.batch=1",
        f"+callbacks.pause.flag_file={flag}",
    ]
    return subprocess.Popen(
        [sys.executable, "-m", "tb_lightning.train", *overrides],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(flag: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not flag.exists():
        if process.poll() is not None:
            raise AssertionError(f"the run ended early:\n{process.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the run never reached its pause point")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def uninterrupted_run(phantom_root, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    result = run_cli(
        "tb_lightning.train",
        *phantom_overrides(phantom_root),
        "trainer.max_epochs=2",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(
    uninterrupted_run, phantom_root, tmp_path
):
    run_dir, flag = tmp_path / "run", tmp_path / "paused"
    process = start_paused_run(phantom_root, run_dir, flag)
    wait_for(flag, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    last = run_dir / "checkpoints" / "last.ckpt"
    assert load_checkpoint(last)["epoch"] == 0  # epoch 1 was killed half-way
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    assert not (run_dir / "metrics.json").exists()

    # No hydra.run.dir: a resumed run continues in its own run directory.
    result = run_cli(
        "tb_lightning.train",
        *phantom_overrides(phantom_root),
        "trainer.max_epochs=2",
        f"ckpt_path={last}",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert f"Run directory: {run_dir}" in output
    assert "Restored the random number generators" in output
    resumed = json.loads((run_dir / "metrics.json").read_text())
    reference = json.loads((uninterrupted_run / "metrics.json").read_text())
    for key in COMPARED:
        assert resumed[key] == pytest.approx(reference[key], abs=TOLERANCE), key
    assert resumed["val/confusion_matrix"] == reference["val/confusion_matrix"]
    # Stronger than the metrics: the final weights are bit for bit the uninterrupted run's.
    a = load_checkpoint(last)["state_dict"]
    b = load_checkpoint(uninterrupted_run / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.slow
def test_sigterm_stops_cleanly_with_a_resume_message(phantom_root, tmp_path):
    run_dir, flag = tmp_path / "run", tmp_path / "paused"
    process = start_paused_run(phantom_root, run_dir, flag)
    wait_for(flag, process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert "Training stopped by SIGTERM during epoch 1" in output, output[-3000:]
    assert f"ckpt_path={last}" in output
    assert load_checkpoint(last)["epoch"] == 0
    assert "Traceback" not in output
    # TensorBoard was flushed: epoch 0's validation point is on disk.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert len(events.Scalars("val/loss")) == 1


def test_ckpt_path_last_finds_the_newest_last_ckpt(tmp_path):
    runs = tmp_path / "runs"
    for i, name in enumerate(["2026-01-02_10-00-00", "2026-01-01_10-00-00"]):
        ckpt = runs / name / "checkpoints" / "last.ckpt"
        ckpt.parent.mkdir(parents=True)
        (runs / name / ".hydra").mkdir()
        ckpt.write_bytes(b"x")
        os.utime(ckpt, (1000 + i, 1000 + i))  # the second one is newer, though named earlier
    newest = runs / "2026-01-01_10-00-00" / "checkpoints" / "last.ckpt"
    assert find_last_checkpoint(runs) == newest
    assert resolve_ckpt_path("last", runs) == newest
    assert run_dir_of(newest) == newest.parent.parent
    with pytest.raises(ConfigError, match=r"^ckpt_path=last found no "):
        resolve_ckpt_path("last", tmp_path / "empty")
    with pytest.raises(ConfigError, match=r"^ckpt_path=/no/such.ckpt does not exist"):
        resolve_ckpt_path("/no/such.ckpt", runs)
