"""The seed's network: AlexNet conv features (optionally frozen) and a new two-layer head."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torchvision import models

from tb_lightning.errors import ConfigError
from tb_lightning.models.weights import load_backbone_weights

log = logging.getLogger(__name__)

# AlexNet's features shrink the input by conv(11, stride 4, pad 2) and three maxpool(3, stride 2);
# below 63 px the last pool has nothing left to pool.
ALEXNET_MIN_IMAGE_SIZE = 63
ALEXNET_CHANNELS = 256


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
        # At the native feature size this pool is the identity; it is kept because the seed
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
) -> TBNet:
    """Build the network named by `model.net.*` (see conf/model/alexnet.yaml)."""
    if arch != "alexnet":
        raise ConfigError(f"model.net.arch={arch!r} is not supported; use alexnet.")
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ConfigError(f"model.net.dropout={dropout!r} must be a number in [0, 1).")
    if isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim < 1:
        raise ConfigError(f"model.net.hidden_dim={hidden_dim!r} must be an integer >= 1.")
    if not isinstance(image_size, int) or image_size < ALEXNET_MIN_IMAGE_SIZE:
        raise ConfigError(
            f"data.image_size={image_size!r} is too small for AlexNet; use an integer >= "
            f"{ALEXNET_MIN_IMAGE_SIZE} (the seed uses 512)."
        )
    features = models.alexnet(weights=None).features
    net = TBNet(
        features,
        alexnet_feature_size(image_size),
        ALEXNET_CHANNELS,
        hidden_dim,
        float(dropout),
        freeze_features,
    )
    if weights is None:
        if freeze_features:
            log.warning(
                "model.net.weights=null with frozen features: the conv features are random. "
                "Fine for smoke runs and speed work; use model.net.weights=imagenet for results."
            )
    else:
        load_backbone_weights(net, weights, arch)
    return net
