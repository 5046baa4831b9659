"""Deterministic image preprocessing before augmentation: `data.preprocess=none|clahe`.

clahe: contrast-limited adaptive histogram equalisation (CLAHE) of the gray values after the
resize to `data.image_size` (`data.clahe.clip_limit`, `data.clahe.tile_grid`), by OpenCV's
`createCLAHE(clipLimit, tileGridSize).apply` on the 8-bit gray image. OpenCV rather than kornia's
`equalize_clahe` (tensors, GPU): the transform runs per image in the DataLoader workers on the
CPU, where OpenCV took 0.10 ms for a 128 px image and kornia 8.6 ms (one thread; kornia's output
also differs from OpenCV's by up to 6 gray levels), and OpenCV is what a deployment in C++ or
Python calls to reproduce the exported model's preprocessing exactly. Applied at the model's
input size rather than the file's: every entry point (train, eval, predict, export check, the
feature and image caches) then sees the same pixels from the same 8-bit image, and the image
cache, which holds resized images, stays valid whichever preprocessing a run picks.

The choice is stored in the checkpoint (the classifier's hyper-parameter `preprocess`), so eval,
predict and export rebuild it from the checkpoint alone, never from the command line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

# Defined beside the config checks, which run before torch is imported; used from here too.
from tb_lightning.core.choices import preprocess_spec  # noqa: F401


def describe_preprocess(spec: Mapping[str, Any] | None) -> str:
    """`clahe (clip limit 2.0, 8x8 tiles)` or `none`, for reports and logs."""
    if not spec:
        return "none"
    grid = spec["tile_grid"]
    return f"clahe (clip limit {spec['clip_limit']:g}, {grid}x{grid} tiles)"


class CLAHE(nn.Module):
    """CLAHE of a uint8 (3, H, W) image on its gray values (the channels' rounded mean),
    repeated to 3 channels: chest X-rays are grayscale, and one equalisation instead of three
    keeps the channels equal. Output uint8, as the transforms after it (augmentation, ToDtype)
    expect."""

    def __init__(self, clip_limit: float, tile_grid: int) -> None:
        super().__init__()
        self.clip_limit = float(clip_limit)
        self.tile_grid = int(tile_grid)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # Imported here: cv2 takes a while to import, which the runs without CLAHE (and --help)
        # should not pay.
        import cv2

        pixels = image.numpy()
        if (pixels[0] == pixels[1]).all() and (pixels[1] == pixels[2]).all():
            gray = pixels[0]
        else:
            gray = np.rint(pixels.mean(axis=0, dtype=np.float32)).astype(np.uint8)
        clahe = cv2.createCLAHE(clipLimit=self.clip_limit, tileGridSize=(self.tile_grid,) * 2)
        equalised = clahe.apply(np.ascontiguousarray(gray))
        return torch.from_numpy(np.repeat(equalised[None], 3, axis=0))

    def extra_repr(self) -> str:  # part of the feature cache's key (repr of the transform)
        return f"clip_limit={self.clip_limit}, tile_grid={self.tile_grid}"


def preprocess_steps(spec: Mapping[str, Any] | None) -> list[nn.Module]:
    """The transforms of a spec, to run on the resized uint8 image."""
    if not spec:
        return []
    return [CLAHE(spec["clip_limit"], spec["tile_grid"])]
