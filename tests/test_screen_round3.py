"""benchmarks/screen_round3.py: the switches of round 3 (docs/experiments.md) do what they say."""

import torch
from torch import nn
from torchvision.transforms import v2

from benchmark_scripts import load_benchmark_script
from tb_lightning.data.transforms import build_transform
from tb_lightning.models.backbones import feature_trunk, torchvision_model


def load_screen():
    return load_benchmark_script("screen_round3")


def test_without_maxpool_doubles_the_last_feature_map_of_resnet18() -> None:
    screen = load_screen()
    plain, _ = feature_trunk("resnet18", torchvision_model("resnet18"))
    wider, _ = feature_trunk("resnet18", screen.without_maxpool(torchvision_model)("resnet18"))
    image = torch.zeros(1, 3, 128, 128)
    assert plain(image).shape[-2:] == (4, 4)
    assert wider(image).shape[-2:] == (8, 8)
    assert isinstance(wider.maxpool, nn.Identity)


def test_equalize_first_equalises_before_the_usual_transform() -> None:
    screen = load_screen()
    # A dim, low-contrast image: equalisation spreads its 4 grey levels over 0..255.
    levels = torch.tensor([60, 61, 62, 63], dtype=torch.uint8)
    image = levels.repeat_interleave(256).reshape(1, 32, 32).expand(3, 32, 32).contiguous()
    equalized = v2.functional.equalize(image)
    assert equalized.max() - equalized.min() > 100
    transform = screen.equalize_first(build_transform)(32)
    assert isinstance(transform.transforms[0], v2.RandomEqualize)
    assert torch.equal(transform(image), build_transform(32)(equalized))
    assert not torch.equal(transform(image), build_transform(32)(image))
