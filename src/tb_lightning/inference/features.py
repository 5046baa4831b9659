"""Frozen-feature cache: compute the backbone features of every image once, train the head on them.

With frozen conv features and no random train-time augmentation, every epoch of every sweep job
recomputes the same backbone features. `FeatureCache` extracts them once (batched, channels_last,
bf16 autocast where the hardware has native bf16), stores them in half precision under
`data.cache_dir`, and serves `(features, label)` pairs; the head (dropout included) then trains
exactly as it would on images.

The cache file name is a hash of everything that changes the features: the backbone's weights
(their bytes, so random-init backbones are told apart too), the image size and preprocessing, the
extraction precision, and the file list with sizes and modification times. Any change builds a new
file; old files are left for other configurations to reuse. Writes are atomic (core/atomic.py:
temporary file + `os.replace`) and serialised by a lock file: the jobs of a sweep that start
together extract once. A damaged or unreadable cache file is rebuilt with a warning, and the
temporary files of writes that were killed are removed by later runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms import v2

from tb_lightning.core.atomic import TMP_SUFFIX, atomic_torch_save
from tb_lightning.core.errors import ConfigError
from tb_lightning.data.sources import Sample
from tb_lightning.inference.runner import run_over_images

log = logging.getLogger(__name__)

CACHE_MODES = ("auto", True, False)
# Bump when the file layout or the extraction changes meaning; old files are then ignored.
CACHE_FORMAT = 1
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
)
# Temporary files of cache writes: `.features-<key>.pt.<random>.tmp` (tb_lightning.atomic) and
# `.features-<random>.tmp` (the cache's own writer before it used tb_lightning.atomic).
TMP_PATTERN = ".features-*" + TMP_SUFFIX
# A temporary file untouched for this long was left by a killed write, not one in progress: the
# cache file is written in one go after the extraction, which takes seconds, and every write
# renews the file's modification time.
STALE_TMP_SECONDS = 3600


def is_deterministic(transform: Callable) -> bool:
    """True when `transform` has no random step (a Compose of known deterministic transforms)."""
    steps = transform.transforms if isinstance(transform, v2.Compose) else [transform]
    return all(isinstance(step, DETERMINISTIC_TRANSFORMS) for step in steps)


def cache_blockers(net: nn.Module, train_transform: Callable) -> list[str]:
    """Reasons the cache would change results; empty when it is valid."""
    reasons = []
    if not getattr(net, "freeze_features", False):
        reasons.append("the backbone is trainable (model.net.freeze_features=false)")
    if not is_deterministic(train_transform):
        reasons.append(f"the train transform has random augmentation ({train_transform})")
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


def files_digest(paths: Sequence[str]) -> str:
    """sha256 of each file's path, size and modification time (content changes change these)."""
    digest = hashlib.sha256()
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
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
    device: torch.device | str = "cpu",
    precision: str = "auto",
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """`net.forward_features` of every sample, float32 (N, D), in the order of `samples`.

    Through the one image pass of inference/runner.py. channels_last suits oneDNN/cuDNN
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
        )
    finally:
        net.features.to(memory_format=torch.contiguous_format)
        net.to(old_device).train(was_training)
    return run.outputs


class FeatureDataset(Dataset):
    """(float32 feature vector, label) pairs from a half-precision feature table."""

    def __init__(self, features: torch.Tensor, labels: Sequence[int]) -> None:
        if len(features) != len(labels):
            raise ValueError(f"{len(features)} feature rows for {len(labels)} labels")
        self.features = features
        self.labels = list(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.features[index].float(), self.labels[index]


class FeatureCache:
    """Features of a fixed set of images under `cache_dir`, built once and shared across runs."""

    def __init__(
        self,
        cache_dir: str | Path,
        net: nn.Module,
        samples: Sequence[Sample],
        transform: Callable,
        *,
        device: torch.device | str = "cpu",
        precision: str = "auto",
        batch_size: int = 32,
        num_workers: int = 0,
    ) -> None:
        self.cache_dir = Path(cache_dir).expanduser()
        self.net = net
        # One table for every split: another split seed reuses the same file.
        self.samples = sorted(samples, key=lambda s: s.path)
        self.transform = transform
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.batch_size = batch_size
        self.num_workers = num_workers
        paths = [s.path for s in self.samples]
        self.key = cache_key(net.features, paths, transform, self.precision)
        self.path = self.cache_dir / f"features-{self.key[:24]}.pt"
        self._rows: dict[str, int] = {path: i for i, path in enumerate(paths)}
        self._features: torch.Tensor | None = None

    def load_or_build(self) -> torch.Tensor:
        """The (N, D) float16 feature table, from disk when a valid file exists."""
        if self._features is not None:
            return self._features
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._remove_tmp_files(STALE_TMP_SECONDS)
        features = self._read()
        if features is None:
            # One builder at a time; the others wait here, then read what it wrote.
            with FileLock(str(self.path) + ".lock"):
                # Only the lock holder writes this file, so its temporary files are leftovers.
                self._remove_tmp_files(0, f".{self.path.name}.*{TMP_SUFFIX}")
                features = self._read()
                if features is None:
                    features = self._build()
        self._features = features
        return features

    def dataset(self, samples: Sequence[Sample]) -> FeatureDataset:
        """The cached features of `samples` (a subset of the cached ones), in their order."""
        table = self.load_or_build()
        rows = torch.tensor([self._rows[s.path] for s in samples], dtype=torch.long)
        return FeatureDataset(table[rows], [s.label for s in samples])

    def _remove_tmp_files(self, min_age_s: float, pattern: str = TMP_PATTERN) -> None:
        """Delete temporary files of interrupted writes (matching pattern, at least min_age_s old).

        Other jobs may be writing other cache files right now: their temporary files are young,
        so only those of this file (under its lock, min_age_s=0) or old ones are removed.
        """
        now = time.time()
        removed = 0
        for tmp in self.cache_dir.glob(pattern):
            try:
                if now - tmp.stat().st_mtime >= min_age_s:
                    tmp.unlink()
                    removed += 1
            except OSError:  # removed or renamed by another job first, or not ours to delete
                continue
        if removed:
            log.info(
                "Removed %d temporary file(s) of interrupted feature cache writes from %s",
                removed,
                self.cache_dir,
            )

    def _read(self) -> torch.Tensor | None:
        if not self.path.is_file():
            return None
        try:
            stored = torch.load(self.path, map_location="cpu", weights_only=True)
            features = stored["features"]
            valid = (
                stored["key"] == self.key
                and stored["paths"] == [s.path for s in self.samples]
                and features.dtype == torch.float16
                and features.dim() == 2
                and len(features) == len(self.samples)
                and bool(torch.isfinite(features).all())
            )
        except Exception as err:  # truncated zip, unpickling error, missing key, ...
            log.warning("Feature cache %s is damaged (%s); rebuilding it.", self.path, err)
            return None
        if not valid:
            log.warning("Feature cache %s does not match its key; rebuilding it.", self.path)
            return None
        log.info("Loaded cached backbone features of %d images from %s", len(features), self.path)
        return features

    def _build(self) -> torch.Tensor:
        # The DataLoader draws a seed from the global RNG: fork it, so that a run that builds
        # the cache shuffles and drops out exactly like one that reads it (or runs without it).
        with torch.random.fork_rng(devices=[]):
            features = extract_features(
                self.net,
                self.samples,
                self.transform,
                device=self.device,
                precision=self.precision,
                batch_size=self.batch_size,
                num_workers=self.num_workers,
            )
        if not torch.isfinite(features).all():
            raise RuntimeError("backbone features contain NaN/inf; the cache was not written")
        # Half precision on disk halves the size; fp16 keeps ~3 significant digits of the
        # post-ReLU features (bf16 would keep 2).
        half = features.to(torch.float16)
        payload = {"key": self.key, "paths": [s.path for s in self.samples], "features": half}
        # Atomic: readers see either no file or a whole one.
        atomic_torch_save(payload, self.path)
        size_mb = self.path.stat().st_size / 2**20
        log.info(
            "Cached backbone features of %d images (%.0f MB, fp16) in %s",
            len(half),
            size_mb,
            self.path,
        )
        return half


def build_feature_cache(
    datamodule: Any, net: nn.Module, device: torch.device | str = "cpu"
) -> FeatureCache | None:
    """The feature cache `data.cache_features` asks for, built (or read) for every sample of the
    datamodule's split; None when features are not cached (trainable backbone, augmentation,
    or `data.cache_features=false`). The datamodule is set up already."""
    if not should_cache(datamodule.cache_features, net, datamodule.train_transform):
        return None
    if datamodule.cache_dir is None:
        raise ConfigError("data.cache_dir is not set; set it to a folder, e.g. data/cache.")
    cache = FeatureCache(
        datamodule.cache_dir,
        net,
        datamodule.all_samples,
        datamodule.transform,
        device=device,
        num_workers=datamodule.num_workers,
    )
    cache.load_or_build()
    return cache
