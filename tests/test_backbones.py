import lightning as L
import pytest
import torch
from torchvision import models

from conftest import PHANTOM_NORMAL, PHANTOM_SIZE, PHANTOM_TB
from tb_lightning.data.datamodule import TBDataModule
from tb_lightning.inference.features import build_feature_cache
from tb_lightning.models import weights as weights_module
from tb_lightning.models.backbones import ARCHS
from tb_lightning.models.classifier import TBClassifier
from tb_lightning.models.net import build_net


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
    datamodule = TBDataModule(
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
    )
    features = build_feature_cache(datamodule, model.net)
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
