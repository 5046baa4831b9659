"""core/: the one atomic-write helper and the optional extras."""

from __future__ import annotations

import importlib.util
import os
import stat
import sys

import pytest
from hydra import compose, initialize_config_dir

from tb_lightning.config import CONF_DIR
from tb_lightning.config.checks import check_export_config, check_predict_config
from tb_lightning.core import extras
from tb_lightning.core.atomic import (
    atomic_target,
    atomic_write,
    atomic_write_csv,
    remove_temp_files,
)
from tb_lightning.core.errors import ConfigError


def test_atomic_writes_get_a_normal_file_mode_and_leave_no_temporary_file(tmp_path):
    umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.json", "{}")
        atomic_write_csv(tmp_path / "b.csv", ["path", "p"], [["x.png", 0.5]])
    finally:
        os.umask(umask)
    for name in ("a.json", "b.csv"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644  # mkstemp's is 0600
    assert (tmp_path / "b.csv").read_text().splitlines() == ["path,p", "x.png,0.5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.csv"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary_file(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_target(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    with atomic_target(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_temporary_files_of_killed_writes_are_removed(tmp_path):
    (tmp_path / ".last.ckpt.abc123.tmp").write_bytes(b"half")
    (tmp_path / "last.ckpt").write_bytes(b"whole")
    assert [p.name for p in remove_temp_files(tmp_path)] == [".last.ckpt.abc123.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def without(monkeypatch, *modules):
    """Make `modules` look uninstalled to importlib."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in modules else real(name, *a)
    )


def compose_task(task: str, overrides: list[str]):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(task, overrides=["ckpt_path=x.ckpt", *overrides])


def test_a_missing_extra_is_one_sentence_with_the_pip_command(monkeypatch, tmp_path):
    without(monkeypatch, "captum", "onnxruntime")
    with pytest.raises(ConfigError) as err:
        check_predict_config(compose_task("predict", ["input=x", "saliency=true"]))
    assert str(err.value) == (
        "predict saliency=true (Grad-CAM) needs the optional 'saliency' packages, which are not "
        "installed (captum); install them with: pip install -e '.[saliency]' in the checkout "
        "(make install installs every extra)."
    )
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[export\]'"):
        check_export_config(compose_task("export", ["format=onnx"]))
    ckpt = tmp_path / "x.ckpt"
    ckpt.touch()  # the file itself is read (and checked) on loading, not here
    check_export_config(compose_task("export", ["format=torchscript", f"ckpt_path={ckpt}"]))
    assert extras.missing("sweeps") == []


def test_a_sweep_plugin_choice_without_the_extra_stops_before_hydra(monkeypatch, capsys):
    from tb_lightning import train

    without(monkeypatch, "hydra_plugins.hydra_optuna_sweeper")
    monkeypatch.setattr(sys, "argv", ["tb_lightning.train", "-m", "sweep=optuna"])
    with pytest.raises(SystemExit) as stop:
        train.cli()
    assert stop.value.code == 1
    assert "sweep=optuna needs the optional 'sweeps' packages" in capsys.readouterr().err


def test_the_last_log_line_lists_the_outputs_not_the_runs_lock(tmp_path):
    from tb_lightning.core.tasks import written_files

    for name in (".run.lock", "predictions.csv", ".hydra"):
        (tmp_path / name).touch()
    assert written_files(tmp_path) == ".hydra, predictions.csv"
