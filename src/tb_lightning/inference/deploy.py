"""Export a trained classifier (or a k-fold ensemble of them) as one self-contained file (ONNX or
TorchScript) plus a sidecar JSON that documents the preprocessing, the class names and the
operating threshold; then check that the exported file reproduces the Lightning module's outputs."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tb_lightning.core.atomic import (
    atomic_target,
    atomic_write_json,
    atomic_write_with,
)
from tb_lightning.core.labels import CLASS_NAMES
from tb_lightning.data.split import read_split_csv
from tb_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transform, load_image
from tb_lightning.inference.checkpoint import LoadedModel
from tb_lightning.inference.ensemble_model import COMBINATION, EnsembleModel

log = logging.getLogger(__name__)

FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}
# float32 on CPU: the exported graph and the module differ only by operator rounding.
TOLERANCE = 1e-5


class TemperedNet(nn.Module):
    """A classifier's network alone (no Lightning module, no metrics): normalised images
    (N, 3, S, S) -> TB logits (N,) divided by its calibration temperature (1 without one)."""

    def __init__(self, net: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images) / self.temperature


class ProbabilityModel(nn.Module):
    """The logits of a TemperedNet or an ensemble of them, then the sigmoid: TB probability (N,)."""

    def __init__(self, logits: nn.Module) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(images))


def exportable(loaded: LoadedModel) -> ProbabilityModel:
    """The loaded model as the exported file computes it: a checkpoint's network, or an
    ensemble's members' networks and their mean logit (with the ensemble's temperature)."""
    model = loaded.model
    if isinstance(model, EnsembleModel):
        members = [TemperedNet(m.net, float(m.temperature)) for m in model.members]
        return ProbabilityModel(EnsembleModel(members, float(model.temperature)))
    return ProbabilityModel(TemperedNet(model.net, float(model.temperature)))


def clahe_steps(preprocess: dict[str, Any] | None) -> list[str]:
    """model.json's words for the CLAHE step, as data/preprocess.py's CLAHE does it."""
    if not preprocess:
        return []
    grid = preprocess["tile_grid"]
    return [
        "contrast-limited adaptive histogram equalisation of the gray image (the channels' "
        f"rounded mean): OpenCV cv2.createCLAHE(clipLimit={preprocess['clip_limit']}, "
        f"tileGridSize=({grid}, {grid})).apply, the result repeated to 3 channels"
    ]


def ensemble_record(loaded: LoadedModel) -> dict[str, Any] | None:
    """model.json's `ensemble`: the member checkpoints inside the file, how they combine, and
    the k-fold run they are the folds of (with the folds an allow_partial=true export lacks)."""
    if not loaded.member_checkpoints:
        return None
    folds = loaded.ensemble_folds or {}
    return {
        "members": [str(path) for path in loaded.member_checkpoints],
        "combination": f"{COMBINATION} (the members' logits averaged, then the sigmoid)",
        "num_folds": folds.get("num_folds"),
        "seeds": folds.get("seeds"),
        "missing_folds": folds.get("missing_folds", []),
    }


def check_images(loaded: LoadedModel, count: int) -> tuple[torch.Tensor, list[str]]:
    """A few preprocessed val images of the training run, or seeded noise when none is found."""
    split_csv = loaded.run_dir / "split.csv"
    if split_csv.is_file():
        _, val = read_split_csv(split_csv)
        paths = [s.path for s in val[:count]]
        transform = build_transform(loaded.image_size, loaded.preprocess)
        return torch.stack([transform(load_image(p)) for p in paths]), paths
    log.warning("No split.csv beside the checkpoint; checking the export on random inputs.")
    generator = torch.Generator().manual_seed(0)
    size = loaded.image_size
    return torch.randn(count, 3, size, size, generator=generator), ["random"] * count


def export_file(model: nn.Module, example: torch.Tensor, fmt: str, path: Path) -> None:
    """Write the model to path; the batch dimension stays dynamic."""
    if fmt == "onnx":
        # The exporter logs every optimisation pass at INFO; only its warnings matter here.
        for name in ("torch.onnx", "onnxscript", "onnx_ir"):
            logging.getLogger(name).setLevel(logging.WARNING)
        with atomic_target(path) as target:
            torch.onnx.export(
                model,
                (example,),
                str(target),
                input_names=["image"],
                output_names=["p_tb"],
                dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
                external_data=False,  # one file: the weights inside the .onnx
                dynamo=True,
                verbose=False,
            )
    else:
        # torch 2.14 marks TorchScript deprecated in favour of torch.export, but it is still the
        # format C++ (libtorch) deployments load; ONNX is the forward-looking choice.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated")
            traced = torch.jit.trace(model, example)
            atomic_write_with(path, lambda f: torch.jit.save(traced, f))


def run_exported(fmt: str, path: Path, images: torch.Tensor) -> np.ndarray:
    """Load the file back on its own (no tb_lightning code) and run it."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(["p_tb"], {"image": images.numpy()})[0]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated")
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        return module(images).numpy()


def export_model(
    loaded: LoadedModel,
    fmt: str,
    output_dir: Path,
    threshold: float,
    threshold_source: str,
    num_check_images: int = 4,
) -> dict[str, Any]:
    """Write model.onnx|model.pt and model.json into output_dir; return the sidecar's content."""
    # fmt and num_check_images were checked with the config (config/checks.py).
    output_dir.mkdir(parents=True, exist_ok=True)
    model = exportable(loaded).cpu().eval()
    images, image_paths = check_images(loaded, num_check_images)
    path = output_dir / FORMATS[fmt]
    export_file(model, images[:1], fmt, path)

    # The reference: the Lightning module itself, as eval and predict run it.
    with torch.inference_mode():
        expected = torch.sigmoid(loaded.model.cpu()(images)).numpy()
    got = run_exported(fmt, path, images)
    max_diff = float(np.max(np.abs(got - expected)))
    if got.shape != expected.shape or not max_diff <= TOLERANCE:
        raise RuntimeError(
            f"The exported {fmt} model differs from the Lightning module by {max_diff:.3g} "
            f"(tolerance {TOLERANCE}) on {len(images)} images; the export is not usable."
        )
    size = loaded.image_size
    sidecar = {
        "format": fmt,
        "model_file": path.name,
        "checkpoint": str(loaded.checkpoint_path),
        "input": {
            "name": "image",
            "shape": ["batch", 3, size, size],
            "dtype": "float32",
            "layout": "NCHW, RGB channels",
        },
        "preprocessing": {
            "steps": [
                "decode the image as 8-bit RGB (grayscale repeated to 3 channels)",
                f"resize to {size}x{size} (bilinear, antialiased; aspect ratio not kept)",
                *clahe_steps(loaded.preprocess),
                "scale to [0, 1] (divide by 255)",
                "normalise each channel: (x - mean) / std",
            ],
            # null, or CLAHE's settings (data/preprocess.py): part of the model's input.
            "preprocess": loaded.preprocess,
            "image_size": size,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
        },
        "output": {"name": "p_tb", "shape": ["batch"], "meaning": "probability of Tuberculosis"},
        # Inside the exported graph already (logits / T before the sigmoid); for the record.
        "calibration": loaded.calibration,
        "ensemble": ensemble_record(loaded),
        "class_names": list(CLASS_NAMES),
        "threshold": threshold,
        "threshold_source": threshold_source,
        "decision_rule": f"{CLASS_NAMES[1]} when p_tb >= threshold, else {CLASS_NAMES[0]}",
        "check": {
            "images": image_paths,
            "max_abs_difference": max_diff,
            "tolerance": TOLERANCE,
        },
    }
    atomic_write_json(output_dir / "model.json", sidecar)
    log.info(
        "Exported %s -> %s (+ model.json); matches the Lightning module on %d images "
        "(max |difference| %.2g)",
        loaded.checkpoint_path,
        path,
        len(images),
        max_diff,
    )
    return sidecar
