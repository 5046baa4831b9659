import pickle
import urllib.error

import pytest
import torch
from torchvision import models

from tb_lightning.core.errors import WeightsError
from tb_lightning.models import weights as weights_module
from tb_lightning.models.backbones import alexnet_feature_size
from tb_lightning.models.net import build_net


def count(params) -> int:
    return sum(p.numel() for p in params)


def test_seed_parameter_counts_at_512():
    net = build_net(weights=None, image_size=512)
    trainable = count(p for p in net.parameters() if p.requires_grad)
    frozen = count(p for p in net.parameters() if not p.requires_grad)
    assert count(net.parameters()) == 31_846_717
    assert trainable == 29_377_021
    assert frozen == 2_469_696


def test_head_input_follows_image_size():
    assert alexnet_feature_size(512) == 15
    assert alexnet_feature_size(224) == 6
    net = build_net(weights=None, image_size=224)
    assert net.head[1].in_features == 256 * 6 * 6
    assert net(torch.zeros(2, 3, 224, 224)).shape == (2,)
    assert alexnet_feature_size(63) == 1


def test_frozen_features_stay_in_eval_mode_and_get_no_gradient():
    net = build_net(weights=None, image_size=128, freeze_features=True)
    net.train()
    assert not net.features.training and net.head.training
    net(torch.randn(2, 3, 128, 128)).sum().backward()
    assert all(p.grad is None for p in net.features.parameters())
    assert all(p.grad is not None for p in net.head.parameters())


def test_unfrozen_features_train():
    net = build_net(weights=None, image_size=128, freeze_features=False)
    assert all(p.requires_grad for p in net.parameters())


def test_weights_from_a_torchvision_state_dict_file(tmp_path):
    reference = models.alexnet(weights=None)
    path = tmp_path / "alexnet.pth"
    torch.save(reference.state_dict(), path)  # includes the ImageNet classifier, ignored
    net = build_net(weights=str(path), image_size=128)
    for key, value in reference.features.state_dict().items():
        assert torch.equal(net.features.state_dict()[key], value)


def test_weights_with_wrong_shapes_or_keys_are_refused(tmp_path):
    bad = models.alexnet(weights=None).state_dict()
    bad["features.0.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="wrong shape"):
        build_net(weights=str(tmp_path / "bad.pth"), image_size=128)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="model.net.weights"):
        build_net(weights=str(tmp_path / "other.pth"), image_size=128)
    with pytest.raises(WeightsError, match="does not exist"):
        build_net(weights=str(tmp_path / "missing.pth"), image_size=128)


class Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with path.open("wb") as f:
        pickle.dump({"features.0.weight": Exploit()}, f)
    with pytest.raises(WeightsError, match="refused") as err:
        build_net(weights=str(path), image_size=128)
    assert "could run code (it asks for builtins.print" in str(err.value)  # the refused object
    assert "weights_only" not in str(err.value)


def truncated_state_dict(path):
    torch.save(models.alexnet(weights=None).features.state_dict(), path)
    path.write_bytes(path.read_bytes()[:-100])


@pytest.mark.parametrize(
    "write, problem",
    [
        (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
        (truncated_state_dict, "is truncated or damaged"),
        (lambda p: p.write_bytes(bytes(range(1, 256)) * 4), "is not a PyTorch file"),
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64)), "(it is a PNG image)"),
        (lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\n"), "Git LFS pointer"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: torch.save([torch.zeros(1)], p), "but a list"),
    ],
    ids=["empty", "truncated", "random-bytes", "png", "lfs-pointer", "directory", "list"],
)
def test_a_bad_weights_file_says_what_is_wrong_with_it(tmp_path, write, problem):
    path = tmp_path / "weights.pth"
    write(path)
    with pytest.raises(WeightsError) as err:
        build_net(weights=str(path), image_size=128)
    message = str(err.value)
    assert message.startswith(f"model.net.weights={path} ")
    assert problem in message
    assert "weights_only" not in message and "could run code" not in message


def test_imagenet_offline_names_cache_file_and_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError) as err:
        build_net(weights="imagenet", image_size=128)
    message = str(err.value)
    assert "alexnet-owt-7be5be79.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "model.net.weights=null" in message


def test_imagenet_weights_come_from_torchvisions_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = weights_module.imagenet_cache_file("alexnet")
    cached.parent.mkdir(parents=True)
    reference = models.alexnet(weights=None)
    torch.save(reference.state_dict(), cached)
    net = build_net(weights="imagenet", image_size=128)
    assert torch.equal(net.features[0].weight, reference.features[0].weight)


def test_own_network_state_is_told_from_a_library_one():
    own = build_net(weights=None, image_size=64, hidden_dim=4).state_dict()
    assert weights_module.is_tbnet_state(own)
    assert not weights_module.is_tbnet_state(models.alexnet(weights=None).state_dict())
    # timm's VGG has `features.` and `head.` keys of its own (head.fc: its classifier).
    timm_vgg = {"features.0.weight": torch.zeros(1), "head.fc.weight": torch.zeros(1)}
    assert not weights_module.is_tbnet_state(timm_vgg)


def test_a_training_batch_of_one_image_through_batchnorm_is_warned_once(caplog):
    net = build_net(
        arch="resnet18", weights=None, image_size=64, hidden_dim=4, freeze_features=False
    ).train()
    with caplog.at_level("WARNING", logger="tb_lightning.models.net"):
        net(torch.randn(2, 3, 64, 64))
        assert not caplog.records
        net(torch.randn(1, 3, 64, 64))
        net(torch.randn(1, 3, 64, 64))
    assert len(caplog.records) == 1
    assert "A training batch of 1 image went through resnet18's BatchNorm" in caplog.text
    frozen = build_net(arch="resnet18", weights=None, image_size=64, hidden_dim=4).train()
    alexnet = build_net(weights=None, image_size=64, hidden_dim=4, freeze_features=False).train()
    caplog.clear()  # (the frozen net's warning of random features)
    with caplog.at_level("WARNING", logger="tb_lightning.models.net"):
        frozen(torch.randn(1, 3, 64, 64))  # frozen BatchNorm keeps its statistics
        alexnet(torch.randn(1, 3, 64, 64))  # no BatchNorm
    assert not caplog.records
