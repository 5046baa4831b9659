"""Decoding and preprocessing: every image becomes a normalised 3 x S x S float tensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from tb_lightning.errors import DataError

# The backbones are ImageNet models, so inputs are normalised with ImageNet statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_image(path: str | Path) -> torch.Tensor:
    """Decode an image file to a uint8 RGB tensor (3, H, W); grayscale is repeated to 3 channels.

    torchvision.io decodes PNG/JPEG in C++ (faster than PIL); PIL is the fallback for the image
    modes libpng/libjpeg reject through torchvision (e.g. CMYK JPEG).
    """
    try:
        return decode_image(str(path), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        pass
    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
    except OSError as err:
        raise DataError(
            f"Cannot read image {path} ({err}); remove or replace this file and run again."
        ) from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def build_transform(image_size: int) -> v2.Compose:
    """Resize to image_size x image_size, scale to [0, 1] and normalise (no augmentation)."""
    return v2.Compose(
        [
            v2.Resize((image_size, image_size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
