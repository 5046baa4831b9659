"""Grad-CAM heatmaps of the TB logit, overlaid on the input image.

Grad-CAM comes from captum (`LayerGradCam`, maintained by the PyTorch team): it weights the
last convolutional block's activations by the spatially averaged gradient of the TB logit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image
from rich.progress import Progress
from torch import nn
from torchvision.transforms import v2

from tb_lightning.core.atomic import atomic_write_with
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


def overlay(image: torch.Tensor, heatmap: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """uint8 image (3, H, W) with the heatmap (H, W) in the 'jet' colormap blended on top."""
    gray = image.float().mean(dim=0).numpy() / 255.0
    base = np.repeat(gray[..., None], 3, axis=2)
    heat = matplotlib.colormaps["jet"](heatmap)[..., :3]
    # Blend where the map is warm; leave the radiograph readable where it is cold.
    weight = alpha * heatmap[..., None]
    blended = (1 - weight) * base + weight * heat
    return Image.fromarray((blended * 255).round().astype(np.uint8))


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
    image_size: int,
    output_dir: Path,
    batch_size: int = 16,
    device: torch.device | None = None,
    progress: bool = True,
) -> list[Path]:
    """One `<stem>_gradcam.png` overlay per (readable) image; returns the files in path order."""
    device = device or torch.device("cpu")
    net = net.to(device).eval()
    output_dir.mkdir(parents=True, exist_ok=True)
    resize = v2.Resize((image_size, image_size), antialias=True)
    transform = build_transform(image_size)
    used: set[str] = set()
    written = []
    empty = 0
    with Progress(disable=not progress) as bar:
        task = bar.add_task("Grad-CAM", total=len(paths))
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            raw = [resize(load_image(p)) for p in chunk]
            images = torch.stack([transform(r) for r in raw]).to(device)
            maps = gradcam(net, images).cpu().numpy()
            for path, image, heatmap in zip(chunk, raw, maps, strict=True):
                target = output_dir / unique_name(Path(path).stem, used)
                picture = overlay(image, heatmap)
                atomic_write_with(target, lambda f, p=picture: p.save(f, format="PNG"))
                written.append(target)
                empty += int(heatmap.max() == 0)
            bar.advance(task, len(chunk))
    if empty:
        log.warning(
            "%d of %d Grad-CAM maps are empty: no region of those images raises the TB logit "
            "(usual for an untrained or weak model), so their overlays show the image only.",
            empty,
            len(written),
        )
    return written
