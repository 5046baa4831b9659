"""The network: a torchvision backbone's conv features (optionally frozen) and a new head.

The reference experiment's AlexNet is the default; see models/backbones.py for the others.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from tb_lightning.models.backbones import (
    feature_trunk,
    torchvision_model,
)
from tb_lightning.models.weights import check_and_load, is_tbnet_state, read_weights

log = logging.getLogger(__name__)

# AlexNet's features shrink the input by conv(11, stride 4, pad 2) and three maxpool(3, stride 2);
# below 63 px the last pool has nothing left to pool.
ALEXNET_MIN_IMAGE_SIZE = 63


def alexnet_feature_size(image_size: int) -> int:
    """Side of AlexNet's last feature map for a square input (15 at 512, 6 at 224)."""
    side = (image_size + 2 * 2 - 11) // 4 + 1  # conv1
    for _ in range(3):  # the three maxpools; the other convs keep the size
        side = (side - 3) // 2 + 1
    return side


class TBNet(nn.Module):
    """features -> adaptive pool -> Dropout -> Linear -> ReLU -> Linear(1): one TB logit."""

    def __init__(
        self,
        features: nn.Module,
        feature_size: int,
        channels: int,
        hidden_dim: int,
        dropout: float,
        freeze_features: bool,
    ) -> None:
        super().__init__()
        self.features = features
        # At the native feature size this pool is the identity; it is kept because the reference
        # has it and it makes the head's input size explicit.
        self.avgpool = nn.AdaptiveAvgPool2d(feature_size)
        self.head = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(channels * feature_size * feature_size, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, 1),
        )
        self.freeze_features = freeze_features
        if freeze_features:
            self.features.requires_grad_(False)
            self.features.eval()

    def train(self, mode: bool = True) -> TBNet:
        super().train(mode)
        if self.freeze_features:  # frozen features always run in eval mode
            self.features.eval()
        return self

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features flattened to (N, channels * size * size)."""
        return torch.flatten(self.avgpool(self.features(images)), 1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features).squeeze(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """TB logits, shape (N,)."""
        return self.forward_head(self.forward_features(images))


def build_net(
    arch: str = "alexnet",
    weights: str | None = "imagenet",
    freeze_features: bool = True,
    hidden_dim: int = 510,
    dropout: float = 0.5,
    image_size: int = 512,
    pool_size: int | None = None,
) -> TBNet:
    """Build the network named by `model.net.*` (see conf/model/alexnet.yaml).

    pool_size: side of the pooled feature map fed to the head. null keeps AlexNet's native map
    (15x15 at 512, as the reference) and pools the other backbones globally (1x1), as torchvision
    does.
    """
    # The values were checked with the config (config/checks.py: check_model).
    if pool_size is None:
        pool_size = alexnet_feature_size(image_size) if arch == "alexnet" else 1

    torchvision_net = torchvision_model(arch)
    state, origin = read_weights(weights, arch) if weights is not None else (None, "")
    if state is not None and not is_tbnet_state(state):
        # torchvision's layout (ImageNet weights or a torchvision state dict): load the whole
        # model, then cut its trunk.
        check_and_load(torchvision_net, state, weights, arch)
    features, channels = feature_trunk(arch, torchvision_net)
    net = TBNet(features, pool_size, channels, hidden_dim, float(dropout), freeze_features)
    if state is not None and is_tbnet_state(state):
        # This project's own network (a .pth of TBNet or a checkpoint): features and head.
        check_and_load(net, state, weights, arch, required_prefix="features.")
    if state is not None:
        log.info("Loaded %d tensors from %s", len(state), origin)
    elif freeze_features:
        log.warning(
            "model.net.weights=null with frozen features: the conv features are random. "
            "Fine for smoke runs and speed work; use model.net.weights=imagenet for results, "
            "or model.net.freeze_features=false to train from scratch."
        )
    return net
