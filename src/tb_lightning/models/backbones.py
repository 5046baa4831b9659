"""torchvision backbones cut at their last feature map, for the TB head of models/net.py."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn
from torchvision import models

from tb_lightning.core.choices import ARCHS


def torchvision_model(arch: str) -> nn.Module:
    """The randomly initialised torchvision model whose trunk we use (weights load into it)."""
    return models.get_model(arch, weights=None)


def feature_trunk(arch: str, model: nn.Module) -> tuple[nn.Module, int]:
    """(the convolutional trunk of a torchvision model, its output channels).

    The trunk keeps torchvision's parameter names under `features.` where torchvision has them
    (AlexNet, DenseNet, EfficientNet), so their state dicts load as they are.
    """
    if arch == "alexnet":
        return model.features, 256
    if arch.startswith("resnet"):
        children = [(n, m) for n, m in model.named_children() if n not in ("avgpool", "fc")]
        return nn.Sequential(OrderedDict(children)), model.fc.in_features
    if arch.startswith("densenet"):
        # torchvision's DenseNet.forward applies a ReLU after `features`; it has no weights.
        model.features.add_module("final_relu", nn.ReLU(inplace=True))
        return model.features, model.classifier.in_features
    if arch.startswith("efficientnet"):
        return model.features, model.classifier[-1].in_features
    raise ValueError(f"no trunk is defined for {arch!r}; ARCHS lists {list(ARCHS)}")
