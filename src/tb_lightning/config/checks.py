"""Every config value a user sets, checked in one place before any data is read.

Two stages. The checks of values (`VALUE_CHECKS`: `check_train_values`, `check_eval_values`,
...) need no torch: a Hydra callback runs them on the composed config before torch is imported
and before the run's folder exists, once for every job of a multirun (config/callback.py).
`check_config` (train), `check_eval_config`, `check_predict_config` and `check_export_config`
run them again first in their entry points (for callers that skip the command line), then the
checks that import what they check: a CUDA GPU for trainer.accelerator, the arguments of the
classes for keys added with `+`, the optimizer's `fused` option. Each failure is one sentence
naming the key, the value and what is allowed, or the fix. The classes and functions that take
these values trust them: they are built from a checked config, or from code that knows what it
passes. Checks that need the data (a val_size larger than the data, fewer patients than folds, a
file that is not an image) are made where the data is read (data/split.py, data/sources.py,
data/integrity.py), once each; the one file read here is a data.split_file (its rows, not its
images: check_split_file), which says as much about the run as any value. No float setting may
be NaN or infinite (check_finite, and _is_number in every range check). Typos in override keys
are refused by Hydra's struct mode ("Key 'dropuot' is not in struct"), and keys added with `+`
by `check_known_keys`.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# No torch, Lightning or torchvision here, directly or through these modules: the checks of
# values run in a Hydra callback before those are imported (config/callback.py; checked by
# tests/test_fail_fast.py). The checks that need them import them where they run.
from tb_lightning.core.choices import (
    AUGMENT_KEYS,
    BAD_FILE_POLICIES,
    CACHE_MODES,
    FORMATS,
    LEAK_POLICIES,
    LESION_MIXES,
    LOSSES,
    MAX_GALLERY_SIZE,
    PHASH_BITS,
    POLICIES,
    PREPROCESS_NAMES,
    SCHEDULERS,
    SPLITS,
    TTA_MODES,
)
from tb_lightning.core.errors import ConfigError, WeightsError
from tb_lightning.core.extras import require as require_extra
from tb_lightning.core.run_dirs import LAST, check_ckpt_path
from tb_lightning.data.sources import DATA_SOURCES, SOURCE_KEYS, source_folder
from tb_lightning.data.split import (
    read_split_sides,
    resolve_val_count,
    split_class_problem,
    stratified_split,
)
from tb_lightning.models.backbones import (
    backbone,
    check_backbone,
    imagenet_refusal,
    min_image_size,
)

# Lightning 2.x precision names (the short aliases "32", "16", "bf16" included).
PRECISIONS = ("64-true", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true")
PRECISION_ALIASES = ("64", "32", "16", "bf16", "transformer-engine")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
# The top level of conf/train.yaml (experiment/debug/sweep presets merge into these).
TOP_LEVEL_KEYS = (
    "task_name",
    "seed",
    "ckpt_path",
    "init_from",
    "optimized_metric",
    "threshold",
    "calibration",
    "data",
    "model",
    "callbacks",
    "logger",
    "trainer",
    "paths",
)
THRESHOLD_KEYS = ("policy", "target")


def _is_number(value: Any) -> bool:
    # Finite only: NaN passes every comparison check (nan <= 0 is False) and reaches OpenCV,
    # the optimizer and the artefacts; inf is no setting either.
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _one_of(key: str, value: Any, allowed: Sequence[Any], hint: str = "") -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}{hint}.")


def _positive_int(key: str, value: Any, minimum: int = 1) -> None:
    if not _is_int(value) or value < minimum:
        raise ConfigError(f"{key}={value!r} must be an integer >= {minimum}.")


def check_finite(cfg: Any, prefix: str = "") -> None:
    """No setting anywhere in the config is NaN or infinite (`key=nan`, `key=inf` parse as
    floats): each key's own check below also refuses them, and this covers the keys that are
    passed through unchecked (trainer.*, callbacks.*, the scheduler's and augmentation's)."""
    if isinstance(cfg, DictConfig):
        # Unresolved: an interpolation is checked where it points; ??? is left to its reader.
        cfg = OmegaConf.to_container(cfg, resolve=False)
    items = (
        cfg.items() if isinstance(cfg, Mapping) else enumerate(cfg) if isinstance(cfg, list) else ()
    )
    for key, value in items:
        name = f"{prefix}[{key}]" if isinstance(key, int) else f"{prefix}.{key}" if prefix else key
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(
                f"{name}={value} is not a finite number; set {name} to a finite value (NaN and "
                "infinity are never a setting here)."
            )
        check_finite(value, str(name))


def check_image_size(image_size: Any, arch: str) -> None:
    """data.image_size: an integer (pixels a side), at least what the backbone takes."""
    if not _is_int(image_size):
        raise ConfigError(
            f"data.image_size={image_size!r} must be an integer (pixels a side), e.g. 512."
        )
    min_size = min_image_size(arch)
    if image_size < min_size:
        raise ConfigError(
            f"data.image_size={image_size!r} is too small for {arch}; use an integer >= "
            f"{min_size} (the reference experiment uses 512)."
        )


# --- sections ---------------------------------------------------------------------------------


def check_accelerator_name(accelerator: Any, key: str = "trainer.accelerator") -> None:
    _one_of(key, accelerator, ACCELERATORS, "; use e.g. trainer=cpu or trainer=gpu")


def check_accelerator(accelerator: Any, key: str = "trainer.accelerator") -> None:
    """Fail before any work when the accelerator cannot run here (imports torch)."""
    check_accelerator_name(accelerator, key)
    import torch  # here, not at the top: the checks of values run before torch is imported

    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"{key}={accelerator} but PyTorch sees no CUDA GPU here; use trainer=cpu "
            "(or trainer.accelerator=auto), or run on a machine with an NVIDIA GPU and driver."
        )


def check_threshold_value(value: Any) -> None:
    """threshold.value (eval, predict, export): a TB-probability threshold, or null."""
    if value is None:
        return
    if not _is_number(value):
        raise ConfigError(f"threshold.value={value!r} must be a number in (0, 1).")
    if not 0 < value < 1:
        raise ConfigError(f"threshold.value={value} must be in (0, 1), e.g. 0.3.")


def check_threshold_override(threshold: Mapping[str, Any]) -> None:
    """eval's, predict's and export's threshold.value or threshold.policy (an ensemble's
    threshold re-chosen on its out-of-fold predictions): one of them at most."""
    check_threshold_value(threshold.get("value"))
    policy = threshold.get("policy")
    if policy is None:
        return
    check_policy(policy, threshold.get("target"))
    if threshold.get("value") is not None:
        raise ConfigError(
            f"threshold.value={threshold.get('value')} and threshold.policy={policy} both set the "
            "operating threshold: keep one."
        )


def check_policy(policy: Any, target: Any = None) -> None:
    """threshold.policy and, for the sensitivity policy, threshold.target."""
    _one_of("threshold.policy", policy, POLICIES)
    if policy == "sensitivity" and (not _is_number(target) or not 0 < target <= 1):
        raise ConfigError(
            f"threshold.target={target!r} must be a sensitivity in (0, 1], e.g. 0.95, "
            "for threshold.policy=sensitivity."
        )


def check_loss(loss: Any, focal_gamma: Any) -> None:
    """model.loss and model.focal_gamma: a gamma with the BCE would be a sweep of identical
    runs, so it is refused rather than ignored."""
    _one_of("model.loss", loss, LOSSES)
    if focal_gamma is None:
        return
    if loss != "focal":
        raise ConfigError(
            f"model.focal_gamma={focal_gamma!r} is only used by the focal loss: add "
            "model.loss=focal, or drop model.focal_gamma (model.loss=bce has no gamma)."
        )
    if not _is_number(focal_gamma) or not 0 <= focal_gamma <= 10:
        raise ConfigError(
            f"model.focal_gamma={focal_gamma!r} must be a number from 0 to 10 (0 is the "
            "weighted BCE; 2 is the usual choice)."
        )


def check_model(model: Mapping[str, Any], max_epochs: Any = None) -> None:
    """model.optimizer.*, model.net.*, model.scheduler.*, model.threshold (the optimizer's
    `fused` option: check_fused_option, which imports the optimizer)."""
    optimizer, net = model.get("optimizer") or {}, model.get("net") or {}
    lr = optimizer.get("lr")
    if not _is_number(lr) or lr <= 0:
        raise ConfigError(f"model.optimizer.lr={lr!r} must be a number > 0, e.g. 1e-4.")
    # Optional keys (the values in conf/model/alexnet.yaml): an optimizer configured without
    # them (~model.optimizer.weight_decay) uses its own default, and the backbone the head's lr.
    weight_decay = optimizer.get("weight_decay")
    if "weight_decay" in optimizer and (not _is_number(weight_decay) or weight_decay < 0):
        raise ConfigError(
            f"model.optimizer.weight_decay={weight_decay!r} must be a number >= 0 (0 disables it)."
        )
    scale = optimizer.get("backbone_lr_scale")
    if "backbone_lr_scale" in optimizer and (not _is_number(scale) or scale < 0):
        raise ConfigError(f"model.optimizer.backbone_lr_scale={scale!r} must be a number >= 0.")
    arch = net.get("arch", "alexnet")
    backbone(arch)  # a registered name, or timm/<name> with the 'timm' extra installed
    dropout = net["dropout"]
    if not _is_number(dropout) or not 0 <= dropout < 1:
        raise ConfigError(f"model.net.dropout={dropout!r} must be a number in [0, 1).")
    hidden_dim = net["hidden_dim"]
    if not _is_int(hidden_dim) or hidden_dim < 1:
        raise ConfigError(f"model.net.hidden_dim={hidden_dim!r} must be an integer >= 1.")
    pool_size = net.get("pool_size")
    if pool_size is not None and (not _is_int(pool_size) or pool_size < 1):
        raise ConfigError(f"model.net.pool_size={pool_size!r} must be null or an integer >= 1.")
    check_image_size(net.get("image_size", 512), arch)
    weights = net.get("weights")
    if weights == "imagenet" and imagenet_refusal(arch) is not None:
        raise WeightsError(imagenet_refusal(arch))
    if weights not in (None, "imagenet") and not Path(str(weights)).expanduser().exists():
        raise WeightsError(
            f"model.net.weights={weights} does not exist; pass the path of a .pth state "
            "dict, imagenet, or null."
        )
    threshold = model["threshold"]
    if not _is_number(threshold) or not 0 < threshold < 1:
        raise ConfigError(f"model.threshold={threshold!r} must be a number in (0, 1).")
    tta = model.get("tta")
    if tta is not None and tta not in TTA_MODES:
        raise ConfigError(
            f"model.tta={tta!r} must be null (no test-time augmentation) or one of "
            f"{list(TTA_MODES)}."
        )
    check_loss(model.get("loss", "bce"), model.get("focal_gamma"))
    check_scheduler(model["scheduler"], max_epochs)


def check_fused_option(optimizer: Mapping[str, Any]) -> None:
    """conf/model sets `fused: true`; an optimizer class without that argument gets a sentence
    instead of a TypeError from inside Trainer.fit."""
    if "fused" not in optimizer or "_target_" not in optimizer:
        return
    params = _parameters(optimizer["_target_"])
    if params is not None and "fused" not in params:
        raise ConfigError(
            f"model.optimizer._target_={optimizer['_target_']} has no `fused` argument; "
            "add ~model.optimizer.fused to the command line."
        )


# The callbacks.* key of callbacks=swa (conf/callbacks/swa.yaml, engine/averaging.py).
WEIGHT_AVERAGING_KEY = "weight_averaging"


def check_weight_averaging(callbacks: Mapping[str, Any] | None, max_epochs: Any) -> None:
    """callbacks=swa: when averaging starts, and no callback that would report or stop on an
    unaveraged epoch (a monitored best.ckpt, early stopping)."""
    callbacks = callbacks or {}
    averaging = callbacks.get(WEIGHT_AVERAGING_KEY)
    if not averaging:
        return
    for key, why in (
        (
            "model_checkpoint",
            "its best.ckpt, chosen on the validation split, would be an unaveraged epoch",
        ),
        ("early_stopping", "it would stop training before the average is made"),
    ):
        if callbacks.get(key):
            raise ConfigError(
                f"callbacks.{key} cannot be used with callbacks=swa: {why}; drop it "
                f"(callbacks.{key}=null), or train without weight averaging."
            )
    swa_lrs = averaging.get("swa_lrs")
    if not _is_number(swa_lrs) or swa_lrs <= 0:
        raise ConfigError(
            f"callbacks.weight_averaging.swa_lrs={swa_lrs!r} must be a number > 0: the learning "
            "rate of the averaged epochs."
        )
    start = averaging.get("swa_epoch_start", 0.75)
    if not _is_int(max_epochs) or max_epochs < 3:
        raise ConfigError(
            f"callbacks=swa needs trainer.max_epochs of 3 or more (it is {max_epochs!r}): the "
            "weights of several epochs are averaged."
        )
    # Lightning counts swa_epoch_start from 1 and adds the weights at the start of epochs
    # swa_epoch_start .. max_epochs (from 1): starting at 1 would add the random initial
    # weights, starting at max_epochs would average one epoch.
    first = int(max_epochs * start) if isinstance(start, float) else start
    if not (_is_number(start) and _is_int(first) and 2 <= first <= max_epochs - 1) or (
        isinstance(start, float) and not 0 < start < 1
    ):
        raise ConfigError(
            f"callbacks.weight_averaging.swa_epoch_start={start!r} must be a share of "
            f"trainer.max_epochs in (0, 1) (e.g. 0.75) or an epoch from 2 to {max_epochs - 1} "
            f"(counted from 1, as Lightning counts it), so that at least two epochs are averaged "
            f"and not the initial weights (with max_epochs={max_epochs} it is epoch {first!r})."
        )


def check_scheduler(scheduler: Mapping[str, Any], max_epochs: Any) -> None:
    """model.scheduler.name and its warm-up against trainer.max_epochs."""
    _one_of(
        "model.scheduler.name",
        scheduler["name"],
        SCHEDULERS,
        "; pick a preset with model/scheduler=cosine|plateau|none",
    )
    if scheduler["name"] != "cosine":
        return
    # Optional: absent or null, no warm-up (models/schedules.py).
    warmup = scheduler.get("warmup_epochs") or 0
    if not _is_int(warmup) or warmup < 0:
        raise ConfigError(
            f"model.scheduler.warmup_epochs={warmup!r} must be an integer >= 0 (0: no warm-up)."
        )
    if _is_int(max_epochs) and max_epochs > 0 and warmup >= max_epochs:
        # The cosine decay runs over the epochs after the warm-up: at least one is needed.
        shorter = "=0" if max_epochs == 1 else f" <= {max_epochs - 1}"
        raise ConfigError(
            f"model.scheduler.warmup_epochs={warmup} leaves no epoch for the cosine decay with "
            f"trainer.max_epochs={max_epochs}; set trainer.max_epochs >= {warmup + 1} or "
            f"model.scheduler.warmup_epochs{shorter}."
        )


def check_augment(augment: Any) -> None:
    """data.augment: known options with sensible values ({} = none)."""
    if augment is None:
        return
    if not isinstance(augment, Mapping):
        raise ConfigError(
            f"data.augment={augment!r} is not a set of options; pick a preset with "
            "data/augment=cxr or data/augment=none."
        )
    unknown = sorted(set(augment) - AUGMENT_KEYS)
    if unknown:
        raise ConfigError(
            f"data.augment.{unknown[0]} is not an augmentation option; use {sorted(AUGMENT_KEYS)}."
        )
    for key in ("rotation_degrees", "translate", "brightness", "contrast"):
        value = augment.get(key) or 0
        if not _is_number(value) or value < 0:
            raise ConfigError(f"data.augment.{key}={value!r} must be a number >= 0.")
    if (augment.get("translate") or 0) >= 1:
        raise ConfigError(f"data.augment.translate={augment['translate']} must be below 1.")


def check_preprocess(data: Mapping[str, Any]) -> None:
    """data.preprocess (none | clahe) and, for clahe, data.clahe.clip_limit and tile_grid."""
    _one_of("data.preprocess", data["preprocess"], PREPROCESS_NAMES)
    if data["preprocess"] != "clahe":
        return
    clip_limit, tile_grid = data["clahe"]["clip_limit"], data["clahe"]["tile_grid"]
    if not _is_number(clip_limit) or clip_limit <= 0:
        raise ConfigError(
            f"data.clahe.clip_limit={clip_limit!r} must be a number > 0 (the contrast limit per "
            "histogram bin relative to a flat histogram; 2.0 is usual for chest X-rays)."
        )
    image_size = data["image_size"]
    largest = image_size // 8 if _is_int(image_size) else None
    if not _is_int(tile_grid) or tile_grid < 1 or (largest and tile_grid > largest):
        raise ConfigError(
            f"data.clahe.tile_grid={tile_grid!r} must be an integer from 1 to "
            f"{largest or 'data.image_size / 8'} (tile_grid x tile_grid tiles of at least 8 px "
            "a side at data.image_size); 8 is usual."
        )


def check_phantom(phantom: Mapping[str, Any]) -> None:
    """data.phantom.* (the synthetic set's size and look)."""
    for key, minimum in (("num_normal", 1), ("num_tb", 1), ("image_size", 64), ("seed", 0)):
        _positive_int(f"data.phantom.{key}", phantom[key], minimum)
    _one_of("data.phantom.lesions", phantom["lesions"], LESION_MIXES)


def check_sources(entries: Any) -> None:
    """data.sources: a list of {source, root[, class_names, class_map, name]}."""
    for entry in entries or []:
        entry = dict(entry)
        unknown = set(entry) - set(SOURCE_KEYS)
        if unknown or "source" not in entry or "root" not in entry:
            raise ConfigError(
                f"data.sources entry {entry} must set source and root (and may set "
                f"class_names, class_map, name); unknown keys: {sorted(unknown)}."
            )
        # A generated set is a source of its own (data=phantom), never a data.sources entry.
        allowed = [name for name, s in DATA_SOURCES.items() if not s.synthetic]
        _one_of("data.sources entry source", entry["source"], allowed)


def check_data(data: Mapping[str, Any], arch: str = "alexnet") -> None:
    """data.*; val_size against the data's size where that is known without reading it."""
    source = data.get("source")
    _one_of("data.source", source, list(DATA_SOURCES))
    class_names = list(data.get("class_names") or [])
    if len(class_names) != 2:
        raise ConfigError(
            f"data.class_names={class_names} must name two folders: "
            "[negative, positive], e.g. [Normal, Tuberculosis]."
        )
    check_image_size(data.get("image_size"), arch)
    batch_size = data.get("batch_size")
    if not _is_int(batch_size) or batch_size < 1:
        raise ConfigError(f"data.batch_size={batch_size!r} must be an integer >= 1.")
    check_num_workers("data.num_workers", data["num_workers"])
    val_size = data.get("val_size")
    if not _is_number(val_size):
        raise ConfigError(
            f"data.val_size={val_size!r} is not a number; use a count like 600 or a fraction "
            "like 0.15."
        )
    if _is_int(val_size) and val_size < 2:
        raise ConfigError(
            f"data.val_size={val_size} is smaller than one validation image per class; use a "
            "count >= 2 or a fraction like 0.15."
        )
    if isinstance(val_size, float):
        resolve_val_count(val_size, 2)  # a fraction must lie in (0, 1)
    test_size = data.get("test_size")
    if test_size is not None:
        if not _is_number(test_size) or test_size <= 0:
            raise ConfigError(
                f"data.test_size={test_size!r} must be a count >= 2 or a fraction in (0, 1), "
                "or null for no held-out test split."
            )
        if isinstance(test_size, float):
            resolve_val_count(test_size, 2, key="data.test_size")
    num_folds, fold = data["num_folds"], data["fold"]
    if num_folds is not None:
        _positive_int("data.num_folds", num_folds, 2)
        if not _is_int(fold) or not 0 <= fold < num_folds:
            raise ConfigError(
                f"data.fold={fold!r} is not a fold of data.num_folds={num_folds}; use "
                f"0..{num_folds - 1}."
            )
    _one_of("data.on_bad_file", data["on_bad_file"], BAD_FILE_POLICIES)
    _one_of("data.on_leak", data["on_leak"], LEAK_POLICIES)
    distance = data["near_duplicate_distance"]
    if not _is_int(distance) or not 0 <= distance < PHASH_BITS:
        raise ConfigError(
            f"data.near_duplicate_distance={distance!r} must be an integer in 0..{PHASH_BITS - 1} "
            f"(differing bits of {PHASH_BITS}-bit perceptual hashes; 0 = identical hashes only; "
            "default 20)."
        )
    cache = data["cache_features"]
    if str(cache).lower() not in [str(m).lower() for m in CACHE_MODES]:
        raise ConfigError(
            f"data.cache_features={cache!r} is not allowed; use auto (cache when the backbone is "
            "frozen and there is no augmentation), true or false."
        )
    if not isinstance(data["cache_images"], bool):
        raise ConfigError(
            f"data.cache_images={data['cache_images']!r} must be true or false (true: decode "
            "every image once into a memory-mapped cache, for fine-tuning and augmentation)."
        )
    if data.get("cache_images") and not data.get("image_cache_dir"):
        raise ConfigError(
            "data.cache_images=true needs data.image_cache_dir, a folder for the cache, e.g. "
            "data/cache/images."
        )
    if not isinstance(data["allow_outside_paths"], bool):
        raise ConfigError(
            f"data.allow_outside_paths={data['allow_outside_paths']!r} must be true or false."
        )
    check_preprocess(data)
    check_augment(data.get("augment"))
    check_sources(data.get("sources"))
    phantom = data.get("phantom") or {}
    # The generator's settings, checked where the source reads them (data/sources.py keys).
    reads_phantom = "phantom" in DATA_SOURCES[source].keys
    if reads_phantom:
        check_phantom(phantom)
    if reads_phantom and not data.get("split_file") and not data.get("sources"):
        # The phantom set's size is known from the config: split it on paper, as setup() will.
        labels = [0] * int(phantom["num_normal"]) + [1] * int(phantom["num_tb"])
        stratified_split(labels, val_size, 0)


def data_folders(data: Mapping[str, Any]) -> list[Path]:
    """The folders the images of data.root (or of each data.sources entry) lie in, resolved."""
    entries = data.get("sources") or [{"source": data.get("source"), "root": data.get("root")}]
    return [source_folder(str(e.get("source")), str(e.get("root"))) for e in entries]


def check_split_file(data: Mapping[str, Any], calibration: Any = "none") -> None:
    """data.split_file, read before any image: every row inside data.root (or the data.sources
    roots; symlinks followed) unless data.allow_outside_paths, every split (train, val, test
    when it has rows) of both classes, and with calibration=temperature enough val images to
    fit on. Otherwise the run would train to the end and then fail, or train on files from
    anywhere; the same data checks follow in setup (bad files, leaks)."""
    split_file = data.get("split_file")
    if not split_file:
        return
    roots = None if data.get("allow_outside_paths") else data_folders(data)
    if data.get("sources"):
        named, fix = "the data.sources roots", "add the images' folder to data.sources"
    else:
        named, fix = "data.root", "pass data.root=<the folder that holds the images>"
    sides = read_split_sides(
        split_file,
        roots=roots,
        roots_name=named,
        outside_fix=f"{fix}, remove the row, or set data.allow_outside_paths=true if the file "
        "is trusted",
    )
    problem = split_class_problem(sides)
    if problem:
        raise ConfigError(
            f"data.split_file={split_file}: {problem}, but every split needs both classes (the "
            "loss weights them, the threshold and AUROC compare them); add rows of the missing "
            "class to that split, or make a new split with data.split_file=null."
        )
    if calibration == "temperature":
        from tb_lightning.stats.calibration import calibration_refusal  # numpy: only here

        val = sides["val"]
        refusal = calibration_refusal(
            len(val),
            len({s.label for s in val}),
            f"data.split_file={split_file}",
            "give it more val rows",
        )
        if refusal:
            raise ConfigError(refusal)


def check_calibration_split(data: Mapping[str, Any]) -> None:
    """calibration=temperature with a validation count known from the config alone (an integer
    data.val_size that the split uses): enough images to fit on. A fraction, a fold or a split
    file is counted once split (engine/training.py)."""
    val_size = data.get("val_size")
    if data.get("split_file") or data.get("num_folds") is not None or not _is_int(val_size):
        return
    from tb_lightning.stats.calibration import calibration_refusal  # numpy: only here

    # Both classes are assumed here: the split, stratified, is checked for them once made.
    refusal = calibration_refusal(val_size, 2, f"data.val_size={val_size}", "raise data.val_size")
    if refusal:
        raise ConfigError(refusal)


def check_num_workers(key: str, value: Any) -> None:
    if value != "auto" and (not _is_int(value) or value < 0):
        raise ConfigError(f"{key}={value!r} is not allowed; use auto or an integer >= 0.")


def check_trainer(trainer: Mapping[str, Any]) -> None:
    """trainer.accelerator (its name; a GPU for it: check_accelerator), devices, max_epochs,
    precision."""
    check_accelerator_name(trainer["accelerator"])
    devices = trainer["devices"]
    allowed = (
        devices == "auto"
        or (_is_int(devices) and (devices >= 1 or devices == -1))
        or (isinstance(devices, str) and devices.replace(",", "").strip().isdigit())
        or (isinstance(devices, Sequence) and not isinstance(devices, str) and len(devices) > 0)
    )
    if not allowed:
        raise ConfigError(
            f"trainer.devices={devices!r} is not allowed; use auto, -1 (all), a count >= 1 "
            "or a list of device indices."
        )
    max_epochs = trainer.get("max_epochs")
    epochs_ok = _is_int(max_epochs) and (max_epochs >= 1 or max_epochs == -1)
    if max_epochs is not None and not epochs_ok:
        raise ConfigError(
            f"trainer.max_epochs={max_epochs!r} must be an integer >= 1 (or -1 for no limit)."
        )
    precision = str(trainer["precision"])
    if precision not in PRECISIONS + PRECISION_ALIASES:
        raise ConfigError(
            f"trainer.precision={precision!r} is not one of {list(PRECISIONS)}; use e.g. "
            "32-true (CPU) or 16-mixed (GPU)."
        )


# --- keys nothing reads -----------------------------------------------------------------------


def _parameters(target: Any) -> set[str] | None:
    """The keyword arguments a callable (or a `_target_` path) takes; None when it takes any."""
    if isinstance(target, str):
        from hydra.utils import get_object

        try:
            target = get_object(target)
        except (ImportError, ValueError, AttributeError):
            return None  # Hydra reports a bad _target_ itself
    params = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params) - {"self"}


def _refuse_unknown(section: str, keys: Any, allowed: set[str] | Sequence[str] | None) -> None:
    if allowed is None:
        return
    allowed = set(allowed) | {"_target_", "_recursive_", "_partial_"}
    for key in keys:
        if key not in allowed:
            name = f"{section}.{key}" if section else key
            close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            hint = f"did you mean {section + '.' if section else ''}{close[0]}? " if close else ""
            raise ConfigError(
                f"{name} is not a setting here ({hint}the settings are listed in conf/); remove "
                f"+{name}=... from the command line."
            )


def check_top_level_keys(cfg: DictConfig) -> None:
    """Keys added with `+key=value` at the top level or under threshold (check_known_keys
    covers the classes' sections)."""
    _refuse_unknown("", cfg.keys(), TOP_LEVEL_KEYS)
    _refuse_unknown("threshold", (cfg.get("threshold") or {}).keys(), THRESHOLD_KEYS)


def check_known_keys(cfg: DictConfig) -> None:
    """Keys added with `+key=value` (Hydra's advice for a typo) that nothing would read: one
    sentence with the closest real key, instead of a TypeError from the class later. Imports
    the classes (data module, model, Trainer) to read their arguments."""
    check_top_level_keys(cfg)
    for section in ("data", "model", "trainer"):
        node = cfg.get(section) or {}
        _refuse_unknown(section, node.keys(), _parameters(node.get("_target_", "")))
    net = (cfg.get("model") or {}).get("net") or {}
    from tb_lightning.models.net import build_net

    _refuse_unknown("model.net", net.keys(), _parameters(build_net))


# --- one entry point each ---------------------------------------------------------------------


def check_config(cfg: DictConfig) -> None:
    """Check every value train() uses before anything is read or written."""
    check_train_values(cfg)
    # Then what needs the classes and torch imported.
    check_known_keys(cfg)
    net = cfg.model.get("net") or {}
    # timm/<name>: whether timm knows it and its model gives a map at the image size.
    check_backbone(net.get("arch", "alexnet"), net.get("image_size", 512))
    check_fused_option(cfg.model.optimizer)
    check_accelerator(cfg.trainer.accelerator)


def check_train_values(cfg: DictConfig) -> None:
    """train's checks that need no torch (config/callback.py runs them before it is imported)."""
    check_top_level_keys(cfg)
    check_finite(cfg)
    seed = cfg.get("seed")
    if seed is not None and not _is_int(seed):
        raise ConfigError(f"seed={seed!r} must be an integer, or null for an unseeded run.")
    check_trainer(cfg.trainer)
    check_model(cfg.model, cfg.trainer.get("max_epochs"))
    check_weight_averaging(cfg.get("callbacks"), cfg.trainer.get("max_epochs"))
    check_data(cfg.data, cfg.model.get("net", {}).get("arch", "alexnet"))
    check_policy(cfg.threshold.policy, cfg.threshold.target)
    _one_of("calibration", cfg.get("calibration") or "none", ("none", "temperature"))
    if cfg.get("calibration") == "temperature":
        check_calibration_split(cfg.data)
    # Last: it reads the split file (not its images), once every value above is known good.
    check_split_file(cfg.data, cfg.get("calibration"))
    if cfg.get("ckpt_path") not in (None, "", LAST):
        check_ckpt_path(cfg.ckpt_path)
    init_from = cfg.get("init_from")
    if init_from is not None and not Path(str(init_from)).expanduser().is_file():
        raise ConfigError(
            f"init_from={init_from} does not exist; pass the checkpoint whose weights the new "
            "run starts from, e.g. outputs/train/runs/<run>/checkpoints/best.ckpt."
        )


def _check_ckpt_path_set(cfg: DictConfig) -> None:
    if not cfg.get("ckpt_path"):
        raise ConfigError(
            "ckpt_path is not set; pass ckpt_path=outputs/train/runs/<run>/checkpoints/best.ckpt."
        )


def _check_allow_partial(cfg: DictConfig) -> None:
    """allow_partial (eval, predict, export): a k-fold ensemble with folds missing, or not."""
    value = cfg.allow_partial
    if not isinstance(value, bool):
        raise ConfigError(
            f"allow_partial={value!r} must be true or false (true: a k-fold multirun directory "
            "with folds missing is used as the ensemble of the folds there are)."
        )


def check_ckpt_exists(cfg: DictConfig) -> None:
    """ckpt_path (eval, predict, export) names a file or a multirun directory that exists; what
    is in it is checked when it is loaded (models/torch_file.py, trained/ensemble.py)."""
    ckpt_path = cfg.get("ckpt_path")
    if not Path(str(ckpt_path)).expanduser().exists():
        raise ConfigError(
            f"ckpt_path={ckpt_path} does not exist; pass a checkpoint written by "
            "tb_lightning.train, e.g. outputs/train/runs/<run>/checkpoints/best.ckpt, or a k-fold "
            "multirun directory."
        )


def check_eval_config(cfg: DictConfig) -> None:
    """python -m tb_lightning.eval: eval.*, threshold.value, the accelerator, a data source."""
    check_eval_values(cfg)
    check_accelerator(cfg.trainer.accelerator)


def check_eval_values(cfg: DictConfig) -> None:
    """eval's checks that need no torch (config/callback.py runs them before it is imported)."""
    _check_ckpt_path_set(cfg)
    check_finite(cfg)
    _check_allow_partial(cfg)
    check_accelerator_name(cfg.trainer.accelerator)
    check_threshold_override(cfg.threshold)
    if not isinstance(cfg.eval.allow_outside_paths, bool):
        raise ConfigError(
            f"eval.allow_outside_paths={cfg.eval.allow_outside_paths!r} must be true or false."
        )
    split = cfg.eval.get("split")
    if split is not None:
        _one_of("eval.split", split, SPLITS)
    if split == "all" and cfg.get("data") is None:
        raise ConfigError(
            "eval.split=all needs a data source: add data=folder data.root=<folder> (or "
            "data=tb_cxr / data=phantom)."
        )
    bootstrap = cfg.eval.get("bootstrap")
    if not _is_int(bootstrap) or bootstrap < 100:
        raise ConfigError(f"eval.bootstrap={bootstrap!r} must be an integer >= 100 (default 2000).")
    _positive_int("eval.batch_size", cfg.eval.get("batch_size"))
    check_num_workers("eval.num_workers", cfg.eval.num_workers)
    if not isinstance(cfg.eval.report_images, bool):
        raise ConfigError(
            f"eval.report_images={cfg.eval.report_images!r} must be true (report.html shows "
            "thumbnails and Grad-CAM maps of its error gallery) or false (no image in it)."
        )
    gallery = cfg.eval.report_gallery_size
    if not _is_int(gallery) or not 0 <= gallery <= MAX_GALLERY_SIZE:
        raise ConfigError(
            f"eval.report_gallery_size={gallery!r} must be an integer from 0 to "
            f"{MAX_GALLERY_SIZE}: the most images per group of report.html's error gallery "
            "(default 12)."
        )
    if cfg.get("data") is not None:
        _one_of("data.source", cfg.data.get("source"), list(DATA_SOURCES))
        _one_of("data.on_bad_file", cfg.data.on_bad_file, BAD_FILE_POLICIES)
    check_ckpt_exists(cfg)


def check_predict_config(cfg: DictConfig) -> None:
    """python -m tb_lightning.predict: input, batch_size, workers, threshold.value."""
    check_predict_values(cfg)
    check_accelerator(cfg.trainer.accelerator)


def check_predict_values(cfg: DictConfig) -> None:
    """predict's checks that need no torch (config/callback.py runs them before it is
    imported)."""
    _check_ckpt_path_set(cfg)
    check_finite(cfg)
    _check_allow_partial(cfg)
    if not cfg.get("input"):
        raise ConfigError("input is not set; pass input=<image file, folder or CSV of paths>.")
    check_accelerator_name(cfg.trainer.accelerator)
    check_threshold_override(cfg.threshold)
    _positive_int("batch_size", cfg.get("batch_size"))
    check_num_workers("num_workers", cfg.num_workers)
    if cfg.get("saliency"):
        require_extra("saliency", "predict saliency=true (Grad-CAM)")
    check_ckpt_exists(cfg)
    if not Path(str(cfg.input)).expanduser().exists():
        raise ConfigError(
            f"input={cfg.input} does not exist; pass an image file, a folder of images or a CSV "
            "with a `path` column."
        )


def check_export_config(cfg: DictConfig) -> None:
    """python -m tb_lightning.export: format, check_images, threshold.value (no torch needed)."""
    _check_ckpt_path_set(cfg)
    check_finite(cfg)
    _check_allow_partial(cfg)
    _one_of("format", cfg.get("format"), FORMATS)
    if cfg.get("format") == "onnx":
        require_extra("export", "export format=onnx")
    _positive_int("check_images", cfg.get("check_images"))
    check_threshold_override(cfg.threshold)
    check_ckpt_exists(cfg)


# The checks of values of each task (its config's name), which need no torch: config/callback.py
# runs them on the composed config before torch is imported and any folder is made.
VALUE_CHECKS = {
    "train": check_train_values,
    "eval": check_eval_values,
    "predict": check_predict_values,
    "export": check_export_config,
}


def runs_dir(cfg: DictConfig) -> Path:
    """Where `ckpt_path=last` looks: outputs/<task>/runs."""
    return Path(cfg.paths.log_dir) / cfg.task_name / "runs"
