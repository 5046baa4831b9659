"""The LightningDataModule: scan a source, split it, weight the classes, serve tensors."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from tb_lightning.core.errors import ConfigError, DataError
from tb_lightning.core.labels import CLASS_NAMES
from tb_lightning.core.signals import init_worker
from tb_lightning.data import integrity
from tb_lightning.data.augment import build_train_transform
from tb_lightning.data.dataset import ImageDataset
from tb_lightning.data.inventory import (
    build_data_report,
    describe_upsampling,
    upsampling,
    write_data_report,
)
from tb_lightning.data.preprocess import preprocess_spec
from tb_lightning.data.sampling import EpochSeededDataLoader, EpochShuffleSampler
from tb_lightning.data.sources import DATA_SOURCES, Sample, ScanRequest, synthetic_sources
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


@dataclass(frozen=True)
class SplitOptions:
    """How the table is split into train / val (/ test): `data.val_size`, `data.test_size`,
    `data.num_folds`, `data.fold`, `data.split_seed`, `data.split_file`."""

    val_size: int | float
    test_size: int | float | None
    num_folds: int | None
    fold: int
    split_seed: int
    split_file: str | None


@dataclass(frozen=True)
class IntegrityOptions:
    """What the scan does with bad files and with duplicates across the split:
    `data.on_bad_file`, `data.on_leak`, `data.near_duplicate_distance`."""

    on_bad_file: str
    on_leak: str
    near_duplicate_distance: int


@dataclass(frozen=True)
class CacheOptions:
    """The caches shared by sweeps and later runs: the scan's (`data.scan_cache_dir`), the
    backbone features' (`data.cache_features`, `data.cache_dir`: data/feature_cache.py) and the
    decoded images' (`data.cache_images`, `data.image_cache_dir`: data/image_cache.py)."""

    scan_cache_dir: str | None
    cache_features: bool | str
    cache_dir: str | None
    cache_images: bool
    image_cache_dir: str | None


class TBDataModule(L.LightningDataModule):
    """Normal vs Tuberculosis images from one source, split into train and val.

    Built by `from_config` from the flat `data.*` keys of `conf/data/*.yaml`, where each key's
    default and meaning are stated. `source` picks how `root` is read: one of the registered
    sources (data/sources.py DATA_SOURCES: each one's scanner and a line on what its `root`
    holds). `sources`, a list of {source, root, ...} entries,
    combines several sources in one table and replaces `source`/`root`.

    Splits keep each patient on one side (`split`): `test_size` holds out a test split first
    (never trained on), then `num_folds`/`fold` pick a cross-validation fold as val, else
    `val_size`. Every image is checked when scanned, and duplicates across the split are
    reported (`integrity`); `report` holds what data_report.json says. `preprocess` is
    {name, clip_limit, tile_grid}, as the classifier's checkpoints record it.
    """

    def __init__(
        self,
        *,
        source: str,
        root: str,
        class_names: Sequence[str],
        image_size: int,
        batch_size: int,
        num_workers: int | str,
        pin_memory: bool | str,
        split: SplitOptions,
        integrity: IntegrityOptions,
        caches: CacheOptions,
        augment: Mapping[str, Any],
        preprocess: Mapping[str, Any],
        allow_outside_paths: bool,
        # Optional: set by some data options only (data.sources, data=folder, data=phantom).
        sources: Sequence[Mapping[str, Any]] | None = None,
        class_map: Mapping[str, Any] | None = None,
        phantom: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # The values were checked with the config (config/checks.py: check_data).
        self.source = source
        self.root = Path(root).expanduser().resolve()  # split.csv holds absolute paths
        self.class_names = tuple(class_names)
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = resolve_num_workers(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory == "auto" else bool(pin_memory)
        self.split = split
        self.integrity = integrity
        self.caches = caches
        self.phantom = dict(phantom or {})
        self.sources = [dict(entry) for entry in sources or []]
        self.class_map = dict(class_map) if class_map else None
        # data=manifest: rows may point outside the CSV's folder only when allowed.
        self.allow_outside_paths = allow_outside_paths
        # The images' preprocessing: the classifier takes it from here at setup into its
        # hyper-parameters (models/classifier.py), and so into every checkpoint, where eval,
        # predict and export find it. `preprocess` is the spec the transforms are built from.
        self.preprocess_settings = dict(preprocess)
        self.preprocess = preprocess_spec(self.preprocess_settings)
        self.transform = build_transform(image_size, self.preprocess)
        self.augment = dict(augment)
        self.train_transform = build_train_transform(image_size, self.augment, self.preprocess)
        self.train_samples: list[Sample] | None = None
        self.val_samples: list[Sample] | None = None
        self.test_samples: list[Sample] = []
        # path -> (SHA-256, pHash) of the split's images, for split.csv (write_split).
        self.hashes: dict[str, tuple[str, str]] = {}
        self.report: dict[str, Any] = {}
        # data.cache_features: the engine may hand over cached backbone features to serve
        # instead of images (serve_features; data/feature_cache.py decides and builds them).
        self.features: Any = None
        # data.cache_images: the engine may hand over a decoded-image cache (serve_images;
        # data/image_cache.py) when the features are not cached.
        self.images: Any = None

    @classmethod
    def from_config(
        cls,
        *,
        source: str,
        root: str,
        class_names: Sequence[str],
        image_size: int,
        batch_size: int,
        val_size: int | float,
        test_size: int | float | None,
        num_folds: int | None,
        fold: int,
        split_seed: int,
        split_file: str | None,
        sources: Sequence[Mapping[str, Any]] | None,
        allow_outside_paths: bool,
        preprocess: str,
        clahe: Mapping[str, Any],
        on_bad_file: str,
        on_leak: str,
        near_duplicate_distance: int,
        scan_cache_dir: str | None,
        num_workers: int | str,
        pin_memory: bool | str,
        cache_features: bool | str,
        cache_dir: str | None,
        cache_images: bool,
        image_cache_dir: str | None,
        augment: Mapping[str, Any],
        # Keys of some data options only: data=folder (class_map), data=phantom (phantom).
        class_map: Mapping[str, Any] | None = None,
        phantom: Mapping[str, Any] | None = None,
    ) -> TBDataModule:
        """The data module of `data.*` (the `_target_` of conf/data/*.yaml): the flat keys a user
        sets, with their defaults in the YAML alone, gathered into the option groups."""
        return cls(
            source=source,
            root=root,
            class_names=class_names,
            image_size=image_size,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            split=SplitOptions(
                val_size=val_size,
                test_size=test_size,
                num_folds=num_folds,
                fold=fold,
                split_seed=split_seed,
                split_file=split_file,
            ),
            integrity=IntegrityOptions(
                on_bad_file=on_bad_file,
                on_leak=on_leak,
                near_duplicate_distance=near_duplicate_distance,
            ),
            caches=CacheOptions(
                scan_cache_dir=scan_cache_dir,
                cache_features=parse_cache_mode(cache_features),
                cache_dir=cache_dir,
                cache_images=cache_images,
                image_cache_dir=image_cache_dir,
            ),
            augment=augment,
            # As the classifier's checkpoints have always recorded data.preprocess/data.clahe.
            preprocess={
                "name": preprocess,
                "clip_limit": clahe["clip_limit"],
                "tile_grid": clahe["tile_grid"],
            },
            allow_outside_paths=allow_outside_paths,
            sources=sources,
            class_map=class_map,
            phantom=phantom,
        )

    def prepare_data(self) -> None:
        # Lightning runs this on one process per node: the right place to write files.
        # A synthetic source generates its images when scanned (data/sources.py DATA_SOURCES).
        generated = DATA_SOURCES[self.source].synthetic
        if generated and self.split.split_file is None and not self.sources:
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
        return self._scan_one(self.source, str(self.root), self.class_names, self.class_map)

    def _scan_one(
        self,
        source: str,
        root: str,
        class_names: Sequence[str] | None = None,
        class_map: dict[str, Any] | None = None,
        name: str | None = None,
    ) -> list[Sample]:
        """One source's table, by its scanner in the registry (data/sources.py DATA_SOURCES)."""
        request = ScanRequest(
            source=source,
            # split.csv and the scan cache hold absolute paths.
            root=Path(root).expanduser().resolve(),
            class_names=tuple(class_names or self.class_names),
            class_map=class_map,
            name=name,
            allow_outside_paths=self.allow_outside_paths,
            phantom=self.phantom,
        )
        return DATA_SOURCES[source].scan(request)

    def _split(self, samples: list[Sample]) -> dict[str, list[Sample]]:
        """train/val(/test) sides of the table, each patient (per source) on one side."""
        options = self.split
        labels = [s.label for s in samples]
        groups = [f"{s.source}/{s.patient_id}" for s in samples]
        rest = list(range(len(samples)))
        test: list[int] = []
        if options.test_size:
            rest, test = group_stratified_split(
                labels, groups, options.test_size, options.split_seed, key="data.test_size"
            )
        rest_labels = [labels[i] for i in rest]
        rest_groups = [groups[i] for i in rest]
        if options.num_folds is not None:
            folds = group_stratified_folds(
                rest_labels, rest_groups, options.num_folds, options.split_seed
            )
            train = [j for j, f in enumerate(folds) if f != options.fold]
            val = [j for j, f in enumerate(folds) if f == options.fold]
            # Mixed classes in every val batch (AUROC on the sanity-check batches), seeded.
            random.Random(options.split_seed).shuffle(val)
        else:
            train, val = group_stratified_split(
                rest_labels, rest_groups, options.val_size, options.split_seed
            )
        return {
            "train": [samples[rest[j]] for j in train],
            "val": [samples[rest[j]] for j in val],
            "test": [samples[i] for i in test],
        }

    def setup(self, stage: str | None = None) -> None:
        if self.train_samples is not None:  # Lightning may call setup again; the split stays.
            return
        split_file = self.split.split_file
        if split_file:
            splits = read_split_sides(split_file)
            log.info("Loaded the split from %s", split_file)
            samples = [s for side in splits.values() for s in side]
        else:
            samples = self.scan()
        # Every image is decoded once here (or found unchanged in the cache), before training.
        roots = [e["root"] for e in self.sources] or [str(self.root)]
        scan_cache_dir = self.caches.scan_cache_dir
        cache = integrity.cache_file_for(scan_cache_dir, roots) if scan_cache_dir else None
        infos, scan_stats = integrity.inspect_files(
            [s.path for s in samples], cache, num_workers=self.num_workers
        )
        log.info(
            "Checked %d images (%d unchanged since the last scan) in %.1f s",
            scan_stats["files"],
            scan_stats["from_cache"],
            scan_stats["seconds"],
        )
        checks = self.integrity
        good, skipped = integrity.apply_bad_file_policy(samples, infos, checks.on_bad_file)
        if split_file:
            kept = {s.path for s in good}
            splits = {name: [s for s in side if s.path in kept] for name, side in splits.items()}
        else:
            # DICOM files: the hashed PatientID is the patient the split keeps on one side.
            splits = self._split(integrity.with_header_patients(good, infos))
        duplicates = integrity.find_duplicates(splits, infos, checks.near_duplicate_distance)
        dropped = integrity.apply_leak_policy(splits, duplicates, checks.on_leak)
        # The split file's classes were checked up front (config/checks.py) and a new split is
        # made with both; only the files left out here can still empty a class of a split,
        # which would fail after training (threshold, AUROC) instead of now.
        problem = split_class_problem(splits)
        if problem:
            where = f"data.split_file={split_file}" if split_file else "The split"
            raise DataError(
                f"{where}: {problem} once bad files and duplicates were left out "
                f"(data.on_bad_file={checks.on_bad_file}, data.on_leak={checks.on_leak}), but "
                "every split needs both classes; replace the bad files or remove the duplicates."
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
        dicom = self.report["dicom"]
        if dicom and dicom["flagged"]:
            log.warning(
                "%d of %d DICOM image(s) are not frontal chest radiographs by their header "
                "(modality other than CR/DX/DR, or view other than PA/AP); they are used, and "
                "listed under dicom.flagged in data_report.json.",
                len(dicom["flagged"]),
                dicom["images"],
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
        """True when the images are generated (data=phantom), not medical images."""
        synthetic = synthetic_sources()
        return self.source in synthetic or any(s.source in synthetic for s in self.all_samples)

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
        split, checks = self.split, self.integrity
        return {
            "sources": self.sources or [{"source": self.source, "root": str(self.root)}],
            "split_file": split.split_file,
            "split_seed": split.split_seed,
            "val_size": None if split.num_folds is not None else split.val_size,
            "test_size": split.test_size,
            "num_folds": split.num_folds,
            "fold": split.fold if split.num_folds is not None else None,
            "on_bad_file": checks.on_bad_file,
            "on_leak": checks.on_leak,
            "near_duplicate_distance": checks.near_duplicate_distance,
            "preprocess": self.preprocess,
        }

    @property
    def all_samples(self) -> list[Sample]:
        """Every sample of the split: train, val and test."""
        return [*(self.train_samples or []), *(self.val_samples or []), *self.test_samples]

    def serve_features(self, features: Any) -> None:
        """Serve (features, label) batches from `features.dataset(samples)` instead of images
        (cached frozen-backbone features, data/feature_cache.py)."""
        self.features = features

    def serve_images(self, images: Any) -> None:
        """Serve images from the decoded-image cache (`images.dataset(samples, transform)`)
        instead of decoding the files every epoch (data/image_cache.py)."""
        self.images = images

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_samples, self.train_transform, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_samples, self.transform, shuffle=False)

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
            worker_init_fn=init_worker,  # workers leave stop signals to the run (core/signals.py)
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
