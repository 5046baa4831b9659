"""Start-up checks of the composed config: wrong values fail before any data is read.

One function, `check_config`, called first thing in train(). Each failure is one sentence naming
the key, the value and what is allowed. The classes that take these values check them again when
they are built from Python directly; this module exists so that a run fails in the first second,
not after scanning thousands of images or loading weights. Typos in override keys are already
refused by Hydra's struct mode ("Key 'dropuot' is not in struct").
"""

from __future__ import annotations

import difflib
import inspect
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tb_lightning.data.datamodule import SOURCES, resolve_num_workers
from tb_lightning.data.split import resolve_val_count, stratified_split
from tb_lightning.errors import ConfigError, WeightsError
from tb_lightning.models.backbones import ARCHS, MIN_IMAGE_SIZE
from tb_lightning.resume import LAST, check_ckpt_path
from tb_lightning.task import check_accelerator

# Lightning 2.x precision names (the short aliases "32", "16", "bf16" included).
PRECISIONS = ("64-true", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true")
PRECISION_ALIASES = ("64", "32", "16", "bf16", "transformer-engine")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_model(model: Mapping[str, Any]) -> None:
    """model.optimizer.*, model.net.*, model.threshold."""
    optimizer, net = model.get("optimizer") or {}, model.get("net") or {}
    lr = optimizer.get("lr")
    if not _is_number(lr) or lr <= 0:
        raise ConfigError(f"model.optimizer.lr={lr!r} must be a number > 0, e.g. 1e-4.")
    weight_decay = optimizer.get("weight_decay", 0.0)
    if not _is_number(weight_decay) or weight_decay < 0:
        raise ConfigError(
            f"model.optimizer.weight_decay={weight_decay!r} must be a number >= 0 (0 disables it)."
        )
    dropout = net.get("dropout", 0.5)
    if not _is_number(dropout) or not 0 <= dropout < 1:
        raise ConfigError(f"model.net.dropout={dropout!r} must be a number in [0, 1).")
    hidden_dim = net.get("hidden_dim", 510)
    if not _is_int(hidden_dim) or hidden_dim < 1:
        raise ConfigError(f"model.net.hidden_dim={hidden_dim!r} must be an integer >= 1.")
    threshold = model.get("threshold", 0.5)
    if not _is_number(threshold) or not 0 < threshold < 1:
        raise ConfigError(f"model.threshold={threshold!r} must be a number in (0, 1).")
    weights = net.get("weights")
    if weights not in (None, "imagenet") and not Path(str(weights)).expanduser().is_file():
        raise WeightsError(
            f"model.net.weights={weights} does not exist; pass the path of a .pth state "
            "dict, imagenet, or null."
        )


def check_data(data: Mapping[str, Any], arch: str = "alexnet") -> None:
    """data.*; val_size against the data's size where that is known without reading it."""
    source = data.get("source")
    if source not in SOURCES:
        raise ConfigError(f"data.source={source!r} is not one of {list(SOURCES)}.")
    image_size = data.get("image_size")
    min_size = MIN_IMAGE_SIZE.get(arch, max(MIN_IMAGE_SIZE.values()))
    if not _is_int(image_size) or image_size < min_size:
        raise ConfigError(
            f"data.image_size={image_size!r} is too small for {arch}; use an integer >= "
            f"{min_size} (the seed uses 512)."
        )
    batch_size = data.get("batch_size")
    if not _is_int(batch_size) or batch_size < 1:
        raise ConfigError(f"data.batch_size={batch_size!r} must be an integer >= 1.")
    resolve_num_workers(data.get("num_workers", 0))
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
    phantom = data.get("phantom") or {}
    if source == "phantom" and not data.get("split_file"):
        # The phantom set's size is known from the config: split it on paper, as setup() will.
        labels = [0] * int(phantom.get("num_normal", 0)) + [1] * int(phantom.get("num_tb", 0))
        stratified_split(labels, val_size, 0)


def check_trainer(trainer: Mapping[str, Any]) -> None:
    """trainer.accelerator, devices, max_epochs, precision."""
    check_accelerator(trainer.get("accelerator", "auto"))
    devices = trainer.get("devices", "auto")
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
    precision = str(trainer.get("precision", "32-true"))
    if precision not in PRECISIONS + PRECISION_ALIASES:
        raise ConfigError(
            f"trainer.precision={precision!r} is not one of {list(PRECISIONS)}; use e.g. "
            "32-true (CPU) or 16-mixed (GPU)."
        )


# The top level of conf/train.yaml (experiment/debug/sweep presets merge into these).
TOP_LEVEL_KEYS = (
    "task_name",
    "seed",
    "ckpt_path",
    "init_from",
    "optimized_metric",
    "threshold",
    "data",
    "model",
    "callbacks",
    "logger",
    "trainer",
    "paths",
)
THRESHOLD_KEYS = ("policy", "target")


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


def check_known_keys(cfg: DictConfig) -> None:
    """Keys added with `+key=value` (Hydra's advice for a typo) that nothing would read: one
    sentence with the closest real key, instead of a TypeError from the class later."""
    _refuse_unknown("", cfg.keys(), TOP_LEVEL_KEYS)
    _refuse_unknown("threshold", (cfg.get("threshold") or {}).keys(), THRESHOLD_KEYS)
    for section in ("data", "model", "trainer"):
        node = cfg.get(section) or {}
        _refuse_unknown(section, node.keys(), _parameters(node.get("_target_", "")))
    net = (cfg.get("model") or {}).get("net") or {}
    from tb_lightning.models.net import build_net

    _refuse_unknown("model.net", net.keys(), _parameters(build_net))


def check_config(cfg: DictConfig) -> None:
    """Check every value train() uses before anything is read or written."""
    check_known_keys(cfg)
    seed = cfg.get("seed")
    if seed is not None and not _is_int(seed):
        raise ConfigError(f"seed={seed!r} must be an integer, or null for an unseeded run.")
    check_trainer(cfg.trainer)
    check_model(cfg.model)
    arch = cfg.model.get("net", {}).get("arch", "alexnet")
    if arch not in ARCHS:
        raise ConfigError(f"model.net.arch={arch!r} is not supported; use one of {list(ARCHS)}.")
    check_data(cfg.data, arch)
    if cfg.get("ckpt_path") not in (None, "", LAST):
        check_ckpt_path(cfg.ckpt_path)
    init_from = cfg.get("init_from")
    if init_from is not None and not Path(str(init_from)).expanduser().is_file():
        raise ConfigError(
            f"init_from={init_from} does not exist; pass the checkpoint whose weights the new "
            "run starts from, e.g. outputs/train/runs/<run>/checkpoints/best.ckpt."
        )


def runs_dir(cfg: DictConfig) -> Path:
    """Where `ckpt_path=last` looks: outputs/<task>/runs."""
    return Path(cfg.paths.log_dir) / cfg.get("task_name", "train") / "runs"
