"""Start-up checks: bad values fail in one sentence before any data is read."""

from __future__ import annotations

import copy

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

from conftest import compose_train, phantom_overrides
from tb_lightning.config import CONF_DIR
from tb_lightning.config.checks import check_config
from tb_lightning.core.errors import ConfigError, WeightsError

# data.root points nowhere: a check that got past the config would fail on the data instead.
NO_DATA = "/no/such/data"


@pytest.fixture(scope="module")
def base_cfg() -> DictConfig:
    return compose_train(["data=tb_cxr", f"data.root={NO_DATA}"])


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("model.optimizer.lr", 0, "model.optimizer.lr=0 must be a number > 0"),
        ("model.optimizer.lr", -0.001, "model.optimizer.lr=-0.001 must be a number > 0"),
        ("model.optimizer.lr", "abc", "model.optimizer.lr='abc' must be a number > 0"),
        ("model.optimizer.weight_decay", -1, "model.optimizer.weight_decay=-1 must be a number"),
        ("model.net.dropout", 1.0, "model.net.dropout=1.0 must be a number in [0, 1)"),
        ("model.net.dropout", -0.1, "model.net.dropout=-0.1 must be a number in [0, 1)"),
        ("model.net.hidden_dim", 0, "model.net.hidden_dim=0 must be an integer >= 1"),
        ("data.image_size", 32, "data.image_size=32 is too small for alexnet"),
        ("data.batch_size", 0, "data.batch_size=0 must be an integer >= 1"),
        ("data.val_size", 1, "data.val_size=1 is smaller than one validation image per class"),
        ("data.val_size", 1.5, "data.val_size=1.5 is not a fraction in (0, 1)"),
        ("data.num_workers", -2, "data.num_workers=-2 is not allowed"),
        ("trainer.accelerator", "quantum", "trainer.accelerator='quantum' is not one of"),
        ("trainer.devices", 0, "trainer.devices=0 is not allowed"),
        ("trainer.max_epochs", 0, "trainer.max_epochs=0 must be an integer >= 1"),
        ("trainer.precision", "8-bit", "trainer.precision='8-bit' is not one of"),
        ("seed", "abc", "seed='abc' must be an integer"),
        ("ckpt_path", "/no/such.ckpt", "ckpt_path=/no/such.ckpt does not exist"),
    ],
)
def test_bad_values_fail_before_any_data_is_read(base_cfg, key, value, message):
    cfg = copy.deepcopy(base_cfg)
    OmegaConf.update(cfg, key, value)
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "override, message",
    [
        # 36 phantom images (24 Normal, 12 TB): the phantom set's size is known up front.
        ("data.val_size=40", "data.val_size=40 must be between 1 and 35"),
        ("data.val_size=35", "data.val_size=35 leaves no Tuberculosis image for training"),
        ("data.val_size=0.01", "data.val_size=0.01 leaves no Tuberculosis image for validation"),
    ],
)
def test_val_size_against_the_phantom_set(tmp_path, override, message):
    cfg = compose_train([*phantom_overrides(tmp_path / "not-generated"), override])
    with pytest.raises(ConfigError, match=rf"^{message.replace('.', '[.]')}"):
        check_config(cfg)
    assert not (tmp_path / "not-generated").exists()  # nothing was generated or read


def test_missing_weights_file_fails_up_front():
    cfg = compose_train(["model.net.weights=/no/such/alexnet.pth"])
    with pytest.raises(WeightsError, match=r"^model.net.weights=/no/such/alexnet.pth does not"):
        check_config(cfg)


def test_good_configs_pass():
    for overrides in ([], ["experiment=quickstart"], ["trainer=ddp_cpu"], ["data.val_size=0.2"]):
        check_config(compose_train(overrides))


def test_typo_in_an_override_key_is_refused_by_hydra():
    with pytest.raises(ConfigCompositionException, match="dropuot"):
        compose_train(["model.net.dropuot=0.3"])


# One validation layer: the values the classes used to check themselves, now refused here, with
# the sentence each mistake has (written once, in config/checks.py).
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.net.arch=vgg16"], "model.net.arch='vgg16' is not one of"),
        (["data.image_size=48"], "data.image_size=48 is too small for alexnet"),
        (["model.net.dropout=-0.1"], "model.net.dropout=-0.1 must be a number in [0, 1)"),
        (["model.net.pool_size=0"], "model.net.pool_size=0 must be null or an integer >= 1"),
        (["model.optimizer.backbone_lr_scale=-1"], "model.optimizer.backbone_lr_scale=-1 must"),
        (["model.threshold=1.5"], "model.threshold=1.5 must be a number in (0, 1)"),
        (["data.class_names=[a]"], "data.class_names=['a'] must name two folders"),
        (["data.source=kaggle"], "data.source='kaggle' is not one of"),
        (["data.num_folds=3", "data.fold=3"], "data.fold=3 is not a fold of data.num_folds=3"),
        (["data.num_folds=1"], "data.num_folds=1 must be an integer >= 2"),
        (["data.test_size=-3"], "data.test_size=-3 must be a count >= 2 or a fraction"),
        (["data.on_bad_file=ignore"], "data.on_bad_file='ignore' is not one of"),
        (["data.on_leak=maybe"], "data.on_leak='maybe' is not one of"),
        (["data.near_duplicate_distance=300"], "data.near_duplicate_distance=300 must be"),
        (["data.cache_features=sometimes"], "data.cache_features='sometimes' is not allowed"),
        (["+data.augment.rotation_degree=5"], "data.augment.rotation_degree is not an"),
        (["data/augment=cxr", "data.augment.brightness=-1"], "data.augment.brightness=-1 must"),
        (["data.sources=[{root:/x}]"], "data.sources entry {'root': '/x'} must set source"),
        (["data=phantom", "data.phantom.num_normal=0"], "data.phantom.num_normal=0 must be an"),
        (["data=phantom", "data.phantom.num_tb=2.5"], "data.phantom.num_tb=2.5 must be an"),
        (["data=phantom", "data.phantom.image_size=32"], "data.phantom.image_size=32 must be"),
        (["data=phantom", "data.phantom.seed=-1"], "data.phantom.seed=-1 must be an integer"),
        (["data=phantom", "data.phantom.lesions=loud"], "data.phantom.lesions='loud' is not"),
        (["model.scheduler.name=step"], "model.scheduler.name='step' is not one of"),
        (
            ["model/scheduler=cosine", "model.scheduler.warmup_epochs=10"],
            "model.scheduler.warmup_epochs=10 leaves no epoch for the cosine decay with "
            "trainer.max_epochs=10; set trainer.max_epochs >= 11 or "
            "model.scheduler.warmup_epochs <= 9.",
        ),
        (
            ["model/scheduler=cosine", "model.scheduler.warmup_epochs=-1"],
            "model.scheduler.warmup_epochs=-1 must be an integer >= 0 (0: no warm-up).",
        ),
        (
            ["model.optimizer._target_=torch.optim.RMSprop"],
            "model.optimizer._target_=torch.optim.RMSprop has no `fused` argument; add "
            "~model.optimizer.fused",
        ),
        (["threshold.policy=f2"], "threshold.policy='f2' is not one of"),
        (
            ["threshold.policy=sensitivity", "threshold.target=1.5"],
            "threshold.target=1.5 must be a sensitivity in (0, 1]",
        ),
    ],
)
def test_each_mistake_is_refused_by_the_config_checks(overrides, message):
    with pytest.raises(ConfigError) as err:
        check_config(compose_train(["data=tb_cxr", f"data.root={NO_DATA}", *overrides]))
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_the_optimizer_checks_let_good_settings_through():
    for overrides in (
        ["model.optimizer._target_=torch.optim.RMSprop", "~model.optimizer.fused"],
        ["model.optimizer._target_=torch.optim.SGD"],
    ):
        check_config(compose_train(overrides))


@pytest.mark.parametrize(
    "task, overrides, message",
    [
        ("eval", ["eval.split=all"], "eval.split=all needs a data source"),
        ("eval", ["eval.split=train"], "eval.split='train' is not one of"),
        ("eval", ["eval.bootstrap=10"], "eval.bootstrap=10 must be an integer >= 100"),
        ("eval", ["threshold.value=1.5"], "threshold.value=1.5 must be in (0, 1)"),
        ("predict", ["input=null"], "input is not set"),
        ("predict", ["input=x", "batch_size=0"], "batch_size=0 must be an integer >= 1"),
        ("export", ["format=tflite"], "format='tflite' is not one of"),
        ("export", ["check_images=0"], "check_images=0 must be an integer >= 1"),
        ("eval", ["ckpt_path=null"], "ckpt_path is not set"),
    ],
)
def test_eval_predict_export_values_are_checked_first(task, overrides, message):
    from tb_lightning.config import checks

    check = {
        "eval": checks.check_eval_config,
        "predict": checks.check_predict_config,
        "export": checks.check_export_config,
    }[task]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(task, overrides=["ckpt_path=x.ckpt", *overrides])
    with pytest.raises(ConfigError) as err:
        check(cfg)
    assert str(err.value).startswith(message)
