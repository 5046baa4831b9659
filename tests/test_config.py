"""Every config group composes and instantiates; bad values fail early naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import RichProgressBar

from conftest import compose_train, phantom_overrides
from tb_lightning.config import CONF_DIR
from tb_lightning.core.errors import ConfigError
from tb_lightning.core.tasks import instantiate_group
from tb_lightning.train import train


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_every_group_has_its_options():
    assert {"tb_cxr", "phantom", "folder"} <= set(options("data"))
    assert {"default", "cpu", "gpu", "ddp", "ddp_cpu"} <= set(options("trainer"))
    assert {"tensorboard", "csv"} <= set(options("logger"))
    assert {"reference", "quickstart", "nlm_scratch"} <= set(options("experiment"))
    assert {"fdr", "overfit"} <= set(options("debug"))
    assert options("model") == ["alexnet"]
    assert {"none", "cosine", "plateau"} <= set(options("model/scheduler"))
    assert {"none", "cxr"} <= set(options("data/augment"))


def test_defaults_are_the_reference_configuration():
    cfg = compose_train([])
    reference = compose_train(["experiment=reference"])
    for key in ("data", "model", "trainer"):
        assert cfg[key] == reference[key], key
    assert cfg.data.image_size == 512 and cfg.data.batch_size == 18 and cfg.data.val_size == 600
    assert cfg.model.net.weights == "imagenet" and cfg.model.net.freeze_features
    assert cfg.seed == 42 and cfg.ckpt_path is None and cfg.optimized_metric == "val/auroc"


@pytest.mark.parametrize("option", options("data"))
def test_data_options_instantiate(option, tmp_path):
    cfg = compose_train([f"data={option}", f"data.root={tmp_path}"])
    datamodule = instantiate(cfg.data)
    assert datamodule.source == option


def test_model_instantiates_with_plain_hparams():
    cfg = compose_train(["model.net.weights=null", "data.image_size=128"])
    model = instantiate(cfg.model, _recursive_=False)
    assert model.hparams.net["dropout"] == 0.5
    assert type(model.hparams.optimizer) is dict
    assert type(model.configure_optimizers()).__name__ == "Adam"


@pytest.mark.parametrize("option", options("trainer"))
def test_trainer_options_instantiate(option):
    cfg = compose_train([f"trainer={option}"])
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        assert cfg.trainer.devices in (1, "auto")  # gpu: one; ddp: all of them
        return
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.max_epochs == 10


# mlflow's import alone takes ~8 s: that one runs with the slow tests (make test-slow).
@pytest.mark.parametrize(
    "option",
    [pytest.param(o, marks=pytest.mark.slow) if o == "mlflow" else o for o in options("logger")],
)
def test_logger_options_instantiate(option, tmp_path):
    # paths.log_dir: MLflow's embedded store lives there (<log_dir>/mlruns), beside the runs.
    cfg = compose_train([f"logger={option}", f"paths.log_dir={tmp_path}"], output_dir=tmp_path)
    loggers = instantiate_group(cfg.logger)
    folders = [getattr(lg, "log_dir", None) or lg.save_dir for lg in loggers]
    assert loggers and all(tmp_path in Path(folder).parents for folder in folders)


def test_callbacks_instantiate(tmp_path):
    cfg = compose_train([], output_dir=tmp_path)
    callbacks = instantiate_group(cfg.callbacks)
    names = {type(cb).__name__ for cb in callbacks}
    assert {"ModelCheckpoint", "ProgressBar", "OneLineModelSummary"} <= names
    assert any(isinstance(cb, RichProgressBar) for cb in callbacks)


def test_quickstart_and_debug_presets():
    quick = compose_train(["experiment=quickstart"])
    assert quick.data.source == "phantom" and quick.model.net.weights is None
    # What makes the first run learn (README): conspicuous synthetic findings, a whole network
    # trained from random weights; in a phantom folder of its own.
    assert quick.data.phantom.lesions == "conspicuous"
    assert quick.model.net.freeze_features is False and quick.model.net.arch == "resnet18"
    assert quick.data.root == f"{quick.paths.data_dir}/phantom-quickstart"
    # The reference experiment's frozen-feature preset is untouched.
    reference = compose_train(["experiment=reference"])
    assert reference.model.net.freeze_features and reference.model.net.weights == "imagenet"
    assert reference.model.net.arch == "alexnet" and reference.data.source == "tb_cxr"
    assert compose_train(["debug=fdr"]).trainer.fast_dev_run is True
    assert compose_train(["debug=overfit"]).trainer.overfit_batches == 2


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.optimizer.lr=0", "model.optimizer.lr=0"),
        ("model.optimizer.lr=-1e-3", "model.optimizer.lr=-0.001"),
        ("model.net.dropout=1.5", "model.net.dropout=1.5"),
        ("data.val_size=1000", "data.val_size=1000"),
        ("data.image_size=32", "data.image_size=32"),
        ("trainer.accelerator=quantum", "trainer.accelerator='quantum'"),
    ],
)
def test_bad_values_fail_before_training_naming_the_key(phantom_root, tmp_path, override, key):
    cfg = compose_train([*phantom_overrides(phantom_root), override], output_dir=tmp_path)
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert str(err.value).startswith(key)
    assert not (tmp_path / "checkpoints").exists()


def test_entry_points_start_without_torch():
    """--help and the first log line come before the seconds torch and Lightning take to import:
    the entry modules import neither (the work is imported once the config is composed)."""
    code = (
        "import sys, tb_lightning.train, tb_lightning.eval, tb_lightning.predict, "
        "tb_lightning.export; print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "override, message",
    [
        ("+data.rooot=/x", "data.rooot is not a setting here (did you mean data.root? "),
        ("+model.net.dropuot=0.3", "model.net.dropuot is not a setting here (did you mean "),
        ("+trainer.max_epoch=3", "trainer.max_epoch is not a setting here (did you mean "),
        ("+sed=3", "sed is not a setting here (did you mean seed? "),
    ],
)
def test_keys_added_with_plus_that_nothing_reads_are_refused(
    phantom_root, tmp_path, override, message
):
    """Hydra's advice for a typo is `+key=value`: that used to end in a TypeError."""
    cfg = compose_train([*phantom_overrides(phantom_root), override], output_dir=tmp_path)
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert str(err.value).startswith(message)
    assert f"remove +{override[1:].split('=')[0]}=..." in str(err.value)


def test_an_unwritable_cache_folder_is_one_sentence_before_any_work(phantom_root, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cfg = compose_train(
        [*phantom_overrides(phantom_root), f"data.scan_cache_dir={blocker}/scan"],
        output_dir=tmp_path / "run",
    )
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert str(err.value).startswith(f"{blocker}/scan cannot be written (")
    assert "data.scan_cache_dir=<folder>" in str(err.value)


def test_nlm_compact_is_nlm_scratch_with_the_measured_compact_network():
    """experiment=nlm_compact is the issue-28 run that docs/experiments.md reports: the recipe
    with compact_tb, 60 epochs, the focal loss (gamma 2) and flips, nothing else changed."""
    from omegaconf import OmegaConf

    scratch = OmegaConf.to_container(compose_train(["experiment=nlm_scratch"]), resolve=True)
    compact = OmegaConf.to_container(compose_train(["experiment=nlm_compact"]), resolve=True)
    changed = {
        ("model", "net", "arch"): ("resnet18", "compact_tb"),
        ("model", "loss"): ("bce", "focal"),
        ("model", "focal_gamma"): (None, 2.0),
        ("model", "tta"): (None, "hflip"),
        ("trainer", "max_epochs"): (30, 60),
    }
    for path, (before, after) in changed.items():
        a, b = scratch, compact
        for key in path[:-1]:
            a, b = a[key], b[key]
        assert (a.pop(path[-1]), b.pop(path[-1])) == (before, after), path
    assert compact == scratch
