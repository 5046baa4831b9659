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


# PIL modes of 16/32-bit integer grayscale (16-bit PNGs open as one of these).
PIL_WIDE_GRAY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


def pil_to_rgb_array(image: Image.Image) -> np.ndarray:
    """A PIL image of any valid mode as a uint8 (H, W, 3) array.

    16-bit grayscale is scaled to 8 bits (x / 257, the full 0..65535 range onto 0..255):
    PIL's own convert("RGB") clips it at 255 instead, which turns most X-rays white.
    Alpha is dropped; palette, CMYK and the rest go through PIL's conversion.
    """
    if image.mode in PIL_WIDE_GRAY_MODES:
        wide = np.asarray(image).astype(np.float32)
        gray = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"))


def load_image(path: str | Path) -> torch.Tensor:
    """Decode an image file to a uint8 RGB tensor (3, H, W); grayscale is repeated to 3 channels.

    torchvision.io decodes PNG/JPEG in C++ (faster than PIL), including palette, RGBA and CMYK;
    a 16-bit PNG comes back as uint16 and is scaled to uint8 here. PIL is the fallback for what
    torchvision rejects. Files are checked at scan time (data/integrity.py), so a failure here
    means the file changed after the scan.
    """
    try:
        image = decode_image(str(path), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        pass
    else:
        if image.dtype != torch.uint8:  # 16-bit PNG: scale, do not clip
            image = v2.functional.to_dtype(image, torch.uint8, scale=True)
        return image
    try:
        with Image.open(path) as pil_image:
            rgb = pil_to_rgb_array(pil_image)
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
