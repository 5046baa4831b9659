"""Grad-CAM heatmaps of the TB logit, overlaid on the input image.

Grad-CAM comes from captum (`LayerGradCam`, maintained by the PyTorch team): it weights the
last convolutional block's activations (the layer the backbone's record names) by the spatially
averaged gradient of the TB logit.
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
from torch import nn
from torchvision.transforms import v2

from tb_lightning.core.artefacts import threshold_text
from tb_lightning.core.atomic import atomic_write_with
from tb_lightning.core.labels import CLASS_NAMES
from tb_lightning.core.progress import report_progress
from tb_lightning.data.transforms import build_transform, load_image
from tb_lightning.models.backbones import backbone

log = logging.getLogger(__name__)


def gradcam_layer(net: nn.Module) -> nn.Module:
    """The layer of net.features whose activations Grad-CAM weighs, as the backbone's record
    says (models/backbones.py): the last activation of its last block (AlexNet: conv5's ReLU,
    31 x 31 at 512 px, before the final max-pool halves it; EfficientNet: its last SiLU block;
    a timm model: its output map)."""
    return backbone(getattr(net, "arch", "alexnet")).gradcam_layer(net.features)


def gradcam(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Heatmaps (N, H, W) in [0, 1], one per image, upsampled to the input size.

    Positive evidence for TB only (ReLU of the weighted activations), scaled per image. With
    model.tta=hflip the map is of the image as it is (its own pass, not its mirror's): a map of
    the mean of two passes would overlay two mirrored maps.
    """
    from captum.attr import LayerAttribution, LayerGradCam  # the optional 'saliency' extra

    cam = LayerGradCam(net, gradcam_layer(net))
    tta = getattr(net, "tta", None)
    net.tta = None
    try:
        with torch.enable_grad():
            maps = cam.attribute(images, relu_attributions=True)
    finally:
        net.tta = tta
    maps = LayerAttribution.interpolate(maps.detach(), images.shape[-2:], "bilinear")[:, 0]
    peak = maps.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    return (maps / peak).clamp(0, 1)


# The overlay figure's width in pixels, at least: the radiograph is shown at DISPLAY_SIZE px.
DISPLAY_SIZE = 512

# The image border whose share of a map is reported: the outer 10% of each side. On a chest
# film as exported for ML that frame holds the collimation edges, the air beside the shoulders,
# markers and text, not the lungs, which start further in. It is 36% of the area (1 - 0.8^2):
# a map spread evenly over the image has that share.
BORDER_FRACTION = 0.10
# A map with more than half its mass in the border shows the frame, not the lungs: flagged.
BORDER_FLAG_SHARE = 0.5
# saliency_flag values in predictions.csv ("" for a map that is neither).
EMPTY_FLAG = "empty"  # no region raises p_tb
BORDER_FLAG = "border"  # most of the map lies in the image border


@dataclass(frozen=True)
class SaliencyMap:
    """One written figure; its map's share of mass in the image border (None for an empty map)
    and its flag: EMPTY_FLAG, BORDER_FLAG or "" (the figure shows no evidence when flagged)."""

    path: Path
    border_share: float | None
    flag: str

    @property
    def empty(self) -> bool:
        return self.flag == EMPTY_FLAG


def border_share(heatmap: np.ndarray, fraction: float = BORDER_FRACTION) -> float | None:
    """The share of the map's mass (sum of its values) in the outer `fraction` of each side,
    on the map as computed (the model's input size); None for an empty map (no mass)."""
    total = float(heatmap.sum())
    if not total > 0:  # NaN too: such a map shows nothing
        return None
    height, width = heatmap.shape[-2:]
    # At least one pixel a side, so that a tiny map still has a border.
    top, side = max(1, round(height * fraction)), max(1, round(width * fraction))
    inside = float(heatmap[..., top : height - top, side : width - side].sum())
    return min(1.0, max(0.0, (total - inside) / total))


def flag_map(share: float | None) -> str:
    """saliency_flag of a map with this border_share()."""
    if share is None:
        return EMPTY_FLAG
    return BORDER_FLAG if share > BORDER_FLAG_SHARE else ""


def flag_note(share: float | None, flag: str) -> str | None:
    """The overlay's title for a flagged map (None: the usual one)."""
    if flag == EMPTY_FLAG:
        return "EMPTY map: no region raises p_tb"
    if flag == BORDER_FLAG:
        return f"FLAGGED: {share:.0%} of the map lies in the image border, outside the body"
    return None


def blend(gray: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB floats in [0, 1]: the 'jet' heatmap blended onto the grey radiograph where it is warm,
    so the radiograph stays readable where the map is cold."""
    base = np.repeat(gray[..., None], 3, axis=2)
    heat = matplotlib.colormaps["jet"](heatmap)[..., :3]
    weight = alpha * heatmap[..., None]
    return np.clip((1 - weight) * base + weight * heat, 0, 1)


def saliency_figure(
    image: torch.Tensor,
    heatmap: np.ndarray,
    title: str,
    note: str | None = None,
    frame: float | None = None,
) -> Figure:
    """The radiograph and its Grad-CAM overlay side by side, with a colour bar, at least
    2 x DISPLAY_SIZE px wide; `title` says p_tb and the call, `note` flags an empty map or one
    on the border; `frame`: the border fraction to outline on the overlay (a border-flagged map).

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
    if frame is not None:  # the border the flag speaks of, so the reader can see it
        inset = frame * size
        axes[1].add_patch(
            plt.Rectangle(
                (inset - 0.5, inset - 0.5),
                size - 2 * inset,
                size - 2 * inset,
                fill=False,
                edgecolor="white",
                linestyle="--",
                linewidth=1.2,
            )
        )
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
    # A rich bar at a terminal, a log line every 10 % elsewhere (core/progress.py).
    with report_progress("Grad-CAM", len(paths), enabled=progress, logger=log) as bar:
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
                share = border_share(heatmap)  # at the model's input size, as computed
                flag = flag_map(share)
                fig = saliency_figure(
                    image,
                    heatmap,
                    f"{Path(path).name}: p_tb {p_tb:.3f} -> {call} "
                    f"(threshold {threshold_text(threshold)})",
                    flag_note(share, flag),
                    BORDER_FRACTION if flag == BORDER_FLAG else None,
                )
                target = output_dir / unique_name(Path(path).stem, used)
                atomic_write_with(target, lambda f, fig=fig: fig.savefig(f, format="png"))
                plt.close(fig)
                written.append(SaliencyMap(target, share, flag))
            bar.update(len(chunk))
    warn_flagged(written)
    return written


def warn_flagged(maps: Sequence[SaliencyMap]) -> None:
    """One warning with the counts of empty and border-flagged maps, when there are any."""
    empty = sum(m.flag == EMPTY_FLAG for m in maps)
    border = sum(m.flag == BORDER_FLAG for m in maps)
    if not (empty or border):
        return
    parts = []
    if empty:
        parts.append(
            f"{empty} of {len(maps)} Grad-CAM maps are empty: no region of those images raises "
            "the TB logit (usual for an untrained or weak model)"
        )
    if border:
        parts.append(
            f"{border} of {len(maps)} Grad-CAM maps have most of their mass (more than "
            f"{BORDER_FLAG_SHARE:.0%}) in the image border (the outer {BORDER_FRACTION:.0%} of "
            "each side), outside the body: they show the frame, not the lungs, and are no "
            "evidence"
        )
    log.warning(
        "%s; predictions.csv marks them (saliency_flag=%s).",
        "; ".join(parts),
        "/".join(f for f, n in ((EMPTY_FLAG, empty), (BORDER_FLAG, border)) if n),
    )
