"""The LightningDataModule: scan a source, split it, weight the classes, serve tensors."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from tb_lightning.core.errors import ConfigError, DataError
from tb_lightning.core.labels import CLASS_NAMES
from tb_lightning.data import integrity
from tb_lightning.data.augment import build_train_transform, is_random
from tb_lightning.data.dataset import ImageDataset
from tb_lightning.data.inventory import (
    build_data_report,
    describe_upsampling,
    upsampling,
    write_data_report,
)
from tb_lightning.data.phantom import ensure_phantom_dataset
from tb_lightning.data.preprocess import preprocess_spec
from tb_lightning.data.sampling import EpochSeededDataLoader, EpochShuffleSampler
from tb_lightning.data.sources import (
    Sample,
    scan_class_folders,
    scan_class_map,
    scan_manifest,
    scan_nlm,
)
from tb_lightning.data.split import (
    group_stratified_folds,
    group_stratified_split,
    read_split_sides,
    split_class_problem,
    write_split_csv,
)
from tb_lightning.data.transforms import build_transform

log = logging.getLogger(__name__)


def resolve_num_workers(num_workers: int | str) -> int:
    """`data.num_workers=auto`: one decoding worker per spare core, at most 8."""
    if num_workers == "auto":
        return min(8, max(0, (os.cpu_count() or 1) - 1))
    return int(num_workers)


def parse_cache_mode(value: Any) -> str | bool:
    """`data.cache_features`: auto, true or false (YAML may hand over strings)."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


class TBDataModule(L.LightningDataModule):
    """Normal vs Tuberculosis images from one source, split into train and val.

    Args mirror `conf/data/*.yaml`; `source` picks how `root` is read: `tb_cxr` (the Kaggle
    layout), `nlm_tb` (NLM Shenzhen/Montgomery, label in the filename), `folder` (any
    class-folder tree named by `class_names`, or mapped to classes by `class_map`), `manifest`
    (`root` is a CSV of path,label[,patient_id,source]), `phantom` (synthetic images generated
    under `root` with the `phantom` settings). `sources`, a list of {source, root, ...} entries,
    combines several sources in one table and replaces `source`/`root`.

    Splits keep each patient on one side: `test_size` holds out a test split first (never
    trained on), then `num_folds`/`fold` pick a cross-validation fold as val, else `val_size`.
    Every image is checked when scanned (`on_bad_file`), and duplicates across the split are
    reported (`on_leak`, `near_duplicate_distance`); `report` holds what data_report.json says.
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
        sources: Sequence[dict[str, Any]] | None = None,
        class_map: dict[str, Any] | None = None,
        test_size: int | float | None = None,
        num_folds: int | None = None,
        fold: int = 0,
        on_bad_file: str = "error",
        on_leak: str = "warn",
        near_duplicate_distance: int = 20,
        scan_cache_dir: str | None = None,
        cache_features: bool | str = "auto",
        cache_dir: str | None = None,
        cache_images: bool = False,
        image_cache_dir: str | None = None,
        augment: dict[str, Any] | None = None,
        allow_outside_paths: bool = False,
        preprocess: str = "none",
        clahe: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # The values were checked with the config (config/checks.py: check_data).
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
        self.sources = [dict(entry) for entry in sources or []]
        self.class_map = dict(class_map) if class_map else None
        self.test_size = test_size
        self.num_folds = num_folds
        self.fold = fold
        self.on_bad_file = on_bad_file
        self.on_leak = on_leak
        self.near_duplicate_distance = near_duplicate_distance
        self.scan_cache_dir = scan_cache_dir
        # data=manifest: rows may point outside the CSV's folder only when allowed.
        self.allow_outside_paths = allow_outside_paths
        # data.preprocess / data.clahe, as the classifier stores them (model.preprocess).
        self.preprocess = preprocess_spec({"name": preprocess, **(clahe or {})})
        self.transform = build_transform(image_size, self.preprocess)
        self.augment = dict(augment or {})
        self.train_transform = build_train_transform(image_size, self.augment, self.preprocess)
        self.train_samples: list[Sample] | None = None
        self.val_samples: list[Sample] | None = None
        self.test_samples: list[Sample] = []
        # path -> (SHA-256, pHash) of the split's images, for split.csv (write_split).
        self.hashes: dict[str, tuple[str, str]] = {}
        self.report: dict[str, Any] = {}
        # data.cache_features: the engine may hand over cached backbone features to serve
        # instead of images (serve_features; inference/features.py decides and builds them).
        self.cache_features = parse_cache_mode(cache_features)
        self.cache_dir = cache_dir
        self.features: Any = None
        # data.cache_images: the engine may hand over a decoded-image cache (serve_images;
        # data/image_cache.py) when the features are not cached.
        self.cache_images = cache_images
        self.image_cache_dir = image_cache_dir
        self.images: Any = None

    def prepare_data(self) -> None:
        # Lightning runs this on one process per node: the right place to write files.
        if self.source == "phantom" and self.split_file is None and not self.sources:
            self.scan()

    def scan(self) -> list[Sample]:
        """The full table of the source(s), before checking and splitting."""
        if self.sources:
            samples = [s for entry in self.sources for s in self._scan_one(**entry)]
            paths = [s.path for s in samples]
            if len(set(paths)) != len(paths):
                raise ConfigError(
                    "data.sources lists the same image twice (two entries overlap); give each "
                    "source its own root."
                )
            return samples
        if self.source == "phantom":
            pairs = ensure_phantom_dataset(self.root, **self.phantom)
            return [Sample(str(p), label, Path(p).stem, "phantom") for p, label in pairs]
        return self._scan_one(self.source, str(self.root), self.class_names, self.class_map)

    def _scan_one(
        self,
        source: str,
        root: str,
        class_names: Sequence[str] | None = None,
        class_map: dict[str, Any] | None = None,
        name: str | None = None,
    ) -> list[Sample]:
        # split.csv and the scan cache hold absolute paths.
        root_path = Path(root).expanduser().resolve()
        if source == "nlm_tb":
            return scan_nlm(root_path, name)
        if source == "manifest":
            return scan_manifest(root_path, name or "manifest", self.allow_outside_paths)
        if source == "folder" and class_map:
            return scan_class_map(root_path, class_map, name or source)
        return scan_class_folders(root_path, class_names or self.class_names, name or source)

    def _split(self, samples: list[Sample]) -> dict[str, list[Sample]]:
        """train/val(/test) sides of the table, each patient (per source) on one side."""
        labels = [s.label for s in samples]
        groups = [f"{s.source}/{s.patient_id}" for s in samples]
        rest = list(range(len(samples)))
        test: list[int] = []
        if self.test_size:
            rest, test = group_stratified_split(
                labels, groups, self.test_size, self.split_seed, key="data.test_size"
            )
        rest_labels = [labels[i] for i in rest]
        rest_groups = [groups[i] for i in rest]
        if self.num_folds is not None:
            folds = group_stratified_folds(
                rest_labels, rest_groups, self.num_folds, self.split_seed
            )
            train = [j for j, f in enumerate(folds) if f != self.fold]
            val = [j for j, f in enumerate(folds) if f == self.fold]
            # Mixed classes in every val batch (AUROC on the sanity-check batches), seeded.
            random.Random(self.split_seed).shuffle(val)
        else:
            train, val = group_stratified_split(
                rest_labels, rest_groups, self.val_size, self.split_seed
            )
        return {
            "train": [samples[rest[j]] for j in train],
            "val": [samples[rest[j]] for j in val],
            "test": [samples[i] for i in test],
        }

    def setup(self, stage: str | None = None) -> None:
        if self.train_samples is not None:  # Lightning may call setup again; the split stays.
            return
        if self.split_file:
            splits = read_split_sides(self.split_file)
            log.info("Loaded the split from %s", self.split_file)
            samples = [s for side in splits.values() for s in side]
        else:
            samples = self.scan()
        # Every image is decoded once here (or found unchanged in the cache), before training.
        roots = [e["root"] for e in self.sources] or [str(self.root)]
        cache = (
            integrity.cache_file_for(self.scan_cache_dir, roots) if self.scan_cache_dir else None
        )
        infos, scan_stats = integrity.inspect_files(
            [s.path for s in samples], cache, num_workers=self.num_workers
        )
        log.info(
            "Checked %d images (%d unchanged since the last scan) in %.1f s",
            scan_stats["files"],
            scan_stats["from_cache"],
            scan_stats["seconds"],
        )
        good, skipped = integrity.apply_bad_file_policy(samples, infos, self.on_bad_file)
        if self.split_file:
            kept = {s.path for s in good}
            splits = {name: [s for s in side if s.path in kept] for name, side in splits.items()}
        else:
            splits = self._split(good)
        duplicates = integrity.find_duplicates(splits, infos, self.near_duplicate_distance)
        dropped = integrity.apply_leak_policy(splits, duplicates, self.on_leak)
        # The split file's classes were checked up front (config/checks.py) and a new split is
        # made with both; only the files left out here can still empty a class of a split,
        # which would fail after training (threshold, AUROC) instead of now.
        problem = split_class_problem(splits)
        if problem:
            where = f"data.split_file={self.split_file}" if self.split_file else "The split"
            raise DataError(
                f"{where}: {problem} once bad files and duplicates were left out "
                f"(data.on_bad_file={self.on_bad_file}, data.on_leak={self.on_leak}), but every "
                "split needs both classes; replace the bad files or remove the duplicates."
            )
        self.train_samples, self.val_samples = splits["train"], splits["val"]
        self.test_samples = splits["test"]
        # Only the two hashes of the split's images are kept, not the scan's whole infos.
        self.hashes = {
            s.path: (infos[s.path]["sha256"], infos[s.path]["phash"]) for s in self.all_samples
        }
        upsampled = self._check_upsampling(infos)
        self.report = build_data_report(
            splits,
            infos,
            skipped,
            duplicates,
            dropped,
            self._report_settings(),
            scan_stats,
            upsampled,
        )
        n_dup = self.report["duplicates"]
        log.info(
            "Data: %d images from %s; %d skipped; duplicates: %d exact group(s) (%d across the "
            "split), %d near pair(s) across the split",
            self.report["images"],
            ", ".join(
                f"{k} ({sum(v.values())})" for k, v in self.report["counts"]["per_source"].items()
            ),
            len(skipped),
            n_dup["exact_groups"],
            n_dup["exact_groups_across_split"],
            n_dup["near_pairs_across_split"],
        )
        if self.test_samples:
            log.info(
                "Held-out test split: %d (%s), evaluated once after training",
                len(self.test_samples),
                self.describe_counts(self.class_counts("test")),
            )
        counts = self.class_counts("train")
        log.info(
            "Split: %d train (%s), %d val (%s)",
            len(self.train_samples),
            self.describe_counts(counts),
            len(self.val_samples),
            self.describe_counts(self.class_counts("val")),
        )

    def _check_upsampling(self, infos: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
        """Warn once when data.image_size enlarges the split's images more than 2x on a side
        (their sizes from the scan: no file is read again); what upsampling() found, or None."""
        sizes = [
            (info["width"], info["height"])
            for s in self.all_samples
            if (info := infos.get(s.path)) and info.get("width") and info.get("height")
        ]
        found = upsampling(self.image_size, sizes)
        if found:
            log.warning(
                "%s",
                describe_upsampling(
                    found,
                    f"data.image_size={self.image_size}",
                    f"data.image_size={found['native_side']} matches them.",
                ),
            )
        return found

    def class_counts(self, split: str = "train") -> list[int]:
        samples = {"train": self.train_samples, "val": self.val_samples, "test": self.test_samples}[
            split
        ]
        if samples is None:
            raise RuntimeError("class_counts() needs setup() to have run")
        return [sum(1 for s in samples if s.label == c) for c in range(len(CLASS_NAMES))]

    @staticmethod
    def describe_counts(counts: Sequence[int]) -> str:
        return ", ".join(f"{n} {name}" for name, n in zip(CLASS_NAMES, counts, strict=True))

    @property
    def is_synthetic(self) -> bool:
        """True when the images are the generated phantoms (data=phantom), not medical images."""
        return self.source == "phantom" or any(s.source == "phantom" for s in self.all_samples)

    @property
    def pos_weight(self) -> float:
        """Weight of the Tuberculosis term in the loss: #Normal / #TB in the train split.

        With it, both classes contribute equally to the loss, as the reference's class-weighted
        cross-entropy does.
        """
        n_normal, n_tb = self.class_counts("train")
        return n_normal / n_tb

    def write_split(self, path: str | Path) -> None:
        write_split_csv(
            path,
            self.train_samples or [],
            self.val_samples or [],
            self.test_samples,
            self.hashes,
        )

    def write_data_report(self, path: str | Path) -> None:
        """data_report.json: counts, image sizes, skipped files, duplicates, class weights."""
        write_data_report(path, self.report)

    def _report_settings(self) -> dict[str, Any]:
        return {
            "sources": self.sources or [{"source": self.source, "root": str(self.root)}],
            "split_file": self.split_file,
            "split_seed": self.split_seed,
            "val_size": None if self.num_folds is not None else self.val_size,
            "test_size": self.test_size,
            "num_folds": self.num_folds,
            "fold": self.fold if self.num_folds is not None else None,
            "on_bad_file": self.on_bad_file,
            "on_leak": self.on_leak,
            "near_duplicate_distance": self.near_duplicate_distance,
            "preprocess": self.preprocess,
        }

    @property
    def all_samples(self) -> list[Sample]:
        """Every sample of the split: train, val and test."""
        return [*(self.train_samples or []), *(self.val_samples or []), *self.test_samples]

    def serve_features(self, features: Any) -> None:
        """Serve (features, label) batches from `features.dataset(samples)` instead of images
        (cached frozen-backbone features, inference/features.py)."""
        self.features = features

    def serve_images(self, images: Any) -> None:
        """Serve images from the decoded-image cache (`images.dataset(samples, transform)`)
        instead of decoding the files every epoch (data/image_cache.py)."""
        self.images = images

    @property
    def augment_is_random(self) -> bool:
        """True when train images are randomly augmented (data/augment=cxr)."""
        return is_random(self.augment)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_samples, self.train_transform, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_samples, self.transform, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """The held-out test split (data.test_size); train.py evaluates it once, at the end."""
        return self._loader(self.test_samples, self.transform, shuffle=False)

    def _loader(self, samples: list[Sample] | None, transform: Any, shuffle: bool) -> DataLoader:
        if samples is None:
            raise RuntimeError("dataloaders need setup() to have run")
        if self.features is not None:
            dataset = self.features.dataset(samples)
        elif self.images is not None:
            dataset = self.images.dataset(samples, transform)
        else:
            dataset = ImageDataset([s.path for s in samples], [s.label for s in samples], transform)
        # Feature rows are ready in memory: worker processes would only add start-up time.
        num_workers = 0 if self.features is not None else self.num_workers
        # Shuffles and worker seeds from (seed, epoch) alone: a resumed run draws what an
        # uninterrupted one would, with any number of workers (data/sampling.py).
        seed = torch.initial_seed()  # the run's seed, set by seed_everything
        return EpochSeededDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(dataset), seed, self._current_epoch)
            if shuffle
            else None,
            num_workers=num_workers,
            pin_memory=self.pin_memory,
            # Shuffled epochs start fresh workers, whose random streams then depend on the epoch.
            persistent_workers=num_workers > 0 and not shuffle,
            seed=seed,
            current_epoch=self._current_epoch,
        )

    def _current_epoch(self) -> int:
        """The epoch whose iterator is being created; 0 outside a Trainer.

        The count of epochs whose training has run, not `trainer.current_epoch`: after a resume
        Lightning creates the first iterator before it brings current_epoch up to date.
        """
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0
        return int(trainer.fit_loop.epoch_progress.current.processed)
