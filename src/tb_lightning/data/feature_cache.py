"""Frozen-feature cache (`data.cache_features`): compute the backbone features of every image once,
train the head on them. The data-side cache beside the decoded-image cache (data/image_cache.py).

With frozen conv features and no random train-time augmentation, every epoch of every sweep job
recomputes the same backbone features. `FeatureCache` extracts them once (batched, channels_last,
bf16 autocast where the hardware has native bf16), stores them in half precision under
`data.cache_dir`, and serves `(features, label)` pairs; the head (dropout included) then trains
exactly as it would on images.

Memory stays flat in the number of images: extraction streams each batch's rows into the cache
file as it goes (memory: one batch), and training reads rows through a memory map of that file
(no whole-file load, no copy per split): core/mapped_table.py.

The cache file name is a hash of everything that changes the features: the backbone's weights
(their bytes, so random-init backbones are told apart too), the image size and preprocessing, the
extraction precision, and the file list with sizes and modification times. Any change builds a new
file; old files are left for other configurations to reuse. Writes are atomic and serialised by a
lock file (the jobs of a sweep that start together extract once). Every row is covered by a
checksum written with it and checked when a run opens the cache; a damaged cache is rebuilt with
a warning, never used (core/mapped_table.py).

The images go through the backbone by the one image pass of trained/runner.py
(`run_over_images`), which the caller hands in: the data floor does not import trained/ (the
house's import rules, tests/test_layout.py), and eval, predict, the final scoring and this
extraction keep one pass between them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms import v2

from tb_lightning.core.errors import ConfigError
from tb_lightning.core.mapped_table import (
    STALE_TMP_SECONDS,
    MappedTable,
    RowWriter,
    files_digest,
)
from tb_lightning.data.preprocess import CLAHE
from tb_lightning.data.sources import Sample

log = logging.getLogger(__name__)

# Bump when the file layout or the extraction changes meaning; old files are then ignored.
# 1: one torch.save file, loaded whole; 2: a memory-mapped .npy table and a JSON sidecar.
CACHE_FORMAT = 2
# Transforms that map one image to the same output every time: anything else counts as random
# augmentation and rules the cache out (fail safe: an unknown transform disables it).
DETERMINISTIC_TRANSFORMS = (
    v2.Resize,
    v2.CenterCrop,
    v2.ToDtype,
    v2.Normalize,
    v2.Grayscale,
    v2.ToImage,
    v2.ToPureTensor,
    CLAHE,
)
# Re-exported: how old a temporary file of a killed cache write must be before any run removes it.
__all__ = ["STALE_TMP_SECONDS", "FeatureCache", "build_feature_cache", "extract_features"]
# trained/runner.run_over_images(forward, paths, transform, image_size, **options) -> a run whose
# `outputs` are the rows; passed in by the caller (see the module's docstring).
ImagePass = Callable[..., Any]


def random_steps(transform: Callable) -> list[str]:
    """Class names of the steps of `transform` (a Compose or one transform) that are not known
    to be deterministic: `['RandomResizedCrop', 'RandomAffine', 'ColorJitter']`."""
    steps = transform.transforms if isinstance(transform, v2.Compose) else [transform]
    return [type(s).__name__ for s in steps if not isinstance(s, DETERMINISTIC_TRANSFORMS)]


def is_deterministic(transform: Callable) -> bool:
    """True when `transform` has no random step (a Compose of known deterministic transforms)."""
    return not random_steps(transform)


def cache_blockers(net: nn.Module, train_transform: Callable) -> list[str]:
    """Reasons the cache would change results; empty when it is valid."""
    reasons = []
    if not getattr(net, "freeze_features", False):
        reasons.append("the backbone is trainable (model.net.freeze_features=false)")
    if getattr(net, "tta", None):
        # The cache holds the features of the images as they are, not of their mirrors.
        reasons.append(f"model.tta={net.tta} runs the backbone on mirrored images too")
    randomised = random_steps(train_transform)
    if randomised:
        # The steps by name: the transform's repr is a multi-line dump of every argument.
        reasons.append(
            f"the train transform has random augmentation ({', '.join(randomised)}; data.augment)"
        )
    return reasons


def should_cache(mode: str | bool, net: nn.Module, train_transform: Callable) -> bool:
    """Resolve `data.cache_features` for this net and transform; true where invalid is an error."""
    if mode is False:
        return False
    reasons = cache_blockers(net, train_transform)
    if reasons and mode is True:
        raise ConfigError(
            f"data.cache_features=true cannot be used because {' and '.join(reasons)}; use "
            "data.cache_features=auto or false, or freeze the backbone and turn augmentation off."
        )
    if reasons:
        log.info("Feature cache off: %s.", "; ".join(reasons))
    return not reasons


def bf16_supported(device: torch.device) -> bool:
    """Native bf16 on this device: CUDA's check, or AVX512-BF16/AMX on the CPU.

    Without native support bf16 is emulated and slower than fp32, so the capability decides,
    not the device type.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> `bf16` where natively supported, else `fp32`."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"feature precision {precision!r} must be auto, bf16 or fp32.")
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    return precision


def weights_digest(module: nn.Module) -> str:
    """sha256 of the module's parameters and buffers: the backbone's identity."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        # Flattened first: a 0-dim tensor (BatchNorm's int64 num_batches_tracked) cannot be
        # viewed as bytes. The shape is digested above, and flattening keeps the bytes (and so
        # the keys of existing cache files) of every other tensor unchanged.
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(
    backbone: nn.Module, paths: Sequence[str], transform: Callable, precision: str
) -> str:
    """The hash that names a cache file; changes whenever the features could change."""
    parts = {
        "format": CACHE_FORMAT,
        "weights": weights_digest(backbone),
        "transform": repr(transform),
        "decoder": "tb_lightning.data.transforms.load_image",
        "precision": precision,
        "files": files_digest(paths),
        "count": len(paths),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def extract_features(
    net: nn.Module,
    samples: Sequence[Sample],
    transform: Callable,
    *,
    run_over_images: ImagePass,
    device: torch.device | str = "cpu",
    precision: str = "auto",
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
    sink: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """`net.forward_features` of every sample, float32 (N, D), in the order of `samples`; with
    `sink`, each batch's rows go to sink(first index, rows) instead and nothing is returned
    (an empty tensor).

    Through the one image pass of trained/runner.py, `run_over_images` (handed in by the
    caller: the data floor does not import trained/). channels_last suits oneDNN/cuDNN
    convolutions; bf16 autocast only with native support. The net is restored to its former
    device, mode and memory format afterwards.
    """
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    was_training, old_device = net.training, next(net.parameters()).device
    # Converted outside inference mode: parameters must stay normal tensors for later training.
    net.eval().to(device)
    net.features.to(memory_format=torch.channels_last)
    try:
        run = run_over_images(
            lambda images: net.forward_features(
                images.contiguous(memory_format=torch.channels_last)
            ),
            [s.path for s in samples],
            transform,
            image_size=0,  # not tolerant: no blank images are made
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            autocast_bf16=precision == "bf16",
            tolerant=False,
            progress=progress,
            description=f"Extracting features ({precision})",
            sink=sink,
        )
    finally:
        net.features.to(memory_format=torch.contiguous_format)
        net.to(old_device).train(was_training)
    return run.outputs


class FeatureDataset(Dataset):
    """(float32 feature vector, label) pairs: rows `rows` of a half-precision feature table.

    The table is the cache's memory map (shared by every split, never copied): a row is read
    from the file when it is asked for.
    """

    def __init__(
        self, features: torch.Tensor, labels: Sequence[int], rows: Sequence[int] | None = None
    ) -> None:
        self.rows = list(range(len(features))) if rows is None else list(rows)
        if len(self.rows) != len(labels):
            raise ValueError(f"{len(self.rows)} feature rows for {len(labels)} labels")
        self.features = features
        self.labels = list(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.features[self.rows[index]].float(), self.labels[index]


class FeatureCache:
    """Features of a fixed set of images under `cache_dir`, built once and shared across runs."""

    def __init__(
        self,
        cache_dir: str | Path,
        net: nn.Module,
        samples: Sequence[Sample],
        transform: Callable,
        *,
        run_over_images: ImagePass,
        device: torch.device | str = "cpu",
        precision: str = "auto",
        batch_size: int = 32,
        num_workers: int = 0,
    ) -> None:
        self.cache_dir = Path(cache_dir).expanduser()
        self.net = net
        self.run_over_images = run_over_images
        # One table for every split: another split seed reuses the same file.
        self.samples = sorted(samples, key=lambda s: s.path)
        self.transform = transform
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.batch_size = batch_size
        self.num_workers = num_workers
        paths = [s.path for s in self.samples]
        self.key = cache_key(net.features, paths, transform, self.precision)
        self.table = MappedTable(
            self.cache_dir, "features", self.key, paths, np.float16, "backbone features"
        )
        self.path, self.sidecar = self.table.path, self.table.sidecar
        self._rows: dict[str, int] = {path: i for i, path in enumerate(paths)}
        self._features: torch.Tensor | None = None

    def load_or_build(self) -> torch.Tensor:
        """The (N, D) float16 feature table, a memory map of the file (built when there is no
        valid one)."""
        if self._features is None:
            self._features = torch.from_numpy(self.table.load_or_build(self._extract))
        return self._features

    def dataset(self, samples: Sequence[Sample]) -> FeatureDataset:
        """The cached features of `samples` (a subset of the cached ones), in their order."""
        table = self.load_or_build()
        rows = [self._rows[s.path] for s in samples]
        return FeatureDataset(table, [s.label for s in samples], rows)

    def _extract(self, write: RowWriter) -> None:
        """Stream the features of every sample, as fp16 rows, into the table being built."""

        def write_rows(start: int, rows: torch.Tensor) -> None:
            if not torch.isfinite(rows).all():
                raise RuntimeError("backbone features contain NaN/inf; the cache was not written")
            # Half precision on disk halves the size; fp16 keeps ~3 significant digits of the
            # post-ReLU features (bf16 would keep 2).
            write(start, rows.numpy().astype(np.float16))

        # The DataLoader draws a seed from the global RNG: fork it, so that a run that builds
        # the cache shuffles and drops out exactly like one that reads it (or runs without it).
        with torch.random.fork_rng(devices=[]):
            extract_features(
                self.net,
                self.samples,
                self.transform,
                run_over_images=self.run_over_images,
                device=self.device,
                precision=self.precision,
                batch_size=self.batch_size,
                num_workers=self.num_workers,
                sink=write_rows,
            )


def build_feature_cache(
    datamodule: Any,
    net: nn.Module,
    run_over_images: ImagePass,
    device: torch.device | str = "cpu",
) -> FeatureCache | None:
    """The feature cache `data.cache_features` asks for, built (or read) for every sample of the
    datamodule's split; None when features are not cached (trainable backbone, augmentation,
    or `data.cache_features=false`). The datamodule is set up already; `run_over_images` is
    trained/runner.run_over_images."""
    caches = datamodule.caches
    if not should_cache(caches.cache_features, net, datamodule.train_transform):
        return None
    if caches.cache_dir is None:
        raise ConfigError("data.cache_dir is not set; set it to a folder, e.g. data/cache.")
    cache = FeatureCache(
        caches.cache_dir,
        net,
        datamodule.all_samples,
        datamodule.transform,
        run_over_images=run_over_images,
        device=device,
        num_workers=datamodule.num_workers,
    )
    cache.load_or_build()
    return cache
