"""Decoded-image cache (`data.cache_images=true`): every image decoded and resized once, then read
as a slice of a memory-mapped uint8 table by the DataLoader workers.

For runs that recompute the backbone every step (fine-tuning, random augmentation) the feature
cache cannot help, and each epoch would decode every file again: PNG decoding and resizing are
much of a CPU epoch. The cache stores each image as the uint8 RGB tensor (3, S, S) that the
transforms start from, S = `data.image_size`; the train and val transforms (augmentation
included, torchvision v2 on tensors) then run on it exactly as on a decoded file. Where the
files are larger than S, a random crop resamples the S x S copy rather than the full-size file
(the only difference from reading the files; none for files already at S).

Storage, atomic publish, lock, memory, and damage detection (a checksum per block of rows, every
block checked when a run opens the cache): core/mapped_table.py. The key is a hash of the file
list (paths, sizes, modification times), S and the decoder, so any change of those builds a new
file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from tb_lightning.core.mapped_table import MappedTable, RowWriter, files_digest
from tb_lightning.core.progress import report_progress
from tb_lightning.core.signals import raise_if_stopped
from tb_lightning.data.dataset import ImageDataset
from tb_lightning.data.sources import Sample

log = logging.getLogger(__name__)

# Bump when the stored images change meaning; old files are then ignored.
IMAGE_CACHE_FORMAT = 1


def image_cache_key(paths: Sequence[str], image_size: int) -> str:
    """Changes whenever a stored image could: the files (path, size, mtime), the size, decoder."""
    parts = {
        "format": IMAGE_CACHE_FORMAT,
        "files": files_digest(list(paths)),
        "image_size": image_size,
        "decoder": "tb_lightning.data.transforms.load_image",
        "resize": "v2.Resize(antialias=True)",
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class CachedImageDataset(Dataset):
    """(transformed image, label) from rows of the cache's uint8 table (no decoding)."""

    def __init__(
        self,
        table: np.ndarray,
        rows: Sequence[int],
        labels: Sequence[int],
        transform: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self.table = table
        self.rows = list(rows)
        self.labels = list(labels)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # A copy of one row: the transforms get a tensor of their own, the map stays shared.
        image = torch.from_numpy(np.array(self.table[self.rows[index]]))
        return self.transform(image), self.labels[index]


class ImageCache:
    """The decoded images of a fixed set of samples under `cache_dir`, shared across runs."""

    def __init__(
        self,
        cache_dir: str | Path,
        samples: Sequence[Sample],
        image_size: int,
        *,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        # One table for every split: another split seed reuses the same file.
        self.samples = sorted(samples, key=lambda s: s.path)
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        paths = [s.path for s in self.samples]
        self.table = MappedTable(
            cache_dir, "images", image_cache_key(paths, image_size), paths, np.uint8,
            "decoded images",
        )  # fmt: skip
        self.path = self.table.path
        self._rows = {path: i for i, path in enumerate(paths)}
        self._images: np.ndarray | None = None

    def load_or_build(self) -> np.ndarray:
        """The (N, 3, S, S) uint8 table, a memory map of the file."""
        if self._images is None:
            self._images = self.table.load_or_build(self._decode)
        return self._images

    def dataset(
        self, samples: Sequence[Sample], transform: Callable[[torch.Tensor], torch.Tensor]
    ) -> CachedImageDataset:
        """The cached images of `samples` (a subset of the cached ones), in their order."""
        rows = [self._rows[s.path] for s in samples]
        return CachedImageDataset(self.load_or_build(), rows, [s.label for s in samples], transform)

    def _decode(self, write: RowWriter) -> None:
        """Decode and resize every image (in DataLoader workers), streaming them into the table."""
        resize = v2.Resize((self.image_size, self.image_size), antialias=True)
        loader = DataLoader(
            ImageDataset([s.path for s in self.samples], None, resize),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
        )
        start = 0
        # The DataLoader draws a seed from the global RNG: fork it, so that a run that builds
        # the cache draws what one that reads it does.
        # A rich bar at a terminal, a log line every 10 % elsewhere (core/progress.py).
        with (
            torch.random.fork_rng(devices=[]),
            report_progress("Caching decoded images", len(self.samples), logger=log) as bar,
        ):
            for images, _ in loader:
                raise_if_stopped()  # a safe point for Ctrl-C / SIGTERM (core/signals.py)
                write(start, images.numpy())
                start += len(images)
                bar.update(len(images))


def build_image_cache(datamodule: object) -> ImageCache:
    """The image cache of every sample of the datamodule's split (set up already)."""
    cache = ImageCache(
        datamodule.caches.image_cache_dir,
        datamodule.all_samples,
        datamodule.image_size,
        num_workers=datamodule.num_workers,
    )
    cache.load_or_build()
    return cache
