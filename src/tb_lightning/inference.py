"""Rebuild a trained classifier from its checkpoint and run it over images in batches."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from torch.utils.data import DataLoader, Dataset

from tb_lightning.data.transforms import BadImageError, build_transform, load_image
from tb_lightning.errors import ConfigError, UserError
from tb_lightning.models.module import TBClassifier, load_checkpoint
from tb_lightning.models.torch_file import describe_key_mismatch
from tb_lightning.signals import raise_if_stopped

log = logging.getLogger(__name__)

# Where training stores the operating threshold chosen on the validation split.
THRESHOLD_KEY = "operating_threshold"
# How that choice is described wherever a figure at it is reported (the reports test for it).
CHOSEN_ON_VAL = "chosen on the validation split"
# One batch size for every pass that reports numbers (train's final report, eval), so that the
# same checkpoint gives bit-identical probabilities in both.
INFERENCE_BATCH_SIZE = 32


def describe_threshold_choice(choice: dict[str, Any]) -> str:
    """`chosen on the validation split (60 images) by threshold.policy=youden`, for reports."""
    target = f", target {choice['target']}" if choice.get("policy") == "sensitivity" else ""
    images = f" ({choice['val_images']} images)" if choice.get("val_images") else ""
    return f"{CHOSEN_ON_VAL}{images} by threshold.policy={choice['policy']}{target}"


@dataclass
class LoadedModel:
    """A classifier in eval mode with what its checkpoint says about it."""

    model: TBClassifier
    checkpoint_path: Path
    image_size: int
    stored_threshold: dict[str, Any] | None  # train.py's threshold choice, if any
    hparams_threshold: float
    pos_weight: float

    @property
    def run_dir(self) -> Path:
        """The training run directory (checkpoints/<name>.ckpt lives one level below it)."""
        return self.checkpoint_path.parent.parent


def load_model(ckpt_path: str | Path | None) -> LoadedModel:
    """The TBClassifier of a checkpoint written by tb_lightning.train, ready for inference."""
    if not ckpt_path:
        raise ConfigError(
            "ckpt_path is not set; pass ckpt_path=outputs/train/runs/<run>/checkpoints/best.ckpt."
        )
    path = Path(ckpt_path).expanduser().resolve()
    checkpoint = load_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters")
    # load_checkpoint made sure of state_dict and hyper_parameters; these say what to build.
    absent = [k for k in ("net", "optimizer", "threshold") if k not in hparams]
    if absent:
        raise UserError(
            f"Checkpoint {path} holds no tb_lightning model (its hyper_parameters lack "
            f"{', '.join(absent)}); pass a checkpoints/best.ckpt written by tb_lightning.train."
        )
    # The checkpoint holds every weight: never look for (or download) ImageNet weights here.
    net = {**hparams["net"], "weights": None}
    # build_net warns that weights=null means random features; here the checkpoint's weights
    # replace them at once, so that warning would mislead.
    net_log = logging.getLogger("tb_lightning.models.net")
    level = net_log.level
    net_log.setLevel(logging.ERROR)
    try:
        model = TBClassifier(
            net=net, optimizer=hparams["optimizer"], threshold=hparams["threshold"]
        )
    finally:
        net_log.setLevel(level)
    # A checkpoint of another architecture or head size (or with edited hyper_parameters) would
    # fail in load_state_dict with a long traceback: say which keys do not fit instead.
    mismatch = describe_key_mismatch(model.state_dict(), checkpoint["state_dict"])
    if mismatch:
        raise UserError(
            f"Checkpoint {path} does not fit the network its hyper_parameters describe "
            f"(model.net.arch={net.get('arch', 'alexnet')}, image_size={net.get('image_size')}): "
            f"its state_dict {mismatch}; pass a checkpoint written by tb_lightning.train, with "
            "its hyper_parameters unedited."
        )
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    return LoadedModel(
        model=model,
        checkpoint_path=path,
        image_size=int(net["image_size"]),
        stored_threshold=checkpoint.get(THRESHOLD_KEY),
        hparams_threshold=float(hparams["threshold"]),
        pos_weight=float(model.pos_weight),
    )


def resolve_threshold(loaded: LoadedModel, override: float | None) -> tuple[float, str]:
    """(threshold, where it came from): threshold.value, else the stored choice, else 0.5."""
    if override is not None:
        if isinstance(override, bool) or not isinstance(override, int | float):
            raise ConfigError(f"threshold.value={override!r} must be a number in (0, 1).")
        if not 0 < override < 1:
            raise ConfigError(f"threshold.value={override} must be in (0, 1), e.g. 0.3.")
        return float(override), "threshold.value (command line)"
    stored = loaded.stored_threshold
    if stored:
        return float(stored["value"]), describe_threshold_choice(stored)
    log.warning(
        "Checkpoint %s stores no operating threshold (only best.ckpt gets one, at the end of "
        "training); using model.threshold=%s. Set one with threshold.value=...",
        loaded.checkpoint_path,
        loaded.hparams_threshold,
    )
    return loaded.hparams_threshold, "model.threshold (no threshold stored in the checkpoint)"


class TolerantImageDataset(Dataset):
    """Yields (image, ok, reason): a bad file gives a zero image, ok=False and why.

    load_image applies the scan's checks (transforms.check_image_file: huge, tiny, not an image,
    unreadable, before decoding; truncated, when decoding), so eval and predict refuse exactly
    what training's scan refuses, and one bad file never stops the others.
    """

    def __init__(self, paths: Sequence[str], image_size: int) -> None:
        self.paths = list(paths)
        self.image_size = image_size
        self.transform = build_transform(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, bool, str]:
        path = self.paths[index]
        try:
            return self.transform(load_image(path)), True, ""
        except BadImageError as err:
            # The reason alone: skipped.csv and the logs show the path beside it.
            return torch.zeros(3, self.image_size, self.image_size), False, err.problem


def pick_device(accelerator: str) -> torch.device:
    """trainer.accelerator -> a torch device (auto: the GPU when there is one)."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass
class Predictions:
    logits: np.ndarray  # (n,), NaN where the image could not be read
    readable: np.ndarray  # (n,) bool
    reasons: list[str]  # "" for readable images

    @property
    def probs(self) -> np.ndarray:
        return probabilities(self.logits)


def probabilities(logits: np.ndarray) -> np.ndarray:
    """TB probabilities as the module computes them (float32 sigmoid), held as float64."""
    return torch.sigmoid(torch.from_numpy(np.asarray(logits, dtype=np.float32))).double().numpy()


def predict_images(
    model: torch.nn.Module,
    paths: Sequence[str],
    image_size: int,
    batch_size: int = INFERENCE_BATCH_SIZE,
    num_workers: int = 0,
    device: torch.device | None = None,
    progress: bool = True,
    description: str = "Predicting",
) -> Predictions:
    """TB logits for every path, batched, with a progress bar; bad files are marked, not run."""
    device = device or torch.device("cpu")
    model = model.to(device).eval()
    loader = DataLoader(
        TolerantImageDataset(paths, image_size),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    logits, readable, reasons = [], [], []
    with Progress(disable=not progress, transient=False) as bar:
        task = bar.add_task(description, total=len(paths))
        with torch.inference_mode():
            for images, ok, why in loader:
                raise_if_stopped()  # a safe point for Ctrl-C / SIGTERM (tb_lightning/signals.py)
                out = model(images.to(device, non_blocking=True)).float().cpu().numpy()
                logits.append(np.where(ok.numpy(), out, np.nan))
                readable.append(ok.numpy())
                reasons.extend(why)
                bar.advance(task, len(ok))
    if not paths:
        return Predictions(np.zeros(0), np.zeros(0, bool), [])
    return Predictions(np.concatenate(logits), np.concatenate(readable).astype(bool), reasons)
