"""The network: a backbone's conv features (optionally frozen) and a new head.

The reference experiment's AlexNet is the default; models/backbones.py holds the others (and
timm/<name>), one record each, which build_net reads.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from tb_lightning.models.backbones import backbone, uses_batchnorm
from tb_lightning.models.weights import check_and_load, is_tbnet_state, read_weights

log = logging.getLogger(__name__)


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
        arch: str = "alexnet",
        batchnorm: bool = False,
    ) -> None:
        super().__init__()
        # Which backbone `features` is (models/backbones.py): Grad-CAM asks its record for the
        # layer to weigh. Plain attributes, not in the state dict.
        self.arch = arch
        self.batchnorm = batchnorm
        # Test-time augmentation out of training (model.tta): None or "hflip". Set by the
        # LightningModule from its hyper-parameters, so that checkpoints carry it.
        self.tta: str | None = None
        self._warned_single_image = False
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
        if self.training and self.batchnorm and not self.freeze_features and len(images) == 1:
            self._warn_single_image()
        return torch.flatten(self.avgpool(self.features(images)), 1)

    def _warn_single_image(self) -> None:
        # BatchNorm in training normalises each batch by its own statistics: a batch of one
        # image is normalised by itself (and a 1 x 1 map cannot be normalised at all).
        if not self._warned_single_image:
            self._warned_single_image = True
            log.warning(
                "A training batch of 1 image went through %s's BatchNorm layers, which then "
                "normalise it by its own statistics; with model.net.freeze_features=false pick a "
                "data.batch_size > 1 that leaves no last batch of one image (it holds the "
                "training images modulo data.batch_size).",
                self.arch,
            )

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features).squeeze(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """TB logits, shape (N,); with tta="hflip", out of training, the mean logit of each
        image and its mirror (model.tta)."""
        if self.tta == "hflip" and not self.training:
            # One pass over the images and their mirrors: BatchNorm out of training treats each
            # image alone, so this is the two passes' result, at one pass's overhead. In
            # forward itself, so that every user of the network (train's final scoring, eval,
            # predict, ensembles, the exported graph) averages the same way.
            both = self.forward_head(self.forward_features(torch.cat([images, images.flip(-1)])))
            # Sliced at the batch size rather than chunk(2), which the ONNX exporter would fix
            # to the example's batch size.
            count = images.shape[0]
            return (both[:count] + both[count:]) / 2
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

    pool_size: side of the pooled feature map fed to the head. null takes the backbone's
    native_pool_size: AlexNet's native map (15x15 at 512, as the reference), global pooling
    (1x1) for the others, as torchvision and timm do.
    """
    # The values were checked with the config (config/checks.py: check_model).
    record = backbone(arch)
    if pool_size is None:
        pool_size = record.native_pool_size(image_size)

    state, origin = read_weights(weights, arch) if weights is not None else (None, "")
    load = None
    if state is not None and not is_tbnet_state(state):
        # The library's layout (ImageNet weights or a torchvision/timm state dict): loaded into
        # the whole model, before the builder cuts its trunk.
        def load(model: nn.Module) -> None:
            check_and_load(model, state, weights, arch)

    features, channels = record.build(image_size, load)
    net = TBNet(
        features,
        pool_size,
        channels,
        hidden_dim,
        float(dropout),
        freeze_features,
        arch=record.name,
        batchnorm=uses_batchnorm(record, features),
    )
    if state is not None and is_tbnet_state(state):
        # This project's own network (a .pth of TBNet or a checkpoint): features and head.
        check_and_load(net, state, weights, arch, required_prefix="features.")
    if state is not None:
        log.info("Loaded %d tensors from %s", len(state), origin)
    elif freeze_features:
        pretrained = (
            "model.net.weights=imagenet"
            if record.imagenet
            else "model.net.weights=/path/to/state_dict.pth"
        )
        log.warning(
            "model.net.weights=null with frozen features: the conv features are random. "
            "Fine for smoke runs and speed work; use %s for results, "
            "or model.net.freeze_features=false to train from scratch.",
            pretrained,
        )
    return net
