"""The one Dataset of image files: training, validation, eval, predict and feature extraction."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset

from tb_lightning.data.transforms import BadImageError, load_image

# The label a tolerant ImageDataset gives a file it cannot use (its image is all zeros).
BAD_FILE = -1


class ImageDataset(Dataset):
    """Yields (image tensor, label) for each path, decoding on access with the scan's checks.

    labels: one per path (None: 0 for all, e.g. predict). tolerant: a bad file yields a zero
    image of `image_size` and the label BAD_FILE instead of raising BadImageError, so that one
    bad file does not stop a whole pass.
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int] | None,
        transform: Callable[[torch.Tensor], torch.Tensor],
        image_size: int | None = None,
        tolerant: bool = False,
    ) -> None:
        if tolerant and image_size is None:
            raise ValueError("a tolerant ImageDataset needs the image_size of its blank images")
        self.paths = list(paths)
        self.labels = list(labels) if labels is not None else [0] * len(self.paths)
        self.transform = transform
        self.image_size = image_size
        self.tolerant = tolerant

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        try:
            return self.transform(load_image(self.paths[index])), self.labels[index]
        except BadImageError:
            if not self.tolerant:
                raise
            return torch.zeros(3, self.image_size, self.image_size), BAD_FILE
