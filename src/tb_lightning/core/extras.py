"""Optional extras: export (ONNX), saliency (captum), sweeps (Optuna, submitit/SLURM), mlflow
(logger=mlflow), timm (model.net.arch=timm/<name>) and dicom (reading DICOM images) are
installed on demand
(`pip install -e '.[export]'`; `make install` installs all of them). A feature whose extra is
missing says so in one sentence with the command, instead of an ImportError."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

from tb_lightning.core.errors import ConfigError

# extra -> the modules it provides (pyproject.toml [project.optional-dependencies]).
EXTRAS = {
    "export": ("onnx", "onnxscript", "onnxruntime"),
    "saliency": ("captum",),
    "sweeps": ("hydra_plugins.hydra_optuna_sweeper", "hydra_plugins.hydra_submitit_launcher"),
    "mlflow": ("mlflow",),
    "timm": ("timm",),
    # pydicom reads every DICOM file; the pylibjpeg plugins decode compressed pixel data, and
    # their absence is said per file, for the transfer syntax that needs them (data/dicom.py).
    "dicom": ("pydicom",),
}


def missing(extra: str) -> list[str]:
    """The modules of `extra` that cannot be imported here."""
    absent = []
    for module in EXTRAS[extra]:
        try:
            if importlib.util.find_spec(module) is None:
                absent.append(module)
        except ModuleNotFoundError:  # a parent package is absent too
            absent.append(module)
    return absent


def require(extra: str, feature: str) -> None:
    """Raise one sentence naming the feature, the extra and the pip command when it is absent."""
    absent = missing(extra)
    if absent:
        raise ConfigError(
            f"{feature} needs the optional '{extra}' packages, which are not installed "
            f"({', '.join(absent)}); install them with: pip install -e '.[{extra}]' in the "
            "checkout (make install installs every extra)."
        )


def require_logger_extras(loggers: Mapping[str, Any] | None) -> None:
    """logger=mlflow without the 'mlflow' extra: its sentence before any data is read (the
    logger itself is made after the data scan)."""
    for entry in (loggers or {}).values():
        target = str((entry or {}).get("_target_", ""))
        if "mlflow" in target.lower():
            require("mlflow", "logger=mlflow")
