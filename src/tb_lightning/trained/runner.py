"""The one way a trained network runs over image files: eval, predict, the end-of-training
scoring (and its threshold) and feature extraction all go through `run_over_images`.

Images are decoded with the scan's checks (data/transforms.load_image), batched by a DataLoader
(workers optional), run under inference mode (bf16 autocast where asked), with a progress bar
and a safe point for Ctrl-C / SIGTERM at every batch. A bad file stops the pass, or, tolerant,
gets no output and its reason.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from tb_lightning.core.progress import report_progress
from tb_lightning.core.signals import init_worker, raise_if_stopped, workers_end_with_the_run
from tb_lightning.data.dataset import BAD_FILE, ImageDataset
from tb_lightning.data.inventory import describe_upsampling, header_sizes, upsampling
from tb_lightning.data.transforms import BadImageError, build_transform, load_image

log = logging.getLogger(__name__)

# One batch size for every pass that reports numbers (train's final report, eval), so that the
# same checkpoint gives bit-identical probabilities in both.
INFERENCE_BATCH_SIZE = 32


@dataclass
class ImageRun:
    """What a pass over images gave: one output row per path (NaN for a bad file)."""

    outputs: torch.Tensor  # (n, ...) float32
    readable: np.ndarray  # (n,) bool
    reasons: list[str]  # "" for readable images, else why the file was not used


def run_over_images(
    forward: Callable[[torch.Tensor], torch.Tensor],
    paths: Sequence[str],
    transform: Callable[[torch.Tensor], torch.Tensor],
    image_size: int,
    *,
    batch_size: int = INFERENCE_BATCH_SIZE,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    autocast_bf16: bool = False,
    tolerant: bool = True,
    progress: bool = True,
    description: str = "Predicting",
    sink: Callable[[int, torch.Tensor], None] | None = None,
) -> ImageRun:
    """forward(batch on `device`) for every image, in the order of `paths`.

    tolerant: a bad file gets a NaN row and its reason instead of stopping the pass (predict,
    eval); otherwise its BadImageError stops it (feature extraction: the scan has passed).
    sink: called with (index of the batch's first image, its float32 outputs on the CPU) for
    every batch, which is then not kept: memory stays that of one batch however many images
    there are (the feature cache streams rows into its file so); `outputs` is then empty.
    """
    device = torch.device(device)
    loader = DataLoader(
        ImageDataset(paths, None, transform, image_size=image_size, tolerant=tolerant),
        batch_size=batch_size,
        num_workers=num_workers,
        worker_init_fn=init_worker,  # workers leave stop signals to the run (core/signals.py)
        pin_memory=device.type == "cuda",
    )
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if autocast_bf16
        else contextlib.nullcontext()
    )
    chunks, readable, start = [], [], 0
    with (
        workers_end_with_the_run(),  # a stop signal that also ended the workers is a stop
        # A rich bar at a terminal, a log line every 10 % elsewhere (core/progress.py).
        report_progress(description, len(paths), enabled=progress, logger=log) as bar,
        torch.inference_mode(),
        autocast,
    ):
        for images, labels in loader:
            raise_if_stopped()  # a safe point for Ctrl-C / SIGTERM (core/signals.py)
            out = forward(images.to(device, non_blocking=True)).float().cpu()
            ok = labels != BAD_FILE
            out[~ok] = float("nan")
            if sink is not None:
                sink(start, out)
            else:
                chunks.append(out)
            start += len(labels)
            readable.append(ok.numpy())
            bar.update(len(labels))
    if not paths:
        return ImageRun(torch.zeros(0), np.zeros(0, bool), [])
    ok = np.concatenate(readable).astype(bool)
    # The few bad files are checked again here for their reason (workers cannot return it).
    reasons = ["" if good else problem_of(path) for path, good in zip(paths, ok, strict=True)]
    return ImageRun(torch.cat(chunks) if chunks else torch.zeros(0), ok, reasons)


def problem_of(path: str) -> str:
    """Why load_image refuses this file."""
    try:
        load_image(path)
    except BadImageError as err:
        return err.problem
    return "could not be read during the pass (it changed meanwhile)"


def warn_if_upsampled(paths: Sequence[str], image_size: int) -> dict[str, Any] | None:
    """Warn once (eval, predict) when the checkpoint's input size enlarges these images more
    than 2x on a side; what inventory.upsampling() found, or None. Reads headers only."""
    found = upsampling(image_size, header_sizes(paths))
    if found:
        log.warning(
            "%s",
            describe_upsampling(
                found,
                f"The checkpoint's image size ({image_size} px, its data.image_size)",
                f"a model trained with data.image_size={found['native_side']} matches them.",
            ),
        )
    return found


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
    preprocess: Mapping[str, Any] | None = None,
) -> Predictions:
    """TB logits of a classifier for every path; bad files are marked, not run. `preprocess`:
    the images' preprocessing as the checkpoint stores it (TrainedModel.preprocess)."""
    device = device or torch.device("cpu")
    model = model.to(device).eval()
    run = run_over_images(
        model,
        paths,
        build_transform(image_size, preprocess),
        image_size,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        progress=progress,
        description=description,
    )
    return Predictions(run.outputs.numpy().reshape(-1), run.readable, run.reasons)
