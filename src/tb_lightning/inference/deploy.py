"""Export a trained classifier (or a k-fold ensemble of them) as one self-contained file (ONNX or
TorchScript) plus a sidecar JSON that documents the preprocessing, the class names and the
operating threshold; then check that the exported file reproduces the Lightning module's outputs."""

from __future__ import annotations

import io
import json
import logging
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tb_lightning.core.artefacts import data_root, image_path, relative_path
from tb_lightning.core.atomic import (
    atomic_target,
    atomic_write_json,
    atomic_write_with,
)
from tb_lightning.core.choices import FORMATS
from tb_lightning.core.labels import CLASS_NAMES
from tb_lightning.core.provenance import split_fingerprint
from tb_lightning.data.preprocess import describe_preprocess
from tb_lightning.data.sources import synthetic_sources
from tb_lightning.data.split import read_split_csv
from tb_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transform, load_image
from tb_lightning.stats.metrics import CALIBRATION, RANKING, RATES
from tb_lightning.trained.ensemble_model import COMBINATION, EnsembleModel
from tb_lightning.trained.model import TrainedModel

log = logging.getLogger(__name__)

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


def exportable(loaded: TrainedModel) -> ProbabilityModel:
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


def ensemble_record(loaded: TrainedModel) -> dict[str, Any] | None:
    """model.json's `ensemble`: the member checkpoints inside the file (relative to the
    multirun folder that `checkpoint` names), how they combine, and the k-fold run they are the
    folds of (with the folds an allow_partial=true export lacks)."""
    if not loaded.member_checkpoints:
        return None
    folds = loaded.ensemble_folds or {}
    return {
        "members": [relative_path(m, loaded.checkpoint_path) for m in loaded.member_checkpoints],
        "combination": f"{COMBINATION} (the members' logits averaged, then the sigmoid)",
        "num_folds": folds.get("num_folds"),
        "seeds": folds.get("seeds"),
        "missing_folds": folds.get("missing_folds", []),
    }


# The figures model.json gives of each split it was chosen (and tested) on, as metrics.json has
# them under <split>.overall; the loss is metrics.json's <split>/loss.
SPLIT_FIGURES = ("images", "counts", "threshold", *RANKING, *RATES, *CALIBRATION)


def weights_source(weights: Any) -> str:
    """model.net.weights in words: where the backbone's weights came from before training."""
    if weights is None:
        return "random (model.net.weights=null: no pretrained features)"
    if str(weights) == "imagenet":
        return "imagenet (torchvision's ImageNet weights)"
    return f"file {Path(str(weights)).name}"  # the file's name only: no path of this machine


def run_metrics(run_dir: Path) -> dict[str, Any] | None:
    """A training run's metrics.json, or None."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) else None


def model_record(loaded: TrainedModel) -> dict[str, Any]:
    """model.json's `model`: what the network is, what it started from, and the epoch and step
    (Lightning's counts, the epoch from 0) of the checkpoint, or of each ensemble member."""
    net = loaded.net or {}
    models = loaded.members or [loaded]
    metrics = run_metrics(loaded.run_dir) or {}
    init_from = metrics.get("init_from")
    return {
        "architecture": net.get("arch", "alexnet"),
        "weights": weights_source(net.get("weights", "imagenet")),
        # A run started from another run's weights (init_from): that checkpoint's run and name.
        "init_from": "/".join(Path(str(init_from)).parts[-3:]) if init_from else None,
        "features_frozen": bool(net.get("freeze_features", True)),
        "head": {k: net.get(k) for k in ("hidden_dim", "dropout", "pool_size")},
        "image_size": loaded.image_size,
        "preprocess": describe_preprocess(loaded.preprocess),
        # model.tta: inside the exported graph already (the mean logit of image and mirror).
        "tta": sorted({str(m.model.net.tta) for m in models if m.model.net.tta}) or None,
        "epoch": [m.epoch for m in models] if loaded.members else loaded.epoch,
        "step": [m.global_step for m in models] if loaded.members else loaded.global_step,
    }


def training_data(loaded: TrainedModel) -> dict[str, Any] | None:
    """model.json's `training_data`: the fingerprint of the training run's split.csv
    (core/provenance.py); an ensemble's members share their images, each with its own split."""
    runs = [m.run_dir for m in loaded.members] if loaded.members else [loaded.run_dir]
    prints = [split_fingerprint(run / "split.csv") for run in runs]
    if any(p is None for p in prints):
        return None
    what = data_sources(runs[0])
    if len(prints) == 1:
        return {**what, **prints[0]}  # type: ignore[dict-item]
    images = {p["sha256"] for p in prints}  # type: ignore[index]
    return {
        **what,
        **prints[0],  # type: ignore[dict-item]
        "source": f"split.csv of each of the {len(prints)} members",
        "splits": [p["splits"] for p in prints],  # type: ignore[index]
        "sha256": images.pop() if len(images) == 1 else None,
        "split_sha256": [p["split_sha256"] for p in prints],  # type: ignore[index]
    }


def data_sources(run: Path) -> dict[str, Any]:
    """What the images were, from the run's data_report.json: images per source (names, never
    the folders), and a plain warning when they were the synthetic phantoms, so that a deployed
    file cannot pass for a TB detector it is not."""
    try:
        report = json.loads((run / "data_report.json").read_text())
        per_source = dict(report["counts"]["per_source"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    what: dict[str, Any] = {"images_per_source": per_source}
    if synthetic_sources() & set(per_source):
        what["synthetic"] = (
            "trained on synthetic phantom images (not medical data): it shows the pipeline "
            "works, and is no evidence of detecting TB on radiographs"
        )
    return what


def split_figures(metrics: dict[str, Any], split: str) -> dict[str, Any] | None:
    """The figures of one split of a training run's metrics.json (SPLIT_FIGURES), or None."""
    overall = (metrics.get(split) or {}).get("overall")
    if not overall:
        return None
    figures = {name: overall.get(name) for name in SPLIT_FIGURES}
    figures["auroc_ci"] = (overall.get("ci") or {}).get("auroc")
    figures["loss"] = metrics.get(f"{split}/loss")
    return figures


def chosen_on(loaded: TrainedModel) -> dict[str, Any]:
    """model.json's `chosen_on` (the validation figures the checkpoint was chosen on, or an
    ensemble's out-of-fold ones) and `test` (the held-out test split's, when the run kept one)."""
    if loaded.out_of_fold:
        return {"chosen_on": loaded.out_of_fold, "test": None}
    metrics = run_metrics(loaded.run_dir)
    # The run's figures are those of the checkpoint it reported (best.ckpt); another one
    # (last.ckpt of a run that kept a better epoch) has none.
    if (
        metrics is None
        or Path(str(metrics.get("checkpoint"))).name != loaded.checkpoint_path.name
        or metrics.get("step", loaded.global_step) != loaded.global_step
    ):
        return {"chosen_on": None, "test": None}
    val = split_figures(metrics, "val")
    if val is not None:
        threshold_source = (metrics.get("threshold") or {}).get("source")
        val = {"split": "validation", "description": threshold_source, **val}
    return {"chosen_on": val, "test": split_figures(metrics, "test")}


def check_images(loaded: TrainedModel, count: int) -> tuple[torch.Tensor, list[str]]:
    """A few preprocessed val images of the training run, named relative to their common
    folder (no path of the training machine), or seeded noise when none is found."""
    split_csv = loaded.run_dir / "split.csv"
    if split_csv.is_file():
        _, val = read_split_csv(split_csv)
        paths = [s.path for s in val[:count]]
        transform = build_transform(loaded.image_size, loaded.preprocess)
        root = data_root(paths)
        names = [image_path(p, root) for p in paths]
        return torch.stack([transform(load_image(p)) for p in paths]), names
    log.warning("No split.csv beside the checkpoint; checking the export on random inputs.")
    generator = torch.Generator().manual_seed(0)
    size = loaded.image_size
    return torch.randn(count, 3, size, size, generator=generator), ["random"] * count


def export_file(model: nn.Module, example: torch.Tensor, fmt: str, path: Path) -> None:
    """Write the model to path; the batch dimension stays dynamic.

    Both exporters record where each operation's Python source lies (ONNX: a stack trace per
    node; TorchScript: a debug_pkl beside each module's code), absolute paths of this machine
    that are no part of the model: they are left out (nothing written for deployment holds one).
    """
    if fmt == "onnx":
        # The exporter logs every optimisation pass at INFO; only its warnings matter here.
        for name in ("torch.onnx", "onnxscript", "onnx_ir"):
            logging.getLogger(name).setLevel(logging.WARNING)
        program = torch.onnx.export(
            model,
            (example,),
            input_names=["image"],
            output_names=["p_tb"],
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
            dynamo=True,
            verbose=False,
        )
        import onnx_ir  # installed with torch's ONNX exporter

        for node in onnx_ir.traversal.RecursiveGraphIterator(program.model.graph):
            node.metadata_props.pop("pkg.torch.onnx.stack_trace", None)
        with atomic_target(path) as target:
            # external_data=False: one file, the weights inside the .onnx.
            program.save(str(target), external_data=False)
    else:
        # torch 2.14 marks TorchScript deprecated in favour of torch.export, but it is still the
        # format C++ (libtorch) deployments load; ONNX is the forward-looking choice.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated")
            traced = torch.jit.trace(model, example)
            saved = io.BytesIO()
            torch.jit.save(traced, saved)
        atomic_write_with(path, lambda f: f.write(without_debug_info(saved.getvalue())))


def without_debug_info(archive: bytes) -> bytes:
    """A TorchScript archive without its `.debug_pkl` entries (the source ranges, with the
    files' absolute paths, that only error messages use); every other entry as it was."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            if not info.filename.endswith(".debug_pkl"):
                target.writestr(info, source.read(info))
    return out.getvalue()


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
    loaded: TrainedModel,
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
        # Relative to this folder (an ensemble's: its multirun folder); core/artefacts.py.
        "checkpoint": relative_path(loaded.checkpoint_path, output_dir),
        # What the model is and what it was trained and chosen on (see model_record etc.).
        "model": model_record(loaded),
        "training_data": training_data(loaded),
        **chosen_on(loaded),
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
            # Relative to the training run's data root, which is not named here.
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
