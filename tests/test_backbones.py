"""Every backbone of the registry (models/backbones.py) and timm/<name>: built, trained, loaded,
checked in the config, and Grad-CAM on each. A new record gets the parametrized tests for free."""

import csv
import shutil

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision import models

from conftest import (
    PHANTOM_NORMAL,
    PHANTOM_SIZE,
    PHANTOM_TB,
    compose_train,
    phantom_overrides,
    run_cli,
    train_in_process,
)
from datamodules import make_datamodule
from tb_lightning.config.checks import check_config, check_image_size, check_model
from tb_lightning.core import extras
from tb_lightning.core.errors import ConfigError, WeightsError
from tb_lightning.data.feature_cache import build_feature_cache
from tb_lightning.inference.saliency import gradcam, gradcam_layer
from tb_lightning.models import weights as weights_module
from tb_lightning.models.backbones import (
    ARCHS,
    MIN_IMAGE_SIZE,
    REGISTRY,
    TIMM_PREFIX,
    backbone,
    check_backbone,
    imagenet_refusal,
)
from tb_lightning.models.classifier import TBClassifier
from tb_lightning.models.net import build_net
from tb_lightning.trained.runner import run_over_images


@pytest.mark.parametrize("arch", ARCHS)
def test_every_backbone_builds_trains_and_freezes(arch):
    net = build_net(arch=arch, weights=None, image_size=96, hidden_dim=16, freeze_features=False)
    assert net(torch.randn(2, 3, 96, 96)).shape == (2,)
    assert all(p.requires_grad for p in net.parameters())
    frozen = build_net(arch=arch, weights=None, image_size=96, hidden_dim=16)
    frozen.train()
    assert not frozen.features.training  # BatchNorm statistics stay fixed when frozen
    assert not any(p.requires_grad for p in frozen.features.parameters())


def test_non_alexnet_backbones_pool_globally_by_default():
    net = build_net(arch="resnet18", weights=None, image_size=128, hidden_dim=8)
    assert net.head[1].in_features == 512
    pooled = build_net(arch="resnet18", weights=None, image_size=128, hidden_dim=8, pool_size=2)
    assert pooled.head[1].in_features == 512 * 4


def test_resnet_takes_images_smaller_than_alexnet_does():
    build_net(arch="resnet18", weights=None, image_size=48)  # (AlexNet needs 63 px)


def test_resnet_imagenet_weights_from_torchvisions_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = weights_module.imagenet_cache_file("resnet18")
    assert cached.name == "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    reference = models.resnet18(weights=None)
    torch.save(reference.state_dict(), cached)
    net = build_net(arch="resnet18", weights="imagenet", image_size=64, hidden_dim=8)
    assert torch.equal(net.features.conv1.weight, reference.conv1.weight)
    assert torch.equal(net.features.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)


def test_densenet_old_style_keys_are_renamed(tmp_path):
    reference = models.densenet121(weights=None)
    state = reference.state_dict()
    old_style = {
        k.replace("denselayer1.norm1.", "denselayer1.norm.1."): v for k, v in state.items()
    }
    assert old_style != state
    torch.save(old_style, tmp_path / "densenet.pth")
    net = build_net(arch="densenet121", weights=str(tmp_path / "densenet.pth"), image_size=64)
    key = "denseblock1.denselayer1.norm1.weight"
    assert torch.equal(net.features.state_dict()[key], state[f"features.{key}"])


def test_own_network_state_dict_round_trip(tmp_path):
    net = build_net(arch="resnet18", weights=None, image_size=64, hidden_dim=8)
    torch.save(net.state_dict(), tmp_path / "tbnet.pth")
    again = build_net(
        arch="resnet18", weights=str(tmp_path / "tbnet.pth"), image_size=64, hidden_dim=8
    )
    for key, value in net.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


@pytest.mark.parametrize("arch", ARCHS)
def test_every_backbone_trains_with_the_default_feature_cache(arch, phantom_root, tmp_path):
    # The defaults of `train model.net.arch=<arch>`: frozen features, data.cache_features=auto.
    # BatchNorm trunks hold a 0-dim num_batches_tracked buffer that the cache key must digest.
    datamodule = make_datamodule(
        source="phantom",
        root=str(phantom_root),
        phantom={
            "num_normal": PHANTOM_NORMAL,
            "num_tb": PHANTOM_TB,
            "image_size": PHANTOM_SIZE,
            "progress": False,
        },
        image_size=64,  # smaller than the phantoms: a fast extraction, valid for every arch
        batch_size=8,
        val_size=12,
        num_workers=0,
        cache_dir=str(tmp_path / "features"),
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = TBClassifier(
        net={"arch": arch, "weights": None, "image_size": 64, "hidden_dim": 8},
        optimizer={"_target_": "torch.optim.Adam", "lr": 1e-3},
        threshold=0.5,
    )
    features = build_feature_cache(datamodule, model.net, run_over_images)
    assert features is not None
    datamodule.serve_features(features)
    assert list((tmp_path / "features").glob("features-*.npy"))
    trainer = L.Trainer(
        fast_dev_run=True,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=datamodule)
    assert trainer.state.finished


# --- the registry ------------------------------------------------------------------------------


def test_the_registry_is_the_one_list_of_backbones():
    assert tuple(REGISTRY) == ARCHS and MIN_IMAGE_SIZE.keys() == set(ARCHS)
    for name, record in REGISTRY.items():
        assert record.name == name
        # ImageNet weights offered for torchvision's backbones; refused in one sentence otherwise.
        assert record.imagenet == (record.library == "torchvision")
        assert (imagenet_refusal(name) is None) == record.imagenet
        check_image_size(record.min_image_size, name)
        with pytest.raises(ConfigError, match=f"too small for {name}"):
            check_image_size(record.min_image_size - 1, name)
    with pytest.raises(ConfigError, match="is not one of .* or timm/<name>"):
        backbone("vgg16")
    with pytest.raises(ConfigError, match="is not one of"):
        backbone("timm/")


@pytest.mark.parametrize("arch", ARCHS)
def test_every_backbone_takes_its_smallest_image_and_says_if_it_has_batchnorm(arch):
    record = backbone(arch)
    size = record.min_image_size
    net = build_net(arch=arch, weights=None, image_size=size, hidden_dim=4).eval()
    assert net(torch.randn(1, 3, size, size)).shape == (1,)
    assert net.arch == arch
    assert record.has_batchnorm == any(isinstance(m, _BatchNorm) for m in net.features.modules())
    assert net.batchnorm == record.has_batchnorm


# --- Grad-CAM on every backbone --------------------------------------------------------------

TIMM_CASES = ("timm/resnet18", "timm/efficientnet_b0")


def calibrated(net: nn.Module, size: int) -> nn.Module:
    """The randomly initialised net in eval mode, its BatchNorm statistics those of one batch of
    noise: with the initial ones (mean 0, variance 1) EfficientNet's activations shrink to 1e-14
    by its last block, and every map would be empty for that reason alone."""
    for module in net.modules():
        if isinstance(module, _BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a plain average of the batches seen: this one
    net.train()
    with torch.no_grad():
        net(torch.randn(8, 3, size, size))
    return net.eval()


@pytest.mark.parametrize("arch", [*ARCHS, *TIMM_CASES])
def test_every_backbone_gives_a_gradcam_map(arch):
    pytest.importorskip("captum")
    if arch.startswith(TIMM_PREFIX):
        pytest.importorskip("timm")
    torch.manual_seed(0)
    size = 64
    net = build_net(arch=arch, weights=None, image_size=size, hidden_dim=8, freeze_features=False)
    net = calibrated(net, size)
    layer = gradcam_layer(net)
    seen = []
    hook = layer.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    images = torch.randn(2, 3, size, size)
    maps = gradcam(net, images)
    hook.remove()
    assert len(seen[-1]) == 4 and min(seen[-1][-2:]) >= 2  # a spatial map to weigh
    assert maps.shape == (2, size, size)
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    # Not degenerate: the layer's activations and the logit's gradient are not zero. Grad-CAM
    # keeps the evidence for TB only, so a random head may have none; with the head's sign
    # flipped the evidence flips, so each image has a full-scale map in one of the two.
    net.head[3].weight.data.neg_()
    flipped = gradcam(net, images)
    peaks = torch.maximum(maps.amax(dim=(1, 2)), flipped.amax(dim=(1, 2)))
    assert torch.allclose(peaks, torch.ones(2)), peaks


@pytest.mark.slow
def test_predict_saliency_with_efficientnet_b0(phantom_root, tmp_path):
    """EfficientNet has SiLU, no ReLU: Grad-CAM once found no layer to weigh there."""
    pytest.importorskip("captum")
    run_dir = tmp_path / "train"
    train_in_process(
        [
            *phantom_overrides(phantom_root),
            "model.net.arch=efficientnet_b0",
            "model.net.hidden_dim=8",
            "data.image_size=32",  # EfficientNet's smallest: a fast run
            "trainer.max_epochs=1",
        ],
        run_dir,
    )
    images = tmp_path / "in"
    images.mkdir()
    for path in sorted((phantom_root / "Tuberculosis").glob("*.png"))[:1]:
        shutil.copy(path, images / path.name)
    out = tmp_path / "predict"
    result = run_cli(
        "tb_lightning.predict",
        f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}",
        f"input={images}",
        "saliency=true",
        "trainer.accelerator=cpu",
        f"hydra.run.dir={out}",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 1
    for row in rows:
        assert (out / row["saliency"]).is_file()


# --- timm/<name> -------------------------------------------------------------------------------


def model_section(arch: str, weights: str | None) -> dict:
    """A `model` section as conf/model/alexnet.yaml composes it, for check_model."""
    return {
        "optimizer": {"lr": 1e-3},
        "net": {"arch": arch, "weights": weights, "dropout": 0.5, "hidden_dim": 8},
        "threshold": 0.5,
        "scheduler": {"name": "none"},
    }


def test_timm_without_the_extra_names_it(monkeypatch):
    monkeypatch.setattr(extras, "missing", lambda extra: ["timm"])
    with pytest.raises(ConfigError) as err:
        backbone("timm/resnet18")
    assert str(err.value).startswith("model.net.arch=timm/resnet18 needs the optional 'timm'")
    assert "pip install -e '.[timm]'" in str(err.value)


def test_timm_names_are_checked_in_the_config_check_before_the_data(phantom_root):
    pytest.importorskip("timm")
    check_model(model_section("timm/resnet18", weights=None))
    cfg = compose_train([*phantom_overrides(phantom_root), "model.net.arch=timm/resnet81"])
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert str(err.value).startswith(
        "model.net.arch=timm/resnet81 names no timm model (did you mean timm/resnet18"
    )
    with pytest.raises(ConfigError, match="cannot take data.image_size=64 images"):
        check_backbone("timm/vit_tiny_patch16_224", 64)  # made for 224 px only
    check_backbone("timm/resnet18", 64)


def test_timm_imagenet_weights_are_refused_in_one_sentence():
    refusal = (
        "model.net.weights=imagenet is not offered for model.net.arch=timm/resnet18: this "
        "project downloads only torchvision's ImageNet weights;"
    )
    with pytest.raises(WeightsError) as err:
        check_model(model_section("timm/resnet18", weights="imagenet"))
    assert str(err.value).startswith(refusal) and "model.net.weights=null" in str(err.value)
    with pytest.raises(WeightsError, match="is not offered"):
        weights_module.load_imagenet_state_dict("timm/resnet18")  # sweep/callback.py's call
    pytest.importorskip("timm")
    with pytest.raises(WeightsError, match="is not offered"):
        build_net(arch="timm/resnet18", weights="imagenet", image_size=64)


def test_timm_weights_from_a_local_timm_state_dict(tmp_path):
    timm = pytest.importorskip("timm")
    # With its ImageNet classifier (head.fc in ConvNeXt, named by its pretrained_cfg): ignored.
    reference = timm.create_model("convnext_nano", pretrained=False)
    torch.save(reference.state_dict(), tmp_path / "convnext_nano.pth")
    net = build_net(
        arch="timm/convnext_nano", weights=str(tmp_path / "convnext_nano.pth"), image_size=64
    )
    own = net.features.state_dict()
    assert net.head[1].in_features == reference.num_features == 640
    for key, value in reference.state_dict().items():
        if not key.startswith("head.fc."):
            assert torch.equal(own[key], value), key
    # This project's own network round-trips as for torchvision backbones.
    torch.save(net.state_dict(), tmp_path / "tbnet.pth")
    again = build_net(arch="timm/convnext_nano", weights=str(tmp_path / "tbnet.pth"), image_size=64)
    for key, value in net.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    with pytest.raises(WeightsError, match="pass a state dict of timm's resnet18 or of this"):
        build_net(arch="timm/resnet18", weights=str(tmp_path / "convnext_nano.pth"), image_size=64)


def test_timm_channels_are_those_the_model_gives():
    pytest.importorskip("timm")
    # MobileNetV3's conv_head runs after forward_features: 576 features, 1024 channels out.
    net = build_net(arch="timm/mobilenetv3_small_100", weights=None, image_size=64, hidden_dim=4)
    assert net.head[1].in_features == 1024
    assert net.eval()(torch.randn(1, 3, 64, 64)).shape == (1,)
    assert net.batchnorm  # read from the trunk: timm records cannot know it without torch


# --- compact_tb: the project's own network ---------------------------------------------------


@pytest.mark.parametrize(("size", "params"), [(128, 681_841), (256, 1_468_273)])
def test_compact_tb_has_the_published_size_and_one_logit(size, params):
    # LightTBNet's ~1.5 M parameters at 256 px: the head reads the whole 16-channel map.
    net = build_net(
        arch="compact_tb", weights=None, freeze_features=False, hidden_dim=256, image_size=size
    )
    assert sum(p.numel() for p in net.parameters()) == params
    features = net.features(torch.randn(2, 3, size, size))
    assert features.shape == (2, 16, size // 16, size // 16)
    assert net(torch.randn(2, 3, size, size)).shape == (2,)
    # One input channel: the 3 repeated ones are averaged first.
    assert net.features.stem[0].in_channels == 1


def test_compact_tb_refuses_imagenet_weights_in_one_sentence():
    with pytest.raises(WeightsError, match=r"^model.net.weights=imagenet is not offered for "):
        build_net(arch="compact_tb", weights="imagenet", image_size=128)
