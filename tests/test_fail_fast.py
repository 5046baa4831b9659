"""A config mistake costs neither seconds nor a folder; the config is printed and saved at start.

The commands run as a user runs them (subprocesses). `python -X importtime` lists every module a
process imports on stderr: a mistake must be answered before torch is among them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import PROJECT_ROOT, TESTS_DIR
from tb_lightning.config.checks import check_scheduler
from tb_lightning.config.printing import SAVED_NAME, compact_yaml, print_config
from tb_lightning.core.errors import ConfigError

HEAVY = ("torch", "torchvision", "lightning")


def run_python(*args: str) -> tuple[int, str, list[str], set[str]]:
    """`python -X importtime <args>`: exit code, stdout, stderr's lines other than the import
    timings, and the top-level packages imported."""
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore::DeprecationWarning",
        "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT / "src"), str(TESTS_DIR)]),
    }
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = result.stderr.splitlines()
    timings = [line for line in lines if line.startswith("import time:")]
    # "import time:  self | cumulative | <indent>package.module"
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in timings[1:]}
    others = [line for line in lines if not line.startswith("import time:")]
    return result.returncode, result.stdout, others, imported


def assert_refused(args: list[str], message: str, log_dir: Path) -> None:
    code, stdout, stderr, imported = run_python(*args)
    assert code == 1, stdout + "\n".join(stderr)
    assert stderr == [message]  # one sentence, no traceback, no warning
    assert stdout == ""
    assert not set(HEAVY) & imported, set(HEAVY) & imported
    assert not log_dir.exists() or not list(log_dir.iterdir())  # no run folder


def test_a_config_mistake_is_answered_before_torch_and_leaves_no_folder(tmp_path):
    log_dir = tmp_path / "outputs"
    assert_refused(
        ["-m", "tb_lightning.train", "model.net.dropout=1.5", f"paths.log_dir={log_dir}"],
        "model.net.dropout=1.5 must be a number in [0, 1).",
        log_dir,
    )


def test_a_kfold_sweep_with_a_warmup_mistake_stops_once_before_any_job(tmp_path):
    """Every fold would fail the warm-up check: said once, with its fix, and no job folder."""
    log_dir = tmp_path / "outputs"
    assert_refused(
        [
            "-m",
            "tb_lightning.train",
            "-m",
            "experiment=nlm_scratch",
            "sweep=kfold",
            "trainer.max_epochs=1",
            f"data.root={tmp_path / 'no-data'}",
            f"paths.log_dir={log_dir}",
        ],
        "No job was started: model.scheduler.warmup_epochs=1 leaves no epoch for the cosine "
        "decay with trainer.max_epochs=1; set trainer.max_epochs >= 2 or "
        "model.scheduler.warmup_epochs=0.",
        log_dir,
    )


def test_a_sweep_with_one_bad_value_names_that_job(tmp_path):
    """Only the second job's config is wrong (a swept key): the multirun does not start and the
    sentence names the job and its value."""
    log_dir = tmp_path / "outputs"
    assert_refused(
        [
            "-m",
            "tb_lightning.train",
            "-m",
            "model.net.dropout=0.3,1.5",
            "model.net.hidden_dim=8,16",
            f"paths.log_dir={log_dir}",
        ],
        "No job was started: 2 of 4 jobs would fail; job 2 (model.net.dropout=1.5 "
        "model.net.hidden_dim=8): model.net.dropout=1.5 must be a number in [0, 1).",
        log_dir,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["tb_lightning.eval", "ckpt_path=/no/such.ckpt"],
            "ckpt_path=/no/such.ckpt does not exist; pass a checkpoint written by "
            "tb_lightning.train, e.g. outputs/train/runs/<run>/checkpoints/best.ckpt, or a "
            "k-fold multirun directory.",
        ),
        (
            ["tb_lightning.predict", "ckpt_path=/no/such.ckpt", "input=/no/such/folder"],
            "ckpt_path=/no/such.ckpt does not exist; pass a checkpoint written by "
            "tb_lightning.train, e.g. outputs/train/runs/<run>/checkpoints/best.ckpt, or a "
            "k-fold multirun directory.",
        ),
        (
            ["tb_lightning.export", "ckpt_path=/no/such.ckpt", "format=tflite"],
            "format='tflite' is not one of ['onnx', 'torchscript'].",
        ),
    ],
)
def test_eval_predict_export_mistakes_are_answered_before_torch(tmp_path, args, message):
    log_dir = tmp_path / "outputs"
    assert_refused(["-m", *args, f"paths.log_dir={log_dir}"], message, log_dir)


def test_the_checks_of_values_import_no_torch():
    code, stdout, stderr, imported = run_python(
        "-c",
        "import tb_lightning.config.callback, tb_lightning.config.checks, "
        "tb_lightning.config.printing",
    )
    assert code == 0, stderr
    assert not set(HEAVY) & imported


def test_the_warmup_sentence_gives_both_fixes():
    with pytest.raises(ConfigError) as err:
        check_scheduler({"name": "cosine", "warmup_epochs": 3}, 2)
    assert str(err.value).endswith(
        "set trainer.max_epochs >= 4 or model.scheduler.warmup_epochs <= 1."
    )
    check_scheduler({"name": "cosine", "warmup_epochs": 3}, 4)  # one epoch of decay: fine
    check_scheduler({"name": "plateau", "warmup_epochs": 3}, 2)  # no warm-up in that schedule


# --- the config at start -------------------------------------------------------------------------


def test_the_run_saves_its_resolved_config_and_logs_it_as_yaml(trained_run):
    """The session's CLI run (stdout piped): train.log holds the YAML, config_resolved.yaml the
    same values, every interpolation resolved; Hydra's own record is left as it was."""
    saved = trained_run / SAVED_NAME
    text = saved.read_text()
    assert "${" not in text
    config = yaml.safe_load(text)
    assert config["paths"]["output_dir"] == str(trained_run)
    assert config["trainer"]["max_epochs"] == 2 and config["threshold"]["policy"] == "max_f1"
    assert config["model"]["net"]["image_size"] == config["data"]["image_size"]
    log = (trained_run / "train.log").read_text()
    assert f"Config (resolved, saved as {saved}):\n{text.rstrip()}\n" in log
    assert "${" in (trained_run / ".hydra" / "config.yaml").read_text()  # as written


def test_print_config_draws_a_tree_at_a_terminal(tmp_path, capsys):
    cfg = OmegaConf.create(
        {
            "seed": 1,
            "data": {"root": "${paths.root}/x", "class_names": ["N", "T"]},
            "paths": {"root": "/r"},
        }
    )
    path = print_config(cfg, tmp_path, tty=True)
    out = capsys.readouterr().out
    assert path == tmp_path / SAVED_NAME
    assert out.startswith("CONFIG (resolved, saved as ")
    assert f"saved as {path})" in out.replace("\n", "")  # rich wraps it at 80 columns here
    assert "├── data" in out and "root: /r/x" in out and "class_names: [N, T]" in out
    assert yaml.safe_load(path.read_text())["data"]["root"] == "/r/x"


def test_compact_yaml_loads_back_and_puts_short_collections_on_one_line():
    data = {
        "a": {"b": 1, "c": [1, 2]},
        "long": {f"key_{i}": "x" * 10 for i in range(8)},
        "nested": {"inner": {"x": 1}},
        "empty": {},
    }
    text = compact_yaml(data)
    assert yaml.safe_load(text) == data
    assert "a: {b: 1, c: [1, 2]}" not in text  # a mapping holding a list stays in block style
    assert "  c: [1, 2]\n" in text
    assert "long:\n  key_0: xxxxxxxxxx\n" in text  # too long for one line
    assert "  inner: {x: 1}\n" in text


@pytest.mark.parametrize(
    "overrides, warned",
    [
        (["data.test_size=8"], True),  # data.split_seed follows seed: two test splits
        (["data.test_size=8", "data.split_seed=42"], False),  # one test split, one ensemble
        ([], False),  # no held-out test split: each seed's folds cover every image once
    ],
)
def test_a_kfold_sweep_over_seeds_is_warned_when_its_test_splits_would_differ(overrides, warned):
    """`-m sweep=kfold seed=0,1` with a held-out test split: the folder would not load as one
    ensemble (each seed another test split), which eval says only after the training."""
    from hydra import compose, initialize_config_dir

    from tb_lightning.config.callback import seed_split_warning

    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base=None):
        cfg = compose(
            "train",
            ["sweep=kfold", "data=phantom", "+hydra.sweeper.params.seed='0,1'", *overrides],
            return_hydra_config=True,
        )
        warning = seed_split_warning(cfg, "train")
    if warned:
        assert warning is not None and "add data.split_seed=42" in warning
    else:
        assert warning is None
