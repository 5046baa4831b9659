"""Progress that can be followed from a log file: one line per epoch and plain lines for long
loops when stdout is not a terminal (core/progress.py, engine/callbacks.py EpochProgressLog), and
a log without repr dumps or Lightning's known warnings."""

from __future__ import annotations

import logging
import re

import pytest
from omegaconf import OmegaConf

from conftest import phantom_overrides, run_cli
from tb_lightning.core import progress as progress_module
from tb_lightning.core.progress import ProgressLog, format_duration, report_progress
from tb_lightning.sweep.naming import sweep_size

EPOCH_LINE = re.compile(
    r"Epoch (\d+)/2: train loss \d\.\d{4}, val loss \d\.\d{4}, val AUROC \d\.\d{4}; "
    r"\d+\.\d s/epoch, ETA \d+ s$"
)


def epoch_lines(text: str) -> list[str]:
    """The messages of the per-epoch log lines (without the time stamp and logger)."""
    return [line.split(" - ", 1)[1] for line in text.splitlines() if "] - Epoch " in line]


@pytest.mark.slow
def test_piped_training_logs_one_line_per_epoch_and_a_clean_log(phantom_root, tmp_path):
    run_dir = tmp_path / "run"
    # The terminal's callbacks stay configured, as in a user's run.
    shown = ("callbacks.progress_bar=null", "callbacks.model_summary=null")
    overrides = [o for o in phantom_overrides(phantom_root) if o not in shown]
    result = run_cli(
        "tb_lightning.train",
        *overrides,
        "trainer.max_epochs=2",
        # Random augmentation: the feature cache is off, and says why.
        "data/augment=cxr",
        f"hydra.run.dir={run_dir}",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    # No bar frames: no carriage return, no rich bar drawn at the end.
    assert "\r" not in output
    assert "━" not in output and "it/s" not in output
    lines = epoch_lines(result.stdout)
    assert [EPOCH_LINE.match(line).group(1) for line in lines] == ["1", "2"], lines
    assert lines[-1].endswith("ETA 0 s")
    # The same lines in the run's log file.
    assert epoch_lines((run_dir / "train.log").read_text()) == lines
    # The reason the feature cache is off names the random steps, not the transform's repr.
    cache_off = next(line for line in result.stdout.splitlines() if "Feature cache off" in line)
    assert "RandomResizedCrop" in cache_off and "data.augment" in cache_off
    assert "Compose(" not in output
    # 3 training batches < trainer.log_every_n_steps=10: Lightning's warning is filtered.
    assert "smaller than the logging interval" not in output
    assert "does not have many workers" not in output


def test_progress_log_lines_every_tenth_and_heartbeat(caplog):
    caplog.set_level(logging.INFO, logger=progress_module.__name__)
    now = [0.0]
    bar = ProgressLog("Checking images", 100, clock=lambda: now[0])
    for _ in range(100):
        now[0] += 0.5  # 50 s in all: a line at every 10 %
        bar.update(1)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 10
    assert messages[0] == "Checking images: 10/100 (10%), 5 s, ETA 45 s"
    assert messages[-1] == "Checking images: 100/100 (100%), done in 50 s"

    # Slow steps: a line at least every 30 s between the 10 % steps.
    caplog.clear()
    now[0] = 0.0
    bar = ProgressLog("Extracting", 1000, clock=lambda: now[0])
    times = []
    for _ in range(250):
        now[0] += 1.0
        before = len(caplog.records)
        bar.update(1)
        if len(caplog.records) > before:
            times.append(now[0])
    assert times == [30, 60, 90, 100, 130, 160, 190, 200, 230]


def test_progress_log_is_silent_for_fast_loops_and_never_repeats_the_end(caplog):
    caplog.set_level(logging.INFO, logger=progress_module.__name__)
    now = [0.0]
    bar = ProgressLog("Generating", 50, clock=lambda: now[0])
    for _ in range(50):
        now[0] += 1 / 64  # under a second in all (steps exact in binary)
        bar.update(1)
    assert caplog.records == []
    bar.reset(total=3)  # e.g. the rest, serially, after a failed parallel start
    for _ in range(5):
        now[0] += 1.0
        bar.update(1)
    assert [r.getMessage() for r in caplog.records] == [
        "Generating: 1/3 (33%), 1 s, ETA 2 s",
        "Generating: 2/3 (67%), 2 s, ETA 1 s",
        "Generating: 3/3 (100%), done in 3 s",
    ]


def test_report_progress_draws_a_bar_only_at_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(progress_module, "interactive", lambda: False)
    with report_progress("Checking images", 5) as bar:
        assert isinstance(bar, ProgressLog)
    with report_progress("Checking images", 5, enabled=False) as bar:
        bar.update(5)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress_module, "interactive", lambda: True)
    with report_progress("Checking images", 5) as bar:
        bar.update(5)
    assert "Checking images" in capsys.readouterr().out  # rich's bar, on stdout


def test_format_duration():
    assert [format_duration(s) for s in (0.4, 42, 185, 7620)] == [
        "0 s",
        "42 s",
        "3 min 05 s",
        "2 h 07 min",
    ]


def test_sweep_size_of_grids_folds_and_optuna(tmp_path):
    saved = {
        "data": {"num_folds": 5},
        "hydra": {
            "sweeper": {"params": {"data.fold": "range(${data.num_folds})"}},
            "overrides": {"task": ["sweep=kfold", "model.net.dropout=0.3,0.5"]},
        },
    }
    OmegaConf.save(OmegaConf.create(saved), tmp_path / "multirun.yaml")
    basic = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
    hydra_cfg = OmegaConf.create({"sweeper": {"_target_": basic}, "sweep": {"dir": str(tmp_path)}})
    assert sweep_size(hydra_cfg) == 10
    optuna = {"_target_": "hydra_plugins.OptunaSweeper", "n_trials": 12}
    assert sweep_size(OmegaConf.create({"sweeper": optuna, "sweep": {"dir": "x"}})) == 12
    other = {"_target_": "some.OtherSweeper"}
    assert sweep_size(OmegaConf.create({"sweeper": other, "sweep": {"dir": "x"}})) is None
