"""Grad-CAM heatmaps of the TB logit, overlaid on the input image.

Grad-CAM comes from captum (`LayerGradCam`, maintained by the PyTorch team): it weights the
last convolutional block's activations by the spatially averaged gradient of the TB logit.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers
import numpy as np
import torch
from matplotlib.figure import Figure
from rich.progress import Progress
from torch import nn
from torchvision.transforms import v2

from tb_lightning.core.atomic import atomic_write_with
from tb_lightning.core.labels import CLASS_NAMES
from tb_lightning.data.transforms import build_transform, load_image

log = logging.getLogger(__name__)


def gradcam_layer(net: nn.Module) -> nn.Module:
    """The last ReLU of the backbone: the last conv block's activations at its own resolution
    (13 x 13 at 512 px for AlexNet, before the final max-pool halves it)."""
    relus = [m for m in net.features.modules() if isinstance(m, nn.ReLU)]
    if not relus:
        raise ValueError("the backbone has no ReLU layer for Grad-CAM")
    return relus[-1]


def gradcam(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Heatmaps (N, H, W) in [0, 1], one per image, upsampled to the input size.

    Positive evidence for TB only (ReLU of the weighted activations), scaled per image.
    """
    from captum.attr import LayerAttribution, LayerGradCam  # the optional 'saliency' extra

    cam = LayerGradCam(net, gradcam_layer(net))
    with torch.enable_grad():
        maps = cam.attribute(images, relu_attributions=True)
    maps = LayerAttribution.interpolate(maps.detach(), images.shape[-2:], "bilinear")[:, 0]
    peak = maps.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    return (maps / peak).clamp(0, 1)


# The overlay figure's width in pixels, at least: the radiograph is shown at DISPLAY_SIZE px.
DISPLAY_SIZE = 512


@dataclass(frozen=True)
class SaliencyMap:
    """One written figure, and whether its Grad-CAM map was empty (no region raises p_tb)."""

    path: Path
    empty: bool


def blend(gray: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB floats in [0, 1]: the 'jet' heatmap blended onto the grey radiograph where it is warm,
    so the radiograph stays readable where the map is cold."""
    base = np.repeat(gray[..., None], 3, axis=2)
    heat = matplotlib.colormaps["jet"](heatmap)[..., :3]
    weight = alpha * heatmap[..., None]
    return np.clip((1 - weight) * base + weight * heat, 0, 1)


def saliency_figure(
    image: torch.Tensor, heatmap: np.ndarray, title: str, note: str | None = None
) -> Figure:
    """The radiograph and its Grad-CAM overlay side by side, with a colour bar, at least
    2 x DISPLAY_SIZE px wide; `title` says p_tb and the call, `note` flags an empty map.

    `image` is the radiograph (3, H, W) uint8 at any size (shown at DISPLAY_SIZE, or its own
    size when larger); the heatmap is upsampled onto it.
    """
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    size = max(DISPLAY_SIZE, image.shape[-1])
    shown = v2.functional.resize(image, [size, size], antialias=True)
    gray = shown.float().mean(dim=0).numpy() / 255.0
    heat = v2.functional.resize(torch.from_numpy(heatmap)[None], [size, size], antialias=True)[0]
    heat = heat.clamp(0, 1).numpy()
    dpi = 100
    fig, axes = plt.subplots(
        1, 2, figsize=(2 * size / dpi + 1.2, size / dpi + 0.9), dpi=dpi, layout="constrained"
    )
    axes[0].imshow(gray, cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("input")
    axes[1].imshow(blend(gray, heat))
    axes[1].set_title("Grad-CAM: regions that raise p_tb" if note is None else note)
    for ax in axes:
        ax.set_axis_off()
    bar = fig.colorbar(
        ScalarMappable(Normalize(0, 1), cmap="jet"), ax=axes[1], fraction=0.046, pad=0.02
    )
    bar.set_label("relative Grad-CAM weight (per image)")
    fig.suptitle(title)
    return fig


def unique_name(stem: str, used: set[str]) -> str:
    name, n = f"{stem}_gradcam.png", 1
    while name in used:
        n += 1
        name = f"{stem}_gradcam_{n}.png"
    used.add(name)
    return name


def write_saliency_maps(
    net: nn.Module,
    paths: Sequence[str],
    probs: Sequence[float],
    threshold: float,
    image_size: int,
    output_dir: Path,
    batch_size: int = 16,
    device: torch.device | None = None,
    progress: bool = True,
    preprocess: Mapping[str, Any] | None = None,
) -> list[SaliencyMap]:
    """One `<stem>_gradcam.png` figure per (readable) image, titled with its p_tb and the call
    at `threshold`; returns them in path order. `preprocess`: the checkpoint's (the map is of
    the preprocessed input; the figure shows the file itself)."""
    import matplotlib.pyplot as plt

    device = device or torch.device("cpu")
    net = net.to(device).eval()
    output_dir.mkdir(parents=True, exist_ok=True)
    resize = v2.Resize((image_size, image_size), antialias=True)
    display = v2.Resize((max(DISPLAY_SIZE, image_size),) * 2, antialias=True)
    transform = build_transform(image_size, preprocess)
    used: set[str] = set()
    written: list[SaliencyMap] = []
    with Progress(disable=not progress) as bar:
        task = bar.add_task("Grad-CAM", total=len(paths))
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            decoded = [load_image(p) for p in chunk]
            images = torch.stack([transform(resize(d)) for d in decoded]).to(device)
            # The figures show the file itself, at DISPLAY_SIZE, not the model's smaller input.
            shown = [display(d) for d in decoded]
            del decoded
            maps = gradcam(net, images).cpu().numpy()
            for offset, (path, image, heatmap) in enumerate(zip(chunk, shown, maps, strict=True)):
                p_tb = float(probs[start + offset])
                call = CLASS_NAMES[int(p_tb >= threshold)]
                empty = bool(heatmap.max() == 0)
                fig = saliency_figure(
                    image,
                    heatmap,
                    f"{Path(path).name}: p_tb {p_tb:.3f} -> {call} (threshold {threshold:.4g})",
                    "EMPTY map: no region raises p_tb" if empty else None,
                )
                target = output_dir / unique_name(Path(path).stem, used)
                atomic_write_with(target, lambda f, fig=fig: fig.savefig(f, format="png"))
                plt.close(fig)
                written.append(SaliencyMap(target, empty))
            bar.advance(task, len(chunk))
    empty = sum(m.empty for m in written)
    if empty:
        log.warning(
            "%d of %d Grad-CAM maps are empty: no region of those images raises the TB logit "
            "(usual for an untrained or weak model); predictions.csv marks them "
            "(saliency_empty=true).",
            empty,
            len(written),
        )
    return written
