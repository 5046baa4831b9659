"""A compact CNN for TB on chest X-rays, trained from scratch (`model.net.arch=compact_tb`).

Written for this project from the published description of LightTBNet (Capellan-Martin et al.,
ISBI 2023: about 1.5 M parameters at 256 px, AUC 0.961 on NLM Shenzhen + Montgomery): four
residual blocks of 16, 32, 64 and 128 channels, each block's output concatenated with its input
(so later blocks see every earlier scale), a max-pool halving the map after each, then a 1x1
convolution down to 16 channels. The head (models/net.py TBNet) takes the whole 16-channel map,
not a pooled vector: image_size / 16 a side (8 x 8 at 128 px), with model.net.hidden_dim units.

The images reach every backbone as 3 identical normalised channels (ImageNet statistics, for the
pretrained backbones); this one averages them into one channel first, so its first convolution
has the weights of a single-channel network. No torchvision or timm model: there are no
ImageNet weights for it, only random initialisation or a state dict of this project's network.
"""

from __future__ import annotations

import torch
from torch import nn

# Output channels of the four residual blocks.
BLOCK_CHANNELS = (16, 32, 64, 128)
# Channels of the 1x1 convolution the head reads.
OUT_CHANNELS = 16
# Each block halves the map: the map side is image_size // REDUCTION.
REDUCTION = 2 ** len(BLOCK_CHANNELS)


def conv_bn_relu(in_channels: int, out_channels: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ChannelMean(nn.Module):
    """(N, C, H, W) -> (N, 1, H, W): the grayscale image the 3 repeated channels hold."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=1, keepdim=True)


class ConcatResidualBlock(nn.Module):
    """conv-BN-ReLU, conv-BN, plus a 1x1 projection of the input, ReLU; then the block's input
    concatenated to its output (out_channels + in_channels), and a 2x2 max-pool."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_relu(in_channels, out_channels),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.project = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.out_channels = out_channels + in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.body(x) + self.project(x))
        return self.pool(torch.cat([out, x], dim=1))


def compact_trunk() -> tuple[nn.Sequential, int]:
    """The trunk (N, 3, S, S) -> (N, OUT_CHANNELS, S / 16, S / 16) and its output channels."""
    layers: list[tuple[str, nn.Module]] = [
        ("gray", ChannelMean()),
        ("stem", conv_bn_relu(1, BLOCK_CHANNELS[0])),
    ]
    channels = BLOCK_CHANNELS[0]
    for i, width in enumerate(BLOCK_CHANNELS, start=1):
        block = ConcatResidualBlock(channels, width)
        layers.append((f"block{i}", block))
        channels = block.out_channels
    # The last activation with a spatial map: what Grad-CAM weighs (backbones.py).
    layers.append(("reduce", conv_bn_relu(channels, OUT_CHANNELS, kernel=1)))
    trunk = nn.Sequential()
    for name, module in layers:
        trunk.add_module(name, module)
    for module in trunk.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return trunk, OUT_CHANNELS


def compact_map_size(image_size: int) -> int:
    """Side of the trunk's map for a square input: the head takes all of it."""
    return image_size // REDUCTION
