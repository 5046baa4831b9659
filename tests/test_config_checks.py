"""Start-up checks: bad values fail in one sentence before any data is read."""

from __future__ import annotations

import copy

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

from conftest import phantom_overrides
from tb_lightning.config_checks import check_config
from tb_lightning.errors import ConfigError, WeightsError
from test_config import compose_train

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
