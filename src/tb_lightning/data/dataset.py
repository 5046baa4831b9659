"""A map-style dataset over a table of samples."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset

from tb_lightning.data.sources import Sample
from tb_lightning.data.transforms import load_image


class ImageTableDataset(Dataset):
    """Yields (image tensor, label) for each sample, decoding on access."""

    def __init__(
        self, samples: Sequence[Sample], transform: Callable[[torch.Tensor], torch.Tensor]
    ):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        return self.transform(load_image(sample.path)), sample.label
