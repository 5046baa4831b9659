"""The backbones model.net.arch may name: one `Backbone` record each, in one registry.

Importable without torch: config/checks.py checks model.net.arch and data.image_size against
these records in a Hydra callback before torch is imported (config/callback.py). Each record's
functions import torch, torchvision or timm themselves, when a network is built.

Adding a torchvision-style backbone takes one record in `REGISTRY` below (and, for a preset, a
YAML file under conf/): a builder that cuts the trunk, the smallest image it takes and the layer
Grad-CAM weighs. models/net.py, models/weights.py, inference/saliency.py, the config checks and
tests/test_backbones.py all read the record.

Besides the registered names, `timm/<name>` takes any convolutional timm model (the optional
'timm' extra): `timm_backbone` makes its record on demand.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tb_lightning.core.errors import ConfigError
from tb_lightning.core.extras import require

if TYPE_CHECKING:  # annotations only: torch is imported by the builders, not here
    from torch import nn

# Loads a weight file, in the layout of the backbone's library, into the library's whole model
# (models/weights.py check_and_load), before the builder cuts the trunk out of it.
Loader = Callable[["nn.Module"], None]

TIMM_PREFIX = "timm/"


def global_pool(image_size: int) -> int:
    """1: the map is pooled to one vector, as torchvision's and timm's classifiers do."""
    return 1


@dataclass(frozen=True)
class Backbone:
    """One value of model.net.arch: how to build its trunk and what the project needs to know
    about it."""

    # model.net.arch (stored in checkpoints' hyper_parameters: never rename one).
    name: str
    # (image_size, load) -> (trunk, its output channels). Builds the library's model with random
    # weights, hands it to `load` when weights are given, then cuts the convolutional trunk
    # (kept under the library's parameter names, so that its weight files load as they are).
    # image_size is for builders that must check the model takes it (timm).
    build: Callable[[int, Loader | None], tuple[nn.Module, int]]
    # Smallest square input (px) whose trunk map is not empty: the config refuses a smaller
    # data.image_size before any data is read.
    min_image_size: int
    # net.features -> the module whose activations Grad-CAM weighs (inference/saliency.py):
    # the last activation of the last block, which still has a spatial map.
    gradcam_layer: Callable[[nn.Module], nn.Module]
    # Whether the trunk normalises with BatchNorm, whose statistics are per batch in training;
    # None: it depends on the model (timm), read from the built trunk (uses_batchnorm).
    has_batchnorm: bool | None
    # image_size -> side of the pooled map the head takes when model.net.pool_size=null.
    native_pool_size: Callable[[int], int] = global_pool
    # Whose layout weight files are in, and whether model.net.weights=imagenet is offered
    # (torchvision's ImageNet weights only: this project downloads nothing else).
    library: str = "torchvision"
    # Renames keys of older weight files to the model's (state dict -> state dict), or None.
    rename_keys: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    @property
    def imagenet(self) -> bool:
        """Whether model.net.weights=imagenet can load weights for this backbone."""
        return self.library == "torchvision"


# --- torchvision -------------------------------------------------------------------------------


def _torchvision_model(name: str, load: Loader | None) -> nn.Module:
    """torchvision's `name` with random weights, then `load`'s (ImageNet or a local file)."""
    from torchvision import models

    model = models.get_model(name, weights=None)
    if load is not None:
        load(model)
    return model


def _alexnet_trunk(image_size: int, load: Loader | None) -> tuple[nn.Module, int]:
    return _torchvision_model("alexnet", load).features, 256


def _resnet_trunk(name: str, image_size: int, load: Loader | None) -> tuple[nn.Module, int]:
    from torch import nn

    model = _torchvision_model(name, load)
    # Everything but the pool and the ImageNet classifier, under torchvision's names.
    children = [(n, m) for n, m in model.named_children() if n not in ("avgpool", "fc")]
    return nn.Sequential(OrderedDict(children)), model.fc.in_features


def _densenet_trunk(name: str, image_size: int, load: Loader | None) -> tuple[nn.Module, int]:
    from torch import nn

    model = _torchvision_model(name, load)
    # torchvision's DenseNet.forward applies a ReLU after `features`; it has no weights.
    model.features.add_module("final_relu", nn.ReLU(inplace=True))
    return model.features, model.classifier.in_features


def _efficientnet_trunk(name: str, image_size: int, load: Loader | None) -> tuple[nn.Module, int]:
    model = _torchvision_model(name, load)
    return model.features, model.classifier[-1].in_features


def _compact_trunk(image_size: int, load: Loader | None) -> tuple[nn.Module, int]:
    from tb_lightning.models.compact import compact_trunk

    trunk, channels = compact_trunk()
    if load is not None:  # a state dict of the trunk itself (this project's layout)
        load(trunk)
    return trunk, channels


def _compact_map_size(image_size: int) -> int:
    from tb_lightning.models.compact import compact_map_size

    return compact_map_size(image_size)


def _compact_gradcam_layer(features: nn.Module) -> nn.Module:
    return features.reduce


def alexnet_feature_size(image_size: int) -> int:
    """Side of AlexNet's last feature map for a square input (15 at 512, 6 at 224)."""
    side = (image_size + 2 * 2 - 11) // 4 + 1  # conv1
    for _ in range(3):  # the three maxpools; the other convs keep the size
        side = (side - 3) // 2 + 1
    return side


def last_relu(features: nn.Module) -> nn.Module:
    """The last ReLU module of the trunk (AlexNet: conv5's, before the last max-pool halves its
    map: 31 x 31 at 512 px, 13 x 13 at 224)."""
    from torch import nn

    relus = [m for m in features.modules() if isinstance(m, nn.ReLU)]
    if not relus:
        raise ValueError("the backbone has no ReLU layer for Grad-CAM")
    return relus[-1]


def _last_resnet_block(features: nn.Module) -> nn.Module:
    # The block's output is its last ReLU's (after the residual sum); the block's own `relu`
    # module runs twice per block, so the block, which runs once, is the layer to hook.
    return features.layer4[-1]


def _densenet_final_relu(features: nn.Module) -> nn.Module:
    return features.final_relu


def _last_child(features: nn.Module) -> nn.Module:
    # EfficientNet: the last Conv-BN-SiLU block (the trunk has no ReLU at all).
    return list(features.children())[-1]


# Old torchvision DenseNet files name layers `norm.1`, the model `norm1`; torchvision's own
# densenet loader applies the same rename.
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def rename_old_densenet_keys(state: dict[str, Any]) -> dict[str, Any]:
    renamed = {}
    for key, value in state.items():
        match = _DENSENET_OLD_KEY.match(key)
        renamed[match.group(1) + match.group(2) if match else key] = value
    return renamed


# The registered backbones, in the order they are listed to users. Published TB-on-CXR results
# favour DenseNet and ResNet over AlexNet; AlexNet stays the default because it is the reference
# experiment's. The torchvision CNNs below other than AlexNet reduce by 32 with padding, so any
# size from 32 px gives a non-empty map.
REGISTRY: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone(
            name="alexnet",
            build=_alexnet_trunk,
            # conv(11, stride 4, pad 2) and three maxpool(3, stride 2): below 63 px the last
            # pool has nothing left to pool.
            min_image_size=63,
            gradcam_layer=last_relu,
            has_batchnorm=False,
            # The reference keeps AlexNet's native map (15 x 15 at 512 px) for the head.
            native_pool_size=alexnet_feature_size,
        ),
        Backbone(
            name="resnet18",
            build=functools.partial(_resnet_trunk, "resnet18"),
            min_image_size=32,
            gradcam_layer=_last_resnet_block,
            has_batchnorm=True,
        ),
        Backbone(
            name="resnet50",
            build=functools.partial(_resnet_trunk, "resnet50"),
            min_image_size=32,
            gradcam_layer=_last_resnet_block,
            has_batchnorm=True,
        ),
        Backbone(
            name="densenet121",
            build=functools.partial(_densenet_trunk, "densenet121"),
            min_image_size=32,
            gradcam_layer=_densenet_final_relu,
            has_batchnorm=True,
            rename_keys=rename_old_densenet_keys,
        ),
        Backbone(
            name="efficientnet_b0",
            build=functools.partial(_efficientnet_trunk, "efficientnet_b0"),
            min_image_size=32,
            gradcam_layer=_last_child,
            has_batchnorm=True,
        ),
        Backbone(
            name="compact_tb",
            build=_compact_trunk,
            # Four 2x2 max-pools: from 32 px the head gets a 2 x 2 map.
            min_image_size=32,
            gradcam_layer=_compact_gradcam_layer,
            has_batchnorm=True,
            # The head takes the whole 16-channel map (image_size / 16 a side), as published.
            native_pool_size=_compact_map_size,
            library="tb_lightning",
        ),
    )
}
# model.net.arch's registered values (timm/<name> besides).
ARCHS = tuple(REGISTRY)
# Smallest square input of each registered backbone.
MIN_IMAGE_SIZE = {name: b.min_image_size for name, b in REGISTRY.items()}


# --- timm --------------------------------------------------------------------------------------

# timm/<name>: timm's CNNs reduce the image by at most 32 (five stride-2 stages, padded), so from
# 32 px they give at least a 1 x 1 map. A model that needs more (a ViT made for 224 px) is
# refused, with its reason, by the trial build of check_timm_model.
TIMM_MIN_IMAGE_SIZE = 32


def _timm_model(name: str, device: str | None = None) -> nn.Module:
    """timm's `name` with random weights, without its classifier or pooling, so that calling it
    returns the unpooled map (N, C, H, W) its classifier would pool."""
    require("timm", f"model.net.arch={TIMM_PREFIX}{name}")
    check_timm_name(name)
    import timm
    import torch

    with torch.device(device) if device else contextlib.nullcontext():
        return timm.create_model(name, pretrained=False, num_classes=0, global_pool="")


def check_timm_name(name: str) -> None:
    """One sentence for a name timm does not know (imports timm, hence torch)."""
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(TIMM_PREFIX + c for c in close)}?)" if close else ""
        raise ConfigError(
            f"model.net.arch={TIMM_PREFIX}{name} names no timm model{hint}; list them with "
            "python -c \"import timm; print(timm.list_models('*pattern*'))\"."
        )


def check_timm_model(name: str, image_size: int) -> int:
    """The channels of timm model `name`'s map at image_size; one sentence when it gives none.

    The trial runs on PyTorch's meta device: shapes without weights or arithmetic, a fraction of
    a second even for large models at 512 px.
    """
    import torch

    arch = TIMM_PREFIX + name
    model = _timm_model(name, device="meta")
    if getattr(model, "output_fmt", "NCHW") != "NCHW":
        raise ConfigError(
            f"model.net.arch={arch} gives channels-last ({model.output_fmt}) maps, which the "
            "head does not take; pick a convolutional timm model, e.g. timm/resnet18, "
            "timm/efficientnet_b0 or timm/convnext_nano."
        )
    try:
        with torch.no_grad():
            out = model(torch.empty(1, 3, image_size, image_size, device="meta"))
    except NotImplementedError:  # an operation without a meta kernel: the real build tells
        return -1
    except Exception as err:  # a model made for one input size says so in its own words
        reason = f"{type(err).__name__}: {str(err).rstrip('.')}"
        raise ConfigError(
            f"model.net.arch={arch} cannot take data.image_size={image_size} images ({reason}); "
            "pick another data.image_size or a convolutional timm model, e.g. timm/resnet18."
        ) from None
    if out.ndim != 4 or min(out.shape[-2:]) < 1:
        raise ConfigError(
            f"model.net.arch={arch} gives no spatial feature map (N, C, H, W) at "
            f"data.image_size={image_size} (it gives shape {tuple(out.shape)}); pick a "
            "convolutional timm model, e.g. timm/resnet18, or a larger data.image_size."
        )
    return int(out.shape[1])


def _timm_trunk(name: str, image_size: int, load: Loader | None) -> tuple[nn.Module, int]:
    channels = check_timm_model(name, image_size)
    model = _timm_model(name)
    if load is not None:
        load(model)
    if channels < 0:  # the meta trial could not tell: one real image
        import torch

        model.eval()
        with torch.no_grad():
            channels = int(model(torch.zeros(1, 3, image_size, image_size)).shape[1])
        model.train()
    # The whole model is the trunk: with num_classes=0 and global_pool="" its forward is
    # forward_features and then whatever of its head precedes the pooling (ConvNeXt's norm,
    # MobileNetV3's conv_head), so every parameter is used. Hence the channels come from the
    # trial, not num_features (MobileNetV3: 576 features, 1024 channels out of conv_head).
    return model, channels


def _whole_trunk(features: nn.Module) -> nn.Module:
    # A timm trunk's output is its last activation: Grad-CAM weighs the map the head pools.
    return features


@functools.cache
def timm_backbone(name: str) -> Backbone:
    """The record of `timm/<name>` (not checked against timm here: that needs torch)."""
    return Backbone(
        name=TIMM_PREFIX + name,
        build=functools.partial(_timm_trunk, name),
        min_image_size=TIMM_MIN_IMAGE_SIZE,
        gradcam_layer=_whole_trunk,
        has_batchnorm=None,
        library="timm",
    )


# --- lookups -----------------------------------------------------------------------------------


def backbone(arch: Any) -> Backbone:
    """The record of model.net.arch=`arch`; one sentence for a name that is not offered, or a
    timm/<name> without the 'timm' extra. (A timm name itself is checked by check_backbone.)"""
    if isinstance(arch, str) and arch in REGISTRY:
        return REGISTRY[arch]
    if isinstance(arch, str) and arch.startswith(TIMM_PREFIX) and arch != TIMM_PREFIX:
        require("timm", f"model.net.arch={arch}")  # find_spec only: no import of timm
        return timm_backbone(arch.removeprefix(TIMM_PREFIX))
    raise ConfigError(
        f"model.net.arch={arch!r} is not one of {list(ARCHS)} or "
        "timm/<name> (any convolutional timm model, e.g. timm/convnext_nano)."
    )


def min_image_size(arch: Any) -> int:
    """Smallest data.image_size for `arch`; the largest of all for a name not offered (its own
    check says what is wrong with it)."""
    try:
        return backbone(arch).min_image_size
    except ConfigError:
        return max(MIN_IMAGE_SIZE.values())


def check_backbone(arch: Any, image_size: Any) -> None:
    """What only the backbone's library can tell, before any data is read: whether timm knows
    the name and its model gives a map at image_size (imports torch and timm; a registered
    backbone needs nothing more than the checks of values)."""
    record = backbone(arch)
    if record.library == "timm" and isinstance(image_size, int):
        check_timm_model(record.name.removeprefix(TIMM_PREFIX), image_size)


def imagenet_refusal(arch: Any) -> str | None:
    """The sentence refusing model.net.weights=imagenet for `arch`, or None where it works."""
    record = backbone(arch)
    if record.imagenet:
        return None
    if record.library != "timm":
        return (
            f"model.net.weights=imagenet is not offered for model.net.arch={record.name}: it is "
            "this project's own network, with no ImageNet weights; train it from random weights "
            "(model.net.weights=null model.net.freeze_features=false) or pass a state dict of it "
            "(model.net.weights=/path/to/weights.pth)."
        )
    name = record.name.removeprefix(TIMM_PREFIX)
    return (
        f"model.net.weights=imagenet is not offered for model.net.arch={record.name}: this "
        "project downloads only torchvision's ImageNet weights; save timm's on an online machine "
        f"with torch.save(timm.create_model('{name}', pretrained=True).state_dict(), "
        f"'{name}.pth') and pass model.net.weights=/path/to/{name}.pth, or train from random "
        "weights with model.net.weights=null model.net.freeze_features=false."
    )


def uses_batchnorm(record: Backbone, trunk: nn.Module) -> bool:
    """Whether the built trunk has BatchNorm layers (the record says so, or the trunk does)."""
    if record.has_batchnorm is not None:
        return record.has_batchnorm
    from torch.nn.modules.batchnorm import _BatchNorm

    return any(isinstance(m, _BatchNorm) for m in trunk.modules())
