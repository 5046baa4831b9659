"""The LightningDataModule: scan a source, split it, weight the classes, serve tensors."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from tb_lightning.data.augment import build_train_transform, check_augment, is_random
from tb_lightning.data.dataset import ImageTableDataset
from tb_lightning.data.phantom import ensure_phantom_dataset
from tb_lightning.data.sources import CLASS_NAMES, Sample, scan_class_folders
from tb_lightning.data.split import read_split_csv, stratified_split, write_split_csv
from tb_lightning.data.transforms import build_transform
from tb_lightning.errors import ConfigError
from tb_lightning.models.backbones import MIN_IMAGE_SIZE

log = logging.getLogger(__name__)

SOURCES = ("tb_cxr", "folder", "phantom")


def resolve_num_workers(num_workers: int | str) -> int:
    """`data.num_workers=auto`: one decoding worker per spare core, at most 8."""
    if num_workers == "auto":
        return min(8, max(0, (os.cpu_count() or 1) - 1))
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(
            f"data.num_workers={num_workers!r} is not allowed; use auto or an integer >= 0."
        )
    return num_workers


class TBDataModule(L.LightningDataModule):
    """Normal vs Tuberculosis images from one source, split into train and val.

    Args mirror `conf/data/*.yaml`; `source` picks how `root` is read: `tb_cxr` (the Kaggle
    layout), `folder` (any class-folder tree named by `class_names`), `phantom` (synthetic images
    generated under `root` with the `phantom` settings).
    """

    def __init__(
        self,
        source: str = "tb_cxr",
        root: str = "data/TB_Chest_Radiography_Database",
        class_names: Sequence[str] = CLASS_NAMES,
        image_size: int = 512,
        batch_size: int = 18,
        val_size: int | float = 600,
        split_seed: int = 42,
        split_file: str | None = None,
        num_workers: int | str = "auto",
        pin_memory: bool | str = "auto",
        phantom: dict[str, Any] | None = None,
        augment: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ConfigError(f"data.source={source!r} is not one of {list(SOURCES)}.")
        if len(class_names) != 2:
            raise ConfigError(
                f"data.class_names={list(class_names)} must name two folders: "
                "[negative, positive], e.g. [Normal, Tuberculosis]."
            )
        smallest = min(MIN_IMAGE_SIZE.values())  # the network checks its own arch's minimum
        if not isinstance(image_size, int) or image_size < smallest:
            raise ConfigError(
                f"data.image_size={image_size!r} is too small; use an integer >= {smallest} "
                "(the seed uses 512)."
            )
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"data.batch_size={batch_size!r} must be an integer >= 1.")
        self.source = source
        self.root = Path(root).expanduser().resolve()  # split.csv holds absolute paths
        self.class_names = tuple(class_names)
        self.image_size = image_size
        self.batch_size = batch_size
        self.val_size = val_size
        self.split_seed = split_seed
        self.split_file = split_file
        self.num_workers = resolve_num_workers(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory == "auto" else bool(pin_memory)
        self.phantom = dict(phantom or {})
        self.transform = build_transform(image_size)
        self.augment = check_augment(augment)
        self.train_transform = build_train_transform(image_size, self.augment)
        self.train_samples: list[Sample] | None = None
        self.val_samples: list[Sample] | None = None

    def prepare_data(self) -> None:
        # Lightning runs this on one process per node: the right place to write files.
        if self.source == "phantom" and self.split_file is None:
            self.scan()

    def scan(self) -> list[Sample]:
        """The full table of the source, before splitting."""
        if self.source == "phantom":
            pairs = ensure_phantom_dataset(self.root, **self.phantom)
            return [Sample(str(p), label, Path(p).stem, "phantom") for p, label in pairs]
        return scan_class_folders(self.root, self.class_names, self.source)

    def setup(self, stage: str | None = None) -> None:
        if self.train_samples is not None:  # Lightning may call setup again; the split stays.
            return
        if self.split_file:
            self.train_samples, self.val_samples = read_split_csv(self.split_file)
            log.info("Loaded the train/val split from %s", self.split_file)
        else:
            samples = self.scan()
            train_idx, val_idx = stratified_split(
                [s.label for s in samples], self.val_size, self.split_seed
            )
            self.train_samples = [samples[i] for i in train_idx]
            self.val_samples = [samples[i] for i in val_idx]
        counts = self.class_counts("train")
        log.info(
            "Split: %d train (%s), %d val (%s)",
            len(self.train_samples),
            self.describe_counts(counts),
            len(self.val_samples),
            self.describe_counts(self.class_counts("val")),
        )

    def class_counts(self, split: str = "train") -> list[int]:
        samples = self.train_samples if split == "train" else self.val_samples
        if samples is None:
            raise RuntimeError("class_counts() needs setup() to have run")
        return [sum(1 for s in samples if s.label == c) for c in range(len(CLASS_NAMES))]

    @staticmethod
    def describe_counts(counts: Sequence[int]) -> str:
        return ", ".join(f"{n} {name}" for name, n in zip(CLASS_NAMES, counts, strict=True))

    @property
    def pos_weight(self) -> float:
        """Weight of the Tuberculosis term in the loss: #Normal / #TB in the train split.

        With it, both classes contribute equally to the loss, as the seed's class-weighted
        cross-entropy does.
        """
        n_normal, n_tb = self.class_counts("train")
        return n_normal / n_tb

    def write_split(self, path: str | Path) -> None:
        write_split_csv(path, self.train_samples or [], self.val_samples or [])

    @property
    def augment_is_random(self) -> bool:
        """True when train images are randomly augmented (data/augment=cxr)."""
        return is_random(self.augment)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_samples, self.train_transform, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_samples, self.transform, shuffle=False)

    def _loader(self, samples: list[Sample] | None, transform: Any, shuffle: bool) -> DataLoader:
        if samples is None:
            raise RuntimeError("dataloaders need setup() to have run")
        return DataLoader(
            ImageTableDataset(samples, transform),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )
