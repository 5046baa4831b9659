"""The values config keys may take, importable without torch.

config/checks.py checks a composed config against these in a Hydra callback before torch is
imported (config/callback.py); the modules that use a value (data/augment.py, models/schedules.py,
...) import it from here, so that there is one list of each.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# model.net.arch values and each one's smallest image: models/backbones.py (REGISTRY, ARCHS,
# MIN_IMAGE_SIZE), torch-free too, one record per backbone.
# model.scheduler.name (models/schedules.py).
SCHEDULERS = ("none", "cosine", "plateau")
# data.source values, with each one's scanner and the keys it reads: data/sources.py
# (DATA_SOURCES), torch-free too, one record per source.
# data.augment keys (data/augment.py).
AUGMENT_KEYS = {
    "crop_scale",
    "crop_ratio",
    "rotation_degrees",
    "translate",
    "brightness",
    "contrast",
    "horizontal_flip",
}
# model.tta (models/net.py): test-time augmentation out of training; null for none.
TTA_MODES = ("hflip",)
# model.loss (models/classifier.py, stats/loss.py).
LOSSES = ("bce", "focal")
# model.focal_gamma when model.loss=focal and it is not set: the paper's choice.
DEFAULT_FOCAL_GAMMA = 2.0


def focal_gamma_of(loss: str | None, focal_gamma: float | None) -> float:
    """The gamma a model was trained with: 0 for `bce` (and for a checkpoint written before
    model.loss existed), model.focal_gamma (default 2) for `focal`."""
    if loss == "focal":
        return DEFAULT_FOCAL_GAMMA if focal_gamma is None else float(focal_gamma)
    return 0.0


def loss_label(focal_gamma: float) -> str:
    """What the reported loss is, in words: printed beside every loss figure."""
    if focal_gamma == 0:
        return "weighted BCE"
    return f"focal loss, gamma {focal_gamma:g}, class-weighted"


# data.preprocess (data/preprocess.py).
PREPROCESS_NAMES = ("none", "clahe")
# data.on_bad_file and data.on_leak (data/integrity.py).
BAD_FILE_POLICIES = ("error", "skip")
LEAK_POLICIES = ("warn", "error", "drop")
# pHash on a 16x16 DCT block: 256 bits. Chest X-rays all look alike, and imagehash's default
# 64-bit pHash puts different patients 2-4 bits apart; at 256 bits, different patients of the NLM
# set are >= 48 bits apart while resized/recompressed/brightened copies stay <= 10 apart.
PHASH_SIZE = 16
PHASH_BITS = PHASH_SIZE * PHASH_SIZE
# data.phantom.lesions: how conspicuous the TB findings are (data/phantom.py _sample_lesions).
LESION_MIXES = ("mixed", "conspicuous")
# threshold.policy (stats/thresholds.py).
POLICIES = ("youden", "max_f1", "sensitivity")
# data.cache_features (data/feature_cache.py).
CACHE_MODES = ("auto", True, False)
# eval.split (evaluation/evaluate.py).
SPLITS = ("val", "test", "all")
# eval.report_gallery_size (evaluation/report_html.py): its default and largest value (each
# gallery image is a thumbnail, an overlay and a Grad-CAM pass).
GALLERY_SIZE = 12
MAX_GALLERY_SIZE = 100
# export's format and the file each writes (inference/deploy.py).
FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}


def preprocess_spec(preprocess: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """{"name": "clahe", "clip_limit": float, "tile_grid": int}, or None for no preprocessing.

    `preprocess` as the classifier stores it ({name, clip_limit, tile_grid}); None or
    name=none (and checkpoints written before the option existed) mean none.
    """
    if not preprocess or preprocess.get("name", "none") == "none":
        return None
    return {
        "name": "clahe",
        "clip_limit": float(preprocess["clip_limit"]),
        "tile_grid": int(preprocess["tile_grid"]),
    }
