"""Pretrained weights for the backbone: torchvision's ImageNet weights or a local state dict
(of torchvision's or timm's model, or of this project's network).

Everything is loaded with `torch.load(weights_only=True)`, which refuses pickled code.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision import models
from torchvision.models import WeightsEnum

from tb_lightning.core.errors import WeightsError
from tb_lightning.core.progress import interactive
from tb_lightning.models.backbones import backbone, imagenet_refusal
from tb_lightning.models.torch_file import load_torch_file

log = logging.getLogger(__name__)

# Keys of a torchvision model that belong to its ImageNet classifier, replaced by our head.
IGNORED_PREFIXES = ("classifier.", "fc.")


def ignored_prefixes(model: nn.Module) -> tuple[str, ...]:
    """IGNORED_PREFIXES, and the classifier a timm model names in its pretrained_cfg (ConvNeXt:
    head.fc): built with num_classes=0, the model has none, while its weight files do."""
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if isinstance(classifier, str):
        classifier = (classifier,)
    return IGNORED_PREFIXES + tuple(f"{name}." for name in classifier or ())


def imagenet_weights(arch: str) -> WeightsEnum:
    """torchvision's recommended ImageNet weights for arch (AlexNet: IMAGENET1K_V1)."""
    return models.get_model_weights(arch).DEFAULT


def imagenet_cache_file(arch: str) -> Path:
    """Where torchvision's download cache keeps the ImageNet weights of `arch`."""
    url = imagenet_weights(arch).url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


# Seconds a download may wait on the network before it counts as offline (urllib has no limit).
DOWNLOAD_TIMEOUT_S = 20


@contextlib.contextmanager
def network_timeout(seconds: float) -> Iterator[None]:
    """A default socket timeout for the block: torch.hub's download sets none of its own."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def load_imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights, from its cache or downloaded into it (one sentence for a
    backbone that has none here: timm's)."""
    refusal = imagenet_refusal(arch)
    if refusal is not None:
        raise WeightsError(refusal)
    cache_file = imagenet_cache_file(arch)
    try:
        # Reads the cache when the file is there, downloads into it otherwise; the download's
        # tqdm bar only at a terminal (its frames would fill a log file with `\r`).
        with network_timeout(DOWNLOAD_TIMEOUT_S):
            return imagenet_weights(arch).get_state_dict(progress=interactive(), weights_only=True)
    except Exception as err:  # network errors come as URLError, OSError, HTTPError, ...
        raise WeightsError(
            f"model.net.weights=imagenet needs {cache_file}, which is not there and could not "
            f"be downloaded ({type(err).__name__}: {err}): copy {cache_file.name} from an "
            f"online machine into {cache_file.parent} (or set TORCH_HOME), or pass a local "
            "file with model.net.weights=/path/to/state_dict.pth; offline, train from random "
            "weights with model.net.weights=null model.net.freeze_features=false, or use the "
            "from-scratch recipe experiment=nlm_scratch."
        ) from None


# What to pass instead of a file that holds no usable state dict.
STATE_DICT_FIX = (
    "a state dict saved with torch.save(model.state_dict(), path), or "
    "model.net.weights=imagenet or null"
)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .pth file (or the `state_dict` of a Lightning checkpoint)."""
    path = Path(path).expanduser()
    if not path.exists():  # a directory or a bad file gets its own sentence from the loader
        raise WeightsError(
            f"model.net.weights={path} does not exist; pass the path of a .pth state dict, "
            "imagenet, or null."
        )
    # Empty, truncated, not a PyTorch file, pickled code: one sentence each, naming the file.
    obj = load_torch_file(path, f"model.net.weights={path}", STATE_DICT_FIX, WeightsError)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        # A Lightning checkpoint of a TBClassifier: its weights sit under `net.`.
        obj = {k.removeprefix("net."): v for k, v in obj["state_dict"].items()}
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        what = f"a {type(obj).__name__}" if not isinstance(obj, dict) else "a dict of non-tensors"
        raise WeightsError(
            f"model.net.weights={path} does not hold a state dict (a mapping of names to "
            f"tensors) but {what}; save it with torch.save(model.state_dict(), path)."
        )
    return obj


def read_weights(weights: str | Path, arch: str) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, where it came from) for `model.net.weights` = imagenet or a path."""
    if str(weights) == "imagenet":  # (refused for a backbone without torchvision's weights)
        return load_imagenet_state_dict(arch), f"torchvision {arch} ImageNet weights"
    return load_state_dict_file(weights), str(weights)


def is_tbnet_state(state: dict[str, torch.Tensor]) -> bool:
    """True for a state dict of this project's TBNet (its trunk under `features.` and its TB
    head's two Linear layers), not the library's: timm's VGG too has `features.` and `head.`."""
    return (
        "head.1.weight" in state
        and "head.3.weight" in state
        and any(key.startswith("features.") for key in state)
    )


def check_and_load(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    weights: str | Path,
    arch: str,
    required_prefix: str = "",
) -> None:
    """Load state into model after checking names and shapes; one sentence on any mismatch.

    Keys of the replaced ImageNet classifier are ignored; every other key the model has under
    required_prefix must be present (BatchNorm's step counters excepted).
    """
    record = backbone(arch)
    if record.rename_keys is not None:
        state = record.rename_keys(state)
    own = model.state_dict()
    ignored = ignored_prefixes(model)
    state = {k: v for k, v in state.items() if not k.startswith(ignored)}
    unexpected = sorted(set(state) - set(own))
    missing = sorted(
        k
        for k in own
        if k.startswith(required_prefix)
        and not k.startswith(ignored)
        and not k.endswith("num_batches_tracked")
        and k not in state
    )
    mismatched = sorted(k for k in state if k in own and state[k].shape != own[k].shape)
    for problem, keys in (("lacks", missing), ("has unknown", unexpected), ("has", mismatched)):
        if keys:
            what = "keys with the wrong shape" if problem == "has" else "keys"
            raise WeightsError(
                f"model.net.weights={weights} {problem} {what} for {arch} (e.g. {keys[0]}, "
                f"{len(keys)} in all); pass a state dict of {record.library}'s "
                f"{record.name.removeprefix('timm/')} or of this project's network with the same "
                "model.net settings and data.image_size."
            )
    model.load_state_dict(state, strict=False)
